"""Tests for ltgbert.demo_data: determinism, caching, held-out evaluation data and label definitions.

The agreement checks use a parser written here from the lexicon alone, independent of the generator's
code, so a bug in the generator can't hide behind the same bug in the check.
"""

import importlib.util
import inspect
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ltgbert import demo_data as dd
from ltgbert.errors import UserError

REPO = Path(__file__).resolve().parents[1]
SMALL = {"num_words": 20_000, "seed": 0, "pairs_per_phenomenon": 40, "task_sizes": (60, 20, 20)}
TINY = {"num_words": 1000, "seed": 0, "pairs_per_phenomenon": 3, "task_sizes": (4, 2, 2)}

# ----------------------------------------------------------------------------------------------------------
# an independent checker of the grammar's rules

NOUN = {form: (n, num) for n in dd.NOUNS for num, form in enumerate(n.forms)}
FORMS: dict[str, list[tuple[dd.Verb, str]]] = {}  # word -> [(verb entry, "base"|"s"|"past"|"pp"|"ing")]
for v in dd.VERBS:
    for kind in ("base", "s", "past", "pp", "ing"):
        FORMS.setdefault(getattr(v, kind), []).append((v, kind))
DET = {**dd.DETERMINERS, "an": (0,)}
BE = {"is": 0, "are": 1, "was": 0, "were": 1}
PREPS = set(dd.NOUN_PREPOSITIONS) | set(dd.LOCATIVE_PREPOSITIONS)


class Bad(Exception):
    """The sentence breaks a rule of the grammar."""


