"""Training and inference throughput (images/s) of RedNet-50 and CedNet-50 against torchvision's ResNet-50.

Each model runs, in the same process:
  train  full training steps (forward, cross-entropy, backward, SGD step) on a fixed random batch;
  infer  eval-mode forward passes under torch.no_grad;
both with bf16 autocast and channels_last by default; images/s over the timed iterations after warm-up, and each
model's ratio to the baseline measured in the same run. A model that fails records its error and the others go on.

    python -m benchmarks.model_speed --json model_speed.json                     # GPU: batch 128 at 224 px
    python -m benchmarks.model_speed --batch 2 --size 64 --steps 2 --warmup 1    # CPU smoke run
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time

DEFAULT_MODELS = ("rednet50", "cednet50")
DEFAULT_BASELINE = "torchvision:resnet50"


def build(spec: str, num_classes: int):
    """'torchvision:<name>' builds a torchvision model; any other name goes to workloads.models.build_model."""
    if spec.startswith("torchvision:"):
        import torchvision

        name = spec.split(":", 1)[1]
        if name not in torchvision.models.list_models(module=torchvision.models):
            raise ValueError(f"unknown torchvision classification model {name!r}")
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    from workloads.models import build_model, list_models

    if spec not in list_models():
        raise ValueError(f"unknown model {spec!r}; known: {', '.join(list_models())} or torchvision:<name>")
    return build_model(spec, num_classes=num_classes)


def time_training(model, *, device, batch: int, size: int, steps: int, warmup: int, amp: bool,
                  channels_last: bool, num_classes: int) -> dict:
    """Time `steps` training steps after `warmup` ones; returns images/s, ms per step and peak memory."""
    import torch
    import torch.nn.functional as F

    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=memory_format).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen).to(device=device, memory_format=memory_format)
    y = torch.randint(0, num_classes, (batch,), generator=gen).to(device)

    def step():
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    elapsed = time.perf_counter() - t0
    out = {"images_per_s": batch * steps / elapsed, "step_ms": elapsed / steps * 1e3,
           "final_loss": float(loss.detach().float())}
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def time_inference(model, *, device, batch: int, size: int, steps: int, warmup: int, amp: bool,
                   channels_last: bool) -> dict:
    """Time `steps` eval-mode forward passes after `warmup` ones; returns images/s and ms per batch."""
    import torch

    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=memory_format).eval()
    x = torch.randn(batch, 3, size, size, generator=torch.Generator(device="cpu").manual_seed(1))
    x = x.to(device=device, memory_format=memory_format)

    def step():
        with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            return model(x)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0
    return {"images_per_s": batch * steps / elapsed, "batch_ms": elapsed / steps * 1e3}


def involution_backend(device) -> str:
    """The backend `involution2d(backend='auto')` picks on this device (recorded with the results)."""
    try:
        from workloads.ops.functional import resolve_backend
    except ImportError:
        return "unknown"
    try:
        return resolve_backend("auto", device)
    except Exception as exc:  # noqa: BLE001 - a label only: never fail the benchmark over it
        return f"unknown ({exc})"


def machine_info(device) -> dict:
    import datetime

    import torch

    try:
        import torchvision

        tv_version = torchvision.__version__
    except ImportError:  # only the torchvision: baseline needs it; --baseline resnet50 uses the registry
        tv_version = None
    info = {"device": str(device), "torch": torch.__version__, "torchvision": tv_version,
            "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


MODES = ("train", "infer")


def run(models, baseline, *, device="auto", batch=128, size=224, steps=20, warmup=5, amp=True,
        channels_last=True, num_classes=1000, modes=MODES, log=print) -> dict:
    """Benchmark `baseline` then each of `models`; returns the JSON-ready result dict.

    results[i]: model, params_m, and per mode in `modes` '<mode>_images_per_s', the step / batch time and
    '<mode>_ratio_vs_baseline' (train also 'final_loss' and, on CUDA, 'train_peak_memory_gib'); or 'error'."""
    import torch

    for name, v in (("batch", batch), ("size", size), ("steps", steps), ("num_classes", num_classes)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int; got {v!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative int; got {warmup!r}")
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not modes:
        raise ValueError(f"modes must be a non-empty subset of {MODES}; got {tuple(modes)}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    config = {"batch": batch, "size": size, "steps": steps, "warmup": warmup, "amp_bf16": amp,
              "channels_last": channels_last, "num_classes": num_classes, "modes": list(modes)}
    specs = [baseline, *[m for m in models if m != baseline]]
    for spec in specs:  # unknown names fail before anything is timed
        if not spec.startswith("torchvision:"):
            from workloads.models import list_models

            if spec not in list_models():
                raise ValueError(f"unknown model {spec!r}; known: {', '.join(list_models())} or torchvision:<name>")
    results = []
    for spec in specs:
        log(f"[{spec}] building ...", flush=True)
        res = {"model": spec}
        try:
            model = build(spec, num_classes)
            res["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
            log(f"[{spec}] {res['params_m']:.2f} M params; {warmup} warm-up + {steps} timed iterations "
                f"(batch {batch}, {size} px, {device})", flush=True)
            if "train" in modes:
                t = time_training(model, device=device, batch=batch, size=size, steps=steps, warmup=warmup,
                                  amp=amp, channels_last=channels_last, num_classes=num_classes)
                res.update({"train_images_per_s": t["images_per_s"], "train_step_ms": t["step_ms"],
                            "final_loss": t["final_loss"]})
                if "peak_memory_gib" in t:
                    res["train_peak_memory_gib"] = t["peak_memory_gib"]
                log(f"[{spec}] train {t['images_per_s']:.1f} images/s ({t['step_ms']:.1f} ms/step)", flush=True)
            if "infer" in modes:
                t = time_inference(model, device=device, batch=batch, size=size, steps=steps, warmup=warmup,
                                   amp=amp, channels_last=channels_last)
                res.update({"infer_images_per_s": t["images_per_s"], "infer_batch_ms": t["batch_ms"]})
                log(f"[{spec}] infer {t['images_per_s']:.1f} images/s ({t['batch_ms']:.1f} ms/batch)", flush=True)
        except Exception as exc:  # noqa: BLE001 - one model failing (OOM, a kernel error) must not end the run
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            res["error"] = f"{type(exc).__name__}: {first}"[:300]
            log(f"[{spec}] failed: {res['error']}", flush=True)
        results.append(res)
        model = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = results[0]
    for r in results:
        for mode in modes:
            key = f"{mode}_images_per_s"
            if key in r and key in base:
                r[f"{mode}_ratio_vs_baseline"] = r[key] / base[key]
    return {"machine": machine_info(device), "involution_backend": involution_backend(device),
            "config": config, "baseline": baseline, "results": results}


def format_table(report: dict) -> str:
    modes = report["config"].get("modes", list(MODES))
    head = "| model | params (M) |"
    rule = "| --- | ---: |"
    for mode, unit in (("train", "ms/step"), ("infer", "ms/batch")):
        if mode in modes:
            head += f" {mode} images/s | {unit} | {mode} vs baseline |"
            rule += " ---: | ---: | ---: |"
    lines = [head, rule]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r.get('params_m', float('nan')):.2f} | failed: {r['error']} |")
            continue
        line = f"| {r['model']} | {r['params_m']:.2f} |"
        for mode, key in (("train", "train_step_ms"), ("infer", "infer_batch_ms")):
            if mode in modes:
                ratio = r.get(f"{mode}_ratio_vs_baseline")
                line += (f" {r[f'{mode}_images_per_s']:.1f} | {r[key]:.1f} | "
                         f"{'n/a' if ratio is None else f'{ratio:.2f}x'} |")
        lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    p.add_argument("--baseline", default=DEFAULT_BASELINE, help=f"default {DEFAULT_BASELINE}")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--steps", type=int, default=20, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--no-amp", action="store_true", help="float32 instead of bf16 autocast")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="train and/or infer")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    try:
        report = run(args.models, args.baseline, device=args.device, batch=args.batch, size=args.size,
                     steps=args.steps, warmup=args.warmup, amp=not args.no_amp,
                     channels_last=not args.no_channels_last, num_classes=args.num_classes, modes=args.modes)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"involution backend: {report['involution_backend']}")
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
