"""WanModel: the public Wan transformer. The pure model (`wan_model.core.model.WanTransformer`: config, RoPE,
blocks, forward on the `wan` ops) plus what users reach it through, each from the layer that owns it:
  checkpoints   `from_pretrained` / `save_pretrained` (wan_model.io.checkpoint: every format on disk)
  LoRA          `load_lora` / `unload_lora` (wan_model.compat.lora: the three namings, fused into the weights)
  quantization  `quantize("nvfp4" | "fp8", config)` (wan_model.compat.quantize)
  diffusers     `torch_dtype` / `subfolder`, `forward(..., return_dict, attention_kwargs)`, `cache_context`,
                `enable_parallelism(config=ContextParallelConfig(...))`, the fp32 modules diffusers keeps
                (wan_model.compat.spellings, wan_model.compat.diffusers)
Loaders build this class (`load_model(..., cls=WanModel)`), so everything loaded has the whole API.
"""

from __future__ import annotations

import contextlib

import torch

from wan_model.compat import spellings
from wan_model.compat.quantize import quantize_model, set_quantized_impl
from wan_model.core.model import WanContext, WanExperts, WanTransformer
from wan_model.core.offload import on_host
from wan_model.io import checkpoint

__all__ = ["WanContext", "WanExperts", "WanModel", "load_model"]


