"""The model package: reference parity, heads, losses, attention paths, checkpointing, HF integration."""

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
)

from ltgbert import LtgBertConfig, LtgBertForMaskedLM, LtgBertForSequenceClassification, LtgBertModel
from ltgbert.modeling_ltgbert import log_bucket_indices

# Outputs of the original LTG-BERT code on random weights (tests/fixtures/README.md says how it was made).
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "ltgbert_reference_small.safetensors"


def _no_dropout(config):
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    return config


def _inputs(vocab=64, batch=3, seq=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, seq), generator=g)
    ids[:, 0] = 1
    mask = torch.ones(batch, seq, dtype=torch.long)
    if batch > 2:
        mask[1, seq - 5 :] = 0
        mask[2, seq // 2 :] = 0
    ids[mask == 0] = 3
    return ids, mask


# ---------------------------------------------------------------- reference parity


@pytest.fixture(scope="module")
def published_dir(tmp_path_factory):
    """A directory in the published LTG-BERT layout, built from the reference fixture."""
    out = tmp_path_factory.mktemp("published")
    with safe_open(FIXTURE, "pt") as f:
        LtgBertConfig(**json.loads(f.metadata()["config"])).save_pretrained(out)
        weights = {k[len("weights.") :]: f.get_tensor(k).contiguous() for k in f.keys() if k.startswith("weights.")}
        expected = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("weights.")}
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out, expected


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_published_checkpoint_matches_reference(published_dir, implementation):
    path, expected = published_dir
    model = LtgBertForMaskedLM.from_pretrained(path, attn_implementation=implementation).eval()
    ids, mask = expected["input_ids"], expected["attention_mask"]
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_hidden_states=True)
    real = mask.bool()
    hidden_err = (out.hidden_states[-1] - expected["expected.last_hidden_state"])[real].abs().max()
    logits_err = (out.logits - expected["expected.mlm_logits"])[real].abs().max()
    assert hidden_err < 1e-4 and logits_err < 1e-4
    # The published MLM head is tied to the word embeddings, and stays tied after loading.
    assert model.lm_head.decoder.weight.data_ptr() == model.ltgbert.embeddings.word_embeddings.weight.data_ptr()


