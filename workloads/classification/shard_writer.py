"""`cvlab data shard SRC DEST`: an ImageNet-layout folder written as a shard set (layout in `shard_manifest`).

1. Both splits of SRC are listed and every image verified (`data.scan_split`); unreadable ones are left out and
   listed in the manifest, as the folder path skips them.
2. The plan: the training images in a shuffled order (fixed seed, so a shard mixes classes and the plan is the
   same every time), the validation images in sorted order, cut into shards of about `shard_size_mb` (a shard
   closes once adding the next image would pass the size; an image larger than that gets a shard of its own).
   Sample keys are `<split>_<position>`; the image bytes are copied, not re-encoded.
3. Shards are written in parallel (`workers` threads: reading, hashing and uploading wait on I/O). A finished shard is recorded in `DEST/_progress/`; a
   re-run after an interruption writes only the shards without a record. No shard is ever visible half-written
   under its final name: a local shard is written to `NAME.partial` and renamed, an object-store upload becomes
   visible only when it completes.
4. The manifest is written last (with the sha256 and size of every shard), then the progress records go.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import tarfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

import pyarrow.fs as pafs

from workloads.classification.data import scan_split
from workloads.classification.shard_manifest import FORMAT, MANIFEST_FILE, SPLITS, shard_name
from workloads.object_storage import join, open_location

log = logging.getLogger(__name__)
PROGRESS_DIR = "_progress"
PLAN_FILE = "plan.json"  # in PROGRESS_DIR, beside one record per finished shard
PLAN_SEED = 0


@dataclass(frozen=True)
class ShardJob:
    """One shard to write: its name and its samples as (key, source path, class index)."""

    split: str
    index: int
    samples: tuple[tuple[str, str, int], ...]

    @property
    def name(self) -> str:
        return shard_name(self.split, self.index)


def plan_shards(src: str, shard_size_mb: float, progress: Callable[[str], None] = log.info):
    """(classes, jobs, skipped per split): the shards SRC is cut into. ValueError for a SRC that is not an
    ImageNet-layout folder."""
    src = os.path.abspath(os.path.expanduser(src))
    train = scan_split(os.path.join(src, "train"), progress=progress)
    val = scan_split(os.path.join(src, "val"), classes=train.classes, progress=progress)
    index = {cls: i for i, cls in enumerate(train.classes)}
    limit = shard_size_mb * 1024 * 1024
    jobs: list[ShardJob] = []
    for split, scan in (("train", train), ("val", val)):
        images = list(scan.images)
        if split == "train":
            random.Random(PLAN_SEED).shuffle(images)
        chunks: list[list[tuple[str, str, int]]] = [[]]
        size = 0
        for position, (cls, rel) in enumerate(images):
            path = os.path.join(scan.root, rel)
            nbytes = os.path.getsize(path)
            if chunks[-1] and size + nbytes > limit:
                chunks.append([])
                size = 0
            chunks[-1].append((f"{split}_{position:08d}", path, index[cls]))
            size += nbytes
        jobs += [ShardJob(split, i, tuple(chunk)) for i, chunk in enumerate(chunks)]
    skipped = {"train": [{"path": rel, "reason": why} for rel, why in train.bad],
               "val": [{"path": rel, "reason": why} for rel, why in val.bad]}
    return list(train.classes), jobs, skipped


class _HashingWriter(io.RawIOBase):
    """Passes bytes on to a stream, counting them and hashing them on the way."""

    def __init__(self, stream):
        self.stream, self.sha256, self.size = stream, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.stream.write(data)
        self.sha256.update(data)
        self.size += len(data)
        return len(data)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)  # fixed metadata: the same shard bytes every time
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shard(dest: str, job: ShardJob) -> dict:
    """Write one shard into the set at `dest` and record it; returns its manifest entry."""
    fs, root = open_location(dest)
    final = join(root, job.name)
    local = isinstance(fs, pafs.LocalFileSystem)
    target = final + ".partial" if local else final
    fs.create_dir(join(root, job.split), recursive=True)
    per_class: dict[int, int] = {}
    with fs.open_output_stream(target) as stream:
        out = _HashingWriter(stream)
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
            for key, path, label in job.samples:
                ext = os.path.splitext(path)[1].lower().lstrip(".")
                with open(path, "rb") as fh:
                    _add(tar, f"{key}.{'jpg' if ext == 'jpeg' else ext}", fh.read())
                _add(tar, f"{key}.cls", str(label).encode())
                per_class[label] = per_class.get(label, 0) + 1
    if local:
        fs.move(target, final)
    entry = {"name": job.name, "bytes": out.size, "sha256": out.sha256.hexdigest(), "samples": len(job.samples),
             "per_class": {str(k): v for k, v in sorted(per_class.items())}}
    _write_bytes(fs, join(root, PROGRESS_DIR, _record_name(job)), json.dumps(entry).encode())
    return entry


def _record_name(job: ShardJob) -> str:
    return f"{job.split}-{job.index:06d}.json"


def _write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as fh:
        fh.write(data)


def _recorded(fs: pafs.FileSystem, root: str) -> dict[str, dict]:
    """The progress records of an earlier, interrupted run: shard name -> manifest entry."""
    selector = pafs.FileSelector(join(root, PROGRESS_DIR), allow_not_found=True)
    found = {}
    for info in fs.get_file_info(selector):
        if info.base_name.endswith(".json") and info.base_name != PLAN_FILE:
            with fs.open_input_stream(info.path) as fh:
                entry = json.loads(fh.read().decode())
            found[entry["name"]] = entry
    return found


def write_shards(src: str, dest: str, *, shard_size_mb: float = 64.0, workers: int = 1,
                 progress: Callable[[str], None] = log.info) -> dict:
    """Write the shard set of SRC at DEST (see the module docstring); returns the manifest. ValueError for a bad
    SRC or a DEST that holds another data set's shards; OSError when DEST cannot be written."""
    if shard_size_mb <= 0 or workers < 1:
        raise ValueError(f"--shard-size-mb must be > 0 and --workers >= 1 (got {shard_size_mb:g}, {workers})")
    classes, jobs, skipped = plan_shards(src, shard_size_mb, progress)
    fs, root = open_location(dest)
    fs.create_dir(root, recursive=True)
    contents = hashlib.sha256(json.dumps([(job.name, job.samples) for job in jobs]).encode()).hexdigest()
    plan = {"source": os.path.abspath(os.path.expanduser(src)), "shard_size_mb": shard_size_mb,
            "contents_sha256": contents}
    _check_plan(fs, root, dest, plan)
    done = _recorded(fs, root)
    todo = [job for job in jobs if job.name not in done]
    if done:
        progress(f"{len(done)} of {len(jobs)} shard(s) already written at {dest}; writing the other {len(todo)}")
    start = time.perf_counter()
    failed = threading.Event()

    def write(job: ShardJob) -> dict | None:
        # After a failure no new shard starts (the ones being written finish, and are recorded).
        if failed.is_set():
            return None
        try:
            return write_shard(dest, job)
        except BaseException:
            failed.set()
            raise

    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(write, job) for job in todo]
        for i, future in enumerate(as_completed(futures), 1):
            entry = future.result()
            if entry is not None:
                done[entry["name"]] = entry
                progress(f"  {entry['name']}: {entry['samples']} images, {entry['bytes'] / 2**20:.1f} MB "
                         f"({i}/{len(todo)}, {time.perf_counter() - start:.0f} s)")
    manifest = _manifest(classes, jobs, done, skipped, plan["source"])
    _write_bytes(fs, join(root, MANIFEST_FILE), json.dumps(manifest, indent=1).encode())
    fs.delete_dir(join(root, PROGRESS_DIR))
    return manifest


