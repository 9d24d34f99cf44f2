"""The kernels as diffusers attention-dispatch backends ("wan", "wan_int8": wan_model/compat/diffusers.py
`register_attention_backends`) on two non-Wan diffusers transformers, tiny, random, head_dim 128, fp32 on CPU:
`FluxTransformer2DModel` (1 double-stream + 1 single-stream block: 2 attention calls, joint text + image tokens
with RoPE) and `LTXVideoTransformer3DModel` (2 blocks, self + cross: 4 calls), each `set_attention_backend(name)`
vs the same model stock (diffusers' "native", torch SDPA) and vs the stock model in fp64.

Tolerances: "wan_int8": relative error (Frobenius, whole output) in (0, OP_NRMSE x the number of 8-bit calls),
tests/test_model_attention.py's rule for our model (each call perturbs its branch by at most the op's worst-head
NRMSE, the branches add up to first order); "wan" (wan::attention in fp32): max |wan - stock| <= FP32_TOL, the
bound of every fp32 comparison with diffusers (outputs of magnitude ~1.5).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import wan_kernels
from wan_model.testing import FP32_TOL

diffusers = pytest.importorskip("diffusers")
from diffusers.models.attention_dispatch import (  # noqa: E402
    AttentionBackendName, _AttentionBackendRegistry, attention_backend, dispatch_attention_fn)

from wan_model.compat import diffusers as dropin  # noqa: E402

OP_NRMSE = 0.05  # tests/test_model_attention.py's OP_NRMSE: relative error bound of one wan::attention_int8 call
OPS = {"wan": "wan.attention.default", "wan_int8": "wan.attention_int8.default"}  # what the spy sees


@pytest.fixture(autouse=True)
def process_backend():
    """diffusers' `set_attention_backend` also sets its process-wide active backend, which
    `reset_attention_backend` leaves (diffusers issue #14249, every backend): restore it after each test, so no
    other test runs on a backend set here."""
    before = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(before)


class Spy(TorchDispatchMode):
    """Counts the `wan` ops that run (the kernels' dispatcher ops), whatever Python calls them."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "wan":
            self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


def _flux(dtype=torch.float32):
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=128,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
        axes_dims_rope=(16, 56, 56)).eval().to(dtype)


def _run_flux(model):
    """Batch 2 at two timesteps, a 4 x 6 latent grid (24 image tokens) and 8 text tokens."""
    dtype = model.dtype
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    h, w, text = 4, 6, 8
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(h).float(), torch.arange(w).float(),
                                         indexing="ij"), dim=-1).reshape(-1, 3).to(dtype)
    return model(r(2, h * w, 4), encoder_hidden_states=r(2, text, 32), pooled_projections=r(2, 16),
                 timestep=torch.tensor([0.7, 0.3], dtype=dtype), img_ids=img_ids,
                 txt_ids=torch.zeros(text, 3, dtype=dtype), return_dict=False)[0]


def _ltx(dtype=torch.float32):
    torch.manual_seed(0)
    return diffusers.LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=128, cross_attention_dim=256,
        num_layers=2, caption_channels=32).eval().to(dtype)


def _run_ltx(model, encoder_attention_mask=None):
    """Batch 2 at two timesteps, 2 x 4 x 4 latent tokens, 8 text tokens (optionally a text padding mask)."""
    dtype = model.dtype
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    frames, h, w = 2, 4, 4
    return model(r(2, frames * h * w, 8), r(2, 8, 32), torch.tensor([700, 300]), encoder_attention_mask,
                 num_frames=frames, height=h, width=w, return_dict=False)[0]


MODELS = {"flux": (_flux, _run_flux, 2), "ltx": (_ltx, _run_ltx, 4)}  # builder, forward, attention calls


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _processor_backends(model) -> set:
    return {m.processor._attention_backend for m in model.modules() if hasattr(getattr(m, "processor", None),
                                                                              "_attention_backend")}


