"""Involution and C-volution operators: CUDA kernels through CuPy, and a pure-PyTorch path.

`involution2d` (functional, custom op `cvlab::involution2d`), `Involution2d` (RedNet) and `Cvolution2d` (CedNet).
Backends: 'torch' (any device), 'cupy' (CUDA, NVRTC-compiled kernels from involution.cu), 'auto'.
"""
from .functional import BACKENDS, SUPPORTED_DTYPES, involution2d, resolve_backend
from .modules import MMCLS_KEY_MAP, Cvolution2d, Involution2d

__all__ = ["BACKENDS", "MMCLS_KEY_MAP", "SUPPORTED_DTYPES", "Cvolution2d", "Involution2d", "involution2d",
           "resolve_backend"]
