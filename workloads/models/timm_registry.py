"""RedNet, CedNet and the ResNet baseline as timm models, registered through timm's own registry.

    import timm, workloads.models
    timm.create_model("cednet50", num_classes=10)
    timm.list_models("cednet*")                      # ['cednet26', 'cednet38', 'cednet50', ...]
    timm.create_model("rednet50", features_only=True, out_indices=(1, 2, 3))   # stage maps, strides 8/16/32
    timm.create_model("resnet50_cvlab")              # our ResNet baseline (timm's own resnet50 is untouched)

Names: `rednet{26,38,50,101,152}` and `cednet{...}` as in `list_models()`; the ResNet baseline is registered as
`resnet{depth}_cvlab` (see `timm_model_name`) because timm already has its own `resnet26/50/101/152`.

Arguments: timm's `in_chans` and `num_classes`, plus every `build_model` override (`kernel_size`,
`drop_path_rate`, `group_channels`, ...; `in_channels` is accepted as an alias of `in_chans`). The module is
the same network as `build_model(name, **overrides)` (same parameters and state-dict keys) with timm's model
interface added, and it carries `arch_name` / `arch_overrides`, so `save_checkpoint` works on it.

Features: `feature_info` lists the four stages (index i: `layer{i+1}`, 256/512/1024/2048 channels, strides
4/8/16/32), so `out_indices` means the same as `build_model`'s `out_indices`. `features_only=True` goes
through timm's `FeatureGetterNet` (`forward_intermediates` + `prune_intermediate_layers`), which keeps the
whole network as a child: `frozen_stages` and `norm_eval` keep working (the state-dict keys get a `model.`
prefix).

`pretrained_cfg` carries the input size, crop, interpolation and mean/std of the paper recipe and the published
reference numbers (`notes`; also `PUBLISHED`). No weights are hosted: `pretrained=True` needs
`pretrained_cfg_overlay=dict(file=<a cvlab model checkpoint>)` (published mmcls RedNet checkpoints load with
`load_published_rednet` instead).
"""
from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn

from .backbone import BottleneckNet
from .config import FEATURE_STRIDES, STAGE_BLOCKS, list_models, parse_name, resolve_config

__all__ = ["PUBLISHED", "TimmBottleneckNet", "timm_model_name"]


class Reference(NamedTuple):
    """Published numbers at 1000 classes, 224x224 (None: not published)."""

    params_m: float | None
    gflops: float | None
    top1: float | None
    source: str


_INVOLUTION = "involution paper / official repository (d-li14/involution)"
# The reference table of the project (shared/README.md); ResNet-50 from torchvision's IMAGENET1K_V1 weights.
PUBLISHED: dict[str, Reference] = {
    "rednet26": Reference(9.23, 1.73, 75.96, _INVOLUTION),
    "rednet38": Reference(12.39, 2.22, 77.48, _INVOLUTION),
    "rednet50": Reference(15.54, 2.71, 78.35, _INVOLUTION),
    "rednet101": Reference(25.65, 4.74, 78.92, _INVOLUTION),
    "rednet152": Reference(33.99, 6.79, 79.12, _INVOLUTION),
    "cednet38": Reference(12.40, 2.2, 78.0, "C-volution paper (params as reported; inconsistent with CedNet-50)"),
    "cednet50": Reference(16.3, 2.9, 78.83, "C-volution paper"),
    "resnet50": Reference(25.56, 4.1, 76.13, "torchvision ResNet50_Weights.IMAGENET1K_V1"),
}

_PAPERS = {
    "rednet": dict(paper_name="Involution: Inverting the Inherence of Convolution for Visual Recognition",
                   paper_ids="arXiv:2103.06255", origin_url="https://github.com/d-li14/involution"),
    "cednet": {},
    "resnet": dict(paper_name="Deep Residual Learning for Image Recognition", paper_ids="arXiv:1512.03385"),
}
_DESCRIPTIONS = {
    "rednet": "RedNet: ResNet-style bottlenecks with 7x7 involution (cvolution-lab)",
    "cednet": "CedNet: ResNet-style bottlenecks with 7x7 C-volution (cvolution-lab)",
    "resnet": "ResNet baseline of cvolution-lab (torchvision layout, 7x7 stem, 3x3 bottleneck convs)",
}


def timm_model_name(name: str) -> str:
    """The timm name of a `list_models()` name: itself, except `resnet<d>` -> `resnet<d>_cvlab`."""
    family, depth = parse_name(name)
    return f"resnet{depth}_cvlab" if family == "resnet" else f"{family}{depth}"


