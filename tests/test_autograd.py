"""Gradients of the `wan` ops: every backend that runs on CPU ("op" = torch.ops.wan.<op> called directly,
the wrappers with impl="auto"/"cpu"/"ref"/"triton", Triton under TRITON_INTERPRET=1) x fp32/bf16 gives the
reference's gradients; inputs an op is not differentiable in raise at forward time; never a silent None.

Tolerance (flash-attention's rule, as for the forwards): the error of a backend's gradient against the fp64
reference's autograd gradient is at most 2x the error of the reference itself at the same precision, plus
one rounding of the gradient's dtype (fp32 1e-6, bf16 2^-8, relative to the largest gradient entry). The
fp64 reference is checked against finite differences by gradcheck.
"""

import pytest
import torch

import wan_kernels
from wan_kernels import _autograd, nvfp4, ref
from wan_kernels._spec import all_specs
from wan_kernels.linear import NVFP4Linear
from wan_kernels.testing import TOLERANCE, rel_err

from _inputs import op_inputs

DIFF_OPS = ("qk_norm_rope", "qkv_rope", "attention", "attention-no-image", "layer_norm_modulate", "gated_residual",
            "nvfp4_linear")
IMPLS = ("op", "auto", "cpu", "ref", "triton")
DTYPES = (torch.float32, torch.bfloat16)
NO_CPP_CPU_KERNEL = ("nvfp4_linear",)  # impl="cpu" raises BackendUnavailableError (tests/test_library.py)


pytestmark = pytest.mark.usefixtures("triton_interpreter")


