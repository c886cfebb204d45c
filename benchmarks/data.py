"""Data-pipeline throughput on CPU: decoded and augmented training images per second per loader worker, for
every way the project can read its training images, side by side in one run.

Tells a cluster user how many CPU cores (DataLoader workers) each GPU needs (a GPU that trains at R images/s
needs about R / (images/s per worker) loader workers for a recipe, plus the training process's share for
batch-level mixup), and which reader to use for shards.

The images: with `--source`, N images of an ImageNet-layout folder (a random subset, linked) or the first N
training samples of a shard set (`manifest.json`, local or `s3://`, unpacked to a temporary folder); without
it, N generated JPEGs at ImageNet-like sizes (500x375, 375x500, 500x333, ...; drawn with
`workloads.classification.synthetic`, plus pixel noise so that files are about as large as ImageNet's, about
100 KB at quality 90). Those images are written as a shard set with the project's writer (`shard_writer`,
`--shard-size-mb`) to a temporary folder and, for the S3 readers, to a bucket: `--s3-local` starts a
throwaway SeaweedFS (`benchmarks.s3_local`), `--s3 s3://BUCKET/PREFIX` writes a temporary copy there (the
endpoint and credentials from the standard AWS_* variables; removed afterwards), an `s3://` source is read
as it is. Every reader then reads the same images with the same recipe transforms
(`build_train_transform`, as the job configures it):

    paper    RandomResizedCrop 224 + flip (the defaults)
    modern   + RandAugment rand-m9-mstd0.5-inc1 + random erasing 0.25, and mixup 0.1 / cutmix 1.0 on each
             batch of 32 (applied in the training process, as the worker loop does)

The readers (`--readers`):
    folder          `make_dataset` (ImageFolder, PIL decode + RGB): the folder path
    shards          `shard_reader.ShardStream` from the local shard set: what training uses for shards
    shards-s3       the same from S3 (pyarrow's S3 filesystem)
    webdataset      the `webdataset` library's pipeline (tar expansion, grouping, `decode("pil")`) over the
                    same tars, opened through the same pyarrow filesystem
    webdataset-s3   the same from S3
    ray-data        Ray Data: `read_webdataset` + `map_batches` (decode + augment) + `iter_torch_batches`,
                    on a private local Ray cluster limited to `num_cpus=1`
    ray-data-s3     the same from S3

Measurements per recipe and reader:
- CPU time per image: the reader's items pulled in this process with one thread (what a loader worker does),
  `time.process_time()` per batch (it counts pyarrow's I/O threads too), so other processes on a shared
  machine barely change it; the readers take turns, one pass each, so a drift in the machine's load falls on
  all of them alike. Reported as the median over batches and as the mean (all CPU time / all images:
  it includes the per-shard costs that fall on a few batches); images/s per loader worker = 1 / mean, the
  rate of a worker with a core to itself. Ray Data decodes in its own worker processes: its figure is the CPU
  time of those processes (psutil, per process, before and after) plus this process's (`iter_torch_batches`
  and Ray's threads in it), divided by the images; the CPU time of Ray's own services (raylet, GCS, agents)
  is reported beside it. Decoding alone and mixup are measured on the folder path, for reference.
- Wall clock: a real `torch.utils.data.DataLoader` with `--workers` workers (default 1) over the reader, from
  the first batch (start-up is excluded) to the last; for Ray Data the passes after a warm-up pass, on its
  one CPU. These depend on what else the machine runs (the load average is printed).

    python -m benchmarks.data [--source DIR_OR_URI] [--images 512] [--s3-local | --s3 URI] [--readers ...]
                              [--workers 1] [--passes 2] [--batch 32] [--size 224] [--json out.json]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import logging
import os
import platform
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from orchestrator.environment import temporary_environment
from workloads.classification.shard_manifest import read_manifest
from workloads.classification.shard_reader import ShardStream, read_samples
from workloads.object_storage import is_bucket_uri, join, open_location

# ImageNet-1k training images are mostly 500 px on the long side; these shapes cover the common ones.
SHAPES = ((500, 375), (375, 500), (500, 333), (333, 500), (500, 500), (400, 300), (500, 400), (450, 338))
JPEG_QUALITY = 90
NOISE_STD = 20  # grey levels; brings the files to ImageNet's size (decoding cost follows the compressed bytes)
CLASSES = 8
UNIQUE = 48  # distinct drawings (drawing is slow); further files repeat them
# ILSVRC-2012 train: about 138 GB in 1,281,167 JPEGs, i.e. about 108 KB per image (for comparison).
IMAGENET_MEAN_KB = 108
# The webdataset pipeline's read buffer: tarfile reads 10 KB at a time, and an unbuffered pyarrow S3 stream turns
# each read into a request of its own (webdataset's own S3 openers, `pipe:` with curl or the AWS CLI, stream one
# GET); Ray Data buffers its reads too (`DataContext.streaming_read_buffer_size`).
READ_BUFFER = 1 << 20
READERS = ("folder", "shards", "shards-s3", "webdataset", "webdataset-s3", "ray-data", "ray-data-s3")


# ------------------------------------------------------------------------------------------------------
# The images: generated, or taken from a folder or a shard set; then written as shard sets
# ------------------------------------------------------------------------------------------------------
def make_images(root: Path, count: int, seed: int = 0) -> None:
    """`count` JPEGs in `root/train/<class>/` (and `add_val_split`)."""
    from PIL import Image

    from workloads.classification.synthetic import class_table, render

    rng = np.random.default_rng(seed)
    table = class_table(CLASSES)
    drawn: list[bytes] = []
    for i in range(count):
        if i < UNIQUE:
            w, h = SHAPES[i % len(SHAPES)]
            pix = np.asarray(render(table[i % CLASSES], rng, max(w, h)).crop((0, 0, w, h)), np.float32)
            pix += rng.normal(0.0, NOISE_STD, pix.shape)
            buf = io.BytesIO()
            Image.fromarray(pix.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=JPEG_QUALITY)
            drawn.append(buf.getvalue())
        folder = root / "train" / f"n{i % CLASSES:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img_{i:05d}.JPEG").write_bytes(drawn[i % len(drawn)])
    add_val_split(root)


def link_subset(src: Path, root: Path, count: int, seed: int = 0) -> None:
    """`count` random training images of the ImageNet-layout folder `src` (all when it has fewer), linked into
    `root/train`."""
    from workloads.classification.data import scan_split

    train = scan_split(str(src / "train"), verify=False)
    for cls, rel in random.Random(seed).sample(train.images, min(count, len(train.images))):
        target = root / "train" / cls / os.path.basename(rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to((src / "train" / rel).resolve())
    add_val_split(root)


def unpack_subset(location: str, root: Path, count: int) -> None:
    """The first `count` training samples of the shard set at `location` as an ImageNet-layout folder in `root`."""
    shard_set = read_manifest(location)
    fs, base = open_location(location)
    for shard in first_samples(shard_set.shards("train"), count)[0]:
        for key, data, label in read_samples(fs, join(base, shard["name"]), 0, int(shard["samples"])):
            target = root / "train" / shard_set.classes[label] / f"{key}.jpg"  # PIL reads by content
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
    add_val_split(root)


def add_val_split(root: Path) -> None:
    """One image per class of `root/train` linked into `root/val`: the shard writer wants a validation split, the
    benchmark reads only the training one."""
    for folder in sorted(p for p in (root / "train").iterdir() if p.is_dir()):
        first = min(folder.iterdir())
        (root / "val" / folder.name).mkdir(parents=True, exist_ok=True)
        (root / "val" / folder.name / first.name).symlink_to(first.resolve())


def first_samples(shards: list[dict], count: int) -> tuple[list[dict], bool]:
    """The shards that hold the first `count` samples, the last one's count cut to what is needed (ShardStream
    then reads no further); and whether it was cut (whole-file readers must then stop after `count`)."""
    kept, left = [], count
    for shard in shards:
        if left <= 0:
            break
        take = min(left, int(shard["samples"]))
        kept.append({**shard, "samples": take})
        left -= take
    return kept, sum(int(s["samples"]) for s in shards[:len(kept)]) > count


def describe_images(train_dir: Path) -> dict:
    """Count, mean file size (KB) and mean size (megapixels) of the training images that are measured."""
    from PIL import Image

    sizes, pixels = [], []
    for path in sorted(p for p in train_dir.rglob("*") if p.is_file()):
        sizes.append(path.stat().st_size)
        with Image.open(path) as im:
            pixels.append(im.size[0] * im.size[1])
    return {"images": len(sizes), "mean_kb": float(np.mean(sizes)) / 1024,
            "mean_megapixels": float(np.mean(pixels)) / 1e6}


@dataclass
class Sources:
    """The same images three ways: an ImageNet-layout folder, a local shard set, a shard set in S3 (or None)."""

    folder: Path
    local: str
    s3: str | None
    count: int  # training images every reader reads per pass


def prepare_sources(args, tmp: Path, stack: contextlib.ExitStack) -> Sources:
    """Images as `args` asks (see the module docstring), sharded locally and in S3; what is started or written
    here is stopped or removed when `stack` closes."""
    from workloads.classification.shard_writer import write_shards

    folder, source = tmp / "images", args.source
    s3_source = source if source and is_bucket_uri(source) else None
    if source is None:
        make_images(folder, args.images)
    elif s3_source or (Path(source) / "manifest.json").is_file():
        unpack_subset(source, folder, args.images)
    elif (Path(source) / "train").is_dir():
        link_subset(Path(source), folder, args.images)
    else:
        raise ValueError(f"--source {source}: neither an ImageNet-layout folder (SOURCE/train/<class>/...) nor "
                         "a shard set (manifest.json, or an s3:// URI)")
    quiet = lambda msg: None  # noqa: E731 - the writer's progress lines would drown the table
    local = str(tmp / "shards")
    write_shards(str(folder), local, shard_size_mb=args.shard_size_mb, workers=2, progress=quiet)
    s3 = s3_source
    if args.s3_local:
        from benchmarks.s3_local import LocalS3

        server = stack.enter_context(LocalS3(tmp / "s3"))
        stack.enter_context(temporary_environment(**server.env))  # ShardStream and Ray's workers find the server through it
        s3 = f"s3://{server.bucket}/benchmark-shards"
    elif args.s3:
        s3 = f"{args.s3.rstrip('/')}/cvlab-benchmark-{os.getpid()}-{int(time.time())}"
        stack.callback(remove_location, s3)
    if s3 is not None and s3 != s3_source:
        write_shards(str(folder), s3, shard_size_mb=args.shard_size_mb, workers=2, progress=quiet)
    count = sum(1 for p in (folder / "train").rglob("*") if p.is_file())
    return Sources(folder=folder, local=local, s3=s3, count=count)


def remove_location(location: str) -> None:
    fs, root = open_location(location)
    with contextlib.suppress(OSError):
        fs.delete_dir(root)


# ------------------------------------------------------------------------------------------------------
# The recipes and the readers
# ------------------------------------------------------------------------------------------------------
def recipes() -> dict[str, dict]:
    """The `data.augment` section of each recipe (the paper recipe is the spec's defaults)."""
    return {
        "paper": {},
        "modern": {"auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25, "mixup": 0.1, "cutmix": 1.0},
    }


def recipe_transform(augment: dict, size: int, batch: int, num_classes: int):
    """(train transform, mixup or None) of the recipe, as the job configures and the worker loop builds them."""
    from orchestrator.config.loader import spec_from_dict
    from orchestrator.jobs.classification import augment_config, input_config
    from workloads.classification.mixup import build_mixup
    from workloads.classification.transforms import build_train_transform

    # Validated as an experiment file would be (a mixing recipe needs an even batch).
    spec = spec_from_dict({"data": {"image_size": size, "batch_size": batch, "augment": augment}}, "benchmarks.data")
    aug = augment_config(spec.data.augment)
    return build_train_transform(input_config(spec.data), aug), build_mixup(aug, num_classes, 0.1)


@dataclass
class Reader:
    """A reader over one recipe: `dataset` for a DataLoader; `passes(p)` the items of pass p in this process."""

    dataset: object
    passes: Callable[[int], Iterable]
    shuffle: bool = False  # a DataLoader over `dataset` shuffles (map-style datasets)


def folder_reader(sources: Sources, transform, seed: int = 0) -> Reader:
    from workloads.classification.data import list_class_folders, make_dataset

    train_dir = str(sources.folder / "train")
    dataset = make_dataset(train_dir, list_class_folders(train_dir), transform=transform)

    def passes(p: int):
        order = np.random.default_rng(seed + p).permutation(len(dataset))
        return (dataset[int(i)] for i in order)

    return Reader(dataset, passes, shuffle=True)


def shard_stream_reader(location: str, count: int, transform, batch: int, seed: int = 0) -> Reader:
    """ShardStream as a training worker builds it (one rank; no shuffle buffer: it costs memory, not CPU, and
    would hold back the first batch until it is full)."""
    shards, _ = first_samples(read_manifest(location).shards("train"), count)
    stream = ShardStream(location, shards, transform, rank=0, world=1, batch=batch, seed=seed, shuffle_buffer=0)

    def passes(p: int):
        stream.set_epoch(p)
        return stream

    return Reader(stream, passes)


def webdataset_module():
    try:
        import webdataset
    except ImportError as err:
        raise RuntimeError("the webdataset readers need the webdataset library: pip install webdataset") from err
    return webdataset


def webdataset_reader(location: str, count: int, transform) -> Reader:
    """The webdataset library's pipeline over the same tars: shard list, split by DataLoader worker, open
    (through pyarrow with a `READ_BUFFER`, so local and S3 take the same path), tar expansion, grouping,
    `decode("pil")` (RGB), then the recipe's transform."""
    wds = webdataset_module()
    from webdataset.tariterators import group_by_keys, tar_file_expander

    shards, cut = first_samples(read_manifest(location).shards("train"), count)
    fs, root = open_location(location)

    def opened(urls):
        for sample in urls:
            # read to the end before the next one is asked for
            with fs.open_input_stream(sample["url"], buffer_size=READ_BUFFER) as stream:
                yield {**sample, "stream": stream}

    stages = [wds.SimpleShardList([join(root, s["name"]) for s in shards]), wds.split_by_worker, opened,
              tar_file_expander, group_by_keys, wds.decode("pil"), wds.to_tuple("jpg;jpeg;png", "cls"),
              wds.map_tuple(transform, int)]
    if cut:
        stages.append(lambda samples: itertools.islice(samples, count))
    pipeline = wds.DataPipeline(*stages)
    return Reader(pipeline, lambda p: pipeline)


# ------------------------------------------------------------------------------------------------------
# Measurements
# ------------------------------------------------------------------------------------------------------
def measure_cpu(readers: dict[str, Reader], batch: int, passes: int, seed: int = 0) -> dict[str, dict]:
    """CPU time per image of each reader's items pulled in this process (one thread), batch by batch. The
    readers take turns, one pass each, in an order that rotates every pass: a drift in what else the machine
    runs falls on all of them alike. Each pass starts from the same random seeds for every reader (the same
    augmentation draws); the labels of the first pass are counted (every image once)."""
    import torch

    for reader in readers.values():  # first-call costs (imports, clients) are not a worker's steady state
        with contextlib.closing(iter(reader.passes(0))) as warm:
            list(itertools.islice(warm, batch))
    names = list(readers)
    per_batch = {name: [] for name in names}
    total_s, per_pass, labels = dict.fromkeys(names, 0.0), {name: [] for name in names}, {n: Counter() for n in names}
    for p in range(passes):
        for name in names[p % len(names):] + names[:p % len(names)]:
            torch.manual_seed(seed + p)
            np.random.seed(seed + p)
            random.seed(seed + p)
            items, seen = iter(readers[name].passes(p)), 0
            while True:
                t0 = time.process_time()
                chunk = list(itertools.islice(items, batch))
                seconds = time.process_time() - t0
                if not chunk:
                    break
                per_batch[name].append(1e3 * seconds / len(chunk))
                total_s[name] += seconds
                seen += len(chunk)
                if p == 0:
                    labels[name].update(int(item[1]) for item in chunk)
            per_pass[name].append(seen)
    return {name: _cpu_summary(per_batch[name], total_s[name], per_pass[name], labels[name]) for name in names}


def _cpu_summary(per_batch: list[float], total_s: float, per_pass: list[int], labels: Counter) -> dict:
    mean_ms = 1e3 * total_s / max(1, sum(per_pass))
    return {"batches": len(per_batch), "images_per_pass": per_pass,
            "per_class": {str(k): v for k, v in sorted(labels.items())},
            "cpu_ms_per_image": float(np.median(per_batch)) if per_batch else float("nan"),
            "mean_cpu_ms_per_image": mean_ms, "images_per_s_per_worker": 1e3 / mean_ms if mean_ms else 0.0}


def measure_mixup(mixup, batch: int, size: int, repeats: int = 8) -> float:
    """CPU ms per image of the recipe's batch mixup/cutmix (in the training process; the same for every reader)."""
    import torch

    x, y = torch.randn(batch, 3, size, size), torch.randint(0, CLASSES, (batch,))
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        mixup(x.clone(), y)
        times.append(1e3 * (time.process_time() - t0) / batch)
    return float(np.median(times))


def measure_loader(reader: Reader, mixup, workers: int, batch: int, passes: int, seed: int = 0) -> dict:
    """Wall-clock images/s through a DataLoader over the reader with `workers` workers [+ mixup here]."""
    import torch

    loader = torch.utils.data.DataLoader(reader.dataset, batch_size=batch, shuffle=reader.shuffle or None,
                                         num_workers=workers, persistent_workers=workers > 0,
                                         generator=torch.Generator().manual_seed(seed))
    np.random.seed(seed)
    load_before = os.getloadavg()[0]
    counted, start = 0, None
    for _ in range(passes):
        for batch_items in loader:
            images, targets = batch_items[0], batch_items[1]
            if mixup is not None and images.shape[0] % 2 == 0:
                images, targets = mixup(images, targets)
            if start is None:  # the first batch pays for worker start-up: not timed
                start = time.perf_counter()
                continue
            counted += images.shape[0]
    seconds = time.perf_counter() - start if start is not None else 0.0
    return {"loader_workers": workers, "images": counted, "seconds": seconds,
            "images_per_s": counted / seconds if seconds else 0.0,
            "load_average_1min": max(load_before, os.getloadavg()[0])}


# ------------------------------------------------------------------------------------------------------
# Ray Data: read_webdataset + map_batches + iter_torch_batches on a private cluster of one CPU
# ------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def ray_session(num_cpus: int = 1):
    """A private local Ray cluster (never joins another one) with `num_cpus` CPUs, shut down afterwards."""
    import ray

    import ray.data

    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # one INFO block per pass would hide the table
    try:
        yield ray
    finally:
        ray.shutdown()


def ray_process_cpu() -> dict[int, tuple[str, float]]:
    """pid -> (kind, CPU seconds so far) of this process's descendants: Ray's worker processes ("worker") and
    its services ("service": raylet, GCS, agents)."""
    import psutil

    found = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            with proc.oneshot():
                times, cmd = proc.cpu_times(), " ".join(proc.cmdline()[:2])
        except psutil.Error:
            continue
        kind = "worker" if cmd.startswith("ray::") or "default_worker.py" in cmd else "service"
        found[proc.pid] = (kind, times.user + times.system)
    return found


def decode_batch(transform):
    """map_batches function: raw sample bytes (columns named by extension) -> transformed images, labels."""
    import torch
    from PIL import Image

    def decode(rows: dict) -> dict:
        images = next(rows[k] for k in ("jpg", "jpeg", "png") if k in rows)
        out = []
        for data in images:
            with Image.open(io.BytesIO(data)) as im:
                out.append(transform(im.convert("RGB")))
        return {"image": torch.stack(out).numpy(), "label": np.array([int(c) for c in rows["cls"]], np.int64)}

    return decode


def measure_ray(location: str, count: int, transform, mixup, batch: int, passes: int) -> dict:
    """Ray Data's pipeline on the running cluster: a warm-up pass, then `passes` passes timed (wall clock) and
    their CPU time counted in every process of the session."""
    import ray.data

    fs, root = open_location(location)
    shards, cut = first_samples(read_manifest(location).shards("train"), count)
    ds = ray.data.read_webdataset([join(root, s["name"]) for s in shards], filesystem=fs, decoder=None)
    if cut:
        ds = ds.limit(count)
    # Ray's default batch size: Ray fuses the read and the map into one task (an explicit one splits them).
    ds = ds.map_batches(decode_batch(transform), batch_format="numpy")

    def one_pass(labels: Counter | None) -> int:
        seen = 0
        for rows in ds.iter_torch_batches(batch_size=batch):
            images, targets = rows["image"], rows["label"]
            if mixup is not None and images.shape[0] % 2 == 0:
                mixup(images, targets)
            seen += images.shape[0]
            if labels is not None:
                labels.update(targets.tolist())
        return seen

    one_pass(None)
    before, driver0, start, load_before = ray_process_cpu(), time.process_time(), time.perf_counter(), \
        os.getloadavg()[0]
    labels = Counter()
    per_pass = [one_pass(labels if p == 0 else None) for p in range(passes)]
    seconds, driver_s, after = time.perf_counter() - start, time.process_time() - driver0, ray_process_cpu()
    spent = {"worker": 0.0, "service": 0.0}
    for pid, (kind, cpu) in after.items():
        spent[kind] += cpu - before.get(pid, (kind, 0.0))[1]
    images = sum(per_pass)
    mean_ms = 1e3 * (spent["worker"] + driver_s) / images
    return {"images_per_pass": per_pass, "per_class": {str(k): v for k, v in sorted(labels.items())},
            "cpu_ms_per_image": None, "mean_cpu_ms_per_image": mean_ms, "images_per_s_per_worker": 1e3 / mean_ms,
            "ray_worker_cpu_ms_per_image": 1e3 * spent["worker"] / images,
            "driver_cpu_ms_per_image": 1e3 * driver_s / images,
            "ray_services_cpu_ms_per_image": 1e3 * spent["service"] / images,
            "loader": [{"loader_workers": "ray num_cpus=1", "images": images, "seconds": seconds,
                        "images_per_s": images / seconds,
                        "load_average_1min": max(load_before, os.getloadavg()[0])}]}


# ------------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------------
def available_readers(wanted: list[str] | None, s3: str | None) -> tuple[list[str], list[str]]:
    """(readers to run, notes on those left out): S3 readers need a bucket, the others their library."""
    readers, notes = [], []
    for name in wanted or READERS:
        if name.endswith("-s3") and s3 is None:
            notes.append(f"{name}: no S3 (--s3-local, --s3 URI or an s3:// source)")
        elif name.startswith("webdataset") and not _importable("webdataset"):
            notes.append(f"{name}: webdataset is not installed (pip install webdataset)")
        elif name.startswith("ray-data") and not _importable("ray.data"):
            notes.append(f"{name}: ray is not installed")
        else:
            readers.append(name)
    return readers, notes


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def run_recipe(name: str, sources: Sources, readers: list[str], args) -> tuple[list[dict], float]:
    """One row per reader for the recipe `name`, and the CPU ms per image of its mixup (0: none)."""
    from workloads.classification.data import list_class_folders

    classes = list_class_folders(str(sources.folder / "train"))
    transform, mixup = recipe_transform(recipes()[name], args.size, args.batch, len(classes))
    here = {}  # the readers that run in this process (and in DataLoader workers)
    for reader_name in readers:
        location = sources.s3 if reader_name.endswith("-s3") else sources.local
        if reader_name == "folder":
            here[reader_name] = folder_reader(sources, transform)
        elif reader_name.startswith("shards"):
            here[reader_name] = shard_stream_reader(location, sources.count, transform, args.batch)
        elif reader_name.startswith("webdataset"):
            here[reader_name] = webdataset_reader(location, sources.count, transform)
    cpu = measure_cpu(here, args.batch, args.passes)
    rows = []
    for reader_name in readers:
        if reader_name in here:
            row = cpu[reader_name]
            row["loader"] = [measure_loader(here[reader_name], mixup, w, args.batch, args.passes)
                             for w in args.workers]
        else:
            location = sources.s3 if reader_name.endswith("-s3") else sources.local
            row = measure_ray(location, sources.count, transform, mixup, args.batch, args.passes)
        rows.append({"recipe": name, "reader": reader_name, **row})
        walls = ", ".join(f"{run['images_per_s']:.0f} images/s with {run['loader_workers']}" for run in row["loader"])
        say(f"  {name:6s} {reader_name:13s} {row['mean_cpu_ms_per_image']:6.2f} ms CPU per image"
            f"{'; wall clock ' + walls if walls else ''}")
    return rows, measure_mixup(mixup, args.batch, args.size) if mixup is not None else 0.0


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


def print_table(report: dict) -> None:
    info, images = report["machine"], report["images"]
    print(f"Machine: {info['cpu']} ({info['machine']}), {info['usable_cores']} usable cores; torch {info['torch']}, "
          f"timm {info['timm']}, Pillow {info['pillow']} (libjpeg-turbo: {info['libjpeg_turbo']}). "
          f"{images['images']} training images of {images['mean_megapixels']:.2f} MP, mean {images['mean_kb']:.0f} "
          f"KB, in {report['shards']} shard(s) of at most {report['shard_size_mb']:g} MB; {report['size']} px "
          f"crops, batches of {report['batch']}.\n")
    workers = ", ".join(str(w) for w in report["workers"]) or "-"
    print("| recipe | reader | CPU ms per image: median batch | CPU ms per image: mean | images/s per loader "
          f"worker (one core) | wall clock, images/s (DataLoader with {workers} worker(s); Ray: num_cpus=1) |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in report["results"]:
        median = "-" if r["cpu_ms_per_image"] is None else f"{r['cpu_ms_per_image']:.2f}"
        walls = " / ".join(f"{run['images_per_s']:.0f}" for run in r["loader"]) or "-"
        print(f"| {r['recipe']} | {r['reader']} | {median} | {r['mean_cpu_ms_per_image']:.2f} | "
              f"{r['images_per_s_per_worker']:.0f} | {walls} |")
    print()
    decode = report["decode_only"]
    print(f"Decoding alone (folder path, PIL, RGB): {decode['cpu_ms_per_image']:.2f} ms CPU per image (median batch), "
          f"{decode['mean_cpu_ms_per_image']:.2f} (mean).")
    for name, ms in report["mixup_cpu_ms_per_image"].items():
        if ms:
            print(f"{name}: mixup/cutmix in the training process {ms:.2f} ms CPU per image, for every reader.")
    for r in report["results"]:
        if "ray_services_cpu_ms_per_image" in r:
            print(f"{r['recipe']}, {r['reader']}: Ray workers {r['ray_worker_cpu_ms_per_image']:.2f} + this "
                  f"process {r['driver_cpu_ms_per_image']:.2f} ms per image; Ray's services another "
                  f"{r['ray_services_cpu_ms_per_image']:.2f} ms per image.")
    loads = [run["load_average_1min"] for r in report["results"] for run in r["loader"]]
    if loads:
        print(f"Load average during the wall-clock runs: {min(loads):.1f} to {max(loads):.1f}.")
    for note in report["left_out"]:
        print(f"Not measured: {note}")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", metavar="DIR_OR_URI",
                   help="an ImageNet-layout folder or a shard set (folder or s3:// URI); default: generated JPEGs")
    p.add_argument("--images", type=int, default=512, help="training images measured (default 512)")
    s3 = p.add_mutually_exclusive_group()
    s3.add_argument("--s3-local", action="store_true", help="start a throwaway local S3 server (weed mini)")
    s3.add_argument("--s3", metavar="URI", help="write a temporary copy of the shards under this s3:// prefix "
                                                "(AWS_* variables; removed afterwards)")
    p.add_argument("--shard-size-mb", type=float, default=8.0, help="shard size for the shard sets (default 8)")
    p.add_argument("--readers", nargs="+", choices=READERS, help="default: every one that can run")
    p.add_argument("--passes", type=int, default=2, help="passes over the images per measurement (default 2)")
    p.add_argument("--workers", type=int, nargs="*", default=[1],
                   help="DataLoader worker counts for the wall clock (default 1; none: no wall clock)")
    p.add_argument("--batch", type=int, default=32, help="batch size (even: mixup; default 32)")
    p.add_argument("--size", type=int, default=224, help="training crop size (default 224)")
    p.add_argument("--recipes", nargs="+", choices=sorted(recipes()), default=["paper", "modern"])
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    if args.images < 1 or args.passes < 1 or args.batch < 2:
        p.error("--images and --passes must be >= 1 and --batch >= 2")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(1)  # as in a DataLoader worker
    report = {"machine": machine(), "size": args.size, "batch": args.batch, "shard_size_mb": args.shard_size_mb,
              "workers": args.workers, "passes": args.passes, "results": [], "mixup_cpu_ms_per_image": {}}
    with tempfile.TemporaryDirectory(prefix="cvlab-data-bench-") as tmp, contextlib.ExitStack() as stack:
        t0 = time.perf_counter()
        try:
            sources = prepare_sources(args, Path(tmp), stack)
        except (ValueError, OSError, RuntimeError) as err:
            say(f"benchmarks.data: {err}")
            return 2
        report["images"] = describe_images(sources.folder / "train")
        report["shards"] = len(read_manifest(sources.local).shards("train"))
        say(f"{report['images']['images']} training images (mean {report['images']['mean_kb']:.0f} KB; ImageNet "
            f"train averages about {IMAGENET_MEAN_KB} KB), {report['shards']} local shard(s)"
            f"{', and in ' + sources.s3 if sources.s3 else ''}, ready in {time.perf_counter() - t0:.0f} s")
        readers, report["left_out"] = available_readers(args.readers, sources.s3)
        if any(r.startswith("ray") for r in readers):
            stack.enter_context(ray_session(1))
        report["decode_only"] = measure_cpu({"folder": folder_reader(sources, None)}, args.batch, args.passes)["folder"]
        say(f"  decoding alone (folder path): {report['decode_only']['mean_cpu_ms_per_image']:.2f} ms CPU per image")
        for name in args.recipes:
            rows, report["mixup_cpu_ms_per_image"][name] = run_recipe(name, sources, readers, args)
            report["results"] += rows
    print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
