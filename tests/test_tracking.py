"""orchestrator.tracking: URI resolution, reachability, experiments, params, epoch logging, run ends."""
from __future__ import annotations

import pickle
import time

import pytest

from orchestrator.errors import CvlabError
from orchestrator.config.schema import DataSection, ExperimentSpec
from orchestrator.jobs.classification import input_config


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    """One MLflow database for the module (creating one takes seconds)."""
    path = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{path}/mlflow.db", path


def _spec(**tracking):
    return ExperimentSpec.model_validate({"tracking": tracking})


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    from orchestrator.tracking.server import default_artifact_location, resolve_tracking_uri

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(_spec()) == f"sqlite:///{tmp_path}/mlflow.db"
    assert default_artifact_location(f"sqlite:///{tmp_path}/mlflow.db") == (tmp_path / "mlartifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert resolve_tracking_uri(_spec()) == "http://mlflow.example:5000"
    assert default_artifact_location("http://mlflow.example:5000") is None
    # The YAML wins; relative sqlite paths become absolute (Ray workers run elsewhere).
    assert resolve_tracking_uri(_spec(tracking_uri="sqlite:///sub/x.db")) == f"sqlite:///{tmp_path}/sub/x.db"
    assert resolve_tracking_uri(_spec(tracking_uri="sqlite:////abs/x.db")) == "sqlite:////abs/x.db"


def test_ui_link_opens_the_model_training_view():
    from orchestrator.tracking.server import ui_link

    view = "?workflowType=machine_learning"
    assert ui_link("http://127.0.0.1:5000", "1") == "http://127.0.0.1:5000/#/experiments/1" + view
    assert ui_link("https://mlflow.example/", "7", "abc") == "https://mlflow.example/#/experiments/7/runs/abc" + view
    assert ui_link("http://cvlab-mlflow:5000", None) == "http://cvlab-mlflow:5000/#/experiments" + view
    for local in ("sqlite:////tmp/mlflow.db", "file:///tmp/mlruns", "databricks"):
        assert ui_link(local, "1", "abc") is None  # no UI of its own
    with pytest.raises(ValueError, match="experiment id"):
        ui_link("http://127.0.0.1:5000", None, "abc")


def test_unreachable_server_is_a_clear_error():
    from orchestrator.tracking.server import check_tracking_server

    start = time.perf_counter()
    with pytest.raises(CvlabError, match=r"MLflow tracking server http://127\.0\.0\.1:9 is unreachable.*not started"):
        check_tracking_server("http://127.0.0.1:9", timeout=2)
    assert time.perf_counter() - start < 10


def test_experiment_run_params_and_epoch_logger(db):
    from orchestrator.names import ERROR_TAG
    from orchestrator.tracking.metric_logger import MlflowMetricLogger
    from orchestrator.tracking.runs import create_run, end_run, ensure_experiment, log_params, make_client

    uri, path = db
    client = make_client(uri)
    exp = ensure_experiment(client, "exp", (path / "art").as_uri())
    assert ensure_experiment(client, "exp") == exp  # idempotent
    client.delete_experiment(exp)
    assert ensure_experiment(client, "exp") == exp  # a deleted experiment is restored
    run_id = create_run(client, exp, "r", tags={"a": "b"})
    child = create_run(client, exp, "child", parent_run_id=run_id)
    assert client.get_run(child).data.tags["mlflow.parentRunId"] == run_id

    params = {f"p{i}": i for i in range(150)}  # more than one MLflow batch
    assert log_params(client, run_id, params) == {}
    assert len(client.get_run(run_id).data.params) == 150
    assert log_params(client, run_id, {"p1": 1, "p2": 5, "new": "x"}) == {"p2": ("2", "5")}
    assert client.get_run(run_id).data.params["new"] == "x"

    logger = pickle.loads(pickle.dumps(MlflowMetricLogger(uri, run_id)))  # it travels to Ray workers
    assert logger.logged_epochs() == set()
    logger.log_epoch(1, {"epoch": 1, "val/top1": 0.5, "train/loss": 2.0})
    logger.log_epoch(2, {"epoch": 2, "val/top1": 0.7, "train/loss": 1.0})
    assert logger.logged_epochs() == {1, 2}
    data = client.get_run(run_id).data
    assert data.metrics["val/top1"] == 0.7 and "epoch" not in data.metrics

    end_run(client, run_id, "FAILED", error="boom")
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags[ERROR_TAG] == "boom"


def test_logged_classifier_loads_and_predicts_without_pickle(db, tmp_path, caplog, monkeypatch):
    """The logged MLflow model: a pyfunc "model from code" with a signature and an input example, whose
    predict() gives class probabilities named by class; logging it pickles nothing (no MLflow warning), logging
    and loading it raise no MLflow warning about predict()'s type hints, and the run stays open for its caller
    to end."""
    import logging
    import warnings

    import mlflow
    import numpy as np
    import torch

    from orchestrator.inference.classifier import Classifier
    from orchestrator.tracking.models import log_classifier_model
    from orchestrator.tracking.runs import create_run, ensure_experiment, make_client
    from workloads.models import build_model, save_checkpoint

    uri, path = db
    client = make_client(uri)
    exp = ensure_experiment(client, "models", (path / "art").as_uri())
    run_id = create_run(client, exp, "r")
    classes = ["cat", "dog", "eel"]
    torch.manual_seed(0)
    model = build_model("cednet26", num_classes=3).eval()
    inputs = input_config(DataSection(image_size=32))
    ckpt = save_checkpoint(tmp_path / "model.pt", model, extra={"classes": classes})
    # MLflow shows its type-hint warning "once" per process: forget earlier ones so that this test sees it.
    monkeypatch.setattr(warnings, "onceregistry", {})
    with caplog.at_level(logging.WARNING, logger="mlflow"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model_uri = log_classifier_model(uri, run_id, Classifier(model, "cednet26", classes, inputs), ckpt,
                                         registered_model_name="tiny")
    assert not [r for r in caplog.records if "pickle" in r.getMessage().lower()]
    assert client.get_run(run_id).info.status == "RUNNING"
    assert mlflow.active_run() is None
    logged = client.get_logged_model(model_uri.split("/")[-1])
    assert logged.experiment_id == exp and logged.source_run_id == run_id
    (version,) = client.search_model_versions("name='tiny'")
    assert version.run_id == run_id

    mlflow.set_tracking_uri(uri)
    try:
        with warnings.catch_warnings(record=True) as caught_loading:
            warnings.simplefilter("always")
            loaded = mlflow.pyfunc.load_model(model_uri)
    finally:
        mlflow.set_tracking_uri(None)
    hints = [str(w.message) for w in caught + caught_loading
             if issubclass(w.category, UserWarning) and "predict" in str(w.message)]
    assert not hints, hints
    info = loaded.metadata
    assert info.get_input_schema().inputs[0].shape == (-1, 3, 32, 32)
    assert [c.name for c in info.get_output_schema().inputs] == classes
    assert info.saved_input_example_info is not None
    batch = np.random.default_rng(0).standard_normal((5, 3, 32, 32)).astype(np.float32)
    probs = loaded.predict(batch)
    assert list(probs.columns) == classes and probs.shape == (5, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    with torch.no_grad():
        expected = torch.softmax(model(torch.from_numpy(batch)), 1).numpy()
    np.testing.assert_allclose(probs.to_numpy(), expected, rtol=1e-4, atol=1e-6)
