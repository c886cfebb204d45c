"""CuPy backend: the CUDA kernels of `involution.cu`, compiled at run time with NVRTC through `cupy.RawModule`.

- Works with cupy-cuda12x (its `[ctk]` extra brings NVRTC) and cupy-cuda13x (pick the one matching the CUDA of
  your torch build: torch 2.13's standard wheels are CUDA 13, so `.[cuda13]`). `cupy.cuda.compile_with_cache`
  (used by the published involution code) no longer exists in CuPy 13+; this uses `RawModule` with
  `name_expressions` to instantiate the C++ templates.
- `plan()` turns one call into a `Launch` (kernel instantiation, grid, block shape, dynamic shared memory, scalar
  arguments): pure Python, no CUDA, so the CPU emulator runs exactly the launches a GPU would.
- One compiled function per instantiation, compiled on first use and cached (CuPy also caches the binary on disk
  under ~/.cupy/kernel_cache). Call `warm_up` before capturing a CUDA graph so nothing compiles during capture.
- Launches go on the current torch CUDA stream (`cupy.cuda.ExternalStream`); tensors are passed by `data_ptr`
  (made contiguous first, so channels_last / strided inputs work).
- 32-bit index arithmetic when every tensor has fewer than 2^31 elements, 64-bit otherwise.
- Backward: grad_input and grad_kernel as two kernels, or one fused kernel reading grad_y once (stride 1). The
  choice: environment variable CVLAB_INVOLUTION_BACKWARD = split | fused | auto (default auto: fused when the
  stride is 1, both gradients are needed and K*K <= FUSED_MAX_TAPS, where its register use stays moderate).
"""
from __future__ import annotations

import functools
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# CuPy is optional (the cuda12 / cuda13 extras): it is imported only inside the functions that launch kernels,
# so this module imports without it and `cupy_status()` says why the backend is unusable (the 'auto' backend
# then falls back to PyTorch).
SOURCE_PATH = Path(__file__).with_name("involution.cu")
CUDA_TYPES = {torch.float32: "float", torch.float64: "double", torch.float16: "cv_half",
              torch.bfloat16: "cv_bf16"}
ACC_DTYPES = {torch.float32: torch.float32, torch.float64: torch.float64, torch.float16: torch.float32,
              torch.bfloat16: torch.float32}
KINDS = ("forward", "grad_input", "grad_kernel", "backward_fused")
FUNCTIONS = {"forward": "cv_forward", "grad_input": "cv_grad_input", "grad_kernel": "cv_grad_kernel",
             "backward_fused": "cv_backward_fused"}
NVRTC_OPTIONS = ("--std=c++14",)
BLOCK_SHAPES = ((32, 8), (16, 16), (16, 8), (8, 8))  # (x, y) threads per block, powers of two
MAX_TAP_REGISTERS = 50   # V * K * K taps (forward) or accumulators (grad_kernel) kept in registers per thread
FUSED_MAX_TAPS = 25      # 'auto' backward fuses up to K = 5 (fused K = 7 needs ~170 registers per thread)
SMEM_TARGET = 24 * 1024  # shared memory a block aims for (leaves room for several blocks per SM)
SMEM_LIMIT = 48 * 1024   # the most a block may use without opting in
MAX_GRID = 1 << 20       # blocks launched; the kernels loop over the rest (grid-stride over blocks)
_INT32_MAX = 2**31 - 1

_lock = threading.Lock()
_status: tuple[bool, str] | None = None


class UnsupportedConfig(ValueError):
    """The kernels cannot run this configuration (its input tile does not fit in shared memory)."""


def source() -> str:
    return SOURCE_PATH.read_text()


# ---------------------------------------------------------------------------------------------------------------
# launch planning (pure Python)


