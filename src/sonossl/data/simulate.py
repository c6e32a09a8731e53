"""``sonossl simulate``: the fetal sweep simulator, the embedded default raw dataset.

Each video is one virtual fetus (``phantom``) scanned by a virtual sonographer (``probe``), rendered as B-mode
(``bmode``), labelled from the geometry of each slice (``planes``), with a gaze-like saliency map per frame
(``gaze``). The output is a raw dataset in the one schema every source uses:

    out/labels.csv                 path, label, patient_id, stratum, annotations, frames, fps, ... (one row per video)
    out/videos/sweep_000.mp4       H.264 through PyAV
    out/annotations/sweep_000.npz  per frame: labels, saliency, slice geometry, probe pose and segment
    out/simulator.json             the parameters

The same parameters and seed give the same bytes. Videos render in parallel, one process per core.

    report = simulate("data/raw/sim", SimulateParams(videos=4, seconds=3))
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from sonossl.atomic import atomic_dir, atomic_write_text
from sonossl.config import AT_LEAST_1, NOT_NEGATIVE, SimulateParams, as_dict, check_ranges
from sonossl.data.annotations import save_annotations
from sonossl.data.bmode import BModeRenderer, Settings
from sonossl.data.gaze import saliency_maps, simulate_gaze
from sonossl.data.phantom import Phantom
from sonossl.data.planes import CLASSES, Sector, canonical_planes, label_frame
from sonossl.data.probe import plane_from_pose, sonographer_path
from sonossl.data.video import encode_video

SIMULATOR_VERSION = "2"
COLUMNS = ["path", "label", "patient_id", "stratum", "annotations", "frames", "fps", "width", "height", "ga_weeks",
           "presentation", "spine", "depth_mm", "freq_mhz", "gain_db"] + [f"n_{c}" for c in CLASSES]


@dataclass
class Sweep:
    frames: np.ndarray  # (T, H, W) uint8
    labels: np.ndarray  # (T,) str
    saliency: np.ndarray  # (T, h, w) float32
    extra: dict[str, np.ndarray]
    row: dict[str, object]


@dataclass
class Scene:
    """What video ``index`` is made of, before the sonographer moves: fetus, probe geometry, scanner settings."""

    rng: np.random.Generator  # continues into the probe path and the gaze
    phantom: Phantom
    sector: Sector
    settings: Settings


def scene(index: int, params: SimulateParams) -> Scene:
    """The scene of video ``index``; depends only on (params.seed, index), never on the process."""
    rng = np.random.default_rng([params.seed, index])
    phantom = Phantom.random(rng)
    depth = float(rng.uniform(120.0, 155.0))  # deep enough for a posterior spine
    sector = Sector(radius=float(rng.uniform(38.0, 50.0)), depth=depth, half_angle=float(rng.uniform(30.0, 37.5)))
    settings = Settings.random(rng, depth)
    if params.gain_db:
        settings = replace(settings, gain_db=settings.gain_db + params.gain_db)
    return Scene(rng, phantom, sector, settings)


def render_sweep(index: int, params: SimulateParams) -> Sweep:
    """Render video ``index`` of the dataset; depends only on (params, index), never on the process."""
    sc = scene(index, params)
    rng, phantom, sector, settings = sc.rng, sc.phantom, sc.sector, sc.settings
    depth = sector.depth
    canon = canonical_planes(phantom)
    n = max(2, int(round(params.seconds * params.fps)))
    path = sonographer_path(phantom, canon, n, params.fps, sector, rng)
    overlay = [
        "SONOSSL SIM", f"C5-2 {settings.freq_mhz:.1f}MHz", f"OB {phantom.ga_weeks:.0f}w",
        f"G{settings.gain_db:+.0f} DR{settings.dynamic_range_db:.0f}", f"FR {params.fps:.0f}Hz",
        f"D {depth / 10:.1f}cm", f"ID {params.seed}-{index:03d}",
    ]
    renderer = BModeRenderer(sector, params.height, params.beams, params.samples, settings,
                             seed=int(rng.integers(2**31)), overlay_lines=overlay)
    noise_rng = np.random.default_rng([params.seed, index, 1])

    frames = np.empty((n, renderer.height, renderer.width), np.uint8)
    labels = np.empty(n, dtype=object)
    keys: list[np.ndarray | None] = []
    angles = {c: np.empty(n, np.float32) for c in CLASSES[1:]}
    dists = {c: np.empty(n, np.float32) for c in CLASSES[1:]}
    for t in range(n):
        plane = plane_from_pose(path.poses[t], sector)
        lab = label_frame(plane, canon)
        if path.frozen[t]:
            frames[t] = frames[t - 1]  # a frozen image shows the same slice as before
        else:
            frames[t] = renderer.render(phantom, plane, t / params.fps, path.contact[t], noise_rng)
        # No contact, no image: whatever the probe points at, the frame shows nothing to label.
        labels[t] = lab.name if path.contact[t] > 0 else "background"
        keys.append(renderer.to_pixels(plane, lab.plane.keys) if lab.plane is not None and labels[t] != "background"
                    else None)
        for c in CLASSES[1:]:
            angles[c][t], dists[c][t] = lab.angles[c], lab.dists[c]

    hw = (renderer.height, renderer.width)
    sal_hw = (params.saliency_size, int(round(params.saliency_size * renderer.width / renderer.height)))
    centre = (renderer.width / 2.0, float(np.mean(np.nonzero(renderer.fan)[0])))
    fixations = simulate_gaze(labels, keys, params.fps, hw, centre, rng)
    saliency = saliency_maps(fixations, keys, params.fps, hw, centre, sal_hw)

    name = f"sweep_{index:03d}"
    counts = Counter(labels.tolist())
    planes = {c: k for c, k in counts.items() if c != "background" and k > 0}
    row: dict[str, object] = {
        "path": f"videos/{name}.mp4", "label": "", "patient_id": f"fetus-{params.seed}-{index:03d}",
        # the plane the sweep shows most: preprocess spreads sweeps over the splits by it
        "stratum": min(planes, key=lambda c: (-planes[c], c)) if planes else "background",
        "annotations": f"annotations/{name}.npz", "frames": n, "fps": params.fps, "width": renderer.width,
        "height": renderer.height, "ga_weeks": round(phantom.ga_weeks, 2), "presentation": phantom.pose.presentation,
        "spine": phantom.pose.spine, "depth_mm": round(depth, 1), "freq_mhz": round(settings.freq_mhz, 2),
        "gain_db": round(settings.gain_db, 2),
    }
    row.update({f"n_{c}": counts.get(c, 0) for c in CLASSES})
    extra = {f"angle_{c}": angles[c] for c in angles} | {f"dist_{c}": dists[c] for c in dists}
    extra |= {"pose": path.poses.astype(np.float32), "segment": path.segment.astype(str), "frozen": path.frozen,
              "contact": path.contact.astype(np.float32), "target": path.target.astype(str)}
    return Sweep(frames, labels.astype(str), saliency, extra, row)


def _write_sweep(index: int, params: SimulateParams, staging: str) -> dict[str, object]:
    sweep = render_sweep(index, params)
    root = Path(staging)
    encode_video(root / str(sweep.row["path"]), sweep.frames, fps=params.fps, crf=params.crf)
    save_annotations(root / str(sweep.row["annotations"]), sweep.labels, sweep.saliency, **sweep.extra)
    return sweep.row


@dataclass
class SimulateReport:
    out_dir: Path
    videos: int
    frames: int
    label_counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> dict[str, object]:
        return {"out": str(self.out_dir), "videos": self.videos, "frames": self.frames,
                "labels": self.label_counts, "seconds": round(self.seconds, 1)}


# What each setting must be, checked before any work (the smallest images that render, H.264's quality range, and
# bounds that keep one sweep's frames in memory): ParamsError names the setting.
RANGES = {
    "videos": AT_LEAST_1,
    "seconds": (lambda v: 0 < v <= 600, "more than 0 and at most 600 (ten minutes a sweep)"),
    "fps": (lambda v: 1 <= v <= 120, "from 1 to 120"),
    "height": (lambda v: 64 <= v <= 2048 and v % 2 == 0, "an even number from 64 to 2048"),
    "beams": (lambda v: v >= 8, "at least 8"),
    "samples": (lambda v: v >= 16, "at least 16"),
    "saliency_size": AT_LEAST_1,
    "crf": (lambda v: 0 <= v <= 51, "from 0 (lossless) to 51, H.264's range"),
    "gain_db": (lambda v: -40 <= v <= 40, "from -40 to 40 (dB)"),
    "seed": NOT_NEGATIVE,
    "workers": NOT_NEGATIVE,
}


def simulate(out_dir: str | Path, params: SimulateParams, progress: bool = True,
             section: str = "simulate") -> SimulateReport:
    """Render ``params.videos`` sweeps into a raw dataset at ``out_dir`` (replaced atomically); ``section``: where
    the parameters come from, for the message of one out of range."""
    from tqdm import tqdm

    check_ranges(section, params, RANGES)
    start = time.perf_counter()
    out_dir = Path(out_dir)
    workers = min(params.videos, params.workers or os.cpu_count() or 1)
    rows: dict[int, dict[str, object]] = {}
    with atomic_dir(out_dir) as staging:
        bar = tqdm(total=params.videos, desc="simulate", unit="video", disable=not progress)
        if workers == 1:
            for i in range(params.videos):
                rows[i] = _write_sweep(i, params, str(staging))
                bar.update()
        else:
            pool = ProcessPoolExecutor(max_workers=workers)
            try:
                futures = {pool.submit(_write_sweep, i, params, str(staging)): i for i in range(params.videos)}
                for fut in as_completed(futures):
                    rows[futures[fut]] = fut.result()
                    bar.update()
            except BaseException:
                # Interrupted (Ctrl-C, SIGTERM) or failed: drop the queued sweeps and wait for the running ones,
                # so that no worker writes into the staging folder after it is removed (as preprocess does)
                pool.shutdown(wait=True, cancel_futures=True)
                raise
            pool.shutdown(wait=True)
        bar.close()
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        for i in sorted(rows):
            writer.writerow(rows[i])
        atomic_write_text(staging / "labels.csv", buf.getvalue())
        atomic_write_text(staging / "simulator.json", json.dumps(
            # `workers` changes how fast, never what: leave it out so the bytes do not depend on it.
            {"simulator_version": SIMULATOR_VERSION, "classes": list(CLASSES),
             "params": {k: v for k, v in as_dict(params).items() if k != "workers"}},
            indent=2, sort_keys=True) + "\n")
    counts = {c: int(sum(int(r[f"n_{c}"]) for r in rows.values())) for c in CLASSES}
    return SimulateReport(out_dir, len(rows), int(sum(int(r["frames"]) for r in rows.values())), counts,
                          time.perf_counter() - start)
