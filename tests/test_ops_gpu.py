"""GPU tests of workloads.ops: the CuPy backend against the torch backend (forward and both gradients in
every dtype), gradcheck, memory layouts, streams, autocast, torch.compile and 64-bit indexing.

All marked `gpu` (skipped without CUDA). Tests of the cupy backend additionally skip, with CuPy's own reason,
when CuPy cannot compile/run kernels on this machine.

Tolerances (inputs ~ N(0, 1); outputs are sums of K*K = up to 49 products, gradients of kernels sums of C/G):
    float64  rtol 1e-10, atol 1e-10   (the same sums in a different order)
    float32  rtol 1e-4,  atol 1e-4
    float16  rtol 1e-2,  atol 2e-2    (one rounding of a float32 accumulator to 11 bits, |values| up to ~30)
    bfloat16 rtol 2e-2,  atol 1e-1    (8-bit mantissa)
The reference is the torch backend in float64 on the *same rounded* inputs, so only the kernel's own
accumulation and final rounding are measured.
"""
from __future__ import annotations

import itertools
import warnings

import pytest
import torch

from workloads.ops import Cvolution2d, Involution2d, cupy_backend, involution2d, torch_backend
from workloads.ops import functional as ops_functional

pytestmark = pytest.mark.gpu

TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 2e-2),
       torch.bfloat16: (2e-2, 1e-1)}
DTYPES = list(TOL)


@pytest.fixture(scope="module")
def cupy_ok():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    ok, reason = cupy_backend.cupy_status()
    if not ok:
        pytest.skip(f"CuPy backend unusable here: {reason}")


