"""The deploy step: serve an exported model with KServe, as an InferenceService created or updated in place.

``deploy`` builds a ``V1beta1InferenceService`` with the kserve client's model classes: the predictor runs the
project's ServingRuntime (``k8s/base/servingruntime.yaml``, model format ``sonossl``) on the image the pipeline ran
with; ``storageUri`` is the exported model folder in S3, fetched by KServe's storage initializer with the S3
credentials that the service account carries (``k8s/s3-secret.template.yaml``); resources, a readiness probe and, for
GPU, one ``nvidia.com/gpu`` and one warm replica. With ``canary_percent`` the new revision gets that share of the
traffic and the previous one keeps the rest, until a deploy without it promotes the new one to 100 %.
The model card's versions and metrics become annotations (``sonossl.io/model-version``,
``sonossl.io/planes.val.macro_f1``, ...): ``champion_metric`` reads them back from the live service, so the
pipeline deploys only a better model.
The rendered object is checked strictly against KServe's types (``sonossl.manifests``) before it is sent.
It is the one writer of the InferenceService: ``k8s/`` holds none (a re-applied manifest would roll the served
model back), so the first model is served with ``sonossl deploy`` too. On a cluster: get, then create when absent
(404) or replace (a full update, so a finished canary's ``canaryTrafficPercent`` does not linger as it would under
a merge patch).

    isvc = deploy("s3://models/sonossl/3b4fb01c4761", name="sonossl", namespace="sonossl", image=DEFAULT_IMAGE,
                  canary_percent=10, service_account="sonossl-s3", model_card="models/export", dry_run=True)
    champion_metric("sonossl", "sonossl", "planes.val.macro_f1")   # the served model's score, or None
"""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sonossl import __version__

log = logging.getLogger(__name__)

IMAGE_REPOSITORY = "ghcr.io/sonossl/sonossl"
DEFAULT_IMAGE = f"{IMAGE_REPOSITORY}:{__version__}"
ANNOTATION_PREFIX = "sonossl.io/"
MODEL_FORMAT = "sonossl"
HTTP_PORT = 8080
KSERVE_GROUP, KSERVE_VERSION, KSERVE_PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"
BUNDLE_FILE = "model.pt"  # sonossl.export.BUNDLE_FILE (not imported: that module loads torch)

# CPU replicas start in seconds and cost nothing idle (Knative scales them to zero); a GPU replica waits for a GPU
# node and CUDA start-up, so one stays warm.
RESOURCES = {
    False: {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}},
    True: {"requests": {"cpu": "2", "memory": "8Gi", "nvidia.com/gpu": "1"},
           "limits": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"}},
}
REPLICAS = {False: (0, 3), True: (1, 2)}
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}

_DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_ANNOTATION_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
# a container image reference (the grammar of github.com/distribution/reference): [domain[:port]/]path[:tag][@digest],
# the path's components lower-case; the first component is a domain only with a '.' or ':' in it, or as localhost
_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*"
_PATH = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_IMAGE = re.compile(rf"(?P<name>(?:(?P<domain>{_DOMAIN}(?::[0-9]+)?)/)?{_PATH}(?:/{_PATH})*)"
                    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?"
                    r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?")


class DeployError(ValueError):
    """The cluster refused or could not be reached (a ValueError, so the CLI prints one clear line)."""


def _field(name: str) -> str:
    """A setting as the deploy step's parameter and as ``sonossl deploy``'s option: ``canary_percent
    (--canary-percent)``."""
    return f"{name} (--{name.replace('_', '-')})"


# The names Kubernetes takes for each setting: (pattern, longest, what it names). KServe derives Knative route and
# host names from the InferenceService's: DNS-1035, and short enough for the route name.
NAME_RULES = {"name": (_DNS1035, 45, "InferenceService name"), "namespace": (_DNS1123_LABEL, 63, "namespace"),
              "service_account": (_DNS1123_SUBDOMAIN, 253, "service account name"),
              "runtime": (_DNS1123_SUBDOMAIN, 253, "ServingRuntime name")}


def name_problem(field: str, value: Any) -> str | None:
    """Why ``value`` is no valid name for the setting ``field`` (a key of ``NAME_RULES``), or None."""
    pattern, max_len, what = NAME_RULES[field]
    if not isinstance(value, str) or not pattern.fullmatch(value) or len(value) > max_len:
        return f"not a valid {what} (lower-case letters, digits and '-', at most {max_len} characters)"
    return None


def _check_name(value: Any, field: str) -> str:
    problem = name_problem(field, value)
    if problem:
        raise ValueError(f"{_field(field)} {value!r} is {problem}")
    return value


def s3_prefix_problem(uri: Any, whole_bucket: bool = False) -> str | None:
    """Why ``uri`` is no ``s3://BUCKET/PREFIX`` folder KServe can fetch a model from, or None; ``whole_bucket``:
    a bucket alone is fine too (a pipeline's ``model_store``, whose models go in folders under it)."""
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        return ("KServe fetches the model from S3 here; give the exported model folder as s3://BUCKET/PREFIX "
                "(upload it with `sonossl artifacts push models/export s3://...`)")
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not _BUCKET.fullmatch(bucket):
        return f"{bucket!r} is not a valid S3 bucket name"
    if not key.strip("/") and not whole_bucket:
        return f"names a whole bucket; give a folder in it, e.g. s3://{bucket}/models/sonossl/<model version>"
    if posixpath.basename(key.rstrip("/")) in (BUNDLE_FILE, "model_card.json"):
        return "names a file of the export; give its folder"
    return None


def _check_model_uri(uri: Any) -> str:
    problem = s3_prefix_problem(uri)
    if problem:
        raise ValueError(f"{_field('model_uri')} {uri!r}: {problem}")
    return uri.rstrip("/")


def image_problem(image: Any) -> str | None:
    """Why ``image`` is no container image reference Kubernetes can pull, or None."""
    m = _IMAGE.fullmatch(image) if isinstance(image, str) and image.isascii() else None
    if m and len(m.group("name")) > 255:  # the limit is the name's, tag and digest aside
        m = None
    domain = m and m.group("domain")
    if m and domain and not ("." in domain or ":" in domain or domain == "localhost") and domain != domain.lower():
        m = None  # a first component without '.' or ':' is part of the path, which is lower-case
    if not m:
        return (f"not a container image reference such as {DEFAULT_IMAGE} (registry/path:tag; the path in lower "
                "case, no spaces)")
    return None


def _check_canary(percent: Any) -> int | None:
    if percent is None:
        return None
    if isinstance(percent, bool) or not isinstance(percent, int) or not 0 <= percent <= 100:
        raise ValueError(f"{_field('canary_percent')} {percent!r}: give a whole percentage 0-100 of the traffic for "
                         "the new model (or leave it out to send it all the traffic)")
    return percent


def load_model_card(source: Mapping[str, Any] | str | Path) -> dict[str, Any]:
    """A model card from a dict, a ``model_card.json``, an export folder, or ``s3://.../`` export folder."""
    if isinstance(source, Mapping):
        return dict(source)
    src = str(source)
    if src.startswith("s3://"):
        from sonossl.storage import get_bytes

        uri = src if src.endswith(".json") else f"{src.rstrip('/')}/model_card.json"
        where, data = uri, get_bytes(uri)
    else:
        path = Path(src)
        path = path / "model_card.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no model card (an export folder holds model_card.json; run "
                                    "`sonossl export` first)")
        where, data = str(path), path.read_bytes()
    try:
        card = json.loads(data.decode())
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not a valid model card: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not a valid model card: {e}") from None
    except RecursionError:
        raise ValueError(f"{where}: not a valid model card: nested too deeply") from None
    if not isinstance(card, dict) or "model_version" not in card:
        raise ValueError(f"{where}: not a model card (no model_version); it is written by `sonossl export`")
    version = card["model_version"]
    if not isinstance(version, str) or not _ANNOTATION_NAME.fullmatch(version) or len(version) > 63:
        raise ValueError(f"{where}: model_version {version!r} is not a model version (at most 63 letters, digits, "
                         "'-', '_' and '.', as `sonossl export` writes it); it becomes a Kubernetes label")
    metrics, data_block = card.get("metrics"), card.get("data")
    if not (metrics is None or isinstance(metrics, dict) and all(
            splits is None or isinstance(splits, dict) and all(v is None or isinstance(v, dict)
                                                               for v in splits.values())
            for splits in metrics.values())):
        raise ValueError(f"{where}: `metrics` is not task -> split -> {{metric: value}}, as `sonossl export` "
                         "writes it")
    if not (data_block is None or isinstance(data_block, dict)):
        raise ValueError(f"{where}: `data` is not an object of versions, as `sonossl export` writes it")
    return card


def _fmt(value: Any) -> str:
    return format(float(value), ".6g")


