"""Built-in demo data: an English-like corpus, BLiMP-style minimal pairs, classification and tagging tasks.

Every entry point runs with no arguments on data the project makes itself, so nothing is downloaded. This
module is that data: a small generative grammar with a lexicon of ~100 nouns and ~60 verbs (520 word
forms), from which we write, deterministically from one seed:

    <root>/manifest.json                        parameters, counts, format version (written last)
    <root>/corpus/{train,validation}.txt        documents separated by a blank line, one sentence per line
    <root>/blimp/<UID>.jsonl                    minimal pairs in the BLiMP format, one file per phenomenon
    <root>/tasks/<task>/{train,validation,test}.jsonl   {"sentence": ..., "label": ...}
    <root>/tasks/{pos,entities}/{train,validation,test}.jsonl   {"tokens": [...], "tags": [...]}

The grammar is built around agreement, so a small masked LM can learn it in CPU minutes and the minimal
pairs measure whether it did: subject-verb number (locally, across a prepositional phrase and across a
relative clause whose noun has the other number), determiner-noun number (this/these), reflexive number
and gender, irregular past and participle forms, existential there is/are and the negative polarity item
"ever" (licensed only by a "no" subject). Every evaluation sentence (pairs and tasks) is held out: it is
rejected when it occurs in the corpus or in an earlier evaluation file.

The two token-classification tasks tag corpus-style sentences word by word (the final period is a token of
its own). ``pos``: universal part-of-speech tags (``POS_TAGS``, Universal Dependencies' UPOS names): the
lexicon fixes every word's tag but two, which the grammar's structure decides: "that" is DET before its
noun ("that dog") and PRON as a relative ("the dog that runs"), and be is VERB after existential "there"
("there is a dog") and AUX before a participle ("is running"). ``entities``: every noun phrase (determiner,
adjective, noun) is a chunk of its noun's semantic class in IOB2 (``ENTITY_TAGS``: B-ANIMAL I-ANIMAL ...),
so the entity-level F1 of NER is exercised on it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

from ltgbert.errors import UserError

# Bump whenever the grammar or the file layout changes: the manifest check then regenerates cached data.
FORMAT_VERSION = 2

# ----------------------------------------------------------------------------------------------------------
# lexicon

CLASSES = ("person", "animal", "food", "object", "place")
ANIMATE = ("person", "animal")
MENTION_CLASSES = ("animal", "food", "object", "place")  # people don't count, so a label can be empty


class Noun(NamedTuple):
    forms: tuple[str, str]  # (singular, plural); index with the number 0 = singular, 1 = plural
    cls: str  # semantic class, one of CLASSES
    gender: str  # "m", "f", "n" (person of either gender: himself or herself), "i" (itself)


class Verb(NamedTuple):
    base: str  # also the plural present
    s: str  # third person singular present
    past: str
    pp: str  # past participle
    ing: str
    subj: tuple[str, ...]  # classes allowed as subject
    obj: tuple[str, ...]  # classes allowed as object; () for intransitive verbs
    refl: bool  # takes a reflexive object ("praised herself")


_NOUN_TABLE = {
    "person": "man/men:m woman/women:f boy/boys:m girl/girls:f king/kings:m queen/queens:f father/fathers:m "
    "mother/mothers:f brother/brothers:m sister/sisters:f uncle/uncles:m aunt/aunts:f prince/princes:m "
    "princess/princesses:f actor/actors:m actress/actresses:f waiter/waiters:m waitress/waitresses:f "
    "son/sons:m daughter/daughters:f child/children:n teacher/teachers:n doctor/doctors:n "
    "student/students:n farmer/farmers:n baker/bakers:n friend/friends:n neighbor/neighbors:n "
    "pilot/pilots:n artist/artists:n guest/guests:n",
    "animal": "dog/dogs cat/cats horse/horses bird/birds mouse/mice fox/foxes wolf/wolves goose/geese "
    "rabbit/rabbits cow/cows duck/ducks elephant/elephants owl/owls lion/lions frog/frogs monkey/monkeys "
    "puppy/puppies pony/ponies ox/oxen tiger/tigers",
    "food": "apple/apples cake/cakes banana/bananas egg/eggs orange/oranges sandwich/sandwiches "
    "cookie/cookies pie/pies potato/potatoes tomato/tomatoes cherry/cherries peach/peaches carrot/carrots "
    "pear/pears loaf/loaves onion/onions",
    "object": "book/books ball/balls box/boxes key/keys cup/cups chair/chairs knife/knives lamp/lamps hat/hats "
    "toy/toys bottle/bottles umbrella/umbrellas coin/coins letter/letters picture/pictures shoe/shoes "
    "clock/clocks basket/baskets kite/kites",
    "place": "house/houses garden/gardens park/parks city/cities village/villages school/schools "
    "church/churches library/libraries forest/forests farm/farms market/markets museum/museums "
    "kitchen/kitchens castle/castles beach/beaches island/islands office/offices station/stations",
}

_AN, _ALL, _PO = "person animal", "person animal food object place", "person animal object"
_THINGS = "animal food object"
# forms "base 3sg past participle ing"; subject classes; object classes ("" = intransitive); reflexive.
_VERB_TABLE = (
    ("sleep sleeps slept slept sleeping", _AN, "", False),
    ("run runs ran run running", _AN, "", False),
    ("swim swims swam swum swimming", _AN, "", False),
    ("sing sings sang sung singing", _AN, "", False),
    ("laugh laughs laughed laughed laughing", "person", "", False),
    ("smile smiles smiled smiled smiling", "person", "", False),
    ("dance dances danced danced dancing", "person", "", False),
    ("cry cries cried cried crying", "person", "", False),
    ("wait waits waited waited waiting", _AN, "", False),
    ("arrive arrives arrived arrived arriving", _AN, "", False),
    ("wake wakes woke woken waking", _AN, "", False),
    ("fall falls fell fallen falling", "person animal food object", "", False),
    ("fly flies flew flown flying", "animal object", "", False),
    ("roll rolls rolled rolled rolling", "food object", "", False),
    ("shine shines shone shone shining", "object", "", False),
    ("grow grows grew grown growing", "person animal food place", "", False),
    ("disappear disappears disappeared disappeared disappearing", _ALL, "", False),
    ("change changes changed changed changing", _ALL, "", False),
    ("break breaks broke broken breaking", "object", "", False),
    ("break breaks broke broken breaking", _AN, "object", False),
    ("see sees saw seen seeing", _AN, _ALL, True),
    ("like likes liked liked liking", _AN, _ALL, True),
    ("love loves loved loved loving", _AN, _ALL, True),
    ("hate hates hated hated hating", _AN, _ALL, True),
    ("watch watches watched watched watching", _AN, _ALL, True),
    ("eat eats ate eaten eating", _AN, "food", False),
    ("bite bites bit bitten biting", "animal", "person animal food", False),
    ("find finds found found finding", _AN, _ALL, False),
    ("take takes took taken taking", "person", _THINGS, False),
    ("know knows knew known knowing", "person", "person animal place", True),
    ("visit visits visited visited visiting", "person", "person place", False),
    ("help helps helped helped helping", _AN, _AN, True),
    ("hurt hurts hurt hurt hurting", _AN, _AN, True),
    ("chase chases chased chased chasing", _AN, _PO, False),
    ("follow follows followed followed following", _AN, _AN, False),
    ("bring brings brought brought bringing", "person", _THINGS, False),
    ("buy buys bought bought buying", "person", _THINGS, False),
    ("hold holds held held holding", "person", _THINGS, False),
    ("throw throws threw thrown throwing", "person", "food object", False),
    ("draw draws drew drawn drawing", "person", _ALL, True),
    ("hide hides hid hidden hiding", _AN, _THINGS, True),
    ("forget forgets forgot forgotten forgetting", "person", _ALL, False),
    ("choose chooses chose chosen choosing", "person", _ALL, False),
    ("steal steals stole stolen stealing", _AN, "food object", False),
    ("wash washes washed washed washing", _AN, _THINGS, True),
    ("praise praises praised praised praising", "person", _AN, True),
    ("blame blames blamed blamed blaming", "person", _AN, True),
    ("teach teaches taught taught teaching", "person", _AN, True),
    ("describe describes described described describing", "person", _ALL, True),
    ("catch catches caught caught catching", _AN, _THINGS, False),
    ("carry carries carried carried carrying", _AN, _THINGS, False),
    ("sell sells sold sold selling", "person", _THINGS, False),
    ("leave leaves left left leaving", "person", "animal object place", False),
    ("build builds built built building", "person", "object place", False),
    ("feed feeds fed fed feeding", "person", _AN, False),
    # experiencer verbs give inanimate subjects transitive contexts too (the topic task needs them)
    ("surprise surprises surprised surprised surprising", _ALL, _AN, False),
    ("scare scares scared scared scaring", _ALL, _AN, False),
    ("please pleases pleased pleased pleasing", _ALL, "person", False),
    ("bore bores bored bored boring", _ALL, "person", False),
    ("confuse confuses confused confused confusing", _ALL, _AN, False),
)

ADJECTIVES = {
    "person": ("happy", "sad", "clever", "lazy", "angry", "brave", "hungry", "tired", "young", "tall", "old", "little"),
    "animal": ("happy", "sad", "clever", "lazy", "angry", "brave", "hungry", "tired", "young", "big", "old", "little"),
    "food": ("big", "small", "fresh", "sweet", "red", "green", "old", "little"),
    "object": ("big", "small", "heavy", "red", "blue", "green", "old", "new", "little"),
    "place": ("big", "small", "quiet", "empty", "old", "new", "dark", "beautiful"),
}
NOUN_PREPOSITIONS = ("near", "behind", "beside", "with", "under", "from")  # "the dog near the cats"
LOCATIVE_PREPOSITIONS = ("in", "near", "behind", "outside")  # "... in the park", always a place
# Which numbers (0 = singular, 1 = plural) each determiner combines with; "a" is written "an" before a vowel.
DETERMINERS = {
    "the": (0, 1),
    "a": (0,),
    "this": (0,),
    "that": (0,),
    "every": (0,),
    "these": (1,),
    "those": (1,),
    "some": (1,),
    "many": (1,),
    "two": (1,),
    "several": (1,),
    "no": (0, 1),
}
REFLEXIVES = ("himself", "herself", "itself", "themselves")

NOUNS = tuple(
    Noun(tuple(item.split(":")[0].split("/")), cls, item.split(":")[1] if cls == "person" else "i")
    for cls, items in _NOUN_TABLE.items()
    for item in items.split()
)
VERBS = tuple(
    Verb(*forms.split(), tuple(subj.split()), tuple(obj.split()), refl) for forms, subj, obj, refl in _VERB_TABLE
)


def vocabulary() -> list[str]:
    """Every lowercase word the grammar can write (sentence-initial words are capitalized in the files)."""
    words = {"there", "that", "ever", "is", "are", "was", "were", "has", "have", "had", "an", *DETERMINERS}
    words.update(*(n.forms for n in NOUNS), *(v[:5] for v in VERBS), *ADJECTIVES.values(), REFLEXIVES)
    words.update(NOUN_PREPOSITIONS, LOCATIVE_PREPOSITIONS)
    return sorted(words)


# ----------------------------------------------------------------------------------------------------------
# grammar


# Weighted choices are stored as pools with repeated entries and drawn as pool[int(random() * len(pool))]:
# several times faster than Random.choices/choice, which matters for a million words of pure Python.
def _pool(*weighted: tuple[object, int]) -> tuple:
    return tuple(x for x, w in weighted for _ in range(w))


# Determiners of ordinary noun phrases; "no" is kept for the NPI sentences so that "ever" is always
# licensed by it and by nothing else.
_DETS = (
    _pool(("the", 9), ("a", 5), ("this", 2), ("that", 2), ("every", 2)),
    _pool(("the", 9), ("these", 2), ("those", 2), ("some", 3), ("many", 2), ("two", 1), ("several", 1)),
)
_INDEFINITE = (("a",), ("some", "many", "two", "several"))
_DEMONSTRATIVES = (("this", "that"), ("these", "those"))
_DEMONSTRATIVE_SWAP = {"this": "these", "these": "this", "that": "those", "those": "that"}
_NPI_BAD_DETS = (("the", "this", "that", "every"), ("the", "these", "those", "some"))
_TENSES = _pool(("pres", 9), ("past", 5), ("prog", 3), ("pastprog", 1), ("perf", 5), ("pastperf", 2))
_AGREEING = ("pres", "prog", "pastprog", "perf")  # tenses whose finite word shows the subject's number
_NPI_TENSES = ("pres", "past", "perf", "pastperf")
_STATIVE = {"see", "like", "love", "hate", "know"}  # "is liking" reads badly: these take simple forms
_SUBJECT_CLASSES = _pool(("person", 7), ("animal", 6), ("food", 2), ("object", 3), ("place", 2))  # as in text
# Corpus sentence shapes. About 40% of subjects carry a PP or relative clause, and its noun mostly has
# the other number (_ATTRACTOR_MISMATCH), so "agree with the nearest noun", which a small MLM learns first,
# fails more often than it works and the structural rule pays off.
_MIX = _pool(("plain", 30), ("pp", 18), ("src", 9), ("orc", 9), ("refl", 14), ("refl_pp", 5), ("there", 8), ("npi", 7))
_ATTRACTOR_MISMATCH = 0.7
_REFLEXIVE_SUBJECTS = _pool(("person", 7), ("animal", 3))  # people: gender as well as number to learn
_AGREE_SWAP = {
    "is": "are",
    "are": "is",
    "was": "were",
    "were": "was",
    "has": "have",
    "have": "has",
    **{v.s: v.base for v in VERBS},
    **{v.base: v.s for v in VERBS},
}


class _Sent:
    """One generated sentence: its lowercase words plus where each phenomenon can be violated (-1: nowhere)."""

    __slots__ = (
        "agree_i",
        "dem_i",
        "nouns",
        "npi_i",
        "past_i",
        "pp_i",
        "refl_i",
        "subj",
        "subj_num",
        "there_i",
        "verb",
        "words",
    )

    def __init__(self) -> None:
        self.words: list[str] = []
        self.nouns: list[tuple[Noun, int]] = []  # every noun with its number, subject first
        self.subj: Noun | None = None
        self.subj_num = 0
        self.verb: Verb | None = None
        self.agree_i = self.refl_i = self.dem_i = self.past_i = self.pp_i = self.there_i = self.npi_i = -1


def _reflexive(noun: Noun, num: int, rnd) -> str:
    if num:
        return "themselves"
    if noun.gender == "n":  # "the teacher praised herself" and "... himself" are both fine
        return "himself" if rnd() < 0.5 else "herself"
    return {"m": "himself", "f": "herself", "i": "itself"}[noun.gender]


def render(words: list[str]) -> str:
    """Words -> the sentence as written in the files: first letter capitalized, final period."""
    return words[0][:1].upper() + words[0][1:] + (" " if len(words) > 1 else "") + " ".join(words[1:]) + "."


class Grammar:
    """Sentence generator; one instance per random stream. Lookup tables are built once per instance."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.rnd = rng.random
        self.nouns = {c: tuple(n for n in NOUNS if n.cls == c) for c in CLASSES}

        def by(pred) -> dict[str, tuple[Verb, ...]]:
            return {c: tuple(v for v in VERBS if pred(v, c)) for c in CLASSES}

        self.verbs_by_subj = by(lambda v, c: c in v.subj)
        self.trans_by_subj = by(lambda v, c: c in v.subj and bool(v.obj))
        self.trans_by_obj = by(lambda v, c: c in v.obj)
        self.refl_by_subj = by(lambda v, c: c in v.subj and v.refl)
        # "has ate" is wrong only where past != participle; "the dog eaten" only where the participle also
        # differs from both present forms ("the dogs run" is fine, so "run" is left out there)
        self.irregular_by_subj = by(lambda v, c: c in v.subj and v.past != v.pp)
        self.strong_by_subj = by(lambda v, c: c in v.subj and v.past != v.pp and v.pp not in (v.base, v.s))

    def pick(self, seq):
        return seq[int(self.rnd() * len(seq))]

    # -- phrases --------------------------------------------------------------------------------------------

    def _np(
        self,
        s: _Sent,
        cls: str,
        num: int,
        dets: tuple[str, ...] | None = None,
        adj_p: float = 0.25,
        no_that: bool = False,
    ) -> int:
        """Append det (adj) noun to s.words; return the determiner's index."""
        rnd, words = self.rnd, s.words
        nouns = self.nouns[cls]
        noun = nouns[int(rnd() * len(nouns))]
        dets = _DETS[num] if dets is None else dets
        det = dets[int(rnd() * len(dets))]
        if no_that and det == "that":  # "the dog that that cat chases" reads badly
            det = "the"
        start = len(words)
        words.append(det)
        if rnd() < adj_p:
            adjs = ADJECTIVES[cls]
            words.append(adjs[int(rnd() * len(adjs))])
        words.append(noun.forms[num])
        if det == "a" and words[start + 1][0] in "aeiou":
            words[start] = "an"
        s.nouns.append((noun, num))
        return start

    def _subject(
        self,
        s: _Sent,
        cls: str,
        num: int,
        mod: str | None,
        dets: tuple[str, ...] | None,
        mismatch: bool | None,
        adj_p: float,
    ) -> None:
        """Subject noun phrase, optionally modified by a PP or a relative clause holding an attractor noun."""
        pick, rnd, words = self.pick, self.rnd, s.words
        self._np(s, cls, num, dets, adj_p)
        s.subj, s.subj_num = s.nouns[-1][0], num
        if mod is None:
            return
        # the attractor: the noun between subject and verb; its number is the thing agreement must ignore
        if mismatch is None:
            mismatch = rnd() < _ATTRACTOR_MISMATCH
        anum = 1 - num if mismatch else num
        if mod == "pp":  # the dog near the cats
            words.append(pick(NOUN_PREPOSITIONS))
            self._np(s, pick(CLASSES), anum, no_that=True)
        elif mod == "src":  # the dog that chases the cats: the RC verb agrees with the head
            verb = pick(self.trans_by_subj[cls])
            words += ("that", verb.past if rnd() < 0.3 else (verb.base if num else verb.s))
            self._np(s, pick(verb.obj), anum, no_that=True)
        else:  # "orc", the dog that the cats chase: the RC verb agrees with the attractor
            verb = pick(self.trans_by_obj[cls])
            words.append("that")
            self._np(s, pick(verb.subj), anum, no_that=True)
            words.append(verb.past if rnd() < 0.3 else (verb.base if anum else verb.s))

    # -- sentences ------------------------------------------------------------------------------------------

    def clause(
        self,
        cls: str | None = None,
        num: int | None = None,
        mod: str | None = None,
        mismatch: bool | None = None,
        tense: str | None = None,
        refl: bool = False,
        npi: bool = False,
        verbs: tuple[Verb, ...] | None = None,
        dem_obj: bool = False,
        loc_p: float = 0.35,
        adj_p: float = 0.25,
    ) -> _Sent:
        """Subject (modifier) verb-group (object | reflexive) (locative PP)."""
        pick, rnd = self.pick, self.rnd
        if cls is None:
            cls = pick(_REFLEXIVE_SUBJECTS) if refl else pick(_SUBJECT_CLASSES)
        if num is None:
            num = int(rnd() < 0.45)
        verb = pick(verbs or (self.refl_by_subj if refl else self.verbs_by_subj)[cls])
        if tense is None:
            tense = pick(_NPI_TENSES) if npi else pick(_TENSES)
        if verb.base in _STATIVE and tense in ("prog", "pastprog"):  # keeps the number-marking word
            tense = "pres" if tense == "prog" else "perf"
        s = _Sent()
        s.verb = verb
        self._subject(s, cls, num, mod, ("no",) if npi else None, mismatch, adj_p)
        words, i = s.words, len(s.words)
        if npi:
            s.npi_i = 0
        if tense == "pres":
            words.append(verb.s if num == 0 else verb.base)
            s.agree_i = i
        elif tense == "past":
            words.append(verb.past)
            s.past_i = i
        else:
            aux = {
                "prog": ("is", "are"),
                "pastprog": ("was", "were"),
                "perf": ("has", "have"),
                "pastperf": ("had", "had"),
            }[tense][num]
            words += (aux, verb.ing if tense in ("prog", "pastprog") else verb.pp)
            s.agree_i = i if tense != "pastperf" else -1
            s.pp_i = i + 1 if tense in ("perf", "pastperf") else -1
        if npi:  # after the auxiliary, or before a simple verb: "no dog has ever", "no dog ever sleeps"
            at = i + 1 if tense in ("perf", "pastperf") else i
            words.insert(at, "ever")
            s.agree_i, s.past_i, s.pp_i = (x + (x >= at) if x >= 0 else -1 for x in (s.agree_i, s.past_i, s.pp_i))
        if refl:
            s.refl_i = len(words)
            words.append(_reflexive(s.subj, num, rnd))
        elif verb.obj:
            onum = int(rnd() < 0.45)
            start = self._np(s, pick(verb.obj), onum, _DEMONSTRATIVES[onum] if dem_obj else None, adj_p)
            if words[start] in _DEMONSTRATIVE_SWAP:
                s.dem_i = start
        if rnd() < loc_p:
            words.append(pick(LOCATIVE_PREPOSITIONS))
            self._np(s, "place", int(rnd() < 0.3), adj_p=adj_p)
        return s

    def existential(self, num: int | None = None, loc_p: float = 0.8) -> _Sent:
        """There is/are/was/were an indefinite noun phrase (locative PP); the verb agrees to its right."""
        pick, rnd = self.pick, self.rnd
        num = int(rnd() < 0.5) if num is None else num
        s = _Sent()
        s.words += ("there", ("is", "are") if rnd() < 0.7 else ("was", "were"))
        s.words[1] = s.words[1][num]
        s.there_i = 1
        self._np(s, pick(("person", "animal", "food", "object")), num, _INDEFINITE[num])
        s.subj, s.subj_num = s.nouns[-1][0], num
        if rnd() < loc_p:
            s.words.append(pick(LOCATIVE_PREPOSITIONS))
            self._np(s, "place", int(rnd() < 0.3))
        return s

    def sentence(self) -> _Sent:
        """One sentence from the corpus mixture."""
        kind = self.pick(_MIX)
        if kind == "plain":
            return self.clause()
        if kind == "there":
            return self.existential()
        if kind == "npi":
            return self.clause(npi=True, mod="pp" if self.rnd() < 0.25 else None)
        if kind in ("refl", "refl_pp"):
            return self.clause(refl=True, mod="pp" if kind == "refl_pp" else None)
        return self.clause(mod=kind)

    # -- minimal pairs --------------------------------------------------------------------------------------

    def pair(self, uid: str) -> tuple[list[str], list[str]] | None:
        """(good, bad) words for one phenomenon, differing in one word; None when this draw can't be used."""
        pick = self.pick
        tense = pick(_AGREEING)
        if uid == "subject_verb_agreement":
            s = self.clause(tense=tense, loc_p=0.6, adj_p=0.4)
            return _swap(s, s.agree_i, _AGREE_SWAP[s.words[s.agree_i]])
        if uid == "subject_verb_agreement_across_prepositional_phrase":
            s = self.clause(mod="pp", mismatch=True, tense=tense)
            return _swap(s, s.agree_i, _AGREE_SWAP[s.words[s.agree_i]])
        if uid == "subject_verb_agreement_across_relative_clause":
            s = self.clause(mod=pick(("src", "orc")), mismatch=True, tense=tense)
            return _swap(s, s.agree_i, _AGREE_SWAP[s.words[s.agree_i]])
        if uid == "determiner_noun_agreement":
            cls = pick(_SUBJECT_CLASSES)
            s = self.clause(cls, verbs=self.trans_by_subj[cls], dem_obj=True, loc_p=0.5)
            return _swap(s, s.dem_i, _DEMONSTRATIVE_SWAP[s.words[s.dem_i]])
        if uid == "anaphor_number_agreement":
            s = self.clause(refl=True, loc_p=0.5, adj_p=0.4)
            if s.subj_num == 0:
                return _swap(s, s.refl_i, "themselves")
            return _swap(s, s.refl_i, "itself" if s.subj.gender == "i" else pick(("himself", "herself")))
        if uid == "anaphor_gender_agreement":
            s = self.clause("person", 0, refl=True, loc_p=0.5, adj_p=0.4)
            if s.subj.gender == "n":
                return None
            return _swap(s, s.refl_i, "herself" if s.words[s.refl_i] == "himself" else "himself")
        if uid == "irregular_past_participle_verbs":  # the dog ate / *eaten the cake
            cls = pick([c for c in CLASSES if self.strong_by_subj[c]])
            s = self.clause(cls, verbs=self.strong_by_subj[cls], tense="past", loc_p=0.5, adj_p=0.4)
            return _swap(s, s.past_i, s.verb.pp)
        if uid == "irregular_participle_after_auxiliary":  # the dog has eaten / *ate the cake
            cls = pick([c for c in CLASSES if self.irregular_by_subj[c]])
            s = self.clause(
                cls, verbs=self.irregular_by_subj[cls], tense=pick(("perf", "pastperf")), loc_p=0.5, adj_p=0.4
            )
            return _swap(s, s.pp_i, s.verb.past)
        if uid == "existential_there_agreement":
            s = self.existential()
            return _swap(s, s.there_i, _AGREE_SWAP[s.words[s.there_i]])
        if uid == "npi_licensing_ever":
            s = self.clause(npi=True, loc_p=0.5, adj_p=0.4)
            return _swap(s, s.npi_i, pick(_NPI_BAD_DETS[s.subj_num]))
        raise ValueError(f"unknown phenomenon {uid!r}")


