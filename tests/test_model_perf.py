"""Performance options of the model keep its numerics: the optimised layer code against the pre-optimisation
copy kept by the benchmarks, selective gradient checkpointing against none, padding folded into the
position table."""

import sys
from pathlib import Path

import pytest
import torch

from ltgbert import LtgBertForMaskedLM, LtgBertModel
from ltgbert.checkpointing import enable_activation_checkpointing

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import common  # noqa: E402


def _no_dropout(config):
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    return config


def _batch(vocab=64, batch=3, seq=24):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, seq - 5 :] = 0
    mask[2, seq // 2 :] = 0
    labels = torch.where(torch.rand(batch, seq, generator=g) < 0.3, ids, -100)
    labels[0, 1] = ids[0, 1]
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_optimised_layers_match_the_pre_optimisation_code(tiny_config):
    """bench/common.py's frozen "before" layer code and the current code: same loss and gradients."""
    torch.manual_seed(0)
    model = LtgBertForMaskedLM(_no_dropout(tiny_config))
    batch = _batch()
    loss, grads = _loss_and_grads(model, batch)
    before = LtgBertForMaskedLM(tiny_config)
    before.load_state_dict(model.state_dict())
    common.use_before_attention(before)
    loss_before, grads_before = _loss_and_grads(before, batch)
    torch.testing.assert_close(loss, loss_before, rtol=1e-5, atol=1e-6)
    for name, g in grads_before.items():
        assert (grads[name] - g).abs().max() <= 1e-5 * g.abs().max() + 1e-8, name


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_selective_checkpointing_gives_identical_gradients(tiny_config, use_reentrant):
    torch.manual_seed(0)
    model = LtgBertForMaskedLM(_no_dropout(tiny_config))
    batch = _batch()
    loss, plain = _loss_and_grads(model, batch)
    model.config.gradient_checkpointing_mode = "selective"
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    loss_ckpt, checkpointed = _loss_and_grads(model, batch)
    assert torch.equal(loss, loss_ckpt) and plain.keys() == checkpointed.keys()
    for name in plain:
        tolerance = 0.0 if not use_reentrant else 1e-6 * plain[name].abs().max().item()
        assert (checkpointed[name] - plain[name]).abs().max() <= tolerance, name


def test_selective_checkpointing_replays_dropout(tiny_config):
    """With dropout on, the recomputed parts draw the same dropout masks (the RNG state is replayed)."""
    model = LtgBertForMaskedLM(tiny_config)
    batch = _batch()
    torch.manual_seed(1)
    _, plain = _loss_and_grads(model, batch)
    model.config.gradient_checkpointing_mode = "selective"
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(1)
    _, checkpointed = _loss_and_grads(model, batch)
    for name in plain:
        assert torch.equal(checkpointed[name], plain[name]), name


def test_unknown_checkpointing_mode_is_rejected(tiny_config):
    model = LtgBertForMaskedLM(tiny_config)
    model.config.gradient_checkpointing_mode = "layers"
    model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient_checkpointing_mode"):
        model(**_batch())


def test_all_padding_row_stays_finite(tiny_config):
    model = LtgBertModel(_no_dropout(tiny_config)).eval()
    batch = _batch()
    mask = batch["attention_mask"].clone()
    mask[2] = 0
    for implementation in ("eager", "sdpa"):
        model.config._attn_implementation = implementation
        with torch.no_grad():
            out = model(batch["input_ids"], attention_mask=mask).last_hidden_state
        assert torch.isfinite(out).all(), implementation


def test_training_path_matches_sdpa_in_eval(tiny_config):
    """On CPU with gradients on, attention takes the explicit baddbmm path; it agrees with SDPA's kernel."""
    model = LtgBertModel(_no_dropout(tiny_config)).eval()
    batch = _batch()
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        fused = model(batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    explicit = model(batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    assert (explicit.detach() - fused)[real].abs().max() < 1e-5


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_fast_dropout_drops_at_rate_p_and_keeps_the_expectation(p):
    from ltgbert.modeling_ltgbert import LtgBertDropout

    dropout = LtgBertDropout(p).train()
    x = torch.ones(1000, 1000, requires_grad=True)
    torch.manual_seed(0)
    y = dropout(x)
    kept = y != 0
    # 1e6 draws: the binomial standard deviation of the rate is under 5e-4.
    assert abs(1 - kept.float().mean().item() - p) < 2.5e-3
    assert abs(y.mean().item() - 1.0) < 5e-3  # kept values are scaled by 1 / (1 - p)
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / (1 - p)), rtol=1e-4)
    y.backward(torch.full_like(y, 2.0))
    assert torch.equal(x.grad, 2.0 * y.detach())  # gradient: the same mask, the same scale
    # Every dropped element is independent of its neighbours: the rate is p in each of the four 16-bit lanes
    # that one 64-bit draw provides.
    lanes = kept.flatten()[: 1000 * 1000 // 4 * 4].view(-1, 4).float().mean(0)
    assert torch.allclose(lanes, torch.full_like(lanes, 1 - p), atol=5e-3), lanes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fast_dropout_in_16_bit_floats_keeps_the_rate_and_the_mask(dtype):
    """The 16-bit numbers are compared in float32, which holds them exactly: compared in bf16 (8-bit mantissa)
    they round to multiples of 128 near the threshold, and p = 0.01 became a drop rate of 0.0088."""
    from ltgbert.modeling_ltgbert import LtgBertDropout

    x = torch.ones(1000, 1000, dtype=dtype, requires_grad=True)
    torch.manual_seed(0)
    y = LtgBertDropout(0.01).train()(x)
    assert y.dtype == dtype
    kept = y != 0
    assert abs(1 - kept.float().mean().item() - 0.01) < 5e-4  # 1e6 draws: the standard deviation is 1e-4
    assert torch.allclose(y[kept].float(), torch.full((int(kept.sum()),), 1 / 0.99), rtol=1e-2)
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, y.detach())  # the same mask and scale in the backward


def test_fast_dropout_follows_the_seed_and_the_mode():
    from ltgbert.modeling_ltgbert import LtgBertDropout

    dropout = LtgBertDropout(0.1).train()
    x = torch.randn(7, 33)  # a size that is not a multiple of 4
    torch.manual_seed(3)
    a = dropout(x)
    torch.manual_seed(3)
    assert torch.equal(dropout(x), a)
    assert not torch.equal(dropout(x), a)  # the generator moved on
    assert dropout(x.bfloat16()).dtype == torch.bfloat16
    assert torch.equal(dropout.eval()(x), x)
    assert torch.equal(LtgBertDropout(0.0).train()(x), x)
    assert torch.equal(LtgBertDropout(1.0).train()(x), torch.zeros_like(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_bias_gather_through_float32_is_bitwise_the_16_bit_gather(tiny_config, dtype):
    """position_bias gathers 16-bit tables in float32 on CPU (a faster ATen path): bias and table gradients
    must be bit for bit those of the plain 16-bit gather-and-add."""
    from bench_bias_gather import direct_position_bias  # the 16-bit gather as committed before

    from ltgbert.modeling_ltgbert import LtgBertAttention, log_bucket_indices

    attention = LtgBertAttention(tiny_config)
    batch, heads, seq, buckets = 2, tiny_config.num_attention_heads, 40, 2 * tiny_config.position_bucket_size - 1
    bucket_index = log_bucket_indices(seq, seq, tiny_config.position_bucket_size, tiny_config.max_position_embeddings)
    g = torch.Generator().manual_seed(0)
    tables = [torch.randn(batch, heads, seq, buckets, generator=g).to(dtype).requires_grad_() for _ in range(2)]
    grad = torch.randn(batch, heads, seq, seq, generator=g).to(dtype)
    bias = attention.position_bias(*tables, bucket_index)
    assert bias.dtype == dtype and bias.shape == (batch, heads, seq, seq)
    grads = torch.autograd.grad(bias, tables, grad)

    direct = direct_position_bias(attention, *tables, bucket_index)
    assert direct.dtype == dtype and torch.equal(bias, direct)
    for got, want in zip(grads, torch.autograd.grad(direct, tables, grad)):
        assert got.dtype == dtype and torch.equal(got, want)


def _eager_and_compiled(config, backend, checkpointing=None):
    """Loss and gradients of one seeded step of an eager model and of the same weights with its layers compiled
    by `backend` (compile_encoder_layers, what --torch_compile does); also the Dynamo graphs compiled."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = LtgBertForMaskedLM(config).train()
    compiled = LtgBertForMaskedLM(config).train()
    compiled.load_state_dict(eager.state_dict())
    graphs, compile_fn = [], torch._dynamo.lookup_backend(backend)

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return compile_fn(gm, example_inputs)

    assert compiled.compile_encoder_layers(backend=recording_backend) is compiled
    results = []
    for model in (eager, compiled):
        if checkpointing is not None:
            model.config.gradient_checkpointing_mode = checkpointing
            enable_activation_checkpointing(model, use_reentrant=False)  # what --gradient_checkpointing calls
        torch.manual_seed(3)
        results.append(_loss_and_grads(model, _batch()))
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # regional: no _orig_mod. prefixes
    return results, graphs


@pytest.mark.parametrize("checkpointing", [None, "selective", "full"])
def test_compiled_layers_draw_the_eager_dropout_masks(tiny_config, checkpointing):
    """The compiled layers' dropout draws its bits through the opaque ltgbert::dropout_bits op, and with one
    seed the compiled model's loss and gradients are the eager model's to float rounding (AOTAutograd, no code
    generation; GeGLU in its exp form, the broadcast position-table gradient summed in another order; one
    different mask would move them by far more), with and without gradient checkpointing, whose
    recomputation must redraw the same masks."""
    ((loss, grads), (loss_c, grads_c)), graphs = _eager_and_compiled(tiny_config, "aot_eager", checkpointing)
    # Full checkpointing runs inside the compiled layer (transformers' GradientCheckpointingLayer wraps forward):
    # the draws sit in the checkpointed body, a nested graph module.
    assert graphs and all(
        any("ltgbert.dropout_bits" in m.code for m in gm.modules() if isinstance(m, torch.fx.GraphModule))
        for gm in graphs
    )
    torch.testing.assert_close(loss_c, loss, rtol=1e-6, atol=0)
    assert grads.keys() == grads_c.keys()
    for name in grads:
        assert (grads_c[name] - grads[name]).abs().max() <= 1e-5 * grads[name].abs().max().item(), name


def test_inductor_compiled_layers_match_eager(tiny_config):
    """The same with inductor's generated CPU kernels (fused masks, norms, GeGLU): the same masks, so the loss
    and every gradient agree to float rounding; one compilation serves every layer."""
    ((loss, grads), (loss_c, grads_c)), graphs = _eager_and_compiled(tiny_config, "inductor")
    assert len(graphs) == 1 and tiny_config.num_hidden_layers > 1
    torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=1e-6)
    for name in grads:
        scale = grads[name].abs().max().item()
        assert (grads_c[name] - grads[name]).abs().max() <= 1e-4 * scale + 1e-7, name
