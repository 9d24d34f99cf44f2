"""The Triton launchers as a GPU runs them, checked without one (issue 18):

* offsets: at Wan-14B 720p batch 4 (302,400 tokens; C = 5120, 3C = 15,360, FFN 13,824) no 32-bit offset wraps
  before it is widened, per kernel, by an interval analysis of the PTX compiled from the launcher's own launch
  (`aot.offset_overflows`), with a kernel that multiplies rows by N in 32 bits as the negative control;
* device: every launcher launches under its tensors' device (cuda:1 simulated with fake tensors);
* specialisation: what readiness compiles is what `JITFunction.run` would compile for a contiguous activation
  (stride 1 a constexpr), the runtime's binder captured with a mocked driver;
* numerics: kernels whose results are claimed bit-exact compile without fma / approximate division / sqrt;
* TRITON_INTERPRET=1 set before import still gives compiled kernels for CUDA tensors.
"""

import contextlib
import dataclasses
import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import FakeTensorMode
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

from wan_kernels.nvfp4 import round_up
from tools import aot
from wan_kernels.triton import _launch
from wan_kernels.triton import attention as ta
from wan_kernels.triton import modulate as tm
from wan_kernels.triton import nvfp4 as tnv
from wan_kernels.triton import qk_norm_rope as tqk

TOKENS, BATCH, C, H, D, FFN = 75600, 4, 5120, 40, 128, 13824


def _m(*shape, dtype=torch.bfloat16, device="meta"):
    return torch.empty(shape, dtype=dtype, device=device)


