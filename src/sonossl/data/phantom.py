"""A 3D analytic fetal phantom (about 20 weeks) inside a uterus and maternal abdominal wall.

The phantom answers one question for the B-mode renderer: at these 3D points, which tissue is there (and so its
echogenicity and attenuation)? Every structure is an analytic shape in *fetal* coordinates, in millimetres:
x to the fetal left, y anterior (ventral), z cranial, origin at the centre of the abdomen at the level of the
abdominal-circumference plane. Biometry follows SIMULATOR.md (BPD ~47 mm, HC ~175 mm, AC ~150 mm, femur ~33 mm,
transverse cardiac diameter ~22 mm), scaled per fetus by gestational age.

World coordinates belong to the mother and the probe: X lateral, Y along the maternal long axis, Z depth below the
skin (Z = 0). ``FetalPose`` places the fetus in the uterus (presentation, spine position, tilt).

    phantom = Phantom.random(np.random.default_rng(0))
    tissue = phantom.tissue_at(world_points_mm, t=0.0)    # (N,) uint8 tissue ids
    echo, atten = ECHO[tissue], ATTEN[tissue]

Simplifications (said here, as SIMULATOR.md asks): organs are ellipsoids, capsules and tubes; ribs are horizontal
elliptical arcs; vertebrae are spheres; the heart beats by scaling its cavities; the fetus does not move otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# ---- tissues: id -> (name, echogenicity (relative backscatter amplitude), attenuation dB/cm/MHz) ----
_TISSUES = [
    ("fluid", 0.012, 0.02),  # amniotic fluid: anechoic, almost no attenuation (posterior enhancement behind it)
    ("maternal_skin", 1.6, 0.9),
    ("fat", 0.28, 0.6),
    ("muscle", 0.65, 0.9),
    ("maternal", 0.42, 0.7),
    ("uterus", 0.75, 0.8),
    ("placenta", 0.55, 0.6),
    ("fetal_skin", 1.05, 0.7),
    ("soft", 0.45, 0.6),
    ("brain", 0.28, 0.5),
    ("csf", 0.015, 0.02),
    ("plexus", 1.15, 0.7),
    ("falx", 1.4, 0.8),
    ("thalamus", 0.16, 0.5),
    ("skull", 6.5, 4.0),  # a thin mid-trimester skull: bright, shadows only partly
    ("bone", 5.0, 14.0),
    ("lung", 0.8, 0.7),
    ("liver", 0.42, 0.6),
    ("bowel", 0.62, 0.7),
    ("myocardium", 0.7, 0.6),
    ("blood", 0.025, 0.15),
    ("valve", 1.1, 0.6),
    ("kidney", 0.28, 0.6),
    ("cord", 0.38, 0.5),
    ("cerebellum", 0.3, 0.5),
]
TISSUE_ID = {name: i for i, (name, _, _) in enumerate(_TISSUES)}
ECHO = np.array([e for _, e, _ in _TISSUES], dtype=np.float32)
ATTEN = np.array([a for _, _, a in _TISSUES], dtype=np.float32)
T = TISSUE_ID  # short alias for the painting code below


def _rot(axis: str, deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


# ---- shapes, evaluated on (N, 3) point arrays ----
# Each shape is computed only on the points inside its bounding box (a cheap comparison), then scattered back:
# the same masks at a fraction of the cost, since most shapes are small beside the slice.
def _in_box(q: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    # Height first (one contiguous column when q is Fortran-ordered): structures are spread along the fetal axis,
    # so this one pass leaves few points for the rest. Then the other two coordinates, one column at a time: a
    # reduction over rows of three (``.all(axis=1)``) costs more than the comparisons themselves.
    z = q[:, 2]
    i = np.flatnonzero((z >= lo[2]) & (z <= hi[2]))
    x, y = q[i, 0], q[i, 1]
    return i[(x >= lo[0]) & (x <= hi[0]) & (y >= lo[1]) & (y <= hi[1])]


def _sum3(v: np.ndarray) -> np.ndarray:
    """``v.sum(axis=1)`` of an (N, 3) array, added in the same order ((v0 + v1) + v2) without the slow reduction."""
    return v[:, 0] + v[:, 1] + v[:, 2]


def ellipsoid(q: np.ndarray, c, semi, rot: np.ndarray | None = None) -> np.ndarray:
    c, semi = np.asarray(c, float), np.asarray(semi, float)
    reach = semi if rot is None else np.full(3, semi.max())
    i = _in_box(q, c - reach, c + reach)
    out = np.zeros(len(q), bool)
    if len(i):
        p = q[i] - c
        if rot is not None:
            p = p @ rot  # rot's columns are the ellipsoid's axes
        out[i] = _sum3((p / semi) ** 2) <= 1.0
    return out


def capsule(q: np.ndarray, a, b, r: float) -> np.ndarray:
    a, b = np.asarray(a, float), np.asarray(b, float)
    i = _in_box(q, np.minimum(a, b) - r, np.maximum(a, b) + r)
    out = np.zeros(len(q), bool)
    if len(i):
        ab = b - a
        p = q[i] - a
        t = np.clip((p @ ab) / (ab @ ab), 0.0, 1.0)
        out[i] = _sum3((p - t[:, None] * ab) ** 2) <= r * r
    return out


def tube(q: np.ndarray, points, r: float) -> np.ndarray:
    """Points within ``r`` of a polyline."""
    inside = np.zeros(len(q), bool)
    for a, b in zip(points[:-1], points[1:], strict=True):
        inside |= capsule(q, a, b, r)
    return inside


@dataclass(frozen=True)
class FetalPose:
    """Where the fetus lies in the world: rotation (columns = fetal axes in world) and position of its origin."""

    rotation: np.ndarray  # (3, 3)
    origin: np.ndarray  # (3,) mm, world
    presentation: str  # cephalic | breech
    spine: str  # anterior | posterior | left | right (relative to the mother)

    def to_fetal(self, w: np.ndarray, scale: float) -> np.ndarray:
        return ((w - self.origin) @ self.rotation) / scale

    def to_world(self, q: np.ndarray, scale: float) -> np.ndarray:
        return (np.asarray(q) * scale) @ self.rotation.T + self.origin

    def axis_world(self, q_axis) -> np.ndarray:
        return self.rotation @ np.asarray(q_axis, float)


@dataclass(frozen=True)
class Anatomy:
    """Landmarks of one fetus, in fetal coordinates (mm, before the gestational-age scale)."""

    head_c: tuple = (0.0, 4.0, 90.0)
    head_semi: tuple = (23.5, 30.0, 25.0)  # x: BPD/2, y: OFD/2
    tv_z: float = 93.0  # transventricular plane
    heart_c: tuple = (3.5, 4.0, 38.0)  # four-chamber plane at its z (a rib level)
    abd_z: float = 0.0  # abdominal-circumference plane
    trunk_c: tuple = (0.0, 0.0, 8.0)
    trunk_semi: tuple = (24.0, 23.0, 48.0)
    spine_z: tuple = (-36.0, 64.0)
    vertebra_step: float = 3.6
    rib_z: tuple = (14.0, 20.0, 26.0, 32.0, 38.0, 44.0, 50.0)
    femur_len: float = 33.0

    def trunk_radii(self, z):
        zc, (ax, ay, az) = self.trunk_c[2], self.trunk_semi
        k = np.sqrt(np.clip(1 - ((np.asarray(z) - zc) / az) ** 2, 0.0, 1.0))
        return ax * k, ay * k

    def spine_y(self, z):
        """y of the vertebral bodies: they follow the posterior body wall, into the neck."""
        _, ry = self.trunk_radii(z)
        return -np.maximum(ry - 6.5, 4.0)


class Phantom:
    """One virtual fetus in one mother. Build with ``Phantom.random(rng)``."""

    def __init__(
        self,
        pose: FetalPose,
        scale: float,
        ga_weeks: float,
        femur_dirs: tuple[np.ndarray, np.ndarray],
        shank_dirs: tuple[np.ndarray, np.ndarray],
        arm_dirs: tuple[np.ndarray, np.ndarray],
        uterus_c: np.ndarray,
        uterus_semi: np.ndarray,
        placenta_dir: np.ndarray,
        cord_points: np.ndarray,
        heart_rate_hz: float,
        wall: tuple[float, float, float],
    ):
        self.pose, self.scale, self.ga_weeks = pose, scale, ga_weeks
        self.anat = Anatomy()
        self.femur_dirs, self.shank_dirs, self.arm_dirs = femur_dirs, shank_dirs, arm_dirs
        self.uterus_c, self.uterus_semi, self.placenta_dir = uterus_c, uterus_semi, placenta_dir
        self.cord_points, self.heart_rate_hz = cord_points, heart_rate_hz
        self.wall = wall  # depths (mm) where maternal skin, fat and muscle end

    # ---- construction ----
    @classmethod
    def random(cls, rng: np.random.Generator) -> Phantom:
        ga = float(rng.uniform(18.0, 22.0))
        scale = 1.0 + 0.05 * (ga - 20.0)  # biometry grows ~5% per week around mid-trimester
        presentation = str(rng.choice(["cephalic", "breech"], p=[0.7, 0.3]))
        spine = str(rng.choice(["posterior", "anterior", "left", "right"], p=[0.35, 0.25, 0.2, 0.2]))
        # Maternal +Y is cranial. Cephalic: the fetal head points to the pelvis (fetal z = -Y); breech: +Y. The belly
        # starts facing the probe (fetal y = -Z, spine posterior); the roll below turns the spine where it lies.
        z_axis = np.array([0.0, -1.0 if presentation == "cephalic" else 1.0, 0.0])
        y_axis = np.array([0.0, 0.0, -1.0])
        base = np.column_stack([np.cross(y_axis, z_axis), y_axis, z_axis])
        # Spine position: rolling the fetus about its own long axis (fetal z).
        roll = {"posterior": 0.0, "anterior": 180.0, "left": 90.0, "right": -90.0}[spine]
        roll += rng.normal(0, 15)
        rotation = base @ _rot("z", roll)
        rotation = _rot("x", rng.normal(0, 8)) @ _rot("z", rng.normal(0, 12)) @ rotation  # tilt in the uterus
        origin = np.array([rng.uniform(-15, 15), rng.uniform(-20, 20), rng.uniform(82, 96)])
        pose = FetalPose(rotation=rotation, origin=origin, presentation=presentation, spine=spine)

        def limb(sign, y, z_down, spread):
            v = np.array([sign * spread, y, -z_down]) + rng.normal(0, 0.15, 3)
            return v / np.linalg.norm(v)

        # Hip flexion and abduction. A femur plane needs a femur within the probe's tilt of horizontal, which
        # sonographers nearly always find: redraw a few times until one thigh is not pointing at the probe.
        for _ in range(30):
            flex = np.deg2rad(rng.uniform(45, 105))
            femurs = tuple(limb(s, np.sin(flex), np.cos(flex), rng.uniform(0.2, 0.9)) for s in (1, -1))
            steep = [abs(rotation @ f)[2] for f in femurs]
            if min(steep) < np.sin(np.radians(30)):
                break
        shanks = tuple(limb(s, -0.2, 1.0, 0.1) for s in (1, -1))
        arms = tuple(limb(s, 0.8, 0.6, 0.35) for s in (1, -1))
        # The uterus holds the whole fetus (rump z=-40 to vertex z=116) with fluid around it.
        uterus_c = origin + rotation @ np.array([0.0, 0.0, 20.0 * scale]) + np.array([0.0, 0.0, 5.0])
        uterus_semi = np.array([rng.uniform(85, 100), rng.uniform(135, 150), rng.uniform(70, 80)])
        # Placenta: posterior, fundal, lateral or (less often) anterior, where it lies between probe and fetus.
        sites = ([0, 0, 1], [0, 1, 0], [0, -1, 0], [1, 0, 0], [-1, 0, 0], [0, 0, -1])
        placenta_dir = np.array(sites[int(rng.choice(6, p=[0.3, 0.15, 0.15, 0.15, 0.15, 0.1]))], float)
        cord = np.array([[0, 22, -14], [0, 33, -22], [8, 42, -8], [18, 44, 10], [26, 40, 26.0]])
        cord[2:] += rng.normal(0, 6, (3, 3))
        wall = (2.0, 2.0 + rng.uniform(8, 18), 0.0)
        wall = (wall[0], wall[1], wall[1] + rng.uniform(6, 10))
        return cls(pose, scale, ga, femurs, shanks, arms, uterus_c, uterus_semi, placenta_dir, cord,
                   float(rng.uniform(2.2, 2.5)), wall)

    # ---- landmarks (fetal coordinates) used by the plane definitions ----
    def hip(self, side: int) -> np.ndarray:
        return np.array([9.5 * side, -3.0, -36.0])  # at the lower trunk surface: the thigh starts outside the body

    def femur_ends(self, side: int) -> tuple[np.ndarray, np.ndarray]:
        d = self.femur_dirs[0 if side > 0 else 1]
        a = self.hip(side) + 2.5 * d
        return a, a + self.anat.femur_len * d

    # ---- painting ----
    def tissue_at(self, w: np.ndarray, t: float = 0.0, face_depth: np.ndarray | None = None) -> np.ndarray:
        """Tissue id (uint8) at world points ``w`` (N, 3) mm, at time ``t`` s (the heart beats).

        ``face_depth`` (N,) is each point's depth below the probe face: the probe presses the abdominal wall flat,
        so skin, fat and muscle lie parallel to the face whatever its tilt. Without it, world depth is used.
        """
        tid = np.full(len(w), T["maternal"], np.uint8)
        z = w[:, 2]
        fd = z if face_depth is None else face_depth
        tid[fd < self.wall[2]] = T["muscle"]
        tid[fd < self.wall[1]] = T["fat"]
        tid[fd < self.wall[0]] = T["maternal_skin"]
        # Uterus wall, amniotic fluid, placenta (world coordinates).
        rel = (w - self.uterus_c) / self.uterus_semi
        rho = np.sqrt((rel**2).sum(axis=1))
        in_uterus = (rho <= 1.0) & (fd >= self.wall[2])
        tid[in_uterus] = T["uterus"]
        cavity = in_uterus & (rho <= 1.0 - 8.0 / self.uterus_semi.min())
        tid[cavity] = T["fluid"]
        side = rel @ self.placenta_dir / np.maximum(rho, 1e-6)
        tid[cavity & (rho > 1.0 - 30.0 / self.uterus_semi.min()) & (side > 0.6)] = T["placenta"]

        # Fetal structures: only points near the fetus are worth evaluating.
        q = self.pose.to_fetal(w, self.scale)
        near = cavity & (np.abs(q[:, 0]) < 60) & (np.abs(q[:, 1]) < 70) & (q[:, 2] > -75) & (q[:, 2] < 125)
        idx = np.flatnonzero(near)
        if len(idx):
            sub = tid[idx]
            self._paint_fetus(np.asfortranarray(q[idx]), sub, t)
            tid[idx] = sub
        return tid

    def _paint_fetus(self, q: np.ndarray, tid: np.ndarray, t: float) -> None:
        a = self.anat
        x, y, z = q[:, 0], q[:, 1], q[:, 2]

        def paint(mask, name):
            tid[mask] = T[name]

        # Umbilical cord floating in the fluid (painted first: the body covers its insertion).
        paint(tube(q, self.cord_points, 5.0), "cord")
        paint(tube(q, self.cord_points, 2.0), "blood")

        # Limbs: soft tissue capsules around bones.
        for k, s in enumerate((1, -1)):
            _, f1 = self.femur_ends(s)
            knee = f1 + 2.0 * self.femur_dirs[k]
            ankle = knee + 30.0 * self.shank_dirs[k]
            paint(capsule(q, self.hip(s), knee, 7.5), "fetal_skin")
            paint(capsule(q, self.hip(s), knee, 6.5), "soft")
            paint(capsule(q, knee, ankle, 5.5), "fetal_skin")
            paint(capsule(q, knee, ankle, 4.6), "soft")
            paint(capsule(q, knee + 2.0 * self.shank_dirs[k], ankle - 2.0 * self.shank_dirs[k], 1.5), "bone")
            sh = np.array([16.0 * s, -2.0, 48.0])
            elbow = sh + 30.0 * self.arm_dirs[k]
            hand = elbow + 24.0 * np.array([-0.5 * s, 0.7, 0.5]) / np.linalg.norm([0.5, 0.7, 0.5])
            paint(capsule(q, sh, elbow, 5.5), "fetal_skin")
            paint(capsule(q, sh, elbow, 4.6), "soft")
            paint(capsule(q, elbow, hand, 4.5), "soft")
            paint(capsule(q, sh + 2.0 * self.arm_dirs[k], elbow - 1.5 * self.arm_dirs[k], 1.7), "bone")
            paint(capsule(q, elbow, hand, 1.0), "bone")

        # Trunk, neck and head with their skin.
        paint(ellipsoid(q, a.trunk_c, a.trunk_semi), "fetal_skin")
        paint(ellipsoid(q, a.trunk_c, np.subtract(a.trunk_semi, 1.3)), "soft")
        paint(capsule(q, (0, -1, 50), (0, 0, 70), 12.0), "fetal_skin")
        paint(capsule(q, (0, -1, 50), (0, 0, 70), 10.8), "soft")
        paint(ellipsoid(q, a.head_c, np.add(a.head_semi, 1.8)), "fetal_skin")
        paint(ellipsoid(q, a.head_c, np.add(a.head_semi, 0.8)), "soft")
        paint(ellipsoid(q, a.head_c, a.head_semi), "skull")
        brain = ellipsoid(q, a.head_c, np.subtract(a.head_semi, 2.6))
        paint(brain, "brain")

        # Head interior (transventricular level tv_z; thalami and cerebellum lower, as in the real planes).
        hy = a.head_c[1]
        tv = a.tv_z
        paint(brain & (np.abs(x) < 0.7), "falx")
        paint(brain & ellipsoid(q, (0, hy + 13.0, tv), (2.6, 4.2, 6.0)), "csf")  # cavum septi pellucidi
        for s in (1, -1):
            paint(ellipsoid(q, (5.5 * s, hy + 12.0, tv + 2.0), (2.0, 7.0, 4.5)), "csf")  # frontal horns
            paint(ellipsoid(q, (9.5 * s, hy - 14.0, tv), (3.8, 6.5, 7.0)), "csf")  # atrium of lateral ventricle
            paint(ellipsoid(q, (9.3 * s, hy - 14.5, tv), (2.6, 4.8, 5.2)), "plexus")  # choroid plexus
            paint(ellipsoid(q, (6.5 * s, hy + 1.0, tv - 8.0), (6.0, 8.5, 5.5)), "thalamus")
            paint(ellipsoid(q, (6.0 * s, hy - 19.0, tv - 14.0), (6.5, 5.0, 5.5)), "cerebellum")
            paint(ellipsoid(q, (11.0 * s, hy + 25.0, tv - 16.0), (5.0, 4.5, 5.0)), "csf")  # orbits
        paint(brain & ellipsoid(q, (0, hy - 26.0, tv - 15.0), (5.0, 3.0, 4.0)), "csf")  # cisterna magna

        # Trunk interior: lungs in the thorax, liver above bowel in the abdomen.
        inner = ellipsoid(q, a.trunk_c, np.subtract(a.trunk_semi, 4.5))
        paint(inner & (z > 20.0), "lung")
        paint(inner & (z <= 20.0) & (z > -9.0), "liver")
        paint(inner & (z <= -9.0), "bowel")

        # Heart: four chambers in an ellipsoid whose long axis points to the left and anteriorly (apex).
        hc = np.asarray(a.heart_c)
        rot = _rot("z", 45.0)  # columns: apex direction u (left-anterior), v, z
        paint(ellipsoid(q, hc, (12.5, 10.0, 9.5), rot), "myocardium")
        beat = 1.0 + 0.07 * np.sin(2 * np.pi * self.heart_rate_hz * t)
        cav = ellipsoid(q, hc, (10.0 * beat, 7.6 * beat, 7.4 * beat), rot)
        local = (q - hc) @ rot
        septum = np.abs(local[:, 1]) < 1.1
        av_plane = np.abs(local[:, 0] + 1.5) < 0.55
        paint(cav, "blood")
        paint(cav & septum, "myocardium")
        paint(cav & av_plane & ~septum, "valve")
        # Descending aorta, left of and in front of the spine.
        paint(capsule(q, (2.5, a.spine_y(42.0) + 6.5, 46.0), (2.5, a.spine_y(-8.0) + 6.5, -8.0), 2.3), "blood")

        # Abdomen: stomach bubble (left), umbilical vein curving into the liver to the portal sinus, kidneys, bladder.
        paint(ellipsoid(q, (9.0, 1.0, 2.0), (6.0, 7.5, 8.0)), "csf")
        uv = [(0, 22, -14), (0, 17.5, -5), (-1.0, 12.0, -0.5), (-4.0, 6.5, 0.3), (-7.0, 4.0, 1.0)]
        paint(tube(q, uv, 1.9), "blood")
        for s in (1, -1):
            kc = (10.5 * s, a.spine_y(-12.0) + 7.5, -12.0)
            paint(ellipsoid(q, kc, (5.0, 4.5, 9.0)), "kidney")
            paint(ellipsoid(q, kc, (1.6, 1.6, 3.0)), "csf")
        paint(ellipsoid(q, (0, 9.0, -30.0), (6.0, 6.0, 6.5)), "csf")

        # Ribs: elliptical arcs hugging the thoracic wall, open anteriorly.
        rz = np.asarray(a.rib_z)
        k = np.clip(np.searchsorted(rz, z), 1, len(rz) - 1)
        zk = np.where(np.abs(z - rz[k - 1]) < np.abs(z - rz[k]), rz[k - 1], rz[k])
        rx, ry = a.trunk_radii(zk)
        rx, ry = rx - 2.8, ry - 2.8
        e = np.sqrt((x / np.maximum(rx, 1)) ** 2 + (y / np.maximum(ry, 1)) ** 2)
        radial = (e - 1.0) * 0.5 * (rx + ry)
        rib = (radial**2 + (z - zk) ** 2 < 1.15**2) & (y < 0.55 * ry)
        paint(rib, "bone")

        # Spine: vertebral bodies and two laminae per level, converging towards the sacrum.
        z0, z1 = a.spine_z
        kz = np.clip(np.round((z - z0) / a.vertebra_step), 0, round((z1 - z0) / a.vertebra_step))
        zk = z0 + kz * a.vertebra_step
        ys = a.spine_y(zk)
        wsp = np.clip((zk - z0) / 25.0, 0.45, 1.0)
        near = np.abs(z - zk) < 2.2
        body = near & ((x**2 + (y - ys) ** 2 + (z - zk) ** 2) < (1.2 + 0.8 * wsp) ** 2)
        lam = np.zeros(len(q), bool)
        for s in (1, -1):
            lam |= near & (((x - s * 2.8 * wsp) ** 2 + (y - ys + 3.6 * wsp) ** 2 + (z - zk) ** 2) < 1.45**2)
        paint(body | lam, "bone")

        # Long bones last: they are brighter than everything around them.
        for s in (1, -1):
            f0, f1 = self.femur_ends(s)
            paint(capsule(q, f0, f1, 2.1), "bone")
