"""A run's measured cost (`run.measure_cost`, and every trial of a search that weighs or bounds cost): the
job's cost probe (`Job.cost_probe`, e.g. `workloads.cost_probe.probe_classifier`) run before training as one
Ray task with one training worker's resources (its CPUs, its GPU), so on a device like the workers'.

The task runs in a fresh process (`max_calls=1`): the CPU probe reads memory growth from the process's resident
memory, which memory kept from earlier work in a reused process would hide. It is scheduled outside any
placement group: inside a Tune trial, child tasks would otherwise be placed in the trial's own small bundle,
whose CPU share a worker's does not fit.
"""
from __future__ import annotations

import logging

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from orchestrator.errors import CvlabError
from orchestrator.runs.job import Job
from orchestrator.runs.ray_setup import WORKER_START_TIMEOUT_S, worker_group_resources

log = logging.getLogger(__name__)
# The probe takes seconds; waiting longer means its resources never came free (as Ray Train's worker start).
PROBE_TIMEOUT_S = float(WORKER_START_TIMEOUT_S)


def check_cost_probe(job: Job) -> None:
    """Refuse, before anything starts, a cost measurement the workload cannot make."""
    if not job.cost_metrics:
        raise CvlabError(f"the {job.workload} workload has no cost probe: run.measure_cost, cost objectives and "
                         "search.constraints work for classification only")


def measure_cost(job: Job) -> dict[str, float]:
    """The job's `cost/*` metrics, measured on one worker's resources (Ray must be running)."""
    check_cost_probe(job)
    probe, argument = job.cost_probe()
    spec = job.spec
    per_worker = {k: v / spec.scaling.min_workers for k, v in worker_group_resources(spec).items()}
    cpus, gpus = per_worker.pop("CPU", 1.0), per_worker.pop("GPU", 0.0)
    task = ray.remote(max_calls=1)(probe).options(
        num_cpus=cpus, num_gpus=gpus, resources=per_worker or None,
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None), name="cost_probe")
    ref = task.remote(argument)
    try:
        costs = ray.get(ref, timeout=PROBE_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        ray.cancel(ref, force=True)
        raise CvlabError(f"the cost probe did not finish within {PROBE_TIMEOUT_S:g} s: one worker's resources "
                         f"({cpus:g} CPU, {gpus:g} GPU) never became free in the Ray cluster (`ray status` shows "
                         "what holds them)") from None
    except ray.exceptions.RayError as err:
        raise CvlabError(f"the cost probe failed: {err}") from err
    log.info("measured cost: %s", ", ".join(f"{k.split('/', 1)[-1]} {v:.4g}" for k, v in costs.items()))
    return {k: float(v) for k, v in costs.items()}
