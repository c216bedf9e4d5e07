"""Where a model comes from: one place that turns ``--model_name_or_path`` into a config, a model and a tokenizer.

Every entry point (pretraining with ``--model_name_or_path``, fine-tuning, evaluation, export) loads through
these functions instead of calling ``AutoConfig`` / ``AutoModel*`` / ``AutoTokenizer`` itself:

    load_config(name_or_path, **overrides) -> LtgBertConfig
    load_model(model_class, name_or_path, config=None, **from_pretrained_kwargs) -> model
    load_tokenizer(name_or_path, config=None) -> PreTrainedTokenizerFast
    is_ltgbert_config_dict(config_dict) -> bool

``name_or_path`` is a local directory or a Hugging Face Hub model id ("org/name"). An id resolves through the
Hub's cache (``huggingface_hub``, as transformers does), so with ``HF_HUB_OFFLINE=1`` it is read from the
cache alone; one that is neither a directory nor cached gets a one-line error saying how to fetch it.

Why not the Auto classes: published LTG-BERT / HPLT checkpoints have a config.json without ``model_type``
whose ``auto_map`` names the checkpoint's own ``modeling_ltgbert.py``, so ``AutoConfig`` refuses them unless
that code is allowed to run (``trust_remote_code``). Here the JSON is read and an ``LtgBertConfig`` built from
it; the checkpoint's code never runs: our classes are used, and the model file renames the published weight
names. Every failure (missing directory, not an LTG-BERT config, unreadable weights, weights of another shape,
a tokenizer without [MASK] or [PAD]) is a ``UserError`` with one line naming the problem and the fix.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ltgbert.configuration_ltgbert import LtgBertConfig
from ltgbert.errors import UserError

CONFIG_NAME = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# LTG-BERT code as auto_map / architectures name it: "modeling_ltgbert.LtgbertModel" (HPLT), "LtgBertForMaskedLM"
_LTGBERT_NAME = re.compile(r"^((modeling|configuration)_ltgbert\.|ltg_?bert)", re.IGNORECASE)
# Fields of a published config.json that point at its own code; our save_pretrained writes its own auto_map.
_FOREIGN_CONFIG_KEYS = ("auto_map", "model_type")
_CODE_KEYS = ("model_type", "auto_map", "architectures")  # what says which code a config belongs to


def is_ltgbert_config_dict(config_dict: dict) -> bool:
    """True for our config.json (model_type "ltgbert") and for a published LTG-BERT one (no model_type; an
    ``auto_map`` naming an LTG-BERT modeling/configuration file or class, or ``architectures`` LtgBert*)."""
    model_type = config_dict.get("model_type")
    if model_type:
        return re.sub(r"[-_]", "", str(model_type).lower()) == LtgBertConfig.model_type
    auto_map = config_dict.get("auto_map") or {}
    names = []
    for value in auto_map.values() if isinstance(auto_map, dict) else auto_map:
        names.extend(value if isinstance(value, (list, tuple)) else [value])
    names.extend(config_dict.get("architectures") or [])
    # "org/repo--modeling_ltgbert.X" (code in another repository) names the same file
    return any(isinstance(n, str) and _LTGBERT_NAME.match(n.split("--")[-1]) for n in names)


def load_config(name_or_path: str | Path, **overrides) -> LtgBertConfig:
    """The ``LtgBertConfig`` of a model directory or Hub id; ``overrides`` replace fields (num_labels=3, ...).

    ``name_or_path`` may also be a config JSON file (``--config_name configs/small.json``); such a file may be a
    bare training config (LTG-BERT field names, no model_type, auto_map or architectures), as the published
    training code's configs are. Reads the JSON itself and never runs code from the checkpoint. ``num_labels``
    without ``id2label`` drops the saved label names (a new label set).
    """
    as_file = Path(name_or_path).expanduser().is_file()
    path = str(Path(name_or_path).expanduser()) if as_file else _resolve(name_or_path, CONFIG_NAME)
    if path is None:
        raise UserError(
            f"{name_or_path} has no config.json; pass a saved model directory (config.json, weights, "
            "tokenizer) or a Hub model id"
        )
    try:
        config_dict = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(
            f"cannot read {path} ({type(e).__name__}: {_first_line(e)}); the checkpoint is damaged, "
            "save or download it again"
        ) from None
    bare = as_file and isinstance(config_dict, dict) and not any(map(config_dict.get, _CODE_KEYS))
    if not isinstance(config_dict, dict) or not (bare or is_ltgbert_config_dict(config_dict)):
        raise UserError(
            f"{name_or_path} is not an LTG-BERT checkpoint ({_describe(config_dict)}); pass a directory "
            "or Hub id of an LTG-BERT model"
        )
    config_dict = {k: v for k, v in config_dict.items() if k not in _FOREIGN_CONFIG_KEYS}
    if "num_labels" in overrides and "id2label" not in overrides:
        config_dict.pop("id2label", None)
        config_dict.pop("label2id", None)
    try:
        return LtgBertConfig.from_dict({**config_dict, **overrides})
    except (ValueError, TypeError) as e:
        raise UserError(f"config of {name_or_path}: {_first_line(e)}") from None


def load_model(model_class, name_or_path: str | Path, config: LtgBertConfig | None = None, **kwargs):
    """``model_class.from_pretrained(name_or_path, config=...)`` with every failure as one line.

    ``model_class`` is one of ours (``LtgBertForMaskedLM``, ``LtgBertModel``, ``LtgBertForSequenceClassification``,
    ...): published checkpoints are renamed by it, and their code never runs. ``config`` defaults to the
    checkpoint's own; pass ``load_config(name_or_path, num_labels=...)`` to change fields.
    ``kwargs`` go to ``from_pretrained`` (``dtype``, ``ignore_mismatched_sizes``, ...).

    transformers only logs weights it could not load and initialises them at random; here a checkpoint that
    lacks encoder weights, or whose weights have other shapes than the config, is refused. Missing head weights
    are expected (a classifier from a pretrained encoder), and ``ignore_mismatched_sizes=True`` lets a head of
    another size be replaced (another label count), never the encoder.
    """
    if config is None:
        # Checked here for the one-line errors; the model class then reads the same config.json itself, which
        # lets it fit the config to the weights (a published fine-tuned classifier head) as it does unasked.
        load_config(name_or_path)
    else:
        _resolve(name_or_path, CONFIG_NAME)  # the same one-line error for a missing directory or id
        kwargs["config"] = config
    ignore_mismatched = kwargs.pop("ignore_mismatched_sizes", False)
    try:
        # mismatches are collected, not raised: transformers' own error points at a report it only logs
        model, info = model_class.from_pretrained(
            str(name_or_path), output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
        )
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise UserError(
            f"cannot load {model_class.__name__} weights from {name_or_path}: {_first_line(e)}; "
            "pass a complete LTG-BERT checkpoint"
        ) from None
    missing = sorted(k for k in info.get("missing_keys", ()) if _is_encoder_key(model, k))
    if missing:
        raise UserError(
            f"{name_or_path} lacks {len(missing)} encoder weights (e.g. {missing[0]}); it is not a "
            "complete LTG-BERT checkpoint, pass another one"
        )
    mismatched = sorted(
        m
        for m in info.get("mismatched_keys", ())  # (key, checkpoint shape, model shape)
        if not ignore_mismatched or _is_encoder_key(model, m[0])
    )
    if mismatched:
        key, in_checkpoint, in_model = mismatched[0]
        raise UserError(
            f"the weights in {name_or_path} do not fit the config ({len(mismatched)} tensors, e.g. {key}: "
            f"{list(in_checkpoint)} in the checkpoint, {list(in_model)} in the model); load it with its "
            "own config.json"
        )
    return model


def load_tokenizer(name_or_path: str | Path, config: LtgBertConfig | None = None):
    """The fast tokenizer of a model directory, tokenizer directory or Hub id, without remote code.

    The LTG-BERT special tokens are filled in from the vocabulary where the tokenizer config does not name
    them, [MASK] and [PAD] are required, and ``model_input_names`` leaves out token_type_ids (no segment
    embeddings; published tokenizers list them). With ``config``, a tokenizer larger than the model's
    vocabulary is refused.
    """
    from transformers import AutoTokenizer

    if not any(_resolve(name_or_path, name) for name in TOKENIZER_FILES):
        raise UserError(
            f"{name_or_path} has no tokenizer (tokenizer.json); pass the directory of the tokenizer the "
            "model was trained with (--tokenizer_name)"
        )
    try:
        # A config object keeps AutoTokenizer from reading config.json with AutoConfig, which would want to run a
        # published checkpoint's code (or ask whether it may).
        tokenizer = AutoTokenizer.from_pretrained(
            str(name_or_path), config=config or LtgBertConfig(), trust_remote_code=False
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(
            f"cannot load the tokenizer of {name_or_path}: {_first_line(e)}; pass a directory with "
            "tokenizer.json (--tokenizer_name)"
        ) from None
    _fill_special_tokens(tokenizer)
    for role in ("mask", "pad"):
        if getattr(tokenizer, f"{role}_token_id") is None:
            raise UserError(
                f"the tokenizer of {name_or_path} has no {role} token ([{role.upper()}]); it is not a "
                "masked-LM tokenizer, pass the one the model was trained with (--tokenizer_name)"
            )
    tokenizer.model_input_names = [n for n in tokenizer.model_input_names if n != "token_type_ids"]
    if config is not None:
        check_tokenizer_fits(tokenizer, config.vocab_size)
    return tokenizer


def check_tokenizer_fits(tokenizer, vocab_size: int, special_token_ids: dict[str, int] | None = None) -> None:
    """Raise UserError if the tokenizer produces ids >= the model's vocab_size, or (when given as
    e.g. {"pad_token_id": 3, ...}) if its special-token ids differ from the model config's."""
    n = len(tokenizer)
    if n > vocab_size:
        raise UserError(
            f"the tokenizer has {n} tokens but the model's vocab_size is {vocab_size}; use the tokenizer the model was "
            f"trained with (--tokenizer_name), or train one with --vocab_size {vocab_size} or less"
        )
    for name, expected in (special_token_ids or {}).items():
        actual = getattr(tokenizer, name, None)
        if actual is not None and expected is not None and actual != expected:
            raise UserError(
                f"tokenizer {name} is {actual} but the model config says {expected}; use the tokenizer the model "
                f"was trained with, or train one with launch/train_tokenizer.py "
                f"(ids [UNK]=0 [CLS]=1 [SEP]=2 [PAD]=3 [MASK]=4)"
            )


