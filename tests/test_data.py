"""Corpus loading, tokenise + pack (exactness, seeds, cache), validation split, errors, resumable iteration."""

from __future__ import annotations

import json
import os
import random
import re
import unicodedata
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from ltgbert import data
from ltgbert.data import (
    ChunkCachedEncoder,
    build_pretraining_dataset,
    check_text_file,
    load_text_dataset,
    packing_stats,
    split_validation,
)
from ltgbert.errors import UserError
from ltgbert.loading import check_tokenizer_fits
from ltgbert.masking import MlmCollator
from ltgbert.tokenization import train_tokenizer

WORDS = (
    "the dog cat bird walk walked walking talk talked talking jump jumped jumps happy unhappy happiness "
    "river Oslo Bergen quickly slowly over under because"
).split()


def make_docs(n_docs: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        n_sentences = rng.choice([1, 1, 2, 3, 6, 12])  # some documents longer than a block
        docs.append(
            "\n".join(
                " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))).capitalize() + "."
                for _ in range(n_sentences)
            )
        )
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
        "".join(json.dumps({"text": d}) + "\n" for d in make_docs(5)), encoding="utf-8"
    )
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
    with pytest.raises(UserError, match="vocab_size is 100; use the tokenizer the model was trained with"):
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
    packed = build_pretraining_dataset(
        tokenizer, text, 32, short_seq_prob=0.3, seed=1, cache_dir=tmp_path, sep_between_documents=False, batch_size=64
    )
    assert sum(block_contents(packed), []) == sum(doc_ids, [])
    # with separators: the same tokens plus one [SEP] between neighbouring documents of a map batch
    packed = build_pretraining_dataset(
        tokenizer, text, 32, short_seq_prob=0.3, seed=1, cache_dir=tmp_path, batch_size=64
    )
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
        packed = build_pretraining_dataset(
            tokenizer, text, 32, short_seq_prob=0.5, seed=seed, cache_dir=tmp_path / cache
        )
        lengths[cache] = [len(r) for r in packed["input_ids"]]
    assert lengths["a"] == lengths["b"] != lengths["c"]
    no_short = build_pretraining_dataset(tokenizer, text, 32, short_seq_prob=0.0, cache_dir=tmp_path)
    assert packing_stats(no_short, 32).fill_rate > 0.97


def test_cache_reused_and_invalidated(corpus, tokenizer, tmp_path, monkeypatch):
    path = write_txt(tmp_path / "corpus.txt", corpus[1])
    first = build_pretraining_dataset(
        tokenizer, load_text_dataset(path, cache_dir=tmp_path), 32, num_proc=2, cache_dir=tmp_path / "packed"
    )
    files = sorted(os.listdir(tmp_path / "packed"))
    assert len(files) == 2  # one Arrow file per worker

    def must_not_run(*args, **kwargs):
        raise AssertionError("tokenised again although the cache holds the result")

    monkeypatch.setattr(data, "_tokenize_and_pack", must_not_run)
    again = build_pretraining_dataset(
        tokenizer, load_text_dataset(path, cache_dir=tmp_path), 32, num_proc=2, cache_dir=tmp_path / "packed"
    )
    assert again["input_ids"][:] == first["input_ids"][:] and sorted(os.listdir(tmp_path / "packed")) == files
    # a changed file (size + mtime) or a changed option means new work
    with open(path, "a", encoding="utf-8") as f:
        f.write("\nOne more document.\n")
    with pytest.raises(AssertionError, match="tokenised again"):
        build_pretraining_dataset(
            tokenizer, load_text_dataset(path, cache_dir=tmp_path), 32, num_proc=2, cache_dir=tmp_path / "packed"
        )
    monkeypatch.undo()
    changed = build_pretraining_dataset(
        tokenizer, load_text_dataset(path, cache_dir=tmp_path), 32, num_proc=2, cache_dir=tmp_path / "packed"
    )
    assert packing_stats(changed, 32).num_tokens > packing_stats(first, 32).num_tokens


