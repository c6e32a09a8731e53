"""Which pretraining settings learn the pretext tasks best at the pipeline's cost: held-out pretext accuracy.

Pretrains one ``both-sequential`` encoder per learning rate, batch size, order-loss weight and seed on the training
videos of ``--clips`` (the profile's epochs, clips and everything else; only ``pretrain.lr``, the schedule's peak,
``pretrain.batch_size``, the same clips in more or fewer steps, ``pretrain.loss_weights.order``, the order loss
against the mean of the three transform losses, and ``pretrain.seed`` change) and reads the accuracy of every head on
the held-out clips of the validation videos, as the pipeline's ``pretrain`` stage reports it, with the wall time of
each run. No label is read. The held-out clips are drawn with the seed, so ``--seeds 3`` shows how far apart two runs of
one setting land: the noise any difference between settings has to beat. It is the cheap screen (about 1 min per run
on 2 cores: 47-69 s on the AVX2 EPYC) before the expensive check, ``label_seeds.py --pretrain-lr R`` (ten draws of
the downstream fine-tune, 10 min and more).

    .venv/bin/python benchmarks/pretext_rates.py [--lr 5e-4 1e-3 2e-3 4e-3] [--batch-size 64 32]
        [--order-weight 1 2] [--seeds 3]
Run after `dvc repro preprocess@sim`. Writes benchmarks/results/pretext_rates.json (or --out), after every run; the
runs go rate by rate, every batch size at each, every order weight at each, every seed at each.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

from sonossl.config import as_dict, load_params
from sonossl.train.pretrain import pretrain

from label_seeds import finish  # benchmarks/ is on the path when run as a script

ROOT = Path(__file__).resolve().parents[1]


def every(option: str, values: list | None, ok, must: str) -> None:
    """Stop, naming ``option`` and every value that fails ``ok``, before any work (None: not given)."""
    bad = [v for v in values or [] if not ok(v)]
    if bad:
        raise SystemExit(f"{option}: every {must}, got {bad}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lr", type=float, nargs="+", default=[5e-4, 1e-3, 2e-3, 4e-3],
                    help="peak pretraining learning rates to compare (default: 5e-4 1e-3 2e-3 4e-3)")
    ap.add_argument("--batch-size", type=int, nargs="+", default=None,
                    help="pretraining batch sizes to compare at every rate (default: the profile's)")
    ap.add_argument("--order-weight", type=float, nargs="+", default=None,
                    help="weights of the order loss to compare (pretrain.loss_weights.order; default: the profile's)")
    ap.add_argument("--seeds", type=int, default=1,
                    help="pretraining seeds per setting: the profile's seed and the next ones (default: 1), to see "
                         "how far one run's accuracies are from another's")
    ap.add_argument("--profile", default=None, help="params.yaml profile (default: the file's)")
    ap.add_argument("--clips", type=Path, default=ROOT / "data/clips/sim")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/pretext_rates.json")
    args = ap.parse_args()
    every("--lr", args.lr, lambda lr: lr > 0, "rate must be positive")
    every("--batch-size", args.batch_size, lambda b: b >= 1, "batch size must be at least 1")
    every("--order-weight", args.order_weight, lambda w: w > 0, "weight must be positive")
    if args.seeds < 1:
        raise SystemExit(f"--seeds: must be at least 1, got {args.seeds}")
    if not (args.clips / "meta.json").is_file():
        raise SystemExit(f"{args.clips}: no clip dataset; run `dvc repro preprocess@sim` first")
    params = load_params(ROOT / "params.yaml", args.profile)
    pre = params.pretrain
    seeds = range(pre.seed, pre.seed + args.seeds)
    runs = [(lr, b, w, seed) for lr in args.lr for b in args.batch_size or [pre.batch_size]
            for w in args.order_weight or [pre.loss_weights.order] for seed in seeds]
    rows: list[dict] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sonossl-pretext-rates-") as tmp:
        for lr, batch, weight, seed in runs:
            t = time.perf_counter()
            weights = dataclasses.replace(pre.loss_weights, order=weight)
            m = pretrain(args.clips, Path(tmp) / f"lr{lr:g}-b{batch}-w{weight:g}-s{seed}",
                         dataclasses.replace(pre, lr=lr, batch_size=batch, loss_weights=weights, seed=seed),
                         mode="both-sequential", progress=False)
            row = {"lr": lr, "batch_size": batch, "order_weight": weight, "seed": seed,
                   "seconds": round(time.perf_counter() - t, 1),
                   "data_version": m["data_version"],
                   "val": {k: v for k, v in m["val"].items() if k.endswith("_acc")},
                   "train": {k: v for k, v in m["train"].items() if k.endswith("_acc")}}
            rows.append(row)
            print(json.dumps(row), flush=True)
            result = {"benchmark": "pretext_rates", "profile": params.profile, "mode": "both-sequential",
                      "pretrain": as_dict(pre) | dict.fromkeys(("lr", "batch_size", "seed"), "per row")
                      | {"loss_weights": {**as_dict(pre.loss_weights), "order": "per row"}},
                      "chance": m["chance"], "finished": f"{len(rows)}/{len(runs)} runs", "rates": rows}
            finish(result, args.out, t0, quiet=len(rows) < len(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
