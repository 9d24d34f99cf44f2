"""wan::qk_norm_rope_backward: gradients of qk_norm_rope for qkv and both norm weights (the backward behind the
forward's `OpSpec.backward`). Kernels: wan_kernels/ref/qk_norm_rope.py, wan_kernels/triton/qk_norm_rope.py,
csrc/qk_norm_rope/ (C++ CPU)."""

from __future__ import annotations

import torch

from wan_kernels import ref, routing
from wan_kernels._checks import same_device, shape_of
from wan_kernels._spec import OpSpec, register
from wan_kernels.ops.qk_norm_rope import check_qk_norm_rope, samples_qk_norm_rope
from wan_kernels.triton import qk_norm_rope as triton_qk_norm_rope

__all__ = ["qk_norm_rope_backward"]


def check_qk_norm_rope_backward(grad_q, grad_k, grad_v, qkv, norm_q_weight, norm_k_weight, rope_cos, rope_sin,
                                num_heads, eps=None) -> None:
    op = "qk_norm_rope_backward"
    check_qk_norm_rope(qkv, norm_q_weight, norm_k_weight, rope_cos, rope_sin, num_heads)
    B, S, C3 = qkv.shape
    shape = (B, S, num_heads, C3 // 3 // num_heads)
    for name, g in (("grad_q", grad_q), ("grad_k", grad_k), ("grad_v", grad_v)):
        if tuple(g.shape) != shape:
            raise ValueError(f"{op}: {name} must be [B, S, H, D] = {list(shape)} for qkv of shape {shape_of(qkv)}, "
                             f"got shape {shape_of(g)}")
        if g.dtype != qkv.dtype:
            raise ValueError(f"{op}: {name} must have qkv's dtype {qkv.dtype}, got {g.dtype}")
    same_device(op, qkv, grad_q=grad_q, grad_k=grad_k, grad_v=grad_v)


def fake_qk_norm_rope_backward(grad_q, grad_k, grad_v, qkv, norm_q_weight, norm_k_weight, *args):
    return (qkv.new_empty(qkv.shape), norm_q_weight.new_empty(norm_q_weight.shape),
            norm_k_weight.new_empty(norm_k_weight.shape))


def samples_qk_norm_rope_backward(s):
    args = samples_qk_norm_rope(s)
    B, S, C3 = args[0].shape
    H = args[5]
    return (*(s.randn(B, S, H, C3 // 3 // H) for _ in range(3)), *args)


SPEC = register(OpSpec(
    name="qk_norm_rope_backward",
    schema="qk_norm_rope_backward(Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor qkv, Tensor norm_q_weight, "
           "Tensor norm_k_weight, Tensor rope_cos, Tensor rope_sin, int num_heads, float eps) -> "
           "(Tensor grad_qkv, Tensor grad_norm_q_weight, Tensor grad_norm_k_weight)",
    check=check_qk_norm_rope_backward, ref=ref.qk_norm_rope_backward, samples=samples_qk_norm_rope_backward,
    fake=fake_qk_norm_rope_backward,
    # double backward: the reference's vector-Jacobian product
    differentiable=("grad_q", "grad_k", "grad_v", "qkv", "norm_q_weight", "norm_k_weight"),
    triton=triton_qk_norm_rope.qk_norm_rope_backward,
    constant=("norm_q_weight", "norm_k_weight", "rope_cos", "rope_sin"), weights=("norm_q_weight", "norm_k_weight"),
))


def qk_norm_rope_backward(grad_q: torch.Tensor, grad_k: torch.Tensor, grad_v: torch.Tensor, qkv: torch.Tensor,
                          norm_q_weight: torch.Tensor, norm_k_weight: torch.Tensor, rope_cos: torch.Tensor,
                          rope_sin: torch.Tensor, num_heads: int, eps: float = 1e-6, *,
                          impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `qk_norm_rope` at its inputs for output gradients grad_q, grad_k, grad_v [B, S, H, D] (qkv's
    dtype, any strides). Returns grad_qkv [B, S, 3C] contiguous in qkv's dtype and grad_norm_q_weight,
    grad_norm_k_weight [C] in the weights' dtypes (fp32 sums over all rows, deterministic); rstd is recomputed
    from qkv."""
    return routing.resolve("qk_norm_rope_backward", impl, qkv.device)(
        grad_q, grad_k, grad_v, qkv, norm_q_weight, norm_k_weight, rope_cos, rope_sin, num_heads, eps)
