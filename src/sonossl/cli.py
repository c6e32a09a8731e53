"""``sonossl <step>``: the one entry point for DVC stages, Kubeflow components and users.

Each subcommand parses its arguments, loads the typed parameters of the active profile from ``params.yaml`` and
calls one library function. Heavy imports (torch, av, kfp) happen inside the steps so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from sonossl import __version__


def _add_params_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", type=Path, help="parameter file (default: params.yaml)")
    p.add_argument("--profile", default=None, help="profile to use instead of the file's `profile:` (tiny|default|gpu)")


def _cmd_simulate(args: argparse.Namespace) -> int:
    from sonossl.config import load_params
    from sonossl.data.simulate import simulate

    params = load_params(args.params, args.profile).simulate
    report = simulate(args.out, params, progress=not args.quiet)
    print(json.dumps(report.summary(), indent=2))
    return 0


def _cmd_preprocess(args: argparse.Namespace) -> int:
    from sonossl.config import load_params
    from sonossl.data.clips import preprocess

    params = load_params(args.params, args.profile).preprocess
    report = preprocess(args.raw, args.out, params, progress=not args.quiet)
    print(json.dumps(report.summary(), indent=2))
    return 0


def _cmd_contact_sheet(args: argparse.Namespace) -> int:
    from sonossl.data.contact_sheet import contact_sheet

    path = contact_sheet(args.raw, args.out, per_class=args.per_class, seed=args.seed, real=args.real)
    print(path)
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from sonossl.config import load_params
    from sonossl.train.pretrain import pretrain

    params = load_params(args.params, args.profile).pretrain
    metrics = pretrain(args.clips, args.out, params, mode=args.mode, resume=args.resume, progress=not args.quiet)
    if metrics:  # rank 0
        print(json.dumps({k: metrics[k] for k in ("mode", "val", "chance", "clips_per_s")}, indent=2))
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from sonossl.config import as_dict, load_params
    from sonossl.train.finetune import finetune

    params = load_params(args.params, args.profile)
    ft = params.finetune
    if args.fractions == "all":
        fractions = ft.fractions if args.task == "planes" else ft.saliency_fractions
    elif args.fractions == "ablation":
        fractions = ft.ablation_fractions
    else:
        fractions = [float(x) for x in args.fractions.split(",")]
    metrics = finetune(args.clips, args.out, ft, task=args.task, encoder=args.encoder,
                       encoder_spec=None if args.encoder else as_dict(params.pretrain.encoder),
                       fractions=fractions, resume=args.resume, progress=not args.quiet)
    keys = ("macro_f1", "accuracy") if args.task == "planes" else ("cc", "kld", "nss", "sim", "auc_judd")
    summary = {r["name"]: {k: (r["test"] or {}).get(k) for k in keys} for r in metrics["runs"]}
    print(json.dumps({"selected": metrics["selected"], "test": summary}, indent=2))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from sonossl.evaluate.report import evaluate

    metrics = evaluate(args.pretrain, args.finetune, args.out, crossval=args.crossval)
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

    card = export(args.clips, args.finetune, args.out, load_params(args.params, args.profile))
    print(json.dumps({k: card[k] for k in ("model_version", "classes", "metrics")}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sonossl", description="Self-supervised learning for ultrasound video: the pipeline's steps.")
    parser.add_argument("--version", action="version", version=f"sonossl {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("simulate", help="render simulated fetal ultrasound sweeps (a raw dataset)")
    _add_params_args(p)
    p.add_argument("--out", required=True, type=Path, help="raw dataset folder to write (replaced atomically)")
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
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoints/last.pt when it belongs to the same run")
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
    p.add_argument("--resume", action="store_true", help="continue interrupted runs from their checkpoints")
    p.set_defaults(func=_cmd_finetune)

    p = sub.add_parser("evaluate", help="results report (markdown tables, metrics, confusion plots) of all runs")
    p.add_argument("--pretrain", required=True, type=Path, help="folder of pretrain outputs (one per mode)")
    p.add_argument("--finetune", required=True, type=Path, help="folder of finetune outputs")
    p.add_argument("--crossval", type=Path, default=None, help="POCUS cross-validation results.json, if run")
    p.add_argument("--out", required=True, type=Path, help="report folder: results.md, metrics.json, plots/")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("crossval", help="POCUS video classification: k-fold by patient, SSL vs scratch")
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
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("contact-sheet", help="PNG of sample frames per class from a raw dataset")
    p.add_argument("--raw", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--per-class", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--real", type=Path, default=None, help="another raw dataset to show below (real videos)")
    p.set_defaults(func=_cmd_contact_sheet)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from sonossl.config import ParamsError

    try:
        return args.func(args)
    except (ParamsError, FileNotFoundError, ValueError) as e:
        # Expected failures (bad parameters, bad inputs) get one clear line, not a traceback.
        print(f"sonossl {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
