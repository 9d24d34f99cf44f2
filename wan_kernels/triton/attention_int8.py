"""Triton kernel of 8-bit attention (SageAttention2-class: Zhang et al. 2024, "SageAttention2", arXiv 2411.10958):
INT8 Q.K^T, FP8 (e4m3) or FP16 P.V, in [B, S, H, D] layout, with Wan's optional second (image) key/value set in
the same launch. The exact emulation, stage by stage, is `wan_kernels/ref/attention_int8.py`.

Formula, per (batch, head), per key/value set j (text k, v; in I2V mode also k_img, v_img), key tiles of BLOCK_N:
    k~   = k - mean_n(k)                                  (smoothing: softmax-invariant, removes the shared bias)
    q_i8 = rha(q / sq),  sq = amax/127 per Q_GROUP rows;  k_i8 = rha(k~ / sk),  sk = amax/127 per K_GROUP keys
    s    = int32(q_i8 k_i8^T) * (sq * scale * log2 e) * sk   (exact int dot; scale and log2 e folded into sq)
    m'   = max(m, rowmax s);  p = exp2(s - m');  alpha = exp2(m - m')
    fp8:  v8 = e4m3((v - vm) / sv), vm = mean_n(v), sv = amax/1.75 per channel over all tokens;  p8 = e4m3(448 p)
          acc = acc * alpha + dot(p8, v8)   (each tile's dot starts from 0 and is added in fp32: two-level;
                                              the dot accumulates in fp16 on sm_86 / sm_89 / sm_12x: PV_ACC16)
    fp16: v16 = fp16(v / sv), sv = 1 unless amax > 512 (a power of two);  acc = dot(fp16(p), v16, acc * alpha)
          (PV_ACC16: acc = acc * alpha + dot(fp16(p), v16) accumulated in fp16, as fp8's)
    l    = l * alpha + rowsum(rounded p);  out += acc / l * sv + vm  (vm = 0 for fp16)
    lse_j = (m + log2(l / 448 or 1)) ln 2 + s q.mean(k)
(rha: round half away from zero, as SageAttention). The sets keep independent (m, l, acc) and their outputs are
summed in fp32 and rounded once to q's dtype (REFERENCE §4). Smoothing makes the LSE that of the smoothed scores:
the launcher adds s q.mean(k) (fp32, torch) back, so the LSE is that of the real scores. From a q quantized
already (wan::attention_int8_q8_lse, SHIFT_Q8: a ring's blocks on the fused q) there is no float q: the kernel adds
s q^.mean(k) of q^ = q8 * q_scale itself, after the key loop (the LSE of the scores its output was computed from).

Granularity: one scale per Q row and per key (Q_GROUP = K_GROUP = 1), finer than SageAttention (Triton: 128 Q rows,
64 keys; CUDA "per thread": 4-row Q groups, 16-key K groups), whose scale must be uniform over an MMA fragment.
Here the scale vectors are loaded per row / per key and indexed row // group anyway (any BLOCK_M / BLOCK_N works,
and results do not change with the arch's config except where P is rounded: BLOCK_N), so per-token scales cost
no instruction in the loop: the same BLOCK_N-vector load per tile (4 bytes per key next to D bytes of int8 k)
and a [B, H, S] fp32 tensor (4/D of the int8 tensor's bytes). Measured on the reference (bit-equal to the
kernel), fp16 P.V, mean worst-head NRMSE over 6 seeds of wan_kernels/testing.py's generators: Wan-like hd128 self 0.0300
(128/64, Sage) -> 0.0210 (Q per row) -> 0.0160 (Q and K per token); comfy channel recipe 0.0204 -> 0.0192 ->
0.0123. An earlier single-seed reading (Q groups of 32 worse than 128: 0.0255 vs 0.0219, seed 0) was noise: the
statistic is the worse of 2 heads on a heavy-tailed input whose error is dominated by K's rounding; over 8 seeds
32 beats 128 (0.0262 vs 0.0291, in 6 of 8) and Q's own rounding error falls monotonically (2.5% -> 2.1% -> 1.1%
relative for 128 / 32 / 1 rows). No index bug: the kernel equals the reference at groups 32 / 16 (test).
Per-token scales leave one error: a channel large in k (or q) alone sets that row's grid for all its channels. The
channel balance (the quantizer's stage 1b, where q and k are quantized together) multiplies q by b and K by 1 / b
per (batch, head, channel), b^4 = (max|k - mean| / max|q|) (RMS(k - mean) / RMS(q)) (`ref.channel_balance`):
the scores are the same sums, the range is split evenly between the operands, and nothing changes in this kernel.
Worst-head NRMSE (fp16 P.V, reference), mean over 8 seeds without -> with: Wan-like hd128 self 0.0172 -> 0.0094,
I2V hd128 0.0214 -> 0.0148, hd64 0.0124 -> 0.0080 (fp8 P.V: 0.0206 -> 0.0147, 0.0279 -> 0.0226, 0.0170 ->
0.0133); no seed's worst head more than 1.07x worse; comfy-channel (i.i.d. channels) unchanged. With the maxima
alone (b^2 = the amax ratio, SmoothQuant's form) one seed's head came out 1.8x worse: a sink key's value sets a
maximum; a power-of-two b (exact products) was 10-20 % worse again. A q quantized already (attention_int8_q8:
the fused qk_norm_rope_int8) goes without it: its rounding came before K was seen.
V per channel over all tokens (Sage2): the scale multiplies the output columns once. fp8 V is smoothed (Sage2's
smooth_v): e4m3 keeps 3 mantissa bits relative to the channel's amax, so a channel with a large offset and a small
spread lost most of it; since the weights sum to 1 the mean comes back exactly in the epilogue (Wan-like inputs:
worst-head NRMSE 0.064 -> 0.021 on one seed).

Precision trade-offs:
* FP8 P.V (3 mantissa bits) costs ~3-5% NRMSE on zero-mean random V (REFERENCE §10), less on real activations;
  pv="fp16" is the accurate variant (sm_80/86 have no fp8 MMA: `default_pv`).
* Two-level accumulation: the fp8 MMA on sm_89/90 keeps ~22 significant bits in its accumulator; each key tile's
  dot starts fresh (BLOCK_N <= 128 keys, what Sage2 promotes at) and is added to the fp32 total by the CUDA cores.
  Triton's default `max_num_imprecise_acc` on sm_90 (no promotion inside one dot) is therefore what we want:
  the dot's K dimension IS the key tile, so passing max_num_imprecise_acc = BLOCK_N would change nothing.
* fp16 accumulation on sm_86 / sm_89 / sm_12x (`hardware.pv_acc16`, PV_ACC16): there each tile's P.V dot
  accumulates in fp16 (`mma.sync ... f16.e4m3.e4m3.f16` / `f16.f16.f16.f16`, Sage2++'s "fp32+fp16") and joins the
  fp32 total: the GeForce parts run fp8 / fp16 MMAs into fp32 at half rate (RTX 4090: fp8 330 vs 660 TFLOP/s, the
  int8 Q.K^T's rate; RTX 3090: fp16 71 vs 142), which would cap an RTX 4090 at 440 TOPS. V's codes are bounded
  for it: e4m3 |v8| <= 1.75 (`hardware.V_E4M3_MAX`: amax/448's grid times 2^-8, the same rounding but in e4m3's
  subnormals), 64 x 448 x 1.75 = 50,176 < 65,504; fp16 |v16| <= 512 (`hardware.FP16_V_MAX`, a power-of-two
  divisor), 64 x 512 = 32,768; the launcher refuses a larger BLOCK_N. Not with an image set (I2V: its two sets'
  live state left no registers for the fp16 tile on sm_120). Measured on the reference (the tests'
  accuracy cases): worst-head NRMSE the same as fp32 accumulation's to 4 digits, both pv modes (e.g. Wan-like
  hd128 self fp8 0.05707 -> 0.05705, fp16 0.05264 -> 0.05264); SageAttention2++'s amax/2.25 (another rounding
  grid) moved them by -11 % to +37 % (Wan-like hd64 I2V 0.0209 -> 0.0287, past the fp8 bar).
* l sums the rounded weights (p8 / p16), so out is a convex combination of the quantized v rows.
* Q/K/V are quantized by the Triton quantizer (`attention_int8_quant.py`: a statistics pass over k and v, then
  one quantizing pass per tensor, ~13 bytes moved per element of q at bf16). Inputs are never written (the
  smoothed k exists only in registers; SageAttention's `sageattn` writes it into the caller's tensor). The LSE's
  smoothing correction s q.mean(k) comes from the quantizer's Q pass (added to the kernel's LSE in torch: 8 bytes
  per row; loading it in the kernel's epilogue spilled on sm_120).
* The fp32 -> e4m3 cast (`attention_int8_quant.to_e4m3`): compiled, cvt.rn.satfinite.e4m3x2.f32 as inline PTX
  (Triton's own cast rounds twice on sm_89: through f16 toward zero, then to e4m3). The Triton interpreter's cast
  is wrong where rounding carries into the next power of two (REFERENCE §10), so the interpreted twin encodes
  e4m3 in software (`triton/nvfp4.py`'s `e4m3_code`, bit-exact with torch's cast: tested on a dense sweep); the
  launcher picks it with the constexpr SOFT_E4M3.

V's layout: the kernel takes all four strides of V, and an e4m3 V is token-contiguous (`hardware.empty_v8`, what
the quantizer writes and every backend of wan::quantize_kv_int8 returns): 8-bit MMA operands are K-major only
(mma.sync m16n8k32's "col" B, wgmma and tcgen05 for 8-bit types), and for P.V the K dimension is the tokens. With a
channel-contiguous e4m3 V, Triton built each key tile's B fragments byte by byte: per warp and tile at head_dim
128, 256 LDS.U8 + 208 PRMT on sm_89 and sm_120 (ldmatrix.trans exists for 16-bit elements only), 32 STS.U8 into a
transposed shared tile on sm_90; token-contiguous, the fragments are ldmatrix loads (44 LDSM, 16 PRMT) and on sm_90
the tile goes to shared memory by cp.async (tests/test_attention_int8_aot.py counts them). An e4m3 V in another
layout is transposed once by the launcher (`_v_operand`). fp16 V stays channel-contiguous (ldmatrix.trans).

Masking and offsets: query rows >= Sq load zeros and are not stored; a set's whole key tiles load with no key mask,
and its last, partial tile (`_key_tile`, MASKED: peeled off the loop) loads zeros past S_j and gives them score
-inf. Base offsets and scale indices are int64 (V's channel stride, padded tokens, is int32: fine below 16.9 M
tokens). head_dim and Dv
are padded to powers of two >= 32 (int8 dot K-width) with masked loads.

Tiles (`CONFIGS`, per arch class x head_dim x kind, as the bf16 kernel), checked ahead of time for sm_80/86/89/
90/100/120 x pv x LSE (tests/test_attention_int8_aot.py, Triton 3.8): int8 Q.K^T gets mma.sync m16n8k32 s8 on
sm_80/86/89/120, wgmma s8 on sm_90 and tcgen05 kind::i8 on sm_100; P.V e4m3 mma.sync / wgmma / kind::f8f6f4 or
f16. BLOCK_M 128 with 8 warps, except hd128 I2V: the first set's output stays live (fp32, 64 registers per thread
at 128 x 128) beside the second set's accumulator, and 128x32 spilled on sm_90 (fp8), sm_100 and sm_120 (56-192
bytes); 64x64 with 8 warps does not (REG 226-255 under Triton 3.8). sm_80/86 have no fp8 MMA
(Triton refuses the e4m3 type there): `default_pv` picks fp16 and an explicit pv="fp8" is refused in `prepare`.

The kernel runs on CUDA tensors, or on CPU tensors through the Triton interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from typing import Callable

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from wan_kernels.hardware import E4M3_MAX, FP16_MAX, FP16_V_MAX, V_E4M3_MAX, default_pv, empty_v8, pv_acc16
from wan_kernels.triton._launch import Launch, interpreter_twin, run, target
from wan_kernels.triton.attention_int8_quant import LOG2E, Quantized, quantize, quantize_kv, to_e4m3
from wan_kernels.triton.attention_int8_quant import kv_stats as _kv_stats
from wan_kernels.triton.attention import ARCH_CLASSES, KINDS, Config, arch_class, kind_of  # noqa: F401 (the table's keys)

LN2 = 0.6931471805599453
LOG2_448 = math.log2(E4M3_MAX)  # P's row max as e4m3 (as fp16: 1)
Q_GROUP, K_GROUP = 1, 1  # per-token scales (header: Granularity)
_LN2 = tl.constexpr(LN2)          # the kernel reads module globals only as constexprs (a float global fails to compile)
_LOG2_448 = tl.constexpr(LOG2_448)
_E4M3_MAX = tl.constexpr(E4M3_MAX)
_ADD = tl.standard._sum_combine
_MAX = tl.standard._elementwise_max
_jit = JITFunction


@_jit
def _key_tile(q, qs, kt_ptrs, ks_ptrs, vt_ptrs, m_i, l_i, acc, n_ok, d_ok, dv_ok,
              PV_FP8: tl.constexpr, PV_ACC16: tl.constexpr, SOFT_E4M3: tl.constexpr, MASKED: tl.constexpr):
    """One key tile of one set: the online softmax's (m, l, acc) after it. MASKED: the set's last, partial tile
    (n_ok: its keys; the others load zeros and get score -inf). The whole tiles load K and V with no key mask: a
    mask along V's token-contiguous e4m3 rows (`hardware.empty_v8`) has no two equal neighbours, so its loads were
    single bytes through registers instead of 16-byte cp.async (it spilled at hd64 on sm_100 and sm_120).
    PV_ACC16: the tile's P.V dot accumulates in fp16 (`hardware.pv_acc16`), then joins the fp32 total."""
    if MASKED:
        kt = tl.load(kt_ptrs, mask=d_ok[:, None] & n_ok[None, :], other=0)
        ks = tl.load(ks_ptrs, mask=n_ok, other=0.0)
    else:
        kt = tl.load(kt_ptrs, mask=d_ok[:, None], other=0)
        ks = tl.load(ks_ptrs)
    s = tl.dot(q, kt).to(tl.float32) * qs[:, None] * ks[None, :]            # int32 -> fp32, log2 domain
    if MASKED:
        s = tl.where(n_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    if MASKED:
        vt = tl.load(vt_ptrs, mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
    else:
        vt = tl.load(vt_ptrs, mask=dv_ok[None, :], other=0.0)
    if PV_FP8:
        p8 = to_e4m3(p * _E4M3_MAX, SOFT_E4M3)
        l_i = l_i * alpha + tl.reduce(p8.to(tl.float32), 1, _ADD)
        if PV_ACC16:                                                          # fresh fp8 dot: two-level
            acc = acc * alpha[:, None] + tl.dot(p8, vt, out_dtype=tl.float16).to(tl.float32)
        else:
            acc = acc * alpha[:, None] + tl.dot(p8, vt)
    else:
        p16 = p.to(tl.float16)
        l_i = l_i * alpha + tl.reduce(p16.to(tl.float32), 1, _ADD)
        if PV_ACC16:
            acc = acc * alpha[:, None] + tl.dot(p16, vt, out_dtype=tl.float16).to(tl.float32)
        else:
            acc = tl.dot(p16, vt, acc * alpha[:, None])
    return m_new, l_i, acc


@_jit
def _attention_int8_kernel(
    q_ptr, qs_ptr, k_ptr, ks_ptr, v_ptr, vs_ptr, vm_ptr, ki_ptr, kis_ptr, vi_ptr, vis_ptr, vim_ptr, o_ptr, lse_ptr,
    km_ptr, Sq, Sk, Si, H, row_qs, row_ks, row_kis,  # row_*: the scales' (b, h) row strides
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_kib, stride_kis, stride_kih,
    stride_vib, stride_vis, stride_vih, stride_vid,
    stride_ob, stride_os, stride_oh,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, Q_GROUP: tl.constexpr, K_GROUP: tl.constexpr,
    HAS_IMG: tl.constexpr, WRITE_LSE: tl.constexpr, PV_FP8: tl.constexpr, PV_ACC16: tl.constexpr,
    SOFT_E4M3: tl.constexpr,
    SHIFT_Q8: tl.constexpr = False,
):
    NUM_SETS: tl.constexpr = 2 if HAS_IMG else 1
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < Sq - start_m
    d_ok = offs_d < D
    dv_ok = offs_dv < DV

    q_base = q_ptr + b * stride_qb + h * stride_qh + start_m.to(tl.int64) * stride_qs
    q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0)                    # [BLOCK_M, BLOCK_D] int8
    qs = tl.load(qs_ptr + bh * row_qs + (start_m + offs_m) // Q_GROUP, mask=row_ok, other=0.0)

    for j in tl.static_range(NUM_SETS):
        if j == 0:
            kv_len = Sk
            k_base = k_ptr + b * stride_kb + h * stride_kh
            v_base = v_ptr + b * stride_vb + h * stride_vh
            ks_base = ks_ptr + bh * row_ks
            vs_base = vs_ptr + bh * DV
            vm_base = vm_ptr + bh * DV
            s_k = stride_ks
            s_v = stride_vs
            s_vd = stride_vd
        else:
            kv_len = Si
            k_base = ki_ptr + b * stride_kib + h * stride_kih
            v_base = vi_ptr + b * stride_vib + h * stride_vih
            ks_base = kis_ptr + bh * row_kis
            vs_base = vis_ptr + bh * DV
            vm_base = vim_ptr + bh * DV
            s_k = stride_kis
            s_v = stride_vis
            s_vd = stride_vid
        k_offs = offs_n[None, :] * s_k + offs_d[:, None]                          # [BLOCK_D, BLOCK_N]: k^T tile
        v_offs = offs_n[:, None] * s_v + offs_dv[None, :] * s_vd                  # [BLOCK_N, BLOCK_DV]
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.full([BLOCK_M], 0.0, tl.float32)
        acc = tl.full([BLOCK_M, BLOCK_DV], 0.0, tl.float32)
        n_full = kv_len - kv_len % BLOCK_N
        for start_n in range(0, n_full, BLOCK_N):                                   # whole tiles: no key mask
            m_i, l_i, acc = _key_tile(q, qs, k_base + k_offs, ks_base + (start_n + offs_n) // K_GROUP,
                                      v_base + v_offs, m_i, l_i, acc, offs_n, d_ok, dv_ok, PV_FP8, PV_ACC16,
                                      SOFT_E4M3, False)
            k_base += BLOCK_N * s_k
            v_base += BLOCK_N * s_v
        if n_full < kv_len:                                                         # the last, partial tile
            m_i, l_i, acc = _key_tile(q, qs, k_base + k_offs, ks_base + (n_full + offs_n) // K_GROUP,
                                      v_base + v_offs, m_i, l_i, acc, offs_n < kv_len - n_full, d_ok, dv_ok,
                                      PV_FP8, PV_ACC16, SOFT_E4M3, True)
        vs = tl.load(vs_base + offs_dv, mask=dv_ok, other=0.0)
        vm = tl.load(vm_base + offs_dv, mask=dv_ok, other=0.0)
        if j == 0:
            out = acc / l_i[:, None] * vs[None, :] + vm[None, :]
        else:
            out += acc / l_i[:, None] * vs[None, :] + vm[None, :]
        if j == NUM_SETS - 1:  # stored before the LSE's epilogue: the tile's registers are free for it
            o_base = o_ptr + b * stride_ob + h * stride_oh + start_m.to(tl.int64) * stride_os
            tl.store(o_base + offs_m[:, None] * stride_os + offs_dv[None, :], out.to(o_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & dv_ok[None, :])
        if WRITE_LSE:
            lse = m_i + tl.math.log2(l_i)
            if PV_FP8:
                lse = lse - _LOG2_448
            if SHIFT_Q8:  # the LSE's smoothing correction from the quantized q (one key set): s q^.mean(k), log2
                # domain (wan::attention_int8_q8_lse: no float q to take it from), from q's tile read again in
                # 32-wide chunks here, after the loop: computed before it, from the tile in registers or read
                # again, it spilled on sm_120 (hd128, Triton 3.6)
                offs_c = tl.arange(0, 32)
                q_shift = tl.full([BLOCK_M], 0.0, tl.float32)
                for c in tl.static_range(0, BLOCK_D, 32):
                    c_ok = offs_c < D - c
                    qc = tl.load(q_base + offs_m[:, None] * stride_qs + (c + offs_c)[None, :],
                                 mask=row_ok[:, None] & c_ok[None, :], other=0)
                    km = tl.load(km_ptr + bh * D + c + offs_c, mask=c_ok, other=0.0)
                    q_shift += tl.reduce(qc.to(tl.float32) * km[None, :], 1, _ADD)
                lse = lse + q_shift * qs
            lse_base = lse_ptr + ((j * tl.num_programs(1) + bh) * Sq + start_m)
            tl.store(lse_base + offs_m, lse * _LN2, mask=row_ok)


attention_int8_kernel = _attention_int8_kernel


_interpreted = interpreter_twin  # the kernels for the Triton interpreter (CPU tensors)


# ---------------------------------------------------------------------------------------------
# Launch configurations

# The tile table has the bf16 kernel's shape (its Config, ARCH_CLASSES, KINDS, arch_class, kind_of).
_C = Config
# (arch class, BLOCK_D, kind) -> Config, AOT-checked for sm_80/86/89/90/100/120 x pv x LSE
# (tests/test_attention_int8_aot.py: no spills, int8 + e4m3/f16 MMA, shared memory within the arch's limit).
CONFIGS: dict[tuple[int, int, str], Config] = {
    (80, 64, "self"): _C(128, 64, 8, 3), (80, 64, "cross"): _C(128, 64, 8, 3), (80, 64, "i2v"): _C(128, 64, 8, 3),
    (80, 128, "self"): _C(128, 64, 8, 3), (80, 128, "cross"): _C(128, 64, 8, 3), (80, 128, "i2v"): _C(64, 64, 8, 3),
    (90, 64, "self"): _C(128, 128, 8, 3), (90, 64, "cross"): _C(128, 64, 8, 3), (90, 64, "i2v"): _C(128, 64, 8, 3),
    (90, 128, "self"): _C(128, 64, 8, 3), (90, 128, "cross"): _C(128, 64, 8, 3), (90, 128, "i2v"): _C(64, 64, 8, 3),
    (100, 64, "self"): _C(128, 128, 8, 3), (100, 64, "cross"): _C(128, 64, 8, 3), (100, 64, "i2v"): _C(128, 64, 8, 3),
    (100, 128, "self"): _C(128, 64, 8, 3), (100, 128, "cross"): _C(128, 64, 8, 3),
    (100, 128, "i2v"): _C(64, 64, 8, 3),
}
INTERPRETER_CONFIG = Config(64, 64, 4, 1)


def block_dim(d: int) -> int:
    """Padded (power of two, >= 32: the int8 / fp8 dot's K width) head dimension."""
    return max(32, triton.next_power_of_2(d))


def pick_config(capability, head_dim: int, kv_len: int, has_img: bool) -> Config:
    if capability is None:
        return INTERPRETER_CONFIG
    kind = kind_of(kv_len, has_img)
    bd = block_dim(head_dim)
    cfg = CONFIGS[(arch_class(capability), min(max(bd, 64), 128), kind)]
    if bd > 128:
        cfg = dataclasses.replace(cfg, BLOCK_N=max(32, cfg.BLOCK_N * 128 // bd), num_stages=2)
    return cfg


# ---------------------------------------------------------------------------------------------
# Launchers

def _quantize(q, k, v, k_img, v_img, s: float, pv: str, lse: bool, capability, launch, balance: bool = True
              ) -> Quantized:
    """The kernel's operands: the Triton quantizer (`attention_int8_quant`, per-token scales), or, for the coarser
    Q_GROUP / K_GROUP of the granularity experiments (header; tests), the reference's stages in torch."""
    if (Q_GROUP, K_GROUP) == (1, 1):
        return quantize(q, k, v, k_img, v_img, s, pv, lse, capability, launch, balance)
    R = importlib.import_module("wan_kernels.ref.attention_int8")  # the module (the package attribute is the op)
    if isinstance(q, tuple):
        raise ValueError(f"attention_int8_q8 (triton): a quantized q has per-token scales, the kernel is set to "
                         f"Q_GROUP={Q_GROUP}")
    q8, qs, sets, b = R.quantize_operands(q, k, v, k_img, v_img, s, pv, Q_GROUP, K_GROUP, balance)
    shift = torch.stack([R.lse_shift(q, st[2], s) for st in sets]) if lse else None
    return Quantized(q8, qs, sets, shift, b)


def _resolve_pv(pv: str | None, capability) -> str:
    pv = default_pv(capability) if pv in (None, "auto") else pv
    if pv not in ("fp8", "fp16"):
        raise ValueError(f"attention_int8 (triton): pv must be 'fp8', 'fp16' or 'auto', got {pv!r}")
    if pv == "fp8" and default_pv(capability) != "fp8":
        raise ValueError(f"attention_int8 (triton): pv='fp8' needs fp8 tensor cores (sm_89 or later), got "
                         f"sm_{capability[0]}{capability[1]}; use pv='fp16'")
    return pv


def prepare(q, k, v, k_img, v_img, scale, pv: str | None, write_lse: bool, config: Config | None, capability,
            launch: Callable[[Launch], None] = run, balance: bool = True):
    """(Launch or None when empty, out, lse [S, B, H, Sq], Quantized). The quantizer's kernels are handed to
    `launch` as they come (`run`; readiness collects them on meta tensors). q: a float tensor, or (q8, q_scale)
    quantized already (wan::attention_int8_q8, and with an LSE wan::attention_int8_q8_lse, one key set: the output
    takes k's dtype). balance: the quantizer's stage 1b for a float q."""
    quantized = isinstance(q, tuple)
    if quantized and write_lse and k_img is not None:
        raise ValueError("attention_int8_q8_lse (triton): one key set (no k_img / v_img)")
    out_dtype = k.dtype if quantized else q.dtype
    if quantized and q[0].stride(-1) != 1:
        q = (q[0].contiguous(), q[1])
    if quantized and q[0].dtype != torch.int8:
        raise ValueError(f"attention_int8_q8 (triton): q8 must be int8, got {q[0].dtype}")
    if out_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"attention_int8 (triton): q must be float16/bfloat16/float32, got {out_dtype}")
    pv = _resolve_pv(pv, capability)
    D = q[0].shape[-1] if quantized else q.shape[-1]
    s = 1.0 / math.sqrt(D) if scale is None else float(scale)
    qz = _quantize(q, k, v, k_img, v_img, s, pv, write_lse, capability, launch, balance)
    launch_, out, lse = kernel_launch(qz, out_dtype, write_lse, quantized and write_lse, config, capability)
    return launch_, out, lse, qz


def _last_unit(x: torch.Tensor) -> torch.Tensor:
    """x with a unit stride in its last dimension (the kernel's loads); a copy only when it has not."""
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def _rows(t: torch.Tensor) -> torch.Tensor:
    """Scales [B, H, S] as the kernel indexes them, (b H + h) * stride(1) + token: unit token stride and (b, h) rows
    of one stride (a ring block's k_scale may be a view of fewer valid keys than its buffer's rows); else a copy."""
    ok = t.shape[0] <= 1 or t.stride(0) == t.shape[1] * t.stride(1)
    return _last_unit(t) if ok else t.contiguous()


def _v_operand(v8: torch.Tensor) -> torch.Tensor:
    """A quantized V as the kernel reads it fastest (`hardware.empty_v8`): e4m3 token-contiguous, fp16 with unit
    last stride; a copy only when it is not (e.g. the rows of Ulysses' exchange: one pass, where a channel-contiguous
    e4m3 V would cost the kernel byte-wise transposes in every key tile of every query block)."""
    if v8.dtype != torch.float8_e4m3fn:
        return _last_unit(v8)
    if v8.stride(1) == 1 or v8.shape[1] <= 1:
        return v8
    return empty_v8(*v8.shape, v8.dtype, v8.device).copy_(v8)


def _set_operands(kv: tuple) -> tuple:
    """One key set's operands as the kernel reads them: k8 with unit last stride, v8 `_v_operand`, k_scale `_rows`,
    the [B, H, D] statistics contiguous (indexed (b H + h) D + d)."""
    k8, ks, km, v8, vs, vm = kv
    return _last_unit(k8), _rows(ks), km.contiguous(), _v_operand(v8), vs.contiguous(), vm.contiguous()


def kernel_launch(qz: Quantized, out_dtype: torch.dtype, write_lse: bool, shift_q8: bool, config: Config | None,
                  capability) -> tuple[Launch | None, torch.Tensor, torch.Tensor]:
    """The attention kernel's launch on quantized operands (`Quantized`: q's scales with the softmax scale and
    log2 e folded in; one or two key sets; the P.V precision is the sets' V dtype): (Launch or None when empty,
    out [B, Sq, H, Dv] of `out_dtype`, lse [sets, B, H, Sq]). Operands in layouts the kernel does not read are
    copied (`_set_operands`); a ring block's views (fewer valid keys than its buffer's rows) are read in place."""
    q8, qs = _last_unit(qz.q), _rows(qz.q_scale)
    k8, ks, km, v8, vs, vm = _set_operands(qz.sets[0])
    ki8, kis, _, vi8, vis, vim = _set_operands(qz.sets[-1])  # the text set again without images: never read
    has_img = len(qz.sets) == 2
    B, Sq, H, D = q8.shape
    Sk, DV = k8.shape[1], v8.shape[3]
    Si = ki8.shape[1] if has_img else 0
    out = torch.empty((B, Sq, H, DV), dtype=out_dtype, device=k8.device)
    lse = torch.empty((len(qz.sets), B, H, Sq) if write_lse else (1,), dtype=torch.float32, device=k8.device)
    if B * Sq * H == 0:
        return None, out, lse
    if config is None:
        config = pick_config(capability, D, max(Sk, Si), has_img)
    pv8 = v8.dtype == torch.float8_e4m3fn
    # not with an image set: I2V's two sets (cross-attention, bf16 in the model by default; 512 + 257 keys) keep the
    # first set's output live beside the second's accumulator, and the fp16 tile spilled 8 bytes on sm_120 (hd128)
    acc16 = pv_acc16(capability) and not has_img
    tile_max = E4M3_MAX * V_E4M3_MAX if pv8 else FP16_V_MAX  # one key's largest |p v| in the codes
    if acc16 and config.BLOCK_N * tile_max > FP16_MAX:
        raise ValueError(f"attention_int8 (triton): BLOCK_N={config.BLOCK_N} keys of P.V overflow the fp16 "
                         f"accumulator (at most {int(FP16_MAX // tile_max)})")
    grid = (triton.cdiv(Sq, config.BLOCK_M), B * H)
    args = (q8, qs, k8, ks, v8, vs, vm, ki8, kis, vi8, vis, vim, out, lse, km,
            Sq, Sk, Si, H, qs.stride(1), ks.stride(1), kis.stride(1),
            q8.stride(0), q8.stride(1), q8.stride(2), k8.stride(0), k8.stride(1), k8.stride(2),
            v8.stride(0), v8.stride(1), v8.stride(2), v8.stride(3), ki8.stride(0), ki8.stride(1), ki8.stride(2),
            vi8.stride(0), vi8.stride(1), vi8.stride(2), vi8.stride(3), out.stride(0), out.stride(1), out.stride(2))
    kwargs = dict(D=D, DV=DV, BLOCK_D=block_dim(D), BLOCK_DV=block_dim(DV), BLOCK_M=config.BLOCK_M,
                  BLOCK_N=config.BLOCK_N, Q_GROUP=Q_GROUP, K_GROUP=K_GROUP, HAS_IMG=has_img, WRITE_LSE=write_lse,
                  PV_FP8=pv8, PV_ACC16=acc16, SOFT_E4M3=capability is None, SHIFT_Q8=shift_q8,
                  num_warps=config.num_warps, num_stages=config.num_stages)
    return Launch(attention_int8_kernel, grid, args, kwargs, k8.device, _interpreted), out, lse


def _run(q, k, v, k_img, v_img, scale, pv, write_lse: bool, config: Config | None, balance: bool = True):
    launch, out, lse, qz = prepare(q, k, v, k_img, v_img, scale, pv, write_lse, config, target(k, "attention_int8"),
                                   balance=balance)
    if launch is not None:
        run(launch)
    return out, lse + qz.shift if write_lse and qz.shift is not None else lse


def attention_int8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_img: torch.Tensor | None = None,
                   v_img: torch.Tensor | None = None, scale: float | None = None, pv: str | None = None, *,
                   config: Config | None = None, balance: bool = True) -> torch.Tensor:
    """8-bit softmax(q k^T s) v [+ softmax(q k_img^T s) v_img]: q [B, Sq, H, D], k/v [B, Sk, H, D/Dv], optional
    k_img/v_img [B, Si, H, D/Dv], fp16/bf16/fp32, last dimension contiguous -> [B, Sq, H, Dv] in q's dtype.
    pv: "fp8" | "fp16" | "auto" or None (`wan_kernels.hardware.default_pv` of the device). `config` overrides
    the heuristic (tests); balance=False skips the quantizer's stage 1b (q rounded as `attention_int8_q8`'s)."""
    return _run(q, k, v, k_img, v_img, scale, pv, False, config, balance)[0]


def attention_int8_q8(q8: torch.Tensor, q_scale: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      k_img: torch.Tensor | None = None, v_img: torch.Tensor | None = None, scale: float | None = None,
                      pv: str | None = None, *, config: Config | None = None) -> torch.Tensor:
    """wan::attention_int8_q8: `attention_int8` from q quantized already (wan::qk_norm_rope_int8): q8 int8
    [B, Sq, H, D], q_scale fp32 [B, H, Sq] (nothing folded in) -> [B, Sq, H, Dv] in k's dtype. K and V are
    quantized here as in `attention_int8`; the kernel is the same launch."""
    return _run((q8, q_scale), k, v, k_img, v_img, scale, pv, False, config)[0]


def attention_int8_q8_lse(q8: torch.Tensor, q_scale: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          scale: float | None = None, pv: str | None = None, *, config: Config | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """wan::attention_int8_q8_lse: `attention_int8_lse` from q quantized already (ring attention on the fused q):
    (out [B, Sq, H, Dv] in k's dtype, lse [B, H, Sq] fp32) whose smoothing correction s q^.mean(k) is taken from
    the dequantized q^ = q8 * q_scale, in the kernel: the LSE of the scores the output was computed from."""
    out, lse = _run((q8, q_scale), k, v, None, None, scale, pv, True, config)
    return out, lse[0]


def quantize_kv_int8(k: torch.Tensor, v: torch.Tensor, pv: str | None = None, k_mean: torch.Tensor | None = None,
                     v_mean: torch.Tensor | None = None, v_scale: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, ...]:
    """wan::quantize_kv_int8: one key/value set quantized as `attention_int8_q8` quantizes it (the Triton quantizer):
    (k int8 [B, S, H, D], k_scale fp32 [B, H, S], k_mean fp32 [B, H, D], v e4m3 (pv "fp8") / fp16 [B, S, H, Dv],
    v_scale, v_mean fp32 [B, H, Dv]), the operands `attention_int8_quantized_lse` takes; with k_mean, v_mean,
    v_scale given (the whole set's, `ref.kv_stats_finish`), no statistics pass."""
    capability = target(k, "quantize_kv_int8")
    stats = None if k_mean is None else (k_mean, v_mean, v_scale)
    return quantize_kv(k, v, _resolve_pv(pv, capability), capability, stats=stats)


def kv_stats(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """wan::kv_stats: (k_sum, v_sum, v_max, v_min) [B, H, D / Dv] fp32 over the tokens (the quantizer's statistics
    kernel)."""
    target(k, "kv_stats")
    return _kv_stats(k, v)


def attention_int8_quantized_lse(q8: torch.Tensor, q_scale: torch.Tensor, k8: torch.Tensor, k_scale: torch.Tensor,
                                 k_mean: torch.Tensor, v8: torch.Tensor, v_scale: torch.Tensor, v_mean: torch.Tensor,
                                 scale: float | None = None, out_dtype: torch.dtype | None = None, *,
                                 config: Config | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """wan::attention_int8_quantized_lse: `attention_int8_q8_lse` on K and V quantized already (`quantize_kv_int8`;
    a ring's blocks quantized once by their owner): (out [B, Sq, H, Dv] in `out_dtype`, None: float32; lse [B, H,
    Sq] fp32). The P.V precision is v8's (e4m3: fp8, fp16: fp16); the same kernel launch as attention_int8_q8_lse
    after its quantizer."""
    launch, out, lse = prepare_quantized(q8, q_scale, (k8, k_scale, k_mean, v8, v_scale, v_mean), scale, out_dtype,
                                         config, target(k8, "attention_int8_quantized_lse"))
    if launch is not None:
        run(launch)
    return out, lse[0]


def prepare_quantized(q8, q_scale, kv: tuple, scale, out_dtype, config: Config | None, capability):
    """`attention_int8_quantized_lse`'s kernel launch (Launch or None when empty, out, lse [1, B, H, Sq]) on q8,
    q_scale and one quantized key/value set `kv` (quantize_kv_int8's six tensors)."""
    _resolve_pv("fp8" if kv[3].dtype == torch.float8_e4m3fn else "fp16", capability)  # e4m3 V needs fp8 MMA
    s = 1.0 / math.sqrt(q8.shape[-1]) if scale is None else float(scale)
    qz = Quantized(q8, (q_scale * (s * LOG2E)).contiguous(), (kv,))
    return kernel_launch(qz, out_dtype or torch.float32, True, True, config, capability)


def attention_int8_sets(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_img: torch.Tensor | None = None,
                        v_img: torch.Tensor | None = None, scale: float | None = None, pv: str | None = None, *,
                        config: Config | None = None, balance: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention_int8` and each set's natural-log log-sum-exp of the (unsmoothed) scores: lse [S, B, H, Sq] fp32,
    S = 1 or 2 (with the image set); the smoothed LSE plus s q.mean(k) (softmax invariance)."""
    return _run(q, k, v, k_img, v_img, scale, pv, True, config, balance)


def attention_int8_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                       pv: str | None = None, *, config: Config | None = None, balance: bool = True
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """wan::attention_int8_lse: one key set, (out [B, Sq, H, Dv] in q's dtype, lse [B, H, Sq] fp32, natural log
    of the unsmoothed scores), the merge quantity of ring attention (wan::attention_lse's contract)."""
    out, lse = _run(q, k, v, None, None, scale, pv, True, config, balance)
    return out, lse[0]


@_jit
def _e4m3_encode_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, SOFT_E4M3: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    tl.store(out_ptr + offs, to_e4m3(tl.load(x_ptr + offs, mask=ok, other=0.0), SOFT_E4M3), mask=ok)


def e4m3_encode(x: torch.Tensor, block: int = 1 << 16) -> torch.Tensor:
    """The kernels' fp32 -> e4m3 cast (`to_e4m3`) on a flat fp32 tensor -> float8_e4m3fn: on CPU the interpreted
    software encoder, on CUDA the compiled cvt.rn.satfinite.e4m3x2.f32 (tests; gpu_check holds the GPU's to torch's
    cast on the same sweep, which checks the inline PTX's operand order)."""
    x = x.float().contiguous().reshape(-1)
    out = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    if x.numel():
        soft = target(x, "e4m3_encode") is None
        run(Launch(_e4m3_encode_kernel, (triton.cdiv(x.numel(), block),), (x, out, x.numel()),
                   dict(BLOCK=block if soft else 1024, SOFT_E4M3=soft), x.device, _interpreted))
    return out
