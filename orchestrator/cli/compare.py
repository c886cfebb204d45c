"""`cvlab compare EXPERIMENT [--metric ...]`: rank an MLflow experiment's runs, with a table and plots."""
from __future__ import annotations

import math


def _pareto(args) -> int:
    from orchestrator.search import pareto, report
    from orchestrator.search.compare import parse_objectives, pareto_front

    result = pareto_front(args.experiment, tracking_uri=args.tracking_uri, parent_run_id=args.parent,
                          objectives=parse_objectives(args.objective), out_dir=args.out)
    rows, objectives = result["rows"], result["objectives"]
    goals = ", ".join(f"{o.metric} ({o.mode})" for o in objectives)
    front = pareto.front_summary(rows, result["param_keys"], objectives)
    print(f"Pareto front of {args.experiment!r} over {goals}: {len(front)} of {len(rows)} run(s)"
          + (f" (search {result['parent_run_id']})" if result["parent_run_id"] else "")
          + f" [{result['tracking_uri']}]")
    print(report.text_table(rows, pareto.pareto_columns(result["param_keys"], objectives)), end="")
    for kind, path in result["files"].items():
        print(f"  {kind}: {path}")
    return 0


def _cmd(args) -> int:
    from orchestrator.search import report
    from orchestrator.search.compare import compare

    if args.pareto or args.objective:
        return _pareto(args)

    result = compare(args.experiment, metric=args.metric, mode=args.mode, tracking_uri=args.tracking_uri,
                     out_dir=args.out, parent_run_id=args.parent)
    rows = result["rows"]
    print(f"{len(rows)} run(s) of {args.experiment!r} ranked by {args.metric} ({result['mode']}) "
          f"[{result['tracking_uri']}]")
    print(report.text_table(rows, result["columns"]), end="")
    for kind, path in result["files"].items():
        print(f"  {kind}: {path}")
    if result["ui_link"]:
        print(f"MLflow UI: {result['ui_link']}")
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
    p.add_argument("--pareto", action="store_true",
                   help="print the Pareto front of a search (its newest, or --parent) over its objectives, front "
                        "first, and write pareto.csv/.md/.png to --out")
    p.add_argument("--objective", action="append", default=[], metavar="METRIC[:max|min]",
                   help="with --pareto: the objectives instead of the search's own (repeatable)")
    p.set_defaults(func=_cmd)
