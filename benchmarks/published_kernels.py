"""Baselines for the involution operator, written anew from the published designs.

* `involution2d_published`: the published CUDA kernel design (`published_kernels.cu`): one thread per output
  element (forward), one per input element (grad-input), one per kernel element looping over the group's
  channels (grad-kernel), 1024-thread blocks. Compiled at run time with `cupy.RawModule` (NVRTC), launched on
  torch's current stream, differentiable through a `torch.autograd.Function`. CUDA tensors only.
* `involution2d_unfold`: the unfold formulation of the published naive code (materialises the K*K-times
  unfolded input); runs anywhere torch runs.
* `build_cpu_emulator`: compiles the same `.cu` kernel bodies as C++ with g++ under the CPU emulator of
  benchmarks/cuda_emulator.py (float32 / float64), so the kernels' arithmetic and indexing can be checked on a
  machine without a GPU.

Run `python -m benchmarks.published_kernels --check` on a GPU machine to compare the compiled kernels with a
float64 reference for every dtype (forward and both gradients), held to the dtype's rounding
(workloads.ops.testing).
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import threading
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KERNEL_SOURCE = Path(__file__).with_name("published_kernels.cu")
THREADS_PER_BLOCK = 1024  # the published design's block size
KERNEL_NAMES = ("involution_forward", "involution_grad_input", "involution_grad_kernel")
# torch dtype -> template argument in published_kernels.cu
CUDA_TYPE_NAMES = {
    torch.float32: "float",
    torch.float64: "double",
    torch.float16: "inv_half",
    torch.bfloat16: "inv_bfloat16",
}


# --------------------------------------------------------------------------------------------------------
# Shapes and argument checking (shared by every baseline here)
# --------------------------------------------------------------------------------------------------------
def resolve_geometry(x_shape, kernel_shape, stride=1, padding=None, dilation=1):
    """Check shapes/hyperparameters; return (B, C, H, W, G, K, Ho, Wo, stride, pad, dil).

    Raises ValueError naming the bad argument and its value.
    """
    if len(x_shape) != 4:
        raise ValueError(f"x must be 4-D (B, C, H, W); got shape {tuple(x_shape)}")
    if len(kernel_shape) != 6:
        raise ValueError(f"kernel must be 6-D (B, G, K, K, Ho, Wo); got shape {tuple(kernel_shape)}")
    for name, v in (("stride", stride), ("dilation", dilation)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int; got {v!r}")
    b, c, h, w = (int(s) for s in x_shape)
    kb, g, k, k2, ho, wo = (int(s) for s in kernel_shape)
    if k != k2 or k < 1:
        raise ValueError(f"kernel must be square (B, G, K, K, Ho, Wo); got shape {tuple(kernel_shape)}")
    if padding is None:
        padding = dilation * (k - 1) // 2
    if not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be a non-negative int or None; got {padding!r}")
    if kb != b:
        raise ValueError(f"kernel batch {kb} does not match x batch {b}")
    if g < 1 or c % g != 0:
        raise ValueError(f"channels ({c}) must be divisible by kernel groups G={g}")
    exp_ho = (h + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    exp_wo = (w + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    if exp_ho < 1 or exp_wo < 1:
        raise ValueError(f"input {h}x{w} too small for kernel_size={k}, dilation={dilation}, padding={padding}")
    if (ho, wo) != (exp_ho, exp_wo):
        raise ValueError(
            f"kernel spatial size {ho}x{wo} does not match the output size {exp_ho}x{exp_wo} of a {h}x{w} "
            f"input with stride={stride}, padding={padding}, dilation={dilation}, kernel_size={k}"
        )
    return b, c, h, w, g, k, ho, wo, stride, padding, dilation


def launch_config(n: int, threads: int = THREADS_PER_BLOCK) -> tuple[int, int]:
    """(blocks, threads) for n elements: ceil(n / threads) blocks, as in the published launcher."""
    return max(1, (n + threads - 1) // threads), threads


# --------------------------------------------------------------------------------------------------------
# The unfold formulation
# --------------------------------------------------------------------------------------------------------
def involution2d_unfold(x, kernel, stride=1, padding=None, dilation=1):
    """Involution through `F.unfold`: (B, C*K*K, L) patches times the broadcast kernel, summed over taps."""
    b, c, _, _, g, k, ho, wo, stride, pad, dil = resolve_geometry(x.shape, kernel.shape, stride, padding, dilation)
    cols = F.unfold(x, k, dilation=dil, padding=pad, stride=stride)  # (B, C*K*K, Ho*Wo), channel-major
    cols = cols.view(b, g, c // g, k * k, ho, wo)
    return (cols * kernel.reshape(b, g, 1, k * k, ho, wo)).sum(dim=3).reshape(b, c, ho, wo)


# --------------------------------------------------------------------------------------------------------
# The published CUDA design through CuPy
# --------------------------------------------------------------------------------------------------------
_MODULES: dict[int, object] = {}
_MODULES_LOCK = threading.Lock()


def _cuda_include_dirs() -> list[str]:
    """Directories holding cuda_fp16.h / cuda_bf16.h for NVRTC (it has no default search path)."""
    found = []
    candidates = [os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    candidates = [os.path.join(p, "include") for p in candidates if p]
    try:  # the CUDA headers shipped in pip packages (torch's nvidia-* dependencies)
        import nvidia

        for root in getattr(nvidia, "__path__", []):
            candidates += [str(p) for p in Path(root).glob("*/include")]
    except ImportError:
        pass
    for d in candidates:
        if os.path.isfile(os.path.join(d, "cuda_fp16.h")) and d not in found:
            found.append(d)
    return found


def _name_expressions() -> list[str]:
    return [f"{k}<{t}>" for k in KERNEL_NAMES for t in CUDA_TYPE_NAMES.values()]


def nvrtc_option_sets() -> list[tuple[str, ...]]:
    """NVRTC options to try in order: with the CUDA fp16/bf16 headers, then with the local 16-bit types.

    No -std option: the source is C++11 and CuPy may add its own.
    """
    dirs = _cuda_include_dirs()  # one directory only, so fp16 and bf16 headers come from the same toolkit
    return ([(f"-I{dirs[0]}",)] if dirs else []) + [("-DINV_NO_FP_HEADERS",)]


def _compile_module(device_index: int):
    """Compile published_kernels.cu with NVRTC for the current device.

    First with the CUDA fp16/bf16 headers; if that fails (header/toolkit mismatches are common with NVRTC),
    again with -DINV_NO_FP_HEADERS, where the 16-bit types are local structs converted with PTX.
    """
    import cupy

    source = KERNEL_SOURCE.read_text()
    errors = []
    with cupy.cuda.Device(device_index):
        for options in nvrtc_option_sets():
            module = cupy.RawModule(code=source, options=options, name_expressions=_name_expressions())
            try:
                module.compile()
                return module
            except Exception as exc:  # noqa: BLE001 - CompileException, NVRTCError: try the next option set
                errors.append(f"options {options}: {type(exc).__name__}: {exc}")
    raise RuntimeError("could not compile published_kernels.cu with NVRTC:\n" + "\n".join(errors))


def _module(device_index: int):
    with _MODULES_LOCK:
        if device_index not in _MODULES:
            _MODULES[device_index] = _compile_module(device_index)
        return _MODULES[device_index]


@functools.cache
def _function(device_index: int, name_expression: str):
    """The compiled kernel for one name expression (looked up once, not per launch)."""
    return _module(device_index).get_function(name_expression)


def _launch(kernel_name: str, dtype: torch.dtype, n: int, a, b, out, geometry) -> None:
    """Launch `kernel_name<dtype>` over n elements on torch's current stream."""
    import cupy
    import numpy as np

    device_index = out.device.index if out.device.index is not None else torch.cuda.current_device()
    func = _function(device_index, f"{kernel_name}<{CUDA_TYPE_NAMES[dtype]}>")
    blocks, threads = launch_config(n)
    # Pointers go by value as 64-bit integers: no CuPy array wrapping (and no stream sync) per call.
    args = tuple(np.uint64(t.data_ptr()) for t in (a, b, out)) + tuple(np.int32(v) for v in geometry)
    stream = torch.cuda.current_stream(out.device)
    with cupy.cuda.Device(device_index), cupy.cuda.ExternalStream(stream.cuda_stream):
        func((blocks,), (threads,), args)


