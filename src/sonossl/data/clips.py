"""The preprocess step: a raw dataset folder (videos + ``labels.csv``) becomes a versioned clip dataset.

Every listed video is decoded (PyAV), checked, cropped to a square inside its ultrasound sector (one box per video,
found from its first frames, see ``sonossl.data.sector``), resampled to ``fps`` on the videos' own timestamps when
asked, stripped of blank frames (mean or standard deviation of the resized crop under ``blank_mean`` /
``blank_std``), capped at ``max_frames`` and resized to ``size`` (area average). Per-frame annotations, where the
raw dataset has them, follow the kept frames: their labels replace the video's label, their saliency maps get the
same crop. Videos run in parallel processes. A file that cannot be used is reported with its reason and the rest go
on; the step fails only when nothing usable is left or more than ``max_reject_fraction`` of the listing is unusable.

The clip dataset (written atomically: complete, or absent, or the previous one untouched):
- ``frames.npy``: uint8 (N, size, size), memory-mappable;
- ``index.parquet``: one row per frame: ``frame`` (row in frames.npy), ``video`` (path as listed), ``video_idx``,
  ``time`` (s from the video's first frame), ``source_frame`` (decoded frame index, the row of its annotations),
  ``label``, ``patient_id``, ``split`` (train/val/test, by patient where given, else by video, stratified by the
  main label and spreading each label's frames: ``assign_splits``), ``has_saliency``;
- ``saliency.npy``: float16 (N, s, s), each map summing to 1, zeros where ``has_saliency`` is False; only when some
  video has saliency;
- ``meta.json``: ``format``, ``version`` (a hash of the input hashes and the parameters), ``params``, ``inputs``
  (sha256 of labels.csv, videos and annotation files), ``counts``, ``rejects`` (path, reason), ``videos`` (crop box,
  source size and frame rate, frames decoded / kept / blank, split, extra labels.csv columns). No timestamps or
  absolute paths: the same inputs and parameters give the same bytes, as DVC expects.

    report = preprocess("data/raw/sim", "data/clips/sim", load_params("params.yaml").preprocess)
    data = load_clip_dataset("data/clips/sim")
    data.frames[data.index.frame[data.index.split == "train"]]
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import multiprocessing
import os
import re
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, as_completed, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sonossl.atomic import atomic_dir, atomic_write_text
from sonossl.config import PreprocessParams, SplitParams
from sonossl.data.sector import CropBox
from sonossl.data.video import DecodedFrame

if TYPE_CHECKING:
    import pandas as pd


log = logging.getLogger(__name__)

FORMAT = 1  # layout version of the clip dataset; bump when files or columns change meaning
SPLITS = ("train", "val", "test")
INDEX_COLUMNS = ("frame", "video", "video_idx", "time", "source_frame", "label", "patient_id", "split", "has_saliency")
# The sector is estimated from the video's first frames, up to this much decoded data (at least the whole of a
# typical clip: 190 frames of 500x500), so that memory per worker stays bounded for long recordings.
SECTOR_BUFFER_BYTES = 48 * 2**20
SECTOR_SAMPLE = 48  # frames, evenly spaced over that buffer, that the sector statistic reads
WRITE_BATCH = 64  # resized frames per write to a worker's file
SNAP_LOSS = 0.04  # at most this share of the crop's side is given up to make it a multiple of the output size
SALIENCY_MIN_MASS = 0.05  # share of a frame's gaze that must fall inside the crop for a saliency target
MAX_LISTED_REJECTS = 20  # in error messages and summaries


class PreprocessError(ValueError):
    """The raw dataset cannot give a clip dataset (nothing usable, or too many unusable videos)."""


@dataclass
class PreprocessReport:
    """What ``preprocess`` did; ``summary()`` is the short JSON the CLI prints."""

    version: str
    videos: int
    frames: int
    rejects: list[dict[str, str]]  # {"path", "reason"}, in listing order
    dropped_blank: int
    seconds: float
    out_dir: str = ""

    def summary(self) -> dict[str, Any]:
        listed = self.rejects[:MAX_LISTED_REJECTS]
        out: dict[str, Any] = {
            "out": self.out_dir,
            "version": self.version,
            "videos": self.videos,
            "frames": self.frames,
            "dropped_blank": self.dropped_blank,
            "rejected": len(self.rejects),
            "rejects": listed,
            "seconds": round(self.seconds, 1),
        }
        if len(self.rejects) > len(listed):
            out["rejects_not_shown"] = len(self.rejects) - len(listed)
        return out


@dataclass
class ClipDataset:
    """A clip dataset opened by ``load_clip_dataset``; ``frames[i]`` is the frame of ``index`` row ``i``."""

    path: Path
    frames: np.ndarray  # (N, size, size) uint8, memory-mapped
    index: pd.DataFrame
    saliency: np.ndarray | None  # (N, s, s) float16, memory-mapped
    meta: dict[str, Any]

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def version(self) -> str:
        return self.meta["version"]


# ----------------------------------------------------------------------------------------------- raw dataset listing


@dataclass(frozen=True)
class _Task:
    """One video for a worker (picklable)."""

    idx: int  # row in labels.csv
    path: str  # as listed, relative to the dataset root
    file: str  # absolute
    annotations: str | None  # as listed
    annotations_file: str | None  # absolute
    label: str | None
    params: PreprocessParams
    work_dir: str
    size_bytes: int  # of the video file, to schedule the large ones first


def read_listing(raw_dir: str | Path) -> pd.DataFrame:
    """``labels.csv`` of a raw dataset as strings ("" for empty cells); clear errors when it or ``path`` is missing."""
    import pandas as pd

    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise FileNotFoundError(f"{raw_dir}: raw dataset folder not found")
    csv = raw_dir / "labels.csv"
    if not csv.is_file():
        raise FileNotFoundError(
            f"{csv}: not found; a raw dataset needs a labels.csv with a 'path' column (video paths relative to "
            f"{raw_dir}) and optionally 'label', 'patient_id', 'annotations'"
        )
    try:
        _check_row_widths(csv)
        # index_col=False: a trailing comma on every row must not turn the first column into the index
        listing = pd.read_csv(csv, dtype=str, keep_default_na=False, na_values=[], skipinitialspace=True,
                              index_col=False)
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ValueError(f"{csv}: not a readable CSV file ({e})") from None
    listing.columns = [str(c).strip() for c in listing.columns]
    _check_column_names(csv, list(listing.columns))
    if "path" not in listing.columns:
        raise ValueError(
            f"{csv}: no 'path' column (columns found: {list(listing.columns)}); add one with each video's path "
            f"relative to {raw_dir}"
        )
    return listing.map(str.strip)


def _check_row_widths(csv_path: Path) -> None:
    """A row with more fields than the header is refused, naming its line, unless the extra fields are empty (a
    trailing comma): pandas would drop them with a warning, or shift every column by one, and a label or a
    patient id would be lost without a word (an unquoted comma inside a label, a header missing a column)."""
    import csv

    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = csv.reader(f, skipinitialspace=True)
        header = next(rows, [])
        for row in rows:
            extra = row[len(header):]
            if any(field.strip() for field in extra):
                raise ValueError(f"line {rows.line_num} has {len(row)} fields but the header names {len(header)} "
                                 f"columns ({', '.join(header)}); quote a field that holds a comma, or add the "
                                 "missing column to the header")


LISTING_COLUMNS = ("path", "label", "patient_id", "annotations", "stratum")  # read by preprocess; others are kept


def _column_key(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name.lower()).rstrip("s")


def _check_column_names(csv: Path, columns: list[str]) -> None:
    """A column that is one of ``LISTING_COLUMNS`` written another way (``Label``, ``patient ID``, ``labels``,
    ``annotation``) fails, naming it: left as an extra column it would be ignored, and the videos would have no
    label, splits would ignore patients, annotations would go unread. A near miss (``patient``) is only warned
    about, since an extra column may be named anything (``labeller``)."""
    import difflib

    keys = {_column_key(c): c for c in LISTING_COLUMNS}
    for column in columns:
        if column in LISTING_COLUMNS:
            continue
        meant = keys.get(_column_key(column))
        if meant is not None and meant not in columns:
            raise ValueError(f"{csv}: column {column!r} is not read; did you mean {meant!r}? (the columns "
                             f"preprocess reads are {', '.join(LISTING_COLUMNS)}; rename it)")
        close = difflib.get_close_matches(column.lower(), [c for c in LISTING_COLUMNS if c not in columns], n=1,
                                          cutoff=0.75)
        if close:
            log.warning("%s: column %r is kept as an extra column, not read; if it is meant as %r, rename it",
                        csv, column, close[0])


def _inside(root: Path, rel: str) -> tuple[Path | None, str | None]:
    """Resolve ``rel`` under ``root``; (path, None) or (None, reason) when it is empty, absolute or escapes.

    The path as written must stay in the dataset ("../x.mp4" does not); a symlink in it may point anywhere, as
    DVC's symlink cache (``cache.type symlink``) points every file of a dataset into ``.dvc/cache``. What the
    version id hashes is the file's content, wherever it lives."""
    if not rel:
        return None, "empty path"
    if Path(rel).is_absolute():
        return None, "absolute path; paths must be relative to the dataset root"
    written = Path(os.path.normpath(root / rel))
    if not written.is_relative_to(root):
        return None, "path outside the dataset root"
    return written.resolve(), None