def test_backends_are_registered_with_diffusers():
    """Both names are members of diffusers' AttentionBackendName (so set_attention_backend accepts them) and
    registered to our functions with their argument names; registering again changes nothing; neither claims
    context parallelism (so diffusers' enable_parallelism refuses them)."""
    names = [(m.name, m.value) for m in AttentionBackendName]
    wan, int8 = dropin.register_attention_backends()
    assert [(m.name, m.value) for m in AttentionBackendName] == names  # idempotent: no second member
    assert (wan, int8) == (AttentionBackendName("wan"), AttentionBackendName("wan_int8"))
    assert (wan.name, int8.name) == ("WAN", "WAN_INT8") and AttentionBackendName.WAN_INT8 is int8
    assert {"wan", "wan_int8"} <= {m.value for m in AttentionBackendName.__members__.values()}
    assert _AttentionBackendRegistry._backends[int8] is dropin._wan_int8_attention
    assert _AttentionBackendRegistry._backends[wan] is dropin._wan_attention
    args = _AttentionBackendRegistry._supported_arg_names[int8]
    assert {"query", "key", "value", "attn_mask", "is_causal", "dropout_p", "scale", "enable_gqa"} <= args
    assert not _AttentionBackendRegistry._is_context_parallel_available(int8)
    assert AttentionBackendName("native") in _AttentionBackendRegistry._backends  # diffusers' own untouched
    with attention_backend("wan_int8"):  # diffusers' context manager takes the name too
        assert _AttentionBackendRegistry.get_active_backend() == (int8, dropin._wan_int8_attention)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_int8_backend_matches_stock(name):
    """set_attention_backend("wan_int8"): every attention call runs wan::attention_int8 (the spy), the output
    within the int8 bar of stock fp32 and of stock fp64."""
    build, run, n_calls = MODELS[name]
    model = build()
    with torch.no_grad():
        want, want64 = run(model), run(build(torch.float64))
        model.set_attention_backend("wan_int8")
        with Spy() as spy:
            got = run(model)
    err, err64 = _rel(got, want), _rel(got, want64)
    print(f"{name}: wan_int8 vs stock fp32 {err:.2e}, vs stock fp64 {err64:.2e} (stock fp32 vs fp64 "
          f"{_rel(want, want64):.2e}); bound {OP_NRMSE * n_calls}")
    assert spy.calls == [OPS["wan_int8"]] * n_calls
    assert 0 < err < OP_NRMSE * n_calls and 0 < err64 < OP_NRMSE * n_calls


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_bf16_kernel_backend_matches_stock(name):
    """set_attention_backend("wan"): wan::attention (in fp32 here) on every call, within FP32_TOL of stock."""
    build, run, n_calls = MODELS[name]
    model = build()
    with torch.no_grad():
        want = run(model)
        model.set_attention_backend("wan")
        with Spy() as spy:
            got = run(model)
    err = (got - want).abs().max().item()
    print(f"{name}: wan vs stock fp32 max abs {err:.2e} (|stock| <= {want.abs().max().item():.2f})")
    assert spy.calls == [OPS["wan"]] * n_calls
    assert err <= FP32_TOL


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_reset_returns_to_stock(name):
    """reset_attention_backend() clears every processor's backend: with diffusers' process-wide default (which
    set_attention_backend moved, diffusers #14249) the output is stock's bit for bit and no wan op runs."""
    build, run, _ = MODELS[name]
    model = build()
    with torch.no_grad():
        want = run(model)
        model.set_attention_backend("wan_int8")
        assert _processor_backends(model) == {AttentionBackendName.WAN_INT8}
        int8 = run(model)
        model.reset_attention_backend()
        assert _processor_backends(model) == {None}
        with attention_backend("native"), Spy() as spy:
            back = run(model)
    assert not torch.equal(int8, want)
    assert torch.equal(back, want) and not spy.calls


