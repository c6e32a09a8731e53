"""Ultrasound sector detection: one square crop box per video that lies inside the imaging fan.

A B-mode video shows the image inside a fan (sector) on a black background, often with static overlays around it
(text, depth scale, markers). Anything outside the fan is a shortcut for the pretext tasks (the fan border reveals
rotation, overlays reveal nothing about anatomy), so frames are cropped to the largest axis-aligned square inside
the fan. The fan is found from temporal statistics of frames sampled over the video: per pixel, the maximum (the fan
shows speckle at some time almost everywhere, the background never does) and the range (even dark fan regions
flicker, the background and the overlays are static). Bright static pixels (overlays) are cut out; both statistics
are smoothed and compared with the background level (the darkest pixels); the mask keeps the largest connected
component (overlays are small and separate), with holes and acoustic shadows filled. The largest inscribed square of that mask comes from a chessboard distance transform,
shrunk by a small margin. When no plausible fan is found the central square of the frame is used, and the box says
so.

    crop = detect_crop(frames_THW_uint8)           # frames sampled over the video
    crop.x0, crop.y0, crop.side, crop.method       # method: "sector" or "fallback"
    patch = frames[:, crop.y0:crop.y0 + crop.side, crop.x0:crop.x0 + crop.side]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

# The mask is computed on a copy of the statistic no longer than this on its long side: the fan is a large, smooth
# shape, and a small grid keeps connected components and distance transforms cheap for 1080p frames.
WORK_SIDE = 192
# Grey levels above the background's by which the smoothed temporal maximum counts as fan: compression noise on
# the black background stays below it, speckle inside the fan (even in dark fluid) rises above it at some time.
MIN_LEVEL = 4.0
BACKGROUND_PERCENTILE = 1.0  # the darkest 1% of pixels tell the background level ...
MAX_BACKGROUND = 48.0  # ... unless they are brighter than this: then there is no background
MIN_CHANGE = 2.0  # grey levels of temporal range (flicker) above the background's that also count as fan
# Overlays: at least this much brighter than the background and changing by at most this much over the video, as
# long as such pixels are under this share of the bright ones.
STATIC_LEVEL, STATIC_CHANGE, MAX_STATIC_SHARE = 40.0, 3.0, 0.3
MARGIN = 0.03  # shrink the square by this fraction of its side on each side, off the blurred fan edge
MIN_AREA = 0.10  # a fan must cover at least this share of the frame ...
MIN_SIDE = 0.25  # ... and hold a square of at least this share of min(H, W); otherwise fall back


@dataclass(frozen=True)
class CropBox:
    """A square crop in frame pixels; ``method`` is "sector" or "fallback" (central square, ``reason`` says why)."""

    x0: int
    y0: int
    side: int
    method: str = "sector"
    reason: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def central_square(height: int, width: int, reason: str = "") -> CropBox:
    side = min(height, width)
    return CropBox(x0=(width - side) // 2, y0=(height - side) // 2, side=side, method="fallback", reason=reason)


def temporal_statistics(
    frames: Sequence[np.ndarray] | np.ndarray, lut: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel maximum and range (max - min) over uint8 frames (T, H, W), as float32 (H, W) grey levels.

    ``frames`` may be a list of (H, W) arrays (no stacked copy is made). ``lut`` maps stored levels to grey (see
    ``sonossl.data.video.DecodedFrame``); being monotonic, it is applied to the two statistics, not to every frame.
    """
    if len(frames) == 0 or any(np.ndim(f) != 2 for f in frames[:1]):
        raise ValueError(f"need frames shaped (T, H, W) with T >= 1, got {np.shape(frames)}")
    hi = np.array(frames[0], dtype=np.uint8)
    lo = hi.copy()
    for frame in frames[1:]:
        if np.shape(frame) != hi.shape:
            raise ValueError(f"frames differ in size: {np.shape(frame)} and {hi.shape}")
        np.maximum(hi, frame, out=hi)
        np.minimum(lo, frame, out=lo)
    if lut is not None:
        hi, lo = lut[hi], lut[lo]
    hi = hi.astype(np.float32)
    return hi, hi - lo


def _shrink(stat: np.ndarray) -> tuple[np.ndarray, float]:
    """Area-average ``stat`` so that its long side is at most WORK_SIDE; returns it and the frame/work scale."""
    from PIL import Image

    h, w = stat.shape
    scale = max(h, w) / WORK_SIDE
    if scale <= 1.0:
        return stat, 1.0
    wh, ww = max(1, round(h / scale)), max(1, round(w / scale))
    small = Image.fromarray(np.ascontiguousarray(stat, dtype=np.float32)).resize((ww, wh), Image.Resampling.BOX)
    return np.asarray(small), max(h / wh, w / ww)


