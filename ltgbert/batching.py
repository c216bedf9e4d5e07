"""Deterministic, resumable, rank-sharded batch order, shared by pretraining and fine-tuning.

Every rank computes the same order of the dataset's rows from (seed, epoch), cuts it into global batches (the
rows of one optimizer step, ``per_device * world_size * accumulation``), each global batch into global
micro-batches of ``per_device * world_size`` rows, and keeps its own slice of each. So:

- the rows of an optimizer step are the same whatever the world size (2 ranks x 8 rows x 1 micro-batch ==
  1 rank x 8 rows x 2 micro-batches), which is how the distributed tests compare DDP and ZeRO runs with a
  single process, and how a run resumes on another number of processes (``ltgbert.training``): the data
  position is a number of samples into the epoch, and a checkpoint keeps its global batch;
- resuming is arithmetic: start the epoch at sample k, nothing is replayed or iterated over;
- ranks never see the same row within an epoch.

The order is a plain shuffle (pretraining) or grouped by length (fine-tuning: rows of similar length share a
global batch, so little compute goes into padding). Both group by the global batch, never by the per-rank
batch, so they too are independent of the world size.

Evaluation (``eval_batches``) never drops or repeats a row: the last, incomplete batch is spread over the ranks
and every rank gets the same number of batches (under ZeRO-3 each forward pass is a collective, so uneven
shards would hang); a rank short of rows fills up with padding rows marked ``real=False``, which the
evaluation leaves out, as accelerate's ``gather_for_metrics`` does.

Workers: the sampler runs in the training process and tags every row with the optimizer step it is consumed at
(``Draw.step``), so a collator in a DataLoader worker can compute a step-dependent mask ratio itself.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np
import torch

from ltgbert.errors import UserError

__all__ = [
    "Draw",
    "LoaderDataset",
    "ShardedBatchSampler",
    "StepBatches",
    "dataloader_kwargs",
    "eval_batches",
    "length_grouped_order",
    "shuffled_order",
]


class Draw(NamedTuple):
    """One row as the sampler hands it to the dataset: which row, at which optimizer step, padding or not."""

    row: int
    step: int = 0
    real: bool = True


def shuffled_order(num_rows: int, seed: int, epoch: int, global_batch: int) -> np.ndarray:
    """A permutation of the rows that depends only on (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_rows, generator=generator).numpy()


def length_grouped_order(lengths: np.ndarray, seed: int, epoch: int, global_batch: int, mega_batch_mult: int = 50):
    """Rows of similar length together, in units of the global batch (independent of the world size).

    A random permutation is cut into mega-batches of ``mega_batch_mult`` global batches, each sorted by
    descending length; the global batches are shuffled and the one holding the longest row goes first (an
    out-of-memory shows at step 1, not hours in). A final incomplete global batch stays last.
    """
    lengths = np.asarray(lengths)
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(lengths))
    mega = global_batch * max(1, mega_batch_mult)
    groups = [perm[i : i + mega] for i in range(0, len(perm), mega)]
    perm = np.concatenate([g[np.argsort(-lengths[g], kind="stable")] for g in groups])  # stable: ties stay random
    full = len(perm) // global_batch
    batches = [perm[i * global_batch : (i + 1) * global_batch] for i in range(full)]
    rest = perm[full * global_batch :]
    batches = [batches[i] for i in rng.permutation(len(batches))]
    if batches:
        longest = int(np.argmax([lengths[b].max() for b in batches]))
        batches.insert(0, batches.pop(longest))
    return np.concatenate(batches + [rest]) if batches or len(rest) else perm


