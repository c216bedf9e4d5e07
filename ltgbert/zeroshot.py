"""Zero-shot minimal-pair evaluation (BLiMP format) by pseudo-log-likelihood.

BabyLM entrants judge a pretrained encoder first by BLiMP: for each minimal pair the model should prefer the
grammatical sentence. An encoder has no left-to-right probability, so a sentence is scored by its
pseudo-log-likelihood (PLL, Salazar et al., 2020): every token is masked in turn and the log probabilities of
the true tokens are summed. Plain PLL overrates words split into several pieces (the later pieces are easy to
guess when the earlier ones are visible), so the ``within_word_l2r`` variant (Kauf and Ivanova, 2023) also
masks the rest of the word to the right of the scored piece.

Data. ``load_blimp`` reads one jsonl file, a directory of jsonl files (one task, named after the directory),
or the layout of the official BabyLM evaluation pipeline (babylm/evaluation-pipeline-2025)::

    evaluation_data/full_eval/{blimp_filtered,supplement_filtered}/<name>.jsonl
    evaluation_data/fast_eval/{blimp_fast,supplement_fast}/<name>.jsonl

Given ``evaluation_data/``, ``full_eval/`` or ``fast_eval/``, every ``blimp_*`` and ``supplement_*`` folder
under it is one task, named after the folder as the pipeline names its result folders (its other tasks, EWoK,
entity tracking, ..., are not minimal pairs of this form and are skipped). Rows are read as the pipeline's
``read_files.decode_blimp`` reads them: a row with a "field" is a BLiMP row and names its own UID, field and
linguistics_term (field "syntax_semantics" is reported as "syntax/semantics", as there); a row without one is a
BLiMP-supplement row, whose UID is its file's name (hypernym, qa_congruence_easy, ...) and whose field and
linguistics_term are "supplement". Only sentence_good and sentence_bad are required of every row.

Ties. A pair whose two sentences score the same (typically both tokenize to the same ids because the
differing word is [UNK] in both) is a tie. ``tie_policy="strict"`` (our default) counts it wrong: the model
did not prefer the good sentence. ``tie_policy="official"`` counts it right, as the pipeline does. What the
pipeline computes for backend ``mlm`` (evaluation_pipeline/sentence_zero_shot/ in babylm/evaluation-pipeline-2025):

- ``dataset.CompletionRankingDataset.process_mlm_sentences``: for BLiMP the completion is the whole sentence,
  so every token whose offset ends after character 0 is masked, one at a time: plain PLL, our ``pll``; special
  tokens, with (0, 0) offsets, are not scored;
- ``compute_results.compute_mlm_results``: log_softmax(logits / temperature) at the masked position, the
  target's log probability, summed over the sentence's copies; temperature 1.0 (``run.get_temperatures``
  without --max_temperature); no length normalisation;
- ``compute_results.rank_and_evaluate``: the prediction is ``torch.max(stack([good, bad]), dim=1)`` index,
  which is the first index among equal values, i.e. the good sentence: correct iff good >= bad;
- ``run.process_results``: accuracy per UID, per field and per linguistics_term (correct / pairs), and the
  reported average is the unweighted mean over the UIDs of one data folder (each folder is its own run):
  our ``results["tasks"][task]["accuracy"]``;
- ``run.get_model``: AutoModelForMaskedLM in float32, no autocast. So ``tie_policy="official"`` with
  ``bf16=None`` runs in full precision.

With ``variant="pll"`` and ``tie_policy="official"`` the per-UID accuracies and each task's mean over UIDs are
the pipeline's, except where float rounding decides: (1) we sum the float32 token log probabilities in
float64, they in float32, and batch shapes differ, so scores agree to ~1e-5, not bit for bit, and a pair
closer than that can flip; (2) they score tokens whose offset ends after character 0, we tokens not flagged
by ``special_tokens_mask``: the same tokens whenever special tokens have (0, 0) offsets and no content token
is empty at character 0 (true of the WordPiece tokenizers this project writes); (3) they score the two
sentences of a pair in separate forward passes, so identical token sequences tie there only when both passes
are bit-identical; we score each distinct token sequence once, so they always tie exactly.

Efficiency: a sentence of T tokens needs about T forward passes, so the masked copies of ALL distinct token
sequences are flattened into one list of (sentence, position) items, sorted by length (little padding) and cut
into batches by a token budget; the per-copy log probabilities are scattered back onto their sentences with
one ``index_add_`` on the device, so the loop never waits on the host. On a GPU the forward runs under bf16
autocast unless the official policy or ``bf16=False`` asks for float32; the log-softmax is always float32.

Public API:
    load_blimp(path, max_pairs_per_uid=None) -> list[dict]     validated pairs (each with its "task")
    first_pairs_per_uid(pairs, limit) -> list[dict]            the first N pairs of every (task, UID)
    score_sentences(model, tokenizer, sentences, ...) -> list[float]   PLL per sentence
    evaluate_blimp(model, tokenizer, pairs, ..., tie_policy="strict") -> dict   accuracies, ties, per task
    accuracies_from_scores(pairs, scores, tie_policy) -> dict  the same tally from given [good, bad] scores
    format_table(results) -> str, flatten_results(results, prefix) -> dict[str, float]  (printing, logging)

The pretraining loop calls ``evaluate_blimp`` with the UNWRAPPED model (not the DDP or DeepSpeed wrapper) on
every rank; the model is put in eval mode and its previous mode is restored afterwards.
"""

