"""References of the DiT block's elementwise glue (diffusers' Wan block semantics, REFERENCE §4)."""

import torch
import torch.nn.functional as F


def layer_norm_modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float) -> torch.Tensor:
    """(LayerNorm_fp32(x), no affine) * (1 + scale) + shift, rounded once to x's dtype.
    x: [B, S, C]; scale, shift: fp32 [B, 1|S, C]."""
    n = F.layer_norm(x.float(), (x.shape[-1],), None, None, eps)
    return (n * (1 + scale) + shift).to(x.dtype)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """(x.float() + y.float() * gate), rounded once to x's dtype. x, y: [B, S, C]; gate: fp32 [B, 1|S, C]."""
    return (x.float() + y * gate).to(x.dtype)  # y * gate promotes y to fp32 exactly (no separate copy)
