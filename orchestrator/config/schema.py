"""The experiment spec: the pydantic schema of an experiment YAML file, and the one validator of its values.

Every range and cross-field rule lives here as a pydantic constraint, so `cvlab validate`, `run`, `tune`,
`eval` and `submit` reject a bad value before anything is created. Loading a file (`_base_` inheritance,
`--set` overrides, messages naming file and line) lives in `orchestrator.config.loader`.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)

# Every model family downsamples by 32 (stem 4 x three strided stages), so a smaller input has no pixels
# left in the last stage. Kept here as a number: the schema must not import torch.
MODEL_TOTAL_STRIDE = 32
WORKLOADS = ("classification", "detection", "segmentation")
DEFAULT_MODEL = "cednet26"
# `data.augment.auto_augment: trivialaugment` selects torchvision's TrivialAugmentWide (timm 1.0 has no such
# policy string); the classification worker's transforms know the same name.
TRIVIAL_AUGMENT = "trivialaugment"


def _not_bool(value: Any) -> Any:
    # pydantic's lax mode reads `true` as 1; a boolean where a number belongs is always a mistake.
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    return value


_NoBool = BeforeValidator(_not_bool)
Int = Annotated[int, _NoBool]
PosInt = Annotated[int, _NoBool, Field(ge=1)]
NonNegInt = Annotated[int, _NoBool, Field(ge=0)]
Float = Annotated[float, _NoBool, Field(allow_inf_nan=False)]
PosFloat = Annotated[float, _NoBool, Field(gt=0, allow_inf_nan=False)]
NonNegFloat = Annotated[float, _NoBool, Field(ge=0, allow_inf_nan=False)]
Fraction = Annotated[float, _NoBool, Field(ge=0, lt=1, allow_inf_nan=False)]  # [0, 1)
Resources = dict[str, NonNegFloat]


class _Section(BaseModel):
    # Unknown keys are errors (the loader turns them into "did you mean" messages).
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ExperimentSection(_Section):
    name: str = Field("default", min_length=1)
    tags: dict[str, str] = Field(default_factory=dict)
    seed: NonNegInt = 0

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
    name: str = Field(min_length=1)

    @property
    def overrides(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


def _pair(key: str, value: tuple[float, float], low: float, high: float | None, what: str) -> None:
    lo, hi = value
    if lo > hi:
        raise ValueError(f"{key} must be [low, high] with low <= high, got [{lo:g}, {hi:g}]")
    if lo <= low or (high is not None and hi > high):
        bound = f"in (0, {high:g}]" if high is not None else "> 0"
        raise ValueError(f"{key} values must be {bound} ({what}), got [{lo:g}, {hi:g}]")


def _color_jitter(value: float | list[float] | None) -> None:
    key = "data.augment.color_jitter"
    if value is None:
        return
    if isinstance(value, list) and len(value) not in (3, 4):
        raise ValueError(f"{key} must be null, one number or 3-4 numbers (brightness, contrast, saturation"
                         f"[, hue]), got {value!r}")
    values = value if isinstance(value, list) else [value]
    if any(v < 0 for v in values):
        raise ValueError(f"{key} strengths must be >= 0, got {value!r}")
    if len(values) == 4 and values[3] > 0.5:
        raise ValueError(f"{key}: the hue strength must be in [0, 0.5], got {values[3]:g}")


def _auto_augment(value: str | None) -> None:
    key = "data.augment.auto_augment"
    if value is None or value == TRIVIAL_AUGMENT:
        return
    if not value:
        raise ValueError(f"{key} must be null or a policy string, got {value!r}")
    from timm.data import create_transform  # heavy, and needed only for a policy string

    try:  # timm parses the string when it builds the policy (the same call the training transform makes)
        create_transform(32, is_training=True, auto_augment=value)
    except Exception as err:  # noqa: BLE001 - timm raises AssertionError, KeyError, ValueError, IndexError
        raise ValueError(f"{key}: timm cannot read the policy {value!r} ({type(err).__name__}: {err}); use e.g. "
                         f"'rand-m9-mstd0.5-inc1', '{TRIVIAL_AUGMENT}' or 'augmix-m5-w4-d2'") from None


class AugmentSection(_Section):
    """`data.augment`: training-time augmentation. The defaults are the paper recipe (crop + flip only); the rest
    is timm's.

    - `scale`, `ratio`: RandomResizedCrop's area fraction and aspect-ratio ranges.
    - `hflip`: probability of a horizontal flip (0 for digits and text).
    - `auto_augment`: a timm policy string ('rand-m9-mstd0.5-inc1', 'augmix-m5-w4-d2', 'original', ...) or
      'trivialaugment' (torchvision's TrivialAugmentWide); null = none.
    - `color_jitter`: null = off; one strength or (brightness, contrast, saturation[, hue]). Not combinable
      with `auto_augment` (timm turns colour jitter off under an auto-augment policy, except '3a').
    - `re_prob`: random erasing probability (timm's RandomErasing, per-pixel noise fill as in timm's
      training script).
    - `mixup`, `cutmix`: Beta(alpha, alpha) parameters, 0 = off; `mixup_prob`: probability that a batch is
      mixed; `switch_prob`: probability of cutmix rather than mixup when both are on. Mixing needs an even
      `data.batch_size` (timm's Mixup pairs each image with the one at the mirrored position of the batch).
    """

    scale: tuple[Float, Float] = (0.08, 1.0)  # RandomResizedCrop area range
    ratio: tuple[Float, Float] = (3 / 4, 4 / 3)  # RandomResizedCrop aspect-ratio range
    hflip: Float = 0.5  # probability
    auto_augment: str | None = None  # timm: 'rand-m9-mstd0.5-inc1', 'augmix-m5-w4-d2', ...; 'trivialaugment'
    color_jitter: Float | list[Float] | None = None
    re_prob: Float = 0.0  # random erasing probability
    mixup: Float = 0.0  # Beta alpha; 0 = off
    cutmix: Float = 0.0  # Beta alpha; 0 = off
    mixup_prob: Float = 1.0
    switch_prob: Float = 0.5

    @model_validator(mode="after")
    def _recipe(self):
        _pair("data.augment.scale", self.scale, 0.0, 1.0, "crop area as a fraction of the image")
        _pair("data.augment.ratio", self.ratio, 0.0, None, "crop aspect ratio, width / height")
        _auto_augment(self.auto_augment)
        _color_jitter(self.color_jitter)
        for name in ("hflip", "re_prob", "mixup_prob", "switch_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"data.augment.{name} is a probability and must be in [0, 1], "
                                 f"got {getattr(self, name):g}")
        for name in ("mixup", "cutmix"):
            if getattr(self, name) < 0:
                raise ValueError(f"data.augment.{name} is a Beta alpha and must be >= 0 (0 = off), "
                                 f"got {getattr(self, name):g}")
        aa = self.auto_augment
        if aa is not None and self.color_jitter is not None and "3a" not in aa:
            raise ValueError(f"data.augment.color_jitter cannot be combined with data.augment.auto_augment "
                             f"({aa!r}): timm turns colour jitter off under an auto-augment policy; set "
                             f"color_jitter to null")
        return self

    @property
    def mixes(self) -> bool:
        """Whether batches are mixed (mixup or cutmix on, with a non-zero probability)."""
        return (self.mixup > 0 or self.cutmix > 0) and self.mixup_prob > 0


class DataSection(_Section):
    root: str = "data/tiny-imagenet"  # an ImageNet-layout folder, or a shard set (a folder or s3://bucket/prefix)
    # folder: train/<class>/* and val/<class>/*; shards: a `cvlab data shard` set; auto: shards when root has
    # a manifest.json (or is a bucket URI), else a folder.
    format: Literal["auto", "folder", "shards"] = "auto"
    # When set and `root` does not exist, the loader generates the embedded dataset there first.
    generate: bool = False
    num_classes_generated: Annotated[int, _NoBool, Field(ge=2)] = 10
    per_class_generated: PosInt = 60
    generated_size: Annotated[int, _NoBool, Field(ge=8)] = 64
    image_size: PosInt = 224
    val_resize: PosInt | None = None  # default: image_size / 0.875
    batch_size: PosInt = 32  # per worker
    num_workers: NonNegInt = 4  # data-loader processes per Ray worker
    augment: AugmentSection = Field(default_factory=AugmentSection)
    # What the network sees; with `grayscale` images have one channel, and mean/std one value each.
    mean: list[Float] = Field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[Float] = Field(default_factory=lambda: [0.229, 0.224, 0.225])
    grayscale: bool = False  # one input channel (the model gets in_channels: 1)
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear"  # crop, val resize, auto-augment

    @model_validator(mode="after")
    def _inputs(self):
        size, resize = self.image_size, self.val_resize
        if resize is not None and resize < size:
            raise ValueError(f"data.val_resize must be null or an integer >= data.image_size ({size}): the "
                             f"centre crop must fit, got {resize!r}")
        channels = 1 if self.grayscale else 3
        for key in ("mean", "std"):
            values = getattr(self, key)
            if len(values) != channels:
                raise ValueError(f"data.{key} has {len(values)} value(s) but the input has {channels} channel(s)"
                                 + (" (data.grayscale is true)" if self.grayscale else ""))
            if key == "std" and any(v <= 0 for v in values):
                raise ValueError(f"data.std values must be > 0, got {list(values)}")
        return self


class OptimSection(_Section):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: PosFloat = 0.1
    # When true, lr is for `base_batch_size` and is scaled linearly to the global batch.
    scale_lr: bool = True
    base_batch_size: PosInt = 256
    momentum: Fraction = 0.9
    nesterov: bool = True
    weight_decay: NonNegFloat = 1e-4
    betas: tuple[Fraction, Fraction] = (0.9, 0.999)
    label_smoothing: Fraction = 0.1
    epochs: PosInt = 130
    warmup_epochs: NonNegFloat = 0.0
    warmup_iters: NonNegInt = 0  # wins over warmup_epochs when > 0
    min_lr: NonNegFloat = 0.0
    grad_clip: PosFloat | None = None
    # A NaN/inf training loss fails the run (naming epoch and step). With N > 0 such a step is skipped
    # instead (no update; counted in metric train/skipped_steps) up to N times per run, then it fails.
    skip_nonfinite_steps: NonNegInt = 0
    # Exponential moving average of the weights (timm ModelEmaV3), validated every epoch too; null = off.
    ema_decay: Annotated[float, _NoBool, Field(gt=0, lt=1, allow_inf_nan=False)] | None = None

    @model_validator(mode="after")
    def _warmup_shorter_than_training(self):
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"optim.warmup_epochs ({self.warmup_epochs:g}) must be shorter than optim.epochs "
                             f"({self.epochs})")
        if self.min_lr > self.lr:
            raise ValueError(f"optim.min_lr ({self.min_lr:g}) is above optim.lr ({self.lr:g})")
        return self


class PrecisionSection(_Section):
    autocast: Literal["fp32", "bf16", "fp16"] = "fp32"
    channels_last: bool = False


def _worker_count(value: Any) -> Any:
    # An int, or [min, max] (a YAML list): every check here, so a bad value gets one message, not a union's two.
    _not_bool(value)
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ValueError(f"a worker range is two integers [min, max], got {list(value)!r}")
        low, high = value
        if not 1 <= low <= high:
            raise ValueError(f"a worker range [min, max] needs 1 <= min <= max, got [{low}, {high}]")
        return (low, high)
    if not isinstance(value, int) or value < 1:
        raise ValueError("must be a whole number >= 1, or a range [min, max]")
    return value


WorkerCount = Annotated[int | tuple[int, int], BeforeValidator(_worker_count)]


class ScalingSection(_Section):
    # An int, or [min, max]: an elastic worker group (Ray Train's elastic scaling) that starts once `min` workers
    # fit, goes on with fewer when a node is lost and grows back toward `max` when capacity returns.
    num_workers: WorkerCount = 1
    # How often an elastic group looks for room to grow (Ray's elastic_resize_monitor_interval_s).
    resize_check_s: PosFloat = 60.0
    use_gpu: bool = False
    resources_per_worker: Resources = Field(default_factory=dict)
    # How Ray places the workers: PACK fills nodes one after another, SPREAD puts them on different nodes.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, tuple)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if self.elastic else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if self.elastic else self.num_workers

    def describe(self) -> str:
        """`3 worker(s)` or `1 to 3 workers`, for messages."""
        return f"{self.min_workers} to {self.max_workers} workers" if self.elastic else f"{self.num_workers} worker(s)"


class FaultKill(_Section):
    """`run.fault_kill_rank_at`: worker `rank` sends itself `signal` once at `step` of `epoch` (KILL: a lost
    process; TERM: a pod deleted without a drain)."""

    epoch: PosInt
    step: PosInt
    rank: NonNegInt = 0
    signal: Literal["KILL", "TERM"] = "KILL"


class FaultNan(_Section):
    """`run.fault_nan_loss_at`: the loss of `step` of `epoch` becomes NaN on every worker."""

    epoch: PosInt
    step: PosInt


class RunSection(_Section):
    storage_path: str = Field("runs", min_length=1)
    name: str | None = None  # Ray Train run name; default: experiment name
    checkpoint_every: PosInt = 1  # epochs
    # Also a checkpoint every N optimizer steps inside an epoch, resumable at that step (classification).
    checkpoint_every_steps: PosInt | None = None
    checkpoints_kept: PosInt = 2
    max_failures: Annotated[int, _NoBool, Field(ge=-1)] = 0  # -1: retry without limit
    # How long data reads and checkpoint uploads/downloads retry an unreachable bucket before the run fails.
    storage_retry_limit_s: Annotated[float, _NoBool, Field(gt=0, allow_inf_nan=False)] = 300.0
    log_every: PosInt = 10  # steps between progress lines
    # Measure the run's cost (cost/* metrics: params, GFLOPs, training throughput, latency, peak memory) with a
    # short probe on a worker's device before training (`workloads.cost_probe`).
    measure_cost: bool = False
    # Fault-injection drills (reliability testing only). A marker file in the Ray Train run folder keeps
    # the restarted worker from repeating the kill; combine with max_failures >= 1.
    fault_kill_rank_at: FaultKill | None = None
    fault_nan_loss_at: FaultNan | None = None


class TrackingSection(_Section):
    # Explicit URI; else MLFLOW_TRACKING_URI; else sqlite:///mlflow.db with ./mlartifacts.
    tracking_uri: str | None = None
    experiment_name: str | None = None  # default: experiment.name
    register_model: str | None = None
    log_model: bool = True


class SearchObjective(_Section):
    """One objective of a search: a metric the trials log, maximised or minimised."""

    metric: str = Field(min_length=1)
    mode: Literal["max", "min"] = "max"


class CostBound(_Section):
    """A constraint on a measured cost (`cost/...`): a configuration outside [min, max] is never trained."""

    min: Float | None = None
    max: Float | None = None

    @model_validator(mode="after")
    def _a_bound(self):
        if self.min is None and self.max is None:
            raise ValueError("a constraint needs min, max or both, e.g. {max: 10}")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        return self


class SearchSection(_Section):
    """Ray Tune search (used by `cvlab tune`). `metric`/`mode` are the first objective (ASHA's and the best
    trial's); `objectives` lists all of them for a multi-objective search (the Pareto front)."""

    space: dict[str, dict[str, Any]] = Field(default_factory=dict)
    metric: str = "val/top1"
    mode: Literal["max", "min"] = "max"
    objectives: list[SearchObjective] = Field(default_factory=list)
    algorithm: Literal["random", "optuna"] = "random"  # random: Tune's grid/random sampling
    sampler: Literal["tpe", "nsga2"] = "tpe"  # optuna's sampler (both handle one or several objectives)
    constraints: dict[str, CostBound] = Field(default_factory=dict)  # cost metric -> bound, checked before training
    warm_start: str | None = Field(None, min_length=1)  # an earlier search: parent run id or experiment name
    num_samples: PosInt = 1
    scheduler: Literal["fifo", "asha"] = "fifo"
    max_t: PosInt | None = None
    grace_period: PosInt = 1
    reduction_factor: Annotated[float, _NoBool, Field(gt=1, allow_inf_nan=False)] = 2.0
    max_concurrent_trials: PosInt | None = None
    resources_per_trial: Resources = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _metric_from_the_first_objective(cls, data: Any) -> Any:
        objectives = data.get("objectives") if isinstance(data, dict) else None
        if isinstance(objectives, list) and objectives and isinstance(objectives[0], dict):
            data = {**data}
            data.setdefault("metric", objectives[0].get("metric"))
            data.setdefault("mode", objectives[0].get("mode", "max"))
        return data

    @model_validator(mode="after")
    def _objectives_agree(self):
        metrics = [o.metric for o in self.objectives]
        twice = sorted({m for m in metrics if metrics.count(m) > 1})
        if twice:
            raise ValueError(f"search.objectives name {', '.join(twice)} more than once")
        if self.objectives and (self.objectives[0].metric, self.objectives[0].mode) != (self.metric, self.mode):
            first = self.objectives[0]
            raise ValueError(f"search.metric/mode ({self.metric}, {self.mode}) must be the first objective "
                             f"({first.metric}, {first.mode}): leave them out, or list that objective first")
        return self

    @property
    def all_objectives(self) -> list[SearchObjective]:
        """`objectives`, or the one objective `metric`/`mode`."""
        return list(self.objectives) or [SearchObjective(metric=self.metric, mode=self.mode)]


class DetectionSection(_Section):
    """mmdet workload (used when `workload: detection`)."""

    config: str = Field(min_length=1)  # an mmdet config file (a path, or a name from the bundled configs)
    data_root: str = "data/tiny-coco"
    generate: bool = False
    classes: list[str] | None = None
    batch_size: PosInt = 2  # per worker
    max_epochs: PosInt = 12
    val_interval: PosInt = 1
    overrides: dict[str, Any] = Field(default_factory=dict)  # dotted mmengine cfg keys
    pretrained: str | None = None  # one of our ImageNet checkpoints for the backbone (init_cfg)
    image_scale: tuple[PosInt, PosInt] | None = None  # [w, h] for the Resize of train and test pipelines
    num_train_generated: PosInt = 32  # images written when `generate` is set and data_root is missing
    num_val_generated: PosInt = 8
    generated_size: Annotated[int, _NoBool, Field(ge=32)] = 128
    auto_scale_lr: bool = True  # scale the config's lr from its base batch (16) to the global batch
    warmup_iters: PosInt | None = None  # replaces the end of the config's linear warm-up
    num_data_workers: NonNegInt = 2  # data-loader processes per Ray worker (0: load in the worker)


class SegmentationSection(_Section):
    """mmseg workload (used when `workload: segmentation`); iteration-based like mmseg's schedules."""

    config: str = Field(min_length=1)  # an mmseg config (a path, or a name from the bundled configs)
    data_root: str = "data/tiny-cityscapes"
    generate: bool = False
    num_train_generated: PosInt = 40  # images written when `generate` is set and data_root is missing
    num_val_generated: PosInt = 10
    generated_size: tuple[Annotated[int, _NoBool, Field(ge=32)], Annotated[int, _NoBool, Field(ge=32)]] = (128, 256)
    crop_size: tuple[PosInt, PosInt] | None = None  # [h, w]; null: the config's
    batch_size: PosInt = 2  # per worker
    max_iters: PosInt = 80000
    val_interval: PosInt = 8000  # iterations; each validation writes and reports a checkpoint
    overrides: dict[str, Any] = Field(default_factory=dict)  # dotted mmengine cfg keys
    pretrained: str | None = None  # backbone checkpoint (init_cfg)
    pretrained_format: Literal["cvlab", "mmcls"] = "cvlab"
    num_data_workers: NonNegInt = 2  # data-loader processes per Ray worker (0: load in the worker)
    sync_bn: Literal["auto", "on", "off"] = "auto"  # auto: SyncBN on GPU, plain BN on CPU workers

    @model_validator(mode="after")
    def _interval_within_training(self):
        if self.val_interval > self.max_iters:
            raise ValueError(f"segmentation.val_interval ({self.val_interval}) is longer than "
                             f"segmentation.max_iters ({self.max_iters}): nothing would be validated")
        return self


class ExperimentSpec(_Section):
    experiment: ExperimentSection = Field(default_factory=ExperimentSection)
    workload: Literal["classification", "detection", "segmentation"] = "classification"
    model: ModelSection | None = None
    data: DataSection = Field(default_factory=DataSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    precision: PrecisionSection = Field(default_factory=PrecisionSection)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    run: RunSection = Field(default_factory=RunSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    search: SearchSection | None = None
    detection: DetectionSection | None = None
    segmentation: SegmentationSection | None = None

    # The files (and override sources) this spec was built from, in merge order; set by the loader.
    _sources: list[str] = PrivateAttr(default_factory=list)

    @property
    def sources(self) -> list[str]:
        return list(self._sources)

    @model_validator(mode="before")
    @classmethod
    def _default_classifier(cls, data: Any) -> Any:
        # A classification file without a model section trains the quickstart's model; one that has the
        # section must name the model (`model: {}` is refused). Detection and segmentation take theirs from a config.
        if isinstance(data, dict) and data.get("workload", "classification") == "classification" \
                and data.get("model") is None:
            return {**data, "model": {"name": DEFAULT_MODEL}}
        return data

    @model_validator(mode="after")
    def _workload_sections(self):
        if self.workload == "classification":
            if self.data.image_size < MODEL_TOTAL_STRIDE:
                raise ValueError(f"data.image_size ({self.data.image_size}) is smaller than the model's total "
                                 f"stride ({MODEL_TOTAL_STRIDE}): use at least {MODEL_TOTAL_STRIDE}")
            if self.data.augment.mixes and self.data.batch_size % 2:
                raise ValueError(f"data.batch_size must be even when data.augment.mixup or data.augment.cutmix is "
                                 f"on (timm's Mixup pairs every image with another of the batch), got "
                                 f"{self.data.batch_size}")
        for workload in ("detection", "segmentation"):
            if self.workload == workload and getattr(self, workload) is None:
                raise ValueError(f"workload: {workload} needs a `{workload}:` section (at least {workload}.config)")
        if self.run.fault_kill_rank_at is not None and \
                self.run.fault_kill_rank_at.rank >= self.scaling.max_workers:
            raise ValueError(f"run.fault_kill_rank_at.rank ({self.run.fault_kill_rank_at.rank}) names no worker: "
                             f"scaling.num_workers is {self.scaling.describe()}")
        if self.scaling.elastic and self.run.max_failures == 0:
            raise ValueError("a worker range (scaling.num_workers: [min, max]) goes on after a lost node by "
                             "restarting the group smaller, which Ray counts as a failure: set run.max_failures "
                             "to the losses to ride out (or -1, without limit)")
        if self.workload != "classification" and self.run.checkpoint_every_steps:
            raise ValueError(f"{self.workload}: run.checkpoint_every_steps is for classification; mmengine writes "
                             "its checkpoints from the config's CheckpointHook (by iteration with "
                             "`default_hooks.checkpoint.by_epoch: false` in an iteration loop)")
        return self