# ----------------------------------------------------------------------------- helpers


def _resolve(name_or_path: str | Path, filename: str) -> str | None:
    """Path of ``filename`` in a local directory or a Hub model (the cache when offline); None when that model
    lacks the file; a UserError when there is no such directory or model."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    from transformers.utils import cached_file

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path / filename) if (path / filename).is_file() else None
    if path.exists():
        raise UserError(f"{name_or_path} is a file; pass the model directory that holds it")
    name = str(name_or_path)
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise UserError(f"model directory {name} not found; pass an existing directory or a Hub model id") from None
    try:
        resolved = cached_file(
            name, filename, _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False
        )
    except OSError as e:  # online and the Hub says no such model (or refuses access)
        raise UserError(
            f"{name} not found locally nor on the Hugging Face Hub ({_first_line(e)}); pass a local "
            "directory or an existing model id"
        ) from None
    if resolved is None and not _in_hub_cache(name):
        offline = " (offline)" if _offline() else ""
        raise UserError(
            f"{name} not found locally and not in the Hugging Face cache{offline}; download it with "
            f"`hf download {name}` or pass a local directory"
        )
    return resolved


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import constants

    snapshots = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


def _offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode()


def _is_encoder_key(model, key: str) -> bool:
    # Keys are named from the loaded model: a head's encoder keys carry the base-model prefix, the bare
    # encoder's have none.
    return model.base_model is model or key.startswith(f"{model.base_model_prefix}.")


def _fill_special_tokens(tokenizer) -> None:
    from ltgbert.tokenization import SPECIAL_TOKENS

    vocab = tokenizer.get_vocab()
    for role, token in zip(("unk", "cls", "sep", "pad", "mask"), SPECIAL_TOKENS):
        if getattr(tokenizer, f"{role}_token") is None and token in vocab:
            setattr(tokenizer, f"{role}_token", token)


def _describe(config_dict) -> str:
    if not isinstance(config_dict, dict):
        return f"config.json holds a {type(config_dict).__name__}, not an object"
    if config_dict.get("model_type"):
        return f"model_type {config_dict['model_type']!r}"
    return "config.json has no model_type and its auto_map/architectures name no LTG-BERT code"


def _first_line(error: BaseException) -> str:
    """The first informative line of an exception message ("Error(s) in loading ...:" takes the next line too)."""
    lines = [line.strip().rstrip(".") for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if lines[0].endswith(":") and len(lines) > 1:
        return f"{lines[0]} {lines[1]}"
    return lines[0]
