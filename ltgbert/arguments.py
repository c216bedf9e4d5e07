"""Command-line arguments: dataclasses + an optional YAML/JSON config file + command-line overrides.

Each entry point declares its arguments as ``@dataclass`` fields (documented with ``metadata={"help": ...}``
and checked in ``__post_init__``) and calls ``parse_args``. Flags are the field names, as in
``transformers.TrainingArguments``, because ``transformers.HfArgumentParser`` builds the parser.

Precedence, lowest to highest: dataclass defaults < ``--config`` file < command line. The file is a flat
mapping from field names to values::

    # launch/configs/small.yaml
    learning_rate: 1.4e-3
    max_steps: 31250
    gradient_checkpointing: true

    accelerate launch launch/pretrain.py --config launch/configs/small.yaml --max_steps 100

File values become parser defaults (``parser.set_defaults``), so the command line overrides them with
ordinary argparse semantics (``--flag``/``--no_flag`` for booleans, space-separated lists). A key that no
dataclass declares is a ``UserError`` naming the key and its closest matches; a typo in a config file must
not silently fall back to a default. ``save_resolved_config`` writes what was finally used, in the same
format, so ``--config <output_dir>/run_config.json`` reproduces a run.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import enum
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from ltgbert.errors import UserError
from ltgbert.io import write_json

__all__ = [
    "parse_args",
    "redefault",
    "build_parser",
    "load_config_file",
    "save_resolved_config",
    "load_resolved_config",
    "resolved_config",
    "run_entry_point",
]

CONFIG_FLAG = "--config"


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a flat YAML (.yaml/.yml) or JSON (.json) mapping; errors are ``UserError``."""
    path = Path(path)
    if path.suffix.lower() not in (".yaml", ".yml", ".json"):
        raise UserError(f"config file {path} must end in .yaml, .yml or .json")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist; check the --config path") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read config file {path}: {e}") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        detail = " ".join(str(e).split())
        raise UserError(f"config file {path} is not valid {path.suffix[1:].upper()}: {detail}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise UserError(f"config file {path} must hold a mapping of argument names to values, not a {kind}")
    return data


def _split_config_flag(argv: list[str]) -> tuple[str | None, list[str]]:
    # A tiny parser of its own: --config must be known before the real parser gets its defaults.
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument(CONFIG_FLAG, default=None)
    known, rest = pre.parse_known_args(argv)
    return known.config, rest


def _field_names(dataclass_types: Sequence[type]) -> list[str]:
    return [f.name for dtype in dataclass_types for f in dataclasses.fields(dtype) if f.init]


def _coerce(action: argparse.Action, key: str, value: Any, path: str) -> Any:
    """Checks and converts a config-file value the way argparse would convert the same text on the command line."""

    def convert(item: Any) -> Any:
        if action.type is None or item is None:
            return item
        # YAML already typed most scalars. Strings ("1e-3", which YAML 1.1 leaves a string; enum values) and
        # choices go through the argparse type function; numbers are widened/narrowed to the field's type.
        try:
            if isinstance(item, str) or action.choices is not None:
                item = action.type(item)
            elif action.type is str:
                item = str(item)
            elif action.type in (int, float) and isinstance(item, (int, float)) and not isinstance(item, bool):
                if action.type is int and not float(item).is_integer():
                    raise ValueError("not an integer")
                item = action.type(item)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
            raise UserError(f"config file {path}: invalid value {item!r} for {key!r} ({e})") from None
        if action.choices is not None and item not in action.choices:
            choices = ", ".join(str(c) for c in action.choices)
            raise UserError(f"config file {path}: invalid value {item!r} for {key!r}; choose from {choices}")
        return item

    if action.nargs in ("+", "*"):
        items = value if isinstance(value, (list, tuple)) else [value]
        return [convert(v) for v in items]
    return convert(value)


def _add_negative_flags(parser: argparse.ArgumentParser) -> None:
    # HfArgumentParser adds --no_<flag> only for booleans that default to True; a config file can turn any
    # boolean on, so every boolean needs a way back off from the command line.
    existing = {o for a in parser._actions for o in a.option_strings}
    for action in list(parser._actions):
        is_bool_flag = action.nargs == "?" and action.const is True and f"--{action.dest}" in action.option_strings
        if is_bool_flag and f"--no_{action.dest}" not in existing:
            # Added after the field's own option, so the field's default stays the one argparse applies.
            # Listed once, in the --config help, rather than beside every boolean.
            parser.add_argument(
                f"--no_{action.dest}",
                action="store_false",
                dest=action.dest,
                default=argparse.SUPPRESS,
                help=argparse.SUPPRESS,
            )


def _section_of_fields(dataclass_type: type) -> dict[str, str]:
    """Field name -> section title, from the dataclass bases that declare them (``_argument_group_name``).

    A script's arguments are one dataclass built from section dataclasses (data, model, optimisation, ...);
    a field that a subclass redeclares (to change its default) stays in the section that introduced it.
    """
    sections: dict[str, str] = {}
    for klass in reversed(dataclass_type.__mro__):
        title = klass.__dict__.get("_argument_group_name")
        for name in klass.__dict__.get("__annotations__", {}):
            if title and name not in sections:
                sections[name] = title
    return sections


def _group_by_section(parser: argparse.ArgumentParser, dataclass_types: Sequence[type]) -> None:
    # HfArgumentParser puts one dataclass's fields in one group; --help reads better in sections. argparse has no
    # public way to move an action between groups, but its groups are plain lists of actions.
    sections: dict[str, str] = {}
    for dtype in dataclass_types:
        sections.update(_section_of_fields(dtype))
    if not sections:
        return
    groups: dict[str, argparse._ArgumentGroup] = {}
    for title in dict.fromkeys(sections.values()):
        groups[title] = parser.add_argument_group(title)
    for group in list(parser._action_groups):
        if group in groups.values():
            continue
        for action in list(group._group_actions):
            title = sections.get(action.dest)
            if title is not None:
                group._group_actions.remove(action)
                groups[title]._group_actions.append(action)
        if not group._group_actions and group is not parser._optionals and group is not parser._positionals:
            parser._action_groups.remove(group)


class _Parser(HfArgumentParser):
    def error(self, message: str):
        # One line, as every other bad input: argparse would print the whole usage text first.
        raise UserError(f"{message}; see --help")


def build_parser(dataclass_types: Sequence[type], description: str | None = None) -> HfArgumentParser:
    """The parser behind ``parse_args``: the script's docstring as description, flags grouped by section."""
    parser = _Parser(
        list(dataclass_types),
        allow_abbrev=False,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # Registered so --help lists it; _split_config_flag already consumed it.
    parser.add_argument(
        CONFIG_FLAG,
        default=None,
        metavar="FILE",
        help="YAML/JSON file of argument defaults (keys are the flag names; the command line wins). "
        "Every boolean flag --x also has --no_x, to turn off what a file turned on.",
    )
    _add_negative_flags(parser)
    _group_by_section(parser, dataclass_types)
    for action in parser._actions:
        # HfArgumentParser also accepts --dash-spellings of every --flag_name; they keep working, but --help
        # lists each flag once, by the name transformers' documentation uses.
        names = action.option_strings
        action.option_strings = [
            o for o in names if not (o.startswith("--") and "-" in o[2:] and "--" + o[2:].replace("-", "_") in names)
        ]
    return parser


def parse_args(
    dataclass_types: Sequence[type] | type, argv: Sequence[str] | None = None, description: str | None = None
) -> tuple[Any, ...]:
    """Parses ``argv`` (default ``sys.argv[1:]``) into one instance per dataclass type.

    ``--config FILE`` (YAML or JSON, keys = field names) supplies defaults that the command line overrides.
    Raises ``UserError`` for an unknown config key, a bad config value, an unknown command-line flag and any
    ``ValueError`` raised by a dataclass' ``__post_init__``. Missing required arguments and unparsable
    command-line values end in argparse's usual usage line and exit status 2.
    """
    if isinstance(dataclass_types, type):
        dataclass_types = [dataclass_types]
    dataclass_types = list(dataclass_types)
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path, argv = _split_config_flag(argv)
    parser = build_parser(dataclass_types, description)

    if config_path is not None:
        values = load_config_file(config_path)
        names = _field_names(dataclass_types)
        for key in values:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=3, cutoff=0.6)
                hint = f"; did you mean {' or '.join(close)}?" if close else "; remove it or check the spelling"
                raise UserError(f"unknown key {key!r} in config file {config_path}{hint}")
        # The field's own option (--name), not its --no_name complement, decides how values convert.
        actions = {a.dest: a for a in parser._actions if f"--{a.dest}" in a.option_strings}
        defaults = {key: _coerce(actions[key], key, value, config_path) for key, value in values.items()}
        parser.set_defaults(**defaults)
        for action in parser._actions:
            # A value from the file satisfies a field that has no dataclass default.
            if action.dest in defaults:
                action.required = False
    try:
        *instances, remaining = parser.parse_args_into_dataclasses(
            args=argv, return_remaining_strings=True, look_for_args_file=False
        )
    except ValueError as e:  # __post_init__ checks
        raise UserError(" ".join(str(e).split())) from None
    if remaining:
        flags = [a for a in remaining if a.startswith("-")] or remaining
        options = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
        close = difflib.get_close_matches(flags[0].split("=")[0], options, n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(close)}?" if close else "; see --help"
        raise UserError(f"unrecognized arguments: {' '.join(remaining)}{hint}")
    # HfArgumentParser appends a Namespace for parser-level extras (our --config); drop it.
    return tuple(instances[: len(dataclass_types)])


def _jsonable(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def resolved_config(instances: Any | Iterable[Any]) -> dict[str, Any]:
    """One flat JSON-ready dict from ``dataclasses.asdict`` of every instance (later ones win on a clash)."""
    if dataclasses.is_dataclass(instances) and not isinstance(instances, type):
        instances = [instances]
    merged: dict[str, Any] = {}
    for obj in instances:
        if isinstance(obj, argparse.Namespace):
            merged.update(_jsonable(vars(obj)))
        else:
            merged.update(_jsonable(dataclasses.asdict(obj)))
    return merged


def save_resolved_config(instances: Any | Iterable[Any], path: str | os.PathLike) -> Path:
    """Writes the merged arguments as indented JSON, atomically (``ltgbert.io.write_json``)."""
    return write_json(path, resolved_config(instances), sort_keys=True)


def load_resolved_config(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a file written by ``save_resolved_config``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"resolved config {path} does not exist") from None
    except (OSError, ValueError) as e:
        raise UserError(f"resolved config {path} is unreadable ({e}); delete it or rerun") from None
    if not isinstance(data, dict):
        raise UserError(f"resolved config {path} must hold a JSON object")
    return data


def run_entry_point(
    dataclass_type: type, main: Callable[[Any], Any], argv: Sequence[str] | None = None, description: str | None = None
) -> int:
    """What every launch/*.py script does: parse ``argv`` into ``dataclass_type`` and call ``main(args)``.

    ``description`` (the script's module docstring, with its launch commands) heads ``--help``. Bad input (a
    ``UserError`` from parsing or from ``main``) becomes one ``error: ...`` line on stderr and exit status 2.
    ``main`` may return an int exit status (e.g. 75 after a preemption checkpoint); anything else counts as
    success.
    """
    try:
        (args,) = parse_args(dataclass_type, argv, description)
        status = main(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return status if isinstance(status, int) else 0


# -----------------------------------------------------------------------------
# the argument sections every training script shares


def redefault(section: type, name: str, default: Any, help: str | None = None):
    """The field ``name`` of a section dataclass with another default (and the same help unless given): how a
    script sets its own defaults for the shared flags."""
    metadata = dict(section.__dataclass_fields__[name].metadata)
    if help is not None:
        metadata["help"] = help
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _next_post_init(obj, klass) -> None:
    # Sections are mixed into one dataclass per script: each section checks its fields, then the next one's.
    following = getattr(super(klass, obj), "__post_init__", None)
    if following is not None:
        following()


def _positive(args, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be at least 1, got {value}")


@dataclass
class OutputArguments:
    _argument_group_name = "output, logging and checkpoints"

    output_dir: str = field(default="outputs/run", metadata={"help": "Where everything of the run is written."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start afresh in a used --output_dir: its old outputs are moved into a dated backup folder inside "
            "it (never deleted). Not with --resume_from_checkpoint."
        },
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "'latest' (the newest complete checkpoint of --output_dir, or a fresh start when there is none) "
            "or a "
            "checkpoint directory. A checkpoint of another run (other data or tokenizer) is refused."
        },
    )
    logging_steps: int = field(default=20, metadata={"help": "Log training metrics every N optimizer steps."})
    eval_steps: int = field(default=200, metadata={"help": "Evaluate every N optimizer steps (0: only at the end)."})
    save_steps: int = field(
        default=200,
        metadata={
            "help": "Write a resumable checkpoint every N steps (0: only at the end and when stopped by a signal)."
        },
    )
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep the newest N checkpoints (none: all)."})
    report_to: str = field(
        default="tensorboard",
        metadata={
            "help": "Trackers, comma-separated: tensorboard (default), wandb, mlflow, aim, comet_ml, clearml, dvclive, "
            "swanlab, trackio (each when installed), 'all' (every installed one) or 'none'."
        },
    )
    seed: int = field(default=42, metadata={"help": "Seed of initialisation, dropout, batch order and masks."})
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bar (log lines only)."})

    def __post_init__(self):
        _next_post_init(self, __class__)
        _positive(self, "logging_steps", "save_total_limit")
        for name in ("eval_steps", "save_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0 (0: only at the end), got {getattr(self, name)}")
        if self.overwrite_output_dir and self.resume_from_checkpoint:
            raise ValueError(
                "--overwrite_output_dir starts afresh and --resume_from_checkpoint continues: pass one "
                "of them (the SLURM templates always pass --resume_from_checkpoint latest)"
            )
        tracker_names(self.report_to)


@dataclass
class OptimizationArguments:
    _argument_group_name = "optimisation"

    optimizer: str = field(
        default="lamb", metadata={"help": "lamb (the LTG-BERT recipe) or adamw.", "choices": ["lamb", "adamw"]}
    )
    learning_rate: float = field(default=5e-3, metadata={"help": "Peak learning rate (after warmup)."})
    adam_beta1: float = field(default=0.9, metadata={"help": "Decay of the first-moment average (Adam/LAMB)."})
    adam_beta2: float = field(default=0.98, metadata={"help": "Decay of the second-moment average (Adam/LAMB)."})
    adam_epsilon: float = field(default=1e-6, metadata={"help": "Denominator epsilon of Adam/LAMB."})
    weight_decay: float = field(
        default=0.1, metadata={"help": "Decoupled weight decay on matrices (not on biases, norms or embeddings)."}
    )
    max_grad_norm: float = field(
        default=2.0,
        metadata={
            "help": "Clip the global gradient norm to this (0: no clipping; DeepSpeed clips with the same value)."
        },
    )
    lr_scheduler_type: str = field(
        default="cosine",
        metadata={
            "help": "Decay after warmup: cosine, linear or constant.",
            "choices": ["cosine", "linear", "constant"],
        },
    )
    warmup_ratio: float = field(default=0.016, metadata={"help": "Share of the steps with linear warmup from 0."})
    warmup_steps: int = field(default=0, metadata={"help": "Warmup steps; > 0 overrides --warmup_ratio."})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "The decay ends at this share of the peak rate."})
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps; <= 0: --num_train_epochs decides."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Passes over the data when --max_steps <= 0."})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Rows per micro-batch per process."})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "Rows per evaluation batch per process."})
    gradient_accumulation_steps: int = field(
        default=1,
        metadata={"help": "Micro-batches per optimizer step; the global batch is this x per-device batch x processes."},
    )
    max_consecutive_skips: int = field(
        default=10, metadata={"help": "Stop with an error after this many consecutive steps with a non-finite loss."}
    )

    def __post_init__(self):
        _next_post_init(self, __class__)
        _positive(
            self,
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
            "max_consecutive_skips",
        )
        if self.max_steps <= 0 and self.num_train_epochs <= 0 and not getattr(self, "max_words", None):
            raise ValueError("set --max_steps or --num_train_epochs above 0")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"--min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.max_grad_norm < 0:
            raise ValueError(f"--max_grad_norm must be >= 0 (0: off), got {self.max_grad_norm}")


