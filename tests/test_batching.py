"""The batch order both training scripts share (ltgbert.batching): world-size independent, resumable by sample
position, every row once per epoch, evaluation that never drops or repeats a row, length grouping."""

import numpy as np
import pytest

from ltgbert.batching import Draw, LoaderDataset, ShardedBatchSampler, eval_batches, length_grouped_order


def _steps(num_rows, per_device, world, accumulation, epoch=0, start_sample=0):
    """{step: sorted rows of that optimizer step over every rank and micro-batch}."""
    steps = {}
    for rank in range(world):
        sampler = ShardedBatchSampler(num_rows, per_device, rank, world, accumulation, seed=3)
        sampler.set_epoch(epoch, start_sample, first_step=start_sample // (per_device * world * accumulation))
        for micro in sampler:
            steps.setdefault(micro[0].step, []).extend(d.row for d in micro)
    return {s: sorted(rows) for s, rows in steps.items()}


def test_the_rows_of_a_step_do_not_depend_on_the_world_size():
    # global batch 16: 1 x 16 x 1, 2 x 8 x 1, 4 x 2 x 2, 1 x 8 x 2 processes x rows x micro-batches
    reference = _steps(100, 16, 1, 1)
    assert sorted(reference) == list(range(6))  # 100 rows: 6 whole steps, the rest waits for the next epoch
    for per_device, world, accumulation in ((8, 2, 1), (2, 4, 2), (8, 1, 2)):
        assert _steps(100, per_device, world, accumulation) == reference
    rows = [r for s in reference.values() for r in s]
    assert len(rows) == len(set(rows)) == 96
    assert _steps(100, 16, 1, 1, epoch=1) != reference  # a new order every epoch


def test_resume_at_a_sample_position_on_another_world_size():
    straight = _steps(100, 8, 2, 1)
    # 3 steps of 16 rows done on 2 processes; the rest on 1 process with accumulation 2
    assert _steps(100, 8, 1, 2, start_sample=48) == {s: straight[s] for s in range(3, 6)}
    with pytest.raises(ValueError, match="multiple of the global batch"):
        ShardedBatchSampler(100, 8).set_epoch(0, start_sample=12)


@pytest.mark.parametrize("num_rows, batch, world", [(10, 4, 1), (10, 4, 3), (7, 8, 2), (3, 2, 4), (2000, 64, 16)])
def test_evaluation_scores_every_row_once_with_the_same_batches_on_every_rank(num_rows, batch, world):
    per_rank = [eval_batches(num_rows, batch, rank, world) for rank in range(world)]
    shapes = {tuple(len(b) for b in batches) for batches in per_rank}
    assert len(shapes) == 1  # every rank the same number and sizes of batches: no hang under ZeRO-3
    real = sorted(d.row for batches in per_rank for b in batches for d in b if d.real)
    assert real == list(range(num_rows))


def test_length_grouped_order():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 200, size=1003)
    order = length_grouped_order(lengths, seed=1, epoch=0, global_batch=16, mega_batch_mult=8)
    assert sorted(order.tolist()) == list(range(1003))  # every row once
    batches = [order[i : i + 16] for i in range(0, 1003, 16)]
    assert lengths[batches[0]].max() == lengths.max()  # longest batch first: an out-of-memory shows at once

    def padding(bs):
        return sum(lengths[b].max() * len(b) - lengths[b].sum() for b in bs)

    shuffled = rng.permutation(1003)
    assert padding(batches) < 0.2 * padding([shuffled[i : i + 16] for i in range(0, 1003, 16)])
    assert (length_grouped_order(lengths, 1, 0, 16, 8) == order).all()
    assert (length_grouped_order(lengths, 1, 1, 16, 8) != order).any()


def test_loader_dataset_tags_rows_with_their_step():
    base = [{"input_ids": [1, 2, i]} for i in range(5)]
    wrapped = LoaderDataset(base)
    assert wrapped[Draw(3, step=7)] == {"input_ids": [1, 2, 3], "step": 7, "real": True}
    assert [r["step"] for r in wrapped.__getitems__([Draw(0, 1), Draw(4, 2, False)])] == [1, 2]
