"""NVFP4 weights (wan_kernels/nvfp4.py): E2M1 codes with an e4m3 scale per 16 elements and an fp32 global scale.

A quantized layer becomes a `wan_kernels.linear.NVFP4Linear` (W4A4 on sm100 with CUTLASS, else W4A16); the
stacked cross-attention K/V of all layers an `NVFP4StackedKV`. Our layout (= the checkpoint keys of a layer):
`weight` uint8 [N, K/2] (element 2i in the low nibble), `weight_scale` float8_e4m3fn 128x4-swizzled
[roundup(N,128), roundup(K/16,4)], `weight_scale_2` fp32 [] in the DECODE convention (amax / (6 * 448)). A fused
group (one GEMM) shares one global scale: the max over its members.

File layouts (`NVFP4Layout`, one row per layout in `NVFP4_LAYOUTS`: ours, ComfyUI, ModelOpt, LightX2V). A layout
differs from ours in four ways, each a field: the nibble of element 2i, the block-scale layout (swizzled or
linear [N, K/16]), the names and convention of the per-tensor scales (decode = amax / 2688; encode = 2688 / amax
= 1 / decode: `decode_to_encode`, `encode_to_decode`), and a per-layer marker (ComfyUI's `comfy_quant`). The
readers and writers (wan_model.io.formats) apply these fields through `nvfp4_file_plan`, `nvfp4_to_file` and
`nvfp4_from_file`, and nothing else.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import torch
from torch import nn

from wan_kernels import nvfp4 as fmt
from wan_kernels import ops
from wan_kernels.linear import NVFP4Linear, default_mode
from wan_model.compat.common import MARKER_KEY, CheckpointError, cat_rows, marker_tensor
from wan_model.core.model import StackedKV, split_kv
from wan_model.quant.method import QuantConfig, Method, register


@dataclasses.dataclass(frozen=True)
class NVFP4Config(QuantConfig):
    """Which Linear layers become NVFP4 and how they run.

    keep:   fnmatch patterns over diffusers layer names (e.g. "blocks.0.ffn.*") kept in the model dtype.
    layers: explicit diffusers layer names to quantize (overrides `keep`; what a loaded checkpoint uses).
    mode:   NVFP4Linear mode: "auto" (w4a4 on sm100 with CUTLASS, else w4a16), "w4a16" or "w4a4".
    impl:   backend of the NVFP4 ops; None = the model's impl ("cpu", which has no C++ nvfp4_linear,
            maps to "auto", the reference on CPU).
    """

    mode: str = "auto"
    impl: str | None = None

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
        return METHOD.quantized_from(kv, NVFP4Config(mode=mode), impl)

    def forward(self, ctx: torch.Tensor, num_heads: int, eps: float):
        """ctx [B, Lc, C_in] -> lists over layers of k, v: [B, Lc, H, D] (one NVFP4 GEMM)."""
        return split_kv(super().forward(ctx), self.norm_k, num_heads, eps)


DTYPES = {"weight": torch.uint8, "weight_scale": torch.float8_e4m3fn, "weight_scale_2": torch.float32}


class NVFP4(Method):
    name = "nvfp4"
    config = NVFP4Config
    modules = (NVFP4Linear,)  # NVFP4StackedKV is one
    suffixes = ("weight", "weight_scale", "weight_scale_2")

    def quantize_weight(self, w, config, scale=None):
        gs = fmt.global_scale(w) if scale is None else scale
        # every quantizer backend is bit-identical: the device's default one is as good as any
        packed, block = ops.nvfp4_quantize(w.float().contiguous(), gs.to(w.device))
        return {"weight": packed, "weight_scale": block, "weight_scale_2": gs.reshape(())}

    def shares_scale(self, config):
        return True

    def group_scale(self, config, weights: Iterable[torch.Tensor]):
        return torch.stack([fmt.global_scale(w) for w in weights]).amax()

    def stored(self, config, shape):
        n, k = shape
        return {"weight": (torch.uint8, (n, k // 2)), "weight_scale": (torch.float8_e4m3fn, fmt.scale_shape(n, k)),
                "weight_scale_2": (torch.float32, ())}

    def module(self, old, config, impl, device, dtype=None, **options):
        kw = dict(mode=config.mode, impl=impl, device=device, **({} if dtype is None else {"dtype": dtype}))
        if isinstance(old, StackedKV):
            L, C = old.norm_k.shape
            return NVFP4StackedKV(L, C, old.weight.shape[1], **kw)
        return NVFP4Linear(old.in_features, old.out_features, old.bias is not None, **kw)

    def check_groups(self, cfg, groups):
        if cfg.dim % 128 and any(len(m) > 1 for _, m in groups):
            raise ValueError(f"fused NVFP4 groups need dim % 128 == 0 (scale swizzle row tile), got dim {cfg.dim}")

    def for_device(self, config, device):
        return dataclasses.replace(config, mode=default_mode(device)) if config.mode == "auto" else config

    def dequantize(self, tensors, dtype=torch.float32):
        return ops.nvfp4_dequantize(tensors["weight"], tensors["weight_scale"], tensors["weight_scale_2"], dtype,
                                    impl="ref")

    def checkpoint_keys(self, layers):
        return {f"{layer}.{s}": dt for layer in layers for s, dt in DTYPES.items()}

    def checkpoint_layers(self, sd):
        """Those with a weight_scale_2 (keys are enough)."""
        return tuple(sorted(k[: -len(".weight_scale_2")] for k in sd if k.endswith(".weight_scale_2")))

    def stores(self, sd, layer):
        return f"{layer}.weight_scale_2" in sd

    def fuse_scales(self, sd, names, native):
        """The swizzled block scales concatenated by rows (each member's rows a multiple of 128) and the one
        global scale every member must share (`shared_scale`)."""
        return {f"{native}.weight_scale": cat_rows([sd[f"{n}.weight_scale"] for n in names]),
                f"{native}.weight_scale_2": shared_scale([sd[f"{n}.weight_scale_2"] for n in names], names)}

    def unfuse_scales(self, sd, names, native, rows):
        t = sd[f"{native}.weight_scale"]
        out = {f"{n}.weight_scale": part.view(t.dtype) for n, part in zip(names, t.view(torch.uint8).split(rows))}
        for n in names:
            out[f"{n}.weight_scale_2"] = sd[f"{native}.weight_scale_2"].clone()  # safetensors: no shared storage
        return out


METHOD = register(NVFP4())


def shared_scale(parts: list[torch.Tensor], names: list[str]) -> torch.Tensor:
    """The one global scale of a fused NVFP4 group: all members must carry the same weight_scale_2."""
    first = parts[0]
    if first.device.type != "meta" and any(not torch.equal(p, first) for p in parts[1:]):
        bad = [n for n, p in zip(names, parts) if not torch.equal(p, first)]
        raise CheckpointError(f"NVFP4 layers {names[0]} ... run as one GEMM with one global scale, but their "
                              f"weight_scale_2 differ ({bad[:4]} vs {names[0]}): re-quantizing them would be "
                              "lossy; quantize the dense checkpoint with `python -m wan_model convert --quantize "
                              "nvfp4` instead")
    return first


# ---------------------------------------------------------------------------------------------
# File layouts of NVFP4 layers (REFERENCE.md section 7)

@dataclasses.dataclass(frozen=True)
class NVFP4Layout:
    """How one file layout stores an NVFP4 layer (REFERENCE.md section 7).

    even_nibble:  "low" or "high": the nibble of a packed byte holding element 2i
    block_scale:  "swizzled" (128x4, padded to [roundup(N,128), roundup(K/16,4)]) or "linear" [N, K/16]
    global_key:   name of the weight's per-tensor scale; `convention` "decode" (amax / 2688) or "encode"
    input_key:    name of the activation's per-tensor scale (same convention; optional in a file)
    dropped:      keys derived from the others, read and ignored (LightX2V's alpha = 1/(in_gs * w_gs))
    marker:       the JSON of a `<layer>.comfy_quant` uint8 tensor per NVFP4 layer (ComfyUI), or None
    writable:     whether we write it
    """

    name: str
    even_nibble: str
    block_scale: str
    global_key: str = "weight_scale_2"
    convention: str = "decode"
    input_key: str = "input_scale"
    dropped: tuple[str, ...] = ()
    marker: dict | None = None
    writable: bool = True

    def keys(self) -> tuple[str, ...]:
        """Every per-layer key suffix of this layout (the marker included)."""
        return ("weight", "weight_scale", self.global_key, self.input_key, *self.dropped) + (
            (MARKER_KEY,) if self.marker else ())


NVFP4_LAYOUTS = {
    "ours": NVFP4Layout("ours", even_nibble="low", block_scale="swizzled"),
    "comfyui": NVFP4Layout("comfyui", even_nibble="high", block_scale="swizzled", marker={"format": "nvfp4"}),
    "modelopt": NVFP4Layout("modelopt", even_nibble="low", block_scale="linear"),
    "lightx2v": NVFP4Layout("lightx2v", even_nibble="low", block_scale="swizzled", global_key="weight_global_scale",
                            convention="encode", input_key="input_global_scale", dropped=("alpha",), writable=False),
}


def decode_to_encode(scale: torch.Tensor) -> torch.Tensor:
    """Per-tensor scale, decode convention (amax / 2688, value = e2m1 * block * scale) -> encode (2688 / amax,
    what vLLM / FlashInfer / LightX2V kernels take). fp32; a zero scale (all-zero tensor) maps to zero."""
    s = scale.float()
    return torch.where(s == 0, s, 1.0 / s)


def encode_to_decode(scale: torch.Tensor) -> torch.Tensor:
    """Inverse of `decode_to_encode`: encode (2688 / amax) -> decode (amax / 2688)."""
    s = scale.float()
    return torch.where(s == 0, s, 1.0 / s)


def swap_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 packed E2M1 with element 2i in one nibble -> in the other (its own inverse)."""
    return (packed << 4) | (packed >> 4)


def nvfp4_file_plan(layout: NVFP4Layout, n: int, k: int, input_scale: bool = False):
    """[(key suffix, dtype, shape)] of an [n, k] NVFP4 layer as `layout` stores it."""
    ks = k // fmt.BLOCK
    plan = [("weight", torch.uint8, (n, k // 2)),
            ("weight_scale", torch.float8_e4m3fn, fmt.scale_shape(n, k) if layout.block_scale == "swizzled" else (n, ks)),
            (layout.global_key, torch.float32, ())]
    if input_scale:
        plan.append((layout.input_key, torch.float32, ()))
    if layout.marker:
        plan.append((MARKER_KEY, torch.uint8, tuple(marker_tensor(layout.marker).shape)))
    return plan


def _scale(t: torch.Tensor, convention: str, to: str) -> torch.Tensor:
    if convention == to:
        return t.float().reshape(())
    return (decode_to_encode if to == "encode" else encode_to_decode)(t).reshape(())


def nvfp4_to_file(layout: NVFP4Layout, layer: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our NVFP4 tensors of one layer ({weight, weight_scale, weight_scale_2[, input_scale]}) -> `layout`'s
    {suffix: tensor}, in `nvfp4_file_plan` order."""
    w, s = layer["weight"], layer["weight_scale"]
    n, k = w.shape[0], w.shape[1] * 2
    out = {"weight": swap_nibbles(w) if layout.even_nibble == "high" else w,
           "weight_scale": (s if layout.block_scale == "swizzled" else
                            fmt.unswizzle_scales(s.view(torch.uint8), n, k // fmt.BLOCK).contiguous().view(s.dtype)),
           layout.global_key: _scale(layer["weight_scale_2"], "decode", layout.convention)}
    if "input_scale" in layer:
        out[layout.input_key] = _scale(layer["input_scale"], "decode", layout.convention)
    if layout.marker:
        out[MARKER_KEY] = marker_tensor(layout.marker)
    return out


def nvfp4_from_file(layout: NVFP4Layout, layer: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Inverse of `nvfp4_to_file`: `layout`'s tensors of one layer -> ours (shapes and dtypes checked,
    CheckpointError naming `where`, the layer). Meta tensors give meta results of our shapes."""
    missing = [s for s in ("weight", "weight_scale", layout.global_key) if s not in layer]
    if missing:
        raise CheckpointError(f"{where}: NVFP4 layer ({layout.name} layout) lacks {missing}")
    w, s, g = layer["weight"], layer["weight_scale"], layer[layout.global_key]
    if w.dtype != torch.uint8 or s.dtype != torch.float8_e4m3fn or not g.dtype.is_floating_point:
        # passed on as they are: the state-dict check names the key and the dtype it expected
        return {"weight": w, "weight_scale": s, "weight_scale_2": g,
                **({"input_scale": layer[layout.input_key]} if layout.input_key in layer else {})}
    if w.dim() != 2:
        raise CheckpointError(f"{where}.weight: an NVFP4 weight is uint8 [N, K/2], got shape {tuple(w.shape)}")
    n, k = w.shape[0], w.shape[1] * 2
    want = fmt.scale_shape(n, k) if layout.block_scale == "swizzled" else (n, k // fmt.BLOCK)
    if tuple(s.shape) != tuple(want):
        raise CheckpointError(f"{where}.weight_scale: the {layout.name} layout stores float8_e4m3fn {list(want)} "
                              f"({layout.block_scale}) for weight {tuple(w.shape)}, got {tuple(s.shape)}")
    if g.numel() != 1:
        raise CheckpointError(f"{where}.{layout.global_key}: a per-tensor scale, got shape {tuple(g.shape)}")
    meta = w.device.type == "meta"
    out = {"weight": swap_nibbles(w) if layout.even_nibble == "high" and not meta else w,
           "weight_scale": (s if layout.block_scale == "swizzled" else
                            torch.empty(fmt.scale_shape(n, k), dtype=s.dtype, device="meta") if meta else
                            fmt.swizzle_scales(s.view(torch.uint8)).view(torch.float8_e4m3fn)),
           "weight_scale_2": (torch.empty((), dtype=torch.float32, device="meta") if meta else
                              _scale(g, layout.convention, "decode"))}
    if layout.input_key in layer:
        i = layer[layout.input_key]
        if i.numel() != 1:
            raise CheckpointError(f"{where}.{layout.input_key}: a per-tensor scale, got shape {tuple(i.shape)}")
        out["input_scale"] = (torch.empty((), dtype=torch.float32, device="meta") if meta else
                              _scale(i, layout.convention, "decode"))
    return out
