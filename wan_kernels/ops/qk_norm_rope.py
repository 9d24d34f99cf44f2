"""wan::qk_norm_rope: RMSNorm of q and k over all C channels (across heads), then 3D RoPE on interleaved
pairs. Kernels: wan_kernels/ref/qk_norm_rope.py, wan_kernels/triton/qk_norm_rope.py, csrc/qk_norm_rope/ (C++ CPU)."""

from __future__ import annotations

import torch

from wan_kernels import ref, routing
from wan_kernels._checks import check_float, check_norm_rope, same_device, shape_of
from wan_kernels._spec import OpSpec, register
from wan_kernels.triton import qk_norm_rope as triton_qk_norm_rope

__all__ = ["qk_norm_rope"]


def check_qk_norm_rope(qkv, norm_q_weight, norm_k_weight, rope_cos, rope_sin, num_heads, eps=None, *,
                       op: str = "qk_norm_rope") -> None:
    if qkv.dim() != 3 or qkv.shape[2] % 3:
        raise ValueError(f"{op}: qkv must be [B, S, 3*C], got shape {shape_of(qkv)}")
    check_float(op, "qkv", qkv)
    check_norm_rope(op, f"qkv shape {shape_of(qkv)}", qkv.shape[1], qkv.shape[2], norm_q_weight, norm_k_weight,
                     rope_cos, rope_sin, num_heads)
    same_device(op, qkv, norm_q_weight=norm_q_weight, norm_k_weight=norm_k_weight, rope_cos=rope_cos,
                 rope_sin=rope_sin)


def fake_qk_norm_rope(qkv, norm_q_weight, norm_k_weight, rope_cos, rope_sin, num_heads, eps):
    B, S, C3 = qkv.shape
    shape = (B, S, num_heads, C3 // 3 // num_heads)
    return qkv.new_empty(shape), qkv.new_empty(shape), qkv.new_empty(shape)


def samples_qk_norm_rope(s):
    B, S, H, D = 2, 17, 2, 64
    C = H * D
    return (s.randn(B, S, 3 * C), s.randn(C) + 1, s.randn(C) + 1, *s.rope(S, D), H, 1e-6)


def backward_qk_norm_rope(inputs, grads, needs_input_grad):
    """OpSpec.backward: wan::qk_norm_rope_backward (an output without a gradient counts as zeros)."""
    qkv, wq, wk, cos, sin, num_heads, eps = inputs
    like = fake_qk_norm_rope(qkv, wq, wk, cos, sin, num_heads, eps)[0]
    grads = [torch.zeros_like(like) if g is None else g for g in grads]
    dqkv, dwq, dwk = torch.ops.wan.qk_norm_rope_backward(*grads, qkv, wq, wk, cos, sin, num_heads, eps)
    return tuple(g if need else None for g, need in zip((dqkv, dwq, dwk), needs_input_grad)) + (None,) * 4


SPEC = register(OpSpec(
    name="qk_norm_rope",
    schema="qk_norm_rope(Tensor qkv, Tensor norm_q_weight, Tensor norm_k_weight, Tensor rope_cos, Tensor rope_sin, "
           "int num_heads, float eps) -> (Tensor q, Tensor k, Tensor v)",
    check=check_qk_norm_rope, ref=ref.qk_norm_rope, samples=samples_qk_norm_rope, fake=fake_qk_norm_rope,
    differentiable=("qkv", "norm_q_weight", "norm_k_weight"), backward=backward_qk_norm_rope,
    triton=triton_qk_norm_rope.qk_norm_rope,
    flops=lambda *shapes: 0,  # RMSNorm + RoPE: no matrix product (registered so a count says so explicitly)
    constant=("norm_q_weight", "norm_k_weight", "rope_cos", "rope_sin"), weights=("norm_q_weight", "norm_k_weight"),
))


def qk_norm_rope(qkv: torch.Tensor, norm_q_weight: torch.Tensor, norm_k_weight: torch.Tensor,
                 rope_cos: torch.Tensor, rope_sin: torch.Tensor, num_heads: int, eps: float = 1e-6, *,
                 impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RMSNorm of q and k over all C channels (across heads), then 3D RoPE on interleaved pairs.

    qkv: [B, S, 3*C] (q | k | v, output of the fused QKV GEMM), fp32/fp16/bf16, any strides.
    norm_q_weight, norm_k_weight: [C]. rope_cos, rope_sin: [S, D/2] float32, one angle per pair.
    Returns q, k, v: [B, S, H, D] contiguous, in qkv's dtype (fp32 math, one rounding).
    """
    return routing.resolve("qk_norm_rope", impl, qkv.device)(qkv, norm_q_weight, norm_k_weight, rope_cos, rope_sin,
                                                              num_heads, eps)
