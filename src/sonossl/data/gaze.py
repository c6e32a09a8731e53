"""A gaze-like saliency map for every frame, as eye tracking of sonographers records it (SIMULATOR.md, "Gaze").

The gaze is a sequence of fixations of 200-400 ms. On a standard plane each fixation lands on one of the structures
a sonographer checks there (``Canonical.keys``: stomach, umbilical vein and spine on the abdominal plane, the two
femur ends, ...), and follows that structure as the probe moves. Elsewhere the gaze wanders, pulled towards the
centre of the sector. A frame's saliency map is the fixation density over the last ``WINDOW_S`` seconds, each
fixation blurred by a Gaussian of about one degree of visual angle, plus a centre bias, normalised to sum to one.

    gaze = simulate_gaze(labels, key_pixels, fps, (h, w), rng)
    maps = saliency_maps(gaze, key_pixels, fps, (h, w), out=(48, 64))   # (T, 48, 64), each sums to 1
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

WINDOW_S = 0.4
SIGMA_FRAC = 0.035  # ~1 degree of visual angle, as a fraction of the frame height
CENTRE_SIGMA_FRAC = 0.22
CENTRE_WEIGHT = {"plane": 0.1, "background": 0.3}


@dataclass(frozen=True)
class Fixation:
    start: float  # s
    end: float  # s
    key: int  # index into the frame's key structures, or -1 for a free position
    x: float  # pixel offset from the key (or absolute position when key = -1)
    y: float


def simulate_gaze(labels: np.ndarray, keys: list[np.ndarray | None], fps: float, frame_hw: tuple[int, int],
                  centre: tuple[float, float], rng: np.random.Generator) -> list[Fixation]:
    """Fixations over the whole video. ``keys[t]`` holds the (K, 2) pixel positions of the key structures of the
    plane shown in frame t, or None on background frames."""
    h, w = frame_hw
    duration = len(labels) / fps
    fixations: list[Fixation] = []
    t = 0.0
    pos = np.array(centre, float)
    order: list[int] = []
    while t < duration:
        f = min(int(t * fps), len(labels) - 1)
        length = float(rng.uniform(0.2, 0.4))
        if keys[f] is not None:
            if not order:
                order = list(rng.permutation(len(keys[f])))
            k = int(order.pop()) % len(keys[f])
            jitter = rng.normal(0, 0.01 * h, 2)
            fixations.append(Fixation(t, t + length, k, float(jitter[0]), float(jitter[1])))
            pos = keys[f][k] + jitter
        else:
            order = []
            pos = 0.75 * pos + 0.25 * np.asarray(centre) + rng.normal(0, 0.12 * h, 2)
            pos = np.clip(pos, [0.15 * w, 0.1 * h], [0.85 * w, 0.95 * h])
            fixations.append(Fixation(t, t + length, -1, float(pos[0]), float(pos[1])))
        t += length + float(rng.uniform(0.02, 0.05))  # saccade
    return fixations


def saliency_maps(fixations: list[Fixation], keys: list[np.ndarray | None], fps: float, frame_hw: tuple[int, int],
                  centre: tuple[float, float], out_hw: tuple[int, int]) -> np.ndarray:
    """(T, out_h, out_w) float32 maps over the whole frame, each summing to one."""
    h, w = frame_hw
    oh, ow = out_hw
    n = len(keys)
    ys = (np.arange(oh) + 0.5) * (h / oh)
    xs = (np.arange(ow) + 0.5) * (w / ow)
    sig = SIGMA_FRAC * h

    def blob(x: float, y: float, s: float) -> np.ndarray:
        g = np.exp(-0.5 * ((ys[:, None] - y) ** 2 + (xs[None, :] - x) ** 2) / s**2)
        return g / max(g.sum(), 1e-12)

    bias = blob(centre[0], centre[1], CENTRE_SIGMA_FRAC * h)
    maps = np.zeros((n, oh, ow), np.float32)
    starts = np.array([f.start for f in fixations])
    for t in range(n):
        now = t / fps
        acc = np.zeros((oh, ow))
        lo = np.searchsorted(starts, now - WINDOW_S - 0.5)
        for fx in fixations[lo:]:
            if fx.start > now:
                break
            overlap = min(fx.end, now) - max(fx.start, now - WINDOW_S)
            if overlap <= 0:
                continue
            if fx.key >= 0:
                if keys[t] is None or fx.key >= len(keys[t]):
                    continue  # the structure left the plane: that fixation no longer lands on it
                x, y = keys[t][fx.key] + (fx.x, fx.y)
            else:
                x, y = fx.x, fx.y
            acc += overlap * blob(x, y, sig)
        cw = CENTRE_WEIGHT["plane" if keys[t] is not None else "background"]
        total = acc.sum()
        acc = (1 - cw) * acc / total + cw * bias if total > 0 else bias
        maps[t] = acc / acc.sum()
    return maps
