"""Register every mmdet component of this package (import for the side effect)."""
from __future__ import annotations

from . import backbones, heads, hooks, necks  # noqa: F401
from .backbones import CedNet, RedNet
from .heads import CvolutionFCNMaskHead, CvolutionRPNHead, InvolutionFCNMaskHead, InvolutionRPNHead
from .necks import CvolutionFPN, InvolutionFPN

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
