"""What every `cvlab eval` job shares, whatever its workload: it evaluates a resolved model source
(`orchestrator.inference.sources.Source`), its MLflow run is named `eval-<experiment>` and tagged with the
source run, and its params and summary name the source. Mixed in before a workload's driver:
`class ClassificationEval(SourceEval, ClassificationDriver)`; the OpenMMLab workloads through
`orchestrator.drivers.openmmlab.OpenMMLabEval`."""
from __future__ import annotations

from typing import Any


class SourceEval:
    kind = "eval"

    def __init__(self, spec, source, data=None):
        super().__init__(spec, data=data)
        self.source = source

    def run_name(self) -> str:
        return f"eval-{self.spec.run.name or self.spec.experiment.name}"

    def tags(self) -> dict[str, str]:
        from orchestrator.inference.sources import short_run_label
        from orchestrator.names import SOURCE_RUN_TAG

        return {SOURCE_RUN_TAG: short_run_label(self.source)}

    def params(self) -> dict[str, Any]:
        return {**super().params(), "eval.source": self.source.given, "eval.format": self.source.format}

    def log_eval_metrics(self, result, ctx) -> dict[str, float]:
        """The reported `eval/*` scalars, logged to the eval run (step 0) and returned."""
        from orchestrator.tracking.runs import log_metrics

        scalars = {k: float(v) for k, v in (result.metrics or {}).items()
                   if k.startswith("eval/") and isinstance(v, (int, float))}
        log_metrics(ctx.client, ctx.run_id, scalars, step=0)
        return scalars

    def source_line(self) -> str:
        return f"  source          {self.source.given} ({self.source.format})"
