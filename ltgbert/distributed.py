"""Creating the ``Accelerator`` so that the world size is right, and all-rank agreement helpers.

Why a wrapper around ``accelerate.Accelerator()``: on machines without a GPU, ``accelerate launch`` starts the
right number of processes but a plain ``Accelerator()`` inside them can silently end up with a world of one
per process: every rank believes it is the main process, data is not sharded, checkpoints are written twice,
and ``get_state_dict`` returns None on all but one rank. What we observed (accelerate 1.15, DeepSpeed 0.19,
torch 2.x CPU build, 2 processes):

1. DeepSpeed (``--use_deepspeed``): DeepSpeed forms a 2-rank gloo group, but accelerate, finding no GPU
   backend, records ``num_processes == 1``. Passing ``InitProcessGroupKwargs(backend="gloo")`` makes
   accelerate adopt the gloo group: world 2, ``distributed_type == DEEPSPEED``.
2. DDP (``--multi_gpu``): without a GPU each process is a world of one unless accelerate is told to use the
   CPU (``ACCELERATE_USE_CPU=true`` from the launcher, or ``--cpu``); then it is ``MULTI_CPU`` over gloo.
   ``make_accelerator`` passes ``cpu=True`` itself, which accelerate treats the same as that variable.

Launch commands checked to give a real world of 2 on CPU with ``make_accelerator`` (the same flags work
unchanged on GPUs; a plain ``Accelerator()`` gets a world of 1 with all of them on CPU):

    accelerate launch --multi_gpu --num_processes 2 launch/pretrain.py ...                  # DDP (MULTI_CPU)
    accelerate launch --use_deepspeed --zero_stage {1,2,3} --num_processes 2 launch/pretrain.py ...
    accelerate launch --config_file X.yaml ...   # distributed_type: DEEPSPEED with deepspeed_config_file
                                                 # (and no top-level mixed_precision key), or MULTI_GPU

The first DeepSpeed launch on a machine JIT-compiles DeepSpeed's shared-memory CPU collective op into
``~/.cache/torch_extensions`` (minutes); a launch killed during that compile leaves a ``lock`` file there
that makes every later DeepSpeed launch wait forever, and deleting it fixes that.

After creation ``make_accelerator`` checks ``accelerator.num_processes == WORLD_SIZE`` and raises
``RuntimeError`` otherwise, so this class of bug fails at start-up instead of training N copies of a model.

The process-group timeout is long (60 minutes by default): while rank 0 tokenises a corpus under
``main_process_first()``, the other ranks wait in a barrier, and the default 30 minutes is too short for a
large corpus.

16-bit mixed precision on a CPU is a speed lever only where the CPU has 16-bit matrix instructions
(AVX512-BF16 or AMX for bf16, AVX512-FP16 or AMX-FP16 for fp16). Elsewhere oneDNN emulates them: on an AVX2
machine (AMD EPYC, Zen 2) a bf16 autocast step of the small model ran 13x slower than fp32. ``make_accelerator``
warns, on the main process, when a CPU run asks for a 16-bit precision that the CPU lacks.
"""

from __future__ import annotations

import os
import warnings
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, broadcast_object_list

__all__ = [
    "make_accelerator",
    "is_deepspeed",
    "all_ranks_any",
    "all_ranks_all",
    "broadcast_object",
    "world_size_from_env",
    "cpu_has_native",
    "warn_if_cpu_precision_is_emulated",
]


