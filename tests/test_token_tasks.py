"""ltgbert.token_tasks: tagged sentences from jsonl and CoNLL files, first-subword labels, tags back out."""

import json

import numpy as np
import pytest
import torch

from ltgbert.batching import length_grouped_order
from ltgbert.errors import UserError
from ltgbert.metrics import token_metrics
from ltgbert.token_tasks import (
    TokenPaddingCollator,
    TokenSplit,
    TokenTaskData,
    build_token_label_info,
    decode_token_predictions,
    encode_token_split,
    is_token_task,
    load_token_task,
    read_token_file,
    write_token_predictions,
)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def task_of(train_tags, **splits):
    """A task from tag lists (tokens are w0 w1 ...); splits name=tag lists."""

    def split(name, tags):
        return TokenSplit(name, [[f"w{i}" for i in range(len(t))] for t in tags], tags)

    return TokenTaskData("custom", {"train": split("train", train_tags), **{k: split(k, v) for k, v in splits.items()}})


# ----------------------------------------------------------------------------------------------------------
# sources


def test_jsonl_columns_integer_tags_and_errors(tmp_path):
    rows = [{"words": ["Ann", "runs"], "ner": ["B-PER", "O"]}, {"words": ["Oslo"], "ner": ["B-LOC"]}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    assert read_token_file(path, "words", "ner") == ([["Ann", "runs"], ["Oslo"]], [["B-PER", "O"], ["B-LOC"]])
    ids = write_jsonl(tmp_path / "ids.jsonl", [{"tokens": ["Ann", "runs"], "tags": [1, 0]}])
    assert read_token_file(ids, label_names=["O", "B-PER"])[1] == [["B-PER", "O"]]  # HF-style ner_tags ids
    assert read_token_file(write_jsonl(tmp_path / "u.jsonl", [{"tokens": ["a"]}]))[1] is None  # untagged

    errors = {
        "has 2 tokens but 1 tags": [{"tokens": ["a", "b"], "tags": ["O"]}],
        "'tokens' is not a list of strings": [{"tokens": "a b", "tags": ["O", "O"]}],
        "'tags' is not a list of tags": [{"tokens": ["a"], "tags": ["O"]}, {"tokens": ["b"]}],
        "sentence 1 has no tokens": [{"tokens": [], "tags": []}],
    }
    for message, bad_rows in errors.items():
        with pytest.raises(UserError, match=message):
            read_token_file(write_jsonl(tmp_path / "bad.jsonl", bad_rows))
    with pytest.raises(UserError, match="integer tags; pass --label_names"):
        read_token_file(ids)
    with pytest.raises(UserError, match="tag id 1 is outside 0..0"):
        read_token_file(ids, label_names=["O"])
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match="holds no sentences"):
        read_token_file(tmp_path / "empty.jsonl")
    with pytest.raises(UserError, match="unsupported file type .csv"):
        read_token_file(tmp_path / "t.csv")


def test_conll_files(tmp_path):
    conll = (
        "-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\n\n"
        "Peter NNP B-NP B-PER\nBlackburn NNP I-NP I-PER\n\n-DOCSTART- -X- -X- O\n\nBRUSSELS NNP B-NP B-LOC\n"
    )
    (tmp_path / "train.conll").write_text(conll)
    tokens, tags = read_token_file(tmp_path / "train.conll")
    assert tokens == [["EU", "rejects"], ["Peter", "Blackburn"], ["BRUSSELS"]]
    assert tags == [["B-ORG", "O"], ["B-PER", "I-PER"], ["B-LOC"]]  # the last column
    assert read_token_file(tmp_path / "train.conll", tag_column=1)[1][0] == ["NNP", "VBZ"]  # POS column
    (tmp_path / "test.txt").write_text("EU\nrejects\n\nPeter\n")  # tokens only: a prediction file
    assert read_token_file(tmp_path / "test.txt") == ([["EU", "rejects"], ["Peter"]], None)
    (tmp_path / "crlf.iob").write_bytes(b"EU\tB-ORG\r\nrejects\tO\r\n\r\nPeter\tB-PER\r\n")
    assert read_token_file(tmp_path / "crlf.iob")[1] == [["B-ORG", "O"], ["B-PER"]]
    (tmp_path / "ragged.conll").write_text("EU NNP B-ORG\nrejects O\n")
    with pytest.raises(UserError, match="line 2 has 2 columns, line 1 has 3"):
        read_token_file(tmp_path / "ragged.conll")
    with pytest.raises(UserError, match="no tag column 5"):
        read_token_file(tmp_path / "train.conll", tag_column=5)
    (tmp_path / "docs.conll").write_text("-DOCSTART- -X- O\n\n")
    with pytest.raises(UserError, match="holds no sentences"):
        read_token_file(tmp_path / "docs.conll")
    (tmp_path / "bad.conll").write_bytes(b"caf\xe9 O\n")
    with pytest.raises(UserError, match="not UTF-8"):
        read_token_file(tmp_path / "bad.conll")


