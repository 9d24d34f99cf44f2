"""The quantization-method interface and its registry (torchao's config + module-handler registry is the model).

A method is one module (wan_model/quant/<name>.py) holding one `Method` subclass, registered at import:
  config          its frozen config dataclass (a `QuantConfig`: which layers, `keep` / `layers`, plus its own fields)
  modules         its quantized module classes (the Linear, the stacked cross-attention K/V)
  quantize_weight THE quantizer: dense [N, K] -> the layer's tensors in our layout; the in-memory `quantize` and
                  the streaming `convert_nvfp4` both call it, a fused group passing its shared `group_scale`
  module          an empty quantized module in place of a dense one; `load` fills it with quantize_weight's tensors
  dequantize      the layer's tensors -> dense [N, K]
  checkpoint_layers  detection: the diffusers layers a (diffusers-named) state dict stores in this method
  requantize      the LoRA hook: a dense weight back into a module of this method (fresh scales)
  dense_on_load, conversion_config   what a load or a conversion of a checkpoint in this method keeps
  stores, fuse_scales, unfuse_scales  a layer's scales in the fused QKV / stacked K/V (compat.layouts)
Callers go through `get(name)`, `method_of(config)`, `method_of_module(module)` and `detect(state_dict)`; none of
them names a method.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Iterable

import torch
from torch import nn

from wan_model.core.model import StackedKV

DEFAULT_KEEP = ("patch_embedding", "condition_embedder.time_embedder.*", "condition_embedder.text_embedder.*",
                "condition_embedder.image_embedder.*", "proj_out")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Which Linear layers a method quantizes (a method's config subclasses it and adds its own fields).

    keep:   fnmatch patterns over diffusers layer names (e.g. "blocks.0.ffn.*") kept in the model dtype.
    layers: explicit diffusers layer names to quantize (overrides `keep`; what a loaded checkpoint uses).
    """

    keep: tuple[str, ...] = DEFAULT_KEEP
    layers: tuple[str, ...] | None = None

    def is_quantized(self, layer: str) -> bool:
        if self.layers is not None:
            return layer in self.layers
        return not any(fnmatch.fnmatchcase(layer, p) for p in self.keep)


