"""Classification report against cases worked out by hand: a 3-class confusion, absent and never-predicted classes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sonossl.evaluate.classification_metrics import classification_report, confusion_pairs

CLASSES = ["background", "head", "abdomen"]


def test_three_class_case_by_hand():
    y_true = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    y_pred = [0, 0, 1, 2, 1, 1, 0, 2, 2, 2]
    # Confusion (rows true, columns predicted):
    #   true 0 -> predicted 0, 0, 1, 2  = [2, 1, 1]   support 4
    #   true 1 -> predicted 1, 1, 0     = [1, 2, 0]   support 3
    #   true 2 -> predicted 2, 2, 2     = [0, 0, 3]   support 3
    # Column sums (predicted counts): 3, 3, 4. Accuracy = (2 + 2 + 3) / 10 = 0.7.
    # background: P = 2/3, R = 2/4, F1 = 2 (2/3)(1/2) / (2/3 + 1/2) = (2/3) / (7/6) = 4/7 = 0.5714
    # head:       P = 2/3, R = 2/3, F1 = 2/3 = 0.6667
    # abdomen:    P = 3/4, R = 3/3, F1 = 2 (3/4) / (7/4) = 6/7 = 0.8571
    # macro P = (2/3 + 2/3 + 3/4) / 3 = 25/36 = 0.6944; macro R = (1/2 + 2/3 + 1) / 3 = 13/18 = 0.7222;
    # macro F1 = (4/7 + 2/3 + 6/7) / 3 = 44/63 = 0.6984 (mean of the unrounded per-class F1s).
    r = classification_report(np.array(y_true), np.array(y_pred), CLASSES)
    assert r["confusion"] == [[2, 1, 1], [1, 2, 0], [0, 0, 3]]
    assert r["accuracy"] == 0.7
    assert r["per_class"] == {
        "background": {"precision": 0.6667, "recall": 0.5, "f1": 0.5714, "support": 4},
        "head": {"precision": 0.6667, "recall": 0.6667, "f1": 0.6667, "support": 3},
        "abdomen": {"precision": 0.75, "recall": 1.0, "f1": 0.8571, "support": 3},
    }
    assert (r["macro_precision"], r["macro_recall"], r["macro_f1"]) == (0.6944, 0.7222, 0.6984)
    assert r["classes"] == CLASSES and r["n"] == 10


def test_report_is_plain_json_ready_python():
    r = classification_report(np.array([0, 1], dtype=np.int32), np.array([1, 1], dtype=np.uint8), CLASSES)
    assert type(r["accuracy"]) is float and type(r["n"]) is int
    assert all(type(v) is int for row in r["confusion"] for v in row)
    assert all(type(r["per_class"]["head"][k]) is float for k in ("precision", "recall", "f1"))
    assert type(r["per_class"]["head"]["support"]) is int
    assert json.loads(json.dumps(r)) == r


def test_class_absent_from_test_set_is_left_out_of_macro_but_its_predictions_count():
    # classes a, b, c; c never occurs in y_true but is predicted once (a sample of a).
    # a: TP 1, predicted 1, support 2 -> P = 1, R = 1/2, F1 = 2 (1)(1/2) / (3/2) = 2/3
    # b: TP 2, predicted 2, support 2 -> P = R = F1 = 1
    # c: TP 0, predicted 1, support 0 -> P = 0/1 = 0, R = 0/0 -> 0, F1 = 0
    # macro over {a, b}: P = 1, R = (1/2 + 1) / 2 = 0.75, F1 = (2/3 + 1) / 2 = 5/6 = 0.8333; accuracy 3/4.
    r = classification_report([0, 0, 1, 1], [0, 2, 1, 1], ["a", "b", "c"])
    assert r["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert (r["macro_precision"], r["macro_recall"], r["macro_f1"]) == (1.0, 0.75, 0.8333)
    assert r["accuracy"] == 0.75
    assert r["confusion"] == [[1, 0, 1], [0, 2, 0], [0, 0, 0]]


def test_never_predicted_class_gives_zero_not_nan():
    # a: TP 1, predicted 2, support 1 -> P = 1/2, R = 1, F1 = 2 (1/2)(1) / (3/2) = 2/3
    # b: TP 0, predicted 0 (P = 0/0 -> 0), support 1 (R = 0), F1 = 0/0 -> 0
    # macro: P = 1/4, R = 1/2, F1 = 1/3
    r = classification_report([0, 1], [0, 0], ["a", "b"])
    assert r["per_class"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert r["per_class"]["a"]["f1"] == 0.6667
    assert (r["macro_precision"], r["macro_recall"], r["macro_f1"]) == (0.25, 0.5, 0.3333)


@pytest.mark.parametrize("k", [1, 2, 6])
def test_perfect_prediction(k):
    y = np.arange(k).repeat(3)
    r = classification_report(y, y, [f"c{i}" for i in range(k)])
    assert r["accuracy"] == r["macro_f1"] == r["macro_precision"] == r["macro_recall"] == 1.0
    assert r["confusion"] == (3 * np.eye(k, dtype=int)).tolist()


def test_confusion_pairs_for_dvc_plot():
    rows = confusion_pairs([0, 2, 1], [0, 1, 1], CLASSES)
    assert rows == [{"actual": "background", "predicted": "background"},
                    {"actual": "abdomen", "predicted": "head"},
                    {"actual": "head", "predicted": "head"}]


@pytest.mark.parametrize("y_true, y_pred, classes, message", [
    ([0, 1], [0], CLASSES, "same length, got 2 and 1"),
    ([], [], CLASSES, "y_true is empty"),
    ([0, 3], [0, 1], CLASSES, r"y_true\[1\] = 3 is not a class index.*\[0, 2\]"),
    ([0, 1], [0, -1], CLASSES, r"y_pred\[1\] = -1 is not a class index"),
    ([0.0, 1.0], [0, 1], CLASSES, "y_true must hold integer class indices, got dtype float64"),
    ([[0, 1]], [[0, 1]], CLASSES, r"y_true must be a 1-D array.*\(1, 2\)"),
    ([0], [0], [], "classes is empty"),
    ([0], [0], ["a", "b", "a"], r"duplicate names \['a'\]"),
    ([0], [0], "abc", "sequence of class names, got the string"),
])
@pytest.mark.parametrize("fn", [classification_report, confusion_pairs])
def test_bad_arguments_are_named(fn, y_true, y_pred, classes, message):
    with pytest.raises(ValueError, match=message):
        fn(y_true, y_pred, classes)
