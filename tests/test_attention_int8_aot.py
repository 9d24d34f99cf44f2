"""GPU readiness of 8-bit attention (wan_kernels/triton/attention_int8.py and its quantizer,
attention_int8_quant.py) without a GPU: every config its launcher picks (arch x head_dim 64/128 x kind
self/cross/i2v x pv fp16/fp8 x LSE, and for self-attention the LSE on a quantized q and on quantized q, K and V)
compiles ahead of time (tools/aot.py) from the launcher's own `prepare` on meta tensors (hd64: 12 heads x 1,560
tokens; hd128: 40 heads (Wan 14B) x 262,144 tokens with CFG, a long video whose B*S*H*D passes 2^31 (Wan 14B 720p:
75,600); text 512, image 257 keys), for sm_80/86/89/90/100/120, with

* the int8 MMA for Q.K^T in the PTX: `mma.sync ... s8` (sm_80/86/89/120), `wgmma ... s8` (sm_90),
  `tcgen05.mma ... kind::i8` (sm_100 under Triton 3.8; under 3.6, `make compat`, it is mma.sync: REFERENCE §10);
* the P.V MMA of the pv mode: e4m3 (`mma.sync`/`wgmma` `.e4m3`, tcgen05 `kind::f8f6f4`) or f16 (`kind::f16`),
  and P rounded to e4m3 once (cvt.rn.satfinite.e4m3x2.f32, never through f16); the P.V mma.sync accumulates in
  fp16 on sm_86 / sm_89 / sm_120 (`.f16.e4m3.e4m3.f16` / `.f16.f16.f16.f16`: `hardware.pv_acc16`; not with an
  image set), in fp32 on sm_80, and wgmma and tcgen05 in fp32;
* zero spills (cuobjdump STACK/LOCAL 0 and no STL/LDL in the SASS), registers <= 255;
* with fp8 P.V, V's tiles reach the MMA without byte-wise shared-memory loads or stores (the e4m3 V is
  token-contiguous, `wan_kernels.hardware.empty_v8`: 8-bit MMA operands are K-major);
* shared memory within the arch's per-block limit (sm_86/89/120: 99 KB);
* no 32-bit offset that wraps at those sizes (`aot.offset_overflows`: interval analysis of the PTX).
The quantizer's kernels (statistics, int8 Q/K, fp8/fp16 V) compile the same way: no spills, IEEE division, no
fma contraction (bit-exact with the reference), the same e4m3 cast, 64-bit offsets.
Cost: ~1-2 s per compile on these 2 cores, ~190 compiles.
"""

import re

import pytest
import torch
import triton

from tools import aot
from wan_kernels.hardware import pv_acc16
from wan_kernels.triton import attention_int8 as T
from wan_kernels.triton import attention_int8_quant as Q
from wan_kernels.triton._launch import mma_class

pytestmark = pytest.mark.aot

ARCHS = (80, 86, 89, 90, 100, 120)
# Triton 3.6 (the GPU machines', `make compat`) has no tcgen05 kind::i8: its int8 dot on sm_100 is mma.sync
# (REFERENCE §10; the P.V e4m3 / f16 dot still gets tcgen05). Checked as such, so a change either way shows.
TRITON_36 = tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 7)
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024, 120: 99 * 1024}
LONG = 262_144  # tokens: B*S*H*D = 2.7e9 > 2^31 at 2 x 40 heads x 128 (a long video; Wan 14B 720p: 75,600)
SHAPES = {64: (12, 1560), 128: (40, LONG)}  # head_dim -> (heads, tokens)
KV = {"self": None, "cross": (512, 0), "i2v": (512, 257)}
_I8 = {"mma.sync": r"mma\.sync\.aligned\.m16n8k32\.row\.col(\.satfinite)?\.s32\.s8\.s8\.s32",
       "wgmma": r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k32\.s32\.s8\.s8",
       "tcgen05": r"tcgen05\.mma\.cta_group::\d\.kind::i8"}
