"""Published LTG-BERT checkpoints and Hub ids through ltgbert.loading: the HPLT layout (pytorch_model.bin in the
published key names, config.json without model_type but with auto_map, remote-code files, [BOS]/[EOS]) loads
into our classes with the outputs of the model it was written from, the checkpoint's code never runs, Hub ids
come from the cache offline, and every bad input is one line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hplt_layout import add_to_hub_cache, code_ran, make_hplt_checkpoint, use_hub_cache

from ltgbert import LtgBertConfig, LtgBertForMaskedLM, LtgBertForSequenceClassification, LtgBertModel
from ltgbert.errors import UserError
from ltgbert.loading import is_ltgbert_config_dict, load_config, load_model, load_tokenizer
from ltgbert.tokenization import save_tokenizer

TEXTS = ["the dog sees the cats near a teacher", "a girl runs"]


@pytest.fixture(scope="module")
def hplt(tmp_path_factory):
    path, source = make_hplt_checkpoint(tmp_path_factory.mktemp("hplt") / "checkpoint")
    return path, source


def batch(tokenizer):
    return tokenizer(TEXTS, padding=True, return_tensors="pt")


def assert_same_at_tokens(a, b, attention_mask):
    keep = attention_mask.bool()
    torch.testing.assert_close(a[keep], b[keep], atol=1e-5, rtol=1e-5)


def test_hplt_layout_loads_into_our_classes_with_the_source_outputs(hplt):
    path, source = hplt
    config = load_config(path)
    assert isinstance(config, LtgBertConfig) and config.model_type == "ltgbert"
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "position_bucket_size"):
        assert getattr(config, key) == getattr(source.config, key)
    assert getattr(config, "auto_map", None) is None  # the checkpoint's auto_map names code we never run

    tokenizer = load_tokenizer(path, config=config)
    assert (tokenizer.mask_token_id, tokenizer.pad_token_id, tokenizer.cls_token_id) == (4, 3, 1)
    assert tokenizer.bos_token == "[BOS]" and tokenizer.eos_token == "[EOS]"
    pair = tokenizer("the dog", "a cat")
    assert set(pair) == {"input_ids", "attention_mask"}  # token_type_ids dropped: no segment embeddings
    sep = tokenizer.sep_token_id
    assert pair["input_ids"][0] == tokenizer.cls_token_id and pair["input_ids"].count(sep) == 2
    assert pair["input_ids"][-1] == sep

    enc = batch(tokenizer)
    with torch.no_grad():
        expected_logits = source(**enc).logits
        expected_hidden = source.ltgbert(**enc).last_hidden_state
        mlm = load_model(LtgBertForMaskedLM, path, config=config).eval()
        assert_same_at_tokens(mlm(**enc).logits, expected_logits, enc["attention_mask"])
        encoder = load_model(LtgBertModel, path).eval()
        assert_same_at_tokens(encoder(**enc).last_hidden_state, expected_hidden, enc["attention_mask"])
        classifier = load_model(LtgBertForSequenceClassification, path, config=load_config(path, num_labels=3)).eval()
        assert classifier(**enc).logits.shape == (2, 3)
        assert_same_at_tokens(classifier.ltgbert(**enc).last_hidden_state, expected_hidden, enc["attention_mask"])
    assert not code_ran(path)


def test_hplt_checkpoint_saved_by_us_becomes_our_layout(hplt, tmp_path):
    """What export and fine-tuning write from a published checkpoint: our names, model_type, safetensors,
    a portable tokenizer; it loads back with the same outputs."""
    path, source = hplt
    model = load_model(LtgBertForMaskedLM, path).eval()
    out = tmp_path / "ours"
    model.save_pretrained(out)
    save_tokenizer(load_tokenizer(path), out)
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "ltgbert" and saved["auto_map"]["AutoModel"] == "modeling_ltgbert.LtgBertModel"
    assert (out / "model.safetensors").exists() and not (out / "pytorch_model.bin").exists()
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        assert all(k.startswith(("ltgbert.", "lm_head.")) for k in f.keys())
    tokenizer = load_tokenizer(out)
    assert tokenizer.bos_token == "[BOS]" and len(tokenizer) == len(load_tokenizer(path))
    enc = batch(tokenizer)
    with torch.no_grad():
        assert_same_at_tokens(
            load_model(LtgBertForMaskedLM, out).eval()(**enc).logits, source(**enc).logits, enc["attention_mask"]
        )


def test_hub_ids_load_from_the_cache_offline(hplt, tmp_path, monkeypatch):
    path, source = hplt
    cache = use_hub_cache(monkeypatch, tmp_path / "hub")
    snapshot = add_to_hub_cache(cache, "hplt-test/ltgbert-tiny", path)
    config = load_config("hplt-test/ltgbert-tiny", num_labels=2)
    assert config.hidden_size == source.config.hidden_size and config.num_labels == 2
    tokenizer = load_tokenizer("hplt-test/ltgbert-tiny")
    enc = batch(tokenizer)
    with torch.no_grad():
        logits = load_model(LtgBertForMaskedLM, "hplt-test/ltgbert-tiny").eval()(**enc).logits
        assert_same_at_tokens(logits, source(**enc).logits, enc["attention_mask"])
    assert not code_ran(snapshot)

    message = (
        "org/not-cached not found locally and not in the Hugging Face cache (offline); download it with "
        "`hf download org/not-cached` or pass a local directory"
    )
    for load in (load_config, load_tokenizer, lambda name: load_model(LtgBertForMaskedLM, name)):
        with pytest.raises(UserError) as error:
            load("org/not-cached")
        assert str(error.value) == message


@pytest.mark.parametrize(
    ("config_dict", "expected"),
    [
        ({"model_type": "ltgbert", "hidden_size": 64}, True),
        ({"auto_map": {"AutoConfig": "configuration_ltgbert.LtgbertConfig"}}, True),  # HPLT
        ({"architectures": ["LtgBertForMaskedLM"]}, True),  # ltg/ltg-bert-* style, no model_type
        ({"auto_map": {"AutoModel": "ltg/ltg-bert-babylm--modeling_ltgbert.LtgBertModel"}}, True),
        ({"model_type": "bert", "architectures": ["LtgBertForMaskedLM"]}, False),  # model_type decides
        ({"auto_map": {"AutoConfig": "configuration_nort5.NorT5Config"}, "architectures": ["NorT5Model"]}, False),
        ({"hidden_size": 64}, False),
    ],
)
def test_is_ltgbert_config_dict(config_dict, expected):
    assert is_ltgbert_config_dict(config_dict) is expected


def test_bad_inputs_are_one_line_errors(hplt, tmp_path, tiny_tokenizer):
    path, _ = hplt

    def error(load, *args, **kwargs) -> str:
        with pytest.raises(UserError) as e:
            load(*args, **kwargs)
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "model directory /nonexistent/model not found" in error(load_config, "/nonexistent/model")
    assert "is a file; pass the model directory" in error(load_tokenizer, path / "config.json")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "has no config.json" in error(load_config, empty)
    assert "has no tokenizer" in error(load_tokenizer, empty)

    def with_config(name, config_dict):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(config_dict if isinstance(config_dict, str) else json.dumps(config_dict))
        return d

    assert "is not an LTG-BERT checkpoint (model_type 'bert')" in error(
        load_config, with_config("bert", {"model_type": "bert", "hidden_size": 64})
    )
    assert "name no LTG-BERT code" in error(
        load_config, with_config("nort5", {"auto_map": {"AutoConfig": "configuration_nort5.NorT5Config"}})
    )
    assert "cannot read" in error(load_config, with_config("broken", '{"model_type": "ltgb'))
    # a bare config is taken only as an explicit file (--config_name), where the user says what it is
    bare = with_config("bare", {"hidden_size": 96, "num_attention_heads": 3, "num_hidden_layers": 2})
    assert "is not an LTG-BERT checkpoint" in error(load_config, bare)
    assert load_config(bare / "config.json").hidden_size == 96
    assert "must be divisible by num_attention_heads" in error(load_config, path, hidden_size=30)

    # weights: none, of another shape, without the encoder
    assert "cannot load LtgBertForMaskedLM weights" in error(
        load_model, LtgBertForMaskedLM, with_config("no-weights", {"model_type": "ltgbert"})
    )
    narrow = load_config(path, intermediate_size=64)
    assert "do not fit the config" in error(load_model, LtgBertForMaskedLM, path, config=narrow)
    partial = tmp_path / "partial"
    shutil.copytree(path, partial)
    state = torch.load(path / "pytorch_model.bin", weights_only=True)
    torch.save(
        {k: v for k, v in state.items() if not k.startswith("transformer.layers.1.")}, partial / "pytorch_model.bin"
    )
    assert "lacks" in error(load_model, LtgBertForMaskedLM, partial)
    assert "encoder weights" in error(load_model, LtgBertModel, partial)

    # tokenizers: tokenizer.json alone (its specials are found in the vocabulary), too large for the model,
    # without [MASK]
    bare_tokenizer = tmp_path / "tokenizer-json-only"
    bare_tokenizer.mkdir()
    shutil.copy(path / "tokenizer.json", bare_tokenizer)
    loaded = load_tokenizer(bare_tokenizer)
    assert (loaded.cls_token_id, loaded.sep_token_id, loaded.pad_token_id, loaded.mask_token_id) == (1, 2, 3, 4)
    small = load_config(path, vocab_size=10)
    assert f"has {len(load_tokenizer(path))} tokens but the model's vocab_size is 10" in error(
        load_tokenizer, path, config=small
    )
    no_mask = tmp_path / "no-mask"
    tiny_tokenizer.save_pretrained(no_mask)
    tokenizer_config = json.loads((no_mask / "tokenizer_config.json").read_text())
    tokenizer_config.pop("mask_token")
    (no_mask / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    tokenizer_json = json.loads((no_mask / "tokenizer.json").read_text())
    tokenizer_json["model"]["vocab"]["[NOMASK]"] = tokenizer_json["model"]["vocab"].pop("[MASK]")
    tokenizer_json["added_tokens"] = [t for t in tokenizer_json["added_tokens"] if t["content"] != "[MASK]"]
    (no_mask / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    assert "has no mask token ([MASK])" in error(load_tokenizer, no_mask)