@dataclass(frozen=True)
class Problem:
    """Geometry of one involution: x (b, c, h, w), kernel (b, g, k, k, ho, wo), stride, padding, dilation."""

    b: int
    c: int
    h: int
    w: int
    g: int
    k: int
    ho: int
    wo: int
    stride: int
    padding: int
    dilation: int

    @property
    def max_elements(self) -> int:
        return max(self.b * self.c * self.h * self.w, self.b * self.c * self.ho * self.wo,
                   self.b * self.g * self.k * self.k * self.ho * self.wo)


@dataclass(frozen=True)
class Launch:
    """One kernel launch: instantiation `name`, 1-D grid, (x, y) block, dynamic shared memory in bytes, and the
    12 integer arguments (B, C, H, W, G, Ho, Wo, P, tiles_w, tiles, nblocks, CB) of type int (index_bits 32) or
    long long (64)."""

    kind: str
    name: str
    grid: int
    block: tuple[int, int]
    shared_mem: int
    scalars: tuple[int, ...]
    index_bits: int
    vector: int


def name_expression(kind: str, dtype: torch.dtype, index_bits: int, k: int, stride: int, dilation: int,
                    vector: int = 1) -> str:
    """The template instantiation for one launch, e.g. cv_forward<float, int, 7, 1, 1, 1>."""
    index = "int" if index_bits == 32 else "long long"
    return f"{FUNCTIONS[kind]}<{CUDA_TYPES[dtype]}, {index}, {k}, {stride}, {dilation}, {vector}>"


def param_types(dtype: torch.dtype, index_bits: int) -> tuple[str, ...]:
    """C types of every kernel's parameters, in order (the kernels share one parameter list)."""
    t = CUDA_TYPES[dtype]
    acc = f"cv_acc<{t}>::type"
    index = "int" if index_bits == 32 else "long long"
    return (f"const {t}*", f"const {t}*", f"const {t}*", f"const {acc}*", f"{t}*", f"{t}*", f"{acc}*") + (index,) * 12


def vector_width(k: int, width: int) -> int:
    """Adjacent outputs per thread (forward, grad_kernel): the widest of 4, 2, 1 that divides the output width and
    keeps V * K * K taps in registers."""
    for v in (4, 2, 1):
        if v * k * k <= MAX_TAP_REGISTERS and width % v == 0:
            return v
    return 1


def vector_choices(k: int) -> tuple[int, ...]:
    """Every V the launcher may pick for kernel size k (1 always: odd widths or misaligned pointers)."""
    return tuple(v for v in (1, 2, 4) if v == 1 or v * k * k <= MAX_TAP_REGISTERS)


def _tile_elements(kind: str, p: Problem, bx: int, by: int, v: int) -> int:
    """Shared-memory elements per staged channel, by the kernels' own formulas (involution.cu)."""
    span = (p.k - 1) * p.dilation
    s = p.stride
    if kind in ("forward", "grad_kernel"):
        th, tw = by, bx * v
        return ((th - 1) * s + span + 1) * ((tw - 1) * s + span + 1)
    if kind == "grad_input":
        oh = by + span if s == 1 else (by - 1 + span) // s + 2
        ow = bx + span if s == 1 else (bx - 1 + span) // s + 2
        return oh * ow
    return 2 * (by + span) * (bx + span)  # backward_fused: the grad_y and the x tiles


def _plane(kind: str, p: Problem) -> tuple[int, int]:
    if kind == "grad_input":
        return p.h, p.w
    if kind == "backward_fused":
        return max(p.h, p.ho), max(p.w, p.wo)
    return p.ho, p.wo


