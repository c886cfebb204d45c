"""`involution2d`: the functional operator, its input validation, and the `cvlab::involution2d` custom op.

The operator is one `torch.library` custom op (`cvlab::involution2d`) with a fake (meta) implementation and
an autograd formula (`register_autograd`) whose backward calls two more custom ops,
`cvlab::involution2d_grad_input` and `cvlab::involution2d_grad_kernel`. Each op picks its backend at run
time, so `torch.compile(model, fullgraph=True)` sees three opaque ops and no graph breaks, and the autograd
graph never goes through the K*K Python loop of the torch backend.
"""
from __future__ import annotations

import warnings

import torch

from . import torch_backend

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKENDS = ("auto", "torch", "cupy")

_auto_warned = False


# --------------------------------------------------------------------------------------------------------------
# backend choice


def _warn_fallback_once(reason: str) -> None:
    global _auto_warned
    if not _auto_warned:
        _auto_warned = True
        warnings.warn(f"involution2d backend='auto': using the pure-PyTorch path on CUDA because the CuPy "
                      f"backend is unusable ({reason})", RuntimeWarning, stacklevel=3)


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend ('torch' or 'cupy') that runs for tensors on `device`."""
    if backend == "torch" or device.type != "cuda":
        if backend == "cupy":
            raise ValueError(f"backend='cupy' needs CUDA tensors, got a tensor on device {str(device)!r}")
        return "torch"
    from . import cupy_backend

    ok, reason = cupy_backend.cupy_status()
    if backend == "cupy":
        if not ok:
            raise RuntimeError(f"backend='cupy' is unusable: {reason}")
        return "cupy"
    if ok:
        return "cupy"
    _warn_fallback_once(reason)
    return "torch"


# --------------------------------------------------------------------------------------------------------------
# custom ops


@torch.library.custom_op("cvlab::involution2d", mutates_args=())
def _involution2d_op(x: torch.Tensor, kernel: torch.Tensor, stride: int, padding: int, dilation: int,
                     backend: str) -> torch.Tensor:
    if resolve_backend(backend, x.device) == "cupy":
        from . import cupy_backend

        return cupy_backend.involution_forward(x, kernel, stride, padding, dilation)
    return torch_backend.involution_forward(x, kernel, stride, padding, dilation)


@_involution2d_op.register_fake
def _(x, kernel, stride, padding, dilation, backend):
    return x.new_empty(x.shape[0], x.shape[1], kernel.shape[4], kernel.shape[5])


@torch.library.custom_op("cvlab::involution2d_grad_input", mutates_args=())
def _grad_input_op(grad_out: torch.Tensor, kernel: torch.Tensor, input_h: int, input_w: int, stride: int,
                   padding: int, dilation: int, backend: str) -> torch.Tensor:
    if resolve_backend(backend, grad_out.device) == "cupy":
        from . import cupy_backend

        return cupy_backend.involution_grad_input(grad_out, kernel, (input_h, input_w), stride, padding, dilation)
    return torch_backend.involution_grad_input(grad_out, kernel, (input_h, input_w), stride, padding, dilation)


@_grad_input_op.register_fake
def _(grad_out, kernel, input_h, input_w, stride, padding, dilation, backend):
    return grad_out.new_empty(grad_out.shape[0], grad_out.shape[1], input_h, input_w)


@torch.library.custom_op("cvlab::involution2d_grad_kernel", mutates_args=())
def _grad_kernel_op(grad_out: torch.Tensor, x: torch.Tensor, groups: int, kernel_size: int, stride: int,
                    padding: int, dilation: int, backend: str) -> torch.Tensor:
    if resolve_backend(backend, grad_out.device) == "cupy":
        from . import cupy_backend

        return cupy_backend.involution_grad_kernel(grad_out, x, groups, kernel_size, stride, padding, dilation)
    return torch_backend.involution_grad_kernel(grad_out, x, groups, kernel_size, stride, padding, dilation)


@_grad_kernel_op.register_fake
def _(grad_out, x, groups, kernel_size, stride, padding, dilation, backend):
    b, _, ho, wo = grad_out.shape
    return grad_out.new_empty(b, groups, kernel_size, kernel_size, ho, wo)


def _setup_context(ctx, inputs, output):
    x, kernel, stride, padding, dilation, backend = inputs
    ctx.save_for_backward(x, kernel)
    ctx.conf = (stride, padding, dilation, backend)


def _backward(ctx, grad_out):
    x, kernel = ctx.saved_tensors
    stride, padding, dilation, backend = ctx.conf
    grad_x = grad_kernel = None
    if ctx.needs_input_grad[0]:
        grad_x = _grad_input_op(grad_out, kernel, x.shape[2], x.shape[3], stride, padding, dilation, backend)
    if ctx.needs_input_grad[1]:
        grad_kernel = _grad_kernel_op(grad_out, x, kernel.shape[1], kernel.shape[2], stride, padding, dilation,
                                      backend)
    return grad_x, grad_kernel, None, None, None, None


_involution2d_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------------------
# validation and the public function


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {name}={value}")


def _common_dtype(x: torch.Tensor, kernel: torch.Tensor) -> torch.dtype:
    """dtype both operands run in when they differ (typically under autocast)."""
    if x.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        # Autocast produced a half kernel (1x1 convs) while x may still be float32: run natively in half.
        return torch.get_autocast_dtype("cuda")
    return torch.promote_types(x.dtype, kernel.dtype)


def involution2d(x: torch.Tensor, kernel: torch.Tensor, stride: int = 1, padding: int | None = None,
                 dilation: int = 1, backend: str = "auto") -> torch.Tensor:
    """Involution: per-pixel, per-group K x K kernels applied to the input's spatial neighbourhood.

    Args:
        x: (B, C, H, W) input, float16 / bfloat16 / float32 / float64, any device and memory layout.
        kernel: (B, G, K, K, Ho, Wo) kernels, C divisible by G; channel c uses group c // (C // G).
        stride, padding, dilation: the usual convolution arithmetic, Ho = (H + 2p - d(K-1) - 1) // s + 1;
            padding=None means dilation * (K - 1) // 2 ("same" for stride 1 and odd K).
        backend: 'torch' (pure PyTorch, any device), 'cupy' (CUDA kernels compiled with NVRTC) or 'auto'
            (cupy for CUDA tensors when CuPy works, else torch with one warning per process).

    Returns:
        (B, C, Ho, Wo) tensor. If x and kernel dtypes differ they are cast to a common dtype first (the
        autocast dtype on CUDA under autocast, otherwise the promoted dtype).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(kernel, torch.Tensor):
        raise TypeError(f"kernel must be a torch.Tensor, got {type(kernel).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got backend={backend!r}")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (B, C, H, W), got x.shape={tuple(x.shape)}")
    if kernel.dim() != 6:
        raise ValueError(f"kernel must be 6-D (B, G, K, K, Ho, Wo), got kernel.shape={tuple(kernel.shape)}")
    for name, t in (("x", x), ("kernel", kernel)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has unsupported dtype {t.dtype}; supported: "
                            f"{', '.join(str(d) for d in SUPPORTED_DTYPES)}")
    if x.device != kernel.device:
        raise ValueError(f"x and kernel must be on the same device, got x on {x.device}, kernel on {kernel.device}")
    _check_int("stride", stride, 1)
    _check_int("dilation", dilation, 1)
    b, c, h, w = x.shape
    kb, g, k, k2, ho, wo = kernel.shape
    if k != k2:
        raise ValueError(f"kernel must be square (B, G, K, K, Ho, Wo), got kernel.shape={tuple(kernel.shape)}")
    if k < 1:
        raise ValueError(f"kernel size must be >= 1, got kernel.shape={tuple(kernel.shape)}")
    if padding is None:
        padding = dilation * (k - 1) // 2
    _check_int("padding", padding, 0)
    if kb != b:
        raise ValueError(f"kernel batch {kb} does not match x batch {b} "
                         f"(kernel.shape={tuple(kernel.shape)}, x.shape={tuple(x.shape)})")
    if g < 1 or c % g != 0:
        raise ValueError(f"x channels C={c} must be divisible by the kernel groups G={g} "
                         f"(kernel.shape={tuple(kernel.shape)})")
    eho, ewo = torch_backend.output_size(h, w, k, stride, padding, dilation)
    if eho < 1 or ewo < 1:
        raise ValueError(f"input {h}x{w} is too small for kernel size {k}, dilation {dilation}, padding {padding}")
    if (ho, wo) != (eho, ewo):
        raise ValueError(f"kernel spatial size {ho}x{wo} does not match the output size {eho}x{ewo} of a "
                         f"{h}x{w} input with K={k}, stride={stride}, padding={padding}, dilation={dilation} "
                         f"(kernel.shape={tuple(kernel.shape)})")
    if backend == "cupy" and x.device.type != "cuda":
        raise ValueError(f"backend='cupy' needs CUDA tensors, got x on device {str(x.device)!r}")
    if x.dtype != kernel.dtype:
        dtype = _common_dtype(x, kernel)
        x, kernel = x.to(dtype), kernel.to(dtype)
    return _involution2d_op(x, kernel, stride, padding, dilation, backend)
