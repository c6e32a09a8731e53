"""Saliency metrics (Bylinskii et al., TPAMI 2019) against maps small enough to score by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sonossl.evaluate.saliency_metrics import (
    EPS,
    auc_judd,
    cc,
    fixations_from_density,
    kld,
    nss,
    saliency_scores,
    sim,
)

RAMP = np.array([[4.0, 3.0], [2.0, 1.0]])
UNIFORM = np.ones((2, 2))


def blob(h: int = 12, w: int = 16, cy: float = 5.0, cx: float = 9.0, sigma: float = 2.0) -> np.ndarray:
    """A gaze density like the simulator's: one Gaussian, summing to 1, no ties among its values."""
    y, x = np.mgrid[:h, :w]
    d = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * sigma**2)) + 1e-3 * (x + w * y) / (h * w)
    return d / d.sum()


def benchmark_auc_judd(pred: np.ndarray, fixations: np.ndarray) -> float:
    """AUC_Judd.m's loop, transcribed without jitter, to compare with where no two fixated values tie."""
    s, f = pred.ravel(), fixations.ravel()
    thresholds = np.sort(s[f])[::-1]
    n_fix, n = len(thresholds), len(s)
    tp, fp = [0.0], [0.0]
    for i, t in enumerate(thresholds, start=1):
        tp.append(i / n_fix)
        fp.append((np.sum(s >= t) - i) / (n - n_fix))
    tp.append(1.0)
    fp.append(1.0)
    return float(np.trapezoid(tp, fp))


# --- KLD ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pred, gt, expected", [
    # P = [1, 1, 2, 4] / 8 = [1/8, 1/8, 1/4, 1/2], G = 1/4 everywhere:
    # KLD = 1/4 (log 2 + log 2 + log 1 + log 1/2) = 1/4 log 2 = 0.173287
    ([[1, 1], [2, 4]], UNIFORM, 0.25 * math.log(2)),
    # G = [3, 1, 0, 0] / 4, P = 1/4: KLD = 3/4 log 3 + 1/4 log 1 + 0 + 0 = 0.823959 (0 log(eps) = 0)
    (UNIFORM, [[3, 1], [0, 0]], 0.75 * math.log(3)),
    # an all-zero prediction stays zero (as in KLdiv.m): 4 * 1/4 log(eps + (1/4) / eps) = log(1/(4 eps)) = 34.657
    (np.zeros((2, 2)), UNIFORM, math.log(0.25 / EPS)),
])
def test_kld_by_hand(pred, gt, expected):
    assert kld(pred, gt) == pytest.approx(expected, rel=1e-9)


def test_kld_is_zero_for_a_perfect_prediction_at_any_scale():
    g = blob()
    assert kld(g, g) == pytest.approx(0.0, abs=1e-12)
    assert kld(7 * g, g) == pytest.approx(0.0, abs=1e-12)


# --- CC -------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pred, gt, expected", [
    (RAMP, RAMP, 1.0),
    (RAMP, 2 * RAMP + 5, 1.0),  # Pearson's r ignores scale and offset
    (RAMP, 5 - RAMP, -1.0),  # inverted map
    # x = 1, 2, 3, 4 (deviations -1.5, -0.5, 0.5, 1.5; sum of squares 5),
    # y = 1, 2, 3, 5 (mean 2.75; deviations -1.75, -0.75, 0.25, 2.25; sum of squares 8.75);
    # sum of products = 2.625 + 0.375 + 0.125 + 3.375 = 6.5, r = 6.5 / sqrt(5 * 8.75) = 0.982708
    ([[1, 2], [3, 4]], [[1, 2], [3, 5]], 6.5 / math.sqrt(5 * 8.75)),
    (UNIFORM, RAMP, 0.0),  # a constant map has no correlation
    (RAMP, UNIFORM, 0.0),
    (RAMP - 10, RAMP, 1.0),  # negative values (logits) are fine for CC
])
def test_cc_by_hand(pred, gt, expected):
    assert cc(pred, gt) == pytest.approx(expected, abs=1e-12)


