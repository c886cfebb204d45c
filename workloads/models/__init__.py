"""Model families: RedNet (involution), CedNet (C-volution) and the ResNet baseline, from one bottleneck code.

    build_model("rednet50", kernel_size=5)      # -> nn.Module with .arch_name / .arch_overrides
    validate_model_config("cednet26", group_channels=24)   # ValueError naming the layer, no weights built
    count_params(m), count_flops(m, (1, 3, 224, 224))      # parameters, multiply-accumulates
"""
from .checkpoint import load_checkpoint, load_published_rednet, save_checkpoint
from .complexity import count_flops, count_params
from .config import list_models
from .registry import build_model, validate_model_config
from .visualize import visualize_kernels
from . import timm_hook as _timm_hook

_timm_hook.install()  # registers the models with timm when timm is imported (rednet50, cednet50, ...)

__all__ = [
    "build_model",
    "count_flops",
    "count_params",
    "list_models",
    "load_checkpoint",
    "load_published_rednet",
    "save_checkpoint",
    "validate_model_config",
    "visualize_kernels",
]
