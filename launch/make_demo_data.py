"""Generate the built-in demo data (corpus, BLiMP-style minimal pairs, classification and tagging tasks).

    python launch/make_demo_data.py              # default size, into $LTGBERT_DEMO_DIR or ~/.cache/ltgbert/demo
    python launch/make_demo_data.py --output_dir outputs/demo --num_words 200000 --seed 1
    python launch/make_demo_data.py --output_dir /scratch/demo100m --num_words 100000000   # a benchmark corpus

Nothing is regenerated when the directory already holds data made with the same parameters. The other
entry points call ltgbert.demo_data.ensure_demo_data themselves; this script is for looking at the data
or making it ahead of time (e.g. on a login node before a SLURM job).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


@dataclass
class DemoDataArguments:
    """Flags of launch/make_demo_data.py."""

    output_dir: str | None = field(
        default=None,
        metadata={"help": "Where to write the data (default: $LTGBERT_DEMO_DIR or ~/.cache/ltgbert/demo)."},
    )
    num_words: int = field(default=1_000_000, metadata={"help": "Words in corpus/train.txt (>= 1000)."})
    seed: int = field(default=0, metadata={"help": "Everything is a function of this seed."})
    pairs_per_phenomenon: int = field(default=500, metadata={"help": "Minimal pairs per blimp/<UID>.jsonl."})
    train_size: int = field(default=2000, metadata={"help": "Rows in tasks/<task>/train.jsonl."})
    validation_size: int = field(default=500, metadata={"help": "Rows in tasks/<task>/validation.jsonl."})
    test_size: int = field(default=500, metadata={"help": "Rows in tasks/<task>/test.jsonl."})


def main(args: DemoDataArguments) -> int:
    from ltgbert.demo_data import default_demo_dir, ensure_demo_data

    paths = ensure_demo_data(
        args.output_dir if args.output_dir is not None else default_demo_dir(),
        num_words=args.num_words,
        seed=args.seed,
        pairs_per_phenomenon=args.pairs_per_phenomenon,
        task_sizes=(args.train_size, args.validation_size, args.test_size),
    )
    counts = json.loads(paths.manifest.read_text(encoding="utf-8"))["counts"]
    print(f"demo data: {paths.root}")
    for split, path in (("train", paths.corpus_train), ("validation", paths.corpus_validation)):
        c = counts["corpus"][split]
        print(
            f"  corpus {split:<10} {path}  ({c['documents']} documents, {c['sentences']} sentences, {c['words']} words)"
        )
    print(
        f"  blimp             {paths.blimp_dir}  ({len(counts['blimp'])} phenomena, "
        f"{sum(counts['blimp'].values())} pairs)"
    )
    for task, sizes in counts["tasks"].items():
        print(
            f"  task {task:<14} {paths.tasks_dir / task}  ("
            + ", ".join(f"{split} {n}" for split, n in sizes.items())
            + ")"
        )
    return 0


def cli(argv: list[str] | None = None) -> int:
    from ltgbert.arguments import run_entry_point

    return run_entry_point(DemoDataArguments, main, argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(cli())
