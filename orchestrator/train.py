"""`cvlab run`: the classification workload on Ray Train, tracked in MLflow.

    cvlab run experiments/quickstart.yaml [--set optim.epochs=3 ...] [--resume]

The driver (this module) prepares the data (generates the embedded dataset when asked, verifies the
images once), creates the MLflow experiment and run, builds a `TorchTrainer` (`build_trainer`, which Tune
reuses with a nested run) and fits it; rank 0 of the workers logs epoch metrics to the run. Afterwards the
driver logs the best and last checkpoints, a kernel visualisation and the model, and ends the run FINISHED,
or FAILED with the error in the `cvlab.error` tag.

Each fresh run gets its own Ray Train folder `<run.storage_path>/<name>-<timestamp>` holding a small
`cvlab_run.json` (the MLflow run id); `--resume` finds the newest such folder for the name, lets Ray Train
restore its latest checkpoint and keeps logging to the same MLflow run.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.errors import CvlabError
from orchestrator.run_records import (
    exists,
    find_previous_run,
    join,
    new_run_name,
    spec_yaml,
    training_error_message,
    write_record,
)

SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of a run's checkpoints
FAULT_MARKER = "fault_drill.done"  # written by the run.fault_kill_rank_at drill when it fired
# Bounds Ray Train's retries of controller failures (e.g. resources that never become available).
CONTROLLER_FAILURE_LIMIT = 3


def _warn(msg: str) -> None:
    print(f"cvlab: warning: {msg}", file=sys.stderr, flush=True)


def _say(msg: str) -> None:
    print(msg, flush=True)


def _end_failed(client, run_id: str, message: str) -> None:
    """Mark the run FAILED; a tracking server that is away must not hide the error being reported."""
    from orchestrator.tracking import end_run

    try:
        end_run(client, run_id, "FAILED", message)
    except Exception as err:  # noqa: BLE001
        _warn(f"could not mark MLflow run {run_id} FAILED ({type(err).__name__}: {err})")


# ----------------------------------------------------------------------------------------------------------
# Data


@dataclass
class DataInfo:
    """What the driver found in the data folder; travels to the workers as plain data."""

    root: str
    train_dir: str
    val_dir: str
    classes: list[str]
    train_images: int
    val_images: int
    train_skip: list[str] = field(default_factory=list)
    val_skip: list[str] = field(default_factory=list)
    generated: bool = False

    @property
    def skipped(self) -> int:
        return len(self.train_skip) + len(self.val_skip)

    def worker_config(self) -> dict[str, Any]:
        return {**asdict(self), "skipped": self.skipped}


def prepare_data(spec) -> DataInfo:
    """Generate the embedded dataset when asked and missing, then verify the images once (on the driver).

    Raises CvlabError for a missing folder, an empty split or a class folder without readable images.
    Unreadable files are listed in the result (and a warning names the first ones).
    """
    from workloads.classification.data import scan_split

    root = Path(spec.data.root).expanduser().absolute()
    generated = False
    if spec.data.generate and not (root / "train").is_dir():
        from workloads.classification.synthetic import make_imagenet

        _say(f"generating the embedded dataset in {root} ...")
        try:
            make_imagenet(
                root,
                classes=spec.data.num_classes_generated,
                per_class=spec.data.per_class_generated,
                size=spec.data.generated_size,
                seed=spec.experiment.seed,
                progress=_say,
            )
        except ValueError as err:
            raise CvlabError(f"cannot generate the dataset in {root}: {err}") from err
        generated = True
    if not root.is_dir():
        raise CvlabError(
            f"data.root {root} does not exist; point it at an ImageNet-layout folder (train/<class>/*.JPEG, "
            "val/<class>/*.JPEG) or set data.generate: true for the embedded synthetic dataset"
        )
    try:
        train = scan_split(str(root / "train"), progress=_say)
        val = scan_split(str(root / "val"), classes=train.classes, progress=_say)
    except ValueError as err:
        raise CvlabError(str(err)) from err
    bad = [(os.path.join(train.root, rel), why) for rel, why in train.bad]
    bad += [(os.path.join(val.root, rel), why) for rel, why in val.bad]
    if bad:
        shown = "; ".join(f"{p} ({why})" for p, why in bad[:5])
        _warn(f"skipping {len(bad)} unreadable image(s): {shown}" + (" ..." if len(bad) > 5 else ""))
    if val.missing_classes:
        _warn(f"{len(val.missing_classes)} training class(es) have no validation folder, e.g. "
              f"{val.missing_classes[0]}")
    return DataInfo(
        root=str(root),
        train_dir=train.root,
        val_dir=val.root,
        classes=train.classes,
        train_images=train.num_images,
        val_images=val.num_images,
        train_skip=train.skipped,
        val_skip=val.skipped,
        generated=generated,
    )


def _check_batch(spec, data: DataInfo) -> None:
    global_batch = spec.data.batch_size * spec.scaling.num_workers
    if data.train_images < global_batch:
        raise CvlabError(
            f"the training split has {data.train_images} readable images, fewer than one global batch "
            f"({spec.scaling.num_workers} workers x data.batch_size {spec.data.batch_size}); lower data.batch_size"
        )


def _model_overrides(spec, data: DataInfo) -> dict[str, Any]:
    overrides = dict(spec.model.overrides)
    wanted = overrides.get("num_classes")
    if wanted is not None and wanted != len(data.classes):
        raise CvlabError(
            f"model.num_classes is {wanted} but {data.train_dir} has {len(data.classes)} class folders"
        )
    overrides["num_classes"] = len(data.classes)
    return overrides


def model_stats(spec, data: DataInfo) -> dict[str, Any]:
    """Build the model once on the driver (validates the config): params and GFLOPs at the image size."""
    from workloads.models import build_model, count_flops, count_params

    try:
        model = build_model(spec.model.name, **_model_overrides(spec, data))
    except (ValueError, TypeError, KeyError) as err:
        raise CvlabError(f"model {spec.model.name}: {err}") from err
    size = spec.data.image_size
    return {
        "model.params": count_params(model),
        "model.gflops": round(count_flops(model, (1, 3, size, size)) / 1e9, 4),
        "model.gflops_224": round(count_flops(model, (1, 3, 224, 224)) / 1e9, 4),
    }


# ----------------------------------------------------------------------------------------------------------
# Trainer


def build_trainer(
    spec,
    *,
    run_id: str,
    tracking_uri: str,
    name: str | None = None,
    storage_path: str | None = None,
    callbacks: Sequence[Any] = (),
    resume: bool = False,
    data: DataInfo | None = None,
):
    """A `TorchTrainer` for one Ray Train run of the classification workload.

    Rank 0 logs epoch metrics to the existing MLflow run `run_id` at `tracking_uri` (the caller creates
    and ends that run). `name` / `storage_path` default to the spec's run section. Without `resume`, a
    run folder that already holds checkpoints is refused (Ray Train would silently continue it).
    `data` is `prepare_data(spec)`'s result (computed when not given).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from orchestrator.storage import resolve_storage
    from orchestrator.tracking import MlflowEpochLogger
    from workloads.classification.loop import train_loop_per_worker

    data = data or prepare_data(spec)
    _check_batch(spec, data)
    _model_overrides(spec, data)
    fs, storage = resolve_storage(storage_path or spec.run.storage_path)
    name = name or spec.run.name or spec.experiment.name
    if not resume and exists(fs, join(storage, name, SNAPSHOT)):
        raise CvlabError(
            f"run folder {join(storage, name)} already holds checkpoints of an earlier run; "
            "resume it (--resume) or choose another run.name"
        )
    use_gpu = spec.scaling.use_gpu
    scaling = ScalingConfig(
        num_workers=spec.scaling.num_workers,
        use_gpu=use_gpu,
        resources_per_worker=dict(spec.scaling.resources_per_worker) or None,
    )
    run_config = RunConfig(
        name=name,
        storage_path=storage,
        storage_filesystem=fs,
        checkpoint_config=CheckpointConfig(
            num_to_keep=spec.run.checkpoints_kept,
            # Ranked by accuracy, so the best checkpoint survives; Ray always keeps the latest too.
            checkpoint_score_attribute="val/top1",
            checkpoint_score_order="max",
        ),
        failure_config=FailureConfig(
            max_failures=spec.run.max_failures, controller_failure_limit=CONTROLLER_FAILURE_LIMIT
        ),
        callbacks=list(callbacks) or None,
    )
    run_dir = join(storage, name)
    config = {
        "spec": spec.model_dump(mode="json"),
        "data": data.worker_config(),
        "epoch_logger": MlflowEpochLogger(tracking_uri, run_id),
        # Local storage only: where the fault drill leaves its marker; older checkpoints to fall back on
        # when the latest one is unreadable.
        "fault_marker": os.path.join(run_dir, FAULT_MARKER) if fs is None else None,
        "fallback_checkpoints": list_checkpoints(run_dir) if fs is None and resume else [],
    }
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=scaling,
        run_config=run_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
    )


