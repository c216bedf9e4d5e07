"""Tests for ltgbert.checkpointing and ltgbert.distributed.

Single process: save/load round trip (params, optimizer, scheduler, RNG), rotation, interrupted saves,
corrupt checkpoints, final export. Two processes under ``accelerate launch --use_deepspeed`` on CPU (ZeRO-2,
our Lamb as the client optimizer): the world size, an all-rank decision, and an exact resume. DDP under
``accelerate launch`` is exercised by the pretraining tests (tests/test_pretrain.py).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from ltgbert.checkpointing import (
    COMPLETE_NAME,
    checkpoint_name,
    export_final_model,
    find_latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from ltgbert.errors import UserError
from ltgbert.optimization import get_lr_scheduler

REPO = Path(__file__).resolve().parents[1]


def _fresh_accelerator():
    # Accelerator state is a process-wide singleton; reset it so each run gets a fresh one.
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return Accelerator(cpu=True)


@pytest.fixture
def accelerator():
    yield _fresh_accelerator()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _setup(accelerator, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = get_lr_scheduler("cosine", optimizer, 2, 20)
    return accelerator.prepare(model, optimizer, scheduler)


def _train(model, optimizer, scheduler, steps):
    for _ in range(steps):
        x = torch.randn(4, 8)  # drawn from the global RNGs, so a resume must restore them
        noise = random.random() * 1e-3 + float(np.random.rand()) * 1e-3
        loss = model(x).pow(2).mean() * (1 + noise)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def test_round_trip_is_exact(tmp_path, accelerator):
    model, optimizer, scheduler = _setup(accelerator)
    _train(model, optimizer, scheduler, 3)
    path = save_checkpoint(accelerator, tmp_path, 3, {"epoch": 0, "batches_consumed": 3, "config": {"a": 1}})
    assert path == tmp_path / "checkpoints" / "step_00000003" and (path / COMPLETE_NAME).is_file()
    assert any(p.name.startswith("random_states_") for p in path.iterdir())  # accelerate saves RNG states
    _train(model, optimizer, scheduler, 4)
    expected = [p.detach().clone() for p in model.parameters()]
    expected_lr = scheduler.get_last_lr()
    expected_rng = (torch.rand(3), random.random(), np.random.rand())

    accelerator = _fresh_accelerator()  # as in a new process
    model2, optimizer2, scheduler2 = _setup(accelerator, seed=1)  # different init
    state = load_checkpoint(accelerator, find_latest_checkpoint(tmp_path))
    assert state == {"epoch": 0, "batches_consumed": 3, "config": {"a": 1}, "step": 3}
    _train(model2, optimizer2, scheduler2, 4)
    for p, q in zip(model2.parameters(), expected):
        assert torch.equal(p, q)
    assert scheduler2.get_last_lr() == expected_lr
    assert torch.equal(torch.rand(3), expected_rng[0])
    assert (random.random(), np.random.rand()) == expected_rng[1:]


def test_rotation_and_interrupted_saves(tmp_path, accelerator):
    model, optimizer, scheduler = _setup(accelerator)
    for step in (1, 2, 3):
        save_checkpoint(accelerator, tmp_path, step, {"epoch": 0}, total_limit=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == [checkpoint_name(2), checkpoint_name(3)]

    # Killed while writing step 4: a .tmp dir with partial content, never committed.
    root = tmp_path / "checkpoints"
    shutil.copytree(root / checkpoint_name(3), root / f".tmp-{checkpoint_name(4)}")
    # Killed between save_state and the COMPLETE marker of step 5 (e.g. a hand-copied dir): ignored too.
    shutil.copytree(root / checkpoint_name(3), root / checkpoint_name(5))
    (root / checkpoint_name(5) / COMPLETE_NAME).unlink()
    assert find_latest_checkpoint(tmp_path) == root / checkpoint_name(3)
    assert load_checkpoint(accelerator, find_latest_checkpoint(tmp_path))["step"] == 3
    with pytest.raises(UserError, match="step_00000005.*incomplete"):
        load_checkpoint(accelerator, root / checkpoint_name(5))

    # Re-saving an existing step (a crashed run that reached it before) replaces it; leftovers are cleaned.
    save_checkpoint(accelerator, tmp_path, 3, {"epoch": 1}, total_limit=2)
    assert load_checkpoint(accelerator, root / checkpoint_name(3))["epoch"] == 1
    assert not any(p.name.startswith((".tmp-", ".old-")) for p in root.iterdir())
    assert find_latest_checkpoint(tmp_path / "nowhere") is None


def test_corrupt_checkpoint_is_a_user_error(tmp_path, accelerator):
    model, optimizer, scheduler = _setup(accelerator)
    path = save_checkpoint(accelerator, tmp_path, 7, {})
    weights = next(p for p in path.iterdir() if p.name.startswith("model"))
    weights.write_bytes(weights.read_bytes()[:10])  # truncated
    with pytest.raises(UserError, match=rf"{path}.*corrupt.*{weights.name}"):
        load_checkpoint(accelerator, path)
    weights.unlink()
    with pytest.raises(UserError, match=rf"{path}.*{weights.name} is missing"):
        load_checkpoint(accelerator, path)
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(accelerator, tmp_path / "checkpoints" / "step_00000099")


def test_export_final_model(tmp_path, accelerator):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64
    )
    model = accelerator.prepare(transformers.BertForMaskedLM(config))
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "stale.txt").write_text("old export")
    path = export_final_model(
        accelerator, model, tmp_path, before_commit=lambda d: (d / "README.md").write_text("card")
    )
    assert path == tmp_path / "final"
    assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in path.iterdir()}
    assert not (path / "stale.txt").exists() and not (tmp_path / ".tmp-final").exists()
    reloaded = transformers.BertForMaskedLM.from_pretrained(path)
    for (name, p), q in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(p, q), name


# -----------------------------------------------------------------------------
# two processes under accelerate launch

DIST_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from ltgbert.checkpointing import find_latest_checkpoint, load_checkpoint, save_checkpoint
    from ltgbert.distributed import all_ranks_any, broadcast_object, make_accelerator
    from ltgbert.optimization import build_optimizer, get_lr_scheduler

    out = sys.argv[1]
    acc = make_accelerator(timeout_minutes=2)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    optimizer = build_optimizer(sys.argv[2], model, lr=1e-2, weight_decay=0.1)
    scheduler = get_lr_scheduler("cosine", optimizer, 2, 20)
    data = torch.utils.data.DataLoader(torch.randn(64, 8), batch_size=4)  # gives DeepSpeed its batch size
    model, optimizer, scheduler, data = acc.prepare(model, optimizer, scheduler, data)

    def train(steps):
        for _ in range(steps):
            x = torch.randn(4, 8, device=acc.device) * (acc.process_index + 1)
            acc.backward(model(x).pow(2).mean())
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()

    def params():
        return [p.detach().clone().float() for p in acc.unwrap_model(model).parameters()]

    train(2)
    path = save_checkpoint(acc, out, 2, {"epoch": 0}, total_limit=1)
    train(3)
    expected = params()
    state = load_checkpoint(acc, find_latest_checkpoint(out))
    train(3)
    same = all(torch.equal(p, q) for p, q in zip(params(), expected))
    print("RESULT " + json.dumps({
        "num_processes": acc.num_processes, "process_index": acc.process_index,
        "distributed_type": str(acc.distributed_type), "is_main": acc.is_main_process,
        "any": all_ranks_any(acc, acc.process_index == 1), "none": all_ranks_any(acc, False),
        "broadcast": broadcast_object(acc, acc.process_index + 10), "state": state, "resume_exact": same,
        "files": sorted(p.name for p in path.iterdir()),
    }), flush=True)
    acc.end_training()  # as the launch scripts do: the process group is torn down before the interpreter exits
    """
)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path, launch_flags, optimizer):
    script = tmp_path / "dist_probe.py"
    script.write_text(DIST_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "WORLD_SIZE", "RANK", "LOCAL_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}")
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        *launch_flags,
        str(script),
        str(tmp_path / "run"),
        optimizer,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    results = [json.loads(line[len("RESULT ") :]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and len(results) == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    results.sort(key=lambda r: r["process_index"])
    assert [r["process_index"] for r in results] == [0, 1]
    assert [r["is_main"] for r in results] == [True, False]
    for r in results:
        assert r["num_processes"] == 2 and r["any"] is True and r["none"] is False and r["broadcast"] == 10
        assert r["state"] == {"epoch": 0, "step": 2} and r["resume_exact"] is True
    return results


def test_deepspeed_zero2_two_cpu_processes(tmp_path):
    pytest.importorskip("deepspeed")
    results = _launch(tmp_path, ["--use_deepspeed", "--zero_stage", "2"], "lamb")
    assert results[0]["distributed_type"] == "DistributedType.DEEPSPEED"
    assert "pytorch_model" in results[0]["files"]  # DeepSpeed's own checkpoint dir with both ranks' shards


@pytest.fixture
def fresh_accelerator_state(monkeypatch):
    """A single-process launch environment and accelerate's singleton state reset before and after."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_make_accelerator_single_process(fresh_accelerator_state):
    from ltgbert.distributed import all_ranks_all, all_ranks_any, broadcast_object, make_accelerator

    acc = make_accelerator(timeout_minutes=5)
    assert acc.num_processes == 1 and acc.is_main_process
    assert all_ranks_any(acc, True) and not all_ranks_any(acc, False) and not all_ranks_all(acc, False)
    assert broadcast_object(acc, {"a": 1}) == {"a": 1}


@pytest.mark.parametrize("native", [False, True])
def test_make_accelerator_warns_when_cpu_mixed_precision_is_emulated(fresh_accelerator_state, monkeypatch, native):
    """bf16 on a CPU without bf16 matrix instructions is emulated (13x slower on AVX2): one warning, naming the fix."""
    import warnings

    from ltgbert import distributed

    monkeypatch.setattr(distributed, "cpu_has_native", lambda precision: native)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        acc = distributed.make_accelerator(timeout_minutes=5, mixed_precision="bf16", cpu=True)
    assert acc.mixed_precision == "bf16"
    messages = [str(w.message) for w in caught if "matrix instructions" in str(w.message)]
    if native:
        assert messages == []
    else:
        assert len(messages) == 1 and "drop --mixed_precision bf16" in messages[0]
    assert not distributed.warn_if_cpu_precision_is_emulated(torch.device("cpu"), "no")
    assert isinstance(distributed.cpu_has_native("bf16"), bool) and isinstance(distributed.cpu_has_native("fp16"), bool)


@pytest.mark.parametrize(
    "precision, instructions", [("bf16", "AVX512-BF16 or AMX"), ("fp16", "AVX512-FP16 or AMX-FP16")]
)
def test_emulated_precision_warning_names_the_instructions_and_only_concerns_cpus(monkeypatch, precision, instructions):
    from ltgbert import distributed

    monkeypatch.setattr(distributed, "cpu_has_native", lambda p: False)
    with pytest.warns(
        UserWarning, match=f"drop --mixed_precision {precision}, or run on a GPU or a CPU with {instructions}"
    ):
        assert distributed.warn_if_cpu_precision_is_emulated(torch.device("cpu"), precision)
    assert not distributed.warn_if_cpu_precision_is_emulated(torch.device("cuda"), precision)


def test_enable_activation_checkpointing_turns_it_on_without_deprecation_warning(tiny_config):
    import warnings

    from ltgbert import LtgBertForMaskedLM
    from ltgbert.checkpointing import enable_activation_checkpointing

    model = LtgBertForMaskedLM(tiny_config)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        enable_activation_checkpointing(model)
    assert model.is_gradient_checkpointing and model.ltgbert.encoder.gradient_checkpointing

    class OldTransformersModel:  # no activation_checkpointing_enable: the old name is used
        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            self.kwargs = gradient_checkpointing_kwargs

    old = OldTransformersModel()
    enable_activation_checkpointing(old)
    assert old.kwargs == {"use_reentrant": False}
