"""Triton kernels of the NVFP4 ops: quantize, dequantize, and GEMMs that dequantize in the main loop.

Numerics are those of csrc/nvfp4/nvfp4_numerics.h (and wan_kernels/ref/nvfp4.py), written with
exact integer/bit arithmetic so the results are bit-identical to the C++/CUDA kernels on any GPU and in
the interpreter: E4M3 rounding by mantissa bits (no hardware cvt: sm_80 has none), IEEE division
(`div_rn`; Triton's `/` is approximate on GPU), NaN removed before the block amax (the interpreter's
max propagates NaN, the GPU's drops it).

GEMMs (`_nvfp4_gemm_kernel`), one kernel for both modes:
  * W4A16 (`nvfp4_linear_w4a16`): bf16/fp16 activations x NVFP4 weights [N, K/2] -> the Ampere/Hopper
    fallback (no FP4 tensor cores there): weight tiles are decoded to the activation dtype in the main
    loop and fed to tl.dot (mma.sync / wgmma), fp32 accumulate, `* global_scale` once in the epilogue.
    Decoding is EXACT: e2m1 (2 significant bits) x e4m3 (4) has at most 5 significant bits, inside
    fp16/bf16's range for every code/scale (max 6 * 448 = 2688, min 0.5 * 2^-9).
  * W4A4 (`nvfp4_gemm`): both operands NVFP4, decoded the same way: the emulation of the Blackwell
    block-scaled tensor cores (products of decoded values are exact in fp32; alpha = gs_a * gs_b applied
    to the fp32 accumulator), for testing sm100 numerics without sm100.
Trade-off: on compute-bound DiT shapes the W4A16 path saves memory (weights 3.5x smaller than bf16),
not time; the decode adds ALU work per tile that a GEMM at the tensor-core roofline cannot hide fully.
"""

from __future__ import annotations

import types

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from wan_kernels.triton._launch import on_interpreter

from wan_kernels.nvfp4 import BLOCK, round_up

# ---------------------------------------------------------------------------------------------
# Shared device functions


@triton.jit
def _e4m3_encode_nonneg(x):
    """fp32 in [0, 448] (NaN-free) -> uint8 E4M3 code, round to nearest even."""
    bits = x.to(tl.uint32, bitcast=True)
    e = ((bits >> 23) & 0xFF).to(tl.int32) - 127
    # subnormal range (x < 2^-6): multiples of 2^-9; x * 512 is exact, round half to even by hand
    v = x * 512.0
    f = tl.floor(v)
    r = v - f
    fi = f.to(tl.int32)
    sub = fi + ((r > 0.5) | ((r == 0.5) & ((fi & 1) == 1))).to(tl.int32)
    # normal range: keep 3 mantissa bits, RNE on the 20 dropped bits (a carry bumps the exponent)
    mant = bits & 0x7FFFFF
    m = (mant >> 20).to(tl.int32)
    rem = mant & 0xFFFFF
    m = m + ((rem > 0x80000) | ((rem == 0x80000) & ((m & 1) == 1))).to(tl.int32)
    norm = tl.minimum(((e + 7) << 3) + m, 0x7E)
    code = tl.where(e < -6, sub, norm)
    code = tl.where(x >= 448.0, 0x7E, code)
    code = tl.where(x > 0.0, code, 0)
    return code.to(tl.uint8)


@triton.jit
def _e4m3_decode(code):
    """uint8 E4M3 code (finite, non-negative) -> fp32, exactly."""
    c = code.to(tl.int32)
    e = (c >> 3) & 0xF
    m = c & 0x7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)  # (1 + m/8) * 2^(e-7)
    return tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)


@triton.jit
def _e2m1_decode(code):
    """uint8 E2M1 code (bit 3 = sign) -> fp32: exponent 0 is subnormal (0, 0.5)."""
    c = code.to(tl.int32)
    e = (c >> 1) & 0x3
    m = (c & 0x1).to(tl.float32)
    mag = tl.where(e == 0, 0.5 * m, (1.0 + 0.5 * m) * (1 << tl.maximum(e - 1, 0)).to(tl.float32))
    return tl.where((c & 0x8) != 0, -mag, mag)


@triton.jit
def _e2m1_encode(v):
    """fp32 -> uint8 E2M1 code, RNE with ties to the even code, saturating at +-6; NaN -> 0."""
    a = tl.abs(v)
    c = ((a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32) +
         (a >= 1.75).to(tl.int32) + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32) + (a > 5.0).to(tl.int32))
    sign = ((v.to(tl.uint32, bitcast=True) >> 31) << 3).to(tl.int32)
    return tl.where(v == v, c | sign, 0).to(tl.uint8)