from __future__ import annotations

import inspect
import json
import time
from collections import defaultdict
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from ltgbert.errors import UserError

# the fields of an official BLiMP row; only the two sentences are required (supplement rows have no others)
BLIMP_FIELDS = ("sentence_good", "sentence_bad", "field", "linguistics_term", "UID", "pairID")
SENTENCE_FIELDS = ("sentence_good", "sentence_bad")
SUPPLEMENT = "supplement"  # field and linguistics_term of a row without "field", as the pipeline names them
TASK_PREFIXES = ("blimp_", "supplement_")  # the pipeline's minimal-pair folders
EVAL_SPLITS = ("full_eval", "fast_eval")  # the folders of its evaluation_data/ root
VARIANTS = ("pll", "within_word_l2r")
TIE_POLICIES = ("strict", "official")
DEFAULT_BATCH_TOKENS = 8192
DEFAULT_TASK = "blimp"  # the task of a hand-made pair that names none


# -----------------------------------------------------------------------------
# loading and validation


def _decode_row(row: Any, path: Path, lineno: int, task: str) -> dict:
    """One pair in the pipeline's reading (``read_files.decode_blimp``), plus its task; bad rows raise UserError."""
    where = f"{path}:{lineno}"
    if not isinstance(row, dict):
        raise UserError(
            f"{where}: expected a JSON object with sentence_good and sentence_bad, got {type(row).__name__}"
        )
    for key in SENTENCE_FIELDS:
        if key not in row:
            raise UserError(f"{where}: missing field '{key}'; every minimal pair needs sentence_good and sentence_bad")
        if not isinstance(row[key], str) or not row[key].strip():
            raise UserError(f"{where}: field '{key}' must be a non-empty string")
    pair = dict(row)
    if "field" in row:
        for key in ("UID", "linguistics_term"):
            if key not in row:
                raise UserError(
                    f"{where}: missing field '{key}'; a BLiMP row with a 'field' also needs UID and "
                    f"linguistics_term (a supplement row has none of the three)"
                )
        # UIDs and fields become dict keys and TensorBoard tags
        for key in ("field", "UID", "linguistics_term"):
            pair[key] = str(row[key])
        if pair["field"] == "syntax_semantics":
            pair["field"] = "syntax/semantics"  # the pipeline's spelling
    else:
        pair.update(field=SUPPLEMENT, UID=path.stem, linguistics_term=SUPPLEMENT)
    if "pairID" in pair:
        pair["pairID"] = str(pair["pairID"])  # an int in some copies of BLiMP
    pair["task"] = task
    return pair


def _load_jsonl(path: Path, task: str) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save the file as UTF-8") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror}); check the path and its permissions") from None
    pairs = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue  # a trailing blank line is common in hand-made files and harmless
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg}); each line must be one JSON object") from None
        pairs.append(_decode_row(row, path, lineno, task))
    if not pairs:
        raise UserError(f"{path}: no pairs in file (empty); give a BLiMP jsonl file with one pair per line")
    return pairs


def _jsonl_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix == ".jsonl" and p.is_file())


