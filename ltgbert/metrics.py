"""Classification and regression metrics for fine-tuning, computed with scikit-learn and scipy.

The ``evaluate`` library fetches its metric scripts from the Hugging Face Hub, which a compute node often
cannot reach, so the GLUE metrics are computed here from their definitions:

- single-label (binary and multi-class): accuracy, F1 (binary: positive class 1), macro F1, micro F1 and the
  Matthews correlation (CoLA's official metric);
- multi-label: exact match (every label of the row right), micro and macro F1 over the label matrix;
- regression: Pearson and Spearman correlation (STS-B's official metrics) and the mean squared error.

Every function takes the raw model outputs (logits, or scores for regression) and the encoded labels, as
numpy arrays, and returns plain Python floats so the dict goes straight into ``metrics.json`` and
TensorBoard. Degenerate inputs give a defined number, not NaN: a correlation with a constant vector is 0.0
(there is no linear relation to measure), which also keeps best-model selection well ordered.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import stats
from sklearn import metrics as skm

__all__ = [
    "PROBLEM_TYPES",
    "METRIC_NAMES",
    "compute_metrics",
    "logits_to_predictions",
    "default_metric",
    "greater_is_better",
    "is_better",
]

# Canonical problem types; transformers' config.problem_type has one name for binary and multi-class.
PROBLEM_TYPES = ("binary", "multiclass", "multilabel", "regression")

# What compute_metrics returns per problem type (plus "loss" when the evaluation loop adds it).
METRIC_NAMES = {
    "binary": ("accuracy", "f1", "f1_macro", "f1_micro", "matthews_correlation"),
    "multiclass": ("accuracy", "f1_macro", "f1_micro", "matthews_correlation"),
    "multilabel": ("exact_match", "f1_micro", "f1_macro"),
    "regression": ("pearson", "spearmanr", "mse"),
}

# Metrics where a smaller value is better; everything else is maximised.
_LOWER_IS_BETTER = ("loss", "mse")


def logits_to_predictions(problem_type: str, logits: np.ndarray) -> np.ndarray:
    """Model outputs -> predictions: class ids (argmax), 0/1 label matrix (logit > 0) or scores."""
    logits = np.asarray(logits)
    if problem_type in ("binary", "multiclass"):
        return logits.argmax(axis=-1)
    if problem_type == "multilabel":
        # sigmoid(x) > 0.5 <=> x > 0: the BCE-trained decision threshold, without computing the sigmoid.
        return (logits > 0).astype(np.int64)
    if problem_type == "regression":
        return logits.reshape(len(logits), -1)[:, 0]
    raise ValueError(f"unknown problem type {problem_type!r}; expected one of {PROBLEM_TYPES}")


def _correlation(fn, x: np.ndarray, y: np.ndarray) -> float:
    # scipy returns NaN (with a warning) for constant input; no variation means no measurable correlation.
    if len(x) < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = float(fn(x, y)[0])
    return 0.0 if math.isnan(value) else value


def single_label_metrics(preds: np.ndarray, labels: np.ndarray, binary: bool) -> dict[str, float]:
    """Accuracy, F1 variants and Matthews correlation for class-id predictions."""
    out = {"accuracy": float(skm.accuracy_score(labels, preds))}
    if binary:
        # zero_division=0: a model that never predicts the positive class scores 0, without a warning.
        out["f1"] = float(skm.f1_score(labels, preds, average="binary", pos_label=1, zero_division=0))
    out["f1_macro"] = float(skm.f1_score(labels, preds, average="macro", zero_division=0))
    out["f1_micro"] = float(skm.f1_score(labels, preds, average="micro", zero_division=0))
    with warnings.catch_warnings():
        # sklearn warns and returns 0.0 when one side is constant; 0.0 is the documented value.
        warnings.simplefilter("ignore")
        out["matthews_correlation"] = float(skm.matthews_corrcoef(labels, preds))
    return out


def multilabel_metrics(preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Exact match and micro/macro F1 for [rows, labels] 0/1 matrices."""
    labels = (np.asarray(labels) > 0.5).astype(np.int64)
    return {
        "exact_match": float(np.mean(np.all(preds == labels, axis=1))),
        "f1_micro": float(skm.f1_score(labels, preds, average="micro", zero_division=0)),
        "f1_macro": float(skm.f1_score(labels, preds, average="macro", zero_division=0)),
    }


def regression_metrics(preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Pearson, Spearman and mean squared error for real-valued predictions."""
    preds = np.asarray(preds, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64).reshape(len(preds))
    return {
        "pearson": _correlation(stats.pearsonr, preds, labels),
        "spearmanr": _correlation(stats.spearmanr, preds, labels),
        "mse": float(np.mean((preds - labels) ** 2)),
    }


def compute_metrics(problem_type: str, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """All metrics of ``METRIC_NAMES[problem_type]`` for raw model outputs against encoded labels.

    ``logits``: [rows, num_labels] (regression: [rows] or [rows, 1]); ``labels``: class ids [rows],
    a 0/1 matrix [rows, num_labels] (multi-label) or floats [rows] (regression). Empty input is a
    ``ValueError``: a metric over no rows means the evaluation split was lost somewhere.
    """
    logits, labels = np.asarray(logits), np.asarray(labels)
    if len(logits) == 0:
        raise ValueError("no predictions to score")
    if len(logits) != len(labels):
        raise ValueError(f"{len(logits)} predictions but {len(labels)} labels")
    preds = logits_to_predictions(problem_type, logits)
    if problem_type in ("binary", "multiclass"):
        return single_label_metrics(preds, labels.astype(np.int64), binary=problem_type == "binary")
    if problem_type == "multilabel":
        return multilabel_metrics(preds, labels)
    return regression_metrics(preds, labels)


def default_metric(problem_type: str) -> str:
    """The metric that picks the best checkpoint when the user names none."""
    return {"binary": "accuracy", "multiclass": "accuracy", "multilabel": "f1_micro", "regression": "pearson"}[
        problem_type
    ]


def greater_is_better(metric: str) -> bool:
    """False for losses and errors, True for scores."""
    return metric.removeprefix("eval_") not in _LOWER_IS_BETTER


def is_better(metric: str, value: float, best: float | None) -> bool:
    """Strict improvement of ``value`` over ``best`` (None: nothing yet) in the metric's direction."""
    if best is None:
        return True
    return value > best if greater_is_better(metric) else value < best
