"""GPU readiness of the NVFP4 Triton kernels without a GPU: every config the GEMM heuristic can pick compiles
ahead of time for its arch with the tensor-core family of that arch (mma.sync / wgmma / tcgen05) and zero
spills; the quantize/dequantize kernels compile spill-free everywhere. Run with -s to see the table."""

import pytest
import triton.language as tl

from wan_kernels.triton import aot
from wan_kernels.triton import nvfp4 as tnv

EXPECTED_MMA = {80: "mma.sync", 90: "wgmma", 100: "tcgen05"}


# W4A4 emulation decodes to fp16 only (exact there); W4A16 runs in the activation dtype.
GEMM_CASES = [(arch, a_fp4, cfg, dt) for arch, a_fp4, cfg in tnv.config_space()
              for dt in (("fp16",) if a_fp4 else ("fp16", "bf16"))]


@pytest.mark.parametrize("arch,a_fp4,cfg,dt", GEMM_CASES,
                         ids=[f"sm{a}-{'w4a4' if f else 'w4a16'}-{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']}w{c['num_warps']}-{d}"
                              for a, f, c, d in GEMM_CASES])
def test_gemm_configs_compile_without_spills(arch, a_fp4, cfg, dt, tmp_path):
    cfg = dict(cfg)
    num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    constexprs = dict(cfg, A_FP4=a_fp4, HAS_BIAS=True, DOT_DTYPE=tl.float16 if dt == "fp16" else tl.bfloat16)
    r = aot.compile_aot(tnv._nvfp4_gemm_kernel, tnv.aot_gemm_signature(a_fp4, dt), constexprs, arch=arch,
                        num_warps=num_warps, num_stages=num_stages, workdir=tmp_path,
                        aligned=tnv.AOT_GEMM_ALIGNED)
    print(r.summary())
    assert EXPECTED_MMA[arch] in r.mma_families
    assert not r.spills, r.summary()


@pytest.mark.parametrize("arch", aot.ARCHS)
@pytest.mark.parametrize("dt", ["fp32", "bf16"])
def test_quantize_kernels_compile_without_spills(arch, dt, tmp_path):
    q = aot.compile_aot(tnv._nvfp4_quantize_kernel,
                        {"x_ptr": f"*{dt}", "packed_ptr": "*u8", "scale_ptr": "*u8", "gs_ptr": "*fp32", "M": "i32",
                         "K": "i32", "stride_m": "i32", "stride_k": "i32", "ks_padded": "i32",
                         "BLOCK_M": "constexpr", "BLOCK_K": "constexpr"},
                        {"BLOCK_M": tnv._QUANT_BLOCK_M, "BLOCK_K": tnv._QUANT_BLOCK_K}, arch=arch, num_warps=4,
                        workdir=tmp_path, aligned=("x_ptr", "packed_ptr", "K", "stride_m"))
    d = aot.compile_aot(tnv._nvfp4_dequantize_kernel,
                        {"packed_ptr": "*u8", "scale_ptr": "*u8", "gs_ptr": "*fp32", "out_ptr": f"*{dt}", "M": "i32",
                         "K": "i32", "ks_padded": "i32", "BLOCK_M": "constexpr", "BLOCK_K": "constexpr"},
                        {"BLOCK_M": tnv._QUANT_BLOCK_M, "BLOCK_K": tnv._QUANT_BLOCK_K}, arch=arch, num_warps=4,
                        workdir=tmp_path, aligned=("packed_ptr", "out_ptr", "K"))
    print(q.summary())
    print(d.summary())
    assert not q.spills and not d.spills
