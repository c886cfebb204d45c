# ruff: noqa: C408  (mmdet configs are written as dict(...))
"""The Ray Train worker: one mmengine `Runner` per worker, inside the process group Ray set up.

Ray's `TorchTrainer` has already called `torch.distributed.init_process_group` (gloo on CPU, nccl on GPU)
before `train_worker` runs. mmengine's Runner only calls `init_dist` when `launcher != 'none'` *and* no
default group exists (`Runner.setup_env`), so with `launcher='pytorch'` it adopts Ray's group: ranks come from
`mmengine.dist.get_dist_info()`, samplers shard by them, and the model is wrapped in
`MMDistributedDataParallel`. `launcher='none'` would make every worker train alone on the full data.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def mmengine_safe_globals() -> list:
    """What an mmengine 0.10 checkpoint pickles besides tensors: the message hub's `HistoryBuffer`s (whose
    statistics methods pickle as `getattr(buffer, "min")`), numpy arrays / scalars / dtypes, and the
    `Counter` of a MultiStepLR's milestones.

    torch >= 2.6 loads with weights_only=True and refuses them. We allow exactly these, and only inside
    `allow_mmengine_checkpoints()` around the Runner, which loads nothing but the checkpoints this run wrote
    (no global environment switch, never weights_only=False).
    """
    import builtins
    import codecs
    import collections

    import numpy as np
    from mmengine.logging import HistoryBuffer

    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    allowed = [HistoryBuffer, builtins.getattr, collections.Counter, codecs.encode, np.ndarray, np.dtype,
               multiarray.scalar, multiarray._reconstruct]
    # numpy >= 1.25 pickles dtypes through their classes (np.dtypes.Float64DType, ...).
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return allowed


@contextlib.contextmanager
def allow_mmengine_checkpoints():
    import torch

    with torch.serialization.safe_globals(mmengine_safe_globals()):
        yield


def _restore_checkpoint(work_dir: Path) -> Path | None:
    """Copy the checkpoint Ray hands a restarted (or resumed) run into work_dir; return its path."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        files = sorted(Path(d).glob("*.pth"))
        if not files:
            return None
        dst = work_dir / files[-1].name
        if not dst.exists():
            shutil.copy2(files[-1], dst)
    return dst


def train_worker(config: dict) -> None:
    """`train_loop_per_worker` of the detection TorchTrainer. `config` keys: cfg (a config dict), run_id,
    tracking_uri, log_every, log_model, params (extra MLflow params), threads (torch threads per worker)."""
    import ray.train
    import ray.train.torch
    import torch
    from mmengine.config import Config
    from mmengine.runner import Runner

    import workloads.detection.plugin  # noqa: F401  (registers our components in this process)

    from .hooks import MlflowRank0Hook, RayTrainReportHook

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    os.environ.setdefault("LOCAL_RANK", str(ctx.get_local_rank()))

    cfg = Config(config["cfg"])
    # Each node writes its own logs; checkpoints are written by rank 0 only (mmengine master_only).
    work_dir = Path(tempfile.gettempdir()) / "cvlab-det" / config["run_id"] / f"rank{rank}"
    work_dir.mkdir(parents=True, exist_ok=True)
    cfg.work_dir = str(work_dir)

    device = ray.train.torch.get_device()
    if device.type == "cuda":  # mmengine moves the model to the current CUDA device
        torch.cuda.set_device(device)
    distributed = world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
    cfg.launcher = "pytorch" if distributed else "none"
    if distributed:
        cfg.model_wrapper_cfg = dict(
            type="MMDistributedDataParallel",
            # DDP on CPU takes no device ids; on GPU the device Ray assigned to this worker.
            device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False,
            find_unused_parameters=bool(cfg.get("find_unused_parameters", False)),
        )

    resume_from = _restore_checkpoint(work_dir)
    if resume_from is not None:
        cfg.resume = True
        cfg.load_from = str(resume_from)
        print(f"[cvlab-det rank {rank}] resuming from {resume_from.name}", flush=True)

    runner = Runner.from_cfg(cfg)
    runner.register_hook(RayTrainReportHook())
    runner.register_hook(MlflowRank0Hook(config["tracking_uri"], config["run_id"],
                                         interval=config.get("log_every", 10),
                                         log_model=config.get("log_model", True),
                                         params=config.get("params")))
    with allow_mmengine_checkpoints():
        runner.train()
