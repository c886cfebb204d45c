"""A small, learnable, deterministic dataset in the ImageNet folder layout (no network needed).

    root/train/<wnid>/<wnid>_<i>.JPEG
    root/val/<wnid>/ILSVRC2012_val_<n>.JPEG
    root/synthetic.json          (manifest: parameters + class descriptions; written last)

Every class is a *combination* of a pattern (shape + texture) and a colour hue: each pattern and each
hue is shared by several classes, so neither colour alone nor shape alone identifies a class. Per image,
the object's position, scale, number of copies, exact hue/saturation/brightness and the noisy
background vary. Patterns are textured so that a random crop still shows enough of them to classify
(the training pipeline uses RandomResizedCrop + horizontal flip), and none depends on left/right.
"""
from __future__ import annotations

import colorsys
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

MANIFEST = "synthetic.json"
_FORMAT = "cvlab-synthetic-imagenet/1"
_TMP_PREFIX = ".partial-"

# name -> (outline, fill texture). Outlines are drawn into a mask; textures fill it.
PATTERNS: tuple[tuple[str, str, str], ...] = (
    ("disc", "disc", "solid"),
    ("hstripes", "square", "hstripes"),
    ("checker", "square", "checker"),
    ("ring", "ring", "solid"),
    ("triangle", "triangle", "solid"),
    ("cross", "cross", "solid"),
    ("dots", "diamond", "dots"),
    ("vstripes", "disc", "vstripes"),
)
MAX_HUES = 16
MAX_CLASSES = len(PATTERNS) * MAX_HUES


def class_table(classes: int) -> list[dict[str, Any]]:
    """The (pattern, hue) combination of each class: a near-square grid of patterns x hues.

    Class k uses pattern k % P and hue (k // P + k % P) % H, which gives distinct combinations and
    spreads every pattern and every hue over several classes.
    """
    if not isinstance(classes, int) or isinstance(classes, bool) or not 2 <= classes <= MAX_CLASSES:
        raise ValueError(f"classes must be an integer in 2..{MAX_CLASSES}, got {classes!r}")
    n_pat = min(len(PATTERNS), math.ceil(math.sqrt(classes)))
    n_hue = math.ceil(classes / n_pat)
    table = []
    for k in range(classes):
        p, j = k % n_pat, k // n_pat
        h = (j + p) % n_hue
        table.append(
            {
                "index": k,
                "wnid": f"n{k:08d}",
                "pattern": PATTERNS[p][0],
                "hue": round(h / n_hue, 4),
                "hue_spacing": 1.0 / n_hue,
            }
        )
    return table


# ----------------------------------------------------------------------------------------------
# Drawing


