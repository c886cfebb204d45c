# ruff: noqa: C408  (mmengine configs are written as dict(...))
"""The Ray Train worker: one mmengine `Runner` per worker, inside the process group Ray set up.

Ray's `TorchTrainer` has already called `torch.distributed.init_process_group` (gloo on CPU, nccl on GPU)
before `train_worker` runs. mmengine's Runner only calls `init_dist` when `launcher != 'none'` *and* no
default group exists (`Runner.setup_env`), so with `launcher='pytorch'` it adopts Ray's group: ranks come from
`mmengine.dist.get_dist_info()`, samplers shard by them, and the model is wrapped for DDP (with the BN
policy of `norm`). `launcher='none'` would make every worker train alone on the full data.

    TorchTrainer(train_worker, train_loop_config=MMWorkerConfig(cfg=cfg.to_dict(), scope='mmseg', ...), ...)
"""
from __future__ import annotations

import importlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import ray.train
import torch
from mmengine.config import Config
from mmengine.runner import Runner

from workloads.checkpoint_transfer import opened
from workloads.distributed import in_group
from workloads.eval_report import report_evaluation
from workloads.runtime import start_worker

from .checkpoints import allow_mmengine_checkpoints
from .hooks import (
    KillDrillHook,
    MlflowRank0Hook,
    PreemptionCheckpointHook,
    Rank0BuffersHook,
    RayTrainReportHook,
    rename_metrics,
)
from .loops import resumable_inside_epochs
from .norm import norm_for
from .worker_config import MMWorkerConfig

log = logging.getLogger(__name__)


def _restore_checkpoint(work_dir: Path, storage_retry_limit_s: float) -> Path | None:
    """Copy the checkpoint Ray hands a restarted (or resumed) run into work_dir; return its path."""
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with opened(ckpt, storage_retry_limit_s) as d:
        files = sorted(Path(d).glob("*.pth"))
        if not files:
            return None
        dst = work_dir / files[-1].name
        if not dst.exists():
            shutil.copy2(files[-1], dst)
    return dst


def import_custom_modules(cfg) -> None:
    """Import the config's `custom_imports` in this process (a config dict does not import them itself)."""
    for name in (cfg.get("custom_imports") or {}).get("imports", []):
        importlib.import_module(name)


def train_worker(config: MMWorkerConfig) -> None:
    """`train_loop_per_worker` of an OpenMMLab TorchTrainer."""
    if not isinstance(config, MMWorkerConfig):
        raise TypeError(f"train_worker expects an MMWorkerConfig, got {type(config).__name__}")
    runtime = start_worker(config.verbosity)  # mmengine runs the model itself: no autocast or layout here
    if config.threads:
        torch.set_num_threads(config.threads)
    os.environ.setdefault("LOCAL_RANK", str(runtime.local_rank))

    cfg = Config(dict(config.cfg))
    import_custom_modules(cfg)
    cfg.default_scope = cfg.get("default_scope") or config.scope
    if config.verbosity < 0:
        cfg.log_level = "WARNING"  # mmengine's own logger (rank 0 prints; the others only errors)
    # Each node writes its own logs; checkpoints are written by rank 0 only (mmengine master_only).
    root = Path(config.work_root or Path(tempfile.gettempdir()) / f"cvlab-{config.param_prefix}")
    work_dir = root / config.run_id / f"rank{runtime.rank}"
    work_dir.mkdir(parents=True, exist_ok=True)
    cfg.work_dir = str(work_dir)

    device = runtime.device
    if runtime.is_cuda:  # mmengine moves the model to the current CUDA device
        torch.cuda.set_device(device)
    distributed = runtime.world > 1 and in_group()
    cfg.launcher = "pytorch" if distributed else "none"
    if distributed:
        cfg.model_wrapper_cfg = dict(
            type="NormDistributedDataParallel",
            norm=norm_for(config.sync_bn, device.type, distributed),
            # DDP on CPU takes no device ids; on GPU the device Ray assigned to this worker.
            device_ids=[device.index] if runtime.is_cuda else None,
            broadcast_buffers=False,
            find_unused_parameters=bool(cfg.get("find_unused_parameters", False)),
        )

    if config.eval_state_dict is not None:
        _evaluate(cfg, config, work_dir, runtime.rank)
        return

    resume_from = _restore_checkpoint(work_dir, config.storage_retry_limit_s)
    if resume_from is not None:
        cfg.resume = True
        cfg.load_from = str(resume_from)
        log.info("rank %d: resuming from %s", runtime.rank, resume_from.name)

    cfg.train_cfg = resumable_inside_epochs(cfg.train_cfg)  # so that a preemption checkpoint resumes at its batch
    runner = Runner.from_cfg(cfg)
    runner.register_hook(Rank0BuffersHook())
    runner.register_hook(RayTrainReportHook(config.metric_names, config.storage_retry_limit_s, config.score_metric))
    runner.register_hook(PreemptionCheckpointHook(config.score_metric, config.storage_retry_limit_s))
    if config.epoch_logger is not None and runtime.rank == 0:
        runner.register_hook(MlflowRank0Hook(config.epoch_logger, interval=config.log_every,
                                             params=dict(config.params), metric_names=config.metric_names,
                                             param_prefix=config.param_prefix))
    if config.kill_at is not None and config.kill_marker:
        runner.register_hook(KillDrillHook(*config.kill_at, marker=config.kill_marker,
                                           signal_name=config.kill_signal))
    with runtime.recording_system_metrics(config.system_metrics), allow_mmengine_checkpoints():
        runner.train()


def _evaluate(cfg, config: MMWorkerConfig, work_dir: Path, rank: int) -> None:
    """`cvlab eval`: validate the given weights once. mmengine's evaluator gathers every rank's predictions on
    rank 0 and computes the metric over the whole split (COCO evaluation, IoU), then gives all ranks the result."""
    weights = work_dir / "eval_weights.pth"
    torch.save({"state_dict": dict(config.eval_state_dict), "meta": {}}, weights)
    cfg.load_from, cfg.resume = str(weights), False
    runner = Runner.from_cfg(cfg)
    with allow_mmengine_checkpoints():
        metrics = runner.val()
    named = rename_metrics(metrics, config.metric_names)
    report_evaluation({"eval/" + k.split("/", 1)[-1]: v for k, v in named.items()}, rank)
