"""The training core shared by launch/pretrain.py and launch/finetune.py.

Both scripts solve the same problems; each is solved once, here, as plain functions around one small state
object (no Trainer class, no callbacks; STYLE.md):

1. The arguments every training script takes are sections in ``ltgbert.arguments`` (``OutputArguments``,
   ``OptimizationArguments``, ``RuntimeArguments``); the batches of every step come from
   ``ltgbert.batching.StepBatches``.
2. Start-up (``start_run``): the resume checkpoint (``latest`` or a path, validated the same way for both), the
   global batch a resumed run must keep (accumulation adjusted when the world size changed), the accelerator
   (``ltgbert.distributed.make_accelerator``) with the trackers of ``--report_to``, the output directory
   (a used one is refused; ``--overwrite_output_dir`` moves the old outputs into a dated backup folder, never
   deletes them) and the preemption handler (SIGUSR1/SIGTERM).
3. DeepSpeed's ``"auto"`` values (``fill_deepspeed_config``): filled from the script's flags, since the scripts
   feed batches themselves; an explicit value that contradicts a flag is refused.
4. The optimizer step (``train_step``): forward and backward of every micro-batch, then ONE all-reduce that
   carries the non-finite-loss flag, the preemption flag and the words consumed, so every rank takes the same
   decision at the same step: skip the step (DDP: no update at all; DeepSpeed, which steps inside backward: the
   bad micro-batch's gradient is zeroed and the step runs with learning rate 0, so the weights do not move),
   stop after a checkpoint, or go on. Gradient clipping (DeepSpeed clips itself, from its config).
5. Logging (``MetricWindow``, ``MetricsLog``): sums kept on the device between logging steps (no host sync per
   step but the one above), reduced over ranks when logged; every logged line goes to the trackers, to stdout
   and to ``<output_dir>/metrics.jsonl`` (one JSON object per line, what tests and tools read).
6. Checkpoints (``save_training_state``): ``ltgbert.checkpointing`` with the state, the resolved config and the
   run's fingerprint (corpus / task data and tokenizer) that a resume checks, so a checkpoint of another run is
   refused.

The data position of a run is a number of samples into the epoch (``TrainState.samples_in_epoch``) and the
batch order depends only on (seed, epoch, global batch) (``ltgbert.batching``): so a run resumes exactly, also
on another number of processes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from ltgbert.arguments import tracker_names
from ltgbert.checkpointing import CHECKPOINTS_DIR, TRAINER_STATE_NAME, find_latest_checkpoint, save_checkpoint
from ltgbert.distributed import is_deepspeed, make_accelerator, world_size_from_env
from ltgbert.errors import UserError
from ltgbert.io import append_jsonl, write_text
from ltgbert.preemption import PreemptionHandler

__all__ = [
    "TrainState",
    "Run",
    "start_run",
    "is_deepspeed",
    "fill_deepspeed_config",
    "train_step",
    "StepResult",
    "MetricWindow",
    "MetricsLog",
    "save_training_state",
    "fingerprint_files",
    "fingerprint_tokenizer",
    "check_resume_compatible",
]

METRICS_NAME = "metrics.jsonl"
RUN_CONFIG_NAME = "run_config.json"

# ----------------------------------------------------------------------------- state


@dataclass
class TrainState:
    """Everything the loop counts; saved in every checkpoint, so a resumed run continues where this one was."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch (of the current phase) the next step reads from
    samples_in_epoch: int = 0  # data position: rows of that epoch consumed by all ranks
    samples_seen: int = 0  # rows consumed in all
    words_seen: int = 0  # whitespace words of the text consumed (pretraining)
    phase: int = 0  # pretraining phase (sequence length) the data position belongs to
    skipped_steps: int = 0
    consecutive_skips: int = 0
    milestones_written: list[int] = field(default_factory=list)  # word counts whose release directory exists
    best_metric: float | None = None  # fine-tuning: model selection
    best_step: int | None = None
    evals_without_improvement: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def advance(self, rows: int, words: int) -> None:
        """One optimizer step consumed ``rows`` rows (all ranks) holding ``words`` words."""
        self.step += 1
        self.samples_in_epoch += rows
        self.samples_seen += rows
        self.words_seen += words

    def next_epoch(self) -> None:
        self.epoch, self.samples_in_epoch = self.epoch + 1, 0


