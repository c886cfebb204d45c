"""CPU tests of workloads.ops: the torch backend against an independent unfold reference, gradients,
the modules (shapes, parameter layout, bad input), the `auto` backend choice and torch.compile."""
from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from workloads.ops import Cvolution2d, Involution2d, involution2d, testing, torch_backend
from workloads.ops import functional as ops_functional


def reference_involution(x, kernel, stride, padding, dilation):
    """Independent reference: the unfold formulation of the published naive RedNet code."""
    b, c, _, _ = x.shape
    _, g, k, _, ho, wo = kernel.shape
    cols = F.unfold(x, k, dilation=dilation, padding=padding, stride=stride)  # (B, C*K*K, Ho*Wo)
    cols = cols.view(b, g, c // g, k * k, ho, wo)
    return (cols * kernel.reshape(b, g, 1, k * k, ho, wo)).sum(3).reshape(b, c, ho, wo)


def make_inputs(b, c, h, w, g, k, stride, padding, dilation, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ho, wo = torch_backend.output_size(h, w, k, stride, padding, dilation)
    x = torch.randn(b, c, h, w, generator=gen, dtype=dtype)
    kernel = torch.randn(b, g, k, k, ho, wo, generator=gen, dtype=dtype)
    return x, kernel


GRID = list(itertools.product([1, 3, 5, 7], [1, 2], [1, 2], [1, 2, 4], [1, 3]))


@pytest.mark.parametrize("k,stride,dilation,g,b", GRID)
def test_torch_backend_matches_reference(k, stride, dilation, g, b):
    h, w, c = 7, 10, 16  # C = 16 works for every G; H odd, W even, H != W
    padding = dilation * (k - 1) // 2
    x, kernel = make_inputs(b, c, h, w, g, k, stride, padding, dilation, seed=k * 100 + stride * 10 + dilation)
    x.requires_grad_(True)
    kernel.requires_grad_(True)
    out = involution2d(x, kernel, stride=stride, dilation=dilation, backend="torch")
    ref = reference_involution(x, kernel, stride, padding, dilation)
    assert out.shape == ref.shape == (b, c, (h - 1) // stride + 1, (w - 1) // stride + 1)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    # Gradients of the custom op (explicit backward functions) against autograd through the reference.
    gy = torch.randn_like(out)
    gx, gk = torch.autograd.grad(out, (x, kernel), gy)
    rgx, rgk = torch.autograd.grad(ref, (x, kernel), gy)
    torch.testing.assert_close(gx, rgx, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gk, rgk, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("h,w,k,stride,padding,dilation", [
    (9, 6, 3, 2, 0, 1),    # no padding, (H + 2p - span) not a multiple of the stride
    (8, 11, 5, 3, 1, 1),   # stride 3, asymmetric leftovers
    (6, 5, 3, 1, 4, 2),    # padding larger than the "same" padding
    (7, 9, 7, 2, 0, 1),    # kernel as large as the input height
])
def test_explicit_padding(h, w, k, stride, padding, dilation):
    x, kernel = make_inputs(2, 6, h, w, 3, k, stride, padding, dilation)
    x.requires_grad_(True)
    kernel.requires_grad_(True)
    out = involution2d(x, kernel, stride, padding, dilation, backend="torch")
    ref = reference_involution(x, kernel, stride, padding, dilation)
    torch.testing.assert_close(out, ref)
    gy = torch.randn_like(out)
    for a, r in zip(torch.autograd.grad(out, (x, kernel), gy), torch.autograd.grad(ref, (x, kernel), gy)):
        torch.testing.assert_close(a, r)


def test_explicit_backward_functions_directly():
    """The backward functions work without autograd (no graph through the K*K loop)."""
    x, kernel = make_inputs(2, 8, 9, 7, 2, 3, 2, 1, 1)
    gy = torch.randn(2, 8, 5, 4, dtype=torch.float64)
    with torch.no_grad():
        gx = torch_backend.involution_grad_input(gy, kernel, (9, 7), 2, 1, 1)
        gk = torch_backend.involution_grad_kernel(gy, x, 2, 3, 2, 1, 1)
    xr, kr = x.clone().requires_grad_(True), kernel.clone().requires_grad_(True)
    rgx, rgk = torch.autograd.grad(reference_involution(xr, kr, 2, 1, 1), (xr, kr), gy)
    torch.testing.assert_close(gx, rgx)
    torch.testing.assert_close(gk, rgk)
    gate = torch.rand(2, 8, dtype=torch.float64)  # the C-volution gate: the same functions, gated
    with torch.no_grad():
        gx = torch_backend.involution_grad_input(gy, kernel, (9, 7), 2, 1, 1, gate=gate)
        gk = torch_backend.involution_grad_kernel(gy, x, 2, 3, 2, 1, 1, gate=gate)
    rgx, rgk = torch.autograd.grad(reference_involution(xr * gate[:, :, None, None], kr, 2, 1, 1), (xr, kr), gy)
    torch.testing.assert_close(gx, rgx)
    torch.testing.assert_close(gk, rgk)


def test_gradcheck_float64():
    x, kernel = make_inputs(2, 4, 5, 6, 2, 3, 2, 1, 1)
    x.requires_grad_(True)
    kernel.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: involution2d(a, b, 2, 1, 1, backend="torch"), (x, kernel))
    x, kernel = make_inputs(1, 4, 6, 5, 4, 3, 1, 2, 2)
    x.requires_grad_(True)
    kernel.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: involution2d(a, b, 1, None, 2), (x, kernel))


def test_non_contiguous_and_channels_last_inputs():
    x, kernel = make_inputs(2, 8, 9, 6, 2, 3, 1, 1, 1)
    ref = reference_involution(x, kernel, 1, 1, 1)
    torch.testing.assert_close(involution2d(x.to(memory_format=torch.channels_last), kernel), ref)
    xt = x.transpose(2, 3).contiguous().transpose(2, 3)  # same values, non-contiguous strides
    kt = kernel.transpose(4, 5).contiguous().transpose(4, 5)
    assert not xt.is_contiguous() and not kt.is_contiguous()
    torch.testing.assert_close(involution2d(xt, kt), ref)


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_lower_precision_dtypes_within_rounding(dtype, gated):
    """Forward and every gradient against float64 computed from the same rounded inputs, held to the dtype's
    rounding (workloads.ops.testing): accumulation must happen in float32."""
    x, kernel = make_inputs(2, 8, 7, 6, 2, 5, 1, 2, 1, dtype=dtype)
    gy = torch.randn(2, 8, 7, 6, dtype=torch.float64).to(dtype)
    gate = torch.rand(2, 8, dtype=torch.float32) + 0.25 if gated else None
    xr, kr = x.clone().requires_grad_(True), kernel.clone().requires_grad_(True)
    gr = gate.clone().requires_grad_(True) if gated else None
    out = involution2d(xr, kr, backend="torch", gate=gr)
    assert out.dtype == dtype
    grads = torch.autograd.grad(out, (xr, kr, gr) if gated else (xr, kr), gy)
    results = {"y": out, "grad_x": grads[0], "grad_kernel": grads[1]}
    if gated:
        results["grad_gate"] = grads[2]
    refs = testing.reference(x, kernel, 1, 2, 1, gate=gate, grad_out=gy)
    testing.check_all(results, refs, dtype, x.shape, kernel.shape, gated)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rounding_tolerance_rejects_half_precision_accumulation(dtype):
    """The tolerance above has teeth: the same sum accumulated in the half type itself fails it."""
    x, kernel = make_inputs(2, 8, 9, 11, 2, 7, 1, 3, 1, dtype=dtype)
    xp = F.pad(x, (3, 3, 3, 3))
    kc = kernel.repeat_interleave(4, dim=1)
    acc = torch.zeros(2, 8, 9, 11, dtype=dtype)
    for i in range(7):
        for j in range(7):
            acc = acc + xp[:, :, i:i + 9, j:j + 11] * kc[:, :, i, j]  # rounded to the half type at every step
    ref, mag = testing.reference(x, kernel, 1, 3, 1)["y"]
    with pytest.raises(AssertionError, match="float64 reference"):
        testing.assert_rounded_close("y", acc, ref, mag, dtype, 49)
    testing.assert_rounded_close("y", involution2d(x, kernel, backend="torch"), ref, mag, dtype, 49)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_exportable_forward_accumulates_half_types_in_float32(dtype):
    """`involution_forward_out_of_place` (what ONNX and TorchScript exports trace) keeps the input's dtype and
    accumulates in float32 like the in-place forward: within the rounding tolerance that fails half-precision
    accumulation (the test above)."""
    x, kernel = make_inputs(2, 8, 9, 11, 2, 7, 1, 3, 1, dtype=dtype)
    out = torch_backend.involution_forward_out_of_place(x, kernel, 1, 3, 1)
    assert out.dtype == dtype
    ref, mag = testing.reference(x, kernel, 1, 3, 1)["y"]
    testing.assert_rounded_close("y", out, ref, mag, dtype, 49)


def test_backward_gives_every_gradient_unless_told_otherwise():
    """`involution_backward`'s defaults: the input, kernel and gate gradients are all computed, each as the
    separate gradient functions give it."""
    x, kernel = make_inputs(2, 8, 6, 6, 2, 3, 1, 1, 1)
    gate = torch.rand(2, 8, dtype=torch.float64)
    gy = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    gx, gk, gg = torch_backend.involution_backward(gy, x, kernel, 1, 1, 1, gate)
    torch.testing.assert_close(gx, torch_backend.involution_grad_input(gy, kernel, (6, 6), 1, 1, 1, gate))
    torch.testing.assert_close(gk, torch_backend.involution_grad_kernel(gy, x, 2, 3, 1, 1, 1, gate))
    assert gg is not None and gg.shape == (2, 8)
    assert torch_backend.involution_backward(gy, x, kernel, 1, 1, 1, gate, need_input=False, need_kernel=False,
                                             need_gate=False) == (None, None, None)


def test_half_precision_gradients_come_back_in_the_inputs_dtype():
    """Called directly (they are the torch backend's public functions), the gradient functions return the
    input's dtype, not their float32 accumulators; the gate's gradient stays float32, as documented."""
    x, kernel = make_inputs(1, 4, 5, 5, 1, 3, 1, 1, 1, dtype=torch.bfloat16)
    gy, gate = torch.randn(1, 4, 5, 5).to(torch.bfloat16), torch.rand(1, 4)
    assert torch_backend.involution_grad_input(gy, kernel, (5, 5), 1, 1, 1, gate).dtype == torch.bfloat16
    assert torch_backend.involution_grad_kernel(gy, x, 1, 3, 1, 1, 1, gate).dtype == torch.bfloat16
    gx, gk, gg = torch_backend.involution_backward(gy, x, kernel, 1, 1, 1, gate)
    assert (gx.dtype, gk.dtype, gg.dtype) == (torch.bfloat16, torch.bfloat16, torch.float32)


def test_mixed_dtypes_are_promoted():
    x, kernel = make_inputs(1, 4, 5, 5, 1, 3, 1, 1, 1)
    out = involution2d(x.float(), kernel.to(torch.bfloat16))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference_involution(x, kernel.to(torch.bfloat16).double(), 1, 1, 1),
                               rtol=1e-5, atol=1e-5)


def test_cpu_autocast_runs():
    m = Involution2d(16, 3, group_channels=8).eval()
    x = torch.randn(1, 16, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.shape == x.shape and torch.isfinite(y.float()).all()


# ------------------------------------------------------------------------------------------------ modules


@pytest.mark.parametrize("cls", [Involution2d, Cvolution2d])
@pytest.mark.parametrize("stride", [1, 2])
def test_module_shapes_and_attributes(cls, stride):
    m = cls(32, kernel_size=5, stride=stride, group_channels=8, reduction_ratio=4)
    x = torch.randn(2, 32, 12, 8)
    kernel = m.generate_kernel(x)
    assert kernel.shape == (2, 4, 5, 5, 12 // stride, 8 // stride)
    y = m(x)
    assert y.shape == (2, 32, 12 // stride, 8 // stride)
    assert (m.channels, m.kernel_size, m.stride, m.dilation, m.groups) == (32, 5, stride, 1, 4)
    y.sum().backward()
    assert all(p.grad is not None for p in m.parameters())


def test_involution_module_matches_functional_reference():
    m = Involution2d(16, 3, stride=2, group_channels=4, reduction_ratio=2).double().eval()
    x = torch.randn(2, 16, 8, 6, dtype=torch.float64)
    kernel = m.generate_kernel(x)
    torch.testing.assert_close(m(x), reference_involution(x, kernel, 2, 1, 1))


def test_cvolution_gate_and_kernel_from_ungated_input():
    m = Cvolution2d(16, 3, group_channels=4, reduction_ratio=2, channel_groups=4).double().eval()
    x = torch.randn(2, 16, 6, 7, dtype=torch.float64)
    gate = m.channel_gate(x)
    assert gate.shape == (2, 16, 1, 1) and bool(((gate > 0) & (gate < 1)).all())
    expected = reference_involution(x * gate, m.generate_kernel(x), 1, 1, 1)
    torch.testing.assert_close(m(x), expected)


def test_fused_gate_equals_gating_the_input():
    """involution2d(x, kernel, gate=g) == involution2d(x * g, kernel), value and every gradient (float64)."""
    x, kernel = make_inputs(2, 8, 7, 9, 2, 3, 2, 1, 1)
    gate = torch.rand(2, 8, 1, 1, dtype=torch.float64)
    args = [t.clone().requires_grad_(True) for t in (x, kernel, gate)]
    fused = involution2d(args[0], args[1], 2, gate=args[2], backend="torch")
    ref_args = [t.clone().requires_grad_(True) for t in (x, kernel, gate)]
    ref = reference_involution(ref_args[0] * ref_args[2], ref_args[1], 2, 1, 1)
    torch.testing.assert_close(fused, ref)
    gy = torch.randn_like(fused)
    for a, r in zip(torch.autograd.grad(fused, args, gy), torch.autograd.grad(ref, ref_args, gy)):
        torch.testing.assert_close(a, r)
    assert torch.autograd.gradcheck(lambda a, b, c: involution2d(a, b, 2, gate=c), tuple(args))


def test_backward_with_one_input_requiring_grad():
    x, kernel = make_inputs(2, 8, 6, 5, 2, 3, 1, 1, 1)
    gate = torch.rand(2, 8, dtype=torch.float64)
    ref_x, ref_k, ref_g = (t.clone().requires_grad_(True) for t in (x, kernel, gate))
    expected = torch.autograd.grad(involution2d(ref_x, ref_k, gate=ref_g).sum(), (ref_x, ref_k, ref_g))
    for i, name in enumerate(("x", "kernel", "gate")):
        args = [x, kernel, gate]
        args[i] = args[i].clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(involution2d(args[0], args[1], gate=args[2]).sum(), args[i])
        torch.testing.assert_close(grad, expected[i], msg=name)


def test_parameter_layout_matches_published_rednet():
    m = Involution2d(64, 7, stride=1)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "reduce.weight": (16, 64, 1, 1),
        "bn.weight": (16,), "bn.bias": (16,), "bn.running_mean": (16,), "bn.running_var": (16,),
        "bn.num_batches_tracked": (),
        "span.weight": (7 * 7 * 4, 16, 1, 1), "span.bias": (7 * 7 * 4,),
    }
    assert set(m.mmcls_key_map.values()) == set(shapes)
    # Published RedNet stage-1 involution (C=64, K=7, G=4, r=4): 1024 + 32 + 3136 + 196 parameters.
    assert sum(p.numel() for p in m.parameters()) == 1024 + 32 + 3136 + 196
    c = Cvolution2d(64, 7, channel_groups=16)
    assert sum(p.numel() for p in c.parameters()) == 1024 + 32 + 3136 + 196 + 64 * 4 * 9
    assert c.channel_conv.bias is None and c.channel_conv.padding == (1, 1)


@pytest.mark.parametrize("kwargs,needle", [
    ({"channels": 30, "group_channels": 16}, "group_channels=16"),
    ({"channels": 32, "channel_groups": 5}, "channel_groups=5"),
    ({"channels": 8, "group_channels": 8, "reduction_ratio": 16}, "reduction_ratio=16"),
    ({"channels": 32, "kernel_size": 4}, "kernel_size=4"),
    ({"channels": 32, "kernel_size": 0}, "kernel_size=0"),
    ({"channels": 32, "stride": 0}, "stride=0"),
    ({"channels": 32, "dilation": -1}, "dilation=-1"),
    ({"channels": 0}, "channels=0"),
])
def test_bad_hyperparameters(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        Cvolution2d(**kwargs)
    if "channel_groups" not in kwargs:
        with pytest.raises(ValueError, match=needle):
            Involution2d(**kwargs)


def test_bad_module_inputs():
    m = Involution2d(32, 3, group_channels=8)
    with pytest.raises(ValueError, match=r"4-D.*\(32, 8\)"):
        m(torch.randn(32, 8))
    with pytest.raises(ValueError, match="channels=32.*16 channels"):
        m(torch.randn(1, 16, 8, 8))
    s2 = Involution2d(32, 3, stride=2, group_channels=8)
    assert s2(torch.randn(1, 32, 7, 9)).shape == (1, 32, 4, 5)  # odd sizes: ceil(H / stride), like a conv
    with pytest.raises(TypeError, match="kernel_size"):
        Involution2d(32, kernel_size=3.0)


def test_bad_functional_inputs():
    x, kernel = make_inputs(2, 8, 6, 5, 2, 3, 1, 1, 1, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"x must be 4-D.*\(8, 6, 5\)"):
        involution2d(x[0], kernel)
    with pytest.raises(ValueError, match=r"kernel must be 6-D"):
        involution2d(x, kernel[0])
    with pytest.raises(ValueError, match=r"kernel spatial size 6x5 does not match the output size 3x3"):
        involution2d(x, kernel, stride=2)
    with pytest.raises(ValueError, match="C=8 must be divisible by the kernel groups G=3"):
        involution2d(x, torch.randn(2, 3, 3, 3, 6, 5))
    with pytest.raises(ValueError, match="kernel batch 1 does not match x batch 2"):
        involution2d(x, kernel[:1])
    with pytest.raises(ValueError, match="square"):
        involution2d(x, torch.randn(2, 2, 3, 5, 6, 5))
    with pytest.raises(TypeError, match="unsupported dtype torch.int64"):
        involution2d(x.long(), kernel)
    with pytest.raises(TypeError, match="unsupported dtype torch.complex64"):
        involution2d(x, kernel.to(torch.complex64))
    with pytest.raises(ValueError, match="backend=.*'triton'"):
        involution2d(x, kernel, backend="triton")
    with pytest.raises(ValueError, match="backend='cupy' needs CUDA tensors"):
        involution2d(x, kernel, backend="cupy")
    with pytest.raises(ValueError, match="stride must be >= 1, got stride=0"):
        involution2d(x, kernel, stride=0)
    with pytest.raises(ValueError, match="padding must be >= 0, got padding=-1"):
        involution2d(x, kernel, padding=-1)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        involution2d(x.numpy(), kernel)
    with pytest.raises(ValueError, match=r"gate must have shape \(B, C\) = \(2, 8\).*\(2, 4\)"):
        involution2d(x, kernel, gate=torch.rand(2, 4))
    with pytest.raises(TypeError, match="gate has unsupported dtype torch.int64"):
        involution2d(x, kernel, gate=torch.ones(2, 8, dtype=torch.int64))
    with pytest.raises(TypeError, match="gate must be a torch.Tensor or None, got list"):
        involution2d(x, kernel, gate=[1.0])


def test_functional_argument_checks_name_the_argument_and_value():
    """Each check of `involution2d`, its exact message, and the boundary values it still accepts."""
    x, kernel = make_inputs(2, 8, 6, 5, 2, 3, 1, 1, 1, dtype=torch.float32)
    cases = [
        (TypeError, "x must be a torch.Tensor, got ndarray", dict(x=x.numpy())),
        (TypeError, "kernel must be a torch.Tensor, got list", dict(kernel=[1.0])),
        (ValueError, "x and kernel must be on the same device, got x on cpu, kernel on meta",
         dict(kernel=kernel.to("meta"))),
        (TypeError, "stride must be an int, got True (bool)", dict(stride=True)),
        (TypeError, "dilation must be an int, got 1.0 (float)", dict(dilation=1.0)),
        (ValueError, "dilation must be >= 1, got dilation=0", dict(dilation=0)),
        (ValueError, "kernel size must be >= 1, got kernel.shape=(2, 2, 0, 0, 6, 5)",
         dict(kernel=torch.randn(2, 2, 0, 0, 6, 5))),
        (ValueError, "x channels C=8 must be divisible by the kernel groups G=0 (kernel.shape=(2, 0, 3, 3, 6, 5))",
         dict(kernel=torch.randn(2, 0, 3, 3, 6, 5))),
        (ValueError, "input 6x5 is too small for kernel size 7, dilation 1, padding 0",
         dict(kernel=torch.randn(2, 2, 7, 7, 1, 1), padding=0)),
        (ValueError, "input 6x2 is too small for kernel size 3, dilation 1, padding 0",
         dict(x=x[..., :2], kernel=torch.randn(2, 2, 3, 3, 4, 1), padding=0)),
        (TypeError, "kernel has unsupported dtype torch.int32; supported: torch.float16, torch.bfloat16, "
         "torch.float32, torch.float64", dict(kernel=kernel.int())),
        (ValueError, "backend='cupy' needs CUDA tensors, got x on device 'cpu'", dict(backend="cupy")),
        (ValueError, "gate must be on the device of x (cpu), got meta", dict(gate=torch.ones(2, 8, device="meta"))),
        (TypeError, "gate has unsupported dtype torch.int64; supported: torch.float16, torch.bfloat16, "
         "torch.float32, torch.float64", dict(gate=torch.ones(2, 8, dtype=torch.int64))),
    ]
    for error, message, kwargs in cases:
        args = {"x": x, "kernel": kernel, **kwargs}
        with pytest.raises(error) as info:
            involution2d(**args)
        assert str(info.value) == message
    # the boundaries themselves are accepted: K=1, padding=0, stride=dilation=1, a (B, C, 1, 1) gate, 1-pixel output
    k1 = torch.randn(2, 2, 1, 1, 6, 5)
    assert involution2d(x, k1, stride=1, padding=0, dilation=1, gate=torch.ones(2, 8, 1, 1)).shape == x.shape
    assert involution2d(x[..., :3], torch.randn(2, 2, 3, 3, 4, 1), padding=0).shape == (2, 8, 4, 1)
    assert involution2d(x[..., :3, :], torch.randn(2, 2, 3, 3, 1, 3), padding=0).shape == (2, 8, 1, 3)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_jit_trace_of_the_decomposed_operator():
    """Under torch.jit.trace (TorchScript export) the default padding is read from the traced kernel shape."""
    x, kernel = make_inputs(1, 4, 5, 6, 2, 3, 1, 1, 1)
    with ops_functional.decomposed():
        traced = torch.jit.trace(lambda a, b: involution2d(a, b), (x, kernel))
    torch.testing.assert_close(traced(x, kernel), reference_involution(x, kernel, 1, 1, 1))


def test_gate_is_applied_in_the_accumulation_dtype():
    """float64 inputs keep a float64 gate; every other dtype accumulates (and gates) in float32."""
    gate = torch.rand(2, 8, 1, 1, dtype=torch.float16)
    for dtype, acc in [(torch.float64, torch.float64), (torch.float32, torch.float32),
                       (torch.float16, torch.float32), (torch.bfloat16, torch.float32)]:
        checked = ops_functional._check_gate(gate, torch.zeros(2, 8, 3, 3, dtype=dtype))
        assert checked.dtype == acc and checked.shape == (2, 8)


def test_mixed_dtypes_cast_both_operands():
    x, kernel = make_inputs(1, 4, 5, 5, 1, 3, 1, 1, 1)
    for xd, kd in [(torch.float16, torch.float64), (torch.float64, torch.float16)]:
        a, b = x.to(xd), kernel.to(kd)
        out = involution2d(a, b)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, reference_involution(a.double(), b.double(), 1, 1, 1))


def test_decomposed_equals_the_custom_op():
    """`decomposed()` (for exporters) passes every argument through: stride, padding, dilation and gate."""
    x, kernel = make_inputs(2, 8, 9, 8, 2, 3, 2, 3, 2)
    gate = torch.rand(2, 8, dtype=torch.float64)
    expected = involution2d(x, kernel, 2, 3, 2, gate=gate)
    with ops_functional.decomposed():
        torch.testing.assert_close(involution2d(x, kernel, 2, 3, 2, gate=gate), expected)
    assert ops_functional._decomposed_depth == 0


def test_mixed_dtypes_promote_on_cpu_even_with_cuda_autocast_on():
    """Only CUDA tensors take the CUDA autocast dtype; CPU tensors still promote."""
    x, kernel = make_inputs(1, 4, 5, 5, 1, 3, 1, 1, 1)
    torch.set_autocast_enabled("cuda", True)
    try:
        assert involution2d(x.float(), kernel).dtype == torch.float64
    finally:
        torch.set_autocast_enabled("cuda", False)


# ------------------------------------------------------------------------------------------------ backends


def test_auto_backend_never_warns_for_cpu_tensors():
    x, kernel = make_inputs(1, 4, 5, 5, 1, 3, 1, 1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        involution2d(x, kernel, backend="auto")
        Involution2d(16, 3, group_channels=8)(torch.randn(1, 16, 4, 4))
    assert ops_functional.resolve_backend("auto", torch.device("cpu")) == "torch"


def test_resolve_backend_choice(monkeypatch):
    """'torch' always wins; 'cupy' needs a CuPy device type; 'auto' takes CuPy where it works."""
    from workloads.ops import cupy_backend

    with pytest.raises(ValueError) as err:
        ops_functional.resolve_backend("cupy", torch.device("meta"))
    assert str(err.value) == "backend='cupy' needs CUDA tensors, got a tensor on device 'meta'"
    monkeypatch.setattr(ops_functional, "CUPY_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(cupy_backend, "cupy_status", lambda: (True, ""))
    cpu = torch.device("cpu")
    assert [ops_functional.resolve_backend(b, cpu) for b in ("torch", "cupy", "auto")] == ["torch", "cupy", "cupy"]
    # a shape the CUDA kernels cannot run: 'cupy' refuses it, 'auto' warns once and runs the torch backend
    x = torch.zeros(1, 1, 1, 1)
    monkeypatch.setattr(cupy_backend, "supports", lambda k, stride, dilation, dtype: (k, stride, dilation, dtype) != (9, 2, 3, torch.float32))
    monkeypatch.setattr(ops_functional, "_auto_warned", False)
    assert ops_functional._backend_module("cupy", x, 9, 2, 1) is cupy_backend
    assert ops_functional._backend_module("torch", x, 9, 2, 3) is torch_backend
    message = ("the CUDA kernels cannot run K=9, stride=2, dilation=3 in torch.float32 (the input tile does not fit "
               "in shared memory)")
    with pytest.raises(ValueError) as err:
        ops_functional._backend_module("cupy", x, 9, 2, 3)
    assert str(err.value) == message
    with pytest.warns(RuntimeWarning) as record:
        assert ops_functional._backend_module("auto", x, 9, 2, 3) is torch_backend
    assert str(record[0].message) == ("involution2d backend='auto': using the pure-PyTorch path on CUDA because "
                                      f"the CuPy backend is unusable ({message})")


class _BrokenCupy:
    """Stands in for a CuPy whose every use fails, like cupy-cuda12x on a machine without a driver."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise RuntimeError("CUDARuntimeError: cudaErrorInsufficientDriver (test)")

    def __repr__(self):
        return "broken-cupy"


@pytest.mark.parametrize("cupy_module,reason", [(None, "CuPy is not installed"),
                                                (_BrokenCupy(), "cudaErrorInsufficientDriver")])
def test_auto_fallback_runs_forward_and_backward_with_one_warning(monkeypatch, cupy_module, reason):
    """The 'auto' path for a device the CuPy kernels would serve, with CuPy made unusable for real (not
    installed, or failing on first use): the real probe runs, one RuntimeWarning names the reason, and forward
    and backward (gate included) go through the torch backend with identical results. Here the device-type gate
    is pointed at 'cpu', the only device CI has; tests/test_ops_gpu.py does the same on CUDA tensors."""
    import sys

    from workloads.ops import cupy_backend

    monkeypatch.setitem(sys.modules, "cupy", cupy_module)
    monkeypatch.setattr(cupy_backend, "_status", None)
    monkeypatch.setattr(ops_functional, "_auto_warned", False)
    monkeypatch.setattr(ops_functional, "CUPY_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(cupy_backend.torch.cuda, "is_available", lambda: True)  # the probe gets to CuPy itself
    x, kernel = make_inputs(2, 8, 7, 6, 2, 3, 2, 1, 1)
    gate = torch.rand(2, 8, dtype=torch.float64)
    inputs = [t.clone().requires_grad_(True) for t in (x, kernel, gate)]
    with pytest.warns(RuntimeWarning, match=f"backend='auto'.*{reason}"):
        out = involution2d(inputs[0], inputs[1], 2, gate=inputs[2], backend="auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process: the backward and later calls stay silent
        grads = torch.autograd.grad(out.square().sum(), inputs)
        involution2d(x, kernel, 2, backend="auto")
    assert cupy_backend.cupy_status()[0] is False and reason in cupy_backend.cupy_status()[1]
    ref_inputs = [t.clone().requires_grad_(True) for t in (x, kernel, gate)]
    ref = involution2d(ref_inputs[0], ref_inputs[1], 2, gate=ref_inputs[2], backend="torch")
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for a, r in zip(grads, torch.autograd.grad(ref.square().sum(), ref_inputs)):
        torch.testing.assert_close(a, r, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=f"backend='cupy' is unusable: .*{reason}"):
        ops_functional.resolve_backend("cupy", torch.device("cpu"))


def test_real_cupy_status_reports_a_reason():
    from workloads.ops import cupy_backend

    ok, reason = cupy_backend.cupy_status()
    if not torch.cuda.is_available():
        assert not ok
    if not ok:
        assert reason and isinstance(reason, str)


# ------------------------------------------------------------------------------------------------ compile


class _TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inv = Involution2d(16, 3, stride=1, group_channels=8, reduction_ratio=4)
        self.cvo = Cvolution2d(16, 3, stride=2, group_channels=8, reduction_ratio=4, channel_groups=4)

    def forward(self, x):
        return self.cvo(torch.relu(self.inv(x)))


def _check_compiled(backend):
    torch.manual_seed(0)
    model = _TinyNet()
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    ref = model(x)
    ref.sum().backward()
    ref_grads = [x.grad.clone()] + [p.grad.clone() for p in model.parameters()]
    x.grad = None
    model.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, r in zip([x.grad] + [p.grad for p in model.parameters()], ref_grads):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


def test_torch_compile_fullgraph_aot_eager():
    """Dynamo + AOTAutograd (fake impls, register_autograd) with fullgraph=True: no graph breaks."""
    _check_compiled("aot_eager")


@pytest.mark.slow
def test_torch_compile_fullgraph_inductor():
    """The full inductor pipeline (generates and compiles C++; ~70 s on 2 shared cores)."""
    _check_compiled("inductor")


def test_custom_op_opcheck():
    """torch.library.opcheck: schema, fake impl and autograd registration are consistent."""
    x, kernel = make_inputs(1, 4, 5, 6, 2, 3, 2, 1, 1)
    gate = torch.rand(1, 4, dtype=torch.float64, requires_grad=True)
    x.requires_grad_(True)
    kernel.requires_grad_(True)
    op = torch.ops.cvlab.involution2d.default
    torch.library.opcheck(op, (x, kernel, 2, 1, 1, "torch"))
    torch.library.opcheck(op, (x, kernel, 2, 1, 1, "torch", gate))
    gy = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    back = torch.ops.cvlab.involution2d_backward.default
    for mask in ([True, True, True], [True, False, False], [False, True, True]):
        torch.library.opcheck(back, (gy, x.detach(), kernel.detach(), gate.detach(), 2, 1, 1, "torch", mask))
    torch.library.opcheck(back, (gy, x.detach(), kernel.detach(), None, 2, 1, 1, "torch", [True, True, False]))


def test_inplace_op_after_the_operator_is_allowed():
    """The op's output is a fresh tensor, not a view, so in-place ops after it work under autograd."""
    m = Involution2d(16, kernel_size=3, group_channels=8)
    x = torch.randn(2, 16, 5, 6, requires_grad=True)
    y = torch.relu_(m(x))
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
