"""launch/pretrain.py end to end: distributed runs, exact and elastic resume, faults, bad input, real corpora.

Distributed runs go through `accelerate launch` on 2 CPU processes over gloo, and prove they were really
distributed: the run records a world size of 2, the two ranks train on different rows (recorded with the hidden
--debug_record_rows), and the per-step loss equals the single-process run with the same global batch. Runs read
what the script wrote (metrics.jsonl, run_config.json, checkpoints), not its stdout.
"""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from pretrain_utils import (
    PRETRAIN,
    ROOT,
    accelerate_cmd,
    env,
    final_weights,
    logged,
    logged_losses,
    rows_by_rank,
    rows_by_step,
    run,
    run_config,
    tiny_args,
)

sys.path.insert(0, str(ROOT / "launch"))
import pretrain  # noqa: E402

from ltgbert.errors import UserError  # noqa: E402


@pytest.fixture(scope="session")
def corpus(demo_data):
    return demo_data  # the session's demo corpus (tests/conftest.py)


@pytest.fixture(scope="session")
def tokenizer_dir(corpus, tmp_path_factory):
    from ltgbert.tokenization import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer([corpus.corpus_train], vocab_size=600, output_dir=out)
    return out


@pytest.fixture(scope="session")
def no_dropout_config(tmp_path_factory):
    """The tiny preset without dropout: runs with different world sizes draw dropout masks differently,
    so only without it can their losses be compared step by step."""
    from ltgbert import LtgBertConfig

    out = tmp_path_factory.mktemp("config")
    LtgBertConfig.from_preset(
        "tiny", vocab_size=600, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    ).save_pretrained(out)
    return str(out)


def base_args(corpus, tokenizer_dir, out, config, **overrides):
    """The distributed table's settings: a global batch of 16 rows, checkpoints every 3 steps, eval at 3 and 6,
    AdamW (LAMB is refused under ZeRO, which hands it flat partitions instead of tensors)."""
    values = dict(
        save_steps=3, eval_steps=3, config_name=config, debug_record_rows=True, optimizer="adamw", learning_rate=2e-3
    )
    values.update(overrides)
    return tiny_args(corpus, tokenizer_dir, out, **values)


@pytest.fixture(scope="session")
def reference_run(corpus, tokenizer_dir, no_dropout_config, tmp_path_factory):
    """Single process, global batch 16: the run every distributed configuration must reproduce."""
    out = tmp_path_factory.mktemp("single")
    run(
        [sys.executable, str(PRETRAIN)]
        + base_args(corpus, tokenizer_dir, out, no_dropout_config, per_device_train_batch_size=16)
    )
    return out


# ----------------------------------------------------------------------------- distributed table

# DDP runs with --torch_compile (every encoder layer compiled; AOTAutograd without code generation, which
# traces what inductor compiles): the compiled layers must reproduce the single-process eager run on 2 ranks.
# Inductor itself is run by tests/test_model_perf.py.
COMPILED = {"ddp.yaml": {"torch_compile": True, "torch_compile_backend": "aot_eager"}}

DISTRIBUTED = [
    ("ddp.yaml", "DistributedType.MULTI_CPU"),
    ("zero1.yaml", "DistributedType.DEEPSPEED"),
    ("zero2.yaml", "DistributedType.DEEPSPEED"),
    ("zero3.yaml", "DistributedType.DEEPSPEED"),
    ("zero3_offload.yaml", "DistributedType.DEEPSPEED"),
]


@pytest.fixture(scope="session")
def distributed_runs(corpus, tokenizer_dir, no_dropout_config, tmp_path_factory):
    """Runs a preset on 2 processes once per session (the resume tests reuse the DDP and ZeRO-2 runs)."""
    done = {}

    def get(preset):
        if preset not in done:
            out = tmp_path_factory.mktemp(preset.replace(".yaml", ""))
            run(
                accelerate_cmd(2, preset)
                + base_args(corpus, tokenizer_dir, out, no_dropout_config, **COMPILED.get(preset, {}))
            )
            done[preset] = out
        return done[preset]

    return get


def assert_ranks_saw_different_rows(out, steps):
    by_rank = rows_by_rank(out)
    assert sorted(by_rank) == [0, 1]
    rows = [{r for _, micro in by_rank[rank] for batch in micro for r in batch} for rank in (0, 1)]
    assert len(rows[0]) == len(rows[1]) == 8 * steps and not rows[0] & rows[1]


