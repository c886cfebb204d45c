"""Register every mmdet component of this workload in mmdet's registries (import for the side effect)."""
from __future__ import annotations

from mmdet.registry import MODELS

from workloads.mmlab import hooks, norm  # noqa: F401  (our hooks and DDP wrapper, in mmengine's root registries)
from workloads.mmlab.backbones import CedNet, RedNet
from workloads.mmlab.registration import register

from .heads import CvolutionFCNMaskHead, CvolutionRPNHead, InvolutionFCNMaskHead, InvolutionRPNHead
from .necks import CvolutionFPN, InvolutionFPN

register(MODELS, RedNet, CedNet, InvolutionFPN, CvolutionFPN, InvolutionRPNHead, CvolutionRPNHead,
         InvolutionFCNMaskHead, CvolutionFCNMaskHead)

__all__ = [
           "CedNet",
           "CvolutionFCNMaskHead",
           "CvolutionFPN",
           "CvolutionRPNHead",
           "InvolutionFCNMaskHead",
           "InvolutionFPN",
           "InvolutionRPNHead",
           "RedNet",
]
