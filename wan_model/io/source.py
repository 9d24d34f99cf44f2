"""One way in for every reader: `open_source(path)` opens a Wan transformer checkpoint in any form users hold —
a diffusers-style directory (or a pipeline directory's `transformer/`), one safetensors file (original, ComfyUI,
LightX2V names), a GGUF file, or an in-memory state dict in any of those namings — and gives what load, convert,
quantized convert and GGUF convert need, from one preamble:
  files     the safetensors files (a directory's shards from its index, checked)
  declared  the config its config.json declares (read once), or None
  hint      the NVFP4 layout the directory / file metadata declares (wan_model.io.formats)
  config()  declared, or derived from the weight shapes
  read()    every tensor at once, diffusers-named in our NVFP4 layout, with {diffusers key: key in the file}
  lazy()    a read-on-demand view (names, stored dtypes and shapes from the headers; `get(key)` one tensor)
A two-expert pipeline directory is two sources (`transformer/`, `transformer_2/`): `load_model` opens each.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from wan_model.compat.layouts import CheckpointError
from wan_model.core.config import WanConfig, _shape, read_json
from wan_model.io.formats import (INDEX_NAME, WEIGHTS_NAME, LazyCheckpoint, file_metadata, nvfp4_hint_of_dir,
                                  nvfp4_hint_of_file, read_safetensors, to_diffusers_names, vace_layers_of_file)
from wan_model.io.gguf import GGUFSource, is_gguf, read_gguf

__all__ = ["Source", "config_from_state_dict", "open_source"]

SCALE_KEYS = (".weight_scale", ".weight_scale_2", ".input_scale")


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


def diffusers_files(directory: str) -> list[str]:
    """The safetensors files of a diffusers-style directory: its shards (index checked: plain file names, all
    present) or its one weights file."""
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


def dir_config(directory: str) -> tuple[WanConfig, str | None]:
    """(config, the NVFP4 layout a diffusers-style directory declares: wan_model.io.formats.nvfp4_hint_of_dir),
    from ONE read of its config.json."""
    path = os.path.join(directory, "config.json")
    config = _checked(read_json, path)
    cfg = _checked(lambda where: WanConfig.from_diffusers_config(config, where), path)
    return cfg, nvfp4_hint_of_dir(directory, config)


def pipeline_fields(root: str) -> dict:
    """boundary_ratio and expand_timesteps of a pipeline's model_index.json (checked as WanConfig fields)."""
    path = os.path.join(root, "model_index.json")
    if not os.path.lexists(path):
        return {}
    index = _checked(read_json, path)
    fields = {k: index[k] for k in ("boundary_ratio", "expand_timesteps") if index.get(k) is not None}
    _checked(lambda p: WanConfig(**fields), path)
    return fields


def logical_shapes(sd: Mapping) -> dict:
    """Meta tensors of the dense shapes of a diffusers-named state dict (an NVFP4 `<layer>.weight` [N, K/2]
    counts as [N, K]; its scales are dropped): what `WanConfig.from_state_dict` reads."""
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


def config_from_state_dict(sd: Mapping, where: str, **fields) -> WanConfig:
    """The config derived from weight shapes (`fields`: what the file says besides, e.g. its vace_layers), or a
    CheckpointError naming the missing or malformed key."""
    try:
        return WanConfig.from_state_dict(logical_shapes(sd), **fields)
    except KeyError as e:
        raise CheckpointError(f"{where}: cannot derive the config, key {e} is missing") from e
    except CheckpointError:
        raise
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from e


