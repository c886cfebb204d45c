"""One Tune trial: the experiment with the trial's sampled values, run through the run lifecycle as a
nested MLflow run of the search (tag `cvlab.trial_id`), reporting to Tune with `TuneReportCallback`."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback

from orchestrator.config.loader import apply_overrides, spec_from_dict, to_plain
from orchestrator.errors import CvlabError
from orchestrator.jobs import job_for
from orchestrator.names import (
    END_REASON_TAG,
    KIND_TAG,
    PARENT_RUN_TAG,
    SEARCH_PATHS_TAG,
    SEARCHED_PARAM_PREFIX,
    TRIAL_ID_TAG,
    TRIAL_NAME_TAG,
)
from orchestrator.runs.lifecycle import TrialRun, run_job
from orchestrator.tracking.runs import end_run, logged_steps, make_client

log = logging.getLogger(__name__)


@dataclass
class TrialContext:
    """What every trial needs from the search's driver process; plain data, pickled into Tune's state."""

    spec: dict  # the base experiment spec (absolute paths), as spec_to_dict gives it
    search_paths: list[str]
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    train_storage: str  # where each trial's Ray Train run folder goes (named by trial id)
    data: Any = None  # the driver's prepared data, shared by all trials; None to prepare per trial
    base_tags: dict = field(default_factory=dict)


def find_trial_run(client, experiment_id: str, parent_run_id: str, trial_id: str):
    """The nested MLflow run of `trial_id` under `parent_run_id`, or None."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PARENT_RUN_TAG}` = '{parent_run_id}' and tags.`{TRIAL_ID_TAG}` = '{trial_id}'",
        max_results=5,
    )
    return runs[0] if runs else None


def short_value(value: Any) -> str:
    """A searched value as it appears in run names and params: `4`, `0.0031`, `rednet26`."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def trial_main(config: dict, ctx: TrialContext) -> None:
    """The trainable of `cvlab tune`: one full (data-parallel) Ray Train run of the experiment's workload."""
    tctx = ray.tune.get_context()
    trial_id, trial_name = tctx.get_trial_id(), tctx.get_trial_name()
    overrides = {p: to_plain(config[p]) for p in ctx.search_paths}
    spec = apply_overrides(spec_from_dict(ctx.spec, source="<search base spec>"), overrides)
    job = job_for(spec, data=ctx.data)

    client = make_client(ctx.tracking_uri)
    existing = find_trial_run(client, ctx.experiment_id, ctx.parent_run_id, trial_id)
    if existing is not None:
        # Rank 0 logs a step only after the checkpoint covering it, so every step in MLflow means the run
        # trained to the end (maybe killed before it was marked FINISHED).
        done = max(logged_steps(client, existing.info.run_id, job.best_metric), default=0)
        finished = existing.info.status == "FINISHED" and existing.data.tags.get(END_REASON_TAG) == "completed"
        if finished or done >= job.planned_steps():
            # Tune's saved state (written every ~10 s) did not record the end: hand Tune the final
            # metrics instead of training again.
            final = {**existing.data.metrics, job.step_metric: max(done, job.planned_steps() if finished else 0)}
            log.info("[%s] already trained in MLflow run %s; not training again", trial_name, existing.info.run_id)
            ray.tune.report(final)
            if not finished:
                end_run(client, existing.info.run_id, "FINISHED", reason="completed")
            return
        if END_REASON_TAG in existing.data.tags:
            client.delete_tag(existing.info.run_id, END_REASON_TAG)
        log.info("[%s] continuing MLflow run %s", trial_name, existing.info.run_id)

    label = ", ".join(f"{k.split('.')[-1]}={short_value(v)}" for k, v in overrides.items())
    trial = TrialRun(
        parent_run_id=ctx.parent_run_id,
        run_name=f"{trial_name} ({label})"[:240],
        folder=trial_id,
        trial_storage=ctx.train_storage,
        tags={**ctx.base_tags, KIND_TAG: "trial", TRIAL_ID_TAG: trial_id, TRIAL_NAME_TAG: trial_name,
              SEARCH_PATHS_TAG: json.dumps(ctx.search_paths)},
        # A restarted trial (resumed search, Tune retry) continues its run from its last checkpoint.
        run_id=existing.info.run_id if existing is not None else None,
        callbacks=[TuneReportCallback()],
        # The same keys in every trial, short values: what MLflow's chart and compare views line up.
        searched={f"{SEARCHED_PARAM_PREFIX}{path}": short_value(value) for path, value in overrides.items()},
    )
    try:
        run_job(job, trial=trial)
    except Exception as err:
        # The run is ended by the search's callback (on_trial_error), not here: when Tune stops a trial
        # (ASHA), its Train run also ends in an exception while this process is torn down, and writing
        # FAILED here would race the callback's KILLED.
        raise RuntimeError(str(err) if isinstance(err, CvlabError) else f"{type(err).__name__}: {err}") from err
