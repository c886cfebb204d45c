# ruff: noqa: C408  (mmseg configs are written as dict(...))
"""Turn an mmseg config plus the experiment's `segmentation` section into the final mmengine Config.

Done on the driver, so a broken config, data root or checkpoint fails before any Ray worker starts.

    cfg = build_config(spec.segmentation, work_dir="work_dirs/cvlab-seg", seed=0, log_every=10,
                       checkpoints_kept=2)
    num_params = check_model(cfg)          # the model built on the meta device (config errors surface here)
"""
from __future__ import annotations

import copy
from pathlib import Path

from workloads.mmlab import configs
from workloads.mmlab.norm import set_norm_type
from workloads.mmlab.worker_config import SYNC_BN_MODES
from workloads.models import count_flops

from . import CLASSES, CONFIG_DIR, PALETTE, SCOPE

WHAT = "segmentation.config"
PRETRAINED_FORMATS = ("cvlab", "mmcls")


def resolve_config_path(name: str) -> Path:
    """A config path as given, or a file under `workloads/segmentation/configs/` (".py" optional)."""
    return configs.resolve_config_path(name, CONFIG_DIR, WHAT)


def list_configs() -> list[str]:
    return configs.list_configs(CONFIG_DIR)


def load_config(name: str):
    return configs.load_config(name, CONFIG_DIR, WHAT)


def _loaders(cfg):
    """(split, loader) of the train, val and test data loaders the config has."""
    for name, split in (("train_dataloader", "train"), ("val_dataloader", "val"), ("test_dataloader", "val")):
        loader = cfg.get(name)
        if loader is not None:
            yield split, loader


def _set_crop(cfg, crop_size) -> None:
    crop = tuple(int(s) for s in crop_size)
    if len(crop) != 2 or min(crop) < 32:
        raise ValueError(f"segmentation.crop_size={list(crop_size)}: expected [height, width], each >= 32")
    found = False
    for step in cfg.train_dataloader.dataset.pipeline:
        if step.get("type") == "RandomCrop":
            step["crop_size"] = crop
            found = True
    if not found:
        raise ValueError(f"segmentation.crop_size is set but the train pipeline of {cfg.filename} has no "
                         "RandomCrop step")
    cfg.model.data_preprocessor["size"] = crop  # batches are padded to the crop size


def _set_iterations(cfg, max_iters: int, val_interval: int) -> None:
    if max_iters < 1 or val_interval < 1:
        raise ValueError(f"segmentation.max_iters={max_iters} and val_interval={val_interval} must be >= 1")
    old = cfg.train_cfg.get("max_iters")
    cfg.train_cfg.update(type="IterBasedTrainLoop", max_iters=max_iters, val_interval=val_interval)
    # Schedules that ran to the config's last iteration now run to the new one.
    for sched in cfg.get("param_scheduler") or []:
        if not sched.get("by_epoch", True) and sched.get("end") in (old, None):
            sched["end"] = max_iters


def _check_schedule(cfg) -> None:
    max_iters = cfg.train_cfg.max_iters
    for sched in cfg.get("param_scheduler") or []:
        if not sched.get("by_epoch", True) and sched.get("begin", 0) >= max_iters:
            raise ValueError(f"segmentation.max_iters={max_iters}: the config's {sched['type']} schedule "
                             f"begins at iteration {sched['begin']} (shorten it with segmentation.overrides)")