def list_checkpoints(run_dir: str) -> list[str]:
    """The checkpoint folders of a local Ray Train run folder, newest first (Ray names them by time)."""
    try:
        names = [n for n in os.listdir(run_dir) if n.startswith("checkpoint_")]
    except OSError:
        return []
    return [os.path.join(run_dir, n) for n in sorted(names, reverse=True)
            if os.path.isdir(os.path.join(run_dir, n))]


def check_gpu_request(spec) -> None:
    """`scaling.use_gpu: true` needs CUDA: refuse before any work when this machine's own Ray would run it
    (no RAY_ADDRESS, no Ray connection) and torch sees no CUDA device."""
    if not spec.scaling.use_gpu or os.environ.get("RAY_ADDRESS"):
        return
    import ray
    import torch

    if ray.is_initialized():
        return  # the cluster's resources are checked against the request later
    if not torch.cuda.is_available():
        raise CvlabError(
            "scaling.use_gpu is true but this machine has no usable CUDA device "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}); set scaling.use_gpu: false, "
            "or run on a GPU cluster (RAY_ADDRESS / cvlab submit)"
        )


# ----------------------------------------------------------------------------------------------------------
# After training


def _kernel_image(data: DataInfo, size: int):
    """One validation image, resized and centre-cropped like the validation transform."""
    from PIL import Image
    from torchvision import transforms as T

    from workloads.classification.data import make_dataset

    ds = make_dataset(data.val_dir, data.classes, data.val_skip)
    with Image.open(ds.samples[0][0]) as im:
        im = im.convert("RGB")
        return T.Compose([T.Resize(round(size / 0.875)), T.CenterCrop(size)])(im)


