"""wan::qk_norm_rope_int8 / qkv_rope_int8 (q quantized in the qk_norm_rope kernel) and wan::attention_int8_q8 (the
8-bit attention from that q): the fusion of 8-bit attention's Q quantization into the QKV epilogue.

The claim is bit-identity, not closeness: the fused kernel's q8 and q_scale equal, bit for bit, what the 8-bit
attention's own quantizer (`attention_int8_quant`, Triton) makes of the q that the unfused `qk_norm_rope` kernel
stores, for every dtype (bf16 included: the interpreter's truncating cast is replaced by a bit-level round to
nearest even in the kernel) and both kernel paths (one tile, masked heads; chunks of heads). So
attention_int8_q8(qk_norm_rope_int8(...)) equals attention_int8(qk_norm_rope(...)) exactly, less the op's channel
balance (stage 1b, which needs q's statistics before q is rounded), which the model's 8-bit self-attention relies
on. Against the reference (`ref.qk_norm_rope_int8`, torch's own norm and rotation) the
codes are equal where both compute q exactly (the ops' samples); on random inputs q differs by an fp32 ulp between
them and a code at a rounding boundary may move by one step (bounded below).
"""

import functools
import importlib

import pytest
import torch

from _helpers import TRITON_FROM_SM80, assert_dispatch_per_device_class
import wan_kernels
from wan_kernels import ref, samples
from wan_kernels._spec import SPECS
from wan_kernels.ref.attention_int8 import quantize_int8
from wan_kernels.triton import attention_int8 as T
from wan_kernels.triton import attention_int8_quant as Q
from wan_kernels.triton import qk_norm_rope as tqk
from wan_kernels.triton._launch import run

R = importlib.import_module("wan_kernels.ref.attention_int8")  # the module: the package attribute is the op

pytestmark = pytest.mark.usefixtures("triton_interpreter")

OPS = ("qk_norm_rope_int8", "qkv_rope_int8")