def test_cc_perfect_and_inverted_on_a_gaze_density():
    g = blob()
    assert cc(g, g) == pytest.approx(1.0, abs=1e-12)
    assert cc(g.max() - g, g) == pytest.approx(-1.0, abs=1e-12)


# --- SIM ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pred, gt, expected", [
    # P = [1/2, 1/2, 0, 0], G = 1/4 each: min = 1/4 + 1/4 + 0 + 0 = 0.5
    ([[1, 1], [0, 0]], UNIFORM, 0.5),
    (RAMP, 3 * RAMP, 1.0),  # identical after normalising
    ([[1, 0], [0, 0]], [[0, 0], [0, 1]], 0.0),  # disjoint
    # P = [4, 3, 2, 1] / 10, G = 1/4: min = 0.25 + 0.25 + 0.2 + 0.1 = 0.8
    (RAMP, UNIFORM, 0.8),
    (np.zeros((2, 2)), UNIFORM, 0.0),
])
def test_sim_by_hand(pred, gt, expected):
    assert sim(pred, gt) == pytest.approx(expected, abs=1e-12)


# --- NSS ------------------------------------------------------------------------------------------------------------

PEAK = np.array([[0.0, 0.0], [0.0, 4.0]])  # mean 1; deviations -1, -1, -1, 3; sum of squares 12; std (n-1) = 2


@pytest.mark.parametrize("fixated, expected", [
    ([(1, 1)], 1.5),  # (4 - 1) / 2
    ([(0, 0)], -0.5),  # (0 - 1) / 2
    ([(0, 0), (1, 1)], 0.5),  # mean of -0.5 and 1.5
])
def test_nss_by_hand(fixated, expected):
    fix = np.zeros((2, 2), dtype=bool)
    for yx in fixated:
        fix[yx] = True
    assert nss(PEAK, fix) == pytest.approx(expected, abs=1e-12)
    assert nss(PEAK, fix.astype(np.uint8)) == pytest.approx(expected, abs=1e-12)  # 0/1 maps are accepted


def test_nss_of_a_constant_prediction_is_zero():
    assert nss(UNIFORM, np.eye(2, dtype=bool)) == 0.0
    # constants whose mean rounds one ulp off: the std came out ~1e-19 instead of 0, and NSS about -1 or +1 (a
    # uniform softmax at the gpu profile's saliency_size 48 is 1/2304 everywhere)
    fix = np.zeros((48, 48), dtype=bool)
    fix[20:24, 20:24] = True
    for value in (1 / 2304, 0.1, 0.3):
        assert nss(np.full((48, 48), value), fix) == 0.0


# --- AUC-Judd -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pred, fixated, expected", [
    # fixation on the top value 4: threshold 4 -> tp 1, fp (1 - 1)/3 = 0; curve (0,0) (0,1) (1,1): area 1
    (RAMP, [(0, 0)], 1.0),
    # fixation on 3: pixels >= 3 are 2 -> tp 1, fp (2 - 1)/3 = 1/3; curve (0,0) (1/3,1) (1,1):
    # area = 1/3 * 1/2 + 2/3 * 1 = 5/6
    (RAMP, [(0, 1)], 5 / 6),
    # fixation on the lowest value 1: threshold 1 -> tp 1, fp (4 - 1)/3 = 1; curve (0,0) (1,1) (1,1): area 1/2
    (RAMP, [(1, 1)], 0.5),
    # fixations on 4 and 2: t = 4 -> tp 1/2, fp 0; t = 2 -> pixels >= 2 are 3, tp 1, fp (3 - 2)/2 = 1/2;
    # curve (0,0) (0,1/2) (1/2,1) (1,1): area = 0 + 1/2 (1/2 + 1)/2 + 1/2 * 1 = 0.875
    (RAMP, [(0, 0), (1, 0)], 0.875),
    # a non-fixated pixel ties with the fixated one and counts as above threshold (>=): pred [[2, 2], [1, 0]],
    # fixation at (0,0): t = 2 -> pixels >= 2 are 2, tp 1, fp 1/3; area = 5/6
    ([[2, 2], [1, 0]], [(0, 0)], 5 / 6),
    # a constant map: one threshold, every pixel >= it: tp 1, fp 2/2 = 1; curve (0,0) (1,1) (1,1): area 1/2.
    # (AUC_Judd.m's loop without jitter would give (4 - 2^2) / (2 * 2 * 2) = 0 here: the tied fixations put a
    # point at (fp, tp) = (3/2, 1/2) behind the curve.)
    (UNIFORM, [(0, 0), (1, 1)], 0.5),
    (UNIFORM, [(0, 1)], 0.5),
])
def test_auc_judd_by_hand(pred, fixated, expected):
    fix = np.zeros((2, 2), dtype=bool)
    for yx in fixated:
        fix[yx] = True
    assert auc_judd(pred, fix) == pytest.approx(expected, abs=1e-12)


