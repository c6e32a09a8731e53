"""The virtual sonographer: how the probe moves during a sweep.

A probe pose is five numbers ``(ox, oy, ta, tb, psi)``: the probe's position on the maternal skin (mm), its tilt
(``ta``, ``tb``: the beam direction is ``normalize(ta, tb, 1)``) and its rotation ``psi`` about the beam. The script
of a sweep is a sequence of segments, as a sonographer scans (SIMULATOR.md, "The sonographer"):
- ``sweep``: glide along (or across) the fetus at 1-2 cm/s;
- ``travel`` / ``search``: move towards a standard plane and make small decaying corrections around it;
- ``hold``: stay on the plane for 1-3 s (sometimes frozen frames); a fifth of the holds settle on a near miss;
- ``lost``: loss of skin contact, a fraction of a second of dark frames.
Hand tremor (a fraction of a millimetre and of a degree) is added everywhere except on frozen frames.

    path = sonographer_path(phantom, canonical_planes(phantom), n_frames=200, fps=20, sector=Sector(), rng=rng)
    plane = plane_from_pose(path.poses[t], sector)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sonossl.data.phantom import Phantom
from sonossl.data.planes import Canonical, ImagePlane, Sector, label_frame

MAX_TILT_DEG = 38.0
# How often each plane is chosen when reachable: the sagittal spine is reachable in fewer fetuses (spine up or down)
# and the transverse trunk planes are also crossed by every sweep, so the weights even out the classes.
TARGET_WEIGHT = {"head": 1.0, "abdomen": 0.7, "heart": 0.8, "femur": 1.2, "spine": 2.5}
SEGMENTS = ("sweep", "travel", "search", "hold", "lost")
# A sonographer settling on a plane corrects until the screen shows it: this many tries of the residual error.
SETTLE_TRIES = 16
_X = np.array([1.0, 0.0, 0.0])
_Z = np.array([0.0, 0.0, 1.0])


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _frame(pose: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = _unit(np.array([pose[2], pose[3], 1.0]))
    u0 = _unit(_X - (_X @ d) * d)
    u = np.cos(pose[4]) * u0 + np.sin(pose[4]) * np.cross(d, u0)
    return u, d


def plane_from_pose(pose: np.ndarray, sector: Sector) -> ImagePlane:
    u, d = _frame(pose)
    return ImagePlane(o=np.array([pose[0], pose[1], -sector.radius]), u=u, d=d, sector=sector)


def pose_for_plane(c: Canonical, sector: Sector, psi_near: float = 0.0) -> np.ndarray | None:
    """The probe pose that shows canonical plane ``c``, or None when no probe position on the skin reaches it."""
    n = c.normal
    d = c.beam if c.beam is not None else _Z - (_Z @ n) * n
    if np.linalg.norm(d) < 1e-6:
        return None
    d = _unit(d)
    if d[2] < np.cos(np.radians(MAX_TILT_DEG)):
        return None
    t = (c.point[2] + sector.radius) / d[2]
    if not (sector.radius + 15.0 < t < sector.radius + sector.depth - 15.0):
        return None
    o = c.point - t * d
    u = np.cross(d, n)
    u0 = _unit(_X - (_X @ d) * d)
    psi = _nearest_turn(float(np.arctan2(u @ np.cross(d, u0), u @ u0)), psi_near)
    return np.array([o[0], o[1], d[0] / d[2], d[1] / d[2], psi])


@dataclass
class ProbePath:
    poses: np.ndarray  # (T, 5)
    segment: np.ndarray  # (T,) str, one of SEGMENTS
    frozen: np.ndarray  # (T,) bool: the scanner repeats the previous image
    contact: np.ndarray  # (T,) float in [0, 1]: skin contact
    target: np.ndarray  # (T,) str: the plane being searched for or held, else ""


def _nearest_turn(psi: float, psi_near: float) -> float:
    """``psi`` plus a multiple of pi, closest to ``psi_near``: u and -u show the same plane (mirrored), and the hand
    takes the short way round."""
    return psi + np.pi * round((psi_near - psi) / np.pi)


def _smooth(a: float) -> float:
    return a * a * (3 - 2 * a)


def _settle(tgt: np.ndarray, name: str, canon: list[Canonical], sector: Sector,
            rng: np.random.Generator) -> np.ndarray:
    """The residual error of a hold on plane ``name``: a random small error, redrawn until the plane's key structures
    show and the slice is within the label's tolerance (the sonographer watches the screen). Without this, a 1.4 deg
    tilt error alone moves a slice 100 mm deep by 2.5 mm, and half of the holds meant to be on a plane missed it.
    Falls back to no error (tremor still applies) when no draw fits."""
    for _ in range(SETTLE_TRIES):
        eps = np.concatenate([rng.normal(0, 0.6, 2), rng.normal(0, 0.025, 2), rng.normal(0, np.radians(3), 1)])
        if label_frame(plane_from_pose(tgt + eps, sector), canon).name == name:
            return eps
    return np.zeros(5)


def sonographer_path(
    ph: Phantom, canon: list[Canonical], n_frames: int, fps: float, sector: Sector, rng: np.random.Generator
) -> ProbePath:
    dt = 1.0 / fps
    poses: list[np.ndarray] = []
    seg: list[str] = []
    frozen: list[bool] = []
    contact: list[float] = []
    target: list[str] = []
    axis = ph.pose.axis_world([0, 0, 1])[:2]
    axis = axis / np.linalg.norm(axis)  # fetal long axis on the skin
    centre = ph.pose.origin[:2] + axis * 30.0 * ph.scale

    def transverse_psi(psi_near: float, sagittal: bool = False) -> float:
        n = np.array([axis[0], axis[1], 0.0])
        if sagittal:
            n = np.array([-axis[1], axis[0], 0.0])
        u = np.cross(_Z, n)
        return _nearest_turn(float(np.arctan2(u @ np.cross(_Z, _X), u @ _X)), psi_near)

    def emit(p, kind, tgt="", freeze=False, c=1.0):
        poses.append(np.array(p, float))
        seg.append(kind)
        frozen.append(freeze)
        contact.append(c)
        target.append(tgt)

    def move(p0, p1, seconds, kind, tgt=""):
        n = max(1, int(round(seconds * fps)))
        for i in range(1, n + 1):
            emit(p0 + (p1 - p0) * _smooth(i / n), kind, tgt)
        return np.array(p1, float)

    # The scan starts anywhere along the fetus, from the femurs to the head, not always at the chest: from the chest,
    # the travel to the head or a femur (60-80 mm) and the search that follows fill most of a short sweep.
    along = [float(np.dot(c.point[:2] - centre, axis)) for c in canon]
    s0 = centre + axis * rng.uniform(min(along), max(along))
    start = np.array([s0[0], s0[1], 0.0, 0.0, 0.0])
    start[4] = transverse_psi(0.0)
    p = start
    lost_done = False
    visited: set[str] = set()
    reachable = {}
    for c in canon:
        if pose_for_plane(c, sector) is not None:
            reachable.setdefault(c.name, []).append(c)

    while len(poses) < n_frames:
        r = rng.random()
        if r < 0.08 and not lost_done and len(poses) > fps:
            lost_done = True
            for i in range(max(2, int(rng.uniform(0.25, 0.6) * fps))):
                emit(p, "lost", c=0.0)
            continue
        if r < 0.35 or not reachable:
            sagittal = rng.random() < 0.3
            psi = transverse_psi(p[4], sagittal)
            p = move(p, np.array([p[0], p[1], 0.0, 0.0, psi]), 0.4, "sweep")
            direction = np.array([-axis[1], axis[0]]) if sagittal else axis
            direction = direction * rng.choice([-1.0, 1.0])
            # Turn back when the sweep would leave the fetus.
            if np.dot(p[:2] + direction * 40 - centre, direction) > 90 * ph.scale:
                direction = -direction
            speed, seconds = rng.uniform(10.0, 20.0), rng.uniform(1.5, 4.0)
            end = p.copy()
            end[:2] = p[:2] + direction * speed * seconds
            end[2:4] = rng.normal(0, 0.05, 2)
            p = move(p, end, seconds, "sweep")
            continue
        # A sonographer works through a checklist: planes not yet visited in this sweep come first.
        todo = [k for k in reachable if k not in visited] or list(reachable)
        w = np.array([TARGET_WEIGHT[k] for k in todo])
        name = todo[int(rng.choice(len(todo), p=w / w.sum()))]
        visited.add(name)
        c = reachable[name][int(rng.integers(len(reachable[name])))]
        tgt = pose_for_plane(c, sector, psi_near=p[4])
        delta = np.concatenate([rng.normal(0, 6.0, 2), rng.normal(0, 0.14, 2), rng.normal(0, np.radians(10), 1)])
        dist = np.linalg.norm(tgt[:2] - p[:2])
        p = move(p, tgt + delta, float(np.clip(dist / 25.0 + 0.3, 0.4, 2.5)), "travel", name)
        # Decaying corrections around the plane; settle on it, or (one time in five) on a near miss.
        if rng.random() < 0.8:
            eps = _settle(tgt, name, canon, sector, rng)
        else:
            eps = np.concatenate([rng.normal(0, 1.0, 2), rng.normal(0, 0.02, 2), rng.normal(0, np.radians(3), 1)])
            miss = rng.choice(["shift", "tilt"])
            if miss == "shift":  # slide along the plane normal by 5-9 mm
                shift = (c.normal[:2] if np.linalg.norm(c.normal[:2]) > 0.3 else np.array([1.0, 0.0]))
                eps[:2] += shift / np.linalg.norm(shift) * rng.uniform(5.0, 9.0) * rng.choice([-1, 1])
            else:  # tilt by 14-22 degrees
                eps[2 + int(rng.integers(2))] += np.tan(np.radians(rng.uniform(14, 22))) * rng.choice([-1, 1])
        f, tau = rng.uniform(0.8, 1.6), rng.uniform(0.3, 0.6)
        n_search = int(rng.uniform(0.8, 2.0) * fps)
        for i in range(1, n_search + 1):
            s = i * dt
            decay = np.exp(-s / tau)
            emit(tgt + delta * decay * np.cos(2 * np.pi * f * s) + eps * (1 - decay), "search", name)
        p = tgt + eps
        n_hold = int(rng.uniform(1.0, 3.0) * fps)
        freeze_at = int(rng.integers(n_hold)) if rng.random() < 0.25 else -1
        n_freeze = int(rng.uniform(0.5, 1.0) * fps)
        for i in range(n_hold):
            emit(p, "hold", name, freeze=freeze_at >= 0 and freeze_at < i <= freeze_at + n_freeze)

    k = n_frames
    poses_a = np.stack(poses[:k])
    # Hand tremor: an Ornstein-Uhlenbeck wobble in position and angle.
    sigma = np.array([0.25, 0.25, 0.004, 0.004, np.radians(0.3)])
    wob = np.zeros((k, 5))
    for i in range(1, k):
        wob[i] = 0.8 * wob[i - 1] + rng.normal(0, 1, 5) * sigma * 0.6
    frozen_a = np.array(frozen[:k])
    frozen_a[0] = False
    poses_a = poses_a + wob
    for i in np.flatnonzero(frozen_a):
        poses_a[i] = poses_a[i - 1]
    return ProbePath(poses=poses_a, segment=np.array(seg[:k]), frozen=frozen_a,
                     contact=np.array(contact[:k], float), target=np.array(target[:k]))
