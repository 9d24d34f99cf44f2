"""NVFP4 weight quantization of a WanModel, and the streaming NVFP4 checkpoint converter.

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

`convert_nvfp4` streams: it reads one tensor at a time through safetensors `safe_open` (the file
mapping is re-opened every `REOPEN_BYTES` so that mapped pages do not pile up in RSS), quantizes it,
and appends it to the output shard, whose safetensors header is written first from the planned output
shapes. Peak memory is a few tensors, whatever the checkpoint size.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import json
import math
import os
import shutil
import struct
import tempfile

import torch
from torch import nn

import wan_kernels
from wan_kernels import nvfp4 as fmt
from wan_kernels.linear import NVFP4Linear, default_mode
from wan_model.config import WanConfig
from wan_model.model import StackedKV, WanModel, keeps_fp32, qkv_module_then_norm_rope, split_kv

METHODS = ("nvfp4",)
DEFAULT_KEEP = ("patch_embedding", "condition_embedder.time_embedder.*", "condition_embedder.text_embedder.*",
                "condition_embedder.image_embedder.*", "proj_out")
NEVER_QUANTIZED = ("condition_embedder.time_embedder.",)
SCALE_SUFFIXES = ("weight_scale", "weight_scale_2")
REOPEN_BYTES = 0  # re-open per tensor: measured peak RSS 1.41 GiB (1.3B) vs 1.43 at 64 MiB, 1.69 at 256 MiB


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


def nvfp4_impl(model_impl: str) -> str:
    """Backend of the NVFP4 ops for a model impl (nvfp4_linear has no C++ CPU kernel: "cpu" -> "auto")."""
    return "auto" if model_impl == "cpu" else model_impl


# ---------------------------------------------------------------------------------------------
# Layer groups: native module <-> diffusers layers

@functools.lru_cache(maxsize=16)
def layer_groups(cfg: WanConfig) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(native module path, diffusers layer names in row order) of every quantizable Linear of `cfg`."""
    from wan_model.checkpoint import _native_direct, _stacked

    meta = WanModel(cfg, impl="ref", device="meta")
    groups = []
    for d, n in _native_direct(cfg).items():
        if d.endswith(".weight") and n.endswith(".weight") and isinstance(meta.get_submodule(n[:-7]), nn.Linear):
            groups.append((n[:-7], (d[:-7],)))
    for i in range(cfg.num_layers):
        groups.append((f"blocks.{i}.attn1.to_qkv", tuple(f"blocks.{i}.attn1.to_{x}" for x in "qkv")))
    for name, km, vm, _ in _stacked(cfg):
        groups.append((name, tuple(f"blocks.{i}.{m}" for i in range(cfg.num_layers) for m in (km, vm))))
    return tuple(g for g in groups if not g[1][0].startswith(NEVER_QUANTIZED))


def quantized_groups(cfg: WanConfig, config: NVFP4Config) -> list[tuple[str, tuple[str, ...]]]:
    """The groups `config` quantizes (raises ValueError for a partly kept group or unknown layers)."""
    groups = layer_groups(cfg)
    if config.layers is not None:
        known = {m for _, members in groups for m in members}
        unknown = sorted(set(config.layers) - known)
        if unknown:
            raise ValueError(f"NVFP4Config.layers names layers that are not quantizable Linear layers of this "
                             f"model: {unknown[:8]} (the time embedder and patch embedding never are)")
    out = []
    for native, members in groups:
        q = [config.is_quantized(m) for m in members]
        if all(q):
            out.append((native, members))
        elif any(q):
            kept = [m for m, x in zip(members, q) if not x]
            raise ValueError(f"layers {list(members)[:4]}... run as ONE GEMM ({native}) with one NVFP4 global "
                             f"scale: quantize all or none of them; kept {kept[:4]}, "
                             f"quantized {[m for m, x in zip(members, q) if x][:4]}")
    if cfg.dim % 128 and any(len(m) > 1 for _, m in out):
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


def set_nvfp4_impl(model: WanModel, impl: str) -> None:
    """Point every NVFP4 module of `model` at backend `impl` (mapped by `nvfp4_impl`)."""
    for m in model.modules():
        if isinstance(m, NVFP4Linear):
            m.impl = nvfp4_impl(impl)


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def _finish(model: WanModel, config: NVFP4Config) -> WanModel:
    for block in model.blocks:  # decided here, once: NVFP4 QKV GEMM, then the fused RMSNorm + RoPE op
        if isinstance(block.attn1.to_qkv, NVFP4Linear):
            block.attn1.project_qkv = qkv_module_then_norm_rope
    model._quantization = config
    return model


