"""The memory-bandwidth floor of an involution layer: bytes that must move / measured copy bandwidth.

Involution does K*K multiply-adds per output element, far too little work to be compute-bound on a modern GPU,
so the useful yardstick is how long the unavoidable memory traffic takes:

  forward   reads x (B,C,H,W) and kernel (B,G,K,K,Ho,Wo), writes y (B,C,Ho,Wo);
  backward  reads grad-y, x and kernel, writes grad-x and grad-kernel.

The bandwidth is measured with a large device-to-device `Tensor.copy_` (read + write bytes counted). On a
machine without a GPU it measures host memcpy bandwidth, so the harness runs (and is tested) anywhere.

With `--compare`, each implementation of benchmarks/ops.py (unfold, torch, published, ours, ours-fused) is
also timed at every layer (benchmarks/timing.py: median of CUDA-event timings, L2 flushed) and reported as a
multiple of its floor. An implementation that cannot run here is left out; one that fails at a layer gets an
'error' cell and the sweep goes on.

    python -m benchmarks.bandwidth --dtype bfloat16 float32 --json bandwidth.json
    python -m benchmarks.bandwidth --compare --dtype bfloat16 float32 --json ops_vs_floor.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass(frozen=True)
class InvolutionShape:
    """One involution layer: input (batch, channels, height, width); kernel groups = channels / group_channels."""

    name: str
    channels: int
    height: int
    width: int
    kernel_size: int = 7
    stride: int = 1
    dilation: int = 1
    group_channels: int = 16
    count: int = 1  # how many layers of this shape the network has

    @property
    def groups(self) -> int:
        return self.channels // self.group_channels


# The involution layers of RedNet-50 at 224 px (stem at 112 px with K=3; bottleneck mid-channels with K=7,
# group_channels=16; the first block of stages 2-4 runs the involution with stride 2), with their counts.
REDNET50_LAYERS = (
    InvolutionShape("stem", 32, 112, 112, kernel_size=3),
    InvolutionShape("stage1", 64, 56, 56, count=3),
    InvolutionShape("stage2.down", 128, 56, 56, stride=2),
    InvolutionShape("stage2", 128, 28, 28, count=3),
    InvolutionShape("stage3.down", 256, 28, 28, stride=2),
    InvolutionShape("stage3", 256, 14, 14, count=5),
    InvolutionShape("stage4.down", 512, 14, 14, stride=2),
    InvolutionShape("stage4", 512, 7, 7, count=2),
)


def output_size(n: int, kernel_size: int, stride: int = 1, dilation: int = 1, padding: int | None = None) -> int:
    if padding is None:
        padding = dilation * (kernel_size - 1) // 2
    return (n + 2 * padding - dilation * (kernel_size - 1) - 1) // stride + 1


def involution_bytes(batch, channels, height, width, groups, kernel_size, stride=1, dilation=1, padding=None,
                     dtype=torch.float32) -> dict[str, int]:
    """Bytes that must move for one involution: {'forward', 'backward', 'total'} (total = forward + backward)."""
    for name, v in (("batch", batch), ("channels", channels), ("height", height), ("width", width),
                    ("groups", groups), ("kernel_size", kernel_size), ("stride", stride), ("dilation", dilation)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int; got {v!r}")
    if channels % groups:
        raise ValueError(f"channels ({channels}) must be divisible by groups ({groups})")
    ho = output_size(height, kernel_size, stride, dilation, padding)
    wo = output_size(width, kernel_size, stride, dilation, padding)
    if ho < 1 or wo < 1:
        raise ValueError(f"input {height}x{width} too small for kernel_size={kernel_size}, dilation={dilation}")
    item = torch.empty((), dtype=dtype).element_size()
    x = batch * channels * height * width
    ker = batch * groups * kernel_size * kernel_size * ho * wo
    y = batch * channels * ho * wo
    forward = (x + ker + y) * item
    backward = (y + x + ker + x + ker) * item  # read grad-y, x, kernel; write grad-x, grad-kernel
    return {"forward": forward, "backward": backward, "total": forward + backward}


def shape_bytes(shape: InvolutionShape, batch: int, dtype=torch.float32) -> dict[str, int]:
    return involution_bytes(batch, shape.channels, shape.height, shape.width, shape.groups, shape.kernel_size,
                            shape.stride, shape.dilation, dtype=dtype)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


def measure_copy_bandwidth(device="auto", nbytes: int | None = None, iters: int = 20, warmup: int = 3) -> float:
    """Achieved copy bandwidth in bytes/s (each copy counts nbytes read + nbytes written).

    Default buffer: 1 GiB on a GPU (far beyond any L2 cache), 64 MiB on CPU (keeps CPU runs quick).
    Returns the best of `iters` timed copies, the usual way to state a bandwidth ceiling.
    """
    dev = resolve_device(device) if isinstance(device, str) else device
    if nbytes is None:
        nbytes = (1 << 30) if dev.type == "cuda" else (64 << 20)
    if nbytes < 4096 or iters < 1:
        raise ValueError(f"need nbytes >= 4096 and iters >= 1; got nbytes={nbytes}, iters={iters}")
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=dev).fill_(1.0)
    dst = torch.empty_like(src)
    moved = 2 * src.numel() * src.element_size()
    for _ in range(warmup):
        dst.copy_(src)
    best = float("inf")
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - t0)
    return moved / best


def bound_table(layers, batch: int, dtypes, bandwidth: float) -> list[dict]:
    """Per layer and dtype: bytes and the bandwidth-bound time (microseconds) of forward and forward+backward."""
    rows = []
    for dname in dtypes:
        for shape in layers:
            b = shape_bytes(shape, batch, DTYPES[dname])
            rows.append({
                **asdict(shape), "batch": batch, "dtype": dname, "groups": shape.groups,
                "bytes_forward": b["forward"], "bytes_total": b["total"],
                "bound_forward_us": b["forward"] / bandwidth * 1e6,
                "bound_fwd_bwd_us": b["total"] / bandwidth * 1e6,
            })
    return rows


def implementations(device: torch.device) -> list[str]:
    """The implementations of benchmarks/ops.py that can run on `device`."""
    from benchmarks import ops

    return [name for name in ops.IMPLEMENTATIONS if ops.availability(name, device)[0]]


def compare(layers, batch: int, dtypes, bandwidth: float, device: torch.device, impls=None, repeat: int = 10,
            warmup: int = 3, log=print) -> list[dict]:
    """Time forward and forward+backward of each implementation; attach the floor and time/floor ratios.

    A row whose implementation failed carries 'error' (out of memory, a kernel error ...) instead of times."""
    from benchmarks import ops

    impls = implementations(device) if impls is None else impls
    rows = []
    for dname in dtypes:
        dtype = DTYPES[dname]
        for shape in layers:
            floor = shape_bytes(shape, batch, dtype)
            for name in impls:
                log(f"  {name:10s} {shape.name:12s} {dname} batch {batch} ...", flush=True)
                row = {"impl": name, "layer": shape.name, "count": shape.count, "dtype": dname, "batch": batch,
                       "floor_forward_ms": floor["forward"] / bandwidth * 1e3,
                       "floor_fwd_bwd_ms": floor["total"] / bandwidth * 1e3}
                passes = ("fwd_bwd",) if name == "ours-fused" else ("forward", "fwd_bwd")
                measured = {r["pass"]: r for r in ops.bench_layer(name, shape, batch, dtype, device, bandwidth,
                                                                  repeat, warmup, passes, memory=False)}
                problems = [r.get("error") or r.get("skipped") for r in measured.values() if "ms" not in r]
                if problems:
                    row["error"] = problems[0]
                else:
                    for key, p in (("forward_ms", "forward"), ("fwd_bwd_ms", "fwd_bwd")):
                        if p in measured:
                            row[key] = measured[p]["ms"]
                            row[key.replace("_ms", "_x_floor")] = row[key] / row["floor_" + key]
                rows.append(row)
    return rows


def machine_info(device: torch.device) -> dict:
    import datetime
    import platform

    info = {"device_type": device.type, "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        import cupy

        info["cupy"] = cupy.__version__
    except Exception:  # noqa: BLE001 - not installed, or broken: the version is only a label
        info["cupy"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def format_comparison(rows: list[dict]) -> str:
    """Markdown, one table per (dtype, pass): a row per layer, a column per implementation, cells 'ms (x floor)'.

    The layout matches the tables in BENCHMARKS.md, so a GPU run's output can be pasted there.
    """
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    out = []
    for dname in dict.fromkeys(r["dtype"] for r in rows):
        for label, key, floor_key in (("forward", "forward_ms", "floor_forward_ms"),
                                      ("forward+backward", "fwd_bwd_ms", "floor_fwd_bwd_ms")):
            sub = [r for r in rows if r["dtype"] == dname]
            out.append(f"{dname}, {label}, batch {sub[0]['batch']}: ms (multiple of the bandwidth floor)\n")
            out.append("| layer | floor ms | " + " | ".join(impls) + " |")
            out.append("| --- | ---: | " + " | ".join("---:" for _ in impls) + " |")
            for layer in dict.fromkeys(r["layer"] for r in sub):
                by_impl = {r["impl"]: r for r in sub if r["layer"] == layer}
                first = next(iter(by_impl.values()))
                cells = []
                for name in impls:
                    r = by_impl.get(name)
                    if r is None or ("error" not in r and key not in r):
                        cells.append("n/a")
                    elif "error" in r:
                        cells.append("OOM" if "OutOfMemory" in r["error"] or "out of memory" in r["error"]
                                     else "error")
                    else:
                        cells.append(f"{r[key]:.3f} ({r[key] / r[floor_key]:.1f}x)")
                out.append(f"| {layer} | {first[floor_key]:.3f} | " + " | ".join(cells) + " |")
            layers = list(dict.fromkeys(r["layer"] for r in sub))
            if len(layers) > 1:  # whole-network involution time: each layer weighted by its count
                floor = sum(r[floor_key] * r["count"] for r in sub if r["impl"] == impls[0])
                cells = []
                for name in impls:
                    mine = [r for r in sub if r["impl"] == name and key in r]
                    if len(mine) != len(layers):
                        cells.append("n/a")
                    else:
                        total = sum(r[key] * r["count"] for r in mine)
                        cells.append(f"{total:.3f} ({total / floor:.1f}x)")
                out.append(f"| all layers x count | {floor:.3f} | " + " | ".join(cells) + " |")
            out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Bandwidth floor of RedNet-50's involution layers.")
    parser.add_argument("--device", default="auto", help="cuda, cuda:N, cpu or auto (default)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"], choices=sorted(DTYPES))
    parser.add_argument("--copy-mib", type=int, default=None, help="copy buffer size (default 1024 GPU / 64 CPU)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--compare", action="store_true", help="also time every implementation at every layer")
    parser.add_argument("--impl", nargs="+", default=None, help="with --compare: only these implementations")
    parser.add_argument("--repeat", type=int, default=10, help="with --compare: timed runs (median reported)")
    parser.add_argument("--layers", nargs="+", default=None,
                        help=f"only these layers (default all: {' '.join(s.name for s in REDNET50_LAYERS)})")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    layers = REDNET50_LAYERS
    if args.layers:
        unknown = sorted(set(args.layers) - {s.name for s in REDNET50_LAYERS})
        if unknown:
            print(f"error: unknown layer(s) {unknown}", file=sys.stderr)
            return 2
        layers = tuple(s for s in REDNET50_LAYERS if s.name in args.layers)
    try:
        device = resolve_device(args.device)
        nbytes = args.copy_mib * (1 << 20) if args.copy_mib else None
        print(f"measuring copy bandwidth on {device} ...", flush=True)
        bw = measure_copy_bandwidth(device, nbytes, iters=args.iters)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"copy bandwidth (read+write): {bw / 1e9:.1f} GB/s")
    rows = bound_table(layers, args.batch, args.dtype, bw)
    print(f"{'layer':12s} {'dtype':9s} {'C':>4s} {'HxW':>8s} {'s':>2s} {'fwd MB':>8s} {'fwd us':>9s} "
          f"{'fwd+bwd MB':>11s} {'fwd+bwd us':>11s}")
    for r in rows:
        print(f"{r['name']:12s} {r['dtype']:9s} {r['channels']:4d} {r['height']:>4d}x{r['width']:<3d} "
              f"{r['stride']:2d} {r['bytes_forward'] / 1e6:8.1f} {r['bound_forward_us']:9.1f} "
              f"{r['bytes_total'] / 1e6:11.1f} {r['bound_fwd_bwd_us']:11.1f}")
    report = {"machine": machine_info(device), "copy_bandwidth_bytes_per_s": bw, "batch": args.batch,
              "layers": rows}
    if args.compare:
        impls = implementations(device)
        if args.impl:
            missing = sorted(set(args.impl) - set(impls))
            if missing:
                print(f"error: implementation(s) {missing} not available on {device}; available: {sorted(impls)}",
                      file=sys.stderr)
                return 2
            impls = [k for k in impls if k in args.impl]
        cmp_rows = compare(layers, args.batch, args.dtype, bw, device, impls, repeat=args.repeat)
        print(format_comparison(cmp_rows))
        for r in cmp_rows:
            if "error" in r:
                print(f"note: {r['impl']} at {r['layer']} ({r['dtype']}): {r['error']}")
        report["comparison"] = cmp_rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
