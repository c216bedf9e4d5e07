"""Resumable checkpoints that survive a kill at any moment, and the final Hugging Face export.

Two persistence paths, as in the accelerate examples:

1. Training state, ``<output_dir>/checkpoints/step_XXXXXXXX/``: ``accelerator.save_state`` (model, optimizer,
   scheduler, gradient scaler, one ``random_states_<rank>.pkl`` per process; under DeepSpeed every rank
   writes its ZeRO shards) plus ``trainer_state.json`` with what only the script knows (step, epoch, batches
   consumed in the epoch, the resolved config). ``load_checkpoint`` restores all of it.
2. Release, ``<output_dir>/final/``: ``save_pretrained`` of the unwrapped model with the weights from
   ``accelerator.get_state_dict`` (which gathers ZeRO-3 shards), plus the tokenizer.

Atomicity: a checkpoint is written into ``.tmp-step_XXXXXXXX`` and renamed to ``step_XXXXXXXX`` by the main
process only after every rank finished writing and the files were fsynced; the rename is the commit. The
``COMPLETE`` marker inside it, written last, lists every file with its size, so ``find_latest_checkpoint``
skips anything a crash left half-written and ``load_checkpoint`` detects a damaged checkpoint (a file
missing or truncated) and says so instead of failing deep inside torch. Rotation deletes the oldest complete
checkpoints only after the new one is committed, so the last good one is never lost. The output directory
must be on a filesystem that every rank sees (one rank renames for the whole world).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from ltgbert.errors import UserError
from ltgbert.io import write_json

__all__ = [
    "CHECKPOINTS_DIR",
    "TRAINER_STATE_NAME",
    "COMPLETE_NAME",
    "checkpoint_name",
    "save_checkpoint",
    "load_checkpoint",
    "find_latest_checkpoint",
    "list_checkpoints",
    "export_final_model",
    "export_checkpoint",
    "checkpoint_weights",
    "parse_word_milestones",
    "milestone_name",
    "WORD_MILESTONE_PRESETS",
]

CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE_NAME = "trainer_state.json"
COMPLETE_NAME = "COMPLETE"
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")


def checkpoint_name(step: int) -> str:
    """Directory name of the checkpoint after ``step`` optimizer updates: ``step_00001234``."""
    return f"step_{step:08d}"


# BabyLM 2025/2026 intermediate checkpoints, in words: strict-small every 1M to 10M, then every 10M to 100M;
# strict also every 100M to 1000M.
WORD_MILESTONE_PRESETS = {
    "babylm_strict_small": [m * 10**6 for m in range(1, 10)] + [m * 10**7 for m in range(1, 11)],
    "babylm_strict": (
        [m * 10**6 for m in range(1, 10)] + [m * 10**7 for m in range(1, 10)] + [m * 10**8 for m in range(1, 11)]
    ),
}
_WORD_UNITS = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9}


def parse_word_milestones(spec: str) -> list[int]:
    """``--save_at_words``: a preset name or a comma-separated list of word counts (1M, 500K, 2.5M, 1000000)."""
    if spec in WORD_MILESTONE_PRESETS:
        return list(WORD_MILESTONE_PRESETS[spec])
    counts = set()
    for item in spec.split(","):
        item = item.strip().upper()
        if not item:
            continue
        unit = item[-1] if item[-1] in _WORD_UNITS and not item[-1].isdigit() else ""
        number = item[: len(item) - len(unit)]
        try:
            value = float(number) * _WORD_UNITS[unit]
        except ValueError:
            value = -1
        if value <= 0 or not value.is_integer():
            raise UserError(
                f"--save_at_words: {item!r} is not a word count; use e.g. 1M,2M,10M (K, M, B suffixes) "
                f"or a preset: {', '.join(WORD_MILESTONE_PRESETS)}"
            )
        counts.add(int(value))
    if not counts:
        raise UserError("--save_at_words is empty; give word counts such as 1M,2M or a preset")
    return sorted(counts)


def milestone_name(words: int) -> str:
    """Release directory of a word milestone, as the BabyLM evaluation names revisions: ``chck_10M``."""
    millions = words / 10**6
    return f"chck_{millions:g}M"


# -----------------------------------------------------------------------------
# filesystem helpers


def _fsync_dir(path: Path) -> None:
    # Makes a rename or a new directory entry durable; without it a power loss can undo the commit.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (and all of Windows) refuse fsync on directories
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _file_listing(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): p.stat().st_size
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != COMPLETE_NAME
    }


def _commit_dir(tmp: Path, final: Path) -> None:
    """Renames ``tmp`` to ``final``; an existing ``final`` is moved aside first and deleted only afterwards."""
    aside = None
    if final.exists():
        # os.replace cannot replace a non-empty directory; a same-named dir comes from an earlier (possibly
        # crashed) run that reached this step. It stays until the new one is in place.
        aside = final.with_name(f"{OLD_PREFIX}{final.name}-{os.getpid()}")
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(final, aside)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


# -----------------------------------------------------------------------------
# finding checkpoints


def _is_complete(path: Path) -> bool:
    return (path / COMPLETE_NAME).is_file() and (path / TRAINER_STATE_NAME).is_file()


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``output_dir/checkpoints``, oldest (lowest step) first."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and entry.is_dir() and _is_complete(entry):
            found.append((int(match.group(1)), entry))
    return [path for _, path in sorted(found)]


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint, or None; ``.tmp-*`` and unfinished directories are ignored."""
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def _rotate(root: Path, keep: Path, total_limit: int | None) -> None:
    # Leftovers of interrupted saves/commits: nothing else writes here (one run per output_dir).
    for entry in root.iterdir():
        if entry.name.startswith((TMP_PREFIX, OLD_PREFIX)) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
    if total_limit is None or total_limit <= 0:
        return
    checkpoints = list_checkpoints(root.parent)
    for path in checkpoints[: max(0, len(checkpoints) - total_limit)]:
        if path != keep:
            shutil.rmtree(path, ignore_errors=True)


