"""The C++ CPU kernel of wan::attention (impl="cpu", what impl="auto" runs on CPU) against an fp64 reference:
error at most 2x that of F.scaled_dot_product_attention at the same precision (flash-attention's rule),
plus the exact I2V semantics (two softmaxes summed) and layouts. bfloat16 inputs run the kernel the CPU gets
(csrc/attention/attention_cpu_bf16.h: ATen's bf16 flash kernel on AMX CPUs for one key set, the AVX512-BF16
kernel for the I2V sum there and for every call on AVX512-BF16 CPUs without AMX); a test pins the choice per
CPU, and every bf16 check also runs the AVX512-BF16 kernel itself (`_C.attention_bf16_avx512`) where the CPU
has the instructions, so both kernels are tested on every machine that can run them."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import wan_kernels
from wan_kernels import ref
from wan_kernels._library import EXTENSION


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


HAS_AVX512_BF16 = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"} <= _cpu_flags()
HAS_AMX_BF16 = {"amx_tile", "amx_bf16"} <= _cpu_flags()


def _runners(dtype) -> dict:
    """name -> attention(q, k, v, ki, vi, scale): the dispatcher's C++ CPU kernel, and for bf16 on AVX512-BF16
    CPUs the AVX512-BF16 kernel called directly (value dims it takes: multiples of 64)."""
    runners = {"cpu": lambda q, k, v, ki=None, vi=None, scale=None: wan_kernels.attention(q, k, v, ki, vi, scale,
                                                                                         impl="cpu")}
    if dtype == torch.bfloat16 and HAS_AVX512_BF16 and EXTENSION.loaded:
        from wan_kernels import _C

        def avx512(q, k, v, ki=None, vi=None, scale=None):
            if v.shape[-1] % 64:
                return runners["cpu"](q, k, v, ki, vi, scale)
            return _C.attention_bf16_avx512(q, k, v, ki, vi, q.shape[-1] ** -0.5 if scale is None else scale)

        runners["avx512_bf16"] = avx512
    return runners


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
    err_sdpa = (sdpa.double() - exact).abs().max().item()
    # 2x SDPA's error; the floor is one rounding of the output (fp32 math, one cast): half an ulp of |out|<~4
    floor = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[q.dtype]
    for name, run in _runners(q.dtype).items():
        ours = run(q, k, v, ki, vi)
        assert ours.dtype == q.dtype and ours.shape == exact.shape, name
        err = (ours.double() - exact).abs().max().item()
        assert err <= 2 * err_sdpa + floor, (name, err, err_sdpa)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,sq,sk,si,h,d", [(1, 1, 1, 0, 1, 64), (2, 17, 77, 257, 2, 128), (1, 300, 512, 257, 4, 128),
                                            (2, 128, 257, 0, 3, 64), (1, 1100, 33, 5, 1, 64)])
def test_matches_fp64_within_sdpa_rule(dtype, b, sq, sk, si, h, d):
    _check_rule(*_inputs(b, sq, sk, si, h, d, dtype, seed=sq + sk))


@pytest.mark.slow
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


NONFINITE_CASES = ("q_nan", "q_row_nan", "scale_nan", "scale_inf", "k_nan", "v_nan", "k_img_nan", "v_img_nan",
                   "q_inf", "k_inf", "k_neg_inf", "v_inf")


def nonfinite_inputs(case, sk, dtype, dv=64):
    """q [1, 5, 2, 64], k/v [1, sk, 2, 64 / dv] and a 3-key image set with one non-finite value (or scale) at
    a place named by `case`; "k_neg_inf" makes every score of head 1 -inf (softmax of the row: NaN)."""
    g = torch.Generator().manual_seed(sk)
    q, k, ki = (torch.randn(1, n, 2, 64, generator=g) for n in (5, sk, 3))
    v, vi = (torch.randn(1, n, 2, dv, generator=g) for n in (sk, 3))
    scale = {"scale_nan": float("nan"), "scale_inf": float("inf")}.get(case)
    t, index, value = {"q_nan": (q, (0, 2, 1, 5), "nan"), "q_row_nan": (q, (0, 2, 1), "nan"),
                       "k_nan": (k, (0, sk - 1, 0, 3), "nan"), "v_nan": (v, (0, 0, 1, 7), "nan"),
                       "k_img_nan": (ki, (0, 1, 1, 0), "nan"), "v_img_nan": (vi, (0, 2, 0, 9), "nan"),
                       "q_inf": (q, (0, 4, 0, 1), "inf"), "k_inf": (k, (0, 0, 1, 2), "inf"),
                       "k_neg_inf": (k, (0, slice(None), 1, 0), "-inf"), "v_inf": (v, (0, sk - 1, 0, 4), "-inf"),
                       }.get(case, (q, (), None))
    if value is not None:
        t[index] = float(value)
    if case == "k_neg_inf":
        q[0, :, 1, 0] = 1.0
    return (*(x.to(dtype) for x in (q, k, v, ki, vi)), scale)


def assert_nonfinite_like(got, want, tol):
    """Same NaN and +-inf positions as the reference, finite values within `tol` (atol = rtol)."""
    assert torch.equal(got.isnan(), want.isnan()), (got.isnan().sum(), want.isnan().sum())
    assert torch.equal(got.isinf(), want.isinf()) and torch.equal(got[got.isinf()], want[want.isinf()])
    assert want.isnan().any() or want.isinf().any()
    torch.testing.assert_close(got, want, atol=tol, rtol=tol, equal_nan=True)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("sk", [1, 3, 40])
@pytest.mark.parametrize("case", NONFINITE_CASES)
def test_nan_and_inf_propagate_as_in_reference(dtype, sk, case):
    """NaN and inf in any input (or the scale) give the reference's NaN / inf, with and without an image set.
    ATen's flash kernel returned zeros for a row of only NaN / -inf scores (fewer keys than its vector width:
    sk 1 and 3); bf16 runs the CPU's bf16 kernel (ATen's bf16 flash kernel on AMX CPUs, whose zeroed rows get
    the same fix) and the AVX512-BF16 kernel, fp16/fp32/fp64 ATen's kernel."""
    q, k, v, ki, vi, scale = nonfinite_inputs(case, sk, dtype)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for run in _runners(dtype).values():
        if "img" not in case:
            assert_nonfinite_like(run(q, k, v, scale=scale), ref.attention(q, k, v, scale=scale), tol)
        assert_nonfinite_like(run(q, k, v, ki, vi, scale=scale), ref.attention(q, k, v, ki, vi, scale=scale), tol)