def _rgb(hue: float, sat: float, val: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(hue % 1.0, sat, val)
    return int(r * 255), int(g * 255), int(b * 255)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth low-saturation colour noise plus pixel noise (float32 HxWx3 in 0..255)."""
    coarse = rng.integers(4, 9)
    base = rng.uniform(60, 200)
    low = rng.normal(base, 35, size=(coarse, coarse, 3)).clip(0, 255).astype(np.uint8)
    # Pull the coarse colours towards grey so backgrounds never look like a class colour.
    grey = low.mean(axis=2, keepdims=True)
    low = (0.35 * low + 0.65 * grey).astype(np.uint8)
    smooth = Image.fromarray(low, "RGB").resize((size, size), Image.BICUBIC)
    arr = np.asarray(smooth, dtype=np.float32)
    arr += rng.normal(0, rng.uniform(4, 14), size=arr.shape)
    return arr


def _mask(outline: str, size: int, box: tuple[int, int, int, int]) -> Image.Image:
    m = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(m)
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if outline == "disc":
        d.ellipse(box, fill=255)
    elif outline == "square":
        d.rectangle(box, fill=255)
    elif outline == "ring":
        d.ellipse(box, fill=255)
        t = 0.27
        d.ellipse((x0 + t * w, y0 + t * h, x1 - t * w, y1 - t * h), fill=0)
    elif outline == "triangle":  # symmetric about the vertical axis, so flips keep it a triangle
        d.polygon([(x0 + w / 2, y0), (x1, y1), (x0, y1)], fill=255)
    elif outline == "cross":
        t = 0.33
        d.rectangle((x0 + t * w, y0, x1 - t * w, y1), fill=255)
        d.rectangle((x0, y0 + t * h, x1, y1 - t * h), fill=255)
    elif outline == "diamond":
        d.polygon([(x0 + w / 2, y0), (x1, y0 + h / 2), (x0 + w / 2, y1), (x0, y0 + h / 2)], fill=255)
    else:  # pragma: no cover - PATTERNS is closed
        raise ValueError(f"unknown outline {outline!r}")
    return m


def _texture(kind: str, size: int, period: float, fg: np.ndarray, dark: np.ndarray) -> np.ndarray:
    """An HxWx3 float texture alternating the class colour `fg` with its dark shade."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if kind == "solid":
        sel = np.ones((size, size), bool)
    elif kind == "hstripes":
        sel = (yy // (period / 2)) % 2 == 0
    elif kind == "vstripes":
        sel = (xx // (period / 2)) % 2 == 0
    elif kind == "checker":
        sel = ((yy // (period / 2)) + (xx // (period / 2))) % 2 == 0
    elif kind == "dots":
        cy = (yy % period) - period / 2
        cx = (xx % period) - period / 2
        sel = (cy * cy + cx * cx) > (period * 0.3) ** 2  # fg with dark dots
    else:  # pragma: no cover
        raise ValueError(f"unknown texture {kind!r}")
    return np.where(sel[..., None], fg[None, None, :], dark[None, None, :])


def render(cls: dict[str, Any], rng: np.random.Generator, size: int) -> Image.Image:
    """One image of class `cls` (an entry of `class_table`)."""
    _, outline, texture = next(p for p in PATTERNS if p[0] == cls["pattern"])
    img = _background(rng, size)
    # One large copy (most of the signal) plus up to two smaller ones elsewhere.
    n_copies = 1 + int(rng.integers(0, 3))
    for i in range(n_copies):
        frac = rng.uniform(0.45, 0.8) if i == 0 else rng.uniform(0.22, 0.4)
        side = max(6, int(frac * size * rng.uniform(0.9, 1.1)))
        w = side
        h = max(6, int(side * rng.uniform(0.85, 1.15)))
        x0 = int(rng.integers(-w // 6, size - w + w // 6 + 1))
        y0 = int(rng.integers(-h // 6, size - h + h // 6 + 1))
        # Per-copy colour jitter stays well inside the gap to the neighbouring class hues.
        hue = cls["hue"] + rng.uniform(-0.18, 0.18) * cls["hue_spacing"]
        fg = np.array(_rgb(hue, rng.uniform(0.65, 1.0), rng.uniform(0.7, 1.0)), np.float32)
        dark = fg * rng.uniform(0.15, 0.35)
        period = max(4.0, size * rng.uniform(0.09, 0.16))
        tex = _texture(texture, size, period, fg, dark)
        tex += rng.normal(0, 6, size=tex.shape)
        mask = _mask(outline, size, (x0, y0, x0 + w, y0 + h)).filter(ImageFilter.GaussianBlur(0.6))
        alpha = np.asarray(mask, np.float32)[..., None] / 255.0
        img = img * (1 - alpha) + tex * alpha
    return Image.fromarray(img.clip(0, 255).astype(np.uint8), "RGB")


# ----------------------------------------------------------------------------------------------
# The dataset on disk


def _params(classes: int, per_class: int, size: int, seed: int, val_per_class: int) -> dict[str, Any]:
    return {
        "format": _FORMAT,
        "classes": classes,
        "per_class": per_class,
        "val_per_class": val_per_class,
        "size": size,
        "seed": seed,
    }


def read_manifest(root: str | Path) -> dict[str, Any] | None:
    """The manifest of a synthetic dataset at `root`, or None when there is none (or it is unreadable)."""
    path = Path(root) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == _FORMAT else None


def _check_int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo or (hi is not None and value > hi):
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be an integer {rng}, got {value!r}")
    return value


def make_imagenet(
    root: str | Path,
    classes: int = 10,
    per_class: int = 60,
    size: int = 64,
    seed: int = 0,
    val_per_class: int | None = None,
    *,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write a synthetic ImageNet-layout dataset at `root` and return a summary dict.

    Deterministic for a given seed. If `root` already holds a synthetic dataset with the same parameters,
    nothing is written (summary["reused"] is True). A non-empty `root` that is not such a dataset is
    refused with ValueError; one holding a synthetic dataset with other parameters is refused unless
    `overwrite=True`. Files go to a hidden partial folder first and the manifest is written last, so an
    interrupted run never looks like a finished dataset.
    """
    _check_int("classes", classes, 2, MAX_CLASSES)
    _check_int("per_class", per_class, 1)
    _check_int("size", size, 16, 1024)
    _check_int("seed", seed, 0)
    if val_per_class is None:
        val_per_class = max(2, per_class // 5)
    _check_int("val_per_class", val_per_class, 1)
    root = Path(root)
    params = _params(classes, per_class, size, seed, val_per_class)
    say = progress or (lambda _msg: None)

    existing = _check_target(root, params, overwrite)
    if existing is not None:
        say(f"{root}: synthetic dataset with these parameters already exists; reusing it")
        return {**existing, "root": str(root), "reused": True, "seconds": 0.0}

    start = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(_TMP_PREFIX + "*"):  # left over from an interrupted run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f"{_TMP_PREFIX}{seed}"
    table = class_table(classes)
    done = _render_splits(tmp, table, per_class, val_per_class, size, seed, say)

    # Swap the finished splits in, then write the manifest last.
    (root / MANIFEST).unlink(missing_ok=True)
    for split in ("train", "val"):
        if (root / split).exists():
            shutil.rmtree(root / split)
        (tmp / split).rename(root / split)
    shutil.rmtree(tmp, ignore_errors=True)
    summary = {
        **params,
        "train_images": classes * per_class,
        "val_images": classes * val_per_class,
        "class_names": [c["wnid"] for c in table],
        "class_table": [{k: c[k] for k in ("wnid", "pattern", "hue")} for c in table],
    }
    (root / MANIFEST).write_text(json.dumps(summary, indent=1))
    seconds = round(time.perf_counter() - start, 2)
    say(f"{root}: wrote {done} images in {seconds:.1f} s")
    return {**summary, "root": str(root), "reused": False, "seconds": seconds}


def _check_target(root: Path, params: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """The manifest of a complete dataset with these parameters already at `root` (to reuse), else None when
    `root` may be written; ValueError for a non-directory, another dataset (unless `overwrite`) or other files."""
    if root.exists() and not root.is_dir():
        raise ValueError(f"{root} exists and is not a directory")
    existing = read_manifest(root)
    if existing is not None:
        if {k: existing.get(k) for k in params} == params and _layout_complete(root, existing):
            return existing
        if not overwrite:
            raise ValueError(
                f"{root} already holds a synthetic dataset with different parameters "
                f"({_describe(existing)}); pass overwrite=True (--overwrite), delete it or choose another directory"
            )
    elif root.exists():
        others = [p.name for p in root.iterdir() if not p.name.startswith(_TMP_PREFIX)]
        if others:
            shown = ", ".join(sorted(others)[:5]) + (", ..." if len(others) > 5 else "")
            raise ValueError(
                f"refusing to write into {root}: it is not empty ({shown}) and is not a synthetic dataset "
                f"made by cvlab; choose an empty or new directory"
            )
    return None


def _render_splits(tmp: Path, table: list[dict], per_class: int, val_per_class: int, size: int, seed: int,
                   say: Callable[[str], None]) -> int:
    """Render every train and val image into `tmp/<split>/<wnid>/`, saying progress every 2 s; returns the
    number of images written."""
    total = len(table) * (per_class + val_per_class)
    done, val_counter, last_report = 0, 0, time.perf_counter()
    for split, count, split_id in (("train", per_class, 0), ("val", val_per_class, 1)):
        for cls in table:
            folder = tmp / split / cls["wnid"]
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                # One generator per image: results do not depend on order or on other parameters.
                rng = np.random.default_rng([seed, split_id, cls["index"], i])
                img = render(cls, rng, size)
                if split == "train":
                    name = f"{cls['wnid']}_{i}.JPEG"
                else:
                    val_counter += 1
                    name = f"ILSVRC2012_val_{val_counter:08d}.JPEG"
                img.save(folder / name, format="JPEG", quality=92)
                done += 1
                now = time.perf_counter()
                if now - last_report > 2.0:
                    say(f"  {done}/{total} images ({100 * done / total:.0f}%)")
                    last_report = now
    return done


def _describe(manifest: dict[str, Any]) -> str:
    keys = ("classes", "per_class", "val_per_class", "size", "seed")
    return ", ".join(f"{k}={manifest.get(k)}" for k in keys)


def _layout_complete(root: Path, manifest: dict[str, Any]) -> bool:
    """Cheap check that the folders and file counts match the manifest."""
    try:
        for split, per in (("train", manifest["per_class"]), ("val", manifest["val_per_class"])):
            for wnid in manifest["class_names"]:
                if sum(1 for _ in (root / split / wnid).glob("*.JPEG")) != per:
                    return False
    except (KeyError, TypeError, OSError):
        return False
    return True
