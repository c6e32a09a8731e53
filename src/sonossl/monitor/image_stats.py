"""Per-frame image statistics: what drift monitoring compares between training data and what the endpoint sees.

Computed on preprocessed frames (sector crop, resized, uint8), the same for the reference exported with the model
and for every served request, so a change of scanner, preset, gain or depth shows as a change of distribution:

- ``mean``: mean grey level; ``contrast``: grey-level standard deviation;
- ``speckle_snr``: median over 8x8 patches of patch mean / patch standard deviation (about 1.9 for fully developed
  speckle in envelope data, lower after log compression; it moves with gain, dynamic range and resolution);
- ``coverage``: share of pixels above a dark threshold (how much of the crop holds echo rather than black);
- ``height``, ``width``: the size of the frame as it came in, before preprocessing.

    stats = image_stats(frames_u8)          # DataFrame, one row per frame
"""

from __future__ import annotations

import numpy as np

STAT_COLUMNS = ("mean", "contrast", "speckle_snr", "coverage")
DARK_LEVEL = 8
PATCH = 8


def image_stats(frames: np.ndarray, source_hw: tuple[int, int] | np.ndarray | None = None):
    """Statistics of (N, S, S) uint8 frames; ``source_hw`` is the incoming (height, width), one or per frame."""
    import pandas as pd

    frames = np.asarray(frames)
    if frames.ndim != 3:
        raise ValueError(f"frames must be (N, H, W) grey images, got shape {frames.shape}")
    x = frames.astype(np.float32)
    n, h, w = x.shape
    ph, pw = h // PATCH, w // PATCH
    patches = x[:, : ph * PATCH, : pw * PATCH].reshape(n, ph, PATCH, pw, PATCH)
    pm, ps = patches.mean(axis=(2, 4)), patches.std(axis=(2, 4))
    snr = np.where(ps > 1e-3, pm / np.maximum(ps, 1e-3), 0.0).reshape(n, -1)
    out = pd.DataFrame({
        "mean": x.mean(axis=(1, 2)),
        "contrast": x.std(axis=(1, 2)),
        "speckle_snr": np.median(snr, axis=1),
        "coverage": (frames > DARK_LEVEL).mean(axis=(1, 2)),
    })
    if source_hw is None:
        source_hw = (h, w)
    hw = np.broadcast_to(np.asarray(source_hw, dtype=np.int64).reshape(-1, 2), (n, 2))
    out["height"], out["width"] = hw[:, 0], hw[:, 1]
    return out.astype({c: np.float32 for c in STAT_COLUMNS})