@pytest.mark.parametrize("case", ["q_row_nan", "scale_nan", "k_neg_inf", "v_nan"])
def test_nan_propagates_on_the_math_path(case):
    """A value dim other than the head dim runs ATen's math kernel (not its flash kernel): NaN there too."""
    q, k, v, ki, vi, scale = nonfinite_inputs(case, 3, torch.float32, dv=32)
    assert_nonfinite_like(wan_kernels.attention(q, k, v, ki, vi, scale=scale, impl="cpu"),
                          ref.attention(q, k, v, ki, vi, scale=scale), 1e-5)


def test_bf16_kernel_is_chosen_by_the_cpu():
    """ATen's bf16 flash kernel where the CPU has AMX (and AVX512-BF16 for the I2V sum), the AVX512-BF16 kernel
    where it has only those instructions, ATen's fp32 path elsewhere (Linux: /proc/cpuinfo)."""
    if not os.path.exists("/proc/cpuinfo"):
        pytest.skip("no /proc/cpuinfo to read the CPU flags from")
    assert EXTENSION.loaded, EXTENSION.error
    from wan_kernels import _C
    want = "aten_amx" if HAS_AMX_BF16 and HAS_AVX512_BF16 else "avx512_bf16" if HAS_AVX512_BF16 else "aten"
    assert _C.cpu_attention_bf16_kernel() == want