def test_auc_judd_of_a_constant_map_is_chance_with_many_fixations():
    fix = np.zeros((12, 16), dtype=bool)
    fix[3:7, 4:10] = True
    assert auc_judd(np.full((12, 16), 0.3), fix) == 0.5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_judd_is_the_benchmark_loop_when_fixated_values_are_distinct(seed):
    rng = np.random.default_rng(seed)
    pred = rng.random((9, 11))
    pred[pred < 0.3] = 0.0  # ties among non-fixated pixels, and between them and fixated ones, are allowed
    fix = rng.random((9, 11)) < 0.15
    fix[pred == 0.0] = False
    fix[0, 0], pred[0, 0] = True, 0.0  # one fixated zero: ties with the non-fixated zeros, not with fixations
    assert auc_judd(pred, fix) == pytest.approx(benchmark_auc_judd(pred, fix), abs=1e-12)


# --- fixations from a density ---------------------------------------------------------------------------------------

GT = np.array([[0.1, 0.4], [0.3, 0.2]])


@pytest.mark.parametrize("gt, top_fraction, expected", [
    (GT, 0.25, [[False, True], [False, False]]),  # k = round(0.25 * 4) = 1: the 0.4
    (GT, 0.5, [[False, True], [True, False]]),  # k = 2: 0.4 and 0.3
    (GT, 0.01, [[False, True], [False, False]]),  # k = max(1, round(0.04)) = 1
    (GT, 1.0, [[True, True], [True, True]]),
    ([[0.3, 0.3], [0.2, 0.2]], 0.25, [[True, True], [False, False]]),  # k = 1, but the tie at 0.3 is included
])
def test_fixations_from_density(gt, top_fraction, expected):
    fix = fixations_from_density(gt, top_fraction)
    assert fix.dtype == bool
    assert fix.tolist() == expected


def test_a_sparse_density_fixates_only_where_it_is_positive_and_its_batch_scores():
    """Fewer positive pixels than k (fixation points): the k-th largest value is 0, and `>= 0` fixated every
    pixel, so AUC-Judd (no other pixels) failed the whole batch."""
    gt = np.zeros((32, 32))
    gt[3, 4], gt[10, 20], gt[25, 7] = 1.0, 2.0, 1.0  # 3 pixels, k = round(0.02 * 1024) = 20
    fix = fixations_from_density(gt)
    assert fix.sum() == 3 and fix[3, 4] and fix[10, 20] and fix[25, 7]
    scores = saliency_scores(gt[None] + 1e-3, gt[None])
    assert scores["auc_judd"] == 1.0 and scores["n"] == 1


def test_default_fixations_are_the_top_two_percent():
    fix = fixations_from_density(blob(20, 30))  # 600 pixels: k = round(0.02 * 600) = 12, no ties
    assert fix.sum() == 12


# --- a batch --------------------------------------------------------------------------------------------------------

