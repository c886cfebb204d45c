"""Checkpoints: our own self-describing files, and the published RedNet (mmcls) ImageNet checkpoints.

Our format is a plain dict (loadable with `torch.load(weights_only=True)`):
`{"format": "cvlab-model/1", "arch_name": str, "arch_overrides": dict, "state_dict": ..., "extra": ...}`,
so `load_checkpoint(path)` rebuilds the model from the file alone.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from workloads.distributed import unwrap

from .registry import build_model

FORMAT = "cvlab-model/1"


def _registry_model(model: nn.Module) -> nn.Module:
    """The registry model inside DDP / torch.compile wrappers."""
    model = unwrap(model)
    if not hasattr(model, "arch_name"):
        raise ValueError("model was not built by workloads.models.build_model (no arch_name attribute)")
    return model


def _check_safe(obj: Any, where: str) -> None:
    """`extra` must survive torch.load(weights_only=True): containers of primitives and tensors only."""
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)):
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_safe(v, f"{where}[{i}]")
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                msg = f"checkpoint extra: key {k!r} in {where} must be a str or int"
                raise ValueError(msg)  # noqa: TRY004 (library errors are ValueError)
            _check_safe(v, f"{where}[{k!r}]")
        return
    raise ValueError(
        f"checkpoint extra: {where} is a {type(obj).__name__}; only dict/list/tuple/str/int/float/bool/None/"
        f"tensor values can be loaded with weights_only=True"
    )


def save_checkpoint(path: str | os.PathLike, model: nn.Module, extra: dict | None = None) -> str:
    """Write the model's weights, name and overrides (+ `extra`, e.g. epoch/metrics) to `path`."""
    model = _registry_model(model)
    extra = {} if extra is None else extra
    _check_safe(extra, "extra")
    _check_safe(model.arch_overrides, "arch_overrides")
    state = model.state_dict()
    if any(v.is_meta for v in state.values()):  # before copying: .cpu() of a meta tensor fails obscurely
        raise ValueError("cannot save a model whose weights are on the meta device (no data)")
    state = {k: v.detach().cpu() for k, v in state.items()}
    payload = {"format": FORMAT, "arch_name": model.arch_name, "arch_overrides": dict(model.arch_overrides),
               "state_dict": state, "extra": extra}
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)  # never leave a half-written checkpoint behind
    return path


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model saved by `save_checkpoint` and load its weights. Returns (model, extra)."""
    payload = torch.load(os.fspath(path), map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not a cvolution-lab model checkpoint (expected format {FORMAT!r})")
    model = build_model(payload["arch_name"], **payload["arch_overrides"])
    model.load_state_dict(payload["state_dict"], strict=True)
    if map_location is not None and not callable(map_location) and not isinstance(map_location, dict):
        model.to(map_location)
    return model, payload.get("extra") or {}


# -- published RedNet checkpoints ---------------------------------------------------------------------------
_OPERATOR_PREFIX = re.compile(r"^(stem\.1|layer\d+\.\d+\.conv2)\.(.+)$")


def _published_to_ours(key: str, op_key_maps: dict[str, dict[str, str]]) -> str | None:
    """mmcls key -> our key; None for keys outside the backbone and head (e.g. `data_preprocessor.*`).

    Outside the operators the layouts are the same by construction (see backbone.py). Inside an operator the
    published mmcv ConvModule names (`conv1.conv`, `conv1.bn`, `conv2.conv`) are translated with the
    operator class's own `mmcls_key_map` (documented by workloads.ops), identity if it has none.
    """
    if key.startswith("head.fc."):
        return "fc." + key[len("head.fc."):]
    if not key.startswith("backbone."):
        return None
    key = key[len("backbone."):]
    m = _OPERATOR_PREFIX.match(key)
    if m and m.group(1) in op_key_maps:
        prefix, suffix = m.groups()
        return f"{prefix}.{op_key_maps[prefix].get(suffix, suffix)}"
    return key


def numpy_safe_globals() -> list:
    """The numpy types a checkpoint saved by mmcv 1.x / mmengine may keep in its `meta` (e.g. a best score in
    `hook_msgs`): scalars, arrays and dtypes. Allowed explicitly for weights_only loading, nothing more."""
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    allowed = [np.ndarray, np.dtype, multiarray.scalar, multiarray._reconstruct]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25 pickles dtypes through their classes
    if dtypes is not None:
        allowed += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return allowed


def read_published_file(path) -> Mapping:
    """A published (mmcls / mmcv 1.x) checkpoint file, loaded with weights_only=True and the numpy allow-list."""
    with torch.serialization.safe_globals(numpy_safe_globals()):
        return torch.load(os.fspath(path), map_location="cpu", weights_only=True)


def load_published_rednet(model: nn.Module, state_dict_or_path, strict: bool = True) -> dict[str, list[str]]:
    """Load a published RedNet ImageNet checkpoint (mmcls format) into a model from `build_model`.

    Accepts a path or a (possibly `{"state_dict": ...}`-wrapped) dict with `backbone.*` / `head.fc.*` keys.
    `strict=True` raises ValueError listing missing and unexpected keys by name and shape mismatches.
    `head.*` keys are skipped for a model without classifier (features-only detection backbones).
    BN `num_batches_tracked` buffers are optional. Returns {"missing": [...], "unexpected": [...]}.
    """
    target = _registry_model(model)
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        state_dict_or_path = read_published_file(state_dict_or_path)
    if not isinstance(state_dict_or_path, Mapping):
        msg = f"expected a state dict or a checkpoint path, got {type(state_dict_or_path).__name__}"
        raise ValueError(msg)  # noqa: TRY004
    sd = state_dict_or_path.get("state_dict", state_dict_or_path)

    ours = target.state_dict()
    op_names = set(target.operator_names()) if hasattr(target, "operator_names") else set()
    op_key_maps = {name: dict(getattr(type(m), "mmcls_key_map", None) or {})
                   for name, m in target.named_modules() if name in op_names}
    has_head = getattr(target, "fc", None) is not None
    mapped: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, value in sd.items():
        if key.startswith("head.") and not has_head:
            continue
        new = _published_to_ours(key, op_key_maps)
        if new is None or new not in ours:
            unexpected.append(key)
        else:
            mapped[new] = value
    missing = [k for k in ours if k not in mapped and not k.endswith("num_batches_tracked")]
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(ours[k].shape)}"
                  for k, v in mapped.items() if tuple(v.shape) != tuple(ours[k].shape)]
    if strict and (missing or unexpected or mismatched):
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches ({len(mismatched)}): {'; '.join(mismatched)}")
        raise ValueError(f"published checkpoint does not fit {target.arch_name}: " + " | ".join(parts))
    # Shape-mismatched entries are skipped when not strict.
    loadable = {k: v for k, v in mapped.items() if tuple(v.shape) == tuple(ours[k].shape)}
    target.load_state_dict(loadable, strict=False)
    return {"missing": missing, "unexpected": unexpected}
