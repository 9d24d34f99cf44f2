"""Hypothesis fuzz of WanModel.load_lora / unload_lora: random LoRA state dicts and safetensors files in the three
namings (diffusers/PEFT, original/ComfyUI, kohya/musubi) with random ranks, dtypes, alphas, values, shapes and
missing / extra keys, loaded into a tiny model (fp32 or fp16). Only two outcomes are allowed: the LoRA fuses
(every weight finite, and unload_lora gives the original tensors back bit for bit) or a one-line
CheckpointError / ValueError that leaves the model unchanged. Never another exception, never a NaN weight."""

from __future__ import annotations

import functools
import os
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from wan_model.testing import random_model
from wan_model.core.config import WanConfig
from wan_model.compat.layouts import CheckpointError, diffusers_to_original_key
from wan_model.compat.lora import adapters, targets

LAYERS = ("blocks.0.attn1.to_q", "blocks.1.attn1.to_v", "blocks.0.attn2.to_k", "blocks.1.attn1.to_out.0",
          "blocks.0.ffn.net.0.proj", "blocks.1.ffn.net.2", "proj_out")
# valid choices, and the faults an example may carry (at most one per example: half the examples fuse)
DTYPES, BAD_DTYPES = (torch.float32, torch.float16, torch.bfloat16), (torch.int8, torch.bool, torch.complex64)
ALPHAS, BAD_ALPHAS = (None, 0.0, -1.5, 4.0, "int"), (1e38, float("nan"), float("inf"), "empty")
SCALES, BAD_SCALES = (1.0, 0.5, 0.0, -2.0), (1e30, float("nan"), float("inf"), -1e39)
FAULTS = ("",) * 9 + ("dtype", "alpha", "nan", "inf", "huge", "shape", "drop", "role", "layer", "scale", "rank 0",
                      "no tensors")


@functools.cache
def _model(dtype: torch.dtype):
    return random_model(WanConfig.from_preset("tiny-t2v"), seed=3).to_dtype(dtype).eval()


def _stem(naming: str, layer: str) -> str:
    if naming == "diffusers":
        return f"transformer.{layer}"
    o = diffusers_to_original_key(layer + ".weight")[: -len(".weight")]
    return f"diffusion_model.{o}" if naming == "original" else "lora_unet_" + o.replace(".", "_")


@st.composite
def loras(draw):
    """(state dict, scale, fault) of a random LoRA for the tiny T2V model."""
    naming = draw(st.sampled_from(("diffusers", "original", "kohya")))
    fault = draw(st.sampled_from(FAULTS))
    where = targets(_model(torch.float32))
    layers = [] if fault == "no tensors" else draw(st.lists(st.sampled_from(LAYERS), min_size=1, max_size=3,
                                                            unique=True))
    sd = {}
    for i, layer in enumerate(layers):
        bad = fault if i == 0 else ""                                       # the fault goes into the first layer
        N, K = where[f"{layer}.weight"].shape
        r = 0 if bad == "rank 0" else draw(st.integers(1, 3))
        dtype = draw(st.sampled_from(BAD_DTYPES if bad == "dtype" else DTYPES))
        g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
        down = torch.randn(r, K + (bad == "shape"), generator=g) * 0.1
        up = torch.randn(N, r, generator=g) * 0.1
        if bad in ("nan", "inf", "huge"):
            t = draw(st.sampled_from((down, up)))
            t.view(-1)[draw(st.integers(0, t.numel() - 1))] = {"nan": float("nan"), "inf": float("-inf"),
                                                               "huge": 1e20}[bad]
            if bad == "huge":                                               # finite factors, an overflowing product
                down.mul_(1e19)
        stem = _stem(naming, layer)
        A, B = ("lora_A", "lora_B") if naming == "diffusers" else ("lora_down", "lora_up")
        drop = draw(st.sampled_from(("up", "down"))) if bad == "drop" else ""
        if drop != "down":
            sd[f"{stem}.{A}.weight"] = down.to(dtype)
        if drop != "up":
            sd[f"{stem}.{B}.weight"] = up.to(dtype)
        alpha = draw(st.sampled_from(BAD_ALPHAS if bad == "alpha" else ALPHAS))
        if alpha is not None:
            sd[f"{stem}.alpha"] = (torch.tensor([]) if alpha == "empty" else torch.tensor(4) if alpha == "int"
                                   else torch.tensor(alpha))
    if fault in ("role", "layer"):
        stem = _stem(naming, "blocks.0.attn1.to_q" if fault == "role" else "blocks.5.attn1.to_q")
        sd[f"{stem}.{'lora_mid' if fault == 'role' else 'lora_down'}.weight"] = torch.zeros(2, 2)
    return sd, draw(st.sampled_from(BAD_SCALES if fault == "scale" else SCALES)), fault


def _raw(t):
    return t.view(torch.uint8) if t.element_size() == 1 else t


@pytest.mark.slow
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lora=loras(), dtype=st.sampled_from((torch.float32, torch.float16)), as_file=st.booleans())
def test_load_lora_fuzz(lora, dtype, as_file):
    sd, scale, fault = lora
    model = _model(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as d:
        src = sd
        if as_file:
            src = os.path.join(d, "fuzz.safetensors")
            save_file(sd, src)
        try:
            model.load_lora(src, scale=scale)
        except (CheckpointError, ValueError) as e:
            event(f"refused ({fault or 'no fault'})")
            assert "\n" not in str(e) and str(e)
            assert adapters(model) == []
            now = model.state_dict()
            assert all(torch.equal(_raw(now[k]), _raw(v)) for k, v in before.items()), "refusal changed the model"
            return
    event(f"fused ({fault or 'no fault'})")
    assert adapters(model) and sd
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    assert not bad, f"non-finite weights after load_lora: {bad}"
    model.unload_lora()
    now = model.state_dict()
    assert all(torch.equal(_raw(now[k]), _raw(v)) for k, v in before.items()) and adapters(model) == []

