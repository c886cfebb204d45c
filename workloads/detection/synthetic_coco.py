"""A tiny COCO-format detection / instance-segmentation dataset of simple shapes (no network needed).

    make_coco("data/tiny-coco", num_train=32, num_val=8, size=128, classes=("circle", "square", "triangle"))

writes the real COCO layout that mmdet's `CocoDataset` reads:

    root/annotations/instances_train2017.json, root/annotations/instances_val2017.json
    root/train2017/000000000001.jpg ..., root/val2017/...

Each image holds 1-3 non-overlapping filled shapes on a noisy background; every shape has its box
(`[x, y, w, h]`), its polygon mask (`segmentation`) and the polygon's area.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "hexagon")
DEFAULT_CLASSES = ("circle", "square", "triangle")


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a shape of circumradius r centred at (cx, cy)."""
    if shape == "circle":
        n, start = 32, 0.0
    elif shape == "square":
        n, start = 4, math.pi / 4 + angle
    elif shape == "triangle":
        n, start = 3, -math.pi / 2 + angle
    elif shape == "diamond":
        n, start = 4, angle * 0.2  # a square standing on a corner
    elif shape == "hexagon":
        n, start = 6, angle
    else:  # guarded by _resolve_classes
        raise ValueError(shape)
    return [(cx + r * math.cos(start + 2 * math.pi * k / n), cy + r * math.sin(start + 2 * math.pi * k / n))
            for k in range(n)]


def _area(poly: list[tuple[float, float]]) -> float:
    return 0.5 * abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(poly, poly[1:] + poly[:1])))


def _resolve_classes(classes) -> tuple[str, ...]:
    if isinstance(classes, int):
        if not 1 <= classes <= len(SHAPES):
            raise ValueError(f"classes={classes}: expected 1..{len(SHAPES)} (shapes: {', '.join(SHAPES)})")
        return SHAPES[:classes]
    names = tuple(classes)
    bad = [c for c in names if c not in SHAPES]
    if not names or bad or len(set(names)) != len(names):
        raise ValueError(f"classes={list(names)}: expected distinct names among {', '.join(SHAPES)}")
    return names


def _make_split(root: Path, split: str, n: int, size: int, classes: Sequence[str], rng: np.random.Generator,
                first_image_id: int, first_ann_id: int) -> dict:
    img_dir = root / f"{split}2017"
    img_dir.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    ann_id = first_ann_id
    for i in range(n):
        image_id = first_image_id + i
        bg = rng.integers(40, 110, size=3)
        pixels = np.clip(bg + rng.normal(0, 12, size=(size, size, 3)), 0, 255).astype(np.uint8)
        img = Image.fromarray(pixels)
        draw = ImageDraw.Draw(img)
        placed: list[tuple[float, float, float]] = []
        for _ in range(int(rng.integers(1, 4))):
            for _try in range(20):  # rejection sampling: shapes must not overlap
                r = float(rng.uniform(0.12, 0.25) * size)
                cx, cy = (float(v) for v in rng.uniform(r + 1, size - r - 1, size=2))
                if all(math.hypot(cx - px, cy - py) > r + pr + 2 for px, py, pr in placed):
                    break
            else:
                continue
            placed.append((cx, cy, r))
            label = int(rng.integers(len(classes)))
            poly = _polygon(classes[label], cx, cy, r, float(rng.uniform(0, math.pi / 2)))
            color = tuple(int(c) for c in rng.integers(150, 256, size=3))
            draw.polygon(poly, fill=color)
            xs, ys = [p[0] for p in poly], [p[1] for p in poly]
            x0, y0 = max(0.0, min(xs)), max(0.0, min(ys))
            x1, y1 = min(float(size), max(xs)), min(float(size), max(ys))
            anns.append({
                "id": ann_id, "image_id": image_id, "category_id": label + 1,
                "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                "area": round(_area(poly), 2), "iscrowd": 0,
                "segmentation": [[round(v, 2) for p in poly for v in p]],
            })
            ann_id += 1
        file_name = f"{image_id:012d}.jpg"
        img.save(img_dir / file_name, quality=95)
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
    coco = {
        "info": {"description": f"cvolution-lab synthetic shapes ({split})", "version": "1.0"},
        "licenses": [],
        "images": images,
        "annotations": anns,
        "categories": [{"id": k + 1, "name": c, "supercategory": "shape"} for k, c in enumerate(classes)],
    }
    ann_file = root / "annotations" / f"instances_{split}2017.json"
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    ann_file.write_text(json.dumps(coco))
    return {"ann_file": str(ann_file), "images": len(images), "annotations": len(anns)}


def make_coco(root, num_train: int = 32, num_val: int = 8, size: int = 128,
              classes: int | Sequence[str] = DEFAULT_CLASSES, seed: int = 0, *,
              images: int | None = None, val_images: int | None = None) -> dict:
    """Write the dataset under `root` and return a summary dict (paths, counts, class names).

    `classes` is a count (the first N of `SHAPES`) or a list of shape names. `images` / `val_images` are
    aliases of `num_train` / `num_val` (the names of the `cvlab data make-coco` options). Raises ValueError
    on bad input.
    """
    num_train = num_train if images is None else images
    num_val = num_val if val_images is None else val_images
    names = _resolve_classes(classes)
    if num_train < 1 or num_val < 1:
        raise ValueError(f"num_train={num_train}, num_val={num_val}: both must be >= 1")
    if size < 32:
        raise ValueError(f"size={size}: images must be at least 32 px")
    root = Path(root)
    rng = np.random.default_rng(seed)
    train = _make_split(root, "train", num_train, size, names, rng, first_image_id=1, first_ann_id=1)
    val = _make_split(root, "val", num_val, size, names, rng, first_image_id=num_train + 1,
                      first_ann_id=train["annotations"] + 1)
    return {"root": str(root), "classes": list(names), "size": size, "train": train, "val": val}
