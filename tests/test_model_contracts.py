"""The contracts transformers' conventions promise, each checked on our classes: embedding resizing, gradient
checkpointing through transformers' layer flags, torch.export with a dynamic length, MaskedLMOutput's logits
shape, inputs_embeds, set_attn_implementation, save/load and Auto classes for every head, the heads' losses,
remote code without the package, and published (HPLT-layout) checkpoints giving the reference outputs."""

import inspect
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

import ltgbert
from ltgbert import (
    LtgBertConfig,
    LtgBertForMaskedLM,
    LtgBertForMultipleChoice,
    LtgBertForQuestionAnswering,
    LtgBertForSequenceClassification,
    LtgBertForTokenClassification,
    LtgBertModel,
)
from ltgbert.checkpointing import enable_activation_checkpointing
from ltgbert.modeling_ltgbert import AUTO_CLASSES, convert_state_dict, log_bucket_indices

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "ltgbert_reference_small.safetensors"
HEADS = [
    LtgBertModel,
    LtgBertForMaskedLM,
    LtgBertForSequenceClassification,
    LtgBertForTokenClassification,
    LtgBertForMultipleChoice,
    LtgBertForQuestionAnswering,
]
CHOICES = 3


def _no_dropout(config):
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    return config


def _inputs(vocab=64, batch=3, seq=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, seq), generator=g)
    ids[:, 0] = 1
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, seq - 5 :] = 0
    mask[2:, seq // 2 :] = 0
    ids[mask == 0] = 3
    return ids, mask


def _head_inputs(cls, ids, mask):
    """Inputs of one forward of `cls`: multiple choice takes [batch, choices, seq]."""
    if cls is LtgBertForMultipleChoice:
        return {"input_ids": ids[:, None].repeat(1, CHOICES, 1), "attention_mask": mask[:, None].repeat(1, CHOICES, 1)}
    return {"input_ids": ids, "attention_mask": mask}


def _main_output(out):
    return out.last_hidden_state if isinstance(out, transformers.modeling_outputs.BaseModelOutput) else out[0]


# ---------------------------------------------------------------- resize_token_embeddings


def test_resize_token_embeddings_resizes_the_mlm_output_bias(tiny_config, tmp_path):
    model = LtgBertForMaskedLM(_no_dropout(tiny_config)).eval()
    vocab = tiny_config.vocab_size
    with torch.no_grad():
        model.lm_head.decoder.bias.normal_()
    old_bias = model.lm_head.decoder.bias.detach().clone()
    ids, mask = _inputs()
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
    model.resize_token_embeddings(vocab + 10)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied
    assert model.lm_head.decoder.bias.shape == (vocab + 10,)
    assert torch.equal(model.lm_head.decoder.bias[:vocab], old_bias)
    labels = torch.where(mask.bool(), ids, -100)
    labels[0, 2] = vocab + 5  # a new token id is a valid label now
    with torch.no_grad():
        after = model(ids, attention_mask=mask, labels=labels)
    assert after.logits.shape == (3, 24, vocab + 10) and torch.isfinite(after.loss)
    torch.testing.assert_close(after.logits[..., :vocab], before)
    model.save_pretrained(tmp_path)
    loaded = LtgBertForMaskedLM.from_pretrained(tmp_path).eval()
    assert loaded.config.vocab_size == vocab + 10
    assert torch.equal(loaded.lm_head.decoder.bias, model.lm_head.decoder.bias)
    with torch.no_grad():  # equal weights; outputs to the rounding of other memory alignments
        torch.testing.assert_close(loaded(ids, attention_mask=mask).logits, after.logits, rtol=1e-6, atol=1e-6)


def test_checkpoint_with_the_earlier_bias_key_loads(tiny_config, tmp_path):
    """Our checkpoints before the bias moved into the decoder store it as `lm_head.bias`."""
    model = LtgBertForMaskedLM(tiny_config).eval()
    with torch.no_grad():
        model.lm_head.decoder.bias.normal_()
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.decoder.weight"}
    state["lm_head.bias"] = state.pop("lm_head.decoder.bias")
    tiny_config.save_pretrained(tmp_path)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = LtgBertForMaskedLM.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded.lm_head.decoder.bias, model.lm_head.decoder.bias)
    ids, mask = _inputs()
    with torch.no_grad():
        got, want = loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- gradient checkpointing


