"""Attention backward (issue 16): wan::attention_backward / attention_delta / attention_forward and the gradients
of wan::attention (q, k, v, k_img, v_img) and wan::attention_lse (both outputs) on every backend that runs here
(the dispatcher op, impl="auto"/"cpu"/"ref"/"triton"; Triton under TRITON_INTERPRET=1), against the fp64
reference's autograd; the ring-attention contract of the per-block backward; the one-forward design; opcheck;
torch.compile of a training step; the backward's launches in the readiness report and their 64-bit offsets.

Tolerance (tests/test_autograd.py's rule, flash-attention's): a backend's gradient error against the fp64 reference's
autograd is at most 2x the error of the reference's own autograd at the inputs' precision (fp32 math, one
rounding to the input dtype) plus one rounding of the gradient's dtype (fp32 1e-6, fp16 2^-11, bf16 2^-8),
relative to the largest gradient entry of the call (so that a gradient which is zero in exact arithmetic, one
key, is held to the scale of its rounding noise). The Triton kernels round p and ds to the 16-bit input dtype
for the tensor-core products (as FlashAttention-2 does), which the extra rounding term covers. FlashAttention-2's
delta = rowsum(dO * O) reads the output in its own dtype, which the baseline never rounds: the hypothesis test adds
that term's first-order effect, computed from the actual rounding of the output (`delta_rounding`; a few ulps of
the gradient; it had made one text key + one image key in bf16 fail the rule by up to 1.7x now and then), and a
bound of the fp32 summation orders of delta and dP that the delta's subtraction exposes (`delta_order`; a
gradient zero in exact arithmetic, one fp32 image key, is made of it).
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import wan_kernels
from wan_kernels import ref, routing
from wan_kernels.testing import TOLERANCE, rel_err
from wan_kernels.triton import attention_bwd as tb



pytestmark = pytest.mark.usefixtures("triton_interpreter")


def rnd(g, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def inputs(B, Sq, Sk, Si, H, D, dtype, seed=0):
    """q, k, v, k_img, v_img (image set None when Si == 0) and a cotangent dout; the scores spread over a few
    units (scale 1.5) so the softmax is neither flat nor one-hot."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = rnd(g, B, Sq, H, D, dtype=dtype, scale=1.5), rnd(g, B, Sk, H, D, dtype=dtype), rnd(g, B, Sk, H, D, dtype=dtype)
    ki, vi = (rnd(g, B, Si, H, D, dtype=dtype), rnd(g, B, Si, H, D, dtype=dtype)) if Si else (None, None)
    return q, k, v, ki, vi, rnd(g, B, Sq, H, D, dtype=dtype)


def leaves(ts, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_() for t in ts]


