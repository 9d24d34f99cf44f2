"""`python -m tools.readiness`: the GPU-readiness report runs on CPU, passes on the shipped configs and
fails (exit 1) on a spill or a GEMM-like kernel without tensor cores. The full report (every launch, six archs)
is what CI runs; here a subset keeps it to ~20 s (Triton caches compiles, so reruns are faster)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from tools import readiness


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.readiness", *args], capture_output=True, text=True,
                          timeout=600)


@pytest.mark.subprocess
@pytest.mark.aot
def test_subset_passes_and_reports_every_column():
    r = _run("--kernels", "attention,nvfp4,cuda", "--archs", "90,100", "--quick", "--jobs", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "wgmma" in out and "tcgen05" in out                 # the GEMM-like kernels' tensor-core families
    rows = [line for line in out.splitlines() if line.startswith(("attention", "nvfp4"))]
    assert len(rows) == 2 * 3                                   # per arch: attention, nvfp4 gemm, quantize
    assert all(line.rstrip().endswith("ok") for line in rows)
    assert "_C:" in out and "0 problem(s)" in out


@pytest.mark.subprocess
@pytest.mark.aot
def test_forced_spill_fails():
    """Negative control: every register capped at 32 -> the NVFP4 GEMM spills, the report must exit 1."""
    r = _run("--kernels", "nvfp4", "--archs", "80", "--quick", "--maxnreg", "32")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "SPILL" in r.stdout and "FAIL nvfp4 sm_80 gemm" in r.stdout


def test_missing_tensor_core_path_is_a_problem():
    """A GEMM-like launch whose PTX lacks the arch's MMA family is reported, a non-GEMM one is not; so is shared
    memory over the arch's limit (sm_120: 99 KB)."""
    @dataclasses.dataclass
    class FakeResult:
        spills: bool = False
        mma_families: frozenset = frozenset({"mma.sync"})
        stack_bytes: int = 0
        local_bytes: int = 0
        spill_stores: int = 0
        spill_loads: int = 0
        shared_bytes: int = 1024

    gemm = readiness.Job("attention", "x", 90, True, None)
    assert readiness.problems(gemm, FakeResult()) == ["NO TENSOR CORES (wgmma missing)"]
    assert readiness.problems(gemm, FakeResult(mma_families=frozenset({"wgmma"}))) == []
    assert readiness.problems(readiness.Job("attention", "x", 120, True, None), FakeResult()) == []
    elementwise = readiness.Job("qk_norm_rope", "x", 90, False, None)
    assert readiness.problems(elementwise, FakeResult(mma_families=frozenset())) == []
    assert readiness.problems(elementwise, FakeResult(spills=True, stack_bytes=8))[0].startswith("SPILL")
    assert readiness.problems(readiness.Job("qk_norm_rope", "x", 120, False, None),
                              FakeResult(shared_bytes=100 * 1024)) == [f"SHARED {100 * 1024} > {99 * 1024}"]


def test_enumerates_every_arch_and_heuristic_config():
    from wan_kernels.triton import attention as ta

    jobs = readiness.jobs_for(["attention"], readiness.ARCHS)
    assert {j.arch for j in jobs} == {80, 86, 89, 90, 100, 120}
    for arch in readiness.ARCHS:                               # each config pick_config makes appears per arch
        for d in (64, 128):
            for kv, img in ((75600, False), (512, False), (512, True)):
                cfg = ta.pick_config((arch // 10, arch % 10), d, kv, img)
                assert any(j.arch == arch and f"hd{d} {cfg} " in j.config for j in jobs), (arch, d, kv, img)
    qk = readiness.jobs_for(["qk_norm_rope"], (90,))
    assert {"H=40 D=128 H_BLOCK=64 chunks=1 w16 bfloat16", "H=200 D=64 H_BLOCK=128 chunks=2 w16 bfloat16"} <= \
        {j.config for j in qk}


@pytest.mark.subprocess
def test_bad_arguments():
    r = _run("--kernels", "nope")
    assert r.returncode == 2 and "unknown kernels" in r.stderr
    with pytest.raises(SystemExit):
        readiness.main(["--archs", "75"])
