"""The typed, frozen config a classification worker receives (built by the driver from the experiment spec)."""
from __future__ import annotations

from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class OptimConfig:
    name: str = "sgd"  # "sgd" | "adamw"
    lr: float = 0.1
    scale_lr: bool = True
    base_batch_size: int = 256
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    label_smoothing: float = 0.1
    epochs: int = 130
    warmup_epochs: float = 0.0
    warmup_iters: int = 0
    min_lr: float = 0.0
    grad_clip: float | None = None
    skip_nonfinite_steps: int = 0
    ema_decay: float | None = None


@dataclass(frozen=True)
class FaultDrills:
    """Fault injection for reliability drills (`run.fault_*` in the spec); all off by default."""

    kill_at: tuple[int, int, int] | None = None  # (epoch, step, rank): that worker SIGKILLs itself once
    kill_marker: str | None = None  # file left behind so the restarted worker does not repeat the kill
    nan_at: tuple[int, int] | None = None  # (epoch, step): the loss turns NaN on every worker


@dataclass(frozen=True)
class TrainConfig:
    """Everything one classification worker needs; plain data, pickled to every Ray Train worker."""

    model_name: str
    data: DataPlan
    model_overrides: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    inputs: InputConfig = field(default_factory=InputConfig)  # image size, normalisation, grayscale
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # the paper recipe by default
    batch_size: int = 32  # per worker
    loader_workers: int = 4
    optim: OptimConfig = field(default_factory=OptimConfig)
    autocast: str = "fp32"  # "fp32" | "bf16" | "fp16" (GPU only)
    channels_last: bool = False
    checkpoint_every: int = 1  # epochs
    log_every: int = 10  # steps between progress lines
    faults: FaultDrills = field(default_factory=FaultDrills)
    fallback_checkpoints: tuple[str, ...] = ()  # older checkpoints (newest first) if the latest is unreadable
    epoch_logger: Any = None  # has logged_epochs() and log_epoch(epoch, metrics); used by rank 0 only
    system_metrics: Any = None  # has start(node_id) and stop(); run by each node's local rank 0
    verbosity: int = 0
