"""Timing of GPU (and CPU) work: the median of per-iteration CUDA-event timings, with the L2 cache flushed.

On a GPU every timed iteration is preceded by zeroing a buffer twice the size of the L2 cache, so
  - each iteration reads its inputs from device memory, not from a cache the previous iteration warmed
    (otherwise small layers report more than the memory bandwidth), and
  - the GPU is busy with the flush while Python enqueues the timed work, so the Python launch overhead of an
    operator is not counted (the events measure the GPU's own execution time).
The events bracket only the timed function. On a CPU the same function uses time.perf_counter.
"""
from __future__ import annotations

import statistics
import time

import torch

_FLUSH: dict[torch.device, torch.Tensor] = {}


def _flush_buffer(device: torch.device) -> torch.Tensor:
    if device not in _FLUSH:
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or (64 << 20)
        _FLUSH[device] = torch.empty(2 * l2, dtype=torch.uint8, device=device)
    return _FLUSH[device]


def time_ms(fn, device, repeat: int = 20, warmup: int = 3, flush_l2: bool = True) -> float:
    """Median wall time of fn() in milliseconds over `repeat` runs after `warmup` untimed ones."""
    device = torch.device(device)
    if repeat < 1 or warmup < 0:
        raise ValueError(f"need repeat >= 1 and warmup >= 0, got repeat={repeat}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    flush = _flush_buffer(device) if flush_l2 else None
    torch.cuda.synchronize(device)
    pairs = []
    for _ in range(repeat):
        if flush is not None:
            flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        pairs.append((start, end))
    torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) for s, e in pairs)
