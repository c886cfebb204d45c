"""Nodes that go away in the middle of a run (issues 9 and 23), on a multi-node `ray.cluster_utils.Cluster`: an
elastic worker group (`scaling.num_workers: [min, max]`) checkpoints on a preemption notice, goes on with the
workers left when the node goes, and grows back when a node is added; every epoch reaches MLflow exactly once.
"""
from __future__ import annotations

import threading
import time

import pytest

from workloads.classification.synthetic import make_imagenet


def _train_worker_nodes() -> set[str]:
    """Node ids of the live Ray Train worker actors (from the GCS actor table: no dashboard here)."""
    from ray._private.state import actors

    return {a["Address"]["NodeID"] for a in actors(actor_state_name="ALIVE").values()
            if a["ActorClassName"] == "RayTrainWorker"}


def _metric(client, experiment: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of `key` in the experiment's one run so far; [] before it exists (the sqlite store is
    being created while we read it)."""
    try:
        exp = client.get_experiment_by_name(experiment)
        runs = client.search_runs([exp.experiment_id], max_results=1) if exp else []
        return sorted((m.step, m.value) for m in client.get_metric_history(runs[0].info.run_id, key)) if runs else []
    except Exception:  # noqa: BLE001
        return []


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_worker_range_rides_out_a_preempted_node_and_grows_back(tmp_path, monkeypatch):
    """`scaling.num_workers: [1, 3]` on three one-CPU nodes. Once epoch 1 is logged (3 workers), one node is
    drained for preemption with a 4 s deadline (`ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION`, as the
    autoscaler or KubeRay does for a spot termination), shorter than an epoch: the group writes a checkpoint at
    its next step boundary, and when Ray Train restarts at the deadline (the node then removed) it goes on
    with the 2 workers left, from that step, without waiting for a replacement. A node added later: the group
    grows back to 3 at a resize check once Ray's autoscaling coordinator has seen the node (it looks every 20 s,
    hence 8 epochs). Every epoch is logged once; `train/world_size` shows 3, 2, 3;
    after the last restart the run trained exactly the steps that were left. Ray Train polls for drains every
    5 s and for reports every 2 s; here every 0.5 s, so that the notice and the checkpoint fit the deadline."""
    import subprocess
    import sys

    import ray
    from mlflow import MlflowClient
    from ray.cluster_utils import Cluster

    from orchestrator.config.loader import spec_from_dict
    from orchestrator.cli.run import run_experiment

    monkeypatch.setenv("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "0.5")  # read by the Ray processes started below
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    # A restart may first ask for 3 workers while Ray's resource view still holds the lost node, and waits this
    # long (default 60 s) for them before asking for what is there.
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "10")
    make_imagenet(tmp_path / "data", classes=4, per_class=64, size=32, val_per_class=3)
    db, name, epochs = f"sqlite:///{tmp_path}/mlflow.db", "cvlab-elastic", 8
    spec = spec_from_dict({
        "experiment": {"name": "elastic", "seed": 0},
        "model": {"name": "resnet26"},
        "data": {"root": str(tmp_path / "data"), "image_size": 32, "batch_size": 4, "num_workers": 0},
        "optim": {"epochs": epochs, "lr": 0.01, "scale_lr": False, "warmup_epochs": 0.5},
        "scaling": {"num_workers": [1, 3], "resize_check_s": 2},
        "run": {"storage_path": str(tmp_path / "runs"), "log_every": 100, "max_failures": 3},
        "tracking": {"tracking_uri": db, "experiment_name": name, "log_model": False},
    })
    steps_per_epoch = 256 // (3 * 4)

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    victim = cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=True)
    events: list[str] = []
    try:
        result: dict = {}

        def train():
            try:
                result["summary"] = run_experiment(spec)
            except BaseException as err:  # surfaced by the assertions below
                result["error"] = err

        thread = threading.Thread(target=train, daemon=True)
        started = time.monotonic()
        thread.start()
        client = MlflowClient(db)

        def wait_for(condition, what: str, timeout_s: float = 240) -> None:
            deadline = time.monotonic() + timeout_s
            while not condition():
                assert thread.is_alive() and time.monotonic() < deadline, f"{what}: {result.get('error')}"
                time.sleep(0.3)
            events.append(f"{what} at {time.monotonic() - started:.0f} s")

        wait_for(lambda: _metric(client, name, "val/top1"), "epoch 1 logged")
        assert victim.node_id in _train_worker_nodes()
        drain_s = 4
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "drain-node", "--address", cluster.address,
                        "--node-id", victim.node_id, "--reason", "DRAIN_NODE_REASON_PREEMPTION",
                        "--reason-message", "spot termination (test)", "--deadline-remaining-seconds",
                        str(drain_s)], check=True, capture_output=True, timeout=60)
        drained_at = time.monotonic()
        time.sleep(drain_s)
        cluster.remove_node(victim)  # the spot node goes at its deadline
        events.append(f"node removed {time.monotonic() - drained_at:.0f} s after the drain")
        wait_for(lambda: _metric(client, name, "train/resumed_from_step"), "the group restarted")
        cluster.add_node(num_cpus=1)
        thread.join(400)
        events.append(f"finished at {time.monotonic() - started:.0f} s")
        assert not thread.is_alive(), events
        assert "error" not in result, result.get("error")
    finally:
        ray.shutdown()
        cluster.shutdown()
    summary = result["summary"]
    assert client.get_run(summary["run_id"]).info.status == "FINISHED"
    for key in ("train/loss", "val/loss", "val/top1", "train/world_size"):
        assert [s for s, _ in _metric(client, name, key)] == list(range(1, epochs + 1)), key
    sizes = [int(v) for _, v in _metric(client, name, "train/world_size")]
    assert sizes[0] == 3 and 2 in sizes and sizes[-1] == 3 and sizes.index(2) < len(sizes) - 1, sizes
    # The preemption checkpoint: written inside an epoch, and the restart after the node went resumed there.
    assert _metric(client, name, "train/preemption_checkpoints")[-1][1] >= 1
    resumed = [v for _, v in _metric(client, name, "train/resumed_from_step")]
    assert resumed and resumed[0] % steps_per_epoch != 0, resumed  # not at an epoch's end: at the step
    assert _metric(client, name, "train/resizes")[-1][1] >= 2  # shrunk, then grown
    # After the last restart the run trained exactly the steps left: none repeated, none skipped.
    last_attempt = _metric(client, name, "train/steps_this_attempt")[-1][1]
    assert last_attempt == epochs * steps_per_epoch - resumed[-1], (last_attempt, resumed)
