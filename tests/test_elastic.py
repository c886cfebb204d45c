"""Elastic and step-checkpointed training (issue 23): the step-exact order, the worker range in the schema, and the
job's translation. The runs on Ray are in tests/test_reliability.py and tests/test_reliability_node.py."""
from __future__ import annotations

import re

import pytest
import yaml

from orchestrator.cli import main
from orchestrator.config.loader import spec_from_dict
from orchestrator.errors import CvlabError
from orchestrator.jobs.classification import check_step_exact, step_exact
from orchestrator.runs.ray_setup import check_fits, worker_group_resources
from workloads.classification.config import ShardPlan
from workloads.classification.step_order import (
    GlobalBatchOrder,
    SeededSamples,
    StepBatchSampler,
    derived_seed,
)


def _steps(order: GlobalBatchOrder, epoch: int, world: int, start_step: int = 0) -> list[list[int]]:
    """Every step's samples, in slot order, as the `world` workers together run them."""
    per_worker = {rank: list(order.micro_batches(epoch, rank, world, start_step)) for rank in range(world)}
    steps = []
    for k in range(order.steps_per_epoch - start_step):
        slots = {}
        for rank in range(world):
            mine = order.slots_of(rank, world)
            for i, slot in enumerate(mine):
                slots[slot] = per_worker[rank][k * len(mine) + i]
        steps.append([index for slot in sorted(slots) for index in slots[slot]])
    return steps


def test_global_batches_are_the_same_whatever_the_worker_count():
    """50 samples, micro-batches of 3, 4 slots: 4 steps of 12 samples per epoch, each sample at most once, the
    two left over differ between epochs; 1, 2, 3 or 4 workers together run exactly the same micro-batches in
    every step; a restart at step 2 runs exactly the last two steps; more workers than slots is refused."""
    order = GlobalBatchOrder(50, 3, 4, seed=7)
    assert order.steps_per_epoch == 4
    reference = _steps(order, 1, world=4)
    used = [i for step in reference for i in step]
    assert len(used) == 48 and len(set(used)) == 48 and set(used) <= set(range(50))
    for world in (1, 2, 3):
        assert _steps(order, 1, world) == reference, world
    assert _steps(order, 1, world=3, start_step=2) == reference[2:]
    epoch2 = [i for step in _steps(order, 2, world=4) for i in step]
    assert epoch2 != used and set(range(50)) - set(epoch2) != set(range(50)) - set(used)
    assert _steps(GlobalBatchOrder(50, 3, 4, seed=8), 1, world=4) != reference
    assert list(order.slots_of(1, 3)) == [1] and list(order.slots_of(0, 3)) == [0, 3]
    assert list(order.micro_batches(1, 0, 4)) == list(order.micro_batches(1, 0, 4, start_step=0))
    for rank, world in ((0, 5), (2, 2), (-1, 2)):
        with pytest.raises(ValueError, match=r"^worker .* slots per step \(world must be at most the range's max\)$"):
            order.slots_of(rank, world)
    for micro, slots in ((0, 4), (3, 0)):
        with pytest.raises(ValueError, match="micro_batch and slots must be >= 1"):
            GlobalBatchOrder(50, micro, slots, seed=7)
    assert GlobalBatchOrder(50, 1, 1, seed=7).steps_per_epoch == 50


def test_each_sample_is_augmented_from_its_own_seed():
    """The sampler pairs each index with a seed of (seed, epoch, index); the dataset draws the sample's random
    numbers from it: the same sample looks the same whichever worker loads it, in whatever order, and the seed
    changes with the epoch."""
    import torch

    import random

    import numpy as np

    class Noise(torch.utils.data.Dataset):  # draws from all three generators, as augmentations do
        def __len__(self):
            return 12

        def __getitem__(self, index):
            return index, torch.tensor([torch.rand(1).item(), random.random(), np.random.rand()])

    order = GlobalBatchOrder(12, 2, 2, seed=3)
    keys = {world: [key for batch in StepBatchSampler(order, 0, world) for key in batch] for world in (1, 2)}
    assert keys[1][0] == (keys[1][0][0], derived_seed(3, 1, keys[1][0][0]))
    samples = SeededSamples(Noise())
    forward = {k[0]: samples[k][1] for k in keys[1]}
    backward = {k[0]: samples[k][1] for k in reversed(keys[1])}
    assert all(torch.equal(forward[i], backward[i]) for i in forward)
    assert all(torch.equal(samples[k][1], forward[k[0]]) for k in keys[2])
    sampler = StepBatchSampler(order, 0, 1)
    assert len(sampler) == 6 and len(list(sampler)) == 6  # a fresh sampler: epoch 1 from its first step
    sampler.set_position(2)
    assert len(sampler) == 6
    sampler.set_position(2, 1)
    later = [key for batch in sampler for key in batch]
    assert len(later) == len(sampler) * 2 == 8 and all(seed == derived_seed(3, 2, i) for i, seed in later)
    assert derived_seed(1, 2, 3) == derived_seed(1, 2, 3) != derived_seed(1, 2, 4)
    # Every generator gets the whole seed: 200 samples draw 200 different numbers from each.
    draws = torch.stack([samples[(i, derived_seed(3, 1, i))][1] for i in range(12)] +
                        [SeededSamples(Noise())[(0, derived_seed(3, 1, i))][1] for i in range(12, 200)])
    assert all(len(set(draws[:, g].tolist())) == 200 for g in range(3))