def _big_launches(cap):
    """(name, Launch) of every kernel at Wan-14B 720p batch 4 on meta tensors."""
    m = BATCH * TOKENS
    gs = _m(dtype=torch.float32)
    out = []
    for n, k in ((3 * C, C), (C, FFN)):                    # to_qkv; the FFN down projection (K = 13,824)
        w, ws = _m(n, k // 2, dtype=torch.uint8), _m(round_up(n, 128), k // 16, dtype=torch.float8_e4m3fn)
        out.append((f"w4a16 {n}x{k}", tnv.prepare_w4a16(_m(m, k), w, ws, gs, _m(n), cap)[0]))
        a, sa = _m(m, k // 2, dtype=torch.uint8), _m(round_up(m, 128), k // 16, dtype=torch.float8_e4m3fn)
        out.append((f"w4a4 {n}x{k}", tnv.prepare_w4a4(a, sa, gs, w, ws, gs, None, torch.bfloat16, cap)[0]))
    a, sa = _m(m, FFN // 2, dtype=torch.uint8), _m(round_up(m, 128), FFN // 16, dtype=torch.float8_e4m3fn)
    out.append(("quantize", tnv.prepare_quantize(_m(m, FFN), gs, cap)[0]))
    out.append(("dequantize", tnv.prepare_dequantize(a, sa, gs, torch.bfloat16, cap)[0]))
    out.append(("qk_norm_rope", tqk.prepare(_m(BATCH, TOKENS, 3 * C), _m(C), _m(C), _m(TOKENS, D // 2, dtype=torch.float32),
                                            _m(TOKENS, D // 2, dtype=torch.float32), H, 1e-6, cap)[0]))
    out.append(("qk_norm_rope_int8", tqk.prepare(_m(BATCH, TOKENS, 3 * C), _m(C), _m(C),
                                                 _m(TOKENS, D // 2, dtype=torch.float32),
                                                 _m(TOKENS, D // 2, dtype=torch.float32), H, 1e-6, cap, True)[0]))
    x = _m(BATCH, TOKENS, C)
    shift, scale, gate = _m(BATCH, 1, 6, C, dtype=torch.float32).unbind(2)[:3]
    out.append(("layer_norm_modulate", tm.prepare_layer_norm_modulate(x, scale, shift, 1e-6, cap)[0]))
    out.append(("gated_residual", tm.prepare_gated_residual(x, x, gate, cap)[0]))
    q = _m(BATCH, TOKENS, H, D)
    out.append(("attention", ta.prepare(q, q, q, None, None, None, True, None, cap)[0]))
    return out


def _rows_times_n(x_ptr, out_ptr, M, N, BLOCK: tl.constexpr):
    """The defect: 32-bit row * N offsets (the W4A16 GEMM's output store before the fix)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    x = tl.load(x_ptr + rows[:, None] * N + cols[None, :], mask=mask)
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], x, mask=mask)


@pytest.mark.aot
@pytest.mark.parametrize("arch", [80, 90])
def test_offsets_do_not_wrap_at_wan_sizes(arch, tmp_path):
    for name, launch in _big_launches((arch // 10, arch % 10)):
        r = aot.compile_launch(launch, arch, workdir=tmp_path)
        check = aot.offset_overflows(launch, r.ptx, arch)
        assert check.checked > 0, name                          # the analysis saw the kernel's widenings
        assert check.overflowing == [], (name, check.overflowing[:4])


@pytest.mark.aot
def test_offset_analysis_flags_a_32_bit_row_product(tmp_path):
    m, n = BATCH * TOKENS, 3 * C
    x = _m(m, n)
    bad = _launch.Launch(JITFunction(_rows_times_n), (triton.cdiv(m, 64),), (x, x, m, n), dict(BLOCK=64), x.device)
    r = aot.compile_launch(bad, 90, workdir=tmp_path)
    assert aot.offset_overflows(bad, r.ptx, 90).overflowing
    small = dataclasses.replace(bad, grid=(1,), args=(x, x, 64, n))  # rows < 64: in range
    assert not aot.offset_overflows(small, aot.compile_launch(small, 90, workdir=tmp_path).ptx, 90).overflowing


def _fake_cuda_launches(dev):
    """Every Triton launcher called once with tensors on `dev` (fake tensors)."""
    f = lambda *s, dtype=torch.bfloat16: torch.empty(s, dtype=dtype, device=dev)  # noqa: E731
    gs = f(dtype=torch.float32)
    qkv = f(1, 8, 3 * 256)
    tqk.qk_norm_rope(qkv, f(256), f(256), f(8, 32, dtype=torch.float32), f(8, 32, dtype=torch.float32), 4)
    tqk.qk_norm_rope_int8(qkv, f(256), f(256), f(8, 32, dtype=torch.float32), f(8, 32, dtype=torch.float32), 4)
    q = f(1, 8, 2, 64)
    ta.attention(q, q, q)
    x, mod = f(1, 8, 64), f(1, 1, 64, dtype=torch.float32)
    tm.layer_norm_modulate(x, mod, mod, 1e-6)
    tm.gated_residual(x, x, mod)
    packed, scale = tnv.nvfp4_quantize(f(128, 64), gs)
    tnv.nvfp4_dequantize(packed, scale, gs, torch.bfloat16)
    tnv.nvfp4_gemm(packed, scale, gs, packed, scale, gs, None, torch.bfloat16)
    tnv.nvfp4_linear_w4a16(f(128, 64), packed, scale, gs, None)


def test_every_launcher_runs_under_its_tensors_device(monkeypatch):
    current, seen = [0], []

    @contextlib.contextmanager
    def device(d):
        prev, current[0] = current[0], torch.device(d).index
        try:
            yield
        finally:
            current[0] = prev

    def run(self, *args, grid, warmup, **kwargs):
        seen.append((self.fn.__name__, current[0]))

    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    monkeypatch.setattr(JITFunction, "run", run)
    with FakeTensorMode(allow_non_fake_inputs=True):
        _fake_cuda_launches(torch.device("cuda", 1))
    names = {n for n, _ in seen}
    assert {"_qk_norm_rope_kernel", "_attention_kernel", "_layer_norm_modulate_kernel", "_gated_residual_kernel",
            "_nvfp4_quantize_kernel", "_nvfp4_dequantize_kernel", "_nvfp4_gemm_kernel"} <= names
    assert all(d == 1 for _, d in seen), seen


class _FakeDriver:
    def __init__(self, arch):
        self.arch = arch

    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)


def _runtime_specialization(launch, arch):
    """(signature, constexprs, attrs) that `JITFunction.run` passes to its compile for `launch` on sm_`arch`."""
    jit_fn = JITFunction(launch.kernel.fn)                 # a fresh copy: its device caches stay private
    captured = {}
    jit_fn._do_compile = lambda key, signature, device, constexprs, options, attrs, warmup: captured.update(
        signature=signature, constexprs=constexprs, attrs=attrs, num_warps=options.num_warps)
    previous = driver._active                              # None here: no GPU driver to fall back to
    driver.set_active(_FakeDriver(arch))
    try:
        jit_fn.run(*launch.args, grid=launch.grid, warmup=False, **launch.kwargs)
    finally:
        driver._active = previous
    return captured


@pytest.mark.aot
@pytest.mark.parametrize("arch", [80, 90, 120])
def test_readiness_compiles_the_runtime_specialization(arch):
    """The W4A16 launch readiness compiles (meta tensors, Wan's to_qkv at M = 151,200) specialises as the runtime
    does for a contiguous activation: stride_ak == 1 is a constexpr, the tile is the arch's."""
    from tools import readiness

    jobs = [j for j in readiness.jobs_for(["nvfp4"], (arch,)) if j.config.startswith("gemm w4a16 M=151200")]
    assert jobs
    for j in jobs:
        spec = aot.specialize(j.launch, arch)
        runtime = _runtime_specialization(j.launch, arch)
        assert (spec.signature, spec.constexprs, spec.attrs) == (runtime["signature"], runtime["constexprs"],
                                                                 runtime["attrs"])
        assert spec.constexpr_names(j.launch.kernel)["stride_ak"] == 1
        assert spec.options.num_warps == runtime["num_warps"] == j.launch.kwargs["num_warps"]
        assert j.launch.kwargs["BLOCK_M"] == tnv.gemm_config(151200, (arch // 10, arch % 10), False)["BLOCK_M"]


def test_configs_follow_the_tensor_core_class():
    assert [_launch.mma_class(c) for c in ((8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (10, 3), (12, 0), (12, 1))] == \
        ["mma.sync", "mma.sync", "mma.sync", "wgmma", "tcgen05", "tcgen05", "mma.sync", "mma.sync"]
    assert tnv.gemm_config(4096, (12, 0), False) == tnv.gemm_config(4096, (8, 0), False)  # not sm_90's tile
    assert tnv.gemm_config(4096, (12, 0), False) != tnv.gemm_config(4096, (9, 0), False)
    assert ta.arch_class((12, 0)) == ta.arch_class((8, 9)) == 80 and ta.arch_class((10, 3)) == 100


@pytest.mark.aot
@pytest.mark.parametrize("name", ["gated_residual", "layer_norm_modulate", "qk_norm_rope", "quantize"])
def test_exact_kernels_have_no_contraction_or_approximation(name, tmp_path):
    """Bit-exactness with the interpreter / C++ kernels: no fma.rn.f32 contraction, no div.full / div.approx /
    sqrt.approx / rcp.approx in the PTX."""
    launch = dict(_big_launches((9, 0)))[name]
    ptx = aot.compile_launch(launch, 90, workdir=tmp_path).ptx
    for op in ("fma.rn.f32", "div.full.f32", "div.approx", "sqrt.approx", "rcp.approx"):
        assert op not in ptx, (name, op)
    if name != "gated_residual":
        assert "div.rn.f32" in ptx


@pytest.mark.subprocess
def test_interpreter_at_import_still_compiles_for_cuda_tensors():
    """TRITON_INTERPRET=1 before import: CPU launches get the interpreted kernel, and run; CUDA launches the
    compiled one. (fp32 attention of unit-normal inputs: the interpreter's fp32 vs the reference's, ~1e-7.)"""
    code = """
import torch
from triton.runtime.jit import JITFunction
from triton.runtime.interpreter import InterpretedFunction
from wan_kernels.triton import _launch, nvfp4 as tnv, modulate as tm
x = torch.zeros(16, 64)
gs = torch.ones(())
for prep in (lambda dev: tnv.prepare_quantize(x.to(dev) if dev == 'cpu' else torch.empty(16, 64, device='meta'), gs,
                                              None if dev == 'cpu' else (9, 0))[0],
             lambda dev: tm.prepare_gated_residual(torch.zeros(1, 2, 64), torch.zeros(1, 2, 64),
                                                   torch.zeros(1, 1, 64), None)[0]):
    l = prep('cpu')
    cuda = __import__('dataclasses').replace(l, device=torch.device('cuda', 0))
    assert isinstance(_launch.kernel_for(cuda), JITFunction), type(_launch.kernel_for(cuda))
    assert isinstance(_launch.kernel_for(l), InterpretedFunction)
assert isinstance(tnv._nvfp4_gemm_kernel, JITFunction) and isinstance(tnv._decode_tile, JITFunction)
# and the interpreted kernels run: attention's kernels call triton.language's own jit helpers (reduce combiners),
# which are interpreted functions now; a JITFunction's hash walks them and raised (the interpreted-twin cache
# was keyed by the kernel object)
import wan_kernels
from wan_kernels.triton import attention_ws
g = torch.Generator().manual_seed(0)
q, k, ki = (torch.randn(1, n, 2, 32, generator=g) for n in (40, 33, 9))
for fn in (lambda: wan_kernels.attention(q, k, k, ki, ki, impl='triton'), lambda: attention_ws.attention(q, k, k, ki, ki)):
    err = float((fn() - wan_kernels.attention(q, k, k, ki, ki, impl='ref')).abs().max())
    assert err < 1e-5, err
print("ok")
"""
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr
