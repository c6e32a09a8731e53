"""Strict checks of Kubernetes manifests against the API types of the kserve and kubernetes Python clients.

kubernetes-validate only warns on custom resources ("couldn't find schema") and the kserve package ships no CRD
schemas, but it does ship the generated model classes of its API (``kserve.models.V1beta1InferenceService`` and the
rest), each with ``openapi_types`` (attribute -> type) and ``attribute_map`` (attribute -> JSON key); pod-level
fields point at the kubernetes client's classes (``V1Container``, ``V1ResourceRequirements``, ...). ``check``
walks a manifest through those classes: every key must be a known field of its type (a misspelled field is an
error, with the closest known names), every value must have the declared type, and each object is then built with
the class itself, so the client's own checks (required fields, allowed values) run too.

    from sonossl.manifests import check
    runtime = check(yaml.safe_load(open("k8s/base/servingruntime.yaml")))   # a V1alpha1ServingRuntime
    check({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x"}, "strinData": {}})  # ManifestError
"""

from __future__ import annotations

import difflib
import re
from typing import Any

# (apiVersion, kind) -> (client module, class): the kinds this project writes.
KINDS: dict[tuple[str, str], tuple[str, str]] = {
    ("serving.kserve.io/v1beta1", "InferenceService"): ("kserve", "V1beta1InferenceService"),
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): ("kserve", "V1alpha1ServingRuntime"),
    ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): ("kserve", "V1alpha1ClusterServingRuntime"),
    ("v1", "Namespace"): ("kubernetes", "V1Namespace"),
    ("v1", "ServiceAccount"): ("kubernetes", "V1ServiceAccount"),
    ("v1", "Secret"): ("kubernetes", "V1Secret"),
    ("v1", "ConfigMap"): ("kubernetes", "V1ConfigMap"),
    ("v1", "PersistentVolumeClaim"): ("kubernetes", "V1PersistentVolumeClaim"),
    ("batch/v1", "CronJob"): ("kubernetes", "V1CronJob"),
    ("batch/v1", "Job"): ("kubernetes", "V1Job"),
    ("rbac.authorization.k8s.io/v1", "Role"): ("kubernetes", "V1Role"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): ("kubernetes", "V1RoleBinding"),
    ("rbac.authorization.k8s.io/v1", "ClusterRole"): ("kubernetes", "V1ClusterRole"),
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"): ("kubernetes", "V1ClusterRoleBinding"),
}

# kserve's generator names some kubernetes types by their Go package path; the kubernetes client by version.
_ALIASES = {
    "K8sIoApiAppsV1DeploymentStrategy": "V1DeploymentStrategy",
    "K8sIoApiAutoscalingV2HorizontalPodAutoscalerBehavior": "V2HorizontalPodAutoscalerBehavior",
}
# Kubernetes quantities ("2Gi", "500m", 1) are typed `str` in the clients, but the API server takes numbers too.
_QUANTITY_FIELDS = {("V1ResourceRequirements", "limits"), ("V1ResourceRequirements", "requests"),
                    ("V1EmptyDirVolumeSource", "size_limit")}
_PRIMITIVES: dict[str, tuple[type, ...]] = {
    "str": (str,), "int": (int,), "bool": (bool,), "float": (int, float), "datetime": (str,), "date": (str,),
    "V1Time": (str,), "ResourceQuantity": (str, int, float),
}


class ManifestError(ValueError):
    """A manifest that the Kubernetes/KServe API would reject; the message names the field path."""


def _configs() -> dict[str, Any]:
    import kserve.configuration
    import kubernetes.client

    ks, kc = kserve.configuration.Configuration(), kubernetes.client.Configuration()
    ks.client_side_validation = kc.client_side_validation = True
    return {"kserve": ks, "kubernetes": kc}


def _resolve(name: str) -> tuple[type, str]:
    import kserve.models
    import kubernetes.client

    name = _ALIASES.get(name, name)
    if hasattr(kserve.models, name):
        return getattr(kserve.models, name), "kserve"
    if hasattr(kubernetes.client, name):
        return getattr(kubernetes.client, name), "kubernetes"
    raise LookupError(name)


