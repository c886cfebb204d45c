"""mmengine hooks that connect a Runner (mmdet or mmseg) to Ray Train and MLflow.

Both epoch-based loops (mmdet: metrics per epoch) and iteration-based loops (mmseg: `runner.epoch` stays 0)
are served: a validation is reported with `iter` (and `epoch` for epoch-based loops), and MLflow steps are
epochs or iterations accordingly.

- `RayTrainReportHook` (every rank): after each validation, `ray.train.report(metrics, checkpoint)`; rank 0
  attaches the mmengine checkpoint written for that validation (the other ranks report metrics only).
- `MlflowRank0Hook` (rank 0): params at start, losses and lr every `interval` iterations, validation metrics
  and the last checkpoint at the end, straight through `MlflowClient(tracking_uri)` (mmengine's own MLflow
  backend breaks on MLflow >= 3.13).
- `PreemptionCheckpointHook` (every rank): a checkpoint at the next iteration after Ray Train's preemption
  notice, and the run's position and worker counts in mmengine's message hub (so in every checkpoint).
- `FailOnceHook`, `KillDrillHook`: fault injection for recovery tests and drills.
Validation metric names come from the workload (`metric_names`); others become `val/<last part of key>`.
"""
from __future__ import annotations

import math
import os
import shutil
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
from workloads.fault_drill import kill_self
from workloads.mid_epoch import MID_EPOCH_KEY, UNRANKED_SCORE, PreemptionWatch
from workloads.object_storage import exists

from .loops import ResumableEpochBasedTrainLoop
from .registration import register

# What the run keeps in mmengine's message hub, which every mmengine checkpoint saves and a resume restores.
EPOCH_SAMPLES_DONE = "cvlab/epoch_samples_done"  # positions of this epoch's permutation trained (epoch loops)
WORLD_SIZE = "cvlab/world_size"  # the worker count that trained up to the checkpoint
RESIZES = "cvlab/resizes"  # restarts at another worker count, over the run
PREEMPTION_CHECKPOINTS = "cvlab/preemption_checkpoints"  # checkpoints written on a preemption notice


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


def batch_size(loader) -> int:
    """Images per batch of one worker: the DataLoader's, or its batch sampler's (mmdet's
    `AspectRatioBatchSampler`)."""
    return loader.batch_size or loader.batch_sampler.batch_size


def latest_checkpoint(work_dir) -> Path | None:
    """The file named in mmengine's `last_checkpoint` marker (written by CheckpointHook on rank 0)."""
    marker = Path(work_dir) / "last_checkpoint"
    if not marker.is_file():
        return None
    path = Path(marker.read_text().strip())
    return path if path.is_file() else None


class RayTrainReportHook(Hook):
    """Every rank: the metrics of each validation to Ray Train, rank 0 with the checkpoint written for it."""

    priority = "LOW"  # after mmengine's own hooks (CheckpointHook is VERY_LOW)

    def __init__(self, metric_names: Mapping[str, str] | None = None, storage_retry_limit_s: float = 300.0,
                 score_metric: str | None = None):
        self.metric_names = dict(metric_names or {})
        self.storage_retry_limit_s = storage_retry_limit_s
        self.score_metric = score_metric
        self._reported: Path | None = None

    def after_val_epoch(self, runner, metrics=None) -> None:
        counters = {"epoch": runner.epoch, "iter": runner.iter} if by_epoch(runner) else {"iter": runner.iter}
        report = {**counters, **rename_metrics(metrics, self.metric_names)}
        if self.score_metric and self.score_metric not in report:
            # No score (mmdet's COCO metric gives none when the model found nothing): Ray ranks checkpoints by
            # it and would refuse the report.
            report[self.score_metric] = UNRANKED_SCORE
        ckpt = latest_checkpoint(runner.work_dir) if get_rank() == 0 else None
        if ckpt == self._reported:
            ckpt = None
        report_file(report, ckpt, self.storage_retry_limit_s)
        if ckpt is not None:
            self._reported = ckpt


