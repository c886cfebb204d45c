"""Load mmengine (and mmcv 1.x / mmcls 0.x) checkpoints under torch's weights_only=True.

torch >= 2.6 loads with weights_only=True and refuses what these files pickle besides tensors. We allow
exactly those objects, and only inside `allow_mmengine_checkpoints()` (no global switch, never
weights_only=False).
"""
from __future__ import annotations

import builtins
import codecs
import collections
import contextlib

import torch
from mmengine.logging import HistoryBuffer

from workloads.models.checkpoint import numpy_safe_globals


def mmengine_safe_globals() -> list:
    """What an mmengine 0.10 checkpoint pickles besides tensors: the message hub's `HistoryBuffer`s (whose
    statistics methods pickle as `getattr(buffer, "min")`), numpy arrays / scalars / dtypes (also in the
    `meta` of mmcv 1.x checkpoints), and the `Counter` of a MultiStepLR's milestones."""
    return [HistoryBuffer, builtins.getattr, collections.Counter, codecs.encode, *numpy_safe_globals()]


@contextlib.contextmanager
def allow_mmengine_checkpoints():
    with torch.serialization.safe_globals(mmengine_safe_globals()):
        yield


def load_checkpoint_file(path, map_location="cpu"):
    """`torch.load(path, weights_only=True)` with the mmengine allow-list."""
    with allow_mmengine_checkpoints():
        return torch.load(str(path), map_location=map_location, weights_only=True)
