"""One command for a lent GPU: the gpu-marked tests, the operator benchmark and the model-speed comparison.

    python -m benchmarks.gpu_check --out DIR            # on the GPU machine (also: make gpu-check)
    python -m benchmarks.gpu_check --out DIR --dry-run  # anywhere: tiny sizes on the CPU, CUDA work skipped

Writes DIR/report.md and DIR/report.json (plus each phase's raw output), stating the total time. Phases, each in
its own subprocess (a sticky CUDA error or a hang ends one phase, not the check), with a time budget (default
480 s in all; a phase that runs out stops starting new work and says what it left out):
  1. tests    `pytest -m gpu` over the test files that have gpu-marked tests, with a private ini and without
              the project's conftest (the lent machine has no ray / mlflow / mmdet); junit XML parsed into the report.
              Dry run: the tests are only collected.
  2. ops      benchmarks/ops.py: unfold, torch backend, published design, ours (and ours with the fused backward);
              forward, backward, forward+backward; float32 and bfloat16; batch 32 and 128; the four RedNet-50 stage
              shapes; GB/s and fraction of the device-to-device copy bandwidth measured in the same run.
  3. models   benchmarks/model_speed.py: RedNet-50 and CedNet-50 against torchvision's ResNet-50, training and
              inference images/s, bf16 autocast, channels_last, batch 128 at 224 px.
Then the issue-16 targets are evaluated from the measured rows (never from anything else).

Only torch, numpy, pytest and (optionally) cupy, torchvision and triton are needed; every other import is guarded.
Without CUDA the check runs as a dry run by itself and the report says that no GPU figure was measured.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("tests", "ops", "models")
BUDGET_S = 480.0
PHASE_MIN_S = {"tests": 60.0, "ops": 120.0, "models": 90.0}  # kept free for a phase while earlier ones run
GRACE_S = 20.0  # a phase stops starting work at its deadline and is killed GRACE_S later
GPU_OPS = {"batches": [128, 32], "dtypes": ["bfloat16", "float32"], "repeat": 20, "warmup": 3}
DRY_OPS = {"batches": [2, 1], "dtypes": ["bfloat16", "float32"], "repeat": 2, "warmup": 1}
GPU_MODELS = {"batch": 128, "size": 224, "steps": 20, "warmup": 5}
DRY_MODELS = {"batch": 2, "size": 32, "steps": 1, "warmup": 0}
MODELS = ("rednet50", "cednet50")
PYTEST_INI = """[pytest]
markers =
    gpu: needs a usable CUDA device
    slow: long-running test
"""


# ---------------------------------------------------------------------------------------------------------------
# machine


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - missing or broken: reported as absent
        return None


def machine_info() -> dict:
    import torch

    info = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "torchvision": _version("torchvision"), "cupy": _version("cupy"),
            "triton": _version("triton"), "numpy": _version("numpy"), "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "cuda_available": torch.cuda.is_available(),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update({"gpu": props.name, "gpu_count": torch.cuda.device_count(),
                     "compute_capability": f"{props.major}.{props.minor}",
                     "gpu_memory_gib": round(props.total_memory / 2**30, 1)})
        try:
            import cupy

            v = cupy.cuda.runtime.driverGetVersion()
            info["driver_cuda"] = f"{v // 1000}.{v % 1000 // 10}"
        except Exception:  # noqa: BLE001 - the driver version is a label only
            info["driver_cuda"] = None
        from workloads.ops import cupy_backend

        info["cupy_status"] = cupy_backend.cupy_status()[1]
    return info


# ---------------------------------------------------------------------------------------------------------------
# phases (each runs in its own process: `--phase NAME`)


def gpu_test_files() -> list[str]:
    """Test files that contain gpu-marked tests."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                  if "pytest.mark.gpu" in p.read_text(errors="replace"))