def _swap(s: _Sent, i: int, word: str) -> tuple[list[str], list[str]]:
    bad = list(s.words)
    bad[i] = word
    return s.words, bad


# UID -> (BLiMP field, BLiMP linguistics_term, what the pair contrasts)
PHENOMENA = {
    "subject_verb_agreement": (
        "morphology",
        "subject_verb_agreement",
        "verb number next to its subject: the dog runs / *run",
    ),
    "subject_verb_agreement_across_prepositional_phrase": (
        "morphology",
        "subject_verb_agreement",
        "verb number across a PP whose noun has the other number: the dog near the cats runs / *run",
    ),
    "subject_verb_agreement_across_relative_clause": (
        "morphology",
        "subject_verb_agreement",
        (
            "verb number across a relative clause with a noun of the other number: the dog that the cats chase "
            "runs / *run"
        ),
    ),
    "determiner_noun_agreement": (
        "morphology",
        "determiner_noun_agreement",
        "demonstrative number: sees these cats / *this cats",
    ),
    "anaphor_number_agreement": (
        "morphology",
        "anaphor_agreement",
        "reflexive number: the girls praised themselves / *herself",
    ),
    "anaphor_gender_agreement": (
        "morphology",
        "anaphor_agreement",
        "reflexive gender: the king praised himself / *herself",
    ),
    "irregular_past_participle_verbs": (
        "morphology",
        "irregular_forms",
        "simple past, not participle: the dog ate / *eaten the cake",
    ),
    "irregular_participle_after_auxiliary": (
        "morphology",
        "irregular_forms",
        "participle after have: the dog has eaten / *ate the cake",
    ),
    "existential_there_agreement": (
        "morphology",
        "subject_verb_agreement",
        "there is a dog / *are a dog; there are two dogs / *is",
    ),
    "npi_licensing_ever": (
        "semantics",
        "npi_licensing",
        "ever needs a 'no' subject: no dog has ever / *the dog has ever",
    ),
}


