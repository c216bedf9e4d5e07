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
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from ltgbert.errors import UserError

__all__ = ["parse_args", "load_config_file", "save_resolved_config", "load_resolved_config"]

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
            parser.add_argument(
                f"--no_{action.dest}", action="store_false", dest=action.dest, default=argparse.SUPPRESS,
                help=f"set {action.dest} to false",
            )


def parse_args(dataclass_types: Sequence[type] | type, argv: Sequence[str] | None = None) -> tuple[Any, ...]:
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

    parser = HfArgumentParser(dataclass_types, allow_abbrev=False)
    # Registered so --help lists it; _split_config_flag already consumed it.
    parser.add_argument(CONFIG_FLAG, default=None, metavar="FILE", help="YAML/JSON file of argument defaults")
    _add_negative_flags(parser)

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
    """Writes the merged arguments as indented JSON, atomically (temp file in the same directory + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(resolved_config(instances), indent=2, sort_keys=True) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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


def run_entry_point(dataclass_type: type, main: Callable[[Any], Any], argv: Sequence[str] | None = None) -> int:
    """What every launch/*.py script does: parse ``argv`` into ``dataclass_type`` and call ``main(args)``.

    Bad input (a ``UserError`` from parsing or from ``main``) becomes one ``error: ...`` line on stderr and exit
    status 2. ``main`` may return an int exit status (e.g. 75 after a preemption checkpoint); anything else
    counts as success.
    """
    try:
        (args,) = parse_args(dataclass_type, argv)
        status = main(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return status if isinstance(status, int) else 0