def _check_plan(fs: pafs.FileSystem, root: str, dest: str, plan: dict) -> None:
    """A DEST that holds shards must hold this plan's: refuse to mix two data sets (or two shard sizes)."""
    path = join(root, PROGRESS_DIR, PLAN_FILE)
    manifest = fs.get_file_info(join(root, MANIFEST_FILE))
    if manifest.type != pafs.FileType.NotFound:
        raise ValueError(f"{dest} already holds a finished shard set ({MANIFEST_FILE}); choose another DEST")
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        _write_bytes(fs, path, json.dumps(plan).encode())
        return
    with fs.open_input_stream(path) as fh:
        earlier = json.loads(fh.read().decode())
    if earlier != plan:
        raise ValueError(f"{dest} holds an unfinished shard set of other data or another --shard-size-mb "
                         f"(from {earlier.get('source')}, {earlier.get('shard_size_mb')} MB): finish that one or "
                         "choose another DEST")


def _manifest(classes: list[str], jobs: list[ShardJob], done: dict[str, dict], skipped: dict,
              source: str) -> dict:
    splits = {}
    for split in SPLITS:
        shards = [done[job.name] for job in jobs if job.split == split]
        per_class = {cls: 0 for cls in classes}
        for shard in shards:
            for label, n in shard.pop("per_class").items():
                per_class[classes[int(label)]] += n
        splits[split] = {"samples": sum(s["samples"] for s in shards), "per_class": per_class,
                         "shards": shards, "skipped": skipped[split]}
    return {"format": FORMAT, "layout": "webdataset", "source": source, "created": time.time(),
            "classes": classes, "splits": splits}
