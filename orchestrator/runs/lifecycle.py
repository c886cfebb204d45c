"""One run lifecycle for every job (training of any workload, evaluation), in this order:

1. resolve tracking and check that its server answers; check the GPU request against this machine
   (`preflight`);
2. find the Ray Train run folder (a new one, the one to resume, or the trial's) and prepare the job (data,
   model) -- all before anything exists;
3. start or connect to Ray, once (`ray_session`), and check that the workers fit the cluster;
4. create (or reopen) the MLflow run in its experiment (`open_experiment`) and write the run folder's record;
5. build the `TorchTrainer` and fit it;
6. turn any failure into one message;
7. finalize (the job's artifacts, best metric, tags) and end the run FINISHED, FAILED or KILLED.

The lifecycle is handed its job (`orchestrator.runs.job.Job`; the CLI or a Tune trial picks it) and never imports
a workload. Where the run lives is its placement: `StandaloneRun` for `cvlab run`/`eval` (owns Ray, may resume
an earlier run, ends its MLflow run after a failure), `TrialRun` for a Tune trial (Ray is already there, the run
is nested under the search's parent run, and a failed run is left for the search's callback to end).
`orchestrator.search.tune` opens its experiment and Ray with the same `preflight`, `open_experiment` and
`ray_session`.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from orchestrator.config.loader import flatten_spec, spec_yaml
from orchestrator.errors import CvlabError
from orchestrator.names import (
    CHECKPOINT_TAG,
    JOB_TAG,
    RAY_RUN_TAG,
    RESOLVED_SPEC_ARTIFACT,
    RESUME_TAG_PREFIX,
    WORKLOAD_TAG,
)
from orchestrator.runs.cost import check_cost_probe, measure_cost
from orchestrator.runs.failures import as_cvlab_error
from orchestrator.runs.job import Job, RunContext
from orchestrator.runs.ray_setup import check_gpu_request, check_run_fits, ray_session
from orchestrator.runs.records import find_previous_run, new_run_name, write_record
from orchestrator.runs.storage import resolve_storage, storage_join
from orchestrator.runs.trainer import build_trainer, refuse_reused_folder
from orchestrator.tracking.runs import (
    create_run,
    end_run,
    ensure_experiment,
    git_commit,
    log_best_metric,
    log_dataset,
    log_metrics,
    log_params,
    make_client,
)
from orchestrator.tracking.server import (
    check_tracking_server,
    default_artifact_location,
    resolve_tracking_uri,
    ui_link,
    wait_for_tracking_server,
)
from workloads.logs import ensure_configured, verbosity

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------- pieces the search shares
def preflight(spec) -> str:
    """Steps 1: the tracking URI (checked to answer) and the GPU request; returns the URI."""
    ensure_configured()
    tracking_uri = resolve_tracking_uri(spec)
    check_tracking_server(tracking_uri)
    check_gpu_request(spec)
    return tracking_uri


def open_experiment(client, spec, tracking_uri: str) -> tuple[str, str]:
    """The spec's MLflow experiment, created when new: (name, id)."""
    name = spec.tracking.experiment_name or spec.experiment.name
    try:
        return name, ensure_experiment(client, name, default_artifact_location(tracking_uri))
    except Exception as err:  # MLflow raises many kinds (MlflowException, requests errors, sqlalchemy)
        raise CvlabError(f"MLflow at {tracking_uri}: cannot open experiment {name!r}: {err}") from err


# ------------------------------------------------------------------------------------------ placements
@dataclass
class _Folder:
    """Where a run's Ray Train folder is and which MLflow run it continues (None: a new one)."""

    name: str
    run_id: str | None = None
    resumed_from: str | None = None  # the earlier run folder `--resume` continues


