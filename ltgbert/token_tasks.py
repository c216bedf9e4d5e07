"""Token classification (NER, POS): tagged sentences from files, labels on first subwords, tags back out.

The counterpart of ``ltgbert.tasks`` for one label per word instead of one per row. Kept apart from
``tasks.load_task`` because rows, labels and predictions all have another shape; ``is_token_task`` tells
launch/finetune.py which of the two loaders a command line asks for.

1. Sources (``load_token_task``).
   - JSON lines (or a .json array) of ``{"tokens": [...], "tags": [...]}``, column names configurable
     (``tokens_column`` / ``tags_column``). Tags are strings, or integer ids when ``label_names`` names
     them in id order (as Hugging Face datasets store ``ner_tags``).
   - CoNLL files (.conll, .txt, .iob, .iob2, .bio): whitespace-separated columns, one token per line, the
     token first, the tag in the last column unless ``tag_column`` says otherwise; a blank line ends a
     sentence; ``-DOCSTART-`` lines are skipped; a file with one column is untagged (prediction only).
   - CoNLL-U (.conllu): tab-separated, FORM is the token and UPOS (column 3) the tag unless
     ``tag_column`` says otherwise; comments, multi-word token ranges and empty nodes are skipped.
   - The demo tasks ``demo_pos`` and ``demo_entities`` (``DEMO_TOKEN_TASKS``; files of
     ``ltgbert.demo_data``, which say how the tags are defined).
   Splits follow ``tasks.split_role``: ``train``, ``validation*`` (evaluated; the plain one picks the
   best model), ``test*`` (predicted; tags optional). A token and tag count that differ, an empty file,
   or a validation/test tag that the training data (or ``label_names``) lacks is a one-line ``UserError``.
2. Labels (``build_token_label_info``). The tag set is ``label_names`` if given, else the task's (demo),
   else the training tags ("O" first, then by type and B/I/E/S prefix, or sorted when tags have no
   prefix). ``TokenLabelInfo.scheme`` says how chunks are read for the F1 (``metrics.tag_scheme``).
3. Encoding (``encode_token_split``). A fast tokenizer with ``is_split_into_words=True`` and truncation
   to ``max_seq_length``; the label goes on the FIRST subword of each word, -100 on later subwords and
   special tokens, so the loss and the metrics count each word once. ``EncodedTokenSplit.word_starts``
   keeps, per word, the position of its first subword (-1 when the word was truncated away or has no
   subword at all): predictions are read back one tag per word, and such words get
   ``TokenLabelInfo.fill_tag`` ("O" when the tag set has it, else the most frequent training tag);
   ``EncodedTokenSplit.unaligned_words`` counts them. Metrics (``ltgbert.metrics.token_metrics``) score
   the labelled positions only, as transformers' token-classification examples do.
4. Batches: ``TokenPaddingCollator`` pads input_ids/attention_mask and the labels with -100 and returns
   "idx", the interface of ``tasks.DynamicPaddingCollator``; ``batching.length_grouped_order`` takes
   ``EncodedTokenSplit.lengths``.
5. Predictions (``decode_token_predictions``, ``write_token_predictions``): one tag per word of the input,
   written as JSON lines ``{"index", "tokens", "prediction": [tags]}`` or CoNLL (``token<TAB>tag``).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ltgbert.errors import UserError
from ltgbert.io import write_lines
from ltgbert.metrics import METRIC_NAMES, tag_scheme
from ltgbert.tasks import DynamicPaddingCollator, EncodedSplit, normalize_problem_type, read_table, split_role

__all__ = [
    "CONLL_SUFFIXES",
    "DEMO_TOKEN_TASKS",
    "EncodedTokenSplit",
    "TokenLabelInfo",
    "TokenPaddingCollator",
    "TokenSplit",
    "TokenTaskData",
    "build_token_label_info",
    "decode_token_predictions",
    "encode_token_split",
    "is_token_task",
    "load_token_task",
    "read_token_file",
    "write_token_predictions",
]

# demo_<name> -> <demo tasks_dir>/<name>/{train,validation,test}.jsonl of {"tokens", "tags"}
DEMO_TOKEN_TASKS = ("pos", "entities")
_DEMO_METRIC = {"pos": "accuracy", "entities": "f1"}  # POS is scored by accuracy, NER by entity F1
CONLL_SUFFIXES = (".conll", ".conllu", ".txt", ".iob", ".iob2", ".bio")
_JSON_SUFFIXES = (".json", ".jsonl")


@dataclass
class TokenSplit:
    """Sentences of one split: the tokens of each, and their tags (None: untagged, prediction only)."""

    source: str
    tokens: list[list[str]]
    tags: list[list[str]] | None

    def __len__(self) -> int:
        return len(self.tokens)

    def head(self, n: int | None) -> TokenSplit:
        if n is None or n >= len(self):
            return self
        return TokenSplit(self.source, self.tokens[:n], None if self.tags is None else self.tags[:n])


@dataclass
class TokenTaskData:
    name: str
    splits: dict[str, TokenSplit]  # "train", "validation*", "test*" (tasks.split_role)
    label_names: tuple[str, ...] | None = None  # fixed by the task (demo) or by the user
    metric: str | None = None  # picks the best model; None: metrics.default_metric("token") == "f1"
    metrics: tuple[str, ...] = METRIC_NAMES["token"]
    problem_type: str = "token"


# ----------------------------------------------------------------------------------------------------------
# Sources


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise UserError(f"{path} does not exist; check the file path")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (bad byte at offset {e.start}); re-encode it as UTF-8") from None


def _read_conll(path: Path, tag_column: int | None) -> tuple[list[list[str]], list[list[str]] | None]:
    conllu = path.suffix.lower() == ".conllu"
    tag_col = tag_column if tag_column is not None else (3 if conllu else -1)
    sentences: list[list[tuple[str, str]]] = [[]]
    width = first = None  # column count of the first token line, and that line's number
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            sentences.append([])
            continue
        if conllu and line.startswith("#"):
            continue
        cells = line.rstrip("\n").split("\t") if conllu else line.split()
        if not conllu and cells[0] == "-DOCSTART-":
            sentences.append([])
            continue
        if conllu and not cells[0].isdigit():  # "3-4" multi-word token, "5.1" empty node
            continue
        if width is None:
            width, first = len(cells), lineno
        if len(cells) != width:
            raise UserError(
                f"{path} line {lineno} has {len(cells)} columns, line {first} has {width}; "
                "use one token per line with the same columns throughout"
            )
        if not -width <= tag_col < width:
            raise UserError(f"{path} has {width} columns, so there is no tag column {tag_col}; set the tag column")
        sentences[-1].append((cells[1] if conllu else cells[0], cells[tag_col]))
    sentences = [s for s in sentences if s]
    tokens = [[tok for tok, _ in s] for s in sentences]
    tags = [[tag for _, tag in s] for s in sentences]
    untagged = (width == 1 and not conllu) or (conllu and all(t == "_" for s in tags for t in s))
    return tokens, None if untagged else tags


def _read_token_json(
    path: Path, tokens_column: str, tags_column: str, label_names: Sequence[str] | None
) -> tuple[list[list[str]], list[list[str]] | None]:
    rows = read_table(path)
    tokens, tags = [], []
    have_tags = any(tags_column in r for r in rows)
    for i, r in enumerate(rows, 1):
        toks = r.get(tokens_column)
        if not isinstance(toks, list) or not all(isinstance(t, str) for t in toks):
            raise UserError(f"{path} row {i}: {tokens_column!r} is not a list of strings; set --tokens_column")
        tokens.append(toks)
        if not have_tags:
            continue
        row_tags = r.get(tags_column)
        if not isinstance(row_tags, list):
            raise UserError(f"{path} row {i}: {tags_column!r} is not a list of tags; set --tags_column")
        if len(row_tags) != len(toks):
            raise UserError(f"{path} row {i} has {len(toks)} tokens but {len(row_tags)} tags; give one tag per token")
        tags.append([_tag_name(t, label_names, f"{path} row {i}") for t in row_tags])
    return tokens, tags if have_tags else None


def _tag_name(tag: Any, label_names: Sequence[str] | None, where: str) -> str:
    if isinstance(tag, str):
        return tag
    if isinstance(tag, bool) or not isinstance(tag, int):
        raise UserError(f"{where}: tag {tag!r} is a {type(tag).__name__}; use strings or integer ids")
    if label_names is None:
        raise UserError(f"{where} has integer tags; pass --label_names with the tag names in id order")
    if not 0 <= tag < len(label_names):
        raise UserError(f"{where}: tag id {tag} is outside 0..{len(label_names) - 1} of --label_names")
    return label_names[tag]


def read_token_file(
    path: str | Path,
    tokens_column: str = "tokens",
    tags_column: str = "tags",
    tag_column: int | None = None,
    label_names: Sequence[str] | None = None,
) -> tuple[list[list[str]], list[list[str]] | None]:
    """(tokens per sentence, tags per sentence or None) of a jsonl/json or CoNLL(-U) file (module docstring)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in CONLL_SUFFIXES:
        tokens, tags = _read_conll(path, tag_column)
    elif suffix in _JSON_SUFFIXES:
        tokens, tags = _read_token_json(path, tokens_column, tags_column, label_names)
    else:
        known = ", ".join((*_JSON_SUFFIXES, *CONLL_SUFFIXES))
        raise UserError(f"{path}: unsupported file type {suffix or '(none)'} for token classification; use {known}")
    if not tokens:
        raise UserError(f"{path} holds no sentences; give a file with data")
    empty = next((i for i, t in enumerate(tokens, 1) if not t), None)
    if empty is not None:
        raise UserError(f"{path} sentence {empty} has no tokens; drop it")
    return tokens, tags


