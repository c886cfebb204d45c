"""Register every mmseg component of this workload in mmseg's registries (import for the side effect).

Needs mmseg only (not mmdet): the backbones are plain mmengine modules, the necks subclass mmseg's FPN.
"""
from __future__ import annotations

from mmseg.registry import METRICS, MODELS

from workloads.mmlab import hooks, norm  # noqa: F401  (our hooks and DDP wrapper, in mmengine's root registries)
from workloads.mmlab.backbones import CedNet, RedNet
from workloads.mmlab.registration import register

from .metrics import PerClassIoUMetric
from .necks import CvolutionFPN, InvolutionFPN

register(MODELS, RedNet, CedNet, InvolutionFPN, CvolutionFPN)
register(METRICS, PerClassIoUMetric)

__all__ = ["CedNet", "CvolutionFPN", "InvolutionFPN", "PerClassIoUMetric", "RedNet"]