@dataclass
class StandaloneRun:
    """A `cvlab run` / `cvlab eval`: its own Ray session, a new or resumed run folder with a record, a
    top-level MLflow run that the lifecycle ends after a failure."""

    resume: bool = False
    owns_ray = True
    callbacks: Sequence[Any] = ()
    cost = None  # measured here when `run.measure_cost` is set

    def storage_path(self, spec) -> str:
        return spec.run.storage_path

    def find_folder(self, job: Job, fs, storage: str, base: str) -> _Folder:
        if not self.resume:
            return _Folder(new_run_name(fs, storage, base))
        previous = find_previous_run(fs, storage, base)
        if previous is None:
            raise CvlabError(f"nothing to resume: no earlier run named {base!r} in {storage}")
        name, record = previous
        recorded = record.get("workload", "classification")
        if recorded != job.workload:
            raise CvlabError(f"the run to resume ({name}) is a {recorded} run, not {job.workload}")
        return _Folder(name, run_id=record["mlflow_run_id"], resumed_from=name)

    def create_run(self, job: Job, client, experiment_id: str, tags: dict, folder: str, fs, storage: str,
                   tracking_uri: str) -> str:
        base = job.run_name()
        run_id = create_run(client, experiment_id, base, tags={**tags, RAY_RUN_TAG: folder})
        write_record(fs, storage_join(storage, folder), {
            "mlflow_run_id": run_id, "tracking_uri": tracking_uri, "experiment_id": experiment_id,
            "base_name": base, "created": time.time(), "workload": job.workload,
        })
        return run_id

    def params(self, spec) -> dict[str, Any]:
        return flatten_spec(spec)

    def announce(self, ctx: RunContext, experiment_name: str) -> None:
        log.info("MLflow run %s in experiment %r (%s)", ctx.run_id, experiment_name, ctx.tracking_uri)
        link = ui_link(ctx.tracking_uri, ctx.experiment_id, ctx.run_id)
        if link:
            log.info("MLflow UI: %s", link)
        log.info("Ray Train run %s", ctx.run_dir)

    def end_after_failure(self, ctx: RunContext, status: str, message: str) -> None:
        end_run(ctx.client, ctx.run_id, status, error=message, quiet=True)


@dataclass
class TrialRun:
    """A Tune trial's run: Ray is the search's, the folder is named by the trial, the MLflow run is nested under
    the search's parent run and ended by the search's callback (it alone can tell a trial that failed from one
    the scheduler stopped)."""

    parent_run_id: str
    run_name: str  # MLflow run name
    folder: str  # Ray Train run folder name (the trial id)
    trial_storage: str  # where trial folders go (a local path or a bucket URI)
    tags: dict[str, str] = field(default_factory=dict)
    run_id: str | None = None  # continue this MLflow run (a trial restarted by Tune or a resumed search)
    callbacks: Sequence[Any] = ()  # e.g. TuneReportCallback
    searched: dict[str, str] = field(default_factory=dict)  # params logged besides the spec's
    cost: dict[str, float] | None = None  # cost/* the trial measured before deciding to train; logged as is
    owns_ray = False

    def storage_path(self, spec) -> str:
        return self.trial_storage

    def find_folder(self, job: Job, fs, storage: str, base: str) -> _Folder:
        return _Folder(self.folder, run_id=self.run_id)

    def create_run(self, job: Job, client, experiment_id: str, tags: dict, folder: str, fs, storage: str,
                   tracking_uri: str) -> str:
        return create_run(client, experiment_id, self.run_name, tags={**tags, **self.tags},
                          parent_run_id=self.parent_run_id)

    def params(self, spec) -> dict[str, Any]:
        # The search's own section is the parent run's; the sampled values come under their own keys.
        return {**{k: v for k, v in flatten_spec(spec).items() if not k.startswith("search.")}, **self.searched}

    def announce(self, ctx: RunContext, experiment_name: str) -> None:
        pass  # the search prints its parent run and Tune its trials

    def end_after_failure(self, ctx: RunContext, status: str, message: str) -> None:
        pass


# ------------------------------------------------------------------------------------------- the lifecycle
def run_job(job: Job, *, resume: bool = False, trial: TrialRun | None = None) -> dict[str, Any]:
    """Run `job` end to end; returns the summary (run_id, metrics, ... and what the job adds)."""
    placement = trial if trial is not None else StandaloneRun(resume=resume)
    spec = job.spec
    # Ray Train's report() waits up to this interval (2 s by default); per-epoch reports need no more.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

    # 1-2: nothing is created before these pass.
    tracking_uri = preflight(spec)
    fs, storage = resolve_storage(placement.storage_path(spec), retry_limit_s=spec.run.storage_retry_limit_s)
    folder = placement.find_folder(job, fs, storage, job.run_name())
    job.prepare()
    if spec.run.measure_cost:
        check_cost_probe(job)

    # 3: Ray, once.
    with ray_session(owned=placement.owns_ray) as started_ray:
        if started_ray:
            check_run_fits(spec)
        cost = placement.cost
        if cost is None and spec.run.measure_cost:
            cost = measure_cost(job)  # before training, on a worker's device (`orchestrator.runs.cost`)
        # 4: the Ray Train folder and the MLflow run.
        if folder.run_id is None:
            refuse_reused_folder(fs, storage, folder.name)
        ctx, experiment_name = _open_run(job, placement, tracking_uri, fs, storage, folder)
        if cost:
            log_metrics(ctx.client, ctx.run_id, cost, step=0)
        return _train_and_end(job, placement, ctx, experiment_name, folder.name, storage)


