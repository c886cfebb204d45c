"""Every place that loads a checkpoint refuses one whose unpickling would run code (README guarantee: files are
loaded with weights_only=True, mmengine and mmcv 1.x files only inside an explicit allow-list).

Each test feeds the shared `evil_pickle` fixture (conftest) to one loader; the fixture fails the test if its
canary file appears, so a loader switched to weights_only=False is caught even when it raises afterwards."""
from __future__ import annotations

import pytest
import torch

from orchestrator.errors import CvlabError
from orchestrator.inference.sources import Source, read_classifier
from workloads.classification.checkpoint import read_training_checkpoint
from workloads.models import build_model, load_checkpoint, load_published_rednet, save_checkpoint
from workloads.models.checkpoint import FORMAT, read_published_file

REFUSED = "Weights only load failed|Unsupported global|UnpicklingError"


def _cvlab_file(payload):
    return {"format": FORMAT, "arch_name": "resnet26", "arch_overrides": {}, "state_dict": {}, "extra": payload}


def test_model_checkpoint(evil_pickle, tmp_path):
    path = evil_pickle.save(tmp_path / "model.pt", _cvlab_file)
    with pytest.raises(Exception, match=REFUSED):
        load_checkpoint(path)


def test_training_state_of_a_resumed_run(evil_pickle, tmp_path):
    save_checkpoint(tmp_path / "model.pt", build_model("resnet26", num_classes=2))
    evil_pickle.save(tmp_path / "train_state.pt", lambda p: {"epoch": 1, "payload": p})
    with pytest.raises(ValueError, match="unreadable .*UnpicklingError"):
        read_training_checkpoint(str(tmp_path))


def test_published_mmcls_rednet_file(evil_pickle, tmp_path):
    path = evil_pickle.save(tmp_path / "rednet26.pth", lambda p: {"meta": {"x": p}, "state_dict": {}})
    with pytest.raises(Exception, match=REFUSED):
        read_published_file(path)
    with pytest.raises(Exception, match=REFUSED):
        load_published_rednet(build_model("rednet26"), str(path))


def test_model_source_of_eval_predict_export(evil_pickle, tmp_path):
    path = evil_pickle.save(tmp_path / "model.pt", _cvlab_file)
    with pytest.raises(CvlabError, match="cannot read .*(Weights only load failed|UnpicklingError)"):
        read_classifier(Source(path=str(path), format="cvlab", given=str(path)))


def test_mmdet_and_mmseg_checkpoints(evil_pickle, tmp_path):
    pytest.importorskip("mmengine")
    from mmengine.runner import CheckpointLoader

    from workloads.mmlab.checkpoints import allow_mmengine_checkpoints, load_checkpoint_file

    path = evil_pickle.save(tmp_path / "epoch_1.pth", lambda p: {"meta": {"hook_msgs": p}, "state_dict": {}})
    with pytest.raises(Exception, match=REFUSED):
        load_checkpoint_file(path)
    # mmengine's own loader (the Runner's resume and `load_from`) inside our allow-list
    with allow_mmengine_checkpoints(), pytest.raises(Exception, match=REFUSED):
        CheckpointLoader.load_checkpoint(str(path), map_location="cpu")


def test_logged_mlflow_model_checkpoint(evil_pickle, tmp_path):
    from types import SimpleNamespace

    from workloads.classification.pyfunc_model import ClassifierModel

    path = evil_pickle.save(tmp_path / "model.pt", _cvlab_file)
    context = SimpleNamespace(artifacts={"checkpoint": str(path), "program": str(tmp_path / "none.pt2")})
    with pytest.raises(Exception, match=REFUSED):
        ClassifierModel().load_context(context)


def test_the_canary_works(evil_pickle, tmp_path):
    """The fixture's payload really runs code under weights_only=False (so the tests above could fail)."""
    path = evil_pickle.save(tmp_path / "model.pt", _cvlab_file)
    torch.load(path, weights_only=False)
    assert evil_pickle.canary.exists()
    evil_pickle.canary.unlink()  # the fixture's own check must pass


def test_mmengine_loader_honours_map_location(tmp_path):
    """The allow-listed loader still loads what it should, where the caller asks (meta: no memory)."""
    pytest.importorskip("mmengine")
    from workloads.mmlab.checkpoints import load_checkpoint_file

    torch.save({"meta": {"epoch": 1}, "state_dict": {"w": torch.ones(2)}}, tmp_path / "ok.pth")
    assert load_checkpoint_file(tmp_path / "ok.pth")["state_dict"]["w"].device.type == "cpu"
    assert load_checkpoint_file(tmp_path / "ok.pth", map_location="meta")["state_dict"]["w"].is_meta
