"""Collective helpers for the workers' process group (the one Ray Train sets up); outside a group they do
nothing, so the same code runs in a single process. `unwrap` gives the bare network inside the DDP wrapper."""
from __future__ import annotations

import torch.distributed as dist


def unwrap(model):
    """The network inside DDP (`.module`) and torch.compile (`._orig_mod`) wrappers; the model itself when it
    has none."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def in_group() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce(tensor, op: str = "sum"):
    """Sum (or max) a tensor over the workers' process group; unchanged outside one."""
    if in_group():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def take_rank0_buffers(module) -> None:
    """Give every worker rank 0's buffers (BatchNorm statistics) of `module` (pass the bare network, not a DDP
    wrapper). After its last training step each rank holds statistics updated by its own batch; validating
    with those would score, on each shard, a slightly different model than the one rank 0 checkpoints."""
    if in_group():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)
