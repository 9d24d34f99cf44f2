"""Make an existing diffusers Wan transformer (or a pipeline holding one or two) run on the `wan` ops.

    from wan_model.compat.diffusers import use_wan_kernels
    use_wan_kernels(pipe)            # pipe.transformer (and pipe.transformer_2) now use the kernels

Every diffusers Wan transformer is accepted: `WanTransformer3DModel`, `WanVACETransformer3DModel` (its
`vace_blocks` too), `WanAnimateTransformer3DModel` (its blocks and face adapter) and
`WanAnimate2Transformer3DModel` (its cross-attention and both passes of its self-attention: the generation
pass's flex `BlockMask` becomes two `attention_lse` calls merged), in any pipeline, classic (`WanPipeline`,
`WanVACEPipeline`, ...) or modular (`Wan22ModularPipeline`, ...: `pipe.components`). The variants' own
projections, norms and RoPE tables outside Wan's fused pattern (Animate's per-head face norms, Animate-2's
float64 RoPE) run as diffusers' modules, then the kernels' attention.

Only the attention processors change (no module, weight or hook is added or replaced), so what diffusers
does to a transformer keeps working after the patch, in any order:
- self-attention runs `wan_kernels.qkv_rope` (one GEMM over [to_q | to_k | to_v] concatenated at each call,
  RMSNorm of q, k across heads + RoPE) when the three projections are plain `nn.Linear`s; otherwise (PEFT
  LoRA layers, GGUF / bitsandbytes / torchao weights, diffusers' layerwise-casting or offload hooks) it calls
  the live modules themselves and then `wan_kernels.qk_norm_rope`, so adapters, their scales, fusing and
  unloading take effect as in stock diffusers. The weights are never stored twice.
- attention runs `wan_kernels.attention`, with the Wan2.1 I2V image keys/values as its second
  (independently softmaxed) set; `set_attention_backend(name)` and `enable_parallelism` hand attention back
  to diffusers' own processor of that module (`WanAttnProcessor`, Animate's copy of it in
  transformer_wan_animate, ...) with that backend / parallel config, `reset_attention_backend()` returns it
  to the kernels. `attention="int8"`: self-attention on `wan_kernels.attention_int8` (8-bit, inference only; q
  quantized by `qkv_rope_int8` / `qk_norm_rope_int8`, then `attention_int8_q8`, with the op's channel balance
  folded into the norm weights as WanModel folds it, measured by each self-attention's first call, which runs
  the unfused op: `WanKernelsAttnProcessor._self_attention`); cross-attention stays on `wan_kernels.attention`
  (`WanKernelsAttnProcessor.cross_attention`: why).
- diffusers' cache hooks (FirstBlockCache, MagCache, ...) and group offloading wrap blocks and modules,
  which the patch leaves alone.
Numerics match the unpatched model up to rounding (one rounding instead of several).

Our own `WanModel` as a pipeline's transformer needs no patch, also under sequence parallelism: diffusers'
`transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=U, ring_degree=R))` maps to
`WanModel.enable_parallelism(U, R)` (`parallel_degrees`), and every rank of the pipeline gets the full output.

Any other diffusers transformer that attends without a mask (Flux, LTX-Video without a text mask, ...) reaches the
kernels through diffusers' own attention dispatch: importing this module registers the backends "wan"
(`wan_kernels.attention`) and "wan_int8" (`wan_kernels.attention_int8`, 8-bit, inference only), so
`transformer.set_attention_backend("wan_int8")` works (`register_attention_backends`: how, and what is refused).
"""

from __future__ import annotations

import math
import warnings

import diffusers  # noqa: F401  (its __version__ is checked below)
import torch
import torch.nn as nn

from wan_kernels._versions import check_installed

check_installed("diffusers", "torch")

from diffusers import WanTransformer3DModel  # noqa: E402  (after the version check: older ones fail here)
from diffusers.models.transformers import transformer_wan  # noqa: E402
from diffusers.models.transformers.transformer_wan import WanAttnProcessor  # noqa: E402

import wan_kernels  # noqa: E402
from wan_model.core.balance import balance_of, finish, folded_norms, measure  # noqa: E402

TEXT_TOKENS = 512  # diffusers hard-codes the text context length when splitting the I2V context
ATTENTIONS = ("bf16", "int8")  # wan::attention (in the inputs' dtype) / wan::attention_int8 (8-bit, inference)


