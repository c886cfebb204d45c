"""Run CUDA kernels on the CPU: the .cu source compiled with g++ under a shim that emulates a block faithfully.

What the shim models, so kernels that use shared memory and barriers can be checked without a GPU:

* every CUDA thread of a block is a fiber (ucontext) with its own stack; `__syncthreads()` switches back to a
  scheduler, which runs each thread until its next barrier, then releases them all: the block executes in
  phases between barriers, exactly the guarantee CUDA gives. The order in which threads run inside a phase is
  ascending, descending or shuffled (`order=`), so a missing barrier shows up as a wrong result;
* a barrier that some threads of a block never reach (they exited while others wait) is an error;
* dynamic shared memory (`CV_DYNAMIC_SMEM(name)`) is poisoned with NaN bytes before every block and framed by
  guard zones that are checked after it: reading before writing gives NaN, writing outside the launch's
  `shared_mem` bytes is an error;
* global memory: every tensor argument is copied into a buffer framed by NaN guard zones (outputs are also
  filled with NaN, so an element the kernel never writes stays NaN); reading past a tensor reads NaN, writing
  past it is an error;
* `gridDim.x` can be capped (`max_grid`) to exercise grid-stride loops; `atomicAdd` is a plain add (blocks run
  one after another).

Kernels are C++ templates instantiated by name expression, each wrapped in an `extern "C"` entry point that takes
its arguments as 64-bit integers. Half types are the caller's business (the source must compile as host C++).

    emu = build(source_path, [KernelSpec("k<float, 3>", ("const float*", "float*", "int"))], build_dir)
    emu.launch("k<float, 3>", grid=(4, 1, 1), block=(32, 8, 1), shared_mem=1024, args=[x, y, n], outputs={1})
"""
from __future__ import annotations

import ctypes
import hashlib
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

ORDERS = {"ascending": 0, "descending": 1, "shuffled": 2}
GUARD_ELEMENTS = 4096
_ERRLEN = 2048