def test_chunk_cache_gives_the_tokenizer_ids(tokenizer):
    # every space, control, format, separator and non-spacing mark of the BMP (where Python and the
    # tokenizer could disagree on word boundaries) plus a sample of the rest, as separators next to
    # special tokens, punctuation and unknown characters
    chars = [
        chr(c)
        for c in range(0x10000)
        if not 0xD800 <= c < 0xE000
        and (
            chr(c).isspace()
            or unicodedata.category(chr(c)) in ("Cc", "Cf", "Zs", "Zl", "Zp", "Mn", "Me")
            or c % 101 == 0
        )
    ]
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

    packed = build_pretraining_dataset(
        tokenizer, load_text_dataset(corpus[2], cache_dir=tmp_path), 32, cache_dir=tmp_path
    )

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


# -----------------------------------------------------------------------------
# BabyLM-style corpora: suffixes, directories, globs, layouts, bounded documents


def write_babylm(root: Path, n_lines: int = 400) -> Path:
    """A train_10M-like directory: sources of one utterance per line (one with CRLF, one with a stray blank
    line), a hidden file and a sub-directory that are not corpus files; beside it dev/ with a .dev file."""
    corpus = root / "train_10M"
    corpus.mkdir()
    rng = random.Random(3)
    for k, name in enumerate(["childes", "bnc_spoken", "switchboard"]):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12))) for _ in range(n_lines)]
        if name == "bnc_spoken":
            lines.insert(n_lines // 2, "")
        text = "\n".join(lines) + "\n"
        (corpus / f"{name}.train").write_bytes(text.replace("\n", "\r\n" if k == 0 else "\n").encode())
    (root / "dev").mkdir()
    write_txt(root / "dev" / "childes.dev", make_docs(30, seed=9))  # blank-line documents
    (corpus / ".hidden").write_text("not corpus text\n", encoding="utf-8")
    (corpus / "sub").mkdir()
    return corpus


def test_expand_input_files(tmp_path):
    corpus = write_babylm(tmp_path)
    names = ["bnc_spoken.train", "childes.train", "switchboard.train"]
    assert [p.name for p in data.expand_input_files(corpus)] == names  # regular, non-hidden files, sorted
    assert [p.name for p in data.expand_input_files(str(corpus / "*.train"))] == names  # an unexpanded pattern
    mixed = data.expand_input_files([corpus / "childes.train", str(corpus / "*.train"), tmp_path / "dev"])
    assert [p.name for p in mixed] == ["childes.train", "bnc_spoken.train", "switchboard.train", "childes.dev"]
    with pytest.raises(UserError, match=r"^--validation_file pattern '.*\*\.dev' matches no files; check") as e:
        data.expand_input_files(str(corpus / "*.dev"), option="--validation_file")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="the directory holds no files"):
        data.expand_input_files(corpus / "sub")
    assert data.is_plain_text("a.train") and data.is_plain_text("b.dev") and not data.is_plain_text("c.jsonl")
    assert ".train" in data.PLAIN_TEXT_SUFFIXES and ".parquet" not in data.PLAIN_TEXT_SUFFIXES


