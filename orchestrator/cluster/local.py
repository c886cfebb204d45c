"""`cvlab cluster local up|down|status`: a Ray head (+ optional worker nodes) and an MLflow server on this
machine, bound to 127.0.0.1, for trying `cvlab submit` end to end.

Every process is started in its own session (`start_new_session`), with `ray start --block` so the Ray
processes stay children of the process we record. `down` stops exactly those sessions, by the process ids
kept in the state dir: it never runs `ray stop`, which would also kill unrelated Ray clusters.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from orchestrator.errors import CvlabError

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = "~/.cvlab/local-cluster"
STATE_FILE = "state.json"
# Ray puts unix sockets under its temp dir; their paths must stay under ~107 bytes.
MAX_RAY_TEMP_DIR_LEN = 40


# ------------------------------------------------------------------------------------------- processes


def session_members(sid: int) -> list[int]:
    """Pids of live processes whose session id is `sid` (Linux /proc)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getsid(int(entry)) == sid:
                members.append(int(entry))
        except (ProcessLookupError, PermissionError, OSError):
            continue
    return members


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child we have not reaped counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def running_members(sid: int) -> list[int]:
    return [p for p in session_members(sid) if _alive(p)]


def stop_session(leader: int, *, grace_s: float = 15.0) -> int:
    """SIGTERM the session leader `leader` (started by us with start_new_session, so its pid is the session
    id), wait for the session to empty, then SIGKILL what is left of *that* session. Returns the number of
    processes that had to be killed. A pid that is no longer a session leader was reused: it is left alone."""
    members = [p for p in session_members(leader) if _alive(p)]
    if not members:
        return 0
    if leader in members:
        try:
            os.kill(leader, signal.SIGTERM)
        except ProcessLookupError:
            pass
    else:  # the leader is gone but its children live on: terminate them directly
        for pid in members:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not [p for p in session_members(leader) if _alive(p)]:
            return 0
        time.sleep(0.25)
    left = [p for p in session_members(leader) if _alive(p)]
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10.0  # SIGKILLed processes still take a moment to go
    while running_members(leader) and time.monotonic() < deadline:
        time.sleep(0.1)
    return len(left)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _check_port(host: str, port: int, flag: str) -> None:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as err:
            raise CvlabError(
                f"port {port} on {host} is taken ({err.strerror}); choose another with {flag}"
            ) from err


