"""Small hooks around the training step: the fault drills and the non-finite-loss policy.

The epoch loop (`workloads.classification.loop`) calls, for every step, `before_step(epoch, step)`, then
`on_loss(epoch, step, loss) -> loss`, then `skip_step(epoch, step, loss_value) -> bool` (True: no update).
"""
from __future__ import annotations

import logging
import math
import time

from workloads.fault_drill import kill_self
from workloads.object_storage import exists

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


class StepHook:
    def before_step(self, epoch: int, step: int) -> None:
        pass

    def on_loss(self, epoch: int, step: int, loss):
        return loss

    def skip_step(self, epoch: int, step: int, loss_value: float) -> bool:
        return False


class KillDrill(StepHook):
    """`run.fault_kill_rank_at`: worker `rank` fires the drill (`workloads.fault_drill.kill_self`) once at
    (epoch, step). `settle_s`: a wait before the kill, so that Ray Train's controller, which collects the
    workers' reports every 2 s, has registered the checkpoint reported just before (one inside the epoch)."""

    def __init__(self, epoch: int, step: int, rank: int, marker: str, my_rank: int, settle_s: float = 0.0,
                 signal_name: str = "KILL"):
        self.at, self.signal_name = (epoch, step), signal_name
        self.armed = rank == my_rank and not exists(marker)
        self.marker, self.rank, self.settle_s = marker, my_rank, settle_s

    def before_step(self, epoch: int, step: int) -> None:
        if not self.armed or (epoch, step) != self.at:
            return
        time.sleep(self.settle_s)
        kill_self(self.signal_name, self.marker, self.rank, epoch, step)


class NanDrill(StepHook):
    """`run.fault_nan_loss_at`: the loss of (epoch, step) becomes NaN on every worker."""

    def __init__(self, epoch: int, step: int):
        self.at = (epoch, step)

    def on_loss(self, epoch: int, step: int, loss):
        return loss * float("nan") if (epoch, step) == self.at else loss


class NonFiniteLossPolicy(StepHook):
    """A NaN/inf loss fails the run, naming epoch and step; with `limit` > 0 such steps are skipped on every
    worker (they must agree, or DDP's gradient all-reduce would wait forever) up to `limit` times per run.

    `agree(bad: bool) -> bool` returns True when any worker saw a bad loss (an all-reduce of a flag); it is
    only called when skipping is allowed, so a run without skipping pays nothing per step.
    """

    def __init__(self, limit: int, steps_per_epoch: int, rank: int, agree, skipped: int = 0):
        self.limit, self.steps_per_epoch, self.rank = limit, steps_per_epoch, rank
        self.agree = agree
        self.skipped = skipped  # over the whole run, restored from the checkpoint

    def skip_step(self, epoch: int, step: int, loss_value: float) -> bool:
        mine = not math.isfinite(loss_value)
        bad = self.agree(mine) if self.limit else mine
        if not bad:
            return False
        self.skipped += 1
        who = f"on worker {self.rank}" if mine else "on another worker"
        where = f"at epoch {epoch}, step {step} (global step {(epoch - 1) * self.steps_per_epoch + step}) {who}"
        if self.skipped > self.limit:
            after = f" after skipping {self.limit} such step(s)" if self.limit else ""
            value = f" ({loss_value})" if mine else ""
            raise NonFiniteLossError(f"non-finite training loss{value} {where}{after}; "
                                     "lower optim.lr, set optim.grad_clip or train in fp32")
        log.warning("non-finite training loss %s: step skipped (%d of at most %d)", where, self.skipped, self.limit)
        return True