@functools.lru_cache(maxsize=4096)
def plan(kind: str, dtype: torch.dtype, p: Problem, gate_grad: bool = False, *, aligned: bool = True,
         index_bits: int | None = None, max_grid: int = MAX_GRID) -> Launch:
    """The launch for one kernel: block shape, tile, channels per pass and instantiation.

    Block shape: the candidate with the least estimated work per useful output (threads idle past the plane's
    edge, and halo elements staged per output). Channels per pass (CB): as many of the group's channels as fit in
    SMEM_TARGET bytes, evened out over the passes. `gate_grad`: grad_input / backward_fused also reduce d loss /
    d gate (a CB x threads shared-memory region). `aligned`: whether the tensors allow V-wide vector accesses.
    Raises UnsupportedConfig when even one channel of the smallest tile exceeds SMEM_LIMIT.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "backward_fused" and p.stride != 1:
        raise ValueError(f"the fused backward needs stride 1, got stride={p.stride}")
    esize = ACC_DTYPES[dtype].itemsize
    ph, pw = _plane(kind, p)
    v = vector_width(p.k, pw) if aligned and kind in ("forward", "grad_kernel") else 1
    cpg = p.c // p.g
    gated = gate_grad and kind in ("grad_input", "backward_fused")
    best = None
    for bx, by in BLOCK_SHAPES:
        n = bx * by
        per_channel = (_tile_elements(kind, p, bx, by, v) + (n if gated else 0)) * esize
        if per_channel > SMEM_LIMIT:
            continue
        th, tw = by, bx * v
        tiles_h, tiles_w = math.ceil(ph / th), math.ceil(pw / tw)
        covered = tiles_h * th * tiles_w * tw
        halo = _tile_elements(kind, p, bx, by, v) / (th * tw)
        cost = covered / (ph * pw) * (p.k * p.k + 4 * halo)
        if best is None or cost < best[0] - 1e-9:
            best = (cost, bx, by, per_channel, tiles_h, tiles_w)
    if best is None:
        raise UnsupportedConfig(
            f"the cupy backend cannot run K={p.k}, stride={p.stride}, dilation={p.dilation} in {dtype}: one "
            f"channel of the smallest input tile needs more than {SMEM_LIMIT} bytes of shared memory")
    _, bx, by, per_channel, tiles_h, tiles_w = best
    n = bx * by
    cb_max = max(1, min(cpg, SMEM_TARGET // per_channel, n if gated else cpg))
    passes = math.ceil(cpg / cb_max)
    cb = math.ceil(cpg / passes)
    tiles = tiles_h * tiles_w
    nblocks = p.b * p.g * tiles
    if index_bits is None:
        index_bits = 32 if max(p.max_elements, nblocks + min(nblocks, max_grid)) <= _INT32_MAX else 64
    return Launch(kind=kind, name=name_expression(kind, dtype, index_bits, p.k, p.stride, p.dilation, v),
                  grid=min(nblocks, max_grid), block=(bx, by), shared_mem=cb * per_channel,
                  scalars=(p.b, p.c, p.h, p.w, p.g, p.ho, p.wo, p.padding, tiles_w, tiles, nblocks, cb),
                  index_bits=index_bits, vector=v)


@functools.cache
def supports(k: int, stride: int, dilation: int, dtype: torch.dtype) -> bool:
    """Whether every kernel can run this configuration (the smallest tile fits in shared memory)."""
    p = Problem(1, 1, 8, 8, 1, k, 8, 8, stride, 0, dilation)
    try:
        for kind in ("forward", "grad_input", "grad_kernel"):
            plan(kind, dtype, p, gate_grad=True)
    except UnsupportedConfig:
        return False
    return True


def instantiations(dtype: torch.dtype, k: int, stride: int, dilation: int, index_bits=(32, 64)) -> list[str]:
    """Every name expression the launcher can request for one (dtype, K, stride, dilation): each kind, index
    width and vector width (padding, shapes and the gate are run-time arguments)."""
    names = []
    for bits in index_bits:
        for v in vector_choices(k):
            names.append(name_expression("forward", dtype, bits, k, stride, dilation, v))
            names.append(name_expression("grad_kernel", dtype, bits, k, stride, dilation, v))
        names.append(name_expression("grad_input", dtype, bits, k, stride, dilation))
        if stride == 1:
            names.append(name_expression("backward_fused", dtype, bits, k, stride, dilation))
    return names


BACKWARD_MODES = ("auto", "split", "fused")


def backward_mode(mode: str | None = None) -> str:
    """`mode`, else the CVLAB_INVOLUTION_BACKWARD environment variable, else 'auto'."""
    if mode is None:
        mode = os.environ.get("CVLAB_INVOLUTION_BACKWARD", "auto").strip().lower() or "auto"
    if mode not in BACKWARD_MODES:
        raise ValueError(f"the involution backward mode (CVLAB_INVOLUTION_BACKWARD) must be one of "
                         f"{BACKWARD_MODES}, got {mode!r}")
    return mode


def use_fused_backward(p: Problem, need_input: bool, need_kernel: bool, mode: str | None = None) -> bool:
    """Whether one fused kernel computes grad_x and grad_kernel (stride 1, both needed; see the module doc)."""
    mode = backward_mode(mode)
    if p.stride != 1 or not (need_input and need_kernel):
        return False
    return mode == "fused" or (mode == "auto" and p.k * p.k <= FUSED_MAX_TAPS)


# ---------------------------------------------------------------------------------------------------------------
# CuPy


def cupy_status() -> tuple[bool, str]:
    """(usable, reason): whether CuPy can compile and run a kernel here. Checked once per process."""
    global _status
    with _lock:
        if _status is None:
            _status = _probe()
        return _status


def _probe() -> tuple[bool, str]:
    try:
        import cupy
    except ImportError as exc:
        return False, f"CuPy is not installed ({exc}); install cupy-cuda13x (torch CUDA 13) or cupy-cuda12x[ctk]"
    except Exception as exc:  # noqa: BLE001 - a broken install can raise anything at import
        return False, f"importing CuPy failed: {type(exc).__name__}: {exc}"
    try:
        if not torch.cuda.is_available():
            return False, "torch sees no CUDA device"
        with cupy.cuda.Device(torch.cuda.current_device()):
            module = cupy.RawModule(code=source(), options=NVRTC_OPTIONS)
            probe = module.get_function("involution_probe")
            out = cupy.zeros(32, dtype=cupy.float32)
            probe((1,), (32,), (out,))
            if float(out[31].get()) != 62.0:
                return False, "the CuPy probe kernel returned a wrong result"
    except Exception as exc:  # noqa: BLE001 - CUDARuntimeError, NVRTCError, CompileException ...
        return False, f"{type(exc).__name__}: {exc}".strip()
    return True, "ok"


@functools.cache
def _function(device_index: int, name: str):
    import cupy

    with cupy.cuda.Device(device_index):
        module = cupy.RawModule(code=source(), options=NVRTC_OPTIONS, name_expressions=(name,))
        return module.get_function(name)


def cuda_launch(launch: Launch, tensors) -> None:
    """Launch on the current torch stream of the tensors' device. `tensors`: the 7 pointer arguments (or None)."""
    import cupy

    device = next(t.device for t in tensors if t is not None)
    device_index = device.index if device.index is not None else torch.cuda.current_device()
    fn = _function(device_index, launch.name)
    index_t = np.int32 if launch.index_bits == 32 else np.int64
    args = tuple(np.uint64(0 if t is None else t.data_ptr()) for t in tensors) + tuple(
        index_t(s) for s in launch.scalars)
    with cupy.cuda.Device(device_index):
        stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream, device_index)
        with stream:
            fn((launch.grid,), launch.block, args, shared_mem=launch.shared_mem)


