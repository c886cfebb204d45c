"""Locations that are local folders or bucket URIs, the settings that reach a bucket, and riding out an outage.

- `open_location(location)`: a pyarrow filesystem and path for a local folder or `s3://bucket/prefix` (pyarrow
  reads the standard AWS_* variables, as boto3 and MLflow do: there is no cvlab-specific setting).
- `STORAGE_ENV` / `storage_env()`: those variables, which the driver hands on to Ray workers and jobs.
- `Backoff` / `retrying()`: reads and writes that meet an unreachable bucket wait and try again, with exponential
  backoff, until it has been unreachable for `limit_s` seconds in a row (`run.storage_retry_limit_s`); then
  `StorageUnreachable` says for how long and what failed. A success resets the clock.
- `retrying_filesystem(fs, limit_s)`: an S3 filesystem that does every operation of `fs` that way, for the
  run storage Ray Train and Tune write to (checkpoints, the controller's snapshot, Tune's state). pyarrow's own
  S3 retry strategy cannot do it: it is lost when the filesystem is pickled to Ray's processes.
"""
from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import TypeVar

import pyarrow as pa
import pyarrow.fs as pafs

log = logging.getLogger(__name__)
T = TypeVar("T")

# The standard variables pyarrow, boto3 and MLflow read for an S3 endpoint and its credentials.
STORAGE_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION",
               "AWS_DEFAULT_REGION")
# Where a bucket's endpoint and credentials come from, for messages about a location that cannot be reached.
S3_SETTINGS = "the endpoint and credentials come from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY " \
              "and AWS_REGION"


def storage_env() -> dict[str, str]:
    """The `STORAGE_ENV` variables set (non-empty) in this process."""
    return {name: os.environ[name] for name in STORAGE_ENV if os.environ.get(name)}


def is_bucket_uri(location: str) -> bool:
    """True for `s3://...` and other bucket URIs; False for local paths and `file://`."""
    return "://" in location and not location.startswith("file://")


