"""Run the whole training pipeline (or the crossval pipeline) on this machine with ``kfp.local`` (SubprocessRunner,
this interpreter).

Each component runs as a subprocess of this Python, as it would in its container, on a pipeline root under
``out_dir``; the deploy step only renders the InferenceService (``deploy_dry_run``) and the champion lookup finds no
cluster, so nothing outside this machine is touched. Without a ``dataset``, the profile's simulated sweeps are
rendered first (as the ``simulate`` DVC stage does) into ``<out_dir>/raw``, and its independent test sweeps (as
``simulate-test``) into ``<out_dir>/raw_test``, the pipeline's ``test_dataset`` unless the arguments name one. A
dataset in a local folder is checked before kfp starts: saliency among the ``tasks`` of data without gaze maps fails
at once (in the preprocess task it would fail only after the task's retries).

    summary = run_local("dist/run-local", profile="tiny")
    summary["model_version"], summary["tasks"]["export"]["artifacts"]["metrics"]["metadata"]
    summary = run_local_crossval("dist/run-local", "../shared/data/pocus", profile="tiny")   # labels + patient ids

Outputs land under ``<out_dir>/kfp/sonossl-training-<timestamp>/<task>/<output>`` (the fine-tunes, one per task of
the ``tasks`` parameter and initialisation, under ``for-loop-<n>-iteration-<i>/finetune[-2]/``), and the crossval
pipeline's under ``<out_dir>/kfp/sonossl-crossval-<timestamp>/``; temporary files of the tasks under
``<out_dir>/tmp``.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from sonossl.config import SimulateParams, as_dict
from sonossl.pipeline.steps import (DOWNSTREAM_TASKS, PARAMS_ENV, check_crossval_listing, check_gaze_maps,
                                    check_tasks)

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    """Environment for the task subprocesses (they inherit it), restored afterwards."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _simulated_dataset(raw: Path, params: SimulateParams) -> Path:
    from sonossl.data.simulate import SIMULATOR_VERSION, simulate

    # Deterministic per parameters: an earlier rendering with the same ones (its simulator.json) is the same data and
    # is kept; one made with others (another profile into the same --out) or another simulator is rendered again.
    wanted = {"simulator_version": SIMULATOR_VERSION,
              "params": json.loads(json.dumps({k: v for k, v in as_dict(params).items() if k != "workers"}))}
    try:
        doc = json.loads((raw / "simulator.json").read_text())
        kept = {"simulator_version": doc.get("simulator_version"), "params": doc.get("params")}
    except (OSError, ValueError, AttributeError):
        kept = None
    if not (raw / "labels.csv").is_file() or kept != wanted:
        if kept is not None:
            log.info("%s: rendered with other simulator parameters or version; rendering it again", raw)
        simulate(raw, params, progress=True)
    return raw


def _task_outputs(task_dir: Path) -> dict[str, Any]:
    """What a finished local task produced: output parameters, and artefacts with their metadata (the values
    logged with ``log_metric`` for a Metrics artefact)."""
    path = task_dir / "executor_output.json"
    if not path.is_file():
        return {}
    out = json.loads(path.read_text())
    artifacts = {name: {"uri": a["artifacts"][0]["uri"], "metadata": a["artifacts"][0].get("metadata", {})}
                 for name, a in out.get("artifacts", {}).items() if a.get("artifacts")}
    return {"parameters": out.get("parameterValues", {}), "artifacts": artifacts}


def summarize_run(run_dir: str | Path) -> dict[str, Any]:
    """Per task of a local run: its parameters and artefacts (metrics included), keyed by task name; a task of a
    ``dsl.ParallelFor`` by its iteration's folder and its name (``for-loop-1-iteration-0/finetune``)."""
    out: dict[str, Any] = {}
    for d in sorted(Path(run_dir).iterdir()):
        if not d.is_dir():
            continue
        if "-iteration-" in d.name and not (d / "executor_output.json").is_file():
            out |= {f"{d.name}/{t.name}": _task_outputs(t) for t in sorted(d.iterdir()) if t.is_dir()}
        else:
            out[d.name] = _task_outputs(d)
    return out


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# the last line of a Python traceback: "ValueError: ...", "sonossl.storage.s3.StorageError: ..."
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*[A-Z]\w*(?:Error|Exception)\b.*")


