"""Train the LTG-BERT WordPiece tokenizer on its own.

    python launch/train_tokenizer.py --train_file corpus1.txt corpus2.txt --vocab_size 16384 --output_dir tok/
    python launch/train_tokenizer.py --train_file docs.jsonl --text_column body --lowercase
    python launch/train_tokenizer.py            # the built-in demo corpus -> outputs/tokenizer-demo

The output directory is a Hugging Face tokenizer (tokenizer.json + tokenizer_config.json):
`AutoTokenizer.from_pretrained(output_dir)` loads it, and launch/pretrain.py takes it as --tokenizer_name.
Special tokens [UNK]=0 [CLS]=1 [SEP]=2 [PAD]=3 [MASK]=4. launch/pretrain.py trains one the same way
(ltgbert.tokenization.train_tokenizer) when it is given none.
Exit codes: 0 done, 2 bad input.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

# run as a script from a checkout: make the package importable without installing it
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@dataclass
class TokenizerArguments:
    """Flags of launch/train_tokenizer.py."""

    train_file: list[str] | None = field(
        default=None,
        metadata={
            "help": "Training files: plain text (.txt) or one format of .jsonl/.json/.parquet/.csv/.tsv "
            "(default: the built-in demo corpus).",
            "nargs": "+",
            "aliases": ["--train_files"],
        },
    )
    text_column: str = field(default="text", metadata={"help": "Text column of structured files."})
    vocab_size: int = field(default=16384, metadata={"help": "Vocabulary size upper bound (special tokens included)."})
    min_frequency: int = field(default=2, metadata={"help": "Minimum pair frequency for a merge."})
    lowercase: bool = field(default=False, metadata={"help": "Lowercase the text (an uncased tokenizer)."})
    strip_accents: bool | None = field(default=None, metadata={"help": "Strip accents (default: as --lowercase)."})
    model_max_length: int = field(default=512, metadata={"help": "Longest input the tokenizer allows (truncation)."})
    output_dir: str = field(default="outputs/tokenizer-demo", metadata={"help": "Where the tokenizer is saved."})

    def __post_init__(self):
        if self.vocab_size < 16:
            raise ValueError(f"--vocab_size must be at least 16, got {self.vocab_size}")
        if self.min_frequency < 1:
            raise ValueError(f"--min_frequency must be >= 1, got {self.min_frequency}")


def main(args: TokenizerArguments):
    from ltgbert.tokenization import train_tokenizer

    files = args.train_file
    if not files:
        from ltgbert.demo_data import ensure_demo_data

        files = [ensure_demo_data().corpus_train]
    tokenizer = train_tokenizer(
        files,
        vocab_size=args.vocab_size,
        min_frequency=args.min_frequency,
        lowercase=args.lowercase,
        strip_accents=args.strip_accents,
        output_dir=args.output_dir,
        model_max_length=args.model_max_length,
        text_column=args.text_column,
    )
    print(
        f"trained a WordPiece tokenizer with {len(tokenizer)} tokens on {len(files)} file(s); "
        f"saved to {args.output_dir}"
    )
    return tokenizer


def cli(argv: list[str] | None = None) -> int:
    from ltgbert.arguments import run_entry_point

    return run_entry_point(TokenizerArguments, main, argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(cli())
