"""Optimizers and learning-rate schedules for LTG-BERT pretraining and fine-tuning.

What is here and why:

1. ``Lamb``: the LAMB optimizer (You et al. 2019, "Large Batch Optimization for Deep Learning: Training BERT
   in 76 minutes") exactly as the original LTG-BERT code uses it (ltgoslo/ltg-bert, ``training/lamb.py``):
   a bias-corrected Adam direction, weight decay added to that direction, and the layer-wise trust ratio
   ``||w|| / ||update||`` (1.0 when either norm is zero) applied to parameter groups that decay. The
   original loops over parameters in Python and takes a host-synchronising branch per parameter
   (``if w_norm > 0``); here every step is a handful of ``torch._foreach_*`` kernels per (device, dtype)
   bucket and the trust ratio is a ``torch.where``, so a step never waits on the device. On CPU the Adam
   direction comes from torch's fused Adam kernel (one pass over the state instead of nine): 1.7x faster.
2. ``param_groups``: weight decay by tensor rank (matrices decay; biases, norms and other 1-d tensors do
   not), plus the LTG-BERT rule that embeddings do not decay either.
3. ``build_optimizer``: "lamb" (the LTG-BERT recipe) or "adamw" (``adamw``: ``torch.optim.AdamW``, fused where
   the parameters allow, which torch does not choose by itself on CPU).
4. ``get_lr_scheduler``: linear warmup from 0, then cosine / linear decay to ``min_lr_ratio`` or constant.
   The LTG-BERT recipe is 1.6% warmup, then cosine down to 0.1x the peak learning rate.

``Lamb`` is a plain ``torch.optim.Optimizer`` subclass with the usual ``state`` keys ('step', 'exp_avg',
'exp_avg_sq'), so ``accelerator.save_state`` / ``load_state`` and DeepSpeed ZeRO (as a client optimizer:
``accelerator.prepare(model, Lamb(...))``, with ``zero_allow_untested_optimizer`` set, which accelerate does
when the DeepSpeed config has no "optimizer" section) handle it like AdamW.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from ltgbert.errors import UserError

__all__ = [
    "Lamb",
    "adamw",
    "param_groups",
    "layerwise_param_groups",
    "build_optimizer",
    "get_lr_scheduler",
    "OPTIMIZERS",
    "SCHEDULERS",
]

OPTIMIZERS = ("lamb", "adamw")
SCHEDULERS = ("cosine", "linear", "constant")


# -----------------------------------------------------------------------------
# LAMB


class Lamb(torch.optim.Optimizer):
    """LAMB with ``_foreach`` kernels (and fused Adam on CPU), the LTG-BERT reference loop to float rounding.

    Per parameter ``w`` with gradient ``g`` at step ``t`` (counted per parameter, from 1):

        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        u = (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)      # without bias correction: m / (sqrt(v) + eps)
        u = u + weight_decay * w
        r = ||w|| / ||u||  if both norms > 0 else 1                      # only where weight_decay > 0, or always_adapt
        r = min(r, clamp_trust_ratio)                                     # if clamp_trust_ratio is not None
        w = w - lr * r * u

    Args:
        params: parameters or parameter groups (see ``param_groups``).
        lr: peak learning rate.
        betas: coefficients of the running averages of the gradient and of its square.
        eps: added to the denominator; LTG-BERT uses 1e-6 (larger than Adam's usual 1e-8).
        weight_decay: decoupled decay added to the update, so it is scaled by the trust ratio too.
        clamp_trust_ratio: upper bound on the trust ratio; ``None`` (the LTG-BERT default) leaves it unbounded.
        bias_correction: divide the running averages by ``1 - beta^t`` as Adam does (LTG-BERT: yes).
        always_adapt: apply the trust ratio to groups without weight decay too (NVLAMB / apex ``use_nvlamb``).
            LTG-BERT does not: biases, norms and embeddings get the plain Adam step.

    Parameters whose ``.grad`` is None are skipped and keep their state (and step count) unchanged.
    """

    cpu_chunk_numel = 1 << 18  # elements per _foreach call on CPU (see _step_group)
    cpu_fused_adam = True  # the Adam direction from torch's fused kernel on CPU (see _fused_adam_direction)

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        clamp_trust_ratio: float | None = None,
        bias_correction: bool = True,
        always_adapt: bool = False,
    ):
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not eps >= 0.0:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameters: {betas}; both must be in [0, 1)")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if clamp_trust_ratio is not None and not clamp_trust_ratio > 0.0:
            raise ValueError(f"Invalid clamp_trust_ratio: {clamp_trust_ratio}; use None for no clamping")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            clamp_trust_ratio=clamp_trust_ratio,
            bias_correction=bias_correction,
            always_adapt=always_adapt,
        )
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Optimizer state pickled before an option existed still loads with that option's default.
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("clamp_trust_ratio", None)
            group.setdefault("bias_correction", True)
            group.setdefault("always_adapt", False)

    @torch.no_grad()
    def step(self, closure=None):
        """Performs one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group: dict[str, Any]) -> None:
        # Bucket by (device, dtype): a _foreach kernel needs all of its tensors on one device with one dtype.
        buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("Lamb does not support sparse gradients")
            buckets.setdefault((p.device, p.dtype), []).append(p)
        for (device, _), params in buckets.items():
            if device.type != "cpu":
                self._step_bucket(group, params)  # one multi-tensor kernel launch per op for the whole bucket
                continue
            # On CPU a _foreach op is a C++ loop over the tensors, with no kernel launches to save; what costs
            # is streaming every temporary through DRAM once per op. Chunks of ~1 MB of fp32 keep a chunk's
            # passes in cache (bench/bench_lamb.py: 1.3x faster than one bucket with the _foreach direction).
            chunk, numel = [], 0
            for p in params:
                chunk.append(p)
                numel += p.numel()
                if numel >= self.cpu_chunk_numel:
                    self._step_bucket(group, chunk)
                    chunk, numel = [], 0
            if chunk:
                self._step_bucket(group, chunk)

    def _step_bucket(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]

        grads, exp_avgs, exp_avg_sqs, steps = [], [], [], []
        for p in params:
            state = self.state[p]
            if len(state) == 0:
                # 'step' is a Python int, as in the reference: the bias corrections are then host scalars
                # and never need a device->host copy.
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] = int(state["step"]) + 1  # int(): tolerate a tensor 'step' from a foreign state dict
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])

        if params[0].device.type == "cpu" and self.cpu_fused_adam:
            updates = _fused_adam_direction(
                params, grads, exp_avgs, exp_avg_sqs, steps, beta1, beta2, eps, group["bias_correction"]
            )
        else:
            updates = _foreach_adam_direction(
                grads, exp_avgs, exp_avg_sqs, steps, beta1, beta2, eps, group["bias_correction"]
            )

        if weight_decay != 0.0:
            torch._foreach_add_(updates, params, alpha=weight_decay)

        if weight_decay > 0.0 or group["always_adapt"]:
            # Layer-wise trust ratio for all tensors of the bucket at once: stacked norms, one where(), no .item().
            w_norms = torch.stack(torch._foreach_norm(params))
            u_norms = torch.stack(torch._foreach_norm(updates))
            ratios = torch.where((w_norms > 0) & (u_norms > 0), w_norms / u_norms, torch.ones_like(w_norms))
            if group["clamp_trust_ratio"] is not None:
                ratios = ratios.clamp(max=group["clamp_trust_ratio"])
            # Fold -lr into the per-tensor scale so the parameter update is a single add.
            torch._foreach_mul_(updates, list((ratios * -lr).unbind(0)))
            torch._foreach_add_(params, updates)
        else:
            torch._foreach_add_(params, updates, alpha=-lr)