def phase_tests(out: Path, dry_run: bool, deadline: float) -> dict:
    ini = out / "pytest-gpu.ini"
    ini.write_text(PYTEST_INI)
    files = gpu_test_files()
    junit = out / "pytest.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-c", str(ini), "--rootdir", str(ROOT), "--noconftest",
           "-p", "no:cacheprovider", "-rfEs", *files]
    cmd += ["-q", "--collect-only"] if dry_run else ["-v", f"--junitxml={junit}"]
    timeout = max(10.0, deadline - time.time())
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
        output, rc, timed_out = proc.stdout + proc.stderr, proc.returncode, False
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        rc, timed_out = None, True
    (out / "pytest.txt").write_text(output)
    result = {"command": " ".join(cmd[1:]), "files": files, "returncode": rc, "timed_out": timed_out,
              "dry_run": dry_run}
    if dry_run:
        m = re.search(r"(\d+)(?:/\d+)? tests? collected", output) or re.search(r"collected (\d+) items?", output)
        result["collected"] = int(m.group(1)) if m else None
        result["summary"] = "collected only: running them needs a CUDA device"
        return result
    result.update(parse_junit(junit) if junit.exists() and not timed_out else parse_verbose_output(output))
    if timed_out:
        result["summary"] = f"timed out after {timeout:.0f} s; before that: " + result["summary"]
    return result


def parse_verbose_output(output: str) -> dict:
    """Outcome counts from `pytest -v` output, for a run that ended before writing its junit XML."""
    counts = {k: len(re.findall(rf"::\S+ {k.upper()}", output)) for k in ("passed", "failed", "error", "skipped")}
    problems = [{"test": m.group(1), "outcome": m.group(2).lower(), "message": ""}
                for m in re.finditer(r"^(\S+::\S+) (FAILED|ERROR)", output, re.MULTILINE)]
    return {"tests": sum(counts.values()), "passed": counts["passed"], "failures": counts["failed"],
            "errors": counts["error"], "skipped": counts["skipped"], "problems": problems,
            "summary": f"{counts['passed']} passed, {counts['failed']} failed, {counts['error']} errors, "
                       f"{counts['skipped']} skipped (from the output; no junit XML)"}


def parse_junit(path: Path) -> dict:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    problems = []
    for case in root.iter("testcase"):
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                msg = (el.get("message") or el.text or "").strip().splitlines()
                problems.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": tag,
                                 "message": (msg[0] if msg else "")[:300]})
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "passed": passed, "problems": problems,
            "summary": f"{passed} passed, {counts['failures']} failed, {counts['errors']} errors, "
                       f"{counts['skipped']} skipped"}


