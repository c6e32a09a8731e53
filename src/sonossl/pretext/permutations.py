"""Permutation classes for the order-correction task (Jiao et al., ISBI 2020; OPN, Lee et al., ICCV 2017).

K frames taken in temporal order are shuffled by a permutation p and the network predicts p's class. A sweep read
backwards is still a plausible sweep, so a permutation and its reverse form one class: for K=4 that gives
4!/2 = 12 classes, each represented by the member whose first index is below its last. For larger K the full set
is too big to learn, so a fixed set of ``n_classes`` maximally distant classes is chosen once (greedy max-min
Hamming distance, as in Noroozi & Favaro's jigsaw puzzles) and stored with the model.

    perms = permutation_set(4)                    # (12, 4) int64
    clip_shuffled = clip[perms[c]]                # or clip[perms[c][::-1]]: the same class c
    clip_restored = clip_shuffled[np.argsort(perms[c])]
"""

from __future__ import annotations

import itertools
import math

import numpy as np

FULL_SET_MAX_K = 4  # up to this K every class is used; above it a fixed Hamming subset


def canonical_permutations(k: int) -> np.ndarray:
    """All permutations of ``range(k)`` with ``p[0] < p[-1]``: one per {p, reverse(p)} class, lexicographic order."""
    if k < 2:
        raise ValueError(f"clip length k={k}: the order task needs at least 2 frames")
    perms = [p for p in itertools.permutations(range(k)) if p[0] < p[-1]]
    return np.asarray(perms, dtype=np.int64)


def class_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distance between permutation classes: the smaller of d(a, b) and d(a, reverse(b)).

    ``a`` (k,) against ``b`` (n, k) gives (n,).
    """
    b = np.atleast_2d(b)
    return np.minimum((b != a).sum(1), (b[:, ::-1] != a).sum(1))


def permutation_set(k: int, n_classes: int | None = None, seed: int = 0) -> np.ndarray:
    """The permutation classes for clips of ``k`` frames, shape (n_classes, k).

    ``n_classes=None`` takes every class for k <= 4 and 24 classes above. Deterministic for a given (k, n_classes,
    seed); the chosen set is stored with the model so that a later change here cannot silently relabel it.
    """
    full = math.factorial(k) // 2
    if n_classes is None:
        n_classes = full if k <= FULL_SET_MAX_K else 24
    if not 2 <= n_classes <= full:
        raise ValueError(f"order task: n_classes={n_classes} must be between 2 and {full} (k={k} frames)")
    if n_classes == full:
        return canonical_permutations(k)
    if k > 8:
        raise ValueError(f"clip length k={k}: at most 8 frames are supported for the order task")
    candidates = canonical_permutations(k)
    rng = np.random.default_rng(seed)
    chosen = [0]  # the identity
    nearest = class_distance(candidates[0], candidates)
    while len(chosen) < n_classes:
        best = np.flatnonzero(nearest == nearest.max())
        pick = int(rng.choice(best))
        chosen.append(pick)
        nearest = np.minimum(nearest, class_distance(candidates[pick], candidates))
    return candidates[np.sort(chosen)]
