"""Zero-shot minimal-pair evaluation (BLiMP format) by pseudo-log-likelihood.

BabyLM entrants judge a pretrained encoder first by BLiMP: for each minimal pair the model should prefer the
grammatical sentence. An encoder has no left-to-right probability, so a sentence is scored by its
pseudo-log-likelihood (PLL, Salazar et al., 2020): every token is masked in turn and the log probabilities of
the true tokens are summed. Plain PLL overrates words split into several pieces (the later pieces are easy to
guess when the earlier ones are visible), so the ``within_word_l2r`` variant (Kauf and Ivanova, 2023) also
masks the rest of the word to the right of the scored piece.

Efficiency: a sentence of T tokens needs about T forward passes, so the masked copies of ALL sentences are
flattened into one list of (sentence, position) items, sorted by length (little padding) and cut into batches
by a token budget; the per-copy log probabilities are scattered back onto their sentences with one
``index_add_`` on the device, so the loop never waits on the host. On a GPU the forward runs under bf16
autocast; the log-softmax is always taken in float32.

Public API:
    load_blimp(path_or_dir) -> list[dict]                    validated pairs, loaded once
    score_sentences(model, tokenizer, sentences, ...) -> list[float]   PLL per sentence
    evaluate_blimp(model, tokenizer, pairs, ...) -> dict      accuracies by UID / field / overall
    format_table(results) -> str, flatten_results(results, prefix) -> dict[str, float]  (printing, logging)

The pretraining loop calls ``evaluate_blimp`` on the main process with the UNWRAPPED model (not the DDP or
DeepSpeed wrapper); the model is put in eval mode and its previous mode is restored afterwards.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from ltgbert.errors import UserError

# the official BLiMP fields; extra fields (e.g. "lexically_identical") are kept but not required
BLIMP_FIELDS = ("sentence_good", "sentence_bad", "field", "linguistics_term", "UID", "pairID")
VARIANTS = ("pll", "within_word_l2r")
DEFAULT_BATCH_TOKENS = 8192


# -----------------------------------------------------------------------------
# loading and validation


def _load_jsonl(path: Path) -> list[dict]:
    pairs = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save the file as UTF-8") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror}); check the path and its permissions") from None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue  # a trailing blank line is common in hand-made files and harmless
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg}); each line must be one JSON object") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object with the BLiMP fields, got {type(row).__name__}")
        for field in BLIMP_FIELDS:
            if field not in row:
                raise UserError(f"{path}:{lineno}: missing field '{field}'; BLiMP rows need {', '.join(BLIMP_FIELDS)}")
        for field in ("sentence_good", "sentence_bad"):
            if not isinstance(row[field], str) or not row[field].strip():
                raise UserError(f"{path}:{lineno}: field '{field}' must be a non-empty string")
        # UIDs and fields become dict keys and TensorBoard tags; pairIDs are ints in some copies of BLiMP
        for field in ("field", "linguistics_term", "UID", "pairID"):
            row[field] = str(row[field])
        pairs.append(row)
    if not pairs:
        raise UserError(f"{path}: no pairs in file (empty); give a BLiMP jsonl file with one pair per line")
    return pairs


def load_blimp(path_or_dir: str | Path) -> list[dict]:
    """Read one BLiMP-format jsonl file, or every ``*.jsonl`` file in a directory (sorted by name).

    Every row must carry the official fields (sentence_good, sentence_bad, field, linguistics_term, UID, pairID);
    a bad row raises UserError naming the file, the line number and the field.
    """
    path = Path(path_or_dir)
    if not path.exists():
        raise UserError(f"BLiMP path {path} does not exist; pass a jsonl file or a directory of jsonl files")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".jsonl" and p.is_file())
        if not files:
            raise UserError(f"BLiMP directory {path} holds no *.jsonl files; pass a directory of BLiMP jsonl files")
    else:
        files = [path]
    return [row for f in files for row in _load_jsonl(f)]


# -----------------------------------------------------------------------------
# masked copies


def _tokenize(tokenizer, sentences: Sequence[str], variant: str) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids per sentence, and for each token the index of the last token it must be masked together with.

    ``span_end[t] == t`` for plain PLL; for within_word_l2r it is the last piece of t's word, so masking
    positions t..span_end[t] hides the rest of the word to the right. Special tokens get -1: never masked
    nor scored.
    """
    if variant == "within_word_l2r" and not getattr(tokenizer, "is_fast", False):
        raise UserError("variant within_word_l2r needs a fast tokenizer (word_ids); use a tokenizers-backed one")
    enc = tokenizer(list(sentences), add_special_tokens=True, return_special_tokens_mask=True)
    all_ids, all_ends = [], []
    for i, ids in enumerate(enc["input_ids"]):
        special = enc["special_tokens_mask"][i]
        words = enc.word_ids(i) if getattr(tokenizer, "is_fast", False) else [None] * len(ids)
        ends = []
        for t in range(len(ids)):
            if special[t]:
                ends.append(-1)
                continue
            end = t
            if variant == "within_word_l2r" and words[t] is not None:
                while end + 1 < len(ids) and not special[end + 1] and words[end + 1] == words[t]:
                    end += 1
            ends.append(end)
        all_ids.append(list(ids))
        all_ends.append(ends)
    return all_ids, all_ends