def _plan(raw_dir: Path, listing: pd.DataFrame, params: PreprocessParams, work_dir: Path,
          hashes: Mapping[str, str] | None = None):
    """Tasks for the workers and the rejects that need no decoding (bad paths, missing files, duplicates).

    A video listed twice is one whose bytes are those of an earlier row (``hashes``: ``_input_hashes``, by path as
    written), whatever its name or wherever a symlink points: the same video under two names would be trained on
    twice and could land in two splits. A file that could not be hashed is compared by its resolved path."""
    root = raw_dir.resolve()
    hashes = hashes or {}
    tasks: list[_Task] = []
    rejects: dict[int, str] = {}
    seen: dict[str | Path, int] = {}
    has_ann = "annotations" in listing.columns
    has_label = "label" in listing.columns
    for idx, row in enumerate(listing.itertuples(index=False)):
        rel = row.path
        file, reason = _inside(root, rel)
        if reason == "empty path":  # no name to report it by: the row says which
            reason = f"empty path in labels.csv row {idx + 2}"
        if reason is None and not file.exists():
            reason = "file not found"
        if reason is None and not file.is_file():
            reason = "not a file"
        key = hashes.get(rel, file)
        if reason is None and key in seen:
            first, first_rel = seen[key], listing.path.iloc[seen[key]]
            reason = (f"listed twice in labels.csv: the same file as row {first + 2} ({first_rel})"
                      if os.path.normpath(rel) == os.path.normpath(first_rel) else
                      f"the same bytes as row {first + 2} ({first_rel}): one video under two names")
        ann_rel = getattr(row, "annotations", "") if has_ann else ""
        ann_file = None
        if reason is None and ann_rel:
            ann_file, why = _inside(root, ann_rel)
            if why is None and not ann_file.is_file():
                why = "file not found"
            if why is not None:
                reason = f"annotations {ann_rel}: {why}"
        if reason is not None:
            rejects[idx] = reason
            continue
        seen[key] = idx
        label = getattr(row, "label", "") if has_label else ""
        tasks.append(
            _Task(
                idx=idx,
                path=rel,
                file=str(file),
                annotations=ann_rel or None,
                annotations_file=str(ann_file) if ann_file else None,
                label=label or None,
                params=params,
                work_dir=str(work_dir),
                size_bytes=file.stat().st_size,
            )
        )
    return tasks, rejects


def _sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _input_hashes(root: Path, listing: pd.DataFrame) -> dict[str, str]:
    """sha256 of labels.csv and of every listed file that exists inside the root (rejected ones too: they are inputs)."""
    hashes = {"labels.csv": _sha256(root / "labels.csv")}
    resolved_root = root.resolve()
    columns = [c for c in ("path", "annotations") if c in listing.columns]
    for col in columns:
        for rel in listing[col]:
            file, reason = _inside(resolved_root, rel)
            if reason is None and file.is_file() and rel not in hashes:
                with contextlib.suppress(OSError):  # unreadable: the worker reports it
                    hashes[rel] = _sha256(file)
    return dict(sorted(hashes.items()))


# ------------------------------------------------------------------------------------------------- one video


@dataclass
class _VideoResult:
    idx: int
    reason: str | None = None
    frames: int = 0
    times: list[float] = field(default_factory=list)
    source: list[int] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)
    has_saliency: list[bool] = field(default_factory=list)
    saliency: bool = False
    info: dict[str, Any] = field(default_factory=dict)


