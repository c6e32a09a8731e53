"""The preprocess step end to end: clip dataset layout, bad inputs, saliency alignment, resampling, atomicity,
determinism, splits, and all the POCUS videos."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import (
    fan_frames,
    smooth_frames,
    write_audio_only,
    write_unknown_codec,
    write_vfr_video,
    write_video,
)

from sonossl.config import PreprocessParams, SplitParams
from sonossl.data import clips
from sonossl.data.annotations import has_saliency, save_annotations
from sonossl.data.clips import (PreprocessError, assign_splits, load_clip_dataset, preprocess, read_listing,
                                 split_imbalance)

TINY = PreprocessParams(frame_size=32, saliency_size=16, workers=1)


def _labels(root: Path, rows: list[dict]) -> None:
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)


def _fan_video(root: Path, rel: str, seed: int, t: int = 12, fps: float = 10.0) -> Path:
    return write_video(root / rel, fan_frames(t=t, seed=seed).frames, fps=fps)


def _tree_digest(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()
    }


def _no_staging_left(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if any(k in p.name for k in (".staging-", ".old-", ".trash-"))]


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    """Four good fan videos in four formats, three patients, two labels, one extra column."""
    root = tmp_path / "raw"
    rows = []
    for i, (rel, fps) in enumerate(
        [("videos/a.mp4", 10.0), ("videos/b.avi", 10.0), ("videos/c.mov", 10.0), ("videos/d.mpeg", 25.0)]
    ):
        _fan_video(root, rel, seed=i, fps=fps)
        rows.append({"path": rel, "label": "x" if i % 2 else "y", "patient_id": f"p{i % 3}", "site": f"s{i}"})
    _labels(root, rows)
    return root


def test_clip_dataset_layout(raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "clips"
    report = preprocess(raw, out, TINY, progress=False)
    assert (report.videos, report.frames, report.rejects, report.dropped_blank) == (4, 48, [], 0)
    json.dumps(report.summary())  # JSON-serialisable
    assert sorted(p.name for p in out.iterdir()) == ["frames.npy", "index.parquet", "meta.json"]
    assert _no_staging_left(tmp_path)

    data = load_clip_dataset(out)
    assert isinstance(data.frames, np.memmap) and data.frames.shape == (48, 32, 32) and data.frames.dtype == np.uint8
    assert data.saliency is None
    # Frames are fan interior: bright speckle, never the black background or the white overlay text.
    assert data.frames.mean() > 40 and (data.frames == 0).mean() < 0.01

    index = data.index
    assert list(index.columns) == list(clips.INDEX_COLUMNS)
    assert index.frame.tolist() == list(range(48))
    assert index.video.unique().tolist() == ["videos/a.mp4", "videos/b.avi", "videos/c.mov", "videos/d.mpeg"]
    assert index.video_idx.unique().tolist() == [0, 1, 2, 3]
    assert index.groupby("video").source_frame.apply(list).map(lambda s: s == list(range(12))).all()
    np.testing.assert_allclose(index[index.video == "videos/a.mp4"].time, np.arange(12) / 10, atol=1e-6)
    np.testing.assert_allclose(index[index.video == "videos/d.mpeg"].time, np.arange(12) / 25, atol=1e-6)
    assert index[index.video == "videos/b.avi"].label.unique().tolist() == ["x"]
    assert set(index.patient_id) == {"p0", "p1", "p2"}
    assert not index.has_saliency.any()
    # Split by patient: each patient in one split; with three patients every split is used.
    assert index.groupby("patient_id").split.nunique().max() == 1
    assert set(index.split) == {"train", "val", "test"}

    meta = data.meta
    assert meta["version"] == report.version and len(meta["version"]) == 12
    assert meta["params"]["frame_size"] == 32 and meta["format"] == clips.FORMAT
    assert set(meta["inputs"]) == {"labels.csv", "videos/a.mp4", "videos/b.avi", "videos/c.mov", "videos/d.mpeg"}
    assert all(len(h) == 64 for h in meta["inputs"].values())
    counts = meta["counts"]
    assert counts["frames"] == 48 and counts["videos"] == 4 and counts["rejected"] == 0
    assert counts["frames_per_label"] == {"x": 24, "y": 24}
    assert sum(counts["frames_per_split"].values()) == 48
    assert counts["dropped_blank_per_video"] == {v: 0 for v in index.video.unique()}
    video = meta["videos"][1]
    assert video["path"] == "videos/b.avi" and video["codec"] == "mpeg4" and video["columns"] == {"site": "s1"}
    assert video["crop"]["method"] == "sector" and video["crop"]["side"] >= 50
    assert (video["width"], video["height"], video["frames_decoded"], video["frames_kept"]) == (128, 96, 12, 12)
    # Reproducible bytes for DVC: no absolute paths (and, see the determinism test, no timestamps).
    text = (out / "meta.json").read_text()
    assert str(tmp_path) not in text and str(raw.resolve()) not in text


def test_bad_inputs_are_listed_and_the_good_ones_processed(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    good = ["videos/sweep one.mp4", "videos/a+b (2).avi", "videos/[x] clip.mov", "videos/c (1).gif", "videos/d.mpeg"]
    for i, rel in enumerate(good):
        _fan_video(root, rel, seed=i, fps=25.0 if rel.endswith(".mpeg") else 10.0)
    videos = root / "videos"
    data = (videos / "sweep one.mp4").read_bytes()
    (videos / "empty.mp4").write_bytes(b"")
    (videos / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (videos / "notes.mp4").write_text("not a video, just text\n" * 10)
    write_video(videos / "still.mp4", fan_frames(t=1).frames)
    write_video(videos / "black.mp4", np.zeros((12, 96, 128), np.uint8))
    write_audio_only(videos / "audio.mp4")
    write_unknown_codec(videos / "unknown.avi", smooth_frames(t=6))
    (videos / "folder.mp4").mkdir()
    outside = write_video(tmp_path / "outside.mp4", fan_frames(t=6).frames)
    _fan_video(root, "videos/bad-ann.mp4", seed=7)
    (root / "ann").mkdir()
    (root / "ann" / "bad.npz").write_bytes(b"not an npz")
    _fan_video(root, "videos/short-ann.mp4", seed=8)
    save_annotations(root / "ann" / "short.npz", labels=["p"] * 5)

    expected = {
        "videos/missing.mp4": "file not found",
        "videos/empty.mp4": "empty file (0 bytes)",
        "videos/truncated.mp4": "corrupt or truncated MP4/MOV file",
        "videos/notes.mp4": "not a video (a text file)",
        "videos/still.mp4": "a single frame",
        "videos/black.mp4": "only 0 usable frame(s): 12 of 12 frames are blank",
        "videos/audio.mp4": "no video stream",
        "videos/unknown.avi": "unsupported codec",
        "videos/folder.mp4": "not a file",
        "../outside.mp4": "path outside the dataset root",
        str(outside): "absolute path",
        "videos/bad-ann.mp4": "annotations ann/bad.npz: not a readable annotations .npz",
        "videos/short-ann.mp4": "annotations ann/short.npz have 5 frames but the video has 12",
        "": "empty path",
    }
    rows = [{"path": rel, "label": "ok", "annotations": ""} for rel in good]
    rows += [{"path": rel, "label": "bad", "annotations": ""} for rel in expected]
    annotations = {"videos/bad-ann.mp4": "ann/bad.npz", "videos/short-ann.mp4": "ann/short.npz"}
    for row in rows:
        row["annotations"] = annotations.get(row["path"], "")
    rows.insert(2, {"path": "videos/sweep one.mp4", "label": "dup", "annotations": ""})
    expected["videos/sweep one.mp4"] = "listed twice in labels.csv: the same file as row 2 (videos/sweep one.mp4)"
    expected[""] = f"empty path in labels.csv row {[r['path'] for r in rows].index('') + 2}"  # the row names it
    _labels(root, rows)

    out = tmp_path / "clips"
    report = preprocess(root, out, replace(TINY, max_reject_fraction=1.0), progress=False)
    got = {r["path"]: r["reason"] for r in report.rejects}
    assert len(report.rejects) == len(expected) == 15
    for path, reason in expected.items():
        assert got[path].startswith(reason), f"{path!r}: {got[path]!r}"
    assert [r["path"] for r in report.rejects] == [r["path"] for r in rows if r["label"] != "ok"]  # listing order
    data = load_clip_dataset(out)
    assert data.index.video.unique().tolist() == good
    assert report.videos == 5 and report.frames == 60 and set(data.index.label) == {"ok"}
    assert data.meta["rejects"] == report.rejects
    # Rejected files inside the root are still inputs (a fix to one of them is a new version); outside ones are not.
    assert "videos/truncated.mp4" in data.meta["inputs"] and "../outside.mp4" not in data.meta["inputs"]
    assert _no_staging_left(tmp_path)

    # The same listing under the default threshold fails, names the dataset and lists the rejects.
    with pytest.raises(PreprocessError) as err:
        preprocess(root, tmp_path / "clips2", TINY, progress=False)
    message = str(err.value)
    assert str(root) in message and "15 of 20 listed videos are unusable" in message
    assert "videos/notes.mp4: not a video (a text file)" in message
    assert not (tmp_path / "clips2").exists() and _no_staging_left(tmp_path)


def test_nothing_usable_fails_clearly(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    (root / "v").mkdir(parents=True)
    (root / "v" / "a.mp4").write_text("text")
    _labels(root, [{"path": "v/a.mp4"}, {"path": "v/missing.mp4"}])
    with pytest.raises(PreprocessError) as err:
        preprocess(root, tmp_path / "out", replace(TINY, max_reject_fraction=1.0), progress=False)
    message = str(err.value)
    assert "no usable video among the 2 listed" in message
    assert "v/a.mp4: not a video (a text file)" in message and "v/missing.mp4: file not found" in message
    assert not (tmp_path / "out").exists()


def test_listing_errors_name_the_file_and_the_column(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    root.mkdir()
    with pytest.raises(FileNotFoundError, match=r"labels\.csv: not found"):
        preprocess(root, tmp_path / "out", TINY, progress=False)
    (root / "labels.csv").write_text("file,label\na.mp4,x\n")
    with pytest.raises(ValueError, match=r"labels\.csv: no 'path' column \(columns found: \['file', 'label'\]\)"):
        preprocess(root, tmp_path / "out", TINY, progress=False)
    (root / "labels.csv").write_text("path,label\n")
    with pytest.raises(PreprocessError, match="lists no videos"):
        preprocess(root, tmp_path / "out", TINY, progress=False)
    with pytest.raises(FileNotFoundError, match="raw dataset folder not found"):
        preprocess(tmp_path / "nowhere", tmp_path / "out", TINY, progress=False)
    with pytest.raises(ValueError, match="fps must be a finite number > 0"):
        preprocess(root, tmp_path / "out", replace(TINY, fps=0.0), progress=False)
    assert not (tmp_path / "out").exists()


def test_saliency_and_frame_labels_follow_the_kept_frames(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    t, h, w = 16, 96, 128
    fan = fan_frames(t=t, seed=5)
    frames = fan.frames.copy()
    blank = [3, 4, 9]
    frames[blank] = 0
    write_video(root / "videos/annotated.mp4", frames)
    _fan_video(root, "videos/plain.mp4", seed=6)
    # Gaze maps over the whole frame on a 24 x 32 grid: a blob that moves with the frame index.
    my, mx = np.mgrid[0:24, 0:32]
    centres = [(40 + 2 * i, 56 + i) for i in range(t)]  # (y, x) in frame pixels, inside the fan
    away = 12
    centres[away] = (4, 4)  # the sonographer looks at the corner text: no gaze inside the crop
    maps = np.stack([np.exp(-(((my + 0.5) * 4 - cy) ** 2 + ((mx + 0.5) * 4 - cx) ** 2) / 30.0) for cy, cx in centres])
    maps /= maps.sum(axis=(1, 2), keepdims=True)
    save_annotations(root / "ann/annotated.npz", labels=[f"plane{i}" for i in range(t)], saliency=maps)
    save_annotations(root / "ann/labels_only.npz", labels=["p"] * t)
    (root / "ann/broken.npz").write_bytes(b"not a zip")
    assert has_saliency(root / "ann/annotated.npz")  # from the file's listing, as the pipeline checks before work
    assert not has_saliency(root / "ann/labels_only.npz") and not has_saliency(root / "ann/broken.npz")
    _labels(
        root,
        [
            {"path": "videos/annotated.mp4", "label": "overridden", "annotations": "ann/annotated.npz"},
            {"path": "videos/plain.mp4", "label": "whole", "annotations": ""},
        ],
    )
    out = tmp_path / "clips"
    report = preprocess(root, out, TINY, progress=False)
    assert report.dropped_blank == 3
    data = load_clip_dataset(out)
    index = data.index
    annotated = index[index.video == "videos/annotated.mp4"]
    assert annotated.source_frame.tolist() == [i for i in range(t) if i not in blank]
    assert (annotated.label == "plane" + annotated.source_frame.astype(str)).all()
    assert annotated.has_saliency.tolist() == (annotated.source_frame != away).tolist()
    plain = index[index.video == "videos/plain.mp4"]
    assert (plain.label == "whole").all() and not plain.has_saliency.any()

    assert data.saliency is not None and data.saliency.dtype == np.float16 and data.saliency.shape == (len(index), 16, 16)
    sal = np.asarray(data.saliency, dtype=np.float64)
    looked = annotated[annotated.has_saliency]
    np.testing.assert_allclose(sal[looked.frame].sum(axis=(1, 2)), 1.0, atol=5e-3)
    assert (sal[plain.frame] == 0).all() and (sal[annotated.frame[~annotated.has_saliency]] == 0).all()
    crop = data.meta["videos"][0]["crop"]
    for row in looked.itertuples():
        cy, cx = centres[row.source_frame]
        peak = np.unravel_index(np.argmax(sal[row.frame]), (16, 16))
        expected = ((cy - crop["y0"]) / crop["side"] * 16, (cx - crop["x0"]) / crop["side"] * 16)
        assert abs(peak[0] + 0.5 - expected[0]) <= 1.5 and abs(peak[1] + 0.5 - expected[1]) <= 1.5
    assert data.meta["counts"]["frames_with_saliency"] == len(annotated) - 1
    assert data.meta["counts"]["dropped_blank_per_video"] == {"videos/annotated.mp4": 3, "videos/plain.mp4": 0}


def test_simulator_sweeps_are_cropped_inside_the_fan(tmp_path: Path) -> None:
    from sonossl.config import SimulateParams
    from sonossl.data.simulate import simulate
    from sonossl.data.video import read_video

    sim = SimulateParams(videos=2, seconds=2.0, fps=10.0, height=96, beams=64, samples=112, saliency_size=24, workers=1)
    simulate(tmp_path / "raw", sim, progress=False)
    report = preprocess(tmp_path / "raw", tmp_path / "clips", TINY, progress=False)
    assert report.rejects == [] and report.videos == 2
    data = load_clip_dataset(tmp_path / "clips")
    assert data.saliency is not None and data.index.has_saliency.mean() > 0.5
    assert data.index.label.notna().all() and (data.index.label != "").all()  # per-frame plane labels
    for video in data.meta["videos"]:
        crop = video["crop"]
        assert crop["method"] == "sector" and crop["side"] >= 0.4 * video["height"]
        frames, _ = read_video(tmp_path / "raw" / video["path"])
        patch = frames[:, crop["y0"] : crop["y0"] + crop["side"], crop["x0"] : crop["x0"] + crop["side"]]
        # Inside the fan there is speckle everywhere, and nothing static (the overlay text and scale are static).
        assert (patch.max(axis=0) > 0).all()
        assert not ((patch.std(axis=0) == 0) & (patch.max(axis=0) > 100)).any()
        # sector_frames, for frames already in memory (the GPU check), crops and resizes them as preprocess did.
        stored = data.frames[(data.index.video_idx == video["video_idx"]).to_numpy()]
        assert len(stored) == len(frames)  # no blank frame was dropped, so the rows pair one to one
        assert np.abs(clips.sector_frames(frames, TINY.frame_size).astype(int) - stored).max() <= 1


def test_variable_frame_rate_resamples_to_the_nearest_frames(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    times_ms = [0, 40, 60, 200, 210, 500, 530, 900]
    write_vfr_video(root / "vfr.mkv", fan_frames(t=len(times_ms), seed=2).frames, times_ms)
    _labels(root, [{"path": "vfr.mkv"}])
    preprocess(root, tmp_path / "native", TINY, progress=False)
    native = load_clip_dataset(tmp_path / "native")
    np.testing.assert_allclose(native.index.time, np.array(times_ms) / 1000, atol=1e-6)

    preprocess(root, tmp_path / "10fps", replace(TINY, fps=10.0), progress=False)
    data = load_clip_dataset(tmp_path / "10fps")
    times = np.array(times_ms) / 1000
    nearest = [int(np.argmin(np.abs(times - k / 10) + 1e-9 * np.arange(len(times)))) for k in range(10)]
    assert nearest == [0, 2, 3, 4, 5, 5, 6, 6, 7, 7]
    assert data.index.source_frame.tolist() == nearest
    np.testing.assert_allclose(data.index.time, times[nearest], atol=1e-6)
    # A repeated source frame is the same image.
    np.testing.assert_array_equal(data.frames[4], data.frames[5])
    np.testing.assert_array_equal(data.frames[0], native.frames[0])
    assert data.meta["videos"][0]["frames_selected"] == 10


def test_max_frames_caps_each_video(raw: Path, tmp_path: Path) -> None:
    report = preprocess(raw, tmp_path / "clips", replace(TINY, max_frames=5), progress=False)
    data = load_clip_dataset(tmp_path / "clips")
    assert report.frames == 20 and data.index.groupby("video").size().tolist() == [5, 5, 5, 5]
    assert data.index.groupby("video").source_frame.max().tolist() == [4, 4, 4, 4]
    assert all(not v["decoded_to_end"] for v in data.meta["videos"])


def test_same_inputs_and_parameters_give_the_same_dataset(raw: Path, tmp_path: Path) -> None:
    first = preprocess(raw, tmp_path / "one", TINY, progress=False)
    second = preprocess(raw, tmp_path / "two", TINY, progress=False)
    parallel = preprocess(raw, tmp_path / "par", replace(TINY, workers=2), progress=False)
    assert first.version == second.version == parallel.version
    for name in ("frames.npy", "meta.json", "index.parquet"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert (tmp_path / "one" / "frames.npy").read_bytes() == (tmp_path / "par" / "frames.npy").read_bytes()
    pd.testing.assert_frame_equal(load_clip_dataset(tmp_path / "one").index, load_clip_dataset(tmp_path / "par").index)

    # Any change of a parameter or of an input is a new version.
    assert preprocess(raw, tmp_path / "s", replace(TINY, frame_size=24), progress=False).version != first.version
    assert preprocess(raw, tmp_path / "e", replace(TINY, seed=1), progress=False).version != first.version
    _fan_video(raw, "videos/c.mov", seed=11)
    assert preprocess(raw, tmp_path / "c", TINY, progress=False).version != first.version


def test_an_interrupted_run_leaves_nothing_behind(raw: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "clips"
    original = clips._copy_work

    def copy_then_die(*args, **kwargs):
        original(*args, **kwargs)  # frames.npy is half the dataset by now
        raise KeyboardInterrupt

    monkeypatch.setattr(clips, "_copy_work", copy_then_die)
    with pytest.raises(KeyboardInterrupt):
        preprocess(raw, out, TINY, progress=False)
    assert not out.exists() and _no_staging_left(tmp_path)

    # With a complete dataset in place, an interrupted rebuild leaves it untouched.
    monkeypatch.setattr(clips, "_copy_work", original)
    preprocess(raw, out, TINY, progress=False)
    before = _tree_digest(out)
    monkeypatch.setattr(clips, "_copy_work", copy_then_die)
    with pytest.raises(KeyboardInterrupt):
        preprocess(raw, out, replace(TINY, frame_size=24), progress=False)
    assert _tree_digest(out) == before and _no_staging_left(tmp_path)


def test_an_interruption_while_videos_are_decoded(raw: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = clips._process_video

    def die_on_second(task):
        calls.append(task.path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(task)

    monkeypatch.setattr(clips, "_process_video", die_on_second)
    with pytest.raises(KeyboardInterrupt):
        preprocess(raw, tmp_path / "clips", TINY, progress=False)
    assert len(calls) == 2 and not (tmp_path / "clips").exists() and _no_staging_left(tmp_path)


@pytest.mark.parametrize("column, meant", [("Label", "label"), ("labels", "label"), ("patient ID", "patient_id"),
                                           ("Annotation", "annotations"), ("PATH", "path"), ("Strata ", None)])
def test_a_listing_column_written_another_way_is_refused_not_ignored(tmp_path: Path, column, meant, caplog) -> None:
    """Left as an extra column, "Label" would give every video no label, and "patient ID" splits blind to patients;
    a near miss is warned about and kept (an extra column may be called anything: "labeller")."""
    root = tmp_path / "raw"
    _fan_video(root, "videos/a.mp4", seed=0)
    header = ["path", column] if meant != "path" else [column]
    header += [c for c in ("label", "labeller") if c != meant]  # labeller: no warning beside a label column
    (root / "labels.csv").write_text(",".join(header) + "\n" + ",".join(["videos/a.mp4"] + ["x"] * (len(header) - 1))
                                     + "\n")
    if meant is None:
        assert list(read_listing(root).columns) == ["path", "Strata", "label", "labeller"]
        assert "column 'Strata' is kept as an extra column, not read; if it is meant as 'stratum'" in caplog.text
        assert "'labeller'" not in caplog.text
        return
    with pytest.raises(ValueError, match=rf"labels.csv: column '{column.strip()}' is not read; did you mean '{meant}'"):
        read_listing(root)


def test_annotations_of_the_wrong_length_are_refused_when_max_frames_stops_early(tmp_path: Path) -> None:
    """With max_frames the loop stops before the end of the video; the frame count of the annotations is still
    checked against the whole video (annotations made at another frame rate would label the wrong frames)."""
    root = tmp_path / "raw"
    rows = []
    for name, n_labels in [("right", 30), ("double", 60), ("short", 25)]:
        _fan_video(root, f"videos/{name}.mp4", seed=len(rows), t=30)
        save_annotations(root / "ann" / f"{name}.npz", labels=["p"] * n_labels)
        rows.append({"path": f"videos/{name}.mp4", "label": "", "annotations": f"ann/{name}.npz"})
    _labels(root, rows)
    report = preprocess(root, tmp_path / "clips", replace(TINY, max_frames=20, max_reject_fraction=1.0),
                        progress=False)
    assert {r["path"]: r["reason"] for r in report.rejects} == {
        "videos/double.mp4": "annotations ann/double.npz have 60 frames but the video has 30",
        "videos/short.mp4": "annotations ann/short.npz have 25 frames but the video has 30"}
    meta = load_clip_dataset(tmp_path / "clips").meta
    (kept,) = meta["videos"]
    assert kept["frames_kept"] == 20 and not kept["decoded_to_end"]


def test_videos_that_are_symlinks_into_a_cache_preprocess_like_the_files(tmp_path: Path) -> None:
    """DVC's symlink cache (``dvc config cache.type symlink``) makes every file of a dataset a link into
    .dvc/cache: such a dataset gives the same clips and the same version id as the files themselves."""
    root, linked, cache = tmp_path / "raw", tmp_path / "linked", tmp_path / "cache"
    rows = []
    for i in range(3):
        rel = f"videos/v{i}.mp4"
        _fan_video(root, rel, seed=i)
        cache.mkdir(exist_ok=True)
        (cache / f"{i:02x}").write_bytes((root / rel).read_bytes())
        (linked / "videos").mkdir(parents=True, exist_ok=True)
        os.symlink(cache / f"{i:02x}", linked / rel)
        rows.append({"path": rel, "label": "ok", "annotations": ""})
    _labels(root, rows)
    _labels(linked, rows)
    plain = preprocess(root, tmp_path / "plain", TINY, progress=False)
    via_links = preprocess(linked, tmp_path / "via_links", TINY, progress=False)
    assert via_links.rejects == [] and via_links.videos == plain.videos == 3
    version = load_clip_dataset(tmp_path / "plain").meta["version"]
    assert load_clip_dataset(tmp_path / "via_links").meta["version"] == version
    # still refused: a path written to leave the dataset
    _labels(linked, [*rows, {"path": "videos/../../raw/videos/v0.mp4", "label": "ok", "annotations": ""}])
    report = preprocess(linked, tmp_path / "escape", replace(TINY, max_reject_fraction=1.0), progress=False)
    assert [r["reason"] for r in report.rejects] == ["path outside the dataset root"]


def test_the_same_video_under_two_names_is_listed_once(tmp_path: Path) -> None:
    """A copy of a video under another name (or a second symlink to the same cache object) is the same video:
    kept twice it would be trained on twice and could fall in train and test. It is rejected the same way however
    the dataset stores its files."""
    for layout in ("copies", "symlinks"):
        root, cache = tmp_path / layout, tmp_path / f"{layout}-cache"
        _fan_video(cache, "v0.mp4", seed=0)
        _fan_video(root, "videos/other.mp4", seed=1)
        for name in ("a.mp4", "b.mp4"):
            target = root / "videos" / name
            if layout == "copies":
                target.write_bytes((cache / "v0.mp4").read_bytes())
            else:
                os.symlink(cache / "v0.mp4", target)
        _labels(root, [{"path": f"videos/{n}", "label": "ok"} for n in ("a.mp4", "other.mp4", "b.mp4")])
        report = preprocess(root, tmp_path / f"{layout}-clips", replace(TINY, max_reject_fraction=1.0), progress=False)
        assert [(r["path"], r["reason"]) for r in report.rejects] == [
            ("videos/b.mp4", "the same bytes as row 2 (videos/a.mp4): one video under two names")], layout
        assert report.videos == 2


def test_the_output_may_not_replace_or_sit_inside_the_raw_dataset(raw: Path, tmp_path: Path) -> None:
    before = _tree_digest(raw)
    for out, words in [(raw, "would replace the raw dataset"), (raw / ".." / raw.name, "would replace the raw"),
                       (tmp_path, "a folder above it"), (raw / "clips", "is inside the raw dataset")]:
        with pytest.raises(ValueError, match=words) as err:
            preprocess(raw, out, TINY, progress=False)
        assert str(raw) in str(err.value)
    assert _tree_digest(raw) == before  # nothing moved, nothing deleted


def test_listing_and_label_spellings_that_would_mislead(tmp_path: Path, caplog) -> None:
    root = tmp_path / "raw"
    for i in range(3):
        _fan_video(root, f"v{i}.mp4", seed=i)
    # a trailing comma on every row: the columns stay where the header says, not shifted by one
    (root / "labels.csv").write_text("path,label,patient_id\nv0.mp4,covid,p1,\nv1.mp4,regular,p2,\n")
    report = preprocess(root, tmp_path / "comma", TINY, progress=False)
    videos = load_clip_dataset(tmp_path / "comma").meta["videos"]
    assert report.rejects == [] and [(v["path"], v["label"], v["patient_id"]) for v in videos] == [
        ("v0.mp4", "covid", "p1"), ("v1.mp4", "regular", "p2")]
    # more fields than the header, not all empty: a label or patient id would be lost without a word
    for text, line in [("path,label\nv0.mp4,covid,p1\n", 2), ("path,label\nv0.mp4,a\nv1.mp4,head, axial\n", 3)]:
        (root / "labels.csv").write_text(text)
        with pytest.raises(ValueError, match=rf"labels\.csv: not a readable CSV file \(line {line} has 3 fields but "
                                             r"the header names 2 columns \(path, label\); quote a field"):
            preprocess(root, tmp_path / "wide", TINY, progress=False)
    # one class written two ways fails, naming a video of each spelling
    _labels(root, [{"path": "v0.mp4", "label": "covid"}, {"path": "v1.mp4", "label": "Covid"},
                   {"path": "v2.mp4", "label": "regular"}])
    with pytest.raises(PreprocessError, match=r"differ only in case or spaces.*'covid' \(v0.mp4\), 'Covid' \(v1.mp4\)"):
        preprocess(root, tmp_path / "case", TINY, progress=False)
    assert not (tmp_path / "case").exists()
    # a label only like another ("pnuemonia") may be a class of its own: a warning naming both, and the labels of
    # a single video, which can be in one split only
    for i in range(3, 5):
        _fan_video(root, f"v{i}.mp4", seed=i)
    _labels(root, [{"path": "v0.mp4", "label": "pneumonia"}, {"path": "v1.mp4", "label": "pneumonia"},
                   {"path": "v2.mp4", "label": "pnuemonia"}, {"path": "v3.mp4", "label": "regular"},
                   {"path": "v4.mp4", "label": "regular"}])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sonossl.data.clips"):
        preprocess(root, tmp_path / "alike", TINY, progress=False)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"{root}: label 'pnuemonia' (1 video(s), e.g. v2.mp4) is much like 'pneumonia' (2 video(s), e.g. " \
           "v0.mp4)" in " ".join(warned), warned
    assert f"{root}: label 'pnuemonia' has a single video (v2.mp4)" in " ".join(warned), warned
    assert not any("'regular'" in w for w in warned)
    # annotation labels: spaces are stripped, an empty one is a frame without a label, not a class ""
    save_annotations(root / "v0.npz", labels=["a "] * 6 + [""] * 6)
    save_annotations(root / "v1.npz", labels=[["a"] * 12])
    _labels(root, [{"path": "v0.mp4", "annotations": "v0.npz"}, {"path": "v1.mp4", "annotations": "v1.npz"}])
    report = preprocess(root, tmp_path / "ann", replace(TINY, max_reject_fraction=1.0), progress=False)
    assert [r["path"] for r in report.rejects] == ["v1.mp4"]
    assert "'labels' must be one label per frame (a 1-D array), got shape (1, 12)" in report.rejects[0]["reason"]
    index = load_clip_dataset(tmp_path / "ann").index
    assert index.label.tolist() == ["a"] * 6 + [None] * 6


def test_fps_must_be_finite() -> None:
    with pytest.raises(ValueError, match="fps must be a finite number > 0, or null, got inf"):
        clips._check_params(replace(TINY, fps=float("inf")))


_convert = clips._process_video


def _killed_on_b(task):
    """``_process_video``, but its process dies on videos/b.avi (module level: the pool pickles it by name)."""
    import signal

    if task.path == "videos/b.avi":
        os.kill(os.getpid(), signal.SIGKILL)
    return _convert(task)


def test_a_worker_that_dies_rejects_its_video_by_name(raw: Path, tmp_path: Path, monkeypatch) -> None:
    """A worker killed by a signal (FFmpeg crashing on a file, the OOM killer) breaks the process pool: the
    unfinished videos are converted again one process each, the one that kills its process is rejected by name,
    and the rest are kept."""
    monkeypatch.setattr(clips, "_process_video", _killed_on_b)  # the workers are forked: they see it too
    report = preprocess(raw, tmp_path / "clips", replace(TINY, workers=2, max_reject_fraction=0.5), progress=False)
    assert [r["path"] for r in report.rejects] == ["videos/b.avi"]
    assert "the process converting it died" in report.rejects[0]["reason"]
    assert report.videos == 3 and _no_staging_left(tmp_path)
    assert "workers" not in load_clip_dataset(tmp_path / "clips").meta["params"]  # how fast, not what


def test_a_dataset_swapped_out_by_a_killed_run_comes_back(tmp_path: Path) -> None:
    from sonossl.atomic import atomic_dir

    out = tmp_path / "clips"
    with atomic_dir(out) as staging:
        (staging / "meta.json").write_text("first")
    # killed between moving the old one aside and moving the new one in: the old one is back before the next run
    os.replace(out, tmp_path / ".clips.old-12345")
    (tmp_path / ".clips.staging-abc").mkdir()
    with pytest.raises(RuntimeError), atomic_dir(out):
        assert (out / "meta.json").read_text() == "first"
        raise RuntimeError("this run fails too")
    assert (out / "meta.json").read_text() == "first" and _no_staging_left(tmp_path)
    # a half-deleted old one (renamed to trash before its deletion began) never comes back
    shutil.rmtree(out)
    (tmp_path / ".clips.trash-5").mkdir()
    (tmp_path / ".clips.trash-5" / "meta.json").write_text("half gone")
    with atomic_dir(out) as staging:
        (staging / "meta.json").write_text("rebuilt")
    assert (out / "meta.json").read_text() == "rebuilt" and _no_staging_left(tmp_path)
    # a swapped-out copy beside a complete dataset is deleted
    os.symlink(out, tmp_path / ".clips.old-777")
    with atomic_dir(out) as staging:
        (staging / "meta.json").write_text("second")
    assert (out / "meta.json").read_text() == "second" and _no_staging_left(tmp_path)


def test_splits_are_deterministic_proportional_and_never_empty() -> None:
    groups = {f"patient{i}": None for i in range(20)}
    split = SplitParams(train=0.7, val=0.15)
    a = assign_splits(groups, split, seed=0)
    assert a == assign_splits(dict(reversed(list(groups.items()))), split, seed=0)  # order of listing is irrelevant
    assert sorted(Counter(a.values()).items()) == [("test", 3), ("train", 14), ("val", 3)]
    assert assign_splits(groups, split, seed=1) != a
    for n in (3, 4, 5):
        assert set(assign_splits({f"g{i}": None for i in range(n)}, split, seed=0).values()) == {"train", "val", "test"}
    # Stratified by label: each class with 3 or more groups reaches every split.
    labelled = {f"c{i}": "covid" for i in range(7)} | {f"r{i}": "regular" for i in range(30)}
    s = assign_splits(labelled, split, seed=0)
    assert {s[f"c{i}"] for i in range(7)} == {"train", "val", "test"}
    assert all(v == "train" for v in assign_splits({"only": None, "two": None}, split, seed=0).values())
    assert set(assign_splits(groups, SplitParams(train=1.0, val=0.0), seed=0).values()) == {"train"}
    # fractions that sum to 1 in decimal but not in floating point (0.85 + 0.15 leaves 2.8e-17) ask for no test
    # split: none is made, and the frame balance of validation still counts (no division by the remainder)
    for train, val in [(0.85, 0.15), (0.7, 0.3), (0.84, 0.16)]:
        cut = assign_splits(groups, SplitParams(train=train, val=val), seed=0)
        assert set(cut.values()) == {"train", "val"}, (train, val)
        frames = {g: {"a": 10} for g in groups}
        assert split_imbalance(cut, frames, SplitParams(train=train, val=val))[0] < 1


def test_splits_spread_each_class_s_frames_when_frame_counts_are_given() -> None:
    # 12 spine sweeps whose spine frames range from 1 to 40 (the rest background), and 12 head sweeps alike: the
    # stratified cut alone can put the sweeps that barely show their plane into validation.
    rng = np.random.default_rng(3)
    groups, frames = {}, {}
    for plane in ("spine", "head"):
        for i, n in enumerate(rng.permutation([1, 2, 3, 5, 8, 12, 18, 25, 30, 34, 38, 40])):
            groups[f"{plane}{i}"] = plane
            frames[f"{plane}{i}"] = {plane: int(n), "background": 80 - int(n)}
    plain_params, split = SplitParams(train=0.7, val=0.15, balance_tries=1), SplitParams(train=0.7, val=0.15)
    plain = assign_splits(groups, plain_params, seed=0, frames=frames)
    assert plain == assign_splits(groups, split, seed=0)  # without frame counts: the plain cut
    balanced = assign_splits(groups, split, seed=0, frames=frames)
    assert balanced == assign_splits(dict(reversed(list(groups.items()))), split, seed=0, frames=frames)
    # still stratified: the same number of sweeps of each plane in each split as the plain cut
    for plane in ("spine", "head"):
        assert Counter(v for g, v in balanced.items() if g.startswith(plane)) == \
            Counter(v for g, v in plain.items() if g.startswith(plane))
    worst_plain, _ = split_imbalance(plain, frames, split)
    worst, _ = split_imbalance(balanced, frames, split)
    assert worst < worst_plain and worst < 0.35, (worst, worst_plain)
    total = {p: sum(f[p] for f in frames.values() if p in f) for p in ("spine", "head")}
    for which, fraction in (("val", 0.15), ("test", 0.15)):
        for plane in ("spine", "head"):
            got = sum(frames[g][plane] for g, v in balanced.items() if v == which and plane in frames[g])
            assert abs(got / total[plane] - fraction) <= 0.35 * fraction, (which, plane, got, total[plane])
    assert split_imbalance(balanced, frames, SplitParams(train=1.0, val=0.0)) == (0.0, 0.0)  # no val or test


def test_load_clip_dataset_explains_what_is_missing(raw: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="clip dataset not found"):
        load_clip_dataset(tmp_path / "nothing")
    preprocess(raw, tmp_path / "clips", TINY, progress=False)
    (tmp_path / "clips" / "frames.npy").unlink()
    with pytest.raises(FileNotFoundError, match="frames.npy is missing"):
        load_clip_dataset(tmp_path / "clips")


@pytest.mark.slow
def test_all_pocus_videos_preprocess_without_rejects(pocus_dir: Path, tmp_path: Path) -> None:
    params = PreprocessParams(frame_size=48, fps=5.0, workers=2)
    report = preprocess(pocus_dir, tmp_path / "pocus", params, progress=False)
    assert report.rejects == [] and report.videos == 112
    data = load_clip_dataset(tmp_path / "pocus")
    index, meta = data.index, data.meta
    assert index.video.nunique() == 112 and report.frames == len(index) > 112 * 4
    assert set(index.label) == {"covid", "pneumonia", "regular"}
    assert index.groupby("patient_id").split.nunique().max() == 1  # split by patient
    assert meta["counts"]["groups_per_split"]["val"] > 0 and meta["counts"]["groups_per_split"]["test"] > 0
    assert index.groupby("label").split.nunique().min() == 3  # every class in every split (stratified)
    assert all(v["crop"]["method"] == "sector" for v in meta["videos"])
    assert all(v["crop"]["side"] >= 0.35 * min(v["width"], v["height"]) for v in meta["videos"])
    # Time on the 5 fps grid: consecutive kept frames of a video are 0.2 s apart (or a multiple, after a blank).
    gaps = index.groupby("video").time.diff().dropna()
    assert gaps.min() > 0 and 0.17 <= gaps.median() <= 0.23
    assert set(meta["inputs"]) == {"labels.csv", *index.video.unique()}
    frames = np.asarray(data.frames)
    assert 20 < frames.mean() < 120 and frames.reshape(len(frames), -1).std(axis=1).min() >= params.blank_std - 1
