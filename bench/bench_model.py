"""Training throughput of LtgBertForMaskedLM against transformers' BertForMaskedLM at the same parameter count.

    python bench/bench_model.py                          # small size, fp32, 16 x 128, AdamW (fused)
    python bench/bench_model.py --size base              # the published size: hidden 768, 12 layers, 12 heads
    python bench/bench_model.py --dtype bf16             # bf16 autocast (CPU: needs AVX512-BF16/AMX)
    python bench/bench_model.py --baseline               # also the pre-optimisation code, and torch's dropout
    python bench/bench_model.py --compile                # also both models with their layers compiled
    python bench/bench_model.py --tiny                   # seconds; the smoke test

The small size: hidden 384, 12 layers, 6 heads, vocab 16384; LTG intermediate 1024 (GeGLU, 3 x 1024 x 384
weights) vs BERT intermediate 1536 (2 x 1536 x 384): the same number of encoder weights. Base: hidden 768,
12 heads, LTG intermediate 2048 vs BERT 3072. Every variant steps with the same optimizer (--optimizer).
15% of the tokens are labelled; LTG projects onto the vocabulary only at those rows, BERT computes full
logits as transformers does (the baseline users have). Variants run in interleaved rounds in one process;
tokens/s are medians over
rounds, the ratio is the median of per-round ratios, and MFU is the useful model FLOP rate (common.model_flops)
over the machine's matmul rate: the fastest n^3 matmul of the whole run (timed twice in every round), so that a
round whose short matmul sample was slowed by a neighbour does not inflate the figure. The per-round MFU range is
printed beside it. With one thread (OMP_NUM_THREADS=1) every time is process CPU time, which other jobs on a
shared machine do not inflate (--clock to choose).

bf16 is a speed lever only on CPUs with bf16 matrix instructions (AVX512-BF16/AMX). Elsewhere (AVX2) oneDNN
emulates them, a bf16 matmul runs about 100x slower than fp32 and no bf16 peak is meaningful: the bench then
says so, times the models all the same, and reports MFU against the fp32 rate only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402

from ltgbert.distributed import cpu_has_native  # noqa: E402
from ltgbert.optimization import Lamb, adamw, param_groups  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument(
        "--size",
        choices=["small", "base"],
        default="small",
        help="small: hidden 384, 12 layers; base: hidden 768, 12 layers, 12 heads (the published size)",
    )
    p.add_argument(
        "--optimizer",
        choices=["adamw", "adamw_unfused", "lamb"],
        default="adamw",
        help="adamw: ltgbert.optimization.adamw (torch's fused kernel, as launch/ uses it); "
        "adamw_unfused: torch.optim.AdamW's own CPU default (before this option); lamb: ours",
    )
    p.add_argument("--steps", type=int, default=2, help="training steps per variant per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--layers", type=int, default=None, help="override the layer count (quick profiling)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="also run both models with every encoder layer torch.compile-d (regional compilation, "
        "as launch/pretrain.py --torch_compile does for LTG): ltg_compiled, bert_compiled",
    )
    p.add_argument("--compile_backend", default="inductor", help="torch.compile backend for --compile")
    p.add_argument(
        "--baseline",
        action="store_true",
        help="also run LTG with the pre-optimisation layer code, and with torch's nn.Dropout",
    )
    p.add_argument("--no_bert", action="store_true", help="LTG variants only (with --baseline: before/after)")
    p.add_argument("--matmul_size", type=int, default=2048)
    p.add_argument("--tiny", action="store_true", help="tiny shapes, one step, two rounds: a smoke test")
    p.add_argument("--json", type=str, default=None, help="also write the results to this JSON file")
    p.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default=None,
        help="process CPU time or wall time (default: cpu with one thread, else wall)",
    )
    args = p.parse_args(argv)
    if args.tiny:
        args.steps, args.rounds, args.seq_len, args.batch_size, args.matmul_size = 1, 2, 32, 4, 256
    return args


def build_variants(args, shape):
    """name -> (model, step closure); the same batch for all, seeded weights."""
    torch.manual_seed(0)
    batch = common.mlm_batch(shape.vocab, args.batch_size, args.seq_len)
    models = {"ltg": common.ltg_model(shape, args.seq_len)}
    if args.compile:
        models["ltg_compiled"] = common.ltg_model(shape, args.seq_len).compile_encoder_layers(
            backend=args.compile_backend
        )
    if args.baseline:
        models["ltg_before"] = common.use_before_attention(common.ltg_model(shape, args.seq_len))
        models["ltg_nn_dropout"] = common.use_torch_dropout(common.ltg_model(shape, args.seq_len))
    if not args.no_bert:
        models["bert"] = common.bert_model(shape, args.seq_len)
        if args.compile:
            models["bert_compiled"] = common.bert_model(shape, args.seq_len)
            for layer in models["bert_compiled"].bert.encoder.layer:
                layer.compile(backend=args.compile_backend)
    variants = {}
    for name, model in models.items():
        model.train()
        variants[name] = (model, common.train_step_fn(model, make_optimizer(args.optimizer, model), batch, args.dtype))
    return variants, batch


def make_optimizer(name, model):
    if name == "lamb":
        return Lamb(param_groups(model, 0.01), lr=1e-4, weight_decay=0.01)
    groups = [{"params": list(model.parameters())}]
    return adamw(groups, lr=1e-4) if name == "adamw" else torch.optim.AdamW(groups, lr=1e-4)


def main(argv=None) -> dict:
    args = parse_args(argv)
    shape = common.Shape.tiny() if args.tiny else common.Shape.base() if args.size == "base" else common.Shape()
    if args.layers is not None:
        shape.layers = args.layers
    torch_dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    variants, batch = build_variants(args, shape)
    n_masked = int((batch["labels"] != -100).sum())
    tokens = args.batch_size * args.seq_len
    flops = common.model_flops(shape, args.batch_size, args.seq_len, n_masked)

    # bf16 without bf16 matrix instructions is emulated: no bf16 peak to compare against (and timing one 2048^3
    # bf16 matmul would take half a minute a round).
    native = args.dtype == "fp32" or cpu_has_native(args.dtype)
    # Matmul rates timed in every round (between the variants' timings); MFU divides by the fastest of the run.
    peaks = {"fp32": [], args.dtype: []} if native else {"fp32": []}

    which = args.clock or common.clock()

    def on_round(_):
        for name in peaks:
            dtype = torch.float32 if name == "fp32" else torch_dtype
            peaks[name].append(common.matmul_rate(dtype, args.matmul_size, repeats=2, which=which))

    seconds = common.interleaved(
        {n: v[1] for n, v in variants.items()}, args.steps, args.rounds, on_round=on_round, which=which
    )

    results = {
        "shape": vars(shape),
        "size": "tiny" if args.tiny else args.size,
        "optimizer": args.optimizer,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "steps": args.steps,
        "rounds": args.rounds,
        "compile": args.compile,
        "n_masked": n_masked,
        "model_flops_per_step": flops,
        "threads": torch.get_num_threads(),
        "clock": which,
        "native_dtype": native,
        "peak_fp32_flops_by_round": peaks["fp32"],
        "models": {},
    }
    best = {name: max(rates) for name, rates in peaks.items()}
    for name, rate in best.items():
        results[f"peak_{name}_flops"] = rate
    for name, (model, _) in variants.items():
        per_round = seconds[name]
        entry = {
            "params": common.num_params(model),
            "tokens_per_s": statistics.median(tokens / s for s in per_round),
            "seconds_per_step_by_round": per_round,
        }
        for peak_name, peak in best.items():
            mfu_by_round = [flops / s / peak for s in per_round]
            entry[f"mfu_{peak_name}_peak"] = statistics.median(mfu_by_round)
            entry[f"mfu_{peak_name}_peak_range"] = [min(mfu_by_round), max(mfu_by_round)]
        results["models"][name] = entry
    # (faster, slower) pairs: each ratio is the slower variant's time over the faster one's.
    pairs = [
        ("ltg", "bert"),
        ("ltg_compiled", "bert"),
        ("ltg_compiled", "bert_compiled"),
        ("ltg_before", "bert"),
        ("ltg_compiled", "ltg"),
        ("ltg", "ltg_before"),
        ("ltg", "ltg_nn_dropout"),
    ]
    pairs = [(a, b) for a, b in pairs if a in seconds and b in seconds]
    ratios = {f"{a}/{b}": common.median_ratio(seconds[b], seconds[a]) for a, b in pairs}
    # Interference on a shared machine only ever slows a round down: the fastest rounds are the least disturbed.
    results["ratios_fastest_rounds"] = {f"{a}/{b}": min(seconds[b]) / min(seconds[a]) for a, b in pairs}
    results["ratios"] = ratios
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


def report(results: dict) -> None:
    print(
        f"{results['size']}  {results['dtype']}  {results['optimizer']}  batch {results['batch_size']} x "
        f"{results['seq_len']}  {results['threads']} threads  "
        f"compile={results['compile']}  masked {results['n_masked']}  clock {results['clock']}  "
        f"model GFLOP/step {results['model_flops_per_step'] / 1e9:.1f}"
    )
    dtype = results["dtype"]
    second = dtype != "fp32" and results["native_dtype"]
    peak_line = f"measured matmul peak (fastest of the run): fp32 {results['peak_fp32_flops'] / 1e9:.1f} GFLOP/s"
    if second:
        peak_line += f", {dtype} {results['peak_' + dtype + '_flops'] / 1e9:.1f} GFLOP/s"
    print(peak_line)
    if not results["native_dtype"]:
        print(
            f"this CPU has no {dtype} matrix instructions ({torch.backends.cpu.get_cpu_capability()}): {dtype} is "
            "emulated here, not a speed lever; MFU is against the fp32 rate only"
        )
    print(
        f"{'model':<16}{'params':>12}{'tokens/s':>12}{'MFU(fp32)':>11}{'per round':>16}"
        + (f"{'MFU(' + dtype + ')':>11}" if second else "")
    )
    for name, e in results["models"].items():
        low, high = e["mfu_fp32_peak_range"]
        line = (
            f"{name:<16}{e['params']:>12,}{e['tokens_per_s']:>12.0f}{100 * e['mfu_fp32_peak']:>10.1f}%"
            f"{100 * low:>8.1f}-{100 * high:.1f}%"
        )
        if second:
            line += f"{100 * e['mfu_' + dtype + '_peak']:>10.1f}%"
        print(line)
    for name, r in results["ratios"].items():
        print(
            f"speed ratio {name}: {r:.3f}x (median of per-round ratios; "
            f"fastest rounds {results['ratios_fastest_rounds'][name]:.3f}x)"
        )


if __name__ == "__main__":
    main()
