"""Checks of the CUDA kernels in `workloads/ops/involution.cu` that need no GPU. None of them is ever skipped.

1. NVRTC (torch's libnvrtc: the compiler CuPy uses, with CuPy's options for an H100/H200) compiles
   - every instantiation the backend can request for the configurations the models use (K=7 stride 1 and 2, the
     K=3 stem): every dtype x kind x index width x vector width (padding, shapes and the gate are run-time
     arguments), with ptxas reporting no register spills for the 32-bit variants, and
   - every kind for the whole K {1,3,5,7} x stride {1,2} x dilation {1,2} grid, each configuration in one dtype
     laid out as a Latin square (every K and every stride/dilation pair meets every dtype: dtype-specific code is
     the same template code for every K/S/D, and the full cross product is compiled and run by the emulator
     below). About 180 NVRTC instantiations, ~1.5 min of CPU.
   The half types' PTX conversions are compiled this way only (the emulator runs the host branches).
2. The same kernels compiled with g++ under the CPU emulator (benchmarks/cuda_emulator.py: one fiber per CUDA
   thread, __syncthreads as a barrier, poisoned shared memory with guard zones, NaN-framed global buffers), one
   library per dtype, driven through the backend's own tensor-level functions and launch plans
   (`cupy_backend.involution_forward/backward(..., launcher=...)`), against a float64 reference with the
   dtype-rounding tolerance of `workloads.ops.testing`, over the shape grid: K 1/3/5/7, stride 1/2, dilation 1/2,
   groups, odd non-square sizes, inputs smaller than the kernel span, padding larger than "same", vector widths,
   several channel passes, 32- and 64-bit indices, three thread orders, gate on and off, split and fused backward.
3. The emulator itself catches a missing barrier, barrier divergence and out-of-bounds shared/global writes.
4. The host half/bfloat16 conversions agree with torch's bit for bit; the planner's choices are consistent.
"""
from __future__ import annotations

import itertools
import re
import zlib
from dataclasses import dataclass

import pytest
import torch

