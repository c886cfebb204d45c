"""What the run lifecycle guarantees for every workload, before any work is spent: an unreachable MLflow
server and `scaling.use_gpu: true` on a machine without CUDA each end with one message, and nothing is
created (no MLflow run or database, no data, no Ray Train run folder, no Ray)."""
from __future__ import annotations

import pytest

# The smallest experiment file of each workload that would start a run (generating its data first).
WORKLOAD_SECTIONS = {
    "classification": "data: {{root: {root}, generate: true}}\n",
    "detection": "workload: detection\n"
                 "detection: {{config: quickstart/mask-rcnn_cednet26_fpn64_tiny.py, data_root: {root}, generate: true}}\n",
    "segmentation": "workload: segmentation\n"
                    "segmentation: {{config: quickstart/fpn_cednet26_cvo-fpn64_tiny.py, data_root: {root}, "
                    "generate: true}}\n",
}


def _start(tmp_path, monkeypatch, workload: str, extra: str, capsys) -> str:
    """`cvlab run` of the workload's smallest file plus `extra` YAML; asserts exit 2 and that nothing was
    created; returns stderr."""
    import psutil
    import ray

    from orchestrator.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yaml_file = tmp_path / "exp.yaml"
    yaml_file.write_text(WORKLOAD_SECTIONS[workload].format(root=tmp_path / "data")
                         + f"run: {{storage_path: {tmp_path}/runs}}\n" + extra)
    assert main(["run", str(yaml_file)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp.yaml"]  # no data, runs/, mlflow.db
    assert not ray.is_initialized()
    started = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert not [p for p in started if p.name().startswith(("raylet", "gcs_server"))]
    return err


@pytest.mark.parametrize("workload", sorted(WORKLOAD_SECTIONS))
def test_run_with_unreachable_server_does_not_start(tmp_path, capsys, monkeypatch, workload):
    err = _start(tmp_path, monkeypatch, workload, "tracking: {tracking_uri: 'http://127.0.0.1:9'}\n", capsys)
    assert "unreachable" in err and "not started" in err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("workload", sorted(WORKLOAD_SECTIONS))
def test_use_gpu_without_cuda_fails_before_any_work(tmp_path, capsys, monkeypatch, workload):
    err = _start(tmp_path, monkeypatch, workload,
                 f"scaling: {{use_gpu: true}}\ntracking: {{tracking_uri: 'sqlite:///{tmp_path}/mlflow.db'}}\n", capsys)
    assert "scaling.use_gpu is true but this machine has no usable CUDA" in err
