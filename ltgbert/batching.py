"""Deterministic, resumable, rank-sharded batch order.

Every rank computes the same permutation of the dataset from (seed, epoch), cuts it into global
micro-batches of ``world_size * per_device`` rows and keeps its own slice. So:

- the global batch of a step is the same whatever the world size (2 ranks x 8 rows == 1 rank x 16 rows),
  which is how the distributed tests compare DDP and ZeRO runs with a single process;
- resuming is arithmetic: start the epoch's iteration at micro-batch k, nothing is replayed;
- ranks never see the same row within an epoch.

Accelerate's own sharding (``accelerator.prepare(dataloader)``) would also work, but its order depends on
the world size, and skipping means iterating; this keeps both properties explicit and tested.
"""

from collections.abc import Iterator

import torch


class ShardedBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's row indices for each global micro-batch of one epoch.

    Args:
        num_rows: rows in the dataset.
        per_device_batch_size: rows per rank per micro-batch.
        rank, world_size: this process's place in the data-parallel group.
        seed: base of the shuffling; epoch e uses a generator seeded with (seed, e).
        shuffle: False keeps dataset order (evaluation).
        drop_last: drop the final incomplete global batch (training); when False the last global batch is
            split as evenly as possible and a rank may get fewer rows (evaluation).
    """

    def __init__(self, num_rows, per_device_batch_size, rank=0, world_size=1, seed=0, shuffle=True,
                 drop_last=True):
        if num_rows <= 0:
            raise ValueError("cannot batch an empty dataset")
        self.num_rows = num_rows
        self.per_device = per_device_batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch = 0
        self.start_batch = 0

    @property
    def global_batch_size(self):
        return self.per_device * self.world_size

    def set_epoch(self, epoch: int, start_batch: int = 0):
        """Iterate epoch ``epoch`` from its micro-batch ``start_batch`` on (resume)."""
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self):
        full, rest = divmod(self.num_rows, self.global_batch_size)
        total = full if self.drop_last or rest == 0 else full + 1
        return max(total - self.start_batch, 0)

    def _order(self):
        if not self.shuffle:
            return torch.arange(self.num_rows)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.num_rows, generator=generator)

    def __iter__(self) -> Iterator[list[int]]:
        order = self._order()
        size = self.global_batch_size
        total = len(self) + self.start_batch
        for b in range(self.start_batch, total):
            chunk = order[b * size:(b + 1) * size]
            if len(chunk) == size:
                mine = chunk[self.rank * self.per_device:(self.rank + 1) * self.per_device]
            else:  # incomplete last batch (evaluation only): round-robin so shards differ by at most one row
                mine = chunk[self.rank::self.world_size]
            yield mine.tolist()
