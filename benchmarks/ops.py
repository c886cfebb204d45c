"""Benchmark of the involution operator backends at the RedNet-50 stage shapes.

For each stage (C=64@56x56, 128@28x28, 256@14x14, 512@7x7 at 224 px; K=7, G=C/16, stride 1) and each
implementation:
    unfold  the published naive formulation (nn.Unfold, materialises the K*K-times unfolded input), autograd
    torch   workloads.ops backend='torch' (strided-view accumulation, explicit backward)
    cupy    workloads.ops backend='cupy' (NVRTC kernels), CUDA only and only when CuPy works
it measures forward and forward+backward time (median of --repeat runs after a warm-up) and the peak memory
allocated on top of the inputs, and derives the achieved bandwidth from the minimal bytes each pass must move
(forward: read x and kernel, write y; backward: read grad_y, kernel, x, write grad_x and grad_kernel).

Peak memory: CUDA uses torch.cuda.max_memory_allocated(); CPU resets the kernel's resident-set high-water
mark (/proc/self/clear_refs) and reads VmHWM, with glibc's mmap threshold fixed so large tensors really are
returned to the OS on free (otherwise reused heap pages hide allocations).

    python -m benchmarks.ops --device cpu --batch 8
    python -m benchmarks.ops --device cuda --dtype float16        # -> benchmarks/results/ops-cuda.json
"""
from __future__ import annotations

import argparse
import ctypes
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from workloads.ops import cupy_backend, involution2d

