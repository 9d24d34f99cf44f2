"""References of the DiT block's elementwise glue (diffusers' Wan block semantics, REFERENCE §4)."""

import torch
import torch.nn.functional as F

__all__ = ["gated_residual", "gated_residual_backward", "layer_norm_modulate", "layer_norm_modulate_backward"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # fp32 math; fp64 stays fp64


def _row_scale(x: torch.Tensor) -> torch.Tensor:
    """[..., 1]: the power of two 2^k <= 1 that brings a row's max |x| below 2^40 (1 for every ordinary row, for
    rows holding inf/NaN, whose frexp exponent is 0, and for rows of no channels, which have no inf norm)."""
    if x.shape[-1] == 0:  # C = 0: an empty output, as torch's layer_norm and the kernels give
        return x.new_ones(*x.shape[:-1], 1)
    amax = torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True)               # [..., 1]
    return torch.exp2((40 - torch.frexp(amax).exponent).clamp(max=0))                     # 2^(int32 <= 0)


def _layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim without affine, also for rows whose squared deviations overflow fp32
    (max |x| beyond ~1e17 at Wan's widths; torch's fp32 layer_norm then returns wrong finite values or NaN).
    A row with max |x| >= 2^40 is scaled by an exact power of two 2^k that brings its max into [2^39, 2^40):
    LayerNorm(x, eps) = LayerNorm(x * 2^k, eps * 4^k), and eps * 4^k vs eps is invisible next to such a
    row's variance. Every other row is multiplied by 2^0 = 1 (bit-identical to plain layer_norm), and rows
    holding inf/NaN stay NaN (frexp gives them exponent 0), as in torch. Branch-free in the data (the only
    branch is on C = 0), so meta/fake tensors and traces see the same ops (wan_model/cost.py counts them)."""
    return F.layer_norm(x * _row_scale(x), (x.shape[-1],), None, None, eps)


def layer_norm_modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float) -> torch.Tensor:
    """(LayerNorm_fp32(x), no affine) * (1 + scale) + shift, rounded once to x's dtype.
    x: [B, S, C]; scale, shift: fp32 [B, 1|S, C]."""
    n = _layer_norm(x.to(_compute_dtype(x.dtype)), eps)
    return (n * (1 + scale) + shift).to(x.dtype)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """(x.float() + y.float() * gate), rounded once to x's dtype. x, y: [B, S, C]; gate: fp32 [B, 1|S, C]."""
    return (x.to(_compute_dtype(x.dtype)) + y * gate).to(x.dtype)  # y * gate promotes y to fp32 exactly


def _sum_to(t: torch.Tensor, shape) -> torch.Tensor:
    """t [B, S, C] summed over the dims where `shape` broadcasts (size 1): the gradient of a [B|1, S|1, C] operand."""
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and t.shape[i] != 1)
    return t.sum(dims, keepdim=True) if dims else t


def layer_norm_modulate_backward(grad_out: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                                 eps: float):
    """Gradients of layer_norm_modulate: grad_out [B, S, C] -> grad_x [B, S, C] in x's dtype, grad_scale and
    grad_shift fp32 in scale's / shift's shapes (summed over the token / batch axes they broadcast along).
    With n = LayerNorm(x), gn = grad_out * (1 + scale):
        grad_x = rstd * (gn - mean(gn) - n * mean(gn * n)),  grad_scale = sum grad_out * n,  grad_shift = sum grad_out.
    Huge rows are scaled by the same power of two as in `_layer_norm` (rstd of x = 2^k * rstd of x * 2^k)."""
    dt = _compute_dtype(x.dtype)
    xf, g = x.to(dt), grad_out.to(dt)
    p = _row_scale(xf)                                                         # [..., 1], 1 but for huge rows
    xs = xf * p
    d = xs - xs.mean(-1, keepdim=True)
    rstd = torch.rsqrt((d * d).mean(-1, keepdim=True) + eps)
    n = d * rstd
    gn = g * (1 + scale)
    dx = (rstd * p) * (gn - gn.mean(-1, keepdim=True) - n * (gn * n).mean(-1, keepdim=True))
    return (dx.to(x.dtype), _sum_to(g * n, scale.shape).to(scale.dtype),
            _sum_to(g, shift.shape).to(shift.dtype, copy=True))  # a copy: never grad_out itself


def gated_residual_backward(grad_out: torch.Tensor, y: torch.Tensor, gate: torch.Tensor):
    """Gradients of gated_residual for y and gate (x's is grad_out itself): grad_out [B, S, C] ->
    grad_y = grad_out * gate in y's dtype, grad_gate = sum grad_out * y, fp32 in gate's shape (summed where it
    broadcasts)."""
    g = grad_out.to(_compute_dtype(grad_out.dtype))
    return (g * gate).to(y.dtype), _sum_to(g * y, gate.shape).to(gate.dtype)
