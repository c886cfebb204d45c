"""The typed, frozen configuration a Ray Train worker of an OpenMMLab workload receives (no heavy imports)."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Registry scope -> prefix of the worker's own MLflow params ("det.world_size", "seg.num_params", ...).
SCOPES = {"mmdet": "det", "mmseg": "seg"}
SYNC_BN_MODES = ("auto", "on", "off")  # see workloads.mmlab.norm


@dataclass(frozen=True)
class MMWorkerConfig:
    """What `workloads.mmlab.worker.train_worker` needs.

    cfg: the final mmengine config as a plain dict (`Config.to_dict()`), built and checked on the driver.
    scope: the registry scope of the config, 'mmdet' or 'mmseg'.
    run_id: names the work dirs (the MLflow run id).
    epoch_logger: what rank 0 logs metrics through (`logged_epochs()`, `log_epoch(step, metrics)`, `flush()`,
      `log_params(params)`); None: no MLflow logging. system_metrics: has `start(node_id)` / `stop()`, or None.
    log_every: iterations between loss points in MLflow. params: extra MLflow params logged by rank 0.
    threads: torch threads per worker (0: torch's default).
    sync_bn: 'auto' (SyncBN on GPU, plain BN on CPU), 'on' (synchronised on CPU too), 'off'.
    metric_names: evaluator key -> reported name (e.g. {'mIoU': 'val/mIoU'}); others become `val/<key>`.
    work_root: where each rank's mmengine work_dir goes (`<work_root>/<run_id>/rank<r>`); None: the temp dir.
    kill_at / kill_marker / kill_signal: the `run.fault_kill_rank_at` drill (see `hooks.KillDrillHook`).
    score_metric: the reported metric Ray ranks checkpoints by (a preemption checkpoint reports it as unranked).
    storage_retry_limit_s: how long checkpoint uploads and downloads ride out an outage (`run.storage_retry_limit_s`).
    verbosity: the driver's (`workloads.logs`): -1 quiet, 0 progress, 1 debug and Ray's chatter.
    eval_state_dict: the model weights to evaluate (`cvlab eval`): the workers validate them once on their
      shards of the val split instead of training, and report the metrics as `eval/<name>`. They travel in
      the config (Ray's object store), so workers on other nodes need no shared file system.
    """

    cfg: dict[str, Any]
    scope: str
    run_id: str
    epoch_logger: Any = None
    system_metrics: Any = None
    log_every: int = 10
    params: Mapping[str, Any] = field(default_factory=dict)
    threads: int = 0
    sync_bn: str = "auto"
    metric_names: Mapping[str, str] = field(default_factory=dict)
    work_root: str | None = None
    kill_at: tuple[int, int, int] | None = None  # fault drill: (epoch, step, rank)
    kill_marker: str | None = None  # a local path or bucket URI
    kill_signal: str = "KILL"  # KILL or TERM
    score_metric: str = "val/score"
    verbosity: int = 0
    storage_retry_limit_s: float = 300.0
    eval_state_dict: Mapping[str, Any] | None = None

    def __post_init__(self):
        if self.scope not in SCOPES:
            raise ValueError(f"scope={self.scope!r}: expected one of {sorted(SCOPES)}")
        if self.sync_bn not in SYNC_BN_MODES:
            raise ValueError(f"sync_bn={self.sync_bn!r}: expected one of {SYNC_BN_MODES}")
        if not isinstance(self.cfg, Mapping) or "model" not in self.cfg:
            raise ValueError("cfg must be an mmengine config as a dict (Config.to_dict()) with a 'model'")
        if not self.run_id:
            raise ValueError("run_id must be a non-empty string (it names the work dir and the MLflow run)")
        if self.log_every < 1 or self.threads < 0:
            raise ValueError(f"log_every={self.log_every} must be >= 1 and threads={self.threads} >= 0")

    @property
    def param_prefix(self) -> str:
        return SCOPES[self.scope]
