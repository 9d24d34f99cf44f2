"""WanModel (wan_model/model.py, wan_model/core/model.py) vs diffusers' WanTransformer3DModel (the numerical
reference): fp32 and bf16 numerics, the context cache, CFG batching, per-token timesteps, torch.compile and the input
checks. Config, RoPE, sampling and the demo: tests/test_config.py, test_rope.py, test_sampling.py, test_cli.py."""

from __future__ import annotations

import copy

import pytest
import torch

from _helpers import VARIANTS, diffusers_bf16_like, run_diffusers, run_ours
from wan_model.testing import BATCH, FP32_TOL, make_inputs
from wan_model.io.checkpoint import native_to_diffusers

BF16_RATIO = 1.5     # our bf16 error <= 1.5x diffusers-bf16's own error vs the fp32 run


# ---------------------------------------------------------------------------------------------
# numerics vs diffusers

@pytest.mark.slow
@pytest.mark.parametrize("impl", ["ref", "auto"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_fp32_matches_diffusers(fp32_models, variant, impl):
    model, ref = fp32_models[variant]
    model.set_impl(impl)
    inputs = make_inputs(model.config)
    if variant == "tiny-i2v":
        assert inputs[3].shape[1] == 257
    out, expected = run_ours(model, inputs), run_diffusers(ref, inputs)
    assert out.shape == expected.shape == (BATCH, model.config.out_channels, *inputs[0].shape[2:])
    err = (out - expected).abs().max().item()
    print(f"{variant} impl={impl} fp32 max|ours - diffusers| = {err:.3e}")
    assert err <= FP32_TOL


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_error_within_diffusers_bf16_error(fp32_models, variant):
    model32, _ = fp32_models[variant]
    model = copy.deepcopy(model32).to_dtype(torch.bfloat16).set_impl("auto")
    from wan_model.compat.diffusers import to_diffusers_model
    ref_bf16 = to_diffusers_model(model)
    # the fp32 reference runs the same (bf16-rounded) weights in fp32, so the errors below are compute only
    ref32 = to_diffusers_model(copy.deepcopy(model).to_dtype(torch.float32))
    # our loaded bf16 model holds exactly what diffusers' from_pretrained(torch_dtype=bf16) holds
    expected_dtypes = diffusers_bf16_like(to_diffusers_model(copy.deepcopy(model32)))
    ours_sd = native_to_diffusers(dict(model.state_dict()), model.config)
    for k, v in expected_dtypes.state_dict().items():
        assert ours_sd[k].dtype == v.dtype and torch.equal(ours_sd[k], v), k
    x, t, text, img = make_inputs(model.config, torch.bfloat16)
    inputs32 = (x.float(), t, text.float(), None if img is None else img.float())
    truth = run_diffusers(ref32, inputs32)
    err_ref = (run_diffusers(ref_bf16, (x, t, text, img)).float() - truth).abs().max().item()
    err_ours = (run_ours(model, (x, t, text, img)).float() - truth).abs().max().item()
    print(f"{variant} bf16: diffusers err {err_ref:.3e}, ours {err_ours:.3e}, ratio {err_ours / err_ref:.2f}")
    assert err_ref > 0
    assert err_ours <= BF16_RATIO * err_ref


def test_i2v_requires_image_and_t2v_rejects_it(fp32_models):
    i2v, _ = fp32_models["tiny-i2v"]
    x, t, text, _ = make_inputs(i2v.config)
    with pytest.raises(ValueError, match="encoder_hidden_states_image is required"):
        i2v(x, t, text)
    t2v, _ = fp32_models["tiny-t2v"]
    with pytest.raises(ValueError, match="has no image embedder"):
        t2v.prepare_context(text, torch.zeros(2, 257, 64))


# ---------------------------------------------------------------------------------------------
# context cache, CFG batching, per-token timesteps

@pytest.mark.parametrize("variant", ["tiny-t2v", "tiny-i2v"])
def test_prepare_context_reused_equals_recompute(fp32_models, variant):
    model, _ = fp32_models[variant]
    model.set_impl("auto")
    x, t, text, img = make_inputs(model.config)
    with torch.no_grad():
        ctx = model.prepare_context(text, img)
        for step, tv in enumerate((900.0, 500.0, 100.0)):
            ts = torch.full((BATCH,), tv)
            cached, fresh = model(x, ts, context=ctx), model(x, ts, text, img)
            assert torch.equal(cached, fresh), step
            x = x + 0.1 * cached[:, : x.shape[1]].mean() * torch.randn_like(x)


def test_prepare_context_one_gemm_per_context(fp32_models):
    """All layers' text K/V come from one GEMM (and the image K/V from one more)."""
    model, _ = fp32_models["tiny-i2v"]
    _, _, text, img = make_inputs(model.config)
    calls = []
    orig = torch.nn.functional.linear

    def spy(x, w, b=None):
        calls.append(tuple(w.shape))
        return orig(x, w, b)

    torch.nn.functional.linear = spy
    try:
        with torch.no_grad():
            model.prepare_context(text, img)
    finally:
        torch.nn.functional.linear = orig
    C, L = model.config.dim, model.config.num_layers
    assert calls.count((L * 2 * C, C)) == 2  # text K/V of all layers, image K/V of all layers
    assert not any(s == (C, C) for s in calls[2:])  # no per-layer K/V projections


def test_cfg_batched_equals_two_forwards(fp32_models):
    model, _ = fp32_models["tiny-t2v"]
    x, t, text, _ = make_inputs(model.config, batch=1)
    neg = torch.randn_like(text)
    with torch.no_grad():
        both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([text, neg]))
        cond, uncond = model(x, t, text), model(x, t, neg)
    # Batching changes only the GEMMs' M, but MKL's fp32 kernels block (and so round) differently for
    # another M: rows agree to fp32 rounding (seen: ~1e-6), not bit for bit.
    err = max((both[:1] - cond).abs().max().item(), (both[1:] - uncond).abs().max().item())
    print(f"CFG batched vs separate: max diff {err:.3e}")
    assert err <= FP32_TOL


def test_ti2v_unique_timesteps_equal_per_token(fp32_models):
    model, _ = fp32_models["tiny-ti2v"]
    _, t, _, _ = make_inputs(model.config)
    emb = model.condition_embedder
    with torch.no_grad():
        temb, proj = emb.time(t, torch.float32)
        temb_tok, proj_tok = emb.time_mlp(t.flatten(), torch.float32)
    assert temb.shape == (BATCH, t.shape[1], model.config.dim) and proj.shape == (BATCH, t.shape[1], 6, model.config.dim)
    torch.testing.assert_close(temb, temb_tok.unflatten(0, t.shape), rtol=0, atol=1e-6)
    torch.testing.assert_close(proj, proj_tok.unflatten(0, t.shape), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# torch.compile

@pytest.mark.slow
@pytest.mark.parametrize("variant", ["tiny-t2v", "tiny-ti2v"])
def test_compile_fullgraph_matches_eager(fp32_models, variant):
    model, _ = fp32_models[variant]
    model.set_impl("auto")
    inputs = make_inputs(model.config)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    eager, out = run_ours(model, inputs), run_ours(compiled, inputs)
    # Inductor fuses and reorders the fp32 reductions (LayerNorm, RMSNorm, softmax), so the two agree to
    # accumulated fp32 rounding, not bit for bit: seen up to 1.3e-5 on outputs of magnitude ~6, i.e.
    # ~2e-6 relative to the output scale. Bound: 1e-5 of the output scale.
    err = (out - eager).abs().max().item()
    print(f"{variant} compiled vs eager: max diff {err:.3e}")
    assert err <= 1e-5 * eager.abs().max().item()


# ---------------------------------------------------------------------------------------------
# input checks (issue 27): one ValueError naming the argument, at the entry, before any compute

@pytest.fixture(scope="module")
def bf16_models(fp32_models):
    return {v: copy.deepcopy(fp32_models[v][0]).to_dtype(torch.bfloat16).set_impl("auto")
            for v in ("tiny-t2v", "tiny-i2v", "tiny-ti2v")}


def _bad_input_cases(bf16_models):
    """(model, args, message regex): fp32 inputs of a bf16 model (diffusers 0.42.1 raises torch's own dtype
    error there, naming no argument; its pipelines cast to the model dtype first), wrong shapes."""
    t2v, i2v = bf16_models["tiny-t2v"], bf16_models["tiny-i2v"]
    x, t, text, _ = make_inputs(t2v.config, torch.bfloat16)
    xi, ti, texti, img = make_inputs(i2v.config, torch.bfloat16)
    cases = [
        (t2v, (x.float(), t, text), r"hidden_states \(2, 16, 2, 6, 10\) is torch.float32, expected the model "
                                    r"dtype torch.bfloat16"),
        (t2v, (x, t, text.float()), r"encoder_hidden_states \(2, 512, 64\) is torch.float32, expected the model "
                                    r"dtype torch.bfloat16"),
        (i2v, (xi, ti, texti, img.float()), r"encoder_hidden_states_image \(2, 257, \d+\) is torch.float32"),
        (i2v, (xi, ti, texti, img[:1]), r"encoder_hidden_states_image has shape \(1, 257, \d+\), expected \[2, L_img"),
        (t2v, (x[:, :4], t, text), r"hidden_states has shape \(2, 4, 2, 6, 10\), expected \[B, 16, F, H, W\]"),
        (t2v, (x, t, text[..., :8]), r"encoder_hidden_states has shape \(2, 512, 8\), expected \[B, L_txt, 64\]"),
        (t2v, (x, t, text[:1]), r"text context has batch 1, hidden_states \(2, 16, 2, 6, 10\) batch 2"),
        (t2v, (x, torch.tensor([1.0, 2.0, 3.0]), text), r"timestep has shape \(3,\).*\[B\] or per token"),
        (t2v, (x, torch.tensor(500.0), text), r"timestep has shape \(\)"),
        (t2v, (x, 500.0, text), r"timestep has shape \(\) and dtype float"),
    ]
    m = bf16_models["tiny-ti2v"]
    xt, tt, textt, _ = make_inputs(m.config, torch.bfloat16)
    return cases + [(m, (xt, tt[:, 1:], textt), r"timestep has shape \(2, \d+\).*\[2, %d\]" % tt.shape[1])]


def test_forward_refuses_bad_inputs_naming_the_argument(bf16_models):
    for model, args, match in _bad_input_cases(bf16_models):
        with torch.no_grad(), pytest.raises(ValueError, match=match):
            model(*args)


def test_prepare_context_refuses_a_wrong_text_dtype(bf16_models):
    _, _, text, _ = make_inputs(bf16_models["tiny-t2v"].config)
    with pytest.raises(ValueError, match=r"encoder_hidden_states \(2, 512, 64\) is torch.float32"):
        bf16_models["tiny-t2v"].prepare_context(text)


@pytest.mark.parametrize("dim", [2, 3, 4])
def test_forward_refuses_sizes_the_patch_would_crop(bf16_models, dim):
    """diffusers' Conv3d patch embedding drops the remainder (an output smaller than the input); ours refuses."""
    model = bf16_models["tiny-t2v"]
    model.config = model.config.replace(patch_size=(2, 2, 2)) if dim == 2 else model.config
    try:
        x, t, text, _ = make_inputs(model.config, torch.bfloat16)
        x = x.narrow(dim, 0, x.shape[dim] - 1)
        with torch.no_grad(), pytest.raises(ValueError, match=r"hidden_states has shape \(2, 16, (1, 6, 10|2, 5, 10|"
                                                               r"2, 6, 9)\).*multiples of the patch size"):
            model(x, t, text)
    finally:
        model.config = model.config.replace(patch_size=(1, 2, 2))


@pytest.mark.slow
def test_forward_accepts_what_diffusers_accepts(bf16_models):
    """Integer and bf16 timesteps, a timestep of batch 1 broadcast over the batch (diffusers' broadcast)."""
    model = bf16_models["tiny-t2v"]
    x, t, text, _ = make_inputs(model.config, torch.bfloat16)
    with torch.no_grad():
        want = model(x, t[:1].expand(2), text)
        assert torch.equal(model(x, t[:1], text), want)
        assert torch.equal(model(x, t.long(), text), model(x, t, text))
        model(x, t.bfloat16(), text)
