"""CuPy backend: the CUDA kernels of `involution.cu`, compiled at run time with NVRTC through `cupy.RawModule`.

- Works with cupy-cuda12x (needs the `[ctk]` extra for NVRTC) and cupy-cuda13x; `cupy.cuda.compile_with_cache`
  (used by the published involution code) no longer exists in CuPy 13+, so this uses `RawModule` with
  `name_expressions` to instantiate the C++ templates.
- One module per (device, dtype, K, stride, dilation, padding), compiled once and cached (CuPy additionally
  caches the binary on disk under ~/.cupy/kernel_cache).
- Launches on the current torch CUDA stream (`cupy.cuda.ExternalStream`); tensors are passed by `data_ptr`
  (made contiguous first, so channels_last / strided inputs work), shapes as 64-bit integers.
"""
from __future__ import annotations

import functools
import threading
from pathlib import Path

import torch

SOURCE_PATH = Path(__file__).with_name("involution.cu")
CUDA_TYPES = {torch.float32: "float", torch.float64: "double", torch.float16: "cv_half",
              torch.bfloat16: "cv_bf16"}
KERNEL_NAMES = ("involution_forward", "involution_grad_input", "involution_grad_kernel")
BLOCK = 256
_MAX_GRID = 2**31 - 1

_lock = threading.Lock()
_status: tuple[bool, str] | None = None


def source() -> str:
    return SOURCE_PATH.read_text()


def name_expression(kernel_name: str, dtype: torch.dtype, k: int, stride: int, dilation: int,
                    padding: int) -> str:
    """The template instantiation compiled for one configuration, e.g. involution_forward<float, 7, 1, 1, 3>."""
    return f"{kernel_name}<{CUDA_TYPES[dtype]}, {k}, {stride}, {dilation}, {padding}>"


def cupy_status() -> tuple[bool, str]:
    """(usable, reason): whether CuPy can compile and run a kernel here. Checked once per process."""
    global _status
    with _lock:
        if _status is None:
            _status = _probe()
        return _status


def _probe() -> tuple[bool, str]:
    try:
        import cupy
    except ImportError as exc:
        return False, f"CuPy is not installed ({exc}); install cupy-cuda12x[ctk] or cupy-cuda13x"
    except Exception as exc:  # noqa: BLE001 - a broken install can raise anything at import
        return False, f"importing CuPy failed: {type(exc).__name__}: {exc}"
    try:
        if not torch.cuda.is_available():
            return False, "torch sees no CUDA device"
        with cupy.cuda.Device(torch.cuda.current_device()):
            module = cupy.RawModule(code=source(), options=("--std=c++14",))
            probe = module.get_function("involution_probe")
            out = cupy.zeros(32, dtype=cupy.float32)
            probe((1,), (32,), (out,))
            if float(out[31].get()) != 62.0:
                return False, "the CuPy probe kernel returned a wrong result"
    except Exception as exc:  # noqa: BLE001 - CUDARuntimeError, NVRTCError, CompileException ...
        return False, f"{type(exc).__name__}: {exc}".strip()
    return True, "ok"


@functools.cache
def _functions(device_index: int, dtype: torch.dtype, k: int, stride: int, dilation: int, padding: int):
    import cupy

    names = {kind: name_expression(kind, dtype, k, stride, dilation, padding) for kind in KERNEL_NAMES}
    with cupy.cuda.Device(device_index):
        module = cupy.RawModule(code=source(), options=("--std=c++14",), name_expressions=tuple(names.values()))
        return {kind: module.get_function(name) for kind, name in names.items()}


def _launch(kind: str, n: int, like: torch.Tensor, k: int, stride: int, dilation: int, padding: int,
            pointers: tuple[torch.Tensor, ...], sizes: tuple[int, ...]) -> None:
    if n == 0:
        return
    import cupy
    import numpy as np

    device_index = like.device.index if like.device.index is not None else torch.cuda.current_device()
    fn = _functions(device_index, like.dtype, k, stride, dilation, padding)[kind]
    args = tuple(np.uint64(t.data_ptr()) for t in pointers) + tuple(np.int64(s) for s in sizes)
    grid = min((n + BLOCK - 1) // BLOCK, _MAX_GRID)
    with cupy.cuda.Device(device_index):
        stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(like.device).cuda_stream, device_index)
        with stream:
            fn((grid,), (BLOCK,), args)


def _check(t: torch.Tensor, name: str) -> torch.Tensor:
    if not t.is_cuda:
        raise ValueError(f"the cupy backend needs CUDA tensors, got {name} on {t.device}")
    if t.dtype not in CUDA_TYPES:
        raise TypeError(f"the cupy backend does not support {name} dtype {t.dtype}")
    return t.contiguous()


def involution_forward(x, kernel, stride: int, padding: int, dilation: int) -> torch.Tensor:
    x, kernel = _check(x, "x"), _check(kernel, "kernel")
    b, c, h, w = x.shape
    g, k, ho, wo = kernel.shape[1], kernel.shape[2], kernel.shape[4], kernel.shape[5]
    y = torch.empty(b, c, ho, wo, dtype=x.dtype, device=x.device)
    _launch("involution_forward", y.numel(), x, k, stride, dilation, padding, (x, kernel, y),
            (b, c, h, w, g, ho, wo))
    return y


def involution_grad_input(grad_out, kernel, input_hw, stride: int, padding: int, dilation: int) -> torch.Tensor:
    grad_out, kernel = _check(grad_out, "grad_out"), _check(kernel.to(grad_out.dtype), "kernel")
    b, c, ho, wo = grad_out.shape
    g, k = kernel.shape[1], kernel.shape[2]
    h, w = input_hw
    grad_x = torch.empty(b, c, h, w, dtype=grad_out.dtype, device=grad_out.device)
    _launch("involution_grad_input", grad_x.numel(), grad_out, k, stride, dilation, padding,
            (grad_out, kernel, grad_x), (b, c, h, w, g, ho, wo))
    return grad_x


def involution_grad_kernel(grad_out, x, groups: int, kernel_size: int, stride: int, padding: int,
                           dilation: int) -> torch.Tensor:
    grad_out, x = _check(grad_out, "grad_out"), _check(x.to(grad_out.dtype), "x")
    b, c, ho, wo = grad_out.shape
    h, w = x.shape[2], x.shape[3]
    k = kernel_size
    grad_kernel = torch.empty(b, groups, k, k, ho, wo, dtype=grad_out.dtype, device=grad_out.device)
    _launch("involution_grad_kernel", grad_kernel.numel(), grad_out, k, stride, dilation, padding,
            (grad_out, x, grad_kernel), (b, c, h, w, groups, ho, wo))
    return grad_kernel