def is_token_task(
    task_name: str | None = None,
    train_file: str | None = None,
    problem_type: str | None = None,
    tokens_column: str = "tokens",
    tags_column: str = "tags",
) -> bool:
    """Whether a command line asks for token classification: ``--problem_type token`` (or ner, pos), a
    demo token task, a CoNLL training file, or a JSON training file whose first row has a list of tokens
    and of tags."""
    if normalize_problem_type(problem_type) == "token":
        return True
    if task_name is not None:
        key = task_name.lower()
        return key.startswith("demo_") and key[5:] in DEMO_TOKEN_TASKS
    if train_file is None:
        return False
    path = Path(train_file)
    if path.suffix.lower() in CONLL_SUFFIXES:
        return True
    if path.suffix.lower() not in _JSON_SUFFIXES or not path.is_file():
        return False
    try:
        with open(path, encoding="utf-8") as f:
            head = f.read(1 << 16).lstrip()
        first = json.loads(head) if head.startswith("[") else json.loads(head.splitlines()[0])
    except (ValueError, IndexError, OSError):
        return False  # read_table reports a broken file with its one-line error
    row = first[0] if isinstance(first, list) and first else first
    return isinstance(row, dict) and isinstance(row.get(tokens_column), list) and isinstance(row.get(tags_column), list)


