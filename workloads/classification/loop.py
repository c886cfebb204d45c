"""The per-worker training loop of the classification workload (runs inside Ray Train workers).

`train_loop_per_worker(cfg)` is handed to `ray.train.torch.TorchTrainer` with a frozen
`workloads.classification.config.TrainConfig`. It runs in named steps:

- set-up (`EpochTrainer.__init__`): the worker runtime (`workloads.runtime`), model, data loaders, optimizer,
  schedule, step hooks;
- `restore()`: Ray Train's latest checkpoint (or an older readable one) when the run restarts or resumes;
- per epoch: `train_one_epoch()` (in the step-exact order of `step_order` for a worker range or
  `run.checkpoint_every_steps`: gradient accumulation over the range's `max` micro-batches per step, checkpoints
  inside the epoch, and one when Ray Train passes on a preemption notice), `evaluate()` (the whole validation
  set, summed across workers, with `cvlab eval`'s `evaluation.evaluate_shard`), then
  `checkpoint_and_report()`: every worker calls `ray.train.report(metrics)`; every `checkpoint_every` epochs
  and after the last, rank 0 attaches a checkpoint.

Epoch metrics go to the epoch logger (rank 0) only after the checkpoint that covers them was reported, and
epochs already in the logger's history are skipped, so a restart never logs an epoch twice.
"""
from __future__ import annotations

import contextlib
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
from workloads.classification.step_order import GlobalBatchOrder, SeededSamples, StepBatchSampler, derived_seed
from workloads.classification.transforms import build_train_transform, build_val_transform
from workloads.distributed import all_reduce, take_rank0_buffers, unwrap
from workloads.mid_epoch import MID_EPOCH_KEY, UNRANKED_SCORE, PreemptionWatch
from workloads.models import build_model
from workloads.runtime import start_worker

log = logging.getLogger(__name__)

