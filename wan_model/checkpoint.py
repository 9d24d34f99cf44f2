"""Checkpoint formats of Wan transformers: load and save (safetensors only, never pickle).

Formats (REFERENCE.md section 3), detected from the keys:
  "diffusers"  a directory with config.json + diffusion_pytorch_model[-0000k-of-0000n].safetensors
               (+ .index.json when sharded), names of diffusers' WanTransformer3DModel
  "original"   one .safetensors file with the names of Wan-Video's wan/modules/model.py
  "comfyui"    the original names, optionally prefixed `model.diffusion_model.`; fp8 "scaled" files
               carry side-car keys (`scaled_fp8` + `<layer>.scale_weight`, or `<layer>.comfy_quant` +
               `<layer>.weight_scale`) that are applied here (per-tensor fp8 scales) or rejected.
A Wan2.2 two-expert pipeline directory (`transformer/` + `transformer_2/`) loads as a `WanExperts`.

Inside the model the self-attention Q/K/V weights are one fused [3C, C] tensor and the cross-attention
K/V weights of all layers one stacked tensor (see wan_model.model); conversion happens here.

NVFP4 checkpoints (wan_model.quantize) hold, for each quantized layer, `<layer>.weight` (uint8 packed
E2M1), `<layer>.weight_scale` (float8_e4m3fn, 128x4 swizzled) and `<layer>.weight_scale_2` (fp32
scalar, decode convention) in any of the three namings; the layers with a `weight_scale_2` key are
loaded into NVFP4Linear modules. diffusers dirs also carry `quantization_config` in config.json and
every file the safetensors metadata `quantization: nvfp4`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from wan_model.config import WanConfig
from wan_model.model import WanModel, keeps_fp32

FORMATS = ("diffusers", "original", "comfyui")
COMFY_PREFIX = "model.diffusion_model."
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
# diffusers ignores these keys on load (WanTransformer3DModel._keys_to_ignore_on_load_unexpected)
IGNORED_KEYS = ("norm_added_q",)


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not match the model."""


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


def _rename(key: str, top: dict, block: dict) -> str | None:
    m = _BLOCK_RE.match(key)
    prefix, rest, table = (m.group(1), m.group(2), block) if m else ("", key, top)
    for name in sorted(table, key=len, reverse=True):
        if rest == name or rest.startswith(name + "."):
            return prefix + table[name] + rest[len(name):]
    return None


def diffusers_to_original_key(key: str) -> str | None:
    """Original-Wan name of a diffusers key (None when it has none)."""
    return _rename(key, _TOP, _BLOCK)


def original_to_diffusers_key(key: str) -> str | None:
    """diffusers name of an original-Wan / ComfyUI (unprefixed) key (None when unknown)."""
    return _rename(key, {v: k for k, v in _TOP.items()}, {v: k for k, v in _BLOCK.items()})


# ---------------------------------------------------------------------------------------------
# diffusers names <-> our module's names (fused self-attn QKV, stacked cross-attn K/V)

def _native_direct(cfg: WanConfig) -> dict[str, str]:
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
        b = f"blocks.{i}."
        m[b + "scale_shift_table"] = b + "scale_shift_table"
        for d, n in (("attn1.to_out.0", "attn1.to_out"), ("attn2.to_q", "attn2.to_q"),
                     ("attn2.to_out.0", "attn2.to_out"), ("norm2", "norm2"), ("ffn.net.0.proj", "ffn.proj_in"),
                     ("ffn.net.2", "ffn.proj_out")):
            for p in ("weight", "bias"):
                m[f"{b}{d}.{p}"] = f"{b}{n}.{p}"
        for a, nq in (("attn1", "norm_q"), ("attn1", "norm_k"), ("attn2", "norm_q")):
            m[f"{b}{a}.{nq}.weight"] = f"{b}{a}.{nq}"
    return m


def _stacked(cfg: WanConfig) -> list[tuple[str, str, str, str]]:
    """(native stacked prefix, diffusers k module, v module, k-norm) of the cross-attn K/V sets."""
    out = [("cross_kv", "attn2.to_k", "attn2.to_v", "attn2.norm_k")]
    if cfg.has_image:
        out.append(("cross_kv_img", "attn2.add_k_proj", "attn2.add_v_proj", "attn2.norm_added_k"))
    return out