def make_inputs(B, S, H, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = H * D
    qkv = (torch.randn(B, S, 3 * C, generator=g) * 2.0).to(dtype)
    wq = (torch.rand(C, generator=g) + 0.5).to(dtype)
    wk = (torch.randn(C, generator=g) * 2).to(dtype)
    ang = torch.rand(S, D // 2, generator=g) * 6.283
    return qkv, wq, wk, ang.cos(), ang.sin()


def quantizer(q):
    """The 8-bit attention's Triton quantizer on a stored q (no smoothing, no fold): (q8, q_scale [B, H, S])."""
    q8, qs, _ = Q._int8(q, None, 1.0, (), 0.0, run)
    return q8, qs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("H, D", [(2, 64), (3, 32), (5, 16),  # 3, 5: masked heads; 130: the chunked path
                                  pytest.param(130, 64, marks=pytest.mark.slow)])
def test_fused_q_is_the_quantizer_of_the_stored_q_bit_for_bit(H, D, dtype, monkeypatch):
    B, S = (1, 3) if H * D > tqk.MAX_TILE else (2, 7)
    args = (*make_inputs(B, S, H, D, dtype, seed=H), H, 1e-6)
    if H * D > tqk.MAX_TILE:
        # the chunked path quantizes in smaller chunks (`launch_config`: spills), which sum the squares in another
        # order: the unfused kernel is run on the same chunks, so that only the quantization differs
        assert tqk.launch_config(H, D, True).NUM_CHUNKS > tqk.launch_config(H, D).NUM_CHUNKS > 1
        config = tqk.launch_config
        monkeypatch.setattr(tqk, "launch_config", lambda h, d, quant_q=False: config(h, d, True))
    q, k, v = tqk.qk_norm_rope(*args)
    monkeypatch.undo()
    q8, qs, k2, v2 = tqk.qk_norm_rope_int8(*args)
    want8, want_s = quantizer(q)
    assert q8.dtype == torch.int8 and q8.shape == (B, S, H, D) and q8.is_contiguous()
    assert qs.dtype == torch.float32 and qs.shape == (B, H, S)
    assert torch.equal(q8, want8) and torch.equal(qs, want_s)
    r8, rs = quantize_int8(q, 1)  # the reference's stage 2 on the same q: the quantizer's spec
    assert torch.equal(q8, r8) and torch.equal(qs, rs)
    assert torch.equal(k2, k) and torch.equal(v2, v) and k2.dtype == dtype
    assert (q8.abs() == 127).any(dim=-1).all()  # every (token, head) reaches the code of its amax


def test_codes_vs_the_reference_on_random_inputs():
    """The reference's q (torch's rsqrt and rotation) differs from the kernel's by an fp32 ulp: a code can move by
    one step only where q / scale is that close to a half; all but a few are equal, none differs by more."""
    args = (*make_inputs(2, 9, 4, 64, torch.float32, seed=5), 4, 1e-6)
    q8, qs, k, v = tqk.qk_norm_rope_int8(*args)
    r8, rs, rk, rv = ref.qk_norm_rope_int8(*args)
    diff = (q8.int() - r8.int()).abs()
    assert diff.max().item() <= 1 and (diff == 0).float().mean().item() > 0.999
    assert torch.allclose(qs, rs, rtol=1e-6, atol=0)  # amax of values a few ulps apart, / 127
    assert torch.equal(v, rv)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_ops_equal_the_reference_on_their_exact_samples(dtype):
    """The ops' samples make q exact in every backend (`exact_samples`): codes and scales equal the reference's,
    including the ties at 63.5 (round half away from zero: 64)."""
    for op in OPS:
        args = samples.op_inputs(dtype)[op]
        want = SPECS[op].ref(*args)
        assert (want[0].abs() == 64).any()
        for impl in ("auto", "ref", "triton"):
            got = wan_kernels.resolve(op, impl, "cpu")(*args)
            assert len(got) == 4
            for a, b in zip(got, want):
                assert a.dtype == b.dtype and torch.equal(a, b), (op, impl)


UNBALANCED = {"ref": functools.partial(R.attention_int8, balance=False),
              "triton": functools.partial(T.attention_int8, balance=False)}


@pytest.mark.parametrize("pv", ["fp8", "fp16"])
@pytest.mark.parametrize("image", [False, True])
@pytest.mark.parametrize("impl", [pytest.param("triton", marks=pytest.mark.slow), "ref"])
def test_attention_from_the_fused_q_equals_attention_int8(impl, image, pv):
    """attention_int8_q8(qk_norm_rope_int8(qkv)) == attention_int8(qk_norm_rope(qkv)) without the channel balance
    (stage 1b needs q's statistics before q is rounded, so the fused q goes without it) bit for bit (bf16, Wan's
    layout, a tail no block divides, the image set in the same launch)."""
    H, D, S = 2, 64, 70
    qkv, wq, wk, cos, sin = make_inputs(1, S, H, D, torch.bfloat16, seed=11)
    q, k, v = wan_kernels.qk_norm_rope(qkv, wq, wk, cos, sin, H, impl="triton")
    q8, qs, k2, v2 = wan_kernels.qk_norm_rope_int8(qkv, wq, wk, cos, sin, H, impl="triton")
    g = torch.Generator().manual_seed(1)
    ki, vi = ((torch.randn(1, 19, H, D, generator=g) * 3).bfloat16() for _ in range(2)) if image else (None, None)
    unbalanced = UNBALANCED[impl]  # the op's backend without stage 1b: q rounded on its own, as the fused kernel must
    want = unbalanced(q, k, v, ki, vi, pv=pv)
    got = wan_kernels.attention_int8_q8(q8, qs, k2, v2, ki, vi, pv=pv, impl=impl)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert torch.equal(got, want)
    scaled = wan_kernels.attention_int8_q8(q8, qs, k2, v2, ki, vi, 0.3, pv=pv, impl=impl)
    assert torch.equal(scaled, unbalanced(q, k, v, ki, vi, 0.3, pv=pv))
    assert not torch.equal(wan_kernels.attention_int8(q, k, v, ki, vi, pv=pv, impl=impl), want)  # the op balances


def test_strided_q8_and_q_scale():
    """q8 / q_scale as views with other strides (q8 sliced from a wider buffer, q_scale a permuted [B, S, H]) give
    the contiguous tensors' result: the launcher makes what the kernel indexes contiguous."""
    q8, qs, k, v, ki, vi, s, _ = samples.op_inputs()["attention_int8_q8"]
    qs = qs * torch.linspace(0.5, 2.0, qs.numel()).reshape(qs.shape)  # a scale of its own per row and head
    want = wan_kernels.attention_int8_q8(q8, qs, k, v, ki, vi, s, impl="triton")
    wide = torch.cat([q8, q8], dim=-1)[..., : q8.shape[-1]]
    permuted = qs.permute(0, 2, 1).contiguous().permute(0, 2, 1)
    assert not wide.is_contiguous() and not permuted.is_contiguous()
    for impl in ("triton", "ref"):
        assert torch.equal(wan_kernels.attention_int8_q8(wide, permuted, k, v, ki, vi, s, impl=impl), want)


def test_inputs_are_not_written():
    args = list(samples.op_inputs()["attention_int8_q8"])
    before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    for impl in ("triton", "ref"):
        wan_kernels.attention_int8_q8(*args[:7], pv="fp8", impl=impl)
    for a, b in zip(args, before):
        assert not isinstance(a, torch.Tensor) or torch.equal(a, b)


@pytest.mark.parametrize("op, training, grad_arg", [("qk_norm_rope_int8", "qk_norm_rope", 0),
                                                    ("qkv_rope_int8", "qkv_rope", 0),
                                                    ("attention_int8_q8", "attention", 2)])
@pytest.mark.parametrize("impl", ["ref", "triton"])
def test_requires_grad_names_the_op_to_train_with(op, training, grad_arg, impl):
    args = list(samples.op_inputs()[op])
    args[grad_arg] = args[grad_arg].clone().requires_grad_()
    call = getattr(wan_kernels, op)
    n = 7 if op == "attention_int8_q8" else len(args)
    with pytest.raises(RuntimeError) as e:
        call(*args[:n], impl=impl)
    msg = str(e.value)
    assert "\n" not in msg and f"wan::{op} is inference only" in msg
    assert f"wan_kernels.{training} (wan::{training}, bf16)" in msg
    with torch.no_grad():
        call(*args[:n], impl=impl)


@pytest.mark.parametrize("change, pattern", [
    (lambda a: (a[0].float(), *a[1:]), r"attention_int8_q8: q8 must be int8 \[B, Sq, H, D\], got torch.float32 "
     r"shape \(2, 17, 2, 64\)"),
    (lambda a: (a[0], a[1][:, :, :5], *a[2:]), r"attention_int8_q8: q_scale must be float32 \[B, H, Sq\] = "
     r"\[2, 2, 17\] for q8 of shape \(2, 17, 2, 64\), got torch.float32 shape \(2, 2, 5\)"),
    (lambda a: (a[0], a[1], a[2][:, :, :1], *a[3:]), r"attention_int8_q8: k must be \[2, Sk, 2, 64\] for q of "
     r"shape \(2, 17, 2, 64\), got shape \(2, 8, 1, 64\)"),
    (lambda a: (a[0], a[1], a[2][0], *a[3:]), r"attention_int8_q8: k must be \[B, Sk, H, D\], got shape "
     r"\(8, 2, 64\)"),
    (lambda a: (*a[:7], "int4"), r"attention_int8_q8: pv must be one of \('auto', 'fp8', 'fp16'\), got 'int4'"),
    (lambda a: (a[0], a[1], *(t.double() for t in a[2:6]), *a[6:]), r"attention_int8_q8: k must be "
     r"float16/bfloat16/float32, got torch.float64"),
])
def test_bad_inputs_quote_shapes_and_dtypes(change, pattern):
    bad = change(samples.op_inputs()["attention_int8_q8"])
    with pytest.raises(ValueError, match=pattern):
        wan_kernels.attention_int8_q8(*bad[:7], pv=bad[7])
    with pytest.raises(ValueError, match=pattern):
        torch.ops.wan.attention_int8_q8(*bad)


def test_qk_norm_rope_int8_checks_name_the_op():
    qkv, wq, wk, cos, sin, H, eps = samples.op_inputs()["qk_norm_rope_int8"]
    with pytest.raises(ValueError, match=r"qk_norm_rope_int8: norm_q_weight must be \[128\], got shape \(5,\)"):
        wan_kernels.qk_norm_rope_int8(qkv, wq[:5], wk, cos, sin, H, eps)
    x, w, b, *rest = samples.op_inputs()["qkv_rope_int8"]
    with pytest.raises(ValueError, match=r"qkv_rope_int8: w_qkv must be \[3\*C, 128\]"):
        wan_kernels.qkv_rope_int8(x, w[:, :7], b, *rest)


@pytest.mark.parametrize("op", [*OPS, "attention_int8_q8"])
def test_opcheck_and_compile_fullgraph(op):
    args = samples.op_inputs()[op]
    if SPECS[op].compose is None:
        torch.library.opcheck(getattr(torch.ops.wan, op).default, args)
    f = getattr(torch.ops.wan, op)
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="eager")(*args)
    want = f(*args)
    for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("op", ["qk_norm_rope_int8", "attention_int8_q8"])
def test_route_table_and_dispatcher_per_device_class(op, capability, monkeypatch):
    assert wan_kernels.route_table()["qkv_rope_int8"] == TRITON_FROM_SM80  # a composite: its part's route
    assert_dispatch_per_device_class(op, samples.op_inputs()[op], TRITON_FROM_SM80, capability, monkeypatch)
