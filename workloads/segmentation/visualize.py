"""Prediction overlays for the end of a run: image | ground truth | prediction, in the Cityscapes palette.

    model = load_segmentor(cfg, "epoch_ckpt.pth", device="cpu")     # an mmseg model with its weights
    paths = write_overlays(model, val_samples("data/cityscapes", 4), "overlays/")
Ground truth and prediction are blended over the image; ignored pixels (255) of the ground truth show
the image only; the prediction is shown everywhere.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from mmengine.config import Config
from mmengine.registry import DefaultScope
from mmseg.apis import inference_model, init_model
from PIL import Image

import workloads.segmentation.plugin  # noqa: F401  (our components, for init_model)
from workloads.mmlab.checkpoints import allow_mmengine_checkpoints
from workloads.mmlab.norm import set_norm_type

from . import PALETTE, SCOPE
from .cityscapes import label_path, list_images


def colorize(label: np.ndarray, palette: Sequence[Sequence[int]] = PALETTE) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 colours; ignore and unknown ids are black."""
    table = np.zeros((256, 3), np.uint8)
    table[: len(palette)] = np.asarray(palette, np.uint8)
    return table[np.asarray(label, np.uint8)]


def blend(image: np.ndarray, label: np.ndarray, palette=PALETTE, alpha: float = 0.6) -> np.ndarray:
    """The label's colours over an (H, W, 3) RGB image (pixels with ignore or unknown ids left as they are)."""
    colours = colorize(label, palette).astype(np.float32)
    known = (np.asarray(label) < len(palette))[..., None]
    mixed = np.where(known, alpha * colours + (1 - alpha) * image.astype(np.float32), image)
    return mixed.astype(np.uint8)


def overlay_panel(image: np.ndarray, gt: np.ndarray, pred: np.ndarray, palette=PALETTE) -> np.ndarray:
    """[image | ground truth | prediction] side by side, separated by 4 white columns."""
    if not (image.shape[:2] == gt.shape == pred.shape):
        raise ValueError(f"image {image.shape[:2]}, ground truth {gt.shape} and prediction {pred.shape} "
                         "must have the same height and width")
    gap = np.full((image.shape[0], 4, 3), 255, np.uint8)
    return np.concatenate([image, gap, blend(image, gt, palette), gap, blend(image, pred, palette)], axis=1)


def val_samples(data_root, n: int = 4, split: str = "val") -> list[tuple[Path, Path]]:
    """The first `n` (image, trainIds label) pairs of a split in the Cityscapes layout."""
    pairs = [(img, label_path(data_root, split, img)) for img in list_images(data_root, split)]
    return [p for p in pairs if p[1].is_file()][:n]


def load_segmentor(cfg, checkpoint=None, device: str = "cpu"):
    """An mmseg model in eval mode from a config (Config or path) and an mmengine checkpoint (loaded under
    the allow-list, with weights_only=True). On CPU every BN is a plain BN (SyncBN refuses CPU tensors)."""
    cfg = Config.fromfile(str(cfg)) if isinstance(cfg, (str, Path)) else copy.deepcopy(cfg)
    if not str(device).startswith("cuda"):
        set_norm_type(cfg.model, "BN")
    cfg.model.backbone["init_cfg"] = None  # the checkpoint holds the weights
    # init_model sets mmseg as the process's default scope: undone on leaving (mmdet builds stay mmdet's).
    with allow_mmengine_checkpoints(), DefaultScope.overwrite_default_scope(SCOPE):
        return init_model(cfg, str(checkpoint) if checkpoint else None, device=device)


def predict(model, image_path) -> np.ndarray:
    """The (H, W) predicted class ids of one image file, at the image's size."""
    with DefaultScope.overwrite_default_scope(SCOPE):  # the test pipeline's transforms are mmseg's
        result = inference_model(model, str(image_path))
    return result.pred_sem_seg.data[0].cpu().numpy().astype(np.uint8)


def write_overlays(model, samples: Sequence[tuple], out_dir, palette=None) -> list[Path]:
    """One PNG per (image, label) sample in `out_dir`, named after the image; returns the paths."""
    palette = palette or (getattr(model, "dataset_meta", None) or {}).get("palette") or PALETTE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for image_path, gt_path in samples:
        image = np.asarray(Image.open(image_path).convert("RGB"))
        gt = np.asarray(Image.open(gt_path))
        pred = predict(model, image_path)
        out = out_dir / (Path(image_path).name.replace("_leftImg8bit.png", "") + "_overlay.png")
        Image.fromarray(overlay_panel(image, gt, pred, palette)).save(out)
        written.append(out)
    return written
