"""A directory our writers produce runs in the official BabyLM evaluation pipeline, under its pinned
transformers 4.51.3 / tokenizers 0.21.1 and under the transformers 5.x we develop on.

The pipeline (babylm/evaluation-pipeline-2025) loads a model through its remote code alone:
``AutoProcessor.from_pretrained(path, padding_side="right", trust_remote_code=True)`` called with
``return_offsets_mapping=True`` (zero-shot) and on (A, B) pairs (fine-tuning), ``AutoModelForMaskedLM`` (zero-shot,
backend mlm) and ``AutoModel`` + ``config.hidden_size`` (fine-tuning takes ``last_hidden_state[:, 0]``). One
script makes those calls, plus every head the directory's ``auto_map`` names, in ONE subprocess per version:
the 4.51.3 one is the environment of .ci/compat_venv.sh (built here when missing, ltgbert not importable in
it); the 5.x one is this interpreter with ltgbert's import blocked. Its outputs are compared with the
in-memory tokenizer and model the directory was written from.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ltgbert import LtgBertConfig, LtgBertForMaskedLM
from ltgbert.tokenization import save_tokenizer, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
COMPAT_VENV_SCRIPT = ROOT / ".ci" / "compat_venv.sh"
SENTENCES = ["The dog walked over the river quickly.", "Unhappy birds talked, because Bergen is far!"]
PAIRS = [
    ["the dog walked over the river because a cat jumped", "a cat jumped over the dog quickly"],
    ["happiness", "the river"],
]
MAX_LENGTH = 12  # shorter than the first pair: truncation is part of the call
HEADS = {  # the Auto classes the pipeline or a downstream user may load, and how this script runs each
    "AutoModelForSequenceClassification": "sequence",
    "AutoModelForTokenClassification": "token",
    "AutoModelForQuestionAnswering": "span",
    "AutoModelForMultipleChoice": "choice",
}

PIPELINE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, importlib.util, json, sys
    from pathlib import Path

    ltgbert_importable = importlib.util.find_spec("ltgbert") is not None

    class BlockLtgbert(importlib.abc.MetaPathFinder):  # the pipeline's machines do not have it
        def find_spec(self, name, path=None, target=None):
            if name == "ltgbert" or name.startswith("ltgbert."):
                raise ImportError("ltgbert is not installed here")

    sys.meta_path.insert(0, BlockLtgbert())
    import torch
    import transformers
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoProcessor

    path, out = sys.argv[1], Path(sys.argv[2])
    inputs = json.loads((out / "inputs.json").read_text())
    report = {"transformers": transformers.__version__, "ltgbert_importable": ltgbert_importable}

    # sentence_zero_shot/dataset.py
    processor = AutoProcessor.from_pretrained(path, padding_side="right", revision=None, trust_remote_code=True)
    tokenizer = processor.tokenizer if hasattr(processor, "tokenizer") else processor
    report["processor"] = type(processor).__name__
    report["sentences"] = [dict(processor(text=s, return_offsets_mapping=True)) for s in inputs["sentences"]]
    report["special_ids"] = [tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id,
                             tokenizer.mask_token_id]
    # finetune/dataset.py collate_function
    pairs = [tuple(p) for p in inputs["pairs"]]
    encodings = tokenizer(pairs, return_tensors="pt", padding=True, truncation=True, max_length=inputs["max_length"])
    report["pairs"] = {k: v.tolist() for k, v in encodings.items()}

    ids, mask = torch.tensor(inputs["input_ids"]), torch.tensor(inputs["attention_mask"])
    tensors, classes = {}, {}
    with torch.no_grad():
        # sentence_zero_shot/run.py, backend mlm
        mlm = AutoModelForMaskedLM.from_pretrained(path, trust_remote_code=True, revision=None).eval()
        tensors["mlm_logits"] = mlm(input_ids=ids, attention_mask=mask).logits
        # finetune/classifier_model.py
        encoder = AutoModel.from_pretrained(path, trust_remote_code=True, revision=None).eval()
        tensors["last_hidden_state"] = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        config = AutoConfig.from_pretrained(path, trust_remote_code=True, revision=None)
        report["hidden_size"] = config.hidden_size
        classes["AutoModelForMaskedLM"], classes["AutoModel"] = type(mlm).__name__, type(encoder).__name__
        heads = {}
        for auto_name, kind in inputs["heads"].items():
            if auto_name not in config.auto_map:
                continue
            model = getattr(transformers, auto_name).from_pretrained(path, trust_remote_code=True, num_labels=3).eval()
            classes[auto_name] = type(model).__name__
            if kind == "sequence":
                output = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 2]))
            elif kind == "token":
                labels = torch.where(mask.bool(), ids % 3, torch.full_like(ids, -100))
                output = model(input_ids=ids, attention_mask=mask, labels=labels)
            elif kind == "span":
                output = model(input_ids=ids, attention_mask=mask, start_positions=torch.tensor([1, 2]),
                               end_positions=torch.tensor([3, 2]))
            else:  # [batch, choices, tokens]
                choices = lambda t: torch.stack([t, t.flip(0)], dim=1)
                output = model(input_ids=choices(ids), attention_mask=choices(mask), labels=torch.tensor([0, 1]))
            heads[auto_name] = {
                "shapes": {k: list(v.shape) for k, v in output.items() if k != "loss"},
                "loss_finite": bool(torch.isfinite(output.loss)),
            }
        report["heads"] = heads
    report["classes"] = classes
    report["modules"] = sorted({type(m).__module__.split(".")[0] for m in (mlm, encoder)})
    torch.save(tensors, out / "tensors.pt")
    (out / "report.json").write_text(json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny MLM saved the way our writers save it: save_pretrained + save_tokenizer (what pretraining's final/
    and chck_*M, fine-tuning's best/ and export write)."""
    root = tmp_path_factory.mktemp("compat")
    words = (
        "the dog cat bird walk walked talk talked jump jumped happy unhappy happiness river Bergen over "
        "because quickly far is a"
    ).split()
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(9)) + "." for i in range(200)))
    tokenizer = train_tokenizer([corpus], vocab_size=100, min_frequency=1)
    config = LtgBertConfig.from_preset(
        "tiny",
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        max_position_embeddings=64,
        position_bucket_size=8,
    )
    torch.manual_seed(0)
    model = LtgBertForMaskedLM(config).eval()
    path = root / "final"
    model.save_pretrained(path)
    save_tokenizer(tokenizer, path)
    return path, model, tokenizer