@pytest.mark.slow
@settings(max_examples=60, deadline=None)
@given(b=st.integers(1, 2), sq=st.integers(1, 130), sk=st.integers(1, 700), si=st.sampled_from([0, 1, 40, 257]),
       h=st.integers(1, 3), d=st.sampled_from([64, 128]), seed=st.integers(0, 2**16))
def test_hypothesis_bf16(b, sq, sk, si, h, d, seed):
    """Key counts across the kernel's 32-key tiles and 256-key softmax blocks, query counts across its 48-row
    blocks."""
    _check_rule(*_inputs(b, sq, sk, si, h, d, torch.bfloat16, seed))


@pytest.mark.parametrize("rising", [True, False])
def test_bf16_online_softmax_rescales_across_key_blocks(rising):
    """Scores that rise along the keys make every 256-key block raise the running max (the accumulated output
    and sum must be rescaled each time); falling scores keep the first block's max. Logits span ~+-23."""
    b, sq, sk, h, d = 1, 50, 1000, 2, 128
    g = torch.Generator().manual_seed(7)
    q = (torch.randn(b, sq, h, d, generator=g) * 0.2 + 1.0).bfloat16()
    ramp = torch.linspace(-2.0, 2.0, sk) if rising else torch.linspace(2.0, -2.0, sk)
    k = (torch.randn(b, sk, h, d, generator=g) * 0.2 + ramp[None, :, None, None]).bfloat16()
    v = torch.randn(b, sk, h, d, generator=g).bfloat16()
    _check_rule(q, k, v, None, None)


def test_bf16_very_negative_logits():
    """All logits near -150 (exp underflows unless the row max is subtracted) with 77 keys, padded inside the
    kernel to 96: the padding's zero scores must not enter the row max."""
    b, sq, sk, h, d = 1, 20, 77, 2, 128
    g = torch.Generator().manual_seed(5)
    q = torch.full((b, sq, h, d), 11.0).bfloat16()
    k = (torch.randn(b, sk, h, d, generator=g) * 0.1 - 1.2).bfloat16()   # q.k / sqrt(128) ~ -150 +- 1.1
    v = torch.randn(b, sk, h, d, generator=g).bfloat16()
    assert (ref.attention(q.double(), k.double(), v.double()) - v.double().mean(1, keepdim=True)).abs().max() < 1
    _check_rule(q, k, v, None, None)


@pytest.mark.slow
def test_bf16_long_key_set_goes_in_head_chunks():
    """70,000 keys: 36 MB of packed K/V per head, over the kernel's 64 MB packing budget, so the two heads are
    packed and computed one chunk at a time (a 720p video's self-attention has 75,600 keys)."""
    _check_rule(*_inputs(1, 7, 70000, 0, 2, 128, torch.bfloat16, seed=11))


def test_bf16_strided_inputs_and_other_value_dims():
    """Slices of a packed qkv tensor and permuted views (the kernel reads any strides), an explicit scale, and
    a value dim the AVX512 kernel does not take (32: the fp32 flash path) all follow the rule."""
    g = torch.Generator().manual_seed(3)
    packed = torch.randn(2, 70, 3, 2, 128, generator=g).bfloat16()
    qs, ks, vs = packed.unbind(2)
    _check_rule(qs, ks, vs, None, None)
    kt = torch.randn(2, 2, 90, 128, generator=g).bfloat16().transpose(1, 2)  # [B, Sk, H, D] view of [B, H, Sk, D]
    vt = torch.randn(2, 2, 90, 128, generator=g).bfloat16().transpose(1, 2)
    _check_rule(qs, kt, vt, None, None)
    q, k = qs.contiguous(), ks.contiguous()
    exact = ref.attention(q.double(), k.double(), vs.double(), scale=0.05)
    err = (wan_kernels.attention(q, k, vs, scale=0.05, impl="cpu").double() - exact).abs().max().item()
    err_sdpa = (_sdpa(q, k, vs, scale=0.05).double() - exact).abs().max().item()
    assert err <= 2 * err_sdpa + 1.6e-2, (err, err_sdpa)
    v32 = torch.randn(2, 70, 2, 32, generator=g).bfloat16()
    exact = ref.attention(q.double(), k.double(), v32.double())
    err = (wan_kernels.attention(q, k, v32, impl="cpu").double() - exact).abs().max().item()
    assert err <= 2 * (_sdpa(q, k, v32).double() - exact).abs().max().item() + 1.6e-2