def dry_stages():
    from benchmarks.bandwidth import InvolutionShape
    from benchmarks.ops import STAGES

    return tuple(InvolutionShape(s.name, 16, max(s.height // 4, 4), max(s.width // 4, 4), count=s.count)
                 for s in STAGES)


def phase_ops(out: Path, dry_run: bool, deadline: float) -> dict:
    import torch

    from benchmarks import ops
    from benchmarks.bandwidth import measure_copy_bandwidth

    device = torch.device("cpu" if dry_run else "cuda")
    conf = DRY_OPS if dry_run else GPU_OPS
    stages = dry_stages() if dry_run else ops.STAGES
    copy_bw = measure_copy_bandwidth(device, (16 << 20) if dry_run else None, iters=3 if dry_run else 20)
    partial = out / "ops.jsonl"
    partial.write_text("")
    rows = []
    for dname in conf["dtypes"]:
        for batch in conf["batches"]:
            for shape in stages:
                for impl in ops.IMPLEMENTATIONS:
                    if time.time() > deadline:
                        new = [{"impl": impl, "layer": shape.name, "channels": shape.channels, "size": shape.height,
                                "batch": batch, "dtype": dname, "pass": p, "skipped": "time budget used up"}
                               for p in ops.PASSES if not (impl == "ours-fused" and p == "forward")]
                    else:
                        print(f"  {impl:10s} {shape.name} {dname} batch {batch}", file=sys.stderr, flush=True)
                        new = ops.bench_layer(impl, shape, batch, ops.DTYPES[dname], device, copy_bw,
                                              conf["repeat"], conf["warmup"])
                    rows += new
                    with partial.open("a") as f:
                        f.writelines(json.dumps(r) + "\n" for r in new)
    return {"device": str(device), "device_name": ops.device_name(device), "copy_bandwidth_bytes_per_s": copy_bw,
            "repeat": conf["repeat"], "warmup": conf["warmup"], "dry_run": dry_run,
            "stages": [f"{s.name} {s.channels}@{s.height}x{s.width} K={s.kernel_size}" for s in stages],
            "rows": rows}


def phase_models(out: Path, dry_run: bool, deadline: float) -> dict:
    from benchmarks import model_speed

    conf = DRY_MODELS if dry_run else GPU_MODELS
    try:
        import torchvision  # noqa: F401

        baseline, note = "torchvision:resnet50", None
    except Exception as exc:  # noqa: BLE001 - the registry's ResNet-50 is the fallback baseline
        baseline, note = "resnet50", f"torchvision unusable ({type(exc).__name__}): baseline is the registry's resnet50"
    report = model_speed.run(list(MODELS), baseline, device="cpu" if dry_run else "cuda", **conf,
                             log=lambda *a, **k: print(*a, file=sys.stderr, **k))
    report["dry_run"] = dry_run
    if note:
        report["note"] = note
    return report


PHASE_FUNCTIONS = {"tests": phase_tests, "ops": phase_ops, "models": phase_models}


def run_phase(name: str, out: Path, dry_run: bool, deadline: float) -> int:
    """Entry point of a phase subprocess: writes out/<name>.json."""
    try:
        result = PHASE_FUNCTIONS[name](out, dry_run, deadline)
    except Exception as exc:  # noqa: BLE001 - reported in the JSON, the orchestrator goes on
        import traceback

        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
    (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0 if "error" not in result else 1


# ---------------------------------------------------------------------------------------------------------------
# orchestration


def _spawn(name: str, out: Path, dry_run: bool, deadline: float) -> dict:
    """Run one phase in its own process group; it stops starting work at `deadline` and the whole group is
    killed GRACE_S later."""
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--phase", name, "--out", str(out), "--deadline",
           f"{deadline:.3f}"] + (["--dry-run"] if dry_run else [])
    t0 = time.time()
    with (out / f"{name}.log").open("w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(5.0, deadline - t0 + GRACE_S))
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            status = "timed out"
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except BaseException:  # Ctrl-C: take the phase's processes down too
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    path = out / f"{name}.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    if status == "timed out" and name == "ops" and (out / "ops.jsonl").exists():
        rows = [json.loads(line) for line in (out / "ops.jsonl").read_text().splitlines() if line.strip()]
        data = {**data, "rows": rows, "partial": True}
    return {"status": status, "seconds": round(time.time() - t0, 1), "data": data,
            "log_tail": (out / f"{name}.log").read_text(errors="replace")[-3000:]}


def check(out: Path, dry_run: bool, budget_s: float = BUDGET_S, phases=PHASES) -> dict:
    import torch

    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if not dry_run and not torch.cuda.is_available():
        dry_run = True
        reason = "no CUDA device: ran as a dry run"
    else:
        reason = "--dry-run" if dry_run else None
    report = {"dry_run": dry_run, "dry_run_reason": reason, "budget_s": budget_s,
              "command": "python -m benchmarks.gpu_check " + " ".join(sys.argv[1:]),
              "machine": machine_info(), "phases": {}}
    end = started + budget_s - GRACE_S
    for i, name in enumerate(PHASES):
        if name not in phases:
            report["phases"][name] = {"status": "skipped", "reason": "not requested (--phases)"}
            continue
        later = sum(PHASE_MIN_S[n] for n in PHASES[i + 1:] if n in phases)
        report["phases"][name] = _spawn(name, out, dry_run, deadline=max(time.time(), end - later))
    report["targets"] = evaluate_targets(report)
    report["total_s"] = round(time.time() - started, 1)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "report.md").write_text(format_report(report))
    return report


# ---------------------------------------------------------------------------------------------------------------
# targets (issue 16), from measured rows only


def _ms(rows, impl, layer, dtype, batch, p):
    for r in rows:
        if (r["impl"], r["layer"], r["dtype"], r["batch"], r["pass"]) == (impl, layer, dtype, batch, p) and "ms" in r:
            return r
    return None


def evaluate_targets(report: dict) -> list[dict]:
    """Each target: what it asks, the worst measured value over the cases it covers, and its status: passed,
    failed (some measured case misses the goal), incomplete (every measured case meets it, some were not
    measured) or not measured; with the reason."""
    dry = report["dry_run"]
    rows = report["phases"].get("ops", {}).get("data", {}).get("rows", [])
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    cases = sorted({(r["dtype"], r["batch"]) for r in rows})
    targets = []

    def ratio_target(name, goal, pairs):
        values = [v for v in pairs if v is not None]
        missing = len(pairs) - len(values)
        if dry or not values:
            why = "dry run: no GPU figure" if dry else "rows not measured"
            return {"target": name, "goal": goal, "status": "not measured", "reason": why}
        worst = min(values)
        status = "failed" if worst < goal else "incomplete" if missing else "passed"
        extra = f"; {missing} case(s) not measured" if missing else ""
        return {"target": name, "goal": goal, "worst": round(worst, 3), "cases": len(pairs),
                "status": status, "reason": f"worst over {len(values)} measured case(s){extra}"}

    def speedup(base, impl, p):
        out = []
        for dtype, batch in cases:
            for layer in layers:
                a, b = _ms(rows, base, layer, dtype, batch, p), _ms(rows, impl, layer, dtype, batch, p)
                out.append(a["ms"] / b["ms"] if a and b else None)
        return out

    targets.append(ratio_target("forward+backward: ours vs published design, every stage", 3.0,
                                speedup("published", "ours", "fwd_bwd")))
    targets.append(ratio_target("forward+backward: ours vs unfold, every stage", 5.0,
                                speedup("unfold", "ours", "fwd_bwd")))
    fractions = []
    for dtype, batch in cases:
        for layer in ("stage1", "stage2"):
            r = _ms(rows, "ours", layer, dtype, batch, "forward")
            fractions.append(r["copy_fraction"] if r else None)
    targets.append(ratio_target("forward: fraction of copy bandwidth at 64@56x56 and 128@28x28", 0.5, fractions))
    bf16 = []
    for batch in sorted({b for _, b in cases}):
        for layer in layers:
            f32 = _ms(rows, "ours", layer, "float32", batch, "fwd_bwd")
            b16 = _ms(rows, "ours", layer, "bfloat16", batch, "fwd_bwd")
            bf16.append(f32["ms"] / b16["ms"] if f32 and b16 else None)
    targets.append(ratio_target("bf16 speed-up over fp32 (ours, forward+backward)", 1.6, bf16))
    results = report["phases"].get("models", {}).get("data", {}).get("results", [])
    by_model = {r["model"]: r for r in results}
    targets.append(ratio_target("training images/s vs ResNet-50 (RedNet-50, CedNet-50; bf16, channels_last)", 0.8,
                                [by_model.get(m, {}).get("train_ratio_vs_baseline") for m in MODELS]))
    return targets


# ---------------------------------------------------------------------------------------------------------------
# report


def format_report(report: dict) -> str:
    from benchmarks import model_speed, ops

    m = report["machine"]
    dry = report["dry_run"]
    title = "DRY RUN on the CPU" if dry else m.get("gpu", "GPU")
    lines = [f"# GPU check: {title}", ""]
    if dry:
        lines += [f"**Dry run ({report['dry_run_reason']}): no GPU figure was measured.** Tiny sizes on the CPU; "
                  "every row that needs CUDA is skipped and listed below. CPU timings say nothing about GPU "
                  "performance.", ""]
    lines += [f"Total time: {report['total_s']:.0f} s (budget {report['budget_s']:.0f} s). "
              f"Command: `{report['command']}`. Date (UTC): {m['date_utc']}.", "", "## Machine", "",
              "| item | value |", "| --- | --- |"]
    for key in ("gpu", "compute_capability", "gpu_memory_gib", "driver_cuda", "torch", "torch_cuda", "cupy",
                "cupy_status", "torchvision", "triton", "numpy", "python", "cpu", "cpu_count"):
        if key in m:
            lines.append(f"| {key} | {m[key]} |")
    lines.append("")
    lines += ["## Phases", "", "| phase | status | seconds |", "| --- | --- | ---: |"]
    for name, ph in report["phases"].items():
        lines.append(f"| {name} | {ph['status']}{' (' + ph['reason'] + ')' if ph.get('reason') else ''} | "
                     f"{ph.get('seconds', 0):.0f} |")
    lines.append("")
    for name, ph in report["phases"].items():
        if "error" in ph.get("data", {}):
            lines += [f"Phase {name} raised: `{ph['data']['error']}`", ""]
        elif ph["status"] not in ("ok", "skipped"):
            lines += [f"Phase {name} log (tail):", "", "```", ph.get("log_tail", "")[-1500:], "```", ""]

    tests = report["phases"].get("tests", {}).get("data", {})
    lines += ["## Tests (`pytest -m gpu`)", ""]
    if tests:
        lines.append(f"Files: {', '.join(tests.get('files', []))}. Result: {tests.get('summary', 'n/a')}"
                     + (f"; {tests['collected']} tests collected." if tests.get("collected") is not None else "."))
        for p in tests.get("problems", []):
            lines.append(f"- {p['outcome']}: `{p['test']}`: {p['message']}")
    lines.append("")

    opsd = report["phases"].get("ops", {}).get("data", {})
    lines += ["## Operator benchmark", ""]
    if opsd.get("rows"):
        lines += [f"Device: {opsd.get('device_name', '?')}; median of {opsd.get('repeat')} CUDA-event timings after "
                  f"{opsd.get('warmup')} warm-up runs, L2 flushed before each; GB/s counts the bytes each pass must "
                  f"move. Shapes: {'; '.join(opsd.get('stages', []))}."
                  + (" Partial: the phase ran out of time." if opsd.get("partial") else ""), "",
                  ops.format_tables(opsd)]
    lines += ["## Targets (issue 16)", "", "| target | goal | worst measured | status |", "| --- | ---: | ---: | --- |"]
    for t in report["targets"]:
        worst = t.get("worst", "—")
        lines.append(f"| {t['target']} | {t['goal']} | {worst} | {t['status']}: {t['reason']} |")
    lines.append("")
    models = report["phases"].get("models", {}).get("data", {})
    lines += ["## Model speed", ""]
    if models.get("results"):
        c = models["config"]
        lines += [f"Batch {c['batch']} at {c['size']} px, bf16 autocast {c['amp_bf16']}, channels_last "
                  f"{c['channels_last']}, {c['warmup']} warm-up + {c['steps']} timed iterations; involution backend "
                  f"'{models.get('involution_backend')}'." + (f" {models['note']}." if models.get("note") else ""),
                  "", model_speed.format_table(models), ""]
    skipped = [r for r in opsd.get("rows", []) if "skipped" in r or "error" in r]
    lines += ["## Not measured", ""]
    if not skipped and not dry:
        lines.append("Every row was measured.")
    for reason in dict.fromkeys(r.get("skipped") or r.get("error") for r in skipped):
        impls = sorted({r["impl"] for r in skipped if (r.get("skipped") or r.get("error")) == reason})
        n = sum(1 for r in skipped if (r.get("skipped") or r.get("error")) == reason)
        lines.append(f"- operator benchmark, {n} rows ({', '.join(impls)}): {reason}")
    if dry:
        lines.append("- tests: gpu-marked tests collected only (they need a CUDA device)")
        lines.append("- every timing: CPU dry run, not a GPU figure")
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for report.md, report.json, raw output")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU; skip what needs CUDA")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help=f"time budget (default {BUDGET_S:.0f} s)")
    parser.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES, help="run only these phases")
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.budget_s <= 30:
        parser.error("--budget-s must be more than 30 seconds")
    if args.phase:
        return run_phase(args.phase, args.out, args.dry_run, args.deadline or time.time() + args.budget_s)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"error: cannot create --out {args.out}: {exc}", file=sys.stderr)
        return 2
    report = check(args.out, args.dry_run, args.budget_s, args.phases)
    print((args.out / "report.md").read_text())
    print(f"wrote {args.out / 'report.md'} and {args.out / 'report.json'} in {report['total_s']:.0f} s")
    bad = [n for n, p in report["phases"].items() if p["status"] not in ("ok", "skipped")]
    tests = report["phases"].get("tests", {}).get("data", {})
    failed_tests = (tests.get("failures") or 0) + (tests.get("errors") or 0)
    return 1 if bad or failed_tests else 0


if __name__ == "__main__":
    sys.exit(main())
