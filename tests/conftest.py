"""Shared test fixtures: a tiny config and a tiny WordPiece tokenizer built in memory (nothing downloaded)."""

import os

import pytest

# Offline and quiet for every test and every subprocess the tests start.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = (
    "the a this these that those dog dogs cat cats girl girls boy boys teacher teachers sees see runs run "
    "likes like near behind with who himself herself themselves is are was were happy big small red"
).split()


def build_tokenizer(save_dir=None):
    """A WordPiece tokenizer over a fixed word list, with LTG's special tokens at ids 0..4."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
    vocab = {tok: i for i, tok in enumerate(specials + WORDS + ["##s", "##ing", "."])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 1), ("[SEP]", 2)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        mask_token="[MASK]",
        model_max_length=128,
        model_input_names=["input_ids", "attention_mask"],
    )
    if save_dir is not None:
        fast.save_pretrained(save_dir)
    return fast


@pytest.fixture
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture
def tiny_config():
    from ltgbert import LtgBertConfig

    return LtgBertConfig.from_preset("tiny", vocab_size=64, max_position_embeddings=64, position_bucket_size=8)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """A smaller copy of the built-in demo data (corpus, minimal pairs, tasks), shared by the session."""
    from ltgbert.demo_data import ensure_demo_data

    return ensure_demo_data(
        tmp_path_factory.mktemp("demo-data"), num_words=300_000, pairs_per_phenomenon=100, task_sizes=(1000, 300, 300)
    )


@pytest.fixture(scope="session")
def pretrained_demo_dir(demo_data, tmp_path_factory):
    """`final/` of a short demo pretraining (the default run, fewer steps): what fine-tuning and zero-shot
    evaluation tests start from."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path_factory.mktemp("pretrained-demo")
    cmd = [
        sys.executable,
        str(root / "launch" / "pretrain.py"),
        "--train_file",
        str(demo_data.corpus_train),
        "--validation_file",
        str(demo_data.corpus_validation),
        "--output_dir",
        str(out),
        "--config_name",
        "demo",
        "--max_seq_length",
        "64",
        "--per_device_train_batch_size",
        "32",
        "--max_steps",
        PRETRAIN_TEST_STEPS,
        "--eval_steps",
        "0",
        "--save_steps",
        "0",
        "--logging_steps",
        "50",
        "--report_to",
        "none",
        "--disable_tqdm",
        "--vocab_size",
        "2048",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return out / "final"


PRETRAIN_TEST_STEPS = "600"