# -----------------------------------------------------------------------------
# save / load


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | os.PathLike,
    step: int,
    state: dict[str, Any],
    total_limit: int | None = None,
) -> Path:
    """Saves the full training state after ``step`` optimizer updates; every rank must call it.

    Args:
        accelerator: the accelerator that prepared the model, optimizer and scheduler.
        output_dir: the run's output directory (shared by all ranks); checkpoints go to ``checkpoints/``.
        step: optimizer updates done so far; names the directory.
        state: JSON-serialisable training state (epoch, batches consumed, resolved config, ...); written as
            ``trainer_state.json`` with ``step`` added. Only the main process' copy is written.
        total_limit: keep at most this many complete checkpoints (oldest deleted first); None keeps all.

    Returns:
        The committed checkpoint directory (the same path on every rank).
    """
    root = Path(output_dir) / CHECKPOINTS_DIR
    final = root / checkpoint_name(step)
    tmp = root / f"{TMP_PREFIX}{final.name}"

    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # a save of this step that was killed midway
            shutil.rmtree(tmp)
        tmp.mkdir()
    accelerator.wait_for_everyone()

    # Every rank writes its part: its RNG state, and under DeepSpeed its ZeRO partitions.
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        write_json(tmp / TRAINER_STATE_NAME, {**state, "step": step}, sort_keys=True)
        _fsync_tree(tmp)
        # Written last: its presence means every file above is complete; it lists them for load-time checks.
        write_json(
            tmp / COMPLETE_NAME,
            {"step": step, "num_processes": accelerator.num_processes, "files": _file_listing(tmp)},
            sort_keys=True,
        )
        _fsync_dir(tmp)
        _commit_dir(tmp, final)
        _rotate(root, final, total_limit)
    accelerator.wait_for_everyone()
    return final


