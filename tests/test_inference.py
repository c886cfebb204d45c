"""Trained models put to use (issue 15): `cvlab eval` of every kind of source, `cvlab predict`, `cvlab export`,
and what a run leaves for the MLflow UI (experiment kind, best metric, dataset input, system metrics).

One small classification run (module fixture, 2 CPU workers) provides the checkpoints and the logged model.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import sysconfig

import pytest

from orchestrator.config.schema import DataSection
from orchestrator.inference.classifier import load_classifier
from orchestrator.inference.sources import Source
from orchestrator.jobs.classification import input_config
from workloads.classification.synthetic import make_imagenet
from workloads.models import build_model, save_checkpoint


def _shard_eval(world: int, rank: int = 0, port: int | None = None, out: str | None = None) -> dict:
    """`evaluate_all_shards` of a fixed tiny classifier on 11 fixed samples, as worker `rank` of `world`
    (a gloo group when world > 1; rank 0 writes the result to `out`)."""
    import torch
    import torch.distributed as dist

    from workloads.classification.data import ShardSampler
    from workloads.classification.evaluation import evaluate_all_shards
    from workloads.runtime import WorkerRuntime

    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    gen = torch.Generator().manual_seed(0)
    images, targets = torch.randn(11, 6, generator=gen), torch.randint(0, 3, (11,), generator=gen)
    samples = [(images[i], targets[i], torch.tensor(i % 5 == 0)) for i in range(11)]  # with failure counts
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    loader = torch.utils.data.DataLoader(samples, batch_size=2, sampler=ShardSampler(11, rank, world))
    result = evaluate_all_shards(model, loader, ["a", "b", "c"], torch.nn.CrossEntropyLoss(),
                                 WorkerRuntime(rank=rank, world=world))
    if world > 1:
        dist.destroy_process_group()
    if out is not None and rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    return result


def _shard_eval_worker(rank, world, port, out):
    _shard_eval(world, rank, port, out)


def test_evaluation_sums_every_shard_exactly(tmp_path, free_port):
    """Two workers in a real gloo group (no Ray) report exactly what one process over the whole split reports:
    counts are summed across shards, every sample counted once (11 samples: uneven shards)."""
    import torch.multiprocessing as mp

    whole = _shard_eval(world=1)
    assert whole["eval/images"] == 11 and whole["eval/failed_images"] == 3
    mp.spawn(_shard_eval_worker, args=(2, free_port, str(tmp_path / "r.json")), nprocs=2)
    sharded = json.loads((tmp_path / "r.json").read_text())
    assert sharded["confusion"] == whole["confusion"] and sharded["per_class"] == whole["per_class"]
    for key in ("eval/top1", "eval/top5", "eval/images", "eval/failed_images"):
        assert sharded[key] == whole[key], key
    assert sharded["eval/loss"] == pytest.approx(whole["eval/loss"], rel=1e-12)


def test_evaluation_counts_match_a_direct_computation():
    """`evaluate_all_shards` in one process against plain torch: loss (with label smoothing), top-1, top-5,
    failures, per-class counts (None for a class without images) and the confusion matrix (row = true class);
    the model is evaluated in eval mode (its dropout off) and nothing is counted for an empty loader."""
    import torch

    from workloads.classification.evaluation import evaluate_all_shards
    from workloads.runtime import WorkerRuntime

    gen = torch.Generator().manual_seed(0)
    images, targets = torch.randn(13, 6, generator=gen), torch.randint(0, 7, (13,), generator=gen)
    samples = [(images[i], targets[i], torch.tensor(int(i % 4 == 0))) for i in range(13)]  # 4 failures
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Dropout(0.5)).train()  # class "h": no image
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    classes = list("abcdefgh")
    loader = torch.utils.data.DataLoader(samples, batch_size=4)
    result = evaluate_all_shards(model, loader, classes, criterion, WorkerRuntime())

    with torch.no_grad():
        logits = model.eval()(images)
    top5 = logits.topk(5, dim=1).indices.eq(targets[:, None]).any(dim=1)
    top1 = logits.argmax(1).eq(targets)
    confusion = [[int(((targets == t) & (logits.argmax(1) == p)).sum()) for p in range(8)] for t in range(8)]
    assert result["eval/loss"] == pytest.approx(criterion(logits, targets).item(), rel=1e-6)
    assert (result["eval/top1"], result["eval/top5"]) == (int(top1.sum()) / 13, int(top5.sum()) / 13)
    assert 0 < result["eval/top1"] < result["eval/top5"] < 1
    assert (result["eval/images"], result["eval/failed_images"]) == (13, 4)
    assert result["confusion"] == confusion
    per_class = {}
    for c, name in enumerate(classes):
        n = int((targets == c).sum())
        per_class[name] = {"images": n, "top1": int(top1[targets == c].sum()) / n if n else None,
                           "top5": int(top5[targets == c].sum()) / n if n else None}
    assert result["per_class"] == per_class and per_class["h"] == {"images": 0, "top1": None, "top5": None}

    empty = evaluate_all_shards(model, [], classes[:2], criterion, WorkerRuntime())
    assert empty == {"eval/loss": 0.0, "eval/top1": 0.0, "eval/top5": 0.0, "eval/images": 0, "eval/failed_images": 0,
                     "per_class": {c: {"images": 0, "top1": None, "top5": None} for c in "ab"},
                     "confusion": [[0, 0], [0, 0]]}


def test_eval_worker_evaluates_the_config_it_is_given(tmp_path, monkeypatch, caplog):
    """`eval_loop_per_worker` outside Ray (rank 0 of 1): the model of the config with exactly its weights, the
    validation split through the config's loader settings, reported with the bulky parts marked."""
    import logging

    import torch

    from workloads.classification import evaluation
    from workloads.classification.config import DataPlan
    from workloads.classification.data import ShardSampler, make_dataset
    from workloads.classification.transforms import build_val_transform
    from workloads.runtime import WorkerRuntime

    made = make_imagenet(tmp_path / "data", classes=3, per_class=2, size=32, val_per_class=2)
    plan = DataPlan(train_dir=str(tmp_path / "data" / "train"), val_dir=str(tmp_path / "data" / "val"),
                    classes=tuple(made["class_names"]))
    inputs = input_config(DataSection(image_size=32))
    torch.manual_seed(0)
    model = build_model("resnet26", num_classes=3, zero_init_residual=False).eval()
    cfg = evaluation.EvalConfig(model_name="resnet26", state_dict=model.state_dict(), data=plan,
                                model_overrides={"num_classes": 3, "zero_init_residual": False}, inputs=inputs,
                                batch_size=4, loader_workers=0, label_smoothing=0.2, autocast="fp32",
                                channels_last=False, verbosity=1)
    calls = {}
    monkeypatch.setattr(evaluation, "start_worker", lambda *args: calls.setdefault("start", args) and WorkerRuntime())
    monkeypatch.setattr(evaluation, "report_evaluation",
                        lambda result, rank, bulky=(): calls.setdefault("report", (result, rank, bulky)))
    real_loader = torch.utils.data.DataLoader

    def loader(dataset, **kwargs):
        calls["loader"] = kwargs
        return real_loader(dataset, **kwargs)

    monkeypatch.setattr(torch.utils.data, "DataLoader", loader)
    with caplog.at_level(logging.INFO, logger=evaluation.__name__):
        evaluation.eval_loop_per_worker(cfg)
    assert calls["start"] == (1, "fp32", False)
    kwargs = calls["loader"]
    sampler = kwargs.pop("sampler")
    assert isinstance(sampler, ShardSampler) and sampler.indices == list(range(6))
    assert kwargs == {"batch_size": 4, "num_workers": 0, "pin_memory": False}
    assert caplog.messages == ["evaluating resnet26 on 6 images (3 classes), 1 worker(s)"]
    result, rank, bulky = calls["report"]
    assert rank == 0 and bulky == ("per_class", "confusion")
    dataset = make_dataset(plan.val_dir, list(plan.classes), (), build_val_transform(inputs))
    expected = evaluation.evaluate_all_shards(model, real_loader(dataset, batch_size=4), list(plan.classes),
                                              torch.nn.CrossEntropyLoss(label_smoothing=0.2), WorkerRuntime())
    assert result == expected and result["eval/images"] == 6

    # A shard set: the stream is this rank's share already (no sampler); the same images, the same counts.
    from workloads.classification.config import ShardPlan
    from workloads.classification.shard_manifest import read_manifest
    from workloads.classification.shard_writer import write_shards

    write_shards(str(tmp_path / "data"), str(tmp_path / "shards"), shard_size_mb=0.001, progress=lambda _: None)
    shards = read_manifest(str(tmp_path / "shards"))
    streamed = ShardPlan(location=str(tmp_path / "shards"), classes=shards.classes, train_shards=(),
                         val_shards=tuple(shards.shards("val")), train_images=0, val_images=shards.samples("val"))
    assert len(streamed.val_shards) > 1 and streamed.classes == plan.classes
    caplog.clear()
    calls.clear()
    with caplog.at_level(logging.INFO, logger=evaluation.__name__):
        evaluation.eval_loop_per_worker(dataclasses.replace(cfg, data=streamed))
    assert calls["loader"] == {"batch_size": 4, "num_workers": 0, "pin_memory": False, "sampler": None}
    assert caplog.messages == ["evaluating resnet26 on 6 images (3 classes), 1 worker(s)"]
    by_stream = calls["report"][0]
    assert by_stream["eval/loss"] == pytest.approx(expected["eval/loss"], rel=1e-6)
    assert {k: v for k, v in by_stream.items() if k != "eval/loss"} == \
        {k: v for k, v in expected.items() if k != "eval/loss"}
    # With two workers a stream is this rank's share (3 images); the log names the whole split.
    monkeypatch.setattr(evaluation, "start_worker", lambda *args: WorkerRuntime(rank=0, world=2))
    caplog.clear()
    calls.clear()
    with caplog.at_level(logging.INFO, logger=evaluation.__name__):
        evaluation.eval_loop_per_worker(dataclasses.replace(cfg, data=streamed))
    assert caplog.messages == ["evaluating resnet26 on 6 images (3 classes), 2 worker(s)"]
    assert calls["report"][0]["eval/images"] == 3  # outside a process group nothing is summed over workers
    with pytest.raises(RuntimeError, match='Unexpected key\\(s\\) in state_dict: "extra"'):  # strict loading
        evaluation.eval_loop_per_worker(dataclasses.replace(cfg, state_dict={**cfg.state_dict, "extra": torch.ones(1)}))


