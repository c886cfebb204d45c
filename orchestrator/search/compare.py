"""`cvlab compare <experiment-name>`: rank the MLflow runs of an experiment and plot them.

Reads the runs of one MLflow experiment (by default the training runs: the trials of its searches and
plain `cvlab run` runs; a search's parent run is summarised by its trials), prints a table best first
(searched params, metric, params count, GFLOPs, images/s, status) and writes the table (CSV, Markdown)
and the plots (metric against each searched parameter, parallel coordinates) to `--out`.
"""
from __future__ import annotations

import difflib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from orchestrator.errors import CvlabError
from orchestrator.names import (
    END_REASON_TAG,
    INFEASIBLE_TAG,
    KIND_TAG,
    OBJECTIVES_PARAM,
    PARENT_RUN_TAG,
    REUSED_RUN_TAG,
    SEARCH_PATHS_TAG,
)
from orchestrator.search import pareto, report
from orchestrator.tracking.runs import best_metric_key
from orchestrator.tracking.server import resolve_tracking_uri, ui_link

# Where model size / speed may be recorded (metric or param keys), first match wins.
PARAMS_KEYS = ("model.params", "model/params_m", "params_m", "model.params_m", "model/params", "params")
GFLOPS_KEYS = ("model/gflops", "gflops", "model.gflops", "model/flops_g")
SPEED_KEYS = ("images_per_s", "train/images_per_s")
MAX_VARYING_PARAMS = 8


def _lookup(run, keys) -> float | None:
    for key in keys:
        for source in (run.data.metrics, run.data.params):
            if key in source:
                try:
                    value = float(source[key])
                except (TypeError, ValueError):
                    continue
                if key in ("model.params", "model/params", "params") and value > 1e4:  # a raw count: show millions
                    value /= 1e6
                return value
    return None


def _parse_param(value: str) -> Any:
    """MLflow stores params as strings; turn numbers back into numbers for sorting and plotting."""
    for cast in (int, float):
        try:
            return cast(value)
        except (TypeError, ValueError):
            pass
    return value


def _search_paths(run) -> list[str]:
    raw = run.data.tags.get(SEARCH_PATHS_TAG)
    if not raw:
        return []
    try:
        paths = json.loads(raw)
    except json.JSONDecodeError:
        return []
    return [str(p) for p in paths] if isinstance(paths, list) else []


def run_to_row(run, param_keys, metric: str, objectives: Sequence[str] = ()) -> dict:
    """A report row. The metric (and each of `objectives`) is the run's best value (`best/<metric>`, logged when
    a run ends) where it has one, else its last, so that runs stopped early compare fairly with finished ones;
    `epoch` is how far the run got and `best_epoch` where its best value was reached. `infeasible` is the cost
    bound a trial broke (it never trained), `reused` the run whose measurement a trial copied; else empty."""
    data = run.data.metrics
    metrics: dict[str, Any] = {}
    if best_metric_key(metric) in data and "best/epoch" in data:
        metrics["best_epoch"] = data["best/epoch"]
    for name in (metric, *objectives):
        if best_metric_key(name) in data:
            metrics[name] = data[best_metric_key(name)]
        elif name in data:
            metrics[name] = data[name]
    if "epoch" in data:
        metrics["epoch"] = data["epoch"]
    for name, keys in (("params_m", PARAMS_KEYS), ("gflops", GFLOPS_KEYS), ("images_per_s", SPEED_KEYS)):
        value = _lookup(run, keys)
        if value is not None:
            metrics[name] = value
    status = run.info.status
    reason = run.data.tags.get(END_REASON_TAG)
    return {
        "run": run.info.run_name or run.info.run_id[:8],
        "run_id": run.info.run_id,
        "complete": status == "FINISHED",
        "status": f"{status} ({reason})" if reason and reason != "completed" else status,
        "params": {k: _parse_param(run.data.params[k]) for k in param_keys if k in run.data.params},
        "metrics": metrics,
        "infeasible": run.data.tags.get(INFEASIBLE_TAG, ""),
        "reused": run.data.tags.get(REUSED_RUN_TAG, ""),
    }


def varying_params(runs) -> list[str]:
    """Params whose value differs between runs (what a plain comparison should show)."""
    keys: dict[str, set] = {}
    for run in runs:
        for k, v in run.data.params.items():
            keys.setdefault(k, set()).add(v)
    varying = [k for k, vals in keys.items()
               if len(vals) > 1 or sum(k in r.data.params for r in runs) < len(runs)]
    # identifiers and paths vary by construction and say nothing about the model
    skip = ("run.", "tracking.", "experiment.", "data.root")
    varying = [k for k in varying if not k.startswith(skip)]
    return sorted(varying)[:MAX_VARYING_PARAMS]