def check_complete(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise UserError(f"checkpoint {path} does not exist; pass an existing checkpoint directory or 'latest'")
    marker = path / COMPLETE_NAME
    if not marker.is_file():
        raise UserError(
            f"checkpoint {path} is incomplete (no {COMPLETE_NAME} marker: the save was interrupted); "
            "delete it or resume from an earlier checkpoint"
        )
    try:
        manifest = json.loads(marker.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"checkpoint {path} has an unreadable {COMPLETE_NAME} marker; delete the checkpoint") from None
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            raise UserError(f"checkpoint {path} is corrupt: {name} is missing; delete it or use an earlier one")
        if file.stat().st_size != size:
            raise UserError(
                f"checkpoint {path} is corrupt: {name} has {file.stat().st_size} bytes, expected {size}; "
                "delete it or use an earlier one"
            )
    return manifest


def load_checkpoint(accelerator: Accelerator, path: str | os.PathLike) -> dict[str, Any]:
    """Restores model, optimizer, scheduler, scaler and RNG states from ``path``; returns trainer_state.json.

    Call after ``accelerator.prepare`` with the same objects, on any number of processes (for DeepSpeed, after
    ``prepare_resume`` before ``prepare``). Every rank must call it. A missing, incomplete or damaged checkpoint
    raises ``UserError`` naming the path.
    """
    path = Path(path)
    manifest = check_complete(path)
    saved_world = manifest.get("num_processes", accelerator.num_processes)
    trainer_state = _read_trainer_state(path)
    try:
        if saved_world != accelerator.num_processes:
            # Another world size: ZeRO partitions re-partitioned, missing per-rank RNG files filled (ltgbert.elastic;
            # under DeepSpeed ``prepare_resharded_resume`` converted the checkpoint before ``prepare``).
            from ltgbert.elastic import load_state_resharded

            load_state_resharded(accelerator, path, saved_world)
        else:
            accelerator.load_state(str(path))
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, ValueError, RuntimeError) as e:
        detail = " ".join(str(e).split())[:300]
        raise UserError(
            f"cannot restore checkpoint {path} ({type(e).__name__}: {detail}); it does not match this model/"
            "optimizer or is damaged: check the run's config or resume from an earlier checkpoint"
        ) from None
    return trainer_state


def _read_trainer_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / TRAINER_STATE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(
            f"checkpoint {path} has an unreadable {TRAINER_STATE_NAME} ({e}); delete the checkpoint"
        ) from None


# -----------------------------------------------------------------------------
# release export


def export_final_model(
    accelerator: Accelerator,
    model: Any,
    output_dir: str | os.PathLike,
    tokenizer: Any | None = None,
    subdir: str = "final",
    before_commit: Callable[[Path], None] | None = None,
) -> Path:
    """Writes a standard Hugging Face model directory ``output_dir/<subdir>``; every rank must call it.

    The weights come from ``accelerator.get_state_dict`` (gathered across ranks under ZeRO-3; a collective,
    hence every rank). The main process writes ``save_pretrained`` (safetensors) and the tokenizer into a
    temporary directory, calls ``before_commit(tmp_dir)`` for extra files (remote code, a model card), and
    renames it into place; an existing export stays untouched until the new one is complete.
    """
    state_dict = accelerator.get_state_dict(model)
    final = Path(output_dir) / subdir
    if accelerator.is_main_process:
        tmp = final.with_name(f"{TMP_PREFIX}{subdir}")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=state_dict)
        if tokenizer is not None:
            from ltgbert.tokenization import save_tokenizer

            save_tokenizer(tokenizer, tmp)
        if before_commit is not None:
            before_commit(tmp)
        _fsync_tree(tmp)
        _commit_dir(tmp, final)
    accelerator.wait_for_everyone()
    return final


def enable_activation_checkpointing(model, use_reentrant: bool = False) -> None:
    """Turn on gradient (activation) checkpointing of a transformers model, non-reentrant by default.

    transformers 5.x renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable`` and warns
    on the old name; versions without the new name get the old one.
    """
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})


# -----------------------------------------------------------------------------
# a training checkpoint -> a model directory


