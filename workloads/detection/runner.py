"""The detection settings of the shared Ray Train worker: `worker_config(...)` makes the `MMWorkerConfig` that
the driver hands to `workloads.mmlab.worker.train_worker`."""
from __future__ import annotations

from workloads.mmlab.checkpoints import allow_mmengine_checkpoints, mmengine_safe_globals
from workloads.mmlab.worker_config import MMWorkerConfig

from . import METRIC_NAMES, SCOPE

__all__ = ["allow_mmengine_checkpoints", "mmengine_safe_globals", "worker_config"]


def worker_config(cfg: dict, **kwargs) -> MMWorkerConfig:
    """An `MMWorkerConfig` for a detection config dict (scope 'mmdet', COCO metric names)."""
    return MMWorkerConfig(cfg=cfg, scope=SCOPE, metric_names=METRIC_NAMES, **kwargs)
