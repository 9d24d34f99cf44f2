"""wan::attention_int8_q8: wan::attention_int8 from a query quantized already, by wan::qk_norm_rope_int8 /
qkv_rope_int8 in the kernel that made it (the fusion of 8-bit attention's Q quantization into the QKV epilogue):
q8 int8 [B, Sq, H, D] and q_scale fp32 [B, H, Sq]; K and V are smoothed and quantized as attention_int8 does them
less its channel balance (which needs q's maxima before q is rounded), the attention kernel is the same launch.
Output in k's dtype. Inference only.
Kernels: wan_kernels/ref/attention_int8.py, wan_kernels/triton/attention_int8.py."""

from __future__ import annotations

import torch

from wan_kernels import ref, routing
from wan_kernels._checks import FLOAT_DTYPES, shape_of
from wan_kernels._spec import OpSpec, register
from wan_kernels.ops.attention import attention_flops, check_attention
from wan_kernels.ops.attention_int8 import PV_MODES, int8_samples
from wan_kernels.ref.attention_int8 import quantize_int8
from wan_kernels.triton import attention_int8 as triton_attention_int8

__all__ = ["attention_int8_q8"]

OP = "attention_int8_q8"


def check_q8(op: str, q8, q_scale) -> None:
    """A query quantized already: q8 int8 [B, Sq, H, D] and q_scale float32 [B, H, Sq] on q8's device."""
    if q8.dtype != torch.int8 or q8.dim() != 4:
        raise ValueError(f"{op}: q8 must be int8 [B, Sq, H, D], got {q8.dtype} shape {shape_of(q8)}")
    B, Sq, H, _ = q8.shape
    if q_scale.dtype != torch.float32 or q_scale.shape != (B, H, Sq):
        raise ValueError(f"{op}: q_scale must be float32 [B, H, Sq] = [{B}, {H}, {Sq}] for q8 of shape "
                         f"{shape_of(q8)}, got {q_scale.dtype} shape {shape_of(q_scale)}")
    if q_scale.device != q8.device:
        raise ValueError(f"{op}: q_scale is on {q_scale.device}, q8 on {q8.device}")


def check_attention_int8_q8(q8, q_scale, k, v, k_img=None, v_img=None, scale=None, pv="auto", *, op: str = OP
                            ) -> None:
    """The argument contract of attention_int8_q8 (`op`: the name the messages quote; also attention_int8_q8_lse)."""
    check_q8(op, q8, q_scale)
    if k.dim() != 4:
        raise ValueError(f"{op}: k must be [B, Sk, H, D], got shape {shape_of(k)}")
    # q8 stands in for a q of k's dtype (an expanded 1-element tensor: no memory): the [B, S, H, D] contract
    check_attention(k.new_empty((1, 1, 1, 1)).expand(q8.shape), k, v, k_img, v_img, scale, op=op)
    if q8.device != k.device:
        raise ValueError(f"{op}: q8 is on {q8.device}, k on {k.device}")
    if k.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: k must be float16/bfloat16/float32, got {k.dtype} (shape {shape_of(k)})")
    if pv not in PV_MODES:
        raise ValueError(f"{op}: pv must be one of {PV_MODES}, got {pv!r}")


def fake_attention_int8_q8(q8, q_scale, k, v, k_img, v_img, scale, pv="auto"):
    return k.new_empty((*q8.shape[:3], v.shape[-1]))


def samples_attention_int8_q8(s):
    q, k, v, k_img, v_img, scale = int8_samples(s, image=True)
    q8, q_scale = quantize_int8(q, 1)
    return q8, q_scale, k, v, k_img, v_img, scale, "auto"


SPEC = register(OpSpec(
    name=OP,
    schema="attention_int8_q8(Tensor q8, Tensor q_scale, Tensor k, Tensor v, Tensor? k_img, Tensor? v_img, "
           "float? scale, str pv=\"auto\") -> Tensor",
    check=check_attention_int8_q8, ref=ref.attention_int8_q8, samples=samples_attention_int8_q8,
    fake=fake_attention_int8_q8, training_op="attention", triton=triton_attention_int8.attention_int8_q8,
    flops=lambda q8, q_scale, *rest: attention_flops(q8, *rest), cpp=False,
))


def attention_int8_q8(q8: torch.Tensor, q_scale: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      k_img: torch.Tensor | None = None, v_img: torch.Tensor | None = None,
                      scale: float | None = None, *, pv: str = "auto", impl: str = "auto") -> torch.Tensor:
    """`attention_int8` from q quantized already (`qk_norm_rope_int8` / `qkv_rope_int8`): q8 int8 [B, Sq, H, D],
    q_scale float32 [B, H, Sq] (q ~ q8 * q_scale per token and head); k, v, k_img, v_img, scale, pv as
    `attention_int8`. Output [B, Sq, H, Dv] in k's dtype; equal to `attention_int8(q, ...)` without its channel
    balance (the backends' balance=False) for the q that q8 and q_scale quantize. Inference only (RuntimeError
    naming `attention` for k/v requiring grad)."""
    return routing.resolve(OP, impl, k.device)(q8, q_scale, k, v, k_img, v_img, scale, pv)
