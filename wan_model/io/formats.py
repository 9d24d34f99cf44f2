"""Checkpoint file formats: the registry, reading (detection, renaming, NVFP4 decoding) and ONE writer.

A `Format` is a container (a diffusers-style directory or one .safetensors file), a key naming
(wan_model.compat.layouts) and an NVFP4 tensor layout (`wan_model.quant.nvfp4.NVFP4_LAYOUTS`):

  name       container  naming               NVFP4 layout  read by (checked in tests/test_formats.py)
  diffusers  directory  diffusers            ours          diffusers' from_pretrained (dense)
  original   file       original             ours          diffusers' single-file converter (dense)
  comfyui    file       model.diffusion_...  comfyui       comfy-kitchen (ComfyUI's kernels, its layout)
  comfyui-scaled-fp8     as comfyui, FP8 layers in ComfyUI's legacy `scaled_fp8` flavour (comfyui: `comfy_quant`)
  modelopt   directory  diffusers            modelopt      a spec-level reader of ModelOpt / vLLM's layout
  lightx2v   file       original             lightx2v      (read only)

Reading (`to_diffusers_names`): the naming is detected from the keys (`detect_format`), the NVFP4
layout from what each layout carries and the others lack: a `<layer>.comfy_quant` marker (ComfyUI),
`hf_quant_config.json` or a `modelopt` quantization_config (ModelOpt), `weight_global_scale` keys
(LightX2V), our `quantization_config` / safetensors metadata (ours). NVFP4 tensors without any of these,
or with two, raise CheckpointError: the same bytes mean different values in different layouts.
Everything is converted to diffusers names and OUR NVFP4 layout at the file boundary.

Writing (`write_checkpoint` / `write_into`): one writer for every format, in-memory saves and streaming
conversion alike. A save is a list of `Unit`s (a dense tensor, or an NVFP4 layer with its scales),
planned from shapes; shards are cut between units (`max_shard_size`), each shard's safetensors header
is written first and then each unit's tensors as `produce(unit)` makes them, so only one unit is in
memory. Directory formats add config.json, the shard index and their side files; the whole save is
atomic and non-destructive (wan_model.io._atomic).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from typing import Callable, Iterable

import torch
from safetensors import SafetensorError, safe_open

from wan_model.io._atomic import Layout, atomic_save
from wan_model.core.config import WanConfig, parse_bytes
from wan_kernels import fp8 as fp8fmt
from wan_kernels._checks import first_bad
from wan_kernels.nvfp4 import E4M3_NAN, bad_block_scale_bytes, codes_all_zero
from wan_model.compat.layouts import (COMFY_PREFIX, IGNORED_KEYS, MARKER_KEY, CheckpointError, diffusers_to_original_key,
                                      original_to_diffusers_key, parse_marker)
from wan_model.compat.quantize import layer_groups
from wan_model.quant.fp8 import FP8_SCALE_KEYS, SCALED_FP8_KEY, fp8_file_plan, fp8_to_file
from wan_model.quant.nvfp4 import NVFP4_LAYOUTS, NVFP4Layout, nvfp4_file_plan, nvfp4_from_file, nvfp4_to_file

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
HF_QUANT_CONFIG = "hf_quant_config.json"
VACE_LAYERS_KEY = "vace_layers"  # safetensors metadata of a single-file VACE checkpoint (no config.json to hold them)
REOPEN_BYTES = 0  # re-open per tensor: measured peak RSS 1.41 GiB (1.3B) vs 1.43 at 64 MiB, 1.69 at 256 MiB


@dataclasses.dataclass(frozen=True)
class Format:
    """A checkpoint format: container, naming and NVFP4 layout (see the module docstring)."""

    name: str
    directory: bool
    naming: str                  # "diffusers" or "original"
    prefix: str                  # of every key in the file
    nvfp4: NVFP4Layout
    writable: bool = True
    dense: bool = True           # whether an unquantized checkpoint is written in it
    fp8: str | None = None       # ComfyUI fp8 flavour of its FP8 layers (wan_model.quant.fp8.FP8_FLAVOURS); None: ours

    def file_key(self, key: str) -> str:
        """The name of diffusers key `key` in this format."""
        if self.naming == "diffusers":
            return key
        o = diffusers_to_original_key(key)
        if o is None:
            raise CheckpointError(f"{key}: no original-Wan name for this diffusers key")
        return self.prefix + o


REGISTRY = {f.name: f for f in (
    Format("diffusers", True, "diffusers", "", NVFP4_LAYOUTS["ours"]),
    Format("original", False, "original", "", NVFP4_LAYOUTS["ours"]),
    Format("comfyui", False, "original", COMFY_PREFIX, NVFP4_LAYOUTS["comfyui"], fp8="comfy_quant"),
    Format("comfyui-scaled-fp8", False, "original", COMFY_PREFIX, NVFP4_LAYOUTS["comfyui"], fp8="scaled_fp8"),
    Format("modelopt", True, "diffusers", "", NVFP4_LAYOUTS["modelopt"], dense=False),
    Format("lightx2v", False, "original", "", NVFP4_LAYOUTS["lightx2v"], writable=False),
)}
FORMATS = tuple(n for n, f in REGISTRY.items() if f.writable)  # the formats we write (CLI `convert --format`)

# the entries a save may replace without overwrite=True, and the only ones it replaces (wan_model.io._atomic)
DIFFUSERS_LAYOUT = Layout(
    files=r"config\.json|hf_quant_config\.json|"
          r"diffusion_pytorch_model(\.safetensors(\.index\.json)?|-\d{5}-of-\d{5}\.safetensors)",
    required=(r"config\.json", r"diffusion_pytorch_model.*\.safetensors"), commit="config.json")
PIPELINE_LAYOUT = Layout(files=r"model_index\.json", required=(r"model_index\.json", "transformer", "transformer_2"),
                         commit="transformer", dirs=("transformer", "transformer_2"), child=DIFFUSERS_LAYOUT)


def writable_format(name: str) -> Format:
    """The registry entry of a format we write; ValueError naming the choices otherwise."""
    f = REGISTRY.get(name)
    if f is None:
        raise ValueError(f"unknown checkpoint format {name!r}; expected one of {FORMATS}")
    if not f.writable:
        raise ValueError(f"checkpoint format {name!r} is read only; formats written: {FORMATS}")
    return f


def save_layout(format: str) -> Layout | None:
    """The directory layout a save in `format` writes (None: one file); ValueError for an unknown format."""
    return DIFFUSERS_LAYOUT if writable_format(format).directory else None


# ---------------------------------------------------------------------------------------------
# Reading safetensors

def open_safetensors(path: str):
    if not os.path.isfile(path):  # a FIFO or device would block or stream forever
        what = "not a regular file" if os.path.lexists(path) else "no such file"
        raise CheckpointError(f"cannot read safetensors file {path}: {what}")
    try:
        return safe_open(path, framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        size = os.path.getsize(path) if os.path.exists(path) else None
        raise CheckpointError(f"cannot read safetensors file {path} ({size} bytes): {e}. The file is truncated, "
                              "corrupt or not safetensors (pickle .bin/.pt/.ckpt files are not loaded)") from e


def _named_safetensors(path: str) -> str:
    if not path.endswith(".safetensors"):
        raise CheckpointError(f"{path}: only .safetensors checkpoints are loaded (never pickle)")
    return path


def tensors_of(paths: list[str]):
    """(path, key, open file) of every tensor of the files; a key stored in two files raises CheckpointError."""
    seen: dict[str, str] = {}
    for path in paths:
        with open_safetensors(_named_safetensors(path)) as f:
            for k in f.keys():
                if k in seen:
                    raise CheckpointError(f"tensor {k!r} is stored twice, in {seen[k]} and in {path}")
                seen[k] = path
                yield path, k, f


# progress=None shows a bar from this much data on: a real checkpoint, not a test fixture or a tiny demo.
PROGRESS_MIN_BYTES = 1 << 30


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def update(self, n: int) -> None:
        pass


def progress_bar(total: int, desc: str, progress: bool | None):
    """A tqdm bar over `total` bytes; `progress` True/False forces it on/off, None: on from PROGRESS_MIN_BYTES.
    Off, no tqdm object is made at all: tqdm takes a lock shared across forked processes, which a save killed
    while holding it (SIGKILL) would leave taken for the parent."""
    if not (progress if progress is not None else total >= PROGRESS_MIN_BYTES):
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=desc)


def read_safetensors(paths: list[str], progress: bool | None = None) -> dict[str, torch.Tensor]:
    """All tensors of the files (checked: a truncated/corrupt or non-regular file, a key stored in two files, or
    a scale value `check_scales` refuses raises CheckpointError), with a progress bar over the bytes read (see
    `progress_bar`)."""
    out: dict[str, torch.Tensor] = {}
    path_of: dict[str, str] = {}
    total = sum(os.stat(p).st_size for p in paths if os.path.isfile(p))
    with progress_bar(total, "loading", progress) as bar:
        for path, k, f in tensors_of(paths):
            try:
                out[k] = f.get_tensor(k)
            except (SafetensorError, RuntimeError, ValueError, TypeError) as e:
                raise CheckpointError(f"cannot read tensor {k!r} from {path}: {e}") from e
            bar.update(out[k].numel() * out[k].element_size())
            path_of[k] = path
    check_scales(out, path_of)
    return out


# the per-tensor / per-row scale keys of every layout (wan_model.quant.nvfp4 / fp8): fp8 (ours, both ComfyUI flavours) and
# NVFP4 (decode or, LightX2V, encode convention); the NVFP4 global keys may be 0 for an all-zero layer
GLOBAL_SCALE_KEYS = frozenset(layout.global_key for layout in NVFP4_LAYOUTS.values())
SCALE_KEYS = GLOBAL_SCALE_KEYS | {layout.input_key for layout in NVFP4_LAYOUTS.values()} | {
    k for keys in FP8_SCALE_KEYS.values() for k in keys}


def check_scales(sd: dict[str, torch.Tensor], path_of: dict[str, str]) -> None:
    """The scale VALUES of a checkpoint as stored (file key names, any format), checked once, on load, before
    anything is renamed or fused: every per-tensor / per-row scale (`SCALE_KEYS`) finite and > 0 (0 zeroes a
    layer, a negative one flips its sign, NaN / inf poison it; LightX2V's encode-convention 2688 / amax alike),
    except an NVFP4 global scale of 0 for a layer whose codes are all zero (amax / 2688 of an all-zero weight,
    which dequantizes to 0 either way); e4m3 block scales (`<layer>.weight_scale` float8_e4m3fn) free of the NaN
    codes 0x7F / 0xFF and of negative values (0 is an all-zero block's scale). CheckpointError naming the file,
    the key and the bad value. Wrong dtypes and shapes are left to the format readers, which name them."""
    for key, t in sd.items():
        layer, _, suffix = key.rpartition(".")
        if suffix not in SCALE_KEYS or t.device.type == "meta":
            continue
        where = f"{path_of.get(key, 'state dict')}: {key}"
        if t.dtype == torch.float8_e4m3fn and suffix == "weight_scale":
            bad = bad_block_scale_bytes(t.view(torch.uint8))
            if bad.any():
                idx = bad.nonzero()[0].tolist()
                v = t.view(torch.uint8)[tuple(idx)].item()
                raise CheckpointError(f"{where}: NVFP4 block scales are non-negative e4m3, got "
                                      f"{'NaN' if v in E4M3_NAN else 'negative'} byte 0x{v:02X} at {idx}")
            continue
        if not t.dtype.is_floating_point or t.dtype in fp8fmt.DTYPES:
            continue
        f = t.float()
        bad = ~(torch.isfinite(f) & (f > 0))
        if not bad.any():
            continue
        w = sd.get(layer + ".weight")
        if (suffix in GLOBAL_SCALE_KEYS and f.numel() == 1 and f.item() == 0 and w is not None
                and w.dtype == torch.uint8 and codes_all_zero(w)):
            continue
        raise CheckpointError(f"{where}: a scale must be finite and > 0, got {first_bad(f, bad)}")


def file_metadata(paths: list[str]) -> dict[str, str]:
    """The safetensors `__metadata__` of the files, merged (CheckpointError as `open_safetensors`)."""
    out: dict[str, str] = {}
    for path in paths:
        with open_safetensors(_named_safetensors(path)) as f:
            out.update(f.metadata() or {})
    return out


def nvfp4_hint_of_file(metadata: dict[str, str]) -> str | None:
    """The NVFP4 layout a file's metadata names: ours writes `nvfp4_layout`; files of earlier versions of
    this package only `quantization: nvfp4` (our layout)."""
    name = metadata.get("nvfp4_layout")
    if name is not None:
        if name not in NVFP4_LAYOUTS:
            raise CheckpointError(f"safetensors metadata nvfp4_layout={name!r} is unknown; known: {list(NVFP4_LAYOUTS)}")
        return name
    return "ours" if metadata.get("quantization") == "nvfp4" else None


def vace_layers_of_file(metadata: dict[str, str], where: str) -> tuple[int, ...] | None:
    """The vace_layers a single-file VACE checkpoint of ours names in its safetensors metadata (a JSON list; None
    when absent: files of other tools, whose layers are derived from the weights); CheckpointError naming the file
    when malformed."""
    raw = metadata.get(VACE_LAYERS_KEY)
    if raw is None:
        return None
    try:
        layers = json.loads(raw)
    except ValueError as e:
        raise CheckpointError(f"{where}: safetensors metadata {VACE_LAYERS_KEY}={raw[:80]!r} is not JSON: {e}") from e
    if not isinstance(layers, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise CheckpointError(f"{where}: safetensors metadata {VACE_LAYERS_KEY} must be a list of ints, "
                              f"got {raw[:80]!r}")
    return tuple(layers)


def nvfp4_hint_of_dir(directory: str, config: dict) -> str | None:
    """The NVFP4 layout a directory declares: hf_quant_config.json or a ModelOpt quantization_config in
    config.json -> "modelopt" (checked: NVFP4, group 16); our quantization_config -> "ours"."""
    from wan_model.core.config import read_json

    found = {}
    qc = config.get("quantization_config")
    if isinstance(qc, dict) and qc.get("quant_method") == "nvfp4":
        found["ours"] = os.path.join(directory, "config.json")
    elif isinstance(qc, dict) and str(qc.get("quant_method", "")).lower().startswith("modelopt"):
        _check_modelopt(qc, os.path.join(directory, "config.json"))
        found["modelopt"] = os.path.join(directory, "config.json")
    hf = os.path.join(directory, HF_QUANT_CONFIG)
    if os.path.lexists(hf):
        try:
            spec = read_json(hf)
        except ValueError as e:
            raise CheckpointError(str(e)) from e
        _check_modelopt(spec.get("quantization", spec), hf)
        found["modelopt"] = hf
    if len(found) > 1:
        raise CheckpointError(f"{directory}: ambiguous NVFP4 layout: {found['ours']} declares ours (low nibble, swizzled "
                              f"scales) and {found['modelopt']} ModelOpt's (linear scales); remove the one that is wrong")
    return next(iter(found), None)


def _check_modelopt(q, where: str) -> None:
    algo = str(q.get("quant_algo", "")).upper() if isinstance(q, dict) else ""
    if algo not in ("NVFP4", "W4A16_NVFP4") or q.get("group_size", 16) != 16:
        raise CheckpointError(f"{where}: only ModelOpt NVFP4 checkpoints are read (quant_algo NVFP4 or W4A16_NVFP4, "
                              f"group_size 16), got {q!r}"[:400])


def _apply_comfy_scales(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], set[str]]:
    """ComfyUI fp8 layers -> our FP8 layout (wan_model.quant.fp8, "FP8 layers"), KEEPING the fp8 bytes: the scale
    becomes `<layer>.weight_scale` fp32 [] (or [N, 1]), a static activation scale `<layer>.input_scale`; the
    side-car keys are dropped; pop the NVFP4 markers. Returns (tensors, layers marked `{"format": "nvfp4"}`).

    fp8: `<layer>.comfy_quant` {"format": "float8_e4m3fn"/"float8_e5m2"} + `<layer>.weight_scale` (+ input_scale),
    or the legacy `scaled_fp8` + `<layer>.scale_weight` (+ `scale_input`, 1.0 = none, as ComfyUI reads it).
    Any other format, an fp8 weight without its scale, or a scale of another shape is rejected naming the key.
    """
    sd = dict(sd)
    sd.pop(SCALED_FP8_KEY, None)
    nvfp4 = set()

    def keep_fp8(layer: str, key: str, scale: torch.Tensor, input_scale: torch.Tensor | None) -> None:
        w = sd.get(layer + ".weight")
        if w is None:
            raise CheckpointError(f"{key}: scale for a missing weight {layer}.weight")
        if w.dtype not in fp8fmt.DTYPES:
            raise CheckpointError(f"{key}: an fp8 scale for {layer}.weight of dtype {w.dtype} (expected "
                                  f"float8_e4m3fn/float8_e5m2)")
        per_row = w.dim() == 2 and tuple(scale.shape) == (w.shape[0], 1)
        if scale.numel() != 1 and not per_row or not scale.dtype.is_floating_point:
            raise CheckpointError(f"{key}: an fp8 weight scale is one float per tensor (or [N, 1] per row) for "
                                  f"{layer}.weight {tuple(w.shape)}, got shape {tuple(scale.shape)} dtype {scale.dtype}")
        sd[layer + ".weight_scale"] = scale.float().reshape(-1, 1) if per_row else scale.float().reshape(())
        if input_scale is not None:
            if input_scale.numel() != 1:
                raise CheckpointError(f"{layer}: an fp8 input scale is one float, got shape {tuple(input_scale.shape)}")
            sd[layer + ".input_scale"] = input_scale.float().reshape(())

    for key in [k for k in sd if k.endswith("." + MARKER_KEY)]:
        layer = key[: -len(MARKER_KEY) - 1]
        spec = parse_marker(sd.pop(key), key)
        fmt = spec.get("format") if isinstance(spec, dict) else None
        if fmt == NVFP4_LAYOUTS["comfyui"].marker["format"]:
            w = sd.get(layer + ".weight")
            if w is None or w.dtype != torch.uint8 or layer + ".weight_scale_2" not in sd:
                raise CheckpointError(f"{layer}: ComfyUI nvfp4 layer (comfy_quant {spec}) needs a uint8 weight, "
                                      f"weight_scale and weight_scale_2; got weight "
                                      f"{None if w is None else w.dtype}, weight_scale_2 "
                                      f"{'present' if layer + '.weight_scale_2' in sd else 'missing'}")
            nvfp4.add(layer)
            continue
        scale = sd.pop(layer + ".weight_scale", None)
        if fmt not in fp8fmt.NAMES.values() or scale is None:
            raise CheckpointError(
                f"{layer}: ComfyUI quantized weight format {spec} is not supported (fp8 with a weight_scale, or "
                f"nvfp4; got weight_scale {None if scale is None else tuple(scale.shape)}); convert the file to "
                "bf16 first")
        if layer + ".weight" in sd and sd[layer + ".weight"].dtype != fp8fmt.dtype_of(fmt):
            raise CheckpointError(f"{key}: says {fmt}, but {layer}.weight is {sd[layer + '.weight'].dtype}")
        keep_fp8(layer, key, scale, sd.pop(layer + ".input_scale", None))
    for key in [k for k in sd if k.endswith("." + FP8_SCALE_KEYS["scaled_fp8"][0])]:
        layer = key[: -len(".scale_weight")]
        scale_input = sd.pop(layer + ".scale_input", None)
        keep_fp8(layer, key, sd.pop(key), None if scale_input is None or scale_input.float().eq(1).all() else scale_input)
    fp8 = [k for k, v in sd.items() if v.dtype in fp8fmt.DTYPES
           and not (k.endswith(".weight_scale") and k + "_2" in sd)  # NVFP4 block scales are e4m3 too
           and not (k.endswith(".weight") and k + "_scale" in sd)]
    if fp8:
        raise CheckpointError(f"fp8 weights without a scale (not a supported ComfyUI scaled file): {fp8[:8]}")
    return sd, nvfp4


def detect_format(keys) -> str:
    """The naming of a checkpoint: "diffusers", "original" or "comfyui" from the key names (raises
    CheckpointError when none)."""
    keys = set(keys)
    if any(k.startswith(COMFY_PREFIX) for k in keys) or "scaled_fp8" in keys or any(
            k.endswith((".scale_weight", "." + MARKER_KEY)) for k in keys):
        return "comfyui"
    if "head.modulation" in keys:
        return "original"
    if "scale_shift_table" in keys and "proj_out.weight" in keys:
        return "diffusers"
    raise CheckpointError(f"not a Wan transformer checkpoint: none of 'head.modulation', "
                          f"'{COMFY_PREFIX}head.modulation', 'scale_shift_table' found; first keys {sorted(keys)[:8]}")


def _renamed(sd: dict, name) -> tuple[dict, dict]:
    """({name(k): v}, {name(k): k}); two keys that get one name raise CheckpointError (no silent last-wins)."""
    out, source = {}, {}
    for k, v in sd.items():
        n = name(k)
        if n in out:
            raise CheckpointError(f"checkpoint keys {source[n]!r} and {k!r} both hold tensor {n!r}")
        out[n], source[n] = v, k
    return out, source


def _layers_with(keys, suffix: str) -> set[str]:
    return {k[: -len(suffix) - 1] for k in keys if k.endswith("." + suffix)}


def nvfp4_layout_of(keys, marked: set[str], hint: str | None) -> NVFP4Layout | None:
    """The NVFP4 layout of diffusers-named `keys` (module docstring): `marked` the layers with a ComfyUI
    nvfp4 marker, `hint` what the directory / file metadata declares. CheckpointError when NVFP4 tensors
    have no layout or two."""
    keys = set(keys)
    s2 = _layers_with(keys, "weight_scale_2")
    found = {}
    if _layers_with(keys, NVFP4_LAYOUTS["lightx2v"].global_key):
        found["lightx2v"] = "weight_global_scale keys"
    if marked:
        if marked - s2:
            raise CheckpointError(f"ComfyUI nvfp4 markers for layers without weight_scale_2: {sorted(marked - s2)[:4]}")
        if s2 - marked:
            raise CheckpointError(f"ambiguous NVFP4 layout: layers {sorted(marked)[:2]} carry ComfyUI's comfy_quant "
                                  f"marker (high nibble first), layers {sorted(s2 - marked)[:2]} do not")
        found["comfyui"] = "comfy_quant markers"
    elif s2:
        if hint is None:
            raise CheckpointError(
                f"ambiguous NVFP4 checkpoint: layers {sorted(s2)[:2]} have weight_scale_2 but nothing tells their "
                "layout (the nibble order and scale layout differ): no <layer>.comfy_quant marker (ComfyUI), no "
                f"{HF_QUANT_CONFIG} (ModelOpt), no quantization_config in config.json or nvfp4_layout in the "
                "safetensors metadata (ours)")
        found[hint] = "the declared layout"
    if hint is not None and found and hint not in found:
        found[hint] = "the declared layout"
    if len(found) > 1:
        raise CheckpointError(f"ambiguous NVFP4 layout: {', '.join(f'{n} ({why})' for n, why in found.items())}")
    return NVFP4_LAYOUTS[next(iter(found))] if found else None


def decode_nvfp4(sd: dict[str, torch.Tensor], layout: NVFP4Layout, source: dict[str, str]) -> dict[str, torch.Tensor]:
    """The NVFP4 layers of `layout` in diffusers-named `sd` -> our layout (wan_model.quant.nvfp4); the other
    tensors unchanged. Meta tensors give meta results."""
    out = dict(sd)
    for layer in sorted(_layers_with(sd, layout.global_key)):
        parts = {s: out.pop(f"{layer}.{s}") for s in layout.keys() if f"{layer}.{s}" in out}
        where = source.get(f"{layer}.weight", f"{layer}.weight").removesuffix(".weight")
        out.update({f"{layer}.{s}": t for s, t in nvfp4_from_file(layout, parts, where).items()})
    return out


def to_diffusers_names(sd: dict[str, torch.Tensor], nvfp4_hint: str | None = None
                       ) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """Any supported format -> (diffusers-named tensors in our NVFP4 layout, {diffusers key: key in the
    file}, naming). `nvfp4_hint`: the NVFP4 layout the directory / file metadata declares."""
    fmt = detect_format(sd)
    marked: set[str] = set()
    if fmt == "diffusers":
        sd, source = dict(sd), {k: k for k in sd}
    else:
        unprefixed = {k: k for k in sd}
        if fmt == "comfyui":
            sd, unprefixed = _renamed(sd, lambda k: k.removeprefix(COMFY_PREFIX))
            sd, marked = _apply_comfy_scales(sd)
            marked = {original_to_diffusers_key(m) or m for m in marked}
        sd, source = _renamed(sd, lambda k: original_to_diffusers_key(k) or k)  # unknown keys: kept, unexpected
        source = {d: unprefixed.get(k, k) for d, k in source.items()}  # .get: scale keys renamed by ComfyUI's fp8
    layout = nvfp4_layout_of(sd, marked, nvfp4_hint)
    if layout is not None:
        sd = decode_nvfp4(sd, layout, source)
    return sd, source, fmt


class LazyCheckpoint:
    """Diffusers-named, read-on-demand view of a DENSE checkpoint's safetensors files: names, shapes and
    dtypes from the headers; `get(key)` reads one tensor. The mapping of a file is re-opened after
    `reopen_bytes` so that its touched pages leave the RSS."""

    _DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
               "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
               "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}

    def __init__(self, files: list[str], nvfp4_hint: str | None = None, reopen_bytes: int = REOPEN_BYTES):
        self._reopen_bytes = reopen_bytes
        self._handles: dict[str, object] = {}
        self._read_since_open: dict[str, int] = {}
        meta, path_of = {}, {}
        for path, k, f in tensors_of(files):
            sl = f.get_slice(k)
            dtype = self._DTYPES.get(sl.get_dtype())
            if dtype is None:
                raise CheckpointError(f"tensor {k!r} of {path} has dtype {sl.get_dtype()}, which the "
                                      f"converter cannot read (it reads {', '.join(self._DTYPES)})")
            meta[k], path_of[k] = torch.empty(tuple(sl.get_shape()), dtype=dtype, device="meta"), path
        nvfp4 = any(k.endswith(".weight_scale_2") for k in meta)
        if detect_format(meta) == "comfyui" and not nvfp4 and any(
                k.endswith((".scale_weight", "." + MARKER_KEY)) or k == "scaled_fp8" for k in meta):
            raise CheckpointError("streaming conversion of a ComfyUI fp8-scaled file is not supported: convert "
                                  "it to bf16 first (python -m wan_model convert SRC TMP --format diffusers "
                                  "--dtype bfloat16)")
        if any(k.endswith("." + MARKER_KEY) for k in meta):  # parsing a marker reads it: read them now
            for k in [k for k in meta if k.endswith("." + MARKER_KEY)]:
                with open_safetensors(path_of[k]) as f:
                    meta[k] = f.get_tensor(k)
        scales = {}  # the (small) per-tensor / per-row scales, read now: their values are checked as on load
        for k in [k for k in meta if k.rpartition(".")[2] in SCALE_KEYS]:
            with open_safetensors(path_of[k]) as f:
                scales[k] = f.get_tensor(k)
        check_scales(scales, path_of)
        sd, source, self.format = to_diffusers_names(meta, nvfp4_hint)
        self.entries: dict[str, tuple[str, str, torch.dtype, tuple[int, ...]]] = {  # dkey -> (path, key, ...)
            d: (path_of[source[d]], source[d], t.dtype, tuple(t.shape)) for d, t in sd.items()
            if d in source and not any(s in d for s in IGNORED_KEYS)}
        self.source = {d: e[1] for d, e in self.entries.items()}

    def meta(self) -> dict[str, torch.Tensor]:
        """{diffusers key: meta tensor of its stored shape and dtype}."""
        return {d: torch.empty(e[3], dtype=e[2], device="meta") for d, e in self.entries.items()}

    def nbytes(self, key: str) -> int:
        _, _, dtype, shape = self.entries[key]
        return math.prod(shape) * dtype.itemsize

    def get(self, key: str) -> torch.Tensor:
        path, k, _, _ = self.entries[key]
        if self._read_since_open.get(path, 0) > self._reopen_bytes:
            self._handles.pop(path).__exit__(None, None, None)
        if path not in self._handles:
            self._handles[path] = open_safetensors(path).__enter__()
            self._read_since_open[path] = 0
        self._read_since_open[path] += self.nbytes(key)
        return self._handles[path].get_tensor(k)

    def close(self) -> None:
        for h in self._handles.values():
            h.__exit__(None, None, None)
        self._handles.clear()


# ---------------------------------------------------------------------------------------------
# Writing: one writer

_ST_NAMES = {v: k for k, v in LazyCheckpoint._DTYPES.items()}


class SafetensorsStreamWriter:
    """Write one safetensors file tensor by tensor: the header (all keys, dtypes, shapes, offsets) is
    written first from the plan, then each tensor's bytes in plan order. Only one tensor is held."""

    def __init__(self, path: str, plan: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]):
        header: dict = {"__metadata__": metadata}
        offset = 0
        for key, dtype, shape in plan:
            n = math.prod(shape) * dtype.itemsize
            header[key] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self._plan = list(plan)
        self._next = 0
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        want = self._plan[self._next]
        got = (key, tensor.dtype, tuple(tensor.shape))
        if got != want:
            raise RuntimeError(f"streamed tensor {got} does not match the planned {want}")
        self._file.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._plan):
            raise RuntimeError(f"{len(self._plan) - self._next} planned tensors were not written")
        self._file.close()


