"""Conversions between checkpoint formats, streamed where they can be: `convert_checkpoint` (any readable format
to any writable one, a cast on the way), `convert_nvfp4` (dense -> NVFP4 or FP8, one tensor at a time) and
`convert_gguf` (dense -> GGUF, one tensor at a time). Each reads its source through wan_model.io.checkpoint /
wan_model.io.gguf and writes through the one atomic writer (wan_model.io._atomic), so a failed conversion leaves
the destination as it was. `python -m wan_model convert` calls them."""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch

from wan_model.compat.layouts import IGNORED_KEYS, CheckpointError, diffusers_to_original_key
from wan_model import quant
from wan_model.compat.quantize import quantized_groups
from wan_model.compat.spellings import keeps_fp32
from wan_model.core.config import WanConfig
from wan_model.io._atomic import atomic_save, check_destination
from wan_model.io.checkpoint import _keeps_stored_dtype, check_state_dict, dequantize_layers, write_state_dict
from wan_model.io.formats import (parse_size, plan_units, progress_bar, save_layout, writable_format,
                                  write_checkpoint)
from wan_model.io.gguf import _FILE_TYPES, ARCH, _gguf, _nbytes, _qtype, check_gguf_type, encode, tensor_types
from wan_model.io.source import open_source

def cast_checked(t: torch.Tensor, dtype: torch.dtype, where: str) -> torch.Tensor:
    """`t.to(dtype)` for a conversion, refusing (CheckpointError naming `where`, the file and key) a result the
    cast made non-finite: values beyond `dtype`'s range (fp16: |x| > 65504; bf16 only past 3.39e38) would be
    written as inf. A source that is already non-finite is its own error (no cast makes it right). Called before
    anything is written, so a refused conversion leaves the destination as it was."""
    out = t.to(dtype)
    if out.dtype == t.dtype or not out.dtype.is_floating_point or torch.isfinite(out).all():
        return out
    name = str(dtype).removeprefix("torch.")
    if not torch.isfinite(t).all():
        raise CheckpointError(f"{where}: the source already holds non-finite values (inf/nan); refusing to "
                              f"convert it to {name}")
    raise CheckpointError(f"{where}: values beyond {name}'s range (max |x| {t.abs().max().item():.4g} > "
                          f"{torch.finfo(dtype).max:.6g}) would be written as inf; use --dtype "
                          f"{'bfloat16' if dtype == torch.float16 else 'float32'}")


def convert_checkpoint(src, dst, format: str, dtype: torch.dtype | None = None,
                       max_shard_size: int | str = "5GB", quantize: str | None = None, nvfp4_config=None,
                       progress: bool = True, overwrite: bool = False) -> WanConfig:
    """Convert one Wan transformer checkpoint (any supported format) to `format` at `dst`.

    Tensors keep their stored dtype unless `dtype` is given (then diffusers' fp32 modules stay fp32);
    FP8 layers (ComfyUI fp8 files, ours) stay fp8 with their scales, converted between the flavours exactly
    (wan_model.quant.fp8), unless `dtype` is given: then they are dequantized (as are those that cannot stay fp8
    in our model: the time embedder); NVFP4 layers keep their values (converted between layouts exactly).
    Returns the config.
    quantize="nvfp4" / "fp8": stream the conversion tensor by tensor and quantize on the fly (`convert_nvfp4`;
    `nvfp4_config`, an NVFP4Config / FP8Config, picks the layers and the scales); memory stays bounded.
    `dst` follows `save_state_dict`'s policy (`overwrite` as there), checked before any tensor is read.
    """
    if quantize is not None:  # streamed: convert_nvfp4 checks the destination
        if quantize not in quant.METHODS:
            raise ValueError(f"unknown quantization {quantize!r}; expected {' or '.join(map(repr, quant.METHODS))}")
        method = quant.get(quantize)
        config = nvfp4_config or method.config()
        if not isinstance(config, method.config):
            raise ValueError(f"quantize={quantize!r} takes an {method.config.__name__}, got {type(config).__name__}")
        return convert_nvfp4(src, dst, format, config, dtype, max_shard_size, progress, overwrite)
    f = writable_format(format)
    if f.directory:
        parse_size(max_shard_size)
    check_destination(dst, save_layout(format), overwrite)
    opened = open_source(src)
    src = os.fspath(src)
    sd, source = opened.read(progress)  # GGUF: dequantized (quantized types to fp32: exact; wan_model.io.gguf)
    cfg = opened.config(sd)
    found = quant.detect(sd)
    check_state_dict(sd, cfg, source, found)
    sd = {k: v for k, v in sd.items() if not any(s in k for s in IGNORED_KEYS)}
    sd = dequantize_layers(sd, cfg, keep=dtype is None)  # quantized layers: kept as they are, or dequantized
    if dtype is not None:
        sd = {k: v if _keeps_stored_dtype(k, v) else cast_checked(v, torch.float32 if keeps_fp32(k) else dtype,
                                                                f"{src}: {source.get(k, k)}")
              for k, v in sd.items()}
    kept = quant.detect(sd)  # a kept method changes naming and layout only: its values are kept exactly
    declared = [c for name, layers in kept.items() if (c := quant.get(name).conversion_config(layers)) is not None]
    if len(declared) > 1:
        raise CheckpointError(f"{src} holds layers of several quantization methods ({', '.join(kept)}): a "
                              "checkpoint declares one quantization_config")
    quantization = declared[0] if declared else None
    write_state_dict(sd, cfg, dst, format, max_shard_size, quantization, overwrite, progress)
    return cfg