def _geometry_args(geom) -> tuple[int, ...]:
    b, c, h, w, g, k, ho, wo, stride, pad, dil = geom
    return (b, c, h, w, g, k, ho, wo, stride, pad, dil)


class _PublishedInvolution(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernel, geom):
        b, c, _, _, _, _, ho, wo = geom[:8]
        x, kernel = x.contiguous(), kernel.contiguous()
        y = x.new_empty(b, c, ho, wo)
        _launch("involution_forward", x.dtype, y.numel(), x, kernel, y, _geometry_args(geom))
        ctx.save_for_backward(x, kernel)
        ctx.geom = geom
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, kernel = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        geom = _geometry_args(ctx.geom)
        grad_x = grad_k = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.empty_like(x)
            _launch("involution_grad_input", x.dtype, grad_x.numel(), grad_out, kernel, grad_x, geom)
        if ctx.needs_input_grad[1]:
            grad_k = torch.empty_like(kernel)
            _launch("involution_grad_kernel", x.dtype, grad_k.numel(), grad_out, x, grad_k, geom)
        return grad_x, grad_k, None


def involution2d_published(x, kernel, stride=1, padding=None, dilation=1):
    """The published kernel design on CUDA tensors (float32/float64/float16/bfloat16), differentiable."""
    geom = resolve_geometry(x.shape, kernel.shape, stride, padding, dilation)
    if not (x.is_cuda and kernel.is_cuda):
        raise ValueError(
            f"involution2d_published needs CUDA tensors; got x on {x.device}, kernel on {kernel.device} "
            "(use involution2d_unfold, or build_cpu_emulator to check the kernels on CPU)"
        )
    if x.device != kernel.device:
        raise ValueError(f"x ({x.device}) and kernel ({kernel.device}) are on different devices")
    if x.dtype not in CUDA_TYPE_NAMES or kernel.dtype != x.dtype:
        raise ValueError(
            f"dtype must be one of {sorted(str(d) for d in CUDA_TYPE_NAMES)} and equal for x and kernel; "
            f"got x {x.dtype}, kernel {kernel.dtype}"
        )
    return _PublishedInvolution.apply(x, kernel, geom)