class Parser:
    """Parses one sentence; records the part of speech of each word as it takes it, and the noun phrases."""

    def __init__(self, sentence: str):
        if not (sentence.endswith(".") and sentence[:1].isupper()):
            raise Bad("casing or final period")
        self.w = sentence[:-1].split(" ")
        self.w[0] = self.w[0].lower()
        self.i = 0
        self.nouns: list[tuple[dd.Noun, int]] = []
        self.pos: list[str | None] = [None] * len(self.w)
        self.phrases: list[tuple[int, int, str]] = []  # (first, last, class) of each noun phrase

    def peek(self, k: int = 0) -> str | None:
        return self.w[self.i + k] if self.i + k < len(self.w) else None

    def take(self, pos: str) -> str:
        if self.i >= len(self.w):
            raise Bad("sentence ends early")
        self.pos[self.i] = pos
        self.i += 1
        return self.w[self.i - 1]

    def np(self, dets=None, cls=None) -> tuple[dd.Noun, int, str]:
        first = self.i
        det = self.take("NUM" if self.peek() == "two" else "DET")
        if det not in DET or (dets is not None and det not in dets):
            raise Bad(f"determiner expected, got {det!r}")
        nxt = self.peek()
        if det in ("a", "an") and nxt and (nxt[0] in "aeiou") != (det == "an"):
            raise Bad("a/an")
        adj = self.take("ADJ") if self.peek() not in NOUN else None
        word = self.take("NOUN")
        if word not in NOUN:
            raise Bad(f"noun expected, got {word!r}")
        noun, num = NOUN[word]
        if adj is not None and adj not in dd.ADJECTIVES[noun.cls]:
            raise Bad(f"adjective {adj!r} for {word!r}")
        if num not in DET[det]:
            raise Bad(f"determiner-noun number: {det} {word}")
        if cls is not None and noun.cls != cls:
            raise Bad(f"{word!r} is not a {cls}")
        self.nouns.append((noun, num))
        self.phrases.append((first, self.i - 1, noun.cls))
        return noun, num, det

    def finite(self, num: int, **need) -> dd.Verb:
        """A simple present or past verb agreeing with num, fitting the subject/object classes in need."""
        word = self.take("VERB")
        for v, kind in FORMS.get(word, ()):
            if kind in ("past", ("s", "base")[num]) and all(c in getattr(v, k) for k, c in need.items()):
                return v
        raise Bad(f"verb form {word!r} with number {num} and {need}")

    def parse(self) -> dict:
        if self.w[0] == "there":  # there BE indefinite-NP (PP)
            self.take("PRON")
            be = self.take("VERB")
            if be not in BE:
                raise Bad("there + be")
            noun, num, _ = self.np(dets=("a", "an", "some", "many", "two", "several"))
            if BE[be] != num:
                raise Bad("existential agreement")
            self.locative()
            return self.result(noun)
        subj, num, det = self.np()
        if self.peek() in PREPS:
            self.take("ADP")
            self.np()
        elif self.peek() == "that":
            self.take("PRON")
            if self.peek() in DET:  # object relative: the verb agrees with the RC subject
                rc_subj, rc_num, _ = self.np()
                self.finite(rc_num, subj=rc_subj.cls, obj=subj.cls)
            else:  # subject relative: the verb agrees with the head
                v = self.finite(num, subj=subj.cls)
                obj, _, _ = self.np()
                if obj.cls not in v.obj:
                    raise Bad("relative clause object")
        verbs = self.verb_group(num, det == "no")
        nxt = self.peek()
        if nxt in dd.REFLEXIVES:
            self.take("PRON")
            want = {"m": {"himself"}, "f": {"herself"}, "n": {"himself", "herself"}, "i": {"itself"}}[subj.gender]
            if nxt not in ({"themselves"} if num else want):
                raise Bad(f"reflexive {nxt!r} for {subj.forms[num]!r}")
            verbs = [v for v in verbs if v.refl]
        elif nxt in DET:
            obj, _, _ = self.np()
            verbs = [v for v in verbs if obj.cls in v.obj]
        else:
            verbs = [v for v in verbs if not v.obj]
        if not any(subj.cls in v.subj for v in verbs):
            raise Bad("verb frame")
        self.locative()
        return self.result(subj)

    def result(self, subject: dd.Noun) -> dict:
        return {"subject": subject, "nouns": self.nouns, "pos": self.pos, "phrases": self.phrases}

    def verb_group(self, num: int, licensed: bool) -> list[dd.Verb]:
        """Finite verb group after the subject; returns the verb entries its last word can be."""
        ever = self.peek() == "ever"
        if ever:
            self.take("ADV")
        aux = self.peek() in BE or self.peek() in ("has", "have", "had")
        word = self.take("AUX" if aux else "VERB")
        if aux:
            if ever or (word != "had" and {"is": 0, "was": 0, "has": 0}.get(word, 1) != num):
                raise Bad(f"auxiliary {word!r}")
            if self.peek() == "ever":
                self.take("ADV")
                ever = True
                if word in BE:
                    raise Bad("ever after be")
            verb = self.take("VERB")
            kind = "ing" if word in BE else "pp"
        else:
            verb, kind = word, None
        kinds = {kind} if kind else {"past", ("s", "base")[num]}
        entries = [v for v, k in FORMS.get(verb, ()) if k in kinds]
        if not entries:
            raise Bad(f"verb form {verb!r} after {word!r}")
        if ever and not licensed:
            raise Bad("ever without a 'no' subject")
        return entries

    def locative(self) -> None:
        if self.peek() in dd.LOCATIVE_PREPOSITIONS:
            self.take("ADP")
            self.np(cls="place")
        if self.peek() is not None:
            raise Bad(f"unexpected {self.peek()!r}")


def parse(sentence: str) -> dict:
    return Parser(sentence).parse()


def grammatical(sentence: str) -> bool:
    try:
        parse(sentence)
    except Bad:
        return False
    return True


# ----------------------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dd.DemoPaths:
    return dd.ensure_demo_data(tmp_path_factory.mktemp("demo") / "data", **SMALL)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def corpus_sentences(paths: dd.DemoPaths) -> set[str]:
    text = paths.corpus_train.read_text() + "\n" + paths.corpus_validation.read_text()
    return {line for line in text.split("\n") if line}


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------------------
# the checker itself


