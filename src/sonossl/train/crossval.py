"""The crossval step: video classification, k-fold cross-validation grouped by patient, SSL against scratch, linear
probe and fine-tune. The pipeline runs it on POCUS (covid / pneumonia / regular; stage ``crossval``) and on the
datasets under ``crossval_datasets:`` in params.yaml (``train-crossval@<name>``); a dataset needs one ``label`` and
a ``patient_id`` per video.

Per fold (``StratifiedGroupKFold`` on videos: every patient's videos fall in one fold, classes spread over folds):

1. the training folds are split again by patient into inner-train and inner-validation videos;
2. pretraining (``both-sequential``) runs, unlabelled, on the clips of every training video of the fold, inner-train
   and inner-validation (``pretrain_on_validation``, the default; without it on the inner-train videos only, with
   pretext validation on the inner-validation ones): the test fold is never seen, not even unlabelled;
3. from that encoder and from a random one: a linear probe and a fine-tune (the finetune step's, with its
   ``head_init``, ``encoder_lr_scale`` and ``encoder_lr_decay``) on ``frames_per_video`` evenly spaced frames of
   every inner-train video, with the L2 strength / the epoch chosen on the inner-validation videos (their frames'
   macro-F1, kept per fold in ``fold_runs`` as ``<init>_<method>_val_macro_f1``: the score to compare settings on
   without looking at the test folds)
   (``fresh_frames``: the fine-tune draws its frames each epoch from every frame of those videos instead, each video
   equally likely, ``frames_per_video`` per video and epoch on average);
4. with ``refit``, the probe (at its chosen L2 strength) and the fine-tune (for its chosen number of epochs, of the
   same schedule, from the same initialisation) are fitted again on the inner-train and inner-validation videos
   together (``frames_per_video`` of each; with ``fresh_frames`` the fine-tune draws from every frame of both), and
   that model is the one scored; the selected model's scores are kept beside it (``accuracy_selected``), so one run
   compares the two;
5. every frame of each test video is classified (``flip_test``: as it is and mirrored left-right, the two
   probabilities averaged); the video's prediction is the argmax of its frames' mean probabilities.

Predictions of all folds are pooled into video-level accuracy and per-class F1, and per-fold accuracies are kept.

    results = crossval("data/clips/pocus", "models/crossval", params)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sonossl.atomic import atomic_write_text
from sonossl.config import AT_LEAST_1, AT_LEAST_2, Params, as_dict, check_ranges, scratch_spec
from sonossl.evaluate.classification_metrics import classification_report
from sonossl.models.downstream import PlaneClassifier
from sonossl.models.encoder import build_encoder
from sonossl.train.finetune import (check_finetune_params, check_pool_stages, embed, finetune_classifier, linear_probe,
                                    open_labelled, predict)
from sonossl.train.pretrain import check_pretrain_params, load_encoder, pretrain_on, seed_for
from sonossl.train.loop import require_one_process

log = logging.getLogger(__name__)

FLIP_VIEW = "frames+mirrored"  # flip_test: each frame's probabilities averaged with its left-right mirror's


def video_folds(video_label: np.ndarray, video_group: np.ndarray, folds: int, seed: int,
                what: str = "the dataset") -> np.ndarray:
    """Fold number of every video, grouped by patient and stratified by class; ``what`` names the videos in an
    error."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_groups = len(np.unique(video_group))
    if n_groups < folds:
        raise ValueError(f"{folds} folds grouped by patient, but {what} has only {n_groups} patients")
    fold = np.zeros(len(video_label), dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # it counts videos, not patients; crossval checks the classes of every fold
        warnings.filterwarnings("ignore", message="The least populated class in y has only")
        for f, (_, test) in enumerate(splitter.split(np.zeros(len(video_label)), video_label, video_group)):
            fold[test] = f
    return fold


def check_class_patients(labels: list[str], patients: np.ndarray, folds: int, what: str) -> None:
    """Every class needs at least ``folds`` patients, or some fold trains without it (its F1 then means nothing):
    ValueError naming each class short of patients and its patients."""
    short = []
    for c in sorted(set(labels)):
        held = sorted({str(p) for p, lab in zip(patients, labels) if lab == c})
        if len(held) < folds:
            short.append(f"{c!r} has {len(held)} ({', '.join(held[:5])}{', ...' if len(held) > 5 else ''})")
    if short:
        raise ValueError(f"{what}: {folds} folds grouped by patient need at least {folds} patients of each class, so "
                         f"that every fold trains on every class, but {'; '.join(short)}: use fewer folds "
                         "(crossval.folds) or add patients of that class")


def check_fold_classes(classes: list[str], video_label: np.ndarray, fold_of: np.ndarray, inners: list[np.ndarray],
                       where: str) -> None:
    """Every fold's models must train on every class: ValueError naming the fold and the class when its training
    videos, less its inner validation ones (``inners[f]``: the inner fold of each of its training videos, 0 the
    validation one), hold none of it. A class missing from the inner validation videos is a warning: the model
    selection does not see it."""
    def missing(labels: np.ndarray) -> list[str]:
        return [c for i, c in enumerate(classes) if i not in set(labels.tolist())]

    for f, inner in enumerate(inners):
        rest = video_label[fold_of != f]
        if lacking := missing(rest[inner != 0]):
            raise ValueError(f"{where}: fold {f + 1}'s training videos, once its inner validation patients are set "
                             f"aside, hold no video of {lacking}: use fewer folds or add patients of that class")
        if unseen := missing(rest[inner == 0]):
            log.warning("fold %d: its inner validation videos hold no video of %s: its model selection (L2 strength, "
                        "epoch) does not see that class", f + 1, unseen)


def _even(rows: np.ndarray, n: int) -> np.ndarray:
    return rows if len(rows) <= n else rows[np.linspace(0, len(rows) - 1, n).round().astype(int)]


def _all_frames(video_idx: np.ndarray, videos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every row of ``videos``, and sampling weights that make each video equally likely (1 / its frame count)."""
    rows = np.flatnonzero(np.isin(video_idx, videos))
    _, inverse, counts = np.unique(video_idx[rows], return_inverse=True, return_counts=True)
    return rows, 1.0 / counts[inverse]


def _report(per_video: dict[int, np.ndarray], label_of: dict[int, int], classes: list[str]) -> dict:
    order = sorted(per_video)
    y_true = np.array([label_of[v] for v in order])
    return classification_report(y_true, np.array([per_video[v].argmax() for v in order]), classes)


def crossval(clips_dir: str | Path, out_dir: str | Path, params: Params, progress: bool = True,
             report: str | Path | None = None) -> dict[str, Any]:
    """Run the cross-validation; writes ``results.json`` and ``metrics.json`` (and the markdown ``report``)."""
    t0 = time.perf_counter()
    cv, out_dir = params.crossval, Path(out_dir)
    require_one_process("crossval")
    check_finetune_params(params.finetune)
    check_pretrain_params(params.pretrain)
    check_ranges("crossval", params.crossval, {
        "folds": AT_LEAST_2, "frames_per_video": AT_LEAST_1, "pretrain_epochs": AT_LEAST_1,
        "pretrain_clips_per_epoch": AT_LEAST_1, "finetune_epochs": AT_LEAST_1})
    d = open_labelled(clips_dir)
    idx = d.data.index
    no_patient = idx.video[idx.patient_id.isna()].unique()
    if len(no_patient):
        raise ValueError(f"{clips_dir}: crossval groups by patient_id, which is missing for {len(no_patient)} "
                         f"video(s), e.g. {no_patient[0]!r}: give each a patient_id in labels.csv")
    unlabelled = idx.video[idx.label.isna()].unique()
    if len(unlabelled):
        raise ValueError(f"{clips_dir}: crossval classifies whole videos by their label, which is missing for "
                         f"{len(unlabelled)} video(s), e.g. {unlabelled[0]!r}")
    kinds = idx.groupby("video").label.nunique()
    if (kinds > 1).any():
        raise ValueError(f"{clips_dir}: crossval classifies whole videos, but {int((kinds > 1).sum())} video(s) have "
                         f"frames of several labels, e.g. {kinds.index[kinds > 1][0]!r}: give labels.csv one "
                         "`label` per video (per-frame annotations are for the planes task)")
    videos = idx.groupby("video_idx").agg(label=("label", "first"), patient=("patient_id", "first"))
    vid_ids = videos.index.to_numpy()
    vlabel = np.array([d.classes.index(str(x)) for x in videos.label])
    label_of = dict(zip(vid_ids.tolist(), vlabel.tolist()))
    patients = videos.patient.to_numpy()
    where = f"{clips_dir} (crossval.folds={cv.folds})"
    check_class_patients([str(x) for x in videos.label], patients, cv.folds, where)
    fold_of = video_folds(vlabel, patients, cv.folds, cv.seed, what=where)
    # each fold's training videos split again for model selection, checked for every fold before any training
    inner_k = min(4, cv.folds)
    inners = [video_folds(vlabel[fold_of != f], patients[fold_of != f], inner_k, cv.seed + f + 1,
                          what=f"{clips_dir}: fold {f + 1}'s training videos, split again for model selection "
                               f"(crossval.folds={cv.folds}: the dataset needs more patients than folds)")
              for f in range(cv.folds)]
    check_fold_classes(d.classes, vlabel, fold_of, inners, where)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pre = dataclasses.replace(params.pretrain, epochs=cv.pretrain_epochs, clips_per_epoch=cv.pretrain_clips_per_epoch)
    ft = dataclasses.replace(params.finetune, epochs=cv.finetune_epochs)
    spec = scratch_spec(params)  # scratch's network; each fold's SSL encoder is pretrain.encoder's
    check_pool_stages(build_encoder(spec), ft)
    preds: dict[tuple[str, str, str], dict[int, np.ndarray]] = {}
    fold_acc: dict[tuple[str, str, str], list[float]] = {}
    fold_info: list[dict[str, Any]] = []
    for f in range(cv.folds):
        test_v = vid_ids[fold_of == f]
        rest = np.flatnonzero(fold_of != f)
        inner = inners[f]
        val_v, train_v = vid_ids[rest][inner == 0], vid_ids[rest][inner != 0]
        in_train, in_val = np.isin(d.video_idx, train_v), np.isin(d.video_idx, val_v)
        log.info("fold %d/%d: %d train, %d validation, %d test videos", f + 1, cv.folds, len(train_v), len(val_v),
                 len(test_v))
        fold_dir = out_dir / "folds" / f"fold{f}"
        pt_train, pt_val = in_train, in_val
        if cv.pretrain_on_validation:  # every training video of the fold, unlabelled; no pretext validation left
            pt_train, pt_val = in_train | in_val, np.zeros_like(in_val)
        pretrain_on(d.data, pt_train, pt_val, fold_dir / "pretrain", pre, "both-sequential", resume=True,
                    progress=progress)
        train_rows = np.concatenate([_even(np.flatnonzero(d.video_idx == v), cv.frames_per_video) for v in train_v])
        val_rows = np.flatnonzero(in_val)
        refit_rows = np.concatenate([train_rows, *(_even(np.flatnonzero(d.video_idx == v), cv.frames_per_video)
                                                   for v in val_v)])
        test_rows = np.flatnonzero(np.isin(d.video_idx, test_v))
        ft_fold = dataclasses.replace(ft, frames_per_epoch=len(train_rows), seed=seed_for(ft.seed, f))
        # the fine-tune's frames: the evenly spaced ones, or (fresh_frames) every frame, each video equally likely
        ft_train, ft_train_w, ft_refit, ft_refit_w = train_rows, None, refit_rows, None
        if cv.fresh_frames:
            ft_train, ft_train_w = _all_frames(d.video_idx, train_v)
            ft_refit, ft_refit_w = _all_frames(d.video_idx, np.concatenate([train_v, val_v]))
        info_f: dict[str, Any] = {"test_patients": sorted({str(p) for p in patients[fold_of == f]}),
                                  "test_videos_per_class": {c: int(np.sum(vlabel[fold_of == f] == i))
                                                            for i, c in enumerate(d.classes)},
                                  "train_videos": len(train_v), "val_videos": len(val_v), "test_videos": len(test_v),
                                  "pretrain_videos": len(train_v) + len(val_v) * cv.pretrain_on_validation,
                                  "train_frames": len(train_rows)}
        if cv.refit:
            info_f["refit_frames"] = len(refit_rows)
        fold_info.append(info_f)

        def score(model: torch.nn.Module, key: tuple[str, str, str]) -> None:
            probs = torch.softmax(predict(model.to(device), d.frames, test_rows, device), 1).numpy()
            views = [("frames", probs)]
            if cv.flip_test:  # the last view is the one scored
                mirrored = torch.softmax(predict(model, d.frames, test_rows, device, flip=True), 1).numpy()
                views.append((FLIP_VIEW, (probs + mirrored) / 2))
            for view, p in views:
                per_video = {int(v): p[d.video_idx[test_rows] == v].mean(0) for v in test_v}
                preds.setdefault((*key, view), {}).update(per_video)
                acc = float(np.mean([per_video[v].argmax() == label_of[v] for v in per_video]))
                fold_acc.setdefault((*key, view), []).append(round(acc, 4))
                log.info("fold %d %s %s (%s model, %s): video accuracy %.3f", f + 1, *key, view, acc)

        for init in ("ssl", "scratch"):
            def make_encoder():
                return load_encoder(fold_dir / "pretrain")[0] if init == "ssl" else build_encoder(spec)

            for method in ("probe", "finetune"):
                torch.manual_seed(seed_for(cv.seed, f))
                if method == "probe":
                    enc = make_encoder().to(device)
                    rows = np.concatenate([train_rows, val_rows])  # refit_rows are among them
                    z = dict(zip(rows.tolist(), embed(enc, d.frames, rows, device, ft.channels_last,
                                                      ft.pool_stages)))
                    zt, zv = np.stack([z[r] for r in train_rows]), np.stack([z[r] for r in val_rows])
                    layer, info = linear_probe(zt, d.labels[train_rows], zv, d.labels[val_rows], len(d.classes),
                                               ft.probe_c, ft.seed)
                    model = PlaneClassifier(enc, len(d.classes), pool_stages=ft.pool_stages)
                    model.head[1] = layer
                    score(model, (init, method, "selected"))
                    info_f[f"{init}_probe_C"] = info["C"]
                    info_f[f"{init}_probe_val_macro_f1"] = round(info["val_macro_f1"], 5)  # the score that chose C
                    if cv.refit:  # the chosen L2 strength, fitted on the training and validation videos' frames
                        model.head[1], _ = linear_probe(np.stack([z[r] for r in refit_rows]), d.labels[refit_rows],
                                                        zv[:0], d.labels[val_rows][:0], len(d.classes), [info["C"]],
                                                        ft.seed)
                        score(model, (init, method, "refit"))
                else:
                    model, info = finetune_classifier(make_encoder(), init == "ssl", d, ft_train, val_rows,
                                                      ft_fold, fold_dir / f"{init}-finetune", device,
                                                      progress=progress, row_weights=ft_train_w)
                    score(model, (init, method, "selected"))
                    info_f[f"{init}_finetune_epochs"] = info["best_epoch"]
                    # the score that chose the epoch (best.pt's own history entry)
                    info_f[f"{init}_finetune_val_macro_f1"] = [h["val_macro_f1"] for h in info["history"]
                                                               if h["epoch"] == info["best_epoch"]][0]
                    if cv.refit:  # the same initialisation and schedule, for the chosen number of epochs
                        torch.manual_seed(seed_for(cv.seed, f))
                        ft_params = dataclasses.replace(ft_fold, frames_per_epoch=len(refit_rows),
                                                        **({"probe_c": [info["head_C"]]} if "head_C" in info else {}))
                        model, _ = finetune_classifier(make_encoder(), init == "ssl", d, ft_refit, val_rows[:0],
                                                       ft_params, fold_dir / f"{init}-finetune-refit", device,
                                                       progress=progress, refit_epochs=info["best_epoch"],
                                                       row_weights=ft_refit_w)
                        score(model, (init, method, "refit"))

    results = []
    view = FLIP_VIEW if cv.flip_test else "frames"
    for (init, method, which, shown), per_video in preds.items():
        if (cv.refit and which == "selected") or shown != view:
            continue
        rep = _report(per_video, label_of, d.classes)
        entry = {"init": init, "method": method, "accuracy": rep["accuracy"],
                 "fold_accuracy": fold_acc[(init, method, which, view)],
                 "per_class_f1": {c: rep["per_class"][c]["f1"] for c in d.classes}, "report": rep}
        if cv.refit:
            entry["accuracy_selected"] = _report(preds[(init, method, "selected", view)], label_of,
                                                 d.classes)["accuracy"]
            entry["fold_accuracy_selected"] = fold_acc[(init, method, "selected", view)]
        if cv.flip_test:  # the scored model's accuracy from the frames alone, too
            entry["by_view"] = {w: _report(preds[(init, method, which, w)], label_of, d.classes)["accuracy"]
                                for w in ("frames", FLIP_VIEW)}
        results.append(entry)
    out = {"dataset": str(clips_dir), "data_version": d.data.version, "folds": cv.folds, "classes": d.classes,
           "videos": int(len(vid_ids)), "patients": int(videos.patient.nunique()),
           # videos of labels.csv that preprocessing left out as unusable, each with its reason (from meta.json)
           "rejected": int(d.data.meta.get("counts", {}).get("rejected", 0)),
           "rejects": d.data.meta.get("rejects", []),
           "fold_of_video": {str(idx.video[idx.video_idx == v].iloc[0]): int(fo) for v, fo in zip(vid_ids, fold_of)},
           "params": {"crossval": as_dict(cv), "pretrain": as_dict(pre), "finetune": as_dict(ft)},
           "fold_runs": fold_info, "results": results, "seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_text(out_dir / "results.json", json.dumps(out, indent=2) + "\n")
    flat = {f"{r['init']}/{r['method']}": {"video_accuracy": r["accuracy"], **{f"f1_{c}": v for c, v in
                                                                              r["per_class_f1"].items()}}
            for r in results}
    atomic_write_text(out_dir / "metrics.json", json.dumps(flat, indent=2) + "\n")
    if report is not None:
        from sonossl.evaluate.report import crossval_markdown

        atomic_write_text(report, crossval_markdown(out))
    return out
