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
import types
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from ltgbert.errors import UserError
from ltgbert.zeroshot import (
    BLIMP_FIELDS,
    accuracies_from_scores,
    evaluate_blimp,
    flatten_results,
    format_table,
    load_blimp,
    score_sentences,
)

REPO = Path(__file__).resolve().parents[1]
SPECIALS = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
# whole words plus "##" pieces, so that "walks", "played", "unhappy" ... split into several pieces
WORDS = [
    "the",
    "a",
    "dog",
    "dogs",
    "cat",
    "cats",
    "bird",
    "run",
    "runs",
    "walk",
    "play",
    "see",
    "sees",
    "is",
    "are",
    "was",
    "were",
    "big",
    "small",
    "happy",
    "un",
    "who",
    "that",
    "himself",
    "herself",
    ".",
    ",",
    "##s",
    "##ed",
    "##ing",
    "##happy",
    "##er",
    "##est",
    "##ly",
    "##k",
    "##a",
    "##t",
    "##d",
]

SENTENCES = [
    "the dog runs .",
    "the dogs walks .",
    "a cat played with the birds .",
    "unhappy cats sees herself",
    "the bigger dogs were walking happily .",
]


def make_tokenizer() -> transformers.PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        mask_token="[MASK]",
        model_max_length=64,
    )


def make_bert(vocab_size: int) -> transformers.BertForMaskedLM:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=3,
    )
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
    rows = [
        {
            "sentence_good": g,
            "sentence_bad": b,
            "field": field,
            "linguistics_term": f"{uid}_term",
            "UID": uid,
            "pairID": str(i),
            "lexically_identical": False,
        }
        for i, (g, b) in enumerate(pairs)
    ]
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
        score_sentences(bert, tokenizer, single, variant="within_word_l2r"), abs=1e-5
    )
    multi = ["the dogs walks unhappy"]
    assert score_sentences(bert, tokenizer, multi, variant="pll") != pytest.approx(
        score_sentences(bert, tokenizer, multi, variant="within_word_l2r"), abs=1e-5
    )