def test_checker_accepts_and_rejects_by_hand():
    good = [
        "The dog near the cats runs.",
        "The dogs that the girl chases sleep in the park.",
        "No boy has ever eaten an apple.",
        "There are two cats.",
        "The king praised himself.",
        "The dog ate the cake.",
        "Those children have seen this owl behind the house.",
    ]
    bad = [
        "The dogs runs.",
        "The dog near the cats run.",
        "The king praised herself.",
        "There are a cat.",
        "The boy has ever eaten the apple.",
        "The dog eaten the cake.",
        "The dog has ate the cake.",
        "The boy sees this cats.",
        "A old dog sleeps.",
        "The dogs praised himself.",
        "the dog sleeps.",
    ]
    assert [s for s in good if not grammatical(s)] == []
    assert [s for s in bad if grammatical(s)] == []


def test_lexicon_categories_are_disjoint():
    nouns = set(NOUN)
    verbs = set(FORMS)
    adjs = set().union(*dd.ADJECTIVES.values())
    function = set(DET) | PREPS | set(dd.REFLEXIVES) | set(BE) | {"there", "ever", "has", "have", "had"}
    assert not nouns & verbs and not nouns & adjs and not verbs & adjs
    assert not (nouns | verbs | adjs) & function
    assert 200 <= len(dd.vocabulary()) <= 1000
    assert set(dd.vocabulary()) == nouns | verbs | adjs | function


# ----------------------------------------------------------------------------------------------------------
# corpus


def test_corpus_format_and_grammar(demo):
    manifest = json.loads(demo.manifest.read_text())
    train = demo.corpus_train.read_text()
    assert train.endswith("\n") and "\n\n\n" not in train and not train.startswith("\n")
    docs = train.strip("\n").split("\n\n")
    assert len(docs) == manifest["counts"]["corpus"]["train"]["documents"]
    assert all(3 <= len(d.split("\n")) <= 8 for d in docs)
    assert abs(len(train.split()) - SMALL["num_words"]) < 100
    val_docs = demo.corpus_validation.read_text().strip("\n").split("\n\n")
    assert val_docs and not set(val_docs) & set(docs)  # held-out documents
    bad = [s for s in corpus_sentences(demo) if not grammatical(s)]
    assert bad == []


def test_corpus_has_the_contexts_the_pairs_test(demo):
    text = demo.corpus_train.read_text()
    for needle in (
        " that ",
        " themselves",
        " himself",
        " herself",
        "There is",
        "There are",
        " ever ",
        " these ",
        " this ",
        " has ",
        " have ",
    ):
        assert text.count(needle) > 20, needle


# ----------------------------------------------------------------------------------------------------------
# minimal pairs


def agreement_pair(a: str, b: str) -> bool:
    if {a, b} in ({"is", "are"}, {"was", "were"}, {"has", "have"}):
        return True
    return any(a in (v.s, v.base) and b in (v.s, v.base) for v in dd.VERBS)


EXPECTED_SWAP = {
    "subject_verb_agreement": agreement_pair,
    "subject_verb_agreement_across_prepositional_phrase": agreement_pair,
    "subject_verb_agreement_across_relative_clause": agreement_pair,
    "determiner_noun_agreement": lambda a, b: {a, b} in ({"this", "these"}, {"that", "those"}),
    "anaphor_number_agreement": lambda a, b: (
        a in dd.REFLEXIVES and b in dd.REFLEXIVES and (a == "themselves") != (b == "themselves")
    ),
    "anaphor_gender_agreement": lambda a, b: {a, b} == {"himself", "herself"},
    "irregular_past_participle_verbs": lambda a, b: any(a == v.past and b == v.pp for v in dd.VERBS),
    "irregular_participle_after_auxiliary": lambda a, b: any(a == v.pp and b == v.past for v in dd.VERBS),
    "existential_there_agreement": lambda a, b: {a, b} in ({"is", "are"}, {"was", "were"}),
    "npi_licensing_ever": lambda a, b: a == "No" and b.lower() in DET,
}