def _open_run(job: Job, placement, tracking_uri: str, fs, storage: str,
              folder: _Folder) -> tuple[RunContext, str]:
    """Create or reopen the MLflow run; log params and the resolved spec."""
    spec = job.spec
    client = make_client(tracking_uri)
    experiment_name, experiment_id = open_experiment(client, spec, tracking_uri)
    if folder.run_id is not None:
        try:
            client.get_run(folder.run_id)
        except Exception as err:
            raise CvlabError(f"the run to resume logged to MLflow run {folder.run_id}, which {tracking_uri} does "
                             f"not have: {err}") from err
        client.update_run(folder.run_id, status="RUNNING")
        run_id = folder.run_id
        if folder.resumed_from:
            log.info("resuming %s (MLflow run %s)", folder.resumed_from, run_id)
    else:
        tags = {**spec.experiment.tags, WORKLOAD_TAG: job.workload, JOB_TAG: job.kind, **job.tags()}
        run_id = placement.create_run(job, client, experiment_id, tags, folder.name, fs, storage, tracking_uri)

    ctx = RunContext(client=client, tracking_uri=tracking_uri, experiment_id=experiment_id, run_id=run_id,
                     run_dir=storage_join(storage, folder.name), fs=fs, resumed=folder.run_id is not None,
                     verbosity=verbosity())
    try:
        _log_run_inputs(job, placement, ctx, folder)
    except BaseException as err:
        placement.end_after_failure(ctx, "FAILED", f"{type(err).__name__}: {err}")
        raise
    placement.announce(ctx, experiment_name)
    return ctx, experiment_name


def _log_run_inputs(job: Job, placement, ctx: RunContext, folder: _Folder) -> None:
    """Params (a resumed run tags what changed), the resolved spec, the job's text artifacts and data set."""
    client, run_id, spec = ctx.client, ctx.run_id, job.spec
    params = {**placement.params(spec), **job.params(), "git.commit": git_commit() or "none"}
    changed = log_params(client, run_id, params)
    if changed:
        client.set_tag(run_id, f"{RESUME_TAG_PREFIX}{int(time.time())}",
                       json.dumps({k: new for k, (_old, new) in changed.items()})[:5000])
    if folder.run_id is None:
        client.log_text(run_id, spec_yaml(spec), RESOLVED_SPEC_ARTIFACT)
        for name, text in job.text_artifacts().items():
            client.log_text(run_id, text, name)
        dataset = job.dataset_input()
        if dataset:
            log_dataset(client, run_id, **dataset)
    elif folder.resumed_from:
        client.log_text(run_id, spec_yaml(spec), f"resolved-resume-{time.strftime('%Y%m%d-%H%M%S')}.yaml")


def _train_and_end(job: Job, placement, ctx: RunContext, experiment_name: str, folder: str,
                   storage: str) -> dict[str, Any]:
    client, run_id = ctx.client, ctx.run_id
    start = time.perf_counter()
    try:
        # 5: build and fit.
        trainer = build_trainer(job, ctx, name=folder, storage=storage, fs=ctx.fs, callbacks=placement.callbacks)
        try:
            result = trainer.fit()
        except Exception as err:  # 6: one message for a known failure
            what = "evaluation" if job.kind == "eval" else f"{job.workload} training"
            raise as_cvlab_error(err, what) from err
        # 7: the server may have gone away during training (the workers kept going): wait for it to log.
        wait_for_tracking_server(ctx.tracking_uri)
        summary = job.finalize(result, ctx)
        if job.kind == "train":
            best = log_best_metric(client, run_id, job.best_metric, job.best_mode, job.step_metric)
            if best:
                summary.setdefault("best", best)
        if result.checkpoint is not None:
            client.set_tag(run_id, CHECKPOINT_TAG, result.checkpoint.path)
        end_run(client, run_id, "FINISHED", reason="completed")
    except CvlabError as err:
        placement.end_after_failure(ctx, "FAILED", str(err))
        raise
    except (KeyboardInterrupt, SystemExit) as err:
        # Ray's SIGINT handler aborts training and may exit through SystemExit: both are interruptions.
        placement.end_after_failure(ctx, "KILLED", f"interrupted ({type(err).__name__}); continue with --resume")
        raise KeyboardInterrupt from err
    except BaseException as err:
        placement.end_after_failure(ctx, "FAILED", f"{type(err).__name__}: {err}")
        raise
    summary.update({
        "run_id": run_id,
        "experiment_id": ctx.experiment_id,
        "experiment_name": experiment_name,
        "tracking_uri": ctx.tracking_uri,
        "ray_run": ctx.run_dir,
        "seconds": round(time.perf_counter() - start, 1),
    })
    return summary