def test_evaluate_shard_counts_ranks_exactly_in_float64():
    """`evaluate_shard` on logits given as images: the target of sample i ranked i+1 of 7, so top-1 and top-5
    count exactly 1 and 5; the sums are float64 / int64 and the loss sum is each batch's loss times its size,
    unrounded. `summarize_totals` divides by the image count (one image: by one; none: nothing to divide)."""
    import torch

    from workloads.classification.evaluation import evaluate_shard, summarize_totals
    from workloads.classification.data import split_dataset
    from workloads.runtime import WorkerRuntime

    order = torch.arange(7, 0, -1, dtype=torch.float32) / 7  # descending scores
    logits, targets = [], []
    for i in range(7):
        ranked = torch.roll(torch.arange(7), -i)  # class ranked[r] gets the r-th highest score
        row = torch.empty(7)
        row[ranked] = order
        logits.append(row * 3.1)
        targets.append(int(ranked[i]))  # the class with rank i+1
    logits, targets = torch.stack(logits), torch.tensor(targets)
    assert [int((logits[i] > logits[i, targets[i]]).sum()) for i in range(7)] == list(range(7))
    samples = [(logits[i], targets[i], torch.tensor(0)) for i in range(7)]
    loader = torch.utils.data.DataLoader(samples, batch_size=3)  # batches of 3, 3 and 1
    criterion = torch.nn.CrossEntropyLoss()
    totals, confusion, top5_per_class = evaluate_shard(torch.nn.Identity(), loader, 7, criterion, WorkerRuntime())
    assert (totals.dtype, confusion.dtype, top5_per_class.dtype) == (torch.float64, torch.int64, torch.int64)
    loss_sum = sum(criterion(logits[s:s + 3], targets[s:s + 3]).item() * len(targets[s:s + 3]) for s in (0, 3, 6))
    assert totals.tolist() == [loss_sum, 1.0, 5.0, 7.0, 0.0]
    assert int(top5_per_class.sum()) == 5 and int(confusion.sum()) == 7 and int(confusion.trace()) == 1

    one = summarize_totals(torch.tensor([0.5, 1.0, 1.0, 1.0, 0.0], dtype=torch.float64))
    assert one == {"loss": 0.5, "top1": 1.0, "top5": 1.0, "failures": 0.0}
    assert summarize_totals(torch.zeros(5, dtype=torch.float64)) == {"loss": 0.0, "top1": 0.0, "top5": 0.0,
                                                                     "failures": 0.0}
    with pytest.raises(ValueError, match="split must be 'train' or 'val', got 'VAL'"):
        split_dataset(None, "VAL", None, rank=0, world=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_cluster):
    from orchestrator.cli.run import run_experiment
    from orchestrator.config.loader import spec_from_dict

    tmp = tmp_path_factory.mktemp("inference")
    make_imagenet(tmp / "data", classes=4, per_class=8, size=32, val_per_class=3)
    spec = spec_from_dict({
        "experiment": {"name": "infer", "seed": 0},
        "model": {"name": "cednet26"},
        "data": {"root": str(tmp / "data"), "image_size": 32, "batch_size": 4, "num_workers": 0},
        "optim": {"epochs": 2, "lr": 0.05, "scale_lr": False, "warmup_epochs": 0.5},
        "scaling": {"num_workers": 2},
        "run": {"storage_path": str(tmp / "runs"), "log_every": 100},
        "tracking": {"tracking_uri": f"sqlite:///{tmp}/mlflow.db", "experiment_name": "cvlab-infer",
                     "register_model": "infer-clf"},
    })
    summary = run_experiment(spec)
    return {"tmp": tmp, "spec": spec, "summary": summary, "uri": summary["tracking_uri"]}


