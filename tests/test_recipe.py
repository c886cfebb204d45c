"""The training recipe: configs and their validation, transforms (bit-identical defaults, each augmentation on
when set and off when not), mixup/cutmix targets and loss, model EMA with checkpoint round trips."""
from __future__ import annotations

import math
import re
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from orchestrator.config.loader import spec_from_dict
from orchestrator.config.schema import AugmentSection, DataSection
from orchestrator.errors import CvlabError
from orchestrator.jobs.classification import augment_config, input_config
from workloads.classification.ema import create_ema, ema_state_dict, load_ema_state_dict, update_ema
from workloads.classification.mixup import build_mixup, build_train_criterion
from workloads.classification.recipe import AugmentConfig, InputConfig
from workloads.classification.transforms import _posterize, build_train_transform, build_val_transform

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def inputs(**data) -> InputConfig:
    """The worker's `InputConfig` of a spec `data` section with these keys (the rest: the spec's defaults)."""
    return input_config(DataSection(**data))


def augment(**keys) -> AugmentConfig:
    """The worker's `AugmentConfig` of a spec `data.augment` section with these keys."""
    return augment_config(AugmentSection(**keys))


def todays_pipeline(image_size: int, val_resize: int | None = None):
    """The workload's transforms before issue 17 (workloads/classification/data.py::build_transforms)."""
    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train = T.Compose([T.RandomResizedCrop(image_size, antialias=True), T.RandomHorizontalFlip(), T.ToTensor(),
                       normalize])
    resize = val_resize or round(image_size / 0.875)
    val = T.Compose([T.Resize(resize, antialias=True), T.CenterCrop(image_size), T.ToTensor(), normalize])
    return train, val


def images(n: int = 4, seed: int = 0) -> list[Image.Image]:
    rs = np.random.RandomState(seed)
    shapes = [(64, 64), (375, 500), (500, 333), (48, 90)]
    return [Image.fromarray(rs.randint(0, 256, (*shapes[i % 4], 3), dtype=np.uint8)) for i in range(n)]


def run(tf, imgs, seed: int) -> list[torch.Tensor]:
    """`tf` on each image, every generator reseeded per image (so two pipelines see the same crops)."""
    out = []
    for i, im in enumerate(imgs):
        torch.manual_seed(seed + i)
        random.seed(seed + i)
        np.random.seed(seed + i)
        out.append(tf(im))
    return out


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def kinds(tf) -> set[str]:
    return {type(t).__name__ for t in tf.transforms}


# -- bit for bit ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,val_resize", [(32, None), (224, None), (224, 256), (60, None)])
def test_defaults_are_bit_identical_to_todays_pipeline(size, val_resize):
    old_train, old_val = todays_pipeline(size, val_resize)
    inp = inputs(image_size=size, val_resize=val_resize)
    new_train, new_val = build_train_transform(inp, augment()), build_val_transform(inp)
    imgs = images()
    for seed in range(2):
        torch.manual_seed(seed)
        old = [old_train(im) for im in imgs for _ in range(2)]
        torch.manual_seed(seed)
        new = [new_train(im) for im in imgs for _ in range(2)]
        assert same(old, new)
    assert same([old_val(im) for im in imgs], [new_val(im) for im in imgs])
    assert new_val.transforms[0].size == (val_resize or round(size / 0.875))  # 37 for 32 px, not timm's 36


def test_timms_own_crop_is_not_bit_identical():
    """Why the crop stays torchvision's: timm's RandomResizedCropAndInterpolation draws from Python's random."""
    from timm.data import create_transform

    old_train, _ = todays_pipeline(32)
    timm_train = create_transform(32, is_training=True, color_jitter=None, interpolation="bilinear")
    assert not same(run(old_train, images(), 0), run(timm_train, images(), 0))


# -- each augmentation on when set, off when not -------------------------------------------------------------
def test_default_pipeline_has_nothing_else():
    tf = build_train_transform(inputs(image_size=32), augment())
    assert kinds(tf) == {"RandomResizedCrop", "RandomHorizontalFlip", "MaybeToTensor", "Normalize"}