def convert_nvfp4(src, dst, format: str = "diffusers", config: quant.QuantConfig | None = None,
                  dtype: torch.dtype | None = None, max_shard_size: int | str = "5GB",
                  progress: bool = True, overwrite: bool = False) -> WanConfig:
    """Stream-convert a dense checkpoint (any supported format) to an NVFP4 checkpoint in `format` at `dst`
    (an FP8 one when `config` is an FP8Config: any registered method's config, wan_model.quant).

    Equal, bit for bit, to `WanModel.from_pretrained(src, dtype).quantize("nvfp4" / "fp8", config)` saved in
    `format` (dtype None: the stored dtypes, i.e. quantize from the stored values; else tensors are cast
    first, diffusers' fp32 modules staying fp32). Returns the config.

    Reads one tensor at a time through safetensors `safe_open` (wan_model.io.formats.LazyCheckpoint), quantizes
    it with the method's one quantizer (`quantize_weight`, which the in-memory `quantize` calls too) and hands it
    to the one writer, which appends it to its shard: peak memory is a few tensors,
    whatever the checkpoint size. Fused groups (wan_model.compat.quantize) share one global scale, computed in a
    first pass over their members (FP8: per tensor; per channel needs none). Written atomically and non-destructively as `save_state_dict`
    (`overwrite` as there); `dst` is checked before anything is read.
    """
    from tqdm import tqdm

    f = writable_format(format)
    check_destination(dst, save_layout(format), overwrite)
    if f.directory:
        parse_size(max_shard_size)
    config = config or quant.get("nvfp4").config()
    method = quant.method_of(config)
    opened = open_source(src)
    src = os.fspath(src)
    lazy = opened.streamed()
    try:
        found = quant.detect(lazy.meta())
        if found:
            raise CheckpointError(f"{src} is already {next(iter(found)).upper()}-quantized")
        cfg = opened.config(lazy.meta())
        check_state_dict(lazy.meta(), cfg, lazy.source)
        groups = quantized_groups(cfg, config)
        group_of = {m: members for _, members in groups for m in members}

        def cast(key: str, t: torch.Tensor) -> torch.Tensor:
            return t if dtype is None else cast_checked(t, torch.float32 if keeps_fp32(key) else dtype,
                                                        f"{src}: {lazy.source.get(key, key)}")

        entries = {}  # the output tensors, diffusers-named, our layout
        for key, (_, _, stored, shape) in lazy.entries.items():
            layer = key.removesuffix(".weight")
            if key.endswith(".weight") and layer in group_of:
                entries.update({f"{layer}.{s}": v for s, v in method.stored(config, shape).items()})
            else:
                entries[key] = (stored if dtype is None else (torch.float32 if keeps_fp32(key) else dtype), shape)
        units = plan_units(f, entries)

        # pass 1: the shared scale of each fused group (NVFP4: max over members of amax / (6*448))
        group_scale: dict[tuple[str, ...], torch.Tensor] = {}
        fused = [members for _, members in groups if len(members) > 1 and method.shares_scale(config)]
        total = (sum(lazy.nbytes(m + ".weight") for ms in fused for m in ms)
                 + sum(lazy.nbytes(k) for k in lazy.entries))
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"{method.name} convert",
                   disable=not progress)
        def members_read(members):
            for m in members:
                yield cast(m + ".weight", lazy.get(m + ".weight"))
                bar.update(lazy.nbytes(m + ".weight"))

        for members in fused:
            group_scale[members] = method.group_scale(config, members_read(members))

        # pass 2: read, quantize, hand to the writer (one unit at a time)
        def quantized(layer: str) -> dict[str, torch.Tensor]:
            t = cast(layer + ".weight", lazy.get(layer + ".weight"))
            return method.quantize_weight(t, config, group_scale.get(group_of[layer]))

        def tensors(unit) -> dict[str, torch.Tensor]:
            layer, _, suffix = unit.key.rpartition(".")
            if unit.layer is None and layer in group_of and suffix in method.suffixes:
                # formats with plain keys for a layer (FP8): each of its tensors is a unit of its own
                return {"": quantized(layer)[suffix]}
            if unit.layer is not None:
                return quantized(unit.layer)
            return {"": cast(unit.key, lazy.get(unit.key))}

        write_checkpoint(dst, f, cfg, units, tensors, max_shard_size, config.to_json(), overwrite,
                         progress=lambda u: bar.update(lazy.nbytes(u.key) if u.key in lazy.entries else 0))
        bar.close()
    finally:
        lazy.close()
    return cfg