def test_perfect_batch():
    gts = np.stack([blob(), blob(cy=3, cx=4, sigma=1.5)])
    s = saliency_scores(gts, gts)
    assert s["n"] == 2 and type(s["n"]) is int
    # fixations hold the top values of gt == pred, so every non-fixated pixel lies below every threshold: AUC 1
    assert (s["kld"], s["cc"], s["sim"], s["auc_judd"]) == (0.0, 1.0, 1.0, 1.0)
    assert s["nss"] > 3


def test_batch_scores_are_rounded_means_of_the_map_scores():
    rng = np.random.default_rng(0)
    gts = np.stack([blob(), blob(cy=8, cx=3)])
    preds = rng.random(gts.shape)
    s = saliency_scores(preds, gts, top_fraction=0.05)
    fixes = [fixations_from_density(g, 0.05) for g in gts]
    assert set(s) == {"kld", "cc", "nss", "sim", "auc_judd", "n"}
    assert all(type(v) is float for k, v in s.items() if k != "n")
    for name, fn, refs in [("kld", kld, gts), ("cc", cc, gts), ("sim", sim, gts), ("nss", nss, fixes),
                           ("auc_judd", auc_judd, fixes)]:
        assert s[name] == round(np.mean([fn(p, r) for p, r in zip(preds, refs, strict=True)]), 4)


# --- errors ---------------------------------------------------------------------------------------------------------

NAN = np.array([[np.nan, 1.0], [1.0, 1.0]])
INF = np.array([[np.inf, 1.0], [1.0, 1.0]])
NEG = np.array([[-1.0, 1.0], [1.0, 1.0]])
FIX = np.eye(2, dtype=bool)


@pytest.mark.parametrize("fn, args, message", [
    (kld, (RAMP, np.ones((2, 3))), r"pred and gt must have the same shape, got \(2, 2\) and \(2, 3\)"),
    (cc, (np.ones((2, 2, 2)), RAMP), r"pred must be a 2-D map, got shape \(2, 2, 2\)"),
    (sim, (RAMP, np.ones(4)), r"gt must be a 2-D map, got shape \(4,\)"),
    (cc, (NAN, RAMP), "pred contains NaN or inf"),
    (kld, (RAMP, INF), "gt contains NaN or inf"),
    (kld, (NEG, RAMP), "pred has negative values"),
    (sim, (RAMP, NEG), "gt has negative values"),
    (kld, (RAMP, np.zeros((2, 2))), "gt is all zero"),
    (nss, (RAMP, np.zeros((2, 2), dtype=bool)), "fixations has no fixated pixel"),
    (auc_judd, (RAMP, np.zeros((2, 2), dtype=bool)), "fixations has no fixated pixel"),
    (nss, (RAMP, np.ones((3, 3), dtype=bool)), r"fixations must have pred's shape \(2, 2\)"),
    (auc_judd, (RAMP, RAMP), "fixations must be a boolean map"),
    (auc_judd, (RAMP, np.ones((2, 2), dtype=bool)), "fixations covers every pixel"),
    (nss, (NAN, FIX), "pred contains NaN or inf"),
    (nss, (FIX, FIX), "pred must hold real numbers, got dtype bool"),
    (fixations_from_density, (NEG,), "gt has negative values"),
    (fixations_from_density, (np.zeros((2, 2)),), "gt is all zero"),
    (fixations_from_density, (GT, 0.0), r"top_fraction must be a number in \(0, 1\], got 0.0"),
    (fixations_from_density, (GT, 1.5), "top_fraction must be a number"),
    (saliency_scores, (np.ones((1, 2, 2)), np.ones((1, 2, 3))), "pred_batch and gt_batch must have the same shape"),
    (saliency_scores, (RAMP, RAMP), r"pred_batch must be a batch of 2-D maps with shape \(N, H, W\)"),
    (saliency_scores, (np.ones((0, 2, 2)), np.ones((0, 2, 2))), "pred_batch holds no maps"),
    (saliency_scores, (np.stack([RAMP, NEG]), np.stack([RAMP, RAMP])), "map 1 of the batch: pred has negative"),
])
def test_bad_arguments_are_named(fn, args, message):
    with pytest.raises(ValueError, match=message):
        fn(*args)
