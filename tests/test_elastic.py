"""Tests for ltgbert.elastic: a checkpoint written on N processes resumes on M (DDP, DeepSpeed ZeRO-2 and ZeRO-3).

Three ``accelerate launch`` runs with the ZeRO-2 preset serve every case: the same file is the worker script
(``python tests/test_elastic.py PHASES WORKDIR``), and one process builds, in turn, a DDP (or single-process)
run and DeepSpeed ZeRO-2 and ZeRO-3 engines, resetting accelerate's singleton state in between.

1. 1 process writes a checkpoint of each kind after 3 steps, then takes a 4th step: the reference.
2. 2 processes resume those (1 -> 2) and check them, try a ZeRO checkpoint that DeepSpeed cannot convert, then
   write their own checkpoints and references.
3. 1 process resumes the 2-process checkpoints (2 -> 1) and checks them.

A check: right after the resume, the fp32 weights, both Adam moments, the step counts, every parameter
group's hyperparameters and the LR schedule equal the saved ones exactly (gathered into full tensors); one
more step equals the uninterrupted run's 4th step to float rounding (the gradient all-reduce sums in another
order); ranks that did not exist get the saved RNG state. The global batch is the same on every world size
(8 rows: 8 x 1 or 4 x 2), every row has the same number of labelled tokens, so the mean loss over a rank's
rows averaged over ranks is the mean over all rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("ddp", "zero2", "zero3")
STEPS, GLOBAL_BATCH, SEQ, LABELLED = 3, 8, 16, 5
NEXT_STEP_RTOL = 1e-5  # measured: at most 1e-6 relative to the tensor's largest entry


# -----------------------------------------------------------------------------
# the worker (runs inside accelerate launch)


def _accelerator(kind):
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DeepSpeedPlugin

    from ltgbert.distributed import make_accelerator

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "false" if kind == "ddp" else "true"
    plugin = None
    if kind != "ddp":
        plugin = DeepSpeedPlugin(hf_ds_config=str(ROOT / "ds_configs" / f"{kind}.json"), zero3_init_flag=False)
    return make_accelerator(timeout_minutes=5, deepspeed_plugin=plugin, step_scheduler_with_optimizer=False)


def _build(accelerator):
    from ltgbert import LtgBertConfig, LtgBertForMaskedLM
    from ltgbert.optimization import build_optimizer, get_lr_scheduler

    torch.manual_seed(0)
    config = LtgBertConfig.from_preset(
        "tiny",
        vocab_size=64,
        max_position_embeddings=64,
        position_bucket_size=8,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = LtgBertForMaskedLM(config)
    optimizer = build_optimizer("adamw", model, lr=1e-2, weight_decay=0.1)  # two groups: decay and no decay
    scheduler = get_lr_scheduler("cosine", optimizer, 2, 10)
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:  # as launch/pretrain.py: we feed batches ourselves
        plugin.deepspeed_config.update(
            train_micro_batch_size_per_gpu=GLOBAL_BATCH // accelerator.num_processes,
            gradient_accumulation_steps=1,
            gradient_clipping=1.0,
        )
    return model, optimizer, scheduler


def _train_step(accelerator, model, optimizer, scheduler, step):
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(5, 64, (GLOBAL_BATCH, SEQ), generator=g)
    labels = torch.where(torch.rand(GLOBAL_BATCH, SEQ, generator=g).argsort(dim=1) < LABELLED, ids, -100)
    rows = slice(
        accelerator.process_index * len(ids) // accelerator.num_processes,
        (accelerator.process_index + 1) * len(ids) // accelerator.num_processes,
    )
    accelerator.backward(model(input_ids=ids[rows], labels=labels[rows]).loss)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    torch.rand(1)  # draws from the global RNG as dropout would, so that a rank's RNG state depends on the step


def _snapshot(accelerator, model, optimizer, scheduler):
    """Full (gathered) fp32 weights and Adam moments by parameter name, step counts, group hyperparameters."""
    base = optimizer.optimizer
    params = {}
    if accelerator.state.deepspeed_plugin is None:
        by_param = {id(p): n for n, p in accelerator.unwrap_model(model).named_parameters()}
        for p in accelerator.unwrap_model(model).parameters():
            state = base.state[p]
            params[by_param[id(p)]] = [
                p.detach().float().clone(),
                state["exp_avg"].clone(),
                state["exp_avg_sq"].clone(),
            ]
    else:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        zero, base = base, base.optimizer
        if hasattr(zero, "_hp_optimizer_states_linked"):
            # DeepSpeed 0.19.8 (ZeRO-1/2) links the optimizer state to the parameters after the first group's
            # first step only; safe_get_full_optimizer_state then fails for the second group. Relink.
            zero._hp_optimizer_states_linked = False
            zero._lazy_init_hp_params_optimizer_state()
        for name, p in model.module.named_parameters():  # collectives under ZeRO-3: every rank, same order
            params[name] = [safe_get_full_fp32_param(p)] + [
                safe_get_full_optimizer_state(p, key) for key in ("exp_avg", "exp_avg_sq")
            ]
    return {
        "params": {name: [t.cpu() for t in tensors] for name, tensors in params.items()},
        "steps": sorted({int(s["step"]) for s in base.state.values() if "step" in s}),
        "groups": [{k: v for k, v in g.items() if k not in ("params", "initial_lr")} for g in base.param_groups],
        "schedule": [scheduler.scheduler.last_epoch, scheduler.get_last_lr()],
    }


def _compare(actual, expected, rtol):
    """Worst difference relative to each tensor's largest entry; the rest must be equal."""
    assert actual["steps"] == expected["steps"], (actual["steps"], expected["steps"])
    assert actual["groups"] == expected["groups"], (actual["groups"], expected["groups"])
    assert actual["schedule"] == expected["schedule"], (actual["schedule"], expected["schedule"])
    assert actual["params"].keys() == expected["params"].keys()
    worst = 0.0
    for name, tensors in expected["params"].items():
        for got, want in zip(actual["params"][name], tensors):
            worst = max(worst, ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item())
    assert worst <= rtol, (worst, rtol)
    return worst


