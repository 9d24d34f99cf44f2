"""Hopper/Blackwell path of wan::attention: TMA descriptors, warp-specialised KV loop, persistent tile scheduler.

Same contract and formula as wan_kernels/triton/attention.py (non-causal flash-attention forward in [B, S, H, D]
layout, Wan's I2V image set in the same launch as a second INDEPENDENT softmax state, fp32 accumulation, the
sum of both normalised outputs rounded once, optional natural-log LSE per set). What differs is how the work
is fed to the tensor cores (FlashAttention-3's ideas, Shah et al. 2024, expressed in Triton):

* TMA: per tile, each (batch, head) slice of q, k, v (k_img, v_img) and out becomes a device-side 2-D tensor
  descriptor [S, D] with the tensor's S stride (`tl.make_tensor_descriptor`; any B / S / H strides), block
  [BLOCK, D]: every tile is one bulk tensor copy (`cp.async.bulk.tensor`) into shared memory, with the slice's
  bounds in hardware: rows past S read as zeros and are not written back, so query tails need no masks. (Host
  descriptors over [B, H, S, D] and 3-/4-D device descriptors made Triton 3.8's Hopper warp specialisation
  abort or skip; 2-D ones per slice do not.) TMA wants a 16-byte aligned base, 16-byte multiple strides and a
  contiguous last dim: `supports` says whether a call qualifies; the launcher sends the others to today's
  kernel (`attention.py`), unchanged. Descriptors live in Triton's global scratch (`triton.set_allocator`; the
  launcher installs a torch allocator when none is set).
* Warp specialisation: the KV loop is `tl.range(..., warp_specialize=True)`: Triton splits it into a TMA
  producer warp group and consumer warp groups (on sm_90: two, each owning half of the BLOCK_M rows, FA3's
  layout; on sm_100: MMA / softmax / correction partitions, the correction of the TMEM accumulator beside the
  softmax, FA4's) that hand tiles over through shared-memory barriers, and moves registers from the producer to
  the consumers (`setmaxnreg`). Exception: I2V on sm_90 (two KV loops: Triton's Hopper pass aborts), see CONFIGS.
* Persistent scheduler: a grid of (SM count x ctas_per_sm) programs walks the (batch x heads x query tiles)
  list with stride = grid size; query tiles of one (batch, head) are consecutive, so programs running at the
  same time share that head's K/V in L2. One launch, no partial last wave of whole CTAs.
* Softmax rescale: the key tail is an additive 0 / -inf bias fused into the score scaling (one FMA), so the loop
  body has no branch: a data-dependent branch in the loop (a masked last-tile branch, or FA4's conditional
  "rescale only when the max grew by > 8") made Triton 3.8 drop the warp specialisation on sm_90 and abort on
  sm_100 (NVWS InsertAref), so the accumulator rescale is unconditional; on sm_100 it runs in the correction
  partition, off the MMA -> softmax -> MMA chain; on sm_90 it stays in the consumer (no ping-pong schedule:
  Triton does not expose FA3's inter-warpgroup barriers).

Trade-offs: the tile table (`CONFIGS`) comes from AOT register / spill / shared-memory inspection
(tests/test_attention_ws.py prints it), not GPU timing: there is no GPU here, the speed is measured by
`python -m tools.gpu_check`. fp32 inputs run only under the interpreter (tests); on a GPU `supports`
takes fp16/bf16 with head_dim == value dim in {64, 128} (Wan: 128). The interpreter runs this same function
(descriptors and `tl.range` are interpreted; warp specialisation is a compile-time transform and has no
meaning there), so the CPU tests check the tiling, the descriptors' bounds, the scheduler and the tails.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from wan_kernels.triton import attention as fa2
from wan_kernels.triton._launch import Launch, mma_class, run, target

LOG2E = fa2.LOG2E
_ADD = tl.standard._sum_combine
_MAX = tl.standard._elementwise_max


def _attention_ws_kernel(
    q_ptr, k_ptr, v_ptr, ki_ptr, vi_ptr, o_ptr, lse_ptr,
    H, Sq, Sk, Si,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_kib, stride_kis, stride_kih, stride_vib, stride_vis, stride_vih, stride_ob, stride_os, stride_oh,
    num_bh, tiles_m, qk_scale,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_IMG: tl.constexpr,
    WRITE_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):
    NUM_SETS: tl.constexpr = 2 if HAS_IMG else 1
    num_tiles = tiles_m * num_bh                                             # tiles_m = cdiv(Sq, BLOCK_M)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0)):  # persistent: stride = grid size
        bh = tile // tiles_m                                                 # query tiles of a head adjacent
        start_m = (tile % tiles_m) * BLOCK_M
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        # One (batch, head) slice of each [B, S, H, D] tensor as a 2-D TMA descriptor [S, D] (row stride = S
        # stride): its bounds are that slice's, so rows past S read as 0 and are not stored.
        desc_q = tl.make_tensor_descriptor(q_ptr + b * stride_qb + h * stride_qh, [Sq, BLOCK_D], [stride_qs, 1],
                                           [BLOCK_M, BLOCK_D])
        desc_o = tl.make_tensor_descriptor(o_ptr + b * stride_ob + h * stride_oh, [Sq, BLOCK_D], [stride_os, 1],
                                           [BLOCK_M, BLOCK_D])
        q = desc_q.load([start_m, 0])                                        # [BLOCK_M, BLOCK_D], loaded once
        for j in tl.static_range(NUM_SETS):
            if j == 0:
                kv_len = Sk
                desc_k = tl.make_tensor_descriptor(k_ptr + b * stride_kb + h * stride_kh, [Sk, BLOCK_D],
                                                   [stride_ks, 1], [BLOCK_N, BLOCK_D])
                desc_v = tl.make_tensor_descriptor(v_ptr + b * stride_vb + h * stride_vh, [Sk, BLOCK_D],
                                                   [stride_vs, 1], [BLOCK_N, BLOCK_D])
            else:
                kv_len = Si
                desc_k = tl.make_tensor_descriptor(ki_ptr + b * stride_kib + h * stride_kih, [Si, BLOCK_D],
                                                   [stride_kis, 1], [BLOCK_N, BLOCK_D])
                desc_v = tl.make_tensor_descriptor(vi_ptr + b * stride_vib + h * stride_vih, [Si, BLOCK_D],
                                                   [stride_vis, 1], [BLOCK_N, BLOCK_D])
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.full([BLOCK_M], 0.0, tl.float32)
            acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
            for start_n in tl.range(0, kv_len, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
                # key tail as an additive bias (0 / -inf) fused with the scale: no branch in the loop body
                bias = tl.where(offs_n < kv_len - start_n, 0.0, float("-inf"))
                kt = desc_k.load([start_n, 0])                               # rows >= kv_len read as 0
                s = tl.dot(q, kt.T, input_precision=DOT_PRECISION) * qk_scale + bias[None, :]  # log2 domain
                m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX))
                p = tl.math.exp2(s - m_new[:, None])
                alpha = tl.math.exp2(m_i - m_new)
                l_i = l_i * alpha + tl.reduce(p, 1, _ADD)
                vt = desc_v.load([start_n, 0])
                acc = tl.dot(p.to(vt.dtype), vt, acc * alpha[:, None], input_precision=DOT_PRECISION)
                m_i = m_new
            if j == 0:
                out = acc / l_i[:, None]
            else:
                out += acc / l_i[:, None]
            if WRITE_LSE:
                lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453             # natural log, [NUM_SETS, B, H, Sq]
                lse_base = lse_ptr + ((j * num_bh + bh).to(tl.int64) * Sq + start_m)
                tl.store(lse_base + offs_m, lse, mask=offs_m < Sq - start_m)
        desc_o.store([start_m, 0], out.to(desc_o.dtype))


attention_ws_kernel = JITFunction(_attention_ws_kernel)


# ---------------------------------------------------------------------------------------------
# Launch configurations

@dataclasses.dataclass(frozen=True)
class Config:
    """BLOCK_M queries x BLOCK_N keys per step, warps, pipeline stages, warp specialisation, programs per SM,
    register cap (`maxnreg`, None = ptxas's choice)."""
    BLOCK_M: int
    BLOCK_N: int
    num_warps: int
    num_stages: int
    warp_specialize: bool = True
    ctas_per_sm: int = 1
    maxnreg: int | None = None

    def __str__(self) -> str:
        ws = "ws" if self.warp_specialize else "nows"
        reg = f"r{self.maxnreg}" if self.maxnreg else ""
        return f"{self.BLOCK_M}x{self.BLOCK_N}w{self.num_warps}s{self.num_stages}{ws}c{self.ctas_per_sm}{reg}"


ARCH_CLASSES = (90, 100)
HEAD_DIMS = (64, 128)
_C = Config
# (arch class, head_dim, kind) -> Config, chosen by AOT inspection (tests/test_attention_ws.py prints REG / STACK /
# SHARED): zero spills, shared memory within 227 KB, TMA + the arch's MMA (+ setmaxnreg where warp-specialised).
# Seen (fp16): sm_90 128x128 w4 (Triton adds a producer warp group: 12 warps, registers 40 / 232 by setmaxnreg)
# 168 REG, 230,920 B shared at hd128; sm_100 128x128 w8 96 REG, 199,400 B. sm_100 128x128 w4 spilled 336 B.
# I2V: Triton 3.8's Hopper warp specialisation aborts on two KV loops in one kernel (WSDataPartition "Unexpected
# op"), so sm_90 I2V runs the TMA + persistent kernel without it; sm_100 I2V warp-specialised needs BLOCK_N 32
# at hd128 (64 spilled 104-520 B) and a 128-register cap: without it Triton 3.6 (torch 2.11's) left ptxas at 96
# and spilled 56 B (3.8: 0 B either way); with it both give 128 REG, 0 spills. Every entry is checked under both
# Triton versions (`make compat` runs the AOT tests too).
CONFIGS: dict[tuple[int, int, str], Config] = {
    (90, 64, "self"): _C(128, 128, 4, 2), (90, 64, "cross"): _C(128, 128, 4, 2),
    (90, 64, "i2v"): _C(128, 64, 8, 2, warp_specialize=False),
    (90, 128, "self"): _C(128, 128, 4, 2), (90, 128, "cross"): _C(128, 128, 4, 2),
    (90, 128, "i2v"): _C(128, 64, 8, 2, warp_specialize=False),
    (100, 64, "self"): _C(128, 128, 8, 2), (100, 64, "cross"): _C(128, 128, 8, 2),
    (100, 64, "i2v"): _C(128, 64, 8, 2, warp_specialize=False),
    (100, 128, "self"): _C(128, 128, 8, 2), (100, 128, "cross"): _C(128, 128, 8, 2),
    (100, 128, "i2v"): _C(128, 32, 8, 2, maxnreg=128),
}
# Alternatives to the table's hd128 self-attention entry (the shape that is ~72% of a 14B forward) that the GPU
# check times beside it, so that its first run also says which tile to keep. Each compiles spill-free with the
# design's instructions (TMA, the arch's MMA, setmaxnreg) under Triton 3.6 and 3.8, within shared memory
# (tests/test_attention_ws.py). Ruled out by AOT: sm_90 128x128 at 3 stages (329 KB shared), 8 warps (Triton
# drops the warp specialisation: no setmaxnreg), 2 CTAs per SM (230 KB shared each cannot co-reside); sm_100
# 128x128 at 3 stages (265 KB), 4 warps (336 B spilled).
SWEEP: dict[int, tuple[Config, ...]] = {
    90: (_C(128, 64, 4, 2), _C(128, 64, 4, 3), _C(64, 128, 4, 2)),
    100: (_C(128, 64, 8, 2), _C(128, 64, 8, 3)),
}
# Interpreter (CPU): any valid tile; the persistent loop runs with 3 programs so the stride is exercised.
INTERPRETER_CONFIG = Config(32, 32, 4, 1)
INTERPRETER_PROGRAMS = 3  # fewer programs than tiles: each walks several
# SM counts for readiness (meta tensors have no device): H100/H200 SXM 132, B200 148.
SM_COUNT = {90: 132, 100: 148}


# The arch classes where the route of wan::attention / attention_forward / attention_lse (impl="auto" and the
# named impl="triton") runs this path instead of today's kernel. Empty until the GPU check
# (`python -m tools.gpu_check`, rows "wan-ws" vs "wan") has measured it at least as fast at every Wan shape on
# that arch: it has never executed on a GPU. Enabling an arch is adding it here (90 and / or 100); the routing
# tests check that the dispatcher then runs it there and nowhere else.
ROUTED_ARCH_CLASSES: frozenset[int] = frozenset()


def routed(capability: tuple[int, int] | None) -> bool:
    """Whether the route of a device class runs this path (`ROUTED_ARCH_CLASSES`)."""
    return capability is not None and arch_class(capability) in ROUTED_ARCH_CLASSES


def triton_for(launcher: str):
    """`OpSpec.triton_for` of the attention ops: capability -> this module's `launcher` where `routed`, else
    today's kernel's (attention.py) of the same name. Looked up at call time (tests swap either)."""
    def pick(capability: tuple[int, int]):
        return globals()[launcher] if routed(capability) else getattr(fa2, launcher)

    return pick


def arch_class(capability: tuple[int, int]) -> int | None:
    """90 (wgmma, sm_90) or 100 (tcgen05, sm_100 family); None: this path does not serve the arch."""
    return {"wgmma": 90, "tcgen05": 100}.get(mma_class(capability))


def pick_config(capability: tuple[int, int] | None, head_dim: int, kv_len: int, has_img: bool) -> Config:
    """Table lookup by (arch class, head_dim, kind = attention.kind_of); None = interpreter."""
    if capability is None:
        return INTERPRETER_CONFIG
    return CONFIGS[(arch_class(capability), head_dim, fa2.kind_of(kv_len, has_img))]


def _tma_ok(t: torch.Tensor) -> bool:
    """TMA's rules for a [B, S, H, D] tensor: contiguous last dim, 16-byte aligned base and other strides."""
    e = t.element_size()
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all(s * e % 16 == 0 for s in t.stride()[:-1]))


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_img: torch.Tensor | None = None,
             v_img: torch.Tensor | None = None) -> bool:
    """Whether this path takes the call (else today's kernel does): CUDA tensors of an sm_90 / sm_100-family
    device, fp16/bf16, head_dim == value dim in {64, 128}, every tensor TMA-compatible (contiguous last dim,
    16-byte aligned base and strides); CPU tensors (interpreter) also in fp32, any head_dim that is a power of
    two >= 16. Argument checks (shapes, dtypes agreeing) are the wrapper's."""
    ts = [t for t in (q, k, v, k_img, v_img) if t is not None]
    D, DV = q.shape[-1], v.shape[-1]
    if D != DV or any(t.dtype != q.dtype for t in ts):
        return False
    if q.device.type == "cuda":
        cap = tuple(torch.cuda.get_device_capability(q.device))
        if arch_class(cap) is None or q.dtype not in (torch.float16, torch.bfloat16) or D not in HEAD_DIMS:
            return False
    elif q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or D < 16 or D & (D - 1):
        return False
    return all(_tma_ok(t) for t in ts)


def num_programs(capability, config: Config, num_tiles: int, device: torch.device) -> int:
    """Persistent grid: SM count x programs per SM, at most one program per tile."""
    if capability is None:
        sms = INTERPRETER_PROGRAMS
    elif device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count * config.ctas_per_sm
    else:
        sms = SM_COUNT[arch_class(capability)] * config.ctas_per_sm
    return max(1, min(sms, num_tiles))


def prepare(q, k, v, k_img, v_img, scale, write_lse: bool, config: Config | None, capability):
    """(Launch or None when empty, out, lse) of one call that `supports` accepts, for `capability`
    (None = interpreter). Outputs as attention.prepare: out [B, Sq, H, D], lse [S, B, H, Sq] fp32 or (1,)."""
    has_img = k_img is not None
    on_cpu = capability is None
    if on_cpu and q.dtype == torch.bfloat16:
        # The interpreter computes on bf16 bit patterns as integers (REFERENCE §1): upcast, round once at the end.
        q, k, v = q.float(), k.float(), v.float()
        if has_img:
            k_img, v_img = k_img.float(), v_img.float()
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    Si = k_img.shape[1] if has_img else 0
    s = 1.0 / math.sqrt(D) if scale is None else float(scale)
    out = torch.empty((B, Sq, H, D), dtype=q.dtype, device=q.device)
    num_sets = 2 if has_img else 1
    lse = torch.empty((num_sets, B, H, Sq) if write_lse else (1,), dtype=torch.float32, device=q.device)
    if B * Sq * H == 0:
        return None, out, lse
    if config is None:
        config = pick_config(capability, D, max(Sk, Si), has_img)
    if not has_img:
        k_img, v_img = k, v  # never read (HAS_IMG=False)
    tiles_m = triton.cdiv(Sq, config.BLOCK_M)
    grid = (num_programs(capability, config, tiles_m * B * H, q.device),)
    strides = [x for t in (q, k, v, k_img, v_img, out) for x in (t.stride(0), t.stride(1), t.stride(2))]
    args = (q, k, v, k_img, v_img, out, lse, H, Sq, Sk, Si, *strides, B * H, tiles_m, s * LOG2E)
    kwargs = dict(BLOCK_D=D, BLOCK_M=config.BLOCK_M, BLOCK_N=config.BLOCK_N, HAS_IMG=has_img,
                  WRITE_LSE=write_lse, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                  WARP_SPECIALIZE=config.warp_specialize and not on_cpu,
                  num_warps=config.num_warps, num_stages=config.num_stages)
    if config.maxnreg and not on_cpu:
        kwargs["maxnreg"] = config.maxnreg
    return Launch(attention_ws_kernel, grid, args, kwargs, q.device), out, lse