# ----------------------------------------------------------------------------------------------------------
# tasks

TASKS = {  # name -> (HF problem_type, label names or None, label definition)
    "grammaticality": (
        "single_label_classification",
        (0, 1),
        (
            "1 if the sentence follows the grammar, 0 if it breaks one agreement rule (the "
            "violations of the BLiMP phenomena, equally often)"
        ),
    ),
    "topic": ("single_label_classification", CLASSES, "semantic class of the head noun of the subject"),
    "mentions": (
        "multi_label_classification",
        MENTION_CLASSES,
        "the non-human semantic classes of all nouns in the sentence (possibly none)",
    ),
    "regression": ("regression", None, "plurality score: plural nouns / all nouns (reflexives not counted)"),
}
SPLITS = ("train", "validation", "test")


def _task_row(task: str, g: Grammar, label_hint: object) -> tuple[list[str], object] | None:
    """One (words, label) draw for a task; label_hint is the balanced label (or class) this row should get."""
    pick = g.pick
    if task == "grammaticality":
        # good and bad rows come from the same sentence shapes, so only the violation tells them apart
        pair = g.pair(pick(tuple(PHENOMENA)))
        return None if pair is None else (pair[0] if label_hint == 1 else pair[1], label_hint)
    if task == "topic":
        # modifiers put other nouns before the verb, so the class can't be read off "any noun present"
        mod = pick((None, "pp", "src", "orc"))
        s = g.clause(label_hint, refl=label_hint in ANIMATE and g.rnd() < 0.2, mod=mod)
        return s.words, s.subj.cls
    s = g.sentence()
    if task == "mentions":
        found = {n.cls for n, _ in s.nouns}
        return s.words, [c for c in MENTION_CLASSES if c in found]
    return s.words, sum(num for _, num in s.nouns) / len(s.nouns)


