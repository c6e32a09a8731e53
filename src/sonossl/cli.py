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
