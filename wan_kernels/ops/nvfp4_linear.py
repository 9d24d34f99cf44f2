"""wan::nvfp4_linear (W4A16), its backward in x wan::nvfp4_linear_backward (dX = dY @ dequant(W); the NVFP4 weight
is a frozen base) and the W4A4 composition nvfp4_linear_w4a4 (nvfp4_quantize + nvfp4_gemm).
Kernels: wan_kernels/ref/nvfp4.py, wan_kernels/triton/nvfp4.py (nvfp4_linear_w4a16, nvfp4_linear_backward)."""

from __future__ import annotations

import math

import torch

from wan_kernels import nvfp4 as fmt
from wan_kernels import ref, routing
from wan_kernels._checks import (FLOAT_DTYPES, as_scale, check_bias, check_block_scale_values, check_global_scale,
                                 check_packed, same_device, shape_of)
from wan_kernels._spec import OpSpec, register
from wan_kernels.ops.nvfp4_gemm import nvfp4_gemm
from wan_kernels.ops.nvfp4_quantize import nvfp4_quantize
from wan_kernels.triton import nvfp4 as triton_nvfp4

__all__ = ["nvfp4_linear", "nvfp4_linear_backward", "nvfp4_linear_w4a4"]


def check_nvfp4_linear(x, w, w_scale, w_global_scale, bias) -> None:
    op = "nvfp4_linear"
    n, k = check_packed(op, "w", w, "w_scale", w_scale)
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"{op}: x must be [..., {k}] for w of shape {shape_of(w)} (K = 2 * w.shape[1]), "
                         f"got shape {shape_of(x)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: x must be float32/float16/bfloat16, got {x.dtype}")
    check_global_scale(op, "w_global_scale", w_global_scale, x, scaled=w)
    check_bias(op, bias, n)
    same_device(op, x, w=w, bias=bias)


def fake_nvfp4_linear(x, w, w_scale, w_global_scale, bias):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def samples_nvfp4_linear(s):
    wp, ws, gw = s.nvfp4(24, 64)
    return s.randn(2, 5, 64), wp, ws, gw, s.randn(24)


# ---------------------------------------------------------------------------------------------
# wan::nvfp4_linear_backward: dX = dY @ dequant(W) (the weight is a frozen base: no weight gradient)

def check_nvfp4_linear_backward(grad_out, w, w_scale, w_global_scale) -> None:
    op = "nvfp4_linear_backward"
    n, _ = check_packed(op, "w", w, "w_scale", w_scale)
    if grad_out.dim() < 1 or grad_out.shape[-1] != n:
        raise ValueError(f"{op}: grad_out must be [..., {n}] for w of shape {shape_of(w)} (N = w.shape[0]), "
                         f"got shape {shape_of(grad_out)}")
    if grad_out.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: grad_out must be float32/float16/bfloat16, got {grad_out.dtype}")
    check_global_scale(op, "w_global_scale", w_global_scale, grad_out, scaled=w)
    same_device(op, grad_out, w=w)


def fake_nvfp4_linear_backward(grad_out, w, w_scale, w_global_scale):
    return grad_out.new_empty((*grad_out.shape[:-1], 2 * w.shape[1]))


def samples_nvfp4_linear_backward(s):
    wp, ws, gw = s.nvfp4(24, 64)
    return s.randn(2, 5, 24), wp, ws, gw


BACKWARD_SPEC = register(OpSpec(
    name="nvfp4_linear_backward",
    schema="nvfp4_linear_backward(Tensor grad_out, Tensor w, Tensor w_scale, Tensor w_global_scale) -> Tensor",
    check=check_nvfp4_linear_backward, ref=ref.nvfp4_linear_backward, samples=samples_nvfp4_linear_backward,
    fake=fake_nvfp4_linear_backward,
    differentiable=("grad_out",),  # linear in grad_out: double backward is nvfp4_linear's forward (the reference VJP)
    triton=triton_nvfp4.nvfp4_linear_backward,
    flops=lambda g, w, *_: 2 * math.prod(g[:-1]) * w[0] * 2 * w[1],  # 2 M N K
    constant=("w", "w_scale", "w_global_scale"), weights=("w", "w_scale", "w_global_scale"), cpp=False,
))


def backward_nvfp4_linear(inputs, grads, needs_input_grad):
    """OpSpec.backward of nvfp4_linear: dx by wan::nvfp4_linear_backward (the Triton dgrad kernel on GPUs),
    dbias = dY summed over the rows (fp32, rounded to the bias dtype); none for the NVFP4 weight."""
    x, w, w_scale, w_global_scale, bias = inputs
    (dy,) = grads
    dx = torch.ops.wan.nvfp4_linear_backward(dy, w, w_scale, w_global_scale) if needs_input_grad[0] else None
    dbias = None
    if bias is not None and needs_input_grad[4]:
        dbias = dy.reshape(-1, dy.shape[-1]).sum(0, dtype=torch.float32).to(bias.dtype)
    return dx, None, None, None, dbias


