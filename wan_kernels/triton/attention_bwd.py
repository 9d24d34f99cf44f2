"""Triton kernels of wan::attention_delta and wan::attention_backward: FlashAttention-2's backward (Dao 2023,
"FlashAttention-2", Alg. 2; the Triton tutorial 06-fused-attention) in [B, S, H, D] layout, one key/value set per
call (wan::attention's I2V backward calls it once per set with the same dout).

From the forward's saved natural-log LSE per row (wan::attention_forward / attention_lse), for one (batch, head):
    p     = exp2(q k^T * scale * log2(e) - lse * log2(e))           recomputed, never stored (fp32)
    dv    = p^T dout;   dp = dout v^T;   ds = p * (dp - delta)       (fp32 accumulate)
    dk    = scale * ds^T q;   dq = scale * ds k
with delta = rowsum(dout * out) (the preprocess, `attention_delta_kernel`; with the image set it also recomputes
p_img over the small image key set to split the row sum of the summed output: delta_img = rowsum(p_img * dp_img),
delta_text = rowsum(dout * out) - delta_img).
Two passes, each exact and without atomics (deterministic, every output written once):
* `attention_bwd_dkdv_kernel`: one program per tile of BLOCK_N keys keeps k, v and the fp32 dk, dv accumulators
  resident and loops over all queries in tiles of BLOCK_M (the transposed score tile s^T = k q^T, so the
  accumulators need no transposes).
* `attention_bwd_dq_kernel`: one program per tile of BLOCK_M queries keeps q, dout, lse, delta and the fp32 dq
  accumulator resident and loops over the keys in tiles of BLOCK_N (s is recomputed a second time: 7 instead of
  5 matmuls per score tile, the price of no atomics; FA2's CUDA kernel adds dq with fp32 atomics instead).
p and ds are rounded to the operands' dtype for the tensor-core products (as FA2); everything else is fp32.

Layout and masking as the forward (wan_kernels/triton/attention.py): any stride on B, S, H (last dim contiguous,
else the launcher copies), int64 scalar base offsets (Wan 14B: 151,200 rows x 40 heads x 128 overflow int32),
head/value dims padded to powers of two >= 16 with masked loads. Query tails: q, dout load as zeros and lse as
+inf, so p = 0 there (those rows add nothing to dk, dv); key tails: k, v load as zeros and the dq pass masks p
to 0 on the last, partial key tile only (a runtime branch taken once); rows/keys past the end are not stored.
fp32 inputs use ieee dots (tests); bf16 under the CPU interpreter is upcast to fp32 by the launchers (the
interpreter's bf16 arithmetic is wrong, REFERENCE §1), each result rounded to bf16 once, as on the GPU.

Tiles per (arch class, padded head_dim) come from `CONFIGS`, chosen by AOT register/spill/shared-memory
inspection (tools/readiness.py prints them), not by GPU timing.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from wan_kernels.triton._launch import Launch, run, target
from wan_kernels.triton.attention import LOG2E, arch_class, block_dim

_ADD = tl.standard._sum_combine


def _attention_delta_kernel(
    do_ptr, o_ptr, q_ptr, ki_ptr, vi_ptr, lse_ptr, delta_ptr,
    Sq, Si, H,
    stride_dob, stride_dos, stride_doh,
    stride_ob, stride_os, stride_oh,
    stride_qb, stride_qs, stride_qh,
    stride_kib, stride_kis, stride_kih,
    stride_vib, stride_vis, stride_vih,
    qk_scale,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_IMG: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < Sq - start_m
    dv_ok = offs_dv < DV
    m64 = start_m.to(tl.int64)
    do_base = do_ptr + b * stride_dob + h * stride_doh + m64 * stride_dos
    dout = tl.load(do_base + offs_m[:, None] * stride_dos + offs_dv[None, :],
                   mask=row_ok[:, None] & dv_ok[None, :], other=0.0)          # [BLOCK_M, BLOCK_DV]
    o_base = o_ptr + b * stride_ob + h * stride_oh + m64 * stride_os
    o = tl.load(o_base + offs_m[:, None] * stride_os + offs_dv[None, :], mask=row_ok[:, None] & dv_ok[None, :],
                other=0.0)
    delta = tl.reduce(dout.to(tl.float32) * o.to(tl.float32), 1, _ADD)
    stat = bh.to(tl.int64) * Sq + start_m                                     # row of [B, H, Sq]
    if HAS_IMG:
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        q_base = q_ptr + b * stride_qb + h * stride_qh + m64 * stride_qs
        q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                    other=0.0)
        lse2 = tl.load(lse_ptr + stat + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
        k_base = ki_ptr + b * stride_kib + h * stride_kih
        v_base = vi_ptr + b * stride_vib + h * stride_vih
        d_img = tl.full([BLOCK_M], 0.0, tl.float32)
        for start_n in range(0, Si, BLOCK_N):
            n_ok = offs_n < Si - start_n
            kt = tl.load(k_base + offs_n[None, :] * stride_kis + offs_d[:, None], mask=d_ok[:, None] & n_ok[None, :],
                         other=0.0)                                           # [BLOCK_D, BLOCK_N]
            vt = tl.load(v_base + offs_n[None, :] * stride_vis + offs_dv[:, None],
                         mask=dv_ok[:, None] & n_ok[None, :], other=0.0)      # [BLOCK_DV, BLOCK_N]
            p = tl.math.exp2(tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale - lse2[:, None])
            if start_n + BLOCK_N > Si:                                        # last, partial tile only
                p = tl.where(n_ok[None, :], p, 0.0)
            dp = tl.dot(dout, vt, input_precision=DOT_PRECISION)
            d_img += tl.reduce(p * dp, 1, _ADD)
            k_base += BLOCK_N * stride_kis
            v_base += BLOCK_N * stride_vis
        tl.store(delta_ptr + stat + offs_m, delta - d_img, mask=row_ok)      # [2, B, H, Sq]: text, image
        tl.store(delta_ptr + tl.num_programs(1).to(tl.int64) * Sq + stat + offs_m, d_img, mask=row_ok)
    else:
        tl.store(delta_ptr + stat + offs_m, delta, mask=row_ok)


def _attention_bwd_dkdv_kernel(
    do_ptr, q_ptr, k_ptr, v_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    Sq, Sk, H,
    stride_dob, stride_dos, stride_doh,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dkb, stride_dks, stride_dkh,
    stride_dvb, stride_dvs, stride_dvh,
    qk_scale, scale,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_ok = offs_n < Sk - start_n
    d_ok = offs_d < D
    dv_ok = offs_dv < DV
    n64 = start_n.to(tl.int64)
    k = tl.load(k_ptr + b * stride_kb + h * stride_kh + n64 * stride_ks + offs_n[:, None] * stride_ks
                + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)    # [BLOCK_N, BLOCK_D]
    v = tl.load(v_ptr + b * stride_vb + h * stride_vh + n64 * stride_vs + offs_n[:, None] * stride_vs
                + offs_dv[None, :], mask=n_ok[:, None] & dv_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_DV]
    dk = tl.full([BLOCK_N, BLOCK_D], 0.0, tl.float32)
    dv = tl.full([BLOCK_N, BLOCK_DV], 0.0, tl.float32)
    q_base = q_ptr + b * stride_qb + h * stride_qh
    do_base = do_ptr + b * stride_dob + h * stride_doh
    stat = lse_ptr + bh.to(tl.int64) * Sq
    dstat = delta_ptr + bh.to(tl.int64) * Sq
    qt_offs = offs_m[None, :] * stride_qs + offs_d[:, None]                  # [BLOCK_D, BLOCK_M]: q^T tile
    do_offs = offs_m[:, None] * stride_dos + offs_dv[None, :]                # [BLOCK_M, BLOCK_DV]
    for start_m in range(0, Sq, BLOCK_M):
        m_ok = offs_m < Sq - start_m
        qt = tl.load(q_base + qt_offs, mask=d_ok[:, None] & m_ok[None, :], other=0.0)
        dout = tl.load(do_base + do_offs, mask=m_ok[:, None] & dv_ok[None, :], other=0.0)
        lse2 = tl.load(stat + start_m + offs_m, mask=m_ok, other=float("inf")) * 1.4426950408889634
        delta = tl.load(dstat + start_m + offs_m, mask=m_ok, other=0.0)
        pt = tl.math.exp2(tl.dot(k, qt, input_precision=DOT_PRECISION) * qk_scale - lse2[None, :])  # [N, M]
        dv = tl.dot(pt.to(dout.dtype), dout, dv, input_precision=DOT_PRECISION)
        dpt = tl.dot(v, tl.trans(dout), input_precision=DOT_PRECISION)                            # [N, M]
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=DOT_PRECISION)
        q_base += BLOCK_M * stride_qs                                         # 64-bit scalar pointers
        do_base += BLOCK_M * stride_dos
    dk_base = dk_ptr + b * stride_dkb + h * stride_dkh + n64 * stride_dks
    tl.store(dk_base + offs_n[:, None] * stride_dks + offs_d[None, :], (dk * scale).to(dk_ptr.dtype.element_ty),
             mask=n_ok[:, None] & d_ok[None, :])
    dv_base = dv_ptr + b * stride_dvb + h * stride_dvh + n64 * stride_dvs
    tl.store(dv_base + offs_n[:, None] * stride_dvs + offs_dv[None, :], dv.to(dv_ptr.dtype.element_ty),
             mask=n_ok[:, None] & dv_ok[None, :])


def _attention_bwd_dq_kernel(
    do_ptr, q_ptr, k_ptr, v_ptr, lse_ptr, delta_ptr, dq_ptr,
    Sq, Sk, H,
    stride_dob, stride_dos, stride_doh,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dqb, stride_dqs, stride_dqh,
    qk_scale, scale,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < Sq - start_m
    d_ok = offs_d < D
    dv_ok = offs_dv < DV
    m64 = start_m.to(tl.int64)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + m64 * stride_qs + offs_m[:, None] * stride_qs
                + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)      # [BLOCK_M, BLOCK_D]
    dout = tl.load(do_ptr + b * stride_dob + h * stride_doh + m64 * stride_dos + offs_m[:, None] * stride_dos
                   + offs_dv[None, :], mask=m_ok[:, None] & dv_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_DV]
    stat = bh.to(tl.int64) * Sq + start_m
    lse2 = tl.load(lse_ptr + stat + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(delta_ptr + stat + offs_m, mask=m_ok, other=0.0)
    dq = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    k_offs = offs_n[:, None] * stride_ks + offs_d[None, :]                   # [BLOCK_N, BLOCK_D]
    vt_offs = offs_n[None, :] * stride_vs + offs_dv[:, None]                 # [BLOCK_DV, BLOCK_N]: v^T tile
    for start_n in range(0, Sk, BLOCK_N):
        n_ok = offs_n < Sk - start_n
        k = tl.load(k_base + k_offs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        vt = tl.load(v_base + vt_offs, mask=dv_ok[:, None] & n_ok[None, :], other=0.0)
        p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale - lse2[:, None])
        if start_n + BLOCK_N > Sk:                                            # last, partial tile only
            p = tl.where(n_ok[None, :], p, 0.0)
        ds = p * (tl.dot(dout, vt, input_precision=DOT_PRECISION) - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
        k_base += BLOCK_N * stride_ks
        v_base += BLOCK_N * stride_vs
    dq_base = dq_ptr + b * stride_dqb + h * stride_dqh + m64 * stride_dqs
    tl.store(dq_base + offs_m[:, None] * stride_dqs + offs_d[None, :], (dq * scale).to(dq_ptr.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])


# Compiled for CUDA tensors; `_launch.run` interprets the same functions for CPU tensors (TRITON_INTERPRET=1).
attention_delta_kernel = JITFunction(_attention_delta_kernel)
attention_bwd_dkdv_kernel = JITFunction(_attention_bwd_dkdv_kernel)
attention_bwd_dq_kernel = JITFunction(_attention_bwd_dq_kernel)


# ---------------------------------------------------------------------------------------------
# Launch configurations

@dataclasses.dataclass(frozen=True)
class Config:
    """One pass's tile: BLOCK_M queries x BLOCK_N keys, warps, pipeline stages."""
    BLOCK_M: int
    BLOCK_N: int
    num_warps: int
    num_stages: int

    def __str__(self) -> str:
        return f"{self.BLOCK_M}x{self.BLOCK_N}w{self.num_warps}s{self.num_stages}"


