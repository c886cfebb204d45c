"""The per-worker training loop of the classification workload (runs inside Ray Train workers).

`train_loop_per_worker(config)` is handed to `ray.train.torch.TorchTrainer`. `config` holds plain data:

- `spec`: the experiment spec as a dict (sections model, data, optim, precision, run, experiment);
- `data`: `train_dir`, `val_dir`, `classes`, `train_skip`, `val_skip` (paths relative to the split
  folder, found unreadable on the driver) and `skipped` (their number);
- `epoch_logger`: an object with `logged_epochs() -> set[int]` and `log_epoch(epoch, metrics)`, used by
  rank 0 only (the orchestrator passes an MLflow logger), or None.

Every epoch all workers call `ray.train.report(metrics)`; every `run.checkpoint_every` epochs and after
the last one, rank 0 attaches a checkpoint (model, optimizer, scheduler, scaler, epoch, RNG states).
Epoch metrics go to the epoch logger only after the checkpoint that covers them was reported, and epochs
already in the logger's history are skipped, so a restart from a checkpoint never logs an epoch twice.
"""
from __future__ import annotations

import math
import os
import random
import sys
import tempfile
import time
from typing import Any

MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


def _fmt_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _unwrap(model):
    return getattr(model, "module", model)


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_checkpoint(directory: str, model, optimizer, scheduler, scaler, epoch: int, extra: dict):
    """Write the model (loadable with `workloads.models.load_checkpoint`) and the training state."""
    import torch

    from workloads.models import save_checkpoint

    # Each file is written under a temporary name and renamed once complete (a process killed meanwhile
    # leaves no half-written file under the real name); the caller verifies, then publishes the folder.
    model_tmp = os.path.join(directory, MODEL_FILE + ".partial")
    save_checkpoint(model_tmp, _unwrap(model), extra={"epoch": epoch, **extra})
    os.replace(model_tmp, os.path.join(directory, MODEL_FILE))
    state_tmp = os.path.join(directory, STATE_FILE + ".partial")
    torch.save(
        {
            "epoch": epoch,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": _rng_state(),
            **extra,
        },
        state_tmp,
    )
    os.replace(state_tmp, os.path.join(directory, STATE_FILE))


def read_training_checkpoint(directory: str) -> tuple[dict, dict]:
    """Both files of a training checkpoint, loaded with weights_only: (model state dict, training state).

    ValueError naming the folder when it is unusable (truncated file, bad pickle, missing file or key).
    """
    import torch

    from workloads.models import load_checkpoint

    try:
        saved_model, _ = load_checkpoint(os.path.join(directory, MODEL_FILE), map_location="cpu")
        state = torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)
        int(state["epoch"])
    except Exception as err:  # every failure here means "this checkpoint cannot be used"
        raise ValueError(f"checkpoint {directory} is unreadable ({type(err).__name__}: {err})") from err
    return saved_model.state_dict(), state


def verify_training_checkpoint(directory: str) -> int:
    """Reload both files of a training checkpoint; returns its epoch, ValueError if unusable."""
    return int(read_training_checkpoint(directory)[1]["epoch"])


def load_training_checkpoint(directory: str, model, optimizer, scheduler, scaler) -> dict:
    """Restore what `save_training_checkpoint` wrote; returns the state dict (epoch, best_top1, ...)."""
    return _apply_training_state(read_training_checkpoint(directory), model, optimizer, scheduler, scaler)


def _apply_training_state(loaded: tuple[dict, dict], model, optimizer, scheduler, scaler) -> dict:
    model_state, state = loaded
    _unwrap(model).load_state_dict(model_state)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    _set_rng_state(state["rng"])
    return state


