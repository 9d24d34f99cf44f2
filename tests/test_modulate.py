"""wan::layer_norm_modulate and wan::gated_residual: the C++ CPU kernels against the references, which are
diffusers' own expressions (REFERENCE §4); broadcast and strided modulation tensors as the model passes them.

Tolerances: fp32 outputs agree to a few ulps of O(1) values (LayerNorm's mean/variance reduction order
differs): 1e-5. fp16/bf16: both round (nearly) the same fp32 value once, so they differ by at most one ulp
of the output where the fp32 values straddle a rounding boundary."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

import wan_kernels
from wan_kernels import ref


def _ulp(x: torch.Tensor) -> torch.Tensor:
    return (torch.nextafter(x.abs(), torch.full_like(x, float("inf"))).float() - x.abs().float())


def _assert_close(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    else:
        assert ((got.float() - want.float()).abs() <= _ulp(want) + 1e-6).all()
        assert (got == want).float().mean() > 0.98  # one rounding of the same value: nearly all identical


def _mods(B, S, C, per_token, g):
    # the model's layout: unbound views of a [B, 1|S, 6, C] fp32 tensor (strided along C's neighbours)
    mods = torch.randn(B, S if per_token else 1, 6, C, generator=g)
    return mods.unbind(dim=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,S,C,per_token", [(1, 1, 64, False), (2, 17, 512, False), (2, 33, 1536, True)])
def test_layer_norm_modulate_matches_reference(dtype, B, S, C, per_token):
    g = torch.Generator().manual_seed(S)
    x = (torch.randn(B, S, C, generator=g) * 3 + 1).to(dtype)
    shift, scale, *_ = _mods(B, S, C, per_token, g)
    _assert_close(wan_kernels.layer_norm_modulate(x, scale, shift, 1e-6, impl="cpu"),
                  ref.layer_norm_modulate(x, scale, shift, 1e-6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,S,C,per_token", [(1, 1, 64, False), (2, 17, 512, False), (2, 33, 1536, True)])
def test_gated_residual_matches_reference(dtype, B, S, C, per_token):
    g = torch.Generator().manual_seed(S + 1)
    x, y = ((torch.randn(B, S, C, generator=g) * 4).to(dtype) for _ in range(2))
    *_, gate = _mods(B, S, C, per_token, g)
    got = wan_kernels.gated_residual(x, y, gate, impl="cpu")
    want = ref.gated_residual(x, y, gate)
    # same three fp32 operations in the same order, one rounding: bit-identical
    assert torch.equal(got, want)


@pytest.mark.slow
@settings(max_examples=20, deadline=None)
@given(B=st.integers(1, 2), S=st.integers(1, 40), C=st.sampled_from([16, 128, 1000, 5120]), per_token=st.booleans(),
       seed=st.integers(0, 2**16))
def test_layer_norm_modulate_hypothesis(B, S, C, per_token, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, S, C, generator=g) * 10
    shift, scale, *_ = _mods(B, S, C, per_token, g)
    _assert_close(wan_kernels.layer_norm_modulate(x, scale, shift, 1e-6, impl="cpu"),
                  ref.layer_norm_modulate(x, scale, shift, 1e-6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("C", [16, 100, 512])
def test_vector_and_strided_paths(dtype, C):
    """Modulation operands contiguous along C take the AVX512 rows (on CPUs that have AVX512, like this
    project's); strided along C, the scalar rows. Both match the reference, C = 100 leaves a masked tail of 4
    lanes, and rounding of huge / non-finite values follows torch's casts (inf stays inf, NaN stays NaN)."""
    g = torch.Generator().manual_seed(C)
    B, S = 2, 7
    x, y = ((torch.randn(B, S, C, generator=g) * 3).to(dtype) for _ in range(2))
    x[0, 0, :4] = torch.tensor([float("inf"), float("nan"), 3e38, -3e38]).to(dtype)
    y[0, 1, :3] = torch.tensor([float("nan"), float("-inf"), 1e38]).to(dtype)
    contiguous = [t.unsqueeze(1) for t in torch.randn(3, B, C, generator=g)]        # [B, 1, C], stride 1 along C
    strided = [t.t().unsqueeze(1) for t in torch.randn(3, C, B, generator=g)]       # [B, 1, C], stride B along C
    for shift, scale, gate in (contiguous, strided):
        got = wan_kernels.layer_norm_modulate(x, scale, shift, 1e-6, impl="cpu")
        want = ref.layer_norm_modulate(x, scale, shift, 1e-6)
        assert torch.equal(got[0, 0].isnan(), want[0, 0].isnan())                  # the row with inf/NaN: all NaN
        _assert_close(got[:, 1:], want[:, 1:])
        got, want = wan_kernels.gated_residual(x, y, gate, impl="cpu"), ref.gated_residual(x, y, gate)
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got.nan_to_num(), want.nan_to_num())                   # bit-identical, inf included


def _layer_norm_modulate_fp64(x, scale, shift, eps):
    x = x.double()
    n = (x - x.mean(-1, keepdim=True)) / (x.var(-1, unbiased=False, keepdim=True) + eps).sqrt()
    return n * (1 + scale.double()) + shift.double()


