"""wan::attention: the Triton flash-attention kernel (under the interpreter on CPU) vs an fp64 reference.

The Triton interpreter is switched on for this module only (module fixture, as tests/test_qk_norm_rope.py):
the launcher picks the interpreted kernel per call for CPU tensors.

Accuracy rule (flash-attention's, issue 4): max |ours - ref64| <= 2 * max |sdpa - ref64| + FLOOR, where ref64 is
`wan_kernels.ref.attention` in fp64 on the same (rounded) inputs and sdpa is torch's
F.scaled_dot_product_attention run in the kernel's dtype (I2V: two SDPA calls summed in that dtype, which
is what plain torch does for Wan). FLOOR: the output error of ONE fp32 rounding of every score x = s q.k and
of the output accumulator (both are fp32 in every implementation; `fp32_rounding_floor` in wan_kernels/testing.py,
shared with the GPU check in tools/gpu_check.py as `sdpa_per_set` and `assert_flash_rule` are: <= 2^-24 *
(max|x| * max|v - out| + max|v|) per row), so that SDPA being lucky on a small tensor does not fail us. It
matters in fp32 only (~1e-7 .. 2e-6 at unit-variance inputs, vs fp16 errors of ~1e-4 .. 1e-3): there the max
error over a few hundred outputs is decided by the rounding order of the fp32 q.k dots and p.v sums (numpy's
BLAS under the interpreter vs torch's SDPA kernel); seen without it: 2 of 150 random fp32 cases at 2.6-3x
SDPA's error, all with a handful of image keys (a softmax over few keys averages no rounding out), and
scale=0 (a plain mean of v: 2.1x). No floor is needed for the output's own last rounding in the dtype:
SDPA's max error is at least that of the correctly rounded result.
Seen here: ours / SDPA error ratio 0.5 .. 1.3 in general.

Interpreter dtype caveat (REFERENCE §1): the interpreter computes on bf16 bit patterns as integers, so the
kernel is checked in fp16 and fp32 here; bf16 inputs on CPU are upcast to fp32 by the launcher (one test
below checks that path). The GPU bf16 kernel is the fp16 code path with another element type and is
checked by AOT compilation (tests/test_attention_aot.py).
Interpreter cost: ~1 s for 2 heads x 300 queries x (512 + 257) keys x hd 128; shapes are sized for that.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import wan_kernels
from wan_kernels import ref
from wan_kernels.triton import KERNELS
from wan_kernels.testing import assert_flash_rule
from wan_kernels.triton import attention as ta

from _inputs import attention_inputs

DTYPES = [torch.float16, torch.float32]


pytestmark = pytest.mark.usefixtures("triton_interpreter")


# ---------------------------------------------------------------------------------------------
# Accuracy: a covering subset of S in {1, 17, 128, 300} x KV in {1, 77, 257, 512} x image set {none, 1, 77,
# 257, 512} x B in {1, 2} x heads 1..4 x head_dim {64, 128}; every value of each axis appears at least once,
# Wan's cross-attention shape (512 text + 257 image keys) with the big query count.

CASES = [  # B, Sq, Sk, Si, H, D
    (1, 1, 1, None, 1, 64),
    (1, 1, 1, 1, 1, 128),
    (2, 17, 77, None, 3, 128),
    (1, 128, 512, None, 2, 64),
    (1, 300, 512, 257, 2, 128),    # Wan I2V cross-attention (text 512 + image 257)
    (2, 17, 257, 1, 4, 64),
    (1, 300, 1, 77, 1, 128),
    (2, 128, 77, 512, 1, 64),
    (1, 1, 512, 257, 4, 128),
    (2, 300, 257, None, 1, 64),
    (1, 1024, 1100, None, 1, 64),  # self-attention-like: 18 key tiles, online rescaling over a long loop
]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,Sq,Sk,Si,H,D", CASES)
def test_matches_fp64_within_2x_sdpa(B, Sq, Sk, Si, H, D, dtype):
    inputs = attention_inputs(B, Sq, Sk, Si, H, D, dtype, seed=Sq + Sk)
    assert_flash_rule(ta.attention(*inputs), inputs, what=f"B={B} Sq={Sq} Sk={Sk} Si={Si} H={H} D={D} {dtype}")


# (dtype, input magnitude) pairs. Magnitude 4 makes |scores| reach ~300 (softmax nearly one-hot): in fp16 the
# fp16 roundings still dominate both errors and the rule holds with margin; in fp32 both errors are then set
# by the fp32 rounding of the q.k dot products (|q.k| ~ 300, ulp 3e-5), i.e. by the accumulation order of the
# dot (numpy's under the interpreter, the MMA's on a GPU), not by the kernel: seen B=1 Sq=2 Sk=2 H=3 D=64,
# ours 4.3e-6 vs SDPA 5.9e-7, where torch's own fp32 matmul-softmax-matmul errs 1.8e-6 (3x SDPA) and an
# exact-scale natural-exp emulation on numpy's dot 5.0e-6. The score floor would cover that but, at ~5e-5,
# dwarf both errors (no real check), so fp32 is held to the rule up to magnitude 1 (|x| <~ 5).
DTYPE_MAGNITUDES = [(torch.float16, 0.1), (torch.float16, 1.0), (torch.float16, 4.0), (torch.float32, 0.1),
                    (torch.float32, 1.0)]


@pytest.mark.slow
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 2), Sq=st.integers(1, 70), Sk=st.integers(1, 300), Si=st.one_of(st.none(), st.integers(1, 80)),
       H=st.integers(1, 3), D=st.sampled_from([64, 128]), dtype_magnitude=st.sampled_from(DTYPE_MAGNITUDES),
       config=st.sampled_from([ta.Config(16, 16, 4, 1), ta.Config(32, 64, 4, 1), ta.Config(64, 32, 4, 1)]),
       seed=st.integers(0, 2**16))
def test_hypothesis_shapes_and_tiles(B, Sq, Sk, Si, H, D, dtype_magnitude, config, seed):
    """Random shapes (tails on q and kv for every tile) and magnitudes (large scores: the online softmax must
    rescale, not overflow) against the same rule."""
    dtype, magnitude = dtype_magnitude
    inputs = attention_inputs(B, Sq, Sk, Si, H, D, dtype, seed=seed, magnitude=magnitude)
    got = ta.attention_with_config(*inputs, config=config)
    assert_flash_rule(got, inputs, what=f"B={B} Sq={Sq} Sk={Sk} Si={Si} H={H} D={D} {dtype} {config} x{magnitude}")


def _gpu_configs():
    return sorted(set(ta.CONFIGS.values()), key=str)


@pytest.mark.slow
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("config", _gpu_configs(), ids=str)
def test_every_gpu_config_is_correct(config, D):
    """Each tile shape the GPU heuristic can pick, run by the interpreter with tails on both q and kv."""
    Sq, Sk, Si = config.BLOCK_M + 3, 2 * config.BLOCK_N + 5, config.BLOCK_N - 1
    inputs = attention_inputs(1, Sq, Sk, Si, 1, D, torch.float16, seed=config.BLOCK_M + config.BLOCK_N + D)
    assert_flash_rule(ta.attention_with_config(*inputs, config=config), inputs, what=f"{config} D={D}")


@pytest.mark.parametrize("D,Dv", [(40, 40), (64, 32), (128, 64), (8, 16)])
def test_head_dims_padded_and_value_dim(D, Dv):
    """Head dims that are not powers of two (or < 16) are padded with masked loads; Dv may differ from D."""
    inputs = attention_inputs(2, 19, 33, 9, 2, D, torch.float32, seed=D, Dv=Dv)
    got = ta.attention(*inputs)
    assert got.shape == (2, 19, 2, Dv)
    assert_flash_rule(got, inputs, what=f"D={D} Dv={Dv}")


@pytest.mark.parametrize("scale", [0.05, 1.0, 0.0, -0.3])  # 0: uniform softmax; < 0: the max is still a max
def test_explicit_scale(scale):
    inputs = attention_inputs(1, 20, 40, 10, 2, 64, torch.float32, seed=3)
    assert_flash_rule(ta.attention(*inputs, scale=scale), inputs, scale=scale, what=f"scale={scale}")


# ---------------------------------------------------------------------------------------------
# I2V semantics and the log-sum-exp

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_i2v_is_sum_of_two_separate_attentions(dtype):
    q, k, v, ki, vi = attention_inputs(2, 40, 77, 33, 2, 64, dtype, seed=5)
    both = ta.attention(q, k, v, ki, vi)
    two = ta.attention(q, k, v).double() + ta.attention(q, ki, vi).double()
    # fp32: the same fp32 states, summed before (one launch) or after (two launches) the final rounding:
    # a few fp32 ulps. fp16: the two-call sum has two extra fp16 roundings (<= 1.5 ulp of O(1) values).
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    assert (both.double() - two).abs().max().item() <= tol
    union = ta.attention(q, torch.cat([k, ki], 1), torch.cat([v, vi], 1)).double()
    assert (both.double() - union).abs().max().item() > 0.1  # not one softmax over the union of keys


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Si", [None, 45])
def test_lse_matches_logsumexp_of_reference_scores(Si, dtype):
    B, Sq, Sk, H, D, scale = 2, 33, 70, 3, 64, 0.2
    q, k, v, ki, vi = attention_inputs(B, Sq, Sk, Si, H, D, dtype, seed=6, magnitude=2.0)
    out, lse, lse_img = ta.attention_with_lse(q, k, v, ki, vi, scale)

    def want_lse(kk):
        return (torch.einsum("bqhd,bkhd->bhqk", q.double(), kk.double()) * scale).logsumexp(-1)

    # The LSE is computed from fp32 scores of the (rounded) inputs: |scores| <= ~30 here, so fp32 products
    # and the exp2/log2 path are good to ~1e-5 absolute.
    assert lse.shape == (B, H, Sq) and lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), want_lse(k), rtol=0, atol=1e-5)
    if Si is None:
        assert lse_img is None
    else:
        torch.testing.assert_close(lse_img.double(), want_lse(ki), rtol=0, atol=1e-5)
    torch.testing.assert_close(out, ta.attention(q, k, v, ki, vi, scale), rtol=0, atol=0)  # LSE leaves out as is


# ---------------------------------------------------------------------------------------------
# Layouts: strides are read, not copied

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_packed_qkv_slices(dtype):
    """q, k, v as views of a packed [B, S, 3, H, D] tensor (the fused QKV GEMM's output), k_img/v_img of a
    packed [B, Si, 2, H, D]: non-contiguous, last dim contiguous, read in place."""
    B, S, Si, H, D = 2, 37, 21, 3, 64
    g = torch.Generator().manual_seed(7)
    qkv = torch.randn(B, S, 3, H, D, generator=g).to(dtype)
    kv_img = torch.randn(B, Si, 2, H, D, generator=g).to(dtype)
    q, k, v = qkv.unbind(2)
    ki, vi = kv_img.unbind(2)
    assert not q.is_contiguous() and q.stride(1) == 3 * H * D and q.stride(-1) == 1
    inputs = (q, k, v, ki, vi)
    got = ta.attention(*inputs)
    assert_flash_rule(got, inputs, what="packed qkv")
    contiguous = ta.attention(*(t.contiguous() for t in inputs))
    assert torch.equal(got, contiguous)


def test_other_strides():
    """Batch-minor storage ([S, B, H, D] viewed as [B, S, H, D]), a head-strided slice, and a last dim with
    stride 2 (copied by the launcher)."""
    B, S, H, D = 2, 29, 2, 64
    g = torch.Generator().manual_seed(8)
    q = torch.randn(S, B, H, D, generator=g).half().transpose(0, 1)
    k = torch.randn(B, S, 2 * H, D, generator=g).half()[:, :, ::2]
    v = torch.randn(B, S, H, 2 * D, generator=g).half()[..., ::2]
    assert v.stride(-1) == 2 and q.stride(0) < q.stride(1)
    inputs = (q, k, v)
    assert_flash_rule(ta.attention(*inputs), inputs, what="strided")


# ---------------------------------------------------------------------------------------------
# Heuristic

def test_pick_config_table():
    for cap, arch in (((8, 0), 80), ((8, 6), 80), ((8, 9), 80), ((12, 0), 80), ((9, 0), 90), ((10, 0), 100),
                      ((10, 3), 100)):
        assert ta.arch_class(cap) == arch
    assert ta.kind_of(32760, False) == "self" and ta.kind_of(512, False) == "cross"
    assert ta.kind_of(512, True) == "i2v" and ta.kind_of(ta.CROSS_MAX_KV + 1, False) == "self"
    assert ta.pick_config((9, 0), 128, 75600, False) == ta.CONFIGS[(90, 128, "self")]
    assert ta.pick_config((10, 0), 64, 512, True) == ta.CONFIGS[(100, 64, "i2v")]
    assert ta.pick_config((8, 0), 40, 77, False) == ta.CONFIGS[(80, 64, "cross")]  # 40 pads to 64
    assert ta.pick_config(None, 128, 75600, False) == ta.INTERPRETER_CONFIG
    assert set(ta.CONFIGS) == {(a, d, k) for a in ta.ARCH_CLASSES for d in (64, 128) for k in ta.KINDS}
    for c in ta.CONFIGS.values():  # tl.dot needs >= 16 per dimension; BLOCK_M spans all warps' rows
        assert c.BLOCK_N >= 16 and c.BLOCK_M >= 16 * c.num_warps // 4 and c.num_stages >= 1


# ---------------------------------------------------------------------------------------------
# Public wrapper, registration, error paths

@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_wrapper_impl_triton(dtype):
    inputs = attention_inputs(2, 17, 77, 25, 2, 128, dtype, seed=9)
    assert_flash_rule(wan_kernels.attention(*inputs, impl="triton"), inputs, what="impl=triton")
    q, k, v, _, _ = inputs
    assert_flash_rule(wan_kernels.attention(q, k, v, scale=0.3, impl="triton"), (q, k, v), scale=0.3)


def test_bf16_on_cpu_is_upcast():
    """bf16 under the interpreter: the launcher computes in fp32 and rounds the output to bf16 once, so it
    meets the rule against SDPA in bf16 (and the result is not the interpreter's bit-pattern garbage)."""
    inputs = attention_inputs(1, 20, 77, 30, 2, 64, torch.bfloat16, seed=10)
    got = ta.attention(*inputs)
    assert got.dtype == torch.bfloat16
    assert_flash_rule(got, inputs, what="bf16")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES + [torch.bfloat16], ids=str)
@pytest.mark.parametrize("Sk", [1, 3, 70])  # 70: two key tiles, the non-finite key in the partial one
@pytest.mark.parametrize("case", ["q_nan", "scale_nan", "k_nan", "v_nan", "k_img_nan", "v_img_nan", "q_inf",
                                  "k_inf", "k_neg_inf", "v_inf"])
def test_nan_and_inf_propagate_as_in_reference(case, Sk, dtype):
    """A NaN or inf in q / k / v / the image set / the scale gives the reference's NaN and inf positions (a
    NaN score must not be dropped by the row max, a row of -inf scores is NaN as in softmax), the finite
    outputs still within the rule."""
    q, k, v, ki, vi = attention_inputs(1, 5, Sk, 3, 2, 64, torch.float32, seed=Sk)
    scale = float("nan") if case == "scale_nan" else None
    t, index, value = {"q_nan": (q, (0, 2, 1, 5), "nan"), "k_nan": (k, (0, Sk - 1, 0, 3), "nan"),
                       "v_nan": (v, (0, 0, 1, 7), "nan"), "k_img_nan": (ki, (0, 1, 1, 0), "nan"),
                       "v_img_nan": (vi, (0, 2, 0, 9), "nan"), "q_inf": (q, (0, 4, 0, 1), "inf"),
                       "k_inf": (k, (0, 0, 1, 2), "inf"), "k_neg_inf": (k, (0, slice(None), 1, 0), "-inf"),
                       "v_inf": (v, (0, Sk - 1, 0, 4), "-inf")}.get(case, (q, (), None))
    if value is not None:
        t[index] = float(value)
    if case == "k_neg_inf":
        q[0, :, 1, 0] = 1.0                                  # every score of head 1 is -inf
    q, k, v, ki, vi = (x.to(dtype) for x in (q, k, v, ki, vi))
    got = wan_kernels.attention(q, k, v, ki, vi, scale=scale, impl="triton")
    want = ref.attention(q, k, v, ki, vi, scale=scale)
    assert want.isnan().any() or want.isinf().any()
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    assert torch.equal(got[got.isinf()], want[want.isinf()])
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(got, want, atol=tol, rtol=tol, equal_nan=True)


def test_wrapper_checks_arguments():
    q, k, v, _, _ = attention_inputs(1, 4, 5, None, 2, 64, torch.float16)
    with pytest.raises(ValueError, match=r"k_img and v_img must be given together"):
        wan_kernels.attention(q, k, v, k, None, impl="triton")
    with pytest.raises(ValueError, match=r"k must be \[1, Sk, 2, 64\].*\(1, 5, 3, 64\)"):
        wan_kernels.attention(q, torch.zeros(1, 5, 3, 64, dtype=torch.float16), v, impl="triton")


def test_float64_is_refused():
    q, k, v, _, _ = attention_inputs(1, 4, 5, None, 1, 64, torch.float64)
    with pytest.raises(ValueError, match="float16/bfloat16/float32, got torch.float64"):
        ta.attention(q, k, v)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v, _, _ = attention_inputs(1, 4, 5, None, 1, 64, torch.float16)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ta.attention(q, k, v)


def test_empty_query():
    q, k, v, ki, vi = attention_inputs(2, 0, 5, 3, 2, 64, torch.float16)
    out, lse, lse_img = ta.attention_with_lse(q, k, v, ki, vi)
    assert out.shape == (2, 0, 2, 64) and lse.shape == lse_img.shape == (2, 2, 0)


def test_registered_as_triton_backend():
    assert KERNELS["attention"] is ta.attention


# ---------------------------------------------------------------------------------------------
# wan::attention_lse (ring attention's building block): every backend, and the exact merge of key blocks

def _lse_impls():
    return ["ref", "cpu", "triton"]


def _scores64(q, k, scale):
    return torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale


@pytest.mark.parametrize("impl", _lse_impls())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_lse_matches_logsumexp_of_fp64_scores(impl, dtype):
    from wan_kernels.ops import attention_lse

    B, Sq, Sk, H, D, scale = 2, 33, 70, 3, 64, 0.2
    q, k, v, _, _ = attention_inputs(B, Sq, Sk, None, H, D, dtype, seed=7, magnitude=2.0)
    out, lse = attention_lse(q, k, v, scale, impl=impl)
    assert lse.shape == (B, H, Sq) and lse.dtype == torch.float32 and out.dtype == dtype
    # fp32 scores of the rounded inputs, |scores| <= ~30: the LSE is good to ~1e-5 absolute (as above)
    torch.testing.assert_close(lse.double(), _scores64(q, k, scale).logsumexp(-1), rtol=0, atol=1e-5)
    want = wan_kernels.attention(q, k, v, None, None, scale, impl=impl)
    # the same kernel with its LSE store switched on (ref: the same formula, matmuls in another layout)
    tol = dict(rtol=0, atol=0) if impl != "ref" else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, want, **tol)


