"""Make an existing diffusers `WanTransformer3DModel` (or a pipeline holding one) run on the `wan` ops.

    from wan_model.integrations.diffusers import use_wan_kernels
    use_wan_kernels(pipe)            # pipe.transformer (and pipe.transformer_2) now use the kernels

Self-attention: the Q/K/V projections are fused into one [3C, C] GEMM (diffusers' `fuse_projections`)
and followed by `wan_kernels.qkv_rope` (RMSNorm of q, k across heads + RoPE); attention runs through
`wan_kernels.attention`, with the Wan2.1 I2V image keys/values as its second (independently
softmaxed) set. Numerics match the unpatched model up to rounding (one rounding instead of several).
"""

from __future__ import annotations

import torch

import wan_kernels

TEXT_TOKENS = 512  # diffusers hard-codes the text context length when splitting the I2V context


class WanKernelsAttnProcessor:
    """Attention processor for diffusers' `WanAttention` running on the `wan` ops (backend `impl`)."""

    def __init__(self, impl: str = "auto", device: torch.device | str = "cpu"):
        self.impl = impl
        self.bind(device)

    def bind(self, device) -> None:
        self.qkv_rope = wan_kernels.resolve("qkv_rope", self.impl, device)
        self.attention = wan_kernels.resolve("attention", self.impl, device)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if attention_mask is not None:
            raise ValueError("WanKernelsAttnProcessor: attention masks are not supported (Wan uses none), "
                             f"got a mask of shape {tuple(attention_mask.shape)}")
        H = attn.heads
        if encoder_hidden_states is None:  # self-attention: fused QKV + qk_norm_rope
            if rotary_emb is None:
                raise ValueError("WanKernelsAttnProcessor: self-attention needs rotary_emb")
            cos, sin = rotary_emb  # [1, S, 1, D], each angle repeated for the pair
            cos = cos[0, :, 0, 0::2].float().contiguous()   # [S, D/2]
            sin = sin[0, :, 0, 1::2].float().contiguous()
            q, k, v = self.qkv_rope(hidden_states, attn.to_qkv.weight, attn.to_qkv.bias, attn.norm_q.weight,
                                    attn.norm_k.weight, cos, sin, H, attn.norm_q.eps)
            out = self.attention(q, k, v, None, None, None)
        else:  # cross-attention (+ the Wan2.1 I2V image context, first L - 512 tokens)
            k_img = v_img = None
            if attn.add_k_proj is not None:
                n_img = encoder_hidden_states.shape[1] - TEXT_TOKENS
                img, encoder_hidden_states = encoder_hidden_states[:, :n_img], encoder_hidden_states[:, n_img:]
                k_img = attn.norm_added_k(attn.add_k_proj(img)).unflatten(2, (H, -1))
                v_img = attn.add_v_proj(img).unflatten(2, (H, -1))
            q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (H, -1))
            k = attn.norm_k(attn.to_k(encoder_hidden_states)).unflatten(2, (H, -1))
            v = attn.to_v(encoder_hidden_states).unflatten(2, (H, -1))
            out = self.attention(q, k, v, k_img, v_img, None)
        out = attn.to_out[0](out.flatten(2))
        return attn.to_out[1](out)


def _transformers(obj) -> list:
    from diffusers import WanTransformer3DModel

    if isinstance(obj, WanTransformer3DModel):
        return [obj]
    found = [getattr(obj, n, None) for n in ("transformer", "transformer_2")]
    found = [t for t in found if isinstance(t, WanTransformer3DModel)]
    if not found:
        raise TypeError(f"use_wan_kernels: expected a WanTransformer3DModel or a pipeline holding one, "
                        f"got {type(obj).__name__}")
    return found


def use_wan_kernels(model_or_pipeline, impl: str = "auto"):
    """Patch every Wan transformer of `model_or_pipeline` in place to run on the `wan` ops; returns it.

    Self-attention projections are fused (diffusers' `fuse_projections`, which keeps the unfused
    weights too); every `WanAttention` gets a `WanKernelsAttnProcessor(impl)`.
    """
    for transformer in _transformers(model_or_pipeline):
        device = next(transformer.parameters()).device
        for block in transformer.blocks:
            block.attn1.fuse_projections()
            for attn in (block.attn1, block.attn2):
                attn.set_processor(WanKernelsAttnProcessor(impl, device))
    return model_or_pipeline


def to_diffusers_model(model):
    """A diffusers `WanTransformer3DModel` holding the same weights as our `WanModel` (same dtypes:
    the parameters diffusers keeps in fp32 are fp32 in both), in eval mode on the same device."""
    from diffusers import WanTransformer3DModel

    from wan_model.checkpoint import native_to_diffusers

    cfg = {k: v for k, v in model.config.to_diffusers_config().items() if not k.startswith("_")}
    with torch.device("meta"):
        ref = WanTransformer3DModel(**cfg)
    sd = native_to_diffusers(dict(model.state_dict()), model.config)
    ref.load_state_dict(sd, strict=True, assign=True)
    rope = ref.rope  # non-persistent fp32 RoPE buffers: rebuild them for real
    ref.rope = type(rope)(model.config.attention_head_dim, model.config.patch_size,
                          model.config.rope_max_seq_len).to(model.device)
    return ref.eval()