_SUBPROCESS_CHECK = """
import torch, torch.nn.functional as F, wan_kernels
from wan_kernels import _C, ref
def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
g = torch.Generator().manual_seed(0)
q, k, v, ki, vi = (torch.randn(2, n, 2, 128, generator=g).bfloat16() for n in (300, 77, 77, 257, 257))
errors = []
for sets in ((k, v), (k, v, ki, vi)):  # one key set (AMX: ATen's bf16 kernel), and the I2V sum
    exact = ref.attention(q.double(), *(t.double() for t in sets))
    ours = wan_kernels.attention(q, *sets, impl="cpu")
    sdpa_out = sdpa(q, k, v) + (sdpa(q, ki, vi) if len(sets) == 4 else 0)
    errors += [(ours.double() - exact).abs().max().item(), (sdpa_out.double() - exact).abs().max().item()]
print(_C.cpu_attention_bf16_kernel(), ours.dtype, *errors)
"""


def _attention_in_subprocess(env_value: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _SUBPROCESS_CHECK], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "WAN_CPU_ATTENTION": env_value})


@pytest.mark.subprocess
@pytest.mark.parametrize("choice", ["aten", "avx512_bf16", "aten_amx"])
def test_env_chooses_the_bf16_kernel(choice):
    """WAN_CPU_ATTENTION=aten keeps bf16 on ATen's fp32 flash kernel (on every CPU: the path of CPUs without
    AVX512-BF16); avx512_bf16 / aten_amx force those kernels where the CPU runs them and are an error naming the
    variable elsewhere. Each follows the same rule."""
    runnable = {"aten": True, "avx512_bf16": HAS_AVX512_BF16, "aten_amx": HAS_AMX_BF16 and HAS_AVX512_BF16}[choice]
    done = _attention_in_subprocess(choice)
    if not runnable:
        assert done.returncode != 0 and f"WAN_CPU_ATTENTION={choice}, but" in done.stderr
        return
    assert done.returncode == 0, done.stderr
    kernel, dtype, *errors = done.stdout.split()
    assert (kernel, dtype) == (choice, "torch.bfloat16")
    for err, err_sdpa in zip(errors[::2], errors[1::2]):
        assert float(err) <= 2 * float(err_sdpa) + 1.6e-2, (err, err_sdpa)


@pytest.mark.subprocess
def test_env_rejects_unknown_kernels():
    done = _attention_in_subprocess("fast")
    assert done.returncode != 0
    assert "WAN_CPU_ATTENTION must be 'auto', 'aten', 'avx512_bf16' or 'aten_amx', got 'fast'" in done.stderr


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("case", ["flash", "value_dim", "q_row_nan"])
def test_attention_lse_cpu_matches_reference(dtype, case):
    """wan::attention_lse's C++ kernel: ATen's flash LSE (or the plain formula when Dv != D), NaN rows kept."""
    q, k, v, _, _ = _inputs(2, 17, 40, 0, 2, 64, dtype, seed=3)
    if case == "value_dim":
        v = v[..., :48]
    if case == "q_row_nan":
        q[1, 5, 0, 3] = float("nan")
    out, lse = torch.ops.wan.attention_lse(q, k, v, None)
    want_out, want_lse = ref.attention_lse(q, k, v)
    assert lse.dtype == want_lse.dtype and lse.shape == (2, 2, 17)
    # fp32 compute in both (fp64 stays fp64); bf16 outputs round once: half a bf16 ulp of O(1) values
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-5, equal_nan=True)
    torch.testing.assert_close(out, want_out, rtol=0, atol=tol, equal_nan=True)
    if case == "q_row_nan":
        assert lse[1, 0, 5].isnan() and out[1, 5, 0].isnan().all()
