"""Wan transformer checkpoints: load, save and convert (safetensors only, never pickle).

Formats (wan_model.io.formats.REGISTRY; key names and NVFP4 conventions in wan_model.compat.layouts):
  "diffusers"  a directory with config.json + diffusion_pytorch_model[-0000k-of-0000n].safetensors
               (+ .index.json when sharded), names of diffusers' WanTransformer3DModel
  "original"   one .safetensors file with the names of Wan-Video's wan/modules/model.py
  "comfyui"    the original names, optionally prefixed `model.diffusion_model.`; fp8 "scaled" files
               carry side-car keys (`scaled_fp8` + `<layer>.scale_weight`, or `<layer>.comfy_quant` +
               `<layer>.weight_scale`): their layers load as FP8Linear, the fp8 bytes kept (wan_model.compat.layouts)
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
(wan_model.compat.layouts.NVFP4_LAYOUTS), converted to ours at the file boundary; the layers with a per-tensor
scale are loaded into NVFP4Linear modules. A `<layer>.input_scale` (static activation scale) is carried
by conversions and not used by the model (its W4A4 path computes the activation scale per call).
"""

from __future__ import annotations

import json
import os

import torch

from wan_kernels import fp8
from wan_model.io._atomic import atomic_save, check_destination
from wan_model.core.config import WanConfig, block_indices, read_json
from wan_model.io.formats import (DIFFUSERS_LAYOUT, FORMATS, INDEX_NAME, PIPELINE_LAYOUT, REGISTRY, WEIGHTS_NAME,
                               detect_format, file_metadata, from_state_dict, nvfp4_hint_of_dir,
                               nvfp4_hint_of_file, parse_size, plan_units, progress_bar, read_safetensors,
                               save_layout, to_diffusers_names, vace_layers_of_file, writable_format,
                               write_checkpoint, write_into)
from wan_model.compat.layouts import (COMFY_PREFIX, IGNORED_KEYS, CheckpointError, diffusers_keys, diffusers_to_native,
                               diffusers_to_original_key, native_to_diffusers, original_to_diffusers_key)
from wan_model.compat.spellings import keeps_fp32
from wan_model.core.model import WanExperts, WanTransformer
from wan_model.io.gguf import is_gguf, read_gguf
from wan_model import quant
from wan_model.compat.quantize import NEVER_QUANTIZED, layer_groups, quantize_structure

__all__ = ["COMFY_PREFIX", "DIFFUSERS_LAYOUT", "FORMATS", "INDEX_NAME", "REGISTRY", "WEIGHTS_NAME", "CheckpointError", "WanExperts",
           "check_state_dict", "config_from_state_dict", "detect_format",
           "diffusers_keys", "diffusers_to_native", "diffusers_to_original_key", "load_model", "native_to_diffusers",
           "original_to_diffusers_key", "parse_size", "save_layout", "save_model", "save_state_dict", "source_files"]


# ---------------------------------------------------------------------------------------------
# Reading

def _checked(read, path: str, *args):
    """read(path, *args) with its ValueError (a malformed config.json, index or model_index.json) raised as a
    CheckpointError naming the file."""
    try:
        return read(path, *args)
    except CheckpointError:
        raise
    except ValueError as e:
        msg = str(e)
        raise CheckpointError(msg if path in msg else f"{path}: {msg}") from e


def _diffusers_files(directory: str) -> list[str]:
    index = os.path.join(directory, INDEX_NAME)
    if os.path.lexists(index):
        weight_map = _checked(read_json, index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: 'weight_map' must be a non-empty object (tensor name -> shard file), "
                                  f"got {type(weight_map).__name__}")
        for key, name in weight_map.items():  # shard names are plain file names in the directory
            if not isinstance(name, str) or name in ("", ".", "..") or os.path.basename(name) != name:
                raise CheckpointError(f"{index}: weight_map entry {key!r}: {name!r} is not a file name in "
                                      f"{directory} (paths, absolute or with '..', are refused)")
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


