"""wan::gated_residual: x + y * gate in fp32, rounded once. Kernels: wan_kernels/ref/modulate.py,
wan_kernels/triton/modulate.py, csrc/modulate/ (C++ CPU)."""

from __future__ import annotations

import torch

from wan_kernels import ref, routing
from wan_kernels._checks import check_bsc, check_modulation, shape_of
from wan_kernels._spec import OpSpec, register
from wan_kernels.ops.layer_norm_modulate import fake_like_x
from wan_kernels.triton import modulate as triton_modulate

__all__ = ["gated_residual"]


def check_gated_residual(x, y, gate) -> None:
    op = "gated_residual"
    check_bsc(op, "x", x)
    check_bsc(op, "y", y)
    if y.shape != x.shape:
        raise ValueError(f"{op}: y must have x's shape {shape_of(x)}, got {shape_of(y)}")
    check_modulation(op, "gate", gate, x)


def samples_gated_residual(s):
    B, S, C = 2, 17, 128
    return s.randn(B, S, C), s.randn(B, S, C), s.randn(B, 1, C, dtype=torch.float32)


def backward_gated_residual(inputs, grads, needs_input_grad):
    """OpSpec.backward: x's gradient is the output's, y's and gate's from wan::gated_residual_backward."""
    x, y, gate = inputs
    dy, dgate = torch.ops.wan.gated_residual_backward(grads[0], y, gate) if any(needs_input_grad[1:]) else (None,) * 2
    return (grads[0] if needs_input_grad[0] else None, dy if needs_input_grad[1] else None,
            dgate if needs_input_grad[2] else None)


SPEC = register(OpSpec(
    name="gated_residual",
    schema="gated_residual(Tensor x, Tensor y, Tensor gate) -> Tensor",
    check=check_gated_residual, ref=ref.gated_residual, samples=samples_gated_residual, fake=fake_like_x,
    differentiable=("x", "y", "gate"),
    backward=backward_gated_residual, triton=triton_modulate.gated_residual,
))


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """x + y * gate in fp32, rounded once to x's dtype. x, y: [B, S, C]; gate: fp32 [B, 1|S, C]."""
    return routing.resolve("gated_residual", impl, x.device)(x, y, gate)