@dataclass
class RuntimeArguments:
    _argument_group_name = "precision and performance"

    mixed_precision: str | None = field(
        default=None,
        metadata={
            "help": "no, bf16 or fp16, as `accelerate launch --mixed_precision` (default: the accelerate config's). "
            "On a "
            "CPU without bf16/fp16 matrix instructions it is emulated and slow (a warning says so).",
            "choices": ["no", "bf16", "fp16"],
        },
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Recompute activations in the backward pass: much less memory for about 30%% more time."},
    )
    dataloader_num_workers: int | None = field(
        default=None,
        metadata={
            "help": "DataLoader worker processes per training process that build batches (masking, padding) beside "
            "the step (default: 2 on a GPU, 0 on a CPU, where workers would take the step's cores). Batches "
            "are the same for any number."
        },
    )
    debug_nan_at_step: int | None = field(default=None, metadata={"help": argparse.SUPPRESS})  # tests: NaN loss
    debug_record_rows: bool = field(default=False, metadata={"help": argparse.SUPPRESS})  # tests: rows per rank

    def __post_init__(self):
        _next_post_init(self, __class__)
        if self.dataloader_num_workers is not None and self.dataloader_num_workers < 0:
            raise ValueError(f"--dataloader_num_workers must be >= 0, got {self.dataloader_num_workers}")


def tracker_names(report_to: str | None) -> list[str]:
    """``--report_to`` as accelerate tracker names; a one-line error for an unknown or uninstalled tracker."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS
    from accelerate.utils import imports

    names = [n.strip() for n in (report_to or "none").split(",") if n.strip()]
    if names in ([], ["none"]):
        return []

    def installed(name: str) -> bool:
        check = getattr(imports, f"is_{name}_available", None)
        return bool(check and check())

    if names == ["all"]:
        return [n for n in LOGGER_TYPE_TO_CLASS if installed(n)]
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ValueError(
                f"--report_to {name!r} is not a tracker accelerate knows; use "
                f"{', '.join(LOGGER_TYPE_TO_CLASS)}, all or none"
            )
        if not installed(name):
            raise ValueError(
                f"--report_to {name}: the {name} package is not installed; pip install {name} or choose another tracker"
            )
    return names
