"""Saliency metrics KLD, CC, SIM, NSS and AUC-Judd, as defined for the MIT saliency benchmark.

Definitions follow Bylinskii, Judd, Oliva, Torralba and Durand, "What do different evaluation metrics tell us about
saliency models?", IEEE TPAMI 41(3), 2019, and its reference MATLAB code (github.com/cvzoya/saliency,
``code_forMetrics``). Each function scores one 2-D predicted map against one 2-D ground truth of the same shape
(no resizing: resample before calling).

- ``kld``: both maps normalised to sum 1, KLD = sum_i G_i log(eps + G_i / (P_i + eps)) (``KLdiv.m``). Lower is better.
- ``cc``: Pearson's correlation of the two standardised maps (``CC.m``); 0.0 when either map is constant.
- ``sim``: histogram intersection sum_i min(P_i, G_i) of the maps normalised to sum 1, the paper's equation.
  ``similarity.m`` also rescales each map to [0, 1] before normalising; we do not, so a prediction's uniform
  floor (a centre-bias baseline) counts as mass here, as it does in KLD.
- ``nss``: mean of the standardised prediction at fixated pixels (``NSS.m``). The standard deviation is MATLAB's
  ``std``, i.e. with the n - 1 denominator; 0.0 when the prediction is constant.
- ``auc_judd``: ROC area with thresholds at the prediction's values at fixated pixels (``AUC_Judd.m``); its
  docstring says how ties are handled without the benchmark's random jitter.

Our simulator records gaze as a density per frame, not as fixation points, so NSS and AUC get their fixation map
from ``fixations_from_density``: the pixels holding the top ``top_fraction`` of the density's values.

    scores = saliency_scores(pred_NHW, gt_NHW)        # {"kld", "cc", "nss", "sim", "auc_judd", "n"}
    fix = fixations_from_density(gt_HW)                # bool (H, W), the top 2% of pixels
    nss(pred_HW, fix), auc_judd(pred_HW, fix), kld(pred_HW, gt_HW)
"""

from __future__ import annotations

from numbers import Real
from typing import Any

import numpy as np

EPS = 2.2204e-16  # MATLAB's eps, as in KLdiv.m
DECIMALS = 4
TOP_FRACTION = 0.02


def kld(pred: Any, gt: Any, eps: float = EPS) -> float:
    """KL divergence of the predicted distribution from the ground-truth one (``KLdiv.m``); 0 for a perfect map.

    Both maps must be non-negative; each is divided by its sum. An all-zero prediction stays zero (as in the
    benchmark) and scores about -log(eps) per unit of ground-truth mass; an all-zero ground truth is an error.
    """
    p, g = _check_pair(pred, gt, distributions=True)
    p = _to_distribution(p)
    g = _to_distribution(g)
    return float(np.sum(g * np.log(eps + g / (p + eps))))


def cc(pred: Any, gt: Any) -> float:
    """Pearson's linear correlation coefficient of the two maps (``CC.m``), in [-1, 1]; 0.0 if either is constant."""
    p, g = _check_pair(pred, gt, distributions=False)
    ps, gs = p.std(), g.std()
    if ps == 0 or gs == 0:
        return 0.0
    r = float(np.mean((p - p.mean()) / ps * ((g - g.mean()) / gs)))
    return min(1.0, max(-1.0, r))  # rounding can push a perfect correlation a hair past 1


def sim(pred: Any, gt: Any) -> float:
    """Similarity (histogram intersection) sum_i min(P_i, G_i) of the maps normalised to sum 1, in [0, 1].

    Both maps must be non-negative; an all-zero prediction scores 0, an all-zero ground truth is an error.
    """
    p, g = _check_pair(pred, gt, distributions=True)
    return float(np.sum(np.minimum(_to_distribution(p), _to_distribution(g))))