def dequantize_fp8_layers(sd: dict[str, torch.Tensor], cfg: WanConfig, keep: bool = True) -> dict[str, torch.Tensor]:
    """The FP8 layers of diffusers-named `sd` that cannot stay FP8 (keep=False: all of them) dequantized to
    fp32 (exact): those outside the quantizable Linear layers (the time embedder, which diffusers keeps in fp32;
    a Conv3d) and the members of a fused group (to_qkv, cross_kv) that is not FP8 as a whole."""
    method = quant.get("fp8")
    layers = set(method.checkpoint_layers(sd))
    if layers and keep:
        whole = {m for _, members in layer_groups(cfg) if set(members) <= layers for m in members}
        layers -= {m for m in whole if not m.startswith(NEVER_QUANTIZED)}
    if not layers:
        return sd
    sd = dict(sd)
    for layer in layers:
        sd[layer + ".weight"] = method.dequantize({"weight": sd[layer + ".weight"],
                                                   "weight_scale": sd.pop(layer + ".weight_scale")})
        sd.pop(layer + ".input_scale", None)
    return sd


def logical_shapes(sd: dict) -> dict:
    """Meta tensors of the dense shapes of a diffusers-named state dict (an NVFP4 `<layer>.weight` [N, K/2]
    counts as [N, K]; its scales are dropped): what `WanConfig.from_state_dict` reads."""
    from wan_model.core.config import _shape
    out = {}
    for k, v in sd.items():
        if k.endswith(SCALE_KEYS):
            continue
        shape = _shape(v)
        if k.endswith(".weight") and k + "_scale_2" in sd:
            if len(shape) != 2:
                raise CheckpointError(f"{k}: an NVFP4 weight (it has {k}_scale_2) is [N, K/2], got shape {shape}")
            shape = (shape[0], 2 * shape[1])
        out[k] = torch.empty(shape, device="meta")
    return out


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
    sd = dequantize_fp8_layers(sd, cfg)
    sd = {k: v for k, v in sd.items() if not any(s in k for s in IGNORED_KEYS) and not k.endswith(".input_scale")}
    native = diffusers_to_native(sd, cfg)
    native = {k: v.to(device=device) if _is_nvfp4_buffer(k, v) else
              v.to(device=device, dtype=torch.float32 if keeps_fp32(k) else dtype) for k, v in native.items()}
    _quantized_modules(model, found, device, native, skip=applied)  # the methods that read the tensors (FP8)
    model.load_state_dict(native, strict=True, assign=True)
    model._apply(lambda t: t)  # re-bind the op backends on the real device
    return model


SCALE_KEYS = (".weight_scale", ".weight_scale_2", ".input_scale")


def _is_nvfp4_buffer(key: str, t: torch.Tensor) -> bool:
    """Quantized weights (NVFP4 uint8, FP8, any integer) and scales keep their stored dtype whatever the load
    dtype."""
    return key.endswith(SCALE_KEYS) or not t.dtype.is_floating_point or t.dtype in fp8.DTYPES


def _pipeline_fields(root: str) -> dict:
    """boundary_ratio and expand_timesteps of a pipeline's model_index.json (checked as WanConfig fields)."""
    path = os.path.join(root, "model_index.json")
    if not os.path.lexists(path):
        return {}
    index = _checked(read_json, path)
    fields = {k: index[k] for k in ("boundary_ratio", "expand_timesteps") if index.get(k) is not None}
    _checked(lambda p: WanConfig(**fields), path)
    return fields


def load_diffusers_dir(directory: str, dtype=torch.bfloat16, device="cpu", impl="auto", progress=None,
                       cls=WanTransformer, **fields) -> WanTransformer:
    cfg, hint = dir_config(directory)
    sd = read_safetensors(_diffusers_files(directory), progress)
    sd, source, _ = to_diffusers_names(sd, hint)
    return model_from_state_dict(sd, cfg.replace(**fields), dtype, device, impl, source, cls)


def dir_config(directory: str) -> tuple[WanConfig, str | None]:
    """(config, the NVFP4 layout a diffusers-style directory declares: wan_model.io.formats.nvfp4_hint_of_dir),
    from ONE read of its config.json."""
    path = os.path.join(directory, "config.json")
    config = _checked(read_json, path)
    cfg = _checked(lambda where: WanConfig.from_diffusers_config(config, where), path)
    return cfg, nvfp4_hint_of_dir(directory, config)


