"""wan_model.compat.diffusers: a patched diffusers WanTransformer3DModel matches the unpatched one."""

from __future__ import annotations

import copy
import types

import pytest
import torch

from wan_model.testing import FP32_TOL, make_inputs
from wan_model.compat.diffusers import WanKernelsAttnProcessor, use_wan_kernels



def _run(ref, inputs):
    x, t, text, img = inputs
    with torch.no_grad():
        return ref(x, t, text, img, return_dict=False)[0]


@pytest.mark.parametrize("impl", ["ref", "auto"])
@pytest.mark.parametrize("variant", ["tiny-t2v", "tiny-i2v", "tiny-flf2v", "tiny-ti2v"])
def test_patched_diffusers_matches_unpatched(fp32_models, variant, impl):
    model, ref = fp32_models[variant]
    inputs = make_inputs(model.config)
    expected = _run(ref, inputs)
    patched = use_wan_kernels(copy.deepcopy(ref), impl=impl)
    assert all(isinstance(b.attn1.processor, WanKernelsAttnProcessor) and not hasattr(b.attn1, "to_qkv")
               for b in patched.blocks)  # the processor fuses q|k|v per call: no second copy of the weights
    err = (_run(patched, inputs) - expected).abs().max().item()
    print(f"{variant} impl={impl}: patched vs unpatched diffusers {err:.3e}")
    assert err <= FP32_TOL


def test_patches_every_transformer_of_a_pipeline(fp32_models):
    _, ref = fp32_models["tiny-t2v"]
    pipe = types.SimpleNamespace(transformer=copy.deepcopy(ref), transformer_2=copy.deepcopy(ref), vae=None)
    assert use_wan_kernels(pipe) is pipe
    for t in (pipe.transformer, pipe.transformer_2):
        assert all(isinstance(b.attn2.processor, WanKernelsAttnProcessor) for b in t.blocks)
    with pytest.raises(TypeError, match="expected a WanTransformer3DModel or a pipeline"):
        use_wan_kernels(types.SimpleNamespace(unet=None))
