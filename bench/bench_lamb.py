"""Benchmark: our Lamb vs. its _foreach-only form, the per-parameter LTG-BERT loop, and torch's AdamW (foreach, fused).

The parameter set is that of the LTG-BERT "small" model (hidden 384, 12 layers, intermediate 1024 with a
GEGLU feed-forward, vocab 16384, relative position buckets), about 24M parameters in ~200 tensors, built
directly as tensors so the benchmark needs no model code. Gradients are random and fixed; each optimizer
steps on its own copy of the parameters. Rounds are interleaved (A, B, C, A, B, C, ...) so drift in machine
load affects all three alike, and the medians are printed side by side with ratios to our Lamb.

    python bench/bench_lamb.py                      # CPU, torch's default thread count
    OMP_NUM_THREADS=1 python bench/bench_lamb.py --rounds 30
    python bench/bench_lamb.py --device cuda        # where the per-parameter host sync really costs
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ltgbert.optimization import Lamb  # noqa: E402


def small_model_shapes(hidden=384, layers=12, intermediate=1024, vocab=16384, buckets=32) -> list[tuple[int, ...]]:
    """Parameter shapes of an LTG-BERT encoder + MLM head of the given size."""
    shapes = [(vocab, hidden), (hidden,), (hidden,), (2 * buckets - 1, hidden)]  # word emb, emb LN, rel. pos.
    for _ in range(layers):
        shapes += [
            (2 * hidden, hidden),
            (2 * hidden,),  # query+key projection
            (hidden, hidden),
            (hidden,),  # value
            (hidden, hidden),
            (hidden,),  # output projection
            (hidden,),
            (hidden,),  # post-attention norm
            (2 * intermediate, hidden),  # GEGLU up projection (no bias)
            (hidden, intermediate),  # down projection (no bias)
            (hidden,),
            (hidden,),  # feed-forward norm
        ]
    shapes += [(hidden, hidden), (hidden,), (hidden,), (hidden,), (vocab,)]  # MLM head transform, norm, bias
    return shapes


class ReferenceLamb(torch.optim.Optimizer):
    """The per-parameter loop of ltgoslo/ltg-bert ``training/lamb.py`` (host sync in ``if w_norm > 0``).

    Also the reference that tests/test_optimization.py checks ``ltgbert.optimization.Lamb`` against;
    ``always_adapt`` applies the trust ratio without weight decay too, as Lamb's option of that name.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.0, always_adapt=False):
        super().__init__(
            params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, always_adapt=always_adapt)
        )

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                m_t = exp_avg / (1 - beta1 ** state["step"])
                v_t = (exp_avg_sq / (1 - beta2 ** state["step"])).sqrt_()
                update = m_t / (v_t + group["eps"])
                ratio = 1.0
                if group["weight_decay"] > 0:
                    update.add_(p, alpha=group["weight_decay"])
                if group["weight_decay"] > 0 or group["always_adapt"]:
                    w_norm, g_norm = p.norm(), update.norm()
                    if w_norm > 0.0 and g_norm > 0.0:
                        ratio = w_norm / g_norm
                p.add_(update, alpha=-group["lr"] * float(ratio))


def make_params(shapes, device, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter((torch.randn(shape, generator=gen) * 0.02).to(device, dtype))
        p.grad = (torch.randn(shape, generator=gen) * 1e-3).to(device, dtype)
        params.append(p)
    return params


def groups_of(params, weight_decay):
    # Same split as ltgbert.optimization.param_groups: matrices decay, except the word embedding (index 0).
    decay = [p for i, p in enumerate(params) if p.ndim >= 2 and i != 0]
    no_decay = [p for i, p in enumerate(params) if not (p.ndim >= 2 and i != 0)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds per optimizer (interleaved)")
    parser.add_argument("--steps_per_round", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    shapes = small_model_shapes()
    n_params = sum(torch.Size(s).numel() for s in shapes)
    foreach_lamb = Lamb(groups_of(make_params(shapes, device, dtype), 0.1), lr=1e-3, weight_decay=0.1)
    foreach_lamb.cpu_fused_adam = False  # the Adam direction by _foreach kernels (before; what GPUs run)
    optimizers = {
        "lamb (ours)": Lamb(groups_of(make_params(shapes, device, dtype), 0.1), lr=1e-3, weight_decay=0.1),
        "lamb (_foreach dir.)": foreach_lamb,
        "lamb (per-param loop)": ReferenceLamb(groups_of(make_params(shapes, device, dtype), 0.1), lr=1e-3),
        "adamw (torch default)": torch.optim.AdamW(groups_of(make_params(shapes, device, dtype), 0.1), lr=1e-3),
        "adamw (foreach=True)": torch.optim.AdamW(
            groups_of(make_params(shapes, device, dtype), 0.1), lr=1e-3, foreach=True
        ),
        "adamw (fused=True)": torch.optim.AdamW(
            groups_of(make_params(shapes, device, dtype), 0.1), lr=1e-3, fused=True
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for round_index in range(args.warmup + args.rounds):
        for name, opt in optimizers.items():
            sync(device)
            start = time.perf_counter()
            for _ in range(args.steps_per_round):
                opt.step()
            sync(device)
            if round_index >= args.warmup:
                times[name].append((time.perf_counter() - start) / args.steps_per_round)

    print(
        f"LAMB step, LTG-BERT small parameter set: {n_params / 1e6:.1f}M params in {len(shapes)} tensors, "
        f"device={device}, dtype={args.dtype}, torch {torch.__version__}, threads={torch.get_num_threads()}, "
        f"{args.rounds} interleaved rounds x {args.steps_per_round} step(s)"
    )
    ours = statistics.median(times["lamb (ours)"])
    print(f"{'optimizer':<24}{'median ms':>12}{'min ms':>10}{'vs ours':>10}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<24}{median * 1e3:>12.2f}{min(values) * 1e3:>10.2f}{median / ours:>9.2f}x")


if __name__ == "__main__":
    main()
