"""Data-parallel evaluation of a classification checkpoint (runs inside Ray Train workers).

`eval_loop_per_worker(cfg)` builds the model from the weights in its `EvalConfig` (loaded and checked on the
driver, so every node gets them whatever storage it sees), evaluates its shard of the validation split, and
sums counts across workers: loss, top-1 and top-5 hits, per-class hits and totals and the confusion matrix.
The result is exact (the same sums as one process over the whole split), not an average of per-worker
averages. Every worker reports it; rank 0's report carries the per-class counts and the confusion matrix, and a
checkpoint folder holding them as `eval.json`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from workloads.classification.config import DataPlan, ShardPlan
from workloads.classification.data import ShardSampler, split_dataset
from workloads.classification.recipe import InputConfig
from workloads.classification.transforms import build_val_transform
from workloads.distributed import all_reduce, unwrap
from workloads.eval_report import report_evaluation
from workloads.models import build_model
from workloads.runtime import WorkerRuntime, start_worker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalConfig:
    model_name: str
    state_dict: dict  # the weights, as tensors
    data: DataPlan | ShardPlan
    model_overrides: dict[str, Any]  # num_classes included: the model is built with exactly these
    inputs: InputConfig
    batch_size: int
    loader_workers: int
    label_smoothing: float  # as in training, so that eval/loss equals the logged val/loss
    autocast: str
    channels_last: bool
    verbosity: int = 0


def confusion_counts(logits, targets, num_classes: int):
    """(C, C) int64 counts: row = true class, column = predicted class."""
    pred = logits.argmax(1)
    return torch.bincount(targets * num_classes + pred, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes)


def evaluate_shard(model, loader, num_classes: int, criterion, runtime: WorkerRuntime):
    """Summed counts over this worker's shard, as float64 / int64 tensors to be all-reduced: `totals`
    (loss_sum, top1, top5, n, failures), `confusion` (see `confusion_counts`) and `top5_per_class`. Used by
    `cvlab eval` and by the training loop's epoch validation."""
    net = unwrap(model)  # no DDP collectives: shards may hold different numbers of batches
    net.eval()
    totals = torch.zeros(5, dtype=torch.float64, device=runtime.device)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=runtime.device)
    top5_per_class = torch.zeros(num_classes, dtype=torch.int64, device=runtime.device)
    with torch.no_grad():
        for images, targets, failures in loader:
            images = runtime.in_layout(images.to(runtime.device, non_blocking=True))
            targets = targets.to(runtime.device, non_blocking=True)
            with runtime.autocast():
                logits = net(images)
            logits = logits.float()
            hits = logits.topk(min(5, num_classes), dim=1).indices.eq(targets[:, None])
            n = targets.shape[0]
            totals += torch.tensor([criterion(logits, targets).item() * n, hits[:, 0].sum().item(),
                                    hits.any(dim=1).sum().item(), n, failures.sum().item()],
                                   dtype=torch.float64, device=runtime.device)
            confusion += confusion_counts(logits, targets, num_classes)
            top5_per_class += torch.bincount(targets[hits.any(dim=1)], minlength=num_classes)
    return totals, confusion, top5_per_class


def summarize_totals(totals) -> dict[str, float]:
    """Per-image loss, top-1 and top-5 and the failure count from the summed `totals` of `evaluate_shard`."""
    loss_sum, top1, top5, n, failures = totals.tolist()
    n = max(n, 1.0)
    return {"loss": loss_sum / n, "top1": top1 / n, "top5": top5 / n, "failures": failures}


def summarize(totals, confusion, top5_per_class, classes) -> dict[str, Any]:
    """Metrics from the summed counts (plain Python values)."""
    rates = summarize_totals(totals)
    per_class_total = confusion.sum(1).tolist()
    per_class_hits = confusion.diagonal().tolist()
    return {
        "eval/loss": rates["loss"],
        "eval/top1": rates["top1"],
        "eval/top5": rates["top5"],
        "eval/images": int(sum(per_class_total)),
        "eval/failed_images": int(rates["failures"]),
        "per_class": {c: {"images": t, "top1": (h / t if t else None), "top5": (f / t if t else None)}
                      for c, t, h, f in zip(classes, per_class_total, per_class_hits, top5_per_class.tolist())},
        "confusion": confusion.tolist(),
    }


def evaluate_all_shards(model, loader, classes, criterion, runtime: WorkerRuntime):
    """`summarize` of the counts of every worker's shard: this worker's `evaluate_shard`, summed over the
    workers' process group (the same numbers on every worker; a single process outside a group)."""
    totals, confusion, top5_per_class = evaluate_shard(model, loader, len(classes), criterion, runtime)
    for tensor in (totals, confusion, top5_per_class):
        all_reduce(tensor)
    return summarize(totals.cpu(), confusion.cpu(), top5_per_class.cpu(), classes)


def eval_loop_per_worker(cfg: EvalConfig) -> None:
    runtime = start_worker(cfg.verbosity, cfg.autocast, cfg.channels_last)
    classes = list(cfg.data.classes)
    model = build_model(cfg.model_name, **cfg.model_overrides)
    model.load_state_dict(cfg.state_dict, strict=True)
    model = runtime.place(model)

    dataset = split_dataset(cfg.data, "val", build_val_transform(cfg.inputs), rank=runtime.rank, world=runtime.world)
    streamed = isinstance(cfg.data, ShardPlan)  # a shard stream is this rank's share already
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, num_workers=cfg.loader_workers, pin_memory=runtime.is_cuda,
        sampler=None if streamed else ShardSampler(len(dataset), runtime.rank, runtime.world))
    log.info("evaluating %s on %d images (%d classes), %d worker(s)", cfg.model_name,
             cfg.data.val_images if streamed else len(dataset), len(classes), runtime.world)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    result = evaluate_all_shards(model, loader, classes, criterion, runtime)
    report_evaluation(result, runtime.rank, bulky=("per_class", "confusion"))  # the large parts travel once
