"""wan::qk_norm_rope_int8: `qk_norm_rope` with q quantized in the same kernel for 8-bit attention
(wan::attention_int8_q8): the normalised, rotated q sits in registers, so its per-(token, head) INT8 codes and scale
are written there instead of q itself, and the attention's quantizer does not read q back. k and v are returned as
`qk_norm_rope` returns them (K's smoothing needs its mean over all tokens: a pass of its own). Inference only.
Kernels: wan_kernels/ref/qk_norm_rope.py, wan_kernels/triton/qk_norm_rope.py (QUANT_Q)."""

from __future__ import annotations

import functools

import torch

from wan_kernels import ref, routing
from wan_kernels._spec import OpSpec, register
from wan_kernels.ops.qk_norm_rope import check_qk_norm_rope
from wan_kernels.triton import qk_norm_rope as triton_qk_norm_rope

__all__ = ["qk_norm_rope_int8"]


def fake_qk_norm_rope_int8(qkv, norm_q_weight, norm_k_weight, rope_cos, rope_sin, num_heads, eps):
    B, S, C3 = qkv.shape
    shape = (B, S, num_heads, C3 // 3 // num_heads)
    return (qkv.new_empty(shape, dtype=torch.int8), qkv.new_empty((B, num_heads, S), dtype=torch.float32),
            qkv.new_empty(shape), qkv.new_empty(shape))


def signs(s, *shape) -> torch.Tensor:
    """+-1 of the Sampler's dtype and device, drawn from `s`."""
    x = s.randn(*shape)
    return torch.sign(x) + (x == 0).to(x.dtype)


def exact_samples(s, B: int = 2, S: int = 17, H: int = 2, D: int = 64):
    """(qkv, norm_q_weight, norm_k_weight, rope_cos, rope_sin, num_heads, eps) on which every backend computes q
    exactly, so that its INT8 codes are equal everywhere (on random inputs a q one ulp apart flips a code that sits
    at a rounding boundary): qkv entries +-1 and eps 0 (each row's mean square is 1: the norm is exactly 1), norm
    weights +-{0.5, 1, 2}, RoPE by quarter turns (cos, sin in {0, +-1}). q is then +-{0.5, 1, 2} and its codes
    127 q / amax, mostly +-{31.75, 63.5, 127}: the ties at 63.5 check the rounding (half away from zero: 64)."""
    C = H * D

    def powers_of_two(n):
        x = s.randn(n)
        return signs(s, n) * torch.exp2((x > 0.6).to(x.dtype) - (x < -0.6).to(x.dtype))

    quarter = torch.floor(s.randn(S, D // 2, dtype=torch.float32) * 1000) % 4
    cos = (quarter == 0).float() - (quarter == 2).float()
    sin = (quarter == 1).float() - (quarter == 3).float()
    return signs(s, B, S, 3 * C), powers_of_two(C), powers_of_two(C), cos, sin, H, 0.0


SPEC = register(OpSpec(
    name="qk_norm_rope_int8",
    schema="qk_norm_rope_int8(Tensor qkv, Tensor norm_q_weight, Tensor norm_k_weight, Tensor rope_cos, "
           "Tensor rope_sin, int num_heads, float eps) -> (Tensor q8, Tensor q_scale, Tensor k, Tensor v)",
    check=functools.partial(check_qk_norm_rope, op="qk_norm_rope_int8"), ref=ref.qk_norm_rope_int8,
    samples=exact_samples, fake=fake_qk_norm_rope_int8, training_op="qk_norm_rope",
    triton=triton_qk_norm_rope.qk_norm_rope_int8, flops=lambda *shapes: 0, cpp=False,
    constant=("norm_q_weight", "norm_k_weight", "rope_cos", "rope_sin"), weights=("norm_q_weight", "norm_k_weight"),
))


def qk_norm_rope_int8(qkv: torch.Tensor, norm_q_weight: torch.Tensor, norm_k_weight: torch.Tensor,
                      rope_cos: torch.Tensor, rope_sin: torch.Tensor, num_heads: int, eps: float = 1e-6, *,
                      impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`qk_norm_rope` whose q comes out quantized for `attention_int8_q8`.

    qkv, norm weights, rope tables: as `qk_norm_rope`. Returns q8 int8 [B, S, H, D], q_scale float32 [B, H, S]
    (q ~ q8 * q_scale: symmetric amax/127 per token and head, round half away from zero, of the q `qk_norm_rope`
    returns, rounded to qkv's dtype first; bit-identical to the 8-bit attention quantizer's rounding of that q
    without its channel balance, `attention_int8_q8`'s contract), and
    k, v [B, S, H, D] in qkv's dtype. Inference only (RuntimeError naming `qk_norm_rope` for an input requiring grad).
    """
    return routing.resolve("qk_norm_rope_int8", impl, qkv.device)(qkv, norm_q_weight, norm_k_weight, rope_cos,
                                                                   rope_sin, num_heads, eps)