def test_published_checkpoint_resaves_with_our_names(published_dir, tmp_path):
    path, expected = published_dir
    model = LtgBertForMaskedLM.from_pretrained(path).eval()
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "ltgbert.embeddings.relative_embeddings" in keys and not any(k.startswith("transformer.") for k in keys)
    again = LtgBertForMaskedLM.from_pretrained(tmp_path).eval()
    ids, mask = expected["input_ids"], expected["attention_mask"]
    with torch.no_grad():
        assert torch.equal(again(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)


def test_classifier_from_mlm_checkpoint_keeps_encoder_and_adds_head(published_dir):
    path, expected = published_dir
    mlm = LtgBertForMaskedLM.from_pretrained(path)
    clf = LtgBertForSequenceClassification.from_pretrained(path, num_labels=3)
    assert clf.classifier.out_features == 3 and clf.config.num_labels == 3
    for (name, a), (_, b) in zip(mlm.ltgbert.state_dict().items(), clf.ltgbert.state_dict().items()):
        assert torch.equal(a, b), name
    assert not hasattr(clf, "lm_head")


def test_log_buckets_match_the_written_rule():
    bucket, max_pos = 8, 64
    index = log_bucket_indices(40, 40, bucket, max_pos)
    mid = bucket // 2
    for q in range(40):
        for k in range(40):
            r = q - k
            if abs(r) <= mid:
                b = r
            else:
                a = min(abs(r), max_pos - 1)
                log_bucket = mid + math.ceil(math.log(a / mid) / math.log((max_pos - 1) / mid) * (mid - 1))
                b = int(math.copysign(log_bucket, r))
            assert index[q, k] == b + bucket - 1
    assert index.min() >= 0 and index.max() <= 2 * bucket - 2


# ---------------------------------------------------------------- attention paths


def test_attention_paths_agree(tiny_config):
    model = LtgBertModel(_no_dropout(tiny_config)).eval()
    ids, mask = _inputs()
    real = mask.bool()
    outputs = {}
    for implementation in ("eager", "sdpa", "flex_attention"):
        model.config._attn_implementation = implementation
        with torch.no_grad():
            outputs[implementation] = model(ids, attention_mask=mask).last_hidden_state
    for implementation in ("sdpa", "flex_attention"):
        assert (outputs[implementation] - outputs["eager"])[real].abs().max() < 1e-5, implementation


def test_sdpa_gradients_match_eager(tiny_config):
    model = LtgBertModel(_no_dropout(tiny_config))
    ids, mask = _inputs()
    grads = {}
    for implementation in ("eager", "sdpa"):
        model.zero_grad()
        model.config._attn_implementation = implementation
        out = model(ids, attention_mask=mask).last_hidden_state
        (out * mask[..., None]).pow(2).sum().backward()
        grads[implementation] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, g in grads["eager"].items():  # float32 sums in another order: relative agreement
        assert (grads["sdpa"][name] - g).abs().max() <= 1e-5 * g.abs().max(), name


def test_outputs_attentions_and_hidden_states(tiny_config):
    model = LtgBertModel(tiny_config).eval()
    ids, mask = _inputs()
    out = model(ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
    assert len(out.hidden_states) == tiny_config.num_hidden_layers + 1
    assert len(out.attentions) == tiny_config.num_hidden_layers
    assert out.attentions[0].shape == (3, tiny_config.num_attention_heads, 24, 24)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(3, 4, 24))
    assert out.attentions[0][1, :, :, -5:].abs().max() < 1e-6  # padding keys get no attention


def test_sequence_longer_than_max_positions(tiny_config):
    model = LtgBertModel(tiny_config).eval()
    ids = torch.randint(5, 64, (1, tiny_config.max_position_embeddings + 10))
    assert model(ids).last_hidden_state.shape == (1, ids.size(1), tiny_config.hidden_size)


# ---------------------------------------------------------------- heads and losses


def test_masked_lm_labelled_logits_only_projects_labelled_positions(tiny_config):
    """The pretraining fast path: logits only where labels != -100, the loss of the full projection."""
    model = LtgBertForMaskedLM(_no_dropout(tiny_config)).eval()
    ids, mask = _inputs()
    labels = torch.full_like(ids, -100)
    labels[0, 3], labels[1, 5], labels[2, 1] = 7, 9, 11
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        out = model(ids, attention_mask=mask, labels=labels, labelled_logits_only=True)
    selected = labels != -100
    assert full.shape == (3, 24, 64) and out.logits.shape == (3, 64)
    torch.testing.assert_close(out.logits, full[selected])
    torch.testing.assert_close(out.loss, F.cross_entropy(full.view(-1, 64), labels.view(-1), ignore_index=-100))


def test_word_embeddings_tied_and_survive_save_load(tiny_config, tmp_path):
    model = LtgBertForMaskedLM(tiny_config)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    with torch.no_grad():
        model.get_input_embeddings().weight.add_(1.0)
    model.save_pretrained(tmp_path)
    loaded = LtgBertForMaskedLM.from_pretrained(tmp_path)
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    assert torch.equal(loaded.get_output_embeddings().weight, model.get_output_embeddings().weight)


@pytest.mark.parametrize(
    "num_labels, labels, problem_type, reference",
    [
        (1, torch.tensor([0.5, -1.0, 2.0]), "regression", lambda lg, lb: F.mse_loss(lg.squeeze(-1), lb)),
        (1, torch.tensor([[0.5], [-1.0], [2.0]]), "regression", lambda lg, lb: F.mse_loss(lg, lb)),
        (2, torch.tensor([0, 1, 1]), "single_label_classification", lambda lg, lb: F.cross_entropy(lg, lb)),
        (3, torch.tensor([2, -100, 0]), "single_label_classification", lambda lg, lb: F.cross_entropy(lg, lb)),
        (
            3,
            torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]]),
            "multi_label_classification",
            lambda lg, lb: F.binary_cross_entropy_with_logits(lg, lb),
        ),
    ],
)
def test_classification_losses_equal_torch(tiny_config, num_labels, labels, problem_type, reference):
    tiny_config.num_labels = num_labels
    model = LtgBertForSequenceClassification(_no_dropout(tiny_config)).eval()
    ids, mask = _inputs()
    out = model(ids, attention_mask=mask, labels=labels)
    assert model.config.problem_type == problem_type
    assert out.logits.shape == (3, num_labels)
    torch.testing.assert_close(out.loss, reference(out.logits, labels))


