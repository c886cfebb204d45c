"""MLflow tracking for cvlab runs: where to log, experiments, runs, params, epoch metrics, artifacts.

Rules this module enforces (see the project README for why):
- the tracking URI is always explicit: the YAML's `tracking.tracking_uri`, else `MLFLOW_TRACKING_URI`,
  else a local `sqlite:///<cwd>/mlflow.db` whose artifacts go to `<cwd>/mlartifacts` (absolute paths,
  because Ray workers run in other directories);
- the experiment is created once, on the driver, and its id is passed around (never
  `mlflow.set_experiment`, which leaks `MLFLOW_EXPERIMENT_ID` into Ray workers);
- the driver creates the run and ends it FINISHED or FAILED; workers only log to it by run id.

MLflow is imported inside functions so that `cvlab --help` stays fast.
"""
from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from orchestrator.errors import CvlabError

ERROR_TAG = "cvlab.error"
RAY_RUN_TAG = "cvlab.ray_run"
_PARAM_VALUE_MAX = 6000  # MLflow's limit on a param value (characters)
_BATCH = 100  # MLflow's limit on params per log_batch call


def _absolute_sqlite(uri: str) -> str:
    """`sqlite:///rel/path.db` -> `sqlite:////abs/path.db` (workers do not share the driver's cwd)."""
    prefix = "sqlite:///"
    path = uri[len(prefix):]
    if path.startswith("/") or path in ("", ":memory:"):
        return uri
    return prefix + str(Path(path).absolute())


def resolve_tracking_uri(spec) -> str:
    """The tracking URI for a spec: YAML, else `MLFLOW_TRACKING_URI`, else local sqlite in the cwd."""
    uri = (spec.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "").strip()
    if not uri:
        return "sqlite:///" + str(Path("mlflow.db").absolute())
    if uri.startswith("sqlite:///"):
        return _absolute_sqlite(uri)
    if "://" not in uri:  # a plain directory: MLflow's file store
        return Path(uri).absolute().as_uri()
    return uri


def default_artifact_location(tracking_uri: str) -> str | None:
    """For a local sqlite store: `mlartifacts/` beside the database file (absolute). Else None (server's)."""
    if tracking_uri.startswith("sqlite:///"):
        db = tracking_uri[len("sqlite:///"):]
        if db and db != ":memory:":
            return (Path(db).absolute().parent / "mlartifacts").as_uri()
    return None


def check_tracking_server(tracking_uri: str, timeout: float = 5.0) -> None:
    """Raise CvlabError when an http(s) tracking server does not answer; create a sqlite db's folder."""
    if tracking_uri.startswith(("http://", "https://")):
        url = tracking_uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                resp.read(64)
        except urllib.error.HTTPError as err:
            if err.code >= 500:
                raise CvlabError(f"MLflow tracking server {tracking_uri} answers with an error ({err}); "
                                 "the run was not started") from err
            # 4xx (e.g. no /health behind a proxy): the server is there.
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise CvlabError(
                f"MLflow tracking server {tracking_uri} is unreachable ({reason}); the run was not started. "
                "Start the server, or set tracking.tracking_uri / MLFLOW_TRACKING_URI"
            ) from err
    elif tracking_uri.startswith("sqlite:///"):
        db = tracking_uri[len("sqlite:///"):]
        if db and db != ":memory:":
            try:
                Path(db).parent.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise CvlabError(f"cannot create the folder of the MLflow database {db}: {err}") from err


def wait_for_tracking_server(tracking_uri: str, timeout_s: float = 300.0, interval_s: float = 2.0) -> None:
    """Wait (saying so once) until an http(s) tracking server answers again; CvlabError after `timeout_s`."""
    import time

    deadline = time.monotonic() + timeout_s
    warned = False
    while True:
        try:
            check_tracking_server(tracking_uri)
            if warned:
                print(f"cvlab: MLflow tracking server {tracking_uri} answers again", file=sys.stderr, flush=True)
            return
        except CvlabError as err:
            if time.monotonic() >= deadline:
                raise CvlabError(f"MLflow tracking server {tracking_uri} stayed unreachable for {timeout_s:g} s "
                                 "after training") from err
            if not warned:
                print(f"cvlab: warning: MLflow tracking server {tracking_uri} is not answering; waiting up to "
                      f"{timeout_s:g} s for it to log the results", file=sys.stderr, flush=True)
                warned = True
            time.sleep(interval_s)