def test_blimp_pairs(demo):
    corpus = corpus_sentences(demo)
    all_sentences = []
    assert sorted(p.name for p in demo.blimp_dir.iterdir()) == sorted(f"{u}.jsonl" for u in dd.PHENOMENA)
    for uid, ok_swap in EXPECTED_SWAP.items():
        rows = read_jsonl(demo.blimp_dir / f"{uid}.jsonl")
        assert len(rows) == SMALL["pairs_per_phenomenon"]
        for k, row in enumerate(rows):
            assert row["UID"] == uid and row["pairID"] == str(k)
            assert row["one_prefix_method"] is True and row["simple_LM_method"] is True
            assert row["field"] and row["linguistics_term"]
            good, bad = row["sentence_good"].split(" "), row["sentence_bad"].split(" ")
            diff = [i for i, (a, b) in enumerate(zip(good, bad)) if a != b]
            assert len(good) == len(bad) and len(diff) == 1, row
            i = diff[0]
            assert ok_swap(good[i].rstrip("."), bad[i].rstrip(".")), row
            assert grammatical(row["sentence_good"]), row
            assert not grammatical(row["sentence_bad"]), row
            all_sentences += [row["sentence_good"], row["sentence_bad"]]
    assert not set(all_sentences) & corpus
    assert len(set(all_sentences)) == len(all_sentences)


def test_across_phenomena_have_a_mismatched_attractor(demo):
    for uid in ("subject_verb_agreement_across_prepositional_phrase", "subject_verb_agreement_across_relative_clause"):
        for row in read_jsonl(demo.blimp_dir / f"{uid}.jsonl"):
            nouns = parse(row["sentence_good"])["nouns"]
            assert nouns[0][1] != nouns[1][1], row  # head and attractor differ in number


# ----------------------------------------------------------------------------------------------------------
# tasks


def test_tasks(demo):
    corpus = corpus_sentences(demo)
    blimp = {r[k] for p in demo.blimp_files() for r in read_jsonl(p) for k in ("sentence_good", "sentence_bad")}
    seen: set[str] = set()
    every: dict[str, list] = {task: [] for task in dd.TASKS}  # labels of all splits
    for task in dd.TASKS:
        for split, n in zip(dd.SPLITS, SMALL["task_sizes"]):
            rows = read_jsonl(demo.task_file(task, split))
            assert len(rows) == n and all(set(r) == {"sentence", "label"} for r in rows)
            sentences = [r["sentence"] for r in rows]
            assert not set(sentences) & (corpus | blimp | seen) and len(set(sentences)) == n
            seen.update(sentences)
            labels = [r["label"] for r in rows]
            every[task] += labels
            if task == "grammaticality":
                assert all(type(y) is int and y in (0, 1) for y in labels) and sum(labels) == n - n // 2
                assert [int(grammatical(s)) for s in sentences] == labels
                continue
            parsed = [parse(s) for s in sentences]
            if task == "topic":
                assert labels == [p["subject"].cls for p in parsed]
                assert set(labels) == set(dd.CLASSES)  # balanced: every class in every split
            elif task == "mentions":
                assert all(type(y) is list for y in labels)
                assert labels == [
                    [c for c in dd.MENTION_CLASSES if c in {n.cls for n, _ in p["nouns"]}] for p in parsed
                ]
            else:
                assert all(type(y) is float for y in labels)
                assert labels == pytest.approx([sum(k for _, k in p["nouns"]) / len(p["nouns"]) for p in parsed])
    assert any(y == [] for y in every["mentions"]) and any(len(y) > 1 for y in every["mentions"])
    assert {0.0, 0.5, 1.0} <= set(every["regression"])


