"""`involution2d`: the functional operator, its input validation, and the `cvlab::involution2d` custom op.

The operator is one `torch.library` custom op (`cvlab::involution2d`) with a fake (meta) implementation and an
autograd formula (`register_autograd`) whose backward is one more custom op, `cvlab::involution2d_backward`
(grad_x, grad_kernel and grad_gate, each computed only when needed). Each op picks its backend at run time, so
`torch.compile(model, fullgraph=True)` sees two opaque ops and no graph breaks, and the autograd graph never goes
through the K*K Python loop of the torch backend.

The optional C-volution `gate` (B, C) is fused: y = gate[b, c] * involution(x, kernel), with its gradient, and
no x * gate tensor is materialised (`Cvolution2d` uses it).
"""
from __future__ import annotations

import contextlib
import warnings

import torch

from . import cupy_backend, torch_backend

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKENDS = ("auto", "torch", "cupy")

_auto_warned = False
# Inside `decomposed()` (depth > 0): involution2d is plain PyTorch ops (no custom op), for exporters. A plain
# module global, which torch.compile can guard on (it cannot trace a ContextVar).
_decomposed_depth = 0
# Device types whose tensors the 'auto' backend tries to run with the CuPy kernels.
CUPY_DEVICE_TYPES = ("cuda",)


@contextlib.contextmanager
def decomposed():
    """Within this context `involution2d` runs the pure-PyTorch formula as ordinary differentiable ops instead of
    the `cvlab::involution2d` custom op: what ONNX and TorchScript exporters need, so that an exported model holds
    only standard ops (pad, strided slices, multiply-add) and runs without this project installed."""
    global _decomposed_depth
    _decomposed_depth += 1
    try:
        yield
    finally:
        _decomposed_depth -= 1


# --------------------------------------------------------------------------------------------------------------
# backend choice


def _warn_fallback_once(reason: str) -> None:
    global _auto_warned
    if not _auto_warned:
        _auto_warned = True
        warnings.warn(f"involution2d backend='auto': using the pure-PyTorch path on CUDA because the CuPy "
                      f"backend is unusable ({reason})", RuntimeWarning, stacklevel=4)


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend ('torch' or 'cupy') that runs for tensors on `device`."""
    if backend == "torch" or device.type not in CUPY_DEVICE_TYPES:
        if backend == "cupy":
            raise ValueError(f"backend='cupy' needs CUDA tensors, got a tensor on device {str(device)!r}")
        return "torch"
    ok, reason = cupy_backend.cupy_status()
    if backend == "cupy":
        if not ok:
            raise RuntimeError(f"backend='cupy' is unusable: {reason}")
        return "cupy"
    if ok:
        return "cupy"
    _warn_fallback_once(reason)
    return "torch"


def _backend_module(backend: str, x: torch.Tensor, k: int, stride: int, dilation: int):
    """The module (torch_backend or cupy_backend) that runs this call."""
    if resolve_backend(backend, x.device) == "torch":
        return torch_backend
    if not cupy_backend.supports(k, stride, dilation, x.dtype):
        msg = (f"the CUDA kernels cannot run K={k}, stride={stride}, dilation={dilation} in {x.dtype} (the input "
               f"tile does not fit in shared memory)")
        if backend == "cupy":
            raise ValueError(msg)
        _warn_fallback_once(msg)
        return torch_backend
    return cupy_backend


# --------------------------------------------------------------------------------------------------------------
# custom ops


@torch.library.custom_op("cvlab::involution2d", mutates_args=())
def _involution2d_op(x: torch.Tensor, kernel: torch.Tensor, stride: int, padding: int, dilation: int,
                     backend: str, gate: torch.Tensor | None = None) -> torch.Tensor:
    impl = _backend_module(backend, x, kernel.shape[2], stride, dilation)
    return impl.involution_forward(x, kernel, stride, padding, dilation, gate=gate)


@_involution2d_op.register_fake
def _(x, kernel, stride, padding, dilation, backend, gate=None):
    return x.new_empty(x.shape[0], x.shape[1], kernel.shape[4], kernel.shape[5])


@torch.library.custom_op("cvlab::involution2d_backward", mutates_args=())
def _backward_op(grad_out: torch.Tensor, x: torch.Tensor, kernel: torch.Tensor, gate: torch.Tensor | None,
                 stride: int, padding: int, dilation: int, backend: str,
                 output_mask: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_kernel, grad_gate); an output not asked for by output_mask is an empty tensor."""
    impl = _backend_module(backend, x, kernel.shape[2], stride, dilation)
    grads = impl.involution_backward(grad_out, x, kernel, stride, padding, dilation, gate=gate,
                                     need_input=output_mask[0], need_kernel=output_mask[1],
                                     need_gate=output_mask[2])
    return tuple(grad_out.new_empty(0) if g is None else g for g in grads)


