"""Corpus loading, tokenise + pack (exactness, seeds, cache), validation split, errors, resumable iteration."""

from __future__ import annotations

import json
import os
import random
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import datasets
from ltgbert import data
from ltgbert.data import (
    ChunkCachedEncoder,
    build_pretraining_dataset,
    check_text_file,
    check_tokenizer_fits,
    load_text_dataset,
    packing_stats,
    split_validation,
)
from ltgbert.errors import UserError
from ltgbert.masking import MlmCollator
from ltgbert.tokenization import train_tokenizer

WORDS = ("the dog cat bird walk walked walking talk talked talking jump jumped jumps happy unhappy happiness "
         "river Oslo Bergen quickly slowly over under because").split()


def make_docs(n_docs: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        n_sentences = rng.choice([1, 1, 2, 3, 6, 12])  # some documents longer than a block
        docs.append("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))).capitalize() + "."
                              for _ in range(n_sentences)))
    return docs


def write_txt(path: Path, docs: list[str]) -> Path:
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    docs = make_docs(300)
    return root, docs, write_txt(root / "corpus.txt", docs)


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return train_tokenizer([corpus[2]], vocab_size=150, min_frequency=1)


def block_contents(packed) -> list[list[int]]:
    return [row[1:-1] for row in packed["input_ids"]]


# -----------------------------------------------------------------------------
# loading


def test_load_plain_text_doc_modes(corpus, tmp_path):
    root, docs, path = corpus
    ds = load_text_dataset(path, cache_dir=tmp_path)
    assert ds.column_names == ["text"] and ds["text"][:] == docs
    lines = load_text_dataset([path], doc_mode="line", cache_dir=tmp_path)
    assert len(lines) == sum(len(d.splitlines()) for d in docs)
    # several files, whitespace-only separator lines and CRLF line ends
    other = tmp_path / "more.txt"
    other.write_bytes(b"first doc\r\nline two\r\n   \r\nsecond doc\r\n")
    both = load_text_dataset([path, other], cache_dir=tmp_path)
    assert both["text"][-2:] == ["first doc\nline two", "second doc"]


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_load_structured_with_text_column(tmp_path, fmt):
    docs = make_docs(20, seed=1)
    frame = datasets.Dataset.from_dict({"sentence": docs, "label": list(range(20))})
    path = tmp_path / f"rows.{fmt}"
    {"jsonl": frame.to_json, "csv": frame.to_csv, "parquet": frame.to_parquet}[fmt](str(path))
    ds = load_text_dataset(path, text_column="sentence", cache_dir=tmp_path / "cache")
    assert ds.column_names == ["text"] and ds["text"][:] == docs
    with pytest.raises(UserError, match=r"no column 'text' \(columns: sentence, label\); pass --text_column"):
        load_text_dataset(path, cache_dir=tmp_path / "cache")


def test_load_dataset_by_name_from_local_directory(tmp_path):
    # the Hub path is datasets.load_dataset(name, config); a local directory name exercises it offline
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "train.jsonl").write_text(
        "".join(json.dumps({"text": d}) + "\n" for d in make_docs(5)), encoding="utf-8")
    ds = load_text_dataset(dataset_name=str(tmp_path / "corpus"), cache_dir=tmp_path / "cache")
    assert len(ds) == 5 and ds.column_names == ["text"]
    with pytest.raises(UserError, match="could not load dataset .* split 'nope'"):
        load_text_dataset(dataset_name=str(tmp_path / "corpus"), split="nope", cache_dir=tmp_path / "cache")


