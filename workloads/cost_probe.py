"""What a configuration costs, measured on the device it trains on: a short probe before training.

FLOPs mislead for involution (RedNet-50 has 36% fewer than ResNet-50 yet trains slower), so a search that weighs
accuracy against cost measures the cost instead of counting it. `probe_classifier(cfg)` builds the trial's model,
optimizer and batch on its device and returns (all keys in `COST_METRICS`):

- `cost/params_m`: parameters, millions;
- `cost/gflops`: multiply-accumulates of one image's forward pass at the trial's image size, billions
  (`workloads.models.count_flops`, the convention of the `model.gflops` param);
- `cost/train_images_per_s`: images per second of one full training step (forward, loss, backward, optimizer
  step) at the trial's per-worker batch, on random data (no data loading);
- `cost/infer_latency_ms`, `cost/infer_batch_latency_ms`: one inference forward pass (eval mode, no grad) at
  batch 1 and at the trial's batch;
- `cost/peak_memory_mb`: on CUDA, the peak of `torch.cuda.max_memory_allocated` over the probe (weights,
  gradients, optimizer state, activations; the caching allocator's reserve and the CUDA context are not
  counted). On the CPU, the growth of the process's resident memory (RSS) from just before the model is built
  to its highest point during the probe, read by a sampling thread (every `RSS_SAMPLE_S`) and after every step.
  Limits of the CPU figure: it is resident memory only (pages swapped out are not counted); a peak shorter
  than the sampling interval inside one step can be missed; it counts the whole process (other threads'
  allocations included); and memory the allocator kept from earlier work in the same process is reused
  without growing the RSS, so run the probe in a fresh process (`orchestrator.runs.cost` does: one Ray task
  process per probe) for a figure comparable between configurations;
- `cost/probe_s`: the probe's own wall time.

Every timing excludes `warmup_steps` first steps (allocator, autotuning, lazy initialisation) and is the median
of `steps` timed steps; CUDA work is synchronised before each clock read.
"""
from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psutil
import torch
from torch import nn

from workloads.classification.config import OptimConfig
from workloads.classification.schedule import build_optimizer
from workloads.models import build_model, count_flops, count_params

COST_METRICS = ("cost/params_m", "cost/gflops", "cost/train_images_per_s", "cost/infer_latency_ms",
                "cost/infer_batch_latency_ms", "cost/peak_memory_mb", "cost/probe_s")
# How often the CPU probe reads the process's resident memory.
RSS_SAMPLE_S = 0.002
_AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class CostProbeConfig:
    """The trial's model, batch and optimizer, as its training workers would build them (plain data)."""

    model_name: str
    model_overrides: dict
    batch_size: int  # per worker
    image_size: int
    in_channels: int
    optim: OptimConfig
    autocast: str = "fp32"  # used on CUDA only, as in training
    channels_last: bool = False  # CUDA only, as in training
    use_gpu: bool = False
    warmup_steps: int = 2
    steps: int = 5


def probe_classifier(cfg: CostProbeConfig) -> dict[str, float]:
    """Measure the cost of training and running `cfg`'s classifier on this process's device."""
    device = torch.device("cuda") if cfg.use_gpu and torch.cuda.is_available() else torch.device("cpu")
    on_cuda = device.type == "cuda"
    amp_dtype = _AMP_DTYPES[cfg.autocast] if on_cuda else None
    channels_last = cfg.channels_last and on_cuda
    start = time.perf_counter()
    with peak_memory(device) as peak:
        model = build_model(cfg.model_name, **cfg.model_overrides)
        shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
        costs = {"cost/params_m": count_params(model) / 1e6,
                 "cost/gflops": count_flops(model, (1, *shape)) / 1e9}
        model = model.to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(model, cfg.optim, cfg.optim.lr)
        timing = StepTiming(device, cfg.warmup_steps, cfg.steps, after_step=peak.sample)
        costs.update(measure_speed(model, optimizer, cfg.batch_size, shape, timing, amp_dtype, channels_last))
    costs["cost/peak_memory_mb"] = peak.megabytes
    costs["cost/probe_s"] = time.perf_counter() - start
    return costs


@dataclass(frozen=True)
class StepTiming:
    """How steps are timed: `warmup` untimed steps, then the median of `steps` timed ones."""

    device: torch.device
    warmup: int
    steps: int
    after_step: Callable[[], None] = lambda: None

    def median_s(self, step: Callable[[], None]) -> float:
        times = []
        for i in range(self.warmup + self.steps):
            _sync(self.device)
            t0 = time.perf_counter()
            step()
            _sync(self.device)
            if i >= self.warmup:
                times.append(time.perf_counter() - t0)
            self.after_step()
        return statistics.median(times)


def measure_speed(model: nn.Module, optimizer, batch_size: int, shape: tuple[int, int, int], timing: StepTiming,
                  amp_dtype: torch.dtype | None = None, channels_last: bool = False) -> dict[str, float]:
    """Training throughput at `batch_size` and inference latency at batch 1 and `batch_size` (random data)."""
    device = timing.device
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    images = torch.randn(batch_size, *shape, device=device).contiguous(memory_format=fmt)
    with torch.no_grad():
        classes = model.eval()(images[:1]).shape[1]
    labels = torch.randint(0, classes, (batch_size,), device=device)
    criterion = nn.CrossEntropyLoss()
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    def train_step():
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = criterion(model(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def forward(batch):
        def step():
            with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                                 enabled=amp_dtype is not None):
                model(batch)
        return step

    model.train()
    train_s = timing.median_s(train_step)
    model.eval()
    one_s = timing.median_s(forward(images[:1]))
    batch_s = timing.median_s(forward(images))
    return {"cost/train_images_per_s": batch_size / train_s, "cost/infer_latency_ms": one_s * 1e3,
            "cost/infer_batch_latency_ms": batch_s * 1e3}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _PeakMemory:
    """The peak memory of a block: CUDA's allocator peak, or the growth of this process's RSS (see the module
    docstring for how the CPU figure is read and its limits)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.process = psutil.Process()
        self.base = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = 0  # max_memory_allocated counts what the probe holds, from zero
            return
        self.base = self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._poll, name="cost-probe-rss", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_S):
            self.sample()

    def sample(self) -> None:
        if self.device.type == "cuda":
            return
        self.peak = max(self.peak, self.process.memory_info().rss)

    def stop(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()

    @property
    def megabytes(self) -> float:
        return max(0, self.peak - self.base) / 2**20


@contextmanager
def peak_memory(device: torch.device) -> Iterator[_PeakMemory]:
    """Measure the peak memory of the block on `device`; read `.megabytes` afterwards."""
    meter = _PeakMemory(device)
    meter.start()
    try:
        yield meter
    finally:
        meter.stop()
