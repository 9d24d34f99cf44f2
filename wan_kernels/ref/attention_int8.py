"""Reference of 8-bit attention (SageAttention2-class, arXiv 2411.10958): the exact emulation, stage by stage, of
what `wan_kernels/triton/attention_int8.py` computes, in fp32 on CPU, [B, S, H, D] layout like `ref.attention`.

Stages (each a function the tests compare with the kernel's):
1. `smooth_k`: k - mean_n(k) per (batch, head), per key set (softmax is invariant to it; the LSE gets q.mean back).
1b. `channel_balance` (when q and k are quantized together, not for a q quantized already): q b and (k - mean) / b
   per (batch, head, channel), b^4 = (max_n|k - mean| / max_n|q|) * RMS_n(k - mean) / RMS_n(q), k over every key
   set: the scores are the same sums, and a channel large in one operand no longer coarsens the per-token grid of
   that operand's other channels (SmoothQuant's migration between attention's operands; ~0.6x the error on
   Wan-like channel gains).
2. `quantize_int8`: q and the smoothed k to INT8, symmetric amax/127, round half away from zero, one fp32 scale
   per `group` consecutive tokens of one (batch, head) (Q: `q_group` rows, K: `k_group` keys). The softmax
   scale and log2(e) are folded into Q's scale.
3. `quantize_v_fp8` / `quantize_v_fp16`: V per channel over all tokens of one (batch, head): e4m3 of v - mean_n(v)
   with scale amax/1.75 (V_E4M3_MAX; the mean is added to the output), or fp16 with a power-of-two scale that is
   1 unless amax > 512 (FP16_V_MAX). An e4m3 V is laid out token-contiguous (`empty_v8`): the fp8 MMAs take
   8-bit operands K-major.
4. `attend`: per key tile of `block_n` keys (the kernel's BLOCK_N, which decides where P is rounded):
       s = (q_i8 . k_i8) * q_scale * k_scale                   (int32 dot, exact in fp32: |dot| <= 127^2 D < 2^24)
       m' = max(m, rowmax s);  p = exp2(s - m');  alpha = exp2(m - m')
       fp8:  p8 = e4m3(448 p);  l = l alpha + rowsum p8;  acc = acc alpha + (p8 v8)   (fresh per tile: two-level;
             `acc16`: the tile's product rounded to fp16, the MMA's accumulator on sm_86 / sm_89 / sm_12x)
       fp16: p16 = fp16(p);     l = l alpha + rowsum p16; acc = acc alpha + (p16 v16)   (`acc16` likewise)
   out = acc / l * v_scale + v_mean;  lse = (m + log2(l / 448 or 1)) ln 2 + s_qk q.mean(k) (natural log, unsmoothed).
   The row max of a tile's p maps to 448 only in the tile holding the running max; others are rescaled by
   alpha in the fp32 accumulator, so the e4m3 range is never exceeded. l sums the ROUNDED weights, so the
   output is a convex combination of the (quantized) v rows: a constant v comes back exactly.
5. Image set (Wan I2V): a second, independent softmax (own smoothing, own K and V scales), summed in fp32,
   rounded once to q's dtype.

e4m3 rounding is torch's `.to(torch.float8_e4m3fn)` after clamping to +-448: round to nearest even with
saturation, as the GPU's cvt.rn.satfinite.e4m3x2.f32. `exp2` is a parameter: the GPU uses ex2.approx, the Triton
interpreter numpy's exp2; the tests pass the interpreter's to check every other stage to fp32 summation order.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from wan_kernels.hardware import E4M3_MAX, FP16_V_MAX, V_E4M3_MAX, default_pv, empty_v8

__all__ = ["attention_int8", "attention_int8_lse", "attention_int8_q8", "attention_int8_q8_lse",
           "attention_int8_quantized_lse", "kv_stats", "quantize_kv_int8"]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
Q_GROUP, K_GROUP, BLOCK_N = 1, 1, 64  # per-token Q and K scales: see the kernel's header


def to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> float8_e4m3fn, RNE with saturation to +-448 (cvt.rn.satfinite)."""
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """Round half away from zero, exactly (trunc(x + 0.5 sign x) rounds 0.49999997 up in fp32)."""
    t = torch.trunc(x)
    return t + torch.where((x - t).abs() >= 0.5, torch.sign(x), torch.zeros_like(x))


