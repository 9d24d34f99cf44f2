"""Reference of wan::attention: non-causal softmax attention in [B, S, H, D] layout, with an optional
second (image) key/value set whose softmax is computed independently and added (Wan I2V); and of
wan::attention_lse, one key/value set with the log-sum-exp of its scores (ring attention merges blocks by it);
wan::attention_forward (attention with each set's log-sum-exp, what the backward needs) and wan::attention_backward
(one set's gradients from its log-sum-exp and delta, FlashAttention-2's backward)."""

import math

import torch

__all__ = ["attention", "attention_backward", "attention_delta", "attention_forward", "attention_lse"]


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


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_img: torch.Tensor | None = None,
                      v_img: torch.Tensor | None = None,
                      scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """wan::attention with what its backward needs: (out [B, Sq, H, Dv] in q's dtype, lse [S, B, H, Sq]), S = 1
    (text/self keys) or 2 (and the image keys): each set's logsumexp of its scores, fp32 (fp64 for fp64)."""
    dt = torch.promote_types(q.dtype, torch.float32)
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qh = q.to(dt).transpose(1, 2)
    out, lses = 0, []
    for kt, vt in ((k, v),) if k_img is None else ((k, v), (k_img, v_img)):
        scores = torch.matmul(qh, kt.to(dt).permute(0, 2, 3, 1)) * s                        # [B, H, Sq, Sk]
        out = out + torch.matmul(torch.softmax(scores, dim=-1), vt.to(dt).transpose(1, 2))
        lses.append(torch.logsumexp(scores, dim=-1))
    return out.transpose(1, 2).to(q.dtype).contiguous(), torch.stack(lses)


def attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: torch.Tensor,
                       delta: torch.Tensor,
                       scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of one key set of softmax attention given its row statistics (FlashAttention-2's, Dao 2023 Alg. 2):
        p = exp(s q k^T - lse),  dv = p^T dout,  ds = p * (dout v^T - delta),  dq = s ds k,  dk = s ds^T q.
    dout: [B, Sq, H, Dv]; q: [B, Sq, H, D]; k, v: [B, Sk, H, D/Dv]; lse, delta: [B, H, Sq] fp32 (fp64 for fp64).
    lse = logsumexp_n(s q.k_n) and delta = rowsum(dout * out) of the set's normalised output out give the
    gradients of <dout, out>; a gradient dlse on lse is passed as delta - dlse. With the lse and delta of a
    larger key set (ring attention: the merged result of all blocks) the call is that key block's share:
    dq sums over blocks, dk/dv are the block's. Returns (dq, dk, dv) in q's, k's, v's dtypes, contiguous."""
    dt = torch.promote_types(q.dtype, torch.float32)
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qh, kh, vh, doh = (t.to(dt).transpose(1, 2) for t in (q, k, v, dout))                  # [B, H, S, D]
    p = torch.exp(torch.matmul(qh, kh.transpose(-1, -2)) * s - lse.to(dt)[..., None])     # [B, H, Sq, Sk]
    ds = p * (torch.matmul(doh, vh.transpose(-1, -2)) - delta.to(dt)[..., None])
    dq, dk = torch.matmul(ds, kh) * s, torch.matmul(ds.transpose(-1, -2), qh) * s
    dv = torch.matmul(p.transpose(-1, -2), doh)
    return tuple(g.transpose(1, 2).to(t.dtype).contiguous() for g, t in ((dq, q), (dk, k), (dv, v)))


def attention_delta(dout: torch.Tensor, out: torch.Tensor, q: torch.Tensor, k_img: torch.Tensor | None = None,
                    v_img: torch.Tensor | None = None, lse_img: torch.Tensor | None = None,
                    scale: float | None = None) -> torch.Tensor:
    """The delta of each key set of wan::attention's output out (FlashAttention-2's D): [S, B, H, Sq] fp32
    (fp64 for fp64). Without an image set (S = 1): rowsum(dout * out). With one (S = 2): out = out_text + out_img,
    delta_img = rowsum(dout * out_img) = rowsum(p_img * (dout v_img^T)), p_img = exp(s q k_img^T - lse_img),
    recomputed over the image keys, and delta_text = rowsum(dout * out) - delta_img."""
    dt = torch.promote_types(q.dtype, torch.float32)
    delta = (dout.to(dt) * out.to(dt)).sum(-1).transpose(1, 2)                              # [B, H, Sq]
    if k_img is None:
        return delta[None].contiguous()
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qh, kh, vh, doh = (t.to(dt).transpose(1, 2) for t in (q, k_img, v_img, dout))
    p = torch.exp(torch.matmul(qh, kh.transpose(-1, -2)) * s - lse_img.to(dt)[..., None])  # [B, H, Sq, Si]
    d_img = (torch.matmul(p, vh) * doh).sum(-1)
    return torch.stack((delta - d_img, d_img))