def _variant(module: str):
    """diffusers.models.transformers.<module>, or None where this diffusers has no such variant (0.35 has
    neither VACE's nor Animate's module, Animate-2 came in 0.42)."""
    import importlib

    try:
        return importlib.import_module(f"diffusers.models.transformers.{module}")
    except ImportError:
        return None


_VACE, _ANIMATE, _ANIMATE2 = (_variant(m) for m in ("transformer_wan_vace", "transformer_wan_animate",
                                                   "transformer_wan_animate_2"))
# every diffusers Wan transformer class of this diffusers, the base one first
TRANSFORMERS = tuple([WanTransformer3DModel] + [getattr(m, n) for m, n in (
    (_VACE, "WanVACETransformer3DModel"), (_ANIMATE, "WanAnimateTransformer3DModel"),
    (_ANIMATE2, "WanAnimate2Transformer3DModel")) if m is not None])


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

    stock = WanAttnProcessor  # diffusers' processor it hands attention back to (Animate's own copy: see below)

    def __init__(self, impl: str = "auto", device: torch.device | str = "cpu", attention: str = "bf16"):
        if attention not in ATTENTIONS:
            raise ValueError(f"use_wan_kernels: attention must be one of {ATTENTIONS}, got {attention!r}")
        self.impl, self.kind = impl, attention
        self._backend = self._parallel = None
        # attention="int8": the self-attention's channel balance b [C] fp32 (wan_model/core/balance.py), measured
        # by its first call; None until then
        self.balance = None
        self.bind(device)
        self._rebind()

    def bind(self, device) -> None:
        self.device = torch.device(device)
        bf16 = wan_kernels.resolve("attention", self.impl, device)
        if self.kind == "int8":  # pv="auto": fp16 P.V on sm_80/86, fp8 elsewhere (the op's rule)
            int8 = wan_kernels.resolve("attention_int8", self.impl, device)
            self.attention = lambda q, k, v, k_img, v_img, scale: int8(q, k, v, k_img, v_img, scale, "auto")
            self._cross = bf16
            # self-attention: q quantized in the qk_norm_rope kernel, (q8, q_scale, k, v) -> attention_int8_q8
            self.qkv_rope = wan_kernels.resolve("qkv_rope_int8", self.impl, device)
            self.qk_norm_rope = wan_kernels.resolve("qk_norm_rope_int8", self.impl, device)
            q8 = wan_kernels.resolve("attention_int8_q8", self.impl, device)
            self.self_attention = lambda qkv: q8(*qkv, None, None, None, "auto")
            # the first call's bf16 q, k, v (measured for the balance)
            self._dense_qkv_rope = wan_kernels.resolve("qkv_rope", self.impl, device)
            self._dense_qk_norm_rope = wan_kernels.resolve("qk_norm_rope", self.impl, device)
        else:
            self.attention = bf16
            self.qkv_rope = wan_kernels.resolve("qkv_rope", self.impl, device)
            self.qk_norm_rope = wan_kernels.resolve("qk_norm_rope", self.impl, device)
            self.self_attention = lambda qkv: bf16(*qkv, None, None, None)

    @property
    def cross_attention(self):
        """The op of attention over a few keys (text / image / face-motion cross-attention): wan::attention
        whatever `attention` says. In 8 bits the whole query would be quantized for a few hundred keys: more
        traffic than the bf16 kernel's one read of it (wan_model.cost.int8_quantization_share), so int8 is for
        self-attention only (WanModel's default roles too)."""
        return self.attention if self.kind == "bf16" else self._cross

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
        stock = self.stock()
        stock._attention_backend, stock._parallel_config = self._backend, self._parallel
        self._call = stock

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return self._call(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)

    def _self_attention(self, attn, x, cos, sin):
        """Self-attention of x [B, S, C] -> [B, S, H, D]. With attention="int8", its first call measures q and k
        (`balance.measure`, the statistics a WanModel dense step takes) and runs wan::attention_int8 on them, which
        balances its operands itself; every later call gets q quantized by the projection's kernel with that
        balance b folded into the norm weights (w_q b, w_k / b: the same scores, the op's stage 1b without a pass
        over q; wan_model/core/balance.py)."""
        if self.kind == "int8" and self.balance is None:
            q, k, v = self._self_qkv(attn, x, cos, sin, self._dense_qkv_rope, self._dense_qk_norm_rope)
            self.balance = balance_of(finish(measure(q.detach(), k.detach())))
            return self.attention(q, k, v, None, None, None)
        balance = self.balance.to(x.device) if self.kind == "int8" else None
        return self.self_attention(self._self_qkv(attn, x, cos, sin, self.qkv_rope, self.qk_norm_rope, balance))

    def _self_qkv(self, attn, x, cos, sin, qkv_rope, qk_norm_rope, balance=None):
        """x [B, S, C] -> q, k, v [B, S, H, D] (RMSNorm'd q, k with RoPE), from the live projection modules, by
        `qkv_rope` (a plain weight) or `qk_norm_rope`; their int8 forms give (q8, q_scale, k, v), q quantized by
        the same kernel, for `self_attention`. `balance` b [C]: q b and k / b (folded into the norm weights)."""
        nq, nk, H, eps = attn.norm_q.weight, attn.norm_k.weight, attn.heads, attn.norm_q.eps
        if balance is not None:
            nq, nk = folded_norms(nq, nk, balance)
        fused = getattr(attn, "fused_projections", False)  # the user ran fuse_qkv_projections(): stock runs to_qkv
        mods = (attn.to_qkv,) if fused else (attn.to_q, attn.to_k, attn.to_v)
        if all(_dense(m, x.dtype) for m in mods):
            w = torch.cat([m.weight for m in mods]) if len(mods) > 1 else mods[0].weight   # [3C, C]
            b = torch.cat([m.bias for m in mods]) if len(mods) > 1 else mods[0].bias
            return qkv_rope(x, w, b, nq, nk, cos, sin, H, eps)
        qkv = torch.cat([m(x) for m in mods], dim=-1) if len(mods) > 1 else mods[0](x)   # [B, S, 3C]
        return qk_norm_rope(qkv, nq, nk, cos, sin, H, eps)

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
            out = self._self_attention(attn, hidden_states, cos, sin)
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
            out = self.cross_attention(q, k, v.unflatten(2, (H, -1)), k_img, v_img, None)
        out = attn.to_out[0](out.flatten(2))
        return attn.to_out[1](out)


