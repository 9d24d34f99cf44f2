"""Wan transformer checkpoints: load, save and convert (safetensors only, never pickle).

Formats (wan_model.io.formats.REGISTRY; key names in wan_model.compat.layouts, the quantized layers' file
layouts in wan_model.quant.nvfp4 / fp8):
  "diffusers"  a directory with config.json + diffusion_pytorch_model[-0000k-of-0000n].safetensors
               (+ .index.json when sharded), names of diffusers' WanTransformer3DModel
  "original"   one .safetensors file with the names of Wan-Video's wan/modules/model.py
  "comfyui"    the original names, optionally prefixed `model.diffusion_model.`; fp8 "scaled" files
               carry side-car keys (`scaled_fp8` + `<layer>.scale_weight`, or `<layer>.comfy_quant` +
               `<layer>.weight_scale`): their layers load as FP8Linear, the fp8 bytes kept (wan_model.quant.fp8)
  "comfyui-scaled-fp8"  as comfyui, FP8 layers written in the legacy `scaled_fp8` flavour
  "modelopt"   a diffusers directory of NVFP4 layers in NVIDIA ModelOpt's layout + hf_quant_config.json
  "lightx2v"   (read) one file, original names, NVFP4 layers in LightX2V's layout
  GGUF         (read here, dequantized at load; written by wan_model.io.gguf.convert_gguf) one .gguf file,
               original names, arch "wan" (city96's ComfyUI-GGUF files; diffusers' GGUF loader)
The format is detected on load; a Wan2.2 two-expert pipeline directory (`transformer/` + `transformer_2/`)
loads as a `WanExperts`.

Inside the model the self-attention Q/K/V weights are one fused [3C, C] tensor and the cross-attention
K/V weights of all layers one stacked tensor (see wan_model.core.model); conversion happens in
wan_model.compat.layouts.

NVFP4 checkpoints (wan_model.compat.quantize) hold, for each quantized layer, `<layer>.weight` (uint8 packed
E2M1), `<layer>.weight_scale` (float8_e4m3fn) and a per-tensor scale, in the layout of their format
(wan_model.quant.nvfp4.NVFP4_LAYOUTS), converted to ours at the file boundary; the layers with a per-tensor
scale are loaded into NVFP4Linear modules. A `<layer>.input_scale` (static activation scale) is carried
by conversions and not used by the model (its W4A4 path computes the activation scale per call).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import torch

from wan_kernels import fp8
from wan_model.io._atomic import atomic_save, check_destination
from wan_model.core.config import WanConfig, block_indices
from wan_model.io.formats import (DIFFUSERS_LAYOUT, FORMATS, INDEX_NAME, PIPELINE_LAYOUT, REGISTRY, WEIGHTS_NAME,
                               detect_format, from_state_dict, parse_size, plan_units, progress_bar, save_layout,
                               writable_format, write_checkpoint, write_into)
from wan_model.compat.layouts import (COMFY_PREFIX, IGNORED_KEYS, CheckpointError, diffusers_keys, diffusers_to_native,
                               diffusers_to_original_key, native_to_diffusers, original_to_diffusers_key)
from wan_model.compat.spellings import keeps_fp32
from wan_model.core.model import WanExperts, WanTransformer
from wan_model.io.source import Source, config_from_state_dict, open_source, pipeline_fields
from wan_model import quant
from wan_model.compat.quantize import layer_groups, quantize_structure

__all__ = ["COMFY_PREFIX", "DIFFUSERS_LAYOUT", "FORMATS", "INDEX_NAME", "REGISTRY", "WEIGHTS_NAME", "CheckpointError", "WanExperts",
           "check_state_dict", "config_from_state_dict", "detect_format",
           "diffusers_keys", "diffusers_to_native", "diffusers_to_original_key", "load_model", "native_to_diffusers",
           "original_to_diffusers_key", "parse_size", "open_source", "save_layout", "save_model", "save_state_dict"]


# ---------------------------------------------------------------------------------------------
# Loading

def _expected_model(cfg: WanConfig, quantized: dict[str, tuple[str, ...]] | None = None, device="cpu",
                    impl: str = "ref", native: dict[str, torch.Tensor] | None = None, cls=WanTransformer):
    """An empty `cls` (a WanTransformer) on "meta" whose layers `quantized` ({method: diffusers layers},
    `wan_model.quant.detect`) are empty modules of their method, as the method's `checkpoint_config` decides
    (FP8: from `native`, the checkpoint's native state dict: per-row where its scale is [N, 1])."""
    model = cls(cfg, impl=impl, device="meta")
    _quantized_modules(model, quantized, device, native)
    return model


def _quantized_modules(model: WanTransformer, quantized: dict[str, tuple[str, ...]] | None, device,
                       native: dict[str, torch.Tensor] | None = None, skip=frozenset()) -> set[str]:
    """Make the layers `quantized` of `model` empty modules of their method (methods in `skip` done already; one
    whose `checkpoint_config` needs `native` and has none is left); returns the methods applied."""
    groups = dict(layer_groups(model.config))
    applied = set()
    for name, layers in (quantized or {}).items():
        if name in skip:
            continue
        found = quant.get(name).checkpoint_config(groups, layers, native)
        if found is None:
            continue
        try:
            quantize_structure(model, found[0], device, found[1])
        except ValueError as e:
            raise CheckpointError(f"{name.upper()} checkpoint: {e}") from e
        applied.add(name)
    return applied


def dequantize_layers(sd: dict[str, torch.Tensor], cfg: WanConfig, keep: bool = True) -> dict[str, torch.Tensor]:
    """diffusers-named `sd` with the quantized layers its methods turn dense dequantized to fp32 (exact): those
    that cannot stay quantized in our model (keep=True), or every one a method does not keep through a cast
    conversion (keep=False); each method decides (`Method.dense_on_load`)."""
    groups = layer_groups(cfg)
    for name, layers in quant.detect(sd).items():
        method = quant.get(name)
        dense = method.dense_on_load(set(layers), groups, keep)
        if not dense:
            continue
        sd = dict(sd)
        for layer in sorted(dense):
            sd[layer + ".weight"] = method.dequantize({s: sd[f"{layer}.{s}"] for s in method.suffixes})
            for s in (*method.suffixes[1:], "input_scale"):
                sd.pop(f"{layer}.{s}", None)
    return sd


def check_state_dict(sd: dict[str, torch.Tensor], cfg: WanConfig, source: dict[str, str] | None = None,
                     quantized: dict[str, tuple[str, ...]] | None = None, expected=None) -> None:
    """Raise CheckpointError listing missing/unexpected keys, or quoting wrong dtypes or shapes (diffusers
    names). `quantized`: {method: the diffusers layers stored in it} (`wan_model.quant.detect`), in our layout,
    each with the keys of its method (NVFP4: weight, weight_scale, weight_scale_2; FP8: weight, weight_scale),
    optionally input_scale (read, not used by FP8).
    Tensors may be meta (only names, dtypes and shapes are read). The layer count and the key set are
    checked before anything of size `cfg` is built, so a config that disagrees fails at once. `expected()`: the
    (meta) model with the `quantized` structure to take the shapes from, built only once those checks passed
    (None: `_expected_model`)."""
    source = source or {}
    got = {k for k in sd if not any(s in k for s in IGNORED_KEYS)}
    blocks = block_indices(got)
    if len(blocks) != cfg.num_layers or max(blocks, default=-1) != cfg.num_layers - 1:
        raise CheckpointError(f"checkpoint does not match the Wan config: the config has {cfg.num_layers} layers, "
                              f"the checkpoint {len(blocks)} blocks (indices {sorted(blocks)[:3]}..."
                              f"{max(blocks, default=None)})")
    dense = diffusers_keys(cfg)
    quantized = {name: [layer for layer in layers if f"{layer}.weight" in dense]
                 for name, layers in (quantized or {}).items()}
    extra = {k: dt for name, layers in quantized.items() for k, dt in quant.get(name).checkpoint_keys(layers).items()}
    packed = {k: dt for k, dt in extra.items() if dt is not None}
    optional = {f"{layer}.input_scale" for layers in quantized.values() for layer in layers} & got
    packed.update({k: torch.float32 for k in optional})
    keys = dense | set(extra) | optional
    missing = sorted(keys - got)
    unexpected = sorted(source.get(k, k) for k in got - keys)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint does not match the Wan config (dim {cfg.dim}, {cfg.num_layers} layers, "
                              f"image={cfg.has_image}): missing keys {missing}; unexpected keys {unexpected}")
    bad = [f"{source.get(k, k)}: {sd[k].dtype} (expected {packed.get(k, 'a float dtype')})" for k in sorted(keys)
           if (sd[k].dtype != packed[k] if k in packed else not sd[k].dtype.is_floating_point)]
    if bad:
        raise CheckpointError(f"checkpoint tensors have unsupported dtypes: {'; '.join(bad[:8])}"
                              f"{'; ...' if len(bad) > 8 else ''} ({len(bad)} tensors; weights are float, NVFP4 "
                              "layers uint8 + float8_e4m3fn + float32 scales)")
    for name, method in quant.METHODS.items():
        method.check_checkpoint(sd, quantized.get(name, []), source, dense)
    model = expected() if expected is not None else _expected_model(cfg, quantized)
    shapes = {k: tuple(v.shape) for k, v in native_to_diffusers_meta(model).items()}
    shapes.update({k: () for k in optional})
    wrong = [f"{source.get(k, k)}: checkpoint {tuple(sd[k].shape)} vs model {shapes[k]}"
             for k in sorted(shapes) if tuple(sd[k].shape) != shapes[k]]
    if wrong:
        raise CheckpointError("checkpoint tensors have wrong shapes: " + "; ".join(wrong))


def native_to_diffusers_meta(model: WanTransformer) -> dict[str, torch.Tensor]:
    return native_to_diffusers(dict(model.state_dict()), model.config)


def model_from_state_dict(sd: dict[str, torch.Tensor], config: WanConfig | None = None,
                          dtype: torch.dtype = torch.bfloat16, device="cpu", impl: str = "auto",
                          source: dict[str, str] | None = None, cls=WanTransformer) -> WanTransformer:
    """Build a `cls` (WanTransformer or the public wan_model.WanModel) from diffusers-named tensors (shapes and
    keys checked).

    Parameters diffusers keeps in fp32 (time_embedder, scale_shift_table, norm1/2/3) are fp32, the rest
    `dtype`, exactly as WanTransformer3DModel.from_pretrained(torch_dtype=dtype) holds them.
    """
    cfg = config or config_from_state_dict(sd, "state dict")
    found = quant.detect(sd)
    built = []  # the one meta model of a load: the shape check's, built once the cheap checks passed

    def expected():
        if not built:
            m = cls(cfg, impl=impl, device="meta")
            built.append((m, _quantized_modules(m, found, device)))
        return built[0][0]
    check_state_dict(sd, cfg, source, found, expected)
    model, applied = expected(), built[0][1]
    sd = dequantize_layers(sd, cfg)
    sd = {k: v for k, v in sd.items() if not any(s in k for s in IGNORED_KEYS) and not k.endswith(".input_scale")}
    native = diffusers_to_native(sd, cfg)
    native = {k: v.to(device=device) if _keeps_stored_dtype(k, v) else
              v.to(device=device, dtype=torch.float32 if keeps_fp32(k) else dtype) for k, v in native.items()}
    _quantized_modules(model, found, device, native, skip=applied)  # the methods that read the tensors (FP8)
    model.load_state_dict(native, strict=True, assign=True)
    model.reset_balance()  # the buffers no checkpoint holds, off "meta"
    model._apply(lambda t: t)  # re-bind the op backends on the real device
    return model


SCALE_KEYS = (".weight_scale", ".weight_scale_2", ".input_scale")


def _keeps_stored_dtype(key: str, t: torch.Tensor) -> bool:
    """Quantized weights (NVFP4 uint8, FP8, any integer) and scales keep their stored dtype whatever the load
    dtype."""
    return key.endswith(SCALE_KEYS) or not t.dtype.is_floating_point or t.dtype in fp8.DTYPES


def _load(src: Source, dtype, device, impl, progress, cls, config: WanConfig | None = None, **fields):
    """The model of one opened source: its tensors read (GGUF: dequantized to `dtype`), the config it declares
    (a directory; `fields` replaced) or `config` or the one its shapes imply."""
    sd, source = src.read(progress, dtype)
    if src.declared is not None:
        cfg = src.declared.replace(**fields)
    else:
        cfg = config or src.config(sd)
    return model_from_state_dict(sd, cfg, dtype, device, impl, source, cls)


def load_model(path, dtype: torch.dtype = torch.bfloat16, device="cpu", impl: str = "auto",
               config: WanConfig | None = None, boundary_ratio: float | None = None, progress: bool | None = None,
               cls=WanTransformer):
    """Load a Wan transformer from any supported layout (see the module docstring; also a state dict in any of
    its namings) as a `cls` (the public wan_model.WanModel passes itself).

    Returns a `cls`, or a WanExperts for a two-expert (Wan2.2 A14B) pipeline directory. `progress`: a
    progress bar over the bytes read (None: shown for checkpoints of 1 GB and more). `config`: the config of a
    single-file or state-dict checkpoint (default: derived from its shapes); a directory declares its own.
    """
    if not isinstance(path, Mapping):
        path = os.fspath(path)
        if os.path.isdir(path) and os.path.isdir(os.path.join(path, "transformer_2")):
            pipeline = pipeline_fields(path)
            fields = {"expand_timesteps": pipeline["expand_timesteps"]} if "expand_timesteps" in pipeline else {}
            high, low = (_load(open_source(os.path.join(path, sub)), dtype, device, impl, progress, cls, **fields)
                         for sub in ("transformer", "transformer_2"))
            ratio = boundary_ratio if boundary_ratio is not None else pipeline.get("boundary_ratio")
            if ratio is None:  # Wan2.2 defaults (REFERENCE.md section 2)
                ratio = 0.9 if high.config.in_channels == 36 else 0.875
            for m in (high, low):
                m.config = m.config.replace(boundary_ratio=ratio, num_experts=2)
            return WanExperts(high, low, ratio)
    src = open_source(path)
    return _load(src, dtype, device, impl, progress, cls, config, **src.fields)



# ---------------------------------------------------------------------------------------------
# Saving (atomic and non-destructive, one writer: wan_model.io.formats)

def _cpu(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def _units(sd: dict[str, torch.Tensor], format: str):
    f = writable_format(format)
    return f, plan_units(f, {k: (v.dtype, tuple(v.shape)) for k, v in sd.items()})


def save_state_dict(sd: dict[str, torch.Tensor], cfg: WanConfig, path, format: str = "diffusers",
                    max_shard_size: int | str = "5GB", quantization: dict | None = None,
                    overwrite: bool = False, progress: bool | None = None) -> None:
    """Write diffusers-named tensors (NVFP4 layers in our layout) in `format`: a directory at `path`
    (diffusers, modelopt) or one safetensors file (original names; ComfyUI: prefixed
    `model.diffusion_model.`). `quantization`: the quantization_config of an NVFP4 model.

    Atomic and non-destructive (wan_model.io._atomic states the guarantee): an existing file is refused
    unless `overwrite`; an existing directory is replaced when empty or holding nothing but a checkpoint
    of ours (config.json + diffusion_pytorch_model*.safetensors [+ index, hf_quant_config.json]), else
    refused unless `overwrite`, which replaces those files only and keeps every other one. A kill
    mid-save leaves `path` as it was or complete. `progress`: a bar over the bytes written (None: shown
    from 1 GB on).
    """
    f = writable_format(format)
    if f.directory:
        parse_size(max_shard_size)
    check_destination(path, save_layout(format), overwrite)
    write_state_dict(sd, cfg, path, format, max_shard_size, quantization, overwrite, progress)


def write_state_dict(sd: dict[str, torch.Tensor], cfg: WanConfig, path, format: str = "diffusers",
                     max_shard_size: int | str = "5GB", quantization: dict | None = None,
                     overwrite: bool = False, progress: bool | None = None) -> None:
    """`save_state_dict` for a caller that checked `path` and the arguments already (the writer still checks
    the destination again when it commits: wan_model.io._atomic)."""
    sd = _cpu(sd)
    f, units = _units(sd, format)
    with progress_bar(sum(u.nbytes for u in units), "writing", progress) as bar:
        write_checkpoint(path, f, cfg, units, from_state_dict(sd), max_shard_size, quantization, overwrite,
                         progress=lambda u: bar.update(u.nbytes))


def _model_state(model: WanTransformer) -> tuple[dict[str, torch.Tensor], dict | None]:
    sd = native_to_diffusers(dict(model.state_dict()), model.config)
    return sd, model.quantization.to_json() if model.quantization is not None else None


def save_model(model: WanTransformer, path, format: str = "diffusers", max_shard_size: int | str = "5GB",
               overwrite: bool = False) -> None:
    """Save a WanModel (or a WanExperts pair as transformer/ + transformer_2/ + model_index.json of a
    pipeline dir), atomic and non-destructive as `save_state_dict`, `overwrite` as there."""
    if not isinstance(model, WanExperts):
        sd, quantization = _model_state(model)
        save_state_dict(sd, model.config, path, format, max_shard_size, quantization, overwrite)
        return
    if not writable_format(format).directory:
        raise ValueError(f"a two-expert model saves as a pipeline dir of a directory format only, got "
                         f"format={format!r}")
    parse_size(max_shard_size)
    with atomic_save(path, PIPELINE_LAYOUT, overwrite) as tmp:
        for sub, m in (("transformer", model.high), ("transformer_2", model.low)):
            sd, quantization = _model_state(m)
            sd = _cpu(sd)
            f, units = _units(sd, format)
            os.mkdir(os.path.join(tmp, sub))
            write_into(os.path.join(tmp, sub), f, m.config, units, from_state_dict(sd), max_shard_size, quantization)
        with open(os.path.join(tmp, "model_index.json"), "w") as fh:
            json.dump({"_class_name": "WanPipeline", "boundary_ratio": model.boundary_ratio}, fh, indent=2)
