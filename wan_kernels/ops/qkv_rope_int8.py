"""wan::qkv_rope_int8: ONE GEMM over the concatenated [3C, C] QKV weight, then qk_norm_rope_int8 (q quantized for
wan::attention_int8_q8). A composite, as wan::qkv_rope; wan_kernels/ref/qkv_rope.py is the reference."""

from __future__ import annotations

import functools

import torch

from wan_kernels import ref, routing
from wan_kernels._spec import OpSpec, register
from wan_kernels.ops.qk_norm_rope_int8 import exact_samples, signs
from wan_kernels.ops.qkv_rope import check_qkv_rope, gemm_then

__all__ = ["qkv_rope_int8"]


def samples_qkv_rope_int8(s):
    """`exact_samples` through the GEMM: x +-1 and w_qkv three signed permutation matrices (one nonzero +-1 per
    row), so qkv = x w_qkv^T is +-1 exactly in every backend (TF32 included), and so are q's codes."""
    qkv, *common = exact_samples(s)
    B, S, C3 = qkv.shape
    C = C3 // 3
    x = qkv[..., :C]
    perm = torch.cat([torch.argsort(s.randn(C, dtype=torch.float32).cpu()) for _ in range(3)])
    w = torch.zeros(C3, C, dtype=qkv.dtype, device=qkv.device)
    w[torch.arange(C3, device=qkv.device), perm.to(qkv.device)] = signs(s, C3)
    return (x.contiguous(), w, torch.zeros(C3, dtype=qkv.dtype, device=qkv.device), *common)


SPEC = register(OpSpec(
    name="qkv_rope_int8",
    schema="qkv_rope_int8(Tensor x, Tensor w_qkv, Tensor? b_qkv, Tensor norm_q_weight, Tensor norm_k_weight, "
           "Tensor rope_cos, Tensor rope_sin, int num_heads, float eps) -> (Tensor q8, Tensor q_scale, Tensor k, "
           "Tensor v)",
    check=functools.partial(check_qkv_rope, op="qkv_rope_int8"), ref=ref.qkv_rope_int8, samples=samples_qkv_rope_int8,
    compose=gemm_then("qk_norm_rope_int8"), parts=("qk_norm_rope_int8",), training_op="qkv_rope", cpp=False,
))


def qkv_rope_int8(x: torch.Tensor, w_qkv: torch.Tensor, b_qkv: torch.Tensor | None, norm_q_weight: torch.Tensor,
                  norm_k_weight: torch.Tensor, rope_cos: torch.Tensor, rope_sin: torch.Tensor, num_heads: int,
                  eps: float = 1e-6, *, impl: str = "auto"
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ONE GEMM x @ w_qkv^T + b_qkv, then `qk_norm_rope_int8`: (q8 int8 [B, S, H, D], q_scale float32 [B, H, S],
    k, v [B, S, H, D]) for `attention_int8_q8`. Arguments as `qkv_rope`. Inference only."""
    return routing.resolve("qkv_rope_int8", impl, x.device)(x, w_qkv, b_qkv, norm_q_weight, norm_k_weight,
                                                               rope_cos, rope_sin, num_heads, eps)
