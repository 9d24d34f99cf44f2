"""Fixtures of the model tests: tiny Wan configs (head_dim 128), random weights, diffusers reference."""

from __future__ import annotations

import contextlib
import signal

import pytest
import torch

from wan_model.cli import random_model
from wan_model.core.config import WanConfig

VARIANTS = ("tiny-t2v", "tiny-i2v", "tiny-flf2v", "tiny-ti2v")
GRID = (2, 6, 10)  # latent frames, height, width: non-square, patched grid 2 x 3 x 5 = 30 tokens
BATCH = 2


def make_inputs(cfg: WanConfig, dtype=torch.float32, seed: int = 0, batch: int = BATCH):
    """(hidden_states, timestep, text, image) for a config; 512 text tokens, 257 image tokens."""
    g = torch.Generator().manual_seed(seed)
    f, h, w = GRID
    x = torch.randn(batch, cfg.in_channels, f, h, w, generator=g).to(dtype)
    if cfg.expand_timesteps:  # TI2V: first latent frame's tokens at t=0, the rest at t
        S = (f // 1) * (h // 2) * (w // 2)
        t = torch.cat([torch.zeros(batch, S // f), torch.full((batch, S - S // f), 700.0)], dim=1)
        t[1, S // f:] = 350.0
    else:
        t = torch.tensor([700.0, 350.0][:batch])
    text = torch.randn(batch, 512, cfg.text_dim, generator=g).to(dtype)
    img = None
    if cfg.has_image:
        n = 2 * batch if cfg.pos_embed_seq_len else batch
        img = torch.randn(n, 257, cfg.image_dim, generator=g).to(dtype)
    return x, t, text, img


def diffusers_bf16_like(ref, dtype=torch.bfloat16):
    """Cast a diffusers model as `from_pretrained(torch_dtype=dtype)` holds it: parameters under
    `_keep_in_fp32_modules` (matched on dot-separated name parts, diffusers' rule) stay fp32."""
    keep = type(ref)._keep_in_fp32_modules
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if not any(k in name.split(".") for k in keep):
                p.data = p.data.to(dtype)
    return ref


def diffusers_from_pretrained(path, dtype=torch.float32):
    """diffusers' own WanTransformer3DModel.from_pretrained(path, torch_dtype=dtype) on our saved dir (its
    config, shard-index, key loading and fp32-keep rule; needs `accelerate`, in requirements.txt)."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel.from_pretrained(path, torch_dtype=dtype).eval()


@pytest.fixture(scope="session")
def fp32_models():
    """{variant: (our fp32 WanModel with random weights, diffusers model with the same weights)}."""
    from wan_model.compat.diffusers import to_diffusers_model

    out = {}
    for i, name in enumerate(VARIANTS):
        model = random_model(WanConfig.from_preset(name), seed=i).eval()
        out[name] = (model, to_diffusers_model(model))
    return out


@contextlib.contextmanager
def within(seconds: float):
    """Fail (instead of hanging the suite) when the block runs longer than `seconds` (SIGALRM)."""
    def fire(*_):
        raise TimeoutError(f"still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
