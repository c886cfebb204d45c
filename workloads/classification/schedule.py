"""Optimiser and learning-rate schedule of the published recipe.

SGD with Nesterov momentum (or AdamW), the learning rate scaled linearly with the global batch, and a
per-iteration schedule: linear warm-up from 0 to the peak, then cosine decay to `min_lr`.
"""
from __future__ import annotations

import math

import torch


def scaled_lr(lr: float, global_batch: int, base_batch_size: int, scale: bool) -> float:
    """The peak learning rate: `lr * global_batch / base_batch_size` when `scale`, else `lr`."""
    if base_batch_size <= 0:
        raise ValueError(f"optim.base_batch_size must be positive, got {base_batch_size}")
    return lr * global_batch / base_batch_size if scale else lr


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr at iteration `step` (0-based): linear warm-up, then cosine to `min_ratio`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model, optim, lr: float):
    """SGD (Nesterov) or AdamW over all parameters, from an `OptimConfig`."""
    params = [p for p in model.parameters() if p.requires_grad]
    if optim.name == "sgd":
        return torch.optim.SGD(
            params,
            lr=lr,
            momentum=optim.momentum,
            nesterov=bool(optim.nesterov) and optim.momentum > 0,
            weight_decay=optim.weight_decay,
        )
    if optim.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay)
    raise ValueError(f"optim.name must be 'sgd' or 'adamw', got {optim.name!r}")


def build_scheduler(optimizer, optim, steps_per_epoch: int, peak_lr: float):
    """A per-iteration LambdaLR: warm-up (`warmup_iters`, else `warmup_epochs`) then cosine to `min_lr`."""
    total = max(1, optim.epochs * steps_per_epoch)
    warmup = optim.warmup_iters or round(optim.warmup_epochs * steps_per_epoch)
    warmup = min(warmup, total)
    min_ratio = optim.min_lr / peak_lr if peak_lr > 0 else 0.0
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, total, warmup, min_ratio)
    )