@pytest.mark.slow  # ~3-5 s each: AOT tracing of the whole model
@pytest.mark.parametrize("name", MODELS)
def test_compiled_fullgraph(name):
    """torch.compile(fullgraph=True) traces a model on "wan_int8" (the added enum member as a guard, the op through
    its fake) and gives the eager result bit for bit (aot_eager: the same ops, no codegen)."""
    build, run, _ = MODELS[name]
    model = build()
    model.set_attention_backend("wan_int8")
    with torch.no_grad():
        want = run(model)
        got = run(torch.compile(model, fullgraph=True, backend="aot_eager"))
    assert torch.equal(got, want)


def _qkv(B=2, S=9, Sk=7, H=2, Hk=2, D=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, S, H, D, generator=g), torch.randn(B, Sk, Hk, D, generator=g),
            torch.randn(B, Sk, Hk, D, generator=g))


@pytest.mark.parametrize("backend", ["wan", "wan_int8"])
@pytest.mark.parametrize("kwargs, pattern", [
    (dict(attn_mask=torch.ones(2, 7, dtype=torch.bool)),
     r"attn_mask of shape \(2, 7\) does not broadcast to \[B, H, Sq, Sk\] = \(2, 2, 9, 7\)"),
    (dict(attn_mask=torch.rand(2, 1, 9, 7) > 0.3),
     r"attn_mask of shape \(2, 1, 9, 7\) differs between heads or queries \(only a key mask"),
    (dict(attn_mask=torch.full((2, 1, 1, 7), -0.5)),
     r"attn_mask of shape \(2, 1, 1, 7\): an additive mask must be 0 \(attend\) or <= -10000 \(masked\), got -0.5"),
    (dict(attn_mask=torch.tensor([True] * 7 + [False] * 7).reshape(2, 1, 1, 7)),
     r"attn_mask of shape \(2, 1, 1, 7\) masks every key of batch element 1"),
    (dict(is_causal=True), r"is_causal=True is not supported"),
    (dict(dropout_p=0.1), r"dropout_p=0.1 is not supported"),
    (dict(attention_kwargs={"return_lse": True}), r"return_lse=True is not supported"),
])
def test_refused_arguments_name_the_argument(backend, kwargs, pattern):
    """What the kernels do not compute is a one-line ValueError naming the argument (as diffusers' flash and
    sage backends refuse attn_mask), never a silent fallback."""
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=rf"^diffusers attention backend '{backend}' \(wan::attention(_int8)?\): "
                                         rf"{pattern}") as e:
        dispatch_attention_fn(q, k, v, backend=AttentionBackendName(backend), **kwargs)
    assert "\n" not in str(e.value)


def _padding(B=2, Sk=8):
    """A text padding mask per batch element ([B, Sk], 1 = token): 8 and 5 tokens (LTX pipelines pass one)."""
    m = torch.ones(B, Sk)
    m[1, 5:] = 0
    return m


@pytest.mark.parametrize("name", ["wan", "wan_int8"])
def test_key_masks_match_stock(name):
    """A key mask (bool [B, 1, 1, Sk], additive 0 / -inf [B, H, 1, Sk], one for the batch [1, 1, 1, Sk]): each
    batch element attends to its own keys, as diffusers' native backend (torch SDPA with the mask) does: "wan"
    within FP32_TOL, "wan_int8" within its bar; one op call per batch element (all keys attended: one call)."""
    q, k, v = _qkv(Sk=12)
    keep = torch.ones(2, 12, dtype=torch.bool)
    keep[0, 3] = keep[1, 7:] = False
    additive = torch.zeros(2, 1, 1, 12).masked_fill(~keep[:, None, None], float("-inf")).expand(2, 2, 1, 12)
    for mask, calls in ((keep[:, None, None], 2), (additive, 2), (keep[0].reshape(1, 1, 1, 12), 2),
                        (torch.ones(1, 1, 1, 12, dtype=torch.bool), 1)):
        want = dispatch_attention_fn(q, k, v, attn_mask=mask, backend=AttentionBackendName("native"))
        with torch.no_grad(), Spy() as spy:
            got = dispatch_attention_fn(q, k, v, attn_mask=mask, backend=AttentionBackendName(name))
        assert spy.calls == [OPS[name]] * calls
        if name == "wan":
            assert (got - want).abs().max().item() <= FP32_TOL
        else:
            assert 0 < _rel(got, want) < OP_NRMSE
    unmasked = dispatch_attention_fn(q, k, v, backend=AttentionBackendName("native"))
    assert _rel(unmasked, dispatch_attention_fn(q, k, v, attn_mask=keep[:, None, None],
                                                backend=AttentionBackendName("native"))) > 0.05  # the mask matters


