"""Reference of the NVFP4 ops (quantize, dequantize, W4A4 GEMM); format in wan_kernels/nvfp4.py.

Policies (identical in every backend, see csrc/nvfp4/nvfp4_numerics.h):
  * E2M1 round-to-nearest-even, saturating at +-6; negative values that round to 0 keep the sign bit.
  * block_scale = e4m3_rne(min(block_amax / 6 / global_scale, 448)) (clamped BEFORE the cast: torch's
    cast turns values >= 480 into NaN).
  * NaN inputs are ignored by the amax and quantize to code 0; +-Inf saturate to +-6.
  * global_scale <= 0 or non-finite, or a block scale that rounds to 0: codes 0, never NaN.
"""

import torch

from wan_kernels.nvfp4 import BLOCK, E2M1_VALUES, E4M3_MAX, swizzle_scales, unswizzle_scales

__all__ = ["nvfp4_dequantize", "nvfp4_gemm", "nvfp4_linear", "nvfp4_linear_backward", "nvfp4_quantize"]

# Thresholds of round-to-nearest-even onto the E2M1 grid: (bound, inclusive) - a magnitude above the
# bound (or equal to it when inclusive) moves up one code. Ties go to the even code.
_E2M1_STEPS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))


def e2m1_encode(v: torch.Tensor) -> torch.Tensor:
    """fp32 -> uint8 E2M1 code (sign in bit 3)."""
    a = v.abs()
    code = torch.zeros(v.shape, dtype=torch.uint8, device=v.device)
    for bound, inclusive in _E2M1_STEPS:
        code += (a >= bound if inclusive else a > bound).to(torch.uint8)
    code = code | (torch.signbit(v).to(torch.uint8) << 3)
    return torch.where(torch.isnan(v), torch.zeros_like(code), code)


def e2m1_decode(code: torch.Tensor) -> torch.Tensor:
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=code.device)
    mag = table[(code & 7).long()]
    return torch.where((code & 8) != 0, -mag, mag)


def _valid_global_scale(gs: torch.Tensor) -> torch.Tensor:
    return (gs > 0) & torch.isfinite(gs)


def nvfp4_quantize(x: torch.Tensor, global_scale: torch.Tensor):
    """x: [M, K] (K % 16 == 0) -> packed uint8 [M, K/2], block_scale float8_e4m3fn [M', Ks'] (swizzled)."""
    m, k = x.shape
    gs = global_scale.reshape(()).float()
    xb = x.float().reshape(m, k // BLOCK, BLOCK)
    amax = torch.nan_to_num(xb, nan=0.0).abs().amax(-1)                              # [M, Ks]
    s = torch.clamp((amax / 6.0) / gs, max=E4M3_MAX)
    s = torch.where(_valid_global_scale(gs), s, torch.zeros_like(s))
    scale_e4m3 = s.to(torch.float8_e4m3fn)
    denom = (scale_e4m3.float() * gs)[..., None]                                      # [M, Ks, 1]
    q = torch.where(denom > 0, xb / denom, torch.zeros_like(xb))
    codes = e2m1_encode(q).reshape(m, k)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    block_scale = swizzle_scales(scale_e4m3.view(torch.uint8)).view(torch.float8_e4m3fn)
    return packed, block_scale


def _dequantize_unscaled(packed: torch.Tensor, block_scale: torch.Tensor) -> torch.Tensor:
    """e2m1 * block_scale in fp32, without the global scale: [M, K]."""
    m, k = packed.shape[0], packed.shape[1] * 2
    codes = torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(m, k)
    scales = unswizzle_scales(block_scale.view(torch.uint8), m, k // BLOCK).view(torch.float8_e4m3fn).float()
    return (e2m1_decode(codes).reshape(m, k // BLOCK, BLOCK) * scales[..., None]).reshape(m, k)


def nvfp4_dequantize(packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor,
                     dtype: torch.dtype) -> torch.Tensor:
    """packed [M, K/2] + swizzled scales + global scale -> [M, K] = (e2m1 * block_scale) * global_scale."""
    return (_dequantize_unscaled(packed, block_scale) * global_scale.reshape(()).float()).to(dtype)


def nvfp4_gemm(a: torch.Tensor, a_scale: torch.Tensor, a_global_scale: torch.Tensor, b: torch.Tensor,
               b_scale: torch.Tensor, b_global_scale: torch.Tensor, bias: torch.Tensor | None,
               out_dtype: torch.dtype) -> torch.Tensor:
    """W4A4 GEMM as the block-scaled tensor cores compute it: out[M, N] = alpha * (A_q @ B_q^T) + bias,
    A_q/B_q = e2m1 * block_scale (K-major, both), alpha = a_global_scale * b_global_scale, fp32 accumulate."""
    acc = _dequantize_unscaled(a, a_scale) @ _dequantize_unscaled(b, b_scale).T
    out = acc * (a_global_scale.reshape(()).float() * b_global_scale.reshape(()).float())
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def nvfp4_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, w_global_scale: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """W4A16 linear: x [..., K] @ dequantize(w [N, K/2])^T + bias -> [..., N] in x's dtype (fp32 math)."""
    dt = torch.promote_types(x.dtype, torch.float32)
    out = x.to(dt) @ nvfp4_dequantize(w, w_scale, w_global_scale, dt).T
    if bias is not None:
        out = out + bias.to(dt)
    return out.to(x.dtype)


def nvfp4_linear_backward(grad_out: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                          w_global_scale: torch.Tensor) -> torch.Tensor:
    """nvfp4_linear's input gradient (the weight is a frozen base): grad_out [..., N] @ dequantize(w [N, K/2])
    -> dx [..., K] in grad_out's dtype (fp32 math; fp64 for fp64)."""
    dt = torch.promote_types(grad_out.dtype, torch.float32)
    return (grad_out.to(dt) @ nvfp4_dequantize(w, w_scale, w_global_scale, dt)).to(grad_out.dtype)