def test_scale_and_ratio():
    square = Image.fromarray(np.random.RandomState(1).randint(0, 256, (64, 64, 3), dtype=np.uint8))
    whole = build_train_transform(inputs(image_size=32), augment(scale=(1.0, 1.0), ratio=(1.0, 1.0),
                                                                            hflip=0.0))
    resized = T.Compose([T.Resize(32, antialias=True), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    assert same(run(whole, [square] * 3, 0), [resized(square)] * 3)  # the crop is the whole image
    crop = build_train_transform(inputs(image_size=32), augment(hflip=0.0)).transforms[0]
    assert crop.scale == (0.08, 1.0) and crop.ratio == (3 / 4, 4 / 3)
    cut = np.asarray(run(crop, [square], 0)[0])
    assert not np.array_equal(cut, np.asarray(T.Resize(32, antialias=True)(square)))


def test_hflip():
    inp, imgs = inputs(image_size=32), images()
    never = build_train_transform(inp, augment(hflip=0.0))
    always = build_train_transform(inp, augment(hflip=1.0))
    assert "RandomHorizontalFlip" not in kinds(never)
    for seed in range(3):  # the same crops, mirrored
        assert same([t.flip(-1) for t in run(never, imgs, seed)], run(always, imgs, seed))


@pytest.mark.parametrize("policy,kind", [("rand-m9-mstd0.5-inc1", "RandAugment"), ("augmix-m5-w4-d2", "AugMixAugment"),
                                         ("original", "AutoAugment"), ("trivialaugment", "TrivialAugmentWide")])
def test_auto_augment(policy, kind):
    inp, imgs = inputs(image_size=32), images()
    on = build_train_transform(inp, augment(auto_augment=policy))
    off = build_train_transform(inp, augment())
    assert kind in kinds(on) and kind not in kinds(off)
    assert not all(same(run(on, imgs, s), run(off, imgs, s)) for s in range(3))


def test_color_jitter():
    inp, imgs = inputs(image_size=32), images()
    on = build_train_transform(inp, augment(color_jitter=(0.4, 0.4, 0.4, 0.1)))
    jitter = next(t for t in on.transforms if isinstance(t, T.ColorJitter))
    assert jitter.brightness == (0.6, 1.4) and jitter.hue == (-0.1, 0.1)
    assert "ColorJitter" not in kinds(build_train_transform(inp, augment()))
    assert not same(run(on, imgs, 0), run(build_train_transform(inp, augment()), imgs, 0))


def test_random_erasing():
    inp, imgs = inputs(image_size=32), images()
    on = build_train_transform(inp, augment(re_prob=1.0))
    off = build_train_transform(inp, augment())
    assert "RandomErasing" in kinds(on) and "RandomErasing" not in kinds(off)
    erased, plain = run(on, imgs, 0), run(off, imgs, 0)
    for e, p in zip(erased, plain, strict=True):  # the same crop, with one rectangle replaced
        differs = (e != p).any(0)
        assert differs.any() and not differs.all()


def test_grayscale_mean_std_interpolation():
    imgs = images()
    gray = build_train_transform(inputs(image_size=32, grayscale=True, mean=(0.5,), std=(0.25,)), augment())
    reference = T.Compose([T.Grayscale(1), T.RandomResizedCrop(32, antialias=True), T.RandomHorizontalFlip(),
                           T.ToTensor(), T.Normalize((0.5,), (0.25,))])
    out = run(gray, imgs, 0)
    assert out[0].shape == (1, 32, 32) and same(out, run(reference, imgs, 0))
    val = build_val_transform(inputs(image_size=32, grayscale=True, mean=(0.5,), std=(0.25,)))
    assert val(imgs[1]).shape == (1, 32, 32)

    custom = build_train_transform(inputs(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)), augment())
    a, b = run(custom, imgs, 0), run(build_train_transform(inputs(image_size=32), augment()), imgs, 0)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x * 0.5 + 0.5, y * std + mean)

    bicubic = inputs(image_size=32, interpolation="bicubic")
    assert build_train_transform(bicubic, augment()).transforms[0].interpolation == T.InterpolationMode.BICUBIC
    assert build_val_transform(bicubic).transforms[0].interpolation == T.InterpolationMode.BICUBIC
    assert not same(run(build_train_transform(bicubic, augment()), imgs, 0), b)


def test_posterize_with_zero_bits_gives_a_black_image_not_an_error():
    """Pillow 13 raises for 0 bits; timm's PosterizeIncreasing at magnitude 10 and the 'v0' policy ask for it."""
    img = images(1)[0]
    assert np.asarray(_posterize(img, 0)).max() == 0
    assert np.array_equal(np.asarray(_posterize(img, 8)), np.asarray(img))
    tf = build_train_transform(inputs(image_size=16), augment(auto_augment="rand-n2-m10-mstd0-inc1"))
    ops = next(t for t in tf.transforms if type(t).__name__ == "RandAugment").ops
    assert [op.aug_fn for op in ops if op.name == "PosterizeIncreasing"] == [_posterize]
    small = Image.fromarray(np.random.RandomState(2).randint(0, 256, (20, 20, 3), dtype=np.uint8))
    for policy in ("rand-n2-m10-mstd0-inc1", "v0"):
        tf = build_train_transform(inputs(image_size=16), augment(auto_augment=policy))
        run(tf, [small] * 200, 0)  # would raise ValueError with Pillow >= 13 without the fix


