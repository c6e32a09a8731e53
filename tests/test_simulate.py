"""The fetal sweep simulator: determinism, labels that come from geometry, and the physics that makes it honest."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sonossl.config import SimulateParams
from sonossl.data.annotations import load_annotations
from sonossl.data.bmode import BModeRenderer, Settings, scatterers
from sonossl.data.phantom import Phantom, _in_box
from sonossl.data.planes import CLASSES, MAX_DIST_MM, ImagePlane, Sector, canonical_planes, label_frame
from sonossl.data.probe import plane_from_pose, pose_for_plane, sonographer_path
from sonossl.data.simulate import scene, simulate
from sonossl.data.video import read_video

TINY = SimulateParams(videos=3, seconds=3.0, fps=10.0, height=96, beams=64, samples=112, saliency_size=24, seed=7)


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sim") / "raw"
    simulate(out, replace(TINY, workers=2), progress=False)
    return out


def test_same_seed_same_bytes_whatever_the_workers(sim, tmp_path):
    again = tmp_path / "again"
    simulate(again, replace(TINY, workers=1), progress=False)
    assert _digest(sim) == _digest(again)
    other = tmp_path / "other"
    simulate(other, replace(TINY, workers=1, seed=8), progress=False)
    assert _digest(other)["videos/sweep_000.mp4"] != _digest(sim)["videos/sweep_000.mp4"]


def test_raw_dataset_layout_and_annotations(sim):
    table = pd.read_csv(sim / "labels.csv", dtype={"label": str}, keep_default_na=False)
    assert list(table.columns[:5]) == ["path", "label", "patient_id", "stratum", "annotations"]
    for row in table.to_dict("records"):  # the stratum is the plane the sweep shows most
        planes = {c: row[f"n_{c}"] for c in CLASSES if c != "background" and row[f"n_{c}"] > 0}
        assert row["stratum"] == (max(sorted(planes), key=planes.get) if planes else "background")
    assert len(table) == TINY.videos and table["patient_id"].is_unique
    for row in table.to_dict("records"):
        frames, times = read_video(sim / row["path"])
        assert frames.shape == (row["frames"], row["height"], row["width"]) == (30, 96, 128)
        assert np.allclose(np.diff(times), 1 / TINY.fps, atol=1e-3)
        ann = load_annotations(sim / row["annotations"], n_frames=len(frames))
        assert set(ann.labels) <= set(CLASSES)
        assert sum(row[f"n_{c}"] for c in CLASSES) == len(frames)
        assert ann.saliency.shape == (30, 24, 32)
        sums = ann.saliency.astype(np.float64).sum(axis=(1, 2))
        assert np.allclose(sums, 1.0, atol=1e-2) and (ann.saliency >= 0).all()
        # A plane label is only ever given inside that plane's angle and distance tolerance.
        for c in CLASSES[1:]:
            on = ann.labels == c
            assert (ann.extra[f"angle_{c}"][on] <= 12.0 + 1e-3).all()
            assert (ann.extra[f"dist_{c}"][on] <= MAX_DIST_MM[c] + 1e-3).all()


def test_labels_are_recomputed_from_the_stored_probe_pose(sim):
    """Labels come from the geometry of the slice: the stored pose gives the stored label back."""
    from sonossl.data.simulate import render_sweep

    sweep = render_sweep(0, TINY)
    ann = load_annotations(sim / "annotations/sweep_000.npz")
    assert (sweep.labels == ann.labels).all()
    sc = scene(0, TINY)
    sector, canon = sc.sector, canonical_planes(sc.phantom)
    for t in range(len(ann.labels)):
        if ann.extra["contact"][t] > 0:
            lab = label_frame(plane_from_pose(ann.extra["pose"][t].astype(np.float64), sector), canon).name
            assert lab == ann.labels[t], t


def test_holds_land_on_their_plane_and_every_plane_is_shown():
    """The sonographer's holds show the plane held (one in five is a deliberate near miss), and sweeps that start
    anywhere along the fetus reach every standard plane, the head and the femur included (probe paths only, the
    default profile's 4 s sweeps at 20 fps: no rendering)."""
    params = SimulateParams(videos=40, seconds=4.0, fps=20.0, height=192, beams=160, samples=288, seed=3)
    held = on_plane = 0
    frames = {c: 0 for c in CLASSES}
    for i in range(params.videos):
        sc = scene(i, params)
        canon = canonical_planes(sc.phantom)
        path = sonographer_path(sc.phantom, canon, 80, params.fps, sc.sector, sc.rng)
        for t, pose in enumerate(path.poses):
            name = label_frame(plane_from_pose(pose, sc.sector), canon).name if path.contact[t] > 0 else "background"
            frames[name] += 1
            if path.segment[t] == "hold":
                held += 1
                on_plane += name == path.target[t]
    assert held > 200 and on_plane / held > 0.65, (on_plane, held)
    assert min(frames[c] for c in CLASSES[1:]) > 60, frames
    assert frames["background"] > 0.5 * sum(frames.values()), frames  # most frames are still background


@pytest.mark.parametrize("seed", range(6))
def test_canonical_pose_is_the_plane_and_near_misses_are_background(seed):
    rng = np.random.default_rng(seed)
    phantom = Phantom.random(rng)
    sector = Sector(depth=150.0)
    canon = canonical_planes(phantom)
    reached = 0
    for c in canon:
        pose = pose_for_plane(c, sector)
        if pose is None:
            continue
        reached += 1
        plane = plane_from_pose(pose, sector)
        assert label_frame(plane, canon).name == c.name
        # Slide 8 mm along the normal, or tilt 20 degrees: a near miss, which is background.
        shifted = ImagePlane(plane.o + 8.0 * plane.n, plane.u, plane.d, sector)
        assert label_frame(shifted, canon).name == "background"
        a = np.radians(20.0)
        tilted_d = np.cos(a) * plane.d + np.sin(a) * plane.n
        tilted = ImagePlane(plane.o, plane.u, tilted_d / np.linalg.norm(tilted_d), sector)
        assert label_frame(tilted, canon).name == "background"
    assert reached >= 3


def test_speckle_is_rayleigh_coherent_in_3d_and_decorrelates_out_of_plane():
    sector = Sector(depth=100.0)
    r = BModeRenderer(sector, height=128, beams=96, samples=192, settings=Settings(), seed=3)
    u, d = np.array([1.0, 0, 0]), np.array([0, 0, 1.0])

    def envelope(offset_mm: float) -> np.ndarray:
        plane = ImagePlane(np.array([0.0, offset_mm, 0.0]), u, d, sector)
        p = r.sample_points(plane).reshape(-1, 3)
        re, im = scatterers(p, seed=3)
        env = np.hypot(r._psf(re.reshape(r.samples, r.beams)), r._psf(im.reshape(r.samples, r.beams)))
        env = env[40:-10, 10:-10]
        # The point-spread widens away from the focus, so the level varies with depth in every plane alike:
        # compare the speckle pattern, not that shared profile.
        return (env / env.mean(axis=1, keepdims=True)).ravel()

    e0 = envelope(0.0)
    # Fully developed speckle: the envelope's mean/std is 1.91 for a Rayleigh distribution.
    assert 1.7 < e0.mean() / e0.std() < 2.1
    near = np.corrcoef(e0, envelope(0.1))[0, 1]
    far = np.corrcoef(e0, envelope(3.0))[0, 1]
    assert near > 0.8 and far < 0.2


def test_overlay_is_outside_the_fan_and_shadow_follows_bone(monkeypatch):
    sector = Sector(depth=120.0)
    # No electronic noise: TGC lifts it above a deep shadow, and this measures the attenuation itself.
    r = BModeRenderer(sector, height=128, beams=96, samples=192, settings=Settings(noise=0.0), seed=1,
                      overlay_lines=["SONOSSL", "C5-2"])
    assert r.overlay_mask.sum() > 50 and not (r.overlay_mask & r.fan).any()
    # Acoustic shadow: behind the femur the envelope is far darker than it would be if bone did not attenuate.
    for seed in range(10):
        phantom = Phantom.random(np.random.default_rng(seed))
        femur = [c for c in canonical_planes(phantom) if c.name == "femur" and pose_for_plane(c, sector) is not None]
        if femur:
            break
    plane = plane_from_pose(pose_for_plane(femur[0], sector), sector)
    ab = plane.in_plane(femur[0].keys[1:2])[0]
    beam = int(np.argmin(np.abs(r.theta - np.arctan2(ab[0], ab[1]))))
    depth = int(np.searchsorted(r.r, np.hypot(*ab)))
    behind = slice(depth + 8, depth + 16)  # the soft tissue of the thigh right behind the bone
    env = r.envelope(phantom, plane, 0.0, 1.0, np.random.default_rng(0))[behind, beam].mean()
    # The same slice with bone as transparent as soft tissue: no shadow.
    from sonossl.data import bmode
    from sonossl.data.phantom import TISSUE_ID

    atten = bmode.ATTEN.copy()
    atten[TISSUE_ID["bone"]] = atten[TISSUE_ID["soft"]]
    monkeypatch.setattr(bmode, "ATTEN", atten)
    no_shadow = r.envelope(phantom, plane, 0.0, 1.0, np.random.default_rng(0))[behind, beam].mean()
    assert env < 0.2 * no_shadow


def test_contact_sheet_shows_a_row_per_class(sim, tmp_path):
    from PIL import Image

    from sonossl.data.contact_sheet import CAPTION, TILE_HEIGHT, contact_sheet

    labels = set()
    for npz in (sim / "annotations").glob("*.npz"):
        labels |= set(load_annotations(npz).labels)
    png = contact_sheet(sim, tmp_path / "sheet.png", per_class=2)
    with Image.open(png) as img:
        assert img.height == len(labels) * (TILE_HEIGHT + CAPTION) and img.width > TILE_HEIGHT
        assert np.asarray(img.convert("L")).std() > 10  # frames, not an empty canvas


def test_box_test_finds_what_a_full_comparison_finds():
    """``_in_box`` (height first, then the other two coordinates one column at a time) against comparing every
    coordinate of every point: the same indices in the same order, with many points exactly on the box faces
    (coordinates on a 0.5 mm grid), on the Fortran-ordered points the painter passes it."""
    rng = np.random.default_rng(0)
    q = np.asfortranarray(np.round(rng.uniform(-10, 10, (4000, 3)) * 2) / 2)
    for _ in range(300):
        lo = np.round(rng.uniform(-12, 10, 3) * 2) / 2
        hi = lo + np.round(rng.uniform(-1, 8, 3) * 2) / 2  # some boxes empty (hi < lo), some past the points
        want = np.flatnonzero(((q >= lo) & (q <= hi)).all(axis=1))
        got = _in_box(q, lo, hi)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


def test_faster_sums_and_scatterers_give_the_same_bits():
    """The painter's ``_sum3`` and the per-axis scatterer hashing against the straightforward forms they replaced:
    bit for bit, so the same seed still renders the same bytes (and the data version ids stay put)."""
    from sonossl.data.bmode import LATTICE_MM, _M1, _M2
    from sonossl.data.phantom import _sum3

    rng = np.random.default_rng(1)
    v = rng.normal(size=(5000, 3)) * 10 ** rng.uniform(-3, 3, (5000, 3))
    assert np.array_equal(_sum3(v), v.sum(axis=1))
    assert np.array_equal(_sum3(np.asfortranarray(v)), v.sum(axis=1))

    def reference(p, seed):  # the scatterer lattice as first written: one full hash per corner
        g = p / LATTICE_MM + 1e6
        i0 = np.floor(g).astype(np.int64)
        f = g - i0
        re, im = np.zeros(len(p), np.float32), np.zeros(len(p), np.float32)
        scale = np.float32(np.sqrt(12.0) / 2**32)
        for cx in (0, 1):
            for cy in (0, 1):
                for cz in (0, 1):
                    w = ((f[:, 0] if cx else 1 - f[:, 0]) * (f[:, 1] if cy else 1 - f[:, 1])
                         * (f[:, 2] if cz else 1 - f[:, 2])).astype(np.float32)
                    ix, iy, iz = (i0[:, k] + c for k, c in enumerate((cx, cy, cz)))
                    h = (ix.astype(np.uint64) * np.uint64(73856093)) ^ (iy.astype(np.uint64) * np.uint64(19349663))
                    h ^= iz.astype(np.uint64) * np.uint64(83492791)
                    h ^= np.uint64(((seed & 0xFFFFFFFF) * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF)
                    h ^= h >> np.uint64(30)
                    h *= _M1
                    h ^= h >> np.uint64(27)
                    h *= _M2
                    h ^= h >> np.uint64(31)
                    re += w * ((h & np.uint64(0xFFFFFFFF)).astype(np.float32) * scale - np.float32(np.sqrt(3.0)))
                    im += w * ((h >> np.uint64(32)).astype(np.float32) * scale - np.float32(np.sqrt(3.0)))
        return re, im

    p = rng.uniform(-80, 160, (20000, 3))
    for seed in (0, 12345, 2**31 - 1):
        for got, want in zip(scatterers(p, seed), reference(p, seed), strict=True):
            assert np.array_equal(got, want)


def test_settings_out_of_range_and_outputs_that_hold_other_files_are_refused_by_name(tmp_path, capsys):
    """A setting outside what renders is one line naming it and the file (beams 0 was an IndexError, crf 99 was
    recorded but encoded at 51, fps below 1 failed with "high <= 0"); --out over a folder of other files, a file
    or the working directory is refused before any work (it replaced them)."""
    from sonossl.cli import main

    for setting, said in (("beams: 0", "tiny.simulate.beams: must be at least 8, got 0"),
                          ("crf: 99", "tiny.simulate.crf: must be from 0 (lossless) to 51"),
                          ("fps: 0.5", "tiny.simulate.fps: must be from 1 to 120, got 0.5"),
                          ("height: 20000", "tiny.simulate.height: must be an even number from 64 to 2048")):
        params = tmp_path / "p.yaml"
        params.write_text(f"profile: tiny\ntiny:\n  simulate:\n    {setting}\n")
        assert main(["simulate", "--params", str(params), "--out", str(tmp_path / "sim")]) == 2
        assert f"{params}: {said}" in capsys.readouterr().err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("precious")
    params.write_text("profile: tiny\ntiny:\n  simulate:\n    videos: 1\n")
    assert main(["simulate", "--params", str(params), "--out", str(mine)]) == 2
    assert "but no file simulator.json" in capsys.readouterr().err and (mine / "thesis.txt").read_text() == "precious"
    assert not (tmp_path / "sim").exists()


def test_sigterm_stops_the_workers_and_leaves_no_staging_folder(tmp_path):
    """`timeout`, a scheduler or `kill` end a run as Ctrl-C does: exit 143, the workers gone, no staging folder
    (SIGTERM left both workers alive and idle, and the staging folder, behind)."""
    import signal
    import subprocess
    import sys
    import time

    params = tmp_path / "p.yaml"
    params.write_text("profile: tiny\ntiny:\n  simulate:\n    videos: 24\n    seconds: 6\n    height: 96\n"
                      "    workers: 2\n")
    proc = subprocess.Popen([sys.executable, "-m", "sonossl.cli", "-q", "simulate", "--params", str(params),
                             "--out", str(tmp_path / "ds")], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".ds.staging-*/videos/*.mp4")) and time.monotonic() < deadline:
        time.sleep(0.1)
    children = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    assert children, "the run should render with two worker processes"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    assert "stopped (SIGTERM)" in proc.stderr.read()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.yaml"]
    time.sleep(0.5)
    for pid in children:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text(), pid
