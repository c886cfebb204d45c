"""Involution and C-volution operators: CUDA kernels through CuPy, and a pure-PyTorch path.

`involution2d` (functional, custom op `cvlab::involution2d`, optional fused C-volution `gate`), `Involution2d`
(RedNet) and `Cvolution2d` (CedNet). Backends: 'torch' (any device), 'cupy' (CUDA, NVRTC-compiled kernels from
involution.cu), 'auto'. `workloads.ops.testing`: float64 reference and the dtype-rounding tolerance.
"""
from .functional import BACKENDS, SUPPORTED_DTYPES, decomposed, involution2d, resolve_backend
from .modules import MMCLS_KEY_MAP, Cvolution2d, Involution2d

__all__ = ["BACKENDS", "MMCLS_KEY_MAP", "SUPPORTED_DTYPES", "Cvolution2d", "Involution2d", "decomposed", "involution2d",
           "resolve_backend"]