SHIM = r"""
// ---- CPU emulation of the CUDA execution model (benchmarks/cuda_emulator.py) ----
#include <ucontext.h>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

struct dim3 { unsigned int x, y, z; };

namespace cv_emu {
enum { RUNNABLE = 0, WAITING = 1, DONE = 2 };
struct Fiber { ucontext_t ctx; dim3 idx; int state; };
static const size_t kStack = 64 * 1024;
static const size_t kGuard = 4096;
static const size_t kSmemMax = 227 * 1024;
alignas(64) static unsigned char smem_buffer[kGuard + kSmemMax + kGuard];
static unsigned char* const smem = smem_buffer + kGuard;
static Fiber* fibers = 0;
static char* stacks = 0;
static unsigned capacity = 0;
static Fiber* current = 0;
static ucontext_t scheduler;
static dim3 block_idx, block_dim, grid_dim;
static void (*body_fn)(void*) = 0;
static void* body_arg = 0;

static void fiber_main() {
    body_fn(body_arg);
    current->state = DONE;
    swapcontext(&current->ctx, &scheduler);
}
static inline void barrier() {
    current->state = WAITING;
    swapcontext(&current->ctx, &scheduler);
}
template <class F> static void call_body(void* p) { (*static_cast<F*>(p))(); }

static bool reserve(unsigned n) {
    if (n <= capacity) return true;
    free(fibers);
    free(stacks);
    fibers = (Fiber*)calloc(n, sizeof(Fiber));
    stacks = (char*)malloc((size_t)n * kStack);
    capacity = (fibers && stacks) ? n : 0;
    return capacity != 0;
}

static unsigned next_random(unsigned& s) { s ^= s << 13; s ^= s >> 17; s ^= s << 5; return s; }

template <class F>
static int launch(dim3 grid, dim3 block, size_t shared, int order, unsigned max_grid, F& body, char* err, int errlen) {
    const unsigned n = block.x * block.y * block.z;
    if (n == 0 || n > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0) {
        snprintf(err, errlen, "invalid launch: grid (%u, %u, %u), block (%u, %u, %u)", grid.x, grid.y, grid.z,
                 block.x, block.y, block.z);
        return 1;
    }
    if (shared > kSmemMax) {
        snprintf(err, errlen, "shared_mem %zu bytes exceeds the %zu a block can have", shared, kSmemMax);
        return 1;
    }
    if (!reserve(n)) { snprintf(err, errlen, "out of memory for %u fibers", n); return 1; }
    grid_dim = grid;
    if (max_grid && grid_dim.x > max_grid) grid_dim.x = max_grid;
    block_dim = block;
    body_fn = call_body<F>;
    body_arg = &body;
    unsigned* perm = (unsigned*)malloc(n * sizeof(unsigned));
    unsigned seed = 2463534242u;
    for (unsigned bz = 0; bz < grid_dim.z; ++bz)
    for (unsigned by = 0; by < grid_dim.y; ++by)
    for (unsigned bx = 0; bx < grid_dim.x; ++bx) {
        block_idx = dim3{bx, by, bz};
        memset(smem_buffer, 0xFF, kGuard + shared + kGuard);
        for (unsigned t = 0; t < n; ++t) {
            Fiber& f = fibers[t];
            getcontext(&f.ctx);
            f.ctx.uc_stack.ss_sp = stacks + (size_t)t * kStack;
            f.ctx.uc_stack.ss_size = kStack;
            f.ctx.uc_link = 0;
            makecontext(&f.ctx, fiber_main, 0);
            f.idx = dim3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
            f.state = RUNNABLE;
        }
        for (unsigned phase = 0;; ++phase) {
            for (unsigned k = 0; k < n; ++k) perm[k] = order == 1 ? n - 1 - k : k;
            if (order == 2)
                for (unsigned k = n - 1; k > 0; --k) {
                    unsigned j = next_random(seed) % (k + 1), tmp = perm[k];
                    perm[k] = perm[j];
                    perm[j] = tmp;
                }
            for (unsigned k = 0; k < n; ++k) {
                Fiber& f = fibers[perm[k]];
                if (f.state != RUNNABLE) continue;
                current = &f;
                swapcontext(&scheduler, &f.ctx);
            }
            unsigned done = 0, first_done = n;
            for (unsigned t = 0; t < n; ++t)
                if (fibers[t].state == DONE) { ++done; if (first_done == n) first_done = t; }
            if (done == n) break;
            if (done > 0) {
                const dim3 i = fibers[first_done].idx;
                snprintf(err, errlen, "barrier divergence in block (%u, %u, %u), phase %u: thread (%u, %u, %u) "
                         "exited while %u threads wait at __syncthreads()", bx, by, bz, phase, i.x, i.y, i.z, n - done);
                free(perm);
                return 1;
            }
            for (unsigned t = 0; t < n; ++t) fibers[t].state = RUNNABLE;
        }
        for (size_t i = 0; i < kGuard; ++i)
            if (smem_buffer[i] != 0xFF || smem[shared + i] != 0xFF) {
                const long long at = smem_buffer[i] != 0xFF ? (long long)i - (long long)kGuard : (long long)(shared + i);
                snprintf(err, errlen, "shared memory written outside the %zu-byte allocation (byte offset %lld) "
                         "in block (%u, %u, %u)", shared, at, bx, by, bz);
                free(perm);
                return 1;
            }
    }
    free(perm);
    return 0;
}
}  // namespace cv_emu

#define threadIdx (cv_emu::current->idx)
#define blockIdx (cv_emu::block_idx)
#define blockDim (cv_emu::block_dim)
#define gridDim (cv_emu::grid_dim)
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __syncthreads() cv_emu::barrier()
#define CV_DYNAMIC_SMEM(name) unsigned char* const name = cv_emu::smem
template <typename T> inline T atomicAdd(T* p, T v) { const T old = *p; *p = old + v; return old; }
"""

_ENTRY = r"""
extern "C" int {symbol}(const long long* a, const unsigned* dims, unsigned long shared, int order, char* err,
                        int errlen) {{
    auto body = [&]() {{ {expression}({arguments}); }};
    return cv_emu::launch(dim3{{dims[0], dims[1], dims[2]}}, dim3{{dims[3], dims[4], dims[5]}}, shared, order,
                          dims[6], body, err, errlen);
}}
"""


class EmulationError(RuntimeError):
    """The emulated kernel did something a GPU would not forgive (or the emulator could not be built)."""


@dataclass(frozen=True)
class KernelSpec:
    """One kernel to emulate: its template name expression and the C types of its parameters, in order."""

    expression: str
    params: tuple[str, ...]

    @property
    def symbol(self) -> str:
        return "cv_emu_entry_" + hashlib.sha1(self.expression.encode()).hexdigest()[:16]

    def entry(self) -> str:
        args = [f"({t})(uintptr_t)a[{i}]" if "*" in t else f"({t})a[{i}]" for i, t in enumerate(self.params)]
        return _ENTRY.format(symbol=self.symbol, expression=self.expression, arguments=", ".join(args))


def compiler() -> str | None:
    return shutil.which("g++")


