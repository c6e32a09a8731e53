"""``sonossl <step>``: the one entry point for DVC stages, Kubeflow components and users.

Each subcommand parses its arguments, loads the typed parameters of the active profile from ``params.yaml`` and
calls one library function. Heavy imports (torch, av, kfp) happen inside the steps so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

from sonossl import __version__
from sonossl.atomic import check_replaceable


def _utc_time(text: str):
    from datetime import datetime

    from sonossl.monitor.request_log import as_utc

    try:
        return as_utc(datetime.fromisoformat(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO time: {text!r} (e.g. 2026-11-27T08:00)") from None


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number 0 or more, got {text!r}")
    return value


def _exit_code(text: str) -> int:
    """An exit code of its own: 0, or 3 to 125 (1 and 2 mean something else to the caller; a shell gives 126 and
    up other meanings, and 256 would be 0)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value != 0 and not 3 <= value <= 125:
        raise argparse.ArgumentTypeError(f"expected 0 or a number from 3 to 125 (1 is drift, 2 an error), got {text!r}")
    return value


def _default_params() -> Path:
    """``params.yaml`` in the working directory, as DVC reads it; where there is none, ``$SONOSSL_PARAMS`` (the
    image sets it to its own copy, so that a container started in another folder finds the profiles)."""
    here, env = Path("params.yaml"), os.environ.get("SONOSSL_PARAMS")
    return Path(env) if env and not here.is_file() else here


def _add_params_args(p: argparse.ArgumentParser, note: str = "", profile: str | None = None) -> None:
    """--params and --profile; ``note`` says when they are read, ``profile`` is a default other than the file's."""
    default = (f"default: {profile}; the file's `profile:` is not read" if profile
               else "default: the file's `profile:`")
    p.add_argument("--params", default=_default_params(), type=Path,
                   help=f"parameter file (default: params.yaml, or $SONOSSL_PARAMS where the working directory has "
                        f"none){note}")
    p.add_argument("--profile", default=profile, help=f"profile: tiny|default|gpu ({default}){note}")


def _cmd_simulate(args: argparse.Namespace) -> int:
    from sonossl.config import ParamsError, load_params
    from sonossl.data.simulate import simulate

    loaded = load_params(args.params, args.profile)
    block = "simulate_test" if args.test_set else "simulate"
    params = getattr(loaded, block)
    if params is None:
        raise ParamsError(f"{args.params}: {loaded.profile} has no simulate_test block, which --test-set renders")
    check_replaceable(args.out, "simulator.json", "simulated dataset")
    report = simulate(args.out, params, progress=not args.quiet, section=f"{loaded.profile}.{block}")
    print(json.dumps(report.summary(), indent=2))
    return 0


def _cmd_preprocess(args: argparse.Namespace) -> int:
    from sonossl.config import load_params
    from sonossl.data.clips import preprocess

    params = load_params(args.params, args.profile).preprocess
    check_replaceable(args.out, "meta.json", "clip dataset")
    report = preprocess(args.raw, args.out, params, progress=not args.quiet)
    print(json.dumps(report.summary(), indent=2))
    return 0


def _cmd_contact_sheet(args: argparse.Namespace) -> int:
    from sonossl.data.contact_sheet import contact_sheet

    path = contact_sheet(args.raw, args.out, per_class=args.per_class, seed=args.seed, real=args.real)
    print(path)
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    import os

    from sonossl.config import load_params
    from sonossl.pipeline.mirror import mirrored
    from sonossl.train.pretrain import pretrain

    params = load_params(args.params, args.profile).pretrain
    # Under torchrun, rank 0 copies the folder (the only rank that writes checkpoints) and no rank restores it:
    # rank 0's node does before torchrun starts (`sonossl artifacts pull --missing-ok`), and rank 0 sends the
    # checkpoint it resumes to the other ranks (train.loop), so all resume the same epoch.
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    store = args.checkpoint_store if os.environ.get("RANK", "0") == "0" else None
    with mirrored(args.out, store, restore_first=not distributed):
        metrics = pretrain(args.clips, args.out, params, mode=args.mode,
                           resume=args.resume or bool(args.checkpoint_store), progress=not args.quiet,
                           budget=args.budget)
    if metrics:  # rank 0
        print(json.dumps({k: metrics[k] for k in ("mode", "val", "chance", "clips_per_s")}, indent=2))
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from sonossl.config import load_params, scratch_spec, task_fractions
    from sonossl.train.finetune import finetune

    params = load_params(args.params, args.profile)
    ft = params.finetune
    fractions = task_fractions(ft, args.task, args.fractions)
    metrics = finetune(args.clips, args.out, ft, task=args.task, encoder=args.encoder,
                       encoder_spec=None if args.encoder else scratch_spec(params),
                       fractions=fractions, test_clips=args.test_clips, resume=args.resume,
                       progress=not args.quiet)
    keys = ("macro_f1", "accuracy") if args.task == "planes" else ("cc", "kld", "nss", "sim", "auc_judd")
    summary = {r["name"]: {k: (r["test"] or {}).get(k) for k in keys} for r in metrics["runs"]}
    print(json.dumps({"selected": metrics["selected"], "test": summary}, indent=2))
    return 0