def card_annotations(card: Mapping[str, Any]) -> dict[str, str]:
    """Versions and metrics of a model card as ``sonossl.io/...`` annotations (values are strings in Kubernetes).

    A metric is named by its path under the card's ``metrics``: ``planes.val.macro_f1``, ``planes.test.accuracy``,
    ``saliency.val.cc``; that is the name ``champion_metric`` and the pipeline's ``deploy_metric`` take."""
    data = card.get("data") or {}
    ann = {"model-version": str(card["model_version"]),
           "sonossl-version": str(card.get("sonossl_version", "")),
           "feature-version": str(data.get("feature_version", "")),
           "raw-version": str(data.get("raw_version", ""))}
    for task, splits in (card.get("metrics") or {}).items():
        for split, values in (splits or {}).items():
            for k, v in (values or {}).items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "n":
                    try:
                        finite = math.isfinite(v)
                    except OverflowError:  # an int beyond any float
                        finite = False
                    if finite:
                        ann[f"{task}.{split}.{k}"] = _fmt(v)
    out = {}
    for k, v in ann.items():
        if not v:
            continue
        if not _ANNOTATION_NAME.fullmatch(k) or len(k) > 63:
            raise ValueError(f"model card: {k!r} cannot be an annotation name (at most 63 letters, digits, '-', '_' "
                             "and '.', beginning and ending with a letter or digit)")
        out[ANNOTATION_PREFIX + k] = v
    return out


def render(model_uri: str, *, name: str, namespace: str, image: str | None, canary_percent: int | None,
           service_account: str, runtime: str = "sonossl", gpu: bool = False,
           card: Mapping[str, Any] | None = None) -> Any:
    """The InferenceService as a ``kserve.models.V1beta1InferenceService`` (arguments checked, nothing sent)."""
    from kserve.models import (V1beta1InferenceService, V1beta1InferenceServiceSpec, V1beta1ModelFormat,
                               V1beta1ModelSpec, V1beta1PredictorSpec)
    from kubernetes.client import (V1HTTPGetAction, V1ObjectMeta, V1Probe, V1ResourceRequirements,
                                   V1Toleration)

    model_uri = _check_model_uri(model_uri)
    for field, value in (("name", name), ("namespace", namespace), ("service_account", service_account),
                         ("runtime", runtime)):
        _check_name(value, field)
    canary_percent = _check_canary(canary_percent)
    problem = image_problem(image) if image is not None else None
    if problem:
        raise ValueError(f"{_field('image')} {image!r}: {problem}")

    annotations = card_annotations(card) if card else {}
    annotations[ANNOTATION_PREFIX + "model-uri"] = model_uri
    labels = {"app.kubernetes.io/name": "sonossl", "app.kubernetes.io/component": "predictor",
              "app.kubernetes.io/part-of": "sonossl"}
    if card:
        labels[ANNOTATION_PREFIX + "model-version"] = str(card["model_version"])
    lo, hi = REPLICAS[gpu]
    res = RESOURCES[gpu]
    model = V1beta1ModelSpec(
        name="kserve-container", model_format=V1beta1ModelFormat(name=MODEL_FORMAT), runtime=runtime,
        # the folder with its '/': KServe lists the objects under storageUri by prefix, and without it
        # s3://b/models/initial would also fetch models/initial-retrained/... into /mnt/models
        storage_uri=model_uri + "/", protocol_version="v2",
        # the image the pipeline trained with, over the runtime's: served code = trained code; None (a deploy by
        # hand without --image): the ServingRuntime's, the image its kustomization names
        image=image,
        resources=V1ResourceRequirements(requests=dict(res["requests"]), limits=dict(res["limits"])),
        readiness_probe=V1Probe(http_get=V1HTTPGetAction(path="/v2/health/ready", port=HTTP_PORT),
                                initial_delay_seconds=5, period_seconds=10, timeout_seconds=5, failure_threshold=3))
    predictor = V1beta1PredictorSpec(
        model=model, service_account_name=service_account, min_replicas=lo, max_replicas=hi,
        canary_traffic_percent=canary_percent,
        tolerations=[V1Toleration(**GPU_TOLERATION)] if gpu else None)
    return V1beta1InferenceService(
        api_version=f"{KSERVE_GROUP}/{KSERVE_VERSION}", kind="InferenceService",
        metadata=V1ObjectMeta(name=name, namespace=namespace, labels=labels, annotations=annotations),
        spec=V1beta1InferenceServiceSpec(predictor=predictor))


