"""The Ray Train `TorchTrainer` of a job: scaling, failure and checkpoint configuration from the spec."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from orchestrator.errors import CvlabError
from orchestrator.names import RAY_SNAPSHOT_FILE
from orchestrator.runs.job import Job, RunContext
from orchestrator.runs.records import exists
from orchestrator.runs.storage import storage_join

# Bounds Ray Train's retries of controller failures (e.g. resources that never become available).
CONTROLLER_FAILURE_LIMIT = 3


def refuse_reused_folder(fs, storage: str, name: str) -> None:
    """A fresh run must not land in a folder with checkpoints: Ray Train would silently continue it."""
    folder = storage_join(storage, name)
    if exists(fs, storage_join(folder, RAY_SNAPSHOT_FILE)):
        raise CvlabError(f"run folder {folder} already holds checkpoints of an earlier run; "
                         "resume it (--resume) or choose another run.name")


def build_trainer(job: Job, ctx: RunContext, *, name: str, storage: str, fs=None,
                  callbacks: Sequence[Any] = ()):
    """A `TorchTrainer` running `job.worker()` with `job.worker_config(ctx)` in folder `<storage>/<name>`."""
    spec = job.spec
    use_gpu = spec.scaling.use_gpu
    return TorchTrainer(
        job.worker(),
        train_loop_config=job.worker_config(ctx),
        scaling_config=ScalingConfig(
            num_workers=spec.scaling.num_workers,  # an int, or (min, max): Ray Train's elastic group
            elastic_resize_monitor_interval_s=spec.scaling.resize_check_s,
            use_gpu=use_gpu,
            resources_per_worker=dict(spec.scaling.resources_per_worker) or None,
            placement_strategy=spec.scaling.placement_strategy,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(
                num_to_keep=spec.run.checkpoints_kept,
                # Ranked by the job's metric, so the best checkpoint survives; Ray always keeps the latest too.
                checkpoint_score_attribute=job.best_metric,
                checkpoint_score_order=job.best_mode,
            ),
            failure_config=FailureConfig(max_failures=spec.run.max_failures,
                                         controller_failure_limit=CONTROLLER_FAILURE_LIMIT),
            callbacks=list(callbacks) or None,
            # Ray Train's own progress lines (resources, checkpoints) only with -v.
            logging_config=LoggingConfig(log_level="INFO" if ctx.verbosity > 0 else "WARNING"),
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
    )


def best_and_last(result, metric: str, mode: str = "max"):
    """`(best_checkpoint, best_metrics, last_checkpoint)` of a Ray Train result (None checkpoints if none)."""
    last = result.checkpoint
    best, best_metrics = last, dict(result.metrics or {})
    sign = 1.0 if mode == "max" else -1.0
    worst = float("-inf")
    for ckpt, metrics in result.best_checkpoints or []:
        if sign * metrics.get(metric, sign * worst) > sign * best_metrics.get(metric, sign * worst):
            best, best_metrics = ckpt, dict(metrics)
    return best, best_metrics, last