class Source:
    """A Wan transformer checkpoint opened for reading (`open_source`). kind: "diffusers" (a directory),
    "safetensors" (one file), "gguf" or "dict"; `where`: the name errors use (the path, or "state dict");
    `fields`: the model_index.json fields of the pipeline directory it was found in (expand_timesteps);
    `vace_layers`: what a single VACE file of ours names in its metadata (others: derived from the weights)."""

    def __init__(self, where: str, kind: str, files: list[str] = (), declared: WanConfig | None = None,
                 hint: str | None = None, state: Mapping | None = None, fields: dict | None = None,
                 vace_layers: tuple[int, ...] | None = None):
        self.where, self.kind, self.files = where, kind, list(files)
        self.declared, self.hint, self.fields = declared, hint, fields or {}
        self.vace_layers = vace_layers
        self._state = state

    def read(self, progress: bool | None = None, dtype: torch.dtype | None = None
             ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Every tensor, diffusers-named (our NVFP4 layout), and {diffusers key: key in the file}. `progress`: a
        bar over the bytes read (None: from 1 GB on); `dtype`: GGUF only, the dtype its tensors are dequantized
        to (diffusers' fp32 modules fp32; None: F32/F16/BF16 kept, quantized types fp32)."""
        if self.kind == "gguf":  # dequantized one tensor at a time (wan_model.io.gguf)
            sd, source, _ = to_diffusers_names(read_gguf(self.where, dtype))
        elif self.kind == "dict":
            sd, source, _ = to_diffusers_names(dict(self._state))
        else:
            sd, source, _ = to_diffusers_names(read_safetensors(self.files, progress), self.hint)
        return sd, source

    def lazy(self) -> LazyCheckpoint | GGUFSource:
        """A read-on-demand view: `entries` {diffusers key: (path, key in the file, dtype, shape)}, `meta()`,
        `get(key)`, `close()`. Safetensors sources must be dense or NVFP4 (a ComfyUI fp8-scaled file is read
        whole); a GGUF source dequantizes one tensor per `get`."""
        if self.kind == "gguf":
            return GGUFSource(self.where)
        if self.kind == "dict":
            raise CheckpointError("an in-memory state dict is read whole (Source.read), not streamed")
        return LazyCheckpoint(self.files, self.hint)

    def streamed(self) -> LazyCheckpoint:
        """`lazy()` of a safetensors source, for the conversions that stream safetensors only (NVFP4 / FP8)."""
        if self.kind == "gguf":
            raise CheckpointError(f"{self.where} is a GGUF file, which is not streamed: convert it to safetensors "
                                  "first (python -m wan_model convert SRC.gguf DST --format diffusers)")
        return self.lazy()

    def config(self, sd: Mapping | None = None) -> WanConfig:
        """The declared config, else the one the shapes of `sd` (diffusers-named; default: the lazy view's meta
        tensors) imply."""
        if self.declared is not None:
            return self.declared
        if sd is None:
            lazy = self.lazy() if self.kind != "dict" else None
            try:
                sd = lazy.meta() if lazy is not None else self.read()[0]
            finally:
                if lazy is not None:
                    lazy.close()
        vace = {"vace_layers": self.vace_layers} if self.vace_layers is not None and \
            "vace_patch_embedding.weight" in sd else {}
        return config_from_state_dict(sd, self.where, **vace)


def open_source(path) -> Source:
    """Open the checkpoint at `path` (or the state dict `path` is) for reading; see the module docstring.
    A pipeline directory opens its `transformer/`; a two-expert one (`transformer_2/`) is an error naming the
    two to open. Nothing but config.json, the index, model_index.json and file headers is read here."""
    if isinstance(path, Mapping):
        return Source("state dict", "dict", state=path)
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    if is_gguf(path):  # first: a `.gguf` path that is not a regular file (a directory, a pipe) is refused as such
        return Source(path, "gguf", [path])
    if os.path.isdir(path):
        if os.path.isdir(os.path.join(path, "transformer_2")):
            raise CheckpointError(f"{path} is a two-expert pipeline: convert {path}/transformer and "
                                  f"{path}/transformer_2 one at a time")
        fields = {}
        if os.path.isdir(os.path.join(path, "transformer")):
            pipeline = pipeline_fields(path)
            fields = {"expand_timesteps": pipeline["expand_timesteps"]} if "expand_timesteps" in pipeline else {}
            path = os.path.join(path, "transformer")
        cfg, hint = dir_config(path)
        return Source(path, "diffusers", diffusers_files(path), cfg, hint, fields=fields)
    metadata = file_metadata([path])
    return Source(path, "safetensors", [path], hint=nvfp4_hint_of_file(metadata),
                  vace_layers=vace_layers_of_file(metadata, path))
