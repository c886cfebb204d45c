"""GPU tests of workloads.ops: the CuPy kernels against float64 within the dtype's rounding, and everything that
only a device can show (streams, CUDA graphs, autocast, inductor, 64-bit indexing, the fallback on CUDA tensors).

All marked `gpu`: skipped without CUDA (conftest), run by `python -m benchmarks.gpu_check` on a lent GPU. Tests of the
cupy backend skip, with CuPy's own reason, when CuPy cannot compile/run kernels on this machine (the gpu_check
report lists those skips).

Accuracy: `workloads.ops.testing` computes the float64 result from the same rounded inputs (unfold + autograd) and
the magnitude of each element's sum; an element passes when its error is within one ulp of the dtype plus the
float32 (float64) accumulation error bound. A kernel that accumulated in half precision would fail.
"""
from __future__ import annotations

import sys
import warnings

import pytest
import torch

from benchmarks.bandwidth import REDNET50_LAYERS
from workloads.ops import Cvolution2d, Involution2d, cupy_backend, involution2d, testing, torch_backend
from workloads.ops import functional as ops_functional

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
ACC = {torch.float32: torch.float32, torch.bfloat16: torch.float32, torch.float16: torch.float32,
       torch.float64: torch.float64}


@pytest.fixture(scope="module")
def cupy_ok():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    ok, reason = cupy_backend.cupy_status()
    if not ok:
        pytest.skip(f"CuPy backend unusable here: {reason}")


@pytest.fixture
def backward_mode(monkeypatch):
    def set_mode(mode):
        monkeypatch.setenv("CVLAB_INVOLUTION_BACKWARD", mode)
    return set_mode


def _inputs(b, c, h, w, g, k, stride, padding, dilation, dtype, seed=0, gated=False):
    gen = torch.Generator().manual_seed(seed)
    ho, wo = torch_backend.output_size(h, w, k, stride, padding, dilation)
    x = torch.randn(b, c, h, w, generator=gen, dtype=torch.float64).to(dtype).cuda()
    kernel = torch.randn(b, g, k, k, ho, wo, generator=gen, dtype=torch.float64).to(dtype).cuda()
    gy = torch.randn(b, c, ho, wo, generator=gen, dtype=torch.float64).to(dtype).cuda()
    gate = (torch.rand(b, c, generator=gen, dtype=torch.float64) + 0.25).to(ACC[dtype]).cuda() if gated else None
    return x, kernel, gy, gate


def _check_against_float64(x, kernel, gy, gate, stride, padding, dilation):
    """Forward and every gradient through the public operator (backend='cupy') vs float64, within rounding."""
    leaves = [t.clone().requires_grad_(True) for t in (x, kernel)] + (
        [gate.clone().requires_grad_(True)] if gate is not None else [])
    out = involution2d(leaves[0], leaves[1], stride, padding, dilation, backend="cupy",
                       gate=leaves[2] if gate is not None else None)
    assert out.dtype == x.dtype and out.is_contiguous()
    grads = torch.autograd.grad(out, leaves, gy)
    results = {"y": out, "grad_x": grads[0], "grad_kernel": grads[1]}
    if gate is not None:
        results["grad_gate"] = grads[2]
    refs = testing.reference(x, kernel, stride, padding, dilation, gate=gate, grad_out=gy)
    testing.check_all(results, refs, x.dtype, x.shape, kernel.shape, gate is not None)


CONFIGS = [  # (B, C, H, W, G, K, stride, dilation, padding or None, dtypes)
    (2, 32, 15, 22, 2, 7, 1, 1, None, DTYPES),          # RedNet stage layer, odd sizes
    (3, 32, 14, 9, 2, 7, 2, 1, None, DTYPES),           # strided (down-sampling) layer
    (2, 32, 28, 28, 2, 3, 1, 1, None, DTYPES),          # stem-like K=3: vector width 4
    (1, 64, 13, 13, 4, 5, 2, 2, None, DTYPES[:2]),      # K=5 stride 2 dilation 2
    (2, 8, 11, 17, 1, 1, 1, 1, None, DTYPES[:2]),       # K=1
    (2, 16, 7, 7, 1, 7, 1, 1, None, DTYPES[:2]),        # input no larger than the kernel span
    (2, 16, 12, 10, 2, 3, 1, 2, None, DTYPES[:2]),      # dilation with stride 1
    (2, 16, 9, 11, 2, 7, 1, 2, None, DTYPES[:2]),       # K=7 dilation 2, stride 1
    (2, 16, 6, 5, 2, 3, 1, 1, 3, DTYPES[:2]),           # padding larger than "same"
    (2, 12, 10, 7, 3, 3, 2, 1, 0, DTYPES[:2]),          # no padding, stride 2
]
CASES = [(cfg[:-1], dtype, gated, mode) for cfg in CONFIGS for dtype in cfg[-1] for gated in (False, True)
         for mode in (("split", "fused") if cfg[6] == 1 else ("split",))]


