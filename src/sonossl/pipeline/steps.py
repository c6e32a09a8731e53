"""What the Kubeflow components run: each function takes paths and plain values and calls one library step.

A component body (``components/*.py``) is a few lines: it calls one of these functions with its artefact paths and
logs the flat metrics it returns through ``log_metric``. These functions call the same library steps, with the same
arguments, as the DVC stages do (``dvc.yaml`` through ``sonossl.cli``), so a pipeline run and ``dvc repro`` share one
code path. Parameters come from the profile named by the pipeline, in the parameter file ``$SONOSSL_PARAMS``
(default: ``params.yaml`` in the working directory, which is where the image keeps it).

    version = preprocess_step("s3://datasets/raw/sim", "/tmp/clips", profile="default")
    metrics = finetune_step("/tmp/clips", "/tmp/ssl-planes", "default", task="planes", name="ssl-planes",
                            encoder="/tmp/encoder")
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sonossl.atomic import atomic_write_text
from sonossl.config import Params, ParamsError, load_params
from sonossl.pipeline import GPU_IMAGE

log = logging.getLogger(__name__)

PARAMS_ENV = "SONOSSL_PARAMS"
# The downstream tasks the training pipeline can fine-tune (its ``tasks`` parameter): plane detection always (the
# served classifier), saliency where the data has gaze maps. Each runs from the SSL encoder and from scratch, as
# ``<init>-<task>``, the finetune output names ``evaluate`` and ``export`` read.
DOWNSTREAM_TASKS = ("planes", "saliency")
PRETRAIN_MODE = "both-sequential"
DEPLOY, KEEP = "deploy", "keep"
# What ``preprocess_test_step`` writes, instead of a clip dataset, when the pipeline has no test_dataset.
NO_TEST_SET = "NO_TEST_SET"


def _logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def params_path() -> Path:
    path = Path(os.environ.get(PARAMS_ENV) or "params.yaml")
    if not path.is_file():
        raise ParamsError(f"{path.resolve()}: parameter file not found; set {PARAMS_ENV} to the params.yaml that "
                          "holds the pipeline's profiles (the image keeps one in its working directory)")
    return path


def load_profile(profile: str, pretrain_epochs: int = 0, pretrain_lr: float = 0.0, finetune_epochs: int = 0,
                 finetune_lr: float = 0.0) -> Params:
    """The named profile, with the pipeline's overrides applied (0 keeps the profile's value)."""
    for name, value in [("pretrain_epochs", pretrain_epochs), ("pretrain_lr", pretrain_lr),
                        ("finetune_epochs", finetune_epochs), ("finetune_lr", finetune_lr)]:
        if value < 0:
            raise ParamsError(f"pipeline parameter {name}={value}: must be positive, or 0 for the profile's value")
    params = load_params(params_path(), profile)
    pt, ft = params.pretrain, params.finetune
    if pretrain_epochs:
        pt = dataclasses.replace(pt, epochs=int(pretrain_epochs))
    if pretrain_lr:
        pt = dataclasses.replace(pt, lr=float(pretrain_lr))
    if finetune_epochs:
        ft = dataclasses.replace(ft, epochs=int(finetune_epochs), saliency_epochs=int(finetune_epochs))
    if finetune_lr:
        ft = dataclasses.replace(ft, lr=float(finetune_lr))
    return dataclasses.replace(params, pretrain=pt, finetune=ft)


def check_tasks(tasks: Any) -> list[str]:
    """The training pipeline's ``tasks`` parameter, checked: distinct names of ``DOWNSTREAM_TASKS``, planes among
    them (the exported model is its classifier)."""
    if isinstance(tasks, str) or not isinstance(tasks, (list, tuple)) or not all(isinstance(t, str) for t in tasks):
        raise ValueError(f"pipeline parameter tasks={tasks!r}: expected a list of task names, e.g. "
                         f"{list(DOWNSTREAM_TASKS)}")
    unknown = sorted(set(tasks) - set(DOWNSTREAM_TASKS))
    if unknown or "planes" not in tasks or len(set(tasks)) != len(tasks):
        what = (f"unknown task(s) {unknown}" if unknown else "planes is missing" if "planes" not in tasks
                else "a task is named twice")
        raise ValueError(f"pipeline parameter tasks={list(tasks)}: {what}; give planes, and saliency where the "
                         f"dataset has gaze maps: {list(DOWNSTREAM_TASKS)} or ['planes']")
    return list(tasks)


def check_gaze_maps(raw_dir: Path, dataset: str, tasks: list[str]) -> None:
    """Fail, naming the dataset, when the tasks include saliency and no video of the raw dataset has gaze maps in
    its annotations (checked before preprocessing, which a retry of the step would repeat; no array is read)."""
    from sonossl.data.annotations import has_saliency
    from sonossl.data.clips import read_listing

    if "saliency" not in tasks:
        return
    listing = read_listing(raw_dir)
    files = [raw_dir / rel for rel in listing.get("annotations", []) if rel]
    if not any(f.is_file() and has_saliency(f) for f in files):
        raise ValueError(f"{dataset}: no gaze maps (no video's annotations hold saliency maps), but the pipeline's "
                         f"tasks are {tasks}: run it with tasks ['planes'] (--param tasks=planes), or add the gaze maps")


def check_crossval_listing(raw_dir: Path, dataset: str, folds: int | None = None) -> None:
    """Fail, naming the dataset and a row, when a video of the raw dataset has no ``patient_id`` (crossval groups
    folds by it) or neither a ``label`` nor an ``annotations`` file (crossval classifies whole videos); with
    ``folds``, also when there are fewer folds than 2 or, where labels.csv labels every video (not an annotations
    file: crossval checks those), a class has fewer patients than folds. Only labels.csv is read, so a local run fails
    before kfp starts."""
    from sonossl.data.clips import read_listing
    from sonossl.train.crossval import check_class_patients

    listing = read_listing(raw_dir)

    def empty(column: str):
        return listing[column] == "" if column in listing else listing["path"].map(lambda _: True)

    for what, rows in (("patient_id", empty("patient_id")),
                       ("label (or annotations file)", empty("label") & empty("annotations"))):
        if rows.any():
            first = int(rows.to_numpy().argmax())
            raise ValueError(f"{dataset}: crossval needs a {what} for every video; {int(rows.sum())} row(s) of "
                             f"labels.csv have none, e.g. row {first + 2} ({listing['path'].iloc[first]!r})")
    if folds is None:
        return
    if folds < 2:
        raise ValueError(f"folds: at least 2, got {folds}")
    if not empty("label").any():
        check_class_patients(listing["label"].tolist(), listing["patient_id"].to_numpy(), folds,
                             f"{dataset} (folds={folds}; labels.csv)")


def _flat(prefix: str, values: dict[str, Any] | None) -> dict[str, float]:
    """Numbers of a (nested) metrics dict as ``prefix.key`` -> float, for ``Metrics.log_metric``."""
    out: dict[str, float] = {}
    for k, v in (values or {}).items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, bool) or k == "n":  # counts of scored frames are not metrics
            continue
        if isinstance(v, (int, float)):
            out[key] = float(v)
        elif isinstance(v, dict) and k not in ("per_class",):
            out.update(_flat(key, v))
    return out


# ------------------------------------------------------------------------------------------------------- steps


def preprocess_step(dataset: str, out_dir: str | Path, profile: str,
                    tasks: list[str] | tuple[str, ...] = DOWNSTREAM_TASKS) -> str:
    """Raw dataset (S3 prefix, DVC revision or folder) -> clip dataset at ``out_dir``; returns its version id. Fails
    first, naming the dataset, when ``tasks`` include saliency and the dataset has no gaze maps."""
    from sonossl.data.clips import preprocess
    from sonossl.pipeline.dataset import fetch_raw_dataset

    _logging()
    tasks = check_tasks(tasks)
    params = load_profile(profile).preprocess
    with tempfile.TemporaryDirectory(prefix="sonossl-raw-") as tmp:
        raw = fetch_raw_dataset(dataset, Path(tmp) / "raw")
        check_gaze_maps(raw, dataset, tasks)
        report = preprocess(raw, out_dir, params, progress=True)
    version = clip_version(out_dir)
    log.info("clip dataset %s: %s", version, json.dumps(report.summary()))
    return version


def preprocess_test_step(dataset: str, out_dir: str | Path, profile: str,
                         tasks: list[str] | tuple[str, ...] = DOWNSTREAM_TASKS) -> str:
    """The pipeline's independent test set: ``dataset`` as ``preprocess_step`` makes it; for no dataset (""), a
    folder holding only the ``NO_TEST_SET`` marker, which ``finetune_step`` reads as "score the test split"."""
    if dataset.strip():
        return preprocess_step(dataset, out_dir, profile, tasks)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / NO_TEST_SET, "no test_dataset: the finetune steps score the test split of their clips\n")
    return ""


def _test_clips(path: str | Path | None) -> Path | None:
    """A test clip dataset for ``finetune``, or None for the test split (no path, or the ``NO_TEST_SET`` marker)."""
    if path is None or (Path(path) / NO_TEST_SET).is_file():
        return None
    return Path(path)


def clip_version(clips_dir: str | Path) -> str:
    """The version id of the clip dataset in ``clips_dir`` (its meta.json); an error naming the folder if none."""
    meta = Path(clips_dir) / "meta.json"
    if not meta.is_file():
        raise FileNotFoundError(f"{clips_dir}: not a clip dataset (no meta.json)")
    return json.loads(meta.read_text())["version"]


def work_key(clips_dir: str | Path, params: Params, *parts: Any) -> str:
    """A GPU step's work, hashed as the training loop fingerprints a run (``sonossl.train.loop.fingerprint``, the
    code included): the clip dataset's version, the parameters and the step's own arguments (``parts``: an encoder
    by its file's hash, ...). The same work gives the same key, in a retried task as in a later run; the key names
    its folder in the checkpoint store."""
    from sonossl.config import as_dict
    from sonossl.train.loop import fingerprint

    return fingerprint(clip_version(clips_dir), as_dict(params), [str(p) for p in parts])


def _store(checkpoint_store: str, step: str, clips_dir: str | Path, params: Params, *parts: Any) -> str | None:
    """The step's folder in the checkpoint store, ``<store>/<step>/<work key>``; None without a store."""
    from sonossl.pipeline.mirror import store_uri

    return store_uri(checkpoint_store, step, work_key(clips_dir, params, *parts)) if checkpoint_store else None


def require_usable_gpu() -> None:
    """Fail at once when this container was given a GPU that torch cannot use (the CPU image on a GPU node, a
    driver too old for the image's CUDA), instead of training the GPU profile on the node's CPUs for hours. The
    NVIDIA device plugin names the GPUs it gave a container in NVIDIA_VISIBLE_DEVICES; nothing is checked without
    it (kfp.local, a CPU node)."""
    import torch

    visible = os.environ.get("NVIDIA_VISIBLE_DEVICES", "").strip()
    if visible.lower() in ("", "void", "none") or torch.cuda.is_available():
        return
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU only"
    raise RuntimeError(f"this step was given a GPU (NVIDIA_VISIBLE_DEVICES={visible}) but torch {torch.__version__} "
                       f"({build}) cannot use it: run the GPU steps with the CUDA image (the pipeline's gpu_image "
                       f"parameter, {GPU_IMAGE} for this release), on a node whose driver supports its CUDA")


def pretrain_step(clips_dir: str | Path, out_dir: str | Path, profile: str, mode: str = PRETRAIN_MODE,
                  epochs: int = 0, lr: float = 0.0, checkpoint_store: str = "") -> dict[str, float]:
    """Pretext pretraining, as the ``pretrain@<mode>`` stage; returns held-out pretext accuracy and chance. With a
    ``checkpoint_store`` (s3://), the output folder is mirrored there and a retry resumes (``mirror``)."""
    from sonossl.pipeline.mirror import mirrored
    from sonossl.train.pretrain import pretrain

    _logging()
    require_usable_gpu()
    loaded = load_profile(profile, pretrain_epochs=epochs, pretrain_lr=lr)
    with mirrored(out_dir, _store(checkpoint_store, f"pretrain-{mode}", clips_dir, loaded, mode)):
        metrics = pretrain(clips_dir, out_dir, loaded.pretrain, mode=mode, resume=True, progress=True)
    return _flat("val", metrics["val"]) | _flat("chance", metrics["chance"])


def finetune_step(clips_dir: str | Path, out_dir: str | Path, profile: str, task: str, name: str,
                  encoder: str | Path | None = None, epochs: int = 0, lr: float = 0.0,
                  test_clips: str | Path | None = None, checkpoint_store: str = "") -> dict[str, float]:
    """Downstream training at the profile's fractions, as the ``finetune@ssl-*`` / ``scratch@*`` stages; returns
    the validation and test scores of every run (``<run>.val.<metric>``, ``<run>.test.<metric>``). The test scores
    are of every frame of ``test_clips`` when it is a clip dataset (as the stages score ``data/clips/sim_test``),
    else (None, or the ``NO_TEST_SET`` marker) of the test split of ``clips_dir``. With a ``checkpoint_store``
    (s3://), the output folder is mirrored there and a retry resumes (``mirror``)."""
    from sonossl.config import scratch_spec, task_fractions
    from sonossl.pipeline.mirror import mirrored
    from sonossl.storage import file_sha256
    from sonossl.train.finetune import finetune

    _logging()
    require_usable_gpu()
    params = load_profile(profile, finetune_epochs=epochs, finetune_lr=lr)
    ft = params.finetune
    fractions = task_fractions(ft, task)
    test = _test_clips(test_clips)
    test_version = clip_version(test) if test and checkpoint_store else ""
    encoder_hash = file_sha256(Path(encoder) / "encoder.pt") if encoder and checkpoint_store else ""
    store = _store(checkpoint_store, name, clips_dir, params, task, name, encoder_hash, test_version)
    with mirrored(out_dir, store):
        metrics = finetune(clips_dir, out_dir, ft, task=task, encoder=encoder,
                           encoder_spec=None if encoder else scratch_spec(params), fractions=fractions,
                           name=name, test_clips=test, resume=True, progress=True)
    out = {"selected_val": float(metrics["selected_val"])}
    for run in metrics["runs"]:
        out |= _flat(f"{run['name']}.val", run["val"]) | _flat(f"{run['name']}.test", run["test"])
    return out


def runs_by_name(paths: list[str | Path]) -> dict[str, str | Path]:
    """Finetune outputs (as a pipeline collects them from its loops, in any order) keyed by the run name each
    recorded in its metrics.json (``ssl-planes``...), the names ``evaluate`` and ``export`` read."""
    runs: dict[str, str | Path] = {}
    for path in paths:
        metrics = Path(path) / "metrics.json"
        if not metrics.is_file():
            raise FileNotFoundError(f"{path}: no metrics.json; that finetune step did not finish")
        name = json.loads(metrics.read_text())["name"]
        if name in runs:
            raise ValueError(f"{path} and {runs[name]}: two finetune outputs named {name!r}")
        runs[name] = path
    return runs


def gather(dest: str | Path, runs: dict[str, str | Path]) -> Path:
    """A folder of links ``dest/<name>`` -> run output, the layout ``evaluate`` and ``export`` read."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name, path in runs.items():
        if not (Path(path) / "metrics.json").is_file():
            raise FileNotFoundError(f"{path}: no metrics.json; the {name} step did not finish")
        (dest / name).symlink_to(Path(path).resolve(), target_is_directory=True)
    return dest


def evaluate_step(encoder: str | Path, finetunes: dict[str, str | Path], report_md: str | Path,
                  out_dir: str | Path | None = None) -> dict[str, float]:
    """The results report of the main line (as the ``evaluate`` stage, without the ablation encoders): writes
    ``results.md`` to ``report_md`` and returns the headline test metrics."""
    from sonossl.evaluate.report import evaluate

    _logging()
    with tempfile.TemporaryDirectory(prefix="sonossl-eval-") as tmp:
        pretrain_dir = gather(Path(tmp) / "pretrain", {PRETRAIN_MODE: encoder})
        finetune_dir = gather(Path(tmp) / "finetune", finetunes)
        out = Path(out_dir) if out_dir else Path(tmp) / "reports"
        metrics = evaluate(pretrain_dir, finetune_dir, out)
        shutil.copyfile(out / "results.md", report_md)
    return _flat("", metrics)


def export_step(clips_dir: str | Path, finetunes: dict[str, str | Path], out_dir: str | Path, profile: str,
                metric: str) -> tuple[str, float, dict[str, float]]:
    """The model to serve, as the ``export`` stage (chosen among the main line's runs); returns its model version,
    its value of ``metric`` (the deploy gate's) and its validation and test metrics."""
    from sonossl.export import export

    _logging()
    params = load_profile(profile)
    with tempfile.TemporaryDirectory(prefix="sonossl-export-") as tmp:
        card = export(clips_dir, gather(Path(tmp) / "finetune", finetunes), out_dir, params, progress=True)
    return card["model_version"], card_metric(card, metric), _flat("", card["metrics"])


def crossval_step(clips_dir: str | Path, out_dir: str | Path, report_md: str | Path, profile: str,
                  pretrain_epochs: int = 0, folds: int = 0, checkpoint_store: str = "") -> dict[str, float]:
    """Video classification, k-fold cross-validation grouped by patient (``sonossl.train.crossval``), as the
    ``crossval`` and ``train-crossval@<name>`` stages: ``results.json``, ``metrics.json`` and the fold runs (a rerun
    into the same folder resumes from them) in ``out_dir``, the table in ``report_md``. ``pretrain_epochs`` and
    ``folds`` override the profile's ``crossval`` block when > 0. With a ``checkpoint_store`` (s3://), the output
    folder (the fold runs) is mirrored there and a retry resumes (``mirror``). Returns
    ``<init>/<method>.video_accuracy`` and ``<init>/<method>.f1_<class>`` for SSL and scratch, probe and
    fine-tune."""
    from sonossl.pipeline.mirror import mirrored
    from sonossl.train.crossval import crossval

    _logging()
    require_usable_gpu()
    if pretrain_epochs < 0:
        raise ParamsError(f"pipeline parameter pretrain_epochs={pretrain_epochs}: must be positive, or 0 for the "
                          "profile's value")
    if folds < 0 or folds == 1:
        raise ParamsError(f"pipeline parameter folds={folds}: must be at least 2, or 0 for the profile's value")
    params = load_profile(profile)
    cv = dataclasses.replace(params.crossval, **{k: int(v) for k, v in [("pretrain_epochs", pretrain_epochs),
                                                                          ("folds", folds)] if v})
    params = dataclasses.replace(params, crossval=cv)
    with mirrored(out_dir, _store(checkpoint_store, "crossval", clips_dir, params)):
        crossval(clips_dir, out_dir, params, progress=True, report=report_md)
    return _flat("", json.loads((Path(out_dir) / "metrics.json").read_text()))


# What the deploy gate may compare: validation scores where higher is better (never test: promotion would then be
# a choice made on the test videos; never KLD: lower is better, and the gate promotes the higher).
GATE_METRICS = ("macro_f1", "accuracy", "macro_precision", "macro_recall", "cc", "nss", "sim", "auc_judd")


def check_gate_metric(metric: str) -> str:
    """``metric`` when it is ``<task>.val.<one of GATE_METRICS>``; a ValueError saying why otherwise."""
    task, _, rest = metric.partition(".")
    split, _, name = rest.partition(".")
    if not task or split != "val" or name not in GATE_METRICS:
        raise ValueError(f"deploy metric {metric!r}: give <task>.val.<metric>, a validation score where higher is "
                         f"better ({', '.join(GATE_METRICS)}), e.g. planes.val.macro_f1 or saliency.val.cc; test "
                         "scores would choose the model on the test videos")
    return metric


def card_metric(card: dict[str, Any], metric: str) -> float:
    """A model card's ``metric`` under the name the InferenceService's annotations give it (``planes.val.macro_f1``,
    ``saliency.val.cc``...: ``sonossl.deploy.card_annotations``), so that the new model and the serving champion
    are compared on the same number. Only validation scores where higher is better (``check_gate_metric``)."""
    from sonossl.deploy import ANNOTATION_PREFIX, card_annotations

    check_gate_metric(metric)
    # metrics are <task>.<split>.<metric>; the other annotations are versions
    numbers = {k.removeprefix(ANNOTATION_PREFIX): float(v) for k, v in card_annotations(card).items()
               if k.count(".") >= 3}
    if metric not in numbers:
        raise ValueError(f"deploy metric {metric!r} is not in the model card; valid metrics are {sorted(numbers)}")
    return numbers[metric]


def deploy_decision(score: float, champion: float | None) -> str:
    """``deploy`` when the new model beats the serving champion (or none is serving), else ``keep``."""
    return DEPLOY if champion is None or score > champion else KEEP


def champion_step(name: str, namespace: str, metric: str, score: float) -> str:
    """Compare the new model's ``metric`` with the serving champion's; the pipeline deploys on ``deploy``."""
    from sonossl.deploy import champion_metric

    _logging()
    champion = champion_metric(name, namespace, metric)
    decision = deploy_decision(score, champion)
    log.info("%s: new model %.4f, serving champion %s -> %s", metric, score,
             "none" if champion is None else f"{champion:.4f}", decision)
    return decision


def deploy_step(model_dir: str | Path, model_store: str, name: str, namespace: str, image: str,
                canary_percent: int, service_account: str, runtime: str, gpu: bool, dry_run: bool) -> str:
    """Upload the export folder to ``<model_store>/<model version>`` and roll it out as a KServe InferenceService
    (``sonossl.deploy.deploy``); on ``dry_run`` nothing leaves this machine: the InferenceService that would be
    applied is only rendered. Returns it as JSON."""
    from sonossl.deploy import DeployError, deploy, load_model_card

    _logging()
    if not model_store.startswith("s3://"):
        raise ValueError(f"pipeline parameter model_store={model_store!r}: give the s3:// prefix KServe reads "
                         "models from (the service account's S3 secret must reach it)")
    if not 0 <= canary_percent <= 100:
        raise ValueError(f"pipeline parameter canary_percent={canary_percent}: must be 0 (full rollout) to 100")
    card = load_model_card(model_dir)
    model_uri = f"{model_store.rstrip('/')}/{card['model_version']}"
    if dry_run:
        log.info("dry run: %s would be uploaded to %s", model_dir, model_uri)
    else:
        from sonossl import storage

        keys = storage.upload(model_dir, model_uri)
        log.info("uploaded %d file(s) to %s", len(keys), model_uri)
    try:
        isvc = deploy(model_uri, name=name, namespace=namespace, image=image, canary_percent=canary_percent or None,
                      service_account=service_account, runtime=runtime, gpu=gpu, dry_run=dry_run, model_card=card)
    except DeployError:
        raise
    except ValueError as e:  # deploy's checks name sonossl deploy's options; say which pipeline parameters they are
        raise ValueError(f"deploy step (pipeline parameters service_name={name!r}, namespace={namespace!r}, "
                         f"model_store={model_store!r}, the image {image!r}): {e}") from None
    return json.dumps(isvc, indent=2, sort_keys=True, default=str)


def report_window(days: int, now: datetime | None = None) -> tuple[datetime | None, datetime | None, str | None]:
    """(since, until, name) of the last ``days`` whole UTC days before ``now``: a recurring run reports on the days
    since the last one, as the drift CronJob does (``days=1``: yesterday, named by its date); 0: the whole log."""
    if days < 0:
        raise ParamsError(f"pipeline parameter window_days={days}: must be at least 1, or 0 for the whole log")
    if days == 0:
        return None, None, None
    now = now or datetime.now(UTC)
    until = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    since = until - timedelta(days=days)
    last = until - timedelta(days=1)
    name = f"{since:%Y-%m-%d}" if days == 1 else f"{since:%Y-%m-%d}_{last:%Y-%m-%d}"
    return since, until, name


def drift_step(model_uri: str, request_log: str, report_html: str | Path, reports: str = "", window_days: int = 1,
               service_name: str = "sonossl", namespace: str = "sonossl",
               now: datetime | None = None) -> tuple[bool, dict]:
    """Drift report of the endpoint's request log over the last ``window_days`` whole UTC days (0: all of it)
    against the model's reference (``sonossl.monitor.drift``); writes its HTML to ``report_html``. An empty
    ``model_uri`` is the model the InferenceService ``service_name`` serves now (its ``sonossl.io/model-uri``), so
    that a schedule follows promotions. With ``reports`` (a folder or s3:// prefix) the report is also kept there,
    per window, with the index of all windows; returns (drift detected, flat numbers of the summary)."""
    from sonossl.monitor.drift import drift_report

    _logging()
    since, until, window = report_window(window_days, now)
    if not model_uri:
        from sonossl.deploy import served_model

        served = served_model(service_name, namespace) or {}
        if not served.get("model-uri"):
            raise ValueError(f"pipeline parameter model_uri is empty and InferenceService {namespace}/{service_name} "
                             "names no model (sonossl.io/model-uri): give model_uri, or deploy with `sonossl deploy`")
        model_uri = served["model-uri"]
        log.info("drift of %s/%s's model %s", namespace, service_name, model_uri)
    with tempfile.TemporaryDirectory(prefix="sonossl-drift-") as tmp:
        result = drift_report(model_uri, request_log, reports or Path(tmp) / "reports", since=since, until=until,
                              window=window)
        if str(result.html).startswith("s3://"):
            from sonossl import storage

            Path(report_html).write_bytes(storage.get_bytes(str(result.html)))
        else:
            shutil.copyfile(result.html, report_html)
    log.info("drift report %s: %s", result.summary["window"], "DRIFT" if result.drift_detected else "no drift")
    return bool(result.drift_detected), _flat("", result.summary)
