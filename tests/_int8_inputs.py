"""Inputs of the 8-bit attention tests: a Wan-like generator and comfy-kitchen's two int8-attention recipes."""


import torch


def _rope(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of each head by pos * 10000^(-2i/D), positions shuffled (3-D grids)."""
    B, S, H, D = x.shape
    pos = torch.randperm(S, generator=g).float()[:, None]
    ang = pos * torch.pow(10000.0, -torch.arange(0, D, 2).float() / D)[None]              # [S, D/2]
    c, s = torch.cos(ang)[None, :, None], torch.sin(ang)[None, :, None]
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack((a * c - b * s, a * s + b * c), -1).reshape(B, S, H, D)


def _rms_tokens(B, S, H, D, g, gain):
    """Per-token RMSNorm over C = H * D of Gaussian activations, times heavy-tailed channel gains."""
    x = torch.randn(B, S, H * D, generator=g)
    x = x / x.pow(2).mean(-1, keepdim=True).sqrt()
    return (x * gain).reshape(B, S, H, D)


def wan_like(B, Sq, Sk, H, D, Si=0, seed=0, dtype=torch.float16):
    """q, k, v, k_img, v_img (None without an image set) shaped like Wan's attention inputs: RMS-normed tokens
    with log-normal channel gains; keys get a bias shared by all tokens BEFORE a RoPE-like rotation (so smoothing
    removes only part of it) and two sink-like tokens x6; v has per-channel offsets and two large channels
    (|v| up to ~1e3)."""
    g = torch.Generator().manual_seed(seed)
    C = H * D
    gq, gk = torch.exp(0.7 * torch.randn(C, generator=g)), torch.exp(0.7 * torch.randn(C, generator=g))
    q = _rope(_rms_tokens(B, Sq, H, D, g, gq), g)

    def keys(S):
        k = _rms_tokens(B, S, H, D, g, gk) + 2.0 * torch.randn(C, generator=g).reshape(H, D)
        k = _rope(k, g)
        k[:, torch.randint(0, S, (2,), generator=g)] *= 6.0
        return k

    def values(S):
        v = torch.randn(B, S, H, D, generator=g) * torch.exp(0.5 * torch.randn(H, D, generator=g))
        v = v + 3.0 * torch.randn(H, D, generator=g)
        v[..., :2] *= 250.0
        return v

    k, v = keys(Sk), values(Sk)
    ki, vi = (keys(Si), values(Si)) if Si else (None, None)
    return tuple(None if t is None else t.to(dtype) for t in (q, k, v, ki, vi))


def comfy_bias(B, Sq, Sk, H, D, seed=0, dtype=torch.float16):
    """comfy-kitchen's first recipe: Gaussian q, k, v; k plus a per-head vector of RMS 40 shared by all tokens."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, S, H, D, generator=g) for S in (Sq, Sk, Sk))
    k = k + 40.0 * torch.randn(1, 1, H, D, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype), None, None


def comfy_channel(B, Sq, Sk, H, D, seed=0, dtype=torch.float16):
    """comfy-kitchen's second recipe: channel 0 of q and k x12, then each token RMS-normalised (per head)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, S, H, D, generator=g) for S in (Sq, Sk, Sk))
    for t in (q, k):
        t[..., 0] *= 12.0
    q, k = (t / t.pow(2).mean(-1, keepdim=True).sqrt() for t in (q, k))
    return q.to(dtype), k.to(dtype), v.to(dtype), None, None


def stats_per_head(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(worst-head NRMSE = ||got - want|| / ||want||, worst-head cosine) over [B, S, H, D] outputs."""
    d, w = got.double(), want.double()
    err = (d - w).pow(2).sum((1, 3)).sqrt() / w.pow(2).sum((1, 3)).sqrt()                  # [B, H]
    cos = (d * w).sum((1, 3)) / (d.pow(2).sum((1, 3)).sqrt() * w.pow(2).sum((1, 3)).sqrt())
    return err.max().item(), cos.min().item()