# --------------------------------------------------------------------------------------------------------
# CPU emulation of the same kernel source
# --------------------------------------------------------------------------------------------------------
class CpuEmulator:
    """The kernels of published_kernels.cu compiled as C++ and run by the CPU emulator (float32 / float64)."""

    _TYPES: ClassVar[dict] = {torch.float32: "float", torch.float64: "double"}

    def __init__(self, emulator):
        self.emulator = emulator

    @classmethod
    def specs(cls):
        from benchmarks.cuda_emulator import KernelSpec

        return [KernelSpec(f"{name}<{t}>", (f"const {t}*", f"const {t}*", f"{t}*") + ("int",) * 11)
                for name in KERNEL_NAMES for t in cls._TYPES.values()]

    def _run(self, kernel_name, a, b, out, geom, blocks=None):
        if a.dtype not in self._TYPES:
            raise ValueError(f"the CPU emulator supports float32 and float64; got {a.dtype}")
        a, b = a.detach().contiguous().cpu(), b.detach().to(a.dtype).contiguous().cpu()
        grid, block = launch_config(out.numel())
        if blocks is not None:  # fewer blocks than elements/1024 exercises the grid-stride loop
            grid = blocks
        self.emulator.launch(f"{kernel_name}<{self._TYPES[a.dtype]}>", (grid,), (block,), 0,
                             [a, b, out, *_geometry_args(geom)], outputs={2})
        return out

    def forward(self, x, kernel, stride=1, padding=None, dilation=1, blocks=None):
        geom = resolve_geometry(x.shape, kernel.shape, stride, padding, dilation)
        b, c, _, _, _, _, ho, wo = geom[:8]
        out = torch.empty(b, c, ho, wo, dtype=x.dtype)
        return self._run("involution_forward", x, kernel, out, geom, blocks)

    def grad_input(self, grad_out, kernel, x_shape, stride=1, padding=None, dilation=1, blocks=None):
        geom = resolve_geometry(x_shape, kernel.shape, stride, padding, dilation)
        out = torch.empty(tuple(x_shape), dtype=grad_out.dtype)
        return self._run("involution_grad_input", grad_out, kernel, out, geom, blocks)

    def grad_kernel(self, grad_out, x, kernel_shape, stride=1, padding=None, dilation=1, blocks=None):
        geom = resolve_geometry(x.shape, kernel_shape, stride, padding, dilation)
        out = torch.empty(tuple(kernel_shape), dtype=grad_out.dtype)
        return self._run("involution_grad_kernel", grad_out, x, out, geom, blocks)