def _add_train_dataset_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train-dataset", default=None, metavar="NAME",
                   help="a dataset under `train:` in the params file (the train-* stages): only the tasks its "
                        "stages train, planes and, if NAME is under `train_saliency:`, saliency (default: every "
                        "task in --finetune)")


def _train_tasks(args: argparse.Namespace) -> list[str] | None:
    from sonossl.config import ParamsError, load_params, train_tasks

    if args.train_dataset is None:
        return None
    try:
        return train_tasks(load_params(args.params, args.profile), args.train_dataset)
    except ParamsError as e:
        raise ParamsError(f"{args.params}: --train-dataset: {e}") from None


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from sonossl.evaluate.report import evaluate

    metrics = evaluate(args.pretrain, args.finetune, args.out, crossval=args.crossval, tasks=_train_tasks(args))
    print((args.out / "results.md").read_text())
    print(f"{len(metrics)} metric groups -> {args.out / 'metrics.json'}")
    return 0


def _cmd_crossval(args: argparse.Namespace) -> int:
    from sonossl.config import load_params
    from sonossl.train.crossval import crossval

    out = crossval(args.clips, args.out, load_params(args.params, args.profile), progress=not args.quiet,
                   report=args.report)
    print(json.dumps({f"{r['init']} {r['method']}": {"accuracy": r["accuracy"], **r["per_class_f1"]}
                      for r in out["results"]}, indent=2))
    return 0


def _cmd_readme_results(args: argparse.Namespace) -> int:
    from sonossl.evaluate.report import insert_into_readme

    print(insert_into_readme(args.results, args.readme, extra=args.extra))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from sonossl.config import load_params
    from sonossl.export import export

    check_replaceable(args.out, "model_card.json", "model bundle")
    card = export(args.clips, args.finetune, args.out, load_params(args.params, args.profile),
                  tasks=_train_tasks(args))
    print(json.dumps({k: card[k] for k in ("model_version", "classes", "metrics")}, indent=2))
    return 0


def _stale_log(args: argparse.Namespace) -> str | None:
    """With ``--stale-log-days N``: why the request log counts as stale (no part file written in the N days up to
    the window's end), or None."""
    from datetime import UTC, datetime, timedelta

    from sonossl.monitor.request_log import as_utc, last_written

    if not args.stale_log_days:
        return None
    end = as_utc(args.until) or datetime.now(UTC)
    first = (end - timedelta(days=args.stale_log_days)).date()
    if last_written(args.log, first, end.date()) is not None:
        return None
    return (f"request log {args.log}: nothing written to it from {first} to {end:%Y-%m-%d} (--stale-log-days "
            f"{args.stale_log_days}): no traffic for that long, or a server that stopped logging")


def _cmd_drift(args: argparse.Namespace) -> int:
    from sonossl.monitor.drift import DriftParams, TooFewFrames, drift_report, summary_text

    if args.since is not None and args.until is not None and args.since >= args.until:
        raise ValueError(f"--since {args.since.isoformat()} is not before --until {args.until.isoformat()}: the "
                         "window [since, until) is empty")
    params = DriftParams(margin=args.margin, drift_share=args.drift_share, min_frames=args.min_frames,
                         max_frames=args.max_frames, window_videos=args.window_videos)
    try:
        result = drift_report(args.model_dir, args.log, args.out, params=params, since=args.since,
                              until=args.until, window=args.window)
    except TooFewFrames as e:  # nothing to judge in the window: an answer, not an error
        stale = _stale_log(args)
        if stale:  # ... unless nothing reached the log for days: a server that stopped logging looks the same
            print(f"sonossl drift: {stale} ({e})", file=sys.stderr)
            return 2
        print(f"sonossl drift: too few frames to judge: {e}", file=sys.stderr)
        return args.too_few_exit_code
    print(summary_text(result.summary))
    print(f"report: {result.html}")
    return 1 if result.drift_detected else 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from sonossl.serve.__main__ import main as serve_main

    return serve_main(args.serve_args)


