"""Is model selection what holds the smallest-fraction result back? The choices made on validation against the best
choice the test videos would allow (an oracle, for diagnosis only: the pipeline never looks at test).

For the smallest label fraction and seeds 0..n-1 (the draws of ``label_seeds.py``), SSL and scratch: the linear
probe at each L2 strength of ``finetune.probe_c``, and the fine-tune at each epoch, each scored on the validation and
the test videos. Reported per seed and as medians over the seeds:

- ``selected``: test macro-F1 of the choice the validation videos make (the pipeline's: its numbers equal
  ``label_seeds.py``'s for the same seeds);
- ``oracle``: the best test macro-F1 over the candidates, an upper bound on what any selection rule could reach;
- the SSL - scratch gains under both.

If the oracle gain is far above the selected one, better selection (more or better validation data, another
metric) is the lever; if the oracle gain itself is small, the fine-tune procedure or the representation is.

    .venv/bin/python benchmarks/selection_oracle.py [--seeds 5]       # after `dvc repro`; 12.8 min on 2 cores (tests beside it)
Writes benchmarks/results/selection_oracle.json (or --out). ``--encoder-lr-decay`` replaces the profile's layer-wise
decay of the pretrained encoder's fine-tune rate (``--encoder-lr-decay 1``: every stage at one rate, as the record).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sonossl.config import scratch_spec
from sonossl.evaluate.classification_metrics import classification_report
from sonossl.models.downstream import PlaneClassifier
from sonossl.models.encoder import build_encoder
from sonossl.train import finetune as ft
from sonossl.train.loop import fit
from sonossl.train.pretrain import load_encoder, seed_for

# benchmarks/ is on the path when run as a script
from label_seeds import draw_args, draw_params, finish, scratch_twin, test_clips

ROOT = Path(__file__).resolve().parents[1]


def macro_f1(model, frames, labels, rows: np.ndarray, n_classes: int, device: torch.device) -> float:
    pred = ft.predict(model, frames, rows, device).argmax(1).numpy()
    return classification_report(np.asarray(labels)[rows], pred, list(range(n_classes)))["macro_f1"]


def test_macro_f1(model, test: ft.TestSet, device: torch.device) -> float:
    rows = test.rows()
    return macro_f1(model, test.frames, test.labels, rows, len(test.classes), device)


class TracedPlaneTask(ft.PlaneTask):
    """The pipeline's plane fine-tune, which also scores the test videos after every epoch (never selected on)."""

    def __init__(self, *args, test: ft.TestSet, **kwargs):
        super().__init__(*args, **kwargs)
        self.test = test

    def validate(self, model, device):
        return {**super().validate(model, device), "test_macro_f1": test_macro_f1(model, self.test, device)}


def probe_candidates(encoder, d, train_rows, val_rows, test, params, device) -> list[dict]:
    """Val and test macro-F1 of the linear probe at each L2 strength (``probe_c``)."""
    rows = np.concatenate([train_rows, val_rows])
    z = ft.embed(encoder.to(device), d.frames, rows, device, params.channels_last, params.pool_stages)
    out = []
    for c in params.probe_c:
        layer, info = ft.linear_probe(z[:len(train_rows)], d.labels[train_rows], z[len(train_rows):],
                                      d.labels[val_rows], len(d.classes), [c], params.seed)
        model = PlaneClassifier(encoder, len(d.classes), pool_stages=params.pool_stages)
        model.head[1] = layer
        out.append({"C": c, "val": info["val_macro_f1"], "test": test_macro_f1(model.to(device), test, device)})
    return out


def finetune_candidates(encoder, pretrained, d, train_rows, val_rows, test, params, run_dir, device) -> list[dict]:
    """Val and test macro-F1 of the fine-tune after each epoch (random head, as ``finetune_classifier``)."""
    n_cls = len(d.classes)
    model = PlaneClassifier(encoder, n_cls, pool_stages=params.pool_stages)
    task = TracedPlaneTask(model, d.frames, d.labels, train_rows, val_rows, params, n_cls,
                           **ft.encoder_lr(params, pretrained), test=test)
    res = fit(task, run_dir, ft.finetune_loop_params(params, params.epochs, "val_macro_f1"), progress=False)
    return [{"epoch": h["epoch"], "val": h["val_macro_f1"], "test": h["val_test_macro_f1"]} for h in res.history]


def pick(candidates: list[dict]) -> dict:
    """The first candidate with the best validation score (the pipeline's rule: strict improvement wins; ``max``
    keeps the first of equals)."""
    return max(candidates, key=lambda c: c["val"])


def main() -> int:
    ap = draw_args(__doc__)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/selection_oracle.json")
    args = ap.parse_args()
    if not (args.encoder / "encoder.pt").is_file():
        raise SystemExit(f"{args.encoder}: no encoder.pt; run `dvc repro` first")
    params = scratch_twin(draw_params(args), args.encoder)  # scratch: the encoder's own network, random weights
    spec = scratch_spec(params)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = ft.open_labelled(args.clips)
    val_rows, test = ft._rows(d, split="val"), ft.open_test_set(d, test_clips(args))
    fraction = min(params.finetune.fractions)
    rows, t0 = [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sonossl-selection-") as tmp:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            p = dataclasses.replace(params.finetune, seed=seed)
            order, floor = ft.labelling_plan(d.data.index, p)
            train_rows = ft._rows(d, ft.labelled_videos(order, fraction, floor), "train")
            row: dict = {"seed": seed}
            for init in ("ssl", "scratch"):
                def make_encoder():
                    return load_encoder(args.encoder)[0] if init == "ssl" else build_encoder(spec)
                torch.manual_seed(seed_for(seed, 1))  # as finetune's probe: the same random encoder every run
                probe = probe_candidates(make_encoder(), d, train_rows, val_rows, test, p, device)
                torch.manual_seed(seed_for(seed, int(fraction * 1000)))  # as finetune's fine-tune
                tuned = finetune_candidates(make_encoder(), init == "ssl", d, train_rows, val_rows, test, p,
                                            Path(tmp) / f"{init}-{seed}", device)
                for method, cands in (("probe", probe), ("finetune", tuned)):
                    row[f"{init}_{method}"] = {"selected": pick(cands)["test"],
                                               "oracle": max(c["test"] for c in cands), "candidates": cands}
            for method in ("probe", "finetune"):
                for how in ("selected", "oracle"):
                    row[f"{method}_gain_{how}"] = round(row[f"ssl_{method}"][how] - row[f"scratch_{method}"][how], 4)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if "gain" in k or k == "seed"}), flush=True)

    def median(values) -> float:
        return round(statistics.median(values), 4)

    summary = {f"{init}_{method}_{how}": median(r[f"{init}_{method}"][how] for r in rows)
               for init in ("ssl", "scratch") for method in ("probe", "finetune") for how in ("selected", "oracle")}
    summary |= {f"{method}_gain_{how}": median(r[f"{method}_gain_{how}"] for r in rows)
                for method in ("probe", "finetune") for how in ("selected", "oracle")}
    result = {
        "benchmark": "selection_oracle", "profile": params.profile, "fraction": fraction,
        "encoder_lr_decay": params.finetune.encoder_lr_decay, "scratch_spec": build_encoder(spec).spec,
        "clips_version": d.data.version, "test_set": test.info, "encoder": str(args.encoder.resolve().relative_to(ROOT))
        if args.encoder.resolve().is_relative_to(ROOT) else str(args.encoder),
        "seeds": [r["seed"] for r in rows], "medians": summary, "per_seed": rows,
    }
    return finish(result, args.out, t0)


if __name__ == "__main__":
    raise SystemExit(main())
