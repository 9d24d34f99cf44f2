"""Small deterministic inputs for every public `wan` op: the self-check of `python -m wan_kernels`, the GPU
check (`python -m wan_kernels.gpu_check`) and the library tests build their calls from here.

`op_inputs(dtype)` gives, per op, the positional arguments of one call: activations in `dtype`; the operands
that are fp32 by contract (RoPE tables, adaLN scale/shift/gate, NVFP4 global scales) stay fp32; NVFP4 packed
weights and scales are quantized by the reference. For `nvfp4_dequantize`/`nvfp4_gemm`, `dtype` is the output
dtype.
"""

from __future__ import annotations

import torch

from wan_kernels import nvfp4, ref


def op_inputs(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
              seed: int = 0) -> dict[str, tuple]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape, dt=dtype):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dt)

    B, S, H, D = 2, 17, 2, 64
    C = H * D
    ang = torch.rand(S, D // 2, generator=g).to(device) * 6.0
    common = (r(C) + 1, r(C) + 1, ang.cos(), ang.sin(), H, 1e-6)
    x = r(37, 64, dt=torch.float32)
    gx = nvfp4.global_scale(x)
    xp, xs = ref.nvfp4_quantize(x, gx)
    w = r(24, 64, dt=torch.float32)
    gw = nvfp4.global_scale(w)
    wp, ws = ref.nvfp4_quantize(w, gw)
    return {
        "qk_norm_rope": (r(B, S, 3 * C),) + common,
        "qkv_rope": (r(B, S, C), (r(3 * C, C) * 0.1).to(dtype), r(3 * C), *common),
        "attention": (r(B, S, H, D), r(B, 7, H, D), r(B, 7, H, D), r(B, 5, H, D), r(B, 5, H, D), None),
        "nvfp4_quantize": (x.to(dtype), nvfp4.global_scale(x.to(dtype))),
        "nvfp4_dequantize": (xp, xs, gx, dtype),
        "nvfp4_gemm": (xp, xs, gx, wp, ws, gw, r(24, dt=torch.float32), dtype),
        "nvfp4_linear": (r(2, 5, 64), wp, ws, gw, r(24)),
        "layer_norm_modulate": (r(2, S, C), r(2, 1, C, dt=torch.float32), r(2, S, C, dt=torch.float32), 1e-6),
        "gated_residual": (r(2, S, C), r(2, S, C), r(2, 1, C, dt=torch.float32)),
    }
