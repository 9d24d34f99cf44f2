"""The Hopper/Blackwell attention path (wan_kernels/triton/attention_ws.py): TMA descriptors, warp-specialised KV
loop, persistent scheduler.

CPU: the same kernel function under the Triton interpreter (descriptors, the persistent tile loop with fewer
programs than tiles, the branch-free tail bias; warp specialisation is a compile-time transform only), fp16 and
fp32, odd lengths, the image set, LSE, strided views, checked against the fp64 reference with the 2x-SDPA rule of
tests/test_attention.py (`assert_flash_rule`, its tolerance reasoning applies unchanged). Calls `supports`
refuses (misaligned strides, head_dim != value dim) run today's kernel and must give its result.
AOT: every CONFIGS entry compiles for its arch (sm_90, sm_100) in fp16 and bf16 with zero spills, within 227 KB
of shared memory, and its PTX holds the instructions the design claims: TMA bulk tensor copies, wgmma (sm_90) or
tcgen05.mma (sm_100), and `setmaxnreg` where the config is warp-specialised; so a regression to the plain path
fails. The REG / STACK / SHARED table is printed at the end (pytest -s). Cost: ~2-8 s per compile here.
"""

import re

import pytest
import torch

from tools import aot
from wan_kernels.testing import assert_flash_rule
from wan_kernels.triton import attention as ta
from wan_kernels.triton import attention_ws as aw

from _inputs import attention_inputs

DTYPES = [torch.float16, torch.float32]
RESULTS: list[tuple[str, aot.AotResult, dict]] = []


pytestmark = pytest.mark.usefixtures("triton_interpreter")


@pytest.fixture(scope="module", autouse=True)
def aot_table():
    """The AOT table of the module's compiles, printed at its end (pytest -s)."""
    yield
    print("\n\nattention_ws AOT table: config | arch | REG | STACK | SHARED | TMA copies | setmaxnreg | MMA")
    for label, r, n in RESULTS:
        print(f"{label:44s} sm_{r.arch:<3d} REG {r.registers:3d}  STACK {r.stack_bytes:4d}  SHARED {r.shared_bytes:6d}"
              f"  TMA {n['tma']:2d}  setmaxnreg {n['setmaxnreg']:2d}  {','.join(sorted(r.mma_families))}")


# (B, Sq, Sk, Si, H, D): tails on both sides (Sq, Sk not multiples of 32), a single key, the image set with
# Wan-like odd lengths, more tiles than the 3 interpreter programs (each program walks several tiles).
SHAPES = [(2, 37, 45, 0, 3, 32), (1, 70, 33, 17, 2, 64), (1, 1, 1, 0, 1, 16), (2, 65, 96, 5, 2, 32),
          (1, 130, 257, 0, 1, 64)]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,Sq,Sk,Si,H,D", SHAPES)
def test_matches_fp64_within_2x_sdpa(B, Sq, Sk, Si, H, D, dtype):
    inputs = attention_inputs(B, Sq, Sk, Si, H, D, dtype, seed=Sq + Sk)
    assert aw.supports(*inputs)
    assert_flash_rule(aw.attention(*inputs), inputs, what=f"ws B={B} Sq={Sq} Sk={Sk} Si={Si} H={H} D={D} {dtype}")


@pytest.mark.parametrize("Si", [0, 19])
def test_lse_per_set(Si):
    q, k, v, ki, vi = attention_inputs(2, 41, 50, Si, 2, 32, torch.float32, seed=3)
    out, lse, lse_img = aw.attention_with_lse(q, k, v, ki, vi, scale=0.3)
    s = 0.3 * torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double())
    # fp32 LSE of fp32 scores: a few fp32 ulps of |lse| ~ 5 (seen 5e-7)
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), atol=5e-6, rtol=0)
    if Si:
        si = 0.3 * torch.einsum("bqhd,bkhd->bhqk", q.double(), ki.double())
        torch.testing.assert_close(lse_img.double(), torch.logsumexp(si, -1), atol=5e-6, rtol=0)
    else:
        assert lse_img is None
    fwd_out, fwd_lse = aw.attention_forward(q, k, v, ki, vi, scale=0.3)
    assert torch.equal(fwd_out, out) and torch.equal(fwd_lse[0], lse)
    out1, lse1 = aw.attention_lse(q, k, v, scale=0.3)
    assert torch.equal(lse1, aw.attention_with_lse(q, k, v, scale=0.3)[1]) and out1.shape == q.shape


def test_strided_views_of_a_packed_tensor():
    """q, k, v as slices of one [B, S, 3, H, D] tensor (the model's layout): TMA-compatible, no copy."""
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(2, 53, 3, 2, 32, generator=g).to(torch.float16)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous() and aw.supports(q, k, v)
    assert_flash_rule(aw.attention(q, k, v), (q, k, v, None, None), what="packed qkv")


def test_bf16_on_cpu_rounds_once():
    q, k, v, ki, vi = attention_inputs(1, 33, 40, 9, 2, 32, torch.bfloat16, seed=5)
    got = aw.attention(q, k, v, ki, vi)
    want = aw.attention(*(t.float() for t in (q, k, v, ki, vi))).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


