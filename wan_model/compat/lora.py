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
restores the originals cast / moved likewise. Weights changed after load_lora (training, edits) keep the
change: unload / a further load subtract the fused deltas from the current weights instead (see `apply`).

Checks (before any weight changes; a refusal is one line naming the file or "<dict>", the key and the value):
LoRA tensors floating (an alpha may be an integer scalar), finite, rank >= 1, alpha one finite value, at least
one tensor; load_lora's scale finite in fp32; every scaled delta and every fused weight finite in the dtype the
model holds that weight in (a quantized one: its dense fp32 weight before and after requantization).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os

import torch

from wan_model import quant
from wan_model.core.config import WanConfig
from wan_model.compat.layouts import (CheckpointError, block_stacks, diffusers_keys, diffusers_to_original_key,
                                      native_direct, original_to_diffusers_key, vace_direct)

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
    key: str = ""  # the LoRA key it comes from (lora_B / lora_up, diff, diff_b), for messages

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
    source: str = "<dict>"        # the file it was read from, for messages


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

def read(lora) -> tuple[dict[str, torch.Tensor], dict | None, str | None, str]:
    """(tensors, diffusers metadata or None, default adapter name, source: the file's path or "<dict>") of a path
    (a .safetensors file, or a dir holding diffusers' pytorch_lora_weights.safetensors) or a state dict."""
    if isinstance(lora, dict):
        return dict(lora), None, None, "<dict>"
    from safetensors import safe_open

    path = os.fspath(lora)
    if os.path.isdir(path):
        path = os.path.join(path, DIFFUSERS_WEIGHT_NAME)
    try:
        os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"load_lora: no LoRA file at {path}") from None
    except OSError as e:  # e.g. a directory on the way that may not be searched
        raise CheckpointError(f"{path}: cannot read the LoRA file: {e.strerror or e}") from None
    try:
        with open(path, "rb"):
            pass
    except OSError as e:  # no read permission, a directory, ...
        raise CheckpointError(f"{path}: cannot read the LoRA file: {e.strerror or e}") from None
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            sd = {k: f.get_tensor(k) for k in f.keys()}
            raw = (f.metadata() or {}).get(METADATA_KEY)
    except Exception as e:  # safetensors raises its own error types for a damaged / foreign file
        why = " ".join(str(e).split())
        raise CheckpointError(f"{path}: not a readable safetensors LoRA file: {why}") from e
    try:
        meta = json.loads(raw) if raw else None
    except ValueError as e:
        raise CheckpointError(f"{path}: metadata {METADATA_KEY} is not JSON ({e}): {raw[:80]!r}") from None
    if meta is not None and not isinstance(meta, dict):
        raise CheckpointError(f"{path}: metadata {METADATA_KEY} is a JSON {type(meta).__name__}, not an object")
    return sd, meta, os.path.splitext(os.path.basename(path))[0], path


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


def _metadata_alpha(meta: dict | None, layer: str, rank: int, source: str) -> tuple[float, bool] | None:
    """(alpha, use_rslora) of a diffusers-named layer from diffusers' LoRA metadata (PEFT LoraConfig fields,
    prefixed "transformer."; alpha_pattern keys match a layer name or its dotted suffix, as PEFT's do)."""
    if not meta:
        return None
    cfg = {k[len("transformer."):]: v for k, v in meta.items() if k.startswith("transformer.")}
    alpha, field = cfg.get("lora_alpha"), "transformer.lora_alpha"
    patterns = cfg.get("alpha_pattern") or {}
    if not isinstance(patterns, dict):
        raise CheckpointError(f"LoRA {source}: metadata transformer.alpha_pattern must be an object, got {patterns!r}")
    for pattern, a in patterns.items():
        if layer == pattern or layer.endswith("." + pattern):
            alpha, field = a, f"transformer.alpha_pattern[{pattern!r}]"
    if alpha is None:
        alpha = rank
    elif isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise CheckpointError(f"LoRA {source}: metadata {field} of layer {layer} must be a finite number, got "
                              f"{alpha!r}")
    return float(alpha), bool(cfg.get("use_rslora", False))