@pytest.mark.parametrize("preset, distributed_type", DISTRIBUTED)
def test_two_processes_match_single_process(preset, distributed_type, distributed_runs, reference_run, tmp_path):
    out = distributed_runs(preset)
    config = run_config(out)
    assert config["world_size"] == 2 and config["distributed_type"] == distributed_type
    assert config["torch_compile"] == (preset in COMPILED)
    assert_ranks_saw_different_rows(out, 6)
    assert rows_by_step(out) == rows_by_step(reference_run)  # the same 16 rows in every step
    losses, ref_losses = logged_losses(out), logged_losses(reference_run)
    assert sorted(losses) == sorted(ref_losses) == list(range(1, 7))
    # Same initial weights, same global batch: step 1 agrees to float rounding. Later steps differ slightly
    # because DDP averages per-rank mean losses where one process averages over all masked tokens.
    assert losses[1] == pytest.approx(ref_losses[1], rel=1e-4)
    for step in range(2, 7):
        assert losses[step] == pytest.approx(ref_losses[step], rel=2e-2), (step, losses, ref_losses)
    # Evaluation scores every validation block once whatever the world size: the same masked tokens.
    tokens, ref_tokens = logged(out, "eval/masked_tokens"), logged(reference_run, "eval/masked_tokens")
    assert tokens == ref_tokens and sorted(tokens) == [3, 6]
    for step, loss in logged(out, "eval/loss").items():
        assert loss == pytest.approx(logged(reference_run, "eval/loss")[step], rel=2e-2)
    # The released model is a plain Hugging Face directory with consolidated weights (ZeRO-3 gathered).
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(out / "final")
    reference = final_weights(reference_run)
    for name, tensor in final_weights(out).items():
        assert tensor.shape == reference[name].shape
        torch.testing.assert_close(tensor, reference[name], atol=5e-2, rtol=0, msg=name)
    assert type(model).__name__ == "LtgBertForMaskedLM"
    if preset == "zero3.yaml":  # the ZeRO-3 export reproduces the weights held in the last checkpoint's shards
        from export import cli

        assert (
            cli(
                ["--checkpoint", str(out / "checkpoints" / "step_00000006"), "--output_dir", str(tmp_path / "exported")]
            )
            == 0
        )
        from safetensors.torch import load_file

        again = load_file(tmp_path / "exported" / "model.safetensors")
        for name, tensor in final_weights(out).items():
            torch.testing.assert_close(again[name], tensor, atol=1e-6, rtol=0, msg=name)


def test_peak_flops_is_measured_without_touching_the_global_rng():
    """The CPU peak behind the logged MFU: a finite matmul rate from a private generator (drawing from the
    global one would shift dropout after a resume)."""
    from ltgbert.flops import peak_flops

    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    peak = peak_flops(torch.device("cpu"))
    assert 1e8 < peak < 1e14 and torch.equal(torch.rand(3), expected)


def test_compile_with_zero3_is_refused():
    """The check main() runs right after building the accelerator, against accelerate's own plugin objects."""
    from accelerate.utils import DeepSpeedPlugin

    zero3 = DeepSpeedPlugin(hf_ds_config=str(ROOT / "ds_configs" / "zero3.json"))
    with pytest.raises(UserError, match="ZeRO stage 3") as error:
        pretrain.check_compile_supported(True, zero3)
    assert "\n" not in str(error.value)
    pretrain.check_compile_supported(False, zero3)
    pretrain.check_compile_supported(True, DeepSpeedPlugin(hf_ds_config=str(ROOT / "ds_configs" / "zero2.json")))
    pretrain.check_compile_supported(True, None)  # DDP or one process


@pytest.mark.parametrize("preset", ["ddp.yaml", "zero2.yaml"])
def test_bf16_and_a_non_finite_step_on_two_processes(preset, corpus, tokenizer_dir, tmp_path):
    """bf16 through DDP and ZeRO-2 (the "bf16" section of ds_configs/ runs), and a NaN loss on rank 0 only at
    step 2: every rank skips that step (the run does not hang, the weights stay finite)."""
    out = tmp_path / "run"
    optimizer = "lamb" if preset == "ddp.yaml" else "adamw"  # LAMB is refused under ZeRO
    run(
        accelerate_cmd(2, preset)
        + tiny_args(
            corpus,
            tokenizer_dir,
            out,
            max_steps=4,
            debug_nan_at_step=2,
            mixed_precision="bf16",
            debug_record_rows=True,
            optimizer=optimizer,
        ),
        timeout=300,
    )
    config = run_config(out)
    assert config["world_size"] == 2 and config["mixed_precision"] == "bf16"
    assert_ranks_saw_different_rows(out, 4)
    assert all(torch.isfinite(t).all() for t in final_weights(out).values())
    skipped = logged(out, "train/skipped_steps")
    assert skipped[1] == 0 and skipped[2] == skipped[4] == 1
    assert all(torch.isfinite(torch.tensor(v)) for v in logged_losses(out).values())