class _Tail(io.TextIOBase):
    """A text stream that writes through to ``inner`` and keeps its last ``n`` lines: kfp.local prints each task's
    output line by line on stdout, and its final error names only the task, not what went wrong in it."""

    def __init__(self, inner: Any, n: int = 400) -> None:
        self.inner, self.lines, self._part = inner, collections.deque(maxlen=n), ""

    def write(self, text: str) -> int:
        self.inner.write(text)
        *done, self._part = (self._part + text).split("\n")
        self.lines.extend(done)
        return len(text)

    def flush(self) -> None:
        self.inner.flush()


def failure_message(message: str, lines: Iterable[str]) -> str:
    """kfp.local's "Pipeline ... finished with status FAILURE. Inner task failed: 'x'." without its colour codes,
    followed by the failed task's own last error from its output, when there is one: the traceback's last line and
    the lines of its message below it (indented further)."""
    message = _ANSI.sub("", message).strip()
    lines = [_ANSI.sub("", line).rstrip() for line in lines]
    starts = [i for i, line in enumerate(lines) if _EXCEPTION_LINE.match(line.strip())]
    if not starts:
        return message
    first = lines[starts[-1]]
    indent = len(first) - len(first.lstrip())
    error = [first.strip()]
    for line in lines[starts[-1] + 1:starts[-1] + 11]:
        if not line.strip() or len(line) - len(line.lstrip()) <= indent:
            break
        error.append(line.strip())
    return f"{message} The task's error: " + "\n  ".join(error)


def _run(out_dir: Path, params_file: Path, name: str, **arguments: Any) -> tuple[Path, float, Any]:
    """Run the pipeline ``name`` with kfp.local under ``out_dir/kfp``; its run folder, seconds and output task."""
    from kfp import local

    from sonossl.pipeline.spec import pipeline_function

    root = out_dir / "kfp"
    (out_dir / "tmp").mkdir(parents=True, exist_ok=True)
    pattern = f"sonossl-{name}-*"
    before = set(root.glob(pattern)) if root.is_dir() else set()
    pipeline = pipeline_function(name)
    t0 = time.perf_counter()
    tail = _Tail(sys.stdout)
    try:
        with _environ(TMPDIR=str(out_dir / "tmp"), **{PARAMS_ENV: str(params_file)}), contextlib.redirect_stdout(tail):
            local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
            task = pipeline(**arguments)
    except RuntimeError as e:  # a task failed (after its tries): say what went wrong in it, not only its name
        raise RuntimeError(failure_message(str(e), tail.lines)) from None
    seconds = time.perf_counter() - t0
    runs = sorted(set(root.glob(pattern)) - before)
    if not runs:
        raise RuntimeError(f"kfp.local wrote no run under {root}")
    return runs[-1], seconds, task


def _check_local(location: str | None, what: str) -> None:
    """A dataset that is not there fails now, naming it, not after the first task's three tries: a folder here
    (neither ``s3://`` nor ``dvc://``, ``sonossl.pipeline.dataset``) that does not exist, or an ``s3://`` or
    ``dvc://`` location without a labels.csv."""
    from sonossl.pipeline.dataset import DVC_SCHEME, check_raw_dataset

    if location and location.startswith(("s3://", DVC_SCHEME)):
        check_raw_dataset(location)
    elif location and not Path(location).is_dir():
        raise FileNotFoundError(f"{what} {location!r}: no such folder (a local raw dataset: labels.csv and videos; "
                                f"or an s3:// or {DVC_SCHEME} location)")


def _check_arguments(arguments: dict[str, Any] | None) -> dict[str, Any]:
    """``--param`` values other than the two that run-local takes as options of its own."""
    for key in ("profile", "dataset"):
        if key in (arguments or {}):
            raise ValueError(f"--param {key}={arguments[key]}: run-local takes the {key} as --{key} {arguments[key]}")
    return dict(arguments or {})


