"""Masked-language-model pretraining of LTG-BERT with Accelerate (single process, DDP, DeepSpeed ZeRO 1/2/3).

    accelerate launch launch/pretrain.py                                    # built-in demo, CPU, minutes
    accelerate launch launch/pretrain.py --config launch/configs/base.yaml --train_file corpus.txt
    accelerate launch --config_file launch/accelerate/zero2.yaml launch/pretrain.py --config ...

Outputs (<output_dir>): run_config.json (resolved arguments), tokenizer/ (when trained here),
checkpoints/step_XXXXXXXX/ (resumable state), final/ (Hugging Face model + tokenizer + remote code),
logs/ (TensorBoard). Exit status: 0 done, 2 bad input, 75 stopped by SIGUSR1/SIGTERM after a checkpoint
(the SLURM templates requeue on it; `--resume_from_checkpoint latest` continues).
"""

import json
import os
import sys
import time
from argparse import Namespace
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from ltgbert import LtgBertConfig, LtgBertForMaskedLM  # noqa: E402
from ltgbert.errors import UserError  # noqa: E402
from ltgbert.preemption import EXIT_PREEMPTED  # noqa: E402

DEMO_OUTPUT_DIR = "outputs/pretrain-demo"


@dataclass
class PretrainArguments:
    """Every option of launch/pretrain.py; a --config YAML/JSON file takes the same keys."""

    # ---- data
    train_file: list[str] | None = field(
        default=None, metadata={"help": "Corpus file(s): .txt (documents split by blank lines), .jsonl/.json/.parquet/"
                                        ".csv with --text_column. Default: the built-in demo corpus."})
    validation_file: str | None = field(default=None, metadata={"help": "Held-out corpus file (same formats)."})
    dataset_name: str | None = field(default=None, metadata={"help": "A `datasets` dataset name (Hub or local)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Its configuration name."})
    text_column: str = field(default="text", metadata={"help": "Text column of structured corpora."})
    line_by_line: bool = field(default=False, metadata={"help": "Plain text: one document per line."})
    validation_split_percentage: float = field(
        default=1.0, metadata={"help": "Percent of documents held out when no validation file is given."})
    max_seq_length: int = field(default=64, metadata={"help": "Length of packed blocks ([CLS] ... [SEP])."})
    short_seq_prob: float = field(default=0.1, metadata={"help": "Share of blocks cut shorter at random."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenisation."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where tokenised corpora are cached."})
    demo_num_words: int = field(default=1_000_000, metadata={"help": "Size of the generated demo corpus."})
    # ---- tokenizer and model
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer directory; when absent one is trained on the corpus."})
    vocab_size: int = field(default=16384, metadata={"help": "Vocabulary size of a tokenizer trained here."})
    config_name: str = field(
        default="demo", metadata={"help": "Size preset (tiny, demo, xs, small, base) or a config.json path/dir."})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Continue pretraining from this Hugging Face model directory."})
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa, eager or flex_attention."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward."})
    torch_compile: bool = field(default=False, metadata={
        "help": "torch.compile every encoder layer (regional compilation; fuses the element-wise work)."})
    torch_compile_backend: str = field(
        default="inductor", metadata={"help": "torch.compile backend (inductor; eager/aot_eager to debug)."})
    # ---- masking
    masking: str = field(
        default="subword", metadata={"help": "span (the LTG-BERT recipe), word or subword (the demo's default)."})
    mlm_probability: float = field(default=0.15, metadata={"help": "Share of tokens predicted (final value)."})
    mlm_probability_start: float | None = field(
        default=None, metadata={"help": "Mask ratio at step 0, falling linearly to --mlm_probability."})
    max_span_length: int = field(default=10, metadata={"help": "Longest masked span, in words."})
    # ---- optimisation
    optimizer: str = field(default="lamb", metadata={"help": "lamb or adamw."})
    learning_rate: float = field(default=5e-3, metadata={"help": "Peak learning rate."})
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_epsilon: float = 1e-6
    weight_decay: float = field(default=0.1, metadata={"help": "Not applied to biases, norms, embeddings."})
    max_grad_norm: float = field(default=2.0, metadata={"help": "Gradient clipping (0 disables)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "cosine, linear or constant."})
    warmup_ratio: float = field(default=0.016, metadata={"help": "Share of steps with linear warmup."})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "Cosine/linear decay ends at this share of lr."})
    max_steps: int = field(default=1000, metadata={"help": "Optimizer steps; <= 0 uses --num_train_epochs."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs when --max_steps <= 0."})
    per_device_train_batch_size: int = 32
    per_device_eval_batch_size: int = 64
    gradient_accumulation_steps: int = 1
    long_seq_length: int | None = field(
        default=None, metadata={"help": "Second phase: sequence length (e.g. 512) for the last steps."})
    long_seq_ratio: float = field(default=0.1, metadata={"help": "Share of steps in the long-sequence phase."})
    long_seq_batch_divisor: int = field(default=4, metadata={"help": "Long phase batch = batch / this."})
    max_consecutive_skips: int = field(
        default=10, metadata={"help": "Stop after this many consecutive non-finite steps."})
    # ---- output, logging, checkpoints
    output_dir: str = field(default=DEMO_OUTPUT_DIR, metadata={"help": "Where everything is written."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Start afresh in a used output_dir."})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "'latest' (newest checkpoint if any, else start) or a checkpoint path."})
    save_steps: int = field(default=200, metadata={"help": "Checkpoint every N steps (0: only at the end)."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep the newest N checkpoints."})
    logging_steps: int = field(default=20, metadata={"help": "Log training metrics every N steps."})
    eval_steps: int = field(default=200, metadata={"help": "Validate every N steps (0: only at the end)."})
    max_eval_samples: int | None = field(default=2000, metadata={"help": "Cap on validation blocks."})
    blimp_dir: str | None = field(
        default=None, metadata={"help": "BLiMP-format jsonl file/dir scored every --blimp_eval_steps (demo: auto)."})
    blimp_eval_steps: int = field(default=0, metadata={"help": "Zero-shot BLiMP every N steps (0: only at end)."})
    blimp_max_pairs_per_uid: int | None = field(
        default=100, metadata={"help": "Score at most this many pairs of each phenomenon during training."})
    seed: int = 42
    report_to: str = field(default="tensorboard", metadata={"help": "tensorboard or none."})
    peak_flops: float | None = field(
        default=None, metadata={"help": "Device peak FLOP/s for the MFU estimate (default: known GPU or measured)."})
    disable_tqdm: bool = False
    debug_nan_at_step: int | None = field(
        default=None, metadata={"help": "Testing aid: make rank 0's loss NaN at this step."})

    def __post_init__(self):
        checks = [
            (self.masking in ("span", "word", "subword"), f"--masking must be span, word or subword, not {self.masking!r}"),
            (self.optimizer in ("lamb", "adamw"), f"--optimizer must be lamb or adamw, not {self.optimizer!r}"),
            (self.attn_implementation in ("sdpa", "eager", "flex_attention"),
             "--attn_implementation must be sdpa, eager or flex_attention"),
            (self.report_to in ("tensorboard", "none"), "--report_to must be tensorboard or none"),
            (self.max_steps > 0 or self.num_train_epochs > 0, "set --max_steps or --num_train_epochs above 0"),
            (self.per_device_train_batch_size > 0 and self.gradient_accumulation_steps > 0,
             "batch size and gradient accumulation must be positive"),
            (0 < self.mlm_probability < 1, "--mlm_probability must be in (0, 1)"),
            (self.long_seq_length is None or 0 < self.long_seq_ratio < 1, "--long_seq_ratio must be in (0, 1)"),
            (self.dataset_name is None or self.train_file is None, "pass --train_file or --dataset_name, not both"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


# ----------------------------------------------------------------------------- helpers


def is_demo(args):
    return args.train_file is None and args.dataset_name is None


def check_output_dir(args):
    """Refuse to mix two runs in one directory; create it and prove it is writable."""
    out = Path(args.output_dir)
    used = (out / "run_config.json").exists() or (out / "checkpoints").exists() or (out / "final").exists()
    if used and not args.overwrite_output_dir and args.resume_from_checkpoint is None:
        raise UserError(
            f"output directory {out} already holds a run; pass --resume_from_checkpoint latest to continue it, "
            "--overwrite_output_dir to start afresh there, or another --output_dir"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output directory {out} is not writable ({e.strerror}); pass a writable --output_dir") from None


def load_model_config(args, vocab_size):
    from transformers import AutoConfig

    if args.model_name_or_path:
        return AutoConfig.from_pretrained(args.model_name_or_path)
    name = args.config_name
    if os.path.exists(name):
        return LtgBertConfig.from_pretrained(name)
    try:
        return LtgBertConfig.from_preset(name, vocab_size=vocab_size)
    except ValueError as e:
        raise UserError(f"{e} (or pass a config.json path as --config_name)") from None


def check_checkpoint_matches(path, config):
    try:
        saved = json.loads((Path(path) / "trainer_state.json").read_text())["config"]["model_config"]
    except (OSError, ValueError, KeyError):
        raise UserError(f"checkpoint {path} has no readable trainer_state.json; it is incomplete or corrupt, "
                        "pass another checkpoint") from None
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if key in saved and saved[key] != getattr(config, key):
            raise UserError(f"checkpoint {path} is for a model with {key}={saved[key]}, not {getattr(config, key)}; "
                            "resume with the run's own --config_name, or start afresh in another --output_dir")


def model_flops_per_token(config, seq_len, mask_ratio):
    """Training FLOPs per token: 6x the matmul parameters, attention's two T x T matmuls plus the bucket
    scores, and the MLM head on the masked share only (it runs only there)."""
    h, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    dense = layers * (4 * h * h + 3 * h * inter)  # qk, v, out; GeGLU up (2x) and down
    attention = layers * 2 * 2 * seq_len * h  # q.k and p.v per token, forward, x3 for backward below
    head = mask_ratio * (h * h + h * config.vocab_size)
    return 6 * (dense + head) + 3 * attention


def measure_peak_flops(device):
    """Known bf16 peaks for common GPUs; otherwise a measured fp32 matmul rate (CPU)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40", 181e12), ("A10", 125e12)):
            if key in name:
                return peak
    n = 1024
    # A private generator: drawing from the global one here would shift dropout after a resume.
    generator = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(n, n, device=device, generator=generator) for _ in range(2))
    a @ b
    best = float("inf")
    for _ in range(5):  # the fastest of five: a peak, and start-up work on the other cores cannot halve it
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


# ----------------------------------------------------------------------------- data


def prepare_tokenizer(args, accelerator, corpus_files):
    from transformers import AutoTokenizer

    from ltgbert.tokenization import train_tokenizer

    if args.tokenizer_name or args.model_name_or_path:
        name = args.tokenizer_name or args.model_name_or_path
        try:
            return AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load tokenizer {name!r} ({type(e).__name__}); pass a tokenizer directory") from None
    tokenizer_dir = Path(args.output_dir) / "tokenizer"
    if accelerator.is_main_process and not (tokenizer_dir / "tokenizer.json").exists():
        if corpus_files is None:
            raise UserError("training a tokenizer needs --train_file; with --dataset_name pass --tokenizer_name")
        vocab = args.vocab_size if not is_demo(args) else min(args.vocab_size, 4096)
        train_tokenizer(corpus_files, vocab_size=vocab, output_dir=tokenizer_dir, text_column=args.text_column,
                        model_max_length=max(args.max_seq_length, args.long_seq_length or 0))
    accelerator.wait_for_everyone()
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def prepare_datasets(args, accelerator, tokenizer, train_files, validation_files):
    """Packed train blocks per phase and validation blocks; the node's main process tokenises first."""
    from ltgbert import data

    doc_mode = "line" if args.line_by_line else "blank_line"
    with accelerator.local_main_process_first():
        if args.dataset_name:
            text = data.load_text_dataset(dataset_name=args.dataset_name, dataset_config=args.dataset_config_name,
                                          text_column=args.text_column, cache_dir=args.cache_dir)
        else:
            text = data.load_text_dataset(train_files, text_column=args.text_column, doc_mode=doc_mode,
                                          cache_dir=args.cache_dir)
        if validation_files:
            validation_text = data.load_text_dataset(validation_files, text_column=args.text_column,
                                                     doc_mode=doc_mode, cache_dir=args.cache_dir)
        else:
            text, validation_text = data.split_validation(text, args.validation_split_percentage / 100, args.seed)
        build = dict(tokenizer=tokenizer, seed=args.seed, num_proc=args.preprocessing_num_workers,
                     cache_dir=args.cache_dir)
        phases = [data.build_pretraining_dataset(text_dataset=text, max_seq_length=args.max_seq_length,
                                                 short_seq_prob=args.short_seq_prob, **build)]
        if args.long_seq_length:
            phases.append(data.build_pretraining_dataset(text_dataset=text, max_seq_length=args.long_seq_length,
                                                         short_seq_prob=args.short_seq_prob, **build))
        validation = data.build_pretraining_dataset(text_dataset=validation_text, max_seq_length=args.max_seq_length,
                                                    short_seq_prob=0.0, **build)
    if args.max_eval_samples is not None and len(validation) > args.max_eval_samples:
        validation = validation.select(range(args.max_eval_samples))
    stats = data.packing_stats(phases[0], args.max_seq_length)
    return phases, validation, stats


def make_loader(dataset, collator, batch_size, accelerator, seed, shuffle=True):
    """Training (shuffled) or evaluation loader. Every rank gets the same number of full batches: under
    ZeRO-3 each forward pass is a collective, so uneven shards would hang."""
    from ltgbert.batching import ShardedBatchSampler

    if not shuffle:
        batch_size = max(1, min(batch_size, len(dataset) // accelerator.num_processes))
    sampler = ShardedBatchSampler(len(dataset), batch_size, accelerator.process_index, accelerator.num_processes,
                                  seed=seed, shuffle=shuffle, drop_last=True)
    # Workers would not see the mask-ratio schedule (the collator lives in this process); masking is cheap.
    # A private generator: each iter(loader) draws a seed, and drawing it from the global RNG would make a
    # resumed run's dropout differ from the uninterrupted run's.
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collator, num_workers=0,
                                         generator=torch.Generator())
    return loader, sampler


class Plan:
    """Which phase (sequence length / batch) and how many micro-batches each step uses."""

    def __init__(self, args, phases, world_size):
        self.args = args
        self.batch = [args.per_device_train_batch_size]
        if args.long_seq_length:
            self.batch.append(max(1, args.per_device_train_batch_size // args.long_seq_batch_divisor))
        micro_per_epoch = len(phases[0]) // (self.batch[0] * world_size)
        if micro_per_epoch < args.gradient_accumulation_steps:
            raise UserError(
                f"the corpus packs into {len(phases[0])} blocks, fewer than one global batch "
                f"({self.batch[0] * world_size * args.gradient_accumulation_steps}); use a larger corpus or a smaller "
                "--per_device_train_batch_size / --gradient_accumulation_steps"
            )
        if args.max_steps > 0:
            self.total_steps = args.max_steps
        else:
            self.total_steps = max(1, int(args.num_train_epochs * micro_per_epoch / args.gradient_accumulation_steps))
        self.switch_step = (
            int(self.total_steps * (1 - args.long_seq_ratio)) if args.long_seq_length else self.total_steps
        )

    def phase(self, step):
        return 0 if step < self.switch_step else 1


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model, loader, accelerator):
    """Validation MLM loss and accuracy over masked tokens, summed over all ranks."""
    model.eval()
    totals = torch.zeros(3, device=accelerator.device, dtype=torch.float64)  # loss sum, correct, count
    for batch in loader:
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        out = model(**batch)
        labels = batch["labels"][batch["labels"] != -100]
        totals += torch.stack([out.loss.double() * labels.numel(), (out.logits.argmax(-1) == labels).sum().double(),
                               torch.tensor(labels.numel(), device=accelerator.device, dtype=torch.float64)])
    totals = accelerator.reduce(totals, reduction="sum")
    model.train()
    count = max(totals[2].item(), 1.0)
    return {"eval/loss": totals[0].item() / count, "eval/accuracy": totals[1].item() / count}


def run_blimp(accelerator, model, tokenizer, pairs):
    """Zero-shot minimal-pair accuracy. Every rank scores the same pairs: under ZeRO-3 a forward pass needs
    all ranks to gather the weights, so a main-process-only evaluation would hang."""
    from ltgbert.zeroshot import evaluate_blimp

    results = evaluate_blimp(accelerator.unwrap_model(model), tokenizer, pairs, device=accelerator.device)
    metrics = {"blimp/overall": results["overall"]}
    metrics.update({f"blimp/{uid}": acc for uid, acc in results["by_uid"].items()})
    return metrics


# ----------------------------------------------------------------------------- main


def check_compile_supported(torch_compile: bool, deepspeed_plugin) -> None:
    """--torch_compile with DeepSpeed ZeRO-3 is refused: ZeRO-3 swaps the layers' weights for empty partitions
    between forwards, and the compiler traces those (the run would fail at its first step)."""
    if torch_compile and deepspeed_plugin is not None and deepspeed_plugin.zero_stage == 3:
        raise UserError("--torch_compile does not work with DeepSpeed ZeRO stage 3 (partitioned weights); "
                        "drop --torch_compile or use ZeRO-1/2 or DDP")


def main(args: PretrainArguments):
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from ltgbert.arguments import resolved_config, save_resolved_config
    from ltgbert.checkpointing import (
        enable_activation_checkpointing, export_final_model, find_latest_checkpoint, load_checkpoint, save_checkpoint,
    )
    from ltgbert.data import check_tokenizer_fits
    from ltgbert.distributed import make_accelerator
    from ltgbert.masking import MlmCollator, mask_ratio_at
    from ltgbert.optimization import build_optimizer, get_lr_scheduler
    from ltgbert.preemption import PreemptionHandler

    # ---- setup
    preemption = PreemptionHandler().install()  # before anything slow: a signal during setup is kept
    check_output_dir(args)
    output_dir = Path(args.output_dir)
    accelerator = make_accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, step_scheduler_with_optimizer=False,
        log_with=None if args.report_to == "none" else "tensorboard", project_dir=str(output_dir / "logs"),
    )
    set_seed(args.seed)
    check_compile_supported(args.torch_compile, accelerator.state.deepspeed_plugin)
    resume_path = None
    if args.resume_from_checkpoint == "latest":
        resume_path = find_latest_checkpoint(output_dir)
    elif args.resume_from_checkpoint:
        resume_path = Path(args.resume_from_checkpoint)
        if not (resume_path / "trainer_state.json").exists():
            raise UserError(f"no checkpoint at {resume_path}; pass a checkpoints/step_* directory or 'latest'")

    # ---- data
    train_files, validation_files, blimp_source = args.train_file, args.validation_file, args.blimp_dir
    if is_demo(args):
        from ltgbert.demo_data import ensure_demo_data

        with accelerator.local_main_process_first():
            demo = ensure_demo_data(num_words=args.demo_num_words)
        train_files, validation_files = [str(demo.corpus_train)], str(demo.corpus_validation)
        blimp_source = blimp_source or str(demo.blimp_dir)
    if validation_files and isinstance(validation_files, str):
        validation_files = [validation_files]
    tokenizer = prepare_tokenizer(args, accelerator, train_files)
    phases, validation, stats = prepare_datasets(args, accelerator, tokenizer, train_files, validation_files)
    plan = Plan(args, phases, accelerator.num_processes)
    mask_start = args.mlm_probability_start if args.mlm_probability_start is not None else args.mlm_probability
    collator = MlmCollator(tokenizer, strategy=args.masking, mlm_probability=mask_start,
                           max_span_length=args.max_span_length, seed=args.seed)
    eval_collator = MlmCollator(tokenizer, strategy=args.masking, mlm_probability=args.mlm_probability,
                                max_span_length=args.max_span_length, seed=args.seed + 1)
    eval_loader, _ = make_loader(validation, eval_collator, args.per_device_eval_batch_size, accelerator,
                                 args.seed, shuffle=False)
    blimp_pairs = None
    if blimp_source:
        from ltgbert.zeroshot import load_blimp

        blimp_pairs = load_blimp(blimp_source)
        if args.blimp_max_pairs_per_uid:  # the first N pairs of each phenomenon: quick, and the same every time
            seen = Counter()
            subset = []
            for pair in blimp_pairs:
                seen[pair["UID"]] += 1
                if seen[pair["UID"]] <= args.blimp_max_pairs_per_uid:
                    subset.append(pair)
            blimp_pairs = subset

    # ---- model
    config = load_model_config(args, len(tokenizer))
    config._attn_implementation = args.attn_implementation
    check_tokenizer_fits(tokenizer, config.vocab_size, {"pad_token_id": config.pad_token_id,
                                                        "mask_token_id": config.mask_token_id})
    if resume_path is not None:  # before anything is written: a checkpoint of another model is refused
        check_checkpoint_matches(resume_path, config)
    if args.model_name_or_path:
        model = LtgBertForMaskedLM.from_pretrained(args.model_name_or_path, config=config)
    else:
        model = LtgBertForMaskedLM(config)
    if args.gradient_checkpointing:
        enable_activation_checkpointing(model)

    # ---- optimizer
    optimizer = build_optimizer(args.optimizer, model, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                eps=args.adam_epsilon, weight_decay=args.weight_decay)
    scheduler = get_lr_scheduler(args.lr_scheduler_type, optimizer, int(args.warmup_ratio * plan.total_steps),
                                 plan.total_steps, min_lr_ratio=args.min_lr_ratio)

    # ---- prepare
    if accelerator.state.deepspeed_plugin is not None:
        # We feed batches ourselves (no prepared dataloader), so fill DeepSpeed's "auto" values here.
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config["train_micro_batch_size_per_gpu"] = args.per_device_train_batch_size
        ds_config["gradient_accumulation_steps"] = args.gradient_accumulation_steps
        ds_config["gradient_clipping"] = args.max_grad_norm
    if args.torch_compile:
        # Regional compilation: each encoder layer is compiled in place (one compilation serves all layers)
        # and the model keeps its modules and state-dict keys for checkpointing and the distributed wrappers.
        model.compile_encoder_layers(backend=args.torch_compile_backend)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    run_config = resolved_config(args) | {"world_size": accelerator.num_processes,
                                          "distributed_type": str(accelerator.distributed_type),
                                          "mixed_precision": accelerator.mixed_precision,
                                          "model_config": config.to_dict(), "total_steps": plan.total_steps}
    if accelerator.is_main_process:
        save_resolved_config([Namespace(**run_config)], output_dir / "run_config.json")
    if args.report_to != "none":
        accelerator.init_trackers("pretrain", config={k: v for k, v in resolved_config(args).items()
                                                      if isinstance(v, (int, float, str, bool))})

    step, epoch, micro_in_epoch, phase_of_position = 0, 0, 0, 0
    if resume_path is not None:
        state = load_checkpoint(accelerator, resume_path)
        step, epoch, micro_in_epoch = state["step"], state["epoch"], state["micro_in_epoch"]
        phase_of_position = state.get("phase", 0)
        accelerator.print(f"resumed from {resume_path} at step {step}")

    # ---- loop
    peak = args.peak_flops or measure_peak_flops(accelerator.device)
    accelerator.print(f"world_size={accelerator.num_processes} distributed_type={accelerator.distributed_type} "
                      f"steps={plan.total_steps} blocks={stats.num_blocks} fill_rate={stats.fill_rate:.3f}")
    model.train()
    phase = plan.phase(step)
    if phase != phase_of_position:  # resumed exactly at the phase switch
        epoch, micro_in_epoch = 0, 0
    loader, sampler = make_loader(phases[phase], collator, plan.batch[phase], accelerator, args.seed)
    sampler.set_epoch(epoch, micro_in_epoch)
    collator.set_epoch(epoch)
    batches = iter(loader)
    progress = tqdm(total=plan.total_steps, initial=step, disable=not accelerator.is_local_main_process or args.disable_tqdm,
                    desc="pretraining", dynamic_ncols=True)
    window = torch.zeros(4, device=accelerator.device, dtype=torch.float64)  # loss sum, correct, masked, tokens
    window_start, window_steps, skipped, consecutive_skips = time.perf_counter(), 0, 0, 0
    stopped_by_signal = False

    def next_batch():
        nonlocal batches, epoch, micro_in_epoch
        try:
            batch = next(batches)
        except StopIteration:
            epoch, micro_in_epoch = epoch + 1, 0
            sampler.set_epoch(epoch)
            collator.set_epoch(epoch)
            batches = iter(loader)
            batch = next(batches)
        micro_in_epoch += 1
        return {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}

    def checkpoint():
        save_checkpoint(accelerator, output_dir, step, {
            "step": step, "epoch": epoch, "micro_in_epoch": micro_in_epoch, "phase": phase, "config": run_config,
        }, total_limit=args.save_total_limit)

    while step < plan.total_steps:
        if plan.phase(step) != phase:  # sequence-length switch: a new packing, a new batch size
            phase, epoch, micro_in_epoch = plan.phase(step), 0, 0
            loader, sampler = make_loader(phases[phase], collator, plan.batch[phase], accelerator, args.seed)
            sampler.set_epoch(0)
            collator.set_epoch(0)
            batches = iter(loader)
        if args.mlm_probability_start is not None:
            collator.mlm_probability = mask_ratio_at(step, plan.total_steps, args.mlm_probability_start,
                                                     args.mlm_probability)
        bad = torch.zeros((), device=accelerator.device)
        for _ in range(args.gradient_accumulation_steps):
            batch = next_batch()
            with accelerator.accumulate(model):
                out = model(**batch)
                loss = out.loss
                if args.debug_nan_at_step == step + 1 and accelerator.is_main_process:
                    loss = loss * float("nan")
                bad = torch.maximum(bad, (~torch.isfinite(loss.detach())).float())
                if accelerator.distributed_type.value == "DEEPSPEED":
                    # DeepSpeed steps inside backward: agree on the loss first, zero a bad micro-batch's gradient.
                    bad = accelerator.reduce(bad, reduction="sum").clamp(max=1)
                    loss = torch.where(bad > 0, out.logits.float().nan_to_num().sum() * 0.0, loss)
                accelerator.backward(loss)
                with torch.no_grad():
                    labels = batch["labels"][batch["labels"] != -100]
                    window += torch.stack([
                        loss.detach().double().nan_to_num() * labels.numel(),
                        (out.logits.detach().argmax(-1) == labels).sum().double(),
                        torch.tensor(labels.numel(), device=accelerator.device, dtype=torch.float64),
                        batch["attention_mask"].sum().double(),
                    ])
        # One small all-reduce per optimizer step: every rank takes the same skip/stop decision.
        flags = accelerator.reduce(torch.stack([bad, torch.tensor(float(preemption.requested),
                                                                  device=accelerator.device)]), reduction="sum")
        grad_norm = None
        if flags[0].item() > 0:
            skipped, consecutive_skips = skipped + 1, consecutive_skips + 1
            optimizer.zero_grad(set_to_none=True)
            if consecutive_skips >= args.max_consecutive_skips:
                raise UserError(f"{consecutive_skips} consecutive steps had a non-finite loss (last at step {step + 1});"
                                " lower --learning_rate, raise --warmup_ratio or use bf16 instead of fp16")
        else:
            consecutive_skips = 0
            if args.max_grad_norm > 0 and accelerator.distributed_type.value != "DEEPSPEED":
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        window_steps += 1
        progress.update(1)

        if step % args.logging_steps == 0 or step == plan.total_steps:
            totals = accelerator.reduce(window, reduction="sum")
            elapsed = time.perf_counter() - window_start
            tokens_per_second = totals[3].item() / elapsed
            seq_len = batch["input_ids"].shape[1]
            metrics = {
                "train/loss": totals[0].item() / max(totals[2].item(), 1), "train/mlm_accuracy":
                totals[1].item() / max(totals[2].item(), 1), "train/learning_rate": scheduler.get_last_lr()[0],
                "train/tokens_per_second": tokens_per_second, "train/samples_per_second":
                window_steps * plan.batch[phase] * args.gradient_accumulation_steps * accelerator.num_processes / elapsed,
                "train/step_time": elapsed / window_steps,
                "train/mfu": tokens_per_second * model_flops_per_token(config, seq_len, collator.mlm_probability)
                / (peak * accelerator.num_processes),
                "train/seq_len": seq_len, "train/mask_ratio": collator.mlm_probability, "train/skipped_steps": skipped,
                "train/epoch": epoch,
            }
            if grad_norm is not None:
                metrics["train/grad_norm"] = float(grad_norm)
            accelerator.log(metrics, step=step)
            progress.set_postfix(loss=f"{metrics['train/loss']:.3f}", acc=f"{metrics['train/mlm_accuracy']:.3f}")
            if accelerator.is_main_process:
                progress.write(f"step {step} loss {metrics['train/loss']:.4f} acc {metrics['train/mlm_accuracy']:.4f} "
                               f"lr {metrics['train/learning_rate']:.2e} tok/s {tokens_per_second:.0f}")
            window.zero_()
            window_start, window_steps = time.perf_counter(), 0
        if (args.eval_steps and step % args.eval_steps == 0) or step == plan.total_steps:
            metrics = evaluate(model, eval_loader, accelerator)
            accelerator.log(metrics, step=step)
            accelerator.print(f"step {step} eval loss {metrics['eval/loss']:.4f} acc {metrics['eval/accuracy']:.4f}")
        if blimp_pairs is not None and ((args.blimp_eval_steps and step % args.blimp_eval_steps == 0)
                                        or step == plan.total_steps):
            metrics = run_blimp(accelerator, model, tokenizer, blimp_pairs)
            accelerator.log(metrics, step=step)
            accelerator.print(f"step {step} blimp accuracy {metrics['blimp/overall']:.4f}")
        if flags[1].item() > 0:
            checkpoint()
            stopped_by_signal = True
            break
        if (args.save_steps and step % args.save_steps == 0) or step == plan.total_steps:
            checkpoint()

    # ---- save
    progress.close()
    if stopped_by_signal:
        accelerator.print(f"stopped by {preemption.signal_name} at step {step}: checkpoint saved, exiting with "
                          f"{EXIT_PREEMPTED} (resume with --resume_from_checkpoint latest)")
        accelerator.end_training()
        return EXIT_PREEMPTED
    export_final_model(accelerator, model, output_dir, tokenizer=tokenizer)
    accelerator.print(f"final model in {output_dir / 'final'}")
    accelerator.end_training()
    return 0


def cli(argv=None):
    from ltgbert.arguments import run_entry_point

    return run_entry_point(PretrainArguments, main, argv)


if __name__ == "__main__":
    sys.exit(cli())
