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
NVFP4 checkpoints are in wan_model.quant.nvfp4.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from wan_model import quant
from wan_model.core.config import WanConfig
from wan_model.compat.layouts import native_direct, stacked_kv
from wan_model.core.model import WanTransformer, qkv_module_then_norm_rope
from wan_model.quant import DEFAULT_KEEP, FP8Config, FP8StackedKV, NVFP4Config, NVFP4StackedKV, QuantConfig

NEVER_QUANTIZED = ("condition_embedder.time_embedder.",)
__all__ = ["DEFAULT_KEEP", "NEVER_QUANTIZED", "FP8Config", "FP8StackedKV", "NVFP4Config", "NVFP4StackedKV",
           "layer_groups", "quantized_groups", "quantize_model", "quantize_structure", "quantized_impl",
           "set_quantized_impl"]


def quantized_impl(model_impl: str) -> str:
    """Backend of the quantized Linear ops for a model impl (nvfp4_linear has no C++ CPU kernel: "cpu" ->
    "auto")."""
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


def quantized_groups(cfg: WanConfig, config: QuantConfig) -> list[tuple[str, tuple[str, ...]]]:
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
    quant.method_of(config).check_groups(cfg, out)
    return out


def set_quantized_impl(model: WanTransformer, impl: str) -> None:
    """Point every quantized module of `model` at backend `impl` (mapped by `quantized_impl`)."""
    for m in model.modules():
        if quant.method_of_module(m) is not None:
            m.impl = quantized_impl(impl)


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def _finish(model: WanTransformer, config: QuantConfig) -> WanTransformer:
    for block in model.blocks:  # decided here, once: NVFP4 QKV GEMM, then the fused RMSNorm + RoPE op
        if quant.method_of_module(block.attn1.to_qkv) is not None:
            block.attn1.project_qkv = qkv_module_then_norm_rope
    model._quantization = config
    return model.dense_attention(getattr(model, "_dense", False))  # an 8-bit self-attention: its int8 projection


@torch.no_grad()
def quantize_model(model: WanTransformer, method: str = "nvfp4", config: QuantConfig | None = None) -> WanTransformer:
    """Quantize `model` in place with the registered method `method` (wan_model.quant; see the module
    docstring); returns it. Each quantized module is filled by the method's one quantizer, `quantize_weight`
    (a fused group is one native module, so its scale is already the max over its members)."""
    m = quant.get(method)
    if model.quantization is not None:
        raise ValueError("this model is already quantized")
    config = config or m.config()
    if not isinstance(config, m.config):
        raise ValueError(f"quantize({method!r}) takes an {m.config.__name__}, got {type(config).__name__}")
    impl = config.impl or quantized_impl(model.impl)
    for native, _ in quantized_groups(model.config, config):
        _set_module(model, native, m.quantized_from(model.get_submodule(native), config, impl))
    return _finish(model, config)


def quantize_structure(model: WanTransformer, config: QuantConfig, device,
                       options: dict[str, dict] | None = None) -> WanTransformer:
    """Replace the modules `config` quantizes by EMPTY modules of its method (model on "meta", to be filled by
    load_state_dict(assign=True)), configured to run on `device` (an NVFP4Linear's "auto" mode resolved there);
    `options`: per native module, the method's per-module fields (FP8: per_channel, input_scale)."""
    m = quant.method_of(config)
    impl = config.impl or quantized_impl(model.impl)
    run = m.for_device(config, device)
    for native, _ in quantized_groups(model.config, config):
        old = model.get_submodule(native)
        _set_module(model, native, m.module(old, run, impl, old.weight.device, **(options or {}).get(native, {})))
    return _finish(model, config)
