"""MLflow experiments and runs through an explicit `MlflowClient`: create, log params and metrics, end.

- the experiment is created once, on the driver, and its id is passed around (never
  `mlflow.set_experiment`, which leaks `MLFLOW_EXPERIMENT_ID` into Ray workers);
- the driver creates the run and ends it FINISHED, FAILED or KILLED; workers only log to it by run id.
"""
from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param
from mlflow.exceptions import MlflowException

from orchestrator.names import END_REASON_TAG, ERROR_TAG, EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, PARENT_RUN_TAG

log = logging.getLogger(__name__)
_PARAM_VALUE_MAX = 6000  # MLflow's limit on a param value (characters)
_BATCH = 100  # MLflow's limit on params per log_batch call


def make_client(tracking_uri: str):
    return MlflowClient(tracking_uri=tracking_uri)


def ensure_experiment(client, name: str, artifact_location: str | None = None) -> str:
    """The id of experiment `name`, created when missing (restored when deleted). Call it on the driver.

    The experiment is tagged as a model-training one (`mlflow.experimentKind`). MLflow 3.17's UI does not
    choose its view by that tag; the links of `orchestrator.tracking.server.ui_link` open the model-training view.
    """
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        experiment_id = exp.experiment_id
        if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
            client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location,
                                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
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
        tags[PARENT_RUN_TAG] = parent_run_id
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
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    client.log_batch(run_id, metrics=batch)


def best_metric_key(metric: str) -> str:
    """The name under which a run's best value of `metric` is logged: `val/top1` -> `best/val_top1`."""
    return "best/" + metric.replace("/", "_")


def log_best_metric(client, run_id: str, metric: str, mode: str = "max", step_metric: str = "epoch"
                    ) -> dict[str, float] | None:
    """Log the best value of `metric` over the run's history (`best/<metric>`) and the step that reached
    it (`best/<step_metric>`), so finished and early-stopped runs compare fairly. None without history."""
    history = [m for m in client.get_metric_history(run_id, metric) if math.isfinite(m.value)]
    if not history:
        return None
    pick = max if mode == "max" else min
    best = pick(history, key=lambda m: (m.value, -m.step) if mode == "max" else (m.value, m.step))
    values = {best_metric_key(metric): float(best.value), f"best/{step_metric}": float(best.step)}
    log_metrics(client, run_id, values, step=0)
    return values


def log_dataset(client, run_id: str, *, name: str, source: str, digest: str, profile: dict[str, Any],
                context: str = "training") -> None:
    """The run's data set as an MLflow dataset input (the UI's Dataset column): name, source, digest, sizes."""
    dataset = Dataset(name=name, digest=digest, source_type="local" if "://" not in source else
                      source.split("://", 1)[0], source=json.dumps({"uri": source}), profile=json.dumps(profile))
    client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])])


def end_run(client, run_id: str, status: str = "FINISHED", *, reason: str | None = None, error: str | None = None,
            quiet: bool = False) -> None:
    """The one way a cvlab run ends (training, evaluation, trial or search parent): FINISHED / FAILED / KILLED,
    with why in `cvlab.end_reason` and an error message in `cvlab.error`. `quiet`: a tracking server that is
    away must not hide the error being reported, so warn instead of raising."""
    try:
        if reason:
            client.set_tag(run_id, END_REASON_TAG, reason[:5000])
        if error:
            client.set_tag(run_id, ERROR_TAG, error[:5000])
        client.set_terminated(run_id, status=status)
    except Exception as err:  # noqa: BLE001 - MLflow raises many kinds (requests, sqlalchemy, MlflowException)
        if not quiet:
            raise
        log.warning("could not mark MLflow run %s %s (%s: %s)", run_id, status, type(err).__name__, err)
