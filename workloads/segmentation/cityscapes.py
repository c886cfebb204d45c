"""The Cityscapes layout, and the data check run before any worker starts.

    root/leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    root/gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelTrainIds.png   (uint8: 0..18, 255 ignore)

`check_cityscapes_dataset(root)` raises one ValueError naming the bad files (up to a few per problem, with
counts): an image without its label, image and label of different sizes, a label that is not one 8-bit
channel, label values outside 0..18 and 255, unreadable files, an empty split. When only
`*_gtFine_labelIds.png` files exist it says how to make trainIds and refuses: training on labelIds (0..33)
would silently learn the wrong classes.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from . import CLASSES, IGNORE_INDEX

IMG_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelTrainIds.png"
LABELIDS_SUFFIX = "_gtFine_labelIds.png"
SPLITS = ("train", "val")
VALID_VALUES = frozenset(range(len(CLASSES))) | {IGNORE_INDEX}
MAKE_TRAINIDS = ("make them with cityscapesScripts: `pip install cityscapesscripts` then "
                 "`CITYSCAPES_DATASET={root} csCreateTrainIdLabelImgs` (it writes *_gtFine_labelTrainIds.png "
                 "beside the gtFine json polygons)")
_EXAMPLES = 5


def image_dir(root, split: str) -> Path:
    return Path(root) / "leftImg8bit" / split


def label_dir(root, split: str) -> Path:
    return Path(root) / "gtFine" / split


def label_path(root, split: str, image: Path, suffix: str = LABEL_SUFFIX) -> Path:
    """The gtFine file of a leftImg8bit image (same city folder and stem)."""
    stem = image.name[: -len(IMG_SUFFIX)]
    return label_dir(root, split) / image.parent.name / f"{stem}{suffix}"


def list_images(root, split: str) -> list[Path]:
    return sorted(image_dir(root, split).glob(f"*/*{IMG_SUFFIX}"))


def _examples(items: list[str]) -> str:
    more = f" (and {len(items) - _EXAMPLES} more)" if len(items) > _EXAMPLES else ""
    return "; ".join(items[:_EXAMPLES]) + more


def _label_problem(path: Path, image_size: tuple[int, int] | None, read_values: bool) -> tuple[str, str] | None:
    """(problem kind, detail) for one label file, or None when it is fine."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P"):
                return "labels that are not one 8-bit channel", f"{path} (mode {im.mode})"
            if image_size is not None and im.size != image_size:
                return ("labels whose size differs from their image",
                        f"{path} ({im.size[0]}x{im.size[1]} vs image {image_size[0]}x{image_size[1]})")
            if not read_values:
                return None
            values = np.flatnonzero(np.bincount(np.asarray(im).ravel(), minlength=256))
    except (OSError, ValueError) as err:
        return "unreadable files", f"{path} ({err})"
    bad = sorted(set(values.tolist()) - VALID_VALUES)
    if bad:
        return "labels with values outside 0..18 and 255", f"{path} (values {bad[:8]})"
    return None


def check_split(root, split: str, max_value_checks: int | None = None) -> tuple[dict, dict[str, list[str]]]:
    """({"images", "cities", "warnings"}, {problem: [details]}) for one split."""
    root = Path(root)
    problems: dict[str, list[str]] = {}
    warnings: list[str] = []
    images = list_images(root, split)
    if not images:
        where = image_dir(root, split)
        problems["empty splits"] = [f"{where} holds no */*{IMG_SUFFIX}" if where.is_dir() else f"{where} is missing"]
        return {"images": 0, "cities": 0, "warnings": warnings}, problems

    missing = [img for img in images if not label_path(root, split, img).is_file()]
    if missing:
        with_ids = [img for img in missing if label_path(root, split, img, LABELIDS_SUFFIX).is_file()]
        with_ids_set = set(with_ids)
        if with_ids:
            problems["images with *_gtFine_labelIds.png but no *_gtFine_labelTrainIds.png"] = [
                f"{label_path(root, split, with_ids[0], LABELIDS_SUFFIX)} has no trainIds file: "
                + MAKE_TRAINIDS.format(root=root), *(str(img) for img in with_ids[1:])]
        rest = [str(img) for img in missing if img not in with_ids_set]
        if rest:
            problems["images without their label (*_gtFine_labelTrainIds.png)"] = rest

    missing_set = set(missing)
    labelled = [img for img in images if img not in missing_set]
    # Values are read for every label unless a sample is asked for (a full Cityscapes train split is
    # 2975 labels of 1024x2048: about a minute on 2 cores); sizes and modes are always checked (headers).
    step = max(1, len(labelled) // max_value_checks) if max_value_checks else 1
    sampled = set(labelled[::step])

    def check(img: Path) -> tuple[str, str] | None:
        try:
            with Image.open(img) as im:
                size = im.size
        except (OSError, ValueError) as err:
            return "unreadable files", f"{img} ({err})"
        return _label_problem(label_path(root, split, img), size, img in sampled)

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for found in pool.map(check, labelled):
            if found:
                problems.setdefault(found[0], []).append(found[1])

    known = {label_path(root, split, img).name for img in images}
    orphans = [p for p in label_dir(root, split).glob(f"*/*{LABEL_SUFFIX}") if p.name not in known]
    if orphans:
        warnings.append(f"{len(orphans)} label file(s) without an image are ignored, e.g. {orphans[0]}")
    return {"images": len(images), "cities": len({img.parent.name for img in images}),
            "warnings": warnings}, problems


def check_cityscapes_dataset(root, splits=SPLITS, max_value_checks: int | None = None) -> dict[str, dict]:
    """Check a Cityscapes-layout data set; returns {split: {"images", "cities", "warnings"}}.

    `max_value_checks`: read the pixel values of at most about this many labels per split (None: all).
    Raises one ValueError listing every problem found, each with example files.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"Cityscapes root {root} does not exist")
    report, problems = {}, {}
    for split in splits:
        report[split], found = check_split(root, split, max_value_checks)
        for kind, items in found.items():
            problems[f"{split}: {kind}"] = items
    if problems:
        lines = [f"{kind} ({len(items)}): {_examples(items)}" for kind, items in problems.items()]
        raise ValueError(f"Cityscapes data in {root} is not usable:\n  " + "\n  ".join(lines))
    return report