def load_model(path, dtype: torch.dtype = torch.bfloat16, device="cpu", impl: str = "auto",
               config: WanConfig | None = None, boundary_ratio: float | None = None, progress: bool | None = None,
               cls=WanTransformer):
    """Load a Wan transformer from any supported layout (see the module docstring) as a `cls` (the public
    wan_model.WanModel passes itself).

    Returns a `cls`, or a WanExperts for a two-expert (Wan2.2 A14B) pipeline directory. `progress`: a
    progress bar over the bytes read (None: shown for checkpoints of 1 GB and more).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        pipeline = _pipeline_fields(path)
        fields = {"expand_timesteps": pipeline["expand_timesteps"]} if "expand_timesteps" in pipeline else {}
        if os.path.isdir(os.path.join(path, "transformer_2")):
            high = load_diffusers_dir(os.path.join(path, "transformer"), dtype, device, impl, progress, cls, **fields)
            low = load_diffusers_dir(os.path.join(path, "transformer_2"), dtype, device, impl, progress, cls, **fields)
            ratio = boundary_ratio if boundary_ratio is not None else pipeline.get("boundary_ratio")
            if ratio is None:  # Wan2.2 defaults (REFERENCE.md section 2)
                ratio = 0.9 if high.config.in_channels == 36 else 0.875
            for m in (high, low):
                m.config = m.config.replace(boundary_ratio=ratio, num_experts=2)
            return WanExperts(high, low, ratio)
        if os.path.isdir(os.path.join(path, "transformer")):
            return load_diffusers_dir(os.path.join(path, "transformer"), dtype, device, impl, progress, cls, **fields)
        return load_diffusers_dir(path, dtype, device, impl, progress, cls)
    if is_gguf(path):  # dequantized at load, one tensor at a time (wan_model.io.gguf)
        sd, source, _ = to_diffusers_names(read_gguf(path, dtype))
    else:
        sd = read_safetensors([path], progress)
        sd, source, _ = to_diffusers_names(sd, nvfp4_hint_of_file(file_metadata([path])))
    config = config or config_from_state_dict(sd, path)
    return model_from_state_dict(sd, config, dtype, device, impl, source, cls)


def config_from_state_dict(sd: dict, where: str) -> WanConfig:
    """The config derived from weight shapes, or a CheckpointError naming the missing or malformed key.
    A VACE state dict read from the safetensors file `where` takes its vace_layers from the file's metadata when
    the file has them (ours: wan_model.io.formats writes them), else they are derived (WanConfig.from_state_dict)."""
    vace = {}
    if "vace_patch_embedding.weight" in sd and str(where).endswith(".safetensors") and os.path.isfile(where):
        layers = vace_layers_of_file(file_metadata([where]), where)
        vace = {} if layers is None else {"vace_layers": layers}
    try:
        return WanConfig.from_state_dict(logical_shapes(sd), **vace)
    except KeyError as e:
        raise CheckpointError(f"{where}: cannot derive the config, key {e} is missing") from e
    except CheckpointError:
        raise
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from e


def source_files(src: str) -> tuple[list[str], WanConfig | None, str | None]:
    """The safetensors files of a checkpoint to convert, its config when it is a diffusers-style directory,
    and the NVFP4 layout it declares (wan_model.io.formats)."""
    if os.path.isdir(src):
        if os.path.isdir(os.path.join(src, "transformer_2")):
            raise CheckpointError(f"{src} is a two-expert pipeline: convert {src}/transformer and "
                                  f"{src}/transformer_2 one at a time")
        if os.path.isdir(os.path.join(src, "transformer")):
            src = os.path.join(src, "transformer")
        files = _diffusers_files(src)
        return (files, *dir_config(src))
    if not os.path.exists(src):
        raise CheckpointError(f"{src}: no such file or directory")
    if is_gguf(src):
        raise CheckpointError(f"{src} is a GGUF file, which is not streamed: convert it to safetensors first "
                              "(python -m wan_model convert SRC.gguf DST --format diffusers)")
    return [src], None, nvfp4_hint_of_file(file_metadata([src]))



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
