"""The per-worker training loop of the classification workload (runs inside Ray Train workers).

`train_loop_per_worker(cfg)` is handed to `ray.train.torch.TorchTrainer` with a frozen
`workloads.classification.config.TrainConfig`. It runs in named steps:

- set-up (`EpochTrainer.__init__`): the worker runtime (`workloads.runtime`), model, data loaders, optimizer,
  schedule, step hooks;
- `restore()`: Ray Train's latest checkpoint (or an older readable one) when the run restarts or resumes;
- per epoch: `train_one_epoch()`, `evaluate()` (the whole validation set, summed across workers, with
  `cvlab eval`'s `evaluation.evaluate_shard`), then
  `checkpoint_and_report()`: every worker calls `ray.train.report(metrics)`; every `checkpoint_every` epochs
  and after the last, rank 0 attaches a checkpoint.

Epoch metrics go to the epoch logger (rank 0) only after the checkpoint that covers them was reported, and
epochs already in the logger's history are skipped, so a restart never logs an epoch twice.
"""
from __future__ import annotations

import dataclasses
import logging
import tempfile
import time

import ray.train
import ray.train.torch
import torch

from workloads.classification.checkpoint import (
    apply_training_state,
    read_training_checkpoint,
    save_training_checkpoint,
)
from workloads.checkpoint_transfer import opened, report_with_retries
from workloads.classification.config import ShardPlan, TrainConfig
from workloads.classification.data import ShardSampler, split_dataset
from workloads.classification.ema import create_ema, ema_state_dict, load_ema_state_dict, update_ema
from workloads.classification.evaluation import evaluate_shard, summarize_totals
from workloads.classification.hooks import KillDrill, NanDrill, NonFiniteLossPolicy, StepHook
from workloads.classification.mixup import build_mixup, build_train_criterion
from workloads.classification.reproducibility import seed_everything
from workloads.classification.schedule import build_optimizer, build_scheduler, scaled_lr
from workloads.classification.transforms import build_train_transform, build_val_transform
from workloads.distributed import all_reduce, take_rank0_buffers, unwrap
from workloads.models import build_model
from workloads.runtime import start_worker

log = logging.getLogger(__name__)


def train_loop_per_worker(cfg: TrainConfig) -> None:
    EpochTrainer(cfg).fit()


def _fmt_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class EpochPublisher:
    """Rank 0's hand-off of epoch metrics to the epoch logger: an epoch is published once the checkpoint
    covering it was reported, and never twice (epochs already in the logger's history are skipped)."""

    def __init__(self, logger):
        self.logger = logger
        self.logged = logger.logged_epochs() if logger is not None else set()
        self.pending: list[tuple[int, dict]] = []

    def add(self, epoch: int, metrics: dict, checkpointed: bool) -> None:
        if self.logger is None:
            return
        self.pending.append((epoch, metrics))
        if checkpointed:
            for e, m in self.pending:
                if e not in self.logged:
                    self.logger.log_epoch(e, m)
                    self.logged.add(e)
            self.pending.clear()

    def note(self, epoch: int, metrics: dict) -> None:
        """Metrics about the attempt itself (e.g. where it resumed), logged at once at step `epoch`."""
        if self.logger is not None:
            self.logger.log_epoch(epoch, metrics)

    def close(self) -> None:
        if self.logger is not None and hasattr(self.logger, "flush"):
            self.logger.flush()  # metrics queued while the tracking server was away


