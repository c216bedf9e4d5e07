"""The MLM collator: span, whole-word or subword masking, a pure function of (seed, epoch, row, mask ratio).

LTG-BERT trains with span masking; this module offers it next to BERT's two schemes:
1. "span" (SpanBERT, Joshi et al. 2020, as used by LTG-BERT): spans of whole words with a length in words
   drawn from a geometric distribution Geo(p=0.2) truncated to `max_span_length` (10) and renormalised
   (mean 3.8 words, the SpanBERT numbers), masked in random order until the masking budget is spent.
   The spans tile the row's words (consecutive spans of independent lengths, the first one cut by a random
   offset), and a random priority per span decides the order, which needs no loop: every span has the
   geometric length (except where the row edge or the budget cuts it) and every word the same chance to be
   masked; spans that happen to be neighbours merge, as overlapping SpanBERT spans do.
2. "word" (whole-word masking): the same with spans of one word: random whole words until the budget is spent.
3. "subword": exactly the budget of random subword positions (original BERT).

Word boundaries come from the tokenizer's own definition (`word_boundaries`, read from the tokenizers
pipeline, never guessed from a few tokens): WordPiece continuation pieces start with "##" (the model's
`continuing_subword_prefix`), SentencePiece-style vocabularies (Metaspace, Unigram or BPE) start a word with
"▁", byte-level BPE (GPT-2, RoBERTa) with "Ġ" (any whitespace byte); a token that ends in whitespace or the
marker (a newline, a bare "Ġ" or "▁") also ends the word, so the next token starts one. A token after a
special token or at the row start always starts a word (a block may begin in the middle of one). A tokenizer
with none of these has no known words, and span/word masking refuse it with a UserError instead of silently
masking subwords. Special-token ids come from the tokenizer (`all_special_ids` and added special tokens);
they are never selected and never drawn as random replacements.

The budget of a row is ratio x (number of non-special tokens), rounded up or down at random in proportion
to the fraction, so the expected masked share is exactly the ratio. Whole words overshoot a budget; the
word that crosses it is therefore included with probability (budget left / its length), which keeps the
expectation exact too. Selected positions get [MASK] (80%), a random non-special token (10%) or stay
unchanged (10%), decided per token.

Determinism and workers: every random number of a row is a counter-based hash (SplitMix64) of (seed, epoch,
idx, purpose, position), where idx is the row index in the packed dataset. A row's mask therefore does not
depend on the batch it lands in, on padding, on the global RNG, on the process or on the worker count, and
the whole batch is masked with a few vectorised numpy passes (no loop over rows or spans). Masks change with
the epoch (dynamic masking): call `set_epoch` at the start of every epoch, and use non-persistent DataLoader
workers (each epoch's workers then receive the collator with its current epoch).

Mask-ratio schedule: give the collator `mlm_probability_start` and `total_steps`, and rows that carry a
"step" key (the optimizer step they are consumed at; `ltgbert.batching.LoaderDataset` adds it), and the
ratio of each row is `mask_ratio_at(step, total_steps, mlm_probability_start, mlm_probability)`, computed in
whichever process collates. Rows without "step" use `collator.mlm_probability`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from ltgbert.errors import UserError

STRATEGIES = ("span", "word", "subword")
CONTINUATION_PREFIX = "##"
METASPACE = "\u2581"  # "▁"
_WHITESPACE_BYTES = b" \t\n\r\x0b\x0c"

# SplitMix64 (Steele, Lea & Flood 2014): the golden-ratio increment and the two multipliers of its finaliser
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
# the purposes a row draws random numbers for: each gets its own counter range
_BUDGET, _TILE_KEY, _SPAN_LENGTH, _ACTION = 0, 1, 2, 3
_POSITION_BITS = 16  # positions (and spans) per row < 65536; the sort keys carry the position in these bits
_TABLE_BITS = 20  # resolution of the span-length sampler


# -----------------------------------------------------------------------------
# word boundaries from the tokenizer


def _components(spec: dict, key: str) -> list[dict]:
    """The steps of a tokenizers pipeline part ("normalizer", "pre_tokenizer", "decoder"), Sequences unrolled."""
    out, stack = [], [spec.get(key)]
    while stack:
        node = stack.pop()
        if not node:
            continue
        if node.get("type") == "Sequence":
            stack.extend(reversed(node.get("pretokenizers") or node.get("normalizers") or node.get("decoders") or []))
        else:
            out.append(node)
    return out


def word_boundaries(tokenizer) -> tuple[str | None, str, str]:
    """(scheme, marker, description) of a fast tokenizer (or a `tokenizers.Tokenizer`).

    scheme is "wordpiece" (marker: the continuation prefix), "metaspace" (marker: the replacement character
    that starts a word) or "bytelevel" (marker "Ġ"), read from the model type, pre-tokenizer, decoder and
    normaliser; None when the pipeline marks no word boundaries. The description names the pipeline, for
    error messages.
    """
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if not hasattr(backend, "to_str"):
        return None, "", f"{type(tokenizer).__name__} (not a fast tokenizer)"
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    pre, dec, norm = (_components(spec, k) for k in ("pre_tokenizer", "decoder", "normalizer"))
    steps = ", ".join(c.get("type", "?") for c in pre) or "none"
    description = f"{model.get('type', '?')} model, pre-tokenizer {steps}"
    if model.get("type") == "WordPiece":
        return "wordpiece", model.get("continuing_subword_prefix") or CONTINUATION_PREFIX, description
    if any(c.get("type") == "ByteLevel" for c in pre + dec):
        return "bytelevel", "\u0120", description
    for c in pre + dec:
        if c.get("type") == "Metaspace":
            return "metaspace", c.get("replacement") or METASPACE, description
    for c in norm:  # SentencePiece conversions that turn spaces into "▁" in the normaliser (Llama-style)
        if c.get("type") == "Replace" and (c.get("pattern") or {}).get("String") == " " and c.get("content"):
            return "metaspace", c["content"], description
    if model.get("type") == "BPE" and model.get("continuing_subword_prefix"):
        return "wordpiece", model["continuing_subword_prefix"], description
    return None, "", description


def _byte_level_alphabet() -> dict[str, int]:
    """Character -> byte of the byte-level BPE alphabet (GPT-2): printable Latin-1 bytes stand for themselves,
    the other bytes for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in chars]
    chars.update({b: chr(256 + n) for n, b in enumerate(others)})
    return {c: b for b, c in chars.items()}