def warm_up(dtype: torch.dtype, k: int, stride: int, dilation: int, device=None, index_bits=(32,)) -> int:
    """Probe CuPy and compile every kernel one configuration can launch, now: call it before capturing a CUDA
    graph (nothing may compile or allocate during capture). Returns how many kernels are ready."""
    ok, reason = cupy_status()
    if not ok:
        raise RuntimeError(f"the cupy backend is unusable: {reason}")
    device = torch.device("cuda") if device is None else torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    names = instantiations(dtype, k, stride, dilation, index_bits)
    for name in names:
        _function(index, name)
    return len(names)


# ---------------------------------------------------------------------------------------------------------------
# tensor-level operations (the launcher is injectable: the CPU emulator runs these same functions)


def _problem(x_shape, kernel_shape, stride: int, padding: int, dilation: int) -> Problem:
    b, c, h, w = (int(s) for s in x_shape)
    g, k, ho, wo = int(kernel_shape[1]), int(kernel_shape[2]), int(kernel_shape[4]), int(kernel_shape[5])
    return Problem(b, c, h, w, g, k, ho, wo, stride, padding, dilation)


def _prepare(t: torch.Tensor | None, name: str, dtype: torch.dtype | None = None):
    if t is None:
        return None
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    if t.dtype not in ACC_DTYPES:
        raise TypeError(f"the cupy backend does not support {name} dtype {t.dtype}")
    return t.contiguous()