def build_cpu_emulator(build_dir: str | os.PathLike, cxx: str | None = None) -> CpuEmulator:
    """Compile published_kernels.cu under the CPU emulator into a shared library under build_dir."""
    from benchmarks.cuda_emulator import build

    return CpuEmulator(build(KERNEL_SOURCE, CpuEmulator.specs(), build_dir, cxx=cxx, name="published_kernels"))


# --------------------------------------------------------------------------------------------------------
# GPU correctness check (run before timing on a new machine)
# --------------------------------------------------------------------------------------------------------
CHECK_CASES = (  # (B, C, H, W, G, K, stride, dilation)
    (2, 32, 17, 23, 2, 7, 1, 1),
    (2, 64, 28, 28, 4, 3, 2, 1),
    (1, 16, 15, 12, 1, 5, 1, 2),
    (2, 256, 14, 14, 16, 7, 1, 1),
)


def check_on_gpu(device="cuda", verbose=True) -> bool:
    """Published forward / grad-input / grad-kernel against float64 (unfold + autograd on the same rounded
    inputs), every dtype, held to the dtype's rounding (workloads.ops.testing)."""
    from workloads.ops import testing

    ok = True
    gen = torch.Generator(device="cpu").manual_seed(0)
    for b, c, h, w, g, k, s, d in CHECK_CASES:
        pad = d * (k - 1) // 2
        ho, wo = (h + 2 * pad - d * (k - 1) - 1) // s + 1, (w + 2 * pad - d * (k - 1) - 1) // s + 1
        x64 = torch.randn(b, c, h, w, generator=gen, dtype=torch.float64)
        k64 = torch.randn(b, g, k, k, ho, wo, generator=gen, dtype=torch.float64)
        gy64 = torch.randn(b, c, ho, wo, generator=gen, dtype=torch.float64)
        for dtype in CUDA_TYPE_NAMES:
            xt = x64.to(dtype).to(device).requires_grad_()
            kt = k64.to(dtype).to(device).requires_grad_()
            gyt = gy64.to(dtype).to(device)
            out = involution2d_published(xt, kt, s, None, d)
            gx, gk = torch.autograd.grad(out, (xt, kt), gyt)
            refs = testing.reference(xt, kt, s, pad, d, grad_out=gyt)
            for name, got in (("y", out), ("grad_x", gx), ("grad_kernel", gk)):
                ref, mag = refs[name]
                n_terms = testing.terms(name, xt.shape, kt.shape, False)
                ratio, _ = testing.rounding_errors(got, ref, mag, dtype, n_terms)
                passed = ratio <= 1.0
                ok &= passed
                if verbose:
                    print(f"{'ok  ' if passed else 'FAIL'} B{b} C{c} {h}x{w} G{g} K{k} s{s} d{d} "
                          f"{dtype!s:15s} {name:12s} error / rounding tolerance {ratio:.2f}", flush=True)
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare the CUDA kernels with unfold (needs a GPU)")
    parser.add_argument("--cpu-check", metavar="BUILD_DIR",
                        help="build the g++ emulation of the kernels in BUILD_DIR and compare it with unfold")
    args = parser.parse_args(argv)
    if args.check:
        if not torch.cuda.is_available():
            print("--check needs a CUDA device", file=sys.stderr)
            return 2
        try:
            import cupy  # noqa: F401
        except ImportError as exc:
            print(f"--check needs CuPy with NVRTC (cupy-cuda12x[ctk] or cupy-cuda13x): {exc}", file=sys.stderr)
            return 2
        return 0 if check_on_gpu() else 1
    if args.cpu_check:
        from benchmarks.cuda_emulator import EmulationError

        try:
            emu = build_cpu_emulator(args.cpu_check)
        except EmulationError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        x = torch.randn(2, 8, 9, 11, dtype=torch.float64)
        k = torch.randn(2, 2, 3, 3, 9, 11, dtype=torch.float64)
        err = (emu.forward(x, k) - involution2d_unfold(x, k)).abs().max().item()
        print(f"CPU emulation forward max abs err vs unfold: {err:.2e}")
        return 0 if err < 1e-12 else 1
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