# -- mixup / cutmix ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mixup,cutmix", [(0.1, 1.0), (0.2, 0.0), (0.0, 1.0)])
def test_mixup_targets_sum_to_one(mixup, cutmix):
    aug = augment(mixup=mixup, cutmix=cutmix)
    mix = build_mixup(aug, num_classes=10, label_smoothing=0.1)
    assert type(mix).__name__ == "Mixup" and (mix.mixup_alpha, mix.cutmix_alpha) == (mixup, cutmix)
    assert type(build_train_criterion(aug, 0.1)).__name__ == "SoftTargetCrossEntropy"
    np.random.seed(0)
    x, y = torch.rand(8, 3, 16, 16), torch.arange(8)
    mixed, targets = mix(x.clone(), y)
    assert targets.shape == (8, 10)
    torch.testing.assert_close(targets.sum(1), torch.ones(8))
    assert targets.max() < 1.0 and not torch.equal(mixed, x)
    loss = build_train_criterion(aug, 0.1)(torch.randn(8, 10), targets)
    assert loss.ndim == 0 and math.isfinite(loss.item())


def test_no_mixup_by_default():
    assert build_mixup(augment(), 10, 0.1) is None
    assert build_mixup(augment(mixup=0.2, mixup_prob=0.0), 10, 0.1) is None
    criterion = build_train_criterion(augment(), 0.1)
    assert isinstance(criterion, torch.nn.CrossEntropyLoss) and criterion.label_smoothing == 0.1
    spec_from_dict({"data": {"batch_size": 33}})
    with pytest.raises(CvlabError, match="data.batch_size must be even"):
        spec_from_dict({"data": {"batch_size": 33, "augment": {"cutmix": 1.0}}})


def test_mixup_uses_the_configured_probabilities():
    """`data.augment.mixup_prob` and `switch_prob` reach timm's Mixup: with mixup_prob 0.5 about half the
    batches are mixed (each draw is one batch), with 1.0 all of them."""
    def mixed_fraction(prob, batches=400):
        mix = build_mixup(augment(mixup=1.0, mixup_prob=prob, switch_prob=0.25), 4, 0.0)  # lam uniform
        assert (mix.mix_prob, mix.switch_prob) == (prob, 0.25)
        np.random.seed(0)
        hard = 0
        for _ in range(batches):
            _, targets = mix(torch.rand(2, 3, 4, 4), torch.tensor([0, 1]))
            hard += int(targets.max() == 1.0)  # an unmixed batch keeps one-hot targets
        return 1 - hard / batches

    assert mixed_fraction(1.0) == 1.0
    assert 0.4 < mixed_fraction(0.5) < 0.6


def test_mixup_mixes_whole_batches_and_smooths_nothing_by_default():
    mix = build_mixup(augment(mixup=0.2, cutmix=1.0), num_classes=7)
    assert (mix.mode, mix.label_smoothing, mix.num_classes) == ("batch", 0.0, 7)
    assert build_train_criterion(augment()).label_smoothing == 0.0


def test_label_smoothing_is_folded_into_mixed_targets():
    """Under mixup the targets carry `optim.label_smoothing` (off value s/K, as CrossEntropyLoss does); the
    soft-target loss then equals cross-entropy with that smoothing when nothing is mixed in."""
    k, s = 10, 0.2
    mix = build_mixup(augment(mixup=0.2, mixup_prob=1.0), k, label_smoothing=s)
    np.random.seed(0)
    _, targets = mix(torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))
    assert targets[:, 4:].unique().tolist() == pytest.approx([s / k])  # classes in neither image of a pair
    one_hot_smoothed = torch.full((1, k), s / k)
    one_hot_smoothed[0, 3] = 1 - s + s / k
    logits = torch.randn(1, k)
    torch.testing.assert_close(build_train_criterion(augment(mixup=0.2), s)(logits, one_hot_smoothed),
                               torch.nn.CrossEntropyLoss(label_smoothing=s)(logits, torch.tensor([3])))


