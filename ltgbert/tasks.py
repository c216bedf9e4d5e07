"""Fine-tuning tasks: where the rows come from, what the labels mean, and how rows become batches.

1. Sources. A task is a GLUE name (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli: columns, label
   names and official metric from the table below; rows from ``datasets.load_dataset("nyu-mll/glue", name)``
   or from local files given with it), a built-in demo task (``demo_grammaticality``, ``demo_topic``,
   ``demo_mentions``, ``demo_regression``: files of ``ltgbert.demo_data``), or local csv/tsv/json/jsonl
   files. Local files are read here rather than by ``datasets`` so a bad file gets a one-line
   ``UserError`` with the file and row, not an Arrow traceback.
2. Labels. ``LabelInfo`` fixes the problem type (binary, multiclass, multilabel, regression: inferred from
   the label values or given) and the label <-> id mapping that ends up in the model config as
   ``id2label``/``label2id``. String labels are sorted; integer labels are ids (0..num_labels-1); lists are
   multi-label; floats are regression. A test split without labels is predict-only.
3. Batches. Rows are tokenised once (fast tokenizer, no padding) and padded per batch by
   ``DynamicPaddingCollator``. ``LengthGroupedBatchSampler`` puts rows of similar length together
   (sorted inside random mega-batches of ``mega_batch_mult * batch_size`` rows, batches shuffled), so
   little compute goes into padding; it is seeded per epoch and accelerate's ``prepare`` deals its
   batches round-robin to the ranks.
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ltgbert.errors import UserError
from ltgbert.metrics import PROBLEM_TYPES

__all__ = [
    "GLUE_TASKS",
    "DEMO_TASKS",
    "Split",
    "TaskData",
    "LabelInfo",
    "EncodedSplit",
    "load_task",
    "read_table",
    "build_label_info",
    "encode_split",
    "DynamicPaddingCollator",
    "LengthGroupedBatchSampler",
    "write_predictions",
]


@dataclass(frozen=True)
class GlueTask:
    text_columns: tuple[str, ...]
    label_names: tuple[str, ...] | None  # None: regression
    metric: str  # the official metric, used to pick the best checkpoint
    validation_split: str = "validation"
    test_split: str = "test"


GLUE_TASKS = {
    "cola": GlueTask(("sentence",), ("unacceptable", "acceptable"), "matthews_correlation"),
    "sst2": GlueTask(("sentence",), ("negative", "positive"), "accuracy"),
    "mrpc": GlueTask(("sentence1", "sentence2"), ("not_equivalent", "equivalent"), "f1"),
    "qqp": GlueTask(("question1", "question2"), ("not_duplicate", "duplicate"), "f1"),
    "stsb": GlueTask(("sentence1", "sentence2"), None, "pearson"),
    "mnli": GlueTask(("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), "accuracy",
                     "validation_matched", "test_matched"),
    "qnli": GlueTask(("question", "sentence"), ("entailment", "not_entailment"), "accuracy"),
    "rte": GlueTask(("sentence1", "sentence2"), ("entailment", "not_entailment"), "accuracy"),
    "wnli": GlueTask(("sentence1", "sentence2"), ("not_entailment", "entailment"), "accuracy"),
}

# demo_<name> -> <demo tasks_dir>/<name>/{train,validation,test}.jsonl with columns "sentence" and "label".
DEMO_TASKS = ("grammaticality", "topic", "mentions", "regression")

# Problem-type spellings accepted from the command line -> canonical name.
_PROBLEM_TYPE_ALIASES = {
    "binary": "binary", "multiclass": "multiclass", "multi_class": "multiclass",
    "single_label_classification": "multiclass", "multilabel": "multilabel", "multi_label": "multilabel",
    "multi_label_classification": "multilabel", "regression": "regression",
}


def normalize_problem_type(name: str | None) -> str | None:
    """'multi-label', 'multi_label_classification', ... -> one of ``PROBLEM_TYPES`` (None stays None)."""
    if name is None:
        return None
    key = name.strip().lower().replace("-", "_")
    if key not in _PROBLEM_TYPE_ALIASES:
        raise UserError(f"unknown problem type {name!r}; use one of {', '.join(PROBLEM_TYPES)}")
    return _PROBLEM_TYPE_ALIASES[key]


# ----------------------------------------------------------------------------------------------------------
# Sources


@dataclass
class Split:
    """Raw rows of one split: one list of strings per text column, and the raw label values (or None)."""

    source: str  # file path or hub name, for error messages
    texts: list[list[str]]
    labels: list[Any] | None

    def __len__(self) -> int:
        return len(self.texts[0])

    def head(self, n: int | None) -> "Split":
        if n is None or n >= len(self):
            return self
        return Split(self.source, [col[:n] for col in self.texts], None if self.labels is None else self.labels[:n])


@dataclass
class TaskData:
    name: str
    splits: dict[str, Split]  # "train", "validation", "test"; absent when not given
    text_columns: tuple[str, ...]
    label_names: tuple[str, ...] | None = None  # fixed by the task (GLUE)
    metric: str | None = None  # official metric of the task, if it has one
    regression: bool = False  # fixed by the task (GLUE stsb)


def _parse_scalar(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def read_table(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a local .csv, .tsv, .json (array of objects, or JSON lines) or .jsonl file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".tsv", ".json", ".jsonl"):
        raise UserError(f"{path}: unsupported file type {suffix or '(none)'}; use .csv, .tsv, .json or .jsonl")
    if not path.is_file():
        raise UserError(f"{path} does not exist; check the file path")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (bad byte at offset {e.start}); re-encode it as UTF-8") from None
    if suffix in (".csv", ".tsv"):
        # TSV as GLUE ships it: tabs only, quotes are part of the text.
        quoting = csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",", quoting=quoting)
        rows = [dict(r) for r in reader]
        # csv gives strings; numbers in a column are numbers (labels "1", "0.5").
        for r in rows:
            for k, v in r.items():
                r[k] = None if v is None or v == "" else _parse_scalar(v)
        return rows
    if suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); fix the file") from None
    else:  # .jsonl, or a .json file of JSON lines (which datasets also accepts)
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {lineno} is not valid JSON ({e.msg}); fix the line") from None
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise UserError(f"{path} row {i + 1} is a {type(r).__name__}, not an object of column -> value")
    return rows


def _rows_to_split(
    rows: list[dict], source: str, text_columns: Sequence[str], label_column: str, split: str, glue: bool
) -> Split:
    if not rows:
        raise UserError(f"the {split} split ({source}) has no rows; give a file with data")
    columns = set().union(*(r.keys() for r in rows[:100]))
    for col in text_columns:
        if col not in columns:
            raise UserError(
                f"text column {col!r} not found in {source} (columns: {', '.join(sorted(columns))}); "
                "set --text_column"
            )
    texts = []
    for col in text_columns:
        values = []
        for i, r in enumerate(rows):
            v = r.get(col)
            if v is None:
                raise UserError(f"{source} row {i + 1} has no text in column {col!r}; fill it in or drop the row")
            values.append(v if isinstance(v, str) else str(v))
        texts.append(values)
    labels = None
    if label_column in columns:
        labels = [r.get(label_column) for r in rows]
        # GLUE marks unlabelled (test) rows with -1; elsewhere -1 is a value like any other.
        missing = [i for i, v in enumerate(labels) if v is None or (glue and v == -1)]
        if missing:
            if split != "test":
                i = missing[0]
                raise UserError(f"{source} row {i + 1} has no label in column {label_column!r}; every {split} row needs one")
            labels = None
    elif split != "test":
        raise UserError(
            f"label column {label_column!r} not found in {source} (columns: {', '.join(sorted(columns))}); "
            "set --label_column"
        )
    return Split(source, texts, labels)


def _guess_text_columns(rows: list[dict], label_column: str) -> tuple[str, ...]:
    columns = set().union(*(r.keys() for r in rows[:100])) if rows else set()
    for guess in (("sentence1", "sentence2"), ("sentence",), ("text",)):
        if set(guess) <= columns:
            return guess
    raise UserError(
        f"cannot tell the text column(s) among {', '.join(sorted(columns - {label_column}))}; "
        "pass --text_column NAME (two names for sentence pairs)"
    )


def _load_hub_glue(name: str, glue: GlueTask, dataset_name: str, cache_dir: str | None) -> dict[str, list[dict]]:
    import datasets  # heavy; only GLUE-from-the-Hub needs it

    try:
        ds = datasets.load_dataset(dataset_name, name, cache_dir=cache_dir)
    except Exception as e:  # network, missing config, corrupt cache: all end the same way for a user
        detail = " ".join(str(e).split())[:200]
        raise UserError(
            f"cannot load GLUE task {name!r} from {dataset_name!r} ({type(e).__name__}: {detail}); "
            "check network access / HF_DATASETS_OFFLINE, or pass --train_file/--validation_file"
        ) from None
    wanted = {"train": "train", "validation": glue.validation_split, "test": glue.test_split}
    return {ours: ds[theirs].to_list() for ours, theirs in wanted.items() if theirs in ds}


def load_task(
    task_name: str | None = None,
    train_file: str | None = None,
    validation_file: str | None = None,
    test_file: str | None = None,
    text_columns: Sequence[str] | None = None,
    label_column: str = "label",
    dataset_name: str = "nyu-mll/glue",
    cache_dir: str | None = None,
    demo_dir: str | None = None,
) -> TaskData:
    """Reads the splits of a GLUE, demo or local-file task (see the module docstring)."""
    files = {"train": train_file, "validation": validation_file, "test": test_file}
    glue, name = None, task_name or "custom"
    if task_name is not None:
        key = task_name.lower()
        if key.startswith("demo_") and key[5:] in DEMO_TASKS:
            from ltgbert.demo_data import DemoPaths, ensure_demo_data

            # An explicit --demo_dir that already holds demo data is used as it is (whatever its size);
            # otherwise the default demo data is generated (once) or checked.
            have = demo_dir is not None and (Path(demo_dir) / "manifest.json").is_file()
            paths = DemoPaths.at(demo_dir) if have else ensure_demo_data(demo_dir)
            task_dir = Path(paths.tasks_dir) / key[5:]
            files = {s: str(task_dir / f"{s}.jsonl") for s in ("train", "validation", "test")}
            text_columns = text_columns or ("sentence",)
        elif key in GLUE_TASKS:
            glue = GLUE_TASKS[key]
            text_columns = text_columns or glue.text_columns
        else:
            known = ", ".join([*GLUE_TASKS, *(f"demo_{t}" for t in DEMO_TASKS), "demo"])
            raise UserError(f"unknown task {task_name!r}; use one of {known}, or --train_file with local files")
        name = key
    if glue is not None and train_file is None:
        raw = _load_hub_glue(name, glue, dataset_name, cache_dir)
        sources = {s: f"{dataset_name}/{name}:{s}" for s in raw}
    else:
        if files["train"] is None:
            raise UserError("no training data: pass --task_name (GLUE or demo task) or --train_file")
        raw = {s: read_table(f) for s, f in files.items() if f is not None}
        sources = {s: str(f) for s, f in files.items() if f is not None}
    if text_columns is None:
        text_columns = _guess_text_columns(raw["train"], label_column)
    text_columns = tuple(text_columns)
    if not 1 <= len(text_columns) <= 2:
        raise UserError(f"--text_column takes one or two column names (sentence pairs), got {len(text_columns)}")
    splits = {
        s: _rows_to_split(rows, sources[s], text_columns, label_column, s, glue is not None) for s, rows in raw.items()
    }
    return TaskData(
        name=name,
        splits=splits,
        text_columns=text_columns,
        label_names=None if glue is None else glue.label_names,
        metric=None if glue is None else glue.metric,
        regression=glue is not None and glue.label_names is None,
    )


# ----------------------------------------------------------------------------------------------------------
# Labels


def _label_kind(values: list[Any], source: str) -> str:
    kinds = set()
    for v in values:
        if isinstance(v, (list, tuple)):
            kinds.add("list")
        elif isinstance(v, bool) or isinstance(v, int):
            kinds.add("int")
        elif isinstance(v, float):
            kinds.add("float")
        elif isinstance(v, str):
            kinds.add("str")
        else:
            raise UserError(f"{source}: label {v!r} is a {type(v).__name__}; use strings, integers, floats or lists")
    if kinds == {"int", "float"}:
        return "float"
    if len(kinds) != 1:
        raise UserError(f"{source} mixes label types ({', '.join(sorted(kinds))}); use one type for every row")
    return kinds.pop()


@dataclass
class LabelInfo:
    """Problem type and the label <-> id mapping; ``names[i]`` is the label of output ``i``."""

    problem_type: str
    names: list[str] = field(default_factory=list)  # empty for regression
    values: list[Any] = field(default_factory=list)  # label values as they appear in the data, by id
    _ids: dict[Any, int] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def num_labels(self) -> int:
        return 1 if self.problem_type == "regression" else len(self.names)

    @property
    def hf_problem_type(self) -> str:
        return {"binary": "single_label_classification", "multiclass": "single_label_classification",
                "multilabel": "multi_label_classification", "regression": "regression"}[self.problem_type]

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names)) if self.names else {0: "LABEL_0"}

    @property
    def label2id(self) -> dict[str, int]:
        return {v: k for k, v in self.id2label.items()}

    def encode(self, value: Any, where: str) -> Any:
        """Raw label -> training target: class id, multi-hot list or float. ``where`` names the row."""
        if self.problem_type == "regression":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UserError(f"{where}: regression label {value!r} is not a number")
            return float(value)
        items = value if self.problem_type == "multilabel" else [value]
        if self.problem_type == "multilabel" and not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: multi-label label {value!r} is not a list")
        ids = []
        for item in items:
            i = self._lookup(item)
            if i is None:
                if isinstance(item, int) and not isinstance(item, str):
                    raise UserError(
                        f"{where}: label {item} is outside 0..{self.num_labels - 1} (num_labels={self.num_labels}); "
                        "fix the label or set --num_labels"
                    )
                raise UserError(f"{where}: label {item!r} is not one of the task's labels ({', '.join(self.names)})")
            ids.append(i)
        if self.problem_type != "multilabel":
            return ids[0]
        hot = [0.0] * self.num_labels
        for i in ids:
            hot[i] = 1.0
        return hot

    def _lookup(self, item: Any) -> int | None:
        if isinstance(item, bool) or (isinstance(item, float) and item.is_integer()):
            item = int(item)
        if not isinstance(item, (int, str)):
            return None
        if self._ids is None:
            self._ids = {v: i for i, v in enumerate(self.values)}
            # Named labels (GLUE) also accept their integer ids, as the Hub copies store them.
            if all(isinstance(v, str) for v in self.values):
                self._ids.update({i: i for i in range(len(self.values))})
        return self._ids.get(item)

    def decode(self, prediction: Any) -> Any:
        """Prediction (class id, 0/1 vector, score) -> label as in the data (name, list of names, float)."""
        if self.problem_type == "regression":
            return float(prediction)
        if self.problem_type == "multilabel":
            return [self.values[i] for i, on in enumerate(prediction) if on]
        return self.values[int(prediction)]


def build_label_info(
    task: TaskData, problem_type: str | None = None, num_labels: int | None = None
) -> LabelInfo:
    """Infers (or checks) the problem type and label mapping from the train and validation labels."""
    train = task.splits["train"]
    labelled = [s for name, s in task.splits.items() if name != "test" and s.labels is not None]
    kind = _label_kind(train.labels, train.source)
    problem_type = normalize_problem_type(problem_type)
    if task.regression:
        if problem_type not in (None, "regression"):
            raise UserError(f"task {task.name} is a regression task; drop --problem_type {problem_type}")
        problem_type = "regression"
    if problem_type is None:
        problem_type = {"list": "multilabel", "float": "regression"}.get(kind, "classification")
    if problem_type == "regression":
        if kind not in ("int", "float"):
            raise UserError(f"{train.source}: regression needs numeric labels, got {kind} labels")
        return LabelInfo("regression")
    if problem_type == "multilabel":
        if kind != "list":
            raise UserError(f"{train.source}: multi-label tasks need a list of labels per row, got {kind} labels")
        every = [item for s in labelled for v in s.labels for item in v]
        kind = _label_kind(every, train.source) if every else "str"
    elif kind == "list":
        raise UserError(f"{train.source} has lists of labels; use --problem_type multilabel (or drop --problem_type)")
    else:
        every = [v for s in labelled for v in s.labels]
    if kind == "float":
        if not all(float(v).is_integer() for v in every):
            raise UserError(f"{train.source}: classification labels must be integers or strings, not fractions")
        kind, every = "int", [int(v) for v in every]
    if task.label_names is not None:
        values: list[Any] = list(task.label_names)
    elif kind == "str":
        values = sorted(set(every))
    else:
        if min(every) < 0:
            raise UserError(f"{train.source}: integer labels must be ids 0..num_labels-1, found {min(every)}")
        values = list(range(num_labels if num_labels is not None else max(every) + 1))
        if max(every) >= len(values):
            raise UserError(
                f"{train.source}: label {max(every)} is outside 0..{len(values) - 1} (num_labels={len(values)}); "
                "fix the labels or set --num_labels"
            )
    if num_labels is not None and num_labels != len(values) and kind == "str":
        raise UserError(
            f"--num_labels {num_labels} but the data has {len(values)} labels ({', '.join(map(str, values[:10]))})"
        )
    if not values:
        raise UserError(f"{train.source}: no row has a label; multi-label rows need at least one label somewhere")
    if problem_type == "classification":
        problem_type = "binary" if len(values) == 2 else "multiclass"
    if problem_type == "binary" and len(values) != 2:
        raise UserError(f"--problem_type binary needs 2 labels, the data has {len(values)}; use multiclass")
    if problem_type != "multilabel" and len(values) < 2:
        raise UserError(f"{train.source}: only one label ({values[0]!r}) in the data; a classifier needs two or more")
    return LabelInfo(problem_type, [str(v) for v in values], values)


# ----------------------------------------------------------------------------------------------------------
# Tokenised splits, padding, length-grouped batches


class EncodedSplit(torch.utils.data.Dataset):
    """Tokenised rows (unpadded) with encoded labels; ``order`` optionally permutes the rows."""

    def __init__(self, input_ids: list[list[int]], labels: list[Any] | None, token_type_ids=None, order=None):
        self.input_ids, self.labels, self.token_type_ids = input_ids, labels, token_type_ids
        self.lengths = np.fromiter((len(x) for x in input_ids), dtype=np.int64, count=len(input_ids))
        self.order = order

    def __len__(self) -> int:
        return len(self.input_ids) if self.order is None else len(self.order)

    def __getitem__(self, i: int) -> dict[str, Any]:
        j = int(i if self.order is None else self.order[i])
        row = {"input_ids": self.input_ids[j], "idx": j}
        if self.token_type_ids is not None:
            row["token_type_ids"] = self.token_type_ids[j]
        if self.labels is not None:
            row["labels"] = self.labels[j]
        return row

    def sorted_by_length(self) -> "EncodedSplit":
        """The same rows, longest first: evaluation batches then hold rows of similar length."""
        return EncodedSplit(self.input_ids, self.labels, self.token_type_ids, np.argsort(-self.lengths, kind="stable"))


def encode_split(
    split: Split, label_info: LabelInfo, tokenizer, max_seq_length: int, token_type_ids: bool = False
) -> EncodedSplit:
    """Tokenises (truncating pairs longest-first) and encodes the labels of one split."""
    labels = None
    if split.labels is not None:
        labels = [label_info.encode(v, f"{split.source} row {i + 1}") for i, v in enumerate(split.labels)]
    input_ids, types = [], []
    chunk = 10_000  # bounded memory on large splits; the fast tokenizer parallelises inside each call
    for start in range(0, len(split), chunk):
        cols = [c[start : start + chunk] for c in split.texts]
        enc = tokenizer(*cols, truncation=True, max_length=max_seq_length, return_token_type_ids=token_type_ids,
                        return_attention_mask=False)
        input_ids.extend(enc["input_ids"])
        if token_type_ids:
            types.extend(enc["token_type_ids"])
    return EncodedSplit(input_ids, labels, types if token_type_ids else None)


class DynamicPaddingCollator:
    """Pads a list of rows to the longest row of the batch (or to ``max_length``, for comparison).

    Returns LongTensors input_ids/attention_mask (+ token_type_ids), labels (long ids, float scores, or a
    float multi-hot matrix) and idx (row numbers, to restore the order of predictions).
    """

    def __init__(self, pad_token_id: int, problem_type: str, pad_to_multiple_of: int | None = None,
                 max_length: int | None = None):
        self.pad_token_id, self.problem_type = pad_token_id, problem_type
        self.pad_to_multiple_of, self.max_length = pad_to_multiple_of, max_length

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = self.max_length or max(len(r["input_ids"]) for r in rows)
        if self.pad_to_multiple_of:
            width = math.ceil(width / self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        types = torch.zeros((len(rows), width), dtype=torch.long) if "token_type_ids" in rows[0] else None
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            input_ids[i, :n] = torch.tensor(r["input_ids"], dtype=torch.long)
            attention_mask[i, :n] = 1
            if types is not None:
                types[i, :n] = torch.tensor(r["token_type_ids"], dtype=torch.long)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "idx": torch.tensor([r["idx"] for r in rows], dtype=torch.long)}
        if types is not None:
            batch["token_type_ids"] = types
        if "labels" in rows[0]:
            dtype = torch.long if self.problem_type in ("binary", "multiclass") else torch.float32
            batch["labels"] = torch.tensor([r["labels"] for r in rows], dtype=dtype)
        return batch


class LengthGroupedBatchSampler(torch.utils.data.Sampler):
    """Seeded batches of row indices, grouped by length; a new order each epoch (``set_epoch``).

    With ``group_by_length``: a random permutation is cut into mega-batches of ``mega_batch_mult *
    batch_size`` rows, each sorted by length and cut into batches; the full batches are shuffled, the one
    holding the longest row goes first (an out-of-memory shows at step 1, not hours in), and the one short
    batch (if any) goes last. Without it: plain shuffled batches. Every batch but the last is full, as
    accelerate's ``BatchSamplerShard`` needs to deal batches round-robin to the ranks.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, group_by_length: bool = True,
                 mega_batch_mult: int = 50, seed: int = 0, drop_last: bool = False):
        self.lengths = np.asarray(lengths)
        self.batch_size, self.group_by_length, self.mega_batch_mult = batch_size, group_by_length, mega_batch_mult
        self.seed, self.drop_last, self.epoch = seed, drop_last, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        perm = rng.permutation(len(self.lengths))
        if self.group_by_length:
            mega = self.batch_size * max(1, self.mega_batch_mult)
            groups = [perm[i : i + mega] for i in range(0, len(perm), mega)]
            # Stable sort by descending length: ties keep the random order.
            perm = np.concatenate([g[np.argsort(-self.lengths[g], kind="stable")] for g in groups])
        batches = [perm[i : i + self.batch_size].tolist() for i in range(0, len(perm), self.batch_size)]
        short = batches.pop() if batches and len(batches[-1]) < self.batch_size else None
        batches = [batches[i] for i in rng.permutation(len(batches))]
        if self.group_by_length and batches:
            longest = int(np.argmax([self.lengths[b].max() for b in batches]))
            batches.insert(0, batches.pop(longest))
        if short is not None and not self.drop_last:
            batches.append(short)
        return batches

    def __iter__(self):
        yield from self.batches()

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)


def write_predictions(path: str | os.PathLike, predictions: list[Any], fmt: str = "jsonl") -> Path:
    """Writes ``{"index", "prediction"}`` lines (jsonl) or GLUE's ``index<TAB>prediction`` (tsv), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        if fmt == "tsv":
            f.write("index\tprediction\n")
            for i, p in enumerate(predictions):
                f.write(f"{i}\t{','.join(map(str, p)) if isinstance(p, list) else p}\n")
        else:
            for i, p in enumerate(predictions):
                f.write(json.dumps({"index": i, "prediction": p}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path