from benchmarks import cuda_emulator as ce
from benchmarks import nvrtc
from workloads.ops import cupy_backend as cb
from workloads.ops import testing
from workloads.ops.torch_backend import output_size

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DTYPE_IDS = {torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16"}
MODEL_CONFIGS = [(7, 1, 1), (7, 2, 1), (3, 1, 1)]  # (K, stride, dilation): RedNet/CedNet stages and stem
GRID = list(itertools.product([1, 3, 5, 7], [1, 2], [1, 2]))
NVRTC_OPTIONS = nvrtc.CUPY_OPTIONS + cb.NVRTC_OPTIONS


# ---------------------------------------------------------------------------------------------------------------
# 1. NVRTC


def _ptxas_report(log: str) -> dict[str, tuple[int, int]]:
    """mangled entry -> (registers, spill bytes) from NVRTC's --ptxas-options=-v log."""
    report, entry = {}, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            entry = m.group(1)
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and entry:
            report[entry] = (report.get(entry, (0, 0))[0], int(m.group(1)) + int(m.group(2)))
        m = re.search(r"Used (\d+) registers", line)
        if m and entry:
            report[entry] = (int(m.group(1)), report.get(entry, (0, 0))[1])
    return report


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_nvrtc_compiles_every_variant_of_the_model_configurations(dtype):
    names = [n for k, s, d in MODEL_CONFIGS for n in cb.instantiations(dtype, k, s, d)]
    prog = nvrtc.compile_program(cb.source(), names, NVRTC_OPTIONS + ("--ptxas-options=-v",), "involution.cu")
    assert len(set(prog.lowered.values())) == len(names) and prog.binary
    report = _ptxas_report(prog.log)
    assert set(report) >= set(prog.lowered.values()), prog.log[-3000:]
    for name, mangled in prog.lowered.items():
        registers, spills = report[mangled]
        assert registers <= 255, (name, registers)
        if ", int," in name:  # the variants every model-sized tensor uses
            assert spills == 0, f"{name} spills {spills} bytes of registers"


def _grid_dtype(k: int, s: int, d: int) -> torch.dtype:
    """A Latin square over the grid: every K, and every (stride, dilation) pair, meets every dtype."""
    return DTYPES[([1, 3, 5, 7].index(k) + 2 * (s - 1) + (d - 1)) % 4]


def test_nvrtc_compiles_the_shape_grid():
    names = []
    for k, s, d in GRID:
        dtype, v = _grid_dtype(k, s, d), max(cb.vector_choices(k))
        names += [cb.name_expression("forward", dtype, 32, k, s, d, v),
                  cb.name_expression("grad_kernel", dtype, 32, k, s, d, v),
                  cb.name_expression("grad_input", dtype, 32, k, s, d)]
        if s == 1:
            names.append(cb.name_expression("backward_fused", dtype, 32, k, s, d))
    assert {_grid_dtype(*c) for c in GRID if c[0] == 5} == set(DTYPES)
    assert {_grid_dtype(k, 2, 1) for k in (1, 3, 5, 7)} == set(DTYPES)
    prog = nvrtc.compile_program(cb.source(), names, NVRTC_OPTIONS, "involution.cu")
    assert len(set(prog.lowered.values())) == len(names)


def test_nvrtc_half_types_use_the_ptx_conversions():
    names = [cb.name_expression("forward", dt, 32, 3, 1, 1) for dt in (torch.float16, torch.bfloat16)]
    prog = nvrtc.compile_program(cb.source(), names, ("-arch=compute_90",) + cb.NVRTC_OPTIONS, "involution.cu")
    ptx = prog.binary.decode(errors="replace")
    assert "cvt.f32.f16" in ptx and "cvt.rn.f16.f32" in ptx
    assert ".entry" in ptx and "involution_probe" in ptx


def test_nvrtc_reports_compile_errors_with_the_log():
    with pytest.raises(nvrtc.NvrtcError, match="undefined_thing"):
        nvrtc.compile_program("__global__ void k() { undefined_thing(); }", (), NVRTC_OPTIONS, "bad.cu")


# ---------------------------------------------------------------------------------------------------------------
# 2. emulated kernels against the float64 reference


@dataclass(frozen=True)
class Case:
    dtype: torch.dtype
    shape: str
    b: int
    c: int
    g: int
    h: int
    w: int
    k: int
    stride: int
    dilation: int
    padding: int
    index_bits: int
    order: str

    @property
    def id(self) -> str:
        return (f"{DTYPE_IDS[self.dtype]}-K{self.k}s{self.stride}d{self.dilation}-{self.shape}-{self.b}x{self.c}"
                f"x{self.h}x{self.w}g{self.g}p{self.padding}-i{self.index_bits}-{self.order}")


def _cases() -> list[Case]:
    cases = []
    orders = itertools.cycle(ce.ORDERS)
    for dtype in DTYPES:
        for k, s, d in GRID:
            span = d * (k - 1) + 1
            same = d * (k - 1) // 2
            shapes = [("odd", 2, 12, 3, 9, 11, same, 32),                      # odd, non-square, 3 groups
                      ("pad", 2, 6, 1, 7, 5, same + 2, 64)]                    # padding > same; 64-bit indices
            if k > 1:
                shapes.append(("tiny", 1, 8, 2, span - 1, max(1, span - 2), same, 32))  # input < kernel span
            if k <= 5:
                shapes.append(("wide", 1, 8, 2, 5, 16, same, 32))             # vector widths 2 and 4
            if k == 7:
                shapes.append(("passes", 1, 96, 1, 6, 7, same, 32))           # several channel passes
            for shape, b, c, g, h, w, p, bits in shapes:
                cases.append(Case(dtype, shape, b, c, g, h, w, k, s, d, p, bits, next(orders)))
    return cases


CASES = _cases()


def _inputs(case: Case):
    gen = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))
    ho, wo = output_size(case.h, case.w, case.k, case.stride, case.padding, case.dilation)
    assert ho >= 1 and wo >= 1, case
    x = torch.randn(case.b, case.c, case.h, case.w, generator=gen, dtype=torch.float64).to(case.dtype)
    kernel = torch.randn(case.b, case.g, case.k, case.k, ho, wo, generator=gen, dtype=torch.float64).to(case.dtype)
    gy = torch.randn(case.b, case.c, ho, wo, generator=gen, dtype=torch.float64).to(case.dtype)
    gate = torch.rand(case.b, case.c, generator=gen, dtype=torch.float64).to(cb.ACC_DTYPES[case.dtype]) + 0.25
    return x, kernel, gy, gate


