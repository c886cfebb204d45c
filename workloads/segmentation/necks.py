"""mmseg's `FPN` with involution / C-volution output convs (`workloads.mmlab.necks.OpFPNMixin`)."""
from __future__ import annotations

from mmseg.models.necks import FPN

from workloads.mmlab.necks import OpFPNMixin


class InvolutionFPN(OpFPNMixin, FPN):
    """`FPN` with 7x7 involution output convs (the published "involution neck"). Extra args: `op`,
    `op_kernel_size`, `op_group_channels`, `op_reduction_ratio`, `op_channel_groups`; the rest are mmseg
    `FPN`'s."""

    default_op = "involution"


class CvolutionFPN(OpFPNMixin, FPN):
    """`FPN` with C-volution output convs (the CedNet counterpart of the involution neck)."""

    default_op = "cvolution"
