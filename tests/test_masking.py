"""MLM collator: masking statistics, word boundaries, span lengths, determinism, padding, schedule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from ltgbert.errors import UserError
from ltgbert.masking import MlmCollator, VocabInfo, mask_ratio_at, truncated_geometric_pmf
from ltgbert.tokenization import SPECIAL_TOKENS, wrap_tokenizer

N_WORDS, N_PIECES = 60, 30  # vocab: 5 specials, 60 word starts, 30 "##" continuations
CLS, SEP, PAD, MASK = 1, 2, 3, 4


@pytest.fixture(scope="module")
def tokenizer():
    # a fixed WordPiece vocabulary: no training needed, and the word-start table is known
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for i in range(N_WORDS):
        vocab[f"w{i}"] = len(vocab)
    for i in range(N_PIECES):
        vocab[f"##p{i}"] = len(vocab)
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return wrap_tokenizer(tok)


def is_start(ids: np.ndarray) -> np.ndarray:
    return (ids >= 5) & (ids < 5 + N_WORDS)


def make_rows(n_rows: int, seed: int = 0, min_len: int = 20, max_len: int = 128, piece_prob: float = 0.3,
              unk_prob: float = 0.02) -> list[dict]:
    """Packed-looking rows: [CLS] words (some with ## pieces, some [UNK]) [SEP] words ... [SEP]."""
    rng = np.random.default_rng(seed)
    rows = []
    for idx in range(n_rows):
        n = int(rng.integers(min_len, max_len + 1))
        ids = np.where(rng.random(n) < piece_prob, rng.integers(5 + N_WORDS, 5 + N_WORDS + N_PIECES, n),
                       rng.integers(5, 5 + N_WORDS, n))
        ids[rng.random(n) < unk_prob] = 0
        ids[0], ids[-1] = CLS, SEP
        if n > 40:
            ids[n // 2] = SEP  # a document separator inside the block
        rows.append({"input_ids": ids.tolist(), "idx": idx})
    return rows


def collate_all(collator: MlmCollator, rows: list[dict], batch_size: int = 16) -> list[dict]:
    return [collator(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]


def flat(batches: list[dict], key: str) -> np.ndarray:
    return np.concatenate([b[key][b["attention_mask"].bool()].numpy() for b in batches])


# -----------------------------------------------------------------------------
# statistics


@pytest.mark.parametrize("strategy", ["span", "word", "subword"])
def test_masked_share_and_80_10_10(tokenizer, strategy):
    rows = make_rows(1500, seed=1)
    batches = collate_all(MlmCollator(tokenizer, strategy=strategy, seed=3), rows)
    original = np.concatenate([np.asarray(r["input_ids"]) for r in rows])
    labels, inputs = flat(batches, "labels"), flat(batches, "input_ids")
    special = np.isin(original, [0, 1, 2, 3, 4])
    selected = labels != -100

    # labels hold the original token; specials ([UNK] included) and padding are never selected
    assert np.array_equal(labels[selected], original[selected])
    assert not (selected & special).any()
    for b in batches:
        assert (b["labels"][b["attention_mask"] == 0] == -100).all()
        assert (b["input_ids"][b["attention_mask"] == 0] == PAD).all()

    share = selected.sum() / (~special).sum()
    assert abs(share - 0.15) < 0.01 * 0.15, share  # within 1% (relative) of the target

    chosen_in = inputs[selected]
    masked = (chosen_in == MASK).mean()
    kept = (chosen_in == original[selected]).mean()
    random = 1.0 - masked - kept
    assert abs(masked - 0.8) < 0.02 and abs(kept - 0.1) < 0.02 and abs(random - 0.1) < 0.02, (masked, kept, random)
    # random replacements never draw a special token, and unselected positions are untouched
    assert not np.isin(chosen_in[chosen_in != MASK], [0, 1, 2, 3]).any()
    assert np.array_equal(inputs[~selected], original[~selected])


@pytest.mark.parametrize("strategy", ["span", "word"])
def test_whole_words_are_masked_together(tokenizer, strategy):
    rows = make_rows(300, seed=2, piece_prob=0.5)
    for b, batch in enumerate(collate_all(MlmCollator(tokenizer, strategy=strategy, seed=0), rows)):
        for r, labels in enumerate(batch["labels"].numpy()):
            ids = np.asarray(rows[16 * b + r]["input_ids"])
            sel = labels[: len(ids)] != -100
            # a continuation piece shares the decision of the piece before it, unless that one is special
            cont = ~is_start(ids) & ~np.isin(ids, [0, 1, 2, 3, 4])
            prev_special = np.r_[True, np.isin(ids[:-1], [0, 1, 2, 3, 4])]
            linked = cont & ~prev_special
            assert np.array_equal(sel[1:][linked[1:]], sel[:-1][linked[1:]])


def span_runs(collator: MlmCollator, rows: list[dict]) -> np.ndarray:
    runs = []
    for batch in collate_all(collator, rows):
        for sel in batch["labels"].numpy() != -100:
            edges = np.flatnonzero(np.diff(np.r_[0, sel.astype(int), 0]))
            runs.extend(edges[1::2] - edges[::2])
    return np.asarray(runs)


def test_span_lengths_follow_truncated_geometric(tokenizer):
    pmf = truncated_geometric_pmf(0.2, 10)
    assert abs((np.arange(1, 11) * pmf).sum() - 3.8) < 0.05  # SpanBERT's mean span length
    # the sampler the collator uses follows the configured distribution
    collator = MlmCollator(tokenizer, strategy="span", mlm_probability=0.04, max_span_length=10, seed=0)
    drawn = collator.draw_span_lengths(np.random.default_rng(0), 50_000)
    assert np.abs(np.bincount(drawn, minlength=11)[1:] / drawn.size - pmf).max() < 0.01

    # in the output: one piece per word, a low rate on long rows, so spans rarely touch and runs ~ spans;
    # the last span of a row is cut to fit the budget (shorter) and touching spans merge (longer): loose bounds
    rows = make_rows(300, seed=4, min_len=512, max_len=512, piece_prob=0.0, unk_prob=0.0)
    for r in rows:
        r["input_ids"][256] = 5  # no separator in the middle
    runs = span_runs(collator, rows)
    assert 0.8 * 3.8 < runs.mean() < 1.1 * 3.8, runs.mean()
    assert (runs > 10).mean() < 0.02
    short = span_runs(MlmCollator(tokenizer, strategy="span", mlm_probability=0.04, max_span_length=2, seed=0), rows)
    assert 1.2 < short.mean() < 1.6 and (short > 2).mean() < 0.05, short.mean()


def test_schedule_and_probability_change(tokenizer):
    assert mask_ratio_at(0, 100) == pytest.approx(0.3)
    assert mask_ratio_at(50, 100) == pytest.approx(0.225)
    assert mask_ratio_at(100, 100) == pytest.approx(0.15) == mask_ratio_at(500, 100)
    assert mask_ratio_at(3, 0, 0.4, 0.2) == 0.2
    rows = make_rows(200, seed=5)
    collator = MlmCollator(tokenizer, strategy="subword", seed=0)
    collator.mlm_probability = 0.3
    labels = flat(collate_all(collator, rows), "labels")
    original = np.concatenate([np.asarray(r["input_ids"]) for r in rows])
    share = (labels != -100).sum() / (~np.isin(original, [0, 1, 2, 3, 4])).sum()
    assert abs(share - 0.3) < 0.01
    with pytest.raises(UserError):
        collator.mlm_probability = 1.5


# -----------------------------------------------------------------------------
# determinism


def test_same_seed_same_batches_and_epochs_differ(tokenizer):
    rows = make_rows(64, seed=6)
    a = collate_all(MlmCollator(tokenizer, seed=7), rows)
    b = collate_all(MlmCollator(tokenizer, seed=7), rows)
    for x, y in zip(a, b):
        assert all(torch.equal(x[k], y[k]) for k in x)
    other_seed = collate_all(MlmCollator(tokenizer, seed=8), rows)
    assert not all(torch.equal(x["labels"], y["labels"]) for x, y in zip(a, other_seed))
    collator = MlmCollator(tokenizer, seed=7)
    collator.set_epoch(1)
    epoch1 = collate_all(collator, rows)
    assert not all(torch.equal(x["labels"], y["labels"]) for x, y in zip(a, epoch1))
    collator.set_epoch(0)
    again = collate_all(collator, rows)
    assert all(torch.equal(x["labels"], y["labels"]) for x, y in zip(a, again))


@pytest.mark.parametrize("strategy", ["span", "word", "subword"])
def test_row_mask_independent_of_batch_and_global_rng(tokenizer, strategy):
    rows = make_rows(40, seed=9)
    collator = MlmCollator(tokenizer, strategy=strategy, seed=1)
    target = rows[5]
    n = len(target["input_ids"])
    alone = collator([target])
    np_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state()
    mixed = collator([rows[30], rows[11], target, rows[2]])  # other rows, other padding
    np.random.seed(123)
    torch.manual_seed(123)
    shuffled = collator([target] + rows[12:20])
    for key in ("input_ids", "labels"):
        assert torch.equal(alone[key][0, :n], mixed[key][2, :n])
        assert torch.equal(alone[key][0, :n], shuffled[key][0, :n])
    # the collator neither reads nor advances the global generators
    np.random.set_state(("MT19937", np_state, 0, 0, 0.0))
    torch.set_rng_state(torch_state)
    before = np.random.get_state()[1].copy()
    collator(rows[:8])
    assert np.array_equal(before, np.random.get_state()[1])


# -----------------------------------------------------------------------------
# output format and arguments


def test_padding_dtypes_and_multiple_of(tokenizer):
    rows = [{"input_ids": [CLS, 5, 6, 7, SEP], "idx": 0}, {"input_ids": np.array([CLS, 8, SEP], dtype=np.int32), "idx": 1}]
    out = MlmCollator(tokenizer, seed=0, pad_to_multiple_of=8)(rows)
    assert set(out) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long and t.shape == (2, 8) for t in out.values())
    assert out["attention_mask"].tolist() == [[1] * 5 + [0] * 3, [1] * 3 + [0] * 5]
    assert (out["input_ids"][1, 3:] == PAD).all()
    plain = MlmCollator(tokenizer, seed=0)(rows)
    assert plain["input_ids"].shape == (2, 5)


def test_vocab_table_and_bad_arguments(tokenizer):
    info = VocabInfo.from_tokenizer(tokenizer)
    assert info.is_special[:5].all() and not info.is_special[5:].any()
    assert info.is_word_start[5 : 5 + N_WORDS].all() and not info.is_word_start[5 + N_WORDS :].any()
    assert (info.pad_token_id, info.mask_token_id) == (PAD, MASK)
    with pytest.raises(UserError, match="strategy"):
        MlmCollator(tokenizer, strategy="random")
    with pytest.raises(UserError, match="sum to at most 1"):
        MlmCollator(tokenizer, mask_replace_prob=0.8, random_replace_prob=0.3)
    with pytest.raises(KeyError, match="idx"):
        MlmCollator(tokenizer)([{"input_ids": [CLS, 5, SEP]}])
    # rows of only special tokens mask nothing, and the collator accepts a prepared VocabInfo
    out = MlmCollator(info, seed=0)([{"input_ids": [CLS, SEP], "idx": 0}])
    assert (out["labels"] == -100).all()
