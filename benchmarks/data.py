"""Data-pipeline throughput on CPU: decoded and augmented training images per second per loader worker.

Tells a cluster user how many CPU cores (DataLoader workers) each GPU needs: a GPU that trains at R images/s
needs about R / (images/s per worker) loader workers for a recipe (plus the training process's share for
batch-level mixup).

It writes its own JPEGs at ImageNet-like sizes (500x375, 375x500, 500x333, ...; drawn with
`workloads.classification.synthetic`, plus pixel noise so that files are about as large as ImageNet's, about
100 KB at quality 90) into a temporary folder in the ImageNet layout, then times the workload's own training
input path, `make_dataset` (PIL decode + RGB) with the recipe's `build_train_transform`:

    paper    RandomResizedCrop 224 + flip (the defaults)
    modern   + RandAugment rand-m9-mstd0.5-inc1 + random erasing 0.25, and mixup 0.1 / cutmix 1.0 on each
             batch of 32 (applied in the training process, as the worker loop does)

Two measurements per recipe:
- CPU time: every image loaded in this process with one thread (what a loader worker does), timed with
  `time.process_time()` per batch (median over batches), so other processes on a shared machine barely change
  it. images/s per loader worker = 1 / (CPU seconds per image): the rate of a worker with a core to itself.
  Decoding alone is measured the same way, for reference.
- Wall clock: a real `torch.utils.data.DataLoader` with 1 (and 2) workers, from the first batch (start-up is
  excluded) to the last; this one depends on what else the machine runs (the load average is printed).

    python -m benchmarks.data [--images 512] [--workers 1 2] [--batch 32] [--size 224] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# ImageNet-1k training images are mostly 500 px on the long side; these shapes cover the common ones.
SHAPES = ((500, 375), (375, 500), (500, 333), (333, 500), (500, 500), (400, 300), (500, 400), (450, 338))
JPEG_QUALITY = 90
NOISE_STD = 20  # grey levels; brings the files to ImageNet's size (decoding cost follows the compressed bytes)
CLASSES = 8
UNIQUE = 48  # distinct drawings (drawing is slow); further files repeat them
# ILSVRC-2012 train: about 138 GB in 1,281,167 JPEGs, i.e. about 108 KB per image (for comparison).
IMAGENET_MEAN_KB = 108


def make_images(root: Path, count: int, seed: int = 0) -> dict:
    """`count` JPEGs in `root/train/<class>/`; returns their mean size in KB and pixels."""
    from workloads.classification.synthetic import class_table, render

    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    table = class_table(CLASSES)
    drawn: list[tuple[bytes, int]] = []
    sizes, pixels = [], []
    for i in range(count):
        if i < UNIQUE:
            w, h = SHAPES[i % len(SHAPES)]
            pix = np.asarray(render(table[i % CLASSES], rng, max(w, h)).crop((0, 0, w, h)), np.float32)
            pix += rng.normal(0.0, NOISE_STD, pix.shape)
            buf = io.BytesIO()
            Image.fromarray(pix.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=JPEG_QUALITY)
            drawn.append((buf.getvalue(), w * h))
        data, npix = drawn[i % len(drawn)]
        folder = root / "train" / f"n{i % CLASSES:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img_{i:05d}.JPEG").write_bytes(data)
        sizes.append(len(data))
        pixels.append(npix)
    return {"images": count, "mean_kb": float(np.mean(sizes)) / 1024,
            "mean_megapixels": float(np.mean(pixels)) / 1e6}


def recipes() -> dict[str, dict]:
    """The `data.augment` section of each recipe (the paper recipe is the spec's defaults)."""
    return {
        "paper": {},
        "modern": {"auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25, "mixup": 0.1, "cutmix": 1.0},
    }


def _pipeline(train_dir: Path, augment: dict, size: int, batch: int):
    """(dataset, mixup or None) of the recipe, as the job configures and the worker loop builds them."""
    from orchestrator.config.loader import spec_from_dict
    from orchestrator.jobs.classification import augment_config, input_config
    from workloads.classification.data import list_class_folders, make_dataset
    from workloads.classification.mixup import build_mixup
    from workloads.classification.transforms import build_train_transform

    # Validated as an experiment file would be (a mixing recipe needs an even batch).
    spec = spec_from_dict({"data": {"image_size": size, "batch_size": batch, "augment": augment}}, "benchmarks.data")
    aug = augment_config(spec.data.augment)
    classes = list_class_folders(str(train_dir))
    transform = build_train_transform(input_config(spec.data), aug)
    return make_dataset(str(train_dir), classes, transform=transform), build_mixup(aug, len(classes), 0.1)


def measure_cpu(train_dir: Path, augment, size: int, batch: int, passes: int, seed: int = 0) -> dict:
    """CPU milliseconds per image for decode + augment (this process, one thread) and for batch mixup.

    The median over batches: a burst of another process's work on a shared machine (cache and memory
    bandwidth contention) shifts a few batches, not the median. `augment=None`: decode only.
    """
    import torch
    from torch.utils.data import default_collate

    if augment is None:
        from workloads.classification.data import list_class_folders, make_dataset

        dataset, mixup = make_dataset(str(train_dir), list_class_folders(str(train_dir))), None
    else:
        dataset, mixup = _pipeline(train_dir, augment, size, batch)
    order = np.random.default_rng(seed).permutation(len(dataset))
    torch.manual_seed(seed)
    np.random.seed(seed)
    for i in order[:batch]:  # warm-up: first-call costs (imports, caches) are not a worker's steady state
        dataset[int(i)]
    load_ms, mix_ms = [], []
    for _ in range(passes):
        for first in range(0, len(order) - batch + 1, batch):
            t0 = time.process_time()
            samples = [dataset[int(i)] for i in order[first:first + batch]]
            load_ms.append(1e3 * (time.process_time() - t0) / batch)
            if mixup is not None:
                x, y, _ = default_collate(samples)
                t0 = time.process_time()
                mixup(x, y)
                mix_ms.append(1e3 * (time.process_time() - t0) / batch)
    cpu_ms = float(np.median(load_ms))
    return {"batches": len(load_ms), "cpu_ms_per_image": cpu_ms,
            "mixup_cpu_ms_per_image": float(np.median(mix_ms)) if mix_ms else 0.0,
            "images_per_s_per_worker": 1e3 / cpu_ms}


def measure_loader(train_dir: Path, augment, size: int, workers: int, batch: int, passes: int,
                   seed: int = 0) -> dict:
    """Wall-clock images/s through DataLoader(make_dataset(...)) with `workers` workers [+ mixup here]."""
    import torch

    dataset, mixup = _pipeline(train_dir, augment, size, batch)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True,
                                         num_workers=workers, persistent_workers=workers > 0,
                                         generator=torch.Generator().manual_seed(seed))
    np.random.seed(seed)
    counted, start = 0, None
    for _ in range(passes):
        for images, targets, _failures in loader:
            if mixup is not None:
                images, targets = mixup(images, targets)
            if start is None:  # the first batch pays for worker start-up: not timed
                start = time.perf_counter()
                continue
            counted += images.shape[0]
    seconds = time.perf_counter() - start
    return {"loader_workers": workers, "images": counted, "seconds": seconds, "images_per_s": counted / seconds}


def machine() -> dict:
    import PIL
    import PIL.features
    import timm
    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"machine": platform.machine(), "cpu": cpu, "usable_cores": cores, "python": platform.python_version(),
            "torch": torch.__version__, "timm": timm.__version__, "pillow": PIL.__version__,
            "libjpeg_turbo": bool(PIL.features.check_feature("libjpeg_turbo"))}


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=512, help="JPEGs to generate (default 512)")
    p.add_argument("--passes", type=int, default=2, help="passes over the images per measurement (default 2)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="loader worker counts (default 1 2)")
    p.add_argument("--batch", type=int, default=32, help="batch size (even: mixup; default 32)")
    p.add_argument("--size", type=int, default=224, help="training crop size (default 224)")
    p.add_argument("--recipes", nargs="+", choices=sorted(recipes()), default=["paper", "modern"])
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)  # as in a DataLoader worker
    info = machine()
    results = {}
    with tempfile.TemporaryDirectory(prefix="cvlab-data-bench-") as tmp:
        t0 = time.perf_counter()
        images = make_images(Path(tmp), args.images)
        say(f"generated {images['images']} JPEGs (mean {images['mean_kb']:.0f} KB, {images['mean_megapixels']:.2f} "
            f"MP; ImageNet train averages about {IMAGENET_MEAN_KB} KB) in {time.perf_counter() - t0:.0f} s")
        train_dir = Path(tmp) / "train"
        decode = measure_cpu(train_dir, None, args.size, args.batch, args.passes)
        say(f"  decode only: {decode['cpu_ms_per_image']:.2f} ms CPU per image")
        for name in args.recipes:
            augment = recipes()[name]
            row = {"recipe": name, **measure_cpu(train_dir, augment, args.size, args.batch, args.passes)}
            say(f"  {name}: {row['cpu_ms_per_image']:.2f} ms CPU per image")
            row["loader"] = []
            for workers in args.workers:
                load_before = os.getloadavg()[0]
                run = measure_loader(train_dir, augment, args.size, workers, args.batch, args.passes)
                run["load_average_1min"] = max(load_before, os.getloadavg()[0])
                row["loader"].append(run)
                say(f"  {name}, DataLoader with {workers} worker(s): {run['images_per_s']:.1f} images/s "
                    f"(load average {run['load_average_1min']:.1f})")
            results[name] = row

    print(f"Machine: {info['cpu']} ({info['machine']}), {info['usable_cores']} usable cores; torch {info['torch']}, "
          f"timm {info['timm']}, Pillow {info['pillow']} (libjpeg-turbo: {info['libjpeg_turbo']}). "
          f"{images['images']} JPEGs of {images['mean_megapixels']:.2f} MP, mean {images['mean_kb']:.0f} KB; "
          f"{args.size} px crops, batches of {args.batch}. Decoding alone (PIL, RGB): "
          f"{decode['cpu_ms_per_image']:.2f} ms CPU per image.\n")
    loader_cols = [f"DataLoader, {w} worker(s): images/s (wall clock)" for w in args.workers]
    print("| recipe | CPU ms per image (decode + augment) | mixup/cutmix CPU ms per image (training process) "
          "| images/s per loader worker (one core) | " + " | ".join(loader_cols) + " |")
    print("| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in loader_cols) + " |")
    for name, r in results.items():
        mix = f"{r['mixup_cpu_ms_per_image']:.2f}" if r["mixup_cpu_ms_per_image"] else "-"
        loads = " | ".join(f"{run['images_per_s']:.0f} (load {run['load_average_1min']:.1f})" for run in r["loader"])
        print(f"| {name} | {r['cpu_ms_per_image']:.2f} | {mix} | {r['images_per_s_per_worker']:.0f} | {loads} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "images": images, "size": args.size,
                                               "batch": args.batch, "decode_only": decode,
                                               "results": list(results.values())},
                                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
