"""Small deterministic inputs for every `wan` op, shared by the library-level tests."""

import torch

from wan_kernels import nvfp4, ref


def op_inputs(dtype=torch.float32, seed=0) -> dict[str, tuple]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape, dt=dtype):
        return torch.randn(*shape, generator=g).to(dt)

    B, S, H, D = 2, 17, 2, 64
    C = H * D
    ang = torch.rand(S, D // 2, generator=g) * 6.0
    common = (r(C) + 1, r(C) + 1, ang.cos(), ang.sin(), H, 1e-6)
    x = r(37, 64)
    gx = nvfp4.global_scale(x)
    xp, xs = ref.nvfp4_quantize(x, gx)
    w = r(24, 64)
    gw = nvfp4.global_scale(w)
    wp, ws = ref.nvfp4_quantize(w, gw)
    return {
        "qk_norm_rope": (r(B, S, 3 * C),) + common,
        "qkv_rope": (r(B, S, C), (r(3 * C, C) * 0.1).to(dtype), r(3 * C), *common),
        "attention": (r(B, S, H, D), r(B, 7, H, D), r(B, 7, H, D), r(B, 5, H, D), r(B, 5, H, D), None),
        "nvfp4_quantize": (x, gx),
        "nvfp4_dequantize": (xp, xs, gx, torch.float32),
        "nvfp4_gemm": (xp, xs, gx, wp, ws, gw, r(24, dt=torch.float32), torch.float32),
        "nvfp4_gemm_sm100": (xp, xs, gx, wp, ws, gw, None, torch.bfloat16),
        "nvfp4_linear": (r(2, 5, 64), wp, ws, gw, r(24)),
        "layer_norm_modulate": (r(2, S, C), r(2, 1, C, dt=torch.float32), r(2, S, C, dt=torch.float32), 1e-6),
        "gated_residual": (r(2, S, C), r(2, S, C), r(2, 1, C, dt=torch.float32)),
    }
