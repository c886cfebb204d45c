"""Semantic segmentation on Cityscapes with mmseg 1.x on RedNet / CedNet (the third workload).

- `workloads.segmentation.plugin`: importing it registers the backbones (`RedNet`, `CedNet`), the necks
  (`InvolutionFPN`, `CvolutionFPN`) and `PerClassIoUMetric` in mmseg's registries; configs load it through
  `custom_imports = dict(imports=['workloads.segmentation.plugin'], allow_failed_imports=False)`.
- `synthetic.make_cityscapes`: a small learnable set in the Cityscapes layout; `cityscapes.
  check_cityscapes_dataset`: the data check before any worker starts.
- `mmcfg.build_config`: the final config of a run; `mmcfg.check_model`: the model built on the meta device.
- `metrics.class_iou_table`, `visualize.write_overlays`: what a run logs at its end.
What segmentation shares with detection lives in `workloads.mmlab` (backbones, hooks, the Ray Train worker).

This package itself imports nothing heavy: the data helpers work without mmseg installed.
"""
from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
SCOPE = "mmseg"
IGNORE_INDEX = 255

# The 19 Cityscapes evaluation classes in trainId order, and their colours (cityscapesScripts' labels).
CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
           "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
           "bicycle")
PALETTE = ((128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
           (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
           (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32))

# IoUMetric key -> reported name (Ray Train and MLflow; mmseg's percent scale).
METRIC_NAMES = {"mIoU": "val/mIoU", "mAcc": "val/mAcc", "aAcc": "val/aAcc"}
