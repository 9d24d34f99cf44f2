"""Training the WanModel: gradients w.r.t. the inputs and every weight equal diffusers' WanTransformer3DModel
(same weights, fp32), with and without gradient checkpointing; bf16 gradients as close to fp32 as diffusers-bf16's;
checkpointing recomputes each block; NVFP4 / fp8 frozen base weights pass the input gradient, NVFP4's through
wan::nvfp4_linear_backward (the Triton dgrad kernel, interpreted here, vs fp64).

Tolerances: fp32 relative 1e-4 (the issue's bound; measured <= 1.4e-5, the largest on the cross-attention K biases,
whose gradients nearly cancel). bf16: our error vs the fp32 gradient at most 1.5x diffusers-bf16's own error vs the
same fp32 gradient, per input and over all weight gradients together (measured 0.94-0.98x).
"""

from __future__ import annotations

import copy

import pytest
import torch

from wan_kernels import nvfp4, ref
from wan_kernels.ops.nvfp4_linear import nvfp4_linear_backward
from wan_kernels.ref import nvfp4_linear_backward as ref_nvfp4_linear_backward
from wan_model.testing import make_inputs, random_model
from wan_model.core.config import WanConfig
from wan_model.compat.diffusers import to_diffusers_model
from wan_model.compat.layouts import native_to_diffusers

from _helpers import diffusers_bf16_like

INPUTS = ("hidden_states", "encoder_hidden_states", "encoder_hidden_states_image")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def pairs():
    """{variant: (our fp32 WanModel on impl="auto" in train mode, diffusers' model with the same weights)}."""
    out = {}
    for i, name in enumerate(("tiny-t2v", "tiny-i2v")):
        ours = random_model(WanConfig.from_preset(name), seed=i).set_impl("auto").train()
        out[name] = (ours, to_diffusers_model(ours).train())
    return out


def step(model, inputs, cot, dtype=torch.float32, checkpointing=False, diffusers_names=True):
    """One forward + backward of <output, cot> (the model's own call); {input name: gradient} and
    {parameter name: gradient} (for a WanModel in diffusers' names through layouts.native_to_diffusers, the
    key map of checkpoints, unless not `diffusers_names`)."""
    x, t, text, img = inputs
    leaves = {n: a.detach().to(dtype).requires_grad_() for n, a in zip(INPUTS, (x, text, img)) if a is not None}
    model.zero_grad(set_to_none=True)
    (model.enable_gradient_checkpointing if checkpointing else model.disable_gradient_checkpointing)()
    out = model(leaves["hidden_states"], t, leaves["encoder_hidden_states"],
                leaves.get("encoder_hidden_states_image"), return_dict=False)[0]
    (out.float() * cot).sum().backward()
    weights = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    if diffusers_names and hasattr(model, "_ops"):
        weights = native_to_diffusers(weights, model.config)
    return {n: a.grad for n, a in leaves.items()}, weights


def cotangent(cfg: WanConfig, inputs, seed: int = 7) -> torch.Tensor:
    x = inputs[0]
    return torch.randn((x.shape[0], cfg.out_channels, *x.shape[2:]), generator=torch.Generator().manual_seed(seed))


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", (False, True), ids=("plain", "checkpointed"))
@pytest.mark.parametrize("variant", ("tiny-t2v", "tiny-i2v"))
def test_gradients_equal_diffusers_fp32(pairs, variant, checkpointing):
    ours, ref = pairs[variant]
    inputs = make_inputs(ours.config)
    cot = cotangent(ours.config, inputs)
    got_in, got_w = step(ours, inputs, cot, checkpointing=checkpointing)
    want_in, want_w = step(ref, inputs, cot, checkpointing=checkpointing)
    assert set(got_in) == set(want_in) == set(INPUTS[:3 if ours.config.has_image else 2])
    for name in want_in:
        assert rel_err(got_in[name], want_in[name]) <= 1e-4, name
    # every diffusers parameter has a gradient, and ours (mapped to diffusers' names) equals it
    assert set(want_w) == {n for n, _ in ref.named_parameters()} == set(got_w)
    bad = {n: rel_err(got_w[n], w) for n, w in want_w.items() if not rel_err(got_w[n], w) <= 1e-4}
    assert not bad, bad