def _make_task(task: str, seed: int, sizes: tuple[int, int, int], seen: set[str]) -> dict[str, list[dict]]:
    out = {}
    for split, n in zip(SPLITS, sizes):
        rng = random.Random(f"ltgbert-demo/{seed}/tasks/{task}/{split}")
        g = Grammar(rng)
        if task == "grammaticality":  # exactly balanced
            hints: list[object] = [1] * (n - n // 2) + [0] * (n // 2)
        elif task == "topic":  # classes as balanced as n allows
            hints = [CLASSES[i % len(CLASSES)] for i in range(n)]
        else:
            hints = [None] * n
        rng.shuffle(hints)
        rows = []
        for hint in hints:
            row = _draw_unseen(partial(_task_row, task, g, hint), seen)
            rows.append({"sentence": row[0], "label": row[1]})
        out[split] = rows
    return out


# Token-classification tasks: name -> (tag set, definition); rows {"tokens": [...], "tags": [...]}.
POS_TAGS = ("ADJ", "ADP", "ADV", "AUX", "DET", "NOUN", "NUM", "PRON", "PUNCT", "VERB")
ENTITY_TAGS = ("O", *(f"{p}-{c.upper()}" for c in CLASSES for p in "BI"))
TOKEN_TASKS = {
    "pos": (POS_TAGS, "universal part of speech of every word (UPOS names; the period is PUNCT)"),
    "entities": (
        ENTITY_TAGS,
        ("IOB2 chunks: every noun phrase (determiner, adjective, noun) is an entity of its noun's semantic class"),
    ),
}
_WORD_POS = {
    **{w: "DET" for w in (*DETERMINERS, "an")},
    "two": "NUM",
    "ever": "ADV",
    "there": "PRON",
    **{w: "PRON" for w in REFLEXIVES},
    **{w: "ADP" for w in (*NOUN_PREPOSITIONS, *LOCATIVE_PREPOSITIONS)},
    **{w: "AUX" for w in ("is", "are", "was", "were", "has", "have", "had")},
    **{w: "ADJ" for adjs in ADJECTIVES.values() for w in adjs},
    **{w: "VERB" for v in VERBS for w in v[:5]},
    **{w: "NOUN" for n in NOUNS for w in n.forms},
}
_NOUN_CLASS = {w: n.cls for n in NOUNS for w in n.forms}


def pos_tags(words: list[str]) -> list[str]:
    """UPOS tag of each lowercase word of a generated sentence (see the module docstring)."""
    tags = [_WORD_POS[w] for w in words]
    for i, w in enumerate(words):
        if w == "that" and (i + 1 == len(words) or tags[i + 1] not in ("ADJ", "NOUN")):
            tags[i] = "PRON"  # relative: followed by its verb or by the relative clause's subject
        elif tags[i] == "AUX" and i == 1 and words[0] == "there":
            tags[i] = "VERB"  # existential be is the main verb
    return tags


def entity_tags(words: list[str], pos: list[str]) -> list[str]:
    """IOB2 tags: each determiner (adjective) noun phrase is a B-/I- chunk of the noun's semantic class."""
    tags, start = ["O"] * len(words), None
    for i, tag in enumerate(pos):
        if tag in ("DET", "NUM"):
            start = i
        elif tag == "NOUN" and start is not None:
            kind = _NOUN_CLASS[words[i]].upper()
            tags[start : i + 1] = [f"B-{kind}"] + [f"I-{kind}"] * (i - start)
            start = None
    return tags


def _token_row(task: str, g: Grammar) -> tuple[list[str], list[str], list[str]]:
    """(words, tokens as written, tags) of one corpus-style sentence."""
    words = g.sentence().words
    pos = pos_tags(words)
    tokens = [*render(words)[:-1].split(" "), "."]
    tags = [*pos, "PUNCT"] if task == "pos" else [*entity_tags(words, pos), "O"]
    return words, tokens, tags


def _make_token_task(task: str, seed: int, sizes: tuple[int, int, int], seen: set[str]) -> dict[str, list[dict]]:
    out = {}
    for split, n in zip(SPLITS, sizes):
        g = Grammar(random.Random(f"ltgbert-demo/{seed}/tasks/{task}/{split}"))
        rows = [_draw_unseen(partial(_token_row, task, g), seen) for _ in range(n)]
        out[split] = [{"tokens": tokens, "tags": tags} for _, tokens, tags in rows]
    return out


def _draw_unseen(draw, seen: set[str], tries: int = 1000):
    """Draw until the sentence is new (not in the corpus nor in an earlier evaluation file), then claim it."""
    for _ in range(tries):
        got = draw()
        if got is None:
            continue
        words = got[0]
        sentence = render(words)
        if sentence not in seen:
            seen.add(sentence)
            return (sentence, *got[1:])
    raise RuntimeError("the grammar ran out of held-out sentences; lower num_words or the evaluation sizes")


# ----------------------------------------------------------------------------------------------------------
# generation


def _make_corpus(num_words: int, seed: int) -> tuple[list[str], list[str]]:
    """Documents of 3-8 sentences until the training part has num_words words; every 50th is held out."""
    g = Grammar(random.Random(f"ltgbert-demo/{seed}/corpus"))
    rnd, sentence = g.rnd, g.sentence
    train, validation, words = [], [], 0
    while words < num_words:
        sents = [sentence().words for _ in range(3 + int(rnd() * 6))]
        doc = "\n".join(map(render, sents))
        if len(train) % 49 == 48 and len(validation) * 49 < len(train):
            validation.append(doc)
        else:
            train.append(doc)
            words += sum(map(len, sents))
    if not validation:  # tiny corpora still get a validation file
        validation.append("\n".join(render(sentence().words) for _ in range(5)))
    return train, validation


def _check_params(num_words: int, seed: int, pairs_per_phenomenon: int, task_sizes) -> dict:
    """Validate the parameters (UserError names the fix) and return them as the manifest stores them."""

    def is_int(x: object) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if not is_int(num_words) or num_words < 1000:
        raise UserError(f"num_words must be an integer >= 1000, got {num_words!r}; pass e.g. --num_words 1000000")
    if not is_int(seed) or seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed!r}; pass e.g. --seed 0")
    if not is_int(pairs_per_phenomenon) or pairs_per_phenomenon < 1:
        raise UserError(
            f"pairs_per_phenomenon must be an integer >= 1, got {pairs_per_phenomenon!r}; "
            "pass e.g. --pairs_per_phenomenon 500"
        )
    sizes = tuple(task_sizes) if isinstance(task_sizes, (tuple, list)) else ()
    if len(sizes) != 3 or not all(is_int(n) and n >= 2 for n in sizes):
        raise UserError(
            f"task_sizes must be three integers >= 2 (train, validation, test), got {task_sizes!r}; "
            "pass e.g. --train_size 2000 --validation_size 500 --test_size 500"
        )
    return {
        "num_words": num_words,
        "seed": seed,
        "pairs_per_phenomenon": pairs_per_phenomenon,
        "task_sizes": list(sizes),
    }


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def generate_demo_data(
    out_dir: str | Path,
    num_words: int = 1_000_000,
    seed: int = 0,
    pairs_per_phenomenon: int = 500,
    task_sizes=(2000, 500, 500),
) -> dict:
    """Write the whole demo data set into out_dir (created; existing files are overwritten) and return the
    manifest. This is the worker: callers that want caching and atomic replacement use ensure_demo_data."""
    params = _check_params(num_words, seed, pairs_per_phenomenon, task_sizes)
    root = Path(out_dir)
    try:
        (root / "corpus").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"cannot create the demo data directory {root}: {e.strerror}; pass a writable --output_dir"
        ) from None

    # corpus
    train, validation = _make_corpus(num_words, seed)
    counts: dict = {"corpus": {}}
    seen: set[str] = set()  # every sentence written so far; evaluation sentences must be new
    for split, docs in (("train", train), ("validation", validation)):
        text = "\n\n".join(docs) + "\n"
        (root / "corpus" / f"{split}.txt").write_text(text, encoding="utf-8")
        lines = text.split("\n")
        seen.update(lines)
        counts["corpus"][split] = {
            "documents": len(docs),
            "sentences": len(lines) - len(docs),
            "words": len(text.split()),
        }
    seen.discard("")

    # minimal pairs: both sentences held out, pairs written in the order drawn
    counts["blimp"] = {}
    for uid, (field, term, _) in PHENOMENA.items():
        g = Grammar(random.Random(f"ltgbert-demo/{seed}/blimp/{uid}"))
        rows = []
        for pair_id in range(pairs_per_phenomenon):
            good, bad = _draw_unseen(partial(_pair_or_none, g, uid, seen), seen)
            seen.add(bad)
            rows.append(
                {
                    "sentence_good": good,
                    "sentence_bad": bad,
                    "field": field,
                    "linguistics_term": term,
                    "UID": uid,
                    "simple_LM_method": True,
                    "one_prefix_method": True,
                    "two_prefix_method": False,
                    "lexically_identical": False,
                    "pairID": str(pair_id),
                }
            )
        _write_jsonl(root / "blimp" / f"{uid}.jsonl", rows)
        counts["blimp"][uid] = len(rows)

    # classification and token-classification tasks
    counts["tasks"] = {}
    makers = [(task, _make_task) for task in TASKS] + [(task, _make_token_task) for task in TOKEN_TASKS]
    for task, make in makers:
        splits = make(task, seed, params["task_sizes"], seen)
        for split, rows in splits.items():
            _write_jsonl(root / "tasks" / task / f"{split}.jsonl", rows)
        counts["tasks"][task] = {split: len(rows) for split, rows in splits.items()}

    manifest = {
        "generator": "ltgbert.demo_data",
        "format_version": FORMAT_VERSION,
        "params": params,
        "counts": counts,
        "vocabulary_size": len(vocabulary()),
        "phenomena": {
            uid: {"field": f, "linguistics_term": t, "description": d} for uid, (f, t, d) in PHENOMENA.items()
        },
        "tasks": {
            **{
                name: {"problem_type": p, "label_names": None if names is None else list(names), "definition": d}
                for name, (p, names, d) in TASKS.items()
            },
            **{
                name: {"problem_type": "token_classification", "label_names": list(tags), "definition": d}
                for name, (tags, d) in TOKEN_TASKS.items()
            },
        },
    }
    # written last: a directory with a manifest is a complete one
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def _pair_or_none(g: Grammar, uid: str, seen: set[str]):
    """A pair whose bad sentence is new too (the good one is checked by _draw_unseen)."""
    pair = g.pair(uid)
    if pair is None or render(pair[1]) in seen:
        return None
    return pair[0], render(pair[1])