@pytest.mark.parametrize("cfg,dtype,gated,mode", CASES,
                         ids=[f"{c}-{str(d)[6:]}-{'gated' if g else 'plain'}-{m}" for c, d, g, m in CASES])
def test_cupy_matches_float64_within_rounding(cupy_ok, backward_mode, cfg, dtype, gated, mode):
    b, c, h, w, g, k, s, d, p = cfg
    p = d * (k - 1) // 2 if p is None else p
    backward_mode(mode)
    x, kernel, gy, gate = _inputs(b, c, h, w, g, k, s, p, d, dtype, gated=gated)
    _check_against_float64(x, kernel, gy, gate, s, p, d)


@pytest.mark.parametrize("layer", REDNET50_LAYERS, ids=[s.name for s in REDNET50_LAYERS])
def test_rednet_layer_shapes_with_gradients_in_bf16(cupy_ok, layer):
    gated = layer.stride == 1  # the C-volution gate on half of them
    x, kernel, gy, gate = _inputs(2, layer.channels, layer.height, layer.width, layer.groups, layer.kernel_size,
                                  layer.stride, layer.kernel_size // 2, 1, torch.bfloat16, gated=gated)
    _check_against_float64(x, kernel, gy, gate, layer.stride, layer.kernel_size // 2, 1)


def test_cupy_gradcheck_float64(cupy_ok):
    x, kernel, _, gate = _inputs(2, 8, 7, 6, 2, 3, 2, 1, 1, torch.float64, gated=True)
    args = tuple(t.requires_grad_(True) for t in (x, kernel, gate))
    assert torch.autograd.gradcheck(lambda a, b, c: involution2d(a, b, 2, 1, 1, backend="cupy", gate=c), args)


def test_torch_backend_on_cuda_gradcheck():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    x, kernel, _, gate = _inputs(1, 4, 6, 5, 2, 3, 1, 1, 1, torch.float64, gated=True)
    args = tuple(t.requires_grad_(True) for t in (x, kernel, gate))
    assert torch.autograd.gradcheck(lambda a, b, c: involution2d(a, b, backend="torch", gate=c), args)


def test_nan_and_inf_propagate_like_the_torch_backend(cupy_ok, backward_mode):
    """A NaN input pixel and an infinite kernel tap (also at the border, where it meets the zero padding:
    0 * inf = nan) give NaN / inf in exactly the elements the zero-padded torch path gives them."""
    for mode in ("split", "fused"):
        backward_mode(mode)
        x, kernel, gy, _ = _inputs(2, 16, 9, 10, 2, 3, 1, 1, 1, torch.float32)
        x[0, 3, 4, 5] = float("nan")
        kernel[1, 1, 0, 0, 0, 0] = float("inf")     # top-left tap of the top-left pixel: reads padding
        kernel[1, 0, 1, 1, 5, 5] = float("-inf")    # centre tap inside the image
        gy[0, 2, 2, 2] = float("inf")
        results = []
        for backend in ("cupy", "torch"):
            xs, ks = x.clone().requires_grad_(True), kernel.clone().requires_grad_(True)
            out = involution2d(xs, ks, backend=backend)
            results.append((out, *torch.autograd.grad(out, (xs, ks), gy)))
        for got, want in zip(*results):
            assert torch.equal(torch.isnan(got), torch.isnan(want))
            assert torch.equal(torch.isinf(got), torch.isinf(want))
            finite = torch.isfinite(want)
            torch.testing.assert_close(got[finite], want[finite], rtol=1e-4, atol=1e-4)
        assert torch.isnan(results[0][0]).any() and torch.isinf(results[0][0]).any()


@pytest.mark.parametrize("layout", ["channels_last_x", "channels_last_kernel", "transposed", "sliced"])
def test_cupy_non_contiguous_inputs(cupy_ok, layout):
    x, kernel, gy, _ = _inputs(2, 16, 12, 12, 2, 3, 1, 1, 1, torch.float32)
    xv, kv, gyv = x, kernel, gy
    if layout == "channels_last_x":
        xv, gyv = x.to(memory_format=torch.channels_last), gy.to(memory_format=torch.channels_last)
    elif layout == "channels_last_kernel":  # how Involution2d's kernel looks under channels_last: a 6-D view
        flat = kernel.reshape(2, 2 * 9, 12, 12).to(memory_format=torch.channels_last)
        kv = flat.view(2, 2, 3, 3, 12, 12)
    elif layout == "transposed":
        xv = x.transpose(2, 3).contiguous().transpose(2, 3)
        kv = kernel.transpose(4, 5).contiguous().transpose(4, 5)
        gyv = gy.transpose(2, 3).contiguous().transpose(2, 3)
    else:  # every other channel of a twice-as-wide tensor
        big = torch.zeros(2, 32, 12, 12, device="cuda")
        big[:, ::2] = x
        xv = big[:, ::2]
    assert not (xv.is_contiguous() and kv.is_contiguous() and gyv.is_contiguous())
    xr, kr = xv.detach().requires_grad_(True), kv.detach().requires_grad_(True)
    out = involution2d(xr, kr, backend="cupy")
    gx, gk = torch.autograd.grad(out, (xr, kr), gyv)
    refs = testing.reference(x, kernel, 1, 1, 1, grad_out=gy)
    testing.check_all({"y": out, "grad_x": gx, "grad_kernel": gk}, refs, torch.float32, x.shape, kernel.shape, False)


def test_backward_with_only_one_input_requiring_grad(cupy_ok):
    x, kernel, gy, gate = _inputs(2, 16, 9, 8, 2, 3, 1, 1, 1, torch.float32, gated=True)
    refs = testing.reference(x, kernel, 1, 1, 1, gate=gate, grad_out=gy)
    names = ("grad_x", "grad_kernel", "grad_gate")
    for i, name in enumerate(names):
        args = [x, kernel, gate]
        args[i] = args[i].clone().requires_grad_(True)
        out = involution2d(args[0], args[1], backend="cupy", gate=args[2])
        (grad,) = torch.autograd.grad(out, args[i], gy)
        testing.check_all({name: grad}, refs, torch.float32, x.shape, kernel.shape, True)


def test_stream_order_cannot_pass_by_luck(cupy_ok):
    """The side stream first sleeps on the GPU, then produces the input: a kernel launched on any other stream
    would run before the input exists and read garbage."""
    x, kernel, _, _ = _inputs(4, 64, 56, 56, 4, 7, 1, 3, 1, torch.float32)
    expected = torch_backend.involution_forward(x, kernel, 1, 3, 1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time queued ahead of everything below
        x2 = x * 1.0
        out = involution2d(x2, kernel, backend="cupy")
        out2 = out + 0.0
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(out2, expected, rtol=1e-4, atol=1e-4)


def test_backward_on_a_non_default_stream(cupy_ok, backward_mode):
    for mode in ("split", "fused"):
        backward_mode(mode)
        x, kernel, gy, gate = _inputs(2, 32, 20, 18, 2, 3, 1, 1, 1, torch.float32, gated=True)
        refs = testing.reference(x, kernel, 1, 1, 1, gate=gate, grad_out=gy)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            torch.cuda._sleep(100_000_000)
            leaves = [(t * 1.0).requires_grad_(True) for t in (x, kernel, gate)]
            out = involution2d(leaves[0], leaves[1], backend="cupy", gate=leaves[2])
            grads = torch.autograd.grad(out, leaves, gy * 1.0)
            grads = [gr + 0.0 for gr in grads]
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        testing.check_all(dict(zip(("grad_x", "grad_kernel", "grad_gate"), grads)), refs, torch.float32,
                          x.shape, kernel.shape, True)


def test_cuda_graph_capture_after_warm_up(cupy_ok):
    torch.manual_seed(0)
    model = torch.nn.Sequential(Involution2d(32, 7), Cvolution2d(32, 3, stride=2)).cuda()
    for module in model:
        module.backend = "cupy"
    assert cupy_backend.warm_up(torch.float32, 7, 1, 1) > 0 and cupy_backend.warm_up(torch.float32, 3, 2, 1) > 0
    static_x = torch.randn(2, 32, 16, 16, device="cuda", requires_grad=True)
    side = torch.cuda.Stream()  # the usual eager warm-up iterations before capture (autograd, cuDNN, allocator)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            model(static_x).sum().backward()
    torch.cuda.current_stream().wait_stream(side)
    model.zero_grad(set_to_none=True)
    static_x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = model(static_x)
        static_y.sum().backward()
    fresh = torch.randn(2, 32, 16, 16, device="cuda")
    with torch.no_grad():
        static_x.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    ref_x = fresh.clone().requires_grad_(True)
    ref_y = model(ref_x)  # BN in train mode: the same batch statistics as the captured run
    (ref_gx,) = torch.autograd.grad(ref_y.sum(), ref_x)
    torch.testing.assert_close(static_y, ref_y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(static_x.grad, ref_gx, rtol=1e-4, atol=1e-4)


def test_auto_picks_cupy_without_warning(cupy_ok):
    assert ops_functional.resolve_backend("auto", torch.device("cuda", 0)) == "cupy"
    x, kernel, _, _ = _inputs(1, 8, 5, 5, 1, 3, 1, 1, 1, torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        involution2d(x, kernel)


def test_auto_falls_back_on_cuda_tensors_when_cupy_is_unusable(monkeypatch):
    """CuPy made unusable for real (import fails): 'auto' on CUDA tensors warns once, and forward and backward
    equal the torch backend."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    monkeypatch.setitem(sys.modules, "cupy", None)
    monkeypatch.setattr(cupy_backend, "_status", None)
    monkeypatch.setattr(ops_functional, "_auto_warned", False)
    x, kernel, gy, gate = _inputs(2, 16, 9, 8, 2, 3, 1, 1, 1, torch.float32, gated=True)
    leaves = [t.clone().requires_grad_(True) for t in (x, kernel, gate)]
    with pytest.warns(RuntimeWarning, match="CuPy is not installed"):
        out = involution2d(leaves[0], leaves[1], gate=leaves[2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grads = torch.autograd.grad(out, leaves, gy)
    ref_leaves = [t.clone().requires_grad_(True) for t in (x, kernel, gate)]
    ref = involution2d(ref_leaves[0], ref_leaves[1], gate=ref_leaves[2], backend="torch")
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for a, r in zip(grads, torch.autograd.grad(ref, ref_leaves, gy)):
        torch.testing.assert_close(a, r, rtol=0, atol=0)


@pytest.mark.parametrize("cls", [Involution2d, Cvolution2d])
def test_modules_under_autocast_run_half_natively(cupy_ok, cls):
    m = cls(64, 7, stride=2).cuda()
    x = torch.randn(2, 64, 28, 28, device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        y = m(x)
        assert y.dtype == torch.float16
    y.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())
    ref = m.float()(x)  # same weights in float32 (BN in train mode both times)
    torch.testing.assert_close(y.float(), ref, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("arch", ["rednet26", "cednet26"])
def test_bf16_autocast_through_a_whole_model(cupy_ok, arch):
    """A whole network under bf16 autocast and channels_last: the cupy backend gives the torch backend's loss and
    gradients (same bf16 arithmetic, different summation order)."""
    from workloads.models import build_model

    torch.manual_seed(0)
    model = build_model(arch, num_classes=10).cuda().to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 64, 64, device="cuda").to(memory_format=torch.channels_last)
    target = torch.randint(0, 10, (4,), device="cuda")
    losses, grads = [], []
    for backend in ("cupy", "torch"):
        for m in model.modules():
            if isinstance(m, Involution2d):
                m.backend = backend
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
        losses.append(loss.detach().float())
        grads.append(torch.cat([p.grad.flatten().float() for p in model.parameters()]))
    assert torch.isfinite(losses[0]) and torch.isfinite(grads[0]).all()
    torch.testing.assert_close(losses[0], losses[1], rtol=2e-2, atol=2e-2)
    cos = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    assert cos > 0.99, f"gradient direction differs between backends: cosine {cos:.4f}"


def test_compile_inductor_with_cupy_backend(cupy_ok):
    torch.manual_seed(0)
    m = torch.nn.Sequential(Involution2d(32, 7), torch.nn.ReLU(), Cvolution2d(32, 3, stride=2)).cuda()
    for module in m:
        if isinstance(module, Involution2d):
            module.backend = "cupy"
    x = torch.randn(2, 32, 16, 16, device="cuda", requires_grad=True)
    ref = m(x)
    (gref,) = torch.autograd.grad(ref.sum(), x)
    torch._dynamo.reset()
    out = torch.compile(m, fullgraph=True, backend="inductor")(x)
    (g,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(g, gref, rtol=1e-4, atol=1e-4)


def test_more_than_2_pow_31_elements(cupy_ok):
    """x and y have > 2**31 elements, so the 64-bit variants run; any 32-bit index would corrupt the last rows.
    Checked on slabs against the torch backend. About 23 GB of GPU memory in float16."""
    free, _ = torch.cuda.mem_get_info()
    if free < 30 * 2**30:
        pytest.skip(f"needs ~30 GiB free GPU memory, {free / 2**30:.1f} GiB free")
    b, c, h, w, g, k = 1, 8, 16384, 16400, 1, 3
    assert b * c * h * w > 2**31
    dtype = torch.float16
    x = torch.randn(b, c, h, w, device="cuda", dtype=dtype)
    kernel = torch.randn(b, g, k, k, h, w, device="cuda", dtype=dtype)
    gy = torch.randn(b, c, h, w, device="cuda", dtype=dtype)
    plan = cupy_backend.plan("forward", dtype, cupy_backend.Problem(b, c, h, w, g, k, h, w, 1, 1, 1))
    assert plan.index_bits == 64
    y = cupy_backend.involution_forward(x, kernel, 1, 1, 1)
    gx, gk, _ = cupy_backend.involution_backward(gy, x, kernel, 1, 1, 1, backward="split")
    torch.cuda.synchronize()
    rows = 8
    for start in (0, h - rows):
        sl = slice(start, start + rows)
        xs, ks, gys = x[:, :, sl].double(), kernel[..., sl, :].double(), gy[:, :, sl].double()
        # inside a slab, rows next to an interior cut see zero padding instead of the real neighbour
        keep = slice(0, rows - 1) if start == 0 else slice(1, rows)
        ry = torch_backend.involution_forward(xs, ks, 1, 1, 1)
        rgx = torch_backend.involution_grad_input(gys, ks, (rows, w), 1, 1, 1)
        rgk = torch_backend.involution_grad_kernel(gys, xs, g, k, 1, 1, 1)
        torch.testing.assert_close(y[:, :, sl][:, :, keep].double(), ry[:, :, keep], rtol=1e-2, atol=2e-2)
        torch.testing.assert_close(gx[:, :, sl][:, :, keep].double(), rgx[:, :, keep], rtol=1e-2, atol=2e-2)
        torch.testing.assert_close(gk[..., sl, :][..., keep, :].double(), rgk[..., keep, :], rtol=1e-2, atol=2e-2)


def test_compiled_functions_are_cached(cupy_ok):
    x, kernel, _, _ = _inputs(1, 8, 6, 6, 2, 3, 1, 1, 1, torch.float32)
    involution2d(x, kernel, backend="cupy")
    before = cupy_backend._function.cache_info()
    involution2d(x, kernel, backend="cupy")
    after = cupy_backend._function.cache_info()
    assert after.hits == before.hits + 1 and after.misses == before.misses


def test_cupy_compiles_the_model_instantiations_on_the_device(cupy_ok):
    """The launcher's own compile path (cupy.RawModule) for every variant of the configurations the models use."""
    for dtype in (torch.float32, torch.bfloat16):
        for k, s, d in [(7, 1, 1), (7, 2, 1), (3, 1, 1)]:
            assert cupy_backend.warm_up(dtype, k, s, d) == len(cupy_backend.instantiations(dtype, k, s, d, (32,)))
