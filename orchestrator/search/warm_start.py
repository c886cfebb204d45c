"""`search.warm_start`: the results of an earlier search, handed to a new one.

The source is a search's parent run id, or an MLflow experiment name (every search in it). Its trials whose
searched values lie in the new space become earlier trials: the searcher is told them (Optuna adds them to its
study, `orchestrator.search.searchers`), and a trial of the new search whose configuration one of them measured
completely (trained to the end, reused, or infeasible) reuses its results instead of training
(`orchestrator.search.trial`). Trials stopped early or failed inform the searcher only.
"""
from __future__ import annotations

import logging
import math
import re
from typing import Any

from orchestrator.errors import CvlabError
from orchestrator.names import EXTENDED_FROM_TAG, KIND_TAG, PARENT_RUN_TAG
from orchestrator.search.compare import run_to_row
from orchestrator.search.space import Dimension, SearchSpace
from orchestrator.search.trial import configuration_key, measured_completely, reuse_record, short_value

log = logging.getLogger(__name__)
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def _search_runs(client, experiment_ids: list[str], filter_string: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def source_searches(client, source: str) -> list:
    """The parent runs `source` names: one search (its run id) or every search of an experiment (its name)."""
    if _RUN_ID.match(source):
        try:
            run = client.get_run(source)
        except Exception as err:  # MLflow raises its own kinds for an unknown run
            raise CvlabError(f"search.warm_start: no MLflow run {source} at {client.tracking_uri}: {err}") from err
        if run.data.tags.get(KIND_TAG) != "search":
            raise CvlabError(f"search.warm_start: run {source} is not a search's parent run (tag {KIND_TAG}="
                             f"{run.data.tags.get(KIND_TAG)!r})")
        return [run]
    experiment = client.get_experiment_by_name(source)
    if experiment is None:
        raise CvlabError(f"search.warm_start: {source!r} is neither a search's parent run id nor an MLflow "
                         f"experiment at {client.tracking_uri}")
    parents = _search_runs(client, [experiment.experiment_id], f"tags.`{KIND_TAG}` = 'search'")
    if not parents:
        raise CvlabError(f"search.warm_start: experiment {source!r} holds no search")
    return parents


def value_in_space(dim: Dimension, raw: str) -> Any:
    """The searched value `raw` (an MLflow param) as `dim` holds it, or None when `dim` cannot produce it."""
    if dim.kind in ("grid", "choice"):
        for value in dim.values:
            if raw in (str(value), short_value(value)):
                return value
        return None
    try:
        number = int(raw) if dim.kind == "randint" else float(raw)
    except ValueError:
        return None
    return number if math.isfinite(number) and dim.low <= number <= dim.high else None


def earlier_trials(client, source: str, space: SearchSpace, objectives: list,
                   budget: tuple[str, Any] | None = None) -> list[dict]:
    """The earlier search's trials that lie in `space`, each {run_id, params, key, values, costs, metrics,
    infeasible, complete}; `values` are the objectives' (None when one is missing or the trial was infeasible).
    `complete` (reusable) needs the same `budget` (spec path, value): a trial trained for fewer epochs informs
    the searcher but is trained again. Runs of `--extend` are left out (another budget)."""
    trials, seen = [], set()
    for parent in source_searches(client, source):
        kids = _search_runs(client, [parent.info.experiment_id], f"tags.`{PARENT_RUN_TAG}` = '{parent.info.run_id}'")
        for run in kids:
            if EXTENDED_FROM_TAG in run.data.tags:
                continue
            params = {d.path: value_in_space(d, run.data.params.get(d.path, "")) for d in space.dimensions}
            if any(v is None for v in params.values()):
                continue  # searched other paths, or values the new space cannot produce
            row = run_to_row(run, [], objectives[0].metric, [o.metric for o in objectives])
            values = [row["metrics"].get(o.metric) for o in objectives]
            key = configuration_key(params)
            complete = measured_completely(run, budget)
            if (key, complete) in seen:
                continue
            seen.add((key, complete))
            trials.append({
                **reuse_record(run), "params": params, "key": key, "complete": complete,
                "values": None if row["infeasible"] or any(v is None for v in values) else [float(v) for v in values],
                "costs": {k: v for k, v in run.data.metrics.items() if k.startswith("cost/")},
            })
    log.info("warm start from %s: %d earlier trial(s) in this space, %d measured completely", source, len(trials),
             sum(t["complete"] for t in trials))
    return trials


def reusable(trials: list[dict]) -> dict[str, dict]:
    """The completely measured earlier trials by configuration (what a new trial reuses instead of training)."""
    out: dict[str, dict] = {}
    for t in trials:
        if t["complete"] and t["key"] not in out:
            out[t["key"]] = {k: t[k] for k in ("run_id", "metrics", "infeasible")}
    return out
