"""The involution / C-volution neck, written once for any OpenMMLab `FPN` (mmdet's and mmseg's share the
attributes used here: `fpn_convs`, `start_level`, `backbone_end_level`, `out_channels`).

As in the published involution code, only the per-level output convs (`fpn_convs` on the backbone levels)
change: each becomes a 7x7 involution (stride 1, group_channels 16, reduction 4) without norm or
activation. Lateral 1x1 convs and extra stride-2 convs (RetinaNet) stay convolutions. A workload declares
`class InvolutionFPN(OpFPNMixin, <its FPN>)` and registers it in its own registry.
"""
from __future__ import annotations

from .ops_factory import make_op


class OpFPNMixin:
    """Extra args: `op`, `op_kernel_size`, `op_group_channels`, `op_reduction_ratio`, `op_channel_groups`
    (C-volution only); the rest go to the FPN."""

    default_op = "involution"

    def __init__(self, *args, op: str | None = None, op_kernel_size: int = 7, op_group_channels: int = 16,
                 op_reduction_ratio: int = 4, op_channel_groups: int = 16, **kwargs):
        super().__init__(*args, **kwargs)
        self.op = op or self.default_op
        for i in range(self.backbone_end_level - self.start_level):
            self.fpn_convs[i] = make_op(self.op, self.out_channels, kernel_size=op_kernel_size,
                                        group_channels=op_group_channels, reduction_ratio=op_reduction_ratio,
                                        channel_groups=op_channel_groups)
