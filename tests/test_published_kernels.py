"""The published-design baseline kernels: NVRTC compile checks and a CPU emulation of their arithmetic.

Timings need a GPU; these tests check that the CUDA source compiles for every dtype with NVRTC (torch's libnvrtc,
the compiler CuPy uses: never skipped), within the register budget of its 1024-thread blocks, and that the
kernels compute the right thing (forward, grad-input, grad-kernel) by running the same source on the CPU
emulator (benchmarks/cuda_emulator.py).
"""
from __future__ import annotations

import itertools
import re

import pytest
import torch
import torch.nn.functional as F

from benchmarks import nvrtc
from benchmarks import published_kernels as pk


def naive_involution(x, w, stride, padding, dilation):
    """Reference: sum over taps of strided views of the zero-padded input (differentiable by autograd)."""
    b, c, _, _ = x.shape
    g, k, ho, wo = w.shape[1], w.shape[2], w.shape[4], w.shape[5]
    xp = F.pad(x, (padding,) * 4)
    wc = w.repeat_interleave(c // g, dim=1)  # (B, C, K, K, Ho, Wo)
    out = x.new_zeros(b, c, ho, wo)
    for i in range(k):
        for j in range(k):
            r, q = i * dilation, j * dilation
            patch = xp[:, :, r : r + stride * (ho - 1) + 1 : stride, q : q + stride * (wo - 1) + 1 : stride]
            out = out + wc[:, :, i, j] * patch
    return out


def _out_size(n, k, s, p, d):
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def _random_case(b, c, h, w, g, k, s, d, dtype, padding=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    p = d * (k - 1) // 2 if padding is None else padding
    ho, wo = _out_size(h, k, s, p, d), _out_size(w, k, s, p, d)
    x = torch.randn(b, c, h, w, generator=gen, dtype=dtype)
    ker = torch.randn(b, g, k, k, ho, wo, generator=gen, dtype=dtype)
    gy = torch.randn(b, c, ho, wo, generator=gen, dtype=dtype)
    return x, ker, gy, p


def _reference(x, ker, gy, s, p, d):
    xr, kr = x.double().requires_grad_(), ker.double().requires_grad_()
    out = naive_involution(xr, kr, s, p, d)
    gx, gk = torch.autograd.grad(out, (xr, kr), gy.double())
    return out.detach(), gx, gk


# ------------------------------------------------------------------------------------------------------
# Compilation of the CUDA source
# ------------------------------------------------------------------------------------------------------
def test_nvrtc_compiles_with_the_launcher_options():
    """The exact route CuPy takes on a GPU machine: NVRTC with name expressions, both option sets, for sm_90;
    1024-thread blocks need <= 64 registers per thread (64K registers per SM) and no spills."""
    source = pk.KERNEL_SOURCE.read_text()
    names = pk._name_expressions()
    option_sets = pk.nvrtc_option_sets()
    assert option_sets[-1] == ("-DINV_NO_FP_HEADERS",)
    assert len(option_sets) == 2, "the CUDA fp16/bf16 headers of torch's nvidia wheels were not found"
    for options in option_sets:
        prog = nvrtc.compile_program(source, names, (*nvrtc.CUPY_OPTIONS, *options, "--ptxas-options=-v"),
                                     "published_kernels.cu")
        assert len(set(prog.lowered.values())) == len(names), prog.lowered
        assert prog.lowered["involution_forward<float>"].startswith("_Z18involution_forwardIf")
        regs = [int(r) for r in re.findall(r"Used (\d+) registers", prog.log)]
        assert len(regs) == len(names) and max(regs) <= 64, prog.log
        assert not re.search(r"[1-9]\d* bytes spill stores", prog.log), prog.log


# ------------------------------------------------------------------------------------------------------
# CPU emulation of the kernels against the naive reference
# ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    return pk.build_cpu_emulator(tmp_path_factory.mktemp("pk_cpu"))


CASES = list(itertools.product([3, 5], [1, 2], [1, 2], [1, 2]))  # K, stride, dilation, G


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("k,s,d,g", CASES, ids=[f"K{k}-s{s}-d{d}-G{g}" for k, s, d, g in CASES])
def test_emulated_kernels_match_reference(emulator, dtype, k, s, d, g):
    x, ker, gy, p = _random_case(2, 4, 9, 13, g, k, s, d, dtype, seed=k * 100 + s * 10 + d + g)
    ref_y, ref_gx, ref_gk = _reference(x, ker, gy, s, p, d)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    y = emulator.forward(x, ker, s, None, d)
    gx = emulator.grad_input(gy, ker, x.shape, s, None, d)
    gk = emulator.grad_kernel(gy, x, ker.shape, s, None, d)
    for name, got, want in (("forward", y, ref_y), ("grad_input", gx, ref_gx), ("grad_kernel", gk, ref_gk)):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * 10, msg=name)


def test_emulated_kernels_explicit_padding_and_grid_stride(emulator):
    # padding 0 (output smaller than input) and a 1-block grid for n > 1024 (the grid-stride loop runs).
    x, ker, gy, _ = _random_case(2, 32, 10, 12, 4, 3, 1, 1, torch.float64, padding=0, seed=7)
    ref_y, ref_gx, ref_gk = _reference(x, ker, gy, 1, 0, 1)
    assert gy.numel() > pk.THREADS_PER_BLOCK and x.numel() > pk.THREADS_PER_BLOCK
    torch.testing.assert_close(emulator.forward(x, ker, 1, 0, 1, blocks=1), ref_y)
    torch.testing.assert_close(emulator.grad_input(gy, ker, x.shape, 1, 0, 1, blocks=1), ref_gx)
    torch.testing.assert_close(emulator.grad_kernel(gy, x, ker.shape, 1, 0, 1, blocks=1), ref_gk)


def test_emulator_rejects_half(emulator):
    x, ker, _, _ = _random_case(1, 2, 5, 5, 1, 3, 1, 1, torch.float32)
    with pytest.raises(ValueError, match="float32 and float64"):
        emulator.forward(x.half(), ker.half())


# ------------------------------------------------------------------------------------------------------
# The unfold baseline and argument checking
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k,s,d,g", [(3, 1, 1, 1), (5, 2, 1, 2), (3, 2, 2, 2), (7, 1, 1, 4)])
def test_unfold_matches_reference(k, s, d, g):
    x, ker, gy, p = _random_case(2, 8, 11, 14, g, k, s, d, torch.float64, seed=3)
    ref_y, ref_gx, ref_gk = _reference(x, ker, gy, s, p, d)
    xr, kr = x.clone().requires_grad_(), ker.clone().requires_grad_()
    y = pk.involution2d_unfold(xr, kr, s, None, d)
    gx, gk = torch.autograd.grad(y, (xr, kr), gy)
    torch.testing.assert_close(y, ref_y)
    torch.testing.assert_close(gx, ref_gx)
    torch.testing.assert_close(gk, ref_gk)


@pytest.mark.parametrize("x_shape,k_shape,kwargs,match", [
    ((2, 8, 9, 9), (2, 3, 3, 3, 9, 9), {}, "divisible by kernel groups G=3"),
    ((2, 8, 9, 9), (1, 2, 3, 3, 9, 9), {}, "kernel batch 1"),
    ((2, 8, 9, 9), (2, 2, 3, 3, 9, 9), {"stride": 2}, "does not match the output size 5x5"),
    ((2, 8, 9, 9), (2, 2, 3, 3, 9, 9), {"stride": 0}, "stride must be a positive int; got 0"),
    ((2, 8, 9, 9), (2, 2, 3, 3, 9, 9), {"dilation": -1}, "dilation must be a positive int"),
    ((2, 8, 9, 9), (2, 2, 3, 3, 9, 9), {"padding": -1}, "padding must be a non-negative"),
    ((2, 8, 9), (2, 2, 3, 3, 9, 9), {}, "x must be 4-D"),
    ((2, 8, 9, 9), (2, 2, 3, 4, 9, 9), {}, "kernel must be square"),
])
def test_bad_arguments_raise_value_error(x_shape, k_shape, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pk.involution2d_unfold(torch.zeros(x_shape), torch.zeros(k_shape), **kwargs)


def test_published_rejects_cpu_tensors():
    x, ker, _, _ = _random_case(1, 4, 6, 6, 2, 3, 1, 1, torch.float32)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        pk.involution2d_published(x, ker)


def test_launch_config_uses_1024_thread_blocks():
    assert pk.launch_config(1) == (1, 1024)
    assert pk.launch_config(1024) == (1, 1024)
    assert pk.launch_config(1025) == (2, 1024)


@pytest.mark.gpu
def test_published_kernels_on_gpu():
    pytest.importorskip("cupy")
    assert pk.check_on_gpu(verbose=False)