def finalize_run(spec, result, client, run_id: str, tracking_uri: str, data: DataInfo) -> dict[str, Any]:
    """Log the best and last checkpoints, the kernel picture and the model; return the summary."""
    import tempfile

    from orchestrator.tracking import log_pytorch_model
    from workloads.models import load_checkpoint, visualize_kernels

    summary: dict[str, Any] = {"metrics": dict(result.metrics or {})}
    last = result.checkpoint
    if last is None:
        _warn("the run reported no checkpoint; nothing to log as artifacts")
        return summary
    best_ckpt, best_metrics = last, dict(result.metrics or {})
    for ckpt, metrics in result.best_checkpoints or []:
        if metrics.get("val/top1", -1) > best_metrics.get("val/top1", -1):
            best_ckpt, best_metrics = ckpt, metrics
    summary["best_epoch"] = best_metrics.get("epoch")
    summary["best_val_top1"] = best_metrics.get("val/top1")
    summary["checkpoint"] = last.path

    with best_ckpt.as_directory() as best_dir:
        client.log_artifacts(run_id, best_dir, "checkpoints/best")
    with last.as_directory() as last_dir:
        client.log_artifacts(run_id, last_dir, "checkpoints/last")
        model, _extra = load_checkpoint(os.path.join(last_dir, "model.pt"))

    with tempfile.TemporaryDirectory(prefix="cvlab-kernels-") as tmp:
        try:
            png = visualize_kernels(model, _kernel_image(data, spec.data.image_size),
                                    out_png=os.path.join(tmp, "kernels.png"))
            client.log_artifact(run_id, png)
        except ValueError as err:  # e.g. the ResNet baseline has no generated kernels
            _say(f"no kernel visualisation: {err}")

    if spec.tracking.log_model:
        size = spec.data.image_size
        summary["model_uri"] = log_pytorch_model(
            tracking_uri, run_id, model, input_size=(1, 3, size, size),
            registered_model_name=spec.tracking.register_model,
        )
    return summary


