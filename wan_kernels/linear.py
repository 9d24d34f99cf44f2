"""`NVFP4Linear` / `FP8Linear`: drop-ins for `nn.Linear` whose weight is stored in NVFP4 (3.5x smaller than bf16)
or FP8 (2x; see `FP8Linear`).

Buffers (= checkpoint keys, the ModelOpt/vLLM naming): `weight` uint8 [N, K/2] packed E2M1, `weight_scale`
float8_e4m3fn [roundup(N,128), roundup(K/16,4)] swizzled block scales, `weight_scale_2` fp32 scalar global
scale in the DECODE convention (amax / (6*448)), `bias` (kept in the activation dtype) or None.

The compute mode is decided once, at construction (`mode="auto"`): "w4a4" where the route table sends
`nvfp4_gemm` to the CUTLASS kernel (sm_100; activations quantized to NVFP4 on the fly, FP4 tensor cores, and
the dispatcher runs that same route), "w4a16" everywhere else (Triton decodes weight tiles in the GEMM main
loop on Ampere/Hopper/sm_103/sm_120; the reference on CPU).

Training: the NVFP4 weight is a frozen base; "w4a16" is differentiable in the input (dX = dY @ dequant(W)),
"w4a4" raises at forward time when the input requires grad (it rounds activations to FP4).
"""

from __future__ import annotations

import torch
from torch import nn

from wan_kernels import fp8, ops, routing
from wan_kernels import nvfp4 as fmt

MODES = ("auto", "w4a16", "w4a4")


def default_mode(device: torch.device | str) -> str:
    """"w4a4" where impl="auto" runs nvfp4_gemm on the CUTLASS kernel, else "w4a16"."""
    device = torch.device(device)
    if device.type == "cuda" and routing.auto_backend("nvfp4_gemm", torch.cuda.get_device_capability(device)) == "cuda":
        return "w4a4"
    return "w4a16"


