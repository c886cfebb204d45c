"""A shard set: an ImageNet-layout data set cut into WebDataset tar shards, described by one manifest.

    DEST/manifest.json
    DEST/train/shard-000000.tar, shard-000001.tar, ...   each sample: KEY.jpg (or the source's image
    DEST/val/shard-000000.tar, ...                        extension) and KEY.cls (the class index, as text)

DEST is a local folder or a bucket URI (`s3://bucket/prefix`), opened through pyarrow's filesystems, which read
the standard `AWS_*` variables. The manifest lists the classes (index = position), and per split the sample
count, the count per class, every shard (path relative to DEST, bytes, sha256, samples) and the source images
left out as unreadable. `cvlab data shard` writes it (`shard_writer.write_shards`); `read_manifest` reads and
checks it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from workloads.object_storage import S3_SETTINGS, is_bucket_uri, join, open_location

MANIFEST_FILE = "manifest.json"
FORMAT = "cvlab-shards/1"
SPLITS = ("train", "val")


def shard_name(split: str, index: int) -> str:
    """A shard's path relative to the set's root: `train/shard-000003.tar`."""
    return f"{split}/shard-{index:06d}.tar"


@dataclass(frozen=True)
class ShardSet:
    """A read manifest: where the set is and what it holds."""

    location: str
    classes: tuple[str, ...]
    splits: dict[str, dict[str, Any]]  # split -> {"samples", "per_class", "shards", "skipped"}

    def shards(self, split: str) -> list[dict[str, Any]]:
        return list(self.splits[split]["shards"])

    def samples(self, split: str) -> int:
        return int(self.splits[split]["samples"])


def read_manifest(location: str) -> ShardSet:
    """The shard set at `location`; ValueError naming what is wrong (no manifest, another format, counts that do
    not add up, shards listed but absent or of another size)."""
    fs, root = open_location(location)
    path = join(root, MANIFEST_FILE)
    try:
        with fs.open_input_stream(path) as fh:
            data = json.loads(fh.read().decode("utf-8"))
    except FileNotFoundError:
        if is_bucket_uri(location) and fs.get_file_info(root.split("/", 1)[0]).type == pafs.FileType.NotFound:
            raise ValueError(f"{location}: the bucket does not exist ({S3_SETTINGS})") from None
        raise ValueError(f"{location} has no {MANIFEST_FILE}: not a shard set (write one with `cvlab data shard`)") \
            from None
    except (OSError, ValueError) as err:
        hint = f" ({S3_SETTINGS})" if isinstance(err, OSError) and is_bucket_uri(location) else ""
        raise ValueError(f"{location}/{MANIFEST_FILE} cannot be read: {err}{hint}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{location}/{MANIFEST_FILE} is not a {FORMAT} manifest")
    shard_set = ShardSet(location=location, classes=tuple(data["classes"]), splits=data["splits"])
    _check_counts(shard_set)
    _check_shards_present(fs, root, shard_set)
    return shard_set


def _check_counts(shard_set: ShardSet) -> None:
    where = f"{shard_set.location}/{MANIFEST_FILE}"
    for split in SPLITS:
        if split not in shard_set.splits:
            raise ValueError(f"{where} lists no {split} split")
        info = shard_set.splits[split]
        in_shards = sum(int(s["samples"]) for s in info["shards"])
        per_class = sum(int(n) for n in info["per_class"].values())
        if not in_shards == per_class == int(info["samples"]):
            raise ValueError(f"{where}: the {split} split says {info['samples']} samples, its shards hold "
                             f"{in_shards} and its classes {per_class}")
        unknown = set(info["per_class"]) - set(shard_set.classes)
        if unknown:
            raise ValueError(f"{where}: the {split} split counts classes the set does not list: "
                             f"{', '.join(sorted(unknown)[:5])}")


def _check_shards_present(fs: pafs.FileSystem, root: str, shard_set: ShardSet) -> None:
    listed = [s for split in SPLITS for s in shard_set.shards(split)]
    infos = fs.get_file_info([join(root, s["name"]) for s in listed])
    for shard, info in zip(listed, infos):
        if info.type == pafs.FileType.NotFound:
            raise ValueError(f"{shard_set.location}: shard {shard['name']} is listed in {MANIFEST_FILE} but absent")
        if info.size != int(shard["bytes"]):
            raise ValueError(f"{shard_set.location}: shard {shard['name']} has {info.size} bytes, {MANIFEST_FILE} "
                             f"says {shard['bytes']}")