def _task_folders(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and p.name.startswith(TASK_PREFIXES))


def _find_tasks(path: Path) -> list[tuple[str, list[Path]]]:
    """(task name, its jsonl files) for a file, a folder of jsonl files, or a BabyLM evaluation_data layout."""
    if path.is_file():
        # a single file is one task of the folder it sits in (blimp_fast/adjunct_island.jsonl: task blimp_fast)
        return [(path.resolve().parent.name or path.stem, [path])]
    files = _jsonl_files(path)
    if files:
        return [(path.name or path.resolve().name, files)]
    folders = _task_folders(path) or [f for split in EVAL_SPLITS for f in _task_folders(path / split)]
    if not folders:
        raise UserError(
            f"BLiMP directory {path} holds no *.jsonl files and no blimp_*/supplement_* folders; pass "
            f"a jsonl file, a directory of them, or the BabyLM evaluation_data/ (or its full_eval/, "
            f"fast_eval/) folder"
        )
    names = [f.name for f in folders]
    if len(set(names)) < len(names):  # the same folder name under full_eval/ and fast_eval/
        names = [f.relative_to(path).as_posix() for f in folders]
    tasks = []
    for name, folder in zip(names, folders):
        files = _jsonl_files(folder)
        if not files:
            raise UserError(
                f"task folder {folder} holds no *.jsonl files; download the evaluation data again or "
                f"remove the empty folder"
            )
        tasks.append((name, files))
    return tasks


def first_pairs_per_uid(pairs: Sequence[dict], limit: int) -> list[dict]:
    """The first ``limit`` pairs of every (task, UID), in file order: a quick check still covers every phenomenon
    and scores the same pairs every time."""
    if limit < 1:
        raise UserError(f"max_pairs_per_uid must be >= 1 (or None for every pair), got {limit}")
    seen: dict[tuple[str, str], int] = defaultdict(int)
    kept = []
    for p in pairs:
        key = (p.get("task", DEFAULT_TASK), p["UID"])
        seen[key] += 1
        if seen[key] <= limit:
            kept.append(p)
    return kept


def load_blimp(path_or_dir: str | Path, max_pairs_per_uid: int | None = None) -> list[dict]:
    """Read minimal pairs from a jsonl file, a directory of them, or a BabyLM ``evaluation_data/`` layout.

    Every pair carries sentence_good, sentence_bad, field, linguistics_term, UID (see the module docstring for
    supplement rows) and "task" (the folder it was read from). Files are read in name order, rows in file order.
    ``max_pairs_per_uid`` keeps only the first N pairs of every (task, UID). A bad row raises UserError naming
    the file, the line number and the field.
    """
    if max_pairs_per_uid is not None and max_pairs_per_uid < 1:
        raise UserError(f"max_pairs_per_uid must be >= 1 (or None for every pair), got {max_pairs_per_uid}")
    path = Path(path_or_dir)
    if not path.exists():
        raise UserError(
            f"BLiMP path {path} does not exist; pass a jsonl file, a directory of jsonl files or the "
            f"BabyLM evaluation_data/ folder"
        )
    pairs = [pair for task, files in _find_tasks(path) for f in files for pair in _load_jsonl(f, task)]
    if max_pairs_per_uid is not None:
        pairs = first_pairs_per_uid(pairs, max_pairs_per_uid)
    return pairs


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


def _labelled_forward_kwargs(model) -> dict[str, Any] | None:
    """How to get logits at the labelled positions only, or None: call without labels and index [B, T, V].

    Our LtgBertForMaskedLM projects onto the vocabulary only where labels != -100 when asked with
    ``labelled_logits_only=True`` ([n_labelled, V] logits; with one scored position per copy that skips T-1 of
    T vocabulary projections). The flag is passed only where forward accepts it (by name or through
    ``**kwargs``), so remote code that rejects unknown arguments still runs; ``_masked_logits`` reads either
    shape, so a model file that ignores the flag (returns [B, T, V]) or predates it is still scored right.
    """
    if getattr(getattr(model, "config", None), "model_type", None) != "ltgbert":
        return None
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return {"labelled_logits_only": True} if "labelled_logits_only" in params or takes_kwargs else {}


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

    Sentences that tokenize to the same ids are scored once and get the very same score. The model must
    already sit on ``device`` (default: the device of its parameters). ``bf16=None`` means bf16 autocast on a
    GPU that supports it and full precision elsewhere.
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
        raise UserError(
            f"sentence {sentences[i][:60]!r} has {longest} tokens, more than the model's "
            f"max_position_embeddings={max_len}; shorten it or drop the pair"
        )
    # one score per distinct token sequence: a tie between identical tokenizations is then exact, whatever
    # batches the copies land in (different padding may change the last bits of a forward pass)
    slot: dict[tuple, int] = {}
    which = [slot.setdefault((tuple(row), tuple(row_ends)), len(slot)) for row, row_ends in zip(ids, ends)]
    distinct = list(slot)
    scores = _score_token_sequences(
        model, tokenizer, [list(k[0]) for k in distinct], [list(k[1]) for k in distinct], batch_tokens, device, bf16
    )
    return [scores[j] for j in which]


