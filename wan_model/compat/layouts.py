"""The layouts of Wan checkpoints, as data: key names and how quantized layers fuse (REFERENCE.md sections 3, 5, 7).

Key names. Three namings of one transformer:
  diffusers  names of diffusers' WanTransformer3DModel (`blocks.N.attn1.to_q`, ...)
  original   names of Wan-Video's wan/modules/model.py (`blocks.N.self_attn.q`, ...); ComfyUI files use
             them too, optionally prefixed `model.diffusion_model.` (COMFY_PREFIX)
  native     our WanModel's state dict: the self-attention Q/K/V of a layer fused into one [3C, C]
             tensor, the cross-attention K/V of all layers stacked into one (see wan_model.core.model)
`diffusers_to_original_key` / `original_to_diffusers_key` rename one key; `diffusers_to_native` /
`native_to_diffusers` convert a whole state dict (fusing / splitting, NVFP4 and FP8 layers included).
VACE (diffusers' WanVACETransformer3DModel): `vace_patch_embedding` and `vace_blocks.N.` (a block's names, plus
`proj_in` (block 0) / `proj_out` = original `before_proj` / `after_proj`); natively the VACE blocks' Q/K/V fused
and their cross-attention K/V stacked apart (`vace_cross_kv`, `vace_cross_kv_img`).

The file layouts of quantized layers (NVFP4: ours, ComfyUI, ModelOpt, LightX2V; FP8: ours and ComfyUI's two
flavours) belong to their methods: wan_model/quant/nvfp4.py and wan_model/quant/fp8.py. ComfyUI's per-layer
marker (`<layer>.comfy_quant`), which both use, is here.
"""

from __future__ import annotations

import re

import torch

from wan_model.compat.common import MARKER_KEY, CheckpointError, cat_rows, marker_tensor, parse_marker  # noqa: F401 (re-exported)
from wan_model.core.config import WanConfig
from wan_model.quant import METHODS, stored_in

COMFY_PREFIX = "model.diffusion_model."
# diffusers ignores these keys on load (WanTransformer3DModel._keys_to_ignore_on_load_unexpected)
IGNORED_KEYS = ("norm_added_q",)


# ---------------------------------------------------------------------------------------------
# Key names: diffusers <-> original / ComfyUI

# diffusers module path -> original module path (outside the blocks)
_TOP = {
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.image_embedder.norm1": "img_emb.proj.0",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
    "condition_embedder.image_embedder.norm2": "img_emb.proj.4",
    "condition_embedder.image_embedder.pos_embed": "img_emb.emb_pos",
    "scale_shift_table": "head.modulation",
    "proj_out": "head.head",
    "patch_embedding": "patch_embedding",
    "vace_patch_embedding": "vace_patch_embedding",
}
# inside blocks.N (note the norm2/norm3 swap)
_BLOCK = {
    "scale_shift_table": "modulation",
    "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o", "attn1.norm_q": "self_attn.norm_q", "attn1.norm_k": "self_attn.norm_k",
    "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k", "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o", "attn2.norm_q": "cross_attn.norm_q", "attn2.norm_k": "cross_attn.norm_k",
    "attn2.add_k_proj": "cross_attn.k_img", "attn2.add_v_proj": "cross_attn.v_img",
    "attn2.norm_added_k": "cross_attn.norm_k_img",
    "norm2": "norm3",
    "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2",
}
_BLOCK_RE = re.compile(r"(blocks\.\d+\.)(.+)$")
# inside vace_blocks.N (VACE): a block's names + the projections in and out of the control stream (diffusers'
# single-file converter: before_proj -> proj_in, after_proj -> proj_out)
_VACE_BLOCK = {**_BLOCK, "proj_in": "before_proj", "proj_out": "after_proj"}
_VACE_RE = re.compile(r"(vace_blocks\.\d+\.)(.+)$")


def _rename(key: str, top: dict, block: dict, vace: dict | None = None) -> str | None:
    m = _BLOCK_RE.match(key)
    if m is None and vace is not None and (v := _VACE_RE.match(key)):
        m, block = v, vace
    prefix, rest, table = (m.group(1), m.group(2), block) if m else ("", key, top)
    for name in sorted(table, key=len, reverse=True):
        if rest == name or rest.startswith(name + "."):
            return prefix + table[name] + rest[len(name):]
    return None


def diffusers_to_original_key(key: str) -> str | None:
    """Original-Wan name of a diffusers key (None when it has none)."""
    return _rename(key, _TOP, _BLOCK, _VACE_BLOCK)