def _report(workdir, accelerator, result):
    # One file per rank and check: two ranks printing at once can interleave within a line.
    result["rank"] = accelerator.process_index
    path = workdir / "results" / f"w{accelerator.num_processes}-{result['kind']}-r{result['rank']}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(result))


def _write(kind, workdir):
    from ltgbert.checkpointing import save_checkpoint

    accelerator = _accelerator(kind)
    model, optimizer, scheduler = accelerator.prepare(*_build(accelerator))
    for step in range(STEPS):
        _train_step(accelerator, model, optimizer, scheduler, step)
    out = workdir / f"{kind}-w{accelerator.num_processes}"
    saved = _snapshot(accelerator, model, optimizer, scheduler)
    save_checkpoint(accelerator, out, STEPS, {"kind": kind})
    _train_step(accelerator, model, optimizer, scheduler, STEPS)
    following = _snapshot(accelerator, model, optimizer, scheduler)
    if accelerator.is_main_process:
        torch.save({"saved": saved, "next": following}, out / "reference.pt")
    accelerator.free_memory()  # destroys the DeepSpeed engine before the next kind builds one


def _resume(kind, workdir):
    from ltgbert.checkpointing import CHECKPOINTS_DIR, checkpoint_name
    from ltgbert.elastic import load_state_resharded, prepare_resharded_resume, saved_world_size

    accelerator = _accelerator(kind)
    world = accelerator.num_processes
    (out,) = [d for d in workdir.glob(f"{kind}-w*") if d.name != f"{kind}-w{world}"]
    checkpoint = out / CHECKPOINTS_DIR / checkpoint_name(STEPS)
    saved_world = saved_world_size(checkpoint)
    converted = prepare_resharded_resume(accelerator, checkpoint)
    model, optimizer, scheduler = accelerator.prepare(*_build(accelerator))
    load_state_resharded(accelerator, checkpoint, saved_world)
    rng_ok = torch.equal(
        torch.get_rng_state(), torch.load(checkpoint / "random_states_0.pkl", weights_only=False)["torch_manual_seed"]
    )
    reference = torch.load(out / "reference.pt", weights_only=False)
    loaded = _compare(_snapshot(accelerator, model, optimizer, scheduler), reference["saved"], 0.0)
    _train_step(accelerator, model, optimizer, scheduler, STEPS)
    following = _compare(_snapshot(accelerator, model, optimizer, scheduler), reference["next"], NEXT_STEP_RTOL)
    _report(
        workdir,
        accelerator,
        {
            "kind": kind,
            "from": saved_world,
            "to": world,
            "converted": converted,
            "loaded": loaded,
            "next": following,
            "rng": rng_ok,
        },
    )
    accelerator.free_memory()


