"""Checks of the CUDA source `workloads/ops/involution.cu` that need no GPU.

1. `nvcc --ptx` compiles every template instantiation the CuPy backend can request (each dtype), so syntax
   and type errors surface in CI (skipped when nvcc is missing).
2. The kernels compiled as host C++ with g++ and a shim that runs the launch grid as a loop over
   (block, thread) pairs, compared with the torch backend: this checks the index arithmetic, the
   boundary conditions, the grid-stride loop (the emulated grid is deliberately too small) and the
   half/bfloat16 conversions (skipped when g++ is missing).
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess

import pytest
import torch

from workloads.ops import cupy_backend, torch_backend

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
KINDS = cupy_backend.KERNEL_NAMES
SIGNATURE = "(const {T}*, const {T}*, {T}*, long long, long long, long long, long long, long long, long long, long long)"


def _instantiations(configs, dtypes=DTYPES):
    lines = []
    for dtype in dtypes:
        t = cupy_backend.CUDA_TYPES[dtype]
        for (k, s, d, p) in configs:
            for kind in KINDS:
                expr = cupy_backend.name_expression(kind, dtype, k, s, d, p)
                lines.append(f"template __global__ void {expr}{SIGNATURE.format(T=t)};")
    return "\n".join(lines)


def _nvcc():
    for path in (shutil.which("nvcc"), "/usr/local/bin/nvcc", "/usr/local/cuda/bin/nvcc"):
        if path and shutil.which(path):
            return path
    return None


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found")
def test_nvcc_compiles_every_dtype_instantiation(tmp_path):
    src = tmp_path / "inst.cu"
    configs = [(7, 1, 1, 3), (7, 2, 1, 3), (3, 1, 2, 2), (1, 1, 1, 0)]
    src.write_text(f'#include "{cupy_backend.SOURCE_PATH}"\n{_instantiations(configs)}\n')
    out = tmp_path / "inst.ptx"
    proc = subprocess.run([_nvcc(), "--ptx", "-std=c++14", "-arch=compute_75", "-Werror", "all-warnings",
                           "-o", str(out), str(src)], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    ptx = out.read_text()
    assert ptx.count(".entry") == len(configs) * len(DTYPES) * len(KINDS) + 1  # + the probe kernel
    assert "cvt.f32.f16" in ptx and "cvt.rn.f16.f32" in ptx  # the half path really uses the PTX converts


# ---------------------------------------------------------------------------------------------------------------
# host emulation

EMU_CONFIGS = [(3, 1, 1, 1), (7, 2, 1, 3), (5, 2, 2, 4), (3, 3, 1, 0), (1, 1, 1, 0)]
EMU_BLOCK, EMU_MAX_GRID = 32, 3  # at most 96 "threads": every kernel runs its grid-stride loop many times

SHIM = r"""
#include <algorithm>
struct cv_dim3 { long long x; };
static cv_dim3 blockIdx, threadIdx, blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
#include "{source}"