def expected_entities(parsed: dict, n: int) -> list[str]:
    tags = ["O"] * n
    for first, last, cls in parsed["phrases"]:
        tags[first : last + 1] = [f"B-{cls.upper()}"] + [f"I-{cls.upper()}"] * (last - first)
    return tags


def test_token_tasks(demo):
    """Tags as the independent parser assigns them while parsing; sentences new and grammatical."""
    taken = corpus_sentences(demo) | {
        r[k] for p in demo.blimp_files() for r in read_jsonl(p) for k in ("sentence_good", "sentence_bad")
    }
    taken |= {r["sentence"] for t in dd.TASKS for s in dd.SPLITS for r in read_jsonl(demo.task_file(t, s))}
    seen_tags = {task: set() for task in dd.TOKEN_TASKS}
    for task in dd.TOKEN_TASKS:
        for split, n in zip(dd.SPLITS, SMALL["task_sizes"]):
            rows = read_jsonl(demo.task_file(task, split))
            assert len(rows) == n and all(set(r) == {"tokens", "tags"} for r in rows)
            sentences = [" ".join(r["tokens"][:-1]) + "." for r in rows]
            assert not set(sentences) & taken and len(set(sentences)) == n
            taken.update(sentences)
            for r, sentence in zip(rows, sentences):
                parsed = parse(sentence)  # raises on an ungrammatical sentence
                assert r["tokens"][-1] == "." and len(r["tags"]) == len(r["tokens"])
                words = len(r["tokens"]) - 1
                expected = [*parsed["pos"], "PUNCT"] if task == "pos" else [*expected_entities(parsed, words), "O"]
                assert r["tags"] == expected, sentence
                seen_tags[task].update(r["tags"])
    assert seen_tags["pos"] == set(dd.POS_TAGS)
    assert seen_tags["entities"] == set(dd.ENTITY_TAGS)
    # the two contextual tags occur: relative "that" and existential be
    pos_rows = [r for s in dd.SPLITS for r in read_jsonl(demo.task_file("pos", s))]
    pairs = {(w.lower(), t) for r in pos_rows for w, t in zip(r["tokens"], r["tags"])}
    assert {("that", "DET"), ("that", "PRON"), ("is", "VERB"), ("is", "AUX")} <= pairs


# ----------------------------------------------------------------------------------------------------------
# determinism, manifest, caching


def test_deterministic_by_seed(demo, tmp_path):
    dd.generate_demo_data(tmp_path / "same", **SMALL)
    assert tree_bytes(tmp_path / "same") == tree_bytes(demo.root)
    dd.generate_demo_data(tmp_path / "other", **{**SMALL, "seed": 1})
    other = tree_bytes(tmp_path / "other")
    for name in ("corpus/train.txt", "blimp/npi_licensing_ever.jsonl", "tasks/topic/train.jsonl"):
        assert other[name] != tree_bytes(demo.root)[name]


def test_manifest(demo):
    m = json.loads(demo.manifest.read_text())
    assert m["format_version"] == dd.FORMAT_VERSION
    assert m["params"] == {**SMALL, "task_sizes": list(SMALL["task_sizes"])}
    assert m["counts"]["blimp"] == {u: SMALL["pairs_per_phenomenon"] for u in dd.PHENOMENA}
    assert m["counts"]["corpus"]["train"]["words"] == len(demo.corpus_train.read_text().split())
    assert m["tasks"]["mentions"]["problem_type"] == "multi_label_classification"
    assert m["tasks"]["pos"] == {
        "problem_type": "token_classification",
        "label_names": list(dd.POS_TAGS),
        "definition": dd.TOKEN_TASKS["pos"][1],
    }
    assert m["tasks"]["entities"]["label_names"][:3] == ["O", "B-PERSON", "I-PERSON"]
    assert m["counts"]["tasks"]["pos"] == dict(zip(dd.SPLITS, SMALL["task_sizes"]))