def test_ema_averages_with_the_configured_decay():
    """After the first step (a copy) every step gives decay * ema + (1 - decay) * weights, with the decay
    from `optim.ema_decay`, not a fixed one."""
    for decay in (0.5, 0.9):
        model = torch.nn.Linear(1, 1, bias=False)
        ema = create_ema(model, decay)
        with torch.no_grad():
            model.weight.fill_(2.0)
        update_ema(ema, model, 1)
        with torch.no_grad():
            model.weight.fill_(4.0)
        update_ema(ema, model, 2)
        assert ema.module.weight.item() == pytest.approx(decay * 2.0 + (1 - decay) * 4.0)


# -- model EMA -----------------------------------------------------------------------------------------------
def _small_net():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4))


def _train_steps(model, ema, steps, first_step):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(first_step, first_step + steps):
        x = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(step))
        loss = (model(x) - 1.0).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        update_ema(ema, model, step)


def test_ema_differs_from_live_weights_and_survives_a_checkpoint(tmp_path):
    assert create_ema(torch.nn.Linear(2, 2), None) is None
    with pytest.raises(ValueError, match="optim.ema_decay"):
        create_ema(torch.nn.Linear(2, 2), 1.0)
    torch.manual_seed(0)
    model = _small_net()
    ema = create_ema(model, 0.9)
    _train_steps(model, ema, 1, first_step=1)  # step 1: the EMA copies the weights
    assert all(torch.equal(a, b) for a, b in zip(ema.module.state_dict().values(), model.state_dict().values()))
    _train_steps(model, ema, 3, first_step=2)
    live, averaged = model.state_dict(), ema_state_dict(ema)
    assert list(averaged) == list(live)
    for key in ("0.weight", "5.weight", "1.running_mean"):  # weights and BN statistics are averaged
        assert not torch.equal(averaged[key], live[key]), key
        assert torch.isfinite(averaged[key]).all()
    assert torch.equal(averaged["1.num_batches_tracked"], live["1.num_batches_tracked"])

    torch.save({"ema": averaged, "model": live}, tmp_path / "state.pt")
    saved = torch.load(tmp_path / "state.pt", weights_only=True)
    resumed_model = _small_net()
    resumed_model.load_state_dict(saved["model"])
    resumed = create_ema(resumed_model, 0.9)
    load_ema_state_dict(resumed, saved["ema"])
    _train_steps(model, ema, 2, first_step=5)  # the uninterrupted run and the resumed one go on alike
    _train_steps(resumed_model, resumed, 2, first_step=5)
    for (key, a), b in zip(ema_state_dict(ema).items(), ema_state_dict(resumed).values(), strict=True):
        assert torch.equal(a, b), key


@pytest.mark.parametrize("decay", [0.0, 1.0, 0, -0.5, 1.5, True, "0.9", float("nan")])
def test_ema_decay_outside_the_open_interval_is_refused(decay):
    with pytest.raises(ValueError) as err:
        create_ema(torch.nn.Linear(2, 2), decay)
    assert str(err.value) == f"optim.ema_decay must be null or a number in (0, 1), got {decay!r}"


def test_ema_state_is_a_snapshot_and_loads_strictly():
    """`ema_state_dict` copies (later steps leave a saved state alone); `load_ema_state_dict` wants every key."""
    model = torch.nn.Linear(1, 1, bias=False)
    ema = create_ema(model, 0.5)
    update_ema(ema, model, 1)
    state = ema_state_dict(ema)
    before = state["weight"].clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    update_ema(ema, model, 2)
    assert torch.equal(state["weight"], before) and not torch.equal(ema.module.weight, before)
    with pytest.raises(RuntimeError, match='Missing key\\(s\\) in state_dict: "weight"'):
        load_ema_state_dict(ema, {})
    with pytest.raises(RuntimeError, match='Unexpected key\\(s\\) in state_dict: "extra"'):
        load_ema_state_dict(ema, {**state, "extra": torch.ones(1)})


def test_ema_of_a_ddp_style_wrapper_averages_the_bare_network():
    net = _small_net()
    net.arch_name = "tiny"  # registry models carry arch_name: the EMA copy can be saved like the model
    wrapper = torch.nn.Module()
    wrapper.module = net  # what DDP looks like from outside
    ema = create_ema(wrapper, 0.99)
    assert ema.module.arch_name == "tiny" and list(ema.module.state_dict()) == list(net.state_dict())
    update_ema(ema, wrapper, 1)
    update_ema(None, wrapper, 2)  # EMA off: nothing to do