def test_bad_inputs(tmp_path, tokenizer):
    with pytest.raises(UserError, match="file not found: .*missing.txt"):
        load_text_dataset(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n\t\n", encoding="utf-8")
    with pytest.raises(UserError, match="empty corpus"):
        load_text_dataset(empty)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine text\n" * 3 + b"caf\xe9\n")
    with pytest.raises(UserError, match=r"bad.txt: invalid UTF-8 at byte offset 33; re-encode"):
        load_text_dataset(bad)
    with pytest.raises(UserError, match="cannot mix"):
        load_text_dataset([tmp_path / "a.txt", tmp_path / "b.jsonl"])
    with pytest.raises(UserError, match="empty corpus"):
        build_pretraining_dataset(tokenizer, datasets.Dataset.from_dict({"text": ["", " "]}), 32, cache_dir=tmp_path)
    with pytest.raises(UserError, match="vocab_size is 100; train a tokenizer with --vocab_size 100"):
        check_tokenizer_fits(tokenizer, 100)
    check_tokenizer_fits(tokenizer, 16384, {"pad_token_id": 3, "mask_token_id": 4})
    with pytest.raises(UserError, match="pad_token_id is 3 but the model config says 0"):
        check_tokenizer_fits(tokenizer, 16384, {"pad_token_id": 0})


def test_utf8_check_streams_in_chunks(tmp_path):
    path = tmp_path / "multi.txt"
    text = "ÆØÅ snø 🤗 " * 50
    path.write_text(text, encoding="utf-8")
    for chunk_size in (1, 2, 3, 5, 7):  # multi-byte characters cut at every possible place
        assert check_text_file(path, chunk_size=chunk_size)
    raw = text.encode()
    path.write_bytes(raw + b"\xf0\x9f")  # a truncated 4-byte character at the very end
    with pytest.raises(UserError, match=f"byte offset {len(raw)}"):
        check_text_file(path, chunk_size=7)
    path.write_bytes(raw[:101] + b"\xff" + raw[101:])
    with pytest.raises(UserError, match="byte offset 101"):
        check_text_file(path, chunk_size=16)


# -----------------------------------------------------------------------------
# packing


def test_packing_keeps_every_token_exactly_once(corpus, tokenizer, tmp_path):
    root, docs, path = corpus
    text = load_text_dataset(path, cache_dir=tmp_path)
    doc_ids = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs]
    # without separators the block contents concatenate back to the documents, in order
    packed = build_pretraining_dataset(tokenizer, text, 32, short_seq_prob=0.3, seed=1, cache_dir=tmp_path,
                                       sep_between_documents=False, batch_size=64)
    assert sum(block_contents(packed), []) == sum(doc_ids, [])
    # with separators: the same tokens plus one [SEP] between neighbouring documents of a map batch
    packed = build_pretraining_dataset(tokenizer, text, 32, short_seq_prob=0.3, seed=1, cache_dir=tmp_path,
                                       batch_size=64)
    contents = block_contents(packed)
    flat = Counter(t for c in contents for t in c)
    n_separators = flat.pop(tokenizer.sep_token_id)
    assert flat == Counter(t for d in doc_ids for t in d)
    assert n_separators == len(docs) - int(np.ceil(len(docs) / 64))

    rows = packed["input_ids"]
    assert all(r[0] == tokenizer.cls_token_id and r[-1] == tokenizer.sep_token_id and 3 <= len(r) <= 32 for r in rows)
    assert packed["idx"][:] == list(range(len(packed)))
    lengths = np.array([len(r) for r in rows])
    stats = packing_stats(packed, 32)
    assert stats.num_blocks == len(rows) and stats.num_tokens == lengths.sum()
    assert stats.fill_rate == pytest.approx(lengths.sum() / (32 * len(rows)))
    assert 0.2 < (lengths < 32).mean() < 0.45  # ~30% short blocks, plus one short tail per map batch


def test_packing_is_seeded(corpus, tokenizer, tmp_path):
    text = load_text_dataset(corpus[2], cache_dir=tmp_path)
    lengths = {}
    for seed, cache in ((0, "a"), (0, "b"), (1, "c")):
        packed = build_pretraining_dataset(tokenizer, text, 32, short_seq_prob=0.5, seed=seed, cache_dir=tmp_path / cache)
        lengths[cache] = [len(r) for r in packed["input_ids"]]
    assert lengths["a"] == lengths["b"] != lengths["c"]
    no_short = build_pretraining_dataset(tokenizer, text, 32, short_seq_prob=0.0, cache_dir=tmp_path)
    assert packing_stats(no_short, 32).fill_rate > 0.97


