"""B-mode rendering of one slice through the phantom, as a curvilinear scanner would show it.

The chain follows the physics loosely but in the right order (SIMULATOR.md, "Imaging"):
1. sample the slice on beam lines (polar grid: depth x beam) and look up each sample's tissue;
2. scatterers fixed in 3D: a hashed random lattice in world coordinates (0.5 mm), weighted by the tissue's
   echogenicity, so speckle stays coherent between nearby frames and decorrelates with out-of-plane motion;
3. point-spread: axial blur and a lateral blur that widens with distance from the focus, on the complex field,
   whose magnitude (envelope) then has Rayleigh statistics;
4. attenuation (two-way, per tissue, bone very high: acoustic shadows; fluid very low: posterior enhancement),
   electronic noise, and time-gain compensation that undoes most of the soft-tissue loss;
5. log compression to a dynamic range of 50-60 dB, gain, grey mapping;
6. scan conversion from beam lines to the fan, and the static text/marker overlay outside the fan.

    r = BModeRenderer(Sector(), height=192, beams=160, samples=288, rng=np.random.default_rng(0))
    frame = r.render(phantom, plane, t=0.0, contact=1.0, rng=rng)    # (H, W) uint8
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter1d, map_coordinates

from sonossl.data.phantom import ATTEN, ECHO, Phantom
from sonossl.data.planes import ImagePlane, Sector

LATTICE_MM = 0.5
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


_PRIMES = (np.uint64(73856093), np.uint64(19349663), np.uint64(83492791))


def _salt(seed: int) -> np.uint64:
    return np.uint64(((seed & 0xFFFFFFFF) * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF)


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, in place."""
    h ^= h >> np.uint64(30)
    h *= _M1
    h ^= h >> np.uint64(27)
    h *= _M2
    h ^= h >> np.uint64(31)
    return h