def test_babylm_directory_is_read_in_bounded_documents(tmp_path):
    corpus = write_babylm(tmp_path)
    raw = {p.name: p.read_bytes().decode() for p in sorted(corpus.glob("*.train"))}
    text, layouts = load_text_dataset(
        str(corpus / "*.train"), line_chunk_chars=300, cache_dir=tmp_path / "c", return_layouts=True
    )
    assert [lay.layout for lay in layouts] == ["lines"] * 3
    assert [lay.lines for lay in layouts] == [400] * 3 and [lay.empty_lines for lay in layouts] == [1, 0, 0]
    assert "one utterance per line: documents are runs of consecutive lines up to 300 chars" in layouts[0].describe()
    docs = text["text"][:]
    assert len(docs) > 30 and max(map(len, docs)) <= 300 and not any("\r" in d for d in docs)
    # nothing lost or changed: the documents hold the files' lines, in order
    assert "\n".join(docs).split("\n") == [line for t in raw.values() for line in t.splitlines() if line]
    # a single such file splits into train and validation documents (no "corpus of 1 documents")
    single = load_text_dataset(corpus / "childes.train", line_chunk_chars=300, cache_dir=tmp_path / "c")
    train, val = split_validation(single, 0.1)
    assert len(val) >= 3 and len(train) > len(val)
    # the held-out documents come from several sources: no whole file is held out
    train, val = split_validation(text, 0.2, seed=1)
    sources = {name: set(t.replace("\r", "").splitlines()) for name, t in raw.items()}
    val_sources = {name for d in val["text"][:] for name, lines in sources.items() if d.split("\n")[0] in lines}
    assert len(val_sources) >= 2
    assert all(any(d.split("\n")[0] in lines for d in train["text"][:]) for lines in sources.values())
    # the blank-line demo layout is still read as documents; forced modes apply to every file
    demo, layouts = load_text_dataset([tmp_path / "dev" / "childes.dev"], cache_dir=tmp_path / "c", return_layouts=True)
    assert layouts[0].layout == "blank_line" and demo["text"][:] == make_docs(30, seed=9)
    forced = load_text_dataset(
        corpus / "switchboard.train", doc_mode="blank_line", max_document_chars=500, cache_dir=tmp_path / "c"
    )
    assert len(forced) > 10 and max(len(d) for d in forced["text"][:]) <= 500


def test_long_lines_are_cut_at_whitespace(tmp_path):
    # one 40k-character line without a newline at the end, a word longer than the cap, tabs and NBSP spaces
    rng = random.Random(0)
    words = [rng.choice(WORDS) * rng.randint(1, 3) for _ in range(5000)]
    words[1234] = "x" * 700
    raw = "".join(w + rng.choice([" ", " ", "\t", "\u00a0"]) for w in words).rstrip()
    path = tmp_path / "one_line.txt"
    path.write_text(raw, encoding="utf-8")
    text = load_text_dataset(path, max_document_chars=500, cache_dir=tmp_path / "c")
    docs = text["text"][:]
    assert len(docs) > 40 and sorted(map(len, docs))[-2] <= 500 and max(map(len, docs)) == 700
    assert " ".join(docs).split() == raw.split()


# -----------------------------------------------------------------------------
# word counts per block


def word_start_reference(tokenizer, docs: list[str], sep_between_documents: bool) -> tuple[list[int], np.ndarray]:
    """The packed stream (no [CLS]/[SEP] of blocks) and how many words start at each of its tokens, from the
    tokenizer's offsets, document by document (the straightforward way the packer must agree with)."""
    stream, counts = [], []
    for doc in docs:
        enc = tokenizer(doc, add_special_tokens=False, return_offsets_mapping=True)
        ids, ends = enc["input_ids"], [e for _, e in enc["offset_mapping"]]
        if not ids:
            continue
        if sep_between_documents and stream:
            stream.append(tokenizer.sep_token_id)
            counts.append(0)
        doc_counts = [0] * len(ids)
        for m in re.finditer(r"\S+", doc):
            first = next((t for t, e in enumerate(ends) if e > m.start()), len(ids) - 1)
            doc_counts[first] += 1
        stream += ids
        counts += doc_counts
    return stream, np.asarray(counts)


