"""Triton NVFP4 kernels under the interpreter: the quantizer and dequantizer bit-exact against the
reference (random, adversarial, hypothesis); the W4A4 emulation equals the reference W4A4 math; the
W4A16 fallback GEMM equals dequantize-then-matmul in fp32 within the fp16 output rounding."""

import math

import pytest
import torch
import triton.language as tl
from hypothesis import given, settings, strategies as st

import wan_kernels
from wan_kernels import nvfp4, ref
from wan_kernels.testing import TOLERANCE
from wan_kernels.triton import nvfp4 as tnv

from _helpers import assert_same_quant
from _inputs import nvfp4_adversarial


pytestmark = pytest.mark.usefixtures("triton_interpreter")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,k", [(1, 16), (130, 64), (257, 80), (37, 1040)])
def test_quantize_random_bit_exact(dtype, m, k):
    # bf16 is loaded and upcast before any arithmetic, which the interpreter does correctly.
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(m + k)) * torch.logspace(-3, 3, k)).to(dtype)
    gs = nvfp4.global_scale(x)
    got = wan_kernels.nvfp4_quantize(x, gs, impl="triton")
    assert_same_quant(got, ref.nvfp4_quantize(x, gs))
    back = wan_kernels.nvfp4_dequantize(*got, gs, torch.float32, impl="triton")
    assert torch.equal(back, ref.nvfp4_dequantize(*got, gs, torch.float32))


@pytest.mark.parametrize("gs", [1.0, 2**-9, 1 / 448, 3.7e-3])
def test_quantize_adversarial_bit_exact(gs):
    x = nvfp4_adversarial(gs)
    assert_same_quant(tnv.nvfp4_quantize(x, torch.tensor(gs)), ref.nvfp4_quantize(x, torch.tensor(gs)))


def test_quantize_zero_nan_inf_and_strided():
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(3))
    x[0, 3], x[1, 5], x[1, 20] = float("nan"), float("inf"), float("-inf")
    x[2:4] = 0
    for gs in (nvfp4.global_scale(x[2:4]), torch.tensor(1 / 448)):  # all-zero tensor scale 0; finite scale
        assert_same_quant(tnv.nvfp4_quantize(x, gs), ref.nvfp4_quantize(x, gs))
    xt = torch.randn(64, 40, generator=torch.Generator().manual_seed(4)).T  # non-contiguous [40, 64]
    gs = nvfp4.global_scale(xt)
    assert_same_quant(tnv.nvfp4_quantize(xt, gs), ref.nvfp4_quantize(xt.contiguous(), gs))


@settings(max_examples=8, deadline=None)
@given(m=st.integers(1, 70), kb=st.integers(1, 10), log_scale=st.floats(-20, 20), seed=st.integers(0, 2**16))
def test_quantize_hypothesis_bit_exact(m, kb, log_scale, seed):
    x = torch.randn(m, kb * 16, generator=torch.Generator().manual_seed(seed)) * 2.0**log_scale
    gs = nvfp4.global_scale(x)
    assert_same_quant(tnv.nvfp4_quantize(x, gs), ref.nvfp4_quantize(x, gs))


def _operands(m, n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) * 0.1
    ga, gb = nvfp4.global_scale(a), nvfp4.global_scale(b)
    return a, ga, ref.nvfp4_quantize(a, ga), b, gb, ref.nvfp4_quantize(b, gb), torch.randn(n, generator=g)


@pytest.mark.slow
@pytest.mark.parametrize("m,n,k", [(1, 8, 16), (70, 40, 96), (33, 65, 208)])
def test_w4a4_emulation_equals_reference(m, n, k):
    a, ga, qa, b, gb, qb, bias = _operands(m, n, k)
    got = wan_kernels.nvfp4_gemm(*qa, ga, *qb, gb, bias, torch.float32, impl="triton")
    want = ref.nvfp4_gemm(*qa, ga, *qb, gb, bias, torch.float32)
    # Decoded operands are exact; products exact in fp32; only the fp32 accumulation order differs (tile
    # K=64 vs one matmul): a few fp32 ulps of the sum of |products| (K <= 208 terms of size <= ~50).
    scale = (ref.nvfp4_dequantize(*qa, ga, torch.float32).abs() @ ref.nvfp4_dequantize(*qb, gb, torch.float32).abs().T)
    assert ((got - want).abs() <= 8 * 2**-24 * scale + 1e-6).all()
    got16 = wan_kernels.nvfp4_gemm(*qa, ga, *qb, gb, None, torch.float16, impl="triton")
    want16 = ref.nvfp4_gemm(*qa, ga, *qb, gb, None, torch.float16)
    # one fp16 rounding of (nearly) the same fp32 value: at most one fp16 ulp apart
    assert ((got16.float() - want16.float()).abs() <= want16.float().abs() * 2**-10 + 2**-24).all()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", [(1, 8, 16), (70, 40, 96), (33, 65, 208)])
def test_w4a16_equals_dequantize_then_matmul(m, n, k, dtype):
    """bf16 too: the interpreter's bf16 dot is garbage (~1e8 off, REFERENCE §1), so the interpreted launch dots
    the same exact values in fp32 (`tnv.dot_dtype`); this checks the kernel the GPU runs in bf16."""
    a, _, _, b, gb, qb, bias = _operands(m, n, k, seed=1)
    x = a.to(dtype)
    got = tnv.nvfp4_linear_w4a16(x, *qb, gb, bias.to(dtype))
    want = x.double() @ ref.nvfp4_dequantize(*qb, gb, torch.float64).T + bias.to(dtype).double()
    # The decoded weight tile is exact in fp16/bf16 (e2m1 x e4m3 has <= 5 significant bits), the dot accumulates
    # in fp32 and the result is rounded once to x's dtype: |err| <= half an ulp of the result
    # (TOLERANCE[dtype].half_ulp relative) + the fp32 accumulation error (a few 2^-24 of sum |x||w|), + the gs
    # multiply (1 fp32 ulp).
    scale = x.double().abs() @ ref.nvfp4_dequantize(*qb, gb, torch.float64).abs().T
    err = (got.double() - want).abs()
    assert got.dtype == dtype and got.shape == (m, n)
    assert (err <= want.abs() * TOLERANCE[dtype].half_ulp + 8 * 2**-24 * scale + 2**-24).all(), err.max()