class WanKernelsAnimateAttnProcessor(WanKernelsAttnProcessor):
    """`WanKernelsAttnProcessor` for the blocks of Wan-Animate, which hold transformer_wan_animate's own copy of
    `WanAttention`: it hands back to that module's `WanAttnProcessor` (which dispatches through that module)."""

    stock = getattr(_ANIMATE, "WanAttnProcessor", None)


class WanKernelsFaceAttnProcessor(WanKernelsAttnProcessor):
    """`WanKernelsAttnProcessor` for Wan-Animate's face adapter (`WanAnimateFaceBlockCrossAttention`): each latent
    frame's tokens attend to that frame's N motion tokens. Projections and the per-head q/k RMSNorms run the live
    modules (as diffusers does: adapters, fusing and hooks hold); the attention runs `wan_kernels.attention` with
    the frames as its batch. Hands back to diffusers' `WanAnimateFaceBlockAttnProcessor`."""

    stock = getattr(_ANIMATE, "WanAnimateFaceBlockAttnProcessor", None)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        return self._call(attn, hidden_states, encoder_hidden_states, attention_mask)

    def _wan(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        if hidden_states.device != self.device:
            self.bind(hidden_states.device)
        x = attn.pre_norm_q(hidden_states)                               # [B, S, C]
        m = attn.pre_norm_kv(encoder_hidden_states)                      # [B, T, N, C]: motion tokens per frame
        B, T, N, _ = m.shape
        q, k, v = _ANIMATE._get_qkv_projections(attn, x, m.flatten(1, 2))
        H = attn.heads
        q = attn.norm_q(q.unflatten(2, (H, -1))).unflatten(1, (T, -1)).flatten(0, 1)   # [B*T, S/T, H, D]
        k = attn.norm_k(k.view(B, T, N, H, -1)).flatten(0, 1)                          # [B*T, N, H, D]
        v = v.view(B, T, N, H, -1).flatten(0, 1)
        out = self.cross_attention(q, k, v, None, None, None)
        out = attn.to_out(out.flatten(2).unflatten(0, (B, T)).flatten(1, 2))            # [B, S, C]
        if attention_mask is not None:  # diffusers' face mask is multiplicative, on the output
            out = out * attention_mask.flatten(start_dim=1)
        return out


class WanKernelsAnimate2CrossAttnProcessor(WanKernelsAttnProcessor):
    """`WanKernelsAttnProcessor` for Wan-Animate-2's cross-attention (`WanAnimate2Attention`, is_cross_attention):
    text and CLIP image tokens come as two arguments and are attended as wan::attention's two independently
    softmaxed sets. Hands back to diffusers' `WanAnimate2CrossAttnProcessor`."""

    stock = getattr(_ANIMATE2, "WanAnimate2CrossAttnProcessor", None)

    def __call__(self, attn, hidden_states, encoder_hidden_states, encoder_hidden_states_image=None):
        return self._call(attn, hidden_states, encoder_hidden_states, encoder_hidden_states_image)

    def _wan(self, attn, hidden_states, encoder_hidden_states, encoder_hidden_states_image=None):
        if hidden_states.device != self.device:
            self.bind(hidden_states.device)
        H = attn.heads
        q, k, v = _ANIMATE2._get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        q = attn.norm_q(q).unflatten(2, (H, -1))
        k = attn.norm_k(k).unflatten(2, (H, -1))
        k_img = v_img = None
        if encoder_hidden_states_image is not None:
            k_img, v_img = _ANIMATE2._get_added_kv_projections(attn, encoder_hidden_states_image)
            k_img, v_img = attn.norm_added_k(k_img).unflatten(2, (H, -1)), v_img.unflatten(2, (H, -1))
        out = self.cross_attention(q, k, v.unflatten(2, (H, -1)), k_img, v_img, None)
        out = attn.to_out[0](out.flatten(2))
        return attn.to_out[1](out)


def _merge(out, lse, out_b, lse_b):
    """Two softmax attentions over disjoint key sets -> the one over their union (wan::attention_lse's formula):
    out [B, S, H, D] fp32, lse [B, H, S] fp32 each."""
    w = torch.sigmoid(lse_b - lse).transpose(1, 2).unsqueeze(-1)              # [B, S, H, 1]
    return out - w * (out - out_b), lse - nn.functional.logsigmoid(lse - lse_b)


def _with_zero_keys(out, lse, n: int):
    """`out`, `lse` of a key set joined by `n` all-zero keys with all-zero values (a packed buffer's empty slots,
    which diffusers' mask leaves visible): each scores exactly 0, so they add n to the softmax's denominator."""
    if n == 0:
        return out, lse
    return _merge(out, lse, torch.zeros_like(out), torch.full_like(lse, math.log(n)))


class WanKernelsAnimate2AttnProcessor(WanKernelsAttnProcessor):
    """`WanKernelsAttnProcessor` for Wan-Animate-2's self-attention (`WanAnimate2Attention`). Projections, q/k
    RMSNorm, the K/V cache and RoPE (float64, reference offsets) run diffusers' own code; the attention runs on the
    kernels:
    - reference pass (kv_cache_mode="extract"): dense, `wan_kernels.attention`;
    - generation pass ("cached"): diffusers packs [generation | reference] into a buffer sized for the full video
      and attends through a flex `BlockMask`: each generation frame f sees every generation slot and the slots of
      reference frame f - 1, empty slots (zero keys and values) included. The same softmax here: one
      `wan_kernels.attention_lse` over the generation tokens, one over each frame's reference tokens (the frames
      as the batch), the empty slots counted in closed form, merged by their log-sum-exps in fp32.
    Hands back to diffusers' `WanAnimate2AttnProcessor` (which runs the generation pass on its flex backend)."""

    stock = getattr(_ANIMATE2, "WanAnimate2AttnProcessor", None)

    def bind(self, device) -> None:
        super().bind(device)
        if self.kind == "int8":
            int8 = wan_kernels.resolve("attention_int8_lse", self.impl, device)
            self.attention_lse = lambda q, k, v, scale: int8(q, k, v, scale, "auto")
        else:  # attention_lse has no C++ CUDA kernel: impl="cuda" takes its auto route (Triton on GPUs)
            self.attention_lse = wan_kernels.resolve("attention_lse", "auto" if self.impl == "cuda" else self.impl,
                                                     device)

    def __call__(self, attn, hidden_states, rotary_emb, grid_sizes, kv_cache, kv_cache_mode, rope_stride=1,
                 reference_rotary_emb=None, reference_grid_sizes=None, reference_rope_stride=1, attention_mask=None,
                 origin_latent_frames=None, origin_latent_hw=None):
        return self._call(attn, hidden_states, rotary_emb, grid_sizes, kv_cache, kv_cache_mode, rope_stride,
                          reference_rotary_emb, reference_grid_sizes, reference_rope_stride, attention_mask,
                          origin_latent_frames, origin_latent_hw)

    def _wan(self, attn, hidden_states, rotary_emb, grid_sizes, kv_cache, kv_cache_mode, rope_stride=1,
             reference_rotary_emb=None, reference_grid_sizes=None, reference_rope_stride=1, attention_mask=None,
             origin_latent_frames=None, origin_latent_hw=None):
        if kv_cache_mode not in ("extract", "cached"):
            raise ValueError(f"`kv_cache_mode` must be either 'extract' or 'cached', got {kv_cache_mode}.")
        if hidden_states.device != self.device:
            self.bind(hidden_states.device)
        H, rope = attn.heads, _ANIMATE2.rope_apply
        q, k, v = _ANIMATE2._get_qkv_projections(attn, hidden_states, None)
        q, k, v = (attn.norm_q(q).unflatten(2, (H, -1)), attn.norm_k(k).unflatten(2, (H, -1)),
                   v.unflatten(2, (H, -1)))                                     # [B, S, H, D]
        if kv_cache_mode == "extract":
            kv_cache.store(k, v)
        q = rope(q, grid_sizes, rotary_emb, rope_stride).type_as(v)
        k = rope(k, grid_sizes, rotary_emb, rope_stride).type_as(v)
        if kv_cache_mode == "extract":
            out = self.attention(q, k, v, None, None, None)
        else:
            k_ref, v_ref = kv_cache.get()
            k_ref = rope(k_ref, reference_grid_sizes, reference_rotary_emb, reference_rope_stride).type_as(v)
            out = self._generation(q, k, v, k_ref, v_ref, grid_sizes, reference_grid_sizes, origin_latent_frames,
                                   origin_latent_hw)
        out = attn.to_out[0](out.flatten(2))
        return attn.to_out[1](out)

    def _generation(self, q, k, v, k_ref, v_ref, grid_sizes, reference_grid_sizes, frames_full, hw_full):
        """diffusers' masked softmax of the generation pass: q, k, v [B, S, H, D] (S = F h w generation tokens),
        k_ref, v_ref [B, S_ref, H, D] (F_ref h' w' reference tokens); the buffer holds frames_full + 1 generation
        and frames_full reference frames of hw_full slots each."""
        F, h, w = grid_sizes[0].tolist()
        F_ref, h_ref, w_ref = reference_grid_sizes[0].tolist()
        hw, hw_ref = h * w, h_ref * w_ref
        B, S, H, D = q.shape
        if S != F * hw or F > frames_full + 1 or hw > hw_full or hw_ref > hw_full:
            raise ValueError(f"WanKernelsAnimate2AttnProcessor: {S} generation tokens of grid {(F, h, w)} do not "
                             f"fit the {frames_full + 1} x {hw_full} buffer of the block mask")
        out, lse = self.attention_lse(q, k, v, None)
        out, lse = _with_zero_keys(out.float(), lse.float(), (frames_full + 1) * hw_full - S)
        if F == 1:  # frame 0 attends no reference frame
            return out.to(q.dtype)
        n = min(F - 1, F_ref)  # generation frames 1..n see reference frames 0..n-1, with tokens; later ones only zeros
        q_ref = q[:, hw:(n + 1) * hw].reshape(B * n, hw, H, D)
        o_r, l_r = self.attention_lse(q_ref, k_ref[:, :n * hw_ref].reshape(B * n, hw_ref, H, D),
                                      v_ref[:, :n * hw_ref].reshape(B * n, hw_ref, H, D), None)
        o_r, l_r = _with_zero_keys(o_r.float(), l_r.float(), hw_full - hw_ref)
        o_r = o_r.reshape(B, n * hw, H, D)
        l_r = l_r.reshape(B, n, H, hw).transpose(1, 2).flatten(2)                     # [B, H, n hw]
        if n < F - 1:  # reference frames beyond F_ref: hw_full empty slots each
            rest = (F - 1 - n) * hw
            o_r = torch.cat([o_r, o_r.new_zeros(B, rest, H, D)], dim=1)
            l_r = torch.cat([l_r, l_r.new_full((B, H, rest), math.log(hw_full))], dim=2)
        o_m, _ = _merge(out[:, hw:], lse[..., hw:], o_r, l_r)
        return torch.cat([out[:, :hw], o_m], dim=1).to(q.dtype)


def _processor_class(attn: nn.Module):
    """The kernels' processor class for one diffusers attention module, None for any other module."""
    if type(attn) is transformer_wan.WanAttention:
        return WanKernelsAttnProcessor
    if _ANIMATE is not None and type(attn) is _ANIMATE.WanAttention:
        return WanKernelsAnimateAttnProcessor
    if _ANIMATE is not None and type(attn) is _ANIMATE.WanAnimateFaceBlockCrossAttention:
        return WanKernelsFaceAttnProcessor
    if _ANIMATE2 is not None and type(attn) is _ANIMATE2.WanAnimate2Attention:
        return WanKernelsAnimate2CrossAttnProcessor if attn.is_cross_attention else WanKernelsAnimate2AttnProcessor
    return None


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
    """The diffusers Wan transformers `obj` is or holds: `transformer` and `transformer_2` (every Wan pipeline,
    classic or modular, names them so), else those among its `components` (a dict in classic and modular
    pipelines), each once."""
    from wan_model.core.model import WanTransformer

    if isinstance(obj, TRANSFORMERS):
        return [obj]
    held = [getattr(obj, n, None) for n in ("transformer", "transformer_2")]
    if not any(isinstance(t, TRANSFORMERS) for t in held):
        try:
            components = getattr(obj, "components", None)
        except ValueError:  # a classic pipeline whose modules disagree with its signature: none to search
            components = None
        if isinstance(components, dict):
            held += list(components.values())
    found = []
    for t in held:
        if isinstance(t, TRANSFORMERS) and not any(t is f for f in found):
            found.append(t)
    if not found and not any(isinstance(t, WanTransformer) for t in held):
        raise TypeError(f"use_wan_kernels: expected a WanTransformer3DModel or a pipeline holding one (or another "
                        f"diffusers Wan transformer: {', '.join(c.__name__ for c in TRANSFORMERS[1:])}), "
                        f"got {type(obj).__name__}")
    return found


def use_wan_kernels(model_or_pipeline, impl: str = "auto", attention: str = "bf16"):
    """Patch every Wan transformer of `model_or_pipeline` in place to run on the `wan` ops; returns it.

    Every Wan attention module (`_processor_class`) gets a kernels processor (`impl`: the backend; `attention`:
    "bf16" = wan::attention in the inputs' dtype, "int8" = wan::attention_int8, 8-bit, inference only); nothing
    else changes (see the module docstring). A pipeline whose transformer is already our `WanModel` needs no
    patch and is left alone.
    """
    if attention not in ATTENTIONS:
        raise ValueError(f"use_wan_kernels: attention must be one of {ATTENTIONS}, got {attention!r}")
    for transformer in _transformers(model_or_pipeline):
        device = next(transformer.parameters()).device
        for module in transformer.modules():
            cls = _processor_class(module)
            if cls is not None:
                module.set_processor(cls(impl, device, attention))
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


# ---------------------------------------------------------------------------------------------
# The kernels as diffusers attention-dispatch backends, for any diffusers transformer

from diffusers.models import attention_dispatch  # noqa: E402

# backend name -> (wan op, what the messages call it); AttentionBackendName's value == the name
BACKENDS = {"wan": ("attention", "wan::attention"), "wan_int8": ("attention_int8", "wan::attention_int8")}


def _backend_name(value: str):
    """diffusers' `AttentionBackendName` member with this value, added to the enum if it has none.

    diffusers (checked: 0.42.1) has no API for a third-party backend: `set_attention_backend(name)` accepts only the
    values of its closed `AttentionBackendName` enum. The member is built as `enum` builds the class's own (name,
    value, sort order, the three lookup tables and the class attribute); no existing member, function or file of
    diffusers changes."""
    names = attention_dispatch.AttentionBackendName
    member = names._value2member_map_.get(value)
    if member is not None:
        return member
    member = str.__new__(names, value)
    member._name_, member._value_, member.__objclass__ = value.upper(), value, names
    member._sort_order_ = len(names._member_names_)
    type.__setattr__(names, member._name_, member)  # EnumType.__setattr__ refuses only existing members' names
    names._member_names_.append(member._name_)
    names._member_map_[member._name_] = member
    names._value2member_map_[value] = member
    return member


def _refuse(name: str, dropout_p, is_causal, return_lse, parallel_config) -> None:
    """What the wan kernels do not compute, as diffusers' own backends refuse it (ValueError naming the argument,
    as its flash / sage backends do for attn_mask; masks: `_key_masks`): never a silent fallback."""
    what = f"diffusers attention backend {name!r} ({BACKENDS[name][1]})"
    if is_causal:
        raise ValueError(f"{what}: is_causal=True is not supported (non-causal attention only)")
    if dropout_p:
        raise ValueError(f"{what}: dropout_p={dropout_p} is not supported (no attention dropout)")
    if return_lse:
        raise ValueError(f"{what}: return_lse=True is not supported")
    if parallel_config is not None:
        raise ValueError(f"{what}: context parallelism (_parallel_config) is not supported")


def _gqa(name: str, query, key, value, enable_gqa: bool):
    """key, value with query's heads: with enable_gqa, each of Hk key heads serves Hq / Hk query heads in a row
    (torch SDPA's grouping), repeated here; without it unequal heads are the op's shape error."""
    Hq, Hk = query.shape[2], key.shape[2]
    if not enable_gqa or Hq == Hk:
        return key, value
    if Hq % Hk:
        raise ValueError(f"diffusers attention backend {name!r}: enable_gqa needs query heads ({Hq}) to be a "
                         f"multiple of key heads ({Hk}), got query {tuple(query.shape)}, key {tuple(key.shape)}")
    return key.repeat_interleave(Hq // Hk, dim=2), value.repeat_interleave(Hq // Hk, dim=2)


MASKED = -1e4  # an additive mask entry at or below this is a masked key (diffusers' LTX writes -10000: the weight
               # exp(s - 10000 - max) is 0 in fp32); 0 attends; anything else is a bias the kernels do not add


def _key_masks(name: str, query, key, attn_mask):
    """The keys each batch element attends to, [B, Sk] bool, or None when every key is attended: attn_mask in
    SDPA's layout (broadcastable to [B, H, Sq, Sk]; bool True = attend, or additive 0 / <= MASKED / -inf), which
    must be the same for every head and query of a batch element (a key-padding mask: diffusers' LTX-Video makes
    [B, H, 1, Sk], HunyuanVideo [B, 1, 1, Sk]). Anything else is a one-line ValueError quoting the mask."""
    if attn_mask is None:
        return None
    what = f"diffusers attention backend {name!r} ({BACKENDS[name][1]}): attn_mask of shape {tuple(attn_mask.shape)}"
    B, Sq, H, _ = query.shape
    full = (B, H, Sq, key.shape[1])
    m = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)) if attn_mask.dim() <= 4 else None
    try:
        fits = m is not None and torch.broadcast_shapes(m.shape, full) == full
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"{what} does not broadcast to [B, H, Sq, Sk] = {full}")
    if attn_mask.dtype == torch.bool:
        keep = m
    else:
        keep, drop = m == 0, m <= MASKED
        if not bool((keep | drop).all()):
            bad = m[~(keep | drop)].flatten()[0].item()
            raise ValueError(f"{what}: an additive mask must be 0 (attend) or <= {MASKED:g} (masked), got {bad:g} "
                             "(a bias the kernels do not add); use the 'native' backend")
    # checked on the mask as given (its broadcast dimensions are 1): never on the [B, H, Sq, Sk] expansion
    if not torch.equal(keep, keep[:, :1, :1, :].expand(keep.shape)):
        raise ValueError(f"{what} differs between heads or queries (only a key mask, the same keys for every query "
                         "of a batch element, is supported); use the 'native' backend")
    row = keep[:, 0, 0, :].expand(B, full[3])
    if not bool(row.any(-1).all()):
        raise ValueError(f"{what} masks every key of batch element {int((~row.any(-1)).nonzero()[0])} (no softmax "
                         "to take)")
    return None if bool(row.all()) else row