def _type_name(v: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def _build(value: Any, typ: str, path: str, configs: dict[str, Any], quantity: bool = False) -> Any:
    if m := re.fullmatch(r"list\[(.*)\]", typ):
        if not isinstance(value, list):
            raise ManifestError(f"{path}: expected a list, got {_type_name(value)} {value!r}")
        return [_build(v, m.group(1), f"{path}[{i}]", configs, quantity) for i, v in enumerate(value)]
    if m := re.fullmatch(r"dict\(([^,]*), (.*)\)", typ):
        if not isinstance(value, dict):
            raise ManifestError(f"{path}: expected a mapping, got {_type_name(value)} {value!r}")
        return {str(k): _build(v, m.group(2), f"{path}.{k}", configs, quantity) for k, v in value.items()}
    if typ == "object":  # int-or-string and free-form fields: the clients do not constrain them either
        return value
    if typ in _PRIMITIVES:
        allowed = (str, int, float) if quantity else _PRIMITIVES[typ]
        # bool is an int in Python, never in Kubernetes' JSON
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise ManifestError(f"{path}: expected {typ}, got {_type_name(value)} {value!r}")
        return value
    try:
        cls, module = _resolve(typ)
    except LookupError:
        raise ManifestError(f"{path}: cannot check type {typ}: unknown to the installed kserve and kubernetes "
                            "clients; leave this field out or upgrade the clients") from None
    if not isinstance(value, dict):
        raise ManifestError(f"{path}: expected a mapping ({typ}), got {_type_name(value)} {value!r}")
    by_key = {key: attr for attr, key in cls.attribute_map.items()}
    kwargs = {}
    for key, v in value.items():
        if key not in by_key:
            near = difflib.get_close_matches(str(key), list(by_key), n=3)
            hint = f"did you mean {' or '.join(near)}?" if near else f"known fields: {', '.join(sorted(by_key))}"
            raise ManifestError(f"{path}: unknown field {key!r} of {typ} ({hint})")
        if v is None:  # YAML `key:` with no value is omitted by the API server
            continue
        attr = by_key[key]
        kwargs[attr] = _build(v, cls.openapi_types[attr], f"{path}.{key}", configs,
                              (cls.__name__, attr) in _QUANTITY_FIELDS)
    try:
        return cls(**kwargs, local_vars_configuration=configs[module])
    except ValueError as e:  # the client's own checks name the Python attribute: give the manifest's key
        msg = re.sub(r"`(\w+)`", lambda mm: f"`{cls.attribute_map.get(mm.group(1), mm.group(1))}`", str(e))
        raise ManifestError(f"{path}: {msg}") from None


def check(doc: dict[str, Any]) -> Any:
    """Check one manifest strictly; return it as the client's model object. Raises ``ManifestError``."""
    if not isinstance(doc, dict):
        raise ManifestError(f"a manifest must be a mapping, got {_type_name(doc)}")
    api, kind = doc.get("apiVersion"), doc.get("kind")
    name = (doc.get("metadata") or {}).get("name", "?")
    if (api, kind) not in KINDS:
        known = ", ".join(f"{k} ({a})" for a, k in KINDS)
        raise ManifestError(f"{kind} {name} ({api}): no strict check for this kind; known: {known}")
    _, cls_name = KINDS[(api, kind)]
    return _build(doc, cls_name, f"{kind} {name}", _configs())


def check_as(doc: Any, type_name: str, where: str) -> Any:
    """Check a part of a manifest against one client type (``V1PodTemplateSpec`` of a custom resource's pods)."""
    return _build(doc, type_name, where, _configs())


def to_dict(obj: Any) -> dict[str, Any]:
    """A client model object as the JSON/YAML the API server takes (camelCase keys, no nulls)."""
    from kserve import ApiClient

    return ApiClient().sanitize_for_serialization(obj)
