"""MLM collator: masking statistics, word boundaries, span lengths, determinism, padding, schedule."""

from __future__ import annotations

import re

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


def make_rows(
    n_rows: int, seed: int = 0, min_len: int = 20, max_len: int = 128, piece_prob: float = 0.3, unk_prob: float = 0.02
) -> list[dict]:
    """Packed-looking rows: [CLS] words (some with ## pieces, some [UNK]) [SEP] words ... [SEP]."""
    rng = np.random.default_rng(seed)
    rows = []
    for idx in range(n_rows):
        n = int(rng.integers(min_len, max_len + 1))
        ids = np.where(
            rng.random(n) < piece_prob,
            rng.integers(5 + N_WORDS, 5 + N_WORDS + N_PIECES, n),
            rng.integers(5, 5 + N_WORDS, n),
        )
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
    rows = [
        {"input_ids": [CLS, 5, 6, 7, SEP], "idx": 0},
        {"input_ids": np.array([CLS, 8, SEP], dtype=np.int32), "idx": 1},
    ]
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


# -----------------------------------------------------------------------------
# tokenizers from elsewhere: word starts, special ids, refusal

TEXT = "the unhappiest walkers jumped quickly over sleepy rivers\nand slowly talked about happiness"


def foreign_tokenizer(kind: str):
    """A tokenizer of another family, trained here on a few sentences (small vocab: words split into pieces),
    with special tokens at other ids than LTG-BERT's."""
    from tokenizers import decoders, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [TEXT, "the walkers talked about rivers", "happiness is a sleepy river", "jumped over the river"] * 5
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    if kind == "unigram":  # SentencePiece-style
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=60, special_tokens=specials, unk_token="<unk>")
    elif kind == "bpe_metaspace":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=60, special_tokens=specials)
    elif kind == "bytelevel":  # GPT-2 / RoBERTa
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
    else:  # word-level: no subword marker at all
        tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer = trainers.WordLevelTrainer(special_tokens=specials)
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        cls_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
    )


