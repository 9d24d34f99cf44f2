"""NVFP4 and FP8 weight quantization of a WanModel, and the streaming NVFP4 checkpoint converter.

FP8 (`FP8Config`, `quantize("fp8")`): the same keep rules and groups; a quantized layer becomes a
`wan_kernels.linear.FP8Linear` (W8A8 on sm_89+, W8A16 elsewhere), scales per tensor (a fused group shares one)
or per output row.

What is quantized (`NVFP4Config`): every Linear of the model except the layers matched by `keep`
(fnmatch patterns over diffusers layer names, default `DEFAULT_KEEP`: the time/text/image embedders
and the head `proj_out`; the patch embedding is a Conv3d and never quantized). The time embedder is
never quantized: diffusers keeps it in fp32 and its input cast follows its weight dtype. A quantized
layer becomes a `wan_kernels.linear.NVFP4Linear` (W4A4 on sm100 with CUTLASS, else W4A16).

Fused layers share one global scale. The model runs some diffusers layers as one GEMM:
  * `blocks.N.attn1.to_qkv` = rows of attn1.to_q | to_k | to_v of layer N,
  * `cross_kv` = attn2.to_k | to_v of ALL layers (one GEMM per context in `prepare_context`),
  * `cross_kv_img` = attn2.add_k_proj | add_v_proj of all layers (I2V/FLF2V).
Such a group is ONE NVFP4 tensor with ONE global scale = max over its members of amax / (6 * 448)
(what ModelOpt's export does for layers that engines fuse, e.g. QKV). The checkpoint still holds
per-layer keys `<layer>.weight / .weight_scale / .weight_scale_2`; the members of a group carry the
same `weight_scale_2` value, and their packed weights and swizzled block scales are row slices of the
group tensor (exact, as C is a multiple of 128 = the swizzle's row tile). Per-member quantization with
the shared scale gives the same bytes: quantization is row-wise once the global scale is fixed. A group
is quantized whole or not at all (a keep pattern that catches part of one is an error). Loading a
checkpoint whose group members have different `weight_scale_2` (e.g. a ModelOpt export of the
cross-attention K/V) is refused: re-quantizing would be lossy.

The streaming converter of checkpoints is `wan_model.io.checkpoint.convert_nvfp4`; the file layouts of
NVFP4 checkpoints are in wan_model.compat.layouts.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools

import torch
from torch import nn

from wan_kernels import fp8
from wan_kernels import nvfp4 as fmt
from wan_kernels.linear import FP8Linear, NVFP4Linear, default_mode
from wan_model.core.config import WanConfig
from wan_model.compat.layouts import native_direct, stacked_kv
from wan_model.core.model import StackedKV, WanTransformer, qkv_module_then_norm_rope, split_kv

METHODS = ("nvfp4", "fp8")
DEFAULT_KEEP = ("patch_embedding", "condition_embedder.time_embedder.*", "condition_embedder.text_embedder.*",
                "condition_embedder.image_embedder.*", "proj_out")
NEVER_QUANTIZED = ("condition_embedder.time_embedder.",)


@dataclasses.dataclass(frozen=True)
class NVFP4Config:
    """Which Linear layers become NVFP4 and how they run.

    keep:   fnmatch patterns over diffusers layer names (e.g. "blocks.0.ffn.*") kept in the model dtype.
    layers: explicit diffusers layer names to quantize (overrides `keep`; what a loaded checkpoint uses).
    mode:   NVFP4Linear mode: "auto" (w4a4 on sm100 with CUTLASS, else w4a16), "w4a16" or "w4a4".
    impl:   backend of the NVFP4 ops; None = the model's impl ("cpu", which has no C++ nvfp4_linear,
            maps to "auto", the reference on CPU).
    """

    keep: tuple[str, ...] = DEFAULT_KEEP
    layers: tuple[str, ...] | None = None
    mode: str = "auto"
    impl: str | None = None

    def is_quantized(self, layer: str) -> bool:
        if self.layers is not None:
            return layer in self.layers
        return not any(fnmatch.fnmatchcase(layer, p) for p in self.keep)

    def to_json(self) -> dict:
        """The `quantization_config` written to config.json (the layout is described for readers)."""
        return {
            "quant_method": "nvfp4", "producer": "wan-kernels", "group_size": fmt.BLOCK,
            "keep": list(self.keep) if self.layers is None else None,
            "weight": "uint8 [N, K/2], two E2M1 codes per byte, element 2i in the low nibble",
            "weight_scale": "float8_e4m3fn [roundup(N,128), roundup(K/16,4)], one per 16 elements along K, "
                            "128x4 swizzled (CUTLASS SfKMajorAtom), padding zero",
            "weight_scale_2": "float32 scalar, DECODE convention: w = e2m1 * weight_scale * weight_scale_2, "
                              "weight_scale_2 = amax / (6 * 448); fused groups share it",
        }


@dataclasses.dataclass(frozen=True)
class FP8Config:
    """Which Linear layers become FP8 (`FP8Linear`) and how; the keep rules and fused groups of NVFP4Config.

    keep, layers: as NVFP4Config.
    per_channel: one scale per output row ([N, 1]) instead of one per tensor ([]). Per tensor, a fused group
                 (to_qkv, cross_kv, cross_kv_img) is ONE fp8 tensor with ONE scale: max over its members of
                 amax / 448. Per channel needs no sharing (rows are independent).
    dtype:       "float8_e4m3fn" (default) or "float8_e5m2".
    impl:        backend of fp8_linear; None = the model's impl ("cpu" maps to "auto").
    """

    keep: tuple[str, ...] = DEFAULT_KEEP
    layers: tuple[str, ...] | None = None
    per_channel: bool = False
    dtype: str = "float8_e4m3fn"
    impl: str | None = None

    def __post_init__(self):
        fp8.dtype_of(self.dtype)

    is_quantized = NVFP4Config.is_quantized

    def to_json(self) -> dict:
        """The `quantization_config` written to config.json."""
        return {
            "quant_method": "fp8", "producer": "wan-kernels", "fmt": self.dtype,
            "weight_scale": "float32 DECODE scale: w = weight * weight_scale, " + (
                "[N, 1] per output row" if self.per_channel else "[] per tensor (fused groups share it)"),
            "per_channel": self.per_channel, "keep": list(self.keep) if self.layers is None else None,
        }


def nvfp4_impl(model_impl: str) -> str:
    """Backend of the NVFP4 ops for a model impl (nvfp4_linear has no C++ CPU kernel: "cpu" -> "auto")."""
    return "auto" if model_impl == "cpu" else model_impl


# ---------------------------------------------------------------------------------------------
# Layer groups: native module <-> diffusers layers

def _is_linear(native_module: str) -> bool:
    """Whether a module renamed one to one by the layouts (`native_direct`, a `.weight` of its own) is an
    nn.Linear: all are but the patch embedding (a Conv3d) and the LayerNorms (norm1 / norm2); the q/k RMSNorm
    weights are bare parameters. Pinned against the model's own modules for every preset (tests/test_quantize.py)."""
    last = native_module.rpartition(".")[2]
    return last != "patch_embedding" and not last.startswith("norm")


