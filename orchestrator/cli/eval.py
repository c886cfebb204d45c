"""`cvlab eval SPEC --checkpoint SRC [--format mmcls] [--set ...]`: evaluate a checkpoint, data-parallel on Ray.

The experiment's workload picks the evaluation job (`orchestrator.jobs.eval_job_for`) and its `scaling`
section the workers; results go to a new MLflow run of the experiment, tagged with the source
(`cvlab.source_run`), and are printed as a table.
"""
from __future__ import annotations

from typing import Any

from orchestrator.cli.validate import add_spec_arguments


def add_cli(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate a checkpoint on the experiment's validation data (data-parallel on Ray)",
        description="Evaluate a checkpoint (a file, a Ray Train run or checkpoint folder, runs:/<run_id>/<path>, "
                    "models:/<name>/<version>, or a published mmcls RedNet file with --format mmcls) on the "
                    "validation split of the experiment, with its scaling section; log the results to a new "
                    "MLflow run tagged with the source.",
    )
    p.add_argument("spec", help="experiment YAML (data, model, scaling, tracking)")
    p.add_argument("--checkpoint", required=True, metavar="SRC", help="what to evaluate")
    p.add_argument("--format", default="auto", choices=("auto", "cvlab", "mmcls", "mmengine"),
                   help="checkpoint format (default: from the file; mmcls: a published RedNet ImageNet file)")
    add_spec_arguments(p)
    p.set_defaults(func=_eval)


def _eval(args) -> int:
    from orchestrator.cli.run import print_summary
    from orchestrator.config.loader import load_spec
    from orchestrator.inference.sources import resolve_source
    from orchestrator.jobs import eval_job_for
    from orchestrator.runs.lifecycle import run_job
    from orchestrator.tracking.server import resolve_tracking_uri

    spec = load_spec(args.spec, args.set)
    source = resolve_source(args.checkpoint, fmt=args.format, tracking_uri=resolve_tracking_uri(spec))
    job = eval_job_for(spec, source)
    print_summary(job, run_job(job))
    return 0
