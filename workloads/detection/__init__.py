"""COCO detection / instance segmentation with mmdet 3.x on RedNet / CedNet.

- `workloads.detection.plugin`: importing it registers the backbones (`RedNet`, `CedNet`), necks
  (`InvolutionFPN`, `CvolutionFPN`) and heads (`InvolutionRPNHead`, `InvolutionFCNMaskHead` and the
  C-volution twins) in mmdet's `MODELS` registry. mmdet configs load it through
  `custom_imports = dict(imports=['workloads.detection.plugin'], allow_failed_imports=False)`.
- `synthetic_coco.make_coco`: a tiny COCO-format dataset of shapes; `coco_check.check_coco_dataset`:
  annotation validation before any worker starts; `runner`: the Ray Train worker running mmengine.

This package itself imports nothing heavy, so the data helpers work without mmdet installed.
"""
from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
