"""Ray Train checkpoints to and from the run storage, through a storage outage.

The run storage is an `object_storage.retrying_filesystem`: every operation on it, and every file written with
`open_output_stream` (Ray Train's controller state, Tune's), rides out an outage of up to
`run.storage_retry_limit_s`. Two paths need more, because they go through `pyarrow.fs.copy_files`, which
drops an error raised when a Python-written file is closed:
- `report_with_retries`: `ray.train.report` whose checkpoint is copied by Ray's own code through Ray's
  documented `checkpoint_upload_fn` hook, then checked file by file (names and sizes) and copied again whole
  while incomplete. Ray registers a checkpoint only once this returns, so while the bucket is away the
  previous checkpoint stays the latest; past the limit the worker fails with `StorageUnreachable` and the
  previous checkpoint is intact.
- `opened`: a checkpoint as a local folder, downloaded (again whole after a failed attempt) when in a bucket.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pyarrow.fs as pafs
import ray.train

from workloads.object_storage import retrying, unwrapped


def report_with_retries(metrics: dict, checkpoint: ray.train.Checkpoint | None, limit_s: float) -> None:
    if checkpoint is None:
        ray.train.report(metrics)
        return

    def upload(ckpt: ray.train.Checkpoint, dir_name: str) -> ray.train.Checkpoint:
        storage = ray.train.get_context().get_storage()
        return upload_checked(lambda: storage.persist_current_checkpoint(ckpt, dir_name), ckpt.path, dir_name,
                              limit_s)

    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_upload_fn=upload)


def upload_checked(persist: Callable[[], ray.train.Checkpoint], local_dir: str, name: str,
                   limit_s: float) -> ray.train.Checkpoint:
    """`persist()` (a copy of `local_dir` into the storage, returning it there) until the storage holds every
    file of `local_dir` at its size, retried as `object_storage.retrying` does."""
    expected = {os.path.relpath(os.path.join(folder, f), local_dir): os.path.getsize(os.path.join(folder, f))
                for folder, _, files in os.walk(local_dir) for f in files}

    def attempt() -> ray.train.Checkpoint:
        stored = persist()
        selector = pafs.FileSelector(stored.path, recursive=True, allow_not_found=True)
        found = {os.path.relpath(i.path, stored.path): i.size for i in stored.filesystem.get_file_info(selector)
                 if i.type == pafs.FileType.File}
        wrong = sorted(f for f, size in expected.items() if found.get(f) != size)
        if wrong:
            raise OSError(f"the storage holds {len(expected) - len(wrong)} of the {len(expected)} files of "
                          f"checkpoint {name} ({', '.join(wrong[:3])} missing or cut short)")
        return stored

    return retrying(f"uploading checkpoint {name}", attempt, limit_s)


@contextmanager
def opened(checkpoint: ray.train.Checkpoint, limit_s: float) -> Iterator[str]:
    """The checkpoint's folder: itself when it is on this machine's disk, else a downloaded copy."""
    if isinstance(unwrapped(checkpoint.filesystem), pafs.LocalFileSystem):
        yield checkpoint.path
        return
    folder = tempfile.mkdtemp(prefix="cvlab-ckpt-")
    try:
        def download() -> str:
            shutil.rmtree(folder, ignore_errors=True)  # a partial copy from a failed attempt
            return checkpoint.to_directory(folder)

        yield retrying(f"downloading checkpoint {checkpoint.path}", download, limit_s)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
