"""The MLflow model of a cvlab classifier, as MLflow "model from code": MLflow copies this file into the logged
model and runs it at `mlflow.pyfunc.load_model(...)` time (it is never imported by the project itself), so
nothing is pickled. The weights travel as the model's artifacts:

- `program`: the model exported with `torch.export` (`model.pt2`; `import workloads.ops` registers its custom
  operator, so this project must be installed where the model is loaded);
- `checkpoint`: the `workloads.models` checkpoint (`model.pt`, loaded with weights_only=True), whose extra holds
  the class names and the input settings.

`predict(images)` takes a float32 batch (B, C, H, W), normalised like the validation transform, and returns a
DataFrame of class probabilities, one column per class name.
"""
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch

import workloads.ops  # noqa: F401  (registers cvlab::involution2d for the exported program)


class ClassifierModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        payload = torch.load(context.artifacts["checkpoint"], map_location="cpu", weights_only=True)
        self.classes = [str(c) for c in payload["extra"]["classes"]]
        self.module = torch.export.load(context.artifacts["program"]).module()

    # MLflow warns about a predict() without type hints. `np.ndarray` is the tensor hint it takes silently (the
    # logged signature, not the hint, checks the input); as the signature names its tensor, MLflow passes
    # {"images": array}, but a dict hint would make MLflow warn that it cannot use it.
    def predict(self, context, model_input: np.ndarray, params: dict[str, Any] | None = None) -> pd.DataFrame:
        if isinstance(model_input, dict):  # the signature names the tensor: MLflow passes {"images": array}
            model_input = model_input["images"]
        batch = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            probs = torch.softmax(self.module(batch), dim=1).numpy()
        return pd.DataFrame(probs, columns=self.classes)


mlflow.models.set_model(ClassifierModel())
