"""Jobs end to end on a loopback Ray head started by the test (and stopped by its own pids afterwards).

Covers the job plumbing with entrypoints the test controls (working_dir upload and excludes, --follow exit
codes and log tails, list/status/logs/stop), the tiny experiment through `cvlab submit` and through the
`ray job submit` CLI (checked in MLflow), and a failing experiment reported as FAILED with its log tail.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.cluster import local as local_cluster
from orchestrator.cluster import submission

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TINY = """\
experiment: {name: tiny-job}
model: {name: resnet26}
data: {root: data/tiny, generate: true, num_classes_generated: 2, per_class_generated: 4,
       generated_size: 32, image_size: 32, batch_size: 4, num_workers: 0}
optim: {epochs: 1, lr: 0.01}
scaling: {num_workers: 1}
run: {storage_path: runs, log_every: 1}
tracking: {log_model: false}
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A copy of the project sources plus a tiny experiment and some files the upload must leave out."""
    root = tmp_path_factory.mktemp("proj")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("orchestrator", "workloads"):
        shutil.copytree(REPO / name, root / name, ignore=ignore)
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    (root / "experiments").mkdir()
    (root / "experiments" / "tiny.yaml").write_text(TINY)
    for junk in ("data/big.bin", "runs/old/ckpt.pt", ".venv/bin/python", "mlruns/0/meta.yaml"):
        (root / junk).parent.mkdir(parents=True, exist_ok=True)
        (root / junk).write_bytes(b"x" * 1024)
    (root / "mlflow.db").write_bytes(b"x")
    return root


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A Ray head on 127.0.0.1 (no auth, 2 CPUs), stopped by its recorded pids in a finally."""
    state = tmp_path_factory.mktemp("head")
    info = None
    try:
        info = local_cluster.up(
            state_dir=str(state),
            ray_port=local_cluster.free_port(),
            dashboard_port=local_cluster.free_port(),
            mlflow_port=None,
            head_cpus=2,
            auth="disabled",
            timeout_s=240,
        )
        yield info
    finally:
        if (state / local_cluster.STATE_FILE).exists():
            local_cluster.down(str(state))
        if info:
            assert not local_cluster.running_members(info["processes"]["head"])


@pytest.fixture
def cluster_env(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def test_job_plumbing_with_own_entrypoints(head, project, cluster_env, capsys):
    client = submission.make_client(head["dashboard"])
    check = (
        "import os, orchestrator; "
        "gone = [p for p in ('data', 'runs', '.venv', 'mlruns', 'mlflow.db') if os.path.exists(p)]; "
        "assert not gone, gone; assert os.path.isdir('experiments'); "
        "print('upload-ok', os.environ['MLFLOW_TRACKING_URI'])"
    )
    runtime_env = submission.build_runtime_env(project)
    job = client.submit_job(entrypoint=f'python -c "{check}"', runtime_env=runtime_env)
    assert submission.follow(client, job) == 0
    out = capsys.readouterr().out
    assert f"upload-ok {cluster_env}" in out and f"job {job} SUCCEEDED" in out

    bad = client.submit_job(entrypoint="python -c \"import sys; print('boom-42'); sys.exit(3)\"")
    assert submission.follow(client, bad) == 1
    err = capsys.readouterr().err
    assert "boom-42" in err and f"job {bad} FAILED" in err

    slow = client.submit_job(
        entrypoint="python -c \"import time; print('sleeping', flush=True); time.sleep(120)\""
    )
    assert main(["jobs", "stop", slow, "--wait", "--address", head["dashboard"]]) == 0
    assert "STOPPED" in capsys.readouterr().out
    assert main(["jobs", "list", "--address", head["dashboard"]]) == 0
    listing = capsys.readouterr().out
    assert all(j in listing for j in (job, bad, slow)) and "SUCCEEDED" in listing and "FAILED" in listing
    assert main(["jobs", "status", bad, "--address", head["dashboard"]]) == 0
    assert "FAILED" in capsys.readouterr().out
    assert main(["jobs", "logs", job, "--address", head["dashboard"]]) == 0
    assert "upload-ok" in capsys.readouterr().out
    assert main(["jobs", "logs", "raysubmit_nosuchjob", "--address", head["dashboard"]]) == 2
    assert "raysubmit_nosuchjob" in capsys.readouterr().err


def _finished_runs(uri: str, name: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("tiny-job")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.mlflow.runName = '{name}'")
    if not runs:  # run names may carry a suffix; fall back to all runs
        runs = [r for r in client.search_runs([experiment.experiment_id]) if name in r.info.run_name]
    return [r for r in runs if r.info.status == "FINISHED"]


def test_tiny_experiment_through_cvlab_submit_and_ray_cli(head, project, cluster_env, tmp_path, monkeypatch, capsys):
    """The same experiment through `ray job submit` (in the background) and `cvlab submit --follow`.

    Both run at once (1 CPU each on the 2-CPU head) to save time; each logs to its own SQLite file.
    """
    cli_uri = f"sqlite:///{tmp_path / 'mlflow-cli.db'}"
    runtime_env = {"excludes": submission.WORKING_DIR_EXCLUDES, "env_vars": {"MLFLOW_TRACKING_URI": cli_uri}}
    cmd = [
        sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address", head["dashboard"],
        "--working-dir", str(project), "--runtime-env-json", json.dumps(runtime_env), "--",
        "python", "-m", "orchestrator", "run", "experiments/tiny.yaml", "--set", "run.name=via-ray-cli",
    ]  # fmt: skip
    cli_log = tmp_path / "ray-cli.log"
    with open(cli_log, "w") as log:
        cli = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, RAY_AUTH_MODE="disabled")
        )
    try:
        monkeypatch.chdir(project)
        code = main([
            "submit", "experiments/tiny.yaml", "--set", "run.name=via-cvlab", "--follow",
            "--address", head["dashboard"],
        ])  # fmt: skip
        out, err = capsys.readouterr()
        assert code == 0, out[-3000:] + err[-3000:]
        assert "submitted job" in out and "SUCCEEDED" in out
        runs = _finished_runs(cluster_env, "via-cvlab")
        assert runs, "no finished MLflow run for the experiment submitted by cvlab"
        assert "val/top1" in runs[0].data.metrics

        assert cli.wait(timeout=600) == 0, cli_log.read_text()[-3000:]
        assert "succeeded" in cli_log.read_text().lower()
        assert _finished_runs(cli_uri, "via-ray-cli"), "no finished MLflow run for the ray CLI job"
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()


def test_failing_experiment_is_reported_failed_with_its_log_tail(
    head, project, cluster_env, monkeypatch, capsys
):
    monkeypatch.chdir(project)
    code = main([
        "submit", "experiments/tiny.yaml", "--set", "data.generate=false", "--set", "data.root=/nonexistent/imgs",
        "--follow", "--address", head["dashboard"],
    ])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1
    assert "FAILED" in err and "last 40 lines" in err
    assert "/nonexistent/imgs" in err  # the workload's own error message, from the log tail
