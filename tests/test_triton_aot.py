"""GPU readiness without a GPU: Triton kernels compile ahead of time for sm_80 / sm_90 / sm_100 without spills.

`tools/aot.py` compiles with `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`
and reads the cubin with the cuobjdump bundled with Triton. Its detectors are proven here first: a tiny tl.dot
GEMM must use mma.sync on sm_80, wgmma on sm_90 and tcgen05 on sm_100, and the same GEMM squeezed to 32
registers must be reported as spilling. Then every launch config the qk_norm_rope heuristic picks for the Wan
models and the test shapes (plus the chunked path and each head-tile size) compiles with STACK = 0, no STL/LDL.
Each compile takes ~0.5-1.5 s on 2 cores; the module runs ~1-2 minutes cold (Triton caches compiles).
"""

import pytest
import torch
import triton.language as tl

from tools import aot
from wan_kernels.triton import qk_norm_rope as tqk

pytestmark = pytest.mark.aot

ARCHS = (80, 90, 100)  # one per tensor-core class; readiness covers sm_86 / sm_89 / sm_120 too
EXPECTED_MMA = {80: "mma.sync", 90: "wgmma", 100: "tcgen05"}


def _gemm(a_ptr, b_ptr, c_ptr, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rm = tl.arange(0, BM)
    rn = tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.full([BM, BN], 0.0, tl.float32)
    for k in range(0, K, BK):
        a = tl.load(a_ptr + rm[:, None] * K + (k + rk)[None, :])
        b = tl.load(b_ptr + (k + rk)[:, None] * BN + rn[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + rm[:, None] * BN + rn[None, :], acc.to(tl.float16))


GEMM_SIG = {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp16", "K": "i32", "BM": "constexpr", "BN": "constexpr",
            "BK": "constexpr"}
GEMM_ALIGNED = ("a_ptr", "b_ptr", "c_ptr", "K")


@pytest.mark.parametrize("arch", ARCHS)
def test_aot_detects_tensor_core_family(arch, tmp_path):
    r = aot.compile_aot(_gemm, GEMM_SIG, {"BM": 128, "BN": 64, "BK": 32}, arch=arch, num_warps=4,
                        aligned=GEMM_ALIGNED, workdir=tmp_path)
    print(r.summary())
    assert r.mma_families == {EXPECTED_MMA[arch]}
    assert r.cubin_path.exists() and r.cubin_path.read_bytes() == r.cubin and r.cubin[:4] == b"\x7fELF"
    assert f".target sm_{arch}" in r.ptx
    assert 0 < r.registers <= 255
    assert r.dynamic_shared_bytes > 0  # the dot operands are staged in shared memory
    assert not r.spills


def test_aot_detects_spills(tmp_path):
    """Negative control: with maxnreg=32 the GEMM must spill, and the inspection must say so."""
    r = aot.compile_aot(_gemm, GEMM_SIG, {"BM": 64, "BN": 64, "BK": 32}, arch=80, num_warps=4, aligned=GEMM_ALIGNED,
                        options={"maxnreg": 32}, workdir=tmp_path)
    print(r.summary())
    assert r.registers <= 32
    assert r.spills and r.stack_bytes > 0 and r.spill_stores > 0 and r.spill_loads > 0


def test_aot_argument_errors():
    with pytest.raises(ValueError, match="signature misses.*'K'"):
        aot.compile_aot(_gemm, {k: v for k, v in GEMM_SIG.items() if k != "K"}, {"BM": 16, "BN": 16, "BK": 16},
                        arch=80)
    with pytest.raises(ValueError, match="no value for constexpr.*BK"):
        aot.compile_aot(_gemm, GEMM_SIG, {"BM": 16, "BN": 16}, arch=80)


# ---------------------------------------------------------------------------------------------
# qk_norm_rope: every config the heuristic picks

# (heads, head_dim): Wan 1.3B / 5B / 14B, the shapes of tests/test_qk_norm_rope.py, the chunked path (> MAX_TILE)
WAN_AND_TEST_SHAPES = [(12, 128), (24, 128), (40, 128), (2, 64), (2, 128), (40, 64), (80, 128), (200, 64)]
# one shape per remaining head-tile size (1 .. MAX_TILE / D heads), masked (H < H_BLOCK) where possible
TILE_SWEEP = sorted({(max(1, hb - 1), d) for d in (64, 128) for hb in (1, 2, 4, 8, 16, 32, 64, 128)
                     if hb * d <= tqk.MAX_TILE} - set(WAN_AND_TEST_SHAPES))
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _check_qk_norm_rope(H, D, dtype, arch, tmp_path, quant_q=False):
    cfg = tqk.launch_config(H, D, quant_q)
    r = aot.compile_aot(tqk.qk_norm_rope_kernel, tqk.aot_signature(dtype), cfg.constexprs(quant_q), arch=arch,
                        num_warps=cfg.num_warps, aligned=tqk.AOT_ALIGNED, workdir=tmp_path,
                        options=cfg.options(quant_q))
    print(f"H={H} D={D} H_BLOCK={cfg.H_BLOCK} chunks={cfg.NUM_CHUNKS} {dtype}: {r.summary()}")
    assert r.stack_bytes == 0 and r.local_bytes == 0, r.summary()
    assert r.spill_stores == 0 and r.spill_loads == 0, r.summary()
    assert not r.spills
    assert r.mma_families == frozenset()  # elementwise + reductions only
    # vectorised loads of the qkv row (the kernel is memory bound): each thread's contiguous run of a head,
    # up to 16 bytes per load
    per_thread = cfg.H_BLOCK * D // (32 * cfg.num_warps)
    width = min(16, per_thread * dtype.itemsize)
    if width >= 8:
        assert f"ld.global.v{width // 4}.b32" in r.ptx, r.summary()
    return r


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("H,D", WAN_AND_TEST_SHAPES)
def test_qk_norm_rope_compiles_without_spills(H, D, dtype, arch, tmp_path):
    _check_qk_norm_rope(H, D, dtype, arch, tmp_path)


# q quantized in the kernel (wan::qk_norm_rope_int8): the Wan shapes, every dtype. Beside the checks above: q is
# rounded to its dtype before it is quantized (cvt.rn to bf16 / f16, the q the unfused kernel would store), the
# codes are converted from fp32 (cvt.rzi to an integer after the half-away rounding) and the divisions by 127 and
# by the scale are IEEE (div.rn, no div.full / approx): bit-identical with the 8-bit attention's quantizer.
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("H,D", WAN_AND_TEST_SHAPES)
def test_qk_norm_rope_int8_compiles_without_spills(H, D, dtype, arch, tmp_path):
    r = _check_qk_norm_rope(H, D, dtype, arch, tmp_path, quant_q=True)
    rounding = {torch.bfloat16: "cvt.rn.bf16.f32", torch.float16: "cvt.rn.f16.f32", torch.float32: None}[dtype]
    assert rounding is None or rounding in r.ptx
    assert "cvt.rzi.s16.f32" in r.ptx or "cvt.rzi.s32.f32" in r.ptx
    assert "div.rn.f32" in r.ptx and "div.full.f32" not in r.ptx and "div.approx" not in r.ptx


# The other head-tile sizes: bf16 (the model dtype) on every arch.
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("H,D", TILE_SWEEP)
def test_qk_norm_rope_tile_sweep_compiles_without_spills(H, D, arch, tmp_path):
    _check_qk_norm_rope(H, D, torch.bfloat16, arch, tmp_path)