def _foreach_adam_direction(grads, exp_avgs, exp_avg_sqs, steps, beta1, beta2, eps, bias_correction):
    """Updates the running averages in place; returns the Adam directions m_hat / (sqrt(v_hat) + eps).

    The reference's own sequence of operations (mul_ + add_, mul_ + addcmul_, not lerp_), one _foreach kernel
    each: on GPUs every op is one multi-tensor launch for the whole bucket.
    """
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    # Parameters can be at different steps (one that had no grad for a while), so the bias corrections are a
    # list of scalars, one per tensor.
    if bias_correction:
        updates = torch._foreach_div(exp_avgs, [1.0 - beta1**t for t in steps])
        denoms = torch._foreach_div(exp_avg_sqs, [1.0 - beta2**t for t in steps])
    else:
        updates = torch._foreach_mul(exp_avgs, 1.0)
        denoms = torch._foreach_mul(exp_avg_sqs, 1.0)
    torch._foreach_sqrt_(denoms)
    torch._foreach_add_(denoms, eps)
    torch._foreach_div_(updates, denoms)
    return updates


def _fused_adam_direction(params, grads, exp_avgs, exp_avg_sqs, steps, beta1, beta2, eps, bias_correction):
    """As ``_foreach_adam_direction``, through torch's fused Adam kernel (CPU): one pass instead of nine.

    The kernel updates m and v in place and moves its "parameters" by -lr * m_hat / (sqrt(v_hat) + eps); given
    zeroed buffers and lr = -1 it leaves exactly the Adam direction there, which LAMB needs before it can take
    the trust ratio. The same function as the reference up to float rounding (the kernel divides by
    sqrt(1 - beta2^t) after the square root instead of before). Without bias correction, step counts stay
    at 1e9, where the corrections are 1 in float32.
    """
    flat = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
    updates = [u.view_as(p) for u, p in zip(flat.split([p.numel() for p in params]), params)]
    counts = torch.tensor(steps if bias_correction else [1e9] * len(steps), dtype=torch.float32)
    torch._fused_adam_(
        updates,
        grads,
        exp_avgs,
        exp_avg_sqs,
        [],
        list(counts.unbind(0)),
        lr=-1.0,
        beta1=beta1,
        beta2=beta2,
        weight_decay=0.0,
        eps=eps,
        amsgrad=False,
        maximize=False,
    )
    return updates