def _make_batches(lengths: torch.Tensor, batch_tokens: int) -> list[tuple[int, int]]:
    """Cut copies (already sorted by decreasing length) into [start, stop) ranges of at most batch_tokens
    padded tokens; a single copy longer than the budget still gets a batch of its own."""
    batches, start, n = [], 0, len(lengths)
    lengths = lengths.tolist()
    while start < n:
        # the first copy is the longest in its batch, so it sets the padded width
        size = max(1, batch_tokens // max(1, lengths[start]))
        stop = min(n, start + size)
        batches.append((start, stop))
        start = stop
    return batches


def _returns_labelled_logits(model) -> bool:
    """Our LtgBertForMaskedLM projects onto the vocabulary only the labelled positions when labels are given
    ([n_masked, V] logits): with one masked position per copy that skips T-1 of T vocab projections."""
    return getattr(getattr(model, "config", None), "model_type", None) == "ltgbert"


def _autocast(device: torch.device, bf16: bool | None):
    if bf16 is None:
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if not bf16:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


# -----------------------------------------------------------------------------
# scoring


@torch.no_grad()
def score_sentences(
    model,
    tokenizer,
    sentences: Sequence[str],
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    variant: str = "pll",
    device: torch.device | str | None = None,
    bf16: bool | None = None,
) -> list[float]:
    """Pseudo-log-likelihood of every sentence (natural log), in the order given.

    The model must already sit on ``device`` (default: the device of its parameters). ``bf16=None`` means bf16
    autocast on a GPU that supports it and full precision elsewhere.
    """
    if variant not in VARIANTS:
        raise UserError(f"unknown variant '{variant}'; choose one of {', '.join(VARIANTS)}")
    if batch_tokens < 1:
        raise UserError(f"batch_tokens must be >= 1, got {batch_tokens}")
    if tokenizer.mask_token_id is None:
        raise UserError("the tokenizer has no mask token; PLL scoring needs a masked language model tokenizer")
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        # DDP's forward may broadcast buffers, a collective that hangs when only the main process evaluates
        model = model.module
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if not sentences:
        return []

    ids, ends = _tokenize(tokenizer, sentences, variant)
    max_len = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    longest = max(len(x) for x in ids)
    if max_len is not None and longest > max_len:
        i = max(range(len(ids)), key=lambda k: len(ids[k]))
        raise UserError(f"sentence {sentences[i][:60]!r} has {longest} tokens, more than the model's "
                        f"max_position_embeddings={max_len}; shorten it or drop the pair")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    # one row per sentence, padded; the copies only index into it
    table = torch.full((len(ids), longest), pad_id, dtype=torch.long)
    for i, row in enumerate(ids):
        table[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    lengths = torch.tensor([len(x) for x in ids], dtype=torch.long)

    # flatten every (sentence, position) masked copy: which sentence, which token is scored, where the mask ends
    sent, pos, end = [], [], []
    for i, row_ends in enumerate(ends):
        for t, e in enumerate(row_ends):
            if e >= 0:
                sent.append(i)
                pos.append(t)
                end.append(e)
    sent_t = torch.tensor(sent, dtype=torch.long)
    pos_t = torch.tensor(pos, dtype=torch.long)
    end_t = torch.tensor(end, dtype=torch.long)
    # longest first: padding stays small, and an out-of-memory shows up in the first batch, not the last
    order = torch.sort(lengths[sent_t], descending=True, stable=True).indices
    sent_t, pos_t, end_t = sent_t[order], pos_t[order], end_t[order]
    copy_len = lengths[sent_t]

    # everything indexed inside the loop lives on the device; only the batch widths are read on the host
    table, lengths = table.to(device), lengths.to(device)
    sent_t, pos_t, end_t = sent_t.to(device), pos_t.to(device), end_t.to(device)
    scores = torch.zeros(len(ids), dtype=torch.float64, device=device)
    labelled = _returns_labelled_logits(model)
    was_training = model.training
    model.eval()
    try:
        with _autocast(device, bf16):
            for start, stop in _make_batches(copy_len, batch_tokens):
                s, p, e = sent_t[start:stop], pos_t[start:stop], end_t[start:stop]
                width = int(copy_len[start])
                rows = torch.arange(stop - start, device=device)
                cols = torch.arange(width, device=device)
                input_ids = table[s, :width]  # [copies, width]
                attention_mask = (cols[None, :] < lengths[s][:, None]).long()
                targets = input_ids[rows, p]
                masked = (cols[None, :] >= p[:, None]) & (cols[None, :] <= e[:, None])  # [copies, width]
                input_ids = input_ids.masked_fill(masked, tokenizer.mask_token_id)
                logits = _masked_logits(model, input_ids, attention_mask, rows, p, targets, labelled)
                logprobs = torch.log_softmax(logits.float(), dim=-1)  # [copies, vocab]
                scores.index_add_(0, s, logprobs[rows, targets].double())
    finally:
        model.train(was_training)
    return scores.tolist()  # the only host sync


def _masked_logits(model, input_ids, attention_mask, rows, positions, targets, labelled: bool) -> torch.Tensor:
    """Logits [copies, vocab] at the one scored position of every copy."""
    if labelled:
        labels = torch.full_like(input_ids, -100)
        labels[rows, positions] = targets
        logits = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits
        if logits.dim() == 2 and logits.shape[0] == len(rows):
            return logits  # [n_masked, vocab], row-major over labels != -100: one per copy, in copy order
        if logits.dim() == 3:
            return logits[rows, positions]
        raise RuntimeError(f"unexpected labelled logits shape {tuple(logits.shape)} for {len(rows)} copies")
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # [copies, width, vocab]
    return logits[rows, positions]


# -----------------------------------------------------------------------------
# accuracies


def evaluate_blimp(
    model,
    tokenizer,
    pairs: Sequence[dict],
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    variant: str = "pll",
    device: torch.device | str | None = None,
    bf16: bool | None = None,
    return_scores: bool = False,
) -> dict[str, Any]:
    """Score every pair and return accuracies (good sentence scored strictly above the bad one; ties are wrong).

    Returns {"overall": micro accuracy over pairs, "overall_macro": mean over UIDs, "by_uid", "by_field",
    "by_linguistics_term": {name: accuracy}, "pairs_by_uid": {uid: count}, "field_of_uid": {uid: field},
    "num_pairs", "variant", "sentences_per_second", "seconds"} and, with return_scores, "scores":
    [[good, bad], ...] in pair order.
    """
    if not pairs:
        raise UserError("no BLiMP pairs to evaluate; load some with load_blimp(path)")
    # a sentence shared by several pairs is scored once
    unique = list(dict.fromkeys(s for p in pairs for s in (p["sentence_good"], p["sentence_bad"])))
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # time our work only, not kernels the caller left in flight
    t0 = time.perf_counter()
    scored = score_sentences(model, tokenizer, unique, batch_tokens, variant, device, bf16)
    seconds = time.perf_counter() - t0
    score_of = dict(zip(unique, scored))

    hits: dict[str, dict[str, list[int]]] = {"uid": defaultdict(list), "field": defaultdict(list),
                                             "term": defaultdict(list)}
    field_of_uid, scores, correct_all = {}, [], []
    for p in pairs:
        good, bad = score_of[p["sentence_good"]], score_of[p["sentence_bad"]]
        correct = int(good > bad)
        correct_all.append(correct)
        hits["uid"][p["UID"]].append(correct)
        hits["field"][p["field"]].append(correct)
        hits["term"][p["linguistics_term"]].append(correct)
        field_of_uid.setdefault(p["UID"], p["field"])
        scores.append([good, bad])

    def mean(xs: Sequence[int]) -> float:
        return sum(xs) / len(xs)

    by_uid = {k: mean(v) for k, v in sorted(hits["uid"].items())}
    results: dict[str, Any] = {
        "overall": mean(correct_all),
        "overall_macro": sum(by_uid.values()) / len(by_uid),
        "by_uid": by_uid,
        "by_field": {k: mean(v) for k, v in sorted(hits["field"].items())},
        "by_linguistics_term": {k: mean(v) for k, v in sorted(hits["term"].items())},
        "pairs_by_uid": {k: len(v) for k, v in sorted(hits["uid"].items())},
        "field_of_uid": dict(sorted(field_of_uid.items())),
        "num_pairs": len(pairs),
        "variant": variant,
        "sentences_per_second": 2 * len(pairs) / max(seconds, 1e-9),
        "seconds": seconds,
    }
    if return_scores:
        results["scores"] = scores
    return results


def flatten_results(results: dict[str, Any], prefix: str = "blimp") -> dict[str, float]:
    """Scalars for TensorBoard / accelerator.log: prefix/overall, prefix/field/<f>, prefix/uid/<uid>, ..."""
    out = {f"{prefix}/overall": results["overall"], f"{prefix}/overall_macro": results["overall_macro"],
           f"{prefix}/sentences_per_second": results["sentences_per_second"]}
    out.update({f"{prefix}/field/{k}": v for k, v in results["by_field"].items()})
    out.update({f"{prefix}/uid/{k}": v for k, v in results["by_uid"].items()})
    return out


def format_table(results: dict[str, Any]) -> str:
    """A plain-text table: one row per UID (grouped by field), then the field averages and the overall line."""
    by_uid, field_of_uid, counts = results["by_uid"], results["field_of_uid"], results["pairs_by_uid"]
    w_uid = max([len("(mean over UIDs)")] + [len(u) for u in by_uid])
    w_field = max([len("field")] + [len(f) for f in results["by_field"]])
    line = f"{'field':<{w_field}}  {'UID':<{w_uid}}  {'acc':>6}  {'pairs':>6}"
    rows = [f"BLiMP zero-shot ({results['variant']}): {results['num_pairs']} pairs, "
            f"{results['sentences_per_second']:.1f} sentences/s", line, "-" * len(line)]
    for uid in sorted(by_uid, key=lambda u: (field_of_uid[u], u)):
        rows.append(f"{field_of_uid[uid]:<{w_field}}  {uid:<{w_uid}}  {100 * by_uid[uid]:6.2f}  {counts[uid]:6d}")
    rows.append("-" * len(line))
    for field, acc in results["by_field"].items():
        rows.append(f"{field:<{w_field}}  {'(field average)':<{w_uid}}  {100 * acc:6.2f}")
    rows.append(f"{'overall':<{w_field}}  {'(all pairs)':<{w_uid}}  {100 * results['overall']:6.2f}  "
                f"{results['num_pairs']:6d}")
    rows.append(f"{'overall':<{w_field}}  {'(mean over UIDs)':<{w_uid}}  {100 * results['overall_macro']:6.2f}")
    return "\n".join(rows)