def _attend(op, key_masks, query, key, value, *args):
    """The op over every batch element's attended keys: one call when nothing is masked, else one call per batch
    element on its own keys (the masked keys' weights are exactly 0: leaving them out is the same softmax)."""
    if key_masks is None:
        return op(query, key, value, None, None, *args)
    return torch.cat([op(query[b:b + 1], key[b:b + 1, keep], value[b:b + 1, keep], None, None, *args)
                      for b, keep in enumerate(key_masks)])


def _wan_attention(query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
                   scale: float | None = None, enable_gqa: bool = False, return_lse: bool = False,
                   _parallel_config=None):
    """Backend "wan": `wan_kernels.attention` (in the inputs' dtype; trainable). query [B, Sq, H, D], key/value
    [B, Sk, H(k), D/Dv] (diffusers' layout, as ours) -> [B, Sq, H, Dv]."""
    _refuse("wan", dropout_p, is_causal, return_lse, _parallel_config)
    key, value = _gqa("wan", query, key, value, enable_gqa)
    return _attend(wan_kernels.resolve(BACKENDS["wan"][0], "auto", query.device),
                   _key_masks("wan", query, key, attn_mask), query, key, value, scale)


def _wan_int8_attention(query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
                        scale: float | None = None, enable_gqa: bool = False, return_lse: bool = False,
                        _parallel_config=None):
    """Backend "wan_int8": `wan_kernels.attention_int8` (8-bit, pv="auto"; inference only: an input that requires
    grad in grad mode is the op's RuntimeError naming `wan_kernels.attention`, the "wan" backend's op). Layout as
    `_wan_attention`."""
    _refuse("wan_int8", dropout_p, is_causal, return_lse, _parallel_config)
    key, value = _gqa("wan_int8", query, key, value, enable_gqa)
    return _attend(wan_kernels.resolve(BACKENDS["wan_int8"][0], "auto", query.device),
                   _key_masks("wan_int8", query, key, attn_mask), query, key, value, scale, "auto")


