"""Make an existing diffusers `WanTransformer3DModel` (or a pipeline holding one) run on the `wan` ops.

    from wan_model.compat.diffusers import use_wan_kernels
    use_wan_kernels(pipe)            # pipe.transformer (and pipe.transformer_2) now use the kernels

Only the attention processors change (no module, weight or hook is added or replaced), so what diffusers
does to a transformer keeps working after the patch, in any order:
- self-attention runs `wan_kernels.qkv_rope` (one GEMM over [to_q | to_k | to_v] concatenated at each call,
  RMSNorm of q, k across heads + RoPE) when the three projections are plain `nn.Linear`s; otherwise (PEFT
  LoRA layers, GGUF / bitsandbytes / torchao weights, diffusers' layerwise-casting or offload hooks) it calls
  the live modules themselves and then `wan_kernels.qk_norm_rope`, so adapters, their scales, fusing and
  unloading take effect as in stock diffusers. The weights are never stored twice.
- attention runs `wan_kernels.attention`, with the Wan2.1 I2V image keys/values as its second
  (independently softmaxed) set; `set_attention_backend(name)` and `enable_parallelism` hand attention back
  to diffusers' own `WanAttnProcessor` (with that backend / parallel config), `reset_attention_backend()`
  returns it to the kernels.
- diffusers' cache hooks (FirstBlockCache, MagCache, ...) and group offloading wrap blocks and modules,
  which the patch leaves alone.
Numerics match the unpatched model up to rounding (one rounding instead of several).

Our own `WanModel` as a pipeline's transformer needs no patch, also under sequence parallelism: diffusers'
`transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=U, ring_degree=R))` maps to
`WanModel.enable_parallelism(U, R)` (`parallel_degrees`), and every rank of the pipeline gets the full output.
"""

from __future__ import annotations

import warnings

import diffusers  # noqa: F401  (its __version__ is checked below)
import torch
import torch.nn as nn

from wan_kernels._versions import check_installed

check_installed("diffusers", "torch")

from diffusers import WanTransformer3DModel  # noqa: E402  (after the version check: older ones fail here)
from diffusers.models.transformers.transformer_wan import WanAttnProcessor  # noqa: E402

import wan_kernels  # noqa: E402

TEXT_TOKENS = 512  # diffusers hard-codes the text context length when splitting the I2V context


def _dense(m: nn.Module, dtype: torch.dtype) -> bool:
    """True when calling `m` is exactly F.linear(x, m.weight, m.bias) with `dtype` weights: a plain nn.Linear (no
    PEFT / GGUF / bitsandbytes subclass), a plain Parameter weight (no torchao tensor subclass), no hooks
    (diffusers' layerwise casting and group offload, accelerate's, replace `forward`; torch's are registered)."""
    return (type(m) is nn.Linear and type(m.weight) is nn.Parameter and m.weight.dtype == dtype
            and m.bias is not None and not m._forward_pre_hooks and not m._forward_hooks
            and "forward" not in m.__dict__)