def build_config(seg, *, work_dir: str, seed: int = 0, log_every: int = 10, checkpoints_kept: int = 2,
                 classes: list[str] | None = None):
    """The final Config for the `seg` section (anything with its attributes: config, data_root, crop_size,
    batch_size, max_iters, val_interval, overrides, pretrained, pretrained_format, num_data_workers,
    sync_bn). `classes`: a subset of the 19 Cityscapes classes (mmseg maps the others to ignore)."""
    cfg = load_config(seg.config)
    root = str(Path(seg.data_root).resolve())
    classes = tuple(classes or CLASSES)
    unknown = [c for c in classes if c not in CLASSES]
    if unknown:
        raise ValueError(f"classes {unknown} are not Cityscapes classes ({', '.join(CLASSES)})")
    if configs.set_num_classes(cfg.model, len(classes)) == 0:
        raise ValueError(f"{seg.config}: found no num_classes in the model to set to {len(classes)}")

    for split, loader in _loaders(cfg):
        ds = loader["dataset"]
        ds["data_root"] = root
        ds["data_prefix"] = dict(img_path=f"leftImg8bit/{split}", seg_map_path=f"gtFine/{split}")
        if classes != CLASSES:
            ds["metainfo"] = dict(classes=classes, palette=[PALETTE[CLASSES.index(c)] for c in classes])
        loader["num_workers"] = seg.num_data_workers
        loader["persistent_workers"] = seg.num_data_workers > 0
    if seg.batch_size < 1:
        raise ValueError(f"segmentation.batch_size={seg.batch_size} must be >= 1")
    cfg.train_dataloader["batch_size"] = seg.batch_size
    if seg.crop_size:
        _set_crop(cfg, seg.crop_size)

    _set_iterations(cfg, seg.max_iters, seg.val_interval)
    if seg.pretrained:
        ckpt = Path(seg.pretrained)
        if not ckpt.is_file():
            raise ValueError(f"segmentation.pretrained={seg.pretrained!r}: no such checkpoint file")
        if seg.pretrained_format not in PRETRAINED_FORMATS:
            raise ValueError(f"segmentation.pretrained_format={seg.pretrained_format!r}: expected one of "
                             f"{PRETRAINED_FORMATS}")
        cfg.model.backbone["init_cfg"] = dict(type="Pretrained", checkpoint=str(ckpt.resolve()),
                                              format=seg.pretrained_format)
    if seg.sync_bn not in SYNC_BN_MODES:
        raise ValueError(f"segmentation.sync_bn={seg.sync_bn!r}: expected one of {SYNC_BN_MODES}")
    if seg.sync_bn == "off":
        set_norm_type(cfg.model, "BN")

    hooks = cfg.default_hooks
    # A checkpoint at every validation: that is what Ray Train reports and restores from.
    hooks.checkpoint.update(by_epoch=False, interval=seg.val_interval, max_keep_ckpts=checkpoints_kept,
                            save_last=True)
    hooks.logger.update(interval=log_every, log_metric_by_epoch=False)
    configs.apply_run_settings(cfg, seg, work_dir=work_dir, seed=seed, log_every=log_every, by_epoch=False,
                       visualizer="SegLocalVisualizer")
    _check_schedule(cfg)
    # mmseg's inference API (the end-of-run overlays) reads the top-level test pipeline.
    cfg.test_pipeline = copy.deepcopy(cfg.val_dataloader.dataset.pipeline)
    return cfg


def build_model_on_meta(cfg):
    """The segmentor of `cfg` on the meta device (no weights allocated or initialised)."""
    return configs.build_on_meta(cfg.model, SCOPE)


def check_model(cfg) -> int:
    """Build the model on the meta device (bad configs fail here, with ValueError); its parameter count."""
    try:
        model = build_model_on_meta(cfg)
    except Exception as err:  # noqa: BLE001 - mmseg raises KeyError, TypeError, ValueError, AssertionError
        raise ValueError(f"cannot build the model of {cfg.filename}: {type(err).__name__}: {err}") from None
    return sum(p.numel() for p in model.parameters())


def model_size(name: str, input_hw=(1024, 2048)) -> tuple[int, int]:
    """(parameters, inference multiply-accumulates at `input_hw`) of a config's segmentor, with the 19
    Cityscapes classes of its config. Parameters include the auxiliary head (training only); the MACs are
    those of `workloads.models.count_flops` on the inference path (auxiliary head left out)."""
    cfg = load_config(name)
    params = sum(p.numel() for p in build_model_on_meta(cfg).parameters())
    infer = copy.deepcopy(cfg)
    infer.model.auxiliary_head = None
    macs = count_flops(build_model_on_meta(infer), (1, 3, *input_hw))
    return params, macs
