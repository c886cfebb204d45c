"""`cvlab compare EXPERIMENT [--metric ...]`: rank an MLflow experiment's runs, with a table and plots."""
from __future__ import annotations

import math


def _cmd(args) -> int:
    from orchestrator.search import report
    from orchestrator.search.compare import compare

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
    p.set_defaults(func=_cmd)
