"""Export a Hugging Face model directory from any pretraining checkpoint, and publish a run on the Hub.

    python launch/export.py --checkpoint outputs/pretrain-demo/checkpoints/step_00000400 --output_dir exported/
    python launch/export.py --run_dir runs/babylm-10m --push_to_hub my-user/ltgbert-babylm-10m

    python launch/export.py --checkpoint path/to/published-hplt-model --output_dir converted/

An export is what pretraining writes to final/: consolidated weights (ZeRO shards are merged), config with
auto_map, the tokenizer and the two remote-code files; AutoModelForMaskedLM.from_pretrained and
launch/finetune.py load it. Works offline on one CPU, whatever the world size that wrote the checkpoint.

--push_to_hub publishes a pretraining run as the BabyLM evaluation reads it: <run_dir>/final/ on the main branch
and every word milestone checkpoints/chck_{N}M/ as a branch of that name (with --checkpoint instead: the exported
directory on main). Exit codes: 0 done, 2 bad input (also: offline, not logged in).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ltgbert.errors import UserError  # noqa: E402


@dataclass
class ExportArguments:
    """Flags of launch/export.py."""

    checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "What to export: a checkpoints/step_XXXXXXXX directory written by launch/pretrain.py, or a model "
            "directory or Hub id (a published LTG-BERT/HPLT one is rewritten in our layout, without running its code)."
        },
    )
    output_dir: str | None = field(default=None, metadata={"help": "Where the exported model directory goes."})
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer directory (default: the one the run used)."}
    )
    run_dir: str | None = field(
        default=None,
        metadata={"help": "A pretraining --output_dir whose final/ and checkpoints/chck_*M/ --push_to_hub publishes."},
    )
    push_to_hub: str | None = field(
        default=None,
        metadata={"help": "Hub repository id (user/name): final/ (or the export) as main, each chck_{N}M as a branch."},
    )
    hub_private: bool = field(default=False, metadata={"help": "Create the repository as private."})
    hub_token: str | None = field(default=None, metadata={"help": "Hub token (default: the logged-in one)."})

    def __post_init__(self):
        if self.checkpoint is None and self.push_to_hub is None:
            raise ValueError("pass --checkpoint DIR --output_dir OUT to export, and/or --push_to_hub REPO_ID")
        if self.checkpoint is not None and self.output_dir is None:
            raise ValueError("--checkpoint needs --output_dir (where the model directory is written)")
        if self.push_to_hub is not None and self.run_dir is None and self.checkpoint is None:
            raise ValueError("--push_to_hub needs --run_dir (a pretraining output directory) or --checkpoint")
        if self.run_dir is not None and self.checkpoint is not None:
            raise ValueError("pass --run_dir (publish a run) or --checkpoint (export one checkpoint), not both")


def main(args: ExportArguments) -> int:
    from ltgbert.checkpointing import export_checkpoint

    if args.checkpoint is not None:
        out = export_checkpoint(args.checkpoint, args.output_dir, args.tokenizer_name)
        print(f"exported {args.checkpoint} to {out}")
    if args.push_to_hub is not None:
        from ltgbert.hub import push_run

        if args.run_dir is not None:
            urls = push_run(args.run_dir, args.push_to_hub, private=args.hub_private, token=args.hub_token)
        else:  # the single export, as main
            staging = Path(args.output_dir)
            if not (staging / "config.json").is_file():
                raise UserError(f"{staging} holds no model directory to push")
            urls = _push_single(staging, args)
        for revision, url in urls.items():
            print(f"pushed {revision}: {url}")
    return 0


def _push_single(model_dir: Path, args: ExportArguments) -> dict[str, str]:
    import tempfile

    from ltgbert.hub import push_run

    # push_run reads a run layout; an exported directory is a run with only final/.
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "final").symlink_to(model_dir.resolve(), target_is_directory=True)
        return push_run(tmp, args.push_to_hub, private=args.hub_private, token=args.hub_token)


def cli(argv=None) -> int:
    from ltgbert.arguments import run_entry_point

    return run_entry_point(ExportArguments, main, argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(cli())