def nss(pred: Any, fixations: Any) -> float:
    """Normalized scanpath saliency (``NSS.m``): the mean of (pred - mean) / std (n - 1 denominator) at fixations.

    ``fixations`` is a boolean map (0/1 values are accepted) of pred's shape with at least one fixated pixel.
    A constant prediction says nothing about where the gaze goes and scores 0.0.
    """
    p = _check_map(pred, "pred")
    f = _check_fixations(fixations, p.shape)
    # constant: tested on the values, not on the std, which rounding leaves at ~1e-19 for many constants (the mean
    # one ulp off), so that (p - mean) / sd was about +-1 (a uniform 48x48 softmax, 1/2304 everywhere: -0.9998)
    if p.size <= 1 or np.all(p == p.flat[0]):
        return 0.0
    return float(np.mean((p[f] - p.mean()) / p.std(ddof=1)))


def auc_judd(pred: Any, fixations: Any) -> float:
    """Judd's area under the ROC curve (``AUC_Judd.m``) of the prediction as a classifier of fixated pixels.

    Thresholds are the prediction's values at the fixated pixels, in descending order. At threshold t a pixel
    counts as positive when pred >= t; the true-positive rate is the share of fixated pixels that are positive, the
    false-positive rate the share of the other pixels that are. The points (0, 0) and (1, 1) close the curve, whose
    area comes from the trapezoid rule. 1 is perfect, 0.5 is chance.

    Ties: the benchmark adds random jitter (1e-7) to the map by default to break ties, and without it its loop
    (tp = i / n_fix, fp = (count(pred >= t_i) - i) / n_other) puts spurious points behind the curve when several
    fixated pixels share a value, e.g. a constant map then scores (n_pixels - n_fix^2) / (2 n_fix (n_pixels -
    n_fix)), which is 0 or below for more than a handful of fixations. Here, deterministically, tied thresholds
    give one point with both rates counted by >=, so a tie is a straight segment and a constant map scores 0.5.
    When the fixated values are distinct this is exactly the benchmark's loop.
    """
    p = _check_map(pred, "pred")
    f = _check_fixations(fixations, p.shape)
    n_fix = int(f.sum())
    n_other = p.size - n_fix
    if n_other == 0:
        raise ValueError("fixations covers every pixel, so there are no non-fixated pixels to tell apart; "
                         "AUC needs at least one (lower top_fraction, or check that gt is not constant)")
    fixated = np.sort(p[f])
    others = np.sort(p[~f])
    thresholds = np.unique(fixated)[::-1]
    tp = (n_fix - np.searchsorted(fixated, thresholds, side="left")) / n_fix
    fp = (n_other - np.searchsorted(others, thresholds, side="left")) / n_other
    tp = np.concatenate([[0.0], tp, [1.0]])
    fp = np.concatenate([[0.0], fp, [1.0]])
    return float(np.sum(np.diff(fp) * (tp[1:] + tp[:-1]) / 2))


def fixations_from_density(gt: Any, top_fraction: float = TOP_FRACTION) -> np.ndarray:
    """The fixation map for NSS and AUC-Judd from a gaze density: its ``top_fraction`` highest-valued pixels.

    The benchmark scores NSS and AUC against recorded fixation points; the simulator only gives the density those
    fixations were blurred into, so its peaks stand in for them. With k = max(1, round(top_fraction * H * W)), the
    map holds every pixel whose value is at least the k-th largest, so ties at that threshold are all included (and
    the map can hold more than k pixels), and only pixels of positive density: when fewer than k pixels have any
    (a sparse map, fixation points), they are the fixations (a threshold of 0 made every pixel one). Returns a
    boolean (H, W) array.
    """
    g = _check_map(gt, "gt")
    if isinstance(top_fraction, bool) or not isinstance(top_fraction, Real) or not 0 < top_fraction <= 1:
        raise ValueError(f"top_fraction must be a number in (0, 1], got {top_fraction!r}")
    _check_distribution(g, "gt")
    if not g.any():
        raise ValueError("gt is all zero: there is no gaze density to take fixations from")
    k = max(1, round(top_fraction * g.size))
    threshold = np.partition(g.ravel(), g.size - k)[g.size - k]
    return (g >= threshold) & (g > 0)


