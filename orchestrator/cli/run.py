"""`cvlab run SPEC [--set KEY=VALUE ...] [--resume]`: one Ray Train run of any workload, tracked in MLflow.

The spec's workload picks the job (`orchestrator.jobs`); the run lifecycle (`orchestrator.runs.lifecycle`)
does the rest. `--resume` continues the newest run of the same name from its last checkpoint, in the same
MLflow run.
"""
from __future__ import annotations

from typing import Any

from orchestrator.cli.validate import add_spec_arguments


def add_cli(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "run",
        help="train an experiment YAML on Ray Train, tracked in MLflow",
        description="Train the experiment described by a YAML file on Ray Train (2 CPU workers, a GPU "
        "cluster, ...) and track it in MLflow.",
    )
    p.add_argument("spec", help="experiment YAML, e.g. experiments/quickstart.yaml")
    add_spec_arguments(p)
    p.add_argument("--resume", action="store_true",
                   help="continue the latest run of the same name from its last checkpoint (same MLflow run)")
    p.set_defaults(func=_run)


def run_experiment(spec, resume: bool = False) -> dict[str, Any]:
    """Run `spec` with its workload's job through the run lifecycle; returns the summary."""
    from orchestrator.jobs import job_for
    from orchestrator.runs.lifecycle import run_job

    return run_job(job_for(spec), resume=resume)


def print_summary(job, summary: dict[str, Any]) -> None:
    from orchestrator.tracking.server import ui_link

    print()
    print(f"{'evaluation' if job.kind == 'eval' else 'run'} finished")
    print(f"  MLflow run id   {summary.get('run_id')}  (experiment {summary.get('experiment_id')}, "
          f"{summary.get('tracking_uri')})")
    link = ui_link(summary["tracking_uri"], summary["experiment_id"], summary["run_id"])
    if link:
        print(f"  MLflow UI       {link}")
    print(f"  Ray Train run   {summary.get('ray_run')}")
    for line in job.summary_lines(summary):
        print(line)
    print(f"  time            {summary.get('seconds')} s")


def _run(args) -> int:
    from orchestrator.config.loader import load_spec
    from orchestrator.jobs import job_for
    from orchestrator.runs.lifecycle import run_job

    spec = load_spec(args.spec, args.set)
    job = job_for(spec)
    print_summary(job, run_job(job, resume=args.resume))
    return 0