def ref_grads(fn, ts, cots, dtype=None):
    """Gradients of <fn(ts), cots> w.r.t. every tensor of ts (None stays None), in `dtype` (default: the inputs')."""
    xs = leaves(ts, dtype)
    outs = fn(*xs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    pairs = [(o, c.to(o.dtype)) for o, c in zip(outs, cots) if c is not None]
    got = torch.autograd.grad([o for o, _ in pairs], [x for x in xs if x is not None], [c for _, c in pairs],
                              materialize_grads=True)  # lse alone does not depend on v: zeros
    it = iter(got)
    return [None if x is None else next(it) for x in xs]


def delta_rounding(q, k, out, out64, dout, scale):
    """(dq, dk): the first-order effect on the gradients of FlashAttention-2's delta = rowsum(dout * out) taken
    from the forward's output `out` in its own dtype instead of the exact output `out64` (fp64): delta_r is off by
    e_r = sum_d dout_rd (out_rd - out64_rd), and ds = p (dP - delta) passes it on as d dq_r = -scale e_r sum_n
    p_rn k_n and d dk_n = -scale sum_r p_rn e_r q_r (p: the key set's probabilities, fp64). `k`: the set whose
    delta comes from the output (with an image set: the text set; the image delta is recomputed from its own
    probabilities, so the whole rounding of the summed output lands on the text delta). Returns the largest
    entries of both. The rule's baseline, the reference's autograd, never rounds the output before its backward,
    so this term is the design's own (computed from the actual rounding, not a worst case): 0 in fp32 up to
    fp32 rounding, and at most a few ulps of the gradients in 16-bit dtypes."""
    qd, kd = (t.double().transpose(1, 2) for t in (q, k))                                      # [B, H, S, D]
    e = (dout.double() * (out.double() - out64.double())).sum(-1).transpose(1, 2)[..., None]   # [B, H, Sq, 1]
    p = torch.softmax(qd @ kd.transpose(-1, -2) * scale, dim=-1)                              # [B, H, Sq, Sk]
    return (scale * e * (p @ kd)).abs().max().item(), (scale * (p * e).transpose(-1, -2) @ qd).abs().max().item()


def delta_order(q, k, v, dout, scale):
    """(dq, dk) bounds of the other term of FlashAttention-2's delta: delta_r = sum_d dout_rd o_rd and the dP_rn =
    sum_d dout_rd v_nd it is subtracted from are fp32 dot products in different orders, each within (D - 1) u
    sum_d |dout_rd o_rd| (resp. |dout_rd v_nd|) of exact, so ds = p (dP - delta) carries |e_r| <= 2 D u
    sum_d |dout_rd| max_n |v_nd| into dq_r (scale |e_r| sum_n p_rn |k_n|) and dk_n (scale sum_r p_rn |e_r| |q_r|).
    A gradient that is zero in exact arithmetic (one key: dP = delta) is pure such noise: it had made a single
    fp32 image key's dk exceed the rule by 9 % (seed 3848). `k`, `v`: one key set."""
    qd, kd, vd = (t.double().transpose(1, 2) for t in (q, k, v))                               # [B, H, S, D]
    D = q.shape[-1]
    e = 2 * D * 2.0 ** -24 * (dout.double().abs().transpose(1, 2) * vd.abs().amax(2, keepdim=True)).sum(-1)
    p = torch.softmax(qd @ kd.transpose(-1, -2) * scale, dim=-1)                               # [B, H, Sq, Sk]
    return ((scale * e[..., None] * (p @ kd.abs())).abs().max().item(),
            (scale * (p * e[..., None]).transpose(-1, -2) @ qd.abs()).max().item())


def assert_flash_rule(got, ts, fn, cots, dtype, what="", delta=(0.0, 0.0, 0.0)):
    """got: gradients of a backend; checked against the fp64 reference with the rule of the module docstring;
    `delta`: (dq, dk, dk_img) bounds of the delta's terms (`delta_rounding`, `delta_order`), added for q, k, k_img."""
    want = ref_grads(fn, ts, cots, torch.float64)
    same = ref_grads(fn, ts, cots)
    # relative to the largest gradient entry of the call (see the module docstring)
    floor = max(w.abs().max().item() for w in want if w is not None)
    for i, (g, w, s) in enumerate(zip(got, want, same)):
        if w is None:
            assert g is None, (what, i)
            continue
        assert g.shape == w.shape and g.dtype == ts[i].dtype, (what, i, g.shape, g.dtype)
        extra = {0: delta[0], 1: delta[1], 3: delta[2] if len(delta) > 2 else 0.0}.get(i, 0.0) / floor
        bound = 2 * rel_err(s, w, floor) + TOLERANCE[dtype].rounding + extra
        assert rel_err(g, w, floor) <= bound, (what, i, rel_err(g, w, floor), bound)


def call(impl, op, *args):
    return getattr(torch.ops.wan, op)(*args) if impl == "op" else getattr(wan_kernels, op)(*args, impl=impl)


# ---------------------------------------------------------------------------------------------
# wan::attention_backward, the single-key-set op

BACKWARD_CASES = [  # (B, Sq, Sk, H, D): tails of the 64-row interpreter tile and of the table's 32/64-row tiles
    (1, 1, 1, 1, 64), (2, 70, 67, 2, 64), (1, 33, 130, 1, 128), (1, 17, 9, 2, 24), (1, 65, 31, 1, 8)]


@pytest.mark.slow
@pytest.mark.parametrize("impl", ("op", "ref", "triton"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("shape", BACKWARD_CASES, ids=str)
def test_attention_backward_matches_fp64_autograd(impl, dtype, shape):
    B, Sq, Sk, H, D = shape
    q, k, v, _, _, dout = inputs(B, Sq, Sk, 0, H, D, dtype)
    scale = 0.3 if D == 24 else None
    out, lse = ref.attention_lse(q, k, v, scale)
    delta = ref.attention_delta(dout, out, q)[0]
    got = call(impl, "attention_backward", dout, q, k, v, lse, delta, scale)
    assert_flash_rule(got, (q, k, v), lambda *a: ref.attention(*a, None, None, scale), (dout,), dtype, impl)


@pytest.mark.slow
@pytest.mark.parametrize("which", ("dkdv", "dq"))
@pytest.mark.parametrize("d", (64, 128))
def test_every_table_tile_is_exact_under_the_interpreter(which, d):
    """The CONFIGS tiles (not only the interpreter's 64 x 64) with tails of both tile dims, fp32."""
    q, k, v, _, _, dout = inputs(1, 45, 75, 0, 1, d, torch.float32)
    out, lse = ref.attention_lse(q, k, v)
    delta = ref.attention_delta(dout, out, q)[0]
    for cfg in sorted({c for (_, hd, w), c in tb.CONFIGS.items() if hd == d and w == which}, key=str):
        got = tb.attention_backward(dout, q, k, v, lse, delta, None, configs={which: cfg})
        assert_flash_rule(got, (q, k, v), lambda *a: ref.attention(*a), (dout,), torch.float32, str(cfg))


@pytest.mark.parametrize("impl", ("op", "ref", "triton"))
@pytest.mark.parametrize("si", (0, 5, 70))
def test_attention_delta_matches_fp64(impl, si):
    q, k, v, ki, vi, dout = inputs(2, 37, 9, si, 2, 16, torch.float32)
    out, lse = ref.attention_forward(q, k, v, ki, vi)
    got = call(impl, "attention_delta", dout, out, q, ki, vi, lse[1] if si else None, None)
    d64 = [None if t is None else t.double() for t in (dout, out, q, ki, vi)]
    want = ref.attention_delta(*d64, lse[1].double() if si else None)
    assert got.shape == (2 if si else 1, 2, 2, 37) and got.dtype == torch.float32
    # fp32 row sums of 16 products and of the recomputed image output: a few fp32 roundings of O(10) values
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5 * want.abs().max().item())
    if si:  # the split: text + image = rowsum(dout * out), image = rowsum(dout * out_img)
        out_img = ref.attention(*d64[2:3], *d64[3:5])
        torch.testing.assert_close(got[1].double(), (d64[0] * out_img).sum(-1).transpose(1, 2), rtol=0,
                                   atol=1e-5 * want.abs().max().item())


def test_lse_gradient_enters_as_delta_minus_dlse():
    q, k, v, _, _, dout = inputs(1, 20, 11, 0, 2, 8, torch.float64)
    dlse = rnd(torch.Generator().manual_seed(3), 1, 2, 20, dtype=torch.float64)
    out, lse = ref.attention_lse(q, k, v)
    got = ref.attention_backward(dout, q, k, v, lse, ref.attention_delta(dout, out, q)[0] - dlse)
    want = ref_grads(ref.attention_lse, (q, k, v), (dout, dlse))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)  # fp64: the same formula, different order


@pytest.mark.parametrize("impl", ("ref", "triton"))
def test_ring_contract_per_block_with_global_lse_and_delta(impl):
    """Ring attention's backward: per K/V block, attention_backward with the MERGED lse and delta; dq summed
    over blocks, dk / dv concatenated, equals the full backward (blocks of 13, 40 and 4 keys)."""
    dtype = torch.float64 if impl == "ref" else torch.float32
    q, k, v, _, _, dout = inputs(2, 29, 57, 0, 2, 16, dtype)
    out, lse = ref.attention_lse(q, k, v)
    delta = ref.attention_delta(dout, out, q)[0]
    full = call(impl, "attention_backward", dout, q, k, v, lse, delta, None)
    dq, dks, dvs = 0, [], []
    for a, b in ((0, 13), (13, 53), (53, 57)):
        g = call(impl, "attention_backward", dout, q, k[:, a:b], v[:, a:b], lse, delta, None)
        dq, dks, dvs = dq + g[0], dks + [g[1]], dvs + [g[2]]
    # fp64: exact up to summation order; fp32: dq adds three fp32 partial sums (a few fp32 ulps of |dq|)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    for got, want in ((dq, full[0]), (torch.cat(dks, 1), full[1]), (torch.cat(dvs, 1), full[2])):
        torch.testing.assert_close(got, want, rtol=0, atol=tol * want.abs().max().item())


def test_attention_backward_checks_arguments():
    q, k, v, _, _, dout = inputs(1, 4, 3, 0, 2, 8, torch.float32)
    lse = torch.zeros(1, 2, 4)
    with pytest.raises(ValueError, match=r"lse must be torch.float32 \[B, H, Sq\] = \[1, 2, 4\], got shape \(1, 4, 2\)"):
        wan_kernels.attention_backward(dout, q, k, v, lse.transpose(1, 2), lse)
    with pytest.raises(ValueError, match="delta must be torch.float32 .* dtype torch.float16"):
        wan_kernels.attention_backward(dout, q, k, v, lse, lse.half())
    with pytest.raises(ValueError, match=r"dout must be torch.float32 \[1, 4, 2, 8\]"):
        wan_kernels.attention_backward(dout[:, :3], q, k, v, lse, lse)
    with pytest.raises(ValueError, match="lse_img must be torch.float32 .* with k_img, got None"):
        wan_kernels.attention_delta(dout, dout, q, k, v, None)


# ---------------------------------------------------------------------------------------------
# Gradients of wan::attention and wan::attention_lse through the autograd of every backend

IMPLS = ("op", "auto", "cpu", "ref", "triton")


def attention_grads(impl, q, k, v, ki, vi, dout, scale):
    xs = leaves((q, k, v, ki, vi))
    out = call(impl, "attention", *xs, scale)
    assert out.grad_fn is not None and "NotImplemented" not in type(out.grad_fn).__name__
    got = torch.autograd.grad(out, [x for x in xs if x is not None], dout)
    return list(got) + [None] * (5 - len(got))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sq=st.integers(1, 70), sk=st.integers(1, 70), si=st.sampled_from([0, 1, 7, 66]),
       d=st.sampled_from([8, 24, 64, 128]), h=st.integers(1, 2), impl=st.sampled_from(IMPLS),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), seed=st.integers(0, 2 ** 16))
