"""What the OpenMMLab workloads (mmdet detection, mmseg segmentation) share as jobs: the data check and the
final config before any worker starts, the model built once on the meta device (config errors surface here,
not in a worker), one mmengine `Runner` per Ray Train worker in Ray's process group
(`workloads.mmlab.worker.train_worker`), and the checkpoints logged at the end. `OpenMMLabEvalJob` evaluates a
checkpoint of either: it holds the workload's job for the data check, the config and the meta model.

The YAML's `model` section, when present (`model: {name: cednet26, ...}`), replaces the backbone architecture
of the config (its overrides go to the backbone too).
"""
from __future__ import annotations

import hashlib
import logging
import os
from typing import Any

from orchestrator.errors import CvlabError
from orchestrator.jobs.evaluation import EvalJob
from orchestrator.names import BEST_CHECKPOINT_ARTIFACT, LAST_CHECKPOINT_ARTIFACT
from orchestrator.runs.job import Job, RunContext
from orchestrator.runs.trainer import best_and_last
from orchestrator.tracking.metric_logger import MlflowMetricLogger
from orchestrator.tracking.system_metrics import SystemMetricsRecorder
from workloads.mid_epoch import UNRANKED_SCORE
from workloads.mmlab.checkpoints import load_checkpoint_file
from workloads.mmlab.configs import build_on_meta
from workloads.mmlab.worker import train_worker
from workloads.mmlab.worker_config import SCOPES, MMWorkerConfig

log = logging.getLogger(__name__)
OUR_BACKBONES = ("RedNet", "CedNet")


def checked_data(check, root, workload: str) -> dict:
    """`check(root)` (a workload's data check: a report per split, ValueError naming the bad files) as a
    CvlabError, with the report's warnings logged; returns the report."""
    try:
        report = check(root)
    except ValueError as err:
        raise CvlabError(f"{workload} data: {err}") from None
    for split, info in report.items():
        for warning in info.get("warnings", ()):
            log.warning("%s: %s", split, warning)
    return report


class OpenMMLabJob(Job):
    """Subclasses set `workload` (= the spec section), `scope`, the metrics (`metric_names`: evaluator key ->
    reported name, from their workload package) and implement `prepare_data` and `build_config`."""

    scope = ""  # "mmdet" | "mmseg"; `SCOPES[scope]` prefixes the params ("det.model_params")
    metric_names: dict[str, str] = {}

    def __init__(self, spec, data: dict | None = None):
        super().__init__(spec)
        self.data = data  # the data check's report (per split), shared by a search's trials
        self.cfg = None
        self.meta_model = None  # the config's model on the meta device (shapes only), once prepared
        self.num_params = 0
        self.classes: list[str] = []

    @property
    def section(self):
        return getattr(self.spec, self.workload)

    # ---- subclass parts
    def prepare_data(self) -> dict:
        raise NotImplementedError

    def build_config(self):
        raise NotImplementedError

    # ---- the Job
    def check_variant(self) -> None:
        self.config_and_model()

    def prepare(self) -> None:
        if self.data is None:
            self.data = self.prepare_data()
        cfg, model = self.config_and_model()
        self.cfg, self.meta_model = cfg, model
        self.num_params = sum(p.numel() for p in model.parameters())
        metainfo = cfg.train_dataloader.dataset.get("metainfo") or {}
        self.classes = list(metainfo.get("classes") or getattr(model, "dataset_meta", {}).get("classes", ()))
        log.info("%s: %.2fM parameters, %d train / %d val images", self.section.config, self.num_params / 1e6,
                 self.data["train"]["images"], self.data["val"]["images"])

    def config_and_model(self):
        """The final config (the YAML's model section applied) and its model on the meta device."""
        cfg = self.build_config()
        if self.spec.model is not None:
            backbone = cfg.model.backbone
            if backbone.get("type") not in OUR_BACKBONES:
                raise CvlabError(f"model.name={self.spec.model.name!r}: the backbone of {self.section.config} is "
                                 f"{backbone.get('type')!r}, not one of ours ({' / '.join(OUR_BACKBONES)})")
            backbone["arch"] = self.spec.model.name
            backbone["arch_overrides"] = dict(self.spec.model.overrides)
        try:
            model = build_on_meta(cfg.model, self.scope)
        except Exception as err:  # noqa: BLE001 - mm* raise KeyError, TypeError, ValueError, AssertionError
            raise CvlabError(f"{self.workload}: cannot build the model of {self.section.config}: "
                             f"{type(err).__name__}: {err}") from None
        return cfg, model

    def params(self) -> dict[str, Any]:
        p = SCOPES[self.scope]
        return {f"{p}.model_params": self.num_params, f"{p}.classes": ",".join(self.classes),
                "data.train_images": self.data["train"]["images"], "data.val_images": self.data["val"]["images"]}

    def text_artifacts(self) -> dict[str, str]:
        return {f"{self.scope}_config.py": self.cfg.pretty_text}

    def dataset_input(self) -> dict[str, Any]:
        root = str(self.section.data_root)
        profile = {f"{split}_images": info["images"] for split, info in self.data.items()}
        digest = hashlib.sha256(repr(sorted(profile.items())).encode()).hexdigest()[:16]
        return {"name": os.path.basename(root.rstrip("/")) or "data", "source": os.path.abspath(root),
                "digest": digest, "profile": profile}

    def worker(self):
        return train_worker

    def runner_settings(self, ctx: RunContext) -> dict[str, Any]:
        """The worker config fields of training and evaluation alike: the config, the registry scope and
        metric names, the work-dir name, threads, SyncBN and verbosity."""
        return dict(cfg=self.cfg.to_dict(), scope=self.scope, metric_names=self.metric_names, run_id=ctx.run_id,
                    threads=max(1, int(dict(self.spec.scaling.resources_per_worker).get("CPU", 1))),
                    sync_bn=getattr(self.section, "sync_bn", "auto"), verbosity=ctx.verbosity)

    def worker_config(self, ctx: RunContext):
        spec = self.spec
        return MMWorkerConfig(
            **self.runner_settings(ctx),
            epoch_logger=MlflowMetricLogger(ctx.tracking_uri, ctx.run_id, key=self.best_metric,
                                           skip=(self.step_metric,)),
            system_metrics=SystemMetricsRecorder(ctx.tracking_uri, ctx.run_id),
            log_every=spec.run.log_every,
            **self.kill_drill(ctx),
            score_metric=self.best_metric,
            storage_retry_limit_s=spec.run.storage_retry_limit_s,
        )

    def finalize(self, result, ctx: RunContext) -> dict[str, Any]:
        """Log the best and last checkpoints; subclasses add their pictures and tables."""
        best, best_metrics, last = best_and_last(result, self.best_metric, self.best_mode)
        # The last report's metrics, less the placeholder score of a validation that gave none.
        metrics = {k: v for k, v in (result.metrics or {}).items()
                   if not (k == self.best_metric and v == UNRANKED_SCORE)}
        summary = {"metrics": metrics, "checkpoint": last.path if last else None,
                   "best_checkpoint": best.path if best else None, "num_params": self.num_params,
                   f"best_{self.step_metric}": best_metrics.get(self.step_metric)}
        if last is None:
            log.warning("the run reported no checkpoint; nothing to log as artifacts")
            return summary
        if self.spec.tracking.log_model:
            for ckpt, where in ((best, BEST_CHECKPOINT_ARTIFACT), (last, LAST_CHECKPOINT_ARTIFACT)):
                with ckpt.as_directory() as folder:
                    ctx.client.log_artifacts(ctx.run_id, folder, where)
        return summary

    def summary_lines(self, summary: dict[str, Any]) -> list[str]:
        m = summary.get("metrics", {})
        shown = "  ".join(f"{k} {m[k]:.4g}" for k in self.reported_metrics[:3] if k in m)
        return [f"  final {self.step_metric:<9} {m.get(self.step_metric)}: {shown}"]