def words_of_tokens(tok, text: str) -> tuple[list[int], list[int | None]]:
    """Ids of `text` and, per token, the index of the whitespace word holding its last character (None for
    tokens of whitespace only, such as a newline)."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = [m.span() for m in re.finditer(r"\S+", text)]
    owner = [next((w for w, (s, e) in enumerate(spans) if s < end <= e), None) for _, end in enc["offset_mapping"]]
    return enc["input_ids"], owner


@pytest.mark.parametrize(
    "kind, scheme",
    [("wordpiece", "wordpiece"), ("unigram", "metaspace"), ("bpe_metaspace", "metaspace"), ("bytelevel", "bytelevel")],
)
def test_word_masking_follows_the_tokenizers_words(tokenizer, kind, scheme):
    if kind == "wordpiece":  # the fixture's fixed vocabulary: multi-piece words ("w1 ##p0 ##p1") by hand
        tok = tokenizer
        ids, owner = [5, 6, 65, 66, 7, 67, 8, 9, 68, 69, 10], [0, 1, 1, 1, 2, 2, 3, 4, 4, 4, 5]
    else:
        tok = foreign_tokenizer(kind)
        ids, owner = words_of_tokens(tok, TEXT)
    assert len(ids) > len(set(o for o in owner if o is not None)), "the text must have multi-piece words"
    collator = MlmCollator(tok, strategy="word", mlm_probability=0.4, seed=0)
    assert collator.vocab.word_scheme == scheme
    row = [tok.cls_token_id] + ids + [tok.sep_token_id]
    selected = np.stack(
        [collator([{"input_ids": row, "idx": i}])["labels"][0, 1:-1].numpy() != -100 for i in range(300)]
    )
    words = sorted({o for o in owner if o is not None})
    for w in words:  # the pieces of a word share every decision
        cols = [t for t, o in enumerate(owner) if o == w]
        assert (selected[:, cols] == selected[:, cols[:1]]).all(), (kind, w)
    for a, b in zip(words, words[1:]):  # and neighbouring words are separate words
        ta, tb = owner.index(a), owner.index(b)
        assert (selected[:, ta] != selected[:, tb]).any(), (kind, a, b)


def test_word_boundary_scheme_is_read_from_the_pipeline():
    from tokenizers import decoders

    from ltgbert.masking import word_boundaries

    llama = Tokenizer(models.BPE(vocab={"\u2581a": 0, "b": 1}, merges=[]))  # SentencePiece in the normaliser
    llama.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    assert word_boundaries(llama)[:2] == ("metaspace", "\u2581")
    nested = Tokenizer(models.BPE(vocab={"a": 0}, merges=[]))  # a Sequence holding the ByteLevel step
    nested.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(), pre_tokenizers.ByteLevel()])
    assert word_boundaries(nested)[0] == "bytelevel"
    hashed = Tokenizer(models.BPE(vocab={"a": 0, "@@b": 1}, merges=[], continuing_subword_prefix="@@"))
    hashed.decoder = decoders.BPEDecoder()
    assert word_boundaries(hashed)[:2] == ("wordpiece", "@@")
    assert word_boundaries(Tokenizer(models.WordLevel({"a": 0}, unk_token="a")))[0] is None
    assert word_boundaries(object())[0] is None


def test_special_ids_come_from_the_tokenizer():
    tok = foreign_tokenizer("bytelevel")
    tok.add_special_tokens({"additional_special_tokens": ["<extra>"]})
    extra = tok.convert_tokens_to_ids("<extra>")
    specials = set(tok.all_special_ids) | {extra}
    info = VocabInfo.from_tokenizer(tok)
    assert set(np.flatnonzero(info.is_special)) == specials and (info.pad_token_id, info.mask_token_id) == (1, 4)
    ids, _ = words_of_tokens(tok, TEXT)
    rows = [{"input_ids": [0] + ids[: 5 + i % 20] + [extra, 2] + ids[:7] + [2], "idx": i} for i in range(400)]
    for strategy in ("span", "subword"):
        batch = MlmCollator(tok, strategy=strategy, mlm_probability=0.5, seed=1)(rows)
        real = batch["attention_mask"].bool()
        originals = torch.nn.utils.rnn.pad_sequence(
            [torch.tensor(r["input_ids"]) for r in rows], batch_first=True, padding_value=1
        )
        assert (batch["input_ids"][~real] == 1).all()  # padded with the tokenizer's <pad>
        is_special = torch.isin(originals, torch.tensor(sorted(specials)))
        assert (batch["labels"][is_special] == -100).all() and (batch["labels"][real & ~is_special] != -100).any()
        replaced = (batch["input_ids"] != originals) & (batch["input_ids"] != 4) & real
        assert replaced.any() and not torch.isin(batch["input_ids"][replaced], torch.tensor(sorted(specials))).any()


def test_span_and_word_masking_refuse_a_tokenizer_without_word_boundaries():
    tok = foreign_tokenizer("wordlevel")
    for strategy in ("span", "word"):
        with pytest.raises(
            UserError,
            match=rf"^masking strategy '{strategy}' needs word boundaries, but the tokenizer "
            r"\(WordLevel model, pre-tokenizer Whitespace\) marks none .*"
            r"use --masking subword",
        ) as e:
            MlmCollator(tok, strategy=strategy)
        assert "\n" not in str(e.value)
    MlmCollator(tok, strategy="subword")([{"input_ids": [0, 7, 8, 9, 2], "idx": 0}])


# -----------------------------------------------------------------------------
# the schedule in the collator, the real loader with workers


def test_step_driven_mask_ratio(tokenizer):
    rows = make_rows(600, seed=11)
    original = np.concatenate([np.asarray(r["input_ids"]) for r in rows])
    n_candidates = (~np.isin(original, [0, 1, 2, 3, 4])).sum()
    scheduled = MlmCollator(
        tokenizer, strategy="span", mlm_probability=0.1, mlm_probability_start=0.4, total_steps=100, seed=2
    )
    fixed = MlmCollator(tokenizer, strategy="span", seed=2)
    for step, ratio in ((0, 0.4), (50, 0.25), (100, 0.1), (170, 0.1)):
        tagged = [{**r, "step": step} for r in rows]
        batches = collate_all(scheduled, tagged)
        share = (flat(batches, "labels") != -100).sum() / n_candidates
        assert abs(share - ratio) < 0.03 * ratio, (step, share)
        # the mask is a function of the ratio: the same as a constant-ratio collator set to it
        fixed.mlm_probability = mask_ratio_at(step, 100, 0.4, 0.1)
        for a, b in zip(batches, collate_all(fixed, rows)):
            assert all(torch.equal(a[k], b[k]) for k in b)
    # without a schedule, or without "step" keys, the collator's mlm_probability holds
    plain = collate_all(MlmCollator(tokenizer, strategy="span", seed=2), [{**r, "step": 0} for r in rows[:32]])
    assert all(
        torch.equal(a["labels"], b["labels"])
        for a, b in zip(plain, collate_all(MlmCollator(tokenizer, strategy="span", seed=2), rows[:32]))
    )
    assert scheduled.mask_ratio() == 0.1
    with pytest.raises(UserError, match="needs mlm_probability_start in \\[0, 1\\] and total_steps"):
        MlmCollator(tokenizer, mlm_probability_start=0.3)


def test_worker_count_does_not_change_batches(tokenizer):
    import datasets

    from ltgbert.batching import LoaderDataset, ShardedBatchSampler

    rows = make_rows(96, seed=12)
    packed = datasets.Dataset.from_dict(
        {
            "input_ids": [r["input_ids"] for r in rows],
            "words": [len(r["input_ids"]) // 2 for r in rows],
            "idx": [r["idx"] for r in rows],
        }
    )
    collator = MlmCollator(
        tokenizer, strategy="span", mlm_probability=0.15, mlm_probability_start=0.5, total_steps=6, seed=3
    )
    collator.set_epoch(1)

    def batches(num_workers: int) -> list[dict]:
        sampler = ShardedBatchSampler(len(packed), 8, accumulation=2, seed=4)
        sampler.set_epoch(1)
        loader = torch.utils.data.DataLoader(
            LoaderDataset(packed),
            batch_sampler=sampler,
            collate_fn=collator,
            num_workers=num_workers,
            persistent_workers=False,
        )
        return list(loader)

    reference = batches(0)
    assert len(reference) == 12 and reference[0]["words"].dtype == torch.long
    assert set(reference[0]) == {"input_ids", "attention_mask", "labels", "words"}  # no "step"/"real" for the model
    assert sum(int(b["words"].sum()) for b in reference) == sum(packed["words"])  # one epoch: every row once
    for num_workers in (1, 2):
        for a, b in zip(reference, batches(num_workers), strict=True):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the schedule reached the masks: early steps mask more than late ones
    early = sum(int((b["labels"] != -100).sum()) for b in reference[:2])
    late = sum(int((b["labels"] != -100).sum()) for b in reference[-2:])
    assert early > 1.5 * late


def test_rows_or_columns_give_the_same_batch(tokenizer):
    import datasets
    import pyarrow as pa

    rows = make_rows(40, seed=13)
    packed = datasets.Dataset.from_dict(
        {
            "input_ids": [r["input_ids"] for r in rows],
            "words": [3 + i for i in range(40)],
            "idx": [r["idx"] for r in rows],
        }
    )
    collator = MlmCollator(tokenizer, strategy="span", mlm_probability_start=0.4, total_steps=10, seed=4)
    picks = [7, 3, 31, 3, 12]
    as_rows = [{**packed[i], "step": s} for i, s in zip(picks, range(5))]
    table = packed.with_format("arrow")[picks].append_column("step", pa.array(range(5)))
    columns = {
        "input_ids": [packed[i]["input_ids"] for i in picks],
        "idx": picks,
        "step": list(range(5)),
        "words": [packed[i]["words"] for i in picks],
    }
    expected = collator(as_rows)
    assert expected["words"].tolist() == [10, 6, 34, 6, 15]
    for batch in (collator(table), collator(columns)):
        assert batch.keys() == expected.keys() and all(torch.equal(batch[k], expected[k]) for k in expected)
