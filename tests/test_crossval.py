"""POCUS cross-validation on a small subset of the real videos, tiny profile: folds grouped by patient, pretraining
on training folds only, SSL and scratch with probe and fine-tune, video-level results."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The least populated class:UserWarning")  # 12 videos in 3 folds, by design
def test_crossval_folds_by_patient_and_reports_video_level(pocus_subset, tiny_params, tmp_path):
    from sonossl.data.clips import preprocess
    from sonossl.train.crossval import crossval

    preprocess(pocus_subset, tmp_path / "clips", tiny_params.preprocess, progress=False)
    params = dataclasses.replace(tiny_params, crossval=dataclasses.replace(tiny_params.crossval,
                                                                           pretrain_on_validation=False,
                                                                           fresh_frames=False))
    out = crossval(tmp_path / "clips", tmp_path / "cv", params, progress=False, report=tmp_path / "cv.md")
    assert out["folds"] == 3 and out["classes"] == ["covid", "pneumonia", "regular"]
    assert {(r["init"], r["method"]) for r in out["results"]} == {
        (i, m) for i in ("ssl", "scratch") for m in ("probe", "finetune")}
    for r in out["results"]:
        assert len(r["fold_accuracy"]) == 3 and 0 <= r["accuracy"] <= 1
        assert r["report"]["n"] == 12  # every video predicted exactly once, pooled over folds
    # a patient's videos never straddle folds (pocus_subset has one video per patient, so the unit test below checks
    # the grouping); the pretraining of a fold never saw its test videos
    labels = pd.read_csv(pocus_subset / "labels.csv").set_index("path")
    folds = pd.Series(out["fold_of_video"])
    assert labels.loc[folds.index].assign(fold=folds.values).groupby("patient_id").fold.nunique().max() == 1
    for f in range(3):
        pt = json.loads((tmp_path / f"cv/folds/fold{f}/pretrain/metrics.json").read_text())
        assert pt["train_clips"] > 0 and pt["val_clips"] > 0  # inner-train clips; inner-validation ones
        assert out["fold_runs"][f]["pretrain_videos"] == out["fold_runs"][f]["train_videos"]
    # each test fold's patients (the audit trail of "grouped by patient"), every patient in exactly one
    tested = [p for r in out["fold_runs"] for p in r["test_patients"]]
    assert sorted(tested) == sorted(labels.patient_id.astype(str)) and out["rejected"] == 0 and out["rejects"] == []
    for f, r in enumerate(out["fold_runs"]):
        assert sum(r["test_videos_per_class"].values()) == r["test_videos"] == sum(folds == f)
    md = (tmp_path / "cv.md").read_text()
    heading = f"### Video classification, 3-fold cross-validation grouped by patient: {tmp_path / 'clips'}"
    assert md.startswith(heading)
    r = out["fold_runs"][0]
    assert (f"| 1 | {len(r['test_patients'])} | {r['test_videos']} | " + " | ".join(
        str(r["test_videos_per_class"][c]) for c in out["classes"]) + " |") in md
    assert "(`fold_runs[].test_patients`)" in md and "left out by preprocessing" not in md
    assert "| ssl | finetune |" in md and "inner validation videos included" not in md and "every frame" not in md
    assert json.loads((tmp_path / "cv/metrics.json").read_text())["ssl/finetune"]["video_accuracy"] >= 0


def test_folds_keep_each_patients_videos_together_and_hold_every_class():
    """Several videos per patient (as POCUS has for some): every patient's videos land in one fold, outer and
    inner alike, and each fold holds every class (stratified)."""
    from sonossl.train.crossval import video_folds

    rng = np.random.default_rng(0)
    patients = np.repeat(np.arange(30), rng.integers(1, 5, 30))  # 1 to 4 videos per patient
    labels = patients % 3  # a patient's videos share a label
    order = rng.permutation(len(patients))  # videos listed in no particular order
    patients, labels = patients[order], labels[order]
    for folds, seed in ((5, 0), (3, 7)):
        fold = video_folds(labels, patients, folds, seed)
        assert pd.Series(fold).groupby(patients).nunique().max() == 1
        assert sorted(set(fold)) == list(range(folds))
        assert all(set(labels[fold == f]) == {0, 1, 2} for f in range(folds))
    # grouping is what keeps a patient together: the same videos as 1-video patients scatter them
    scattered = video_folds(labels, np.arange(len(patients)), 5, 0)
    assert pd.Series(scattered).groupby(patients).nunique().max() > 1


def test_crossval_refuses_videos_without_one_label_naming_the_dataset(tiny_clips, pocus_subset, tiny_params,
                                                                     tmp_path):
    """Cross-validation classifies whole videos: per-frame labels (the simulated sweeps' planes) and videos without
    a label are refused before any training, naming the clip dataset and a video."""
    from sonossl.data.clips import preprocess
    from sonossl.train.crossval import crossval

    with pytest.raises(ValueError, match="video\\(s\\) have frames of several labels, e.g. 'videos/sweep_") as err:
        crossval(tiny_clips, tmp_path / "sim", tiny_params, progress=False)
    assert str(tiny_clips) in str(err.value) and not (tmp_path / "sim").exists()

    raw = tmp_path / "raw"
    shutil.copytree(pocus_subset, raw)
    labels = pd.read_csv(raw / "labels.csv")
    labels.loc[labels.index[:2], "label"] = None
    labels.to_csv(raw / "labels.csv", index=False)
    preprocess(raw, tmp_path / "clips", tiny_params.preprocess, progress=False)
    with pytest.raises(ValueError, match="label, which is missing for 2 video\\(s\\)") as err:
        crossval(tmp_path / "clips", tmp_path / "cv", tiny_params, progress=False)
    assert str(tmp_path / "clips") in str(err.value) and not (tmp_path / "cv").exists()
    # a video without a patient: named, as crossval groups folds by patient
    labels = pd.read_csv(pocus_subset / "labels.csv")
    labels.loc[labels.index[3], "patient_id"] = None
    labels.to_csv(raw / "labels.csv", index=False)
    preprocess(raw, tmp_path / "nopatient", tiny_params.preprocess, progress=False)
    with pytest.raises(ValueError, match=f"patient_id, which is missing for 1 video\\(s\\), e.g. "
                                         f"'{re.escape(labels.path[3])}': give each a patient_id"):
        crossval(tmp_path / "nopatient", tmp_path / "cv", tiny_params, progress=False)


def test_a_class_with_fewer_patients_than_folds_or_a_single_class_is_refused_naming_it(pocus_subset, tiny_params,
                                                                                         tmp_path):
    """A class whose patients all fall in one fold was never trained on in that fold, yet got an F1 (a review ran
    one pneumonia patient in 4 folds: "F1 pneumonia 0.267", no warning). Refused before any training, naming the
    class and its patients; so is a dataset of a single class (the message named neither the dataset nor the
    column, and "plane detection"), and run-local refuses both from labels.csv alone, before kfp starts."""
    from sonossl.data.clips import preprocess
    from sonossl.pipeline.steps import check_crossval_listing
    from sonossl.train.crossval import crossval

    raw = tmp_path / "raw"
    shutil.copytree(pocus_subset, raw)
    labels = pd.read_csv(raw / "labels.csv")
    labels.loc[labels.label == "pneumonia", "patient_id"] = "PT7"
    labels.to_csv(raw / "labels.csv", index=False)
    preprocess(raw, tmp_path / "clips", tiny_params.preprocess, progress=False)
    short = ("3 folds grouped by patient need at least 3 patients of each class, so that every fold trains on every "
             "class, but 'pneumonia' has 1 (PT7): use fewer folds (crossval.folds) or add patients of that class")
    with pytest.raises(ValueError) as err:
        crossval(tmp_path / "clips", tmp_path / "cv", tiny_params, progress=False)
    assert str(err.value) == f"{tmp_path / 'clips'} (crossval.folds=3): {short}"
    assert not (tmp_path / "cv").exists()
    with pytest.raises(ValueError) as err:
        check_crossval_listing(raw, "lungs", folds=3)
    assert str(err.value) == f"lungs (folds=3; labels.csv): {short}"
    check_crossval_listing(raw, "lungs")  # without folds: the rows only, as before
    # labelled by annotation files (per-frame labels), or partly: crossval counts those itself, run-local cannot
    ann = tmp_path / "ann"
    ann.mkdir()
    (ann / "labels.csv").write_text("path,patient_id,annotations\nvideos/a.mp4,p1,a.json\nvideos/b.mp4,p2,b.json\n")
    check_crossval_listing(ann, "ann", folds=3)
    (ann / "labels.csv").write_text("path,label,patient_id,annotations\nvideos/a.mp4,x,p1,\nvideos/b.mp4,,p2,b.json\n")
    check_crossval_listing(ann, "ann", folds=3)
    with pytest.raises(ValueError, match="folds: at least 2, got 1"):
        check_crossval_listing(pocus_subset, "lungs", folds=1)

    labels["label"] = "covid"
    labels.to_csv(raw / "labels.csv", index=False)
    preprocess(raw, tmp_path / "one", tiny_params.preprocess, progress=False)
    with pytest.raises(ValueError) as err:
        crossval(tmp_path / "one", tmp_path / "cv", tiny_params, progress=False)
    assert str(err.value) == (f"{tmp_path / 'one'}: classifying needs labels of at least 2 classes, and it has only "
                              "'covid': give labels.csv a `label` per video (or per frame in an annotations file) of "
                              "at least 2 classes")


def test_a_fold_training_without_a_class_is_refused_and_one_selecting_without_it_warned(caplog):
    """Enough patients per class overall can still leave a fold's inner training videos without a class (its
    training patients all set aside for model selection): refused, naming the fold; a class missing from the inner
    validation videos only is a warning (the selection does not see it)."""
    from sonossl.train.crossval import check_fold_classes

    classes = ["a", "b"]
    labels = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    fold_of = np.array([0, 0, 0, 0, 1, 1, 1, 1])  # each fold trains on the other's four videos: a, b, a, b
    fine = [np.array([0, 0, 1, 1]), np.array([1, 0, 1, 1])]  # per training video its inner fold, 0 = validation
    check_fold_classes(classes, labels, fold_of, fine, "lungs")
    assert "fold 2: its inner validation videos hold no video of ['a']" in caplog.text
    assert "fold 1:" not in caplog.text
    with pytest.raises(ValueError) as err:
        check_fold_classes(classes, labels, fold_of, [fine[0], np.array([1, 0, 1, 0])], "lungs")
    assert str(err.value) == ("lungs: fold 2's training videos, once its inner validation patients are set aside, "
                              "hold no video of ['b']: use fewer folds or add patients of that class")


@pytest.mark.filterwarnings("ignore:The least populated class:UserWarning")
def test_as_many_patients_as_folds_is_refused_before_training_naming_the_fold(pocus_subset, tiny_params, tmp_path):
    """3 patients, 3 folds: the outer split works, but each fold's 2 training patients cannot be split 3 ways for
    model selection. Refused before any training, for what it is (it said the dataset had 2 patients)."""
    from sonossl.data.clips import preprocess
    from sonossl.train.crossval import crossval

    raw = tmp_path / "raw"
    shutil.copytree(pocus_subset, raw)
    labels = pd.read_csv(raw / "labels.csv")
    labels["patient_id"] = [f"p{i % 3}" for i in range(len(labels))]
    labels.to_csv(raw / "labels.csv", index=False)
    preprocess(raw, tmp_path / "clips", tiny_params.preprocess, progress=False)
    params = dataclasses.replace(tiny_params, crossval=dataclasses.replace(tiny_params.crossval, folds=3))
    with pytest.raises(ValueError, match=r"clips: fold 1's training videos, split again for model selection "
                                         r"\(crossval.folds=3: the dataset needs more patients than folds\) has "
                                         r"only 2 patients"):
        crossval(tmp_path / "clips", tmp_path / "cv", params, progress=False)
    assert not (tmp_path / "cv").exists()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The least populated class:UserWarning")
def test_refit_scores_the_chosen_models_fitted_again_on_train_and_validation_videos(pocus_subset, tiny_params,
                                                                                    tmp_path):
    """With ``crossval.refit`` the selected models are scored as without it, bit for bit (kept as ``*_selected``),
    and the reported ones are fitted again on the training and validation videos: the fine-tune for the epochs the
    selection chose, of the same schedule, with no validation; the probe at the chosen L2 strength."""
    from sonossl.data.clips import preprocess
    from sonossl.train.crossval import crossval
    from sonossl.train.loop import load_checkpoint

    preprocess(pocus_subset, tmp_path / "clips", tiny_params.preprocess, progress=False)
    cv = dataclasses.replace(tiny_params.crossval, finetune_epochs=3, refit=False, flip_test=False)  # one view
    params = dataclasses.replace(tiny_params, crossval=cv, finetune=dataclasses.replace(tiny_params.finetune,
                                                                                         patience=1))
    plain = crossval(tmp_path / "clips", tmp_path / "plain", params, progress=False, report=tmp_path / "plain.md")
    refit = crossval(tmp_path / "clips", tmp_path / "refit",
                     dataclasses.replace(params, crossval=dataclasses.replace(cv, refit=True)), progress=False,
                     report=tmp_path / "refit.md")
    assert "before the refit" not in (tmp_path / "plain.md").read_text()
    md = (tmp_path / "refit.md").read_text()
    assert "| encoder | method | video accuracy | before the refit | per-fold accuracy |" in md
    assert "fitted again on its training and validation videos" in md
    r = refit["results"][1]
    assert f"| {r['init']} | {r['method']} | {r['accuracy']:.3f} | {r['accuracy_selected']:.3f} |" in md
    before = {(r["init"], r["method"]): r for r in plain["results"]}
    assert "accuracy_selected" not in plain["results"][0] and "refit_frames" not in plain["fold_runs"][0]
    for r in refit["results"]:
        assert r["accuracy_selected"] == before[r["init"], r["method"]]["accuracy"]
        assert r["fold_accuracy_selected"] == before[r["init"], r["method"]]["fold_accuracy"]
        assert r["report"]["n"] == 12 and len(r["fold_accuracy"]) == 3
    assert [{k: v for k, v in f.items() if k != "refit_frames"} for f in refit["fold_runs"]] == plain["fold_runs"]
    for f, runs in enumerate(refit["fold_runs"]):
        # frames_per_video of every training and validation video (the tiny videos all have more)
        assert runs["refit_frames"] == runs["train_frames"] + cv.frames_per_video * runs["val_videos"]
        for init in ("ssl", "scratch"):
            chosen = load_checkpoint(tmp_path / f"refit/folds/fold{f}/{init}-finetune/checkpoints/best.pt")
            again = load_checkpoint(tmp_path / f"refit/folds/fold{f}/{init}-finetune-refit/checkpoints/last.pt")
            assert chosen["epoch"] == runs[f"{init}_finetune_epochs"] == again["epoch"]
            assert all(not k.startswith("val_") for e in again["history"] for k in e)  # nothing validated
            assert any(not torch.equal(again["model"][k], v) for k, v in chosen["model"].items())


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The least populated class:UserWarning")
def test_pretrain_on_validation_pretrains_on_every_training_video_of_the_fold_and_never_on_its_test_videos(
        pocus_subset, tiny_params, tmp_path):
    """With ``crossval.pretrain_on_validation`` each fold's encoder trains on the clips of all its training videos
    (inner-train and inner-validation: every clip outside the test fold) and validates on none."""
    from sonossl.data.clips import preprocess
    from sonossl.pretext.batch import clip_starts
    from sonossl.train.crossval import crossval
    from sonossl.train.finetune import open_labelled

    preprocess(pocus_subset, tmp_path / "clips", tiny_params.preprocess, progress=False)
    cv = dataclasses.replace(tiny_params.crossval, refit=False, pretrain_on_validation=True)
    out = crossval(tmp_path / "clips", tmp_path / "cv", dataclasses.replace(tiny_params, crossval=cv), progress=False,
                   report=tmp_path / "cv.md")
    assert "pretrained on all its training videos, inner validation videos included" in (tmp_path / "cv.md").read_text()
    d = open_labelled(tmp_path / "clips")
    video_fold = d.data.index.groupby("video_idx").video.first().map(out["fold_of_video"])
    starts = clip_starts(d.video_idx, tiny_params.pretrain.k, tiny_params.pretrain.stride)
    start_fold = video_fold.loc[d.video_idx[starts]].to_numpy()
    for f, runs in enumerate(out["fold_runs"]):
        pt = json.loads((tmp_path / f"cv/folds/fold{f}/pretrain/metrics.json").read_text())
        assert pt["train_clips"] == int((start_fold != f).sum()) and pt["val_clips"] == 0 and pt["val"] == {}
        assert runs["pretrain_videos"] == runs["train_videos"] + runs["val_videos"] == 12 - runs["test_videos"]
    assert {r["report"]["n"] for r in out["results"]} == {12}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The least populated class:UserWarning")
def test_refit_of_an_lp_ft_fine_tune_starts_its_head_from_the_probe_at_the_chosen_l2_strength(
        pocus_subset, tiny_params, tmp_path, monkeypatch):
    """LP-FT (``head_init: probe``): the refit fits the head's starting probe on the training and validation videos
    at the one L2 strength its selected run chose, with nothing left to validate on."""
    from sonossl.data.clips import preprocess
    from sonossl.train import finetune
    from sonossl.train.crossval import crossval

    calls = []
    real = finetune.linear_probe

    def recording(z_train, y_train, z_val, y_val, n_classes, cs, seed, **kw):
        layer, info = real(z_train, y_train, z_val, y_val, n_classes, cs, seed, **kw)
        calls.append({"cs": list(cs), "train": len(y_train), "val": len(y_val), "C": info["C"],
                      "weight": float(kw["sample_weight"].sum())})
        return layer, info

    monkeypatch.setattr(finetune, "linear_probe", recording)  # finetune_classifier's probes, not crossval's own
    preprocess(pocus_subset, tmp_path / "clips", tiny_params.preprocess, progress=False)
    params = dataclasses.replace(tiny_params, finetune=dataclasses.replace(tiny_params.finetune, head_init="probe",
                                                                           probe_c=[0.001, 100.0]))
    out = crossval(tmp_path / "clips", tmp_path / "cv", params, progress=False)
    assert len(calls) == 2 * 2 * 3  # per fold and encoder: the selected fine-tune's head, then the refit's
    for f, runs in enumerate(out["fold_runs"]):
        for i in range(2):
            chosen, again = calls[4 * f + 2 * i], calls[4 * f + 2 * i + 1]
            # fresh_frames (the profile's): every frame of the videos, each video with total weight 1
            assert chosen["cs"] == [0.001, 100.0] and chosen["val"] > 0 and chosen["train"] > runs["train_frames"]
            assert chosen["weight"] == pytest.approx(runs["train_videos"])
            assert again["cs"] == [chosen["C"]] and again["val"] == 0 and again["train"] > runs["refit_frames"]
            assert again["weight"] == pytest.approx(runs["train_videos"] + runs["val_videos"])
    assert {r["report"]["n"] for r in out["results"]} == {12}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The least populated class:UserWarning")
def test_fresh_frames_fine_tunes_on_every_frame_of_the_training_videos_each_video_equally_likely(
        pocus_subset, tiny_params, tmp_path, monkeypatch):
    """``crossval.fresh_frames``: the selected fine-tune draws from every frame of the inner-train videos, the refit
    from every frame of the inner-train and validation videos, each video with total weight 1, at the same frames per
    epoch as the evenly spaced set; never a frame of the test fold. The probes keep the evenly spaced frames."""
    from sonossl.data.clips import preprocess
    from sonossl.train import crossval as cv_module
    from sonossl.train.finetune import open_labelled

    calls = []
    real = cv_module.finetune_classifier

    def recording(encoder, pretrained, d, train_rows, val_rows, params, *a, row_weights=None, **kw):
        calls.append({"rows": train_rows, "weights": row_weights, "val": val_rows,
                      "frames_per_epoch": params.frames_per_epoch})
        return real(encoder, pretrained, d, train_rows, val_rows, params, *a, row_weights=row_weights, **kw)

    monkeypatch.setattr(cv_module, "finetune_classifier", recording)
    preprocess(pocus_subset, tmp_path / "clips", tiny_params.preprocess, progress=False)
    params = dataclasses.replace(tiny_params, crossval=dataclasses.replace(tiny_params.crossval, fresh_frames=True))
    out = cv_module.crossval(tmp_path / "clips", tmp_path / "cv", params, progress=False, report=tmp_path / "cv.md")
    assert "drew each epoch's frames from every frame of their training videos" in (tmp_path / "cv.md").read_text()
    d = open_labelled(tmp_path / "clips")
    fold_of_row = d.data.index.video.map(out["fold_of_video"]).to_numpy()
    assert len(calls) == 3 * 2 * 2  # per fold and encoder: the selected fine-tune, then its refit
    for f, runs in enumerate(out["fold_runs"]):
        for i in range(2):
            chosen, again = calls[4 * f + 2 * i], calls[4 * f + 2 * i + 1]
            val_videos = np.unique(d.video_idx[chosen["val"]])
            outside = np.flatnonzero(fold_of_row != f)
            assert np.array_equal(again["rows"], outside) and len(again["val"]) == 0
            assert np.array_equal(chosen["rows"], outside[~np.isin(d.video_idx[outside], val_videos)])
            for call, n_videos in ((chosen, runs["train_videos"]), (again, runs["train_videos"] + runs["val_videos"])):
                per_video = pd.Series(call["weights"]).groupby(d.video_idx[call["rows"]]).sum()
                assert len(per_video) == n_videos and per_video.to_numpy() == pytest.approx(1.0)
                assert len(call["rows"]) > tiny_params.crossval.frames_per_video * n_videos  # more than the even set
            assert chosen["frames_per_epoch"] == runs["train_frames"]
            assert again["frames_per_epoch"] == runs["refit_frames"]
    assert {r["report"]["n"] for r in out["results"]} == {12}


def test_predict_with_flip_classifies_the_frames_mirrored_left_right(tiny_params):
    from sonossl.config import as_dict
    from sonossl.models.downstream import PlaneClassifier
    from sonossl.models.encoder import build_encoder
    from sonossl.train.finetune import predict, to_input

    torch.manual_seed(0)
    model = PlaneClassifier(build_encoder(as_dict(tiny_params.pretrain.encoder)), 3).eval()
    frames = torch.randint(0, 256, (5, 32, 32), dtype=torch.uint8)
    rows = np.array([4, 1, 2])
    with torch.no_grad():
        mirrored = model(to_input(frames[rows]).flip(-1))
    got = predict(model, frames, rows, torch.device("cpu"), flip=True)
    assert torch.allclose(got, mirrored, atol=1e-6)
    assert not torch.equal(got, predict(model, frames, rows, torch.device("cpu")))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The least populated class:UserWarning")
def test_flip_test_averages_each_test_frame_with_its_mirror_and_keeps_the_frames_alone_score(
        pocus_subset, tiny_params, tmp_path, monkeypatch):
    """``crossval.flip_test``: each test frame's probabilities are averaged with its mirror's before the video's
    mean. Here the mirrors are made to say "covid" for certain, so every video of the scored view is covid (4 of 12
    right); ``by_view`` keeps the frames alone, which for the fine-tunes equal a rescoring of their saved weights;
    the report has a column for it."""
    from sonossl.config import as_dict
    from sonossl.data.clips import preprocess
    from sonossl.models.downstream import PlaneClassifier
    from sonossl.models.encoder import build_encoder
    from sonossl.train import crossval as cv_module
    from sonossl.train.finetune import open_labelled, predict
    from sonossl.train.loop import load_best

    def certain_mirrors(model, frames, rows, device, flip=False):
        out = predict(model, frames, rows, device, flip=flip)
        return out + torch.tensor([50.0, 0.0, 0.0]) if flip else out

    monkeypatch.setattr(cv_module, "predict", certain_mirrors)
    preprocess(pocus_subset, tmp_path / "clips", tiny_params.preprocess, progress=False)
    params = dataclasses.replace(tiny_params, crossval=dataclasses.replace(tiny_params.crossval, flip_test=True))
    out = cv_module.crossval(tmp_path / "clips", tmp_path / "cv", params, progress=False, report=tmp_path / "cv.md")
    d = open_labelled(tmp_path / "clips")
    fold_of_row = d.data.index.video.map(out["fold_of_video"]).to_numpy()
    assert out["classes"][0] == "covid"
    for r in out["results"]:
        assert r["accuracy"] == r["by_view"]["frames+mirrored"] == round(4 / 12, 4)
        assert r["per_class_f1"]["pneumonia"] == r["per_class_f1"]["regular"] == 0
        if r["method"] != "finetune":
            continue
        right = 0
        for f in range(3):
            model = PlaneClassifier(build_encoder(as_dict(tiny_params.pretrain.encoder)), len(d.classes))
            load_best(model, tmp_path / f"cv/folds/fold{f}/{r['init']}-finetune-refit")
            rows = np.flatnonzero(fold_of_row == f)
            p = torch.softmax(predict(model, d.frames, rows, torch.device("cpu")), 1).numpy()
            for v in np.unique(d.video_idx[rows]):
                here = d.video_idx[rows] == v
                right += int(p[here].mean(0).argmax() == d.labels[rows][here][0])
        assert r["by_view"]["frames"] == round(right / 12, 4), r["init"]
    md = (tmp_path / "cv.md").read_text()
    assert "| frames alone |" in md and "mirrored left-right" in md


CROSSVAL_SEEDS = REPO / "benchmarks" / "crossval_seeds.py"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The least populated class:UserWarning")
def test_crossval_seeds_seed_0_is_the_crossval_step_s_own_run(pocus_subset, tiny_params, tmp_path):
    """The benchmark's seed 0 reproduces the step, fold by fold, with the levers it was given; further seeds are rows
    of their own, and the gains are SSL minus scratch."""
    import dataclasses
    import subprocess
    import sys

    from sonossl.data.clips import preprocess
    from sonossl.train.crossval import crossval

    preprocess(pocus_subset, tmp_path / "clips", tiny_params.preprocess, progress=False)
    spec = dataclasses.replace(tiny_params.pretrain.encoder, init="torchvision")  # small_cnn's own is pytorch
    params = dataclasses.replace(tiny_params, crossval=dataclasses.replace(tiny_params.crossval, frames_per_video=3,
                                                                           refit=True),
                                 pretrain=dataclasses.replace(tiny_params.pretrain, lr=0.003, encoder=spec),
                                 finetune=dataclasses.replace(tiny_params.finetune, pool_stages=2,
                                                              encoder_lr_decay=0.5))
    out = crossval(tmp_path / "clips", tmp_path / "cv", params, progress=False)
    step = {f"{r['init']}_{r['method']}": r for r in out["results"]}
    subprocess.run([sys.executable, str(CROSSVAL_SEEDS), "--profile", "tiny", "--clips", str(tmp_path / "clips"),
                    "--seeds", "2", "--frames-per-video", "3", "--pool-stages", "2", "--encoder-lr-decay", "0.5",
                    "--pretrain-lr", "0.003", "--encoder-init", "torchvision", "--refit", "--out",
                    str(tmp_path / "seeds.json")],
                   check=True, capture_output=True, text=True, timeout=900)
    result = json.loads((tmp_path / "seeds.json").read_text())
    assert result["levers"] == {"frames_per_video": 3, "refit": True, "pretrain_lr": 0.003, "pool_stages": 2,
                                "encoder_lr_decay": 0.5, "encoder_init": "torchvision"}
    assert result["encoder_spec"]["init"] == "torchvision"
    assert result["pool_stages"] == 2 and result["encoder_lr_decay"] == 0.5 and result["pretrain_lr"] == 0.003
    assert result["crossval"]["frames_per_video"] == 3
    assert result["seeds"] == [0, 1] and result["finished"] == "2/2 seeds"
    assert result["videos"] == 12 and result["folds"] == 3
    seed0, seed1 = result["per_seed"]
    for key, r in step.items():
        assert seed0[key] == r["accuracy"] and seed0[f"{key}_folds"] == r["fold_accuracy"]
        assert seed0[f"{key}_selected"] == r["accuracy_selected"]  # --refit keeps the selected models' scores too
        assert seed0[f"{key}_selected_folds"] == r["fold_accuracy_selected"]
        diffs = [round(row[key] - row[f"{key}_selected"], 4) for row in result["per_seed"]]
        # the inner-validation score of each fold's choice, averaged over the folds
        assert seed0[f"{key}_val"] == round(float(np.mean([f[f"{key}_val_macro_f1"] for f in out["fold_runs"]])), 4)
        assert result[f"{key}_refit_minus_selected"]["min"] == min(diffs)
    for row in (seed0, seed1):
        assert row["finetune_gain"] == round(row["ssl_finetune"] - row["scratch_finetune"], 4)
        assert row["probe_gain"] == round(row["ssl_probe"] - row["scratch_probe"], 4)
    assert result["ssl_finetune"]["min"] == min(seed0["ssl_finetune"], seed1["ssl_finetune"])
    assert result["ssl_finetune_reaches_target_in"].endswith("/2 seeds")


def test_crossval_seeds_refuses_a_missing_dataset_and_a_bad_lever(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(CROSSVAL_SEEDS), "--clips", str(tmp_path / "nothing"), "--out",
                           str(tmp_path / "x.json")], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and f"{tmp_path / 'nothing'}: no clip dataset" in proc.stderr
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "meta.json").write_text("{}")
    proc = subprocess.run([sys.executable, str(CROSSVAL_SEEDS), "--clips", str(tmp_path / "clips"),
                           "--pretrain-epochs", "0", "--out", str(tmp_path / "x.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--pretrain-epochs: must be at least 1, got 0" in proc.stderr
    proc = subprocess.run([sys.executable, str(CROSSVAL_SEEDS), "--clips", str(tmp_path / "clips"),
                           "--pretrain-lr", "0", "--out", str(tmp_path / "x.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--pretrain-lr: must be positive, got 0.0" in proc.stderr
    proc = subprocess.run([sys.executable, str(CROSSVAL_SEEDS), "--clips", str(tmp_path / "clips"),
                           "--encoder-lr-decay", "2", "--out", str(tmp_path / "x.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "finetune.encoder_lr_decay: must be in (0, 1]" in proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_crossval_seeds_keeps_the_seeds_it_finished_when_a_later_one_fails(tmp_path, monkeypatch):
    """A run of hours that stops part-way (here: the second cross-validation raises) leaves a record of the seeds
    it completed, marked as such; the finished run says all of them."""
    import importlib
    import sys

    monkeypatch.syspath_prepend(str(CROSSVAL_SEEDS.parent))
    bench = importlib.import_module("crossval_seeds")
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "meta.json").write_text("{}")
    out = tmp_path / "seeds.json"

    def fake_crossval(clips, run_dir, params, progress):
        if params.crossval.seed == 1:
            raise RuntimeError("stopped")
        results = [{"init": i, "method": m, "accuracy": 0.5 + 0.1 * (i == "ssl"), "fold_accuracy": [0.5],
                    "per_class_f1": {}} for i in ("ssl", "scratch") for m in ("probe", "finetune")]
        fold_runs = [{f"{i}_{m}_val_macro_f1": 0.5 for i in ("ssl", "scratch") for m in ("probe", "finetune")}]
        return {"results": results, "data_version": "v", "videos": 12, "patients": 6, "folds": 3,
                "fold_runs": fold_runs}

    monkeypatch.setattr(bench, "crossval", fake_crossval)
    monkeypatch.setattr(sys, "argv", ["crossval_seeds.py", "--profile", "tiny", "--clips", str(tmp_path / "clips"),
                                      "--seeds", "3", "--out", str(out)])
    with pytest.raises(RuntimeError, match="stopped"):
        bench.main()
    partial = json.loads(out.read_text())
    assert partial["finished"] == "1/3 seeds" and partial["seeds"] == [0]
    assert partial["finetune_gain"]["median"] == 0.1 and partial["machine"]
    monkeypatch.setattr(sys, "argv", sys.argv[:-4] + ["--seeds", "1", "--out", str(out)])
    assert bench.main() == 0 and json.loads(out.read_text())["finished"] == "1/1 seeds"
