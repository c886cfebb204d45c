"""`cvlab tune SPEC [--resume] [--check]`: a Ray Tune search over the spec's `search:` section."""
from __future__ import annotations

def _extend(args, spec) -> int:
    from orchestrator.errors import CvlabError
    from orchestrator.search.extend import extend_search

    if args.epochs is None or args.pareto == (args.top is not None):
        raise CvlabError("--extend needs --epochs E and one of --pareto or --top K")
    if args.top is not None and args.top < 1:
        raise CvlabError(f"--top must be at least 1, got {args.top}")
    result = extend_search(spec, args.epochs, pareto=args.pareto, top=args.top, num_cpus=args.num_cpus)
    print(f"\nextended {len(result['extended'])} trial(s) of search run {result['parent_run_id']} to epoch "
          f"{args.epochs} ({result['tracking_uri']}):")
    for s in result["extended"]:
        best = s.get("best") or {}
        print(f"  run {s['run_id']} (from {s['extended_from']}, epoch {s['from_epoch']} -> {args.epochs}): "
              + ", ".join(f"{k}={v:.4g}" for k, v in best.items()))
    return 0


def _cmd(args) -> int:
    from orchestrator.config.loader import load_spec
    from orchestrator.search import pareto, report
    from orchestrator.search.tune import run_search
    from orchestrator.tracking.server import ui_link

    spec = load_spec(args.spec, args.set)
    if args.extend:
        return _extend(args, spec)
    if args.check:
        from orchestrator.search.space import check_combinations, check_search

        space = check_search(spec)
        n = check_combinations(spec, space)
        print(f"search space OK: {n} combination(s) checked; "
             f"{space.grid_size() * spec.search.num_samples} trial(s)")
        for path, desc in space.describe().items():
            print(f"  {path}: {desc}")
        return 0
    summary = run_search(spec, resume=args.resume, num_cpus=args.num_cpus)
    s = spec.search
    rows = summary["trials"]
    print("")
    print(f"search {summary['search_name']}: {len(rows)} trial run(s) in MLflow "
         f"(parent run {summary['parent_run_id']}, {summary['tracking_uri']})")
    link = ui_link(summary["tracking_uri"], summary["experiment_id"], summary["parent_run_id"])
    if link:
        print(f"MLflow UI: {link}")
    objectives = [o.metric for o in s.all_objectives]
    if rows:
        cols = report.table_columns(rows, list(s.space), s.metric, [*report.DEFAULT_EXTRA_METRICS, *objectives[1:]])
        print(report.text_table(rows, cols).rstrip())
    if summary.get("front"):  # several objectives or constraints
        front = pareto.front_summary(summary["front"], list(s.space), pareto.as_objectives(s.all_objectives))
        infeasible = sum(r["front"] == "infeasible" for r in summary["front"])
        print(f"Pareto front over {', '.join(objectives)}: {len(front)} trial(s)"
              + (f"; {infeasible} infeasible trial(s) not trained" if infeasible else ""))
        print("\n".join(front))
    if summary["best"]:
        b = summary["best"]
        print(f"best: {b['run']} {s.metric}={b['metrics'][s.metric]:.4g} with "
             + ", ".join(f"{k}={v}" for k, v in b["params"].items()))
    print(f"Tune state: {summary['tune_path']}")
    if summary["interrupted"]:
        print(f"the search was interrupted; continue it with: cvlab tune {args.spec} --resume")
        return 130
    errored = [t for t, st in summary["statuses"].items() if st == "ERROR"]
    if errored:
        print(f"{len(errored)} trial(s) failed: {', '.join(errored)} (see the cvlab.end_reason tag of their runs)")
        return 1
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "tune",
        help="search architectures / hyperparameters with Ray Tune (one Ray Train run per trial)",
        description="Run the search in the experiment's `search:` section: every trial is a full Ray Train "
                    "run, tracked as a nested MLflow run under one parent run per search.",
    )
    p.add_argument("spec", help="experiment YAML with a search: section")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec value, e.g. --set search.num_samples=2 (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue the newest interrupted search of this experiment (finished trials are kept)")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="logical CPUs of the local Ray cluster started when RAY_ADDRESS is unset "
                        "(default: this machine's cores + 1, for the trial processes)")
    p.add_argument("--check", action="store_true",
                   help="only check the search space against the model and exit")
    p.add_argument("--extend", action="store_true",
                   help="continue trials of the newest search from their checkpoints to --epochs, as new nested "
                        "runs linked to them (choose them with --pareto or --top K)")
    p.add_argument("--epochs", type=int, default=None, help="with --extend: the epoch to train the trials to")
    p.add_argument("--pareto", action="store_true", help="with --extend: the trials on the search's Pareto front")
    p.add_argument("--top", type=int, default=None, metavar="K",
                   help="with --extend: the K best trials by the search's metric")
    p.set_defaults(func=_cmd)