def _yaml(trained) -> str:
    import yaml

    from orchestrator.config.loader import spec_to_dict

    path = trained["tmp"] / "infer.yaml"
    path.write_text(yaml.safe_dump(spec_to_dict(trained["spec"])))
    return str(path)


@pytest.mark.slow
def test_run_leaves_what_the_mlflow_ui_compares(trained):
    from mlflow import MlflowClient

    client = MlflowClient(trained["uri"])
    run = client.get_run(trained["summary"]["run_id"])
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    top1 = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val/top1")}
    best_epoch = max(top1, key=lambda e: (top1[e], -e))
    assert run.data.metrics["best/val_top1"] == top1[best_epoch]
    assert run.data.metrics["best/epoch"] == best_epoch
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == "data" and json.loads(dataset.dataset.profile)["classes"] == 4
    system = [k for k in run.data.metrics if k.startswith("system/")]
    assert "system/cpu_utilization_percentage" in system and "system/system_memory_usage_megabytes" in system


@pytest.mark.slow
def test_eval_gives_exactly_the_logged_val_top1(trained, tmp_path, monkeypatch, capsys):
    """`cvlab eval` of the final checkpoint, data-parallel over 2 workers, reproduces the training's last
    val/top1 (and val/loss) exactly; the results go to a new run of the experiment tagged with the source run,
    in the store MLFLOW_TRACKING_URI names (not ./mlflow.db of the current folder). The Ray Train run folder,
    runs:/ and models:/ all resolve to the same weights, so one evaluation covers them."""
    import torch
    import yaml
    from mlflow import MlflowClient

    from orchestrator.cli import main
    from orchestrator.inference.sources import read_classifier, resolve_source

    summary = trained["summary"]
    sources = [summary["ray_run"], f"runs:/{summary['run_id']}/checkpoints/last", "models:/infer-clf/1"]
    weights = [read_classifier(resolve_source(s, tracking_uri=trained["uri"], download_dir=str(tmp_path / str(i))))[2]
               for i, s in enumerate(sources)]
    for other in weights[1:]:
        assert other.keys() == weights[0].keys() and all(torch.equal(other[k], weights[0][k]) for k in other)

    spec = yaml.safe_load(open(_yaml(trained)))
    spec["tracking"]["tracking_uri"] = None  # taken from the environment, as users point at a server
    (tmp_path / "infer.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained["uri"])
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["eval", "infer.yaml", "--checkpoint", sources[2]]) == 0
    out = capsys.readouterr().out
    assert not (tmp_path / "mlflow.db").exists()
    client = MlflowClient(trained["uri"])
    train = client.get_run(summary["run_id"])
    exp = train.info.experiment_id
    evals = client.search_runs([exp], "tags.`cvlab.job` = 'eval'", order_by=["attributes.start_time DESC"])
    ev = evals[0]
    assert ev.info.status == "FINISHED" and ev.data.tags["cvlab.source_run"] == summary["run_id"]
    last_epoch = int(summary["metrics"]["epoch"])
    logged = {k: {m.step: m.value for m in client.get_metric_history(summary["run_id"], k)}[last_epoch]
              for k in ("val/top1", "val/top5", "val/loss")}
    assert ev.data.metrics["eval/top1"] == logged["val/top1"]
    assert ev.data.metrics["eval/top5"] == logged["val/top5"]
    assert ev.data.metrics["eval/loss"] == pytest.approx(logged["val/loss"], rel=1e-6)
    assert ev.data.metrics["eval/images"] == 12
    names = {a.path for a in client.list_artifacts(ev.info.run_id)}
    assert {"per_class_accuracy.csv", "per_class_accuracy.md", "confusion_matrix.png"} <= names
    assert f"top-1 {logged['val/top1']:.4f}" in out


