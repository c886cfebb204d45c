# ruff: noqa: C408  (mmdet configs are written as dict(...))
"""Detection on Ray Train end to end (slow): 2 CPU workers, each an mmengine Runner in Ray's process group;
an injected worker failure resumes from the latest checkpoint; metrics, losses and the checkpoint reach
MLflow; `resume=True` continues the run from its detection checkpoint with more epochs."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import yaml

pytest.importorskip("mmdet")
pytest.importorskip("mmcv.ops")

warnings.filterwarnings("ignore", category=UserWarning)

ROOT = Path(__file__).resolve().parents[1]


def _spec(tmp_path, max_epochs, fail_marker=None):
    from orchestrator.config.loader import spec_from_dict

    d = yaml.safe_load((ROOT / "experiments" / "det_quickstart.yaml").read_text())
    d["detection"].update(
        data_root=str(tmp_path / "coco"), num_train_generated=8, num_val_generated=4, generated_size=64,
        image_scale=[64, 64], max_epochs=max_epochs, val_interval=1, warmup_iters=4,
        overrides={"custom_hooks": [dict(type="FailOnceHook", after_epoch=1, marker=str(fail_marker))]}
        if fail_marker else {},
    )
    d["run"].update(storage_path=str(tmp_path / "runs"), checkpoint_every=1, checkpoints_kept=1, max_failures=1,
                    log_every=1)
    d["tracking"].update(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    return spec_from_dict(d)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_detection_on_ray_train_with_failure_and_resume(tmp_path, monkeypatch):
    import ray
    from mlflow import MlflowClient

    from orchestrator.cli.run import run_experiment as run_detection

    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "failed_once"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        first = run_detection(_spec(tmp_path, max_epochs=2, fail_marker=marker))
        assert marker.exists()  # the worker group failed once before epoch 2 ...
        assert first["metrics"]["epoch"] == 2  # ... and went on from the epoch-1 checkpoint
        assert first["metrics"]["iter"] == 2 * 2  # 8 images / 2 workers / batch 2 = 2 iterations per epoch
        client = MlflowClient(first["tracking_uri"])
        run = client.get_run(first["run_id"])
        assert run.info.status == "FINISHED"
        for key in ("val/bbox_mAP", "val/bbox_mAP50", "val/bbox_mAP75", "val/segm_mAP", "train/loss",
                    "train/loss_mask", "lr"):
            assert key in run.data.metrics, key
        assert {m.step for m in client.get_metric_history(run.info.run_id, "val/bbox_mAP")} == {1, 2}
        assert run.data.params["det.world_size"] == "2"
        assert {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints/last")} == {
            "checkpoints/last/epoch_2.pth"}

        second = run_detection(_spec(tmp_path, max_epochs=3), resume=True)
        assert second["run_id"] == first["run_id"] and second["ray_run"] == first["ray_run"]
        assert second["metrics"]["epoch"] == 3 and second["metrics"]["iter"] == 3 * 2  # continued, not restarted
        history = client.get_metric_history(first["run_id"], "val/bbox_mAP")
        assert {m.step for m in history} == {1, 2, 3}
    finally:
        ray.shutdown()