def _count_calls(model, selective=False):
    """Calls per layer of the attention module (recomputed by full checkpointing) or of its core, attend()
    (recomputed by selective checkpointing), recorded on the model's layers."""
    counts = [0] * len(model.ltgbert.encoder.layers)
    for i, layer in enumerate(model.ltgbert.encoder.layers):
        if selective:
            attend = layer.attention.attend

            def counting(*args, _i=i, _attend=attend, **kwargs):
                counts[_i] += 1
                return _attend(*args, **kwargs)

            layer.attention.attend = counting
        else:
            layer.attention.register_forward_hook(lambda *_, _i=i: counts.__setitem__(_i, counts[_i] + 1))
    return counts


def _loss_and_grads(model):
    ids, mask = _inputs()
    labels = torch.where(torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) < 0.3, ids, -100)
    labels[0, 1] = ids[0, 1]
    model.zero_grad()
    loss = model(ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_gradients(plain, checkpointed, use_reentrant):
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        # Non-reentrant recomputation is bitwise identical; reentrant accumulates the shared relative-embedding
        # gradient in another order (float32 rounding only).
        tolerance = 0.0 if not use_reentrant else 1e-6 * plain[name].abs().max().item()
        assert (checkpointed[name] - plain[name]).abs().max() <= tolerance, name


def test_layers_are_transformers_gradient_checkpointing_layers(tiny_config):
    from transformers.modeling_layers import GradientCheckpointingLayer

    model = LtgBertForMaskedLM(tiny_config)
    assert all(isinstance(layer, GradientCheckpointingLayer) for layer in model.ltgbert.encoder.layers)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_full_checkpointing_recomputes_every_layer_with_the_same_gradients(tiny_config, use_reentrant):
    torch.manual_seed(0)
    model = LtgBertForMaskedLM(_no_dropout(tiny_config))
    loss, plain = _loss_and_grads(model)
    counts = _count_calls(model)
    enable_activation_checkpointing(model, use_reentrant=use_reentrant)  # what --gradient_checkpointing calls
    assert model.ltgbert.encoder.gradient_checkpointing
    loss_ckpt, checkpointed = _loss_and_grads(model)
    assert counts == [2, 2]  # forward, then the recomputation in backward
    assert torch.equal(loss, loss_ckpt)
    _assert_same_gradients(plain, checkpointed, use_reentrant)
    model.eval()
    with torch.no_grad():
        model(*_inputs())
    assert counts == [3, 3]  # no recomputation outside training


def test_every_n_layers_of_gradient_checkpointing_enable_is_honoured(tiny_config):
    if "every_n_layers" not in inspect.signature(LtgBertForMaskedLM.activation_checkpointing_enable).parameters:
        pytest.skip("this transformers version has no every_n_layers")
    torch.manual_seed(0)
    model = LtgBertForMaskedLM(_no_dropout(tiny_config))
    _, plain = _loss_and_grads(model)
    counts = _count_calls(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False}, every_n_layers=2)
    _, checkpointed = _loss_and_grads(model)
    assert counts == [2, 1]  # only layer 0 is recomputed
    _assert_same_gradients(plain, checkpointed, use_reentrant=False)
    model.gradient_checkpointing_disable()
    _loss_and_grads(model)
    assert counts == [3, 2]


def test_selective_checkpointing_recomputes_only_the_attention_core(tiny_config):
    torch.manual_seed(0)
    model = LtgBertForMaskedLM(_no_dropout(tiny_config))
    _, plain = _loss_and_grads(model)
    model.config.gradient_checkpointing_mode = "selective"
    enable_activation_checkpointing(model)
    modules, cores = _count_calls(model), _count_calls(model, selective=True)
    _, checkpointed = _loss_and_grads(model)
    assert modules == [1, 1] and cores == [2, 2]  # the layer runs once, its attention core twice
    _assert_same_gradients(plain, checkpointed, use_reentrant=False)


