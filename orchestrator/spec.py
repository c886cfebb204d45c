"""The experiment spec: the pydantic schema of an experiment YAML file.

This module holds the schema (the contract every other part reads). Loading a file with `_base_`
inheritance, `--set` overrides and friendly error messages lives in `orchestrator.spec_loader`.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator


class _Section(BaseModel):
    # Unknown keys are errors (the loader turns them into "did you mean" messages).
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ExperimentSection(_Section):
    name: str = "default"
    tags: dict[str, str] = Field(default_factory=dict)
    seed: int = 0

    @field_validator("tags", mode="before")
    @classmethod
    def _scalar_tags_to_str(cls, value: Any) -> Any:
        # `tags: {version: 2}` is meant as the string "2" (MLflow tags are strings).
        if isinstance(value, dict):
            return {k: str(v) if isinstance(v, (int, float)) else v for k, v in value.items()}
        return value


class ModelSection(_Section):
    """`name` is a registry name (`cednet50`, ...); every other key is a constructor override."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    name: str = "cednet26"

    @property
    def overrides(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class DataSection(_Section):
    root: str = "data/tiny-imagenet"
    # When set and `root` does not exist, the loader generates the embedded dataset there first.
    generate: bool = False
    num_classes_generated: int = 10
    per_class_generated: int = 60
    generated_size: int = 64
    image_size: int = 224
    val_resize: int | None = None  # default: image_size / 0.875
    batch_size: int = 32  # per worker
    num_workers: int = 4  # data-loader processes per Ray worker


class OptimSection(_Section):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1
    # When true, lr is for `base_batch_size` and is scaled linearly to the global batch.
    scale_lr: bool = True
    base_batch_size: int = 256
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    label_smoothing: float = 0.1
    epochs: int = 130
    warmup_epochs: float = 0.0
    warmup_iters: int = 0  # wins over warmup_epochs when > 0
    min_lr: float = 0.0
    grad_clip: float | None = None
    # A NaN/inf training loss fails the run (naming epoch and step). With N > 0 such a step is skipped
    # instead (no update; counted in metric train/skipped_steps) up to N times per run, then it fails.
    skip_nonfinite_steps: int = Field(0, ge=0)


class PrecisionSection(_Section):
    autocast: Literal["fp32", "bf16", "fp16"] = "fp32"
    channels_last: bool = False


class ScalingSection(_Section):
    num_workers: int = 1
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = Field(default_factory=dict)


class RunSection(_Section):
    storage_path: str = "runs"
    name: str | None = None  # Ray Train run name; default: experiment name
    checkpoint_every: int = 1  # epochs
    checkpoints_kept: int = 2
    max_failures: int = 0
    log_every: int = 10  # steps between progress lines
    # Fault-injection drill (reliability testing only): `{epoch: E, step: S, rank: R}` makes worker R
    # (default 0) SIGKILL itself once at step S of epoch E; a marker file in the Ray Train run folder keeps
    # the restarted worker from repeating it. Combine with max_failures >= 1 to watch the run recover.
    # Local run storage only.
    fault_kill_rank_at: dict[str, int] | None = None
    # Drill for the non-finite loss guard: `{epoch: E, step: S}` turns the training loss of that step NaN
    # on every worker (see optim.skip_nonfinite_steps).
    fault_nan_loss_at: dict[str, int] | None = None


class TrackingSection(_Section):
    # Explicit URI; else MLFLOW_TRACKING_URI; else sqlite:///mlflow.db with ./mlartifacts.
    tracking_uri: str | None = None
    experiment_name: str | None = None  # default: experiment.name
    register_model: str | None = None
    log_model: bool = True


class SearchSection(_Section):
    """Ray Tune search (used by `cvlab tune`)."""

    space: dict[str, dict[str, Any]] = Field(default_factory=dict)
    metric: str = "val/top1"
    mode: Literal["max", "min"] = "max"
    num_samples: int = 1
    scheduler: Literal["fifo", "asha"] = "fifo"
    max_t: int | None = None
    grace_period: int = 1
    reduction_factor: float = 2.0
    max_concurrent_trials: int | None = None
    resources_per_trial: dict[str, float] = Field(default_factory=dict)


class DetectionSection(_Section):
    """mmdet workload (used when `workload: detection`)."""

    config: str = ""  # an mmdet config file (path, or one under workloads/detection/configs)
    data_root: str = "data/tiny-coco"
    generate: bool = False
    classes: list[str] | None = None
    batch_size: int = 2  # per worker
    max_epochs: int = 12
    val_interval: int = 1
    overrides: dict[str, Any] = Field(default_factory=dict)  # dotted mmengine cfg keys
    # Added by the detection workload (issue 6):
    pretrained: str | None = None  # one of our ImageNet checkpoints for the backbone (init_cfg)
    image_scale: list[int] | None = None  # [w, h] for the Resize of train and test pipelines
    num_train_generated: int = 32  # images written when `generate` is set and data_root is missing
    num_val_generated: int = 8
    generated_size: int = 128
    auto_scale_lr: bool = True  # scale the config's lr from its base batch (16) to the global batch
    warmup_iters: int | None = None  # replaces the end of the config's linear warm-up
    num_data_workers: int = 2  # data-loader processes per Ray worker (0: load in the worker)


class ExperimentSpec(_Section):
    experiment: ExperimentSection = Field(default_factory=ExperimentSection)
    workload: Literal["classification", "detection"] = "classification"
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    precision: PrecisionSection = Field(default_factory=PrecisionSection)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    run: RunSection = Field(default_factory=RunSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    search: SearchSection | None = None
    detection: DetectionSection | None = None

    # The files (and override sources) this spec was built from, in merge order; set by the loader.
    _sources: list[str] = PrivateAttr(default_factory=list)

    @property
    def sources(self) -> list[str]:
        return list(self._sources)