@dataclass
class VocabInfo:
    """What the collator needs from a tokenizer: tables over the vocabulary, built once."""

    pad_token_id: int
    mask_token_id: int
    is_special: np.ndarray  # bool [vocab]: never masked, never drawn as a random replacement
    is_word_start: np.ndarray  # bool [vocab]: the token begins a word
    ends_word: np.ndarray | None = None  # bool [vocab]: the next token begins a word (a newline, a bare "Ġ")
    word_scheme: str | None = "wordpiece"  # None: no word boundaries known, span/word masking refused
    tokenizer_kind: str = ""  # the pipeline, for the refusal message

    @classmethod
    def from_tokenizer(cls, tokenizer) -> VocabInfo:
        if tokenizer.pad_token_id is None or tokenizer.mask_token_id is None:
            raise UserError("the tokenizer has no [PAD] or [MASK] token; train one with launch/train_tokenizer.py")
        vocab = tokenizer.get_vocab()  # token -> id, added tokens included
        size = max(len(tokenizer), max(vocab.values()) + 1)
        added = getattr(tokenizer, "added_tokens_decoder", {})
        special_ids = set(tokenizer.all_special_ids) | {i for i, t in added.items() if t.special}
        special_ids |= {tokenizer.pad_token_id, tokenizer.mask_token_id}
        is_special = np.zeros(size, dtype=bool)
        is_special[sorted(special_ids)] = True
        scheme, marker, kind = word_boundaries(tokenizer)
        is_word_start = np.ones(size, dtype=bool)
        ends_word = np.zeros(size, dtype=bool)
        alphabet = _byte_level_alphabet() if scheme == "bytelevel" else {}
        for token, i in vocab.items():
            if i in added:  # added tokens are whole units, not pieces of the model's vocabulary
                continue
            if scheme == "wordpiece":
                is_word_start[i] = not token.startswith(marker)
            elif scheme == "metaspace" and token:  # a newline or tab (not turned into the marker) is a space too
                is_word_start[i] = token.startswith(marker) or token[0].isspace()
                ends_word[i] = token.endswith(marker) or token[-1].isspace()
            elif scheme == "bytelevel" and token:
                is_word_start[i] = alphabet.get(token[0], 0) in _WHITESPACE_BYTES
                ends_word[i] = alphabet.get(token[-1], 0) in _WHITESPACE_BYTES
        return cls(tokenizer.pad_token_id, tokenizer.mask_token_id, is_special, is_word_start, ends_word, scheme, kind)