def _work_files(task: _Task) -> tuple[Path, Path]:
    base = Path(task.work_dir) / f"{task.idx:07d}"
    return base.with_suffix(".frames"), base.with_suffix(".saliency")


def _resample(frames: Iterator[DecodedFrame], fps: float | None) -> Iterator[DecodedFrame]:
    """Frames nearest to the times 0, 1/fps, 2/fps, ... (up to the last frame), from their own timestamps.

    Streams: each frame is compared with the one before it, so nothing but two frames is held. A source slower
    than ``fps`` repeats frames; ties go to the earlier frame.
    """
    if fps is None:
        yield from frames
        return
    step = 1.0 / fps
    k = 0
    prev = None
    for frame in frames:
        while k * step <= frame.time + 1e-9:
            target = k * step
            yield prev if prev is not None and target - prev.time <= frame.time - target else frame
            k += 1
        prev = frame


_head_store = np.empty(0, dtype=np.uint8)  # per process, reused by every video (see _buffer_head)


def head_frames(height: int, width: int) -> int:
    """How many first frames of a video of that frame size the sector is found from: up to SECTOR_BUFFER_BYTES,
    at least 2 (``_buffer_head``; the server's ``sonossl.serve.frames.video_head`` holds the same)."""
    return max(2, SECTOR_BUFFER_BYTES // (height * width))


def _buffer_head(frames: Iterator[DecodedFrame]) -> list[DecodedFrame]:
    """The first frames of a video, up to SECTOR_BUFFER_BYTES, copied into one array that each process reuses.

    The sector is known only after these frames are seen, so they are held; holding the decoder's own frames (or
    fresh copies) would make every frame a new allocation, and page faults then cost more than the decoding.
    """
    from sonossl.data.video import VideoError

    global _head_store
    head: list[DecodedFrame] = []
    store = None
    for frame in frames:
        if store is None:
            h, w = frame.levels.shape
            capacity = head_frames(h, w)
            if _head_store.size < capacity * h * w:
                _head_store = np.empty(capacity * h * w, dtype=np.uint8)
            store = _head_store[: capacity * h * w].reshape(capacity, h, w)
        if frame.levels.shape != store.shape[1:]:
            h, w = frame.levels.shape
            raise VideoError("", f"frame size changes mid-video ({store.shape[2]}x{store.shape[1]} -> {w}x{h})")
        slot = store[len(head)]
        np.copyto(slot, frame.levels)
        head.append(DecodedFrame(index=frame.index, time=frame.time, levels=slot, lut=frame.lut))
        if len(head) == len(store):
            break
    if not head:  # iter_frames raises on a file without frames; kept for safety
        raise VideoError("", "no decodable frames")
    return head


def _release_head_store() -> None:
    global _head_store
    _head_store = np.empty(0, dtype=np.uint8)


def _resize(image: np.ndarray, size: int, box: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """Area-average (when shrinking) or bilinear (when enlarging) resize of a float32 ``image`` (or of its ``box``,
    in pixels, fractions allowed) to size x size."""
    from PIL import Image

    width = (box[2] - box[0]) if box is not None else image.shape[1]
    resample = Image.Resampling.BOX if width >= size else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(image).resize((size, size), resample, box=box))


def _snap_crop(crop: CropBox, size: int) -> CropBox:
    """Shrink the crop (about its centre) to a whole multiple of the output size when that costs at most
    SNAP_LOSS of its side: the resize is then an integer box reduction, a third of the cost of a fractional one
    (after decoding, resizing is most of the work). A smaller square inside the sector stays inside it."""
    whole = crop.side // size * size
    if whole == 0 or crop.side - whole > SNAP_LOSS * crop.side:
        return crop
    shift = (crop.side - whole) // 2
    return dataclasses.replace(crop, x0=crop.x0 + shift, y0=crop.y0 + shift, side=whole)


def _frame_crop(frame: DecodedFrame, crop: CropBox, size: int) -> np.ndarray:
    """The crop of a frame resized to size x size, in grey levels (uint8).

    The crop is resized from the stored levels and mapped to grey afterwards: the map is linear between its
    clipping points, so this matches mapping first (within a grey level) on far fewer pixels.
    """
    from PIL import Image

    patch = frame.levels[crop.y0 : crop.y0 + crop.side, crop.x0 : crop.x0 + crop.side]
    image = Image.fromarray(np.ascontiguousarray(patch))
    if crop.side % size == 0:
        if crop.side > size:
            image = image.reduce(crop.side // size)
    elif crop.side > size:
        # An integer box reduction first, then a box resize of the remainder: still an area average.
        image = image.resize((size, size), Image.Resampling.BOX, reducing_gap=1.0)
    else:
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    small = np.frombuffer(image.tobytes(), dtype=np.uint8).reshape(size, size)
    # numpy indexing, not PIL's point(): point() rebuilds its table from a Python list on every call.
    return small if frame.lut is None else frame.lut[small]


def sector_frames(frames: np.ndarray, size: int) -> np.ndarray:
    """One video's grey frames (T, H, W) uint8 as preprocess crops them: to the square inside the scan sector (found
    from SECTOR_SAMPLE frames spread over them, snapped to a whole multiple of ``size`` where that is cheap) and
    resized to (T, size, size) uint8. For frames already in memory (benchmarks): no decoding, resampling or
    blank-frame filtering."""
    head = [DecodedFrame(i, 0.0, f) for i, f in enumerate(frames)]
    crop = _snap_crop(_video_crop(head), size)
    return np.stack([_frame_crop(f, crop, size) for f in head])


def _is_blank(small: np.ndarray, params: PreprocessParams) -> bool:
    """Mean or standard deviation of the crop's grey levels (at output resolution) below the blank thresholds;
    sums and one BLAS dot, since numpy.mean/std cost more than the arithmetic on every frame."""
    v = small.astype(np.float32).ravel()
    mean = float(np.add.reduce(v)) / v.size
    var = max(0.0, float(np.dot(v, v)) / v.size - mean * mean)
    return mean < params.blank_mean or var**0.5 < params.blank_std


def _crop_saliency(saliency: np.ndarray, crop, frame_shape: tuple[int, int], size: int) -> np.ndarray | None:
    """A whole-frame saliency map (h, w) cut to the crop box (scaled to the map's grid), resized and renormalised
    to sum 1; None when (almost) none of the gaze falls inside the crop: renormalising a stray tail would make a
    confident target out of nothing."""
    h, w = frame_shape
    mh, mw = saliency.shape
    sx, sy = mw / w, mh / h
    box = (crop.x0 * sx, crop.y0 * sy, (crop.x0 + crop.side) * sx, (crop.y0 + crop.side) * sy)
    whole = np.ascontiguousarray(saliency, dtype=np.float32)
    out = _resize(whole, size, box=box).astype(np.float64)
    np.clip(out, 0.0, None, out=out)
    total = out.sum()
    # Each output pixel averages (box area / size^2) map pixels, so this is the gaze mass inside the crop.
    inside = total * (box[2] - box[0]) * (box[3] - box[1]) / size**2
    if not np.isfinite(total) or total <= 0 or inside < SALIENCY_MIN_MASS * float(np.clip(whole, 0, None).sum()):
        return None
    return out / total


def _load_task_annotations(task: _Task):
    """The video's annotations, or None; VideoError (the video is unusable) when they cannot be read."""
    from sonossl.data.annotations import load_annotations
    from sonossl.data.video import VideoError

    if not task.annotations_file:
        return None
    try:
        return load_annotations(task.annotations_file)
    except ValueError as e:
        detail = str(e).removeprefix(f"{task.annotations_file}: ")
        raise VideoError(task.file, f"annotations {task.annotations}: {detail}") from None


def _video_crop(head: list[DecodedFrame]):
    """The crop box of a video from SECTOR_SAMPLE frames spread over its buffered first frames."""
    from sonossl.data.sector import detect_crop

    pick = np.unique(np.linspace(0, len(head) - 1, min(SECTOR_SAMPLE, len(head))).round().astype(int))
    if len({id(head[i].lut) for i in pick}) == 1:  # one level map for the whole video (always, in practice)
        return detect_crop([head[i].levels for i in pick], lut=head[pick[0]].lut)
    return detect_crop([head[i].image for i in pick])


def _process_video(task: _Task) -> _VideoResult:
    """Decode, crop, clean and resize one video into work files; a reason instead when it is unusable."""
    from sonossl.data.video import VideoError

    try:
        return _convert_video(task)
    except VideoError as e:
        return _VideoResult(idx=task.idx, reason=e.reason)
    except Exception as e:  # noqa: BLE001 - one bad file must never stop the others
        log.exception("unexpected error on %s", task.path)
        return _VideoResult(idx=task.idx, reason=f"unexpected error: {type(e).__name__}: {e}")


def _convert_video(task: _Task) -> _VideoResult:
    from sonossl.data.video import VideoError, open_video

    params = task.params
    annotations = _load_task_annotations(task)
    use_saliency = annotations is not None and annotations.saliency is not None
    result = _VideoResult(idx=task.idx, saliency=use_saliency)
    frames_path, saliency_path = _work_files(task)
    with contextlib.ExitStack() as stack:
        video = stack.enter_context(open_video(task.file))
        frames = video.frames()
        stack.callback(frames.close)  # stops decoding when max_frames ends the loop early
        head = _buffer_head(frames)
        height, width = head[0].levels.shape
        crop = _snap_crop(_video_crop(head), params.frame_size)
        out = stack.enter_context(open(frames_path, "wb"))
        saliency_out = stack.enter_context(open(saliency_path, "wb")) if use_saliency else None
        zeros = np.zeros((params.saliency_size,) * 2, dtype=np.float16)

        decoded, last_time = len(head), head[-1].time

        def rest() -> Iterator[DecodedFrame]:
            nonlocal decoded, last_time
            for f in frames:
                decoded, last_time = f.index + 1, f.time
                yield f

        selected = blank = 0
        complete = True
        pending: list[bytes] = []  # resized frames not yet written
        stream = itertools.chain(head, rest())
        for frame in _resample(stream, params.fps):
            if frame.levels.shape != (height, width):
                h, w = frame.levels.shape
                raise VideoError(task.file, f"frame size changes mid-video ({width}x{height} -> {w}x{h})")
            selected += 1
            small = _frame_crop(frame, crop, params.frame_size)
            if _is_blank(small, params):
                blank += 1
                continue
            if annotations is not None and frame.index >= len(annotations):
                for _ in stream:  # count the rest, for a message that says how many frames there are
                    pass
                raise VideoError(
                    task.file, f"annotations {task.annotations} have {len(annotations)} frames but the video has {decoded}"
                )
            pending.append(small.tobytes())
            if len(pending) == WRITE_BATCH:
                out.write(b"".join(pending))
                pending.clear()
            result.times.append(round(frame.time, 6))
            result.source.append(frame.index)
            label = str(annotations.labels[frame.index]) or None if annotations is not None else task.label
            result.labels.append(label)
            if saliency_out is not None:
                target = _crop_saliency(annotations.saliency[frame.index], crop, (height, width), params.saliency_size)
                result.has_saliency.append(target is not None)
                saliency_out.write((zeros if target is None else target.astype(np.float16)).tobytes())
            else:
                result.has_saliency.append(False)
            if params.max_frames is not None and len(result.source) >= params.max_frames:
                complete = False
                break
        if not complete and annotations is not None:
            # the cap ended the loop early: count the rest (decoded, not resized) so that annotations made for
            # another frame count (another frame rate, a few frames off) are refused all the same
            total = decoded
            for f in frames:
                total = f.index + 1
            if total != len(annotations):
                raise VideoError(task.file, f"annotations {task.annotations} have {len(annotations)} frames but "
                                            f"the video has {total}")
        out.write(b"".join(pending))

    kept = len(result.source)
    if complete and annotations is not None and len(annotations) != decoded:
        raise VideoError(
            task.file, f"annotations {task.annotations} have {len(annotations)} frames but the video has {decoded}"
        )
    if kept < 2:
        if decoded == 1:
            raise VideoError(task.file, "a single frame (a still image?); need at least 2 frames")
        raise VideoError(
            task.file, f"only {kept} usable frame(s): {blank} of {selected} frames are blank; need at least 2"
        )
    info = video.info
    result.frames = kept
    result.info = {
        "path": task.path,
        "container": info.container,
        "codec": info.codec,
        "width": width,
        "height": height,
        "fps": round(info.fps, 6) if info.fps else None,
        "duration": round(last_time, 6),
        "crop": crop.as_dict(),
        "frames_decoded": decoded,
        "frames_selected": selected,
        "frames_blank": blank,
        "frames_kept": kept,
        "decoded_to_end": complete,
    }
    return result


def _cleanup(task: _Task) -> None:
    for path in _work_files(task):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def start_method() -> str:
    """How preprocess starts its worker processes (benchmarks that render or decode in parallel do the same)."""
    # fork: no re-import of the caller's main module (a plain script without a __main__ guard works) and no
    # start-up cost. Workers are forked before the progress bar exists, so no helper thread is copied mid-lock.
    return "fork" if sys.platform.startswith("linux") else "spawn"


def _run(tasks: list[_Task], workers: int, progress: bool) -> dict[int, _VideoResult]:
    """Process all tasks, in parallel processes when ``workers`` > 1; results keyed by listing row."""
    from tqdm import tqdm

    class Bar(tqdm):
        monitor_interval = 0  # no monitor thread: it would be running when workers fork on a later call

    n = min(workers or os.cpu_count() or 1, len(tasks))
    results: dict[int, _VideoResult] = {}
    # Largest files first: the long videos start early and do not leave one worker running alone at the end.
    order = sorted(tasks, key=lambda t: (-t.size_bytes, t.idx))

    def bar() -> tqdm:
        return Bar(total=len(tasks), desc="preprocess", unit="video", disable=not progress, file=sys.stderr)

    totals = Counter()

    def done(result: _VideoResult, progress_bar: tqdm) -> None:
        results[result.idx] = result
        totals["frames"] += result.frames
        totals["rejected"] += result.reason is not None
        progress_bar.set_postfix(frames=totals["frames"], rejected=totals["rejected"], refresh=False)
        progress_bar.update()

    if n <= 1:
        try:
            with bar() as progress_bar:
                for task in order:
                    done(_process_video(task), progress_bar)
        finally:
            _release_head_store()  # this is the caller's process: give the memory back
        return results
    context = multiprocessing.get_context(start_method())
    pool = ProcessPoolExecutor(max_workers=n, mp_context=context)
    try:
        futures = [pool.submit(_process_video, task) for task in order]
        with bar() as progress_bar:
            try:
                for future in as_completed(futures):
                    done(future.result(), progress_bar)
            except BrokenProcessPool:
                # A worker was killed (FFmpeg crashed on a file, or the kernel's OOM killer): every unfinished video
                # fails with it, and which one did it is not known. Convert those again, each in a process of its
                # own (still n at a time), so that the culprit is rejected by name and the others are kept.
                pool.shutdown(wait=True, cancel_futures=True)
                rest = [task for task in order if task.idx not in results]
                log.warning("a preprocess worker died; converting the %d unfinished videos one process each to find "
                            "which one killed it", len(rest))
                for result in _isolated(rest, n, context):
                    done(result, progress_bar)
    except BaseException:
        # Interrupted (Ctrl-C) or failed: drop queued videos and wait for running ones, so that no worker writes
        # into the staging folder after it is removed.
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return results


WORKER_DIED = ("the process converting it died (FFmpeg crashed on it, or the process ran out of memory); check the "
               "file with ffprobe, or re-encode it")


def _isolated(tasks: list[_Task], n: int, context) -> Iterator[_VideoResult]:
    """``_process_video`` for each task in a process of its own, ``n`` at a time (each process started from this
    thread); a task whose process dies gets ``WORKER_DIED``, the others their results, as they finish."""
    queue, running = list(tasks), {}
    try:
        while queue or running:
            while queue and len(running) < n:
                task = queue.pop(0)
                pool = ProcessPoolExecutor(max_workers=1, mp_context=context)
                running[pool.submit(_process_video, task)] = (task, pool)
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                task, pool = running.pop(future)
                pool.shutdown(wait=True)
                try:
                    yield future.result()
                except BrokenProcessPool:
                    yield _VideoResult(idx=task.idx, reason=WORKER_DIED)
    finally:
        for _, pool in running.values():
            pool.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------------------------------------- splits


def _unit_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def assign_splits(groups: Mapping[str, str | None], split: SplitParams, seed: int,
                  frames: Mapping[str, Mapping[str, int]] | None = None) -> dict[str, str]:
    """Assign each group (patient, or video) to train/val/test, deterministically from ``seed`` and the group ids.

    ``groups`` maps group id -> stratum (the videos' label, or None). Within a stratum, groups are ordered by a hash
    of (seed, group id) and cut by the fractions (val = ``split.val``, test = the rest after ``split.train``), so
    each class is spread over the splits; strata with fewer than 3 groups are pooled. With 3 or more groups, every
    split whose fraction is above 0 gets at least one.

    ``frames`` (group -> label -> labelled frames) adds a second aim: a group's stratum is its main label, but its
    frames of each label can be few or many (a spine sweep may show the spine in 2 frames or in 40), so the cut can
    leave a class with almost no frames in validation. Then ``split.balance_tries`` cuts are drawn (the hash salted
    0, 1, ...; salt 0 is the plain cut) and the one whose per-class frame shares in val and test are nearest their
    fractions is kept (``split_imbalance``; ties: the lowest salt). Every cut still stratifies as above.
    """
    if not frames or split.balance_tries <= 1:
        return _stratified_cut(groups, split, seed, 0)
    cuts = (_stratified_cut(groups, split, seed, salt) for salt in range(split.balance_tries))
    return min(cuts, key=lambda cut: split_imbalance(cut, frames, split))  # min keeps the first: the lowest salt


def fraction_for_test(split: SplitParams) -> float:
    """What ``train`` and ``val`` leave to test. A sum of 1 in decimal is not always 1 in floating point (0.85 +
    0.15 leaves 2.8e-17): a remainder below 1e-9 is none, or every stratum would put one group in a test split
    nobody asked for."""
    rest = 1.0 - split.train - split.val
    return rest if rest > 1e-9 else 0.0


def split_imbalance(assignment: Mapping[str, str], frames: Mapping[str, Mapping[str, int]],
                    split: SplitParams) -> tuple[float, float]:
    """(worst, mean) relative gap between a class's share of frames in val (and test) and that split's fraction,
    over the labels and the splits whose fraction is above 0; 0 is a perfect spread."""
    fractions = {"val": split.val, "test": fraction_for_test(split)}
    totals: Counter = Counter()
    per_split: dict[str, Counter] = {s: Counter() for s in fractions}
    for group, counts in frames.items():
        totals.update(counts)
        if assignment.get(group) in per_split:
            per_split[assignment[group]].update(counts)
    gaps = [abs(per_split[s][label] / n - f) / f for s, f in fractions.items() if f > 0
            for label, n in totals.items() if n > 0]
    return (max(gaps), sum(gaps) / len(gaps)) if gaps else (0.0, 0.0)


def _stratified_cut(groups: Mapping[str, str | None], split: SplitParams, seed: int, salt: int) -> dict[str, str]:
    test = fraction_for_test(split)
    strata: dict[str | None, list[str]] = {}
    for group, stratum in groups.items():
        strata.setdefault(stratum, []).append(group)
    blocks = [m for _, m in sorted(strata.items(), key=lambda kv: (kv[0] is None, kv[0] or "")) if len(m) >= 3]
    pooled = [g for m in strata.values() if len(m) < 3 for g in m]
    if pooled:
        blocks.append(pooled)
    key = f"{seed}:" if salt == 0 else f"{seed}:{salt}:"  # salt 0: the cut of earlier versions
    out: dict[str, str] = {}
    for members in blocks:
        ordered = sorted(members, key=lambda g: (_unit_hash(key + g), g))
        n = len(ordered)
        n_val, n_test = round(split.val * n), round(test * n)
        reserved = 0  # groups that must stay in train
        if n >= 3:
            n_val = max(n_val, 1) if split.val > 0 else n_val
            n_test = max(n_test, 1) if test > 0 else n_test
            reserved = 1 if split.train > 0 else 0
        while n_val + n_test > n - reserved:  # rounding up took too many: give back from the larger
            if n_val >= n_test:
                n_val -= 1
            else:
                n_test -= 1
        n_train = n - n_val - n_test
        for i, group in enumerate(ordered):
            out[group] = "train" if i < n_train else "val" if i < n_train + n_val else "test"
    return out


# ------------------------------------------------------------------------------------------------- the step


def _check_params(params: PreprocessParams) -> None:
    problems = []
    if params.frame_size < 2:
        problems.append(f"frame_size must be >= 2, got {params.frame_size}")
    if params.saliency_size < 1:
        problems.append(f"saliency_size must be >= 1, got {params.saliency_size}")
    if params.fps is not None and not (params.fps > 0 and math.isfinite(params.fps)):
        problems.append(f"fps must be a finite number > 0, or null, got {params.fps}")
    if params.max_frames is not None and params.max_frames < 2:
        problems.append(f"max_frames must be >= 2 or null, got {params.max_frames}")
    if not 0.0 <= params.max_reject_fraction <= 1.0:
        problems.append(f"max_reject_fraction must be within [0, 1], got {params.max_reject_fraction}")
    if params.workers < 0:
        problems.append(f"workers must be >= 0 (0 = one per core), got {params.workers}")
    s = params.split
    if s.train < 0 or s.val < 0 or s.train + s.val > 1.0 + 1e-9:
        problems.append(f"split.train and split.val must be >= 0 with a sum <= 1, got {s.train} and {s.val}")
    if s.balance_tries < 1:
        problems.append(f"split.balance_tries must be >= 1 (1 = the plain stratified cut), got {s.balance_tries}")
    if problems:
        raise ValueError("preprocess parameters: " + "; ".join(problems))


def _version(params: PreprocessParams, inputs: Mapping[str, str]) -> str:
    # workers changes how fast, never what is written, so it does not make a new version.
    settings = {k: v for k, v in asdict(params).items() if k != "workers"}
    doc = json.dumps({"format": FORMAT, "params": settings, "inputs": dict(inputs)}, sort_keys=True)
    return hashlib.sha256(doc.encode("utf-8")).hexdigest()[:12]


def _reject_list(rejects: Mapping[int, str], listing: pd.DataFrame) -> list[dict[str, str]]:
    return [{"path": listing.path.iloc[i], "reason": rejects[i]} for i in sorted(rejects)]


def _describe_rejects(rejects: list[dict[str, str]]) -> str:
    lines = [f"  {r['path'] or '(empty)'}: {r['reason']}" for r in rejects[:MAX_LISTED_REJECTS]]
    if len(rejects) > MAX_LISTED_REJECTS:
        lines.append(f"  ... and {len(rejects) - MAX_LISTED_REJECTS} more")
    return "\n".join(lines)


def _append_file(src: Path, dst, offset: int) -> None:
    """Copy all of ``src`` into the open file ``dst`` at byte ``offset`` (in the kernel where it can)."""
    size = src.stat().st_size
    with open(src, "rb") as f:
        done = 0
        if hasattr(os, "copy_file_range"):
            with contextlib.suppress(OSError):
                while done < size:
                    n = os.copy_file_range(f.fileno(), dst.fileno(), size - done, done, offset + done)
                    if n == 0:
                        break
                    done += n
        f.seek(done)
        dst.seek(offset + done)
        shutil.copyfileobj(f, dst, 1 << 20)


def _copy_work(staging: Path, kept: list[_Task], results: Mapping[int, _VideoResult], params: PreprocessParams):
    """Concatenate the workers' per-video files into frames.npy (and saliency.npy): ``open_memmap`` writes the
    header and sizes the file, the data are copied file to file, never held in memory."""
    from numpy.lib.format import open_memmap

    total = sum(results[t.idx].frames for t in kept)
    any_saliency = any(results[t.idx].saliency for t in kept)
    outputs = [("frames.npy", np.uint8, params.frame_size, 0)]
    if any_saliency:
        outputs.append(("saliency.npy", np.float16, params.saliency_size, 1))
    for name, dtype, side, which in outputs:
        array = open_memmap(staging / name, mode="w+", dtype=dtype, shape=(total, side, side))
        header, frame_bytes = array.offset, array.itemsize * side * side
        del array
        with open(staging / name, "r+b") as out:
            offset = 0
            for task in kept:
                result = results[task.idx]
                if which == 0 or result.saliency:  # videos without saliency keep the zeros the file starts with
                    _append_file(_work_files(task)[which], out, header + offset * frame_bytes)
                offset += result.frames
            out.flush()
            os.fsync(out.fileno())
    for task in kept:
        _cleanup(task)
    return total, any_saliency


def _video_splits(kept: list[_Task], results: Mapping[int, _VideoResult], listing: pd.DataFrame,
                  params: PreprocessParams) -> tuple[dict, dict]:
    """(patient_id or None, split) per listing row of the kept videos; groups are patients, else videos."""
    patients = listing["patient_id"] if "patient_id" in listing.columns else None
    patient_of = {t.idx: (patients.iloc[t.idx] or None) if patients is not None else None for t in kept}
    group_of = {t.idx: patient_of[t.idx] or t.path for t in kept}
    # The stratum of a video: the listing's optional `stratum` column (for instance the simulator's main standard
    # plane of a sweep, so that every plane reaches validation and test), else its label.
    given = listing["stratum"] if "stratum" in listing.columns else None
    # Per group: its videos' strata, and its labelled frames per label (so that the cut also spreads each class's
    # frames: assign_splits).
    labels: dict[str, Counter] = {}
    frames: dict[str, Counter] = {}
    for t in kept:
        stratum = (given.iloc[t.idx] or None) if given is not None else None
        labels.setdefault(group_of[t.idx], Counter())[stratum or t.label] += 1
        frames.setdefault(group_of[t.idx], Counter()).update(lab for lab in results[t.idx].labels if lab is not None)
    # A group's stratum is its videos' most common one (ties: the first in sorted order).
    strata = {g: min(c.items(), key=lambda kv: (-kv[1], kv[0] is None, kv[0] or ""))[0] for g, c in labels.items()}
    split_of = assign_splits(strata, params.split, params.seed, frames if any(frames.values()) else None)
    return patient_of, {i: split_of[g] for i, g in group_of.items()}


def _index(kept: list[_Task], results: Mapping[int, _VideoResult], patient_of: dict, split_of: dict) -> pd.DataFrame:
    import pandas as pd

    def per_frame(values_of) -> list:
        return [v for t in kept for v in values_of(t, results[t.idx])]

    frames = sum(results[t.idx].frames for t in kept)
    return pd.DataFrame(
        {
            "frame": np.arange(frames, dtype=np.int64),
            "video": pd.Series(per_frame(lambda t, r: [t.path] * r.frames), dtype=object),
            "video_idx": np.repeat(np.arange(len(kept), dtype=np.int32), [results[t.idx].frames for t in kept]),
            "time": np.asarray(per_frame(lambda t, r: r.times), dtype=np.float64),
            "source_frame": np.asarray(per_frame(lambda t, r: r.source), dtype=np.int32),
            "label": pd.Series(per_frame(lambda t, r: r.labels), dtype=object),
            "patient_id": pd.Series(per_frame(lambda t, r: [patient_of[t.idx]] * r.frames), dtype=object),
            "split": pd.Series(per_frame(lambda t, r: [split_of[t.idx]] * r.frames), dtype=object),
            "has_saliency": np.asarray(per_frame(lambda t, r: r.has_saliency), dtype=bool),
        },
        columns=list(INDEX_COLUMNS),
    )


def _meta(
    params: PreprocessParams,
    version: str,
    inputs: dict[str, str],
    listing: pd.DataFrame,
    kept: list[_Task],
    results: Mapping[int, _VideoResult],
    index: pd.DataFrame,
    patient_of: dict,
    split_of: dict,
    rejects: list[dict[str, str]],
    saliency: bool,
) -> dict[str, Any]:
    extra = [c for c in listing.columns if c not in ("path", "label", "patient_id", "annotations")]
    videos = []
    offset = 0
    for video_idx, task in enumerate(kept):
        r = results[task.idx]
        info = {"video_idx": video_idx, **r.info, "first_frame": offset, "label": task.label}
        info |= {"patient_id": patient_of[task.idx], "split": split_of[task.idx]}
        if task.annotations:
            info["annotations"] = task.annotations
        if extra:
            info["columns"] = {c: listing[c].iloc[task.idx] for c in extra}  # e.g. licence and attribution
        videos.append(info)
        offset += r.frames
    n, size, ssize = len(index), params.frame_size, params.saliency_size
    dropped = {v["path"]: v["frames_blank"] for v in videos}
    return {
        "format": FORMAT,
        "version": version,
        "params": {k: v for k, v in asdict(params).items() if k != "workers"},  # as the version: what, not how fast
        "inputs": inputs,
        "counts": {
            "videos_listed": len(listing),
            "videos": len(kept),
            "rejected": len(rejects),
            "frames": n,
            "frames_with_saliency": int(index.has_saliency.sum()),
            "dropped_blank": sum(dropped.values()),
            "dropped_blank_per_video": dropped,
            "frames_per_label": {str(k): int(v) for k, v in sorted(Counter(index.label.dropna()).items())},
            "frames_per_split": {s: int((index.split == s).sum()) for s in SPLITS},
            "frames_per_label_per_split": {
                s: {str(k): int(v) for k, v in sorted(Counter(index.label[index.split == s].dropna()).items())}
                for s in SPLITS
            },
            "videos_per_split": {s: sum(v["split"] == s for v in videos) for s in SPLITS},
            "groups_per_split": {
                s: len({v["patient_id"] or v["path"] for v in videos if v["split"] == s}) for s in SPLITS
            },
        },
        "files": {
            "frames": {"file": "frames.npy", "dtype": "uint8", "shape": [n, size, size]},
            "index": {"file": "index.parquet", "columns": list(INDEX_COLUMNS)},
            "saliency": {"file": "saliency.npy", "dtype": "float16", "shape": [n, ssize, ssize]} if saliency else None,
        },
        "rejects": rejects,
        "videos": videos,
    }


def _check_apart(raw_dir: Path, out_dir: Path) -> None:
    """The clip dataset replaces ``out_dir`` as a whole: it must not be, hold or sit inside the raw dataset."""
    raw, out = raw_dir.resolve(), out_dir.resolve()
    if out == raw or raw.is_relative_to(out):
        what = "the same folder" if out == raw else "a folder above it"
        raise ValueError(f"out_dir {out_dir} would replace the raw dataset {raw_dir} ({what}); write the clip "
                         "dataset to a folder of its own, e.g. data/clips/<name>")
    if out.is_relative_to(raw):
        raise ValueError(f"out_dir {out_dir} is inside the raw dataset {raw_dir}: the clips would become part of "
                         "the raw data (and of its DVC version); write them to a folder of its own")


LABEL_LIKENESS = 0.8  # difflib's ratio above which two labels look like one written two ways


def _check_label_spelling(raw_dir: Path, kept: list[_Task], results: Mapping[int, _VideoResult]) -> None:
    """Labels that differ only in case or spaces ("Covid", "covid ") are one class written two ways: fail, naming
    a video of each, rather than train on a class split in two. A label that is only like another ("pnuemonia",
    "pneumonia") may be a class of its own, so it is a warning, naming both, as is a label of a single video (it
    can be in one split only: never both trained on and scored)."""
    import difflib

    where: dict[str, str] = {}
    videos: Counter[str] = Counter()
    for task in kept:
        for label in dict.fromkeys(results[task.idx].labels):
            if label is not None:
                where.setdefault(label, task.path)
                videos[label] += 1
    spellings: dict[str, list[str]] = {}
    for label in where:
        spellings.setdefault(" ".join(label.casefold().split()), []).append(label)
    clashes = [names for names in spellings.values() if len(names) > 1]
    if clashes:
        lines = "; ".join(", ".join(f"{n!r} ({where[n]})" for n in names) for names in clashes)
        raise PreprocessError(f"{raw_dir}: labels that differ only in case or spaces would be separate classes: "
                              f"{lines}; write each class one way in labels.csv and the annotations")
    for a, b in itertools.combinations(sorted(where, key=lambda n: (-videos[n], n)), 2):
        if difflib.SequenceMatcher(None, a.casefold(), b.casefold()).ratio() >= LABEL_LIKENESS:
            log.warning("%s: label %r (%d video(s), e.g. %s) is much like %r (%d video(s), e.g. %s): if it is the "
                        "same class misspelled, correct labels.csv (or the annotations), or it is trained as a class "
                        "of its own", raw_dir, b, videos[b], where[b], a, videos[a], where[a])
    for label, n in sorted(videos.items()):
        if n == 1 and len(videos) > 1:
            log.warning("%s: label %r has a single video (%s): it lands in one split only, so it is never both "
                        "trained on and scored", raw_dir, label, where[label])


def preprocess(
    raw_dir: str | Path, out_dir: str | Path, params: PreprocessParams, progress: bool = True
) -> PreprocessReport:
    """Build the clip dataset of ``raw_dir`` at ``out_dir`` (replaced atomically); see the module docstring.

    Raises FileNotFoundError / ValueError for a missing folder, labels.csv or ``path`` column and bad parameters,
    and PreprocessError when no listed video is usable or more than ``params.max_reject_fraction`` of them are not.
    """
    start = time.perf_counter()
    _check_params(params)
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    _check_apart(raw_dir, out_dir)
    listing = read_listing(raw_dir)
    if len(listing) == 0:
        raise PreprocessError(f"{raw_dir / 'labels.csv'}: lists no videos")
    inputs = _input_hashes(raw_dir, listing)
    version = _version(params, inputs)

    with atomic_dir(out_dir) as staging:
        work = staging / ".work"  # the workers' per-video files, inside the staging folder so cleanup is one place
        work.mkdir()
        tasks, reasons = _plan(raw_dir, listing, params, work, inputs)
        results = _run(tasks, params.workers, progress) if tasks else {}
        for task in tasks:
            if results[task.idx].reason is not None:
                reasons[task.idx] = results[task.idx].reason
                _cleanup(task)
        rejects = _reject_list(reasons, listing)
        for r in rejects:
            log.warning("unusable video %s: %s", r["path"], r["reason"])
        kept = [t for t in tasks if t.idx not in reasons]
        _check_label_spelling(raw_dir, kept, results)
        if not kept:
            raise PreprocessError(
                f"{raw_dir}: no usable video among the {len(listing)} listed in labels.csv:\n"
                + _describe_rejects(rejects)
            )
        share = len(rejects) / len(listing)
        if share > params.max_reject_fraction:
            raise PreprocessError(
                f"{raw_dir}: {len(rejects)} of {len(listing)} listed videos are unusable ({share:.0%}, more than "
                f"max_reject_fraction {params.max_reject_fraction:.0%}); fix or remove them from labels.csv:\n"
                + _describe_rejects(rejects)
            )

        total, any_saliency = _copy_work(staging, kept, results, params)
        shutil.rmtree(work)
        patient_of, split_of = _video_splits(kept, results, listing, params)
        index = _index(kept, results, patient_of, split_of)
        index.to_parquet(staging / "index.parquet", index=False)
        meta = _meta(
            params, version, inputs, listing, kept, results, index, patient_of, split_of, rejects, any_saliency
        )
        atomic_write_text(staging / "meta.json", json.dumps(meta, indent=2, ensure_ascii=False) + "\n")

    report = PreprocessReport(
        version=version,
        videos=len(kept),
        frames=int(total),
        rejects=rejects,
        dropped_blank=meta["counts"]["dropped_blank"],
        seconds=time.perf_counter() - start,
        out_dir=str(out_dir),
    )
    log.info("clip dataset %s: %d videos, %d frames, %d rejected", out_dir, report.videos, report.frames, len(rejects))
    return report


# ------------------------------------------------------------------------------------------------- reading


def load_clip_dataset(path: str | Path) -> ClipDataset:
    """Open a clip dataset written by ``preprocess``: frames and saliency memory-mapped, index and meta loaded."""
    import pandas as pd

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: clip dataset not found; build it with `sonossl preprocess --out {path}`")
    for name in ("meta.json", "index.parquet", "frames.npy"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path}: incomplete clip dataset, {name} is missing; rebuild it with `sonossl preprocess`")
    try:
        meta = json.loads((path / "meta.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / 'meta.json'}: not valid JSON ({e}); rebuild the dataset") from None
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{path}: clip dataset format {meta.get('format')!r}, this sonossl reads format {FORMAT}; "
            "rebuild it with `sonossl preprocess`"
        )
    frames = np.load(path / "frames.npy", mmap_mode="r")
    index = pd.read_parquet(path / "index.parquet")
    missing = [c for c in INDEX_COLUMNS if c not in index.columns]
    if missing:
        raise ValueError(f"{path / 'index.parquet'}: missing columns {missing}")
    if frames.ndim != 3 or frames.shape[1] != frames.shape[2] or len(frames) != len(index):
        raise ValueError(
            f"{path}: frames.npy {frames.shape} does not match index.parquet ({len(index)} rows); rebuild the dataset"
        )
    saliency = None
    if meta.get("files", {}).get("saliency"):
        if not (path / "saliency.npy").is_file():
            raise FileNotFoundError(f"{path}: incomplete clip dataset, saliency.npy is missing; rebuild it")
        saliency = np.load(path / "saliency.npy", mmap_mode="r")
        if len(saliency) != len(frames):
            raise ValueError(f"{path}: saliency.npy has {len(saliency)} maps for {len(frames)} frames; rebuild it")
    return ClipDataset(path=path, frames=frames, index=index, saliency=saliency, meta=meta)