def test_regression_with_batch_size_one(tiny_config):
    tiny_config.num_labels = 1
    model = LtgBertForSequenceClassification(tiny_config).eval()
    ids, mask = _inputs(batch=1)
    out = model(ids, attention_mask=mask, labels=torch.tensor([0.3]))
    torch.testing.assert_close(out.loss, F.mse_loss(out.logits.view(()), torch.tensor(0.3)))


def test_explicit_problem_type_wins(tiny_config):
    tiny_config.num_labels, tiny_config.problem_type = 2, "multi_label_classification"
    model = LtgBertForSequenceClassification(tiny_config).eval()
    ids, mask = _inputs()
    labels = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    out = model(ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.loss, F.binary_cross_entropy_with_logits(out.logits, labels))


# ---------------------------------------------------------------- config, init, checkpointing


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(hidden_size=64, num_attention_heads=3), "divisible"),
        (dict(position_bucket_size=7), "position_bucket_size"),
        (dict(position_bucket_size=2), "position_bucket_size"),
        (dict(max_position_embeddings=8, position_bucket_size=32), "max_position_embeddings"),
        (dict(hidden_dropout_prob=1.5), "hidden_dropout_prob"),
    ],
)
def test_invalid_config_is_rejected(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        LtgBertConfig(**kwargs)


def test_presets_match_published_shapes():
    for name, (hidden, layers, heads, inter) in {
        "xs": (192, 12, 3, 512),
        "small": (384, 12, 6, 1024),
        "base": (768, 12, 12, 2048),
    }.items():
        c = LtgBertConfig.from_preset(name)
        assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (
            hidden,
            layers,
            heads,
            inter,
        )
        assert c.vocab_size == 16384 and c.position_bucket_size == 32 and c.layer_norm_eps == 1e-7
    with pytest.raises(ValueError, match="unknown LTG-BERT size preset"):
        LtgBertConfig.from_preset("huge")


def test_initialisation_follows_reference_scheme():
    config = LtgBertConfig(
        vocab_size=500, hidden_size=256, num_attention_heads=4, intermediate_size=512, num_hidden_layers=3
    )
    model = LtgBertForMaskedLM(config)
    std = math.sqrt(2.0 / (5.0 * config.hidden_size))
    qk = model.ltgbert.encoder.layers[0].attention.qk_proj
    assert abs(qk.weight.std().item() - std * 0.8796) < 0.05 * std  # truncation at 2 std shrinks std by 0.8796
    assert qk.weight.abs().max() <= 2 * std + 1e-6 and qk.bias.abs().max() == 0
    for i, layer in enumerate(model.ltgbert.encoder.layers):
        expected = std * 0.8796 * math.sqrt(1.0 / (2.0 * (i + 1)))
        assert abs(layer.feed_forward.up_proj.weight.std().item() - expected) < 0.05 * expected
    assert model.lm_head.decoder.bias.abs().max() == 0  # the MLM output bias


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_gives_identical_gradients(tiny_config, use_reentrant):
    torch.manual_seed(0)
    model = LtgBertForMaskedLM(_no_dropout(tiny_config))
    ids, mask = _inputs()
    labels = torch.where(torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) < 0.3, ids, -100)
    labels[0, 1] = ids[0, 1]

    def grads():
        model.zero_grad()
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert model.ltgbert.encoder.gradient_checkpointing
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        # Non-reentrant recomputation is bitwise identical; the reentrant variant accumulates the shared
        # relative-embedding gradient in another order (float32 rounding only).
        tolerance = 0.0 if not use_reentrant else 1e-6 * plain[name].abs().max().item()
        assert (checkpointed[name] - plain[name]).abs().max() <= tolerance, name