# ---------------------------------------------------------------- torch.export


def test_torch_export_with_a_dynamic_sequence_length(tiny_config):
    model = LtgBertForMaskedLM(tiny_config).eval()
    ids, mask = _inputs(seq=16)
    seq = torch.export.Dim("seq", min=2, max=4 * tiny_config.max_position_embeddings)
    exported = torch.export.export(
        model,
        args=(),
        kwargs={"input_ids": ids, "attention_mask": mask},
        dynamic_shapes={"input_ids": {1: seq}, "attention_mask": {1: seq}},
    )
    assert not model.ltgbert.encoder._bucket_cache  # tracing cached no tensor of one length
    for length in (9, tiny_config.max_position_embeddings + 20):  # also past the longest bucketed distance
        ids, mask = _inputs(seq=length, seed=length)
        with torch.no_grad():
            got = exported.module()(input_ids=ids, attention_mask=mask).logits
            want = model(ids, attention_mask=mask).logits
        assert got.shape == want.shape == (3, length, tiny_config.vocab_size)
        assert (got - want)[mask.bool()].abs().max() < 1e-5


# ---------------------------------------------------------------- MaskedLMOutput


def test_masked_lm_with_labels_returns_logits_of_every_position(tiny_config):
    """MaskedLMOutput's contract by default; the pretraining fast path only behind labelled_logits_only."""
    model = LtgBertForMaskedLM(_no_dropout(tiny_config)).eval()
    ids, mask = _inputs()
    labels = torch.full_like(ids, -100)
    labels[0, 3], labels[1, 5], labels[2, 1], labels[2, 7] = 7, 9, 11, 13
    with torch.no_grad():
        full = model(ids, attention_mask=mask, labels=labels)
        fast = model(ids, attention_mask=mask, labels=labels, labelled_logits_only=True)
        plain = model(ids, attention_mask=mask).logits
    assert full.logits.shape == (3, 24, tiny_config.vocab_size)
    assert torch.equal(full.logits, plain)
    assert fast.logits.shape == (4, tiny_config.vocab_size)
    torch.testing.assert_close(fast.logits, full.logits[labels != -100])
    torch.testing.assert_close(fast.loss, full.loss)
    reference = F.cross_entropy(plain.view(-1, tiny_config.vocab_size), labels.view(-1), ignore_index=-100)
    torch.testing.assert_close(full.loss, reference)


def test_trainer_compute_metrics_gets_logits_of_every_position(tiny_config, tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = LtgBertForMaskedLM(tiny_config)
    ids, mask = _inputs(batch=4, seq=12)
    labels = torch.where(torch.arange(12) % 3 == 1, ids, -100)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": labels.tolist()})
    seen = {}

    def compute_metrics(prediction):
        seen["shape"] = prediction.predictions.shape
        valid = prediction.label_ids != -100
        return {"accuracy": float((prediction.predictions.argmax(-1)[valid] == prediction.label_ids[valid]).mean())}

    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_eval_batch_size=2, report_to=[], use_cpu=True, disable_tqdm=True
    )
    trainer = Trainer(model=model, args=args, eval_dataset=data, compute_metrics=compute_metrics)
    assert trainer.label_names == ["labels"]
    metrics = trainer.evaluate()
    assert seen["shape"] == (4, 12, tiny_config.vocab_size)
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and math.isfinite(metrics["eval_loss"])


# ---------------------------------------------------------------- inputs_embeds, attention implementations


