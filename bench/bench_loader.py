"""Benchmark of the training input pipeline: masked tokens per second delivered by the real DataLoader.

    python bench/bench_loader.py                          # demo corpus (4M words), span masking, T=128
    python bench/bench_loader.py --batch_size 256 --workers 0 1 2 --rounds 3 --strategy span
    python bench/bench_loader.py --tiny                   # seconds: the smoke test's size

The loader is the one pretraining builds: a torch DataLoader over the packed dataset
(`ltgbert.data.build_pretraining_dataset`) with `ltgbert.batching.ShardedBatchSampler` (its rows tagged with
their optimizer step through `LoaderDataset`, so the collator computes the mask-ratio schedule itself) and
`ltgbert.masking.MlmCollator`, with the training loop's settings (`ltgbert.batching.dataloader_kwargs`:
persistent_workers=False, prefetch_factor 4, pin_memory when CUDA is there). The consumer only counts the
tokens (attention_mask) of each batch, so the figure is what the loader can deliver, an upper bound on what
it costs the training step. Each worker count runs in interleaved rounds (0 1 2 0 1 2 ...); the table gives
the median tokens/s over rounds, the ratio to 0 workers, the CPU time the training process itself spends per
batch (what stays on the critical path: everything with 0 workers, receiving the batch with workers) and
the start-up time of the first batch (worker processes start per epoch). Goal: >= 1.3M tokens/s with 2
workers for span masking at T=128.

The same run checks that every worker count delivers bit-identical batches (masks are a pure function of
seed, epoch, row and step). The machine may be shared: the load average is printed beside the figures, and
the CPU time per batch of one process (masking + fetching, no worker overhead) is given as the steadier
measure.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ltgbert.data import build_pretraining_dataset, load_text_dataset  # noqa: E402
from ltgbert.masking import MlmCollator  # noqa: E402
from ltgbert.tokenization import train_tokenizer  # noqa: E402


def make_packed(args, workdir: Path):
    """(tokenizer, packed dataset) from --train_file or the demo corpus."""
    if args.train_file:
        files = args.train_file
    else:
        from ltgbert.demo_data import ensure_demo_data

        files = [str(ensure_demo_data(workdir / "demo", num_words=args.num_words).corpus_train)]
    tokenizer = train_tokenizer(files, vocab_size=args.vocab_size)
    text = load_text_dataset(files, cache_dir=workdir / "text")
    packed = build_pretraining_dataset(
        tokenizer, text, args.max_seq_length, cache_dir=workdir / "packed", num_proc=args.num_proc
    )
    return tokenizer, packed


class ArrowRows(torch.utils.data.Dataset):
    """The "columns" fetch: a batch's rows as one pyarrow Table (plus their steps), which the collator takes as
    it is, instead of a dict and a list of ids per row (LoaderDataset over a datasets.Dataset)."""

    def __init__(self, base):
        self.base = base.with_format("arrow")

    def __len__(self) -> int:
        return len(self.base)

    def __getitems__(self, draws):
        import pyarrow as pa

        table = self.base[[d.row for d in draws]]
        return table.append_column("step", pa.array([d.step for d in draws], pa.int64()))


def fetcher(packed, fetch: str):
    from ltgbert import batching

    if fetch == "columns":
        return ArrowRows(packed)
    return batching.LoaderDataset(packed) if hasattr(batching, "LoaderDataset") else packed


def make_loader(packed, collator, args, num_workers: int, fetch: str = "rows"):
    """The pretraining loader: sharded batch sampler (rows tagged with their step) + collator."""
    from ltgbert import batching

    sampler = batching.ShardedBatchSampler(len(packed), args.batch_size, seed=args.seed)
    sampler.set_epoch(0)
    return torch.utils.data.DataLoader(
        fetcher(packed, fetch),
        batch_sampler=sampler,
        collate_fn=collator,
        generator=torch.Generator(),
        **loader_settings(num_workers),
    )


def loader_settings(num_workers: int) -> dict:
    """The training loop's DataLoader settings (ltgbert.batching.dataloader_kwargs: pinned memory on a GPU,
    prefetch 4, workers not persistent), or the same written out where that module is absent."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        from ltgbert.batching import dataloader_kwargs

        return dataloader_kwargs(num_workers, device)
    except ImportError:
        kwargs = {"num_workers": num_workers, "pin_memory": device.type == "cuda"}
        return {**kwargs, "prefetch_factor": 4} if num_workers else kwargs


def run_loader(packed, collator, args, num_workers: int, fetch: str) -> dict:
    """Iterate --batches batches; returns start-up time, steady tokens/s and a digest of every batch."""
    loader = make_loader(packed, collator, args, num_workers, fetch)
    digest = hashlib.sha256()
    tokens, start = 0, time.perf_counter()
    first = cpu_first = None
    hashing = 0.0
    for i, batch in enumerate(loader):
        if i == 0:
            first, cpu_first = time.perf_counter(), time.process_time()
        else:
            tokens += int(batch["attention_mask"].sum())
        t0 = time.process_time()
        for key in ("input_ids", "labels"):
            digest.update(batch[key].numpy().tobytes())
        hashing += time.process_time() - t0 if i else 0.0
        if i == args.batches:
            break
    if i < args.batches:
        raise SystemExit(
            f"the corpus gives {i + 1} batches, fewer than --batches {args.batches} + 1; raise "
            f"--num_words or lower --batches"
        )
    seconds, main_cpu = time.perf_counter() - first, time.process_time() - cpu_first - hashing
    return {
        "startup_s": first - start,
        "tokens_per_s": tokens / seconds,
        "digest": digest.hexdigest(),
        "main_cpu_ms_per_batch": main_cpu / args.batches * 1e3,
    }