def _run_case(case: Case, launcher) -> dict:
    """Every call the backend makes for this case: forward with and without gate, and the backward variants."""
    x, kernel, gy, gate = _inputs(case)
    geo = (case.stride, case.padding, case.dilation)
    kw = {"launcher": launcher, "index_bits": case.index_bits}
    out = {"plain": {"y": cb.involution_forward(x, kernel, *geo, **kw)},
           "gated": {"y": cb.involution_forward(x, kernel, *geo, gate=gate, **kw)}}
    modes = ["split", "fused"] if case.stride == 1 else ["split"]
    for mode in modes:
        gx, gk, gg = cb.involution_backward(gy, x, kernel, *geo, gate=gate, backward=mode, **kw)
        out[f"gated-{mode}"] = {"grad_x": gx, "grad_kernel": gk, "grad_gate": gg}
        gx, gk, _ = cb.involution_backward(gy, x, kernel, *geo, backward=mode, **kw)
        out[f"plain-{mode}"] = {"grad_x": gx, "grad_kernel": gk}
    _, gk, _ = cb.involution_backward(gy, x, kernel, *geo, gate=gate, need_input=False, need_gate=False, **kw)
    out["kernel-only"] = {"grad_kernel": gk}
    gx, _, gg = cb.involution_backward(gy, x, kernel, *geo, gate=gate, need_kernel=False, **kw)
    out["input-only"] = {"grad_x": gx, "grad_gate": gg}
    return out


def _record_names(case: Case) -> set[tuple[str, int]]:
    names = set()
    _run_case(case, lambda launch, tensors: names.add((launch.name, launch.index_bits)))
    return names


def _emulator_launcher(emulator, order: str):
    def launch(plan: cb.Launch, tensors):
        emulator.launch(plan.name, (plan.grid,), plan.block, plan.shared_mem, [*tensors, *plan.scalars],
                        outputs={4, 5}, order=order, max_grid=2)
    return launch


@pytest.fixture(scope="module")
def emulators(tmp_path_factory):
    """One emulator library per dtype, built on first use with exactly the kernels the cases launch.

    A compile error fails the test that needs it; nothing is skipped."""
    built = {}

    def get(dtype):
        if dtype not in built:
            names = set().union(*(_record_names(c) for c in CASES if c.dtype == dtype))
            specs = [ce.KernelSpec(n, cb.param_types(dtype, bits)) for n, bits in sorted(names)]
            built[dtype] = ce.build(cb.SOURCE_PATH, specs, tmp_path_factory.mktemp(f"emu_{DTYPE_IDS[dtype]}"),
                                    opt="-O0", name=f"involution_{DTYPE_IDS[dtype]}")
        return built[dtype]
    return get


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_emulated_kernels_match_float64_within_rounding(emulators, case):
    results = _run_case(case, _emulator_launcher(emulators(case.dtype), case.order))
    x, kernel, gy, gate = _inputs(case)
    geo = (case.stride, case.padding, case.dilation)
    refs = {"plain": testing.reference(x, kernel, *geo, grad_out=gy),
            "gated": testing.reference(x, kernel, *geo, gate=gate, grad_out=gy)}
    for label, got in results.items():
        gated = label.startswith("gated") or label in ("kernel-only", "input-only")
        try:
            testing.check_all(got, refs["gated" if gated else "plain"], case.dtype, x.shape, kernel.shape, gated)
        except AssertionError as exc:
            raise AssertionError(f"{label}: {exc}") from None


