"""`cvlab tune FILE --extend --epochs E (--pareto | --top K)`: train the promising trials of a search further.

The newest search of the experiment (as `--resume` finds it) names its trials; `--pareto` takes those on its
front (tag `cvlab.pareto: true`), `--top K` the K best by the search's metric. Each chosen trial continues from
the newest checkpoint in its Ray Train folder to epoch E, as a new nested run of the same search (tag
`cvlab.extended_from`: the trial's run; its measured cost is carried over, not measured again). The epoch count
continues where the trial stopped, so only the missing epochs are trained. Trials run one after another on the
search's Ray (started here, like `cvlab run`'s). Local run storage only (the checkpoints are read in place).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.config.loader import apply_overrides
from orchestrator.errors import CvlabError
from orchestrator.jobs import job_for
from orchestrator.names import (
    EXTENDED_FROM_TAG,
    INFEASIBLE_TAG,
    KIND_TAG,
    PARENT_RUN_TAG,
    PARETO_TAG,
    REUSED_RUN_TAG,
    SEARCH_PATHS_TAG,
    SEARCHED_PARAM_PREFIX,
    TRIAL_ID_TAG,
    TUNE_PATH_TAG,
)
from orchestrator.runs.lifecycle import TrialRun, open_experiment, preflight, run_job
from orchestrator.runs.ray_setup import ray_session
from orchestrator.runs.records import list_local_checkpoints
from orchestrator.runs.storage import is_remote_storage
from orchestrator.search.space import check_search
from orchestrator.search.trial import short_value, values_label
from orchestrator.search.tune import absolute_spec, find_newest_search, search_base_name
from orchestrator.search.warm_start import value_in_space
from orchestrator.tracking.runs import best_metric_key, end_run, make_client
from workloads.logs import ensure_configured

log = logging.getLogger(__name__)


@dataclass
class ExtensionRun(TrialRun):
    """A trial continued by `--extend`: nested under the search's parent run like a trial, but on Ray started
    here and outside Tune, so a failure ends its run FAILED here."""

    def end_after_failure(self, ctx, status: str, message: str) -> None:
        end_run(ctx.client, ctx.run_id, status, error=message, quiet=True)


def _candidates(client, parent) -> list:
    """The trials of search `parent` that trained (not infeasible, not reused, not themselves extensions)."""
    kids = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`{PARENT_RUN_TAG}` = '{parent.info.run_id}'", max_results=5000)
    return [r for r in kids if TRIAL_ID_TAG in r.data.tags
            and not {INFEASIBLE_TAG, REUSED_RUN_TAG, EXTENDED_FROM_TAG} & set(r.data.tags)]


def choose_trials(runs: list, spec, *, pareto: bool, top: int | None) -> list:
    """The front's trials (`pareto`), or the `top` best by the search's metric, best first."""
    s = spec.search
    if pareto:
        chosen = [r for r in runs if r.data.tags.get(PARETO_TAG) == "true"]
        if not chosen:
            raise CvlabError("the search has no Pareto front to extend (it had one objective and no constraints, "
                             "or it has not finished): use --top K")
    else:
        chosen = runs

    def score(run) -> float:
        m = run.data.metrics
        value = m.get(best_metric_key(s.metric), m.get(s.metric))
        if value is None:
            return float("inf")
        return -value if s.mode == "max" else value

    chosen = sorted(chosen, key=score)
    return chosen if pareto else chosen[:top]


def _plan(run, spec, space, tune_path: str, epochs: int) -> dict[str, Any]:
    """What extending `run` takes: its searched values, newest checkpoint and trained epochs; CvlabError when
    it cannot be extended to `epochs`."""
    trial_id = run.data.tags[TRIAL_ID_TAG]
    searched = {d.path: value_in_space(d, run.data.params.get(d.path, "")) for d in space.dimensions}
    if any(v is None for v in searched.values()):
        raise CvlabError(f"trial {trial_id}: its searched values {searched} are not in this file's space")
    folder = Path(tune_path) / "train" / trial_id
    checkpoints = list_local_checkpoints(str(folder))
    if not checkpoints:
        raise CvlabError(f"trial {trial_id} has no checkpoint in {folder} to continue from")
    trained = int(run.data.metrics.get("epoch", 0))
    if epochs <= trained:
        raise CvlabError(f"trial {trial_id} already trained {trained} epoch(s): --epochs must be more")
    return {"run": run, "trial_id": trial_id, "searched": searched, "checkpoint": checkpoints[0], "trained": trained}


def extend_search(spec, epochs: int, *, pareto: bool = False, top: int | None = None,
                  num_cpus: int | None = None) -> dict[str, Any]:
    """Continue the chosen trials of the newest search of `spec` to `epochs` epochs. Returns the parent run id
    and one summary per extended trial (the lifecycle's, plus `extended_from` and `from_epoch`)."""
    ensure_configured()
    space = check_search(spec)
    spec = absolute_spec(spec)
    tracking_uri = preflight(spec)
    client = make_client(tracking_uri)
    experiment_name, experiment_id = open_experiment(client, spec, tracking_uri)
    parent = find_newest_search(client, experiment_id, search_base_name(spec))
    if parent is None:
        raise CvlabError(f"nothing to extend: experiment {experiment_name!r} has no search named "
                         f"{search_base_name(spec)!r} at {tracking_uri}")
    tune_path = parent.data.tags.get(TUNE_PATH_TAG, "")
    if is_remote_storage(tune_path):
        raise CvlabError(f"--extend reads checkpoints in local run storage; the search's are at {tune_path}")
    plans = [_plan(r, spec, space, tune_path, epochs)
             for r in choose_trials(_candidates(client, parent), spec, pareto=pareto, top=top)]
    if not plans:
        raise CvlabError(f"search {parent.info.run_id} has no trained trial to extend")
    summaries = []
    with ray_session(num_cpus):
        for plan in plans:
            summaries.append(_extend_one(plan, spec, space, parent, tune_path, epochs))
    return {"parent_run_id": parent.info.run_id, "tracking_uri": tracking_uri, "extended": summaries}


def _extend_one(plan: dict, spec, space, parent, tune_path: str, epochs: int) -> dict[str, Any]:
    run, trial_id = plan["run"], plan["trial_id"]
    trial_spec = apply_overrides(spec, {**plan["searched"], "optim.epochs": epochs})
    job = job_for(trial_spec)
    try:
        job.start_from_checkpoint(plan["checkpoint"])
    except ValueError as err:
        raise CvlabError(str(err)) from err
    log.info("extending %s from epoch %d to %d (checkpoint %s)", run.info.run_name, plan["trained"], epochs,
             plan["checkpoint"])
    extension = ExtensionRun(
        parent_run_id=parent.info.run_id,
        run_name=f"{run.info.run_name.split(' (')[0]} to epoch {epochs} ({values_label(plan['searched'])})"[:240],
        folder=f"{trial_id}-to-epoch-{epochs}",
        trial_storage=f"{tune_path}/train",
        tags={KIND_TAG: "trial", EXTENDED_FROM_TAG: run.info.run_id, SEARCH_PATHS_TAG: json.dumps(space.paths)},
        searched={f"{SEARCHED_PARAM_PREFIX}{p}": short_value(v) for p, v in plan["searched"].items()},
        cost={k: v for k, v in run.data.metrics.items() if k.startswith("cost/")} or None,
    )
    summary = run_job(job, trial=extension)
    return {**summary, "extended_from": run.info.run_id, "from_epoch": plan["trained"]}
