"""Backward of wan::qk_norm_rope (wan::qk_norm_rope_backward) and of the composite wan::qkv_rope: every backend
that runs here (C++ CPU, Triton under the interpreter, the reference) against the fp64 reference's autograd.

Tolerance (tests/test_autograd.py's rule, flash-attention's): a backend's error against the fp64 autograd gradient is
at most 2x the error of the reference's own autograd at the same precision, plus one rounding of the gradient's
dtype relative to its largest entry (fp32 1e-6, fp16 2^-11, bf16 2^-8): the kernels compute in fp32 and round
once, but sum in another order (row blocks for the weight gradients), which costs no more than the reference's
own fp32 error.
"""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from wan_kernels import _autograd, ops, ref
from wan_kernels.testing import TOLERANCE, rel_err
from wan_kernels.triton import qk_norm_rope as tqk

IMPLS = ("cpu", "triton", "ref")


pytestmark = pytest.mark.usefixtures("triton_interpreter")


def make(B, S, H, D, dtype, seed=0, *, strided=False):
    """qkv [B, S, 3C] (strided: a view of a wider GEMM output, as a fused projection with extra columns gives),
    norm weights, rope tables, output gradients (strided: [B, H, S, D] tensors transposed, as attention's
    backward hands them)."""
    g = torch.Generator().manual_seed(seed)
    C = H * D
    qkv = torch.randn(B, S, 3 * C + (5 if strided else 0), generator=g)[..., :3 * C].to(dtype)
    wq, wk = (torch.randn(C, generator=g) * 0.3 + 1 for _ in range(2))
    ang = torch.rand(S, D // 2, generator=g) * 6.0
    if strided:
        grads = [torch.randn(B, H, S, D, generator=g).to(dtype).transpose(1, 2) for _ in range(3)]
    else:
        grads = [torch.randn(B, S, H, D, generator=g).to(dtype) for _ in range(3)]
    return grads, (qkv, wq.to(dtype), wk.to(dtype), ang.cos(), ang.sin(), H, 1e-6)


def reference_grads(grads, args, dtype):
    """(fp64 autograd gradients, the reference's autograd gradients at the inputs' precision) for qkv, wq, wk."""
    out = []
    for prec in (torch.float64, dtype):
        leaves = [a.detach().to(prec).requires_grad_() for a in args[:3]]
        outs = ref.qk_norm_rope(*leaves, *args[3:])
        out.append(torch.autograd.grad(outs, leaves, [g.to(prec) for g in grads]))
    return out


def assert_matches(got, args, grads, dtype):
    want, same = reference_grads(grads, args, dtype)
    for name, a, g, w, s in zip(("grad_qkv", "grad_norm_q_weight", "grad_norm_k_weight"), args, got, want, same):
        assert g.shape == a.shape and g.dtype == a.dtype, name
        assert rel_err(g, w) <= 2 * rel_err(s, w) + TOLERANCE[dtype].rounding, (name, rel_err(g, w), rel_err(s, w))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("B,S,H,D", [(1, 1, 1, 2), (2, 5, 3, 16), (1, 3, 5, 64), (1, 2, 40, 128)])
def test_backward_op_matches_fp64_autograd(impl, dtype, B, S, H, D):
    # H = 3 / 5 / 40 leave part of the next_pow2(H) head tile masked; 40 x 128: Wan 14B's row (C = 5120)
    grads, args = make(B, S, H, D, dtype)
    assert_matches(ops.qk_norm_rope_backward(*grads, *args, impl=impl), args, grads, dtype)


@pytest.mark.parametrize("impl", ("cpu", "triton"))
def test_chunked_rows(impl):
    # 65 heads x 128 > MAX_TILE: the Triton kernel's two-pass chunked path (partials read-modify-written)
    grads, args = make(1, 2, 65, 128, torch.float32, seed=3)
    assert tqk.launch_config(65, 128).NUM_CHUNKS > 1
    assert_matches(ops.qk_norm_rope_backward(*grads, *args, impl=impl), args, grads, torch.float32)


@settings(max_examples=12, deadline=None)
@given(B=st.integers(1, 2), S=st.integers(1, 7), H=st.integers(1, 6), D=st.sampled_from([2, 4, 8, 32]),
       impl=st.sampled_from(IMPLS), dtype=st.sampled_from([torch.float32, torch.bfloat16]), strided=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_backward_hypothesis(B, S, H, D, impl, dtype, strided, seed):
    grads, args = make(B, S, H, D, dtype, seed, strided=strided)
    assert_matches(ops.qk_norm_rope_backward(*grads, *args, impl=impl), args, grads, dtype)


def test_triton_weight_gradient_over_many_row_blocks(monkeypatch):
    # several rows per program and a short last block: the [P, C] partials and their sum
    monkeypatch.setattr(tqk, "MAX_PROGRAMS", 3)
    grads, args = make(2, 5, 2, 8, torch.float32, seed=5)
    launches = tqk.prepare_backward(*grads, *args, None)[0]
    assert launches[0].grid == (3,) and launches[0].args[tqk.norm_rope_bwd_kernel.arg_names.index("ROWS")] == 4
    assert_matches(ops.qk_norm_rope_backward(*grads, *args, impl="triton"), args, grads, torch.float32)


def test_cpu_weight_gradient_is_independent_of_the_thread_count():
    grads, args = make(2, 300, 2, 8, torch.float32, seed=7)  # 600 rows: several rows per block
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.qk_norm_rope_backward(*grads, *args, impl="cpu")
        torch.set_num_threads(max(2, threads))
        many = ops.qk_norm_rope_backward(*grads, *args, impl="cpu")
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, many))


