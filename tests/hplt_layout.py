"""Builders for tests: a checkpoint in the layout HPLT publishes LTG-BERT in, and a fake Hugging Face cache.

HPLT's encoder-only ``convert_to_hf.py`` copies a prototype directory (config.json with ``auto_map`` naming its
own ``configuration_ltgbert.py`` / ``modeling_ltgbert.py`` and no ``model_type``; tokenizer_config.json and
special_tokens_map.json with [BOS]/[EOS]) and adds the training model's state dict as ``pytorch_model.bin``
(published key names, the tied ``classifier.nonlinearity.5.weight`` and the ``position_indices`` buffers
included) and the training tokenizer.json. `write_hplt_checkpoint` writes that layout from one of our
models, so a test can compare whatever loads it against the model it came from. The remote-code files it
writes record that they ran and raise: nothing of ours may execute a checkpoint's code.

Use from a test:

    from hplt_layout import make_hplt_checkpoint, add_to_hub_cache, use_hub_cache
    path, source = make_hplt_checkpoint(tmp_path / "hplt")        # source: the LtgBertForMaskedLM (eval mode)
    assert not code_ran(path)
    use_hub_cache(monkeypatch, tmp_path / "hub"); add_to_hub_cache(tmp_path / "hub", "org/name", path)
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

HPLT_SPECIALS = ["[BOS]", "[EOS]"]
CODE_RAN_MARKER = "REMOTE_CODE_RAN"
_REMOTE_CODE = f'''"""Stands in for the checkpoint's own code: running it is a bug in whoever loaded this directory."""
import pathlib

