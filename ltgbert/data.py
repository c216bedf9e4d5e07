"""Corpus loading, tokenisation and document-aware packing for MLM pretraining.

The pipeline is: `--train_file` values (files, directories, glob patterns) -> input files
(`expand_input_files`) -> one document per row (`load_text_dataset`) -> held-out validation documents
(`split_validation`) -> tokenise + pack into blocks of `max_seq_length` (`build_pretraining_dataset`) -> the
MLM collator in `ltgbert.masking` masks each batch.

Design points:
1. Everything goes through `datasets` (Arrow files, memory-mapped), so corpora larger than memory work.
   Any file whose suffix is not a structured format (.jsonl/.json/.parquet/.csv/.tsv) is plain text, so
   BabyLM's `train_100M/*.train` (and `*.dev`) read as they are distributed. Plain text is streamed in
   chunks into one Arrow file of documents per input file (`text-<key>.arrow`, the key hashing the file's
   path, size, mtime and the reading options), so an unchanged file is read once; structured files use the
   `datasets` packaged builders.
2. No document is unbounded. Real corpora come in two layouts, decided per file from its empty lines
   (`inspect_text_file`, the same pass that checks UTF-8): documents separated by blank lines (the demo
   corpus, Wikipedia dumps), or one utterance/sentence per line with almost no blank lines (BabyLM). In the
   first a document is a run of non-blank lines; in the second a document is a run of consecutive lines of at
   most `line_chunk_chars` characters (utterances keep their context, and the validation split holds out many
   such chunks, never a whole source file). Either way a document longer than `max_document_chars` is cut,
   at a line end or else at whitespace, so a 100 MB file without blank lines or newlines never becomes one
   Arrow string (2 GB limit) nor one tokenisation call. Cuts fall on whitespace only, so the whitespace word
   count of the documents equals that of the raw text. CRLF and CR line ends read as LF.
3. Tokenise + pack is one batched `datasets.map` with `num_proc` workers. Documents are tokenised in
   sub-batches of ~1M characters, so a worker's memory is bounded by that and the map batch (`batch_size`
   documents of at most `max_document_chars` each), not by the file.
4. Packing follows LTG-BERT: documents are concatenated (with [SEP] between them by default) and cut into
   blocks `[CLS] ... [SEP]`, so no padding is wasted and no token is lost or duplicated. A share
   `short_seq_prob` of blocks gets a random shorter length (as in BERT's create_pretraining_data) so the
   model also sees short inputs; the lengths are drawn from a generator seeded by (seed, first row of the
   map batch), so the result is reproducible.
5. Words: every block stores in column "words" the number of whitespace-separated words of the raw text
   whose first token it holds (BabyLM counts words that way, and its checkpoints are due at word counts).
   The sum over all blocks is exactly `len(text.split())` of the text that went in: a word whose tokens
   straddle two blocks counts in the first; a word that yields no token at all (only characters the
   normaliser deletes) counts where the next token of its document is, else with the document's last token.
6. Cache: the output Arrow files are named from a key that hashes the inputs (file paths + sizes + mtimes
   and the reading options, never the place of a cache file), the whole tokenizer (vocab, normaliser, ...)
   and the packing options. A second run with the same inputs finds the files and does not tokenise again,
   and so does every other process of a distributed job whose `cache_dir` is the same directory.
7. Distributed runs, many nodes: tokenise once for the whole job. Every rank calls `load_text_dataset` and
   `build_pretraining_dataset` inside `with accelerator.main_process_first():` (the global main process, not
   `local_main_process_first`, which tokenises once per node), with `cache_dir` on storage all nodes see and
   the input files at the same path on every node. The other ranks wait in a barrier meanwhile, so the
   process-group timeout must be longer than the whole tokenisation (torch's default 30 min is too short
   for real corpora); then they load the main process's files (the same names on every node).
8. Bad input raises `ltgbert.errors.UserError` with one line naming the problem and the fix.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain, repeat
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ltgbert.errors import UserError

logger = logging.getLogger(__name__)

# bump when the packing output changes, so stale cache files are not reused (2: the "words" column)
PACKING_VERSION = 2
# bump when the documents read from a plain-text file change
READER_VERSION = 1

STRUCTURED_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".tsv": "csv"}
DOC_MODES = ("auto", "blank_line", "line")
# auto: blank-line documents when the file has empty lines and its documents average at most this many lines
AUTO_MAX_MEAN_DOCUMENT_LINES = 100
MAX_DOCUMENT_CHARS = 100_000
LINE_CHUNK_CHARS = 10_000
_GLOB_CHARS = re.compile(r"[*?\[]")


class _PlainTextSuffixes:
    """`suffix in PLAIN_TEXT_SUFFIXES`: true for every suffix that is not a structured format (.train, .dev,
    .txt, none, ...); kept as a container so that `suffix in ...` checks elsewhere keep working."""

    def __contains__(self, suffix: object) -> bool:
        return isinstance(suffix, str) and suffix.lower() not in STRUCTURED_FORMATS

    def __repr__(self) -> str:
        return f"<any suffix but {', '.join(sorted(STRUCTURED_FORMATS))}>"


PLAIN_TEXT_SUFFIXES = _PlainTextSuffixes()


def is_plain_text(path: str | Path) -> bool:
    """Whether `path` is read as plain text: any suffix but .jsonl/.json/.parquet/.csv/.tsv."""
    return Path(path).suffix in PLAIN_TEXT_SUFFIXES


# -----------------------------------------------------------------------------
# input files: expansion, existence, utf-8, layout, fingerprint


def expand_input_files(values: str | Path | Iterable[str | Path], option: str = "--train_file") -> list[Path]:
    """The files named by `values`, in order, without duplicates.

    Each value is a file, a directory (its regular, non-hidden files, sorted by name) or a glob pattern
    (its matching files, sorted; `**` recurses). Patterns are expanded here because a shell passes a quoted
    `"train_10M/*.train"` unexpanded. A missing file without pattern characters is returned as it is, and the
    readers report it with its path.
    """
    if isinstance(values, (str, Path)):
        values = [values]
    out: list[Path] = []
    seen: set[str] = set()
    for value in values:
        for path in _expand_one(str(value), option):
            key = os.path.abspath(path)
            if key not in seen:
                seen.add(key)
                out.append(path)
    if not out:
        raise UserError(f"no input files given; pass {option} PATH [PATH ...] (files, directories or glob patterns)")
    return out


def _expand_one(value: str, option: str) -> list[Path]:
    path = Path(value)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise UserError(f"{option} {value}: the directory holds no files; pass a directory of corpus files")
        return files
    if path.exists() or not _GLOB_CHARS.search(value):
        return [path]
    files = [Path(m) for m in sorted(glob.glob(value, recursive=True)) if os.path.isfile(m)]
    if not files:
        raise UserError(
            f"{option} pattern {value!r} matches no files; check the directory and the suffix "
            f"(e.g. 'train_10M/*.train')"
        )
    return files


@dataclass(frozen=True)
class FileLayout:
    """How `load_text_dataset` reads one plain-text file into documents; `describe()` is its log line."""

    path: str
    size_bytes: int
    lines: int  # lines holding anything besides the line end
    empty_lines: int  # lines holding nothing but the line end (LF or CRLF)
    layout: str  # "blank_line": blank-line documents; "lines": chunks of consecutive lines; "line": one per line
    document_chars: int  # a document is cut (at a line end, else at whitespace) before it gets longer
    chosen_by: str  # "auto" (detected from the empty lines) or the doc_mode asked for

    @property
    def has_text(self) -> bool:
        return self.lines > 0

    def describe(self) -> str:
        how = {
            "blank_line": f"documents separated by blank lines (mean {self.lines / (self.empty_lines + 1):,.1f} "
            f"lines), cut at {self.document_chars:,} chars",
            "lines": f"one utterance per line: documents are runs of consecutive lines up to "
            f"{self.document_chars:,} chars",
            "line": "one document per line",
        }[self.layout]
        chosen = "detected" if self.chosen_by == "auto" else f"doc_mode {self.chosen_by}"
        return (
            f"{self.path}: {self.size_bytes / 1e6:,.1f} MB, {self.lines:,} lines, {self.empty_lines:,} empty "
            f"-> {how} ({chosen})"
        )


def _scan_text_file(path: Path, chunk_size: int) -> tuple[int, int, int, bool]:
    """(size, lines with content, empty lines, any non-whitespace) of a UTF-8 file, streamed in chunks.

    A multi-byte character cut by a chunk boundary is carried over to the next chunk. Decoding runs at GB/s
    and the line counts are numpy comparisons on the bytes, so this costs little next to tokenisation, and it
    turns a deep pyarrow/tokenizers traceback into an error that names the byte.
    """
    has_text, offset, carry = False, 0, b""
    newlines = empty = 0
    tail = b"\n"  # the last bytes seen: a file that starts with a line end starts with an empty line
    last = b""
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
                    carry = data[e.start :]
                    data = data[: e.start]
                else:
                    raise UserError(
                        f"{path}: invalid UTF-8 at byte offset {offset + e.start}; re-encode the file as UTF-8 "
                        f"(e.g. iconv -f latin1 -t utf-8) or remove the bad bytes"
                    ) from None
            has_text = has_text or bool(data.strip())
            n_lines, n_empty = _count_line_ends(tail + data)
            tail_lines, tail_empty = _count_line_ends(tail)
            newlines, empty = newlines + n_lines - tail_lines, empty + n_empty - tail_empty
            tail = (tail + data)[-2:]
            offset += len(data)
            last = data[-1:] or last
    total_lines = newlines + (1 if offset and last != b"\n" else 0)
    return offset, total_lines - empty, empty, has_text


def _count_line_ends(data: bytes) -> tuple[int, int]:
    """(LF count, empty lines: LF LF or LF CR LF) in `data`."""
    arr = np.frombuffer(data, dtype=np.uint8)
    lf = arr == 10
    empty = int(np.count_nonzero(lf[1:] & lf[:-1]))
    if arr.size > 2:
        empty += int(np.count_nonzero(lf[2:] & (arr[1:-1] == 13) & lf[:-2]))
    return int(np.count_nonzero(lf)), empty


def check_text_file(path: str | Path, chunk_size: int = 1 << 22) -> bool:
    """Check that `path` exists and is valid UTF-8; return whether it holds any non-whitespace text."""
    return _scan_text_file(_existing_file(path), chunk_size)[3]


def _existing_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise UserError(f"file not found: {path}; check the path passed as --train_file/--validation_file")
    if not path.is_file():
        raise UserError(f"not a file: {path}; pass text files, directories of them or glob patterns")
    return path


def inspect_text_file(
    path: str | Path,
    doc_mode: str = "auto",
    max_document_chars: int = MAX_DOCUMENT_CHARS,
    line_chunk_chars: int = LINE_CHUNK_CHARS,
    chunk_size: int = 1 << 22,
) -> FileLayout:
    """Check a plain-text file (exists, UTF-8) and decide how it is read into documents.

    doc_mode "auto" reads blank-line documents when the file has empty lines and its documents would average
    at most AUTO_MAX_MEAN_DOCUMENT_LINES lines, else chunks of consecutive lines of at most `line_chunk_chars`
    (one utterance per line, as BabyLM's files); "blank_line" and "line" force a layout. Every document is cut
    before it exceeds `max_document_chars`.
    """
    if doc_mode not in DOC_MODES:
        raise UserError(f"unknown doc_mode {doc_mode!r}; use one of {', '.join(DOC_MODES)}")
    if max_document_chars < 1 or line_chunk_chars < 1:
        raise UserError(
            f"max_document_chars and line_chunk_chars must be positive, got {max_document_chars}, {line_chunk_chars}"
        )
    path = _existing_file(path)
    size, lines, empty, has_text = _scan_text_file(path, chunk_size)
    if not has_text:
        lines = 0  # whitespace only: nothing to read
    layout = doc_mode
    if doc_mode == "auto":
        blank_separated = empty > 0 and lines / (empty + 1) <= AUTO_MAX_MEAN_DOCUMENT_LINES
        layout = "blank_line" if blank_separated else "lines"
    cap = min(line_chunk_chars, max_document_chars) if layout == "lines" else max_document_chars
    return FileLayout(str(path), size, lines, empty, layout, cap, doc_mode)


def files_fingerprint(files: Sequence[str | Path]) -> str:
    """Hash of absolute paths, sizes and modification times: changes whenever an input file changes."""
    h = hashlib.sha256()
    for f in files:
        st = os.stat(f)
        h.update(f"{os.path.abspath(f)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


# -----------------------------------------------------------------------------
# loading: one document per row

# the text up to its last whitespace, and the next whitespace: where a long line may be cut
_UPTO_LAST_SPACE = re.compile(r".*\s", re.S)
_SPACE = re.compile(r"\s")


def _cut_long(text: str, max_chars: int, final: bool) -> tuple[list[str], str]:
    """Cut pieces of at most `max_chars` off the front of `text` at whitespace (a longer word stays whole)
    until the rest is at most `max_chars` long (final) or `2 * max_chars` (more of the line follows)."""
    limit = max_chars if final else 2 * max_chars
    pieces, start = [], 0
    while len(text) - start > limit:
        m = _UPTO_LAST_SPACE.match(text, start, start + max_chars + 1) or _SPACE.search(text, start + max_chars)
        if m is None:
            break
        piece = text[start : m.end()].strip()
        if piece:
            pieces.append(piece)
        start = m.end()
    return pieces, text[start:]


def _stripped_lines(path: str, max_chars: int, read_chars: int = 1 << 20) -> Iterator[list[str]]:
    """The lines of a file, stripped ("" for a blank line), in lists per `read_chars` read; a line longer than
    `max_chars` comes as several pieces cut at whitespace, so no line is ever held whole in memory.
    Universal newlines: CRLF and CR read as LF."""
    with open(path, encoding="utf-8") as f:
        carry = ""
        while chunk := f.read(read_chars):
            lines = (carry + chunk).split("\n")
            carry = lines.pop()
            if max(map(len, lines), default=0) > max_chars:
                lines = list(chain.from_iterable(_cut_line(line, max_chars) for line in lines))
            yield [line.strip() for line in lines]
            if len(carry) > 2 * max_chars:
                pieces, carry = _cut_long(carry, max_chars, final=False)
                yield pieces
        if carry:
            yield [line.strip() for line in _cut_line(carry, max_chars)]


def _cut_line(line: str, max_chars: int) -> list[str]:
    if len(line) <= max_chars:
        return [line]
    pieces, rest = _cut_long(line, max_chars, final=True)
    return pieces + [rest]


def _file_documents(path: str, layout: str, document_chars: int, max_chars: int) -> Iterator[str]:
    """Documents of one file: runs of non-blank lines (joined by newlines) cut before `document_chars`, or
    every line ("line" layout). A document never spans two files."""
    parts: list[str] = []
    size = 0
    for lines in _stripped_lines(path, max_chars):
        if layout == "line":
            yield from filter(None, lines)
            continue
        for line in lines:
            if not line:
                if parts:
                    yield "\n".join(parts)
                    parts, size = [], 0
                continue
            if parts and size + len(line) > document_chars:
                yield "\n".join(parts)
                parts, size = [], 0
            parts.append(line)
            size += len(line) + 1
    if parts:
        yield "\n".join(parts)


_TEXT_SCHEMA = pa.schema([("text", pa.string())])


def _write_documents(source: tuple[str, str, int, int], target: str) -> None:
    """Read one file's documents into an Arrow stream file (column "text"), in record batches of bounded size;
    written under a temporary name and renamed, so a reader never sees a half-written file."""
    path, layout, document_chars, max_chars = source
    tmp = f"{target}.tmp{os.getpid()}"
    batch: list[str] = []
    size = 0
    try:
        with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_stream(sink, _TEXT_SCHEMA) as writer:
            for doc in chain(_file_documents(path, layout, document_chars, max_chars), [None]):
                if doc is not None:
                    batch.append(doc)
                    size += len(doc)
                if batch and (doc is None or len(batch) >= 10_000 or size >= 1 << 26):
                    writer.write_batch(pa.record_batch([pa.array(batch, pa.string())], schema=_TEXT_SCHEMA))
                    batch, size = [], 0
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load_plain_text(layouts: list[FileLayout], max_document_chars: int, cache_dir: Path) -> datasets.Dataset:
    """One Arrow file of documents per input file, named from the file (path, size, mtime) and the reading
    options, so an unchanged file is never read again and every node finds the same names. Reading runs in
    this process (tens of MB/s: a 100M-word corpus takes seconds, once), so no worker process is forked."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    sources, targets = [], []
    for lay in layouts:
        if not lay.has_text:
            continue
        path = str(Path(lay.path).resolve())
        source = (path, lay.layout, lay.document_chars, max_document_chars)
        sources.append(source)
        targets.append(str(cache_dir / f"text-{_hash(READER_VERSION, files_fingerprint([path]), *source[1:])}.arrow"))
    for source, target in zip(sources, targets):
        if not os.path.exists(target):
            _write_documents(source, target)
    parts = [datasets.Dataset.from_file(t) for t in targets]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def load_text_dataset(
    files: str | Path | Sequence[str | Path] | None = None,
    *,
    dataset_name: str | None = None,
    dataset_config: str | None = None,
    text_column: str = "text",
    split: str = "train",
    doc_mode: str = "auto",
    max_document_chars: int = MAX_DOCUMENT_CHARS,
    line_chunk_chars: int = LINE_CHUNK_CHARS,
    cache_dir: str | Path | None = None,
    num_proc: int | None = None,
    return_layouts: bool = False,
) -> datasets.Dataset | tuple[datasets.Dataset, list[FileLayout]]:
    """Load a corpus as a `datasets.Dataset` with one column "text" holding one document per row.

    Either `files` (each a file, a directory or a glob pattern, see `expand_input_files`: plain text of any
    suffix, or all of one structured format .jsonl/.json/.parquet/.csv/.tsv, where each row of `text_column`
    is a document) or `dataset_name` (+ `dataset_config`, `split`) for `datasets.load_dataset` from the Hub
    or a local loading script/directory. Plain text is read per file as `inspect_text_file` decides from
    `doc_mode` ("auto", "blank_line" or "line"), `max_document_chars` and `line_chunk_chars`; each file's
    choice is logged, and returned as well with `return_layouts=True`: `(dataset, [FileLayout, ...])`
    (an empty list for structured files and datasets).

    Plain text is cached as `cache_dir/text-<key>.arrow` per input file (default cache_dir: the datasets cache
    + "/ltgbert-text"); `num_proc` applies to structured files and datasets. The dataset's fingerprint hashes
    the input files (paths, sizes, mtimes) and the reading options, so `build_pretraining_dataset` finds the
    same cache files from every process and node.
    """
    if doc_mode not in DOC_MODES:
        raise UserError(f"unknown doc_mode {doc_mode!r}; use one of {', '.join(DOC_MODES)}")
    cache_dir = str(cache_dir) if cache_dir is not None else None
    if files is None and dataset_name is None:
        raise UserError("no corpus given; pass --train_file PATH or --dataset_name NAME")
    if files is not None and dataset_name is not None:
        raise UserError("both files and a dataset name given; pass only one of --train_file / --dataset_name")
    if dataset_name is not None:
        ds = _load_named_dataset(dataset_name, dataset_config, text_column, split, cache_dir, num_proc)
        return (ds, []) if return_layouts else ds
    paths = expand_input_files(files)
    if not all(is_plain_text(p) for p in paths):
        ds = _load_structured(paths, text_column, cache_dir, num_proc)
        return (ds, []) if return_layouts else ds

    layouts = [inspect_text_file(p, doc_mode, max_document_chars, line_chunk_chars) for p in paths]
    if not any(layout.has_text for layout in layouts):
        raise UserError(f"empty corpus: {', '.join(map(str, paths))} hold no text; pass non-empty text files")
    for layout in layouts:
        logger.info("corpus file %s", layout.describe())
    root = Path(cache_dir) if cache_dir is not None else Path(datasets.config.HF_DATASETS_CACHE) / "ltgbert-text"
    ds = _load_plain_text(layouts, max_document_chars, root)
    if len(ds) == 0:
        raise UserError(f"empty corpus: no documents in {', '.join(map(str, paths))}")
    readable = [str(Path(lay.path).resolve()) for lay in layouts if lay.has_text]
    fingerprint = _hash(
        "text",
        READER_VERSION,
        files_fingerprint(readable),
        [(lay.layout, lay.document_chars) for lay in layouts if lay.has_text],
        max_document_chars,
    )
    ds = ds.select_columns(["text"], new_fingerprint=fingerprint)
    return (ds, layouts) if return_layouts else ds


def _load_named_dataset(name, config, text_column, split, cache_dir, num_proc) -> datasets.Dataset:
    source = name + (f" ({config})" if config else "")
    try:
        ds = datasets.load_dataset(name, config, split=split, cache_dir=cache_dir, num_proc=num_proc)
    except (FileNotFoundError, ValueError, ConnectionError, datasets.exceptions.DatasetsError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"could not load dataset {source!r} split {split!r}: {first}; check the name, config and split "
            f"(offline, the dataset must already be in the datasets cache)"
        ) from None
    return _select_text_column(ds, text_column, source)


def _load_structured(paths: list[Path], text_column, cache_dir, num_proc) -> datasets.Dataset:
    suffixes = {p.suffix.lower() for p in paths}
    formats = {STRUCTURED_FORMATS.get(s) for s in suffixes}
    if None in formats or len(formats) > 1 or len(suffixes - {".jsonl", ".json"}) > 1:
        raise UserError(
            f"cannot mix file types {sorted(suffixes)}; pass plain text (any other suffix: .txt, .train, ...) or "
            f"files of one format among {', '.join(sorted(STRUCTURED_FORMATS))}"
        )
    fmt = formats.pop()
    for p in paths:
        _existing_file(p)
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
    fingerprint = _hash("structured", files_fingerprint([p.resolve() for p in paths]), fmt, text_column)
    return ds.select_columns(["text"], new_fingerprint=fingerprint)


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

    Splitting documents, not blocks, keeps validation text out of training blocks; since `load_text_dataset`
    bounds every document (a file without blank lines is many documents), this never holds out a whole
    source file. The choice depends only on (number of documents, fraction, seed); both parts keep the
    corpus order.
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
    train_fp, val_fp = (_hash(base, part, validation_fraction, seed) for part in ("train", "val"))
    train = text_dataset.select(np.flatnonzero(~is_val), new_fingerprint=train_fp)
    val = text_dataset.select(np.flatnonzero(is_val), new_fingerprint=val_fp)
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
_SPLIT_MISMATCH = "\x0b\x0c\x1c\x1d\x1e\x1f\x85"
_WORD = re.compile(r"\S+")  # re's \s is exactly str.isspace, so these are the words of str.split()


def _has_split_mismatch(text: str) -> bool:
    # substring searches (memchr speed) beat one regex scan of a character class by ~10x
    return any(c in text for c in _SPLIT_MISMATCH)


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


@dataclass
class EncodedTexts:
    """Token ids of consecutive texts, concatenated, and where each whitespace-separated word begins.

    `word_starts[w]` is the index in `ids` of word w's first token. A word without any token points at the
    next token of its text, else at the text's last token; words of a text without tokens point at the first
    token after it (`len(ids)` when none follows: the packer clamps).
    """

    ids: np.ndarray  # int32 [tokens]
    lengths: np.ndarray  # int64 [texts]
    word_starts: np.ndarray  # int64 [words], non-decreasing

    @classmethod
    def concatenate(cls, parts: list[EncodedTexts]) -> EncodedTexts:
        if not parts:
            return cls(np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int64))
        offsets = np.cumsum([0] + [p.ids.size for p in parts[:-1]])
        return cls(
            np.concatenate([p.ids for p in parts]),
            np.concatenate([p.lengths for p in parts]),
            np.concatenate([p.word_starts + o for p, o in zip(parts, offsets)]),
        )


