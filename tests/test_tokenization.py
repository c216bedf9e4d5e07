"""Tokenizer training: special-token ids, save/AutoTokenizer round trip, options, inputs, errors, CLI."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from transformers import AutoProcessor, AutoTokenizer

from ltgbert.errors import UserError
from ltgbert.tokenization import SPECIAL_TOKENS, save_tokenizer, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
WORDS = (
    "the dog cat bird walk walked walking talk talked talking jump jumped jumps happy unhappy happiness "
    "river Oslo Bergen quickly slowly over under because"
).split()


def write_corpus(path: Path, n_docs: int = 60, seed: int = 0) -> Path:
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sentences = [
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "."
            for _ in range(rng.randint(1, 4))
        ]
        docs.append("\n".join(sentences))
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("tok") / "corpus.txt")


@pytest.fixture(scope="module")
def saved(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer([corpus], vocab_size=120, min_frequency=1, output_dir=out, model_max_length=64)
    return out


def test_special_tokens_and_auto_tokenizer_round_trip(saved):
    tok = AutoTokenizer.from_pretrained(saved)
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    ids = (tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.pad_token_id, tok.mask_token_id)
    assert ids == (0, 1, 2, 3, 4)
    assert len(tok) <= 120 and tok.model_max_length == 64
    assert any(t.startswith("##") for t in tok.get_vocab())  # WordPiece continuation pieces exist

    text = "The dog walked over the river quickly."
    enc = tok(text)
    assert set(enc) == {"input_ids", "attention_mask"}  # no token_type_ids: LTG-BERT has no segments
    assert enc["input_ids"][0] == 1 and enc["input_ids"][-1] == 2
    assert tok.decode(enc["input_ids"], skip_special_tokens=True) == text
    pair = tok("the dog", "a cat", return_token_type_ids=True)
    sep_positions = [i for i, t in enumerate(pair["input_ids"]) if t == 2]
    assert pair["input_ids"][0] == 1 and len(sep_positions) == 2 and sep_positions[-1] == len(pair["input_ids"]) - 1
    assert pair["token_type_ids"][-1] == 1 and pair["token_type_ids"][0] == 0
    assert len(tok("dog " * 200, truncation=True)["input_ids"]) == 64
    assert tok.pad(tok(["the dog", "the dog walked over"]))["input_ids"][0][-1] == 3


def test_saved_tokenizer_is_portable_and_loads_as_the_babylm_pipeline_loads_it(saved, tmp_path):
    """tokenizer_config.json names a class that transformers 4.x knows too (tests/test_compat_transformers451.py
    loads it there); AutoProcessor, as the BabyLM pipeline calls it, gives (0, 0) offsets to specials."""
    config = json.loads((saved / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and "backend" not in config
    assert config["model_input_names"] == ["input_ids", "attention_mask"]

    processor = AutoProcessor.from_pretrained(saved, padding_side="right")
    text = "The dog walked over the river."
    enc = processor(text=text, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    assert offsets[0] == offsets[-1] == (0, 0)
    assert all(end > start for start, end in offsets[1:-1]) and offsets[-2][1] == len(text)
    cls, sep = processor.cls_token_id, processor.sep_token_id
    a, b = (processor(t, add_special_tokens=False)["input_ids"] for t in ("the dog", "a cat"))
    assert processor("the dog", "a cat")["input_ids"] == [cls, *a, sep, *b, sep]

    # a tokenizer loaded from elsewhere: its loading options and token_type_ids are not written back, and the
    # model files already in the directory stay
    loaded = AutoTokenizer.from_pretrained(saved)
    loaded.model_input_names = ["input_ids", "token_type_ids", "attention_mask"]
    out = tmp_path / "model"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"weights")
    save_tokenizer(loaded, out)
    written = json.loads((out / "tokenizer_config.json").read_text())
    assert not {"is_local", "local_files_only", "backend"} & set(written)
    assert written["model_input_names"] == ["input_ids", "attention_mask"]
    assert (out / "model.safetensors").read_bytes() == b"weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary directory left behind
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == enc["input_ids"]


def test_lowercase_option(corpus, tmp_path):
    cased = train_tokenizer([corpus], vocab_size=120, min_frequency=1)
    uncased = train_tokenizer([corpus], vocab_size=120, min_frequency=1, lowercase=True)
    assert uncased("The DOG")["input_ids"] == uncased("the dog")["input_ids"]
    assert cased("The DOG")["input_ids"] != cased("the dog")["input_ids"]
    config = json.loads(uncased.backend_tokenizer.to_str())["normalizer"]
    assert config["type"] == "BertNormalizer" and config["lowercase"] is True


def test_inputs_iterable_dataset_and_jsonl(corpus, tmp_path):
    import datasets

    texts = corpus.read_text(encoding="utf-8").split("\n\n")
    from_iter = train_tokenizer(iter(texts), vocab_size=100, min_frequency=1)
    from_ds = train_tokenizer(datasets.Dataset.from_dict({"text": texts}), vocab_size=100, min_frequency=1)
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    from_jsonl = train_tokenizer([jsonl], vocab_size=100, min_frequency=1, text_column="body")
    # training is not bit-reproducible (merge ties depend on hash order: huggingface/tokenizers#1794),
    # so compare what is stable: specials, the character alphabet, and lossless round trips
    tokenizers = (from_iter, from_ds, from_jsonl)
    alphabets = [{t for t in tok.get_vocab() if len(t.removeprefix("##")) == 1} for tok in tokenizers]
    assert alphabets[0] == alphabets[1] == alphabets[2]
    for tok in tokenizers:
        assert len(tok) <= 100 and tok.mask_token_id == 4
        assert tok.decode(tok(texts[0])["input_ids"], skip_special_tokens=True) == " ".join(texts[0].split())


def test_bad_inputs(tmp_path):
    with pytest.raises(UserError, match="file not found: .*missing.txt"):
        train_tokenizer([tmp_path / "missing.txt"])
    (tmp_path / "empty.txt").write_text("\n \n\n", encoding="utf-8")
    with pytest.raises(UserError, match="empty corpus"):
        train_tokenizer([tmp_path / "empty.txt"])
    (tmp_path / "bad.txt").write_bytes(b"the dog walked\ncaf\xe9 au lait\n")
    with pytest.raises(UserError, match=r"bad.txt: invalid UTF-8 at byte offset 18"):
        train_tokenizer([tmp_path / "bad.txt"])
    (tmp_path / "rows.jsonl").write_text('{"sentence": "the dog"}\n', encoding="utf-8")
    with pytest.raises(UserError, match="no column 'text'.*sentence"):
        train_tokenizer([tmp_path / "rows.jsonl"])
    with pytest.raises(UserError, match="vocab_size"):
        train_tokenizer(iter(["a b c"]), vocab_size=3)


def load_cli(monkeypatch):
    spec = importlib.util.spec_from_file_location("train_tokenizer_cli", ROOT / "launch" / "train_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses resolve annotations through it
    spec.loader.exec_module(module)
    return module


def test_cli_trains_saves_and_reports_errors(corpus, tmp_path, capsys, monkeypatch):
    cli = load_cli(monkeypatch)
    out = tmp_path / "cli_tok"
    assert (
        cli.cli(
            [
                "--train_file",
                str(corpus),
                "--vocab_size",
                "100",
                "--min_frequency",
                "1",
                "--lowercase",
                "--output_dir",
                str(out),
            ]
        )
        == 0
    )
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.mask_token_id == 4 and tok("The")["input_ids"] == tok("the")["input_ids"]
    assert cli.cli(["--train_file", str(tmp_path / "nope.txt"), "--output_dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: file not found")
    assert not (tmp_path / "x").exists()  # a failed run writes nothing


def test_cli_defaults_to_demo_corpus(corpus, tmp_path, monkeypatch):
    demo_data = pytest.importorskip("ltgbert.demo_data")
    # the real demo corpus takes seconds to generate; the CLI only needs its path
    monkeypatch.setattr(demo_data, "ensure_demo_data", lambda *a, **k: SimpleNamespace(corpus_train=corpus))
    monkeypatch.chdir(tmp_path)
    assert load_cli(monkeypatch).cli(["--vocab_size", "100"]) == 0
    assert AutoTokenizer.from_pretrained(tmp_path / "outputs" / "tokenizer-demo").cls_token_id == 1