# ----------------------------------------------------------------------------- start-up


@dataclass
class Run:
    """What ``start_run`` sets up: the accelerator and everything around it that both scripts need."""

    accelerator: Any
    output_dir: Path
    preemption: PreemptionHandler
    resume_path: Path | None
    resume_state: dict[str, Any] | None  # the checkpoint's trainer_state.json
    gradient_accumulation_steps: int  # possibly adjusted to keep a resumed run's global batch
    log: MetricsLog
    backup_dir: Path | None = None

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes


def resolve_resume(output_dir: Path, resume_from_checkpoint: str | None) -> Path | None:
    """The checkpoint to resume from: None, the newest complete one ('latest'), or a validated path."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        return find_latest_checkpoint(output_dir)
    path = Path(resume_from_checkpoint)
    if not (path / TRAINER_STATE_NAME).is_file():
        raise UserError(
            f"no checkpoint at {path} (no {TRAINER_STATE_NAME}); pass a checkpoints/step_* directory or 'latest'"
        )
    return path


def _read_trainer_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / TRAINER_STATE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UserError(
            f"checkpoint {path} has no readable {TRAINER_STATE_NAME}; it is incomplete or corrupt, "
            "pass another checkpoint"
        ) from None


def keep_global_batch(saved: dict[str, Any], per_device: int, accumulation: int, world_size: int) -> int:
    """Gradient accumulation that keeps a resumed run's global batch on ``world_size`` processes.

    A checkpoint of N processes resumes on M: the rows per step must stay the same (the learning-rate schedule
    and the data position assume it), so accumulation absorbs the change; where it cannot, the run is refused.
    """
    global_batch = saved.get("global_batch_size")
    if global_batch is None or global_batch == per_device * accumulation * world_size:
        return accumulation
    per_step = per_device * world_size
    if global_batch % per_step:
        raise UserError(
            f"the checkpoint was trained with a global batch of {global_batch} rows per step; {world_size} "
            f"process(es) x {per_device} rows cannot make it with any --gradient_accumulation_steps: resume on a "
            f"number of processes that divides {global_batch // per_device}, or pass a "
            "--per_device_train_batch_size that divides the global batch per process"
        )
    return global_batch // per_step


def start_run(args, tracker_project: str) -> Run:
    """Preemption handler, resume checkpoint, accelerator, output directory: the scripts' setup.

    ``args`` has the three argument sections. Every rank calls it; only the main process writes. Trackers start
    with ``start_trackers`` once the run's configuration is known.
    """
    preemption = PreemptionHandler().install()  # before anything slow: a signal during setup is kept
    if args.disable_tqdm:
        import datasets

        datasets.disable_progress_bars()
    resume_path, resume_state, accumulation = _resume_plan(args, world_size_from_env())
    accelerator = make_accelerator(
        gradient_accumulation_steps=accumulation,
        mixed_precision=args.mixed_precision,
        step_scheduler_with_optimizer=False,
        log_with=tracker_names(args.report_to) or None,
        project_dir=str(Path(args.output_dir) / "logs"),
    )
    return _open_output(accelerator, preemption, args, resume_path, resume_state, accumulation)


def attach_output(run: Run, args) -> Run:
    """The same accelerator and signal handler for another output directory (the next task of a multi-task
    fine-tuning): one process group for the whole job."""
    resume_path, resume_state, accumulation = _resume_plan(args, run.world_size)
    run.accelerator.gradient_accumulation_steps = accumulation
    return _open_output(run.accelerator, run.preemption, args, resume_path, resume_state, accumulation)


def _resume_plan(args, world_size: int) -> tuple[Path | None, dict[str, Any] | None, int]:
    resume_path = resolve_resume(Path(args.output_dir), args.resume_from_checkpoint)
    resume_state = _read_trainer_state(resume_path) if resume_path is not None else None
    accumulation = args.gradient_accumulation_steps
    if resume_state is not None:
        accumulation = keep_global_batch(resume_state, args.per_device_train_batch_size, accumulation, world_size)
    return resume_path, resume_state, accumulation


def _open_output(accelerator, preemption, args, resume_path, resume_state, accumulation) -> Run:
    output_dir = Path(args.output_dir)
    if accumulation != args.gradient_accumulation_steps:
        accelerator.print(
            f"resuming on {accelerator.num_processes} process(es): gradient accumulation "
            f"{args.gradient_accumulation_steps} -> {accumulation} keeps the checkpoint's global batch "
            f"of {resume_state['global_batch_size']}"
        )
    backup = prepare_output_dir(accelerator, output_dir, args.overwrite_output_dir, args.resume_from_checkpoint)
    log = MetricsLog(accelerator, output_dir / METRICS_NAME)
    return Run(accelerator, output_dir, preemption, resume_path, resume_state, accumulation, log, backup)


_OUTPUT_NAMES = (
    "run_config.json",
    "tokenizer",
    CHECKPOINTS_DIR,
    "final",
    "best",
    "logs",
    METRICS_NAME,
    "metrics.json",
    "pretrained_export",
)


def prepare_output_dir(accelerator, output_dir: Path, overwrite: bool, resume: str | None) -> Path | None:
    """Refuses a used directory unless told what to do; ``overwrite`` moves its outputs into a backup folder.

    Returns the backup folder (or None). The main process works, the others wait, so nobody reads a half-moved
    directory.
    """
    backup, error = None, None
    if accelerator.is_main_process:
        used = [n for n in _OUTPUT_NAMES if (output_dir / n).exists()]
        try:
            if used and not overwrite and not resume:
                raise UserError(
                    f"output directory {output_dir} already holds a run ({', '.join(used[:3])}); pass "
                    "--resume_from_checkpoint latest to continue it, --overwrite_output_dir to start afresh "
                    "there (the old outputs are kept in a backup folder), or another --output_dir"
                )
            if used and overwrite:
                backup = output_dir / f"backup-{datetime.now():%Y%m%d-%H%M%S}"
                backup.mkdir(parents=True)
                for name in used:
                    os.replace(output_dir / name, backup / name)
                if any(p.name.startswith(".tmp-") for p in output_dir.iterdir()):
                    for p in output_dir.iterdir():  # half-written exports of the old run go with it
                        if p.name.startswith(".tmp-"):
                            os.replace(p, backup / p.name)
            output_dir.mkdir(parents=True, exist_ok=True)
            probe = output_dir / f".write-test-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            error = f"output directory {output_dir} is not writable ({e.strerror}); pass a writable --output_dir"
        except UserError as e:
            error = str(e)
    error = _broadcast(accelerator, error)
    if error:
        raise UserError(error)
    if backup is not None:
        accelerator.print(f"--overwrite_output_dir: the earlier outputs of {output_dir} moved to {backup}")
    return _broadcast(accelerator, backup)


def _broadcast(accelerator, obj):
    from ltgbert.distributed import broadcast_object

    return broadcast_object(accelerator, obj)


def fill_deepspeed_config(accelerator, micro_batch_size: int, accumulation: int, max_grad_norm: float) -> None:
    """Fills DeepSpeed's "auto" batch, accumulation and clipping values from the script's flags.

    The scripts feed batches themselves (no prepared DataLoader for accelerate to read them from). An explicit
    value in the DeepSpeed JSON that contradicts a flag would silently change the run, so it is refused.
    """
    if not is_deepspeed(accelerator):
        return
    plugin = accelerator.state.deepspeed_plugin
    config = plugin.deepspeed_config
    values = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": max_grad_norm,
        "train_batch_size": micro_batch_size * accumulation * accelerator.num_processes,
    }
    flags = {
        "train_micro_batch_size_per_gpu": "--per_device_train_batch_size",
        "gradient_accumulation_steps": "--gradient_accumulation_steps",
        "gradient_clipping": "--max_grad_norm",
        "train_batch_size": "the global batch",
    }
    for key, value in values.items():
        current = config.get(key, "auto")
        if current == "auto":
            config[key] = value
        elif float(current) != float(value):
            raise UserError(
                f"the DeepSpeed config sets {key} = {current} but {flags[key]} gives {value}; set it to "
                '"auto" in the DeepSpeed JSON (the script fills it) or pass the same value'
            )


def check_optimizer_supported(accelerator, optimizer: str) -> None:
    """LAMB under DeepSpeed ZeRO is refused: ZeRO hands a client optimizer each rank's flat partition of a whole
    parameter group as ONE tensor, so LAMB's per-tensor trust ratio (the point of LAMB) would be computed over
    the group, and differently for every world size."""
    if optimizer == "lamb" and is_deepspeed(accelerator):
        raise UserError(
            "--optimizer lamb does not work under DeepSpeed ZeRO (its trust ratio needs whole tensors; "
            "ZeRO gives the optimizer flat partitions): use DDP (launch/accelerate/ddp.yaml) for LAMB, "
            "or --optimizer adamw with ZeRO"
        )


def prepare_resume(run: Run) -> None:
    """Before ``accelerator.prepare``: checks the resume checkpoint is whole and, under DeepSpeed on another
    number of processes, converts it for re-partitioning (``ltgbert.elastic``); every rank calls it."""
    if run.resume_path is None:
        return
    from ltgbert.checkpointing import check_complete
    from ltgbert.elastic import prepare_resharded_resume

    check_complete(run.resume_path)
    prepare_resharded_resume(run.accelerator, run.resume_path)


# ----------------------------------------------------------------------------- fingerprints


def fingerprint_files(paths) -> str:
    """A fingerprint of a corpus that survives a copy to other storage: names, sizes, first and last MiB.

    (Not paths or modification times: a job requeued onto other nodes may read a copy of the data.)
    """
    h = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        if not path.is_file():
            raise UserError(f"file not found: {path}; check the path passed as --train_file")
        size = path.stat().st_size
        h.update(f"{path.name}\0{size}\n".encode())
        with open(path, "rb") as f:
            h.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(size - (1 << 20))
                h.update(f.read())
    return h.hexdigest()[:16]


def fingerprint_tokenizer(tokenizer) -> str:
    """A fingerprint of the whole tokenizer definition (vocabulary, normaliser, special tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_resume_compatible(run: Run, fingerprint: dict[str, str], model_config: dict[str, Any] | None = None):
    """Refuses to resume a checkpoint of another run: other data, another tokenizer, another model shape."""
    if run.resume_state is None:
        return
    path, saved = run.resume_path, run.resume_state
    for key, value in fingerprint.items():
        old = saved.get("fingerprint", {}).get(key)
        if old is not None and old != value:
            raise UserError(
                f"checkpoint {path} belongs to another run: its {key} fingerprint is {old}, this run's "
                f"{value}; resume with the same data and tokenizer, or start afresh in another --output_dir"
            )
    saved_model = (saved.get("config") or {}).get("model_config") or {}
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if model_config and key in saved_model and saved_model[key] != model_config.get(key):
            raise UserError(
                f"checkpoint {path} is for a model with {key}={saved_model[key]}, not "
                f"{model_config.get(key)}; resume with the run's own model config, or start afresh in "
                "another --output_dir"
            )


# ----------------------------------------------------------------------------- the optimizer step


@dataclass
class StepResult:
    skipped: bool
    stop_requested: bool  # a preemption signal reached some rank
    grad_norm: float | None
    rows: int  # rows consumed by all ranks
    words: int  # words consumed by all ranks


def _zero_loss(out) -> torch.Tensor:
    # A zero that depends on the model's output, so that DeepSpeed's backward (which must run on every rank)
    # reduces zero gradients instead of NaN ones.
    return out.logits.float().nan_to_num().sum() * 0.0


def train_step(
    run: Run,
    args,
    model,
    optimizer,
    scheduler,
    micro_batches: list[dict[str, torch.Tensor]],
    state: TrainState,
    forward: Callable[[Any, dict], tuple[torch.Tensor, Any]],
    stats: Callable[[dict, torch.Tensor, Any], dict[str, torch.Tensor]] | None = None,
    window: MetricWindow | None = None,
) -> StepResult:
    """One optimizer step over ``micro_batches`` (this rank's share); every rank calls it with the same count.

    ``args`` has the shared argument sections (clipping, the skip limit, the test-only NaN step).
    ``forward(model, batch) -> (loss, out)`` runs the model; ``stats(batch, loss, out)`` gives the sums the
    script logs, added to ``window``. A batch's ``words`` entry (words of its rows) is popped and counted.
    """
    accelerator = run.accelerator
    device = accelerator.device
    deepspeed = is_deepspeed(accelerator)
    bad = torch.zeros((), device=device)
    words = torch.zeros((), device=device, dtype=torch.float64)
    rows = 0
    for i, batch in enumerate(micro_batches):
        batch_words = batch.pop("words", None)
        if batch_words is not None:
            words += batch_words.sum()
        rows += int(batch["input_ids"].shape[0])
        with accelerator.accumulate(model):
            loss, out = forward(model, batch)
            if args.debug_nan_at_step == state.step + 1 and accelerator.is_main_process:
                loss = loss * float("nan")
            micro_bad = (~torch.isfinite(loss.detach())).float()
            if deepspeed:
                # DeepSpeed steps inside the last backward: agree before it, zero a bad micro-batch's gradient,
                # and give a step that had any bad micro-batch a learning rate of 0.
                micro_bad = accelerator.reduce(micro_bad, reduction="sum").clamp(max=1)
                if micro_bad.item() > 0:
                    loss = _zero_loss(out)
                bad = torch.maximum(bad, micro_bad)
                if i == len(micro_batches) - 1 and bad.item() > 0:
                    for group in optimizer.param_groups:
                        group["lr"] = 0.0
            else:
                bad = torch.maximum(bad, micro_bad)
            accelerator.backward(loss)
        if window is not None and stats is not None:
            with torch.no_grad():
                window.add(**stats(batch, loss.detach(), out))
    if not accelerator.sync_gradients:  # accelerate's micro-batch count and ours disagree: a step would be lost
        raise RuntimeError(
            f"gradient accumulation out of step: {len(micro_batches)} micro-batches did not end at a "
            f"sync point (accelerate counts {accelerator.step} micro-steps)"
        )
    # The one all-reduce of the step: skip, stop and words, the same on every rank.
    flags = torch.stack(
        [
            bad.double(),
            torch.tensor(float(run.preemption.requested), device=device, dtype=torch.float64),
            words,
            torch.tensor(float(rows), device=device, dtype=torch.float64),
        ]
    )
    flags = accelerator.reduce(flags, reduction="sum")
    skipped = flags[0].item() > 0
    grad_norm = None
    if skipped:
        state.skipped_steps += 1
        state.consecutive_skips += 1
        optimizer.zero_grad(set_to_none=True)
        if state.consecutive_skips >= args.max_consecutive_skips:
            raise UserError(
                f"{state.consecutive_skips} consecutive steps had a non-finite loss (last at step "
                f"{state.step + 1}); lower --learning_rate, raise --warmup_ratio or use bf16 instead "
                "of fp16"
            )
    else:
        state.consecutive_skips = 0
        if deepspeed:
            grad_norm = _deepspeed_grad_norm(model)
        else:
            if args.max_grad_norm > 0:
                grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm))
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    if window is not None:
        window.steps += 1
    state.advance(int(flags[3].item()), int(flags[2].item()))
    return StepResult(skipped, flags[1].item() > 0, grad_norm, int(flags[3].item()), int(flags[2].item()))


