"""The workload drivers, by workload name. A driver is a `orchestrator.runs.job.Job` subclass that supplies
only what differs between workloads; adding a workload means adding one module here and one line below.

The CLI and the Tune trials pick a driver here and hand it to the run lifecycle, which never imports a driver.
"""
from __future__ import annotations

import importlib

from orchestrator.errors import CvlabError

# workload name -> "module:class" (imported on first use: each pulls in its own framework)
DRIVERS = {
    "classification": "orchestrator.drivers.classification:ClassificationDriver",
    "detection": "orchestrator.drivers.detection:DetectionDriver",
    "segmentation": "orchestrator.drivers.segmentation:SegmentationDriver",
}
# workload name -> its evaluation job (`cvlab eval`)
EVALUATORS = {
    "classification": "orchestrator.drivers.classification:ClassificationEval",
    "detection": "orchestrator.drivers.detection:DetectionEval",
    "segmentation": "orchestrator.drivers.segmentation:SegmentationEval",
}


def _load(table: dict[str, str], workload: str, what: str):
    try:
        target = table[workload]
    except KeyError:
        raise CvlabError(f"no {what} for workload {workload!r} (known: {', '.join(table)})") from None
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def driver_class(workload: str):
    """The driver class of `workload` (CvlabError naming the known ones)."""
    return _load(DRIVERS, workload, "driver")


def driver_for(spec, **kwargs):
    """The driver (a Job) for `spec.workload`; `kwargs` go to its constructor (e.g. data=...)."""
    return driver_class(spec.workload)(spec, **kwargs)


def evaluator_for(spec, source, **kwargs):
    """The evaluation job of `spec.workload` for a resolved model source (`cvlab eval`)."""
    return _load(EVALUATORS, spec.workload, "evaluation")(spec, source, **kwargs)