@functools.lru_cache(maxsize=16)
def layer_groups(cfg: WanConfig) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(native module path, diffusers layer names in row order) of every quantizable Linear of `cfg`, from the
    layouts and the config (no model is built)."""
    groups = []
    for d, n in native_direct(cfg).items():
        if d.endswith(".weight") and n.endswith(".weight") and _is_linear(n[:-7]):
            groups.append((n[:-7], (d[:-7],)))
    for i in range(cfg.num_layers):
        groups.append((f"blocks.{i}.attn1.to_qkv", tuple(f"blocks.{i}.attn1.to_{x}" for x in "qkv")))
    for name, km, vm, _ in stacked_kv(cfg):
        groups.append((name, tuple(f"blocks.{i}.{m}" for i in range(cfg.num_layers) for m in (km, vm))))
    return tuple(g for g in groups if not g[1][0].startswith(NEVER_QUANTIZED))


def quantized_groups(cfg: WanConfig, config: NVFP4Config) -> list[tuple[str, tuple[str, ...]]]:
    """The groups `config` quantizes (raises ValueError for a partly kept group or unknown layers)."""
    groups = layer_groups(cfg)
    if config.layers is not None:
        known = {m for _, members in groups for m in members}
        unknown = sorted(set(config.layers) - known)
        if unknown:
            raise ValueError(f"{type(config).__name__}.layers names layers that are not quantizable Linear layers of this "
                             f"model: {unknown[:8]} (the time embedder and patch embedding never are)")
    out = []
    for native, members in groups:
        q = [config.is_quantized(m) for m in members]
        if all(q):
            out.append((native, members))
        elif any(q):
            kept = [m for m, x in zip(members, q) if not x]
            raise ValueError(f"layers {list(members)[:4]}... run as ONE GEMM ({native}) with one "
                             f"per-tensor scale: quantize all or none of them; kept {kept[:4]}, "
                             f"quantized {[m for m, x in zip(members, q) if x][:4]}")
    if isinstance(config, NVFP4Config) and cfg.dim % 128 and any(len(m) > 1 for _, m in out):
        raise ValueError(f"fused NVFP4 groups need dim % 128 == 0 (scale swizzle row tile), got dim {cfg.dim}")
    return out


class NVFP4StackedKV(NVFP4Linear):
    """`StackedKV` with an NVFP4 weight: one NVFP4 GEMM [L*2C, C_in] for the K/V of all layers.

    Buffers as NVFP4Linear (weight, weight_scale, weight_scale_2 shared by all layers, bias) plus the
    parameter norm_k [L, C].
    """

    def __init__(self, num_layers: int, dim: int, in_dim: int, **kw):
        super().__init__(in_dim, num_layers * 2 * dim, bias=True, **kw)
        self.norm_k = nn.Parameter(torch.ones(num_layers, dim, device=self.weight.device))

    @classmethod
    def from_stacked(cls, kv: StackedKV, *, mode: str = "auto", impl: str = "auto") -> "NVFP4StackedKV":
        L, C = kv.norm_k.shape
        q = cls(L, C, kv.weight.shape[1], mode=mode, impl=impl, device=kv.weight.device, dtype=kv.weight.dtype)
        q.load_weight(kv.weight.detach())
        with torch.no_grad():
            q.bias.copy_(kv.bias.detach())
        q.norm_k = nn.Parameter(kv.norm_k.detach().clone())  # keeps its dtype
        return q

    def forward(self, ctx: torch.Tensor, num_heads: int, eps: float):
        """ctx [B, Lc, C_in] -> lists over layers of k, v: [B, Lc, H, D] (one NVFP4 GEMM)."""
        return split_kv(super().forward(ctx), self.norm_k, num_heads, eps)


class FP8StackedKV(FP8Linear):
    """`StackedKV` with an FP8 weight: one fp8_linear [L*2C, C_in] for the K/V of all layers. Buffers as
    FP8Linear (one scale for all layers, or one per row) plus the parameter norm_k [L, C]."""

    def __init__(self, num_layers: int, dim: int, in_dim: int, **kw):
        super().__init__(in_dim, num_layers * 2 * dim, bias=True, **kw)
        self.norm_k = nn.Parameter(torch.ones(num_layers, dim, device=self.weight.device))

    @classmethod
    def from_stacked(cls, kv: StackedKV, **kw) -> "FP8StackedKV":
        L, C = kv.norm_k.shape
        q = cls(L, C, kv.weight.shape[1], device=kv.weight.device, dtype=kv.weight.dtype, **kw)
        q.set_dense_weight(kv.weight.detach())
        with torch.no_grad():
            q.bias.copy_(kv.bias.detach())
        q.norm_k = nn.Parameter(kv.norm_k.detach().clone())  # keeps its dtype
        return q

    def forward(self, ctx: torch.Tensor, num_heads: int, eps: float):
        """ctx [B, Lc, C_in] -> lists over layers of k, v: [B, Lc, H, D] (one fp8_linear)."""
        return split_kv(super().forward(ctx), self.norm_k, num_heads, eps)


def set_nvfp4_impl(model: WanTransformer, impl: str) -> None:
    """Point every NVFP4 / FP8 module of `model` at backend `impl` (mapped by `nvfp4_impl`)."""
    for m in model.modules():
        if isinstance(m, (NVFP4Linear, FP8Linear)):
            m.impl = nvfp4_impl(impl)


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def _finish(model: WanTransformer, config: NVFP4Config) -> WanTransformer:
    for block in model.blocks:  # decided here, once: NVFP4 QKV GEMM, then the fused RMSNorm + RoPE op
        if isinstance(block.attn1.to_qkv, (NVFP4Linear, FP8Linear)):
            block.attn1.project_qkv = qkv_module_then_norm_rope
    model._quantization = config
    return model


@torch.no_grad()
def quantize_model(model: WanTransformer, method: str = "nvfp4", config: NVFP4Config | None = None) -> WanTransformer:
    """Quantize `model` in place (see the module docstring); returns it."""
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; expected one of {METHODS}")
    if model.quantization is not None:
        raise ValueError("this model is already quantized")
    if method == "fp8":
        return _quantize_fp8(model, config or FP8Config())
    config = config or NVFP4Config()
    impl = config.impl or nvfp4_impl(model.impl)
    for native, _ in quantized_groups(model.config, config):
        old = model.get_submodule(native)
        new = (NVFP4StackedKV.from_stacked(old, mode=config.mode, impl=impl) if isinstance(old, StackedKV)
               else NVFP4Linear.from_linear(old, mode=config.mode, impl=impl))
        _set_module(model, native, new)
    return _finish(model, config)


def _fp8_kw(config: FP8Config, model: WanTransformer) -> dict:
    return {"per_channel": config.per_channel, "fp8_dtype": config.dtype, "impl": config.impl or nvfp4_impl(model.impl)}


def _quantize_fp8(model: WanTransformer, config: FP8Config) -> WanTransformer:
    """quantize_model for "fp8": a fused group is one native module, so its per-tensor scale is already the
    max over its members."""
    if not isinstance(config, FP8Config):
        raise ValueError(f"quantize('fp8') takes an FP8Config, got {type(config).__name__}")
    kw = _fp8_kw(config, model)
    for native, _ in quantized_groups(model.config, config):
        old = model.get_submodule(native)
        new = (FP8StackedKV.from_stacked(old, **kw) if isinstance(old, StackedKV) else FP8Linear.from_linear(old, **kw))
        _set_module(model, native, new)
    return _finish(model, config)


def fp8_structure(model: WanTransformer, config: FP8Config, per_channel: set[str] = frozenset(),
                  input_scale: set[str] = frozenset()) -> WanTransformer:
    """Replace the modules `config` quantizes by EMPTY FP8 modules (model on "meta", to be filled by
    load_state_dict(assign=True)); `per_channel` / `input_scale`: native modules whose checkpoint holds a
    per-row scale / a static input scale."""
    kw = _fp8_kw(config, model)
    for native, _ in quantized_groups(model.config, config):
        old = model.get_submodule(native)
        kw.update(per_channel=native in per_channel, input_scale=native in input_scale)
        if isinstance(old, StackedKV):
            L, C = old.norm_k.shape
            new = FP8StackedKV(L, C, old.weight.shape[1], device=old.weight.device, **kw)
        else:
            new = FP8Linear(old.in_features, old.out_features, old.bias is not None, device=old.weight.device, **kw)
        _set_module(model, native, new)
    return _finish(model, config)


def fp8_checkpoint_layers(sd) -> tuple[str, ...]:
    """Diffusers layer names stored as FP8 in a (diffusers-named) state dict: an fp8 `.weight` with a
    `.weight_scale` and no `.weight_scale_2` (that is NVFP4)."""
    return tuple(sorted(k[: -len(".weight")] for k, v in sd.items() if k.endswith(".weight")
                        and v.dtype in fp8.DTYPES and k + "_scale" in sd and k + "_scale_2" not in sd))


def quantize_structure(model: WanTransformer, config: NVFP4Config, device) -> WanTransformer:
    """Replace the modules `config` quantizes by EMPTY NVFP4 modules (model on "meta", to be filled by
    load_state_dict(assign=True)); the NVFP4Linear mode is chosen for `device`, where it will run."""
    impl = config.impl or nvfp4_impl(model.impl)
    mode = default_mode(device) if config.mode == "auto" else config.mode
    for native, _ in quantized_groups(model.config, config):
        old = model.get_submodule(native)
        if isinstance(old, StackedKV):
            L, C = old.norm_k.shape
            new = NVFP4StackedKV(L, C, old.weight.shape[1], mode=mode, impl=impl, device=old.weight.device)
        else:
            new = NVFP4Linear(old.in_features, old.out_features, old.bias is not None, mode=mode, impl=impl,
                              device=old.weight.device)
        _set_module(model, native, new)
    return _finish(model, config)


def checkpoint_layers(keys) -> tuple[str, ...]:
    """Diffusers layer names stored as NVFP4 in a (diffusers-named) state dict: those with weight_scale_2."""
    return tuple(sorted(k[: -len(".weight_scale_2")] for k in keys if k.endswith(".weight_scale_2")))
