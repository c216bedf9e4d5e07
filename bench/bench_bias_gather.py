"""The relative-position bias gather, forward + backward on CPU: 16-bit tables gathered through float32 (what
LtgBertAttention.position_bias does) against the plain 16-bit gather it replaced, and the float32 gather.

    OMP_NUM_THREADS=1 python bench/bench_bias_gather.py              # bf16, the small model's attention shapes
    OMP_NUM_THREADS=1 python bench/bench_bias_gather.py --dtype fp16 --rounds 40
    OMP_NUM_THREADS=1 python bench/bench_bias_gather.py --compile [--size base]   # compiled: gather vs flat index

--compile times what a compiled layer runs (fp32 tables, a padded batch, the padding fill on the p2c table
included): LtgBertAttention.position_bias, which takes two gathers when compiled, against the flat index_select
of the eager path, both compiled with --compile_backend; outputs and gradients are checked equal first.

Shapes: per-bucket tables [16, 6, 128, 63] (batch, heads, T, 2 * 32 - 1) into a [16, 6, 128, 128] bias, as in
bench_model.py. Rounds are interleaved (A B C, C B A, ...; common.interleaved), 5 passes each; the ratio to
``direct_16bit`` is the median of per-round ratios; process CPU time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (puts the repository root on sys.path)
import torch  # noqa: E402

from ltgbert import LtgBertConfig  # noqa: E402
from ltgbert.modeling_ltgbert import LtgBertAttention, _flat_bucket_index, log_bucket_indices  # noqa: E402


def direct_position_bias(self, c2p, p2c, bucket_index):
    """LtgBertAttention.position_bias as committed before (68bb65d): the gather in the tables' own dtype."""
    batch, heads, seq, buckets = c2p.shape
    c2p_index, p2c_index = _flat_bucket_index(bucket_index, buckets)
    bias = c2p.reshape(batch * heads, seq * buckets).index_select(1, c2p_index)
    bias = bias + p2c.reshape(batch * heads, seq * buckets).index_select(1, p2c_index)
    return bias.view(batch, heads, seq, seq)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--compile", action="store_true", help="compiled fp32 gathers: the gather form vs the flat index")
    p.add_argument("--compile_backend", default="inductor")
    p.add_argument("--size", choices=["small", "base"], default="small", help="6 or 12 heads")
    p.add_argument("--tiny", action="store_true", help="small shapes, 2 rounds: a smoke test")
    args = p.parse_args(argv)
    batch, heads, seq, bucket_size = (2, 2, 16, 8) if args.tiny else (16, 12 if args.size == "base" else 6, 128, 32)
    rounds = 2 if args.tiny else args.rounds
    config = LtgBertConfig(hidden_size=heads * 8, num_attention_heads=heads, position_bucket_size=bucket_size)
    bucket_index = log_bucket_indices(seq, seq, bucket_size, config.max_position_embeddings)
    if args.compile:
        return compiled(args, config, bucket_index, batch, rounds)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    now = LtgBertAttention(config)
    direct = LtgBertAttention(config)
    direct.position_bias = types.MethodType(direct_position_bias, direct)
    shape = (batch, heads, seq, 2 * bucket_size - 1)
    tables16 = [torch.randn(shape).to(dtype).requires_grad_() for _ in range(2)]
    tables32 = [t.detach().float().requires_grad_() for t in tables16]
    grad16 = torch.randn(batch, heads, seq, seq).to(dtype)
    variants = {
        "through_fp32": (now, tables16, grad16),
        "direct_16bit": (direct, tables16, grad16),
        "fp32_tables": (now, tables32, grad16.float()),
    }

    def step(module, tables, grad):
        return lambda: torch.autograd.grad(module.position_bias(*tables, bucket_index), tables, grad)

    seconds = common.interleaved({name: step(*v) for name, v in variants.items()}, 5, rounds, which="cpu")
    results = {
        name: {
            "ms": 1e3 * statistics.median(s),
            "speed_vs_direct_16bit": common.median_ratio(seconds["direct_16bit"], s),
        }
        for name, s in seconds.items()
    }
    print(
        f"bias gather {list(shape)} -> [{batch}, {heads}, {seq}, {seq}], {args.dtype}, forward + backward, "
        f"{torch.get_num_threads()} threads, median of {rounds} interleaved rounds"
    )
    print("  ".join(f"{n} {e['ms']:.2f} ms ({e['speed_vs_direct_16bit']:.2f}x)" for n, e in results.items()))
    return results


def compiled(args, config, bucket_index, batch, rounds) -> dict:
    module = LtgBertAttention(config)
    heads, seq, buckets = config.num_attention_heads, bucket_index.shape[0], 2 * config.position_bucket_size - 1
    padding = torch.ones(batch, seq, dtype=torch.bool)
    padding[-1, seq - seq // 4 :] = False
    lowest = torch.finfo(torch.float32).min / 2

    def bias(position_bias):
        def f(c2p, p2c):  # what LtgBertAttention.attend does with a padded batch
            return position_bias(c2p, p2c.masked_fill(~padding[:, None, :, None], lowest), bucket_index)

        return torch.compile(f, backend=args.compile_backend)

    functions = {
        "gather": bias(module.position_bias),
        "flat_index": bias(types.MethodType(direct_position_bias, module)),
    }
    tables = [torch.randn(batch, heads, seq, buckets, requires_grad=True) for _ in range(2)]
    grad = torch.randn(batch, heads, seq, seq)

    def forward_backward(f):
        bias = f(*tables)
        return bias, torch.autograd.grad(bias, tables, grad)

    outputs = {n: forward_backward(f) for n, f in functions.items()}
    torch.testing.assert_close(outputs["gather"], outputs["flat_index"], rtol=0, atol=0)

    def step(f):
        return lambda: forward_backward(f)

    seconds = common.interleaved({n: step(f) for n, f in functions.items()}, 5, rounds, which="cpu")
    results = {
        n: {"ms": 1e3 * statistics.median(s), "speed_vs_flat_index": common.median_ratio(seconds["flat_index"], s)}
        for n, s in seconds.items()
    }
    print(
        f"compiled ({args.compile_backend}) bias gather, fp32 [{batch}, {heads}, {seq}, {buckets}] -> "
        f"[{batch}, {heads}, {seq}, {seq}] with padding, forward + backward, median of {rounds} interleaved rounds"
    )
    print("  ".join(f"{n} {e['ms']:.2f} ms ({e['speed_vs_flat_index']:.2f}x)" for n, e in results.items()))
    return results


if __name__ == "__main__":
    main()
