"""Shared pieces of the model benchmarks: shapes, batches, FLOP counting, peak matmul rate, interleaved timing,
and a frozen copy of the pre-optimisation LTG-BERT attention path (the "before" of BENCHMARKS.md).

The machine these run on is shared, so nothing here times one variant and then the other: every bench runs
its variants in interleaved rounds (A B A B ...) inside one process and reports medians of per-round ratios.
The peak matmul rate is measured inside every round too, so an MFU figure is a ratio of two rates taken
under the same load. Two clocks: wall time, and the process's CPU time, which on a CPU shared with other
jobs does not count the time the scheduler gives to them; with one thread (OMP_NUM_THREADS=1) CPU time is
the steadier measure, with more threads it also counts OpenMP spin-waiting and wall time is the one to use.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from ltgbert import LtgBertConfig, LtgBertForMaskedLM  # noqa: E402
from ltgbert.flops import measure_matmul_rate, training_flops_per_token  # noqa: E402


@dataclass
class Shape:
    """Model shape shared by the LTG-BERT and BERT variants of a bench."""

    hidden: int = 384
    layers: int = 12
    heads: int = 6
    vocab: int = 16384
    ltg_intermediate: int = 1024  # GeGLU: up-projection is 2 x 1024, so 3 x 1024 x hidden weights
    bert_intermediate: int = 1536  # plain GELU: 2 x 1536 x hidden weights, the same count

    @classmethod
    def tiny(cls) -> Shape:
        return cls(hidden=32, layers=2, heads=4, vocab=512, ltg_intermediate=64, bert_intermediate=96)

    @classmethod
    def base(cls) -> Shape:
        return cls(hidden=768, layers=12, heads=12, vocab=16384, ltg_intermediate=2048, bert_intermediate=3072)


def ltg_model(shape: Shape, max_len: int, attn_implementation: str = "sdpa", **config_kwargs) -> LtgBertForMaskedLM:
    config = LtgBertConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        intermediate_size=shape.ltg_intermediate,
        max_position_embeddings=max(512, max_len),
        attn_implementation=attn_implementation,
        **config_kwargs,
    )
    return LtgBertForMaskedLM(config)


def bert_model(shape: Shape, max_len: int):
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        intermediate_size=shape.bert_intermediate,
        max_position_embeddings=max(512, max_len),
    )
    return BertForMaskedLM(config)


def mlm_batch(vocab: int, batch_size: int, seq_len: int, mask_prob: float = 0.15, seed: int = 0, device="cpu"):
    """Full-length rows (packed pretraining data has no padding), `mask_prob` of the tokens labelled."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch_size, seq_len), generator=g)
    ids[:, 0] = 1
    labels = torch.where(torch.rand(batch_size, seq_len, generator=g) < mask_prob, ids, -100)
    labels[0, 1] = ids[0, 1]  # at least one labelled position
    ids = torch.where(labels != -100, torch.full_like(ids, 4), ids)  # [MASK]
    mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    return {k: v.to(device) for k, v in dict(input_ids=ids, attention_mask=mask, labels=labels).items()}


def model_flops(shape: Shape, batch_size: int, seq_len: int, n_masked: int) -> float:
    """Useful training FLOPs of one step (``ltgbert.flops``: the count behind the training logs' MFU too), the
    same for LTG-BERT and BERT: the shapes give both models the same feed-forward weights."""
    tokens = batch_size * seq_len
    return tokens * training_flops_per_token(
        shape.hidden, shape.layers, 3 * shape.hidden * shape.ltg_intermediate, shape.vocab, seq_len, n_masked / tokens
    )


def clock() -> str:
    """The clock benches use: process CPU time with one thread on a CPU, else wall time."""
    return "cpu" if torch.get_num_threads() == 1 and not torch.cuda.is_available() else "wall"


def now(which: str) -> float:
    return time.process_time() if which == "cpu" else time.perf_counter()


def matmul_rate(
    dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 1, device="cpu", which: str = "wall"
) -> float:
    """FLOP/s of the fastest of `repeats` n^3 matmuls (``ltgbert.flops.measure_matmul_rate``) on the bench clock."""
    return measure_matmul_rate(dtype, n, repeats, device, clock=lambda: now(which))


def mlm_loss(model, batch):
    """The MLM loss of one batch; LTG-BERT projects only the labelled positions onto the vocabulary (as
    pretraining does, and as the FLOP count assumes), BERT every position (all it can do)."""
    if getattr(model.config, "model_type", None) == "ltgbert":
        return model(**batch, labelled_logits_only=True).loss
    return model(**batch).loss


def sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def autocast(dtype: str, device="cpu"):
    if dtype == "bf16":
        return torch.autocast(device_type=str(device).split(":")[0], dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step_fn(model, optimizer, batch, dtype: str = "fp32", device="cpu"):
    """A closure running one forward + backward + optimizer step (labels given: LTG projects masked rows)."""

    def step():
        with autocast(dtype, device):
            loss = mlm_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def time_steps(step, steps: int, device="cpu", which: str = "wall") -> float:
    sync(device)
    start = now(which)
    for _ in range(steps):
        step()
    sync(device)
    return now(which) - start


def interleaved(
    variants: dict, steps: int, rounds: int, device="cpu", on_round=None, which: str = "wall"
) -> dict[str, list[float]]:
    """Seconds per step of every variant in every round; the order alternates between rounds (A B, B A)."""
    names = list(variants)
    for name in names:  # warm-up: allocator, kernels, compilation
        time_steps(variants[name], 1, device)
    seconds = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            seconds[name].append(time_steps(variants[name], steps, device, which) / steps)
        if on_round is not None:
            on_round(r)
    return seconds


def median_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of a[i] / b[i]."""
    return statistics.median(x / y for x, y in zip(a, b))


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- the pre-optimisation attention ("before")
# A verbatim copy of LtgBertAttention's methods as committed before the performance work (b1a32e6). The bench
# binds them onto the modules of one model instance, so "before" and "after" run side by side in one process
# on the same weights layout.


def _before_position_tables(self, query, key, relative):
    pos = F.linear(self.attention_dropout(relative), self.qk_proj.weight, self.qk_proj.bias)
    query_pos, key_pos = (t.view(-1, self.num_heads, self.head_size) for t in pos.chunk(2, dim=-1))
    c2p = torch.einsum("bhqd,jhd->bhqj", query, key_pos * self.scale)
    p2c = torch.einsum("bhkd,jhd->bhkj", key * self.scale, query_pos)
    return c2p, p2c


def _before_position_bias(self, c2p, p2c, bucket_index):
    batch, heads, seq, _ = c2p.shape
    index = bucket_index.expand(batch, heads, seq, seq)
    bias = c2p.gather(3, index)
    bias = bias + p2c.gather(3, index.transpose(2, 3)).transpose(2, 3)
    return bias


def _before_attention_forward(self, hidden, relative, bucket_index, padding_mask, output_attentions=False, **_):
    batch, seq, _ = hidden.shape
    x = self.input_norm(hidden)
    query, key = self.qk_proj(x).chunk(2, dim=-1)
    split = lambda t: t.view(batch, seq, self.num_heads, self.head_size).transpose(1, 2)  # noqa: E731
    query, key, value = split(query), split(key), split(self.v_proj(x))
    c2p, p2c = _before_position_tables(self, query, key, relative)
    bias = _before_position_bias(self, c2p, p2c, bucket_index)
    if padding_mask is not None:
        bias = bias.masked_fill(~padding_mask[:, None, None, :], torch.finfo(bias.dtype).min)
    context = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=bias,
        scale=self.scale,
        dropout_p=self.attention_dropout.p if self.training else 0.0,
    )
    context = context.transpose(1, 2).reshape(batch, seq, -1)
    return self.output_dropout(self.output_norm(self.out_proj(context))), None


def _before_feed_forward(self, hidden, **_):
    value, gate = self.up_proj(self.input_norm(hidden)).chunk(2, dim=-1)
    x = value * F.gelu(gate, approximate="tanh")
    return self.dropout(self.down_proj(self.inner_norm(x)))


def use_before_attention(model: LtgBertForMaskedLM) -> LtgBertForMaskedLM:
    """Make this one model instance run the pre-optimisation layer code (the class is left untouched)."""
    model.ltgbert.config._attn_implementation = "sdpa"
    use_torch_dropout(model)
    for layer in model.ltgbert.encoder.layers:
        layer.attention.forward = types.MethodType(_before_attention_forward, layer.attention)
        layer.feed_forward.forward = types.MethodType(_before_feed_forward, layer.feed_forward)
    return model


def use_torch_dropout(model):
    """Replace every LtgBertDropout of this model instance by torch's nn.Dropout (as before LtgBertDropout)."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.Dropout):
                setattr(parent, name, nn.Dropout(child.p))
    return model