def test_cache_reused_and_invalidated(corpus, tokenizer, tmp_path, monkeypatch):
    path = write_txt(tmp_path / "corpus.txt", corpus[1])
    first = build_pretraining_dataset(tokenizer, load_text_dataset(path, cache_dir=tmp_path), 32, num_proc=2,
                                      cache_dir=tmp_path / "packed")
    files = sorted(os.listdir(tmp_path / "packed"))
    assert len(files) == 2  # one Arrow file per worker

    def must_not_run(*args, **kwargs):
        raise AssertionError("tokenised again although the cache holds the result")

    monkeypatch.setattr(data, "_tokenize_and_pack", must_not_run)
    again = build_pretraining_dataset(tokenizer, load_text_dataset(path, cache_dir=tmp_path), 32, num_proc=2,
                                      cache_dir=tmp_path / "packed")
    assert again["input_ids"][:] == first["input_ids"][:] and sorted(os.listdir(tmp_path / "packed")) == files
    # a changed file (size + mtime) or a changed option means new work
    with open(path, "a", encoding="utf-8") as f:
        f.write("\nOne more document.\n")
    with pytest.raises(AssertionError, match="tokenised again"):
        build_pretraining_dataset(tokenizer, load_text_dataset(path, cache_dir=tmp_path), 32, num_proc=2,
                                  cache_dir=tmp_path / "packed")
    monkeypatch.undo()
    changed = build_pretraining_dataset(tokenizer, load_text_dataset(path, cache_dir=tmp_path), 32, num_proc=2,
                                        cache_dir=tmp_path / "packed")
    assert packing_stats(changed, 32).num_tokens > packing_stats(first, 32).num_tokens


def test_chunk_cache_gives_the_tokenizer_ids(tokenizer):
    # every space, control, format, separator and non-spacing mark of the BMP (where Python and the
    # tokenizer could disagree on word boundaries) plus a sample of the rest, as separators next to
    # special tokens, punctuation and unknown characters
    chars = [chr(c) for c in range(0x10000) if not 0xD800 <= c < 0xE000
             and (chr(c).isspace() or unicodedata.category(chr(c)) in ("Cc", "Cf", "Zs", "Zl", "Zp", "Mn", "Me")
                  or c % 101 == 0)]
    texts = [f"the{c}dog{c}{c}walked [MASK]jumps,Oslo 🤗" for c in chars]
    backend = tokenizer.backend_tokenizer
    encoder = ChunkCachedEncoder(backend)
    assert encoder.cacheable
    assert encoder(texts) == [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]


# -----------------------------------------------------------------------------
# validation split and resumable iteration


def test_split_validation_holds_out_documents(corpus, tmp_path):
    text = load_text_dataset(corpus[2], cache_dir=tmp_path)
    train, val = split_validation(text, 0.1, seed=0)
    assert len(val) == 30 and len(train) == 270
    assert sorted(train["text"][:] + val["text"][:]) == sorted(text["text"][:])
    assert split_validation(text, 0.1, seed=0)[1]["text"][:] == val["text"][:]
    assert split_validation(text, 0.1, seed=1)[1]["text"][:] != val["text"][:]
    with pytest.raises(UserError, match="too small"):
        split_validation(datasets.Dataset.from_dict({"text": ["only one"]}), 0.1)


def test_resumed_iteration_equals_uninterrupted(corpus, tokenizer, tmp_path):
    from accelerate import skip_first_batches
    from torch.utils.data import DataLoader, RandomSampler

    packed = build_pretraining_dataset(tokenizer, load_text_dataset(corpus[2], cache_dir=tmp_path), 32,
                                       cache_dir=tmp_path)

    def loader(epoch: int):
        # the training loop reseeds the sampler and sets the collator's epoch at the start of every epoch
        collator = MlmCollator(tokenizer, strategy="span", seed=5)
        collator.set_epoch(epoch)
        sampler = RandomSampler(packed, generator=torch.Generator().manual_seed(1000 + epoch))
        return DataLoader(packed, batch_size=8, sampler=sampler, collate_fn=collator)

    straight = [batch for epoch in (0, 1) for batch in loader(epoch)]
    per_epoch = len(straight) // 2
    k = per_epoch + 3  # stop in the middle of epoch 1, then resume with fresh objects
    resumed = list(skip_first_batches(loader(1), k - per_epoch))
    assert len(resumed) == len(straight) - k
    for a, b in zip(straight[k:], resumed):
        assert all(torch.equal(a[key], b[key]) for key in ("input_ids", "attention_mask", "labels"))
    assert not torch.equal(straight[0]["labels"], straight[per_epoch]["labels"])  # epochs differ
