"""`cvlab submit` / `cvlab jobs`: how jobs are put together, and errors that need no cluster."""

from __future__ import annotations

import shlex
import socket
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.cluster import submission
from orchestrator.errors import CvlabError

REPO = Path(__file__).resolve().parents[1]

TINY = """\
experiment: {name: tiny-job}
model: {name: resnet26}
data: {root: data/tiny, generate: true, num_classes_generated: 2, per_class_generated: 4,
       generated_size: 32, image_size: 32, batch_size: 4, num_workers: 0}
optim: {epochs: 1, lr: 0.01}
scaling: {num_workers: 1}
run: {storage_path: runs}
tracking: {log_model: false}
"""


@pytest.fixture
def project(tmp_path):
    """A minimal project tree: pyproject.toml, an orchestrator/ folder and an experiment file."""
    root = tmp_path / "proj"
    (root / "orchestrator").mkdir(parents=True)
    (root / "experiments").mkdir()
    (root / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text())
    (root / "experiments" / "tiny.yaml").write_text(TINY)
    return root


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_entrypoint_is_quoted_and_carries_overrides():
    entry = submission.build_entrypoint("run", "experiments/my exp.yaml", ["model.name=cednet26", "run.name=a b"])
    assert shlex.split(entry) == [
        "python", "-m", "orchestrator", "run", "experiments/my exp.yaml",
        "--set", "model.name=cednet26", "--set", "run.name=a b",
    ]  # fmt: skip
    assert submission.build_entrypoint("tune", "e.yaml").endswith("orchestrator tune e.yaml")
    with pytest.raises(ValueError, match="verb"):
        submission.build_entrypoint("train", "e.yaml")


def test_runtime_env_excludes_outputs_and_forwards_tracking(project, monkeypatch):
    """The job gets the project, the MLflow settings and the bucket settings of the submitting shell; a local
    `cvlab run` hands the bucket settings to its Ray workers the same way, except inside a Ray job (whose own
    runtime_env has them, and a second one would conflict)."""
    from orchestrator.runs.ray_setup import RAY_JOB_CONFIG_ENV, driver_runtime_env
    from workloads.object_storage import STORAGE_ENV

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://10.0.0.5:5000")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "secret")
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    for name in STORAGE_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://s3.lan:8333")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3-secret")
    monkeypatch.setenv("AWS_REGION", "")  # empty: not forwarded
    monkeypatch.delenv(RAY_JOB_CONFIG_ENV, raising=False)
    bucket = {"AWS_ENDPOINT_URL": "http://s3.lan:8333", "AWS_SECRET_ACCESS_KEY": "s3-secret"}
    assert driver_runtime_env() == {"env_vars": bucket}
    monkeypatch.setenv(RAY_JOB_CONFIG_ENV, "{}")
    assert driver_runtime_env() == {}
    env = submission.build_runtime_env(project, pip_extras=["det"], env={"FOO": "1"}, excludes=["/scratch/"])
    assert env["working_dir"] == str(project)
    for pattern in (".venv", "/data/", "/runs/", "mlruns", "mlartifacts", "mlflow.db", ".git", "__pycache__"):
        assert pattern in env["excludes"]
    assert "/scratch/" in env["excludes"]
    assert env["env_vars"] == {
        "MLFLOW_TRACKING_URI": "http://10.0.0.5:5000",
        "MLFLOW_TRACKING_TOKEN": "secret",
        **bucket,
        "FOO": "1",
    }
    assert any(p.startswith("mmdet") for p in env["pip"]) and any(p.startswith("mmcv") for p in env["pip"])
    # No extras: nothing to pip install (the cluster image carries the project).
    assert "pip" not in submission.build_runtime_env(project)


def test_pip_extras_come_from_pyproject(project):
    assert any(p.startswith("cupy-cuda12x") for p in submission.pip_packages_for_extras(["cuda12"], project))
    assert any(p.startswith("ray[") for p in submission.pip_packages_for_extras(["base"], project))
    with pytest.raises(CvlabError, match="unknown extra 'gpu'.*cuda12"):
        submission.pip_packages_for_extras(["gpu"], project)


def test_address_defaults_and_validation(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert submission.normalize_address(None) == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265/")
    assert submission.normalize_address(None) == "http://head:8265"
    monkeypatch.setenv("RAY_ADDRESS", "auto")  # not a dashboard address: ignored
    assert submission.default_address() == "http://127.0.0.1:8265"
    assert submission.normalize_address("head:8265") == "http://head:8265"
    with pytest.raises(CvlabError, match="Ray Client address"):
        submission.normalize_address("ray://head:10001")


def test_auth_header_from_env_or_file(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert submission.auth_headers() == {}
    token_file = tmp_path / "token"
    token_file.write_text("abc123\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    assert submission.auth_headers() == {"Authorization": "Bearer abc123"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "fromenv")
    assert submission.auth_headers() == {"Authorization": "Bearer fromenv"}
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(CvlabError, match="RAY_AUTH_TOKEN_PATH"):
        submission.auth_headers()


def test_dry_run_builds_the_job_from_the_project(project, monkeypatch):
    monkeypatch.chdir(project)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = submission.submit("experiments/tiny.yaml", overrides=["optim.lr=0.02"], dry_run=True)
    assert out["job_id"] is None
    assert shlex.split(out["entrypoint"])[3:] == ["run", "experiments/tiny.yaml", "--set", "optim.lr=0.02"]
    assert out["runtime_env"]["working_dir"] == str(project)
    assert "MLFLOW_TRACKING_URI" not in out["runtime_env"]["env_vars"]


def test_bad_config_fails_before_contacting_the_cluster(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    # The address is unreachable: a config error must be reported first, without trying it.
    address = f"http://127.0.0.1:{_closed_port()}"
    code = main(["submit", "experiments/tiny.yaml", "--set", "optim.lrr=0.1", "--address", address])
    err = capsys.readouterr().err
    assert code == 2
    assert "lrr" in err and "cannot reach" not in err
    assert main(["submit", "experiments/tiny.yaml", "--tune", "--address", address]) == 2
    assert "no `search:` section" in capsys.readouterr().err
    assert main(["submit", "experiments/nope.yaml", "--address", address]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_spec_outside_the_working_dir_is_refused(project, tmp_path, monkeypatch):
    outside = tmp_path / "elsewhere.yaml"
    outside.write_text(TINY)
    monkeypatch.chdir(project)
    with pytest.raises(CvlabError, match="outside the working dir"):
        submission.submit(outside, dry_run=True)


def test_unreachable_address_is_one_clear_error(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    address = f"http://127.0.0.1:{_closed_port()}"
    assert main(["jobs", "list", "--address", address]) == 2
    err = capsys.readouterr().err
    assert f"cannot reach the Ray dashboard at {address}" in err and "Traceback" not in err
    assert main(["submit", "experiments/tiny.yaml", "--address", address]) == 2
    assert "cannot reach the Ray dashboard" in capsys.readouterr().err