# ----------------------------------------------------------------------------------------------------------
# The whole run


def _ensure_ray(spec) -> bool:
    """Connect to Ray (RAY_ADDRESS / a running local cluster, else start one); True when we started it."""
    import ray

    if ray.is_initialized():
        return False
    ray.init(log_to_driver=True)
    return True


def _check_resources(spec) -> None:
    """Refuse a run whose workers can never fit in a local cluster (Ray would wait for them)."""
    import ray

    total = ray.cluster_resources()
    per = dict(spec.scaling.resources_per_worker)
    need_cpu = spec.scaling.num_workers * per.get("CPU", 1.0)
    need_gpu = spec.scaling.num_workers * per.get("GPU", 1.0 if spec.scaling.use_gpu else 0.0)
    if need_cpu > total.get("CPU", 0.0) or need_gpu > total.get("GPU", 0.0):
        raise CvlabError(
            f"the run needs {need_cpu:g} CPU and {need_gpu:g} GPU for {spec.scaling.num_workers} worker(s) but "
            f"this Ray cluster has {total.get('CPU', 0):g} CPU and {total.get('GPU', 0):g} GPU; lower "
            "scaling.num_workers / resources_per_worker, set scaling.use_gpu: false, or use a bigger cluster"
        )


def run_experiment(spec, resume: bool = False) -> dict[str, Any]:
    """Run a classification experiment end to end; returns the summary (run_id, metrics, ...).

    Detection specs are handed to `orchestrator.detection.run_detection`.
    """
    if spec.workload == "detection":
        from orchestrator.detection import run_detection

        return run_detection(spec, resume=resume)

    from orchestrator.spec_loader import flatten_spec
    from orchestrator.storage import resolve_storage
    from orchestrator.tracking import (
        RAY_RUN_TAG,
        check_tracking_server,
        create_run,
        default_artifact_location,
        end_run,
        ensure_experiment,
        git_commit,
        log_params,
        make_client,
        resolve_tracking_uri,
        wait_for_tracking_server,
    )

    # Ray Train's report() waits up to this interval (2 s by default); per-epoch reports need no more.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    check_gpu_request(spec)  # before anything is created or read
    tracking_uri = resolve_tracking_uri(spec)
    check_tracking_server(tracking_uri)
    fs, storage = resolve_storage(spec.run.storage_path)
    base = spec.run.name or spec.experiment.name
    previous = find_previous_run(fs, storage, base) if resume else None
    if resume and previous is None:
        raise CvlabError(f"nothing to resume: no earlier run named {base!r} in {storage}")

    data = prepare_data(spec)
    _check_batch(spec, data)
    stats = model_stats(spec, data)

    client = make_client(tracking_uri)
    experiment_name = spec.tracking.experiment_name or spec.experiment.name
    try:
        experiment_id = ensure_experiment(client, experiment_name, default_artifact_location(tracking_uri))
    except Exception as err:  # MLflow raises many kinds (MlflowException, requests errors, sqlalchemy)
        raise CvlabError(f"MLflow at {tracking_uri}: cannot open experiment {experiment_name!r}: {err}") from err

    if previous is not None:
        ray_name, record = previous
        run_id = record["mlflow_run_id"]
        try:
            client.get_run(run_id)
        except Exception as err:
            raise CvlabError(
                f"the run to resume ({ray_name}) logged to MLflow run {run_id} at {record.get('tracking_uri')}, "
                f"which {tracking_uri} does not have: {err}"
            ) from err
        client.update_run(run_id, status="RUNNING")
        _say(f"resuming {ray_name} (MLflow run {run_id})")
    else:
        ray_name = new_run_name(fs, storage, base)
        run_id = create_run(client, experiment_id, base, tags={**spec.experiment.tags, RAY_RUN_TAG: ray_name})
        write_record(fs, join(storage, ray_name), {
            "mlflow_run_id": run_id, "tracking_uri": tracking_uri, "experiment_id": experiment_id,
            "base_name": base, "created": time.time(),
        })

    started_ray = False
    try:
        params = {**flatten_spec(spec), **stats,
                  "data.train_images": data.train_images, "data.val_images": data.val_images,
                  "data.classes": len(data.classes), "git.commit": git_commit() or "none"}
        changed = log_params(client, run_id, params)
        if changed:
            client.set_tag(run_id, f"cvlab.resume.{int(time.time())}",
                           json.dumps({k: new for k, (_old, new) in changed.items()})[:5000])
        artifact = "resolved.yaml" if previous is None else f"resolved-resume-{time.strftime('%Y%m%d-%H%M%S')}.yaml"
        client.log_text(run_id, spec_yaml(spec), artifact)
        _say(f"MLflow run {run_id} in experiment {experiment_name!r} ({tracking_uri}); "
             f"Ray Train run {join(storage, ray_name)}")

        started_ray = _ensure_ray(spec)
        if started_ray:
            _check_resources(spec)
        trainer = build_trainer(spec, run_id=run_id, tracking_uri=tracking_uri, name=ray_name,
                                storage_path=storage, resume=previous is not None, data=data)
        start = time.perf_counter()
        try:
            result = trainer.fit()
        except Exception as err:
            from ray.exceptions import RayActorError
            from ray.train import TrainingFailedError

            if isinstance(err, TrainingFailedError):
                raise CvlabError(training_error_message(err)) from err
            if isinstance(err, RayActorError):  # Ray's Ctrl-C handler aborts the controller actor
                raise CvlabError(f"training was aborted: the Ray Train controller exited ({err})") from err
            raise
        # The server may have gone away during training (the workers kept going): wait for it to log.
        wait_for_tracking_server(tracking_uri)
        summary = finalize_run(spec, result, client, run_id, tracking_uri, data)
        end_run(client, run_id, "FINISHED")
    except CvlabError as err:
        _end_failed(client, run_id, str(err))
        raise
    except (KeyboardInterrupt, SystemExit) as err:
        # Ray's SIGINT handler aborts training and may exit through SystemExit: both are interruptions.
        _end_failed(client, run_id, f"interrupted ({type(err).__name__})")
        raise KeyboardInterrupt from err
    except BaseException as err:
        _end_failed(client, run_id, f"{type(err).__name__}: {err}")
        raise
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    summary.update({
        "run_id": run_id,
        "experiment_id": experiment_id,
        "tracking_uri": tracking_uri,
        "ray_run": join(storage, ray_name),
        "seconds": round(time.perf_counter() - start, 1),
    })
    return summary


