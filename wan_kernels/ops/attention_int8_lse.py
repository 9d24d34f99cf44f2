"""wan::attention_int8_lse: wan::attention_int8 over one key/value set that also returns the natural-log log-sum-exp
of the (unsmoothed) scores, as wan::attention_lse does for wan::attention: the quantity by which ring attention
merges key blocks. Inference only. Kernels: wan_kernels/ref/attention_int8.py, wan_kernels/triton/attention_int8.py."""

from __future__ import annotations

import torch

from wan_kernels import ref, routing
from wan_kernels._spec import OpSpec, register
from wan_kernels.ops.attention import check_attention
from wan_kernels.ops.attention_int8 import check_int8, int8_samples
from wan_kernels.ops.attention_lse import attention_lse_flops, fake_attention_lse
from wan_kernels.triton import attention_int8 as triton_attention_int8

__all__ = ["attention_int8_lse"]


def check_attention_int8_lse(q, k, v, scale=None, pv="auto") -> None:
    check_attention(q, k, v, None, None, scale, op="attention_int8_lse")
    check_int8("attention_int8_lse", q, pv)


def fake_attention_int8_lse(q, k, v, scale, pv="auto"):
    return fake_attention_lse(q, k, v, scale)


def samples_attention_int8_lse(s):
    q, k, v, _, _, scale = int8_samples(s, image=False)
    return q, k, v, scale, "auto"


SPEC = register(OpSpec(
    name="attention_int8_lse",
    schema="attention_int8_lse(Tensor q, Tensor k, Tensor v, float? scale, str pv=\"auto\") -> (Tensor out, "
           "Tensor lse)",
    check=check_attention_int8_lse, ref=ref.attention_int8_lse, samples=samples_attention_int8_lse,
    fake=fake_attention_int8_lse, training_op="attention_lse", triton=triton_attention_int8.attention_int8_lse,
    flops=attention_lse_flops, cpp=False,
))


def attention_int8_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, *,
                       pv: str = "auto", impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit softmax(q k^T s) v and the log-sum-exp of the scores, s = scale or 1/sqrt(D).

    q: [B, Sq, H, D]; k, v: [B, Sk, H, D/Dv]. Returns (out [B, Sq, H, Dv] in q's dtype, lse [B, H, Sq] float32):
    lse[b, h, i] ~ logsumexp_n(s * q[b, i, h] . k[b, n, h]), natural log, of the real (unsmoothed) scores: the
    kernel's LSE of the smoothed keys plus s q . mean_n(k), from its quantized scores and rounded weights (so it
    merges this call's own output exactly, wan::attention_lse's merge formula). pv as `attention_int8`.
    Inference only (RuntimeError naming `attention_lse` for an input requiring grad).
    """
    return routing.resolve("attention_int8_lse", impl, q.device)(q, k, v, scale, pv)