@torch.no_grad()
def quantize_model(model: WanModel, method: str = "nvfp4", config: NVFP4Config | None = None) -> WanModel:
    """Quantize `model` in place (see the module docstring); returns it."""
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; expected one of {METHODS}")
    if model.quantization is not None:
        raise ValueError("this model is already quantized")
    config = config or NVFP4Config()
    impl = config.impl or nvfp4_impl(model.impl)
    for native, _ in quantized_groups(model.config, config):
        old = model.get_submodule(native)
        new = (NVFP4StackedKV.from_stacked(old, mode=config.mode, impl=impl) if isinstance(old, StackedKV)
               else NVFP4Linear.from_linear(old, mode=config.mode, impl=impl))
        _set_module(model, native, new)
    return _finish(model, config)


def quantize_structure(model: WanModel, config: NVFP4Config, device) -> WanModel:
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


# ---------------------------------------------------------------------------------------------
# Streaming conversion

_ST_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
              "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
              "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


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


class LazyCheckpoint:
    """Diffusers-named, read-on-demand view of a checkpoint's safetensors files: names, shapes and dtypes
    from the headers; `get(key)` reads one tensor. The mapping of a file is re-opened after `reopen_bytes`
    so that its touched pages leave the RSS."""

    def __init__(self, files: list[str], reopen_bytes: int = REOPEN_BYTES):
        from wan_model.checkpoint import (COMFY_PREFIX, IGNORED_KEYS, CheckpointError, _open, detect_format,
                                          original_to_diffusers_key)

        self._open, self._reopen_bytes = _open, reopen_bytes
        self._handles: dict[str, object] = {}
        self._read_since_open: dict[str, int] = {}
        raw: dict[str, tuple[str, torch.dtype, tuple[int, ...]]] = {}
        for path in files:
            if not path.endswith(".safetensors"):
                raise CheckpointError(f"{path}: only .safetensors checkpoints are loaded (never pickle)")
            with _open(path) as f:
                for k in f.keys():
                    sl = f.get_slice(k)
                    raw[k] = (path, _ST_DTYPES[sl.get_dtype()], tuple(sl.get_shape()))
        self.format = detect_format(raw)
        if self.format == "comfyui" and any(k.endswith((".scale_weight", ".comfy_quant")) or k == "scaled_fp8"
                                            for k in raw):
            raise CheckpointError("streaming conversion of a ComfyUI fp8-scaled file is not supported: convert "
                                  "it to bf16 first (python -m wan_model convert SRC TMP --format diffusers "
                                  "--dtype bfloat16)")
        self.entries: dict[str, tuple[str, str, torch.dtype, tuple[int, ...]]] = {}  # dkey -> (path, key, ...)
        for k, (path, dtype, shape) in raw.items():
            d = k
            if self.format != "diffusers":
                d = original_to_diffusers_key(k.removeprefix(COMFY_PREFIX)) or k
            if not any(s in d for s in IGNORED_KEYS):
                self.entries[d] = (path, k, dtype, shape)
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
            self._handles[path] = self._open(path).__enter__()
            self._read_since_open[path] = 0
        self._read_since_open[path] += self.nbytes(key)
        return self._handles[path].get_tensor(k)

    def close(self) -> None:
        for h in self._handles.values():
            h.__exit__(None, None, None)
        self._handles.clear()


