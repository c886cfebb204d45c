"""Validate COCO annotation files before any worker starts (clear messages instead of crashes in a worker).

Errors (raise ValueError listing up to 5 examples each):
  - the file is missing, not JSON, or lacks `images` / `annotations` / `categories`;
  - duplicate image or category ids; an annotation whose `image_id` names no image (dangling) or whose
    `category_id` names no category; a `bbox` that is not 4 numbers;
  - a box reaching outside its image by more than 1 px (COCO's own boxes touch the border with rounding);
  - no usable annotation at all in a training split; image files that do not exist.
Documented skips (returned as warnings, never errors), matching what mmdet's `CocoDataset` does:
  - boxes with width or height < 1 px or area <= 0 are ignored by `CocoDataset`;
  - images with no annotation are dropped from training (`filter_empty_gt=True`) and kept in evaluation.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

TOLERANCE_PX = 1.0


def _examples(items: list, k: int = 5) -> str:
    more = f" (and {len(items) - k} more)" if len(items) > k else ""
    return ", ".join(str(i) for i in items[:k]) + more


def check_coco_file(ann_file, img_dir=None, *, split: str = "train") -> dict:
    """Check one annotation file (and, when given, that its images exist in `img_dir`).

    Returns {"images", "annotations", "categories", "warnings": [...]}; raises ValueError on errors.
    """
    path = Path(ann_file)
    coco = _read_coco(path)
    errors: list[str] = []
    warnings: list[str] = []
    images, cats = _images_and_categories(coco, errors)
    annotated, usable = _check_annotations(coco["annotations"], images, cats, errors, warnings)
    empty = len(images) - len(annotated)
    if empty:
        what = "dropped from training (filter_empty_gt)" if split == "train" else "evaluated without objects"
        warnings.append(f"{empty} of {len(images)} image(s) have no usable annotation and are {what}")
    if split == "train" and usable == 0 and not errors:
        errors.append("no usable annotation at all: nothing to train on")
    if img_dir is not None and images:
        img_dir = Path(img_dir)
        absent = [img["file_name"] for img in images.values() if not (img_dir / img["file_name"]).is_file()]
        if absent:
            errors.append(f"{len(absent)} image file(s) missing under {img_dir}: {_examples(absent)}")
    if errors:
        raise ValueError(f"{path}: " + "; ".join(errors))
    return {"images": len(images), "annotations": usable, "categories": len(cats), "warnings": warnings}


def _read_coco(path: Path) -> dict:
    """The annotation file as a dict with images, annotations and categories lists; ValueError otherwise."""
    if not path.is_file():
        raise ValueError(f"COCO annotation file {path} does not exist")
    try:
        coco = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable JSON file ({err})") from None
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(coco.get(k), list)]
    if missing:
        raise ValueError(f"{path}: missing or non-list key(s) {missing}; a COCO file needs images, "
                         "annotations and categories lists")
    return coco


def _images_and_categories(coco: dict, errors: list[str]) -> tuple[dict, Counter]:
    """{image id: entry} of the well-formed images and the category id counts; problems go to `errors`."""
    images = {}
    for img in coco["images"]:
        if not isinstance(img, dict) or not {"id", "file_name", "width", "height"} <= img.keys():
            errors.append(f"an image entry lacks id/file_name/width/height: {str(img)[:80]}")
            continue
        images[img["id"]] = img
    dup = [i for i, n in Counter(img.get("id") for img in coco["images"] if isinstance(img, dict)).items()
           if n > 1]
    if dup:
        errors.append(f"duplicate image ids: {_examples(dup)}")
    cats = Counter(c.get("id") for c in coco["categories"] if isinstance(c, dict))
    if not cats:
        errors.append("no categories")
    if any(n > 1 for n in cats.values()):
        errors.append(f"duplicate category ids: {_examples([c for c, n in cats.items() if n > 1])}")
    return images, cats


def _check_annotations(annotations: list, images: dict, cats: Counter, errors: list[str],
                       warnings: list[str]) -> tuple[set, int]:
    """(ids of images with a usable annotation, number of usable annotations); problems go to `errors` and
    `warnings`."""
    dangling, bad_cat, bad_box, outside, degenerate = [], [], [], [], []
    annotated = set()
    usable = 0
    for ann in annotations:
        aid = ann.get("id")
        img = images.get(ann.get("image_id"))
        if img is None:
            dangling.append(f"ann {aid} -> image {ann.get('image_id')}")
            continue
        if ann.get("category_id") not in cats:
            bad_cat.append(f"ann {aid} -> category {ann.get('category_id')}")
        box = ann.get("bbox")
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            bad_box.append(f"ann {aid}: bbox={box!r}")
            continue
        x, y, w, h = box
        if (x < -TOLERANCE_PX or y < -TOLERANCE_PX or x + w > img["width"] + TOLERANCE_PX
                or y + h > img["height"] + TOLERANCE_PX):
            outside.append(f"ann {aid}: bbox {box} in {img['width']}x{img['height']} image {img['id']}")
        if w < 1 or h < 1 or ann.get("area", 1) <= 0:
            degenerate.append(aid)
            continue
        annotated.add(img["id"])
        usable += 1
    if dangling:
        errors.append(f"{len(dangling)} annotation(s) refer to image ids that are not in 'images': "
                      f"{_examples(dangling)}")
    if bad_cat:
        errors.append(f"{len(bad_cat)} annotation(s) refer to unknown categories: {_examples(bad_cat)}")
    if bad_box:
        errors.append(f"{len(bad_box)} annotation(s) have a malformed bbox (expected [x, y, w, h]): "
                      f"{_examples(bad_box)}")
    if outside:
        errors.append(f"{len(outside)} box(es) lie outside their image: {_examples(outside)}")
    if degenerate:
        warnings.append(f"{len(degenerate)} annotation(s) with width/height < 1 px or zero area are skipped "
                        f"by CocoDataset: ids {_examples(degenerate)}")
    return annotated, usable


def check_coco_dataset(root, splits=("train", "val")) -> dict:
    """Check `root/annotations/instances_{split}2017.json` and `root/{split}2017/` for each split."""
    root = Path(root)
    return {s: check_coco_file(root / "annotations" / f"instances_{s}2017.json", root / f"{s}2017", split=s)
            for s in splits}
