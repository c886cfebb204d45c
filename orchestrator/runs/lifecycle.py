"""One run lifecycle for every job (training of any workload, evaluation), in this order:

1. resolve tracking and check that its server answers;
2. check the GPU request against this machine; prepare the job (data, model) -- all before anything exists;
3. start or connect to Ray, once, and check that the workers fit the cluster;
4. create (or, with `resume`, reopen) the MLflow run and the Ray Train run folder;
5. build the `TorchTrainer` and fit it;
6. turn any failure into one message;
7. finalize (the job's artifacts, best metric, tags) and end the run FINISHED, FAILED or KILLED.

The lifecycle is handed its job (`orchestrator.runs.job.Job`; the CLI or a Tune trial picks the driver) and
never imports a driver. Inside a Tune trial (`trial=TrialRun(...)`) Ray is already there, the run is nested
under the search's parent run, and a failed run is left for the search's callback to end.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from orchestrator.errors import CvlabError
from orchestrator.names import (
    CHECKPOINT_TAG,
    END_REASON_TAG,
    JOB_TAG,
    RAY_RUN_TAG,
    RESOLVED_SPEC_ARTIFACT,
    RESUME_TAG_PREFIX,
    WORKLOAD_TAG,
)
from orchestrator.runs.job import Job, RunContext

log = logging.getLogger(__name__)


@dataclass
class TrialRun:
    """How a Tune trial's run differs from a plain `cvlab run`."""

    parent_run_id: str
    run_name: str  # MLflow run name
    folder: str  # Ray Train run folder name (the trial id)
    storage_path: str  # where trial folders go (a local path or a bucket URI)
    tags: dict[str, str] = field(default_factory=dict)
    run_id: str | None = None  # continue this MLflow run (a trial restarted by Tune or a resumed search)
    callbacks: Sequence[Any] = ()  # e.g. TuneReportCallback
    params: dict[str, str] = field(default_factory=dict)  # logged besides the spec's (the searched values)


def run_job(job: Job, *, resume: bool = False, trial: TrialRun | None = None) -> dict[str, Any]:
    """Run `job` end to end; returns the summary (run_id, metrics, ... and what the job adds)."""
    from orchestrator.runs.ray_setup import check_gpu_request, check_run_fits, ensure_ray
    from orchestrator.runs.records import find_previous_run, new_run_name
    from orchestrator.runs.storage import resolve_storage
    from orchestrator.runs.trainer import refuse_reused_folder
    from orchestrator.tracking.server import check_tracking_server, resolve_tracking_uri
    from workloads.logs import ensure_configured

    ensure_configured()
    spec = job.spec
    # Ray Train's report() waits up to this interval (2 s by default); per-epoch reports need no more.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

    # 1-2: nothing is created before these pass.
    tracking_uri = resolve_tracking_uri(spec)
    check_tracking_server(tracking_uri)
    check_gpu_request(spec)
    fs, storage = resolve_storage(trial.storage_path if trial else spec.run.storage_path)
    base = job.run_name()
    previous = None
    if resume and trial is None:
        previous = find_previous_run(fs, storage, base)
        if previous is None:
            raise CvlabError(f"nothing to resume: no earlier run named {base!r} in {storage}")
        recorded = previous[1].get("workload", "classification")
        if recorded != job.workload:
            raise CvlabError(f"the run to resume ({previous[0]}) is a {recorded} run, not {job.workload}")
    job.prepare()

    # 3: Ray, once.
    started_ray = trial is None and ensure_ray()
    try:
        if started_ray:
            check_run_fits(spec)
        # 4: the Ray Train folder and the MLflow run.
        if trial is not None:
            folder, fresh = trial.folder, trial.run_id is None
        elif previous is not None:
            folder, fresh = previous[0], False
        else:
            folder, fresh = new_run_name(fs, storage, base), True
        if fresh:
            refuse_reused_folder(fs, storage, folder)
        opened = _open_run(job, tracking_uri, fs, storage, folder, base, previous, trial)
        return _train_and_end(job, opened, folder, storage, trial)
    finally:
        if started_ray:
            import ray

            ray.shutdown()


@dataclass
class _Opened:
    context: RunContext
    experiment_name: str


