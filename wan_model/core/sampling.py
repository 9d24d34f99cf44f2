"""Flow-matching Euler sampling with classifier-free guidance batched into one forward per step.

Wan is a rectified-flow model: x_sigma = (1 - sigma) x_0 + sigma * noise, the network predicts the
velocity noise - x_0, timestep = 1000 * sigma. Per step: one forward on [cond; uncond] stacked along
the batch (the cross-attention K/V of both prompts are computed once, before the loop), guidance
v = v_u + g (v_c - v_u), then x <- x + (sigma_next - sigma) v. Wan2.2 two-expert models switch from
the high-noise to the low-noise expert when t < boundary_ratio * 1000.
"""

from __future__ import annotations

import dataclasses
import time

import torch
from tqdm.auto import tqdm

from wan_model.core.model import WanExperts, WanTransformer


def flow_sigmas(num_steps: int, shift: float = 5.0) -> torch.Tensor:
    """num_steps + 1 sigmas from 1 to 0 (float64), shifted as Wan's scheduler:
    sigma' = shift * s / (1 + (shift - 1) * s)."""
    s = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return shift * s / (1 + (shift - 1) * s)


@dataclasses.dataclass
class SampleResult:
    latents: torch.Tensor               # [B, C_out, F, H, W]
    step_times: list[float]             # seconds per denoising step (forward + update)
    experts: list[str]                  # "high"/"low"/"single" per step


def _timestep(model: WanTransformer, t: float, x: torch.Tensor) -> torch.Tensor:
    """[B] or, for per-token-timestep models (TI2V), [B, S] filled with t."""
    B = x.shape[0]
    if model.config.expand_timesteps:
        pt, ph, pw = model.config.patch_size
        S = (x.shape[2] // pt) * (x.shape[3] // ph) * (x.shape[4] // pw)
        return torch.full((B, S), t, device=x.device)
    return torch.full((B,), t, device=x.device)


@torch.no_grad()
def sample(model: WanTransformer | WanExperts, latents: torch.Tensor, prompt_embeds: torch.Tensor,
           negative_prompt_embeds: torch.Tensor | None = None, num_steps: int = 4, guidance_scale: float = 5.0,
           shift: float = 5.0, image_embeds: torch.Tensor | None = None, condition: torch.Tensor | None = None,
           progress: bool = True, dense_steps=None, control: torch.Tensor | None = None,
           control_scale: torch.Tensor | None = None) -> SampleResult:
    """Denoise `latents` [B, C, F, H, W] (pure noise at sigma=1) in `num_steps` Euler steps.

    prompt_embeds / negative_prompt_embeds: [B, L, text_dim]; guidance is skipped when the negative
    prompt is None or guidance_scale == 1. image_embeds: CLIP tokens for Wan2.1 I2V/FLF2V;
    condition: [B, C_in - C, F, H, W] channels concatenated to the latents at every step (I2V).
    dense_steps: the step indices run with dense attention (`WanTransformer.dense_attention`: wan::attention in
    every role) when the model was set to 8-bit attention; default (None) the first step each expert runs and the
    last step: the first and last, as Wan users do, and for a two-expert model also the low-noise expert's first
    (its 8-bit layers measure their own q and k there: the channel balance of its later steps,
    wan_model/core/balance.py; without it, a first generation would run them unbalanced). The configured attention
    is bound again afterwards. No effect on a bf16 model (both sets are the same).
    control: VACE models, the control latents [B, vace_in_channels, F, H, W] (WanVACEPipeline's conditioning
    latents), given to the cond and the uncond forward alike as that pipeline does, with control_scale
    [len(vace_layers)] (default ones).
    """
    experts = {"high": model.high, "low": model.low} if isinstance(model, WanExperts) else {"single": model}
    cfg_on = negative_prompt_embeds is not None and guidance_scale != 1.0
    text = torch.cat([prompt_embeds, negative_prompt_embeds]) if cfg_on else prompt_embeds
    img = image_embeds
    if cfg_on and image_embeds is not None:
        img = torch.cat([image_embeds, image_embeds])
    # cross-attention K/V of every layer for cond + uncond, once per expert
    contexts = {name: m.prepare_context(text.to(m.dtype), None if img is None else img.to(m.dtype))
                for name, m in experts.items()}

    vace = {name: {} for name in experts}  # per expert: the VACE inputs of its forward (cond and uncond batched)
    if control is not None:
        for name, m in experts.items():
            c = control.to(m.dtype)
            vace[name] = {"control_hidden_states": torch.cat([c, c]) if cfg_on else c,
                          "control_hidden_states_scale": None if control_scale is None else control_scale.to(m.dtype)}

    dense = None if dense_steps is None else {i % num_steps for i in dense_steps}
    try:
        return _euler(model, experts, contexts, latents, num_steps, guidance_scale, shift, condition, cfg_on,
                      progress, dense, vace)
    finally:
        for m in experts.values():
            m.dense_attention(False)


def _euler(model, experts, contexts, latents, num_steps, guidance_scale, shift, condition, cfg_on, progress,
           dense, vace) -> SampleResult:
    sigmas = flow_sigmas(num_steps, shift)
    x = latents.float()
    times, used = [], []
    for i in tqdm(range(num_steps), desc="denoise", disable=not progress):
        t0 = time.perf_counter()
        t = float(sigmas[i] * 1000)
        t_next = float(sigmas[i + 1] * 1000) if i + 1 < num_steps else None   # an offloaded pair prefetches
        name = "single" if "single" in experts else ("high" if model.expert(t, t_next) is model.high else "low")
        m = experts[name]
        # rebinds the pre-bound set; by default dense: each expert's first step and the last
        m.dense_attention(name not in used or i == num_steps - 1 if dense is None else i in dense)
        inp = x if condition is None else torch.cat([x, condition.float()], dim=1)
        inp = inp.to(m.dtype)
        if cfg_on:
            inp = torch.cat([inp, inp])
        v = m(inp, _timestep(m, t, inp), context=contexts[name], **vace[name]).float()
        if cfg_on:
            v_c, v_u = v.chunk(2)
            v = v_u + guidance_scale * (v_c - v_u)
        x = x + float(sigmas[i + 1] - sigmas[i]) * v
        times.append(time.perf_counter() - t0)
        used.append(name)
    return SampleResult(x, times, used)