# -----------------------------------------------------------------------------
# distributions, schedule, counter-based random numbers


def truncated_geometric_pmf(p: float, max_length: int) -> np.ndarray:
    """P(length = k) for k = 1..max_length: Geo(p) restricted to [1, max_length] and renormalised."""
    k = np.arange(1, max_length + 1)
    pmf = p * (1 - p) ** (k - 1)
    return pmf / pmf.sum()


def mask_ratio_at(step: int, total_steps: int, start: float = 0.3, end: float = 0.15) -> float:
    """Linear masking-ratio schedule from `start` at step 0 to `end` at `total_steps` (constant after)."""
    if total_steps <= 0:
        return end
    frac = min(max(step / total_steps, 0.0), 1.0)
    return start + (end - start) * frac


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, in place on a uint64 array (a bijection that scrambles every bit)."""
    x ^= x >> np.uint64(30)
    x *= _MIX1
    x ^= x >> np.uint64(27)
    x *= _MIX2
    x ^= x >> np.uint64(31)
    return x


def _row_keys(seed: int, epoch: int, idx: np.ndarray) -> np.ndarray:
    """One 64-bit key per row from (seed, epoch, idx): distinct rows (or epochs, seeds) get unrelated keys."""
    base = _mix(np.array([seed], dtype=np.uint64) * _GOLDEN + _GOLDEN)
    base = _mix(base ^ (np.array([epoch], dtype=np.uint64) * _GOLDEN + _GOLDEN))
    return _mix(idx.astype(np.uint64) * _GOLDEN ^ base)


def _random_bits(keys: np.ndarray, purpose: int, n: int) -> np.ndarray:
    """uint64 [rows, n]: the n-th output of SplitMix64 seeded with the row key, per purpose."""
    counter = (np.uint64(purpose) << np.uint64(32)) + np.arange(1, n + 1, dtype=np.uint64)
    return _mix(keys[:, None] + counter[None, :] * _GOLDEN)


def _uniform(bits: np.ndarray) -> np.ndarray:
    """Floats in [0, 1) from the top 53 bits."""
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _columns(examples) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(all ids concatenated, row lengths, idx, steps or None, words or None) of a batch of rows: a list of
    row dicts, a pyarrow Table or a dict of columns."""
    if isinstance(examples, (list, tuple)):
        if any("idx" not in ex for ex in examples):
            raise KeyError(
                "MlmCollator needs an 'idx' per example (the row index that seeds its mask); "
                "use the dataset from ltgbert.data.build_pretraining_dataset"
            )
        first = examples[0] if examples else {}
        columns = {key: [ex[key] for ex in examples] for key in ("input_ids", "idx", "step", "words") if key in first}
    else:
        names = examples.column_names if hasattr(examples, "column_names") else list(examples)
        if "idx" not in names:
            raise KeyError("MlmCollator needs an 'idx' column (the row index that seeds its mask)")
        columns = {key: examples[key] for key in ("input_ids", "idx", "step", "words") if key in names}
    ids = columns["input_ids"]
    if hasattr(ids, "combine_chunks") or hasattr(ids, "flatten"):  # pyarrow (Chunked)ListArray
        ids = ids.combine_chunks() if hasattr(ids, "combine_chunks") else ids
        lengths = np.diff(np.asarray(ids.offsets)).astype(np.int64)
        flat = np.asarray(ids.flatten()).astype(np.int64)
    else:
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        if len(ids) and isinstance(ids[0], np.ndarray):
            flat = np.concatenate(ids).astype(np.int64, copy=False)
        else:
            flat = np.fromiter(chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))

    def column(key):
        if key not in columns:
            return None
        values = columns[key]
        return np.asarray(values.to_numpy() if hasattr(values, "to_numpy") else values, dtype=np.int64)

    return flat, lengths, column("idx"), column("step"), column("words")


# -----------------------------------------------------------------------------
# the collator


