"""ltgbert.tasks: reading local files, label inference and encoding, padding, length-grouped batches."""

import json

import numpy as np
import pytest
import torch

from ltgbert.errors import UserError
from ltgbert.tasks import (
    GLUE_TASKS,
    DynamicPaddingCollator,
    LengthGroupedBatchSampler,
    build_label_info,
    encode_split,
    load_task,
    read_table,
    write_predictions,
)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def task_from_rows(tmp_path, train, validation=None, test=None, **kwargs):
    files = {"train_file": write_jsonl(tmp_path / "train.jsonl", train)}
    if validation is not None:
        files["validation_file"] = write_jsonl(tmp_path / "validation.jsonl", validation)
    if test is not None:
        files["test_file"] = write_jsonl(tmp_path / "test.jsonl", test)
    return load_task(**files, **kwargs)


def rows(labels, text="the dog runs"):
    return [{"sentence": f"{text} {i}", "label": y} for i, y in enumerate(labels)]


@pytest.mark.parametrize(
    "train, problem, names",
    [
        ([0, 1, 1, 0], "binary", ["0", "1"]),
        (["b", "a", "c", "a"], "multiclass", ["a", "b", "c"]),
        ([["x"], ["y", "x"], []], "multilabel", ["x", "y"]),
        ([0.5, 1, 2.25], "regression", []),
    ],
)
def test_problem_type_inferred(tmp_path, train, problem, names):
    info = build_label_info(task_from_rows(tmp_path, rows(train)))
    assert info.problem_type == problem and info.names == names
    assert info.num_labels == (1 if problem == "regression" else len(names))


def test_label_encoding_and_decoding(tmp_path):
    info = build_label_info(task_from_rows(tmp_path, rows([["x"], ["y", "x"], []])))
    assert info.encode(["y"], "r") == [0.0, 1.0] and info.decode([1, 1]) == ["x", "y"]
    info = build_label_info(task_from_rows(tmp_path, rows(["pos", "neg"])))
    assert info.encode("pos", "r") == 1 and info.decode(0) == "neg"
    assert info.id2label == {0: "neg", 1: "pos"} and info.hf_problem_type == "single_label_classification"


def test_label_errors(tmp_path):
    with pytest.raises(UserError, match="outside 0..1"):
        build_label_info(task_from_rows(tmp_path, rows([0, 1, 2])), num_labels=2)
    task = task_from_rows(tmp_path, rows(["a", "b"]), test=rows(["a", "zzz"]))
    info = build_label_info(task)
    with pytest.raises(UserError, match="'zzz' is not one of"):
        encode_split(task.splits["test"], info, lambda *a, **k: {"input_ids": []}, 8)
    with pytest.raises(UserError, match="mixes label types"):
        build_label_info(task_from_rows(tmp_path, rows([0, "a"])))
    with pytest.raises(UserError, match="binary needs 2"):
        build_label_info(task_from_rows(tmp_path, rows([0, 1, 2])), problem_type="binary")
    with pytest.raises(UserError, match="regression needs numeric"):
        build_label_info(task_from_rows(tmp_path, rows(["a", "b"])), problem_type="regression")
    with pytest.raises(UserError, match="unknown problem type"):
        build_label_info(task_from_rows(tmp_path, rows([0, 1])), problem_type="ordinal")


def test_split_errors(tmp_path):
    with pytest.raises(UserError, match="label column 'gold' not found"):
        task_from_rows(tmp_path, rows([0, 1]), label_column="gold")
    with pytest.raises(UserError, match="text column 'premise' not found"):
        task_from_rows(tmp_path, rows([0, 1]), text_columns=["premise"])
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match="validation split .* has no rows"):
        load_task(train_file=write_jsonl(tmp_path / "t.jsonl", rows([0, 1])), validation_file=str(tmp_path / "empty.jsonl"))
    with pytest.raises(UserError, match="unknown task 'glue_sst'"):
        load_task("glue_sst")
    with pytest.raises(UserError, match="row 2 has no label"):
        task_from_rows(tmp_path, [{"sentence": "a", "label": 1}, {"sentence": "b"}])
    (tmp_path / "bad.jsonl").write_bytes(b'{"sentence": "caf\xe9", "label": 1}\n')
    with pytest.raises(UserError, match="not UTF-8"):
        read_table(tmp_path / "bad.jsonl")
    (tmp_path / "bad2.jsonl").write_text('{"sentence": "a", "label": 1}\n{"sentence": \n')
    with pytest.raises(UserError, match="line 2 is not valid JSON"):
        read_table(tmp_path / "bad2.jsonl")


def test_test_split_without_labels_is_predict_only(tmp_path):
    task = task_from_rows(tmp_path, rows([0, 1]), test=[{"sentence": "a cat"}, {"sentence": "a dog"}])
    assert task.splits["test"].labels is None and len(task.splits["test"]) == 2


