"""BatchNorm policy: synchronised BN on GPU, a BN that works on CPU workers under gloo.

torch's `SyncBatchNorm` refuses CPU tensors, and mmengine reverts SyncBN to BN only when the run is not
distributed, so a config with SyncBN (every mmseg base) crashes on CPU workers in Ray's gloo group.

- `sync_bn` mode per run: 'auto' = SyncBN on GPU, plain per-worker BN on CPU; 'on' = synchronised
  everywhere (`CPUSyncBatchNorm` on CPU); 'off' = plain BN everywhere. `norm_for(mode, device, distributed)`
  turns it into one of `CONVERT_TYPES`.
- The worker applies it to the built model, every BN layer included (our backbones and operators build
  plain `BatchNorm2d`; mmseg heads build from `norm_cfg`), through `NormDistributedDataParallel`, the
  DDP wrapper mmengine builds from `model_wrapper_cfg` before any optimizer exists.
- `set_norm_type(model_cfg, type)` rewrites every BN `norm_cfg` of a config (mmseg 1.x: a child config's
  top-level `norm_cfg` does not reach the heads, each head keeps its own); `cpu_config(cfg)` = plain BN.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from mmengine.model import MMDistributedDataParallel
from mmengine.registry import MODEL_WRAPPERS
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .configs import rewrite_key
from .registration import register
from .worker_config import SYNC_BN_MODES

NORM_TYPES = ("BN", "SyncBN", "CPUSyncBN")  # what `convert_batchnorm` and backbone `norm_cfg` accept
_CONFIG_BN_TYPES = ("BN", "BN2d", "SyncBN", "MMSyncBN", "CPUSyncBN")  # BN-like `norm_cfg` types in configs


class _AllReduceSum(torch.autograd.Function):
    """Sum over the default process group; the gradient of a sum is the sum of the ranks' gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class CPUSyncBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics (per-channel sums, sums of squares and the count) are summed
    over the default process group, gradients included (gloo on CPU works). In eval mode, or without a
    process group of more than one rank, it is a plain BatchNorm. Every rank must run the same forward
    passes (as under DDP)."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"CPUSyncBatchNorm expects (N, C, ...) input, got shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        xf = x.float()
        count = xf.new_full((1,), x.numel() / c)
        stats = _AllReduceSum.apply(torch.cat([xf.sum(dims), (xf * xf).sum(dims), count]))
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0.0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean, alpha=m)
                self.running_var.mul_(1 - m).add_(var * n / (n - 1).clamp_min(1.0), alpha=m)  # unbiased
        shape = (1, c) + (1,) * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


_TARGETS = {"SyncBN": nn.SyncBatchNorm, "CPUSyncBN": CPUSyncBatchNorm}


def convert_batchnorm(module: nn.Module, kind: str) -> nn.Module:
    """Replace every BatchNorm layer of `module` (in place; the root is returned) by `kind` ('BN' gives
    `BatchNorm2d` for synchronised layers and keeps plain ones), sharing parameters and buffers."""
    if kind not in NORM_TYPES:
        raise ValueError(f"norm type {kind!r}: expected one of {NORM_TYPES}")

    def convert(m: nn.Module) -> nn.Module:
        if not isinstance(m, _BatchNorm):
            return m
        synced = isinstance(m, (nn.SyncBatchNorm, CPUSyncBatchNorm))
        if kind == "BN":
            if not synced:
                return m
            target = nn.BatchNorm2d  # all norms of these models are 2-D
        else:
            target = _TARGETS[kind]
            if type(m) is target:
                return m
        new = target(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
        if m.affine:
            new.weight, new.bias = m.weight, m.bias
        if m.track_running_stats:
            new.running_mean, new.running_var = m.running_mean, m.running_var
            new.num_batches_tracked = m.num_batches_tracked
        new.train(m.training)
        return new

    root = convert(module)
    for parent in root.modules():
        for name, child in list(parent.named_children()):
            new = convert(child)
            if new is not child:
                setattr(parent, name, new)
    return root


def norm_for(mode: str, device_type: str, distributed: bool) -> str:
    """The BN type a worker uses: one of NORM_TYPES."""
    if mode not in SYNC_BN_MODES:
        raise ValueError(f"sync_bn={mode!r}: expected one of {SYNC_BN_MODES}")
    if not distributed or mode == "off":
        return "BN"
    if device_type == "cuda":
        return "SyncBN"
    return "CPUSyncBN" if mode == "on" else "BN"


def set_norm_type(model_cfg, norm_type: str) -> int:
    """Set the type of every BN-like `norm_cfg` in a model config (backbone, neck, every head), in place.
    Other norms (GN, LN) stay. Returns how many were set."""
    if norm_type not in ("BN", "SyncBN"):
        raise ValueError(f"norm type {norm_type!r}: a config takes 'BN' or 'SyncBN'")
    def rewrite(parent, key) -> bool:
        value = parent[key]
        if isinstance(value, dict) and value.get("type") in _CONFIG_BN_TYPES:
            value["type"] = norm_type
            return True
        return False

    return rewrite_key(model_cfg, "norm_cfg", rewrite)


def cpu_config(cfg):
    """The config with plain BN everywhere (in place; returned): what CPU workers need when `sync_bn` is
    not applied at run time by the worker (e.g. a config run with mmengine's own tools)."""
    set_norm_type(cfg["model"], "BN")
    return cfg


class NormDistributedDataParallel(MMDistributedDataParallel):
    """`MMDistributedDataParallel` that first converts every BN layer of the model to `norm` (NORM_TYPES)."""

    def __init__(self, module: nn.Module, norm: str = "BN", **kwargs):
        super().__init__(module=convert_batchnorm(module, norm), **kwargs)


register(MODEL_WRAPPERS, NormDistributedDataParallel)  # in mmengine's root registry: found from every scope
