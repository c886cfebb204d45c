# ruff: noqa: C408  (mmdet configs are written as dict(...))
"""Detection on Ray Train end to end (slow): 2 CPU workers, each an mmengine Runner in Ray's process group;
a worker SIGKILLed mid-epoch (the `run.fault_kill_rank_at` drill) restarts from the latest checkpoint;
metrics, losses and the checkpoint reach MLflow, each validation once; `resume=True` continues the run from
its detection checkpoint with more epochs, and keeps training while the MLflow server is away (a real
`mlflow server`, stopped after epoch 3 is logged and started again once training has ended): each epoch
reaches MLflow exactly once."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import yaml

pytest.importorskip("mmdet")
pytest.importorskip("mmcv.ops")

warnings.filterwarnings("ignore", category=UserWarning)

ROOT = Path(__file__).resolve().parents[1]


def _spec(tmp_path, max_epochs, tracking_uri, kill=None):
    from orchestrator.config.loader import spec_from_dict

    d = yaml.safe_load((ROOT / "experiments" / "det_quickstart.yaml").read_text())
    d["detection"].update(
        data_root=str(tmp_path / "coco"), num_train_generated=8, num_val_generated=4, generated_size=64,
        image_scale=[64, 64], max_epochs=max_epochs, val_interval=1, warmup_iters=4,
    )
    d["run"].update(storage_path=str(tmp_path / "runs"), checkpoint_every=1, checkpoints_kept=1, max_failures=1,
                    log_every=1, fault_kill_rank_at=kill)
    d["tracking"].update(tracking_uri=tracking_uri)
    return spec_from_dict(d)


def _eval(tmp_path, client, run_id, tracking_uri):
    """`cvlab eval` of the run's last checkpoint with the experiment file; returns the eval's MLflow run."""
    from orchestrator.cli import main
    from orchestrator.config.loader import spec_to_dict
    from orchestrator.names import JOB_TAG, SOURCE_RUN_TAG

    path = tmp_path / "det.yaml"
    path.write_text(yaml.safe_dump(spec_to_dict(_spec(tmp_path, max_epochs=4, tracking_uri=tracking_uri))))
    assert main(["eval", str(path), "--checkpoint", f"runs:/{run_id}/checkpoints/last"]) == 0
    runs = client.search_runs([client.get_run(run_id).info.experiment_id], f"tags.`{JOB_TAG}` = 'eval'")
    assert len(runs) == 1 and run_id in runs[0].data.tags[SOURCE_RUN_TAG] and runs[0].info.status == "FINISHED"
    return runs[0]


def _written(summary, epoch: int) -> bool:
    """Whether the Ray Train run folder holds a checkpoint of `epoch` (training reported it)."""
    return bool(list(Path(summary["ray_run"]).glob(f"checkpoint_*/epoch_{epoch}.pth")))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_detection_on_ray_train_with_failure_resume_and_server_outage(tmp_path, monkeypatch, mlflow_server, capfd):
    import ray
    from mlflow import MlflowClient

    from orchestrator.cli.run import run_experiment as run_detection
    from orchestrator.names import FAULT_MARKER_FILE

    monkeypatch.chdir(tmp_path)
    # log_to_driver: the workers' warnings about the absent server are part of what is checked
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True)
    try:
        # worker 1 kills itself before the second iteration of epoch 2 (8 images / 2 workers / batch 2 = 2
        # iterations per epoch; not the first: Ray Train collects a report by polling the workers, and one
        # killed right after reporting can take its last report with it) ...
        first = run_detection(_spec(tmp_path, max_epochs=2, tracking_uri=mlflow_server.uri,
                                    kill={"epoch": 2, "step": 2, "rank": 1}))
        assert (Path(first["ray_run"]) / FAULT_MARKER_FILE).is_file()
        assert first["metrics"]["epoch"] == 2 and first["metrics"]["iter"] == 2 * 2
        client = MlflowClient(first["tracking_uri"])
        # ... and the restarted group went on from the epoch-1 checkpoint (iteration 2), not from scratch
        assert [(m.step, m.value) for m in client.get_metric_history(first["run_id"], "train/resumed_from_iter")
                ] == [(2, 2.0)]
        run = client.get_run(first["run_id"])
        assert run.info.status == "FINISHED"
        for key in ("val/bbox_mAP", "val/bbox_mAP50", "val/bbox_mAP75", "val/segm_mAP", "train/loss",
                    "train/loss_mask", "lr"):
            assert key in run.data.metrics, key
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/bbox_mAP")) == [1, 2]  # once each
        assert run.data.params["det.world_size"] == "2"
        assert {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints/last")} == {
            "checkpoints/last/epoch_2.pth"}

        # --resume to 4 epochs; the server goes away once epoch 3 is logged and comes back after epoch 4's
        # checkpoint is written (the end of training): the run waits for it, then logs the rest.
        timeline: list[str] = []

        def epoch_3_logged():
            if 3 in {m.step for m in client.get_metric_history(first["run_id"], "val/bbox_mAP")}:
                timeline.append(f"epoch 4 written at the stop: {_written(first, 4)}")
                return True
            return False

        watcher = mlflow_server.away_between(epoch_3_logged, lambda: _written(first, 4), timeline)
        second = run_detection(_spec(tmp_path, max_epochs=4, tracking_uri=mlflow_server.uri), resume=True)
        watcher.join(timeout=60)
        assert timeline == ["epoch 4 written at the stop: False", "stopped", "started"], timeline
        err = capfd.readouterr().err
        assert "is not answering" in err and "answers again" in err
        assert second["run_id"] == first["run_id"] and second["ray_run"] == first["ray_run"]
        assert second["metrics"]["epoch"] == 4 and second["metrics"]["iter"] == 4 * 2  # continued, not restarted
        assert client.get_run(first["run_id"]).info.status == "FINISHED"
        for key in ("val/bbox_mAP", "val/segm_mAP"):
            assert sorted(m.step for m in client.get_metric_history(first["run_id"], key)) == [1, 2, 3, 4], key
        resumed = client.get_metric_history(first["run_id"], "train/resumed_from_iter")
        assert sorted(m.step for m in resumed) == [2, 4]
        # MLflow cannot delete artifacts: the resumed run adds its last checkpoint beside the first run's
        assert {a.path for a in client.list_artifacts(first["run_id"], "checkpoints/last")} == {
            "checkpoints/last/epoch_2.pth", "checkpoints/last/epoch_4.pth"}

        # `cvlab eval` of the last checkpoint (the newest file there): one COCO evaluation over both workers'
        # shards gives exactly the mAP that training logged for epoch 4.
        evaluation = _eval(tmp_path, client, first["run_id"], mlflow_server.uri)
        logged = {m.step: m.value for m in client.get_metric_history(first["run_id"], "val/bbox_mAP")}
        assert evaluation.data.metrics["eval/bbox_mAP"] == logged[4]
        assert evaluation.data.metrics["eval/segm_mAP"] == client.get_run(first["run_id"]).data.metrics["val/segm_mAP"]
    finally:
        ray.shutdown()
