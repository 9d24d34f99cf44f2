"""Reference of wan::attention: non-causal softmax attention in [B, S, H, D] layout, with an optional
second (image) key/value set whose softmax is computed independently and added (Wan I2V); and of
wan::attention_lse, one key/value set with the log-sum-exp of its scores (ring attention merges blocks by it)."""

import math

import torch


def _softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    # q: [B, H, Sq, D], k/v: [B, H, Sk, D]
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_img: torch.Tensor | None = None,
              v_img: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T s) v [+ softmax(q k_img^T s) v_img]; q: [B, Sq, H, D] -> [B, Sq, H, Dv] in q's dtype."""
    dt = torch.promote_types(q.dtype, torch.float32)
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qh = q.to(dt).transpose(1, 2)
    out = _softmax_attention(qh, k.to(dt).transpose(1, 2), v.to(dt).transpose(1, 2), s)
    if k_img is not None:
        out = out + _softmax_attention(qh, k_img.to(dt).transpose(1, 2), v_img.to(dt).transpose(1, 2), s)
    return out.transpose(1, 2).to(q.dtype).contiguous()


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax(q k^T s) v [B, Sq, H, Dv] in q's dtype, lse [B, H, Sq]): lse = logsumexp_n(s q.k_n), natural log,
    fp32 (fp64 for fp64 inputs)."""
    dt = torch.promote_types(q.dtype, torch.float32)
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q.to(dt).transpose(1, 2), k.to(dt).permute(0, 2, 3, 1)) * s     # [B, H, Sq, Sk]
    out = torch.matmul(torch.softmax(scores, dim=-1), v.to(dt).transpose(1, 2))
    return out.transpose(1, 2).to(q.dtype).contiguous(), torch.logsumexp(scores, dim=-1)
