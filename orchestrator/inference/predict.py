"""`cvlab predict`: the top classes of images under a trained classifier, and optionally its kernel maps."""
from __future__ import annotations

import logging
import os
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from orchestrator.errors import CvlabError
from workloads.classification.transforms import build_val_transform
from workloads.models import visualize_kernels

log = logging.getLogger(__name__)


def load_image(path: str, grayscale: bool):
    try:
        with Image.open(path) as im:
            return im.convert("L" if grayscale else "RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise CvlabError(f"cannot read image {path}: {err}") from err


def predict_images(classifier, paths: list[str], topk: int = 5) -> list[dict[str, Any]]:
    """For each image: {"image", "top": [(class, probability), ...]} (best first), with the validation
    transform the classifier was trained with."""
    if topk < 1:
        raise CvlabError(f"--topk must be >= 1, got {topk}")
    transform = build_val_transform(classifier.inputs)
    batch = torch.stack([transform(load_image(p, classifier.inputs.grayscale)) for p in paths])
    with torch.no_grad():
        probs = torch.softmax(classifier.model(batch), dim=1)
    k = min(topk, probs.shape[1])
    values, indices = probs.topk(k, dim=1)
    return [{"image": p, "top": [(classifier.classes[i], float(v)) for v, i in zip(vs.tolist(), ix.tolist())]}
            for p, vs, ix in zip(paths, values, indices)]


def write_kernel_maps(classifier, paths: list[str], out_dir: str) -> list[str]:
    """The involution kernel maps (`workloads.models.visualize_kernels`) of each image, as PNGs in `out_dir`,
    for the model input the validation transform makes of it."""
    os.makedirs(out_dir, exist_ok=True)
    transform = build_val_transform(classifier.inputs)
    written = []
    for path in paths:
        out = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + "_kernels.png")
        image = transform(load_image(path, classifier.inputs.grayscale))[None]
        try:
            written.append(visualize_kernels(classifier.model, image, out_png=out))
        except ValueError as err:  # e.g. the ResNet baseline generates no kernels
            raise CvlabError(f"--kernels: {err}") from err
    return written