SPEC = register(OpSpec(
    name="nvfp4_linear",
    schema="nvfp4_linear(Tensor x, Tensor w, Tensor w_scale, Tensor w_global_scale, Tensor? bias) -> Tensor",
    check=check_nvfp4_linear, ref=ref.nvfp4_linear, samples=samples_nvfp4_linear, fake=fake_nvfp4_linear,
    differentiable=("x", "bias"),  # the NVFP4 weight is a frozen base (QLoRA-style training)
    backward=backward_nvfp4_linear,
    triton=triton_nvfp4.nvfp4_linear_w4a16,
    constant=("w", "w_scale", "w_global_scale", "bias"), weights=("w", "w_scale", "w_global_scale", "bias"),
    flops=lambda x, w, *_: 2 * math.prod(x[:-1]) * w[0] * 2 * w[1],  # 2 M N K, K = 2 * w.shape[1] (packed E2M1)
))


def nvfp4_linear_backward(grad_out: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                          w_global_scale: torch.Tensor | float, *, impl: str = "auto") -> torch.Tensor:
    """dX of the W4A16 linear: grad_out [..., N] @ dequantize(w [N, K/2]) -> [..., K] in grad_out's dtype (the
    weight's gradient is not computed: a frozen NVFP4 base). On GPUs the Triton dgrad kernel decodes weight tiles
    in the main loop and reduces over N; on CPU the reference (dequantize, matmul). w_global_scale: as
    `nvfp4_linear`'s."""
    w_global_scale = as_scale("nvfp4_linear_backward", "w_global_scale", w_global_scale, grad_out)
    return routing.resolve("nvfp4_linear_backward", impl, grad_out.device)(grad_out, w, w_scale, w_global_scale)


def nvfp4_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, w_global_scale: torch.Tensor | float,
                 bias: torch.Tensor | None = None, *, impl: str = "auto") -> torch.Tensor:
    """W4A16 linear with NVFP4 weights: x [..., K] @ dequantize(w)^T + bias -> [..., N] in x's dtype.

    w: packed [N, K/2], w_scale: swizzled [roundup(N,128), roundup(K/16,4)] e4m3, w_global_scale: fp32 scalar
    (DECODE convention; or a Python float, as `nvfp4_quantize`). On Ampere/Hopper the Triton kernel decodes
    weight tiles in the GEMM main loop.
    """
    w_global_scale = as_scale("nvfp4_linear", "w_global_scale", w_global_scale, x)
    return routing.resolve("nvfp4_linear", impl, x.device)(x, w, w_scale, w_global_scale, bias)


def nvfp4_linear_w4a4(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, w_global_scale: torch.Tensor | float,
                      bias: torch.Tensor | None = None, x_global_scale: torch.Tensor | float | None = None, *,
                      impl: str = "auto") -> torch.Tensor:
    """W4A4 linear (Blackwell's FP4 tensor cores): quantize x to NVFP4 (global scale `x_global_scale`, or
    amax(x) / (6*448) computed on the device), then `nvfp4_gemm` (impl="auto": the CUTLASS kernel where the route
    table says cuda). x [..., K] -> [..., N] in x's dtype (the CUTLASS kernel writes fp16/bf16 only). Not
    differentiable (rounding x to FP4 has no useful gradient): with grad mode on, an x or bias that requires grad
    raises; train through `nvfp4_linear` (W4A16)."""
    for name, t in (("x", x), ("bias", bias)):
        if t is not None and t.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(f"nvfp4_linear_w4a4 is not differentiable, but {name} requires grad: train through "
                               f"nvfp4_linear (W4A16; NVFP4Linear(mode='w4a16')), or call it under torch.no_grad()")
    w_global_scale = as_scale("nvfp4_linear_w4a4", "w_global_scale", w_global_scale, x)
    check_global_scale("nvfp4_linear_w4a4", "w_global_scale", w_global_scale, x, scaled=w)
    check_block_scale_values("nvfp4_linear_w4a4", "w_scale", w_scale)
    x2 = x.reshape(-1, x.shape[-1])
    gs = fmt.global_scale(x2) if x_global_scale is None else as_scale("nvfp4_linear_w4a4", "x_global_scale",
                                                                       x_global_scale, x)
    xq, xs = nvfp4_quantize(x2, gs, impl=impl)
    out = nvfp4_gemm(xq, xs, gs, w, w_scale, w_global_scale, bias, x.dtype, impl=impl)
    return out.reshape(*x.shape[:-1], w.shape[0])