class WanKernelsAttnProcessor:
    """Attention processor for diffusers' `WanAttention` running on the `wan` ops (backend `impl`).

    Setting `_attention_backend` (diffusers' `set_attention_backend`) or `_parallel_config` (its
    `enable_parallelism`) makes it run diffusers' `WanAttnProcessor` with them; setting both back to None
    returns to the kernels. The ops are bound for a device once and again when the inputs move.
    """

    def __init__(self, impl: str = "auto", device: torch.device | str = "cpu"):
        self.impl = impl
        self._backend = self._parallel = None
        self.bind(device)
        self._rebind()

    def bind(self, device) -> None:
        self.device = torch.device(device)
        self.qkv_rope = wan_kernels.resolve("qkv_rope", self.impl, device)
        self.qk_norm_rope = wan_kernels.resolve("qk_norm_rope", self.impl, device)
        self.attention = wan_kernels.resolve("attention", self.impl, device)

    @property
    def _attention_backend(self):
        return self._backend

    @_attention_backend.setter
    def _attention_backend(self, backend) -> None:
        self._backend = backend
        self._rebind()

    @property
    def _parallel_config(self):
        return self._parallel

    @_parallel_config.setter
    def _parallel_config(self, config) -> None:
        if config is not None and self._parallel is None:
            warnings.warn("use_wan_kernels: context parallelism is enabled, attention runs on diffusers' "
                          "WanAttnProcessor (the wan kernels do not split sequences)", stacklevel=2)
        self._parallel = config
        self._rebind()

    def _rebind(self) -> None:
        if self._backend is None and self._parallel is None:
            self._call = self._wan
            return
        stock = WanAttnProcessor()
        stock._attention_backend, stock._parallel_config = self._backend, self._parallel
        self._call = stock

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return self._call(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)

    def _self_qkv(self, attn, x, cos, sin):
        """x [B, S, C] -> q, k, v [B, S, H, D] (RMSNorm'd q, k with RoPE), from the live projection modules."""
        nq, nk, H, eps = attn.norm_q.weight, attn.norm_k.weight, attn.heads, attn.norm_q.eps
        fused = getattr(attn, "fused_projections", False)  # the user ran fuse_qkv_projections(): stock runs to_qkv
        mods = (attn.to_qkv,) if fused else (attn.to_q, attn.to_k, attn.to_v)
        if all(_dense(m, x.dtype) for m in mods):
            w = torch.cat([m.weight for m in mods]) if len(mods) > 1 else mods[0].weight   # [3C, C]
            b = torch.cat([m.bias for m in mods]) if len(mods) > 1 else mods[0].bias
            return self.qkv_rope(x, w, b, nq, nk, cos, sin, H, eps)
        qkv = torch.cat([m(x) for m in mods], dim=-1) if len(mods) > 1 else mods[0](x)   # [B, S, 3C]
        return self.qk_norm_rope(qkv, nq, nk, cos, sin, H, eps)

    def _wan(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if attention_mask is not None:
            raise ValueError("WanKernelsAttnProcessor: attention masks are not supported (Wan uses none), "
                             f"got a mask of shape {tuple(attention_mask.shape)}")
        if hidden_states.device != self.device:  # the model moved after the patch (pipe.to, offloading)
            self.bind(hidden_states.device)
        H = attn.heads
        fused = getattr(attn, "fused_projections", False)
        if encoder_hidden_states is None:  # self-attention: QKV + qk_norm_rope
            if rotary_emb is None:
                raise ValueError("WanKernelsAttnProcessor: self-attention needs rotary_emb")
            cos, sin = rotary_emb  # [1, S, 1, D], each angle repeated for the pair
            cos = cos[0, :, 0, 0::2].float().contiguous()   # [S, D/2]
            sin = sin[0, :, 0, 1::2].float().contiguous()
            q, k, v = self._self_qkv(attn, hidden_states, cos, sin)
            out = self.attention(q, k, v, None, None, None)
        else:  # cross-attention (+ the Wan2.1 I2V image context, first L - 512 tokens)
            k_img = v_img = None
            if attn.add_k_proj is not None:
                n_img = encoder_hidden_states.shape[1] - TEXT_TOKENS
                img, encoder_hidden_states = encoder_hidden_states[:, :n_img], encoder_hidden_states[:, n_img:]
                if fused:
                    k_img, v_img = attn.to_added_kv(img).chunk(2, dim=-1)
                else:
                    k_img, v_img = attn.add_k_proj(img), attn.add_v_proj(img)
                k_img = attn.norm_added_k(k_img).unflatten(2, (H, -1))
                v_img = v_img.unflatten(2, (H, -1))
            if fused:
                k, v = attn.to_kv(encoder_hidden_states).chunk(2, dim=-1)
            else:
                k, v = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
            q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (H, -1))
            k = attn.norm_k(k).unflatten(2, (H, -1))
            out = self.attention(q, k, v.unflatten(2, (H, -1)), k_img, v_img, None)
        out = attn.to_out[0](out.flatten(2))
        return attn.to_out[1](out)