def run_local_crossval(out_dir: str | Path, dataset: str, profile: str = "tiny",
                       params_file: str | Path = "params.yaml",
                       arguments: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the crossval pipeline locally on ``dataset`` (a labelled raw dataset with patient ids); returns a summary
    (run folder, results.json and report paths, the logged metrics)."""
    from sonossl.config import load_params

    out_dir, params_file = Path(out_dir).resolve(), Path(params_file).resolve()
    arguments = _check_arguments(arguments)
    params = load_params(params_file, profile)  # a bad file or profile fails here, not in the first task
    _check_local(dataset, "dataset")
    if Path(dataset).is_dir():  # a folder here: videos without patient or label, or too few patients of a class for
        # the folds, fail now, not in the crossval task after its retries
        check_crossval_listing(Path(dataset), dataset, int(arguments.get("folds") or params.crossval.folds))
    run_dir, seconds, _ = _run(out_dir, params_file, "crossval", dataset=dataset, profile=profile, **arguments)
    tasks = summarize_run(run_dir)
    return {"run": str(run_dir), "seconds": round(seconds, 1), "profile": profile, "dataset": dataset,
            "results": str(Path(tasks["crossval"]["artifacts"]["results"]["uri"]) / "results.json"),
            "report": tasks["crossval"]["artifacts"]["report"]["uri"],
            "metrics": tasks["crossval"]["artifacts"]["metrics"]["metadata"], "tasks": tasks}


def run_local(out_dir: str | Path, profile: str = "tiny", dataset: str | None = None,
              params_file: str | Path = "params.yaml", arguments: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the training pipeline locally; returns a summary (run folder, model version, metrics per task)."""
    from sonossl.config import load_params

    out_dir, params_file = Path(out_dir).resolve(), Path(params_file).resolve()
    arguments = {"deploy_dry_run": True, **_check_arguments(arguments)}
    params = load_params(params_file, profile)  # a bad file or profile fails here, not in the first task
    _check_local(dataset, "dataset")  # before anything is made: a typo costs nothing
    _check_local(arguments.get("test_dataset"), "test_dataset")
    out_dir.mkdir(parents=True, exist_ok=True)
    if dataset is None:
        dataset = str(_simulated_dataset(out_dir / "raw", params.simulate))
        if params.simulate_test is not None and "test_dataset" not in arguments:  # as dvc repro: sim and sim_test
            arguments["test_dataset"] = str(_simulated_dataset(out_dir / "raw_test", params.simulate_test))
    tasks = check_tasks(arguments.get("tasks", DOWNSTREAM_TASKS))
    for location in (dataset, arguments.get("test_dataset")):
        if location and Path(location).is_dir():  # a folder here: saliency without gaze maps fails now, not in a task
            check_gaze_maps(Path(location), location, tasks)
    run_dir, seconds, task = _run(out_dir, params_file, "training", dataset=dataset, profile=profile, **arguments)
    model = Path(task.output.path)
    card = json.loads((model / "model_card.json").read_text())
    tasks = summarize_run(run_dir)
    decision = tasks.get("champion", {}).get("parameters", {}).get("Output")
    isvc = json.loads(tasks["deploy"]["parameters"]["Output"]) if "deploy" in tasks else None
    return {"run": str(run_dir), "seconds": round(seconds, 1), "profile": profile, "dataset": dataset,
            "test_dataset": arguments.get("test_dataset") or None,
            "model": str(model), "model_version": card["model_version"],
            "feature_version": card["data"]["feature_version"],
            "report": tasks.get("evaluate", {}).get("artifacts", {}).get("report", {}).get("uri"),
            "deploy": decision,
            "inference_service": isvc and {"name": isvc["metadata"]["name"],
                                           "namespace": isvc["metadata"]["namespace"],
                                           "storageUri": isvc["spec"]["predictor"]["model"]["storageUri"],
                                           "dry_run": bool(arguments.get("deploy_dry_run"))},
            "tasks": tasks}
