"""The training recipe of the classification workload as two frozen dataclasses, and their validation.

`InputConfig` is what the network sees (image size, validation resize, normalisation, grayscale,
interpolation); `AugmentConfig` is the training-time augmentation. Their field names are the spec keys
(`data.<field>` and `data.augment.<field>`), and their defaults are the paper recipe that the workload has always
used: RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3, bilinear) + horizontal flip, resize to image_size / 0.875 +
centre crop for validation, ImageNet mean/std, no other augmentation.

Every bad value raises ValueError naming its spec key (`data.augment.scale: ...`), from the constructors and from
the `check_*` functions (for a schema that validates one field at a time). Nothing here imports torch, and timm
only to parse an `auto_augment` string.

The builders live next to this module: `transforms.py` (train / val transforms), `mixup.py` (mixup / cutmix
and the matching loss) and `ema.py` (model EMA).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from .data import IMAGENET_MEAN, IMAGENET_STD

# timm 1.0 has no TrivialAugment policy string; this one selects torchvision's TrivialAugmentWide.
TRIVIAL_AUGMENT = "trivialaugment"
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
# The validation resize when data.val_resize is null: round(image_size / DEFAULT_CROP_PCT).
DEFAULT_CROP_PCT = 0.875


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number, got {value!r}")
    return float(value)


def _probability(key: str, value: Any) -> float:
    value = _number(key, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{key} is a probability and must be in [0, 1], got {value:g}")
    return value


def _pair(key: str, value: Any, low: float, high: float | None, what: str) -> tuple[float, float]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"{key} must be a pair [low, high] ({what}), got {value!r}")
    lo, hi = (_number(key, v) for v in value)
    if lo > hi:
        raise ValueError(f"{key} must be [low, high] with low <= high, got [{lo:g}, {hi:g}]")
    if lo <= low or (high is not None and hi > high):
        bound = f"in (0, {high:g}]" if high is not None else "> 0"
        raise ValueError(f"{key} values must be {bound} ({what}), got [{lo:g}, {hi:g}]")
    return lo, hi


def check_scale(value: Any) -> tuple[float, float]:
    """`data.augment.scale`: the crop's area as a fraction of the image, [low, high] in (0, 1]."""
    return _pair("data.augment.scale", value, 0.0, 1.0, "crop area as a fraction of the image")


def check_ratio(value: Any) -> tuple[float, float]:
    """`data.augment.ratio`: the crop's aspect ratio (width / height), [low, high], both > 0."""
    return _pair("data.augment.ratio", value, 0.0, None, "crop aspect ratio, width / height")


def check_color_jitter(value: Any) -> float | tuple[float, ...] | None:
    """`data.augment.color_jitter`: null, one strength (brightness = contrast = saturation), or
    (brightness, contrast, saturation[, hue]); strengths >= 0, hue in [0, 0.5]."""
    key = "data.augment.color_jitter"
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or (isinstance(value, Sequence) and len(value) not in (3, 4)):
        raise ValueError(f"{key} must be null, one number or 3-4 numbers (brightness, contrast, saturation"
                         f"[, hue]), got {value!r}")
    values = tuple(_number(key, v) for v in value) if isinstance(value, Sequence) else (_number(key, value),)
    if any(v < 0 for v in values):
        raise ValueError(f"{key} strengths must be >= 0, got {value!r}")
    if len(values) == 4 and values[3] > 0.5:
        raise ValueError(f"{key}: the hue strength must be in [0, 0.5], got {values[3]:g}")
    return values if isinstance(value, Sequence) else values[0]


def check_auto_augment(value: Any) -> str | None:
    """`data.augment.auto_augment`: null, 'trivialaugment', or a policy string timm can read
    ('rand-m9-mstd0.5-inc1', 'augmix-m5-w4-d2', 'original', 'v0', '3a', ...)."""
    key = "data.augment.auto_augment"
    if value is None or value == TRIVIAL_AUGMENT:
        return value
    if not isinstance(value, str) or not value:
        raise ValueError(f"{key} must be null or a policy string, got {value!r}")
    from timm.data import create_transform

    try:  # timm parses the string when it builds the policy (the same call the training transform makes)
        create_transform(32, is_training=True, auto_augment=value)
    except Exception as err:  # noqa: BLE001 - timm raises AssertionError, KeyError, ValueError, IndexError
        raise ValueError(f"{key}: timm cannot read the policy {value!r} ({type(err).__name__}: {err}); use e.g. "
                         f"'rand-m9-mstd0.5-inc1', '{TRIVIAL_AUGMENT}' or 'augmix-m5-w4-d2'") from None
    return value


