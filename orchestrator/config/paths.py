"""Dotted paths of the experiment schema (`optim.lr`, `model.reduction_ratio`, ...): listing, checking, guessing.

`--set` overrides, search spaces and error messages all speak in dotted paths; this module knows which
exist and which valid one a mistyped path most likely meant.
"""
from __future__ import annotations

import difflib
import functools
import re
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel

from orchestrator.config.schema import ExperimentSpec

BASE_KEY = "_base_"
DELETE_KEY = "_delete_"
# Constructor overrides the model builders take (the models contract); used for suggestions and
# `valid_paths`. The model builder itself is the judge of what is valid.
MODEL_OVERRIDE_KEYS = (
    "kernel_size", "stem_kernel_size", "group_channels", "reduction_ratio", "channel_groups",
    "num_classes", "in_channels", "zero_init_residual", "drop_path_rate", "out_indices",
    "frozen_stages", "norm_eval",
)
# dict-valued fields whose keys are themselves dotted paths: `--set search.space.model.kernel_size=...`
# sets the key "model.kernel_size" of search.space.
DOTTED_KEY_FIELDS = {("search", "space"), ("detection", "overrides"), ("segmentation", "overrides")}

Path_ = tuple  # a dotted path as a tuple of keys


def unwrap_section(annotation: Any) -> type[BaseModel] | None:
    """The pydantic section class inside `X` or `X | None`, else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def is_mapping_type(annotation: Any) -> bool:
    if annotation in (dict, typing.Any):
        return True
    if typing.get_origin(annotation) in (dict, Mapping):
        return True
    return any(is_mapping_type(a) for a in typing.get_args(annotation) if a is not type(None))


@functools.lru_cache(maxsize=1)
def static_paths() -> tuple[str, ...]:
    """Schema paths plus the model overrides of the models contract."""
    return tuple(_schema_paths(ExperimentSpec, ()) + [f"model.{k}" for k in MODEL_OVERRIDE_KEYS])


@functools.lru_cache(maxsize=1)
def _paths_and_sections() -> frozenset[str]:
    out = set(static_paths())
    for p in static_paths():
        parts = p.split(".")
        out.update(".".join(parts[:n]) for n in range(1, len(parts)))
    return frozenset(out)


def _schema_paths(cls: type[BaseModel], prefix: Path_) -> list[str]:
    out = []
    for name, field in cls.model_fields.items():
        inner = unwrap_section(field.annotation)
        if inner is not None:
            out += _schema_paths(inner, prefix + (name,))
        else:
            out.append(".".join(prefix + (name,)))
    return out


def valid_paths(flat_spec: Mapping[str, Any] | None = None) -> list[str]:
    """Every dotted path a spec has: schema fields, model overrides and the keys of `flat_spec`
    (a flattened spec, see `orchestrator.config.loader.flatten_spec`)."""
    seen: dict[str, None] = dict.fromkeys(static_paths())
    for p in flat_spec or ():
        seen.setdefault(p, None)
    return list(seen)


def nearest_path(path: str, candidates: Iterable[str]) -> str | None:
    """The candidate most likely meant by a mistyped dotted `path`, or None when nothing is close."""
    candidates = [c for c in candidates if c != path]
    if not candidates or not isinstance(path, str) or not path:
        return None
    last = path.rsplit(".", 1)[-1]
    # Same leaf name under another section (`model.lr` -> `optim.lr`, `lr` -> `optim.lr`).
    same_leaf = [c for c in candidates if c.rsplit(".", 1)[-1] == last]
    if len(same_leaf) == 1:
        return same_leaf[0]
    close = difflib.get_close_matches(path, candidates, n=1, cutoff=0.6)
    if close:
        return close[0]
    # A typo in the leaf under the right prefix (`optim.learning_rat` -> ...).
    prefix = path.rsplit(".", 1)[0] + "." if "." in path else ""
    siblings = {c.rsplit(".", 1)[-1]: c for c in candidates if c.startswith(prefix) and "." not in c[len(prefix):]}
    close = difflib.get_close_matches(last, list(siblings), n=1, cutoff=0.5)
    return siblings[close[0]] if close else None


def suggest(unknown: str, full: str | None = None) -> str | None:
    """The valid key meant by `unknown`: a close sibling first (`optim.lrr` -> `optim.lr`, `optimizer`
    -> `optim`), else the nearest path anywhere (`model.lr` -> `optim.lr`)."""
    parent, _, leaf = unknown.rpartition(".")
    siblings = {c.rpartition(".")[2]: c for c in _paths_and_sections() if c.rpartition(".")[0] == parent}
    close = difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.6)
    if close:
        return siblings[close[0]]
    return nearest_path(full or unknown, static_paths())


def mentioned_path(text: str) -> Path_ | None:
    """The first schema path named in a message (`... data.image_size (3) ...`), for locating it in a file."""
    for word in re.findall(r"[a-z_]+(?:\.[a-z_]+)+", text):
        if word in _paths_and_sections():
            return tuple(word.split("."))
    return None