# ----------------------------------------------------------------------------------------------------------
# CLI


def _print_summary(summary: dict[str, Any]) -> None:
    m = summary.get("metrics", {})
    _say("")
    _say("run finished")
    _say(f"  MLflow run id   {summary.get('run_id')}  (experiment {summary.get('experiment_id')}, "
         f"{summary.get('tracking_uri')})")
    _say(f"  Ray Train run   {summary.get('ray_run')}")
    if m:
        _say(f"  final epoch     {m.get('epoch')}: val/top1 {m.get('val/top1', float('nan')):.4f}  "
             f"val/top5 {m.get('val/top5', float('nan')):.4f}  val/loss {m.get('val/loss', float('nan')):.4f}  "
             f"train/loss {m.get('train/loss', float('nan')):.4f}")
    if summary.get("best_epoch") is not None:
        _say(f"  best checkpoint epoch {summary['best_epoch']}: val/top1 {summary['best_val_top1']:.4f}")
    if summary.get("model_uri"):
        _say(f"  model           {summary['model_uri']}")
    _say(f"  training time   {summary.get('seconds')} s")


def _cmd_run(args) -> int:
    from orchestrator.spec_loader import load_spec

    spec = load_spec(args.spec, args.set)
    summary = run_experiment(spec, resume=args.resume)
    if spec.workload == "classification":
        _print_summary(summary)
    else:
        _say(json.dumps(summary, indent=1, default=str))
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "run",
        help="train an experiment YAML on Ray Train, tracked in MLflow",
        description="Train the experiment described by a YAML file on Ray Train (2 CPU workers, a GPU "
        "cluster, ...) and track it in MLflow.",
    )
    p.add_argument("spec", help="experiment YAML, e.g. experiments/quickstart.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec value, e.g. --set optim.epochs=3 (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue the latest run of the same name from its last checkpoint (same MLflow run)")
    p.set_defaults(func=_cmd_run)
