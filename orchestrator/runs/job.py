"""What the run lifecycle asks of a job: the parts that differ between workloads (and between training and
evaluation). A workload's job (`orchestrator.jobs.<workload>`) subclasses `Job`, an evaluation job
(`orchestrator.jobs.evaluation.EvalJob`) holds one; the lifecycle (`orchestrator.runs.lifecycle`) does everything
else and never imports a workload's job.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from orchestrator.names import FAULT_MARKER_FILE
from orchestrator.runs.storage import storage_join, storage_uri


@dataclass(frozen=True)
class RunContext:
    """Where the current run lives; handed to the job once the MLflow run and the Ray Train folder exist."""

    client: Any  # MlflowClient
    tracking_uri: str
    experiment_id: str
    run_id: str
    run_dir: str  # the Ray Train run folder (local path, or a bucket path with `fs`)
    fs: Any  # pyarrow filesystem, None for local storage
    resumed: bool  # continuing an earlier run from its checkpoints
    verbosity: int

    @property
    def fault_marker(self) -> str:
        """Where the `run.fault_kill_rank_at` drill leaves its marker: a local path or a bucket URI."""
        return storage_uri(self.fs, storage_join(self.run_dir, FAULT_MARKER_FILE))

    @property
    def local_run_dir(self) -> str | None:
        """The run folder when it is on this machine's disk (fault drills, checkpoint fallbacks), else None."""
        return self.run_dir if self.fs is None else None


class Job:
    """Base class of every job the lifecycle runs. Subclasses set the class attributes and override the
    methods marked "override"; the defaults suit a training run."""

    workload = ""  # registry name, e.g. "classification"
    kind = "train"  # "train" or "eval"
    best_metric = ""  # the metric that ranks checkpoints and makes the run's best/ metrics
    best_mode = "max"
    step_metric = "epoch"  # the progress counter in every report ("epoch", or "iter" for iteration schedules)
    reported_metrics: tuple[str, ...] = ()  # what every report carries (searchable with `cvlab tune`)
    budget_path = "optim.epochs"  # the spec path that says how far a full run goes, in `step_metric`s
    data_paths: tuple[str, ...] = ()  # spec paths that change the prepared data (a search re-prepares it)
    cost_metrics: tuple[str, ...] = ()  # what its cost probe measures (`cost_probe`); empty: it has none

    def __init__(self, spec):
        self.spec = spec

    def planned_steps(self) -> int:
        """How far a full run goes, counted in `step_metric` (the value at `budget_path`)."""
        value = self.spec
        for key in self.budget_path.split("."):
            value = getattr(value, key)
        return int(value)

    def check_variant(self) -> None:
        """Override: a quick check of this spec beyond the schema, without data (`cvlab tune` runs it for every
        value of a searched path)."""

    def start_from_checkpoint(self, path: str) -> None:
        """Override: make this fresh run start from the training checkpoint at `path` (a checkpoint folder of an
        earlier run of the same workload and model), continuing its epoch count (`cvlab tune --extend`)."""
        raise ValueError(f"the {self.workload} workload cannot start from another run's checkpoint")

    def cost_probe(self) -> tuple[Callable[[Any], dict[str, float]], Any] | None:
        """Override: (function, argument) that measures this run's cost (`cost_metrics`) on a worker's device,
        after `prepare()`; `orchestrator.runs.cost` runs it there. None: the workload has no probe."""
        return None

    # ---- before anything is created (raise CvlabError for bad data or models)
    def prepare(self) -> None:
        """Override: generate or check the data and the model; store what the worker config needs."""

    # ---- MLflow
    def run_name(self) -> str:
        return self.spec.run.name or self.spec.experiment.name

    def tags(self) -> dict[str, str]:
        return {}

    def params(self) -> dict[str, Any]:
        """Override: params logged beside the flattened spec (model size, data sizes, ...)."""
        return {}

    def text_artifacts(self) -> dict[str, str]:
        """Override: text files logged once, when the run is created (e.g. the framework's own config)."""
        return {}

    def dataset_input(self) -> dict[str, Any] | None:
        """Override: the data set as an MLflow dataset input (name, source, digest, profile), or None."""
        return None

    # ---- Ray Train
    def worker(self) -> Callable[[Any], None]:
        """Override: the `train_loop_per_worker` function."""
        raise NotImplementedError

    def kill_drill(self, ctx: RunContext) -> dict[str, Any]:
        """The worker-config fields of the `run.fault_kill_rank_at` drill (every workload's worker config has
        them): `kill_at` (epoch, step, rank) or None, `kill_marker`, `kill_signal`."""
        kill = self.spec.run.fault_kill_rank_at
        return {"kill_at": (kill.epoch, kill.step, kill.rank) if kill else None, "kill_marker": ctx.fault_marker,
                "kill_signal": kill.signal if kill else "KILL"}

    def worker_config(self, ctx: RunContext) -> Any:
        """Override: the frozen config handed to every worker."""
        raise NotImplementedError

    # ---- after fit()
    def finalize(self, result, ctx: RunContext) -> dict[str, Any]:
        """Override: log what the run produced (checkpoints, model, pictures); return the summary."""
        return {"metrics": dict(result.metrics or {})}

    def summary_lines(self, summary: dict[str, Any]) -> list[str]:
        """Override: the lines `cvlab` prints at the end."""
        metrics = summary.get("metrics", {})
        return [f"  final {self.step_metric} {metrics.get(self.step_metric)}: {self.best_metric} "
                f"{metrics.get(self.best_metric, float('nan')):.4f}"]
