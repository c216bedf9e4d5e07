"""ltgbert.metrics against hand-computed values and the scikit-learn / scipy definitions."""

import json
import math

import numpy as np
import pytest

from ltgbert.metrics import (
    METRIC_NAMES,
    compute_metrics,
    default_metric,
    extract_chunks,
    greater_is_better,
    is_better,
    logits_to_predictions,
    tag_metrics,
    tag_scheme,
    token_metrics,
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
    assert {default_metric(p) for p in METRIC_NAMES} == {"accuracy", "f1_micro", "pearson", "f1"}
    assert default_metric("token") == "f1"
    with pytest.raises(ValueError):
        compute_metrics("binary", np.zeros((0, 2)), np.zeros(0))


# ----------------------------------------------------------------------------------------------------------
# Token classification: chunks as conlleval (and seqeval's default mode) read them


@pytest.mark.parametrize(
    "tags, chunks",
    [
        ("B-PER I-PER O B-LOC", [("PER", 0, 1), ("LOC", 3, 3)]),
        ("I-PER I-PER O I-LOC", [("PER", 0, 1), ("LOC", 3, 3)]),  # IOB1: I- after O starts a chunk
        ("B-PER I-LOC I-LOC", [("PER", 0, 0), ("LOC", 1, 2)]),  # a type change starts another chunk
        ("B-PER B-PER I-PER", [("PER", 0, 0), ("PER", 1, 2)]),  # B- always starts one
        ("B-PER E-PER S-LOC I-LOC", [("PER", 0, 1), ("LOC", 2, 2), ("LOC", 3, 3)]),  # IOBES: S-/E- close
        ("B-PER E-PER I-PER", [("PER", 0, 1), ("PER", 2, 2)]),
        ("O O", []),
    ],
)
def test_extract_chunks(tags, chunks):
    assert extract_chunks(tags.split()) == chunks


def test_tag_scheme():
    assert tag_scheme(["O", "B-PER", "I-PER", "E-LOC", "S-LOC"]) == "bio"
    assert tag_scheme(["NOUN", "VERB", "DET"]) == "tag" and tag_scheme(["O", "PER"]) == "tag"
    assert tag_scheme(["O", "B-PER", "MISC"]) == "tag" and tag_scheme(["O"]) == "tag"


def test_entity_metrics_by_hand():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "O", "O", "B-LOC"], ["B-ORG", "B-LOC"]]  # PER cut short (wrong boundary), one extra LOC
    m = tag_metrics(gold, pred)
    assert set(m) == set(METRIC_NAMES["token"]) and all(type(v) is float for v in m.values())
    # gold chunks PER LOC ORG; predicted PER(0,0) LOC ORG LOC(1,1): 2 correct of 4 predicted, of 3 gold
    assert m["precision"] == pytest.approx(2 / 4) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 * (1 / 2) * (2 / 3) / (1 / 2 + 2 / 3))
    assert m["accuracy"] == pytest.approx(4 / 6)
    # per type F1: PER 0 (0 of 1), LOC 2/3 (1 of 2 predicted, 1 of 1 gold), ORG 1
    assert m["f1_macro"] == pytest.approx((0 + 2 / 3 + 1) / 3)


def test_pos_tags_score_every_token_as_its_own_chunk():
    gold = [["DET", "NOUN", "VERB", "PUNCT"], ["PRON", "VERB"]]
    pred = [["DET", "NOUN", "NOUN", "PUNCT"], ["PRON", "VERB"]]
    m = tag_metrics(gold, pred)
    assert m["accuracy"] == m["precision"] == m["recall"] == m["f1"] == pytest.approx(5 / 6)
    # per tag F1: DET 1, NOUN 2/3, VERB 2/3 (p=1, r=1/2), PUNCT 1, PRON 1
    assert m["f1_macro"] == pytest.approx((1 + 2 / 3 + 2 / 3 + 1 + 1) / 5)
    # with an O tag and no prefixes, O tokens are not chunks: only the PER token counts for the F1
    m = tag_metrics([["O", "PER", "O"]], [["O", "PER", "PER"]])
    assert m["precision"] == pytest.approx(1 / 2) and m["recall"] == 1.0 and m["accuracy"] == pytest.approx(2 / 3)


def test_token_metrics_from_logits_ignore_unlabelled_positions():
    id2label = {0: "O", 1: "B-PER", 2: "I-PER"}
    # row 0: [CLS] Ann(B-PER) ##a(-100) Lee(I-PER) [SEP]; row 1 narrower: [CLS] runs(O) [SEP]
    labels = [np.array([-100, 1, -100, 2, -100]), np.array([-100, 0, -100])]
    ids = [np.array([0, 1, 0, 2, 0, 0, 0]), np.array([1, 0, 2, 0])]  # wrong ids only where labels are -100
    m = token_metrics([np.eye(3)[i] for i in ids], labels, id2label)
    assert m == {"accuracy": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0, "f1_macro": 1.0}
    assert token_metrics(ids, labels, id2label) == m  # predicted ids work as well as logits
    padded = np.full((2, 5), -100)
    padded[0], padded[1, :3] = labels[0], labels[1]
    wrong = np.zeros((2, 5, 3))
    wrong[:, :, 1] = 1  # B-PER everywhere but on "Lee": "runs" becomes a spurious PER chunk
    wrong[0, 3] = [0, 0, 1]
    m = compute_metrics("token", wrong, padded, id2label=id2label)
    assert m["accuracy"] == pytest.approx(2 / 3) and m["precision"] == pytest.approx(1 / 2)
    assert m["recall"] == 1.0 and m["f1"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="id2label"):
        compute_metrics("token", wrong, padded)
    with pytest.raises(ValueError):
        token_metrics([], [], id2label)
