"""Fine-tuning tasks: where the rows come from, what the labels mean, and how rows become batches.

1. Sources. A task is a GLUE name (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli: columns, label
   names and official metrics from ``GLUE_TASKS``), a built-in demo task (``demo_grammaticality``,
   ``demo_topic``, ``demo_mentions``, ``demo_regression``: files of ``ltgbert.demo_data``), or local
   csv/tsv/json/jsonl files. Token classification (NER, POS; ``demo_pos``, ``demo_entities``, CoNLL
   files) has its own loader, ``ltgbert.token_tasks.load_token_task``; ``token_tasks.is_token_task`` tells
   which of the two a command line asks for, and ``load_task`` refuses the token tasks by name.
2. GLUE rows come from ``datasets``: ``dataset_name`` is a Hub id (``nyu-mll/glue``, read from the HF
   cache when offline) or a local copy, in either of datasets' own formats: a ``DatasetDict.save_to_disk``
   directory (``DIR`` holding that task, or ``DIR/<task>/``), or a download of the Hub repository
   (``huggingface-cli download nyu-mll/glue --repo-type dataset --local-dir DIR``, whose README lists
   the configurations). ClassLabel names in the copy must be GLUE's, so ids keep their meaning. Local
   files given with a GLUE name replace the Hub copy and keep its columns, label names and metrics.
   Local files are read here rather than by ``datasets`` so a bad file gets a one-line ``UserError``
   with the file and row, not an Arrow traceback.
3. csv/tsv cells are text, exactly as in the file (``007``, ``1_000`` and `` 12 `` stay strings); only
   the label column is converted: a cell that is a JSON number (surrounding spaces ignored; no leading
   zeros, no ``_``) becomes an int or float, anything else stays the string in the file. An empty label
   cell is a missing label; an empty text cell is an empty text.
4. Splits. ``TaskData.splits`` maps split names to rows: ``train``, then any number of evaluation splits
   named ``validation*`` and prediction splits named ``test*`` (``split_role`` gives the role). MNLI has
   ``validation`` (matched), ``validation_mismatched``, ``test`` (matched) and ``test_mismatched``. The
   contract with launch/finetune.py: every ``validation*`` split is evaluated, the plain ``validation``
   one picks the best model (``TaskData.metric``); every ``test*`` split gets predictions (and metrics,
   when it has labels). Test splits may be unlabelled; GLUE marks those rows with -1.
5. Labels. ``LabelInfo`` fixes the problem type (binary, multiclass, multilabel, regression: inferred from
   the label values or given) and the label <-> id mapping that ends up in the model config as
   ``id2label``/``label2id``. String labels are sorted; integer labels are ids (0..num_labels-1); lists are
   multi-label; floats are regression.
6. Batches. Rows are tokenised once (fast tokenizer, no padding) and padded per batch by
   ``DynamicPaddingCollator`` (which also pads token-classification labels with -100).
   ``EncodedSplit.lengths`` feeds ``ltgbert.batching.length_grouped_order``, which puts rows of similar length
   into the same global batch (little compute goes into padding) for any number of processes.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ltgbert.errors import UserError
from ltgbert.io import write_lines
from ltgbert.metrics import PROBLEM_TYPES

__all__ = [
    "DEMO_TASKS",
    "GLUE_TASKS",
    "DynamicPaddingCollator",
    "EncodedSplit",
    "GlueTask",
    "LabelInfo",
    "Split",
    "TaskData",
    "build_label_info",
    "encode_split",
    "load_task",
    "parse_label_cell",
    "read_table",
    "split_role",
    "write_lines",
    "write_predictions",
]


@dataclass(frozen=True)
class GlueTask:
    text_columns: tuple[str, ...]
    label_names: tuple[str, ...] | None  # None: regression
    metric: str  # picks the best checkpoint (the first official metric, or F1 where GLUE reports F1 and acc.)
    metrics: tuple[str, ...]  # GLUE's official metrics of the task, all reported
    # our split name -> the Hub copy's; "validation" selects the best model (see split_role)
    splits: tuple[tuple[str, str], ...] = (("train", "train"), ("validation", "validation"), ("test", "test"))


_MNLI_SPLITS = (
    ("train", "train"),
    ("validation", "validation_matched"),
    ("validation_mismatched", "validation_mismatched"),
    ("test", "test_matched"),
    ("test_mismatched", "test_mismatched"),
)
_ENTAIL = ("entailment", "not_entailment")
GLUE_TASKS = {
    "cola": GlueTask(("sentence",), ("unacceptable", "acceptable"), "matthews_correlation", ("matthews_correlation",)),
    "sst2": GlueTask(("sentence",), ("negative", "positive"), "accuracy", ("accuracy",)),
    "mrpc": GlueTask(("sentence1", "sentence2"), ("not_equivalent", "equivalent"), "f1", ("accuracy", "f1")),
    "qqp": GlueTask(("question1", "question2"), ("not_duplicate", "duplicate"), "f1", ("accuracy", "f1")),
    "stsb": GlueTask(("sentence1", "sentence2"), None, "pearson", ("pearson", "spearmanr")),
    # accuracy on matched (validation) and mismatched (validation_mismatched) genres, reported separately
    "mnli": GlueTask(
        ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), "accuracy", ("accuracy",), _MNLI_SPLITS
    ),
    "qnli": GlueTask(("question", "sentence"), _ENTAIL, "accuracy", ("accuracy",)),
    "rte": GlueTask(("sentence1", "sentence2"), _ENTAIL, "accuracy", ("accuracy",)),
    "wnli": GlueTask(("sentence1", "sentence2"), ("not_entailment", "entailment"), "accuracy", ("accuracy",)),
}

# demo_<name> -> <demo tasks_dir>/<name>/{train,validation,test}.jsonl with columns "sentence" and "label".
# The token-classification demo tasks are ltgbert.token_tasks.DEMO_TOKEN_TASKS.
DEMO_TASKS = ("grammaticality", "topic", "mentions", "regression")

# Problem-type spellings accepted from the command line -> canonical name.
_PROBLEM_TYPE_ALIASES = {
    "binary": "binary",
    "multiclass": "multiclass",
    "multi_class": "multiclass",
    "single_label_classification": "multiclass",
    "multilabel": "multilabel",
    "multi_label": "multilabel",
    "multi_label_classification": "multilabel",
    "regression": "regression",
    "token": "token",
    "token_classification": "token",
    "ner": "token",
    "pos": "token",
}


def normalize_problem_type(name: str | None) -> str | None:
    """'multi-label', 'multi_label_classification', 'ner', ... -> one of ``PROBLEM_TYPES`` (None stays None)."""
    if name is None:
        return None
    key = name.strip().lower().replace("-", "_")
    if key not in _PROBLEM_TYPE_ALIASES:
        raise UserError(f"unknown problem type {name!r}; use one of {', '.join(PROBLEM_TYPES)}")
    return _PROBLEM_TYPE_ALIASES[key]


def split_role(name: str) -> str:
    """ "train", "validation" or "test": what launch/finetune.py does with the split of this name."""
    for role in ("train", "validation", "test"):
        if name == role or (role != "train" and name.startswith(role)):
            return role
    raise ValueError(f"split {name!r} is neither train nor validation* nor test*")


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

    def head(self, n: int | None) -> Split:
        if n is None or n >= len(self):
            return self
        return Split(self.source, [col[:n] for col in self.texts], None if self.labels is None else self.labels[:n])


@dataclass
class TaskData:
    name: str
    splits: dict[str, Split]  # "train", "validation*", "test*" (see split_role); absent when not given
    text_columns: tuple[str, ...]
    label_names: tuple[str, ...] | None = None  # fixed by the task (GLUE)
    metric: str | None = None  # the task's metric for picking the best model, if it has one
    regression: bool = False  # fixed by the task (GLUE stsb)
    metrics: tuple[str, ...] = ()  # the task's official metrics (GLUE), a subset of what is computed


# A label cell is a number exactly when it is a JSON number: "007", "1_000", "0x1f" and "nan" are strings.
# A leading "+" is allowed too, for +1/-1 labels.
_JSON_NUMBER = re.compile(r"[+-]?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")


def parse_label_cell(cell: str | None) -> Any:
    """A csv/tsv label cell -> int, float or the string as written; an empty cell -> None (no label)."""
    if cell is None or cell == "":
        return None
    text = cell.strip()
    match = _JSON_NUMBER.fullmatch(text)
    if match is None:
        return cell
    return float(text) if match.group(2) or match.group(3) else int(text)


def read_table(path: str | os.PathLike, label_column: str | None = None) -> list[dict[str, Any]]:
    """Rows of a local .csv, .tsv, .json (array of objects, or JSON lines) or .jsonl file.

    csv/tsv cells stay the strings in the file, except ``label_column``'s (``parse_label_cell``); JSON
    values keep their JSON types.
    """
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
        return _read_csv(path, text, suffix, label_column)
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


def _read_csv(path: Path, text: str, suffix: str, label_column: str | None) -> list[dict[str, Any]]:
    # TSV as GLUE ships it: tabs only, quotes are part of the text.
    quoting = csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL
    reader = csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",", quoting=quoting)
    rows = []
    for r in reader:
        if None in r:  # DictReader's key for cells beyond the header
            raise UserError(
                f"{path} line {reader.line_num} has more cells than the header ({len(reader.fieldnames)}); "
                "quote cells that hold the delimiter"
            )
        if label_column in r:
            r[label_column] = parse_label_cell(r[label_column])
        rows.append(r)
    return rows


def _columns_to_split(
    get: Callable[[str], list[Any]],
    columns: Sequence[str],
    source: str,
    text_columns: Sequence[str],
    label_column: str,
    split: str,
    glue: bool,
) -> Split:
    """One split from column access (``get(name)`` -> that column's values, None where a row lacks it)."""
    for col in text_columns:
        if col not in columns:
            raise UserError(
                f"text column {col!r} not found in {source} (columns: {', '.join(sorted(columns))}); set --text_column"
            )
    texts = []
    for col in text_columns:
        values = list(get(col))
        for i, v in enumerate(values):
            if v is None:
                raise UserError(f"{source} row {i + 1} has no text in column {col!r}; fill it in or drop the row")
            if not isinstance(v, str):  # a JSON number (or other value) in a text column: its JSON text
                values[i] = json.dumps(v, ensure_ascii=False)
        texts.append(values)
    labels = None
    role = split_role(split)
    if label_column in columns:
        labels = list(get(label_column))
        # GLUE marks unlabelled (test) rows with -1; elsewhere -1 is a value like any other.
        missing = [i for i, v in enumerate(labels) if v is None or (glue and v == -1)]
        if missing:
            if role != "test":
                raise UserError(
                    f"{source} row {missing[0] + 1} has no label in column {label_column!r}; "
                    f"every {split} row needs one"
                )
            labels = None
    elif role != "test":
        raise UserError(
            f"label column {label_column!r} not found in {source} (columns: {', '.join(sorted(columns))}); "
            "set --label_column"
        )
    return Split(source, texts, labels)


def _rows_to_split(
    rows: list[dict], source: str, text_columns: Sequence[str], label_column: str, split: str, glue: bool
) -> Split:
    if not rows:
        raise UserError(f"the {split} split ({source}) has no rows; give a file with data")
    columns = set().union(*(r.keys() for r in rows[:100]))
    return _columns_to_split(
        lambda c: [r.get(c) for r in rows], sorted(columns), source, text_columns, label_column, split, glue
    )


def _guess_text_columns(columns: Sequence[str], label_column: str) -> tuple[str, ...]:
    for guess in (("sentence1", "sentence2"), ("sentence",), ("text",)):
        if set(guess) <= set(columns):
            return guess
    raise UserError(
        f"cannot tell the text column(s) among {', '.join(sorted(set(columns) - {label_column}))}; "
        "pass --text_column NAME (two names for sentence pairs)"
    )


def _open_glue_dataset(name: str, dataset_name: str, cache_dir: str | None):
    """The DatasetDict of one GLUE task: a save_to_disk directory, a local Hub download, or a Hub id."""
    import datasets  # heavy; only GLUE through datasets needs it

    local = Path(dataset_name).expanduser()
    for saved in (local, local / name):
        if (saved / "dataset_dict.json").is_file():
            return datasets.load_from_disk(str(saved)), str(saved)
    if local.is_dir() and not (local / "README.md").is_file() and not (local / f"{name}.py").is_file():
        # Without the README's configurations datasets would merge e.g. validation_matched and
        # validation_mismatched into one "validation" split: refuse instead of guessing.
        raise UserError(
            f"{local} is neither a DatasetDict.save_to_disk directory (dataset_dict.json, here or in {name}/) "
            "nor a download of the Hub repository (README.md with its configs); save the task with "
            "DatasetDict.save_to_disk or download it with huggingface-cli"
        )
    try:
        return datasets.load_dataset(dataset_name, name, cache_dir=cache_dir), dataset_name
    except Exception as e:  # noqa: BLE001 - network, missing config, corrupt cache: all end alike for a user
        detail = " ".join(str(e).split())[:200]
        raise UserError(
            f"cannot load GLUE task {name!r} from {dataset_name!r} ({type(e).__name__}: {detail}); "
            "check network access / HF_DATASETS_OFFLINE, pass a local copy as --dataset_name, "
            "or pass --train_file/--validation_file"
        ) from None


def _load_glue_splits(
    name: str,
    glue: GlueTask,
    dataset_name: str,
    cache_dir: str | None,
    text_columns: Sequence[str],
    label_column: str,
) -> dict[str, Split]:
    ds, where = _open_glue_dataset(name, dataset_name, cache_dir)
    splits = {}
    for ours, theirs in glue.splits:
        if theirs not in ds:
            if split_role(ours) == "test":
                continue
            raise UserError(
                f"{where} ({name}) has no {theirs!r} split (splits: {', '.join(ds)}); "
                f"GLUE {name} has {', '.join(t for _, t in glue.splits)}"
            )
        part = ds[theirs]
        names = getattr(part.features.get(label_column), "names", None)
        if names is not None and glue.label_names is not None and tuple(names) != glue.label_names:
            raise UserError(
                f"{where} ({name}) names its labels {list(names)}, GLUE's are {list(glue.label_names)}; "
                "its label ids would mean other labels: use a copy of GLUE's data"
            )
        columns = part.column_names
        wanted = [c for c in (*text_columns, label_column) if c in columns]
        data = part.select_columns(wanted).to_dict()
        source = f"{where}/{name}:{theirs}"
        splits[ours] = _columns_to_split(data.__getitem__, columns, source, text_columns, label_column, ours, True)
    return splits


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
    extra_files: Mapping[str, str] | None = None,
) -> TaskData:
    """Reads the splits of a GLUE, demo or local-file task (see the module docstring).

    ``extra_files`` adds local splits by name, e.g. ``{"validation_mismatched": "dev_mismatched.tsv"}``;
    names must start with "validation" or "test".
    """
    files = {"train": train_file, "validation": validation_file, "test": test_file}
    for split, path in (extra_files or {}).items():
        if split in files or not split.startswith(("validation", "test")):
            raise UserError(f"extra split {split!r} must be named validation_<name> or test_<name>")
        files[split] = path
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
            from ltgbert.token_tasks import DEMO_TOKEN_TASKS

            if key.startswith("demo_") and key[5:] in DEMO_TOKEN_TASKS:
                raise UserError(f"{task_name} is a token-classification task; load it with load_token_task")
            demos = [f"demo_{t}" for t in (*DEMO_TASKS, *DEMO_TOKEN_TASKS)]
            known = ", ".join([*GLUE_TASKS, *demos, "demo"])
            raise UserError(f"unknown task {task_name!r}; use one of {known}, or --train_file with local files")
        name = key
    if text_columns is not None and not 1 <= len(text_columns) <= 2:
        raise UserError(f"--text_column takes one or two column names (sentence pairs), got {len(text_columns)}")
    if glue is not None and train_file is None:
        splits = _load_glue_splits(name, glue, dataset_name, cache_dir, text_columns, label_column)
    else:
        if files["train"] is None:
            raise UserError("no training data: pass --task_name (GLUE or demo task) or --train_file")
        raw = {s: read_table(f, label_column) for s, f in files.items() if f is not None}
        if text_columns is None:
            text_columns = _guess_text_columns(
                sorted(set().union(*(r.keys() for r in raw["train"][:100]))), label_column
            )
        splits = {
            s: _rows_to_split(rows, str(files[s]), text_columns, label_column, s, glue is not None)
            for s, rows in raw.items()
        }
    return TaskData(
        name=name,
        splits=splits,
        text_columns=tuple(text_columns),
        label_names=None if glue is None else glue.label_names,
        metric=None if glue is None else glue.metric,
        regression=glue is not None and glue.label_names is None,
        metrics=() if glue is None else glue.metrics,
    )


