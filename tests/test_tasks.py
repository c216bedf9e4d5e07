"""ltgbert.tasks: reading local files, label inference and encoding, padding, length-grouped batches."""

import json

import numpy as np
import pytest
import torch

from ltgbert.errors import UserError
from ltgbert.metrics import METRIC_NAMES, compute_metrics
from ltgbert.tasks import (
    GLUE_TASKS,
    DynamicPaddingCollator,
    build_label_info,
    encode_split,
    load_task,
    parse_label_cell,
    read_table,
    split_role,
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
        load_task(
            train_file=write_jsonl(tmp_path / "t.jsonl", rows([0, 1])), validation_file=str(tmp_path / "empty.jsonl")
        )
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
    assert task.splits["train"].labels == [1, 0]  # label cells that are numbers are numbers
    assert build_label_info(load_task(train_file=str(tmp_path / "t.json"))).problem_type == "regression"


def test_glue_task_from_local_files_and_hub_path(tmp_path, monkeypatch):
    # GLUE columns, label names and metric, with local files (ids or names as labels; -1 = unlabelled test).
    train = [{"sentence1": "a", "sentence2": "b", "label": 0}, {"sentence1": "c", "sentence2": "d", "label": 1}]
    test = [{"sentence1": "e", "sentence2": "f", "label": -1}]
    task = load_task(
        "rte", train_file=write_jsonl(tmp_path / "tr.jsonl", train), test_file=write_jsonl(tmp_path / "te.jsonl", test)
    )
    info = build_label_info(task)
    assert task.metric == "accuracy" and info.names == ["entailment", "not_entailment"]
    assert task.splits["test"].labels is None and info.decode(1) == "not_entailment"
    assert info.encode("entailment", "r") == 0 and info.encode(1, "r") == 1
    assert GLUE_TASKS["stsb"].label_names is None
    assert dict(GLUE_TASKS["mnli"].splits)["validation_mismatched"] == "validation_mismatched"

    calls = []

    def fake_load_dataset(path, name, cache_dir=None):  # the Hub, offline
        calls.append((path, name))
        raise ConnectionError("offline")

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(UserError, match="cannot load GLUE task 'cola'"):
        load_task("cola")
    assert calls == [("nyu-mll/glue", "cola")]


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_csv_text_columns_stay_strings(tmp_path, suffix):
    # Cells that look like numbers are text in text columns; only the label column is converted.
    sep = "," if suffix == ".csv" else "\t"
    lines = [["sentence", "code", "label"], ["007", "1_000", "1"], [" 12 ", "1e3", " 0 "], ["", "x", "1"]]
    path = tmp_path / f"t{suffix}"
    path.write_text("".join(sep.join(cells) + "\n" for cells in lines))
    task = load_task(train_file=str(path), text_columns=["sentence", "code"])
    assert task.splits["train"].texts == [["007", " 12 ", ""], ["1_000", "1e3", "x"]]  # "" is an empty text
    assert task.splits["train"].labels == [1, 0, 1]
    assert build_label_info(task).problem_type == "binary"
    assert read_table(path)[0] == {"sentence": "007", "code": "1_000", "label": "1"}  # no label column: all text
    (tmp_path / f"bad{suffix}").write_text(f"sentence{sep}label\na{sep}1{sep}extra\n")
    with pytest.raises(UserError, match="line 2 has more cells than the header"):
        load_task(train_file=str(tmp_path / f"bad{suffix}"))


def test_label_cells_are_numbers_only_as_json_writes_them():
    cases = {
        "1": 1,
        " 12 ": 12,
        "-1": -1,
        "+1": 1,
        "0.5": 0.5,
        "1e3": 1000.0,
        "007": "007",
        "1_000": "1_000",
        "nan": "nan",
        "0x1f": "0x1f",
        "pos": "pos",
        " pos": " pos",
        "": None,
        None: None,
    }
    got = {cell: parse_label_cell(cell) for cell in cases}
    assert got == cases and all(type(got[c]) is type(v) for c, v in cases.items())
    # string labels read from csv and classified: "007" and "7" are two classes, not one
    assert parse_label_cell("007") != parse_label_cell("7")


def test_split_roles_and_extra_files(tmp_path):
    assert [split_role(n) for n in ("train", "validation", "validation_mismatched", "test", "test_matched")] == [
        "train",
        "validation",
        "validation",
        "test",
        "test",
    ]
    with pytest.raises(ValueError):
        split_role("dev")
    train = write_jsonl(tmp_path / "tr.jsonl", rows([0, 1]))
    task = load_task(
        train_file=train,
        validation_file=train,
        extra_files={"validation_other": train, "test_other": write_jsonl(tmp_path / "te.jsonl", [{"sentence": "x"}])},
    )
    assert set(task.splits) == {"train", "validation", "validation_other", "test_other"}
    assert task.splits["test_other"].labels is None and task.splits["validation_other"].labels == [0, 1]
    with pytest.raises(UserError, match="validation_<name> or test_<name>"):
        load_task(train_file=train, extra_files={"dev": train})
    with pytest.raises(UserError, match="label column 'label' not found"):  # extra validation splits need labels
        load_task(train_file=train, extra_files={"validation_x": str(tmp_path / "te.jsonl")})


# ----------------------------------------------------------------------------------------------------------
# GLUE through datasets, on local copies in datasets' own formats

GLUE_OFFICIAL = {
    "cola": {"matthews_correlation"},
    "sst2": {"accuracy"},
    "mrpc": {"accuracy", "f1"},
    "qqp": {"accuracy", "f1"},
    "stsb": {"pearson", "spearmanr"},
    "mnli": {"accuracy"},
    "qnli": {"accuracy"},
    "rte": {"accuracy"},
    "wnli": {"accuracy"},
}


def test_glue_official_metrics_table():
    assert {name: set(t.metrics) for name, t in GLUE_TASKS.items()} == GLUE_OFFICIAL
    for name, t in GLUE_TASKS.items():
        problem = "regression" if t.label_names is None else "binary" if len(t.label_names) == 2 else "multiclass"
        assert t.metric in t.metrics and set(t.metrics) <= set(METRIC_NAMES[problem]), name
    assert [s for s, _ in GLUE_TASKS["mnli"].splits] == [
        "train",
        "validation",
        "validation_mismatched",
        "test",
        "test_mismatched",
    ]


def glue_dataset_dict(task, splits, label_names=None, n=6):
    """A DatasetDict with GLUE's columns and features: ClassLabel labels, or floats for stsb; test rows -1."""
    import datasets

    glue = GLUE_TASKS[task]
    label = (
        datasets.Value("float32")
        if glue.label_names is None
        else datasets.ClassLabel(names=list(label_names or glue.label_names))
    )
    features = datasets.Features(
        {**{c: datasets.Value("string") for c in glue.text_columns}, "label": label, "idx": datasets.Value("int32")}
    )

    def part(split):
        values = [(i * 0.7) % 5 if glue.label_names is None else i % len(glue.label_names) for i in range(n)]
        return datasets.Dataset.from_dict(
            {
                **{c: [f"{split} {c} {i}" for i in range(n)] for c in glue.text_columns},
                "label": [-1] * n if split.startswith("test") and glue.label_names else values,
                "idx": list(range(n)),
            },
            features=features,
        )

    return datasets.DatasetDict({s: part(s) for s in splits})


def hub_download(root, task, dd):
    """The layout of `huggingface-cli download nyu-mll/glue --repo-type dataset --local-dir root`."""
    (root / task).mkdir(parents=True)
    configs = []
    for split, part in dd.items():
        part.to_parquet(str(root / task / f"{split}-00000-of-00001.parquet"))
        configs.append(f"  - split: {split}\n    path: {task}/{split}-*\n")
    (root / "README.md").write_text(f"---\nconfigs:\n- config_name: {task}\n  data_files:\n{''.join(configs)}---\n")


MNLI_SPLITS = ["train", "validation_matched", "validation_mismatched", "test_matched", "test_mismatched"]


@pytest.mark.parametrize("layout", ["save_to_disk", "hub_download"])
def test_glue_mnli_from_local_datasets_copy(tmp_path, layout):
    dd = glue_dataset_dict("mnli", MNLI_SPLITS)
    root = tmp_path / "glue"
    if layout == "save_to_disk":
        dd.save_to_disk(str(root / "mnli"))  # one root for all tasks: <root>/<task>/
    else:
        hub_download(root, "mnli", dd)
    task = load_task("mnli", dataset_name=str(root), cache_dir=str(tmp_path / "cache"))
    assert list(task.splits) == ["train", "validation", "validation_mismatched", "test", "test_mismatched"]
    assert task.splits["validation"].texts[0][0] == "validation_matched premise 0"
    assert task.splits["validation_mismatched"].texts[1][2] == "validation_mismatched hypothesis 2"
    assert task.splits["test"].labels is None and task.splits["test_mismatched"].labels is None
    info = build_label_info(task)
    assert info.problem_type == "multiclass" and info.names == ["entailment", "neutral", "contradiction"]
    assert [info.encode(v, "r") for v in task.splits["validation_mismatched"].labels] == [0, 1, 2, 0, 1, 2]
    assert info.decode(2) == "contradiction" and task.metric == "accuracy" and task.metrics == ("accuracy",)
    labels = np.array([info.encode(v, "r") for v in task.splits["validation_mismatched"].labels])
    wrong_once = np.eye(3)[np.where(np.arange(6) == 5, 0, labels)]
    metrics = compute_metrics(info.problem_type, wrong_once, labels)
    assert set(task.metrics) <= set(metrics) and metrics["accuracy"] == pytest.approx(5 / 6)


def test_glue_regression_and_binary_from_local_copies(tmp_path):
    stsb = tmp_path / "stsb"
    glue_dataset_dict("stsb", ["train", "validation", "test"]).save_to_disk(str(stsb))  # the task's own dir
    task = load_task("stsb", dataset_name=str(stsb))
    info = build_label_info(task)
    assert info.problem_type == "regression" and task.metrics == ("pearson", "spearmanr")
    assert task.splits["validation"].labels[1] == pytest.approx(0.7) and task.splits["test"].labels is not None
    scores = np.array(task.splits["validation"].labels) + 0.1
    assert set(task.metrics) <= set(compute_metrics("regression", scores, np.array(task.splits["validation"].labels)))

    root = tmp_path / "hub"
    hub_download(root, "mrpc", glue_dataset_dict("mrpc", ["train", "validation", "test"]))
    task = load_task("mrpc", dataset_name=str(root), cache_dir=str(tmp_path / "cache"))
    info = build_label_info(task)
    assert info.names == ["not_equivalent", "equivalent"] and task.text_columns == ("sentence1", "sentence2")
    assert task.metric == "f1" and task.metrics == ("accuracy", "f1") and task.splits["test"].labels is None


def test_glue_local_copy_errors(tmp_path):
    glue_dataset_dict("rte", ["train", "validation"], label_names=["not_entailment", "entailment"]).save_to_disk(
        str(tmp_path / "swapped" / "rte")
    )
    with pytest.raises(UserError, match="names its labels .* GLUE's are"):
        load_task("rte", dataset_name=str(tmp_path / "swapped"))
    # an MNLI copy whose validation splits were merged into one can't give matched and mismatched
    glue_dataset_dict("mnli", ["train", "validation"]).save_to_disk(str(tmp_path / "merged"))
    with pytest.raises(UserError, match="no 'validation_matched' split"):
        load_task("mnli", dataset_name=str(tmp_path / "merged"))
    (tmp_path / "plain" / "cola").mkdir(parents=True)
    with pytest.raises(UserError, match="neither a DatasetDict.save_to_disk directory"):
        load_task("cola", dataset_name=str(tmp_path / "plain"))


def test_encode_and_collate(tiny_tokenizer, tmp_path):
    task = task_from_rows(
        tmp_path,
        [
            {"sentence": "the dog runs", "label": ["a"]},
            {"sentence": "the big red dog sees the cats", "label": ["a", "b"]},
        ],
    )
    info = build_label_info(task)
    data = encode_split(task.splits["train"], info, tiny_tokenizer, max_seq_length=6)
    assert data.lengths.tolist() == [5, 6]  # [CLS] the dog run ##s [SEP]; the second truncated to 6
    batch = DynamicPaddingCollator(tiny_tokenizer.pad_token_id, info.problem_type)([data[1], data[0]])
    assert batch["input_ids"].shape == (2, 6) and batch["input_ids"][1, -1] == tiny_tokenizer.pad_token_id
    assert batch["attention_mask"].sum(1).tolist() == [6, 5] and batch["idx"].tolist() == [1, 0]
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [[1.0, 1.0], [1.0, 0.0]]
    padded = DynamicPaddingCollator(3, "binary", max_length=16)([{"input_ids": [1, 2], "idx": 0, "labels": 1}])
    assert padded["input_ids"].shape == (1, 16) and padded["labels"].dtype == torch.long


def test_write_predictions(tmp_path):
    write_predictions(tmp_path / "p.jsonl", ["neg", "pos"])
    assert [json.loads(x)["prediction"] for x in (tmp_path / "p.jsonl").read_text().splitlines()] == ["neg", "pos"]
    write_predictions(tmp_path / "p.tsv", [["x", "y"], []], fmt="tsv")
    assert (tmp_path / "p.tsv").read_text() == "index\tprediction\n0\tx,y\n1\t\n"
