"""wan_model/core/sampling.py: the flow-matching sigma schedule, the CFG Euler loop vs diffusers' and the Wan2.2
two-expert switch."""

from __future__ import annotations

import pytest
import torch

from wan_model.io.checkpoint import WanExperts
from wan_model.testing import BATCH, FP32_TOL, diffusers_euler, make_inputs, random_model
from wan_model.core.sampling import flow_sigmas, sample


def test_flow_sigmas():
    s = flow_sigmas(4, shift=1.0)
    assert torch.allclose(s, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    s5 = flow_sigmas(10, 5.0)
    assert s5[0] == 1 and s5[-1] == 0 and bool((s5[1:] < s5[:-1]).all())


@pytest.mark.slow
def test_sample_matches_diffusers_loop(fp32_models):
    model, ref = fp32_models["tiny-t2v"]
    model.set_impl("auto")
    x, _, text, _ = make_inputs(model.config)
    neg = torch.randn_like(text)
    res = sample(model, x, text, neg, num_steps=3, guidance_scale=4.0, shift=3.0, progress=False)
    expected = diffusers_euler(ref, x, text, neg, 3, 4.0, 3.0)
    assert len(res.step_times) == 3 and all(s > 0 for s in res.step_times)
    assert (res.latents - expected).abs().max().item() <= 4 * FP32_TOL  # 3 steps, guidance 4 amplifies


@pytest.mark.slow
def test_two_expert_switching(fp32_models):
    high, _ = fp32_models["tiny-t2v"]
    low = random_model(high.config, seed=7).eval()
    experts = WanExperts(high, low, boundary_ratio=0.875)
    x, _, text, _ = make_inputs(high.config)
    neg = torch.randn_like(text)
    res = sample(experts, x, text, neg, num_steps=4, guidance_scale=3.0, shift=1.0, progress=False)
    # t = 1000, 750, 500, 250: high while t >= 875
    assert res.experts == ["high", "low", "low", "low"]
    sigmas = flow_sigmas(4, 1.0)
    xr = x.clone()
    with torch.no_grad():
        for i, m in enumerate((high, low, low, low)):
            ts = torch.full((BATCH,), float(sigmas[i] * 1000))
            v_c, v_u = m(xr, ts, text), m(xr, ts, neg)
            xr = xr + float(sigmas[i + 1] - sigmas[i]) * (v_u + 3.0 * (v_c - v_u))
    assert (res.latents - xr).abs().max().item() <= FP32_TOL
