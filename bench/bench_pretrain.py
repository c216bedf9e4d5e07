"""Pretraining throughput: steady-state tokens/s and MFU of a preset, and ZeRO-1/2/3 vs DDP step time.

    python bench/bench_pretrain.py                      # small preset, 1 process; then 2-process DDP vs ZeRO
    python bench/bench_pretrain.py --preset tiny --steps 12 --rounds 1     # quick smoke run
    python bench/bench_pretrain.py --compile_rounds 2 --rounds 0           # small preset, eager vs --torch_compile
    python bench/bench_pretrain.py --compile_rounds 4 --rounds 0 --vs_tree /tmp/before   # this checkout vs another

Runs the real entry point (launch/pretrain.py under `accelerate launch`) and reads the per-window figures the
run logs itself (tokens/s, MFU against the peak it measured). Distributed variants run in interleaved rounds
(DDP, ZeRO-1, ZeRO-2, ZeRO-3, DDP, ...) so that drift in the machine's speed hits all of them alike; the
ratios are per round, then the median. The first logging window (warm-up) is dropped.
"""

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from pretrain_utils import accelerate_cmd, env  # noqa: E402

LINE = re.compile(r"^step (\d+) loss \S+ acc \S+ lr \S+ tok/s (\d+)")


def run_once(
    workdir, corpus, tokenizer, preset, steps, processes, accelerate_config, batch, seq_len, tag, extra=(), tree=ROOT
):
    """One run of `tree`'s launch/pretrain.py (this checkout's by default, its package first on the path)."""
    out = Path(workdir) / tag
    cmd = (
        accelerate_cmd(processes, accelerate_config)[:-1]
        + [str(Path(tree) / "launch" / "pretrain.py")]
        + [
            "--train_file",
            str(corpus.corpus_train),
            "--validation_file",
            str(corpus.corpus_validation),
            "--tokenizer_name",
            str(tokenizer),
            "--config_name",
            preset,
            "--output_dir",
            str(out),
            "--overwrite_output_dir",
            "--max_steps",
            str(steps),
            "--logging_steps",
            str(max(1, steps // 4)),
            "--eval_steps",
            "0",
            "--save_steps",
            "0",
            "--max_eval_samples",
            "32",
            "--report_to",
            "tensorboard",
            "--per_device_train_batch_size",
            str(batch),
            "--max_seq_length",
            str(seq_len),
            "--disable_tqdm",
            *extra,
        ]
    )
    threads = "2" if processes == 1 else "1"
    result = subprocess.run(
        cmd, capture_output=True, text=True, cwd=tree, env=env(OMP_NUM_THREADS=threads, PYTHONPATH=str(tree))
    )
    if result.returncode != 0:
        raise SystemExit(f"{tag} failed:\n{result.stderr[-3000:]}")
    rates = [int(m.group(2)) for m in map(LINE.match, result.stdout.splitlines()) if m]
    steady = rates[1:] or rates
    mfu = read_last_scalar(out / "logs", "train/mfu")
    return statistics.median(steady), mfu


def read_last_scalar(log_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = []
    for events in Path(log_dir).rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values += [e.value for e in acc.Scalars(tag)]
    return statistics.median(values[1:] or values) if values else float("nan")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", help="model size preset for the single-process figure")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of DDP/ZeRO runs (0: none)")
    parser.add_argument("--dist_preset", default="demo", help="model size for the 2-process comparison")
    parser.add_argument(
        "--vs_tree",
        type=Path,
        default=None,
        help="another checkout of this project (say `git worktree add /tmp/before <commit>`): its "
        "launch/pretrain.py runs the single-process preset in interleaved rounds beside this "
        "one's, with --compile_rounds rounds (eager, or compiled with --vs_compile)",
    )
    parser.add_argument("--vs_compile", action="store_true", help="--vs_tree rounds with --torch_compile")
    parser.add_argument(
        "--compile_rounds",
        type=int,
        default=0,
        help="also run the single-process preset this many interleaved rounds without and with "
        "--torch_compile (the first logging window, which holds the compilation, is dropped)",
    )
    args = parser.parse_args(argv)

    from ltgbert.demo_data import ensure_demo_data
    from ltgbert.tokenization import train_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        corpus = ensure_demo_data(Path(tmp) / "demo", num_words=200_000, pairs_per_phenomenon=10, task_sizes=(10, 5, 5))
        tokenizer = Path(tmp) / "tokenizer"
        train_tokenizer([corpus.corpus_train], vocab_size=16384, output_dir=tokenizer)

        rate, mfu = run_once(
            tmp, corpus, tokenizer, args.preset, args.steps, 1, None, args.batch, args.seq_len, "single"
        )
        print(
            f"{args.preset} preset, 1 process, batch {args.batch} x {args.seq_len}: "
            f"{rate:.0f} tokens/s, MFU {mfu:.1%} of the measured fp32 matmul rate"
        )

        if args.compile_rounds:
            if args.vs_tree is None:  # eager against --torch_compile, in this checkout
                variants = {"eager": ((), ROOT), "compiled": (("--torch_compile",), ROOT)}
            else:  # this checkout against the other one, both eager or both compiled
                flags = ("--torch_compile",) if args.vs_compile else ()
                variants = {"vs_tree": (flags, args.vs_tree), "this_tree": (flags, ROOT)}
            runs = {name: [] for name in variants}
            for r in range(args.compile_rounds):
                for name in list(variants) if r % 2 == 0 else list(variants)[::-1]:
                    extra, tree = variants[name]
                    runs[name].append(
                        run_once(
                            tmp,
                            corpus,
                            tokenizer,
                            args.preset,
                            args.steps,
                            1,
                            None,
                            args.batch,
                            args.seq_len,
                            f"{name}-{r}",
                            extra,
                            tree,
                        )
                    )
            (base, base_runs), (other, other_runs) = runs.items()
            ratio = statistics.median(c[0] / e[0] for e, c in zip(base_runs, other_runs))
            print(
                f"\n{args.preset} preset, 1 process, {args.compile_rounds} interleaved rounds (median tokens/s, MFU):"
            )
            for name, figures in runs.items():
                print(
                    f"{name:<10}{statistics.median(f[0] for f in figures):>10.0f} tokens/s"
                    f"{statistics.median(f[1] for f in figures):>8.1%} MFU"
                )
            print(f"{other} / {base}: {ratio:.3f}x (median of per-round ratios)")

        if not args.rounds:
            return
        variants = ["ddp.yaml", "zero1.yaml", "zero2.yaml", "zero3.yaml"]
        rates = {v: [] for v in variants}
        for r in range(args.rounds):
            for v in variants:
                rates[v].append(
                    run_once(
                        tmp,
                        corpus,
                        tokenizer,
                        args.dist_preset,
                        args.steps,
                        2,
                        v,
                        args.batch // 2,
                        args.seq_len,
                        f"{v}-{r}",
                    )[0]
                )
        print(
            f"\n2 CPU processes, {args.dist_preset} preset, global batch {args.batch} x {args.seq_len}, "
            f"{args.rounds} interleaved rounds (median tokens/s; step-time ratio to DDP = DDP tok/s / variant tok/s)"
        )
        print(f"{'variant':<12}{'tokens/s':>12}{'step time / DDP':>18}")
        for v in variants:
            ratio = statistics.median(d / x for d, x in zip(rates["ddp.yaml"], rates[v]))
            print(f"{v[:-5]:<12}{statistics.median(rates[v]):>12.0f}{ratio:>18.2f}")


if __name__ == "__main__":
    main()
