"""Shard sets (issue 22): `cvlab data shard` writes an ImageNet-layout folder as WebDataset shards with a
manifest, into a local folder and into a real S3 server (every readable image exactly once, resumable, bad input
refused); `ShardStream` reads an epoch of them split between ranks and loader processes."""
from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest

from orchestrator.cli import main
from orchestrator.config.loader import spec_from_dict
from orchestrator.errors import CvlabError
from orchestrator.jobs.classification import prepare_data
from workloads.classification.config import DataPlan, ShardPlan
from workloads.classification import shard_writer
from workloads.classification.shard_manifest import MANIFEST_FILE, read_manifest
from workloads.classification.shard_reader import ShardStream
from workloads.classification.shard_writer import write_shards
from workloads.classification.synthetic import make_imagenet

SHARD_MB = 0.01  # a few images per shard: several shards from a tiny set


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """3 classes x 10 training images (3 x 2 validation), plus one unreadable training file."""
    root = tmp_path_factory.mktemp("src")
    make_imagenet(root, classes=3, per_class=10, size=32, val_per_class=2)
    first = sorted(p for p in (root / "train").iterdir())[0]
    (first / "broken.JPEG").write_bytes(b"not an image")
    return root


def _source_images(root: Path, split: str) -> Counter:
    """(sha256 of the file, class index) of every readable source image."""
    classes = sorted(p.name for p in (root / "train").iterdir())
    return Counter((hashlib.sha256(p.read_bytes()).hexdigest(), classes.index(p.parent.name))
                   for p in (root / split).glob("*/*") if p.name != "broken.JPEG")


def _shard_samples(path: Path) -> list[tuple[str, str, int]]:
    """(key, sha256 of the image, class index) of every sample of a local shard, in order."""
    with tarfile.open(path) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    keys = sorted({name.split(".", 1)[0] for name in members})
    samples = []
    for key in keys:
        (image,) = [v for k, v in members.items() if k.startswith(key + ".") and not k.endswith(".cls")]
        samples.append((key, hashlib.sha256(image).hexdigest(), int(members[f"{key}.cls"])))
    assert len(members) == 2 * len(keys), "every sample is one image and one .cls"
    return samples


def _shard_hashes(dest: Path) -> dict[str, str]:
    return {str(p.relative_to(dest)): hashlib.sha256(p.read_bytes()).hexdigest() for p in dest.glob("*/*.tar")}