def test_attention_gradients_hypothesis(sq, sk, si, d, h, impl, dtype, seed):
    if dtype == torch.float16 and impl in ("op", "auto", "cpu"):
        dtype = torch.bfloat16  # the C++ CPU forward takes fp32/bf16/fp64 (fp16: the reference and Triton)
    q, k, v, ki, vi, dout = inputs(1, sq, sk, si, h, d, dtype, seed)
    scale = 1.0 / math.sqrt(d) if seed % 2 else 0.2
    got = attention_grads(impl, q, k, v, ki, vi, dout, scale)
    with torch.no_grad():
        out = call(impl, "attention", q, k, v, ki, vi, scale)
    out64 = ref.attention(*[None if t is None else t.double() for t in (q, k, v, ki, vi)], scale)
    rounding = delta_rounding(q, k, out, out64, dout, scale)
    text = delta_order(q, k, v, dout, scale)
    img = delta_order(q, ki, vi, dout, scale) if si else (0.0, 0.0)
    delta = (rounding[0] + text[0] + img[0], rounding[1] + text[1], img[1])
    assert_flash_rule(got, (q, k, v, ki, vi), lambda *a: ref.attention(*a, scale), (dout,), dtype,
                      f"{impl} {dtype} sq={sq} sk={sk} si={si} d={d}", delta)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ("op", "ref", "triton"))
