"""Masked-language-model pretraining of LTG-BERT with Accelerate (one process, DDP, DeepSpeed ZeRO 1/2/3).

    accelerate launch launch/pretrain.py                                    # built-in demo, CPU, minutes
    accelerate launch launch/pretrain.py --config launch/configs/small.yaml --train_file train_10M/ \\
        --validation_file 'dev/*.dev' --save_at_words babylm_strict_small --output_dir runs/babylm-10m
    accelerate launch --config_file launch/accelerate/zero2.yaml launch/pretrain.py --config ...
    sbatch --nodes=4 slurm/pretrain.slurm --config launch/configs/base.yaml --train_file corpus/ --output_dir runs/b

Outputs (<output_dir>): run_config.json (resolved arguments), metrics.jsonl (one JSON line per logged step),
tokenizer/ (when trained here), checkpoints/step_XXXXXXXX/ (resumable state), checkpoints/chck_{N}M/ (model
directories at word milestones), final/ (Hugging Face model + tokenizer + remote code), logs/ (trackers).
Exit status: 0 done, 2 bad input, 75 stopped by SIGUSR1/SIGTERM after a checkpoint (the SLURM templates
requeue on it; --resume_from_checkpoint latest continues, also on another number of processes).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from ltgbert.arguments import OptimizationArguments, OutputArguments, RuntimeArguments, redefault  # noqa: E402
from ltgbert.errors import UserError  # noqa: E402
from ltgbert.preemption import EXIT_PREEMPTED  # noqa: E402

DEMO_OUTPUT_DIR = "outputs/pretrain-demo"


@dataclass
class DataArguments:
    _argument_group_name = "data"

    train_file: list[str] | None = field(
        default=None,
        metadata={
            "help": "Corpus: files, directories (every file in them) or glob patterns. Plain text of any suffix "
            "(BabyLM's "
            "*.train; the layout, blank-line documents or one utterance per line, is detected per file) or one "
            "structured format (.jsonl/.json/.parquet/.csv/.tsv, with --text_column). Default: the demo corpus."
        },
    )
    validation_file: list[str] | None = field(
        default=None,
        metadata={
            "help": "Held-out corpus, the same forms (e.g. BabyLM's '*.dev'); default: documents held out of the "
            "corpus."
        },
    )
    dataset_name: str | None = field(default=None, metadata={"help": "A `datasets` dataset (Hub or local) instead."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Its configuration name."})
    dataset_split: str = field(default="train", metadata={"help": "The split of --dataset_name to train on."})
    text_column: str = field(default="text", metadata={"help": "Text column of structured corpora."})
    line_by_line: bool = field(default=False, metadata={"help": "Plain text: every line is a document."})
    validation_split_percentage: float = field(
        default=1.0, metadata={"help": "Percent of the documents held out when no validation file is given."}
    )
    max_seq_length: int = field(default=64, metadata={"help": "Length of the packed blocks ([CLS] ... [SEP])."})
    short_seq_prob: float = field(default=0.1, metadata={"help": "Share of blocks cut shorter at random."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenisation."})
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where tokenised corpora are cached; on storage every node sees (the job tokenises once)."},
    )
    max_eval_samples: int | None = field(default=2000, metadata={"help": "Cap on validation blocks."})
    demo_num_words: int = field(default=1_000_000, metadata={"help": "Size of the generated demo corpus."})


@dataclass
class ModelArguments:
    _argument_group_name = "tokenizer and model"

    tokenizer_name: str | None = field(
        default=None,
        metadata={"help": "Tokenizer directory or Hub id; when absent a WordPiece tokenizer is trained on the corpus."},
    )
    vocab_size: int = field(default=16384, metadata={"help": "Vocabulary size of a tokenizer trained here."})
    config_name: str | None = field(
        default="demo", metadata={"help": "Size preset (tiny, demo, xs, small, base) or a config.json path/directory."}
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Continue pretraining this model (ours, a published LTG-BERT/HPLT directory, or a Hub id from the "
            "cache); its tokenizer too unless --tokenizer_name."
        },
    )
    attn_implementation: str = field(
        default="sdpa", metadata={"help": "Attention kernel.", "choices": ["sdpa", "eager", "flex_attention"]}
    )
    torch_compile: bool = field(
        default=False,
        metadata={"help": "torch.compile every encoder layer (regional compilation: fuses the element-wise work)."},
    )
    torch_compile_backend: str = field(
        default="inductor", metadata={"help": "torch.compile backend (inductor; eager or aot_eager to debug)."}
    )


@dataclass
class MaskingArguments:
    _argument_group_name = "masking"

    masking: str = field(
        default="subword",
        metadata={
            "help": "span (the LTG-BERT recipe), word (whole words) or subword (the demo's default).",
            "choices": ["span", "word", "subword"],
        },
    )
    mlm_probability: float = field(default=0.15, metadata={"help": "Share of tokens predicted (the final value)."})
    mlm_probability_start: float | None = field(
        default=None, metadata={"help": "Mask ratio at step 0, falling linearly to --mlm_probability at the last step."}
    )
    max_span_length: int = field(default=10, metadata={"help": "Longest masked span, in words."})


@dataclass
class ScheduleArguments:
    _argument_group_name = "length, phases and word budget"

    max_words: int | None = field(
        default=None,
        metadata={
            "help": "Stop once this many words (whitespace words of the text) were trained on, e.g. 100000000 for 10 "
            "epochs of BabyLM strict-small; beside --max_steps / --num_train_epochs, the first limit wins."
        },
    )
    save_at_words: str | None = field(
        default=None,
        metadata={
            "help": "Word counts at which a model directory checkpoints/chck_{N}M/ is written (kept whatever "
            "--save_total_limit): a list such as 1M,2M,10M, or babylm_strict_small (1M..9M, 10M..100M) or "
            "babylm_strict (also 200M..1000M)."
        },
    )
    long_seq_length: int | None = field(
        default=None,
        metadata={"help": "Second phase: this sequence length (e.g. 512) for the last --long_seq_ratio of the steps."},
    )
    long_seq_ratio: float = field(default=0.1, metadata={"help": "Share of the steps in the long phase."})
    long_seq_batch_divisor: int = field(default=4, metadata={"help": "Long-phase batch = batch / this."})


@dataclass
class EvaluationArguments:
    _argument_group_name = "zero-shot evaluation and monitoring"

    blimp_dir: str | None = field(
        default=None,
        metadata={
            "help": "BLiMP-format minimal pairs (a jsonl file, a directory, or BabyLM's evaluation_data) scored every "
            "--blimp_eval_steps (the demo scores its own pairs)."
        },
    )
    blimp_eval_steps: int = field(default=0, metadata={"help": "Zero-shot BLiMP every N steps (0: only at the end)."})
    blimp_max_pairs_per_uid: int | None = field(
        default=100,
        metadata={
            "help": "Score the first N pairs of each phenomenon during training (quick and the same every time)."
        },
    )
    peak_flops: float | None = field(
        default=None,
        metadata={
            "help": "Peak FLOP/s of one device for the MFU estimate (default: a known GPU's, or measured on a CPU)."
        },
    )


@dataclass
class PretrainArguments(
    RuntimeArguments,
    OptimizationArguments,
    OutputArguments,
    EvaluationArguments,
    ScheduleArguments,
    MaskingArguments,
    ModelArguments,
    DataArguments,
):
    """Every option of launch/pretrain.py; a --config YAML/JSON file takes the same keys."""

    output_dir: str = redefault(OutputArguments, "output_dir", DEMO_OUTPUT_DIR)
    max_steps: int = redefault(OptimizationArguments, "max_steps", 1000)

    def __post_init__(self):
        super().__post_init__()
        checks = [
            (0 < self.mlm_probability < 1, "--mlm_probability must be in (0, 1)"),
            (
                self.mlm_probability_start is None or 0 < self.mlm_probability_start < 1,
                "--mlm_probability_start must be in (0, 1)",
            ),
            (self.long_seq_length is None or 0 < self.long_seq_ratio < 1, "--long_seq_ratio must be in (0, 1)"),
            (self.dataset_name is None or self.train_file is None, "pass --train_file or --dataset_name, not both"),
            (self.max_words is None or self.max_words > 0, "--max_words must be positive"),
            (self.max_seq_length >= 4, "--max_seq_length must be at least 4"),
            (
                self.config_name is not None or self.model_name_or_path is not None,
                "pass --config_name (a size preset or config.json) or --model_name_or_path",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.save_at_words:
            from ltgbert.checkpointing import parse_word_milestones

            parse_word_milestones(self.save_at_words)  # a bad list fails now, not at the first milestone


def is_demo(args) -> bool:
    return args.train_file is None and args.dataset_name is None


# ----------------------------------------------------------------------------- data


@dataclass
class Corpus:
    tokenizer: object
    phases: list  # packed train blocks per sequence-length phase
    validation: object
    fingerprint: dict
    words_per_block: float
    blimp_pairs: list | None


def prepare_tokenizer(args, run, train_files):
    """The run's tokenizer: given, the model's, or trained on the corpus into <output_dir>/tokenizer/ (once)."""
    from ltgbert.loading import load_tokenizer
    from ltgbert.tokenization import train_tokenizer

    if args.tokenizer_name or args.model_name_or_path:
        return load_tokenizer(args.tokenizer_name or args.model_name_or_path)
    tokenizer_dir = run.output_dir / "tokenizer"
    if run.accelerator.is_main_process and not (tokenizer_dir / "tokenizer.json").exists():
        if train_files is None:
            raise UserError("training a tokenizer needs --train_file; with --dataset_name pass --tokenizer_name")
        vocab = min(args.vocab_size, 4096) if is_demo(args) else args.vocab_size
        train_tokenizer(
            train_files,
            vocab_size=vocab,
            output_dir=tokenizer_dir,
            text_column=args.text_column,
            model_max_length=max(args.max_seq_length, args.long_seq_length or 0),
        )
    run.accelerator.wait_for_everyone()
    return load_tokenizer(tokenizer_dir)


def corpus_files(args, run) -> tuple[list[str] | None, list[str] | None, str | None]:
    """(train files, validation files, BLiMP source) as given, or the demo data's (generated once per job)."""
    from ltgbert import data

    train_files, validation_files, blimp_source = args.train_file, args.validation_file, args.blimp_dir
    if is_demo(args):
        from ltgbert.demo_data import ensure_demo_data

        with run.accelerator.main_process_first():
            demo = ensure_demo_data(num_words=args.demo_num_words)
        train_files, validation_files = [str(demo.corpus_train)], [str(demo.corpus_validation)]
        blimp_source = blimp_source or str(demo.blimp_dir)
    if train_files is not None:
        train_files = [str(p) for p in data.expand_input_files(train_files)]
    return train_files, validation_files, blimp_source