def _check_values(source: str, key: str, t, role: str) -> None:
    """A LoRA tensor is a floating tensor of finite values (alpha: an integer or floating scalar)."""
    if not isinstance(t, torch.Tensor):
        raise CheckpointError(f"LoRA {source}: {key} is a {type(t).__name__}, not a tensor")
    ok = t.dtype.is_floating_point or role == "alpha" and not t.dtype.is_complex and t.dtype != torch.bool
    if not ok:
        raise CheckpointError(f"LoRA {source}: {key} is {t.dtype}; LoRA tensors must be floating "
                              f"({'or integer ' if role == 'alpha' else ''}values)")
    if role == "alpha" and t.numel() != 1:
        raise CheckpointError(f"LoRA {source}: {key} must hold one value (alpha), got shape {list(t.shape)}")
    bad = _nonfinite(t.float(), torch.float32)
    if bad:
        raise CheckpointError(f"LoRA {source}: {key} holds {bad}")


def _nonfinite(x: torch.Tensor, dtype: torch.dtype) -> str | None:
    """None when `x` is finite in `dtype`, else a description of its first bad value."""
    y = x.to(dtype)
    fin = torch.isfinite(y)
    if bool(fin.all()):
        return None
    i = int((~fin).reshape(-1).nonzero()[0])
    v, was = y.reshape(-1)[i].item(), x.reshape(-1)[i].item()
    return (f"{v}" + (f" (from {was:.4g})" if v != was and was == was else "") +
            f" at flat index {i} ({int((~fin).sum())} of {y.numel()} values not finite in {dtype})")


def parse(sd: dict[str, torch.Tensor], cfg: WanConfig, meta: dict | None = None,
          source: str = "<dict>") -> dict[str, list[Term]]:
    """LoRA tensors (any of the three namings) -> terms per diffusers parameter key of `cfg`'s model.
    CheckpointError (naming `source`, the file) listing every key it cannot place, naming layers with half a
    low-rank pair, and naming a key whose tensor is not floating, holds a non-finite value or has rank 0 /
    an alpha that is not one finite value."""
    if not sd:
        raise CheckpointError(f"LoRA {source}: holds no tensors (an adapter that changes nothing is refused)")
    known, kohya = diffusers_keys(cfg), _kohya_names(cfg)
    layers: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    unknown = []
    for key, t in sd.items():
        split = isinstance(key, str) and _split(key)
        layer = split and _diffusers_layer(split[1], split[0], known, kohya)
        if not layer:
            unknown.append(str(key))
            continue
        role = split[2]
        if role in layers.setdefault(layer, {}):
            raise CheckpointError(f"LoRA {source}: two keys give the {role} of layer {layer} (second: {key})")
        layers[layer][role] = (key, t)
    if unknown:
        raise CheckpointError(
            f"LoRA {source}: {len(unknown)} key(s) name no layer of this model (layers / roles it does not have, "
            f"e.g. a LoRA for another Wan variant or size) and cannot be applied: {sorted(unknown)[:12]}"
            + (" ..." if len(unknown) > 12 else "") + f"; roles understood: {sorted(ROLES)}")
    for parts in layers.values():
        for role, (key, t) in parts.items():
            _check_values(source, key, t, role)
    terms: dict[str, list[Term]] = {}
    for layer, parts in layers.items():
        keys = [k for k, _ in parts.values()]
        if ("up" in parts) != ("down" in parts):
            raise CheckpointError(f"LoRA {source}: layer {layer}: {keys} hold only one of the up / down matrices")
        weight = layer if layer in known else f"{layer}.weight"
        if "up" in parts:
            (up_key, up), (down_key, down) = parts["up"], parts["down"]
            if up.dim() < 2 or down.dim() < 2 or math.prod(up.shape[1:]) != down.shape[0]:
                raise CheckpointError(f"LoRA {source}: layer {layer}: up {tuple(up.shape)} @ down "
                                      f"{tuple(down.shape)} is not a rank-r product ([N, r] @ [r, K])")
            r = down.shape[0]
            if r < 1:
                raise CheckpointError(f"LoRA {source}: {down_key} has rank 0 (shape {list(down.shape)}); a LoRA "
                                      "needs rank >= 1")
            if "alpha" in parts:
                alpha, rs = float(parts["alpha"][1].double().reshape(-1)[0]), False
            else:
                alpha, rs = _metadata_alpha(meta, layer, r, source) or (float(r), False)
            factor = alpha / (math.sqrt(r) if rs else r)
            terms.setdefault(weight, []).append(Term(up, down, None, factor, up_key))
            if "up_bias" in parts:
                key, bias = parts["up_bias"]
                terms.setdefault(f"{layer}.bias", []).append(Term(None, None, bias, factor, key))
        elif "alpha" in parts or "up_bias" in parts:
            raise CheckpointError(f"LoRA {source}: layer {layer}: {keys} without its lora_down / lora_up pair")
        if "diff" in parts:
            terms.setdefault(weight, []).append(Term(None, None, parts["diff"][1], 1.0, parts["diff"][0]))
        if "diff_b" in parts:
            terms.setdefault(f"{layer}.bias", []).append(Term(None, None, parts["diff_b"][1], 1.0,
                                                              parts["diff_b"][0]))
    missing = sorted(k for k in terms if k not in known)
    if missing:
        raise CheckpointError(f"LoRA {source}: deltas for parameters this model does not have: {missing[:12]}")
    return terms


