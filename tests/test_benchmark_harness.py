"""The benchmark harness: bandwidth byte counts and floor, the comparison table, the operator benchmark,
timing, and model_speed on CPU."""
from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import bandwidth as bw
from benchmarks import model_speed, timing
from benchmarks import ops as ops_bench


# ------------------------------------------------------------------------------------------------------
# bandwidth.py
# ------------------------------------------------------------------------------------------------------
def test_involution_bytes_matches_hand_count_stride1_float32():
    # B=2, C=32, 8x8, G=2, K=3, stride 1 (pad 1 -> 8x8 output), 4-byte elements:
    # x = 2*32*8*8 = 4096, kernel = 2*2*3*3*8*8 = 2304, y = 4096 elements.
    # forward = x + kernel + y = 10496 elements; backward = gy + x + kernel (read) + gx + gk (written)
    #         = 4096 + 4096 + 2304 + 4096 + 2304 = 16896 elements.
    got = bw.involution_bytes(2, 32, 8, 8, 2, 3, dtype=torch.float32)
    assert got == {"forward": 10496 * 4, "backward": 16896 * 4, "total": (10496 + 16896) * 4}


def test_involution_bytes_matches_hand_count_stride2_bfloat16():
    # stride 2 -> 4x4 output: y = 2*32*4*4 = 1024, kernel = 2*2*9*16 = 576; 2-byte elements.
    got = bw.involution_bytes(2, 32, 8, 8, 2, 3, stride=2, dtype=torch.bfloat16)
    assert got["forward"] == (4096 + 576 + 1024) * 2
    assert got["backward"] == (1024 + 4096 + 576 + 4096 + 576) * 2
    # dilation 2 with default padding keeps the spatial size; non-square input
    got = bw.involution_bytes(1, 16, 10, 6, 1, 3, dilation=2, dtype=torch.float64)
    x, ker = 16 * 60, 9 * 60
    assert got["forward"] == (x + ker + x) * 8


