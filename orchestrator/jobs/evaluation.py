"""What every `cvlab eval` job shares, whatever its workload. An `EvalJob` holds two things: the resolved model
source (`orchestrator.inference.sources.Source`) and the workload's job (`ClassificationJob`, `DetectionJob`,
...), whose data check, data plan, config and dataset description it reuses. Its MLflow run is named
`eval-<experiment>` and tagged with the source run; its params and summary name the source.

A workload family's eval job (`ClassificationEvalJob`, `OpenMMLabEvalJob`) subclasses `EvalJob` and supplies
how the weights are read and checked, the worker and its config, and what is logged at the end."""
from __future__ import annotations

from typing import Any

from orchestrator.inference.sources import Source, short_run_label
from orchestrator.names import SOURCE_RUN_TAG
from orchestrator.runs.job import Job
from orchestrator.tracking.runs import log_metrics


class EvalJob(Job):
    kind = "eval"

    def __init__(self, job: Job, source: Source):
        super().__init__(job.spec)
        self.job = job  # the workload's job: data check, data plan, config, dataset description
        self.source = source
        self.workload = job.workload
        self.step_metric = job.step_metric
        self.budget_path = job.budget_path

    def run_name(self) -> str:
        return f"eval-{self.spec.run.name or self.spec.experiment.name}"

    def tags(self) -> dict[str, str]:
        return {SOURCE_RUN_TAG: short_run_label(self.source)}

    def source_params(self) -> dict[str, Any]:
        return {"eval.source": self.source.given, "eval.format": self.source.format}

    def params(self) -> dict[str, Any]:
        return {**self.job.params(), **self.source_params()}

    def text_artifacts(self) -> dict[str, str]:
        return self.job.text_artifacts()

    def dataset_input(self) -> dict[str, Any] | None:
        return self.job.dataset_input()

    def log_eval_metrics(self, result, ctx) -> dict[str, float]:
        """The reported `eval/*` scalars, logged to the eval run (step 0) and returned."""
        scalars = {k: float(v) for k, v in (result.metrics or {}).items()
                   if k.startswith("eval/") and isinstance(v, (int, float))}
        log_metrics(ctx.client, ctx.run_id, scalars, step=0)
        return scalars

    def source_line(self) -> str:
        return f"  source          {self.source.given} ({self.source.format})"