@_backward_op.register_fake
def _(grad_out, x, kernel, gate, stride, padding, dilation, backend, output_mask):
    return (grad_out.new_empty(x.shape if output_mask[0] else (0,)),
            grad_out.new_empty(kernel.shape if output_mask[1] else (0,)),
            gate.new_empty(gate.shape) if output_mask[2] and gate is not None else grad_out.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, kernel, stride, padding, dilation, backend, gate = inputs
    ctx.save_for_backward(x, kernel, gate)
    ctx.conf = (stride, padding, dilation, backend)


def _backward(ctx, grad_out):
    x, kernel, gate = ctx.saved_tensors
    stride, padding, dilation, backend = ctx.conf
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], gate is not None and ctx.needs_input_grad[6]]
    if not any(mask):
        return None, None, None, None, None, None, None
    gx, gk, gg = _backward_op(grad_out, x, kernel, gate, stride, padding, dilation, backend, mask)
    return (gx if mask[0] else None), (gk if mask[1] else None), None, None, None, None, (gg if mask[2] else None)


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
                 dilation: int = 1, backend: str = "auto", gate: torch.Tensor | None = None) -> torch.Tensor:
    """Involution: per-pixel, per-group K x K kernels applied to the input's spatial neighbourhood.

    Args:
        x: (B, C, H, W) input, float16 / bfloat16 / float32 / float64, any device and memory layout.
        kernel: (B, G, K, K, Ho, Wo) kernels, C divisible by G; channel c uses group c // (C // G).
        stride, padding, dilation: the usual convolution arithmetic, Ho = (H + 2p - d(K-1) - 1) // s + 1;
            padding=None means dilation * (K - 1) // 2 ("same" for stride 1 and odd K).
        backend: 'torch' (pure PyTorch, any device), 'cupy' (CUDA kernels compiled with NVRTC) or 'auto'
            (cupy for CUDA tensors when CuPy works, else torch with one warning per process).
        gate: optional (B, C) or (B, C, 1, 1) per-channel scale (C-volution), fused into the operator:
            the result equals involution2d(x * gate, kernel) without materialising x * gate; differentiable.

    Returns:
        (B, C, Ho, Wo) tensor. If x and kernel dtypes differ they are cast to a common dtype first (the
        autocast dtype on CUDA under autocast, otherwise the promoted dtype). The gate is applied in the
        accumulation dtype (float32 for half types).
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
    if torch.jit.is_tracing():  # shapes are traced as tensors; K (hence the padding) is fixed by the model
        padding, k = int(padding), int(k)
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
    if gate is not None:
        gate = _check_gate(gate, x)
    if _decomposed_depth:
        return torch_backend.involution_forward_out_of_place(x, kernel, stride, padding, dilation, gate)
    return _involution2d_op(x, kernel, stride, padding, dilation, backend, gate)


def _check_gate(gate, x: torch.Tensor) -> torch.Tensor:
    """The gate as a (B, C) tensor in the accumulation dtype of x."""
    if not isinstance(gate, torch.Tensor):
        raise TypeError(f"gate must be a torch.Tensor or None, got {type(gate).__name__}")
    b, c = x.shape[:2]
    if tuple(gate.shape) not in ((b, c), (b, c, 1, 1)):
        raise ValueError(f"gate must have shape (B, C) = ({b}, {c}) or (B, C, 1, 1), got gate.shape="
                         f"{tuple(gate.shape)}")
    if gate.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"gate has unsupported dtype {gate.dtype}; supported: "
                        f"{', '.join(str(d) for d in SUPPORTED_DTYPES)}")
    if gate.device != x.device:
        raise ValueError(f"gate must be on the device of x ({x.device}), got {gate.device}")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return gate.reshape(b, c).to(acc)
