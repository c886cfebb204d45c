"""MLflow models of cvlab runs: a classifier as a pyfunc "model from code" (`workloads/classification/
pyfunc_model.py`), its weights as artifacts (a `torch.export` program and our checkpoint), with a signature
and an input example. `mlflow.pyfunc.load_model(uri).predict(batch)` returns class probabilities named by class;
nothing is pickled."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import workloads.classification

PYFUNC_CODE = Path(workloads.classification.__file__).with_name("pyfunc_model.py")
EXAMPLE_BATCH = 2  # > 1: torch.export keeps the batch dimension dynamic only for examples larger than 1


def log_classifier_model(tracking_uri: str, run_id: str, classifier, checkpoint_path: str, *,
                         registered_model_name: str | None = None) -> str:
    """Log `classifier` (`orchestrator.inference.classifier.Classifier`) into run `run_id` (registered when a
    name is given); returns the model URI.

    The fluent API needs an active run for the logged model to land in the run's experiment, so the run is
    re-entered for the call and left again without changing its status (the caller ends it).
    """
    import mlflow
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.tracking import fluent
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    from mlflow.types import ColSpec, Schema, TensorSpec

    from orchestrator.inference.export import export_program

    c, h, w = classifier.input_shape
    example = np.zeros((EXAMPLE_BATCH, c, h, w), dtype=np.float32)
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, c, h, w), "images")]),
                               outputs=Schema([ColSpec("float", name) for name in classifier.classes]))
    # Explicit requirements: skips MLflow's slow inference of them (it would import the model in a subprocess).
    # The project itself (its custom operator) must be installed where the model is loaded.
    requirements = [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}", "numpy",
                    "pandas"]
    with tempfile.TemporaryDirectory(prefix="cvlab-model-") as tmp:
        program = os.path.join(tmp, "model.pt2")
        with torch.no_grad():
            torch.export.save(export_program(classifier.model.eval(), torch.from_numpy(example)), program)
        with _use_tracking_uri(tracking_uri):
            mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None)
            try:
                info = mlflow.pyfunc.log_model(
                    name="model", python_model=str(PYFUNC_CODE),
                    artifacts={"program": program, "checkpoint": checkpoint_path},
                    signature=signature, input_example=example, pip_requirements=requirements,
                    registered_model_name=registered_model_name,
                )
            finally:
                # Leave the run without ending it: pop it from the fluent stack only.
                stack = fluent._active_run_stack.get()
                if stack and stack[-1].info.run_id == run_id:
                    stack.pop()
    return info.model_uri
