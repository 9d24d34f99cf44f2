"""Triton quantizer of 8-bit attention's operands (wan::attention_int8): the stages 1-3 of
`wan_kernels/ref/attention_int8.py` (1b included), in three kernels: a statistics pass over each input, then one
quantizing pass per tensor.

    _token_stats_kernel   per (batch, head) and chunk of CHUNK tokens: the column sums (and, for V, maxima and
                          minima) of x [B, S, H, D] in fp32 -> partials [B*H, chunks, D]; the launcher adds the
                          partials in torch ([B, H, D]-sized work) into the K / V means and V's per-channel scales.
                          For q and k with the channel balance (stage 1b): maxima, minima and sums of squares too.
    _quantize_int8_kernel one row per (token, head): x (- mean: K's smoothing) (* b for Q, * 1 / b for K: the
                          channel balance) -> int8, symmetric amax/127 per row,
                          round half away from zero; writes the scale times `fold` (Q: softmax scale * log2 e),
                          and for Q with an LSE output each key set's s q.mean(k) (the smoothing's correction).
    _quantize_v_kernel    V per channel: fp8 = e4m3((v - mean) / (amax/1.75)), fp16 = v / (a power of two).

Bit-exact with the reference's stages given the same means: the kernels divide with IEEE `div_rn` (as torch does;
plain `/` may compile to div.full.f32, 2 ulp) and contract nothing (EXACT: no fma), e4m3 is cvt.rn.satfinite after
the clamp (`to_e4m3`). The means themselves are fp32 sums in another order than torch's `mean`
(chunks of CHUNK tokens, then the chunks): they agree to summation error, which the tests bound, and the tests
compare every later stage bit for bit with the reference fed the kernel's means (the balance b follows from them
and the exact maxima: the same fp32 torch ops on the same values).

HBM traffic per call (bf16 inputs, fp8 P.V): q, k and v read twice (statistics, then quantization) and written
once as 8-bit codes (5 bytes per element each; q read once, 3 bytes, where it comes without the channel balance),
plus 4-byte per-row scales and the partials (1/CHUNK of a tensor's fp32 size per statistic): ~15 bytes per element
of q, against ~40 for the torch passes it replaces. `wan_model.cost.int8_quantization_bytes` counts the launches
this module makes.

Offsets: the (batch, head) index, token indices and every scale / partial index are int64 (B*S*H*D passes 2^31
at 160k tokens x 2 x 40 heads x 128 = 1.6e9 only within a factor of 1.3; S*B*H scale indices do not, but cost
nothing to widen).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from wan_kernels.hardware import FP16_V_MAX, V_E4M3_MAX, empty_v8
from wan_kernels.ref.attention_int8 import centred_amax, channel_balance, smoothed_sqmean
from wan_kernels.triton._launch import EXACT, Launch, interpreter_twin, run
from wan_kernels.triton.nvfp4 import e4m3_code

__all__ = ["Quantized", "kv_stats", "launch_bytes", "quantize", "quantize_kv", "quantize_launches", "to_e4m3",
           "token_mean", "token_sqmean", "v_scale_of"]

LOG2E = 1.4426950408889634
CHUNK, STATS_ROWS, QUANT_ROWS = 512, 64, 64  # tokens per statistics program (looped STATS_ROWS at a time); rows
_jit = JITFunction                            # per quantization program
# reductions through tl.reduce with these combiners (tl.sum / tl.max are @jit functions of triton.language, which
# the interpreter runs only when TRITON_INTERPRET was set before triton was imported)
_ADD, _MAX, _MIN = tl.standard._sum_combine, tl.standard._elementwise_max, tl.standard._elementwise_min


@_jit
def to_e4m3(x, SOFT_E4M3: tl.constexpr):
    """fp32 -> tl.float8e4nv: round to nearest even, saturating to +-448 (infinities too; NaN stays NaN), as the
    reference's clamp + torch cast. Compiled: cvt.rn.satfinite.e4m3x2.f32 as inline PTX (two values per
    instruction; operand order as Triton's own sm_90 cast), because Triton 3.8's `.to(tl.float8e4nv)` for sm_89
    goes through f16 with round toward zero (cvt.rz.f16.f32, then cvt.rn.satfinite.e4m3x2.f16x2): a double
    rounding that is wrong next to an e4m3 tie. Interpreted: the software encoder (`e4m3_code`, REFERENCE §10)."""
    if SOFT_E4M3:
        return e4m3_code(x).to(tl.float8e4nv, bitcast=True)
    return tl.inline_asm_elementwise("cvt.rn.satfinite.e4m3x2.f32 $0, $2, $1;", "=h,r,r", [x],
                                     dtype=tl.float8e4nv, is_pure=True, pack=2)


@_jit
def _token_stats_kernel(x_ptr, sum_ptr, max_ptr, min_ptr, sq_ptr, S, H, n_chunks, stride_b, stride_s, stride_h,
                        D: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, ROWS: tl.constexpr,
                        EXTREMA: tl.constexpr, SQUARES: tl.constexpr):
    c = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    base = x_ptr + b * stride_b + h * stride_h
    acc = tl.full([BLOCK_D], 0.0, tl.float32)
    hi = tl.full([BLOCK_D], float("-inf"), tl.float32)
    lo = tl.full([BLOCK_D], float("inf"), tl.float32)
    sq = tl.full([BLOCK_D], 0.0, tl.float32)
    for r in tl.range(0, CHUNK, ROWS):
        rows = c.to(tl.int64) * CHUNK + r + tl.arange(0, ROWS)
        ok = (rows < S)[:, None] & d_ok[None, :]
        x = tl.load(base + rows[:, None] * stride_s + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
        acc += tl.reduce(x, 0, _ADD)
        if EXTREMA:
            hi = tl.maximum(hi, tl.reduce(tl.where(ok, x, float("-inf")), 0, _MAX))
            lo = tl.minimum(lo, tl.reduce(tl.where(ok, x, float("inf")), 0, _MIN))
        if SQUARES:
            sq += tl.reduce(x * x, 0, _ADD)
    out = (bh * n_chunks + c) * D + offs_d
    tl.store(sum_ptr + out, acc, mask=d_ok)
    if EXTREMA:
        tl.store(max_ptr + out, hi, mask=d_ok)
        tl.store(min_ptr + out, lo, mask=d_ok)
    if SQUARES:
        tl.store(sq_ptr + out, sq, mask=d_ok)


@_jit
def _quantize_int8_kernel(x_ptr, mean_ptr, mul_ptr, out_ptr, scale_ptr, m0_ptr, m1_ptr, shift_ptr, fold,
                          shift_scale, S, H, stride_b, stride_s, stride_h,
                          D: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr, SMOOTH: tl.constexpr,
                          BALANCE: tl.constexpr, SHIFTS: tl.constexpr):
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < S
    d_ok = offs_d < D
    ok = row_ok[:, None] & d_ok[None, :]
    x = tl.load(x_ptr + b * stride_b + h * stride_h + rows[:, None] * stride_s + offs_d[None, :], mask=ok,
                other=0.0).to(tl.float32)
    if SMOOTH:
        x = tl.where(ok, x - tl.load(mean_ptr + bh * D + offs_d, mask=d_ok, other=0.0)[None, :], 0.0)
    xb = x
    if BALANCE:                                                                  # stage 1b: q b or (k - mean) / b
        xb = x * tl.load(mul_ptr + bh * D + offs_d, mask=d_ok, other=1.0)[None, :]
    scale = tl.math.div_rn(tl.reduce(tl.abs(xb), 1, _MAX), 127.0)
    y = tl.math.div_rn(xb, tl.where(scale > 0, scale, 1.0)[:, None])
    a = tl.abs(y)
    r = tl.floor(a)
    r = tl.minimum(r + tl.where(a - r >= 0.5, 1.0, 0.0), 127.0)                  # round half away from zero
    q = tl.where(y < 0, -r, r).to(tl.int8)
    o = ((b * S + rows) * H + h)[:, None] * D + offs_d[None, :]                  # contiguous [B, S, H, D]
    tl.store(out_ptr + o, q, mask=ok)
    tl.store(scale_ptr + bh * S + rows, scale * fold, mask=row_ok)
    for j in tl.static_range(SHIFTS):                                            # s q.mean(k_j) per row
        mean = tl.load((m0_ptr if j == 0 else m1_ptr) + bh * D + offs_d, mask=d_ok, other=0.0)
        dot = tl.reduce(x * mean[None, :], 1, _ADD) * shift_scale
        tl.store(shift_ptr + (j * tl.num_programs(1) + bh) * S + rows, dot, mask=row_ok)


@_jit
def _quantize_v_kernel(v_ptr, mean_ptr, scale_ptr, out_ptr, S, H, stride_b, stride_s, stride_h,
                       out_b, out_s, out_h, out_d,  # out's strides (e4m3: token-contiguous, `hardware.empty_v8`)
                       D: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr, FP8: tl.constexpr,
                       SOFT_E4M3: tl.constexpr):
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    ok = (rows < S)[:, None] & d_ok[None, :]
    x = tl.load(v_ptr + b * stride_b + h * stride_h + rows[:, None] * stride_s + offs_d[None, :], mask=ok,
                other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + bh * D + offs_d, mask=d_ok, other=1.0)
    o = b * out_b + h * out_h + rows[:, None] * out_s + offs_d[None, :] * out_d
    if FP8:
        mean = tl.load(mean_ptr + bh * D + offs_d, mask=d_ok, other=0.0)
        y = tl.math.div_rn(x - mean[None, :], tl.where(scale > 0, scale, 1.0)[None, :])
        tl.store(out_ptr + o, to_e4m3(y, SOFT_E4M3), mask=ok)
    else:
        tl.store(out_ptr + o, tl.math.div_rn(x, scale[None, :]).to(tl.float16), mask=ok)


_interpreted = interpreter_twin  # the kernels for the Triton interpreter (CPU tensors)


@dataclasses.dataclass(frozen=True)
class Quantized:
    """The attention kernel's operands: q [B, Sq, H, D] int8 + q_scale [B, H, Sq] (softmax scale * log2 e folded
    in), per key set (text, image) (k int8 [B, S, H, D], k_scale [B, H, S], k_mean [B, H, D], v e4m3/fp16
    [B, S, H, Dv], v_scale, v_mean [B, H, Dv]), and shift [sets, B, H, Sq] = s q.mean(k) when an LSE is wanted."""
    q: torch.Tensor
    q_scale: torch.Tensor
    sets: tuple[tuple[torch.Tensor, ...], ...]
    shift: torch.Tensor | None = None
    balance: torch.Tensor | None = None  # stage 1b's b [B, H, D] (q was multiplied by it, each set's k divided)


def _grid_args(x: torch.Tensor, rows: int) -> tuple:
    B, S, H, D = x.shape
    return (triton.cdiv(S, rows), B * H), (S, H, x.stride(0), x.stride(1), x.stride(2)), \
        dict(D=D, BLOCK_D=max(16, triton.next_power_of_2(D)))


def _moments(x: torch.Tensor, extrema: bool, squares: bool, launch: Callable[[Launch], None]):
    """(sum [B, H, D], max, min, sum of squares; None where not asked) of x over its tokens, fp32, from the chunk
    partials."""
    B, S, H, D = x.shape
    n = triton.cdiv(S, CHUNK)
    parts = [torch.empty((B * H, n, D), dtype=torch.float32, device=x.device)
             for _ in range(1 + 2 * extrema + squares)]
    total, *rest = parts
    hi, lo = (rest.pop(0), rest.pop(0)) if extrema else (total, total)  # unwritten placeholders without EXTREMA
    sq = rest.pop(0) if squares else total
    (_, bh), (S_, H_, *strides), kw = _grid_args(x, CHUNK)
    if n and B * H:
        launch(Launch(_token_stats_kernel, (n, bh), (x, total, hi, lo, sq, S_, H_, n, *strides),
                      dict(kw, CHUNK=CHUNK, ROWS=STATS_ROWS, EXTREMA=extrema, SQUARES=squares), x.device,
                      _interpreted))
    return (total.sum(1).reshape(B, H, D), hi.amax(1).reshape(B, H, D) if extrema else None,
            lo.amin(1).reshape(B, H, D) if extrema else None, sq.sum(1).reshape(B, H, D) if squares else None)


def _sums(x: torch.Tensor, extrema: bool, launch: Callable[[Launch], None]):
    """(sum [B, H, D], max, min or None) of x over its tokens, fp32, from the chunk partials."""
    return _moments(x, extrema, False, launch)[:3]


def _stats(x: torch.Tensor, extrema: bool, launch: Callable[[Launch], None]):
    """(mean [B, H, D], max, min or None) of x over its tokens, fp32."""
    total, hi, lo = _sums(x, extrema, launch)
    return total / x.shape[1], hi, lo


def kv_stats(k: torch.Tensor, v: torch.Tensor, launch: Callable[[Launch], None] = run) -> tuple[torch.Tensor, ...]:
    """(k_sum, v_sum, v_max, v_min) [B, H, D / Dv] fp32 over the tokens (wan::kv_stats): the statistics a key set's
    quantization needs, in a form that adds up over ranks (sums, maxima, minima)."""
    return (_sums(k, False, launch)[0], *_sums(v, True, launch))


def v_scale_of(pv: str, mean: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor):
    """V's per-channel (scale, mean) from its token mean, maximum and minimum: fp8, amax|v - mean| / V_E4M3_MAX (=
    `ref.centred_amax`); fp16, a power of two (1 unless amax > 512), mean 0 (fp16 V is not smoothed)."""
    if pv == "fp8":
        return centred_amax(hi, lo, mean) / V_E4M3_MAX, mean
    amax = torch.maximum(hi.abs(), lo.abs())
    return torch.exp2(torch.ceil(torch.log2(torch.clamp(amax / FP16_V_MAX, min=1.0)))), torch.zeros_like(mean)


def _int8(x, mean, fold: float, means: tuple, shift_scale: float, launch, mul=None):
    """x (- mean) (* mul: stage 1b's b for Q, 1 / b for K) -> (int8, per-row scale * fold, shift or None)."""
    B, S, H, D = x.shape
    out = torch.empty((B, S, H, D), dtype=torch.int8, device=x.device)
    scale = torch.empty((B, H, S), dtype=torch.float32, device=x.device)
    shift = torch.empty((len(means), B, H, S), dtype=torch.float32, device=x.device) if means else None
    grid, sizes, kw = _grid_args(x, QUANT_ROWS)
    if out.numel():
        m = list(means) + [scale] * (2 - len(means))  # unread placeholders (SHIFTS says how many are real)
        launch(Launch(_quantize_int8_kernel, grid,
                      (x, scale if mean is None else mean, scale if mul is None else mul, out, scale, *m,
                       scale if shift is None else shift, fold, shift_scale, *sizes),
                      dict(kw, ROWS=QUANT_ROWS, SMOOTH=mean is not None, BALANCE=mul is not None, SHIFTS=len(means),
                           **EXACT),
                      x.device, _interpreted))
    return out, scale, shift


def _v(v, pv: str, capability, launch, stats=None):
    """V quantized: (v8, scale, mean); `stats` (mean, scale) given, or from V's own tokens."""
    B, S, H, D = v.shape
    scale, mean = v_scale_of(pv, *_stats(v, True, launch)) if stats is None else (stats[1], stats[0])
    if pv != "fp8":
        mean = torch.zeros_like(scale)
    out = empty_v8(B, S, H, D, torch.float8_e4m3fn if pv == "fp8" else torch.float16, v.device)
    grid, sizes, kw = _grid_args(v, QUANT_ROWS)
    if out.numel():
        launch(Launch(_quantize_v_kernel, grid, (v, mean if pv == "fp8" else scale, scale, out, *sizes, *out.stride()),
                      dict(kw, ROWS=QUANT_ROWS, FP8=pv == "fp8", SOFT_E4M3=capability is None, **EXACT),
                      v.device, _interpreted))
    return out, scale, mean


def quantize_kv(k, v, pv: str, capability=None, launch: Callable[[Launch], None] = run, stats=None, k_mean=None,
                k_mul=None) -> tuple:
    """One key/value set (new tensors): (k int8 [B, S, H, D], k_scale [B, H, S], k_mean [B, H, D], v e4m3 / fp16
    [B, S, H, Dv], v_scale, v_mean [B, H, Dv]); the kernel's operands of that set (wan::quantize_kv_int8).
    `stats`: (k_mean, v_mean, v_scale) of the whole set when k, v are a part of it (a rank's tokens), else None:
    from k's and v's own tokens. `k_mean`: k's own mean computed already (`quantize`'s stage 1b), `k_mul`: 1 / b."""
    # indexed (b H + h) D + d; copies, so that no output is an input (the op's outputs alias nothing)
    stats = None if stats is None else tuple(t.to(torch.float32, copy=True).contiguous() for t in stats)
    if k_mean is None:
        k_mean = _stats(k, False, launch)[0] if stats is None else stats[0]
    k8, ks, _ = _int8(k, k_mean, 1.0, (), 0.0, launch, k_mul)
    return (k8, ks, k_mean, *_v(v, pv, capability, launch, None if stats is None else stats[1:]))


def token_sqmean(x: torch.Tensor) -> torch.Tensor:
    """x [B, S, H, D] -> its mean square over the tokens [B, H, D] fp32, as the quantizer computes it (chunk sums of
    squares added in torch): what the tests hand the reference (`ref.token_sqmean`), as `token_mean`."""
    return _moments(x, False, True, run)[3] / x.shape[1]


def _balance(q, keys, launch):
    """Stage 1b (`ref.channel_balance`): (b, 1 / b) [B, H, D] and each key set's mean, from one statistics pass
    over q and each key set (EXTREMA and SQUARES: the keys' pass gives their means too): max|k - mean| from k's
    extrema (`ref.centred_amax`), the smoothed keys' mean square mean(k^2) - mean^2 (`ref.smoothed_sqmean`), q's
    max|q| and mean(q^2)."""
    _, q_max, q_min, q_sq = _moments(q, True, True, launch)
    means, k_amax, k_sq = [], [], []
    for kt in keys:
        total, hi, lo, sq = _moments(kt, True, True, launch)
        mean = total / kt.shape[1]
        means.append(mean)
        k_amax.append(centred_amax(hi, lo, mean))
        k_sq.append(smoothed_sqmean(sq / kt.shape[1], mean))
    b, k_mul = channel_balance(torch.maximum(q_max.abs(), q_min.abs()), q_sq / q.shape[1],
                               torch.stack(k_amax).amax(0), torch.stack(k_sq).amax(0))
    return b.contiguous(), k_mul.contiguous(), means


def quantize(q, k, v, k_img, v_img, scale: float, pv: str, lse: bool = False, capability=None,
             launch: Callable[[Launch], None] = run, balance: bool = True) -> Quantized:
    """Quantize every operand of one wan::attention_int8 call (new tensors; the inputs are never written); q may be
    (q8, q_scale) quantized already (wan::attention_int8_q8: only its scales are multiplied by the fold; no shift:
    with an LSE the attention kernel takes it from q8, SHIFT_Q8; no stage 1b: q was rounded without it).
    `capability` None = the interpreter's kernels (software e4m3); `launch` runs each kernel (`run`), or collects
    it (readiness, the cost model: meta tensors); `balance`: stage 1b for a float q."""
    pairs = ((k, v),) if k_img is None else ((k, v), (k_img, v_img))
    if isinstance(q, tuple):  # quantized already (wan::qk_norm_rope_int8): its scales get the fold, as _int8's
        sets = tuple(quantize_kv(kt, vt, pv, capability, launch) for kt, vt in pairs)
        return Quantized(q[0], (q[1] * (scale * LOG2E)).contiguous(), sets)  # [B, H, Sq], any strides in
    b = k_mul = None
    means = [None] * len(pairs)
    if balance and q.shape[1] and all(kt.shape[1] for kt, _ in pairs):  # (no tokens: nothing to balance)
        b, k_mul, means = _balance(q, [kt for kt, _ in pairs], launch)
    sets = tuple(quantize_kv(kt, vt, pv, capability, launch, k_mean=mean, k_mul=k_mul)
                 for (kt, vt), mean in zip(pairs, means))
    q8, qs, shift = _int8(q, None, scale * LOG2E, tuple(st[2] for st in sets) if lse else (), scale, launch, b)
    return Quantized(q8, qs, sets, shift, b)


def quantize_launches(q, k, v, k_img, v_img, pv: str, lse: bool, capability) -> list[Launch]:
    """The launches `quantize` makes for these (meta) tensors, in order, without running them."""
    launches: list[Launch] = []
    quantize(q, k, v, k_img, v_img, 1.0 / math.sqrt(q.shape[-1]), pv, lse, capability, launches.append)
    return launches


def launch_bytes(launch: Launch) -> int:
    """HBM bytes of one quantizer launch: each distinct tensor argument once, whole (unread placeholders are
    other arguments); tests/test_attention_int8.py holds this to the interpreter's recorded loads and stores."""
    tensors = {id(t): t for t in launch.args if isinstance(t, torch.Tensor)}.values()
    return sum(math.prod(n for n, st in zip(t.shape, t.stride()) if st != 0) * t.element_size() for t in tensors)


def token_mean(x: torch.Tensor) -> torch.Tensor:
    """x [B, S, H, D] -> its mean over the tokens [B, H, D] fp32, as the quantizer computes it (the statistics
    kernel's chunk sums added in torch): what the tests hand the reference's stages (`ref.token_mean`)."""
    return _stats(x, False, run)[0]