@pytest.mark.parametrize("cls", HEADS, ids=lambda c: c.__name__)
def test_inputs_embeds_gives_the_input_ids_outputs(tiny_config, cls):
    tiny_config.num_labels = 3
    model = cls(_no_dropout(tiny_config)).eval()
    inputs = _head_inputs(cls, *_inputs())
    embeds = model.get_input_embeddings()(inputs["input_ids"])  # [..., seq, hidden]
    with torch.no_grad():
        from_ids = model(**inputs)
        from_embeds = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])
    assert torch.equal(_main_output(from_ids), _main_output(from_embeds))
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model(inputs["input_ids"], inputs_embeds=embeds)
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model(attention_mask=inputs["attention_mask"])


def test_set_attn_implementation_takes_effect(tiny_config, monkeypatch):
    if not hasattr(LtgBertModel, "set_attn_implementation"):
        pytest.skip("this transformers version has no set_attn_implementation")
    import torch.nn.attention.flex_attention as flex

    calls = {"sdpa": 0, "flex_attention": 0}

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(F, "scaled_dot_product_attention", counted("sdpa", F.scaled_dot_product_attention))
    monkeypatch.setattr(flex, "flex_attention", counted("flex_attention", flex.flex_attention))
    model = LtgBertModel(_no_dropout(tiny_config)).eval()
    ids, mask = _inputs()
    outputs = {}
    for implementation in ("eager", "sdpa", "flex_attention", "eager"):
        before = dict(calls)
        model.set_attn_implementation(implementation)
        assert model.config._attn_implementation == implementation
        with torch.no_grad():
            outputs[implementation] = model(ids, attention_mask=mask).last_hidden_state
        used = {name for name in calls if calls[name] > before[name]}
        assert used == ({implementation} - {"eager"}), implementation
    for implementation in ("sdpa", "flex_attention"):
        assert (outputs[implementation] - outputs["eager"])[mask.bool()].abs().max() < 1e-5


# ---------------------------------------------------------------- every head: save/load, Auto, outputs


@pytest.mark.parametrize("cls", HEADS, ids=lambda c: c.__name__)
def test_every_head_round_trips_resolves_and_returns_tuples(tiny_config, tmp_path, cls):
    tiny_config.num_labels = 3
    model = cls(tiny_config).eval()
    inputs = _head_inputs(cls, *_inputs())
    model.save_pretrained(tmp_path)
    auto = next(getattr(transformers, name) for name, c in AUTO_CLASSES.items() if c is cls)
    loaded = auto.from_pretrained(tmp_path).eval()
    assert type(loaded) is cls
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True, output_attentions=True)
        again = loaded(**inputs, output_hidden_states=True, output_attentions=True)
        as_tuple = model(**inputs, output_hidden_states=True, output_attentions=True, return_dict=False)
    loaded_state = loaded.state_dict()
    assert all(torch.equal(v, loaded_state[k]) for k, v in model.state_dict().items())  # bit for bit
    # Outputs to float rounding only: loaded tensors sit at other memory alignments, and CPU BLAS kernels (a
    # one-output classifier is a dot product) round by alignment.
    for a, b in zip(out.to_tuple(), again.to_tuple()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    rows = inputs["input_ids"].numel() // inputs["input_ids"].size(-1)  # multiple choice: batch * choices
    assert len(out.hidden_states) == tiny_config.num_hidden_layers + 1
    assert all(h.shape == (rows, 24, tiny_config.hidden_size) for h in out.hidden_states)
    assert len(out.attentions) == tiny_config.num_hidden_layers
    assert all(a.shape == (rows, tiny_config.num_attention_heads, 24, 24) for a in out.attentions)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(out.to_tuple())
    assert torch.equal(as_tuple[0], out.to_tuple()[0])
    saved = json.loads((tmp_path / "config.json").read_text())
    assert set(saved["auto_map"]) == {"AutoConfig", *AUTO_CLASSES}


def test_token_classification_loss_ignores_minus_100(tiny_config):
    tiny_config.num_labels = 5
    model = LtgBertForTokenClassification(_no_dropout(tiny_config)).eval()
    ids, mask = _inputs()
    labels = torch.randint(0, 5, ids.shape, generator=torch.Generator().manual_seed(2))
    labels[mask == 0] = -100
    labels[:, 0] = -100
    out = model(ids, attention_mask=mask, labels=labels)
    assert out.logits.shape == (3, 24, 5)
    valid = labels != -100
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits[valid], labels[valid]))