def _cmd_artifacts(args: argparse.Namespace) -> int:
    from sonossl.storage import ChecksumMismatch, client, delete, download, files_to_upload, holds, upload

    s3 = client(args.endpoint_url)
    if args.action == "push":
        files, _ = files_to_upload(args.local)  # what upload sends (not the temporary files of a killed write)
        keys = upload(args.local, args.uri, client=s3, progress=not args.quiet, delete=args.delete,
                      force=args.force)
        size = sum(p.stat().st_size for p in files)
        # keys already holding identical bytes are not sent again; the log line above says how many were sent
        print(f"pushed {args.local} -> {args.uri}: {len(keys)} file(s), {size:,} bytes in place (sha256 in metadata)")
    elif args.missing_ok and not holds(args.uri, client=s3):
        print(f"nothing at {args.uri}; {args.local} left as it is (--missing-ok)")
    else:
        try:
            out = download(args.uri, args.local, client=s3, progress=not args.quiet, replace=args.replace)
        except ChecksumMismatch as e:  # damaged; an object without a checksum (another tool's) still fails
            if not args.discard_damaged:
                raise
            # a checkpoint store: a damaged copy must not fail every restart of the job (as the KFP steps' store)
            logging.getLogger("sonossl.cli").warning("%s", e)
            n = delete(args.uri, client=s3)  # what the pull read: the object the URI names, or its prefix
            print(f"deleted {args.uri} ({n} object(s)), as it cannot be pulled; {args.local} left as it is "
                  "(--discard-damaged)")
            return 0
        files = [out] if out.is_file() else [p for p in out.rglob("*") if p.is_file()]
        size = sum(p.stat().st_size for p in files)
        print(f"pulled {args.uri} -> {out}: {len(files)} file(s), {size:,} bytes (sha256 verified)")
    return 0


def _cmd_infer(args: argparse.Namespace) -> int:
    import requests

    from sonossl.atomic import atomic_write_text
    from sonossl.pipeline.spec import parse_pairs
    from sonossl.serve.batch import infer_videos, list_videos, per_video
    from sonossl.serve.client import Client

    if args.frames_per_request < 1:
        raise ValueError(f"--frames-per-request: at least 1, got {args.frames_per_request}")
    headers = parse_pairs(args.header, "--header", "NAME=VALUE, e.g. Host=sonossl.sonossl.example.com")
    videos = list_videos(args.videos)
    if not videos:
        raise ValueError(f"no videos in {', '.join(map(str, args.videos))} (an empty labels.csv?)")
    with Client(args.url, model=args.model, timeout=args.timeout, headers=headers) as client:
        try:
            ready = client.ready(timeout=10)
        except requests.RequestException as e:
            raise ValueError(f"cannot reach {args.url}: {type(e).__name__}: {e}") from None
        if ready.status_code != 200:
            raise ValueError(f"{args.url}: model {args.model!r} is not ready (HTTP {ready.status_code}: "
                             f"{ready.text.strip()[:200]})")
        frames, failed = infer_videos(client, videos, args.frames_per_request, progress=not args.quiet)
    if len(frames):
        print(per_video(frames).to_string(index=False))
    if args.out and len(frames):
        atomic_write_text(args.out, frames.to_csv(index=False))
        print(f"wrote {args.out}: {len(frames)} frame(s) of {frames['video'].nunique()} video(s)")
    elif args.out:
        print(f"sonossl infer: {args.out} not written: no video was answered", file=sys.stderr)
    for video, reason in failed.items():
        print(f"sonossl infer: {video}: {reason}", file=sys.stderr)
    if failed:
        print(f"sonossl infer: error: {len(failed)} of {len(videos)} video(s) not answered", file=sys.stderr)
        return 2
    return 0


