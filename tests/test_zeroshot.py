"""Tests of ltgbert/zeroshot.py and launch/evaluate.py on a tiny BERT (and our LtgBert once it imports).

The reference in every equality test is written here independently of the library: one masked copy at a time,
batch size 1, no padding, log-softmax of the full logits.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from ltgbert.errors import UserError
from ltgbert.zeroshot import BLIMP_FIELDS, evaluate_blimp, format_table, load_blimp, score_sentences

REPO = Path(__file__).resolve().parents[1]
SPECIALS = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
# whole words plus "##" pieces, so that "walks", "played", "unhappy" ... split into several pieces
WORDS = ["the", "a", "dog", "dogs", "cat", "cats", "bird", "run", "runs", "walk", "play", "see", "sees", "is",
         "are", "was", "were", "big", "small", "happy", "un", "who", "that", "himself", "herself", ".", ",",
         "##s", "##ed", "##ing", "##happy", "##er", "##est", "##ly", "##k", "##a", "##t", "##d"]

SENTENCES = ["the dog runs .", "the dogs walks .", "a cat played with the birds .", "unhappy cats sees herself",
             "the bigger dogs were walking happily ."]


def make_tokenizer() -> transformers.PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]",
                                                sep_token="[SEP]", pad_token="[PAD]", mask_token="[MASK]",
                                                model_max_length=64)


def make_bert(vocab_size: int) -> transformers.BertForMaskedLM:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                                     pad_token_id=3)
    return transformers.BertForMaskedLM(config).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def bert(tokenizer):
    return make_bert(len(tokenizer))


def reference_scores(model, tokenizer, sentences, variant):
    """One masked copy through the model at a time: the definition of PLL and within_word_l2r."""
    out = []
    for sentence in sentences:
        enc = tokenizer(sentence)
        ids, words = enc["input_ids"], enc.word_ids()
        total = 0.0
        for t in range(len(ids)):
            if words[t] is None:  # [CLS] / [SEP]
                continue
            masked = list(ids)
            masked[t] = tokenizer.mask_token_id
            if variant == "within_word_l2r":
                for u in range(t + 1, len(ids)):
                    if words[u] == words[t]:
                        masked[u] = tokenizer.mask_token_id
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([masked])).logits
            if logits.dim() == 3:
                logits = logits[0, t]
            total += torch.log_softmax(logits.float().reshape(-1), dim=-1)[ids[t]].item()
        out.append(total)
    return out


def write_pairs(path: Path, pairs: list[tuple[str, str]], uid: str, field: str = "morphology") -> None:
    rows = [{"sentence_good": g, "sentence_bad": b, "field": field, "linguistics_term": f"{uid}_term", "UID": uid,
             "pairID": str(i), "lexically_identical": False} for i, (g, b) in enumerate(pairs)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# -----------------------------------------------------------------------------
# scoring equals the one-copy-at-a-time definition


def test_tokenizer_splits_words(tokenizer):
    enc = tokenizer("the dogs walks unhappy")
    assert enc.word_ids() == [None, 0, 1, 2, 2, 3, 3, None]  # walk ##s, un ##happy: multi-piece words exist


@pytest.mark.parametrize("variant", ["pll", "within_word_l2r"])
def test_batched_equals_reference(bert, tokenizer, variant):
    expected = reference_scores(bert, tokenizer, SENTENCES, variant)
    for batch_tokens in (1, 40, 100_000):  # one copy per batch, mixed sentences per batch, everything at once
        got = score_sentences(bert, tokenizer, SENTENCES, batch_tokens=batch_tokens, variant=variant)
        assert got == pytest.approx(expected, abs=1e-4), batch_tokens


def test_variants_differ_only_on_multipiece_words(bert, tokenizer):
    single = ["the dog runs .", "a cat sees the bird"]  # every word is one piece
    assert score_sentences(bert, tokenizer, single, variant="pll") == pytest.approx(
        score_sentences(bert, tokenizer, single, variant="within_word_l2r"), abs=1e-5)
    multi = ["the dogs walks unhappy"]
    assert score_sentences(bert, tokenizer, multi, variant="pll") != pytest.approx(
        score_sentences(bert, tokenizer, multi, variant="within_word_l2r"), abs=1e-5)


def test_evaluate_blimp_accuracies_and_train_mode(bert, tokenizer, tmp_path):
    write_pairs(tmp_path / "agr.jsonl", [("the dog runs .", "the dog run ."), ("the cats run .", "the cats runs .")],
                "agr")
    write_pairs(tmp_path / "ana.jsonl", [("the cat sees herself", "the cat sees himself")], "ana", field="syntax")
    pairs = load_blimp(tmp_path)
    assert [p["UID"] for p in pairs] == ["agr", "agr", "ana"]  # files sorted by name, rows in order
    bert.train()
    results = evaluate_blimp(bert, tokenizer, pairs, batch_tokens=64, return_scores=True)
    assert bert.training  # restored
    bert.eval()
    correct = [int(g > b) for g, b in results["scores"]]
    assert results["overall"] == pytest.approx(sum(correct) / 3)
    assert results["by_uid"]["agr"] == pytest.approx(sum(correct[:2]) / 2)
    assert results["by_field"] == {"morphology": results["by_uid"]["agr"], "syntax": results["by_uid"]["ana"]}
    assert results["pairs_by_uid"] == {"agr": 2, "ana": 1} and results["num_pairs"] == 3
    assert results["sentences_per_second"] > 0
    ref = reference_scores(bert, tokenizer, [pairs[0]["sentence_good"], pairs[0]["sentence_bad"]], "pll")
    assert results["scores"][0] == pytest.approx(ref, abs=1e-4)
    table = format_table(results)
    assert "agr" in table and "syntax" in table and "overall" in table


def make_ltgbert(vocab_size: int):
    ltgbert = pytest.importorskip("ltgbert")
    if not hasattr(ltgbert, "LtgBertForMaskedLM"):
        pytest.skip("ltgbert.LtgBertForMaskedLM is not importable yet")
    torch.manual_seed(0)
    config = ltgbert.LtgBertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                                   position_bucket_size=8, hidden_dropout_prob=0.0,
                                   attention_probs_dropout_prob=0.0)
    return ltgbert.LtgBertForMaskedLM(config).eval()


def test_ltgbert_batched_equals_reference(tokenizer):
    # our model takes the labelled-logits path ([n_masked, vocab]); the reference reads [1, T, vocab]
    model = make_ltgbert(len(tokenizer))
    for variant in ("pll", "within_word_l2r"):
        expected = reference_scores(model, tokenizer, SENTENCES, variant)
        for batch_tokens in (1, 40, 100_000):
            got = score_sentences(model, tokenizer, SENTENCES, batch_tokens=batch_tokens, variant=variant)
            assert got == pytest.approx(expected, abs=1e-4), (variant, batch_tokens)


# -----------------------------------------------------------------------------
# bad input: one line naming the file, the line and the field


@pytest.mark.parametrize("content, message", [
    ("", "empty"),
    ('{"sentence_good": "a", "sentence_bad": "b"\n', ":1: invalid JSON"),
    (json.dumps(dict.fromkeys(BLIMP_FIELDS, "x")) + "\n[1, 2]\n", ":2: expected a JSON object"),
    (json.dumps({k: "x" for k in BLIMP_FIELDS if k != "UID"}) + "\n", ":1: missing field 'UID'"),
    (json.dumps({**dict.fromkeys(BLIMP_FIELDS, "x"), "sentence_bad": ""}) + "\n", "'sentence_bad' must be"),
])
def test_load_blimp_bad_file(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=message) as info:
        load_blimp(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_load_blimp_missing_path_and_empty_dir(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_blimp(tmp_path / "nope")
    with pytest.raises(UserError, match="no \\*.jsonl files"):
        load_blimp(tmp_path)


# -----------------------------------------------------------------------------
# the entry point


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, bert, tokenizer):
    path = tmp_path_factory.mktemp("model")
    bert.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture()
def blimp_dir(tmp_path):
    path = tmp_path / "blimp"
    path.mkdir()
    write_pairs(path / "agr.jsonl", [("the dog runs .", "the dog run ."), ("the cats run .", "the cats runs .")],
                "agr")
    write_pairs(path / "ana.jsonl", [("the cat sees herself", "the cat sees himself")], "ana", field="syntax")
    return path


def load_entry_point(monkeypatch):
    spec = importlib.util.spec_from_file_location("launch_evaluate", REPO / "launch" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "launch_evaluate", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_entry_point_writes_json_table_and_tensorboard(model_dir, blimp_dir, tmp_path, capsys, monkeypatch):
    # in-process: a subprocess would pay the torch/transformers import again; the CLI test below runs one
    evaluate = load_entry_point(monkeypatch)
    out, logs = tmp_path / "out", tmp_path / "logs"
    assert evaluate.main(["--model_name_or_path", str(model_dir), "--blimp_dir", str(blimp_dir), "--output_dir",
                          str(out), "--logging_dir", str(logs), "--variant", "within_word_l2r",
                          "--device", "cpu"]) == 0
    stdout = capsys.readouterr().out
    assert "agr" in stdout and "overall" in stdout and "sentences/s" in stdout
    results = json.loads((out / "blimp_results.json").read_text())
    assert results["num_pairs"] == 3 and results["variant"] == "within_word_l2r"
    assert set(results["by_uid"]) == {"agr", "ana"} and 0.0 <= results["overall"] <= 1.0
    assert any(p.name.startswith("events.out.tfevents") for p in logs.iterdir())


def test_entry_point_default_output_in_model_dir(model_dir, blimp_dir, monkeypatch):
    evaluate = load_entry_point(monkeypatch)
    assert evaluate.main(["--model_name_or_path", str(model_dir), "--blimp_dir", str(blimp_dir / "agr.jsonl"),
                          "--device", "cpu", "--max_pairs_per_uid", "1"]) == 0
    results = json.loads((model_dir / "blimp_results.json").read_text())
    assert results["num_pairs"] == 1 and set(results["by_field"]) == {"morphology"}


@pytest.mark.parametrize("case", ["missing_blimp", "missing_model", "missing_field", "bad_json", "empty_file"])
def test_entry_point_bad_input_exits_2(model_dir, blimp_dir, tmp_path, capsys, monkeypatch, case):
    evaluate = load_entry_point(monkeypatch)
    blimp, model = blimp_dir, model_dir
    if case == "missing_blimp":
        blimp = tmp_path / "nope"
    elif case == "missing_model":
        model = tmp_path / "no_model"
    elif case == "missing_field":
        (blimp_dir / "zz.jsonl").write_text(json.dumps({k: "x" for k in BLIMP_FIELDS if k != "field"}) + "\n")
    elif case == "bad_json":
        (blimp_dir / "zz.jsonl").write_text(json.dumps(dict.fromkeys(BLIMP_FIELDS, "x")) + "\n{oops\n")
    elif case == "empty_file":
        (blimp_dir / "zz.jsonl").write_text("")
    output = tmp_path / "out.json"
    code = evaluate.main(["--model_name_or_path", str(model), "--blimp_dir", str(blimp), "--device", "cpu",
                          "--output_file", str(output)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err, err
    assert not output.exists()
    if case in ("missing_field", "bad_json", "empty_file"):
        assert "zz.jsonl" in err
    if case == "missing_field":
        assert ":1:" in err and "'field'" in err
    if case == "bad_json":
        assert ":2:" in err


def test_entry_point_bad_input_cli_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "evaluate.py"), "--blimp_dir",
                           str(tmp_path / "nope")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: ") and "\n" not in proc.stderr.strip()


def test_entry_point_on_saved_ltgbert_dir(tokenizer, blimp_dir, tmp_path, capsys, monkeypatch):
    model = make_ltgbert(len(tokenizer))
    model.save_pretrained(tmp_path / "ltg")
    tokenizer.save_pretrained(tmp_path / "ltg")
    evaluate = load_entry_point(monkeypatch)
    assert evaluate.main(["--model_name_or_path", str(tmp_path / "ltg"), "--blimp_dir", str(blimp_dir),
                          "--device", "cpu"]) == 0
    results = json.loads((tmp_path / "ltg" / "blimp_results.json").read_text())
    expected = [reference_scores(model, tokenizer, [p["sentence_good"], p["sentence_bad"]], "pll")
                for p in load_blimp(blimp_dir)]
    assert results["num_pairs"] == 3
    assert results["overall"] == pytest.approx(sum(good > bad for good, bad in expected) / 3)
