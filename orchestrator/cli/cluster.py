"""`cvlab cluster local up|down|status`: a throwaway Ray cluster (and MLflow server) on this machine."""
from __future__ import annotations

from orchestrator.cluster.local import (
    DEFAULT_STATE_DIR,
    down,
    exports,
    read_state,
    recorded_leaders,
    running_members,
    state_dir_path,
    up,
)


def _cmd_up(args) -> int:
    from orchestrator.tracking.server import ui_link

    info = up(
        state_dir=args.state_dir,
        workers=args.workers,
        host=args.host,
        ray_port=args.ray_port,
        dashboard_port=args.dashboard_port,
        mlflow_port=None if args.no_mlflow else args.mlflow_port,
        head_cpus=args.num_cpus,
        worker_cpus=args.worker_cpus,
        head_gpus=args.num_gpus,
        auth=args.auth,
        artifacts_destination=args.artifacts_destination,
        timeout_s=args.timeout,
    )
    print()
    print(f"Ray GCS address:     {info['gcs_address']}")
    print(f"Ray dashboard/jobs:  {info['dashboard']}")
    if info["mlflow"]:
        print(f"MLflow UI:           {ui_link(info['mlflow'], None)}")
    print(f"state and logs:      {info['state_dir']}")
    print("\n# point cvlab / ray / mlflow at it:")
    print("\n".join(exports(info)))
    print(f"\n# stop it: cvlab cluster local down --state-dir {info['state_dir']}")
    return 0


def _cmd_down(args) -> int:
    stopped = down(args.state_dir)
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def _cmd_status(args) -> int:
    state = state_dir_path(args.state_dir)
    info = read_state(state)
    if info is None:
        print(f"no local cluster recorded in {state}")
        return 1
    running = False
    for what, pid in recorded_leaders(info):
        alive = bool(running_members(pid))
        running |= alive
        print(f"{what:<14} pid {pid:<8} {'running' if alive else 'gone'}")
    print(f"dashboard {info['dashboard']}" + (f"   mlflow {info['mlflow']}" if info.get("mlflow") else ""))
    return 0 if running else 1


def add_cli(subparsers) -> None:
    cluster = subparsers.add_parser("cluster", help="manage a local Ray + MLflow cluster")
    targets = cluster.add_subparsers(dest="cluster_target", metavar="TARGET", required=True)
    local = targets.add_parser(
        "local", help="a Ray head (+ worker nodes) and an MLflow server on this machine"
    )
    actions = local.add_subparsers(dest="cluster_action", metavar="ACTION", required=True)

    p = actions.add_parser("up", help="start the local cluster")
    p.add_argument(
        "--workers", type=int, default=0, help="extra Ray worker nodes on this machine (default 0)"
    )
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs the head offers (default: all)")
    p.add_argument("--num-gpus", type=int, default=None, help="GPUs the head offers (default: detected)")
    p.add_argument("--worker-cpus", type=int, default=1, help="CPUs per extra worker node (default 1)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--ray-port", type=int, default=6379, help="Ray GCS port (default 6379)")
    p.add_argument("--dashboard-port", type=int, default=8265, help="dashboard / job API port (default 8265)")
    p.add_argument("--mlflow-port", type=int, default=5000, help="MLflow server port (default 5000)")
    p.add_argument("--no-mlflow", action="store_true", help="do not start an MLflow server")
    p.add_argument(
        "--artifacts-destination", default=None,
        help="where the MLflow server stores artifacts (default <state-dir>/mlartifacts; s3://... works)",
    )  # fmt: skip
    p.add_argument(
        "--auth", choices=("disabled", "token"), default="disabled",
        help="Ray token authentication (default disabled: loopback only); token writes <state-dir>/auth_token",
    )  # fmt: skip
    p.add_argument(
        "--state-dir",
        default=None,
        help=f"pids, logs, mlflow.db (default $CVLAB_STATE_DIR or {DEFAULT_STATE_DIR})",
    )
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each service")
    p.set_defaults(func=_cmd_up)

    p = actions.add_parser("down", help="stop the processes `up` started (by their recorded pids)")
    p.add_argument("--state-dir", default=None)
    p.set_defaults(func=_cmd_down)

    p = actions.add_parser("status", help="show whether the recorded processes are running")
    p.add_argument("--state-dir", default=None)
    p.set_defaults(func=_cmd_status)
