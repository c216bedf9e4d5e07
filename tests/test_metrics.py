"""ltgbert.metrics against hand-computed values and the scikit-learn / scipy definitions."""

import json
import math

import numpy as np
import pytest

from ltgbert.metrics import (
    METRIC_NAMES,
    compute_metrics,
    default_metric,
    greater_is_better,
    is_better,
    logits_to_predictions,
)


def one_hot_logits(preds, num_labels):
    logits = np.zeros((len(preds), num_labels))
    logits[np.arange(len(preds)), preds] = 1.0
    return logits


def test_binary_by_hand():
    labels = np.array([1, 1, 1, 0, 0, 0])
    preds = np.array([1, 1, 0, 0, 0, 1])  # tp=2 fn=1 tn=2 fp=1
    m = compute_metrics("binary", one_hot_logits(preds, 2), labels)
    assert set(m) == set(METRIC_NAMES["binary"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["f1"] == pytest.approx(2 / 3)  # precision 2/3, recall 2/3
    assert m["f1_micro"] == pytest.approx(m["accuracy"])
    # MCC = (tp*tn - fp*fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = (4 - 1) / 9
    assert m["matthews_correlation"] == pytest.approx(3 / 9)


def test_multiclass_macro_f1():
    labels = np.array([0, 0, 1, 1, 2, 2])
    preds = np.array([0, 0, 1, 2, 2, 2])
    m = compute_metrics("multiclass", one_hot_logits(preds, 3), labels)
    # per-class F1: 1.0, 2/3 (p=1, r=.5), 0.8 (p=2/3, r=1)
    assert m["f1_macro"] == pytest.approx((1.0 + 2 / 3 + 0.8) / 3)
    assert m["accuracy"] == pytest.approx(5 / 6)
    assert "f1" not in m


def test_multilabel_exact_match_and_micro_f1():
    labels = np.array([[1, 0, 1], [0, 1, 0], [0, 0, 0]], dtype=float)
    logits = np.array([[2.0, -1.0, 0.5], [1.0, 3.0, -2.0], [-1.0, -1.0, -1.0]])  # row 2 has one false positive
    m = compute_metrics("multilabel", logits, labels)
    assert m["exact_match"] == pytest.approx(2 / 3)
    # tp=3, fp=1, fn=0 -> micro F1 = 2*3 / (2*3 + 1)
    assert m["f1_micro"] == pytest.approx(6 / 7)


def test_regression_correlations_and_constant_input():
    labels = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    scores = np.array([[0.1], [0.9], [2.5], [2.6], [5.0]])
    m = compute_metrics("regression", scores, labels)
    assert m["spearmanr"] == pytest.approx(1.0)
    assert m["pearson"] == pytest.approx(float(np.corrcoef(scores[:, 0], labels)[0, 1]))
    assert m["mse"] == pytest.approx(float(np.mean((scores[:, 0] - labels) ** 2)))
    flat = compute_metrics("regression", np.full(5, 2.0), labels)
    assert flat["pearson"] == 0.0 and flat["spearmanr"] == 0.0  # defined, not NaN
    json.dumps(flat)  # and serialisable


def test_degenerate_classifier_gives_numbers():
    labels = np.array([0, 1, 0, 1])
    m = compute_metrics("binary", one_hot_logits(np.zeros(4, dtype=int), 2), labels)
    assert m["f1"] == 0.0 and m["matthews_correlation"] == 0.0
    assert all(not math.isnan(v) for v in m.values())


def test_predictions_and_direction():
    assert logits_to_predictions("multilabel", np.array([[0.1, -0.1]])).tolist() == [[1, 0]]
    assert logits_to_predictions("regression", np.array([[1.5], [2.5]])).tolist() == [1.5, 2.5]
    assert not greater_is_better("loss") and not greater_is_better("eval_mse") and greater_is_better("accuracy")
    assert is_better("loss", 0.5, 0.6) and not is_better("accuracy", 0.5, 0.6) and is_better("f1", 0.1, None)
    assert {default_metric(p) for p in METRIC_NAMES} == {"accuracy", "f1_micro", "pearson"}
    with pytest.raises(ValueError):
        compute_metrics("binary", np.zeros((0, 2)), np.zeros(0))
