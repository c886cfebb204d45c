"""`workload: segmentation`: mmseg 1.x semantic segmentation on Cityscapes (the job; what it shares with
detection, evaluation included, is in `orchestrator.jobs.openmmlab`, the rest in the run lifecycle).

Iteration-based like mmseg's schedules: every `segmentation.val_interval` iterations the workers validate,
write a checkpoint and report `val/mIoU`, `val/mAcc`, `val/aAcc` (and per-class IoU) with `iter`; at the end
MLflow gets the per-class IoU table and prediction overlays (image | ground truth | prediction).
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import ray.train

from orchestrator.errors import CvlabError
from orchestrator.jobs.openmmlab import OpenMMLabJob, checked_data
from orchestrator.runs.job import RunContext
from workloads.segmentation import METRIC_NAMES, SCOPE, mmcfg
from workloads.segmentation.cityscapes import check_cityscapes_dataset
from workloads.segmentation.metrics import class_iou_table, format_class_iou_table
from workloads.segmentation.synthetic import make_cityscapes
from workloads.segmentation.visualize import load_segmentor, val_samples, write_overlays

log = logging.getLogger(__name__)
OVERLAYS = 4  # prediction pictures logged at the end of a run


def prepare_cityscapes(spec) -> dict:
    """Generate the synthetic set when asked and missing, then check images and labels (CvlabError naming the
    bad files)."""
    seg = spec.segmentation
    root = Path(seg.data_root)
    if not (root / "leftImg8bit").is_dir():
        if not seg.generate:
            raise CvlabError(f"segmentation.data_root {root} holds no leftImg8bit/ folder; point it at the "
                             "Cityscapes layout (leftImg8bit/{train,val}/<city>/*_leftImg8bit.png, gtFine/{train,val}/"
                             "<city>/*_gtFine_labelTrainIds.png) or set segmentation.generate: true for the "
                             "synthetic set")
        log.info("generating the synthetic Cityscapes set in %s ...", root)
        try:
            make_cityscapes(root, num_train=seg.num_train_generated, num_val=seg.num_val_generated,
                            size=tuple(seg.generated_size), seed=spec.experiment.seed)
        except ValueError as err:
            raise CvlabError(f"segmentation: cannot generate the synthetic set: {err}") from None
    return checked_data(check_cityscapes_dataset, root, "segmentation")


class SegmentationJob(OpenMMLabJob):
    workload = "segmentation"
    scope = SCOPE
    metric_names = METRIC_NAMES
    best_metric = "val/mIoU"
    step_metric = "iter"
    budget_path = "segmentation.max_iters"
    reported_metrics = ("val/mIoU", "val/mAcc", "val/aAcc")
    data_paths = ("segmentation.data_root", "segmentation.generate", "segmentation.num_train_generated",
                  "segmentation.num_val_generated", "segmentation.generated_size")

    def prepare_data(self) -> dict:
        return prepare_cityscapes(self.spec)

    def build_config(self):
        try:
            return mmcfg.build_config(self.section, work_dir="work_dirs/cvlab-seg",
                                      seed=self.spec.experiment.seed, log_every=self.spec.run.log_every,
                                      checkpoints_kept=self.spec.run.checkpoints_kept)
        except (ValueError, FileNotFoundError) as err:
            raise CvlabError(f"segmentation: {err}") from None

    def finalize(self, result, ctx: RunContext) -> dict[str, Any]:
        """Checkpoints, then the per-class IoU table of the last validation and a few prediction overlays of
        the best checkpoint."""
        summary = super().finalize(result, ctx)
        rows = class_iou_table(result.metrics or {})
        with tempfile.TemporaryDirectory(prefix="cvlab-seg-") as tmp:
            if rows:
                for fmt, name in (("markdown", "class_iou.md"), ("csv", "class_iou.csv")):
                    path = os.path.join(tmp, name)
                    with open(path, "w") as fh:
                        fh.write(format_class_iou_table(rows, fmt))
                    ctx.client.log_artifact(ctx.run_id, path)
            if summary.get("best_checkpoint"):
                for png in self._overlays(summary["best_checkpoint"], tmp):
                    ctx.client.log_artifact(ctx.run_id, str(png), "overlays")
        summary["class_iou"] = rows
        return summary

    def _overlays(self, checkpoint_dir: str, out_dir: str) -> list:
        """image | ground truth | prediction pictures of the first validation images (none if that fails)."""
        try:
            with ray.train.Checkpoint(checkpoint_dir).as_directory() as folder:
                pth = sorted(Path(folder).glob("*.pth"))
                model = load_segmentor(self.cfg, str(pth[-1]), device="cpu")
            return write_overlays(model, val_samples(self.section.data_root, OVERLAYS), Path(out_dir) / "overlays")
        except Exception as err:  # noqa: BLE001 - pictures must not fail a finished run
            log.warning("no prediction overlays: %s: %s", type(err).__name__, err)
            return []

