"""wan::layer_norm_modulate_backward: gradients of layer_norm_modulate for x, scale and shift (the backward behind
the forward's `OpSpec.backward`). Kernels: wan_kernels/ref/modulate.py, wan_kernels/triton/modulate.py,
csrc/modulate/ (C++ CPU)."""

from __future__ import annotations

import torch

from wan_kernels import ref, routing
from wan_kernels._checks import check_bsc, same_device, shape_of
from wan_kernels._spec import OpSpec, register
from wan_kernels.ops.layer_norm_modulate import check_layer_norm_modulate, samples_layer_norm_modulate
from wan_kernels.triton import modulate as triton_modulate

__all__ = ["layer_norm_modulate_backward"]


def check_grad_out(op: str, grad_out, x) -> None:
    check_bsc(op, "grad_out", grad_out)
    if grad_out.shape != x.shape or grad_out.dtype != x.dtype:
        raise ValueError(f"{op}: grad_out must have x's shape {shape_of(x)} and dtype {x.dtype}, got shape "
                         f"{shape_of(grad_out)} dtype {grad_out.dtype}")
    same_device(op, x, grad_out=grad_out)


def check_layer_norm_modulate_backward(grad_out, x, scale, shift, eps=None) -> None:
    check_layer_norm_modulate(x, scale, shift)
    check_grad_out("layer_norm_modulate_backward", grad_out, x)


def fake_layer_norm_modulate_backward(grad_out, x, scale, shift, eps):
    return (torch.empty_like(x, memory_format=torch.contiguous_format), scale.new_empty(scale.shape),
            shift.new_empty(shift.shape))


def samples_layer_norm_modulate_backward(s):
    x, scale, shift, eps = samples_layer_norm_modulate(s)
    return s.randn(*x.shape), x, scale, shift, eps


SPEC = register(OpSpec(
    name="layer_norm_modulate_backward",
    schema="layer_norm_modulate_backward(Tensor grad_out, Tensor x, Tensor scale, Tensor shift, float eps) -> "
           "(Tensor grad_x, Tensor grad_scale, Tensor grad_shift)",
    check=check_layer_norm_modulate_backward, ref=ref.layer_norm_modulate_backward,
    samples=samples_layer_norm_modulate_backward, fake=fake_layer_norm_modulate_backward,
    differentiable=("grad_out", "x", "scale", "shift"),  # double backward: the reference's vector-Jacobian product
    triton=triton_modulate.layer_norm_modulate_backward,
))


def layer_norm_modulate_backward(grad_out: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                                 eps: float = 1e-6, *,
                                 impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `layer_norm_modulate` for output gradient grad_out [B, S, C] (x's dtype). Returns grad_x
    [B, S, C] contiguous in x's dtype, grad_scale / grad_shift fp32 in scale's / shift's shapes (summed over the
    axes they broadcast along: [B, 1, C] sums the tokens; fp32, deterministic)."""
    return routing.resolve("layer_norm_modulate_backward", impl, x.device)(grad_out, x, scale, shift, eps)
