"""The training recipe of the classification workload as two frozen dataclasses: plain data, built by the job
(`orchestrator.jobs.classification`) from the validated spec, which holds the defaults and every rule.

`InputConfig` is what the network sees (`data.image_size`, `data.val_resize`, `data.mean`, `data.std`,
`data.grayscale`, `data.interpolation`); `AugmentConfig` is the training-time augmentation (`data.augment.*`).
Their field names are the spec keys; what each one means is documented in `orchestrator.config.schema`.

The builders live next to this module: `transforms.py` (train / val transforms), `mixup.py` (mixup / cutmix
and the matching loss) and `ema.py` (model EMA).
"""
from __future__ import annotations

from dataclasses import dataclass

# `data.augment.auto_augment` value that selects torchvision's TrivialAugmentWide (timm 1.0 has no such policy
# string); the schema accepts the same name.
TRIVIAL_AUGMENT = "trivialaugment"
# The validation resize when data.val_resize is null: round(image_size / DEFAULT_CROP_PCT).
DEFAULT_CROP_PCT = 0.875


@dataclass(frozen=True)
class AugmentConfig:
    """`data.augment`: crop ranges, flip, auto-augment policy, colour jitter, random erasing, mixup / cutmix."""

    scale: tuple[float, float]
    ratio: tuple[float, float]
    hflip: float
    auto_augment: str | None
    color_jitter: float | tuple[float, ...] | None
    re_prob: float
    mixup: float
    cutmix: float
    mixup_prob: float
    switch_prob: float

    @property
    def mixes(self) -> bool:
        """Whether batches are mixed (mixup or cutmix on, with a non-zero probability)."""
        return (self.mixup > 0 or self.cutmix > 0) and self.mixup_prob > 0


@dataclass(frozen=True)
class InputConfig:
    """`data.image_size`, `data.val_resize`, `data.mean`, `data.std`, `data.grayscale`, `data.interpolation`.

    `val_resize` null means round(image_size / 0.875) (256 for 224). With `grayscale` images are converted
    to one channel and `mean`/`std` have one value each (the model then has `in_channels: 1`).
    `interpolation` is used by the crop, the validation resize and the auto-augment geometry.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    grayscale: bool
    interpolation: str
    image_size: int
    val_resize: int | None

    @property
    def channels(self) -> int:
        return 1 if self.grayscale else 3

    @property
    def resolved_val_resize(self) -> int:
        """The shorter side validation images are resized to before the centre crop."""
        return self.val_resize or round(self.image_size / DEFAULT_CROP_PCT)