pathlib.Path(__file__).with_name("{CODE_RAN_MARKER}").write_text(__name__)
raise RuntimeError("the checkpoint's own code was executed: " + __name__)
'''
# HPLT's prototype names its classes "Ltgbert..." (lower-case b) and maps every head.
_HPLT_AUTO_MAP = {
    "AutoConfig": "configuration_ltgbert.LtgbertConfig",
    "AutoModel": "modeling_ltgbert.LtgbertModel",
    "AutoModelForMaskedLM": "modeling_ltgbert.LtgbertForMaskedLM",
    "AutoModelForSequenceClassification": "modeling_ltgbert.LtgbertForSequenceClassification",
    "AutoModelForTokenClassification": "modeling_ltgbert.LtgbertForTokenClassification",
    "AutoModelForQuestionAnswering": "modeling_ltgbert.LtgbertForQuestionAnswering",
    "AutoModelForMultipleChoice": "modeling_ltgbert.LtgbertForMultipleChoice",
}
_CONFIG_FIELDS = (
    "attention_probs_dropout_prob",
    "hidden_dropout_prob",
    "hidden_size",
    "intermediate_size",
    "layer_norm_eps",
    "max_position_embeddings",
    "num_attention_heads",
    "num_hidden_layers",
    "position_bucket_size",
    "vocab_size",
)
_TIED_PUBLISHED_KEY = "classifier.nonlinearity.5.weight"
# The training code's module names: embedding, transformer, the MLM head "classifier" and a fine-tuned "head".
PUBLISHED_PREFIXES = ("embedding.", "transformer.", "classifier.nonlinearity.", "head.nonlinearity.")


def _inverse_key_mapping():
    """CHECKPOINT_KEY_MAPPING (checkpoint regex -> our name) turned around for the published names only (the
    table also renames older names of ours): (our regex, published template)."""
    from ltgbert.modeling_ltgbert import CHECKPOINT_KEY_MAPPING

    inverse = []
    for pattern, replacement in CHECKPOINT_KEY_MAPPING.items():
        template = pattern.removeprefix("^").removesuffix("$").replace(r"(\d+)", r"\1").replace("\\.", ".")
        if not template.startswith(PUBLISHED_PREFIXES):
            continue
        ours = "^" + re.escape(replacement).replace(re.escape(r"\1"), r"(\d+)") + ("$" if pattern.endswith("$") else "")
        inverse.append((ours, template))
    return inverse


def to_published_state_dict(model) -> dict[str, torch.Tensor]:
    """The state dict of our LtgBertForMaskedLM under the published names, as HPLT's pytorch_model.bin holds it."""
    from ltgbert.modeling_ltgbert import log_bucket_indices

    inverse = _inverse_key_mapping()
    tied = set(model._tied_weights_keys or {})
    published = {}
    for key, value in model.state_dict().items():
        for ours, template in inverse:
            if re.search(ours, key):
                published[re.sub(ours, template, key)] = value.clone()
                break
        else:
            assert key in tied, f"{key} has no published name in CHECKPOINT_KEY_MAPPING"
    # The reference keeps the tied projection as its own entry, and a position-index buffer in every layer.
    published[_TIED_PUBLISHED_KEY] = model.get_input_embeddings().weight.detach().clone()
    c = model.config
    indices = log_bucket_indices(
        c.max_position_embeddings, c.max_position_embeddings, c.position_bucket_size, c.max_position_embeddings
    )
    for i in range(c.num_hidden_layers):
        published[f"transformer.layers.{i}.attention.position_indices"] = indices.clone()
    return published


def hplt_tokenizer(tokenizer):
    """A copy of an LTG-BERT fast tokenizer with HPLT's extra [BOS]/[EOS] specials (new ids at the end)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.add_special_tokens(HPLT_SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="[BOS]",
        eos_token="[EOS]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        mask_token="[MASK]",
    )


def write_hplt_checkpoint(model, tokenizer, out_dir: str | Path) -> Path:
    """Write `model` (our LtgBertForMaskedLM) and `tokenizer` (see `hplt_tokenizer`) as HPLT publishes them."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    assert len(tokenizer) <= model.config.vocab_size, "the model's vocabulary must cover the tokenizer"
    torch.save(to_published_state_dict(model), out / "pytorch_model.bin")
    config = {"architectures": ["LtgbertForMaskedLM"], "auto_map": _HPLT_AUTO_MAP, "torch_dtype": "float32"}
    config.update({k: getattr(model.config, k) for k in _CONFIG_FIELDS})
    (out / "config.json").write_text(json.dumps(config, indent=4), encoding="utf-8")
    for name in ("configuration_ltgbert.py", "modeling_ltgbert.py", "__init__.py"):
        (out / name).write_text(_REMOTE_CODE, encoding="utf-8")
    (out / "tokenizer.json").write_text(tokenizer.backend_tokenizer.to_str(), encoding="utf-8")
    specials = {
        "bos_token": "[BOS]",
        "eos_token": "[EOS]",
        "unk_token": "[UNK]",
        "sep_token": "[SEP]",
        "pad_token": "[PAD]",
        "cls_token": "[CLS]",
        "mask_token": "[MASK]",
    }
    (out / "special_tokens_map.json").write_text(json.dumps(specials), encoding="utf-8")
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials}
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=4), encoding="utf-8")
    return out


def make_hplt_checkpoint(out_dir: str | Path, tokenizer=None, seed: int = 0, **config_overrides):
    """A random tiny LtgBertForMaskedLM written in the HPLT layout; returns (directory, the model in eval mode).

    `tokenizer` defaults to the test suite's word-list tokenizer; [BOS]/[EOS] are added to it. Every 1-D
    parameter (biases, affine norms) is drawn at random too, so a weight that fails to load shows in outputs.
    """
    from conftest import build_tokenizer

    from ltgbert import LtgBertConfig, LtgBertForMaskedLM

    tok = hplt_tokenizer(tokenizer or build_tokenizer())
    settings = dict(vocab_size=len(tok), max_position_embeddings=64, position_bucket_size=8)
    config = LtgBertConfig.from_preset("tiny", **{**settings, **config_overrides})
    torch.manual_seed(seed)
    model = LtgBertForMaskedLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(torch.randn_like(param) * 0.5)
    return write_hplt_checkpoint(model, tok, out_dir), model


def code_ran(checkpoint_dir: str | Path) -> bool:
    """Whether anything executed the checkpoint's own code files."""
    return (Path(checkpoint_dir) / CODE_RAN_MARKER).exists()


def add_to_hub_cache(cache_dir: str | Path, repo_id: str, source_dir: str | Path, revision: str = "0" * 40) -> Path:
    """Put `source_dir`'s files into a Hugging Face hub cache as model `repo_id` at `revision` (refs/main points
    there), the layout huggingface_hub reads offline; returns the snapshot directory."""
    repo = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    shutil.copytree(source_dir, snapshot, ignore=shutil.ignore_patterns(CODE_RAN_MARKER), dirs_exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision, encoding="utf-8")
    return snapshot


def use_hub_cache(monkeypatch, cache_dir: str | Path) -> Path:
    """Make this process (and the subprocesses it starts) read the hub cache at `cache_dir`, offline."""
    from huggingface_hub import constants

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache_dir))  # read once at import; tests change it later
    return cache_dir
