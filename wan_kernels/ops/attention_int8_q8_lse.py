"""wan::attention_int8_q8_lse: wan::attention_int8_lse from a query quantized already (as wan::attention_int8_q8
takes it), one key/value set: the output and the natural-log log-sum-exp by which ring attention merges key
blocks, for a ring fed the fused q (wan::qkv_rope_int8 / qk_norm_rope_int8) that is never quantized again per
block. The LSE's smoothing correction s q^.mean(k) comes from the dequantized q^ = q8 * q_scale, in the kernel.
Output in k's dtype. Inference only.
Kernels: wan_kernels/ref/attention_int8.py, wan_kernels/triton/attention_int8.py."""

from __future__ import annotations

import torch

from wan_kernels import ref, routing
from wan_kernels._spec import OpSpec, register
from wan_kernels.ops.attention_int8 import int8_samples
from wan_kernels.ops.attention_int8_q8 import check_attention_int8_q8
from wan_kernels.ops.attention_lse import attention_lse_flops
from wan_kernels.ref.attention_int8 import quantize_int8
from wan_kernels.triton import attention_int8 as triton_attention_int8

__all__ = ["attention_int8_q8_lse"]

OP = "attention_int8_q8_lse"


def check_attention_int8_q8_lse(q8, q_scale, k, v, scale=None, pv="auto") -> None:
    check_attention_int8_q8(q8, q_scale, k, v, None, None, scale, pv, op=OP)


def fake_attention_int8_q8_lse(q8, q_scale, k, v, scale, pv="auto"):
    B, Sq, H, _ = q8.shape
    return k.new_empty((B, Sq, H, v.shape[-1])), k.new_empty((B, H, Sq), dtype=torch.float32)


def samples_attention_int8_q8_lse(s):
    q, k, v, _, _, scale = int8_samples(s, image=False)
    q8, q_scale = quantize_int8(q, 1)
    return q8, q_scale, k, v, scale, "auto"


SPEC = register(OpSpec(
    name=OP,
    schema="attention_int8_q8_lse(Tensor q8, Tensor q_scale, Tensor k, Tensor v, float? scale, str pv=\"auto\") "
           "-> (Tensor out, Tensor lse)",
    check=check_attention_int8_q8_lse, ref=ref.attention_int8_q8_lse, samples=samples_attention_int8_q8_lse,
    fake=fake_attention_int8_q8_lse, training_op="attention_lse",
    triton=triton_attention_int8.attention_int8_q8_lse,
    flops=lambda q8, q_scale, *rest: attention_lse_flops(q8, *rest), cpp=False,
))


def attention_int8_q8_lse(q8: torch.Tensor, q_scale: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          scale: float | None = None, *, pv: str = "auto", impl: str = "auto"
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention_int8_lse` from q quantized already: q8 int8 [B, Sq, H, D], q_scale float32 [B, H, Sq] (as
    `attention_int8_q8`); k, v [B, Sk, H, D/Dv]; scale, pv as `attention_int8`. Returns (out [B, Sq, H, Dv] in
    k's dtype, lse [B, H, Sq] float32): the natural-log log-sum-exp of s q^ . k over the keys, q^ = q8 * q_scale
    (the smoothing correction s q^ . mean_n(k) is the dequantized q's: the LSE of the scores the output was
    computed from, so blocks merge by wan::attention_lse's formula). Inference only (RuntimeError naming
    `attention_lse` for k/v requiring grad)."""
    return routing.resolve(OP, impl, k.device)(q8, q_scale, k, v, scale, pv)