def load_token_task(
    task_name: str | None = None,
    train_file: str | None = None,
    validation_file: str | None = None,
    test_file: str | None = None,
    tokens_column: str = "tokens",
    tags_column: str = "tags",
    tag_column: int | None = None,
    label_names: Sequence[str] | None = None,
    demo_dir: str | None = None,
    extra_files: Mapping[str, str] | None = None,
) -> TokenTaskData:
    """Reads the splits of a token-classification task: ``demo_pos``/``demo_entities`` or local files."""
    files = {"train": train_file, "validation": validation_file, "test": test_file}
    for split, path in (extra_files or {}).items():
        if split in files or not split.startswith(("validation", "test")):
            raise UserError(f"extra split {split!r} must be named validation_<name> or test_<name>")
        files[split] = path
    name, metric, fixed = "custom", None, None
    if task_name is not None:
        key = task_name.lower()
        if not (key.startswith("demo_") and key[5:] in DEMO_TOKEN_TASKS):
            known = ", ".join(f"demo_{t}" for t in DEMO_TOKEN_TASKS)
            raise UserError(f"unknown token-classification task {task_name!r}; use {known}, or --train_file")
        from ltgbert.demo_data import TOKEN_TASKS, DemoPaths, ensure_demo_data

        have = demo_dir is not None and (Path(demo_dir) / "manifest.json").is_file()
        paths = DemoPaths.at(demo_dir) if have else ensure_demo_data(demo_dir)
        files = {s: str(paths.task_file(key[5:], s)) for s in ("train", "validation", "test")}
        name, metric, fixed = key, _DEMO_METRIC[key[5:]], TOKEN_TASKS[key[5:]][0]
    if files["train"] is None:
        raise UserError("no training data: pass --task_name demo_pos / demo_entities or --train_file")
    splits = {}
    for split, path in files.items():
        if path is None:
            continue
        tokens, tags = read_token_file(path, tokens_column, tags_column, tag_column, label_names)
        if tags is None and split_role(split) != "test":
            raise UserError(f"the {split} file {path} has no tags; every {split} sentence needs them")
        splits[split] = TokenSplit(str(path), tokens, tags)
    names = tuple(label_names) if label_names is not None else fixed
    return TokenTaskData(name=name, splits=splits, label_names=names, metric=metric)


