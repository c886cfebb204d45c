"""One Tune trial: the experiment with the trial's sampled values, run through the run lifecycle as a
nested MLflow run of the search (tag `cvlab.trial_id`), reporting to Tune with `TuneReportCallback`.

Before it trains, a trial whose search weighs or bounds cost measures it (`orchestrator.runs.cost`): a
configuration that breaks a bound of `search.constraints` is never trained (its nested run holds the measured
cost and the broken bound, tag `cvlab.infeasible`; Tune and the searcher get one result saying so), and every
report of a trial that trains carries its cost, so the searcher sees cost objectives beside accuracy. A
configuration already measured (by the warm start's earlier search, or by another trial of this one: a sampler
may draw a configuration again) is not trained again: its results are reused (tag `cvlab.reused_run`)."""
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
    EXTENDED_FROM_TAG,
    INFEASIBLE_TAG,
    KIND_TAG,
    PARENT_RUN_TAG,
    REUSED_RUN_TAG,
    SEARCH_PATHS_TAG,
    SEARCHED_PARAM_PREFIX,
    TRIAL_ID_TAG,
    TRIAL_NAME_TAG,
)
from orchestrator.runs.cost import measure_cost
from orchestrator.runs.lifecycle import TrialRun, run_job
from orchestrator.search.constraints import INFEASIBLE_KEY, violations
from orchestrator.tracking.runs import create_run, end_run, log_metrics, log_params, logged_steps, make_client
from workloads.mid_epoch import MID_EPOCH_KEY

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
    constraints: dict = field(default_factory=dict)  # cost metric -> {min, max}: `search.constraints`
    tune_metrics: list[str] = field(default_factory=list)  # what every Tune result must carry (the objectives)
    # The warm start's earlier trials by configuration (`configuration_key`): reused, not trained again.
    earlier: dict = field(default_factory=dict)


class CostReportCallback(TuneReportCallback):
    """Tune's report callback, adding the trial's measured cost to every result (for cost objectives)."""

    def __init__(self, cost: dict[str, float] | None):
        super().__init__()
        self._cost = dict(cost or {})

    def after_report(self, run_context, metrics, checkpoint):
        if MID_EPOCH_KEY in metrics[0]:  # a checkpoint inside an epoch: no results for the searcher
            return
        super().after_report(run_context, [{**self._cost, **metrics[0]}, *metrics[1:]], checkpoint)


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


def values_label(searched: dict[str, Any]) -> str:
    """Searched values for a run name: `reduction_ratio=4, lr=0.0031`."""
    return ", ".join(f"{path.split('.')[-1]}={short_value(value)}" for path, value in searched.items())


def configuration_key(searched: dict[str, Any]) -> str:
    """A configuration as text (its searched values, short, in path order): what the warm start matches."""
    return json.dumps({path: short_value(value) for path, value in sorted(searched.items())})


def trial_main(config: dict, ctx: TrialContext) -> None:
    """The trainable of `cvlab tune`: one full (data-parallel) Ray Train run of the experiment's workload."""
    tctx = ray.tune.get_context()
    trial_id, trial_name = tctx.get_trial_id(), tctx.get_trial_name()
    overrides = {p: to_plain(config[p]) for p in ctx.search_paths}
    spec = apply_overrides(spec_from_dict(ctx.spec, source="<search base spec>"), overrides)
    job = job_for(spec, data=ctx.data)

    client = make_client(ctx.tracking_uri)
    existing = find_trial_run(client, ctx.experiment_id, ctx.parent_run_id, trial_id)
    trial = TrialRun(
        parent_run_id=ctx.parent_run_id,
        run_name=f"{trial_name} ({values_label(overrides)})"[:240],
        folder=trial_id,
        trial_storage=ctx.train_storage,
        tags={**ctx.base_tags, KIND_TAG: "trial", TRIAL_ID_TAG: trial_id, TRIAL_NAME_TAG: trial_name,
              SEARCH_PATHS_TAG: json.dumps(ctx.search_paths)},
        # A restarted trial (resumed search, Tune retry) continues its run from its last checkpoint.
        run_id=existing.info.run_id if existing is not None else None,
        # The same keys in every trial, short values: what MLflow's chart and compare views line up.
        searched={f"{SEARCHED_PARAM_PREFIX}{path}": short_value(value) for path, value in overrides.items()},
    )
    if existing is not None:
        if _already_done(existing, job, ctx, client, trial_name):
            return
    else:
        earlier = ctx.earlier.get(configuration_key(overrides)) or measured_sibling(client, ctx, trial.searched)
        if earlier is not None:
            _reuse_earlier(earlier, job, ctx, client, trial)
            return
    if spec.run.measure_cost:
        trial.cost = measure_cost(job)  # before any training: a configuration that breaks a bound never trains
        broken = "; ".join(violations(trial.cost, ctx.constraints))
        if broken:
            log.info("[%s] infeasible, not trained: %s", trial_name, broken)
            _untrained_run(client, ctx, trial, job.spec, trial.cost, {INFEASIBLE_TAG: broken},
                           reason=f"infeasible, not trained: {broken}")
            _report_infeasible(trial.cost, job, ctx)
            return
    trial.callbacks = [CostReportCallback(trial.cost)]
    try:
        run_job(job, trial=trial)
    except Exception as err:
        # The run is ended by the search's callback (on_trial_error), not here: when Tune stops a trial
        # (ASHA), its Train run also ends in an exception while this process is torn down, and writing
        # FAILED here would race the callback's KILLED.
        raise RuntimeError(str(err) if isinstance(err, CvlabError) else f"{type(err).__name__}: {err}") from err