def _open_run(job: Job, tracking_uri: str, fs, storage: str, folder: str, base: str, previous,
              trial: TrialRun | None) -> _Opened:
    """Create or reopen the MLflow run; log params and the resolved spec; write the run folder's record."""
    from orchestrator.config.loader import flatten_spec, spec_yaml
    from orchestrator.runs.records import write_record
    from orchestrator.runs.storage import storage_join
    from orchestrator.tracking.runs import (
        create_run,
        ensure_experiment,
        git_commit,
        log_params,
        make_client,
    )
    from orchestrator.tracking.server import default_artifact_location, ui_link
    from workloads.logs import verbosity

    spec = job.spec
    client = make_client(tracking_uri)
    experiment_name = spec.tracking.experiment_name or spec.experiment.name
    try:
        experiment_id = ensure_experiment(client, experiment_name, default_artifact_location(tracking_uri))
    except Exception as err:  # MLflow raises many kinds (MlflowException, requests errors, sqlalchemy)
        raise CvlabError(f"MLflow at {tracking_uri}: cannot open experiment {experiment_name!r}: {err}") from err

    existing_id = previous[1]["mlflow_run_id"] if previous else (trial.run_id if trial else None)
    if existing_id is not None:
        try:
            client.get_run(existing_id)
        except Exception as err:
            raise CvlabError(f"the run to resume logged to MLflow run {existing_id}, which {tracking_uri} does not "
                             f"have: {err}") from err
        client.update_run(existing_id, status="RUNNING")
        run_id = existing_id
        if previous:
            log.info("resuming %s (MLflow run %s)", previous[0], run_id)
    else:
        tags = {**spec.experiment.tags, WORKLOAD_TAG: job.workload, JOB_TAG: job.kind, **job.tags()}
        if trial is None:
            run_id = create_run(client, experiment_id, base, tags={**tags, RAY_RUN_TAG: folder})
            write_record(fs, storage_join(storage, folder), {
                "mlflow_run_id": run_id, "tracking_uri": tracking_uri, "experiment_id": experiment_id,
                "base_name": base, "created": time.time(), "workload": job.workload,
            })
        else:
            run_id = create_run(client, experiment_id, trial.run_name, tags={**tags, **trial.tags},
                                parent_run_id=trial.parent_run_id)

    ctx = RunContext(client=client, tracking_uri=tracking_uri, experiment_id=experiment_id, run_id=run_id,
                     run_dir=storage_join(storage, folder), fs=fs, resumed=existing_id is not None,
                     verbosity=verbosity())
    try:
        flat = {k: v for k, v in flatten_spec(spec).items() if not (trial and k.startswith("search."))}
        params = {**flat, **job.params(), **(trial.params if trial else {}), "git.commit": git_commit() or "none"}
        changed = log_params(client, run_id, params)
        if changed:
            client.set_tag(run_id, f"{RESUME_TAG_PREFIX}{int(time.time())}",
                           json.dumps({k: new for k, (_old, new) in changed.items()})[:5000])
        if existing_id is None:
            client.log_text(run_id, spec_yaml(spec), RESOLVED_SPEC_ARTIFACT)
            for name, text in job.text_artifacts().items():
                client.log_text(run_id, text, name)
            dataset = job.dataset_input()
            if dataset:
                from orchestrator.tracking.runs import log_dataset

                log_dataset(client, run_id, **dataset)
        elif previous:
            client.log_text(run_id, spec_yaml(spec), f"resolved-resume-{time.strftime('%Y%m%d-%H%M%S')}.yaml")
    except BaseException as err:
        _end(ctx, trial, "FAILED", f"{type(err).__name__}: {err}")
        raise
    if trial is None:
        log.info("MLflow run %s in experiment %r (%s)", run_id, experiment_name, tracking_uri)
        link = ui_link(tracking_uri, experiment_id, run_id)
        if link:
            log.info("MLflow UI: %s", link)
    return _Opened(context=ctx, experiment_name=experiment_name)


def _train_and_end(job: Job, opened: _Opened, folder: str, storage: str,
                   trial: TrialRun | None) -> dict[str, Any]:
    from orchestrator.runs.failures import as_cvlab_error
    from orchestrator.runs.trainer import build_trainer
    from orchestrator.tracking.runs import log_best_metric
    from orchestrator.tracking.server import wait_for_tracking_server

    ctx = opened.context
    client, run_id = ctx.client, ctx.run_id
    if trial is None:
        log.info("Ray Train run %s", ctx.run_dir)
    start = time.perf_counter()
    try:
        # 5: build and fit.
        trainer = build_trainer(job, ctx, name=folder, storage=storage, fs=ctx.fs,
                                callbacks=trial.callbacks if trial else ())
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
        client.set_tag(run_id, END_REASON_TAG, "completed")
        client.set_terminated(run_id, "FINISHED")
    except CvlabError as err:
        _end(ctx, trial, "FAILED", str(err))
        raise
    except (KeyboardInterrupt, SystemExit) as err:
        # Ray's SIGINT handler aborts training and may exit through SystemExit: both are interruptions.
        _end(ctx, trial, "KILLED", f"interrupted ({type(err).__name__}); continue with --resume")
        raise KeyboardInterrupt from err
    except BaseException as err:
        _end(ctx, trial, "FAILED", f"{type(err).__name__}: {err}")
        raise
    summary.update({
        "run_id": run_id,
        "experiment_id": ctx.experiment_id,
        "experiment_name": opened.experiment_name,
        "tracking_uri": ctx.tracking_uri,
        "ray_run": ctx.run_dir,
        "seconds": round(time.perf_counter() - start, 1),
    })
    return summary


def _end(ctx: RunContext, trial: TrialRun | None, status: str, message: str) -> None:
    """End the run after a failure, unless a Tune trial's: the search's callback ends those (it alone can
    tell a trial that failed from one the scheduler stopped)."""
    from orchestrator.tracking.runs import end_run_quietly

    if trial is None:
        end_run_quietly(ctx.client, ctx.run_id, status, message)