@pytest.mark.parametrize("cot", ("both", "lse-only", "out-only"))
def test_attention_lse_gradients_of_both_outputs(impl, cot):
    q, k, v, _, _, dout = inputs(2, 23, 70, 0, 2, 16, torch.float32)
    dlse = rnd(torch.Generator().manual_seed(5), 2, 2, 23)
    cots = {"both": (dout, dlse), "lse-only": (None, dlse), "out-only": (dout, None)}[cot]
    xs = leaves((q, k, v))
    out, lse = call(impl, "attention_lse", *xs, None)
    pairs = [(o, c) for o, c in zip((out, lse), cots) if c is not None]
    got = torch.autograd.grad([o for o, _ in pairs], xs, [c for _, c in pairs], materialize_grads=True)
    assert_flash_rule(got, (q, k, v), ref.attention_lse, cots, torch.float32, f"{impl} {cot}")


def test_double_backward_is_the_references():
    q, k, v, ki, vi, _ = inputs(1, 3, 4, 2, 1, 4, torch.float64)
    args = tuple(leaves((q, k, v, ki, vi))) + (None,)
    assert torch.autograd.gradgradcheck(torch.ops.wan.attention, args, fast_mode=True)
    assert torch.autograd.gradgradcheck(torch.ops.wan.attention_lse, args[:3] + (None,), fast_mode=True)


class OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "wan":
            self.ops.append(func._opname)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("img", (True, False))
def test_one_forward_saving_lse_and_no_recompute_in_backward(img):
    """Under grad the dispatcher runs wan::attention_forward once (no wan::attention, no second forward);
    the backward runs attention_delta once and attention_backward once per key set; without grad, plain
    wan::attention."""
    q, k, v, ki, vi, dout = inputs(1, 9, 6, 4 if img else 0, 1, 8, torch.float32)
    xs = leaves((q, k, v, ki, vi))
    with OpLog() as fwd:
        out = torch.ops.wan.attention(*xs, None)
    with OpLog() as bwd:
        out.backward(dout)
    assert fwd.ops == ["attention_forward"]
    assert bwd.ops == ["attention_delta"] + ["attention_backward"] * (2 if img else 1)
    with torch.no_grad(), OpLog() as plain:
        torch.ops.wan.attention(*xs, None)
    assert plain.ops == ["attention"]


