"""Segmentation through the run lifecycle end to end (slow): `experiments/seg_quickstart.yaml` as shipped
(40 synthetic street scenes, 160 iterations, 2 CPU workers with synchronised BN), with one worker SIGKILLed
after the first checkpoint. The run restarts from that checkpoint, logs each validation to MLflow once,
learns (mIoU well above a constant predictor) and leaves the class-IoU table, overlays and checkpoints;
`cvlab eval` of its best checkpoint gives the same mIoU."""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("mmseg")
pytest.importorskip("mmcv.ops")

ROOT = Path(__file__).resolve().parents[1]


def _constant_predictor_miou(root) -> float:
    """mmseg's mIoU (percent) of predicting the most frequent train class everywhere on the val split."""
    from PIL import Image

    from workloads.segmentation.cityscapes import label_path, list_images

    def hist(split):
        counts = np.zeros(256, np.int64)
        for img in list_images(root, split):
            counts += np.bincount(np.asarray(Image.open(label_path(root, split, img))).ravel(), minlength=256)
        return counts[:19]

    c = int(np.argmax(hist("train")))
    val = hist("val")
    present = int((val > 0).sum()) + int(val[c] == 0)  # classes with a union: the ground truth's and c
    return 100.0 * val[c] / val.sum() / present


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_seg_quickstart_learns_and_survives_a_killed_worker(tmp_path, monkeypatch):
    import ray
    from mlflow import MlflowClient

    from orchestrator.cli import main
    from orchestrator.cli.run import run_experiment
    from orchestrator.config.loader import spec_from_dict
    from orchestrator.names import FAULT_MARKER_FILE, JOB_TAG, SOURCE_RUN_TAG

    monkeypatch.chdir(tmp_path)
    d = yaml.safe_load((ROOT / "experiments" / "seg_quickstart.yaml").read_text())
    d["segmentation"]["data_root"] = str(tmp_path / "cs")
    d["run"].update(storage_path=str(tmp_path / "runs"), fault_kill_rank_at={"epoch": 1, "step": 100, "rank": 1})
    d["tracking"]["tracking_uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert d["run"]["max_failures"] >= 1 and d["segmentation"]["val_interval"] == 80
    (tmp_path / "seg.yaml").write_text(yaml.safe_dump(d))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        t0 = time.perf_counter()
        summary = run_experiment(spec_from_dict(d))
        seconds = time.perf_counter() - t0
        # `cvlab eval` of the best checkpoint, on the same 2 workers
        assert main(["eval", str(tmp_path / "seg.yaml"), "--checkpoint",
                     f"runs:/{summary['run_id']}/checkpoints/best"]) == 0
    finally:
        ray.shutdown()

    assert (Path(summary["ray_run"]) / FAULT_MARKER_FILE).is_file()  # worker 1 was killed at iteration 100
    m = summary["metrics"]
    baseline = _constant_predictor_miou(tmp_path / "cs")
    print(f"seg quickstart with a killed worker: {seconds:.0f} s, val/mIoU {m['val/mIoU']:.2f} "
          f"(constant predictor {baseline:.2f}), mAcc {m['val/mAcc']:.2f}, aAcc {m['val/aAcc']:.2f}")
    assert m["iter"] == 160 and math.isfinite(m["val/mIoU"]) and m["val/mIoU"] > 3 * baseline

    client = MlflowClient(summary["tracking_uri"])
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert sorted(h.step for h in client.get_metric_history(run.info.run_id, "val/mIoU")) == [80, 160]  # once each
    assert run.data.params["seg.world_size"] == "2"
    resumed = client.get_metric_history(run.info.run_id, "train/resumed_from_iter")
    assert [(h.step, h.value) for h in resumed] == [(80, 80.0)]  # from the checkpoint, not from scratch
    assert run.data.metrics["best/val_mIoU"] == max(h.value for h in
                                                    client.get_metric_history(run.info.run_id, "val/mIoU"))
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"class_iou.md", "class_iou.csv", "overlays", "checkpoints"} <= top, top
    assert len(client.list_artifacts(run.info.run_id, "overlays")) == 4
    table = (Path(client.download_artifacts(run.info.run_id, "class_iou.csv", str(tmp_path)))).read_text()
    assert "road" in table and "sky" in table

    # the evaluation gives exactly the best mIoU that training logged, and per-class IoU
    evaluation = client.search_runs([run.info.experiment_id], f"tags.`{JOB_TAG}` = 'eval'")
    assert len(evaluation) == 1 and run.info.run_id in evaluation[0].data.tags[SOURCE_RUN_TAG]
    assert evaluation[0].data.metrics["eval/mIoU"] == run.data.metrics["best/val_mIoU"]
    assert "eval/IoU.road" in evaluation[0].data.metrics


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_trial_search_over_the_neck_reduction_ratio(tmp_path, monkeypatch, capsys):
    """`experiments/tune_seg_neck_reduction.yaml` through `cvlab tune` (shortened: 6 small scenes, 24
    iterations): one nested MLflow run per searched ratio, each with its val/mIoU, and the parent's summary."""
    from mlflow import MlflowClient

    from orchestrator.cli import main

    monkeypatch.chdir(tmp_path)
    overrides = [f"segmentation.data_root={tmp_path / 'cs'}", "segmentation.num_train_generated=4",
                 "segmentation.num_val_generated=2", "segmentation.generated_size=[64,128]",
                 "segmentation.crop_size=[64,64]", "segmentation.max_iters=24", "segmentation.val_interval=12",
                 f"run.storage_path={tmp_path / 'runs'}", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    args = ["tune", str(ROOT / "experiments" / "tune_seg_neck_reduction.yaml"), "--num-cpus", "3"]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 0, capsys.readouterr().err

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tune-seg-neck-reduction").experiment_id
    (parent,) = client.search_runs([exp], "tags.`cvlab.kind` = 'search'")
    kids = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    ratios = sorted(r.data.params["searched.segmentation.overrides.model.neck.op_reduction_ratio"] for r in kids)
    assert ratios == ["2", "8"]
    for run in kids:
        assert run.info.status == "FINISHED" and run.data.tags["cvlab.workload"] == "segmentation"
        assert sorted(h.step for h in client.get_metric_history(run.info.run_id, "val/mIoU")) == [12, 24]
    assert parent.info.status == "FINISHED" and parent.data.tags["cvlab.best_run_id"] in {r.info.run_id for r in kids}