@triton.jit
def _swizzled_offset(m, k, ks_padded):
    return ((m // 128) * (ks_padded // 4) + k // 4) * 512 + (m % 32) * 16 + ((m % 128) // 32) * 4 + (k % 4)


# ---------------------------------------------------------------------------------------------
# Quantize / dequantize


@triton.jit
def _nvfp4_quantize_kernel(x_ptr, packed_ptr, scale_ptr, gs_ptr, M, K, stride_m, stride_k, ks_padded,
                           BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None] * stride_m + cols[None, :] * stride_k, mask=mask, other=0.0).to(tl.float32)
    gs = tl.load(gs_ptr)
    gs_ok = (gs > 0.0) & (gs <= 3.4028234663852886e38)

    NB: tl.constexpr = BLOCK_K // 16
    xb = tl.reshape(x, (BLOCK_M, NB, 16))
    # [BM, NB] block amax, NaN dropped; tl.reduce with Triton's own max combiner (not the @jit tl.max)
    # runs in the interpreter whatever the import order of triton and TRITON_INTERPRET
    amax = tl.reduce(tl.where(xb == xb, tl.abs(xb), 0.0), 2, tl.standard._elementwise_max)
    s = tl.minimum(tl.math.div_rn(tl.math.div_rn(amax, 6.0), tl.where(gs_ok, gs, 1.0)), 448.0)
    scode = tl.where(gs_ok, _e4m3_encode_nonneg(s), 0).to(tl.uint8)
    denom = _e4m3_decode(scode) * gs                                            # [BM, NB]
    q = tl.math.div_rn(xb, tl.where(denom > 0.0, denom, 1.0)[:, :, None])
    codes = tl.where((denom > 0.0)[:, :, None], _e2m1_encode(q), 0).to(tl.uint8)
    lo, hi = tl.split(tl.reshape(codes, (BLOCK_M, BLOCK_K // 2, 2)))
    pcols = pid_k * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
    tl.store(packed_ptr + rows[:, None] * (K // 2) + pcols[None, :], lo | (hi << 4),
             mask=(rows[:, None] < M) & (pcols[None, :] < K // 2))
    kb = pid_k * NB + tl.arange(0, NB)
    tl.store(scale_ptr + _swizzled_offset(rows[:, None], kb[None, :], ks_padded), scode,
             mask=(rows[:, None] < M) & (kb[None, :] < K // 16))


@triton.jit
def _nvfp4_dequantize_kernel(packed_ptr, scale_ptr, gs_ptr, out_ptr, M, K, ks_padded,
                             BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pcols = pid_k * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
    pmask = (rows[:, None] < M) & (pcols[None, :] < K // 2)
    p = tl.load(packed_ptr + rows[:, None] * (K // 2) + pcols[None, :], mask=pmask, other=0)
    vals = tl.reshape(tl.join(_e2m1_decode(p & 0xF), _e2m1_decode(p >> 4)), (BLOCK_M, BLOCK_K // 16, 16))
    kb = pid_k * (BLOCK_K // 16) + tl.arange(0, BLOCK_K // 16)
    smask = (rows[:, None] < M) & (kb[None, :] < K // 16)
    sc = _e4m3_decode(tl.load(scale_ptr + _swizzled_offset(rows[:, None], kb[None, :], ks_padded), mask=smask, other=0))
    out = tl.reshape(vals * sc[:, :, None], (BLOCK_M, BLOCK_K)) * tl.load(gs_ptr)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], out.to(out_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < K))


def _interpreted(kernel: JITFunction) -> InterpretedFunction:
    """The same kernel for the Triton interpreter (CPU tensors), whatever TRITON_INTERPRET was at import.

    The interpreter cannot call @triton.jit helpers, so the kernel and every helper of this module are
    re-created as plain functions over one namespace in which the helpers are plain functions too."""
    ns = dict(globals())

    def plain(f):
        g = types.FunctionType(f.__code__, ns, f.__name__, f.__defaults__, f.__closure__)
        g.__annotations__ = dict(f.__annotations__)
        g.__kwdefaults__ = f.__kwdefaults__
        return g

    for name, value in globals().items():
        if isinstance(value, JITFunction) and value.fn.__module__ == __name__:
            ns[name] = plain(value.fn)
    return InterpretedFunction(plain(kernel.fn))


def _kernel_for(kernel: JITFunction, t: torch.Tensor):
    """Compiled kernel for CUDA tensors; the interpreted one for CPU tensors under TRITON_INTERPRET=1."""
    if not on_interpreter(t, "nvfp4"):
        return kernel
    if kernel not in _INTERPRETED:
        _INTERPRETED[kernel] = _interpreted(kernel)
    return _INTERPRETED[kernel]


_INTERPRETED: dict = {}
_QUANT_BLOCK_M, _QUANT_BLOCK_K = 16, 128


def nvfp4_quantize(x: torch.Tensor, global_scale: torch.Tensor):
    """Triton launcher of wan::nvfp4_quantize (same contract; see wan_kernels/ops.py)."""
    M, K = x.shape
    ks_padded = round_up(K // BLOCK, 4)
    packed = torch.empty((M, K // 2), dtype=torch.uint8, device=x.device)
    scale = torch.zeros((round_up(M, 128), ks_padded), dtype=torch.uint8, device=x.device)
    if M and K:
        grid = (triton.cdiv(M, _QUANT_BLOCK_M), triton.cdiv(K, _QUANT_BLOCK_K))
        _kernel_for(_nvfp4_quantize_kernel, x)[grid](x, packed, scale, global_scale.reshape(1).float(), M, K, x.stride(0),
                                     x.stride(1), ks_padded, BLOCK_M=_QUANT_BLOCK_M, BLOCK_K=_QUANT_BLOCK_K)
    return packed, scale.view(torch.float8_e4m3fn)


def nvfp4_dequantize(packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor,
                     dtype: torch.dtype) -> torch.Tensor:
    """Triton launcher of wan::nvfp4_dequantize."""
    M, K = packed.shape[0], packed.shape[1] * 2
    out = torch.empty((M, K), dtype=dtype, device=packed.device)
    if M and K:
        grid = (triton.cdiv(M, _QUANT_BLOCK_M), triton.cdiv(K, _QUANT_BLOCK_K))
        _kernel_for(_nvfp4_dequantize_kernel, packed)[grid](packed.contiguous(), block_scale.view(torch.uint8), global_scale.reshape(1).float(),
                                       out, M, K, block_scale.shape[1], BLOCK_M=_QUANT_BLOCK_M, BLOCK_K=_QUANT_BLOCK_K)
    return out


# ---------------------------------------------------------------------------------------------
# GEMM with NVFP4 operands decoded in the main loop


@triton.jit
def _decode_tile(p_ptr, s_ptr, rows, kp, n_rows, K, ks_padded, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Packed rows x [kp : kp + BLOCK_K/2) bytes -> [BLOCK_R, BLOCK_K] fp32 = e2m1 * block scale (exact)."""
    pcols = kp + tl.arange(0, BLOCK_K // 2)
    p = tl.load(p_ptr + rows[:, None] * (K // 2) + pcols[None, :],
                mask=(rows[:, None] < n_rows) & (pcols[None, :] < K // 2), other=0)
    vals = tl.reshape(tl.join(_e2m1_decode(p & 0xF), _e2m1_decode(p >> 4)), (BLOCK_R, BLOCK_K // 16, 16))
    kb = (kp * 2) // 16 + tl.arange(0, BLOCK_K // 16)
    sc = _e4m3_decode(tl.load(s_ptr + _swizzled_offset(rows[:, None], kb[None, :], ks_padded),
                              mask=(rows[:, None] < n_rows) & (kb[None, :] < K // 16), other=0))
    return tl.reshape(vals * sc[:, :, None], (BLOCK_R, BLOCK_K))


@triton.jit
def _nvfp4_gemm_kernel(a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, alpha_ptr, bias_ptr, out_ptr, M, N, K,
                       stride_am, stride_ak, ks_padded,
                       A_FP4: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GROUP_M: tl.constexpr):
    # grouped launch order: GROUP_M row tiles share each column tile in L2
    pid = tl.program_id(0)
    num_m = (M + BLOCK_M - 1) // BLOCK_M  # (tl.cdiv / tl.zeros are @jit helpers the interpreter cannot call)
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
    pid_n = (pid % (GROUP_M * num_n)) // size_m

    rows_a = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_b = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if A_FP4:
            a = _decode_tile(a_ptr, a_scale_ptr, rows_a, k0 // 2, M, K, ks_padded, BLOCK_M, BLOCK_K).to(DOT_DTYPE)
        else:
            ks = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(a_ptr + rows_a[:, None] * stride_am + ks[None, :] * stride_ak,
                        mask=(rows_a[:, None] < M) & (ks[None, :] < K), other=0.0).to(DOT_DTYPE)
        b = _decode_tile(b_ptr, b_scale_ptr, rows_b, k0 // 2, N, K, ks_padded, BLOCK_N, BLOCK_K).to(DOT_DTYPE)
        acc += tl.dot(a, tl.trans(b))
    acc = acc * tl.load(alpha_ptr)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows_b, mask=rows_b < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows_a[:, None] * N + rows_b[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rows_a[:, None] < M) & (rows_b[None, :] < N))


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


_SMALL = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3)
_LARGE_SM80 = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3)
_LARGE_SM90 = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


def gemm_config(m: int, capability: tuple[int, int] | None, a_fp4: bool) -> dict:
    """Tile config of the NVFP4 GEMM by M and arch. Every config this can return compiles with zero spills
    (tests/test_nvfp4_triton_aot.py); measured: 128x128x64/8 warps spills on sm_80 (both modes) and
    128x64x64/4 warps spills in the W4A4 mode on sm_80/sm_90 (two tiles decoded per step)."""
    if capability is None:                      # interpreter: small tiles keep numpy fast
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=1)
    if m <= 64:                                 # skinny M: more column tiles in flight
        return dict(_SMALL)
    if capability[0] >= 9:
        return dict(_LARGE_SM90)
    return dict(_SMALL if a_fp4 else _LARGE_SM80)


def aot_gemm_signature(a_fp4: bool, dt: str) -> dict:
    """Triton signature of `_nvfp4_gemm_kernel` for ahead-of-time compiles (tests, wan_kernels.readiness)."""
    a = "*u8" if a_fp4 else f"*{dt}"
    return {"a_ptr": a, "a_scale_ptr": a, "b_ptr": "*u8", "b_scale_ptr": "*u8", "alpha_ptr": "*fp32",
            "bias_ptr": f"*{dt}", "out_ptr": f"*{dt}", "M": "i32", "N": "i32", "K": "i32", "stride_am": "i32",
            "stride_ak": "i32", "ks_padded": "i32", "A_FP4": "constexpr", "HAS_BIAS": "constexpr",
            "DOT_DTYPE": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr",
            "GROUP_M": "constexpr"}


AOT_GEMM_ALIGNED = ("a_ptr", "b_ptr", "b_scale_ptr", "out_ptr", "N", "K", "stride_am", "ks_padded")


def config_space() -> list[tuple[int, bool, dict]]:
    """Every (arch, a_fp4, config) `gemm_config` can return on sm_80 / sm_90 / sm_100."""
    out = []
    for arch in (80, 90, 100):
        for a_fp4 in (False, True):
            seen = []
            for m in (1, 4096):
                cfg = gemm_config(m, (arch // 10, arch % 10), a_fp4)
                if cfg not in seen:
                    seen.append(cfg)
                    out.append((arch, a_fp4, cfg))
    return out


def _launch_gemm(a, a_scale, b, b_scale, alpha, bias, out_dtype, a_fp4: bool, dot_dtype: torch.dtype):
    M = a.shape[0]
    N, K = b.shape[0], b.shape[1] * 2
    out = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return out
    cap = torch.cuda.get_device_capability(a.device) if a.is_cuda else None
    cfg = gemm_config(M, cap, a_fp4)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _kernel_for(_nvfp4_gemm_kernel, a)[grid](
        a, a_scale.view(torch.uint8) if a_fp4 else a, b.contiguous(), b_scale.view(torch.uint8), alpha,
        bias if bias is not None else alpha, out, M, N, K,
        0 if a_fp4 else a.stride(0), 0 if a_fp4 else a.stride(1), b_scale.shape[1],
        A_FP4=a_fp4, HAS_BIAS=bias is not None, DOT_DTYPE=_TL_DTYPES[dot_dtype], **cfg)
    return out


def nvfp4_gemm(a, a_scale, a_global_scale, b, b_scale, b_global_scale, bias, out_dtype):
    """W4A4 emulation: Triton launcher of wan::nvfp4_gemm (decoded tiles are exact in fp16)."""
    alpha = (a_global_scale.reshape(1).float() * b_global_scale.reshape(1).float())
    return _launch_gemm(a.contiguous(), a_scale, b, b_scale, alpha, bias, out_dtype, True, torch.float16)


def nvfp4_linear_w4a16(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, w_global_scale: torch.Tensor,
                       bias: torch.Tensor | None) -> torch.Tensor:
    """W4A16, Triton launcher of wan::nvfp4_linear: x [..., K] (fp16/bf16) @ dequant(w [N, K/2])^T * w_global_scale
    + bias -> [..., N] in x's dtype."""
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"nvfp4_linear (W4A16): x must be float16/bfloat16, got {x.dtype}")
    x2 = x.reshape(-1, x.shape[-1])
    out = _launch_gemm(x2, None, w, w_scale, w_global_scale.reshape(1).float(), bias, x.dtype, False, x.dtype)
    return out.reshape(*x.shape[:-1], w.shape[0])
