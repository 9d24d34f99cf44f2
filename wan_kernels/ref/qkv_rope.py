"""Reference of wan::qkv_rope: ONE GEMM over the concatenated [3C, C] weight, then qk_norm_rope."""

import torch
import torch.nn.functional as F

from wan_kernels.ref.qk_norm_rope import qk_norm_rope, qk_norm_rope_int8

__all__ = ["qkv_rope", "qkv_rope_int8"]


def qkv_rope(x: torch.Tensor, w_qkv: torch.Tensor, b_qkv: torch.Tensor | None, norm_q_weight: torch.Tensor,
             norm_k_weight: torch.Tensor, rope_cos: torch.Tensor, rope_sin: torch.Tensor, num_heads: int,
             eps: float):
    """x: [B, S, C], w_qkv: [3C, C], b_qkv: [3C] or None -> q, k, v: [B, S, H, D]."""
    qkv = F.linear(x, w_qkv, b_qkv)
    return qk_norm_rope(qkv, norm_q_weight, norm_k_weight, rope_cos, rope_sin, num_heads, eps)


def qkv_rope_int8(x: torch.Tensor, w_qkv: torch.Tensor, b_qkv: torch.Tensor | None, norm_q_weight: torch.Tensor,
                  norm_k_weight: torch.Tensor, rope_cos: torch.Tensor, rope_sin: torch.Tensor, num_heads: int,
                  eps: float):
    """qkv_rope with q quantized (qk_norm_rope_int8) -> q8, q_scale [B, H, S], k, v."""
    qkv = F.linear(x, w_qkv, b_qkv)
    return qk_norm_rope_int8(qkv, norm_q_weight, norm_k_weight, rope_cos, rope_sin, num_heads, eps)
