"""Compile the pipelines to Kubeflow's YAML (the IR a cluster runs and the UI uploads), the same bytes every time.

The pipelines are ``pipelines/training.py``, ``pipelines/monitoring.py`` and ``pipelines/crossval.py``; ``kfp dsl
compile --py <file>`` gives the same YAML as this module with no parameter overrides. ``parameters`` replaces
parameter defaults in the YAML (the values a run gets when it names none); run parameters are typed from the
pipeline's own declarations.

    paths = compile_pipelines("dist/pipelines")          # training.yaml, monitoring.yaml, crossval.yaml
    compile_pipeline("training", "training.yaml", {"image": "ghcr.io/sonossl/sonossl:0.2.0"})
"""

from __future__ import annotations

import importlib
import json
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from sonossl.atomic import atomic_write_bytes

# name -> (module, attribute): the repository's pipelines/, installed as sonossl.kubeflow.pipelines
PIPELINES = {name: (f"sonossl.kubeflow.pipelines.{name}", name) for name in ("training", "monitoring", "crossval")}
# Parameter types of the pipeline IR, as Python types for ``key=value`` arguments
_TYPES = {"STRING": str, "NUMBER_INTEGER": int, "NUMBER_DOUBLE": float, "BOOLEAN": bool, "LIST": list}


def _list(text: str) -> list:
    """A list parameter: JSON (``["planes", "saliency"]``, as the Kubeflow UI takes it) or comma-separated."""
    if text.strip().startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise ValueError from None
        return value
    return [item.strip() for item in text.split(",") if item.strip()]


def pipeline_function(name: str) -> Callable[..., Any]:
    if name not in PIPELINES:
        raise ValueError(f"pipeline {name!r} is not one of {sorted(PIPELINES)}")
    module, attr = PIPELINES[name]
    return getattr(importlib.import_module(module), attr)


def parameter_types(name: str) -> dict[str, type]:
    """The pipeline's run parameters and their Python types (from its compiled spec)."""
    spec = pipeline_function(name).pipeline_spec
    params = spec.root.input_definitions.parameters
    from kfp.pipeline_spec import pipeline_spec_pb2

    return {key: _TYPES[pipeline_spec_pb2.ParameterType.ParameterTypeEnum.Name(p.parameter_type)]
            for key, p in sorted(params.items())}


def required_parameters(name: str) -> list[str]:
    """The pipeline's run parameters without a default: a run must give each a value."""
    params = pipeline_function(name).pipeline_spec.root.input_definitions.parameters
    return sorted(key for key, p in params.items() if not p.HasField("default_value"))


def typed_parameters(name: str, values: dict[str, str]) -> dict[str, Any]:
    """``key -> text`` (from ``--param key=value``) as the types the pipeline declares (a list as JSON or
    comma-separated); unknown keys and, for the training pipeline, bad ``tasks`` and ``deploy_metric`` fail."""
    from sonossl.pipeline.steps import check_gate_metric, check_tasks

    types = parameter_types(name)
    out: dict[str, Any] = {}
    for key, text in values.items():
        if key not in types:
            raise ValueError(f"--param {key}={text}: the {name} pipeline has no parameter {key!r}; its parameters "
                             f"are {sorted(types)}")
        tp = types[key]
        try:
            if tp is bool:
                if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                out[key] = text.lower() in ("true", "1", "yes")
            elif tp is list:
                out[key] = _list(text)
            else:
                out[key] = tp(text)
        except ValueError:
            what = "a list, as JSON or comma-separated" if tp is list else tp.__name__
            raise ValueError(f"--param {key}={text}: expected {what}") from None
    if name == "training" and "tasks" in out:
        out["tasks"] = check_tasks(out["tasks"])
    if name == "training" and "deploy_metric" in out:
        out["deploy_metric"] = check_gate_metric(out["deploy_metric"])
    _check_values(out)
    return out


def _check_values(out: dict[str, Any]) -> None:
    """Values the steps would refuse only on the cluster (``canary_percent`` only in the deploy step, after all the
    training): refused here, before anything is compiled, sent or run, by ``sonossl.deploy``'s own rules."""
    from sonossl import deploy
    from sonossl.config import PROFILES

    def refuse(key: str, message: str) -> None:
        raise ValueError(f"--param {key}={out[key]}: {message}")

    if "profile" in out and out["profile"] not in PROFILES:
        refuse("profile", f"not a profile of params.yaml ({', '.join(PROFILES)})")
    if "canary_percent" in out:
        try:
            deploy._check_canary(out["canary_percent"])
        except ValueError:
            refuse("canary_percent", "give a whole percentage 0-100 of the traffic for the new model (0: all of it)")
    for key, field in (("service_name", "name"), ("namespace", "namespace"), ("service_account", "service_account"),
                       ("runtime", "runtime")):
        problem = deploy.name_problem(field, out[key]) if key in out else None
        if problem:
            refuse(key, problem)
    for key in ("image", "gpu_image"):  # gpu_image may be empty: the image with -cuda
        problem = deploy.image_problem(out[key]) if key in out and (out[key] or key == "image") else None
        if problem:
            refuse(key, problem)
    problem = deploy.s3_prefix_problem(out["model_store"], whole_bucket=True) if "model_store" in out else None
    if problem:
        refuse("model_store", problem)


def parse_pairs(pairs: Iterable[str], option: str = "--param", form: str = "key=value") -> dict[str, str]:
    """``["k=v", ...]`` -> ``{"k": "v"}``; a pair without ``=`` fails, naming ``option`` and the ``form`` it takes."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{option} {pair!r}: expected {form}")
        out[key.strip()] = value
    return out


def compile_pipeline(name: str, path: str | Path, parameters: dict[str, Any] | None = None) -> Path:
    """Write the pipeline's YAML to ``path`` (atomically); ``parameters`` replace defaults, as text (``--param``)
    or as Python values (a list, a bool, a number)."""
    from kfp import compiler

    func = pipeline_function(name)
    if parameters:  # a Python value as the text --param would give: a list as JSON, a bool as true/false
        parameters = typed_parameters(name, {k: v if isinstance(v, str) else json.dumps(v)
                                             for k, v in parameters.items()})
    with tempfile.TemporaryDirectory(prefix="sonossl-compile-") as tmp:
        out = Path(tmp) / f"{name}.yaml"
        compiler.Compiler().compile(func, str(out), pipeline_parameters=parameters or None)
        return atomic_write_bytes(Path(path), out.read_bytes())


def compile_pipelines(out_dir: str | Path, names: Iterable[str] = tuple(PIPELINES),
                      parameters: dict[str, Any] | None = None) -> list[Path]:
    """``<out_dir>/<name>.yaml`` for each pipeline; ``parameters`` apply to each pipeline that declares them."""
    out_dir = Path(out_dir)
    names = list(names)
    unknown = set(parameters or {}) - {k for n in names for k in parameter_types(n)}
    if unknown:
        raise ValueError(f"--param: no pipeline among {names} has parameter(s) {sorted(unknown)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        own = {k: v for k, v in (parameters or {}).items() if k in parameter_types(name)}
        paths.append(compile_pipeline(name, out_dir / f"{name}.yaml", own))
    return paths