def test_planner_uses_several_channel_passes_and_both_index_widths():
    """The grid above really exercises what its labels say."""
    passes = next(c for c in CASES if c.shape == "passes" and c.dtype == torch.float32)
    p = cb.Problem(passes.b, passes.c, passes.h, passes.w, passes.g, passes.k, passes.h, passes.w, 1, 3, 1)
    launch = cb.plan("forward", torch.float32, p)
    assert launch.scalars[-1] < passes.c // passes.g  # CB < channels per group: several passes
    wide = cb.plan("forward", torch.float32, cb.Problem(1, 8, 5, 16, 2, 3, 5, 16, 1, 1, 1))
    assert wide.vector == 4 and wide.name.endswith(", 4>")
    assert {c.index_bits for c in CASES} == {32, 64} and {c.order for c in CASES} == set(ce.ORDERS)


# ---------------------------------------------------------------------------------------------------------------
# 3. the emulator catches what a GPU would punish

SELF_TEST_SOURCE = r"""
template <int SYNC> __global__ void reverse_through_smem(const float* in, float* out, int n) {
    CV_DYNAMIC_SMEM(raw);
    float* s = reinterpret_cast<float*>(raw);
    const int t = threadIdx.x;
    s[t] = in[t];
    if (SYNC) __syncthreads();
    out[t] = s[n - 1 - t];
}
__global__ void divergent_barrier(float* out, int n) {
    if ((int)threadIdx.x < n) __syncthreads();
    out[threadIdx.x] = 1.0f;
}
__global__ void smem_overflow(float* out, int n) {
    CV_DYNAMIC_SMEM(raw);
    reinterpret_cast<float*>(raw)[threadIdx.x + n] = 1.0f;
    out[threadIdx.x] = 0.0f;
}
__global__ void global_overflow(float* out, int n) { out[threadIdx.x + n] = 1.0f; }
"""