# -----------------------------------------------------------------------------
# parameter groups and the optimizer factory


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Splits trainable parameters into a decaying and a non-decaying group.

    Matrices (``p.ndim >= 2``) decay, as in nanoGPT; biases, LayerNorm weights and other 1-d tensors do not,
    and neither do embeddings (any parameter whose name contains "embedding"), following LTG-BERT, whose
    embedding matrix is tied to the MLM output layer and would otherwise be decayed towards zero. Frozen
    parameters (``requires_grad=False``) are left out. Empty groups are dropped.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim >= 2 and "embedding" not in name.lower():
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def adamw(groups, **kwargs) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` with its fused kernel where every parameter is a float tensor on CPU or CUDA.

    Left to itself torch takes its per-tensor loop on CPU (and _foreach on CUDA): one CPU step over the small
    model's parameters is about 3.3x faster fused (bench/bench_lamb.py).
    """
    params = [p for g in groups for p in g["params"]]
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, fused=fused or None, **kwargs)


def layerwise_param_groups(
    model: torch.nn.Module, weight_decay: float, lr: float, decay: float = 1.0
) -> list[dict[str, Any]]:
    """``param_groups`` split by layer-wise learning-rate scale (fine-tuning's ``--layerwise_lr_decay``).

    Encoder layer i (1-based, of L) gets ``lr * decay ** (L - i)``, embeddings ``lr * decay ** L``, the head
    ``lr``: lower layers hold general features that pretraining got right and fine-tuning should move least.
    With ``decay == 1`` these are ``param_groups`` with ``lr`` set.
    """
    groups = param_groups(model, weight_decay)
    if decay == 1.0:
        return [{**g, "lr": lr} for g in groups]
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
            by_scale.setdefault(decay ** (num_layers - depth(names[id(p)])), []).append(p)
        for scale, params in sorted(by_scale.items()):
            split.append({**group, "params": params, "lr": lr * scale})
    return split


def build_optimizer(
    name: str,
    model_or_groups: torch.nn.Module | list[dict[str, Any]],
    lr: float,
    betas: tuple[float, float] = (0.9, 0.98),
    eps: float = 1e-6,
    weight_decay: float = 0.1,
) -> torch.optim.Optimizer:
    """Builds "lamb" (``Lamb``) or "adamw" (``torch.optim.AdamW``, fused where possible).

    ``model_or_groups``: a model (grouped by ``param_groups(model, weight_decay)``) or ready parameter groups
    (e.g. ``layerwise_param_groups``), whose own "lr" / "weight_decay" entries win over the arguments.
    """
    if isinstance(model_or_groups, torch.nn.Module):
        groups = param_groups(model_or_groups, weight_decay)
    else:
        groups = [g for g in model_or_groups if g["params"]]
    if not groups:
        raise UserError("the model has no trainable parameters; check which parameters are frozen")
    key = name.lower()
    if key == "lamb":
        return Lamb(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    if key == "adamw":
        return adamw(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    raise UserError(f"unknown optimizer {name!r}; use one of {', '.join(OPTIMIZERS)}")


# -----------------------------------------------------------------------------
# learning-rate schedules


def _lr_factor(step: int, *, kind: str, num_warmup_steps: int, num_training_steps: int, min_lr_ratio: float) -> float:
    # Module-level function wrapped in functools.partial (not a closure) so the scheduler pickles.
    if step < num_warmup_steps:
        return float(step) / float(max(1, num_warmup_steps))
    if kind == "constant":
        return 1.0
    progress = float(step - num_warmup_steps) / float(max(1, num_training_steps - num_warmup_steps))
    progress = min(1.0, progress)  # past num_training_steps (e.g. a few extra steps) stay at the floor
    if kind == "cosine":
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 - progress)


def get_lr_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    num_warmup_steps: int,
    num_training_steps: int,
    min_lr_ratio: float = 0.1,
) -> LambdaLR:
    """A ``LambdaLR`` with linear warmup from 0 to the peak over ``num_warmup_steps``, then:

    - "cosine": half a cosine from the peak down to ``min_lr_ratio * peak`` at ``num_training_steps``;
    - "linear": a straight line from the peak down to ``min_lr_ratio * peak`` at ``num_training_steps``;
    - "constant": the peak.

    The factor stays at ``min_lr_ratio`` after ``num_training_steps``. Step the scheduler once per optimizer
    update (under ``accelerator.sync_gradients``), not per micro-batch.
    """
    kind = name.lower()
    if kind not in SCHEDULERS:
        raise UserError(f"unknown lr scheduler {name!r}; use one of {', '.join(SCHEDULERS)}")
    if num_warmup_steps < 0 or num_training_steps < 0:
        raise UserError(f"warmup ({num_warmup_steps}) and training ({num_training_steps}) steps must not be negative")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise UserError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    fn = functools.partial(
        _lr_factor,
        kind=kind,
        num_warmup_steps=num_warmup_steps,
        num_training_steps=num_training_steps,
        min_lr_ratio=min_lr_ratio,
    )
    return LambdaLR(optimizer, fn)