@pytest.mark.parametrize("impl", ["ref", "cpu"])
def test_lse_merge_of_two_key_blocks_equals_attention_over_all_keys(impl):
    """out -= sigmoid(lse_b - lse) * (out - out_b); lse -= logsigmoid(lse - lse_b) (ring attention's merge), fp64."""
    from wan_kernels.ops import attention_lse

    B, Sq, Sk, H, D, scale = 2, 19, 70, 2, 32, 0.3
    q, k, v, _, _ = attention_inputs(B, Sq, Sk, None, H, D, torch.float64, seed=8, magnitude=2.0)
    out, lse = attention_lse(q, k[:, :37], v[:, :37], scale, impl=impl)
    out_b, lse_b = attention_lse(q, k[:, 37:], v[:, 37:], scale, impl=impl)
    assert lse.dtype == torch.float64
    w = torch.sigmoid(lse_b - lse).transpose(1, 2).unsqueeze(-1)                  # [B, Sq, H, 1]
    out = out - w * (out - out_b)
    lse = lse - F.logsigmoid(lse - lse_b)
    want_out, want_lse = ref.attention_lse(q, k, v, scale)
    torch.testing.assert_close(lse, _scores64(q, k, scale).logsumexp(-1), rtol=0, atol=1e-12)
    torch.testing.assert_close(out, want_out, rtol=0, atol=1e-12)  # fp64 terms: a few ulps of O(1) values


def test_attention_lse_checks_arguments():
    from wan_kernels.ops import attention_lse

    q, k, v, _, _ = attention_inputs(1, 4, 5, None, 2, 16, torch.float32)
    with pytest.raises(ValueError, match=r"k must be \[1, Sk, 2, 16\]"):
        attention_lse(q, k[:, :, :1], v, impl="ref")
    with pytest.raises(ValueError, match="k has no keys"):
        attention_lse(q, k[:, :0], v[:, :0], impl="ref")
