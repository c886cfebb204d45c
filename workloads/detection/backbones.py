"""RedNet / CedNet backbones for mmdet, wrapping `workloads.models` (no copy of the architecture here).

    backbone=dict(type='CedNet', depth=50, out_indices=(0, 1, 2, 3), frozen_stages=1, norm_eval=True,
                  init_cfg=dict(type='Pretrained', checkpoint='runs/.../cednet50.pt'))

`init_cfg` names one of our ImageNet checkpoints (`workloads.models.save_checkpoint` format, read with
weights_only=True by `workloads.models.load_checkpoint`); the classifier weights in it are ignored.
"""
from __future__ import annotations

from pathlib import Path

from mmdet.registry import MODELS
from mmengine.logging import print_log
from mmengine.model import BaseModule
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

DEPTHS = (26, 38, 50, 101, 152)


class _WrappedBackbone(BaseModule):
    family = ""  # "rednet" | "cednet"

    def __init__(self, depth: int = 50, out_indices=(0, 1, 2, 3), frozen_stages: int = -1,
                 norm_eval: bool = True, arch: str | None = None, arch_overrides: dict | None = None,
                 init_cfg=None):
        if init_cfg is not None:
            init_cfg = dict(init_cfg)
            if init_cfg.get("type") != "Pretrained" or not init_cfg.get("checkpoint"):
                raise ValueError(f"init_cfg={init_cfg!r}: expected dict(type='Pretrained', checkpoint=PATH) "
                                 "naming a workloads.models checkpoint")
        # BaseModule would hand a 'Pretrained' init_cfg to mmengine's loader; ours is loaded in init_weights.
        super().__init__(init_cfg=None)
        self.pretrained = init_cfg["checkpoint"] if init_cfg else None
        if arch is None:
            if depth not in DEPTHS:
                raise ValueError(f"depth={depth!r}: expected one of {DEPTHS}")
            arch = f"{self.family}{depth}"
        self.arch = arch
        self.out_indices = tuple(out_indices)
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval

        from workloads.models import build_model

        self.body = build_model(arch, out_indices=self.out_indices, frozen_stages=frozen_stages,
                                norm_eval=norm_eval, **dict(arch_overrides or {}))

    def forward(self, x):
        return tuple(self.body(x))

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.norm_eval:  # keep BN statistics frozen (also done by the wrapped model)
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self

    def init_weights(self):
        super().init_weights()
        if self.pretrained:
            self.load_pretrained(self.pretrained)

    def load_pretrained(self, path: str) -> None:
        """Copy the feature weights of one of our ImageNet checkpoints into this backbone."""
        from workloads.models import load_checkpoint

        if not Path(path).is_file():
            raise FileNotFoundError(f"backbone checkpoint {path!r} does not exist")
        src, _extra = load_checkpoint(path, map_location="cpu")
        state = src.state_dict()
        own = self.body.state_dict()
        usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        missing = sorted(set(own) - set(usable))
        if missing:
            raise ValueError(f"checkpoint {path} ({getattr(src, 'arch_name', '?')}) does not match backbone "
                             f"{self.arch}: {len(missing)} tensors missing or of another shape, "
                             f"e.g. {missing[:3]}")
        self.body.load_state_dict(usable, strict=True)
        skipped = sorted(set(state) - set(usable))
        print_log(f"{self.arch}: loaded {len(usable)} tensors from {path}"
                  + (f" (ignored {len(skipped)}: {skipped[:4]})" if skipped else ""), logger="current")


@MODELS.register_module()
class RedNet(_WrappedBackbone):
    """RedNet (involution ResNet) backbone: `depth` in 26/38/50/101/152, or `arch` for any registry name."""

    family = "rednet"


@MODELS.register_module()
class CedNet(_WrappedBackbone):
    """CedNet (C-volution) backbone: `depth` in 26/38/50/101/152, or `arch` for any registry name."""

    family = "cednet"


def feature_channels(backbone: nn.Module, size: int = 64) -> list[int]:
    """Channels of each returned feature map (measured with one tiny forward)."""
    import torch

    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        feats = backbone(torch.zeros(1, 3, size, size))
    backbone.train(was_training)
    return [f.shape[1] for f in feats]
