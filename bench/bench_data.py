"""Benchmark of the data pipeline: tokenise + pack throughput, and the collator's share of a training step.

    python bench/bench_data.py                      # demo corpus (~1M words), num_proc 1 and 2
    python bench/bench_data.py --num_words 200000 --steps 3

Targets: >= 1M tokens/s for tokenise + pack on 2 cores; the MLM collator (16 x 128, span masking) costs
< 5% of one training step of the small model (hidden 384, 12 layers, 6 heads, intermediate 1536, vocab 16384;
ltgbert's own LtgBertForMaskedLM "small" preset when it imports, else transformers' BertForMaskedLM), fp32,
AdamW, forward + backward + step. Times are medians; the machine may be shared, so expect noise.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ltgbert.data import build_pretraining_dataset, load_text_dataset, packing_stats  # noqa: E402
from ltgbert.masking import MlmCollator  # noqa: E402
from ltgbert.tokenization import train_tokenizer  # noqa: E402


def corpus_file(num_words: int, workdir: Path, synthetic: bool) -> tuple[Path, str]:
    """The demo corpus if the demo module is there, else (or with --synthetic) one of Zipf-distributed
    pseudo-words: 20k word types, closer to a natural corpus than the demo grammar's small vocabulary."""
    try:
        if not synthetic:
            from ltgbert.demo_data import ensure_demo_data

            return Path(ensure_demo_data(num_words=num_words).corpus_train), "demo"
    except Exception as e:  # the demo module is written in parallel: a synthetic corpus keeps the bench running
        print(f"demo corpus unavailable ({type(e).__name__}: {e}); using a synthetic corpus", file=sys.stderr)
    rng = random.Random(0)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pra", "stel", "und", "ber", "ing", "ed"]
    lexicon = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(20000)]
    weights = [1.0 / (r + 1) for r in range(len(lexicon))]
    path = workdir / "synthetic.txt"
    with open(path, "w", encoding="utf-8") as f:
        written = 0
        while written < num_words:
            for _ in range(rng.randint(2, 12)):  # sentences per document
                words = rng.choices(lexicon, weights, k=rng.randint(5, 25))
                f.write(" ".join(words).capitalize() + ".\n")
                written += len(words)
            f.write("\n")
    return path, "synthetic"


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the datasets.map workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def small_model(vocab_size: int, kind: str):
    try:
        if kind != "ltgbert":
            raise ImportError("BertForMaskedLM asked for")
        from ltgbert import LtgBertConfig, LtgBertForMaskedLM

        config = LtgBertConfig.from_preset("small")
        config.vocab_size = vocab_size
        return LtgBertForMaskedLM(config), "LtgBertForMaskedLM(small)"
    except Exception:  # the model is being written in parallel; fall back to BERT of the same size
        from transformers import BertConfig, BertForMaskedLM

        config = BertConfig(vocab_size=vocab_size, hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                            intermediate_size=1536, max_position_embeddings=512)
        return BertForMaskedLM(config), "BertForMaskedLM(384x12)"


def time_train_step(batch: dict, vocab_size: int, args) -> tuple[float, str]:
    """Median seconds of forward + backward + AdamW step of the small model on one collated batch."""
    torch.manual_seed(0)
    model, model_name = small_model(vocab_size, args.model)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step_times = []
    for step in range(args.steps + 1):
        t0 = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:  # the first step allocates optimizer state
            step_times.append(time.perf_counter() - t0)
    return statistics.median(step_times), model_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_words", type=int, default=1_000_000)
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="timed training steps (after one warm-up); 0 skips the model")
    parser.add_argument("--collator_batches", type=int, default=50)
    parser.add_argument("--model", choices=["ltgbert", "bert"], default="ltgbert",
                        help="the step-time reference: ltgbert's small preset (if it imports) or BertForMaskedLM")
    parser.add_argument("--synthetic", action="store_true", help="a synthetic Zipf corpus instead of the demo one")
    args = parser.parse_args()

    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path, kind = corpus_file(args.num_words, tmp, args.synthetic)
        t0 = time.perf_counter()
        tokenizer = train_tokenizer([path], vocab_size=16384)
        rows.append(("corpus", f"{kind}: {path.stat().st_size / 1e6:.1f} MB"))
        rows.append(("train tokenizer", f"{time.perf_counter() - t0:.2f} s, {len(tokenizer)} tokens"))
        text = load_text_dataset([path], cache_dir=tmp / "text")

        # ----- tokenise + pack
        for num_proc in (1, 2):
            cache = tmp / f"packed-{num_proc}"
            t0, cpu0 = time.perf_counter(), cpu_seconds()
            packed = build_pretraining_dataset(tokenizer, text, args.max_seq_length, num_proc=num_proc, cache_dir=cache)
            seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
            stats = packing_stats(packed, args.max_seq_length)
            rows.append((f"tokenize+pack num_proc={num_proc}",
                         f"{stats.num_tokens / seconds / 1e6:.2f} M tokens/s wall, {stats.num_tokens / cpu / 1e6:.2f} M "
                         f"tokens/cpu-s ({stats.num_tokens} tokens, {seconds:.2f} s)"))
            t0 = time.perf_counter()
            build_pretraining_dataset(tokenizer, text, args.max_seq_length, num_proc=num_proc, cache_dir=cache)
            rows.append((f"  second call (cached) num_proc={num_proc}", f"{time.perf_counter() - t0:.3f} s"))
        rows.append(("fill rate", f"{stats.fill_rate:.4f} ({stats.num_blocks} blocks)"))

        # ----- collator
        collator = MlmCollator(tokenizer, strategy="span", seed=0)
        n = len(packed)
        batches = [[packed[(b * args.batch_size + i) % n] for i in range(args.batch_size)]
                   for b in range(args.collator_batches)]
        times, cpu_times = [], []
        for examples in batches:
            t0, cpu0 = time.perf_counter(), time.process_time()
            batch = collator(examples)
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - cpu0)
        collate_s = statistics.median(times)

        rows.append((f"collator span {args.batch_size}x{args.max_seq_length}",
                     f"{collate_s * 1e3:.2f} ms/batch wall, {statistics.median(cpu_times) * 1e3:.2f} ms cpu"))
        if args.steps > 0:
            step_s, model_name = time_train_step(batch, len(tokenizer), args)
            rows.append((f"train step {model_name} fp32 AdamW",
                         f"{step_s * 1e3:.0f} ms (torch threads {torch.get_num_threads()})"))
            rows.append(("collator / step", f"{100 * collate_s / step_s:.2f} %  (target < 5 %)"))

    rows.append(("load average (1 min) at the end", f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"))
    width = max(len(k) for k, _ in rows)
    print(f"{'measure':<{width}}  value")
    print("-" * (width + 40))
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