def open_location(location: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local folder or a bucket URI; a local path is made absolute."""
    if is_bucket_uri(location):
        fs, path = pafs.FileSystem.from_uri(location)
        return fs, path.rstrip("/")
    local = location[len("file://"):] if location.startswith("file://") else location
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(local))


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def exists(location: str) -> bool:
    fs, path = open_location(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def write_text(location: str, text: str) -> None:
    """Write a small text file at a local path or bucket URI (parent folders created)."""
    fs, path = open_location(location)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as out:
        out.write(text.encode("utf-8"))


class StorageUnreachable(OSError):
    """The storage stayed unreachable for longer than the run allows (never retried again)."""


class Backoff:
    """Waits between attempts at something that fails with OSError: 0.5 s, doubling up to 8 s, until the failures
    have gone on for `limit_s` seconds without a success in between."""

    def __init__(self, limit_s: float, first_s: float = 0.5, max_s: float = 8.0,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        self.limit_s, self.first_s, self.max_s = limit_s, first_s, max_s
        self.clock, self.sleep = clock, sleep
        self.since: float | None = None
        self.delay = first_s

    def failed(self, what: str, err: BaseException, attempt_started: float | None = None) -> None:
        """Wait before the next attempt; StorageUnreachable once the outage has lasted `limit_s`, counted from
        the start of the first failed attempt when given (an attempt may itself wait long for an answer)."""
        now = self.clock()
        if self.since is None:
            self.since = now if attempt_started is None else attempt_started
            log.warning("%s failed (%s); retrying for up to %g s", what, _short(err), self.limit_s)
        waited = now - self.since
        if waited >= self.limit_s:
            raise StorageUnreachable(
                f"{what}: the storage was unreachable for {waited:.0f} s, longer than run.storage_retry_limit_s "
                f"({self.limit_s:g} s); last error: {_short(err)}") from err
        self.sleep(min(self.delay, self.limit_s - waited))
        self.delay = min(self.delay * 2, self.max_s)

    def succeeded(self, what: str) -> None:
        if self.since is not None:
            log.warning("%s succeeded after %.0f s of retries", what, self.clock() - self.since)
        self.since, self.delay = None, self.first_s


def retrying(what: str, attempt: Callable[[], T], limit_s: float) -> T:
    """`attempt()`, tried again after each OSError (pyarrow's I/O errors; not a missing file or a refusal) as
    `Backoff(limit_s)` allows."""
    backoff = Backoff(limit_s)
    while True:
        started = backoff.clock()
        try:
            result = attempt()
        except (FileNotFoundError, PermissionError, StorageUnreachable):
            raise  # an answer from the storage, not an outage; or an outage already waited out
        except OSError as err:
            backoff.failed(what, err, started)
            continue
        backoff.succeeded(what)
        return result


class RetryingHandler(pafs.FileSystemHandler):
    """Every operation of `inner` through `retrying`. A written file is kept in a spooled temporary file and sent
    when it is closed, so that a failed upload can be sent again whole."""

    def __init__(self, inner: pafs.FileSystem, limit_s: float):
        self.inner, self.limit_s = inner, limit_s

    def _retry(self, what: str, attempt: Callable[[], T]) -> T:
        return retrying(what, attempt, self.limit_s)

    def __eq__(self, other) -> bool:
        return isinstance(other, RetryingHandler) and self.inner.equals(other.inner) and self.limit_s == other.limit_s

    def get_type_name(self) -> str:
        return f"retrying-{self.inner.type_name}"

    def normalize_path(self, path: str) -> str:
        return self.inner.normalize_path(path)

    def get_file_info(self, paths):
        return self._retry(f"looking up {paths[0] if len(paths) == 1 else f'{len(paths)} paths'}",
                           lambda: self.inner.get_file_info(paths))

    def get_file_info_selector(self, selector):
        return self._retry(f"listing {selector.base_dir}", lambda: self.inner.get_file_info(selector))

    def create_dir(self, path, recursive):
        self._retry(f"creating {path}", lambda: self.inner.create_dir(path, recursive=recursive))

    def delete_dir(self, path):
        self._retry(f"deleting {path}", lambda: self.inner.delete_dir(path))

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self._retry(f"emptying {path}", lambda: self.inner.delete_dir_contents(path, missing_dir_ok=missing_dir_ok))

    def delete_root_dir_contents(self):
        self._retry("emptying the root", lambda: self.inner.delete_dir_contents("/", accept_root_dir=True))

    def delete_file(self, path):
        self._retry(f"deleting {path}", lambda: self.inner.delete_file(path))

    def move(self, src, dest):
        self._retry(f"moving {src}", lambda: self.inner.move(src, dest))

    def copy_file(self, src, dest):
        self._retry(f"copying {src}", lambda: self.inner.copy_file(src, dest))

    def open_input_stream(self, path):
        return self._retry(f"opening {path}", lambda: self.inner.open_input_stream(path))

    def open_input_file(self, path):
        return self._retry(f"opening {path}", lambda: self.inner.open_input_file(path))

    def open_output_stream(self, path, metadata):
        return pa.PythonFile(_SpooledUpload(self, path, metadata), mode="w")

    def open_append_stream(self, path, metadata):
        return self._retry(f"opening {path}", lambda: self.inner.open_append_stream(path, metadata=metadata))


class _SpooledUpload(io.RawIOBase):
    """A file being written to the storage: bytes gather locally (in memory up to 64 MiB, then on disk) and are
    uploaded on close, again from the start after a failed attempt."""

    def __init__(self, handler: RetryingHandler, path: str, metadata):
        super().__init__()
        self.handler, self.path, self.metadata = handler, path, metadata
        self.buffer = tempfile.SpooledTemporaryFile(max_size=64 << 20)

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        return self.buffer.write(data)

    def close(self) -> None:
        if self.closed:
            return
        try:
            self.handler._retry(f"writing {self.path}", self._upload)
        finally:
            self.buffer.close()
            super().close()

    def _upload(self) -> None:
        self.buffer.seek(0)
        with self.handler.inner.open_output_stream(self.path, metadata=self.metadata) as out:
            shutil.copyfileobj(self.buffer, out, 8 << 20)


def retrying_filesystem(fs: pafs.FileSystem, limit_s: float) -> pafs.FileSystem:
    """`fs` behind a `RetryingHandler`, for S3 (the store this is tested against); other filesystems unchanged.

    The S3 filesystem is rebuilt from its own options (its pickle state) without background writes: pyarrow's
    `copy_files` closes a file on a thread of pyarrow's I/O pool, and a background upload waits for that same
    pool, which deadlocks once every thread waits (seen with Tune's experiment-state upload)."""
    if not isinstance(fs, pafs.S3FileSystem):
        return fs
    rebuild, (options,) = fs.__reduce__()
    return pafs.PyFileSystem(RetryingHandler(rebuild({**options, "background_writes": False}), limit_s))


def unwrapped(fs: pafs.FileSystem) -> pafs.FileSystem:
    """The filesystem under `retrying_filesystem`'s wrapper (itself when not wrapped)."""
    handler = getattr(fs, "handler", None)
    return handler.inner if isinstance(handler, RetryingHandler) else fs


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}"
