# ruff: noqa: C408  (mmdet configs are written as dict(...))
"""Turn an mmdet config plus the experiment's `detection` section into the final mmengine Config.

Done on the driver, so a broken config or data root fails before any Ray worker starts.
"""
from __future__ import annotations

import json
from pathlib import Path

from workloads.mmlab import configs

from . import CONFIG_DIR

ANN = "annotations/instances_{split}2017.json"


def resolve_config_path(name: str) -> Path:
    """A config path as given, or a file under `workloads/detection/configs/` (".py" optional)."""
    return configs.resolve_config_path(name, CONFIG_DIR, "detection.config")


def list_configs() -> list[str]:
    return configs.list_configs(CONFIG_DIR)


def load_config(name: str):
    return configs.load_config(name, CONFIG_DIR, "detection.config")


def classes_from_annotations(data_root) -> list[str]:
    cats = json.loads((Path(data_root) / ANN.format(split="train")).read_text())["categories"]
    return [c["name"] for c in sorted(cats, key=lambda c: c["id"])]


def _datasets(loader: dict) -> list[dict]:
    ds = loader["dataset"]
    # Wrappers (RepeatDataset, ConcatDataset) keep the real dataset(s) one level down.
    if "dataset" in ds:
        return [ds["dataset"]]
    if "datasets" in ds:
        return list(ds["datasets"])
    return [ds]


def _set_resize(pipeline: list, scale) -> None:
    for step in pipeline:
        if step.get("type") in ("Resize", "RandomResize", "RandomChoiceResize"):
            step["type"] = "Resize"
            step.pop("scales", None)
            step.pop("resize_type", None)
            step["scale"] = tuple(scale)
            step["keep_ratio"] = True


def build_config(det, *, work_dir: str, seed: int = 0, log_every: int = 10, checkpoint_every: int = 1,
                 checkpoints_kept: int = 2, classes: list[str] | None = None):
    """The final Config for the `det` section (a `DetectionSection` or anything with its attributes)."""
    cfg = load_config(det.config)
    root = str(Path(det.data_root).resolve())
    classes = list(classes or det.classes or classes_from_annotations(root))
    metainfo = dict(classes=tuple(classes))

    n = configs.set_num_classes(cfg.model, len(classes))
    if n == 0:
        raise ValueError(f"{det.config}: found no num_classes in the model to set to {len(classes)}")

    for split, name in (("train", "train_dataloader"), ("val", "val_dataloader"), ("val", "test_dataloader")):
        loader = cfg.get(name)
        if loader is None:
            continue
        for ds in _datasets(loader):
            ds["data_root"] = root
            ds["ann_file"] = ANN.format(split=split)
            ds["data_prefix"] = dict(img=f"{split}2017/")
            ds["metainfo"] = metainfo
            if det.image_scale:
                _set_resize(ds["pipeline"], det.image_scale)
        loader["num_workers"] = det.num_data_workers
        loader["persistent_workers"] = det.num_data_workers > 0
    cfg.train_dataloader["batch_size"] = det.batch_size
    for name in ("val_evaluator", "test_evaluator"):
        ev = cfg.get(name)
        for e in ev if isinstance(ev, list) else [ev] if ev else []:
            e["ann_file"] = str(Path(root) / ANN.format(split="val"))

    cfg.train_cfg["max_epochs"] = det.max_epochs
    cfg.train_cfg["val_interval"] = det.val_interval
    base_epochs = 12
    for sched in cfg.get("param_scheduler") or []:
        if sched.get("type") == "MultiStepLR" and sched.get("by_epoch", True):
            base_epochs = sched.get("end", base_epochs)
            # Keep the step positions relative to the schedule (8 and 11 of 12 epochs).
            sched["milestones"] = [max(1, round(m * det.max_epochs / base_epochs)) for m in sched["milestones"]]
            sched["end"] = det.max_epochs
        elif sched.get("type") == "LinearLR" and not sched.get("by_epoch", True) and det.warmup_iters:
            sched["end"] = det.warmup_iters
    cfg.auto_scale_lr = dict(enable=bool(det.auto_scale_lr),
                             base_batch_size=(cfg.get("auto_scale_lr") or {}).get("base_batch_size", 16))

    if det.pretrained:
        ckpt = Path(det.pretrained)
        if not ckpt.is_file():
            raise ValueError(f"detection.pretrained={det.pretrained!r}: no such checkpoint file")
        cfg.model.backbone["init_cfg"] = dict(type="Pretrained", checkpoint=str(ckpt.resolve()))

    hooks = cfg.default_hooks
    hooks.checkpoint.update(interval=checkpoint_every, max_keep_ckpts=checkpoints_kept, by_epoch=True)
    hooks.logger.update(interval=log_every)
    configs.apply_run_settings(cfg, det, work_dir=work_dir, seed=seed, log_every=log_every, by_epoch=True,
                       visualizer="DetLocalVisualizer")
    return cfg
