"""COCO detection / instance segmentation with mmdet 3.x on RedNet / CedNet.

- `workloads.detection.plugin`: importing it registers the backbones (`RedNet`, `CedNet`), necks
  (`InvolutionFPN`, `CvolutionFPN`) and heads (`InvolutionRPNHead`, `InvolutionFCNMaskHead` and the
  C-volution twins) in mmdet's `MODELS` registry. mmdet configs load it through
  `custom_imports = dict(imports=['workloads.detection.plugin'], allow_failed_imports=False)`.
- `synthetic_coco.make_coco`: a tiny COCO-format dataset of shapes; `coco_check.check_coco_dataset`:
  annotation validation before any worker starts; `mmcfg.build_config`: the final config of a run.
- What detection shares with segmentation (backbones, the neck mixin, hooks, the Ray Train worker,
  `MMWorkerConfig`) lives in `workloads.mmlab`; the detection job (`orchestrator.jobs.detection`) makes the
  worker's config with this package's `SCOPE` and `METRIC_NAMES`.

This package itself imports nothing heavy, so the data helpers work without mmdet installed.
"""
from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
SCOPE = "mmdet"

# CocoMetric key -> reported name (Ray Train and MLflow; the job ranks checkpoints by its `best_metric`).
METRIC_NAMES = {
    "coco/bbox_mAP": "val/bbox_mAP",
    "coco/bbox_mAP_50": "val/bbox_mAP50",
    "coco/bbox_mAP_75": "val/bbox_mAP75",
    "coco/bbox_mAP_s": "val/bbox_mAP_s",
    "coco/bbox_mAP_m": "val/bbox_mAP_m",
    "coco/bbox_mAP_l": "val/bbox_mAP_l",
    "coco/segm_mAP": "val/segm_mAP",
    "coco/segm_mAP_50": "val/segm_mAP50",
    "coco/segm_mAP_75": "val/segm_mAP75",
}
