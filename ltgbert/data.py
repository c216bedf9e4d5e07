"""Corpus loading, tokenisation and document-aware packing for MLM pretraining.

The pipeline is: files (or a Hub dataset) -> one document per row (`load_text_dataset`) -> held-out
validation documents (`split_validation`) -> tokenise + pack into blocks of `max_seq_length`
(`build_pretraining_dataset`) -> the MLM collator in `ltgbert.masking` masks each batch.

Design points:
1. Everything goes through `datasets` (Arrow files, memory-mapped), so corpora larger than memory work.
   Plain-text files are streamed line by line by a generator; structured files (jsonl/json/parquet/csv/tsv)
   use the `datasets` packaged builders.
2. Tokenise + pack is one batched `datasets.map` with `num_proc` workers whose output Arrow files have a
   name derived from a fingerprint of the inputs (file paths + sizes + mtimes via the text dataset's
   fingerprint), the whole tokenizer (vocab, normaliser, ...) and the packing options. A second run with the
   same inputs finds the files and does not tokenise again.
3. Packing follows LTG-BERT: documents are concatenated (with [SEP] between them by default) and cut into
   blocks `[CLS] ... [SEP]`, so no padding is wasted and no token is lost or duplicated. A share
   `short_seq_prob` of blocks gets a random shorter length (as in BERT's create_pretraining_data) so the
   model also sees short inputs; the lengths are drawn from a generator seeded by (seed, first row of the
   map batch), so the result is reproducible.
4. Distributed runs: every rank calls `build_pretraining_dataset` inside
   `with accelerator.main_process_first():` so the main process tokenises and the others load its cache
   files. The cache_dir must then be on a filesystem all ranks see, and the process-group timeout must be
   longer than the tokenisation of the whole corpus (the other ranks wait in a barrier meanwhile; the
   default 30 min of torch.distributed is too short for real corpora).
5. Bad input raises `ltgbert.errors.UserError` with one line naming the problem and the fix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

import datasets

from ltgbert.errors import UserError

logger = logging.getLogger(__name__)

# bump when the packing output changes, so stale cache files are not reused
PACKING_VERSION = 1

PLAIN_TEXT_SUFFIXES = {"", ".txt", ".text"}
STRUCTURED_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".tsv": "csv"}
DOC_MODES = ("blank_line", "line")


# -----------------------------------------------------------------------------
# input files: existence, utf-8, fingerprint


def check_text_file(path: str | Path, chunk_size: int = 1 << 22) -> bool:
    """Check that `path` exists and is valid UTF-8; return whether it holds any non-whitespace text.

    Streams the file in chunks (no full read into memory); a multi-byte character cut by a chunk
    boundary is carried over to the next chunk. Decoding runs at GB/s, so this costs little next to
    tokenisation, and it turns a deep pyarrow/tokenizers traceback into an error that names the byte.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"file not found: {path}; check the path passed as --train_file/--validation_file")
    if not path.is_file():
        raise UserError(f"not a file: {path}; pass text files (or a dataset name), not a directory")
    has_text, offset, carry = False, 0, b""
    with open(path, "rb") as f:
        while True:
            chunk = f.read(chunk_size)
            data = carry + chunk
            if not data:
                break
            carry = b""
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as e:
                # an incomplete character at the end of a chunk is fine, unless the file ends there
                if chunk and e.reason == "unexpected end of data" and len(data) - e.start < 4:
                    carry = data[e.start:]
                    data = data[: e.start]
                else:
                    raise UserError(
                        f"{path}: invalid UTF-8 at byte offset {offset + e.start}; re-encode the file as UTF-8 "
                        f"(e.g. iconv -f latin1 -t utf-8) or remove the bad bytes"
                    ) from None
            has_text = has_text or bool(data.strip())
            offset += len(data)
    return has_text