def diffusers_keys(cfg: WanConfig) -> set[str]:
    """Every key of a diffusers WanTransformer3DModel state dict for `cfg`."""
    keys = set(_native_direct(cfg))
    for i in range(cfg.num_layers):
        b = f"blocks.{i}."
        keys |= {f"{b}attn1.to_{x}.{p}" for x in "qkv" for p in ("weight", "bias")}
        for _, km, vm, nm in _stacked(cfg):
            keys |= {f"{b}{km}.weight", f"{b}{km}.bias", f"{b}{vm}.weight", f"{b}{vm}.bias", f"{b}{nm}.weight"}
    return keys


def _with_nvfp4_scales(mapping: dict[str, str], keys) -> dict[str, str]:
    """Extend a key mapping by the NVFP4 side-car keys (<w>_scale, <w>_scale_2) of its `.weight` entries
    present in `keys`."""
    out = dict(mapping)
    for a, b in mapping.items():
        if a.endswith(".weight") and b.endswith(".weight"):
            for suffix in ("_scale", "_scale_2"):
                if a + suffix in keys:
                    out[a + suffix] = b + suffix
    return out


def _cat_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat along rows, also for float8 tensors (concatenated as their bytes)."""
    if parts[0].dtype == torch.float8_e4m3fn:
        return torch.cat([p.view(torch.uint8) for p in parts]).view(torch.float8_e4m3fn)
    return torch.cat(parts)


def _shared_scale(parts: list[torch.Tensor], names: list[str]) -> torch.Tensor:
    """The one global scale of a fused NVFP4 group: all members must carry the same weight_scale_2."""
    first = parts[0]
    if first.device.type != "meta" and any(not torch.equal(p, first) for p in parts[1:]):
        bad = [n for n, p in zip(names, parts) if not torch.equal(p, first)]
        raise CheckpointError(f"NVFP4 layers {names[0]} ... run as one GEMM with one global scale, but their "
                              f"weight_scale_2 differ ({bad[:4]} vs {names[0]}): re-quantizing them would be "
                              "lossy; quantize the dense checkpoint with `python -m wan_model convert --quantize "
                              "nvfp4` instead")
    return first


def _fuse(sd, names: list[str], out: dict, native: str) -> None:
    """Fuse the diffusers layers `names` (row order) into native module `native` (dense or NVFP4)."""
    out[f"{native}.weight"] = _cat_rows([sd[f"{n}.weight"] for n in names])
    out[f"{native}.bias"] = torch.cat([sd[f"{n}.bias"] for n in names])
    if f"{names[0]}.weight_scale_2" in sd:
        out[f"{native}.weight_scale"] = _cat_rows([sd[f"{n}.weight_scale"] for n in names])
        out[f"{native}.weight_scale_2"] = _shared_scale([sd[f"{n}.weight_scale_2"] for n in names], names)


def _unfuse(sd, names: list[str], out: dict, native: str, rows: int) -> None:
    """Inverse of `_fuse`: row slices of the native tensors (NVFP4 scales: `rows` is a multiple of 128)."""
    for suffix in ("weight", "bias", "weight_scale"):
        if f"{native}.{suffix}" in sd:
            t = sd[f"{native}.{suffix}"]
            parts = t.view(torch.uint8).split(rows) if t.dtype == torch.float8_e4m3fn else t.split(rows)
            for n, part in zip(names, parts):
                out[f"{n}.{suffix}"] = part.view(t.dtype)
    if f"{native}.weight_scale_2" in sd:
        for n in names:
            out[f"{n}.weight_scale_2"] = sd[f"{native}.weight_scale_2"].clone()  # safetensors: no shared storage


def diffusers_to_native(sd: dict[str, torch.Tensor], cfg: WanConfig) -> dict[str, torch.Tensor]:
    """diffusers-named tensors -> our state dict (fuses QKV, stacks the cross-attn K/V of all layers).
    NVFP4 layers: packed weights and swizzled scales are row-concatenated, the shared scale checked."""
    out = {n: sd[d] for d, n in _with_nvfp4_scales(_native_direct(cfg), sd).items()}
    for i in range(cfg.num_layers):
        _fuse(sd, [f"blocks.{i}.attn1.to_{x}" for x in "qkv"], out, f"blocks.{i}.attn1.to_qkv")  # [3C, C]
    for name, km, vm, nm in _stacked(cfg):
        L = range(cfg.num_layers)
        _fuse(sd, [f"blocks.{i}.{m}" for i in L for m in (km, vm)], out, name)                    # [L*2C, C]
        out[f"{name}.norm_k"] = torch.stack([sd[f"blocks.{i}.{nm}.weight"] for i in L])                # [L, C]
    return out


def native_to_diffusers(sd: dict[str, torch.Tensor], cfg: WanConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> diffusers-named tensors (splits QKV and the stacked K/V; contiguous copies)."""
    native_of = _with_nvfp4_scales({n: d for d, n in _native_direct(cfg).items()}, sd)
    out = {d: sd[n] for n, d in native_of.items()}
    C = cfg.dim
    for i in range(cfg.num_layers):
        _unfuse(sd, [f"blocks.{i}.attn1.to_{x}" for x in "qkv"], out, f"blocks.{i}.attn1.to_qkv", C)
    for name, km, vm, nm in _stacked(cfg):
        L = range(cfg.num_layers)
        _unfuse(sd, [f"blocks.{i}.{m}" for i in L for m in (km, vm)], out, name, C)
        for i in L:
            out[f"blocks.{i}.{nm}.weight"] = sd[f"{name}.norm_k"][i]
    return {k: v.contiguous() for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# Reading safetensors

def _open(path: str):
    try:
        return safe_open(path, framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        size = os.path.getsize(path) if os.path.exists(path) else None
        raise CheckpointError(f"cannot read safetensors file {path} ({size} bytes): {e}. The file is truncated, "
                              "corrupt or not safetensors (pickle .bin/.pt/.ckpt files are not loaded)") from e


def read_safetensors(paths: list[str]) -> dict[str, torch.Tensor]:
    """All tensors of the files (checked: a truncated/corrupt file raises CheckpointError)."""
    out: dict[str, torch.Tensor] = {}
    for path in paths:
        if not path.endswith(".safetensors"):
            raise CheckpointError(f"{path}: only .safetensors checkpoints are loaded (never pickle)")
        f = _open(path)
        with f:
            for k in f.keys():
                try:
                    out[k] = f.get_tensor(k)
                except (SafetensorError, RuntimeError, ValueError) as e:
                    raise CheckpointError(f"cannot read tensor {k!r} from {path}: {e}") from e
    return out


def _diffusers_files(directory: str) -> list[str]:
    index = os.path.join(directory, INDEX_NAME)
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"cannot read the shard index {index}: {e}") from e
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.exists(os.path.join(directory, f))]
        if missing:
            raise CheckpointError(f"{index} names shards that are missing in {directory}: {missing}")
        return [os.path.join(directory, f) for f in files]
    single = os.path.join(directory, WEIGHTS_NAME)
    if os.path.exists(single):
        return [single]
    found = sorted(os.listdir(directory))
    raise CheckpointError(f"{directory}: no {WEIGHTS_NAME} or {INDEX_NAME} (found {found}); "
                          "only safetensors checkpoints are loaded")


