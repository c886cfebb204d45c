"""Build the spatial operator that replaces a 3x3 convolution in necks and heads."""
from __future__ import annotations

from torch import nn

from workloads.ops import Cvolution2d, Involution2d

OPS = ("involution", "cvolution")


def make_op(op: str, channels: int, kernel_size: int = 7, group_channels: int = 16,
            reduction_ratio: int = 4, channel_groups: int = 16) -> nn.Module:
    """An `Involution2d` or `Cvolution2d` with stride 1 (channels in == channels out)."""
    if op == "involution":
        return Involution2d(channels, kernel_size=kernel_size, group_channels=group_channels,
                            reduction_ratio=reduction_ratio)
    if op == "cvolution":
        return Cvolution2d(channels, kernel_size=kernel_size, group_channels=group_channels,
                           reduction_ratio=reduction_ratio, channel_groups=channel_groups)
    raise ValueError(f"op={op!r}: expected one of {OPS}")