class MlmCollator:
    """Pads a list of {"input_ids", "idx"} rows and masks them; returns LongTensors input_ids, attention_mask
    and labels (-100 where nothing is predicted), plus "words" (LongTensor [batch]) when the rows carry a
    "words" count. Other keys of a row ("step", "real", ...) are read or ignored, never passed on."""

    def __init__(
        self,
        tokenizer,
        strategy: str = "span",
        mlm_probability: float = 0.15,
        mask_replace_prob: float = 0.8,
        random_replace_prob: float = 0.1,
        max_span_length: int = 10,
        span_geometric_p: float = 0.2,
        seed: int = 0,
        pad_to_multiple_of: int | None = None,
        mlm_probability_start: float | None = None,
        total_steps: int | None = None,
    ):
        if strategy not in STRATEGIES:
            raise UserError(f"unknown masking strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
        if not (
            0.0 <= mask_replace_prob and 0.0 <= random_replace_prob and mask_replace_prob + random_replace_prob <= 1.0
        ):
            raise UserError(
                f"mask_replace_prob {mask_replace_prob} + random_replace_prob {random_replace_prob} must be "
                f"non-negative and sum to at most 1; e.g. 0.8 and 0.1"
            )
        if not 1 <= max_span_length < (1 << _POSITION_BITS) or not 0.0 < span_geometric_p <= 1.0:
            raise UserError(
                f"need max_span_length >= 1 and 0 < span_geometric_p <= 1; got {max_span_length}, {span_geometric_p}"
            )
        if seed < 0:
            raise UserError(f"seed must be non-negative, got {seed}")
        if mlm_probability_start is not None and (total_steps is None or not 0.0 <= mlm_probability_start <= 1.0):
            raise UserError(
                f"a mask-ratio schedule needs mlm_probability_start in [0, 1] and total_steps; got "
                f"{mlm_probability_start}, {total_steps}"
            )
        self.vocab = tokenizer if isinstance(tokenizer, VocabInfo) else VocabInfo.from_tokenizer(tokenizer)
        if strategy != "subword" and self.vocab.word_scheme is None:
            raise UserError(
                f"masking strategy {strategy!r} needs word boundaries, but the tokenizer ({self.vocab.tokenizer_kind}) "
                f"marks none (WordPiece '##', SentencePiece '\u2581' or byte-level BPE '\u0120'); use --masking "
                f"subword or such a tokenizer"
            )
        self.strategy = strategy
        self.mlm_probability = mlm_probability  # public: rows without a "step" use it; settable between steps
        self.mlm_probability_start = mlm_probability_start
        self.mlm_probability_end = float(mlm_probability)  # where the schedule ends
        self.total_steps = total_steps
        self.mask_replace_prob = mask_replace_prob
        self.random_replace_prob = random_replace_prob
        self.max_span_length = max_span_length
        self.span_length_pmf = truncated_geometric_pmf(span_geometric_p, max_span_length)
        self._span_cdf = np.cumsum(self.span_length_pmf)
        # inverse cdf on a 2^20 grid: one gather per draw; each length's probability is exact to 2^-20
        grid = (np.arange(1 << _TABLE_BITS) + 0.5) / (1 << _TABLE_BITS)
        self._span_table = self._lengths_from_uniform(grid).astype(np.min_scalar_type(max_span_length))  # 1 MB
        self.seed = seed
        self.epoch = 0
        self.pad_to_multiple_of = pad_to_multiple_of
        self._random_ids = np.flatnonzero(~self.vocab.is_special)  # replacements never draw specials
        ends = self.vocab.ends_word
        self._ends_word = ends if ends is not None and ends.any() else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def mlm_probability(self) -> float:
        return self._mlm_probability

    @mlm_probability.setter
    def mlm_probability(self, value: float) -> None:
        if not 0.0 <= value <= 1.0:
            raise UserError(f"mlm_probability must be in [0, 1], got {value}")
        self._mlm_probability = float(value)

    def mask_ratio(self, step: int | None = None) -> float:
        """The ratio of a row consumed at optimizer step `step` (None: no step known)."""
        if step is None or self.mlm_probability_start is None:
            return self._mlm_probability
        return mask_ratio_at(int(step), self.total_steps, self.mlm_probability_start, self.mlm_probability_end)

    # ----- batch ------------------------------------------------------------------------------------

    def __call__(self, examples) -> dict[str, torch.Tensor]:
        """Collate a list of row dicts, or the same rows as columns: a pyarrow Table (what a
        `datasets.Dataset` in "arrow" format returns for a list of indices) or a dict of columns. Columns
        skip building a Python dict and list per row, which costs more than the masking."""
        flat, lengths, idx, steps, words = _columns(examples)
        length = int(lengths.max()) if lengths.size else 0
        if self.pad_to_multiple_of:
            length = math.ceil(length / self.pad_to_multiple_of) * self.pad_to_multiple_of
        attention = np.arange(length)[None, :] < lengths[:, None]
        input_ids = np.full((lengths.size, length), self.vocab.pad_token_id, dtype=np.int64)
        input_ids[attention] = flat  # row-major order: row by row
        inputs, labels = self.mask_batch(input_ids, lengths, idx, self.mask_ratios(steps, lengths.size))
        # One storage for the whole batch: a DataLoader worker hands each storage over through its own shared
        # memory segment, so four tensors in one segment cost the training process a third of the time.
        parts = [inputs, attention, labels] + ([words] if words is not None else [])
        storage = torch.empty(sum(p.size for p in parts), dtype=torch.long)
        flat_out, start, views = storage.numpy(), 0, []
        for part in parts:
            flat_out[start : start + part.size] = part.ravel()
            views.append(storage[start : start + part.size].view(part.shape))
            start += part.size
        out = dict(zip(("input_ids", "attention_mask", "labels"), views))
        if words is not None:
            out["words"] = views[3]
        return out

    def mask_ratios(self, steps: np.ndarray | None, n: int) -> np.ndarray:
        """float64 [n]: each row's ratio, `mask_ratio(step)` for the rows' steps (None: no steps known)."""
        if steps is None or self.mlm_probability_start is None:
            return np.full(n, self._mlm_probability)
        if self.total_steps <= 0:
            return np.full(n, self.mlm_probability_end)
        frac = np.clip(steps / self.total_steps, 0.0, 1.0)
        return self.mlm_probability_start + (self.mlm_probability_end - self.mlm_probability_start) * frac

    def mask_row(self, row: np.ndarray, idx: int) -> tuple[np.ndarray, np.ndarray]:
        """Mask one unpadded row at `collator.mlm_probability`; returns (input_ids, labels)."""
        row = np.asarray(row, dtype=np.int64)[None, :]
        inputs, labels = self.mask_batch(
            row, np.array([row.shape[1]]), np.array([idx]), np.array([self._mlm_probability])
        )
        return inputs[0], labels[0]

    def mask_batch(self, input_ids: np.ndarray, lengths: np.ndarray, idx: np.ndarray, ratios: np.ndarray):
        """Mask a padded int64 [batch, length] array; returns (input_ids, labels). Row b depends only on
        (seed, epoch, idx[b], ratios[b]) and its own tokens."""
        batch, length = input_ids.shape
        if length >= 1 << _POSITION_BITS:
            raise UserError(f"rows of {length} tokens are too long to mask; use at most {(1 << _POSITION_BITS) - 1}")
        keys = _row_keys(self.seed, self.epoch, idx)
        valid = np.arange(length)[None, :] < lengths[:, None]
        candidate = valid & ~self.vocab.is_special[input_ids]
        n_candidates = candidate.sum(axis=1)
        u_row = _uniform(_random_bits(keys, _BUDGET, 2))
        # randomised rounding: E[budget] = ratio * n exactly, so short rows are not biased downwards
        budget = np.minimum(np.floor(ratios * n_candidates + u_row[:, 0]).astype(np.int64), n_candidates)
        selected = self._select(input_ids, candidate, keys, budget, u_row[:, 1])

        labels = np.where(selected, input_ids, -100)
        action = _random_bits(keys, _ACTION, length)
        u_action = (action & np.uint64(0xFFFFFFFF)).astype(np.float64) * (1.0 / (1 << 32))
        replacement = self._random_ids[
            ((action >> np.uint64(32)) * np.uint64(self._random_ids.size) >> np.uint64(32)).astype(np.int64)
        ]
        to_mask = selected & (u_action < self.mask_replace_prob)
        to_random = selected & ~to_mask & (u_action < self.mask_replace_prob + self.random_replace_prob)
        out = np.where(to_mask, self.vocab.mask_token_id, input_ids)
        out = np.where(to_random, replacement, out)
        return out, labels

    # ----- selection --------------------------------------------------------------------------------

    def _word_starts(self, input_ids: np.ndarray, candidate: np.ndarray) -> np.ndarray:
        """bool [batch, length]: candidates that begin a word (after a non-candidate, a word-ending token, or
        by their own token)."""
        if self.strategy == "subword":
            return candidate
        before = np.zeros_like(candidate)
        before[:, 1:] = candidate[:, :-1]
        starts = self.vocab.is_word_start[input_ids] | ~before
        if self._ends_word is not None:
            starts[:, 1:] |= self._ends_word[input_ids[:, :-1]]
        return candidate & starts

    def _select(self, input_ids, candidate, keys, budget, u_last) -> np.ndarray:
        """bool [batch, length]: the selected positions. Words are grouped into spans (one word per span for
        word/subword masking); the spans are taken in the order of a random key until the budget is spent."""
        batch, length = candidate.shape
        word = np.cumsum(self._word_starts(input_ids, candidate), axis=1) - 1  # word index of every candidate
        np.maximum(word, 0, out=word)
        span = self._span_of_word(keys, length)
        span_of_token = np.take_along_axis(span, word, axis=1)
        span_key = _random_bits(keys, _TILE_KEY, length)
        # sort key: the span's random key in the high bits, the position in the low ones, so a span's tokens
        # (and so its words) stay together and in order; non-candidates sort last
        key = (
            np.take_along_axis(span_key, span_of_token, axis=1)
            >> np.uint64(_POSITION_BITS)
            << np.uint64(_POSITION_BITS)
        )
        key |= np.arange(length, dtype=np.uint64)[None, :]
        key[~candidate] = np.iinfo(np.uint64).max
        key.sort(axis=1)
        position = (key & np.uint64((1 << _POSITION_BITS) - 1)).astype(np.int64)
        rank = np.arange(length)[None, :]
        in_row = rank < candidate.sum(axis=1)[:, None]
        position = np.where(in_row, position, length)  # a spare column takes the non-candidates
        word_padded = np.empty((batch, length + 1), dtype=word.dtype)
        word_padded[:, :length], word_padded[:, length] = word, -1
        word_sorted = np.take_along_axis(word_padded, position, axis=1)

        # first and last rank of every token's word, in the sorted order
        first = np.ones_like(in_row)
        first[:, 1:] = word_sorted[:, 1:] != word_sorted[:, :-1]
        last = np.ones_like(in_row)
        last[:, :-1] = first[:, 1:]
        word_first = np.maximum.accumulate(np.where(first, rank, 0), axis=1)
        word_last = np.minimum.accumulate(np.where(last, rank, length)[:, ::-1], axis=1)[:, ::-1]
        # whole words inside the budget; the word that crosses it with probability (budget left) / (its length)
        b = budget[:, None]
        crossing = (word_first < b) & (word_last >= b)
        take_crossing = u_last[:, None] * (word_last - word_first + 1) < b - word_first
        chosen = in_row & ((word_last < b) | (crossing & take_crossing))
        selected = np.zeros((batch, length + 1), dtype=bool)
        np.put_along_axis(selected, position, chosen, axis=1)
        return selected[:, :length]

    def _span_of_word(self, keys: np.ndarray, length: int) -> np.ndarray:
        """int64 [batch, length]: the span of each word index. Spans tile the words: consecutive lengths from
        the truncated geometric distribution, the first one cut by a random offset."""
        words = np.arange(length)
        if self.strategy != "span":
            return np.broadcast_to(words, (keys.size, length))
        lengths = self._span_table[
            (_random_bits(keys, _SPAN_LENGTH, length + 1) >> np.uint64(64 - _TABLE_BITS)).astype(np.int64)
        ]
        offset = np.floor(lengths[:, 0] * _uniform(_random_bits(keys, _BUDGET, 3)[:, 2])).astype(np.int64)
        ends = np.cumsum(lengths, axis=1, dtype=np.int64) - offset[:, None]  # where each span ends (>= 1)
        starts = np.zeros((keys.size, length + 1), dtype=np.int64)
        np.put_along_axis(starts, np.clip(ends, 0, length), 1, axis=1)
        return np.cumsum(starts[:, :length], axis=1)

    def draw_span_lengths(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n span lengths (in words) from the truncated geometric distribution `span_length_pmf`."""
        return self._lengths_from_uniform(rng.random(n))

    def _lengths_from_uniform(self, u: np.ndarray) -> np.ndarray:
        # the float cdf may end just below 1: clip the rare overflow to the maximum
        return np.minimum(np.searchsorted(self._span_cdf, u, side="right") + 1, self.max_span_length)