def make_client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def ensure_experiment(client, name: str, artifact_location: str | None = None) -> str:
    """The id of experiment `name`, created when missing (restored when deleted). Call it on the driver."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException:
        # Someone created it between our look-up and create (UNIQUE constraint): use theirs.
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def create_run(client, experiment_id: str, run_name: str, tags: dict[str, str] | None = None,
               parent_run_id: str | None = None) -> str:
    """Create a RUNNING run (nested under `parent_run_id` when given); returns its id."""
    tags = dict(tags or {})
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    return run.info.run_id


def git_commit(path: str | os.PathLike | None = None) -> str | None:
    """The current git commit of the repository holding `path` (default: this package), or None."""
    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None


def log_params(client, run_id: str, params: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Log params that the run does not have yet; returns `{key: (old, new)}` for values that differ.

    MLflow refuses to change a logged param, so a resumed run with changed settings (e.g. more epochs)
    keeps the old value and the caller records the change elsewhere (a tag).
    """
    from mlflow.entities import Param

    existing = client.get_run(run_id).data.params
    new, changed = [], {}
    for key, value in params.items():
        text = "" if value is None else str(value)
        text = text[:_PARAM_VALUE_MAX]
        if key in existing:
            if existing[key] != text:
                changed[key] = (existing[key], text)
            continue
        new.append(Param(key, text))
    for i in range(0, len(new), _BATCH):
        client.log_batch(run_id, params=new[i:i + _BATCH])
    return changed


def logged_steps(client, run_id: str, key: str) -> set[int]:
    """The steps at which metric `key` was logged in run `run_id`."""
    return {m.step for m in client.get_metric_history(run_id, key)}


def log_metrics(client, run_id: str, metrics: dict[str, float], step: int) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    client.log_batch(run_id, metrics=batch)


class MlflowEpochLogger:
    """Logs epoch metrics (step = epoch) to one MLflow run; picklable, so it travels to Ray workers.

    `logged_epochs()` reads the run's history of `key` so a restarted or resumed run skips epochs that
    are already there.

    The tracking server may go away during a run: `log_epoch` never raises for that. Epochs that cannot
    be sent wait in a bounded queue (`max_pending` epochs; the oldest are dropped, with a warning, when it
    overflows) and are sent, in order, by the next `log_epoch` or by `flush()` once the server answers
    again. While the server is away each attempt fails fast (`request_retries` HTTP retries,
    `request_timeout_s` per request) so training is not held up; `flush(timeout_s)` at the end of training
    keeps retrying for up to `flush_timeout_s`.
    """

    def __init__(self, tracking_uri: str, run_id: str, key: str = "val/top1", skip: Iterable[str] = ("epoch",),
                 *, max_pending: int = 10000, request_retries: int = 1, request_timeout_s: float = 10.0,
                 flush_timeout_s: float = 300.0, retry_interval_s: float = 2.0):
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.key = key
        self.skip = tuple(skip)
        self.max_pending = max_pending
        self.request_retries = request_retries
        self.request_timeout_s = request_timeout_s
        self.flush_timeout_s = flush_timeout_s
        self.retry_interval_s = retry_interval_s
        self._client = None
        self._pending: list[tuple[int, dict[str, float]]] = []
        self._away_since: float | None = None
        self.dropped = 0  # epochs lost to an overflowing queue

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_client"] = None
        return state

    @property
    def client(self):
        if self._client is None:
            self._client = make_client(self.tracking_uri)
        return self._client

    @property
    def pending(self) -> list[int]:
        """Epochs waiting to be sent."""
        return [e for e, _ in self._pending]

    def _http_env(self):
        """Fail fast while the server is away (MLflow's default retries block for minutes)."""
        import contextlib

        @contextlib.contextmanager
        def env():
            names = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(self.request_retries),
                     "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(max(1, self.request_timeout_s))),
                     "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0"}
            old = {k: os.environ.get(k) for k in names}
            os.environ.update(names)
            try:
                yield
            finally:
                for k, v in old.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v

        return env()

    def _warn(self, msg: str) -> None:
        print(f"cvlab: warning: {msg}", file=sys.stderr, flush=True)

    def logged_epochs(self) -> set[int]:
        """Epochs already in the run (retried for up to `flush_timeout_s` while the server is away)."""
        import time

        deadline = time.monotonic() + self.flush_timeout_s
        while True:
            try:
                with self._http_env():
                    return logged_steps(self.client, self.run_id, self.key) | set(self.pending)
            except Exception as err:  # requests/urllib3/MlflowException: the server is not answering
                if time.monotonic() >= deadline:
                    raise CvlabError(f"MLflow tracking server {self.tracking_uri} stayed unreachable for "
                                     f"{self.flush_timeout_s:g} s: {err}") from err
                self._note_away(err)
                time.sleep(self.retry_interval_s)

    def _note_away(self, err: BaseException) -> None:
        import time

        if self._away_since is None:
            self._away_since = time.monotonic()
            first = str(err).strip().splitlines()
            self._warn(f"MLflow tracking server {self.tracking_uri} is not answering "
                       f"({type(err).__name__}: {first[-1] if first else ''}); training goes on and "
                       f"{len(self._pending)} epoch(s) of metrics wait to be sent")

    def _send_pending(self) -> bool:
        """Send queued epochs in order; True when the queue is empty afterwards."""
        while self._pending:
            epoch, metrics = self._pending[0]
            try:
                with self._http_env():
                    log_metrics(self.client, self.run_id, metrics, epoch)
            except Exception as err:  # the server is away (connection refused, timeout, 5xx)
                self._note_away(err)
                return False
            self._pending.pop(0)
            if self._away_since is not None:
                self._away_since = None
                self._say_back()
        return True

    def _say_back(self) -> None:
        print(f"cvlab: MLflow tracking server {self.tracking_uri} answers again; "
              f"sending {len(self._pending)} queued epoch(s)", file=sys.stderr, flush=True)

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """Queue the epoch's metrics and send what the server takes; never raises for an absent server."""
        self._pending.append((epoch, {k: v for k, v in metrics.items() if k not in self.skip}))
        if len(self._pending) > self.max_pending:
            lost = self._pending[: len(self._pending) - self.max_pending]
            del self._pending[: len(lost)]
            self.dropped += len(lost)
            self._warn(f"MLflow metric queue is full ({self.max_pending} epochs): dropped epoch(s) "
                       f"{[e for e, _ in lost]}")
        self._send_pending()

    def flush(self, timeout_s: float | None = None) -> bool:
        """Send every queued epoch, retrying for up to `timeout_s` (default `flush_timeout_s`).

        Returns True when all were sent; otherwise warns naming the epochs that never reached MLflow.
        """
        import time

        deadline = time.monotonic() + (self.flush_timeout_s if timeout_s is None else timeout_s)
        while not self._send_pending():
            if time.monotonic() >= deadline:
                self._warn(f"MLflow tracking server {self.tracking_uri} did not come back: the metrics of "
                           f"epoch(s) {self.pending} were not logged")
                return False
            time.sleep(self.retry_interval_s)
        return True