def _aligned(v_bytes: int, *tensors) -> bool:
    return all(t is None or t.data_ptr() % v_bytes == 0 for t in tensors)


def _run(kind, p: Problem, dtype, tensors, launcher, index_bits) -> None:
    v_bytes = 4 * dtype.itemsize  # the widest vector access any launch may use
    launch = plan(kind, dtype, p, gate_grad=tensors[6] is not None, aligned=_aligned(v_bytes, *tensors),
                  index_bits=index_bits)
    if launch.grid > 0:
        launcher(launch, tensors)


def _gate(gate, dtype):
    return None if gate is None else _prepare(gate, "gate", ACC_DTYPES[dtype])


def involution_forward(x, kernel, stride: int, padding: int, dilation: int, gate=None, *,
                       launcher=cuda_launch, index_bits: int | None = None) -> torch.Tensor:
    """y = gate * involution(x, kernel); gate (B, C) or None. `index_bits` forces 32/64-bit indexing (tests)."""
    x = _prepare(x, "x")
    kernel = _prepare(kernel, "kernel", x.dtype)
    gate = _gate(gate, x.dtype)
    p = _problem(x.shape, kernel.shape, stride, padding, dilation)
    y = torch.empty(p.b, p.c, p.ho, p.wo, dtype=x.dtype, device=x.device)
    _run("forward", p, x.dtype, (x, kernel, None, gate, y, None, None), launcher, index_bits)
    return y


def involution_backward(grad_out, x, kernel, stride: int, padding: int, dilation: int, gate=None,
                        need_input: bool = True, need_kernel: bool = True, need_gate: bool = True, *,
                        backward: str | None = None, launcher=cuda_launch, index_bits: int | None = None):
    """(grad_x, grad_kernel, grad_gate), each None when not needed; grad_gate (B, C) in the accumulation dtype.

    `backward`: 'split', 'fused' or 'auto' (default: CVLAB_INVOLUTION_BACKWARD, else auto)."""
    grad_out = _prepare(grad_out, "grad_out")
    dtype = grad_out.dtype
    x, kernel, gate = _prepare(x, "x", dtype), _prepare(kernel, "kernel", dtype), _gate(gate, dtype)
    p = _problem(x.shape, kernel.shape, stride, padding, dilation)
    need_gate = need_gate and gate is not None
    want_input = need_input or need_gate
    gx = torch.empty(p.b, p.c, p.h, p.w, dtype=dtype, device=x.device) if want_input else None
    gk = torch.empty(p.b, p.g, p.k, p.k, p.ho, p.wo, dtype=dtype, device=x.device) if need_kernel else None
    gg = torch.zeros(p.b, p.c, dtype=ACC_DTYPES[dtype], device=x.device) if need_gate else None
    if use_fused_backward(p, want_input, need_kernel, backward):
        _run("backward_fused", p, dtype, (grad_out, kernel, x, gate, gx, gk, gg), launcher, index_bits)
    else:
        if want_input:
            x_for_gate = x if need_gate else None
            _run("grad_input", p, dtype, (grad_out, kernel, x_for_gate, gate, gx, None, gg), launcher, index_bits)
        if need_kernel:
            _run("grad_kernel", p, dtype, (grad_out, x, None, gate, gk, None, None), launcher, index_bits)
    return (gx if need_input else None), gk, gg
