"""wan::gated_residual_backward: gradients of gated_residual for y and gate (x's is the output gradient itself;
the backward behind the forward's `OpSpec.backward`). Kernels: wan_kernels/ref/modulate.py,
wan_kernels/triton/modulate.py, csrc/modulate/ (C++ CPU)."""

from __future__ import annotations

import torch

from wan_kernels import ref, routing
from wan_kernels._checks import check_bsc, check_modulation, shape_of
from wan_kernels._spec import OpSpec, register
from wan_kernels.ops.gated_residual import samples_gated_residual
from wan_kernels.triton import modulate as triton_modulate

__all__ = ["gated_residual_backward"]


def check_gated_residual_backward(grad_out, y, gate) -> None:
    op = "gated_residual_backward"
    check_bsc(op, "y", y)
    check_bsc(op, "grad_out", grad_out)
    if grad_out.shape != y.shape:
        raise ValueError(f"{op}: grad_out must have y's shape {shape_of(y)}, got {shape_of(grad_out)}")
    check_modulation(op, "gate", gate, y)


def fake_gated_residual_backward(grad_out, y, gate):
    return torch.empty_like(y, memory_format=torch.contiguous_format), gate.new_empty(gate.shape)


def samples_gated_residual_backward(s):
    x, y, gate = samples_gated_residual(s)
    return s.randn(*x.shape), y, gate


SPEC = register(OpSpec(
    name="gated_residual_backward",
    schema="gated_residual_backward(Tensor grad_out, Tensor y, Tensor gate) -> (Tensor grad_y, Tensor grad_gate)",
    check=check_gated_residual_backward, ref=ref.gated_residual_backward, samples=samples_gated_residual_backward,
    fake=fake_gated_residual_backward,
    differentiable=("grad_out", "y", "gate"),  # double backward: the reference's vector-Jacobian product
    triton=triton_modulate.gated_residual_backward,
))


def gated_residual_backward(grad_out: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, *,
                            impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `gated_residual` (x + y * gate) for y and gate, for output gradient grad_out [B, S, C].
    Returns grad_y = grad_out * gate [B, S, C] contiguous in y's dtype, grad_gate = sum grad_out * y fp32 in
    gate's shape (summed over the axes it broadcasts along; deterministic). x's gradient is grad_out."""
    return routing.resolve("gated_residual_backward", impl, y.device)(grad_out, y, gate)