@pytest.mark.parametrize("m,n,k", [(1, 8, 16), (70, 130, 96)])
def test_dgrad_bf16_equals_matmul_with_dequantized_weight(m, n, k):
    """The dgrad kernel (wan::nvfp4_linear_backward) in bf16 under the interpreter, by the forward's rule."""
    _, _, _, b, gb, qb, _ = _operands(m, n, k, seed=4)
    dy = torch.randn(2, m, n, generator=torch.Generator().manual_seed(5)).bfloat16()
    got = tnv.nvfp4_linear_backward(dy, *qb, gb)
    w64 = ref.nvfp4_dequantize(*qb, gb, torch.float64)
    want, scale = dy.double() @ w64, dy.double().abs() @ w64.abs()
    assert got.dtype == torch.bfloat16 and got.shape == (2, m, k)
    err = (got.double() - want).abs()
    assert (err <= want.abs() * TOLERANCE[torch.bfloat16].half_ulp + 8 * 2**-24 * scale + 2**-24).all(), err.max()


def test_interpreted_bf16_launch_is_the_compiled_kernel():
    """The interpreted bf16 launch differs from the compiled one (the launches readiness compiles on meta tensors)
    only in the dot / output dtype and the tile: same kernel function, same arguments; fp16 and compiled bf16
    dot in their own dtype."""
    from wan_kernels.triton._launch import kernel_for

    x = torch.randn(70, 96).bfloat16()
    _, _, _, b, gb, (wp, ws), bias = _operands(70, 40, 96)
    interp, out = tnv.prepare_w4a16(x, wp, ws, gb, bias.bfloat16(), None)
    assert interp.kwargs["DOT_DTYPE"] == tl.float32 and out.dtype == torch.float32
    assert interp.kernel is tnv._nvfp4_gemm_kernel
    assert kernel_for(interp).fn.__code__ is tnv._nvfp4_gemm_kernel.fn.__code__  # the interpreter runs its source
    assert tnv.prepare_w4a16(x.half(), wp, ws, gb, None, None)[0].kwargs["DOT_DTYPE"] == tl.float16
    meta = lambda t: torch.empty_like(t, device="meta")  # noqa: E731
    for cap in ((8, 0), (9, 0), (10, 0)):
        comp, cout = tnv.prepare_w4a16(meta(x), meta(wp), meta(ws), meta(gb), meta(bias.bfloat16()), cap)
        assert comp.kernel is interp.kernel and comp.kwargs["DOT_DTYPE"] == tl.bfloat16 and cout.dtype == torch.bfloat16
        tile = set(tnv.gemm_config(70, cap, False))
        assert {k: v for k, v in comp.kwargs.items() if k not in tile | {"DOT_DTYPE"}} == \
            {k: v for k, v in interp.kwargs.items() if k not in tile | {"DOT_DTYPE"}}
        assert len(comp.args) == len(interp.args) and comp.args[7:] == interp.args[7:]
        dgrad = tnv.prepare_dgrad(meta(torch.empty(70, 40).bfloat16()), meta(wp), meta(ws), meta(gb), cap)[0]
        assert dgrad.kwargs["DOT_DTYPE"] == tl.bfloat16


def _column_major(t: torch.Tensor) -> torch.Tensor:
    """The same values with strides (1, rows): what a transposed copy of a scale tensor gives."""
    return t.t().contiguous().t()


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as every second element of a buffer twice as long (stride 2)."""
    buf = torch.zeros(2 * t.shape[0], dtype=t.dtype)
    buf[::2] = t
    return buf[::2]


@pytest.mark.slow
def test_strided_block_scales_and_bias():
    """Column-major block scales and packed operands and a stride-2 bias give the results of contiguous ones,
    bit for bit (the launchers indexed them as contiguous buffers: errors as large as the output)."""
    a, ga, qa, b, gb, qb, bias = _operands(70, 40, 96, seed=2)
    d = wan_kernels.nvfp4_dequantize(*qa, ga, torch.float32, impl="triton")
    assert torch.equal(wan_kernels.nvfp4_dequantize(_column_major(qa[0]), _column_major(qa[1]), ga, torch.float32,
                                                    impl="triton"), d)
    want = wan_kernels.nvfp4_gemm(*qa, ga, *qb, gb, bias, torch.float32, impl="triton")
    got = wan_kernels.nvfp4_gemm(qa[0], _column_major(qa[1]), ga, _column_major(qb[0]), _column_major(qb[1]), gb,
                                 _strided(bias), torch.float32, impl="triton")
    assert torch.equal(got, want)
    x = a.half()
    want = wan_kernels.nvfp4_linear(x, *qb, gb, bias.half(), impl="triton")
    got = wan_kernels.nvfp4_linear(x, qb[0], _column_major(qb[1]), gb, _strided(bias.half()), impl="triton")
    assert torch.equal(got, want)


def test_w4a16_rejects_fp32_activations():
    a, _, _, b, gb, qb, _ = _operands(4, 8, 16)
    with pytest.raises(ValueError, match="float16/bfloat16"):
        tnv.nvfp4_linear_w4a16(a, *qb, gb, None)
