"""Triton kernels of the DiT block's elementwise glue: one program per token, one pass, fp32 math, one rounding.

  layer_norm_modulate(x, scale, shift, eps) = (LayerNorm(x, no affine) * (1 + scale) + shift).to(x.dtype)
  gated_residual(x, y, gate)                = (x.float() + y.float() * gate).to(x.dtype)

x, y: [B, S, C] (last dim contiguous); scale/shift/gate: fp32 [B, 1|S, C], any strides (stride 0 broadcasts).
A row of C <= 8192 channels is one tile (Wan: 1536 / 3072 / 5120); warps chosen so each thread holds <= 16
elements. Memory-bound: one read of x (and y / the modulation rows), one write.
LayerNorm of huge rows (the sum of squared deviations overflows fp32 from |x| ~ 1e17 at Wan's widths): a row
whose sum is not finite while max|x| is recomputes its moments from x scaled by a power of two (exact), with eps
scaled alike (csrc/modulate/modulate_cpu.cpp does the same); a branch taken by such rows only. Rows holding
inf/NaN stay NaN, as in torch.
Like qk_norm_rope.py, the kernels are plain functions, compiled for CUDA tensors and interpreted for CPU tensors
under TRITON_INTERPRET=1 (`_launch.run`), and use tl.reduce with Triton's own combiner (interpreter-safe).
Numerics: compiled without FMA contraction (`_launch.EXACT`) and with IEEE `div_rn` / `sqrt_rn`, so every
operation rounds once as in the interpreter, torch and the C++ kernels (built with -ffp-contract=off):
gated_residual is bit-identical to the reference; layer_norm_modulate differs only by the reduction order of the
mean / variance (tests/test_modulate.py: 1e-5 in fp32, one ulp in fp16/bf16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from wan_kernels.triton._launch import EXACT, Launch, run, target

_ADD = tl.standard._sum_combine
_MAX = tl.standard._elementwise_max


def _layer_norm_modulate_kernel(x_ptr, scale_ptr, shift_ptr, out_ptr, S, C, eps,
                                ssb, sss, ssc, shb, shs, shc, BLOCK_C: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    b = t // S
    s = t % S
    c = tl.arange(0, BLOCK_C)
    mask = c < C
    x = tl.load(x_ptr + t * C + c, mask=mask, other=0.0).to(tl.float32)
    mean = tl.math.div_rn(tl.reduce(x, 0, _ADD), C * 1.0)
    d = tl.where(mask, x - mean, 0.0)
    sq = tl.reduce(d * d, 0, _ADD)
    if not (sq < float("inf")):  # overflowed (|x| >~ 1e17) or NaN: moments of x * 2^(1 - e), e = exponent of max|x|
        amax = tl.reduce(tl.abs(x), 0, _MAX)
        e = ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF)                        # biased; 255: inf / NaN
        scale = tl.where(e < 255, ((255 - e) << 23).to(tl.float32, bitcast=True), 1.0)  # max|x * scale| in [2, 4)
        xs = x * scale
        mean = tl.math.div_rn(tl.reduce(xs, 0, _ADD), C * 1.0)
        d = tl.where(mask, xs - mean, 0.0)
        sq = tl.reduce(d * d, 0, _ADD)
        eps = eps * scale * scale
    rstd = tl.math.div_rn(1.0, tl.sqrt_rn(tl.math.div_rn(sq, C * 1.0) + eps))
    sc = tl.load(scale_ptr + b * ssb + s * sss + c * ssc, mask=mask, other=0.0)
    sh = tl.load(shift_ptr + b * shb + s * shs + c * shc, mask=mask, other=0.0)
    out = d * rstd * (1.0 + sc) + sh
    tl.store(out_ptr + t * C + c, out.to(out_ptr.dtype.element_ty), mask=mask)


def _gated_residual_kernel(x_ptr, y_ptr, gate_ptr, out_ptr, S, C, sgb, sgs, sgc, BLOCK_C: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    b = t // S
    s = t % S
    c = tl.arange(0, BLOCK_C)
    mask = c < C
    x = tl.load(x_ptr + t * C + c, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + t * C + c, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + b * sgb + s * sgs + c * sgc, mask=mask, other=0.0)
    tl.store(out_ptr + t * C + c, (x + y * g).to(out_ptr.dtype.element_ty), mask=mask)


# Compiled for CUDA tensors; `_launch.run` interprets the same functions for CPU tensors (TRITON_INTERPRET=1).
layer_norm_modulate_kernel = JITFunction(_layer_norm_modulate_kernel)
gated_residual_kernel = JITFunction(_gated_residual_kernel)


def launch_config(C: int) -> tuple[int, int]:
    """(BLOCK_C, num_warps): the row in one tile, <= 16 elements per thread, 1..16 warps."""
    block = triton.next_power_of_2(C)
    return block, max(1, min(16, block // (32 * 16)))


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return (0 if t.shape[0] == 1 else t.stride(0), 0 if t.shape[1] == 1 else t.stride(1), t.stride(2))


def _out_for(x: torch.Tensor, capability) -> torch.Tensor:
    # The interpreter's fp32 -> bf16 cast truncates (see qk_norm_rope.py): on CPU store fp32, torch rounds (RNE).
    soft = capability is None and x.dtype == torch.bfloat16
    return torch.empty(x.shape, dtype=torch.float32 if soft else x.dtype, device=x.device)


def prepare_layer_norm_modulate(x, scale, shift, eps, capability) -> tuple[Launch | None, torch.Tensor]:
    """(Launch or None when empty, out) of `layer_norm_modulate` for `capability` (None = interpreter)."""
    x = x.contiguous()
    B, S, C = x.shape
    out = _out_for(x, capability)
    if B * S == 0:
        return None, out
    block, warps = launch_config(C)
    return Launch(layer_norm_modulate_kernel, (B * S,), (x, scale, shift, out, S, C, float(eps), *_strides(scale),
                                                          *_strides(shift)),
                  dict(BLOCK_C=block, num_warps=warps, **EXACT), x.device), out


def prepare_gated_residual(x, y, gate, capability) -> tuple[Launch | None, torch.Tensor]:
    """(Launch or None when empty, out) of `gated_residual` for `capability` (None = interpreter)."""
    x, y = x.contiguous(), y.contiguous()
    B, S, C = x.shape
    out = _out_for(x, capability)
    if B * S == 0:
        return None, out
    block, warps = launch_config(C)
    return Launch(gated_residual_kernel, (B * S,), (x, y, gate, out, S, C, *_strides(gate)),
                  dict(BLOCK_C=block, num_warps=warps, **EXACT), x.device), out


def layer_norm_modulate(x, scale, shift, eps):
    """Triton launcher of wan::layer_norm_modulate."""
    launch, out = prepare_layer_norm_modulate(x, scale, shift, eps, target(x, "modulate"))
    if launch is not None:
        run(launch)
    return out.to(x.dtype)


def gated_residual(x, y, gate):
    """Triton launcher of wan::gated_residual."""
    launch, out = prepare_gated_residual(x, y, gate, target(x, "modulate"))
    if launch is not None:
        run(launch)
    return out.to(x.dtype)


# The Wan widths readiness compiles these kernels at (wan_kernels/readiness.py)
AOT_C = (1536, 3072, 5120)  # Wan 1.3B / 5B / 14B widths
