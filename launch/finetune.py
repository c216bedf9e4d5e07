"""Fine-tunes an LTG-BERT encoder for sequence classification: binary, multi-class, multi-label, regression.

    accelerate launch launch/finetune.py                                   # demo: all four demo tasks
    accelerate launch launch/finetune.py --model_name_or_path outputs/pretrain-demo/final \\
        --task_name demo_grammaticality --output_dir outputs/finetune-grammaticality
    accelerate launch launch/finetune.py --model_name_or_path <dir> --task_name rte          # GLUE (Hub)
    accelerate launch launch/finetune.py --model_name_or_path <dir> --train_file train.csv \\
        --validation_file dev.csv --test_file test.csv --text_column premise hypothesis --label_column label
    accelerate launch --use_deepspeed --zero_stage 2 --num_processes 2 launch/finetune.py ...   # ZeRO-2

The model is ``LtgBertForSequenceClassification`` (through the Auto classes, so any checkpoint whose config
``ltgbert`` registers): the encoder comes from ``--model_name_or_path`` (a ``final/`` directory, an
intermediate ``checkpoints/step_XXXXXXXX`` of launch/pretrain.py, exported on the fly, or a directory in the
published LTG-BERT layout), the head is new. ``--random_init`` keeps the architecture and tokenizer but
starts from random weights: the baseline that shows what pretraining bought.

``--task_name demo`` (the default) runs the four demo tasks one after the other, each in
``<output_dir>/<task>/``. Outputs of a run: ``best/`` (Hugging Face model + tokenizer of the best
evaluation; the last model when there is no validation split), ``metrics.json`` (best eval metrics, test
metrics when the test split has labels, history, world size and a data-sharding check),
``predictions_test.{jsonl,tsv}`` (labels as in the data), ``run_config.json``, ``logs/`` (TensorBoard),
``checkpoints/`` (resumable state). Exit codes: 0 done, 2 bad input, 75 preempted (checkpoint saved).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import gather_object, set_seed
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import ltgbert  # noqa: E402,F401  (registers the LTG-BERT Auto classes)
from ltgbert.arguments import resolved_config, run_entry_point, save_resolved_config  # noqa: E402
from ltgbert.checkpointing import (  # noqa: E402
    enable_activation_checkpointing,
    export_final_model,
    find_latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from ltgbert.distributed import all_ranks_any, make_accelerator  # noqa: E402
from ltgbert.errors import UserError  # noqa: E402
from ltgbert.metrics import METRIC_NAMES, compute_metrics, default_metric, is_better, logits_to_predictions  # noqa: E402
from ltgbert.optimization import OPTIMIZERS, SCHEDULERS, Lamb, adamw, get_lr_scheduler, param_groups  # noqa: E402
from ltgbert.preemption import EXIT_PREEMPTED, PreemptionHandler  # noqa: E402
from ltgbert.tasks import (  # noqa: E402
    DEMO_TASKS,
    DynamicPaddingCollator,
    LabelInfo,
    LengthGroupedBatchSampler,
    build_label_info,
    encode_split,
    load_task,
    normalize_problem_type,
    write_predictions,
)

DEFAULT_MODEL = "outputs/pretrain-demo/final"


@dataclass
class FinetuneArguments:
    # model
    model_name_or_path: str = field(default=DEFAULT_MODEL, metadata={"help": "HF model dir (pretrain final/), a pretraining checkpoints/step_XXXXXXXX dir, or a published LTG-BERT dir"})
    tokenizer_name: str | None = field(default=None, metadata={"help": "tokenizer dir; default: the model's (or the pretraining run's tokenizer/)"})
    random_init: bool = field(default=False, metadata={"help": "same architecture and tokenizer, random weights (no-pretraining baseline)"})
    ignore_mismatched_sizes: bool = field(default=False, metadata={"help": "re-initialise a checkpoint classifier whose number of labels differs from the task's"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in the backward pass (less memory, ~30% slower)"})
    # task
    task_name: str | None = field(default=None, metadata={"help": "GLUE task (cola sst2 mrpc qqp stsb mnli qnli rte wnli), demo_<grammaticality|topic|mentions|regression>, or 'demo' (all four in turn; the default without --train_file)"})
    train_file: str | None = field(default=None, metadata={"help": "local training file (.csv .tsv .json .jsonl); with a GLUE task name, replaces the Hub copy"})
    validation_file: str | None = field(default=None, metadata={"help": "local validation file; evaluation, best model and early stopping use it"})
    test_file: str | None = field(default=None, metadata={"help": "local test file; predictions are written for it (labels optional)"})
    text_column: list[str] | None = field(default=None, metadata={"help": "one text column, or two for sentence pairs; default: sentence1 sentence2 | sentence | text"})
    label_column: str = field(default="label", metadata={"help": "label column: int ids, strings, lists of labels (multi-label) or floats (regression)"})
    problem_type: str | None = field(default=None, metadata={"help": "binary | multiclass | multilabel | regression; default: inferred from the labels"})
    num_labels: int | None = field(default=None, metadata={"help": "number of classes for integer labels; default: largest id + 1"})
    dataset_name: str = field(default="nyu-mll/glue", metadata={"help": "Hub dataset of the GLUE tasks"})
    dataset_cache_dir: str | None = field(default=None, metadata={"help": "datasets cache directory for Hub downloads"})
    demo_dir: str | None = field(default=None, metadata={"help": "demo data directory (default $LTGBERT_DEMO_DIR or ~/.cache/ltgbert/demo)"})
    max_seq_length: int = field(default=128, metadata={"help": "truncate (pairs: longest first) to this many tokens"})
    max_train_samples: int | None = field(default=None, metadata={"help": "use only the first N training rows"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "use only the first N validation rows"})
    max_predict_samples: int | None = field(default=None, metadata={"help": "use only the first N test rows"})
    # optimisation
    output_dir: str = field(default="outputs/finetune-demo", metadata={"help": "where best/, metrics.json, predictions, logs/ and checkpoints/ go"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "allow starting over in an output_dir that holds a finished run"})
    num_train_epochs: int = field(default=3, metadata={"help": "passes over the training data"})
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps; > 0 overrides num_train_epochs"})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "rows per micro-batch per process"})
    per_device_eval_batch_size: int = field(default=128, metadata={"help": "rows per evaluation batch per process"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    learning_rate: float = field(default=1e-4, metadata={"help": "peak learning rate (head and top layer); 2e-5..5e-5 suits base-size models"})
    weight_decay: float = field(default=0.01, metadata={"help": "decoupled weight decay on matrices (not embeddings, biases, norms)"})
    optimizer: str = field(default="adamw", metadata={"help": "adamw | lamb", "choices": list(OPTIMIZERS)})
    adam_beta1: float = field(default=0.9, metadata={"help": "first-moment decay"})
    adam_beta2: float = field(default=0.999, metadata={"help": "second-moment decay"})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "denominator epsilon"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the global gradient norm (0: off; DeepSpeed clips by its config)"})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "linear | cosine | constant (after warmup)", "choices": list(SCHEDULERS)})
    warmup_ratio: float = field(default=0.1, metadata={"help": "warmup as a fraction of all steps"})
    warmup_steps: int = field(default=0, metadata={"help": "warmup steps; > 0 overrides warmup_ratio"})
    min_lr_ratio: float = field(default=0.0, metadata={"help": "final learning rate as a fraction of the peak"})
    layerwise_lr_decay: float = field(default=1.0, metadata={"help": "layer i of L gets lr * decay^(L - i), embeddings decay^L, head lr (1.0: off)"})
    group_by_length: bool = field(default=True, metadata={"help": "batch rows of similar length (less padding); seeded per epoch"})
    mega_batch_mult: int = field(default=50, metadata={"help": "length grouping sorts within random groups of mega_batch_mult * batch rows"})
    mixed_precision: str | None = field(default=None, metadata={"help": "no | fp16 | bf16; default: the accelerate config's"})
    seed: int = field(default=42, metadata={"help": "seed of initialisation, dropout and batch order"})
    # evaluation, logging, saving
    eval_steps: int | None = field(default=None, metadata={"help": "evaluate every N optimizer steps (default: at the end of each epoch)"})
    metric_for_best_model: str | None = field(default=None, metadata={"help": "metric that picks best/ (e.g. accuracy, f1, matthews_correlation, pearson, loss); default: task's official / accuracy / f1_micro / pearson"})
    early_stopping_patience: int | None = field(default=None, metadata={"help": "stop after N evaluations without improvement"})
    logging_steps: int = field(default=50, metadata={"help": "log train loss and lr every N steps (the only per-step host sync)"})
    save_steps: int = field(default=500, metadata={"help": "write a resumable checkpoint every N steps (0: only on preemption)"})
    save_total_limit: int = field(default=2, metadata={"help": "keep the newest N checkpoints"})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "'latest' (newest in output_dir/checkpoints, or start fresh) or a checkpoint path"})
    report_to: str = field(default="tensorboard", metadata={"help": "tensorboard | none", "choices": ["tensorboard", "none"]})
    predictions_format: str = field(default="jsonl", metadata={"help": "jsonl ({index, prediction}) | tsv (GLUE: index<TAB>prediction)", "choices": ["jsonl", "tsv"]})

    def __post_init__(self):
        self.task_name = self.task_name or None
        if self.task_name is None and self.train_file is None:
            self.task_name = "demo"
        self.problem_type = normalize_problem_type(self.problem_type) if self.problem_type else None
        if self.metric_for_best_model:
            self.metric_for_best_model = self.metric_for_best_model.removeprefix("eval_")
            known = {"loss", *(m for names in METRIC_NAMES.values() for m in names)}
            if self.metric_for_best_model not in known:
                raise ValueError(f"unknown metric_for_best_model {self.metric_for_best_model!r}; use one of {', '.join(sorted(known))}")
        if self.text_column is not None and not 1 <= len(self.text_column) <= 2:
            raise ValueError("--text_column takes one or two column names")
        if self.mixed_precision not in (None, "no", "fp16", "bf16"):
            raise ValueError(f"--mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        if not 0.0 < self.layerwise_lr_decay <= 1.0:
            raise ValueError(f"--layerwise_lr_decay must be in (0, 1], got {self.layerwise_lr_decay}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        positive = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                    "max_seq_length", "logging_steps", "mega_batch_mult", "save_total_limit")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        for name in ("eval_steps", "early_stopping_patience", "num_labels", "max_train_samples",
                     "max_eval_samples", "max_predict_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.max_steps <= 0 and self.num_train_epochs < 1:
            raise ValueError("set --num_train_epochs >= 1 or --max_steps > 0")


# ----------------------------------------------------------------------------------------------------------
# Helpers


def resolve_model_dir(args: FinetuneArguments, output_dir: Path, accelerator) -> Path:
    """A Hugging Face model directory for ``--model_name_or_path`` (exporting a training checkpoint)."""
    path = Path(args.model_name_or_path)
    if not path.exists():
        if args.model_name_or_path == DEFAULT_MODEL:
            raise UserError(
                f"no pretrained model at {DEFAULT_MODEL}; make it with `accelerate launch launch/pretrain.py` "
                "or pass --model_name_or_path"
            )
        raise UserError(f"--model_name_or_path {path} does not exist; point it at a pretraining final/ or checkpoint dir")
    if (path / "config.json").is_file():
        return path
    if (path / "final" / "config.json").is_file():  # a pretraining output_dir
        return path / "final"
    if (path / "trainer_state.json").is_file():  # checkpoints/step_XXXXXXXX: accelerate state, not HF
        export_dir = output_dir / "pretrained_export" / path.name
        if accelerator.is_main_process and not (export_dir / "config.json").is_file():
            # launch/export.py (lead) turns any pretraining checkpoint, ZeRO shards included, into a HF dir.
            spec = importlib.util.spec_from_file_location("ltgbert_export", Path(__file__).with_name("export.py"))
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            tmp = export_dir.with_name(f".{export_dir.name}.tmp")
            module.export(path, tmp, args.tokenizer_name)
            os.replace(tmp, export_dir)
        accelerator.wait_for_everyone()
        return export_dir
    raise UserError(f"{path} holds neither config.json (HF model dir) nor trainer_state.json (pretraining checkpoint)")


def check_model_and_tokenizer(config, tokenizer, args: FinetuneArguments, label_info: LabelInfo, source: str) -> None:
    """The one-line errors for a tokenizer, length or classifier that does not fit the model."""
    if len(tokenizer) > config.vocab_size:
        raise UserError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embeddings hold {config.vocab_size}; "
            "use the tokenizer the model was pretrained with (--tokenizer_name)"
        )
    if tokenizer.pad_token_id is None:
        raise UserError("the tokenizer has no padding token; use the pretraining tokenizer (it defines [PAD])")
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos is not None and args.max_seq_length > max_pos:
        raise UserError(f"--max_seq_length {args.max_seq_length} exceeds the model's max_position_embeddings {max_pos}")
    heads = [a for a in (config.architectures or []) if a.endswith("ForSequenceClassification")]
    if heads and not args.random_init and not args.ignore_mismatched_sizes and config.num_labels != label_info.num_labels:
        raise UserError(
            f"{source} has a classifier with {config.num_labels} labels but the task has {label_info.num_labels}; "
            "pass --ignore_mismatched_sizes to re-initialise the classifier"
        )


def layerwise_param_groups(model: torch.nn.Module, args: FinetuneArguments) -> list[dict[str, Any]]:
    """Weight-decay groups (``param_groups``), split by layer-wise learning-rate scale.

    Encoder layer i (1-based, of L) gets ``decay ** (L - i)``, embeddings ``decay ** L``, the head 1: lower
    layers hold general features that pretraining got right and fine-tuning should move least.
    """
    groups = param_groups(model, args.weight_decay)
    if args.layerwise_lr_decay == 1.0:
        return groups
    num_layers = model.config.num_hidden_layers
    prefix = model.base_model_prefix + "."
    names = {id(p): n for n, p in model.named_parameters()}

    def depth(name: str) -> int:
        if not name.startswith(prefix):
            return num_layers  # the head: full learning rate
        match = re.search(r"\.layers?\.(\d+)\.", name)
        if match:
            return int(match.group(1)) + 1
        return 0 if "embed" in name else num_layers

    split: list[dict[str, Any]] = []
    for group in groups:
        by_scale: dict[float, list] = {}
        for p in group["params"]:
            by_scale.setdefault(args.layerwise_lr_decay ** (num_layers - depth(names[id(p)])), []).append(p)
        for scale, params in sorted(by_scale.items()):
            split.append({**group, "params": params, "lr": args.learning_rate * scale})
    return split


@torch.no_grad()
def evaluate(accelerator, model, loader, label_info: LabelInfo) -> dict[str, float]:
    """Metrics (and "loss") over a prepared loader, computed on every rank from the gathered outputs."""
    model.eval()
    logits, labels, index = [], [], []
    for batch in loader:
        idx = batch.pop("idx")
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
        # gather_for_metrics drops the rows accelerate repeated to even out the last batch across ranks.
        logits.append(accelerator.gather_for_metrics(out.logits.float()).cpu())
        labels.append(accelerator.gather_for_metrics(batch["labels"]).cpu())
        index.append(accelerator.gather_for_metrics(idx).cpu())
    model.train()
    order = torch.argsort(torch.cat(index))
    logits, labels = torch.cat(logits)[order], torch.cat(labels)[order]
    metrics = compute_metrics(label_info.problem_type, logits.numpy(), labels.numpy())
    if label_info.problem_type == "regression":
        metrics["loss"] = F.mse_loss(logits.view(-1), labels.view(-1).float()).item()
    elif label_info.problem_type == "multilabel":
        metrics["loss"] = F.binary_cross_entropy_with_logits(logits, labels.float()).item()
    else:
        metrics["loss"] = F.cross_entropy(logits, labels).item()
    return metrics


def predict(accelerator, model_dir: Path, dataset, collator, batch_size: int) -> np.ndarray:
    """Logits of ``model_dir`` on every row of ``dataset``, rows split over the ranks, in row order.

    A fresh plain model on each rank (no DeepSpeed engine) works the same under every ZeRO stage.
    """
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).to(accelerator.device).eval()
    order = dataset.sorted_by_length().order
    rows, logits = [], []
    with accelerator.split_between_processes(order.tolist()) as mine:
        loader = DataLoader(torch.utils.data.Subset(dataset, mine), batch_size=batch_size, collate_fn=collator)
        with torch.no_grad(), accelerator.autocast():
            for batch in loader:
                rows.extend(batch.pop("idx").tolist())
                batch.pop("labels", None)
                logits.extend(model(**{k: v.to(accelerator.device) for k, v in batch.items()}).logits.float().cpu().numpy())
    pairs = gather_object(list(zip(rows, logits)))
    pairs.sort(key=lambda p: p[0])
    return np.stack([p[1] for p in pairs])


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------
# Main


def main(args: FinetuneArguments) -> dict[str, Any]:
    """Fine-tunes on one task (or every demo task, for ``--task_name demo``); returns the metrics."""
    if args.task_name == "demo":
        results = {}
        for name in DEMO_TASKS:
            sub = dataclasses.replace(args, task_name=f"demo_{name}", output_dir=str(Path(args.output_dir) / name))
            results[name] = main(sub)
            if results[name].get("status") == "preempted":
                return {"status": "preempted", "tasks": results}
        return {"status": "done", "tasks": results}

    # ---------------------------------------------------------------------------------------------- setup
    output_dir = Path(args.output_dir)
    if (output_dir / "metrics.json").is_file() and not args.overwrite_output_dir:
        if args.resume_from_checkpoint:  # a requeued job whose work is done
            return json.loads((output_dir / "metrics.json").read_text())
        raise UserError(f"{output_dir} holds a finished run (metrics.json); pass --overwrite_output_dir or another --output_dir")
    accelerator = make_accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with="tensorboard" if args.report_to == "tensorboard" else None,
        project_dir=str(output_dir / "logs"),
    )
    set_seed(args.seed)
    preemption = PreemptionHandler().install()
    model_dir = resolve_model_dir(args, output_dir, accelerator)

    # ----------------------------------------------------------------------------------------------- data
    with accelerator.main_process_first():  # the Hub download / demo generation happens once
        task = load_task(args.task_name, args.train_file, args.validation_file, args.test_file, args.text_column,
                         args.label_column, args.dataset_name, args.dataset_cache_dir, args.demo_dir)
    limits = {"train": args.max_train_samples, "validation": args.max_eval_samples, "test": args.max_predict_samples}
    task.splits = {name: split.head(limits[name]) for name, split in task.splits.items()}
    label_info = build_label_info(task, args.problem_type, args.num_labels)
    try:
        config = AutoConfig.from_pretrained(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name or model_dir)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot load the model config/tokenizer from {model_dir}: {' '.join(str(e).split())[:200]}") from None
    check_model_and_tokenizer(config, tokenizer, args, label_info, str(model_dir))
    use_types = getattr(config, "type_vocab_size", 1) > 1  # BERT-style segment ids; LTG-BERT has none
    data = {name: encode_split(split, label_info, tokenizer, args.max_seq_length, use_types)
            for name, split in task.splits.items()}
    collator = DynamicPaddingCollator(tokenizer.pad_token_id, label_info.problem_type,
                                      pad_to_multiple_of=8 if accelerator.mixed_precision != "no" else None)
    sampler = LengthGroupedBatchSampler(data["train"].lengths, args.per_device_train_batch_size,
                                        args.group_by_length, args.mega_batch_mult, args.seed)
    # Own generators: creating a DataLoader iterator draws a seed from the global RNG otherwise, and a resumed
    # run, which starts its iterator mid-epoch, would then see other dropout masks than an unbroken run.
    train_loader = DataLoader(data["train"], batch_sampler=sampler, collate_fn=collator,
                              generator=torch.Generator().manual_seed(args.seed))
    eval_loader = None
    if "validation" in data:
        if data["validation"].labels is None:
            raise UserError(f"the validation split ({task.splits['validation'].source}) has no labels")
        eval_loader = DataLoader(data["validation"].sorted_by_length(), batch_size=args.per_device_eval_batch_size,
                                 collate_fn=collator, generator=torch.Generator().manual_seed(args.seed))
    metric = args.metric_for_best_model or task.metric or default_metric(label_info.problem_type)
    if metric != "loss" and metric not in METRIC_NAMES[label_info.problem_type]:
        raise UserError(f"metric {metric!r} does not apply to a {label_info.problem_type} task; use one of "
                        f"{', '.join(METRIC_NAMES[label_info.problem_type])} or loss")

    # ---------------------------------------------------------------------------------------------- model
    config.id2label, config.label2id = label_info.id2label, label_info.label2id  # num_labels follows id2label
    config.problem_type = label_info.hf_problem_type
    if args.random_init:
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                model_dir, config=config, ignore_mismatched_sizes=args.ignore_mismatched_sizes
            )
        except (RuntimeError, ValueError, OSError) as e:
            raise UserError(f"cannot load {model_dir} for classification: {' '.join(str(e).split())[:300]}") from None
    if args.gradient_checkpointing:
        if not model.supports_gradient_checkpointing:
            raise UserError(f"{type(model).__name__} does not support --gradient_checkpointing")
        enable_activation_checkpointing(model)

    # ------------------------------------------------------------------------------------------ optimizer
    groups = layerwise_param_groups(model, args)
    betas = (args.adam_beta1, args.adam_beta2)
    if args.optimizer == "lamb":
        optimizer = Lamb(groups, lr=args.learning_rate, betas=betas, eps=args.adam_epsilon, weight_decay=args.weight_decay)
    else:
        optimizer = adamw(groups, lr=args.learning_rate, betas=betas, eps=args.adam_epsilon,
                          weight_decay=args.weight_decay)

    # -------------------------------------------------------------------------------------------- prepare
    ds_plugin = accelerator.state.deepspeed_plugin
    if ds_plugin is not None:
        # A batch sampler leaves DataLoader.batch_size None, where accelerate looks for it; DeepSpeed clips
        # gradients itself, with our max_grad_norm.
        for key, value in (("train_micro_batch_size_per_gpu", args.per_device_train_batch_size),
                           ("gradient_clipping", args.max_grad_norm)):
            if ds_plugin.is_auto(key):
                ds_plugin.deepspeed_config[key] = value
    if eval_loader is not None:
        model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    else:
        model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    steps_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    total_steps = args.max_steps if args.max_steps > 0 else steps_per_epoch * args.num_train_epochs
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    warmup = args.warmup_steps if args.warmup_steps > 0 else math.ceil(args.warmup_ratio * total_steps)
    # Stepped by hand once per optimizer step (not prepared: accelerate would step it once per process).
    scheduler = get_lr_scheduler(args.lr_scheduler_type, optimizer, warmup, total_steps, args.min_lr_ratio)
    accelerator.register_for_checkpointing(scheduler)

    state = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "best_metric": None, "best_step": None,
             "evals_without_improvement": 0, "history": []}
    if args.resume_from_checkpoint:
        path = (find_latest_checkpoint(output_dir) if args.resume_from_checkpoint == "latest"
                else Path(args.resume_from_checkpoint))
        if path is not None:
            state.update(load_checkpoint(accelerator, path))
            accelerator.print(f"resumed from {path} at step {state['step']}")
    if accelerator.is_main_process:
        save_resolved_config(args, output_dir / "run_config.json")
    if args.report_to == "tensorboard":
        hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in dataclasses.asdict(args).items()}
        accelerator.init_trackers("finetune", config=hparams)
    accelerator.print(
        f"task {task.name}: {label_info.problem_type}, {label_info.num_labels} label(s), "
        f"{len(data['train'])} train rows, {total_steps} steps, world size {accelerator.num_processes}"
    )

    # ----------------------------------------------------------------------------------------------- loop
    model.train()
    step, best_dir = state["step"], output_dir / "best"
    running_loss = torch.zeros((), device=accelerator.device)
    running_batches = 0
    # Rows this rank trains on in its first epoch: metrics.json shows the ranks saw different data.
    seen = torch.zeros(len(data["train"]), device=accelerator.device)
    first_epoch, stop, preempted = state["epoch"], step >= total_steps, False
    start_time = time.perf_counter()
    for epoch in range(state["epoch"], num_epochs):
        if stop:
            break
        sampler.set_epoch(epoch)
        skip = state["batches_in_epoch"] if epoch == state["epoch"] else 0
        loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        batches_in_epoch = skip
        for batch in loader:
            idx = batch.pop("idx")
            if epoch == first_epoch:
                seen.index_add_(0, idx, torch.ones_like(idx, dtype=seen.dtype))
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0 and ds_plugin is None:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            batches_in_epoch += 1
            running_loss += loss.detach()
            running_batches += 1
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            step += 1
            epoch_done = batches_in_epoch == len(train_loader)
            if step % args.logging_steps == 0 or step == total_steps:
                train_loss = accelerator.reduce(running_loss, "mean").item() / running_batches
                lr = scheduler.get_last_lr()[-1]  # the head's group: the peak schedule
                accelerator.log({"train/loss": train_loss, "train/learning_rate": lr}, step=step)
                accelerator.print(f"step {step}/{total_steps} epoch {epoch} loss {train_loss:.4f} lr {lr:.3g}")
                running_loss.zero_()
                running_batches = 0
                # The signal check is an all-reduce, so it rides on the logging steps' host sync.
                preempted = all_ranks_any(accelerator, preemption.requested)
            elif accelerator.num_processes == 1:
                preempted = preemption.requested
            if eval_loader is not None and (
                (args.eval_steps and step % args.eval_steps == 0) or (not args.eval_steps and epoch_done)
            ):
                metrics = evaluate(accelerator, model, eval_loader, label_info)
                accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
                accelerator.print(f"eval step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                state["history"].append({"step": step, "epoch": epoch, **metrics})
                if is_better(metric, metrics[metric], state["best_metric"]):
                    state.update(best_metric=metrics[metric], best_step=step, evals_without_improvement=0)
                    export_final_model(accelerator, model, output_dir, tokenizer, subdir="best")
                else:
                    state["evals_without_improvement"] += 1
                    patience = args.early_stopping_patience
                    if patience is not None and state["evals_without_improvement"] >= patience:
                        accelerator.print(f"early stopping: no {metric} improvement in {patience} evaluations")
                        stop = True
            stop = stop or step >= total_steps
            state.update(step=step, epoch=epoch + 1 if epoch_done else epoch,
                         batches_in_epoch=0 if epoch_done else batches_in_epoch)
            if preempted or (args.save_steps and step % args.save_steps == 0 and not stop):
                # The resolved config travels with the checkpoint: the run can be rebuilt from it alone.
                save_checkpoint(accelerator, output_dir, step, {**state, "config": resolved_config(args)},
                                args.save_total_limit)
            if preempted:
                accelerator.print(f"preempted ({preemption.signal_name}): checkpoint at step {step} saved, exiting")
                accelerator.end_training()
                return {"status": "preempted", "step": step}
            if stop:
                break
    train_time = time.perf_counter() - start_time

    # ----------------------------------------------------------------------------------------------- save
    if eval_loader is None or state["best_step"] is None:
        export_final_model(accelerator, model, output_dir, tokenizer, subdir="best")  # nothing to select: the last model
    seen_all = accelerator.gather(seen.view(1, -1)).cpu()  # [ranks, rows]
    result: dict[str, Any] = {
        "status": "done",
        "task": task.name,
        "problem_type": label_info.problem_type,
        "num_labels": label_info.num_labels,
        "labels": label_info.names,
        "model_name_or_path": args.model_name_or_path,
        "random_init": args.random_init,
        "world_size": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "steps": step,
        "train_rows": len(data["train"]),
        "train_seconds": round(train_time, 2),
        "metric_for_best_model": metric,
        "best_metric": state["best_metric"],
        "best_step": state["best_step"],
        "eval": next((h for h in state["history"] if h["step"] == state["best_step"]), {}),
        "history": state["history"],
        "data_check": {
            "rows_per_rank_first_epoch": (seen_all > 0).sum(dim=1).tolist(),
            "rows_on_several_ranks": int(((seen_all > 0).sum(dim=0) > 1).sum()),
        },
    }
    if "test" in data:
        logits = predict(accelerator, best_dir, data["test"], collator, args.per_device_eval_batch_size)
        if data["test"].labels is not None:
            labels = np.asarray(data["test"].labels)
            result["test"] = compute_metrics(label_info.problem_type, logits, labels)
        if accelerator.is_main_process:
            preds = [label_info.decode(p) for p in logits_to_predictions(label_info.problem_type, logits)]
            write_predictions(output_dir / f"predictions_test.{args.predictions_format}", preds, args.predictions_format)
    if accelerator.is_main_process:
        write_json(output_dir / "metrics.json", result)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def cli(argv: list[str] | None = None) -> int:
    def run(args):
        return EXIT_PREEMPTED if main(args).get("status") == "preempted" else 0

    return run_entry_point(FinetuneArguments, run, argv)


if __name__ == "__main__":
    sys.exit(cli())
