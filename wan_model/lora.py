"""LoRA adapters fused into a WanModel's weights: `WanModel.load_lora(path, scale)` / `unload_lora()`.

File namings (every tensor of a LoRA file names one layer of the model and one role):
  diffusers / PEFT  `transformer.<diffusers layer>.lora_A.weight` [r, K], `.lora_B.weight` [N, r], optional
                    `.lora_B.bias` [N] (PEFT's lora_bias); alpha from the safetensors metadata that diffusers'
                    `save_lora_weights` writes (`lora_adapter_metadata`: "transformer.lora_alpha",
                    "transformer.alpha_pattern", "transformer.use_rslora"), else alpha = r (scale 1).
  original / ComfyUI `diffusion_model.<original layer>.lora_down.weight` / `.lora_up.weight` (or lora_A /
                    lora_B), `.alpha` (scalar), `.diff` (a full delta of the layer's weight, or of a parameter
                    such as `blocks.N.modulation`), `.diff_b` (a full delta of its bias); prefix also
                    `model.diffusion_model.` or none.
  kohya / musubi    `lora_unet_<original layer, "." -> "_">.lora_down.weight` / `.lora_up.weight` / `.alpha`.
Layers: every Linear (self/cross-attention q, k, v, o, I2V k_img / v_img, ffn.0 / ffn.2, the time, text and
image embedders, time_projection, head), the Conv3d patch embedding (kohya conv LoRA, flattened as ComfyUI
does) and, for `.diff`, any parameter (norms, modulation). A key naming anything else (an unknown layer, a
role such as `lora_mid` / `dora_scale`, a layer this model lacks, e.g. k_img on a T2V model) is an error
listing the keys: nothing is skipped silently.

Deltas, in fp32 (ComfyUI's and PEFT's rule; `scale` is load_lora's):
  W += scale * alpha / r * (up @ down)      (use_rslora: alpha / sqrt(r))
  b += scale * alpha / r * lora_B.bias;     p += scale * diff;     b += scale * diff_b
diffusers' own converter drops norm `.diff` / `.diff_b` keys and ignores weight `.diff` keys (except the head's);
we apply them as ComfyUI does.

Fusing (`apply`). A diffusers layer is a row range of one of our tensors (layouts.native_direct one to one, the
fused self-attention `to_qkv` rows q | k | v and the stacked cross-attention K/V rows of
quantize.layer_groups, the stacked k-norms `cross_kv.norm_k[i]`). Each touched range keeps its original rows
(copied to the CPU: device memory does not grow), and every load / unload recomputes the touched ranges as
round(original + sum of the loaded adapters' deltas): one rounding whatever the number of adapters, in any
order, and a range no adapter touches any more is its original again, bit for bit. A quantized module (a
weight that is not a floating tensor: NVFP4Linear, FP8Linear) keeps its original buffers; its weight becomes
requantize(dequantize(original) + deltas) (a fused group with its one global scale requantized whole), and
without deltas the original buffers come back.

Rules. Adapters stack (load_lora twice: both apply; `unload_lora(name)` removes one, leaving exactly the
model with the others loaded; `unload_lora()` removes all). A model quantized after load_lora holds the
adapters inside its quantized weights: they cannot be taken out (unload_lora / load_lora then raise, naming
the layer; quantize first, then load). Casting or moving the model after load_lora is allowed: unload then
restores the originals cast / moved likewise.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import torch

from wan_model.config import WanConfig
from wan_model.layouts import (CheckpointError, diffusers_keys, diffusers_to_original_key, native_direct,
                               original_to_diffusers_key, stacked_kv)

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes in a dir
METADATA_KEY = "lora_adapter_metadata"
# role of a key: its suffix after the layer name (longest first when matching)
ROLES = {"lora_A.weight": "down", "lora_down.weight": "down", "lora_B.weight": "up", "lora_up.weight": "up",
         "lora_B.bias": "up_bias", "alpha": "alpha", "diff": "diff", "diff_b": "diff_b"}
# key prefix -> naming of the layer names after it
PREFIXES = (("model.diffusion_model.", "original"), ("diffusion_model.", "original"), ("lora_unet_", "kohya"),
            ("transformer.", "any"), ("", "any"))


@dataclasses.dataclass(frozen=True)
class Term:
    """One delta of a diffusers parameter: `factor * (up.flatten(1) @ down.flatten(1))` (low rank) or
    `factor * full` (`.diff`, `.diff_b`, `lora_B.bias`), reshaped to the parameter's shape."""

    up: torch.Tensor | None
    down: torch.Tensor | None
    full: torch.Tensor | None
    factor: float

    def delta(self, shape, device) -> torch.Tensor:
        if self.full is not None:
            return self.full.to(device, torch.float32).reshape(shape) * self.factor
        up, down = self.up.to(device, torch.float32), self.down.to(device, torch.float32)
        return (up.flatten(1) @ down.flatten(1)).reshape(shape) * self.factor


@dataclasses.dataclass
class Adapter:
    name: str
    scale: float
    terms: dict[str, list[Term]]  # diffusers parameter key -> terms (factor excludes `scale`)


@dataclasses.dataclass(frozen=True)
class Target:
    """Where a diffusers parameter lives in our model: rows [row, row + rows) of tensor `attr` of module `module`;
    `shape` is the diffusers parameter's shape."""

    module: str
    attr: str
    row: int
    rows: int
    shape: tuple[int, ...]


@dataclasses.dataclass
class LoraState:
    """`model._lora`: the loaded adapters and the originals of every range / quantized module they touched."""

    adapters: list[Adapter] = dataclasses.field(default_factory=list)
    dense: dict[tuple[str, str, int, int], torch.Tensor] = dataclasses.field(default_factory=dict)
    quantized: dict[str, tuple[object, dict[str, torch.Tensor]]] = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Reading a LoRA file into terms per diffusers parameter

def read(lora) -> tuple[dict[str, torch.Tensor], dict | None, str | None]:
    """(tensors, diffusers metadata or None, default adapter name) of a path (a .safetensors file, or a dir
    holding diffusers' pytorch_lora_weights.safetensors) or a state dict."""
    if isinstance(lora, dict):
        return dict(lora), None, None
    from safetensors import safe_open

    path = os.fspath(lora)
    if os.path.isdir(path):
        path = os.path.join(path, DIFFUSERS_WEIGHT_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_lora: no LoRA file at {path}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            sd = {k: f.get_tensor(k) for k in f.keys()}
            raw = (f.metadata() or {}).get(METADATA_KEY)
    except Exception as e:  # safetensors raises its own error types for a damaged / foreign file
        raise CheckpointError(f"{path}: not a readable safetensors LoRA file: {e}") from e
    meta = json.loads(raw) if raw else None
    return sd, meta, os.path.splitext(os.path.basename(path))[0]


def _kohya_names(cfg: WanConfig) -> dict[str, str]:
    """kohya / musubi layer name -> original layer name, for every layer of `cfg`."""
    out = {}
    for d in diffusers_keys(cfg):
        o = diffusers_to_original_key(d)
        if o is not None:
            layer = o.rsplit(".", 1)[0] if o.endswith((".weight", ".bias")) else o
            out[layer.replace(".", "_")] = layer
    return out


def _split(key: str):
    """key -> (naming, layer name, role) or None when the role is unknown."""
    for suffix in sorted(ROLES, key=len, reverse=True):
        if key.endswith("." + suffix):
            stem = key[: -len(suffix) - 1]
            for prefix, naming in PREFIXES:
                if stem.startswith(prefix):
                    return naming, stem[len(prefix):], ROLES[suffix]
    return None


def _diffusers_layer(name: str, naming: str, known: set[str], kohya: dict[str, str]) -> str | None:
    """The diffusers layer (or parameter) name of a LoRA layer name, if this model has it."""
    if naming == "kohya":
        name = kohya.get(name)
        if name is None:
            return None
        naming = "original"
    cands = [original_to_diffusers_key(name)] if naming == "original" else [name, original_to_diffusers_key(name)]
    for c in cands:
        if c is not None and (c in known or f"{c}.weight" in known or f"{c}.bias" in known):
            return c
    return None


def _metadata_alpha(meta: dict | None, layer: str, rank: int) -> tuple[float, bool] | None:
    """(alpha, use_rslora) of a diffusers-named layer from diffusers' LoRA metadata (PEFT LoraConfig fields,
    prefixed "transformer."; alpha_pattern keys match a layer name or its dotted suffix, as PEFT's do)."""
    if not meta:
        return None
    cfg = {k[len("transformer."):]: v for k, v in meta.items() if k.startswith("transformer.")}
    alpha = cfg.get("lora_alpha")
    for pattern, a in (cfg.get("alpha_pattern") or {}).items():
        if layer == pattern or layer.endswith("." + pattern):
            alpha = a
    return (float(rank if alpha is None else alpha), bool(cfg.get("use_rslora", False)))


def parse(sd: dict[str, torch.Tensor], cfg: WanConfig, meta: dict | None = None) -> dict[str, list[Term]]:
    """LoRA tensors (any of the three namings) -> terms per diffusers parameter key of `cfg`'s model.
    CheckpointError listing every key it cannot place, and naming layers with half a low-rank pair."""
    known, kohya = diffusers_keys(cfg), _kohya_names(cfg)
    layers: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, t in sd.items():
        split = _split(key)
        layer = split and _diffusers_layer(split[1], split[0], known, kohya)
        if not layer:
            unknown.append(key)
            continue
        role = split[2]
        if role in layers.setdefault(layer, {}):
            raise CheckpointError(f"LoRA: two keys give the {role} of layer {layer} (second: {key})")
        layers[layer][role] = t
        layers[layer].setdefault("_keys", []).append(key)
    if unknown:
        raise CheckpointError(
            f"LoRA: {len(unknown)} key(s) name no layer of this model (layers / roles it does not have, e.g. a LoRA "
            f"for another Wan variant or size) and cannot be applied: {sorted(unknown)[:12]}"
            + (" ..." if len(unknown) > 12 else "") + f"; roles understood: {sorted(ROLES)}")
    terms: dict[str, list[Term]] = {}
    for layer, parts in layers.items():
        keys = parts.pop("_keys")
        if ("up" in parts) != ("down" in parts):
            raise CheckpointError(f"LoRA layer {layer}: {keys} hold only one of the up / down matrices")
        weight = layer if layer in known else f"{layer}.weight"
        if "up" in parts:
            up, down = parts["up"], parts["down"]
            r = down.shape[0]
            if up.dim() < 2 or down.dim() < 2 or up.shape[1] != r:
                raise CheckpointError(f"LoRA layer {layer}: up {tuple(up.shape)} @ down {tuple(down.shape)} is not a "
                                      "rank-r product ([N, r] @ [r, K])")
            if "alpha" in parts:
                alpha, rs = float(parts["alpha"].float().reshape(-1)[0]), False
            else:
                alpha, rs = _metadata_alpha(meta, layer, r) or (float(r), False)
            factor = alpha / (math.sqrt(r) if rs else r)
            terms.setdefault(weight, []).append(Term(up, down, None, factor))
            if "up_bias" in parts:
                terms.setdefault(f"{layer}.bias", []).append(Term(None, None, parts["up_bias"], factor))
        elif "alpha" in parts or "up_bias" in parts:
            raise CheckpointError(f"LoRA layer {layer}: {keys} without its lora_down / lora_up pair")
        if "diff" in parts:
            terms.setdefault(weight, []).append(Term(None, None, parts["diff"], 1.0))
        if "diff_b" in parts:
            terms.setdefault(f"{layer}.bias", []).append(Term(None, None, parts["diff_b"], 1.0))
    missing = sorted(k for k in terms if k not in known)
    if missing:
        raise CheckpointError(f"LoRA: deltas for parameters this model does not have: {missing[:12]}")
    return terms


# ---------------------------------------------------------------------------------------------
# Where each diffusers parameter lives in our model

def targets(model) -> dict[str, Target]:
    """diffusers parameter key -> Target, from the layouts' key maps and the quantizer's fused groups."""
    from wan_model.quantize import layer_groups

    cfg = model.config
    out = {}
    for d, n in native_direct(cfg).items():
        module, _, attr = n.rpartition(".")
        shape = _shape(model, module, attr)
        out[d] = Target(module, attr, 0, shape[0] if shape else 1, shape)
    for native, members in layer_groups(cfg):
        if len(members) == 1:
            continue
        for attr in ("weight", "bias"):
            shape = _shape(model, native, attr)
            rows = shape[0] // len(members)
            for j, m in enumerate(members):
                out[f"{m}.{attr}"] = Target(native, attr, j * rows, rows, (rows, *shape[1:]))
    for name, _, _, nm in stacked_kv(cfg):
        C = getattr(model, name).norm_k.shape[1]
        for i in range(cfg.num_layers):
            out[f"blocks.{i}.{nm}.weight"] = Target(name, "norm_k", i, 1, (C,))
    return out


def _tensor(model, module: str, attr: str) -> torch.Tensor:
    return getattr(model.get_submodule(module) if module else model, attr)


def _shape(model, module: str, attr: str) -> tuple[int, ...]:
    """The dense shape of a parameter (a quantized Linear's weight: [out_features, in_features])."""
    m = model.get_submodule(module) if module else model
    if attr == "weight" and hasattr(m, "in_features"):
        return (m.out_features, m.in_features)
    return tuple(getattr(m, attr).shape)


def _quantized(model, t: Target):
    """The module holding `t` when its weight is stored quantized (not a floating tensor), else None."""
    m = model.get_submodule(t.module) if t.module else model
    w = getattr(m, "weight", None)
    if t.attr != "weight" or w is None or (w.dtype.is_floating_point and w.element_size() > 1):
        return None
    if not hasattr(m, "dense_weight") or not (hasattr(m, "set_dense_weight") or hasattr(m, "load_weight")):
        raise CheckpointError(f"LoRA on {t.module}: its weight is {w.dtype} in a {type(m).__name__}, which has no "
                              "dense_weight / set_dense_weight to dequantize and requantize it")
    return m


def _requantize(m, w: torch.Tensor) -> None:
    """Quantize the dense [N, K] fp32 `w` into module `m` with fresh scales from its amax (FP8Linear:
    set_dense_weight; NVFP4Linear: load_weight)."""
    (m.set_dense_weight if hasattr(m, "set_dense_weight") else m.load_weight)(w)


def _buffers(m) -> dict[str, torch.Tensor]:
    """The tensors of a quantized module that requantization rewrites (all but bias and norm_k)."""
    return {n: t for n, t in [*m.named_buffers(recurse=False), *m.named_parameters(recurse=False)]
            if t is not None and n not in ("bias", "norm_k")}


# ---------------------------------------------------------------------------------------------
# Fusing

@torch.no_grad()
def apply(model, state: LoraState) -> None:
    """Recompute every range / quantized module that any adapter touches or touched (see the module docstring)."""
    where = targets(model)
    by_range: dict[tuple[str, str, int, int], list[tuple[Target, float, list[Term]]]] = {}
    for a in state.adapters:
        for key, terms in a.terms.items():
            t = where[key]
            by_range.setdefault((t.module, t.attr, t.row, t.rows), []).append((t, a.scale, terms))
    quantized: dict[str, list] = {}
    dense: dict[tuple, list] = {}
    for rng in [*state.dense, *by_range]:
        dense.setdefault(rng, by_range.get(rng, []))
    for rng in list(dense):
        t = Target(*rng, ())
        if rng not in state.dense and _quantized(model, t) is not None:
            quantized.setdefault(rng[0], []).extend(dense.pop(rng))
    for path in state.quantized:
        quantized.setdefault(path, [])
    _check_unchanged(model, state)
    for rng, items in dense.items():
        module, attr, row, rows = rng
        cur = _tensor(model, module, attr)
        if rng not in state.dense:
            state.dense[rng] = _rows_of(cur, row, rows).detach().to("cpu", copy=True)
        base = state.dense[rng].to(cur.device)
        region = _rows_of(cur, row, rows)
        if not items:
            region.copy_(base)
            continue
        acc = base.to(torch.float32, copy=True)                                  # never the saved original itself
        for t, scale, terms in items:
            for term in terms:
                acc += term.delta(t.shape, cur.device).reshape(acc.shape) * scale
        region.copy_(acc)
    for path, items in quantized.items():
        m = model.get_submodule(path)
        if path not in state.quantized:
            state.quantized[path] = (m, {n: b.detach().to("cpu", copy=True) for n, b in _buffers(m).items()})
        for n, b in state.quantized[path][1].items():
            getattr(m, n).copy_(b)
        if items:
            w = m.dense_weight(torch.float32)                                     # [N, K]
            for t, scale, terms in items:
                for term in terms:
                    w[t.row:t.row + t.rows] += term.delta(t.shape, w.device).reshape(t.rows, -1) * scale
            _requantize(m, w)
    # ranges / modules no adapter touches any more are their originals again: their copies go
    state.dense = {k: v for k, v in state.dense.items() if dense.get(k)}
    state.quantized = {k: v for k, v in state.quantized.items() if quantized.get(k)}


def _rows_of(t: torch.Tensor, row: int, rows: int) -> torch.Tensor:
    return t if t.dim() == 0 else t[row:row + rows]


def _check_unchanged(model, state: LoraState) -> None:
    """Refuse (before changing anything) when a module the adapters were fused into was replaced since, e.g.
    by quantize(): the adapters are then part of its new weights."""
    for path, (m, _) in state.quantized.items():
        if model.get_submodule(path) is not m:
            raise CheckpointError(f"LoRA: {path} was replaced ({type(model.get_submodule(path)).__name__}) after "
                                  "the LoRA was fused into it; the adapters are part of its weights now and cannot "
                                  "be changed: reload the base model (quantize before load_lora)")
    for module, attr, row, rows in state.dense:
        cur = _tensor(model, module, attr)
        if not (cur.dtype.is_floating_point and cur.element_size() > 1) or cur.dim() and cur.shape[0] < row + rows:
            raise CheckpointError(f"LoRA: {module}.{attr} became {cur.dtype} {tuple(cur.shape)} (quantized?) after "
                                  "the LoRA was fused into it; the adapters are part of its weights now and cannot "
                                  "be changed: reload the base model (quantize before load_lora)")


def load(model, lora, scale: float = 1.0, adapter_name: str | None = None) -> str:
    """`WanModel.load_lora`: parse, check, fuse; returns the adapter's name."""
    sd, meta, stem = read(lora)
    terms = parse(sd, model.config, meta)
    where = targets(model)
    for key, ts in terms.items():
        shape = where[key].shape
        for term in ts:
            if term.full is not None:
                ok, got = tuple(term.full.shape) == shape, list(term.full.shape)
            else:
                got = [term.up.shape[0], math.prod(term.down.shape[1:])]
                ok = got == [shape[0], math.prod(shape[1:])]
                got = f"up {list(term.up.shape)} @ down {list(term.down.shape)}"
            if not ok:
                raise CheckpointError(f"LoRA delta for {key}: the model's parameter is {list(shape)}, the LoRA "
                                      f"gives {got}")
    state = getattr(model, "_lora", None) or LoraState()
    names = [a.name for a in state.adapters]
    name = adapter_name or (stem if stem and stem not in names else f"default_{len(names)}")
    if name in names:
        raise ValueError(f"load_lora: an adapter named {name!r} is loaded already (loaded: {names})")
    state.adapters.append(Adapter(name, float(scale), terms))
    try:
        apply(model, state)
    except Exception:
        state.adapters.pop()
        raise
    model._lora = state
    return name


def unload(model, adapter_name: str | None = None) -> None:
    """`WanModel.unload_lora`: remove one adapter (or all), restoring the originals it alone touched."""
    state = getattr(model, "_lora", None)
    if state is None:
        if adapter_name is not None:
            raise ValueError(f"unload_lora: no adapter {adapter_name!r} is loaded (none is)")
        return
    names = [a.name for a in state.adapters]
    if adapter_name is not None and adapter_name not in names:
        raise ValueError(f"unload_lora: no adapter {adapter_name!r} is loaded (loaded: {names})")
    kept = [a for a in state.adapters if adapter_name is not None and a.name != adapter_name]
    removed, state.adapters = state.adapters, kept
    try:
        apply(model, state)
    except Exception:
        state.adapters = removed
        raise
    if not kept:
        model._lora = None


def adapters(model) -> list[tuple[str, float]]:
    """(name, scale) of the adapters fused into `model`, in load order."""
    state = getattr(model, "_lora", None)
    return [] if state is None else [(a.name, a.scale) for a in state.adapters]
