"""MLflow models of cvlab runs: a classifier as a pyfunc "model from code" (`workloads/classification/
pyfunc_model.py`), its weights as artifacts (a `torch.export` program and our checkpoint), with a signature
and an input example. `mlflow.pyfunc.load_model(uri).predict(batch)` returns class probabilities named by class;
nothing is pickled.

Everything goes through an `MlflowClient` of the run's tracking URI (also its registry): MLflow's fluent
`log_model` would log to the process-wide tracking URI, which cvlab never sets.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.entities import LoggedModelOutput, LoggedModelStatus
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking.context.registry import resolve_tags
from mlflow.types import ColSpec, Schema, TensorSpec
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

import workloads.classification
from orchestrator.inference.export import export_program

PYFUNC_CODE = Path(workloads.classification.__file__).with_name("pyfunc_model.py")
EXAMPLE_BATCH = 2  # > 1: torch.export keeps the batch dimension dynamic only for examples larger than 1
MODEL_NAME = "model"  # the logged model's name in its run


def log_classifier_model(tracking_uri: str, run_id: str, classifier, checkpoint_path: str, *,
                         registered_model_name: str | None = None) -> str:
    """Log `classifier` (`orchestrator.inference.classifier.Classifier`) into run `run_id` (registered when a
    name is given); returns the model URI (`models:/<model id>`). The run's status is left as it is (the
    caller ends it)."""
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    run = client.get_run(run_id)
    logged = client.create_logged_model(run.info.experiment_id, name=MODEL_NAME, source_run_id=run_id,
                                        tags=resolve_tags())
    try:
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
        with tempfile.TemporaryDirectory(prefix="cvlab-model-") as tmp:
            local = os.path.join(tmp, MODEL_NAME)
            _save_pyfunc(local, classifier, checkpoint_path, tmp,
                         mlflow.models.Model(artifact_path=logged.artifact_location, run_id=run_id,
                                             model_id=logged.model_id, model_uuid=logged.model_id))
            client.log_model_artifacts(logged.model_id, local)
    except Exception:
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    model_uri = f"models:/{logged.model_id}"
    if registered_model_name:
        _register(client, registered_model_name, logged, run_id)
    return model_uri


def _save_pyfunc(path: str, classifier, checkpoint_path: str, tmp: str, mlflow_model) -> None:
    """Write the MLflow model folder: the code, the exported program, our checkpoint, signature and example."""
    c, h, w = classifier.input_shape
    example = np.zeros((EXAMPLE_BATCH, c, h, w), dtype=np.float32)
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, c, h, w), "images")]),
                               outputs=Schema([ColSpec("float", name) for name in classifier.classes]))
    # Explicit requirements: skips MLflow's slow inference of them (it would import the model in a subprocess).
    # The project itself (its custom operator) must be installed where the model is loaded.
    requirements = [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}", "numpy",
                    "pandas"]
    program = os.path.join(tmp, "model.pt2")
    with torch.no_grad():
        torch.export.save(export_program(classifier.model.eval(), torch.from_numpy(example)), program)
    mlflow.pyfunc.save_model(path, python_model=str(PYFUNC_CODE), mlflow_model=mlflow_model,
                             artifacts={"program": program, "checkpoint": checkpoint_path},
                             signature=signature, input_example=example, pip_requirements=requirements)


def _register(client, name: str, logged, run_id: str) -> None:
    """A new version of registered model `name` (created when missing) from logged model `logged`.

    Its source is the logged model's artifact location, not `models:/<model id>`: MLflow's local (sqlite)
    registry would look that URI up through the process-wide tracking URI, not this client's.
    """
    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    version = client.create_model_version(name, logged.artifact_location, run_id=run_id, model_id=logged.model_id)
    # What the UI's logged-model page lists as its registered versions.
    client.set_logged_model_tags(logged.model_id, {
        MLFLOW_MODEL_VERSIONS: json.dumps([{"name": version.name, "version": version.version}])})