class Method:
    """A weight-only quantization method of Linear layers (see the module docstring). Subclasses set `name`,
    `config`, `modules`, `suffixes` and implement the methods that raise NotImplementedError."""

    name: str
    config: type[QuantConfig]
    modules: tuple[type[nn.Module], ...]
    suffixes: tuple[str, ...]  # the tensors of a quantized layer (besides bias), "weight" first

    def quantize_weight(self, w: torch.Tensor, config: QuantConfig,
                        scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Dense `w` [N, K] -> {suffix: tensor} in our layout; `scale`: a fused group's shared scale."""
        raise NotImplementedError

    def shares_scale(self, config: QuantConfig) -> bool:
        """Whether the members of a fused group (one GEMM) need one shared scale (`group_scale`)."""
        return False

    def group_scale(self, config: QuantConfig, weights: Iterable[torch.Tensor]) -> torch.Tensor:
        """The shared scale of a fused group from its members' dense weights (read one at a time): the scale
        `quantize_weight` computes for the members concatenated."""
        raise NotImplementedError

    def stored(self, config: QuantConfig, shape: tuple[int, int]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """{suffix: (dtype, shape)} of the tensors of a quantized layer of dense `shape` [N, K]."""
        raise NotImplementedError

    def module(self, old: nn.Module, config: QuantConfig, impl: str, device, dtype: torch.dtype | None = None,
               **options) -> nn.Module:
        """An empty module of this method in place of `old` (an nn.Linear or a StackedKV); `dtype`: that of
        the bias (None: the module's default); `options`: per-module fields a checkpoint decides."""
        raise NotImplementedError

    def check_groups(self, cfg, groups: list[tuple[str, tuple[str, ...]]]) -> None:
        """Raise ValueError when this method cannot quantize the (native module, members) `groups` of `cfg`."""

    def for_device(self, config: QuantConfig, device) -> QuantConfig:
        """The config as its modules will run on `device` (e.g. an "auto" mode resolved)."""
        return config

    def load(self, module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Copy `quantize_weight`'s tensors into `module`'s buffers."""
        with torch.no_grad():
            for s in self.suffixes:
                buf = getattr(module, s)
                buf.copy_(tensors[s].reshape(buf.shape))

    def dequantize(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The layer's tensors (our layout) -> the dense weight [N, K] in `dtype`."""
        raise NotImplementedError

    def checkpoint_layers(self, sd) -> tuple[str, ...]:
        """The diffusers layers a diffusers-named state dict (tensors may be meta) stores in this method."""
        raise NotImplementedError

    def checkpoint_config(self, groups: dict[str, tuple[str, ...]], layers: tuple[str, ...],
                          native: dict[str, torch.Tensor] | None) -> tuple[QuantConfig, dict] | None:
        """The config (and per-native-module `module` options) of a checkpoint storing `layers` (diffusers names)
        in this method; `groups`: native module -> its diffusers layers; `native`: the checkpoint's native state
        dict once read (None when only its shapes are checked). None: build no module of this method."""
        return (self.config(layers=tuple(layers)), {}) if layers else None

    def checkpoint_keys(self, layers) -> dict[str, torch.dtype | None]:
        """The keys `layers` add to a dense checkpoint (or replace), with their dtype (None: any float dtype)."""
        return {f"{layer}.{s}": dtype for layer in layers for s, (dtype, _) in self.stored(self.config(), (0, 0)).items()}

    def check_checkpoint(self, sd, layers, source: dict[str, str], dense: set[str]) -> None:
        """Raise CheckpointError (wan_model.compat.common) for what `checkpoint_keys` cannot say."""

    def dense_on_load(self, layers: set[str], groups: Iterable[tuple[str, tuple[str, ...]]],
                      keep: bool) -> set[str]:
        """Which of a checkpoint's `layers` stored in this method are dequantized (exactly) when it is loaded
        (keep=True) or converted with a cast to a dense dtype (keep=False); `groups`: (native module, diffusers
        layers) of the quantizable Linears (wan_model.compat.quantize.layer_groups). Default: none (the values
        are kept in this method either way)."""
        return set()

    def conversion_config(self, layers: tuple[str, ...]) -> dict | None:
        """The quantization_config a conversion that keeps `layers` in this method writes (None: none)."""
        return self.config(layers=tuple(layers)).to_json()

    def stores(self, sd, layer: str) -> bool:
        """Whether a state dict (tensors may be meta) stores `layer` (a diffusers layer or a native module) in
        this method, by its keys."""
        return False

    def fuse_scales(self, sd, names: list[str], native: str) -> dict[str, torch.Tensor]:
        """The scale tensors of native module `native` fusing this method's layers `names` (row order; their
        weights are concatenated by rows): {key: tensor} (wan_model.compat.layouts, diffusers -> native names)."""
        return {}

    def unfuse_scales(self, sd, names: list[str], native: str, rows: int) -> dict[str, torch.Tensor]:
        """Inverse of `fuse_scales`: each member's scale tensors, `rows` rows of the native module each."""
        return {}

    def config_of(self, module: nn.Module) -> QuantConfig:
        """A config that quantizes like `module` does (its granularity, its dtypes)."""
        return self.config()

    def requantize(self, module: nn.Module, w: torch.Tensor) -> None:
        """The LoRA hook: quantize the dense [N, K] `w` into `module` with fresh scales."""
        self.load(module, self.quantize_weight(w, self.config_of(module)))

    def quantized_from(self, old: nn.Module, config: QuantConfig, impl: str) -> nn.Module:
        """`old` (nn.Linear or StackedKV) quantized: an empty module filled by `quantize_weight`, bias and the
        stacked K/V's norm_k copied."""
        w = old.weight.detach()
        new = self.module(old, config, impl, w.device, w.dtype)
        self.load(new, self.quantize_weight(w, config))
        if old.bias is not None:
            with torch.no_grad():
                new.bias.copy_(old.bias.detach())
        if isinstance(old, StackedKV):
            new.norm_k = nn.Parameter(old.norm_k.detach().clone())  # keeps its dtype
        return new


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add `method` to the registry (by its name; a method of the same name or config is replaced)."""
    for name, m in list(METHODS.items()):
        if m.config is method.config:
            del METHODS[name]
    METHODS[method.name] = method
    return method


def get(name: str) -> Method:
    """The method called `name` (ValueError naming the registered ones)."""
    if name not in METHODS:
        raise ValueError(f"unknown quantization method {name!r}; expected one of {tuple(METHODS)}")
    return METHODS[name]


def method_of(config: QuantConfig) -> Method:
    """The method whose config `config` is."""
    for m in METHODS.values():
        if type(config) is m.config:
            return m
    raise ValueError(f"{type(config).__name__} is not the config of a quantization method; registered: "
                     f"{[m.config.__name__ for m in METHODS.values()]}")


def method_of_module(module: nn.Module) -> Method | None:
    """The method whose module `module` is (None: not a quantized module)."""
    return next((m for m in METHODS.values() if isinstance(module, m.modules)), None)


def stored_in(sd, layer: str) -> Method | None:
    """The method a state dict stores `layer` in (`Method.stores`; None: dense)."""
    return next((m for m in METHODS.values() if m.stores(sd, layer)), None)


def detect(sd) -> dict[str, tuple[str, ...]]:
    """{method name: the diffusers layers stored in it} for the methods a diffusers-named state dict holds."""
    found = {name: m.checkpoint_layers(sd) for name, m in METHODS.items()}
    return {name: layers for name, layers in found.items() if layers}
