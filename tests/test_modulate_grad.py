"""Backward of wan::layer_norm_modulate and wan::gated_residual (wan::layer_norm_modulate_backward,
wan::gated_residual_backward): every backend that runs here (C++ CPU, Triton under the interpreter, the reference)
against the fp64 reference's autograd; modulation operands broadcast ([B, 1, C], [1, 1, C], [1, S, C]) and per
token ([B, S, C]), strided as the model passes them (unbound views of its [B, 1|S, 6, C] modulation tensor).

Tolerance (tests/test_autograd.py's rule, flash-attention's): a backend's error against the fp64 autograd gradient is
at most 2x the error of the reference's own autograd at the same precision, plus one rounding of the gradient's
dtype relative to its largest entry (fp32 1e-6, fp16 2^-11, bf16 2^-8; the scale/shift/gate gradients are fp32):
the kernels compute in fp32 and round once, summing the token axis in row blocks instead of torch's order.
"""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from wan_kernels import _autograd, ops, ref
from wan_kernels.testing import TOLERANCE, rel_err
from wan_kernels.triton import modulate as tmod

IMPLS = ("cpu", "triton", "ref")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


pytestmark = pytest.mark.usefixtures("triton_interpreter")


def modulation(shape, g, *, layout="model"):
    """fp32 [B|1, S|1, C]: "model" = one unbound view of a [B, S, 6, C] tensor (C contiguous, rows 6C apart);
    "strided" = every other element along C; "contiguous"."""
    B, S, C = shape
    if layout == "model":
        return torch.randn(B, S, 6, C, generator=g)[:, :, 2]
    if layout == "strided":
        return torch.randn(B, S, 2 * C, generator=g)[..., ::2]
    return torch.randn(B, S, C, generator=g)


def check(fn_got, ref_fwd, args, diff, cot, dtype):
    """Gradients fn_got() (one per index in `diff`) vs the fp64 / same-precision autograd of ref_fwd."""
    got = fn_got()
    out = []
    for prec in (torch.float64, None):
        leaves = [a.detach().to(prec or a.dtype).requires_grad_() if i in diff else a for i, a in enumerate(args)]
        res = ref_fwd(*leaves)
        out.append(torch.autograd.grad(res, [leaves[i] for i in diff], cot.to(prec or res.dtype)))
    want, same = out
    for i, g, w, s in zip(diff, got, want, same):
        assert g.shape == args[i].shape and g.dtype == args[i].dtype, i
        assert rel_err(g, w) <= 2 * rel_err(s, w) + TOLERANCE[g.dtype].rounding, (i, rel_err(g, w), rel_err(s, w))


def ln_case(B, S, C, dtype, scale_shape, shift_shape, seed=0, layout="model", huge=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, S, C, generator=g) * 3 + 1
    if huge:  # the forward's huge-row rule: every row's squared deviations overflow fp32
        x *= 1e30
    scale, shift = modulation(scale_shape, g, layout=layout), modulation(shift_shape, g, layout=layout)
    return torch.randn(B, S, C, generator=g).to(dtype), (x.to(dtype), scale, shift, 1e-6)


def check_ln(impl, cot, args):
    check(lambda: ops.layer_norm_modulate_backward(cot, *args, impl=impl), ref.layer_norm_modulate, args, (0, 1, 2),
          cot, args[0].dtype)


def gr_case(B, S, C, dtype, gate_shape, seed=0, layout="model", y_dtype=None):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(B, S, C, generator=g).to(dtype), torch.randn(B, S, C, generator=g).to(y_dtype or dtype)
    return torch.randn(B, S, C, generator=g).to(dtype), (x, y, modulation(gate_shape, g, layout=layout))


def check_gr(impl, cot, args):
    check(lambda: ops.gated_residual_backward(cot, *args[1:], impl=impl), ref.gated_residual, args, (1, 2), cot,
          args[0].dtype)


BROADCASTS = {"bcast": lambda B, S, C: (B, 1, C), "per_token": lambda B, S, C: (B, S, C),
              "batch_bcast": lambda B, S, C: (1, 1, C), "token_only": lambda B, S, C: (1, S, C)}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("B,S,C", [(1, 1, 16), (2, 9, 40), (2, 3, 5120)])
@pytest.mark.parametrize("kind", ("bcast", "per_token"))
def test_layer_norm_modulate_backward(impl, dtype, B, S, C, kind):
    # scale as `kind`, shift the other way (a mixed pair covers both kernel paths in one call)
    other = "per_token" if kind == "bcast" else "bcast"
    cot, args = ln_case(B, S, C, dtype, BROADCASTS[kind](B, S, C), BROADCASTS[other](B, S, C), seed=C)
    check_ln(impl, cot, args)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("B,S,C", [(1, 1, 16), (2, 9, 40), (2, 3, 5120)])
@pytest.mark.parametrize("kind", ("bcast", "per_token"))
def test_gated_residual_backward(impl, dtype, B, S, C, kind):
    cot, args = gr_case(B, S, C, dtype, BROADCASTS[kind](B, S, C), seed=C + 1)
    check_gr(impl, cot, args)


@settings(max_examples=15, deadline=None)
@given(B=st.integers(1, 3), S=st.integers(1, 12), C=st.sampled_from([1, 7, 16, 100, 1536]),
       scale_kind=st.sampled_from(sorted(BROADCASTS)), shift_kind=st.sampled_from(sorted(BROADCASTS)),
       layout=st.sampled_from(["model", "strided", "contiguous"]), impl=st.sampled_from(IMPLS),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2 ** 16))