PASSES = ("delta", "dkdv", "dq")
_C = Config
# (arch class, padded head_dim 64 or 128, pass) -> Config, chosen by AOT inspection at Wan-14B shapes (readiness
# prints REG / spills / shared memory per entry): zero spills, shared memory within the arch's limit (the sm_80
# row also within the 99 KB of sm_86/89/120 and spill-free on each of them, with its own ptxas). dkdv: BLOCK_N keys
# resident, BLOCK_M queries per step; dq: BLOCK_M queries resident, BLOCK_N keys per step. Registers seen:
# sm_80-class 132-250, delta 160-171 (hd64 at 4 warps: 64 x 64 spilled 80 B on sm_120, 32 x 64 does not), sm_90 141-219
# (hd128 dkdv: 64 x 64 at 4 warps spilled 72 B, 64 x 128 at 8 warps 64 B), sm_100 94-198 (hd128 dq: 128 x 64 spilled
# 8 B under Triton 3.6, torch 2.11's; 128 x 32 is spill-free under 3.6 and 3.8). Every entry is checked under both
# Triton versions (readiness in the main venv and in `make compat`).
CONFIGS: dict[tuple[int, int, str], Config] = {
    # delta at 4 warps spilled 8-56 B on sm_120 (the I2V image loop): 8 warps on the sm_80 row
    **{(a, d, "delta"): _C(64, 64, 8 if a == 80 else 4, 2) for a in (80, 90, 100) for d in (64, 128)},
    (80, 64, "dkdv"): _C(32, 64, 4, 2), (80, 64, "dq"): _C(64, 64, 8, 2),
    (80, 128, "dkdv"): _C(64, 64, 8, 2), (80, 128, "dq"): _C(64, 64, 8, 2),
    (90, 64, "dkdv"): _C(64, 128, 8, 2), (90, 64, "dq"): _C(128, 64, 8, 2),
    (90, 128, "dkdv"): _C(64, 64, 8, 2), (90, 128, "dq"): _C(128, 64, 8, 2),
    (100, 64, "dkdv"): _C(64, 128, 8, 2), (100, 64, "dq"): _C(128, 64, 8, 2),
    (100, 128, "dkdv"): _C(64, 128, 8, 2), (100, 128, "dq"): _C(128, 32, 8, 2),
}
# Interpreter (CPU): any valid tile; bigger tiles mean fewer interpreted steps.
INTERPRETER_CONFIG = Config(64, 64, 4, 1)


