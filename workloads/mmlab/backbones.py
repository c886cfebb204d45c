"""RedNet / CedNet backbones for OpenMMLab models, wrapping `workloads.models` (no copy of the architecture).

    backbone=dict(type='CedNet', depth=50, out_indices=(0, 1, 2, 3), frozen_stages=1, norm_eval=True,
                  norm_cfg=dict(type='SyncBN', requires_grad=True),
                  init_cfg=dict(type='Pretrained', checkpoint='runs/.../cednet50.pt'))

The classes are plain mmengine `BaseModule`s; each workload's plugin registers them in its own `MODELS`
(mmdet's, mmseg's). `init_cfg` names an ImageNet checkpoint in our format (`workloads.models.save_checkpoint`)
or a published mmcls RedNet checkpoint (`format`: 'auto' (default) | 'cvlab' | 'mmcls'); classifier weights
are ignored.
"""
from __future__ import annotations

from pathlib import Path

from mmengine.logging import print_log
from mmengine.model import BaseModule
from torch.nn.modules.batchnorm import _BatchNorm

from workloads.models import build_model, load_published_rednet
from workloads.models.checkpoint import FORMAT

from .checkpoints import load_checkpoint_file
from .norm import NORM_TYPES, convert_batchnorm

DEPTHS = (26, 38, 50, 101, 152)
PRETRAINED_FORMATS = ("auto", "cvlab", "mmcls")


class _WrappedBackbone(BaseModule):
    family = ""  # "rednet" | "cednet"

    def __init__(self, depth: int = 50, out_indices=(0, 1, 2, 3), frozen_stages: int = -1,
                 norm_eval: bool = True, norm_cfg: dict | None = None, arch: str | None = None,
                 arch_overrides: dict | None = None, init_cfg=None):
        self.pretrained, self.pretrained_format = _parse_init_cfg(init_cfg)
        # BaseModule would hand a 'Pretrained' init_cfg to mmengine's loader; ours is loaded in init_weights.
        super().__init__(init_cfg=None)
        if arch is None:
            if depth not in DEPTHS:
                raise ValueError(f"depth={depth!r}: expected one of {DEPTHS}")
            arch = f"{self.family}{depth}"
        self.arch = arch
        self.out_indices = tuple(out_indices)
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.body = build_model(arch, out_indices=self.out_indices, frozen_stages=frozen_stages,
                                norm_eval=norm_eval, **dict(arch_overrides or {}))
        if norm_cfg is not None:
            self._apply_norm_cfg(dict(norm_cfg))

    def _apply_norm_cfg(self, norm_cfg: dict) -> None:
        """The wrapped network is built with BatchNorm2d; `norm_cfg` may ask for SyncBN and frozen affines."""
        kind = norm_cfg.pop("type", "BN")
        requires_grad = norm_cfg.pop("requires_grad", True)
        if kind not in NORM_TYPES or norm_cfg:
            raise ValueError(f"norm_cfg: expected dict(type=one of {NORM_TYPES}, requires_grad=bool), got "
                             f"type={kind!r} and extra keys {sorted(norm_cfg)}")
        self.body = convert_batchnorm(self.body, kind)
        if not requires_grad:
            for m in self.body.modules():
                if isinstance(m, _BatchNorm):
                    for p in m.parameters():
                        p.requires_grad_(False)

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
            self.load_pretrained(self.pretrained, self.pretrained_format)

    def load_pretrained(self, path: str, fmt: str = "auto") -> None:
        """Copy the feature weights of an ImageNet checkpoint (ours or a published mmcls one) into this
        backbone; every backbone tensor must come from the checkpoint."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"backbone checkpoint {path!r} does not exist")
        payload = load_checkpoint_file(path)
        fmt = _detect_format(payload, path) if fmt == "auto" else fmt
        if fmt == "mmcls":
            # Strict: names every missing / unexpected key; the classifier (head.*) is skipped.
            try:
                load_published_rednet(self.body, payload, strict=True)
            except ValueError as err:
                raise ValueError(f"checkpoint {path} (mmcls format) does not match backbone {self.arch}: "
                                 f"{err}") from None
            print_log(f"{self.arch}: loaded the published mmcls checkpoint {path}", logger="current")
            return
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ValueError(f"checkpoint {path} is not a cvlab model checkpoint (expected format {FORMAT!r}); "
                             "for a published RedNet checkpoint use format 'mmcls'")
        state = payload["state_dict"]
        own = self.body.state_dict()
        usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        missing = sorted(set(own) - set(usable))
        if missing:
            raise ValueError(f"checkpoint {path} ({payload.get('arch_name', '?')}) does not match backbone "
                             f"{self.arch}: {len(missing)} tensors missing or of another shape, "
                             f"e.g. {missing[:3]}")
        self.body.load_state_dict(usable, strict=True)
        skipped = sorted(set(state) - set(usable))
        print_log(f"{self.arch}: loaded {len(usable)} tensors from {path}"
                  + (f" (ignored {len(skipped)}: {skipped[:4]})" if skipped else ""), logger="current")


def _parse_init_cfg(init_cfg) -> tuple[str | None, str]:
    if init_cfg is None:
        return None, "auto"
    init_cfg = dict(init_cfg)
    fmt = init_cfg.get("format", "auto")
    if init_cfg.get("type") != "Pretrained" or not init_cfg.get("checkpoint") or fmt not in PRETRAINED_FORMATS:
        raise ValueError(f"init_cfg={init_cfg!r}: expected dict(type='Pretrained', checkpoint=PATH, "
                         f"format=one of {PRETRAINED_FORMATS}) naming an ImageNet checkpoint")
    return str(init_cfg["checkpoint"]), fmt


def _detect_format(payload, path) -> str:
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        return "cvlab"
    state = payload.get("state_dict", payload) if isinstance(payload, dict) else None
    if isinstance(state, dict) and any(str(k).startswith("backbone.") for k in state):
        return "mmcls"
    raise ValueError(f"checkpoint {path}: neither a cvlab model checkpoint nor an mmcls one "
                     "(no 'backbone.*' keys)")


class RedNet(_WrappedBackbone):
    """RedNet (involution ResNet) backbone: `depth` in 26/38/50/101/152, or `arch` for any registry name."""

    family = "rednet"


class CedNet(_WrappedBackbone):
    """CedNet (C-volution) backbone: `depth` in 26/38/50/101/152, or `arch` for any registry name."""

    family = "cednet"