def _wait_http(url: str, proc: subprocess.Popen, log: Path, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise CvlabError(f"{what} exited with code {proc.returncode} while starting:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError as err:
            # An HTTP error status (e.g. 401 with token auth) still means the server is up.
            if getattr(err, "code", None):
                return
            time.sleep(0.5)
    raise CvlabError(f"{what} did not answer on {url} within {timeout_s:.0f} s; log:\n{_tail(log)}")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _spawn(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )


# ------------------------------------------------------------------------------------------------ state


def state_dir_path(state_dir: str | None) -> Path:
    return Path(
        os.path.expanduser(state_dir or os.environ.get("CVLAB_STATE_DIR") or DEFAULT_STATE_DIR)
    ).absolute()


def ray_temp_dir(state: Path) -> Path:
    """`<state>/ray` when short enough for Ray's socket paths, else a short /tmp path unique to `state`."""
    candidate = state / "ray"
    if len(str(candidate)) <= MAX_RAY_TEMP_DIR_LEN:
        return candidate
    digest = hashlib.sha1(str(state).encode()).hexdigest()[:8]
    return Path(f"/tmp/cvlab-{os.getuid()}-{digest}")


def read_state(state: Path) -> dict | None:
    try:
        return json.loads((state / STATE_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as err:
        raise CvlabError(
            f"{state / STATE_FILE} is unreadable ({err}); remove it after checking for processes"
        )


def recorded_leaders(info: dict) -> list[tuple[str, int]]:
    procs = info.get("processes", {})
    out = [(f"worker {i}", pid) for i, pid in enumerate(procs.get("workers", []))]
    if procs.get("head"):
        out.append(("ray head", procs["head"]))
    if procs.get("mlflow"):
        out.append(("mlflow server", procs["mlflow"]))
    return out


def _ray_env(state: Path, auth: str, path_prefix: str) -> dict[str, str]:
    env = dict(os.environ)
    # Jobs run `python` from the head's PATH: make that this interpreter's environment.
    env["PATH"] = path_prefix + os.pathsep + env.get("PATH", "")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env["RAY_AUTH_MODE"] = auth
    if auth == "token":
        env["RAY_AUTH_TOKEN_PATH"] = str(state / "auth_token")
        env.pop("RAY_AUTH_TOKEN", None)
    return env


# ------------------------------------------------------------------------------------------------- up/down


def up(
    *,
    state_dir: str | None = None,
    workers: int = 0,
    host: str = "127.0.0.1",
    ray_port: int = 6379,
    dashboard_port: int = 8265,
    mlflow_port: int | None = 5000,
    head_cpus: int | None = None,
    worker_cpus: int = 1,
    head_gpus: int | None = None,
    auth: str = "disabled",
    artifacts_destination: str | None = None,
    timeout_s: float = 120.0,
) -> dict:
    """Start the local cluster; returns the state record (also written to `<state_dir>/state.json`).

    `mlflow_port=None` skips the MLflow server. Raises CvlabError when one is already recorded as running,
    a port is taken, or a process fails to start (everything started so far is stopped again).
    """
    if auth not in ("disabled", "token"):
        raise CvlabError(f"--auth must be 'disabled' or 'token', got {auth!r}")
    if workers < 0:
        raise CvlabError(f"--workers must be >= 0, got {workers}")
    if artifacts_destination and mlflow_port is not None:
        _check_artifacts_destination(artifacts_destination)
    state = state_dir_path(state_dir)
    _check_free(state, host, ray_port, dashboard_port, mlflow_port)
    logs = state / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    temp_dir = ray_temp_dir(state)
    if auth == "token":
        token_file = state / "auth_token"
        if not token_file.exists():
            token_file.write_text(secrets.token_hex(32) + "\n")
        token_file.chmod(0o600)
    env = _ray_env(state, auth, str(Path(sys.executable).parent))

    info: dict = {
        "state_dir": str(state),
        "host": host,
        "auth": auth,
        "ray_temp_dir": str(temp_dir),
        "gcs_address": f"{host}:{ray_port}",
        "dashboard": f"http://{host}:{dashboard_port}",
        "mlflow": f"http://{host}:{mlflow_port}" if mlflow_port is not None else None,
        "processes": {"head": None, "workers": [], "mlflow": None},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }

    def save() -> None:
        (state / STATE_FILE).write_text(json.dumps(info, indent=2))

    try:
        _start_head(info, save, env, logs, ray_port, dashboard_port, head_cpus, head_gpus, timeout_s)
        for i in range(workers):
            _start_worker(info, save, env, logs, i, worker_cpus)
        if workers:
            _wait_for_nodes(info["dashboard"], workers + 1, timeout_s, auth, state)
        if mlflow_port is not None:
            _start_mlflow(info, save, logs, mlflow_port, artifacts_destination or str(state / "mlartifacts"),
                          timeout_s)
    except BaseException:
        log.warning("start-up failed; stopping what was started")
        _stop_all(info)
        (state / STATE_FILE).unlink(missing_ok=True)
        raise
    save()
    return info


def _check_artifacts_destination(destination: str) -> None:
    """An MLflow server starts whatever its artifact destination; a bucket it cannot reach would show only later,
    as HTTP 500 answers to every upload. CvlabError when the bucket is absent or unreachable."""
    # pyarrow is imported here: `cvlab --help` loads this module (cli/cluster.py).
    import pyarrow.fs as pafs

    from workloads.object_storage import S3_SETTINGS, is_bucket_uri, open_location

    if not is_bucket_uri(destination):
        return
    try:
        fs, path = open_location(destination)
        bucket = fs.get_file_info(path.split("/", 1)[0])
    except (OSError, ValueError) as err:
        raise CvlabError(f"--artifacts-destination {destination}: cannot reach the bucket: {err} ({S3_SETTINGS})") \
            from None
    if bucket.type == pafs.FileType.NotFound:
        raise CvlabError(f"--artifacts-destination {destination}: the bucket does not exist ({S3_SETTINGS})")


def _check_free(state: Path, host: str, ray_port: int, dashboard_port: int, mlflow_port: int | None) -> None:
    """No cluster of this state folder still running, and every port free."""
    previous = read_state(state)
    if previous and any(running_members(pid) for _, pid in recorded_leaders(previous)):
        raise CvlabError(
            f"a local cluster from {state} is still running; stop it first: cvlab cluster local down "
            f"--state-dir {state}"
        )
    _check_port(host, ray_port, "--ray-port")
    _check_port(host, dashboard_port, "--dashboard-port")
    if mlflow_port is not None:
        _check_port(host, mlflow_port, "--mlflow-port")


_RAY_CLI = [sys.executable, "-m", "ray.scripts.scripts"]


def _start_head(info: dict, save, env: dict, logs: Path, ray_port: int, dashboard_port: int,
                head_cpus: int | None, head_gpus: int | None, timeout_s: float) -> None:
    host = info["host"]
    log.info("starting Ray head on %s:%s (dashboard %s, auth %s) ...", host, ray_port, info["dashboard"],
             info["auth"])
    head_cmd = [
        *_RAY_CLI, "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address", host, "--port", str(ray_port),
        "--dashboard-host", host, "--dashboard-port", str(dashboard_port),
        "--temp-dir", info["ray_temp_dir"],
        *_private_ports(host, head=True),
    ]  # fmt: skip
    if head_cpus is not None:
        head_cmd += ["--num-cpus", str(head_cpus)]
    if head_gpus is not None:
        head_cmd += ["--num-gpus", str(head_gpus)]
    head = _spawn(head_cmd, logs / "ray-head.log", env)
    info["processes"]["head"] = head.pid
    save()
    _wait_http(f"{info['dashboard']}/api/version", head, logs / "ray-head.log", "the Ray head", timeout_s)


def _start_worker(info: dict, save, env: dict, logs: Path, index: int, cpus: int) -> None:
    log.info("starting Ray worker node %d (%g CPU) ...", index, cpus)
    worker_cmd = [
        *_RAY_CLI, "start", "--block", "--disable-usage-stats", "--address", info["gcs_address"],
        "--node-ip-address", info["host"], "--num-cpus", str(cpus),
        *_private_ports(info["host"], head=False),
    ]  # fmt: skip
    proc = _spawn(worker_cmd, logs / f"ray-worker-{index}.log", env)
    info["processes"]["workers"].append(proc.pid)
    save()


def _start_mlflow(info: dict, save, logs: Path, port: int, artifacts: str, timeout_s: float) -> None:
    log.info("starting MLflow server on %s ...", info["mlflow"])
    mlflow_env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    mlflow_cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{Path(info['state_dir']) / 'mlflow.db'}",
        "--artifacts-destination", artifacts,
        "--host", info["host"], "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    mlflow = _spawn(mlflow_cmd, logs / "mlflow.log", mlflow_env)
    info["processes"]["mlflow"] = mlflow.pid
    save()
    _wait_http(f"{info['mlflow']}/health", mlflow, logs / "mlflow.log", "the MLflow server", timeout_s)


def _private_ports(host: str, *, head: bool) -> list[str]:
    """Ports Ray would otherwise take from fixed defaults (10001, 52365, workers 10002-19999), which
    collide between several nodes or clusters on one machine: free ones now, random worker ports."""
    ports = [
        "--dashboard-agent-listen-port",
        str(free_port(host)),
        "--min-worker-port",
        "0",
        "--max-worker-port",
        "0",
    ]
    if head:
        ports += ["--ray-client-server-port", str(free_port(host))]
    return ports


def _wait_for_nodes(dashboard: str, expected: int, timeout_s: float, auth: str, state: Path) -> None:
    """Wait until the head reports `expected` alive nodes (worker raylets register a few seconds late)."""
    headers = {}
    if auth == "token":
        headers["Authorization"] = "Bearer " + (state / "auth_token").read_text().strip()
    deadline = time.monotonic() + timeout_s
    alive = 0
    while time.monotonic() < deadline:
        try:
            req = urllib.request.Request(f"{dashboard}/nodes?view=summary", headers=headers)
            with urllib.request.urlopen(req, timeout=5) as resp:
                summary = json.loads(resp.read())["data"]["summary"]
            alive = sum(1 for node in summary if node.get("raylet", {}).get("state") == "ALIVE")
            if alive >= expected:
                return
        except (OSError, KeyError, ValueError):
            pass
        time.sleep(1)
    raise CvlabError(f"only {alive} of {expected} Ray nodes came up within {timeout_s:.0f} s (see the logs)")


def _stop_all(info: dict) -> list[str]:
    stopped = []
    for what, pid in recorded_leaders(info):
        if not pid:
            continue
        if not running_members(pid):
            continue
        killed = stop_session(pid)
        stopped.append(f"{what} (pid {pid})" + (f", {killed} process(es) killed" if killed else ""))
    return stopped


def down(state_dir: str | None = None) -> list[str]:
    """Stop the processes recorded in `<state_dir>/state.json`; returns what was stopped."""
    state = state_dir_path(state_dir)
    info = read_state(state)
    if info is None:
        raise CvlabError(f"no local cluster recorded in {state} (nothing to stop)")
    stopped = _stop_all(info)
    (state / STATE_FILE).unlink(missing_ok=True)
    return stopped


def exports(info: dict) -> list[str]:
    """Shell lines that point `cvlab`, `ray` and MLflow clients at this cluster."""
    lines = [f"export RAY_ADDRESS={info['dashboard']}"]
    if info.get("mlflow"):
        lines.append(f"export MLFLOW_TRACKING_URI={info['mlflow']}")
    if info.get("auth") == "token":
        lines += ["export RAY_AUTH_MODE=token", f"export RAY_AUTH_TOKEN_PATH={info['state_dir']}/auth_token"]
    else:
        lines.append("export RAY_AUTH_MODE=disabled")
    return lines


# ------------------------------------------------------------------------------------------------- CLI
