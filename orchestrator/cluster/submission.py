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

import logging
import os
import shlex
import sys
import time
from pathlib import Path

from orchestrator.errors import CvlabError

log = logging.getLogger(__name__)
# `cli/submit.py` imports this module at its top, so every `cvlab --help` loads it: ray, the config loader
# (pydantic), pyarrow (runs.storage, workloads.object_storage), asyncio and tomllib are imported inside the functions that use them.

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
    from ray.exceptions import AuthenticationError  # deferred: see the note at the top

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
    from ray.job_submission import JobSubmissionClient  # deferred: see the note at the top

    address = normalize_address(address)
    # The SDK warns "no token found" whenever its own auth mode is token, even for clusters without auth.
    logging.getLogger("ray._private.authentication.http_token_authentication").setLevel(logging.ERROR)
    try:
        return JobSubmissionClient(address, headers=auth_headers() or None)
    except Exception as err:
        raise translate_error(err, address) from err


def call(client, method: str, *args, **kwargs):
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
    import tomllib  # deferred: see the note at the top (and Python 3.10 has no tomllib)

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


def parse_env(pairs: list[str]) -> dict[str, str]:
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
    """The job's runtime_env: the project as working_dir, optional pip packages, and env vars (MLflow's and the
    bucket settings, `object_storage.STORAGE_ENV`, when set here)."""
    from workloads.object_storage import STORAGE_ENV
    env_vars: dict[str, str] = {}
    uri = _tracking_uri(spec)
    if uri:
        env_vars["MLFLOW_TRACKING_URI"] = uri
    for name in (*FORWARDED_ENV, *STORAGE_ENV):
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
    from orchestrator.config.loader import load_spec  # deferred: see the note at the top

    return load_spec(str(spec_file), overrides=list(overrides))


def _warn_local_tracking(uri: str | None, address: str) -> None:
    if not uri:
        log.warning(
            "no MLflow tracking URI here (tracking.tracking_uri or MLFLOW_TRACKING_URI): the job uses the cluster "
            "nodes' own MLFLOW_TRACKING_URI if they set one, else an mlflow.db in its temporary working dir. "
            "Pass --env MLFLOW_TRACKING_URI=http://<mlflow-host>:5000 to choose")
    elif uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        log.warning("tracking URI %s is relative: the job resolves it inside its temporary working dir on the "
                    "cluster; use an absolute path or an MLflow server", uri)


def _warn_relative_storage(storage_path: str) -> None:
    from orchestrator.runs.storage import storage_scheme  # deferred: see the note at the top

    if storage_scheme(storage_path) == "" and not os.path.isabs(os.path.expanduser(storage_path)):
        log.warning("run.storage_path %r is relative: the job resolves it inside its temporary working dir, so "
                    "checkpoints go when the job's files are cleaned up. Use --set run.storage_path=<absolute "
                    "shared path | s3://... | gs://...> to keep them", storage_path)


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
    result["job_id"] = call(
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
        status = str(call(client, "get_job_status", job_id).value)
        if status in TERMINAL:
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise CvlabError(f"job {job_id} still {status} after {timeout_s:.0f} s")
        time.sleep(poll_s)


def stream_logs(client, job_id: str, out=None) -> None:
    """Print the job's logs as they come until the job ends (the SDK's async `tail_job_logs`)."""
    import asyncio  # deferred: see the note at the top

    out = out or sys.stdout

    async def _tail():
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(_tail())
    except RuntimeError as err:  # the websocket closed early: the status poll below still decides
        log.warning("log stream ended early (%s); waiting for the job to finish", err)


def log_tail(client, job_id: str, lines: int = LOG_TAIL_LINES) -> str:
    text = call(client, "get_job_logs", job_id) or ""
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def report_end(client, job_id: str, status: str, *, show_tail: bool) -> int:
    """Print how the job ended; exit code 0 for SUCCEEDED, 1 for FAILED/STOPPED."""
    if status == "SUCCEEDED":
        log.info("job %s SUCCEEDED", job_id)
        return 0
    info = call(client, "get_job_info", job_id)
    if show_tail:
        log.error("----- last %d lines of the log of job %s -----\n%s\n-----", LOG_TAIL_LINES, job_id,
                  log_tail(client, job_id))
    message = (info.message or "").strip().splitlines()
    log.error("job %s %s%s", job_id, status, f": {message[0]}" if message else "")
    return 1


def follow(client, job_id: str) -> int:
    """Stream logs until the job ends; return 0 for SUCCEEDED, 1 otherwise."""
    try:
        stream_logs(client, job_id)
        status = wait_for_job(client, job_id, poll_s=0.5)
    except KeyboardInterrupt:
        log.warning("stopped following; job %s keeps running (cvlab jobs stop %s)", job_id, job_id)
        return 130
    return report_end(client, job_id, status, show_tail=True)
