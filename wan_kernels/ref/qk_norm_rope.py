"""Reference of wan::qk_norm_rope: RMSNorm of q and k across all heads, then interleaved-pair RoPE."""

import torch

from wan_kernels.ref.attention_int8 import quantize_int8

__all__ = ["qk_norm_rope", "qk_norm_rope_backward", "qk_norm_rope_int8"]


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


def qk_norm_rope_int8(qkv: torch.Tensor, norm_q_weight: torch.Tensor, norm_k_weight: torch.Tensor,
                      rope_cos: torch.Tensor, rope_sin: torch.Tensor, num_heads: int, eps: float):
    """qk_norm_rope with q quantized for wan::attention_int8_q8: (q8 int8 [B, S, H, D], q_scale fp32 [B, H, S], k, v)
    where q8, q_scale are 8-bit attention's stage 2 (symmetric amax/127 per token and head, round half away from
    zero) of the q that `qk_norm_rope` returns (rounded to qkv's dtype first)."""
    q, k, v = qk_norm_rope(qkv, norm_q_weight, norm_k_weight, rope_cos, rope_sin, num_heads, eps)
    q8, q_scale = quantize_int8(q, 1)
    return q8, q_scale, k, v


def qk_norm_rope_backward(grad_q: torch.Tensor, grad_k: torch.Tensor, grad_v: torch.Tensor, qkv: torch.Tensor,
                          norm_q_weight: torch.Tensor, norm_k_weight: torch.Tensor, rope_cos: torch.Tensor,
                          rope_sin: torch.Tensor, num_heads: int, eps: float):
    """Gradients of qk_norm_rope. grad_q/k/v: [B, S, H, D] -> grad_qkv [B, S, 3C] in qkv's dtype, grad_norm_q_weight
    and grad_norm_k_weight [C] in the weights' dtypes (summed over all B * S rows). fp32 math, one rounding.
    Per row x (q or k) with r = rsqrt(mean(x^2) + eps), n = x * r, y = n * w, out = RoPE(y):
        gy = RoPE^T(g) (the rotation by -angle), dw = sum_rows gy * n, gn = gy * w, dx = r * (gn - n * mean(gn * n));
    v's gradient passes through. rstd is recomputed from qkv (the forward saves nothing but its inputs)."""
    C = qkv.shape[2] // 3
    dt = _compute_dtype(qkv.dtype)

    def one(g, x, w):
        gy = rope_interleaved(g.to(dt), rope_cos, -rope_sin).flatten(-2)  # [B, S, C]
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        n = x * r
        gn = gy * w.to(dt)
        return r * (gn - n * (gn * n).mean(-1, keepdim=True)), (gy * n).sum((0, 1)).to(w.dtype)

    q, k, _ = qkv.to(dt).split(C, dim=-1)
    dq, dwq = one(grad_q, q, norm_q_weight)
    dk, dwk = one(grad_k, k, norm_k_weight)
    return torch.cat((dq, dk, grad_v.to(dt).flatten(-2)), dim=-1).to(qkv.dtype), dwq, dwk
