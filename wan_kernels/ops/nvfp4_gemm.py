"""wan::nvfp4_gemm: W4A4 block-scaled GEMM. Kernels: wan_kernels/ref/nvfp4.py, wan_kernels/triton/nvfp4.py,
csrc/nvfp4_gemm/ (CUTLASS sm100a, on the internal op nvfp4_gemm_sm100; compiled for the 10.0a target only)."""

from __future__ import annotations

import torch

from wan_kernels import ref, routing
from wan_kernels._checks import (as_scale, check_bias, check_global_scale, check_out_dtype, check_packed, same_device,
                                 shape_of)
from wan_kernels._spec import CudaKernel, OpSpec, register
from wan_kernels.triton import nvfp4 as triton_nvfp4

__all__ = ["nvfp4_gemm"]


def check_nvfp4_gemm(a, a_scale, a_global_scale, b, b_scale, b_global_scale, bias, out_dtype) -> None:
    op = "nvfp4_gemm"
    _, ka = check_packed(op, "a", a, "a_scale", a_scale)
    n, kb = check_packed(op, "b", b, "b_scale", b_scale)
    if ka != kb:
        raise ValueError(f"{op}: a {shape_of(a)} and b {shape_of(b)} disagree on K ({ka} vs {kb}); b is [N, K/2]")
    check_global_scale(op, "a_global_scale", a_global_scale, a, scaled=a)
    check_global_scale(op, "b_global_scale", b_global_scale, a, scaled=b)
    check_bias(op, bias, n)
    same_device(op, a, b=b, bias=bias)
    check_out_dtype(op, "out_dtype", out_dtype)


def fake_nvfp4_gemm(a, a_scale, a_global_scale, b, b_scale, b_global_scale, bias, out_dtype):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)


def nvfp4_gemm_flops(a_shape, a_scale_shape, a_gs_shape, b_shape, *args) -> int:
    """2 * M * N * K, K = 2 * a.shape[1] (two E2M1 values per byte)."""
    m, k_half = a_shape
    return 2 * m * b_shape[0] * 2 * k_half


def cutlass_accepts(a, a_scale, a_global_scale, b, b_scale, b_global_scale, bias, out_dtype) -> bool:
    """The calls the CUTLASS sm100a launcher takes (csrc/nvfp4_gemm/nvfp4_gemm_launcher.cu): bf16/fp16 output,
    K % 32 == 0 (32-element operand alignment) and N % 8 == 0 (16-byte output rows)."""
    return out_dtype in (torch.bfloat16, torch.float16) and (2 * a.shape[1]) % 32 == 0 and b.shape[0] % 8 == 0


def samples_nvfp4_gemm(s):
    return (*s.nvfp4(37, 64), *s.nvfp4(24, 64), s.randn(24, dtype=torch.float32), s.dtype)


SPEC = register(OpSpec(
    name="nvfp4_gemm",
    schema="nvfp4_gemm(Tensor a, Tensor a_scale, Tensor a_global_scale, Tensor b, Tensor b_scale, "
           "Tensor b_global_scale, Tensor? bias, ScalarType out_dtype) -> Tensor",
    check=check_nvfp4_gemm, ref=ref.nvfp4_gemm, samples=samples_nvfp4_gemm, fake=fake_nvfp4_gemm,
    triton=triton_nvfp4.nvfp4_gemm, cuda=CudaKernel("nvfp4_gemm_sm100", targets=("10.0a",), accepts=cutlass_accepts),
    flops=nvfp4_gemm_flops,
))


def nvfp4_gemm(a: torch.Tensor, a_scale: torch.Tensor, a_global_scale: torch.Tensor | float, b: torch.Tensor,
               b_scale: torch.Tensor, b_global_scale: torch.Tensor | float, bias: torch.Tensor | None = None,
               out_dtype: torch.dtype = torch.bfloat16, *, impl: str = "auto") -> torch.Tensor:
    """W4A4 block-scaled GEMM: out [M, N] = (a_gs * b_gs) * (A_q @ B_q^T) + bias.

    a: packed [M, K/2], b: packed [N, K/2] (both K-major, as CUTLASS sm100 wants), scales swizzled,
    global scales in the DECODE convention (alpha = a_global_scale * b_global_scale): float32 1-element tensors
    or Python floats, as `nvfp4_quantize`.
    """
    a_global_scale = as_scale("nvfp4_gemm", "a_global_scale", a_global_scale, a)
    b_global_scale = as_scale("nvfp4_gemm", "b_global_scale", b_global_scale, a)
    return routing.resolve("nvfp4_gemm", impl, a.device)(a, a_scale, a_global_scale, b, b_scale, b_global_scale, bias,
                                                         out_dtype)