def measured_completely(run, budget: tuple[str, Any] | None = None) -> bool:
    """Whether `run` measured its configuration completely: trained to the end (of the same `budget`, a spec path
    and its value, when given), ruled out by its cost, or itself reused from such a run."""
    tags = run.data.tags
    if run.info.status != "FINISHED" or EXTENDED_FROM_TAG in tags:
        return False
    if INFEASIBLE_TAG in tags:
        return True
    same_budget = budget is None or run.data.params.get(budget[0]) == str(budget[1])
    return same_budget and (tags.get(END_REASON_TAG) == "completed" or REUSED_RUN_TAG in tags)


def reuse_record(run) -> dict[str, Any]:
    """What a trial that reuses `run`'s measurement needs of it."""
    return {"run_id": run.data.tags.get(REUSED_RUN_TAG, run.info.run_id),  # the run that measured it
            "metrics": dict(run.data.metrics), "infeasible": run.data.tags.get(INFEASIBLE_TAG, "")}


def measured_sibling(client, ctx: TrialContext, searched: dict[str, str]) -> dict[str, Any] | None:
    """A trial of this search that already measured these searched values completely (a sampler may draw a
    configuration again): its record, reused instead of training again; else None."""
    values = "".join(f" and params.`{key}` = '{value}'" for key, value in searched.items())
    runs = client.search_runs([ctx.experiment_id], max_results=100,
                              filter_string=f"tags.`{PARENT_RUN_TAG}` = '{ctx.parent_run_id}'{values}")
    found = next((r for r in runs if measured_completely(r)), None)
    return reuse_record(found) if found is not None else None


def _already_done(existing, job, ctx: TrialContext, client, trial_name: str) -> bool:
    """A restarted trial (resumed search, Tune retry) whose MLflow run exists: True when there is nothing left to
    train (Tune gets its results again), else its run is readied to continue."""
    if INFEASIBLE_TAG in existing.data.tags:
        _report_infeasible(existing.data.metrics, job, ctx)
        return True
    # Rank 0 logs a step only after the checkpoint covering it, so every step in MLflow means the run
    # trained to the end (maybe killed before it was marked FINISHED).
    done = max(logged_steps(client, existing.info.run_id, job.best_metric), default=0)
    finished = existing.info.status == "FINISHED" and (
        existing.data.tags.get(END_REASON_TAG) == "completed" or REUSED_RUN_TAG in existing.data.tags)
    if finished or done >= job.planned_steps():
        # Tune's saved state (written every ~10 s) did not record the end: hand Tune the final
        # metrics instead of training again.
        final = {**existing.data.metrics, job.step_metric: max(done, job.planned_steps() if finished else 0)}
        log.info("[%s] already trained in MLflow run %s; not training again", trial_name, existing.info.run_id)
        ray.tune.report(final)
        if not finished:
            end_run(client, existing.info.run_id, "FINISHED", reason="completed")
        return True
    if END_REASON_TAG in existing.data.tags:
        client.delete_tag(existing.info.run_id, END_REASON_TAG)
    log.info("[%s] continuing MLflow run %s", trial_name, existing.info.run_id)
    return False


def _untrained_run(client, ctx: TrialContext, trial: TrialRun, spec, metrics: dict[str, float], tags: dict,
                   reason: str, step: int = 0) -> str:
    """The nested run of a trial that does not train (infeasible, or reused from an earlier search): its params,
    the given metrics at `step`, ended FINISHED with `reason`."""
    run_id = create_run(client, ctx.experiment_id, trial.run_name, tags={**trial.tags, **tags},
                        parent_run_id=ctx.parent_run_id)
    log_params(client, run_id, trial.params(spec))
    log_metrics(client, run_id, metrics, step=step)
    end_run(client, run_id, "FINISHED", reason=reason)
    return run_id


def _report_infeasible(costs: dict[str, float], job, ctx: TrialContext) -> None:
    """The one Tune result of a trial that never trained: its cost, the mark, and NaN for what it never measured
    (Tune wants every objective in every result)."""
    ray.tune.report({**{m: float("nan") for m in ctx.tune_metrics},
                     **{k: v for k, v in costs.items() if k.startswith("cost/")},
                     INFEASIBLE_KEY: 1.0, job.step_metric: 0})


def _reuse_earlier(earlier: dict, job, ctx: TrialContext, client, trial: TrialRun) -> None:
    """A configuration already measured (by the warm start's search, or an earlier trial of this one): a nested
    run that copies its results (tag `cvlab.reused_run`), and those results to Tune; nothing is trained or
    measured again."""
    metrics = dict(earlier["metrics"])
    tags = {REUSED_RUN_TAG: earlier["run_id"], **({INFEASIBLE_TAG: earlier["infeasible"]} if earlier["infeasible"]
                                                    else {})}
    step = int(metrics.get(job.step_metric, 0))
    _untrained_run(client, ctx, trial, job.spec, metrics, tags, step=step,
                   reason=f"reused: measured by run {earlier['run_id']}")
    log.info("[%s] already measured by run %s; not trained again", trial.run_name, earlier["run_id"])
    if earlier["infeasible"]:
        _report_infeasible(metrics, job, ctx)
    else:
        ray.tune.report({**{m: float("nan") for m in ctx.tune_metrics}, **metrics, job.step_metric: step})