@pytest.mark.parametrize("kwargs,match", [
    ({"channels": 30, "groups": 4}, "divisible by groups"),
    ({"batch": 0}, "batch must be a positive int; got 0"),
    ({"kernel_size": 2.5}, "kernel_size must be a positive int"),
    ({"height": 2, "width": 2, "kernel_size": 7, "padding": 0}, "too small"),
])
def test_involution_bytes_rejects_bad_input(kwargs, match):
    args = {"batch": 1, "channels": 32, "height": 8, "width": 8, "groups": 2, "kernel_size": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        bw.involution_bytes(**args)


def test_rednet50_layers_are_consistent():
    names = [s.name for s in bw.REDNET50_LAYERS]
    assert len(names) == len(set(names))
    for s in bw.REDNET50_LAYERS:
        assert s.channels % s.group_channels == 0 and s.groups == s.channels // 16
        ho = bw.output_size(s.height, s.kernel_size, s.stride)
        assert ho == math.ceil(s.height / s.stride)


def test_rednet50_layers_match_the_model():
    """The layer list (shapes and counts) is exactly what build_model('rednet50') runs at 224 px (meta device)."""
    from workloads.models import build_model
    from workloads.ops import Involution2d

    with torch.device("meta"):
        model = build_model("rednet50")
    seen = {}

    def hook(mod, inp, out):
        key = (mod.channels, *inp[0].shape[2:], mod.kernel_size, mod.stride, mod.groups)
        seen[key] = seen.get(key, 0) + 1

    for mod in model.modules():
        if isinstance(mod, Involution2d):
            mod.register_forward_hook(hook)
    model(torch.zeros(1, 3, 224, 224, device="meta"))
    expected = {(s.channels, s.height, s.width, s.kernel_size, s.stride, s.groups): s.count
                for s in bw.REDNET50_LAYERS}
    assert seen == expected


def test_copy_bandwidth_on_cpu_and_bound_table():
    rate = bw.measure_copy_bandwidth("cpu", nbytes=4 << 20, iters=3, warmup=1)
    assert math.isfinite(rate) and rate > 1e7  # any machine copies faster than 10 MB/s
    rows = bw.bound_table(bw.REDNET50_LAYERS[:2], 4, ["bfloat16", "float32"], bandwidth=1e9)
    assert len(rows) == 4
    r = rows[0]
    expected = bw.shape_bytes(bw.REDNET50_LAYERS[0], 4, torch.bfloat16)
    assert r["bytes_forward"] == expected["forward"] and r["bytes_total"] == expected["total"]
    assert r["bound_forward_us"] == pytest.approx(expected["forward"] / 1e9 * 1e6)
    assert rows[2]["bytes_total"] == 2 * r["bytes_total"]  # float32 moves twice the bf16 bytes
    with pytest.raises(ValueError, match="nbytes"):
        bw.measure_copy_bandwidth("cpu", nbytes=16)


def test_compare_times_implementations_on_cpu():
    layers = [bw.InvolutionShape("tiny", 32, 9, 11, kernel_size=3, stride=2),
              bw.InvolutionShape("tiny2", 16, 6, 6, kernel_size=3, count=2)]
    impls = bw.implementations(torch.device("cpu"))
    assert "unfold" in impls and "published" not in impls  # published needs CUDA + CuPy
    rows = bw.compare(layers, 2, ["float32"], 1e9, torch.device("cpu"), impls, repeat=1, warmup=0,
                      log=lambda *a, **k: None)
    assert {r["impl"] for r in rows} == set(impls)
    for r in rows:
        assert r["forward_ms"] > 0 and r["fwd_bwd_ms"] > 0
        assert r["forward_x_floor"] == pytest.approx(r["forward_ms"] / r["floor_forward_ms"])
    table = bw.format_comparison(rows)
    assert "float32, forward, batch 2" in table and "float32, forward+backward, batch 2" in table
    unfold = next(r for r in rows if r["impl"] == "unfold")
    assert f"| tiny | {unfold['floor_forward_ms']:.3f} | {unfold['forward_ms']:.3f} (" in table
    u2 = next(r for r in rows if r["impl"] == "unfold" and r["layer"] == "tiny2")
    total = unfold["forward_ms"] + 2 * u2["forward_ms"]
    assert f"| all layers x count | {unfold['floor_forward_ms'] + 2 * u2['floor_forward_ms']:.3f} | {total:.3f} (" \
        in table


def test_a_failing_backend_does_not_abort_the_sweep(monkeypatch):
    """One implementation raising (a kernel error, a missing module) leaves 'error' rows; the others are timed."""
    real = ops_bench.implementation

    def broken(name):
        if name == "torch":
            def fail(x, k, s):
                raise RuntimeError("CUDA error: an illegal memory access was encountered (test)")
            return fail, None
        return real(name)

    monkeypatch.setattr(ops_bench, "implementation", broken)
    layers = [bw.InvolutionShape("tiny", 16, 6, 6, kernel_size=3), bw.InvolutionShape("tiny2", 16, 5, 5, kernel_size=3)]
    rows = bw.compare(layers, 1, ["float32"], 1e9, torch.device("cpu"), ["torch", "unfold"], repeat=1, warmup=0,
                      log=lambda *a, **k: None)
    assert [r["impl"] for r in rows] == ["torch", "unfold", "torch", "unfold"]
    assert all("illegal memory access" in r["error"] for r in rows if r["impl"] == "torch")
    assert all(r["forward_ms"] > 0 and "error" not in r for r in rows if r["impl"] == "unfold")
    table = bw.format_comparison(rows)
    assert "| tiny | " in table and " error |" in table and "| all layers x count |" in table


def test_bandwidth_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "bw.json"
    rc = bw.main(["--device", "cpu", "--batch", "2", "--copy-mib", "4", "--iters", "2", "--dtype", "float32",
                  "--layers", "stage4", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["machine"]["device_type"] == "cpu" and report["copy_bandwidth_bytes_per_s"] > 0
    assert [r["name"] for r in report["layers"]] == ["stage4"]
    assert bw.main(["--device", "cpu", "--layers", "nope"]) == 2
    assert "unknown layer" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------
# ops.py and timing.py
# ------------------------------------------------------------------------------------------------------
def test_ops_benchmark_quick_run_writes_every_pass_and_says_why_rows_are_missing(tmp_path, capsys):
    out = tmp_path / "ops.json"
    assert ops_bench.main(["--quick", "--batch", "1", "--device", "cpu", "--dtype", "float32", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    measured = [r for r in data["rows"] if "ms" in r]
    assert {(r["impl"], r["pass"]) for r in measured} == {(i, p) for i in ("unfold", "torch") for p in ops_bench.PASSES}
    assert all(r["layer"] == "stage4" and r["channels"] == 512 and r["gbps"] > 0 for r in measured)
    for r in measured:  # GB/s is the pass's minimal traffic over its time; fraction against the measured copy
        assert r["gbps"] == pytest.approx(r["bytes"] / (r["ms"] * 1e-3) / 1e9)
        assert r["copy_fraction"] == pytest.approx(r["gbps"] * 1e9 / data["copy_bandwidth_bytes_per_s"])
    skipped = {(r["impl"], r["pass"]): r["skipped"] for r in data["rows"] if "skipped" in r}
    assert set(skipped) == {("published", p) for p in ops_bench.PASSES} | {("ours", p) for p in ops_bench.PASSES} | {
        ("ours-fused", "backward"), ("ours-fused", "fwd_bwd")}
    assert set(skipped.values()) == {"needs a CUDA device"}
    printed = capsys.readouterr().out
    assert "float32, fwd_bwd, batch 1" in printed and "skipped: needs a CUDA device" in printed


def test_time_ms_median_on_cpu_and_rejects_bad_counts():
    calls = []
    assert timing.time_ms(lambda: calls.append(1), "cpu", repeat=5, warmup=2) >= 0 and len(calls) == 7
    with pytest.raises(ValueError, match="repeat >= 1"):
        timing.time_ms(lambda: None, "cpu", repeat=0)


# ------------------------------------------------------------------------------------------------------
# model_speed.py
# ------------------------------------------------------------------------------------------------------
def test_model_speed_rejects_unknown_model(capsys):
    assert model_speed.main(["--models", "rednet51", "--device", "cpu", "--baseline", "rednet51"]) == 2
    assert "unknown model 'rednet51'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="batch must be a positive int"):
        model_speed.run(["rednet50"], "torchvision:resnet50", device="cpu", batch=0)


def test_model_speed_keeps_going_when_one_model_fails(monkeypatch):
    real = model_speed.build

    def build(spec, num_classes):
        if spec == "rednet26":
            raise RuntimeError("out of memory (test)")
        return real(spec, num_classes)

    monkeypatch.setattr(model_speed, "build", build)
    report = model_speed.run(["rednet26", "resnet26"], "resnet26", device="cpu", batch=2, size=32, steps=1, warmup=0,
                             num_classes=10, modes=("infer",), log=lambda *a, **k: None)
    by_model = {r["model"]: r for r in report["results"]}
    assert "out of memory (test)" in by_model["rednet26"]["error"]
    assert by_model["resnet26"]["infer_images_per_s"] > 0 and "train_images_per_s" not in by_model["resnet26"]
    assert "failed: RuntimeError: out of memory (test)" in model_speed.format_table(report)


# ------------------------------------------------------------------------------------------------------
# data.py (the shard readers; no Ray, no S3 server)
# ------------------------------------------------------------------------------------------------------
def test_data_benchmark_reads_every_image_once_per_pass_with_every_reader(tmp_path, monkeypatch, capsys):
    """Tiny generated JPEGs, sharded by the project's writer, read by the folder path, ShardStream and (when
    installed) the webdataset library: every reader delivers each of the 24 images once per pass, with the
    same labels; then a shard set given as --source, of which only the first 12 samples are read."""
    from benchmarks import data as data_bench

    monkeypatch.setattr(data_bench, "SHAPES", ((64, 48), (48, 64)))
    readers = ["folder", "shards"] + (["webdataset"] if data_bench._importable("webdataset") else [])
    out = tmp_path / "data.json"
    rc = data_bench.main(["--images", "24", "--batch", "8", "--size", "32", "--passes", "2", "--recipes", "paper",
                          "--shard-size-mb", "0.01", "--workers", "1", "--readers", *readers, "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["images"]["images"] == 24 and report["shards"] > 2  # several shards, each streamed in turn
    rows = {r["reader"]: r for r in report["results"]}
    assert list(rows) == readers
    for r in rows.values():
        assert r["images_per_pass"] == [24, 24]
        assert r["per_class"] == {str(c): 3 for c in range(data_bench.CLASSES)}  # 24 images, 8 classes
        assert 0 < r["cpu_ms_per_image"] < 1e3 and 0 < r["mean_cpu_ms_per_image"] < 1e3
        assert r["images_per_s_per_worker"] == pytest.approx(1e3 / r["mean_cpu_ms_per_image"])
        (run,) = r["loader"]
        assert run["loader_workers"] == 1 and run["images"] == 2 * 24 - 8 and run["images_per_s"] > 0
    printed = capsys.readouterr().out
    assert "| paper | shards |" in printed
    assert all(note.endswith("-s3: no S3 (--s3-local, --s3 URI or an s3:// source)") for note in report["left_out"])

    # A shard set as the source: the first 12 training samples, read by every reader (the last shard cut short).
    shard_set = tmp_path / "set"
    from workloads.classification.shard_writer import write_shards

    data_bench.make_images(tmp_path / "images", 20)
    write_shards(str(tmp_path / "images"), str(shard_set), shard_size_mb=0.03, progress=lambda msg: None)
    assert data_bench.first_samples([{"samples": 5}, {"samples": 5}, {"samples": 5}], 7) == \
        ([{"samples": 5}, {"samples": 2}], True)
    assert data_bench.main(["--source", str(shard_set), "--images", "12", "--batch", "4", "--size", "32",
                            "--passes", "1", "--recipes", "paper", "--workers", "--readers", *readers,
                            "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    counts = [r["per_class"] for r in report["results"]]
    assert all(r["images_per_pass"] == [12] and r["loader"] == [] for r in report["results"])
    assert all(c == counts[0] and sum(c.values()) == 12 for c in counts)
