"""Classification and regression metrics for fine-tuning, computed with scikit-learn and scipy.

The ``evaluate`` library fetches its metric scripts from the Hugging Face Hub, which a compute node often
cannot reach, so the GLUE metrics are computed here from their definitions:

- single-label (binary and multi-class): accuracy, F1 (binary: positive class 1), macro F1, micro F1 and the
  Matthews correlation (CoLA's official metric);
- multi-label: exact match (every label of the row right), micro and macro F1 over the label matrix;
- regression: Pearson and Spearman correlation (STS-B's official metrics) and the mean squared error;
- token classification (NER, POS; problem type ``"token"``): token accuracy and chunk-level precision,
  recall and F1 (micro over chunks, and macro over chunk types), in the CoNLL ``conlleval`` sense that
  seqeval's default mode follows. See "Token classification" below.

Every function takes the raw model outputs (logits, or scores for regression) and the encoded labels, as
numpy arrays, and returns plain Python floats so the dict goes straight into ``metrics.json`` and
TensorBoard. Degenerate inputs give a defined number, not NaN: a correlation with a constant vector is 0.0
(there is no linear relation to measure), which also keeps best-model selection well ordered.

Token classification. Metrics are computed over the positions that carry a label (the first subword of
each word the tokenizer kept; -100 elsewhere), one sentence per row, chunks never crossing rows:

- ``accuracy``: the fraction of those positions whose predicted tag is the gold tag.
- Chunks. For a prefixed tag set (every tag but ``O`` is ``B-``, ``I-``, ``E-`` or ``S-`` plus a type:
  IOB1, IOB2/BIO, IOBES) a chunk is a maximal run read as conlleval reads it: ``B-``/``S-`` always
  start one; ``I-``/``E-`` continue the open chunk of the same type and start one otherwise (after
  ``O``, after another type, after ``E-``/``S-``); ``E-``/``S-`` close it. A chunk is (type, first word,
  last word). For a tag set without prefixes (POS tags, or bare ``PER``/``LOC``/``O``) every token
  whose tag is not ``O`` is its own chunk of that tag, so for POS tags precision = recall = F1 =
  accuracy, and ``f1_macro`` is the mean per-tag F1.
- ``precision`` = correct predicted chunks / predicted chunks, ``recall`` = correct / gold chunks, ``f1``
  their harmonic mean (a chunk is correct when type and both ends match); ``f1_macro`` is the unweighted
  mean of per-type F1 over the types in gold or prediction. Zero denominators give 0.0, as seqeval's
  ``zero_division=0``.

seqeval itself is not used: its last release is from 2020 (sdist only), and its default mode reads tags
without a prefix as prefix + type ("NOUN" -> tag "N", type "OUN"), which is wrong for POS; the chunk
rules above are the whole of what it adds, and tests/test_metrics.py checks them case by case.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats
from sklearn import metrics as skm

__all__ = [
    "METRIC_NAMES",
    "PROBLEM_TYPES",
    "compute_metrics",
    "default_metric",
    "extract_chunks",
    "greater_is_better",
    "is_better",
    "logits_to_predictions",
    "tag_metrics",
    "tag_scheme",
    "token_metrics",
]

# Canonical problem types; transformers' config.problem_type has one name for binary and multi-class.
PROBLEM_TYPES = ("binary", "multiclass", "multilabel", "regression", "token")

# What compute_metrics returns per problem type (plus "loss" when the evaluation loop adds it).
METRIC_NAMES = {
    "binary": ("accuracy", "f1", "f1_macro", "f1_micro", "matthews_correlation"),
    "multiclass": ("accuracy", "f1_macro", "f1_micro", "matthews_correlation"),
    "multilabel": ("exact_match", "f1_micro", "f1_macro"),
    "regression": ("pearson", "spearmanr", "mse"),
    "token": ("accuracy", "precision", "recall", "f1", "f1_macro"),
}

# Metrics where a smaller value is better; everything else is maximised.
_LOWER_IS_BETTER = ("loss", "mse")


def logits_to_predictions(problem_type: str, logits: np.ndarray) -> np.ndarray:
    """Model outputs -> predictions: class ids (argmax), 0/1 label matrix (logit > 0) or scores."""
    logits = np.asarray(logits)
    if problem_type in ("binary", "multiclass", "token"):
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


def compute_metrics(
    problem_type: str, logits: np.ndarray, labels: np.ndarray, id2label: Mapping[int, str] | None = None
) -> dict[str, float]:
    """All metrics of ``METRIC_NAMES[problem_type]`` for raw model outputs against encoded labels.

    ``logits``: [rows, num_labels] (regression: [rows] or [rows, 1]); ``labels``: class ids [rows],
    a 0/1 matrix [rows, num_labels] (multi-label) or floats [rows] (regression). Empty input is a
    ``ValueError``: a metric over no rows means the evaluation split was lost somewhere. Token
    classification takes what ``token_metrics`` takes, and needs ``id2label``.
    """
    if problem_type == "token":
        if id2label is None:
            raise ValueError("token metrics need id2label (tag names)")
        return token_metrics(logits, labels, id2label)
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
    return {
        "binary": "accuracy",
        "multiclass": "accuracy",
        "multilabel": "f1_micro",
        "regression": "pearson",
        "token": "f1",
    }[problem_type]


def greater_is_better(metric: str) -> bool:
    """False for losses and errors, True for scores."""
    return metric.removeprefix("eval_") not in _LOWER_IS_BETTER


def is_better(metric: str, value: float, best: float | None) -> bool:
    """Strict improvement of ``value`` over ``best`` (None: nothing yet) in the metric's direction."""
    if best is None:
        return True
    return value > best if greater_is_better(metric) else value < best


