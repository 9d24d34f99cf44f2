"""Triton kernel of wan::attention: non-causal flash-attention forward in [B, S, H, D] layout, with Wan's
optional second (image) key/value set, in one launch.

For one (batch, head) and a tile of BLOCK_M queries q (loaded once), per key/value set j (text k, v and,
in I2V mode, image k_img, v_img), streamed in tiles of BLOCK_N keys:
    s     = (q k_n^T) * scale * log2(e)             (fp32 accumulate; exp2(x * log2(e)) = exp(x))
    m'    = max(m, rowmax(s));  p = exp2(s - m');  alpha = exp2(m - m')
    l     = l * alpha + rowsum(p);  acc = acc * alpha + p v_n    (p rounded to v's dtype for the MMA)
    out  += acc / l                                   after the last tile of set j
    lse_j = (m + log2(l)) * ln(2)                     natural-log LSE of set j's scores, on request
This is flash-attention 2's online softmax (Dao 2023, "FlashAttention-2", Alg. 1; the Triton tutorial
06-fused-attention). I2V (REFERENCE §4): the two sets keep INDEPENDENT (m, l, acc) states and their
normalised outputs are summed: softmax(q k^T s) v + softmax(q k_img^T s) v_img, which is not one softmax
over the union of keys. The sum is formed in fp32 and written once (one rounding to q's dtype).

Layout and masking: q, k, v, out are read/written through their strides (any stride on B, S and H; the
last dimension must be contiguous, else the launcher copies that tensor), so q/k/v may be slices of a
packed [B, S, 3, H, D] tensor. Scalar base offsets are int64; per-tile offsets are int32. Tails: query
rows >= Sq are computed on zeros and not stored; keys >= Sk are loaded as zeros (predicated loads) and get
score -inf. Only the last key tile of a set needs the score mask: it is applied under a runtime branch
taken once per set, so the main loop of long self-attention does no per-score select. head_dim and the
value dim are padded to powers of two >= 16 (Wan: 128, exact) with masked loads.

Trade-offs:
* Tiles per (arch, head_dim, kind) come from `pick_config` (table `CONFIGS`), chosen by AOT register /
  spill / shared-memory inspection, not by GPU timing (no GPU here): BLOCK_M = 128 everywhere, BLOCK_N 64
  at hd128 and 128 at hd64 for long-KV self-attention on sm_90/sm_100, 8 warps (4 warps at 128 x 64 x hd128
  spill on every arch). Every config the table can return compiles with zero spills for its arch
  (tests/test_attention_aot.py). The I2V kind keeps a second [BLOCK_M, Dv] fp32 accumulator (the text
  result) live through the image loop, so it has its own entries (BLOCK_N 32 at hd128).
* No warp specialisation / TMA / persistent scheduling (FA3-style): plain software pipelining by Triton
  (num_stages). This is the portable baseline; the FA3 target needs those on sm_90.
* fp32 inputs run (tl.dot with input_precision="ieee") for testing; bf16 under the CPU interpreter is
  computed by upcasting to fp32 in the launcher (the interpreter's bf16 arithmetic is wrong, REFERENCE §1).

The kernel runs on CUDA tensors, or on CPU tensors through the Triton interpreter (TRITON_INTERPRET=1);
both flavours are built from the same Python function, chosen per call by device (as qk_norm_rope).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from wan_kernels.triton._launch import Launch, mma_class, run, target

LOG2E = 1.4426950408889634
# KV lengths up to this are "cross" (Wan: 512 text, 257 image keys); longer ones are "self".
CROSS_MAX_KV = 1024
# `tl.max(x, 1)` / `tl.sum(x, 1)` are @jit functions of triton.language; tl.reduce with Triton's own
# combiners is the same op and stays runnable by the interpreter whatever the import order (qk_norm_rope).
_ADD = tl.standard._sum_combine
_MAX = tl.standard._elementwise_max


def _attention_kernel(
    q_ptr, k_ptr, v_ptr, ki_ptr, vi_ptr, o_ptr, lse_ptr,
    Sq, Sk, Si, H,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_kib, stride_kis, stride_kih,
    stride_vib, stride_vis, stride_vih,
    stride_ob, stride_os, stride_oh,
    qk_scale,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_IMG: tl.constexpr, WRITE_LSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    NUM_SETS: tl.constexpr = 2 if HAS_IMG else 1
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < Sq - start_m                                        # query tail
    d_ok = offs_d < D
    dv_ok = offs_dv < DV

    q_base = q_ptr + b * stride_qb + h * stride_qh + start_m.to(tl.int64) * stride_qs
    q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)          # [BLOCK_M, BLOCK_D], loaded once

    for j in tl.static_range(NUM_SETS):
        if j == 0:
            kv_len = Sk
            k_base = k_ptr + b * stride_kb + h * stride_kh
            v_base = v_ptr + b * stride_vb + h * stride_vh
            s_k = stride_ks
            s_v = stride_vs
        else:
            kv_len = Si
            k_base = ki_ptr + b * stride_kib + h * stride_kih
            v_base = vi_ptr + b * stride_vib + h * stride_vih
            s_k = stride_kis
            s_v = stride_vis
        k_offs = offs_n[None, :] * s_k + offs_d[:, None]                  # [BLOCK_D, BLOCK_N]: k^T tile
        v_offs = offs_n[:, None] * s_v + offs_dv[None, :]                 # [BLOCK_N, BLOCK_DV]
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.full([BLOCK_M], 0.0, tl.float32)
        acc = tl.full([BLOCK_M, BLOCK_DV], 0.0, tl.float32)
        for start_n in range(0, kv_len, BLOCK_N):
            n_ok = offs_n < kv_len - start_n
            kt = tl.load(k_base + k_offs, mask=d_ok[:, None] & n_ok[None, :], other=0.0)
            s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale   # [BLOCK_M, BLOCK_N], log2 domain
            if start_n + BLOCK_N > kv_len:                                # last, partial tile only
                s = tl.where(n_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.reduce(p, 1, _ADD)
            vt = tl.load(v_base + v_offs, mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
            acc = tl.dot(p.to(vt.dtype), vt, acc * alpha[:, None], input_precision=DOT_PRECISION)
            m_i = m_new
            k_base += BLOCK_N * s_k                                       # 64-bit scalar pointers
            v_base += BLOCK_N * s_v
        if j == 0:
            out = acc / l_i[:, None]
        else:
            out += acc / l_i[:, None]
        if WRITE_LSE:
            lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453          # ln(2): natural log, [NUM_SETS, B, H, Sq]
            lse_base = lse_ptr + ((j * tl.num_programs(1) + bh).to(tl.int64) * Sq + start_m)
            tl.store(lse_base + offs_m, lse, mask=row_ok)

    o_base = o_ptr + b * stride_ob + h * stride_oh + start_m.to(tl.int64) * stride_os
    tl.store(o_base + offs_m[:, None] * stride_os + offs_dv[None, :], out.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & dv_ok[None, :])


# Compiled for CUDA tensors; `_launch.run` interprets the same function for CPU tensors (TRITON_INTERPRET=1).
attention_kernel = JITFunction(_attention_kernel)


# ---------------------------------------------------------------------------------------------
# Launch configurations

@dataclasses.dataclass(frozen=True)
class Config:
    """Tile shape and launch parameters: BLOCK_M queries x BLOCK_N keys per step, warps, pipeline stages."""
    BLOCK_M: int
    BLOCK_N: int
    num_warps: int
    num_stages: int

    def __str__(self) -> str:
        return f"{self.BLOCK_M}x{self.BLOCK_N}w{self.num_warps}s{self.num_stages}"


ARCH_CLASSES = (80, 90, 100)
KINDS = ("self", "cross", "i2v")
_C = Config
# (arch class, BLOCK_D, kind) -> Config, chosen by AOT inspection (tests/test_attention_aot.py prints REG /
# spills / shared memory per entry): zero spills with and without the LSE output, shared memory within the
# arch's limit (sm_80's entries also within the 99 KB of sm_86/89/120). Registers seen: 180-255 on sm_80,
# 120-227 on sm_90, 116-240 on sm_100. Near the limit the choice is ptxas's: sm_100 128x64 w8 s3 at hd64
# is capped at 128 registers and spills 8 bytes with the LSE output, so "cross" there uses 2 stages.
CONFIGS: dict[tuple[int, int, str], Config] = {
    # sm_80: mma.sync keeps q, the score tile and the accumulator in registers.
    # 4 warps at hd64 spilled 32-64 B on sm_120 (same class, its own ptxas): 8 warps there too.
    (80, 64, "self"): _C(128, 64, 8, 3), (80, 64, "cross"): _C(128, 64, 8, 3), (80, 64, "i2v"): _C(128, 64, 8, 3),
    # i2v hd128: 128 x 32 spilled 24 B on sm_120 (2 or 3 stages); 128 x 16 keeps 224-234 registers on sm_80/120.
    (80, 128, "self"): _C(128, 64, 8, 3), (80, 128, "cross"): _C(128, 64, 8, 3), (80, 128, "i2v"): _C(128, 16, 8, 3),
    # sm_90: wgmma. 128 x 128 at hd128 needs ~225 KB of shared memory at 3 stages and 255 registers.
    (90, 64, "self"): _C(128, 128, 8, 3), (90, 64, "cross"): _C(128, 64, 8, 3), (90, 64, "i2v"): _C(128, 64, 8, 3),
    (90, 128, "self"): _C(128, 64, 8, 3), (90, 128, "cross"): _C(128, 64, 8, 3), (90, 128, "i2v"): _C(128, 32, 8, 3),
    # sm_100: tcgen05 (Triton still rescales the accumulator through registers: 128 x 128 at hd128 spills).
    (100, 64, "self"): _C(128, 128, 8, 3), (100, 64, "cross"): _C(128, 64, 8, 2), (100, 64, "i2v"): _C(128, 64, 8, 3),
    (100, 128, "self"): _C(128, 64, 8, 3), (100, 128, "cross"): _C(128, 64, 8, 3),
    (100, 128, "i2v"): _C(128, 32, 8, 3),
}
# Interpreter (CPU): any valid tile; bigger tiles mean fewer interpreted steps.
INTERPRETER_CONFIG = Config(64, 64, 4, 1)


def arch_class(capability: tuple[int, int]) -> int:
    """The CONFIGS row of a CUDA device, by tensor-core class (`_launch.mma_class`): 100 for tcgen05 (sm_100
    family), 90 for wgmma (sm_90), 80 for mma.sync (sm_80, sm_86, sm_89, sm_120: the row must fit all of them)."""
    return {"tcgen05": 100, "wgmma": 90, "mma.sync": 80}[mma_class(capability)]


def kind_of(kv_len: int, has_img: bool) -> str:
    """"i2v" with an image set, else "cross" for short KV (<= CROSS_MAX_KV keys), else "self"."""
    if has_img:
        return "i2v"
    return "cross" if kv_len <= CROSS_MAX_KV else "self"


def block_dim(d: int) -> int:
    """Padded (power of two, >= 16 for tl.dot) width of a head dimension."""
    return max(16, triton.next_power_of_2(d))


def pick_config(capability: tuple[int, int] | None, head_dim: int, kv_len: int, has_img: bool) -> Config:
    """The heuristic: a table lookup by (arch class, padded head_dim <= 64 or 128, kind); None = interpreter.

    head_dim above 128 (not used by Wan) takes the 128 row with BLOCK_N halved per doubling of the width
    (no AOT guarantee there)."""
    if capability is None:
        return INTERPRETER_CONFIG
    bd = block_dim(head_dim)
    cfg = CONFIGS[(arch_class(capability), min(max(bd, 64), 128), kind_of(kv_len, has_img))]
    if bd > 128:
        cfg = dataclasses.replace(cfg, BLOCK_N=max(16, cfg.BLOCK_N * 128 // bd), num_stages=2)
    return cfg


# ---------------------------------------------------------------------------------------------
# Launchers

def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def prepare(q, k, v, k_img, v_img, scale, write_lse: bool, config: Config | None, capability):
    """(Launch or None when empty, out, lse) of one attention call for `capability` (None = interpreter)."""
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"attention (triton): q must be float16/bfloat16/float32, got {q.dtype}")
    on_cpu = capability is None
    has_img = k_img is not None
    if on_cpu and q.dtype == torch.bfloat16:
        # The interpreter computes on bf16 bit patterns as if they were integers (REFERENCE §1): on CPU
        # the operands are upcast to fp32 here; the result is rounded to bf16 once, as on the GPU.
        q, k, v = q.float(), k.float(), v.float()
        if has_img:
            k_img, v_img = k_img.float(), v_img.float()
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    if has_img:
        k_img, v_img = _last_dim_contiguous(k_img), _last_dim_contiguous(v_img)
    else:
        k_img, v_img = k, v  # never read (HAS_IMG=False); same dtype keeps one signature
    B, Sq, H, D = q.shape
    Sk, Si, DV = k.shape[1], k_img.shape[1], v.shape[3]
    s = 1.0 / math.sqrt(D) if scale is None else float(scale)

    out = torch.empty((B, Sq, H, DV), dtype=q.dtype, device=q.device)
    num_sets = 2 if has_img else 1
    lse = torch.empty((num_sets, B, H, Sq) if write_lse else (1,), dtype=torch.float32, device=q.device)
    if B * Sq * H == 0:
        return None, out, lse
    if config is None:
        config = pick_config(capability, D, max(Sk, Si if has_img else 0), has_img)
    grid = (triton.cdiv(Sq, config.BLOCK_M), B * H)
    args = (q, k, v, k_img, v_img, out, lse, Sq, Sk, Si, H,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), k_img.stride(0), k_img.stride(1), k_img.stride(2),
            v_img.stride(0), v_img.stride(1), v_img.stride(2), out.stride(0), out.stride(1), out.stride(2), s * LOG2E)
    kwargs = dict(D=D, DV=DV, BLOCK_D=block_dim(D), BLOCK_DV=block_dim(DV), BLOCK_M=config.BLOCK_M,
                  BLOCK_N=config.BLOCK_N, HAS_IMG=has_img, WRITE_LSE=write_lse,
                  DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                  num_warps=config.num_warps, num_stages=config.num_stages)
    return Launch(attention_kernel, grid, args, kwargs, q.device), out, lse


def _run(q, k, v, k_img, v_img, scale, write_lse: bool, config: Config | None):
    out_dtype = q.dtype
    launch, out, lse = prepare(q, k, v, k_img, v_img, scale, write_lse, config, target(q, "attention"))
    if launch is not None:
        run(launch)
    out = out.to(out_dtype)
    if not write_lse:
        return out, None, None
    return out, lse[0], (lse[1] if k_img is not None else None)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_img: torch.Tensor | None = None,
              v_img: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Launcher of wan::attention (same contract as `wan_kernels.attention`; the wrapper checks arguments).

    q: [B, Sq, H, D]; k, v: [B, Sk, H, D / Dv]; optional k_img, v_img: [B, Si, H, D / Dv]; fp16/bf16
    (fp32 accepted); any strides with a contiguous last dimension (others are copied).
    Returns [B, Sq, H, Dv] contiguous in q's dtype: softmax(q k^T s) v [+ softmax(q k_img^T s) v_img],
    s = scale or 1/sqrt(D). One launch, also in I2V mode.
    """
    return _run(q, k, v, k_img, v_img, scale, False, None)[0]


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_img: torch.Tensor | None = None,
                       v_img: torch.Tensor | None = None, scale: float | None = None, *,
                       config: Config | None = None):
    """`attention` that also returns the log-sum-exp of the scores: (out, lse, lse_img).

    lse: [B, H, Sq] float32, natural log: logsumexp_n(s * q.k_n) over the text/self keys; lse_img the same
    over the image keys (None without an image set). `config` overrides the heuristic (tests).
    """
    return _run(q, k, v, k_img, v_img, scale, True, config)


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_img: torch.Tensor | None = None,
                      v_img: torch.Tensor | None = None, scale: float | None = None):
    """Launcher of wan::attention_forward: (out [B, Sq, H, Dv] in q's dtype, lse [S, B, H, Sq] float32), S = 1
    or 2 (with the image set): the same launch as `attention`, writing each set's log-sum-exp."""
    out_dtype = q.dtype
    launch, out, lse = prepare(q, k, v, k_img, v_img, scale, True, None, target(q, "attention"))
    if launch is not None:
        run(launch)
    return out.to(out_dtype), lse


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None):
    """Launcher of wan::attention_lse: (out [B, Sq, H, Dv] in q's dtype, lse [B, H, Sq] float32), one key set."""
    out, lse, _ = _run(q, k, v, None, None, scale, True, None)
    return out, lse


