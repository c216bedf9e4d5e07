"""Fine-tuning throughput: length-grouped batches with dynamic padding vs. padding every row to max length.

    python bench/bench_finetune.py                       # demo-size LTG-BERT, CPU (or the GPU if present)
    python bench/bench_finetune.py --preset tiny --rows 256

Classification data is skewed in length: most sentences are short, a few are long. Padding every batch to
``--max_seq_length`` spends almost all compute on [PAD]; padding to the longest row of a random batch still
pays for the one long row that lands in most batches; grouping rows of similar length (sorted within
mega-batches, ``ltgbert.batching.length_grouped_order``, what launch/finetune.py uses) and padding per batch
(``ltgbert.tasks.DynamicPaddingCollator``) removes most of it. The three set-ups train the same model on the
same rows (one epoch: forward, backward, AdamW step) and the script prints rows/s side by side, the share
of real tokens in the batches, and the speed-up of grouped + dynamic over max-length padding (the target
is >= 2x).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ltgbert import LtgBertConfig, LtgBertForSequenceClassification  # noqa: E402
from ltgbert.batching import length_grouped_order, shuffled_order  # noqa: E402
from ltgbert.tasks import DynamicPaddingCollator, EncodedSplit  # noqa: E402


def skewed_lengths(rows: int, max_len: int, seed: int) -> np.ndarray:
    """Log-normal lengths (median ~20 tokens) with a 5% tail of long rows, clipped to [4, max_len]."""
    rng = np.random.default_rng(seed)
    lengths = rng.lognormal(mean=np.log(20), sigma=0.5, size=rows)
    tail = rng.random(rows) < 0.05
    lengths[tail] = rng.uniform(0.5 * max_len, max_len, size=tail.sum())
    return np.clip(lengths.round(), 4, max_len).astype(int)


def synthetic_split(lengths: np.ndarray, vocab_size: int, seed: int) -> EncodedSplit:
    rng = np.random.default_rng(seed)
    ids = [[1, *rng.integers(5, vocab_size, size=n - 2).tolist(), 2] for n in lengths]  # [CLS] ... [SEP]
    return EncodedSplit(ids, rng.integers(0, 2, size=len(lengths)).tolist())


def run_epoch(model, split, batches, collator, device) -> tuple[float, float]:
    """Seconds for one training epoch over ``batches``, and the share of non-pad tokens."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    real = total = 0
    # one warm-up step (allocator, kernels), not timed
    warm = collator([split[i] for i in batches[0]])
    model(**{k: v.to(device) for k, v in warm.items() if k != "idx"}).loss.backward()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for batch_rows in batches:
        batch = collator([split[i] for i in batch_rows])
        batch.pop("idx")
        real += int(batch["attention_mask"].sum())
        total += batch["attention_mask"].numel()
        loss = model(**{k: v.to(device, non_blocking=True) for k, v in batch.items()}).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, real / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="demo", help="LtgBertConfig preset (tiny, demo, xs, small, base)")
    parser.add_argument("--rows", type=int, default=768, help="training rows (one epoch per set-up)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_seq_length", type=int, default=256)
    parser.add_argument("--mega_batch_mult", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    config = LtgBertConfig.from_preset(
        args.preset, vocab_size=1000, num_labels=2, max_position_embeddings=args.max_seq_length
    )
    lengths = skewed_lengths(args.rows, args.max_seq_length, args.seed)
    split = synthetic_split(lengths, config.vocab_size, args.seed)

    def batches(order):
        return [order[i : i + args.batch_size].tolist() for i in range(0, len(order), args.batch_size)]

    random_batches = batches(shuffled_order(len(lengths), args.seed, 0, args.batch_size))
    grouped_batches = batches(length_grouped_order(lengths, args.seed, 0, args.batch_size, args.mega_batch_mult))
    setups = {
        "max-length padding, random batches": (
            random_batches,
            DynamicPaddingCollator(3, "binary", max_length=args.max_seq_length),
        ),
        "dynamic padding, random batches": (random_batches, DynamicPaddingCollator(3, "binary")),
        "dynamic padding, length-grouped": (grouped_batches, DynamicPaddingCollator(3, "binary")),
    }
    print(
        f"LTG-BERT {args.preset} ("
        f"{sum(p.numel() for p in LtgBertForSequenceClassification(config).parameters()) / 1e6:.1f}M "
        f"params) on {device}, torch threads {torch.get_num_threads()}; {args.rows} rows, batch {args.batch_size}, "
        f"lengths median {int(np.median(lengths))}, mean {lengths.mean():.0f}, max {lengths.max()} "
        f"(max_seq_length {args.max_seq_length})"
    )
    rates = {}
    for name, (batches, collator) in setups.items():
        torch.manual_seed(args.seed)
        model = LtgBertForSequenceClassification(config).to(device).train()
        seconds, fill = run_epoch(model, split, batches, collator, device)
        rates[name] = args.rows / seconds
        print(f"  {name:<38} {rates[name]:9.1f} rows/s   {seconds:7.2f} s   real tokens {100 * fill:5.1f}%")
    first, last = list(rates.values())[0], list(rates.values())[-1]
    print(
        f"speed-up of dynamic padding + length grouping over max-length padding: {last / first:.2f}x "
        f"(over dynamic padding alone: {last / list(rates.values())[1]:.2f}x)"
    )


if __name__ == "__main__":
    main()