def test_refused_calls_run_todays_kernel():
    q, k, v, _, _ = attention_inputs(1, 20, 24, 0, 2, 32, torch.float16, seed=7)
    odd = torch.randn(1, 24, 2, 33).to(torch.float16)[..., :32]  # S stride 66 halves = 132 B: not 16-B aligned
    assert not aw.supports(q, odd, v)
    assert torch.equal(aw.attention(q, odd, v), ta.attention(q, odd, v))
    v48 = torch.randn(1, 24, 2, 48).to(torch.float16)              # value dim != head_dim
    assert not aw.supports(q, k, v48)
    assert torch.equal(aw.attention(q, k, v48), ta.attention(q, k, v48))
    assert not aw.supports(q.float(), k, v)                         # mixed dtypes


def test_persistent_grid_and_config_pick():
    assert aw.num_programs(None, aw.INTERPRETER_CONFIG, 100, torch.device("cpu")) == aw.INTERPRETER_PROGRAMS
    assert aw.num_programs((9, 0), aw.CONFIGS[(90, 128, "self")], 10 ** 6, torch.device("meta")) == 132
    assert aw.num_programs((10, 0), aw.CONFIGS[(100, 128, "self")], 5, torch.device("meta")) == 5
    assert aw.arch_class((8, 0)) is None and aw.arch_class((12, 0)) is None
    assert aw.pick_config((9, 0), 128, 512, True) == aw.CONFIGS[(90, 128, "i2v")]
    assert aw.pick_config((10, 0), 128, 75600, False) == aw.CONFIGS[(100, 128, "self")]


# ---------------------------------------------------------------------------------------------
# AOT: what the design claims is in the compiled code

def _aot_cases():
    """Every table entry in fp16 and bf16, and the GPU check's sweep alternatives (bf16, what it times)."""
    cases = []
    for (arch, d, kind), cfg in aw.CONFIGS.items():
        for dtype in (torch.float16, torch.bfloat16):
            cases.append(pytest.param(arch, d, kind, cfg, dtype, id=f"sm{arch}-hd{d}-{kind}-{cfg}-{str(dtype)[6:]}"))
    for arch, cfgs in aw.SWEEP.items():
        for cfg in cfgs:
            cases.append(pytest.param(arch, 128, "self", cfg, torch.bfloat16, id=f"sm{arch}-hd128-self-sweep-{cfg}"))
    return cases


def _launch(arch, d, kind, dtype, write_lse=False, config=None):
    """The launcher's own prepare on meta tensors of Wan-14B 720p CFG shapes (as readiness); `config` None = the
    table's pick."""
    s, h = 75600, 40
    sk, si = {"self": (s, 0), "cross": (512, 0), "i2v": (512, 257)}[kind]
    m = lambda n: torch.empty(2, n, h, d, dtype=dtype, device="meta")  # noqa: E731
    img = (m(si), m(si)) if si else (None, None)
    return aw.prepare(m(s), m(sk), m(sk), *img, None, write_lse, config, (arch // 10, arch % 10))[0]


def design_instructions(ptx: str) -> dict:
    return {"tma": len(re.findall(r"\bcp\.async\.bulk\.tensor\.", ptx)),
            "setmaxnreg": len(re.findall(r"\bsetmaxnreg\.(?:inc|dec)\.sync\.aligned\.u32\b", ptx))}


@pytest.mark.aot
@pytest.mark.parametrize("arch,head_dim,kind,config,dtype", _aot_cases())
def test_aot_config_compiles_with_the_design(arch, head_dim, kind, config, dtype, tmp_path):
    table = aw.CONFIGS[(arch, head_dim, kind)] == config  # then compile the launcher's own pick
    r = aot.compile_launch(_launch(arch, head_dim, kind, dtype, config=None if table else config), arch,
                           workdir=tmp_path)
    n = design_instructions(r.ptx)
    RESULTS.append((f"{kind} hd{head_dim} {config} {str(dtype)[6:]}", r, n))
    assert not r.spills, r.summary()
    assert r.shared_bytes <= 227 * 1024, r.summary()
    assert {90: "wgmma", 100: "tcgen05"}[arch] in r.mma_families, r.summary()
    assert n["tma"] > 0, f"no TMA bulk tensor copies: {r.summary()}"
    if config.warp_specialize:
        assert n["setmaxnreg"] > 0, f"warp-specialised config without setmaxnreg: {r.summary()}"


@pytest.mark.aot
def test_aot_lse_variant_keeps_the_design():
    r = aot.compile_launch(_launch(90, 128, "self", torch.bfloat16, write_lse=True), 90)
    n = design_instructions(r.ptx)
    assert not r.spills and n["tma"] > 0 and n["setmaxnreg"] > 0 and "wgmma" in r.mma_families, r.summary()


@pytest.mark.aot
def test_aot_check_catches_the_plain_path():
    """Today's kernel (no TMA, no warp specialisation) at the same shape fails the checks above."""
    q = torch.empty(2, 75600, 40, 128, dtype=torch.bfloat16, device="meta")
    r = aot.compile_launch(ta.prepare(q, q, q, None, None, None, False, None, (9, 0))[0], 90)
    n = design_instructions(r.ptx)
    assert n["tma"] == 0 and n["setmaxnreg"] == 0