class ShardedBatchSampler(torch.utils.data.Sampler):
    """This rank's rows of each global micro-batch of one training epoch (full global batches only).

    Args:
        num_rows: rows in the dataset.
        per_device_batch_size: rows per rank per micro-batch.
        rank, world_size: this process's place in the data-parallel group.
        accumulation: micro-batches per optimizer step; an epoch holds whole global batches only.
        seed: base of the order; ``order(num_rows, seed, epoch, global_batch)`` gives the epoch's row order
            (default: ``shuffled_order``).
    """

    def __init__(
        self,
        num_rows: int,
        per_device_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        accumulation: int = 1,
        seed: int = 0,
        order: Callable[[int, int, int, int], np.ndarray] = shuffled_order,
    ):
        if num_rows <= 0:
            raise ValueError("cannot batch an empty dataset")
        self.num_rows, self.per_device, self.accumulation = num_rows, per_device_batch_size, accumulation
        self.rank, self.world_size, self.seed, self.order = rank, world_size, seed, order
        self.epoch, self.start_sample, self.first_step = 0, 0, 0

    @property
    def micro_batch_rows(self) -> int:
        """Rows of one global micro-batch (all ranks)."""
        return self.per_device * self.world_size

    @property
    def global_batch_size(self) -> int:
        """Rows of one optimizer step (all ranks, all micro-batches)."""
        return self.micro_batch_rows * self.accumulation

    @property
    def steps_per_epoch(self) -> int:
        return self.num_rows // self.global_batch_size

    def set_epoch(self, epoch: int, start_sample: int = 0, first_step: int = 0) -> None:
        """Iterate epoch ``epoch`` from sample ``start_sample`` on (resume), tagging rows from ``first_step``."""
        if start_sample % self.global_batch_size:
            raise ValueError(
                f"start_sample {start_sample} is not a multiple of the global batch {self.global_batch_size}"
            )
        self.epoch, self.start_sample, self.first_step = epoch, start_sample, first_step

    def __len__(self) -> int:
        """Micro-batches left in the epoch from ``start_sample``."""
        return max(self.steps_per_epoch * self.global_batch_size - self.start_sample, 0) // self.micro_batch_rows

    def __iter__(self) -> Iterator[list[Draw]]:
        order = self.order(self.num_rows, self.seed, self.epoch, self.global_batch_size)
        size, first = self.micro_batch_rows, self.start_sample // self.micro_batch_rows
        for i, b in enumerate(range(first, first + len(self))):
            chunk = order[b * size : (b + 1) * size]
            step = self.first_step + i // self.accumulation
            mine = chunk[self.rank * self.per_device : (self.rank + 1) * self.per_device]
            yield [Draw(int(r), step) for r in mine]


def eval_batches(num_rows: int, batch_size: int, rank: int, world_size: int) -> list[list[Draw]]:
    """This rank's evaluation batches: every row exactly once over all ranks, in row order, and the same batches
    sizes on every rank (a rank short of rows gets padding rows, ``real=False``, copies of row 0)."""
    per_rank = math.ceil(num_rows / world_size)
    start = min(rank * per_rank, num_rows)
    mine = [Draw(r) for r in range(start, min(start + per_rank, num_rows))]
    draws = mine + [Draw(0, real=False)] * (per_rank - len(mine))
    return [draws[i : i + batch_size] for i in range(0, per_rank, batch_size)]


class LoaderDataset(torch.utils.data.Dataset):
    """Wraps a dataset of row dicts so that a sampler's ``Draw`` items fetch rows in one call per batch.

    Each row dict gains ``step`` (the optimizer step it is consumed at) and ``real`` (False for padding).
    ``__getitems__`` (the batched fetch protocol of torch's DataLoader) reads a whole batch from an Arrow-backed
    ``datasets.Dataset`` at once instead of row by row.
    """

    def __init__(self, base):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, draw: Draw) -> dict[str, Any]:
        return {**self.base[draw.row], "step": draw.step, "real": draw.real}

    def __getitems__(self, draws: list[Draw]) -> list[dict[str, Any]]:
        rows = [d.row for d in draws]
        fetch = getattr(self.base, "__getitems__", None)
        items = fetch(rows) if fetch is not None else [self.base[r] for r in rows]
        return [{**item, "step": d.step, "real": d.real} for item, d in zip(items, draws)]


