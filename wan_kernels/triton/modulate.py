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
    if x.numel() == 0:  # no tokens or no channels (C = 0: an empty output, as torch's layer_norm gives)
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
    if x.numel() == 0:  # no tokens or no channels
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


# ---------------------------------------------------------------------------------------------
# Backward kernels (wan::layer_norm_modulate_backward, wan::gated_residual_backward): one fused pass each.
# With n = LayerNorm(x), gn = g * (1 + scale):
#   layer_norm_modulate: dx = rstd * (gn - mean(gn) - n * mean(gn * n)), dscale = g * n, dshift = g
#   gated_residual:      dy = g * gate, dgate = g * y (dx = g: no kernel)
# rstd and the mean are recomputed from x (the forward saves only its inputs), huge rows by the forward's rule.
# A modulation gradient is written per token when its operand is per token ([B, S, C]), else (it broadcasts
# over S) accumulated in fp32 registers: program (b, p) owns rows [p * ROWS, (p + 1) * ROWS) of batch b and
# writes its partial sum to row (b, p) of a [B, P, C] buffer, which the launcher sums over P (and over B for
# a [1, 1|S, C] operand): deterministic, no atomics. Offsets 64-bit.

# Programs per launch of a backward (each a block of rows of one batch entry); partials are [B, P, C] fp32.
MAX_PROGRAMS = 1024