def files_fingerprint(files: Sequence[str | Path]) -> str:
    """Hash of absolute paths, sizes and modification times: changes whenever an input file changes."""
    h = hashlib.sha256()
    for f in files:
        st = os.stat(f)
        h.update(f"{os.path.abspath(f)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _as_file_list(files: str | Path | Iterable[str | Path]) -> list[Path]:
    if isinstance(files, (str, Path)):
        files = [files]
    files = [Path(f) for f in files]
    if not files:
        raise UserError("no input files given; pass --train_file PATH [PATH ...] or a dataset name")
    return files


# -----------------------------------------------------------------------------
# loading: one document per row


def _read_documents(files: list[str], doc_mode: str, fingerprint: str):
    """Yield {"text": document} from plain-text files, streaming line by line.

    blank_line: a document is a run of non-blank lines (lines are kept, joined by newlines);
    line: every non-blank line is a document. `fingerprint` is unused here: it is part of the
    generator's arguments so that datasets' cache key changes when the files change.
    """
    for path in files:
        with open(path, encoding="utf-8") as f:
            if doc_mode == "line":
                for line in f:
                    line = line.strip()
                    if line:
                        yield {"text": line}
                continue
            lines: list[str] = []
            for line in f:
                line = line.strip()
                if line:
                    lines.append(line)
                elif lines:
                    yield {"text": "\n".join(lines)}
                    lines = []
            if lines:  # a document never spans two files
                yield {"text": "\n".join(lines)}


def load_text_dataset(
    files: str | Path | Sequence[str | Path] | None = None,
    *,
    dataset_name: str | None = None,
    dataset_config: str | None = None,
    text_column: str = "text",
    split: str = "train",
    doc_mode: str = "blank_line",
    cache_dir: str | Path | None = None,
    num_proc: int | None = None,
) -> datasets.Dataset:
    """Load a corpus as a `datasets.Dataset` with one column "text" holding one document per row.

    Either `files` (plain text: .txt/.text/no suffix; or all of one structured format: .jsonl/.json/.parquet/
    .csv/.tsv, where each row of `text_column` is a document) or `dataset_name` (+ `dataset_config`,
    `split`) for `datasets.load_dataset` from the Hub or a local loading script/directory.
    `doc_mode` applies to plain text: "blank_line" (documents separated by blank lines) or "line".
    """
    if doc_mode not in DOC_MODES:
        raise UserError(f"unknown doc_mode {doc_mode!r}; use one of {', '.join(DOC_MODES)}")
    cache_dir = str(cache_dir) if cache_dir is not None else None
    if files is None and dataset_name is None:
        raise UserError("no corpus given; pass --train_file PATH or --dataset_name NAME")
    if files is not None and dataset_name is not None:
        raise UserError("both files and a dataset name given; pass only one of --train_file / --dataset_name")

    if dataset_name is not None:
        source = dataset_name + (f" ({dataset_config})" if dataset_config else "")
        try:
            ds = datasets.load_dataset(dataset_name, dataset_config, split=split, cache_dir=cache_dir, num_proc=num_proc)
        except (FileNotFoundError, ValueError, ConnectionError, datasets.exceptions.DatasetsError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(
                f"could not load dataset {source!r} split {split!r}: {first}; check the name, config and split "
                f"(offline, the dataset must already be in the datasets cache)"
            ) from None
        return _select_text_column(ds, text_column, source)

    paths = _as_file_list(files)
    suffixes = {p.suffix.lower() for p in paths}
    if suffixes <= PLAIN_TEXT_SUFFIXES:
        has_text = [check_text_file(p) for p in paths]
        if not any(has_text):
            raise UserError(f"empty corpus: {', '.join(map(str, paths))} hold no text; pass non-empty text files")
        str_paths = [str(p.resolve()) for p in paths]
        fingerprint = files_fingerprint(str_paths)
        ds = datasets.Dataset.from_generator(
            _read_documents,
            gen_kwargs={"files": str_paths, "doc_mode": doc_mode, "fingerprint": fingerprint},
            cache_dir=cache_dir,
            # sharding is by file: more processes than files would idle
            num_proc=min(num_proc, len(paths)) if num_proc and num_proc > 1 and len(paths) > 1 else None,
        )
        if len(ds) == 0:
            raise UserError(f"empty corpus: no documents in {', '.join(map(str, paths))}")
        return ds

    formats = {STRUCTURED_FORMATS.get(s) for s in suffixes}
    if None in formats or len(formats) > 1 or len(suffixes - {".jsonl", ".json"}) > 1:
        raise UserError(
            f"cannot mix or read file types {sorted(suffixes)}; pass plain text (.txt) or files of one format "
            f"among {', '.join(sorted(STRUCTURED_FORMATS))}"
        )
    fmt = formats.pop()
    for p in paths:
        if not p.exists():
            raise UserError(f"file not found: {p}; check the path passed as --train_file/--validation_file")
        if fmt != "parquet":
            check_text_file(p)
    kwargs = {"delimiter": "\t"} if suffixes == {".tsv"} else {}
    source = ", ".join(map(str, paths))
    try:
        ds = datasets.load_dataset(
            fmt, data_files=[str(p) for p in paths], split="train", cache_dir=cache_dir, num_proc=num_proc, **kwargs
        )
    except (ValueError, pa.ArrowException, datasets.exceptions.DatasetsError) as e:
        raise UserError(f"could not parse {source} as {fmt}: {type(e).__name__}; check the file format") from None
    ds = _select_text_column(ds, text_column, source)
    if len(ds) == 0:
        raise UserError(f"empty corpus: no rows in {source}; pass non-empty files")
    return ds


def _select_text_column(ds: datasets.Dataset, text_column: str, source: str) -> datasets.Dataset:
    if isinstance(ds, datasets.DatasetDict):  # load_dataset without a split never reaches here, but be safe
        raise UserError(f"{source} has several splits {list(ds)}; pass --dataset_split NAME")
    if text_column not in ds.column_names:
        raise UserError(
            f"{source} has no column {text_column!r} (columns: {', '.join(ds.column_names)}); "
            f"pass --text_column with one of them"
        )
    feature = ds.features[text_column]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise UserError(
            f"column {text_column!r} of {source} is not text ({feature}); pass --text_column naming a text column"
        )
    ds = ds.select_columns([text_column])
    if text_column != "text":
        ds = ds.rename_column(text_column, "text")
    return ds


def split_validation(
    text_dataset: datasets.Dataset, validation_fraction: float = 0.01, seed: int = 0
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Hold out whole documents (a `validation_fraction` share, at least one) as the validation split.

    Splitting documents, not blocks, keeps validation text out of training blocks. The choice depends
    only on (number of documents, fraction, seed); both parts keep the corpus order.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise UserError(f"validation_fraction must be in (0, 1), got {validation_fraction}; e.g. 0.01")
    n = len(text_dataset)
    n_val = max(1, int(round(n * validation_fraction)))
    if n < 2 or n_val >= n:
        raise UserError(
            f"corpus of {n} documents is too small to hold out {validation_fraction:.0%} for validation; "
            f"pass a --validation_file or a smaller validation fraction"
        )
    is_val = np.zeros(n, dtype=bool)
    is_val[np.random.default_rng(seed).choice(n, size=n_val, replace=False)] = True
    # explicit fingerprints: the defaults hash the index lists, which is slow for big corpora
    base = getattr(text_dataset, "_fingerprint", "nofp")
    train = text_dataset.select(np.flatnonzero(~is_val), new_fingerprint=_hash(base, "train", validation_fraction, seed))
    val = text_dataset.select(np.flatnonzero(is_val), new_fingerprint=_hash(base, "val", validation_fraction, seed))
    return train, val


# -----------------------------------------------------------------------------
# tokenise + pack


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the whole tokenizer definition (vocab, normaliser, pre-tokeniser, special tokens)."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def _block_lengths(rng: np.random.Generator, total: int, block: int, short_seq_prob: float) -> np.ndarray:
    """Content lengths of consecutive blocks covering `total` tokens: `block`, or with probability
    `short_seq_prob` uniform in [2, block]; the last block takes the remainder."""
    lengths: list[np.ndarray] = []
    covered = 0
    while covered < total:
        m = (total - covered) // block + 2
        lens = np.full(m, block, dtype=np.int64)
        if short_seq_prob > 0:
            short = rng.random(m) < short_seq_prob
            lens[short] = rng.integers(min(2, block), block + 1, size=int(short.sum()))
        lengths.append(lens)
        covered += int(lens.sum())
    lens = np.concatenate(lengths)
    ends = np.cumsum(lens)
    n = int(np.searchsorted(ends, total)) + 1  # first block whose end reaches the total
    lens = lens[:n].copy()
    lens[-1] -= int(ends[n - 1]) - total
    return lens


# Chars that Python's str.split() treats as whitespace but BertNormalizer(clean_text=True) deletes (they are
# control characters), so splitting there would cut a word that the tokenizer keeps whole.
_SPLIT_MISMATCH = re.compile("[\x0b\x0c\x1c-\x1f\x85]")


def _splits_on_whitespace(tokenizer) -> bool:
    """True when tokenising a text equals tokenising its whitespace-separated chunks one by one and
    concatenating: BertNormalizer(clean_text) + BertPreTokenizer + WordPiece, added tokens without spaces."""
    spec = json.loads(tokenizer.to_str())
    normalizer, pre_tokenizer = spec.get("normalizer") or {}, spec.get("pre_tokenizer") or {}
    return (
        normalizer.get("type") == "BertNormalizer"
        and normalizer.get("clean_text", False)
        and pre_tokenizer.get("type") == "BertPreTokenizer"
        and (spec.get("model") or {}).get("type") == "WordPiece"
        and not any(any(c.isspace() for c in t["content"]) for t in spec.get("added_tokens", []))
    )


class ChunkCachedEncoder:
    """texts -> WordPiece ids (no special tokens), with the ids of each whitespace-separated chunk cached.

    The Rust tokenizer spends most of its time building Encoding objects (offsets, token strings), about
    0.5M tokens per CPU-second; natural text repeats a few word types (Zipf), so encoding each distinct
    chunk once and concatenating cached ids is ~8x faster and gives identical ids (checked with every
    Unicode code point as a separator). The cache holds at most `max_cache` chunks (~150 MB) per worker.
    Tokenizers with other pipelines (byte-level BPE, Metaspace, ...), where spaces belong to tokens, go
    through `encode_batch_fast` unchanged. One instance per worker process:
    the cache is not pickled.
    """

    def __init__(self, tokenizer, max_cache: int = 500_000):
        self.tokenizer = tokenizer  # a tokenizers.Tokenizer (the backend of a fast tokenizer)
        self.cacheable = _splits_on_whitespace(tokenizer)
        self.max_cache = max_cache
        self.cache: dict[str, list[int]] = {}

    def __getstate__(self):
        return {**self.__dict__, "cache": {}}

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)]

    def __call__(self, texts: list[str]) -> list[list[int]]:
        if not self.cacheable:
            return self._encode(texts)
        out: list[list[int] | None] = [None] * len(texts)
        odd = [i for i, t in enumerate(texts) if _SPLIT_MISMATCH.search(t)]
        for i, ids in zip(odd, self._encode([texts[i] for i in odd])):
            out[i] = ids
        odd_set = set(odd)
        chunks = [t.split() if i not in odd_set else [] for i, t in enumerate(texts)]
        if len(self.cache) > self.max_cache:  # bound memory on corpora with huge numbers of word types
            self.cache.clear()
        cache = self.cache
        missing = [c for c in set(chain.from_iterable(chunks)) if c not in cache]
        for chunk, ids in zip(missing, self._encode(missing)):
            cache[chunk] = ids
        get = cache.__getitem__
        for i, cs in enumerate(chunks):
            if out[i] is None:
                out[i] = list(chain.from_iterable(map(get, cs)))
        return out


def _tokenize_and_pack(
    batch: dict,
    indices: list[int],
    *,
    encoder: ChunkCachedEncoder,
    cls_id: int,
    sep_id: int,
    max_seq_length: int,
    short_seq_prob: float,
    seed: int,
    sep_between_documents: bool,
) -> pa.Table:
    """datasets.map function: a batch of documents -> a table of packed blocks (column input_ids, int32)."""
    stream_list: list[int] = []
    for ids in encoder([t or "" for t in batch["text"]]):
        if ids:
            if sep_between_documents and stream_list:
                stream_list.append(sep_id)
            stream_list.extend(ids)
    if not stream_list:
        return pa.table({"input_ids": pa.array([], type=pa.list_(pa.int32()))})
    stream = np.array(stream_list, dtype=np.int32)

    # one generator per map batch, seeded by its first row: independent of worker scheduling
    rng = np.random.default_rng([seed, indices[0]])
    content = _block_lengths(rng, stream.size, max_seq_length - 2, short_seq_prob)
    offsets = np.zeros(content.size + 1, dtype=np.int32)
    np.cumsum(content + 2, out=offsets[1:])
    values = np.empty(offsets[-1], dtype=np.int32)
    is_content = np.ones(offsets[-1], dtype=bool)
    is_content[offsets[:-1]] = False
    is_content[offsets[1:] - 1] = False
    values[offsets[:-1]] = cls_id
    values[offsets[1:] - 1] = sep_id
    values[is_content] = stream
    return pa.table({"input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))})


def build_pretraining_dataset(
    tokenizer,
    text_dataset: datasets.Dataset,
    max_seq_length: int = 128,
    short_seq_prob: float = 0.1,
    seed: int = 0,
    num_proc: int | None = 1,
    cache_dir: str | Path | None = None,
    sep_between_documents: bool = True,
    batch_size: int = 1000,
) -> datasets.Dataset:
    """Tokenise and pack `text_dataset` (column "text") into blocks for MLM; cached on disk.

    Returns a dataset with columns "input_ids" (int32 lists, each `[CLS] ... [SEP]`, no padding,
    length <= max_seq_length) and "idx" (row index, which seeds the collator's masks). Documents are
    packed within map batches of `batch_size` documents, so the last block of each batch may be short.

    Cache: Arrow files named `packed-<key>*.arrow` in `cache_dir` (default: next to the text dataset's
    own cache files, else the datasets cache), where the key hashes the text dataset's fingerprint (file
    paths + sizes + mtimes for `load_text_dataset` inputs), the tokenizer and every packing option.
    A second call with equal inputs loads those files and tokenises nothing.

    Distributed: all ranks call this inside `with accelerator.main_process_first():` (main tokenises,
    the others reuse its files); cache_dir must be shared between nodes and the process-group timeout
    long enough for the whole tokenisation (see the module docstring).
    """
    if max_seq_length < 4:
        raise UserError(f"max_seq_length must be at least 4 ([CLS] + tokens + [SEP]), got {max_seq_length}")
    if not 0.0 <= short_seq_prob <= 1.0:
        raise UserError(f"short_seq_prob must be in [0, 1], got {short_seq_prob}")
    if "text" not in text_dataset.column_names:
        raise UserError(
            f"the text dataset has no 'text' column (columns: {text_dataset.column_names}); use load_text_dataset"
        )
    if len(text_dataset) == 0:
        raise UserError("empty corpus: the text dataset has no documents; pass non-empty files")
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    if cls_id is None or sep_id is None:
        raise UserError("the tokenizer has no [CLS]/[SEP] token; train one with launch/train_tokenizer.py")

    num_proc = num_proc if num_proc and num_proc > 1 else None
    key = _hash(
        PACKING_VERSION, getattr(text_dataset, "_fingerprint", None), tokenizer_fingerprint(tokenizer),
        max_seq_length, short_seq_prob, seed, sep_between_documents, batch_size,
    )
    cache_dir = _default_cache_dir(text_dataset) if cache_dir is None else Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    packed = text_dataset.map(
        _tokenize_and_pack,
        batched=True,
        batch_size=batch_size,
        with_indices=True,
        remove_columns=text_dataset.column_names,
        fn_kwargs=dict(
            encoder=ChunkCachedEncoder(tokenizer.backend_tokenizer), cls_id=cls_id, sep_id=sep_id,
            max_seq_length=max_seq_length,
            short_seq_prob=short_seq_prob, seed=seed, sep_between_documents=sep_between_documents,
        ),
        num_proc=num_proc,
        cache_file_name=str(cache_dir / f"packed-{key}.arrow"),
        load_from_cache_file=True,  # even when datasets' global caching is off: the key is ours
        new_fingerprint=key,  # skips hashing the tokenizer through dill
        desc="Tokenizing and packing",
    )
    if len(packed) == 0:
        raise UserError("empty corpus: tokenisation produced no tokens; check the text column and the tokenizer")
    packed = packed.add_column("idx", np.arange(len(packed), dtype=np.int64), new_fingerprint=key + "-idx")
    stats = packing_stats(packed, max_seq_length)
    logger.info(
        "packed %d blocks, %d tokens, fill rate %.3f at max_seq_length %d",
        stats.num_blocks, stats.num_tokens, stats.fill_rate, max_seq_length,
    )
    return packed


def _default_cache_dir(text_dataset: datasets.Dataset) -> Path:
    if text_dataset.cache_files:
        return Path(text_dataset.cache_files[0]["filename"]).parent
    return Path(datasets.config.HF_DATASETS_CACHE) / "ltgbert-packed"


@dataclass
class PackingStats:
    """Sizes of a packed dataset; fill_rate is the share of non-pad positions if every batch were padded
    to max_seq_length (what the model computes on, since the collator pads to the batch max)."""

    num_blocks: int
    num_tokens: int  # including [CLS]/[SEP]
    max_seq_length: int
    fill_rate: float
    mean_length: float


def packing_stats(dataset: datasets.Dataset, max_seq_length: int) -> PackingStats:
    """Compute PackingStats from the Arrow lengths (no Python loop over rows)."""
    column = dataset.with_format("arrow", columns=["input_ids"])[:]["input_ids"]
    lengths = pc.list_value_length(column)
    n = len(dataset)
    total = int(pc.sum(lengths).as_py() or 0)
    return PackingStats(
        num_blocks=n,
        num_tokens=total,
        max_seq_length=max_seq_length,
        fill_rate=total / (n * max_seq_length) if n else 0.0,
        mean_length=total / n if n else 0.0,
    )


# -----------------------------------------------------------------------------
# tokenizer / model agreement


def check_tokenizer_fits(tokenizer, vocab_size: int, special_token_ids: dict[str, int] | None = None) -> None:
    """Raise UserError if the tokenizer produces ids >= the model's vocab_size, or (when given as
    e.g. {"pad_token_id": 3, ...}) if its special-token ids differ from the model config's."""
    n = len(tokenizer)
    if n > vocab_size:
        raise UserError(
            f"the tokenizer has {n} tokens but the model's vocab_size is {vocab_size}; train a tokenizer with "
            f"--vocab_size {vocab_size} or less, or set the model's vocab_size to at least {n}"
        )
    for name, expected in (special_token_ids or {}).items():
        actual = getattr(tokenizer, name, None)
        if actual is not None and expected is not None and actual != expected:
            raise UserError(
                f"tokenizer {name} is {actual} but the model config says {expected}; use the tokenizer the model "
                f"was trained with, or train one with launch/train_tokenizer.py "
                f"(ids [UNK]=0 [CLS]=1 [SEP]=2 [PAD]=3 [MASK]=4)"
            )
