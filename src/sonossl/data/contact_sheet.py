"""Contact sheet: a PNG grid of sample frames per class, to look at a raw dataset with one's own eyes.

Rows are classes (per-frame labels from the annotations when a video has them, else the video's label), columns
are frames drawn from as many different videos as possible. With ``real=`` a few rows of another raw dataset
(the real POCUS videos, say) are added below, so the simulator can be judged beside real ultrasound.

    contact_sheet("data/raw/sim", "docs/contact_sheet.png", per_class=6, real="../shared/data/pocus")
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from sonossl.atomic import atomic_file

TILE_HEIGHT = 192
CAPTION = 16  # pixels of caption band under each tile


def _frames_by_label(raw_dir: Path) -> dict[str, list[tuple[str, int]]]:
    import pandas as pd

    from sonossl.data.annotations import load_annotations

    table = pd.read_csv(raw_dir / "labels.csv", dtype=str, keep_default_na=False)
    found: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for row in table.to_dict("records"):
        if row.get("annotations"):
            labels = load_annotations(raw_dir / row["annotations"]).labels
            for t, lab in enumerate(labels):
                found[str(lab)].append((row["path"], t))
        else:
            found[row.get("label") or "unlabelled"].append((row["path"], -1))
    return found


def _pick(items: list[tuple[str, int]], k: int, rng: np.random.Generator) -> list[tuple[str, int]]:
    """Up to ``k`` frames, from as many videos as possible."""
    by_video: dict[str, list[int]] = defaultdict(list)
    for path, t in items:
        by_video[path].append(t)
    videos = list(rng.permutation(sorted(by_video)))
    picks = []
    while len(picks) < k and videos:
        for v in list(videos):
            if len(picks) == k:
                break
            ts = by_video[v]
            picks.append((v, int(ts.pop(int(rng.integers(len(ts)))))))
            if not ts:
                videos.remove(v)
    return picks


def _tile(frame: np.ndarray, caption: str, height: int):
    """The frame scaled to ``height``, with its caption in a band above it (not over the scanner's own text)."""
    from PIL import Image, ImageDraw

    img = Image.fromarray(frame).convert("L")
    img = img.resize((max(1, round(img.width * height / img.height)), height), Image.BILINEAR)
    tile = Image.new("RGB", (img.width, height + CAPTION), (0, 0, 0))
    tile.paste(img.convert("RGB"), (0, CAPTION))
    ImageDraw.Draw(tile).text((4, 2), caption, fill=(255, 210, 0))
    return tile


def _rows(raw_dir: Path, per_class: int, rng: np.random.Generator, prefix: str = "") -> list[list]:
    from sonossl.data.video import read_video

    chosen = {lab: _pick(items, per_class, rng) for lab, items in sorted(_frames_by_label(raw_dir).items())}
    cache: dict[str, np.ndarray] = {}
    rows = []
    for lab, picks in chosen.items():
        row = []
        for path, t in picks:
            if path not in cache:
                cache[path] = read_video(raw_dir / path)[0]
            frames = cache[path]
            t = t if t >= 0 else int(rng.integers(len(frames)))
            row.append(_tile(frames[min(t, len(frames) - 1)], f"{prefix}{lab}", TILE_HEIGHT))
        rows.append(row)
    return rows


def contact_sheet(raw_dir: str | Path, out_png: str | Path, per_class: int = 4, seed: int = 0,
                  real: str | Path | None = None) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    rows = _rows(Path(raw_dir), per_class, rng)
    if real is not None:
        rows += _rows(Path(real), per_class, rng, prefix="real ")
    width = max(sum(t.width for t in row) for row in rows)
    row_height = TILE_HEIGHT + CAPTION
    sheet = Image.new("RGB", (width, row_height * len(rows)), (24, 24, 24))
    for r, row in enumerate(rows):
        x = 0
        for tile in row:
            sheet.paste(tile, (x, r * row_height))
            x += tile.width
    with atomic_file(out_png) as tmp:
        sheet.save(tmp, format="PNG", optimize=True)
    return Path(out_png)