class TimmBottleneckNet(BottleneckNet):
    """`BottleneckNet` with timm's model interface: feature_info, forward_intermediates, classifier access."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.in_chans = cfg.in_channels
        self.num_classes = cfg.num_classes if self.fc is not None else 0
        self.feature_info = [
            dict(num_chs=ch, reduction=stride, module=f"layer{i + 1}")
            for i, (ch, stride) in enumerate(zip(self.stage_channels, FEATURE_STRIDES))
        ]

    def get_classifier(self) -> nn.Module:
        return self.fc if self.fc is not None else nn.Identity()

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new classifier (num_classes=0: pooled features); only average pooling exists."""
        if global_pool not in (None, "avg"):
            raise ValueError(f"global_pool={global_pool!r}: these models only have average pooling ('avg')")
        if self.avgpool is None:
            raise ValueError("this model was built with out_indices (a feature backbone): it has no head")
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else None
        if self.fc is not None:
            nn.init.normal_(self.fc.weight, 0.0, 0.01)
            nn.init.zeros_(self.fc.bias)
        self.num_classes = num_classes
        self.arch_overrides["num_classes"] = num_classes  # save_checkpoint / load_checkpoint rebuild it

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage map (B, 2048, H/32, W/32)."""
        return self.forward_stages(x)[-1]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits or self.fc is None else self.fc(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | tuple[int, ...] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """Stage maps at `indices` (timm semantics: None = all four, int n = last n, negatives count back).

        Returns the list of maps when `intermediates_only`, else (last stage map, list). `norm` has no effect
        (there is no final norm layer).
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.feature_info), indices)
        last = max_index if stop_early or intermediates_only else len(self.feature_info) - 1
        x = self.maxpool(self.stem(x))
        intermediates = []
        for i in range(last + 1):
            x = getattr(self, f"layer{i + 1}")(x)
            if i in take:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(self, indices=1, prune_norm: bool = False, prune_head: bool = True) -> list[int]:
        """Drop the stages after the last one in `indices` (and the classifier); returns the indices."""
        take, max_index = feature_take_indices(len(self.feature_info), indices)
        for i in range(max_index + 1, len(self.feature_info)):
            setattr(self, f"layer{i + 1}", nn.Identity())
        if prune_head:
            self.fc, self.num_classes = None, 0
        return take


def _build(name: str, in_chans: int = 3, **overrides: Any) -> TimmBottleneckNet:
    """What `build_model_with_cfg` instantiates: `build_model(name, **overrides)`'s network, timm's interface."""
    overrides["in_channels"] = in_chans
    model = TimmBottleneckNet(resolve_config(name, overrides))
    model.arch_name, model.arch_overrides = model.cfg.name, dict(overrides)
    return model


def _create(name: str, pretrained: bool = False, **kwargs: Any) -> TimmBottleneckNet:
    if "in_channels" in kwargs:  # our override name for timm's in_chans
        in_channels = kwargs.pop("in_channels")
        if kwargs.setdefault("in_chans", in_channels) != in_channels:
            raise ValueError(f"in_chans={kwargs['in_chans']} and in_channels={in_channels} disagree")
    return build_model_with_cfg(
        partial(_build, name),
        timm_model_name(name),
        pretrained,
        feature_cfg=dict(out_indices=tuple(range(len(FEATURE_STRIDES))), feature_cls="getter"),
        **kwargs,
    )


def _notes(name: str) -> tuple[str, ...]:
    notes = []
    ref = PUBLISHED.get(name)
    if ref is not None:
        parts = [f"{label} {value}" for label, value in
                 (("params (M)", ref.params_m), ("GFLOPs", ref.gflops), ("ImageNet-1k top-1 (%)", ref.top1))
                 if value is not None]
        notes.append(f"published at 224x224: {', '.join(parts)} ({ref.source})")
    notes.append("no hosted weights: pretrained=True needs pretrained_cfg_overlay=dict(file=<cvlab checkpoint>)")
    return tuple(notes)


def _pretrained_cfg(name: str) -> dict[str, Any]:
    family, _ = parse_name(name)
    return dict(
        num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875, interpolation="bilinear",
        mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, first_conv="stem.0.conv", classifier="fc",
        description=_DESCRIPTIONS[family], notes=_notes(name), **_PAPERS[family],
    )


# `register_model` reads the pretrained configs from this module's `default_cfgs`, by timm name.
default_cfgs = generate_default_cfgs({timm_model_name(n): _pretrained_cfg(n) for n in list_models()})


def _entrypoint(name: str):
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> TimmBottleneckNet:
        return _create(name, pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = timm_model_name(name)
    entrypoint.__module__ = __name__
    family, depth = parse_name(name)
    entrypoint.__doc__ = f"{name}: {_DESCRIPTIONS[family]}; stage blocks {STAGE_BLOCKS[depth]}."
    return entrypoint


for _name in list_models():
    globals()[timm_model_name(_name)] = register_model(_entrypoint(_name))
