"""Where runs keep checkpoints and Tune state: local paths or s3:// / gs:// URIs.

`run.storage_path` in an experiment YAML may be a local directory (relative paths are taken from the
current directory) or a bucket URI. Bucket URIs are opened through pyarrow filesystems, which is also what
Ray Train's `RunConfig(storage_path=..., storage_filesystem=...)` uses, so a trainer can pass
`resolve_storage()`'s result straight through:

    fs, path = resolve_storage(spec.run.storage_path)
    RunConfig(storage_path=path, storage_filesystem=fs, ...)

On a multi-node cluster every node must see the same storage: a bucket, or an NFS mount at the same path.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from orchestrator.errors import CvlabError
from workloads.object_storage import retrying_filesystem, unwrapped

# Schemes pyarrow opens natively. `gcs` is pyarrow's alias for `gs`.
REMOTE_SCHEMES = ("s3", "gs", "gcs")
LOCAL_SCHEMES = ("", "file", "local")


def storage_scheme(path: str) -> str:
    """The URI scheme of `path` ('' for a plain local path). Windows drive letters are not URIs."""
    if not isinstance(path, str) or not path.strip():
        raise CvlabError("run.storage_path is empty: give a directory or an s3:// / gs:// URI")
    scheme = urlsplit(path).scheme.lower()
    return "" if len(scheme) == 1 else scheme


def is_remote_storage(path: str) -> bool:
    """True for bucket URIs (s3://, gs://), False for local paths and file:// URIs."""
    return storage_scheme(path) in REMOTE_SCHEMES


def validate_storage_path(path: str) -> str:
    """Check the form of a storage path without touching the network; return it normalised.

    Local paths become absolute (a Ray job's working directory is a temporary copy, so relative paths would
    silently land there); bucket URIs must name a bucket. Raises CvlabError naming the problem.
    """
    scheme = storage_scheme(path)
    if scheme in LOCAL_SCHEMES:
        local = urlsplit(path).path if scheme else path
        return str(Path(os.path.expanduser(local)).absolute())
    if scheme not in REMOTE_SCHEMES:
        raise CvlabError(
            f"run.storage_path {path!r}: unsupported scheme {scheme + '://'!r}; "
            "use a local directory, s3://bucket/prefix or gs://bucket/prefix"
        )
    if not urlsplit(path).netloc:
        raise CvlabError(f"run.storage_path {path!r} names no bucket: write {scheme}://<bucket>/<prefix>")
    return path.rstrip("/")


def resolve_storage(path: str, *, create: bool = True, retry_limit_s: float | None = None):
    """Return `(filesystem, path)` for a run storage location.

    - local path or file:// URI: `(None, absolute_path)`; the directory is created when `create` is true
      (Ray then uses its own local filesystem).
    - s3:// or gs:// URI: `(pyarrow.fs.FileSystem, "bucket/prefix")`. Credentials come from the usual
      places (AWS_* env vars / instance profile; GOOGLE_APPLICATION_CREDENTIALS / metadata server). pyarrow
      options can ride on the URI, e.g. `s3://bucket/runs?region=us-west-2&endpoint_override=minio:9000`.
      With `retry_limit_s` (`run.storage_retry_limit_s`), every operation rides out an outage that long
      (`workloads.object_storage.retrying_filesystem`); the checks here do not wait.

    Raises CvlabError when the URI is malformed, the filesystem cannot be opened (no credentials, unknown
    region, no network) or the local directory cannot be created.
    """
    normalised = validate_storage_path(path)
    if not is_remote_storage(normalised):
        if create:
            try:
                Path(normalised).mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise CvlabError(f"run.storage_path {normalised!r} cannot be created: {err}") from err
            if not os.access(normalised, os.W_OK):
                raise CvlabError(f"run.storage_path {normalised!r} is not writable")
        return None, normalised

    try:
        filesystem, bucket_path = pafs.FileSystem.from_uri(normalised)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        hint = (
            " (for s3:// add ?region=<region> when the bucket's region cannot be looked up)"
            if storage_scheme(normalised) == "s3"
            else ""
        )
        raise CvlabError(f"run.storage_path {normalised!r} cannot be opened: {err}{hint}") from err
    if create:
        try:
            filesystem.create_dir(bucket_path, recursive=True)
        except OSError as err:
            raise CvlabError(
                f"run.storage_path {normalised!r}: cannot create {bucket_path!r} ({err}); "
                "check the bucket name and your credentials"
            ) from err
    if retry_limit_s is not None:
        filesystem = retrying_filesystem(filesystem, retry_limit_s)
    return filesystem, bucket_path


def storage_join(base: str, *parts: str) -> str:
    """Join path parts with '/' onto a local path, a filesystem's bucket path or a bucket URI."""
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def storage_uri(filesystem, path: str) -> str:
    """The inverse of `resolve_storage`: a string that `resolve_storage` maps back to `(filesystem, path)`.

    Use it to hand a location to code that takes a single storage string (e.g. a per-trial storage path),
    since `resolve_storage` strips the scheme from bucket paths.
    """
    if filesystem is None:
        return path
    kind = type(unwrapped(filesystem)).__name__
    if kind == "S3FileSystem":
        return "s3://" + path.lstrip("/")
    if kind == "GcsFileSystem":
        return "gs://" + path.lstrip("/")
    if kind == "LocalFileSystem":
        return path
    raise CvlabError(f"cannot express a {kind} location as a URI: {path!r}")