def _all_reduce(tensor, op: str = "sum"):
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def evaluate(model, loader, criterion, device, amp_dtype=None, channels_last=False) -> dict[str, float]:
    """Loss, top-1 and top-5 accuracy over this worker's shard, summed across all workers."""
    import torch

    net = _unwrap(model)  # no DDP collectives: shards may hold different numbers of batches
    net.eval()
    totals = torch.zeros(5, dtype=torch.float64, device=device)  # loss_sum, top1, top5, n, failures
    with torch.no_grad():
        for images, targets, failures in loader:
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits = net(images)
            logits = logits.float()
            loss = criterion(logits, targets)
            k = min(5, logits.shape[1])
            topk = logits.topk(k, dim=1).indices
            hits = topk.eq(targets[:, None])
            n = targets.shape[0]
            totals += torch.tensor(
                [loss.item() * n, hits[:, 0].sum().item(), hits.any(dim=1).sum().item(), n,
                 failures.sum().item()],
                dtype=torch.float64,
                device=device,
            )
    _all_reduce(totals)
    loss_sum, top1, top5, n, failures = totals.tolist()
    n = max(n, 1.0)
    return {"loss": loss_sum / n, "top1": top1 / n, "top5": top5 / n, "failures": failures}


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch

    from workloads.classification.data import ShardSampler, build_transforms, make_dataset
    from workloads.classification.schedule import build_optimizer, build_scheduler, scaled_lr
    from workloads.models import build_model

    spec, data = config["spec"], config["data"]
    dcfg, ocfg, pcfg, rcfg = spec["data"], spec["optim"], spec["precision"], spec["run"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    is_cuda = device.type == "cuda"
    seed = int(spec["experiment"]["seed"])
    epoch_logger = config.get("epoch_logger") if rank == 0 else None

    def say(msg: str) -> None:
        # Not print(): Ray Train patches it to go through a logger *and* the stream (lines doubled).
        if rank == 0:
            sys.stdout.write(msg + "\n")
            sys.stdout.flush()

    # Model: same initial weights on every rank (DDP broadcasts them anyway).
    _seed_everything(seed)
    overrides = dict(spec["model"])
    name = overrides.pop("name")
    overrides["num_classes"] = len(data["classes"])
    model = build_model(name, **overrides)
    channels_last = bool(pcfg["channels_last"]) and is_cuda
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)

    amp_dtype = None
    if pcfg["autocast"] != "fp32":
        if is_cuda:
            amp_dtype = torch.bfloat16 if pcfg["autocast"] == "bf16" else torch.float16
        else:
            say(f"precision.autocast={pcfg['autocast']} is used on GPU only; training in fp32 on CPU")
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    # Data: each worker reads its shard (DistributedSampler from prepare_data_loader).
    train_tf, val_tf = build_transforms(dcfg["image_size"], dcfg["val_resize"])
    train_set = make_dataset(data["train_dir"], data["classes"], data["train_skip"], train_tf)
    val_set = make_dataset(data["val_dir"], data["classes"], data["val_skip"], val_tf)
    loader_kw = {
        "batch_size": dcfg["batch_size"],
        "num_workers": dcfg["num_workers"],
        "pin_memory": is_cuda,
        "persistent_workers": dcfg["num_workers"] > 0,
    }
    train_loader = torch.utils.data.DataLoader(train_set, shuffle=True, drop_last=True, **loader_kw)
    train_loader = ray.train.torch.prepare_data_loader(train_loader)
    val_loader = torch.utils.data.DataLoader(val_set, sampler=ShardSampler(len(val_set), rank, world), **loader_kw)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ValueError(
            f"the training split ({len(train_set)} images) is smaller than one global batch "
            f"({world} workers x {dcfg['batch_size']}); lower data.batch_size"
        )

    global_batch = dcfg["batch_size"] * world
    peak_lr = scaled_lr(ocfg["lr"], global_batch, ocfg["base_batch_size"], ocfg["scale_lr"])
    optimizer = build_optimizer(model, ocfg, peak_lr)
    scheduler = build_scheduler(optimizer, ocfg, steps_per_epoch, peak_lr)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=ocfg["label_smoothing"])

    epochs = int(ocfg["epochs"])
    start_epoch, best_top1 = 1, -1.0
    skip_limit, skipped_steps = int(ocfg.get("skip_nonfinite_steps") or 0), 0
    state = _restore(ray.train.get_checkpoint(), config.get("fallback_checkpoints") or (),
                     model, optimizer, scheduler, scaler, say)
    if state is not None:
        start_epoch = int(state["epoch"]) + 1
        best_top1 = float(state.get("best_top1", -1.0))
        skipped_steps = int(state.get("skipped_steps", 0))
        say(f"resuming from the checkpoint of epoch {state['epoch']} (epoch {start_epoch} of {epochs} next)")
    if start_epoch > epochs:
        say(f"nothing to train: the checkpoint is at epoch {start_epoch - 1} and optim.epochs is {epochs}")
    logged = epoch_logger.logged_epochs() if epoch_logger is not None else set()
    pending: list[tuple[int, dict]] = []  # epoch metrics waiting for their checkpoint to be reported
    say(
        f"training {name} on {len(train_set)} images ({len(data['classes'])} classes), {world} worker(s), "
        f"global batch {global_batch}, peak lr {peak_lr:.4g}, {steps_per_epoch} steps/epoch, device {device}"
    )

    fault = _fault_plan(rcfg, config.get("fault_marker"))
    nan_at = rcfg.get("fault_nan_loss_at")
    nan_at = (int(nan_at["epoch"]), int(nan_at["step"])) if nan_at else None
    run_start = time.perf_counter()
    steps_done = 0
    for epoch in range(start_epoch, epochs + 1):
        # Per-epoch seeds make a restarted epoch see the same augmentations and shuffling.
        _seed_everything(seed + 1000 * epoch + rank)
        if hasattr(train_loader, "sampler") and hasattr(train_loader.sampler, "set_epoch"):
            train_loader.sampler.set_epoch(epoch)
        model.train()
        epoch_start = time.perf_counter()
        sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss_sum, correct, n, failures
        for step, (images, targets, failures) in enumerate(train_loader, 1):
            if fault is not None and (epoch, step, rank) == fault[:3]:
                _inject_fault(fault[3], epoch, step, rank)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits = model(images)
                loss = criterion(logits.float(), targets)
            if (epoch, step) == nan_at:
                loss = loss * float("nan")  # the run.fault_nan_loss_at drill
            loss_value = loss.item()
            if skip_limit:
                # Every rank must agree to skip, or DDP's gradient all-reduce would wait forever.
                bad = _all_reduce(torch.tensor([0.0 if math.isfinite(loss_value) else 1.0], device=device),
                                  op="max").item() > 0
            else:
                bad = not math.isfinite(loss_value)
            if bad:
                skipped_steps += 1
                who = f"on worker {rank}" if not math.isfinite(loss_value) else "on another worker"
                where = f"at epoch {epoch}, step {step} (global step {(epoch - 1) * steps_per_epoch + step}) {who}"
                if skipped_steps > skip_limit:
                    limit = f" after skipping {skip_limit} such step(s)" if skip_limit else ""
                    value = f" ({loss_value})" if not math.isfinite(loss_value) else ""
                    raise NonFiniteLossError(
                        f"non-finite training loss{value} {where}{limit}; "
                        "lower optim.lr, set optim.grad_clip or train in fp32"
                    )
                say(f"warning: non-finite training loss {where}: step skipped "
                    f"({skipped_steps} of at most {skip_limit})")
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()  # keep the lr schedule aligned with the step count
                continue
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if ocfg["grad_clip"]:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), ocfg["grad_clip"])
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()

            n = targets.shape[0]
            correct = logits.detach().argmax(1).eq(targets).sum().item()
            sums += torch.tensor([loss_value * n, correct, n, failures.sum().item()],
                                 dtype=torch.float64, device=device)
            steps_done += 1
            if rank == 0 and (step % max(1, rcfg["log_every"]) == 0 or step == steps_per_epoch):
                elapsed = time.perf_counter() - run_start
                per_step = elapsed / steps_done
                remaining = (steps_per_epoch - step) + (epochs - epoch) * steps_per_epoch
                s = sums.tolist()
                say(
                    f"epoch {epoch}/{epochs} step {step}/{steps_per_epoch} loss {s[0] / s[2]:.4f} "
                    f"acc {s[1] / s[2]:.3f} lr {optimizer.param_groups[0]['lr']:.4g} "
                    f"{s[2] * world / (time.perf_counter() - epoch_start):.1f} img/s "
                    f"ETA {_fmt_eta(per_step * remaining)}"
                )
        train_time = torch.tensor([time.perf_counter() - epoch_start], dtype=torch.float64, device=device)
        _all_reduce(sums)
        _all_reduce(train_time, op="max")
        val = evaluate(model, val_loader, criterion, device, amp_dtype, channels_last)
        loss_sum, correct, seen, train_failures = sums.tolist()
        metrics = {
            "epoch": epoch,
            "train/loss": loss_sum / max(seen, 1),
            "train/top1": correct / max(seen, 1),
            "val/loss": val["loss"],
            "val/top1": val["top1"],
            "val/top5": val["top5"],
            "lr": optimizer.param_groups[0]["lr"],
            "images_per_s": seen / max(train_time.item(), 1e-9),
            "epoch_time_s": time.perf_counter() - epoch_start,
            "data/skipped_images": float(data["skipped"] + train_failures + val["failures"]),
        }
        if skip_limit:
            metrics["train/skipped_steps"] = float(skipped_steps)
        best_top1 = max(best_top1, val["top1"])

        with tempfile.TemporaryDirectory(prefix="cvlab-ckpt-") as tmp:
            to_report = None
            if epoch % max(1, rcfg["checkpoint_every"]) == 0 or epoch == epochs:
                if rank == 0:
                    save_training_checkpoint(
                        tmp, model, optimizer, scheduler, scaler, epoch,
                        {"best_top1": best_top1, "val/top1": val["top1"], "skipped_steps": skipped_steps},
                    )
                    verify_training_checkpoint(tmp)  # publish only what reloads
                    to_report = ray.train.Checkpoint.from_directory(tmp)
                has_checkpoint = True
            else:
                has_checkpoint = False
            ray.train.report(metrics, checkpoint=to_report)

        say(
            f"epoch {epoch}/{epochs} done in {metrics['epoch_time_s']:.1f} s: train/loss {metrics['train/loss']:.4f} "
            f"val/loss {val['loss']:.4f} val/top1 {val['top1']:.4f} val/top5 {val['top5']:.4f} "
            f"{metrics['images_per_s']:.1f} img/s" + (" [checkpoint]" if has_checkpoint else "")
        )
        if epoch_logger is not None:
            pending.append((epoch, metrics))
            if has_checkpoint:
                for e, m in pending:
                    if e not in logged:
                        epoch_logger.log_epoch(e, m)
                        logged.add(e)
                pending.clear()
    if epoch_logger is not None and hasattr(epoch_logger, "flush"):
        epoch_logger.flush()  # metrics queued while the tracking server was away