def run_fingerprint(args, tokenizer, train_files) -> dict[str, str]:
    """What identifies the run's data: a checkpoint of another corpus or tokenizer is refused on resume."""
    from ltgbert.training import fingerprint_files, fingerprint_tokenizer

    corpus = fingerprint_files(train_files) if train_files else f"{args.dataset_name}:{args.dataset_config_name}"
    return {"corpus": corpus, "tokenizer": fingerprint_tokenizer(tokenizer)}


def prepare_corpus(args, run, tokenizer, fingerprint, train_files, validation_files, blimp_source) -> Corpus:
    """Corpus -> packed blocks per phase + validation blocks; the job tokenises once.

    The global main process tokenises (into a cache every rank and node reads); the others wait in a barrier
    with the long process-group timeout of ``make_accelerator``.
    """
    import pyarrow.compute as pc

    from ltgbert import data

    accelerator = run.accelerator
    doc_mode = "line" if args.line_by_line else "auto"
    read = {"text_column": args.text_column, "doc_mode": doc_mode, "cache_dir": args.cache_dir}
    with accelerator.main_process_first():
        if args.dataset_name:
            text = data.load_text_dataset(
                dataset_name=args.dataset_name,
                dataset_config=args.dataset_config_name,
                split=args.dataset_split,
                text_column=args.text_column,
                cache_dir=args.cache_dir,
            )
        else:
            text, layouts = data.load_text_dataset(train_files, return_layouts=True, **read)
            for layout in layouts:
                accelerator.print(f"corpus file {layout.describe()}")
        if validation_files:
            validation_text = data.load_text_dataset(validation_files, **read)
        else:
            text, validation_text = data.split_validation(text, args.validation_split_percentage / 100, args.seed)
        build = {
            "tokenizer": tokenizer,
            "seed": args.seed,
            "cache_dir": args.cache_dir,
            "short_seq_prob": args.short_seq_prob,
        }
        lengths = [args.max_seq_length] + ([args.long_seq_length] if args.long_seq_length else [])
        phases = []
        for length in lengths:
            cached = data.is_packed_cached(text_dataset=text, max_seq_length=length, **build)
            phases.append(
                data.build_pretraining_dataset(
                    text_dataset=text, max_seq_length=length, num_proc=args.preprocessing_num_workers, **build
                )
            )
            # Every rank says what it did: a job tokenises its corpus once, whatever the number of nodes.
            print(
                f"rank {accelerator.process_index}: {'read the cached' if cached else 'tokenised the'} training "
                f"corpus at length {length} ({len(phases[-1])} blocks)",
                flush=True,
            )
        validation = data.build_pretraining_dataset(
            text_dataset=validation_text,
            max_seq_length=args.max_seq_length,
            num_proc=args.preprocessing_num_workers,
            **{**build, "short_seq_prob": 0.0},
        )
    if args.max_eval_samples is not None and len(validation) > args.max_eval_samples:
        validation = validation.select(range(args.max_eval_samples))
    words = pc.sum(phases[0].data.column("words")).as_py() if "words" in phases[0].column_names else 0
    blimp_pairs = None
    if blimp_source:
        from ltgbert.zeroshot import load_blimp

        blimp_pairs = load_blimp(blimp_source, max_pairs_per_uid=args.blimp_max_pairs_per_uid)
    return Corpus(tokenizer, phases, validation, fingerprint, words / max(len(phases[0]), 1), blimp_pairs)