def test_every_readable_image_is_in_exactly_one_shard(source, tmp_path, capsys):
    dest = tmp_path / "shards"
    assert main(["data", "shard", str(source), str(dest), "--shard-size-mb", str(SHARD_MB), "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "train: 30 images in" in out and "1 unreadable image(s) left out" in out and "val: 6 images" in out

    manifest = json.loads((dest / MANIFEST_FILE).read_text())
    shard_set = read_manifest(str(dest))
    assert list(shard_set.classes) == sorted(p.name for p in (source / "train").iterdir())
    for split, count in (("train", 30), ("val", 6)):
        info = manifest["splits"][split]
        assert info["samples"] == count and sum(info["per_class"].values()) == count
        assert set(info["per_class"].values()) == {count // 3}
        listed = [s["name"] for s in info["shards"]]
        assert sorted(listed) == sorted(str(p.relative_to(dest)) for p in (dest / split).glob("*.tar"))
        seen = Counter()
        for shard in info["shards"]:
            path = dest / shard["name"]
            assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"]
            assert path.stat().st_size == shard["bytes"]
            samples = _shard_samples(path)
            assert len(samples) == shard["samples"]
            seen.update((digest, label) for _, digest, label in samples)
        assert seen == _source_images(source, split)  # each readable image once, with its class
        assert len(info["shards"]) > 1 or split == "val"
    assert [s["path"] for s in manifest["splits"]["train"]["skipped"]] == [
        f"{shard_set.classes[0]}/broken.JPEG"]
    # The training shards mix classes (a shuffled order), so a streaming shuffle buffer sees several at once.
    first = _shard_samples(dest / manifest["splits"]["train"]["shards"][0]["name"])
    assert len({label for _, _, label in first}) > 1
    assert not list(dest.rglob("*.partial")) and not (dest / shard_writer.PROGRESS_DIR).exists()


def test_an_interrupted_run_finishes_only_the_missing_shards(source, tmp_path, monkeypatch):
    """A crash in the middle of the third shard leaves no file under its final name and no manifest, and starts
    no further shard; the re-run writes only the shards not recorded as finished, and the result is byte for
    byte a clean run's."""
    reference = tmp_path / "reference"
    write_shards(str(source), str(reference), shard_size_mb=SHARD_MB)
    dest = tmp_path / "interrupted"
    real = shard_writer.write_shard
    calls: list[str] = []

    def crashing(location, job):
        calls.append(job.name)
        if len(calls) == 3:
            (dest / f"{job.name}.partial").write_bytes(b"half a shard")
            raise OSError("disk gone")
        return real(location, job)

    monkeypatch.setattr(shard_writer, "write_shard", crashing)
    with pytest.raises(OSError, match="disk gone"):
        write_shards(str(source), str(dest), shard_size_mb=SHARD_MB, workers=1)
    assert len(calls) == 3, "shards were started after the crash"
    crashed = calls[2]
    assert not (dest / MANIFEST_FILE).exists() and not (dest / crashed).exists()
    finished = set(calls[:2])

    calls.clear()
    monkeypatch.setattr(shard_writer, "write_shard",
                        lambda location, job: calls.append(job.name) or real(location, job))
    write_shards(str(source), str(dest), shard_size_mb=SHARD_MB, workers=1)
    assert crashed in calls and set(calls) == set(_shard_hashes(reference)) - finished
    assert _shard_hashes(dest) == _shard_hashes(reference)
    assert not list(dest.rglob("*.partial"))
    assert read_manifest(str(dest)).samples("train") == 30


def test_bad_input_is_refused_with_one_message(source, tmp_path, capsys):
    assert main(["data", "shard", str(tmp_path / "nowhere"), str(tmp_path / "d")]) == 2
    assert "data folder" in capsys.readouterr().err
    dest = tmp_path / "d"
    write_shards(str(source), str(dest), shard_size_mb=SHARD_MB)
    assert main(["data", "shard", str(source), str(dest)]) == 2
    assert "already holds a finished shard set" in capsys.readouterr().err

    # An unfinished set of another shard size is not mixed with this one.
    half = tmp_path / "half"
    (half / shard_writer.PROGRESS_DIR).mkdir(parents=True)
    (half / shard_writer.PROGRESS_DIR / shard_writer.PLAN_FILE).write_text(json.dumps({"shard_size_mb": 1}))
    assert main(["data", "shard", str(source), str(half)]) == 2
    assert "holds an unfinished shard set of other data or another --shard-size-mb" in capsys.readouterr().err

    with pytest.raises(ValueError, match="has no manifest.json: not a shard set"):
        read_manifest(str(source))
    manifest = json.loads((dest / MANIFEST_FILE).read_text())
    gone = manifest["splits"]["val"]["shards"][0]["name"]
    (dest / gone).unlink()
    with pytest.raises(ValueError, match=f"shard {gone} is listed in manifest.json but absent"):
        read_manifest(str(dest))
    manifest["splits"]["train"]["samples"] += 1
    (dest / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="the train split says 31 samples, its shards hold 30"):
        read_manifest(str(dest))


@pytest.mark.slow
def test_shards_in_a_real_s3_server(source, tmp_path, s3_server, capsys, monkeypatch):
    """The same shards, byte for byte, written to `s3://` through the standard AWS_* variables; a missing bucket
    and refused credentials each end with one message."""
    import pyarrow.fs as pafs

    local = tmp_path / "local"
    write_shards(str(source), str(local), shard_size_mb=SHARD_MB)
    uri = f"s3://{s3_server.bucket}/sets/tiny"
    assert main(["data", "shard", str(source), uri, "--shard-size-mb", str(SHARD_MB), "--workers", "3"]) == 0
    capsys.readouterr()
    shard_set = read_manifest(uri)
    assert shard_set.samples("train") == 30 and shard_set.samples("val") == 6
    fs, root = pafs.FileSystem.from_uri(uri)
    remote = {}
    for split in ("train", "val"):
        for shard in shard_set.shards(split):
            with fs.open_input_stream(f"{root}/{shard['name']}") as fh:
                remote[shard["name"]] = hashlib.sha256(fh.read()).hexdigest()
    assert remote == _shard_hashes(local)
    # Streamed from the bucket, a rank reads what it reads from the local copy.
    for split, batch in (("train", 4), ("val", None)):
        from_s3 = _read_all(_stream(uri, split, rank=1, world=2, batch=batch, seed=3, shuffle_buffer=4), epoch=2)
        assert from_s3 == _read_all(_stream(local, split, rank=1, world=2, batch=batch, seed=3, shuffle_buffer=4),
                                    epoch=2) and from_s3
    assert fs.get_file_info(f"{root}/{shard_writer.PROGRESS_DIR}").type == pafs.FileType.NotFound

    assert main(["data", "shard", str(source), "s3://no-such-bucket/x"]) == 2
    assert "cannot write s3://no-such-bucket/x" in capsys.readouterr().err
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    assert main(["data", "shard", str(source), f"s3://{s3_server.bucket}/other"]) == 2
    err = capsys.readouterr().err
    assert f"cannot write s3://{s3_server.bucket}/other" in err and "AWS_SECRET_ACCESS_KEY" in err


def _stream(location, split, **kw):
    shard_set = read_manifest(str(location))
    # The decoded pixels identify an image (the synthetic images all differ).
    return ShardStream(str(location), shard_set.shards(split), lambda im: hashlib.sha256(im.tobytes()).hexdigest(),
                       **kw)


def _read_all(stream, epoch=0, parts=1):
    """What the rank's DataLoader processes yield together in `epoch` (each process's share read in turn)."""
    stream.set_epoch(epoch)
    out = []
    for part in range(parts):
        with mock.patch("torch.utils.data.get_worker_info", return_value=SimpleNamespace(id=part, num_workers=parts)):
            out += list(stream)
    return out


@pytest.fixture(scope="module")
def shard_set(source, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("set")
    write_shards(str(source), str(dest), shard_size_mb=SHARD_MB)
    return dest


@pytest.mark.parametrize("world,parts", [(1, 1), (2, 2), (3, 1)])
def test_an_epoch_of_shards_is_split_between_ranks_without_overlap(shard_set, world, parts):
    """Training: every rank the same number of full batches, no image twice, the unused rest as the reader's
    docstring says, another order next epoch; validation: every image exactly once."""
    batch, total = 4, 30
    seen = []
    for rank in range(world):
        stream = _stream(shard_set, "train", rank=rank, world=world, batch=batch, seed=1, shuffle_buffer=8)
        samples = _read_all(stream, epoch=0, parts=parts)
        assert len(samples) == len(stream) == (total // world) // batch * batch
        seen += samples
    assert len(set(seen)) == len(seen)
    assert total - len(seen) < world * (batch + 1)
    assert all(label in range(3) and failures == 0 for _, label, failures in seen)
    again = _read_all(_stream(shard_set, "train", rank=0, world=world, batch=batch, seed=1, shuffle_buffer=8))
    assert again == _read_all(_stream(shard_set, "train", rank=0, world=world, batch=batch, seed=1,
                                      shuffle_buffer=8))  # deterministic for seed and epoch
    later = _read_all(_stream(shard_set, "train", rank=0, world=world, batch=batch, seed=1, shuffle_buffer=8), 1)
    assert later != again

    val = []
    for rank in range(world):
        val += _read_all(_stream(shard_set, "val", rank=rank, world=world, batch=None), parts=parts)
    whole = _read_all(_stream(shard_set, "val", rank=0, world=1, batch=None))
    assert len(val) == 6 and sorted(val) == sorted(whole) and len(set(val)) == 6


def test_a_cut_off_shard_is_named_and_training_steps_stay_full(shard_set, tmp_path):
    """A shard cut in the middle: its lost samples are reported with the shard's name; training still yields
    the planned count (the last good sample stands in), validation yields only the readable ones."""
    copy = tmp_path / "set"
    shutil.copytree(shard_set, copy)
    manifest = read_manifest(str(copy))
    name = manifest.shards("train")[0]["name"]
    data = (copy / name).read_bytes()
    (copy / name).write_bytes(data[: len(data) // 2])  # cut in the middle of a sample
    bad: list[tuple[str, str, str]] = []
    stream = ShardStream(str(copy), manifest.shards("train"), lambda im: im.size, rank=0, world=1, batch=2,
                         on_bad=lambda *what: bad.append(what))
    samples = list(stream)
    assert len(samples) == len(stream) == 30
    assert bad and all(shard == name for shard, _, _ in bad)
    assert 0 < sum(failures for _, _, failures in samples) <= manifest.shards("train")[0]["samples"]
    val_bad: list = []
    val = ShardStream(str(copy), manifest.shards("train"), lambda im: im.size, rank=0, world=1, batch=None,
                      on_bad=lambda *what: val_bad.append(what))
    read = len(list(val))  # validation leaves the unreadable ones out (nothing stands in for them)
    assert 30 - manifest.shards("train")[0]["samples"] <= read < 30 and val_bad


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_training_and_eval_stream_shards_from_s3(source, tmp_path, s3_server, monkeypatch, capsys):
    """The tiny set sharded into the S3 server, trained on 2 workers streaming their shares (checkpoints in the
    bucket too), then `cvlab eval` of the last checkpoint over the streamed validation split gives exactly the
    logged val/top1: every validation image counted once across the workers."""
    import yaml
    from mlflow import MlflowClient

    bucket = s3_server.bucket
    write_shards(str(source), f"s3://{bucket}/sets/q", shard_size_mb=SHARD_MB)
    db = f"sqlite:///{tmp_path}/mlflow.db"
    spec = {
        "experiment": {"name": "from-shards", "seed": 0},
        "model": {"name": "resnet26"},
        "data": {"root": f"s3://{bucket}/sets/q", "image_size": 32, "batch_size": 4, "num_workers": 1},
        "optim": {"epochs": 2, "lr": 0.05, "scale_lr": False, "warmup_epochs": 0.0},
        "scaling": {"num_workers": 2},
        "run": {"storage_path": f"s3://{bucket}/runs", "log_every": 100},
        "tracking": {"tracking_uri": db, "log_model": False},
    }
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(tmp_path)
    assert main(["run", "exp.yaml"]) == 0
    out = capsys.readouterr().out
    assert f"shard set s3://{bucket}/sets/q: 30 training and 6 validation images" in out
    client = MlflowClient(db)
    (run,) = client.search_runs([client.get_experiment_by_name("from-shards").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["data.train_images"] == "30" and run.data.params["data.val_images"] == "6"
    assert f"{bucket}/runs/from-shards-" in run.data.tags["cvlab.checkpoint"]
    assert not (tmp_path / "runs").exists()  # the Ray Train run lives in the bucket
    top1 = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val/top1")}
    assert sorted(top1) == [1, 2]

    assert main(["eval", "exp.yaml", "--checkpoint", f"runs:/{run.info.run_id}/checkpoints/last"]) == 0
    evals = client.search_runs([run.info.experiment_id], "tags.`cvlab.job` = 'eval'")
    assert evals[0].data.metrics["eval/images"] == 6
    assert evals[0].data.metrics["eval/top1"] == top1[2]


def test_data_root_is_read_as_a_shard_set_or_a_folder(source, shard_set):
    """`data.format: auto` takes a folder with a manifest as a shard set and an ImageNet folder as a folder;
    `shards` without a manifest and `folder` with a bucket URI are refused before anything starts."""
    def plan(root, fmt="auto"):
        return prepare_data(spec_from_dict({"data": {"root": str(root), "format": fmt, "image_size": 32}}))

    shards = plan(shard_set)
    assert isinstance(shards, ShardPlan) and (shards.train_images, shards.val_images, shards.skipped) == (30, 6, 1)
    assert len(shards.classes) == 3 and sum(s["samples"] for s in shards.train_shards) == 30
    assert isinstance(plan(source), DataPlan)
    with pytest.raises(CvlabError, match="has no manifest.json: not a shard set"):
        plan(source, "shards")
    with pytest.raises(CvlabError, match="is a bucket URI: only a shard set can be read from a bucket"):
        plan("s3://bucket/x", "folder")
