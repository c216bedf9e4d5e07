"""The one FLOP count and the one peak-rate timer behind every MFU figure (training logs and bench/).

Model FLOPs utilisation = useful model FLOPs per second / the device's peak. Useful FLOPs of a training step,
per token (the MosaicBERT / PaLM convention: matmuls only, forward + backward = 3 x forward, 2 FLOPs per
multiply-add):

    6 * (L * (4 H^2 + W_ffn) + r * (H^2 + H * V)) + 12 * L * H * T

- ``4 H^2``: the query, key, value and output projections of a layer; ``W_ffn`` its feed-forward weights
  (LTG-BERT's GeGLU: 3 * H * I, up-projection 2 * I wide plus down; BERT: 2 * H * I);
- ``r * (H^2 + H * V)``: the MLM head (dense + vocabulary projection) at the masked share ``r`` of the tokens
  only: the full-vocabulary logits BERT computes everywhere are not useful work;
- ``12 * L * H * T``: attention scores and the weighted sum (two T x H products per token and layer).
Embedding lookups, norms, activations and LTG-BERT's relative-position terms are not counted.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

__all__ = ["training_flops_per_token", "config_flops_per_token", "measure_matmul_rate", "peak_flops"]

# Dense bf16 tensor-core peaks of common GPUs (FLOP/s; the vendors' figures without sparsity).
KNOWN_GPU_PEAKS = (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40", 181e12), ("A10", 125e12))


def training_flops_per_token(
    hidden: int, layers: int, ffn_weights: int, vocab: int, seq_len: int, mask_ratio: float
) -> float:
    """Useful training FLOPs per token (see the module docstring); ``ffn_weights`` per layer."""
    dense = layers * (4 * hidden * hidden + ffn_weights)
    head = mask_ratio * (hidden * hidden + hidden * vocab)
    return 6.0 * (dense + head) + 12.0 * layers * hidden * seq_len


def config_flops_per_token(config, seq_len: int, mask_ratio: float) -> float:
    """``training_flops_per_token`` of an ``LtgBertConfig`` (GeGLU feed-forward: 3 * H * I weights)."""
    h = config.hidden_size
    return training_flops_per_token(
        h, config.num_hidden_layers, 3 * h * config.intermediate_size, config.vocab_size, seq_len, mask_ratio
    )


def measure_matmul_rate(
    dtype: torch.dtype = torch.float32,
    n: int = 1024,
    repeats: int = 5,
    device="cpu",
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """FLOP/s of the fastest of ``repeats`` n^3 matmuls (after one warm-up): the practical peak for ``dtype``.

    The fastest, not the mean: start-up work on the other cores or a noisy neighbour only ever slows a
    product down. A private generator: drawing from the global one would shift dropout after a resume.
    """
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(n, n, device=device, generator=generator).to(dtype) for _ in range(2))
    best = math.inf
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = clock()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, clock() - start)
    return 2.0 * n**3 / max(best, 1e-12)


def peak_flops(device) -> float:
    """A known GPU's bf16 peak, else the measured fp32 matmul rate of this device (a CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in KNOWN_GPU_PEAKS:
            if key in name:
                return peak
    return measure_matmul_rate(torch.float32, device=device)
