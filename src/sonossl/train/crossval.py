"""The crossval step: POCUS video classification (covid / pneumonia / regular), k-fold cross-validation grouped by
patient, SSL against scratch, linear probe and fine-tune.

Per fold (``StratifiedGroupKFold`` on videos: every patient's videos fall in one fold, classes spread over folds):

1. the training folds are split again by patient into inner-train and inner-validation videos;
2. pretraining (``both-sequential``) runs on the inner-train videos' clips only, pretext validation on the
   inner-validation videos: the test fold is never seen, not even unlabelled;
3. from that encoder and from a random one: a linear probe and a fine-tune (the finetune step's, with its
   ``head_init``, ``encoder_lr_scale`` and ``encoder_lr_decay``) on ``frames_per_video`` evenly spaced frames of
   every inner-train video, with the L2 strength / the epoch chosen on the inner-validation videos;
4. every frame of each test video is classified; the video's prediction is the argmax of its mean probabilities.

Predictions of all folds are pooled into video-level accuracy and per-class F1, and per-fold accuracies are kept.

    results = crossval("data/clips/pocus", "models/crossval", params)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sonossl.atomic import atomic_write_text
from sonossl.config import Params, as_dict
from sonossl.evaluate.classification_metrics import classification_report
from sonossl.models.downstream import PlaneClassifier
from sonossl.models.encoder import build_encoder
from sonossl.train.finetune import (check_finetune_params, check_pool_stages, embed, finetune_classifier, linear_probe,
                                    open_labelled, predict)
from sonossl.train.pretrain import load_encoder, pretrain_on, seed_for

log = logging.getLogger(__name__)


def video_folds(video_label: np.ndarray, video_group: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold number of every video, grouped by patient and stratified by class."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_groups = len(np.unique(video_group))
    if n_groups < folds:
        raise ValueError(f"crossval.folds={folds} but the dataset has only {n_groups} patients")
    fold = np.zeros(len(video_label), dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for f, (_, test) in enumerate(splitter.split(np.zeros(len(video_label)), video_label, video_group)):
        fold[test] = f
    return fold


def _even(rows: np.ndarray, n: int) -> np.ndarray:
    return rows if len(rows) <= n else rows[np.linspace(0, len(rows) - 1, n).round().astype(int)]


def crossval(clips_dir: str | Path, out_dir: str | Path, params: Params, progress: bool = True,
             report: str | Path | None = None) -> dict[str, Any]:
    """Run the cross-validation; writes ``results.json`` and ``metrics.json`` (and the markdown ``report``)."""
    t0 = time.perf_counter()
    cv, out_dir = params.crossval, Path(out_dir)
    check_finetune_params(params.finetune)
    d = open_labelled(clips_dir)
    idx = d.data.index
    if idx.patient_id.isna().any():
        raise ValueError(f"{clips_dir}: crossval groups by patient_id, which is missing for some videos")
    videos = idx.groupby("video_idx").agg(label=("label", "first"), patient=("patient_id", "first"))
    vid_ids = videos.index.to_numpy()
    vlabel = np.array([d.classes.index(str(x)) for x in videos.label])
    fold_of = video_folds(vlabel, videos.patient.to_numpy(), cv.folds, cv.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pre = dataclasses.replace(params.pretrain, epochs=cv.pretrain_epochs, clips_per_epoch=cv.pretrain_clips_per_epoch)
    ft = dataclasses.replace(params.finetune, epochs=cv.finetune_epochs)
    spec = as_dict(params.pretrain.encoder)
    check_pool_stages(build_encoder(spec), ft)
    preds: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    fold_acc: dict[tuple[str, str], list[float]] = {}
    for f in range(cv.folds):
        test_v = vid_ids[fold_of == f]
        rest = np.flatnonzero(fold_of != f)
        inner = video_folds(vlabel[rest], videos.patient.to_numpy()[rest], min(4, cv.folds), cv.seed + f + 1)
        val_v, train_v = vid_ids[rest][inner == 0], vid_ids[rest][inner != 0]
        in_train, in_val = np.isin(d.video_idx, train_v), np.isin(d.video_idx, val_v)
        log.info("fold %d/%d: %d train, %d validation, %d test videos", f + 1, cv.folds, len(train_v), len(val_v),
                 len(test_v))
        fold_dir = out_dir / "folds" / f"fold{f}"
        pretrain_on(d.data, in_train, in_val, fold_dir / "pretrain", pre, "both-sequential", resume=True,
                    progress=progress)
        train_rows = np.concatenate([_even(np.flatnonzero(d.video_idx == v), cv.frames_per_video) for v in train_v])
        val_rows = np.flatnonzero(in_val)
        test_rows = np.flatnonzero(np.isin(d.video_idx, test_v))
        ft_fold = dataclasses.replace(ft, frames_per_epoch=len(train_rows), seed=seed_for(ft.seed, f))
        for init in ("ssl", "scratch"):
            def make_encoder():
                return load_encoder(fold_dir / "pretrain")[0] if init == "ssl" else build_encoder(spec)

            for method in ("probe", "finetune"):
                torch.manual_seed(seed_for(cv.seed, f))
                if method == "probe":
                    enc = make_encoder().to(device)
                    rows = np.concatenate([train_rows, val_rows])
                    z = dict(zip(rows.tolist(), embed(enc, d.frames, rows, device, ft.channels_last,
                                                      ft.pool_stages)))
                    zt, zv = np.stack([z[r] for r in train_rows]), np.stack([z[r] for r in val_rows])
                    layer, _ = linear_probe(zt, d.labels[train_rows], zv, d.labels[val_rows], len(d.classes),
                                            ft.probe_c, ft.seed)
                    model = PlaneClassifier(enc, len(d.classes), pool_stages=ft.pool_stages)
                    model.head[1] = layer
                else:
                    model, _ = finetune_classifier(make_encoder(), init == "ssl", d, train_rows, val_rows, ft_fold,
                                                   fold_dir / f"{init}-finetune", device, progress=progress)
                model = model.to(device)
                probs = torch.softmax(predict(model, d.frames, test_rows, device), 1).numpy()
                per_video = {int(v): probs[d.video_idx[test_rows] == v].mean(0) for v in test_v}
                preds.setdefault((init, method), {}).update(per_video)
                acc = float(np.mean([per_video[v].argmax() == vlabel[list(vid_ids).index(v)] for v in test_v]))
                fold_acc.setdefault((init, method), []).append(round(acc, 4))
                log.info("fold %d %s %s: video accuracy %.3f", f + 1, init, method, acc)

    results = []
    for (init, method), per_video in preds.items():
        order = sorted(per_video)
        y_true = np.array([vlabel[list(vid_ids).index(v)] for v in order])
        y_pred = np.array([per_video[v].argmax() for v in order])
        rep = classification_report(y_true, y_pred, d.classes)
        results.append({"init": init, "method": method, "accuracy": rep["accuracy"],
                        "fold_accuracy": fold_acc[(init, method)],
                        "per_class_f1": {c: rep["per_class"][c]["f1"] for c in d.classes}, "report": rep})
    out = {"dataset": str(clips_dir), "data_version": d.data.version, "folds": cv.folds, "classes": d.classes,
           "videos": int(len(vid_ids)), "patients": int(videos.patient.nunique()),
           "fold_of_video": {str(idx.video[idx.video_idx == v].iloc[0]): int(fo) for v, fo in zip(vid_ids, fold_of)},
           "params": {"crossval": as_dict(cv), "pretrain": as_dict(pre), "finetune": as_dict(ft)},
           "results": results, "seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_text(out_dir / "results.json", json.dumps(out, indent=2) + "\n")
    flat = {f"{r['init']}/{r['method']}": {"video_accuracy": r["accuracy"], **{f"f1_{c}": v for c, v in
                                                                              r["per_class_f1"].items()}}
            for r in results}
    atomic_write_text(out_dir / "metrics.json", json.dumps(flat, indent=2) + "\n")
    if report is not None:
        from sonossl.evaluate.report import crossval_markdown

        atomic_write_text(report, crossval_markdown(out))
    return out
