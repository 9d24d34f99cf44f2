"""NVFP4 format: the reference against hand-computed values, and every quantizer backend bit-exact
against the reference (random, adversarial and hypothesis inputs). Quantization is exact: no tolerance."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import wan_kernels
from wan_kernels import nvfp4, ref
from wan_kernels.ref.nvfp4 import e2m1_decode, e2m1_encode

from _helpers import assert_same_quant
from _inputs import nvfp4_adversarial

CPU_QUANT_IMPLS = ["ref", "cpu", "auto"]


def _bytes(t):
    return t.view(torch.uint8)


def _unpack(packed):
    return torch.stack((packed & 0xF, packed >> 4), -1).reshape(packed.shape[0], -1)


# ---------------------------------------------------------------------------------------------
# Hand-computed values


def test_e2m1_table():
    values = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6, -0.5, -6, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, 7, -7,
                           0.26, 0.74, 1e9, -0.1, float("nan"), float("inf")])
    codes = [0, 1, 2, 3, 4, 5, 6, 7, 9, 15, 0, 2, 2, 4, 4, 6, 6, 7, 15,
             1, 1, 7, 8, 0, 7]
    assert e2m1_encode(values).tolist() == codes
    assert e2m1_decode(torch.arange(16, dtype=torch.uint8)).tolist() == \
        [0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6]


def test_quantize_hand_computed_block():
    # gs = 1/448: a block with amax 6 gets scale min(6/6/gs, 448) = 448 (0x7E) and divisor 448*gs = 1.
    x = torch.tensor([[6., -6., 3., .5, .25, .75, 5., -5., 0., 1., 2., 4., 1.5, -0., 2.5, 3.5]])
    packed, scale = ref.nvfp4_quantize(x, torch.tensor(1 / 448))
    assert _unpack(packed).tolist() == [[7, 15, 5, 1, 0, 2, 6, 14, 0, 2, 4, 6, 3, 8, 4, 6]]
    assert packed[0, 0].item() == 0x7 | 0xF << 4  # low nibble = element 0
    assert scale.shape == (128, 4) and _bytes(scale)[0, 0].item() == 0x7E
    assert _bytes(scale).flatten()[1:].eq(0).all()  # padding zero-filled


def test_block_scale_rounding_hand_computed():
    # gs = 1: block amax 6 * s -> scale byte e4m3(s). s = 1.0 -> 0x38; s = 0.3 -> 0.3125 (0x2A, RNE of 0.3);
    # s = 500 -> saturates at 448 (0x7E, clamped BEFORE the cast; torch's cast of 500 would give NaN);
    # s = 2^-10 -> ties to 0 (even) -> the block quantizes to codes 0.
    for s, byte in [(1.0, 0x38), (0.3, 0x2A), (500.0, 0x7E), (2**-9, 0x01), (2**-10, 0x00)]:
        x = torch.zeros(1, 16)
        x[0, 3] = 6 * s
        packed, scale = ref.nvfp4_quantize(x, torch.tensor(1.0))
        assert _bytes(scale)[0, 0].item() == byte, s
        if byte == 0:
            assert packed.eq(0).all()


def test_swizzle_matches_formula():
    for m, ks in [(1, 1), (130, 4), (257, 5), (128, 32), (300, 65)]:
        s = torch.arange(m * ks, dtype=torch.int64).reshape(m, ks) + 1
        sw = nvfp4.swizzle_scales(s)
        mp, kp = nvfp4.scale_shape(m, ks * 16)
        assert sw.shape == (mp, kp)
        flat = sw.flatten()
        mm, kk = torch.meshgrid(torch.arange(m), torch.arange(ks), indexing="ij")
        off = ((mm // 128) * (kp // 4) + kk // 4) * 512 + (mm % 32) * 16 + ((mm % 128) // 32) * 4 + kk % 4
        assert torch.equal(flat[off.flatten()], s.flatten())
        assert int((flat != 0).sum()) == m * ks  # padding zero-filled
        assert torch.equal(nvfp4.unswizzle_scales(sw, m, ks), s)


def test_e4m3_scale_encoding_matches_torch_cast():
    # Every representable scale, every midpoint between neighbours, and random values in [0, 448].
    codes = torch.arange(0x7F, dtype=torch.uint8)
    vals = codes.view(torch.float8_e4m3fn).float()
    mids = (vals[1:] + vals[:-1]) / 2
    rand = torch.rand(4000, generator=torch.Generator().manual_seed(0)) ** 8 * 448
    s = torch.cat([vals, mids, torch.nextafter(mids, torch.zeros_like(mids)), torch.nextafter(mids, mids + 1), rand])
    # Quantize blocks whose amax is 6 * s with gs = 1 so the scale is exactly s.
    x = torch.zeros(len(s), 16)
    x[:, 0] = s * 6
    for impl in ("ref", "cpu"):
        _, scale = wan_kernels.nvfp4_quantize(x, torch.tensor(1.0), impl=impl)
        got = nvfp4.unswizzle_scales(_bytes(scale), len(s), 1).flatten()
        assert torch.equal(got, _bytes((x[:, 0] / 6).to(torch.float8_e4m3fn))), impl


# ---------------------------------------------------------------------------------------------
# Backends bit-exact against the reference


@pytest.mark.parametrize("impl", CPU_QUANT_IMPLS[1:])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,k", [(1, 16), (130, 64), (257, 80), (128, 512), (300, 1040)])
def test_quantize_random_bit_exact(impl, dtype, m, k):
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(m + k)) *
         torch.logspace(-3, 3, k)).to(dtype)
    gs = nvfp4.global_scale(x)
    assert_same_quant(wan_kernels.nvfp4_quantize(x, gs, impl=impl), ref.nvfp4_quantize(x, gs))


@pytest.mark.parametrize("impl", CPU_QUANT_IMPLS[1:])
@pytest.mark.parametrize("gs", [1.0, 2**-9, 1 / 448, 3.7e-3])
def test_quantize_adversarial_bit_exact(impl, gs):
    x = nvfp4_adversarial(gs)
    got = wan_kernels.nvfp4_quantize(x, torch.tensor(gs), impl=impl)
    want = ref.nvfp4_quantize(x, torch.tensor(gs))
    assert_same_quant(got, want)
    if math.log2(gs).is_integer():
        # With a power-of-two global scale every product above is exact, so the midpoints are exact
        # ties, and each goes to its even neighbour (other gs round amax/6/gs off the tie).
        assert _unpack(want[0])[0, :8].tolist() == [0, 2, 2, 4, 4, 6, 6, 7]


@pytest.mark.parametrize("impl", CPU_QUANT_IMPLS)
def test_all_zero_tensor(impl):
    x = torch.zeros(3, 32)
    gs = nvfp4.global_scale(x)
    assert gs.item() == 0.0
    packed, scale = wan_kernels.nvfp4_quantize(x, gs, impl=impl)
    assert packed.eq(0).all() and _bytes(scale).eq(0).all()
    back = wan_kernels.nvfp4_dequantize(packed, scale, gs, torch.float32, impl=impl)
    assert back.eq(0).all() and not back.isnan().any()


@pytest.mark.parametrize("impl", CPU_QUANT_IMPLS)
def test_strided_packed_and_block_scales(impl):
    """Column-major packed codes and block scales (strides (1, rows)) and a stride-2 bias dequantize and
    multiply exactly as contiguous ones (the C++ launchers copy them to the contiguous layout they index)."""
    g = torch.Generator().manual_seed(21)
    a, b, bias = torch.randn(70, 96, generator=g), torch.randn(40, 96, generator=g), torch.randn(80, generator=g)
    ga, gb = nvfp4.global_scale(a), nvfp4.global_scale(b)
    (pa, sa), (pb, sb) = (wan_kernels.nvfp4_quantize(t, gs, impl=impl) for t, gs in ((a, ga), (b, gb)))
    cm = [t.t().contiguous().t() for t in (pa, sa, pb, sb)]
    assert not any(t.is_contiguous() for t in cm)
    want = wan_kernels.nvfp4_dequantize(pa, sa, ga, torch.float32, impl=impl)
    assert torch.equal(wan_kernels.nvfp4_dequantize(cm[0], cm[1], ga, torch.float32, impl=impl), want)
    want = wan_kernels.nvfp4_gemm(pa, sa, ga, pb, sb, gb, bias[::2].contiguous(), torch.float32)
    assert torch.equal(wan_kernels.nvfp4_gemm(*cm[:2], ga, *cm[2:], gb, bias[::2], torch.float32), want)


@pytest.mark.parametrize("impl", CPU_QUANT_IMPLS)
def test_nan_inf_policy(impl):
    x = torch.randn(2, 32, generator=torch.Generator().manual_seed(7))
    x[0, 3] = float("nan")
    x[1, 5] = float("inf")
    x[1, 20] = float("-inf")
    gs = torch.tensor(1 / 448)
    packed, scale = wan_kernels.nvfp4_quantize(x, gs, impl=impl)
    assert_same_quant((packed, scale), ref.nvfp4_quantize(x, gs))
    codes = _unpack(packed)
    assert codes[0, 3] == 0                      # NaN -> 0, ignored by the block amax
    assert codes[1, 5] == 7 and codes[1, 20] == 15  # +-Inf saturate to +-6
    sc = nvfp4.unswizzle_scales(_bytes(scale), 2, 2)
    assert sc[1].tolist() == [0x7E, 0x7E]          # an Inf block's scale saturates at 448
    back = wan_kernels.nvfp4_dequantize(packed, scale, gs, torch.float32, impl=impl)
    assert not back.isnan().any()


@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 140), kb=st.integers(1, 9), log_scale=st.floats(-20, 20), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_quantize_hypothesis_bit_exact(m, kb, log_scale, seed, dtype):
    x = (torch.randn(m, kb * 16, generator=torch.Generator().manual_seed(seed)) * 2.0**log_scale).to(dtype)
    gs = nvfp4.global_scale(x)
    want = ref.nvfp4_quantize(x, gs)
    assert_same_quant(wan_kernels.nvfp4_quantize(x, gs, impl="cpu"), want)
    for dt in (torch.float32, torch.bfloat16):
        assert torch.equal(wan_kernels.nvfp4_dequantize(*want, gs, dt, impl="cpu"),
                           ref.nvfp4_dequantize(*want, gs, dt))


@pytest.mark.parametrize("impl", CPU_QUANT_IMPLS)
def test_roundtrip_error_within_analytic_bound(impl):
    """|x - deq(q(x))| <= half an E2M1 step at the element's magnitude, times the block's divisor d =
    scale * gs: the step is 0.5 below 2, 1 in [2, 4), 2 above 4 (and the last step to 6 saturates
    nothing: amax maps to <= 6 because scale >= amax/6 up to E4M3 rounding, which may push amax/d to
    at most 6 * (1 + 2^-4) -> clipped to 6, an extra error of at most amax - 6d)."""
    x = torch.randn(257, 256, generator=torch.Generator().manual_seed(11)) * 5
    gs = nvfp4.global_scale(x)
    packed, scale = wan_kernels.nvfp4_quantize(x, gs, impl=impl)
    back = wan_kernels.nvfp4_dequantize(packed, scale, gs, torch.float32, impl=impl)
    d = nvfp4.unswizzle_scales(_bytes(scale), 257, 16).view(torch.float8_e4m3fn).float() * gs  # [M, Ks]
    d = d.repeat_interleave(16, dim=1)
    y = (x / d).abs()
    half_step = torch.where(y < 2, 0.25, torch.where(y < 4, 0.5, 1.0))
    bound = half_step * d + (x.abs() - 6 * d).clamp(min=0) + 1e-6 * x.abs()
    assert ((x - back).abs() <= bound).all()
    # and the bound is not vacuous: the SNR of NVFP4 on Gaussian data is about 20 dB
    snr = 10 * math.log10(float(x.pow(2).sum() / (x - back).pow(2).sum()))
    assert 15 < snr < 30, snr


def test_gemm_reference_is_dequantize_then_matmul():
    g = torch.Generator().manual_seed(12)
    a, b = torch.randn(33, 64, generator=g), torch.randn(20, 64, generator=g)
    bias = torch.randn(20, generator=g)
    ga, gb = nvfp4.global_scale(a), nvfp4.global_scale(b)
    qa, qb = ref.nvfp4_quantize(a, ga), ref.nvfp4_quantize(b, gb)
    out = wan_kernels.nvfp4_gemm(*qa, ga, *qb, gb, bias, torch.float32)
    da = ref.nvfp4_dequantize(*qa, ga, torch.float64)
    db = ref.nvfp4_dequantize(*qb, gb, torch.float64)
    want = da @ db.T + bias.double()
    # alpha applied after an fp32 accumulation of K=64 exact products: a few fp32 ulps of |out|
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-5)
    # and close to the unquantized product (NVFP4 ~ 20 dB per operand)
    rel = float((out - (a @ b.T + bias)).norm() / (a @ b.T).norm())
    assert rel < 0.2, rel


# ---------------------------------------------------------------------------------------------
# Scale values at the op boundary

def _operands(m=37, n=24, k=64):
    g = torch.Generator().manual_seed(31)
    a, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    ga, gb = nvfp4.global_scale(a), nvfp4.global_scale(b)
    (pa, sa), (pb, sb) = ref.nvfp4_quantize(a, ga), ref.nvfp4_quantize(b, gb)
    return a, (pa, sa, ga), (pb, sb, gb)


def _calls(a, qa, qb, impl):
    """{(op, name of its global scale / block scale argument): call(global scale, block scale)} over every
    NVFP4 op, `qb` the weight operand."""
    (pa, sa, ga), (pb, sb, gb) = qa, qb
    x = torch.randn(2, 3, a.shape[1])
    dy = torch.randn(2, 3, pb.shape[0])
    return {
        ("nvfp4_quantize", "global_scale", None): lambda g, s: wan_kernels.nvfp4_quantize(a, g, impl=impl),
        ("nvfp4_dequantize", "global_scale", "block_scale"):
            lambda g, s: wan_kernels.nvfp4_dequantize(pb, s, g, torch.float32, impl=impl),
        ("nvfp4_gemm", "b_global_scale", "b_scale"):
            lambda g, s: wan_kernels.nvfp4_gemm(pa, sa, ga, pb, s, g, None, torch.float32, impl=impl),
        ("nvfp4_gemm", "a_global_scale", "a_scale"):
            lambda g, s: wan_kernels.nvfp4_gemm(pb, s, g, pa, sa, ga, None, torch.float32, impl=impl),
        ("nvfp4_linear", "w_global_scale", "w_scale"):
            lambda g, s: wan_kernels.nvfp4_linear(x, pb, s, g, impl=impl),
        ("nvfp4_linear_backward", "w_global_scale", "w_scale"):
            lambda g, s: wan_kernels.ops.nvfp4_linear_backward(dy, pb, s, g, impl=impl),
        ("nvfp4_linear_w4a4", "w_global_scale", "w_scale"):
            lambda g, s: wan_kernels.nvfp4_linear_w4a4(x, pb, s, g, impl=impl),
    }


@pytest.mark.parametrize("impl", ["ref", "auto"])
def test_python_float_global_scale_is_the_tensor(impl):
    """A Python float global scale (nvfp4_quantize(x, 0.01) raised AttributeError) runs as the float32 0-dim
    tensor, in every NVFP4 op."""
    a, qa, qb = _operands()
    for (op, _, _), call in _calls(a, qa, qb, impl).items():
        g = qb[2] if op != "nvfp4_quantize" else torch.tensor(0.01)
        want, got = call(g, qb[1]), call(g.item(), qb[1])
        for w, o in zip(want if isinstance(want, tuple) else (want,), got if isinstance(got, tuple) else (got,)):
            assert torch.equal(_bytes(w) if w.dtype.itemsize == 1 else w, _bytes(o) if o.dtype.itemsize == 1 else o), op


@pytest.mark.parametrize("impl", ["ref", "auto"])
@pytest.mark.parametrize("bad", [0.0, -0.5, float("nan"), float("inf")])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_bad_global_scale_refused(impl, bad, as_tensor):
    """A global scale of 0 (of a non-zero operand), < 0, NaN or inf: ValueError naming the argument and the value,
    as a Python float or a CPU tensor (they zeroed, sign-flipped or NaN'd the result silently)."""
    a, qa, qb = _operands()
    for (op, name, _), call in _calls(a, qa, qb, impl).items():
        g = torch.tensor(bad) if as_tensor else bad
        with pytest.raises(ValueError, match=rf"{op}: {name} must be finite and > 0.*got {bad}"):
            call(g, qb[1])


@pytest.mark.parametrize("impl", ["ref", "auto"])
def test_zero_global_scale_of_all_zero_operand_accepted(impl):
    """0 is the global scale of an all-zero tensor (nvfp4.global_scale): accepted where the operand it scales is
    all zero (codes +-0), and everything stays 0. A Python float 0 is always refused (a literal 0 is a mistake)."""
    z = torch.zeros(24, 64)
    z[3, 5] = -0.0
    zero = nvfp4.global_scale(z)
    assert zero.item() == 0
    packed, scale = wan_kernels.nvfp4_quantize(z, zero, impl=impl)
    assert (packed & 0x77).eq(0).all()
    assert wan_kernels.nvfp4_dequantize(packed, scale, zero, torch.float32, impl=impl).eq(0).all()
    x = torch.randn(3, 64)
    assert wan_kernels.nvfp4_linear(x, packed, scale, zero, impl=impl).eq(0).all()
    assert wan_kernels.nvfp4_linear_w4a4(torch.zeros(3, 64), packed, scale, zero, impl=impl).eq(0).all()
    with pytest.raises(ValueError, match=r"nvfp4_quantize: global_scale must be finite and > 0, got 0.0"):
        wan_kernels.nvfp4_quantize(z, 0.0, impl=impl)


@pytest.mark.parametrize("impl", ["ref", "auto"])
@pytest.mark.parametrize("byte", [0x7F, 0xFF, 0xB8])
def test_nan_or_negative_block_scale_refused(impl, byte):
    """e4m3 block scales holding a NaN code (0x7F, 0xFF) or a negative value (0xB8 = -1.0): ValueError naming the
    argument, the byte and its position; zero (0x00, and -0.0 = 0x80) is an all-zero block's scale, accepted."""
    a, qa, qb = _operands()
    for (op, _, name), call in _calls(a, qa, qb, impl).items():
        if name is None:
            continue
        s = qb[1].clone()
        s.view(torch.uint8)[2, 1] = byte
        kind = "NaN" if byte in (0x7F, 0xFF) else "negative"
        with pytest.raises(ValueError, match=rf"{op}: {name} holds {kind} e4m3 byte 0x{byte:02X} at \[2, 1\]"):
            call(qb[2], s)
        for zero in (0x00, 0x80):
            s.view(torch.uint8)[2, 1] = zero
            call(qb[2], s)


def test_scale_values_read_only_where_free():
    """Scale values are read only where that costs no device sync and breaks no trace (wan_kernels._checks
    `readable`): fake tensors (what torch.compile traces with) carry no values and pass the checks; the same
    call with real CPU tensors is refused."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    a, _, (pb, sb, _) = _operands()
    x, nan = torch.randn(3, a.shape[1]), torch.tensor(float("nan"))
    bad = sb.clone()
    bad.view(torch.uint8)[0, 0] = 0x7F
    with FakeTensorMode() as mode:
        out = wan_kernels.nvfp4_linear(*(mode.from_tensor(t) for t in (x, pb, bad, nan)), impl="ref")
    assert out.shape == (3, pb.shape[0])
    with pytest.raises(ValueError, match="w_scale holds NaN"):
        wan_kernels.nvfp4_linear(x, pb, bad, nan, impl="ref")
