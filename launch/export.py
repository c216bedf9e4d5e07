"""Export a Hugging Face model directory from any pretraining checkpoint.

    python launch/export.py --checkpoint outputs/pretrain-demo/checkpoints/step_00000400 --output_dir exported/

The result is what pretraining writes to final/: consolidated weights (ZeRO shards are merged), config with
auto_map, the tokenizer and the two remote-code files; `AutoModelForMaskedLM.from_pretrained` and
launch/finetune.py load it. Works offline on one CPU, whatever the world size that wrote the checkpoint.
"""

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ltgbert.errors import UserError  # noqa: E402


@dataclass
class ExportArguments:
    checkpoint: str = field(metadata={"help": "A checkpoints/step_XXXXXXXX directory written by pretrain.py."})
    output_dir: str = field(metadata={"help": "Where the Hugging Face model directory is written."})
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer directory (default: the one the run used)."})


def load_checkpoint_weights(checkpoint: Path):
    """The model's full fp32 state dict from an accelerate/DeepSpeed checkpoint directory."""
    from safetensors.torch import load_file

    for name in ("model.safetensors", "pytorch_model.bin"):
        if (checkpoint / name).exists():
            if name.endswith(".safetensors"):
                return load_file(checkpoint / name)
            import torch

            return torch.load(checkpoint / name, map_location="cpu", weights_only=True)
    zero_dirs = [p for p in checkpoint.iterdir() if p.is_dir() and any(p.glob("*model_states.pt"))]
    if zero_dirs:  # DeepSpeed: merge the ZeRO partitions
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=zero_dirs[0].name)
    raise UserError(f"no model weights in {checkpoint}; pass a checkpoints/step_* directory written by pretrain.py")


def export(checkpoint, output_dir, tokenizer_name=None):
    from transformers import AutoTokenizer

    from ltgbert import LtgBertConfig, LtgBertForMaskedLM

    checkpoint, output_dir = Path(checkpoint), Path(output_dir)
    state_file = checkpoint / "trainer_state.json"
    if not state_file.exists():
        raise UserError(f"{checkpoint} is not a pretraining checkpoint (no trainer_state.json)")
    run = json.loads(state_file.read_text())["config"]
    config = LtgBertConfig(**{k: v for k, v in run["model_config"].items() if k != "model_type"})
    model = LtgBertForMaskedLM(config)
    weights = load_checkpoint_weights(checkpoint)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if k != "lm_head.decoder.weight"]  # tied to the word embeddings
    if missing or unexpected:
        raise UserError(f"checkpoint {checkpoint} does not match its model config (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}); it may be corrupt")
    model.tie_weights()
    tokenizer_dir = tokenizer_name or run.get("tokenizer_name") or str(checkpoint.parents[1] / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def run(args: ExportArguments):
    out = export(args.checkpoint, args.output_dir, args.tokenizer_name)
    print(f"exported {args.checkpoint} to {out}")


def cli(argv=None):
    from ltgbert.arguments import run_entry_point

    return run_entry_point(ExportArguments, run, argv)


if __name__ == "__main__":
    sys.exit(cli())
