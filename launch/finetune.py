"""Fine-tunes an LTG-BERT encoder: sequence classification (binary, multi-class, multi-label, regression) and
token classification (NER, POS).

    accelerate launch launch/finetune.py                                   # demo: every demo task in turn
    accelerate launch launch/finetune.py --model_name_or_path outputs/pretrain-demo/final \\
        --task_name demo_grammaticality --output_dir outputs/finetune-grammaticality
    accelerate launch launch/finetune.py --model_name_or_path <dir or Hub id> --task_name mnli    # GLUE
    accelerate launch launch/finetune.py --model_name_or_path <dir> --train_file train.csv \\
        --validation_file dev.csv --test_file test.csv --text_column premise hypothesis --label_column label
    accelerate launch launch/finetune.py --model_name_or_path <dir> --train_file train.conll \\
        --validation_file dev.conll                                        # token classification (CoNLL)
    accelerate launch --config_file launch/accelerate/zero2.yaml launch/finetune.py ...         # ZeRO-2
    sbatch slurm/finetune.slurm --model_name_or_path runs/base/final --task_name mnli --output_dir runs/mnli

The encoder comes from --model_name_or_path: a pretraining final/ directory, an intermediate
checkpoints/step_XXXXXXXX (exported on the fly), a published LTG-BERT/HPLT directory or Hub id (loaded into our
classes: their code never runs), or any directory with an LTG-BERT config; the head is new. --random_init keeps
the architecture and tokenizer but starts from random weights: the baseline that shows what pretraining bought.

--task_name demo (the default) runs every demo task one after the other, each in <output_dir>/<task>/. Outputs
of a run: best/ (model + tokenizer of the best evaluation; the last model without a validation split),
metrics.json (best eval metrics, test metrics when the test split has labels, history, world size, a
data-sharding check), metrics.jsonl (one line per logged step), predictions_<test split>.{jsonl,tsv}, run_config.json,
logs/ (trackers), checkpoints/ (resumable state). Exit codes: 0 done, 2 bad input, 75 preempted (checkpoint saved).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import ltgbert  # noqa: E402,F401  (registers the LTG-BERT Auto classes)
from ltgbert.arguments import OptimizationArguments, OutputArguments, RuntimeArguments, redefault  # noqa: E402
from ltgbert.errors import UserError  # noqa: E402
from ltgbert.preemption import EXIT_PREEMPTED  # noqa: E402

DEFAULT_MODEL = "outputs/pretrain-demo/final"


@dataclass
class ModelArguments:
    _argument_group_name = "model"

    model_name_or_path: str = field(
        default=DEFAULT_MODEL,
        metadata={
            "help": "A pretraining final/ or checkpoints/step_XXXXXXXX directory, a published LTG-BERT/HPLT directory, "
            "a Hub id (from the Hugging Face cache when offline), or any LTG-BERT model directory."
        },
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer directory; default: the model's."})
    random_init: bool = field(
        default=False,
        metadata={"help": "Same architecture and tokenizer, random weights (the no-pretraining baseline)."},
    )
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={"help": "Re-initialise a checkpoint's classifier whose number of labels differs from the task's."},
    )


@dataclass
class TaskArguments:
    _argument_group_name = "task and data"

    task_name: str | None = field(
        default=None,
        metadata={
            "help": "GLUE task (cola sst2 mrpc qqp stsb mnli qnli rte wnli), a demo task (demo_grammaticality, "
            "demo_topic, demo_mentions, demo_regression, demo_pos, demo_entities) or 'demo' (all of them in "
            "turn; the default without --train_file)."
        },
    )
    train_file: str | None = field(
        default=None,
        metadata={
            "help": "Local training file: .csv .tsv .json .jsonl (sequence tasks; token tasks: jsonl of tokens/tags) "
            "or CoNLL (.conll .conllu .iob .txt); with a GLUE task name it replaces the Hub copy."
        },
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "Local validation file: evaluation, the best model and early stopping use it."}
    )
    test_file: str | None = field(default=None, metadata={"help": "Local test file: predicted (labels optional)."})
    text_column: list[str] | None = field(
        default=None,
        metadata={
            "help": "One text column, or two for sentence pairs; default: sentence1 sentence2 | sentence | text."
        },
    )
    label_column: str = field(
        default="label",
        metadata={"help": "Label column: int ids, strings, lists of labels (multi-label) or floats (regression)."},
    )
    tokens_column: str = field(default="tokens", metadata={"help": "Token tasks (jsonl): the words column."})
    tags_column: str = field(default="tags", metadata={"help": "Token tasks (jsonl): the tags column."})
    tag_column: int | None = field(
        default=None,
        metadata={
            "help": "Token tasks (CoNLL): the column holding the tag, 0-based (default: the last; .conllu: UPOS)."
        },
    )
    label_names: list[str] | None = field(
        default=None,
        metadata={
            "help": "Token tasks: the tag set in id order (needed when tags are integer ids, as in datasets' ner_tags)."
        },
    )
    problem_type: str | None = field(
        default=None,
        metadata={"help": "binary, multiclass, multilabel, regression or token; default: inferred from the data."},
    )
    num_labels: int | None = field(
        default=None, metadata={"help": "Classes of integer labels; default: the largest id + 1."}
    )
    dataset_name: str = field(
        default="nyu-mll/glue",
        metadata={"help": "Where GLUE tasks come from: a Hub dataset or a local copy in datasets' format."},
    )
    dataset_cache_dir: str | None = field(default=None, metadata={"help": "datasets cache for Hub downloads."})
    demo_dir: str | None = field(
        default=None, metadata={"help": "Demo data directory (default $LTGBERT_DEMO_DIR or ~/.cache/ltgbert/demo)."}
    )
    max_seq_length: int = field(default=128, metadata={"help": "Truncate (pairs: longest first) to this length."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N validation rows."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Use only the first N test rows."})


@dataclass
class SelectionArguments:
    _argument_group_name = "evaluation, model selection and batching"

    metric_for_best_model: str | None = field(
        default=None,
        metadata={
            "help": "Metric that picks best/ (accuracy, f1, matthews_correlation, pearson, loss, ...); default: the "
            "task's official one, else accuracy / f1_micro / pearson / f1 by problem type."
        },
    )
    early_stopping_patience: int | None = field(
        default=None, metadata={"help": "Stop after N evaluations without improvement."}
    )
    predictions_format: str = field(
        default="jsonl",
        metadata={
            "help": "jsonl ({index, prediction}), tsv (GLUE: index<TAB>prediction) or conll (token tasks).",
            "choices": ["jsonl", "tsv", "conll"],
        },
    )
    layerwise_lr_decay: float = field(
        default=1.0,
        metadata={"help": "Layer i of L gets lr * decay^(L - i), the embeddings decay^L, the head lr (1.0: off)."},
    )
    group_by_length: bool = field(
        default=True, metadata={"help": "Batch rows of similar length together (less padding); seeded per epoch."}
    )
    mega_batch_mult: int = field(
        default=50, metadata={"help": "Length grouping sorts within random groups of this many global batches."}
    )


@dataclass
class FinetuneArguments(
    RuntimeArguments, OptimizationArguments, OutputArguments, SelectionArguments, TaskArguments, ModelArguments
):
    """Every option of launch/finetune.py; a --config YAML/JSON file takes the same keys."""

    output_dir: str = redefault(OutputArguments, "output_dir", "outputs/finetune-demo")
    eval_steps: int = redefault(
        OutputArguments, "eval_steps", 0, "Evaluate every N optimizer steps (0: at the end of every epoch)."
    )
    logging_steps: int = redefault(OutputArguments, "logging_steps", 50)
    save_steps: int = redefault(OutputArguments, "save_steps", 500)
    optimizer: str = redefault(OptimizationArguments, "optimizer", "adamw")
    # The demo-size model wants 1e-3 (README's table: ~0.80 on demo grammaticality against ~0.66 at 1e-4);
    # base-size models want 2e-5 to 5e-5.
    learning_rate: float = redefault(OptimizationArguments, "learning_rate", 1e-3)
    adam_beta2: float = redefault(OptimizationArguments, "adam_beta2", 0.999)
    adam_epsilon: float = redefault(OptimizationArguments, "adam_epsilon", 1e-8)
    weight_decay: float = redefault(OptimizationArguments, "weight_decay", 0.01)
    max_grad_norm: float = redefault(OptimizationArguments, "max_grad_norm", 1.0)
    lr_scheduler_type: str = redefault(OptimizationArguments, "lr_scheduler_type", "linear")
    warmup_ratio: float = redefault(OptimizationArguments, "warmup_ratio", 0.1)
    min_lr_ratio: float = redefault(OptimizationArguments, "min_lr_ratio", 0.0)
    num_train_epochs: float = redefault(OptimizationArguments, "num_train_epochs", 3.0)
    per_device_eval_batch_size: int = redefault(OptimizationArguments, "per_device_eval_batch_size", 128)

    def __post_init__(self):
        from ltgbert.metrics import METRIC_NAMES
        from ltgbert.tasks import normalize_problem_type

        super().__post_init__()
        self.task_name = self.task_name or None
        if self.task_name is None and self.train_file is None:
            self.task_name = "demo"
        self.problem_type = normalize_problem_type(self.problem_type) if self.problem_type else None
        if self.metric_for_best_model:
            self.metric_for_best_model = self.metric_for_best_model.removeprefix("eval_")
            known = {"loss", *(m for names in METRIC_NAMES.values() for m in names)}
            if self.metric_for_best_model not in known:
                raise ValueError(
                    f"unknown metric_for_best_model {self.metric_for_best_model!r}; use one of "
                    f"{', '.join(sorted(known))}"
                )
        if self.text_column is not None and not 1 <= len(self.text_column) <= 2:
            raise ValueError("--text_column takes one or two column names")
        if not 0.0 < self.layerwise_lr_decay <= 1.0:
            raise ValueError(f"--layerwise_lr_decay must be in (0, 1], got {self.layerwise_lr_decay}")
        for name in (
            "max_seq_length",
            "mega_batch_mult",
            "early_stopping_patience",
            "num_labels",
            "max_train_samples",
            "max_eval_samples",
            "max_predict_samples",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be at least 1, got {value}")


# ----------------------------------------------------------------------------- the model source


def resolve_model_dir(args: FinetuneArguments, run) -> str:
    """A model directory (or Hub id) for --model_name_or_path; a training checkpoint is exported first."""
    path = Path(args.model_name_or_path)
    if not path.exists():
        if args.model_name_or_path == DEFAULT_MODEL:
            raise UserError(
                f"no pretrained model at {DEFAULT_MODEL}; make it with `accelerate launch "
                "launch/pretrain.py` or pass --model_name_or_path"
            )
        if (
            path.is_absolute()
            or args.model_name_or_path.startswith((".", "~"))
            or args.model_name_or_path.count("/") > 1
        ):
            raise UserError(f"--model_name_or_path {path} does not exist; point it at a model directory")
        return args.model_name_or_path  # a Hub id: ltgbert.loading resolves it (offline: from the cache)
    if (path / "config.json").is_file():
        return str(path)
    if (path / "final" / "config.json").is_file():  # a pretraining output_dir
        return str(path / "final")
    if (path / "trainer_state.json").is_file():  # checkpoints/step_XXXXXXXX: accelerate state, not a model dir
        from ltgbert.checkpointing import export_checkpoint

        export_dir = run.output_dir / "pretrained_export" / path.name
        if run.accelerator.is_main_process and not (export_dir / "config.json").is_file():
            export_checkpoint(path, export_dir, args.tokenizer_name)
        run.accelerator.wait_for_everyone()
        return str(export_dir)
    raise UserError(
        f"{path} holds neither config.json (a model directory) nor trainer_state.json (a pretraining checkpoint)"
    )


# ----------------------------------------------------------------------------- the task


@dataclass
class TaskBundle:
    """One task as the loop sees it: encoded splits, labels, batching, metrics, the head, predictions."""

    name: str
    kind: str  # "sequence" or "token"
    label_info: Any
    raw: Any  # tasks.TaskData or token_tasks.TokenTaskData
    encoded: dict[str, Any]
    collator: Any
    metric: str

    @property
    def problem_type(self) -> str:
        return self.label_info.problem_type

    def head_class(self):
        return (
            ltgbert.LtgBertForTokenClassification if self.kind == "token" else ltgbert.LtgBertForSequenceClassification
        )

    def metrics(self, logits: list[np.ndarray], labels: list[np.ndarray]) -> dict[str, float]:
        """Metrics and loss over evaluation rows (row lists, in row order)."""
        from ltgbert.metrics import compute_metrics

        if self.kind == "token":
            metrics = compute_metrics("token", logits, labels, self.label_info.id2label)
            flat_logits = torch.from_numpy(np.concatenate([lg[: len(lb)] for lg, lb in zip(logits, labels)]))
            flat_labels = torch.from_numpy(np.concatenate(labels))
            metrics["loss"] = F.cross_entropy(flat_logits.float(), flat_labels, ignore_index=-100).item()
            return metrics
        logits_t, labels_t = torch.from_numpy(np.stack(logits)), torch.from_numpy(np.stack(labels))
        metrics = compute_metrics(self.problem_type, logits_t.numpy(), labels_t.numpy())
        if self.problem_type == "regression":
            metrics["loss"] = F.mse_loss(logits_t.view(-1).float(), labels_t.view(-1).float()).item()
        elif self.problem_type == "multilabel":
            metrics["loss"] = F.binary_cross_entropy_with_logits(logits_t.float(), labels_t.float()).item()
        else:
            metrics["loss"] = F.cross_entropy(logits_t.float(), labels_t).item()
        return metrics

    def write_predictions(self, output_dir: Path, split: str, logits: list[np.ndarray], fmt: str) -> Path:
        from ltgbert.metrics import logits_to_predictions

        path = output_dir / f"predictions_{split}.{'tsv' if fmt == 'tsv' else 'conll' if fmt == 'conll' else 'jsonl'}"
        if self.kind == "token":
            from ltgbert.token_tasks import decode_token_predictions, write_token_predictions

            tags = decode_token_predictions(logits, self.encoded[split], self.label_info)
            return write_token_predictions(
                path, self.raw.splits[split].tokens, tags, "conll" if fmt == "conll" else "jsonl"
            )
        from ltgbert.tasks import write_predictions

        preds = logits_to_predictions(self.problem_type, np.stack(logits))
        return write_predictions(path, [self.label_info.decode(p) for p in preds], "tsv" if fmt == "tsv" else "jsonl")


def load_task_bundle(args: FinetuneArguments, tokenizer, pad_to_multiple_of: int | None) -> TaskBundle:
    from ltgbert.metrics import METRIC_NAMES, default_metric
    from ltgbert.tasks import split_role
    from ltgbert.token_tasks import is_token_task

    limits = {"train": args.max_train_samples, "validation": args.max_eval_samples, "test": args.max_predict_samples}
    if is_token_task(args.task_name, args.train_file, args.problem_type, args.tokens_column, args.tags_column):
        from ltgbert.token_tasks import (
            TokenPaddingCollator,
            build_token_label_info,
            encode_token_split,
            load_token_task,
        )

        raw = load_token_task(
            args.task_name,
            args.train_file,
            args.validation_file,
            args.test_file,
            args.tokens_column,
            args.tags_column,
            args.tag_column,
            args.label_names,
            demo_dir=args.demo_dir,
        )
        raw.splits = {n: s.head(limits[split_role(n)]) for n, s in raw.splits.items()}
        label_info = build_token_label_info(raw, args.label_names)
        encoded = {n: encode_token_split(s, label_info, tokenizer, args.max_seq_length) for n, s in raw.splits.items()}
        collator = TokenPaddingCollator(tokenizer.pad_token_id, pad_to_multiple_of)
        kind = "token"
    else:
        from ltgbert.tasks import DynamicPaddingCollator, build_label_info, encode_split, load_task

        raw = load_task(
            args.task_name,
            args.train_file,
            args.validation_file,
            args.test_file,
            args.text_column,
            args.label_column,
            args.dataset_name,
            args.dataset_cache_dir,
            args.demo_dir,
        )
        raw.splits = {n: s.head(limits[split_role(n)]) for n, s in raw.splits.items()}
        label_info = build_label_info(raw, args.problem_type, args.num_labels)
        encoded = {n: encode_split(s, label_info, tokenizer, args.max_seq_length) for n, s in raw.splits.items()}
        collator = DynamicPaddingCollator(tokenizer.pad_token_id, label_info.problem_type, pad_to_multiple_of)
        kind = "sequence"
    for name, split in encoded.items():
        if split_role(name) == "validation" and split.labels is None:
            raise UserError(f"the {name} split ({raw.splits[name].source}) has no labels")
    metric = args.metric_for_best_model or raw.metric or default_metric(label_info.problem_type)
    if metric != "loss" and metric not in METRIC_NAMES[label_info.problem_type]:
        raise UserError(
            f"metric {metric!r} does not apply to a {label_info.problem_type} task; use one of "
            f"{', '.join(METRIC_NAMES[label_info.problem_type])} or loss"
        )
    return TaskBundle(raw.name, kind, label_info, raw, encoded, collator, metric)


def check_model_and_tokenizer(config, tokenizer, args: FinetuneArguments, task: TaskBundle, source: str) -> None:
    """The one-line errors for a tokenizer, length or classifier that does not fit the model."""
    from ltgbert.loading import check_tokenizer_fits

    check_tokenizer_fits(tokenizer, config.vocab_size)
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos is not None and args.max_seq_length > max_pos:
        raise UserError(f"--max_seq_length {args.max_seq_length} exceeds the model's max_position_embeddings {max_pos}")
    heads = [
        a for a in (config.architectures or []) if a.endswith(("ForSequenceClassification", "ForTokenClassification"))
    ]
    num_labels = task.label_info.num_labels
    if heads and not args.random_init and not args.ignore_mismatched_sizes and config.num_labels != num_labels:
        raise UserError(
            f"{source} has a classifier with {config.num_labels} labels but the task has {num_labels}; "
            "pass --ignore_mismatched_sizes to re-initialise the classifier"
        )


# ----------------------------------------------------------------------------- evaluation


def gather_rows(run, values: torch.Tensor, real: torch.Tensor, pad_index=0) -> list[np.ndarray]:
    """The rows of ``values`` from every rank, padding rows dropped (``gather_for_metrics`` semantics)."""
    accelerator = run.accelerator
    if values.dim() > 1:
        values = accelerator.pad_across_processes(values.contiguous(), dim=1, pad_index=pad_index)
    values, real = accelerator.gather(values), accelerator.gather(real)
    return [row for row, keep in zip(values.cpu().numpy(), real.cpu().tolist()) if keep]


@torch.no_grad()
def forward_rows(run, model, task: TaskBundle, split: str, batch_size: int):
    """(logits, labels, row ids) of every row of ``split``, each row once whatever the world size; every rank
    runs the same number of forward passes (a ZeRO-3 forward is a collective)."""
    from ltgbert.batching import LoaderDataset, eval_batches

    accelerator = run.accelerator
    dataset = task.encoded[split]

    def collate(examples):
        batch = task.collator(examples)
        batch["real"] = torch.tensor([ex["real"] for ex in examples])
        return batch

    batches = eval_batches(len(dataset), batch_size, accelerator.process_index, accelerator.num_processes)
    loader = torch.utils.data.DataLoader(LoaderDataset(dataset), batch_sampler=batches, collate_fn=collate)
    logits, labels, rows = [], [], []
    for batch in loader:
        real, idx = batch.pop("real").to(accelerator.device), batch.pop("idx").to(accelerator.device)
        target = batch.pop("labels", None)
        with accelerator.autocast():
            out = model(**{k: v.to(accelerator.device) for k, v in batch.items()}).logits.float()
        logits += gather_rows(run, out, real)
        rows += [int(r) for r in gather_rows(run, idx, real)]
        if target is not None:
            got = gather_rows(run, target.to(accelerator.device), real, pad_index=-100)
            labels += got
    order = np.argsort(rows, kind="stable")
    return [logits[i] for i in order], [labels[i] for i in order] if labels else None, [rows[i] for i in order]


def evaluate(run, model, task: TaskBundle, split: str, batch_size: int) -> dict[str, float]:
    was_training = model.training
    model.eval()
    logits, labels, _ = forward_rows(run, model, task, split, batch_size)
    model.train(was_training)
    if task.kind == "token":  # per row: the labels up to the row's own length
        lengths = task.encoded[split].lengths
        labels = [lb[: lengths[i]] for i, lb in enumerate(labels)]
        logits = [lg[: lengths[i]] for i, lg in enumerate(logits)]
    return task.metrics(logits, labels)


def predict(run, task: TaskBundle, model_dir: Path, split: str, batch_size: int) -> list[np.ndarray]:
    """Logits of the saved best model on every row of ``split``: a fresh plain model on each rank (no DeepSpeed
    engine), so it works the same under every ZeRO stage."""
    from ltgbert.loading import load_model

    model = load_model(task.head_class(), model_dir).to(run.accelerator.device).eval()
    logits, _, _ = forward_rows(run, model, task, split, batch_size)
    if task.kind == "token":
        lengths = task.encoded[split].lengths
        logits = [lg[: lengths[i]] for i, lg in enumerate(logits)]
    return logits


# ----------------------------------------------------------------------------- one task


def build_model(args: FinetuneArguments, task: TaskBundle, model_dir: str, config):
    from ltgbert.checkpointing import enable_activation_checkpointing
    from ltgbert.loading import load_model

    config.id2label, config.label2id = task.label_info.id2label, task.label_info.label2id
    if task.kind == "sequence":
        config.problem_type = task.label_info.hf_problem_type
    if args.random_init:
        model = task.head_class()(config)
    else:
        model = load_model(
            task.head_class(), model_dir, config=config, ignore_mismatched_sizes=args.ignore_mismatched_sizes
        )
    if args.gradient_checkpointing:
        enable_activation_checkpointing(model)
    return model


def evaluate_and_select(args, run, model, task: TaskBundle, state, epoch: int, tokenizer) -> bool:
    """Evaluates every validation split; saves best/ on an improvement; returns whether to stop early."""
    from ltgbert.checkpointing import export_final_model
    from ltgbert.metrics import is_better
    from ltgbert.tasks import split_role

    entry = {"step": state.step, "epoch": epoch}
    for split in sorted(n for n in task.encoded if split_role(n) == "validation"):
        metrics = evaluate(run, model, task, split, args.per_device_eval_batch_size)
        prefix = "eval" if split == "validation" else f"eval_{split.removeprefix('validation_')}"
        run.log.log(
            {f"{prefix}/{k}": v for k, v in metrics.items()},
            state.step,
            f"{prefix} step {state.step}: " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()),
        )
        entry.update(metrics if split == "validation" else {f"{split}/{k}": v for k, v in metrics.items()})
    state.history.append(entry)
    if is_better(task.metric, entry[task.metric], state.best_metric):
        state.best_metric, state.best_step, state.evals_without_improvement = entry[task.metric], state.step, 0
        export_final_model(run.accelerator, model, run.output_dir, tokenizer, subdir="best")
        return False
    state.evals_without_improvement += 1
    patience = args.early_stopping_patience
    if patience is not None and state.evals_without_improvement >= patience:
        run.accelerator.print(f"early stopping: no {task.metric} improvement in {patience} evaluations")
        return True
    return False


def train(args, run, model, optimizer, scheduler, task: TaskBundle, stream, state, total_steps, ctx) -> str:
    """The loop; returns "done" or "preempted"."""
    from ltgbert.training import MetricWindow, train_step

    has_validation = "validation" in task.encoded
    window = MetricWindow(run.accelerator.device)
    model.train()
    stop = state.step >= total_steps
    while not stop:
        micro = stream.next_step()
        result = train_step(run, args, model, optimizer, scheduler, micro, state, ctx.forward, ctx.stats, window)
        epoch_done = state.samples_in_epoch >= stream.steps_per_epoch * stream.global_batch_size
        stop = state.step >= total_steps
        if state.step % args.logging_steps == 0 or stop:
            totals = window.reduce(run.accelerator)
            loss = totals.get("loss_sum", 0.0) / max(totals.get("rows", 0.0), 1.0)
            lr = scheduler.get_last_lr()[-1]  # the head's group: the peak schedule
            metrics = {
                "train/loss": loss,
                "train/learning_rate": lr,
                "train/skipped_steps": state.skipped_steps,
                "train/epoch": state.epoch + (1 if epoch_done else 0),
                "train/samples_seen": state.samples_seen,
            }
            if result.grad_norm is not None:
                metrics["train/grad_norm"] = result.grad_norm
            run.log.log(
                metrics, state.step, f"step {state.step}/{total_steps} epoch {state.epoch} loss {loss:.4f} lr {lr:.3g}"
            )
            window.reset()
        if has_validation and (
            (args.eval_steps and state.step % args.eval_steps == 0) or (not args.eval_steps and (epoch_done or stop))
        ):
            epoch = state.epoch + (1 if epoch_done else 0)
            stop = evaluate_and_select(args, run, model, task, state, epoch, ctx.tokenizer) or stop
        if result.stop_requested or (args.save_steps and state.step % args.save_steps == 0 and not stop):
            ctx.checkpoint()
        if result.stop_requested:
            run.accelerator.print(
                f"preempted ({run.preemption.signal_name}): checkpoint at step {state.step} saved, exiting"
            )
            return "preempted"
    return "done"


class TaskContext:
    """The model call, the logged sums and the checkpoint writer of one task's loop."""

    def __init__(self, run, state, run_config, fingerprint, global_batch, args, tokenizer, num_rows: int):
        self.run, self.state, self.run_config, self.fingerprint = run, state, run_config, fingerprint
        self.global_batch, self.args, self.tokenizer = global_batch, args, tokenizer
        self.seen = torch.zeros(num_rows, device=run.accelerator.device)  # rows this rank trains on in epoch 0

    def forward(self, model, batch):
        idx = batch.pop("idx")
        batch.pop("real", None)
        if self.state.epoch == 0:
            self.seen.index_add_(0, idx, torch.ones_like(idx, dtype=self.seen.dtype))
        out = model(**batch)
        return out.loss, out

    @staticmethod
    def stats(batch, loss, out):
        rows = batch["input_ids"].shape[0]
        return {"loss_sum": loss.double().nan_to_num() * rows, "rows": rows}

    def checkpoint(self):
        from ltgbert.training import save_training_state

        save_training_state(
            self.run, self.state, self.run_config, self.fingerprint, self.global_batch, self.args.save_total_limit
        )