# How long the kill drill waits in the step-exact order, so the step checkpoint before it is registered (Ray
# Train's controller collects reports every 2 s).
_SETTLE_S = 3.0


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
            self.covered()

    def covered(self) -> None:
        """A checkpoint covering the pending epochs was reported: publish them."""
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
        # Micro-batches per optimizer step (this worker's) and in all (the global batch's): 1 and `world`, except
        # in the step-exact order, where the global batch is always the one of the range's `max` workers.
        self.order = None
        if cfg.step_exact is None:
            train_loader = torch.utils.data.DataLoader(self.train_set, shuffle=not streamed, drop_last=True,
                                                       **loader_kw)
            self.micro_per_step, self.slots = 1, runtime.world
        else:
            self.order = GlobalBatchOrder(len(self.train_set), cfg.batch_size, cfg.step_exact.slots, cfg.seed)
            self.step_sampler = StepBatchSampler(self.order, runtime.rank, runtime.world)
            train_loader = torch.utils.data.DataLoader(
                SeededSamples(self.train_set), batch_sampler=self.step_sampler,
                **{k: v for k, v in loader_kw.items() if k != "batch_size"})
            self.micro_per_step, self.slots = self.step_sampler.per_step, cfg.step_exact.slots
        self.train_loader = ray.train.torch.prepare_data_loader(
            train_loader, add_dist_sampler=not streamed and self.order is None)
        sampler = None if streamed else ShardSampler(len(val_set), runtime.rank, runtime.world)
        self.val_loader = torch.utils.data.DataLoader(val_set, sampler=sampler, **loader_kw)
        self.steps_per_epoch = (len(self.train_loader) if self.order is None else self.order.steps_per_epoch)
        if self.steps_per_epoch == 0:
            raise ValueError(f"the training split ({self.train_images} images) is smaller than one global batch "
                             f"({self.slots} workers x {cfg.batch_size}); lower data.batch_size")

        o = cfg.optim
        self.global_batch = cfg.batch_size * self.slots
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
            self.hooks.insert(0, KillDrill(*f.kill_at, marker=f.kill_marker, my_rank=runtime.rank,
                                           signal_name=f.kill_signal, settle_s=_SETTLE_S if cfg.step_exact else 0.0))
        if f.nan_at is not None:
            self.hooks.insert(0, NanDrill(*f.nan_at))
        self.publisher = EpochPublisher(cfg.epoch_logger if runtime.rank == 0 else None)
        self.start_epoch, self.best_top1 = 1, -1.0
        self.start_step = 0  # optimizer steps of start_epoch already done (a checkpoint inside an epoch)
        self.restored_sums: list[float] | None = None  # that epoch's totals so far, added by rank 0
        self.steps_done = 0  # by this worker process: a restart from a checkpoint runs fewer
        # Resizes of the worker group and checkpoints written on a preemption notice, over the whole run.
        self.counters = {"resizes": 0, "preemption_checkpoints": 0}
        self.preemption = PreemptionWatch()

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
            self._restore_position(ckpt.path, state)
            self.best_top1 = float(state.get("best_top1", -1.0))
            self.nonfinite.skipped = int(state.get("skipped_steps", 0))
            self.optimizer_steps = int(state.get("optimizer_steps", 0))
            if self.ema is not None:
                if "ema" not in state:
                    raise ValueError(f"optim.ema_decay is set but the checkpoint {ckpt.path} holds no EMA weights "
                                     "(it was trained without); resume with the settings it was trained with")
                load_ema_state_dict(self.ema, state["ema"])
            notes = {"train/resumed_from_epoch": float(state["epoch"]),
                     "train/resumed_from_step": float((self.start_epoch - 1) * self.steps_per_epoch + self.start_step)}
            if self.start_step:
                log.info("resuming inside epoch %d after step %d of %d", self.start_epoch, self.start_step,
                         self.steps_per_epoch)
            else:
                log.info("resuming from the checkpoint of epoch %s (epoch %d of %d next)", state["epoch"],
                         self.start_epoch, self.cfg.optim.epochs)
            self.publisher.note(self.start_epoch, notes)
            return
        if candidates:
            raise ValueError(f"no readable checkpoint to resume from (tried {[c.path for c in candidates]})")

    def _restore_position(self, path: str, state: dict) -> None:
        """Where training goes on: the next epoch, or (a checkpoint written inside an epoch) the next step of
        the same one, with that epoch's totals so far; counts a resize when the worker count changed."""
        position = state.get("position")
        if position is None:
            self.start_epoch, self.start_step = int(state["epoch"]) + 1, 0
        elif self.order is None:
            raise ValueError(f"the checkpoint {path} was written inside epoch {position['epoch']} (step-exact "
                             "order); resume with the scaling.num_workers range or run.checkpoint_every_steps it "
                             "was trained with")
        else:
            self.start_epoch, self.start_step = int(position["epoch"]), int(position["step"])
            self.restored_sums = [float(v) for v in position["sums"]]
        self.counters = {k: int(state.get(k, 0)) for k in self.counters}
        world_then = int(state.get("world_size", self.runtime.world))
        if world_then != self.runtime.world:
            self.counters["resizes"] += 1
            log.info("the worker group was resized: %d worker(s) now, %d when the checkpoint was written",
                     self.runtime.world, world_then)

    # ---- one epoch of training
    def train_one_epoch(self, epoch: int, run_start: float, start_step: int = 0) -> dict[str, float]:
        cfg, device = self.cfg, self.runtime.device
        rank = self.runtime.rank
        # Per-epoch seeds make a restarted epoch see the same augmentations and shuffling; the step-exact order
        # seeds every step (and every sample) instead, so it can restart at any step.
        seed_everything(cfg.seed + 1000 * epoch + rank)
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        if hasattr(self.train_set, "set_epoch"):  # a shard stream: the epoch's order of the shards
            self.train_set.set_epoch(epoch)
        if self.order is not None:
            self.step_sampler.set_position(epoch, start_step)
        self.model.train()
        epoch_start = time.perf_counter()
        sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss_sum, correct, n, failures
        restored_seen = 0.0  # images of this epoch trained before a restart (not in this attempt's throughput)
        if self.restored_sums is not None:
            if rank == 0:  # the epoch's totals before the restart, counted once
                sums += torch.tensor(self.restored_sums, dtype=torch.float64, device=device)
            restored_seen, self.restored_sums = self.restored_sums[2], None
        step, micro = start_step, []
        for batch in self.train_loader:
            micro.append(batch)
            if len(micro) < self.micro_per_step:
                continue
            step += 1
            if self.order is not None:
                seed_everything(derived_seed(cfg.seed, epoch, step, rank))
            stepped = self.train_step(epoch, step, micro)
            micro = []
            if stepped is not None:
                sums += torch.tensor(stepped, dtype=torch.float64, device=device)
                self.steps_done += 1
                if step % cfg.log_every == 0 or step == self.steps_per_epoch:
                    self._progress(epoch, step, sums.tolist(), epoch_start, run_start)
            if self.order is not None and step < self.steps_per_epoch:
                self._checkpoint_inside_epoch_if_due(epoch, step, sums)
        train_time = torch.tensor([time.perf_counter() - epoch_start], dtype=torch.float64, device=device)
        all_reduce(sums)
        all_reduce(train_time, op="max")
        loss_sum, correct, seen, failures = sums.tolist()
        return {"train/loss": loss_sum / max(seen, 1), "train/top1": correct / max(seen, 1),
                "images_per_s": (seen - restored_seen) / max(train_time.item(), 1e-9), "failures": failures,
                "epoch_start": epoch_start}

    def train_step(self, epoch: int, step: int, micro_batches: list) -> list[float] | None:
        """One optimisation step over this worker's micro-batches `(images, targets, failures)` of the step,
        around the step hooks: this worker's [loss sum, correct predictions, images, load failures], or None
        when a hook skipped it (no parameter update; the lr schedule still advances).

        Gradients of all but the last micro-batch accumulate locally (DDP's `no_sync`); the last one's backward
        all-reduces them. Each loss is scaled by world / slots, so DDP's average over the workers is the mean
        over the global batch's micro-batches, whatever the number of workers."""
        for hook in self.hooks:
            hook.before_step(epoch, step)
        self.optimizer.zero_grad(set_to_none=True)
        scale = self.runtime.world / self.slots
        totals = [0.0, 0.0, 0.0, 0.0]
        last = len(micro_batches) - 1
        for i, (images, targets, failures) in enumerate(micro_batches):
            labels = targets  # the true classes; with mixup `targets` become soft labels
            if self.mixup is not None:
                images, targets = self.mixup(images, targets)
            local = self.model.no_sync() if i < last and hasattr(self.model, "no_sync") else contextlib.nullcontext()
            with local:
                with self.runtime.autocast():
                    logits = self.model(self.runtime.in_layout(images))
                    loss = self.train_criterion(logits.float(), targets)
                for hook in self.hooks:
                    loss = hook.on_loss(epoch, step, loss)
                if i < last:
                    self.scaler.scale(loss * scale).backward()
            n = labels.shape[0]
            totals = [totals[0] + loss.item() * n, totals[1] + logits.detach().argmax(1).eq(labels).sum().item(),
                      totals[2] + n, totals[3] + failures.sum().item()]
        loss_value = totals[0] / max(totals[2], 1)
        if any(hook.skip_step(epoch, step, loss_value) for hook in self.hooks):
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()  # keep the lr schedule aligned with the step count
            return None
        self.scaler.scale(loss * scale).backward()
        self._update()
        return totals

    def _update(self) -> None:
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
        self._report(metrics, epoch, checkpoint=due)
        self.publisher.add(epoch, metrics, checkpointed=due)
        return due

    def _report(self, metrics: dict[str, float], epoch: int, checkpoint: bool, position: dict | None = None):
        """`ray.train.report(metrics)` on every worker, with rank 0's checkpoint if `checkpoint`: of `epoch`
        done, or (`position`) of steps inside the next one."""
        cfg = self.cfg
        with tempfile.TemporaryDirectory(prefix="cvlab-ckpt-") as tmp:
            attached = None
            if checkpoint and self.runtime.rank == 0:
                info = {"best_top1": self.best_top1, "classes": list(cfg.data.classes),
                        "inputs": dataclasses.asdict(cfg.inputs)}  # what predict / export need to feed it
                if position is None:  # weights saved inside an epoch were never validated
                    info["val/top1"] = metrics["val/top1"]
                extra = {**info, **self.counters, "skipped_steps": self.nonfinite.skipped,
                         "optimizer_steps": self.optimizer_steps, "world_size": self.runtime.world}
                if position is not None:
                    extra["position"] = position
                if self.ema is not None:
                    extra["ema"] = ema_state_dict(self.ema)
                save_training_checkpoint(tmp, self.model, self.optimizer, self.scheduler, self.scaler, epoch, extra,
                                         model_info=info)
                attached = ray.train.Checkpoint.from_directory(tmp)
            report_with_retries(metrics, attached, cfg.storage_retry_limit_s)

    def _checkpoint_inside_epoch_if_due(self, epoch: int, step: int, sums) -> None:
        """After `step` of `epoch` (step-exact order): a checkpoint every `checkpoint_every_steps` steps, and one
        when Ray Train passes on a preemption notice for a node of this group (each notice acted on once)."""
        every = self.cfg.step_exact.checkpoint_every_steps
        global_step = (epoch - 1) * self.steps_per_epoch + step
        why = "scheduled" if every and global_step % every == 0 else None
        notice = self.preemption.check()  # a collective: every worker asks after every step
        if notice is not None:
            self.counters["preemption_checkpoints"] += 1
            log.warning("%s: checkpointing after step %d of epoch %d", notice, step, epoch)
            why = "preemption"
        if why is None:
            return
        totals = all_reduce(sums.clone())  # the epoch's totals so far, so the resumed epoch reports all of it
        position = {"epoch": epoch, "step": step, "sums": totals.tolist()}
        self._report({MID_EPOCH_KEY: 1.0, "epoch": epoch - 1, "step": global_step, "val/top1": UNRANKED_SCORE},
                     epoch - 1, checkpoint=True, position=position)
        self.publisher.covered()  # epochs waiting for a checkpoint have one now
        log.info("checkpoint (%s) after step %d of %d of epoch %d", why, step, self.steps_per_epoch, epoch)

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
        log.info("training %s on %d images (%d classes), %d worker(s), global batch %d%s, peak lr %.4g, %d steps/epoch, "
                 "device %s", cfg.model_name, self.train_images, len(cfg.data.classes), self.runtime.world,
                 self.global_batch, f" ({self.micro_per_step} micro-batch(es) per step here)" if self.order else "",
                 self.peak_lr, self.steps_per_epoch, self.runtime.device)
        run_start = time.perf_counter()
        for epoch in range(self.start_epoch, epochs + 1):
            train = self.train_one_epoch(epoch, run_start, self.start_step if epoch == self.start_epoch else 0)
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
                "train/world_size": float(self.runtime.world),
            }
            if self.order is not None:  # the step-exact order: what resizes and preemptions did to the run
                metrics.update({f"train/{k}": float(v) for k, v in self.counters.items()})
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

