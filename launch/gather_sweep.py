"""Gathers a fine-tuning sweep (slurm/finetune_sweep.slurm) into one table: mean and standard deviation over
seeds per task and learning rate, and the best learning rate per task.

    python launch/gather_sweep.py --sweep_dir outputs/sweep [--metric accuracy]

Every run below ``--sweep_dir`` that finished (it has a ``metrics.json`` written by launch/finetune.py) counts;
its seed and learning rate come from the ``run_config.json`` beside it (the resolved arguments), its task from
the sweep's directory layout ``<sweep_dir>/<task>/<run>/`` (else from metrics.json). The score of a run is its
best validation value of the metric that picked
its best model (``metric_for_best_model`` in metrics.json) unless ``--metric`` names another; the test value
of the same metric is reported too when the test split had labels. The best learning rate of a task is the
one with the best mean validation score (the highest, or the lowest for losses and errors).

Writes ``<sweep_dir>/sweep_results.md`` and ``<sweep_dir>/sweep_results.csv`` (one row per task and learning
rate) and prints the markdown. Runs that are still going or were preempted (no metrics.json) are listed as
missing, so a half-finished sweep can be inspected too.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ltgbert.errors import UserError  # noqa: E402
from ltgbert.io import write_text  # noqa: E402
from ltgbert.metrics import greater_is_better  # noqa: E402


@dataclass
class Run:
    task: str
    learning_rate: float
    seed: int
    metric: str
    eval_score: float
    test_score: float | None
    path: Path


def load_run(metrics_path: Path, sweep_dir: Path, metric: str | None) -> Run:
    """One finished run from its metrics.json and run_config.json."""
    try:
        metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
        config = json.loads((metrics_path.parent / "run_config.json").read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise UserError(f"{e.filename} is missing; is {metrics_path.parent} a launch/finetune.py output_dir?") from None
    except ValueError as e:
        raise UserError(f"{metrics_path.parent} has an unreadable metrics.json or run_config.json ({e})") from None
    name = (metric or metrics.get("metric_for_best_model") or "").removeprefix("eval_")
    evals = metrics.get("eval") or {}
    if name not in evals:
        raise UserError(
            f"{metrics_path} has no validation value of '{name}' (it has: "
            f"{', '.join(k for k in evals if k not in ('step', 'epoch'))}); choose one with --metric"
        )
    test = (metrics.get("test") or {}).get(name)
    # The sweep's layout is <sweep_dir>/<task>/<run>/: that names a task of local files too (metrics.json
    # calls every such task "custom"); anywhere else the task name in metrics.json is all there is.
    rel = metrics_path.parent.relative_to(sweep_dir)
    task = rel.parts[0] if len(rel.parts) == 2 else str(metrics.get("task") or config.get("task_name"))
    return Run(
        task=task,
        learning_rate=float(config["learning_rate"]),
        seed=int(config["seed"]),
        metric=name,
        eval_score=float(evals[name]),
        test_score=None if test is None else float(test),
        path=metrics_path.parent,
    )


def mean_std(values: list[float]) -> tuple[float, float]:
    # Sample standard deviation (n - 1), the usual "± over seeds"; 0 for a single seed.
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(runs: list[Run]) -> list[dict]:
    """One row per (task, learning rate): seeds, mean/std of the validation and test scores, best flag."""
    groups: dict[tuple[str, float], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.task, run.learning_rate), []).append(run)
    rows = []
    for (task, lr), group in sorted(groups.items()):
        metrics = {r.metric for r in group}
        if len(metrics) > 1:
            raise UserError(f"task {task} lr {lr} mixes metrics {sorted(metrics)}; pick one with --metric")
        eval_mean, eval_std = mean_std([r.eval_score for r in group])
        tests = [r.test_score for r in group if r.test_score is not None]
        test_mean, test_std = mean_std(tests) if tests else (math.nan, math.nan)
        rows.append(
            {
                "task": task,
                "learning_rate": lr,
                "metric": group[0].metric,
                "seeds": " ".join(str(s) for s in sorted(r.seed for r in group)),
                "num_seeds": len(group),
                "eval_mean": eval_mean,
                "eval_std": eval_std,
                "test_mean": test_mean,
                "test_std": test_std,
                "best": False,
            }
        )
    for task in {r["task"] for r in rows}:
        candidates = [r for r in rows if r["task"] == task]
        sign = 1 if greater_is_better(candidates[0]["metric"]) else -1
        max(candidates, key=lambda r: sign * r["eval_mean"])["best"] = True
    return rows


def fmt(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.4f}"


def to_markdown(rows: list[dict], missing: list[Path]) -> str:
    lines = [
        "| task | learning rate | metric | seeds | validation (mean ± std) | test (mean ± std) | best |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        test = "" if math.isnan(r["test_mean"]) else f"{fmt(r['test_mean'])} ± {fmt(r['test_std'])}"
        lines.append(
            f"| {r['task']} | {r['learning_rate']:g} | {r['metric']} | {r['num_seeds']} "
            f"| {fmt(r['eval_mean'])} ± {fmt(r['eval_std'])} | {test} | {'**best**' if r['best'] else ''} |"
        )
    lines += [
        "",
        "Best learning rate per task:",
        "",
        "| task | learning rate | validation | test |",
        "|---|---|---|---|",
    ]
    for r in (r for r in rows if r["best"]):
        test = "" if math.isnan(r["test_mean"]) else f"{fmt(r['test_mean'])} ± {fmt(r['test_std'])}"
        lines.append(
            f"| {r['task']} | {r['learning_rate']:g} | {fmt(r['eval_mean'])} ± {fmt(r['eval_std'])} | {test} |"
        )
    if missing:
        lines += ["", f"Unfinished runs (no metrics.json): {len(missing)}"]
        lines += [f"- {p}" for p in missing]
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path: Path) -> None:
    fields = [
        "task",
        "learning_rate",
        "metric",
        "num_seeds",
        "seeds",
        "eval_mean",
        "eval_std",
        "test_mean",
        "test_std",
        "best",
    ]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if isinstance(r[k], float) and math.isnan(r[k]) else r[k]) for k in fields})


def gather(sweep_dir: Path, metric: str | None = None) -> tuple[list[dict], str]:
    """Reads every run under ``sweep_dir``, writes sweep_results.{md,csv}; returns (rows, markdown)."""
    if not sweep_dir.is_dir():
        raise UserError(f"--sweep_dir {sweep_dir} is not a directory")
    # A run directory holds run_config.json from its start; metrics.json only once it finished.
    started = {p.parent for p in sweep_dir.rglob("run_config.json")}
    finished = sorted(sweep_dir.rglob("metrics.json"))
    if not finished:
        raise UserError(f"no finished run (metrics.json) under {sweep_dir}; has the sweep run yet?")
    runs = [load_run(p, sweep_dir, metric) for p in finished]
    missing = sorted(started - {r.path for r in runs})
    rows = summarize(runs)
    markdown = to_markdown(rows, missing)
    write_text(sweep_dir / "sweep_results.md", markdown)
    write_csv(rows, sweep_dir / "sweep_results.csv")
    return rows, markdown


@dataclass
class GatherArguments:
    """Flags of launch/gather_sweep.py."""

    sweep_dir: str = field(metadata={"help": "The sweep's SWEEP_DIR (runs below it as <task>/<run>/)."})
    metric: str | None = field(
        default=None, metadata={"help": "Metric to compare (default: each run's metric_for_best_model)."}
    )


def main(args: GatherArguments) -> int:
    _, markdown = gather(Path(args.sweep_dir), args.metric)
    print(markdown, end="")
    return 0


def cli(argv: list[str] | None = None) -> int:
    from ltgbert.arguments import run_entry_point

    return run_entry_point(GatherArguments, main, argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(cli())
