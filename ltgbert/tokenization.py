"""WordPiece tokenizer training for LTG-BERT, saved as a standard transformers fast tokenizer.

LTG-BERT uses a WordPiece vocabulary (16384 entries in the paper's BNC setting) with the special tokens
[UNK] [CLS] [SEP] [PAD] [MASK] at ids 0..4; the model config hard-codes those ids
(unk=0, cls=1, sep=2, pad=3, mask=4), so the order here is part of the contract.

The result is a `transformers.PreTrainedTokenizerFast` built around the `tokenizers` object, so
`save_pretrained(dir)` writes tokenizer.json + tokenizer_config.json and `AutoTokenizer.from_pretrained(dir)`
loads it back without any ltgbert code. The post-processor adds [CLS] a [SEP] (and [CLS] a [SEP] b [SEP]
for pairs, with type ids 0/1), and `model_input_names` leaves out token_type_ids: LTG-BERT has no segment
embeddings, and a fill-mask pipeline would otherwise pass them to the model.

Every writer of a model directory (pretraining's final/ and word-count checkpoints, fine-tuning's best/,
export) saves the tokenizer through `save_tokenizer`, which makes the files portable across transformers
versions: transformers 5.x records a fast tokenizer as "TokenizersBackend", a name that 4.x (the 4.51.3 that
the official BabyLM evaluation pipeline pins) does not know, so `AutoTokenizer` and `AutoProcessor` fail
there. Both versions know "PreTrainedTokenizerFast", and tokenizer.json alone defines the tokenizer, so
that name is written instead.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from ltgbert.errors import UserError

SPECIAL_TOKENS = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]  # ids 0..4, in this order
UNK_TOKEN, CLS_TOKEN, SEP_TOKEN, PAD_TOKEN, MASK_TOKEN = SPECIAL_TOKENS
CONTINUATION_PREFIX = "##"  # WordPiece marks subwords that continue a word; masking relies on it


def _iter_texts(texts: Iterable, batch_size: int = 1000) -> Iterator[str]:
    """Strings from an iterable of strings, or the "text" column of a datasets.Dataset, in batches."""
    column_names = getattr(texts, "column_names", None)
    if column_names is not None:  # datasets.Dataset: read in slices, not row by row
        if "text" not in column_names:
            raise UserError(
                f"the dataset has no 'text' column (columns: {column_names}); use ltgbert.data.load_text_dataset"
            )
        for start in range(0, len(texts), batch_size):
            yield from (t for t in texts[start : start + batch_size]["text"] if t)
        return
    for t in texts:
        if not isinstance(t, str):
            raise UserError(
                f"train_tokenizer got a {type(t).__name__} where a text string was expected; pass paths or strings"
            )
        yield t


def _build_tokenizer(lowercase: bool, strip_accents: bool | None) -> Tokenizer:
    tokenizer = Tokenizer(models.WordPiece(unk_token=UNK_TOKEN, continuing_subword_prefix=CONTINUATION_PREFIX))
    # BertNormalizer: cleans control characters, spaces out CJK characters; accents follow lowercase
    # unless strip_accents says otherwise (the BERT convention)
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=strip_accents, lowercase=lowercase
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix=CONTINUATION_PREFIX)
    return tokenizer


def _post_processor(tokenizer: Tokenizer) -> processors.TemplateProcessing:
    cls_id, sep_id = tokenizer.token_to_id(CLS_TOKEN), tokenizer.token_to_id(SEP_TOKEN)
    return processors.TemplateProcessing(
        single=f"{CLS_TOKEN} $A {SEP_TOKEN}",
        pair=f"{CLS_TOKEN} $A {SEP_TOKEN} $B:1 {SEP_TOKEN}:1",
        special_tokens=[(CLS_TOKEN, cls_id), (SEP_TOKEN, sep_id)],
    )


def wrap_tokenizer(tokenizer: Tokenizer, model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """Wrap a trained `tokenizers.Tokenizer` as a transformers fast tokenizer with the LTG-BERT specials."""
    tokenizer.post_processor = _post_processor(tokenizer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token=UNK_TOKEN,
        cls_token=CLS_TOKEN,
        sep_token=SEP_TOKEN,
        pad_token=PAD_TOKEN,
        mask_token=MASK_TOKEN,
        model_max_length=model_max_length,
        model_input_names=["input_ids", "attention_mask"],
    )


def train_tokenizer(
    files: str | Path | list[str | Path] | Iterable[str],
    vocab_size: int = 16384,
    min_frequency: int = 2,
    lowercase: bool = False,
    strip_accents: bool | None = None,
    output_dir: str | Path | None = None,
    model_max_length: int = 512,
    text_column: str = "text",
    show_progress: bool = False,
) -> PreTrainedTokenizerFast:
    """Train a WordPiece tokenizer and return it as a `PreTrainedTokenizerFast` (saved if `output_dir`).

    files: a path, or a list/tuple of paths (plain text, or jsonl/json/parquet/csv/tsv read through
        `ltgbert.data.load_text_dataset` with `text_column`); any other iterable (a generator, a
        `datasets.Dataset` with a "text" column) is taken as the texts themselves.
    vocab_size: upper bound; a small corpus gives a smaller vocabulary (the trainer runs out of merges).
    min_frequency: pairs seen fewer times are not merged.
    lowercase / strip_accents: normalisation (strip_accents=None follows lowercase, as in BERT).
    Special tokens: [UNK]=0 [CLS]=1 [SEP]=2 [PAD]=3 [MASK]=4.

    Training is not bit-reproducible: the `tokenizers` trainer breaks ties between equally frequent merges
    by ids that follow hash-map order (huggingface/tokenizers#1794), so two runs on the same corpus can
    differ in a few low-frequency tokens. The saved directory is the artefact: in a distributed run train
    on the main process only and let the other ranks load it from disk.
    """
    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise UserError(f"vocab_size {vocab_size} is too small; use at least a few hundred (default 16384)")
    if min_frequency < 1:
        raise UserError(f"min_frequency must be >= 1, got {min_frequency}")
    tokenizer = _build_tokenizer(lowercase, strip_accents)
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        continuing_subword_prefix=CONTINUATION_PREFIX,
        show_progress=show_progress,
    )

    if isinstance(files, (str, Path, list, tuple)):
        # data imports no tokenizer code, so this import cannot be circular
        from ltgbert.data import PLAIN_TEXT_SUFFIXES, check_text_file, load_text_dataset

        paths = [Path(files)] if isinstance(files, (str, Path)) else [Path(f) for f in files]
        if not paths:
            raise UserError("no training files given; pass --train_file PATH [PATH ...]")
        if all(p.suffix.lower() in PLAIN_TEXT_SUFFIXES for p in paths):
            has_text = [check_text_file(p) for p in paths]  # every file is checked (bad bytes raise), not the first
            if not any(has_text):
                raise UserError(f"empty corpus: {', '.join(map(str, paths))} hold no text; pass non-empty text files")
            # the Rust trainer reads the files itself, in parallel and without Python in the loop
            tokenizer.train([str(p) for p in paths], trainer)
        else:
            dataset = load_text_dataset(paths, text_column=text_column)
            tokenizer.train_from_iterator(_iter_texts(dataset), trainer, length=len(dataset))
    else:
        tokenizer.train_from_iterator(_iter_texts(files), trainer)

    if tokenizer.get_vocab_size() <= len(SPECIAL_TOKENS):
        raise UserError("empty corpus: the tokenizer learned no tokens; pass files that contain text")
    for i, token in enumerate(SPECIAL_TOKENS):  # the model config relies on these ids
        assert tokenizer.token_to_id(token) == i, f"{token} got id {tokenizer.token_to_id(token)}, expected {i}"

    fast = wrap_tokenizer(tokenizer, model_max_length=model_max_length)
    if output_dir is not None:
        save_tokenizer(fast, output_dir)
    return fast


# The generic fast-tokenizer class under its 5.x and 4.x names; a model-specific class (BertTokenizer) is
# known to both and is kept.
GENERIC_FAST_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
# Loading options that 5.x writes back into tokenizer_config.json when a loaded tokenizer is saved; they
# describe how it was once loaded, not the tokenizer, and would override the next caller's own options.
_LOAD_TIME_KEYS = ("backend", "is_local", "local_files_only", "_commit_hash", "_from_auto", "trust_remote_code")


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, output_dir: str | Path) -> Path:
    """Save a fast tokenizer into `output_dir` so that it loads with AutoTokenizer and AutoProcessor under
    transformers 4.51.3 and 5.x; returns `output_dir`.

    tokenizer_config.json names the portable class, drops 5.x's "backend" field and loading options, and lists
    model inputs without token_type_ids (LTG-BERT has no segments; a tokenizer loaded from elsewhere may list
    them). The files are written into a temporary sibling directory and then moved in one by one, so a crash
    midway never leaves a half-written file over a good one; other files in `output_dir` (the model) stay.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(
            f"cannot save a {type(tokenizer).__name__}: LTG-BERT directories need a fast tokenizer "
            "(tokenizer.json); load the tokenizer with AutoTokenizer or ltgbert.loading.load_tokenizer"
        )
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{output_dir.name}-", dir=output_dir.parent))
    try:
        tokenizer.save_pretrained(str(tmp))
        _make_config_portable(tmp / "tokenizer_config.json", tokenizer)
        output_dir.mkdir(exist_ok=True)
        for f in tmp.iterdir():
            os.replace(f, output_dir / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output_dir


def _make_config_portable(path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    config = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    if config.get("tokenizer_class") in (*GENERIC_FAST_CLASSES, None):
        config["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
    for key in _LOAD_TIME_KEYS:  # "backend" is 5.x only, and its default there is the same backend
        config.pop(key, None)
    config["model_input_names"] = [name for name in tokenizer.model_input_names if name != "token_type_ids"]
    path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
