"""nn.Module wrappers: `Involution2d` (RedNet) and `Cvolution2d` (CedNet's C-volution)."""
from __future__ import annotations

import torch
from torch import nn

from .functional import BACKENDS, involution2d

# Published mmcls RedNet (`involution` with mmcv ConvModules) -> this module. Used by checkpoint converters:
# `{MMCLS_KEY_MAP.get(suffix, suffix): v}` for every key `<prefix>.<suffix>` of an involution layer.
MMCLS_KEY_MAP = {
    "conv1.conv.weight": "reduce.weight",
    "conv1.bn.weight": "bn.weight",
    "conv1.bn.bias": "bn.bias",
    "conv1.bn.running_mean": "bn.running_mean",
    "conv1.bn.running_var": "bn.running_var",
    "conv1.bn.num_batches_tracked": "bn.num_batches_tracked",
    "conv2.conv.weight": "span.weight",
    "conv2.conv.bias": "span.bias",
}


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {name}={value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {name}={value}")


class Involution2d(nn.Module):
    """Involution layer of RedNet: a kernel-generating branch, then `involution2d`.

    Kernel generation: (AvgPool2d(stride) if stride > 1) -> 1x1 conv C -> C/r (no bias) -> BatchNorm -> ReLU
    -> 1x1 conv C/r -> K*K*G (with bias), G = C / group_channels; reshaped to (B, G, K, K, Ho, Wo).

    Parameter layout matches the published mmcls RedNet exactly (same tensors, same shapes), so parameter
    counts agree and published checkpoints load through this key mapping (also in `MMCLS_KEY_MAP`):

        published mmcls key           this module
        conv1.conv.weight         ->  reduce.weight     (C/r, C, 1, 1), no bias: followed by BN
        conv1.bn.*                ->  bn.*              weight, bias, running_mean, running_var, num_batches_tracked
        conv2.conv.weight / .bias ->  span.weight / .bias  (K*K*G, C/r, 1, 1) / (K*K*G,)
        avgpool (stride > 1)      ->  pool              no parameters

    Attributes: channels, kernel_size, stride, dilation, groups, group_channels, reduction_ratio, and
    `backend` ('auto' | 'torch' | 'cupy', settable) passed to `involution2d`.
    """

    mmcls_key_map = MMCLS_KEY_MAP

    def __init__(self, channels: int, kernel_size: int = 7, stride: int = 1, dilation: int = 1,
                 group_channels: int = 16, reduction_ratio: int = 4):
        super().__init__()
        for name, value in (("channels", channels), ("kernel_size", kernel_size), ("stride", stride),
                            ("dilation", dilation), ("group_channels", group_channels),
                            ("reduction_ratio", reduction_ratio)):
            _check_positive_int(name, value)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (the output is centred on the input pixel), "
                             f"got kernel_size={kernel_size}")
        if channels % group_channels != 0:
            raise ValueError(f"channels={channels} must be divisible by group_channels={group_channels}")
        if channels // reduction_ratio < 1:
            raise ValueError(f"channels // reduction_ratio must be >= 1, got channels={channels}, "
                             f"reduction_ratio={reduction_ratio}")
        self.channels, self.kernel_size, self.stride, self.dilation = channels, kernel_size, stride, dilation
        self.group_channels, self.reduction_ratio = group_channels, reduction_ratio
        self.groups = channels // group_channels
        self.backend = "auto"
        hidden = channels // reduction_ratio
        # ceil_mode: the involution yields ceil(H / stride) rows, so odd sizes need the last partial window
        # (identical to the published floor pooling whenever H and W are multiples of the stride).
        self.pool = nn.AvgPool2d(stride, stride, ceil_mode=True) if stride > 1 else nn.Identity()
        self.reduce = nn.Conv2d(channels, hidden, 1, bias=False)
        self.bn = nn.BatchNorm2d(hidden)
        self.act = nn.ReLU(inplace=True)
        self.span = nn.Conv2d(hidden, kernel_size * kernel_size * self.groups, 1, bias=True)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"dilation={self.dilation}, groups={self.groups}")

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{type(self).__name__} expects a 4-D input (B, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.channels:
            raise ValueError(f"{type(self).__name__} was built for channels={self.channels}, got an input with "
                             f"{x.shape[1]} channels (shape {tuple(x.shape)})")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got backend={self.backend!r}")

    def generate_kernel(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, G, K, K, Ho, Wo) per-pixel kernels."""
        self._check_input(x)
        w = self.span(self.act(self.bn(self.reduce(self.pool(x)))))
        b, _, h, wd = w.shape
        return w.view(b, self.groups, self.kernel_size, self.kernel_size, h, wd)

    def _involve(self, x: torch.Tensor, kernel: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        # The kernel map has ceil(H / stride) rows (ceil-mode pooling), exactly the involution's output size.
        return involution2d(x, kernel, self.stride, None, self.dilation, backend=self.backend, gate=gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._involve(x, self.generate_kernel(x))


class Cvolution2d(Involution2d):
    """C-volution (CedNet): involution whose input is re-weighted per channel by a channel-interaction branch.

        gate   = sigmoid(GAP(channel_conv(x)))          channel_conv: 3x3, groups=channel_groups, padding 1,
                                                        no bias, C -> C
        kernel = generate_kernel(x)                     as in Involution2d, from the *ungated* input
        out    = involution2d(x * gate, kernel)        computed with the gate fused into the operator
                                                        (`involution2d(x, kernel, gate=gate)`): x * gate is
                                                        never materialised, in either backend

    Sigmoid decision: the published C-volution repositories reachable from here carry only READMEs (the
    model code itself was not retrievable), and the paper describes the branch as channel *attention*
    that re-weights channels. We therefore use a sigmoid gate in (0, 1), the squeeze-and-excitation form:
    without it the gate would be an unbounded, sign-flipping scale whose magnitude grows with C, which
    destabilises training at the published learning rate (0.8). Two deliberate differences from the
    published code as described in this project's issue: the 3x3 conv is padded by 1 (padding it by
    kernel_size // 2 = 3 makes its output (H+4) x (W+4) with rings of border-only values that dilute the
    pooled statistics), and the involution is always called through a proper autograd path (the published
    code calls its autograd Function without `.apply`).

    Extra parameters over Involution2d: `channel_conv.weight` (C, C / channel_groups, 3, 3).
    """

    def __init__(self, channels: int, kernel_size: int = 7, stride: int = 1, dilation: int = 1,
                 group_channels: int = 16, reduction_ratio: int = 4, channel_groups: int = 16):
        super().__init__(channels, kernel_size, stride, dilation, group_channels, reduction_ratio)
        _check_positive_int("channel_groups", channel_groups)
        if channels % channel_groups != 0:
            raise ValueError(f"channels={channels} must be divisible by channel_groups={channel_groups}")
        self.channel_groups = channel_groups
        self.channel_conv = nn.Conv2d(channels, channels, 3, padding=1, groups=channel_groups, bias=False)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", channel_groups={self.channel_groups}"

    def channel_gate(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, 1, 1) per-channel gate in (0, 1)."""
        return torch.sigmoid(self.channel_conv(x).mean((2, 3), keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.generate_kernel(x)
        return self._involve(x, kernel, self.channel_gate(x))