@pytest.mark.slow
def test_eval_refuses_a_checkpoint_of_other_classes(trained, tmp_path, capsys):
    from orchestrator.cli import main

    make_imagenet(tmp_path / "other", classes=3, per_class=2, size=32, val_per_class=2)
    assert main(["eval", _yaml(trained), "--checkpoint", trained["summary"]["ray_run"],
                 "--set", f"data.root={tmp_path / 'other'}"]) == 2
    assert "was trained on 4 classes" in capsys.readouterr().err


@pytest.mark.slow
def test_predict_names_classes_and_writes_kernel_maps(trained, tmp_path, capsys):
    from orchestrator.cli import main

    val = trained["tmp"] / "data" / "val"
    images = sorted(str(p) for p in val.glob("*/*.JPEG"))[:2]
    classes = sorted(os.listdir(val))
    capsys.readouterr()
    assert main(["predict", "--model", trained["summary"]["ray_run"], *images, "--topk", "3",
                 "--kernels", str(tmp_path / "k")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == images[0] and len([ln for ln in out if ln.startswith("  ")]) == 6
    probs = [float(ln.split()[0]) for ln in out[1:4]]
    assert probs == sorted(probs, reverse=True) and all(ln.split()[1] in classes for ln in out[1:4])
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == sorted(
        os.path.basename(i).replace(".JPEG", "_kernels.png") for i in images)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "pt2"])