def test_api_defaults():
    sig = inspect.signature(dd.ensure_demo_data).parameters
    assert {k: p.default for k, p in sig.items()} == {
        "demo_dir": None,
        "num_words": 1_000_000,
        "seed": 0,
        "pairs_per_phenomenon": 500,
        "task_sizes": (2000, 500, 500),
    }


def test_default_demo_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("LTGBERT_DEMO_DIR", str(tmp_path / "x"))
    assert dd.default_demo_dir() == tmp_path / "x"
    monkeypatch.delenv("LTGBERT_DEMO_DIR")
    assert dd.default_demo_dir() == Path.home() / ".cache" / "ltgbert" / "demo"


def test_ensure_is_idempotent_and_atomic(tmp_path, monkeypatch):
    root = tmp_path / "demo"
    paths = dd.ensure_demo_data(root, **TINY)
    before = tree_bytes(root)

    def boom(out_dir, **kwargs):
        (Path(out_dir) / "corpus").mkdir(parents=True)
        (Path(out_dir) / "corpus" / "train.txt").write_text("half")
        raise RuntimeError("killed")

    monkeypatch.setattr(dd, "generate_demo_data", boom)
    assert dd.ensure_demo_data(root, **TINY) == paths  # same params: nothing generated
    with pytest.raises(RuntimeError):
        dd.ensure_demo_data(root, **{**TINY, "seed": 1})  # a failed regeneration ...
    assert tree_bytes(root) == before  # ... leaves the old data whole
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name] == []
    monkeypatch.undo()
    dd.ensure_demo_data(root, **{**TINY, "seed": 1})
    assert json.loads((root / "manifest.json").read_text())["params"]["seed"] == 1


def test_ensure_concurrent_callers_generate_once(tmp_path, monkeypatch):
    calls = []
    real = dd.generate_demo_data
    monkeypatch.setattr(dd, "generate_demo_data", lambda *a, **k: calls.append(1) or real(*a, **k))
    threads = [threading.Thread(target=dd.ensure_demo_data, args=(tmp_path / "demo",), kwargs=TINY) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and (tmp_path / "demo" / "manifest.json").exists()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_words": 0},
        {"num_words": -5},
        {"seed": -1},
        {"pairs_per_phenomenon": 0},
        {"task_sizes": (10, 1, 1)},
        {"task_sizes": (10, 10)},
    ],
)
def test_bad_parameters(tmp_path, kwargs):
    with pytest.raises(UserError):
        dd.ensure_demo_data(tmp_path / "demo", **{**TINY, **kwargs})
    assert not (tmp_path / "demo").exists()


def test_unwritable_or_foreign_dir(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="cannot"):
        dd.ensure_demo_data(tmp_path / "file" / "demo", **TINY)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not empty"):
        dd.ensure_demo_data(tmp_path / "mine", **TINY)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------------------------------------
# entry point


def test_entry_point_subprocess(tmp_path):
    # one subprocess only: it pays for importing torch and transformers (ltgbert/__init__.py)
    out = tmp_path / "demo"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "launch" / "make_demo_data.py"),
            "--output_dir",
            str(out),
            "--num_words",
            "2000",
            "--pairs_per_phenomenon",
            "3",
            "--train_size",
            "4",
            "--validation_size",
            "2",
            "--test_size",
            "2",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert str(out / "corpus" / "train.txt") in proc.stdout and "grammaticality" in proc.stdout
    assert json.loads((out / "manifest.json").read_text())["params"]["num_words"] == 2000


@pytest.mark.parametrize("argv", [["--num_words", "0"], ["--num_words", "many"], ["--seed", "-3"]])
def test_entry_point_bad_args(tmp_path, capsys, monkeypatch, argv):
    spec = importlib.util.spec_from_file_location("make_demo_data", REPO / "launch" / "make_demo_data.py")
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, script)  # dataclasses and type hints look their module up there
    spec.loader.exec_module(script)
    try:
        code = script.cli(["--output_dir", str(tmp_path / "bad"), *argv])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()
