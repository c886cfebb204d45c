"""The `cvlab` command line: fast help, exit codes, `data make-imagenet`, `validate`, the summaries' UI links."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.cli import main
from orchestrator.config.loader import spec_from_dict

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def test_help_is_fast_and_lists_the_verbs():
    out = subprocess.run(check=False, args=[sys.executable, "-m", "orchestrator", "--help"], cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for verb in ("data", "validate"):
        assert verb in out.stdout
    # Fast means no heavy import just to build the parser.
    code = ("import sys; from orchestrator.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'ray', 'mlflow', 'mmdet', 'torchvision') if m in sys.modules))")
    out = subprocess.run(check=False, args=[sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"heavy modules imported by `cvlab --help`: {out.stdout}"


def test_unknown_verb_and_missing_subverb_exit_2(capsys):
    assert main(["no-such-verb"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert main(["data"]) == 2
    assert main([]) == 2
    out = subprocess.run(check=False, args=[sys.executable, "-m", "orchestrator", "frobnicate"], cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr


def test_data_make_imagenet(tmp_path, capsys):
    root = tmp_path / "tiny"
    args = ["data", "make-imagenet", str(root), "--classes", "3", "--per-class", "4", "--size", "32",
            "--val-per-class", "2", "--seed", "5"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "train_images: 12" in out and "val_images: 6" in out
    for split, per in (("train", 4), ("val", 2)):
        classes = sorted((root / split).iterdir())
        assert len(classes) == 3
        assert all(len(list(c.glob("*.JPEG"))) == per for c in classes)
    assert main(args) == 0  # idempotent: the same data set again is reused
    assert "reusing" in capsys.readouterr().out

    assert main(args[:3] + ["--classes", "4", "--per-class", "4", "--size", "32"]) == 2
    assert "different parameters" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    assert main(["data", "make-imagenet", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cvlab: error: data make-imagenet: refusing to write into") and "Traceback" not in err
    assert main(["data", "make-imagenet", str(tmp_path / "x"), "--classes", "1"]) == 2
    assert "classes must be an integer" in capsys.readouterr().err


def test_data_make_coco_and_cityscapes_write_sets_that_pass_their_checks(tmp_path, capsys):
    from workloads.detection.coco_check import check_coco_dataset
    from workloads.segmentation.cityscapes import check_cityscapes_dataset

    assert main(["data", "make-coco", str(tmp_path / "coco"), "--images", "3", "--val-images", "2",
                 "--size", "64"]) == 0
    report = check_coco_dataset(tmp_path / "coco")
    assert report["train"]["images"] == 3 and report["val"]["images"] == 2
    assert main(["data", "make-cityscapes", str(tmp_path / "cs"), "--images", "3", "--val-images", "2",
                 "--height", "64", "--width", "128"]) == 0
    report = check_cityscapes_dataset(tmp_path / "cs")
    assert report["train"]["images"] == 3 and report["val"]["images"] == 2
    capsys.readouterr()
    assert main(["data", "make-cityscapes", str(tmp_path / "cs2"), "--images", "0"]) == 2
    assert "must be >= 1" in capsys.readouterr().err


def test_validate_prints_resolved_yaml(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "workloads.models", None)  # the loader alone
    (tmp_path / "base.yaml").write_text("optim: {lr: 0.1, epochs: 3}\n")
    (tmp_path / "x.yaml").write_text("_base_: base.yaml\nmodel: {name: cednet26}\n")
    assert main(["validate", str(tmp_path / "x.yaml"), "--set", "optim.epochs=5"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("# sources: ") and "base.yaml" in text.splitlines()[0]
    spec = spec_from_dict(yaml.safe_load(text))
    assert spec.optim.epochs == 5 and spec.optim.lr == 0.1
    assert main(["validate", str(tmp_path / "x.yaml"), "--flat"]) == 0
    assert "optim.epochs = 3" in capsys.readouterr().out.splitlines()
    assert main(["validate", str(tmp_path / "x.yaml"), "--set", "optim.epoch=5"]) == 2
    assert capsys.readouterr().err.strip() == (
        "cvlab: error: --set optim.epoch=5: unknown path optim.epoch; did you mean optim.epochs?")


@pytest.mark.parametrize("model", ["cednet50", "rednet50", "resnet50"])
def test_validate_recipe_files(model, capsys):
    assert main(["validate", str(REPO / "experiments" / f"{model}_imagenet.yaml"), "--flat"]) == 0
    assert f"model.name = {model}" in capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("tracking_uri", ["http://mlflow.example:5000", "sqlite:///{tmp}/mlflow.db"])
def test_run_and_tune_print_the_mlflow_ui_link_of_a_tracking_server(tmp_path, capsys, monkeypatch, tracking_uri):
    """`cvlab run` ends with its run's UI link and `cvlab tune` with its parent run's, in the model-training
    view, when runs are tracked by a server (run_job and run_search are replaced: nothing starts)."""
    import orchestrator.runs.lifecycle
    import orchestrator.search.tune

    uri = tracking_uri.format(tmp=tmp_path)
    ids = {"tracking_uri": uri, "experiment_id": "3"}
    monkeypatch.setattr(orchestrator.runs.lifecycle, "run_job", lambda job, resume=False: {
        **ids, "run_id": "r1", "ray_run": str(tmp_path / "runs" / "x"), "seconds": 1.0, "metrics": {}})
    monkeypatch.setattr(orchestrator.search.tune, "run_search", lambda spec, resume=False, num_cpus=None: {
        **ids, "parent_run_id": "p1", "search_name": "s", "trials": [], "best": None, "tune_path": "t",
        "interrupted": False, "statuses": {}})
    spec = {"data": {"root": str(tmp_path / "data")}, "tracking": {"tracking_uri": uri},
            "search": {"space": {"model.reduction_ratio": {"grid": [4, 8]}}}}
    (tmp_path / "x.yaml").write_text(yaml.safe_dump(spec))

    assert main(["run", str(tmp_path / "x.yaml")]) == 0
    run_out = capsys.readouterr().out
    assert main(["tune", str(tmp_path / "x.yaml")]) == 0
    tune_out = capsys.readouterr().out
    if uri.startswith("http"):
        view = "?workflowType=machine_learning"
        assert f"  MLflow UI       {uri}/#/experiments/3/runs/r1{view}\n" in run_out
        assert f"MLflow UI: {uri}/#/experiments/3/runs/p1{view}\n" in tune_out
    else:
        assert "MLflow UI" not in run_out + tune_out


def test_default_output_leaves_rays_internal_notes_for_verbose():
    """At the default verbosity Ray's error-level note about the preemption watcher's constructor arguments
    (Ray Train's own actor) and its token-authentication note are dropped; `-v` shows them. The end-to-end
    check is in test_reliability's interrupted run, whose resumed `cvlab run` has nothing on stderr."""
    code = """
import logging, os, re
from workloads.logs import configure
watcher = ("[2026-12-04 23:48:44,773 E 5427 5495] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' "
           "and ID: '7f67' has constructor arguments in the object store and max_restarts > 0. If the arguments ...")
auth = logging.getLogger("ray._private.authentication.authentication_token_setup")
note = logging.LogRecord(auth.name, logging.WARNING, "f", 1,
                         "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled", None, None)
other = logging.LogRecord(auth.name, logging.WARNING, "f", 1, "something else", None, None)
configure(0)
skip = os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"]
print(bool(re.search(skip, watcher)), bool(re.search(skip, "epoch 1 done: val/top1 0.5")),
      auth.filter(note), auth.filter(other))
configure(1)
print(auth.filter(note))
"""
    env = {k: v for k, v in ENV.items() if k != "RAY_DEDUP_LOGS_SKIP_REGEX"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "False", "False", "True", "True"]
