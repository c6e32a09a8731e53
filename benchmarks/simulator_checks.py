"""Is the simulator a toy? The checks of SIMULATOR.md ("Checks that it is not a toy"), on the clip datasets.

1. A plane classifier on one frame statistic (mean grey level, or mean and standard deviation) must do poorly:
   its macro-F1 on the test split is compared with a dummy that guesses by class frequency.
2. Frame order must not be solvable from a global brightness trend: for frame pairs (t, t + stride) of the same
   video, presented in random order, "the brighter one comes later" (sign learnt on the train split) should be
   right about half the time.
3. Intensity statistics beside the real POCUS frames: mean, standard deviation and the mean/std ratio of bright
   homogeneous-looking patches (about 1.9 for Rayleigh speckle before log compression; after log compression the
   ratio of grey levels is larger, so the two datasets are compared with each other, not with 1.9).

    .venv/bin/python benchmarks/simulator_checks.py            # after `make run`: data/clips/sim, data/clips/pocus
Writes benchmarks/results/simulator_checks.json.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np

from sonossl.atomic import atomic_write_text
from sonossl.data.clips import load_clip_dataset
from sonossl.machine import describe

ROOT = Path(__file__).resolve().parents[1]


def single_statistic_classifier(data) -> dict:
    from sklearn.dummy import DummyClassifier
    from sklearn.metrics import f1_score
    from sklearn.tree import DecisionTreeClassifier

    frames = np.asarray(data.frames, dtype=np.float32).reshape(len(data.frames), -1)
    feats = {"mean": frames.mean(1, keepdims=True),
             "mean+std": np.stack([frames.mean(1), frames.std(1)], 1)}
    idx = data.index
    train, test = (idx.split == "train").to_numpy(), (idx.split == "test").to_numpy()
    y = idx.label.to_numpy()
    out = {"test_frames": int(test.sum()), "classes": sorted(set(y))}
    dummy = DummyClassifier(strategy="stratified", random_state=0).fit(feats["mean"][train], y[train])
    out["dummy_macro_f1"] = round(float(f1_score(y[test], dummy.predict(feats["mean"][test]), average="macro")), 3)
    for name, x in feats.items():
        clf = DecisionTreeClassifier(max_depth=4, class_weight="balanced", random_state=0).fit(x[train], y[train])
        out[f"{name}_macro_f1"] = round(float(f1_score(y[test], clf.predict(x[test]), average="macro")), 3)
    return out


def brightness_order(data, stride: int = 4, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    frames = np.asarray(data.frames, dtype=np.float32)
    mean = frames.reshape(len(frames), -1).mean(1)
    idx = data.index
    result = {}
    for split in ("train", "test"):
        diffs, later_second = [], []
        for _, rows in idx[idx.split == split].groupby("video_idx"):
            f = rows.frame.to_numpy()
            for a, b in zip(f[:-stride], f[stride:], strict=True):
                swap = rng.random() < 0.5
                first, second = (b, a) if swap else (a, b)
                diffs.append(mean[second] - mean[first])
                later_second.append(not swap)
        result[split] = (np.asarray(diffs), np.asarray(later_second))
    d_train, y_train = result["train"]
    # The one free choice: does brighter mean later or earlier? Learnt on train, scored on test.
    sign = 1.0 if ((d_train > 0) == y_train).mean() >= 0.5 else -1.0
    d_test, y_test = result["test"]
    acc = float(((sign * d_test > 0) == y_test).mean())
    return {"stride": stride, "test_pairs": int(len(d_test)), "accuracy": round(acc, 3), "chance": 0.5}


def intensity_statistics(data, patch: int = 8) -> dict:
    frames = np.asarray(data.frames, dtype=np.float32)
    sample = frames[:: max(1, len(frames) // 400)]
    h = sample.shape[1] // patch * patch
    p = sample[:, :h, :h].reshape(len(sample), h // patch, patch, h // patch, patch).transpose(0, 1, 3, 2, 4)
    p = p.reshape(-1, patch * patch)
    m, s = p.mean(1), p.std(1)
    bright = m > np.percentile(m, 60)  # tissue, not fluid or shadow
    snr = m[bright] / np.maximum(s[bright], 1e-6)
    return {"mean": round(float(sample.mean()), 1), "std": round(float(sample.std()), 1),
            "patch_snr_median": round(float(np.median(snr)), 2),
            "histogram_quartiles": [round(float(q), 1) for q in np.percentile(sample, [25, 50, 75])]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sim", type=Path, default=ROOT / "data/clips/sim")
    ap.add_argument("--real", type=Path, default=ROOT / "data/clips/pocus")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/simulator_checks.json")
    args = ap.parse_args()
    sim = load_clip_dataset(args.sim)
    report = {"sim_version": sim.version, "machine": {"platform": platform.platform(), "cpu": describe()},
              "single_statistic_classifier": single_statistic_classifier(sim),
              "brightness_order": brightness_order(sim),
              "intensity": {"sim": intensity_statistics(sim)}}
    if args.real.exists():
        real = load_clip_dataset(args.real)
        report["real_version"] = real.version
        report["intensity"]["real"] = intensity_statistics(real)
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
