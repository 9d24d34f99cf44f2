"""wan::layer_norm_modulate: adaLN, (LayerNorm_fp32(x) * (1 + scale) + shift) rounded once.
Kernels: wan_kernels/ref/modulate.py, wan_kernels/triton/modulate.py, csrc/modulate/ (C++ CPU)."""

from __future__ import annotations

import torch

from wan_kernels import ref, routing
from wan_kernels._checks import check_bsc, check_modulation
from wan_kernels._spec import OpSpec, register
from wan_kernels.triton import modulate as triton_modulate

__all__ = ["layer_norm_modulate"]


def check_layer_norm_modulate(x, scale, shift, eps=None) -> None:
    op = "layer_norm_modulate"
    check_bsc(op, "x", x)
    check_modulation(op, "scale", scale, x)
    check_modulation(op, "shift", shift, x)


def fake_like_x(x, *args):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def samples_layer_norm_modulate(s):
    B, S, C = 2, 17, 128
    return s.randn(B, S, C), s.randn(B, 1, C, dtype=torch.float32), s.randn(B, S, C, dtype=torch.float32), 1e-6


def backward_layer_norm_modulate(inputs, grads, needs_input_grad):
    """OpSpec.backward: wan::layer_norm_modulate_backward."""
    x, scale, shift, eps = inputs
    got = torch.ops.wan.layer_norm_modulate_backward(grads[0], x, scale, shift, eps)
    return tuple(g if need else None for g, need in zip(got, needs_input_grad)) + (None,)


SPEC = register(OpSpec(
    name="layer_norm_modulate",
    schema="layer_norm_modulate(Tensor x, Tensor scale, Tensor shift, float eps) -> Tensor",
    check=check_layer_norm_modulate, ref=ref.layer_norm_modulate, samples=samples_layer_norm_modulate,
    fake=fake_like_x, differentiable=("x", "scale", "shift"),
    backward=backward_layer_norm_modulate, triton=triton_modulate.layer_norm_modulate,
))


def layer_norm_modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float = 1e-6, *,
                        impl: str = "auto") -> torch.Tensor:
    """adaLN: (LayerNorm_fp32(x) * (1 + scale) + shift) rounded once to x's dtype.
    x: [B, S, C]; scale, shift: fp32 [B, 1|S, C] (any strides). An empty x (B, S or C = 0; torch's layer_norm
    over zero channels too) gives an empty output on every backend."""
    return routing.resolve("layer_norm_modulate", impl, x.device)(x, scale, shift, eps)
