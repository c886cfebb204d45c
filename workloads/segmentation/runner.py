"""The segmentation entry point of the shared Ray Train worker (`workloads.mmlab.worker`).

    TorchTrainer(train_worker, train_loop_config=worker_config(cfg.to_dict(), run_id=..., sync_bn=...), ...)
"""
from __future__ import annotations

from workloads.mmlab.worker import train_worker
from workloads.mmlab.worker_config import MMWorkerConfig

from . import METRIC_NAMES, SCOPE

__all__ = ["train_worker", "worker_config"]


def worker_config(cfg: dict, **kwargs) -> MMWorkerConfig:
    """An `MMWorkerConfig` for a segmentation config dict (scope 'mmseg', mIoU / mAcc / aAcc names)."""
    return MMWorkerConfig(cfg=cfg, scope=SCOPE, metric_names=METRIC_NAMES, **kwargs)
