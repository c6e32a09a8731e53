"""Standard planes and the geometric label of a slice (after ISUOG practice guidelines; see SIMULATOR.md).

A frame is an image plane in the world: the probe's virtual apex ``o``, the lateral direction ``u`` and the central
beam direction ``d`` (depth); its normal is ``n = u x d``. A frame is labelled with a standard plane only when its
geometry says so: the slice lies within ``max_angle`` degrees and ``max_dist`` mm of that plane's canonical pose and
the plane's key structures fall inside the sector. Everything else, near misses included, is ``background``.

    plane = ImagePlane(o, u, d, sector)
    label = label_frame(plane, canonical_planes(phantom))    # label.name, label.angles['head'], ...
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sonossl.data.phantom import Phantom

CLASSES = ("background", "head", "abdomen", "heart", "femur", "spine")
DESCRIPTION = {
    "background": "any slice that is not a standard plane, near misses included",
    "head": "transventricular head plane: midline, cavum septi pellucidi, atria with choroid plexus, oval skull",
    "abdomen": "abdominal circumference plane: stomach bubble, umbilical vein at the portal sinus, spine, round outline",
    "heart": "four-chamber heart plane: four chambers and the crux, a complete rib on each side",
    "femur": "femur plane: femur long axis close to horizontal, both ends visible",
    "spine": "sagittal spine plane: the vertebral column along its length, skin intact over it",
}
MAX_ANGLE_DEG = 12.0
MAX_DIST_MM = {"head": 4.0, "abdomen": 4.0, "heart": 4.0, "femur": 3.0, "spine": 3.0}
FEMUR_MAX_SLOPE_DEG = 30.0  # "close to horizontal" in the image


@dataclass(frozen=True)
class Sector:
    """Curvilinear probe geometry: beams leave an arc of radius ``radius`` around the virtual apex."""

    radius: float = 40.0  # mm, radius of curvature of the probe face
    depth: float = 130.0  # mm of tissue shown below the probe face
    half_angle: float = 35.0  # degrees


@dataclass(frozen=True)
class ImagePlane:
    o: np.ndarray  # virtual apex, world mm
    u: np.ndarray  # lateral unit vector (image x)
    d: np.ndarray  # central-beam unit vector (image y, depth)
    sector: Sector

    @property
    def n(self) -> np.ndarray:
        return np.cross(self.u, self.d)

    def in_plane(self, pts: np.ndarray) -> np.ndarray:
        """(N, 2) lateral and axial mm of world points projected on the plane, relative to the apex."""
        rel = np.atleast_2d(pts) - self.o
        return np.stack([rel @ self.u, rel @ self.d], axis=1)

    def in_sector(self, pts: np.ndarray, margin: float = 3.0) -> np.ndarray:
        ab = self.in_plane(pts)
        r = np.hypot(ab[:, 0], ab[:, 1])
        ang = np.degrees(np.arctan2(ab[:, 0], ab[:, 1]))
        s = self.sector
        return (r > s.radius + margin) & (r < s.radius + s.depth - margin) & (np.abs(ang) < s.half_angle - 2.0)


@dataclass(frozen=True)
class Canonical:
    """A standard plane's canonical pose in world coordinates, and what must be visible in it."""

    name: str
    point: np.ndarray
    normal: np.ndarray
    keys: np.ndarray  # (K, 3) key structures (also where the gaze goes)
    beam: np.ndarray | None = None  # preferred beam direction (femur: perpendicular to the bone); None = straight down
    axis: np.ndarray | None = None  # femur only: the bone's direction


def _unit(v) -> np.ndarray:
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)


