"""wan::nvfp4_dequantize: inverse of nvfp4_quantize. Kernels: wan_kernels/ref/nvfp4.py, wan_kernels/triton/nvfp4.py,
csrc/nvfp4/ (C++ CPU; CUDA on the internal op nvfp4_dequantize_cuda)."""

from __future__ import annotations

import torch

from wan_kernels import ref, routing
from wan_kernels._checks import as_scale, check_global_scale, check_out_dtype, check_packed
from wan_kernels._spec import CudaKernel, OpSpec, register
from wan_kernels.triton import nvfp4 as triton_nvfp4

__all__ = ["nvfp4_dequantize"]


def check_nvfp4_dequantize(packed, block_scale, global_scale, dtype) -> None:
    op = "nvfp4_dequantize"
    check_packed(op, "packed", packed, "block_scale", block_scale)
    check_global_scale(op, "global_scale", global_scale, packed, scaled=packed)
    check_out_dtype(op, "dtype", dtype)


def fake_nvfp4_dequantize(packed, block_scale, global_scale, dtype):
    return packed.new_empty((packed.shape[0], packed.shape[1] * 2), dtype=dtype)


def samples_nvfp4_dequantize(s):
    return (*s.nvfp4(37, 64), s.dtype)


SPEC = register(OpSpec(
    name="nvfp4_dequantize",
    schema="nvfp4_dequantize(Tensor packed, Tensor block_scale, Tensor global_scale, ScalarType dtype) -> Tensor",
    check=check_nvfp4_dequantize, ref=ref.nvfp4_dequantize, samples=samples_nvfp4_dequantize,
    fake=fake_nvfp4_dequantize, triton=triton_nvfp4.nvfp4_dequantize, cuda=CudaKernel("nvfp4_dequantize_cuda"),
))


def nvfp4_dequantize(packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor | float,
                     dtype: torch.dtype = torch.bfloat16, *, impl: str = "auto") -> torch.Tensor:
    """Inverse of `nvfp4_quantize`: [M, K] = (e2m1 * block_scale) * global_scale in `dtype` (global_scale: a
    float32 1-element tensor or a Python float, as `nvfp4_quantize`)."""
    global_scale = as_scale("nvfp4_dequantize", "global_scale", global_scale, packed)
    return routing.resolve("nvfp4_dequantize", impl, packed.device)(packed, block_scale, global_scale, dtype)
