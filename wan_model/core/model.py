"""WanTransformer: the pure Wan2.1/2.2 DiT built from the `wan` ops (REFERENCE.md section 4 is the spec). It imports
torch, wan_kernels and the core layer only; the public `wan_model.WanModel` (wan_model/model.py) adds checkpoints,
LoRA, quantization and diffusers' spellings on top of it.

Numerics follow diffusers' `WanTransformer3DModel` (>= 0.35): fp32 LayerNorm/modulation math, bf16
activations between ops when the weights are bf16 (which parameters stay fp32 is the caller's choice:
`to_dtype(dtype, keep_fp32)`; WanModel keeps diffusers' fp32 modules, wan_model.compat.spellings).
Differences by design: the self-attention QKV projection is one GEMM over the fused
[3C, C] weight followed by `wan_kernels.qkv_rope` (RMSNorm + RoPE, one rounding instead of two),
and the I2V text and image attention outputs are summed in fp32 by `wan_kernels.attention`.

`WanModel.quantize("nvfp4")` (wan_model/compat/quantize.py) turns the Linear layers of the blocks into NVFP4Linear; the
self-attention then runs the NVFP4 QKV GEMM followed by `wan_kernels.qk_norm_rope`.

Cross-attention K/V depend only on the text/image context: `prepare_context` computes them for all
layers with one GEMM per context (the layers' K/V weights are stored stacked) and `forward(...,
context=ctx)` reuses them at every denoising step.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import wan_kernels  # noqa: F401  (registers the wan ops)
from wan_model.core.balance import balance_of, finish, folded_norms, measure, merge, real_rows
from wan_model.core.config import WanConfig
from wan_model.core.offload import on_host
from wan_model.core.parallel import disable, enable, local_attention
from wan_model.core.rope import rope_tables

@dataclasses.dataclass
class WanContext:
    """Cross-attention keys/values of every layer for one text (+ image) context.

    k[i], v[i]: [B, L_txt, H, D]; k_img[i], v_img[i]: [B, L_img, H, D] (I2V/FLF2V) or None.
    A VACE model's lists go on past its num_layers blocks: entry num_layers + j is VACE block j's.
    dtype: dtype of the text input (diffusers casts temb to it).
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    k_img: list[torch.Tensor] | None
    v_img: list[torch.Tensor] | None
    dtype: torch.dtype

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    def layer(self, i: int):
        """(k, v, k_img, v_img) of layer i."""
        if self.k_img is None:
            return self.k[i], self.v[i], None, None
        return self.k[i], self.v[i], self.k_img[i], self.v_img[i]


@dataclasses.dataclass(frozen=True)
class _Ops:
    """The `wan` op callables bound once for an impl and device (no backend choice in forward)."""

    qkv_rope: object
    qk_norm_rope: object
    attention: object
    layer_norm_modulate: object
    gated_residual: object
    # bound only for a model that runs 8-bit attention (`set_attention`): the op, and the fused path of its
    # single-process self-attention (q quantized in the qk_norm_rope kernel, then attention_int8_q8)
    attention_int8: object = None
    attention_int8_q8: object = None
    qkv_rope_int8: object = None
    qk_norm_rope_int8: object = None


INT8_OPS = ("attention_int8", "attention_int8_q8", "qkv_rope_int8", "qk_norm_rope_int8")


def bind_ops(impl: str, device: torch.device | str, int8: bool = False) -> _Ops:
    """Bind the backends of the ops the model calls, for `impl` on `device` (`wan_kernels.routing.bind`: under
    impl="auto" the bare dispatcher ops, no Python wrapper per call); `int8`: the 8-bit attention's ops too,
    `INT8_OPS` (a named backend that cannot run them, e.g. impl="cpu", raises BackendUnavailableError here)."""
    from wan_kernels.routing import bind

    return _Ops(**{f.name: bind(f.name, impl, device) for f in dataclasses.fields(_Ops)
                   if int8 or f.name not in INT8_OPS})


# ---------------------------------------------------------------------------------------------
# Attention per role (self / text cross / image cross), chosen at configuration time (`set_attention`): each
# block holds plain functions `attn1.attend(q, k, v, ops)` and `attn2.attend(q, k, v, k_img, v_img, ops)`.

ATTENTIONS = ("bf16", "int8")   # wan::attention (the op's input dtype, bf16 in practice) / wan::attention_int8
ROLES = ("self", "text", "image")
# int8 by default for self-attention only: the query is quantized whole in every role, so a cross-attention call
# (512 text + 257 image keys) pays a self-attention's quantization for ~2 % of its work, and its bf16 kernel is
# memory-bound on that same query anyway (wan_model.cost.int8_quantization_share: ~48 % of its 8-bit time on
# H100 / B200, against 6 % for self-attention at 480p).
INT8_ROLES = ("self",)


def cross_attention(q, k, v, k_img, v_img, ops):
    """Text (+ image) cross-attention on wan::attention: the two sets summed in fp32, rounded once."""
    return ops.attention(q, k, v, k_img, v_img, None)


def self_attention_int8(q, k, v, ops, pv: str = "auto"):
    """q: (q8, q_scale), quantized where it was made (`qkv_fused_dense_int8`, `qkv_module_then_norm_rope_int8`)."""
    q8, q_scale = q
    return ops.attention_int8_q8(q8, q_scale, k, v, None, None, None, pv)


def cross_attention_int8(q, k, v, k_img, v_img, ops, pv: str = "auto"):
    return ops.attention_int8(q, k, v, k_img, v_img, None, pv)


def cross_attention_split(q, k, v, k_img, v_img, ops, text=cross_attention, image=cross_attention):
    """Text and image sets at different precisions: one call each (`text`, `image`), summed in fp32, rounded once
    (as one call of either op sums them)."""
    o = text(q, k, v, None, None, ops)
    if k_img is None:
        return o
    return (o.float() + image(q, k_img, v_img, None, None, ops).float()).to(q.dtype)


def attention_fns(int8_roles, pv: str = "auto"):
    """(self attend, cross attend, the self-attention's int8 P.V precision or None) of one block whose roles in
    `int8_roles` run wan::attention_int8 (the third: what the sequence-parallel self-attention is bound with)."""
    self_int8 = "self" in int8_roles
    self_fn = functools.partial(self_attention_int8, pv=pv) if self_int8 else local_attention
    int8_cross = functools.partial(cross_attention_int8, pv=pv)
    text, image = "text" in int8_roles, "image" in int8_roles
    if text == image:  # one call for both sets
        return self_fn, int8_cross if text else cross_attention, pv if self_int8 else None
    return self_fn, functools.partial(cross_attention_split, text=int8_cross if text else cross_attention,
                                      image=int8_cross if image else cross_attention), pv if self_int8 else None


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """The model's attention (`WanTransformer.set_attention`): kind "bf16" | "int8", the roles running int8,
    the layers kept dense (wan::attention) at every step, the P.V precision of the int8 op."""
    kind: str = "bf16"
    roles: tuple[str, ...] = ROLES
    dense_layers: tuple[int, ...] = (0,)
    pv: str = "auto"