def eval_metric(name: str) -> str:
    """The name a validation metric is reported under by an evaluation (`val/mIoU` -> `eval/mIoU`)."""
    return name.replace("val/", "eval/", 1)


class OpenMMLabEvalJob(EvalJob):
    """`cvlab eval` of an mmdet / mmseg checkpoint. Holds the workload's job (`DetectionJob`, `SegmentationJob`):
    its data check and config, and its model on the meta device to check the weights against before any worker
    starts; then one validation on every worker's shard, the metric computed by mmengine's evaluator over all
    shards together (`workloads.mmlab.worker`). Detection reports bbox (and segm) mAP; segmentation mIoU, mAcc,
    aAcc and each class's IoU over the whole val split."""

    def __init__(self, job: OpenMMLabJob, source):
        super().__init__(job, source)
        self.best_metric = eval_metric(job.best_metric)
        self.reported_metrics = tuple(eval_metric(k) for k in job.reported_metrics)
        self.state_dict: dict = {}

    def prepare(self) -> None:
        self.job.prepare()
        if self.source.format != "mmengine":
            raise CvlabError(f"{self.source.given} is a {self.source.format} checkpoint; {self.workload} evaluates "
                             f"mmengine checkpoints (.pth, as written by {self.job.scope} or by `cvlab run`)")
        self.state_dict = self._read_weights()

    def _read_weights(self) -> dict:
        """The checkpoint's state dict, with its keys and shapes checked against the config's model."""
        try:
            payload = load_checkpoint_file(self.source.path)
        except Exception as err:  # noqa: BLE001 - pickle, zip and allow-list errors all mean "cannot read"
            raise CvlabError(f"{self.source.given}: cannot read {self.source.path}: {type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''}") from None
        weights = payload.get("state_dict", payload) if isinstance(payload, dict) else None
        if not isinstance(weights, dict) or not weights:
            raise CvlabError(f"{self.source.given}: {self.source.path} holds no state_dict")
        expected = {k: tuple(v.shape) for k, v in self.job.meta_model.state_dict().items()}
        missing = sorted(set(expected) - set(weights))
        unexpected = sorted(set(weights) - set(expected))
        wrong = sorted(k for k in set(expected) & set(weights) if tuple(weights[k].shape) != expected[k])
        if missing or unexpected or wrong:
            parts = [f"{what} {len(keys)} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                     for what, keys in (("missing", missing), ("unexpected", unexpected),
                                        ("wrong-shaped", wrong)) if keys]
            raise CvlabError(f"{self.source.given} does not fit the model of {self.job.section.config}: "
                             f"{'; '.join(parts)} keys")
        return weights

    def worker(self):
        return self.job.worker()

    def worker_config(self, ctx: RunContext):
        """The weights and what the validation needs; nothing of training (no MLflow logger, no drills)."""
        return MMWorkerConfig(**self.job.runner_settings(ctx), eval_state_dict=self.state_dict)

    def finalize(self, result, ctx: RunContext) -> dict[str, Any]:
        return {"metrics": self.log_eval_metrics(result, ctx)}

    def summary_lines(self, summary: dict[str, Any]) -> list[str]:
        m = summary["metrics"]
        shown = "  ".join(f"{k} {m[k]:.4g}" for k in self.reported_metrics if k in m)
        return [self.source_line(), f"  eval            {shown}"]