# ----------------------------------------------------------------------------- resume and faults


def _wait_for(proc, ready, timeout=120):
    """Waits until ``ready()`` or the process ends; returns whether it became ready."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if ready():
            return True
        time.sleep(0.05)
    return ready()


def _start(args):
    return subprocess.Popen(
        [sys.executable, str(PRETRAIN)] + args,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env=env(),
    )


def _assert_same_weights(a, b):
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def test_sigterm_checkpoints_and_resume_is_bitwise_exact(
    corpus, tokenizer_dir, reference_run, no_dropout_config, tmp_path
):
    out = tmp_path / "run"
    args = base_args(corpus, tokenizer_dir, out, no_dropout_config, per_device_train_batch_size=16)
    proc = _start(args)
    assert _wait_for(proc, lambda: 2 in logged_losses(out)), proc.communicate()[0]
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == pretrain.EXIT_PREEMPTED, rest
    stopped = json.loads(next((out / "checkpoints").glob("step_*/trainer_state.json")).read_text())["step"]
    assert 2 <= stopped < 6 and not (out / "final").exists()
    run([sys.executable, str(PRETRAIN)] + args + ["--resume_from_checkpoint", "latest"])
    losses = logged_losses(out)
    assert sorted(losses) == list(range(1, 7))  # metrics.jsonl holds every step once
    assert losses == logged_losses(reference_run)
    assert rows_by_step(out) == rows_by_step(reference_run)
    _assert_same_weights(out, reference_run)


def test_kill_9_and_a_half_written_checkpoint(corpus, tokenizer_dir, reference_run, no_dropout_config, tmp_path):
    """kill -9 after step 4 (checkpoint at 3), with a word milestone written at step 4: the resumed run redoes
    steps 4-6 exactly, and the milestone directory of the killed run is kept, not written a second time."""
    out = tmp_path / "run"
    milestone = logged(reference_run, "train/words_seen")[4]  # crossed exactly at step 4
    args = base_args(
        corpus, tokenizer_dir, out, no_dropout_config, per_device_train_batch_size=16, save_at_words=str(milestone)
    )
    written = out / "checkpoints" / f"chck_{milestone / 1e6:g}M"
    proc = _start(args)
    assert _wait_for(proc, lambda: (written / "config.json").exists())
    proc.kill()
    proc.wait()
    assert (out / "checkpoints" / "step_00000003").exists()
    mtime = (written / "model.safetensors").stat().st_mtime_ns
    # A checkpoint being written when the process died: a temporary directory with part of the files.
    partial = out / "checkpoints" / ".tmp-step_00000005"
    shutil.copytree(out / "checkpoints" / "step_00000003", partial)
    (partial / "trainer_state.json").unlink(missing_ok=True)
    resumed = run([sys.executable, str(PRETRAIN)] + args + ["--resume_from_checkpoint", "latest"])
    assert "resumed from" in resumed.stdout and "step_00000003" in resumed.stdout
    # The lines the killed run logged after its checkpoint are replaced by the resumed run's.
    assert logged_losses(out) == logged_losses(reference_run)
    _assert_same_weights(out, reference_run)
    assert (written / "model.safetensors").stat().st_mtime_ns == mtime
    state = json.loads((out / "checkpoints" / "step_00000006" / "trainer_state.json").read_text())
    assert state["milestones_written"] == [milestone]


def _resume_elsewhere(source, step, tmp_path):
    """A copy of ``source``'s checkpoint at ``step`` in a fresh output directory (as on another allocation)."""
    target = tmp_path / "resumed"
    name = f"step_{step:08d}"
    shutil.copytree(source / "checkpoints" / name, target / "checkpoints" / name)
    return target


def assert_continues(resumed, straight, step):
    """The resumed run trained exactly the rows of the uninterrupted run after ``step``: none repeated or
    skipped, the same global batch of 16."""
    rows, expected = rows_by_step(resumed), rows_by_step(straight)
    assert sorted(rows) == list(range(step + 1, 7))
    assert all(rows[s] == expected[s] and len(rows[s]) == 16 for s in rows)
    config = run_config(resumed)
    assert config["global_batch_size"] == 16
    # The first loss after the resume is computed from the restored weights: equal to float rounding. Later
    # steps differ as a 1- and a 2-process run do (a mean of per-rank means against one mean over all tokens).
    losses, reference = logged_losses(resumed), logged_losses(straight)
    assert losses[step + 1] == pytest.approx(reference[step + 1], rel=1e-5)
    for s in range(step + 2, 7):
        assert losses[s] == pytest.approx(reference[s], rel=2e-2)
    a, b = final_weights(straight), final_weights(resumed)
    for name in a:  # an update is about the learning rate (2e-3) per weight: the steps after the resume agree
        torch.testing.assert_close(b[name], a[name], atol=1e-3, rtol=0, msg=name)


