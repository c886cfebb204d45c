"""Register our models with timm when timm is imported, without importing timm here.

`import timm` costs about 3 s on top of torch (it imports torchvision, which imports torch._dynamo), so
`import workloads.models` does not import it. Instead `install()` registers the models at once when timm is
already imported, and otherwise puts a one-shot finder on `sys.meta_path` that lets timm's own loader run and
then imports `workloads.models.timm_registry` (which registers through `timm.models.register_model`). Either
way, every `timm.create_model` / `timm.list_models` call that can happen after `import workloads.models`
sees the models.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

_REGISTRY = "workloads.models.timm_registry"


def _register() -> None:
    try:
        importlib.import_module(_REGISTRY)
    except Exception as err:  # noqa: BLE001 - never break `import timm` for code that does not need our models
        warnings.warn(f"cvolution-lab models were not registered with timm ({type(err).__name__}: {err})",
                      RuntimeWarning, stacklevel=2)


class _Loader(importlib.abc.Loader):
    """timm's loader, then the registration."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _register()

    def __getattr__(self, name):  # resource readers etc. of the real loader
        return getattr(self._loader, name)


class _TimmFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != "timm":
            return None
        uninstall()  # one-shot; also keeps find_spec below from finding this finder again
        spec = importlib.util.find_spec("timm")
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Register now if timm is imported, else as soon as it is (idempotent)."""
    timm = sys.modules.get("timm")
    if timm is not None and hasattr(timm, "create_model"):  # fully imported
        _register()
    elif timm is None and not any(isinstance(f, _TimmFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TimmFinder())


def uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _TimmFinder)]