class WanModel(WanTransformer):
    """The Wan transformer on `wan` ops (`wan_model.core.model.WanTransformer`) with checkpoints, LoRA,
    quantization and diffusers' spellings. `impl` ("auto"|"cuda"|"cpu"|"triton"|"ref") picks the backend of every
    op once, at construction (and again when the model moves device)."""

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device="cpu", impl: str = "auto", *,
                        torch_dtype: torch.dtype | None = None, subfolder: str | None = None, **kw):
        """Load a diffusers dir, an original-Wan or ComfyUI safetensors file, a GGUF file, or a state dict in any of
        those namings (see wan_model.io.checkpoint). A Wan2.2 two-expert dir returns a `WanExperts` pair.

        `torch_dtype` and `subfolder` are diffusers' spellings: `torch_dtype` is `dtype` (default bfloat16; the
        modules diffusers keeps in fp32 stay fp32), `subfolder` is joined to `path` (e.g. "transformer" of a
        pipeline dir)."""
        path, dtype = spellings.pretrained_args(path, dtype, torch_dtype, subfolder)
        return checkpoint.load_model(path, dtype=dtype, device=device, impl=impl, cls=cls, **kw)

    def save_pretrained(self, path, format: str = "diffusers", max_shard_size: int | str = "5GB",
                        overwrite: bool = False) -> None:
        """Save atomically as a diffusers dir, an original-Wan file or a ComfyUI file. Never touches other
        files: an existing file, or a directory holding more than a checkpoint of ours, is refused unless
        `overwrite` (then only the checkpoint's files are replaced; wan_model.io.checkpoint.save_state_dict)."""
        checkpoint.save_model(self, path, format=format, max_shard_size=max_shard_size, overwrite=overwrite)

    def quantize(self, method: str = "nvfp4", config=None) -> "WanModel":
        """Quantize the weights in place (and return self). method "nvfp4": the Linear layers selected by
        `config` (a `wan_model.compat.quantize.NVFP4Config`; default: every Linear in the blocks, incl. the
        stacked cross-attention K/V) become `NVFP4Linear`; "fp8" (FP8Config): `FP8Linear`."""
        with on_host(self):  # with block offload on: the streamed blocks' host masters are quantized
            return quantize_model(self, method, config)

    def load_lora(self, lora, scale: float = 1.0, adapter_name: str | None = None) -> "WanModel":
        """Fuse a LoRA into the weights (and return self): `lora` a .safetensors path (diffusers/PEFT,
        original-Wan/ComfyUI or kohya/musubi naming; a dir: its pytorch_lora_weights.safetensors) or a state
        dict; W += scale * alpha / rank * up @ down, into the fused QKV, the stacked cross-attention K/V and
        NVFP4/FP8 weights (requantized) too. Adapters stack; keys naming nothing of this model are an error.
        `adapter_name` defaults to the file's stem. See wan_model/compat/lora.py (rules for quantize after
        load)."""
        from wan_model.compat.lora import load
        with on_host(self):  # with block offload on: fused into the streamed blocks' host masters
            load(self, lora, scale, adapter_name)
        return self

    def unload_lora(self, adapter_name: str | None = None) -> "WanModel":
        """Remove the adapter `adapter_name` (default: all) and return self: the weights are then bit for bit
        those of the model with only the other adapters loaded (none: the original tensors); weights changed since
        the fuse (e.g. by training) keep the change: the removed deltas are subtracted from them."""
        from wan_model.compat.lora import unload
        with on_host(self):
            unload(self, adapter_name)
        return self

    def enable_parallelism(self, ulysses_degree: int = 1, ring_degree: int = 1, group=None, *, config=None,
                           cp_plan=None) -> "WanModel":
        """`WanTransformer.enable_parallelism` (wan_model/core/parallel.py); diffusers' own call
        `enable_parallelism(config=ContextParallelConfig(ulysses_degree=U, ring_degree=R))` is accepted too."""
        if config is not None or cp_plan is not None:
            from wan_model.compat.diffusers import parallel_degrees

            if (ulysses_degree, ring_degree) != (1, 1):
                raise ValueError(f"enable_parallelism: pass the degrees either as ulysses_degree/ring_degree or in "
                                 f"config, not both (got ulysses_degree={ulysses_degree!r}, "
                                 f"ring_degree={ring_degree!r} and config={config!r})")
            ulysses_degree, ring_degree = parallel_degrees(config, cp_plan)
        return super().enable_parallelism(ulysses_degree, ring_degree, group)

    def to_dtype(self, dtype: torch.dtype, keep_fp32=spellings.keeps_fp32) -> "WanModel":
        """Cast to `dtype`, keeping diffusers' fp32 modules (`spellings.FP32_MODULES`) in fp32."""
        with on_host(self):
            return super().to_dtype(dtype, keep_fp32)

    def enable_offload(self, blocks_on_device: int | None = None, *, vram_budget: int | str | None = None,
                       prefetch: int = 1, from_file=None, device=None, parked: bool = False) -> "WanModel":
        """`WanTransformer.enable_offload` (wan_model/core/offload.py). `from_file`: the low-host-RAM tier: the
        dense safetensors checkpoint this model was loaded from (a diffusers dir or one file, any of the key
        namings): the streamed blocks are read from its memory map at each copy (cast to the model's dtypes, the
        fused QKV from its q, k, v rows) and their host tensors are dropped (but the buffers no checkpoint holds:
        the 8-bit balance, 4 C bytes per block, keeps a host copy). A model holding a LoRA or quantized
        weights differs from its file and is refused; LoRA / quantize / load_state_dict after enabling move the
        blocks they change to host memory. `device`, `parked`: as WanTransformer.enable_offload."""
        sources = None if from_file is None else _file_sources(self, from_file)
        return super().enable_offload(blocks_on_device, vram_budget=vram_budget, prefetch=prefetch, sources=sources,
                                      device=device, parked=parked)

    def _apply(self, fn, recurse=True):
        if getattr(self, "_offload", None) is not None:  # fn would see meta placeholders, not the host masters
            raise RuntimeError("this model has block offload on: call disable_offload() before moving or casting it "
                               "(.to / .cuda / .half / to_empty), then enable_offload() again")
        return super()._apply(fn, recurse)

    def set_impl(self, impl: str) -> "WanModel":
        """Switch every op of the model (quantized layers included) to backend `impl` (resolved once, here)."""
        super().set_impl(impl)
        if self.quantization is not None:
            set_quantized_impl(self, self.quantization.impl or impl)
        return self

    @contextlib.contextmanager
    def cache_context(self, name: str, **kwargs):
        """diffusers' `CacheMixin.cache_context(name, ...)`, which WanPipeline enters around each forward. A WanModel
        holds no diffusers cache hooks (`enable_cache` is diffusers-only), so there is no state to mark."""
        yield

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor | None = None,
                encoder_hidden_states_image: torch.Tensor | None = None,
                return_dict: bool | None = None, attention_kwargs: dict | None = None, *,
                context=None, control_hidden_states=None, control_hidden_states_scale=None):
        """`WanTransformer.forward` with diffusers' arguments (same order as WanTransformer3DModel.forward).
        attention_kwargs: diffusers' LoRA {"scale": s}; a WanModel holds no adapters, so as in diffusers
        without adapters it changes nothing. Any other key is an error.
        Returns [B, C_out, F, H, W] in the model dtype; with return_dict=False the tuple `(out,)`, with True a
        `WanOutput` (`.sample`), as diffusers returns them (WanPipeline calls with return_dict=False).
        VACE: control_hidden_states / control_hidden_states_scale as WanVACETransformer3DModel takes them (keywords,
        as WanVACEPipeline passes them)."""
        spellings.check_attention_kwargs(attention_kwargs)
        out = super().forward(hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image,
                              context=context, control_hidden_states=control_hidden_states,
                              control_hidden_states_scale=control_hidden_states_scale)
        return spellings.pack_output(out, return_dict)