class EpochTrainer:
    """One worker's training state and its named steps (see the module docstring)."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.runtime = runtime = start_worker(cfg.verbosity, cfg.autocast, cfg.channels_last)

        # Model: same initial weights on every rank (DDP broadcasts them anyway).
        seed_everything(cfg.seed)
        model = build_model(cfg.model_name, **cfg.model_overrides)
        self.model = ray.train.torch.prepare_model(runtime.place(model))
        if cfg.autocast != "fp32" and runtime.amp_dtype is None:
            log.info("precision.autocast=%s is used on GPU only; training in fp32 on CPU", cfg.autocast)
        self.scaler = torch.amp.GradScaler("cuda", enabled=runtime.amp_dtype == torch.float16)

        # Data: each worker reads its share: of a folder through a DistributedSampler (prepare_data_loader), of a
        # shard set as its own stream (which a new loader process per epoch reads with the epoch's order).
        data = cfg.data
        streamed = isinstance(data, ShardPlan)
        share = {"rank": runtime.rank, "world": runtime.world}
        self.train_set = split_dataset(data, "train", build_train_transform(cfg.inputs, cfg.augment), **share,
                                       batch=cfg.batch_size, seed=cfg.seed)
        val_set = split_dataset(data, "val", build_val_transform(cfg.inputs), **share)
        self.train_images = data.train_images if streamed else len(self.train_set)
        loader_kw = {"batch_size": cfg.batch_size, "num_workers": cfg.loader_workers,
                     "pin_memory": runtime.is_cuda, "persistent_workers": cfg.loader_workers > 0 and not streamed}
        train_loader = torch.utils.data.DataLoader(self.train_set, shuffle=not streamed, drop_last=True, **loader_kw)
        self.train_loader = ray.train.torch.prepare_data_loader(train_loader, add_dist_sampler=not streamed)
        sampler = None if streamed else ShardSampler(len(val_set), runtime.rank, runtime.world)
        self.val_loader = torch.utils.data.DataLoader(val_set, sampler=sampler, **loader_kw)
        self.steps_per_epoch = len(self.train_loader)
        if self.steps_per_epoch == 0:
            raise ValueError(f"the training split ({self.train_images} images) is smaller than one global batch "
                             f"({runtime.world} workers x {cfg.batch_size}); lower data.batch_size")

        o = cfg.optim
        self.global_batch = cfg.batch_size * runtime.world
        self.peak_lr = scaled_lr(o.lr, self.global_batch, o.base_batch_size, o.scale_lr)
        self.optimizer = build_optimizer(self.model, o, self.peak_lr)
        self.scheduler = build_scheduler(self.optimizer, o, self.steps_per_epoch, self.peak_lr)
        # Training loss: soft targets when batches are mixed; validation always on the true labels.
        self.mixup = build_mixup(cfg.augment, len(data.classes), o.label_smoothing)
        self.train_criterion = build_train_criterion(cfg.augment, o.label_smoothing)
        self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=o.label_smoothing)
        self.ema = create_ema(self.model, o.ema_decay)  # an average of the weights, validated too
        self.optimizer_steps = 0

        self.nonfinite = NonFiniteLossPolicy(o.skip_nonfinite_steps, self.steps_per_epoch, runtime.rank,
                                             agree=self._any_worker)
        self.hooks: list[StepHook] = [self.nonfinite]
        f = cfg.faults
        if f.kill_at is not None and f.kill_marker:
            self.hooks.insert(0, KillDrill(*f.kill_at, marker=f.kill_marker, my_rank=runtime.rank))
        if f.nan_at is not None:
            self.hooks.insert(0, NanDrill(*f.nan_at))
        self.publisher = EpochPublisher(cfg.epoch_logger if runtime.rank == 0 else None)
        self.start_epoch, self.best_top1 = 1, -1.0
        self.steps_done = 0  # by this worker process: a restart from a checkpoint runs fewer

    def _any_worker(self, bad: bool) -> bool:
        flag = torch.tensor([1.0 if bad else 0.0], device=self.runtime.device)
        return all_reduce(flag, op="max").item() > 0

    # ---- restore
    def restore(self) -> None:
        """Continue from Ray Train's latest checkpoint; when it is unreadable, warn naming it and use the newest
        readable one among `fallback_checkpoints`. Nothing to do on a fresh run."""
        latest = ray.train.get_checkpoint()
        candidates = ([latest] if latest is not None else []) + [
            ray.train.Checkpoint(path) for path in self.cfg.fallback_checkpoints
            if latest is None or path.rstrip("/") != latest.path.rstrip("/")
        ]
        for ckpt in candidates:
            with opened(ckpt, self.cfg.storage_retry_limit_s) as ckpt_dir:
                try:
                    loaded = read_training_checkpoint(ckpt_dir)  # read once: verified and then applied
                except ValueError as err:
                    log.warning("%s; using the previous checkpoint", err)
                    continue
            state = apply_training_state(loaded, self.model, self.optimizer, self.scheduler, self.scaler)
            if ckpt is not candidates[0]:
                log.info("resuming from the previous readable checkpoint %s (epoch %s)", ckpt.path, state["epoch"])
            self.start_epoch = int(state["epoch"]) + 1
            self.best_top1 = float(state.get("best_top1", -1.0))
            self.nonfinite.skipped = int(state.get("skipped_steps", 0))
            self.optimizer_steps = int(state.get("optimizer_steps", 0))
            if self.ema is not None:
                if "ema" not in state:
                    raise ValueError(f"optim.ema_decay is set but the checkpoint {ckpt.path} holds no EMA weights "
                                     "(it was trained without); resume with the settings it was trained with")
                load_ema_state_dict(self.ema, state["ema"])
            log.info("resuming from the checkpoint of epoch %s (epoch %d of %d next)", state["epoch"],
                     self.start_epoch, self.cfg.optim.epochs)
            self.publisher.note(self.start_epoch, {"train/resumed_from_epoch": float(state["epoch"])})
            return
        if candidates:
            raise ValueError(f"no readable checkpoint to resume from (tried {[c.path for c in candidates]})")

    # ---- one epoch of training
    def train_one_epoch(self, epoch: int, run_start: float) -> dict[str, float]:
        cfg, device = self.cfg, self.runtime.device
        # Per-epoch seeds make a restarted epoch see the same augmentations and shuffling.
        seed_everything(cfg.seed + 1000 * epoch + self.runtime.rank)
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        if hasattr(self.train_set, "set_epoch"):  # a shard stream: the epoch's order of the shards
            self.train_set.set_epoch(epoch)
        self.model.train()
        epoch_start = time.perf_counter()
        sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss_sum, correct, n, failures
        for step, (images, targets, failures) in enumerate(self.train_loader, 1):
            stepped = self.train_step(epoch, step, images, targets)
            if stepped is None:
                continue
            loss_value, correct = stepped
            n = targets.shape[0]
            sums += torch.tensor([loss_value * n, correct, n, failures.sum().item()], dtype=torch.float64,
                                 device=device)
            self.steps_done += 1
            if step % cfg.log_every == 0 or step == self.steps_per_epoch:
                self._progress(epoch, step, sums.tolist(), epoch_start, run_start)
        train_time = torch.tensor([time.perf_counter() - epoch_start], dtype=torch.float64, device=device)
        all_reduce(sums)
        all_reduce(train_time, op="max")
        loss_sum, correct, seen, failures = sums.tolist()
        return {"train/loss": loss_sum / max(seen, 1), "train/top1": correct / max(seen, 1),
                "images_per_s": seen / max(train_time.item(), 1e-9), "failures": failures,
                "epoch_start": epoch_start}

    def train_step(self, epoch: int, step: int, images, targets) -> tuple[float, int] | None:
        """One optimisation step around the step hooks: (loss, correct predictions), or None when a hook
        skipped it (no parameter update; the lr schedule still advances)."""
        for hook in self.hooks:
            hook.before_step(epoch, step)
        labels = targets  # the true classes; with mixup `targets` become soft labels
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        with self.runtime.autocast():
            logits = self.model(self.runtime.in_layout(images))
            loss = self.train_criterion(logits.float(), targets)
        for hook in self.hooks:
            loss = hook.on_loss(epoch, step, loss)
        loss_value = loss.item()
        if any(hook.skip_step(epoch, step, loss_value) for hook in self.hooks):
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()  # keep the lr schedule aligned with the step count
            return None
        self._update(loss)
        return loss_value, logits.detach().argmax(1).eq(labels).sum().item()

    def _update(self, loss) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.optim.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer_steps += 1
        update_ema(self.ema, self.model, self.optimizer_steps)

    def _progress(self, epoch: int, step: int, sums: list[float], epoch_start: float, run_start: float) -> None:
        epochs, spe = self.cfg.optim.epochs, self.steps_per_epoch
        per_step = (time.perf_counter() - run_start) / max(self.steps_done, 1)
        remaining = (spe - step) + (epochs - epoch) * spe
        loss_sum, correct, n = sums[:3]
        log.info("epoch %d/%d step %d/%d loss %.4f acc %.3f lr %.4g %.1f img/s ETA %s", epoch, epochs, step, spe,
                 loss_sum / max(n, 1), correct / max(n, 1), self.optimizer.param_groups[0]["lr"],
                 n * self.runtime.world / (time.perf_counter() - epoch_start), _fmt_eta(per_step * remaining))

    # ---- evaluation
    def evaluate(self, model=None) -> dict[str, float]:
        """Loss, top-1 and top-5 over the whole validation split, summed across workers (exact, not an average
        of per-worker averages); only the totals are all-reduced."""
        model = model or self.model
        take_rank0_buffers(unwrap(model))  # the statistics rank 0 checkpoints
        totals, _, _ = evaluate_shard(model, self.val_loader, len(self.cfg.data.classes), self.criterion,
                                      self.runtime)
        return summarize_totals(all_reduce(totals))

    # ---- checkpoint and report
    def checkpoint_and_report(self, epoch: int, metrics: dict[str, float]) -> bool:
        """Report the epoch to Ray Train (with rank 0's checkpoint when one is due); True when checkpointed."""
        cfg = self.cfg
        due = epoch % cfg.checkpoint_every == 0 or epoch == cfg.optim.epochs
        with tempfile.TemporaryDirectory(prefix="cvlab-ckpt-") as tmp:
            checkpoint = None
            if due and self.runtime.rank == 0:
                info = {"best_top1": self.best_top1, "val/top1": metrics["val/top1"], "classes": list(cfg.data.classes),
                        "inputs": dataclasses.asdict(cfg.inputs)}  # what predict / export need to feed it
                extra = {**info, "skipped_steps": self.nonfinite.skipped, "optimizer_steps": self.optimizer_steps}
                if self.ema is not None:
                    extra["ema"] = ema_state_dict(self.ema)
                save_training_checkpoint(tmp, self.model, self.optimizer, self.scheduler, self.scaler, epoch, extra,
                                         model_info=info)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            report_with_retries(metrics, checkpoint, cfg.storage_retry_limit_s)
        self.publisher.add(epoch, metrics, checkpointed=due)
        return due

    # ---- the whole loop
    def fit(self) -> None:
        with self.runtime.recording_system_metrics(self.cfg.system_metrics):
            self._fit()

    def _fit(self) -> None:
        cfg = self.cfg
        epochs = cfg.optim.epochs
        self.restore()
        if self.start_epoch > epochs:
            log.info("nothing to train: the checkpoint is at epoch %d and optim.epochs is %d", self.start_epoch - 1,
                     epochs)
        log.info("training %s on %d images (%d classes), %d worker(s), global batch %d, peak lr %.4g, %d steps/epoch, "
                 "device %s", cfg.model_name, self.train_images, len(cfg.data.classes), self.runtime.world,
                 self.global_batch, self.peak_lr, self.steps_per_epoch, self.runtime.device)
        run_start = time.perf_counter()
        for epoch in range(self.start_epoch, epochs + 1):
            train = self.train_one_epoch(epoch, run_start)
            val = self.evaluate()
            ema_val = self.evaluate(self.ema.module) if self.ema is not None else None
            self.best_top1 = max(self.best_top1, val["top1"])
            metrics = {
                "epoch": epoch,
                "train/loss": train["train/loss"],
                "train/top1": train["train/top1"],
                "val/loss": val["loss"],
                "val/top1": val["top1"],
                "val/top5": val["top5"],
                "lr": self.optimizer.param_groups[0]["lr"],
                "images_per_s": train["images_per_s"],
                "epoch_time_s": time.perf_counter() - train["epoch_start"],
                "data/skipped_images": float(cfg.data.skipped + train["failures"] + val["failures"]),
                "train/steps_this_attempt": float(self.steps_done),
            }
            if cfg.optim.skip_nonfinite_steps:
                metrics["train/skipped_steps"] = float(self.nonfinite.skipped)
            if ema_val is not None:
                metrics.update({"val_ema/loss": ema_val["loss"], "val_ema/top1": ema_val["top1"],
                                "val_ema/top5": ema_val["top5"]})
            checkpointed = self.checkpoint_and_report(epoch, metrics)
            log.info("epoch %d/%d done in %.1f s: train/loss %.4f val/loss %.4f val/top1 %.4f val/top5 %.4f "
                     "%.1f img/s%s", epoch, epochs, metrics["epoch_time_s"], metrics["train/loss"], val["loss"],
                     val["top1"], val["top5"], metrics["images_per_s"], " [checkpoint]" if checkpointed else "")
        self.publisher.close()