# -- validation (by the schema, before anything runs) -------------------------------------------------------
@pytest.mark.parametrize("kwargs,key", [
    ({"scale": (0.5, 0.2)}, "data.augment.scale"),
    ({"scale": (0.0, 1.0)}, "data.augment.scale"),
    ({"scale": (0.1, 1.5)}, "data.augment.scale"),
    ({"scale": (0.1,)}, "data.augment.scale"),
    ({"ratio": (2.0, 1.0)}, "data.augment.ratio"),
    ({"hflip": 1.5}, "data.augment.hflip"),
    ({"hflip": True}, "data.augment.hflip"),
    ({"re_prob": -0.1}, "data.augment.re_prob"),
    ({"mixup_prob": 2}, "data.augment.mixup_prob"),
    ({"switch_prob": float("nan")}, "data.augment.switch_prob"),
    ({"mixup": -1.0}, "data.augment.mixup"),
    ({"cutmix": "lots"}, "data.augment.cutmix"),
    ({"auto_augment": "rand-x9"}, "data.augment.auto_augment"),
    ({"auto_augment": "fancy"}, "data.augment.auto_augment"),
    ({"auto_augment": 42}, "data.augment.auto_augment"),
    ({"color_jitter": (0.1, 0.2)}, "data.augment.color_jitter"),
    ({"color_jitter": -0.4}, "data.augment.color_jitter"),
    ({"color_jitter": (0.1, 0.1, 0.1, 0.9)}, "data.augment.color_jitter"),
    ({"color_jitter": 0.4, "auto_augment": "rand-m9-mstd0.5-inc1"}, "data.augment.color_jitter"),
])
def test_bad_augment_values_name_their_key(kwargs, key):
    with pytest.raises(CvlabError, match="^<dict>: " + re.escape(key)):
        spec_from_dict({"data": {"augment": kwargs}})


@pytest.mark.parametrize("kwargs,key", [
    ({"mean": (0.5,)}, "data.mean"),
    ({"grayscale": True}, "data.mean"),
    ({"std": (0.2, 0.2, 0.0)}, "data.std"),
    ({"std": "0.2"}, "data.std"),
    ({"interpolation": "lanczos"}, "data.interpolation"),
    ({"image_size": 0}, "data.image_size"),
    ({"image_size": 224, "val_resize": 200}, "data.val_resize"),
    ({"grayscale": "maybe"}, "data.grayscale"),
])
def test_bad_input_values_name_their_key(kwargs, key):
    with pytest.raises(CvlabError, match="^<dict>: " + re.escape(key)):
        spec_from_dict({"data": kwargs})


def test_configs_normalise_lists_and_read_the_data_section():
    aug = augment(scale=[0.35, 1], color_jitter=[0.4, 0.4, 0.4], auto_augment=None)
    assert aug.scale == (0.35, 1.0) and aug.color_jitter == (0.4, 0.4, 0.4)
    assert augment(color_jitter=0.3, auto_augment="3a").color_jitter == 0.3  # timm keeps jitter for 3a
    spec = spec_from_dict({"data": {"root": "x", "image_size": 32, "val_resize": None, "mean": [0.5], "std": [0.5],
                                    "grayscale": True, "batch_size": 16}})
    inp = input_config(spec.data)  # the data section's other keys are not the network's
    assert inp == InputConfig(mean=(0.5,), std=(0.5,), grayscale=True, interpolation="bilinear", image_size=32,
                              val_resize=None)
    assert (inp.image_size, inp.mean, inp.channels, inp.resolved_val_resize) == (32, (0.5,), 1, 37)
    assert augment() == AugmentConfig(scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5, auto_augment=None,
                                      color_jitter=None, re_prob=0.0, mixup=0.0, cutmix=0.0, mixup_prob=1.0,
                                      switch_prob=0.5)  # the paper recipe: the schema's defaults
    with pytest.raises(Exception):  # frozen
        inp.image_size = 64


def test_ema_state_is_a_copy_and_restores_strictly():
    """`ema_state_dict` is a snapshot (later updates do not change it); `load_ema_state_dict` refuses a state
    with a missing key; a decay of 0 or 1 is refused."""
    model = torch.nn.Linear(2, 2)
    ema = create_ema(model, 0.5)
    saved = ema_state_dict(ema)
    before = saved["weight"].clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    update_ema(ema, model, 1)  # step 1 copies the live weights into the EMA
    assert torch.equal(saved["weight"], before) and not torch.equal(ema.module.weight, before)
    with pytest.raises(RuntimeError, match="Missing key"):
        load_ema_state_dict(ema, {"weight": before})
    for decay in (0.0, 1.0, True):
        with pytest.raises(ValueError, match="optim.ema_decay"):
            create_ema(model, decay)


def test_even_batches_pass_the_mixup_batch_check():
    for size in (2, 32, 256):
        spec_from_dict({"data": {"batch_size": size, "augment": {"cutmix": 1.0}}})
