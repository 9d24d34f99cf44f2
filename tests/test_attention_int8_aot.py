"""GPU readiness of the 8-bit attention kernel (wan_kernels/triton/attention_int8.py) without a GPU: every config
its launcher picks (arch x head_dim 64/128 x kind self/cross/i2v x pv fp16/fp8 x LSE) compiles ahead of time
(tools/aot.py) from the launcher's own `prepare` on meta tensors of Wan's shapes (hd64: 12 heads x
1,560 tokens, hd128: Wan 14B's 40 heads x 75,600; text 512, image 257 keys), for sm_80/86/89/90/100/120, with

* the int8 MMA for Q.K^T in the PTX: `mma.sync ... s8` (sm_80/86/89/120), `wgmma ... s8` (sm_90),
  `tcgen05.mma ... kind::i8` (sm_100: under Triton 3.8; REFERENCE §10: Triton 3.6 falls back to mma.sync);
* the P.V MMA of the pv mode: e4m3 (`mma.sync`/`wgmma` `.e4m3`, tcgen05 `kind::f8f6f4`) or f16 (`kind::f16`);
* zero spills (cuobjdump STACK/LOCAL 0 and no STL/LDL in the SASS), registers <= 255;
* shared memory within the arch's per-block limit (sm_86/89/120: 99 KB).

sm_80/86 have no fp8 MMA: only fp16 is compiled there, and `prepare` refuses pv="fp8" (tested here on meta
tensors). Launches that Triton specialises identically (self and cross share their tiles) compile once.
The table (config, arch, REG, STACK, SHARED, MMA) prints at the end of the module (pytest -s).
Cost: ~1-2 s per compile on these 2 cores, ~100 compiles.
"""

import re

import pytest
import torch

from tools import aot
from wan_kernels.triton import attention_int8 as T
from wan_kernels.triton._launch import mma_class

pytestmark = pytest.mark.aot

ARCHS = (80, 86, 89, 90, 100, 120)
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024, 120: 99 * 1024}
SHAPES = {64: (12, 1560), 128: (40, 75600)}  # head_dim -> (heads, tokens)
KV = {"self": None, "cross": (512, 0), "i2v": (512, 257)}
_I8 = {"mma.sync": r"mma\.sync\.aligned\.m16n8k32\.row\.col(\.satfinite)?\.s32\.s8\.s8\.s32",
       "wgmma": r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k32\.s32\.s8\.s8",
       "tcgen05": r"tcgen05\.mma\.cta_group::\d\.kind::i8"}
_PV = {("mma.sync", "fp8"): r"mma\.sync\.aligned\.m16n8k32\.row\.col\.f32\.e4m3\.e4m3\.f32",
       ("mma.sync", "fp16"): r"mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.f16\.f16\.f32",
       ("wgmma", "fp8"): r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k32\.f32\.e4m3\.e4m3",
       ("wgmma", "fp16"): r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k16\.f32\.f16\.f16",
       ("tcgen05", "fp8"): r"tcgen05\.mma\.cta_group::\d\.kind::f8f6f4",
       ("tcgen05", "fp16"): r"tcgen05\.mma\.cta_group::\d\.kind::f16"}
_ANY_MMA = re.compile(r"(?:mma\.sync|wgmma\.mma_async|tcgen05\.mma)[\w.:]*")
RESULTS: list[tuple[str, str, aot.AotResult]] = []


def _meta(*shape):
    return torch.empty(shape, dtype=torch.bfloat16, device="meta")


def _cap(arch: int) -> tuple[int, int]:
    return arch // 10, arch % 10


def _launch(arch, d, kind, pv, lse):
    h, s = SHAPES[d]
    sk, si = KV[kind] or (s, 0)
    kv = [_meta(2, n, h, d) for n in (sk, sk, si, si) if n]
    img = kv[2:] if si else (None, None)
    return T.prepare(_meta(2, s, h, d), kv[0], kv[1], *img, None, pv, lse, None, _cap(arch))[0], \
        T.pick_config(_cap(arch), d, max(sk, si), bool(si))


def _cases():
    cases, seen = [], {}
    for arch in ARCHS:
        for d in SHAPES:
            for kind in KV:
                for pv in ("fp16", "fp8") if T.default_pv(_cap(arch)) == "fp8" else ("fp16",):
                    for lse in (False, True):
                        launch, cfg = _launch(arch, d, kind, pv, lse)
                        spec = aot.specialize(launch, arch)
                        key = (arch, repr(spec.signature), repr(spec.constexprs), repr(spec.attrs),
                               repr(sorted(spec.options.__dict__.items())))
                        if key in seen:
                            seen[key].append(kind)
                            continue
                        seen[key] = kinds = [kind]
                        label = f"sm{arch}-hd{d}-{kind}-{cfg}-{pv}{'-lse' if lse else ''}"
                        cases.append(pytest.param(arch, d, kind, pv, lse, kinds, id=label))
    return cases


CASES = _cases()


@pytest.fixture(scope="module", autouse=True)
def print_table():
    yield
    print("\n\nAOT table (8-bit attention): config | arch | kinds | REG | STACK | STL/LDL | shared bytes | MMA")
    for kinds, what, r in RESULTS:
        mma = " ".join(sorted({m.split(".aligned.")[-1] for m in _ANY_MMA.findall(r.ptx)}))
        print(f"{what:28s} sm_{r.arch:<3d} {kinds:11s} REG {r.registers:3d}  STACK {r.stack_bytes:4d}  "
              f"STL/LDL {r.spill_stores}/{r.spill_loads}  shared {r.shared_bytes:6d}  {mma}")


def test_every_launch_is_covered():
    """Each (arch, head_dim, kind, pv, LSE) the launcher can pick is compiled (once per distinct specialisation)."""
    covered = {(c.values[0], c.values[1], k, c.values[3], c.values[4]) for c in CASES for k in c.values[5]}
    want = {(a, d, k, pv, lse) for a in ARCHS for d in SHAPES for k in KV for lse in (False, True)
            for pv in (("fp16", "fp8") if a >= 89 else ("fp16",))}
    assert covered == want
    assert {(a, d) for a, d, _ in T.CONFIGS} == {(a, d) for a in T.ARCH_CLASSES for d in (64, 128)}


@pytest.mark.parametrize("arch", [80, 86])
def test_fp8_is_refused_without_fp8_tensor_cores(arch):
    assert T.default_pv(_cap(arch)) == "fp16"
    with pytest.raises(ValueError, match=rf"pv='fp8' needs fp8 tensor cores \(sm_89 or later\), got sm_{arch}; "):
        _launch(arch, 128, "self", "fp8", False)


@pytest.mark.parametrize("arch,head_dim,kind,pv,write_lse,kinds", CASES)
def test_config_compiles_without_spills(arch, head_dim, kind, pv, write_lse, kinds, tmp_path):
    launch, cfg = _launch(arch, head_dim, kind, pv, write_lse)
    r = aot.compile_launch(launch, arch, workdir=tmp_path)
    RESULTS.append(("+".join(kinds), f"{cfg} hd{head_dim} {pv}{' lse' if write_lse else ''}", r))
    cls = mma_class(_cap(arch))
    assert re.search(_I8[cls], r.ptx), (r.summary(), sorted(set(_ANY_MMA.findall(r.ptx))))
    assert re.search(_PV[cls, pv], r.ptx), (r.summary(), sorted(set(_ANY_MMA.findall(r.ptx))))
    assert not r.spills, r.summary()
    assert r.shared_bytes <= SHARED_LIMIT[arch], r.summary()
    assert r.registers <= 255, r.summary()