@pytest.fixture(scope="module")
def self_test_emulator(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("emu_self")
    src = tmp / "self_test.cu"
    src.write_text(SELF_TEST_SOURCE)
    specs = [ce.KernelSpec("reverse_through_smem<1>", ("const float*", "float*", "int")),
             ce.KernelSpec("reverse_through_smem<0>", ("const float*", "float*", "int")),
             ce.KernelSpec("divergent_barrier", ("float*", "int")),
             ce.KernelSpec("smem_overflow", ("float*", "int")),
             ce.KernelSpec("global_overflow", ("float*", "int"))]
    return ce.build(src, specs, tmp, opt="-O0", name="self_test")


@pytest.mark.parametrize("order", list(ce.ORDERS))
def test_emulator_runs_phases_between_barriers_and_exposes_a_missing_one(self_test_emulator, order):
    x = torch.arange(64, dtype=torch.float32)
    out = torch.empty(64)
    self_test_emulator.launch("reverse_through_smem<1>", (1,), (64,), 256, [x, out, 64], outputs={1}, order=order)
    assert torch.equal(out, x.flip(0))
    self_test_emulator.launch("reverse_through_smem<0>", (1,), (64,), 256, [x, out, 64], outputs={1}, order=order)
    assert not torch.equal(out, x.flip(0))  # read before the other threads wrote: poisoned NaN or stale values


def test_emulator_rejects_barrier_divergence_and_out_of_bounds_writes(self_test_emulator):
    out = torch.empty(32)
    with pytest.raises(ce.EmulationError, match="barrier divergence"):
        self_test_emulator.launch("divergent_barrier", (1,), (32,), 0, [out, 16], outputs={0})
    with pytest.raises(ce.EmulationError, match="shared memory written outside the 128-byte allocation"):
        self_test_emulator.launch("smem_overflow", (1,), (32,), 128, [out, 8], outputs={0})
    with pytest.raises(ce.EmulationError, match="argument 0 was written outside its 32 elements"):
        self_test_emulator.launch("global_overflow", (1,), (32,), 0, [out, 4], outputs={0})
    self_test_emulator.launch("global_overflow", (1,), (32,), 0, [torch.empty(40), 4], outputs={0})
    with pytest.raises(ce.EmulationError, match="takes 2 arguments"):
        self_test_emulator.launch("global_overflow", (1,), (32,), 0, [out], outputs={0})


# ---------------------------------------------------------------------------------------------------------------
# 4. host conversions and the planner

CONVERSION_SOURCE = r"""
template <typename H> __global__ void to_float(const H* in, float* out, int n) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) out[i] = cv_load(in[i]);
}
template <typename H> __global__ void from_float(const float* in, H* out, int n) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) out[i] = cv_store<H>(in[i]);
}
"""


@pytest.fixture(scope="module")
def conversions(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("emu_conv")
    src = tmp / "conversions.cu"
    src.write_text(f'#include "{cb.SOURCE_PATH}"\n{CONVERSION_SOURCE}')
    specs = []
    for h in ("cv_half", "cv_bf16"):
        specs += [ce.KernelSpec(f"to_float<{h}>", (f"const {h}*", "float*", "int")),
                  ce.KernelSpec(f"from_float<{h}>", ("const float*", f"{h}*", "int"))]
    return ce.build(src, specs, tmp, opt="-O1", name="conversions")


def _tie_points(dtype: torch.dtype) -> torch.Tensor:
    """Every finite value of the 16-bit type, the float32 midpoints between neighbours and one float ulp around
    them (the rounding decisions), extremes and random float32 bit patterns."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    values = bits.view(dtype).float()
    values = values[torch.isfinite(values)].unique()
    mid = ((values[1:].double() + values[:-1].double()) / 2).float()
    around = torch.cat([mid, torch.nextafter(mid, torch.tensor(float("inf"))),
                        torch.nextafter(mid, torch.tensor(float("-inf")))])
    randoms = torch.randint(-(2**31), 2**31 - 1, (20000,), generator=torch.Generator().manual_seed(1),
                            dtype=torch.int64).to(torch.int32).view(torch.float32)
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 65504.0, 65519.99, 65520.0,
                            1e-8, -1e-8, 3e38, -3e38, 2.0**-24, 2.0**-25, 1.5 * 2.0**-25])
    return torch.cat([values, around, randoms, special])


@pytest.mark.parametrize("dtype,name", [(torch.float16, "cv_half"), (torch.bfloat16, "cv_bf16")])
def test_host_half_conversions_match_torch_bit_for_bit(conversions, dtype, name):
    floats = _tie_points(dtype)
    got = torch.empty(floats.numel(), dtype=dtype)
    conversions.launch(f"from_float<{name}>", (1,), (256,), 0, [floats, got, floats.numel()], outputs={1})
    want = floats.to(dtype)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    back = torch.empty(every.numel())
    conversions.launch(f"to_float<{name}>", (1,), (256,), 0, [every, back, every.numel()], outputs={1})
    want = every.float()
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(back), nan) and torch.equal(back[~nan], want[~nan])


RED_NET = [cb.Problem(b, c, h, h, c // 16, k, (h - 1) // s + 1, (h - 1) // s + 1, s, (k - 1) // 2, 1)
           for b in (1, 32, 128) for c, h, k, s in [(32, 112, 3, 1), (64, 56, 7, 1), (128, 56, 7, 2), (128, 28, 7, 1),
                                                    (256, 28, 7, 2), (256, 14, 7, 1), (512, 14, 7, 2), (512, 7, 7, 1)]]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_plans_for_the_rednet_layers_are_consistent(dtype):
    for p in RED_NET:
        for kind in cb.KINDS:
            if kind == "backward_fused" and p.stride != 1:
                continue
            for gate_grad in (False, True):
                launch = cb.plan(kind, dtype, p, gate_grad)
                bx, by = launch.block
                n = bx * by
                cpg, cb_ = p.c // p.g, launch.scalars[-1]
                assert n & (n - 1) == 0 and n <= 1024 and 1 <= cb_ <= cpg
                assert 0 < launch.shared_mem <= cb.SMEM_LIMIT
                assert launch.index_bits == 32 and 1 <= launch.grid <= launch.scalars[10]
                if gate_grad and kind in ("grad_input", "backward_fused"):
                    assert cb_ <= n
                th, tw = by, bx * launch.vector
                ph, pw = (p.h, p.w) if kind == "grad_input" else (max(p.h, p.ho), max(p.w, p.wo)) \
                    if kind == "backward_fused" else (p.ho, p.wo)
                tiles_w, tiles = launch.scalars[8], launch.scalars[9]
                assert tiles_w * tw >= pw and (tiles // tiles_w) * th >= ph and launch.scalars[10] == p.b * p.g * tiles


def test_planner_index_width_vector_width_and_limits():
    big = cb.Problem(1, 8, 16384, 16400, 1, 3, 16384, 16400, 1, 1, 1)
    assert big.max_elements > 2**31 and cb.plan("forward", torch.float16, big).index_bits == 64
    assert "long long" in cb.plan("grad_input", torch.float16, big).name
    assert cb.vector_width(3, 56) == 4 and cb.vector_width(3, 14) == 2 and cb.vector_width(3, 7) == 1
    assert cb.vector_width(5, 56) == 2 and cb.vector_width(7, 56) == 1
    p = cb.Problem(2, 64, 56, 56, 4, 3, 56, 56, 1, 1, 1)
    assert cb.plan("forward", torch.float32, p, aligned=False).vector == 1
    assert cb.plan("grad_input", torch.float32, p).vector == 1
    with pytest.raises(ValueError, match="stride 1"):
        cb.plan("backward_fused", torch.float32, cb.Problem(1, 8, 9, 9, 1, 3, 5, 5, 2, 1, 1))
    huge = cb.Problem(1, 8, 400, 400, 1, 7, 400, 400, 1, 120, 40)
    with pytest.raises(cb.UnsupportedConfig, match="K=7, stride=1, dilation=40"):
        cb.plan("forward", torch.float64, huge)
    assert not cb.supports(7, 1, 40, torch.float64) and cb.supports(7, 2, 1, torch.bfloat16)


def test_backward_mode_policy(monkeypatch):
    s1k3 = cb.Problem(1, 8, 9, 9, 1, 3, 9, 9, 1, 1, 1)
    s1k7 = cb.Problem(1, 8, 9, 9, 1, 7, 9, 9, 1, 3, 1)
    s2 = cb.Problem(1, 8, 9, 9, 1, 3, 5, 5, 2, 1, 1)
    monkeypatch.delenv("CVLAB_INVOLUTION_BACKWARD", raising=False)
    assert cb.use_fused_backward(s1k3, True, True) and not cb.use_fused_backward(s1k7, True, True)
    assert not cb.use_fused_backward(s1k3, True, False) and not cb.use_fused_backward(s2, True, True)
    monkeypatch.setenv("CVLAB_INVOLUTION_BACKWARD", "fused")
    assert cb.use_fused_backward(s1k7, True, True) and not cb.use_fused_backward(s2, True, True)
    assert not cb.use_fused_backward(s1k3, True, True, "split")
    monkeypatch.setenv("CVLAB_INVOLUTION_BACKWARD", "sometimes")
    with pytest.raises(ValueError, match="CVLAB_INVOLUTION_BACKWARD.*'sometimes'"):
        cb.use_fused_backward(s1k3, True, True)