def _scratch(size: int, alignment: int, stream):
    """Triton's global-scratch allocator (device-side TMA descriptors live there: 128 B each per program)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """Device-side descriptors need `triton.set_allocator`; set ours only where none is set (the caller's wins)."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)


def _run(q, k, v, k_img, v_img, scale, write_lse: bool, config: Config | None):
    """This path when `supports` takes the call, else today's kernel (attention.py), same outputs."""
    if not supports(q, k, v, k_img, v_img):
        launch, out, lse = fa2.prepare(q, k, v, k_img, v_img, scale, write_lse, None, target(q, "attention"))
    else:
        launch, out, lse = prepare(q, k, v, k_img, v_img, scale, write_lse, config, target(q, "attention"))
        if launch is not None and launch.device.type == "cuda":
            _ensure_allocator()
    if launch is not None:
        run(launch)
    return out.to(q.dtype), lse


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_img: torch.Tensor | None = None,
              v_img: torch.Tensor | None = None, scale: float | None = None, *,
              config: Config | None = None) -> torch.Tensor:
    """Launcher of wan::attention, same contract as attention.attention: q [B, Sq, H, D]; k, v [B, Sk, H, D];
    optional k_img, v_img [B, Si, H, D]; any strides. Returns [B, Sq, H, D] contiguous in q's dtype. Calls
    `supports` refuses run today's kernel. `config` overrides the table (the GPU check's SWEEP, tests)."""
    return _run(q, k, v, k_img, v_img, scale, False, config)[0]


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_img: torch.Tensor | None = None,
                      v_img: torch.Tensor | None = None, scale: float | None = None):
    """Launcher of wan::attention_forward: (out [B, Sq, H, D], lse [S, B, H, Sq] float32), S = 1 or 2 (image set)."""
    return _run(q, k, v, k_img, v_img, scale, True, None)


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None):
    """Launcher of wan::attention_lse: (out [B, Sq, H, D] in q's dtype, lse [B, H, Sq] float32), one key set."""
    out, lse = _run(q, k, v, None, None, scale, True, None)
    return out, lse[0]


def attention_with_lse(q, k, v, k_img=None, v_img=None, scale=None, *, config: Config | None = None):
    """(out, lse, lse_img) as attention.attention_with_lse; `config` overrides the heuristic (tests)."""
    out, lse = _run(q, k, v, k_img, v_img, scale, True, config)
    return out, lse[0], (lse[1] if k_img is not None else None)
