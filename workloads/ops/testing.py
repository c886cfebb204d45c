"""Checking an involution implementation against float64, with a tolerance at the level of the dtype's rounding.

`reference(x, kernel, stride, padding, dilation, gate=None, grad_out=None)` computes, in float64 from the given
(already rounded) inputs, through the unfold formulation and autograd (independent of both backends):
y, and with grad_out also grad_x, grad_kernel and grad_gate. Each comes with its *magnitude*: the same
computation on |inputs|, i.e. the sum of the absolute values of the products that make up each element.

`assert_rounded_close(name, got, ref, mag, dtype, terms)` then requires, element by element,

    |got - ref| <= ulp_dtype(ref) + terms * u_acc * mag

ulp_dtype(ref): rounding the exact result to the output dtype (half an ulp, doubled for a binade edge);
terms * u_acc * mag: the worst-case error of summing `terms` products in the accumulation dtype (float32 for
half types, u = 2^-24; float64 for float64). An implementation that accumulates in half precision misses this
bound by an order of magnitude, so it fails; the test suite shows that with a bf16-accumulating sum.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# unit roundoff of the accumulation type for each result dtype
ACC_UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-24,
                     torch.bfloat16: 2.0**-24}


def _unfold_involution(x, kernel, stride, padding, dilation, gate):
    b, c = x.shape[:2]
    _, g, k, _, ho, wo = kernel.shape
    cols = F.unfold(x, k, dilation=dilation, padding=padding, stride=stride).view(b, g, c // g, k * k, ho, wo)
    y = (cols * kernel.reshape(b, g, 1, k * k, ho, wo)).sum(3).reshape(b, c, ho, wo)
    return y if gate is None else y * gate.reshape(b, c, 1, 1)


def reference(x, kernel, stride: int, padding: int, dilation: int, gate=None, grad_out=None) -> dict:
    """{'y': (ref, mag), and with grad_out 'grad_x', 'grad_kernel' (and 'grad_gate' with a gate)}, float64.

    ref and mag come from one pass: the signed and the absolute inputs stacked along the batch."""
    b = x.shape[0]

    def both(t):
        t = t.detach().double()
        return torch.cat([t, t.abs()]).requires_grad_(grad_out is not None)

    xs, ks = both(x), both(kernel)
    gs = None if gate is None else both(gate.reshape(b, -1))
    y = _unfold_involution(xs, ks, stride, padding, dilation, gs)
    out = {"y": y.detach()}
    if grad_out is not None:
        inputs = (xs, ks) if gs is None else (xs, ks, gs)
        gy = grad_out.detach().double()
        grads = torch.autograd.grad(y, inputs, torch.cat([gy, gy.abs()]))
        out.update(zip(("grad_x", "grad_kernel", "grad_gate"), grads))
        if gate is not None:
            out["grad_gate"] = out["grad_gate"].reshape(2 * b, *gate.shape[1:])
    return {name: (v[:b], v[b:]) for name, v in out.items()}


def terms(name: str, x_shape, kernel_shape, gated: bool) -> int:
    """How many products are summed (plus the gate's multiplication) for one element of `name`."""
    _, c, h, w = x_shape
    g, k = kernel_shape[1], kernel_shape[2]
    extra = 1 if gated else 0
    return {"y": k * k, "grad_x": k * k, "grad_kernel": c // g, "grad_gate": h * w * k * k}[name] + extra


MANTISSA_BITS = {torch.float64: 52, torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}


def ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` at |values| (a float64 tensor); the subnormal spacing below the normal range."""
    info = torch.finfo(dtype)
    exponent = torch.floor(torch.log2(values.abs().clamp_min(info.tiny)))
    return torch.exp2(exponent - MANTISSA_BITS[dtype])


def tolerance(ref: torch.Tensor, mag: torch.Tensor, dtype: torch.dtype, n_terms: int) -> torch.Tensor:
    """Per-element bound: one ulp of `dtype` at ref, plus the accumulation error of n_terms products."""
    return ulp(ref, dtype) + n_terms * ACC_UNIT_ROUNDOFF[dtype] * mag


def rounding_errors(got: torch.Tensor, ref: torch.Tensor, mag: torch.Tensor, dtype: torch.dtype,
                    n_terms: int) -> tuple[float, int]:
    """(worst |error| / tolerance over the elements, flat index of that element)."""
    err = (got.detach().double().cpu() - ref.cpu()).abs()
    ratio = err / tolerance(ref.cpu(), mag.cpu(), dtype, n_terms)
    ratio = torch.where(torch.isnan(ratio), torch.full_like(ratio, float("inf")), ratio)
    worst = int(ratio.reshape(-1).argmax()) if ratio.numel() else 0
    return (float(ratio.reshape(-1)[worst]) if ratio.numel() else 0.0), worst


def assert_rounded_close(name: str, got: torch.Tensor, ref: torch.Tensor, mag: torch.Tensor, dtype: torch.dtype,
                         n_terms: int) -> None:
    """AssertionError naming the worst element when any error exceeds `tolerance`."""
    if tuple(got.shape) != tuple(ref.shape):
        raise AssertionError(f"{name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}")
    worst_ratio, at = rounding_errors(got, ref, mag, dtype, n_terms)
    if worst_ratio > 1.0:
        flat_got, flat_ref, flat_mag = got.reshape(-1), ref.reshape(-1), mag.reshape(-1)
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(at), tuple(ref.shape)))
        tol = float(tolerance(flat_ref[at:at + 1].cpu(), flat_mag[at:at + 1].cpu(), dtype, n_terms)[0])
        raise AssertionError(
            f"{name} ({dtype}): element {index} is {float(flat_got[at])!r}, float64 reference "
            f"{float(flat_ref[at])!r}, error {abs(float(flat_got[at]) - float(flat_ref[at])):.3g} > tolerance "
            f"{tol:.3g} (ulp + {n_terms} terms x accumulation roundoff x magnitude {float(flat_mag[at]):.3g}); "
            f"worst error/tolerance {worst_ratio:.3g}")


def check_all(results: dict, refs: dict, dtype: torch.dtype, x_shape, kernel_shape, gated: bool) -> None:
    """assert_rounded_close for every name in `results` (y, grad_x, grad_kernel, grad_gate) against `refs`.

    grad_gate comes out in the accumulation dtype (float32 for half types) and is held to that dtype.
    """
    for name, got in results.items():
        ref, mag = refs[name]
        held_to = (torch.float64 if dtype == torch.float64 else torch.float32) if name == "grad_gate" else dtype
        assert_rounded_close(name, got, ref, mag, held_to, terms(name, x_shape, kernel_shape, gated))
