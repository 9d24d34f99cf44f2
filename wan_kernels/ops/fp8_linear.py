"""wan::fp8_linear: a linear layer with FP8 weights. Reference (W8A16): wan_kernels/fp8.py `fp8_linear`; CUDA
(W8A8, sm_89+): `torch._scaled_mm` on the internal op fp8_linear_scaled_mm (a `routing.TorchCudaKernel`), for the
calls it takes (`fp8.w8a8_accepts`: K, N multiples of 16, fp16/bf16); every other call and device runs W8A16."""

from __future__ import annotations

import math

import torch

from wan_kernels import fp8 as fmt
from wan_kernels import routing
from wan_kernels._checks import FLOAT_DTYPES, as_scale, check_bias, check_scale_values, same_device, shape_of
from wan_kernels._spec import OpSpec, register

__all__ = ["fp8_linear"]


def check_fp8_linear(x, w, w_scale, input_scale, bias) -> None:
    op = "fp8_linear"
    if w.dim() != 2 or w.dtype not in fmt.DTYPES:
        raise ValueError(f"{op}: w must be 2-D float8_e4m3fn/float8_e5m2 [N, K], got shape {shape_of(w)} "
                         f"dtype {w.dtype}")
    n, k = w.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"{op}: x must be [..., {k}] for w of shape {shape_of(w)}, got shape {shape_of(x)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: x must be float32/float16/bfloat16, got {x.dtype}")
    if w_scale.dtype != torch.float32 or tuple(w_scale.shape) not in ((), (1,), (n, 1)):
        raise ValueError(f"{op}: w_scale must be float32 [] (per tensor) or [{n}, 1] (per output row) for w of "
                         f"shape {shape_of(w)}, got shape {shape_of(w_scale)} dtype {w_scale.dtype}")
    if input_scale is not None and (input_scale.dtype != torch.float32 or input_scale.numel() != 1):
        raise ValueError(f"{op}: input_scale must be a 1-element float32 tensor, got shape {shape_of(input_scale)} "
                         f"dtype {input_scale.dtype}")
    check_bias(op, bias, n)
    same_device(op, x, w=w, w_scale=w_scale, input_scale=input_scale, bias=bias)
    check_scale_values(op, "w_scale", w_scale)
    check_scale_values(op, "input_scale", input_scale)


def fake_fp8_linear(x, w, w_scale, input_scale, bias):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def samples_fp8_linear(s):
    w = s.randn(32, 64, dtype=torch.float32)
    scale = fmt.scale_of(w, per_channel=True)
    return s.randn(2, 5, 64), fmt.quantize(w, scale), scale, None, s.randn(32)


def backward_fp8_linear(inputs, grads, needs_input_grad):
    """dX = dY @ dequantize(W) (fp32 math, one rounding to x's dtype); the fp8 weight is a frozen base. W8A8
    calls get the same gradient: the activation rounding is passed straight through."""
    x, w, w_scale = inputs[:3]
    gx = None
    if needs_input_grad[0] and grads[0] is not None:
        gx = (grads[0].float() @ fmt.dequantize(w, w_scale)).to(x.dtype)
    return gx, None, None, None, None


def flops_fp8_linear(x, w, w_scale, input_scale, bias) -> int:
    return 2 * math.prod(x[:-1]) * w[0] * w[1]


SPEC = register(OpSpec(
    name="fp8_linear",
    schema="fp8_linear(Tensor x, Tensor w, Tensor w_scale, Tensor? input_scale, Tensor? bias) -> Tensor",
    check=check_fp8_linear, ref=fmt.fp8_linear, samples=samples_fp8_linear, fake=fake_fp8_linear,
    differentiable=("x",), backward=backward_fp8_linear,  # the fp8 weight is a frozen base
    cuda=routing.TorchCudaKernel("fp8_linear_scaled_mm", accepts=fmt.w8a8_accepts, fn=fmt.fp8_linear_w8a8,
                                 min_capability=(8, 9)),
    flops=flops_fp8_linear,
    constant=("w", "w_scale", "input_scale", "bias"), weights=("w", "w_scale", "input_scale", "bias"),
))


def fp8_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor | float,
               input_scale: torch.Tensor | float | None = None, bias: torch.Tensor | None = None, *,
               impl: str = "auto") -> torch.Tensor:
    """x [..., K] @ (w * w_scale)^T + bias -> [..., N] in x's dtype.

    w: float8_e4m3fn / float8_e5m2 [N, K]; w_scale: fp32 decode scale [] (per tensor) or [N, 1] (per output row),
    or a Python float; input_scale: optional static fp32 activation scale (W8A8 only; default amax(x) / 448 per
    call); bias [N]. Scales are finite and > 0 (checked where it costs no device sync: wan_kernels._checks).
    impl="auto": W8A8 (`torch._scaled_mm`, FP8 tensor cores) on CUDA devices of capability >= 8.9 for the calls
    it takes, else W8A16 (the weight dequantized, then a matmul). Differentiable in x.
    """
    w_scale, input_scale = (as_scale("fp8_linear", n, s, x) for n, s in (("w_scale", w_scale),
                                                                          ("input_scale", input_scale)))
    return routing.resolve("fp8_linear", impl, x.device)(x, w, w_scale, input_scale, bias)