def test_save_load_round_trip_and_auto_classes(tiny_config, tmp_path):
    tiny_config.num_labels = 4
    model = LtgBertForSequenceClassification(tiny_config).eval()
    model.save_pretrained(tmp_path)
    ids, mask = _inputs()
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, LtgBertConfig)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, LtgBertForSequenceClassification)
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)
    assert isinstance(AutoModel.from_config(tiny_config), LtgBertModel)
    assert isinstance(AutoModelForMaskedLM.from_config(tiny_config), LtgBertForMaskedLM)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "ltgbert"
    assert {"AutoConfig", "AutoModel", "AutoModelForMaskedLM", "AutoModelForSequenceClassification"} <= set(
        saved["auto_map"]
    )
    assert (tmp_path / "modeling_ltgbert.py").exists() and (tmp_path / "configuration_ltgbert.py").exists()


REMOTE_CODE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class BlockLtgbert(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "ltgbert" or name.startswith("ltgbert."):
                raise ImportError("ltgbert is not installed here")

    sys.meta_path.insert(0, BlockLtgbert())
    import torch
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, pipeline

    path = sys.argv[1]
    model = AutoModelForMaskedLM.from_pretrained(path, trust_remote_code=True).eval()
    ids = torch.tensor(json.loads(sys.argv[2]))
    with torch.no_grad():
        logits = model(ids).logits
    fill = pipeline("fill-mask", model=path, trust_remote_code=True)
    preds = fill("the dog [MASK] the cat .")
    clf = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True, num_labels=2)
    print(json.dumps({
        "module": type(model).__module__, "logits": logits.tolist(), "n_preds": len(preds),
        "token": preds[0]["token_str"], "clf": type(clf).__name__,
        "ltgbert_loaded": any(m == "ltgbert" or m.startswith("ltgbert.") for m in sys.modules),
    }))
    """
)


def test_remote_code_loads_without_the_package(tiny_config, tiny_tokenizer, tmp_path):
    tiny_config.vocab_size = len(tiny_tokenizer)
    model = LtgBertForMaskedLM(tiny_config).eval()
    model.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    ids = tiny_tokenizer("the dog sees the cats .", return_tensors="pt")["input_ids"]
    script = tmp_path / "remote.py"
    script.write_text(REMOTE_CODE_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path), json.dumps(ids.tolist())],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["module"].startswith("transformers_modules") and not report["ltgbert_loaded"]
    assert report["clf"] == "LtgBertForSequenceClassification" and report["n_preds"] == 5
    with torch.no_grad():
        torch.testing.assert_close(torch.tensor(report["logits"]), model(ids).logits)


def test_trainer_fine_tunes_classifier(tiny_config, tiny_tokenizer, tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    tiny_config.vocab_size, tiny_config.num_labels = len(tiny_tokenizer), 2
    model = LtgBertForSequenceClassification(tiny_config)
    texts = ["the dog runs .", "the dogs run .", "the dog run .", "the dogs runs ."] * 8
    labels = [1, 1, 0, 0] * 8
    data = (
        Dataset.from_dict({"text": texts, "label": labels})
        .map(lambda b: tiny_tokenizer(b["text"], padding="max_length", max_length=12), batched=True)
        .remove_columns("text")
    )
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=6,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = Trainer(model=model, args=args, train_dataset=data).train()
    assert result.global_step == 6 and math.isfinite(result.training_loss)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