def test_multiple_choice_scores_each_choice(tiny_config):
    model = LtgBertForMultipleChoice(_no_dropout(tiny_config)).eval()
    ids, mask = _inputs()
    choices = torch.stack([ids, ids.roll(1, dims=1), ids.flip(1)], dim=1)  # [batch, choices, seq]
    labels = torch.tensor([0, 2, 1])
    with torch.no_grad():
        out = model(choices, attention_mask=mask[:, None].expand_as(choices), labels=labels)
        single = LtgBertForSequenceClassification(tiny_config).eval()
        single.ltgbert, single.classifier = model.ltgbert, model.classifier  # the same weights, one choice at a time
        per_choice = torch.stack([single(choices[:, c], attention_mask=mask).logits[:, 0] for c in range(3)], 1)
    assert out.logits.shape == (3, 3)
    torch.testing.assert_close(out.logits, per_choice)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))


def test_question_answering_loss_is_berts(tiny_config):
    model = LtgBertForQuestionAnswering(_no_dropout(tiny_config)).eval()
    ids, mask = _inputs()
    start, end = torch.tensor([3, 30, 1]), torch.tensor([[5], [2], [100]])  # out of range is ignored
    out = model(ids, attention_mask=mask, start_positions=start, end_positions=end)
    assert out.start_logits.shape == out.end_logits.shape == (3, 24)
    start_loss = F.cross_entropy(out.start_logits[[0, 2]], start[[0, 2]])
    end_loss = F.cross_entropy(out.end_logits[[0, 1]], end.view(-1)[[0, 1]])
    torch.testing.assert_close(out.loss, (start_loss + end_loss) / 2)


# ---------------------------------------------------------------- remote code, without the package