def test_elastic_resume_ddp_two_to_one_and_one_to_two(
    corpus, tokenizer_dir, reference_run, distributed_runs, no_dropout_config, tmp_path, capsys
):
    # 2 -> 1: the checkpoint of the 2-process DDP run continues on one process; accumulation 1 -> 2 keeps 16.
    two = distributed_runs("ddp.yaml")
    resumed = _resume_elsewhere(two, 3, tmp_path / "a")
    run(
        [sys.executable, str(PRETRAIN)]
        + base_args(corpus, tokenizer_dir, resumed, no_dropout_config, resume_from_checkpoint="latest")
    )
    assert run_config(resumed)["gradient_accumulation_steps"] == 2 and run_config(resumed)["world_size"] == 1
    assert_continues(resumed, two, 3)
    # 1 -> 2: the single-process checkpoint (16 rows per device) continues on 2 processes with 8 rows each.
    resumed = _resume_elsewhere(reference_run, 3, tmp_path / "b")
    too_big = run(
        accelerate_cmd(2, "ddp.yaml")
        + base_args(
            corpus,
            tokenizer_dir,
            resumed,
            no_dropout_config,
            resume_from_checkpoint="latest",
            per_device_train_batch_size=24,
        ),
        check=False,
    )
    assert too_big.returncode != 0 and "global batch of 16" in too_big.stderr
    run(
        accelerate_cmd(2, "ddp.yaml")
        + base_args(corpus, tokenizer_dir, resumed, no_dropout_config, resume_from_checkpoint="latest")
    )
    assert run_config(resumed)["world_size"] == 2
    assert_continues(resumed, reference_run, 3)
    assert set(rows_by_rank(resumed)) == {0, 1}


def test_elastic_resume_zero2_two_to_one_and_one_to_two_with_offload(
    corpus, tokenizer_dir, distributed_runs, no_dropout_config, tmp_path
):
    # 2 -> 1: the ZeRO-2 run's shards re-partitioned for one process.
    two = distributed_runs("zero2.yaml")
    resumed = _resume_elsewhere(two, 3, tmp_path / "a")
    run(
        accelerate_cmd(1, "zero2.yaml")
        + base_args(corpus, tokenizer_dir, resumed, no_dropout_config, resume_from_checkpoint="latest")
    )
    assert run_config(resumed)["world_size"] == 1
    assert_continues(resumed, two, 3)
    # 1 -> 2, onto the CPU-offload preset: the one-process run's shards spread over two.
    one = tmp_path / "one"
    run(
        accelerate_cmd(1, "zero2.yaml")
        + base_args(corpus, tokenizer_dir, one, no_dropout_config, per_device_train_batch_size=16)
    )
    resumed = _resume_elsewhere(one, 3, tmp_path / "b")
    run(
        accelerate_cmd(2, "zero2_offload.yaml")
        + base_args(corpus, tokenizer_dir, resumed, no_dropout_config, resume_from_checkpoint="latest")
    )
    assert run_config(resumed)["world_size"] == 2
    assert_continues(resumed, one, 3)


def test_dataloader_workers_do_not_change_batches(corpus, tokenizer_dir, reference_run, no_dropout_config, tmp_path):
    out = tmp_path / "run"
    run(
        [sys.executable, str(PRETRAIN)]
        + base_args(
            corpus, tokenizer_dir, out, no_dropout_config, per_device_train_batch_size=16, dataloader_num_workers=2
        )
    )
    assert run_config(out)["dataloader_num_workers"] == 2
    assert rows_by_step(out) == rows_by_step(reference_run)
    assert logged_losses(out) == logged_losses(reference_run)  # the same masks: bit for bit
    _assert_same_weights(out, reference_run)


# ----------------------------------------------------------------------------- the default run and monitoring


def read_scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for events in Path(log_dir).rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            values.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
    return values