class Plan:
    """How many steps, which phase (sequence length and per-device batch) each step is in."""

    def __init__(self, args, corpus: Corpus, run):
        world, accumulation = run.world_size, run.gradient_accumulation_steps
        self.batch = [args.per_device_train_batch_size]
        if args.long_seq_length:
            self.batch.append(max(1, args.per_device_train_batch_size // args.long_seq_batch_divisor))
        self.global_batch = [b * world * accumulation for b in self.batch]
        steps_per_epoch = len(corpus.phases[0]) // self.global_batch[0]
        if steps_per_epoch < 1:
            raise UserError(
                f"the corpus packs into {len(corpus.phases[0])} blocks, fewer than one global batch "
                f"({self.global_batch[0]}); use a larger corpus or a smaller --per_device_train_batch_size / "
                "--gradient_accumulation_steps"
            )
        # With only a word budget, the steps are an estimate (for the schedule): the budget ends the run.
        self.word_limited = args.max_steps <= 0 and args.num_train_epochs <= 0
        if args.max_steps > 0:
            self.total_steps = args.max_steps
        elif self.word_limited:
            self.total_steps = math.ceil(args.max_words / max(corpus.words_per_block * self.global_batch[0], 1))
        else:
            self.total_steps = max(1, int(args.num_train_epochs * steps_per_epoch))
        self.switch_step = (
            int(self.total_steps * (1 - args.long_seq_ratio)) if args.long_seq_length else self.total_steps
        )

    def phase(self, step: int) -> int:
        return 0 if step < self.switch_step else 1


class PhasedBatches:
    """Micro-batches of every optimizer step; a new stream at the sequence-length switch (a new packing)."""

    def __init__(self, args, run, corpus: Corpus, plan: Plan, state, collator):
        self.args, self.run, self.corpus, self.plan, self.state, self.collator = (
            args,
            run,
            corpus,
            plan,
            state,
            collator,
        )
        self.stream, self.phase = None, None

    def next_step(self) -> list[dict]:
        from ltgbert.batching import StepBatches

        phase = self.plan.phase(self.state.step)
        if self.stream is None or phase != self.phase:
            if self.state.phase != phase:  # the data position of a new phase starts at its beginning
                self.state.phase, self.state.epoch, self.state.samples_in_epoch = phase, 0, 0
            self.stream = StepBatches(
                self.run,
                self.corpus.phases[phase],
                self.plan.batch[phase],
                self.collator,
                self.state,
                self.args.seed,
                self.args.dataloader_num_workers,
                record_rows=self.args.debug_record_rows,
            )
            self.phase = phase
        return self.stream.next_step()


# ----------------------------------------------------------------------------- model


def load_model_config(args, vocab_size: int):
    from ltgbert import LtgBertConfig
    from ltgbert.loading import load_config

    if args.model_name_or_path:
        return load_config(args.model_name_or_path)
    if Path(args.config_name).exists():
        return load_config(args.config_name)
    try:
        return LtgBertConfig.from_preset(args.config_name, vocab_size=vocab_size)
    except ValueError as e:
        raise UserError(f"{e} (or pass a config.json path as --config_name)") from None


def build_model(args, tokenizer, config):
    from ltgbert import LtgBertForMaskedLM
    from ltgbert.checkpointing import enable_activation_checkpointing
    from ltgbert.loading import check_tokenizer_fits, load_model

    config._attn_implementation = args.attn_implementation
    check_tokenizer_fits(
        tokenizer, config.vocab_size, {"pad_token_id": config.pad_token_id, "mask_token_id": config.mask_token_id}
    )
    if args.model_name_or_path:
        model = load_model(LtgBertForMaskedLM, args.model_name_or_path, config=config)
    else:
        model = LtgBertForMaskedLM(config)
    if args.gradient_checkpointing:
        enable_activation_checkpointing(model)
    return model


def check_compile_supported(torch_compile: bool, deepspeed_plugin) -> None:
    """--torch_compile with DeepSpeed ZeRO-3 is refused: ZeRO-3 swaps the layers' weights for empty partitions
    between forwards, and the compiler traces those (the run would fail at its first step)."""
    if torch_compile and deepspeed_plugin is not None and deepspeed_plugin.zero_stage == 3:
        raise UserError(
            "--torch_compile does not work with DeepSpeed ZeRO stage 3 (partitioned weights); "
            "drop --torch_compile or use ZeRO-1/2 or DDP"
        )


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(run, model, corpus: Corpus, collator, batch_size: int) -> dict[str, float]:
    """Validation MLM loss and accuracy over the masked tokens of EVERY block, whatever the world size: each
    block is scored once (padding rows are left out) and its masks depend only on the block."""
    from ltgbert.batching import LoaderDataset, eval_batches

    accelerator = run.accelerator
    batches = eval_batches(len(corpus.validation), batch_size, accelerator.process_index, accelerator.num_processes)

    def collate(examples):
        batch = collator(examples)
        real = torch.tensor([ex["real"] for ex in examples])
        batch["labels"][~real] = -100
        batch.pop("words", None)
        return batch

    loader = torch.utils.data.DataLoader(LoaderDataset(corpus.validation), batch_sampler=batches, collate_fn=collate)
    model.eval()
    totals = torch.zeros(3, device=accelerator.device, dtype=torch.float64)  # loss sum, correct, count
    for batch in loader:
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        logits = model(**batch, labelled_logits_only=True).logits.float()
        labels = batch["labels"][batch["labels"] != -100]
        if labels.numel():
            totals += torch.stack(
                [
                    torch.nn.functional.cross_entropy(logits, labels, reduction="sum").double(),
                    (logits.argmax(-1) == labels).sum().double(),
                    torch.tensor(float(labels.numel()), device=accelerator.device, dtype=torch.float64),
                ]
            )
    totals = accelerator.reduce(totals, reduction="sum")
    model.train()
    count = max(totals[2].item(), 1.0)
    return {
        "eval/loss": totals[0].item() / count,
        "eval/accuracy": totals[1].item() / count,
        "eval/masked_tokens": totals[2].item(),
    }


def run_blimp(run, model, tokenizer, pairs) -> dict[str, float]:
    """Zero-shot minimal-pair accuracy. Every rank scores the same pairs: under ZeRO-3 a forward pass needs
    all ranks to gather the weights, so a main-process-only evaluation would hang."""
    from ltgbert.zeroshot import evaluate_blimp

    results = evaluate_blimp(run.accelerator.unwrap_model(model), tokenizer, pairs, device=run.accelerator.device)
    return {"blimp/overall": results["overall"], **{f"blimp/{uid}": acc for uid, acc in results["by_uid"].items()}}


# ----------------------------------------------------------------------------- the loop


def log_train_metrics(args, run, window, state, plan, ctx, progress, lr: float, grad_norm: float | None) -> None:
    from ltgbert.flops import config_flops_per_token

    totals = window.reduce(run.accelerator)
    seconds, steps = totals["seconds"], max(window.steps, 1)
    tokens_per_second = totals.get("tokens", 0.0) / seconds
    seq_len = args.max_seq_length if state.phase == 0 else args.long_seq_length
    masked = max(totals.get("masked", 0.0), 1.0)
    ratio = ctx.collator.mask_ratio(state.step - 1)  # the ratio of the step just done
    metrics = {
        "train/loss": totals.get("loss_sum", 0.0) / masked,
        "train/mlm_accuracy": totals.get("correct", 0.0) / masked,
        "train/learning_rate": lr,
        "train/tokens_per_second": tokens_per_second,
        "train/samples_per_second": steps * plan.global_batch[state.phase] / seconds,
        "train/step_time": seconds / steps,
        "train/seq_len": seq_len,
        "train/mask_ratio": ratio,
        "train/masked_share": masked / max(totals.get("tokens", 0.0), 1.0),
        "train/mfu": tokens_per_second
        * config_flops_per_token(ctx.config, seq_len, ratio)
        / (ctx.peak * run.world_size),
        "train/skipped_steps": state.skipped_steps,
        "train/epoch": state.epoch,
        "train/words_seen": state.words_seen,
        "train/samples_seen": state.samples_seen,
    }
    if grad_norm is not None:
        metrics["train/grad_norm"] = grad_norm
    progress.set_postfix(loss=f"{metrics['train/loss']:.3f}", acc=f"{metrics['train/mlm_accuracy']:.3f}")
    run.log.log(
        metrics,
        state.step,
        f"step {state.step} loss {metrics['train/loss']:.4f} acc "
        f"{metrics['train/mlm_accuracy']:.4f} lr {metrics['train/learning_rate']:.2e} tok/s "
        f"{tokens_per_second:.0f} words {state.words_seen}",
    )
    window.reset()


def train(args, run, model, optimizer, scheduler, corpus: Corpus, plan: Plan, state, ctx) -> int:
    """The training loop: steps until the plan, the word budget or a signal ends it. Returns the exit status."""
    from tqdm.auto import tqdm

    from ltgbert.checkpointing import parse_word_milestones
    from ltgbert.training import MetricWindow, train_step

    accelerator = run.accelerator
    stream = PhasedBatches(args, run, corpus, plan, state, ctx.collator)
    window = MetricWindow(accelerator.device)
    milestones = parse_word_milestones(args.save_at_words) if args.save_at_words else []
    progress = tqdm(
        total=None if plan.word_limited else plan.total_steps,
        initial=state.step,
        desc="pretraining",
        dynamic_ncols=True,
        disable=not accelerator.is_local_main_process or args.disable_tqdm,
    )
    model.train()

    def finished() -> bool:
        if args.max_words and state.words_seen >= args.max_words:
            return True
        return not plan.word_limited and state.step >= plan.total_steps

    while not finished():
        micro = stream.next_step()
        result = train_step(run, args, model, optimizer, scheduler, micro, state, ctx.forward, ctx.stats, window)
        progress.update(1)
        last = finished()
        if state.step % args.logging_steps == 0 or last:
            log_train_metrics(
                args, run, window, state, plan, ctx, progress, scheduler.get_last_lr()[0], result.grad_norm
            )
        if (args.eval_steps and state.step % args.eval_steps == 0) or last:
            metrics = evaluate(run, model, corpus, ctx.eval_collator, args.per_device_eval_batch_size)
            run.log.log(
                metrics,
                state.step,
                f"step {state.step} eval loss {metrics['eval/loss']:.4f} acc {metrics['eval/accuracy']:.4f}",
            )
        if corpus.blimp_pairs and ((args.blimp_eval_steps and state.step % args.blimp_eval_steps == 0) or last):
            metrics = run_blimp(run, model, corpus.tokenizer, corpus.blimp_pairs)
            run.log.log(metrics, state.step, f"step {state.step} blimp accuracy {metrics['blimp/overall']:.4f}")
        for words in milestones:
            if words <= state.words_seen and words not in state.milestones_written:
                ctx.write_milestone(words)
                state.milestones_written.append(words)
        if result.stop_requested:
            ctx.checkpoint()
            progress.close()
            accelerator.print(
                f"stopped by {run.preemption.signal_name} at step {state.step}: checkpoint saved, "
                f"exiting with {EXIT_PREEMPTED} (resume with --resume_from_checkpoint latest)"
            )
            return EXIT_PREEMPTED
        if (args.save_steps and state.step % args.save_steps == 0) or last:
            ctx.checkpoint()
    progress.close()
    return 0


class LoopContext:
    """What the loop needs besides the prepared objects: collators, the model call, saving. Plain attributes."""

    def __init__(self, args, run, model, corpus: Corpus, plan: Plan, config, run_config: dict, state):
        from ltgbert.masking import MlmCollator

        self.args, self.run, self.model, self.corpus, self.plan, self.config = args, run, model, corpus, plan, config
        self.run_config, self.state = run_config, state
        common = {
            "strategy": args.masking,
            "max_span_length": args.max_span_length,
            "mlm_probability": args.mlm_probability,
        }
        # The mask-ratio schedule lives in the collator, which reads each row's step: DataLoader workers apply it.
        self.collator = MlmCollator(
            corpus.tokenizer,
            seed=args.seed,
            mlm_probability_start=args.mlm_probability_start,
            total_steps=plan.total_steps,
            **common,
        )
        self.eval_collator = MlmCollator(corpus.tokenizer, seed=args.seed + 1, **common)
        self.peak = args.peak_flops or _peak_flops(run.accelerator.device)

    @staticmethod
    def forward(model, batch):
        batch.pop("idx", None)
        # Only the labelled positions are projected onto the vocabulary: the MLM head's cost at 15%.
        out = model(**batch, labelled_logits_only=True)
        return out.loss, out

    @staticmethod
    def stats(batch, loss, out):
        labels = batch["labels"][batch["labels"] != -100]
        return {
            "loss_sum": loss.double().nan_to_num() * labels.numel(),
            "correct": (out.logits.argmax(-1) == labels).sum(),
            "masked": labels.numel(),
            "tokens": batch["attention_mask"].sum(),
        }

    def checkpoint(self):
        from ltgbert.training import save_training_state

        save_training_state(
            self.run,
            self.state,
            self.run_config,
            self.corpus.fingerprint,
            self.plan.global_batch[0],
            self.args.save_total_limit,
        )

    def write_milestone(self, words: int) -> None:
        from ltgbert.checkpointing import CHECKPOINTS_DIR, export_final_model, milestone_name
        from ltgbert.distributed import broadcast_object

        name = milestone_name(words)
        # Written by an earlier run of this job that was killed before its next checkpoint: the same step, kept as
        # it is. One rank decides (the export is a collective that every rank must join or skip).
        exists = (self.run.output_dir / CHECKPOINTS_DIR / name / "config.json").exists()
        if broadcast_object(self.run.accelerator, exists):
            return
        export_final_model(
            self.run.accelerator, self.model, self.run.output_dir / CHECKPOINTS_DIR, self.corpus.tokenizer, subdir=name
        )
        self.run.log.log(
            {"milestone/words": words, "milestone/name": name},
            self.state.step,
            f"step {self.state.step}: {self.state.words_seen} words, wrote checkpoints/{name}",
        )


def _peak_flops(device) -> float:
    from ltgbert.flops import peak_flops

    return peak_flops(device)


# ----------------------------------------------------------------------------- main


def main(args: PretrainArguments) -> int:
    from accelerate.utils import set_seed

    from ltgbert.arguments import resolved_config
    from ltgbert.checkpointing import export_final_model
    from ltgbert.optimization import build_optimizer, get_lr_scheduler
    from ltgbert.training import (
        check_optimizer_supported,
        check_resume_compatible,
        fill_deepspeed_config,
        prepare_resume,
        restore,
        start_run,
        start_trackers,
        write_run_config,
    )

    # ---- setup
    run = start_run(args, "pretrain")
    accelerator = run.accelerator
    set_seed(args.seed)
    check_compile_supported(args.torch_compile, accelerator.state.deepspeed_plugin)
    check_optimizer_supported(accelerator, args.optimizer)

    # ---- data
    files = corpus_files(args, run)
    tokenizer = prepare_tokenizer(args, run, files[0])
    fingerprint = run_fingerprint(args, tokenizer, files[0])
    config = load_model_config(args, len(tokenizer))  # a bad config fails before the corpus is tokenised
    check_resume_compatible(run, fingerprint, config.to_dict())  # as does a checkpoint of another run
    corpus = prepare_corpus(args, run, tokenizer, fingerprint, *files)
    plan = Plan(args, corpus, run)

    # ---- model
    model = build_model(args, tokenizer, config)

    # ---- optimizer
    optimizer = build_optimizer(
        args.optimizer,
        model,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        weight_decay=args.weight_decay,
    )
    warmup = args.warmup_steps or int(args.warmup_ratio * plan.total_steps)
    scheduler = get_lr_scheduler(args.lr_scheduler_type, optimizer, warmup, plan.total_steps, args.min_lr_ratio)

    # ---- prepare
    fill_deepspeed_config(accelerator, plan.batch[0], run.gradient_accumulation_steps, args.max_grad_norm)
    prepare_resume(run)
    if args.torch_compile:
        # Regional compilation: each encoder layer is compiled in place (one compilation serves all layers)
        # and the model keeps its modules and state-dict keys for checkpointing and the distributed wrappers.
        model.compile_encoder_layers(backend=args.torch_compile_backend)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    run_config = resolved_config(args) | {
        "world_size": run.world_size,
        "distributed_type": str(accelerator.distributed_type),
        "mixed_precision": accelerator.mixed_precision,
        "gradient_accumulation_steps": run.gradient_accumulation_steps,
        "global_batch_size": plan.global_batch[0],
        "model_config": config.to_dict(),
        "total_steps": plan.total_steps,
        "fingerprint": corpus.fingerprint,
    }
    write_run_config(run, run_config)
    start_trackers(accelerator, "pretrain", resolved_config(args))
    state = restore(run)

    # ---- loop
    accelerator.print(
        f"world_size={run.world_size} distributed_type={accelerator.distributed_type} "
        f"steps={plan.total_steps} blocks={len(corpus.phases[0])} global_batch={plan.global_batch[0]}"
    )
    ctx = LoopContext(args, run, model, corpus, plan, config, run_config, state)
    status = train(args, run, model, optimizer, scheduler, corpus, plan, state, ctx)

    # ---- save
    if status == 0:
        export_final_model(accelerator, model, run.output_dir, tokenizer=corpus.tokenizer)
        accelerator.print(f"final model in {run.output_dir / 'final'}")
    accelerator.end_training()
    run.preemption.uninstall()
    return status


def cli(argv=None) -> int:
    from ltgbert.arguments import run_entry_point

    return run_entry_point(PretrainArguments, main, argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(cli())
