"""Shard sets (issue 22): `cvlab data shard` writes an ImageNet-layout folder as WebDataset shards with a
manifest, into a local folder and into a real S3 server (every readable image exactly once, resumable, bad input
refused); `ShardStream` reads an epoch of them split between ranks and loader processes."""
from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
import threading
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest

from orchestrator.cli import main
from orchestrator.config.loader import spec_from_dict
from orchestrator.errors import CvlabError
from orchestrator.jobs.classification import prepare_data
from orchestrator.names import FAULT_MARKER_FILE
from orchestrator.runs.storage import resolve_storage
from workloads.classification.config import DataPlan, ShardPlan
from workloads.classification import shard_writer
from workloads.classification.shard_manifest import MANIFEST_FILE, read_manifest
from workloads.classification.shard_reader import ShardStream
from workloads.classification.shard_writer import write_shards
from workloads.classification.synthetic import make_imagenet
from workloads.object_storage import (
    Backoff,
    RetryingHandler,
    StorageUnreachable,
    retrying,
    retrying_filesystem,
    unwrapped,
)

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
    (for the shards, for `cvlab cluster local up --artifacts-destination`) and refused credentials each end with
    one message."""
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

    # The run storage (retrying) takes a copy of many files at once, as Tune's state sync makes one.
    many = tmp_path / "many"
    many.mkdir()
    for i in range(24):
        (many / f"f{i}.json").write_text(str(i))
    storage, path = resolve_storage(f"s3://{s3_server.bucket}/state", retry_limit_s=30)
    pafs.copy_files(str(many), path, destination_filesystem=storage)
    assert len(storage.get_file_info(pafs.FileSelector(path))) == 24

    assert main(["data", "shard", str(source), "s3://no-such-bucket/x"]) == 2
    assert "cannot write s3://no-such-bucket/x" in capsys.readouterr().err
    assert main(["cluster", "local", "up", "--state-dir", str(tmp_path / "cluster"), "--artifacts-destination",
                 "s3://no-such-bucket/mlflow"]) == 2  # before anything starts
    assert "s3://no-such-bucket/mlflow: the bucket does not exist" in capsys.readouterr().err
    # A run's data or storage in a missing bucket, or refused credentials: refused before anything starts.
    with pytest.raises(CvlabError, match="data.root: s3://no-such-bucket/set: the bucket does not exist"):
        prepare_data(spec_from_dict({"data": {"root": "s3://no-such-bucket/set", "image_size": 32}}))
    with pytest.raises(CvlabError, match="run.storage_path 's3://no-such-bucket/runs'.*check the bucket name"):
        resolve_storage("s3://no-such-bucket/runs", retry_limit_s=300)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    assert main(["data", "shard", str(source), f"s3://{s3_server.bucket}/other"]) == 2
    err = capsys.readouterr().err
    assert f"cannot write s3://{s3_server.bucket}/other" in err and "AWS_SECRET_ACCESS_KEY" in err
    with pytest.raises(CvlabError, match=f"data.root: {uri}/manifest.json cannot be read: .*ACCESS_DENIED.*"
                                         "AWS_SECRET_ACCESS_KEY"):
        prepare_data(spec_from_dict({"data": {"root": uri, "image_size": 32}}))


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


def _checkpoints_in(uri: str) -> list[str]:
    """The whole Ray Train checkpoint folders under a bucket URI (the test's view, through the AWS_* variables):
    folders holding both the model and the training state. A folder still being uploaded holds only one of them
    for a moment, and a server stopped at that moment leaves it so: it is not a checkpoint anyone relies on."""
    import pyarrow.fs as pafs

    from workloads.classification.checkpoint import MODEL_FILE, STATE_FILE

    fs, root = pafs.FileSystem.from_uri(uri)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    files: dict[str, set[str]] = {}
    for info in infos:
        if "/checkpoint_" in info.path:
            folder, name = info.path.rsplit("/", 1)
            files.setdefault(folder, set()).add(name)
    return sorted(folder for folder, names in files.items() if {MODEL_FILE, STATE_FILE} <= names)


def _spec_from_s3(bucket: str, name: str, epochs: int, tracking_uri: str, **run) -> dict:
    return {
        "experiment": {"name": name, "seed": 0},
        "model": {"name": "resnet26"},
        "data": {"root": f"s3://{bucket}/sets/q", "image_size": 32, "batch_size": 4, "num_workers": 1},
        "optim": {"epochs": epochs, "lr": 0.05, "scale_lr": False, "warmup_epochs": 0.0},
        "scaling": {"num_workers": 2},
        "run": {"storage_path": f"s3://{bucket}/runs", "log_every": 100, **run},
        "tracking": {"tracking_uri": tracking_uri, "log_model": False},
    }


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_training_and_eval_stream_shards_from_s3(source, tmp_path, s3_server, mlflow_server_on_s3, monkeypatch,
                                                 capfd):
    """The tiny set sharded into the S3 server and trained for 3 epochs on 2 workers streaming their shares,
    checkpoints in the bucket and MLflow's artifacts in the bucket too (`mlflow server --artifacts-destination`).
    The S3 server goes away for 20 s once epoch 1's checkpoint is in it: reads and the next checkpoint's upload
    wait for it and the run loses nothing. A worker killed in epoch 3 restarts from the latest checkpoint, read
    from the bucket. `cvlab eval` of the run's `runs:/` checkpoint (served from the bucket through MLflow) over
    the streamed validation split gives exactly the logged val/top1: every validation image counted once."""
    import yaml
    from mlflow import MlflowClient

    bucket = s3_server.bucket
    write_shards(str(source), f"s3://{bucket}/sets/q", shard_size_mb=SHARD_MB)
    spec = _spec_from_s3(bucket, "from-shards", 3, mlflow_server_on_s3.uri, max_failures=1,
                         fault_kill_rank_at={"epoch": 3, "step": 1, "rank": 1})
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(tmp_path)
    timeline: list[str] = []
    stopped_at: list[float] = []

    def first_checkpoint() -> bool:
        if _checkpoints_in(f"s3://{bucket}/runs"):
            stopped_at.append(time.monotonic())
            return True
        return False

    watcher = s3_server.away_between(first_checkpoint, lambda: time.monotonic() > stopped_at[0] + 15, timeline)
    assert main(["run", "exp.yaml"]) == 0
    watcher.join(timeout=60)  # the run may be done before the restart that it waited for is noted
    out, err = capfd.readouterr()
    assert timeline == ["stopped", "started"]
    assert f"shard set s3://{bucket}/sets/q: 30 training and 6 validation images" in out
    assert "retrying for up to 300 s" in err and "succeeded after" in err  # the outage was met and ridden out
    client = MlflowClient(mlflow_server_on_s3.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("from-shards").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["data.train_images"] == "30" and run.data.params["data.val_images"] == "6"
    assert f"{bucket}/runs/from-shards-" in run.data.tags["cvlab.checkpoint"]
    assert not (tmp_path / "runs").exists()  # the Ray Train run lives in the bucket
    top1 = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val/top1")]
    assert [step for step, _ in top1] == [1, 2, 3]  # every epoch logged once, through outage and restart
    assert any(path.endswith(f"/{FAULT_MARKER_FILE}") for path in _objects(f"s3://{bucket}/runs")), \
        "the fault drill did not fire"
    # One restart, from a checkpoint read from the bucket: epoch 2's, or epoch 1's when the kill came before Ray
    # Train's controller had registered epoch 2's (it polls the workers' reports); either way nothing is lost.
    ((resumed_at, from_epoch),) = [(m.step, m.value) for m in
                                   client.get_metric_history(run.info.run_id, "train/resumed_from_epoch")]
    assert from_epoch in (1, 2) and resumed_at == from_epoch + 1
    stored = _objects(f"s3://{bucket}/mlartifacts")
    assert any(f"/{run.info.run_id}/artifacts/checkpoints/last/" in path for path in stored)

    assert main(["eval", "exp.yaml", "--checkpoint", f"runs:/{run.info.run_id}/checkpoints/last"]) == 0
    evals = client.search_runs([run.info.experiment_id], "tags.`cvlab.job` = 'eval'")
    assert evals[0].data.metrics["eval/images"] == 6
    assert evals[0].data.metrics["eval/top1"] == top1[-1][1]
    # The folder the shards were written from gives the same figures: the two data paths show the same images.
    assert main(["eval", "exp.yaml", "--checkpoint", f"runs:/{run.info.run_id}/checkpoints/last", "--set",
                 f"data.root={source}"]) == 0
    evals = client.search_runs([run.info.experiment_id], "tags.`cvlab.job` = 'eval'", order_by=["start_time DESC"])
    assert len(evals) == 2 and evals[0].data.metrics["eval/images"] == 6
    assert evals[0].data.metrics["eval/top1"] == top1[-1][1]


def _objects(uri: str) -> list[str]:
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(uri)
    return [i.path for i in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_bucket_away_longer_than_the_limit_fails_the_run_keeping_its_checkpoint(source, tmp_path, s3_server,
                                                                                  monkeypatch, capfd):
    """The S3 server goes away after epoch 1's checkpoint and stays away longer than run.storage_retry_limit_s:
    the run fails with one message saying so (no traceback) and is marked FAILED; epoch 1's checkpoint, read
    back once the server returns, is whole."""
    import yaml
    from mlflow import MlflowClient

    from workloads.checkpoint_transfer import opened
    from workloads.classification.checkpoint import verify_training_checkpoint

    bucket = s3_server.bucket
    write_shards(str(source), f"s3://{bucket}/sets/q", shard_size_mb=SHARD_MB)
    db = f"sqlite:///{tmp_path}/mlflow.db"
    spec = _spec_from_s3(bucket, "bucket-gone", 2, db, storage_retry_limit_s=4)
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(tmp_path)
    timeline: list[str] = []
    run_over = threading.Event()
    # The server is back once the run has failed. A server's clean shutdown may take longer than the run's 4 s
    # limit, so the run can fail before the stop is noted: the join waits for both.
    watcher = s3_server.away_between(lambda: bool(_checkpoints_in(f"s3://{bucket}/runs")), run_over.is_set,
                                     timeline, timeout_s=300)
    code = main(["run", "exp.yaml"])
    run_over.set()
    watcher.join(timeout=120)
    out, err = capfd.readouterr()
    assert code == 2 and timeline == ["stopped", "started"]
    assert "the storage was unreachable for" in err and "run.storage_retry_limit_s (4 s)" in err
    assert "Traceback" not in err.split("cvlab: error:")[-1]
    client = MlflowClient(db)
    (run,) = client.search_runs([client.get_experiment_by_name("bucket-gone").experiment_id])
    assert run.info.status == "FAILED"

    import ray.train

    (checkpoint,) = _checkpoints_in(f"s3://{bucket}/runs")
    with opened(ray.train.Checkpoint(f"s3://{checkpoint}"), 30) as folder:
        assert verify_training_checkpoint(folder) == 1


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


def test_storage_errors_are_retried_with_backoff_until_the_limit():
    """An OSError is retried after 0.5, 1, 2, ... s (capped at 8) until the outage has lasted the limit, then
    StorageUnreachable says for how long and names the limit; a missing file is an answer, not retried; a
    success resets the clock."""
    clock = [0.0]
    waits: list[float] = []

    def sleep(s):
        waits.append(s)
        clock[0] += s

    backoff = Backoff(20, clock=lambda: clock[0], sleep=sleep)
    for _ in range(5):
        backoff.failed("reading x", OSError("connection refused"))
    assert waits == [0.5, 1, 2, 4, 8]
    backoff.failed("reading x", OSError("connection refused"))
    assert waits[-1] == pytest.approx(20 - 15.5)  # never sleeps past the limit
    with pytest.raises(StorageUnreachable) as caught:
        backoff.failed("reading x", OSError("connection refused"))
    assert str(caught.value) == ("reading x: the storage was unreachable for 20 s, longer than "
                                 "run.storage_retry_limit_s (20 s); last error: OSError: connection refused")
    backoff.succeeded("reading x")
    backoff.failed("reading x", OSError("again"))
    assert waits[-1] == 0.5 and backoff.since == clock[0] - 0.5  # a new outage, timed from its start

    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("503 Slow Down")
        return "done"

    assert retrying("writing y", flaky, limit_s=30) == "done" and len(calls) == 3
    with pytest.raises(FileNotFoundError):
        retrying("reading z", lambda: open("/no/such/file"), limit_s=30)


class _FlakyFS:
    """A local filesystem whose first `fail` opened streams break with an OSError after `after` bytes, as a
    connection to a bucket that goes away does."""

    def __init__(self, fail: int, after: int = 15000):  # tarfile reads 10 KB at a time
        import pyarrow.fs as pafs

        self.local, self.fail, self.after, self.opened = pafs.LocalFileSystem(), fail, after, 0

    def open_input_stream(self, path, buffer_size=None):
        self.opened += 1
        stream, flaky, after = self.local.open_input_stream(path, buffer_size=buffer_size), self.opened <= self.fail, self.after

        class Breaking:
            read_so_far = 0

            def read(self, n=-1):
                data = stream.read(n)
                self.read_so_far += len(data)
                if flaky and self.read_so_far > after:
                    raise OSError("AWS Error NETWORK_CONNECTION: connection reset")
                return data

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                stream.close()

        return Breaking()


def test_a_shard_read_that_loses_the_storage_resumes_where_it_stopped(shard_set, monkeypatch):
    """Two broken connections while reading: the shards are opened again from the sample where they stopped,
    and the rank reads exactly what it reads without an outage (nothing skipped, nothing twice, no failures)."""
    from workloads.classification import shard_reader

    expected = _read_all(_stream(shard_set, "train", rank=0, world=1, batch=4, seed=1))
    flaky = _FlakyFS(fail=2)
    monkeypatch.setattr(shard_reader, "open_location", lambda location: (flaky, str(location)))
    bad: list = []
    stream = _stream(shard_set, "train", rank=0, world=1, batch=4, seed=1, on_bad=lambda *what: bad.append(what),
                     retry_limit_s=30)
    assert _read_all(stream) == expected and not bad
    assert flaky.opened > len(read_manifest(str(shard_set)).shards("train"))  # reopened after each break

    gone = _FlakyFS(fail=10**6, after=0)
    monkeypatch.setattr(shard_reader, "open_location", lambda location: (gone, str(location)))
    with pytest.raises(StorageUnreachable, match="reading shard train/shard-.*unreachable for 1 s"):
        _read_all(_stream(shard_set, "train", rank=0, world=1, batch=4, seed=1, retry_limit_s=1))


class _FlakyHandler(RetryingHandler):
    """Local files whose first `fail` operations (those whose description starts with `only`; a write's upload
    included) fail like an unreachable bucket."""

    def __init__(self, root, fail: int, only: str = ""):
        import pyarrow.fs as pafs

        super().__init__(pafs.SubTreeFileSystem(str(root), pafs.LocalFileSystem()), limit_s=0)
        self.fail, self.failed, self.only = fail, 0, only

    def _retry(self, what, attempt):
        if self.failed < self.fail and what.startswith(self.only):
            self.failed += 1
            raise OSError(f"{what}: AWS Error NETWORK_CONNECTION: Could not connect to server")
        return attempt()


def _retrying(flaky: _FlakyHandler, limit_s: float):
    """What `retrying_filesystem` makes of an S3 filesystem, around a flaky local one."""
    import pyarrow.fs as pafs

    return pafs.PyFileSystem(RetryingHandler(pafs.PyFileSystem(flaky), limit_s))


def test_the_run_storage_rides_out_an_outage_and_survives_pickling(tmp_path):
    """The run storage is wrapped by a `RetryingHandler`, also in the copy Ray pickles to its processes: a file
    written as Ray Train's controller writes its state is sent again whole until the bucket answers; past the
    limit, StorageUnreachable. A checkpoint copy (pyarrow's copy_files, which drops errors raised on closing a
    file) is checked file by file and made again while incomplete (`upload_checked`)."""
    import pickle

    import pyarrow.fs as pafs
    import ray.train

    from workloads.checkpoint_transfer import upload_checked

    bucket = tmp_path / "bucket"
    (bucket / "runs" / "checkpoint_000001").mkdir(parents=True)
    storage = pickle.loads(pickle.dumps(_retrying(_FlakyHandler(bucket, fail=3), 30)))
    with storage.open_output_stream("runs/checkpoint_manager_snapshot.json") as out:
        out.write(b'{"epoch": 1}')
    assert (bucket / "runs/checkpoint_manager_snapshot.json").read_bytes() == b'{"epoch": 1}'
    gone = _retrying(_FlakyHandler(bucket, fail=10**6), limit_s=1)
    with pytest.raises(StorageUnreachable, match="writing runs/x.json: the storage was unreachable for 1 s"):
        with gone.open_output_stream("runs/x.json") as out:
            out.write(b"{}")
    assert not (bucket / "runs/x.json").exists()

    source = tmp_path / "checkpoint"
    source.mkdir()
    files = {"model.pt": b"m" * 300_000, "train_state.pt": b"s" * 1000, "meta.json": b"{}"}
    for name, data in files.items():
        (source / name).write_bytes(data)
    attempts = []

    def persist():  # the first copy's uploads fail past the limit: copy_files reports nothing wrong
        attempts.append(len(attempts))
        away = 10**6 if len(attempts) == 1 else 0
        fs = _retrying(_FlakyHandler(bucket, fail=away, only="writing"), limit_s=0.2)
        pafs.copy_files(str(source), "runs/checkpoint_000001", destination_filesystem=fs)
        return ray.train.Checkpoint("runs/checkpoint_000001", filesystem=fs)

    stored = upload_checked(persist, str(source), "checkpoint_000001", limit_s=30)
    assert len(attempts) == 2 and stored.path == "runs/checkpoint_000001"
    assert {p.name: p.read_bytes() for p in (bucket / "runs/checkpoint_000001").iterdir()} == files

    # An S3 store is wrapped, without background writes (they deadlock in copy_files: see retrying_filesystem);
    # other stores are left as they are.
    s3 = pafs.S3FileSystem(access_key="k", secret_key="s", endpoint_override="http://127.0.0.1:9", region="us-east-1")
    wrapped = pickle.loads(pickle.dumps(retrying_filesystem(s3, 30)))
    assert isinstance(wrapped.handler, RetryingHandler) and unwrapped(wrapped).__reduce__()[1][0] == {
        **s3.__reduce__()[1][0], "background_writes": False}
    local = pafs.LocalFileSystem()
    assert retrying_filesystem(local, 30) is local
