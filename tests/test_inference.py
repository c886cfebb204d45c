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
