"""The Ray Train run folder of a cvlab run and the record in it that names its MLflow run.

Every fresh run gets its own Ray Train folder `<storage>/<base>-<timestamp>`, holding a small JSON record
(`cvlab_run.json`) that names the MLflow run it feeds, so `--resume` can find the newest run of a name and
keep logging to the same MLflow run. Paths go through a pyarrow filesystem (None: the local one), so the
same code serves local, s3:// and gs:// storage.
"""
from __future__ import annotations

import json
import os
import time

import pyarrow.fs as pafs

from orchestrator.names import RUN_RECORD_FILE
from orchestrator.runs.storage import storage_join


def filesystem(fs):
    """`fs`, or the local pyarrow filesystem when it is None."""
    if fs is not None:
        return fs
    return pafs.LocalFileSystem()


def exists(fs, path: str) -> bool:
    return filesystem(fs).get_file_info(path).type != pafs.FileType.NotFound


def read_record(fs, folder: str) -> dict | None:
    try:
        with filesystem(fs).open_input_stream(storage_join(folder, RUN_RECORD_FILE)) as fh:
            return json.loads(fh.read().decode())
    except (OSError, ValueError):
        return None


def write_record(fs, folder: str, record: dict) -> None:
    fs = filesystem(fs)
    fs.create_dir(folder, recursive=True)
    with fs.open_output_stream(storage_join(folder, RUN_RECORD_FILE)) as fh:
        fh.write(json.dumps(record, indent=1).encode())


def find_previous_run(fs, storage: str, base: str) -> tuple[str, dict] | None:
    """The newest `(ray_run_name, record)` among `<storage>/<base>-<timestamp>` folders, or None."""
    found = []
    try:
        infos = filesystem(fs).get_file_info(pafs.FileSelector(storage, allow_not_found=True))
    except OSError:
        return None
    for info in infos:
        if info.type != pafs.FileType.Directory or not info.base_name.startswith(base + "-"):
            continue
        record = read_record(fs, info.path)
        if record and record.get("base_name") == base:
            found.append((record.get("created", 0), info.base_name, record))
    if not found:
        return None
    _, ray_name, record = max(found)
    return ray_name, record


def new_run_name(fs, storage: str, base: str) -> str:
    """`<base>-<timestamp>`, made unique within `storage`."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name, i = f"{base}-{stamp}", 2
    while exists(fs, storage_join(storage, name)):
        name, i = f"{base}-{stamp}-{i}", i + 1
    return name


def list_local_checkpoints(run_dir: str) -> list[str]:
    """The checkpoint folders of a local Ray Train run folder, newest first (Ray names them by time)."""
    try:
        names = [n for n in os.listdir(run_dir) if n.startswith("checkpoint_")]
    except OSError:
        return []
    return [os.path.join(run_dir, n) for n in sorted(names, reverse=True)
            if os.path.isdir(os.path.join(run_dir, n))]