# ---------------------------------------------------------------------------------------------
# Where each diffusers parameter lives in our model

def targets(model) -> dict[str, Target]:
    """diffusers parameter key -> Target, from the layouts' key maps and fused groups (VACE blocks included)."""
    cfg = model.config
    out = {}
    for d, n in {**native_direct(cfg), **vace_direct(cfg)}.items():
        module, _, attr = n.rpartition(".")
        shape = _shape(model, module, attr)
        out[d] = Target(module, attr, 0, shape[0] if shape else 1, shape)
    for prefix, n, sets in block_stacks(cfg):
        groups = [(f"{prefix}.{i}.attn1.to_qkv", [f"{prefix}.{i}.attn1.to_{x}" for x in "qkv"]) for i in range(n)]
        groups += [(name, [f"{prefix}.{i}.{m}" for i in range(n) for m in (km, vm)]) for name, km, vm, _ in sets]
        for native, members in groups:
            for attr in ("weight", "bias"):
                shape = _shape(model, native, attr)
                rows = shape[0] // len(members)
                for j, m in enumerate(members):
                    out[f"{m}.{attr}"] = Target(native, attr, j * rows, rows, (rows, *shape[1:]))
        for name, _, _, nm in sets:
            C = getattr(model, name).norm_k.shape[1]
            for i in range(n):
                out[f"{prefix}.{i}.{nm}.weight"] = Target(name, "norm_k", i, 1, (C,))
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
    if quant.method_of_module(m) is None or not hasattr(m, "dense_weight"):
        raise CheckpointError(f"LoRA on {t.module}: its weight is {w.dtype} in a {type(m).__name__}, which has no "
                              "dense_weight / set_dense_weight to dequantize and requantize it")
    return m


def _requantize(m, w: torch.Tensor) -> None:
    """Quantize the dense [N, K] fp32 `w` into module `m` with fresh scales from its amax: the re-quantize hook
    of its method (wan_model.quant), i.e. the method's one quantizer."""
    quant.method_of_module(m).requantize(m, w)


def _buffers(m) -> dict[str, torch.Tensor]:
    """The tensors of a quantized module that requantization rewrites (all but bias and norm_k)."""
    return {n: t for n, t in [*m.named_buffers(recurse=False), *m.named_parameters(recurse=False)]
            if t is not None and n not in ("bias", "norm_k")}


# ---------------------------------------------------------------------------------------------
# Fusing

def _ranges(adapters, where) -> dict[tuple[str, str, int, int], list[tuple[str, Target, "Adapter", list[Term]]]]:
    """(module, attr, row, rows) -> [(diffusers key, target, adapter, terms)] of every delta of `adapters`."""
    out: dict = {}
    for a in adapters:
        for key, terms in a.terms.items():
            t = where[key]
            out.setdefault((t.module, t.attr, t.row, t.rows), []).append((key, t, a, terms))
    return out


def _add(acc: torch.Tensor, items, offset: int, sign: int = 1, dtype: torch.dtype | None = None) -> torch.Tensor:
    """acc[rows of each item - offset] += sign * scale * delta (fp32, in place; returns acc). With `dtype`:
    CheckpointError naming the adapter, its file and key when a scaled delta is not finite in `dtype` (the
    dtype of the weight it is fused into)."""
    for key, t, a, terms in items:
        for term in terms:
            d = term.delta(t.shape, acc.device) * a.scale
            bad = dtype is not None and _nonfinite(d, dtype)
            if bad:
                raise CheckpointError(f"LoRA {a.source} (adapter {a.name!r}): {term.key or key}: scale {a.scale:g} "
                                      f"x alpha/rank {term.factor:g} x delta of {key} is {bad}")
            view = _rows_of(acc, t.row - offset, t.rows)
            view += sign * d.reshape(view.shape) if sign != 1 else d.reshape(view.shape)
    return acc