def finetune_task(args: FinetuneArguments, run) -> dict[str, Any]:
    """Fine-tunes on one task with the run's accelerator; returns what metrics.json holds."""
    from accelerate.utils import set_seed

    from ltgbert.arguments import resolved_config
    from ltgbert.batching import StepBatches, length_grouped_order
    from ltgbert.checkpointing import export_final_model
    from ltgbert.loading import load_config, load_tokenizer
    from ltgbert.optimization import build_optimizer, get_lr_scheduler, layerwise_param_groups
    from ltgbert.training import (
        TrainState,
        check_optimizer_supported,
        check_resume_compatible,
        fill_deepspeed_config,
        fingerprint_tokenizer,
        prepare_resume,
        restore,
        start_trackers,
        write_run_config,
    )

    accelerator = run.accelerator
    check_optimizer_supported(accelerator, args.optimizer)
    set_seed(args.seed)  # per task: initialisation and dropout do not depend on the tasks before it
    # ---- data
    model_dir = resolve_model_dir(args, run)
    config, tokenizer = load_config(model_dir), load_tokenizer(args.tokenizer_name or model_dir)
    with accelerator.main_process_first():  # a Hub download or the demo generation happens once
        task = load_task_bundle(args, tokenizer, 8 if accelerator.mixed_precision != "no" else None)
    check_model_and_tokenizer(config, tokenizer, args, task, model_dir)
    train_rows = task.encoded["train"]
    order = None
    if args.group_by_length:

        def order(n, seed, epoch, global_batch):
            return length_grouped_order(train_rows.lengths, seed, epoch, global_batch, args.mega_batch_mult)

    stream = StepBatches(
        run,
        train_rows,
        args.per_device_train_batch_size,
        task.collator,
        TrainState(),
        args.seed,
        args.dataloader_num_workers,
        order,
        record_rows=args.debug_record_rows,
    )
    total_steps = args.max_steps if args.max_steps > 0 else max(1, int(stream.steps_per_epoch * args.num_train_epochs))
    fingerprint = {"task": _task_fingerprint(task), "tokenizer": fingerprint_tokenizer(tokenizer)}
    check_resume_compatible(run, fingerprint)

    # ---- model
    model = build_model(args, task, model_dir, config)

    # ---- optimizer
    groups = layerwise_param_groups(model, args.weight_decay, args.learning_rate, args.layerwise_lr_decay)
    optimizer = build_optimizer(
        args.optimizer,
        groups,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        weight_decay=args.weight_decay,
    )
    warmup = args.warmup_steps or int(np.ceil(args.warmup_ratio * total_steps))
    scheduler = get_lr_scheduler(args.lr_scheduler_type, optimizer, warmup, total_steps, args.min_lr_ratio)

    # ---- prepare
    fill_deepspeed_config(
        accelerator, args.per_device_train_batch_size, run.gradient_accumulation_steps, args.max_grad_norm
    )
    prepare_resume(run)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    run_config = resolved_config(args) | {
        "world_size": run.world_size,
        "global_batch_size": stream.global_batch_size,
        "distributed_type": str(accelerator.distributed_type),
    }
    write_run_config(run, run_config)
    start_trackers(accelerator, "finetune", resolved_config(args), run.output_dir / "logs")
    state = stream.state = restore(run)
    accelerator.print(
        f"task {task.name}: {task.problem_type}, {task.label_info.num_labels} label(s), "
        f"{len(train_rows)} train rows, {total_steps} steps, world size {run.world_size}"
    )

    # ---- loop
    ctx = TaskContext(run, state, run_config, fingerprint, stream.global_batch_size, args, tokenizer, len(train_rows))
    status = train(args, run, model, optimizer, scheduler, task, stream, state, total_steps, ctx)
    if status == "preempted":
        return {"status": "preempted", "step": state.step}

    # ---- save
    if "validation" not in task.encoded or state.best_step is None:
        export_final_model(accelerator, model, run.output_dir, tokenizer, subdir="best")  # no selection: the last
    return write_results(args, run, task, state, ctx.seen)


