"""The SLURM templates on a real (if small) SLURM cluster: two slurmd nodes on this host.

What is proven, with the real entry points and tiny settings:
- `sbatch --nodes=2 slurm/pretrain.slurm ...` trains with two machine ranks (one per node) in one gloo world,
  finishes, and leaves the final model, checkpoints and TensorBoard logs; it is not requeued.
- `sbatch --nodes=2 slurm/finetune.slurm ...` fine-tunes the result the same way (a SLURM dependency), on one task
  and with the default multi-task run (every demo task in turn, one process group); the pretraining job tokenises
  its corpus once in total (two nodes, one shared cache).
- Preemption: `scancel --signal=USR1 --batch` (what `--signal=B:USR1@T` does before the time limit) makes the
  run checkpoint and exit, the job requeues itself, resumes from the checkpoint and ends at the planned step
  with every step done exactly once.
- A crash after progress (a new checkpoint) is requeued at most MAX_REQUEUES times, then the job fails; a
  failure without progress (bad input) is not requeued at all.
- `slurm/finetune_sweep.slurm` as a job array, and `launch/gather_sweep.py` over its results.
All jobs are submitted up front and run concurrently: the cluster, not the test, orders them.

The cluster fixture tears everything down and checks that no daemon or job process is left.
Needs slurmctld, slurmd and munge (`.ci/install_slurm.sh`, part of README's install). Without them the
module fails with that instruction rather than skipping: a green run must have exercised the cluster.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import random
import re
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slurm_cluster import SlurmCluster, slurm_available  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _require_slurm():
    if not slurm_available():
        pytest.fail("SLURM is not installed: run `bash .ci/install_slurm.sh` (README's install step)", pytrace=False)


REPO = Path(__file__).resolve().parent.parent
# What a CPU-only test cluster needs instead of the templates' GPU-cluster header lines.
OVERRIDES = [
    "--account=ltgtest",
    "--partition=debug",
    "--gpus-per-node=0",
    "--cpus-per-task=1",
    "--mem=500M",
    "--time=1:00:00",
]
PRETRAIN_ARGS = [
    "--config_name",
    "tiny",
    "--max_seq_length",
    "32",
    "--per_device_train_batch_size",
    "4",
    "--logging_steps",
    "1",
    "--report_to",
    "tensorboard",
    "--disable_tqdm",
    "true",
]
PREEMPT_STEPS = 60  # long enough that the test can signal the run in the middle
TIMEOUT = 240


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def cluster():
    cluster = SlurmCluster(num_nodes=2, cpus_per_node=8)
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    yield cluster
    cluster.stop()
    assert not cluster.leftover_processes(), "the SLURM test cluster left processes behind"


def _sentences(rnd: random.Random, n: int) -> list[str]:
    from conftest import WORDS

    return [" ".join(rnd.choices(WORDS, k=rnd.randint(4, 9))) + " ." for _ in range(n)]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """A tiny corpus, a tokenizer for it, and a toy classification task of local files."""
    from conftest import build_tokenizer

    root = tmp_path_factory.mktemp("slurm-data")
    rnd = random.Random(0)
    for name, n in (("corpus.txt", 60), ("corpus_valid.txt", 4)):
        docs = ["\n".join(_sentences(rnd, 5)) for _ in range(n)]
        (root / name).write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    build_tokenizer(root / "tokenizer")
    task = root / "toy"
    task.mkdir()
    for split, n in (("train", 48), ("validation", 16)):
        rows = [{"sentence": s, "label": int("dog" in s.split())} for s in _sentences(rnd, n)]
        (task / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return {
        "root": root,
        "corpus": root / "corpus.txt",
        "valid": root / "corpus_valid.txt",
        "tokenizer": root / "tokenizer",
        "task": task,
    }


@pytest.fixture(scope="module")
def jobs(cluster, data, demo_data, tmp_path_factory) -> dict:
    """Submits every job of this module at once; the tests wait for the ones they check."""
    out = tmp_path_factory.mktemp("slurm-runs")
    logs = out / "logs"
    logs.mkdir()

    def submit(template: str, args: list[str], sbatch: list[str] = (), env: dict | None = None) -> int:
        # No requeue unless a test wants one: a broken run fails at once instead of cycling.
        env = {"MAX_REQUEUES": "0", **(env or {})}
        return cluster.sbatch([*OVERRIDES, f"--output={logs}/%x-%j.out", *sbatch, template, *args], cwd=REPO, env=env)

    data_args = [
        "--train_file",
        str(data["corpus"]),
        "--validation_file",
        str(data["valid"]),
        "--tokenizer_name",
        str(data["tokenizer"]),
    ]
    j = {"out": out, "logs": logs}
    j["pretrain_dir"] = out / "pretrain"
    j["pretrain"] = submit(
        "slurm/pretrain.slurm",
        [
            *PRETRAIN_ARGS,
            *data_args,
            "--max_steps",
            "6",
            "--save_steps",
            "2",
            "--output_dir",
            str(j["pretrain_dir"]),
            "--cache_dir",
            str(out / "pretrain-cache"),
        ],
        ["--nodes=2"],
    )
    j["preempt_dir"] = out / "preempt"
    # ZeRO-2 (multinode.yaml): AdamW, since LAMB is refused under ZeRO.
    j["preempt"] = submit(
        "slurm/pretrain.slurm",
        [
            *PRETRAIN_ARGS,
            *data_args,
            "--max_steps",
            str(PREEMPT_STEPS),
            "--save_steps",
            "1000",
            "--output_dir",
            str(j["preempt_dir"]),
            "--optimizer",
            "adamw",
        ],
        ["--nodes=2", "--job-name=preempt"],
        env={"MAX_REQUEUES": "1", "ACCELERATE_CONFIG": "launch/accelerate/multinode.yaml"},
    )
    finetune_args = [
        "--model_name_or_path",
        str(j["pretrain_dir"] / "final"),
        "--task_name",
        "",
        "--train_file",
        str(data["task"] / "train.jsonl"),
        "--validation_file",
        str(data["task"] / "validation.jsonl"),
        "--max_seq_length",
        "32",
        "--per_device_train_batch_size",
        "4",
        "--max_steps",
        "4",
        "--logging_steps",
        "1",
        "--eval_steps",
        "2",
    ]
    after = [f"--dependency=afterok:{j['pretrain']}"]
    j["finetune_dir"] = out / "finetune"
    j["finetune"] = submit(
        "slurm/finetune.slurm", [*finetune_args, "--output_dir", str(j["finetune_dir"])], ["--nodes=2", *after]
    )
    # The default fine-tuning (every demo task in turn) on two nodes: one process group for all tasks.
    j["multitask_dir"] = out / "multitask"
    j["multitask"] = submit(
        "slurm/finetune.slurm",
        [
            "--model_name_or_path",
            str(j["pretrain_dir"] / "final"),
            "--demo_dir",
            str(demo_data.root),
            "--max_seq_length",
            "32",
            "--per_device_train_batch_size",
            "4",
            "--max_steps",
            "2",
            "--max_train_samples",
            "32",
            "--max_eval_samples",
            "16",
            "--max_predict_samples",
            "8",
            "--logging_steps",
            "1",
            "--output_dir",
            str(j["multitask_dir"]),
        ],
        ["--nodes=2", "--job-name=multitask", *after],
    )
    j["sweep_dir"] = out / "sweep"
    j["sweep"] = submit(
        "slurm/finetune_sweep.slurm",
        ["--max_seq_length", "32", "--per_device_train_batch_size", "4", "--max_steps", "2", "--eval_steps", "2"],
        ["--array=0-3", *after],
        env={
            "TASKS": str(data["task"]),
            "SEEDS": "1 2",
            "LEARNING_RATES": "1e-4 1e-3",
            "MODEL": str(j["pretrain_dir"] / "final"),
            "SWEEP_DIR": str(j["sweep_dir"]),
        },
    )
    # Stand-ins for a run that crashes after making progress (a new checkpoint) and one that fails at once.
    crash = out / "crash.py"
    crash.write_text(
        "import os, sys\n"
        'os.makedirs(f\'{sys.argv[-1]}/checkpoints/step_{os.environ.get("SLURM_RESTART_COUNT", "0")}\')\n'
        "sys.exit(3)\n"
    )
    j["crash"] = submit(
        "slurm/pretrain.slurm",
        ["--output_dir", str(out / "crash")],
        ["--nodes=1", "--job-name=crash"],
        env={"SCRIPT": str(crash), "MAX_REQUEUES": "1"},
    )
    bad = out / "bad.py"
    bad.write_text("import sys\nprint('error: no such corpus', file=sys.stderr)\nsys.exit(2)\n")
    j["bad_input"] = submit(
        "slurm/pretrain.slurm",
        ["--output_dir", str(out / "bad")],
        ["--nodes=1", "--job-name=bad"],
        env={"SCRIPT": str(bad), "MAX_REQUEUES": "5"},
    )
    return j


def log_of(jobs: dict, job_id: int) -> str:
    """The job's SLURM output file(s) (an array: every element's)."""
    paths = list(jobs["logs"].glob(f"*-{job_id}.out")) + list(jobs["logs"].glob(f"*-{job_id}_*.out"))
    return "\n".join(p.read_text(errors="replace") for p in sorted(paths))


def logged_steps(log: str) -> list[int]:
    """The optimizer steps the pretraining script logged, in order (one line per step with --logging_steps 1;
    "step N eval loss ..." lines are evaluations, not steps)."""
    return [int(m) for m in re.findall(r"\bstep (\d+) loss ", log)]


def completed_on_two_nodes(cluster, jobs: dict, name: str) -> str:
    """Wait for the job; assert it completed without a restart, with one launcher per node (machine ranks 0
    and 1 on two different nodes). Returns its log."""
    job = jobs[name]
    info = cluster.wait_finished(job, TIMEOUT)
    log = log_of(jobs, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", log
    ranks = dict(re.findall(r"node (\S+) \(.*\): machine rank (\d) of 2", log))
    assert sorted(ranks.values()) == ["0", "1"] and len(ranks) == 2, log
    return log


def import_gather_sweep():
    """launch/gather_sweep.py as a module (in-process: the test pays for its imports once)."""
    if "gather_sweep" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gather_sweep", REPO / "launch" / "gather_sweep.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["gather_sweep"] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["gather_sweep"]


# ------------------------------------------------------------------------------------------------ tests
def test_preemption_checkpoints_requeues_and_resumes(cluster, jobs):
    job = jobs["preempt"]
    deadline = time.monotonic() + TIMEOUT
    # Signal once training is under way (a few steps logged), as SLURM's --signal=B:USR1@T would.
    while len(logged_steps(log_of(jobs, job))) < 3:
        assert time.monotonic() < deadline, log_of(jobs, job)
        assert cluster.job(job).get("JobState") in ("PENDING", "RUNNING"), log_of(jobs, job)
        time.sleep(0.2)
    cluster.scancel("--signal=USR1", "--batch", str(job))
    info = cluster.wait_state(job, {"PENDING", "REQUEUED", "COMPLETED", "FAILED"}, TIMEOUT)
    assert info["JobState"] != "COMPLETED" or int(info["Restarts"]) == 1, log_of(jobs, job)
    info = cluster.wait_finished(job, TIMEOUT)
    log = log_of(jobs, job)
    assert info["JobState"] == "COMPLETED", f"{info}\n{log}\n{cluster.tail_logs()}"
    assert info["Restarts"] == "1", log
    assert "received SIGUSR1" in log and "requeueing (restart 1" in log, log
    # This job runs DeepSpeed ZeRO-2 across the two nodes with the multi-node preset (launch/accelerate/multinode.yaml).
    assert log.count("world_size=2 distributed_type=DistributedType.DEEPSPEED") == 4, log  # 2 ranks x 2 runs
    runs = log.split("restart 1: ")
    assert len(runs) == 2, log
    first, second = logged_steps(runs[0]), logged_steps(runs[1])
    # The first run stopped early; the second started where the checkpoint left off; no step twice.
    assert first and second and first[-1] < PREEMPT_STEPS, log
    assert first + second == list(range(1, PREEMPT_STEPS + 1)), (first, second)
    checkpoints = sorted(p.name for p in (jobs["preempt_dir"] / "checkpoints").iterdir())
    assert f"step_{first[-1]:08d}" in checkpoints, checkpoints
    assert (jobs["preempt_dir"] / "final" / "config.json").is_file()


def test_pretrain_on_two_nodes(cluster, jobs):
    log = completed_on_two_nodes(cluster, jobs, "pretrain")
    # One world of 2 over gloo.
    assert "2 node(s) x 1 process(es)" in log
    config = json.loads((jobs["pretrain_dir"] / "run_config.json").read_text())
    assert re.search(r"world.size\W+2\b", log) or config.get("world_size") == 2, log
    assert logged_steps(log) == list(range(1, 7)), log
    out = jobs["pretrain_dir"]
    assert (out / "final" / "config.json").is_file() and (out / "final" / "model.safetensors").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir())[-1] == "step_00000006"
    assert list((out / "logs").rglob("events.out.tfevents.*")), "no TensorBoard event file"
    assert "finished (exit 0)" in log and "requeueing" not in log
    # The corpus is tokenised once for the whole job: by the global main process, into the shared --cache_dir;
    # the other node's process reads that cache.
    assert len(re.findall(r"rank \d: tokenised the training corpus", log)) == 1, log
    assert len(re.findall(r"rank \d: read the cached training corpus", log)) == 1, log


def test_default_multi_task_finetuning_on_two_nodes(cluster, jobs):
    completed_on_two_nodes(cluster, jobs, "multitask")
    sys.path.insert(0, str(REPO / "launch"))
    from finetune import demo_task_names

    for task in demo_task_names():
        metrics = json.loads((jobs["multitask_dir"] / task / "metrics.json").read_text())
        assert metrics["world_size"] == 2 and metrics["data_check"]["rows_on_several_ranks"] == 0, (task, metrics)
        assert metrics["steps"] == 2 and (jobs["multitask_dir"] / task / "best" / "config.json").is_file()


def test_finetune_on_two_nodes(cluster, jobs):
    completed_on_two_nodes(cluster, jobs, "finetune")
    metrics = json.loads((jobs["finetune_dir"] / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and "MULTI_CPU" in metrics["distributed_type"], metrics
    assert metrics["data_check"]["rows_on_several_ranks"] == 0, metrics
    assert (jobs["finetune_dir"] / "best" / "config.json").is_file()
    assert list((jobs["finetune_dir"] / "logs").rglob("events.out.tfevents.*")), "no TensorBoard event file"


def test_crash_is_requeued_at_most_max_requeues_times(cluster, jobs):
    job = jobs["crash"]
    info = cluster.wait_finished(job, TIMEOUT)
    log = log_of(jobs, job)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "1", (info, log)
    assert "requeueing (restart 1 of at most 1)" in log and "giving up" in log, log
    # A failure that made no progress (bad input, a crash before any checkpoint) is not requeued at all.
    info = cluster.wait_finished(jobs["bad_input"], TIMEOUT)
    log = log_of(jobs, jobs["bad_input"])
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", (info, log)
    assert "without a new checkpoint" in log and "requeueing" not in log, log


def test_sweep_array_and_gathered_table(cluster, jobs, capsys):
    elements = cluster.wait_array(jobs["sweep"], TIMEOUT)
    logs = log_of(jobs, jobs["sweep"])
    assert len(elements) == 4 and all(e["JobState"] == "COMPLETED" for e in elements), logs
    runs = sorted(p.parent.relative_to(jobs["sweep_dir"]).as_posix() for p in jobs["sweep_dir"].rglob("metrics.json"))
    assert runs == ["toy/lr1e-3-seed1", "toy/lr1e-3-seed2", "toy/lr1e-4-seed1", "toy/lr1e-4-seed2"], runs
    gather_sweep = import_gather_sweep()
    assert gather_sweep.cli(["--sweep_dir", str(jobs["sweep_dir"])]) == 0
    printed = capsys.readouterr().out
    assert "| toy | 0.001 |" in printed and "Best learning rate per task" in printed, printed
    rows = list(csv.DictReader(open(jobs["sweep_dir"] / "sweep_results.csv")))
    assert [(r["task"], float(r["learning_rate"]), r["num_seeds"]) for r in rows] == [
        ("toy", 1e-4, "2"),
        ("toy", 1e-3, "2"),
    ]
    assert sum(r["best"] == "True" for r in rows) == 1


def test_gather_sweep_statistics(tmp_path):
    """gather_sweep on hand-written results: mean, sample std over seeds, best lr (higher or lower is better)."""
    gather = import_gather_sweep().gather

    scores = {
        ("cls", "1e-4"): [0.5, 0.7],
        ("cls", "1e-3"): [0.8, 0.9],
        ("reg", "1e-4"): [0.3, 0.5],
        ("reg", "1e-3"): [0.1, 0.2],
        ("pos", "1e-4"): [0.6, 0.65],  # a token-classification task: entity F1 from metrics.json like any other
        ("pos", "1e-3"): [0.9, 0.95],
    }
    for (task, lr), values in scores.items():
        for seed, value in enumerate(values, start=1):
            run = tmp_path / task / f"lr{lr}-seed{seed}"
            run.mkdir(parents=True)
            metric = {"cls": "accuracy", "reg": "loss", "pos": "f1"}[task]
            (run / "run_config.json").write_text(json.dumps({"learning_rate": float(lr), "seed": seed}))
            (run / "metrics.json").write_text(
                json.dumps(
                    {
                        "task": "custom",
                        "metric_for_best_model": metric,
                        "eval": {"step": 4, metric: value},
                        "test": {metric: value - 0.1},
                    }
                )
            )
    (tmp_path / "cls" / "lr1e-2-seed1").mkdir()
    (tmp_path / "cls" / "lr1e-2-seed1" / "run_config.json").write_text("{}")  # still running
    rows, markdown = gather(tmp_path)
    by_key = {(r["task"], r["learning_rate"]): r for r in rows}
    assert by_key[("cls", 1e-3)]["eval_mean"] == pytest.approx(0.85)
    assert by_key[("cls", 1e-3)]["eval_std"] == pytest.approx(0.0707107, rel=1e-5)
    assert by_key[("cls", 1e-3)]["test_mean"] == pytest.approx(0.75)
    assert [k for k, r in by_key.items() if r["best"]] == [("cls", 1e-3), ("pos", 1e-3), ("reg", 1e-3)]
    assert by_key[("pos", 1e-3)]["metric"] == "f1" and by_key[("pos", 1e-3)]["eval_mean"] == pytest.approx(0.925)
    assert "Unfinished runs (no metrics.json): 1" in markdown
    assert (tmp_path / "sweep_results.md").read_text() == markdown
    assert len(list(csv.DictReader(open(tmp_path / "sweep_results.csv")))) == 6
