"""Which pretraining settings learn the pretext tasks best at the pipeline's cost: held-out pretext accuracy.

Pretrains one ``both-sequential`` encoder for every combination of the settings given (``AXES``: the peak learning
rate, the batch size, the order loss's weight, the clip stride, the clips per epoch, the crop, the crop-centre
jitter, the epochs and the learning rate's warm-up) and seed, on the training videos of ``--clips``, with the
profile's values for everything else, and reads the accuracy of every head on the held-out clips of the validation
videos, as the pipeline's ``pretrain`` stage reports it, with the wall time of each run. No label is read. The
held-out clips are drawn with the seed, so ``--seeds 3`` shows how far apart two runs of one setting land: the noise
any difference between settings has to beat. A stride, crop or jitter changes the held-out clips themselves (their
frames, input size or framing), so across those the accuracies describe different tasks: compare the transform
heads, and leave the verdict to the downstream check. It is the cheap screen (about 1 min per run on 2 cores: 47-69
s on the AVX2 EPYC at the default crop) before the expensive check, ``label_seeds.py --pretrain-lr R`` and the like
(ten draws of the downstream fine-tune, 10 min and more).

    .venv/bin/python benchmarks/pretext_rates.py [--lr 5e-4 1e-3 2e-3 4e-3] [--batch-size 64 32]
        [--order-weight 1 2] [--stride 6 12 24] [--clips-per-epoch 1936] [--crop 48 64] [--max-shift 0 4]
        [--epochs 8] [--warmup-epochs 1 3] [--seeds 3] [--first-seed 3]
Run after `dvc repro preprocess@sim`. Each bad value is refused, naming its option, before any work. Writes
benchmarks/results/pretext_rates.json (or --out) after every run; the runs nest in the order of the options above,
the seeds innermost. Every row names all its settings and ``shift_used``, the jitter after the cap that keeps every
transformed crop inside the frame.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sonossl.config import PretrainParams, as_dict, load_params
from sonossl.train.pretrain import pretrain, transform_set

from label_seeds import check_crops, finish  # benchmarks/ is on the path when run as a script

ROOT = Path(__file__).resolve().parents[1]


def every(option: str, values: list | None, ok, must: str) -> None:
    """Stop, naming ``option`` and every value that fails ``ok``, before any work (None: not given)."""
    bad = [v for v in values or [] if not ok(v)]
    if bad:
        raise SystemExit(f"{option}: every {must}, got {bad}")


@dataclasses.dataclass(frozen=True)
class Axis:
    """One pretraining setting the screen can vary: its option, its key in the record's rows, the
    ``PretrainParams`` field it sets (dotted for a nested one) and what every value must be."""

    option: str
    key: str
    field: str
    type: type
    ok: Callable[[Any], bool]
    must: str
    help: str
    default: list | None = None  # None: the profile's value alone

    def get(self, pre: PretrainParams) -> Any:
        node: Any = pre
        for name in self.field.split("."):
            node = getattr(node, name)
        return node

    def put(self, pre: PretrainParams, value: Any) -> PretrainParams:
        """``pre`` with this field set to ``value`` (the nested dataclass replaced, not changed)."""
        head, _, rest = self.field.partition(".")
        if rest:
            value = dataclasses.replace(getattr(pre, head), **{rest: value})
        return dataclasses.replace(pre, **{head: value})


# In the order the runs nest: rate by rate, every batch size at each, and so on.
AXES = (
    Axis("--lr", "lr", "lr", float, lambda v: v > 0, "rate must be positive",
         "peak pretraining learning rates to compare", [5e-4, 1e-3, 2e-3, 4e-3]),
    Axis("--batch-size", "batch_size", "batch_size", int, lambda v: v >= 1, "batch size must be at least 1",
         "pretraining batch sizes: the same clips in more or fewer steps"),
    Axis("--order-weight", "order_weight", "loss_weights.order", float, lambda v: v > 0, "weight must be positive",
         "weights of the order loss, against the mean of the three transform losses"),
    Axis("--stride", "stride", "stride", int, lambda v: v >= 1, "stride must be at least 1",
         "frames between a clip's frames; the order task changes with it (frames further apart differ more), so "
         "two strides' order accuracies are not the same task's (the transform heads' are)"),
    Axis("--clips-per-epoch", "clips_per_epoch", "clips_per_epoch", int, lambda v: v >= 1,
         "number of clips must be at least 1",
         "training clips per epoch; the profile's null means one per valid start (a row's train_clips), which a "
         "longer stride makes fewer: give the count at the profile's stride to hold the cost"),
    Axis("--crop", "crop", "crop", int, lambda v: v >= 8, "crop must be at least 8",
         "side of the network input sampled inside the frame (at most what the transform sets allow)"),
    Axis("--max-shift", "max_shift", "max_shift", float, lambda v: v >= 0, "shift must be at least 0",
         "crop-centre jitter in pixels (capped at what the crop and the transform sets leave)"),
    Axis("--epochs", "epochs", "epochs", int, lambda v: v >= 1, "number of epochs must be at least 1",
         "pretraining epochs (the profile's 8 until it became 24: `make pretext-rates` reruns its records at 8)"),
    Axis("--warmup-epochs", "warmup_epochs", "warmup_epochs", float, lambda v: v >= 0, "warm-up must be at least 0",
         "epochs of linear learning-rate warm-up before the cosine decay"),
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for axis in AXES:
        default = " ".join(f"{v:g}" for v in axis.default) if axis.default else "the profile's"
        ap.add_argument(axis.option, dest=axis.key, type=axis.type, nargs="+", default=axis.default,
                        help=f"{axis.help} (default: {default})")
    ap.add_argument("--seeds", type=int, default=1,
                    help="pretraining seeds per setting: the first seed and the next ones (default: 1), to see "
                         "how far one run's accuracies are from another's")
    ap.add_argument("--first-seed", type=int, default=None,
                    help="the first pretraining seed (default: the profile's), to add seeds to an earlier screen")
    ap.add_argument("--profile", default=None, help="params.yaml profile (default: the file's)")
    ap.add_argument("--clips", type=Path, default=ROOT / "data/clips/sim")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/pretext_rates.json")
    args = ap.parse_args()
    for axis in AXES:
        every(axis.option, getattr(args, axis.key), axis.ok, axis.must)
    if args.seeds < 1:
        raise SystemExit(f"--seeds: must be at least 1, got {args.seeds}")
    if args.first_seed is not None and args.first_seed < 0:
        raise SystemExit(f"--first-seed: must be at least 0, got {args.first_seed}")
    if not (args.clips / "meta.json").is_file():
        raise SystemExit(f"{args.clips}: no clip dataset; run `dvc repro preprocess@sim` first")
    params = load_params(ROOT / "params.yaml", args.profile)
    pre = params.pretrain
    grid = [getattr(args, axis.key) or [axis.get(pre)] for axis in AXES]
    meta = json.loads((args.clips / "meta.json").read_text())
    source = meta["params"]["frame_size"]
    check_crops("--crop", pre, args.crop or [], source)
    longest = max((v["frames_kept"] for v in meta["videos"] if v.get("split") == "train"), default=0)
    every("--stride", args.stride, lambda stride: (pre.k - 1) * stride + 1 <= longest,
          f"stride must fit a clip of k={pre.k} frames into the longest training video of {args.clips} "
          f"({longest} frames)")
    # the first seed (the profile's unless given) and the next --seeds - 1, innermost
    first = pre.seed if args.first_seed is None else args.first_seed
    runs = list(itertools.product(*grid, range(first, first + args.seeds)))
    per_row = dataclasses.replace(pre, seed="per row")
    for axis in AXES:
        per_row = axis.put(per_row, "per row")
    rows: list[dict] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sonossl-pretext-rates-") as tmp:
        for i, (*values, seed) in enumerate(runs):
            t = time.perf_counter()
            setting = {axis.key: value for axis, value in zip(AXES, values)} | {"seed": seed}
            run = dataclasses.replace(pre, seed=seed)
            for axis, value in zip(AXES, values):
                run = axis.put(run, value)
            m = pretrain(args.clips, Path(tmp) / f"run{i}", run, mode="both-sequential", progress=False)
            shift = min(run.max_shift, transform_set(run).max_shift(source, run.crop))
            row = setting | {"shift_used": round(shift, 2),
                             "train_clips": m["train_clips"], "val_clips": m["val_clips"],
                             "seconds": round(time.perf_counter() - t, 1),
                             "data_version": m["data_version"],
                             "val": {k: v for k, v in m["val"].items() if k.endswith("_acc")},
                             "train": {k: v for k, v in m["train"].items() if k.endswith("_acc")}}
            rows.append(row)
            print(json.dumps(row), flush=True)
            result = {"benchmark": "pretext_rates", "profile": params.profile, "mode": "both-sequential",
                      "pretrain": as_dict(per_row), "chance": m["chance"],
                      "finished": f"{len(rows)}/{len(runs)} runs", "rates": rows}
            finish(result, args.out, t0, quiet=len(rows) < len(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
