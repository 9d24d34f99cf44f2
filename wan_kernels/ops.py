"""Typed Python wrappers of the `wan` ops: the public kernel API.

Each wrapper takes `impl="auto"|"cuda"|"cpu"|"triton"|"ref"` (see wan_kernels/routing.py). "auto"
calls `torch.ops.wan.<op>` (the dispatcher picks the device's kernel); a named backend that cannot
run raises `BackendUnavailableError`, it never falls back.
"""

from __future__ import annotations

import torch

from wan_kernels import nvfp4 as fmt
from wan_kernels.routing import resolve


def qk_norm_rope(qkv: torch.Tensor, norm_q_weight: torch.Tensor, norm_k_weight: torch.Tensor,
                 rope_cos: torch.Tensor, rope_sin: torch.Tensor, num_heads: int, eps: float = 1e-6, *,
                 impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RMSNorm of q and k over all C channels (across heads), then 3D RoPE on interleaved pairs.

    qkv: [B, S, 3*C] (q | k | v, output of the fused QKV GEMM), fp32/fp16/bf16, any strides.
    norm_q_weight, norm_k_weight: [C]. rope_cos, rope_sin: [S, D/2] float32, one angle per pair.
    Returns q, k, v: [B, S, H, D] contiguous, in qkv's dtype (fp32 math, one rounding).
    """
    return resolve("qk_norm_rope", impl, qkv.device)(qkv, norm_q_weight, norm_k_weight, rope_cos, rope_sin,
                                                      num_heads, eps)


def qkv_rope(x: torch.Tensor, w_qkv: torch.Tensor, b_qkv: torch.Tensor | None, norm_q_weight: torch.Tensor,
             norm_k_weight: torch.Tensor, rope_cos: torch.Tensor, rope_sin: torch.Tensor, num_heads: int,
             eps: float = 1e-6, *, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ONE GEMM x @ w_qkv^T + b_qkv over the concatenated [3C, C] weight, then `qk_norm_rope`.

    x: [B, S, C]; w_qkv: [3*C, C] (rows: to_q | to_k | to_v); b_qkv: [3*C] or None.
    """
    return resolve("qkv_rope", impl, x.device)(x, w_qkv, b_qkv, norm_q_weight, norm_k_weight, rope_cos,
                                                  rope_sin, num_heads, eps)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_img: torch.Tensor | None = None,
              v_img: torch.Tensor | None = None, scale: float | None = None, *,
              impl: str = "auto") -> torch.Tensor:
    """Non-causal attention in [B, S, H, D] layout, with an optional image key/value set (Wan I2V).

    Returns softmax(q k^T * s) v + softmax(q k_img^T * s) v_img (two independent softmaxes summed),
    s = scale or 1/sqrt(D). q: [B, Sq, H, D]; k, v: [B, Sk, H, D/Dv]; k_img, v_img: [B, Si, H, D/Dv].
    Output: [B, Sq, H, Dv] in q's dtype.
    """
    return resolve("attention", impl, q.device)(q, k, v, k_img, v_img, scale)


def nvfp4_quantize(x: torch.Tensor, global_scale: torch.Tensor, *,
                   impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """NVFP4-quantize x: [M, K] (K % 16 == 0) with a DECODE-convention global scale (amax / (6*448);
    see `wan_kernels.nvfp4.global_scale`). Returns packed uint8 [M, K/2] (low nibble = even element) and
    block_scale float8_e4m3fn [roundup(M,128), roundup(K/16,4)] in the 128x4 swizzled layout."""
    return resolve("nvfp4_quantize", impl, x.device)(x, global_scale)


def nvfp4_dequantize(packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor,
                     dtype: torch.dtype = torch.bfloat16, *, impl: str = "auto") -> torch.Tensor:
    """Inverse of `nvfp4_quantize`: [M, K] = (e2m1 * block_scale) * global_scale in `dtype`."""
    return resolve("nvfp4_dequantize", impl, packed.device)(packed, block_scale, global_scale, dtype)


def nvfp4_gemm(a: torch.Tensor, a_scale: torch.Tensor, a_global_scale: torch.Tensor, b: torch.Tensor,
               b_scale: torch.Tensor, b_global_scale: torch.Tensor, bias: torch.Tensor | None = None,
               out_dtype: torch.dtype = torch.bfloat16, *, impl: str = "auto") -> torch.Tensor:
    """W4A4 block-scaled GEMM: out [M, N] = (a_gs * b_gs) * (A_q @ B_q^T) + bias.

    a: packed [M, K/2], b: packed [N, K/2] (both K-major, as CUTLASS sm100 wants), scales swizzled,
    global scales in the DECODE convention (alpha = a_global_scale * b_global_scale).
    """
    return resolve("nvfp4_gemm", impl, a.device)(a, a_scale, a_global_scale, b, b_scale, b_global_scale, bias,
                                                 out_dtype)


def nvfp4_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, w_global_scale: torch.Tensor,
                 bias: torch.Tensor | None = None, *, impl: str = "auto") -> torch.Tensor:
    """W4A16 linear with NVFP4 weights: x [..., K] @ dequantize(w)^T + bias -> [..., N] in x's dtype.

    w: packed [N, K/2], w_scale: swizzled [roundup(N,128), roundup(K/16,4)] e4m3, w_global_scale: fp32 scalar
    (DECODE convention). On Ampere/Hopper the Triton kernel decodes weight tiles in the GEMM main loop.
    """
    return resolve("nvfp4_linear", impl, x.device)(x, w, w_scale, w_global_scale, bias)


def nvfp4_linear_w4a4(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, w_global_scale: torch.Tensor,
                      bias: torch.Tensor | None = None, x_global_scale: torch.Tensor | None = None, *,
                      impl: str = "auto") -> torch.Tensor:
    """W4A4 linear (Blackwell's FP4 tensor cores): quantize x to NVFP4 (global scale `x_global_scale`, or
    amax(x) / (6*448) computed on the device), then `nvfp4_gemm`. x [..., K] -> [..., N] in x's dtype (the
    CUTLASS kernel writes fp16/bf16 only)."""
    x2 = x.reshape(-1, x.shape[-1])
    gs = fmt.global_scale(x2) if x_global_scale is None else x_global_scale
    xq, xs = nvfp4_quantize(x2, gs, impl=impl)
    out = nvfp4_gemm(xq, xs, gs, w, w_scale, w_global_scale, bias, x.dtype, impl=impl)
    return out.reshape(*x.shape[:-1], w.shape[0])


def layer_norm_modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float = 1e-6, *,
                        impl: str = "auto") -> torch.Tensor:
    """adaLN: (LayerNorm_fp32(x) * (1 + scale) + shift) rounded once to x's dtype.
    x: [B, S, C]; scale, shift: fp32 [B, 1|S, C] (any strides)."""
    return resolve("layer_norm_modulate", impl, x.device)(x, scale, shift, eps)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """x + y * gate in fp32, rounded once to x's dtype. x, y: [B, S, C]; gate: fp32 [B, 1|S, C]."""
    return resolve("gated_residual", impl, x.device)(x, y, gate)
