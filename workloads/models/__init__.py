"""Model families: RedNet (involution), CedNet (C-volution) and the ResNet baseline, from one bottleneck code.

    build_model("rednet50", kernel_size=5)      # -> nn.Module with .arch_name / .arch_overrides
    validate_model_config("cednet26", group_channels=24)   # ValueError naming the layer, no weights built
    count_params(m), count_flops(m, (1, 3, 224, 224))      # parameters, multiply-accumulates

Importing the package registers the models with timm (`timm_registry`), as timm's own model modules register
themselves on import: after `import workloads.models`, `timm.create_model("cednet50")` works.
"""
from .checkpoint import load_checkpoint, load_published_rednet, save_checkpoint
from .complexity import count_flops, count_params
from .config import list_models
from .registry import build_model, validate_model_config
from .visualize import visualize_kernels

try:
    import timm as _timm  # noqa: F401
except ImportError:  # a lent GPU machine has torch and numpy only (benchmarks/gpu_check.py); the models need no timm
    pass
else:
    from . import timm_registry  # noqa: F401  (registers rednet*, cednet*, resnet*_cvlab with timm)

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
