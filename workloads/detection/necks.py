"""mmdet's `FPN` with involution / C-volution output convs (`workloads.mmlab.necks.OpFPNMixin`)."""
from __future__ import annotations

from mmdet.models.necks import FPN

from workloads.mmlab.necks import OpFPNMixin


class InvolutionFPN(OpFPNMixin, FPN):
    """`FPN` with 7x7 involution output convs. Extra args: `op`, `op_kernel_size`, `op_group_channels`,
    `op_reduction_ratio`, `op_channel_groups` (C-volution only); the rest are mmdet `FPN`'s."""

    default_op = "involution"


class CvolutionFPN(OpFPNMixin, FPN):
    """`FPN` with C-volution output convs (the CedNet counterpart of the involution neck)."""

    default_op = "cvolution"
