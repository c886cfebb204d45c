"""The prepared GPU command (`python -m benchmarks.gpu_check`) on the CPU: its dry run end to end, the target
evaluation, the junit parsing, and that everything it imports exists on the lent machine's stack (torch, numpy,
pytest; cupy / torchvision / triton only where guarded: no ray, mlflow, mmdet, timm)."""
from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_writes_a_report_that_says_no_gpu_figure_was_measured(tmp_path):
    out = tmp_path / "check"
    assert gpu_check.main(["--out", str(out), "--dry-run"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["dry_run"] is True and report["total_s"] > 0
    assert {n: p["status"] for n, p in report["phases"].items()} == {"tests": "ok", "ops": "ok", "models": "ok"}

    tests = report["phases"]["tests"]["data"]
    assert "tests/test_ops_gpu.py" in tests["files"] and tests["collected"] >= 20

    rows = report["phases"]["ops"]["data"]["rows"]
    measured = {(r["impl"], r["pass"]) for r in rows if "ms" in r}
    assert measured == {(i, p) for i in ("unfold", "torch") for p in ("forward", "backward", "fwd_bwd")}
    skipped = [r for r in rows if "skipped" in r]
    assert {r["impl"] for r in skipped} == {"published", "ours", "ours-fused"}
    assert all(r["skipped"] == "needs a CUDA device" for r in skipped)
    assert {(r["dtype"], r["batch"]) for r in rows} == {(d, b) for d in ("bfloat16", "float32") for b in (1, 2)}
    assert {r["layer"] for r in rows} == {"stage1", "stage2", "stage3", "stage4"}
    assert all(r["gbps"] > 0 and 0 < r["copy_fraction"] for r in rows if "ms" in r)

    models = report["phases"]["models"]["data"]  # benchmarks/model_speed.py, bf16 autocast + channels_last
    assert [r["model"] for r in models["results"]] == ["torchvision:resnet50", "rednet50", "cednet50"]
    assert models["config"]["amp_bf16"] and models["config"]["channels_last"]
    assert models["involution_backend"] == "torch"
    base = models["results"][0]
    for r in models["results"]:
        assert math.isfinite(r["final_loss"])
        for mode in ("train", "infer"):
            assert r[f"{mode}_images_per_s"] > 0
            assert r[f"{mode}_ratio_vs_baseline"] == pytest.approx(r[f"{mode}_images_per_s"] /
                                                                   base[f"{mode}_images_per_s"])
    assert models["results"][1]["params_m"] < base["params_m"]  # RedNet-50 is the smaller network
    assert all(t["status"] == "not measured" for t in report["targets"]) and len(report["targets"]) == 5

    md = (out / "report.md").read_text()
    assert "no GPU figure was measured" in md and "Total time:" in md
    assert "needs a CUDA device" in md and "collected only" in md
    for name in ("report.json", "pytest.txt", "ops.jsonl", "ops.json", "models.json", "tests.log"):
        assert (out / name).exists(), name


def _rows(impl, ms_by_layer, dtype="bfloat16", batch=128, p="fwd_bwd", fraction=0.6):
    return [{"impl": impl, "layer": layer, "dtype": dtype, "batch": batch, "pass": p, "ms": ms,
             "copy_fraction": fraction} for layer, ms in ms_by_layer.items()]


def test_targets_are_evaluated_from_measured_rows_only():
    layers = ("stage1", "stage2")
    rows = (_rows("ours", dict.fromkeys(layers, 1.0)) + _rows("published", {"stage1": 3.5, "stage2": 2.0})
            + _rows("unfold", dict.fromkeys(layers, 6.0)) + _rows("ours", dict.fromkeys(layers, 1.7), "float32")
            + _rows("ours", dict.fromkeys(layers, 0.2), p="forward", fraction=0.55)
            + _rows("ours", dict.fromkeys(layers, 0.3), "float32", p="forward", fraction=0.7))
    models = [{"model": "torchvision:resnet50", "train_ratio_vs_baseline": 1.0},
              {"model": "rednet50", "train_ratio_vs_baseline": 0.85}, {"model": "cednet50"}]
    report = {"dry_run": False, "phases": {"ops": {"data": {"rows": rows}}, "models": {"data": {"results": models}}}}
    by_goal = {t["goal"]: t for t in gpu_check.evaluate_targets(report)}
    assert by_goal[3.0]["status"] == "failed" and by_goal[3.0]["worst"] == 2.0  # stage2: only 2x the published
    assert by_goal[5.0]["status"] == "incomplete" and by_goal[5.0]["worst"] == 6.0  # no float32 unfold rows
    assert "2 case(s) not measured" in by_goal[5.0]["reason"]
    assert by_goal[0.5]["status"] == "passed" and by_goal[0.5]["worst"] == 0.55
    assert by_goal[1.6]["status"] == "passed" and by_goal[1.6]["worst"] == 1.7
    assert by_goal[0.8]["status"] == "incomplete" and by_goal[0.8]["worst"] == 0.85  # cednet50 not measured
    models[2]["train_ratio_vs_baseline"] = 0.7
    assert {t["goal"]: t for t in gpu_check.evaluate_targets(report)}[0.8]["status"] == "failed"
    dry = gpu_check.evaluate_targets({**report, "dry_run": True})
    assert all(t["status"] == "not measured" and "dry run" in t["reason"] for t in dry)


def test_parse_junit(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text("""<testsuites><testsuite tests="4" failures="1" errors="0" skipped="1">
      <testcase classname="tests.test_ops_gpu" name="test_a"/>
      <testcase classname="tests.test_ops_gpu" name="test_b"><failure message="assert 1 == 2">trace</failure></testcase>
      <testcase classname="tests.test_ops_gpu" name="test_c"><skipped message="CuPy backend unusable"/></testcase>
      <testcase classname="tests.test_ops_gpu" name="test_d"/></testsuite></testsuites>""")
    got = gpu_check.parse_junit(xml)
    assert (got["passed"], got["failures"], got["skipped"]) == (2, 1, 1)
    assert {p["outcome"] for p in got["problems"]} == {"failure", "skipped"}
    assert got["summary"] == "2 passed, 1 failed, 0 errors, 1 skipped"


def test_parse_verbose_output_of_an_interrupted_run():
    out = ("tests/test_ops_gpu.py::test_a[x] PASSED                 [  1%]\n"
           "tests/test_ops_gpu.py::test_b FAILED                    [  2%]\n"
           "tests/test_ops_gpu.py::test_c SKIPPED (CuPy unusable)   [  3%]\n")
    got = gpu_check.parse_verbose_output(out)
    assert (got["passed"], got["failures"], got["skipped"]) == (1, 1, 1)
    assert got["problems"] == [{"test": "tests/test_ops_gpu.py::test_b", "outcome": "failed", "message": ""}]


def test_bad_arguments_are_clear(capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["--dry-run"])
    assert "--out" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_check.main(["--out", "x", "--budget-s", "5"])
    assert "--budget-s must be more than 30" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# the lent machine's stack

MISSING_ON_THE_GPU_MACHINE = ("ray", "mlflow", "mmdet", "mmcv", "mmengine", "mmseg", "timm", "pycocotools")

IMPORT_EVERYTHING = """
import importlib.abc, importlib.util, sys
BLOCKED = set(sys.argv[1].split(","))

class NotOnTheGpuMachine(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not installed on the lent GPU machine")
        return None

sys.meta_path.insert(0, NotOnTheGpuMachine())
import torch
from benchmarks import bandwidth, gpu_check, model_speed, nvrtc, ops, published_kernels, timing  # noqa
import workloads.ops, workloads.models  # noqa
for f in gpu_check.gpu_test_files():
    spec = importlib.util.spec_from_file_location(f.replace("/", "_")[:-3], f)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
with torch.device("meta"):
    for name in ("rednet50", "cednet50"):
        model_speed.build(name, 10)
gpu_check.machine_info()
print("imports ok:", sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED))
"""


def test_the_gpu_command_imports_nothing_the_lent_machine_lacks():
    """Everything the prepared command and its gpu test files import works with ray, mlflow, mmdet, mmcv,
    mmengine, mmseg, timm and pycocotools missing (their imports fail here, as there)."""
    import subprocess

    proc = subprocess.run([sys.executable, "-c", IMPORT_EVERYTHING, ",".join(MISSING_ON_THE_GPU_MACHINE)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "imports ok: []" in proc.stdout


def test_the_gpu_tests_do_not_need_the_project_conftest():
    """gpu_check runs pytest with --noconftest (the conftest may import what the lent machine lacks), so no gpu
    test file may use a fixture the conftest defines."""
    import ast

    tree = ast.parse((ROOT / "tests" / "conftest.py").read_text())
    fixtures = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)
                and any("fixture" in ast.unparse(d) for d in node.decorator_list)}
    for f in gpu_check.gpu_test_files():
        text = (ROOT / f).read_text()
        assert not [name for name in fixtures if re.search(rf"\b{name}\b", text)], f
