"""`cvlab submit` and `cvlab jobs ...`: run experiments on a Ray cluster through the Job Submission API.

`cvlab submit experiments/x.yaml --address http://<head>:8265` validates the YAML here (so a bad config
fails before anything is uploaded), packs the project directory as the job's `working_dir` (without data,
virtual environments, run outputs and caches), and starts `python -m orchestrator run experiments/x.yaml
--set ...` (or `tune`) on the cluster. The same job can be submitted by hand:

    ray job submit --address http://<head>:8265 --working-dir . -- python -m orchestrator run experiments/x.yaml

Ray 2.60 clusters use token authentication by default: `RAY_AUTH_TOKEN` (or a file named by
`RAY_AUTH_TOKEN_PATH`) is sent as an `Authorization: Bearer` header on every request.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path

from orchestrator.errors import CvlabError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"

# gitignore-style patterns, relative to the working dir. Leading "/" anchors a pattern at the project root
# (a package may well have its own `data` module).
WORKING_DIR_EXCLUDES = [
    ".git",
    ".venv",
    "venv",
    "/data/",
    "/runs/",
    "mlruns",
    "mlartifacts",
    "mlflow.db",
    "__pycache__",
    "*.pyc",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
    ".mypy_cache",
    "*.egg-info",
    "/build/",
    "/dist/",
    "/benchmarks/results/",
    "/.whl/",
    "/.gl/",
]

# Environment variables forwarded to the job when set here (MLflow server credentials).
FORWARDED_ENV = (
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_INSECURE_TLS",
    "MLFLOW_TRACKING_SERVER_CERT_PATH",
)

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
LOG_TAIL_LINES = 40


# ----------------------------------------------------------------------------------------------- client


def default_address() -> str:
    """`RAY_ADDRESS` when it names a dashboard (http[s]://...), else http://127.0.0.1:8265."""
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if env.startswith(("http://", "https://")):
        return env
    return DEFAULT_ADDRESS


def normalize_address(address: str | None) -> str:
    address = (address or default_address()).strip().rstrip("/")
    if address.startswith("ray://"):
        raise CvlabError(
            f"--address {address!r} is a Ray Client address; jobs are submitted to the dashboard: "
            "http://<head>:8265"
        )
    if "://" not in address:
        address = "http://" + address
    if not address.startswith(("http://", "https://")):
        raise CvlabError(f"--address {address!r}: expected http://<head>:8265 (the Ray dashboard)")
    return address


def auth_headers() -> dict[str, str]:
    """An Authorization header from RAY_AUTH_TOKEN or the file RAY_AUTH_TOKEN_PATH names; else none.

    Ray's SDK loads the token itself only when this process's own auth mode is `token`; sending the header
    explicitly also covers clients that run with RAY_AUTH_MODE=disabled (e.g. test environments).
    """
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    token_path = os.environ.get("RAY_AUTH_TOKEN_PATH", "").strip()
    if not token and token_path:
        try:
            token = Path(token_path).expanduser().read_text().strip()
        except OSError as err:
            raise CvlabError(f"RAY_AUTH_TOKEN_PATH={token_path!r} cannot be read: {err}") from err
    return {"Authorization": f"Bearer {token}"} if token else {}


def _auth_hint(address: str) -> str:
    have = (
        "RAY_AUTH_TOKEN"
        if os.environ.get("RAY_AUTH_TOKEN")
        else ("RAY_AUTH_TOKEN_PATH" if os.environ.get("RAY_AUTH_TOKEN_PATH") else None)
    )
    if have:
        return (
            f"the Ray cluster at {address} rejected the token from {have}: check that it is the cluster's "
            "token (`ray get-auth-token` on the head node)"
        )
    return (
        f"the Ray cluster at {address} requires an authentication token: export RAY_AUTH_TOKEN=<token> "
        "(print it with `ray get-auth-token` on the head node), or RAY_AUTH_TOKEN_PATH=<file>"
    )


def translate_error(err: BaseException, address: str) -> CvlabError:
    """Turn the SDK's connection/authentication/HTTP errors into one CvlabError message."""
    from ray.exceptions import AuthenticationError

    if isinstance(err, AuthenticationError):
        return CvlabError(_auth_hint(address))
    if isinstance(err, ConnectionError) or type(err).__name__ in ("ConnectionError", "ConnectTimeout"):
        return CvlabError(
            f"cannot reach the Ray dashboard at {address}: is the head running and is this its dashboard "
            "address (port 8265 by default, not the GCS port 6379)? Set --address or RAY_ADDRESS"
        )
    text = str(err)
    if "404" in text or "does not exist" in text.lower():
        return CvlabError(f"no such job on {address}: {text}")
    return CvlabError(f"the Ray job server at {address} answered: {text}")


def make_client(address: str | None = None):
    """A connected `JobSubmissionClient`, or CvlabError saying what to set or check."""
    import logging

    from ray.job_submission import JobSubmissionClient

    address = normalize_address(address)
    # The SDK warns "no token found" whenever its own auth mode is token, even for clusters without auth.
    logging.getLogger("ray._private.authentication.http_token_authentication").setLevel(logging.ERROR)
    try:
        return JobSubmissionClient(address, headers=auth_headers() or None)
    except Exception as err:
        raise translate_error(err, address) from err


def _call(client, method: str, *args, **kwargs):
    try:
        return getattr(client, method)(*args, **kwargs)
    except Exception as err:
        raise translate_error(err, client.get_address()) from err


# ----------------------------------------------------------------------------------------- job contents


def find_project_root(start: Path | None = None) -> Path:
    """The nearest directory at or above `start` (default: cwd) holding `pyproject.toml` and `orchestrator/`."""
    start = (start or Path.cwd()).resolve()
    for candidate in (start, *start.parents):
        if (candidate / "pyproject.toml").is_file() and (candidate / "orchestrator").is_dir():
            return candidate
    return start


def pip_packages_for_extras(extras: list[str], project_root: Path) -> list[str]:
    """Requirement strings for project extras from pyproject.toml; `base` means the core dependencies."""
    if not extras:
        return []
    import tomllib

    pyproject = project_root / "pyproject.toml"
    try:
        project = tomllib.loads(pyproject.read_text())["project"]
    except (OSError, KeyError, tomllib.TOMLDecodeError) as err:
        raise CvlabError(f"--pip-extras needs {pyproject} with a [project] table: {err}") from err
    optional = project.get("optional-dependencies", {})
    packages: list[str] = []
    for extra in extras:
        if extra == "base":
            found = list(project.get("dependencies", []))
        elif extra in optional:
            found = list(optional[extra])
        else:
            raise CvlabError(
                f"--pip-extras: unknown extra {extra!r}; pyproject.toml defines: "
                + ", ".join(["base", *sorted(optional)])
            )
        packages += [p for p in found if p not in packages]
    return packages


def _parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise CvlabError(f"--env {pair!r}: expected KEY=VALUE")
        env[key.strip()] = value
    return env


def _tracking_uri(spec) -> str | None:
    return (spec.tracking.tracking_uri if spec is not None else None) or os.environ.get("MLFLOW_TRACKING_URI")


def build_runtime_env(
    project_root: Path,
    *,
    spec=None,
    pip_extras: list[str] = (),
    pip: list[str] = (),
    env: dict[str, str] | None = None,
    excludes: list[str] = (),
) -> dict:
    """The job's runtime_env: the project as working_dir, optional pip packages, and env vars."""
    env_vars: dict[str, str] = {}
    uri = _tracking_uri(spec)
    if uri:
        env_vars["MLFLOW_TRACKING_URI"] = uri
    for name in FORWARDED_ENV:
        if os.environ.get(name):
            env_vars[name] = os.environ[name]
    env_vars.update(env or {})
    runtime_env: dict = {
        "working_dir": str(project_root),
        "excludes": [*WORKING_DIR_EXCLUDES, *excludes],
        "env_vars": env_vars,
    }
    packages = pip_packages_for_extras(list(pip_extras), project_root) + list(pip)
    if packages:
        runtime_env["pip"] = packages
    return runtime_env


def build_entrypoint(verb: str, spec_path: str, overrides: list[str] = ()) -> str:
    """`python -m orchestrator <verb> <yaml> --set ...`, shell-quoted (the job server runs it in a shell)."""
    if verb not in ("run", "tune"):
        raise ValueError(f"verb must be 'run' or 'tune', got {verb!r}")
    parts = ["python", "-m", "orchestrator", verb, spec_path]
    for override in overrides:
        parts += ["--set", override]
    return " ".join(shlex.quote(p) for p in parts)


def _spec_path_in_project(spec_file: Path, project_root: Path) -> str:
    try:
        return spec_file.resolve().relative_to(project_root).as_posix()
    except ValueError:
        raise CvlabError(
            f"{spec_file} is outside the working dir {project_root}: the job can only read files that are "
            "uploaded with it; move the YAML into the project or pass --working-dir"
        ) from None


def _load_spec(spec_file: Path, overrides: list[str]):
    from orchestrator.spec_loader import load_spec

    return load_spec(str(spec_file), overrides=list(overrides))


def _warn_local_tracking(uri: str | None, address: str) -> None:
    if not uri:
        print(
            "cvlab: warning: no MLflow tracking URI here (tracking.tracking_uri or MLFLOW_TRACKING_URI): the job "
            "uses the cluster nodes' own MLFLOW_TRACKING_URI if they set one, else an mlflow.db in its temporary "
            "working dir. Pass --env MLFLOW_TRACKING_URI=http://<mlflow-host>:5000 to choose",
            file=sys.stderr,
        )
    elif uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        print(
            f"cvlab: warning: tracking URI {uri} is relative: the job resolves it inside its temporary "
            "working dir on the cluster; use an absolute path or an MLflow server",
            file=sys.stderr,
        )


def _warn_relative_storage(storage_path: str) -> None:
    from orchestrator.storage import storage_scheme

    if storage_scheme(storage_path) == "" and not os.path.isabs(os.path.expanduser(storage_path)):
        print(
            f"cvlab: warning: run.storage_path {storage_path!r} is relative: the job resolves it inside its "
            "temporary working dir, so checkpoints go when the job's files are cleaned up. Use --set "
            "run.storage_path=<absolute shared path | s3://... | gs://...> to keep them",
            file=sys.stderr,
        )


# ---------------------------------------------------------------------------------------------- actions


def submit(
    spec_file: str | Path,
    *,
    address: str | None = None,
    overrides: list[str] = (),
    tune: bool = False,
    working_dir: str | Path | None = None,
    pip_extras: list[str] = (),
    pip: list[str] = (),
    env: dict[str, str] | None = None,
    excludes: list[str] = (),
    submission_id: str | None = None,
    entrypoint_num_cpus: float | None = None,
    dry_run: bool = False,
) -> dict:
    """Validate `spec_file` locally and submit it as a Ray job. Returns {job_id, entrypoint, runtime_env}.

    With `dry_run`, nothing is contacted and `job_id` is None.
    """
    spec_file = Path(spec_file)
    if not spec_file.is_file():
        raise CvlabError(f"experiment file {spec_file} does not exist")
    spec = _load_spec(spec_file, list(overrides))  # raises CvlabError for a bad config
    if tune and spec.search is None:
        raise CvlabError(f"{spec_file} has no `search:` section, so it cannot be submitted with --tune")
    root = Path(working_dir).resolve() if working_dir else find_project_root()
    if not root.is_dir():
        raise CvlabError(f"--working-dir {root} is not a directory")
    rel = _spec_path_in_project(spec_file, root)
    verb = "tune" if tune else "run"
    entrypoint = build_entrypoint(verb, rel, list(overrides))
    runtime_env = build_runtime_env(
        root, spec=spec, pip_extras=pip_extras, pip=pip, env=env, excludes=list(excludes)
    )
    result = {"job_id": None, "entrypoint": entrypoint, "runtime_env": runtime_env}
    if dry_run:
        return result
    address = normalize_address(address)
    _warn_local_tracking(runtime_env["env_vars"].get("MLFLOW_TRACKING_URI"), address)
    _warn_relative_storage(spec.run.storage_path)
    client = make_client(address)
    kwargs = {}
    if entrypoint_num_cpus is not None:
        kwargs["entrypoint_num_cpus"] = entrypoint_num_cpus
    result["job_id"] = _call(
        client,
        "submit_job",
        entrypoint=entrypoint,
        runtime_env=runtime_env,
        submission_id=submission_id,
        metadata={"cvlab_verb": verb, "cvlab_spec": rel, "cvlab_experiment": spec.experiment.name},
        **kwargs,
    )
    return result


def wait_for_job(client, job_id: str, *, timeout_s: float | None = None, poll_s: float = 1.0) -> str:
    """Poll until the job is SUCCEEDED, FAILED or STOPPED; return that status name."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = str(_call(client, "get_job_status", job_id).value)
        if status in TERMINAL:
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise CvlabError(f"job {job_id} still {status} after {timeout_s:.0f} s")
        time.sleep(poll_s)


def stream_logs(client, job_id: str, out=None) -> None:
    """Print the job's logs as they come until the job ends (the SDK's async `tail_job_logs`)."""
    import asyncio

    out = out or sys.stdout

    async def _tail():
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(_tail())
    except RuntimeError as err:  # the websocket closed early: the status poll below still decides
        print(f"cvlab: log stream ended early ({err}); waiting for the job to finish", file=sys.stderr)


def log_tail(client, job_id: str, lines: int = LOG_TAIL_LINES) -> str:
    text = _call(client, "get_job_logs", job_id) or ""
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def report_end(client, job_id: str, status: str, *, show_tail: bool) -> int:
    """Print how the job ended; exit code 0 for SUCCEEDED, 1 for FAILED/STOPPED."""
    if status == "SUCCEEDED":
        print(f"job {job_id} SUCCEEDED")
        return 0
    info = _call(client, "get_job_info", job_id)
    if show_tail:
        print(f"----- last {LOG_TAIL_LINES} lines of the log of job {job_id} -----", file=sys.stderr)
        print(log_tail(client, job_id), file=sys.stderr)
        print("-----", file=sys.stderr)
    message = (info.message or "").strip().splitlines()
    print(f"job {job_id} {status}" + (f": {message[0]}" if message else ""), file=sys.stderr)
    return 1


def follow(client, job_id: str) -> int:
    """Stream logs until the job ends; return 0 for SUCCEEDED, 1 otherwise."""
    try:
        stream_logs(client, job_id)
        status = wait_for_job(client, job_id, poll_s=0.5)
    except KeyboardInterrupt:
        print(
            f"\ncvlab: stopped following; job {job_id} keeps running (cvlab jobs stop {job_id})",
            file=sys.stderr,
        )
        return 130
    return report_end(client, job_id, status, show_tail=True)


def _fmt_time(ms) -> str:
    if not ms:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))


# ------------------------------------------------------------------------------------------------- CLI


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
        env=_parse_env(args.env),
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
    jobs = sorted(_call(client, "list_jobs"), key=lambda j: j.start_time or 0)
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
    info = _call(client, "get_job_info", args.job_id)
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
    sys.stdout.write(_call(client, "get_job_logs", args.job_id))
    return 0


def _cmd_stop(args) -> int:
    client = make_client(args.address)
    stopped = _call(client, "stop_job", args.job_id)
    if not stopped:
        status = _call(client, "get_job_status", args.job_id).value
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