def original_to_diffusers_key(key: str) -> str | None:
    """diffusers name of an original-Wan / ComfyUI (unprefixed) key (None when unknown)."""
    return _rename(key, {v: k for k, v in _TOP.items()}, {v: k for k, v in _BLOCK.items()},
                   {v: k for k, v in _VACE_BLOCK.items()})


# ---------------------------------------------------------------------------------------------
# diffusers names <-> our module's names (fused self-attn QKV, stacked cross-attn K/V)

def native_direct(cfg: WanConfig) -> dict[str, str]:
    """diffusers key -> native key for every parameter renamed one to one."""
    m = {
        "patch_embedding.weight": "patch_embedding.weight", "patch_embedding.bias": "patch_embedding.bias",
        "scale_shift_table": "scale_shift_table",
        "proj_out.weight": "proj_out.weight", "proj_out.bias": "proj_out.bias",
    }
    for sub in ("time_embedder.linear_1", "time_embedder.linear_2", "time_proj", "text_embedder.linear_1",
                "text_embedder.linear_2"):
        for p in ("weight", "bias"):
            m[f"condition_embedder.{sub}.{p}"] = f"condition_embedder.{sub}.{p}"
    if cfg.has_image:
        ie = "condition_embedder.image_embedder."
        for d, n in (("norm1", "norm1"), ("norm2", "norm2"), ("ff.net.0.proj", "ff.proj_in"),
                     ("ff.net.2", "ff.proj_out")):
            for p in ("weight", "bias"):
                m[f"{ie}{d}.{p}"] = f"{ie}{n}.{p}"
        if cfg.pos_embed_seq_len is not None:
            m[ie + "pos_embed"] = ie + "pos_embed"
    for i in range(cfg.num_layers):
        _block_direct(m, f"blocks.{i}.")
    return m


def vace_direct(cfg: WanConfig) -> dict[str, str]:
    """diffusers key -> native key of the VACE parameters renamed one to one ({} without VACE). Kept apart from
    `native_direct`: quantization (wan_model.compat.quantize.layer_groups) reads that one, and the VACE branch
    stays dense."""
    m = {}
    if cfg.has_vace:
        for p in ("weight", "bias"):
            m[f"vace_patch_embedding.{p}"] = f"vace_patch_embedding.{p}"
        for j in range(len(cfg.vace_layers)):  # the control stream's projections (proj_in: VACE block 0 only)
            _block_direct(m, f"vace_blocks.{j}.", (("proj_in", "proj_in"),) * (j == 0) + (("proj_out", "proj_out"),))
    return m


def _block_direct(m: dict[str, str], b: str, extra=()) -> None:
    """The one-to-one parameters of the block at prefix `b` (+ `extra` (diffusers, native) modules) into `m`."""
    m[b + "scale_shift_table"] = b + "scale_shift_table"
    for d, n in (("attn1.to_out.0", "attn1.to_out"), ("attn2.to_q", "attn2.to_q"),
                 ("attn2.to_out.0", "attn2.to_out"), ("norm2", "norm2"), ("ffn.net.0.proj", "ffn.proj_in"),
                 ("ffn.net.2", "ffn.proj_out")) + tuple(extra):
        for p in ("weight", "bias"):
            m[f"{b}{d}.{p}"] = f"{b}{n}.{p}"
    for a, nq in (("attn1", "norm_q"), ("attn1", "norm_k"), ("attn2", "norm_q")):
        m[f"{b}{a}.{nq}.weight"] = f"{b}{a}.{nq}"


def stacked_kv(cfg: WanConfig) -> list[tuple[str, str, str, str]]:
    """(native stacked prefix, diffusers k module, v module, k-norm) of the cross-attn K/V sets."""
    out = [("cross_kv", "attn2.to_k", "attn2.to_v", "attn2.norm_k")]
    if cfg.has_image:
        out.append(("cross_kv_img", "attn2.add_k_proj", "attn2.add_v_proj", "attn2.norm_added_k"))
    return out


def block_stacks(cfg: WanConfig) -> list[tuple[str, int, list[tuple[str, str, str, str]]]]:
    """(block list prefix, its number of blocks, its `stacked_kv` sets) of the transformer blocks and, VACE, of the
    VACE blocks (their K/V stacked apart, native `vace_cross_kv` / `vace_cross_kv_img`)."""
    out = [("blocks", cfg.num_layers, stacked_kv(cfg))]
    if cfg.has_vace:
        out.append(("vace_blocks", len(cfg.vace_layers), [("vace_" + s[0], *s[1:]) for s in stacked_kv(cfg)]))
    return out


