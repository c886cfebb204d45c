"""Pure-PyTorch involution: forward and explicit backward, accumulating over the K*K kernel offsets.

The K*K-times unfolded input (what `nn.Unfold` builds) is never materialised: for every offset (i, j) the
input pixels read by that tap form a strided *view* of the zero-padded input, so each step costs one
elementwise multiply-add of output size. Extra memory is O(output) (plus the padded copy of the input).

Shapes (the same everywhere in `workloads.ops`):
    x       (B, C, H, W)
    kernel  (B, G, K, K, Ho, Wo)     channel c uses kernel group c // (C // G)
    out     (B, C, Ho, Wo)           out[b, c, h, w] = sum_ij kernel[b, g, i, j, h, w] *
                                                        x[b, c, h*s - p + i*d, w*s - p + j*d]  (0 outside)

C-volution gate (B, C), optional: y = gate[b, c] * involution(x, kernel)[b, c]. The gate is a per-channel
constant, so it scales the accumulated sum (never a materialised x * gate); in backward it scales grad_y for
grad_kernel and the result of grad_input, and d loss / d gate[b, c] = sum_p x[b, c, p] * (grad_input before the
gate)[b, c, p]. The CuPy kernels compute the same expressions.

These functions run under whatever autograd mode the caller has; the custom op calls them with autograd disabled
and uses `involution_backward` as its backward (the same signature as the CuPy backend's).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Half types accumulate in float32: summing K*K products in fp16/bf16 loses several bits.
_ACC_DTYPE = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


def output_size(h: int, w: int, k: int, stride: int, padding: int, dilation: int) -> tuple[int, int]:
    """(Ho, Wo) by the usual convolution arithmetic."""
    span = dilation * (k - 1) + 1
    return (h + 2 * padding - span) // stride + 1, (w + 2 * padding - span) // stride + 1


def _tap(t: torch.Tensor, i: int, j: int, stride: int, dilation: int, ho: int, wo: int) -> torch.Tensor:
    """The (B, C, Ho, Wo) strided view of the padded tensor `t` that kernel tap (i, j) touches."""
    r0, c0 = i * dilation, j * dilation
    return t[:, :, r0 : r0 + stride * (ho - 1) + 1 : stride, c0 : c0 + stride * (wo - 1) + 1 : stride]


def _grouped(t: torch.Tensor, g: int) -> torch.Tensor:
    """(B, C, Ho, Wo) -> (B, G, C/G, Ho, Wo); splitting a dimension is always a view, even when strided."""
    return t.unflatten(1, (g, t.shape[1] // g))


def _gate_view(gate: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """(B, C) gate -> (B, C, 1, 1) in the accumulation dtype."""
    return gate.to(acc).reshape(gate.shape[0], gate.shape[1], 1, 1)


def involution_forward(x: torch.Tensor, kernel: torch.Tensor, stride: int, padding: int,
                       dilation: int, gate: torch.Tensor | None = None) -> torch.Tensor:
    """out = gate * involution(x, kernel); x and kernel must share dtype and device; gate (B, C) or None."""
    b, c = x.shape[:2]
    g, k, ho, wo = kernel.shape[1], kernel.shape[2], kernel.shape[4], kernel.shape[5]
    acc = _ACC_DTYPE.get(x.dtype, x.dtype)
    xp = F.pad(x, (padding, padding, padding, padding)) if padding else x
    # Accumulate through a grouped view but return the base tensor: a custom op's output must not be a view,
    # or an in-place op after it (e.g. ReLU(inplace=True)) fails in autograd.
    out = torch.zeros(b, c, ho, wo, dtype=acc, device=x.device)
    out_grouped = _grouped(out, g)
    for i in range(k):
        for j in range(k):
            view = _grouped(_tap(xp, i, j, stride, dilation, ho, wo), g)
            weight = kernel[:, :, i, j].unsqueeze(2)          # (B, G, 1, Ho, Wo) broadcast over C/G
            if acc is x.dtype:
                out_grouped.addcmul_(view, weight)
            else:
                out_grouped.addcmul_(view.to(acc), weight.to(acc))
    if gate is not None:
        out.mul_(_gate_view(gate, acc))
    return out.to(x.dtype)


def involution_forward_out_of_place(x: torch.Tensor, kernel: torch.Tensor, stride: int, padding: int,
                                    dilation: int, gate: torch.Tensor | None = None) -> torch.Tensor:
    """`involution_forward` without in-place ops or views written to: a plain sum of K*K products, which graph
    exporters (ONNX, TorchScript) translate faithfully (`workloads.ops.decomposed`)."""
    b, c = x.shape[:2]
    g, k, ho, wo = kernel.shape[1], kernel.shape[2], kernel.shape[4], kernel.shape[5]
    acc = _ACC_DTYPE.get(x.dtype, x.dtype)
    xp = F.pad(x, (padding, padding, padding, padding)) if padding else x
    out = None
    for i in range(k):
        for j in range(k):
            view = _grouped(_tap(xp, i, j, stride, dilation, ho, wo), g).to(acc)
            term = view * kernel[:, :, i, j].unsqueeze(2).to(acc)  # (B, G, C/G, Ho, Wo)
            out = term if out is None else out + term
    out = out.reshape(b, c, ho, wo)
    if gate is not None:
        out = out * _gate_view(gate, acc)
    return out.to(x.dtype)


def _grad_input_acc(grad_out: torch.Tensor, kernel: torch.Tensor, input_hw: tuple[int, int], stride: int,
                    padding: int, dilation: int) -> torch.Tensor:
    """d loss / d x in the accumulation dtype: scatter grad_out * kernel back through the same strided views."""
    b, c, ho, wo = grad_out.shape
    g, k = kernel.shape[1], kernel.shape[2]
    h, w = input_hw
    acc = _ACC_DTYPE.get(grad_out.dtype, grad_out.dtype)
    # The padded input's shape: every tap's view lies inside it, since (Ho, Wo) come from `output_size`
    # (its last row is at dilation * (k - 1) + stride * (Ho - 1) <= H + 2p - 1).
    gxp = torch.zeros(b, c, h + 2 * padding, w + 2 * padding, dtype=acc, device=grad_out.device)
    gy = _grouped(grad_out, g).to(acc)
    for i in range(k):
        for j in range(k):
            view = _grouped(_tap(gxp, i, j, stride, dilation, ho, wo), g)
            view.addcmul_(gy, kernel[:, :, i, j].unsqueeze(2).to(acc))
    return gxp[:, :, padding : padding + h, padding : padding + w]


def involution_grad_input(grad_out: torch.Tensor, kernel: torch.Tensor, input_hw: tuple[int, int], stride: int,
                          padding: int, dilation: int, gate: torch.Tensor | None = None) -> torch.Tensor:
    """d loss / d x (no overlap within a tap, so the scatter is exact)."""
    gx = _grad_input_acc(grad_out, kernel, input_hw, stride, padding, dilation)
    if gate is not None:
        gx = gx * _gate_view(gate, gx.dtype)
    return gx.to(grad_out.dtype).contiguous()


def involution_grad_kernel(grad_out: torch.Tensor, x: torch.Tensor, groups: int, kernel_size: int, stride: int,
                           padding: int, dilation: int, gate: torch.Tensor | None = None) -> torch.Tensor:
    """d loss / d kernel: for each tap, reduce (gate * grad_out) * x_view over the C/G channels of each group."""
    b, _, ho, wo = grad_out.shape
    g, k = groups, kernel_size
    acc = _ACC_DTYPE.get(grad_out.dtype, grad_out.dtype)
    xp = F.pad(x, (padding, padding, padding, padding)) if padding else x
    gy = grad_out.to(acc)
    if gate is not None:
        gy = gy * _gate_view(gate, acc)
    gy = _grouped(gy, g)
    gk = torch.empty(b, g, k, k, ho, wo, dtype=acc, device=grad_out.device)
    for i in range(k):
        for j in range(k):
            view = _grouped(_tap(xp, i, j, stride, dilation, ho, wo), g)
            gk[:, :, i, j] = (gy * view.to(acc)).sum(dim=2)
    return gk.to(grad_out.dtype)


def involution_backward(grad_out, x, kernel, stride: int, padding: int, dilation: int, gate=None,
                        need_input: bool = True, need_kernel: bool = True, need_gate: bool = True):
    """(grad_x, grad_kernel, grad_gate), each None when not needed; grad_gate (B, C) in the accumulation dtype."""
    need_gate = need_gate and gate is not None
    gx = gk = gg = None
    if need_input or need_gate:
        gx_acc = _grad_input_acc(grad_out, kernel, (x.shape[2], x.shape[3]), stride, padding, dilation)
        if need_gate:
            gg = (gx_acc * x.to(gx_acc.dtype)).sum(dim=(2, 3))
        if need_input:
            if gate is not None:
                gx_acc = gx_acc * _gate_view(gate, gx_acc.dtype)
            gx = gx_acc.to(grad_out.dtype).contiguous()
    if need_kernel:
        gk = involution_grad_kernel(grad_out, x, kernel.shape[1], kernel.shape[2], stride, padding, dilation, gate)
    return gx, gk, gg
