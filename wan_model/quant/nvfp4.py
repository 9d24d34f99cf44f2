"""NVFP4 weights (wan_kernels/nvfp4.py): E2M1 codes with an e4m3 scale per 16 elements and an fp32 global scale.

A quantized layer becomes a `wan_kernels.linear.NVFP4Linear` (W4A4 on sm100 with CUTLASS, else W4A16); the
stacked cross-attention K/V of all layers an `NVFP4StackedKV`. Our layout (= the checkpoint keys of a layer):
`weight` uint8 [N, K/2] (element 2i in the low nibble), `weight_scale` float8_e4m3fn 128x4-swizzled
[roundup(N,128), roundup(K/16,4)], `weight_scale_2` fp32 [] in the DECODE convention (amax / (6 * 448)). A fused
group (one GEMM) shares one global scale: the max over its members. The file layouts of other tools are
wan_model.compat.layouts.NVFP4_LAYOUTS.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import torch
from torch import nn

from wan_kernels import nvfp4 as fmt
from wan_kernels import ops
from wan_kernels.linear import NVFP4Linear, default_mode
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


METHOD = register(NVFP4())