REMOTE_SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, sys

    sys.path[:0] = json.loads(sys.argv[2])
    assert importlib.util.find_spec("ltgbert") is None, "ltgbert is importable here"
    try:
        import ltgbert  # noqa: F401
    except ImportError:
        pass
    else:
        raise AssertionError("ltgbert imported")
    import torch
    import transformers

    path, ids = sys.argv[1], torch.tensor(json.loads(sys.argv[3]))
    config = json.load(open(path + "/config.json"))
    report = {}
    for auto_name in config["auto_map"]:
        if auto_name == "AutoConfig":
            continue
        model = getattr(transformers, auto_name).from_pretrained(path, trust_remote_code=True).eval()
        inputs = ids[:, None].repeat(1, 2, 1) if "MultipleChoice" in auto_name else ids
        with torch.no_grad():
            out = model(inputs)
        report[auto_name] = {"class": type(model).__name__, "module": type(model).__module__,
                             "first": out[0].tolist(), "shape": list(out[0].shape)}
    report["ltgbert_loaded"] = any(m.split(".")[0] == "ltgbert" for m in sys.modules)
    print(json.dumps(report))
    """
)


def test_saved_directory_loads_every_head_as_remote_code_without_the_package(tiny_config, tmp_path):
    model = LtgBertForMaskedLM(tiny_config).eval()
    model.save_pretrained(tmp_path / "model")
    ids, _ = _inputs(batch=2, seq=10)
    # The interpreter's library paths, not the checkout, the editable install's finder (a .pth file, skipped
    # by -S) or the current directory (-I): `import ltgbert` must fail in the child.
    root = Path(ltgbert.__file__).resolve().parents[1]
    paths = [
        p
        for p in sys.path
        if p and Path(p).is_dir() and not (Path(p) / "ltgbert").exists() and Path(p).resolve() != root
    ]
    result = subprocess.run(
        [
            sys.executable,
            "-I",
            "-S",
            "-c",
            REMOTE_SCRIPT,
            str(tmp_path / "model"),
            json.dumps(paths),
            json.dumps(ids.tolist()),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env={**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert not report.pop("ltgbert_loaded")
    assert {name: r["class"] for name, r in report.items()} == {n: c.__name__ for n, c in AUTO_CLASSES.items()}
    assert all(r["module"].startswith("transformers_modules") for r in report.values())
    with torch.no_grad():
        torch.testing.assert_close(torch.tensor(report["AutoModelForMaskedLM"]["first"]), model(ids).logits)
        hidden = model.ltgbert(ids).last_hidden_state
    torch.testing.assert_close(torch.tensor(report["AutoModel"]["first"]), hidden)
    assert report["AutoModelForTokenClassification"]["shape"] == [2, 10, 2]
    assert report["AutoModelForMultipleChoice"]["shape"] == [2, 2]
    assert report["AutoModelForQuestionAnswering"]["shape"] == [2, 10]


# ---------------------------------------------------------------- published checkpoints (HPLT layout)

# HPLT's prototype config.json: its own auto_map ("Ltgbert" classes), no model_type (convert_to_hf.py copies it).
_HPLT_AUTO_MAP = {
    "AutoConfig": "configuration_ltgbert.LtgbertConfig",
    "AutoModel": "modeling_ltgbert.LtgbertModel",
    "AutoModelForMaskedLM": "modeling_ltgbert.LtgbertForMaskedLM",
    "AutoModelForSequenceClassification": "modeling_ltgbert.LtgbertForSequenceClassification",
    "AutoModelForTokenClassification": "modeling_ltgbert.LtgbertForTokenClassification",
    "AutoModelForQuestionAnswering": "modeling_ltgbert.LtgbertForQuestionAnswering",
    "AutoModelForMultipleChoice": "modeling_ltgbert.LtgbertForMultipleChoice",
}
_FOREIGN_CODE = 'raise RuntimeError("the checkpoint\'s own code ran")\n'


def _write_hplt_directory(out: Path, head: dict | None = None, drop_word_embedding: bool = False):
    """The reference fixture as convert_to_hf.py writes a checkpoint: the training state dict (published names,
    the tied projection as its own entry, position_indices in every layer) as pytorch_model.bin."""
    out.mkdir()
    with safe_open(FIXTURE, "pt") as f:
        config = json.loads(f.metadata()["config"])
        weights = {k[len("weights.") :]: f.get_tensor(k) for k in f.keys() if k.startswith("weights.")}
        expected = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("weights.")}
    weights["classifier.nonlinearity.5.weight"] = weights["embedding.word_embedding.weight"]  # shared storage
    indices = log_bucket_indices(
        config["max_position_embeddings"],
        config["max_position_embeddings"],
        config["position_bucket_size"],
        config["max_position_embeddings"],
    )
    for i in range(config["num_hidden_layers"]):
        weights[f"transformer.layers.{i}.attention.position_indices"] = indices
    weights.update(head or {})
    if drop_word_embedding:
        del weights["embedding.word_embedding.weight"]
    torch.save(weights, out / "pytorch_model.bin")
    fields = {k: config[k] for k in config if k != "model_type"}
    published = {
        "architectures": ["LtgbertForMaskedLM"],
        "auto_map": _HPLT_AUTO_MAP,
        "torch_dtype": "float32",
        "attention_probs_dropout_prob": 0.1,
        "hidden_dropout_prob": 0.1,
        **fields,
    }
    (out / "config.json").write_text(json.dumps(published, indent=4))
    for name in ("configuration_ltgbert.py", "modeling_ltgbert.py"):
        (out / name).write_text(_FOREIGN_CODE)
    return config, expected


def test_key_table_maps_every_published_key_onto_ours():
    with safe_open(FIXTURE, "pt") as f:
        config = LtgBertConfig(**json.loads(f.metadata()["config"]))
        published = {k[len("weights.") :]: f.get_tensor(k) for k in f.keys() if k.startswith("weights.")}
    published["classifier.nonlinearity.5.weight"] = published["embedding.word_embedding.weight"]
    published["transformer.layers.0.attention.position_indices"] = torch.zeros(2, 2, dtype=torch.long)
    ours = set(LtgBertForMaskedLM(config).state_dict()) - set(LtgBertForMaskedLM._tied_weights_keys)
    assert set(convert_state_dict(published)) == ours
    assert convert_state_dict({k: published[k] for k in ours & set(published)}) == {}  # nothing to rename twice
    assert set(convert_state_dict({"head.nonlinearity.1.weight": 0, "head.nonlinearity.5.bias": 0})) == {
        "head_transform.dense.weight",
        "classifier.bias",
    }


@pytest.mark.parametrize("tied_names", ["both", "projection_only"])
def test_hplt_layout_checkpoint_gives_the_reference_outputs(tmp_path, tied_names):
    """convert_to_hf.py's layout keeps both names of the tied matrix; a save that dropped one of a shared pair
    may have kept only the projection's."""
    _, expected = _write_hplt_directory(tmp_path / "hplt", drop_word_embedding=tied_names == "projection_only")
    ids, mask = expected["input_ids"], expected["attention_mask"]
    real = mask.bool()
    mlm = LtgBertForMaskedLM.from_pretrained(tmp_path / "hplt").eval()
    clf = LtgBertForSequenceClassification.from_pretrained(tmp_path / "hplt", num_labels=2).eval()
    with torch.no_grad():
        logits = mlm(ids, attention_mask=mask).logits
        hidden = clf(ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    assert (logits - expected["expected.mlm_logits"])[real].abs().max() < 1e-4
    assert (hidden - expected["expected.last_hidden_state"])[real].abs().max() < 1e-4
    assert mlm.lm_head.decoder.weight is mlm.ltgbert.embeddings.word_embeddings.weight
    assert clf.config.classifier_head == "linear" and clf.classifier.out_features == 2


def test_hplt_fine_tuned_head_loads_with_its_outputs(tmp_path):
    """A checkpoint fine-tuned with HPLT's code carries `head.nonlinearity.{1,5}` (norm, dense, GELU, norm,
    dropout, linear): it loads as config.classifier_head = "mlp" and gives that head's outputs."""
    g = torch.Generator().manual_seed(0)
    hidden_size = 64
    head = {
        "head.nonlinearity.1.weight": torch.randn(hidden_size, hidden_size, generator=g) * 0.1,
        "head.nonlinearity.1.bias": torch.randn(hidden_size, generator=g) * 0.1,
        "head.nonlinearity.5.weight": torch.randn(2, hidden_size, generator=g) * 0.1,
        "head.nonlinearity.5.bias": torch.randn(2, generator=g) * 0.1,
    }
    config, expected = _write_hplt_directory(tmp_path / "hplt", head)
    ids, mask = expected["input_ids"], expected["attention_mask"]

    def published_head(x):  # HPLT's Classifier, written out
        eps = config.get("layer_norm_eps", 1e-7)  # the fixture's README: 1e-7
        x = F.layer_norm(x, (hidden_size,), eps=eps)
        x = F.gelu(F.linear(x, head["head.nonlinearity.1.weight"], head["head.nonlinearity.1.bias"]))
        x = F.layer_norm(x, (hidden_size,), eps=eps)
        return F.linear(x, head["head.nonlinearity.5.weight"], head["head.nonlinearity.5.bias"])

    reference_hidden = expected["expected.last_hidden_state"]
    clf = LtgBertForSequenceClassification.from_pretrained(tmp_path / "hplt", num_labels=2).eval()
    tagger = LtgBertForTokenClassification.from_pretrained(tmp_path / "hplt", num_labels=2).eval()
    assert clf.config.classifier_head == tagger.config.classifier_head == "mlp"
    with torch.no_grad():
        torch.testing.assert_close(
            clf(ids, attention_mask=mask).logits, published_head(reference_hidden[:, 0]), atol=1e-4, rtol=0
        )
        tags = tagger(ids, attention_mask=mask).logits
    real = mask.bool()
    assert (tags - published_head(reference_hidden))[real].abs().max() < 1e-4
