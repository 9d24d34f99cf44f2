"""FP8 weights: the format and its pure-torch reference (the spec the `fp8_linear` op and the checkpoint formats meet).

Values: float8_e4m3fn (max 448, no Inf; torch's cast turns values >= 480 into NaN, so everything is clamped
first) or float8_e5m2 (max 57344, read where a file has it). One fp32 scale per tensor ([]) or per output row
([N, 1]), in the DECODE direction, as ComfyUI / comfy-kitchen store it: w = fp8 * scale, scale = amax / max.

Quantizing is comfy-kitchen's eager `quantize_per_tensor_fp8`, done in fp32: q = clamp(w * (1 / scale), +-max)
cast to fp8 (round to nearest even); the reciprocal is taken once, as there, so fp32 weights give the same
bytes. An all-zero tensor (or row) gets scale 1 instead of 0 (comfy-kitchen would divide by zero): its codes
are 0 either way. Dequantizing: w = fp8.float() * scale. A scale is finite and > 0, checked on load
(wan_model.io.formats.check_scales) and at the op boundary where that costs no device sync (wan_kernels._checks).

Activations (W8A8): one dynamic per-tensor scale amax(x) / 448 computed on the device (no host sync), or
a static `input_scale`; activations are always e4m3.
"""

from __future__ import annotations

import torch

DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
NAMES = {torch.float8_e4m3fn: "float8_e4m3fn", torch.float8_e5m2: "float8_e5m2"}  # ComfyUI's format names
MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


def dtype_of(name: str | torch.dtype) -> torch.dtype:
    """"float8_e4m3fn" / "float8_e5m2" (or the dtype) -> the torch dtype; ValueError naming the choices."""
    if isinstance(name, torch.dtype) and name in DTYPES:
        return name
    for dt, n in NAMES.items():
        if name == n:
            return dt
    raise ValueError(f"fp8 dtype must be one of {list(NAMES.values())}, got {name!r}")


def scale_of(w: torch.Tensor, per_channel: bool = False, dtype: torch.dtype = torch.float8_e4m3fn) -> torch.Tensor:
    """fp32 decode scale of `w` [N, K]: amax / max(dtype) over the tensor ([]) or each row ([N, 1]);
    1 where the amax is 0."""
    a = w.detach().abs().float()
    amax = a.amax(dim=1, keepdim=True) if per_channel else a.amax()
    s = amax / MAX[dtype]
    return torch.where(s == 0, torch.ones_like(s), s)


def quantize(w: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> torch.Tensor:
    """w [N, K] (any float dtype) -> fp8 [N, K] with decode scale `scale` ([] or [N, 1] fp32)."""
    m = MAX[dtype]
    return (w.float() * (1.0 / scale.float())).clamp_(-m, m).to(dtype)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """fp8 [N, K] * scale ([] or [N, 1]) -> [N, K] in `dtype` (fp32 math, one rounding)."""
    return (q.float() * scale.float()).to(dtype)


def activation_scale(x: torch.Tensor) -> torch.Tensor:
    """Dynamic per-tensor e4m3 scale of activations: amax(x) / 448 (1 for an all-zero x), fp32 []."""
    return scale_of(x.reshape(1, -1))


def fp8_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, input_scale: torch.Tensor | None,
               bias: torch.Tensor | None) -> torch.Tensor:
    """Reference of `wan::fp8_linear` (W8A16): x [..., K] @ dequantize(w, w_scale)^T + bias -> [..., N] in x's
    dtype, fp32 math, one rounding. `input_scale` is used by the W8A8 kernel only (activations rounded to fp8)."""
    out = x.float() @ dequantize(w, w_scale).t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def fp8_linear_w8a8(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, input_scale: torch.Tensor | None,
                    bias: torch.Tensor | None) -> torch.Tensor:
    """W8A8 through `torch._scaled_mm` (cuBLASLt's FP8 GEMM on sm_89+; torch 2.14 also runs it on CPU):
    x quantized to e4m3 with `input_scale` or amax(x) / 448, then fp8 x fp8 with fp32 accumulation, both scales
    and the bias applied in the epilogue. Its layout rules (torch/_meta_registrations.py `_check_scaled_mm_sizes`):
    A row-major, B column-major (w.t() of the row-major [N, K] weight), K and N multiples of 16 on CUDA, scales
    fp32: both scalars (tensorwise) or A [M, 1] with B [1, N] (rowwise, for per-channel weight scales)."""
    k, n = x.shape[-1], w.shape[0]
    x2 = x.reshape(-1, k)
    xs = (activation_scale(x2) if input_scale is None else input_scale.float()).reshape(())
    xq = quantize(x2, xs)
    if w_scale.numel() == 1:
        sa, sb = xs, w_scale.float().reshape(())
    else:
        sa, sb = xs.expand(x2.shape[0], 1).contiguous(), w_scale.float().reshape(1, n)
    out = torch._scaled_mm(xq, w.t(), sa, sb, bias=bias, out_dtype=x.dtype)
    return out.reshape(*x.shape[:-1], n)


def w8a8_accepts(x, w, w_scale, input_scale, bias) -> bool:
    """The calls `torch._scaled_mm` takes on CUDA (else W8A16 runs): fp16/bf16 x (fp32 output and bias are
    refused there), K and N multiples of 16, per-channel (rowwise) scales with bf16 output and e4m3 weights
    only, a bias of x's dtype. Activations are e4m3, so e5m2 x e5m2 (unsupported) never occurs."""
    if x.dtype not in (torch.float16, torch.bfloat16) or x.shape[-1] % 16 or w.shape[0] % 16:
        return False
    if w_scale.numel() != 1 and (x.dtype != torch.bfloat16 or w.dtype != torch.float8_e4m3fn):
        return False
    return bias is None or bias.dtype == x.dtype
