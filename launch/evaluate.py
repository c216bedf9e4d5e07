"""Zero-shot BLiMP evaluation of a masked language model by pseudo-log-likelihood.

    python launch/evaluate.py --model_name_or_path outputs/pretrain-demo/final
    python launch/evaluate.py --model_name_or_path runs/base/final --blimp_dir evaluation_data/fast_eval
    python launch/evaluate.py --model_name_or_path runs/base/final --blimp_dir evaluation_data/full_eval \\
        --tie_policy official        # the official BabyLM pipeline's numbers (ties counted right)

With no arguments it evaluates the default demo pretraining output on the demo minimal pairs. Takes a model
directory or a Hub id (from the Hugging Face cache when offline): LTG-BERT checkpoints, ours or in HPLT's
published layout, load into our classes without running their code; other masked LMs (BERT, ...) through
``AutoModelForMaskedLM``.
``--blimp_dir`` takes a jsonl file, a directory of them, or the BabyLM pipeline's ``evaluation_data/`` (or its
``full_eval/`` / ``fast_eval/``) folder, whose ``blimp_*`` and ``supplement_*`` folders are each one task.
Prints a table of accuracies and ties per UID, per task (the mean over UIDs the pipeline reports), per field
and overall, writes them as JSON (default <output_dir or model dir>/blimp_results.json) and, with
--logging_dir, as TensorBoard scalars. Flags may also come from ``--config file.yaml|json`` (keys = flag
names; the command line overrides them). Exit codes: 0 done, 2 bad input.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

# run as a script from a checkout: make the package importable without installing it
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ltgbert.errors import UserError


@dataclass
class ModelDataArguments:
    _argument_group_name = "model and data"

    model_name_or_path: str = field(
        default="outputs/pretrain-demo/final",
        metadata={
            "help": "Model directory or Hub id (read from the cache when "
            "offline): an LTG-BERT checkpoint (ours or HPLT's "
            "published layout) or any AutoModelForMaskedLM, with its "
            "tokenizer unless --tokenizer_name is given."
        },
    )
    blimp_dir: str | None = field(
        default=None,
        metadata={
            "help": "A BLiMP jsonl file, a directory of them, or the BabyLM "
            "evaluation_data/ (full_eval/, fast_eval/) folder "
            "(default: the built-in demo pairs)."
        },
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer directory if not the model's."})
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Allow model code shipped with a non-LTG-BERT "
            "model (LTG-BERT always loads into our "
            "classes, never running a checkpoint's code)."
        },
    )
    max_pairs_per_uid: int | None = field(
        default=None, metadata={"help": "Evaluate only the first N pairs of each UID (a quick check)."}
    )


@dataclass
class ScoringArguments:
    _argument_group_name = "scoring"

    variant: str = field(
        default="pll",
        metadata={
            "help": "pll (Salazar et al., 2020; what the BabyLM pipeline "
            "uses) or within_word_l2r (Kauf and Ivanova, 2023).",
            "choices": ["pll", "within_word_l2r"],
        },
    )
    tie_policy: str = field(
        default="strict",
        metadata={
            "help": "strict: a pair whose sentences score the same is "
            "wrong; official: it is right, as the BabyLM "
            "pipeline counts it (with --variant pll this "
            "reproduces its accuracies; implies fp32 unless "
            "--bf16 is given).",
            "choices": ["strict", "official"],
        },
    )
    batch_tokens: int = field(
        default=8192,
        metadata={"help": "Padded tokens per forward pass (masked copies of several sentences share a batch)."},
    )
    device: str | None = field(default=None, metadata={"help": "cuda, cuda:1, cpu (default: cuda if available)."})
    bf16: bool | None = field(
        default=None,
        metadata={"help": "bf16 autocast (default: on when the GPU has it, off with --tie_policy official)."},
    )


@dataclass
class OutputArguments:
    _argument_group_name = "outputs"

    output_dir: str | None = field(
        default=None, metadata={"help": "Where blimp_results.json goes (default: the model directory)."}
    )
    output_file: str | None = field(
        default=None, metadata={"help": "Exact path of the JSON results (overrides --output_dir)."}
    )
    logging_dir: str | None = field(default=None, metadata={"help": "TensorBoard directory for the accuracies."})
    step: int = field(default=0, metadata={"help": "Global step the TensorBoard scalars are logged at."})


@dataclass
class EvaluateArguments(OutputArguments, ScoringArguments, ModelDataArguments):
    """Flags of launch/evaluate.py (Hugging Face style names), in three --help sections."""

    def __post_init__(self):
        if self.batch_tokens < 1:
            raise UserError(f"--batch_tokens must be >= 1, got {self.batch_tokens}")
        if self.max_pairs_per_uid is not None and self.max_pairs_per_uid < 1:
            raise UserError(f"--max_pairs_per_uid must be >= 1, got {self.max_pairs_per_uid}")


# -----------------------------------------------------------------------------
# helpers


def is_ltgbert_checkpoint(name_or_path: str) -> bool:
    """Whether a directory or Hub id holds an LTG-BERT model (ours, or a published one without model_type)."""
    from transformers import PretrainedConfig

    from ltgbert.loading import is_ltgbert_config_dict

    try:
        # reads config.json (a directory or the Hub cache) and nothing else: no class is built, no code runs
        config_dict, _ = PretrainedConfig.get_config_dict(str(name_or_path))
    except (OSError, ValueError):
        return True  # ltgbert.loading names the problem (no directory, an uncached Hub id) in one line
    return is_ltgbert_config_dict(config_dict)


def load_model_and_tokenizer(args: EvaluateArguments):
    """The masked LM and its tokenizer, in float32 (as the BabyLM pipeline loads them; --bf16 decides the compute).

    LTG-BERT checkpoints (ours, the published HPLT layout, Hub ids from the cache) load through ltgbert.loading
    into our classes, so a checkpoint's own code never runs; any other model type (BERT, ...) through
    AutoModelForMaskedLM, with --trust_remote_code if it needs its code. Failures are one-line UserErrors.
    """
    import torch

    name = args.model_name_or_path
    tokenizer_name = args.tokenizer_name or name
    if is_ltgbert_checkpoint(name):
        from ltgbert import LtgBertForMaskedLM
        from ltgbert.loading import load_config, load_model, load_tokenizer

        config = load_config(name)
        tokenizer = load_tokenizer(tokenizer_name, config=config)
        return load_model(LtgBertForMaskedLM, name, config=config, dtype=torch.float32), tokenizer

    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_name, trust_remote_code=args.trust_remote_code)
        model = transformers.AutoModelForMaskedLM.from_pretrained(
            name, dtype=torch.float32, trust_remote_code=args.trust_remote_code
        )
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load model/tokenizer from {name}: {first}") from None
    if tokenizer.mask_token_id is None:
        raise UserError(f"tokenizer of {tokenizer_name} has no mask token; it is not a masked LM tokenizer")
    from ltgbert.loading import check_tokenizer_fits

    check_tokenizer_fits(tokenizer, model.config.vocab_size)
    return model, tokenizer


def resolve_output_file(args: EvaluateArguments) -> Path:
    if args.output_file:
        return Path(args.output_file)
    return Path(args.output_dir or args.model_name_or_path) / "blimp_results.json"


def resolve_device(name: str | None):
    import torch

    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA GPU is visible; use --device cpu")
    return device


def write_results(record: dict, path: Path) -> None:
    """The one JSON write of this script: atomic (temporary sibling + rename), so an old result is never
    half-overwritten."""
    from ltgbert.io import write_json

    write_json(path, record)


def log_tensorboard(results: dict, args: EvaluateArguments) -> None:
    from torch.utils.tensorboard import SummaryWriter

    from ltgbert.zeroshot import flatten_results

    writer = SummaryWriter(log_dir=args.logging_dir)
    for tag, value in flatten_results(results, prefix=f"blimp_{args.variant}").items():
        writer.add_scalar(tag, value, global_step=args.step)
    writer.close()


# -----------------------------------------------------------------------------
# main


def main(args: EvaluateArguments) -> dict:
    """Score the pairs, print the table, write the JSON (and TensorBoard scalars); returns the results."""
    from ltgbert.zeroshot import evaluate_blimp, format_table, load_blimp

    # data first: a typo in the pairs path should fail before a model is loaded
    if args.blimp_dir is None:
        from ltgbert.demo_data import ensure_demo_data

        blimp_path = ensure_demo_data().blimp_dir
    else:
        blimp_path = Path(args.blimp_dir)
    pairs = load_blimp(blimp_path, max_pairs_per_uid=args.max_pairs_per_uid)
    output_file = resolve_output_file(args)
    device = resolve_device(args.device)

    model, tokenizer = load_model_and_tokenizer(args)
    model.to(device)
    results = evaluate_blimp(
        model,
        tokenizer,
        pairs,
        batch_tokens=args.batch_tokens,
        variant=args.variant,
        device=device,
        bf16=args.bf16,
        tie_policy=args.tie_policy,
    )

    print(format_table(results))
    record = {
        **results,
        "model_name_or_path": str(args.model_name_or_path),
        "blimp_path": str(blimp_path),
        "args": asdict(args),
    }
    write_results(record, output_file)
    print(f"wrote {output_file}")
    if args.logging_dir:
        log_tensorboard(results, args)
    return results


def cli(argv: list[str] | None = None) -> int:
    from ltgbert.arguments import run_entry_point

    return run_entry_point(EvaluateArguments, main, argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(cli())