def test_export_matches_pytorch(trained, tmp_path, fmt, capsys):
    from orchestrator.cli import main

    out = tmp_path / f"model.{fmt}"
    capsys.readouterr()
    assert main(["export", "--model", f"runs:/{trained['summary']['run_id']}/checkpoints/best",
                 "--tracking-uri", trained["uri"], "--format", fmt, str(out)]) == 0
    text = capsys.readouterr().out
    diff = float(text.split("random batch: ")[1].split()[0])
    assert out.is_file() and diff < 1e-4, text
    if fmt == "onnx":  # exporting is the slow part (~30 s): check the same file runs without this project
        _runs_with_onnxruntime_alone(trained, out, tmp_path)


def _runs_with_onnxruntime_alone(trained, onnx_file, tmp_path):
    """The ONNX file runs in a Python without this project (no site .pth, no PYTHONPATH), with a batch
    size it was not exported with, and agrees with PyTorch."""
    import numpy as np
    import torch

    from orchestrator.inference.classifier import load_classifier
    from orchestrator.inference.sources import resolve_source

    classifier = load_classifier(resolve_source(trained["summary"]["ray_run"]))
    batch = np.random.default_rng(1).standard_normal((5, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "batch.npy", batch)
    code = (
        "import sys; sys.path.append(sys.argv[1])\n"
        "import importlib.util as u\n"
        "assert u.find_spec('workloads') is None and u.find_spec('orchestrator') is None\n"
        "import numpy as np, onnxruntime as ort\n"
        "s = ort.InferenceSession(sys.argv[2], providers=['CPUExecutionProvider'])\n"
        "np.save(sys.argv[4], s.run(None, {'images': np.load(sys.argv[3])})[0])\n"
    )
    site = sysconfig.get_paths()["purelib"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-S", "-c", code, site, str(onnx_file), str(tmp_path / "batch.npy"),
                    str(tmp_path / "out.npy")], cwd=tmp_path, env=env, check=True, timeout=300)
    got = np.load(tmp_path / "out.npy")
    with torch.no_grad():
        expected = classifier.model(torch.from_numpy(batch)).numpy()
    assert got.shape == (5, 4)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_eval_of_a_published_mmcls_rednet_file(trained, tmp_path, capsys):
    """A file in the published mmcls RedNet layout, with mmcv 1.x numpy scalars in its `meta`, evaluated with
    `--format mmcls` (the spec names the architecture): loaded under the allow-list, and its top-1 is exactly
    what the same weights score when evaluated here directly, image by image."""
    import numpy as np
    import torch
    from mlflow import MlflowClient
    from test_models import published_rednet_state_dict

    from orchestrator.cli import main
    from orchestrator.config.loader import load_spec
    from orchestrator.jobs.classification import prepare_data
    from workloads.classification.data import make_dataset
    from workloads.classification.transforms import build_val_transform
    from workloads.models import build_model, load_published_rednet

    payload = published_rednet_state_dict(26, num_classes=4, seed=3)
    payload["meta"]["hook_msgs"] = {"best_score": np.float64(0.61), "best_epoch": np.int64(90)}
    torch.save(payload, tmp_path / "rednet26_published.pth")
    capsys.readouterr()
    assert main(["eval", _yaml(trained), "--checkpoint", str(tmp_path / "rednet26_published.pth"),
                 "--format", "mmcls", "--set", "model.name=rednet26"]) == 0, capsys.readouterr().err

    spec = load_spec(_yaml(trained), ["model.name=rednet26"])
    data = prepare_data(spec)
    model = build_model("rednet26", num_classes=4).eval()
    load_published_rednet(model, payload)
    val = make_dataset(data.val_dir, list(data.classes), data.val_skip, build_val_transform(input_config(spec.data)))
    with torch.no_grad():
        items = [val[i] for i in range(len(val))]  # (image, label, unreadable files skipped)
        correct = sum(int(model(image[None]).argmax(1).item() == label) for image, label, _ in items)

    client = MlflowClient(trained["uri"])
    exp = client.get_run(trained["summary"]["run_id"]).info.experiment_id
    ev = client.search_runs([exp], "tags.`cvlab.job` = 'eval'", order_by=["attributes.start_time DESC"])[0]
    assert ev.data.params["eval.format"] == "mmcls" and ev.data.params["eval.model"] == "rednet26"
    assert ev.data.metrics["eval/images"] == len(val) == 12
    assert ev.data.metrics["eval/top1"] == pytest.approx(correct / len(val), abs=1e-6)  # the same count