def build(source: str | Path, specs, build_dir: str | Path, *, cxx: str | None = None, defines=(),
          opt: str = "-O1", name: str = "emulator") -> Emulator:
    """Compile `source` (a path, #included) with the shim and an entry point per spec into build_dir/lib<name>.so.

    Raises EmulationError with the compiler's output when the build fails.
    """
    cxx = cxx or compiler()
    if cxx is None:
        raise EmulationError("no C++ compiler (g++) found to build the CPU emulator")
    specs = list(dict.fromkeys(specs))
    build_dir = Path(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    text = SHIM + f'\n#include "{Path(source).resolve()}"\n' + "".join(s.entry() for s in specs)
    flags = ["-std=c++17", opt, "-shared", "-fPIC", "-fno-strict-aliasing", "-Wall", "-Werror",
             "-Wno-unknown-pragmas", "-Wno-unused-function", "-Wno-unused-variable", *[f"-D{d}" for d in defines]]
    # The library is named by what it is built from: dlopen returns an already loaded library for a path it has
    # seen, so a rebuilt source must never reuse a path.
    digest = hashlib.sha1("\0".join([text, Path(source).read_text(), cxx, *flags]).encode()).hexdigest()[:12]
    src = build_dir / f"{name}-{digest}.cpp"
    src.write_text(text)
    lib = build_dir / f"lib{name}-{digest}.so"
    cmd = [cxx, *flags, "-o", str(lib), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise EmulationError(f"{' '.join(cmd)} failed:\n{proc.stderr[-6000:]}")
    return Emulator(lib, specs)


def _guarded_copy(t: torch.Tensor, poison: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(buffer, interior view): a contiguous copy of t framed by NaN guard zones (interior NaN when poison)."""
    if not t.dtype.is_floating_point:
        raise EmulationError(f"emulator tensor arguments must be floating point, got {t.dtype}")
    buf = torch.full((t.numel() + 2 * GUARD_ELEMENTS,), float("nan"), dtype=t.dtype)
    inner = buf[GUARD_ELEMENTS: GUARD_ELEMENTS + t.numel()]
    if not poison:
        inner.copy_(t.reshape(-1))
    return buf, inner


class Emulator:
    """A built emulator library: `launch(expression, grid, block, shared_mem, args, ...)`."""

    def __init__(self, library_path, specs):
        self.library_path = str(library_path)
        self._lib = ctypes.CDLL(self.library_path)
        self._fns = {}
        for spec in specs:
            fn = getattr(self._lib, spec.symbol)
            fn.argtypes = [ctypes.POINTER(ctypes.c_longlong), ctypes.POINTER(ctypes.c_uint), ctypes.c_ulong,
                           ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
            fn.restype = ctypes.c_int
            self._fns[spec.expression] = (fn, spec)

    def __contains__(self, expression: str) -> bool:
        return expression in self._fns

    def launch(self, expression: str, grid, block, shared_mem: int, args, *, outputs=(), order: str = "ascending",
               max_grid: int | None = None) -> None:
        """Run one launch. `args`: tensors (CPU), None (null pointer) or ints, matching the spec's parameters.

        Tensors at the positions in `outputs` start as NaN inside their guard zones; every tensor is copied back
        afterwards. Raises EmulationError naming the kernel on barrier divergence, out-of-bounds writes to shared
        or global memory, or a bad launch.
        """
        if expression not in self._fns:
            raise EmulationError(f"{expression} is not in this emulator build ({self.library_path})")
        if order not in ORDERS:
            raise ValueError(f"order must be one of {sorted(ORDERS)}, got {order!r}")
        fn, spec = self._fns[expression]
        if len(args) != len(spec.params):
            raise EmulationError(f"{expression} takes {len(spec.params)} arguments, got {len(args)}")
        grid = tuple(grid) + (1,) * (3 - len(grid))
        block = tuple(block) + (1,) * (3 - len(block))
        values, guarded = [], []
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                if a.device.type != "cpu":
                    raise EmulationError(f"argument {i} of {expression} is on {a.device}; the emulator needs CPU")
                buf, inner = _guarded_copy(a, poison=i in outputs)
                guarded.append((i, a, buf, inner))
                values.append(inner.data_ptr())
            elif a is None:
                values.append(0)
            else:
                values.append(int(a))
        arr = (ctypes.c_longlong * len(values))(*values)
        dims = (ctypes.c_uint * 7)(*grid, *block, max_grid or 0)
        err = ctypes.create_string_buffer(_ERRLEN)
        rc = fn(arr, dims, shared_mem, ORDERS[order], err, _ERRLEN)
        if rc != 0:
            raise EmulationError(f"{expression}: {err.value.decode(errors='replace')}")
        for i, original, buf, inner in guarded:
            guards = torch.cat([buf[:GUARD_ELEMENTS], buf[GUARD_ELEMENTS + original.numel():]])
            if not bool(torch.isnan(guards).all()):
                raise EmulationError(f"{expression}: argument {i} was written outside its {original.numel()} elements")
            original.copy_(inner.view(original.shape))

