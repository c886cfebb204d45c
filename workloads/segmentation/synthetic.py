"""A small synthetic street-scene set in the Cityscapes layout that a model can learn (no network needed).

    make_cityscapes("data/tiny-cityscapes", num_train=40, num_val=10, size=(128, 256), seed=0)

Each image is a street: sky, a band of buildings and trees, a sidewalk, a road with lane marks, and
objects (cars on the road, people, poles with traffic signs and lights on the sidewalk). Regions take their
class's Cityscapes colour jittered per instance plus pixel noise, so colour and shape both carry the class.
Labels are trainIds (`CLASSES` order); 255 (ignore) marks a 1-px outline around every object and the ego
vehicle's bonnet at the bottom, as in Cityscapes. Cities differ between train and val.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from . import CLASSES, IGNORE_INDEX, PALETTE
from .cityscapes import IMG_SUFFIX, LABEL_SUFFIX, image_dir, label_dir

ID = {name: i for i, name in enumerate(CLASSES)}
USED = ("road", "sidewalk", "building", "pole", "traffic light", "traffic sign", "vegetation", "sky",
        "person", "car")
CITIES = {"train": ("synthbourg", "synthstadt"), "val": ("synthhafen",)}


def _colour(rng, name: str, jitter: int = 24) -> tuple[int, int, int]:
    base = np.array(PALETTE[ID[name]], dtype=int)
    return tuple(int(v) for v in np.clip(base + rng.integers(-jitter, jitter + 1, 3), 0, 255))


def _scene(rng, h: int, w: int):
    """One (RGB image, trainId label) pair as numpy arrays."""
    img = Image.new("RGB", (w, h))
    lab = Image.new("L", (w, h), IGNORE_INDEX)
    di, dl = ImageDraw.Draw(img), ImageDraw.Draw(lab)

    def region(shape: str, xy, name: str, outline: bool = False, colour=None):
        fill = colour or _colour(rng, name)
        getattr(di, shape)(xy, fill=fill)
        getattr(dl, shape)(xy, fill=ID[name], outline=IGNORE_INDEX if outline else None)

    horizon = int(h * rng.uniform(0.30, 0.42))
    curb = int(h * rng.uniform(0.58, 0.66))
    road_top = curb + max(2, h // 24)
    region("rectangle", (0, 0, w, horizon), "sky")
    x = 0
    while x < w:  # buildings and trees along the street, reaching up into the sky
        bw = int(w * rng.uniform(0.08, 0.25))
        top = int(h * rng.uniform(0.05, 0.35))
        region("rectangle", (x, top, x + bw, curb), "building" if rng.random() < 0.65 else "vegetation")
        x += bw
    region("rectangle", (0, curb, w, road_top), "sidewalk")
    region("rectangle", (0, road_top, w, h), "road")
    mark = max(1, h // 64)
    lane_y = (road_top + h) // 2
    for x0 in range(int(rng.integers(0, w // 8)), w, w // 6):  # lane marks are road, white
        region("rectangle", (x0, lane_y, x0 + w // 12, lane_y + mark), "road", colour=(235, 235, 235))

    for _ in range(int(rng.integers(1, 4))):  # poles with a sign or a light
        px, pw = int(rng.uniform(0.05, 0.95) * w), max(4, w // 48)
        ptop = int(h * rng.uniform(0.15, 0.3))
        region("rectangle", (px, ptop, px + pw, road_top), "pole")  # thin: no ignore outline
        s = max(6, h // 9)
        if rng.random() < 0.5:
            region("polygon", [(px - s // 2, ptop), (px + pw + s // 2, ptop), (px + pw // 2, ptop + s)],
                   "traffic sign", outline=True)
        else:
            region("rectangle", (px - s // 3, ptop - s, px + pw + s // 3, ptop), "traffic light", outline=True)
    for _ in range(int(rng.integers(1, 4))):  # people on the sidewalk
        cx, ph = int(rng.uniform(0.05, 0.95) * w), int(h * rng.uniform(0.15, 0.25))
        region("ellipse", (cx - ph // 4, curb + 2 - ph, cx + ph // 4, curb + 2), "person", outline=True)
    for _ in range(int(rng.integers(1, 4))):  # cars on the road
        cw, ch = int(w * rng.uniform(0.14, 0.26)), int(h * rng.uniform(0.10, 0.16))
        cx, cy = int(rng.uniform(0, w - cw)), int(rng.uniform(road_top - ch // 2, h * 0.9 - ch))
        region("rounded_rectangle", (cx, cy, cx + cw, cy + ch), "car", outline=True)
    # The ego vehicle's bonnet: ignored, as in Cityscapes.
    di.rectangle((0, int(h * 0.93), w, h), fill=(30, 30, 40))
    dl.rectangle((0, int(h * 0.93), w, h), fill=IGNORE_INDEX)

    pixels = np.asarray(img, dtype=np.int16) + rng.normal(0, 10, (h, w, 3)).astype(np.int16)
    return np.clip(pixels, 0, 255).astype(np.uint8), np.asarray(lab, dtype=np.uint8)


def make_cityscapes(root, num_train: int = 40, num_val: int = 10, size=(128, 256), seed: int = 0) -> dict:
    """Write the set under `root` (existing files of the same names are replaced); returns a summary
    {"root", "size": [h, w], "classes": [names used], "train": {"images"}, "val": {"images"}}."""
    h, w = (int(s) for s in size)
    if num_train < 1 or num_val < 1:
        raise ValueError(f"num_train={num_train}, num_val={num_val}: both must be >= 1")
    if h < 32 or w < 32:
        raise ValueError(f"size={list(size)}: images must be at least 32x32 px ([height, width])")
    root = Path(root)
    rng = np.random.default_rng(seed)
    summary = {"root": str(root), "size": [h, w], "classes": list(USED)}
    for split, count in (("train", num_train), ("val", num_val)):
        cities = CITIES[split]
        for i in range(count):
            city = cities[i % len(cities)]
            stem = f"{city}_{i:06d}_000019"
            (image_dir(root, split) / city).mkdir(parents=True, exist_ok=True)
            (label_dir(root, split) / city).mkdir(parents=True, exist_ok=True)
            img, lab = _scene(rng, h, w)
            Image.fromarray(img).save(image_dir(root, split) / city / f"{stem}{IMG_SUFFIX}")
            Image.fromarray(lab).save(label_dir(root, split) / city / f"{stem}{LABEL_SUFFIX}")
        summary[split] = {"images": count}
    return summary
