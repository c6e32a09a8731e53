"""Two pretrained encoders over the same draws of labelled videos: which fine-tunes better, draw by draw.

``label_seeds.py`` compares one encoder with scratch. Choosing between two pretraining settings (say 8 and 24
epochs) asks another question, and pairing them needs no scratch run: for each draw (``finetune.seed``: which
videos are labelled, the head's initialisation, the augmentation) both encoders fine-tune on the same videos in the
same order, so the difference of their test macro-F1 is the encoder's alone. Draw 0 is the pipeline's own (the
results table's). Per fraction: each encoder's median, the paired differences (``--encoder`` minus ``--against``),
their median, and in how many draws it is positive.

    .venv/bin/python benchmarks/encoder_pairs.py --against models/pretrain/both-sequential-ablation \
        [--encoder models/pretrain/both-sequential] [--fractions 0.2 1] [--seeds 10]      # after `dvc repro`
Writes benchmarks/results/encoder_pairs.json (or --out); ``--encoder-lr-decay`` as in ``label_seeds.py``.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path

from sonossl.config import as_dict
from sonossl.train.finetune import finetune

from label_seeds import (ROOT, draw_args, draw_params, finish, shown, spread,  # benchmarks/ is on the path
                         test_clips)


def main() -> int:
    ap = draw_args(__doc__, scratch=False)
    ap.add_argument("--against", type=Path, required=True, help="the second encoder (a pretrain output folder)")
    ap.add_argument("--fractions", type=float, nargs="+", default=None,
                    help="label fractions (default: the profile's)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/encoder_pairs.json")
    args = ap.parse_args()
    for option, encoder in (("--encoder", args.encoder), ("--against", args.against)):
        if not (encoder / "encoder.pt").is_file():
            raise SystemExit(f"{option} {encoder}: no encoder.pt; run `dvc repro` first")
    params = draw_params(args)
    fractions = args.fractions or params.finetune.fractions
    bad = [f for f in fractions if not 0 < f <= 1]
    if bad:
        raise SystemExit(f"--fractions: every fraction must be in (0, 1], got {bad}")
    names = {"encoder": args.encoder, "against": args.against}
    rows: list[dict] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sonossl-encoder-pairs-") as tmp:
        for frac in fractions:
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                ft = dataclasses.replace(params.finetune, seed=seed)
                row: dict = {"fraction": frac, "seed": seed}
                for key, encoder in names.items():
                    m = finetune(args.clips, Path(tmp) / f"{key}-{frac:g}-{seed}", ft, task="planes",
                                 encoder=encoder, fractions=[frac], methods=("finetune",),
                                 test_clips=test_clips(args), progress=False)
                    run = m["runs"][0]
                    row |= {key: run["test"]["macro_f1"], f"{key}_epoch": f"{run['best_epoch']}/{ft.epochs}",
                            "videos": run["videos"]}
                row["difference"] = round(row["encoder"] - row["against"], 4)
                rows.append(row)
                print(json.dumps(row), flush=True)

    def summary(frac: float) -> dict:
        mine = [r for r in rows if r["fraction"] == frac]
        return {"fraction": frac, "labelled_videos": mine[0]["videos"],
                **{key: spread([r[key] for r in mine]) for key in ("encoder", "against", "difference")},
                "difference_positive_in": f"{sum(r['difference'] > 0 for r in mine)}/{len(mine)} seeds"}

    result = {"benchmark": "encoder_pairs", "profile": params.profile, "method": "finetune",
              "encoder": shown(args.encoder), "against": shown(args.against),
              "finetune": as_dict(params.finetune) | {"seed": "per row"},
              "seeds": list(range(args.first_seed, args.first_seed + args.seeds)),
              "by_fraction": [summary(f) for f in fractions], "per_seed": rows}
    return finish(result, args.out, t0)


if __name__ == "__main__":
    raise SystemExit(main())