def write_safetensors(path: str, plan: list[tuple[str, torch.dtype, tuple[int, ...]]],
                      tensors: Iterable[torch.Tensor], metadata: dict[str, str]) -> None:
    """Write `tensors` (an iterable, consumed one at a time) as the safetensors file `path` of `plan`."""
    w = SafetensorsStreamWriter(path, plan, metadata)
    try:
        for (key, _, _), t in zip(plan, tensors, strict=True):
            w.write(key, t)
    except BaseException:
        w._file.close()
        raise
    w.close()


@dataclasses.dataclass
class Unit:
    """Tensors written together, never split over two shards: one dense tensor (`layer` None), or an NVFP4
    layer (`key` = its diffusers weight key) with its scales. `plan`: (file key, dtype, shape) in order;
    `suffixes`: the per-layer key suffix of each plan entry (NVFP4)."""

    key: str
    layer: str | None
    plan: list[tuple[str, torch.dtype, tuple[int, ...]]]
    suffixes: tuple[str, ...] = ()

    @property
    def nbytes(self) -> int:
        return sum(math.prod(s) * dt.itemsize for _, dt, s in self.plan)


OURS_NVFP4 = ("weight", "weight_scale", "weight_scale_2", "input_scale")


def plan_units(format: Format, entries: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> list[Unit]:
    """The units of a checkpoint whose diffusers-named tensors (our NVFP4 layout) have `entries`
    {key: (dtype, shape)}, as `format` stores them."""
    nvfp4 = _layers_with(entries, "weight_scale_2")
    fp8 = {layer for layer in _layers_with(entries, "weight_scale") - nvfp4
           if entries[f"{layer}.weight"][0] in fp8fmt.DTYPES} if format.fp8 else set()
    consumed = {f"{layer}.{s}" for layer in nvfp4 | fp8 for s in OURS_NVFP4[1:]}
    units = []
    for key in sorted(entries):
        if key in consumed:
            continue
        layer = key.removesuffix(".weight")
        if key.endswith(".weight") and layer in fp8:
            plan = fp8_file_plan(format.fp8, *entries[key], f"{layer}.input_scale" in entries,
                                 sentinel=not any(u.layer in fp8 for u in units))
            units.append(Unit(key, layer, [(format.prefix + SCALED_FP8_KEY if s == SCALED_FP8_KEY else
                                            format.file_key(f"{layer}.{s}"), dt, shape) for s, dt, shape in plan],
                              tuple(s for s, _, _ in plan)))
        elif key.endswith(".weight") and layer in nvfp4:
            n, half_k = entries[key][1]
            plan = nvfp4_file_plan(format.nvfp4, n, 2 * half_k, f"{layer}.input_scale" in entries)
            units.append(Unit(key, layer, [(format.file_key(f"{layer}.{s}"), dt, shape) for s, dt, shape in plan],
                              tuple(s for s, _, _ in plan)))
        else:
            units.append(Unit(key, None, [(format.file_key(key), *entries[key])]))
    return units


def encode(format: Format, unit: Unit, layer_tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The file tensors of `unit` from its diffusers-named tensors in our layout ({suffix: tensor} of an
    NVFP4 layer, {"": tensor} of a dense one), in plan order."""
    if unit.layer is None:
        return [layer_tensors[""]]
    if layer_tensors["weight"].dtype in fp8fmt.DTYPES:
        file = fp8_to_file(format.fp8, layer_tensors, unit.layer)
    else:
        file = nvfp4_to_file(format.nvfp4, layer_tensors)
    return [file[s] for s in unit.suffixes]


def from_state_dict(sd: dict[str, torch.Tensor]) -> Callable[[Unit], dict[str, torch.Tensor]]:
    """`tensors(unit)` for `write_into` of an in-memory state dict."""
    def tensors(unit: Unit) -> dict[str, torch.Tensor]:
        if unit.layer is None:
            return {"": sd[unit.key]}
        return {s: sd[f"{unit.layer}.{s}"] for s in OURS_NVFP4 if f"{unit.layer}.{s}" in sd}
    return tensors


def parse_size(size: int | str) -> int:
    """'5GB', '500MB', '10KB', '1000000' or an int of bytes -> bytes > 0 (decimal units, as
    diffusers/huggingface_hub)."""
    return parse_bytes(size, "max_shard_size", "'5GB', '200MB'")


def _shards(units: list[Unit], max_bytes: float) -> list[list[Unit]]:
    shards, cur, cur_bytes = [], [], 0
    for u in units:
        if cur and cur_bytes + u.nbytes > max_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(u)
        cur_bytes += u.nbytes
    return shards + [cur] if cur else shards


def hf_quant_config(cfg: WanConfig, nvfp4_layers: set[str], input_scales: bool) -> dict:
    """hf_quant_config.json of a ModelOpt-layout checkpoint: quant_algo NVFP4 (W4A4: every layer has a
    static input_scale) or W4A16_NVFP4 (weights only: no activation calibration), group 16, and the
    Linear / Conv layers left unquantized (`exclude_modules`)."""
    linears = {m for _, ms in layer_groups(cfg) for m in ms} | {
        f"condition_embedder.time_embedder.linear_{i}" for i in (1, 2)}
    return {"producer": {"name": "wan-kernels"},
            "quantization": {"quant_algo": "NVFP4" if input_scales else "W4A16_NVFP4", "kv_cache_quant_algo": None,
                             "group_size": 16, "exclude_modules": sorted(linears - nvfp4_layers) + ["patch_embedding"]}}


def write_into(tmp: str, format: Format, cfg: WanConfig, units: list[Unit],
               tensors: Callable[[Unit], dict[str, torch.Tensor]], max_shard_size: int | str = "5GB",
               quantization: dict | None = None, progress: Callable[[Unit], None] | None = None) -> None:
    """Write a checkpoint of `format` at `tmp` (a new directory, or the file to create): `units` in order,
    each made by `tensors(unit)` (diffusers-named, our layout; see `encode`) when its turn comes.
    `quantization`: our quantization_config of an NVFP4 checkpoint (config.json of ours, file metadata)."""
    nvfp4 = {u.layer for u in units if u.layer is not None}
    if not nvfp4 and not format.dense:
        raise ValueError(f"format {format.name!r} holds NVFP4 checkpoints: quantize (--quantize nvfp4) or choose "
                         f"another format ({', '.join(n for n, f in REGISTRY.items() if f.writable and f.dense)})")
    metadata = {"format": "pt"}
    if nvfp4:
        metadata.update(quantization="nvfp4", nvfp4_layout=format.nvfp4.name)
    if cfg.has_vace and not format.directory:
        metadata[VACE_LAYERS_KEY] = json.dumps(list(cfg.vace_layers))
    shards = _shards(units, parse_size(max_shard_size) if format.directory else math.inf)

    def stream(shard: list[Unit]):
        for u in shard:
            yield from encode(format, u, tensors(u))
            if progress is not None:
                progress(u)

    if not format.directory:
        write_safetensors(tmp, [e for u in shards[0] for e in u.plan], stream(shards[0]), metadata)
        return
    names = [WEIGHTS_NAME] if len(shards) == 1 else [
        f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for shard, name in zip(shards, names):
        write_safetensors(os.path.join(tmp, name), [e for u in shard for e in u.plan], stream(shard), metadata)
        weight_map.update({k: name for u in shard for k, _, _ in u.plan})
    config = cfg.to_diffusers_config()
    if nvfp4 and format.nvfp4.name == "ours" and quantization:
        config["quantization_config"] = quantization
    _write_json(os.path.join(tmp, "config.json"), config)
    if len(shards) > 1:
        _write_json(os.path.join(tmp, INDEX_NAME), {"metadata": {"total_size": sum(u.nbytes for u in units)},
                                                    "weight_map": weight_map})
    if format.name == "modelopt":
        with_input = all(format.nvfp4.input_key in u.suffixes for u in units if u.layer)
        _write_json(os.path.join(tmp, HF_QUANT_CONFIG), hf_quant_config(cfg, nvfp4, with_input))


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)


def write_checkpoint(dst, format: Format, cfg: WanConfig, units: list[Unit],
                     tensors: Callable[[Unit], dict[str, torch.Tensor]], max_shard_size: int | str = "5GB",
                     quantization: dict | None = None, overwrite: bool = False,
                     progress: Callable[[Unit], None] | None = None) -> None:
    """`write_into` a staging area moved to `dst` atomically and non-destructively (wan_model.io._atomic;
    `overwrite` as there)."""
    with atomic_save(dst, DIFFUSERS_LAYOUT if format.directory else None, overwrite) as tmp:
        write_into(tmp, format, cfg, units, tensors, max_shard_size, quantization, progress)