def _layer_norm32(x: torch.Tensor, weight=None, bias=None, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm in fp32 (diffusers' FP32LayerNorm); returns fp32."""
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    return F.layer_norm(x.float(), (x.shape[-1],), w, b, eps)


class TimeTextImageEmbedding(nn.Module):
    """Timestep sinusoid + MLP, text projection and (I2V) CLIP image projection."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        C = cfg.dim
        self.freq_dim = cfg.freq_dim
        self.time_embedder = nn.ModuleDict({"linear_1": nn.Linear(cfg.freq_dim, C), "linear_2": nn.Linear(C, C)})
        self.time_proj = nn.Linear(C, 6 * C)
        self.text_embedder = nn.ModuleDict({"linear_1": nn.Linear(cfg.text_dim, C), "linear_2": nn.Linear(C, C)})
        self.image_embedder = ImageEmbedding(cfg) if cfg.has_image else None

    def sinusoid(self, t: torch.Tensor) -> torch.Tensor:
        """t: [N] -> [N, freq_dim] fp32, [cos | sin], freq_i = exp(-ln(1e4) * i / half)."""
        half = self.freq_dim // 2
        exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        arg = t[:, None].float() * torch.exp(exponent)[None, :]                 # [N, half]
        return torch.cat((torch.cos(arg), torch.sin(arg)), dim=-1)

    def time_mlp(self, t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """t: [N] -> temb [N, C] in `dtype`, temb_proj [N, 6, C]."""
        lin1, lin2 = self.time_embedder["linear_1"], self.time_embedder["linear_2"]
        e = self.sinusoid(t).to(lin1.weight.dtype)
        temb = lin2(F.silu(lin1(e))).to(dtype)                                   # [N, C]
        proj = self.time_proj(F.silu(temb))                                      # [N, 6C]
        return temb, proj.unflatten(-1, (6, -1))

    def time(self, timestep: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """timestep [B] or per token [B, S] -> temb [B, 1|S, C], temb_proj [B, 1|S, 6, C].

        Per-token timesteps hold only a few distinct values: the MLP runs on the unique ones and the
        result is gathered (under torch.compile, which cannot trace the data-dependent unique, it runs
        per token; the values agree).
        """
        if timestep.ndim == 1:
            temb, proj = self.time_mlp(timestep, dtype)
            return temb[:, None], proj[:, None]
        if torch.compiler.is_compiling():
            temb, proj = self.time_mlp(timestep.flatten(), dtype)
            return temb.unflatten(0, timestep.shape), proj.unflatten(0, timestep.shape)
        uniq, inverse = torch.unique(timestep, return_inverse=True)              # [U], [B, S]
        temb, proj = self.time_mlp(uniq, dtype)
        return temb[inverse], proj[inverse]

    def text(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, text_dim] -> [B, L, C] (Linear, GELU-tanh, Linear)."""
        lin1, lin2 = self.text_embedder["linear_1"], self.text_embedder["linear_2"]
        return lin2(F.gelu(lin1(x), approximate="tanh"))


class ImageEmbedding(nn.Module):
    """CLIP image tokens -> model width: (+pos_embed) LN32 -> Linear -> GELU -> Linear -> LN32."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        d_in, C = cfg.image_dim, cfg.dim
        self.norm1 = nn.LayerNorm(d_in, eps=1e-5)
        self.ff = nn.ModuleDict({"proj_in": nn.Linear(d_in, d_in), "proj_out": nn.Linear(d_in, C)})
        self.norm2 = nn.LayerNorm(C, eps=1e-5)
        self.pos_embed = (nn.Parameter(torch.zeros(1, cfg.pos_embed_seq_len, d_in))
                          if cfg.pos_embed_seq_len is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is not None:  # FLF2V: [2B, 257, d] (first, last frame) -> [B, 514, d]
            x = x.reshape(-1, 2 * x.shape[1], x.shape[2]) + self.pos_embed
        dtype = x.dtype
        x = _layer_norm32(x, self.norm1.weight, self.norm1.bias, 1e-5).to(dtype)
        x = self.ff["proj_out"](F.gelu(self.ff["proj_in"](x)))
        return _layer_norm32(x, self.norm2.weight, self.norm2.bias, 1e-5).to(x.dtype)


def qkv_fused_dense(a: "SelfAttention", n, rope_cos, rope_sin, num_heads: int, eps: float, ops: _Ops):
    """Dense [3C, C] weight: one `qkv_rope` op (GEMM + RMSNorm + RoPE). Returns q, k, v [B, S, H, D]."""
    return ops.qkv_rope(n, a.to_qkv.weight, a.to_qkv.bias, a.norm_q, a.norm_k, rope_cos, rope_sin, num_heads, eps)


def qkv_module_then_norm_rope(a: "SelfAttention", n, rope_cos, rope_sin, num_heads: int, eps: float, ops: _Ops):
    """Any projection module (e.g. NVFP4Linear): qkv = to_qkv(n) [B, S, 3C], then `qk_norm_rope`."""
    return ops.qk_norm_rope(a.to_qkv(n), a.norm_q, a.norm_k, rope_cos, rope_sin, num_heads, eps)


def qkv_fused_dense_int8(a: "SelfAttention", n, rope_cos, rope_sin, num_heads: int, eps: float, ops: _Ops):
    """`qkv_fused_dense` for 8-bit self-attention: `qkv_rope_int8` quantizes q in the qk_norm_rope kernel, with the
    channel balance folded into the norm weights (wan_model/core/balance.py). Returns ((q8, q_scale), k / b, v)."""
    norm_q, norm_k = folded_norms(a.norm_q, a.norm_k, a.balance)
    q8, q_scale, k, v = ops.qkv_rope_int8(n, a.to_qkv.weight, a.to_qkv.bias, norm_q, norm_k, rope_cos, rope_sin,
                                          num_heads, eps)
    return (q8, q_scale), k, v


def qkv_module_then_norm_rope_int8(a: "SelfAttention", n, rope_cos, rope_sin, num_heads: int, eps: float,
                                   ops: _Ops):
    """`qkv_module_then_norm_rope` for 8-bit self-attention (`qk_norm_rope_int8`, the balance folded in as in
    `qkv_fused_dense_int8`). Returns ((q8, q_scale), k / b, v)."""
    norm_q, norm_k = folded_norms(a.norm_q, a.norm_k, a.balance)
    q8, q_scale, k, v = ops.qk_norm_rope_int8(a.to_qkv(n), norm_q, norm_k, rope_cos, rope_sin, num_heads, eps)
    return (q8, q_scale), k, v


def measuring(project):
    """`project` (a bf16-form projection) that also records its q's and k's partial channel statistics over its
    tokens as `a.measured` (`balance.measure`, sequence parallelism's padding rows excluded by `real_rows`; a plain
    attribute, not a buffer: block offload streams buffers in and never back): a dense
    step's projection in a block whose self-attention is 8-bit."""
    def measured(a: "SelfAttention", n, rope_cos, rope_sin, num_heads: int, eps: float, ops: _Ops):
        q, k, v = project(a, n, rope_cos, rope_sin, num_heads, eps, ops)
        a.measured = measure(q.detach(), k.detach(), real_rows(rope_cos, rope_sin))
        return q, k, v

    measured.__name__ = measured.__qualname__ = f"{project.__name__}_measured"
    return measured


# The projection of an 8-bit self-attention, per projection kind: q quantized in the kernel that makes it; and
# the form a dense step runs in such a block (its statistics recorded for the balance).
INT8_PROJECTIONS = {qkv_fused_dense: qkv_fused_dense_int8, qkv_module_then_norm_rope: qkv_module_then_norm_rope_int8}
MEASURING_PROJECTIONS = {base: measuring(base) for base in INT8_PROJECTIONS}
_BASE_PROJECTIONS = {**{v: k for k, v in INT8_PROJECTIONS.items()}, **{v: k for k, v in MEASURING_PROJECTIONS.items()}}


def base_projection(fn):
    """The projection kind behind `fn` (its bf16 form)."""
    return _BASE_PROJECTIONS.get(fn, fn)


class SelfAttention(nn.Module):
    """`project_qkv` is chosen at construction (dense: `qkv_fused_dense`) and rebound by
    `WanModel.quantize` (`qkv_module_then_norm_rope`): forward never branches on the weight type.
    `attend` likewise: `local_attention`, rebound by `enable_parallelism` (wan_model/core/parallel.py). An 8-bit
    self-attention (`WanTransformer.dense_attention`) binds the pair together: the projection's int8 form
    (`INT8_PROJECTIONS`: q quantized in the qk_norm_rope kernel) and `self_attention_int8`."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        C = cfg.dim
        self.to_qkv = nn.Linear(C, 3 * C)            # rows: to_q | to_k | to_v
        self.norm_q = nn.Parameter(torch.ones(C))
        self.norm_k = nn.Parameter(torch.ones(C))
        self.to_out = nn.Linear(C, C)
        self.project_qkv = qkv_fused_dense            # a plain function (deepcopy/compile friendly)
        self.attend = local_attention                 # (q, k, v, ops) -> [B, S, H, Dv]
        # the 8-bit self-attention's channel balance (wan_model/core/balance.py): b [C], 1 until a dense step has
        # measured q and k (`measured`: their statistics [4, C] until folded); not saved with the weights
        self.register_buffer("balance", torch.ones(C), persistent=False)
        self.measured = None


class CrossAttention(nn.Module):
    """Query side of the cross-attention (its K/V live stacked in WanTransformer.cross_kv). `attend`:
    `cross_attention`, rebound per role by `WanTransformer.set_attention`."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        C = cfg.dim
        self.to_q = nn.Linear(C, C)
        self.norm_q = nn.Parameter(torch.ones(C))
        self.to_out = nn.Linear(C, C)
        self.attend = cross_attention                 # (q, k, v, k_img, v_img, ops) -> [B, Sq, H, Dv]


class StackedKV(nn.Module):
    """K/V projections of all layers' cross-attention for one context, stacked for one GEMM.

    weight: [L*2*C, C_in] (layer-major, then k|v), bias: [L*2*C], norm_k: [L, C] (RMSNorm of k).
    """

    def __init__(self, num_layers: int, dim: int, in_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_layers * 2 * dim, in_dim))
        self.bias = nn.Parameter(torch.zeros(num_layers * 2 * dim))
        self.norm_k = nn.Parameter(torch.ones(num_layers, dim))
        nn.init.normal_(self.weight, std=in_dim ** -0.5)

    def forward(self, ctx: torch.Tensor, num_heads: int, eps: float):
        """ctx [B, Lc, C_in] -> lists over layers of k, v: [B, Lc, H, D]."""
        return split_kv(F.linear(ctx, self.weight, self.bias), self.norm_k, num_heads, eps)  # one GEMM


def split_kv(kv: torch.Tensor, norm_k: torch.Tensor, num_heads: int, eps: float):
    """Output of the stacked K/V GEMM [B, Lc, L*2*C] -> lists over layers of k (RMSNorm'd), v: [B, Lc, H, D]."""
    L, C = norm_k.shape
    kv = kv.unflatten(-1, (L, 2, C))                                         # [B, Lc, L, 2, C]
    ks, vs = [], []
    for i in range(L):
        k = F.rms_norm(kv[:, :, i, 0], (C,), norm_k[i], eps)                 # diffusers' RMSNorm rounding
        ks.append(k.unflatten(-1, (num_heads, -1)).contiguous())
        vs.append(kv[:, :, i, 1].unflatten(-1, (num_heads, -1)).contiguous())
    return ks, vs


class WanBlock(nn.Module):
    """Self-attention (fused QKV + qk_norm_rope + attention), cross-attention, FFN, adaLN modulation."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        C = cfg.dim
        self.num_heads, self.eps = cfg.num_attention_heads, cfg.eps
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, C) / C ** 0.5)
        self.attn1 = SelfAttention(cfg)
        self.norm2 = nn.LayerNorm(C, eps=cfg.eps)     # affine, cross-attention pre-norm
        self.attn2 = CrossAttention(cfg)
        self.ffn = nn.ModuleDict({"proj_in": nn.Linear(C, cfg.ffn_dim), "proj_out": nn.Linear(cfg.ffn_dim, C)})

    def forward(self, x, temb_proj, rope_cos, rope_sin, kv, ops: _Ops):
        # x: [B, S, C]; temb_proj: [B, 1|S, 6, C]; kv: (k, v, k_img, v_img) of this layer
        C, eps = x.shape[-1], self.eps
        mods = self.scale_shift_table.unsqueeze(0) + temb_proj.float()          # [B, 1|S, 6, C] fp32
        shift, scale, gate, c_shift, c_scale, c_gate = mods.unbind(dim=2)       # [B, 1|S, C] each

        # Each activation is dropped after its last use (`del`): the live set, and so a forward's peak memory, is
        # what wan_model/cost.py's activation_live_points counts (held to a meta-tensor accounting in
        # tests/test_cost.py); autograd keeps what a backward needs by itself.
        # 1. self-attention
        a = self.attn1
        n = ops.layer_norm_modulate(x, scale, shift, eps)                       # LN * (1 + scale) + shift
        q, k, v = a.project_qkv(a, n, rope_cos, rope_sin, self.num_heads, eps, ops)  # [B, S, H, D] each
        del n
        o = a.attend(q, k, v, ops)
        del q, k, v
        o = a.to_out(o.flatten(2))                                              # [B, S, C]
        x = ops.gated_residual(x, o, gate)                                      # x + o * gate, in fp32
        del o

        # 2. cross-attention (K/V precomputed per context)
        c = self.attn2
        n = _layer_norm32(x, self.norm2.weight, self.norm2.bias, eps).to(x.dtype)
        q = F.rms_norm(c.to_q(n), (C,), c.norm_q, eps).unflatten(-1, (self.num_heads, -1))
        del n
        k_txt, v_txt, k_img, v_img = kv
        o = c.attend(q, k_txt, v_txt, k_img, v_img, ops)
        del q
        x = x + c.to_out(o.flatten(2))
        del o

        # 3. feed-forward
        n = ops.layer_norm_modulate(x, c_scale, c_shift, eps)
        f = self.ffn["proj_in"](n)
        del n
        f = self.ffn["proj_out"](F.gelu(f, approximate="tanh"))
        return ops.gated_residual(x, f, c_gate)


class VaceBlock(WanBlock):
    """A VACE block (diffusers' WanVACETransformerBlock, original Wan's VaceWanAttentionBlock): a Wan block run on
    the control stream c, block 0 first adding `proj_in(c)` to the patched latents; `proj_out` of its output is
    the hint that the model adds after block `vace_layers[j]`."""

    def __init__(self, cfg: WanConfig, first: bool):
        super().__init__(cfg)
        C = cfg.dim
        self.proj_in = nn.Linear(C, C) if first else None    # original: before_proj (block 0 only)
        self.proj_out = nn.Linear(C, C)                       # original: after_proj

    def forward(self, c, x, temb_proj, rope_cos, rope_sin, kv, ops: _Ops):
        # c: control stream [B, S, C]; x: patched latents [B, S, C] (read by block 0 only)
        if self.proj_in is not None:
            c = self.add_control(c, x)
        c = super().forward(c, temb_proj, rope_cos, rope_sin, kv, ops)
        return self.proj_out(c), c                                              # hint, control stream

    def add_control(self, c, x):
        """Block 0: the control tokens c through proj_in, added to the patched latents x ([B, S, C] each)."""
        return self.proj_in(c) + x


class WanTransformer(nn.Module):
    """The Wan transformer on `wan` ops.  `impl` ("auto"|"cuda"|"cpu"|"triton"|"ref") picks the backend
    of every op once, at construction (and again when the model moves device)."""

    def __init__(self, config: WanConfig, impl: str = "auto", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.config = cfg = config
        self.impl = impl
        C, L = cfg.dim, cfg.num_layers
        with torch.device(device or "cpu"):
            self.patch_embedding = nn.Conv3d(cfg.in_channels, C, kernel_size=cfg.patch_size, stride=cfg.patch_size)
            self.condition_embedder = TimeTextImageEmbedding(cfg)
            self.blocks = nn.ModuleList(WanBlock(cfg) for _ in range(L))
            self.cross_kv = StackedKV(L, C, C)
            self.cross_kv_img = StackedKV(L, C, C) if cfg.has_image else None
            self.scale_shift_table = nn.Parameter(torch.randn(1, 2, C) / C ** 0.5)
            self.proj_out = nn.Linear(C, cfg.out_channels * math.prod(cfg.patch_size))
            if cfg.has_vace:  # control latents -> hints added after the blocks in vace_layers
                n = len(cfg.vace_layers)
                self.vace_patch_embedding = nn.Conv3d(cfg.vace_in_channels, C, kernel_size=cfg.patch_size,
                                                      stride=cfg.patch_size)
                self.vace_blocks = nn.ModuleList(VaceBlock(cfg, first=j == 0) for j in range(n))
                self.vace_cross_kv = StackedKV(n, C, C)
                self.vace_cross_kv_img = StackedKV(n, C, C) if cfg.has_image else None
        if dtype is not None:
            self.to_dtype(dtype)
        self._attention = AttentionConfig()
        self._ops = bind_ops(impl, self.device)
        self._parallel = None

    # ------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (of the patch embedding: a Conv3d, never quantized, never kept fp32)."""
        return self.patch_embedding.weight.dtype

    @property
    def quantization(self):
        """The config this model was quantized with (set by wan_model.compat.quantize; None: dense)."""
        return getattr(self, "_quantization", None)

    def enable_parallelism(self, ulysses_degree: int = 1, ring_degree: int = 1, group=None) -> "WanTransformer":
        """Sequence parallelism over `group` (default: the world) of size ulysses_degree * ring_degree, after
        `torch.distributed.init_process_group`, on every rank (it creates sub-groups); every rank then passes
        the same full inputs and gets the same full output, and gradients are the single-process ones
        (wan_model/core/parallel.py; diffusers' names). Not with VACE (NotImplementedError)."""
        if self.config.has_vace:
            raise NotImplementedError("enable_parallelism: sequence parallelism of a VACE model is not implemented "
                                      "(its control stream and hints are not split across ranks); run it on one "
                                      "process")
        enable(self, ulysses_degree, ring_degree, group)
        return self.dense_attention(getattr(self, "_dense", False))  # int8 self-attention stays int8

    def disable_parallelism(self) -> "WanTransformer":
        """Undo `enable_parallelism`: single-process forward again."""
        disable(self)
        return self.dense_attention(getattr(self, "_dense", False))

    # Training: diffusers' names. Off by default; `forward` checkpoints each block only with grad mode on.
    gradient_checkpointing: bool = False
    _gradient_checkpointing_func = None

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.gradient_checkpointing

    def enable_gradient_checkpointing(self, gradient_checkpointing_func=None) -> None:
        """Recompute each block's activations in backward instead of keeping them (per block; the cross-attention
        K/V of `prepare_context` are kept). `gradient_checkpointing_func(block, *args)`: default
        `torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)`, as in diffusers."""
        self._gradient_checkpointing_func = gradient_checkpointing_func or _checkpoint_block
        self.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = False

    def to_dtype(self, dtype: torch.dtype, keep_fp32=None) -> "WanTransformer":
        """Cast the parameters to `dtype`; those whose name `keep_fp32(name)` is true to fp32 (WanModel passes
        diffusers' fp32 modules, wan_model.compat.spellings.keeps_fp32)."""
        with torch.no_grad():
            for name, p in self.named_parameters():
                p.data = p.data.to(torch.float32 if keep_fp32 is not None and keep_fp32(name) else dtype)
        return self

    def set_impl(self, impl: str) -> "WanTransformer":
        """Switch every op of the model to backend `impl` (resolved once, here)."""
        self._ops = bind_ops(impl, self.device, self.attention.kind == "int8")
        self.impl = impl
        return self

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        if hasattr(self, "_ops"):  # re-resolve the backends on the new device
            self._ops = bind_ops(self.impl, self.device, self.attention.kind == "int8")
        return out

    @property
    def attention(self) -> AttentionConfig:
        return getattr(self, "_attention", AttentionConfig())

    def set_attention(self, attention: str = "bf16", *, roles=INT8_ROLES, dense_layers=(0,),
                      pv: str = "auto") -> "WanTransformer":
        """Pick the attention op per role once, here: "bf16" (wan::attention everywhere, the default) or "int8"
        (wan::attention_int8, SageAttention2-class, inference only) for the roles in `roles` ("self", "text",
        "image": self-attention, text and image cross-attention; default self only, `INT8_ROLES`) of every layer
        except `dense_layers` (negative indices count from the end; default: layer 0, as Wan users run it); a VACE
        model's VACE blocks as the layer whose hint they make (`_attention_layers`). `pv`: the int8 op's P.V precision
        ("auto": fp16 on sm_80/86, fp8 elsewhere). Two sets of per-block functions are bound: this configuration
        and the dense one (bf16 everywhere), between which `dense_attention` switches (the sampler's dense steps);
        forward never branches on it. An int8 self-attention gets q quantized by its projection's kernel
        (qkv_rope_int8 / qk_norm_rope_int8, then attention_int8_q8; 6 D - 8 bytes fewer per token and head), with
        the op's channel balance folded into the norm weights from statistics its dense steps measure
        (wan_model/core/balance.py; b = 1, i.e. attention_int8 on the bf16 q less its balance bit for bit, until a
        dense step has run; reset here). Under sequence parallelism the same q: its codes and scales cross
        Ulysses' all-to-all with K's and V's (quantized before it with the group's statistics), a ring's blocks
        are quantized once by their owner, and the attention is attention_int8_quantized_lse
        (wan_model/core/parallel.py)."""
        if attention not in ATTENTIONS:
            raise ValueError(f"set_attention: attention must be one of {ATTENTIONS}, got {attention!r}")
        roles, L = tuple(roles), len(self.blocks)
        if not set(roles) <= set(ROLES):
            raise ValueError(f"set_attention: roles must be among {ROLES}, got {roles}")
        if pv not in ("auto", "fp8", "fp16"):
            raise ValueError(f"set_attention: pv must be 'auto', 'fp8' or 'fp16', got {pv!r}")
        bad = [i for i in dense_layers if not isinstance(i, int) or not -L <= i < L]
        if bad:
            raise ValueError(f"set_attention: dense_layers must be layer indices in [-{L}, {L}), got {bad}")
        int8 = attention == "int8"
        self._ops = bind_ops(self.impl, self.device, int8)
        self._attention = AttentionConfig(attention, roles, tuple(sorted({i % L for i in dense_layers})), pv)
        dense = attention_fns(())
        self.reset_balance()  # a new configuration measures afresh
        layers = self._attention_layers()
        self._attention_sets = {
            True: [dense] * len(layers),
            False: [attention_fns(roles if int8 and i not in self._attention.dense_layers else (), pv)
                    for _, i in layers]}
        return self.dense_attention(False)

    def _attention_layers(self) -> list[tuple["WanBlock", int]]:
        """(block, its layer) of every block whose attention `set_attention` configures: the blocks, then a VACE
        model's VACE blocks, each at the layer whose hint it makes (`vace_layers`: the VACE block of a dense layer
        is dense too)."""
        vace = zip(self.vace_blocks, self.config.vace_layers) if self.config.has_vace else ()
        return [*((b, i) for i, b in enumerate(self.blocks)), *vace]

    def dense_attention(self, dense: bool) -> "WanTransformer":
        """Bind the dense set (True: wan::attention in every role and layer) or the configured one (False): the
        sampler's per-step switch. Under sequence parallelism the self-attention is the parallel one, on the op the
        set names.

        A block whose configured self-attention is 8-bit measures its q and k while dense (its projection's
        `measuring` form) and, at the switch back, folds the channel balance they call for into its norm weights
        (`balance`; wan_model/core/balance.py): from the step after a dense one, the fused q is balanced too."""
        was_dense, self._dense = getattr(self, "_dense", False), bool(dense)
        sets = getattr(self, "_attention_sets", None)
        if sets is None:
            return self
        sp = getattr(self, "_parallel", None)
        int8 = [pv is not None for _, _, pv in sets[False]]
        if was_dense and not dense and any(int8):
            self._fold_balance(int8, sp)
        blocks = [b for b, _ in self._attention_layers()]
        for block, (self_fn, cross_fn, self_pv), measured in zip(blocks, sets[bool(dense)], int8):
            a = block.attn1
            base = base_projection(a.project_qkv)
            # 8-bit: q quantized by the projection's kernel (INT8_PROJECTIONS), the pair bound together; under
            # sequence parallelism too (Ulysses sends q's codes, a ring's blocks take them as they are). A dense
            # step in an 8-bit block: the bf16 form, measuring (MEASURING_PROJECTIONS)
            a.project_qkv = INT8_PROJECTIONS[base] if self_pv else MEASURING_PROJECTIONS[base] if measured else base
            if sp is None:
                a.attend = self_fn
            else:  # the sequence-parallel self-attention, 8-bit where this block's is
                a.attend = functools.partial(sp.attention, pv=self_pv) if self_pv else sp.attention
            block.attn2.attend = cross_fn
        return self

    def reset_balance(self) -> "WanTransformer":
        """Every self-attention's channel balance back to 1, nothing measured (fp32, on its weights' device: also
        how a model loaded onto "meta" gets it, as no checkpoint holds it; with block offload, on the masters)."""
        with on_host(self):
            for m in self.modules():
                if isinstance(m, SelfAttention):
                    if m.balance.is_meta and not m.norm_q.is_meta:
                        m.balance = torch.ones(m.norm_q.shape, device=m.norm_q.device)
                    m.balance.fill_(1)
                    m.measured = None
        return self

    @torch.no_grad()
    def _fold_balance(self, int8: list[bool], sp) -> None:
        """Each 8-bit block's balance from the statistics its dense step measured (under sequence parallelism added
        up over the group first: every rank must fold the same b, and every rank measured the same blocks); with
        block offload, into the streamed blocks' host masters. A block that measured nothing since the last fold
        keeps its b."""
        attns = [b.attn1 for (b, _), on in zip(self._attention_layers(), int8) if on and b.attn1.measured is not None]
        if not attns:
            return
        stats = torch.stack([a.measured for a in attns])
        if sp is not None:
            stats = merge(stats, sp.group)
        with on_host(self):
            for a, b in zip(attns, balance_of(finish(stats))):
                a.balance.copy_(b)
                a.measured = None

    # ------------------------------------------------------------------------------------------
    def rope(self, grid: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """rope_cos, rope_sin [S, D/2] fp32 for a patched latent grid (cached per grid)."""
        return _rope_constant(self.config.attention_head_dim, grid, self.config.rope_max_seq_len, self.device)

    def prepare_context(self, encoder_hidden_states: torch.Tensor,
                        encoder_hidden_states_image: torch.Tensor | None = None) -> WanContext:
        """Text (+ image) cross-attention K/V of all layers, one GEMM per context.

        encoder_hidden_states: [B, L_txt, text_dim] (512 tokens for I2V, as diffusers assumes);
        encoder_hidden_states_image: [B, 257, image_dim] (I2V) or [2B, 257, image_dim] (FLF2V: first and
        last frame interleaved per sample, as diffusers' pipeline passes them).
        """
        cfg = self.config
        _check_tokens("encoder_hidden_states", encoder_hidden_states, "B, L_txt", cfg.text_dim, self.dtype)
        if cfg.has_image and encoder_hidden_states_image is None:
            raise ValueError("this is an I2V/FLF2V model (config.image_dim set): encoder_hidden_states_image "
                             "is required")
        if not cfg.has_image and encoder_hidden_states_image is not None:
            raise ValueError("encoder_hidden_states_image given but this model has no image embedder "
                             f"(shape {tuple(encoder_hidden_states_image.shape)})")
        if cfg.has_image:
            B, img = encoder_hidden_states.shape[0], encoder_hidden_states_image
            n = (2 * B, f"2 x {B}, {cfg.pos_embed_seq_len // 2}") if cfg.pos_embed_seq_len else (B, f"{B}, L_img")
            _check_tokens("encoder_hidden_states_image", img, n[1], cfg.image_dim, self.dtype)
            if img.shape[0] != n[0] or cfg.pos_embed_seq_len and 2 * img.shape[1] != cfg.pos_embed_seq_len:
                raise ValueError(f"encoder_hidden_states_image has shape {tuple(img.shape)}, expected [{n[1]}, "
                                 f"{cfg.image_dim}] (the batch of encoder_hidden_states "
                                 f"{tuple(encoder_hidden_states.shape)}"
                                 f"{', FLF2V: first and last frame per sample' if cfg.pos_embed_seq_len else ''})")
        txt = self.condition_embedder.text(encoder_hidden_states)                 # [B, L_txt, C]
        k, v = self.cross_kv(txt, cfg.num_attention_heads, cfg.eps)
        if cfg.has_vace:  # the VACE blocks' K/V follow the blocks' (WanContext)
            k, v = [a + b for a, b in zip((k, v), self.vace_cross_kv(txt, cfg.num_attention_heads, cfg.eps))]
        k_img = v_img = None
        if cfg.has_image:
            img = self.condition_embedder.image_embedder(encoder_hidden_states_image)  # [B, L_img, C]
            k_img, v_img = self.cross_kv_img(img, cfg.num_attention_heads, cfg.eps)
            if cfg.has_vace:
                k_img, v_img = [a + b for a, b in zip((k_img, v_img),
                                                      self.vace_cross_kv_img(img, cfg.num_attention_heads, cfg.eps))]
        return WanContext(k, v, k_img, v_img, encoder_hidden_states.dtype)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor | None = None,
                encoder_hidden_states_image: torch.Tensor | None = None, *,
                context: WanContext | None = None, control_hidden_states: torch.Tensor | None = None,
                control_hidden_states_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Denoiser output, like diffusers' WanTransformer3DModel.forward(...).sample (same argument order).

        hidden_states: [B, C_in, F, H, W]; timestep: [B] or per token [B, S] (TI2V);
        encoder_hidden_states: [B, L_txt, text_dim]; encoder_hidden_states_image: see prepare_context;
        context: from prepare_context (then the two encoder inputs are not needed).
        VACE models (config.vace_layers), as diffusers' WanVACETransformer3DModel: control_hidden_states
        [B, vace_in_channels, F_c, H, W] (required; F_c <= F: the missing frames' tokens are zeros, as diffusers
        pads them) in the model dtype; control_hidden_states_scale [len(vace_layers)] (default ones): hint j,
        times scale j, is added after block vace_layers[j].
        Returns [B, C_out, F, H, W] in the model dtype.
        The inputs are checked once, here (shapes and dtypes only): hidden_states and the encoder inputs in the
        model dtype (`model.dtype`; diffusers raises torch's own dtype error there, its pipelines cast first),
        F, H, W multiples of the patch size (diffusers crops the remainder silently; we refuse), timestep [B]
        or [B, S] (batch 1 broadcasts, as in diffusers); a mismatch is a ValueError naming the argument.
        """
        return self._denoise(hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image, context,
                             control_hidden_states, control_hidden_states_scale)

    def _check_control(self, hidden_states, control, scale) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """(control [B, vace_in_channels, F_c, H, W], the scales as 0-dim tensors) of a VACE forward, after checking
        them against hidden_states (metadata only); a ValueError naming the argument and its shape otherwise."""
        cfg, x = self.config, hidden_states
        if not cfg.has_vace:
            raise ValueError("control_hidden_states / control_hidden_states_scale given, but this model has no VACE "
                             f"blocks (config.vace_layers is None); control shape "
                             f"{tuple(getattr(control, 'shape', ()))}")
        n, ci = len(cfg.vace_layers), cfg.vace_in_channels
        if control is None:
            raise ValueError(f"this is a VACE model (vace_layers {list(cfg.vace_layers)}): control_hidden_states "
                             f"[B, {ci}, F, H, W] is required")
        lat = tuple(getattr(x, "shape", ()))
        if not isinstance(control, torch.Tensor) or control.dim() != 5 or len(lat) != 5 or \
                control.shape[1] != ci or control.shape[0] != lat[0] or control.shape[3:] != lat[3:] or \
                not 0 < control.shape[2] <= lat[2] or control.shape[2] % cfg.patch_size[0]:
            raise ValueError(f"control_hidden_states has shape {tuple(getattr(control, 'shape', ()))}, expected "
                             f"[B, {ci}, F_c, H, W] = [{lat[0] if lat else 'B'}, {ci}, <= "
                             f"{lat[2] if len(lat) == 5 else 'F'}, {', '.join(map(str, lat[3:])) or 'H, W'}] "
                             f"(vace_in_channels {ci}; batch, H, W of hidden_states {lat}, at most its frames)")
        if control.dtype != self.dtype:
            raise ValueError(f"control_hidden_states {tuple(control.shape)} is {control.dtype}, expected the model "
                             f"dtype {self.dtype} (cast it: control_hidden_states.to(model.dtype))")
        if scale is None:
            scale = control.new_ones(n)                                          # diffusers' default
        if not isinstance(scale, torch.Tensor) or scale.dim() != 1 or scale.shape[0] != n or \
                not scale.is_floating_point():
            raise ValueError(f"control_hidden_states_scale has shape {tuple(getattr(scale, 'shape', ()))} and dtype "
                             f"{getattr(scale, 'dtype', type(scale).__name__)}, expected a float tensor [{n}] (one "
                             f"scale per VACE layer, vace_layers {list(cfg.vace_layers)})")
        return control, scale.unbind()

    def _vace_hints(self, x, control, scales, temb_proj, rope_cos, rope_sin, context, ckpt) -> dict[int, torch.Tensor]:
        """{block index in vace_layers: hint * scale [B, S, C]} of the control latents (diffusers'
        WanVACETransformer3DModel): the control is patch-embedded, its tokens padded with zeros to the latents',
        and run through the VACE blocks (block 0 adds proj_in of it to the patched latents x)."""
        L = self.config.num_layers
        c = self.control_tokens(control, x.shape[1])                              # [B, S, C]
        hints = {}
        for j, (block, layer, scale) in enumerate(zip(self.vace_blocks, self.config.vace_layers, scales)):
            args = (c, x, temb_proj, rope_cos, rope_sin, context.layer(L + j), self._ops)
            hint, c = block(*args) if ckpt is None else ckpt(block, *args)
            hints[layer] = hint * scale
        return hints

    def control_tokens(self, control: torch.Tensor, tokens: int) -> torch.Tensor:
        """VACE control latents [B, vace_in_channels, F_c, H, W] -> [B, tokens, C]: patch-embedded, the tokens of the
        frames missing from F_c zeros (as diffusers pads them) up to the latents' `tokens`."""
        c = self.vace_patch_embedding(control).flatten(2).transpose(1, 2)           # [B, S_c, C]
        return torch.cat([c, c.new_zeros(c.shape[0], tokens - c.shape[1], c.shape[2])], dim=1)

    def patch_tokens(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Latents [B, C_in, F, H, W] -> the patch embedding's tokens [B, S, C], S = the patched grid's size."""
        return self.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()

    def _check_latents(self, hidden_states, timestep) -> tuple[int, int, int]:
        """The patched grid (f, h, w) of hidden_states [B, C_in, F, H, W], after checking it and the timestep
        (metadata only): a ValueError names the argument, its shape / dtype and what was expected. A size not
        divisible by the patch is refused (diffusers' patch-embedding Conv3d crops it silently); a dtype other
        than the model's too (diffusers raises torch's own error; its pipelines cast to the model dtype)."""
        cfg, x = self.config, hidden_states
        if not isinstance(x, torch.Tensor) or x.dim() != 5 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"hidden_states has shape {tuple(getattr(x, 'shape', ()))}, expected "
                             f"[B, {cfg.in_channels}, F, H, W] (in_channels {cfg.in_channels})")
        if x.dtype != self.dtype:
            raise ValueError(f"hidden_states {tuple(x.shape)} is {x.dtype}, expected the model dtype {self.dtype} "
                             "(cast it: hidden_states.to(model.dtype), as diffusers' pipelines do)")
        B, _, nf, nh, nw = x.shape
        if nf % cfg.patch_size[0] or nh % cfg.patch_size[1] or nw % cfg.patch_size[2]:
            raise ValueError(f"hidden_states has shape {tuple(x.shape)}: F, H, W must be multiples of the patch size "
                             f"{cfg.patch_size} (the remainder would be cropped)")
        f, h, w = nf // cfg.patch_size[0], nh // cfg.patch_size[1], nw // cfg.patch_size[2]
        t = timestep
        if not isinstance(t, torch.Tensor) or t.dim() not in (1, 2) or t.shape[0] not in (1, B) or \
                t.dim() == 2 and t.shape[1] != f * h * w or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"timestep has shape {tuple(getattr(t, 'shape', ()))} and dtype "
                             f"{getattr(t, 'dtype', type(t).__name__)}, expected a real tensor [B] or per token "
                             f"[B, S] = [{B}, {f * h * w}] (B of hidden_states {tuple(x.shape)}, or 1)")
        return f, h, w

    def _denoise(self, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image, context,
                 control=None, control_scale=None):
        cfg = self.config
        f, h, w = self._check_latents(hidden_states, timestep)
        vace = None  # VACE: (control latents, scales as 0-dim tensors)
        if cfg.has_vace or control is not None or control_scale is not None:
            vace = self._check_control(hidden_states, control, control_scale)
        B = hidden_states.shape[0]
        rope_cos, rope_sin = self.rope((f, h, w))                                # [S, D/2] fp32
        if context is None:
            if encoder_hidden_states is None:
                raise ValueError("forward needs encoder_hidden_states [B, L_txt, text_dim] or context= "
                                 "(from prepare_context)")
            context = self.prepare_context(encoder_hidden_states, encoder_hidden_states_image)
        if context.batch_size != B:
            raise ValueError(f"the text context has batch {context.batch_size}, hidden_states "
                             f"{tuple(hidden_states.shape)} batch {B}: they must be equal")

        x = self.patch_tokens(hidden_states)                                     # [B, S, C]
        temb, temb_proj = self.condition_embedder.time(timestep, context.dtype)  # [B, 1|S, C], [B, 1|S, 6, C]
        sp = getattr(self, "_parallel", None)
        if sp is not None:  # this rank's tokens [B, n, C] (wan_model/core/parallel.py)
            x, temb_proj, rope_cos, rope_sin, context = sp.split(x, temb_proj, rope_cos, rope_sin, context)
        ckpt = self._gradient_checkpointing_func if self.gradient_checkpointing and torch.is_grad_enabled() else None
        hints = {} if vace is None else self._vace_hints(x, *vace, temb_proj, rope_cos, rope_sin, context, ckpt)
        for i, block in enumerate(self.blocks):
            args = (x, temb_proj, rope_cos, rope_sin, context.layer(i), self._ops)
            x = block(*args) if ckpt is None else ckpt(block, *args)
            if i in hints:
                x = x + hints[i]
        if sp is not None:
            x = sp.gather(x)                                                     # [B, S, C] on every rank

        return self.head(x, temb, (f, h, w), self._ops)

    def head(self, x, temb, grid: tuple[int, int, int], ops: _Ops) -> torch.Tensor:
        """The output head: adaLN of the blocks' output x [B, S, C] (shift and scale from the table and temb
        [B, 1|S, C]), proj_out, and the tokens of the patched grid (f, h, w) back to [B, C_out, F, H, W]."""
        B, (f, h, w), (pt, ph, pw) = x.shape[0], grid, self.config.patch_size
        shift, scale = (self.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).unbind(dim=2)  # [B, 1|S, C]
        x = ops.layer_norm_modulate(x, scale, shift, self.config.eps)
        x = self.proj_out(x)                                                     # [B, S, pt*ph*pw*C_out]
        x = x.reshape(B, f, h, w, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(B, -1, f * pt, h * ph, w * pw)

    # ------------------------------------------------------------------------------------------
    # Block offload (wan_model/core/offload.py): the blocks stream through a ring on the device, inference only.
    def enable_offload(self, blocks_on_device: int | None = None, *, vram_budget: int | str | None = None,
                       prefetch: int = 1, sources: dict | None = None, device=None,
                       parked: bool = False) -> "WanTransformer":
        """Keep at most `blocks_on_device` (N) blocks' weights on the device at a time, plus `prefetch` blocks in
        flight: the first N - 1 blocks stay, the others come from one master copy on the host through a ring of
        1 + prefetch slots (host-to-device copies on a side stream on CUDA). Or `vram_budget` ("12GB", bytes): N
        from the blocks' sizes (rule in wan_model/core/offload.py). Outputs are bit-identical to the model without
        offload; state_dict / save / LoRA / quantize work on the master copies. Replaces an earlier setting.
        `sources`: the file tier, {native key: [(row, rows, tensor over a memory-mapped file)]} of block tensors read
        from the file at each copy instead of a host copy (WanModel.enable_offload(from_file=...) builds it).
        `device`: the device to run on when the model is still on the host (load a model too big for the device on
        the CPU, then enable_offload(..., device="cuda"): the streamed blocks never go to the device whole);
        `parked`: start parked (WanExperts' idle expert: its tensors go to the host, not to the device)."""
        from wan_model.core.offload import BlockOffload

        self.disable_offload()
        self._offload = BlockOffload(self, blocks_on_device, vram_budget, prefetch, sources, device, parked)
        return self

    def disable_offload(self) -> "WanTransformer":
        """Every block's weights back on the device, bit for bit (the original parameter objects); the ring freed."""
        off = getattr(self, "_offload", None)
        if off is not None:
            self._offload = None
            off.close()
        return self


def _check_tokens(name: str, t, lead: str, dim: int, dtype: torch.dtype) -> None:
    """t: [lead..., dim] tokens in `dtype` (at least one token), else a ValueError naming `name`."""
    if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[2] != dim or t.shape[1] == 0:
        raise ValueError(f"{name} has shape {tuple(getattr(t, 'shape', ()))}, expected [{lead}, {dim}]")
    if t.dtype != dtype:
        raise ValueError(f"{name} {tuple(t.shape)} is {t.dtype}, expected the model dtype {dtype} "
                         f"(cast it: {name}.to(model.dtype), as diffusers' pipelines do)")


def _checkpoint_block(block: nn.Module, *args):
    return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)


@torch.compiler.assume_constant_result
def _rope_constant(head_dim, grid, max_len, device):
    return rope_tables(head_dim, grid, max_len, device=device)


@dataclasses.dataclass
class WanExperts:
    """Wan2.2 A14B: high-noise expert `high` (t >= boundary_ratio * 1000), then low-noise `low`."""

    high: WanTransformer
    low: WanTransformer
    boundary_ratio: float

    def expert(self, t: float, t_next: float | None = None) -> WanTransformer:
        """The expert of timestep `t`. With offload on (`enable_offload`), it is brought in if it is parked and the
        other one parked; `t_next` (the sampler's next timestep): when it needs the other expert, that one starts
        coming in now (on CUDA on the side stream, overlapping this step's forward): the swap happens once per
        boundary."""
        m = self.high if t >= self.boundary_ratio * 1000 else self.low
        if getattr(self, "_offload", False):
            other = self.low if m is self.high else self.high
            m._offload.unpark()
            if t_next is not None and (self.high if t_next >= self.boundary_ratio * 1000 else self.low) is other:
                other._offload.unpark()   # the last step before the boundary: both in while it runs
            else:
                other._offload.park()
        return m

    def enable_offload(self, blocks_on_device: int | None = None, *, vram_budget: int | str | None = None,
                       prefetch: int = 1, device=None) -> "WanExperts":
        """The idle expert lives on the host (every tensor: one host master, meta placeholders on the device; the
        high-noise expert is the active one first); `expert(t, t_next)` swaps them (above). `blocks_on_device` /
        `vram_budget` / `prefetch`: block offload of each expert too (`WanTransformer.enable_offload`; None: each
        expert whole on the device while active). Each expert gets the budget; during the last step before the
        boundary both are present. `device`: run on it, the pair loaded on the host (the idle expert never goes to
        the device until its turn)."""
        self.disable_offload()
        for m, parked in ((self.high, False), (self.low, True)):
            n = len(m.blocks) if blocks_on_device is None and vram_budget is None else blocks_on_device
            m.enable_offload(n, vram_budget=vram_budget, prefetch=prefetch, device=device, parked=parked)
        self._offload = True
        return self

    def disable_offload(self) -> "WanExperts":
        """Both experts whole on the device again, bit for bit."""
        if getattr(self, "_offload", False):
            self._offload = False
            self.high.disable_offload()
            self.low.disable_offload()
        return self