def test_conllu_form_and_upos(tmp_path):
    rows = [
        "# sent_id = 1",
        "# text = Don't go.",
        "1-2\tDon't\t_\t_\t_\t_\t_\t_\t_\t_",
        "1\tDo\tdo\tAUX\tVBP\t_\t3\taux\t_\t_",
        "2\tn't\tnot\tPART\tRB\t_\t3\tadvmod\t_\t_",
        "3\tgo\tgo\tVERB\tVB\t_\t0\troot\t_\t_",
        "3.1\tgone\tgo\tVERB\tVBN\t_\t_\t_\t_\t_",
        "4\t.\t.\tPUNCT\t.\t_\t3\tpunct\t_\t_",
        "",
        "1\tNew York\tNew York\tPROPN\tNNP\t_\t0\troot\t_\t_",
        "",
    ]
    (tmp_path / "t.conllu").write_text("\n".join(rows) + "\n")
    tokens, tags = read_token_file(tmp_path / "t.conllu")
    assert tokens == [["Do", "n't", "go", "."], ["New York"]]  # ranges and empty nodes skipped, FORM kept whole
    assert tags == [["AUX", "PART", "VERB", "PUNCT"], ["PROPN"]]
    assert read_token_file(tmp_path / "t.conllu", tag_column=4)[1][1] == ["NNP"]  # XPOS


def test_is_token_task(tmp_path):
    ner = write_jsonl(tmp_path / "ner.jsonl", [{"tokens": ["a"], "tags": ["O"]}])
    seq = write_jsonl(tmp_path / "seq.jsonl", [{"sentence": "a", "label": 1}])
    (tmp_path / "arr.json").write_text(json.dumps([{"tokens": ["a"], "tags": ["O"]}]))
    assert is_token_task("demo_pos") and is_token_task("demo_entities") and not is_token_task("demo_topic")
    assert not is_token_task("rte") and not is_token_task("demo")
    assert is_token_task(train_file=ner) and is_token_task(train_file=str(tmp_path / "arr.json"))
    assert not is_token_task(train_file=seq) and not is_token_task(train_file=str(tmp_path / "x.csv"))
    assert is_token_task(train_file=str(tmp_path / "train.conll")) and is_token_task(problem_type="ner")
    assert not is_token_task(train_file=write_jsonl(tmp_path / "w.jsonl", [{"words": ["a"], "tags": ["O"]}]))
    assert is_token_task(train_file=str(tmp_path / "w.jsonl"), tokens_column="words")


def test_load_token_task_splits_and_errors(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"tokens": ["Ann", "runs"], "tags": ["B-PER", "O"]}])
    (tmp_path / "dev.conll").write_text("Ann B-PER\n")
    (tmp_path / "test.txt").write_text("Ann\n")
    task = load_token_task(
        train_file=train,
        validation_file=str(tmp_path / "dev.conll"),
        test_file=str(tmp_path / "test.txt"),
        extra_files={"test_other": train},
    )
    assert list(task.splits) == ["train", "validation", "test", "test_other"] and task.problem_type == "token"
    assert task.splits["test"].tags is None and task.splits["test_other"].tags == [["B-PER", "O"]]
    with pytest.raises(UserError, match="validation file .* has no tags"):
        load_token_task(train_file=train, validation_file=str(tmp_path / "test.txt"))
    with pytest.raises(UserError, match="unknown token-classification task 'conll2003'"):
        load_token_task("conll2003")
    with pytest.raises(UserError, match="no training data"):
        load_token_task()


# ----------------------------------------------------------------------------------------------------------
# labels


def test_label_info_order_scheme_and_fill_tag():
    info = build_token_label_info(task_of([["B-PER", "I-PER", "O", "B-LOC"], ["I-LOC"]]))
    assert info.names == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"] and info.scheme == "bio"
    assert info.fill_tag == "O" and info.id2label[3] == "B-PER" and info.label2id["I-LOC"] == 2
    assert info.encode(["O", "B-PER"], "r") == [0, 3] and info.decode([4, 0]) == ["I-PER", "O"]
    pos = build_token_label_info(task_of([["DET", "NOUN", "VERB", "NOUN"]]))
    assert pos.scheme == "tag" and pos.names == ["DET", "NOUN", "VERB"] and pos.fill_tag == "NOUN"  # most frequent
    fixed = build_token_label_info(task_of([["O", "B-PER"]]), label_names=["O", "B-PER", "I-PER", "B-LOC"])
    assert fixed.names == ["O", "B-PER", "I-PER", "B-LOC"]