def _fused(base: torch.Tensor, items, row: int, cur: torch.Tensor, check: bool = False) -> torch.Tensor:
    """round(base + deltas) as written into the range `cur` (rounded to base's dtype, then cast to cur's: a
    model cast after the fuse holds the same values)."""
    acc = _add(base.to(cur.device, torch.float32, copy=True), items, row, dtype=cur.dtype if check else None)
    return acc.to(base.dtype).to(cur.dtype)


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t


def _requantized(m, orig: dict[str, torch.Tensor], items, check: str | None = None):
    """A copy of quantized module `m` holding requantize(dequantize(orig) + deltas) (`orig` without deltas);
    with `check` (a name for messages): CheckpointError when a delta or the fused dense weight is not finite."""
    tmp = copy.deepcopy(m)
    for n, b in orig.items():
        getattr(tmp, n).copy_(b)
    if items:
        w = _add(tmp.dense_weight(torch.float32), items, 0, dtype=torch.float32 if check else None)   # [N, K]
        _check_fused(check, w, torch.float32, items)
        _requantize(tmp, w)
        _check_fused(check, tmp.dense_weight(torch.float32), torch.float32, items)
    return tmp


def _check_fused(what: str | None, w: torch.Tensor, dtype: torch.dtype, items) -> None:
    bad = what and _nonfinite(w, dtype)
    if bad:
        by = ", ".join(dict.fromkeys(f"{a.source} (adapter {a.name!r}, scale {a.scale:g})" for _, _, a, _ in items))
        raise CheckpointError(f"LoRA: the fused {what} would hold {bad}; fused from {by}")