@pytest.mark.slow
@pytest.mark.parametrize("op", ("attention", "attention_lse", "attention_forward", "attention_backward",
                                "attention_delta"))
def test_opcheck_autograd_and_aot_dispatch(op):
    q, k, v, ki, vi, dout = inputs(2, 11, 7, 5, 2, 16, torch.float32)
    qs = q.transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous [B, S, H, D] (heads-major storage)
    out, lse = ref.attention_lse(qs, k, v)
    args = {"attention": (qs, k, v, ki, vi, None), "attention_lse": (qs, k, v, 0.4),
            "attention_forward": (qs, k, v, ki, vi, None),
            "attention_backward": (dout, qs, k, v, lse, ref.attention_delta(dout, out, qs)[0], None),
            "attention_delta": (dout, out, qs, ki, vi, lse, None)}[op]
    diff = routing.SPECS[op].differentiable
    names = routing.SPECS[op].arg_names
    args = tuple(a.clone().requires_grad_() if isinstance(a, torch.Tensor) and n in diff else a
                 for n, a in zip(names, args))
    torch.library.opcheck(getattr(torch.ops.wan, op).default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))


@pytest.mark.slow
def test_compiled_training_step_traces_the_backward_ops():
    """torch.compile(fullgraph=True) of forward + backward (aot_eager: AOTAutograd's joint graph) holds the
    backward ops, and gives the eager gradients."""
    q, k, v, ki, vi, dout = inputs(1, 13, 6, 3, 2, 8, torch.float32)
    graphs = []

    def backend(gm, example_inputs):
        from torch._dynamo.backends.common import aot_autograd

        def keep(g, _):
            graphs.append(str(g.code))
            return g

        return aot_autograd(fw_compiler=keep, bw_compiler=keep)(gm, example_inputs)

    def loss(q, k, v, ki, vi):
        return (torch.ops.wan.attention(q, k, v, ki, vi, None) * dout).sum()

    def grads(fn):
        xs = leaves((q, k, v, ki, vi))
        fn(*xs).backward()
        return [x.grad for x in xs]

    eager = grads(loss)
    compiled = grads(torch.compile(loss, backend=backend, fullgraph=True))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same kernels in the same order
    code = "\n".join(graphs)
    assert "wan.attention_forward" in code and "wan.attention_backward" in code and "wan.attention_delta" in code


# ---------------------------------------------------------------------------------------------
# GPU readiness of the backward launches (no GPU: AOT compiles)

def test_readiness_lists_every_backward_pass_per_arch():
    from tools import readiness

    jobs = readiness.jobs_for(["attention"], readiness.ARCHS)
    for arch in readiness.ARCHS:
        for d in (64, 128):
            for which in tb.PASSES:
                cfg = tb.pick_config((arch // 10, arch % 10), d, which)
                assert any(j.arch == arch and j.config.startswith(f"bwd {which} ") and f"hd{d} {cfg} " in j.config
                           for j in jobs), (arch, d, which)


@pytest.mark.aot
@pytest.mark.parametrize("arch", (90,))
def test_backward_offsets_do_not_wrap_at_wan_sizes_and_do_not_spill(arch, tmp_path):
    """Wan-14B 720p with CFG (151,200 rows x 40 heads x 128): every backward launch, 64-bit where it must be,
    zero spills, the arch's tensor cores (the full table: python -m tools.readiness in make test)."""
    from tools import aot

    m = lambda *s, dtype=torch.bfloat16: torch.empty(s, dtype=dtype, device="meta")  # noqa: E731
    q, stat, ki = m(2, 75600, 40, 128), m(2, 40, 75600, dtype=torch.float32), m(2, 257, 40, 128)
    cap = (arch // 10, arch % 10)
    launches = tb.prepare_backward(q, q, q, q, stat, stat, None, cap)[0] + \
        [tb.prepare_delta(q, q, q, ki, ki, stat, None, cap)[0]]
    for launch in launches:
        r = aot.compile_launch(launch, arch, workdir=tmp_path)
        check = aot.offset_overflows(launch, r.ptx, arch)
        assert check.checked > 0 and check.overflowing == [], (launch.kernel.fn.__name__, check.overflowing[:4])
        assert not r.spills and "wgmma" in r.mma_families, r