def test_evaluate_blimp_accuracies_and_train_mode(bert, tokenizer, tmp_path):
    write_pairs(
        tmp_path / "agr.jsonl", [("the dog runs .", "the dog run ."), ("the cats run .", "the cats runs .")], "agr"
    )
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
    config = ltgbert.LtgBertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        position_bucket_size=8,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
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


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "empty"),
        ('{"sentence_good": "a", "sentence_bad": "b"\n', ":1: invalid JSON"),
        (json.dumps(dict.fromkeys(BLIMP_FIELDS, "x")) + "\n[1, 2]\n", ":2: expected a JSON object"),
        (json.dumps({k: "x" for k in BLIMP_FIELDS if k != "UID"}) + "\n", ":1: missing field 'UID'"),
        (json.dumps({**dict.fromkeys(BLIMP_FIELDS, "x"), "sentence_bad": ""}) + "\n", "'sentence_bad' must be"),
    ],
)
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
    write_pairs(path / "agr.jsonl", [("the dog runs .", "the dog run ."), ("the cats run .", "the cats runs .")], "agr")
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
    assert (
        evaluate.cli(
            [
                "--model_name_or_path",
                str(model_dir),
                "--blimp_dir",
                str(blimp_dir),
                "--output_dir",
                str(out),
                "--logging_dir",
                str(logs),
                "--variant",
                "within_word_l2r",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    stdout = capsys.readouterr().out
    assert "agr" in stdout and "overall" in stdout and "sentences/s" in stdout
    results = json.loads((out / "blimp_results.json").read_text())
    assert results["num_pairs"] == 3 and results["variant"] == "within_word_l2r"
    assert set(results["by_uid"]) == {"agr", "ana"} and 0.0 <= results["overall"] <= 1.0
    assert any(p.name.startswith("events.out.tfevents") for p in logs.iterdir())


def test_entry_point_default_output_in_model_dir(model_dir, blimp_dir, monkeypatch):
    evaluate = load_entry_point(monkeypatch)
    assert (
        evaluate.cli(
            [
                "--model_name_or_path",
                str(model_dir),
                "--blimp_dir",
                str(blimp_dir / "agr.jsonl"),
                "--device",
                "cpu",
                "--max_pairs_per_uid",
                "1",
            ]
        )
        == 0
    )
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
    elif case == "missing_field":  # a row with a "field" is a BLiMP row and must name its UID
        (blimp_dir / "zz.jsonl").write_text(json.dumps({k: "x" for k in BLIMP_FIELDS if k != "UID"}) + "\n")
    elif case == "bad_json":
        (blimp_dir / "zz.jsonl").write_text(json.dumps(dict.fromkeys(BLIMP_FIELDS, "x")) + "\n{oops\n")
    elif case == "empty_file":
        (blimp_dir / "zz.jsonl").write_text("")
    output = tmp_path / "out.json"
    code = evaluate.cli(
        ["--model_name_or_path", str(model), "--blimp_dir", str(blimp), "--device", "cpu", "--output_file", str(output)]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err, err
    assert not output.exists()
    if case in ("missing_field", "bad_json", "empty_file"):
        assert "zz.jsonl" in err
    if case == "missing_field":
        assert ":1:" in err and "'UID'" in err
    if case == "bad_json":
        assert ":2:" in err


def test_entry_point_bad_input_cli_exit_code(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "evaluate.py"), "--blimp_dir", str(tmp_path / "nope")],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: ") and "\n" not in proc.stderr.strip()


def test_entry_point_on_saved_ltgbert_dir(tokenizer, blimp_dir, tmp_path, capsys, monkeypatch):
    model = make_ltgbert(len(tokenizer))
    model.save_pretrained(tmp_path / "ltg")
    tokenizer.save_pretrained(tmp_path / "ltg")
    evaluate = load_entry_point(monkeypatch)
    assert (
        evaluate.cli(["--model_name_or_path", str(tmp_path / "ltg"), "--blimp_dir", str(blimp_dir), "--device", "cpu"])
        == 0
    )
    results = json.loads((tmp_path / "ltg" / "blimp_results.json").read_text())
    expected = [
        reference_scores(model, tokenizer, [p["sentence_good"], p["sentence_bad"]], "pll")
        for p in load_blimp(blimp_dir)
    ]
    assert results["num_pairs"] == 3
    assert results["overall"] == pytest.approx(sum(good > bad for good, bad in expected) / 3)


# -----------------------------------------------------------------------------
# ties: strict counts them wrong, official (the BabyLM pipeline's good >= bad) right


def test_tie_policies_on_crafted_scores():
    pairs = [
        {
            "sentence_good": f"g{i}",
            "sentence_bad": f"b{i}",
            "UID": uid,
            "field": "syntax",
            "linguistics_term": "t",
            "task": "blimp_fast",
        }
        for i, uid in enumerate(["a", "a", "a", "b"])
    ]
    scores = [[-1.0, -2.0], [-3.0, -3.0], [-5.0, -4.0], [-2.5, -2.5]]  # right, tie, wrong | tie
    strict = accuracies_from_scores(pairs, scores, "strict")
    official = accuracies_from_scores(pairs, scores, "official")
    for r in (strict, official):
        assert r["ties"] == 2 and r["ties_by_uid"] == {"a": 1, "b": 1} and r["tasks"]["blimp_fast"]["ties"] == 2
    assert strict["by_uid"] == {"a": pytest.approx(1 / 3), "b": 0.0}
    assert official["by_uid"] == {"a": pytest.approx(2 / 3), "b": 1.0}
    assert strict["overall"] == 0.25 and official["overall"] == 0.75  # micro over pairs
    # the pipeline's reported number: the unweighted mean over UIDs of one folder
    assert official["tasks"]["blimp_fast"]["accuracy"] == pytest.approx((2 / 3 + 1) / 2)
    assert "2 ties counted right (official)" in format_table({**official, "variant": "pll"})
    with pytest.raises(UserError, match="tie_policy"):
        accuracies_from_scores(pairs, scores, "lenient")


LONG = "the bigger dogs were walking happily . the cat sees"


@pytest.mark.parametrize("which", ["bert", "ltgbert"])
def test_identical_tokenizations_tie_exactly(bert, tokenizer, which):
    # "zzz" and "qqq" are both [UNK]: the tie pair's sentences are the same ids and must score exactly the same.
    # "zzz" comes first and "qqq" last, with long sentences between: at budgets 75 and 100 their masked copies
    # land in batches of different widths, where our model's two scores differ in the last bit unless each
    # distinct token sequence is scored once
    model = bert if which == "bert" else make_ltgbert(len(tokenizer))
    pairs = [
        {"sentence_good": g, "sentence_bad": b, "UID": uid, "field": "f", "linguistics_term": "t"}
        for g, b, uid in [
            ("the dog zzz .", "the dog run .", "unk"),
            (f"{LONG} herself", f"{LONG} himself", "ana"),
            ("the dog runs .", "the dog run .", "unk"),
            ("the dog zzz .", "the dog qqq .", "unk"),
        ]
    ]
    assert tokenizer(pairs[3]["sentence_good"])["input_ids"] == tokenizer(pairs[3]["sentence_bad"])["input_ids"]
    for batch_tokens in (1, 75, 100, 10_000):
        strict = evaluate_blimp(model, tokenizer, pairs, batch_tokens=batch_tokens, return_scores=True)
        official = evaluate_blimp(
            model, tokenizer, pairs, batch_tokens=batch_tokens, return_scores=True, tie_policy="official"
        )
        scores = strict["scores"]
        assert scores[3][0] == scores[3][1] and official["scores"] == scores
        assert strict["ties_by_uid"] == {"ana": 0, "unk": 1} and official["ties"] == 1
        unk = [scores[i] for i in (0, 2, 3)]
        assert strict["by_uid"]["unk"] == pytest.approx(sum(g > b for g, b in unk) / 3)
        assert official["by_uid"]["unk"] == pytest.approx(sum(g >= b for g, b in unk) / 3)
        assert official["by_uid"]["unk"] == pytest.approx(strict["by_uid"]["unk"] + 1 / 3)
        assert official["by_uid"]["ana"] == strict["by_uid"]["ana"]


class _RemoteCodeLike(torch.nn.Module):
    """A model_type "ltgbert" model whose forward names its arguments and takes no **kwargs (remote code)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = types.SimpleNamespace(model_type="ltgbert", max_position_embeddings=64)
        self.flags = []

    def forward(self, input_ids, attention_mask=None, labels=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)  # [batch, seq, vocab]


class _WithLabelledFlag(_RemoteCodeLike):
    """The model after the MaskedLMOutput-contract change: [n_labelled, vocab] only when asked."""

    def forward(self, input_ids, attention_mask=None, labels=None, labelled_logits_only=False):
        self.flags.append(labelled_logits_only)
        logits = self.inner(input_ids=input_ids, attention_mask=attention_mask).logits
        if labels is not None and labelled_logits_only:
            logits = logits[labels != -100]
        return transformers.modeling_outputs.MaskedLMOutput(logits=logits)


@pytest.mark.parametrize("wrapper", [_RemoteCodeLike, _WithLabelledFlag])
def test_labelled_logits_flag_only_where_accepted(bert, tokenizer, wrapper):
    model = wrapper(bert).eval()  # a fresh Module is in training mode, and scoring restores that mode
    expected = reference_scores(bert, tokenizer, SENTENCES[:3], "pll")
    assert score_sentences(model, tokenizer, SENTENCES[:3], batch_tokens=40) == pytest.approx(expected, abs=1e-4)
    assert model.flags == ([True] * len(model.flags) if wrapper is _WithLabelledFlag else [])
    assert wrapper is _RemoteCodeLike or model.flags


# -----------------------------------------------------------------------------
# the BabyLM evaluation pipeline's data layout (evaluation_data/{full_eval,fast_eval}/{blimp,supplement}_*)


def blimp_row(good, bad, uid, field, i):
    return {
        "sentence_good": good,
        "sentence_bad": bad,
        "field": field,
        "linguistics_term": "island_effects",
        "UID": uid,
        "simple_LM_method": True,
        "one_prefix_method": True,
        "two_prefix_method": False,
        "lexically_identical": False,
        "pairID": i,
    }  # an int, as in the published files


def make_evaluation_data(root: Path) -> Path:
    """The pipeline's tree, a few rows per file: BLiMP rows name UID/field/term, supplement rows only the
    two sentences; other tasks' folders (EWoK, reading) sit beside them and must be skipped."""
    blimp = {
        "adjunct_island": ("syntax", [("who is the dog near", "who is the dog near the")]),
        "principle_A_case_1": (
            "syntax_semantics",
            [
                ("the girls see themselves .", "the girls see herself ."),
                ("the boy sees himself .", "the boy sees themselves ."),
            ],
        ),
    }
    supplement = {
        "hypernym": [("a dog is a cat .", "a cat is a dog .")],
        "qa_congruence_easy": [("A: who runs ?\nB: the dog .", "A: who runs ?\nB: red .")],
    }
    for split, task_suffix, n in (("full_eval", "filtered", 2), ("fast_eval", "fast", 1)):
        base = root / "evaluation_data" / split
        for uid, (field, rows) in blimp.items():
            write_jsonl(
                base / f"blimp_{task_suffix}" / f"{uid}.jsonl",
                [blimp_row(g, b, uid, field, i) for i, (g, b) in enumerate(rows[:n])],
            )
        for name, rows in supplement.items():
            write_jsonl(
                base / f"supplement_{task_suffix}" / f"{name}.jsonl",
                [{"sentence_good": g, "sentence_bad": b} for g, b in rows],
            )
        write_jsonl(
            base / f"ewok_{task_suffix}" / "agent-properties.jsonl",
            [{"Context1": "x", "Target1": "y", "Target2": "z", "Domain": "agent-properties"}],
        )
        (base / "reading").mkdir(parents=True)
        (base / "reading" / "reading_data.csv").write_text("item,word\n")
    return root / "evaluation_data"


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def tasks(pairs: list[dict]) -> list[str]:
    return list(dict.fromkeys(p["task"] for p in pairs))


def test_load_babylm_layout(tmp_path):
    root = make_evaluation_data(tmp_path)
    everything = load_blimp(root)
    assert tasks(everything) == ["blimp_filtered", "supplement_filtered", "blimp_fast", "supplement_fast"]
    assert tasks(load_blimp(root / "full_eval")) == ["blimp_filtered", "supplement_filtered"]
    fast = load_blimp(root / "fast_eval")
    assert tasks(fast) == ["blimp_fast", "supplement_fast"] and len(fast) == 4
    assert [(p["UID"], p["field"], p["linguistics_term"]) for p in fast] == [
        ("adjunct_island", "syntax", "island_effects"),
        ("principle_A_case_1", "syntax/semantics", "island_effects"),
        ("hypernym", "supplement", "supplement"),
        ("qa_congruence_easy", "supplement", "supplement"),
    ]
    assert fast[0]["pairID"] == "0" and "pairID" not in fast[2] and "\n" in fast[3]["sentence_good"]
    one_task = load_blimp(root / "full_eval" / "supplement_filtered")
    assert {p["task"] for p in one_task} == {"supplement_filtered"} and len(one_task) == 2
    one_file = load_blimp(root / "full_eval" / "blimp_filtered" / "principle_A_case_1.jsonl")
    assert [p["task"] for p in one_file] == ["blimp_filtered"] * 2
    first = load_blimp(root / "full_eval", max_pairs_per_uid=1)
    assert [(p["task"], p["UID"]) for p in first] == [
        ("blimp_filtered", "adjunct_island"),
        ("blimp_filtered", "principle_A_case_1"),
        ("supplement_filtered", "hypernym"),
        ("supplement_filtered", "qa_congruence_easy"),
    ]
    with pytest.raises(UserError, match="max_pairs_per_uid must be >= 1"):
        load_blimp(root, max_pairs_per_uid=0)
    (root / "fast_eval" / "blimp_empty").mkdir()
    with pytest.raises(UserError, match="blimp_empty holds no"):
        load_blimp(root / "fast_eval")


def test_babylm_layout_results_per_task(bert, tokenizer, tmp_path):
    root = make_evaluation_data(tmp_path)
    results = evaluate_blimp(bert, tokenizer, load_blimp(root), batch_tokens=512)
    assert set(results["tasks"]) == {"blimp_filtered", "supplement_filtered", "blimp_fast", "supplement_fast"}
    fast = results["tasks"]["blimp_fast"]
    assert set(fast["by_uid"]) == {"adjunct_island", "principle_A_case_1"} and fast["num_pairs"] == 2
    assert fast["accuracy"] == pytest.approx(sum(fast["by_uid"].values()) / 2)
    # full_eval and fast_eval share UIDs: the top level names them by task
    assert "blimp_fast/adjunct_island" in results["by_uid"] and "supplement_filtered/hypernym" in results["by_uid"]
    assert results["task_of_uid"]["blimp_fast/adjunct_island"] == "blimp_fast"
    table = format_table(results)
    assert "supplement_fast" in table and "(mean over UIDs)" in table and "syntax/semantics" in table
    flat = flatten_results(results)
    assert flat["blimp/task/blimp_fast"] == fast["accuracy"] and flat["blimp/ties"] == results["ties"]
    assert flat["blimp/uid/blimp_fast/adjunct_island"] == fast["by_uid"]["adjunct_island"]


def test_entry_point_tie_policy_official(tiny_config, tiny_tokenizer, tmp_path, capsys, monkeypatch):
    from ltgbert import LtgBertForMaskedLM

    torch.manual_seed(0)
    model_dir = tmp_path / "tiny"
    LtgBertForMaskedLM(tiny_config).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    fast_eval = make_evaluation_data(tmp_path) / "fast_eval"
    # "zzz" / "qqq" are [UNK] for the tiny tokenizer: one pair that can only tie
    write_jsonl(
        fast_eval / "supplement_fast" / "turn_taking.jsonl",
        [
            {"sentence_good": "the dog zzz .", "sentence_bad": "the dog qqq ."},
            {"sentence_good": "the girls see themselves .", "sentence_bad": "the girls see herself ."},
        ],
    )
    evaluate = load_entry_point(monkeypatch)
    out = {}
    for policy in ("strict", "official"):
        assert (
            evaluate.cli(
                [
                    "--model_name_or_path",
                    str(model_dir),
                    "--blimp_dir",
                    str(fast_eval),
                    "--device",
                    "cpu",
                    "--tie_policy",
                    policy,
                    "--output_file",
                    str(tmp_path / f"{policy}.json"),
                ]
            )
            == 0
        )
        out[policy] = json.loads((tmp_path / f"{policy}.json").read_text())
    stdout = capsys.readouterr().out
    assert "ties counted wrong (strict)" in stdout and "ties counted right (official)" in stdout
    strict, official = out["strict"], out["official"]
    assert official["tie_policy"] == "official" and official["args"]["tie_policy"] == "official"
    assert strict["ties"] == official["ties"] >= 1 and official["ties_by_uid"]["turn_taking"] >= 1
    assert set(official["tasks"]) == {"blimp_fast", "supplement_fast"}
    for uid, ties in official["ties_by_uid"].items():  # official = strict + the ties, UID by UID
        n = official["pairs_by_uid"][uid]
        assert official["by_uid"][uid] == pytest.approx(strict["by_uid"][uid] + ties / n)


def test_entry_point_on_hplt_layout_and_hub_id(tmp_path, capsys, monkeypatch):
    # a published LTG-BERT checkpoint (pytorch_model.bin under the published names, config.json with auto_map and
    # no model_type, remote-code files that raise if run) loads into our classes without --trust_remote_code
    from hplt_layout import add_to_hub_cache, code_ran, make_hplt_checkpoint, use_hub_cache

    from ltgbert import LtgBertForMaskedLM

    path, source = make_hplt_checkpoint(tmp_path / "hplt")
    evaluate = load_entry_point(monkeypatch)
    model, tok = evaluate.load_model_and_tokenizer(evaluate.EvaluateArguments(model_name_or_path=str(path)))
    assert isinstance(model, LtgBertForMaskedLM) and model.dtype == torch.float32
    sentences = ["the dog sees the cat .", "these girls like themselves"]
    assert score_sentences(model, tok, sentences) == pytest.approx(score_sentences(source, tok, sentences), abs=1e-5)

    fast_eval = make_evaluation_data(tmp_path) / "fast_eval"
    snapshot = add_to_hub_cache(use_hub_cache(monkeypatch, tmp_path / "hub"), "hplt/tiny-ltgbert", path)
    for name, out in ((str(path), tmp_path / "dir.json"), ("hplt/tiny-ltgbert", tmp_path / "hub.json")):
        assert (
            evaluate.cli(
                [
                    "--model_name_or_path",
                    name,
                    "--blimp_dir",
                    str(fast_eval),
                    "--device",
                    "cpu",
                    "--output_file",
                    str(out),
                ]
            )
            == 0
        ), capsys.readouterr().err
    by_dir, by_id = (json.loads((tmp_path / f).read_text()) for f in ("dir.json", "hub.json"))
    assert by_dir["by_uid"] == by_id["by_uid"] and by_dir["num_pairs"] == 4
    assert not code_ran(path) and not code_ran(snapshot)
