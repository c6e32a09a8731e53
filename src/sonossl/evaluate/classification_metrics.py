"""Plane classification metrics: accuracy, per-class and macro precision/recall/F1, and the confusion matrix.

Definitions are the textbook ones (as in scikit-learn's ``precision_recall_fscore_support``), written with numpy so
that the report is a plain, JSON-ready dict for DVC metrics. For class c, with TP, FP and FN counted one-vs-rest:
precision = TP / (TP + FP), recall = TP / (TP + FN), F1 = 2 P R / (P + R); a zero denominator gives 0.0.

Macro averages are the unweighted mean over the classes that occur in ``y_true`` (support > 0). A class absent from
the test set says nothing about how well it is recognised; predictions of it are not lost, though: each one is a
missed sample of the class it truly belongs to and lowers that class's recall. (scikit-learn's macro average, when
given ``labels``, also averages the absent classes as zeros; ours does not.)

    report = classification_report(y_true, y_pred, classes=CLASSES)     # int indices into CLASSES
    report["macro_f1"], report["per_class"]["head"]["recall"], report["confusion"][true][pred]
    rows = confusion_pairs(y_true, y_pred, CLASSES)   # [{"actual": "head", "predicted": "femur"}, ...] for DVC plots
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

DECIMALS = 4


def classification_report(y_true: Any, y_pred: Any, classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro and per-class precision/recall/F1, and the confusion matrix (rows true, columns predicted).

    ``y_true`` and ``y_pred`` are 1-D integer arrays of class indices into ``classes``. All floats are plain Python
    floats rounded to 4 decimals; counts are ints.
    """
    names = _check_classes(classes)
    t, p = _check_labels(y_true, y_pred, len(names))
    k = len(names)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (t, p), 1)

    tp = np.diag(confusion).astype(np.float64)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    precision = _ratio(tp, predicted)
    recall = _ratio(tp, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    present = support > 0

    return {
        "accuracy": _r(tp.sum() / len(t)),
        "macro_f1": _r(f1[present].mean()),
        "macro_precision": _r(precision[present].mean()),
        "macro_recall": _r(recall[present].mean()),
        "per_class": {
            name: {"precision": _r(precision[i]), "recall": _r(recall[i]), "f1": _r(f1[i]),
                   "support": int(support[i])}
            for i, name in enumerate(names)
        },
        "confusion": confusion.tolist(),
        "classes": names,
        "n": len(t),
    }


def confusion_pairs(y_true: Any, y_pred: Any, classes: Sequence[str]) -> list[dict[str, str]]:
    """One row per sample, ``{"actual": name, "predicted": name}``, as DVC's ``confusion`` plot template reads."""
    names = _check_classes(classes)
    t, p = _check_labels(y_true, y_pred, len(names))
    return [{"actual": names[a], "predicted": names[b]} for a, b in zip(t.tolist(), p.tolist(), strict=True)]


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise, 0.0 where den is 0 (the zero-division convention of the module docstring)."""
    out = np.zeros(num.shape, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _r(x: float | np.floating) -> float:
    return round(float(x), DECIMALS)


def _check_classes(classes: Sequence[str]) -> list[str]:
    if isinstance(classes, str):
        raise ValueError(f"classes must be a sequence of class names, got the string {classes!r}")
    names = [str(c) for c in classes]
    if not names:
        raise ValueError("classes is empty: pass the class names that the indices in y_true/y_pred refer to")
    duplicates = sorted({c for c in names if names.count(c) > 1})
    if duplicates:
        raise ValueError(f"classes has duplicate names {duplicates}; each index needs its own name")
    return names


def _check_labels(y_true: Any, y_pred: Any, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    arrays = []
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        a = np.asarray(y)
        if a.ndim != 1:
            raise ValueError(f"{name} must be a 1-D array of class indices, got shape {a.shape}")
        if a.size == 0:
            raise ValueError(f"{name} is empty: there is nothing to evaluate")
        if not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
            raise ValueError(f"{name} must hold integer class indices, got dtype {a.dtype}")
        bad = (a < 0) | (a >= n_classes)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{name}[{i}] = {int(a[i])} is not a class index: classes has {n_classes} names, "
                             f"so indices must lie in [0, {n_classes - 1}]")
        arrays.append(a.astype(np.int64))
    t, p = arrays
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred must have the same length, got {t.shape[0]} and {p.shape[0]}")
    return t, p