STAGES = [(64, 56), (128, 28), (256, 14), (512, 7)]  # RedNet-50 stages at 224 px: (channels, spatial size)
KERNEL_SIZE = 7
GROUP_CHANNELS = 16
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def unfold_involution(x: torch.Tensor, kernel: torch.Tensor, stride: int = 1, padding: int | None = None,
                      dilation: int = 1) -> torch.Tensor:
    """Baseline: the unfold formulation of the published naive RedNet code."""
    b, c, _, _ = x.shape
    _, g, k, _, ho, wo = kernel.shape
    padding = dilation * (k - 1) // 2 if padding is None else padding
    cols = F.unfold(x, k, dilation=dilation, padding=padding, stride=stride).view(b, g, c // g, k * k, ho, wo)
    return (cols * kernel.reshape(b, g, 1, k * k, ho, wo)).sum(3).reshape(b, c, ho, wo)


IMPLEMENTATIONS = {
    "unfold": unfold_involution,
    "torch": lambda x, k: involution2d(x, k, backend="torch"),
    "cupy": lambda x, k: involution2d(x, k, backend="cupy"),
}


# ---------------------------------------------------------------------------------------------------- memory


class _CpuPeak:
    """Peak resident memory above the level at `start()`, via /proc (Linux)."""

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


# ---------------------------------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(fn, device: torch.device, repeat: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _bytes(b: int, c: int, hw: int, g: int, k: int, elem: int) -> tuple[int, int]:
    """Minimal bytes moved by the forward pass and by forward+backward."""
    x = b * c * hw * hw
    kern = b * g * k * k * hw * hw
    fwd = (x + kern + x) * elem                      # read x, kernel; write y
    bwd = ((x + kern + x) + (x + x + kern)) * elem   # grad_x: read gy, kernel, write; grad_k: read gy, x, write
    return fwd, fwd + bwd


def bench_case(name: str, c: int, hw: int, batch: int, device: torch.device, dtype: torch.dtype, repeat: int,
               warmup: int) -> dict:
    g, k = c // GROUP_CHANNELS, KERNEL_SIZE
    fn = IMPLEMENTATIONS[name]
    x = torch.randn(batch, c, hw, hw, device=device, dtype=dtype, requires_grad=True)
    kern = torch.randn(batch, g, k, k, hw, hw, device=device, dtype=dtype, requires_grad=True)
    gy = torch.randn(batch, c, hw, hw, device=device, dtype=dtype)
    peak = _CudaPeak(device) if device.type == "cuda" else _CpuPeak()

    def forward():
        with torch.no_grad():
            return fn(x, kern)

    def forward_backward():
        out = fn(x, kern)
        return torch.autograd.grad(out, (x, kern), gy)

    row = {"impl": name, "channels": c, "size": hw, "batch": batch, "groups": g, "kernel_size": k}
    fwd_bytes, total_bytes = _bytes(batch, c, hw, g, k, x.element_size())
    for mode, f, nbytes in (("fwd", forward, fwd_bytes), ("fwd_bwd", forward_backward, total_bytes)):
        f()  # warm-up / compile outside the memory measurement
        peak.start()
        f()
        row[f"{mode}_peak_mb"] = peak.peak_mb()
        ms = _time_ms(f, device, repeat, warmup)
        row[f"{mode}_ms"] = ms
        row[f"{mode}_gbps"] = nbytes / (ms * 1e-3) / 1e9
    return row


def _format_table(rows: list[dict]) -> str:
    head = (f"{'impl':<7} {'stage':<11} {'fwd ms':>9} {'fwd MB':>8} {'fwd GB/s':>9} "
            f"{'f+b ms':>9} {'f+b MB':>8} {'f+b GB/s':>9}")
    lines = [head, "-" * len(head)]

    def mb(v):
        return "n/a" if v is None else f"{v:.1f}"

    for r in rows:
        lines.append(f"{r['impl']:<7} {str(r['channels']) + '@' + str(r['size']) + 'x' + str(r['size']):<11} "
                     f"{r['fwd_ms']:>9.2f} {mb(r['fwd_peak_mb']):>8} {r['fwd_gbps']:>9.3g} "
                     f"{r['fwd_bwd_ms']:>9.2f} {mb(r['fwd_bwd_peak_mb']):>8} {r['fwd_bwd_gbps']:>9.3g}")
    return "\n".join(lines)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} torch threads)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ops", description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32, help="batch size (default 32, the 224 px reference)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--repeat", type=int, default=10, help="timed runs per case (median reported)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output (default benchmarks/results/ops-<device>.json)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 timed run, no warm-up, only the smallest stage (512@7x7)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 is steadier on a shared machine)")
    parser.add_argument("--impl", action="append", choices=sorted(IMPLEMENTATIONS),
                        help="implementations to run (repeatable; default: all available)")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.repeat < 1:
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
    dtype = DTYPES[args.dtype]
    repeat, warmup = (1, 0) if args.quick else (args.repeat, 2)
    stages = STAGES[3:] if args.quick else STAGES

    impls = args.impl or ["unfold", "torch", "cupy"]
    notes = []
    if "cupy" in impls:
        ok, reason = cupy_backend.cupy_status() if device.type == "cuda" else (False, "CPU device")
        if not ok:
            impls = [i for i in impls if i != "cupy"]
            notes.append(f"cupy skipped: {reason}")
    if device.type == "cpu" and dtype in (torch.float16,) and "unfold" in impls:
        notes.append("float16 on CPU is slow in PyTorch; timings are not representative")

    rows = []
    for c, hw in stages:
        for name in impls:
            print(f"  {name:<6} C={c:<3} {hw}x{hw} batch {args.batch} ...", file=sys.stderr, flush=True)
            try:
                rows.append(bench_case(name, c, hw, args.batch, device, dtype, repeat, warmup))
            except torch.OutOfMemoryError as exc:  # report and continue: the unfold baseline is memory-hungry
                notes.append(f"{name} C={c}: out of memory ({str(exc).splitlines()[0]})")
                if device.type == "cuda":
                    torch.cuda.empty_cache()

    result = {
        "device": str(device), "device_name": _device_name(device), "dtype": args.dtype, "batch": args.batch,
        "repeat": repeat, "kernel_size": KERNEL_SIZE, "group_channels": GROUP_CHANNELS,
        "torch": torch.__version__, "notes": notes, "rows": rows,
    }
    out = args.out or RESULTS_DIR / f"ops-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"involution2d, RedNet-50 stages, K={KERNEL_SIZE}, G=C/{GROUP_CHANNELS}, batch {args.batch}, "
          f"{args.dtype}, {result['device_name']}; median of {repeat}; MB = peak memory above the inputs")
    print(_format_table(rows))
    for note in notes:
        print(f"note: {note}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