# ----------------------------------------------------------------------------------------------------------
# Labels


def _label_kind(values: list[Any], source: str) -> str:
    kinds = set()
    for v in values:
        if isinstance(v, (list, tuple)):
            kinds.add("list")
        elif isinstance(v, (bool, int)):
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
        return {
            "binary": "single_label_classification",
            "multiclass": "single_label_classification",
            "multilabel": "multi_label_classification",
            "regression": "regression",
        }[self.problem_type]

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


def build_label_info(task: TaskData, problem_type: str | None = None, num_labels: int | None = None) -> LabelInfo:
    """Infers (or checks) the problem type and label mapping from the train and validation labels."""
    train = task.splits["train"]
    labelled = [s for name, s in task.splits.items() if split_role(name) != "test" and s.labels is not None]
    kind = _label_kind(train.labels, train.source)
    problem_type = normalize_problem_type(problem_type)
    if problem_type == "token":
        raise UserError("token classification reads tokens and tags: use ltgbert.token_tasks.load_token_task")
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
    """Tokenised rows (unpadded) with encoded labels; ``lengths`` feeds the length-grouped batch order
    (``ltgbert.batching.length_grouped_order``)."""

    def __init__(self, input_ids: list[list[int]], labels: list[Any] | None, token_type_ids=None):
        self.input_ids, self.labels, self.token_type_ids = input_ids, labels, token_type_ids
        self.lengths = np.fromiter((len(x) for x in input_ids), dtype=np.int64, count=len(input_ids))

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = {"input_ids": self.input_ids[i], "idx": int(i)}
        if self.token_type_ids is not None:
            row["token_type_ids"] = self.token_type_ids[i]
        if self.labels is not None:
            row["labels"] = self.labels[i]
        return row


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
        enc = tokenizer(
            *cols,
            truncation=True,
            max_length=max_seq_length,
            return_token_type_ids=token_type_ids,
            return_attention_mask=False,
        )
        input_ids.extend(enc["input_ids"])
        if token_type_ids:
            types.extend(enc["token_type_ids"])
    return EncodedSplit(input_ids, labels, types if token_type_ids else None)


