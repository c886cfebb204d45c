"""mmengine hooks that connect a Runner (mmdet or mmseg) to Ray Train and MLflow.

Both epoch-based loops (mmdet: metrics per epoch) and iteration-based loops (mmseg: `runner.epoch` stays 0)
are served: a validation is reported with `iter` (and `epoch` for epoch-based loops), and MLflow steps are
epochs or iterations accordingly.

- `RayTrainReportHook` (every rank): after each validation, `ray.train.report(metrics, checkpoint)`; rank 0
  attaches the mmengine checkpoint written for that validation (the other ranks report metrics only).
- `MlflowRank0Hook` (rank 0): params at start, losses and lr every `interval` iterations, validation metrics
  and the last checkpoint at the end, straight through `MlflowClient(tracking_uri)` (mmengine's own MLflow
  backend breaks on MLflow >= 3.13).
- `FailOnceHook`: fault injection for recovery tests and drills.
Validation metric names come from the workload (`metric_names`); others become `val/<last part of key>`.
"""
from __future__ import annotations

import math
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import ray.train
from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from mmengine.runner import IterBasedTrainLoop

from workloads.checkpoint_transfer import report_with_retries
from workloads.distributed import take_rank0_buffers
from workloads.object_storage import exists, write_text

from .registration import register


def rename_metrics(metrics: Mapping | None, names: Mapping[str, str] | None = None) -> dict[str, float]:
    """Evaluator output -> reported metrics: numbers only, finite only, named by `names` or
    `val/<last key part>` (spaces become '_')."""
    names = names or {}
    out = {}
    for key, value in (metrics or {}).items():
        try:
            # numpy float32 (mmseg's percentages) through its shortest repr: 76.39, not 76.38999938964844.
            value = float(str(value)) if isinstance(value, np.floating) else float(value)
        except (TypeError, ValueError):
            continue
        # mmdet's CocoMetric writes -1 for "no objects of this size": not a score, left out.
        if math.isfinite(value) and not (value == -1.0 and key.startswith("coco/")):
            out[names.get(key) or "val/" + key.split("/")[-1].replace(" ", "_")] = value
    return out


def by_epoch(runner) -> bool:
    """Whether the runner's training loop counts epochs (False for an `IterBasedTrainLoop`)."""
    return not isinstance(runner.train_loop, IterBasedTrainLoop)


def val_step(runner) -> int:
    """The MLflow step of a validation: the epoch for epoch-based loops, else the iteration."""
    return runner.epoch if by_epoch(runner) else runner.iter


def latest_checkpoint(work_dir) -> Path | None:
    """The file named in mmengine's `last_checkpoint` marker (written by CheckpointHook on rank 0)."""
    marker = Path(work_dir) / "last_checkpoint"
    if not marker.is_file():
        return None
    path = Path(marker.read_text().strip())
    return path if path.is_file() else None


class RayTrainReportHook(Hook):
    priority = "LOW"  # after mmengine's own hooks (CheckpointHook is VERY_LOW)

    def __init__(self, metric_names: Mapping[str, str] | None = None, storage_retry_limit_s: float = 300.0):
        self.metric_names = dict(metric_names or {})
        self.storage_retry_limit_s = storage_retry_limit_s
        self._reported: Path | None = None

    def after_val_epoch(self, runner, metrics=None) -> None:
        counters = {"epoch": runner.epoch, "iter": runner.iter} if by_epoch(runner) else {"iter": runner.iter}
        report = {**counters, **rename_metrics(metrics, self.metric_names)}
        ckpt = latest_checkpoint(runner.work_dir) if get_rank() == 0 else None
        if ckpt is None or ckpt == self._reported:
            ray.train.report(report)
            return
        # Ray copies the directory into the run's storage; a hard link avoids a local copy.
        tmp = Path(tempfile.mkdtemp(prefix="cvlab-mm-ckpt-"))
        try:
            try:
                os.link(ckpt, tmp / ckpt.name)
            except OSError:
                shutil.copy2(ckpt, tmp / ckpt.name)
            report_with_retries(report, ray.train.Checkpoint.from_directory(str(tmp)), self.storage_retry_limit_s)
            self._reported = ckpt
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


class Rank0BuffersHook(Hook):
    """Before each validation every rank takes rank 0's buffers (BN running statistics). With per-worker BN
    the ranks' statistics drift apart, and the checkpoint (written by rank 0) holds rank 0's: validating
    with them makes the reported metrics those of the checkpointed model (`cvlab eval` of it agrees)."""

    priority = "VERY_HIGH"

    def before_val_epoch(self, runner) -> None:
        take_rank0_buffers(getattr(runner.model, "module", runner.model))