def _cmd_pipeline(args: argparse.Namespace) -> int:
    if args.action == "compile":
        from sonossl.pipeline.spec import PIPELINES, compile_pipelines, parse_pairs

        names = list(PIPELINES) if args.pipeline == "all" else [args.pipeline]
        for path in compile_pipelines(args.out, names, parse_pairs(args.param)):
            print(path)
        return 0
    if args.action == "submit":
        from sonossl.pipeline.spec import parse_pairs
        from sonossl.pipeline.submit import SubmitError, submit

        try:
            with contextlib.redirect_stdout(sys.stderr):  # kfp.Client prints its links: keep stdout for the JSON
                out = submit(args.host, args.pipeline, parse_pairs(args.param), namespace=args.namespace,
                             experiment=args.experiment, token=args.token, run_name=args.run_name,
                             schedule=args.schedule, timeout=args.timeout)
        except SubmitError as e:
            print(f"sonossl pipeline submit: error: {e}", file=sys.stderr)
            return 1
        print(json.dumps(out, indent=2))
        return 0
    from sonossl.pipeline.local import run_local, run_local_crossval
    from sonossl.pipeline.spec import parse_pairs, typed_parameters

    arguments = typed_parameters(args.pipeline, parse_pairs(args.param))
    if args.pipeline == "crossval" and args.dataset is None:
        raise ValueError("run-local --pipeline crossval: give --dataset, a raw dataset whose labels.csv has a "
                         "label and a patient_id for every video (e.g. ../shared/data/pocus)")
    with contextlib.redirect_stdout(sys.stderr):  # kfp logs every task to stdout: keep stdout for the summary
        if args.pipeline == "crossval":
            summary = run_local_crossval(args.out, args.dataset, profile=args.profile, params_file=args.params,
                                         arguments=arguments)
        else:
            summary = run_local(args.out, profile=args.profile, dataset=args.dataset, params_file=args.params,
                                arguments=arguments)
    tasks = summary.pop("tasks")
    if args.pipeline == "training":
        summary["metrics"] = tasks["export"]["artifacts"]["metrics"]["metadata"]  # the exported model's
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_deploy(args: argparse.Namespace) -> int:
    import yaml

    from sonossl.deploy import deploy

    if args.gpu and not args.image:
        logging.getLogger("sonossl.deploy").warning(
            "--gpu without --image: the pods run the image of ServingRuntime %s; on GPU nodes that must be the "
            "CUDA image (the gpu overlay's runtime), or they serve on the CPU", args.runtime)
    isvc = deploy(args.model_uri, name=args.name, namespace=args.namespace, image=args.image,
                  canary_percent=args.canary_percent, service_account=args.service_account, runtime=args.runtime,
                  gpu=args.gpu, dry_run=args.dry_run, model_card=args.model_card)
    if args.dry_run:
        print(yaml.safe_dump(isvc, sort_keys=False), end="")
    else:
        meta = isvc.get("metadata") or {}
        print(json.dumps({"inferenceservice": f"{meta.get('namespace')}/{meta.get('name')}",
                          "model_version": (meta.get("annotations") or {}).get("sonossl.io/model-version"),
                          "canary_percent": args.canary_percent, "resource_version": meta.get("resourceVersion")},
                         indent=2))
    return 0


def _cmd_champion(args: argparse.Namespace) -> int:
    from sonossl.deploy import served_model

    served = served_model(args.name, args.namespace)
    if served is None:
        print(f"sonossl champion: no InferenceService {args.namespace}/{args.name} (or no cluster configuration)",
              file=sys.stderr)
        return 1
    if args.field is None:
        print(json.dumps(served, indent=2))
        return 0
    if args.field not in served:
        print(f"sonossl champion: InferenceService {args.namespace}/{args.name} has no annotation "
              f"sonossl.io/{args.field}; it has: {', '.join(sorted(served)) or 'none'}", file=sys.stderr)
        return 1
    print(served[args.field])
    return 0