def _convert_unconvertible(workdir):
    """A ZeRO checkpoint that DeepSpeed's converter cannot read (its optimizer state has no Adam moments, as
    SGD's would): every rank gets the same one-line UserError (none waits forever) and nothing is left behind."""
    from ltgbert.checkpointing import CHECKPOINTS_DIR, checkpoint_name
    from ltgbert.elastic import prepare_resharded_resume
    from ltgbert.errors import UserError

    accelerator = _accelerator("zero2")
    source = workdir / "zero2-w1" / CHECKPOINTS_DIR / checkpoint_name(STEPS)
    broken = workdir / "unconvertible" / CHECKPOINTS_DIR / source.name
    if accelerator.is_main_process:
        shutil.copytree(source, broken)
        for shard in broken.glob("pytorch_model/*optim_states.pt"):
            state = torch.load(shard, weights_only=False)
            for group_state in state["optimizer_state_dict"]["base_optimizer_state"]["state"].values():
                del group_state["exp_avg"]
            torch.save(state, shard)
    accelerator.wait_for_everyone()
    try:
        prepare_resharded_resume(accelerator, broken)
        error = None
    except UserError as e:
        error = str(e)
    leftovers = sorted(p.name for p in broken.parent.iterdir() if p != broken)
    _report(workdir, accelerator, {"kind": "unconvertible", "error": error, "leftovers": leftovers})


def main(phases, workdir):
    workdir = Path(workdir)
    for phase in phases.split(","):
        if phase == "unconvertible":
            _convert_unconvertible(workdir)
        for kind in KINDS if phase != "unconvertible" else ():
            {"write": _write, "resume": _resume}[phase](kind, workdir)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# the tests


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(num_processes, phases, workdir):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "WORLD_SIZE", "RANK", "LOCAL_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}")
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "launch" / "accelerate" / "zero2.yaml"),
        "--num_processes",
        str(num_processes),
        "--main_process_port",
        str(_free_port()),
        str(Path(__file__).resolve()),
        phases,
        str(workdir),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [json.loads(p.read_text()) for p in sorted((workdir / "results").glob(f"w{num_processes}-*.json"))]


def _digest(root):
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _check(results, saved_world, world):
    unconvertible = [r for r in results if r["kind"] == "unconvertible"]
    results = [r for r in results if r["kind"] != "unconvertible"]
    for r in unconvertible:
        assert r["error"].startswith("cannot re-partition DeepSpeed checkpoint") and "\n" not in r["error"], r
        assert "KeyError: 'exp_avg'" in r["error"], r
        assert f"relaunch with --num_processes {saved_world}" in r["error"] and r["leftovers"] == [], r
    assert sorted((r["kind"], r["rank"]) for r in results) == sorted((k, r) for k in KINDS for r in range(world))
    for r in results:
        assert (r["from"], r["to"]) == (saved_world, world)
        assert r["converted"] is (r["kind"] != "ddp")  # only ZeRO partitions need re-partitioning
        assert r["loaded"] == 0.0 and r["next"] <= NEXT_STEP_RTOL and r["rng"], r


def test_resume_on_another_world_size_ddp_zero2_zero3(tmp_path):
    pytest.importorskip("deepspeed")
    _launch(1, "write", tmp_path)
    results = _launch(2, "resume,unconvertible,write", tmp_path)
    assert len([r for r in results if r["kind"] == "unconvertible"]) == 2
    _check(results, saved_world=1, world=2)
    written_by_two = {kind: _digest(tmp_path / f"{kind}-w2" / "checkpoints") for kind in KINDS}
    _check(_launch(1, "resume", tmp_path), saved_world=2, world=1)
    for kind in KINDS:
        # The checkpoint was only read (the conversion went beside it), and the conversion was cleaned up.
        assert _digest(tmp_path / f"{kind}-w2" / "checkpoints") == written_by_two[kind]
        assert not list((tmp_path / f"{kind}-w2" / "checkpoints").glob(".*"))


if __name__ == "__main__":
    main(*sys.argv[1:])
