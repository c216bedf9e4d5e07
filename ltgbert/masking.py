"""The MLM collator: span, whole-word or subword masking, drawn per (seed, epoch, row).

LTG-BERT trains with span masking; this module offers it next to BERT's two schemes:
1. "span" (SpanBERT, Joshi et al. 2020, as used by LTG-BERT): repeatedly pick a random unmasked word and
   mask a span of whole words starting there, with a span length in words drawn from a geometric
   distribution Geo(p=0.2) truncated to `max_span_length` (10) and renormalised (mean 3.8 words, the
   SpanBERT numbers), until the masking budget is spent.
2. "word" (whole-word masking): random whole words until the budget is spent.
3. "subword": exactly the budget of random subword positions (original BERT).
Words come from the WordPiece vocabulary: a token starting with "##" continues the previous word; a
boolean table over the vocab is built once, so word boundaries cost one numpy gather per row.

The budget of a row is mlm_probability x (number of non-special tokens), rounded up or down at random
in proportion to the fraction, so the expected masked share is exactly mlm_probability. Whole words
overshoot a budget; the last word is therefore included with probability (budget left / its length),
which keeps the expectation exact too. Selected positions get [MASK] (80%), a random non-special token
(10%) or stay unchanged (10%), decided per token. Special tokens and padding are never selected and
random replacements never draw a special token.

Determinism: the masks of a row come from a numpy Generator seeded with (seed, epoch, idx), where idx is
the row index in the packed dataset. A row's mask therefore does not depend on the batch it lands in, on
the global RNG or on worker scheduling, and a resumed run (same sampler order, skip_first_batches) sees
exactly the batches of the uninterrupted run. Masks change with the epoch (dynamic masking): call
`set_epoch` at the start of every epoch. With DataLoader workers, use non-persistent workers (the default)
so that each epoch's workers receive the collator with its current epoch and mlm_probability.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ltgbert.errors import UserError

STRATEGIES = ("span", "word", "subword")
CONTINUATION_PREFIX = "##"


@dataclass
class VocabInfo:
    """What the collator needs from a tokenizer: tables over the vocabulary, built once."""

    pad_token_id: int
    mask_token_id: int
    is_special: np.ndarray  # bool [vocab]: never masked, never drawn as a random replacement
    is_word_start: np.ndarray  # bool [vocab]: False for "##" continuation pieces

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "VocabInfo":
        vocab = tokenizer.get_vocab()  # token -> id, added tokens included
        size = max(len(tokenizer), max(vocab.values()) + 1)
        is_special = np.zeros(size, dtype=bool)
        is_word_start = np.ones(size, dtype=bool)
        for token, i in vocab.items():
            if token.startswith(CONTINUATION_PREFIX):
                is_word_start[i] = False
        special_ids = set(tokenizer.all_special_ids)
        special_ids.update(i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special)
        is_special[sorted(special_ids)] = True
        if tokenizer.pad_token_id is None or tokenizer.mask_token_id is None:
            raise UserError("the tokenizer has no [PAD] or [MASK] token; train one with launch/train_tokenizer.py")
        return cls(tokenizer.pad_token_id, tokenizer.mask_token_id, is_special, is_word_start)


def truncated_geometric_pmf(p: float, max_length: int) -> np.ndarray:
    """P(length = k) for k = 1..max_length: Geo(p) restricted to [1, max_length] and renormalised."""
    k = np.arange(1, max_length + 1)
    pmf = p * (1 - p) ** (k - 1)
    return pmf / pmf.sum()


def mask_ratio_at(step: int, total_steps: int, start: float = 0.3, end: float = 0.15) -> float:
    """Linear masking-ratio schedule from `start` at step 0 to `end` at `total_steps` (constant after).
    The training loop sets `collator.mlm_probability = mask_ratio_at(step, ...)` before each batch is drawn."""
    if total_steps <= 0:
        return end
    frac = min(max(step / total_steps, 0.0), 1.0)
    return start + (end - start) * frac


class MlmCollator:
    """Pads a list of {"input_ids", "idx"} rows and masks them; returns LongTensors
    input_ids, attention_mask and labels (-100 where nothing is predicted)."""

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
    ):
        if strategy not in STRATEGIES:
            raise UserError(f"unknown masking strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
        if not (0.0 <= mask_replace_prob and 0.0 <= random_replace_prob and mask_replace_prob + random_replace_prob <= 1.0):
            raise UserError(
                f"mask_replace_prob {mask_replace_prob} + random_replace_prob {random_replace_prob} must be "
                f"non-negative and sum to at most 1; e.g. 0.8 and 0.1"
            )
        if max_span_length < 1 or not 0.0 < span_geometric_p <= 1.0:
            raise UserError(
                f"need max_span_length >= 1 and 0 < span_geometric_p <= 1; got {max_span_length}, {span_geometric_p}"
            )
        if seed < 0:
            raise UserError(f"seed must be non-negative, got {seed}")
        self.vocab = tokenizer if isinstance(tokenizer, VocabInfo) else VocabInfo.from_tokenizer(tokenizer)
        self.strategy = strategy
        self.mlm_probability = mlm_probability  # public: a schedule may change it between steps
        self.mask_replace_prob = mask_replace_prob
        self.random_replace_prob = random_replace_prob
        self.max_span_length = max_span_length
        self.span_length_pmf = truncated_geometric_pmf(span_geometric_p, max_span_length)
        self._span_cdf = np.cumsum(self.span_length_pmf)
        self.seed = seed
        self.epoch = 0
        self.pad_to_multiple_of = pad_to_multiple_of
        self._random_ids = np.flatnonzero(~self.vocab.is_special)  # replacements never draw specials

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

    # ----- batch ------------------------------------------------------------------------------------

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if any("idx" not in ex for ex in examples):
            raise KeyError("MlmCollator needs an 'idx' per example (the row index that seeds its mask); "
                           "use the dataset from ltgbert.data.build_pretraining_dataset")
        rows = [np.asarray(ex["input_ids"], dtype=np.int64) for ex in examples]
        length = max(len(r) for r in rows)
        if self.pad_to_multiple_of:
            length = math.ceil(length / self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(rows)
        input_ids = np.full((batch, length), self.vocab.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((batch, length), dtype=np.int64)
        labels = np.full((batch, length), -100, dtype=np.int64)
        for b, (row, ex) in enumerate(zip(rows, examples)):
            n = len(row)
            input_ids[b, :n], labels[b, :n] = self.mask_row(row, int(ex["idx"]))
            attention_mask[b, :n] = 1
        return {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attention_mask),
            "labels": torch.from_numpy(labels),
        }

    def mask_row(self, row: np.ndarray, idx: int) -> tuple[np.ndarray, np.ndarray]:
        """Mask one unpadded row; returns (input_ids, labels). Depends only on (seed, epoch, idx,
        mlm_probability, row)."""
        rng = np.random.default_rng((self.seed, self.epoch, idx))
        row = np.asarray(row, dtype=np.int64)
        candidate = ~self.vocab.is_special[row]
        n_candidates = int(candidate.sum())
        # randomised rounding: E[budget] = p * n exactly, so short rows are not biased downwards
        budget = int(math.floor(self._mlm_probability * n_candidates + rng.random()))
        budget = min(budget, n_candidates)
        if self.strategy == "subword":
            selected = self._select_subwords(rng, candidate, budget)
        else:
            selected = self._select_words(rng, row, candidate, budget)

        labels = np.full(row.shape, -100, dtype=np.int64)
        labels[selected] = row[selected]
        out = row.copy()
        u = rng.random(selected.size)
        to_mask = u < self.mask_replace_prob
        to_random = (u >= self.mask_replace_prob) & (u < self.mask_replace_prob + self.random_replace_prob)
        out[selected[to_mask]] = self.vocab.mask_token_id
        out[selected[to_random]] = self._random_ids[rng.integers(self._random_ids.size, size=int(to_random.sum()))]
        return out, labels

    # ----- selection --------------------------------------------------------------------------------

    @staticmethod
    def _select_subwords(rng: np.random.Generator, candidate: np.ndarray, budget: int) -> np.ndarray:
        positions = np.flatnonzero(candidate)
        return np.sort(rng.choice(positions, size=budget, replace=False))

    def _select_words(self, rng: np.random.Generator, row: np.ndarray, candidate: np.ndarray, budget: int) -> np.ndarray:
        positions = np.flatnonzero(candidate)
        if budget == 0:
            return positions[:0]
        # a candidate starts a word if its token does, or if it follows a special token / the row start
        # (a block may begin in the middle of a word: its first piece is then a word of its own)
        after_special = np.ones(positions.size, dtype=bool)
        after_special[1:] = positions[1:] != positions[:-1] + 1
        starts_word = self.vocab.is_word_start[row[positions]] | after_special
        word_of = np.cumsum(starts_word) - 1  # word index of every candidate position
        word_len = np.bincount(word_of)
        if self.strategy == "span":
            chosen = self._choose_spans(rng, word_len, budget)
        else:
            chosen = self._choose_words(rng, word_len, budget)
        return positions[chosen[word_of]]

    @staticmethod
    def _take_last_word(rng: np.random.Generator, budget_left: int, length: int) -> bool:
        """Include a word that overshoots the budget with probability budget_left / length: this keeps
        the expected number of masked tokens equal to the budget."""
        return budget_left >= length or rng.random() * length < budget_left

    def _choose_words(self, rng: np.random.Generator, word_len: np.ndarray, budget: int) -> np.ndarray:
        order = rng.permutation(word_len.size)
        cum = np.cumsum(word_len[order])
        k = int(np.searchsorted(cum, budget))  # first word that reaches the budget
        chosen = np.zeros(word_len.size, dtype=bool)
        chosen[order[:k]] = True
        if k < word_len.size:
            done = int(cum[k - 1]) if k else 0
            chosen[order[k]] = self._take_last_word(rng, budget - done, int(word_len[order[k]]))
        return chosen

    def draw_span_lengths(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n span lengths (in words) from the truncated geometric distribution `span_length_pmf`."""
        # the float cdf may end just below 1: clip the rare overflow to the maximum
        return np.minimum(np.searchsorted(self._span_cdf, rng.random(n), side="right") + 1, self.max_span_length)

    def _choose_spans(self, rng: np.random.Generator, word_len: np.ndarray, budget: int) -> np.ndarray:
        # plain Python over a handful of spans: cheaper than numpy calls on arrays of ~100 words
        lengths = word_len.tolist()
        n_words = len(lengths)
        chosen = bytearray(n_words)
        count, n_chosen, i, batch = 0, 0, 0, 16
        starts, spans = rng.integers(n_words, size=batch).tolist(), self.draw_span_lengths(rng, batch).tolist()
        while count < budget:
            if i == batch:  # random numbers come in small batches: one rng call per batch, not per span
                starts, spans = rng.integers(n_words, size=batch).tolist(), self.draw_span_lengths(rng, batch).tolist()
                i = 0
            start, span = starts[i], spans[i]
            i += 1
            if chosen[start]:
                # the start is uniform over unmasked words: redraw (by rejection while few words are
                # masked, directly among the free ones once most are)
                if 2 * n_chosen < n_words:
                    continue
                free = [w for w in range(n_words) if not chosen[w]]
                start = free[int(rng.integers(len(free)))]
            # a span running into an earlier one merges with it
            for w in range(start, min(start + span, n_words)):
                if chosen[w]:
                    continue
                if count + lengths[w] > budget and not self._take_last_word(rng, budget - count, lengths[w]):
                    return np.frombuffer(chosen, dtype=bool)
                chosen[w] = 1
                n_chosen += 1
                count += lengths[w]
                if count >= budget:
                    break
        return np.frombuffer(chosen, dtype=bool)
