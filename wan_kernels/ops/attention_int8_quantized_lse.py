"""wan::attention_int8_quantized_lse: wan::attention_int8_q8_lse on a key/value set quantized already (by
wan::quantize_kv_int8): every operand in its 8-bit form, the output and the natural-log log-sum-exp by which ring
attention merges key blocks. A ring block is quantized once by the rank that owns it and travels as codes; each
rank runs the attention kernel on it without a quantizer pass. The P.V precision is v8's dtype (float8_e4m3fn:
fp8, float16: fp16). Output in `out_dtype` (default float32: the ring merges in fp32). Inference only.
Kernels: wan_kernels/ref/attention_int8.py, wan_kernels/triton/attention_int8.py (the same launch as
wan::attention_int8_q8_lse after its quantizer)."""

from __future__ import annotations

import torch

from wan_kernels import ref, routing
from wan_kernels._checks import FLOAT_DTYPES, shape_of
from wan_kernels._spec import OpSpec, register
from wan_kernels.ops.attention_int8_q8 import check_q8
from wan_kernels.ops.attention_int8_q8_lse import samples_attention_int8_q8_lse
from wan_kernels.ops.attention_lse import attention_lse_flops
from wan_kernels.ref.attention_int8 import quantize_kv_int8
from wan_kernels.triton import attention_int8 as triton_attention_int8

__all__ = ["attention_int8_quantized_lse"]

OP = "attention_int8_quantized_lse"
V_DTYPES = (torch.float8_e4m3fn, torch.float16)


def _want(name: str, t, dtype: torch.dtype | tuple, shape: tuple, what: str) -> None:
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
    if t.dtype not in dtypes or tuple(t.shape) != tuple(shape):
        names = "/".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{OP}: {name} must be {names} {what} = {list(shape)}, got {t.dtype} shape {shape_of(t)}")


def check_attention_int8_quantized_lse(q8, q_scale, k8, k_scale, k_mean, v8, v_scale, v_mean, scale=None,
                                       out_dtype=None) -> None:
    check_q8(OP, q8, q_scale)
    B, Sq, H, D = q8.shape
    if k8.dim() != 4 or v8.dim() != 4:
        raise ValueError(f"{OP}: k8 and v8 must be [B, Sk, H, D] and [B, Sk, H, Dv], got shapes {shape_of(k8)} and "
                         f"{shape_of(v8)}")
    Sk, Dv = k8.shape[1], v8.shape[-1]
    _want("k8", k8, torch.int8, (B, Sk, H, D), "[B, Sk, H, D]")
    _want("k_scale", k_scale, torch.float32, (B, H, Sk), "[B, H, Sk]")
    _want("k_mean", k_mean, torch.float32, (B, H, D), "[B, H, D]")
    _want("v8", v8, V_DTYPES, (B, Sk, H, Dv), "[B, Sk, H, Dv]")
    _want("v_scale", v_scale, torch.float32, (B, H, Dv), "[B, H, Dv]")
    _want("v_mean", v_mean, torch.float32, (B, H, Dv), "[B, H, Dv]")
    if Sk == 0:
        raise ValueError(f"{OP}: k8 has no keys (shape {shape_of(k8)})")
    for name, t in (("k8", k8), ("k_scale", k_scale), ("k_mean", k_mean), ("v8", v8), ("v_scale", v_scale),
                    ("v_mean", v_mean)):
        if t.device != q8.device:
            raise ValueError(f"{OP}: {name} is on {t.device}, q8 on {q8.device}")
    if scale is not None and not scale > 0:
        raise ValueError(f"{OP}: scale must be positive, got {scale}")
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"{OP}: out_dtype must be float32/float16/bfloat16, got {out_dtype}")


def fake_attention_int8_quantized_lse(q8, q_scale, k8, k_scale, k_mean, v8, v_scale, v_mean, scale, out_dtype=None):
    B, Sq, H, _ = q8.shape
    return (q8.new_empty((B, Sq, H, v8.shape[-1]), dtype=out_dtype or torch.float32),
            q8.new_empty((B, H, Sq), dtype=torch.float32))


def samples_attention_int8_quantized_lse(s):
    q8, q_scale, k, v, scale, _ = samples_attention_int8_q8_lse(s)
    return (q8, q_scale, *quantize_kv_int8(k, v, "auto"), scale, None)


SPEC = register(OpSpec(
    name=OP,
    schema="attention_int8_quantized_lse(Tensor q8, Tensor q_scale, Tensor k8, Tensor k_scale, Tensor k_mean, "
           "Tensor v8, Tensor v_scale, Tensor v_mean, float? scale, ScalarType? out_dtype=None) -> (Tensor out, "
           "Tensor lse)",
    check=check_attention_int8_quantized_lse, ref=ref.attention_int8_quantized_lse,
    samples=samples_attention_int8_quantized_lse, fake=fake_attention_int8_quantized_lse,
    training_op="attention_lse", triton=triton_attention_int8.attention_int8_quantized_lse,
    flops=lambda q8, q_scale, k8, k_scale, k_mean, v8, *rest: attention_lse_flops(q8, k8, v8), cpp=False,
))


def attention_int8_quantized_lse(q8: torch.Tensor, q_scale: torch.Tensor, k8: torch.Tensor, k_scale: torch.Tensor,
                                 k_mean: torch.Tensor, v8: torch.Tensor, v_scale: torch.Tensor, v_mean: torch.Tensor,
                                 scale: float | None = None, *, out_dtype: torch.dtype | None = None,
                                 impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """`attention_int8_q8_lse` on K and V quantized already by `quantize_kv_int8` (a ring block quantized once).

    q8 int8 [B, Sq, H, D], q_scale float32 [B, H, Sq] (as `attention_int8_q8`); k8, k_scale, k_mean, v8, v_scale,
    v_mean as `quantize_kv_int8` returns them for Sk keys (v8 float8_e4m3fn: P.V in fp8, float16: in fp16; e4m3
    needs sm_89 or later); scale: the softmax scale (None: 1/sqrt(D)). Returns (out [B, Sq, H, Dv] in
    `out_dtype`, None: float32; lse [B, H, Sq] float32, the natural-log log-sum-exp of s q^ . k over the keys, q^ =
    q8 * q_scale, smoothing corrected with k_mean). `attention_int8_q8_lse(q8, q_scale, k, v)` is this op on
    `quantize_kv_int8(k, v)` with out_dtype=k.dtype. Inference only."""
    return routing.resolve(OP, impl, q8.device)(q8, q_scale, k8, k_scale, k_mean, v8, v_scale, v_mean, scale,
                                                out_dtype)