@dataclass(frozen=True)
class AugmentConfig:
    """`data.augment`: training-time augmentation. The defaults are the paper recipe (crop + flip only).

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
      batch (see `check_batch_size`) and uses timm's SoftTargetCrossEntropy with label smoothing folded in.
    """

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    auto_augment: str | None = None
    color_jitter: float | tuple[float, ...] | None = None
    re_prob: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    switch_prob: float = 0.5

    def __post_init__(self) -> None:
        values = {
            "scale": check_scale(self.scale),
            "ratio": check_ratio(self.ratio),
            "auto_augment": check_auto_augment(self.auto_augment),
            "color_jitter": check_color_jitter(self.color_jitter),
        }
        for name in ("hflip", "re_prob", "mixup_prob", "switch_prob"):
            values[name] = _probability(f"data.augment.{name}", getattr(self, name))
        for name in ("mixup", "cutmix"):
            values[name] = _number(f"data.augment.{name}", getattr(self, name))
            if values[name] < 0:
                raise ValueError(f"data.augment.{name} is a Beta alpha and must be >= 0 (0 = off), "
                                 f"got {values[name]:g}")
        aa = values["auto_augment"]
        if aa is not None and values["color_jitter"] is not None and "3a" not in aa:
            raise ValueError(f"data.augment.color_jitter cannot be combined with data.augment.auto_augment "
                             f"({aa!r}): timm turns colour jitter off under an auto-augment policy; set "
                             f"color_jitter to null")
        for name, value in values.items():
            object.__setattr__(self, name, value)  # normalised: tuples, floats

    @property
    def mixes(self) -> bool:
        """Whether batches are mixed (mixup or cutmix on, with a non-zero probability)."""
        return (self.mixup > 0 or self.cutmix > 0) and self.mixup_prob > 0


@dataclass(frozen=True)
class InputConfig:
    """`data.image_size`, `data.val_resize`, `data.mean`, `data.std`, `data.grayscale`, `data.interpolation`.

    `val_resize` null means round(image_size / 0.875) (256 for 224). With `grayscale` images are converted
    to one channel and `mean`/`std` have one value each (the model then needs `in_channels: 1`).
    `interpolation` is used by the crop, the validation resize and the auto-augment geometry.
    """

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    grayscale: bool = False
    interpolation: str = "bilinear"
    image_size: int = 224
    val_resize: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.grayscale, bool):
            raise ValueError(f"data.grayscale must be true or false, got {self.grayscale!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"data.interpolation must be one of {', '.join(INTERPOLATIONS)}, "
                             f"got {self.interpolation!r}")
        size = self.image_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"data.image_size must be a positive integer, got {size!r}")
        resize = self.val_resize
        if resize is not None and (isinstance(resize, bool) or not isinstance(resize, int) or resize < size):
            raise ValueError(f"data.val_resize must be null or an integer >= data.image_size ({size}): the "
                             f"centre crop must fit, got {resize!r}")
        channels = self.channels
        for key in ("mean", "std"):
            values = getattr(self, key)
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
                raise ValueError(f"data.{key} must be a list of {channels} number(s), got {values!r}")
            values = tuple(_number(f"data.{key}", v) for v in values)
            if len(values) != channels:
                raise ValueError(f"data.{key} has {len(values)} value(s) but the input has {channels} channel(s)"
                                 + (" (data.grayscale is true)" if self.grayscale else ""))
            if key == "std" and any(v <= 0 for v in values):
                raise ValueError(f"data.std values must be > 0, got {list(values)}")
            object.__setattr__(self, key, values)

    @property
    def channels(self) -> int:
        return 1 if self.grayscale else 3

    @property
    def resolved_val_resize(self) -> int:
        """The shorter side validation images are resized to before the centre crop."""
        return self.val_resize or round(self.image_size / DEFAULT_CROP_PCT)

    @classmethod
    def from_data_section(cls, data: Mapping[str, Any]) -> InputConfig:
        """From the spec's `data` section (other keys of the section are ignored)."""
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


def check_batch_size(augment: AugmentConfig, batch_size: int) -> None:
    """`data.batch_size` must be even when batches are mixed: timm's Mixup pairs each image with the one at the
    mirrored position of the batch."""
    if augment.mixes and batch_size % 2:
        raise ValueError(f"data.batch_size must be even when data.augment.mixup or data.augment.cutmix is on "
                         f"(timm's Mixup pairs every image with another of the batch), got {batch_size}")
