"""Mixup / cutmix on training batches (timm's `Mixup`) and the loss that goes with them.

    mixup = build_mixup(augment, num_classes, label_smoothing)       # None when the recipe does not mix
    criterion = build_train_criterion(augment, label_smoothing)
    ...
    if mixup is not None:
        images, targets = mixup(images, targets)   # targets become (B, num_classes) soft labels summing to 1
    loss = criterion(model(images), targets)

timm's Mixup draws from numpy's global generator (seeded per epoch by the worker loop), mixes the batch in place
with its mirror image (so the batch size must be even: the spec's schema checks it), and folds label smoothing
into the soft targets (on-value 1 - s + s/K, off-value s/K, as `CrossEntropyLoss(label_smoothing=s)` does).
Validation keeps plain `CrossEntropyLoss(label_smoothing=s)` on the true labels.
"""
from __future__ import annotations

import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy

from .recipe import AugmentConfig


def build_mixup(augment: AugmentConfig, num_classes: int, label_smoothing: float = 0.0):
    """timm `Mixup` for `augment.mixup` / `augment.cutmix` (batch mode), or None when batches are not mixed."""
    if not augment.mixes:
        return None
    return Mixup(mixup_alpha=augment.mixup, cutmix_alpha=augment.cutmix, prob=augment.mixup_prob,
                 switch_prob=augment.switch_prob, mode="batch", label_smoothing=label_smoothing,
                 num_classes=num_classes)


def build_train_criterion(augment: AugmentConfig, label_smoothing: float = 0.0):
    """`SoftTargetCrossEntropy` when batches are mixed (smoothing is in the targets), else the paper recipe's
    `CrossEntropyLoss(label_smoothing=...)`."""
    if augment.mixes:
        return SoftTargetCrossEntropy()
    return torch.nn.CrossEntropyLoss(label_smoothing=label_smoothing)