def world_size_from_env() -> int:
    """The world size the launcher (torchrun / accelerate launch / srun wrapper) announced; 1 if none."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _deepspeed_requested(kwargs: dict[str, Any]) -> bool:
    # The launcher sets ACCELERATE_USE_DEEPSPEED; a script may also pass a DeepSpeedPlugin explicitly.
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" or (
        kwargs.get("deepspeed_plugin") is not None or kwargs.get("deepspeed_plugins") is not None
    )


def make_accelerator(timeout_minutes: float = 60.0, **kwargs: Any) -> Accelerator:
    """Creates the ``Accelerator``, making a multi-process launch on CPU form one world of ``WORLD_SIZE``.

    Args:
        timeout_minutes: process-group timeout (how long a rank waits in a collective before failing).
        **kwargs: passed to ``Accelerator`` (``mixed_precision``, ``gradient_accumulation_steps``,
            ``log_with``, ``project_dir``, ``kwargs_handlers``, ...). An ``InitProcessGroupKwargs`` given in
            ``kwargs_handlers`` is kept; only its missing backend is filled in on CPU.

    Raises:
        RuntimeError: the accelerator's world size differs from ``WORLD_SIZE`` (a launch that would train
            independent copies of the model).
    """
    world_size = world_size_from_env()
    multi_process_cpu = world_size > 1 and not torch.cuda.is_available()
    deepspeed = _deepspeed_requested(kwargs)

    handlers = list(kwargs.pop("kwargs_handlers", None) or [])
    init_kwargs = next((h for h in handlers if isinstance(h, InitProcessGroupKwargs)), None)
    if init_kwargs is None:
        init_kwargs = InitProcessGroupKwargs(timeout=timedelta(minutes=timeout_minutes))
        handlers.append(init_kwargs)
    if multi_process_cpu and deepspeed and init_kwargs.backend in (None, "nccl"):
        # Without an explicit backend accelerate finds no GPU and records a world of 1 on every rank. ("nccl"
        # is InitProcessGroupKwargs' default, which accelerate never forwards, so it means "not chosen".)
        init_kwargs.backend = "gloo"
    if multi_process_cpu and not deepspeed:
        # Same effect as ACCELERATE_USE_CPU=true from the launcher: MULTI_CPU over gloo. (cpu=True would
        # switch DeepSpeed off, hence only here.)
        kwargs["cpu"] = True

    accelerator = Accelerator(kwargs_handlers=handlers, **kwargs)

    if accelerator.num_processes != world_size:
        raise RuntimeError(
            f"accelerate formed a world of {accelerator.num_processes} process(es) but the launcher started "
            f"WORLD_SIZE={world_size} (distributed_type={accelerator.distributed_type}, "
            f"cuda available: {torch.cuda.is_available()}); every rank would train its own copy. On CPU use "
            "`accelerate launch --multi_gpu --num_processes N` for DDP or `--use_deepspeed --num_processes N` "
            "for DeepSpeed, and create the accelerator with ltgbert.distributed.make_accelerator()"
        )
    if accelerator.is_main_process:
        warn_if_cpu_precision_is_emulated(accelerator.device, accelerator.mixed_precision)
    return accelerator


def cpu_has_native(precision: str) -> bool:
    """Whether this CPU has matrix instructions for ``precision`` ("bf16" or "fp16"), by oneDNN's own probe.

    True where torch has no such probe: the warning below is then never raised by mistake.
    """
    probe = {"bf16": "_is_mkldnn_bf16_supported", "fp16": "_is_mkldnn_fp16_supported"}[precision]
    try:
        return bool(getattr(torch.ops.mkldnn, probe)())
    except (AttributeError, RuntimeError):
        return True


def warn_if_cpu_precision_is_emulated(device: torch.device, mixed_precision: str | None) -> bool:
    """Warn (and return True) when a CPU run asks for bf16/fp16 that this CPU only emulates."""
    if device.type != "cpu" or mixed_precision not in ("bf16", "fp16") or cpu_has_native(mixed_precision):
        return False
    instructions = {"bf16": "AVX512-BF16 or AMX", "fp16": "AVX512-FP16 or AMX-FP16"}[mixed_precision]
    warnings.warn(
        f"mixed precision {mixed_precision} on a CPU without {mixed_precision} matrix instructions "
        f"(capability {torch.backends.cpu.get_cpu_capability()}): the matmuls are emulated and training runs "
        "several times slower than fp32 (bf16 on an AVX2 CPU: 13x for the small model); drop --mixed_precision "
        f"{mixed_precision}, or run on a GPU or a CPU with {instructions}",
        stacklevel=3,
    )
    return True


def is_deepspeed(accelerator: Accelerator) -> bool:
    """The one way ltgbert asks whether a run is under DeepSpeed (once the accelerator exists; before, the
    launcher's ACCELERATE_USE_DEEPSPEED decides how it is made)."""
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def _is_distributed(accelerator: Accelerator) -> bool:
    return accelerator.num_processes > 1 and accelerator.distributed_type != DistributedType.NO


def all_ranks_any(accelerator: Accelerator, flag: bool) -> bool:
    """True on every rank if ``flag`` is true on at least one rank: one all-reduce (MAX), gloo or NCCL.

    Use it for decisions that every rank must take at the same step (stop on a signal, skip a non-finite
    step, save): a decision taken by one rank alone leaves the others waiting in a collective forever.
    """
    if not _is_distributed(accelerator):
        return bool(flag)
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=accelerator.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def all_ranks_all(accelerator: Accelerator, flag: bool) -> bool:
    """True on every rank if ``flag`` is true on all ranks (one all-reduce, MIN)."""
    if not _is_distributed(accelerator):
        return bool(flag)
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=accelerator.device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def broadcast_object(accelerator: Accelerator, obj: Any = None, from_process: int = 0) -> Any:
    """Returns ``obj`` from rank ``from_process`` on every rank (picklable objects: paths, small dicts)."""
    if not _is_distributed(accelerator):
        return obj
    box = [obj]
    broadcast_object_list(box, from_process=from_process)
    return box[0]
