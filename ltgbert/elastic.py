"""Resuming a checkpoint on another number of processes than the one that wrote it (elastic resume).

SLURM allocations change between requeues, so a checkpoint written by N processes must resume on M. What
differs between the two kinds of state that ``accelerator.save_state`` writes:

1. DDP / single process: the model, optimizer and scheduler files are written once, by the main process, and
   do not depend on the world size; ``accelerator.load_state`` reads them on any M. Only the per-rank RNG
   files ``random_states_<rank>.pkl`` are per process: on M > N the ranks N..M-1 find no file and accelerate
   silently keeps whatever state they had. Here a new rank r takes the state of rank ``r % N``. Every rank of
   this toolkit seeds identically (``set_seed(seed)``) and draws the same amount per step, so those files
   hold one and the same state and rank r gets exactly what it would have had in an uninterrupted run.
2. DeepSpeed ZeRO-1/2/3: every rank writes its own partition of the fp32 master weights and of the optimizer
   moments (``zero_pp_rank_<r>_mp_rank_00_optim_states.pt``), laid out for N ranks; DeepSpeed refuses to load
   them on M ("Automatic adjustment of ZeRO's optimizer state partitioning with a new world size is not
   currently supported"). DeepSpeed's own answer is the universal checkpoint: ``ds_to_universal`` cuts the
   flat partitions back into one file per parameter and state (``zero/<param>/{fp32,exp_avg,exp_avg_sq,
   step}.pt``), and an engine configured with ``"checkpoint": {"load_universal": true}`` re-partitions those
   for its own world size. The alternative, ``zero_to_fp32``, consolidates only the weights; the moments
   would need a converter of our own, which is exactly what ``ds_to_universal`` already is.

The recipe for DeepSpeed, in two calls because ``load_universal`` is read when the engine is built:

* ``prepare_resharded_resume(accelerator, checkpoint_dir)`` before ``accelerator.prepare``: when the saved world
  size differs, the main process converts the checkpoint into ``checkpoints/.universal-step_XXXXXXXX/`` (the
  checkpoint itself is only read: the last good checkpoint is never touched) while the other ranks wait, and
  ``load_universal`` is set in the DeepSpeed config. The conversion is written into a temporary directory and
  renamed when complete; a conversion made from an identical checkpoint (same ``COMPLETE`` marker) is reused.
* ``load_state_resharded(accelerator, checkpoint_dir, saved_world_size)`` after ``prepare``, instead of
  ``accelerator.load_state``: under DeepSpeed it loads the conversion (weights and moments re-partitioned;
  scheduler, scaler and RNG files copied from the checkpoint), repairs what DeepSpeed 0.19's ZeRO-3 universal
  load gets wrong (see ``_repair_zero3_universal_load``), turns ``load_universal`` off again and removes the
  conversion; under DDP it is ``accelerator.load_state``. Both then give new ranks their RNG state.

Measured (DeepSpeed 0.19.8, accelerate 1.16, CPU/gloo, tiny model, torch AdamW with a decay and a no-decay group):
ZeRO-2 and ZeRO-3 2 -> 1 and 1 -> 2 processes, ZeRO-1 and the two CPU-offload presets 2 -> 1: the fp32 weights, both
moments, the step counts, each group's hyperparameters and the LR schedule equal the saved ones bit for bit,
and one more step equals the uninterrupted run's to float rounding (at most 1e-6 of a tensor's largest entry:
the gradient all-reduce sums in another order). With bf16 the loaded state is exact as well; the next step
(ZeRO-1/2, 2 -> 1) differs by bf16 rounding, as much as an uninterrupted 1-process run differs from a 2-process one.

Limits:

* The ZeRO stage must stay the same across a world-size change (a ZeRO-2 checkpoint on a ZeRO-3 engine fails in
  DeepSpeed's loader: the stages name their model-state files differently); refused with a one-line error.
* LAMB (``ltgbert.optimization.Lamb``) under ZeRO sees each rank's flat partition of a parameter group as one
  tensor, so its trust ratio, hence its update, depends on the partitioning (relative 7e-4 after one step
  2 -> 1 here); its state (moments, step) carries over exactly all the same.
* Only data parallelism: no tensor or pipeline parallel merge patterns are recorded or needed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import traceback
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.checkpointing import load_accelerator_state
from accelerate.utils.constants import MODEL_NAME

from ltgbert.checkpointing import COMPLETE_NAME, TMP_PREFIX
from ltgbert.distributed import broadcast_object, is_deepspeed
from ltgbert.errors import UserError

__all__ = [
    "UNIVERSAL_PREFIX",
    "saved_world_size",
    "universal_dir",
    "prepare_resharded_resume",
    "load_state_resharded",
]

UNIVERSAL_PREFIX = ".universal-"
_MARKER = "UNIVERSAL_COMPLETE"
_RNG_FILE = "random_states_{}.pkl"


def saved_world_size(checkpoint_dir: str | os.PathLike) -> int | None:
    """The number of processes that wrote ``checkpoint_dir`` (its ``COMPLETE`` marker), None if not recorded."""
    try:
        manifest = json.loads((Path(checkpoint_dir) / COMPLETE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = manifest.get("num_processes") if isinstance(manifest, dict) else None
    return int(value) if value is not None else None


def universal_dir(checkpoint_dir: str | os.PathLike) -> Path:
    """Where the universal conversion of ``checkpoint_dir`` goes: beside it, ``.universal-<name>``."""
    checkpoint_dir = Path(checkpoint_dir)
    return checkpoint_dir.parent / f"{UNIVERSAL_PREFIX}{checkpoint_dir.name}"


def _engine_tag(index: int) -> str:
    # accelerate.save_state names DeepSpeed engine i's checkpoint tag so.
    return MODEL_NAME if index == 0 else f"{MODEL_NAME}_{index}"


def _engine_tags(checkpoint_dir: Path) -> list[Path]:
    return sorted(d for d in checkpoint_dir.iterdir() if d.is_dir() and any(d.glob("*_model_states.pt")))


def _fingerprint(checkpoint_dir: Path) -> dict[str, Any]:
    # The COMPLETE marker is written last by every save and lists every file with its size; a checkpoint
    # rewritten under the same name (a rerun reaching the same step) gets a new marker, hence a new mtime.
    import deepspeed

    marker = checkpoint_dir / COMPLETE_NAME
    return {
        "checkpoint": checkpoint_dir.name,
        "complete_sha256": hashlib.sha256(marker.read_bytes()).hexdigest(),
        "complete_mtime_ns": marker.stat().st_mtime_ns,
        "deepspeed": deepspeed.__version__,
    }


def _conversion_is_current(target: Path, checkpoint_dir: Path) -> bool:
    try:
        return json.loads((target / _MARKER).read_text(encoding="utf-8")) == _fingerprint(checkpoint_dir)
    except (OSError, ValueError):
        return False


def _convert(checkpoint_dir: Path, target: Path, num_workers: int) -> None:
    """Writes the universal conversion of every engine tag of ``checkpoint_dir`` into ``target`` (atomically)."""
    from deepspeed.checkpoint import ds_to_universal

    tags = _engine_tags(checkpoint_dir)
    tmp = target.with_name(f"{TMP_PREFIX}{target.name.lstrip('.')}")
    if tmp.exists():  # a conversion killed midway
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        with open(tmp / "conversion.log", "w", encoding="utf-8") as log:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                for tag in tags:
                    ds_to_universal.main(
                        argparse.Namespace(
                            input_folder=str(tag),
                            output_folder=str(tmp / tag.name),
                            num_extract_workers=num_workers,
                            num_merge_workers=num_workers,
                            keep_temp_folder=False,
                            strict=True,
                            # Our checkpoints carry no tensor/pipeline-parallel merge patterns (pure data
                            # parallelism); this writes the empty pattern set that the converter asks for.
                            inject_missing_state=True,
                        )
                    )
        # accelerate.load_state reads the scheduler, scaler, RNG and custom states from the engine's directory;
        # they are small and world-size independent (RNG: see load_state_resharded).
        for entry in checkpoint_dir.iterdir():
            if entry.is_file() and entry.name != COMPLETE_NAME:
                shutil.copy2(entry, tmp / entry.name)
        (tmp / _MARKER).write_text(json.dumps(_fingerprint(checkpoint_dir), indent=2) + "\n", encoding="utf-8")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def _remove_orphans(root: Path) -> None:
    # Conversions whose checkpoint was rotated away (a resume that crashed before its cleanup).
    for entry in root.glob(f"{UNIVERSAL_PREFIX}*"):
        if entry.is_dir() and not (root / entry.name[len(UNIVERSAL_PREFIX) :]).is_dir():
            shutil.rmtree(entry, ignore_errors=True)


def _saved_zero_stage(checkpoint_dir: Path) -> int:
    tags = _engine_tags(checkpoint_dir)
    if not tags:
        raise FileNotFoundError(f"no DeepSpeed engine directory (*/*_model_states.pt) in {checkpoint_dir}")
    shard = next(iter(sorted(tags[0].glob("*optim_states.pt"))), None)
    if shard is None:
        raise FileNotFoundError(f"no ZeRO optimizer shard (*optim_states.pt) in {checkpoint_dir}")
    # mmap: only the few bytes of the stage number are read, not the rank's whole partition.
    state = torch.load(shard, map_location="cpu", weights_only=False, mmap=True)
    return int(state["optimizer_state_dict"].get("zero_stage", 1))


def _convert_once(accelerator: Accelerator, checkpoint_dir: Path, target: Path, saved: int, workers: int) -> str | None:
    """Main process only: converts (or reuses a conversion); returns the one-line error for every rank, or None."""
    stage = accelerator.state.deepspeed_plugin.zero_stage
    try:
        _remove_orphans(checkpoint_dir.parent)
        saved_stage = _saved_zero_stage(checkpoint_dir)
        if saved_stage != stage:
            # Seen: a ZeRO-2 checkpoint on a ZeRO-3 engine fails in DeepSpeed's loader (the two stages name their
            # model-state files differently), so a stage change and a world-size change at once are refused.
            return (
                f"checkpoint {checkpoint_dir} was written with ZeRO stage {saved_stage} on {saved} processes; "
                f"resuming it on {accelerator.num_processes} processes needs the same stage: relaunch with "
                f"ZeRO stage {saved_stage} (e.g. launch/accelerate/zero{saved_stage}.yaml)"
            )
        if not _conversion_is_current(target, checkpoint_dir):
            _convert(checkpoint_dir, target, workers)
    except Exception as e:  # noqa: BLE001 - relayed to every rank, else they would wait in the collective
        return (
            f"cannot re-partition DeepSpeed checkpoint {checkpoint_dir} (saved by {saved} processes) for "
            f"{accelerator.num_processes} processes ({type(e).__name__}: {' '.join(str(e).split())[:300]}); "
            f"relaunch with --num_processes {saved}"
        )
    return None


def prepare_resharded_resume(accelerator: Accelerator, checkpoint_dir: str | os.PathLike, num_workers: int = 1) -> bool:
    """Before ``accelerator.prepare``: readies a DeepSpeed checkpoint of another world size for loading.

    Every rank must call it. Does nothing (returns False) unless this is a DeepSpeed run and ``checkpoint_dir``
    was written by another number of processes. Otherwise the main process converts the checkpoint into
    ``universal_dir(checkpoint_dir)`` (reused when already converted from this very checkpoint), the others
    wait, and ``"checkpoint": {"load_universal": true}`` is set in the DeepSpeed config that ``prepare`` reads.
    Returns True; then call ``load_state_resharded`` after ``prepare``.

    Raises:
        UserError: the checkpoint was written with another ZeRO stage, the conversion failed (the message names
            the checkpoint and the way out), or the conversion is not visible on every rank (the output
            directory is not on a shared filesystem).
    """
    checkpoint_dir = Path(checkpoint_dir)
    saved = saved_world_size(checkpoint_dir)
    if not is_deepspeed(accelerator) or saved is None or saved == accelerator.num_processes:
        return False
    target = universal_dir(checkpoint_dir)
    error = None
    if accelerator.is_main_process:
        error = _convert_once(accelerator, checkpoint_dir, target, saved, num_workers)
    error = broadcast_object(accelerator, error)  # also the barrier: nobody reads a half-written conversion
    if error is not None:
        raise UserError(error)
    if not (target / _MARKER).is_file():
        raise UserError(
            f"rank {accelerator.process_index} cannot see {target}, written by the main process; put "
            "--output_dir on a filesystem that every node sees"
        )
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    ds_config.setdefault("checkpoint", {})["load_universal"] = True
    return True


def _restore_missing_rng(accelerator: Accelerator, checkpoint_dir: Path, saved: int) -> None:
    # accelerate.load_state logs "Could not load random states" and goes on when this rank's file is absent.
    rank = accelerator.process_index
    if rank < saved or not (checkpoint_dir / _RNG_FILE.format(rank % saved)).is_file():
        return
    override = load_accelerator_state(str(checkpoint_dir), [], [], [], [], rank % saved, scaler=None)
    if "step" in override:
        accelerator.step = override["step"]


def _repair_zero3_universal_load(engine: Any, tag_dir: Path) -> None:
    """Undoes two slips of DeepSpeed 0.19.8's ZeRO-3 universal load (stage3.py, load_hp_checkpoint_state_...).

    1. It gives every parameter group the hyperparameters of group 0 (lr, weight_decay, betas): our no-decay
       group (biases, norms, embeddings) would be decayed. The saved per-group values are restored.
    2. It stores one and the same ``step`` object in every sub-group's state; torch's optimizers advance a
       tensor step in place, so one optimizer step then counted once per sub-group (seen: 3 -> 5), which
       skews Adam's bias correction. Each sub-group gets its own copy.
    """
    zero = engine.optimizer
    base = zero.optimizer
    saved = torch.load(tag_dir / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=False)
    saved_groups = saved.get("param_groups") or saved["optimizer_state_dict"]["param_groups"]
    if len(saved_groups) != len(base.param_groups):
        raise ValueError(
            f"checkpoint has {len(saved_groups)} optimizer parameter groups, this run {len(base.param_groups)}"
        )
    for group, saved_group in zip(base.param_groups, saved_groups):
        group.update({key: value for key, value in saved_group.items() if key != "params"})
    for flat in zero.fp32_partitioned_groups_flat:
        state = base.state.get(flat)
        if state and torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def _load_universal(accelerator: Accelerator, checkpoint_dir: Path) -> None:
    target = universal_dir(checkpoint_dir)
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    if not ds_config.get("checkpoint", {}).get("load_universal") or not (target / _MARKER).is_file():
        raise RuntimeError(
            "load_state_resharded needs prepare_resharded_resume(accelerator, checkpoint_dir) to "
            "run before accelerator.prepare"
        )
    engines = list(accelerator._models)  # DeepSpeedEngine objects; accelerate exposes no public list
    try:
        accelerator.load_state(str(target))
        for index, engine in enumerate(engines):
            if engine.zero_optimization_stage() == 3:
                _repair_zero3_universal_load(engine, target / _engine_tag(index))
    except AssertionError as e:  # DeepSpeed checks shapes and sizes with assert, often without a message
        where = traceback.extract_tb(e.__traceback__)[-1]
        raise ValueError(
            f"universal checkpoint does not fit this model: assertion failed at "
            f"{Path(where.filename).name}:{where.lineno} {e}".rstrip()
        ) from e
    # Later loads in this process are ordinary ones again.
    for engine in engines:
        engine._config.load_universal_checkpoint = False
    ds_config["checkpoint"]["load_universal"] = False
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(target, ignore_errors=True)


def load_state_resharded(accelerator: Accelerator, checkpoint_dir: str | os.PathLike, saved_world_size: int) -> None:
    """After ``prepare``: ``accelerator.load_state`` for a checkpoint written by ``saved_world_size`` processes.

    Every rank must call it. DeepSpeed: loads the universal conversion made by ``prepare_resharded_resume``
    (which must have run before ``prepare``; RuntimeError otherwise), then deletes it. DDP / single process:
    ``accelerator.load_state``. In both cases ranks that did not exist when the checkpoint was written take
    the RNG state of rank ``rank % saved_world_size``. Errors of the underlying loads propagate (ValueError for
    a conversion that does not fit the model), for ``load_checkpoint`` to report.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if is_deepspeed(accelerator) and saved_world_size != accelerator.num_processes:
        _load_universal(accelerator, checkpoint_dir)
    else:
        accelerator.load_state(str(checkpoint_dir))
    _restore_missing_rng(accelerator, checkpoint_dir, saved_world_size)
