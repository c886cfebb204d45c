"""The cost probe (`workloads.cost_probe`): what it measures, how it times, how it reads peak memory."""
from __future__ import annotations

import time

import pytest
import torch

from workloads.classification.config import OptimConfig
from workloads.cost_probe import COST_METRICS, CostProbeConfig, StepTiming, peak_memory, probe_classifier
from workloads.models import build_model, count_flops, count_params

OPTIM = OptimConfig(name="sgd", lr=0.05, scale_lr=False, base_batch_size=256, momentum=0.9, nesterov=True,
                    weight_decay=1e-4, betas=(0.9, 0.999), label_smoothing=0.0, epochs=1, warmup_epochs=0.0,
                    warmup_iters=0, min_lr=0.0, grad_clip=None, skip_nonfinite_steps=0, ema_decay=None)


def test_probe_measures_every_cost_of_a_tiny_classifier_on_the_cpu():
    overrides = {"reduction_ratio": 8, "num_classes": 3}
    cfg = CostProbeConfig(model_name="cednet26", model_overrides=overrides, batch_size=4, image_size=32,
                          in_channels=3, optim=OPTIM, warmup_steps=1, steps=2)
    costs = probe_classifier(cfg)
    assert set(costs) == set(COST_METRICS)
    model = build_model("cednet26", **overrides)
    assert costs["cost/params_m"] == pytest.approx(count_params(model) / 1e6)
    assert costs["cost/gflops"] == pytest.approx(count_flops(model, (1, 3, 32, 32)) / 1e9)
    assert costs["cost/train_images_per_s"] > 0 and costs["cost/peak_memory_mb"] > 0
    assert costs["cost/infer_latency_ms"] > 0 and costs["cost/infer_batch_latency_ms"] > 0
    # (timings on a shared machine are too noisy to order; but no step took longer than the whole probe)
    assert 4 / costs["cost/train_images_per_s"] < costs["cost/probe_s"]


def test_timing_excludes_the_warm_up_and_takes_the_median():
    calls = []

    def step():  # two slow warm-up steps, then fast ones with one outlier
        calls.append(len(calls))
        time.sleep({0: 0.3, 1: 0.3, 3: 0.2}.get(len(calls) - 1, 0.01))

    samples = []
    timing = StepTiming(torch.device("cpu"), warmup=2, steps=5, after_step=lambda: samples.append(1))
    median = timing.median_s(step)
    assert len(calls) == 7 and len(samples) == 7  # warm-up + timed steps, memory sampled after each
    assert 0.009 < median < 0.1  # neither the warm-up nor the outlier


def test_cpu_peak_memory_is_the_growth_of_resident_memory():
    """Read after a step (as the probe does) and by the sampling thread alone while a block stays alive."""
    with peak_memory(torch.device("cpu")) as meter:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, written: resident
        meter.sample()
        del block
    assert 60 <= meter.megabytes < 200
    with peak_memory(torch.device("cpu")) as polled:
        block = torch.ones(64 * 2**20 // 4)
        time.sleep(0.2)  # a hundred sampling periods
        del block
    assert 60 <= polled.megabytes < 200
    with peak_memory(torch.device("cpu")) as quiet:
        pass
    assert quiet.megabytes < 20


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_memory_is_the_allocator_peak():
    with peak_memory(torch.device("cuda")) as meter:
        block = torch.ones(64 * 2**20 // 4, device="cuda")
        del block
    assert meter.megabytes == pytest.approx(64, abs=1)


def test_a_workload_without_a_cost_probe_is_refused():
    from orchestrator.errors import CvlabError
    from orchestrator.runs.cost import check_cost_probe
    from orchestrator.runs.job import Job

    class NoProbe(Job):
        workload = "detection"

    with pytest.raises(CvlabError, match="the detection workload has no cost probe: run.measure_cost"):
        check_cost_probe(NoProbe(spec=None))
