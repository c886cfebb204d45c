"""The typed, frozen config a classification worker receives (built by the driver from the experiment spec)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from workloads.classification.recipe import AugmentConfig, InputConfig


@dataclass(frozen=True)
class DataPlan:
    """What the driver found in the data folder: the split folders, the classes, the files to skip."""

    train_dir: str
    val_dir: str
    classes: tuple[str, ...]
    train_skip: tuple[str, ...] = ()  # paths relative to the split folder, found unreadable on the driver
    val_skip: tuple[str, ...] = ()
    train_images: int = 0
    val_images: int = 0

    @property
    def skipped(self) -> int:
        return len(self.train_skip) + len(self.val_skip)

    @property
    def where(self) -> str:
        return self.train_dir


@dataclass(frozen=True)
class ShardPlan:
    """What the driver found in a shard set's manifest (`shard_manifest`): where it is, the classes, the shards
    of each split; `skipped`: the images the set left out as unreadable when it was written."""

    location: str  # a local folder or s3://bucket/prefix
    classes: tuple[str, ...]
    train_shards: tuple[dict, ...]
    val_shards: tuple[dict, ...]
    train_images: int
    val_images: int
    skipped: int = 0
    retry_limit_s: float = 300.0  # how long reads ride out an unreachable bucket (run.storage_retry_limit_s)

    @property
    def where(self) -> str:
        return self.location


@dataclass(frozen=True)
class OptimConfig:
    """`optim.*` (see the schema, `orchestrator.config.schema.OptimSection`)."""

    name: str  # "sgd" | "adamw"
    lr: float
    scale_lr: bool
    base_batch_size: int
    momentum: float
    nesterov: bool
    weight_decay: float
    betas: tuple[float, float]
    label_smoothing: float
    epochs: int
    warmup_epochs: float
    warmup_iters: int
    min_lr: float
    grad_clip: float | None
    skip_nonfinite_steps: int
    ema_decay: float | None


@dataclass(frozen=True)
class FaultDrills:
    """Fault injection for reliability drills (`run.fault_*` in the spec); None = off."""

    kill_at: tuple[int, int, int] | None  # (epoch, step, rank): that worker signals itself once
    kill_marker: str | None  # file left behind so the restarted worker does not repeat the kill
    nan_at: tuple[int, int] | None  # (epoch, step): the loss turns NaN on every worker
    kill_signal: str = "KILL"  # the signal of the kill drill: KILL or TERM


@dataclass(frozen=True)
class StepExact:
    """The step-exact order (`workloads.classification.step_order`) of an elastic or step-checkpointed run."""

    slots: int  # micro-batches per optimizer step: the worker range's max (the global batch is theirs)
    checkpoint_every_steps: int | None  # a checkpoint inside epochs every that many optimizer steps


@dataclass(frozen=True)
class TrainConfig:
    """Everything one classification worker needs; plain data, pickled to every Ray Train worker. Built by the
    job (`orchestrator.jobs.classification`) from the validated spec, which holds every default."""

    model_name: str
    data: DataPlan | ShardPlan
    model_overrides: dict[str, Any]  # num_classes included: the worker builds the model with exactly these
    seed: int
    inputs: InputConfig  # image size, normalisation, grayscale
    augment: AugmentConfig
    batch_size: int  # per worker
    loader_workers: int
    optim: OptimConfig
    autocast: str  # "fp32" | "bf16" | "fp16" (GPU only)
    channels_last: bool
    checkpoint_every: int  # epochs
    log_every: int  # steps between progress lines
    faults: FaultDrills
    fallback_checkpoints: tuple[str, ...] = ()  # older checkpoints (newest first) if the latest is unreadable
    epoch_logger: Any = None  # has logged_epochs() and log_epoch(epoch, metrics); used by rank 0 only
    system_metrics: Any = None  # has start(node_id) and stop(); run by each node's local rank 0
    verbosity: int = 0
    storage_retry_limit_s: float = 300.0  # checkpoint uploads and downloads ride out an outage this long
    step_exact: StepExact | None = None  # None: each worker's DistributedSampler share, checkpoints at epoch ends