# ----------------------------------------------------------------------------------------------------------
# Labels


@dataclass
class TokenLabelInfo:
    """The tag <-> id mapping (``names[i]`` is the tag of output i), the chunk scheme and the fill tag."""

    names: list[str]
    scheme: str  # "bio" (B-/I-/E-/S- prefixed chunks) or "tag" (every non-O token its own chunk)
    fill_tag: str  # the tag of words without a prediction (truncated away, or no subword)
    problem_type: str = "token"
    hf_problem_type: str | None = None  # transformers' token-classification heads take no problem_type

    def __post_init__(self) -> None:
        self._ids = {t: i for i, t in enumerate(self.names)}

    @property
    def num_labels(self) -> int:
        return len(self.names)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))

    @property
    def label2id(self) -> dict[str, int]:
        return dict(self._ids)

    def encode(self, tags: Sequence[str], where: str) -> list[int]:
        """Tags of one sentence -> ids; an unknown tag is a ``UserError`` naming ``where``."""
        try:
            return [self._ids[t] for t in tags]
        except KeyError as e:
            raise UserError(
                f"{where} has tag {e.args[0]!r}, which the training data does not have "
                f"({_preview(self.names)}); fix the tag or pass --label_names with every tag"
            ) from None

    def decode(self, ids: Sequence[int]) -> list[str]:
        return [self.names[int(i)] for i in ids]


def _preview(names: Sequence[str], n: int = 12) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names)} tags)" if len(names) > n else "")


_PREFIX_ORDER = {"B": 0, "I": 1, "E": 2, "S": 3}


def _tag_order(tag: str) -> tuple:
    if tag == "O":
        return (0, "", 0)
    if re.match(r"^[BIES]-.", tag):
        return (1, tag[2:], _PREFIX_ORDER[tag[0]])
    return (1, tag, -1)


def build_token_label_info(task: TokenTaskData, label_names: Sequence[str] | None = None) -> TokenLabelInfo:
    """The tag set (``label_names``, the task's, or the training tags) checked against every tagged split."""
    train = task.splits["train"]
    counts = Counter(t for seq in train.tags for t in seq)
    fixed = label_names if label_names is not None else task.label_names
    names = list(fixed) if fixed is not None else sorted(counts, key=_tag_order)
    if len(set(names)) != len(names):
        raise UserError(f"--label_names repeats a tag ({_preview(names)}); give each tag once")
    if len(names) < 2:
        raise UserError(f"{train.source}: only one tag ({names[0] if names else 'none'}); a tagger needs two or more")
    fill = "O" if "O" in names else max(names, key=lambda t: (counts[t], -names.index(t)))
    info = TokenLabelInfo(names, tag_scheme(names), fill)
    for split in task.splits.values():
        for i, seq in enumerate(split.tags or ()):
            info.encode(seq, f"{split.source} sentence {i + 1}")  # raises on a tag outside the set
    return info


# ----------------------------------------------------------------------------------------------------------
# Encoding, batches