def _layer_norm_modulate_bwd_kernel(g_ptr, x_ptr, scale_ptr, dx_ptr, dscale_ptr, dshift_ptr, S, C, ROWS, P, eps,
                                    ssb, sss, ssc, SCALE_PER_TOKEN: tl.constexpr, SHIFT_PER_TOKEN: tl.constexpr,
                                    BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    mask = c < C
    acc_sc = tl.full([BLOCK_C], 0.0, tl.float32)
    acc_sh = tl.full([BLOCK_C], 0.0, tl.float32)
    start = p * ROWS
    for s in range(start, tl.minimum(start + ROWS, S)):
        t = b * S + s
        x = tl.load(x_ptr + t * C + c, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + t * C + c, mask=mask, other=0.0).to(tl.float32)
        mean = tl.math.div_rn(tl.reduce(x, 0, _ADD), C * 1.0)
        d = tl.where(mask, x - mean, 0.0)
        sq = tl.reduce(d * d, 0, _ADD)
        xscale = 1.0
        if not (sq < float("inf")):  # the forward's huge-row rule: moments of x * 2^(1 - e)
            amax = tl.reduce(tl.abs(x), 0, _MAX)
            e = ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF)
            xscale = tl.where(e < 255, ((255 - e) << 23).to(tl.float32, bitcast=True), 1.0)
            xs = x * xscale
            mean = tl.math.div_rn(tl.reduce(xs, 0, _ADD), C * 1.0)
            d = tl.where(mask, xs - mean, 0.0)
            sq = tl.reduce(d * d, 0, _ADD)
            rstd = tl.math.div_rn(1.0, tl.sqrt_rn(tl.math.div_rn(sq, C * 1.0) + eps * xscale * xscale))
        else:
            rstd = tl.math.div_rn(1.0, tl.sqrt_rn(tl.math.div_rn(sq, C * 1.0) + eps))
        n = d * rstd
        sc = tl.load(scale_ptr + b * ssb + s * sss + c * ssc, mask=mask, other=0.0)
        gn = g * (1.0 + sc)
        mg = tl.math.div_rn(tl.reduce(gn, 0, _ADD), C * 1.0)
        mgn = tl.math.div_rn(tl.reduce(gn * n, 0, _ADD), C * 1.0)
        dx = (rstd * xscale) * (gn - mg - n * mgn)
        tl.store(dx_ptr + t * C + c, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if SCALE_PER_TOKEN:
            tl.store(dscale_ptr + t * C + c, g * n, mask=mask)
        else:
            acc_sc += g * n
        if SHIFT_PER_TOKEN:
            tl.store(dshift_ptr + t * C + c, g, mask=mask)
        else:
            acc_sh += g
    if not SCALE_PER_TOKEN:
        tl.store(dscale_ptr + (b * P + p) * C + c, acc_sc, mask=mask)
    if not SHIFT_PER_TOKEN:
        tl.store(dshift_ptr + (b * P + p) * C + c, acc_sh, mask=mask)


def _gated_residual_bwd_kernel(g_ptr, y_ptr, gate_ptr, dy_ptr, dgate_ptr, S, C, ROWS, P, sgb, sgs, sgc,
                               GATE_PER_TOKEN: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    mask = c < C
    acc = tl.full([BLOCK_C], 0.0, tl.float32)
    start = p * ROWS
    for s in range(start, tl.minimum(start + ROWS, S)):
        t = b * S + s
        g = tl.load(g_ptr + t * C + c, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + t * C + c, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(gate_ptr + b * sgb + s * sgs + c * sgc, mask=mask, other=0.0)
        tl.store(dy_ptr + t * C + c, (g * gate).to(dy_ptr.dtype.element_ty), mask=mask)
        if GATE_PER_TOKEN:
            tl.store(dgate_ptr + t * C + c, g * y, mask=mask)
        else:
            acc += g * y
    if not GATE_PER_TOKEN:
        tl.store(dgate_ptr + (b * P + p) * C + c, acc, mask=mask)


layer_norm_modulate_bwd_kernel = JITFunction(_layer_norm_modulate_bwd_kernel)
gated_residual_bwd_kernel = JITFunction(_gated_residual_bwd_kernel)


def backward_blocks(B: int, S: int) -> tuple[int, int]:
    """(ROWS, P): rows per program and programs per batch entry of the backward kernels."""
    rows = max(1, triton.cdiv(B * S, MAX_PROGRAMS))
    return rows, triton.cdiv(S, rows)


def _grad_buffer(t: torch.Tensor, B: int, S: int, P: int) -> tuple[torch.Tensor, bool]:
    """(fp32 buffer, per_token) for the gradient of modulation operand `t`: [B, S, C] when t is per token, else
    the [B, P, C] partials."""
    per_token = t.shape[1] != 1
    return torch.empty((B, S if per_token else P, t.shape[2]), dtype=torch.float32, device=t.device), per_token


def sum_to(buf: torch.Tensor, shape) -> torch.Tensor:
    """A [B, S|P, C] gradient buffer summed to the operand's shape [B|1, S|1, C] (fixed order: deterministic)."""
    if shape[1] == 1:
        buf = buf.sum(1, keepdim=True)
    return buf.sum(0, keepdim=True) if shape[0] == 1 and buf.shape[0] != 1 else buf


def prepare_layer_norm_modulate_backward(grad_out, x, scale, shift, eps, capability):
    """(Launch or None when empty, dx, dscale buffer, dshift buffer) of `layer_norm_modulate_backward`
    (capability None = interpreter); the buffers go through `sum_to`."""
    x, g = x.contiguous(), grad_out.contiguous()
    B, S, C = x.shape
    rows, P = backward_blocks(B, S)
    dx = _out_for(x, capability)
    dsc, sc_tok = _grad_buffer(scale, B, S, P)
    dsh, sh_tok = _grad_buffer(shift, B, S, P)
    if x.numel() == 0:  # no tokens or no channels
        return None, dx, dsc.zero_(), dsh.zero_()
    block, warps = launch_config(C)
    # two fp32 row accumulators besides the row: at 16 warps (128 registers a thread) triton 3.6 spills at
    # C = 5120 fp32; 8 warps leave 255
    warps = min(warps, 8)
    return Launch(layer_norm_modulate_bwd_kernel, (B, P), (g, x, scale, dx, dsc, dsh, S, C, rows, P, float(eps),
                                                           *_strides(scale)),
                  dict(SCALE_PER_TOKEN=sc_tok, SHIFT_PER_TOKEN=sh_tok, BLOCK_C=block, num_warps=warps, **EXACT),
                  x.device), dx, dsc, dsh


def prepare_gated_residual_backward(grad_out, y, gate, capability):
    """(Launch or None when empty, dy, dgate buffer) of `gated_residual_backward` (capability None = interpreter)."""
    y, g = y.contiguous(), grad_out.contiguous()
    B, S, C = y.shape
    rows, P = backward_blocks(B, S)
    dy = _out_for(y, capability)
    dgate, tok = _grad_buffer(gate, B, S, P)
    if y.numel() == 0:  # no tokens or no channels
        return None, dy, dgate.zero_()
    block, warps = launch_config(C)
    return Launch(gated_residual_bwd_kernel, (B, P), (g, y, gate, dy, dgate, S, C, rows, P, *_strides(gate)),
                  dict(GATE_PER_TOKEN=tok, BLOCK_C=block, num_warps=warps, **EXACT), y.device), dy, dgate


def layer_norm_modulate_backward(grad_out, x, scale, shift, eps):
    """Triton launcher of wan::layer_norm_modulate_backward -> (grad_x, grad_scale, grad_shift)."""
    launch, dx, dsc, dsh = prepare_layer_norm_modulate_backward(grad_out, x, scale, shift, eps, target(x, "modulate"))
    if launch is not None:
        run(launch)
    return dx.to(x.dtype), sum_to(dsc, scale.shape), sum_to(dsh, shift.shape)


def gated_residual_backward(grad_out, y, gate):
    """Triton launcher of wan::gated_residual_backward -> (grad_y, grad_gate)."""
    launch, dy, dgate = prepare_gated_residual_backward(grad_out, y, gate, target(y, "modulate"))
    if launch is not None:
        run(launch)
    return dy.to(y.dtype), sum_to(dgate, gate.shape)


# The Wan widths readiness compiles these kernels at (tools/readiness.py)
AOT_C = (1536, 3072, 5120)  # Wan 1.3B / 5B / 14B widths