def _task_fingerprint(task: TaskBundle) -> str:
    import hashlib

    h = hashlib.sha256(task.name.encode())
    for name in sorted(task.encoded):
        h.update(f"{name}:{len(task.encoded[name])}:{int(task.encoded[name].lengths.sum())}".encode())
    return h.hexdigest()[:16]


def write_results(args, run, task: TaskBundle, state, seen: torch.Tensor) -> dict[str, Any]:
    """Predictions of best/ on the test splits, and metrics.json."""
    from ltgbert.io import write_json
    from ltgbert.tasks import split_role

    seen_all = run.accelerator.gather(seen.view(1, -1)).cpu()  # [ranks, rows]
    best = next((h for h in state.history if h["step"] == state.best_step), {})
    result: dict[str, Any] = {
        "status": "done",
        "task": task.name,
        "problem_type": task.problem_type,
        "num_labels": task.label_info.num_labels,
        "labels": list(task.label_info.names),
        "model_name_or_path": args.model_name_or_path,
        "random_init": args.random_init,
        "world_size": run.world_size,
        "distributed_type": str(run.accelerator.distributed_type),
        "steps": state.step,
        "train_rows": len(task.encoded["train"]),
        "skipped_steps": state.skipped_steps,
        "metric_for_best_model": task.metric,
        "official_metrics": list(getattr(task.raw, "metrics", ()) or ()),
        "best_metric": state.best_metric,
        "best_step": state.best_step,
        "eval": {k: v for k, v in best.items() if "/" not in k},
        "eval_splits": {
            s: {k.split("/", 1)[1]: v for k, v in best.items() if k.startswith(f"{s}/")}
            for s in task.encoded
            if split_role(s) == "validation" and s != "validation"
        },
        "history": state.history,
        "data_check": {
            "rows_per_rank_first_epoch": (seen_all > 0).sum(dim=1).tolist(),
            "rows_on_several_ranks": int(((seen_all > 0).sum(dim=0) > 1).sum()),
        },
    }
    if task.kind == "token":  # words without a prediction of their own (truncated away) get the fill tag
        result["tag_scheme"], result["fill_tag"] = task.label_info.scheme, task.label_info.fill_tag
        result["unaligned_words"] = {n: int(s.unaligned_words) for n, s in task.encoded.items()}
    for split in sorted(n for n in task.encoded if split_role(n) == "test"):
        logits = predict(run, task, run.output_dir / "best", split, args.per_device_eval_batch_size)
        if task.encoded[split].labels is not None:
            labels = [np.asarray(task.encoded[split].labels[i]) for i in range(len(logits))]
            result[split] = {k: v for k, v in task.metrics(logits, labels).items()}
        if run.accelerator.is_main_process:
            task.write_predictions(run.output_dir, split, logits, args.predictions_format)
    if run.accelerator.is_main_process:
        write_json(run.output_dir / "metrics.json", result)
    run.accelerator.wait_for_everyone()
    return result