def _inputs(b, c, h, w, g, k, stride, padding, dilation, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    ho, wo = torch_backend.output_size(h, w, k, stride, padding, dilation)
    x = torch.randn(b, c, h, w, generator=gen, device="cuda", dtype=torch.float64).to(dtype)
    kernel = torch.randn(b, g, k, k, ho, wo, generator=gen, device="cuda", dtype=torch.float64).to(dtype)
    gy = torch.randn(b, c, ho, wo, generator=gen, device="cuda", dtype=torch.float64).to(dtype)
    return x, kernel, gy


CONFIGS = [  # (B, C, H, W, G, K, stride, dilation, padding or None)
    (2, 32, 15, 22, 2, 7, 1, 1, None),
    (3, 16, 14, 9, 4, 3, 2, 1, None),
    (1, 64, 13, 13, 4, 5, 2, 2, None),
    (2, 8, 11, 17, 1, 1, 1, 1, None),
    (2, 12, 10, 7, 3, 3, 3, 1, 0),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", CONFIGS)
def test_cupy_matches_torch_forward_and_gradients(cupy_ok, dtype, cfg):
    b, c, h, w, g, k, s, d, p = cfg
    p = d * (k - 1) // 2 if p is None else p
    x, kernel, gy = _inputs(b, c, h, w, g, k, s, p, d, dtype)
    xd, kd, gyd = x.double(), kernel.double(), gy.double()
    rtol, atol = TOL[dtype]
    xr, kr = x.clone().requires_grad_(True), kernel.clone().requires_grad_(True)
    out = involution2d(xr, kr, s, p, d, backend="cupy")
    assert out.dtype == dtype
    gx, gk = torch.autograd.grad(out, (xr, kr), gy)
    torch.testing.assert_close(out.double(), torch_backend.involution_forward(xd, kd, s, p, d), rtol=rtol, atol=atol)
    torch.testing.assert_close(gx.double(), torch_backend.involution_grad_input(gyd, kd, (h, w), s, p, d),
                               rtol=rtol, atol=atol)
    torch.testing.assert_close(gk.double(), torch_backend.involution_grad_kernel(gyd, xd, g, k, s, p, d),
                               rtol=rtol, atol=atol)


def test_cupy_gradcheck_float64(cupy_ok):
    x, kernel, _ = _inputs(2, 8, 7, 6, 2, 3, 2, 1, 1, torch.float64)
    x.requires_grad_(True)
    kernel.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: involution2d(a, b, 2, 1, 1, backend="cupy"), (x, kernel))


def test_torch_backend_on_cuda_gradcheck():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    x, kernel, _ = _inputs(1, 4, 6, 5, 2, 3, 1, 1, 1, torch.float64)
    x.requires_grad_(True)
    kernel.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: involution2d(a, b, backend="torch"), (x, kernel))


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced"])
def test_cupy_non_contiguous_inputs(cupy_ok, layout):
    x, kernel, gy = _inputs(2, 16, 12, 12, 2, 3, 1, 1, 1, torch.float32)
    if layout == "channels_last":
        xv, kv, gyv = x.to(memory_format=torch.channels_last), kernel, gy.to(memory_format=torch.channels_last)
    elif layout == "transposed":
        xv = x.transpose(2, 3).contiguous().transpose(2, 3)
        kv = kernel.transpose(4, 5).contiguous().transpose(4, 5)
        gyv = gy.transpose(2, 3).contiguous().transpose(2, 3)
    else:  # every other channel of a twice-as-wide tensor
        big = torch.zeros(2, 32, 12, 12, device="cuda")
        big[:, ::2] = x
        xv, kv, gyv = big[:, ::2], kernel, gy
    assert not xv.is_contiguous()
    xr, kr = xv.detach().requires_grad_(True), kv.detach().requires_grad_(True)
    out = involution2d(xr, kr, backend="cupy")
    gx, gk = torch.autograd.grad(out, (xr, kr), gyv)
    torch.testing.assert_close(out, torch_backend.involution_forward(x, kernel, 1, 1, 1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gx, torch_backend.involution_grad_input(gy, kernel, (12, 12), 1, 1, 1),
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gk, torch_backend.involution_grad_kernel(gy, x, 2, 3, 1, 1, 1), rtol=1e-4, atol=1e-4)


def test_cupy_runs_on_the_current_torch_stream(cupy_ok):
    x, kernel, _ = _inputs(4, 64, 56, 56, 4, 7, 1, 3, 1, torch.float32)
    expected = torch_backend.involution_forward(x, kernel, 1, 3, 1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        x2 = x * 1.0  # produced on the side stream; the kernel must be ordered after it
        out = involution2d(x2, kernel, backend="cupy")
        out2 = out + 0.0
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(out2, expected, rtol=1e-4, atol=1e-4)


def test_auto_picks_cupy_without_warning(cupy_ok):
    assert ops_functional.resolve_backend("auto", torch.device("cuda", 0)) == "cupy"
    x, kernel, _ = _inputs(1, 8, 5, 5, 1, 3, 1, 1, 1, torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        involution2d(x, kernel)


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


def test_compile_fullgraph_with_cupy_backend(cupy_ok):
    torch.manual_seed(0)
    m = torch.nn.Sequential(Involution2d(32, 7), Cvolution2d(32, 3, stride=2)).cuda()
    x = torch.randn(2, 32, 16, 16, device="cuda", requires_grad=True)
    ref = m(x)
    (gref,) = torch.autograd.grad(ref.sum(), x)
    torch._dynamo.reset()
    out = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
    (g,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(g, gref, rtol=1e-4, atol=1e-4)


def test_more_than_2_pow_31_elements(cupy_ok):
    """x and y have > 2**31 elements (forward / grad-input index spaces), and grad-kernel reads x at offsets
    > 2**31: any 32-bit index in the kernels corrupts the last rows. Checked on slabs against the torch
    backend. About 23 GB of GPU memory in float16."""
    free, _ = torch.cuda.mem_get_info()
    if free < 30 * 2**30:
        pytest.skip(f"needs ~30 GiB free GPU memory, {free / 2**30:.1f} GiB free")
    b, c, h, w, g, k = 1, 8, 16384, 16400, 1, 3
    assert b * c * h * w > 2**31
    dtype = torch.float16
    x = torch.randn(b, c, h, w, device="cuda", dtype=dtype)
    kernel = torch.randn(b, g, k, k, h, w, device="cuda", dtype=dtype)
    gy = torch.randn(b, c, h, w, device="cuda", dtype=dtype)
    y = cupy_backend.involution_forward(x, kernel, 1, 1, 1)
    gx = cupy_backend.involution_grad_input(gy, kernel, (h, w), 1, 1, 1)
    gk = cupy_backend.involution_grad_kernel(gy, x, g, k, 1, 1, 1)
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


def test_compiled_modules_are_cached(cupy_ok):
    x, kernel, _ = _inputs(1, 8, 6, 6, 2, 3, 1, 1, 1, torch.float32)
    involution2d(x, kernel, backend="cupy")
    before = cupy_backend._functions.cache_info()
    involution2d(x, kernel, backend="cupy")
    after = cupy_backend._functions.cache_info()
    assert after.hits == before.hits + 1 and after.misses == before.misses


def test_all_dtype_and_stride_instantiations_compile(cupy_ok):
    """NVRTC (not just nvcc) accepts every dtype for a few static configurations."""
    for dtype, (k, s, d) in itertools.product(DTYPES, [(7, 1, 1), (7, 2, 1), (3, 1, 2)]):
        fns = cupy_backend._functions(torch.cuda.current_device(), dtype, k, s, d, d * (k - 1) // 2)
        assert set(fns) == set(cupy_backend.KERNEL_NAMES)
