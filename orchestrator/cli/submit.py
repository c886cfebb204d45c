"""`cvlab submit SPEC` and `cvlab jobs list|status|logs|stop`: experiments as Ray jobs on a cluster."""
from __future__ import annotations

import sys
import time

from orchestrator.cluster.submission import (
    DEFAULT_ADDRESS,
    call,
    follow,
    make_client,
    normalize_address,
    parse_env,
    submit,
    wait_for_job,
)


def _fmt_time(ms) -> str:
    if not ms:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))


def _cmd_submit(args) -> int:
    address = normalize_address(args.address)
    extras = [e.strip() for chunk in args.pip_extras for e in chunk.split(",") if e.strip()]
    result = submit(
        args.spec,
        address=address,
        overrides=args.set,
        tune=args.tune,
        working_dir=args.working_dir,
        pip_extras=extras,
        pip=args.pip,
        env=parse_env(args.env),
        excludes=args.exclude,
        submission_id=args.submission_id,
        entrypoint_num_cpus=args.entrypoint_num_cpus,
        dry_run=args.dry_run,
    )
    if args.dry_run:
        import json

        print(
            json.dumps({"entrypoint": result["entrypoint"], "runtime_env": result["runtime_env"]}, indent=2)
        )
        return 0
    job_id = result["job_id"]
    print(f"submitted job {job_id} to {address}")
    print(f"  entrypoint: {result['entrypoint']}")
    if not args.follow:
        print(f"  follow it:  cvlab jobs logs {job_id} --follow --address {address}")
        return 0
    return follow(make_client(address), job_id)


def _cmd_list(args) -> int:
    client = make_client(args.address)
    jobs = sorted(call(client, "list_jobs"), key=lambda j: j.start_time or 0)
    if not jobs:
        print("no jobs")
        return 0
    print(f"{'SUBMISSION ID':<30} {'STATUS':<10} {'STARTED':<20} ENTRYPOINT")
    for job in jobs:
        entry = job.entrypoint if len(job.entrypoint) <= 70 else job.entrypoint[:67] + "..."
        ident = job.submission_id or job.job_id or "-"
        print(f"{ident:<30} {job.status.value:<10} {_fmt_time(job.start_time):<20} {entry}")
    return 0


def _cmd_status(args) -> int:
    client = make_client(args.address)
    info = call(client, "get_job_info", args.job_id)
    print(f"job {args.job_id}: {info.status.value}")
    print(f"  entrypoint: {info.entrypoint}")
    print(f"  started:    {_fmt_time(info.start_time)}   ended: {_fmt_time(info.end_time)}")
    if info.message:
        print(f"  message:    {info.message.strip()}")
    return 0


def _cmd_logs(args) -> int:
    client = make_client(args.address)
    if args.follow:
        return follow(client, args.job_id)
    sys.stdout.write(call(client, "get_job_logs", args.job_id))
    return 0


def _cmd_stop(args) -> int:
    client = make_client(args.address)
    stopped = call(client, "stop_job", args.job_id)
    if not stopped:
        status = call(client, "get_job_status", args.job_id).value
        print(f"job {args.job_id} was not running ({status})")
        return 0
    print(f"stop requested for job {args.job_id}")
    if args.wait:
        status = wait_for_job(client, args.job_id, timeout_s=60, poll_s=0.5)
        print(f"job {args.job_id} {status}")
    return 0


def _add_address(parser) -> None:
    parser.add_argument(
        "--address",
        default=None,
        help=f"Ray dashboard address (default: $RAY_ADDRESS or {DEFAULT_ADDRESS}); "
        "token auth: export RAY_AUTH_TOKEN",
    )


def add_cli(subparsers) -> None:
    sub = subparsers.add_parser(
        "submit",
        help="submit an experiment to a Ray cluster as a job",
        description="Validate an experiment YAML here and run it on a Ray cluster through the Job "
        "Submission API. The project directory is uploaded as the job's working_dir (without .git, "
        ".venv, data/, runs/, mlruns, mlartifacts, mlflow.db and caches). Equivalent to: ray job submit "
        "--address ADDR --working-dir . -- python -m orchestrator run SPEC",
    )
    sub.add_argument("spec", help="experiment YAML inside the project, e.g. experiments/quickstart.yaml")
    sub.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="spec override")
    _add_address(sub)
    sub.add_argument("--tune", action="store_true", help="run `cvlab tune` (the spec's search section)")
    sub.add_argument(
        "--follow", action="store_true", help="stream the logs; exit 0 on SUCCEEDED, 1 otherwise"
    )
    sub.add_argument(
        "--pip-extras",
        action="append",
        default=[],
        metavar="EXTRA[,EXTRA]",
        help="install these pyproject extras in the job's environment (e.g. det, cuda12; 'base' = core "
        "dependencies). Default: none, the cluster image has the project installed",
    )
    sub.add_argument("--pip", action="append", default=[], metavar="REQ", help="extra pip requirement")
    sub.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="job env var")
    sub.add_argument("--exclude", action="append", default=[], metavar="PATTERN", help="extra upload exclude")
    sub.add_argument(
        "--working-dir", default=None, help="directory uploaded with the job (default: project root)"
    )
    sub.add_argument("--submission-id", default=None, help="job id to use (default: generated)")
    sub.add_argument("--entrypoint-num-cpus", type=float, default=None, help="CPUs reserved for the driver")
    sub.add_argument(
        "--dry-run", action="store_true", help="print the entrypoint and runtime_env, submit nothing"
    )
    sub.set_defaults(func=_cmd_submit)

    jobs = subparsers.add_parser("jobs", help="list, inspect, follow and stop Ray jobs")
    jobs_sub = jobs.add_subparsers(dest="jobs_verb", metavar="ACTION", required=True)
    p = jobs_sub.add_parser("list", help="all jobs on the cluster")
    _add_address(p)
    p.set_defaults(func=_cmd_list)
    p = jobs_sub.add_parser("status", help="status and message of one job")
    p.add_argument("job_id")
    _add_address(p)
    p.set_defaults(func=_cmd_status)
    p = jobs_sub.add_parser("logs", help="the job's logs")
    p.add_argument("job_id")
    p.add_argument("--follow", action="store_true", help="stream until the job ends; exit with its status")
    _add_address(p)
    p.set_defaults(func=_cmd_logs)
    p = jobs_sub.add_parser("stop", help="stop a running job")
    p.add_argument("job_id")
    p.add_argument("--wait", action="store_true", help="wait until it has stopped")
    _add_address(p)
    p.set_defaults(func=_cmd_stop)
