"""Pretraining throughput: steady-state tokens/s and MFU of a preset, and ZeRO-1/2/3 vs DDP step time.

    python bench/bench_pretrain.py                      # small preset, 1 process; then 2-process DDP vs ZeRO
    python bench/bench_pretrain.py --preset tiny --steps 12 --rounds 1     # quick smoke run
    python bench/bench_pretrain.py --compile_rounds 2 --rounds 0           # small preset, eager vs --torch_compile

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


def run_once(workdir, corpus, tokenizer, preset, steps, processes, accelerate_config, batch, seq_len, tag,
             extra=()):
    out = Path(workdir) / tag
    cmd = accelerate_cmd(processes, accelerate_config) + [
        "--train_file", str(corpus.corpus_train), "--validation_file", str(corpus.corpus_validation),
        "--tokenizer_name", str(tokenizer), "--config_name", preset, "--output_dir", str(out),
        "--overwrite_output_dir", "--max_steps", str(steps), "--logging_steps", str(max(1, steps // 4)),
        "--eval_steps", "0", "--save_steps", "0", "--max_eval_samples", "32", "--report_to", "tensorboard",
        "--per_device_train_batch_size", str(batch), "--max_seq_length", str(seq_len), "--disable_tqdm", *extra,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env(OMP_NUM_THREADS="2"
                                                                                     if processes == 1 else "1"))
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", help="model size preset for the single-process figure")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of DDP/ZeRO runs (0: none)")
    parser.add_argument("--dist_preset", default="demo", help="model size for the 2-process comparison")
    parser.add_argument("--compile_rounds", type=int, default=0,
                        help="also run the single-process preset this many interleaved rounds without and with "
                             "--torch_compile (the first logging window, which holds the compilation, is dropped)")
    args = parser.parse_args()

    from ltgbert.demo_data import ensure_demo_data
    from ltgbert.tokenization import train_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        corpus = ensure_demo_data(Path(tmp) / "demo", num_words=200_000, pairs_per_phenomenon=10,
                                  task_sizes=(10, 5, 5))
        tokenizer = Path(tmp) / "tokenizer"
        train_tokenizer([corpus.corpus_train], vocab_size=16384, output_dir=tokenizer)

        rate, mfu = run_once(tmp, corpus, tokenizer, args.preset, args.steps, 1, None, args.batch, args.seq_len,
                             "single")
        print(f"{args.preset} preset, 1 process, batch {args.batch} x {args.seq_len}: "
              f"{rate:.0f} tokens/s, MFU {mfu:.1%} of the measured fp32 matmul rate")

        if args.compile_rounds:
            runs = {"eager": [], "compiled": []}
            for r in range(args.compile_rounds):
                for name in ("eager", "compiled") if r % 2 == 0 else ("compiled", "eager"):
                    extra = ("--torch_compile",) if name == "compiled" else ()
                    runs[name].append(run_once(tmp, corpus, tokenizer, args.preset, args.steps, 1, None, args.batch,
                                               args.seq_len, f"{name}-{r}", extra))
            ratio = statistics.median(c[0] / e[0] for e, c in zip(runs["eager"], runs["compiled"]))
            print(f"\n{args.preset} preset, 1 process, {args.compile_rounds} interleaved rounds "
                  "(median tokens/s, MFU):")
            for name, figures in runs.items():
                print(f"{name:<10}{statistics.median(f[0] for f in figures):>10.0f} tokens/s"
                      f"{statistics.median(f[1] for f in figures):>8.1%} MFU")
            print(f"--torch_compile / eager: {ratio:.3f}x (median of per-round ratios)")

        if not args.rounds:
            return
        variants = ["ddp.yaml", "zero1.yaml", "zero2.yaml", "zero3.yaml"]
        rates = {v: [] for v in variants}
        for r in range(args.rounds):
            for v in variants:
                rates[v].append(run_once(tmp, corpus, tokenizer, args.dist_preset, args.steps, 2, v, args.batch // 2,
                                         args.seq_len, f"{v}-{r}")[0])
        print(f"\n2 CPU processes, {args.dist_preset} preset, global batch {args.batch} x {args.seq_len}, "
              f"{args.rounds} interleaved rounds (median tokens/s; step-time ratio to DDP = DDP tok/s / variant tok/s)")
        print(f"{'variant':<12}{'tokens/s':>12}{'step time / DDP':>18}")
        for v in variants:
            ratio = statistics.median(d / x for d, x in zip(rates["ddp.yaml"], rates[v]))
            print(f"{v[:-5]:<12}{statistics.median(rates[v]):>12.0f}{ratio:>18.2f}")


if __name__ == "__main__":
    main()
