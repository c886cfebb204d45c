"""Where runs are tracked: the tracking URI of a spec, whether its MLflow server answers, and the links to
its UI.

The tracking URI is always explicit: the YAML's `tracking.tracking_uri`, else `MLFLOW_TRACKING_URI`, else a
local `sqlite:///<cwd>/mlflow.db` whose artifacts go to `<cwd>/mlartifacts` (absolute paths, because Ray
workers run in other directories).
"""
from __future__ import annotations

import logging
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

from orchestrator.errors import CvlabError

log = logging.getLogger(__name__)

# MLflow 3.17's UI shows an experiment in its GenAI or its model-training view by a per-browser toggle (not by
# the experiment's `mlflow.experimentKind` tag); this URL parameter picks the model-training view.
UI_VIEW_PARAM = "workflowType=machine_learning"


def _absolute_sqlite(uri: str) -> str:
    """`sqlite:///rel/path.db` -> `sqlite:////abs/path.db` (workers do not share the driver's cwd)."""
    prefix = "sqlite:///"
    path = uri[len(prefix):]
    if path.startswith("/") or path in ("", ":memory:"):
        return uri
    return prefix + str(Path(path).absolute())


def resolve_tracking_uri(spec=None) -> str:
    """The tracking URI for a spec: YAML, else `MLFLOW_TRACKING_URI`, else local sqlite in the cwd."""
    given = spec.tracking.tracking_uri if spec is not None else None
    uri = (given or os.environ.get("MLFLOW_TRACKING_URI") or "").strip()
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
    deadline = time.monotonic() + timeout_s
    warned = False
    while True:
        try:
            check_tracking_server(tracking_uri)
            if warned:
                log.warning("MLflow tracking server %s answers again", tracking_uri)
            return
        except CvlabError as err:
            if time.monotonic() >= deadline:
                raise CvlabError(f"MLflow tracking server {tracking_uri} stayed unreachable for {timeout_s:g} s "
                                 "after training") from err
            if not warned:
                log.warning("MLflow tracking server %s is not answering; waiting up to %g s for it to log the "
                            "results", tracking_uri, timeout_s)
                warned = True
            time.sleep(interval_s)


def ui_link(tracking_uri: str, experiment_id: str | None, run_id: str | None = None) -> str | None:
    """The MLflow UI page of an experiment, or of one of its runs, in the model-training view:
    `http://HOST/#/experiments/<experiment id>[/runs/<run id>]?workflowType=machine_learning` (the list of
    experiments when `experiment_id` is None). None unless the tracking URI is an http(s) server: a sqlite file
    or a folder has no UI of its own."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    if run_id is not None and experiment_id is None:
        raise ValueError("a run's UI link needs its experiment id")
    page = "#/experiments" + (f"/{experiment_id}" if experiment_id is not None else "")
    if run_id is not None:
        page += f"/runs/{run_id}"
    return f"{tracking_uri.rstrip('/')}/{page}?{UI_VIEW_PARAM}"
