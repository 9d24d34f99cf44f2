"""References against independent formulations (the references are the spec of every backend).

Tolerances: fp32 ops computed two ways (different summation order / op fusion) agree to a few ulps
of O(1) values: 1e-5 absolute covers the <= 5120-term reductions here with margin (observed ~1e-6).
fp64 comparisons use 1e-12.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import wan_kernels
from wan_kernels import ref
from wan_kernels.testing import FP32_ATOL
from wan_kernels.ref.qk_norm_rope import rms_norm, rope_interleaved



def _sdpa(q, k, v, scale=None):
    # [B, S, H, D] -> SDPA's [B, H, S, D]
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          scale=scale).transpose(1, 2)


@pytest.mark.slow
@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 2), sq=st.sampled_from([1, 17, 128, 300]), sk=st.sampled_from([1, 77, 257, 512]),
       h=st.integers(1, 4), d=st.sampled_from([64, 128]), with_img=st.booleans(), seed=st.integers(0, 2**16))
def test_attention_matches_sdpa_fp64(b, sq, sk, h, d, with_img, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, h, d, generator=g, dtype=torch.float64) for n in (sq, sk, sk))
    want = _sdpa(q, k, v)
    ki = vi = None
    if with_img:
        ki, vi = (torch.randn(b, 257, h, d, generator=g, dtype=torch.float64) for _ in range(2))
        want = want + _sdpa(q, ki, vi)  # two independent softmaxes, summed (not one over the union)
    got = ref.attention(q, k, v, ki, vi)
    assert got.dtype == torch.float64 and got.shape == (b, sq, h, d)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_attention_image_branch_is_not_a_union_softmax():
    g = torch.Generator().manual_seed(0)
    q, k, v, ki, vi = (torch.randn(1, 5, 2, 64, generator=g, dtype=torch.float64) for _ in range(5))
    union = _sdpa(q, torch.cat([k, ki], 1), torch.cat([v, vi], 1))
    assert (ref.attention(q, k, v, ki, vi) - union).abs().max() > 0.1


def test_attention_scale_and_value_dim():
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(2, 9, 3, 64, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(2, 9, 3, 32, generator=g, dtype=torch.float64)
    torch.testing.assert_close(ref.attention(q, k, v, scale=0.3), _sdpa(q, k, v, scale=0.3), rtol=0, atol=1e-12)


def test_attention_low_precision_rounds_once():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 33, 2, 64, generator=g) for _ in range(3))
    got = ref.attention(q.half(), k.half(), v.half())
    want = _sdpa(q.half().double(), k.half().double(), v.half().double())
    assert got.dtype == torch.float16
    # fp32 math, one rounding to fp16: within one fp16 ulp (2^-11 relative) of the exact result.
    assert ((got.double() - want).abs() <= want.abs() * 2**-11 + 1e-6).all()


@settings(max_examples=20, deadline=None)
@given(s=st.integers(1, 40), c=st.sampled_from([64, 256, 1536, 5120]), seed=st.integers(0, 2**16))
def test_rms_norm_matches_torch(s, c, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, s, c, generator=g) * 3
    w = torch.randn(c, generator=g)
    torch.testing.assert_close(rms_norm(x, w, 1e-6), F.rms_norm(x, (c,), w, 1e-6), rtol=0, atol=FP32_ATOL)


@settings(max_examples=20, deadline=None)
@given(s=st.integers(1, 40), h=st.integers(1, 4), d=st.sampled_from([2, 64, 128]), seed=st.integers(0, 2**16))
def test_rope_matches_complex_rotation(s, h, d, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, s, h, d, generator=g, dtype=torch.float64)
    theta = torch.rand(s, d // 2, generator=g, dtype=torch.float64) * 2 * math.pi
    # A pair (x0, x1) is the complex number x0 + i x1, rotated by e^{i theta}.
    z = torch.view_as_complex(x.reshape(2, s, h, d // 2, 2).contiguous())
    want = torch.view_as_real(z * torch.polar(torch.ones_like(theta), theta)[None, :, None, :]).flatten(-2)
    got = rope_interleaved(x, theta.cos(), theta.sin())
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def _qk_norm_rope_unfused(qkv, wq, wk, cos, sin, heads, eps):
    """The diffusers sequence in fp64: norm_q, norm_k (across heads), unflatten, complex RoPE on q and k."""
    C = qkv.shape[-1] // 3
    q, k, v = qkv.double().split(C, -1)
    q = F.rms_norm(q, (C,), wq.double(), eps).unflatten(-1, (heads, -1))
    k = F.rms_norm(k, (C,), wk.double(), eps).unflatten(-1, (heads, -1))
    rot = torch.complex(cos.double(), sin.double())[None, :, None, :]

    def rope(x):
        return torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2)).contiguous()) * rot).flatten(-2)

    return rope(q), rope(k), v.unflatten(-1, (heads, -1))


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["ref", "cpu"])
@pytest.mark.parametrize("b,s,heads,d", [(1, 1, 2, 128), (2, 17, 2, 64), (1, 769, 2, 128), (2, 5, 40, 128)])
def test_qk_norm_rope_fp32(impl, b, s, heads, d):
    g = torch.Generator().manual_seed(s * heads)
    C = heads * d
    qkv = torch.randn(b, s, 3 * C, generator=g)
    wq, wk = torch.randn(C, generator=g), torch.randn(C, generator=g)
    ang = torch.rand(s, d // 2, generator=g) * 100
    got = wan_kernels.qk_norm_rope(qkv, wq, wk, ang.cos(), ang.sin(), heads, 1e-6, impl=impl)
    want = _qk_norm_rope_unfused(qkv, wq, wk, ang.cos(), ang.sin(), heads, 1e-6)
    for gt, wt in zip(got, want):
        assert gt.shape == (b, s, heads, d) and gt.dtype == torch.float32 and gt.is_contiguous()
        torch.testing.assert_close(gt.double(), wt, rtol=0, atol=FP32_ATOL)


@pytest.mark.parametrize("impl", ["ref", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_qk_norm_rope_low_precision_rounds_once(impl, dtype):
    g = torch.Generator().manual_seed(3)
    heads, d, s = 3, 64, 19
    C = heads * d
    qkv = torch.randn(2, s, 3 * C, generator=g).to(dtype)
    wq, wk = torch.randn(C, generator=g).to(dtype), torch.randn(C, generator=g).to(dtype)
    ang = torch.rand(s, d // 2, generator=g) * 100
    got = wan_kernels.qk_norm_rope(qkv, wq, wk, ang.cos(), ang.sin(), heads, 1e-6, impl=impl)
    want = _qk_norm_rope_unfused(qkv, wq, wk, ang.cos(), ang.sin(), heads, 1e-6)
    ulp = {torch.float16: 2**-11, torch.bfloat16: 2**-8}[dtype]  # half an ulp = unit roundoff
    for gt, wt in zip(got, want):
        assert gt.dtype == dtype
        # exact fp64 result rounded once: |err| <= u * |x| (+ tiny slack for fp32 math, 1e-5 abs)
        assert ((gt.double() - wt).abs() <= wt.abs() * ulp + FP32_ATOL).all()


def test_qk_norm_rope_non_contiguous_and_strided():
    g = torch.Generator().manual_seed(4)
    heads, d, s = 2, 64, 11
    C = heads * d
    big = torch.randn(s, 3, 3 * C + 5, generator=g)
    qkv = big[:, :2, 3:3 + 3 * C].transpose(0, 1)  # [2, s, 3C], strides (3C+5, 3*(3C+5), 1)
    assert not qkv.is_contiguous()
    wq, wk = torch.randn(C, generator=g), torch.randn(C, generator=g)
    ang = torch.rand(s, d // 2, generator=g)
    for impl in ("ref", "cpu"):
        got = wan_kernels.qk_norm_rope(qkv, wq, wk, ang.cos(), ang.sin(), heads, impl=impl)
        want = _qk_norm_rope_unfused(qkv.contiguous(), wq, wk, ang.cos(), ang.sin(), heads, 1e-6)
        for gt, wt in zip(got, want):
            torch.testing.assert_close(gt.double(), wt, rtol=0, atol=FP32_ATOL)


@pytest.mark.parametrize("impl", ["auto", "ref", "cpu"])
def test_qkv_rope_is_one_gemm_then_qk_norm_rope(impl):
    g = torch.Generator().manual_seed(5)
    heads, d, s = 2, 64, 13
    C = heads * d
    x = torch.randn(2, s, C, generator=g)
    wqkv, bqkv = torch.randn(3 * C, C, generator=g) * 0.1, torch.randn(3 * C, generator=g)
    wq, wk = torch.randn(C, generator=g), torch.randn(C, generator=g)
    ang = torch.rand(s, d // 2, generator=g)
    got = wan_kernels.qkv_rope(x, wqkv, bqkv, wq, wk, ang.cos(), ang.sin(), heads, impl=impl)
    # Separate q/k/v projections, as diffusers does them, then the unfused sequence.
    wq_, wk_, wv_ = wqkv.double().split(C)
    bq_, bk_, bv_ = bqkv.double().split(C)
    xd = x.double()
    qkv = torch.cat([F.linear(xd, wq_, bq_), F.linear(xd, wk_, bk_), F.linear(xd, wv_, bv_)], -1)
    want = _qk_norm_rope_unfused(qkv, wq, wk, ang.cos(), ang.sin(), heads, 1e-6)
    for gt, wt in zip(got, want):
        torch.testing.assert_close(gt.double(), wt, rtol=0, atol=FP32_ATOL)