@pytest.fixture(scope="module")
def compat_python():
    """The 4.51.3 environment's interpreter; .ci/compat_venv.sh builds it once (about 80 s, from PyPI)."""
    env = {**os.environ, "PYTHON": sys.executable}  # the torch to reuse is this interpreter's
    result = subprocess.run(["bash", str(COMPAT_VENV_SCRIPT)], capture_output=True, text=True, env=env, timeout=1200)
    if result.returncode != 0:
        pytest.fail(f"bash {COMPAT_VENV_SCRIPT.relative_to(ROOT)} failed:\n{result.stderr[-3000:]}")
    return result.stdout.strip().splitlines()[-1]


def run_pipeline_calls(python: str, checkpoint_dir: Path, inputs: dict, work: Path):
    work.mkdir()
    (work / "inputs.json").write_text(json.dumps(inputs))
    script = work / "pipeline_calls.py"
    script.write_text(PIPELINE_SCRIPT)
    env = {**os.environ, "HF_MODULES_CACHE": str(work / "modules"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    # -I: neither this checkout (the working directory) nor PYTHONPATH is on the path
    result = subprocess.run(
        [python, "-I", str(script), str(checkpoint_dir), str(work)],
        capture_output=True,
        text=True,
        cwd=work,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((work / "report.json").read_text()), torch.load(work / "tensors.pt", weights_only=True)


@pytest.mark.parametrize("version", ["4.51.3", "5.x"])
def test_babylm_pipeline_calls_load_and_match(version, checkpoint, tmp_path, request):
    path, model, tokenizer = checkpoint
    python = request.getfixturevalue("compat_python") if version == "4.51.3" else sys.executable
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    inputs = {
        "sentences": SENTENCES,
        "pairs": PAIRS,
        "max_length": MAX_LENGTH,
        "heads": HEADS,
        "input_ids": batch["input_ids"].tolist(),
        "attention_mask": batch["attention_mask"].tolist(),
    }
    report, tensors = run_pipeline_calls(python, path, inputs, tmp_path / "run")

    if version == "4.51.3":
        assert report["transformers"] == "4.51.3" and not report["ltgbert_importable"]
    assert report["modules"] == ["transformers_modules"]  # the directory's own code, not an installed package
    assert report["processor"] in ("PreTrainedTokenizerFast", "TokenizersBackend")  # the tokenizer is the processor
    assert report["special_ids"] == [1, 2, 3, 4]

    # tokenization as the pipeline calls it: the same ids as ours, specials at (0, 0), pairs [CLS] A [SEP] B [SEP]
    for sentence, encoded in zip(SENTENCES, report["sentences"]):
        ours = tokenizer(sentence, return_offsets_mapping=True)
        assert encoded["input_ids"] == ours["input_ids"] and set(encoded) == set(ours)
        assert [tuple(o) for o in encoded["offset_mapping"]] == ours["offset_mapping"]
        assert tuple(encoded["offset_mapping"][0]) == tuple(encoded["offset_mapping"][-1]) == (0, 0)
        assert encoded["offset_mapping"][-2][1] == len(sentence)
    ours = tokenizer([tuple(p) for p in PAIRS], padding=True, truncation=True, max_length=MAX_LENGTH)
    assert report["pairs"] == {k: ours[k] for k in ("input_ids", "attention_mask")}
    truncated, short = report["pairs"]["input_ids"]
    assert len(truncated) == MAX_LENGTH and truncated[0] == 1 and truncated.count(2) == 2 and truncated[-1] == 2
    a, b = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in PAIRS[1])
    assert short[: len(a) + len(b) + 3] == [1, *a, 2, *b, 2] and set(short[len(a) + len(b) + 3 :]) <= {3}

    # models: the saved weights give the in-memory model's outputs at every real token
    keep = batch["attention_mask"].bool()
    with torch.no_grad():
        expected_logits = model(**batch).logits
        expected_hidden = model.ltgbert(**batch).last_hidden_state
    torch.testing.assert_close(tensors["mlm_logits"][keep], expected_logits[keep], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tensors["last_hidden_state"][keep], expected_hidden[keep], atol=1e-5, rtol=1e-5)
    assert report["hidden_size"] == model.config.hidden_size

    # heads: the directory's auto_map names every head (a pretrained final/ fine-tunes as any of them), and each
    # loads, runs and gives a finite loss
    auto_map = json.loads((path / "config.json").read_text())["auto_map"]
    assert set(HEADS) <= set(auto_map) and set(report["heads"]) == set(HEADS)
    batch_size, length = batch["input_ids"].shape
    expected_shapes = {
        "AutoModelForSequenceClassification": {"logits": [batch_size, 3]},
        "AutoModelForTokenClassification": {"logits": [batch_size, length, 3]},
        "AutoModelForQuestionAnswering": {"start_logits": [batch_size, length], "end_logits": [batch_size, length]},
        "AutoModelForMultipleChoice": {"logits": [batch_size, 2]},
    }
    for name, result in report["heads"].items():
        assert result["loss_finite"], name
        assert {k: v for k, v in result["shapes"].items() if k in expected_shapes[name]} == expected_shapes[name]
