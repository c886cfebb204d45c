"""The tracking URI the user chose stays the one used (issue 26 item 3): fetching `runs:/` and `models:/`
sources and logging a model go through an explicit MlflowClient, never through MLflow's process-wide tracking
URI or os.environ, so `cvlab eval SPEC --checkpoint runs:/...` with MLFLOW_TRACKING_URI set logs its
evaluation run to that store, not to ./mlflow.db.

No Ray, no server: sqlite stores under tmp_path.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from orchestrator.config.schema import DataSection, ExperimentSpec
from orchestrator.jobs.classification import input_config

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sqlite store holding a run with a `checkpoints/best` artifact and a registered version of it."""
    import torch

    from orchestrator.names import BEST_CHECKPOINT_ARTIFACT
    from orchestrator.tracking.runs import create_run, ensure_experiment, make_client
    from workloads.models import build_model, save_checkpoint

    path = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{path}/mlflow.db"
    client = make_client(uri)
    exp = ensure_experiment(client, "uri", (path / "art").as_uri())
    run_id = create_run(client, exp, "r")
    torch.manual_seed(0)
    model = build_model("cednet26", num_classes=len(CLASSES)).eval()
    ckpt = save_checkpoint(path / "ckpt" / "model.pt", model, extra={"classes": CLASSES})
    client.log_artifacts(run_id, str(path / "ckpt"), BEST_CHECKPOINT_ARTIFACT)
    client.create_registered_model("uri-model")
    version = client.create_model_version("uri-model", client.get_run(run_id).info.artifact_uri + "/"
                                          + BEST_CHECKPOINT_ARTIFACT, run_id=run_id)
    return {"uri": uri, "run_id": run_id, "models_uri": f"models:/uri-model/{version.version}",
            "model": model, "checkpoint": ckpt, "experiment_id": exp}


@pytest.fixture
def user_env(store, tmp_path, monkeypatch):
    """MLFLOW_TRACKING_URI points at the store; the cwd is another folder (where ./mlflow.db would go)."""
    import mlflow

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    assert mlflow.get_tracking_uri() == store["uri"]
    yield cwd
    assert not (cwd / "mlflow.db").exists(), "something used the default store in the cwd"


def _env_changes(before: dict[str, str]) -> dict[str, tuple]:
    after = dict(os.environ)
    return {k: (before.get(k), after.get(k)) for k in set(before) | set(after) if before.get(k) != after.get(k)}


@pytest.mark.parametrize("which", ["runs", "models"])
def test_fetching_a_source_keeps_the_users_tracking_uri(store, user_env, which):
    """What `cvlab eval` does: resolve the source with the spec's tracking URI, then the lifecycle resolves
    the URI again for the evaluation run. Both are the store MLFLOW_TRACKING_URI names."""
    import mlflow

    from orchestrator.inference.sources import resolve_source
    from orchestrator.tracking.server import resolve_tracking_uri

    spec = ExperimentSpec.model_validate({})
    src = f"runs:/{store['run_id']}/checkpoints/best" if which == "runs" else store["models_uri"]
    source = resolve_source(src, tracking_uri=resolve_tracking_uri(spec))
    assert Path(source.path).name == "model.pt" and Path(source.path).is_file()
    assert source.run_id == store["run_id"] and source.format == "cvlab"
    assert os.environ.get("MLFLOW_TRACKING_URI") == store["uri"]
    assert mlflow.get_tracking_uri() == store["uri"]
    assert resolve_tracking_uri(spec) == store["uri"]  # the eval run's store, not ./mlflow.db


def test_sources_resolve_through_the_given_uri_not_the_environment(store, user_env, monkeypatch, tmp_path):
    """An explicit tracking URI wins over MLFLOW_TRACKING_URI (which points at an empty store here), for
    `models:/` too (MLflow's own models:/ resolution would ask the process-wide registry)."""
    from orchestrator.inference.sources import resolve_source

    other = f"sqlite:///{tmp_path}/other.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    source = resolve_source(store["models_uri"], tracking_uri=store["uri"])
    assert Path(source.path).is_file() and source.run_id == store["run_id"]
    fetched = resolve_source(f"runs:/{store['run_id']}/checkpoints/best", tracking_uri=store["uri"],
                             download_dir=str(tmp_path / "dl"))
    assert Path(fetched.path).read_bytes() == Path(store["checkpoint"]).read_bytes()
    assert os.environ["MLFLOW_TRACKING_URI"] == other


@pytest.mark.parametrize("text, shown", [("first line\nsecond line", "first line"), ("", "")])
def test_a_failed_fetch_shows_the_first_line_of_mlflow_s_message(store, monkeypatch, text, shown):
    from orchestrator.errors import CvlabError
    from orchestrator.inference import sources

    def refuse(**kwargs):
        raise RuntimeError(text)

    monkeypatch.setattr(sources.mlflow.artifacts, "download_artifacts", refuse)
    with pytest.raises(CvlabError) as err:
        sources.resolve_source("runs:/abc/model", tracking_uri=store["uri"])
    assert str(err.value) == f"cannot fetch runs:/abc/model from MLflow at {store['uri']}: {shown}"