def token_mean(x: torch.Tensor) -> torch.Tensor:
    """x [B, S, H, D] -> its mean over the S tokens [B, H, D] fp32 (stage 1's and 3's statistic; a kernel sums in
    another order: the tests bound the difference, then hand this function the kernel's means)."""
    return x.float().mean(dim=1)


def smooth_k(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k [B, S, H, D] -> (k - mean [B, S, H, D] fp32, mean [B, H, D] fp32); mean over the S tokens."""
    mean = token_mean(k)
    return k.float() - mean[:, None], mean


def quantize_int8(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, S, H, D] -> (int8 [B, S, H, D], scale [B, H, ceil(S / group)] fp32): x ~ x_i8 * scale, one scale per
    `group` consecutive tokens of a (batch, head), scale = amax / 127 (0 for an all-zero group)."""
    B, S, H, D = x.shape
    G = -(-S // group)
    xt = x.float().transpose(1, 2)                                                       # [B, H, S, D]
    padded = torch.nn.functional.pad(xt, (0, 0, 0, G * group - S))
    scale = padded.reshape(B, H, G, group * D).abs().amax(-1) / 127.0                    # [B, H, G]
    div = torch.where(scale > 0, scale, torch.ones_like(scale)).repeat_interleave(group, -1)[..., :S]
    xi = round_half_away(xt / div[..., None]).clamp(-127, 127).to(torch.int8)
    return xi.transpose(1, 2).contiguous(), scale


def quantize_v_fp8(v: torch.Tensor, mean: torch.Tensor | None = None, scale: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """v [B, S, H, Dv] -> (e4m3 [B, S, H, Dv], scale [B, H, Dv], mean [B, H, Dv] fp32): v smoothed by its mean over
    tokens (Sage2's smooth_v: the softmax weights sum to 1, so the mean is added back exactly), then per channel,
    scale = amax / V_E4M3_MAX. `mean`, `scale`: those of a whole set v is part of (`kv_stats_finish`), else v's own."""
    mean = token_mean(v) if mean is None else mean
    vs = v.float() - mean[:, None]
    scale = vs.abs().amax(dim=1) / V_E4M3_MAX if scale is None else scale
    div = torch.where(scale > 0, scale, torch.ones_like(scale))
    return empty_v8(*v.shape, torch.float8_e4m3fn, v.device).copy_(to_e4m3(vs / div[:, None])), scale, mean


def quantize_v_fp16(v: torch.Tensor, scale: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """v [B, S, H, Dv] -> (fp16 [B, S, H, Dv], scale [B, H, Dv], mean [B, H, Dv] = 0): per channel, a power of
    two, 1 unless amax > FP16_V_MAX = 512 (so that a 64-key tile's P.V fits an fp16 accumulator; fp16 v is
    exact: no smoothing). `scale`: that of a whole set v is part of (`kv_stats_finish`), else v's own."""
    if scale is None:
        amax = v.float().abs().amax(dim=1)
        scale = torch.exp2(torch.ceil(torch.log2(torch.clamp(amax / FP16_V_MAX, min=1.0))))
    return (v.float() / scale[:, None]).to(torch.float16).contiguous(), scale, torch.zeros_like(scale)


def attend(q_i8, q_scale, k_i8, k_scale, vq, v_scale, v_mean, pv: str, q_group: int, k_group: int, block_n: int,
           exp2: Callable = torch.exp2, acc16: bool = False):
    """One key set's softmax(s) v from quantized operands (stage 4). q_i8 [B, Sq, H, D], q_scale [B, H, Gq]
    (softmax scale and log2 e folded in), k_i8 [B, Sk, H, D], k_scale [B, H, Gk], vq [B, Sk, H, Dv] e4m3/fp16,
    v_scale, v_mean [B, H, Dv]. acc16: each tile's P.V rounded to fp16, as the kernel's MMA with an fp16
    accumulator leaves it (`hardware.pv_acc16`: sm_86 / sm_89 / sm_12x). Returns (out [B, H, Sq, Dv] fp32,
    m [B, H, Sq] (log2 domain), l [B, H, Sq])."""
    B, Sq, H, _ = q_i8.shape
    Sk, Dv = k_i8.shape[1], vq.shape[-1]
    qf = q_i8.float().transpose(1, 2)                                                    # [B, H, Sq, D]
    kf, vf = k_i8.float().transpose(1, 2), vq.float().transpose(1, 2)                    # [B, H, Sk, D]
    qs = q_scale.repeat_interleave(q_group, -1)[..., :Sq, None]                          # [B, H, Sq, 1]
    ks = k_scale.repeat_interleave(k_group, -1)[..., :Sk]                                # [B, H, Sk]
    m = torch.full((B, H, Sq), float("-inf"))
    l = torch.zeros(B, H, Sq)
    acc = torch.zeros(B, H, Sq, Dv)
    for n0 in range(0, Sk, block_n):
        n1 = min(n0 + block_n, Sk)
        s = torch.matmul(qf, kf[:, :, n0:n1].transpose(-1, -2)) * qs * ks[:, :, None, n0:n1]
        m_new = torch.maximum(m, s.amax(-1))
        p = exp2(s - m_new[..., None])
        alpha = exp2(m - m_new)
        p = to_e4m3(p * E4M3_MAX).float() if pv == "fp8" else p.to(torch.float16).float()
        l = l * alpha + p.sum(-1)
        pv_tile = torch.matmul(p, vf[:, :, n0:n1])
        acc = acc * alpha[..., None] + (pv_tile.half().float() if acc16 else pv_tile)
        m = m_new
    return acc / l[..., None] * v_scale[:, :, None, :] + v_mean[:, :, None, :], m, l


def resolve_pv(pv: str, device: torch.device) -> str:
    """"auto" -> the device's P.V precision (`wan_kernels.hardware.default_pv`: "fp8" on CPU and sm_89+, "fp16" on
    sm_80/86), so that impl="ref" emulates what the device's kernel runs; "fp8" / "fp16" stay."""
    if pv == "auto":
        return default_pv(torch.cuda.get_device_capability(device) if device.type == "cuda" else None)
    if pv not in ("fp8", "fp16"):
        raise ValueError(f"attention_int8: pv must be 'fp8', 'fp16' or 'auto', got {pv!r}")
    return pv


def token_sqmean(x: torch.Tensor) -> torch.Tensor:
    """x [B, S, H, D] -> its mean square over the S tokens [B, H, D] fp32 (stage 1b's statistic; the kernel sums in
    another order: the tests hand this function the kernel's, as `token_mean`)."""
    return x.float().square().mean(dim=1)


def smoothed_sqmean(sqmean: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """The smoothed keys' mean square from k's mean square and mean: mean(k^2) - mean^2, at least 0 (it cancels
    where K's mean dwarfs its spread; stage 1b then leans on the maxima alone, `channel_balance`)."""
    return torch.clamp(sqmean - mean * mean, min=0.0)


def channel_balance(q_amax: torch.Tensor, q_sqmean: torch.Tensor, k_amax: torch.Tensor, k_sqmean: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1b's factors (b, 1 / b) [B, H, D] fp32 from per-channel statistics over the tokens of q and of the
    smoothed k (every key set's: the larger): maxima of |x| and mean squares. b = (ra rr)^(1/4), the geometric mean
    of the amax and the RMS ratios' square roots, ra = k_amax / q_amax, rr = sqrt(k_sqmean / q_sqmean); sqrt(ra)
    where only ra is usable (positive and finite), 1 where neither is. q b and k / b carry the same scores (q k^T is
    a sum over channels of q_d k_d) with each channel's range split evenly between them: a channel large in k alone
    no longer coarsens every other channel of k's per-token INT8 grid (SmoothQuant's migration, exponent 1/2,
    between attention's two operands). The maxima alone are one token's values (a sink key's): over 8 seeds of
    the Wan-like generator they made one head 1.8x worse than no balance; with the RMS in, at most 1.07x."""
    ra, rr = k_amax / q_amax, torch.sqrt(k_sqmean / q_sqmean)
    ok_a = (q_amax > 0) & (k_amax > 0) & torch.isfinite(ra)
    ok_r = ok_a & (q_sqmean > 0) & (k_sqmean > 0) & torch.isfinite(rr)
    # the unusable ratios' roots (nan, inf, 0) are computed and discarded by the selects (nothing differentiates)
    b = torch.where(ok_r, torch.sqrt(torch.sqrt(ra) * torch.sqrt(rr)),
                    torch.where(ok_a, torch.sqrt(ra), torch.ones_like(ra)))
    return b, torch.reciprocal(b)


def centred_amax(hi: torch.Tensor, lo: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """max over the tokens of |x - mean| from x's maximum and minimum over them: max(hi - mean, mean - lo), exactly
    (rounding of x - mean is monotone in x). K's after smoothing (stage 1b), V's range (stage 3)."""
    return torch.maximum(hi - mean, mean - lo)


def smoothed_amax(ks: torch.Tensor) -> torch.Tensor:
    """max over the tokens of |k - mean| [B, H, D] from the smoothed keys (the quantizer gets it exactly from k's
    maximum and minimum: rounding of k - mean is monotone in k)."""
    return ks.abs().amax(dim=1)


def quantize_set(ks: torch.Tensor, mean: torch.Tensor, v: torch.Tensor, pv: str, k_group: int = K_GROUP,
                 k_mul: torch.Tensor | None = None) -> tuple:
    """Stages 2-3 of one key set from its smoothed keys: (k int8, k's scales, k's mean, v e4m3/fp16, v's scales,
    v's mean); k_mul [B, H, D]: stage 1b's 1 / b, multiplied in before the INT8 rounding."""
    ks = ks if k_mul is None else ks * k_mul[:, None]
    return (*quantize_int8(ks, k_group), mean, *(quantize_v_fp8(v) if pv == "fp8" else quantize_v_fp16(v)))


def quantize_sets(k, v, k_img, v_img, pv: str, k_group: int = K_GROUP) -> tuple:
    """Stages 1-3 of the key sets without stage 1b (a query quantized already): per set (k int8, k's scales,
    k's mean, v e4m3/fp16, v's scales, v's mean)."""
    return tuple(quantize_set(*smooth_k(kt), vt, pv, k_group)
                 for kt, vt in (((k, v),) if k_img is None else ((k, v), (k_img, v_img))))


def quantize_operands(q, k, v, k_img, v_img, s: float, pv: str, q_group: int = Q_GROUP, k_group: int = K_GROUP,
                      balance: bool = True):
    """Stages 1-3 of one call: (q int8, q's scales with s * log2 e folded in, per key set (k int8, k's scales,
    k's mean, v e4m3/fp16, v's scales, v's mean), b [B, H, D] or None); pv "fp8" or "fp16". balance: stage 1b
    (`channel_balance`, one b for q and every key set: q meets them all)."""
    keys = (k,) if k_img is None else (k, k_img)
    smoothed = [smooth_k(kt) for kt in keys]
    b = k_mul = None
    if balance and q.shape[1] and all(kt.shape[1] for kt in keys):  # (no tokens: nothing to balance)
        k_amax = torch.stack([smoothed_amax(ks) for ks, _ in smoothed]).amax(0)
        k_sq = torch.stack([smoothed_sqmean(token_sqmean(kt), mean) for kt, (_, mean) in zip(keys, smoothed)]).amax(0)
        b, k_mul = channel_balance(q.float().abs().amax(dim=1), token_sqmean(q), k_amax, k_sq)
    q_i8, q_scale = quantize_int8(q if b is None else q.float() * b[:, None], q_group)
    sets = tuple(quantize_set(ks, mean, vt, pv, k_group, k_mul)
                 for (ks, mean), vt in zip(smoothed, (v,) if k_img is None else (v, v_img)))
    return q_i8, q_scale * (s * LOG2E), sets, b


def smoothed_lse(m: torch.Tensor, l: torch.Tensor, pv: str) -> torch.Tensor:
    """The natural-log LSE of the smoothed scores from `attend`'s log2 row max m and row sum l (of weights scaled
    by 448 for pv "fp8")."""
    return (m + torch.log2(l) - (math.log2(E4M3_MAX) if pv == "fp8" else 0.0)) * LN2


def lse_shift(q: torch.Tensor, mean: torch.Tensor, s: float) -> torch.Tensor:
    """s q . mean(k) [B, H, Sq]: what smoothing took from each row's log-sum-exp."""
    return torch.einsum("bshd,bhd->bhs", q.float(), mean) * s


def attention_int8_sets(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_img: torch.Tensor | None = None,
                        v_img: torch.Tensor | None = None, scale: float | None = None, pv: str = "auto",
                        q_group: int = Q_GROUP, k_group: int = K_GROUP, block_n: int = BLOCK_N,
                        exp2: Callable = torch.exp2, acc16: bool = False, balance: bool = True
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Sq, H, Dv] in q's dtype, lse [S, B, H, Sq] fp32), S = 1 or 2 (with the image set): 8-bit
    softmax(q k^T s) v [+ softmax(q k_img^T s) v_img], s = scale or 1/sqrt(D), and each set's natural-log
    log-sum-exp of its (unsmoothed) scores. The inputs are never written. acc16: `attend`'s; balance: stage 1b
    (False: q quantized as `attention_int8_q8`'s callers do, `quantize_int8(q, 1)`)."""
    pv = resolve_pv(pv, q.device)
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    q_i8, q_scale, sets, _ = quantize_operands(q, k, v, k_img, v_img, s, pv, q_group, k_group, balance)
    out, lses = 0, []
    for k_i8, k_scale, mean, vq, v_scale, v_mean in sets:
        o, m, l = attend(q_i8, q_scale, k_i8, k_scale, vq, v_scale, v_mean, pv, q_group, k_group, block_n, exp2,
                         acc16)
        out = out + o
        lses.append(smoothed_lse(m, l, pv) + lse_shift(q, mean, s))
    return out.transpose(1, 2).to(q.dtype).contiguous(), torch.stack(lses)


def attention_int8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_img: torch.Tensor | None = None,
                   v_img: torch.Tensor | None = None, scale: float | None = None, pv: str = "auto",
                   q_group: int = Q_GROUP, k_group: int = K_GROUP, block_n: int = BLOCK_N,
                   exp2: Callable = torch.exp2, balance: bool = True) -> torch.Tensor:
    """wan::attention_int8: q [B, Sq, H, D], k/v [B, Sk, H, D/Dv], optional k_img/v_img [B, Si, H, D/Dv] ->
    [B, Sq, H, Dv] in q's dtype. pv: "fp8" (P and V in e4m3), "fp16" or "auto" (`resolve_pv`). q_group / k_group:
    tokens per Q / K scale; block_n: keys per online-softmax step (where P is rounded: the kernel's BLOCK_N);
    balance: stage 1b (`attention_int8_sets`)."""
    return attention_int8_sets(q, k, v, k_img, v_img, scale, pv, q_group, k_group, block_n, exp2,
                               balance=balance)[0]


def attention_int8_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                       pv: str = "auto", q_group: int = Q_GROUP, k_group: int = K_GROUP, block_n: int = BLOCK_N,
                       exp2: Callable = torch.exp2, balance: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """wan::attention_int8_lse: one key set, (out [B, Sq, H, Dv] in q's dtype, lse [B, H, Sq] fp32): the natural-log
    log-sum-exp of the unsmoothed scores s q k^T (smoothing corrected), as wan::attention_lse for ring attention."""
    out, lse = attention_int8_sets(q, k, v, None, None, scale, pv, q_group, k_group, block_n, exp2,
                                   balance=balance)
    return out, lse[0]


def attention_int8_q8(q8: torch.Tensor, q_scale: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      k_img: torch.Tensor | None = None, v_img: torch.Tensor | None = None,
                      scale: float | None = None, pv: str = "auto", k_group: int = K_GROUP, block_n: int = BLOCK_N,
                      exp2: Callable = torch.exp2) -> torch.Tensor:
    """wan::attention_int8_q8: `attention_int8` from a query quantized already (wan::qk_norm_rope_int8: stage 2 of
    q done where q was made): q8 int8 [B, Sq, H, D] and q_scale fp32 [B, H, Sq] (q ~ q8 * q_scale, one scale per
    token and head, nothing folded in), k/v [B, Sk, H, D/Dv], optional k_img/v_img -> [B, Sq, H, Dv] in k's
    dtype. Equal to `attention_int8(q, ..., balance=False)` when (q8, q_scale) = `quantize_int8(q, 1)`."""
    pv = resolve_pv(pv, k.device)
    s = 1.0 / math.sqrt(q8.shape[-1]) if scale is None else float(scale)
    qs = q_scale.float() * (s * LOG2E)
    out = 0
    for k_i8, k_scale, _, vq, v_scale, v_mean in quantize_sets(k, v, k_img, v_img, pv, k_group):
        out = out + attend(q8, qs, k_i8, k_scale, vq, v_scale, v_mean, pv, 1, k_group, block_n, exp2)[0]
    return out.transpose(1, 2).to(k.dtype).contiguous()


def kv_stats(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """wan::kv_stats: (k_sum [B, H, D], v_sum [B, H, Dv], v_max, v_min) fp32 over the tokens: a key set's
    quantization statistics in a form that adds up over ranks (sum / max / min all-reduces), `kv_stats_finish`
    turns into `quantize_kv_int8`'s k_mean, v_mean, v_scale."""
    kf, vf = k.float(), v.float()
    return kf.sum(1), vf.sum(1), vf.amax(1), vf.amin(1)


def kv_stats_finish(k_sum: torch.Tensor, v_sum: torch.Tensor, v_max: torch.Tensor, v_min: torch.Tensor, tokens: int,
                    pv: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(k_mean, v_mean, v_scale) [B, H, D / Dv] of a key set of `tokens` tokens from its `kv_stats` (summed over
    its parts): the statistics stages 1 and 3 use (V: amax|v - mean| / V_E4M3_MAX for "fp8", equal to the max of
    v_max - mean and mean - v_min since rounding is monotone; for "fp16" a power of two, 1 unless amax > 512,
    and mean 0: fp16 V is not smoothed)."""
    k_mean, v_mean = k_sum / tokens, v_sum / tokens
    if pv == "fp8":
        return k_mean, v_mean, centred_amax(v_max, v_min, v_mean) / V_E4M3_MAX
    amax = torch.maximum(v_max.abs(), v_min.abs())
    return k_mean, torch.zeros_like(v_mean), torch.exp2(torch.ceil(torch.log2(torch.clamp(amax / FP16_V_MAX,
                                                                                          min=1.0))))


def quantize_kv_int8(k: torch.Tensor, v: torch.Tensor, pv: str = "auto", k_mean: torch.Tensor | None = None,
                     v_mean: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                     k_group: int = K_GROUP) -> tuple:
    """wan::quantize_kv_int8: stages 1-3 of one key/value set, as the 8-bit attention quantizes it: (k int8 [B, S,
    H, D], k_scale fp32 [B, H, S], k_mean fp32 [B, H, D], v e4m3 (pv "fp8") / fp16 [B, S, H, Dv], v_scale fp32 [B,
    H, Dv], v_mean fp32 [B, H, Dv]): what `attention_int8_quantized_lse` takes (a ring block quantized once by its
    owner and sent as codes). k_mean, v_mean, v_scale (all or none, `kv_stats_finish`): the statistics of the whole
    set when k, v hold a part of its tokens (a rank's, before an exchange); fp16 ignores v_mean (returns zeros)."""
    pv = resolve_pv(pv, k.device)
    if k_mean is None:
        return quantize_sets(k, v, None, None, pv, k_group)[0]
    k_mean, v_mean, v_scale = (t.to(torch.float32, copy=True) for t in (k_mean, v_mean, v_scale))  # no aliases
    k8, ks = quantize_int8(k.float() - k_mean[:, None], k_group)
    return (k8, ks, k_mean, *(quantize_v_fp8(v, v_mean, v_scale) if pv == "fp8" else quantize_v_fp16(v, v_scale)))


def pv_of(v8: torch.Tensor) -> str:
    """The P.V precision a quantized V was made for: e4m3 -> "fp8", fp16 -> "fp16"."""
    return {torch.float8_e4m3fn: "fp8", torch.float16: "fp16"}[v8.dtype]


def attention_int8_quantized_lse(q8: torch.Tensor, q_scale: torch.Tensor, k8: torch.Tensor, k_scale: torch.Tensor,
                                 k_mean: torch.Tensor, v8: torch.Tensor, v_scale: torch.Tensor, v_mean: torch.Tensor,
                                 scale: float | None = None, out_dtype: torch.dtype | None = None,
                                 k_group: int = K_GROUP, block_n: int = BLOCK_N, exp2: Callable = torch.exp2
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """wan::attention_int8_quantized_lse: `attention_int8_q8_lse` from K and V quantized already (by
    `quantize_kv_int8`; the P.V precision is v8's: e4m3 -> fp8, fp16 -> fp16): (out [B, Sq, H, Dv] in `out_dtype`
    (None: float32), lse [B, H, Sq] fp32, natural log of the scores of q^ = q8 * q_scale, smoothing corrected
    with k_mean)."""
    pv = pv_of(v8)
    s = 1.0 / math.sqrt(q8.shape[-1]) if scale is None else float(scale)
    qs = q_scale.float() * (s * LOG2E)
    o, m, l = attend(q8, qs, k8, k_scale, v8, v_scale, v_mean, pv, 1, k_group, block_n, exp2)
    q_hat = q8.float() * q_scale.float().transpose(1, 2).unsqueeze(-1)
    lse = smoothed_lse(m, l, pv) + lse_shift(q_hat, k_mean, s)
    return o.transpose(1, 2).to(out_dtype or torch.float32).contiguous(), lse


def attention_int8_q8_lse(q8: torch.Tensor, q_scale: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          scale: float | None = None, pv: str = "auto", k_group: int = K_GROUP,
                          block_n: int = BLOCK_N, exp2: Callable = torch.exp2) -> tuple[torch.Tensor, torch.Tensor]:
    """wan::attention_int8_q8_lse: `attention_int8_lse` from a query quantized already (q8, q_scale as
    `attention_int8_q8`), one key set: (out [B, Sq, H, Dv] in k's dtype, lse [B, H, Sq] fp32). The smoothing
    correction is s q^ . mean(k) of the dequantized q^ = q8 * q_scale (no float q exists): the LSE of the scores
    the output was computed from, so ring blocks merge self-consistently. = `attention_int8_quantized_lse` of
    `quantize_kv_int8(k, v)`."""
    kv = quantize_kv_int8(k, v, pv, k_group=k_group)
    return attention_int8_quantized_lse(q8, q_scale, *kv, scale, k.dtype, k_group, block_n, exp2)