def _huge_rows(B, S, C, dtype, g):
    """Rows of randn * 10^m for m in 17..37 (the sum of squares overflows fp32 from ~1e17 at these widths; the
    sum itself from ~1e35), the first row left O(1), the last one with an inf (NaN in torch)."""
    x = torch.randn(B, S, C, generator=g, dtype=torch.float64)
    x[:, 1:] *= 10.0 ** torch.linspace(17, 37, S - 1, dtype=torch.float64)[:, None]
    x = x.to(dtype)
    x[-1, -1, 3] = float("inf")
    return x


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["ref", "cpu", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("C", [64, 100, 1536])
def test_layer_norm_of_huge_rows_matches_fp64(impl, dtype, C, monkeypatch):
    """|x| up to 1e37 gives the O(1) LayerNorm of fp64 (was `shift` everywhere: the variance overflowed to inf,
    or NaN), in the reference, on the AVX512 rows (modulation contiguous along C), the scalar rows (strided)
    and Triton."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    g = torch.Generator().manual_seed(C)
    x = _huge_rows(2, 12, C, dtype, g)
    contiguous = [t.unsqueeze(1) for t in torch.randn(2, 2, C, generator=g)]
    strided = [t.t().unsqueeze(1) for t in torch.randn(2, C, 2, generator=g)]
    for shift, scale in (contiguous, strided):
        got = wan_kernels.layer_norm_modulate(x, scale, shift, 1e-6, impl=impl)
        want = _layer_norm_modulate_fp64(x, scale, shift, 1e-6).to(dtype)
        assert got[-1, -1].isnan().all() and not got[:, :-1].isnan().any()
        _assert_close(got[:, :-1], want[:, :-1])


def test_errors_name_argument_and_shape():
    x = torch.randn(2, 5, 64)
    with pytest.raises((ValueError, RuntimeError), match=r"scale must be float32 \[2 or 1, 5 or 1, 64\].*2, 5, 32"):
        wan_kernels.layer_norm_modulate(x, torch.randn(2, 5, 32), torch.randn(2, 1, 64), impl="cpu")
    with pytest.raises(ValueError, match=r"shift must be float32.*BFloat16|shift must be float32.*bfloat16"):
        wan_kernels.layer_norm_modulate(x, torch.randn(2, 1, 64), torch.randn(2, 1, 64).bfloat16(), impl="ref")
    with pytest.raises((ValueError, RuntimeError), match=r"y must have x's shape"):
        wan_kernels.gated_residual(x, torch.randn(2, 4, 64), torch.randn(2, 1, 64), impl="cpu")


@pytest.mark.parametrize("impl", ["ref", "cpu", "triton", "auto"])
@pytest.mark.parametrize("B,S,C", [(2, 3, 0), (2, 0, 64), (0, 3, 64)])
def test_empty_inputs_give_empty_outputs_on_every_backend(impl, B, S, C, monkeypatch):
    """C = 0 raised in the reference (no inf norm of an empty row) and Triton (an empty arange) while the C++
    kernel and torch's layer_norm return an empty tensor: every backend of the forward and backward ops now
    returns the empty result of the right shapes, dtypes and (zero) modulation gradients, as for B or S = 0."""
    from wan_kernels import ops

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(B, S, C).bfloat16()
    scale, shift = torch.randn(B, 1, C), torch.randn(1, S, C)
    out = wan_kernels.layer_norm_modulate(x, scale, shift, 1e-6, impl=impl)
    assert out.shape == x.shape and out.dtype == x.dtype
    out = wan_kernels.gated_residual(x, x, scale, impl=impl)
    assert out.shape == x.shape and out.dtype == x.dtype
    dx, dscale, dshift = ops.layer_norm_modulate_backward(x, x, scale, shift, 1e-6, impl=impl)
    assert (dx.shape, dx.dtype, dscale.shape, dshift.shape) == (x.shape, x.dtype, scale.shape, shift.shape)
    assert not dscale.any() and not dshift.any()
    dy, dgate = ops.gated_residual_backward(x, x, scale, impl=impl)
    assert (dy.shape, dy.dtype, dgate.shape) == (x.shape, x.dtype, scale.shape) and not dgate.any()


@pytest.fixture
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,S,C,per_token", [(1, 1, 64, False), (2, 9, 1000, False), (1, 5, 5120, True)])
def test_triton_kernels_match_reference(interpreter, dtype, B, S, C, per_token):
    g = torch.Generator().manual_seed(C)
    x, y = ((torch.randn(B, S, C, generator=g) * 3).to(dtype) for _ in range(2))
    shift, scale, gate, *_ = _mods(B, S, C, per_token, g)
    _assert_close(wan_kernels.layer_norm_modulate(x, scale, shift, 1e-6, impl="triton"),
                  ref.layer_norm_modulate(x, scale, shift, 1e-6))
    # x + y * gate in fp32 then one rounding: the interpreter's numpy fp32 math equals torch's bit for bit
    assert torch.equal(wan_kernels.gated_residual(x, y, gate, impl="triton"), ref.gated_residual(x, y, gate))


@pytest.mark.aot
@pytest.mark.parametrize("arch", [80, 90, 100])
def test_triton_kernels_compile_without_spills(arch, tmp_path):
    """The launches the runtime makes (readiness' jobs: the launcher's own prepare at the Wan widths, Triton's
    specialisation) compile without spills or excess shared memory."""
    from tools import readiness
    from tools import aot

    jobs = readiness.jobs_for(["modulate"], (arch,))
    assert {j.launch.kernel.fn.__name__ for j in jobs} == {"_layer_norm_modulate_kernel", "_gated_residual_kernel",
                                                          "_layer_norm_modulate_bwd_kernel", "_gated_residual_bwd_kernel"}
    for j in jobs:
        r = aot.compile_launch(j.launch, j.arch, workdir=tmp_path)
        print(j.config, r.summary())
        assert not readiness.problems(j, r), (j.config, r.summary())
