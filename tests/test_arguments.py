"""Tests for ltgbert.arguments: config files, CLI overrides, errors, resolved config."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from ltgbert.arguments import load_resolved_config, parse_args, save_resolved_config
from ltgbert.errors import UserError


@dataclass
class ModelArgs:
    model_name_or_path: str | None = field(default=None, metadata={"help": "model dir"})
    preset: Literal["tiny", "small", "base"] = "tiny"


@dataclass
class TrainArgs:
    output_dir: Path = field(metadata={"help": "where to write"})
    learning_rate: float = 1e-3
    max_steps: int = 10
    gradient_checkpointing: bool = False
    bf16: bool = True
    layers: list[int] = field(default_factory=lambda: [1, 2])
    warmup_ratio: float = 0.016

    def __post_init__(self):
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


TYPES = (ModelArgs, TrainArgs)


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_cli_only():
    model, train = parse_args(TYPES, ["--output_dir", "out", "--max_steps", "5", "--gradient_checkpointing"])
    assert model.preset == "tiny" and model.model_name_or_path is None
    assert train.output_dir == Path("out") and train.max_steps == 5 and train.gradient_checkpointing is True
    assert train.bf16 is True and train.layers == [1, 2]
    (train,) = parse_args(TrainArgs, ["--output_dir", "o", "--no_bf16", "--layers", "3", "4", "5"])
    assert train.bf16 is False and train.layers == [3, 4, 5]


def test_yaml_config_and_cli_override(tmp_path):
    config = _write(
        tmp_path,
        "run.yaml",
        "output_dir: from_file\nlearning_rate: 1e-4\nmax_steps: 100\ngradient_checkpointing: true\n"
        "bf16: false\nlayers: [7, 8]\npreset: small\n",
    )
    model, train = parse_args(TYPES, ["--config", config])
    # "1e-4" is a string to YAML 1.1; it still becomes a float.
    assert train.learning_rate == 1e-4 and isinstance(train.learning_rate, float)
    assert train.output_dir == Path("from_file") and train.max_steps == 100
    assert train.gradient_checkpointing is True and train.bf16 is False and train.layers == [7, 8]
    assert model.preset == "small"

    model, train = parse_args(
        TYPES,
        [
            "--max_steps",
            "3",
            f"--config={config}",
            "--bf16",
            "--no_gradient_checkpointing",
            "--layers",
            "9",
            "--preset",
            "base",
        ],
    )
    assert train.max_steps == 3 and train.learning_rate == 1e-4
    assert train.bf16 is True and train.gradient_checkpointing is False and train.layers == [9]
    assert model.preset == "base"


def test_json_config(tmp_path):
    config = _write(tmp_path, "run.json", json.dumps({"output_dir": "x", "max_steps": 7, "layers": 4}))
    (train,) = parse_args([TrainArgs], ["--config", config])
    assert train.max_steps == 7 and train.layers == [4]


def test_config_errors(tmp_path):
    bad_key = _write(tmp_path, "a.yaml", "output_dir: x\nlearnig_rate: 0.1\n")
    with pytest.raises(UserError, match=r"unknown key 'learnig_rate'.*learning_rate"):
        parse_args(TYPES, ["--config", bad_key])
    bad_choice = _write(tmp_path, "b.yaml", "output_dir: x\npreset: huge\n")
    with pytest.raises(UserError, match="preset.*choose from tiny, small, base"):
        parse_args(TYPES, ["--config", bad_choice])
    bad_type = _write(tmp_path, "c.yaml", "output_dir: x\nmax_steps: many\n")
    with pytest.raises(UserError, match="max_steps"):
        parse_args(TYPES, ["--config", bad_type])
    not_mapping = _write(tmp_path, "d.yaml", "- 1\n- 2\n")
    with pytest.raises(UserError, match="mapping"):
        parse_args(TYPES, ["--config", not_mapping])
    broken = _write(tmp_path, "e.json", "{nope")
    with pytest.raises(UserError, match="not valid JSON"):
        parse_args(TYPES, ["--config", broken])
    with pytest.raises(UserError, match="does not exist"):
        parse_args(TYPES, ["--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(UserError, match=r"\.yaml, \.yml or \.json"):
        parse_args(TYPES, ["--config", _write(tmp_path, "f.toml", "")])


def test_cli_errors():
    with pytest.raises(UserError, match="unrecognized arguments: --max_step 3.*--max_steps"):
        parse_args(TYPES, ["--output_dir", "x", "--max_step", "3"])
    with pytest.raises(UserError, match=r"--warmup_ratio must be in \[0, 1\)"):
        parse_args(TYPES, ["--output_dir", "x", "--warmup_ratio", "2"])
    # argparse's own errors (a missing flag, a value of the wrong type) are one-line UserErrors too
    with pytest.raises(UserError, match="required: --output_dir.*see --help"):
        parse_args(TYPES, [])
    with pytest.raises(UserError, match="invalid int value: 'many'"):
        parse_args(TYPES, ["--output_dir", "x", "--max_steps", "many"])


def test_help_groups_sections_and_hides_test_flags(capsys):
    from ltgbert.arguments import build_parser

    @dataclass
    class Data:
        _argument_group_name = "data"
        train_file: str = field(default="a", metadata={"help": "corpus"})

    @dataclass
    class Run(Data):
        _argument_group_name = "run"
        seed: int = field(default=1, metadata={"help": "seed"})
        debug_flag: bool = field(default=False, metadata={"help": argparse.SUPPRESS})

    text = build_parser([Run], description="Launch me:\n    python x.py").format_help()
    assert "Launch me:\n    python x.py" in text  # the docstring's commands, not reflowed
    data, run = text.index("\ndata:"), text.index("\nrun:")
    assert data < text.index("--train_file", data) < run < text.index("--seed", run)
    assert "debug_flag" not in text


def test_resolved_config_round_trip(tmp_path):
    model, train = parse_args(TYPES, ["--output_dir", str(tmp_path / "o"), "--max_steps", "4"])
    path = save_resolved_config((model, train), tmp_path / "out" / "run_config.json")
    data = load_resolved_config(path)
    assert data["output_dir"] == str(tmp_path / "o") and data["max_steps"] == 4 and data["preset"] == "tiny"
    assert [p.name for p in path.parent.iterdir()] == ["run_config.json"]  # no temp file left behind
    # The resolved config is itself a valid --config file.
    model2, train2 = parse_args(TYPES, ["--config", str(path)])
    assert (model2, train2) == (model, train)
    with pytest.raises(UserError, match="unreadable"):
        load_resolved_config(_write(tmp_path, "bad.json", "{"))
