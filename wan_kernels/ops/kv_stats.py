"""wan::kv_stats: a key/value set's quantization statistics over its tokens, (k_sum, v_sum, v_max, v_min), in the
form that adds up over ranks: a rank holding part of the tokens computes them, the group all-reduces them (sum,
sum, max, min), and `kv_stats_finish` (wan_kernels/ref/attention_int8.py) turns them into the k_mean, v_mean,
v_scale that wan::quantize_kv_int8 takes, so each rank quantizes its own tokens as one process quantizes the whole
set (Ulysses sends K and V as codes). Kernels: wan_kernels/ref/attention_int8.py,
wan_kernels/triton/attention_int8_quant.py (the quantizer's statistics kernel)."""

from __future__ import annotations

import torch

from wan_kernels import ref, routing
from wan_kernels._spec import OpSpec, register
from wan_kernels.ops.quantize_kv_int8 import check_quantize_kv_int8, samples_quantize_kv_int8
from wan_kernels.triton import attention_int8 as triton_attention_int8

__all__ = ["kv_stats"]

OP = "kv_stats"


def check_kv_stats(k, v) -> None:
    check_quantize_kv_int8(k, v, op=OP)


def fake_kv_stats(k, v):
    B, _, H, D = k.shape
    Dv = v.shape[-1]
    return (k.new_empty((B, H, D), dtype=torch.float32), *(v.new_empty((B, H, Dv), dtype=torch.float32)
                                                            for _ in range(3)))


SPEC = register(OpSpec(
    name=OP,
    schema="kv_stats(Tensor k, Tensor v) -> (Tensor k_sum, Tensor v_sum, Tensor v_max, Tensor v_min)",
    check=check_kv_stats, ref=ref.kv_stats, samples=lambda s: samples_quantize_kv_int8(s)[:2], fake=fake_kv_stats,
    training_op="attention_lse", triton=triton_attention_int8.kv_stats, cpp=False,
))


def kv_stats(k: torch.Tensor, v: torch.Tensor, *, impl: str = "auto") -> tuple[torch.Tensor, ...]:
    """Quantization statistics of a key/value set over its S tokens: (k_sum float32 [B, H, D], v_sum, v_max, v_min
    float32 [B, H, Dv]) of k [B, S, H, D] and v [B, S, H, Dv] (float16/bfloat16/float32). Summed (max, min) over the
    parts of a set held by several ranks, `kv_stats_finish(..., tokens, pv)` (wan_kernels/ref/attention_int8.py)
    gives the k_mean, v_mean, v_scale of `quantize_kv_int8`. Inference only."""
    return routing.resolve(OP, impl, k.device)(k, v)
