"""Helpers for the pretraining integration tests: tiny shared inputs, launching, reading what a run wrote."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = ROOT / "launch" / "pretrain.py"


def tiny_args(corpus, tokenizer, output_dir, **overrides):
    """Flags for a tiny, fast pretraining run on the shared test corpus."""
    values = {
        "train_file": str(corpus.corpus_train),
        "validation_file": str(corpus.corpus_validation),
        "tokenizer_name": str(tokenizer),
        "output_dir": str(output_dir),
        "config_name": "tiny",
        "max_seq_length": 32,
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 16,
        "max_steps": 6,
        "logging_steps": 1,
        "eval_steps": 0,
        "save_steps": 0,
        "max_eval_samples": 64,
        "learning_rate": 5e-3,
        "report_to": "none",
        "disable_tqdm": True,
        "seed": 7,
    }
    values.update(overrides)
    args = []
    for key, value in values.items():
        if value is None:
            continue
        if value is True:
            args.append(f"--{key}")
        elif value is False:
            continue
        else:
            args += [f"--{key}", str(value)]
    return args


def env(**extra):
    e = dict(os.environ)
    e.update(
        {
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_VERBOSITY": "error",
        }
    )
    e.update(extra)
    return e


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_cmd(num_processes=1, config_file=None):
    """`accelerate launch` with one of our presets (launch/accelerate/*.yaml) and N processes."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file:
        cmd += ["--config_file", str(ROOT / "launch" / "accelerate" / config_file)]
    cmd += ["--num_processes", str(num_processes), "--num_machines", "1", "--main_process_port", str(free_port())]
    if num_processes == 1 and not config_file:
        cmd += ["--num_cpu_threads_per_process", "1"]
    return cmd + [str(PRETRAIN)]


def run(cmd, timeout=240, check=True, **kwargs):
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env(), **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def metrics(output_dir):
    """The lines of <output_dir>/metrics.jsonl (one JSON object per logged step or evaluation)."""
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def logged(output_dir, key):
    """{step: value} of one logged quantity, e.g. "train/loss" or "eval/loss"."""
    return {m["step"]: m[key] for m in metrics(output_dir) if key in m}


def logged_losses(output_dir):
    return logged(output_dir, "train/loss")


def rows_by_rank(output_dir):
    """{rank: [(step, [rows of each micro-batch]), ...]} recorded with --debug_record_rows."""
    out = {}
    for path in sorted((Path(output_dir) / "debug_rows").glob("rank*.jsonl")):
        rank = int(path.stem[4:])
        out[rank] = [(r["step"], r["rows"]) for r in map(json.loads, path.read_text().splitlines())]
    return out


def rows_by_step(output_dir):
    """{step: sorted rows of that optimizer step over every rank and micro-batch}."""
    steps = {}
    for records in rows_by_rank(output_dir).values():
        for step, micro in records:
            steps.setdefault(step, []).extend(r for batch in micro for r in batch)
    return {s: sorted(rows) for s, rows in steps.items()}


def run_config(output_dir):
    return json.loads((Path(output_dir) / "run_config.json").read_text())


def final_weights(output_dir):
    from safetensors.torch import load_file

    return load_file(Path(output_dir) / "final" / "model.safetensors")