def canonical_planes(ph: Phantom) -> list[Canonical]:
    a, pose, s = ph.anat, ph.pose, ph.scale
    W = lambda q: pose.to_world(np.atleast_2d(np.asarray(q, float)), s)  # noqa: E731
    fz, fx = pose.axis_world([0, 0, 1]), pose.axis_world([1, 0, 0])
    hy = a.head_c[1]
    tv = a.tv_z
    planes = [
        Canonical("head", W([0, hy, tv])[0], fz, W([
            (0, hy + 13.0, tv), (9.5, hy - 14.0, tv), (-9.5, hy - 14.0, tv),
            (0, hy + a.head_semi[1] - 1, tv), (0, hy - a.head_semi[1] + 1, tv),
            (a.head_semi[0] - 1, hy, tv), (-a.head_semi[0] + 1, hy, tv)])),
    ]
    rx, ry = (float(v) for v in a.trunk_radii(a.abd_z))
    planes.append(Canonical("abdomen", W([0, 0, a.abd_z])[0], fz, W([
        (9.0, 1.0, a.abd_z), (-4.0, 6.5, a.abd_z), (0, float(a.spine_y(a.abd_z)), a.abd_z),
        (rx - 1, 0, a.abd_z), (-rx + 1, 0, a.abd_z), (0, ry - 1, a.abd_z), (0, -ry + 1, a.abd_z)])))
    hcx, hcy, hcz = a.heart_c
    rx, ry = (float(v) for v in a.trunk_radii(hcz))
    planes.append(Canonical("heart", W(a.heart_c)[0], fz, W([
        (hcx - 1.0, hcy - 1.0, hcz), (hcx + 6.0, hcy + 2.0, hcz), (hcx + 2.0, hcy + 6.0, hcz),
        (hcx - 5.0, hcy - 2.0, hcz), (rx - 1, 0, hcz), (-rx + 1, 0, hcz)])))
    for side in (1, -1):
        f0, f1 = (W(p)[0] for p in ph.femur_ends(side))
        axis = _unit(f1 - f0)
        z = np.array([0.0, 0.0, 1.0])
        beam = z - (z @ axis) * axis
        beam = _unit(beam) if np.linalg.norm(beam) > 1e-6 else z
        mid = 0.5 * (f0 + f1)
        planes.append(Canonical("femur", mid, _unit(np.cross(axis, beam)),
                                np.stack([f0, mid, f1]), beam=beam, axis=axis))
    zs = (-20.0, 10.0, 38.0)
    planes.append(Canonical("spine", W([0, float(a.spine_y(10.0)), 10.0])[0], fx,
                            W([(0, float(a.spine_y(zz)), zz) for zz in zs])))
    return planes


def plane_pose_error(plane: ImagePlane, c: Canonical) -> tuple[float, float]:
    """(angle in degrees, distance in mm) between a frame and a canonical plane."""
    if c.axis is not None:  # femur: the bone must lie in the slice
        angle = np.degrees(np.arcsin(min(1.0, abs(float(c.axis @ plane.n)))))
    else:
        angle = np.degrees(np.arccos(min(1.0, abs(float(c.normal @ plane.n)))))
    dist = abs(float((c.point - plane.o) @ plane.n))
    return float(angle), dist


@dataclass(frozen=True)
class FrameLabel:
    name: str  # one of CLASSES
    plane: Canonical | None  # the standard plane matched (which femur, say), None on background
    angles: dict[str, float]  # best angle (degrees) to each standard plane
    dists: dict[str, float]  # and the distance (mm) that went with it


def label_frame(plane: ImagePlane, canon: list[Canonical]) -> FrameLabel:
    """The frame's label from its geometry, and how far it is from each standard plane."""
    best: tuple[float, Canonical] | None = None
    angles: dict[str, float] = {}
    dists: dict[str, float] = {}
    for c in canon:
        angle, dist = plane_pose_error(plane, c)
        score = angle / MAX_ANGLE_DEG + dist / MAX_DIST_MM[c.name]
        if c.name not in angles or score < angles[c.name] / MAX_ANGLE_DEG + dists[c.name] / MAX_DIST_MM[c.name]:
            angles[c.name], dists[c.name] = angle, dist
        ok = angle <= MAX_ANGLE_DEG and dist <= MAX_DIST_MM[c.name] and bool(plane.in_sector(c.keys).all())
        if ok and c.axis is not None:
            slope = np.degrees(np.arctan2(abs(float(c.axis @ plane.d)), abs(float(c.axis @ plane.u))))
            ok = slope <= FEMUR_MAX_SLOPE_DEG
        if ok and (best is None or score < best[0]):
            best = (score, c)
    if best is None:
        return FrameLabel("background", None, angles, dists)
    return FrameLabel(best[1].name, best[1], angles, dists)
