"""Tests for ltgbert.optimization: Lamb against the per-parameter reference (bench/bench_lamb.py), groups, factory,
schedules."""

from __future__ import annotations

import copy
import io
import math
import sys
from pathlib import Path

import pytest
import torch

from ltgbert.errors import UserError
from ltgbert.optimization import (
    Lamb,
    _foreach_adam_direction,
    _fused_adam_direction,
    build_optimizer,
    get_lr_scheduler,
    param_groups,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_lamb import ReferenceLamb  # noqa: E402  (the LTG-BERT per-parameter loop)


class TinyNet(torch.nn.Module):
    """Several parameter shapes: an embedding, matrices, biases, a norm, a zero-initialised tensor."""

    def __init__(self):
        super().__init__()
        self.word_embedding = torch.nn.Embedding(50, 16)
        self.up = torch.nn.Linear(16, 32)
        self.down = torch.nn.Linear(32, 16)
        self.norm = torch.nn.LayerNorm(16)
        self.conv = torch.nn.Conv1d(16, 8, kernel_size=3)
        self.scale = torch.nn.Parameter(torch.zeros(8))  # ||w|| = 0 -> trust ratio 1
        self.frozen = torch.nn.Parameter(torch.ones(3), requires_grad=False)

    def forward(self, ids):
        h = self.norm(self.down(torch.relu(self.up(self.word_embedding(ids)))))  # [batch, time, 16]
        c = self.conv(h.transpose(1, 2))  # [batch, 8, time - 2]
        return (c.mean(-1) * (1 + self.scale)).pow(2).mean()


def _grads(model, seed):
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    model(torch.randint(0, 50, (4, 10))).backward()


@pytest.mark.parametrize(
    "weight_decay,cpu_chunk_numel,fused", [(0.0, None, True), (0.1, None, True), (0.1, 100, True), (0.1, None, False)]
)
def test_lamb_matches_reference(weight_decay, cpu_chunk_numel, fused):
    torch.manual_seed(0)
    model = TinyNet()
    ref_model = copy.deepcopy(model)
    groups = param_groups(model, weight_decay)
    opt = Lamb(groups, lr=1e-2, betas=(0.9, 0.98), eps=1e-6, weight_decay=weight_decay)
    if cpu_chunk_numel is not None:
        opt.cpu_chunk_numel = cpu_chunk_numel  # several _foreach chunks per group
    opt.cpu_fused_adam = fused  # False: the _foreach direction GPUs take
    ref_opt = ReferenceLamb(param_groups(ref_model, weight_decay), lr=1e-2, betas=(0.9, 0.98), eps=1e-6)
    for step in range(6):
        _grads(model, step)
        _grads(ref_model, step)
        if step == 2:  # a parameter without grad is skipped by both
            model.up.bias.grad = None
            ref_model.up.bias.grad = None
        opt.step()
        ref_opt.step()
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6, msg=name)
    assert opt.state[model.up.bias]["step"] == 5 and opt.state[model.up.weight]["step"] == 6
    assert torch.equal(model.frozen, torch.ones(3))


def test_lamb_always_adapt_and_clamp():
    torch.manual_seed(0)
    model = TinyNet()
    ref_model = copy.deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    ref_params = [p for p in ref_model.parameters() if p.requires_grad]
    opt = Lamb(params, lr=1e-2, always_adapt=True)
    ref_opt = ReferenceLamb(ref_params, lr=1e-2, betas=(0.9, 0.98), eps=1e-6, always_adapt=True)
    for step in range(3):
        _grads(model, step)
        _grads(ref_model, step)
        opt.step()
        ref_opt.step()
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)

    # clamp_trust_ratio=1e-9 makes every matrix step ~zero; zero-norm tensors still move (ratio 1 -> clamped).
    w = torch.nn.Parameter(torch.ones(4, 4))
    w.grad = torch.ones(4, 4)
    Lamb([w], lr=1.0, weight_decay=0.1, clamp_trust_ratio=1e-9).step()
    assert torch.allclose(w, torch.ones(4, 4), atol=1e-7)


@pytest.mark.parametrize("bias_correction", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_adam_direction_matches_foreach(bias_correction, dtype):
    """The CPU path (torch's fused Adam kernel into zeroed buffers) against the _foreach path the GPU takes:
    the same running averages and directions, tensors at different steps, a tensor of zeros included."""
    gen = torch.Generator().manual_seed(0)
    shapes, steps = [(7, 5), (3,), (2, 4, 6), (1,)], [1, 3, 10, 1000]

    def tensors(scale, zero_last=False):
        out = [(torch.randn(s, generator=gen) * scale).to(dtype) for s in shapes]
        if zero_last:
            out[-1].zero_()
        return out

    params, grads, m = tensors(1.0), tensors(1e-2, zero_last=True), tensors(1e-2)
    v = [x.abs() for x in tensors(1e-4)]
    m2, v2 = [x.clone() for x in m], [x.clone() for x in v]
    fused = _fused_adam_direction(params, grads, m, v, steps, 0.9, 0.98, 1e-6, bias_correction)
    reference = _foreach_adam_direction(grads, m2, v2, steps, 0.9, 0.98, 1e-6, bias_correction)
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-4)
    for got, want in zip([*fused, *m, *v], [*reference, *m2, *v2]):
        assert got.dtype == dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, **tol)
    for u, m_t, v_t, t in zip(fused, m, v, steps):  # the formula itself, with the averages as updated
        c1, c2 = (1 - 0.9**t, 1 - 0.98**t) if bias_correction else (1.0, 1.0)
        torch.testing.assert_close(u.float(), (m_t.float() / c1) / ((v_t.float() / c2).sqrt() + 1e-6), **tol)


