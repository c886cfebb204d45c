"""Checkpoints written between the regular ones (inside an epoch, or between two validations), for every
workload: the key that marks their reports, the score that ranks them last, and the watch on Ray Train's
preemption notices that asks for one."""
from __future__ import annotations

import time

import ray.train

# Marks a report to Ray Train made with a checkpoint inside an epoch: not an epoch's results (Tune's trial
# callback leaves such reports out).
MID_EPOCH_KEY = "checkpoint/mid_epoch"
# The score such a report carries for the run's ranked metric: below any top-1, mAP or mIoU, so Ray's
# checkpoint ranking never keeps one as the best (it always keeps the latest).
UNRANKED_SCORE = -1.0


class PreemptionWatch:
    """Ray Train's preemption notice (a node of the group drained with reason preemption), each acted on once.

    `check()` calls `ray.train.get_preemption_info()`, a collective: every worker of the group must call it at
    the same point (after the same step), and they all get the same answer."""

    def __init__(self):
        self._seen: tuple | None = None  # (deadline, nodes) of the notice acted on

    def check(self) -> str | None:
        """A description of a notice not acted on yet ("preemption notice for worker(s) [1], 4 s left"), or None."""
        notice = ray.train.get_preemption_info()
        if notice is None or (notice.deadline_ms, tuple(notice.preempted_node_ids)) == self._seen:
            return None
        self._seen = (notice.deadline_ms, tuple(notice.preempted_node_ids))
        left = "" if notice.deadline_ms is None else f", {notice.deadline_ms / 1000 - time.time():.0f} s left"
        return f"preemption notice for worker(s) {notice.preempted_ranks}{left}"