def _spec(**sections):
    d = {"experiment": {"name": "elastic"}, "data": {"root": "data"}}
    for section, values in sections.items():
        d.setdefault(section, {}).update(values)
    return spec_from_dict(d)


def test_a_worker_range_in_the_schema_and_the_job():
    """`scaling.num_workers: [min, max]`: the run needs what `min` workers reserve, the global batch is `max`
    workers', and the job hands the worker the step-exact order with `max` slots (also for a fixed count with
    run.checkpoint_every_steps); a shard stream is refused with it."""
    spec = _spec(scaling={"num_workers": [1, 3], "resources_per_worker": {"CPU": 2}}, run={"max_failures": -1})
    assert (spec.scaling.elastic, spec.scaling.min_workers, spec.scaling.max_workers) == (True, 1, 3)
    assert spec.scaling.describe() == "1 to 3 workers"
    assert worker_group_resources(spec) == {"CPU": 2.0}
    assert step_exact(spec).slots == 3 and step_exact(spec).checkpoint_every_steps is None
    fixed = _spec(scaling={"num_workers": 2}, run={"checkpoint_every_steps": 5})
    assert (fixed.scaling.elastic, step_exact(fixed).slots, step_exact(fixed).checkpoint_every_steps) == (False, 2, 5)
    assert step_exact(_spec(scaling={"num_workers": 2})) is None
    shards = ShardPlan(location="s3://b/set", classes=("a",), train_shards=(), val_shards=(), train_images=8,
                       val_images=2)
    with pytest.raises(CvlabError, match="need a data folder .* s3://b/set is streamed"):
        check_step_exact(spec, shards)
    check_step_exact(_spec(), shards)  # the classic order streams shards


def test_a_range_starts_once_its_min_fits_and_is_refused_when_it_never_can():
    """The run's resource check (before Ray Train starts, which would otherwise wait for ever): a range needs
    what `min` workers reserve; a cluster that cannot hold `min` of them is refused with one message naming the
    range, and a fixed count needs all its workers."""
    spec = _spec(scaling={"num_workers": [2, 4], "resources_per_worker": {"CPU": 1}}, run={"max_failures": 1})
    assert check_fits(worker_group_resources(spec), {"CPU": 3.0}, "the run", spec.scaling.describe()) == 1
    with pytest.raises(CvlabError, match=r"the run needs 2 CPU \(2 to 4 workers\) but the Ray cluster has 1; "
                                         r"lower scaling.num_workers"):
        check_fits(worker_group_resources(spec), {"CPU": 1.0}, "the run", spec.scaling.describe())
    fixed = _spec(scaling={"num_workers": 4})
    with pytest.raises(CvlabError, match=r"needs 4 CPU \(4 worker\(s\)\) but the Ray cluster has 3"):
        check_fits(worker_group_resources(fixed), {"CPU": 3.0}, "the run", fixed.scaling.describe())