# ----------------------------------------------------------------------------------------------------------
# cache


@dataclass
class DemoPaths:
    root: Path
    corpus_train: Path
    corpus_validation: Path
    blimp_dir: Path
    tasks_dir: Path

    @classmethod
    def at(cls, root: str | Path) -> DemoPaths:
        root = Path(root)
        return cls(
            root, root / "corpus" / "train.txt", root / "corpus" / "validation.txt", root / "blimp", root / "tasks"
        )

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    def task_file(self, task: str, split: str) -> Path:
        return self.tasks_dir / task / f"{split}.jsonl"

    def blimp_files(self) -> list[Path]:
        return [self.blimp_dir / f"{uid}.jsonl" for uid in PHENOMENA]


def default_demo_dir() -> Path:
    """$LTGBERT_DEMO_DIR, else ~/.cache/ltgbert/demo."""
    env = os.environ.get("LTGBERT_DEMO_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ltgbert" / "demo"


def _read_manifest(root: Path) -> dict | None:
    try:
        data = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("generator") == "ltgbert.demo_data" else None


def _is_current(root: Path, params: dict) -> bool:
    data = _read_manifest(root)
    return data is not None and data.get("format_version") == FORMAT_VERSION and data.get("params") == params


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock, so concurrent callers generate once. Best effort: where flock is missing or
    refused (some network file systems) the atomic rename below still keeps the directory consistent."""
    try:
        import fcntl

        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except (ImportError, OSError):
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


def ensure_demo_data(
    demo_dir: str | Path | None = None,
    num_words: int = 1_000_000,
    seed: int = 0,
    pairs_per_phenomenon: int = 500,
    task_sizes=(2000, 500, 500),
) -> DemoPaths:
    """Return the demo data at demo_dir (default: default_demo_dir()), generating it unless its manifest
    already matches these parameters. Generation writes a temporary sibling directory and renames it into
    place, so a reader never sees a half-written directory and a failed run leaves the old data intact."""
    params = _check_params(num_words, seed, pairs_per_phenomenon, task_sizes)
    root = Path(demo_dir).expanduser() if demo_dir is not None else default_demo_dir()
    if _is_current(root, params):
        return DemoPaths.at(root)
    if root.exists() and not root.is_dir():
        raise UserError(f"{root} exists and is not a directory; pass another --output_dir")
    if root.is_dir() and any(root.iterdir()) and _read_manifest(root) is None:
        # never replace a directory we did not write
        raise UserError(f"{root} is not empty and holds no demo data manifest; pass an empty or new --output_dir")
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        with _lock(root.parent / f".{root.name}.lock"):
            if _is_current(root, params):  # another process finished while we waited
                return DemoPaths.at(root)
            tmp = _fresh_sibling(root, "tmp")
            tmp.mkdir()  # not mkdtemp: its 0700 mode would stick to the shared cache directory
            try:
                generate_demo_data(tmp, **params)
                _replace_dir(tmp, root, params)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        raise UserError(f"cannot write demo data to {root}: {e.strerror or e}; pass a writable --output_dir") from None
    return DemoPaths.at(root)


def _fresh_sibling(root: Path, tag: str) -> Path:
    """A hidden name next to root that no other process uses (same file system, so rename is atomic)."""
    return root.parent / f".{root.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _replace_dir(new: Path, root: Path, params: dict) -> None:
    """Rename new onto root; an existing root (stale parameters) is moved aside first and then deleted."""
    old = None
    if root.exists():
        old = _fresh_sibling(root, "old")
        os.rename(root, old)
    try:
        os.rename(new, root)
    except OSError:
        # without a working lock another process can win the race; its data is as good as ours
        if not _is_current(root, params):
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
