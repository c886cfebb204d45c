"""One ResNet-style bottleneck network for three operator kinds: RedNet, CedNet and the ResNet baseline.

The module layout follows the published RedNet mmcls code so its checkpoints map onto ours by name:
`stem.{0,1,2,4}` (conv-bn-relu, operator, bn, relu, conv-bn-relu), `maxpool`, `layer{1..4}.{i}` bottlenecks
with `conv1/bn1`, `conv2` (the spatial operator, stride on it), `bn2`, `conv3/bn3`, `downsample.{0,1}`; then
`fc`. The ResNet baseline keeps torchvision's 7x7 stem (`stem.0` = conv-bn-relu) and plain k x k convs.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from workloads.ops import Cvolution2d, Involution2d

from .config import EXPANSION, FEATURE_STRIDES, STAGE_BLOCKS, STAGE_STRIDES, STEM_CHANNELS, WIDTHS, ArchConfig


class ConvBNAct(nn.Module):
    """Conv (no bias) -> BN -> optional ReLU; children named like mmcv's ConvModule (`conv`, `bn`)."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int = 1, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU(inplace=True) if act else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample while training."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


def make_operator(cfg: ArchConfig, channels: int, kernel_size: int, stride: int) -> nn.Module:
    """The spatial operator of one layer: involution, C-volution or a plain k x k convolution."""
    if cfg.family == "resnet":
        return nn.Conv2d(channels, channels, kernel_size, stride, kernel_size // 2, bias=False)
    kw: dict[str, Any] = {"kernel_size": kernel_size, "stride": stride, "group_channels": cfg.group_channels,
                          "reduction_ratio": cfg.reduction_ratio}
    if cfg.family == "cednet":
        return Cvolution2d(channels, channel_groups=cfg.channel_groups, **kw)
    return Involution2d(channels, **kw)


class Bottleneck(nn.Module):
    """1x1 reduce -> spatial operator (carries the stride, pytorch style) -> 1x1 expand, plus shortcut."""

    def __init__(self, cfg: ArchConfig, in_channels: int, width: int, stride: int, drop_path: float):
        super().__init__()
        out_channels = width * EXPANSION
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = make_operator(cfg, width, cfg.kernel_size, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(self.drop_path(out) + identity)


class BottleneckNet(nn.Module):
    """RedNet / CedNet / ResNet-style network. Build it through `workloads.models.build_model`.

    Output: logits `(B, num_classes)`; pooled features `(B, 2048)` when `num_classes=0`; a tuple of stage
    feature maps (channels `out_channels`, strides `out_strides`) when `out_indices` is set (detection
    backbones; no classifier is built then and `num_classes` is ignored).
    """

    def __init__(self, cfg: ArchConfig):
        super().__init__()
        self.cfg = cfg
        self.family, self.depth = cfg.family, cfg.depth
        self.out_indices = cfg.out_indices
        self.frozen_stages = cfg.frozen_stages
        self.norm_eval = cfg.norm_eval
        half = STEM_CHANNELS // 2
        if cfg.family == "resnet":
            self.stem = nn.Sequential(ConvBNAct(cfg.in_channels, STEM_CHANNELS, cfg.stem_kernel_size, 2))
        else:
            self.stem = nn.Sequential(
                ConvBNAct(cfg.in_channels, half, 3, 2),
                make_operator(cfg, half, cfg.stem_kernel_size, 1),
                nn.BatchNorm2d(half),
                nn.ReLU(inplace=True),
                ConvBNAct(half, STEM_CHANNELS, 3, 1),
            )
        self.maxpool = nn.MaxPool2d(3, 2, 1)

        blocks = STAGE_BLOCKS[cfg.depth]
        total, idx = sum(blocks), 0
        in_ch = STEM_CHANNELS
        for s, (n, width) in enumerate(zip(blocks, WIDTHS)):
            layer = []
            for b in range(n):
                # Drop-path rate grows linearly with block depth, 0 for the first block.
                dp = cfg.drop_path_rate * idx / max(total - 1, 1)
                layer.append(Bottleneck(cfg, in_ch, width, STAGE_STRIDES[s] if b == 0 else 1, dp))
                in_ch, idx = width * EXPANSION, idx + 1
            self.add_module(f"layer{s + 1}", nn.Sequential(*layer))
        self.num_features = in_ch
        self.stage_channels = tuple(w * EXPANSION for w in WIDTHS)

        if self.out_indices is None:
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(in_ch, cfg.num_classes) if cfg.num_classes > 0 else None
            self.out_channels, self.out_strides = (), ()
        else:
            self.avgpool, self.fc = None, None
            self.out_channels = tuple(self.stage_channels[i] for i in self.out_indices)
            self.out_strides = tuple(FEATURE_STRIDES[i] for i in self.out_indices)

        self.init_weights()
        self._freeze_stages()

    # -- initialisation and freezing -----------------------------------------------------------------
    def init_weights(self) -> None:
        """As published: Kaiming (fan_out) convs, BN 1/0, fc N(0, 0.01); zero bn3 if zero_init_residual."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)
        if self.cfg.zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)

    def frozen_modules(self) -> list[nn.Module]:
        """The modules `frozen_stages` freezes: 0 = stem, i = stem and stages 1..i."""
        if self.frozen_stages < 0:
            return []
        return [self.stem] + [getattr(self, f"layer{i}") for i in range(1, self.frozen_stages + 1)]

    def _freeze_stages(self) -> None:
        for m in self.frozen_modules():
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    # -- forward ---------------------------------------------------------------------------------------
    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.stem(x))
        feats = []
        for s in range(4):
            x = getattr(self, f"layer{s + 1}")(x)
            feats.append(x)
        return feats

    def forward(self, x: torch.Tensor):
        feats = self.forward_stages(x)
        if self.out_indices is not None:
            return tuple(feats[i] for i in self.out_indices)
        x = torch.flatten(self.avgpool(feats[-1]), 1)
        return x if self.fc is None else self.fc(x)

    def operator_names(self) -> list[str]:
        """Module paths of the involution / C-volution layers (empty for the ResNet baseline)."""
        return [n for n, m in self.named_modules() if isinstance(m, (Involution2d, Cvolution2d))]