def _char_groups(texts: list[str], max_chars: int) -> Iterator[list[str]]:
    """Consecutive texts in groups of about `max_chars` characters (a longer text is a group of its own)."""
    group, size = [], 0
    for t in texts:
        if group and size + len(t) > max_chars:
            yield group
            group, size = [], 0
        group.append(t)
        size += len(t)
    if group:
        yield group


class ChunkCachedEncoder:
    """texts -> token ids (no special tokens) and word starts, with the ids of each whitespace-separated chunk
    cached.

    The Rust tokenizer spends most of its time building Encoding objects (offsets, token strings), about
    0.5M tokens per CPU-second; natural text repeats a few word types (Zipf), so encoding each distinct
    chunk once and concatenating cached ids is ~8x faster and gives identical ids (checked with every
    Unicode code point as a separator); the chunks are the words, so word starts come for free. The cache
    holds at most `max_cache` chunks (~150 MB) per worker. Tokenizers with other pipelines (byte-level BPE,
    Metaspace, ...), where spaces belong to tokens, and texts with characters on which the two splits differ,
    are encoded whole, and words are mapped to tokens through the offsets. The cache maps a chunk to a type
    number whose ids sit in one flat numpy array, so a batch's ids are one dict lookup per word and one
    numpy gather. Texts are encoded in groups of about `max_chars` characters, which bounds the Python
    objects alive at once. One instance per worker process: the cache is not pickled.
    """

    def __init__(self, tokenizer, max_cache: int = 500_000, max_chars: int = 1 << 20):
        self.tokenizer = tokenizer  # a tokenizers.Tokenizer (the backend of a fast tokenizer)
        self.cacheable = _splits_on_whitespace(tokenizer)
        self.max_cache = max_cache
        self.max_chars = max_chars
        self._clear()

    def _clear(self) -> None:
        # chunk -> type number; the ids of type k are _tokens[_type_start[k] : _type_start[k] + _type_len[k]]
        self.cache: dict[str, int] = {}
        self._type_start = np.zeros(1024, dtype=np.int64)
        self._type_len = np.zeros(1024, dtype=np.int64)
        self._tokens = np.zeros(4096, dtype=np.int32)
        self._n_tokens = 0

    def __getstate__(self):
        state = dict(self.__dict__)
        for key in ("cache", "_type_start", "_type_len", "_tokens", "_n_tokens"):
            state.pop(key)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._clear()

    def _add_chunks(self, chunks: list[str]) -> None:
        """Encode new chunks and append their ids to the cache arrays (grown by doubling)."""
        id_lists = [e.ids for e in self.tokenizer.encode_batch_fast(chunks, add_special_tokens=False)]
        lens = np.fromiter(map(len, id_lists), np.int64, len(id_lists))
        first, n_new = len(self.cache), int(lens.sum())
        while first + len(chunks) > self._type_start.size:
            self._type_start = np.resize(self._type_start, 2 * self._type_start.size)
            self._type_len = np.resize(self._type_len, 2 * self._type_len.size)
        while self._n_tokens + n_new > self._tokens.size:
            self._tokens = np.resize(self._tokens, 2 * self._tokens.size)
        self._type_len[first : first + len(chunks)] = lens
        self._type_start[first : first + len(chunks)] = self._n_tokens + np.cumsum(lens) - lens
        self._tokens[self._n_tokens : self._n_tokens + n_new] = np.fromiter(
            chain.from_iterable(id_lists), np.int32, n_new
        )
        self._n_tokens += n_new
        self.cache.update(zip(chunks, range(first, first + len(chunks))))

    def __call__(self, texts: list[str]) -> list[list[int]]:
        """The ids of each text, as `encode_batch_fast(texts, add_special_tokens=False)` gives them."""
        encoded = self.encode(texts)
        return [a.tolist() for a in np.split(encoded.ids, np.cumsum(encoded.lengths)[:-1])] if texts else []

    def encode(self, texts: list[str]) -> EncodedTexts:
        parts = []
        for group in _char_groups(texts, self.max_chars):
            if not self.cacheable:
                parts.append(self._encode_with_offsets(group))
                continue
            if not _has_split_mismatch("".join(group)):  # the common case: one substring search per character
                parts.append(self._encode_cached(group))
                continue
            start = 0
            odd = [_has_split_mismatch(t) for t in group]
            for i in range(1, len(group) + 1):  # runs of texts that take the same path, in order
                if i == len(group) or odd[i] != odd[start]:
                    run = group[start:i]
                    parts.append(self._encode_with_offsets(run) if odd[start] else self._encode_cached(run))
                    start = i
        return EncodedTexts.concatenate(parts)

    def _encode_cached(self, texts: list[str]) -> EncodedTexts:
        chunk_lists = [t.split() for t in texts]
        chunks = list(chain.from_iterable(chunk_lists))
        if len(self.cache) > self.max_cache:  # bound memory on corpora with huge numbers of word types
            self._clear()
        types = np.fromiter(map(self.cache.get, chunks, repeat(-1)), np.int64, len(chunks))
        unknown = np.flatnonzero(types < 0)
        if unknown.size:
            self._add_chunks(list(dict.fromkeys(chunks[i] for i in unknown)))
            types[unknown] = np.fromiter(
                map(self.cache.__getitem__, (chunks[i] for i in unknown)), np.int64, unknown.size
            )
        piece_len = self._type_len[types]
        ends = np.cumsum(piece_len)
        starts = ends - piece_len
        # every token of the batch gathered from the cache in one indexing: chunk start + offset within it
        total = int(ends[-1]) if ends.size else 0
        ids = self._tokens[np.repeat(self._type_start[types] - starts, piece_len) + np.arange(total)]
        words_per_text = np.fromiter(map(len, chunk_lists), np.int64, len(texts))
        # token offset of every text boundary, then each word's start, pulled inside its text when it has no token
        bounds = np.concatenate([[0], ends])[np.concatenate([[0], np.cumsum(words_per_text)])]
        lengths = np.diff(bounds)
        text_of_word = np.repeat(np.arange(len(texts)), words_per_text)
        text_end = bounds[1:][text_of_word]
        starts = np.where(lengths[text_of_word] > 0, np.minimum(starts, text_end - 1), starts)
        return EncodedTexts(ids, lengths, starts)

    def _encode_with_offsets(self, texts: list[str]) -> EncodedTexts:
        ids, lengths, starts, offset = [], [], [], 0
        for text, e in zip(texts, self.tokenizer.encode_batch(texts, add_special_tokens=False)):
            n = len(e.ids)
            word_chars = np.fromiter((m.start() for m in _WORD.finditer(text)), np.int64)
            if n:  # a word's first token is the first whose span ends after the word's first character
                ends = np.fromiter((end for _, end in e.offsets), np.int64, n)
                first = np.minimum(np.searchsorted(ends, word_chars, side="right"), n - 1)
            else:
                first = np.zeros(word_chars.size, np.int64)
            ids.append(np.asarray(e.ids, dtype=np.int32))
            lengths.append(n)
            starts.append(first + offset)
            offset += n
        return EncodedTexts(np.concatenate(ids), np.asarray(lengths, np.int64), np.concatenate(starts))


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
    """datasets.map function: a batch of documents -> a table of packed blocks (input_ids int32 lists, words)."""
    encoded = encoder.encode([t or "" for t in batch["text"]])
    if encoded.ids.size == 0:
        return pa.table({"input_ids": pa.array([], type=pa.list_(pa.int32())), "words": pa.array([], pa.int32())})
    stream, word_starts = encoded.ids, encoded.word_starts
    if sep_between_documents:
        doc_starts = np.cumsum(encoded.lengths) - encoded.lengths
        seps = doc_starts[encoded.lengths > 0][1:]  # before every document with tokens but the first
        stream = np.insert(stream, seps, sep_id)
        # a start equal to a document's first token moves past that document's [SEP] (side="right")
        word_starts = word_starts + np.searchsorted(seps, word_starts, side="right")
    word_starts = np.minimum(word_starts, stream.size - 1)  # words of trailing token-less texts: the last token
    words_before = np.concatenate([[0], np.cumsum(np.bincount(word_starts, minlength=stream.size))])

    # one generator per map batch, seeded by its first row: independent of worker scheduling
    rng = np.random.default_rng([seed, indices[0]])
    content = _block_lengths(rng, stream.size, max_seq_length - 2, short_seq_prob)
    content_bounds = np.concatenate([[0], np.cumsum(content)])
    words = words_before[content_bounds[1:]] - words_before[content_bounds[:-1]]
    offsets = np.zeros(content.size + 1, dtype=np.int32)
    np.cumsum(content + 2, out=offsets[1:])
    values = np.empty(offsets[-1], dtype=np.int32)
    is_content = np.ones(offsets[-1], dtype=bool)
    is_content[offsets[:-1]] = False
    is_content[offsets[1:] - 1] = False
    values[offsets[:-1]] = cls_id
    values[offsets[1:] - 1] = sep_id
    values[is_content] = stream
    return pa.table(
        {
            "input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)),
            "words": pa.array(words.astype(np.int32)),
        }
    )


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
    length <= max_seq_length), "words" (int32: whitespace words of the raw text whose first token is in
    the block; the column sums to the corpus's word count) and "idx" (row index, which seeds the collator's
    masks). Documents are packed within map batches of `batch_size` documents, so the last block of each
    batch may be short.

    Cache: Arrow files named `packed-<key>*.arrow` in `cache_dir` (default: next to the text dataset's
    own cache files, else the datasets cache), where the key hashes the text dataset's fingerprint (file
    paths + sizes + mtimes + reading options for `load_text_dataset` inputs), the tokenizer and every packing
    option; nothing in it depends on the process or node, so every rank of a job finds the same files.
    A second call with equal inputs loads those files and tokenises nothing.

    Distributed: all ranks call this inside `with accelerator.main_process_first():` (the global main process
    tokenises, the others reuse its files); cache_dir must be shared between nodes and the process-group
    timeout long enough for the whole tokenisation (see the module docstring).
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
    key, cache_dir = _packing_key(
        tokenizer, text_dataset, max_seq_length, short_seq_prob, seed, sep_between_documents, batch_size, cache_dir
    )
    cache_dir.mkdir(parents=True, exist_ok=True)
    packed = text_dataset.map(
        _tokenize_and_pack,
        batched=True,
        batch_size=batch_size,
        with_indices=True,
        remove_columns=text_dataset.column_names,
        fn_kwargs=dict(
            encoder=ChunkCachedEncoder(tokenizer.backend_tokenizer),
            cls_id=cls_id,
            sep_id=sep_id,
            max_seq_length=max_seq_length,
            short_seq_prob=short_seq_prob,
            seed=seed,
            sep_between_documents=sep_between_documents,
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
        "packed %d blocks, %d tokens, %d words, fill rate %.3f at max_seq_length %d",
        stats.num_blocks,
        stats.num_tokens,
        stats.num_words,
        stats.fill_rate,
        max_seq_length,
    )
    return packed


def _packing_key(
    tokenizer, text_dataset, max_seq_length, short_seq_prob, seed, sep_between_documents, batch_size, cache_dir
) -> tuple[str, Path]:
    key = _hash(
        PACKING_VERSION,
        getattr(text_dataset, "_fingerprint", None),
        tokenizer_fingerprint(tokenizer),
        max_seq_length,
        short_seq_prob,
        seed,
        sep_between_documents,
        batch_size,
    )
    return key, _default_cache_dir(text_dataset) if cache_dir is None else Path(cache_dir)


def is_packed_cached(
    tokenizer,
    text_dataset: datasets.Dataset,
    max_seq_length: int = 128,
    short_seq_prob: float = 0.1,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    sep_between_documents: bool = True,
    batch_size: int = 1000,
) -> bool:
    """Whether ``build_pretraining_dataset`` with these arguments would read its cache instead of tokenising."""
    key, cache_dir = _packing_key(
        tokenizer, text_dataset, max_seq_length, short_seq_prob, seed, sep_between_documents, batch_size, cache_dir
    )
    return any(Path(cache_dir).glob(f"packed-{key}*.arrow"))


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
    num_words: int = 0  # whitespace words of the raw text (the "words" column's sum)


def packing_stats(dataset: datasets.Dataset, max_seq_length: int) -> PackingStats:
    """Compute PackingStats from the Arrow columns (no Python loop over rows)."""
    columns = ["input_ids"] + (["words"] if "words" in dataset.column_names else [])
    table = dataset.with_format("arrow", columns=columns)[:]
    lengths = pc.list_value_length(table["input_ids"])
    n = len(dataset)
    total = int(pc.sum(lengths).as_py() or 0)
    words = int(pc.sum(table["words"]).as_py() or 0) if "words" in columns else 0
    return PackingStats(
        num_blocks=n,
        num_tokens=total,
        max_seq_length=max_seq_length,
        fill_rate=total / (n * max_seq_length) if n else 0.0,
        mean_length=total / n if n else 0.0,
        num_words=words,
    )
