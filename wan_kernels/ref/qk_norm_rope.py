"""Reference of wan::qk_norm_rope: RMSNorm of q and k across all heads, then interleaved-pair RoPE."""

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight over the last dim, in fp32 (fp64 stays fp64)."""
    x = x.to(_compute_dtype(x.dtype))
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.to(x.dtype)


def rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., 2i], x[..., 2i+1]) by angle i.  x: [B, S, H, D]; cos/sin: [S, D/2]."""
    x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)             # [B, S, H, D/2] each
    c = cos.to(x.dtype)[None, :, None, :]
    s = sin.to(x.dtype)[None, :, None, :]
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)


def qk_norm_rope(qkv: torch.Tensor, norm_q_weight: torch.Tensor, norm_k_weight: torch.Tensor,
                 rope_cos: torch.Tensor, rope_sin: torch.Tensor, num_heads: int, eps: float):
    """qkv: [B, S, 3C] -> q, k, v: [B, S, H, D] in qkv's dtype; one rounding at the end."""
    B, S, C3 = qkv.shape
    C = C3 // 3
    q, k, v = qkv.split(C, dim=-1)
    q = rms_norm(q, norm_q_weight, eps).unflatten(-1, (num_heads, -1))
    k = rms_norm(k, norm_k_weight, eps).unflatten(-1, (num_heads, -1))
    q = rope_interleaved(q, rope_cos, rope_sin)
    k = rope_interleaved(k, rope_cos, rope_sin)
    v = v.unflatten(-1, (num_heads, -1))
    return q.to(qkv.dtype), k.to(qkv.dtype), v.contiguous()