def saliency_scores(pred_batch: Any, gt_batch: Any, top_fraction: float = TOP_FRACTION) -> dict[str, float]:
    """Means over a batch of (N, H, W) maps of KLD, CC, NSS, SIM and AUC-Judd, plus ``"n"`` (the number of maps).

    KLD, CC and SIM compare pred with the gt density; NSS and AUC-Judd use ``fixations_from_density(gt,
    top_fraction)``. Values are plain floats rounded to 4 decimals; an error names the map that caused it.
    """
    preds, gts = np.asarray(pred_batch), np.asarray(gt_batch)
    for name, a in (("pred_batch", preds), ("gt_batch", gts)):
        if a.ndim != 3:
            raise ValueError(f"{name} must be a batch of 2-D maps with shape (N, H, W), got shape {a.shape}")
        if a.shape[0] == 0:
            raise ValueError(f"{name} holds no maps: there is nothing to evaluate")
    if preds.shape != gts.shape:
        raise ValueError(f"pred_batch and gt_batch must have the same shape, got {preds.shape} and {gts.shape}")
    totals = dict.fromkeys(("kld", "cc", "nss", "sim", "auc_judd"), 0.0)
    for i, (p, g) in enumerate(zip(preds, gts, strict=True)):
        try:
            fix = fixations_from_density(g, top_fraction)
            totals["kld"] += kld(p, g)
            totals["cc"] += cc(p, g)
            totals["nss"] += nss(p, fix)
            totals["sim"] += sim(p, g)
            totals["auc_judd"] += auc_judd(p, fix)
        except ValueError as e:
            raise ValueError(f"map {i} of the batch: {e}") from e
    n = preds.shape[0]
    scores: dict[str, float] = {k: round(v / n, DECIMALS) for k, v in totals.items()}
    scores["n"] = n
    return scores


def _check_map(a: Any, name: str) -> np.ndarray:
    m = np.asarray(a)
    if m.ndim != 2:
        raise ValueError(f"{name} must be a 2-D map, got shape {m.shape}")
    if m.size == 0:
        raise ValueError(f"{name} is an empty map (shape {m.shape})")
    if m.dtype == np.bool_ or not np.issubdtype(m.dtype, np.number) or np.iscomplexobj(m):
        raise ValueError(f"{name} must hold real numbers, got dtype {m.dtype}")
    m = m.astype(np.float64)
    if not np.isfinite(m).all():
        raise ValueError(f"{name} contains NaN or inf at {int((~np.isfinite(m)).sum())} pixel(s)")
    return m


def _check_distribution(m: np.ndarray, name: str) -> None:
    if (m < 0).any():
        raise ValueError(f"{name} has negative values (min {m.min():g}) but is read as a distribution; "
                         "pass a non-negative map (e.g. a softmax or sigmoid output, not logits)")


def _check_pair(pred: Any, gt: Any, distributions: bool) -> tuple[np.ndarray, np.ndarray]:
    p, g = _check_map(pred, "pred"), _check_map(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(f"pred and gt must have the same shape, got {p.shape} and {g.shape}")
    if distributions:
        _check_distribution(p, "pred")
        _check_distribution(g, "gt")
        if not g.any():
            raise ValueError("gt is all zero, so it is no distribution to compare against")
    return p, g


def _check_fixations(fixations: Any, shape: tuple[int, ...]) -> np.ndarray:
    f = np.asarray(fixations)
    if f.shape != shape:
        raise ValueError(f"fixations must have pred's shape {shape}, got {f.shape}")
    if f.dtype != np.bool_:
        if not np.issubdtype(f.dtype, np.number) or not np.isin(f, (0, 1)).all():
            raise ValueError(f"fixations must be a boolean map (or 0/1 values), got dtype {f.dtype} with other "
                             "values; build one with fixations_from_density(gt)")
        f = f.astype(bool)
    if not f.any():
        raise ValueError("fixations has no fixated pixel: NSS and AUC-Judd need at least one")
    return f


def _to_distribution(m: np.ndarray) -> np.ndarray:
    total = m.sum()
    return m / total if total > 0 else m
