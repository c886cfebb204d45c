"""The workload jobs, by workload name. A job is a `orchestrator.runs.job.Job` subclass that supplies only what
differs between workloads; adding a workload means adding one module here and its lines in the two tables below.

The CLI and the Tune trials pick a job here and hand it to the run lifecycle, which never imports a workload's job.
"""
from __future__ import annotations

import importlib

from orchestrator.errors import CvlabError

# workload name -> "module:class" (imported on first use: each pulls in its own framework)
JOBS = {
    "classification": "orchestrator.jobs.classification:ClassificationJob",
    "detection": "orchestrator.jobs.detection:DetectionJob",
    "segmentation": "orchestrator.jobs.segmentation:SegmentationJob",
}
# workload name -> its evaluation job (`cvlab eval`), which holds the workload's job above
EVAL_JOBS = {
    "classification": "orchestrator.jobs.classification:ClassificationEvalJob",
    "detection": "orchestrator.jobs.openmmlab:OpenMMLabEvalJob",
    "segmentation": "orchestrator.jobs.openmmlab:OpenMMLabEvalJob",
}


def _load(table: dict[str, str], workload: str, what: str):
    try:
        target = table[workload]
    except KeyError:
        raise CvlabError(f"no {what} for workload {workload!r} (known: {', '.join(table)})") from None
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def job_class(workload: str):
    """The job class of `workload` (CvlabError naming the known ones)."""
    return _load(JOBS, workload, "job")


def job_for(spec, **kwargs):
    """The job for `spec.workload`; `kwargs` go to its constructor (e.g. data=...)."""
    return job_class(spec.workload)(spec, **kwargs)


def eval_job_for(spec, source, data=None):
    """The evaluation job of `spec.workload` for a resolved model source (`cvlab eval`): it holds the source
    and the workload's job (its data check, data plan and config)."""
    eval_class = _load(EVAL_JOBS, spec.workload, "evaluation")
    return eval_class(job_for(spec, data=data), source)