def _tiny_classifier():
    import torch

    from orchestrator.inference.classifier import Classifier

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    return Classifier(model=model.eval(), name="tiny", classes=list("abcd"),
                      inputs=input_config(DataSection(image_size=32)))


def test_export_check_measures_the_file_and_refuses_a_wrong_one(tmp_path, monkeypatch):
    """The export's numerical check compares the written file's output with PyTorch's: a faithful TorchScript
    file passes with a tiny difference; a file that computes something else is refused with the difference."""
    from orchestrator.errors import CvlabError
    from orchestrator.inference import export

    result = export.export_classifier(_tiny_classifier(), "torchscript", str(tmp_path / "m.pt"))
    assert 0 <= result["max_abs_diff"] < 1e-5 and result["input_shape"] == [-1, 3, 32, 32]
    real = export._EXPORTERS["torchscript"]
    monkeypatch.setitem(export._EXPORTERS, "torchscript", lambda *args: real(*args) + 0.25)
    with pytest.raises(CvlabError, match=r"largest absolute difference 0\.25 "):
        export.export_classifier(_tiny_classifier(), "torchscript", str(tmp_path / "m.pt"))


def test_load_classifier_reads_the_recorded_inputs_and_class_count(tmp_path, caplog):
    """A checkpoint records the worker's InputConfig and (in the model's overrides) num_classes: read back as
    they were; a file from before the inputs were recorded gets the schema's defaults (224 px, ImageNet)."""
    model = build_model("resnet26", num_classes=3)
    gray = input_config(DataSection(image_size=40, val_resize=48, grayscale=True, mean=[0.5], std=[0.25],
                                    interpolation="bicubic"))
    save_checkpoint(tmp_path / "new.pt", model, extra={"classes": list("abc"), "inputs": dataclasses.asdict(gray)})
    save_checkpoint(tmp_path / "old.pt", model, extra={"classes": list("abc")})
    new = load_classifier(Source(path=str(tmp_path / "new.pt"), format="cvlab", given="new"))
    assert new.inputs == gray and new.classes == list("abc") and new.input_shape == (1, 40, 40)
    old = load_classifier(Source(path=str(tmp_path / "old.pt"), format="cvlab", given="old"))
    assert old.inputs == input_config(DataSection()) and old.input_shape == (3, 224, 224)
    assert old.inputs.mean == (0.485, 0.456, 0.406) and old.inputs.resolved_val_resize == 256
    assert "old stores no input settings" in caplog.text