def diffusers_keys(cfg: WanConfig) -> set[str]:
    """Every key of a diffusers WanTransformer3DModel (VACE: WanVACETransformer3DModel) state dict for `cfg`."""
    keys = set(native_direct(cfg)) | set(vace_direct(cfg))
    for prefix, n, sets in block_stacks(cfg):
        for i in range(n):
            b = f"{prefix}.{i}."
            keys |= {f"{b}attn1.to_{x}.{p}" for x in "qkv" for p in ("weight", "bias")}
            for _, km, vm, nm in sets:
                keys |= {f"{b}{km}.weight", f"{b}{km}.bias", f"{b}{vm}.weight", f"{b}{vm}.bias", f"{b}{nm}.weight"}
    return keys


def _with_scales(mapping: dict[str, str], keys) -> dict[str, str]:
    """Extend a key mapping by the side-car keys of the quantization methods (<w>_scale, <w>_scale_2: each
    method's `suffixes`) of its `.weight` entries present in `keys`."""
    tails = sorted({s[len("weight"):] for m in METHODS.values() for s in m.suffixes if s != "weight"})
    out = dict(mapping)
    for a, b in mapping.items():
        if a.endswith(".weight") and b.endswith(".weight"):
            for suffix in tails:
                if a + suffix in keys:
                    out[a + suffix] = b + suffix
    return out


def _fuse(sd, names: list[str], out: dict, native: str) -> None:
    """Fuse the diffusers layers `names` (row order) into native module `native` (dense, or quantized: the
    method storing them fuses its scales, `Method.fuse_scales`)."""
    out[f"{native}.weight"] = cat_rows([sd[f"{n}.weight"] for n in names])
    out[f"{native}.bias"] = torch.cat([sd[f"{n}.bias"] for n in names])
    method = stored_in(sd, names[0])
    if method is not None:
        out.update(method.fuse_scales(sd, names, native))


def _unfuse(sd, names: list[str], out: dict, native: str, rows: int) -> None:
    """Inverse of `_fuse`: row slices of the native weight and bias (`rows` each), the scales by the method's
    `Method.unfuse_scales`."""
    for suffix in ("weight", "bias"):
        t = sd[f"{native}.{suffix}"]
        parts = t.view(torch.uint8).split(rows) if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else t.split(rows)
        for n, part in zip(names, parts):
            out[f"{n}.{suffix}"] = part.view(t.dtype)
    method = stored_in(sd, native)
    if method is not None:
        out.update(method.unfuse_scales(sd, names, native, rows))


def diffusers_to_native(sd: dict[str, torch.Tensor], cfg: WanConfig) -> dict[str, torch.Tensor]:
    """diffusers-named tensors -> our state dict (fuses QKV, stacks the cross-attn K/V of all layers).
    NVFP4 layers: packed weights and swizzled scales are row-concatenated, the shared scale checked."""
    out = {n: sd[d] for d, n in _with_scales({**native_direct(cfg), **vace_direct(cfg)}, sd).items()}
    for prefix, n, sets in block_stacks(cfg):
        for i in range(n):
            _fuse(sd, [f"{prefix}.{i}.attn1.to_{x}" for x in "qkv"], out, f"{prefix}.{i}.attn1.to_qkv")  # [3C, C]
        for name, km, vm, nm in sets:
            L = range(n)
            _fuse(sd, [f"{prefix}.{i}.{m}" for i in L for m in (km, vm)], out, name)                 # [L*2C, C]
            out[f"{name}.norm_k"] = torch.stack([sd[f"{prefix}.{i}.{nm}.weight"] for i in L])           # [L, C]
    return out


def native_to_diffusers(sd: dict[str, torch.Tensor], cfg: WanConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> diffusers-named tensors (splits QKV and the stacked K/V; contiguous copies)."""
    native_of = _with_scales({n: d for d, n in {**native_direct(cfg), **vace_direct(cfg)}.items()}, sd)
    out = {d: sd[n] for n, d in native_of.items()}
    C = cfg.dim
    for prefix, n, sets in block_stacks(cfg):
        for i in range(n):
            _unfuse(sd, [f"{prefix}.{i}.attn1.to_{x}" for x in "qkv"], out, f"{prefix}.{i}.attn1.to_qkv", C)
        for name, km, vm, nm in sets:
            L = range(n)
            _unfuse(sd, [f"{prefix}.{i}.{m}" for i in L for m in (km, vm)], out, name, C)
            for i in L:
                out[f"{prefix}.{i}.{nm}.weight"] = sd[f"{name}.norm_k"][i]
    return {k: v.contiguous() for k, v in out.items()}
