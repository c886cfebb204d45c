"""A trained classifier ready to use: the model, its class names and the input settings it was trained with."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from orchestrator.config.schema import DataSection
from orchestrator.errors import CvlabError
from orchestrator.inference.sources import read_classifier
from workloads.classification.recipe import InputConfig
from workloads.models import build_model

log = logging.getLogger(__name__)


@dataclass
class Classifier:
    model: Any  # torch.nn.Module, eval mode, on the CPU
    name: str  # registry name, e.g. cednet26
    classes: list[str]
    inputs: InputConfig

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.inputs.channels, self.inputs.image_size, self.inputs.image_size


def load_classifier(source) -> Classifier:
    """The classifier of a resolved source (`orchestrator.inference.sources.Source`) in the cvlab format."""
    name, overrides, state_dict, extra = read_classifier(source)
    model = build_model(name, **overrides)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise CvlabError(f"{source.given}: the weights do not fit {name}: {str(err).splitlines()[0]}") from err
    num_classes = overrides.get("num_classes", 1000)
    classes = [str(c) for c in extra.get("classes") or []]
    if len(classes) != num_classes:
        log.warning("%s stores no class names; calling them class_0 .. class_%d", source.given, num_classes - 1)
        classes = [f"class_{i}" for i in range(num_classes)]
    stored = dict(extra.get("inputs") or {})
    if not stored:
        log.warning("%s stores no input settings; assuming 224 px ImageNet normalisation", source.given)
    # The worker's InputConfig as the checkpoint recorded it (dataclasses.asdict), checked by the schema, whose
    # defaults (224 px, ImageNet normalisation) stand in for a file from before the inputs were recorded.
    data = DataSection.model_validate(stored)
    inputs = InputConfig(mean=tuple(data.mean), std=tuple(data.std), grayscale=data.grayscale,
                         interpolation=data.interpolation, image_size=data.image_size, val_resize=data.val_resize)
    return Classifier(model=model.eval(), name=name, classes=classes, inputs=inputs)
