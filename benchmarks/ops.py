"""Operator benchmark: every involution implementation at the four RedNet-50 stage shapes.

Implementations (`IMPLEMENTATIONS`):
    unfold      the published naive formulation (nn.Unfold; materialises the K*K-times unfolded input), autograd
    torch       workloads.ops backend='torch' (strided-view accumulation, explicit backward)
    published   the published CUDA kernel design (benchmarks/published_kernels.py); CUDA + CuPy
    ours        workloads.ops backend='cupy' (this project's kernels, default backward policy); CUDA + CuPy
    ours-fused  the same with CVLAB_INVOLUTION_BACKWARD=fused (one backward kernel reading grad_y once);
                only the backward passes differ from `ours`, so only those are timed
Passes: forward (no autograd), backward (grad_x and grad_kernel of an existing graph), fwd_bwd (both).
Per row: the median CUDA-event time (benchmarks/timing.py: L2 flushed between runs), the bytes the pass must move
(benchmarks/bandwidth.py's count: read inputs and write outputs once), the achieved GB/s, its fraction of the
device-to-device copy bandwidth measured in the same run, and the peak memory allocated above the inputs.
A row that cannot run says why (`skipped`) and one that fails keeps its error (`error`); the sweep goes on.

    python -m benchmarks.ops                          # GPU: fp32+bf16, batch 32+128, every implementation
    python -m benchmarks.ops --device cpu --quick     # CPU smoke run (unfold, torch; the rest say why not)
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file (`python benchmarks/ops.py`): make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bandwidth import REDNET50_LAYERS, InvolutionShape, involution_bytes, measure_copy_bandwidth  # noqa: E402
from benchmarks.timing import time_ms  # noqa: E402

STAGES = tuple(s for s in REDNET50_LAYERS if s.name in ("stage1", "stage2", "stage3", "stage4"))
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
PASSES = ("forward", "backward", "fwd_bwd")
IMPLEMENTATIONS = ("unfold", "torch", "published", "ours", "ours-fused")
RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------------------------------- implementations


@contextlib.contextmanager
def _backward_mode(mode: str | None):
    old = os.environ.get("CVLAB_INVOLUTION_BACKWARD")
    if mode is not None:
        os.environ["CVLAB_INVOLUTION_BACKWARD"] = mode
    try:
        yield
    finally:
        if mode is not None:
            if old is None:
                os.environ.pop("CVLAB_INVOLUTION_BACKWARD", None)
            else:
                os.environ["CVLAB_INVOLUTION_BACKWARD"] = old


def availability(impl: str, device: torch.device) -> tuple[bool, str]:
    """(runs here, why not)."""
    if impl not in IMPLEMENTATIONS:
        return False, f"unknown implementation {impl!r}"
    if impl in ("unfold", "torch"):
        return True, ""
    if device.type != "cuda":
        return False, "needs a CUDA device"
    from workloads.ops import cupy_backend

    ok, reason = cupy_backend.cupy_status()
    return (True, "") if ok else (False, f"CuPy unusable: {reason}")


def implementation(impl: str):
    """fn(x, kernel, stride) -> y for one implementation, and the backward mode it runs under."""
    from benchmarks.published_kernels import involution2d_published, involution2d_unfold
    from workloads.ops import involution2d

    fns = {"unfold": lambda x, k, s: involution2d_unfold(x, k, s),
           "torch": lambda x, k, s: involution2d(x, k, s, backend="torch"),
           "published": lambda x, k, s: involution2d_published(x, k, s),
           "ours": lambda x, k, s: involution2d(x, k, s, backend="cupy"),
           "ours-fused": lambda x, k, s: involution2d(x, k, s, backend="cupy")}
    return fns[impl], ("fused" if impl == "ours-fused" else None)


# ---------------------------------------------------------------------------------------------------- memory


class _CpuPeak:
    """Peak resident memory above the level at `start()`, via /proc (Linux); None elsewhere."""

    def __init__(self):
        self.ok = Path("/proc/self/clear_refs").exists()
        if self.ok:
            try:  # fixed mmap threshold: every large tensor is mmap'd and unmapped on free
                libc = ctypes.CDLL("libc.so.6")
                libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB
                libc.mallopt(-1, 1 << 20)  # M_TRIM_THRESHOLD
            except OSError:
                pass

    @staticmethod
    def _status_kb(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise KeyError(key)

    def start(self) -> None:
        if self.ok:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            except OSError:
                self.ok = False
            self.base = self._status_kb("VmRSS")

    def peak_mb(self) -> float | None:
        return (self._status_kb("VmHWM") - self.base) / 1024 if self.ok else None


class _CudaPeak:
    def __init__(self, device):
        self.device = device

    def start(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.base = torch.cuda.memory_allocated(self.device)

    def peak_mb(self) -> float:
        torch.cuda.synchronize(self.device)
        return (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20


# ---------------------------------------------------------------------------------------------------- one case


def _closures(fn, x, kernel, gy, stride):
    def forward():
        with torch.no_grad():
            return fn(x, kernel, stride)

    graph = {}

    def backward():
        if "y" not in graph:
            graph["y"] = fn(x, kernel, stride)
        return torch.autograd.grad(graph["y"], (x, kernel), gy, retain_graph=True)

    def fwd_bwd():
        return torch.autograd.grad(fn(x, kernel, stride), (x, kernel), gy)

    return {"forward": forward, "backward": backward, "fwd_bwd": fwd_bwd}


def _error(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}"[:300]


def bench_layer(impl: str, shape: InvolutionShape, batch: int, dtype: torch.dtype, device: torch.device,
                copy_bandwidth: float, repeat: int, warmup: int, passes=PASSES, memory: bool = True) -> list[dict]:
    """Rows for one implementation at one layer: every pass, or the reason it did not run."""
    dname = str(dtype).split(".")[-1]
    base = {"impl": impl, "layer": shape.name, "channels": shape.channels, "size": shape.height,
            "kernel_size": shape.kernel_size, "stride": shape.stride, "batch": batch, "dtype": dname}
    if impl == "ours-fused":
        passes = [p for p in passes if p != "forward"]  # the forward is `ours`
    ok, reason = availability(impl, device)
    if not ok:
        return [{**base, "pass": p, "skipped": reason} for p in passes]
    k, s, g = shape.kernel_size, shape.stride, shape.groups
    nbytes = involution_bytes(batch, shape.channels, shape.height, shape.width, g, k, s, shape.dilation, dtype=dtype)
    try:
        fn, mode = implementation(impl)
        x = torch.randn(batch, shape.channels, shape.height, shape.width, device=device, dtype=dtype,
                        requires_grad=True)
        ho, wo = (shape.height - 1) // s + 1, (shape.width - 1) // s + 1
        kernel = torch.randn(batch, g, k, k, ho, wo, device=device, dtype=dtype, requires_grad=True)
        gy = torch.randn(batch, shape.channels, ho, wo, device=device, dtype=dtype)
    except Exception as exc:  # noqa: BLE001 - an import or allocation failure ends this layer only
        return [{**base, "pass": p, "error": _error(exc)} for p in passes]
    peak = _CudaPeak(device) if device.type == "cuda" else _CpuPeak()
    rows = []
    with _backward_mode(mode):
        closures = _closures(fn, x, kernel, gy, s)
        for p in passes:
            moved = {"forward": nbytes["forward"], "backward": nbytes["backward"], "fwd_bwd": nbytes["total"]}[p]
            row = {**base, "pass": p, "bytes": moved}
            try:
                closures[p]()  # compile / first call outside the measurements
                if memory:
                    peak.start()
                    closures[p]()
                    row["peak_mb"] = peak.peak_mb()
                row["ms"] = time_ms(closures[p], device, repeat, warmup)
                row["gbps"] = moved / (row["ms"] * 1e-3) / 1e9
                row["copy_fraction"] = moved / (row["ms"] * 1e-3) / copy_bandwidth
            except Exception as exc:  # noqa: BLE001 - one failing row (OOM, a kernel error) must not end the sweep
                row["error"] = _error(exc)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
    return rows


def run(impls, stages, batches, dtypes, device, repeat: int = 20, warmup: int = 3, passes=PASSES,
        copy_bandwidth: float | None = None, memory: bool = True, log=print, on_rows=None) -> dict:
    """The whole sweep; `on_rows(rows)` is called after each (dtype, batch, layer, impl) so callers can save
    partial results."""
    device = torch.device(device)
    if copy_bandwidth is None:
        copy_bandwidth = measure_copy_bandwidth(device)
    rows = []
    for dname in dtypes:
        for batch in batches:
            for shape in stages:
                for impl in impls:
                    log(f"  {impl:10s} {shape.name:8s} {dname:8s} batch {batch} ...", flush=True)
                    new = bench_layer(impl, shape, batch, DTYPES[dname], device, copy_bandwidth, repeat, warmup,
                                      passes, memory)
                    rows += new
                    if on_rows is not None:
                        on_rows(new)
    return {"device": str(device), "device_name": device_name(device), "torch": torch.__version__,
            "copy_bandwidth_bytes_per_s": copy_bandwidth, "repeat": repeat, "warmup": warmup, "rows": rows}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} torch threads)"


# ---------------------------------------------------------------------------------------------------- report


def _cell(row: dict | None) -> str:
    if row is None:
        return "n/a"
    if "skipped" in row:
        return "skipped"
    if "error" in row:
        return "OOM" if "OutOfMemory" in row["error"] or "out of memory" in row["error"] else "error"
    return f"{row['ms']:.3f} ({row['gbps']:.3g} GB/s, {row['copy_fraction']:.0%})"


def format_tables(result: dict) -> str:
    """Markdown: one table per (dtype, batch, pass); rows = layers, columns = implementations, cells
    'ms (GB/s, fraction of copy)'. Then the rows that were skipped or failed, with the reason."""
    rows = result["rows"]
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    out = [f"copy bandwidth (device to device, read + write): {result['copy_bandwidth_bytes_per_s'] / 1e9:.0f} GB/s",
           ""]
    for dname in dict.fromkeys(r["dtype"] for r in rows):
        for batch in dict.fromkeys(r["batch"] for r in rows):
            for p in PASSES:
                sub = [r for r in rows if r["dtype"] == dname and r["batch"] == batch and r["pass"] == p]
                if not sub:
                    continue
                cols = [i for i in impls if any(r["impl"] == i for r in sub)]
                out.append(f"{dname}, {p}, batch {batch}: ms (GB/s, fraction of copy bandwidth)\n")
                out.append("| layer | " + " | ".join(cols) + " |")
                out.append("| --- | " + " | ".join("---:" for _ in cols) + " |")
                for layer in dict.fromkeys(r["layer"] for r in sub):
                    first = next(r for r in sub if r["layer"] == layer)
                    label = f"{layer} ({first['channels']}@{first['size']}x{first['size']})"
                    cells = [_cell(next((r for r in sub if r["layer"] == layer and r["impl"] == i), None))
                             for i in cols]
                    out.append(f"| {label} | " + " | ".join(cells) + " |")
                out.append("")
    bad = [r for r in rows if "skipped" in r or "error" in r]
    if bad:
        out.append("Rows not measured:\n")
        for reason in dict.fromkeys(r.get("skipped") or r.get("error") for r in bad):
            which = sorted({r["impl"] for r in bad if (r.get("skipped") or r.get("error")) == reason})
            kind = "skipped" if any(r.get("skipped") == reason for r in bad) else "failed"
            n = sum(1 for r in bad if (r.get("skipped") or r.get("error")) == reason)
            out.append(f"- {n} rows of {', '.join(which)} {kind}: {reason}")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ops", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="default 32 128 on CUDA, 2 on CPU")
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    parser.add_argument("--impl", nargs="+", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS)
    parser.add_argument("--repeat", type=int, default=20, help="timed runs per row (median reported)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 timed run, no warm-up, stage4 only")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is steadier on a shared CPU)")
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default benchmarks/results/ops-<device>.json)")
    args = parser.parse_args(argv)
    if args.batch is None:
        args.batch = [32, 128] if args.device.startswith("cuda") else [2]
    if min(args.batch) < 1 or args.repeat < 1:
        parser.error("--batch and --repeat must be >= 1")
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        parser.error(f"--device: {exc}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    repeat, warmup = (1, 0) if args.quick else (args.repeat, 3)
    stages = STAGES[-1:] if args.quick else STAGES
    copy_bw = measure_copy_bandwidth(device, None if device.type == "cuda" else 16 << 20, iters=5 if args.quick else 20)
    result = run(args.impl, stages, args.batch, args.dtype, device, repeat, warmup, copy_bandwidth=copy_bw,
                 log=lambda *a, **k: print(*a, file=sys.stderr, **k))
    out = args.out or RESULTS_DIR / f"ops-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"involution2d at the RedNet-50 stages, K=7, G=C/16, {result['device_name']}; median of {repeat}")
    print(format_tables(result))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
