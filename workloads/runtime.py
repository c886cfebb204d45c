"""What every Ray Train worker settles when it starts, whatever the workload: who it is in the group (rank,
world size, local rank, node), where and how it computes (device, autocast dtype, channels-last), its log
output (`workloads.logs`: rank 0 speaks for the group) and, while it works, its node's system metrics.

    runtime = start_worker(cfg.verbosity, cfg.autocast, cfg.channels_last)
    with runtime.recording_system_metrics(cfg.system_metrics):
        ...  # with runtime.autocast(): logits = model(runtime.in_layout(images))
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import ray.train
import ray.train.torch
import torch

from workloads.logs import configure

try:  # Ray Train v2's per-worker context (private; another Ray version has no report logger to quiet)
    from ray.train.v2._internal.execution import context as _train_context
except ImportError:
    _train_context = None

_AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # None: no autocast


@dataclass(frozen=True)
class WorkerRuntime:
    """One worker's place in the group and its compute settings. The defaults: a single process on the CPU in
    fp32 (as in tests, outside Ray)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    amp_dtype: torch.dtype | None = None  # autocast dtype; None: fp32
    channels_last: bool = False  # models and image batches in channels-last memory format
    local_rank: int = 0  # within its node
    node_id: str | None = None  # "node<k>" when the run spans several nodes, else None

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self):
        """The forward pass's autocast context (disabled in fp32)."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    def in_layout(self, images):
        """`images` in this worker's memory format."""
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def place(self, model):
        """`model` on this worker's device, in its memory format."""
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    @contextmanager
    def recording_system_metrics(self, recorder) -> Iterator[None]:
        """Run `recorder` (`start(node_id)` / `stop()`, see TrainConfig.system_metrics) while the block runs,
        on each node's local rank 0 only (one recorder a node); nothing when it is None."""
        if recorder is None or self.local_rank != 0:
            yield
            return
        recorder.start(node_id=self.node_id)
        try:
            yield
        finally:
            recorder.stop()


def start_worker(verbosity: int, autocast: str = "fp32", channels_last: bool = False) -> WorkerRuntime:
    """This Ray Train worker's runtime, from Ray Train's context and the worker config's settings; configures
    its log output first. Autocast and channels-last apply on GPU only."""
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # Rank 0 speaks for the group; the others only warn.
    configure(verbosity if rank == 0 else min(verbosity, -1))
    _quiet_ray_train_reports(verbosity)
    device = ray.train.torch.get_device()
    is_cuda = device.type == "cuda"
    several_nodes = ctx.get_local_world_size() < world
    return WorkerRuntime(
        rank=rank, world=world, device=device,
        amp_dtype=_AUTOCAST_DTYPES[autocast] if is_cuda else None,
        channels_last=channels_last and is_cuda,
        local_rank=ctx.get_local_rank(),
        node_id=f"node{ctx.get_node_rank()}" if several_nodes else None,
    )


def _quiet_ray_train_reports(verbosity: int) -> None:
    """Ray logs every `ray.train.report` call with its whole metrics dict at INFO, which buries the run's own
    progress. Keep that to warnings unless `verbosity` >= 1."""
    logger = getattr(_train_context, "logger", None)
    if isinstance(logger, logging.Logger):
        logger.setLevel(logging.INFO if verbosity > 0 else logging.WARNING)