@pytest.mark.parametrize("split", ["validation", "test"])
def test_unknown_tags_outside_training_are_refused(split):
    with pytest.raises(UserError, match=rf"{split} sentence 2 has tag 'B-ORG', which the training data does not"):
        build_token_label_info(task_of([["O", "B-PER"]], **{split: [["O"], ["B-ORG"]]}))
    with pytest.raises(UserError, match="only one tag"):
        build_token_label_info(task_of([["O", "O"]]))


# ----------------------------------------------------------------------------------------------------------
# encoding, batches, predictions


def test_labels_on_first_subwords_and_truncation(tiny_tokenizer):
    tokens = [["the", "girl", "is", "seeing", "cats", "."], ["the", "", "dogs"]]
    tags = [["DET", "NOUN", "AUX", "VERB", "NOUN", "PUNCT"], ["DET", "NOUN", "NOUN"]]
    info = build_token_label_info(TokenTaskData("t", {"train": TokenSplit("t", tokens, tags)}))
    ids = {t: i for i, t in enumerate(info.names)}
    data = encode_token_split(TokenSplit("t", tokens, tags), info, tiny_tokenizer, max_seq_length=32)
    # [CLS] the girl is see ##ing cats . [SEP]: "seeing" is two subwords, its tag goes on the first
    assert tiny_tokenizer.convert_ids_to_tokens(data.input_ids[0])[4:6] == ["see", "##ing"]
    assert data.labels[0] == [
        -100,
        ids["DET"],
        ids["NOUN"],
        ids["AUX"],
        ids["VERB"],
        -100,
        ids["NOUN"],
        ids["PUNCT"],
        -100,
    ]
    assert data.word_starts == [[1, 2, 3, 4, 6, 7], [1, -1, 2]]  # the empty token has no subword
    assert data.lengths.tolist() == [9, 4] and data.unaligned_words == 1
    row = data[0]
    assert set(row) == {"input_ids", "idx", "labels"} and row["idx"] == 0

    short = encode_token_split(TokenSplit("t", tokens, tags), info, tiny_tokenizer, max_seq_length=6)
    # [CLS] the girl is see [SEP]: "seeing" keeps its first subword, "cats" and "." are truncated away
    assert short.word_starts[0] == [1, 2, 3, 4, -1, -1] and short.unaligned_words == 3
    assert short.labels[0][-1] == -100 and len(short.input_ids[0]) == 6
    logits = [np.eye(len(info.names))[np.array(lab).clip(0)] for lab in short.labels]  # the gold tags as logits
    decoded = decode_token_predictions(logits, short, info)
    assert decoded == [["DET", "NOUN", "AUX", "VERB", info.fill_tag, info.fill_tag], ["DET", info.fill_tag, "NOUN"]]
    assert all(len(d) == len(t) for d, t in zip(decoded, tokens))  # one tag per word, always
    with pytest.raises(UserError, match="fast tokenizer"):
        encode_token_split(TokenSplit("t", tokens, tags), info, object(), 8)


def test_collator_pads_labels_and_sampler_groups(tiny_tokenizer):
    split = TokenSplit(
        "t",
        [["the", "dogs"], ["the", "big", "red", "cats", "are", "happy"]],
        [["DET", "NOUN"], ["DET", "ADJ", "ADJ", "NOUN", "AUX", "ADJ"]],
    )
    info = build_token_label_info(TokenTaskData("t", {"train": split}))
    data = encode_token_split(split, info, tiny_tokenizer, 16)
    batch = TokenPaddingCollator(tiny_tokenizer.pad_token_id)([data[0], data[1]])
    assert set(batch) == {"input_ids", "attention_mask", "labels", "idx"}
    assert batch["input_ids"].shape == batch["labels"].shape == (2, 8) and batch["labels"].dtype == torch.long
    assert batch["labels"][0, 4:].tolist() == [-100] * 4 and batch["attention_mask"].sum(1).tolist() == [4, 8]
    assert batch["input_ids"][0, 4:].tolist() == [tiny_tokenizer.pad_token_id] * 4
    assert batch["idx"].tolist() == [0, 1]
    assert TokenPaddingCollator(0, pad_to_multiple_of=16)([data[0]])["labels"].shape == (1, 16)
    assert sorted(length_grouped_order(data.lengths, seed=0, epoch=0, global_batch=1).tolist()) == [0, 1]