class NVFP4Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, mode: str = "auto",
                 impl: str = "auto", device: torch.device | str | None = None, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if in_features % fmt.BLOCK:
            raise ValueError(f"NVFP4Linear: in_features must be a multiple of 16, got {in_features}")
        if mode not in MODES:
            raise ValueError(f"NVFP4Linear: mode must be one of {MODES}, got {mode!r}")
        device = torch.device(device or "cpu")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.zeros(fmt.scale_shape(out_features, in_features),
                                                         dtype=torch.float8_e4m3fn, device=device))
        self.register_buffer("weight_scale_2", torch.zeros((), dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.impl = impl
        self.requested_mode = mode
        self._bind(device)

    def _bind(self, device: torch.device) -> None:
        """Decide the compute mode for `device` (once per construction / device move, never per call)."""
        self.mode = default_mode(device) if self.requested_mode == "auto" else self.requested_mode
        self._linear = ops.nvfp4_linear_w4a4 if self.mode == "w4a4" else ops.nvfp4_linear

    def _apply(self, fn, recurse=True):
        # `.to(dtype)` / `.half()` cast every floating buffer, float8 included: the NVFP4 scales keep their
        # format (the e4m3 block scales and the fp32 global scale) and only follow the device.
        scales = {name: getattr(self, name) for name in ("weight_scale", "weight_scale_2")}
        out = super()._apply(fn, recurse)
        for name, before in scales.items():
            after = getattr(self, name)
            if after.dtype != before.dtype:
                setattr(self, name, before.to(after.device))
        self._bind(self.weight.device)  # .to("cuda") of a CPU-quantized layer picks the GPU's mode
        return out

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, mode: str = "auto", impl: str = "auto") -> "NVFP4Linear":
        """Quantize an nn.Linear's weight (global scale from its amax)."""
        w = linear.weight.detach()
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, mode=mode, impl=impl,
                device=w.device, dtype=w.dtype)
        q.load_weight(w)
        if linear.bias is not None:
            q.bias.copy_(linear.bias.detach())
        return q

    @torch.no_grad()
    def load_weight(self, weight: torch.Tensor) -> None:
        gs = fmt.global_scale(weight)
        # every quantizer backend is bit-identical: the device's default one is as good as any
        packed, scale = ops.nvfp4_quantize(weight.float().contiguous(), gs.to(weight.device))
        self.weight.copy_(packed)
        self.weight_scale.copy_(scale)
        self.weight_scale_2.copy_(gs)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return ops.nvfp4_dequantize(self.weight, self.weight_scale, self.weight_scale_2, dtype, impl="ref")

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized weight [N, K] in `dtype` (what a LoRA is fused into before re-quantizing)."""
        return self.dequantized_weight(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, self.weight, self.weight_scale, self.weight_scale_2, self.bias, impl=self.impl)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"mode={self.mode}, impl={self.impl}")


class FP8Linear(nn.Module):
    """A drop-in for `nn.Linear` with an FP8 weight (wan_kernels/fp8.py), running `wan::fp8_linear`: W8A8 on
    `torch._scaled_mm` on sm_89+ for the calls it takes, W8A16 elsewhere (the route table decides per call).

    Buffers (= checkpoint keys, ComfyUI's names): `weight` float8_e4m3fn (or e5m2) [N, K], `weight_scale` fp32
    decode scale [] (per tensor) or [N, 1] (per output row), `input_scale` fp32 [] static activation scale
    (only with input_scale=True), `bias` in the activation dtype or None. Training: the weight is a frozen base,
    the layer is differentiable in its input.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, per_channel: bool = False,
                 fp8_dtype: torch.dtype | str = torch.float8_e4m3fn, input_scale: bool = False, impl: str = "auto",
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        device = torch.device(device or "cpu")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=fp8.dtype_of(fp8_dtype),
                                                   device=device))
        self.register_buffer("weight_scale", torch.ones((out_features, 1) if per_channel else (),
                                                        dtype=torch.float32, device=device))
        self.register_buffer("input_scale", torch.ones((), dtype=torch.float32, device=device) if input_scale
                             else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.impl = impl

    @property
    def per_channel(self) -> bool:
        return self.weight_scale.dim() == 2

    def _apply(self, fn, recurse=True):
        # `.to(dtype)` / `.half()` cast every floating buffer, float8 included: the fp8 weight and the fp32
        # scales keep their dtype and only follow the device.
        kept = {name: getattr(self, name) for name in ("weight", "weight_scale", "input_scale")}
        out = super()._apply(fn, recurse)
        for name, before in kept.items():
            after = getattr(self, name)
            if before is not None and after.dtype != before.dtype:
                setattr(self, name, before.to(after.device))
        return out

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, per_channel: bool = False,
                    fp8_dtype: torch.dtype | str = torch.float8_e4m3fn, impl: str = "auto") -> "FP8Linear":
        """Quantize an nn.Linear's weight (scale from its amax, per tensor or per output row)."""
        w = linear.weight.detach()
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, per_channel=per_channel,
                fp8_dtype=fp8_dtype, impl=impl, device=w.device, dtype=w.dtype)
        q.set_dense_weight(w)
        if linear.bias is not None:
            q.bias.copy_(linear.bias.detach())
        return q

    @torch.no_grad()
    def set_dense_weight(self, weight: torch.Tensor, scale: torch.Tensor | None = None) -> None:
        """Quantize `weight` [N, K] into this layer with a fresh scale from its amax (same granularity and fp8
        dtype), or with `scale` ([] / [N, 1] fp32) when given (a fused group's shared scale)."""
        if tuple(weight.shape) != tuple(self.weight.shape):
            raise ValueError(f"FP8Linear.set_dense_weight: weight must be {list(self.weight.shape)}, got "
                             f"{list(weight.shape)}")
        s = fp8.scale_of(weight, self.per_channel, self.weight.dtype) if scale is None else scale.float()
        self.weight.copy_(fp8.quantize(weight, s.to(weight.device), self.weight.dtype))
        self.weight_scale.copy_(s.reshape(self.weight_scale.shape))

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized weight [N, K] in `dtype` (weight * weight_scale, fp32 math)."""
        return fp8.dequantize(self.weight, self.weight_scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.fp8_linear(x, self.weight, self.weight_scale, self.input_scale, self.bias, impl=self.impl)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{fp8.NAMES[self.weight.dtype]}, scale={'per_channel' if self.per_channel else 'per_tensor'}, "
                f"impl={self.impl}")