def log_text_artifact(client, run_id: str, text: str, artifact_file: str) -> None:
    client.log_text(run_id, text, artifact_file)


def log_dir_artifacts(client, run_id: str, local_dir: str, artifact_path: str) -> None:
    client.log_artifacts(run_id, local_dir, artifact_path)


def log_pytorch_model(tracking_uri: str, run_id: str, model, *, input_size: tuple[int, ...],
                      registered_model_name: str | None = None) -> str:
    """`mlflow.pytorch.log_model` into run `run_id` (registered when a name is given); returns the model URI.

    The fluent API needs an active run for the logged model to land in the run's experiment, so the run is
    re-entered for the call and left again without changing its status (the caller ends it).
    """
    import mlflow
    import numpy as np
    import torch
    import torchvision
    from mlflow.models import infer_signature
    from mlflow.tracking import fluent

    model = model.eval().cpu()
    example = torch.zeros(*input_size)
    with torch.no_grad():
        output = model(example).numpy()
    signature = infer_signature(np.zeros(input_size, dtype=np.float32), output)
    # Explicit requirements: skips MLflow's slow requirement inference (it imports the model in a subprocess).
    requirements = [f"torch=={torch.__version__.split('+')[0]}",
                    f"torchvision=={torchvision.__version__.split('+')[0]}"]
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _use_tracking_uri(tracking_uri):
        mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None)
        try:
            info = mlflow.pytorch.log_model(
                model, name="model", signature=signature, pip_requirements=requirements,
                registered_model_name=registered_model_name,
                serialization_format="pickle",  # pt2 (the default) needs a traceable example input
            )
        finally:
            # Leave the run without ending it: pop it from the fluent stack only.
            stack = fluent._active_run_stack.get()
            if stack and stack[-1].info.run_id == run_id:
                stack.pop()
    return info.model_uri


def end_run(client, run_id: str, status: str = "FINISHED", error: str | None = None) -> None:
    """End the run FINISHED / FAILED / KILLED; an error message goes into the `cvlab.error` tag."""
    if error:
        client.set_tag(run_id, ERROR_TAG, error[:5000])
    client.set_terminated(run_id, status=status)