def scatterers(p: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Complex scatterer amplitude (real, imaginary) at world points ``p`` (N, 3) mm, trilinear in the lattice.

    Each lattice point's scatterer is splitmix64 of its coordinates, so the same 3D point always gets the same
    scatterer. Each axis' two lattice coordinates (and their weights) are computed once for the eight corners:
    uint64 arithmetic wraps the same whichever way it is grouped, and xor commutes.
    """
    g = p / LATTICE_MM + 1e6  # keep lattice indices positive
    i0 = np.floor(g).astype(np.int64)
    f = g - i0
    re = np.zeros(len(p), np.float32)
    im = np.zeros(len(p), np.float32)
    scale = np.float32(np.sqrt(12.0) / 2**32)
    salt = _salt(seed)
    keys = [[(i0[:, a] + c).astype(np.uint64) * _PRIMES[a] for c in (0, 1)] for a in range(3)]
    weights = [[1 - f[:, a], f[:, a]] for a in range(3)]
    for cx in (0, 1):
        for cy in (0, 1):
            wxy = weights[0][cx] * weights[1][cy]
            kxy = keys[0][cx] ^ keys[1][cy]
            for cz in (0, 1):
                w = (wxy * weights[2][cz]).astype(np.float32)
                h = kxy ^ keys[2][cz]
                h ^= salt
                _mix(h)
                re += w * ((h & np.uint64(0xFFFFFFFF)).astype(np.float32) * scale - np.float32(np.sqrt(3.0)))
                im += w * ((h >> np.uint64(32)).astype(np.float32) * scale - np.float32(np.sqrt(3.0)))
    return re, im


@dataclass(frozen=True)
class Settings:
    """What the sonographer dialled in on the scanner for this video."""

    freq_mhz: float = 3.5
    gain_db: float = 0.0
    dynamic_range_db: float = 55.0
    focus_mm: float = 70.0  # below the probe face
    # Below the abdominal wall, the share of a nominal soft-tissue attenuation that TGC undoes: low, because in
    # obstetrics most of the path is fluid; the sonographer keeps it low enough for the amniotic fluid to stay black.
    tgc_compensation: float = 0.4
    noise: float = 0.002  # electronic noise, relative to soft tissue

    @classmethod
    def random(cls, rng: np.random.Generator, depth: float) -> Settings:
        return cls(
            freq_mhz=float(rng.uniform(3.0, 4.5)),
            gain_db=float(rng.normal(0, 2.5)),
            dynamic_range_db=float(rng.uniform(50, 60)),
            focus_mm=float(rng.uniform(0.4, 0.65) * depth),
            tgc_compensation=float(rng.uniform(0.3, 0.45)),
            noise=float(rng.uniform(0.0015, 0.003)),
        )


class BModeRenderer:
    """Renders slices for one video: geometry, scan conversion and overlay are fixed per video."""

    REF_DB = 18.0  # envelope level (dB re soft-tissue echogenicity 1) shown as white before gain

    def __init__(self, sector: Sector, height: int, beams: int, samples: int, settings: Settings, seed: int,
                 overlay_lines: list[str] | None = None):
        self.sector, self.settings, self.seed = sector, settings, seed
        self.beams, self.samples = beams, samples
        self.height = height
        self.width = int(round(height * 4 / 3 / 16)) * 16
        s = sector
        self.r = np.linspace(s.radius, s.radius + s.depth, samples)
        self.theta = np.radians(np.linspace(-s.half_angle, s.half_angle, beams))
        self.dr = self.r[1] - self.r[0]
        # Image geometry: the fan fills the middle, the overlay sits in the margins.
        th = np.radians(s.half_angle)
        h_mm = s.radius + s.depth - s.radius * np.cos(th)
        w_mm = 2 * (s.radius + s.depth) * np.sin(th)
        self.mm_per_px = max(h_mm / (0.92 * height), w_mm / (0.74 * self.width))
        self.apex_px = (self.width / 2.0, 0.04 * height - s.radius * np.cos(th) / self.mm_per_px)
        yy, xx = np.mgrid[0:height, 0:self.width].astype(np.float64)
        dx = (xx + 0.5 - self.apex_px[0]) * self.mm_per_px
        dy = (yy + 0.5 - self.apex_px[1]) * self.mm_per_px
        rr, tt = np.hypot(dx, dy), np.arctan2(dx, dy)
        self.fan = (rr >= s.radius) & (rr <= s.radius + s.depth) & (np.abs(tt) <= th)
        self._coords = np.stack([(rr - s.radius) / self.dr, (tt - self.theta[0]) / (self.theta[1] - self.theta[0])])
        self.overlay, self.overlay_mask = self._overlay(overlay_lines or [])
        self._norm = 1.0
        self._norm = self._speckle_rms()

    # ---- geometry helpers used by the simulator (gaze, labels) ----
    def to_pixels(self, plane: ImagePlane, pts: np.ndarray) -> np.ndarray:
        """(N, 2) pixel (x, y) of world points projected onto the image plane."""
        ab = plane.in_plane(pts)
        return np.stack([self.apex_px[0] + ab[:, 0] / self.mm_per_px, self.apex_px[1] + ab[:, 1] / self.mm_per_px], 1)

    def sample_points(self, plane: ImagePlane) -> np.ndarray:
        """(samples, beams, 3) world points of the beam samples."""
        dirs = np.sin(self.theta)[:, None] * plane.u + np.cos(self.theta)[:, None] * plane.d  # (B, 3)
        return plane.o + self.r[:, None, None] * dirs[None, :, :]

    # ---- rendering ----
    def _psf(self, field: np.ndarray) -> np.ndarray:
        s = self.settings
        out = gaussian_filter1d(field, sigma=0.4 / self.dr, axis=0, mode="nearest")
        # Lateral resolution: ~0.5 mm (sigma) at the focus, widening with distance from it; in beams at each depth.
        depth = self.r - self.sector.radius
        sigma_mm = 0.5 + 0.012 * np.abs(depth - s.focus_mm)
        sigma_beams = sigma_mm / (self.r * (self.theta[1] - self.theta[0]))
        edges = np.linspace(0, self.samples, 9).astype(int)
        res = np.empty_like(out)
        for a, b in zip(edges[:-1], edges[1:], strict=True):
            res[a:b] = gaussian_filter1d(out[a:b], sigma=float(np.median(sigma_beams[a:b])), axis=1, mode="nearest")
        return res

    def _speckle_rms(self) -> float:
        plane = ImagePlane(np.zeros(3), np.array([1.0, 0, 0]), np.array([0, 0, 1.0]), self.sector)
        p = self.sample_points(plane).reshape(-1, 3)
        re, im = scatterers(p, self.seed)
        re = self._psf(re.reshape(self.samples, self.beams))
        im = self._psf(im.reshape(self.samples, self.beams))
        return float(np.sqrt((re**2 + im**2).mean()))

    def envelope(self, phantom: Phantom, plane: ImagePlane, t: float, contact: float,
                 rng: np.random.Generator) -> np.ndarray:
        """Envelope after TGC on the polar grid (samples, beams), in units of soft-tissue echogenicity 1."""
        s = self.settings
        p = self.sample_points(plane).reshape(-1, 3)
        face_depth = np.broadcast_to((self.r - self.sector.radius)[:, None], (self.samples, self.beams)).reshape(-1)
        tissue = phantom.tissue_at(p, t, face_depth).reshape(self.samples, self.beams)
        echo = ECHO[tissue]
        re, im = scatterers(p, self.seed)
        re = self._psf(echo * re.reshape(self.samples, self.beams)) / self._norm
        im = self._psf(echo * im.reshape(self.samples, self.beams)) / self._norm
        # Two-way attenuation, accumulated along each beam (dB), from the probe face down.
        att_db = 2.0 * np.cumsum(ATTEN[tissue] * (s.freq_mhz / 10.0), axis=0) * self.dr
        amp = 10.0 ** (-att_db / 20.0) * contact
        nre = rng.normal(0, s.noise, re.shape).astype(np.float32)
        nim = rng.normal(0, s.noise, re.shape).astype(np.float32)
        env = np.hypot(re * amp + nre, im * amp + nim)
        return env * (10.0 ** (self.tgc_db(phantom) / 20.0))[:, None]

    def tgc_db(self, phantom: Phantom) -> np.ndarray:
        """Time-gain compensation along the beam (dB), as a sonographer sets the sliders: it undoes most of the
        abdominal wall's loss, then rises gently through the uterus, where the path is mostly fluid."""
        from sonossl.data.phantom import TISSUE_ID

        s = self.settings
        depth = self.r - self.sector.radius
        w0, w1, w2 = phantom.wall
        layers = [(w0, "maternal_skin"), (w1, "fat"), (w2, "muscle"), (w2 + 8.0, "uterus")]
        att = np.full(len(depth), 0.0)
        top = 0.0
        for bottom, name in layers:
            att[(depth >= top) & (depth < bottom)] = ATTEN[TISSUE_ID[name]]
            top = bottom
        wall_db = 0.9 * 2.0 * np.cumsum(att * s.freq_mhz / 10.0) * self.dr
        rise_db = s.tgc_compensation * 2.0 * 0.06 * s.freq_mhz * np.maximum(depth - top, 0.0)
        return wall_db + rise_db

    def log_compress(self, env: np.ndarray) -> np.ndarray:
        s = self.settings
        db = 20.0 * np.log10(env + 1e-6) + s.gain_db
        return np.clip((db - (self.REF_DB - s.dynamic_range_db)) / s.dynamic_range_db, 0.0, 1.0) * 255.0

    def scan_convert(self, polar: np.ndarray) -> np.ndarray:
        img = map_coordinates(polar, self._coords, order=1, mode="constant", cval=0.0, prefilter=False)
        img[~self.fan] = 0.0
        return img

    def render(self, phantom: Phantom, plane: ImagePlane, t: float, contact: float,
               rng: np.random.Generator) -> np.ndarray:
        if contact <= 0.0:
            # Probe lifted off the skin: no echoes reach it, the sector goes black but for a faint noise floor.
            polar = np.abs(rng.normal(0.0, 2.0, (self.samples, self.beams)))
        else:
            polar = self.log_compress(self.envelope(phantom, plane, t, contact, rng))
        img = self.scan_convert(polar)
        img = np.where(self.overlay_mask, self.overlay, img)
        return np.clip(np.round(img), 0, 255).astype(np.uint8)

    # ---- the scanner's screen furniture ----
    def _overlay(self, lines: list[str]) -> tuple[np.ndarray, np.ndarray]:
        from PIL import Image, ImageDraw, ImageFont

        h, w = self.height, self.width
        canvas = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(canvas)
        size = max(7, h // 24)
        try:
            font = ImageFont.load_default(size=size)
        except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
            font = ImageFont.load_default()
        y = 2
        for line in lines:
            draw.text((3, y), line, fill=200, font=font)
            y += size + 2
        # Depth scale on the right: a tick per centimetre, a number every two.
        x0 = w - max(10, w // 18)
        for cm in range(0, int(self.sector.depth // 10) + 1):
            yy = self.apex_px[1] + (self.sector.radius + 10 * cm) / self.mm_per_px
            if yy >= h - 2:
                break
            long_tick = cm % 2 == 0
            draw.line([(x0, yy), (x0 + (6 if long_tick else 3), yy)], fill=230, width=1)
            if long_tick and cm:
                draw.text((x0 - size - 2, yy - size // 2), str(cm), fill=170, font=font)
        # Focus marker: a small triangle beside the scale at the focal depth.
        yf = self.apex_px[1] + (self.sector.radius + self.settings.focus_mm) / self.mm_per_px
        draw.polygon([(x0 + 8, yf), (x0 + 13, yf - 3), (x0 + 13, yf + 3)], fill=255)
        # Probe orientation marker at the top left of the fan.
        cx = self.apex_px[0] - 0.42 * w
        draw.ellipse([cx, h * 0.9, cx + 6, h * 0.9 + 6], fill=235)
        overlay = np.asarray(canvas, dtype=np.float32)
        # Only outside the fan (with a small gap), as on a real screen.
        from scipy.ndimage import binary_dilation

        outside = ~binary_dilation(self.fan, iterations=2)
        mask = (overlay > 0) & outside
        return overlay, mask
