"""`workload: detection`: mmdet 3.x detection / instance segmentation on Ray Train, tracked in MLflow.

    cvlab run experiments/det_quickstart.yaml [--set detection.max_epochs=2 ...] [--resume]

The driver (this module) prepares and validates the COCO data (generating the synthetic set when asked),
turns the mmdet config named by `detection.config` plus the YAML's settings into the final config, builds
the model once on the meta device (config errors surface here, not in a worker), creates the MLflow
experiment and run, and fits a `TorchTrainer` whose workers each run an mmengine `Runner` in Ray's process
group (`workloads.detection.runner.train_worker`). Workers report COCO metrics and rank 0's checkpoints to
Ray Train; rank 0 logs losses, metrics and the final checkpoint to the MLflow run. A worker failure restarts
the group from the latest reported checkpoint (`run.max_failures`); `--resume` continues the newest
`<run.storage_path>/<name>-<timestamp>` run and its MLflow run, as for classification.

The YAML's `model` section, when it names a model explicitly (`model: {name: cednet26, ...}`), replaces the
backbone architecture of the mmdet config (its overrides go to the backbone too).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from orchestrator.errors import CvlabError
from orchestrator.run_records import (
    find_previous_run,
    join,
    new_run_name,
    spec_yaml,
    training_error_message,
    write_record,
)
from orchestrator.train import CONTROLLER_FAILURE_LIMIT

BEST_METRIC = "val/bbox_mAP"


def _say(msg: str) -> None:
    print(msg, flush=True)


def prepare_coco(spec) -> dict:
    """Generate the synthetic set when asked and missing, then validate the annotations (CvlabError)."""
    from workloads.detection.coco_check import check_coco_dataset

    det = spec.detection
    root = Path(det.data_root)
    if not (root / "annotations").is_dir():
        if not det.generate:
            raise CvlabError(f"detection.data_root {root} holds no annotations/ folder; point it at a COCO "
                             "layout (annotations/instances_{train,val}2017.json, train2017/, val2017/) or "
                             "set detection.generate: true for the synthetic shapes set")
        from workloads.detection.synthetic_coco import DEFAULT_CLASSES, make_coco

        _say(f"generating the synthetic COCO set in {root} ...")
        try:
            make_coco(root, num_train=det.num_train_generated, num_val=det.num_val_generated,
                      size=det.generated_size, classes=det.classes or DEFAULT_CLASSES, seed=spec.experiment.seed)
        except ValueError as err:
            raise CvlabError(f"detection: cannot generate the synthetic COCO set: {err}") from None
    try:
        report = check_coco_dataset(root)
    except ValueError as err:
        raise CvlabError(f"detection data: {err}") from None
    for split, info in report.items():
        for warning in info["warnings"]:
            print(f"cvlab: warning: {split}: {warning}", flush=True)
    return report


def build_detection_config(spec, classes: list[str] | None = None):
    """The final mmengine Config of a detection spec (CvlabError on bad settings)."""
    from workloads.detection.mmcfg import build_config

    det = spec.detection
    try:
        cfg = build_config(det, work_dir="work_dirs/cvlab-det", seed=spec.experiment.seed,
                           log_every=spec.run.log_every, checkpoint_every=spec.run.checkpoint_every,
                           checkpoints_kept=spec.run.checkpoints_kept, classes=classes)
    except (ValueError, FileNotFoundError) as err:
        raise CvlabError(f"detection: {err}") from None
    if "name" in spec.model.model_fields_set:
        backbone = cfg.model.backbone
        if backbone.get("type") not in ("RedNet", "CedNet"):
            raise CvlabError(f"model.name={spec.model.name!r}: the backbone of {det.config} is "
                             f"{backbone.get('type')!r}, not one of ours (RedNet / CedNet)")
        backbone["arch"] = spec.model.name
        backbone["arch_overrides"] = dict(spec.model.overrides)
    return cfg


def check_model(cfg) -> int:
    """Build the detector on the meta device (no weights): bad configs fail here. Returns its size."""
    import torch
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    import workloads.detection.plugin  # noqa: F401

    register_all_modules()
    try:
        with torch.device("meta"):
            model = MODELS.build(cfg.model)
    except Exception as err:  # noqa: BLE001 - mmdet raises KeyError, TypeError, ValueError, AssertionError
        raise CvlabError(f"detection: cannot build the model of the config: {type(err).__name__}: {err}") from None
    return sum(p.numel() for p in model.parameters())


def build_detection_trainer(spec, cfg, *, run_id: str, tracking_uri: str, name: str, storage_path: str,
                            fs=None, params: dict | None = None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from workloads.detection.runner import train_worker

    use_gpu = spec.scaling.use_gpu
    per_worker = dict(spec.scaling.resources_per_worker)
    config = {
        "cfg": cfg.to_dict(),
        "run_id": run_id,
        "tracking_uri": tracking_uri,
        "log_every": spec.run.log_every,
        "log_model": spec.tracking.log_model,
        "params": params or {},
        "threads": max(1, int(per_worker.get("CPU", 1))),
    }
    return TorchTrainer(
        train_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=spec.scaling.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=per_worker or None),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=spec.run.checkpoints_kept,
                                               checkpoint_score_attribute=BEST_METRIC,
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=spec.run.max_failures,
                                         controller_failure_limit=CONTROLLER_FAILURE_LIMIT),
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
    )


# ----------------------------------------------------------------------------------------------------------
# Run bookkeeping: `<storage>/<name>-<timestamp>/cvlab_run.json` names the MLflow run (as for classification)


def _ensure_ray(spec) -> bool:
    """Connect to Ray (RAY_ADDRESS / a running cluster, else start a local one); True when we started it."""
    import ray

    if ray.is_initialized():
        return False
    ray.init(log_to_driver=True)
    total = ray.cluster_resources()
    per = dict(spec.scaling.resources_per_worker)
    need_cpu = spec.scaling.num_workers * per.get("CPU", 1.0)
    need_gpu = spec.scaling.num_workers * per.get("GPU", 1.0 if spec.scaling.use_gpu else 0.0)
    if need_cpu > total.get("CPU", 0.0) or need_gpu > total.get("GPU", 0.0):
        ray.shutdown()
        raise CvlabError(
            f"the run needs {need_cpu:g} CPU and {need_gpu:g} GPU for {spec.scaling.num_workers} worker(s) but "
            f"this Ray cluster has {total.get('CPU', 0):g} CPU and {total.get('GPU', 0):g} GPU; lower "
            "scaling.num_workers / resources_per_worker, set scaling.use_gpu: false, or use a bigger cluster")
    return True


def run_detection(spec, resume: bool = False) -> dict[str, Any]:
    """Run a detection experiment end to end; returns the summary (run_id, metrics, checkpoint, ...)."""
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
    )
    if spec.detection is None:
        raise CvlabError("workload: detection needs a `detection:` section (at least detection.config)")
    det = spec.detection
    if det.batch_size < 1 or det.max_epochs < 1 or det.val_interval < 1:
        raise CvlabError("detection.batch_size, detection.max_epochs and detection.val_interval must be >= 1")

    tracking_uri = resolve_tracking_uri(spec)
    check_tracking_server(tracking_uri)
    fs, storage = resolve_storage(spec.run.storage_path)
    base = spec.run.name or spec.experiment.name
    previous = find_previous_run(fs, storage, base) if resume else None
    if resume and previous is None:
        raise CvlabError(f"nothing to resume: no earlier run named {base!r} in {storage}")

    data = prepare_coco(spec)
    _say("loading the mmdet config ...")
    cfg = build_detection_config(spec)
    num_params = check_model(cfg)
    classes = list(cfg.train_dataloader.dataset.get("metainfo", {}).get("classes", ()))
    _say(f"{det.config}: {num_params / 1e6:.2f}M parameters, {len(classes)} classes, "
         f"{data['train']['images']} train / {data['val']['images']} val images")

    client = make_client(tracking_uri)
    experiment_name = spec.tracking.experiment_name or spec.experiment.name
    try:
        experiment_id = ensure_experiment(client, experiment_name, default_artifact_location(tracking_uri))
    except Exception as err:  # MLflow raises many kinds
        raise CvlabError(f"MLflow at {tracking_uri}: cannot open experiment {experiment_name!r}: {err}") from err

    if previous is not None:
        ray_name, record = previous
        run_id = record["mlflow_run_id"]
        try:
            client.get_run(run_id)
        except Exception as err:
            raise CvlabError(f"the run to resume ({ray_name}) logged to MLflow run {run_id}, which "
                             f"{tracking_uri} does not have: {err}") from err
        client.update_run(run_id, status="RUNNING")
        _say(f"resuming {ray_name} (MLflow run {run_id})")
    else:
        ray_name = new_run_name(fs, storage, base)
        run_id = create_run(client, experiment_id, base, tags={**spec.experiment.tags, RAY_RUN_TAG: ray_name,
                                                                "cvlab.workload": "detection"})
        write_record(fs, join(storage, ray_name), {
            "mlflow_run_id": run_id, "tracking_uri": tracking_uri, "experiment_id": experiment_id,
            "base_name": base, "created": time.time(), "workload": "detection",
        })

    started_ray = False
    start = time.perf_counter()
    try:
        params = {**flatten_spec(spec), "det.model_params": num_params, "det.classes": ",".join(classes),
                  "data.train_images": data["train"]["images"], "data.val_images": data["val"]["images"],
                  "git.commit": git_commit() or "none"}
        changed = log_params(client, run_id, params)
        if changed:
            import json

            client.set_tag(run_id, f"cvlab.resume.{int(time.time())}",
                           json.dumps({k: new for k, (_old, new) in changed.items()})[:5000])
        if previous is None:
            client.log_text(run_id, spec_yaml(spec), "resolved.yaml")
            client.log_text(run_id, cfg.pretty_text, "mmdet_config.py")
        _say(f"MLflow run {run_id} in experiment {experiment_name!r} ({tracking_uri}); "
             f"Ray Train run {join(storage, ray_name)}")

        started_ray = _ensure_ray(spec)
        trainer = build_detection_trainer(spec, cfg, run_id=run_id, tracking_uri=tracking_uri, name=ray_name,
                                          storage_path=storage, fs=fs)
        try:
            result = trainer.fit()
        except Exception as err:
            from ray.train import TrainingFailedError

            if isinstance(err, TrainingFailedError):
                raise CvlabError(training_error_message(err, "detection training")) from err
            raise
        metrics = dict(result.metrics or {})
        best = None
        if getattr(result, "best_checkpoints", None):
            ranked = [(m.get(BEST_METRIC, float("-inf")), c) for c, m in result.best_checkpoints]
            best = max(ranked, key=lambda t: t[0])[1].path
        summary = {
            "metrics": metrics,
            "checkpoint": result.checkpoint.path if result.checkpoint else None,
            "best_checkpoint": best,
        }
        client.set_tag(run_id, "cvlab.checkpoint", summary["checkpoint"] or "none")
        end_run(client, run_id, "FINISHED")
    except CvlabError as err:
        end_run(client, run_id, "FAILED", str(err))
        raise
    except (KeyboardInterrupt, SystemExit) as err:
        end_run(client, run_id, "FAILED", f"interrupted ({type(err).__name__})")
        raise KeyboardInterrupt from err
    except BaseException as err:
        end_run(client, run_id, "FAILED", f"{type(err).__name__}: {err}")
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
        "num_params": num_params,
        "seconds": round(time.perf_counter() - start, 1),
    })
    m = summary["metrics"]
    _say(f"detection run finished: epoch {m.get('epoch')}, bbox mAP {m.get('val/bbox_mAP', float('nan')):.3f}"
         + (f", segm mAP {m['val/segm_mAP']:.3f}" if "val/segm_mAP" in m else "")
         + f" ({summary['seconds']} s)")
    return summary
