"""Zero-shot BLiMP evaluation of a masked language model by pseudo-log-likelihood.

    python launch/evaluate.py --model_name_or_path outputs/pretrain-demo/final --blimp_dir <file or dir of jsonl>

With no arguments it evaluates the default demo pretraining output on the demo minimal pairs. Works on any
``AutoModelForMaskedLM`` directory (ours, published LTG-BERT checkpoints through our classes, BERT, ...).
Prints a table of accuracies per UID, per field and overall, writes them as JSON (default
<output_dir or model dir>/blimp_results.json) and, with --logging_dir, as TensorBoard scalars.
Flags may also come from ``--config file.yaml|json`` (keys = flag names; the command line overrides them).
Exit codes: 0 done, 2 bad input.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

# run as a script from a checkout: make the package importable without installing it
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ltgbert.errors import UserError  # noqa: E402


@dataclass
class EvaluateArguments:
    """Flags of launch/evaluate.py (Hugging Face style names)."""

    model_name_or_path: str = field(default="outputs/pretrain-demo/final",
                                    metadata={"help": "Model directory loadable by AutoModelForMaskedLM "
                                                      "(with its tokenizer, unless --tokenizer_name is given)."})
    blimp_dir: str | None = field(default=None,
                                  metadata={"help": "A BLiMP jsonl file or a directory of them "
                                                    "(default: the built-in demo pairs)."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer directory if not the model's."})
    variant: str = field(default="pll", metadata={"help": "pll (Salazar et al., 2020) or within_word_l2r "
                                                          "(Kauf and Ivanova, 2023).",
                                                  "choices": ["pll", "within_word_l2r"]})
    batch_tokens: int = field(default=8192, metadata={"help": "Padded tokens per forward pass (masked copies of "
                                                              "several sentences share a batch)."})
    output_dir: str | None = field(default=None, metadata={"help": "Where blimp_results.json goes "
                                                                   "(default: the model directory)."})
    output_file: str | None = field(default=None, metadata={"help": "Exact path of the JSON results "
                                                                    "(overrides --output_dir)."})
    logging_dir: str | None = field(default=None, metadata={"help": "TensorBoard directory for the accuracies."})
    step: int = field(default=0, metadata={"help": "Global step the TensorBoard scalars are logged at."})
    device: str | None = field(default=None, metadata={"help": "cuda, cuda:1, cpu (default: cuda if available)."})
    bf16: bool | None = field(default=None, metadata={"help": "bf16 autocast (default: on when the GPU has it)."})
    max_pairs_per_uid: int | None = field(default=None, metadata={"help": "Evaluate only the first N pairs of "
                                                                          "each UID (a quick check)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code shipped in the directory."})

    def __post_init__(self):
        if self.batch_tokens < 1:
            raise UserError(f"--batch_tokens must be >= 1, got {self.batch_tokens}")
        if self.max_pairs_per_uid is not None and self.max_pairs_per_uid < 1:
            raise UserError(f"--max_pairs_per_uid must be >= 1, got {self.max_pairs_per_uid}")


# -----------------------------------------------------------------------------
# helpers


def load_model_and_tokenizer(args: EvaluateArguments):
    """AutoModelForMaskedLM + AutoTokenizer; any loading failure becomes a one-line UserError."""
    import transformers

    import ltgbert  # noqa: F401  registers LtgBert with the Auto classes (published checkpoints load into ours)

    model_path = Path(args.model_name_or_path)
    if not model_path.is_dir():
        raise UserError(f"model directory {model_path} not found; run launch/pretrain.py first or pass "
                        f"--model_name_or_path <dir with config.json>")
    if not (model_path / "config.json").is_file():
        raise UserError(f"{model_path} has no config.json; pass a saved Hugging Face model directory")
    tokenizer_path = args.tokenizer_name or args.model_name_or_path
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_path,
                                                               trust_remote_code=args.trust_remote_code)
        model = transformers.AutoModelForMaskedLM.from_pretrained(args.model_name_or_path,
                                                                  trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load model/tokenizer from {model_path}: {first}") from None
    if tokenizer.mask_token_id is None:
        raise UserError(f"tokenizer of {tokenizer_path} has no mask token; it is not a masked LM tokenizer")
    if len(tokenizer) > model.config.vocab_size:
        raise UserError(f"tokenizer has {len(tokenizer)} tokens but the model only {model.config.vocab_size}; "
                        f"pass the tokenizer the model was trained with (--tokenizer_name)")
    return model, tokenizer


def write_json_atomic(obj, path: Path) -> None:
    """Write to a temporary file next to the target, then rename: an old result is never half-overwritten."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def first_per_uid(pairs: list[dict], limit: int) -> list[dict]:
    """The first ``limit`` pairs of every UID, in file order: a quick check still covers every phenomenon."""
    seen: dict[str, int] = {}
    kept = []
    for p in pairs:
        seen[p["UID"]] = seen.get(p["UID"], 0) + 1
        if seen[p["UID"]] <= limit:
            kept.append(p)
    return kept


def resolve_output_file(args: EvaluateArguments) -> Path:
    if args.output_file:
        return Path(args.output_file)
    return Path(args.output_dir or args.model_name_or_path) / "blimp_results.json"


# -----------------------------------------------------------------------------
# main


def evaluate(args: EvaluateArguments) -> dict:
    import torch

    from ltgbert.zeroshot import evaluate_blimp, flatten_results, format_table, load_blimp

    # data first: a typo in the pairs path should fail before a model is loaded
    if args.blimp_dir is None:
        from ltgbert.demo_data import ensure_demo_data

        blimp_path = ensure_demo_data().blimp_dir
    else:
        blimp_path = Path(args.blimp_dir)
    pairs = load_blimp(blimp_path)
    if args.max_pairs_per_uid is not None:
        pairs = first_per_uid(pairs, args.max_pairs_per_uid)
    output_file = resolve_output_file(args)

    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise UserError(f"--device {args.device!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA GPU is visible; use --device cpu")
    model, tokenizer = load_model_and_tokenizer(args)
    model.to(device)
    results = evaluate_blimp(model, tokenizer, pairs, batch_tokens=args.batch_tokens, variant=args.variant,
                             device=device, bf16=args.bf16)

    print(format_table(results))
    record = {**results, "model_name_or_path": str(args.model_name_or_path), "blimp_path": str(blimp_path),
              "args": asdict(args)}
    write_json_atomic(record, output_file)
    print(f"wrote {output_file}")
    if args.logging_dir:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=args.logging_dir)
        for tag, value in flatten_results(results, prefix=f"blimp_{args.variant}").items():
            writer.add_scalar(tag, value, global_step=args.step)
        writer.close()
    return results


def main(argv: list[str] | None = None) -> int:
    from ltgbert.arguments import run_entry_point

    return run_entry_point(EvaluateArguments, evaluate, argv)


if __name__ == "__main__":
    sys.exit(main())
