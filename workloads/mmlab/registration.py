"""Register one set of classes in an OpenMMLab registry (idempotent: plugins may be imported twice)."""
from __future__ import annotations


def register(registry, *classes: type) -> None:
    """Register each class under its own name; a name already taken by an unrelated class is an error."""
    for cls in classes:
        existing = registry.module_dict.get(cls.__name__)
        # The same class, or the same class from a reloaded module, is registered again.
        if existing is not None and (existing.__module__, existing.__qualname__) != (
                cls.__module__, cls.__qualname__):
            raise KeyError(f"{cls.__name__} is already registered in {registry.scope}::{registry.name} as "
                           f"{existing.__module__}.{existing.__qualname__}")
        registry.register_module(module=cls, force=existing is not None)