def _client() -> Any:
    """KServeClient from the kubeconfig (KUBECONFIG, ~/.kube/config) or the in-cluster service account."""
    from kserve import KServeClient
    from kubernetes.config import ConfigException

    # the kubernetes client reads KUBECONFIG once, at import: pass the current one
    try:
        return KServeClient(config_file=os.environ.get("KUBECONFIG") or None)
    except (ConfigException, FileNotFoundError, TypeError) as e:
        raise DeployError(f"no Kubernetes configuration ({e}): set KUBECONFIG, or run inside the cluster with a "
                          "service account (k8s/base/rbac.yaml)") from None


def _status_body(body: Any) -> dict[str, Any]:
    """The API's error body as a Kubernetes Status object ({} when it is none: a proxy's page, plain text)."""
    try:
        status = json.loads(body or "")
    except (TypeError, ValueError):
        return {}
    return status if isinstance(status, dict) and status.get("kind") == "Status" else {}


def _api_error(e: BaseException) -> str:
    """An API error in one line: status, reason and the Status' message (the kubernetes client's own text spreads
    headers and body over several lines; KServeClient wraps that text in a RuntimeError)."""
    from kubernetes.client.rest import ApiException

    api = e if isinstance(e, ApiException) else e.__context__
    if not isinstance(api, ApiException):
        return " ".join(str(e).split())[:500]
    message = _status_body(api.body).get("message") or " ".join(str(api.body or "").split())[:300]
    return f"{api.status} {api.reason}: {message}"


def _get(kc: Any, name: str, namespace: str) -> dict[str, Any] | None:
    from kubernetes.client.rest import ApiException

    host = kc.api_instance.api_client.configuration.host
    try:
        return kc.api_instance.get_namespaced_custom_object(KSERVE_GROUP, KSERVE_VERSION, namespace,
                                                             KSERVE_PLURAL, name)
    except ApiException as e:
        if e.status == 404 and _status_body(e.body).get("reason") == "NotFound":
            return None  # the API answered for InferenceServices: there is none of that name
        if e.status == 404:  # not the API's Status: no such API (KServe's CRD not installed) or a wrong server
            raise DeployError(f"{host} has no InferenceService API ({KSERVE_GROUP}/{KSERVE_VERSION}): is KServe "
                              f"installed on this cluster? ({_api_error(e)})") from None
        raise DeployError(f"reading InferenceService {namespace}/{name} from {host}: {_api_error(e)}") from None
    except Exception as e:  # urllib3 connection errors after its retries
        raise DeployError(f"cannot reach the Kubernetes API at {host}: {e}") from None


CONFLICT_ATTEMPTS = 4  # read-and-replace tries when the object changes between the read and the write (HTTP 409)


def _is_conflict(message: str) -> bool:
    return "(409)" in message or "Conflict" in message or "AlreadyExists" in message