def sector_mask(peak: np.ndarray, change: np.ndarray) -> np.ndarray:
    """Boolean mask of the fan from the temporal maximum ``peak`` and range ``change`` (grey levels, same grid)."""
    from scipy import ndimage

    overlay = _static_overlay(peak, change)
    # Smoothing closes the speckle gaps of dark regions inside the fan before thresholding.
    peak = ndimage.uniform_filter(peak, size=5, mode="nearest")
    change = ndimage.uniform_filter(change, size=5, mode="nearest")
    # The background is one level (0, or a lifted black) with at most some noise (GIF dithering, compression); the
    # fan is brighter than that at some time, or at least flickers more. The darkest pixels give the background.
    dark_peak, dark_change = (float(np.percentile(a, BACKGROUND_PERCENTILE)) for a in (peak, change))
    if dark_peak > MAX_BACKGROUND:
        # Nothing is dark: the image fills the frame (a video already cropped inside its sector).
        return np.ones(peak.shape, dtype=bool)
    mask = ((peak > dark_peak + MIN_LEVEL) | (change > dark_change + MIN_CHANGE)) & ~overlay
    # An opening cuts thin bridges (a depth-scale tick touching the fan edge) between the fan and overlays.
    mask = ndimage.binary_opening(mask, structure=np.ones((3, 3), bool))
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    mask = ndimage.binary_fill_holes(labels == int(np.argmax(sizes)))
    return _fill_shadows(mask)


def _static_overlay(peak: np.ndarray, change: np.ndarray) -> np.ndarray:
    """Bright pixels that never change (text, scales, markers), widened by two pixels, so that overlays drawn close
    to the fan do not merge with it. Empty when too much of the image is static to tell overlay from image (a
    frozen video)."""
    from scipy import ndimage

    bright = peak > float(np.percentile(peak, BACKGROUND_PERCENTILE)) + STATIC_LEVEL
    static = bright & (change <= STATIC_CHANGE)
    if not static.any() or static.sum() > MAX_STATIC_SHARE * bright.sum():
        return np.zeros(peak.shape, dtype=bool)
    return ndimage.binary_dilation(static, structure=np.ones((3, 3), bool), iterations=2)


def _fill_shadows(mask: np.ndarray) -> np.ndarray:
    """Fill gaps that the fan encloses on the left, right and above: acoustic shadows (ribs, bone) that run down
    to the far field. The background above the probe's near-field arc is open to the top and stays out."""
    h, w = mask.shape
    rows = mask.any(axis=1)
    left = np.where(rows, mask.argmax(axis=1), w)
    right = np.where(rows, w - 1 - mask[:, ::-1].argmax(axis=1), -1)
    cols = mask.any(axis=0)
    top = np.where(cols, mask.argmax(axis=0), h)
    x = np.arange(w)[None, :]
    y = np.arange(h)[:, None]
    return mask | ((x >= left[:, None]) & (x <= right[:, None]) & (y >= top[None, :]))


def inscribed_square(mask: np.ndarray) -> tuple[int, int, int]:
    """Largest axis-aligned square of True pixels in ``mask``: (x0, y0, side); side 0 when the mask is empty.

    The chessboard distance of a pixel to the nearest False pixel (or the grid edge) is the half-side of the largest
    square centred on it, so its maximum gives the largest square (of odd side; at most one pixel short). Ties are
    broken towards the centroid of the mask, which keeps the box in the middle of the fan.
    """
    from scipy import ndimage

    if not mask.any():
        return 0, 0, 0
    padded = np.pad(mask, 1, constant_values=False)
    dist = ndimage.distance_transform_cdt(padded, metric="chessboard")[1:-1, 1:-1]
    best = int(dist.max())
    ys, xs = np.nonzero(dist == best)
    my, mx = (np.mean(a) for a in np.nonzero(mask))
    i = int(np.argmin((ys - my) ** 2 + (xs - mx) ** 2))
    half = best - 1
    return int(xs[i]) - half, int(ys[i]) - half, 2 * half + 1


def detect_crop(
    frames: Sequence[np.ndarray] | np.ndarray, margin: float = MARGIN, lut: np.ndarray | None = None
) -> CropBox:
    """The square crop box of a video from sampled grey frames (T, H, W) uint8, an array or a list of (H, W)
    arrays (stored levels when ``lut`` maps them to grey)."""
    peak, change = temporal_statistics(frames, lut)
    h, w = peak.shape
    peak, scale = _shrink(peak)
    change, _ = _shrink(change)
    mask = sector_mask(peak, change)
    area = float(mask.mean())
    if area < MIN_AREA:
        return central_square(h, w, reason=f"no sector found (largest bright region covers {area:.0%} of the frame)")
    sx, sy, sside = inscribed_square(mask)
    # Back to frame pixels, rounding inwards so the box stays inside the fan.
    x0 = int(np.ceil(sx * scale))
    y0 = int(np.ceil(sy * scale))
    side = int(np.floor((sx + sside) * scale)) - x0
    side = min(side, int(np.floor((sy + sside) * scale)) - y0, w - x0, h - y0)
    cut = int(np.ceil(margin * side))
    x0, y0, side = x0 + cut, y0 + cut, side - 2 * cut
    if side < MIN_SIDE * min(h, w):
        return central_square(
            h, w, reason=f"sector too small for a square crop ({max(side, 0)} px of {min(h, w)} px)"
        )
    return CropBox(x0=x0, y0=y0, side=side)