template <typename F> static void cv_emulate(long long n, F body) {
    long long grid = std::min((n + {block} - 1) / {block}, (long long){max_grid});
    blockDim.x = {block}; gridDim.x = grid;
    for (long long b = 0; b < grid; ++b)
        for (long long t = 0; t < {block}; ++t) { blockIdx.x = b; threadIdx.x = t; body(); }
}
"""

ENTRY = r"""
extern "C" void {sym}(const void* a, const void* b, void* out, long long B, long long C, long long H,
                      long long W, long long G, long long Ho, long long Wo, long long n) {
    cv_emulate(n, [&] { {expr}((const {T}*)a, (const {T}*)b, ({T}*)out, B, C, H, W, G, Ho, Wo); });
}
"""


def _symbol(kind, dtype, cfg):
    return f"emu_{kind}_{str(dtype).split('.')[-1]}_" + "_".join(map(str, cfg))


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not found")
    tmp = tmp_path_factory.mktemp("cv_emulator")
    parts = [SHIM.replace("{source}", str(cupy_backend.SOURCE_PATH)).replace("{block}", str(EMU_BLOCK))
             .replace("{max_grid}", str(EMU_MAX_GRID))]
    for dtype in DTYPES:
        for cfg in EMU_CONFIGS:
            for kind in KINDS:
                parts.append(ENTRY.replace("{sym}", _symbol(kind, dtype, cfg))
                             .replace("{expr}", cupy_backend.name_expression(kind, dtype, *cfg))
                             .replace("{T}", cupy_backend.CUDA_TYPES[dtype]))
    src = tmp / "emu.cpp"
    src.write_text("\n".join(parts))
    lib = tmp / "libemu.so"
    proc = subprocess.run([gxx, "-std=c++17", "-O1", "-shared", "-fPIC", "-Wall", "-Wno-unknown-pragmas",
                           "-Werror", "-o", str(lib), str(src)], capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0 and "_Float16" in proc.stderr:
        pytest.skip(f"this g++ has no _Float16: {proc.stderr[:300]}")
    assert proc.returncode == 0, proc.stderr
    return ctypes.CDLL(str(lib))


def _call(lib, kind, dtype, cfg, a, b, out, sizes):
    fn = getattr(lib, _symbol(kind, dtype, cfg))
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_longlong] * 8
    fn(a.data_ptr(), b.data_ptr(), out.data_ptr(), *sizes, out.numel())


TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 4e-2}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", EMU_CONFIGS)
def test_emulated_kernels_match_torch_backend(emulator, dtype, cfg):
    k, s, d, p = cfg
    b, c, g, h, w = 2, 6, 3, 9, 7  # H != W, both odd; C/G = 2
    ho, wo = torch_backend.output_size(h, w, k, s, p, d)
    gen = torch.Generator().manual_seed(hash(cfg) % 1000)
    x = torch.randn(b, c, h, w, generator=gen, dtype=torch.float64).to(dtype)
    kern = torch.randn(b, g, k, k, ho, wo, generator=gen, dtype=torch.float64).to(dtype)
    gy = torch.randn(b, c, ho, wo, generator=gen, dtype=torch.float64).to(dtype)
    sizes = (b, c, h, w, g, ho, wo)
    # Reference in float64 from the same (rounded) inputs.
    xd, kd, gyd = x.double(), kern.double(), gy.double()
    expected = {
        "involution_forward": torch_backend.involution_forward(xd, kd, s, p, d),
        "involution_grad_input": torch_backend.involution_grad_input(gyd, kd, (h, w), s, p, d),
        "involution_grad_kernel": torch_backend.involution_grad_kernel(gyd, xd, g, k, s, p, d),
    }
    outs = {
        "involution_forward": torch.full((b, c, ho, wo), float("nan"), dtype=dtype),
        "involution_grad_input": torch.full((b, c, h, w), float("nan"), dtype=dtype),
        "involution_grad_kernel": torch.full((b, g, k, k, ho, wo), float("nan"), dtype=dtype),
    }
    inputs = {"involution_forward": (x, kern), "involution_grad_input": (gy, kern),
              "involution_grad_kernel": (gy, x)}
    for kind in KINDS:
        _call(emulator, kind, dtype, cfg, *inputs[kind], outs[kind], sizes)
        torch.testing.assert_close(outs[kind].double(), expected[kind], rtol=TOL[dtype], atol=TOL[dtype],
                                   msg=lambda m, kind=kind: f"{kind}: {m}")


def test_emulated_half_conversions_round_like_torch(emulator):
    """16-bit load/convert/round: a 1x1 kernel computes x * k in float and rounds once, exactly like torch."""
    vals = torch.tensor([0.1, -2.5, 65504.0, 1e-6, 3.14159, -0.0, 1e5, float("inf"), 7.0e-8, 1.0 / 3.0],
                        dtype=torch.float32)
    n = vals.numel()
    for dtype in (torch.float16, torch.bfloat16):
        x = vals.to(dtype).view(1, n, 1, 1)
        kern = torch.full((1, 1, 1, 1, 1, 1), 0.3, dtype=dtype)
        out = torch.empty(1, n, 1, 1, dtype=dtype)
        _call(emulator, "involution_forward", dtype, (1, 1, 1, 0), x, kern, out, (1, n, 1, 1, 1, 1, 1))
        # "+ 0.0": the kernel sums from +0, so -0.0 * k comes out as +0.0
        expected = (x.float() * kern.float().view(1, 1, 1, 1) + 0.0).to(dtype)
        assert torch.equal(out.view(torch.int16), expected.view(torch.int16)), (dtype, out.flatten(), expected)