def convert_nvfp4(src, dst, format: str = "diffusers", config: NVFP4Config | None = None,
                  dtype: torch.dtype | None = None, max_shard_size: int | str = "5GB",
                  progress: bool = True) -> WanConfig:
    """Stream-convert a dense checkpoint (any supported format) to an NVFP4 checkpoint at `dst`.

    Equal, bit for bit, to `WanModel.from_pretrained(src, dtype).quantize("nvfp4", config)` saved in
    `format` (dtype None: the stored dtypes, i.e. quantize from the stored values; else tensors are cast
    first, diffusers' fp32 modules staying fp32). Atomic (temporary name, then rename). Returns the config.
    """
    from tqdm import tqdm

    from wan_model.checkpoint import (COMFY_PREFIX, FORMATS, INDEX_NAME, WEIGHTS_NAME, CheckpointError, _replace,
                                      check_state_dict, diffusers_to_original_key, parse_size)

    if format not in FORMATS:
        raise ValueError(f"unknown checkpoint format {format!r}; expected one of {FORMATS}")
    config = config or NVFP4Config()
    from wan_model.checkpoint import source_files

    files, cfg = source_files(os.fspath(src))
    lazy = LazyCheckpoint(files)
    try:
        if checkpoint_layers(lazy.entries):
            raise CheckpointError(f"{src} is already NVFP4-quantized")
        if cfg is None:
            try:
                cfg = WanConfig.from_state_dict(lazy.meta())
            except KeyError as e:
                raise CheckpointError(f"{src}: cannot derive the config, key {e} is missing") from e
        check_state_dict(lazy.meta(), cfg, lazy.source)
        groups = quantized_groups(cfg, config)
        group_of = {m: members for _, members in groups for m in members}

        def cast(key: str, t: torch.Tensor) -> torch.Tensor:
            return t if dtype is None else t.to(torch.float32 if keeps_fp32(key) else dtype)

        def out_dtype(key: str) -> torch.dtype:
            return lazy.entries[key][2] if dtype is None else (torch.float32 if keeps_fp32(key) else dtype)

        # plan: units of output tensors produced together (a quantized weight -> its triplet)
        units: list[tuple[str, list[tuple[str, torch.dtype, tuple[int, ...]]]]] = []
        for key in sorted(lazy.entries):
            layer = key.removesuffix(".weight")
            shape = lazy.entries[key][3]
            if key.endswith(".weight") and layer in group_of:
                n, k = shape
                units.append((key, [(key, torch.uint8, (n, k // 2)),
                                    (layer + ".weight_scale", torch.float8_e4m3fn, fmt.scale_shape(n, k)),
                                    (layer + ".weight_scale_2", torch.float32, ())]))
            else:
                units.append((key, [(key, out_dtype(key), shape)]))

        # output names and shards (a unit never straddles two shards)
        prefix = COMFY_PREFIX if format == "comfyui" else ""
        rename = (lambda k: k) if format == "diffusers" else (lambda k: prefix + diffusers_to_original_key(k))
        max_bytes = parse_size(max_shard_size) if format == "diffusers" else float("inf")
        shards, cur, cur_bytes = [], [], 0
        for unit in units:
            n = sum(math.prod(s) * dt.itemsize for _, dt, s in unit[1])
            if cur and cur_bytes + n > max_bytes:
                shards.append(cur)
                cur, cur_bytes = [], 0
            cur.append(unit)
            cur_bytes += n
        shards += [cur] if cur else []

        # pass 1: the shared global scale of each fused group (max over members of amax / (6*448))
        group_scale: dict[tuple[str, ...], torch.Tensor] = {}
        fused = [members for _, members in groups if len(members) > 1]
        total = (sum(lazy.nbytes(m + ".weight") for ms in fused for m in ms)
                 + sum(lazy.nbytes(k) for k in lazy.entries))
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="nvfp4 convert", disable=not progress)
        for members in fused:
            scales = []
            for m in members:
                scales.append(fmt.global_scale(cast(m + ".weight", lazy.get(m + ".weight"))))
                bar.update(lazy.nbytes(m + ".weight"))
            group_scale[members] = torch.stack(scales).amax()

        # pass 2: read, quantize, append
        dst = os.path.abspath(os.fspath(dst))
        parent = os.path.dirname(dst)
        os.makedirs(parent, exist_ok=True)
        metadata = {"format": "pt", "quantization": "nvfp4"}
        if format == "diffusers":
            tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.tmp-", dir=parent)
            names = [WEIGHTS_NAME] if len(shards) == 1 else [
                f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
            paths = [os.path.join(tmp, n) for n in names]
        else:
            fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(dst)}.tmp-", suffix=".safetensors", dir=parent)
            os.close(fd)
            names, paths = [os.path.basename(dst)], [tmp]
        try:
            weight_map, total_size = {}, 0
            for shard, name, path in zip(shards, names, paths):
                plan = [(rename(k), dt, s) for _, outs in shard for k, dt, s in outs]
                writer = SafetensorsStreamWriter(path, plan, metadata)
                for key, outs in shard:
                    t = cast(key, lazy.get(key))
                    layer = key.removesuffix(".weight")
                    if len(outs) == 3:
                        members = group_of[layer]
                        gs = group_scale[members] if len(members) > 1 else fmt.global_scale(t)
                        packed, scale = wan_kernels.nvfp4_quantize(t.float().contiguous(), gs)
                        tensors = (packed, scale, gs.reshape(()))
                    else:
                        tensors = (t,)
                    for (k, _, _), v in zip(outs, tensors):
                        writer.write(rename(k), v)
                        weight_map[rename(k)] = name
                        total_size += v.numel() * v.element_size()
                    del t, tensors
                    bar.update(lazy.nbytes(key))
                writer.close()
            bar.close()
            if format == "diffusers":
                diff_cfg = cfg.to_diffusers_config()
                diff_cfg["quantization_config"] = config.to_json()
                with open(os.path.join(tmp, "config.json"), "w") as f:
                    json.dump(diff_cfg, f, indent=2, sort_keys=True)
                if len(shards) > 1:
                    with open(os.path.join(tmp, INDEX_NAME), "w") as f:
                        json.dump({"metadata": {"total_size": total_size}, "weight_map": weight_map}, f, indent=2,
                                  sort_keys=True)
                _replace(tmp, dst)
            else:
                os.replace(tmp, dst)
        except BaseException:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
            elif os.path.exists(tmp):
                os.remove(tmp)
            raise
    finally:
        lazy.close()
    return cfg