@pytest.mark.parametrize("scaling, run, workload, message", [
    ({"num_workers": [3, 1]}, {"max_failures": 1}, None, r"needs 1 <= min <= max, got \[3, 1\]"),
    ({"num_workers": [0, 2]}, {"max_failures": 1}, None, r"needs 1 <= min <= max, got \[0, 2\]"),
    ({"num_workers": [1, 2, 3]}, {"max_failures": 1}, None, r"two integers \[min, max\], got \[1, 2, 3\]"),
    ({"num_workers": [True, 2]}, {"max_failures": 1}, None, r"two integers \[min, max\]"),
    ({"num_workers": 0}, {}, None, r"scaling\.num_workers: got 0 .*must be a whole number >= 1, or a range"),
    ({"num_workers": "two"}, {}, None, r"must be a whole number >= 1, or a range"),
    ({"num_workers": [1, 2]}, {}, None, "set run.max_failures"),
    ({"num_workers": [1, 2]}, {"max_failures": 1, "fault_kill_rank_at": {"epoch": 1, "step": 1, "rank": 2}}, None,
     r"names no worker: scaling.num_workers is 1 to 2 workers"),
    ({"num_workers": 2}, {"checkpoint_every_steps": 10}, "detection",
     r"detection: run.checkpoint_every_steps is for classification; mmengine writes its checkpoints"),
    ({"num_workers": 2, "resize_check_s": 0}, {}, None, "greater than 0"),
])
def test_bad_worker_ranges_are_refused_by_validate(tmp_path, capsys, scaling, run, workload, message):
    doc = {"experiment": {"name": "x"}, "scaling": scaling, "run": run}
    if workload:
        doc.update(workload=workload, **{workload: {"config": "quickstart"}})
    (tmp_path / "x.yaml").write_text(yaml.safe_dump(doc))
    assert main(["validate", str(tmp_path / "x.yaml")]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "Traceback" not in err


def test_an_mmengine_epoch_loop_resumes_at_the_preemption_checkpoints_batch(tmp_path, monkeypatch):
    """OpenMMLab workloads: a preemption notice after batch 3 of epoch 2 (16 images, batch 2: 8 per epoch)
    makes `PreemptionCheckpointHook` write an mmengine checkpoint of iteration 11 and report it unranked; the
    node then goes (the report raises here). A Runner resumed from that checkpoint with
    `ResumableEpochBasedTrainLoop` trains the 5 batches left of epoch 2, not the whole epoch: across both
    attempts every image of epoch 2 is trained exactly once and the run ends at iteration 16."""
    pytest.importorskip("mmengine")
    from unittest import mock

    import torch
    from collections import OrderedDict

    from mmengine.logging import MessageHub
    from mmengine.model import BaseModel
    from mmengine.registry import DefaultScope
    from mmengine.runner import Runner

    from workloads.mid_epoch import MID_EPOCH_KEY, UNRANKED_SCORE
    from workloads.mmlab import hooks
    from workloads.mmlab.checkpoints import allow_mmengine_checkpoints
    from workloads.mmlab.loops import resumable_inside_epochs

    # A Runner makes its scope and message hub the current ones for the whole process: undone after the test.
    for registry in (DefaultScope, MessageHub):
        monkeypatch.setattr(registry, "_instance_dict", OrderedDict(registry._instance_dict))

    class Indices(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            return {"inputs": torch.tensor([float(i)])}

    class Recording(BaseModel):
        def __init__(self, seen):
            super().__init__()
            self.weight, self.seen = torch.nn.Parameter(torch.ones(1)), seen

        def forward(self, inputs, mode="loss"):
            self.seen.append(sorted(int(i) for i in inputs.view(-1)))
            return {"loss": (self.weight * inputs).pow(2).mean()}

    class NodeGone(Exception):
        pass

    def runner(seen, **extra):
        train_cfg = resumable_inside_epochs({"type": "EpochBasedTrainLoop", "max_epochs": 2})
        r = Runner(model=Recording(seen), work_dir=str(tmp_path), train_cfg=train_cfg,
                   train_dataloader=dict(dataset=Indices(), batch_size=2, sampler=dict(type="DefaultSampler"),
                                         collate_fn=dict(type="default_collate")),
                   optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.01)), randomness=dict(seed=0),
                   default_hooks=dict(logger=None), default_scope="mmengine", log_level="WARNING", **extra)
        r.register_hook(hooks.PreemptionCheckpointHook("val/score"))
        return r

    first: list[list[int]] = []
    notice = mock.Mock(deadline_ms=None, preempted_node_ids=["n"], preempted_ranks=[1])
    reports = []

    def report(metrics, ckpt, limit_s):
        reports.append((metrics, ckpt.name))
        raise NodeGone

    with mock.patch("ray.train.get_preemption_info", side_effect=lambda: notice if len(first) == 11 else None), \
            mock.patch.object(hooks, "report_file", report), pytest.raises(NodeGone):
        runner(first).train()
    assert reports == [({MID_EPOCH_KEY: 1.0, "iter": 11, "val/score": UNRANKED_SCORE}, "iter_11.pth")]

    again: list[list[int]] = []
    with mock.patch("ray.train.get_preemption_info", return_value=None), allow_mmengine_checkpoints():
        resumed = runner(again, resume=True, load_from=str(tmp_path / "iter_11.pth"))
        resumed.train()
    assert len(again) == 5 and resumed.iter == 16
    epoch_2 = [i for batch in first[8:] + again for i in batch]
    assert sorted(epoch_2) == list(range(16)), epoch_2


def test_a_worker_group_that_never_gets_its_resources_fails_with_one_message(monkeypatch):
    """Resources held by others after the run's own check: Ray Train waits RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S
    per try, retries `controller_failure_limit` times, then gives up with a controller error; `cvlab` turns that
    into one line that says what to do (the bounded wait of `min` workers never available)."""
    from ray.train import ControllerError
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    from orchestrator.runs.failures import as_cvlab_error

    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
    err = as_cvlab_error(ControllerError(WorkerGroupStartupTimeoutError(2)))
    assert isinstance(err, CvlabError)
    assert str(err) == (
        "training could not start its workers: the worker group startup timed out after 600.0 seconds waiting for "
        "2 workers, on every try; the Ray cluster's free resources stayed below what scaling.num_workers asks "
        "(other jobs may hold them). Lower scaling.num_workers or free the cluster "
        "(RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S sets each wait)")
    other = as_cvlab_error(ControllerError(RuntimeError("boom")))
    assert str(other) == "training failed in the Ray Train controller: boom"
