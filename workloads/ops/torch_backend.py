"""Pure-PyTorch involution: forward and explicit backward, accumulating over the K*K kernel offsets.

The K*K-times unfolded input (what `nn.Unfold` builds) is never materialised: for every offset (i, j) the
input pixels read by that tap form a strided *view* of the zero-padded input, so each step costs one
elementwise multiply-add of output size. Extra memory is O(output) (plus the padded copy of the input).

Shapes (the same everywhere in `workloads.ops`):
    x       (B, C, H, W)
    kernel  (B, G, K, K, Ho, Wo)     channel c uses kernel group c // (C // G)
    out     (B, C, Ho, Wo)           out[b, c, h, w] = sum_ij kernel[b, g, i, j, h, w] *
                                                        x[b, c, h*s - p + i*d, w*s - p + j*d]  (0 outside)

These functions run under whatever autograd mode the caller has; the custom op calls them with
autograd disabled and uses `involution_grad_input` / `involution_grad_kernel` as its backward.
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


def involution_forward(x: torch.Tensor, kernel: torch.Tensor, stride: int, padding: int,
                       dilation: int) -> torch.Tensor:
    """out = involution(x, kernel); x and kernel must share dtype and device."""
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
    return out.to(x.dtype)


def involution_grad_input(grad_out: torch.Tensor, kernel: torch.Tensor, input_hw: tuple[int, int], stride: int,
                          padding: int, dilation: int) -> torch.Tensor:
    """d loss / d x: scatter grad_out * kernel back through the same strided views (no overlap within a tap)."""
    b, c, ho, wo = grad_out.shape
    g, k = kernel.shape[1], kernel.shape[2]
    h, w = input_hw
    acc = _ACC_DTYPE.get(grad_out.dtype, grad_out.dtype)
    # Padded buffer large enough for every tap's view, even when (H + 2p - span) is not a multiple of stride.
    hp = max(h + 2 * padding, dilation * (k - 1) + stride * (ho - 1) + 1)
    wp = max(w + 2 * padding, dilation * (k - 1) + stride * (wo - 1) + 1)
    gxp = torch.zeros(b, c, hp, wp, dtype=acc, device=grad_out.device)
    gy = _grouped(grad_out, g).to(acc)
    for i in range(k):
        for j in range(k):
            view = _grouped(_tap(gxp, i, j, stride, dilation, ho, wo), g)
            view.addcmul_(gy, kernel[:, :, i, j].unsqueeze(2).to(acc))
    return gxp[:, :, padding : padding + h, padding : padding + w].to(grad_out.dtype).contiguous()


def involution_grad_kernel(grad_out: torch.Tensor, x: torch.Tensor, groups: int, kernel_size: int, stride: int,
                           padding: int, dilation: int) -> torch.Tensor:
    """d loss / d kernel: for each tap, reduce grad_out * x_view over the C/G channels of each group."""
    b, _, ho, wo = grad_out.shape
    g, k = groups, kernel_size
    acc = _ACC_DTYPE.get(grad_out.dtype, grad_out.dtype)
    xp = F.pad(x, (padding, padding, padding, padding)) if padding else x
    gy = _grouped(grad_out, g).to(acc)
    gk = torch.empty(b, g, k, k, ho, wo, dtype=acc, device=grad_out.device)
    for i in range(k):
        for j in range(k):
            view = _grouped(_tap(xp, i, j, stride, dilation, ho, wo), g)
            gk[:, :, i, j] = (gy * view.to(acc)).sum(dim=2)
    return gk.to(grad_out.dtype)
