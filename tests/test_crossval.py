"""POCUS cross-validation on a small subset of the real videos, tiny profile: folds grouped by patient, pretraining
on training folds only, SSL and scratch with probe and fine-tune, video-level results."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def pocus_subset(pocus_dir, tmp_path_factory) -> Path:
    """12 small real videos, 4 per class, each from a different patient (copied to a temporary folder)."""
    labels = pd.read_csv(pocus_dir / "labels.csv")
    labels = labels.sort_values("bytes").drop_duplicates("patient_id")
    pick = pd.concat([g.head(4) for _, g in labels.groupby("label")])
    root = tmp_path_factory.mktemp("pocus_subset")
    for rel in pick.path:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(pocus_dir / rel, root / rel)
    pick.to_csv(root / "labels.csv", index=False)
    return root


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The least populated class:UserWarning")  # 12 videos in 3 folds, by design
def test_crossval_folds_by_patient_and_reports_video_level(pocus_subset, tiny_params, tmp_path):
    from sonossl.data.clips import preprocess
    from sonossl.train.crossval import crossval

    preprocess(pocus_subset, tmp_path / "clips", tiny_params.preprocess, progress=False)
    out = crossval(tmp_path / "clips", tmp_path / "cv", tiny_params, progress=False, report=tmp_path / "cv.md")
    assert out["folds"] == 3 and out["classes"] == ["covid", "pneumonia", "regular"]
    assert {(r["init"], r["method"]) for r in out["results"]} == {
        (i, m) for i in ("ssl", "scratch") for m in ("probe", "finetune")}
    for r in out["results"]:
        assert len(r["fold_accuracy"]) == 3 and 0 <= r["accuracy"] <= 1
        assert r["report"]["n"] == 12  # every video predicted exactly once, pooled over folds
    # a patient's videos never straddle folds; the pretraining of a fold never saw its test videos
    labels = pd.read_csv(pocus_subset / "labels.csv").set_index("path")
    folds = pd.Series(out["fold_of_video"])
    assert labels.loc[folds.index].assign(fold=folds.values).groupby("patient_id").fold.nunique().max() == 1
    for f in range(3):
        pt = json.loads((tmp_path / f"cv/folds/fold{f}/pretrain/metrics.json").read_text())
        assert pt["train_clips"] > 0
    assert "| ssl | finetune |" in (tmp_path / "cv.md").read_text()
    assert json.loads((tmp_path / "cv/metrics.json").read_text())["ssl/finetune"]["video_accuracy"] >= 0