def build_parser() -> argparse.ArgumentParser:
    from sonossl.pipeline.spec import PIPELINES  # the pipelines' names (kfp itself is imported only to compile)

    parser = argparse.ArgumentParser(
        prog="sonossl", description="Self-supervised learning for ultrasound video: the pipeline's steps.")
    parser.add_argument("--version", action="version", version=f"sonossl {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("simulate", help="render simulated fetal ultrasound sweeps (a raw dataset)")
    _add_params_args(p)
    p.add_argument("--out", required=True, type=Path, help="raw dataset folder to write (replaced atomically)")
    p.add_argument("--test-set", action="store_true",
                   help="render the profile's simulate_test sweeps (other fetuses: the independent test set)")
    p.set_defaults(func=_cmd_simulate)

    p = sub.add_parser("preprocess", help="decode, validate, crop and resize a raw dataset into a clip dataset")
    _add_params_args(p)
    p.add_argument("--raw", required=True, type=Path, help="raw dataset folder: labels.csv + videos")
    p.add_argument("--out", required=True, type=Path, help="clip dataset folder to write (replaced atomically)")
    p.set_defaults(func=_cmd_preprocess)

    p = sub.add_parser("pretrain", help="pretext pretraining of the frame encoder on unlabelled clips")
    _add_params_args(p)
    p.add_argument("--clips", required=True, type=Path, help="clip dataset (output of preprocess)")
    p.add_argument("--out", required=True, type=Path, help="output folder: encoder.pt, metrics.json, live/")
    p.add_argument("--mode", default="both-sequential",
                   help="order | transform | both-sequential | both-parallel (default: both-sequential)")
    p.add_argument("--budget", choices=("main", "ablation"), default="main",
                   help="main: the profile's pretrain.epochs; ablation: its pretrain.ablation_epochs, the one cost "
                        "of every encoder in the pretext-mode ablation (default: main)")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoints/last.pt when it belongs to the same run")
    p.add_argument("--checkpoint-store", default=None, metavar="S3_URI",
                   help="copy OUT there every minute and when the run ends or gets SIGTERM, and (one process) "
                        "restore it first; implies --resume (under torchrun: restore rank 0's OUT with "
                        "`sonossl artifacts pull --missing-ok` before torchrun starts; rank 0 sends the "
                        "checkpoint to the other ranks)")
    p.set_defaults(func=_cmd_pretrain)

    p = sub.add_parser("finetune", help="downstream training (linear probe and fine-tune) at several label fractions")
    _add_params_args(p)
    p.add_argument("--clips", required=True, type=Path, help="clip dataset with labels (and saliency maps)")
    p.add_argument("--out", required=True, type=Path, help="output folder: metrics.json, model.pt, runs/")
    p.add_argument("--task", default="planes", choices=["planes", "saliency"])
    p.add_argument("--encoder", type=Path, default=None,
                   help="pretrained encoder (a pretrain output folder); omitted = from scratch")
    p.add_argument("--fractions", default="all",
                   help="label fractions: all (params), ablation (params: ablation_fractions), or e.g. 0.05,0.2")
    p.add_argument("--test-clips", type=Path, default=None,
                   help="an independent test set (a clip dataset, every labelled frame scored); omitted = the "
                        "test split of --clips")
    p.add_argument("--resume", action="store_true", help="continue interrupted runs from their checkpoints")
    p.set_defaults(func=_cmd_finetune)

    p = sub.add_parser("evaluate", help="results report (markdown tables, metrics, confusion plots) of all runs")
    p.add_argument("--pretrain", required=True, type=Path, help="folder of pretrain outputs (one per mode)")
    p.add_argument("--finetune", required=True, type=Path, help="folder of finetune outputs")
    p.add_argument("--crossval", type=Path, default=None,
                   help="a cross-validation results.json (`sonossl crossval`) to add to the report")
    p.add_argument("--out", required=True, type=Path, help="report folder: results.md, metrics.json, plots/")
    _add_params_args(p, note="; read only with --train-dataset")
    _add_train_dataset_arg(p)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("crossval", help="video classification (POCUS, or yours): k-fold by patient, SSL vs scratch")
    _add_params_args(p)
    p.add_argument("--clips", required=True, type=Path, help="clip dataset with video labels and patient_id")
    p.add_argument("--out", required=True, type=Path, help="output folder: results.json, metrics.json, folds/")
    p.add_argument("--report", type=Path, default=None, help="also write the results table (markdown) here")
    p.set_defaults(func=_cmd_crossval)

    p = sub.add_parser("readme-results", help="copy reports/results.md into the README's results block")
    p.add_argument("--results", type=Path, default=Path("reports/results.md"))
    p.add_argument("--readme", type=Path, default=Path("README.md"))
    p.add_argument("--extra", type=Path, nargs="*", default=[Path("reports/crossval.md")],
                   help="more reports to append when they exist (default: reports/crossval.md)")
    p.set_defaults(func=_cmd_readme_results)

    p = sub.add_parser("export", help="the model to serve: best by validation, model card, reference statistics")
    _add_params_args(p)
    p.add_argument("--clips", required=True, type=Path, help="the clip dataset the models were trained on")
    p.add_argument("--finetune", required=True, type=Path, help="folder of finetune outputs to choose from")
    p.add_argument("--out", required=True, type=Path, help="export folder (replaced atomically)")
    _add_train_dataset_arg(p)
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("contact-sheet", help="PNG of sample frames per class from a raw dataset")
    p.add_argument("--raw", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--per-class", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--real", type=Path, default=None, help="another raw dataset to show below (real videos)")
    p.set_defaults(func=_cmd_contact_sheet)

    p = sub.add_parser("drift", help="Evidently drift report of the request log against the model's reference")
    p.add_argument("--model-dir", required=True, help="export folder (or s3:// prefix) with reference statistics")
    p.add_argument("--log", required=True, help="request log: folder or s3:// prefix (written by the server)")
    p.add_argument("--out", required=True, help="reports folder or s3:// prefix: <window>/drift.html + index.html")
    p.add_argument("--since", type=_utc_time, default=None, help="start of the window (ISO time, UTC); default: all")
    p.add_argument("--until", type=_utc_time, default=None, help="end of the window (ISO time, UTC, exclusive)")
    p.add_argument("--window", default=None, help="name of the window's report folder (default: from its times)")
    p.add_argument("--margin", type=float, default=1.25,
                   help="threshold = margin x the 95th percentile of scores of windows of unchanged videos")
    p.add_argument("--drift-share", type=float, default=0.5, help="share of drifted statistics that is drift")
    p.add_argument("--min-frames", type=int, default=30,
                   help="fewer usable frames of the model in the window: no report, exit code --too-few-exit-code")
    p.add_argument("--max-frames", type=int, default=5000,
                   help="score at most this many of the window's frames, evenly spaced in time (the embedding "
                        "check's memory grows with the square of reference + window frames)")
    p.add_argument("--window-videos", type=_non_negative_int, default=0, metavar="N",
                   help="videos in the window, for the thresholds (made from windows of that many unchanged "
                        "videos, at most half the model's held-out videos); default 0: the window's requests (a "
                        "video sent whole is one request); give it when clients send a video in many requests")
    p.add_argument("--too-few-exit-code", type=_exit_code, default=3,
                   help="exit code for a window with too few frames to judge: 0, or 3 to 125 (default 3; 0 for a "
                        "schedule on which a day without traffic is no failure; 1 and 2 mean drift and error)")
    p.add_argument("--stale-log-days", type=_non_negative_int, default=0, metavar="N",
                   help="with too few frames in the window, exit 2 (an error) instead when nothing was written to the "
                        "log in the N days up to --until (or now): no traffic for that long, or a server that "
                        "stopped logging (default 0: never)")
    p.set_defaults(func=_cmd_drift)

    p = sub.add_parser("serve", help="serve an exported model (same as python -m sonossl.serve; --help there)",
                       add_help=False)
    p.add_argument("serve_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("infer", help="send videos to a running endpoint (sonossl serve or the InferenceService); "
                                     "a label per video, and per-frame answers as CSV")
    p.add_argument("videos", nargs="+", type=Path,
                   help="video or image files, or raw dataset folders (labels.csv: their videos, labels kept)")
    p.add_argument("--url", required=True,
                   help="the endpoint, e.g. http://127.0.0.1:8080, or the InferenceService's URL")
    p.add_argument("--model", default="sonossl", help="the model's name on the endpoint (default: sonossl)")
    p.add_argument("--header", action="append", default=[], metavar="NAME=VALUE",
                   help="an HTTP header for every request (repeatable), e.g. Host=sonossl.sonossl.example.com to "
                        "call an InferenceService through the ingress gateway's address")
    p.add_argument("--out", type=Path, default=None,
                   help="CSV of every frame: video, frame, label, blank, p_<class>..., crop, model_version "
                        "(and expected, from labels.csv)")
    p.add_argument("--frames-per-request", type=int, default=256,
                   help="frames per request, at most the server's --max-frames (default: 256, its default)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default: 120)")
    p.set_defaults(func=_cmd_infer)

    p = sub.add_parser("artifacts", help="push/pull files and folders to/from S3 or MinIO, sha256-verified")
    actions = p.add_subparsers(dest="action", required=True)
    endpoint_help = ("S3 endpoint, e.g. http://127.0.0.1:9000 for MinIO (default: AWS_ENDPOINT_URL_S3 or "
                     "AWS_ENDPOINT_URL, else AWS); credentials come from AWS_* variables or AWS_PROFILE")
    a = actions.add_parser("push", help="upload a file or a folder (recursively); identical objects are skipped")
    a.add_argument("local", type=Path, help="file or folder to upload")
    a.add_argument("uri", help="s3://bucket/prefix (a folder's files go under it)")
    a.add_argument("--endpoint-url", default=None, help=endpoint_help)
    a.add_argument("--delete", action="store_true",
                   help="a folder: also delete the objects under the prefix that it no longer holds, once every "
                        "file is up (the prefix becomes a copy of the folder, as `aws s3 sync --delete`)")
    a.add_argument("--force", action="store_true",
                   help="send every file again, also where an object with the same sha256 metadata is there: the "
                        "repair of an object damaged on the server (a pull fails on it: checksum mismatch)")
    a.set_defaults(func=_cmd_artifacts)
    a = actions.add_parser("pull", help="download an object, or a prefix into a folder (replaced when complete)")
    a.add_argument("uri", help="s3://bucket/key or s3://bucket/prefix")
    a.add_argument("local", help="file or folder to write; ending in / a folder to write into, under the URI's "
                                 "last name (the rest of the folder is left alone)")
    a.add_argument("--endpoint-url", default=None, help=endpoint_help)
    a.add_argument("--replace", action="store_true",
                   help="a prefix: replace LOCAL even when it holds files the prefix does not (they are deleted; "
                        "without it such a pull is refused)")
    a.add_argument("--missing-ok", action="store_true",
                   help="nothing at URI is not an error (a checkpoint store before its first copy)")
    a.add_argument("--discard-damaged", action="store_true",
                   help="an object whose bytes fail their sha256 is not an error: warn, delete what URI holds "
                        "(the object it names, or everything under it) and leave LOCAL as it is (a checkpoint "
                        "store: the run starts fresh instead of failing every restart); an object without a "
                        "checksum still fails")
    a.set_defaults(func=_cmd_artifacts)
    p = sub.add_parser("pipeline", help="Kubeflow pipelines: compile to YAML, submit to a cluster, run locally")
    actions = p.add_subparsers(dest="action", required=True)
    a = actions.add_parser("compile", help="write the pipelines' YAML (the same bytes every time)")
    a.add_argument("--out", type=Path, default=Path("dist/pipelines"),
                   help="folder for <pipeline>.yaml (default: dist/pipelines)")
    a.add_argument("--pipeline", default="all", choices=["all", *PIPELINES])
    a.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="replace a parameter's default in the YAML, e.g. profile=gpu (repeatable)")
    a.set_defaults(func=_cmd_pipeline)
    a = actions.add_parser("submit", help="start a run (or a recurring run) on Kubeflow Pipelines via kfp.Client")
    a.add_argument("--host", required=True,
                   help="the Kubeflow Pipelines API, e.g. https://kubeflow.example.org/pipeline")
    a.add_argument("--pipeline", default="training", choices=list(PIPELINES))
    a.add_argument("--namespace", default=None, help="profile namespace (multi-user Kubeflow)")
    a.add_argument("--experiment", default="sonossl", help="experiment name (created when missing)")
    a.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a run parameter, e.g. dataset=s3://datasets/raw/sim (repeatable)")
    a.add_argument("--token", default=None, help="bearer token (e.g. `kubectl create token ...`)")
    a.add_argument("--run-name", default=None)
    a.add_argument("--schedule", default=None, metavar="CRON",
                   help="a recurring run on this cron schedule, e.g. '0 6 * * *' (the monitoring pipeline)")
    a.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the API (default: 10)")
    a.set_defaults(func=_cmd_pipeline)
    a = actions.add_parser("run-local", help="run the training (or crossval) pipeline here with kfp.local",
                           description="Run the training pipeline (or the crossval pipeline) on this machine with "
                                       "kfp.local. The tasks' logs go to stderr; the run's summary (JSON) alone to "
                                       "stdout.")
    _add_params_args(a, profile="tiny")
    a.add_argument("--pipeline", default="training", choices=["training", "crossval"])
    a.add_argument("--out", type=Path, default=Path("dist/run-local"),
                   help="folder for the pipeline root, raw data and temp files (default: dist/run-local)")
    a.add_argument("--dataset", default=None,
                   help="raw dataset (folder, s3:// prefix or dvc:// location); default (training pipeline): "
                        "simulate the profile's sweeps, and its test sweeps as the test_dataset parameter; the "
                        "crossval pipeline needs one with a label and a patient_id per video")
    a.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="another pipeline parameter, e.g. pretrain_epochs=1 or tasks=planes (repeatable)")
    a.set_defaults(func=_cmd_pipeline)
    p = sub.add_parser("deploy", help="serve an exported model with KServe: create or update its InferenceService")
    p.add_argument("--model-uri", required=True, help="the export folder in S3 (s3://BUCKET/PREFIX): the storageUri")
    p.add_argument("--name", default="sonossl", help="InferenceService name (default: sonossl)")
    p.add_argument("--namespace", default="sonossl", help="its namespace (default: sonossl)")
    p.add_argument("--image", default=None,
                   help="serving image (default: none in the InferenceService, so the ServingRuntime's image applies: "
                        "the one k8s/'s kustomization names)")
    p.add_argument("--canary-percent", type=int, default=None,
                   help="share of the traffic for the new model, 0-100 (default: all of it; 0 deploys it with none, "
                        "KServe's rollback, where the pipeline's canary_percent=0 means all at once)")
    p.add_argument("--service-account", default="sonossl-s3",
                   help="service account carrying the S3 credentials (default: sonossl-s3)")
    p.add_argument("--runtime", default="sonossl", help="ServingRuntime name (default: sonossl)")
    p.add_argument("--model-card", type=Path, default=None,
                   help="local export folder or model_card.json for the annotations (default: the card at "
                        "--model-uri, read from S3; none on --dry-run)")
    p.add_argument("--gpu", action="store_true", help="one nvidia.com/gpu per replica, one replica always warm")
    p.add_argument("--dry-run", action="store_true", help="print the InferenceService as YAML; send nothing")
    p.set_defaults(func=_cmd_deploy)

    p = sub.add_parser("champion", help="what the live InferenceService serves: model URI, version, metrics")
    p.add_argument("--name", default="sonossl", help="InferenceService name (default: sonossl)")
    p.add_argument("--namespace", default="sonossl", help="its namespace (default: sonossl)")
    p.add_argument("--field", default=None,
                   help="print only this annotation (without sonossl.io/), e.g. model-uri or planes.val.macro_f1")
    p.set_defaults(func=_cmd_champion)
    return parser


