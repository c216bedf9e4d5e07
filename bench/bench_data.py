"""Benchmark of the data pipeline: tokenise + pack throughput, memory and cache reuse at corpus scale, and the
collator's share of a training step.

    python bench/bench_data.py                      # demo corpus (~1M words), num_proc 1 and 2, collator share
    python bench/bench_data.py --num_words 200000 --steps 3
    python launch/make_demo_data.py --num_words 100000000 --output_dir /tmp/demo100m     # once, minutes
    python bench/bench_data.py --scale --train_file /tmp/demo100m/corpus/train.txt --num_proc 2

--scale runs the pipeline of launch/pretrain.py (load_text_dataset, split_validation 1%,
build_pretraining_dataset at T=128 for train and validation) in a fresh process per run, on three corpora: the
file(s) given, the same text as one file without blank lines (one sentence per line, BabyLM's layout) and the
first 10% of the text (linear time: the time per token should not grow with the corpus). Each corpus runs
twice: cold, then warm, where tokenising anything is an error (the second run must load the cache). A sampler
adds up the memory of the run's process tree every 0.2 s (see `measure`: PSS, its anonymous part, and RSS)
and reports the peaks. Goals: <= 2 GB peak, >= 1M tokens/s tokenise + pack with 2 processes, a warm run
without tokenisation. The tokenizer (WordPiece, 16384) is trained beforehand on the first
--tokenizer_sample_mb MB.

Targets of the default mode: >= 1M tokens/s for tokenise + pack on 2 cores; the MLM collator (16 x 128, span
masking) costs < 5% of one training step of the small model (hidden 384, 12 layers, 6 heads, intermediate 1536,
vocab 16384; ltgbert's own LtgBertForMaskedLM "small" preset when it imports, else transformers'
BertForMaskedLM), fp32, AdamW, forward + backward + step. Times are medians; the machine may be shared, so
the load average is printed beside the figures.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
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

        config = BertConfig(
            vocab_size=vocab_size,
            hidden_size=384,
            num_hidden_layers=12,
            num_attention_heads=6,
            intermediate_size=1536,
            max_position_embeddings=512,
        )
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


# ----------------------------------------------------------------------------- --scale: corpus-size runs


def pipeline_child(spec: dict) -> dict:
    """One pipeline run as launch/pretrain.py does it (in a fresh process); returns sizes and stage times."""
    from transformers import AutoTokenizer

    from ltgbert import data

    if spec["must_reuse_cache"]:

        def refuse(*args, **kwargs):
            raise RuntimeError("tokenised although the cache holds the result")

        data._tokenize_and_pack = refuse
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    work = Path(spec["workdir"])
    t0 = time.perf_counter()
    text, layouts = load_text_dataset(
        spec["files"], cache_dir=work / "text", num_proc=spec["num_proc"], return_layouts=True
    )
    t1 = time.perf_counter()
    train, validation = data.split_validation(text, 0.01, seed=0)
    t2 = time.perf_counter()
    build = dict(num_proc=spec["num_proc"], cache_dir=work / "packed")
    packed = build_pretraining_dataset(tokenizer, train, spec["max_seq_length"], **build)
    t3 = time.perf_counter()
    held_out = build_pretraining_dataset(tokenizer, validation, spec["max_seq_length"], short_seq_prob=0.0, **build)
    t4 = time.perf_counter()
    stats, val_stats = packing_stats(packed, spec["max_seq_length"]), packing_stats(held_out, spec["max_seq_length"])
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "layouts": [lay.describe() for lay in layouts],
        "documents": len(text),
        "validation_documents": len(validation),
        "blocks": stats.num_blocks,
        "tokens": stats.num_tokens + val_stats.num_tokens,
        "words": stats.num_words + val_stats.num_words,
        "load_s": t1 - t0,
        "split_s": t2 - t1,
        "pack_train_s": t3 - t2,
        "pack_validation_s": t4 - t3,
        "maxrss_main_mb": own.ru_maxrss / 1024,
        "maxrss_largest_child_mb": children.ru_maxrss / 1024,
    }


def _memory(pid: int) -> tuple[int, int, int]:
    """(RSS, PSS, anonymous PSS) of one process in bytes, from /proc/PID/smaps_rollup (Linux)."""
    values = {}
    with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss", "Pss_Anon"):
                values[key] = int(rest.split()[0]) * 1024
    return values.get("Rss", 0), values.get("Pss", 0), values.get("Pss_Anon", 0)


def measure(spec: dict) -> dict:
    """Run pipeline_child in a subprocess; sample the memory of its process tree every 0.2 s; return its report
    with the wall time and the peaks of the sums: RSS (counts pages shared by forked workers once per process),
    PSS (shares them out: the tree's real footprint) and anonymous PSS (leaves out the memory-mapped Arrow
    files, whose clean pages the kernel drops under pressure: what is bounded by the batch)."""
    import json
    import subprocess

    import psutil

    cmd = [sys.executable, __file__, "--pipeline_child", json.dumps(spec)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"},
    )
    peaks = [0, 0, 0]
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        sums = [0, 0, 0]
        try:
            for p in [root, *root.children(recursive=True)]:
                sums = [a + b for a, b in zip(sums, _memory(p.pid))]
        except (psutil.Error, OSError):  # a worker ended between listing and reading
            pass
        peaks = [max(a, b) for a, b in zip(peaks, sums)]
        time.sleep(0.2)
    out = proc.stdout.read()
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"pipeline run failed ({proc.returncode}): {out[-2000:]}")
    report = json.loads(out.strip().splitlines()[-1])
    return {
        **report,
        "wall_s": wall,
        "peak_rss_sum_mb": peaks[0] / 2**20,
        "peak_pss_sum_mb": peaks[1] / 2**20,
        "peak_anon_pss_sum_mb": peaks[2] / 2**20,
    }


def derived_corpora(files: list[str], workdir: Path) -> dict[str, list[str]]:
    """The corpus as given, as one file without blank lines, and its first 10% (cut at a line end)."""
    no_blank, prefix = workdir / "no_blank_lines.train", workdir / "first_10_percent.txt"
    total = sum(os.path.getsize(f) for f in files)
    with open(no_blank, "w", encoding="utf-8") as nb, open(prefix, "w", encoding="utf-8") as pre:
        written = 0
        for f in files:
            with open(f, encoding="utf-8") as src:
                for line in src:
                    if line.strip():
                        nb.write(line)
                    if written < total // 10:
                        pre.write(line)
                        written += len(line)
    return {"as given": files, "one file, no blank lines": [str(no_blank)], "first 10%": [str(prefix)]}


def scale_main(args) -> dict:
    results = {}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        # the tokenizer is an input here, not a measured stage: trained once on a sample of the text
        sample = tmp / "tokenizer_sample.txt"
        with open(args.train_file[0], "rb") as src:
            sample.write_bytes(src.read(args.tokenizer_sample_mb << 20).rsplit(b"\n", 1)[0] + b"\n")
        train_tokenizer([sample], vocab_size=16384, output_dir=tmp / "tokenizer")
        for name, corpus in derived_corpora(args.train_file, tmp).items():
            runs = []
            for warm in (False, True):
                spec = {
                    "files": corpus,
                    "tokenizer": str(tmp / "tokenizer"),
                    "workdir": str(tmp / name),
                    "num_proc": args.num_proc,
                    "max_seq_length": args.max_seq_length,
                    "must_reuse_cache": warm,
                }
                runs.append(measure(spec))
                print_scale_run(name, "warm" if warm else "cold", runs[-1])
            results[name] = runs
            shutil.rmtree(tmp / name, ignore_errors=True)  # the caches of a 100M-word corpus take ~2 GB of disk
    cold = {name: runs[0] for name, runs in results.items()}
    if "first 10%" in cold:
        full = cold["as given"]
        per_token = [(c["pack_train_s"] + c["pack_validation_s"]) / c["tokens"] for c in (cold["first 10%"], full)]
        print(f"linear time: pack seconds per token, full corpus / first 10%: {per_token[1] / per_token[0]:.2f}")
    print(
        f"load average (1, 5, 15 min) at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())} "
        f"on {os.cpu_count()} cores"
    )
    return results


def print_scale_run(name: str, which: str, r: dict) -> None:
    pack = r["pack_train_s"] + r["pack_validation_s"]
    print(
        f"[{name}, {which}] wall {r['wall_s']:.1f} s (load {r['load_s']:.1f}, split {r['split_s']:.1f}, "
        f"tokenise+pack {pack:.1f}); {r['documents']:,} documents, {r['blocks']:,} blocks, {r['tokens']:,} tokens, "
        f"{r['words']:,} words; {r['tokens'] / pack / 1e6:.2f} M tokens/s tokenise+pack; peak memory of the process "
        f"tree: PSS {r['peak_pss_sum_mb']:,.0f} MB (anonymous {r['peak_anon_pss_sum_mb']:,.0f} MB), RSS summed "
        f"{r['peak_rss_sum_mb']:,.0f} MB; largest single process "
        f"{max(r['maxrss_main_mb'], r['maxrss_largest_child_mb']):,.0f} MB"
    )
    for line in r["layouts"]:
        print(f"    {line}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_words", type=int, default=1_000_000)
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument(
        "--steps", type=int, default=5, help="timed training steps (after one warm-up); 0 skips the model"
    )
    parser.add_argument("--collator_batches", type=int, default=50)
    parser.add_argument(
        "--model",
        choices=["ltgbert", "bert"],
        default="ltgbert",
        help="the step-time reference: ltgbert's small preset (if it imports) or BertForMaskedLM",
    )
    parser.add_argument("--synthetic", action="store_true", help="a synthetic Zipf corpus instead of the demo one")
    parser.add_argument("--scale", action="store_true", help="corpus-scale runs of --train_file (see the docstring)")
    parser.add_argument("--train_file", nargs="+", help="--scale: the corpus files")
    parser.add_argument("--num_proc", type=int, default=2, help="--scale: tokenisation processes")
    parser.add_argument("--tokenizer_sample_mb", type=int, default=50, help="--scale: tokenizer training sample")
    parser.add_argument("--workdir", default=None, help="--scale: where the caches go (default: the temp dir)")
    parser.add_argument("--pipeline_child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.pipeline_child:
        import json

        print(json.dumps(pipeline_child(json.loads(args.pipeline_child))))
        return
    if args.scale:
        if not args.train_file:
            parser.error("--scale needs --train_file")
        scale_main(args)
        return

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
            rows.append(
                (
                    f"tokenize+pack num_proc={num_proc}",
                    f"{stats.num_tokens / seconds / 1e6:.2f} M tokens/s wall, {stats.num_tokens / cpu / 1e6:.2f} "
                    f"M tokens/cpu-s ({stats.num_tokens} tokens, {seconds:.2f} s)",
                )
            )
            t0 = time.perf_counter()
            build_pretraining_dataset(tokenizer, text, args.max_seq_length, num_proc=num_proc, cache_dir=cache)
            rows.append((f"  second call (cached) num_proc={num_proc}", f"{time.perf_counter() - t0:.3f} s"))
        rows.append(("fill rate", f"{stats.fill_rate:.4f} ({stats.num_blocks} blocks)"))

        # ----- collator
        collator = MlmCollator(tokenizer, strategy="span", seed=0)
        n = len(packed)
        batches = [
            [packed[(b * args.batch_size + i) % n] for i in range(args.batch_size)]
            for b in range(args.collator_batches)
        ]
        times, cpu_times = [], []
        for examples in batches:
            t0, cpu0 = time.perf_counter(), time.process_time()
            batch = collator(examples)
            batch.pop("words")  # a count for the training loop, not a model input
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - cpu0)
        collate_s = statistics.median(times)

        rows.append(
            (
                f"collator span {args.batch_size}x{args.max_seq_length}",
                f"{collate_s * 1e3:.2f} ms/batch wall, {statistics.median(cpu_times) * 1e3:.2f} ms cpu",
            )
        )
        if args.steps > 0:
            step_s, model_name = time_train_step(batch, len(tokenizer), args)
            rows.append(
                (
                    f"train step {model_name} fp32 AdamW",
                    f"{step_s * 1e3:.0f} ms (torch threads {torch.get_num_threads()})",
                )
            )
            rows.append(("collator / step", f"{100 * collate_s / step_s:.2f} %  (target < 5 %)"))

    rows.append(("load average (1 min) at the end", f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"))
    width = max(len(k) for k, _ in rows)
    print(f"{'measure':<{width}}  value")
    print("-" * (width + 40))
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