def test_block_word_counts_are_exact(tmp_path, tokenizer):
    # multi-piece words, CRLF, blank lines, tabs, a control character the normaliser deletes (a word without
    # tokens), characters on which str.split and the tokenizer disagree, and one whitespace-only document
    docs = make_docs(120, seed=4)
    docs[3] = docs[3].replace(" ", " \x01 ", 1)
    docs[5] = docs[5].replace(" ", "\x1c", 2)
    docs[7] = "unhappiness\tover-walking rivers\u00a0quickly"
    raw = ("\r\n\r\n".join(docs) + "\r\n\n \n\x01\n").replace("Oslo", "Oslo\x0b")
    path = tmp_path / "words.txt"
    path.write_bytes(raw.encode())
    text = load_text_dataset(path, cache_dir=tmp_path / "c")
    assert sum(len(d.split()) for d in text["text"][:]) == len(raw.split())
    for max_seq_length, short, batch_size, sep in ((16, 0.3, 7, True), (64, 0.0, 1000, True), (12, 0.5, 33, False)):
        packed = build_pretraining_dataset(
            tokenizer,
            text,
            max_seq_length,
            short_seq_prob=short,
            seed=2,
            batch_size=batch_size,
            sep_between_documents=sep,
            cache_dir=tmp_path,
        )
        words = np.asarray(packed["words"][:])
        assert words.sum() == len(raw.split()) == packing_stats(packed, max_seq_length).num_words
        # per block: the words whose first token the block holds, map batch by map batch
        expected = []
        rows = iter(packed["input_ids"][:])
        for start in range(0, len(text), batch_size):
            stream, counts = word_start_reference(tokenizer, text["text"][start : start + batch_size], sep)
            counts[-1] += len(" ".join(text["text"][start : start + batch_size]).split()) - counts.sum()
            covered = 0
            while covered < len(stream):
                n = len(next(rows)) - 2
                expected.append(int(counts[covered : covered + n].sum()))
                covered += n
        assert words.tolist() == expected


def test_word_counts_with_a_byte_level_tokenizer(tmp_path):
    """Tokenizers whose tokens carry the spaces (byte-level BPE) take the offsets path; the count is exact."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    docs = make_docs(60, seed=5)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        docs,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<s>", "</s>", "<pad>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe, cls_token="<s>", sep_token="</s>", pad_token="<pad>")
    path = write_txt(tmp_path / "bpe.txt", docs)
    text = load_text_dataset(path, cache_dir=tmp_path / "c")
    packed = build_pretraining_dataset(fast, text, 24, short_seq_prob=0.2, batch_size=16, cache_dir=tmp_path)
    assert not ChunkCachedEncoder(fast.backend_tokenizer).cacheable
    assert sum(packed["words"][:]) == len(path.read_text(encoding="utf-8").split())
    stream, counts = word_start_reference(fast, text["text"][:16], True)
    first_blocks = [len(r) - 2 for r in packed["input_ids"][:]]
    assert packed["words"][0] == counts[: first_blocks[0]].sum()


def test_cache_is_shared_across_nodes(corpus, tokenizer, tmp_path, monkeypatch):
    """Two 'nodes' with their own text caches but one shared packed cache_dir: the second finds the first's
    files (same names: the key holds no node-local path) and tokenises nothing."""
    path = corpus[2]
    first = build_pretraining_dataset(
        tokenizer, load_text_dataset(path, cache_dir=tmp_path / "node0"), 32, cache_dir=tmp_path / "shared"
    )
    names = sorted(os.listdir(tmp_path / "shared"))
    monkeypatch.setattr(data, "_tokenize_and_pack", lambda *a, **k: pytest.fail("tokenised again on node 1"))
    other = build_pretraining_dataset(
        tokenizer, load_text_dataset(path, cache_dir=tmp_path / "node1"), 32, cache_dir=tmp_path / "shared"
    )
    assert sorted(os.listdir(tmp_path / "shared")) == names
    assert other["input_ids"][:] == first["input_ids"][:] and other["words"][:] == first["words"][:]


def test_text_cache_per_file(tmp_path, monkeypatch):
    """Documents are cached per input file: a second load reads nothing, a changed file is read again alone."""
    corpus = write_babylm(tmp_path, n_lines=50)
    first = load_text_dataset(corpus, cache_dir=tmp_path / "c")
    calls = []
    real_write = data._write_documents
    monkeypatch.setattr(
        data, "_write_documents", lambda source, target: calls.append(source[0]) or real_write(source, target)
    )
    again = load_text_dataset(corpus, cache_dir=tmp_path / "c")
    assert calls == [] and again["text"][:] == first["text"][:] and again._fingerprint == first._fingerprint
    with open(corpus / "switchboard.train", "a", encoding="utf-8") as f:
        f.write("one more utterance\n")
    changed = load_text_dataset(corpus, cache_dir=tmp_path / "c")
    assert [Path(c).name for c in calls] == ["switchboard.train"] and changed._fingerprint != first._fingerprint
    assert changed["text"][-1].endswith("one more utterance")