_PV = {("mma.sync", "fp8"): r"mma\.sync\.aligned\.m16n8k32\.row\.col\.f32\.e4m3\.e4m3\.f32",
       ("mma.sync", "fp16"): r"mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.f16\.f16\.f32",
       ("acc16", "fp8"): r"mma\.sync\.aligned\.m16n8k32\.row\.col\.f16\.e4m3\.e4m3\.f16",
       ("acc16", "fp16"): r"mma\.sync\.aligned\.m16n8k16\.row\.col\.f16\.f16\.f16\.f16",
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


def _discard(launch):
    """`prepare`'s quantizer launches on meta tensors (compiled by the quantizer's own cases below)."""


def _launch(arch, d, kind, pv, lse):
    """lse: False, True, "q8" (wan::attention_int8_q8_lse: q quantized already, the LSE's correction in the
    kernel) or "kv8" (wan::attention_int8_quantized_lse: K/V quantized already too, fp32 output); the last two for
    a ring's self-attention blocks only."""
    h, s = SHAPES[d]
    sk, si = KV[kind] or (s, 0)
    if lse == "kv8":
        q8 = torch.empty((2, s, h, d), dtype=torch.int8, device="meta")
        kv = Q.quantize_kv(_meta(2, sk, h, d), _meta(2, sk, h, d), pv, _cap(arch), _discard)
        return T.prepare_quantized(q8, torch.empty((2, h, s), device="meta"), kv, None, None, None, _cap(arch))[0], \
            T.pick_config(_cap(arch), d, sk, False)
    kv = [_meta(2, n, h, d) for n in (sk, sk, si, si) if n]
    img = kv[2:] if si else (None, None)
    q = (torch.empty((2, s, h, d), dtype=torch.int8, device="meta"),
         torch.empty((2, h, s), dtype=torch.float32, device="meta")) if lse == "q8" else _meta(2, s, h, d)
    return T.prepare(q, kv[0], kv[1], *img, None, pv, bool(lse), None, _cap(arch), _discard)[0], \
        T.pick_config(_cap(arch), d, max(sk, si), bool(si))


def _cases():
    cases, seen = [], {}
    for arch in ARCHS:
        for d in SHAPES:
            for kind in KV:
                for pv in ("fp16", "fp8") if T.default_pv(_cap(arch)) == "fp8" else ("fp16",):
                    for lse in (False, True, "q8", "kv8") if kind == "self" else (False, True):
                        launch, cfg = _launch(arch, d, kind, pv, lse)
                        spec = aot.specialize(launch, arch)
                        key = (arch, repr(spec.signature), repr(spec.constexprs), repr(spec.attrs),
                               repr(sorted(spec.options.__dict__.items())))
                        if key in seen:
                            seen[key].append(kind)
                            continue
                        seen[key] = kinds = [kind]
                        mode = {False: "", True: "-lse", "q8": "-lse-q8", "kv8": "-lse-kv8"}[lse]
                        label = f"sm{arch}-hd{d}-{kind}-{cfg}-{pv}{mode}"
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
    want = {(a, d, k, pv, lse) for a in ARCHS for d in SHAPES for k in KV
            for lse in ((False, True, "q8", "kv8") if k == "self" else (False, True))
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
    RESULTS.append(("+".join(kinds), f"{cfg} hd{head_dim} {pv}{' lse' if write_lse else ''}"
                                     f"{' ' + write_lse if isinstance(write_lse, str) else ''}", r))
    cls = mma_class(_cap(arch))
    i8 = "mma.sync" if cls == "tcgen05" and TRITON_36 else cls
    assert re.search(_I8[i8], r.ptx), (r.summary(), sorted(set(_ANY_MMA.findall(r.ptx))))
    acc16 = pv_acc16(_cap(arch)) and kind != "i2v"  # the launcher keeps fp32 with an image set
    assert re.search(_PV["acc16" if acc16 else cls, pv], r.ptx), (r.summary(), sorted(set(_ANY_MMA.findall(r.ptx))))
    assert not acc16 or not re.search(_PV[cls, pv], r.ptx)  # no fp32-accumulating P.V left
    assert not r.spills, r.summary()
    assert r.shared_bytes <= SHARED_LIMIT[arch], r.summary()
    assert r.registers <= 255, r.summary()
    if pv == "fp8":  # P to e4m3 rounded once (Triton's own cast goes through f16 toward zero on sm_89)
        assert "cvt.rn.satfinite.e4m3x2.f32" in r.ptx and "cvt.rz.f16.f32" not in r.ptx
        # V's e4m3 tiles reach the MMA K-major (`hardware.empty_v8`): no byte-wise shared-memory access at a
        # per-thread address (a channel-contiguous V: 256 LDS.U8 per warp and tile on sm_89 / sm_120, 32 STS.U8 on
        # sm_90; sm_100's one or two byte accesses of a barrier flag before the loop use a uniform address, [URn])
        bytewise = re.findall(r"\b(?:LDS|STS)\.U8\b[^;]*\[R\d", aot.sass(r.cubin_path))
        assert not bytewise, (r.summary(), len(bytewise))
    check = aot.offset_overflows(launch, r.ptx, arch)
    assert check.checked > 0 and check.overflowing == [], check.overflowing[:4]


# ---------------------------------------------------------------------------------------------
# The quantizer (wan_kernels/triton/attention_int8_quant.py): statistics, int8 Q/K, fp8/fp16 V

def _quant_cases():
    """Each quantizer kernel in each of its modes (EXTREMA, SQUARES, SMOOTH, BALANCE, SHIFTS, FP8) once per arch,
    from the launches of head_dim 128 (every Wan model's) at 40 heads x LONG tokens with CFG, self and I2V, with and
    without LSE, and a key set's quantization for a q quantized already (attention_int8_q8, a ring's blocks). The
    launches' other specialisations (alignment of the lengths) change no instruction that matters here: the
    kernels are memory-bound loops with no MMA; one compile per mode keeps this at ~60 compiles."""
    cases, seen = [], set()
    h, s = SHAPES[128]
    for arch in ARCHS:
        for pv in ("fp16", "fp8") if T.default_pv(_cap(arch)) == "fp8" else ("fp16",):
            for img in (False, True):
                for lse in (False, True):
                    kv = [_meta(2, n, h, 128) for n in (512, 512, 257, 257)] if img else [_meta(2, s, h, 128)] * 2
                    launches = Q.quantize_launches(_meta(2, s, h, 128), kv[0], kv[1], *(kv[2:] or (None, None)),
                                                   pv, lse, _cap(arch))
                    Q.quantize_kv(kv[0], kv[1], pv, _cap(arch), launches.append)  # q quantized already: no balance
                    for launch in launches:
                        name = launch.kernel.fn.__name__
                        modes = tuple(sorted((k, v) for k, v in launch.kwargs.items() if k in _MODES))
                        if (arch, name, modes) not in seen:
                            seen.add((arch, name, modes))
                            label = f"sm{arch}-{name.strip('_')}-" + "-".join(f"{k}{int(v)}" for k, v in modes)
                            cases.append(pytest.param(arch, launch, id=label))
    return cases


_MODES = ("EXTREMA", "SQUARES", "SMOOTH", "BALANCE", "SHIFTS", "FP8")


QUANT_CASES = _quant_cases()


def test_quantizer_launches_cover_its_kernels_and_modes():
    names = {(c.values[1].kernel.fn.__name__, tuple(sorted((k, v) for k, v in c.values[1].kwargs.items()
                                                            if k in _MODES)))
             for c in QUANT_CASES}
    assert names == {("_token_stats_kernel", (("EXTREMA", False), ("SQUARES", False))),
                     ("_token_stats_kernel", (("EXTREMA", True), ("SQUARES", False))),
                     ("_token_stats_kernel", (("EXTREMA", True), ("SQUARES", True))),
                     ("_quantize_int8_kernel", (("BALANCE", True), ("SHIFTS", 0), ("SMOOTH", False))),
                     ("_quantize_int8_kernel", (("BALANCE", True), ("SHIFTS", 0), ("SMOOTH", True))),
                     ("_quantize_int8_kernel", (("BALANCE", True), ("SHIFTS", 1), ("SMOOTH", False))),
                     ("_quantize_int8_kernel", (("BALANCE", True), ("SHIFTS", 2), ("SMOOTH", False))),
                     ("_quantize_int8_kernel", (("BALANCE", False), ("SHIFTS", 0), ("SMOOTH", True))),
                     ("_quantize_v_kernel", (("FP8", False),)), ("_quantize_v_kernel", (("FP8", True),))}


@pytest.mark.parametrize("arch,launch", QUANT_CASES)
def test_quantizer_compiles_without_spills_and_64bit_offsets(arch, launch, tmp_path):
    """No spills, the e4m3 conversion compiled as cvt.rn.satfinite, IEEE division (div.rn) and no fma, and no
    32-bit offset that wraps at the launch's sizes (tools/aot.py's interval analysis of the PTX)."""
    r = aot.compile_launch(launch, arch, workdir=tmp_path)
    assert not r.spills and r.registers <= 255, r.summary()
    check = aot.offset_overflows(launch, r.ptx, arch)
    assert check.checked > 0 and check.overflowing == [], check.overflowing[:4]
    name = launch.kernel.fn.__name__
    if name != "_token_stats_kernel":
        assert "div.rn.f32" in r.ptx and "div.full.f32" not in r.ptx and "fma.rn.f32" not in r.ptx
    if launch.kwargs.get("FP8"):
        assert re.search(r"cvt\.rn\.satfinite\.e4m3x2\.f32", r.ptx)