def test_read_classifier_takes_cvlab_files_and_names_every_other_file(tmp_path):
    import torch

    from orchestrator.errors import CvlabError
    from orchestrator.inference.sources import Source, read_classifier
    from workloads.models import build_model, save_checkpoint

    def src(path, fmt="cvlab"):
        return Source(path=str(path), format=fmt, given=f"given:{path.name}")

    model = build_model("resnet26", num_classes=3, zero_init_residual=False)
    good = save_checkpoint(tmp_path / "good.pt", model, extra={"classes": ["a", "b", "c"]})
    name, overrides, state, extra = read_classifier(src(tmp_path / "good.pt"))
    assert (name, overrides, extra) == ("resnet26", {"num_classes": 3, "zero_init_residual": False},
                                        {"classes": ["a", "b", "c"]})
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with pytest.raises(CvlabError) as err:
        read_classifier(src(tmp_path / "good.pt", "mmcls"))
    assert str(err.value) == ("given:good.pt is a mmcls checkpoint; classifiers read cvlab files here (published "
                              "mmcls files: --format mmcls with the experiment's model)")
    for payload in ({"state_dict": {}}, torch.zeros(2)):
        torch.save(payload, tmp_path / "other.pt")
        with pytest.raises(CvlabError) as err:
            read_classifier(src(tmp_path / "other.pt"))
        assert str(err.value) == (f"given:other.pt: {tmp_path / 'other.pt'} is not a cvlab model checkpoint (use "
                                  "--format mmcls for a published RedNet file)")
    (tmp_path / "cut.pt").write_bytes(open(good, "rb").read()[:1000])
    with pytest.raises(CvlabError) as err:
        read_classifier(src(tmp_path / "cut.pt"))
    assert str(err.value).startswith(f"given:cut.pt: cannot read {tmp_path / 'cut.pt'} (RuntimeError: ")
    assert "\n" not in str(err.value)  # the first line of torch's message only
    from orchestrator.inference import sources

    for error, shown in [(RuntimeError("\n  \nsecond line\nthird"), "RuntimeError: second line"),
                         (EOFError(), "EOFError: EOFError")]:  # no text: its type
        def load(*args, error=error, **kwargs):
            raise error

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(sources.torch, "load", load)
            with pytest.raises(CvlabError) as err:
                read_classifier(src(tmp_path / "good.pt"))
        assert str(err.value) == f"given:good.pt: cannot read {tmp_path / 'good.pt'} ({shown})"


