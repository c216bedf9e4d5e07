"""Generate the built-in demo data (corpus, BLiMP-style minimal pairs, classification tasks).

    python launch/make_demo_data.py              # default size, into $LTGBERT_DEMO_DIR or ~/.cache/ltgbert/demo
    python launch/make_demo_data.py --output_dir outputs/demo --num_words 200000 --seed 1

Nothing is regenerated when the directory already holds data made with the same parameters. The other
entry points call ltgbert.demo_data.ensure_demo_data themselves; this script is for looking at the data
or making it ahead of time (e.g. on a login node before a SLURM job).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# run from a checkout without installing: the repository root holds the ltgbert package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ltgbert.demo_data import default_demo_dir, ensure_demo_data  # noqa: E402
from ltgbert.errors import UserError  # noqa: E402


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        # one line, the project's convention for bad input, instead of argparse's usage + message
        print(f"error: {message}; see --help", file=sys.stderr)
        raise SystemExit(2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = _Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default=None,
                        help="where to write the data (default: $LTGBERT_DEMO_DIR or ~/.cache/ltgbert/demo)")
    parser.add_argument("--num_words", type=int, default=1_000_000, help="words in corpus/train.txt (>= 1000)")
    parser.add_argument("--seed", type=int, default=0, help="everything is a function of this seed")
    parser.add_argument("--pairs_per_phenomenon", type=int, default=500, help="minimal pairs per blimp/<UID>.jsonl")
    parser.add_argument("--train_size", type=int, default=2000, help="rows in tasks/<task>/train.jsonl")
    parser.add_argument("--validation_size", type=int, default=500, help="rows in tasks/<task>/validation.jsonl")
    parser.add_argument("--test_size", type=int, default=500, help="rows in tasks/<task>/test.jsonl")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        paths = ensure_demo_data(args.output_dir if args.output_dir is not None else default_demo_dir(),
                                 num_words=args.num_words, seed=args.seed,
                                 pairs_per_phenomenon=args.pairs_per_phenomenon,
                                 task_sizes=(args.train_size, args.validation_size, args.test_size))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = json.loads(paths.manifest.read_text(encoding="utf-8"))["counts"]
    print(f"demo data: {paths.root}")
    for split, path in (("train", paths.corpus_train), ("validation", paths.corpus_validation)):
        c = counts["corpus"][split]
        print(f"  corpus {split:<10} {path}  ({c['documents']} documents, {c['sentences']} sentences, "
              f"{c['words']} words)")
    print(f"  blimp             {paths.blimp_dir}  ({len(counts['blimp'])} phenomena, "
          f"{sum(counts['blimp'].values())} pairs)")
    for task, sizes in counts["tasks"].items():
        print(f"  task {task:<14} {paths.tasks_dir / task}  ("
              + ", ".join(f"{split} {n}" for split, n in sizes.items()) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
