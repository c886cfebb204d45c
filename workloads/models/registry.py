"""The model registry: names -> validated configs -> modules."""
from __future__ import annotations

from typing import Any

from .backbone import BottleneckNet
from .config import list_models, resolve_config

__all__ = ["build_model", "list_models", "validate_model_config"]


def validate_model_config(name: str, **overrides: Any) -> dict[str, Any]:
    """Check `name` and `overrides` against every layer without building anything.

    Returns the resolved hyperparameters (family defaults + overrides). Raises ValueError naming the bad key
    or the first layer a value does not fit, with the values that would work.
    """
    cfg = resolve_config(name, overrides)
    return {"name": cfg.name, **cfg.constructor_kwargs()}


def build_model(name: str, **overrides: Any):
    """Build `name` (see `list_models()`) with constructor overrides.

    Build under `with torch.device("meta"):` to get sizes (`count_params`, `count_flops`) without allocating
    weights. The module carries `arch_name` and `arch_overrides`, enough to rebuild it (checkpoints use them).
    """
    cfg = resolve_config(name, overrides)
    model = BottleneckNet(cfg)
    model.arch_name = cfg.name
    model.arch_overrides = dict(overrides)
    return model
