"""Training and validation transforms of the classification workload, from an `InputConfig` / `AugmentConfig`.

    train_tf = build_train_transform(cfg.inputs, cfg.augment)   # the configs the job built from the spec
    val_tf = build_val_transform(cfg.inputs)

Training: [grayscale] -> random resized crop -> horizontal flip -> [TrivialAugment] -> timm's stages after the
crop (auto-augment policy, colour jitter, to-tensor + normalise, random erasing), taken from
`timm.data.create_transform(..., separate=True)`.

The crop is torchvision's `RandomResizedCrop`, not timm's `RandomResizedCropAndInterpolation` (the first stage
of `create_transform`): the two sample the same distribution, but timm's draws from Python's `random` and
torchvision's from torch's generator, so for the same seeds they cut different crops (and the flip after them,
which draws from torch's generator in both, then sees a different generator state). Keeping torchvision's crop
makes the defaults reproduce the workload's earlier pipeline (`RandomResizedCrop + RandomHorizontalFlip +
ToTensor + Normalize`) bit for bit, and gives one pipeline for every setting rather than a switch.

Pillow 13 rejects `ImageOps.posterize(img, 0)` (earlier versions returned a black image), and timm 1.0's
policies ask for 0 bits: RandAugment's PosterizeIncreasing at magnitude 10 (reached by 'rand-m9-mstd0.5-inc1' about
once in 650 images, which would stop a run) and the 'v0' AutoAugment policy. The policy ops built here get a
posterize that returns the black image for 0 bits, as timm's policies were written against.

Validation: [grayscale] -> `create_transform(is_training=False)` (resize the shorter side, centre crop,
to-tensor + normalise), with the resize set to exactly `InputConfig.resolved_val_resize`.
"""
from __future__ import annotations

from timm.data import auto_augment, create_transform
from torchvision import transforms as T

from .recipe import TRIVIAL_AUGMENT, AugmentConfig, InputConfig

# timm's RandomErasing fill: per-pixel normal noise, as in timm's training script (create_transform's own
# default, 'const', fills with zeros).
RANDOM_ERASING_MODE = "pixel"


def _fill(inp: InputConfig) -> list[int]:
    """The mean colour in 0..255 (what timm's auto-augment policies fill uncovered pixels with)."""
    return [min(255, round(255 * m)) for m in inp.mean]


def _posterize(img, bits_to_keep, **kwargs):
    """timm's posterize op, with Pillow < 13's result for 0 bits (a black image) instead of a ValueError."""
    if bits_to_keep < 1:
        return img.point(lambda _: 0)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def _fix_posterize(policies) -> None:
    """Point the posterize ops of timm's RandAugment / AugMix (`.ops`) and AutoAugment (`.policy`) at `_posterize`."""
    for policy in policies:
        ops = list(getattr(policy, "ops", []))
        for sub_policy in getattr(policy, "policy", []):
            ops += sub_policy
        for op in ops:
            if op.aug_fn is auto_augment.posterize:
                op.aug_fn = _posterize


def _prefix(inp: InputConfig) -> list:
    return [T.Grayscale(num_output_channels=1)] if inp.grayscale else []


def build_train_transform(inp: InputConfig, aug: AugmentConfig):
    """The training transform (PIL image -> normalised tensor). The spec's defaults (the paper recipe) give the
    earlier pipeline bit for bit."""
    mode = T.InterpolationMode(inp.interpolation)
    steps = _prefix(inp)
    steps.append(T.RandomResizedCrop(inp.image_size, scale=aug.scale, ratio=aug.ratio, interpolation=mode,
                                     antialias=True))
    if aug.hflip > 0:
        steps.append(T.RandomHorizontalFlip(aug.hflip))
    if aug.auto_augment == TRIVIAL_AUGMENT:
        steps.append(T.TrivialAugmentWide(interpolation=mode, fill=_fill(inp)))
    _crop_and_flip, after_crop, to_tensor = create_transform(
        inp.image_size,
        is_training=True,
        auto_augment=None if aug.auto_augment == TRIVIAL_AUGMENT else aug.auto_augment,
        color_jitter=aug.color_jitter,  # None: off (timm's own default would be 0.4)
        interpolation=inp.interpolation,
        mean=inp.mean,
        std=inp.std,
        re_prob=aug.re_prob,
        re_mode=RANDOM_ERASING_MODE,
        separate=True,
    )
    _fix_posterize(after_crop.transforms)
    return T.Compose(steps + list(after_crop.transforms) + list(to_tensor.transforms))


def build_val_transform(inp: InputConfig):
    """The validation transform: resize the shorter side to `inp.resolved_val_resize`, centre crop, normalise."""
    resize = inp.resolved_val_resize
    # timm resizes to floor(image_size / crop_pct); our rule is round(image_size / 0.875) (37 at 32 px, where
    # timm's default crop_pct gives 36). Aiming floor() at resize + 0.5 lands on `resize` despite rounding.
    crop_pct = inp.image_size / (resize + 0.5)
    tf = create_transform(inp.image_size, is_training=False, crop_pct=crop_pct, interpolation=inp.interpolation,
                          mean=inp.mean, std=inp.std)
    return T.Compose(_prefix(inp) + list(tf.transforms))