def _model_of_training_checkpoint(checkpoint: Path):
    """(LtgBertForMaskedLM with the checkpoint's weights, the run's tokenizer directory)."""
    from ltgbert import LtgBertConfig, LtgBertForMaskedLM
    from ltgbert.modeling_ltgbert import convert_state_dict

    run = _read_trainer_state(checkpoint).get("config") or {}
    if "model_config" not in run:
        raise UserError(f"{checkpoint} does not record its model config (not written by launch/pretrain.py)")
    config = LtgBertConfig(**{k: v for k, v in run["model_config"].items() if k != "model_type"})
    model = LtgBertForMaskedLM(config)
    # convert_state_dict: checkpoints written before the MLM bias moved into the decoder name it lm_head.bias.
    missing, unexpected = model.load_state_dict(convert_state_dict(checkpoint_weights(checkpoint)), strict=False)
    missing = [k for k in missing if k != "lm_head.decoder.weight"]  # tied to the word embeddings
    if missing or unexpected:
        raise UserError(
            f"checkpoint {checkpoint} does not match its model config (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}); it may be corrupt"
        )
    model.tie_weights()
    tokenizer_dir = (
        run.get("tokenizer_name") or run.get("model_name_or_path") or str(checkpoint.parents[1] / "tokenizer")
    )
    return model, tokenizer_dir


def checkpoint_weights(checkpoint: Path) -> dict[str, Any]:
    """The model's full fp32 state dict from an accelerate (or DeepSpeed, any ZeRO stage) checkpoint directory."""
    import torch
    from safetensors.torch import load_file

    if (checkpoint / "model.safetensors").exists():
        return load_file(checkpoint / "model.safetensors")
    if (checkpoint / "pytorch_model.bin").exists():
        return torch.load(checkpoint / "pytorch_model.bin", map_location="cpu", weights_only=True)
    zero_dirs = [p for p in checkpoint.iterdir() if p.is_dir() and any(p.glob("*model_states.pt"))]
    if zero_dirs:  # DeepSpeed: merge the ZeRO partitions
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=zero_dirs[0].name)
    raise UserError(f"no model weights in {checkpoint}; pass a checkpoints/step_* directory written by pretrain.py")


def export_checkpoint(
    checkpoint: str | os.PathLike, output_dir: str | os.PathLike, tokenizer_name: str | None = None
) -> Path:
    """A model directory as pretraining's final/ is: consolidated weights, config with auto_map, the two
    remote-code files and the tokenizer, from

    - a pretraining checkpoint (``checkpoints/step_*``, any world size, ZeRO shards included), or
    - any LTG-BERT model directory or Hub id, a published LTG-BERT/HPLT one included (read into our classes
      without running its code; written in our layout: ``model_type``, our key names, safetensors).

    Offline, on one CPU process. Written atomically: an existing ``output_dir`` is replaced only once the new one
    is whole.
    """
    from ltgbert.loading import load_tokenizer
    from ltgbert.tokenization import save_tokenizer

    checkpoint, output_dir = Path(checkpoint), Path(output_dir)
    if (checkpoint / TRAINER_STATE_NAME).is_file():
        model, tokenizer_dir = _model_of_training_checkpoint(checkpoint)
    else:
        from ltgbert import LtgBertForMaskedLM
        from ltgbert.loading import load_model

        looks_like_hub_id = not checkpoint.is_absolute() and len(checkpoint.parts) == 2
        if not checkpoint.exists() and not looks_like_hub_id:
            raise UserError(
                f"{checkpoint} does not exist; pass a checkpoints/step_* directory, a model directory or a Hub id"
            )
        if checkpoint.exists() and not (checkpoint / "config.json").is_file():
            raise UserError(
                f"{checkpoint} is neither a pretraining checkpoint (no {TRAINER_STATE_NAME}) nor a model directory "
                "(no config.json); pass a checkpoints/step_* directory or a model directory"
            )
        model, tokenizer_dir = load_model(LtgBertForMaskedLM, str(checkpoint)), str(checkpoint)
    tokenizer = load_tokenizer(tokenizer_name or tokenizer_dir, config=model.config)
    tmp = output_dir.with_name(f"{TMP_PREFIX}{output_dir.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    save_tokenizer(tokenizer, tmp)
    _fsync_tree(tmp)
    _commit_dir(tmp, output_dir)
    return output_dir