def collect(client, experiment_name: str, metric: str, parent_run_id: str | None = None,
            include_parents: bool = False, objectives: Sequence[str] = ()):
    """Runs of `experiment_name` as report rows (with `metric` and `objectives`), plus the param columns."""
    exp = client.get_experiment_by_name(experiment_name)
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        near = difflib.get_close_matches(experiment_name, names, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise CvlabError(
            f"no MLflow experiment named {experiment_name!r}{hint} at {client.tracking_uri}; "
            f"experiments there: {', '.join(sorted(names)) or 'none'}"
        )
    filt = f"tags.`{PARENT_RUN_TAG}` = '{parent_run_id}'" if parent_run_id else ""
    runs = []
    token = None
    while True:
        page = client.search_runs([exp.experiment_id], filter_string=filt, max_results=1000,
                                  page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    if not include_parents:
        runs = [r for r in runs if r.data.tags.get(KIND_TAG) != "search"]
    if not runs:
        what = f"child runs of {parent_run_id}" if parent_run_id else "training runs"
        raise CvlabError(f"experiment {experiment_name!r} has no {what} to compare")
    searched: list[str] = []
    for run in runs:
        for p in _search_paths(run):
            if p not in searched:
                searched.append(p)
    param_keys = searched or varying_params(runs)
    return [run_to_row(r, param_keys, metric, objectives) for r in runs], param_keys


def default_mode(metric: str) -> str:
    return "min" if "loss" in metric or metric.endswith("_time_s") else "max"


def compare(experiment_name: str, metric: str = "val/top1", mode: str | None = None,
            tracking_uri: str | None = None, out_dir: str | Path | None = None,
            parent_run_id: str | None = None) -> dict:
    """Rank an experiment's runs; write table + plots to `out_dir`. Returns rows, columns, paths and the
    experiment's (or the parent run's) MLflow UI link (None without a tracking server)."""
    uri = tracking_uri or _default_tracking_uri()
    mode = mode or default_mode(metric)
    client = MlflowClient(tracking_uri=uri)
    try:
        rows, param_keys = collect(client, experiment_name, metric, parent_run_id)
        link = ui_link(uri, client.get_experiment_by_name(experiment_name).experiment_id, parent_run_id)
    except CvlabError:
        raise
    except Exception as err:  # unreachable server, bad database path, ...
        raise CvlabError(f"cannot read MLflow at {uri}: {err}") from err
    ranked = report.rank_rows(rows, metric, mode)
    if not any(metric in r["metrics"] for r in ranked):
        raise CvlabError(f"no run of {experiment_name!r} has metric {metric!r}")
    columns = report.table_columns(ranked, param_keys, metric)
    out = Path(out_dir) if out_dir else Path("compare") / _safe(experiment_name)
    written = report.write_report(ranked, param_keys, metric, out, mode=mode, prefix="compare")
    return {"rows": ranked, "columns": columns, "param_keys": param_keys, "files": written,
            "tracking_uri": uri, "mode": mode, "ui_link": link}


def parse_objectives(items: Sequence[str]) -> list[pareto.Objective]:
    """`--objective val/top1:max` entries (the mode defaults to `default_mode`)."""
    out = []
    for item in items:
        metric, _, mode = item.rpartition(":") if item.endswith((":max", ":min")) else (item, "", "")
        out.append(pareto.Objective(metric, mode or default_mode(metric)))
    return out


def _newest_search_with_objectives(client, experiment_id: str):
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{KIND_TAG}` = 'search'",
                              order_by=["attributes.start_time DESC"], max_results=100)
    return next((r for r in runs if OBJECTIVES_PARAM in r.data.params), None)


def pareto_front(experiment_name: str, tracking_uri: str | None = None, parent_run_id: str | None = None,
                 objectives: Sequence[pareto.Objective] = (), out_dir: str | Path | None = None) -> dict:
    """The Pareto front of one search of an experiment (`parent_run_id`, else its newest search), over the
    search's own objectives unless `objectives` are given; writes pareto.csv/.md/.png to `out_dir`. Returns the
    rows (front first, with `front`), the objectives, the param keys, the files and the parent run id."""
    uri = tracking_uri or _default_tracking_uri()
    client = MlflowClient(tracking_uri=uri)
    try:
        exp = client.get_experiment_by_name(experiment_name)
        if exp is not None and parent_run_id is None:
            parent = _newest_search_with_objectives(client, exp.experiment_id)
            parent_run_id = parent.info.run_id if parent is not None else None
        if not objectives:
            if parent_run_id is None:
                raise CvlabError(f"experiment {experiment_name!r} has no search with recorded objectives; name them "
                                 "with --objective METRIC:MODE (and --parent RUN_ID)")
            recorded = client.get_run(parent_run_id).data.params.get(OBJECTIVES_PARAM)
            if not recorded:
                raise CvlabError(f"search {parent_run_id} recorded no objectives; name them with --objective")
            objectives = [pareto.Objective(m, mode) for m, mode in json.loads(recorded)]
        rows, param_keys = collect(client, experiment_name, objectives[0].metric, parent_run_id,
                                   objectives=[o.metric for o in objectives])
    except CvlabError:
        raise
    except Exception as err:  # unreachable server, bad database path, ...
        raise CvlabError(f"cannot read MLflow at {uri}: {err}") from err
    out = Path(out_dir) if out_dir else Path("compare") / _safe(experiment_name)
    files = pareto.write_pareto(rows, param_keys, objectives, out)
    return {"rows": pareto.mark_front(rows, objectives), "objectives": list(objectives), "param_keys": param_keys,
            "files": files, "parent_run_id": parent_run_id, "tracking_uri": uri}


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "experiment"


def _default_tracking_uri() -> str:
    return resolve_tracking_uri(None)