# ----------------------------------------------------------------------------- main


def demo_task_names() -> list[str]:
    from ltgbert.tasks import DEMO_TASKS
    from ltgbert.token_tasks import DEMO_TOKEN_TASKS

    return [*DEMO_TASKS, *DEMO_TOKEN_TASKS]


def main(args: FinetuneArguments) -> dict[str, Any]:
    """Fine-tunes on one task, or on every demo task in turn (``--task_name demo``), with ONE accelerator: the
    process group lives until the last task is done."""
    from ltgbert.training import attach_output, start_run

    if args.task_name != "demo":
        done = _finished(args)
        if done is not None:
            return done
        run = start_run(args, "finetune")
        try:
            return finetune_task(args, run)
        finally:
            run.accelerator.end_training()
            run.preemption.uninstall()
    results, run = {}, None
    try:
        for name in demo_task_names():
            sub = dataclasses.replace(args, task_name=f"demo_{name}", output_dir=str(Path(args.output_dir) / name))
            done = _finished(sub)
            if done is not None:
                results[name] = done
                continue
            run = start_run(sub, "finetune") if run is None else attach_output(run, sub)
            results[name] = finetune_task(sub, run)
            run.accelerator.free_memory()
            if results[name].get("status") == "preempted":
                return {"status": "preempted", "tasks": results}
    finally:
        if run is not None:
            run.accelerator.end_training()
            run.preemption.uninstall()
    return {"status": "done", "tasks": results}


def _finished(args: FinetuneArguments) -> dict[str, Any] | None:
    """metrics.json of a finished run in --output_dir (a requeued job whose work is done), else None."""
    import json

    path = Path(args.output_dir) / "metrics.json"
    if not path.is_file() or args.overwrite_output_dir:
        return None
    if args.resume_from_checkpoint:
        return json.loads(path.read_text())
    raise UserError(
        f"{args.output_dir} holds a finished run (metrics.json); pass --overwrite_output_dir or another --output_dir"
    )


def cli(argv: list[str] | None = None) -> int:
    from ltgbert.arguments import run_entry_point

    def run(args):
        return EXIT_PREEMPTED if main(args).get("status") == "preempted" else 0

    return run_entry_point(FinetuneArguments, run, argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(cli())