def _score_token_sequences(model, tokenizer, ids, ends, batch_tokens, device, bf16) -> list[float]:
    """Sum of log p(token | sentence with token..end masked) over the scored tokens of every sequence."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    longest = max(len(x) for x in ids)
    # one row per sentence, padded; the copies only index into it
    table = torch.full((len(ids), longest), pad_id, dtype=torch.long)
    for i, row in enumerate(ids):
        table[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    lengths = torch.tensor([len(x) for x in ids], dtype=torch.long)

    # flatten every (sentence, position) masked copy: which sentence, which token is scored, where the mask ends
    copies = [(i, t, e) for i, row_ends in enumerate(ends) for t, e in enumerate(row_ends) if e >= 0]
    sent_t, pos_t, end_t = torch.tensor(copies, dtype=torch.long).reshape(-1, 3).unbind(1)
    # longest first: padding stays small, and an out-of-memory shows up in the first batch, not the last
    order = torch.sort(lengths[sent_t], descending=True, stable=True).indices
    sent_t, pos_t, end_t = sent_t[order], pos_t[order], end_t[order]
    copy_len = lengths[sent_t]

    # everything indexed inside the loop lives on the device; only the batch widths are read on the host
    table, lengths = table.to(device), lengths.to(device)
    sent_t, pos_t, end_t = sent_t.to(device), pos_t.to(device), end_t.to(device)
    scores = torch.zeros(len(ids), dtype=torch.float64, device=device)
    labelled = _labelled_forward_kwargs(model)
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


def _masked_logits(model, input_ids, attention_mask, rows, positions, targets, labelled) -> torch.Tensor:
    """Logits [copies, vocab] at the one scored position of every copy."""
    if labelled is not None:
        labels = torch.full_like(input_ids, -100)
        labels[rows, positions] = targets
        logits = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **labelled).logits
        if logits.dim() == 2 and logits.shape[0] == len(rows):
            return logits  # [n_labelled, vocab], row-major over labels != -100: one per copy, in copy order
        if logits.dim() == 3:
            return logits[rows, positions]  # a model that ignored the flag: the full [copies, width, vocab]
        raise RuntimeError(f"unexpected labelled logits shape {tuple(logits.shape)} for {len(rows)} copies")
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # [copies, width, vocab]
    return logits[rows, positions]


# -----------------------------------------------------------------------------
# accuracies


def _check_tie_policy(tie_policy: str) -> None:
    if tie_policy not in TIE_POLICIES:
        raise UserError(
            f"unknown tie_policy '{tie_policy}'; choose strict (a tie is wrong) or official (a tie "
            f"is right, as the BabyLM pipeline counts it)"
        )


def evaluate_blimp(
    model,
    tokenizer,
    pairs: Sequence[dict],
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    variant: str = "pll",
    device: torch.device | str | None = None,
    bf16: bool | None = None,
    return_scores: bool = False,
    tie_policy: str = "strict",
) -> dict[str, Any]:
    """Score every pair and return accuracies, tie counts and the per-task breakdown.

    ``tie_policy="strict"``: correct iff the good sentence scores strictly above the bad one (a tie is wrong);
    ``"official"``: correct iff good >= bad, as the BabyLM pipeline counts it, and ``bf16=None`` then means
    full precision as there (see the module docstring for what else it takes to reproduce its number).
    Returns ``accuracies_from_scores``'s dict plus "variant", "sentences_per_second", "seconds" and, with
    return_scores, "scores": [[good, bad], ...] in pair order.
    """
    _check_tie_policy(tie_policy)
    if not pairs:
        raise UserError("no BLiMP pairs to evaluate; load some with load_blimp(path)")
    if bf16 is None and tie_policy == "official":
        bf16 = False
    # a sentence shared by several pairs is scored once
    unique = list(dict.fromkeys(s for p in pairs for s in (p["sentence_good"], p["sentence_bad"])))
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # time our work only, not kernels the caller left in flight
    t0 = time.perf_counter()
    scored = score_sentences(model, tokenizer, unique, batch_tokens, variant, device, bf16)
    seconds = time.perf_counter() - t0
    score_of = dict(zip(unique, scored))
    scores = [[score_of[p["sentence_good"]], score_of[p["sentence_bad"]]] for p in pairs]

    results = accuracies_from_scores(pairs, scores, tie_policy)
    results.update(variant=variant, sentences_per_second=2 * len(pairs) / max(seconds, 1e-9), seconds=seconds)
    if return_scores:
        results["scores"] = scores
    return results


def _breakdown(rows: Sequence[tuple[str, str, str, bool, bool]]) -> dict[str, Any]:
    """Tallies of (uid, field, linguistics_term, correct, tie) rows: per UID, per field, per term, means."""
    by: dict[str, dict[str, list[int]]] = {
        "uid": defaultdict(list),
        "field": defaultdict(list),
        "term": defaultdict(list),
    }
    ties: dict[str, int] = defaultdict(int)
    field_of_uid: dict[str, str] = {}
    for uid, field, term, correct, tie in rows:
        by["uid"][uid].append(int(correct))
        by["field"][field].append(int(correct))
        by["term"][term].append(int(correct))
        ties[uid] += int(tie)
        field_of_uid.setdefault(uid, field)

    def mean(xs: Sequence[float]) -> float:
        return sum(xs) / len(xs)

    by_uid = {k: mean(v) for k, v in sorted(by["uid"].items())}
    return {
        "accuracy": mean(list(by_uid.values())),  # the pipeline's "AVERAGE ACCURACY": the mean over UIDs
        "accuracy_micro": mean([int(r[3]) for r in rows]),
        "num_pairs": len(rows),
        "ties": sum(ties.values()),
        "by_uid": by_uid,
        "pairs_by_uid": {k: len(v) for k, v in sorted(by["uid"].items())},
        "ties_by_uid": {k: ties[k] for k in by_uid},
        "by_field": {k: mean(v) for k, v in sorted(by["field"].items())},
        "by_linguistics_term": {k: mean(v) for k, v in sorted(by["term"].items())},
        "field_of_uid": dict(sorted(field_of_uid.items())),
    }


def accuracies_from_scores(
    pairs: Sequence[dict], scores: Sequence[Sequence[float]], tie_policy: str = "strict"
) -> dict[str, Any]:
    """Accuracies of pairs given their [good, bad] scores, overall, per UID / field / term and per task.

    Returns {"overall": micro accuracy over pairs, "overall_macro": mean over UIDs, "ties": pairs scored
    equal, "by_uid", "by_field", "by_linguistics_term": {name: accuracy}, "pairs_by_uid", "ties_by_uid":
    {uid: count}, "field_of_uid", "task_of_uid": {uid: name}, "num_pairs", "tie_policy", "tasks": {task:
    {"accuracy": mean over its UIDs (the pipeline's number for that folder), "accuracy_micro", "num_pairs",
    "ties", "by_uid", "pairs_by_uid", "ties_by_uid", "by_field", "by_linguistics_term", "field_of_uid"}}}.
    UID keys are the pairs' UIDs; only if two tasks share a UID (an evaluation_data/ root holds both
    full_eval/ and fast_eval/) are the top-level keys "<task>/<UID>" instead.
    """
    _check_tie_policy(tie_policy)
    if len(pairs) != len(scores):
        raise ValueError(f"{len(pairs)} pairs but {len(scores)} scores")
    tasks_of_uid: dict[str, set[str]] = defaultdict(set)
    for p in pairs:
        tasks_of_uid[p["UID"]].add(p.get("task", DEFAULT_TASK))
    qualify = any(len(t) > 1 for t in tasks_of_uid.values())

    rows, by_task, task_of_uid = [], defaultdict(list), {}
    for p, (good, bad) in zip(pairs, scores):
        task, uid = p.get("task", DEFAULT_TASK), p["UID"]
        field, term = p.get("field", SUPPLEMENT), p.get("linguistics_term", SUPPLEMENT)
        tie = good == bad
        correct = good > bad or (tie and tie_policy == "official")
        key = f"{task}/{uid}" if qualify else uid
        rows.append((key, field, term, correct, tie))
        by_task[task].append((uid, field, term, correct, tie))
        task_of_uid[key] = task
    overall = _breakdown(rows)
    results: dict[str, Any] = {"overall": overall.pop("accuracy_micro"), "overall_macro": overall.pop("accuracy")}
    results.update(overall)
    results.update(
        task_of_uid=dict(sorted(task_of_uid.items())),
        tie_policy=tie_policy,
        tasks={task: _breakdown(task_rows) for task, task_rows in by_task.items()},
    )
    return results


# -----------------------------------------------------------------------------
# reporting


def flatten_results(results: dict[str, Any], prefix: str = "blimp") -> dict[str, float]:
    """Scalars for TensorBoard / accelerator.log: prefix/overall, prefix/ties, prefix/task/<t>, prefix/uid/<uid>..."""
    out = {
        f"{prefix}/overall": results["overall"],
        f"{prefix}/overall_macro": results["overall_macro"],
        f"{prefix}/ties": results["ties"],
    }
    if "sentences_per_second" in results:
        out[f"{prefix}/sentences_per_second"] = results["sentences_per_second"]
    out.update({f"{prefix}/task/{k}": v["accuracy"] for k, v in results["tasks"].items()})
    out.update({f"{prefix}/field/{k}": v for k, v in results["by_field"].items()})
    out.update({f"{prefix}/uid/{k}": v for k, v in results["by_uid"].items()})
    return out


def format_table(results: dict[str, Any]) -> str:
    """A plain-text table: one row per UID (by task, then field), each task's mean over UIDs (the pipeline's
    number), the field averages and the overall lines; accuracies in percent, ties as counts."""
    by_uid, field_of_uid, task_of_uid = results["by_uid"], results["field_of_uid"], results["task_of_uid"]
    w_task = max([len("overall"), len("task")] + [len(t) for t in results["tasks"]])
    w_field = max([len("field")] + [len(f) for f in results["by_field"]])
    w_uid = max([len("(mean over UIDs)")] + [len(u) for u in by_uid])

    def row(task: str, field: str, uid: str, acc: float, pairs: int | str = "", ties: int | str = "") -> str:
        return f"{task:<{w_task}}  {field:<{w_field}}  {uid:<{w_uid}}  {100 * acc:6.2f}  {pairs:>6}  {ties:>5}"

    header = f"{'task':<{w_task}}  {'field':<{w_field}}  {'UID':<{w_uid}}  {'acc':>6}  {'pairs':>6}  {'ties':>5}"
    policy = "counted right (official)" if results["tie_policy"] == "official" else "counted wrong (strict)"
    speed = f", {results['sentences_per_second']:.1f} sentences/s" if "sentences_per_second" in results else ""
    title = (
        f"BLiMP zero-shot ({results.get('variant', 'pll')}): {results['num_pairs']} pairs, "
        f"{len(results['tasks'])} task(s), {results['ties']} ties {policy}{speed}"
    )
    lines = [title, header, "-" * len(header)]
    for uid in sorted(by_uid, key=lambda u: (task_of_uid[u], field_of_uid[u], u)):
        lines.append(
            row(
                task_of_uid[uid],
                field_of_uid[uid],
                uid,
                by_uid[uid],
                results["pairs_by_uid"][uid],
                results["ties_by_uid"][uid],
            )
        )
    lines.append("-" * len(header))
    for task, t in results["tasks"].items():
        lines.append(row(task, "", "(mean over UIDs)", t["accuracy"], t["num_pairs"], t["ties"]))
    for field, acc in results["by_field"].items():
        lines.append(row("", field, "(field average)", acc))
    lines.append(row("overall", "", "(all pairs)", results["overall"], results["num_pairs"], results["ties"]))
    lines.append(row("overall", "", "(mean over UIDs)", results["overall_macro"]))
    return "\n".join(lines)