def dataloader_kwargs(num_workers: int | None, device: torch.device) -> dict[str, Any]:
    """DataLoader worker settings: ``--dataloader_num_workers`` (default 2 on a GPU, 0 on a CPU), pinned memory
    for a GPU, prefetching. Workers are not persistent: each epoch's workers get the collator as it is then."""
    if num_workers is None:
        num_workers = 2 if device.type == "cuda" else 0
    kwargs: dict[str, Any] = {"num_workers": num_workers, "pin_memory": device.type == "cuda"}
    if num_workers > 0:
        kwargs["prefetch_factor"] = 4
    return kwargs


class StepBatches:
    """This rank's micro-batches of every optimizer step, epoch after epoch, from the state's data position.

    ``run`` is the script's ``ltgbert.training.Run`` (its accelerator and gradient accumulation), ``state`` its
    ``TrainState`` (epoch and samples into it: the data position). ``order(num_rows, seed, epoch, global_batch)`` is
    the epoch's row order; the collator's ``set_epoch`` (if any) is called at each epoch start (dynamic masking).
    Batches arrive on the device. Epochs hold whole optimizer steps, so an epoch ends between steps.
    """

    def __init__(
        self,
        run,
        dataset,
        per_device: int,
        collator,
        state,
        seed: int,
        num_workers: int | None = None,
        order=None,
        record_rows: bool = False,
    ):
        self.run, self.dataset, self.collator, self.state, self.num_workers = run, dataset, collator, state, num_workers
        # Tests: every rank appends the rows of each micro-batch it trains on to debug_rows/rank<R>.jsonl.
        self.record = (
            run.output_dir / "debug_rows" / f"rank{run.accelerator.process_index}.jsonl" if record_rows else None
        )
        accelerator = run.accelerator
        self.sampler = ShardedBatchSampler(
            len(dataset),
            per_device,
            accelerator.process_index,
            accelerator.num_processes,
            run.gradient_accumulation_steps,
            seed,
            order or shuffled_order,
        )
        if self.sampler.steps_per_epoch < 1:
            raise UserError(
                f"{len(dataset)} training rows are fewer than one global batch "
                f"({self.sampler.global_batch_size} = per-device batch x processes x accumulation); "
                "use a smaller --per_device_train_batch_size or --gradient_accumulation_steps"
            )
        self.batches = None

    @property
    def global_batch_size(self) -> int:
        return self.sampler.global_batch_size

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def _start(self) -> None:
        state = self.state
        self.sampler.set_epoch(state.epoch, state.samples_in_epoch, first_step=state.step)
        if hasattr(self.collator, "set_epoch"):
            self.collator.set_epoch(state.epoch)
        # A private generator: each iter(loader) draws a seed, and drawing it from the global RNG would make a
        # resumed run's dropout differ from the uninterrupted run's.
        loader = torch.utils.data.DataLoader(
            LoaderDataset(self.dataset),
            batch_sampler=self.sampler,
            collate_fn=_RowIds(self.collator),
            generator=torch.Generator(),
            **dataloader_kwargs(self.num_workers, self.run.accelerator.device),
        )
        self.batches = iter(loader)

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        if self.batches is None:
            self._start()
        micro = []
        while len(micro) < self.run.gradient_accumulation_steps:
            try:
                batch = next(self.batches)
            except StopIteration:
                if micro:
                    raise RuntimeError("an epoch ended inside an optimizer step") from None
                self.state.next_epoch()
                self._start()
                continue
            micro.append({k: v.to(self.run.accelerator.device, non_blocking=True) for k, v in batch.items()})
        if self.record is not None:
            self.record.parent.mkdir(parents=True, exist_ok=True)
            with open(self.record, "a", encoding="utf-8") as f:
                f.write(
                    json.dumps(
                        {
                            "step": self.state.step + 1,
                            "epoch": self.state.epoch,
                            "rows": [b["idx"].tolist() for b in micro],
                        }
                    )
                    + "\n"
                )
        return micro


class _RowIds:
    """Wraps a collator so that every batch carries "idx" (the dataset rows it holds); the scripts' forward
    functions pop it before the model call."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples):
        batch = self.collator(examples)
        if "idx" not in batch:
            batch["idx"] = torch.tensor([ex["idx"] for ex in examples], dtype=torch.long)
        return batch