def register_attention_backends() -> tuple:
    """Register "wan" and "wan_int8" with diffusers' attention dispatcher (idempotent; this module runs it at
    import, as diffusers registers its own backends when attention_dispatch is imported), so that any diffusers
    model whose processors dispatch (Flux, LTX-Video, Wan, ...) runs on the kernels with
    `model.set_attention_backend("wan_int8")` or `with attention_backend("wan_int8"):`. Returns the two
    `AttentionBackendName` members (`_backend_name`: how a name joins diffusers' closed enum).

    A key mask (the same attended keys for every head and query of a batch element: LTX-Video's text mask,
    HunyuanVideo's) runs each batch element on its own keys (`_key_masks`, `_attend`). Arguments the kernels do not
    compute (other masks, is_causal, dropout_p > 0, return_lse, a parallel config) are a one-line ValueError naming
    the argument, as diffusers' flash and sage backends refuse attn_mask: no silent fallback to another backend, so
    a model running is a model on the kernels. enable_gqa repeats the key heads. A mask's keys are data: a compiled
    model with a mask breaks its graph there (fullgraph refuses it).
    Neither backend is registered as context-parallel capable, so diffusers refuses `enable_parallelism` with them.
    Limits (diffusers', any backend): `set_attention_backend` also sets diffusers' process-wide active backend,
    which `reset_attention_backend` leaves (diffusers #14249); the DIFFUSERS_ATTN_BACKEND environment variable cannot
    name ours (diffusers reads it at its import, before the names exist)."""
    registry = attention_dispatch._AttentionBackendRegistry
    members = []
    for name, fn in (("wan", _wan_attention), ("wan_int8", _wan_int8_attention)):
        member = _backend_name(name)
        if registry._backends.get(member) not in (None, fn):
            warnings.warn(f"diffusers already has an attention backend {name!r}: left as it is", stacklevel=2)
        else:
            registry.register(member)(fn)
        members.append(member)
    return tuple(members)


register_attention_backends()