def _deepspeed_grad_norm(model) -> float | None:
    get = getattr(model, "get_global_grad_norm", None)
    norm = get() if get is not None else None
    if norm is None:
        return None
    norm = float(norm.item() if hasattr(norm, "item") else norm)
    return norm if math.isfinite(norm) else None


# ----------------------------------------------------------------------------- logging


class MetricWindow:
    """Named sums kept on the device between logging steps, reduced over all ranks when logged."""

    def __init__(self, device):
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.start = time.perf_counter()

    def add(self, **values) -> None:
        for name, value in values.items():
            value = torch.as_tensor(value, device=self.device, dtype=torch.float64)
            if name in self.sums:
                self.sums[name] += value
            else:
                self.sums[name] = value.clone()

    def reduce(self, accelerator) -> dict[str, float]:
        """The sums over all ranks (one all-reduce), plus ``seconds`` since the window started."""
        names = sorted(self.sums)
        values = (
            accelerator.reduce(torch.stack([self.sums[n] for n in names]), reduction="sum").tolist() if names else []
        )
        totals = dict(zip(names, values))
        totals["seconds"] = time.perf_counter() - self.start
        return totals

    def reset(self) -> None:
        self.sums.clear()
        self.steps = 0
        self.start = time.perf_counter()


class MetricsLog:
    """Where logged values go: the trackers (every rank calls; accelerate logs on the main process), stdout and
    ``metrics.jsonl`` (main process). A resumed run first drops the lines a dead run wrote after its checkpoint,
    so the file holds each step once."""

    def __init__(self, accelerator, path: Path):
        self.accelerator, self.path = accelerator, Path(path)

    def resume_at(self, step: int) -> None:
        """Drops what a run that died after its checkpoint at ``step`` logged later (main process)."""
        if not self.accelerator.is_main_process or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except ValueError:
                continue  # a line torn by a kill
        write_text(self.path, "".join(f"{line}\n" for line in kept))

    def log(self, metrics: dict[str, Any], step: int, message: str | None = None) -> None:
        self.accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
        if self.accelerator.is_main_process:
            append_jsonl(self.path, {"step": step, **metrics})
            if message:
                from tqdm.auto import tqdm

                tqdm.write(message)