# ----------------------------------------------------------------------------------------------------------
# Token classification

_PREFIXED = re.compile(r"^[BIES]-.+$")


def tag_scheme(tags: Sequence[str]) -> str:
    """``"bio"`` when every tag but ``O`` has a B-/I-/E-/S- prefix (IOB1, IOB2, IOBES), else ``"tag"``."""
    others = [t for t in tags if t != "O"]
    return "bio" if others and all(_PREFIXED.match(t) for t in others) else "tag"


def extract_chunks(tags: Sequence[str], scheme: str = "bio") -> list[tuple[str, int, int]]:
    """(type, first, last) of every chunk in one sentence's tags (rules in the module docstring)."""
    if scheme == "tag":
        return [(t, i, i) for i, t in enumerate(tags) if t != "O"]
    chunks, open_type, start, prev_prefix = [], None, 0, "O"
    for i, tag in enumerate(tags):
        prefix, kind = ("O", None) if tag == "O" else (tag[0], tag[2:])
        if open_type is not None and (prev_prefix in "ES" or prefix in "BSO" or kind != open_type):
            chunks.append((open_type, start, i - 1))
            open_type = None
        if prefix != "O" and open_type is None:  # B-/S- start; I-/E- start when nothing of their type is open
            open_type, start = kind, i
        prev_prefix = prefix
    if open_type is not None:
        chunks.append((open_type, start, len(tags) - 1))
    return chunks


def _prf(correct: int, predicted: int, gold: int) -> tuple[float, float, float]:
    p = correct / predicted if predicted else 0.0
    r = correct / gold if gold else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def tag_metrics(
    gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]], scheme: str | None = None
) -> dict[str, float]:
    """Token accuracy and chunk precision/recall/F1 of tag sequences (one per sentence, equal lengths).

    ``scheme`` ("bio" or "tag") defaults to ``tag_scheme`` of the gold and predicted tags together.
    """
    if len(gold) != len(pred):
        raise ValueError(f"{len(pred)} predicted sentences but {len(gold)} gold ones")
    if scheme is None:
        scheme = tag_scheme(sorted({t for seq in (*gold, *pred) for t in seq}))
    tokens = right = 0
    by_type: dict[str, list[int]] = {}  # type -> [correct, predicted, gold]
    for g, p in zip(gold, pred):
        if len(g) != len(p):
            raise ValueError(f"a sentence has {len(p)} predicted tags but {len(g)} gold ones")
        tokens += len(g)
        right += sum(a == b for a, b in zip(g, p))
        gold_chunks, pred_chunks = set(extract_chunks(g, scheme)), set(extract_chunks(p, scheme))
        for chunks, slot in ((gold_chunks & pred_chunks, 0), (pred_chunks, 1), (gold_chunks, 2)):
            for kind, _, _ in chunks:
                by_type.setdefault(kind, [0, 0, 0])[slot] += 1
    if tokens == 0:
        raise ValueError("no labelled tokens to score")
    totals = [sum(c[k] for c in by_type.values()) for k in range(3)]
    precision, recall, f1 = _prf(*totals)
    per_type = [_prf(*c)[2] for c in by_type.values()]
    return {
        "accuracy": right / tokens,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "f1_macro": float(np.mean(per_type)) if per_type else 0.0,
    }


def token_metrics(logits, labels, id2label: Mapping[int, str], scheme: str | None = None) -> dict[str, float]:
    """``METRIC_NAMES["token"]`` from model outputs, over the positions whose label is not -100.

    ``logits``: an [rows, T, num_labels] array or a sequence of [T_i, num_labels] arrays (or predicted ids
    of the labels' shape); ``labels``: an [rows, T] array or a sequence of [T_i] arrays, -100 where no word
    starts (padding, special tokens, later subwords). Rows may be padded to different widths: only the
    first ``len(labels[i])`` positions of row i count.
    """
    if len(logits) != len(labels):
        raise ValueError(f"{len(logits)} predicted rows but {len(labels)} labelled rows")
    if len(labels) == 0:
        raise ValueError("no predictions to score")
    names = {int(k): v for k, v in id2label.items()}
    gold, pred = [], []
    for out, lab in zip(logits, labels):
        out, lab = np.asarray(out), np.asarray(lab)
        ids = out.argmax(axis=-1) if out.ndim == lab.ndim + 1 else out
        keep = lab != -100
        gold.append([names[int(i)] for i in lab[keep]])
        pred.append([names[int(i)] for i in ids[: len(lab)][keep]])
    return tag_metrics(gold, pred, scheme or tag_scheme(sorted(names.values())))
