"""The C++ CPU kernel of wan::attention (impl="cpu", what impl="auto" runs on CPU) against an fp64 reference:
error at most 2x that of F.scaled_dot_product_attention at the same precision (flash-attention's rule),
plus the exact I2V semantics (two softmaxes summed) and layouts."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import wan_kernels
from wan_kernels import ref


def _sdpa(q, k, v, scale=None):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          scale=scale).transpose(1, 2)


def _inputs(b, sq, sk, si, h, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, h, d, generator=g).to(dtype) for n in (sq, sk, sk))
    ki = vi = None
    if si:
        ki, vi = (torch.randn(b, si, h, d, generator=g).to(dtype) for _ in range(2))
    return q, k, v, ki, vi


def _check_rule(q, k, v, ki, vi):
    exact = ref.attention(*(None if t is None else t.double() for t in (q, k, v, ki, vi)))
    sdpa = _sdpa(q, k, v) + (_sdpa(q, ki, vi) if ki is not None else 0)
    ours = wan_kernels.attention(q, k, v, ki, vi, impl="cpu")
    assert ours.dtype == q.dtype and ours.shape == exact.shape
    err = (ours.double() - exact).abs().max().item()
    err_sdpa = (sdpa.double() - exact).abs().max().item()
    # 2x SDPA's error; the floor is one rounding of the output (fp32 math, one cast): half an ulp of |out|<~4
    floor = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[q.dtype]
    assert err <= 2 * err_sdpa + floor, (err, err_sdpa)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,sq,sk,si,h,d", [(1, 1, 1, 0, 1, 64), (2, 17, 77, 257, 2, 128), (1, 300, 512, 257, 4, 128),
                                            (2, 128, 257, 0, 3, 64), (1, 1100, 33, 5, 1, 64)])
def test_matches_fp64_within_sdpa_rule(dtype, b, sq, sk, si, h, d):
    _check_rule(*_inputs(b, sq, sk, si, h, d, dtype, seed=sq + sk))


@settings(max_examples=60, deadline=None)
@given(b=st.integers(1, 2), sq=st.integers(1, 200), sk=st.integers(1, 300), si=st.sampled_from([0, 1, 77, 257]),
       h=st.integers(1, 4), d=st.sampled_from([64, 128]), seed=st.integers(0, 2**16))
def test_hypothesis_fp32(b, sq, sk, si, h, d, seed):
    _check_rule(*_inputs(b, sq, sk, si, h, d, torch.float32, seed))


def test_i2v_is_sum_of_two_calls_and_layouts():
    q, k, v, ki, vi = _inputs(2, 40, 30, 20, 2, 64, torch.float32, 1)
    both = wan_kernels.attention(q, k, v, ki, vi, impl="cpu")
    two = wan_kernels.attention(q, k, v, impl="cpu") + wan_kernels.attention(q, ki, vi, impl="cpu")
    torch.testing.assert_close(both, two, rtol=0, atol=1e-6)  # same fp32 math, one extra rounding in `two`
    packed = torch.randn(2, 40, 3, 2, 64)                        # q/k/v as slices of a packed qkv tensor
    qs, ks, vs = packed.unbind(2)
    torch.testing.assert_close(wan_kernels.attention(qs, ks, vs, impl="cpu"), ref.attention(qs, ks, vs),
                               rtol=0, atol=1e-5)
    vv = torch.randn(2, 30, 2, 32)                                # value dim != head dim, explicit scale
    torch.testing.assert_close(wan_kernels.attention(q, k, vv, scale=0.3, impl="cpu"),
                               ref.attention(q, k, vv, scale=0.3), rtol=0, atol=1e-5)
