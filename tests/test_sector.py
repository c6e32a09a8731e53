"""Sector detection: the square crop lies inside the fan, leaves the overlays out, and keeps most of real images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import fan_frames, write_video

from sonossl.data.sector import CropBox, detect_crop, inscribed_square, sector_mask, temporal_statistics
from sonossl.data.video import read_video


def _inside(box: CropBox, mask: np.ndarray) -> bool:
    return bool(mask[box.y0 : box.y0 + box.side, box.x0 : box.x0 + box.side].all())


def _overlaps(box: CropBox, other: tuple[int, int, int, int]) -> bool:
    x0, y0, x1, y1 = other
    return not (box.x0 + box.side <= x0 or x1 <= box.x0 or box.y0 + box.side <= y0 or y1 <= box.y0)


@pytest.mark.parametrize(("seed", "h", "w"), [(0, 96, 128), (1, 96, 128), (2, 96, 128), (3, 300, 400)])
def test_crop_is_inside_the_fan_and_excludes_the_overlays(seed: int, h: int, w: int) -> None:
    fan = fan_frames(t=12, h=h, w=w, seed=seed)  # 300 x 400 is detected on a reduced grid
    box = detect_crop(fan.frames)
    assert box.method == "sector"
    assert _inside(box, fan.mask)
    assert not any(_overlaps(box, o) for o in fan.overlays)
    # Not a timid crop: the largest square inside this fan is about 0.69 h; the margin takes a few pixels.
    assert box.side >= 0.55 * h


def test_crop_survives_h264_encoding(tmp_path: Path) -> None:
    fan = fan_frames(t=16, h=96, w=128, seed=3)
    frames, _ = read_video(write_video(tmp_path / "fan.mp4", fan.frames))
    box = detect_crop(frames)
    assert box.method == "sector" and _inside(box, fan.mask)
    assert not any(_overlaps(box, o) for o in fan.overlays)


def test_a_frame_without_background_is_cropped_to_its_central_square() -> None:
    rng = np.random.default_rng(0)
    frames = rng.integers(40, 200, (8, 60, 90), dtype=np.uint8)  # image everywhere, wider than high
    box = detect_crop(frames)
    assert box.method == "sector"
    assert box.side >= 0.9 * 60 and box.y0 + box.side <= 60
    assert abs((box.x0 + box.side / 2) - 45) <= 2  # centred along the long side


def test_no_sector_falls_back_to_the_central_square_and_says_why() -> None:
    black = np.zeros((4, 60, 80), dtype=np.uint8)
    box = detect_crop(black)
    assert (box.method, box.x0, box.y0, box.side) == ("fallback", 10, 0, 60)
    assert "no sector found" in box.reason
    speck = black.copy()
    speck[:, 28:36, 36:44] = np.random.default_rng(0).integers(50, 255, (4, 8, 8))
    box = detect_crop(speck)
    assert box.method == "fallback" and box.reason


def test_temporal_statistics_take_a_list_and_a_level_map() -> None:
    frames = [np.full((4, 4), v, dtype=np.uint8) for v in (20, 60, 40)]
    peak, change = temporal_statistics(frames)
    assert peak.dtype == np.float32 and (peak == 60).all() and (change == 40).all()
    lut = (np.arange(256) // 2).astype(np.uint8)
    peak, change = temporal_statistics(np.stack(frames), lut=lut)
    assert (peak == 30).all() and (change == 20).all()


def _largest_square_brute_force(mask: np.ndarray) -> int:
    h, w = mask.shape
    best = 0
    for y in range(h):
        for x in range(w):
            s = best + 1
            while y + s <= h and x + s <= w and mask[y : y + s, x : x + s].all():
                best = s
                s += 1
    return best


@pytest.mark.parametrize("seed", range(6))
def test_inscribed_square_is_inside_and_at_most_one_pixel_short(seed: int) -> None:
    rng = np.random.default_rng(seed)
    mask = np.zeros((30, 40), dtype=bool)
    for _ in range(4):  # a few overlapping rectangles
        y0, x0 = rng.integers(0, 20), rng.integers(0, 30)
        mask[y0 : y0 + rng.integers(5, 20), x0 : x0 + rng.integers(5, 20)] = True
    x0, y0, side = inscribed_square(mask)
    assert mask[y0 : y0 + side, x0 : x0 + side].all()
    assert side >= _largest_square_brute_force(mask) - 1


def test_sector_mask_fills_shadows_but_not_the_space_above_the_near_field() -> None:
    fan = fan_frames(t=8, h=96, w=128, seed=4, overlay=False)
    frames = fan.frames.copy()
    frames[:, 40:, 60:68] = 0  # an acoustic shadow from mid-depth to the bottom
    peak, change = temporal_statistics(frames)
    mask = sector_mask(peak, change)
    assert mask[60:80, 60:68].all()  # the shadow is part of the sector
    assert not mask[0, 64]  # above the near-field arc stays out
    # Smoothing blurs the fan edge outwards by a pixel or two (the crop's margin takes that off), no more.
    from scipy import ndimage

    assert ndimage.distance_transform_edt(~fan.mask)[mask].max() <= 3
    assert (fan.mask & ~mask).mean() < 0.01


@pytest.mark.slow
def test_pocus_crops_keep_most_of_the_image_and_stay_in_the_sector(pocus_dir: Path) -> None:
    import pandas as pd

    from sonossl.data.video import iter_frames

    listing = pd.read_csv(pocus_dir / "labels.csv")
    sides, blacks, brightness = [], [], []
    for rel in listing.path:
        frames = []
        for frame in iter_frames(pocus_dir / rel):  # the first 48 frames keep the test quick
            frames.append(frame.image)
            if len(frames) == 48:
                break
        frames = np.stack(frames)
        h, w = frames.shape[1:]
        box = detect_crop(frames[::2])
        assert box.method == "sector", f"{rel}: {box.reason}"
        sides.append(box.side / min(h, w))
        peak = frames.max(axis=0).astype(float)
        crop = frames[:, box.y0 : box.y0 + box.side, box.x0 : box.x0 + box.side]
        background = np.percentile(peak, 1)
        # Share of the crop that is never brighter than the black level: background, or a black rib shadow.
        blacks.append((peak[box.y0 : box.y0 + box.side, box.x0 : box.x0 + box.side] <= background + 1).mean())
        # The crop is about as bright as the sector it comes from (not a corner of black, not only the near field).
        image = peak > background + 4
        brightness.append(crop.mean() / frames[:, image].mean())
    sides, blacks, brightness = np.array(sides), np.array(blacks), np.array(brightness)
    assert len(sides) == 112
    assert np.median(sides) >= 0.55 and sides.min() >= 0.35, np.sort(sides)[:5]
    # Most crops hold no black at all; the worst are videos with black rib shadows inside the fan (about a quarter).
    assert np.median(blacks) <= 0.01 and np.mean(blacks < 0.05) >= 0.8 and blacks.max() <= 0.3, np.sort(blacks)[-5:]
    assert 0.75 <= np.median(brightness) <= 1.25 and brightness.min() >= 0.25, np.sort(brightness)[:5]