@pytest.mark.slow
@pytest.mark.parametrize("variant,checkpointing", (("tiny-t2v", False), ("tiny-i2v", True)))
def test_bf16_gradient_error_within_diffusers_bf16(pairs, variant, checkpointing):
    ours32, ref32 = pairs[variant]
    inputs = make_inputs(ours32.config)
    cot = cotangent(ours32.config, inputs)
    want_in, want_w = step(ref32, inputs, cot)                                     # the fp32 gradients
    ours = copy.deepcopy(ours32).to_dtype(torch.bfloat16)
    ref = diffusers_bf16_like(copy.deepcopy(ref32))
    got_in, got_w = step(ours, inputs, cot, torch.bfloat16, checkpointing)
    base_in, base_w = step(ref, inputs, cot, torch.bfloat16, checkpointing)
    assert got_in["hidden_states"].dtype == torch.bfloat16
    for n, w in want_in.items():
        assert rel_err(got_in[n], w) <= 1.5 * rel_err(base_in[n], w), n
    # the weight gradients as one vector (per tensor, the cross-attention text K biases of I2V, whose gradients
    # nearly cancel over the tokens, measure up to 2.4x diffusers' error; every other tensor <= 1.3x)
    pooled = [torch.cat([g[n].double().flatten() for n in want_w]) for g in (got_w, base_w, want_w)]
    assert rel_err(pooled[0], pooled[2]) <= 1.5 * rel_err(pooled[1], pooled[2])


def test_train_mode_has_the_same_forward(pairs):
    ours, _ = pairs["tiny-i2v"]
    inputs = make_inputs(ours.config)
    with torch.no_grad():
        trained = ours.train()(*inputs)
        evaluated = ours.eval()(*inputs)
    ours.train()
    assert torch.equal(trained, evaluated)


@pytest.mark.slow
def test_gradient_checkpointing_recomputes_each_block(pairs, monkeypatch):
    ours, _ = pairs["tiny-t2v"]
    ours.disable_gradient_checkpointing()
    inputs = make_inputs(ours.config)
    cot = cotangent(ours.config, inputs)
    calls = []
    index = {id(b): i for i, b in enumerate(ours.blocks)}
    block_forward = type(ours.blocks[0]).forward

    def counted(self, *args):  # (forward hooks do not fire when checkpoint recomputes a module)
        calls.append(index[id(self)])
        return block_forward(self, *args)

    monkeypatch.setattr(type(ours.blocks[0]), "forward", counted)
    assert not ours.is_gradient_checkpointing
    step(ours, inputs, cot)
    assert calls == [0, 1]
    calls.clear()
    step(ours, inputs, cot, checkpointing=True)
    assert ours.is_gradient_checkpointing
    assert calls == [0, 1, 1, 0]                            # forward, then each block again in backward
    calls.clear()
    with torch.no_grad():                                   # no grad mode: nothing to checkpoint
        ours(*inputs)
    assert calls == [0, 1]
    calls.clear()
    seen = []

    def mine(block, *args):                                 # diffusers' gradient_checkpointing_func(module, *args)
        seen.append(index[id(block)])
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)

    ours.enable_gradient_checkpointing(mine)
    x, t, text, _ = inputs
    (ours(x.requires_grad_(), t, text) * cot).sum().backward()
    assert seen == [0, 1] and calls == [0, 1, 1, 0]
    ours.disable_gradient_checkpointing()
    assert not ours.is_gradient_checkpointing


def _saved_bytes(model, inputs) -> tuple[int, int]:
    """(bytes autograd keeps for backward, of which saved while a block runs) of one forward; a checkpointed
    region saves through its own hooks, so the outer hook sees only what is kept outside it."""
    total, inside, depth = 0, 0, []

    def pack(t):
        nonlocal total, inside
        total += t.numel() * t.element_size()
        inside += t.numel() * t.element_size() if depth else 0
        return t

    def enter(*_):
        depth.append(1)

    def leave(*_):
        depth.pop()

    hooks = [h for b in model.blocks for h in (b.register_forward_pre_hook(enter), b.register_forward_hook(leave))]
    x, t, text, img = inputs
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x.requires_grad_(), t, text, img)
    finally:
        for h in hooks:
            h.remove()
    return total, inside


