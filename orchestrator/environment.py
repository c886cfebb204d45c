"""`temporary_environment`: environment variables set for one block and put back afterwards, for libraries
that read a setting only from the environment (Tune's output engine, MLflow's HTTP retries)."""
from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def temporary_environment(**values: str):
    """Set `values` in os.environ for the duration of the block, then restore what was there (or nothing)."""
    old = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