@pytest.mark.slow
@pytest.mark.parametrize("name", ["wan", "wan_int8"])
def test_model_with_a_text_mask_matches_stock(name):
    """A real consumer: LTX-Video with a text padding mask (its pipelines pass one; the model turns it into an
    additive -10000 mask per head for the cross-attention): on the backend it matches stock, the masked tokens
    left out; 2 self-attention calls + 2 cross-attention calls per batch element."""
    model = _ltx()
    with torch.no_grad():
        want = _run_ltx(model, encoder_attention_mask=_padding())
        unmasked = _run_ltx(model)
        model.set_attention_backend(name)
        with Spy() as spy:
            got = _run_ltx(model, encoder_attention_mask=_padding())
    assert _rel(unmasked, want) > 1e-3  # the padding matters
    assert spy.calls == [OPS[name]] * 6
    if name == "wan":
        assert (got - want).abs().max().item() <= FP32_TOL
    else:
        assert 0 < _rel(got, want) < OP_NRMSE * 6


def test_gqa_is_expanded():
    """enable_gqa with 4 query heads over 2 key heads and a custom scale: the keys are repeated as torch SDPA
    groups them (the "wan" backend matches diffusers' native one within FP32_TOL, int8 within its bar); heads that
    do not divide are a one-line error."""
    q, k, v = _qkv(H=4, Hk=2)
    args = dict(enable_gqa=True, scale=0.05)
    want = dispatch_attention_fn(q, k, v, backend=AttentionBackendName("native"), **args)
    with torch.no_grad():
        wan = dispatch_attention_fn(q, k, v, backend=AttentionBackendName.WAN, **args)
        int8 = dispatch_attention_fn(q, k, v, backend=AttentionBackendName.WAN_INT8, **args)
    assert _rel(dispatch_attention_fn(q, k, v, backend=AttentionBackendName("native"), enable_gqa=True), want) > 0.01
    assert (wan - want).abs().max().item() <= FP32_TOL
    assert 0 < _rel(int8, want) < OP_NRMSE
    q3, _, _ = _qkv(H=3, Hk=2)
    with pytest.raises(ValueError, match=r"'wan_int8': enable_gqa needs query heads \(3\) to be a multiple of key "
                                         r"heads \(2\)"):
        dispatch_attention_fn(q3, k, v, enable_gqa=True, backend=AttentionBackendName.WAN_INT8)


def test_int8_backend_is_inference_only_and_wan_trains():
    """An input requiring grad (grad mode on) is the int8 op's error naming the bf16 op; "wan" backpropagates."""
    q, k, v = (t.requires_grad_() for t in _qkv())
    with pytest.raises(RuntimeError, match=r"wan::attention_int8 is inference only .* wan_kernels.attention"):
        dispatch_attention_fn(q, k, v, backend=AttentionBackendName.WAN_INT8)
    dispatch_attention_fn(q, k, v, backend=AttentionBackendName.WAN).sum().backward()
    assert q.grad is not None and k.grad is not None and v.grad is not None


@pytest.mark.parametrize("name", ["wan", "wan_int8"])
def test_each_backend_runs_the_op_it_names(name):
    """dropin.BACKENDS[name] (the op the messages name) is the one op a dispatched call runs, once, and its result is
    returned as is: diffusers' dispatch adds nothing around it."""
    op, label = dropin.BACKENDS[name]
    q, k, v = _qkv()
    with torch.no_grad(), Spy() as spy:
        out = dispatch_attention_fn(q, k, v, backend=AttentionBackendName(name))
    assert label == f"wan::{op}" and spy.calls == [f"wan.{op}.default"]
    assert torch.equal(out, getattr(wan_kernels, op)(q, k, v))
