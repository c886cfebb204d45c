"""Shared pytest set-up: the `gpu` marker skips itself when no CUDA device is usable."""
from __future__ import annotations

import os

import pytest

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


@pytest.fixture(scope="module")
def ray_cluster():
    """A private Ray cluster for one test module (address="local": never joins another cluster), with as
    many CPUs as the CI machine has: the runs here use 2 workers of 1 CPU."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield
    ray.shutdown()
