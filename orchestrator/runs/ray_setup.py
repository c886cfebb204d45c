"""Ray for a run or a search: the GPU request against this machine, connecting or starting Ray once, and
whether the requested workers fit the cluster."""
from __future__ import annotations

import logging
import math
import os
from contextlib import contextmanager

import ray
import torch

from orchestrator.errors import CvlabError
from workloads.object_storage import storage_env
from workloads.logs import verbosity

log = logging.getLogger(__name__)
# Worker processes importing torch on a busy machine can take longer than Ray Train's 60 s default.
WORKER_START_TIMEOUT_S = "600"
# Set by Ray in the driver process of a submitted job (ray._private.runtime_env.constants).
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def check_gpu_request(spec) -> None:
    """`scaling.use_gpu: true` needs CUDA: refuse before any work when this machine's own Ray would run it
    (no RAY_ADDRESS, no Ray connection) and torch sees no CUDA device."""
    if not spec.scaling.use_gpu or os.environ.get("RAY_ADDRESS"):
        return
    if ray.is_initialized():
        return  # the cluster's resources are checked against the request (check_fits)
    if not torch.cuda.is_available():
        raise CvlabError(
            "scaling.use_gpu is true but this machine has no usable CUDA device "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}); set scaling.use_gpu: false, "
            "or run on a GPU cluster (RAY_ADDRESS / cvlab submit)"
        )


def ensure_ray(num_cpus: int | None = None) -> bool:
    """Connect to Ray (an initialised session, RAY_ADDRESS or a running local cluster), else start a local
    one with `num_cpus` logical CPUs (default: Ray's own count). True when this call started or connected it,
    i.e. when the caller should shut it down."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", WORKER_START_TIMEOUT_S)
    quiet = logging.INFO if verbosity() > 0 else logging.WARNING
    runtime_env = driver_runtime_env()
    kwargs = {"runtime_env": runtime_env} if runtime_env else {}
    if os.environ.get("RAY_ADDRESS") or num_cpus is None:
        ray.init(log_to_driver=True, logging_level=quiet, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, log_to_driver=True, logging_level=quiet, **kwargs)
    return True


def driver_runtime_env() -> dict:
    """The bucket settings of this process (`object_storage.STORAGE_ENV`) for every Ray worker of the run: the
    workers of an already running cluster do not inherit this process's environment. Empty inside a Ray job,
    whose own runtime_env (`cvlab submit` forwards the same variables) already reaches its workers and would
    conflict with a second one."""
    if os.environ.get(RAY_JOB_CONFIG_ENV):
        return {}
    env = storage_env()
    return {"env_vars": env} if env else {}


@contextmanager
def ray_session(num_cpus: int | None = None, *, owned: bool = True):
    """Ray for one run or search: connected or started by `ensure_ray`, and shut down at the end when this call
    started it. `owned=False` (a Tune trial, inside the search's Ray) leaves Ray alone. Yields whether this
    call started (or connected) Ray."""
    started = owned and ensure_ray(num_cpus)
    try:
        yield started
    finally:
        if started:
            ray.shutdown()


def worker_group_resources(spec) -> dict[str, float]:
    """What the run's Ray Train workers reserve together (`scaling`), with Ray's resource names: for a worker
    range, what its `min` workers reserve (the run starts once they fit)."""
    per = {k.upper() if k.lower() in ("cpu", "gpu") else k: float(v)
           for k, v in spec.scaling.resources_per_worker.items()}
    per.setdefault("CPU", 1.0)
    if spec.scaling.use_gpu:
        per.setdefault("GPU", 1.0)
    return {k: v * spec.scaling.min_workers for k, v in per.items()}


def check_fits(need: dict[str, float], cluster: dict[str, float], what: str, detail: str = "") -> int:
    """How many times `need` fits into `cluster` (Ray's `cluster_resources()`); CvlabError when not once.

    `what` names the consumer in the message ("the run", "one trial"), `detail` what it is made of.
    """
    fits = []
    for key, amount in need.items():
        if amount <= 0:
            continue
        have = cluster.get(key, 0.0)
        if amount > have:
            raise CvlabError(
                f"{what} needs {amount:g} {key}{f' ({detail})' if detail else ''} but the Ray cluster has {have:g}; lower scaling.num_workers / "
                "resources_per_worker, set scaling.use_gpu: false, or use a bigger cluster"
            )
        fits.append(math.floor(have / amount + 1e-9))
    return max(1, min(fits) if fits else 1)


def check_run_fits(spec) -> None:
    """Refuse a run whose workers can never be placed (Ray would wait for them forever)."""
    check_fits(worker_group_resources(spec), ray.cluster_resources(), "the run",
               spec.scaling.describe())
