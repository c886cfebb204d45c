"""mmengine hooks that connect an mmdet Runner to Ray Train and MLflow.

- `RayTrainReportHook` (every rank): after each validation, `ray.train.report(metrics, checkpoint)`; rank 0
  attaches the mmengine checkpoint written for that epoch (the other ranks report metrics only).
- `MlflowRank0Hook` (rank 0): params at start, losses and lr every `interval` iterations, validation metrics
  per epoch and the last checkpoint at the end, straight through `MlflowClient(tracking_uri)` (mmengine's
  own MLflow backend breaks on MLflow >= 3.13).
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from pathlib import Path

from mmengine.dist import get_rank
from mmengine.hooks import Hook

# CocoMetric key -> reported name.
METRIC_NAMES = {
    "coco/bbox_mAP": "val/bbox_mAP",
    "coco/bbox_mAP_50": "val/bbox_mAP50",
    "coco/bbox_mAP_75": "val/bbox_mAP75",
    "coco/bbox_mAP_s": "val/bbox_mAP_s",
    "coco/bbox_mAP_m": "val/bbox_mAP_m",
    "coco/bbox_mAP_l": "val/bbox_mAP_l",
    "coco/segm_mAP": "val/segm_mAP",
    "coco/segm_mAP_50": "val/segm_mAP50",
    "coco/segm_mAP_75": "val/segm_mAP75",
}


def rename_metrics(metrics: dict) -> dict[str, float]:
    out = {}
    for key, value in (metrics or {}).items():
        try:
            value = float(value)
        except (TypeError, ValueError):
            continue
        # COCOeval writes -1 for "no objects of this size": not a score, left out.
        if math.isfinite(value) and not (value == -1.0 and key.startswith("coco/")):
            out[METRIC_NAMES.get(key, "val/" + key.split("/")[-1])] = value
    return out


def latest_checkpoint(work_dir) -> Path | None:
    """The file named in mmengine's `last_checkpoint` marker (written by CheckpointHook on rank 0)."""
    marker = Path(work_dir) / "last_checkpoint"
    if not marker.is_file():
        return None
    path = Path(marker.read_text().strip())
    return path if path.is_file() else None


class RayTrainReportHook(Hook):
    priority = "LOW"  # after mmengine's own hooks (CheckpointHook is VERY_LOW on train epochs only)

    def __init__(self):
        self._reported: Path | None = None
        self.last_metrics: dict = {}

    def after_val_epoch(self, runner, metrics=None) -> None:
        import ray.train

        report = {"epoch": runner.epoch, "iter": runner.iter, **rename_metrics(metrics)}
        self.last_metrics = report
        ckpt = latest_checkpoint(runner.work_dir) if get_rank() == 0 else None
        if ckpt is None or ckpt == self._reported:
            ray.train.report(report)
            return
        # Ray copies the directory into the run's storage; a hard link avoids a local copy.
        tmp = Path(tempfile.mkdtemp(prefix="cvlab-det-ckpt-"))
        try:
            try:
                os.link(ckpt, tmp / ckpt.name)
            except OSError:
                shutil.copy2(ckpt, tmp / ckpt.name)
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)))
            self._reported = ckpt
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


class MlflowRank0Hook(Hook):
    priority = "BELOW_NORMAL"

    def __init__(self, tracking_uri: str, run_id: str, interval: int = 10, log_model: bool = True,
                 params: dict | None = None):
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self.interval = max(1, interval)
        self.log_model = log_model
        self.params = params or {}
        self._client = None
        self._t0 = None

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def _log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(float(v))]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def before_train(self, runner) -> None:
        if get_rank() != 0:
            return
        from mlflow.entities import Param

        n_params = sum(p.numel() for p in runner.model.parameters())
        params = {"det.world_size": runner.world_size, "det.num_params": n_params,
                  "det.work_dir": runner.work_dir, **self.params}
        lr = runner.optim_wrapper.get_lr().get("lr") if hasattr(runner.optim_wrapper, "get_lr") else None
        if lr:
            params["det.initial_lr"] = lr[0]
        try:
            self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in params.items()])
        except Exception as err:  # noqa: BLE001 - a resumed run re-logs params; a changed value must not kill training
            runner.logger.warning(f"MLflow params not logged: {err}")
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
        metrics["epoch"] = float(runner.epoch + 1)  # 1-based, as in the validation metrics
        self._log(metrics, runner.iter + 1)

    def after_val_epoch(self, runner, metrics=None) -> None:
        if get_rank() != 0:
            return
        self._log(rename_metrics(metrics), runner.epoch)

    def after_run(self, runner) -> None:
        if get_rank() != 0 or not self.log_model:
            return
        ckpt = latest_checkpoint(runner.work_dir)
        if ckpt is not None:
            self.client.log_artifact(self.run_id, str(ckpt), artifact_path="checkpoints")
        if self._t0 is not None:
            self._log({"train_time_s": time.time() - self._t0}, runner.iter)


class FailOnceHook(Hook):
    """Fault injection for recovery tests and drills: rank 0 raises once at the start of epoch
    `after_epoch + 1`, leaving `marker` behind so the restarted worker group goes on. Use it through the
    config, e.g. `detection.overrides: {custom_hooks: [{type: FailOnceHook, after_epoch: 1, marker: /tmp/x}]}`.
    """

    def __init__(self, after_epoch: int, marker: str):
        self.after_epoch, self.marker = after_epoch, Path(marker)

    def before_train_epoch(self, runner) -> None:
        if get_rank() == 0 and runner.epoch >= self.after_epoch and not self.marker.exists():
            self.marker.parent.mkdir(parents=True, exist_ok=True)
            self.marker.write_text(f"failed at epoch {runner.epoch + 1}\n")
            raise RuntimeError(f"FailOnceHook: injected worker failure before epoch {runner.epoch + 1}")


def _register() -> None:
    from mmdet.registry import HOOKS

    for hook in (RayTrainReportHook, MlflowRank0Hook, FailOnceHook):
        if hook.__name__ not in HOOKS.module_dict:
            HOOKS.register_module(module=hook)


_register()
