"""wan::nvfp4_quantize: NVFP4 quantization with a decode-convention global scale (wan_kernels/nvfp4.py).
Kernels: wan_kernels/ref/nvfp4.py, wan_kernels/triton/nvfp4.py, csrc/nvfp4/ (C++ CPU; CUDA on the internal op
nvfp4_quantize_cuda)."""

from __future__ import annotations

import torch

from wan_kernels import nvfp4, ref, routing
from wan_kernels._checks import FLOAT_DTYPES, as_scale, check_global_scale, shape_of
from wan_kernels._spec import CudaKernel, OpSpec, register
from wan_kernels.triton import nvfp4 as triton_nvfp4

__all__ = ["nvfp4_quantize"]


def check_nvfp4_quantize(x, global_scale) -> None:
    op = "nvfp4_quantize"
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D [M, K], got shape {shape_of(x)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: x must be float32/float16/bfloat16, got {x.dtype}")
    if x.shape[1] % nvfp4.BLOCK:
        raise ValueError(f"{op}: K (x.shape[1]) must be a multiple of 16, got shape {shape_of(x)}")
    check_global_scale(op, "global_scale", global_scale, x, scaled=x)


def fake_nvfp4_quantize(x, global_scale):
    m, k = x.shape
    return (x.new_empty((m, k // 2), dtype=torch.uint8),
            x.new_empty(nvfp4.scale_shape(m, k), dtype=torch.float8_e4m3fn))


def samples_nvfp4_quantize(s):
    x = s.randn(37, 64)
    return x, nvfp4.global_scale(x)


SPEC = register(OpSpec(
    name="nvfp4_quantize",
    schema="nvfp4_quantize(Tensor x, Tensor global_scale) -> (Tensor packed, Tensor block_scale)",
    check=check_nvfp4_quantize, ref=ref.nvfp4_quantize, samples=samples_nvfp4_quantize, fake=fake_nvfp4_quantize,
    triton=triton_nvfp4.nvfp4_quantize, cuda=CudaKernel("nvfp4_quantize_cuda"),
))


def nvfp4_quantize(x: torch.Tensor, global_scale: torch.Tensor | float, *,
                   impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """NVFP4-quantize x: [M, K] (K % 16 == 0) with a DECODE-convention global scale (amax / (6*448);
    see `wan_kernels.nvfp4.global_scale`): a float32 1-element tensor or a Python float, finite and > 0 (0 only
    for an all-zero x). Returns packed uint8 [M, K/2] (low nibble = even element) and
    block_scale float8_e4m3fn [roundup(M,128), roundup(K/16,4)] in the 128x4 swizzled layout."""
    global_scale = as_scale("nvfp4_quantize", "global_scale", global_scale, x)
    return routing.resolve("nvfp4_quantize", impl, x.device)(x, global_scale)