def make_inputs(case: str, dtype: torch.dtype, seed: int = 0, *, small: bool = False) -> tuple[str, tuple]:
    """(op, args) with tiny shapes (smaller still for gradcheck); the args the op is differentiable in
    require grad."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, dt=dtype, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(dt)

    B, S, H, D, Sk, Si = (1, 3, 1, 4, 4, 2) if small else (2, 5, 2, 8, 7, 3)
    C = H * D
    ang = torch.rand(S, D // 2, generator=g) * 6.0
    norm = (r(C, s=0.3) + 1, r(C, s=0.3) + 1, ang.cos(), ang.sin(), H, 1e-6)
    w = r(8, 32, dt=torch.float32)
    wp, ws = ref.nvfp4_quantize(w, nvfp4.global_scale(w))
    op = case.removesuffix("-no-image")
    args = {
        "qk_norm_rope": (r(B, S, 3 * C),) + norm,
        "qkv_rope": (r(B, S, C), r(3 * C, C, s=0.3), r(3 * C), *norm),
        "attention": (r(B, S, H, D), r(B, Sk, H, D), r(B, Sk, H, D), r(B, Si, H, D), r(B, Si, H, D), None),
        "attention-no-image": (r(B, S, H, D), r(B, Sk, H, D), r(B, Sk, H, D), None, None, 0.3),
        "layer_norm_modulate": (r(B, S, C), r(B, 1, C, dt=torch.float32), r(B, S, C, dt=torch.float32), 1e-6),
        "gated_residual": (r(B, S, C), r(B, S, C), r(B, 1, C, dt=torch.float32)),
        "nvfp4_linear": (r(B, 3, 32), wp, ws, nvfp4.global_scale(w), r(8)),
    }[case]
    names = _autograd.OPS[op].arg_names
    args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) and n in _autograd.OPS[op].differentiable else a
                 for n, a in zip(names, args))
    return op, args


def run(op: str, impl: str, args):
    if impl == "op":
        return getattr(torch.ops.wan, op)(*args)
    return getattr(wan_kernels, op)(*args, impl=impl)


def grads(fn, args, dtype=None, seed: int = 1):
    """(outputs, gradients of <outputs, random cotangents> w.r.t. the args that require grad); the cotangents
    are drawn in `dtype` (default: the outputs'), so that an fp64 run sees the values a bf16 run does."""
    out = fn(*args)
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(seed)
    cot = [torch.randn(o.shape, generator=g).to(dtype or o.dtype).to(o.dtype) for o in outs]
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    return outs, torch.autograd.grad(outs, leaves, cot)


def as_fp64(args):
    return tuple(a.detach().double().requires_grad_(a.requires_grad)
                 if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != torch.float8_e4m3fn else a
                 for a in args)


PARAMS = [pytest.param(case, impl, dtype, id=f"{case}-{impl}-{str(dtype)[6:]}")
          for case in DIFF_OPS for impl in IMPLS for dtype in DTYPES
          if not (impl == "cpu" and case in NO_CPP_CPU_KERNEL)
          and not (impl == "triton" and case == "nvfp4_linear" and dtype == torch.float32)]  # W4A16 Triton: 16-bit x


@pytest.mark.slow
@pytest.mark.parametrize("case,impl,dtype", PARAMS)
def test_gradients_match_reference(case, impl, dtype):
    op, args = make_inputs(case, dtype)
    outs, got = grads(lambda *a: run(op, impl, a), args)
    for o in outs:  # a real backward, not the autograd fallback's WarnNotImplemented / a detached output
        assert o.grad_fn is not None and "NotImplemented" not in type(o.grad_fn).__name__, (o.grad_fn, impl)
    _, want = grads(getattr(ref, op), as_fp64(args), dtype)
    _, same_precision = grads(getattr(ref, op), args)
    for a, g, w, s in zip([a for a in args if isinstance(a, torch.Tensor) and a.requires_grad], got, want,
                          same_precision):
        assert g is not None and g.shape == a.shape and g.dtype == a.dtype
        assert rel_err(g, w) <= 2 * rel_err(s, w) + TOLERANCE[dtype].rounding, (rel_err(g, w), rel_err(s, w))


@pytest.mark.slow
@pytest.mark.parametrize("case", DIFF_OPS)
def test_reference_gradients_pass_gradcheck(case):
    op, args = make_inputs(case, torch.float32, small=True)
    assert torch.autograd.gradcheck(getattr(ref, op), as_fp64(args))


@pytest.mark.slow
def test_dispatcher_backward_passes_gradcheck_and_gradgradcheck_in_fp64():
    # attention takes fp64 on the C++ CPU kernel: the registered backward (and its own backward) at fp64
    _, args = make_inputs("attention", torch.float32, small=True)
    args = as_fp64(args)
    assert torch.autograd.gradcheck(torch.ops.wan.attention, args)
    assert torch.autograd.gradgradcheck(torch.ops.wan.attention, args, fast_mode=True)


@pytest.mark.parametrize("impl", ("op", "auto", "cpu"))
def test_fp32_attention_with_image_set_backward(impl):
    # the case: backward raised "modified by an inplace operation" on the C++ fp32 kernel
    _, args = make_inputs("attention", torch.float32)
    run("attention", impl, args).sum().backward()
    leaves = tuple(a.detach().clone().requires_grad_() for a in args[:5])
    ref.attention(*leaves).sum().backward()
    for a, b in zip(args[:5], leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)  # fp32 vs the fp32 reference


NOT_DIFFERENTIABLE = [("nvfp4_quantize", "x"), ("nvfp4_quantize", "global_scale"), ("nvfp4_dequantize", "global_scale"),
                      ("nvfp4_gemm", "bias"), ("nvfp4_gemm", "b_global_scale"), ("nvfp4_linear", "w_global_scale"),
                      ("qk_norm_rope", "rope_cos"), ("qkv_rope", "rope_sin")]
ND_PARAMS = [pytest.param(op, name, impl, id=f"{op}-{name}-{impl}") for op, name in NOT_DIFFERENTIABLE for impl in IMPLS
             if not (impl == "cpu" and op in ("nvfp4_gemm", "nvfp4_linear"))  # no C++ CPU kernel
             and not (impl == "op" and op == "qkv_rope")]  # the dispatcher's composite: see the next test


@pytest.mark.slow
@pytest.mark.parametrize("op,name,impl", ND_PARAMS)
def test_not_differentiable_input_raises_at_forward(op, name, impl):
    w4a16_triton = (op, impl) == ("nvfp4_linear", "triton")  # takes 16-bit x only
    args = op_inputs(torch.bfloat16 if w4a16_triton else torch.float32)[op]
    i = _autograd.OPS[op].arg_names.index(name)
    args = args[:i] + (args[i].clone().requires_grad_(),) + args[i + 1:]
    what = "is not differentiable" if not _autograd.OPS[op].differentiable else "is differentiable only in"
    with pytest.raises(RuntimeError, match=f"wan::{op} {what}.*but {name} requires grad"):
        run(op, impl, args)
    with torch.no_grad():  # no gradient asked for: runs
        run(op, impl, args)


def test_direct_dispatcher_call_raises_for_composite_parts():
    args = list(op_inputs()["qkv_rope"])
    args[6] = args[6].clone().requires_grad_()
    with pytest.raises(RuntimeError, match="wan::qk_norm_rope is differentiable only in .*but rope_sin requires grad"):
        torch.ops.wan.qkv_rope(*args)


def test_autograd_table_covers_every_op():
    assert set(_autograd.OPS) == {s.name for s in all_specs()}
    for op, spec in _autograd.OPS.items():
        assert set(spec.differentiable) <= set(spec.arg_names), op


def test_nvfp4_linear_module_gradients():
    lin = torch.nn.Linear(32, 8, dtype=torch.bfloat16)
    q = NVFP4Linear.from_linear(lin, mode="w4a16")
    x = torch.randn(2, 3, 32, dtype=torch.bfloat16, requires_grad=True)
    buffers = (q.weight, q.weight_scale, q.weight_scale_2)

    def input_grad(f, x):
        x = x.detach().clone().requires_grad_()
        return torch.autograd.grad(f(x).double().square().sum(), x)[0]

    got = input_grad(q, x)
    want = input_grad(lambda x: ref.nvfp4_linear(x, *buffers, q.bias.double()), x.double())
    same_precision = input_grad(lambda x: ref.nvfp4_linear(x, *buffers, q.bias), x)
    assert rel_err(got, want) <= 2 * rel_err(same_precision, want) + TOLERANCE[torch.bfloat16].rounding
    w4a4 = NVFP4Linear.from_linear(lin, mode="w4a4")
    with pytest.raises(RuntimeError, match="nvfp4_linear_w4a4 is not differentiable, but x requires grad"):
        w4a4(x)
    with torch.no_grad():
        w4a4(x)


@pytest.mark.slow
def test_compile_traces_a_training_step():
    _, args = make_inputs("attention", torch.float32)

    def step(q, k, v, ki, vi):
        return wan_kernels.attention(q, k, v, ki, vi).square().sum()

    torch._dynamo.reset()
    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(*args[:5])
    got = torch.autograd.grad(loss, args[:5])
    want = torch.autograd.grad(step(*args[:5]), args[:5])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6)  # same backward, traced