def test_build_optimizer_adamw_is_fused_on_cpu():
    """torch takes its per-tensor loop on CPU unless told otherwise; "adamw" asks for the fused kernel, which
    then steps like the loop."""
    torch.manual_seed(0)
    model, twin = TinyNet(), TinyNet()
    twin.load_state_dict(model.state_dict())
    fused = build_optimizer("adamw", model, 1e-2, (0.9, 0.98), 1e-6, 0.1)
    loop = torch.optim.AdamW(param_groups(twin, 0.1), lr=1e-2, betas=(0.9, 0.98), eps=1e-6, foreach=False)
    assert fused.defaults["fused"] is True and not loop.defaults["fused"]
    for step in range(3):
        _grads(model, step)
        _grads(twin, step)
        fused.step()
        loop.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)


def test_lamb_state_dict_round_trip():
    torch.manual_seed(0)
    model = TinyNet()
    opt = Lamb(param_groups(model, 0.1), lr=1e-2, weight_decay=0.1)
    for step in range(3):
        _grads(model, step)
        opt.step()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    sd = opt.state_dict()
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    clone = TinyNet()
    clone.load_state_dict(saved["model"])
    clone_opt = Lamb(param_groups(clone, 0.1), lr=1e-2, weight_decay=0.1)
    clone_opt.load_state_dict(saved["opt"])
    for step in range(3, 6):
        _grads(model, step)
        _grads(clone, step)
        opt.step()
        clone_opt.step()
    for p, q in zip(model.parameters(), clone.parameters()):
        assert torch.equal(p, q)


def test_param_groups_split():
    model = TinyNet()
    groups = param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = sorted(names[id(p)] for p in groups[0]["params"])
    no_decay = sorted(names[id(p)] for p in groups[1]["params"])
    assert decay == ["conv.weight", "down.weight", "up.weight"]
    assert no_decay == [
        "conv.bias",
        "down.bias",
        "norm.bias",
        "norm.weight",
        "scale",
        "up.bias",
        "word_embedding.weight",
    ]
    assert groups[0]["weight_decay"] == 0.01 and groups[1]["weight_decay"] == 0.0


def test_build_optimizer():
    model = TinyNet()
    assert isinstance(build_optimizer("lamb", model, 1e-3, (0.9, 0.98), 1e-6, 0.1), Lamb)
    adamw = build_optimizer("AdamW", model, 1e-3, (0.9, 0.999), 1e-8, 0.1)
    assert isinstance(adamw, torch.optim.AdamW) and len(adamw.param_groups) == 2
    with pytest.raises(UserError, match="sgd"):
        build_optimizer("sgd", model, 1e-3, (0.9, 0.98), 1e-6, 0.1)


def _lrs(name, warmup, total, steps, min_lr_ratio=0.1):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = get_lr_scheduler(name, opt, warmup, total, min_lr_ratio)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_lr_schedules():
    cos = _lrs("cosine", 10, 110, 130)
    assert cos[0] == 0.0 and cos[5] == pytest.approx(0.5) and cos[10] == pytest.approx(1.0)
    assert cos[60] == pytest.approx(0.55)  # half way: 0.1 + 0.9 * 0.5
    assert cos[110] == pytest.approx(0.1) and cos[129] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(cos[10:], cos[11:]))
    lin = _lrs("linear", 10, 110, 120, min_lr_ratio=0.0)
    assert lin[60] == pytest.approx(0.5) and lin[110] == 0.0 and lin[119] == 0.0
    const = _lrs("constant", 4, 100, 20)
    assert const[2] == pytest.approx(0.5) and const[4:] == [1.0] * 16
    # LTG recipe: 1.6% warmup of 31250 steps
    ltg = _lrs("cosine", 500, 31250, 501)
    assert ltg[250] == pytest.approx(0.5) and ltg[500] == pytest.approx(1.0)
    assert math.isclose(_lrs("cosine", 0, 10, 1)[0], 1.0)
    with pytest.raises(UserError, match="unknown lr scheduler"):
        _lrs("poly", 1, 10, 1)


def test_scheduler_state_round_trip():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = get_lr_scheduler("cosine", opt, 5, 50)
    for _ in range(7):
        opt.step()
        sched.step()
    buffer = io.BytesIO()
    torch.save(sched.state_dict(), buffer)
    buffer.seek(0)
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched2 = get_lr_scheduler("cosine", opt2, 5, 50)
    sched2.load_state_dict(torch.load(buffer, weights_only=False))
    opt.step(), sched.step(), opt2.step(), sched2.step()
    assert sched.get_last_lr() == sched2.get_last_lr()
