"""GPU readiness of the NVFP4 Triton kernels without a GPU: every config the GEMM heuristic can pick, compiled from
the launcher's own launch (meta tensors of Wan's to_qkv, Triton's runtime specialisation), uses its arch's
tensor-core family (mma.sync / wgmma / tcgen05) with zero spills on sm_80 / 86 / 89 / 90 / 100 / 120; the
quantize/dequantize kernels compile spill-free everywhere. Run with -s to see the table."""

import pytest

from tools import readiness
from tools import aot

pytestmark = pytest.mark.aot

CASES = readiness.jobs_for(["nvfp4"], aot.ARCHS)


@pytest.mark.parametrize("job", CASES, ids=[f"sm{j.arch}-{j.config.replace(' ', '-')}" for j in CASES])
def test_launches_compile_without_spills(job, tmp_path):
    r = aot.compile_launch(job.launch, job.arch, workdir=tmp_path)
    print(job.config, r.summary())
    assert readiness.problems(job, r) == [], r.summary()
    if job.gemm_like:
        assert readiness.mma(job.arch) in r.mma_families


def test_every_gemm_config_is_enumerated():
    """Each (arch, mode, tile) `gemm_config` returns for M = 2 and M = 151,200 has a compile; fp16 and bf16."""
    from wan_kernels.triton import nvfp4 as tnv

    for arch in aot.ARCHS:
        for a_fp4 in (False, True):
            for m in (2, 151200):
                cfg = tnv.gemm_config(m, (arch // 10, arch % 10), a_fp4)
                assert any(j.arch == arch and j.gemm_like and (" w4a4 " in j.config) == a_fp4 and
                           f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} w{cfg['num_warps']}" in j.config
                           for j in CASES), (arch, a_fp4, m, cfg)
    assert {"float16", "bfloat16"} <= {j.config.split()[-1] for j in CASES if "w4a16" in j.config}