def _file_sources(model: WanModel, path) -> dict[str, list]:
    """{native key of a block tensor: [(row, rows, tensor over the memory-mapped file)]} of a dense checkpoint."""
    import json
    import mmap
    import os
    import warnings

    from wan_model import quant
    from wan_model.compat.layouts import native_direct
    from wan_model.io.source import open_source

    if model.quantization is not None or getattr(model, "_lora", None) is not None:
        raise ValueError("enable_offload(from_file=...): this model holds quantized weights or a LoRA, so its blocks "
                         "differ from the file; offload it from host memory (from_file=None)")
    lazy = open_source(path).streamed()
    if quant.detect(lazy.meta()) or any(e[2].itemsize == 1 for e in lazy.entries.values()):
        raise ValueError(f"enable_offload(from_file={os.fspath(path)!r}): the file tier reads dense checkpoints; "
                         "this one holds quantized (NVFP4 / fp8) weights")
    maps = {}

    def view(d: str) -> torch.Tensor:
        file, key, dtype, shape = lazy.entries[d]
        if file not in maps:
            with open(file, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
                maps[file] = (mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), 8 + n, header)
        mm, base, header = maps[file]
        start, end = header[key]["data_offsets"]
        with warnings.catch_warnings():  # read-only on purpose: nothing writes through these views
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.frombuffer(mm, dtype=torch.uint8, count=end - start, offset=base + start)
        return raw.view(dtype).view(shape)

    out = {}
    for d, n in native_direct(model.config).items():
        if n.startswith("blocks.") and d in lazy.entries:
            v = view(d)
            out[n] = [(0, v.shape[0] if v.dim() else 1, v)]
    for i in range(len(model.blocks)):
        for p in ("weight", "bias"):
            parts, row = [], 0
            for x in "qkv":
                v = view(f"blocks.{i}.attn1.to_{x}.{p}")
                parts.append((row, v.shape[0], v))
                row += v.shape[0]
            out[f"blocks.{i}.attn1.to_qkv.{p}"] = parts
    return out


def load_model(path, dtype: torch.dtype = torch.bfloat16, device="cpu", impl: str = "auto", **kw):
    """`wan_model.io.checkpoint.load_model` building `WanModel`s (a `WanModel`, or a `WanExperts` of two)."""
    return checkpoint.load_model(path, dtype=dtype, device=device, impl=impl, cls=WanModel, **kw)
