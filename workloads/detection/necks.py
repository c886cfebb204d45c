"""FPN necks whose 3x3 output convolutions are involution ("involution neck") or C-volution.

As in the published involution detection code, only the per-level output convs (`fpn_convs` on the
backbone levels) change: each becomes a 7x7 involution (stride 1, group_channels 16, reduction 4) without
norm or activation. Lateral 1x1 convs and the extra stride-2 convs of RetinaNet stay convolutions.
"""
from __future__ import annotations

from mmdet.models.necks import FPN
from mmdet.registry import MODELS

from .ops_factory import make_op


@MODELS.register_module()
class InvolutionFPN(FPN):
    """`FPN` with involution output convs. Extra args: `op`, `op_kernel_size`, `op_group_channels`,
    `op_reduction_ratio`, `op_channel_groups` (C-volution only); the rest are mmdet `FPN`'s."""

    default_op = "involution"

    def __init__(self, *args, op: str | None = None, op_kernel_size: int = 7, op_group_channels: int = 16,
                 op_reduction_ratio: int = 4, op_channel_groups: int = 16, **kwargs):
        super().__init__(*args, **kwargs)
        self.op = op or self.default_op
        for i in range(self.backbone_end_level - self.start_level):
            self.fpn_convs[i] = make_op(self.op, self.out_channels, kernel_size=op_kernel_size,
                                        group_channels=op_group_channels, reduction_ratio=op_reduction_ratio,
                                        channel_groups=op_channel_groups)


@MODELS.register_module()
class CvolutionFPN(InvolutionFPN):
    """`FPN` with C-volution output convs (the CedNet counterpart of the involution neck)."""

    default_op = "cvolution"