@torch.no_grad()
def apply(model, state: LoraState, adapters: list[Adapter]) -> None:
    """Make `adapters` the fused set (the module docstring's rules): every range / quantized module that any of
    them touches or `state.adapters` touched becomes round(original + their deltas). Everything is checked
    before any weight changes (a refusal leaves the model as it was): each scaled delta and each fused weight
    must be finite in the dtype the model holds the weight in.

    A range whose current value is not what the last fuse wrote (the model was trained or edited since) is
    rebased first: its original becomes current - the fused adapters' deltas, so unloading subtracts them
    from the current weights and keeps the update, in every row of a fused tensor alike (diffusers'
    unfuse_lora subtracts the same way). Refusing instead would leave no way to take an adapter out of a
    fine-tuned model; restoring the saved original would silently drop the update in the adapter's rows
    only. A range the user did not change still comes back bit for bit."""
    where = targets(model)
    _check_unchanged(model, state)
    old, new = _ranges(state.adapters, where), _ranges(adapters, where)
    quantized: dict[str, tuple[list, list]] = {p: ([], []) for p in state.quantized}
    dense: list = []
    for rng in dict.fromkeys([*state.dense, *old, *new]):
        if rng not in state.dense and _quantized(model, Target(*rng, ())) is not None:
            q = quantized.setdefault(rng[0], ([], []))
            q[0].extend(old.get(rng, []))
            q[1].extend(new.get(rng, []))
        else:
            dense.append(rng)
    # check (nothing written): the original each range / module is fused from, rebased when changed
    bases: dict[tuple, torch.Tensor] = {}
    for rng in dense:
        module, attr, row, rows = rng
        cur = _rows_of(_tensor(model, module, attr), row, rows)
        base, name = state.dense.get(rng), f"{module}.{attr}" + (f" rows [{row}, {row + rows})" if cur.dim() else "")
        rebased = False
        if base is None:
            base = cur.detach().to("cpu", copy=True)
        elif not torch.equal(_raw(_fused(base, old.get(rng, []), row, cur)), _raw(cur)):
            base = _add(cur.to(torch.float32, copy=True), old.get(rng, []), row, sign=-1).cpu()
            _check_fused(f"{name} less the loaded adapters' deltas", base, cur.dtype, old.get(rng, []))
            rebased = True
        if new.get(rng):
            _check_fused(f"{name} ({cur.dtype})", _fused(base, new[rng], row, cur, check=True), cur.dtype, new[rng])
        if new.get(rng) or rebased or rng in state.dense:
            bases[rng] = base
    originals: dict[str, dict[str, torch.Tensor]] = {}
    for path, (olds, news) in quantized.items():
        m = model.get_submodule(path)
        orig = state.quantized[path][1] if path in state.quantized else \
            {n: b.detach().to("cpu", copy=True) for n, b in _buffers(m).items()}
        if path in state.quantized:
            expected = _buffers(_requantized(m, orig, olds))
            if not all(torch.equal(_raw(b), _raw(getattr(m, n))) for n, b in expected.items()):
                w = _add(m.dense_weight(torch.float32), olds, 0, sign=-1)
                _check_fused(f"{path}.weight less the loaded adapters' deltas", w, torch.float32, olds)
                tmp = copy.deepcopy(m)
                _requantize(tmp, w)
                orig = {n: b.detach().to("cpu", copy=True) for n, b in _buffers(tmp).items()}
        if news:
            _requantized(m, orig, news, check=f"{path}.weight (dequantized, fp32)")
        originals[path] = orig
    # write
    for rng, base in bases.items():
        module, attr, row, rows = rng
        region = _rows_of(_tensor(model, module, attr), row, rows)
        region.copy_(_fused(base, new[rng], row, region) if new.get(rng) else base)
    for path, orig in originals.items():
        m = model.get_submodule(path)
        for n, b in orig.items():
            getattr(m, n).copy_(b)
        news = quantized[path][1]
        if news:
            _requantize(m, _add(m.dense_weight(torch.float32), news, 0))
        state.quantized[path] = (m, orig)
    # ranges / modules no adapter touches any more are their originals again: their copies go
    state.dense = {k: v for k, v in bases.items() if new.get(k)}
    state.quantized = {k: v for k, v in state.quantized.items() if quantized[k][1]}
    state.adapters = list(adapters)


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
    """`WanModel.load_lora`: parse, check, fuse; returns the adapter's name. Refusals (CheckpointError /
    ValueError naming the file, the key and the bad value) leave the model unchanged."""
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"load_lora: scale must be a number, got {scale!r}") from None
    if not math.isfinite(scale) or not math.isfinite(torch.tensor(scale, dtype=torch.float32).item()):
        raise ValueError(f"load_lora: scale must be finite in float32 (the dtype deltas are computed in), got "
                         f"{scale!r}")
    sd, meta, stem, source = read(lora)
    terms = parse(sd, model.config, meta, source)
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
                raise CheckpointError(f"LoRA {source}: delta for {key}: the model's parameter is {list(shape)}, "
                                      f"the LoRA gives {got}")
    state = getattr(model, "_lora", None) or LoraState()
    names = [a.name for a in state.adapters]
    name = adapter_name or (stem if stem and stem not in names else f"default_{len(names)}")
    if name in names:
        raise ValueError(f"load_lora: an adapter named {name!r} is loaded already (loaded: {names})")
    apply(model, state, [*state.adapters, Adapter(name, scale, terms, source)])
    model._lora = state
    return name


def unload(model, adapter_name: str | None = None) -> None:
    """`WanModel.unload_lora`: remove one adapter (or all). Ranges the adapters alone touched get their
    originals back bit for bit; ranges changed since the fuse (training) keep the change: the removed deltas
    are subtracted from the current weights (see `apply`)."""
    state = getattr(model, "_lora", None)
    if state is None:
        if adapter_name is not None:
            raise ValueError(f"unload_lora: no adapter {adapter_name!r} is loaded (none is)")
        return
    names = [a.name for a in state.adapters]
    if adapter_name is not None and adapter_name not in names:
        raise ValueError(f"unload_lora: no adapter {adapter_name!r} is loaded (loaded: {names})")
    apply(model, state, [a for a in state.adapters if adapter_name is not None and a.name != adapter_name])
    if not state.adapters:
        model._lora = None


def adapters(model) -> list[tuple[str, float]]:
    """(name, scale) of the adapters fused into `model`, in load order."""
    state = getattr(model, "_lora", None)
    return [] if state is None else [(a.name, a.scale) for a in state.adapters]