# ---------------------------------------------------------------------------------------------
# ComfyUI fp8 side-car keys

def _apply_comfy_scales(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Dequantize fp8 "scaled" weights (weight * per-tensor scale) and drop the side-car keys.

    Supported: `scaled_fp8` + `<layer>.scale_weight` (+ `scale_input`, unused when dequantizing), and
    `<layer>.comfy_quant` {"format": "float8_e4m3fn"/"float8_e5m2"} + per-tensor `<layer>.weight_scale`.
    Anything else (block-scaled or fp4 formats) is rejected with the layer and format named.
    """
    sd = dict(sd)
    sd.pop("scaled_fp8", None)
    for key in [k for k in sd if k.endswith(".comfy_quant")]:
        layer = key[: -len(".comfy_quant")]
        try:
            spec = json.loads(bytes(sd.pop(key).to(torch.uint8).tolist()).decode())
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{key}: cannot parse the ComfyUI quantization spec: {e}") from e
        fmt = spec.get("format")
        scale = sd.pop(layer + ".weight_scale", None)
        if fmt not in ("float8_e4m3fn", "float8_e5m2") or scale is None or scale.numel() != 1:
            raise CheckpointError(
                f"{layer}: ComfyUI quantized weight format {spec} is not supported (only fp8 with one per-tensor "
                f"weight_scale; got weight_scale {None if scale is None else tuple(scale.shape)}); "
                "convert the file to bf16 first")
        sd[layer + ".weight"] = sd[layer + ".weight"].float() * scale.float()
        sd.pop(layer + ".input_scale", None)
    for key in [k for k in sd if k.endswith(".scale_weight")]:
        layer = key[: -len(".scale_weight")]
        scale = sd.pop(key)
        if scale.numel() != 1:
            raise CheckpointError(f"{key}: only per-tensor fp8 scales are supported, got shape {tuple(scale.shape)}")
        if layer + ".weight" not in sd:
            raise CheckpointError(f"{key}: scale for a missing weight {layer}.weight")
        sd[layer + ".weight"] = sd[layer + ".weight"].float() * scale.float()
        sd.pop(layer + ".scale_input", None)
    fp8 = [k for k, v in sd.items() if v.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
           and not (k.endswith(".weight_scale") and k + "_2" in sd)]  # NVFP4 block scales are e4m3 too
    if fp8:
        raise CheckpointError(f"fp8 weights without a scale (not a supported ComfyUI scaled file): {fp8[:8]}")
    return sd


# ---------------------------------------------------------------------------------------------
# Loading

def detect_format(keys) -> str:
    """"diffusers", "original" or "comfyui" from the key names (raises CheckpointError when none)."""
    keys = set(keys)
    if any(k.startswith(COMFY_PREFIX) for k in keys) or "scaled_fp8" in keys or any(
            k.endswith((".scale_weight", ".comfy_quant")) for k in keys):
        return "comfyui"
    if "head.modulation" in keys:
        return "original"
    if "scale_shift_table" in keys and "proj_out.weight" in keys:
        return "diffusers"
    raise CheckpointError(f"not a Wan transformer checkpoint: none of 'head.modulation', "
                          f"'{COMFY_PREFIX}head.modulation', 'scale_shift_table' found; first keys {sorted(keys)[:8]}")


def to_diffusers_names(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """Any supported format -> (diffusers-named tensors, {diffusers key: key in the file}, format)."""
    fmt = detect_format(sd)
    if fmt == "diffusers":
        return dict(sd), {k: k for k in sd}, fmt
    if fmt == "comfyui":
        sd = {k.removeprefix(COMFY_PREFIX): v for k, v in sd.items()}
        sd = _apply_comfy_scales(sd)
    out, source = {}, {}
    for k, v in sd.items():
        d = original_to_diffusers_key(k) or k  # unknown keys stay as they are: reported as unexpected
        out[d], source[d] = v, k
    return out, source, fmt


def _expected_model(cfg: WanConfig, nvfp4_layers: tuple[str, ...] = (), device="cpu", impl: str = "ref"):
    """An empty WanModel on "meta" with the layers `nvfp4_layers` (diffusers names) as NVFP4 modules."""
    model = WanModel(cfg, impl=impl, device="meta")
    if nvfp4_layers:
        from wan_model.quantize import NVFP4Config, quantize_structure
        try:
            quantize_structure(model, NVFP4Config(layers=tuple(nvfp4_layers)), device)
        except ValueError as e:
            raise CheckpointError(f"NVFP4 checkpoint: {e}") from e
    return model


def logical_shapes(sd: dict) -> dict:
    """Meta tensors of the dense shapes of a diffusers-named state dict (an NVFP4 `<layer>.weight` [N, K/2]
    counts as [N, K]; its scales are dropped): what `WanConfig.from_state_dict` reads."""
    from wan_model.config import _shape
    out = {}
    for k, v in sd.items():
        if k.endswith(SCALE_KEYS):
            continue
        shape = _shape(v)
        if k.endswith(".weight") and k + "_scale_2" in sd:
            shape = (shape[0], 2 * shape[1])
        out[k] = torch.empty(shape, device="meta")
    return out


def check_state_dict(sd: dict[str, torch.Tensor], cfg: WanConfig, source: dict[str, str] | None = None,
                     nvfp4_layers: tuple[str, ...] = ()) -> None:
    """Raise CheckpointError listing missing/unexpected keys or quoting wrong shapes (diffusers names).
    `nvfp4_layers`: the diffusers layers stored as NVFP4 (weight, weight_scale, weight_scale_2)."""
    source = source or {}
    expected = _expected_model(cfg, nvfp4_layers)
    shapes = {k: tuple(v.shape) for k, v in native_to_diffusers_meta(expected).items()}
    got = {k for k in sd if not any(s in k for s in IGNORED_KEYS)}
    missing = sorted(set(shapes) - got)
    unexpected = sorted(source.get(k, k) for k in got - set(shapes))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint does not match the Wan config (dim {cfg.dim}, {cfg.num_layers} layers, "
                              f"image={cfg.has_image}): missing keys {missing}; unexpected keys {unexpected}")
    wrong = [f"{source.get(k, k)}: checkpoint {tuple(sd[k].shape)} vs model {shapes[k]}"
             for k in sorted(shapes) if tuple(sd[k].shape) != shapes[k]]
    if wrong:
        raise CheckpointError("checkpoint tensors have wrong shapes: " + "; ".join(wrong))


def native_to_diffusers_meta(model: WanModel) -> dict[str, torch.Tensor]:
    return native_to_diffusers(dict(model.state_dict()), model.config)


def model_from_state_dict(sd: dict[str, torch.Tensor], config: WanConfig | None = None,
                          dtype: torch.dtype = torch.bfloat16, device="cpu", impl: str = "auto",
                          source: dict[str, str] | None = None) -> WanModel:
    """Build a WanModel from diffusers-named tensors (shapes and keys checked).

    Parameters diffusers keeps in fp32 (time_embedder, scale_shift_table, norm1/2/3) are fp32, the rest
    `dtype`, exactly as WanTransformer3DModel.from_pretrained(torch_dtype=dtype) holds them.
    """
    from wan_model.quantize import checkpoint_layers

    cfg = config or WanConfig.from_state_dict(logical_shapes(sd))
    nvfp4_layers = checkpoint_layers(sd)
    check_state_dict(sd, cfg, source, nvfp4_layers)
    sd = {k: v for k, v in sd.items() if not any(s in k for s in IGNORED_KEYS)}
    native = diffusers_to_native(sd, cfg)
    native = {k: v.to(device=device) if _is_nvfp4_buffer(k, v) else
              v.to(device=device, dtype=torch.float32 if keeps_fp32(k) else dtype) for k, v in native.items()}
    model = _expected_model(cfg, nvfp4_layers, device, impl)
    model.load_state_dict(native, strict=True, assign=True)
    model._apply(lambda t: t)  # re-bind the op backends on the real device
    return model


SCALE_KEYS = (".weight_scale", ".weight_scale_2")


def _is_nvfp4_buffer(key: str, t: torch.Tensor) -> bool:
    """Packed weights (uint8) and scales keep their stored dtype whatever the load dtype."""
    return key.endswith(SCALE_KEYS) or t.dtype == torch.uint8


@dataclasses.dataclass
class WanExperts:
    """Wan2.2 A14B: high-noise expert `high` (t >= boundary_ratio * 1000), then low-noise `low`."""

    high: WanModel
    low: WanModel
    boundary_ratio: float

    def expert(self, t: float) -> WanModel:
        return self.high if t >= self.boundary_ratio * 1000 else self.low


def _pipeline_fields(root: str) -> dict:
    path = os.path.join(root, "model_index.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        index = json.load(f)
    return {k: index[k] for k in ("boundary_ratio", "expand_timesteps") if index.get(k) is not None}


def load_diffusers_dir(directory: str, dtype=torch.bfloat16, device="cpu", impl="auto", **fields) -> WanModel:
    cfg = WanConfig.from_diffusers_config(directory).replace(**fields)
    sd = read_safetensors(_diffusers_files(directory))
    sd, source, _ = to_diffusers_names(sd)
    return model_from_state_dict(sd, cfg, dtype, device, impl, source)


def load_model(path, dtype: torch.dtype = torch.bfloat16, device="cpu", impl: str = "auto",
               config: WanConfig | None = None, boundary_ratio: float | None = None):
    """Load a Wan transformer from any supported layout (see the module docstring).

    Returns a WanModel, or a WanExperts for a two-expert (Wan2.2 A14B) pipeline directory.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        fields = _pipeline_fields(path)
        fields = {"expand_timesteps": fields["expand_timesteps"]} if "expand_timesteps" in fields else {}
        if os.path.isdir(os.path.join(path, "transformer_2")):
            high = load_diffusers_dir(os.path.join(path, "transformer"), dtype, device, impl, **fields)
            low = load_diffusers_dir(os.path.join(path, "transformer_2"), dtype, device, impl, **fields)
            ratio = boundary_ratio or _pipeline_fields(path).get("boundary_ratio")
            if ratio is None:  # Wan2.2 defaults (REFERENCE.md section 2)
                ratio = 0.9 if high.config.in_channels == 36 else 0.875
            for m in (high, low):
                m.config = m.config.replace(boundary_ratio=ratio, num_experts=2)
            return WanExperts(high, low, ratio)
        if os.path.isdir(os.path.join(path, "transformer")):
            return load_diffusers_dir(os.path.join(path, "transformer"), dtype, device, impl, **fields)
        return load_diffusers_dir(path, dtype, device, impl)
    sd = read_safetensors([path])
    sd, source, _ = to_diffusers_names(sd)
    config = config or config_from_state_dict(sd, path)
    return model_from_state_dict(sd, config, dtype, device, impl, source)


def config_from_state_dict(sd: dict, where: str) -> WanConfig:
    """The config derived from weight shapes, or a CheckpointError naming the missing key."""
    try:
        return WanConfig.from_state_dict(logical_shapes(sd))
    except KeyError as e:
        raise CheckpointError(f"{where}: cannot derive the config, key {e} is missing") from e


def source_files(src: str) -> tuple[list[str], WanConfig | None]:
    """The safetensors files of a checkpoint to convert, and its config when it is a diffusers directory."""
    if os.path.isdir(src):
        if os.path.isdir(os.path.join(src, "transformer_2")):
            raise CheckpointError(f"{src} is a two-expert pipeline: convert {src}/transformer and "
                                  f"{src}/transformer_2 one at a time")
        if os.path.isdir(os.path.join(src, "transformer")):
            src = os.path.join(src, "transformer")
        return _diffusers_files(src), WanConfig.from_diffusers_config(src)
    if not os.path.exists(src):
        raise CheckpointError(f"{src}: no such file or directory")
    return [src], None


# ---------------------------------------------------------------------------------------------
# Saving (atomic: everything is written under a temporary name, then renamed)

def parse_size(size: int | str) -> int:
    """'5GB', '500MB', '10KB' or bytes -> bytes (decimal units, as diffusers/huggingface_hub)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B)\s*", size.upper())
    if not m:
        raise ValueError(f"cannot parse max_shard_size {size!r}; use bytes or e.g. '5GB', '200MB'")
    return int(float(m.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}[m.group(2)])


def _shards(sd: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, cur, cur_bytes = [], {}, 0
    for k in sorted(sd):
        n = sd[k].numel() * sd[k].element_size()
        if cur and cur_bytes + n > max_bytes:
            shards.append(cur)
            cur, cur_bytes = {}, 0
        cur[k] = sd[k]
        cur_bytes += n
    return shards + [cur] if cur else shards


def _metadata(quantization: dict | None) -> dict[str, str]:
    return {"format": "pt", "quantization": quantization["quant_method"]} if quantization else {"format": "pt"}


def _write_diffusers(tmp: str, sd: dict[str, torch.Tensor], cfg: WanConfig, max_bytes: int,
                     quantization: dict | None = None) -> None:
    shards = _shards(sd, max_bytes)
    config = cfg.to_diffusers_config()
    if quantization:
        config["quantization_config"] = quantization
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(tmp, WEIGHTS_NAME), metadata=_metadata(quantization))
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(tmp, name), metadata=_metadata(quantization))
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    with open(os.path.join(tmp, INDEX_NAME), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)


def _replace(tmp: str, dst: str) -> None:
    """Move tmp to dst; an existing dst is replaced only after tmp is complete."""
    if os.path.lexists(dst):
        old = tmp + ".old"
        os.rename(dst, old)
        os.rename(tmp, dst)
        shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)
    else:
        os.rename(tmp, dst)


def save_state_dict(sd: dict[str, torch.Tensor], cfg: WanConfig, path, format: str = "diffusers",
                    max_shard_size: int | str = "5GB", quantization: dict | None = None) -> None:
    """Write diffusers-named tensors in `format`: a diffusers dir at `path`, or one safetensors file
    (original names; ComfyUI: prefixed `model.diffusion_model.`). Atomic: nothing half-written remains.
    `quantization`: the quantization_config of an NVFP4 model (config.json field + file metadata)."""
    if format not in FORMATS:
        raise ValueError(f"unknown checkpoint format {format!r}; expected one of {FORMATS}")
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    if format == "diffusers":
        max_bytes = parse_size(max_shard_size)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
        try:
            _write_diffusers(tmp, sd, cfg, max_bytes, quantization)
            _replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return
    prefix = COMFY_PREFIX if format == "comfyui" else ""
    out = {}
    for k, v in sd.items():
        o = diffusers_to_original_key(k)
        if o is None:
            raise CheckpointError(f"{k}: no original-Wan name for this diffusers key")
        out[prefix + o] = v
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", suffix=".safetensors", dir=parent)
    os.close(fd)
    try:
        save_file(out, tmp, metadata=_metadata(quantization))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_model(model: WanModel, path, format: str = "diffusers", max_shard_size: int | str = "5GB") -> None:
    """Save a WanModel (or a WanExperts pair as transformer/ + transformer_2/ of a pipeline dir)."""
    if isinstance(model, WanExperts):
        if format != "diffusers":
            raise ValueError(f"a two-expert model saves as a diffusers pipeline dir only, got format={format!r}")
        path = os.path.abspath(os.fspath(path))
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=os.path.dirname(path))
        try:
            for sub, m in (("transformer", model.high), ("transformer_2", model.low)):
                save_model(m, os.path.join(tmp, sub), "diffusers", max_shard_size)
            with open(os.path.join(tmp, "model_index.json"), "w") as f:
                json.dump({"_class_name": "WanPipeline", "boundary_ratio": model.boundary_ratio}, f, indent=2)
            _replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return
    sd = native_to_diffusers(dict(model.state_dict()), model.config)
    quantization = model.quantization.to_json() if model.quantization is not None else None
    save_state_dict(sd, model.config, path, format, max_shard_size, quantization)


def convert_checkpoint(src, dst, format: str, dtype: torch.dtype | None = None,
                       max_shard_size: int | str = "5GB", quantize: str | None = None, nvfp4_config=None,
                       progress: bool = True) -> WanConfig:
    """Convert one Wan transformer checkpoint (any supported format) to `format` at `dst`.

    Tensors keep their stored dtype unless `dtype` is given (then diffusers' fp32 modules stay fp32);
    ComfyUI fp8 scaled weights come out dequantized (fp32, or `dtype`). Returns the config.
    quantize="nvfp4": stream the conversion tensor by tensor and quantize on the fly
    (wan_model.quantize.convert_nvfp4, `nvfp4_config` picks the layers); memory stays bounded.
    """
    if quantize is not None:
        if quantize != "nvfp4":
            raise ValueError(f"unknown quantization {quantize!r}; expected 'nvfp4'")
        from wan_model.quantize import convert_nvfp4
        return convert_nvfp4(src, dst, format, nvfp4_config, dtype, max_shard_size, progress)
    src = os.fspath(src)
    files, cfg = source_files(src)
    sd, source, _ = to_diffusers_names(read_safetensors(files))
    cfg = cfg or config_from_state_dict(sd, src)
    from wan_model.quantize import NVFP4Config, checkpoint_layers
    nvfp4_layers = checkpoint_layers(sd)  # an NVFP4 checkpoint changes naming only: its buffers are kept
    check_state_dict(sd, cfg, source, nvfp4_layers)
    sd = {k: v for k, v in sd.items() if not any(s in k for s in IGNORED_KEYS)}
    if dtype is not None:
        sd = {k: v if _is_nvfp4_buffer(k, v) else v.to(torch.float32 if keeps_fp32(k) else dtype)
              for k, v in sd.items()}
    quantization = NVFP4Config(layers=nvfp4_layers).to_json() if nvfp4_layers else None
    save_state_dict(sd, cfg, dst, format, max_shard_size, quantization)
    return cfg