def test_default_run_end_to_end(tmp_path):
    """The no-argument run (demo data generated here, tokenizer trained here), shortened."""
    demo = tmp_path / "demo"
    out = tmp_path / "out"
    result = subprocess.run(
        accelerate_cmd(1, "single.yaml")
        + [
            "--output_dir",
            str(out),
            "--max_steps",
            "40",
            "--demo_num_words",
            "60000",
            "--eval_steps",
            "20",
            "--logging_steps",
            "10",
            "--config_name",
            "tiny",
            "--blimp_max_pairs_per_uid",
            "10",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env(LTGBERT_DEMO_DIR=str(demo)),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    losses = logged_losses(out)
    assert losses[40] < 0.85 * losses[10]  # shortened run; the full default run is measured in the notes
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    model = AutoModelForMaskedLM.from_pretrained(out / "final")
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    assert model.config.vocab_size >= len(tokenizer)
    scalars = read_scalars(out / "logs")
    for tag in [
        "train/loss",
        "train/mlm_accuracy",
        "train/learning_rate",
        "train/grad_norm",
        "train/tokens_per_second",
        "train/samples_per_second",
        "train/step_time",
        "train/mfu",
        "train/seq_len",
        "train/mask_ratio",
        "train/skipped_steps",
        "train/words_seen",
        "eval/loss",
        "eval/accuracy",
        "blimp/overall",
    ]:
        assert tag in scalars, tag
    assert scalars["train/loss"][-1] < scalars["train/loss"][0]
    words = logged(out, "train/words_seen")
    assert 0 < words[10] < words[20] < words[40]
    resolved = run_config(out)
    assert resolved["max_steps"] == 40 and resolved["world_size"] == 1
    state = json.loads(next((out / "checkpoints").glob("step_*/trainer_state.json")).read_text())
    assert state["config"]["max_steps"] == 40  # every checkpoint carries the resolved config
    assert state["words_seen"] == words[40] and state["fingerprint"]["tokenizer"]


def test_demo_preset_is_the_default():
    defaults = pretrain.PretrainArguments()
    for key, value in yaml.safe_load((ROOT / "launch" / "configs" / "demo.yaml").read_text()).items():
        assert getattr(defaults, key) == value, key


def test_base_preset_phase_switch_lamb_and_mask_schedule_in_workers(corpus, tokenizer_dir, tmp_path):
    """base.yaml (the published recipe) with tiny sizes: LAMB, 32 -> long sequences with a quarter batch, the
    mask-ratio schedule applied by the collator in 2 DataLoader workers."""
    out = tmp_path / "run"
    run(
        [sys.executable, str(PRETRAIN), "--config", str(ROOT / "launch" / "configs" / "base.yaml")]
        + tiny_args(
            corpus,
            tokenizer_dir,
            out,
            max_steps=10,
            long_seq_length=64,
            long_seq_ratio=0.2,
            gradient_accumulation_steps=2,
            eval_steps=0,
            mlm_probability_start=0.3,
            learning_rate=None,
            dataloader_num_workers=2,
        )
    )
    config = run_config(out)
    assert config["optimizer"] == "lamb" and config["learning_rate"] == 1e-2 and config["max_grad_norm"] == 2.0
    seq_len = logged(out, "train/seq_len")
    assert [seq_len[s] for s in range(1, 9)] == [32] * 8 and max(seq_len[9], seq_len[10]) > 32
    ratios = [logged(out, "train/mask_ratio")[s] for s in range(1, 11)]
    assert ratios[0] == pytest.approx(0.3) and ratios[-1] < 0.17 and ratios == sorted(ratios, reverse=True)
    # What the workers masked follows the schedule: the masked share of step 1 is about twice that of step 10.
    masked = logged(out, "train/masked_share")
    assert masked[1] > 1.5 * masked[10]
    assert sorted(logged_losses(out)) == list(range(1, 11))


# ----------------------------------------------------------------------------- real corpora


def _babylm_corpus(root: Path, corpus) -> Path:
    """BabyLM's layout: one utterance per line, no blank lines, files named by source, CRLF in one of them."""
    lines = [line for line in corpus.corpus_train.read_text().splitlines() if line.strip()]
    train = root / "train_10M"
    train.mkdir(parents=True)
    for i, name in enumerate(["childes", "bnc_spoken", "switchboard"]):
        text = "\n".join(lines[i * 1500 : (i + 1) * 1500]) + "\n"
        newline = "\r\n" if name == "switchboard" else "\n"
        (train / f"{name}.train").write_bytes(text.replace("\n", newline).encode())
    dev = root / "dev"
    dev.mkdir()
    (dev / "childes.dev").write_text("\n".join(lines[4500:4700]) + "\n")
    return train


def test_babylm_layout_word_milestones_sigterm_resume_and_word_budget(corpus, tokenizer_dir, tmp_path):
    train = _babylm_corpus(tmp_path / "babylm", corpus)
    out = tmp_path / "run"
    args = tiny_args(
        corpus,
        tokenizer_dir,
        out,
        train_file=train,
        validation_file=str(tmp_path / "babylm/dev/*.dev"),
        max_steps=-1,
        num_train_epochs=-1,
        max_words=9000,
        save_at_words="2K,4K,6K,8K",
        save_steps=4,
        eval_steps=0,
        max_seq_length=32,
    )
    proc = _start(args)
    assert _wait_for(proc, lambda: (out / "checkpoints" / "chck_0.004M" / "config.json").exists()), proc.communicate()[
        0
    ]
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == pretrain.EXIT_PREEMPTED, log
    # Each file's layout is detected and reported: one utterance per line, grouped into documents.
    for name in ("childes", "bnc_spoken", "switchboard"):
        assert any(name in line and "line" in line for line in log.splitlines() if line.startswith("corpus file"))
    first = {p.name: p.stat().st_mtime_ns for p in (out / "checkpoints").glob("chck_*")}
    run([sys.executable, str(PRETRAIN)] + args + ["--resume_from_checkpoint", "latest"])
    words = logged(out, "train/words_seen")
    steps = sorted(words)
    assert steps == list(range(1, len(steps) + 1))  # every step once across the two runs
    # The word budget: the run stops at the first step that reaches it.
    assert words[steps[-1]] >= 9000 > words[steps[-2]]
    milestones = {p.name: p for p in (out / "checkpoints").glob("chck_*")}
    assert sorted(milestones) == ["chck_0.002M", "chck_0.004M", "chck_0.006M", "chck_0.008M"]
    for name, mtime in first.items():  # written once: not again by the resumed run
        assert milestones[name].stat().st_mtime_ns == mtime
    from transformers import AutoModelForMaskedLM

    for path in milestones.values():
        assert {"config.json", "model.safetensors", "tokenizer.json", "modeling_ltgbert.py"} <= {
            p.name for p in path.iterdir()
        }
        AutoModelForMaskedLM.from_pretrained(path)
    # Each milestone is written at the first step whose words reach it, once, across the SIGTERM and resume.
    written = logged(out, "milestone/words")
    assert sorted(written.values()) == [2000, 4000, 6000, 8000]
    for step, count in written.items():
        assert words[step] >= count and (step == 1 or words[step - 1] < count)
    state = json.loads((out / "checkpoints" / f"step_{steps[-1]:08d}" / "trainer_state.json").read_text())
    assert state["milestones_written"] == [2000, 4000, 6000, 8000] and state["words_seen"] == words[steps[-1]]
    # Validation comes from the .dev file: held-out documents, not a whole training source.
    assert logged(out, "eval/masked_tokens")[steps[-1]] > 0


def test_overwrite_moves_the_old_run_aside_and_a_foreign_checkpoint_is_refused(corpus, tokenizer_dir, tmp_path, capsys):
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    lines = corpus.corpus_train.read_text().splitlines()
    first.write_text("\n".join(lines[:3000]) + "\n")
    second.write_text("\n".join(line.replace("dog", "zebra") for line in lines[:3000]) + "\n")
    out = tmp_path / "run"
    common = dict(
        tokenizer_name=None, vocab_size=1000, max_steps=2, save_steps=1, validation_file=None, config_name="tiny"
    )
    run([sys.executable, str(PRETRAIN)] + tiny_args(corpus, tokenizer_dir, out, train_file=first, **common))
    old = {p.relative_to(out): p.read_bytes() for p in (out / "tokenizer").iterdir()}
    run(
        [sys.executable, str(PRETRAIN)]
        + tiny_args(corpus, tokenizer_dir, out, train_file=second, overwrite_output_dir=True, **common)
    )
    backups = list(out.glob("backup-*"))
    assert len(backups) == 1 and (backups[0] / "checkpoints" / "step_00000002").is_dir()
    assert {p: (backups[0] / p).read_bytes() for p in old} == old  # kept as it was
    # Run B trained its own tokenizer on its own corpus (it did not pick up run A's): "zebra" is in its words.
    new = (out / "tokenizer" / "tokenizer.json").read_bytes()
    assert new != old[Path("tokenizer/tokenizer.json")]
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out / "tokenizer").tokenize("zebra") == ["zebra"]
    assert AutoTokenizer.from_pretrained(backups[0] / "tokenizer").tokenize("zebra") != ["zebra"]
    # Run A's checkpoint with run B's corpus and tokenizer: refused, nothing written.
    before = sorted(p for p in out.rglob("*"))
    err = _cli_error(
        tiny_args(
            corpus,
            tokenizer_dir,
            out,
            train_file=second,
            resume_from_checkpoint=str(backups[0] / "checkpoints" / "step_00000002"),
            tokenizer_name=str(out / "tokenizer"),
            **{k: v for k, v in common.items() if k != "tokenizer_name"},
        ),
        capsys,
    )
    assert "belongs to another run" in err
    assert sorted(p for p in out.rglob("*")) == before
    assert "pass one of them" in _cli_error(
        tiny_args(corpus, tokenizer_dir, out, overwrite_output_dir=True, resume_from_checkpoint="latest"), capsys
    )


# ----------------------------------------------------------------------------- bad input


def _cli_error(argv, capsys):
    code = pretrain.cli(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    return err


def test_bad_input_gives_one_line_errors(corpus, tokenizer_dir, tmp_path, capsys):
    base = tiny_args(corpus, tokenizer_dir, tmp_path / "a")
    assert "missing.txt" in _cli_error(base + ["--train_file", str(tmp_path / "missing.txt")], capsys)
    assert "unknown LTG-BERT size preset" in _cli_error(base + ["--config_name", "huge"], capsys)
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rat: 0.1\n")
    assert "learning_rate" in _cli_error(base + ["--config", str(bad)], capsys)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "not writable" in _cli_error(tiny_args(corpus, tokenizer_dir, blocker / "sub"), capsys)
    assert "--logging_steps must be at least 1" in _cli_error(base + ["--logging_steps", "0"], capsys)
    assert "--save_at_words" in _cli_error(base + ["--save_at_words", "1M,lots"], capsys)
    assert "invalid int value" in _cli_error(base + ["--max_steps", "many"], capsys)


def test_used_output_dir_and_foreign_checkpoint_are_refused(corpus, tokenizer_dir, reference_run, tmp_path, capsys):
    used = tmp_path / "used"
    shutil.copytree(reference_run, used)
    before = {p: p.stat().st_mtime_ns for p in used.rglob("*") if p.is_file()}
    assert "already holds a run" in _cli_error(tiny_args(corpus, tokenizer_dir, used), capsys)
    err = _cli_error(
        tiny_args(corpus, tokenizer_dir, used, config_name="demo", resume_from_checkpoint="latest"), capsys
    )
    assert "checkpoint" in err and "hidden_size" in err
    assert before == {p: p.stat().st_mtime_ns for p in used.rglob("*") if p.is_file()}  # nothing overwritten


# ----------------------------------------------------------------------------- options


def test_continued_pretraining_with_options(corpus, tokenizer_dir, reference_run, tmp_path):
    """--model_name_or_path, adamw + linear schedule, word masking, eager attention, gradient checkpointing,
    rotation, BLiMP during training."""
    out = tmp_path / "run"
    run(
        [sys.executable, str(PRETRAIN)]
        + tiny_args(
            corpus,
            tokenizer_dir,
            out,
            model_name_or_path=reference_run / "final",
            tokenizer_name=None,
            config_name=None,
            optimizer="adamw",
            lr_scheduler_type="linear",
            masking="word",
            attn_implementation="eager",
            gradient_checkpointing=True,
            max_steps=4,
            save_steps=2,
            save_total_limit=1,
            blimp_dir=corpus.blimp_dir,
            blimp_eval_steps=2,
            blimp_max_pairs_per_uid=5,
            report_to="tensorboard",
            max_span_length=3,
        )
    )
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000004"]
    scalars = read_scalars(out / "logs")
    assert len(scalars["blimp/overall"]) == 2 and 0 <= scalars["blimp/overall"][0] <= 1
    lrs = scalars["train/learning_rate"]
    assert lrs == sorted(lrs, reverse=True)  # linear decay
    config = run_config(out)
    assert config["model_config"]["hidden_size"] == 64 and config["optimizer"] == "adamw"
    assert config["gradient_checkpointing"] and config["attn_implementation"] == "eager"


def test_continued_pretraining_from_a_published_hplt_directory(corpus, tokenizer_dir, tmp_path):
    """An HPLT-layout directory (published key names, pytorch_model.bin, config.json without model_type): our
    classes load it without running its code, and training continues from its weights."""
    from hplt_layout import code_ran, make_hplt_checkpoint
    from transformers import AutoTokenizer

    hplt, source = make_hplt_checkpoint(
        tmp_path / "hplt",
        AutoTokenizer.from_pretrained(tokenizer_dir),
        max_position_embeddings=512,
        position_bucket_size=32,
    )
    out = tmp_path / "run"
    run(
        [sys.executable, str(PRETRAIN)]
        + tiny_args(
            corpus,
            tokenizer_dir,
            out,
            model_name_or_path=hplt,
            tokenizer_name=None,
            config_name=None,
            max_steps=2,
            learning_rate=1e-9,
            mixed_precision="bf16",
        )
    )
    config = run_config(out)
    assert config["model_config"]["hidden_size"] == 64 and config["mixed_precision"] == "bf16"  # bf16 on 1 process
    trained = final_weights(out)
    reference = source.state_dict()
    torch.testing.assert_close(
        trained["ltgbert.embeddings.word_embeddings.weight"],
        reference["ltgbert.embeddings.word_embeddings.weight"],
        atol=1e-6,
        rtol=0,
    )
    # launch/export.py rewrites the published directory in our layout (no code of its own needed to load it)
    import export
    from transformers import AutoModelForMaskedLM

    assert export.cli(["--checkpoint", str(hplt), "--output_dir", str(tmp_path / "ours")]) == 0
    exported = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert exported["model_type"] == "ltgbert" and (tmp_path / "ours" / "model.safetensors").is_file()
    ids = torch.tensor([[1, 5, 6, 7, 2]])
    with torch.no_grad():
        ours = AutoModelForMaskedLM.from_pretrained(tmp_path / "ours").eval()(ids).logits
        torch.testing.assert_close(ours, source(ids).logits, atol=1e-5, rtol=0)
    assert not code_ran(hplt)


def test_epochs_line_by_line_split_and_compile(corpus, tokenizer_dir, tmp_path):
    """--num_train_epochs with a held-out share of documents (no validation file), one document per line,
    tokenisation in 2 processes into --cache_dir, subword masking, torch.compile (the eager backend: graph
    capture without inductor's minutes of code generation on CPU)."""
    lines = [line for line in corpus.corpus_train.read_text().splitlines() if line][:400]
    text = tmp_path / "lines.txt"
    text.write_text("\n".join(lines) + "\n")
    out, cache = tmp_path / "run", tmp_path / "cache"
    run(
        [sys.executable, str(PRETRAIN)]
        + tiny_args(
            corpus,
            tokenizer_dir,
            out,
            train_file=text,
            validation_file=None,
            line_by_line=True,
            validation_split_percentage=5,
            max_steps=0,
            num_train_epochs=1,
            preprocessing_num_workers=2,
            cache_dir=cache,
            masking="subword",
            short_seq_prob=0.0,
            torch_compile=True,
            torch_compile_backend="eager",
            logging_steps=1,
        )
    )
    steps = sorted(logged_losses(out))
    blocks = logged(out, "train/samples_seen")[steps[-1]]
    assert steps == list(range(1, len(steps) + 1)) and blocks == 8 * len(steps)  # one epoch of full batches of 8
    assert any(cache.glob("packed-*.arrow"))
    assert run_config(out)["torch_compile"]


def test_dataset_name_and_split(corpus, tokenizer_dir, tmp_path):
    """--dataset_name (a local dataset directory here; a Hub name loads the same way) and --dataset_split."""
    source = tmp_path / "dataset"
    source.mkdir()
    docs = corpus.corpus_train.read_text().split("\n\n")[:600]
    (source / "train.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    (source / "test.jsonl").write_text(json.dumps({"body": "The dog runs."}) + "\n")
    out = tmp_path / "run"
    run(
        [sys.executable, str(PRETRAIN)]
        + tiny_args(
            corpus,
            tokenizer_dir,
            out,
            train_file=None,
            dataset_name=source,
            dataset_split="train",
            text_column="body",
            max_steps=2,
        )
    )
    assert run_config(out)["dataset_split"] == "train" and sorted(logged_losses(out)) == [1, 2]
    assert run_config(out)["fingerprint"]["corpus"] == f"{source}:None"


def test_export_entry_point(reference_run, tmp_path, capsys):
    """launch/export.py turns a checkpoint into the same model directory as final/."""
    import export

    assert (
        export.cli(
            [
                "--checkpoint",
                str(reference_run / "checkpoints" / "step_00000006"),
                "--output_dir",
                str(tmp_path / "exported"),
            ]
        )
        == 0
    )
    from safetensors.torch import load_file

    exported, final = load_file(tmp_path / "exported" / "model.safetensors"), final_weights(reference_run)
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)
    assert export.cli(["--checkpoint", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
