"""FP8 weights (wan_kernels/fp8.py): float8_e4m3fn (or e5m2) with an fp32 decode scale per tensor or per row.

A quantized layer becomes a `wan_kernels.linear.FP8Linear` (W8A8 on sm_89+, W8A16 elsewhere); the stacked
cross-attention K/V of all layers an `FP8StackedKV`. Our layout (ComfyUI's key names): `weight` fp8 [N, K],
`weight_scale` fp32 [] (per tensor) or [N, 1] (per output row), DECODE convention (w = weight * weight_scale),
optional `input_scale` fp32 [] (a static activation scale). Per tensor, a fused group (one GEMM) shares one scale:
the max over its members of amax / 448. The file flavours (ComfyUI `scaled_fp8`, `comfy_quant`) are below.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import torch
from torch import nn

from wan_kernels import fp8
from wan_kernels.linear import FP8Linear
from wan_model.compat.common import MARKER_KEY, CheckpointError, marker_tensor
from wan_model.core.model import StackedKV, split_kv
from wan_model.quant.method import QuantConfig, Method, register


@dataclasses.dataclass(frozen=True)
class FP8Config(QuantConfig):
    """Which Linear layers become FP8 (`FP8Linear`) and how; the keep rules and fused groups of NVFP4Config.

    keep, layers: as NVFP4Config.
    per_channel: one scale per output row ([N, 1]) instead of one per tensor ([]). Per tensor, a fused group
                 (to_qkv, cross_kv, cross_kv_img) is ONE fp8 tensor with ONE scale: max over its members of
                 amax / 448. Per channel needs no sharing (rows are independent).
    dtype:       "float8_e4m3fn" (default) or "float8_e5m2".
    impl:        backend of fp8_linear; None = the model's impl ("cpu" maps to "auto").
    """

    per_channel: bool = False
    dtype: str = "float8_e4m3fn"
    impl: str | None = None

    def __post_init__(self):
        fp8.dtype_of(self.dtype)

    def to_json(self) -> dict:
        """The `quantization_config` written to config.json."""
        return {
            "quant_method": "fp8", "producer": "wan-kernels", "fmt": self.dtype,
            "weight_scale": "float32 DECODE scale: w = weight * weight_scale, " + (
                "[N, 1] per output row" if self.per_channel else "[] per tensor (fused groups share it)"),
            "per_channel": self.per_channel, "keep": list(self.keep) if self.layers is None else None,
        }


class FP8StackedKV(FP8Linear):
    """`StackedKV` with an FP8 weight: one fp8_linear [L*2C, C_in] for the K/V of all layers. Buffers as
    FP8Linear (one scale for all layers, or one per row) plus the parameter norm_k [L, C]."""

    def __init__(self, num_layers: int, dim: int, in_dim: int, **kw):
        super().__init__(in_dim, num_layers * 2 * dim, bias=True, **kw)
        self.norm_k = nn.Parameter(torch.ones(num_layers, dim, device=self.weight.device))

    @classmethod
    def from_stacked(cls, kv: StackedKV, *, per_channel: bool = False, fp8_dtype="float8_e4m3fn",
                     impl: str = "auto") -> "FP8StackedKV":
        dtype = fp8.NAMES[fp8.dtype_of(fp8_dtype)]
        return METHOD.quantized_from(kv, FP8Config(per_channel=per_channel, dtype=dtype), impl)

    def forward(self, ctx: torch.Tensor, num_heads: int, eps: float):
        """ctx [B, Lc, C_in] -> lists over layers of k, v: [B, Lc, H, D] (one fp8_linear)."""
        return split_kv(super().forward(ctx), self.norm_k, num_heads, eps)


class FP8(Method):
    name = "fp8"
    config = FP8Config
    modules = (FP8Linear,)  # FP8StackedKV is one
    suffixes = ("weight", "weight_scale")

    def quantize_weight(self, w, config, scale=None):
        dt = fp8.dtype_of(config.dtype)
        s = fp8.scale_of(w, config.per_channel, dt) if scale is None else scale.float()
        return {"weight": fp8.quantize(w, s.to(w.device), dt), "weight_scale": s}

    def shares_scale(self, config):
        return not config.per_channel

    def group_scale(self, config, weights: Iterable[torch.Tensor]):
        # scale_of the members' amaxes = scale_of the fused weight (amax / max), bit for bit
        amax = torch.stack([w.abs().float().amax() for w in weights])
        return fp8.scale_of(amax[None], False, fp8.dtype_of(config.dtype))

    def stored(self, config, shape):
        return {"weight": (fp8.dtype_of(config.dtype), shape),
                "weight_scale": (torch.float32, (shape[0], 1) if config.per_channel else ())}

    def module(self, old, config, impl, device, dtype=None, per_channel=None, input_scale=False):
        kw = dict(per_channel=config.per_channel if per_channel is None else per_channel, fp8_dtype=config.dtype,
                  input_scale=input_scale, impl=impl, device=device, **({} if dtype is None else {"dtype": dtype}))
        if isinstance(old, StackedKV):
            L, C = old.norm_k.shape
            return FP8StackedKV(L, C, old.weight.shape[1], **kw)
        return FP8Linear(old.in_features, old.out_features, old.bias is not None, **kw)

    def dequantize(self, tensors, dtype=torch.float32):
        return fp8.dequantize(tensors["weight"], tensors["weight_scale"], dtype)

    def checkpoint_layers(self, sd):
        """An fp8 `.weight` with a `.weight_scale` and no `.weight_scale_2` (that is NVFP4)."""
        return tuple(sorted(k[: -len(".weight")] for k, v in sd.items() if k.endswith(".weight")
                            and v.dtype in fp8.DTYPES and k + "_scale" in sd and k + "_scale_2" not in sd))

    def stores(self, sd, layer):
        """A weight_scale without a weight_scale_2 (that is NVFP4)."""
        return f"{layer}.weight_scale" in sd and f"{layer}.weight_scale_2" not in sd

    def fuse_scales(self, sd, names, native):
        return {f"{native}.weight_scale": fused_scale(sd, names)}

    def unfuse_scales(self, sd, names, native, rows):
        """A per-tensor (0-dim) scale to each member; a per-row one sliced by rows."""
        t = sd[f"{native}.weight_scale"]
        parts = [t.clone() for _ in names] if t.dim() == 0 else t.split(rows)
        return {f"{n}.weight_scale": part for n, part in zip(names, parts)}

    def checkpoint_config(self, groups, layers, native):
        """Per-row where the checkpoint's scale is [N, 1], with the fp8 dtype stored (from the native tensors:
        the layers that could not stay FP8 are dequantized by then)."""
        if not native:
            return None
        natives = sorted(n for n in groups if native.get(n + ".weight", torch.empty(0)).dtype in fp8.DTYPES)
        if not natives:
            return None
        per_row = {n for n in natives if native[n + ".weight_scale"].dim() == 2}
        config = FP8Config(layers=tuple(sorted(m for n in natives for m in groups[n])),
                           per_channel=per_row == set(natives), dtype=fp8.NAMES[native[natives[0] + ".weight"].dtype])
        return config, {n: {"per_channel": n in per_row, "input_scale": False} for n in natives}

    def checkpoint_keys(self, layers):
        return {f"{layer}.weight_scale": None for layer in layers}

    def dense_on_load(self, layers, groups, keep):
        """All of them for a cast conversion; on load those outside the quantizable Linears (the time embedder,
        which diffusers keeps in fp32; a Conv3d) and the members of a fused group (to_qkv, cross_kv) that is not
        FP8 as a whole (ComfyUI files quantize per layer; our modules hold one fp8 tensor per group)."""
        if not keep:
            return set(layers)
        return set(layers) - {m for _, members in groups if set(members) <= layers for m in members}

    def conversion_config(self, layers):
        """None: FP8 layers are recognized from their tensors, and a conversion keeps each file's own flavour of
        them (a saved model declares its FP8Config)."""
        return None

    def check_checkpoint(self, sd, layers, source, dense):
        """An FP8 layer is an fp8 [N, K] weight with an fp32 weight_scale [] or [N, 1]; no fp8 tensor without it."""
        for layer in layers:
            w, s = sd[layer + ".weight"], sd[layer + ".weight_scale"]
            key = source.get(layer + ".weight_scale", layer + ".weight_scale")
            if w.dim() != 2 or s.dtype != torch.float32 or tuple(s.shape) not in ((), (w.shape[0], 1)):
                raise CheckpointError(f"{key}: the scale of FP8 weight {source.get(layer + '.weight', layer + '.weight')} "
                                      f"{tuple(w.shape)} must be float32 [] or [{w.shape[0] if w.dim() else 'N'}, 1], "
                                      f"got shape {tuple(s.shape)} dtype {s.dtype}")
        scaled = {f"{layer}.weight" for layer in layers}
        unscaled = [source.get(k, k) for k in sorted(dense) if sd[k].dtype in fp8.DTYPES and k not in scaled]
        if unscaled:
            raise CheckpointError(f"fp8 tensors without their scale (an FP8 layer is <layer>.weight + "
                                  f"<layer>.weight_scale): {unscaled[:8]}")

    def config_of(self, module):
        return FP8Config(per_channel=module.per_channel, dtype=fp8.NAMES[module.weight.dtype])


METHOD = register(FP8())


def fused_scale(sd, names: list[str]) -> torch.Tensor:
    """The scale of one native module fusing FP8 layers `names` (row order): their per-tensor scale when all
    are per tensor and equal (what quantize("fp8") makes), else a per-row [N, 1] scale holding each member's
    scale on its rows: exact, the fp8 bytes are kept (e.g. a ComfyUI file's own scale for each of q, k, v)."""
    scales = [sd[f"{n}.weight_scale"] for n in names]
    if all(s.device.type == "meta" for s in scales):  # shapes only (check_state_dict): per row in general
        return torch.empty(sum(sd[f"{n}.weight"].shape[0] for n in names), 1, device="meta")
    if all(s.numel() == 1 for s in scales) and all(torch.equal(s.reshape(()), scales[0].reshape(())) for s in scales):
        return scales[0].float().reshape(())
    return torch.cat([s.float().reshape(-1, 1).expand(sd[f"{n}.weight"].shape[0], 1) for n, s in zip(names, scales)])


# ---------------------------------------------------------------------------------------------
# FP8 layers (wan_kernels/fp8.py)
#
# In memory (ours, diffusers names): `<layer>.weight` float8_e4m3fn/e5m2 [N, K], `<layer>.weight_scale` fp32
# DECODE scale (w = weight * scale) [] per tensor or [N, 1] per output row, no `weight_scale_2` (that is NVFP4).
# ComfyUI files (checked against ComfyUI's comfy/ops.py `mixed_precision_ops` and comfy/utils.py
# `convert_old_quants`): the same direction, one scale per tensor, in one of two flavours:
#   "comfy_quant"  `<layer>.comfy_quant` uint8 JSON {"format": "float8_e4m3fn"|"float8_e5m2"} + `<layer>.weight_scale`
#                  (+ optional `<layer>.input_scale`): what ComfyUI reads natively today.
#   "scaled_fp8"   the legacy files: a `scaled_fp8` sentinel tensor whose dtype names the fp8 format (an fp32
#                  sentinel means e4m3; 2 elements asks for full-precision matmuls) + `<layer>.scale_weight`
#                  (+ `<layer>.scale_input`, 1.0 meaning none); ComfyUI converts them to the first on load.
FP8_FLAVOURS = ("comfy_quant", "scaled_fp8")
SCALED_FP8_KEY = "scaled_fp8"
FP8_SCALE_KEYS = {"comfy_quant": ("weight_scale", "input_scale"), "scaled_fp8": ("scale_weight", "scale_input")}


def fp8_file_plan(flavour: str, dtype: torch.dtype, shape: tuple[int, ...], input_scale: bool, sentinel: bool):
    """[(key suffix, dtype, shape)] of an FP8 layer in a ComfyUI `flavour` (above);
    `sentinel`: the first FP8 layer of a "scaled_fp8" file also carries the file's `scaled_fp8` sentinel."""
    scale_key, input_key = FP8_SCALE_KEYS[flavour]
    plan = [("weight", dtype, shape), (scale_key, torch.float32, ())]
    if input_scale:
        plan.append((input_key, torch.float32, ()))
    if flavour == "comfy_quant":
        plan.append((MARKER_KEY, torch.uint8, tuple(marker_tensor({"format": fp8.NAMES[dtype]}).shape)))
    elif sentinel:
        plan.append((SCALED_FP8_KEY, dtype, (0,)))
    return plan


def fp8_to_file(flavour: str, layer: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """Our FP8 tensors of layer `name` ({weight, weight_scale[, input_scale]}) -> the ComfyUI `flavour`'s
    {suffix: tensor}. ComfyUI's fp8 layout (comfy-kitchen TensorCoreFP8Layout) holds ONE scale per tensor: a
    per-row scale is written only when its rows are equal (a fused group's member), else refused."""
    w, s = layer["weight"], layer["weight_scale"].float()
    if s.numel() != 1 and not torch.all(s == s.reshape(-1)[0]):
        raise ValueError(f"{name}: ComfyUI's fp8 layers hold one scale per tensor (comfy-kitchen's "
                         f"TensorCoreFP8Layout), this layer has per-row scales {tuple(s.shape)}: quantize with "
                         "FP8Config(per_channel=False), or save it in format 'diffusers' or 'original'")
    scale_key, input_key = FP8_SCALE_KEYS[flavour]
    out = {"weight": w, scale_key: s.reshape(-1)[0].reshape(())}
    if "input_scale" in layer:
        out[input_key] = layer["input_scale"].float().reshape(())
    out[MARKER_KEY] = marker_tensor({"format": fp8.NAMES[w.dtype]})
    out[SCALED_FP8_KEY] = torch.empty(0, dtype=w.dtype)
    return out