def test_write_token_predictions(tmp_path):
    tokens, preds = [["Ann", "runs"], ["Oslo"]], [["B-PER", "O"], ["B-LOC"]]
    path = write_token_predictions(tmp_path / "out" / "p.jsonl", tokens, preds)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [
        {"index": 0, "tokens": ["Ann", "runs"], "prediction": ["B-PER", "O"]},
        {"index": 1, "tokens": ["Oslo"], "prediction": ["B-LOC"]},
    ]
    conll = write_token_predictions(tmp_path / "p.conll", tokens, preds, fmt="conll")
    assert conll.read_text() == "Ann\tB-PER\nruns\tO\n\nOslo\tB-LOC\n\n"
    assert read_token_file(conll) == (tokens, preds)  # what we write, we read


# ----------------------------------------------------------------------------------------------------------
# the demo tasks, and a tiny tagger learning one


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    from ltgbert.demo_data import ensure_demo_data

    return ensure_demo_data(
        tmp_path_factory.mktemp("demo"), num_words=3000, pairs_per_phenomenon=2, task_sizes=(400, 100, 20)
    )


def test_demo_token_tasks(small_demo):
    from ltgbert.demo_data import ENTITY_TAGS, POS_TAGS

    pos = load_token_task("demo_pos", demo_dir=str(small_demo.root))
    assert (
        pos.label_names == POS_TAGS and pos.metric == "accuracy" and list(pos.splits) == ["train", "validation", "test"]
    )
    assert build_token_label_info(pos).names == list(POS_TAGS) and len(pos.splits["test"]) == 20
    ent = load_token_task("demo_entities", demo_dir=str(small_demo.root))
    info = build_token_label_info(ent)
    assert info.names == list(ENTITY_TAGS) and info.scheme == "bio" and ent.metric == "f1"


def test_tiny_tagger_learns_demo_entities(small_demo):
    """The whole path: encode, batch, LtgBertForTokenClassification, token_metrics, decode."""
    from ltgbert import LtgBertConfig, LtgBertForTokenClassification
    from ltgbert.tokenization import train_tokenizer

    task = load_token_task("demo_entities", demo_dir=str(small_demo.root))
    info = build_token_label_info(task)
    # a small vocabulary: many words become several subwords
    tokenizer = train_tokenizer(iter(" ".join(t) for t in task.splits["train"].tokens), vocab_size=200)
    data = {s: encode_token_split(split, info, tokenizer, 48) for s, split in task.splits.items()}
    assert any(sum(lab != -100 for lab in row) < len(row) - 2 for row in data["train"].labels)
    config = LtgBertConfig.from_preset(
        "tiny",
        vocab_size=len(tokenizer),
        max_position_embeddings=64,
        position_bucket_size=16,
        id2label=info.id2label,
        label2id=info.label2id,
    )
    torch.manual_seed(0)
    model = LtgBertForTokenClassification(config)
    collator = TokenPaddingCollator(tokenizer.pad_token_id)

    def validation_metrics():
        model.eval()
        rows = [data["validation"][i] for i in range(len(data["validation"]))]
        with torch.no_grad():
            batch = collator(rows)
            batch.pop("idx")
            logits = model(**batch).logits
        model.train()
        return token_metrics(logits.numpy(), batch["labels"].numpy(), info.id2label), logits

    before, _ = validation_metrics()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for epoch in range(3):
        order = length_grouped_order(data["train"].lengths, seed=0, epoch=epoch, global_batch=8)
        for idx in (order[i : i + 8].tolist() for i in range(0, len(order), 8)):
            batch = collator([data["train"][i] for i in idx])
            batch.pop("idx")
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    after, logits = validation_metrics()
    # 150 steps: far from done, but entity F1 goes from chance (~0.01) to over half the chunks right
    assert before["f1"] < 0.1 and after["f1"] > 0.5 and after["accuracy"] > 0.8, (before, after)
    assert all(type(v) is float for v in after.values())
    tags = decode_token_predictions(list(logits.numpy()), data["validation"], info)
    gold = task.splits["validation"].tags
    assert [len(t) for t in tags] == [len(g) for g in gold]
    word_accuracy = np.mean([p == g for ps, gs in zip(tags, gold) for p, g in zip(ps, gs)])
    assert data["validation"].unaligned_words == 0  # nothing truncated at 48 tokens, so the two agree:
    assert word_accuracy == pytest.approx(after["accuracy"])
