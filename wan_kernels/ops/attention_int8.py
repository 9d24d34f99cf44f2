"""wan::attention_int8: 8-bit (SageAttention2-class) non-causal attention, the contract of wan::attention: [B, S, H, D]
layout, an optional image key/value set (Wan I2V: two independent softmaxes summed), output in q's dtype; INT8 Q.K^T
with per-token scales and K smoothing, P.V in FP8 e4m3 or FP16 (`pv`). Inference only.
Kernels: wan_kernels/ref/attention_int8.py (the exact emulation: CPU backend), wan_kernels/triton/attention_int8.py.

Routing: CPU -> the reference; sm_80 and later -> the Triton kernel (sm_75: the reference). pv="auto" is resolved per
device inside the backend (`wan_kernels.hardware.default_pv`): "fp16" on sm_80/86 (no FP8 MMA), "fp8" on sm_89 and
later and on CPU (the reference emulates the fp8 kernel). pv="fp8" on sm_80/86 raises ValueError.
"""

from __future__ import annotations

import torch

from wan_kernels import ref, routing
from wan_kernels._checks import FLOAT_DTYPES, shape_of
from wan_kernels._spec import OpSpec, register
from wan_kernels.ops.attention import attention_flops, check_attention, fake_attention
from wan_kernels.triton import attention_int8 as triton_attention_int8

__all__ = ["attention_int8"]

PV_MODES = ("auto", "fp8", "fp16")


def check_int8(op: str, q, pv) -> None:
    """What the 8-bit ops add to wan::attention's checks: fp16/bf16/fp32 inputs (the kernel quantizes from them) and
    the pv mode."""
    if q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: q must be float16/bfloat16/float32, got {q.dtype} (shape {shape_of(q)})")
    if pv not in PV_MODES:
        raise ValueError(f"{op}: pv must be one of {PV_MODES}, got {pv!r}")


def check_attention_int8(q, k, v, k_img=None, v_img=None, scale=None, pv="auto") -> None:
    check_attention(q, k, v, k_img, v_img, scale, op="attention_int8")
    check_int8("attention_int8", q, pv)


def fake_attention_int8(q, k, v, k_img, v_img, scale, pv="auto"):
    return fake_attention(q, k, v, k_img, v_img, scale)


def int8_samples(s, image: bool):
    """Inputs whose scores are integers once quantized (entries of q and k in {-1, 0, 1}, each row's amax 1, k's
    rows in +- pairs so smoothing subtracts an exact 0, scale = ln 2 so that s log2 e = 1): every exp2 is a power of
    two up to a few fp32 ulps, which e4m3 and fp16 round back to it, so the self-check compares backends whose exp2
    differ (torch, numpy under the interpreter, ex2.approx on GPUs) at fp32 summation order, all stages included."""
    B, S, H, D = 2, 17, 2, 64

    def ternary(*shape):
        x = s.randn(*shape)
        x = torch.where(x.abs() > 1.0, x.sign(), torch.zeros_like(x))
        x[..., 0] = 1.0
        return x

    def keys(n):
        k = ternary(B, n // 2, H, D)
        return torch.cat([k, -k], dim=1)

    k_img, v_img = (keys(6), s.randn(B, 6, H, D)) if image else (None, None)
    return ternary(B, S, H, D), keys(8), s.randn(B, 8, H, D), k_img, v_img, 0.6931471805599453


def samples_attention_int8(s):
    return (*int8_samples(s, image=True), "auto")


SPEC = register(OpSpec(
    name="attention_int8",
    schema="attention_int8(Tensor q, Tensor k, Tensor v, Tensor? k_img, Tensor? v_img, float? scale, "
           "str pv=\"auto\") -> Tensor",
    check=check_attention_int8, ref=ref.attention_int8, samples=samples_attention_int8, fake=fake_attention_int8,
    training_op="attention", triton=triton_attention_int8.attention_int8, flops=attention_flops, cpp=False,
))


def attention_int8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_img: torch.Tensor | None = None,
                   v_img: torch.Tensor | None = None, scale: float | None = None, *, pv: str = "auto",
                   impl: str = "auto") -> torch.Tensor:
    """8-bit attention with `attention`'s contract: softmax(q k^T s) v + softmax(q k_img^T s) v_img, s = scale or
    1/sqrt(D). q: [B, Sq, H, D]; k, v: [B, Sk, H, D/Dv]; k_img, v_img: [B, Si, H, D/Dv]; float16/bfloat16/float32.
    Output: [B, Sq, H, Dv] in q's dtype. Q and K: INT8, one scale per token, K minus its mean over tokens first;
    pv: "fp8" (P and V in e4m3, V minus its mean, per-channel scale), "fp16", or "auto" (fp16 where the GPU has no
    FP8 MMA: sm_80/86; fp8 on sm_89+ and on CPU). Inference only: an input requiring grad (in grad mode) raises
    RuntimeError naming `attention`, the op to train with. impl: "auto" | "triton" | "ref" (routing.py).
    """
    return routing.resolve("attention_int8", impl, q.device)(q, k, v, k_img, v_img, scale, pv)