def test_resolve_source_of_every_local_kind(tmp_path, monkeypatch):
    """A file as is; a checkpoint folder's model.pt; an MLflow model folder's artifacts/model.pt; a cvlab run
    folder's newest checkpoint and the MLflow run its record names; an mmengine folder's one .pth or its newest
    epoch/iter; and the message of each thing that is no source."""
    from orchestrator.errors import CvlabError
    from orchestrator.inference.sources import resolve_source, short_run_label
    from orchestrator.names import RUN_RECORD_FILE

    def touch(*parts):
        path = tmp_path.joinpath(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"weights")
        return path

    plain = touch("plain", "model.pt")
    assert resolve_source(str(plain)) == Source(path=str(plain), format="cvlab", given=str(plain))
    assert resolve_source(str(plain), fmt="mmcls").format == "mmcls"
    assert resolve_source(str(tmp_path / "plain")).path == str(plain)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_source("~/plain/model.pt") == Source(path=str(plain), format="cvlab", given="~/plain/model.pt")
    logged = touch("logged", "artifacts", "model.pt")
    assert resolve_source(str(tmp_path / "logged")).path == str(logged)

    run = tmp_path / "run"
    touch("run", "checkpoint_000000", "model.pt")
    touch("run", "checkpoint_000001", "model.pt")
    newest = touch("run", "checkpoint_000002", "model.pt")
    (run / "checkpoint_000003").mkdir()  # still being written: no model file yet
    touch("deep", "a", "b", "model.pt")
    (tmp_path / "deep" / RUN_RECORD_FILE).write_text(json.dumps({"mlflow_run_id": "too-far"}))
    (run / RUN_RECORD_FILE).write_text(json.dumps({"mlflow_run_id": "abc"}))
    assert resolve_source(str(run)) == Source(
        path=str(newest), format="cvlab", given=str(run), run_id="abc",
        notes=[f"{run} is a run folder: using its newest checkpoint checkpoint_000002"])
    for inside in (run / "checkpoint_000001", run / "checkpoint_000001" / "model.pt"):  # the record 1-2 levels up
        assert resolve_source(str(inside)).run_id == "abc"
    assert resolve_source(str(tmp_path / "deep" / "a" / "b" / "model.pt")).run_id is None  # 3 levels: not looked at

    one = touch("mm1", "best_top1.pth")
    assert resolve_source(str(tmp_path / "mm1")) == Source(path=str(one), format="mmengine", given=str(tmp_path / "mm1"))
    for name in ("epoch_2.pth", "epoch_10.pth", "iter_3.pth", "best_top1.pth", "epoch_x.pth"):
        touch("mm", name)
    assert resolve_source(str(tmp_path / "mm")) == Source(
        path=str(tmp_path / "mm" / "epoch_10.pth"), format="mmengine", given=str(tmp_path / "mm"),
        notes=[f"{tmp_path / 'mm'} holds 5 checkpoints: using the newest, epoch_10.pth"])
    assert resolve_source(str(tmp_path / "mm" / "iter_3.pth"), fmt="cvlab").format == "cvlab"
    touch("iters", "iter_500.pth")
    newest_iter = touch("iters", "iter_1000.pth")
    assert resolve_source(str(tmp_path / "iters")).path == str(newest_iter)  # by number, not by name

    touch("two", "a.pth")
    touch("two", "b.pth")
    for src, kwargs, message in [
        (str(plain), {"fmt": "onnx"}, "--format 'onnx': expected one of auto, cvlab, mmcls, mmengine"),
        ("  ", {}, "no model source given: pass a checkpoint path, runs:/<run_id>/<path> or models:/<name>/<v>"),
        (None, {}, "no model source given: pass a checkpoint path, runs:/<run_id>/<path> or models:/<name>/<v>"),
        (str(tmp_path / "nope"), {}, f"model source {tmp_path / 'nope'}: no such file or folder"),
        (str(tmp_path / "two"), {}, f"model source {tmp_path / 'two'}: {tmp_path / 'two'} holds no checkpoint "
                                    "(model.pt, checkpoint_*/ folders or one .pth file)"),
    ]:
        with pytest.raises(CvlabError) as err:
            resolve_source(src, **kwargs)
        assert str(err.value) == message

    assert short_run_label(Source(path="p", format="cvlab", given="g", run_id="abc")) == "abc"
    assert short_run_label(Source(path="p", format="cvlab", given="a \n\t b" + "c" * 300)) == "a b" + "c" * 247
