"""Triton kernel of wan::qk_norm_rope: RMSNorm of q and k across all heads + interleaved-pair RoPE, fused.

One program per token. For a token with channels qkv = [q | k | v] (C = H * D channels each):
    q' = q * rsqrt(mean(q^2) + eps) * w_q        (RMSNorm over all C channels, across heads: Wan / diffusers)
    k' = k * rsqrt(mean(k^2) + eps) * w_k
    RoPE on interleaved pairs of every head, angle index i in [0, D/2) (one angle per pair, shared by heads):
        out[2i]   = a * cos_i - b * sin_i,    out[2i+1] = a * sin_i + b * cos_i,    (a, b) = (x'[2i], x'[2i+1])
    v is copied into the [B, S, H, D] layout.
All math in fp32, one rounding to the output dtype (as the reference `wan_kernels/ref/qk_norm_rope.py`,
`F.rms_norm` rounding; REFERENCE §4). The input row is read once and the outputs written once: the fused
path moves 6*C elements per token, the unfused diffusers sequence about 20*C (see bench/bench_qk_norm_rope.py).

Layout: a token's q (or k, v) is viewed as a [H_BLOCK, D/2, 2] tile (heads x pairs x even/odd), loaded
contiguously (vectorised 16-byte loads) and split into the even and odd channels with `tl.split`; the
rotated pairs are re-joined and stored contiguously. cos/sin are one [D/2] row per token, broadcast over heads.

Trade-offs:
* Single-tile path (H_BLOCK * D <= MAX_TILE = 8192 elements: every Wan model, up to 64 heads of 128): q, k
  and v of the token live in registers, so the sum of squares and the normalisation use one load. H_BLOCK is
  next_pow2(H), so 40 heads run a 64-head tile with 24 heads masked off (idle lanes, no extra memory traffic).
* Chunked path (more channels): two passes over chunks of H_CHUNK heads; the second pass re-reads q/k of
  the token (20-40 KB, from L1/L2, not HBM). No cap on the number of heads.
* num_warps is chosen so that each thread holds 8 elements per tensor (16 for 8192-element tiles at the
  16-warp cap; see `launch_config`); every
  config the heuristic can pick compiles without spills for sm_80/sm_90/sm_100 (tests/test_triton_aot.py).

* QUANT_Q (wan::qk_norm_rope_int8, 8-bit attention's q): the rotated q of each head is rounded to the output dtype
  in registers (the q the kernel would store), then quantized as `attention_int8_quant` quantizes a stored q
  (amax / 127 per token and head, div_rn, round half away from zero): int8 codes and an fp32 scale per (token,
  head) are written instead of q, 1 byte + 4 / D per element where q took 2 (bf16), and the attention's quantizer
  skips its pass over q (3 bytes per element). Bit-identical with qk_norm_rope + that quantizer on the same
  launch config (tests/test_qk_norm_rope_int8.py); the chunked path uses quarter-size chunks (`launch_config`).

The kernel runs on CUDA tensors, or on CPU tensors through the Triton interpreter (TRITON_INTERPRET=1).
Both flavours are built here from the same Python function (the choice is made per call by device), so
importing this module before or after setting TRITON_INTERPRET makes no difference.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from wan_kernels.triton._launch import EXACT, Launch, interpreter_twin, run, target

# Largest per-tensor tile (elements) of the single-tile path; beyond it the chunked path runs.
MAX_TILE = 8192
# Elements of one tensor (q, k or v) each thread holds: sets num_warps (register budget, no spills). 16 spilled
# 8 bytes on sm_80 for 12 heads x 128 in fp32 (4 warps); 8 spilled 8 bytes on sm_100 for 3 heads x 128 in bf16
# (2 warps) once the kernel was compiled without FMA contraction and with div_rn / sqrt_rn; with 4, every config
# of the readiness report is spill-free on all six archs. Tiles of 8192 elements still give 16 per thread
# (MAX_WARPS), which compiles without spills.
ELEMS_PER_THREAD = 4
MAX_WARPS = 16
# `tl.sum(x)` is `tl.reduce(x, axis, tl.standard._sum_combine)`; calling tl.reduce with Triton's own add
# combiner directly keeps the kernel runnable by the interpreter even when triton.language was imported
# before TRITON_INTERPRET=1 was set (`tl.sum` is then a compiled-only @jit function that the interpreter
# cannot call; the interpreter recognises this combiner and reduces with numpy).
_ADD = tl.standard._sum_combine
_MAX = tl.standard._elementwise_max
# (Likewise `tl.full` rather than the @jit `tl.zeros`.)


@JITFunction
def _round_to(x, out_ty: tl.constexpr, SOFT_BF16: tl.constexpr):
    """x fp32 rounded to the output dtype (RNE) and back to fp32: the q that `qk_norm_rope` stores. SOFT_BF16 (the
    interpreter with a bf16 output, whose own cast truncates): round to nearest even on the bits."""
    if SOFT_BF16:
        u = x.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        return u.to(tl.float32, bitcast=True)
    return x.to(out_ty).to(tl.float32)


@JITFunction
def _store_q8(o, q8_ptrs, qs_ptrs, mask, head_ok, out_ty: tl.constexpr, SOFT_BF16: tl.constexpr):
    """q of one tile [H_BLOCK, D] fp32 -> int8 q8 and one scale per head, as the 8-bit attention's quantizer
    (`attention_int8_quant._quantize_int8_kernel`) quantizes the stored q: rounded to the output dtype first, then
    scale = amax / 127 (div_rn), q8 = round half away from zero of q / scale, clamped to +-127."""
    x = tl.where(mask, _round_to(o, out_ty, SOFT_BF16), 0.0)
    scale = tl.math.div_rn(tl.reduce(tl.abs(x), 1, _MAX), 127.0)              # [H_BLOCK]
    y = tl.math.div_rn(x, tl.where(scale > 0, scale, 1.0)[:, None])
    a = tl.abs(y)
    r = tl.floor(a)
    r = tl.minimum(r + tl.where(a - r >= 0.5, 1.0, 0.0), 127.0)
    tl.store(q8_ptrs, tl.where(y < 0, -r, r).to(tl.int8), mask=mask)
    tl.store(qs_ptrs, scale, mask=head_ok)


def _qk_norm_rope_kernel(
    qkv_ptr, wq_ptr, wk_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, q8_ptr, qs_ptr,
    S, stride_qkv_b, stride_qkv_s, stride_rope_s, eps,
    H: tl.constexpr, D: tl.constexpr, H_BLOCK: tl.constexpr, NUM_CHUNKS: tl.constexpr, QUANT_Q: tl.constexpr,
    SOFT_BF16: tl.constexpr,
):
    HALF: tl.constexpr = D // 2
    C: tl.constexpr = H * D
    pid = tl.program_id(0).to(tl.int64)
    b = pid // S
    s = pid % S
    row = qkv_ptr + b * stride_qkv_b + s * stride_qkv_s  # q at row[0:C], k at row[C:2C], v at row[2C:3C]
    out_off = pid * C                                       # q/k/v outputs are [B*S, C] contiguous

    h = tl.arange(0, H_BLOCK)
    d = tl.arange(0, D)
    offs = h[:, None] * D + d[None, :]                      # [H_BLOCK, D]: channel h*D + d of the chunk
    i = tl.arange(0, HALF)
    cos = tl.load(cos_ptr + s * stride_rope_s + i)[None, :]  # [1, HALF] fp32, broadcast over heads
    sin = tl.load(sin_ptr + s * stride_rope_s + i)[None, :]
    out_ty = q_ptr.dtype.element_ty                         # (QUANT_Q: q_ptr is k's, q's dtype, never written)
    qs_off = (b * H + h) * S + s                            # q's scales are [B, H, S] (QUANT_Q)

    if NUM_CHUNKS == 1:
        mask = tl.broadcast_to((h < H)[:, None], [H_BLOCK, D])
        # everything of the token is loaded up front (memory-level parallelism), then computed in registers
        xq = tl.load(row + offs, mask=mask, other=0.0).to(tl.float32)
        xk = tl.load(row + C + offs, mask=mask, other=0.0).to(tl.float32)
        xv = tl.load(row + 2 * C + offs, mask=mask, other=0.0)
        wq = tl.load(wq_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        wk = tl.load(wk_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(v_ptr + out_off + offs, xv, mask=mask)

        # sums of squares over the whole [H_BLOCK, D] tile (masked lanes are 0), then 1/sqrt(mean + eps)
        rq = tl.math.div_rn(1.0, tl.sqrt_rn(tl.math.div_rn(tl.reduce(tl.reduce(xq * xq, 1, _ADD), 0, _ADD), C * 1.0) + eps))
        rk = tl.math.div_rn(1.0, tl.sqrt_rn(tl.math.div_rn(tl.reduce(tl.reduce(xk * xk, 1, _ADD), 0, _ADD), C * 1.0) + eps))

        # [H_BLOCK, D] -> [H_BLOCK, HALF, 2] -> even / odd channels [H_BLOCK, HALF] (register-local split)
        a, bb = tl.split(tl.reshape(xk * rk * wk, [H_BLOCK, HALF, 2]))
        ok = tl.reshape(tl.join(a * cos - bb * sin, a * sin + bb * cos), [H_BLOCK, D])
        tl.store(k_ptr + out_off + offs, ok.to(out_ty), mask=mask)
        a, bb = tl.split(tl.reshape(xq * rq * wq, [H_BLOCK, HALF, 2]))
        oq = tl.reshape(tl.join(a * cos - bb * sin, a * sin + bb * cos), [H_BLOCK, D])
        if QUANT_Q:
            _store_q8(oq, q8_ptr + out_off + offs, qs_ptr + qs_off, mask, h < H, out_ty, SOFT_BF16)
        else:
            tl.store(q_ptr + out_off + offs, oq.to(out_ty), mask=mask)
    else:
        # pass 1: sums of squares over all chunks (and the v copy)
        acc_q = tl.full([H_BLOCK, D], 0.0, tl.float32)
        acc_k = tl.full([H_BLOCK, D], 0.0, tl.float32)
        for c in range(NUM_CHUNKS):
            co = c * H_BLOCK * D + offs
            mask = tl.broadcast_to(((c * H_BLOCK + h) < H)[:, None], [H_BLOCK, D])
            xq = tl.load(row + co, mask=mask, other=0.0).to(tl.float32)
            xk = tl.load(row + C + co, mask=mask, other=0.0).to(tl.float32)
            xv = tl.load(row + 2 * C + co, mask=mask, other=0.0)
            tl.store(v_ptr + out_off + co, xv, mask=mask)
            acc_q += xq * xq
            acc_k += xk * xk
        rq = tl.math.div_rn(1.0, tl.sqrt_rn(tl.math.div_rn(tl.reduce(tl.reduce(acc_q, 1, _ADD), 0, _ADD), C * 1.0) + eps))
        rk = tl.math.div_rn(1.0, tl.sqrt_rn(tl.math.div_rn(tl.reduce(tl.reduce(acc_k, 1, _ADD), 0, _ADD), C * 1.0) + eps))
        # pass 2: normalise + rotate (re-reads the token's q/k from cache)
        for c in range(NUM_CHUNKS):
            co = c * H_BLOCK * D + offs
            mask = tl.broadcast_to(((c * H_BLOCK + h) < H)[:, None], [H_BLOCK, D])
            xq = tl.load(row + co, mask=mask, other=0.0).to(tl.float32)
            wq = tl.load(wq_ptr + co, mask=mask, other=0.0).to(tl.float32)
            a, bb = tl.split(tl.reshape(xq * rq * wq, [H_BLOCK, HALF, 2]))
            oq = tl.reshape(tl.join(a * cos - bb * sin, a * sin + bb * cos), [H_BLOCK, D])
            if QUANT_Q:
                _store_q8(oq, q8_ptr + out_off + co, qs_ptr + qs_off + c * H_BLOCK * S, mask,
                          (c * H_BLOCK + h) < H, out_ty, SOFT_BF16)
            else:
                tl.store(q_ptr + out_off + co, oq.to(out_ty), mask=mask)
            xk = tl.load(row + C + co, mask=mask, other=0.0).to(tl.float32)
            wk = tl.load(wk_ptr + co, mask=mask, other=0.0).to(tl.float32)
            a, bb = tl.split(tl.reshape(xk * rk * wk, [H_BLOCK, HALF, 2]))
            ok = tl.reshape(tl.join(a * cos - bb * sin, a * sin + bb * cos), [H_BLOCK, D])
            tl.store(k_ptr + out_off + co, ok.to(out_ty), mask=mask)


# Compiled for CUDA tensors; `_launch.run` interprets the same function for CPU tensors (TRITON_INTERPRET=1).
qk_norm_rope_kernel = JITFunction(_qk_norm_rope_kernel)


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """Compile-time parameters of one launch: H heads of D channels, tiles of H_BLOCK heads."""
    H: int
    D: int
    H_BLOCK: int
    NUM_CHUNKS: int
    num_warps: int

    def constexprs(self, quant_q: bool | None = None, soft_bf16: bool = False) -> dict[str, int]:
        """The kernels' tile constexprs; with `quant_q` (False / True) the forward's QUANT_Q and SOFT_BF16 too."""
        tile = {"H": self.H, "D": self.D, "H_BLOCK": self.H_BLOCK, "NUM_CHUNKS": self.NUM_CHUNKS}
        return tile if quant_q is None else {**tile, "QUANT_Q": quant_q, "SOFT_BF16": soft_bf16}

    def options(self, quant_q: bool) -> dict[str, int]:
        """Compile options of a compiled launch. QUANT_Q: `maxnreg` = one CTA's share of the register file. Left to
        itself ptxas sometimes caps the kernel at the count that fits two CTAs per SM and spills one 8-byte value
        (fp32: 24 x 128 on sm_90, 64 registers; with the cap 79 and none); the cap changes nothing where ptxas
        needs fewer (e.g. 48 at 7 x 128 on sm_120)."""
        return {"maxnreg": min(255, 65536 // (32 * self.num_warps))} if quant_q else {}


def launch_config(num_heads: int, head_dim: int, quant_q: bool = False) -> LaunchConfig:
    """The heuristic: one tile of next_pow2(H) heads when it has <= MAX_TILE elements, else chunks of
    MAX_TILE // D heads (a quarter of that when q is quantized in the kernel: with its codes and scales, chunks of
    8192 and 4096 elements spilled 4-16 bytes in fp32 on sm_80, sm_100 or sm_120, 2048 on none of the six archs);
    num_warps = tile / (32 * ELEMS_PER_THREAD), clamped to [1, MAX_WARPS]."""
    if head_dim < 2 or head_dim & (head_dim - 1):
        raise ValueError(f"qk_norm_rope (triton): head_dim must be a power of two >= 2, got {head_dim}")
    h_block = triton.next_power_of_2(num_heads)
    if h_block * head_dim <= MAX_TILE:
        chunks = 1
    else:
        h_block = max(1, (MAX_TILE // 4 if quant_q else MAX_TILE) // head_dim)
        chunks = triton.cdiv(num_heads, h_block)
    tile = h_block * head_dim
    num_warps = min(MAX_WARPS, max(1, tile // (32 * ELEMS_PER_THREAD)))
    return LaunchConfig(num_heads, head_dim, h_block, chunks, num_warps)


def prepare(qkv: torch.Tensor, norm_q_weight: torch.Tensor, norm_k_weight: torch.Tensor, rope_cos: torch.Tensor,
            rope_sin: torch.Tensor, num_heads: int, eps: float, capability: tuple[int, int] | None,
            quant_q: bool = False):
    """(Launch or None when empty, q, k, v): the launch `qk_norm_rope` runs, for `capability` (None = interpreter).
    quant_q (`qk_norm_rope_int8`): q is (q8 int8 [B, S, H, D], q_scale fp32 [B, H, S]) instead, q quantized in
    registers as the 8-bit attention's quantizer would quantize the stored q.

    On the interpreter bf16 q/k are allocated fp32 (see `qk_norm_rope`); the caller rounds them."""
    B, S, C3 = qkv.shape
    C = C3 // 3
    D = C // num_heads
    if qkv.stride(2) != 1:
        qkv = qkv.contiguous()
    wq = norm_q_weight.contiguous()
    wk = norm_k_weight.contiguous()
    cos = rope_cos if rope_cos.stride(-1) == 1 else rope_cos.contiguous()
    sin = rope_sin if rope_sin.stride(-1) == 1 else rope_sin.contiguous()
    if cos.stride(0) != sin.stride(0):
        cos, sin = cos.contiguous(), sin.contiguous()
    shape = (B, S, num_heads, D)
    # The interpreter's fp32 -> bf16 cast truncates instead of rounding to nearest even (triton 3.8,
    # `cast_impl` passes no rounding mode): on CPU the kernel stores bf16 q/k in fp32 and torch rounds
    # them (RNE, as the GPU's cvt.rn.bf16.f32); a q it quantizes it rounds on the bits (`_round_to`). v is a plain
    # copy and is stored by the kernel in any case.
    soft_bf16 = capability is None and qkv.dtype == torch.bfloat16
    k = torch.empty(shape, dtype=torch.float32 if soft_bf16 else qkv.dtype, device=qkv.device)
    v = torch.empty(shape, dtype=qkv.dtype, device=qkv.device)
    if quant_q:
        q8 = torch.empty(shape, dtype=torch.int8, device=qkv.device)
        qs = torch.empty((B, num_heads, S), dtype=torch.float32, device=qkv.device)
        q, outs = (q8, qs), (k, k, v, q8, qs)           # q_ptr: k's (q's dtype), never written
    else:
        q = torch.empty_like(k)
        outs = (q, k, v, q, q)                          # q8_ptr, qs_ptr: placeholders, never written
    if B * S == 0:
        return None, q, k, v
    cfg = launch_config(num_heads, D, quant_q)
    launch = Launch(qk_norm_rope_kernel, (B * S,), (qkv, wq, wk, cos, sin, *outs, S, qkv.stride(0), qkv.stride(1),
                                                   cos.stride(0), float(eps)),
                    dict(cfg.constexprs(quant_q, soft_bf16 and quant_q), num_warps=cfg.num_warps, **EXACT,
                         **(cfg.options(quant_q) if capability is not None else {})),
                    qkv.device, interpreter_twin)
    return launch, q, k, v


def qk_norm_rope(qkv: torch.Tensor, norm_q_weight: torch.Tensor, norm_k_weight: torch.Tensor,
                 rope_cos: torch.Tensor, rope_sin: torch.Tensor, num_heads: int, eps: float = 1e-6):
    """Launcher (same contract as `wan_kernels.qk_norm_rope`; arguments are checked by the caller's wrapper).

    qkv: [B, S, 3C], any strides on B and S (copied only if its last stride is not 1).
    Returns q, k, v: [B, S, H, D] contiguous in qkv's dtype.
    """
    launch, q, k, v = prepare(qkv, norm_q_weight, norm_k_weight, rope_cos, rope_sin, num_heads, eps,
                              target(qkv, "qk_norm_rope"))
    if launch is not None:
        run(launch)
    if q.dtype != qkv.dtype:
        q, k = q.to(qkv.dtype), k.to(qkv.dtype)
    return q, k, v


def qk_norm_rope_int8(qkv: torch.Tensor, norm_q_weight: torch.Tensor, norm_k_weight: torch.Tensor,
                      rope_cos: torch.Tensor, rope_sin: torch.Tensor, num_heads: int, eps: float = 1e-6):
    """Launcher of wan::qk_norm_rope_int8 (arguments checked by the caller's wrapper): `qk_norm_rope` with q
    quantized in the same kernel. Returns q8 int8 [B, S, H, D], q_scale fp32 [B, H, S], k, v [B, S, H, D] in
    qkv's dtype; q8 and q_scale are bit-identical to the 8-bit attention's quantizer run on `qk_norm_rope`'s q."""
    launch, (q8, qs), k, v = prepare(qkv, norm_q_weight, norm_k_weight, rope_cos, rope_sin, num_heads, eps,
                                     target(qkv, "qk_norm_rope_int8"), quant_q=True)
    if launch is not None:
        run(launch)
    return q8, qs, k.to(qkv.dtype), v


# Ahead-of-time compilation (tests/test_triton_aot.py, tools/aot.py): the signature a launch on a
# GPU specialises to for contiguous [B, S, 3C] input (pointers 16-byte aligned, row stride 3C % 16 == 0).
_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
AOT_ALIGNED = ("qkv_ptr", "wq_ptr", "wk_ptr", "cos_ptr", "sin_ptr", "q_ptr", "k_ptr", "v_ptr", "q8_ptr", "qs_ptr",
               "stride_qkv_b", "stride_qkv_s", "stride_rope_s")


def aot_signature(dtype: torch.dtype, weight_dtype: torch.dtype | None = None) -> dict[str, str]:
    """Triton signature of `qk_norm_rope_kernel` for qkv in `dtype` and norm weights in `weight_dtype`."""
    t, w = _TRITON_TYPES[dtype], _TRITON_TYPES[weight_dtype or dtype]
    return {"qkv_ptr": f"*{t}", "wq_ptr": f"*{w}", "wk_ptr": f"*{w}", "cos_ptr": "*fp32", "sin_ptr": "*fp32",
            "q_ptr": f"*{t}", "k_ptr": f"*{t}", "v_ptr": f"*{t}", "q8_ptr": "*i8", "qs_ptr": "*fp32", "S": "i32", "stride_qkv_b": "i32",
            "stride_qkv_s": "i32", "stride_rope_s": "i32", "eps": "fp32", "H": "constexpr", "D": "constexpr",
            "H_BLOCK": "constexpr", "NUM_CHUNKS": "constexpr", "QUANT_Q": "constexpr", "SOFT_BF16": "constexpr"}


# ---------------------------------------------------------------------------------------------
# Backward (wan::qk_norm_rope_backward). For one part (q or k) of a row, with x its C channels, g the gradient of
# its output, r = rsqrt(mean(x^2) + eps), n = x * r:
#     gy = RoPE^T(g):  gy[2i] = g[2i] * cos_i + g[2i+1] * sin_i,  gy[2i+1] = g[2i+1] * cos_i - g[2i] * sin_i
#     dx = r * (gy * w - n * mean(gy * w * n)),   dw += gy * n   (summed over rows)
# rstd is recomputed from qkv rather than saved: the backward reads the row x anyway (dx needs it), so the
# recomputation is one more reduction over registers, no memory traffic, and the forward's outputs and
# schema stay as they are. The weight gradient is deterministic: each program owns a contiguous block of
# ROWS rows and writes its fp32 partial sum [C] to its own row of a [P, C] buffer; the launcher sums the P
# rows (one torch sum, no atomics). One launch per part (q, then k: the same kernel on views of qkv); v's
# gradient is a strided copy. Offsets are 64-bit (151,200 rows x 3 * 5120 channels > 2^31 at Wan 14B).
# Single-tile path: the row's [H_BLOCK, D] tile of x and g in registers (w re-read per row from L1/L2, keeping
# the register set to x, g, the accumulator and temporaries). Chunked path (H_BLOCK * D > MAX_TILE): pass 1
# over chunks reduces sum(x^2) and sum(gy * w * x); pass 2 writes dx and adds gy * n into the program's
# partial row in memory (read-modify-write by the owning program only).

# Programs per launch of the backward (each a block of rows): enough to fill a GPU several times over; the
# partial buffer is [MAX_PROGRAMS, C] fp32 (21 MB at C = 5120).
MAX_PROGRAMS = 1024


def _norm_rope_bwd_kernel(
    g_ptr, x_ptr, w_ptr, cos_ptr, sin_ptr, dx_ptr, dw_ptr,
    N, S, ROWS, stride_x_b, stride_x_s, stride_dx, stride_rope_s, eps,
    H: tl.constexpr, D: tl.constexpr, H_BLOCK: tl.constexpr, NUM_CHUNKS: tl.constexpr,
):
    HALF: tl.constexpr = D // 2
    C: tl.constexpr = H * D
    pid = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, H_BLOCK)
    d = tl.arange(0, D)
    offs = h[:, None] * D + d[None, :]
    i = tl.arange(0, HALF)
    out_ty = dx_ptr.dtype.element_ty
    start = pid * ROWS
    end = tl.minimum(start + ROWS, N)
    if NUM_CHUNKS == 1:
        mask = tl.broadcast_to((h < H)[:, None], [H_BLOCK, D])
        acc = tl.full([H_BLOCK, D], 0.0, tl.float32)
        for t in range(start, end):
            b = t // S
            s = t % S
            x = tl.load(x_ptr + b * stride_x_b + s * stride_x_s + offs, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + t * C + offs, mask=mask, other=0.0).to(tl.float32)
            cos = tl.load(cos_ptr + s * stride_rope_s + i)[None, :]
            sin = tl.load(sin_ptr + s * stride_rope_s + i)[None, :]
            w = tl.load(w_ptr + offs, mask=mask, other=0.0)
            r = tl.math.div_rn(1.0, tl.sqrt_rn(tl.math.div_rn(tl.reduce(tl.reduce(x * x, 1, _ADD), 0, _ADD), C * 1.0) + eps))
            g0, g1 = tl.split(tl.reshape(g, [H_BLOCK, HALF, 2]))
            gy = tl.reshape(tl.join(g0 * cos + g1 * sin, g1 * cos - g0 * sin), [H_BLOCK, D])
            n = x * r
            acc += gy * n
            gn = gy * w
            dot = tl.math.div_rn(tl.reduce(tl.reduce(gn * n, 1, _ADD), 0, _ADD), C * 1.0)
            tl.store(dx_ptr + t * stride_dx + offs, (r * (gn - n * dot)).to(out_ty), mask=mask)
        tl.store(dw_ptr + pid * C + offs, acc, mask=mask)
    else:
        for t in range(start, end):
            b = t // S
            s = t % S
            row = x_ptr + b * stride_x_b + s * stride_x_s
            cos = tl.load(cos_ptr + s * stride_rope_s + i)[None, :]
            sin = tl.load(sin_ptr + s * stride_rope_s + i)[None, :]
            acc_ss = tl.full([H_BLOCK, D], 0.0, tl.float32)
            acc_dot = tl.full([H_BLOCK, D], 0.0, tl.float32)
            for c in range(NUM_CHUNKS):
                co = c * H_BLOCK * D + offs
                mask = tl.broadcast_to(((c * H_BLOCK + h) < H)[:, None], [H_BLOCK, D])
                x = tl.load(row + co, mask=mask, other=0.0).to(tl.float32)
                g = tl.load(g_ptr + t * C + co, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(w_ptr + co, mask=mask, other=0.0)
                g0, g1 = tl.split(tl.reshape(g, [H_BLOCK, HALF, 2]))
                gy = tl.reshape(tl.join(g0 * cos + g1 * sin, g1 * cos - g0 * sin), [H_BLOCK, D])
                acc_ss += x * x
                acc_dot += gy * w * x
            r = tl.math.div_rn(1.0, tl.sqrt_rn(tl.math.div_rn(tl.reduce(tl.reduce(acc_ss, 1, _ADD), 0, _ADD), C * 1.0) + eps))
            dot = tl.math.div_rn(tl.reduce(tl.reduce(acc_dot, 1, _ADD), 0, _ADD) * r, C * 1.0)  # mean(gy * w * n)
            for c in range(NUM_CHUNKS):
                co = c * H_BLOCK * D + offs
                mask = tl.broadcast_to(((c * H_BLOCK + h) < H)[:, None], [H_BLOCK, D])
                x = tl.load(row + co, mask=mask, other=0.0).to(tl.float32)
                g = tl.load(g_ptr + t * C + co, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(w_ptr + co, mask=mask, other=0.0)
                g0, g1 = tl.split(tl.reshape(g, [H_BLOCK, HALF, 2]))
                gy = tl.reshape(tl.join(g0 * cos + g1 * sin, g1 * cos - g0 * sin), [H_BLOCK, D])
                n = x * r
                gn = gy * w
                tl.store(dx_ptr + t * stride_dx + co, (r * (gn - n * dot)).to(out_ty), mask=mask)
                part = dw_ptr + pid * C + co
                tl.store(part, tl.load(part, mask=mask, other=0.0) + gy * n, mask=mask)


norm_rope_bwd_kernel = JITFunction(_norm_rope_bwd_kernel)


def backward_rows(n: int) -> int:
    """Rows per program of the backward: at most MAX_PROGRAMS programs."""
    return max(1, triton.cdiv(n, MAX_PROGRAMS))


def prepare_backward(grad_q, grad_k, grad_v, qkv, norm_q_weight, norm_k_weight, rope_cos, rope_sin, num_heads, eps,
                     capability):
    """(launches: [q part, k part] or [] when empty, grad_qkv, partial_q, partial_k): the launches
    `qk_norm_rope_backward` runs for `capability` (None = interpreter). grad_qkv: [B, S, 3C] (fp32 on the
    interpreter for bf16, see `prepare`), its v part not written by the launches; partial_*: fp32 [P, C]."""
    B, S, C3 = qkv.shape
    C = C3 // 3
    D = C // num_heads
    N = B * S
    if qkv.stride(2) != 1:
        qkv = qkv.contiguous()
    cos = rope_cos if rope_cos.stride(-1) == 1 else rope_cos.contiguous()
    sin = rope_sin if rope_sin.stride(-1) == 1 else rope_sin.contiguous()
    if cos.stride(0) != sin.stride(0):
        cos, sin = cos.contiguous(), sin.contiguous()
    soft_bf16 = capability is None and qkv.dtype == torch.bfloat16
    dqkv = torch.empty((B, S, C3), dtype=torch.float32 if soft_bf16 else qkv.dtype, device=qkv.device)
    rows = backward_rows(N)
    programs = triton.cdiv(N, rows)
    cfg = launch_config(num_heads, D)
    zeros = cfg.NUM_CHUNKS > 1  # the chunked path accumulates into its partial row in memory
    parts = [(torch.zeros if zeros else torch.empty)((programs, C), dtype=torch.float32, device=qkv.device)
             for _ in range(2)]
    if N == 0:
        return [], dqkv, *parts
    launches = []
    for j, (g, w, part) in enumerate(((grad_q, norm_q_weight, parts[0]), (grad_k, norm_k_weight, parts[1]))):
        x = qkv[:, :, j * C:(j + 1) * C]
        launches.append(Launch(norm_rope_bwd_kernel, (programs,),
                               (g.contiguous(), x, w.to(torch.float32).contiguous(), cos, sin,
                                dqkv[:, :, j * C:(j + 1) * C], part, N, S, rows, x.stride(0), x.stride(1), C3,
                                cos.stride(0), float(eps)),
                               dict(cfg.constexprs(), num_warps=cfg.num_warps, **EXACT), qkv.device))
    return launches, dqkv, *parts


def qk_norm_rope_backward(grad_q, grad_k, grad_v, qkv, norm_q_weight, norm_k_weight, rope_cos, rope_sin,
                          num_heads: int, eps: float = 1e-6):
    """Launcher of wan::qk_norm_rope_backward (arguments checked by the caller's wrapper).
    Returns grad_qkv [B, S, 3C] in qkv's dtype, grad_norm_q_weight / grad_norm_k_weight [C] in the weights' dtypes."""
    launches, dqkv, pq, pk = prepare_backward(grad_q, grad_k, grad_v, qkv, norm_q_weight, norm_k_weight, rope_cos,
                                              rope_sin, num_heads, eps, target(qkv, "qk_norm_rope_backward"))
    for launch in launches:
        run(launch)
    C = qkv.shape[2] // 3
    dqkv[:, :, 2 * C:].copy_(grad_v.flatten(-2))
    return dqkv.to(qkv.dtype), pq.sum(0).to(norm_q_weight.dtype), pk.sum(0).to(norm_k_weight.dtype)