class MlflowRank0Hook(Hook):
    """Rank 0's MLflow logging through a metric logger
    (`orchestrator.tracking.metric_logger.MlflowMetricLogger` or anything with `logged_epochs()`, `log_epoch(step, metrics)` and `flush()`): params at start, losses and
    lr every `interval` iterations, validation metrics at each validation -- skipped when the run's history
    already has that step (a restarted worker group replays what followed its checkpoint), and queued while
    the tracking server is away. The checkpoints are logged by the driver at the end of the run."""

    priority = "BELOW_NORMAL"

    def __init__(self, epoch_logger, interval: int = 10, params: dict | None = None,
                 metric_names: Mapping[str, str] | None = None, param_prefix: str = "det"):
        self.epoch_logger = epoch_logger
        self.interval = max(1, interval)
        self.params = params or {}
        self.metric_names = dict(metric_names or {})
        self.param_prefix = param_prefix
        self._validated: set[int] = set()
        self._t0 = None

    def before_train(self, runner) -> None:
        if get_rank() != 0:
            return
        self._validated = set(self.epoch_logger.logged_epochs())
        p = self.param_prefix
        params = {f"{p}.world_size": runner.world_size,
                  f"{p}.num_params": sum(x.numel() for x in runner.model.parameters()), **self.params}
        lr = runner.optim_wrapper.get_lr().get("lr") if hasattr(runner.optim_wrapper, "get_lr") else None
        if lr:
            params[f"{p}.initial_lr"] = lr[0]
        log_params = getattr(self.epoch_logger, "log_params", None)
        if log_params is not None:
            log_params(params)
        if runner.iter > 0:  # restored from a checkpoint (after a failure, or --resume): say from where
            self.epoch_logger.log_epoch(runner.iter, {"train/resumed_from_iter": float(runner.iter)})
        self._t0 = time.time()

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if get_rank() != 0 or not self.every_n_train_iters(runner, self.interval):
            return
        metrics = {}
        for key, value in (outputs or {}).items():
            try:
                metrics[f"train/{key}"] = float(value)
            except (TypeError, ValueError):
                continue
        metrics["lr"] = float(runner.optim_wrapper.get_lr()["lr"][0])
        if by_epoch(runner):
            metrics["epoch"] = float(runner.epoch + 1)  # 1-based, as in the validation metrics
        self.epoch_logger.log_epoch(runner.iter + 1, _finite(metrics))

    def after_val_epoch(self, runner, metrics=None) -> None:
        step = val_step(runner)
        if get_rank() != 0 or step in self._validated:
            return
        self.epoch_logger.log_epoch(step, _finite(rename_metrics(metrics, self.metric_names)))
        self._validated.add(step)

    def after_run(self, runner) -> None:
        if get_rank() != 0:
            return
        if self._t0 is not None:
            self.epoch_logger.log_epoch(runner.iter, {"train_time_s": time.time() - self._t0})
        self.epoch_logger.flush()  # what waited while the tracking server was away


def _finite(metrics: Mapping[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}


class KillDrillHook(Hook):
    """`run.fault_kill_rank_at` for OpenMMLab runs: worker `rank` SIGKILLs itself once, before iteration
    `step` of epoch `epoch` (epoch-based loops) or before global iteration `step` (iteration-based loops),
    leaving `marker` behind so the restarted worker group goes on."""

    priority = "VERY_HIGH"

    def __init__(self, epoch: int, step: int, rank: int, marker: str):
        self.epoch, self.step, self.rank, self.marker = epoch, step, rank, marker

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        if get_rank() != self.rank or exists(self.marker):
            return
        here = (runner.epoch + 1, batch_idx + 1) if by_epoch(runner) else (self.epoch, runner.iter + 1)
        if here != (self.epoch, self.step):
            return
        write_text(self.marker, f"killed worker {self.rank} (pid {os.getpid()}) at epoch {here[0]} step {here[1]}\n")
        runner.logger.warning(f"fault drill: killing worker {self.rank} (pid {os.getpid()}) at epoch {here[0]}, "
                              f"step {here[1]}")
        os.kill(os.getpid(), signal.SIGKILL)


class FailOnceHook(Hook):
    """Fault injection for recovery tests and drills: rank 0 raises once, at the start of epoch
    `after_epoch + 1` (epoch-based loops) or of iteration `after_iter + 1`, leaving `marker` behind so the
    restarted worker group goes on. Use it through the config, e.g.
    `overrides: {custom_hooks: [{type: FailOnceHook, after_iter: 20, marker: /tmp/x}]}`.
    """

    def __init__(self, marker: str, after_epoch: int | None = None, after_iter: int | None = None):
        if (after_epoch is None) == (after_iter is None):
            raise ValueError("FailOnceHook: give exactly one of after_epoch and after_iter")
        self.after_epoch, self.after_iter, self.marker = after_epoch, after_iter, Path(marker)

    def _fail(self, what: str) -> None:
        self.marker.parent.mkdir(parents=True, exist_ok=True)
        self.marker.write_text(f"failed before {what}\n")
        raise RuntimeError(f"FailOnceHook: injected worker failure before {what}")

    def before_train_epoch(self, runner) -> None:
        if (self.after_epoch is not None and get_rank() == 0 and runner.epoch >= self.after_epoch
                and not self.marker.exists()):
            self._fail(f"epoch {runner.epoch + 1}")

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        if (self.after_iter is not None and get_rank() == 0 and runner.iter >= self.after_iter
                and not self.marker.exists()):
            self._fail(f"iteration {runner.iter + 1}")


# mmengine's root registry: `custom_hooks=[dict(type='FailOnceHook', ...)]` works in every scope.
register(HOOKS, RayTrainReportHook, MlflowRank0Hook, FailOnceHook, KillDrillHook)