class EncodedTokenSplit(EncodedSplit):
    """Tokenised sentences with first-subword labels and, per word, where its first subword is."""

    def __init__(self, input_ids: list[list[int]], labels: list[list[int]] | None, word_starts: list[list[int]]):
        super().__init__(input_ids, labels)
        self.word_starts = word_starts

    @property
    def unaligned_words(self) -> int:
        """Words without a labelled position (truncated away, or no subword): they get the fill tag."""
        return sum(sum(p < 0 for p in starts) for starts in self.word_starts)


def encode_token_split(
    split: TokenSplit, label_info: TokenLabelInfo, tokenizer, max_seq_length: int
) -> EncodedTokenSplit:
    """Tokenises pre-split words (truncating to ``max_seq_length``) and puts each word's tag on its first subword."""
    if not getattr(tokenizer, "is_fast", False):
        raise UserError("token classification needs a fast tokenizer (tokenizer.json) to map subwords to words")
    tags = None
    if split.tags is not None:
        tags = [label_info.encode(t, f"{split.source} sentence {i + 1}") for i, t in enumerate(split.tags)]
    input_ids, labels, word_starts = [], [], []
    chunk = 10_000  # bounded memory on large splits; the fast tokenizer parallelises inside each call
    for start in range(0, len(split), chunk):
        enc = tokenizer(
            split.tokens[start : start + chunk],
            is_split_into_words=True,
            truncation=True,
            max_length=max_seq_length,
            return_attention_mask=False,
        )
        for i, ids in enumerate(enc["input_ids"]):
            row = start + i
            starts = [-1] * len(split.tokens[row])
            row_labels = [-100] * len(ids)
            for pos, word in enumerate(enc.word_ids(i)):
                if word is not None and starts[word] < 0:
                    starts[word] = pos
                    if tags is not None:
                        row_labels[pos] = tags[row][word]
            input_ids.append(ids)
            labels.append(row_labels)
            word_starts.append(starts)
    return EncodedTokenSplit(input_ids, labels if tags is not None else None, word_starts)


class TokenPaddingCollator(DynamicPaddingCollator):
    """``DynamicPaddingCollator`` for token labels: rows {"input_ids", "idx", "labels"} -> padded LongTensors
    input_ids, attention_mask, labels (-100 in the padding) and idx."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None, max_length: int | None = None):
        super().__init__(pad_token_id, "token", pad_to_multiple_of, max_length)


# ----------------------------------------------------------------------------------------------------------
# Predictions


def decode_token_predictions(
    predictions: Sequence[Any], encoded: EncodedTokenSplit, label_info: TokenLabelInfo
) -> list[list[str]]:
    """One tag per word of every row: ``predictions[j]`` is row j's [T, num_labels] logits or [T] ids
    (T >= its length; padding is ignored); words without a position get ``label_info.fill_tag``."""
    if len(predictions) != len(encoded.word_starts):
        raise ValueError(f"{len(predictions)} predicted rows for {len(encoded.word_starts)} encoded rows")
    out = []
    for pred, starts in zip(predictions, encoded.word_starts):
        pred = np.asarray(pred)
        ids = pred.argmax(axis=-1) if pred.ndim == 2 else pred
        out.append([label_info.names[int(ids[p])] if p >= 0 else label_info.fill_tag for p in starts])
    return out


def write_token_predictions(
    path: str | Path, tokens: Sequence[Sequence[str]], predictions: Sequence[Sequence[str]], fmt: str = "jsonl"
) -> Path:
    """Writes ``{"index", "tokens", "prediction"}`` lines (jsonl) or ``token<TAB>tag`` lines with a blank line
    after each sentence (``fmt="conll"``), atomically."""
    if len(tokens) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions for {len(tokens)} sentences")
    if fmt == "conll":
        lines = ("".join(f"{t}\t{p}\n" for t, p in zip(toks, tags)) for toks, tags in zip(tokens, predictions))
        return write_lines(path, (s + "\n" for s in lines))
    if fmt != "jsonl":
        raise ValueError(f"unknown predictions format {fmt!r}; use jsonl or conll")
    return write_lines(
        path,
        (
            json.dumps({"index": i, "tokens": list(t), "prediction": list(p)}, ensure_ascii=False) + "\n"
            for i, (t, p) in enumerate(zip(tokens, predictions))
        ),
    )