def _child_processes(root: int | None = None) -> list[int]:
    """The descendants of process ``root`` (this process by default; Linux: the children of every thread, theirs,
    and so on: a task runs under a shell), or none where /proc cannot say."""
    found: list[int] = []
    todo = [os.getpid() if root is None else root]
    while todo:
        pid = todo.pop()
        for task in Path(f"/proc/{pid}/task").glob("*"):
            with contextlib.suppress(OSError, ValueError):
                kids = [int(k) for k in (task / "children").read_text().split()]
                found += kids
                todo += kids
    return found


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:  # the server has its own parser (KServe's options included): hand over everything
        return _cmd_serve(argparse.Namespace(serve_args=argv[1:]))
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from sonossl.config import ParamsError

    me = os.getpid()

    def stop(signum, frame):  # SIGTERM (a scheduler, `timeout`, a pod being stopped) ends a step as Ctrl-C does:
        # through its clean-up (staging folders removed, workers stopped), not with the process alone; said once,
        # by this process, not by the workers it forked (which inherit the handler). Its child processes get the
        # signal too (their own children included), as a Ctrl-C reaches the whole process group: a clean-up that
        # waits for them (a worker pool, kfp.local's task processes) then waits for their ends, not for their work.
        if os.getpid() == me:
            print(f"sonossl {args.command}: stopped (SIGTERM)", file=sys.stderr)
            for pid in _child_processes():
                with contextlib.suppress(OSError):
                    os.kill(pid, signum)
        raise SystemExit(128 + signum)

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, stop)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"sonossl {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ParamsError, FileNotFoundError, ValueError, FloatingPointError) as e:
        # Expected failures (bad parameters, bad inputs, a loss that diverged) get one clear line, not a traceback;
        # a setting out of its range is checked by the step that uses it, which does not know the file: named here
        where = getattr(args, "params", None)
        if isinstance(e, ParamsError) and where is not None and not str(e).startswith(str(where)):
            e = ParamsError(f"{where}: {e}")
        print(f"sonossl {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        # Anything else is an error too, with its traceback; never exit 1, which some commands use as an answer
        # (`drift`: drift found, `champion`: nothing served), so that a crash cannot read as one.
        traceback.print_exc()
        print(f"sonossl {args.command}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:  # main() called from other Python code (a test, a notebook): its handler back
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
