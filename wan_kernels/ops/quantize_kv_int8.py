"""wan::quantize_kv_int8: one key/value set quantized as the 8-bit attention quantizes it (K minus its mean over the
tokens, INT8 per token; V per channel in e4m3 minus its mean, or fp16), for wan::attention_int8_quantized_lse: a
ring's K/V block quantized once by its owner and sent round the ring as codes (half the bytes of bf16 K and V with
fp8 P.V), instead of each rank quantizing every block it receives. Inference only.
Kernels: wan_kernels/ref/attention_int8.py (`quantize_kv_int8`), wan_kernels/triton/attention_int8_quant.py."""

from __future__ import annotations

import torch

from wan_kernels import ref, routing
from wan_kernels._checks import FLOAT_DTYPES, shape_of
from wan_kernels._spec import OpSpec, register
from wan_kernels.hardware import empty_v8
from wan_kernels.ops.attention_int8 import PV_MODES, int8_samples
from wan_kernels.ref.attention_int8 import resolve_pv
from wan_kernels.triton import attention_int8 as triton_attention_int8

__all__ = ["quantize_kv_int8"]

OP = "quantize_kv_int8"


def check_quantize_kv_int8(k, v, pv="auto", k_mean=None, v_mean=None, v_scale=None, *, op: str = OP) -> None:
    """The argument contract of quantize_kv_int8 (`op`: the name the messages quote; also kv_stats)."""
    if k.dim() != 4:
        raise ValueError(f"{op}: k must be [B, S, H, D], got shape {shape_of(k)}")
    if v.dim() != 4 or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"{op}: v must be [B, S, H, Dv] = [{', '.join(map(str, k.shape[:3]))}, Dv] matching k "
                         f"{shape_of(k)}, got shape {shape_of(v)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{op}: {name} must be float16/bfloat16/float32, got {t.dtype} (shape {shape_of(t)})")
    if v.device != k.device:
        raise ValueError(f"{op}: v is on {v.device}, k on {k.device}")
    if k.shape[1] == 0:
        raise ValueError(f"{op}: k has no tokens (shape {shape_of(k)})")
    if pv not in PV_MODES:
        raise ValueError(f"{op}: pv must be one of {PV_MODES}, got {pv!r}")
    stats = {"k_mean": k_mean, "v_mean": v_mean, "v_scale": v_scale}
    if any(t is not None for t in stats.values()):
        B, _, H, D = k.shape
        for name, t in stats.items():
            want = (B, H, D if name == "k_mean" else v.shape[-1])
            if t is None or t.dtype != torch.float32 or tuple(t.shape) != want or t.device != k.device:
                raise ValueError(f"{op}: k_mean, v_mean and v_scale go together, each float32 [B, H, D or Dv] on k's "
                                 f"device: {name} must be {list(want)}, got "
                                 f"{'None' if t is None else f'{t.dtype} shape {shape_of(t)} on {t.device}'}")


def fake_quantize_kv_int8(k, v, pv="auto", k_mean=None, v_mean=None, v_scale=None):
    B, S, H, D = k.shape
    Dv = v.shape[-1]
    v_dtype = torch.float8_e4m3fn if resolve_pv(pv, k.device) == "fp8" else torch.float16
    f32 = dict(dtype=torch.float32)
    return (k.new_empty((B, S, H, D), dtype=torch.int8), k.new_empty((B, H, S), **f32), k.new_empty((B, H, D), **f32),
            empty_v8(B, S, H, Dv, v_dtype, v.device), v.new_empty((B, H, Dv), **f32), v.new_empty((B, H, Dv), **f32))


def samples_quantize_kv_int8(s):
    _, k, v, _, _, _ = int8_samples(s, image=False)
    return k, v, "auto"


SPEC = register(OpSpec(
    name=OP,
    schema="quantize_kv_int8(Tensor k, Tensor v, str pv=\"auto\", Tensor? k_mean=None, Tensor? v_mean=None, "
           "Tensor? v_scale=None) -> (Tensor k8, Tensor k_scale, Tensor k_mean_out, Tensor v8, Tensor v_scale_out, "
           "Tensor v_mean_out)",
    check=check_quantize_kv_int8, ref=ref.quantize_kv_int8, samples=samples_quantize_kv_int8,
    fake=fake_quantize_kv_int8, training_op="attention_lse", triton=triton_attention_int8.quantize_kv_int8, cpp=False,
))


def quantize_kv_int8(k: torch.Tensor, v: torch.Tensor, *, pv: str = "auto", k_mean: torch.Tensor | None = None,
                     v_mean: torch.Tensor | None = None, v_scale: torch.Tensor | None = None, impl: str = "auto"
                     ) -> tuple[torch.Tensor, ...]:
    """One key/value set quantized for `attention_int8_quantized_lse`, exactly as `attention_int8_q8` quantizes it
    (`attention_int8` also divides k by its channel balance with q).

    k: [B, S, H, D], v: [B, S, H, Dv], float16/bfloat16/float32 (never written). Returns (k8 int8 [B, S, H, D],
    k_scale float32 [B, H, S] (k - k_mean ~ k8 * k_scale per token), k_mean float32 [B, H, D] (over the S tokens),
    v8 [B, S, H, Dv] (pv "fp8": float8_e4m3fn of (v - v_mean) / v_scale, token-contiguous (`hardware.empty_v8`:
    the fp8 MMA's K-major operand); "fp16": float16 of v / v_scale, v_mean 0, contiguous), v_scale float32 [B, H,
    Dv] (per channel), v_mean float32 [B, H, Dv]). pv "auto": the device's P.V precision (`attention_int8`).
    k_mean, v_mean, v_scale (float32 [B, H, D / Dv], all or none): the statistics of the whole key set when k, v
    hold a part of its tokens (a rank's share before an exchange: `kv_stats` summed
    over the parts, then `kv_stats_finish`, wan_kernels/ref/attention_int8.py); then no statistics pass runs, and
    the codes equal those of quantizing the whole set (fp16 V is not smoothed: v_mean is returned as zeros).
    Inference only (RuntimeError naming `attention_lse` for k/v requiring grad)."""
    return routing.resolve(OP, impl, k.device)(k, v, pv, k_mean, v_mean, v_scale)
