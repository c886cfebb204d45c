"""Finding, listing and loading the mmengine config files a workload ships (`<package>/configs/`)."""
from __future__ import annotations

import importlib
from pathlib import Path

import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope


def list_configs(config_dir: Path) -> list[str]:
    """The runnable configs under `config_dir`, relative to it (shared bases in `_base_/` left out)."""
    return sorted(str(p.relative_to(config_dir)) for p in Path(config_dir).rglob("*.py")
                  if "_base_" not in p.relative_to(config_dir).parts)


def resolve_config_path(name: str, config_dir: Path, what: str = "config") -> Path:
    """A config path as given, or a file under `config_dir` (".py" optional). `what` names the setting in
    messages (e.g. 'segmentation.config')."""
    if not name:
        example = next(iter(list_configs(config_dir)), "")
        raise ValueError(f"{what} is empty: name a config, e.g. {example!r} (see {config_dir})")
    for cand in (Path(name), config_dir / name, config_dir / f"{name}.py"):
        if cand.is_file():
            return cand.resolve()
    raise ValueError(f"{what}={name!r}: no such file (neither a path nor one of {config_dir}: "
                     f"{', '.join(list_configs(config_dir))})")


def load_config(name: str, config_dir: Path, what: str = "config"):
    """The mmengine `Config` of `name` (imports its `custom_imports`); ValueError naming the file."""
    path = resolve_config_path(name, config_dir, what)
    try:
        return Config.fromfile(str(path))
    except Exception as err:  # syntax errors, missing mmdet::/mmseg:: bases, failed custom_imports
        raise ValueError(f"cannot load config {path}: {type(err).__name__}: {err}") from err


def rewrite_key(model_cfg, key: str, rewrite) -> int:
    """Walk a model config (nested dicts and lists) and call `rewrite(parent, key)` wherever `key` occurs;
    `rewrite` changes `parent[key]` in place and returns whether it did. Returns how many it changed."""
    hits = 0
    if isinstance(model_cfg, dict):
        for k, value in model_cfg.items():
            if k == key and rewrite(model_cfg, k):
                hits += 1
            elif k != key:
                hits += rewrite_key(value, key, rewrite)
    elif isinstance(model_cfg, (list, tuple)):
        hits += sum(rewrite_key(v, key, rewrite) for v in model_cfg)
    return hits


def set_num_classes(model_cfg, n: int) -> int:
    """Set `num_classes` in every part of a model config that has one (all heads); returns how many."""

    def rewrite(parent, key) -> bool:
        parent[key] = n
        return True

    return rewrite_key(model_cfg, "num_classes", rewrite)


def apply_run_settings(cfg, section, *, work_dir: str, seed: int, log_every: int, by_epoch: bool,
                       visualizer: str) -> None:
    """What every cvlab OpenMMLab config gets from the run: log window, seed, work dir, a visualizer of a
    fixed type, then the YAML section's `overrides` (dotted mmengine keys) last."""
    cfg.log_processor = dict(type="LogProcessor", window_size=max(1, log_every), by_epoch=by_epoch)  # noqa: C408
    cfg.randomness = dict(seed=seed)  # noqa: C408
    cfg.work_dir = work_dir
    # Set without a `name`: mmengine then names the visualizer after each Runner, so several Runners can live
    # in one process (a fixed name clashes).
    cfg.visualizer = dict(type=visualizer, vis_backends=[dict(type="LocalVisBackend")])  # noqa: C408
    if section.overrides:
        cfg.merge_from_dict(dict(section.overrides))


def build_on_meta(model_cfg, scope: str):
    """Build a model config of scope 'mmdet' / 'mmseg' on the meta device (sizes and config errors only:
    no weights are allocated or initialised)."""
    registry = importlib.import_module(f"{scope}.registry").MODELS
    # Nested types (heads, losses) resolve in this scope; the process's default scope is left as it was.
    with DefaultScope.overwrite_default_scope(scope), torch.device("meta"):
        return registry.build(model_cfg)
