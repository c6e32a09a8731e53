"""Per-frame annotations of a raw video: plane label and gaze saliency for every frame.

A raw dataset may give, per video, an ``annotations`` column in ``labels.csv`` pointing at an ``.npz`` file with
- ``labels``: (T,) str, the plane label of each frame;
- ``saliency``: (T, h, w) float16, a gaze density over the *whole* video frame (any h, w; each map sums to 1);
- optional extra per-frame arrays (the simulator stores the slice geometry: angle and distance to each plane).
Preprocessing crops and resizes the saliency maps with the same box as the frames.

The file is written byte-reproducibly (fixed zip timestamps), so the same simulator seed gives the same bytes.

    save_annotations(path, labels=["background"] * T, saliency=maps)
    ann = load_annotations(path); ann.labels[0], ann.saliency.shape
    has_saliency(path)   # True when it holds gaze maps, read from the file's listing only
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sonossl.atomic import atomic_write_bytes


@dataclass
class Annotations:
    labels: np.ndarray  # (T,) str
    saliency: np.ndarray | None  # (T, h, w) float16
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)


def save_annotations(path: str | Path, labels, saliency: np.ndarray | None = None, **extra: np.ndarray) -> Path:
    arrays: dict[str, np.ndarray] = {"labels": np.asarray(labels, dtype=str)}
    if saliency is not None:
        arrays["saliency"] = np.asarray(saliency, dtype=np.float16)
    arrays.update({k: np.asarray(v) for k, v in extra.items()})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            member = io.BytesIO()
            np.save(member, arrays[name], allow_pickle=False)
            zf.writestr(info, member.getvalue())
    return atomic_write_bytes(path, buf.getvalue())


def has_saliency(path: str | Path) -> bool:
    """Whether an annotations file holds saliency maps, from its zip listing (no array is read); False for a file
    that is not a readable .npz (preprocessing rejects its video, saying why)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return "saliency.npy" in zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def load_annotations(path: str | Path, n_frames: int | None = None) -> Annotations:
    """Load and validate; ``n_frames`` (the decoded frame count) is checked when given."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable annotations .npz ({e})") from e
    if "labels" not in arrays:
        raise ValueError(f"{path}: annotations must contain a 'labels' array (found {sorted(arrays)})")
    labels = arrays.pop("labels")
    if labels.ndim != 1:
        raise ValueError(f"{path}: 'labels' must be one label per frame (a 1-D array), got shape {labels.shape}")
    labels = np.char.strip(labels.astype(str))  # "" is a frame without a label; spaces are no part of a class
    saliency = arrays.pop("saliency", None)
    if saliency is not None and (saliency.ndim != 3 or len(saliency) != len(labels)):
        raise ValueError(f"{path}: 'saliency' must be (T, h, w) with T={len(labels)}, got {saliency.shape}")
    if n_frames is not None and len(labels) != n_frames:
        raise ValueError(f"{path}: {len(labels)} annotated frames but the video has {n_frames}")
    return Annotations(labels=labels, saliency=saliency, extra=arrays)