def test_backward_hypothesis(B, S, C, scale_kind, shift_kind, layout, impl, dtype, seed):
    cot, args = ln_case(B, S, C, dtype, BROADCASTS[scale_kind](B, S, C), BROADCASTS[shift_kind](B, S, C), seed,
                        layout)
    check_ln(impl, cot, args)
    cot, args = gr_case(B, S, C, dtype, BROADCASTS[shift_kind](B, S, C), seed, layout)
    check_gr(impl, cot, args)


@pytest.mark.parametrize("impl", IMPLS)
def test_layer_norm_modulate_backward_huge_rows(impl):
    cot, args = ln_case(2, 3, 64, torch.float32, (2, 1, 64), (2, 3, 64), huge=True)
    check_ln(impl, cot, args)


@pytest.mark.parametrize("impl", ("cpu", "ref"))
def test_gated_residual_backward_y_in_another_dtype(impl):
    cot, args = gr_case(2, 3, 16, torch.bfloat16, (2, 1, 16), y_dtype=torch.float32)
    check_gr(impl, cot, args)


def test_triton_partials_over_many_row_blocks(monkeypatch):
    # several rows per program, a short last block per batch entry, then the sum over the [B, P, C] partials
    monkeypatch.setattr(tmod, "MAX_PROGRAMS", 4)
    cot, args = ln_case(2, 7, 40, torch.float32, (2, 1, 40), (1, 1, 40), seed=3)
    launch = tmod.prepare_layer_norm_modulate_backward(cot, *args, None)[0]
    assert launch.grid == (2, 2)  # ROWS = 4: rows 0-3 and 4-6 of each batch entry
    check_ln("triton", cot, args)
    cot, args = gr_case(2, 7, 40, torch.float32, (1, 1, 40), seed=4)
    check_gr("triton", cot, args)


def test_cpu_reductions_are_independent_of_the_thread_count():
    cot, args = ln_case(2, 700, 40, torch.float32, (2, 1, 40), (1, 1, 40), seed=8)  # several rows per block
    gcot, gargs = gr_case(2, 700, 40, torch.float32, (2, 1, 40), seed=9)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            runs.append(ops.layer_norm_modulate_backward(cot, *args, impl="cpu")
                        + ops.gated_residual_backward(gcot, *gargs[1:], impl="cpu"))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("op", ("layer_norm_modulate", "gated_residual"))
@pytest.mark.parametrize("impl", ("auto", "cpu", "triton", "ref"))
def test_forward_autograd_uses_the_backward_op(op, impl, monkeypatch):
    # the forward's gradients come from its backward op (OpSpec.backward), not the reference's VJP
    if impl != "ref":
        monkeypatch.setattr(_autograd, "_vjp", lambda *a: pytest.fail("reference VJP used"))
    if op == "layer_norm_modulate":
        cot, args = ln_case(2, 5, 24, torch.bfloat16, (2, 1, 24), (2, 5, 24), seed=12)
    else:
        cot, args = gr_case(2, 5, 24, torch.bfloat16, (2, 1, 24), seed=13)
    diff = (0, 1, 2)

    def got():
        leaves = [a.detach().clone().requires_grad_() if i in diff else a for i, a in enumerate(args)]
        out = getattr(ops, op)(*leaves, impl=impl)
        return torch.autograd.grad(out, [leaves[i] for i in diff], cot)

    check(got, getattr(ref, op), args, diff, cot, torch.bfloat16)


@pytest.mark.slow
@pytest.mark.parametrize("op", ("layer_norm_modulate", "gated_residual", "layer_norm_modulate_backward",
                                "gated_residual_backward"))
def test_opcheck_autograd(op):
    cot, args = ln_case(2, 3, 16, torch.float32, (2, 1, 16), (2, 3, 16), seed=6)
    gcot, gargs = gr_case(2, 3, 16, torch.float32, (2, 1, 16), seed=7)
    full = {"layer_norm_modulate": args, "gated_residual": gargs, "layer_norm_modulate_backward": (cot, *args),
            "gated_residual_backward": (gcot, *gargs[1:])}[op]
    diff = _autograd.OPS[op].differentiable
    full = tuple(a.clone().requires_grad_() if isinstance(a, torch.Tensor) and n in diff else a
                 for n, a in zip(_autograd.OPS[op].arg_names, full))
    torch.library.opcheck(getattr(torch.ops.wan, op).default, full,
                          test_utils=("test_autograd_registration", "test_aot_dispatch_dynamic"))


def test_errors_name_the_argument():
    cot, args = ln_case(2, 3, 16, torch.float32, (2, 1, 16), (2, 3, 16))
    for impl in IMPLS:
        with pytest.raises(ValueError, match=r"grad_out must have x's shape \(2, 3, 16\) and dtype torch.float32, "
                                             r"got shape \(2, 3, 16\) dtype torch.bfloat16"):
            ops.layer_norm_modulate_backward(cot.bfloat16(), *args, impl=impl)
        with pytest.raises(ValueError, match=r"gate must be float32 \[2 or 1, 3 or 1, 16\]"):
            ops.gated_residual_backward(cot, args[0], args[1].double(), impl=impl)
    with pytest.raises(RuntimeError, match="layer_norm_modulate_backward: grad_out must have x's shape"):
        torch.ops.wan.layer_norm_modulate_backward(cot[:, :2], *args)  # the C++ kernel's TORCH_CHECK
    with pytest.raises(RuntimeError, match="gated_residual_backward: grad_out must have y's shape"):
        torch.ops.wan.gated_residual_backward(cot[:, :2], args[0], args[1])