def report_file(report: dict, ckpt: Path | None, storage_retry_limit_s: float) -> None:
    """`ray.train.report(report)`, with the mmengine checkpoint file `ckpt` (rank 0) or without (None)."""
    if ckpt is None:
        ray.train.report(report)
        return
    # Ray copies the directory into the run's storage; a hard link avoids a local copy.
    tmp = Path(tempfile.mkdtemp(prefix="cvlab-mm-ckpt-"))
    try:
        try:
            os.link(ckpt, tmp / ckpt.name)
        except OSError:
            shutil.copy2(ckpt, tmp / ckpt.name)
        report_with_retries(report, ray.train.Checkpoint.from_directory(str(tmp)), storage_retry_limit_s)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class PreemptionCheckpointHook(Hook):
    """Every rank. After each training iteration: asks Ray Train for a preemption notice (a collective, so at
    the same iteration on every rank); on a new one rank 0 writes an mmengine checkpoint of that iteration and
    every rank reports (rank 0 with the checkpoint, scored `UNRANKED_SCORE` for `score_metric`). When the node
    goes, Ray Train restarts the group from it, with the workers left when the worker count is a range.

    It also keeps the run's position inside the epoch and its worker counts in the message hub, and before
    training on a resumed run counts a resize and tells a `ResumableEpochBasedTrainLoop` how many batches of
    the resumed epoch were trained (iteration loops resume at their iteration by themselves)."""

    priority = "HIGH"

    def __init__(self, score_metric: str, storage_retry_limit_s: float = 300.0):
        self.score_metric, self.storage_retry_limit_s = score_metric, storage_retry_limit_s
        self.watch = PreemptionWatch()

    def before_train(self, runner) -> None:
        hub, world = runner.message_hub, runner.world_size
        before = hub.get_info(WORLD_SIZE)
        if before is not None and before != world:
            hub.update_info(RESIZES, hub.get_info(RESIZES, 0) + 1)
            runner.logger.info(f"the worker group was resized: {before} -> {world} workers")
        hub.update_info(WORLD_SIZE, world)
        done = hub.get_info(EPOCH_SAMPLES_DONE, 0)
        if not done or not by_epoch(runner):
            return
        loop = runner.train_loop
        if not isinstance(loop, ResumableEpochBasedTrainLoop):
            runner.logger.warning(f"{type(loop).__name__} cannot resume inside an epoch: epoch "
                                  f"{runner.epoch + 1} restarts from its first batch")
            return
        loop.skip_batches = done // (batch_size(runner.train_dataloader) * world)
        runner.logger.info(f"resuming inside epoch {runner.epoch + 1}: {done} images of it were trained, "
                           f"{loop.skip_batches} batches of {world} worker(s) left out")

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        hub = runner.message_hub
        if by_epoch(runner):
            hub.update_info(EPOCH_SAMPLES_DONE,
                            (batch_idx + 1) * batch_size(runner.train_dataloader) * runner.world_size)
        notice = self.watch.check()
        if notice is None:
            return
        done = runner.iter + 1  # mmengine counts this iteration after the hooks
        hub.update_info(PREEMPTION_CHECKPOINTS, hub.get_info(PREEMPTION_CHECKPOINTS, 0) + 1)
        runner.logger.warning(f"{notice}: checkpointing after iteration {done}")
        ckpt = None
        if get_rank() == 0:
            name = f"iter_{done}.pth"
            runner.save_checkpoint(runner.work_dir, name, by_epoch=False)  # meta: epoch done, iter `done`
            ckpt = Path(runner.work_dir) / name
        report_file({MID_EPOCH_KEY: 1.0, "iter": done, self.score_metric: UNRANKED_SCORE}, ckpt,
                    self.storage_retry_limit_s)

    def after_train_epoch(self, runner) -> None:
        runner.message_hub.update_info(EPOCH_SAMPLES_DONE, 0)  # before CheckpointHook (VERY_LOW) saves


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
    lr every `interval` iterations, validation metrics (with the worker count, resizes and preemption
    checkpoints so far) at each validation -- skipped when the run's history
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
        hub = runner.message_hub
        counts = {"train/world_size": float(runner.world_size),
                  "train/resizes": float(hub.get_info(RESIZES, 0)),
                  "train/preemption_checkpoints": float(hub.get_info(PREEMPTION_CHECKPOINTS, 0))}
        self.epoch_logger.log_epoch(step, _finite({**rename_metrics(metrics, self.metric_names), **counts}))
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
    """`run.fault_kill_rank_at` for OpenMMLab runs: worker `rank` fires the drill
    (`workloads.fault_drill.kill_self`) once, before iteration `step` of epoch `epoch` (epoch-based loops) or
    before global iteration `step` (iteration-based loops)."""

    priority = "VERY_HIGH"

    def __init__(self, epoch: int, step: int, rank: int, marker: str, signal_name: str = "KILL"):
        self.epoch, self.step, self.rank, self.marker = epoch, step, rank, marker
        self.signal_name = signal_name

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        if get_rank() != self.rank or exists(self.marker):
            return
        here = (runner.epoch + 1, batch_idx + 1) if by_epoch(runner) else (self.epoch, runner.iter + 1)
        if here != (self.epoch, self.step):
            return
        kill_self(self.signal_name, self.marker, self.rank, *here, warn=runner.logger.warning)


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
register(HOOKS, RayTrainReportHook, MlflowRank0Hook, PreemptionCheckpointHook, FailOnceHook, KillDrillHook)