def start_trackers(accelerator, project: str, config: dict[str, Any], logging_dir: Path | None = None) -> None:
    """(Re)starts the trackers for one run, logging ``config`` as hyper-parameters; a multi-task run calls it once
    per task with that task's logging directory."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers.clear()
    if logging_dir is not None:
        accelerator.project_configuration.logging_dir = str(logging_dir)
    if accelerator.log_with:
        hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}
        accelerator.init_trackers(project, config=hparams)


# ----------------------------------------------------------------------------- checkpoints


def restore(run: Run) -> TrainState:
    """The state to start from: the resume checkpoint's (model, optimizer, scheduler, RNG restored, metrics.jsonl
    cut back to its step), or a fresh one. Call after ``accelerator.prepare``; every rank calls it."""
    from ltgbert.checkpointing import load_checkpoint

    if run.resume_path is None:
        return TrainState()
    state = TrainState.from_dict(load_checkpoint(run.accelerator, run.resume_path))
    # accelerate restores its micro-batch counter, which decides where gradient accumulation syncs (and whether
    # a prepared optimizer steps at all); on another world size the accumulation changed, so count afresh.
    run.accelerator.step = state.step * run.gradient_accumulation_steps
    run.log.resume_at(state.step)
    run.accelerator.print(f"resumed from {run.resume_path} at step {state.step}")
    return state


def save_training_state(
    run: Run,
    state: TrainState,
    run_config: dict[str, Any],
    fingerprint: dict[str, str],
    global_batch_size: int,
    total_limit: int | None,
) -> Path:
    """A resumable checkpoint of the step just done: accelerator state + trainer_state.json (state, config,
    fingerprint, global batch, world size); every rank calls it."""
    return save_checkpoint(
        run.accelerator,
        run.output_dir,
        state.step,
        {
            **state.to_dict(),
            "config": run_config,
            "fingerprint": fingerprint,
            "global_batch_size": global_batch_size,
            "world_size": run.world_size,
        },
        total_limit=total_limit,
    )


def write_run_config(run: Run, run_config: dict[str, Any]) -> None:
    """``<output_dir>/run_config.json``: the resolved configuration (``--config`` of it reproduces the run)."""
    from ltgbert.io import write_json

    if run.accelerator.is_main_process:
        write_json(run.output_dir / RUN_CONFIG_NAME, run_config, sort_keys=True)