def test_fetched_sources_say_where_they_went_and_bad_ones_are_named(store, user_env, tmp_path):
    """Without an explicit URI the user's (MLFLOW_TRACKING_URI) is used; the download is noted; a malformed
    `models:/` URI and a missing run are refused with the URI and the store named."""
    from orchestrator.errors import CvlabError
    from orchestrator.inference.sources import resolve_source

    src = f"runs:/{store['run_id']}/checkpoints/best"
    source = resolve_source(src, download_dir=str(tmp_path / "dl"))
    assert source.path == str(tmp_path / "dl" / "best" / "model.pt") and source.run_id == store["run_id"]
    assert source.notes == [f"downloaded {src} to {tmp_path / 'dl' / 'best'}"] and source.given == src
    for bad in ("models:/uri-model", "models:/uri-model/latest", "models://1"):
        with pytest.raises(CvlabError) as err:
            resolve_source(bad, tracking_uri=store["uri"])
        assert str(err.value) == f"model source {bad}: expected models:/<name>/<version> (a version number)"
    run_id = "0123456789abcdef0123456789abcdef"
    with pytest.raises(CvlabError) as err:  # MLflow's message, its first line
        resolve_source(f"runs:/{run_id}/checkpoints/best", tracking_uri=store["uri"], download_dir=str(tmp_path))
    assert str(err.value) == (f"cannot fetch runs:/{run_id}/checkpoints/best from MLflow at {store['uri']}: Run with "
                              f"id={run_id} not found")


def test_loading_a_fetched_classifier_leaves_the_environment_alone(store, user_env):
    from orchestrator.inference.classifier import load_classifier
    from orchestrator.inference.sources import resolve_source

    before = dict(os.environ)
    for src in (f"runs:/{store['run_id']}/checkpoints/best", store["models_uri"]):
        classifier = load_classifier(resolve_source(src, tracking_uri=store["uri"]))
        assert classifier.classes == CLASSES
    assert _env_changes(before) == {}


def test_logging_a_model_leaves_the_environment_alone(store, user_env):
    """`log_classifier_model` (the end of a classification run) logs and registers into the store it is
    given, without touching os.environ or MLflow's process-wide tracking URI."""
    import mlflow

    from orchestrator.inference.classifier import Classifier
    from orchestrator.tracking.models import log_classifier_model
    from orchestrator.tracking.runs import create_run, make_client

    client = make_client(store["uri"])
    run_id = create_run(client, store["experiment_id"], "logs-a-model")
    classifier = Classifier(store["model"], "cednet26", CLASSES, input_config(DataSection(image_size=32)))
    before = dict(os.environ)
    model_uri = log_classifier_model(store["uri"], run_id, classifier, store["checkpoint"],
                                     registered_model_name="uri-logged")
    # torch.export itself sets TORCHINDUCTOR_CACHE_DIR the first time it runs in a process.
    assert set(_env_changes(before)) <= {"TORCHINDUCTOR_CACHE_DIR"}, _env_changes(before)
    assert os.environ["MLFLOW_TRACKING_URI"] == store["uri"] and mlflow.get_tracking_uri() == store["uri"]
    assert mlflow.active_run() is None and client.get_run(run_id).info.status == "RUNNING"
    logged = client.get_logged_model(model_uri.split("/")[-1])
    assert logged.source_run_id == run_id and str(logged.status) == "READY"
    (version,) = client.search_model_versions("name='uri-logged'")
    assert version.run_id == run_id

    from orchestrator.inference.sources import resolve_source  # the registered version is a usable source

    source = resolve_source(f"models:/uri-logged/{version.version}", tracking_uri=store["uri"])
    assert source.path.endswith("model.pt") and source.run_id == run_id


# Ways of steering MLflow through process-wide state; cvlab passes URIs explicitly instead.
FORBIDDEN = [
    re.compile(r"_use_tracking_uri"),
    re.compile(r"\bset_tracking_uri\("),
    re.compile(r"\bset_registry_uri\("),
    re.compile(r"environ\s*\[\s*['\"]MLFLOW_(TRACKING|REGISTRY)_URI['\"]\s*\]\s*="),
    re.compile(r"environ\.(setdefault|pop|update)\(\s*['\"]?MLFLOW_(TRACKING|REGISTRY)_URI"),
    re.compile(r"setenv\(\s*['\"]MLFLOW_(TRACKING|REGISTRY)_URI"),
]


def test_no_code_sets_mlflows_process_wide_tracking_uri():
    found = []
    for folder in ("orchestrator", "workloads"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if any(p.search(line) for p in FORBIDDEN):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert found == [], "pass the tracking URI explicitly instead:\n" + "\n".join(found)
