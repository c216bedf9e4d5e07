"""Benchmark: BLiMP pseudo-log-likelihood scoring, shared token-budget batches vs one masked copy at a time.

    python bench/bench_zeroshot.py [--pairs 200] [--baseline_pairs 200] [--device cuda]

A small encoder (hidden 384, 12 layers; our LtgBertForMaskedLM when it imports, else BertForMaskedLM) with a
16k WordPiece vocabulary scores synthetic minimal pairs of 6-12 words (some split into several pieces, like
BLiMP sentences through a BabyLM tokenizer). Both runs go through ``evaluate_blimp``; the baseline only sets
``batch_tokens=1``, which puts every masked copy in its own batch. Prints sentences per second and the ratio.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import transformers  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers, processors  # noqa: E402

from ltgbert.zeroshot import evaluate_blimp  # noqa: E402

SPECIALS = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
SUFFIXES = "abcdefghijklmnopqrstuvwxyz"


def make_tokenizer(vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    # stems "w0".."wN" plus "##a".."##z": a word "w17ks" becomes w17 ##k ##s, so multi-piece words occur
    stems = [f"w{i}" for i in range(vocab_size - len(SPECIALS) - len(SUFFIXES))]
    vocab = {tok: i for i, tok in enumerate(SPECIALS + stems + [f"##{c}" for c in SUFFIXES])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        mask_token="[MASK]",
    )


def make_model(vocab_size: int):
    common = dict(
        vocab_size=vocab_size,
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        intermediate_size=1024,
        max_position_embeddings=512,
    )
    try:
        import ltgbert

        config = ltgbert.LtgBertConfig(**common)
        return ltgbert.LtgBertForMaskedLM(config)
    except (ImportError, AttributeError):
        return transformers.BertForMaskedLM(transformers.BertConfig(**common, pad_token_id=3))


def make_pairs(n: int, vocab_size: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    num_stems = vocab_size - len(SPECIALS) - len(SUFFIXES)

    def word() -> str:
        w = f"w{rng.randrange(num_stems)}"
        if rng.random() < 0.25:  # a quarter of the words get one or two extra pieces
            w += "".join(rng.choice(SUFFIXES) for _ in range(rng.randint(1, 2)))
        return w

    pairs = []
    for i in range(n):
        good = [word() for _ in range(rng.randint(6, 12))]
        bad = list(good)
        bad[rng.randrange(len(bad))] = word()  # a minimal pair: one word differs
        pairs.append(
            {
                "sentence_good": " ".join(good),
                "sentence_bad": " ".join(bad),
                "field": "synthetic",
                "linguistics_term": "synthetic",
                "UID": f"uid{i % 10}",
                "pairID": str(i),
            }
        )
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--baseline_pairs", type=int, default=None, help="pairs for the slow run (default: all)")
    parser.add_argument("--batch_tokens", type=int, default=8192)
    parser.add_argument("--vocab_size", type=int, default=16384)
    parser.add_argument("--variant", default="pll", choices=["pll", "within_word_l2r"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    torch.manual_seed(0)
    tokenizer = make_tokenizer(args.vocab_size)
    model = make_model(args.vocab_size).to(args.device).eval()
    pairs = make_pairs(args.pairs, args.vocab_size)
    baseline_pairs = pairs[: args.baseline_pairs or args.pairs]
    tokens = sum(len(tokenizer(p[k])["input_ids"]) for p in pairs for k in ("sentence_good", "sentence_bad"))
    print(
        f"model {type(model).__name__} hidden 384 x 12 layers, vocab {args.vocab_size}, device {args.device}, "
        f"threads {torch.get_num_threads()}, variant {args.variant}"
    )
    print(f"{len(pairs)} pairs, {tokens / (2 * len(pairs)):.1f} tokens per sentence with [CLS]/[SEP]")

    # warm-up (kernels, allocator) outside the timed runs
    evaluate_blimp(model, tokenizer, pairs[:4], batch_tokens=args.batch_tokens, variant=args.variant)
    t0 = time.perf_counter()
    fast = evaluate_blimp(
        model, tokenizer, pairs, batch_tokens=args.batch_tokens, variant=args.variant, return_scores=True
    )
    print(
        f"batched (batch_tokens={args.batch_tokens}): {fast['sentences_per_second']:9.1f} sentences/s "
        f"({time.perf_counter() - t0:.2f} s for {2 * len(pairs)} sentences)"
    )
    t0 = time.perf_counter()
    slow = evaluate_blimp(model, tokenizer, baseline_pairs, batch_tokens=1, variant=args.variant, return_scores=True)
    print(
        f"one masked copy at a time:    {slow['sentences_per_second']:9.1f} sentences/s "
        f"({time.perf_counter() - t0:.2f} s for {2 * len(baseline_pairs)} sentences)"
    )
    diff = max(abs(a - b) for f, s in zip(fast["scores"], slow["scores"]) for a, b in zip(f, s))
    print(
        f"speed-up: {fast['sentences_per_second'] / slow['sentences_per_second']:.1f}x "
        f"(max |score difference| {diff:.2e})"
    )


if __name__ == "__main__":
    main()