# ---------------------------------------------------------------------------------------------
# Writing (streamed)

@contextlib.contextmanager
def _writing(dst):
    """Name the destination in a write error (a full disk: numpy's "131072 requested and 40640 written", or
    ENOSPC from the file object), which is raised from the staged file: atomic_save then removes it."""
    try:
        yield
    except OSError as e:
        msg = f"cannot write GGUF file {os.fspath(dst)}: {e.strerror or e}"
        raise (OSError(e.errno, msg) if e.errno else OSError(msg)) from e


def convert_gguf(src, dst, gguf_type: str, dtype: torch.dtype | None = None, progress: bool | None = None,
                 overwrite: bool = False) -> WanConfig:
    """Stream-convert a dense Wan checkpoint (any supported format, or a GGUF file) to the GGUF file `dst`
    with its linear weights in `gguf_type` (F32, F16, BF16, Q8_0, Q5_0, Q4_0; `tensor_types` says which tensor
    gets which type). `dtype`: cast the source tensors first (the fp32 modules stay fp32); None keeps them.
    Returns the config.

    Tensor infos are written from the source's headers, then each tensor is read, quantized by row chunks
    (`encode`) and appended, one at a time: peak memory is about one tensor. `dst` must end in `.gguf`; it is
    checked before anything is read and written atomically and non-destructively (an existing file is
    refused unless `overwrite`; a failure or kill leaves no partial file; wan_model.io._atomic)."""
    gguf = _gguf()
    check_gguf_type(gguf_type)
    if not os.fspath(dst).lower().endswith(".gguf"):
        raise ValueError(f"a GGUF checkpoint is one .gguf file; got destination {os.fspath(dst)!r}")
    check_destination(dst, None, overwrite)
    opened = open_source(src)
    src = os.fspath(src)
    lazy = opened.lazy()
    try:
        found = quant.detect(lazy.meta())
        if found:
            raise CheckpointError(f"{src} is {next(iter(found)).upper()}-quantized: GGUF is written from dense "
                                  "checkpoints")
        cfg = opened.config(lazy.meta())
        check_state_dict(lazy.meta(), cfg, lazy.source)

        def target(key: str, stored: torch.dtype) -> torch.dtype:
            return stored if dtype is None else torch.float32 if keeps_fp32(key) else dtype

        stored = {k: (target(k, e[2]), e[3]) for k, e in lazy.entries.items()}
        types = tensor_types(stored, gguf_type)
        names = {}
        for k in lazy.entries:
            names[k] = diffusers_to_original_key(k)
            if names[k] is None:
                raise CheckpointError(f"{src}: tensor {lazy.source.get(k, k)!r} has no original-Wan name")
        order = sorted(lazy.entries, key=names.get)
        with atomic_save(dst, None, overwrite) as tmp:
            w = gguf.GGUFWriter(tmp, ARCH)
            try:
                w.add_quantization_version(gguf.GGML_QUANT_VERSION)
                w.add_file_type(gguf.LlamaFileType[_FILE_TYPES[gguf_type]])
                for k in order:
                    shape = stored[k][1]
                    w.add_tensor_info(names[k], shape, np.float32, _nbytes(shape, types[k]), raw_dtype=_qtype(types[k]))
                with _writing(dst):
                    w.write_header_to_file()
                    w.write_kv_data_to_file()
                    w.write_ti_data_to_file()
                with progress_bar(sum(_nbytes(stored[k][1], types[k]) for k in order), "gguf convert", progress) as bar:
                    for k in order:
                        t = cast_checked(lazy.get(k), stored[k][0], f"{src}: {lazy.source.get(k, k)}")
                        data = encode(t, types[k])
                        if types[k] == "F16" and np.isinf(data).any() and t.isfinite().all():
                            raise CheckpointError(f"{lazy.source.get(k, k)}: values beyond F16's range (max |x| "
                                                  f"{t.abs().max().item():.4g} > 65504); use --gguf-type BF16")
                        with _writing(dst):
                            w.write_tensor_data(data)
                        bar.update(data.nbytes)
            finally:
                with _writing(dst):
                    w.close()
    finally:
        lazy.close()
    return cfg