def attention_with_config(q, k, v, k_img=None, v_img=None, scale=None, *, config: Config) -> torch.Tensor:
    """`attention` with an explicit tile config instead of the heuristic (tests, benchmarks)."""
    return _run(q, k, v, k_img, v_img, scale, False, config)[0]


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compilation (tests/test_attention_aot.py, tools/aot.py): the signature a GPU
# launch specialises to for contiguous [B, S, H, D] inputs (16-byte aligned pointers, strides % 16 == 0).

_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
AOT_ALIGNED = ("q_ptr", "k_ptr", "v_ptr", "ki_ptr", "vi_ptr", "o_ptr", "lse_ptr",
               "stride_qb", "stride_qs", "stride_qh", "stride_kb", "stride_ks", "stride_kh",
               "stride_vb", "stride_vs", "stride_vh", "stride_kib", "stride_kis", "stride_kih",
               "stride_vib", "stride_vis", "stride_vih", "stride_ob", "stride_os", "stride_oh")


def aot_signature(dtype: torch.dtype) -> dict[str, str]:
    """Triton signature of `attention_kernel` for inputs in `dtype`."""
    t = _TRITON_TYPES[dtype]
    sig = {}
    for n in attention_kernel.arg_names:  # in argument order
        if n.endswith("_ptr"):
            sig[n] = "*fp32" if n == "lse_ptr" else f"*{t}"
        elif n == "qk_scale":
            sig[n] = "fp32"
        elif n[0].isupper() and n not in ("Sq", "Sk", "Si", "H"):
            sig[n] = "constexpr"
        else:
            sig[n] = "i32"
    return sig


def aot_constexprs(head_dim: int, config: Config, has_img: bool, write_lse: bool = False,
                   dtype: torch.dtype = torch.float16) -> dict:
    return {"D": head_dim, "DV": head_dim, "BLOCK_D": block_dim(head_dim), "BLOCK_DV": block_dim(head_dim),
            "BLOCK_M": config.BLOCK_M, "BLOCK_N": config.BLOCK_N, "HAS_IMG": has_img, "WRITE_LSE": write_lse,
            "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32"}
