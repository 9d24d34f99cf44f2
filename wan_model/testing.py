"""What tests, benchmarks and the GPU check share to build and judge a model: a random model of trained-like scale,
deterministic inputs for the tiny presets, diffusers' sampling loop, and the fp32 bound of our model against
diffusers'. Layer 4 (beside the CLI, which uses `random_model` and `diffusers_euler` for its demo)."""

from __future__ import annotations

import torch

from wan_model.core.config import WanConfig
from wan_model.core.sampling import flow_sigmas
from wan_model.model import WanModel

# Our WanModel vs diffusers' WanTransformer3DModel (or its modules), same weights, fp32, max abs difference of one
# forward (issue 6's acceptance bound; the drop-in, GGUF, checkpoint and integration tests hold it too).
FP32_TOL = 1e-5
GRID = (2, 6, 10)  # latent frames, height, width: non-square, patched grid 2 x 3 x 5 = 30 tokens
BATCH = 2


def make_inputs(cfg: WanConfig, dtype=torch.float32, seed: int = 0, batch: int = BATCH, grid=GRID, device=None):
    """(hidden_states, timestep, text, image) for a config; 512 text tokens, 257 image tokens (image None without
    an image encoder). Drawn on CPU from a seeded generator, then moved to `device`."""
    g = torch.Generator().manual_seed(seed)
    f, h, w = grid
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
    if device is not None:
        x, t, text = x.to(device), t.to(device), text.to(device)
        img = None if img is None else img.to(device)
    return x, t, text, img


def make_control(cfg: WanConfig, latents: torch.Tensor, seed: int = 1, frames: int | None = None) -> torch.Tensor:
    """VACE control latents [B, vace_in_channels, F_c, H, W] for `latents` [B, C, F, H, W] (F_c = `frames`, default
    F), in the latents' dtype and device, drawn on CPU from a seeded generator."""
    B, _, f, h, w = latents.shape
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(B, cfg.vace_in_channels, f if frames is None else frames, h, w, generator=g)
    return c.to(dtype=latents.dtype, device=latents.device)


def random_model(cfg: WanConfig, seed: int = 0) -> WanModel:
    """A WanModel with random weights of a trained-like scale (fp32)."""
    torch.manual_seed(seed)
    model = WanModel(cfg, impl="ref")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif "norm" in name:
                p.normal_(1.0, 0.1)
            elif "scale_shift_table" in name or "pos_embed" in name:
                p.normal_(0.0, 0.5)
            else:  # weights: unit-variance outputs
                p.normal_(0.0, p[0].numel() ** -0.5)
    return model


@torch.no_grad()
def diffusers_euler(ref, latents, text, neg, num_steps, guidance, shift, image=None, control=None,
                    control_scale=None):
    """The same Euler CFG loop with a diffusers WanTransformer3DModel, cond and uncond as two forwards
    (what diffusers' WanPipeline does). A WanVACETransformer3DModel gets `control` / `control_scale` in both
    forwards, as WanVACEPipeline passes them."""
    sigmas = flow_sigmas(num_steps, shift)
    x = latents.float()
    dtype = ref.proj_out.weight.dtype
    vace = {} if control is None else {"control_hidden_states": control.to(dtype), "control_hidden_states_scale":
                                       None if control_scale is None else control_scale.to(dtype)}
    for i in range(num_steps):
        t = torch.full((x.shape[0],), float(sigmas[i] * 1000))
        v_c = ref(x.to(dtype), t, text.to(dtype), image, return_dict=False, **vace)[0].float()
        v_u = ref(x.to(dtype), t, neg.to(dtype), image, return_dict=False, **vace)[0].float()
        v = v_u + guidance * (v_c - v_u)
        x = x + float(sigmas[i + 1] - sigmas[i]) * v
    return x