def deploy(model_uri: str, *, name: str, namespace: str, image: str | None, canary_percent: int | None,
           service_account: str, runtime: str = "sonossl", gpu: bool = False, dry_run: bool = False,
           model_card: Mapping[str, Any] | str | Path | None = None) -> dict[str, Any]:
    """Create or update the InferenceService ``namespace/name`` serving ``model_uri``; return it as a dict.

    ``model_card`` (a dict, a local export folder or model_card.json) supplies the version and metric annotations;
    a real deploy always reads ``<model_uri>/model_card.json`` from S3, checks that ``model.pt`` is beside it, uses
    the card when no card is given, and refuses a given card of another model version (its annotations, which the
    champion gate compares, would describe another model than the one served). A dry run renders with the given
    card, or without annotations. ``dry_run`` only renders and checks the object."""
    from sonossl.manifests import check, to_dict

    model_uri = _check_model_uri(model_uri)
    card = load_model_card(model_card) if model_card is not None else None
    if not dry_run:
        from sonossl.storage import holds

        stored = load_model_card(model_uri)
        if not holds(f"{model_uri}/{BUNDLE_FILE}"):
            raise DeployError(f"{model_uri} holds a model card but no {BUNDLE_FILE}: push the whole export folder "
                              f"there (`sonossl artifacts push models/export {model_uri}`)")
        if card is not None and card.get("model_version") != stored.get("model_version"):
            raise DeployError(f"--model-card {model_card if not isinstance(model_card, Mapping) else '(given)'} is "
                              f"of model version {card.get('model_version')!r}, but {model_uri} holds "
                              f"{stored.get('model_version')!r}: push that export there, or give its own card")
        card = card or stored
    if card is None:
        log.info("dry run without a model card: no version or metric annotations")
    isvc = render(model_uri, name=name, namespace=namespace, image=image, canary_percent=canary_percent,
                  service_account=service_account, runtime=runtime, gpu=gpu, card=card)
    rendered = to_dict(isvc)
    check(rendered)  # the same strict check as k8s/: a wrong field fails here, not in the cluster's webhook
    traffic = "all traffic" if canary_percent is None else f"{canary_percent}% canary"
    if dry_run:
        log.info("dry run: InferenceService %s/%s (%s), not sent", namespace, name, traffic)
        return rendered

    kc = _client()
    ours = {field: dict(getattr(isvc.metadata, field) or {}) for field in ("labels", "annotations")}
    for attempt in range(1, CONFLICT_ATTEMPTS + 1):
        current = _get(kc, name, namespace)
        verb = "create" if current is None else "update"
        try:
            if current is None:
                out = kc.create(isvc, namespace=namespace)
                action = "created"
            else:
                meta = current.get("metadata") or {}
                isvc.metadata.resource_version = meta["resourceVersion"]
                # keep what others put on the object (kubectl, GitOps tools, KServe's finalizer); ours are replaced
                for field in ("labels", "annotations"):
                    theirs = {k: v for k, v in (meta.get(field) or {}).items()
                              if not k.startswith(ANNOTATION_PREFIX)}
                    setattr(isvc.metadata, field, {**theirs, **ours[field]})
                isvc.metadata.finalizers = meta.get("finalizers")
                isvc.metadata.owner_references = meta.get("ownerReferences")
                out = kc.replace(name, isvc, namespace=namespace)
                action = "updated"
            break
        except RuntimeError as e:  # KServeClient wraps the API's error in a RuntimeError
            message = str(e).strip()
            if _is_conflict(message) and attempt < CONFLICT_ATTEMPTS:
                # someone wrote the object between our read and our write (KServe updates its status during a
                # rollout): read it again and retry, rather than fail the pipeline's deploy step
                log.info("InferenceService %s/%s changed during the %s (attempt %d of %d); reading it again",
                         namespace, name, verb, attempt, CONFLICT_ATTEMPTS)
                continue
            raise DeployError(f"InferenceService {namespace}/{name}: the cluster refused the {verb}: "
                              f"{_api_error(e)}") from None
        except Exception as e:  # urllib3 connection errors after its retries
            raise DeployError(f"InferenceService {namespace}/{name}: the {verb} did not reach the Kubernetes API "
                              f"({type(e).__name__}: {e})") from None
    log.info("%s InferenceService %s/%s: model %s, %s", action, namespace, name,
             (card or {}).get("model_version", model_uri), traffic)
    return out


def served_model(name: str, namespace: str) -> dict[str, str] | None:
    """What the live InferenceService serves: its ``sonossl.io/`` annotations without the prefix (``model-uri``,
    ``model-version``, ``planes.val.macro_f1``, ...). None, with a log line saying why, when there is no cluster
    configuration or no InferenceService of that name; a cluster that refuses or cannot be reached is an error."""
    try:
        kc = _client()
    except DeployError as e:
        log.info("InferenceService %s/%s: unknown, %s", namespace, name, e)
        return None
    current = _get(kc, name, namespace)
    if current is None:
        log.info("InferenceService %s/%s: none of that name", namespace, name)
        return None
    ann = (current.get("metadata") or {}).get("annotations") or {}
    return {k.removeprefix(ANNOTATION_PREFIX): v for k, v in ann.items() if k.startswith(ANNOTATION_PREFIX)}


def champion_metric(name: str, namespace: str, metric: str) -> float | None:
    """The serving model's ``metric`` from the live InferenceService's ``sonossl.io/<metric>`` annotation.

    None, with a log line saying why, when there is no cluster configuration, no such InferenceService, or no
    such annotation: then any new model may be deployed. An unreadable value or a refusing cluster is an error.
    During a canary the annotations are the newest revision's: promote or roll back before comparing again."""
    key = metric.removeprefix(ANNOTATION_PREFIX)
    served = served_model(name, namespace)
    if served is None:
        log.info("champion %s/%s: no champion", namespace, name)
        return None
    value = served.get(key)
    if value is None:
        log.info("champion %s/%s: no annotation %s%s: its %s is unknown", namespace, name, ANNOTATION_PREFIX, key,
                 key)
        return None
    try:
        out = float(value)
    except ValueError:
        raise DeployError(f"InferenceService {namespace}/{name}: annotation {ANNOTATION_PREFIX}{key}={value!r} is "
                          "not a number; fix or remove it (kubectl annotate isvc ...)") from None
    log.info("champion %s/%s: %s = %s (model %s)", namespace, name, key, out, served.get("model-version", "?"))
    return out