def test_csv_tsv_json_and_pairs(tmp_path):
    (tmp_path / "t.csv").write_text('premise,hypothesis,label\n"a, b",c,entail\nd,e,neutral\n')
    (tmp_path / "t.tsv").write_text('sentence1\tsentence2\tlabel\n"quoted\tx\t1\ny\tz\t0\n')
    (tmp_path / "t.json").write_text(json.dumps(rows([1.5, 2.5])))
    task = load_task(train_file=str(tmp_path / "t.csv"), text_columns=["premise", "hypothesis"])
    assert task.splits["train"].texts == [["a, b", "d"], ["c", "e"]]
    assert task.splits["train"].labels == ["entail", "neutral"]
    task = load_task(train_file=str(tmp_path / "t.tsv"))  # sentence1/sentence2 found without --text_column
    assert task.text_columns == ("sentence1", "sentence2") and task.splits["train"].texts[0][0] == '"quoted'
    assert task.splits["train"].labels == [1, 0]  # numbers in csv/tsv are numbers
    assert build_label_info(load_task(train_file=str(tmp_path / "t.json"))).problem_type == "regression"


def test_glue_task_from_local_files_and_hub_path(tmp_path, monkeypatch):
    # GLUE columns, label names and metric, with local files (ids or names as labels; -1 = unlabelled test).
    train = [{"sentence1": "a", "sentence2": "b", "label": 0}, {"sentence1": "c", "sentence2": "d", "label": 1}]
    test = [{"sentence1": "e", "sentence2": "f", "label": -1}]
    task = load_task("rte", train_file=write_jsonl(tmp_path / "tr.jsonl", train),
                     test_file=write_jsonl(tmp_path / "te.jsonl", test))
    info = build_label_info(task)
    assert task.metric == "accuracy" and info.names == ["entailment", "not_entailment"]
    assert task.splits["test"].labels is None and info.decode(1) == "not_entailment"
    assert info.encode("entailment", "r") == 0 and info.encode(1, "r") == 1
    assert GLUE_TASKS["stsb"].label_names is None and GLUE_TASKS["mnli"].validation_split == "validation_matched"

    calls = []

    def fake_load_dataset(path, name, cache_dir=None):
        calls.append((path, name))
        raise ConnectionError("offline")

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(UserError, match="cannot load GLUE task 'cola'"):
        load_task("cola")
    assert calls == [("nyu-mll/glue", "cola")]


def test_encode_and_collate(tiny_tokenizer, tmp_path):
    task = task_from_rows(tmp_path, [{"sentence": "the dog runs", "label": ["a"]},
                                     {"sentence": "the big red dog sees the cats", "label": ["a", "b"]}])
    info = build_label_info(task)
    data = encode_split(task.splits["train"], info, tiny_tokenizer, max_seq_length=6)
    assert data.lengths.tolist() == [5, 6]  # [CLS] the dog run ##s [SEP]; the second truncated to 6
    batch = DynamicPaddingCollator(tiny_tokenizer.pad_token_id, info.problem_type)([data[1], data[0]])
    assert batch["input_ids"].shape == (2, 6) and batch["input_ids"][1, -1] == tiny_tokenizer.pad_token_id
    assert batch["attention_mask"].sum(1).tolist() == [6, 5] and batch["idx"].tolist() == [1, 0]
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [[1.0, 1.0], [1.0, 0.0]]
    padded = DynamicPaddingCollator(3, "binary", max_length=16)([{"input_ids": [1, 2], "idx": 0, "labels": 1}])
    assert padded["input_ids"].shape == (1, 16) and padded["labels"].dtype == torch.long


def test_length_grouped_batches():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 200, size=1003)
    sampler = LengthGroupedBatchSampler(lengths, batch_size=16, mega_batch_mult=8, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 63
    assert sorted(i for b in batches for i in b) == list(range(1003))  # every row once
    assert all(len(b) == 16 for b in batches[:-1]) and len(batches[-1]) == 1003 % 16  # short batch last
    assert lengths[batches[0]].max() == lengths.max()  # longest batch first
    # Grouped batches waste far less padding than random ones.
    def padding(bs):
        return sum(lengths[b].max() * len(b) - lengths[b].sum() for b in bs)
    random_batches = list(LengthGroupedBatchSampler(lengths, 16, group_by_length=False, seed=1))
    assert padding(batches) < 0.2 * padding(random_batches)
    # Seeded per epoch: same epoch, same order; another epoch, another order.
    assert list(LengthGroupedBatchSampler(lengths, 16, mega_batch_mult=8, seed=1)) == batches
    sampler.set_epoch(1)
    assert list(sampler) != batches


def test_write_predictions(tmp_path):
    write_predictions(tmp_path / "p.jsonl", ["neg", "pos"])
    assert [json.loads(x)["prediction"] for x in (tmp_path / "p.jsonl").read_text().splitlines()] == ["neg", "pos"]
    write_predictions(tmp_path / "p.tsv", [["x", "y"], []], fmt="tsv")
    assert (tmp_path / "p.tsv").read_text() == "index\tprediction\n0\tx,y\n1\t\n"
