"""wan::qkv_rope: ONE GEMM over the concatenated [3C, C] QKV weight, then qk_norm_rope. A composite: its one
composition (`gemm_then`) serves the dispatcher op and every named backend; wan_kernels/ref/qkv_rope.py
is the reference."""

from __future__ import annotations

import torch

from wan_kernels import ref, routing
from wan_kernels._checks import check_float, check_norm_rope, same_device, shape_of
from wan_kernels._spec import OpSpec, register
from wan_kernels.ops.qk_norm_rope import samples_qk_norm_rope

__all__ = ["qkv_rope"]


def check_qkv_rope(x, w_qkv, b_qkv, norm_q_weight, norm_k_weight, rope_cos, rope_sin, num_heads, eps=None, *,
                   op: str = "qkv_rope") -> None:
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be [B, S, C], got shape {shape_of(x)}")
    check_float(op, "x", x)
    if w_qkv.dim() != 2 or w_qkv.shape[1] != x.shape[2] or w_qkv.shape[0] % 3:
        raise ValueError(f"{op}: w_qkv must be [3*C, {x.shape[2]}] for x of shape {shape_of(x)}, "
                         f"got shape {shape_of(w_qkv)}")
    if x.dtype != w_qkv.dtype:
        raise ValueError(f"{op}: x ({x.dtype}) and w_qkv ({w_qkv.dtype}) must have one dtype")
    if b_qkv is not None:
        if b_qkv.shape != (w_qkv.shape[0],):
            raise ValueError(f"{op}: b_qkv must be [{w_qkv.shape[0]}] or None, got shape {shape_of(b_qkv)}")
        if b_qkv.dtype != x.dtype:
            raise ValueError(f"{op}: b_qkv must have x's dtype {x.dtype}, got {b_qkv.dtype}")
    check_norm_rope(op, f"w_qkv shape {shape_of(w_qkv)}", x.shape[1], w_qkv.shape[0], norm_q_weight, norm_k_weight,
                     rope_cos, rope_sin, num_heads)
    same_device(op, x, w_qkv=w_qkv, b_qkv=b_qkv, norm_q_weight=norm_q_weight, norm_k_weight=norm_k_weight,
                 rope_cos=rope_cos, rope_sin=rope_sin)


def gemm_then(norm_rope: str):
    """The composition of a one-GEMM QKV op: compose(part) runs ONE GEMM over the concatenated [3C, C] weight, then
    part(norm_rope) (the dispatcher op or one named backend of it) on its output. Serves qkv_rope (over
    qk_norm_rope) and qkv_rope_int8 (over qk_norm_rope_int8)."""

    def compose(part):
        norm_rope_op = part(norm_rope)

        def gemm_norm_rope(x, w_qkv, b_qkv, norm_q_weight, norm_k_weight, rope_cos, rope_sin, num_heads, eps):
            qkv = torch.nn.functional.linear(x, w_qkv, b_qkv)
            return norm_rope_op(qkv, norm_q_weight, norm_k_weight, rope_cos, rope_sin, num_heads, eps)

        return gemm_norm_rope

    return compose


def samples_qkv_rope(s):
    qkv, *common = samples_qk_norm_rope(s)
    C = qkv.shape[2] // 3
    return (s.randn(*qkv.shape[:2], C), s.randn(3 * C, C, scale=0.1), s.randn(3 * C), *common)


SPEC = register(OpSpec(
    name="qkv_rope",
    schema="qkv_rope(Tensor x, Tensor w_qkv, Tensor? b_qkv, Tensor norm_q_weight, Tensor norm_k_weight, "
           "Tensor rope_cos, Tensor rope_sin, int num_heads, float eps) -> (Tensor q, Tensor k, Tensor v)",
    check=check_qkv_rope, ref=ref.qkv_rope, samples=samples_qkv_rope, compose=gemm_then("qk_norm_rope"),
    parts=("qk_norm_rope",),
    differentiable=("x", "w_qkv", "b_qkv", "norm_q_weight", "norm_k_weight"),
))


def qkv_rope(x: torch.Tensor, w_qkv: torch.Tensor, b_qkv: torch.Tensor | None, norm_q_weight: torch.Tensor,
             norm_k_weight: torch.Tensor, rope_cos: torch.Tensor, rope_sin: torch.Tensor, num_heads: int,
             eps: float = 1e-6, *, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ONE GEMM x @ w_qkv^T + b_qkv over the concatenated [3C, C] weight, then `qk_norm_rope`.

    x: [B, S, C]; w_qkv: [3*C, C] (rows: to_q | to_k | to_v); b_qkv: [3*C] in x's dtype, or None.
    """
    return routing.resolve("qkv_rope", impl, x.device)(x, w_qkv, b_qkv, norm_q_weight, norm_k_weight, rope_cos,
                                                          rope_sin, num_heads, eps)