def cpu_per_batch(packed, collator, args, fetch: str) -> tuple[float, float]:
    """CPU seconds per batch in one process: (fetch rows, collate + mask)."""
    from ltgbert import batching

    sampler = batching.ShardedBatchSampler(len(packed), args.batch_size, seed=args.seed)
    dataset = fetcher(packed, fetch)
    fetch_s = collate_s = 0.0
    n = 0
    for draws in sampler:
        t0 = time.process_time()
        rows = dataset.__getitems__(draws)
        t1 = time.process_time()
        collator(rows)
        fetch_s, collate_s, n = fetch_s + t1 - t0, collate_s + time.process_time() - t1, n + 1
        if n == min(args.batches, 50):
            break
    return fetch_s / n, collate_s / n


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train_file", nargs="*", help="corpus files (default: the demo corpus)")
    parser.add_argument("--num_words", type=int, default=4_000_000, help="demo corpus size (>= 150 batches)")
    parser.add_argument("--vocab_size", type=int, default=16384)
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=256, help="rows per batch (one process)")
    parser.add_argument("--strategy", default="span", choices=["span", "word", "subword"])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--fetch",
        nargs="+",
        default=["rows", "columns"],
        choices=["rows", "columns"],
        help="rows: LoaderDataset (a dict per row, as the training loop); columns: one Arrow table",
    )
    parser.add_argument("--batches", type=int, default=100, help="timed batches per round (after the first)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num_proc", type=int, default=2, help="tokenisation processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="a 20k-word corpus, T=32, few batches")
    args = parser.parse_args(argv)
    if args.tiny:
        args.num_words, args.vocab_size, args.max_seq_length, args.batch_size = 20_000, 1000, 32, 8
        args.batches, args.rounds, args.num_proc = 5, 1, 1

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer, packed = make_packed(args, Path(tmp))
        # the schedule of a real run: 0.3 -> 0.15 over the steps; rows carry their step
        collator = MlmCollator(
            tokenizer,
            strategy=args.strategy,
            mlm_probability=0.15,
            seed=args.seed,
            mlm_probability_start=0.3,
            total_steps=max(1, len(packed) // args.batch_size),
        )
        cpu = {fetch: cpu_per_batch(packed, collator, args, fetch) for fetch in args.fetch}
        variants = [(fetch, w) for fetch in args.fetch for w in args.workers]
        runs: dict[tuple[str, int], list[dict]] = {v: [] for v in variants}
        for _ in range(args.rounds):
            for fetch, w in variants:
                runs[fetch, w].append(run_loader(packed, collator, args, w, fetch))

    tokens_per_batch = args.batch_size * args.max_seq_length
    results = {
        "strategy": args.strategy,
        "batch_size": args.batch_size,
        "max_seq_length": args.max_seq_length,
        "blocks": len(packed),
        "cpu": {
            fetch: {"fetch_ms": f * 1e3, "collate_ms": c * 1e3, "tokens_per_cpu_s": tokens_per_batch / (f + c)}
            for fetch, (f, c) in cpu.items()
        },
        "loader": {
            f"{fetch} workers={w}": {
                "fetch": fetch,
                "workers": w,
                "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                "tokens_per_s_by_round": [r["tokens_per_s"] for r in rs],
                "startup_s": statistics.median(r["startup_s"] for r in rs),
                "main_cpu_ms_per_batch": statistics.median(r["main_cpu_ms_per_batch"] for r in rs),
            }
            for (fetch, w), rs in runs.items()
        },
        "identical_batches": len({r["digest"] for rs in runs.values() for r in rs}) == 1,
        "load_average": os.getloadavg(),
        "cpu_count": os.cpu_count(),
    }
    print_table(results, args)
    return results


def print_table(results: dict, args) -> None:
    print(
        f"loader: {results['strategy']} masking, {args.batch_size} x {args.max_seq_length}, "
        f"{results['blocks']} blocks, {args.batches} batches x {args.rounds} rounds, "
        f"pin_memory={torch.cuda.is_available()}"
    )
    for fetch, c in results["cpu"].items():
        print(
            f"one process, CPU time per batch ({fetch}): fetch {c['fetch_ms']:.2f} ms + collate/mask "
            f"{c['collate_ms']:.2f} ms = {c['tokens_per_cpu_s'] / 1e6:.2f} M tokens per CPU-second"
        )
    print(
        f"{'fetch':>7}  {'workers':>7}  {'M tokens/s':>10}  {'vs 0':>6}  {'main CPU ms/batch':>17}  "
        f"{'first batch s':>13}  rounds (M tokens/s)"
    )
    entries = results["loader"].values()
    for e in entries:
        base = next((b["tokens_per_s"] for b in entries if b["fetch"] == e["fetch"] and b["workers"] == 0), None)
        ratio = f"{e['tokens_per_s'] / base:.2f}x" if base else "-"
        rounds = " ".join(f"{t / 1e6:.2f}" for t in e["tokens_per_s_by_round"])
        print(
            f"{e['fetch']:>7}  {e['workers']:>7}  {e['tokens_per_s'] / 1e6:>10.2f}  {ratio:>6}  "
            f"{e['main_cpu_ms_per_batch']:>17.2f}  {e['startup_s']:>13.2f}  {rounds}"
        )
    print(f"batches identical for every fetch and worker count: {results['identical_batches']}")
    load = ", ".join(f"{x:.1f}" for x in results["load_average"])
    print(f"load average (1, 5, 15 min) at the end: {load} on {results['cpu_count']} cores")


if __name__ == "__main__":
    main()