@pytest.mark.parametrize("impl", ("auto", "cpu", "triton", "ref"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_autograd_uses_the_backward_op(impl, dtype, monkeypatch):
    # the forward's gradients come from wan::qk_norm_rope_backward (OpSpec.backward), not the reference's VJP
    if impl != "ref":
        monkeypatch.setattr(_autograd, "_vjp", lambda *a: pytest.fail("reference VJP used"))
    grads, args = make(2, 3, 2, 8, dtype, seed=11)
    leaves = [a.detach().clone().requires_grad_() for a in args[:3]]
    outs = ops.qk_norm_rope(*leaves, *args[3:], impl=impl)
    assert_matches(torch.autograd.grad(outs, leaves, grads), args, grads, dtype)


def test_missing_output_gradients_count_as_zeros():
    grads, args = make(1, 3, 2, 8, torch.float32, seed=2)
    leaves = [a.detach().clone().requires_grad_() for a in args[:3]]
    q, k, v = ops.qk_norm_rope(*leaves, *args[3:])
    got = torch.autograd.grad(q, leaves, grads[0])  # k and v get no gradient
    zeros = [torch.zeros_like(g) for g in grads[1:]]
    assert_matches(got, args, [grads[0], *zeros], torch.float32)


@pytest.mark.parametrize("impl", ("auto", "cpu", "triton", "ref"))
def test_qkv_rope_gradients(impl):
    # the composite: the GEMM's (dx, dW, db) by autograd of F.linear, then qk_norm_rope's backward op
    g = torch.Generator().manual_seed(4)
    B, S, H, D = 2, 3, 2, 8
    C = H * D
    x, w, b = torch.randn(B, S, C, generator=g), torch.randn(3 * C, C, generator=g) * 0.3, torch.randn(3 * C, generator=g)
    wq, wk = torch.randn(C, generator=g) + 1, torch.randn(C, generator=g) + 1
    ang = torch.rand(S, D // 2, generator=g) * 6
    args = [x, w, b, wq, wk]
    cot = [torch.randn(B, S, H, D, generator=g) for _ in range(3)]

    def run(fn, prec):
        leaves = [a.to(prec).requires_grad_() for a in args]
        return torch.autograd.grad(fn(*leaves, ang.cos(), ang.sin(), H, 1e-6), leaves, [c.to(prec) for c in cot])

    got = run(lambda *a: ops.qkv_rope(*a, impl=impl), torch.float32)
    want, same = run(ref.qkv_rope, torch.float64), run(ref.qkv_rope, torch.float32)
    for gt, w_, s in zip(got, want, same):
        assert rel_err(gt, w_) <= 2 * rel_err(s, w_) + TOLERANCE[torch.float32].rounding


@pytest.mark.slow
@pytest.mark.parametrize("op", ("qk_norm_rope", "qk_norm_rope_backward"))
def test_opcheck_autograd(op):
    grads, args = make(2, 3, 2, 8, torch.float32, seed=9)
    full = (*grads, *args) if op.endswith("backward") else args
    diff = _autograd.OPS[op].differentiable
    full = tuple(a.clone().requires_grad_() if isinstance(a, torch.Tensor) and n in diff else a
                 for n, a in zip(_autograd.OPS[op].arg_names, full))
    torch.library.opcheck(getattr(torch.ops.wan, op).default, full,
                          test_utils=("test_autograd_registration", "test_aot_dispatch_dynamic"))


def test_errors_name_the_argument():
    grads, args = make(1, 3, 2, 8, torch.float32)
    bad = grads[1][:, :2]
    for impl in IMPLS:
        with pytest.raises(ValueError, match=r"grad_k must be \[B, S, H, D\] = \[1, 3, 2, 8\].*got shape \(1, 2, 2, 8\)"):
            ops.qk_norm_rope_backward(grads[0], bad, grads[2], *args, impl=impl)
    with pytest.raises(ValueError, match="grad_v must have qkv's dtype torch.float32, got torch.bfloat16"):
        ops.qk_norm_rope_backward(grads[0], grads[1], grads[2].bfloat16(), *args)
    with pytest.raises(RuntimeError, match=r"qk_norm_rope_backward: grad_k must be \[B, S, H, D\]"):
        torch.ops.wan.qk_norm_rope_backward(grads[0], bad, grads[2], *args)  # the C++ kernel's TORCH_CHECK


@pytest.mark.aot
@pytest.mark.parametrize("arch", [80, 90, 100])
def test_triton_backward_compiles_without_spills(arch, tmp_path):
    """The backward launches readiness compiles (the launcher's own prepare_backward at Wan 14B, 151,200 rows:
    64-bit offsets), the single-tile and the chunked path in bf16, without spills or excess shared memory."""
    from tools import readiness
    from tools import aot

    jobs = [j for j in readiness.jobs_for(["qk_norm_rope"], (arch,)) if j.config.startswith("backward")
            and j.config.endswith("bfloat16") and ("H=40 " in j.config or "chunks=2" in j.config)]
    assert len(jobs) == 2 and {j.launch.kernel.fn.__name__ for j in jobs} == {"_norm_rope_bwd_kernel"}
    for j in jobs:
        r = aot.compile_launch(j.launch, j.arch, workdir=tmp_path)
        assert not readiness.problems(j, r), (j.config, r.summary())