class DynamicPaddingCollator:
    """Pads a list of rows to the longest row of the batch (or to ``max_length``, for comparison).

    Returns LongTensors input_ids/attention_mask (+ token_type_ids), labels (long ids, float scores, a
    float multi-hot matrix, or for ``problem_type="token"`` one long id per position, -100 in the padding)
    and idx (row numbers, to restore the order of predictions).
    """

    def __init__(
        self, pad_token_id: int, problem_type: str, pad_to_multiple_of: int | None = None, max_length: int | None = None
    ):
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
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "idx": torch.tensor([r["idx"] for r in rows], dtype=torch.long),
        }
        if types is not None:
            batch["token_type_ids"] = types
        if "labels" in rows[0] and self.problem_type == "token":
            labels = torch.full((len(rows), width), -100, dtype=torch.long)
            for i, r in enumerate(rows):
                labels[i, : len(r["labels"])] = torch.tensor(r["labels"], dtype=torch.long)
            batch["labels"] = labels
        elif "labels" in rows[0]:
            dtype = torch.long if self.problem_type in ("binary", "multiclass") else torch.float32
            batch["labels"] = torch.tensor([r["labels"] for r in rows], dtype=dtype)
        return batch


def write_predictions(path: str | os.PathLike, predictions: list[Any], fmt: str = "jsonl") -> Path:
    """Writes ``{"index", "prediction"}`` lines (jsonl) or GLUE's ``index<TAB>prediction`` (tsv), atomically."""
    if fmt == "tsv":
        rows = (f"{i}\t{','.join(map(str, p)) if isinstance(p, list) else p}\n" for i, p in enumerate(predictions))
        return write_lines(path, ["index\tprediction\n", *rows])
    return write_lines(
        path, (json.dumps({"index": i, "prediction": p}, ensure_ascii=False) + "\n" for i, p in enumerate(predictions))
    )