def pick_config(capability: tuple[int, int] | None, head_dim: int, which: str) -> Config:
    """The table entry of a pass (`PASSES`) by (arch class, padded head_dim <= 64 or 128); None = interpreter.
    head_dim above 128 (not used by Wan) takes the 128 row with the resident tile halved per doubling."""
    if capability is None:
        return INTERPRETER_CONFIG
    bd = block_dim(head_dim)
    cfg = CONFIGS[(arch_class(capability), min(max(bd, 64), 128), which)]
    if bd > 128:
        half = "BLOCK_N" if which == "dkdv" else "BLOCK_M"
        cfg = dataclasses.replace(cfg, **{half: max(16, getattr(cfg, half) * 128 // bd)})
    return cfg


# ---------------------------------------------------------------------------------------------
# Launchers

def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _operands(on_cpu: bool, *ts):
    """The tensors as the kernel reads them: bf16 upcast under the interpreter, last dim contiguous."""
    return [None if t is None else _last_dim_contiguous(t.float() if on_cpu and t.dtype == torch.bfloat16 else t)
            for t in ts]


def _check_dtype(op: str, q: torch.Tensor) -> None:
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"{op} (triton): q must be float16/bfloat16/float32, got {q.dtype}")


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def prepare_delta(dout, out, q, k_img, v_img, lse_img, scale, capability, config: Config | None = None):
    """(Launch or None when empty, delta [S, B, H, Sq] fp32) of one wan::attention_delta call."""
    _check_dtype("attention_delta", q)
    has_img = k_img is not None
    dout, out, q, k_img, v_img = _operands(capability is None, dout, out, q, k_img, v_img)
    B, Sq, H, D = q.shape
    DV = out.shape[3]
    delta = torch.empty((2 if has_img else 1, B, H, Sq), dtype=torch.float32, device=q.device)
    if B * Sq * H == 0:
        return None, delta
    if has_img:
        lse_img = lse_img.contiguous()
    else:
        k_img, v_img, lse_img = q, out, delta  # never read (HAS_IMG=False)
    config = config or pick_config(capability, D, "delta")
    s = 1.0 / math.sqrt(D) if scale is None else float(scale)
    args = (dout, out, q, k_img, v_img, lse_img, delta, Sq, k_img.shape[1], H,
            *dout.stride()[:3], *out.stride()[:3], *q.stride()[:3], *k_img.stride()[:3], *v_img.stride()[:3],
            s * LOG2E)
    kwargs = dict(D=D, DV=DV, BLOCK_D=block_dim(D), BLOCK_DV=block_dim(DV), BLOCK_M=config.BLOCK_M,
                  BLOCK_N=config.BLOCK_N, HAS_IMG=has_img, DOT_PRECISION=_dot_precision(q.dtype),
                  num_warps=config.num_warps, num_stages=config.num_stages)
    return Launch(attention_delta_kernel, (triton.cdiv(Sq, config.BLOCK_M), B * H), args, kwargs, q.device), delta


def prepare_backward(dout, q, k, v, lse, delta, scale, capability, configs: dict[str, Config] | None = None):
    """([dK/dV Launch, dQ Launch] (empty when there is nothing to do), dq, dk, dv) of one wan::attention_backward
    call; dq, dk, dv are in the kernel's dtype (fp32 for bf16 under the interpreter)."""
    _check_dtype("attention_backward", q)
    dout, q, k, v = _operands(capability is None, dout, q, k, v)
    lse, delta = lse.contiguous(), delta.contiguous()
    B, Sq, H, D = q.shape
    Sk, DV = k.shape[1], v.shape[3]
    dq, dk, dv = torch.empty_like(q, memory_format=torch.contiguous_format), \
        torch.empty_like(k, memory_format=torch.contiguous_format), \
        torch.empty_like(v, memory_format=torch.contiguous_format)
    if B * H == 0 or Sq * Sk == 0:
        for g in (dq, dk, dv):
            g.zero_()
        return [], dq, dk, dv
    s = 1.0 / math.sqrt(D) if scale is None else float(scale)
    common = dict(D=D, DV=DV, BLOCK_D=block_dim(D), BLOCK_DV=block_dim(DV), DOT_PRECISION=_dot_precision(q.dtype))
    strides = (*dout.stride()[:3], *q.stride()[:3], *k.stride()[:3], *v.stride()[:3])
    launches = []
    for which, kernel, outs, rows in (("dkdv", attention_bwd_dkdv_kernel, (dk, dv), Sk),
                                      ("dq", attention_bwd_dq_kernel, (dq,), Sq)):
        cfg = (configs or {}).get(which) or pick_config(capability, D, which)
        tile = cfg.BLOCK_N if which == "dkdv" else cfg.BLOCK_M
        args = (dout, q, k, v, lse, delta, *outs, Sq, Sk, H, *strides,
                *(x for o in outs for x in o.stride()[:3]), s * LOG2E, s)
        launches.append(Launch(kernel, (triton.cdiv(rows, tile), B * H), args,
                               dict(common, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, num_warps=cfg.num_warps,
                                    num_stages=cfg.num_stages), q.device))
    return launches, dq, dk, dv


def attention_delta(dout, out, q, k_img=None, v_img=None, lse_img=None, scale=None) -> torch.Tensor:
    """Launcher of wan::attention_delta (same contract as `wan_kernels.attention_delta`): delta [S, B, H, Sq] fp32."""
    launch, delta = prepare_delta(dout, out, q, k_img, v_img, lse_img, scale, target(q, "attention_delta"))
    if launch is not None:
        run(launch)
    return delta


def attention_backward(dout, q, k, v, lse, delta, scale=None, *, configs: dict[str, Config] | None = None):
    """Launcher of wan::attention_backward (same contract as `wan_kernels.attention_backward`): (dq, dk, dv) in
    q's, k's, v's dtypes, contiguous. Two launches: dK/dV, then dQ. `configs` ({pass: Config}) overrides the
    table (tests)."""
    dtypes = (q.dtype, k.dtype, v.dtype)
    launches, dq, dk, dv = prepare_backward(dout, q, k, v, lse, delta, scale, target(q, "attention_backward"),
                                            configs)
    for launch in launches:
        run(launch)
    return tuple(g.to(dt) for g, dt in zip((dq, dk, dv), dtypes))
