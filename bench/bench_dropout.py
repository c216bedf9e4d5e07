"""Dropout forward + backward on CPU: LtgBertDropout against its previous bool-mask version and nn.Dropout.

    OMP_NUM_THREADS=1 python bench/bench_dropout.py              # the small model's two dropout shapes, p = 0.1
    OMP_NUM_THREADS=1 python bench/bench_dropout.py --rounds 60

Shapes: a hidden-state dropout [16, 128, 384] and an attention-probability dropout [16, 6, 128, 128] of the
small bench model (bench_model.py). Each variant runs 5 forward + backward passes per round; rounds are
interleaved (A B C, C B A, ...; common.interleaved) and the ratio to ``bool_mask`` is the median of per-round
ratios. The variants:

  ltg        ``ltgbert.modeling_ltgbert.LtgBertDropout`` as it is now: keeps the int16 random numbers for the
             backward and builds a 0/1 float mask from them (cast, in-place comparison), then multiplies
             and scales;
  bool_mask  the version committed before (6f7b81b), frozen below: a bool keep-mask, kept for the backward,
             multiplied into the float input (CPU TensorIterator casts the bool operand in a separate pass);
  torch      ``nn.Dropout`` (``bernoulli_`` into a float mask).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (puts the repository root on sys.path)
import torch  # noqa: E402
from torch import nn  # noqa: E402

from ltgbert.modeling_ltgbert import LtgBertDropout  # noqa: E402


class _BoolMaskDropout(torch.autograd.Function):
    """LtgBertDropout's autograd function as committed in 6f7b81b (the baseline)."""

    @staticmethod
    def forward(ctx, x, threshold):
        words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), None)
        bits = words.view(torch.int16)[: x.numel()].view(x.shape)
        keep = bits >= threshold - 32768
        ctx.scale = 65536.0 / (65536 - threshold)
        ctx.save_for_backward(keep)
        return x.mul(keep).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None


class BoolMaskDropout(nn.Dropout):
    def forward(self, x):
        return _BoolMaskDropout.apply(x, round(self.p * 65536))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--p", type=float, default=0.1)
    p.add_argument("--passes", type=int, default=5, help="forward + backward passes per variant per round")
    p.add_argument("--tiny", action="store_true", help="small shapes, 2 rounds: a smoke test")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    shapes = [(4, 8, 32), (4, 2, 8, 8)] if args.tiny else [(16, 128, 384), (16, 6, 128, 128)]
    rounds = 2 if args.tiny else args.rounds
    modules = {"ltg": LtgBertDropout(args.p), "bool_mask": BoolMaskDropout(args.p), "torch": nn.Dropout(args.p)}
    results = {}
    for shape in shapes:
        x = torch.randn(shape, requires_grad=True)
        grad = torch.randn(shape)

        def step(module):
            def run():
                module(x).backward(grad)
                x.grad = None

            return run

        seconds = common.interleaved(
            {name: step(m.train()) for name, m in modules.items()}, args.passes, rounds, which="cpu"
        )
        results[str(list(shape))] = {
            name: {"ms": 1e3 * statistics.median(s), "speed_vs_bool_mask": common.median_ratio(seconds["bool_mask"], s)}
            for name, s in seconds.items()
        }
    print(
        f"dropout p={args.p}, forward + backward, {torch.get_num_threads()} threads, process CPU time, "
        f"median of {rounds} interleaved rounds"
    )
    for shape, entry in results.items():
        print(shape, "  ".join(f"{n} {e['ms']:.2f} ms ({e['speed_vs_bool_mask']:.2f}x)" for n, e in entry.items()))
    return results


if __name__ == "__main__":
    main()
