"""Which pretraining rate learns the pretext tasks best at the pipeline's cost: held-out pretext accuracy per rate.

Pretrains one ``both-sequential`` encoder per learning rate on the training videos of ``--clips`` (the profile's
epochs, clips and everything else; only ``pretrain.lr``, the schedule's peak, changes) and reads the accuracy of every
head on the fixed held-out clips of the validation videos, as the pipeline's ``pretrain`` stage reports it, with the
wall time of each run. No label is read. It is the cheap screen (about 1 min per rate on 2 cores: 56-69 s on the
AVX2 EPYC) before the expensive check, ``label_seeds.py --pretrain-lr R`` (ten draws of the downstream fine-tune, 10
min and more).

    .venv/bin/python benchmarks/pretext_rates.py [--lr 5e-4 1e-3 2e-3 4e-3]      # after `dvc repro preprocess@sim`
Writes benchmarks/results/pretext_rates.json (or --out), after every rate.
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lr", type=float, nargs="+", default=[5e-4, 1e-3, 2e-3, 4e-3],
                    help="peak pretraining learning rates to compare (default: 5e-4 1e-3 2e-3 4e-3)")
    ap.add_argument("--profile", default=None, help="params.yaml profile (default: the file's)")
    ap.add_argument("--clips", type=Path, default=ROOT / "data/clips/sim")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/pretext_rates.json")
    args = ap.parse_args()
    bad = [lr for lr in args.lr if not lr > 0]
    if bad:
        raise SystemExit(f"--lr: every rate must be positive, got {bad}")
    if not (args.clips / "meta.json").is_file():
        raise SystemExit(f"{args.clips}: no clip dataset; run `dvc repro preprocess@sim` first")
    params = load_params(ROOT / "params.yaml", args.profile)
    rows: list[dict] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sonossl-pretext-rates-") as tmp:
        for lr in args.lr:
            t = time.perf_counter()
            m = pretrain(args.clips, Path(tmp) / f"lr{lr:g}", dataclasses.replace(params.pretrain, lr=lr),
                         mode="both-sequential", progress=False)
            row = {"lr": lr, "seconds": round(time.perf_counter() - t, 1), "data_version": m["data_version"],
                   "val": {k: v for k, v in m["val"].items() if k.endswith("_acc")},
                   "train": {k: v for k, v in m["train"].items() if k.endswith("_acc")}}
            rows.append(row)
            print(json.dumps(row), flush=True)
            result = {"benchmark": "pretext_rates", "profile": params.profile, "mode": "both-sequential",
                      "pretrain": as_dict(params.pretrain) | {"lr": "per row"}, "chance": m["chance"],
                      "finished": f"{len(rows)}/{len(args.lr)} rates", "rates": rows}
            finish(result, args.out, t0, quiet=len(rows) < len(args.lr))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
