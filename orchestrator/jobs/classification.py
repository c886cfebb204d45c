"""`workload: classification`: ImageNet-layout image classification (the job; the run lifecycle does the rest).

The job generates the embedded dataset when asked, verifies the images once, checks the model, hands every
worker a frozen `TrainConfig` (`workloads.classification.loop` trains), and at the end logs the best and last
checkpoints, a kernel visualisation and the model. Its evaluation job (`ClassificationEvalJob`) holds it for the
data plan.

The worker configs are translated from the validated spec here and nowhere else (`input_config`,
`augment_config`, `optim_config`, `model_overrides`): the schema holds every default and every rule, the
worker's dataclasses only the values.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from orchestrator.config.schema import AugmentSection, DataSection, OptimSection
from orchestrator.errors import CvlabError
from orchestrator.inference.classifier import Classifier
from orchestrator.inference.reports import confusion_png, per_class_table
from orchestrator.inference.sources import read_classifier
from orchestrator.jobs.evaluation import EvalJob
from orchestrator.names import BEST_CHECKPOINT_ARTIFACT, LAST_CHECKPOINT_ARTIFACT
from orchestrator.runs.job import Job, RunContext
from orchestrator.runs.records import list_local_checkpoints
from orchestrator.runs.trainer import best_and_last
from orchestrator.tracking.metric_logger import MlflowMetricLogger
from orchestrator.tracking.models import log_classifier_model
from orchestrator.tracking.system_metrics import SystemMetricsRecorder
from workloads.classification.checkpoint import MODEL_FILE
from workloads.classification.config import DataPlan, FaultDrills, OptimConfig, ShardPlan, StepExact, TrainConfig
from workloads.classification.data import scan_split, split_dataset
from workloads.classification.evaluation import EvalConfig, eval_loop_per_worker
from workloads.classification.loop import train_loop_per_worker
from workloads.classification.recipe import AugmentConfig, InputConfig
from workloads.classification.shard_manifest import MANIFEST_FILE, read_manifest
from workloads.classification.synthetic import make_imagenet
from workloads.classification.transforms import build_val_transform
from workloads.cost_probe import COST_METRICS, CostProbeConfig, probe_classifier
from workloads.object_storage import S3_SETTINGS, is_bucket_uri
from workloads.models import (
    build_model,
    count_flops,
    count_params,
    load_checkpoint,
    load_published_rednet,
    visualize_kernels,
)

log = logging.getLogger(__name__)


def prepare_data(spec):
    """Generate the embedded dataset when asked and missing, then verify the images once (in Ray's driver
    process, before any worker starts); or read the manifest of a shard set (`data.format`).

    Returns a `workloads.classification.config.DataPlan` (or `ShardPlan`). Raises CvlabError for a missing
    folder, an empty split or a class folder without readable images; unreadable files are listed in the plan
    (and a warning names the first ones).
    """
    shards = prepare_shards(spec)
    if shards is not None:
        return shards
    root = Path(spec.data.root).expanduser().absolute()
    if spec.data.generate and not (root / "train").is_dir():
        log.info("generating the embedded dataset in %s ...", root)
        try:
            make_imagenet(root, classes=spec.data.num_classes_generated, per_class=spec.data.per_class_generated,
                          size=spec.data.generated_size, seed=spec.experiment.seed, progress=log.info)
        except ValueError as err:
            raise CvlabError(f"cannot generate the dataset in {root}: {err}") from err
    if not root.is_dir():
        raise CvlabError(
            f"data.root {root} does not exist; point it at an ImageNet-layout folder (train/<class>/*.JPEG, "
            "val/<class>/*.JPEG) or set data.generate: true for the embedded synthetic dataset"
        )
    try:
        train = scan_split(str(root / "train"), progress=log.info)
        val = scan_split(str(root / "val"), classes=train.classes, progress=log.info)
    except ValueError as err:
        raise CvlabError(str(err)) from err
    bad = [(os.path.join(train.root, rel), why) for rel, why in train.bad]
    bad += [(os.path.join(val.root, rel), why) for rel, why in val.bad]
    if bad:
        shown = "; ".join(f"{p} ({why})" for p, why in bad[:5])
        log.warning("skipping %d unreadable image(s): %s%s", len(bad), shown, " ..." if len(bad) > 5 else "")
    if val.missing_classes:
        log.warning("%d training class(es) have no validation folder, e.g. %s", len(val.missing_classes),
                    val.missing_classes[0])
    return DataPlan(train_dir=train.root, val_dir=val.root, classes=tuple(train.classes),
                    train_skip=tuple(train.skipped), val_skip=tuple(val.skipped),
                    train_images=train.num_images, val_images=val.num_images)


def prepare_shards(spec) -> ShardPlan | None:
    """The shard set `data.root` names (`data.format: shards`, or `auto` and a manifest there), else None."""
    root, fmt = spec.data.root, spec.data.format
    remote = is_bucket_uri(root)
    if fmt == "folder":
        if remote:
            raise CvlabError(f"data.root {root} is a bucket URI: only a shard set can be read from a bucket "
                             "(data.format: shards or auto; write one with `cvlab data shard`)")
        return None
    location = root if remote else os.path.abspath(os.path.expanduser(root))
    if fmt == "auto" and not remote and not os.path.exists(os.path.join(location, MANIFEST_FILE)):
        return None
    try:
        shard_set = read_manifest(location)
    except ValueError as err:
        raise CvlabError(f"data.root: {err}") from None
    except OSError as err:  # pyarrow's words for a missing bucket, refused credentials, an unreachable server
        raise CvlabError(f"data.root {root}: cannot read the shard set: {err} ({S3_SETTINGS})") from None
    skipped = sum(len(shard_set.splits[split].get("skipped", [])) for split in ("train", "val"))
    log.info("shard set %s: %d training and %d validation images in %d + %d shards, %d classes", location,
             shard_set.samples("train"), shard_set.samples("val"), len(shard_set.shards("train")),
             len(shard_set.shards("val")), len(shard_set.classes))
    return ShardPlan(location=location, classes=shard_set.classes, train_shards=tuple(shard_set.shards("train")),
                     val_shards=tuple(shard_set.shards("val")), train_images=shard_set.samples("train"),
                     val_images=shard_set.samples("val"), skipped=skipped,
                     retry_limit_s=spec.run.storage_retry_limit_s)


def step_exact(spec) -> StepExact | None:
    """The step-exact order for a worker range or checkpoints inside epochs; None for the classic order."""
    if not (spec.scaling.elastic or spec.run.checkpoint_every_steps):
        return None
    return StepExact(slots=spec.scaling.max_workers, checkpoint_every_steps=spec.run.checkpoint_every_steps)


def check_step_exact(spec, data) -> None:
    """The step-exact order restarts an epoch at a step of a fixed sample order: a folder's, not a stream's."""
    if step_exact(spec) is not None and isinstance(data, ShardPlan):
        raise CvlabError("scaling.num_workers: [min, max] and run.checkpoint_every_steps need a data folder "
                         f"(data.format: folder): the shard set {data.location} is streamed, and a stream cannot "
                         "restart an epoch at a given step; use a fixed worker count with shards")


def check_batch(spec, data) -> None:
    """The training split must hold at least one global batch (of `max` workers for a worker range)."""
    global_batch = spec.data.batch_size * spec.scaling.max_workers
    if data.train_images < global_batch:
        raise CvlabError(
            f"the training split has {data.train_images} readable images, fewer than one global batch "
            f"({spec.scaling.max_workers} workers x data.batch_size {spec.data.batch_size}); lower data.batch_size"
        )


def with_class_count(overrides: dict[str, Any], count: int) -> dict[str, Any]:
    """`overrides` with `num_classes: count` (last, where the checkpoints have always recorded it)."""
    return {**{k: v for k, v in overrides.items() if k != "num_classes"}, "num_classes": count}


def model_overrides(spec, data) -> dict[str, Any]:
    """The model's constructor overrides as the workers build it: the spec's, with the class count of the data
    (and one input channel for grayscale data)."""
    overrides = dict(spec.model.overrides)
    wanted = overrides.get("num_classes")
    if wanted is not None and wanted != len(data.classes):
        raise CvlabError(f"model.num_classes is {wanted} but {data.where} has {len(data.classes)} class folders")
    if spec.data.grayscale:
        overrides["in_channels"] = 1
    return with_class_count(overrides, len(data.classes))


_INPUT_KEYS = {f.name for f in dataclasses.fields(InputConfig)}


def input_config(data: DataSection) -> InputConfig:
    """The worker's `InputConfig` from the spec's `data` section (its other keys are not the network's)."""
    values = data.model_dump(include=_INPUT_KEYS)
    return InputConfig(**{**values, "mean": tuple(data.mean), "std": tuple(data.std)})


def augment_config(augment: AugmentSection) -> AugmentConfig:
    """The worker's `AugmentConfig` from the spec's `data.augment` section."""
    values = augment.model_dump()
    if isinstance(values["color_jitter"], list):
        values["color_jitter"] = tuple(values["color_jitter"])
    return AugmentConfig(**values)


def optim_config(optim: OptimSection) -> OptimConfig:
    """The worker's `OptimConfig` from the spec's `optim` section."""
    return OptimConfig(**optim.model_dump())


def data_params(data) -> dict[str, Any]:
    """The MLflow params that describe a `DataPlan`."""
    return {"data.train_images": data.train_images, "data.val_images": data.val_images,
            "data.classes": len(data.classes)}


class ClassificationJob(Job):
    workload = "classification"
    best_metric = "val/top1"
    best_mode = "max"
    step_metric = "epoch"
    reported_metrics = ("val/top1", "val/top5", "val/loss", "train/loss", "train/top1", "lr", "images_per_s",
                        "epoch_time_s")
    data_paths = ("data.root", "data.generate", "data.num_classes_generated", "data.per_class_generated",
                  "data.generated_size")
    cost_metrics = COST_METRICS

    def __init__(self, spec, data=None):
        super().__init__(spec)
        self.data = data  # a DataPlan; given by a Tune search, which scans the data once for all trials
        self.stats: dict[str, Any] = {}
        self.start_from: str | None = None  # a checkpoint this fresh run continues (`start_from_checkpoint`)

    def start_from_checkpoint(self, path: str) -> None:
        self.start_from = path  # the worker restores it as it restores a fallback checkpoint

    def ensure_data(self):
        """The data plan: scanned (and generated when asked) on first use, unless a search handed it over."""
        if self.data is None:
            self.data = prepare_data(self.spec)
        return self.data

    def prepare(self) -> None:
        spec = self.spec
        check_batch(spec, self.ensure_data())
        check_step_exact(spec, self.data)
        o = spec.optim
        steps = self.data.train_images // (spec.data.batch_size * spec.scaling.max_workers)
        if o.warmup_iters and o.warmup_iters >= o.epochs * steps:
            raise CvlabError(f"optim.warmup_iters ({o.warmup_iters}) must be shorter than training "
                             f"({o.epochs} epochs x {steps} steps)")
        try:  # build once, before any worker: validates the config; params and GFLOPs at the image size
            model = build_model(spec.model.name, **model_overrides(spec, self.data))
        except (ValueError, TypeError, KeyError) as err:
            raise CvlabError(f"model {spec.model.name}: {err}") from err
        size, channels = spec.data.image_size, 1 if spec.data.grayscale else 3
        self.stats = {
            "model.params": count_params(model),
            "model.gflops": round(count_flops(model, (1, channels, size, size)) / 1e9, 4),
            "model.gflops_224": round(count_flops(model, (1, channels, 224, 224)) / 1e9, 4),
        }

    def params(self) -> dict[str, Any]:
        return {**self.stats, **data_params(self.data)}

    def dataset_input(self) -> dict[str, Any]:
        d = self.data
        digest = hashlib.sha256("\n".join([*d.classes, str(d.train_images), str(d.val_images)]).encode())
        source = d.location if isinstance(d, ShardPlan) else str(Path(d.train_dir).parent)
        return {"name": Path(self.spec.data.root).name or "data", "source": source,
                "digest": digest.hexdigest()[:16],
                "profile": {"train_images": d.train_images, "val_images": d.val_images, "classes": len(d.classes),
                            "skipped_images": d.skipped}}

    def cost_probe(self):
        spec = self.spec
        return probe_classifier, CostProbeConfig(
            model_name=spec.model.name, model_overrides=model_overrides(spec, self.ensure_data()),
            batch_size=spec.data.batch_size, image_size=spec.data.image_size,
            in_channels=1 if spec.data.grayscale else 3, optim=optim_config(spec.optim),
            autocast=spec.precision.autocast, channels_last=spec.precision.channels_last,
            use_gpu=spec.scaling.use_gpu)

    def worker(self):
        return train_loop_per_worker

    def worker_config(self, ctx: RunContext):
        spec, run = self.spec, self.spec.run
        local = ctx.local_run_dir
        nan = run.fault_nan_loss_at
        faults = FaultDrills(
            **self.kill_drill(ctx),
            nan_at=(nan.epoch, nan.step) if nan else None,
        )
        return TrainConfig(
            model_name=spec.model.name,
            model_overrides=model_overrides(spec, self.data),
            data=self.data,
            seed=spec.experiment.seed,
            inputs=input_config(spec.data),
            augment=augment_config(spec.data.augment),
            batch_size=spec.data.batch_size,
            loader_workers=spec.data.num_workers,
            optim=optim_config(spec.optim),
            autocast=spec.precision.autocast,
            channels_last=spec.precision.channels_last,
            checkpoint_every=run.checkpoint_every,
            log_every=run.log_every,
            faults=faults,
            fallback_checkpoints=(self.start_from,) if self.start_from and not ctx.resumed
            else tuple(list_local_checkpoints(local)) if local and ctx.resumed else (),
            epoch_logger=MlflowMetricLogger(ctx.tracking_uri, ctx.run_id, key=self.best_metric),
            system_metrics=SystemMetricsRecorder(ctx.tracking_uri, ctx.run_id),
            verbosity=ctx.verbosity,
            storage_retry_limit_s=run.storage_retry_limit_s,
            step_exact=step_exact(spec),
        )

    def finalize(self, result, ctx: RunContext) -> dict[str, Any]:
        """Log the best and last checkpoints, the kernel picture and the model; return the summary."""
        summary: dict[str, Any] = {"metrics": dict(result.metrics or {})}
        best, best_metrics, last = best_and_last(result, self.best_metric, self.best_mode)
        if last is None:
            log.warning("the run reported no checkpoint; nothing to log as artifacts")
            return summary
        summary.update(best_epoch=best_metrics.get("epoch"), best_val_top1=best_metrics.get(self.best_metric),
                       checkpoint=last.path)
        client, run_id = ctx.client, ctx.run_id
        with best.as_directory() as best_dir:
            client.log_artifacts(run_id, best_dir, BEST_CHECKPOINT_ARTIFACT)
        with last.as_directory() as last_dir:
            client.log_artifacts(run_id, last_dir, LAST_CHECKPOINT_ARTIFACT)
            model, _extra = load_checkpoint(os.path.join(last_dir, MODEL_FILE))
            if self.spec.tracking.log_model:
                classifier = Classifier(model=model.eval(), name=self.spec.model.name,
                                        classes=list(self.data.classes), inputs=input_config(self.spec.data))
                summary["model_uri"] = log_classifier_model(
                    ctx.tracking_uri, run_id, classifier, os.path.join(last_dir, MODEL_FILE),
                    registered_model_name=self.spec.tracking.register_model)

        with tempfile.TemporaryDirectory(prefix="cvlab-kernels-") as tmp:
            try:
                png = visualize_kernels(model, self._kernel_image(), out_png=os.path.join(tmp, "kernels.png"))
                client.log_artifact(run_id, png)
            except ValueError as err:  # e.g. the ResNet baseline has no generated kernels
                log.info("no kernel visualisation: %s", err)

        return summary

    def _kernel_image(self):
        """The first validation image as the model sees it in validation: a (1, C, H, W) tensor from the
        validation transform (the spec's `data.val_resize`, crop, mean and std)."""
        ds = split_dataset(self.data, "val", build_val_transform(input_config(self.spec.data)), rank=0, world=1)
        return next(iter(ds))[0][None]

    def summary_lines(self, summary: dict[str, Any]) -> list[str]:
        m = summary.get("metrics", {})
        nan = float("nan")
        lines = []
        if m:
            lines.append(f"  final epoch     {m.get('epoch')}: val/top1 {m.get('val/top1', nan):.4f}  val/top5 "
                         f"{m.get('val/top5', nan):.4f}  val/loss {m.get('val/loss', nan):.4f}  train/loss "
                         f"{m.get('train/loss', nan):.4f}")
        if summary.get("best_epoch") is not None:
            lines.append(f"  best checkpoint epoch {summary['best_epoch']}: val/top1 {summary['best_val_top1']:.4f}")
        if summary.get("model_uri"):
            lines.append(f"  model           {summary['model_uri']}")
        return lines


class ClassificationEvalJob(EvalJob):
    """`cvlab eval` of a classification checkpoint: data-parallel over the validation split, counts summed
    exactly across workers; a new MLflow run tagged with the source run gets top-1/top-5, per-class accuracy
    and a confusion-matrix picture. Holds the `ClassificationJob` for its data plan (and dataset input)."""

    best_metric = "eval/top1"
    reported_metrics = ("eval/top1", "eval/top5", "eval/loss")

    def __init__(self, job: ClassificationJob, source):
        super().__init__(job, source)
        self.model_name = ""
        self.overrides: dict[str, Any] = {}
        self.state_dict: dict = {}
        self.stats: dict[str, Any] = {}

    @property
    def data(self):
        return self.job.data

    def prepare(self) -> None:
        classes = list(self.job.ensure_data().classes)
        if self.source.format == "mmcls":  # a published RedNet: the spec names the architecture
            model = self._published_model(classes)
        else:
            model = self._cvlab_model(classes)
        self.stats = {"model.params": count_params(model)}
        for note in self.source.notes:
            log.info("%s", note)

    def _published_model(self, classes: list[str]):
        """The spec's architecture with the weights of a published mmcls RedNet file (kept as `state_dict`)."""
        self.model_name = self.spec.model.name
        self.overrides = model_overrides(self.spec, self.data)
        model = build_model(self.model_name, **self.overrides)
        try:
            load_published_rednet(model, self.source.path)
        except (ValueError, OSError, RuntimeError) as err:
            raise CvlabError(f"{self.source.given}: {err}") from err
        self.state_dict = model.state_dict()
        return model

    def _cvlab_model(self, classes: list[str]):
        """The model a cvlab checkpoint names, with its weights (kept as `state_dict`); refused when trained on
        other classes."""
        self.model_name, overrides, self.state_dict, extra = read_classifier(self.source)
        trained_on = extra.get("classes")
        if trained_on is not None and list(trained_on) != classes:
            raise CvlabError(f"{self.source.given} was trained on {len(trained_on)} classes "
                             f"({', '.join(map(str, trained_on[:5]))}...), not the {len(classes)} class folders "
                             f"of {self.data.val_dir if isinstance(self.data, DataPlan) else self.data.where}")
        self.overrides = with_class_count(overrides, len(classes))
        model = build_model(self.model_name, **self.overrides)
        try:
            model.load_state_dict(self.state_dict, strict=True)
        except RuntimeError as err:
            raise CvlabError(f"{self.source.given} does not fit {self.model_name} with {len(classes)} classes: "
                             f"{str(err).splitlines()[0]}") from err
        return model

    def params(self) -> dict[str, Any]:
        return {**self.stats, **data_params(self.data), **self.source_params(), "eval.model": self.model_name}

    def worker(self):
        return eval_loop_per_worker

    def worker_config(self, ctx: RunContext):
        spec = self.spec
        return EvalConfig(model_name=self.model_name, state_dict=self.state_dict, data=self.data,
                          model_overrides=self.overrides, inputs=input_config(spec.data),
                          batch_size=spec.data.batch_size, loader_workers=spec.data.num_workers,
                          label_smoothing=spec.optim.label_smoothing, autocast=spec.precision.autocast,
                          channels_last=spec.precision.channels_last, verbosity=ctx.verbosity)

    def finalize(self, result, ctx: RunContext) -> dict[str, Any]:
        metrics = dict(result.metrics or {})
        scalars = self.log_eval_metrics(result, ctx)
        classes = list(self.data.classes)
        with tempfile.TemporaryDirectory(prefix="cvlab-eval-") as tmp:
            for path in per_class_table(metrics["per_class"], tmp):
                ctx.client.log_artifact(ctx.run_id, path)
            ctx.client.log_artifact(ctx.run_id, confusion_png(metrics["confusion"], classes, tmp))
        return {"metrics": scalars, "per_class": metrics["per_class"]}

    def summary_lines(self, summary: dict[str, Any]) -> list[str]:
        m = summary["metrics"]
        return [self.source_line(),
                f"  eval            top-1 {m['eval/top1']:.4f}  top-5 {m['eval/top5']:.4f}  loss "
                f"{m['eval/loss']:.4f} on {int(m['eval/images'])} images"]