def parallel_degrees(config, cp_plan=None) -> tuple[int, int]:
    """(ulysses_degree, ring_degree) of diffusers' `enable_parallelism(config=..., cp_plan=...)` arguments, for
    `WanModel.enable_parallelism` (wan_model/core/parallel.py). config: a `ContextParallelConfig` or a
    `ParallelConfig` holding one. Its ulysses_anything/ring_anything (any sequence length: ours pads),
    convert_to_fp32 (ours merges in fp32) and rotate_method (ours passes blocks with batch_isend_irecv) need
    nothing; tensor parallelism, a custom `mesh` and a `cp_plan` are clear errors."""
    from diffusers import ContextParallelConfig, ParallelConfig, TensorParallelConfig

    what = "WanModel.enable_parallelism"
    if cp_plan is not None:
        raise ValueError(f"{what}: cp_plan is a plan of diffusers' context-parallel hooks for its own models; a "
                         "WanModel splits its tokens itself (wan_model/core/parallel.py): pass config only")
    if isinstance(config, ParallelConfig):
        if config.tensor_parallel_config is not None:
            config = config.tensor_parallel_config
        elif config.context_parallel_config is None:
            raise ValueError(f"{what}: config is a ParallelConfig without a context_parallel_config")
        else:
            config = config.context_parallel_config
    if isinstance(config, TensorParallelConfig):
        raise ValueError(f"{what}: tensor parallelism (TensorParallelConfig) is not supported; a WanModel splits "
                         "the sequence: pass ContextParallelConfig(ulysses_degree=..., ring_degree=...)")
    if not isinstance(config, ContextParallelConfig):
        raise TypeError(f"{what}: config must be a diffusers ContextParallelConfig or ParallelConfig, "
                        f"got {type(config).__name__}")
    if config.mesh is not None:
        raise ValueError(f"{what}: ContextParallelConfig(mesh=...) is not supported; pass group= (a process "
                         "group of size ulysses_degree * ring_degree) to WanModel.enable_parallelism instead")
    return config.ulysses_degree, config.ring_degree


def _transformers(obj) -> list:
    from wan_model.core.model import WanTransformer

    if isinstance(obj, WanTransformer3DModel):
        return [obj]
    held = [getattr(obj, n, None) for n in ("transformer", "transformer_2")]
    found = [t for t in held if isinstance(t, WanTransformer3DModel)]
    if not found and not any(isinstance(t, WanTransformer) for t in held):
        raise TypeError(f"use_wan_kernels: expected a WanTransformer3DModel or a pipeline holding one, "
                        f"got {type(obj).__name__}")
    return found


def use_wan_kernels(model_or_pipeline, impl: str = "auto"):
    """Patch every Wan transformer of `model_or_pipeline` in place to run on the `wan` ops; returns it.

    Every `WanAttention` gets a `WanKernelsAttnProcessor(impl)`; nothing else changes (see the module
    docstring). A pipeline whose transformer is already our `WanModel` needs no patch and is left alone.
    """
    for transformer in _transformers(model_or_pipeline):
        device = next(transformer.parameters()).device
        for block in transformer.blocks:
            for attn in (block.attn1, block.attn2):
                attn.set_processor(WanKernelsAttnProcessor(impl, device))
    return model_or_pipeline


def to_diffusers_model(model):
    """A diffusers `WanTransformer3DModel` (VACE config: `WanVACETransformer3DModel`) holding the same weights as
    our `WanModel` (same dtypes: the parameters diffusers keeps in fp32 are fp32 in both), in eval mode on the
    same device."""
    from wan_model.compat.layouts import native_to_diffusers

    cfg = {k: v for k, v in model.config.to_diffusers_config().items() if not k.startswith("_")}
    if model.config.has_vace:
        from diffusers import WanVACETransformer3DModel as cls
    else:
        cls = WanTransformer3DModel
    with torch.device("meta"):
        ref = cls(**cfg)
    sd = native_to_diffusers(dict(model.state_dict()), model.config)
    ref.load_state_dict(sd, strict=True, assign=True)
    rope = ref.rope  # non-persistent fp32 RoPE buffers: rebuild them for real
    ref.rope = type(rope)(model.config.attention_head_dim, model.config.patch_size,
                          model.config.rope_max_seq_len).to(model.device)
    return ref.eval()