def _restore(checkpoint, fallbacks, model, optimizer, scheduler, scaler, say) -> dict | None:
    """Load Ray Train's latest checkpoint; when it is unreadable, warn naming it and use the newest
    readable one among `fallbacks` (checkpoint folders, newest first). None when there is none."""
    import ray.train

    candidates = ([checkpoint] if checkpoint is not None else []) + [
        ray.train.Checkpoint(path) for path in fallbacks
        if checkpoint is None or os.path.normpath(path) != os.path.normpath(checkpoint.path)
    ]
    for ckpt in candidates:
        with ckpt.as_directory() as ckpt_dir:
            try:
                loaded = read_training_checkpoint(ckpt_dir)  # read once: verified and then applied
            except ValueError as err:
                sys.stderr.write(f"cvlab: warning: {err}; using the previous checkpoint\n")
                sys.stderr.flush()
                continue
        state = _apply_training_state(loaded, model, optimizer, scheduler, scaler)
        if ckpt is not candidates[0]:
            say(f"resuming from the previous readable checkpoint {ckpt.path} (epoch {state['epoch']})")
        return state
    if candidates:
        raise ValueError(f"no readable checkpoint to resume from (tried {[c.path for c in candidates]})")
    return None


def _fault_plan(rcfg: dict, marker: str | None):
    """`run.fault_kill_rank_at` (a fault-injection drill): (epoch, step, rank, marker) or None.

    The marker file records that the fault happened, so the restarted worker does not repeat it.
    """
    plan = rcfg.get("fault_kill_rank_at")
    if not plan or not marker or os.path.exists(marker):
        return None
    return int(plan["epoch"]), int(plan["step"]), int(plan.get("rank", 0)), marker


def _inject_fault(marker: str, epoch: int, step: int, rank: int) -> None:
    import signal

    os.makedirs(os.path.dirname(marker), exist_ok=True)
    with open(marker, "w") as fh:
        fh.write(f"killed worker {rank} (pid {os.getpid()}) at epoch {epoch} step {step}\n")
    sys.stderr.write(f"cvlab: fault drill: killing worker {rank} (pid {os.getpid()}) at epoch {epoch}, "
                     f"step {step}\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
