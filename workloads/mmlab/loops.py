"""An mmengine epoch loop that can resume inside an epoch.

mmengine's `IterBasedTrainLoop` resumes at a checkpoint's iteration (it advances its data iterator past the
batches already trained); its `EpochBasedTrainLoop` restarts the interrupted epoch from its first batch. A
preemption checkpoint (`hooks.PreemptionCheckpointHook`) is written inside an epoch, so detection's epoch
loops become `ResumableEpochBasedTrainLoop`: after such a checkpoint it passes over the batches of the epoch
that were trained before it, as the iteration loop does.

With the same worker count the skipped batches are exactly those trained (the sampler's order is fixed by
seed and epoch). With another count the checkpoint's number of images trained in the epoch
(`hooks.EPOCH_SAMPLES_DONE`) is skipped, rounded down to whole batches of the new group: mmengine's
`DefaultSampler` draws one permutation per (seed, epoch) and gives rank r of w the positions r, r + w, ...,
so iteration i of all ranks together covers positions i*b*w to (i+1)*b*w - 1 (b the per-worker batch) and
the same images are left out, up to one global batch. mmdet's `AspectRatioBatchSampler` groups each rank's
images by orientation before batching, so with it (and images of both orientations) the images left out
after a resize are nearly, not exactly, those trained.
"""
from __future__ import annotations

from mmengine.registry import LOOPS
from mmengine.runner import EpochBasedTrainLoop

from .registration import register


class ResumableEpochBasedTrainLoop(EpochBasedTrainLoop):
    """`EpochBasedTrainLoop` that leaves out the first `skip_batches` batches of the next epoch it runs (set
    when resuming inside an epoch). The skipped batches are still loaded: the sampler has no offset."""

    skip_batches = 0

    def run_epoch(self) -> None:
        try:
            super().run_epoch()
        finally:
            self.skip_batches = 0

    def run_iter(self, idx, data_batch) -> None:
        if idx >= self.skip_batches:
            super().run_iter(idx, data_batch)


def resumable_inside_epochs(train_cfg: dict) -> dict:
    """The training-loop config with mmengine's epoch loop replaced by `ResumableEpochBasedTrainLoop`
    (other loops unchanged)."""
    loop = dict(train_cfg)
    if loop.get("type") == "EpochBasedTrainLoop" or ("type" not in loop and loop.get("by_epoch")):
        loop.pop("by_epoch", None)
        loop["type"] = ResumableEpochBasedTrainLoop.__name__
    return loop


register(LOOPS, ResumableEpochBasedTrainLoop)
