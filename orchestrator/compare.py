"""`cvlab compare <experiment-name>`: rank the MLflow runs of an experiment and plot them.

Reads the runs of one MLflow experiment (by default the training runs: the trials of its searches and
plain `cvlab run` runs; a search's parent run is summarised by its trials), prints a table best first
(searched params, metric, params count, GFLOPs, images/s, status) and writes the table (CSV, Markdown)
and the plots (metric against each searched parameter, parallel coordinates) to `--out`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from orchestrator.errors import CvlabError

# Tags written by `cvlab tune` (orchestrator.tune) and read here.
TAG_KIND = "cvlab.kind"  # "search" on a search's parent run, "trial" on its nested runs
TAG_SEARCH_PATHS = "cvlab.search_paths"  # JSON list of searched spec paths (parent and trial runs)
TAG_END_REASON = "cvlab.end_reason"
TAG_TRIAL_ID = "cvlab.trial_id"
TAG_PARENT = "mlflow.parentRunId"

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
    raw = run.data.tags.get(TAG_SEARCH_PATHS)
    if not raw:
        return []
    try:
        paths = json.loads(raw)
    except json.JSONDecodeError:
        return []
    return [str(p) for p in paths] if isinstance(paths, list) else []


def run_to_row(run, param_keys, metric: str) -> dict:
    metrics: dict[str, Any] = {}
    if metric in run.data.metrics:
        metrics[metric] = run.data.metrics[metric]
    if "epoch" in run.data.metrics:
        metrics["epoch"] = run.data.metrics["epoch"]
    for name, keys in (("params_m", PARAMS_KEYS), ("gflops", GFLOPS_KEYS), ("images_per_s", SPEED_KEYS)):
        value = _lookup(run, keys)
        if value is not None:
            metrics[name] = value
    status = run.info.status
    reason = run.data.tags.get(TAG_END_REASON)
    return {
        "run": run.info.run_name or run.info.run_id[:8],
        "run_id": run.info.run_id,
        "status": f"{status} ({reason})" if reason and status != "FINISHED" else status,
        "params": {k: _parse_param(run.data.params[k]) for k in param_keys if k in run.data.params},
        "metrics": metrics,
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
            include_parents: bool = False):
    """Runs of `experiment_name` as report rows, plus the param columns to show."""
    exp = client.get_experiment_by_name(experiment_name)
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        import difflib

        near = difflib.get_close_matches(experiment_name, names, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise CvlabError(
            f"no MLflow experiment named {experiment_name!r}{hint} at {client.tracking_uri}; "
            f"experiments there: {', '.join(sorted(names)) or 'none'}"
        )
    filt = f"tags.`{TAG_PARENT}` = '{parent_run_id}'" if parent_run_id else ""
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
        runs = [r for r in runs if r.data.tags.get(TAG_KIND) != "search"]
    if not runs:
        what = f"child runs of {parent_run_id}" if parent_run_id else "training runs"
        raise CvlabError(f"experiment {experiment_name!r} has no {what} to compare")
    searched: list[str] = []
    for run in runs:
        for p in _search_paths(run):
            if p not in searched:
                searched.append(p)
    param_keys = searched or varying_params(runs)
    return [run_to_row(r, param_keys, metric) for r in runs], param_keys


def default_mode(metric: str) -> str:
    return "min" if "loss" in metric or metric.endswith("_time_s") else "max"


def compare(experiment_name: str, metric: str = "val/top1", mode: str | None = None,
            tracking_uri: str | None = None, out_dir: str | Path | None = None,
            parent_run_id: str | None = None) -> dict:
    """Rank an experiment's runs; write table + plots to `out_dir`. Returns rows, columns and paths."""
    from mlflow.tracking import MlflowClient

    from orchestrator import search_report

    uri = tracking_uri or _default_tracking_uri()
    mode = mode or default_mode(metric)
    client = MlflowClient(tracking_uri=uri)
    try:
        rows, param_keys = collect(client, experiment_name, metric, parent_run_id)
    except CvlabError:
        raise
    except Exception as err:  # unreachable server, bad database path, ...
        raise CvlabError(f"cannot read MLflow at {uri}: {err}") from err
    ranked = search_report.rank_rows(rows, metric, mode)
    if not any(metric in r["metrics"] for r in ranked):
        raise CvlabError(f"no run of {experiment_name!r} has metric {metric!r}")
    columns = search_report.table_columns(ranked, param_keys, metric)
    out = Path(out_dir) if out_dir else Path("compare") / _safe(experiment_name)
    written = search_report.write_report(ranked, param_keys, metric, out, mode=mode, prefix="compare")
    return {"rows": ranked, "columns": columns, "param_keys": param_keys, "files": written,
            "tracking_uri": uri, "mode": mode}


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "experiment"


def _default_tracking_uri() -> str:
    try:
        from orchestrator.spec import ExperimentSpec
        from orchestrator.tracking import resolve_tracking_uri

        return resolve_tracking_uri(ExperimentSpec())
    except ImportError:
        import os

        return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').absolute()}"


def _cmd(args) -> int:
    from orchestrator import search_report

    result = compare(args.experiment, metric=args.metric, mode=args.mode, tracking_uri=args.tracking_uri,
                     out_dir=args.out, parent_run_id=args.parent)
    rows = result["rows"]
    print(f"{len(rows)} run(s) of {args.experiment!r} ranked by {args.metric} ({result['mode']}) "
          f"[{result['tracking_uri']}]")
    print(search_report.text_table(rows, result["columns"]), end="")
    for kind, path in result["files"].items():
        print(f"  {kind}: {path}")
    best = rows[0]
    value = best["metrics"].get(args.metric)
    if value is not None and not (isinstance(value, float) and math.isnan(value)):
        print(f"best: {best['run']} ({best['run_id']}) {args.metric}={value:.4g}")
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "compare", help="rank an MLflow experiment's runs (table + plots)",
        description="Rank the runs of an MLflow experiment by a metric, best first, with their searched "
                    "params, size, speed and status; write the table and plots to --out.",
    )
    p.add_argument("experiment", help="MLflow experiment name (tracking.experiment_name / experiment.name)")
    p.add_argument("--metric", default="val/top1", help="metric to rank by (default: val/top1)")
    p.add_argument("--mode", choices=("max", "min"), default=None,
                   help="max or min is best (default: min for losses, else max)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.add_argument("--out", default=None, help="folder for the table and plots (default: compare/<name>)")
    p.add_argument("--parent", default=None, metavar="RUN_ID",
                   help="only the nested runs of this parent run (one search)")
    p.set_defaults(func=_cmd)