def test_gradient_checkpointing_keeps_nothing_of_the_blocks(pairs):
    ours, _ = pairs["tiny-t2v"]
    inputs = make_inputs(ours.config)
    plain, plain_blocks = _saved_bytes(ours, inputs)
    ours.enable_gradient_checkpointing()
    try:
        checkpointed, checkpointed_blocks = _saved_bytes(ours, inputs)
    finally:
        ours.disable_gradient_checkpointing()
    # what the blocks saved (attention inputs, FFN hidden, ...) is gone; what is saved outside them (embedders,
    # the cross-attention K/V GEMM of prepare_context, the output head) is kept, and checkpoint keeps each block's
    # top-level tensor inputs: x [B, S, C], temb_proj [B, 1, 6, C] fp32, rope_cos / rope_sin [S, D/2] fp32
    cfg, (B, _, f, h, w) = ours.config, inputs[0].shape
    S, C = f * (h // 2) * (w // 2), cfg.dim
    block_inputs = 4 * (B * S * C + B * 6 * C + 2 * S * cfg.attention_head_dim // 2)
    assert plain_blocks > 0 and checkpointed_blocks == 0
    assert checkpointed == plain - plain_blocks + cfg.num_layers * block_inputs, (checkpointed, plain, plain_blocks)


@pytest.mark.slow
def test_prepared_context_carries_gradients(pairs):
    ours, _ = pairs["tiny-i2v"]
    x, t, text, img = make_inputs(ours.config)
    cot = cotangent(ours.config, (x,))
    ours.zero_grad(set_to_none=True)
    (ours(x, t, context=ours.prepare_context(text, img)) * cot).sum().backward()
    via_context = {n: p.grad.clone() for n, p in ours.named_parameters()}
    ours.zero_grad(set_to_none=True)
    (ours(x, t, text, img) * cot).sum().backward()
    for n, p in ours.named_parameters():
        torch.testing.assert_close(via_context[n], p.grad, rtol=0, atol=0, msg=n)  # the same graph
    # a context prepared without grad (frozen text side) is reused across steps: no grad to the K/V weights
    with torch.no_grad():
        ctx = ours.prepare_context(text, img)
    for _ in range(2):
        ours.zero_grad(set_to_none=True)
        (ours(x, t, context=ctx) * cot).sum().backward()
        assert ours.cross_kv.weight.grad is None and ours.blocks[0].attn2.to_q.weight.grad is not None


@pytest.mark.slow
@pytest.mark.parametrize("method", ("nvfp4", "fp8"))
def test_quantized_frozen_base_passes_gradients(pairs, method):
    # NVFP4 / fp8 base weights are buffers (no gradient); dX flows through nvfp4_linear's / fp8_linear's backward
    # to the input and to the weights that stay trainable. Reference: the dense model holding the dequantized
    # weights (`dense_weight()`), in fp32.
    dense = copy.deepcopy(pairs["tiny-t2v"][0])
    quant = copy.deepcopy(dense).quantize(method)
    layers = {n: m for n, m in quant.named_modules() if hasattr(m, "dense_weight")}
    assert layers and all(p.is_floating_point() and p.dtype == torch.float32 for p in quant.parameters())
    with torch.no_grad():
        for n, m in layers.items():
            dense.get_submodule(n).weight.copy_(m.dense_weight(torch.float32))
    inputs = make_inputs(quant.config)
    cot = cotangent(quant.config, inputs)
    for checkpointing in (False, True):
        got_in, got_w = step(quant, inputs, cot, checkpointing=checkpointing, diffusers_names=False)
        want_in, want_w = step(dense, inputs, cot, diffusers_names=False)
        for n in got_in:
            assert rel_err(got_in[n], want_in[n]) <= 1e-4, n   # fp32, as against diffusers
        assert set(got_w) == {n for n, _ in quant.named_parameters()}
        assert all(rel_err(g, want_w[n]) <= 1e-4 for n, g in got_w.items())
        assert all(b.grad is None and not b.requires_grad for b in quant.buffers())


# ---------------------------------------------------------------------------------------------
# nvfp4_linear's backward in x: wan::nvfp4_linear_backward (Triton dgrad kernel; CPU: the reference)

def _nvfp4_weight(n: int, k: int, seed: int = 0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    gs = nvfp4.global_scale(w)
    return (*ref.nvfp4_quantize(w, gs), gs)


@pytest.mark.slow
@pytest.mark.parametrize("m,n,k,strided", [(1, 8, 16, False), (70, 130, 96, True), (33, 65, 208, False)])
def test_dgrad_kernel_interpreted_vs_fp64(monkeypatch, m, n, k, strided):
    # fp16 only: the Triton 3.8 interpreter's bf16 x bf16 tl.dot returns garbage (the forward W4A16 kernel's too);
    # the bf16 launches are checked by the AOT compiles (readiness) and run on GPUs
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    wq = _nvfp4_weight(n, k)
    dy = torch.randn(2, m, n, generator=torch.Generator().manual_seed(1)).half()
    if strided:
        dy = dy.transpose(0, 1).contiguous().transpose(0, 1)                # non-contiguous rows
    got = nvfp4_linear_backward(dy, *wq, impl="triton")
    w64 = ref.nvfp4_dequantize(*wq, torch.float64)
    want = dy.double() @ w64
    # the decoded weight tile is exact in fp16 (e2m1 x e4m3: <= 5 significant bits), the dot accumulates in fp32,
    # one fp16 rounding of the result: |err| <= half an fp16 ulp (2^-11 relative) + the fp32 accumulation error
    # (a few 2^-24 of sum |dy||w|) + the global-scale multiply (one fp32 ulp)
    scale = dy.double().abs() @ w64.abs()
    assert got.shape == (2, m, k) and got.dtype == torch.float16
    assert ((got.double() - want).abs() <= want.abs() * 2**-11 + 8 * 2**-24 * scale + 2**-24).all()
    torch.testing.assert_close(nvfp4_linear_backward(dy, *wq), ref_nvfp4_linear_backward(dy, *wq), rtol=0, atol=0)


def test_dgrad_kernel_empty_and_errors(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    wq = _nvfp4_weight(8, 32)
    assert nvfp4_linear_backward(torch.zeros(0, 8, dtype=torch.float16), *wq, impl="triton").shape == (0, 32)
    with pytest.raises(ValueError, match=r"grad_out must be \[\.\.\., 8\].*got shape \(2, 7\)"):
        nvfp4_linear_backward(torch.zeros(2, 7), *wq)
    with pytest.raises(ValueError, match="grad_out must be float16/bfloat16, got torch.float32"):
        nvfp4_linear_backward(torch.zeros(2, 8), *wq, impl="triton")


def test_nvfp4_linear_backward_runs_the_backward_op():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    wq = _nvfp4_weight(24, 64)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 64, generator=g, requires_grad=True)
    bias = torch.randn(24, generator=g, requires_grad=True)
    dy = torch.randn(2, 5, 24, generator=g, requires_grad=True)
    out = torch.ops.wan.nvfp4_linear(x, *wq, bias)
    seen = []
    with Ops():
        dx, db = torch.autograd.grad(out, (x, bias), dy, create_graph=True)
    assert "wan.nvfp4_linear_backward.default" in seen
    torch.testing.assert_close(dx, ref_nvfp4_linear_backward(dy, *wq), rtol=0, atol=0)      # the CPU kernel: the ref
    torch.testing.assert_close(db, dy.sum((0, 1)), rtol=1e-6, atol=1e-6)  # fp32 sums of 10 terms, any order
    # double backward: dx is linear in dy, d<dx, v>/d(dy) = v @ dequant(W)^T (nvfp4_linear without bias)
    v = torch.randn(2, 5, 64, generator=g)
    (ddy,) = torch.autograd.grad(dx, dy, v)
    torch.testing.assert_close(ddy, ref.nvfp4_linear(v, *wq, None), rtol=1e-5, atol=1e-5)  # fp32 matmuls
