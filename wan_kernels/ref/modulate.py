"""References of the DiT block's elementwise glue (diffusers' Wan block semantics, REFERENCE §4)."""

import torch
import torch.nn.functional as F


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # fp32 math; fp64 stays fp64


def _layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim without affine, also for rows whose squared deviations overflow fp32
    (max |x| beyond ~1e17 at Wan's widths; torch's fp32 layer_norm then returns wrong finite values or NaN).
    A row with max |x| >= 2^40 is scaled by an exact power of two 2^k that brings its max into [2^39, 2^40):
    LayerNorm(x, eps) = LayerNorm(x * 2^k, eps * 4^k), and eps * 4^k vs eps is invisible next to such a
    row's variance. Every other row is multiplied by 2^0 = 1 (bit-identical to plain layer_norm), and rows
    holding inf/NaN stay NaN (frexp gives them exponent 0), as in torch. Branch-free, so meta/fake tensors
    and traces see the same ops (wan_model/cost.py counts them)."""
    amax = torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True)               # [..., 1]
    k = (40 - torch.frexp(amax).exponent).clamp(max=0)                                    # int32, <= 0
    return F.layer_norm(x * torch.exp2(k), (x.shape[-1],), None, None, eps)


def layer_norm_modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float) -> torch.Tensor:
    """(LayerNorm_fp32(x), no affine) * (1 + scale) + shift, rounded once to x's dtype.
    x: [B, S, C]; scale, shift: fp32 [B, 1|S, C]."""
    n = _layer_norm(x.to(_compute_dtype(x.dtype)), eps)
    return (n * (1 + scale) + shift).to(x.dtype)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """(x.float() + y.float() * gate), rounded once to x's dtype. x, y: [B, S, C]; gate: fp32 [B, 1|S, C]."""
    return (x.to(_compute_dtype(x.dtype)) + y * gate).to(x.dtype)  # y * gate promotes y to fp32 exactly
