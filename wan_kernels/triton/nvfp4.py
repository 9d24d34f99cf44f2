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
bf16 under the interpreter (`dot_dtype`): the Triton interpreter's bf16 dot works on raw bit patterns (REFERENCE
§1, §10: ~1e8 off), so there, and only there, the W4A16 and dgrad kernels dot in fp32 and store fp32, which torch
rounds to bf16. Same kernel, same exact operand values, fp32 accumulation as on the GPU: the CPU tests check
the bf16 paths the GPU compiles (tests/test_nvfp4_triton.py).
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from wan_kernels.nvfp4 import BLOCK, round_up
from wan_kernels.triton._launch import EXACT, Launch, interpreter_twin, mma_class, run, target

# Kernels and helpers are JITFunctions whatever TRITON_INTERPRET says at import (`@triton.jit` would make them
# interpreted functions, and CUDA tensors would run through the interpreter); `_interpreted` builds the
# interpreter flavour per kernel, used for CPU tensors only.
_jit = JITFunction

# ---------------------------------------------------------------------------------------------
# Shared device functions


@_jit
def e4m3_code(x):
    """fp32 -> uint8 e4m3 code, bit-exact with torch's cast after clamping to +-448: round to nearest even,
    saturating at +-448 (PTX cvt.rn.satfinite), NaN -> 0x7F | sign. Written out because the interpreter's
    fp32 -> e4m3 cast is wrong on carries (REFERENCE section 10); the 8-bit attention kernel uses it too."""
    bits = x.to(tl.uint32, bitcast=True)
    sign = ((bits >> 24) & 0x80).to(tl.int32)
    a = tl.abs(x)
    e = ((bits >> 23) & 0xFF).to(tl.int32) - 127
    # subnormal range (|x| < 2^-6): multiples of 2^-9; |x| * 512 is exact, round half to even by hand
    v = a * 512.0
    f = tl.floor(v)
    r = v - f
    fi = f.to(tl.int32)
    sub = fi + ((r > 0.5) | ((r == 0.5) & ((fi & 1) == 1))).to(tl.int32)
    # normal range: keep 3 mantissa bits, RNE on the 20 dropped bits (a carry bumps the exponent)
    mant = bits & 0x7FFFFF
    m = (mant >> 20).to(tl.int32)
    rem = mant & 0xFFFFF
    m = m + ((rem > 0x80000) | ((rem == 0x80000) & ((m & 1) == 1))).to(tl.int32)
    norm = tl.minimum(((tl.maximum(e, -6) + 7) << 3) + m, 0x7E)
    code = tl.where(e < -6, sub, norm)
    code = tl.where(a >= 448.0, 0x7E, code)
    code = tl.where(a == a, code, 0x7F)
    return (code | sign).to(tl.uint8)


@_jit
def _e4m3_decode(code):
    """uint8 E4M3 code (finite, non-negative) -> fp32, exactly."""
    c = code.to(tl.int32)
    e = (c >> 3) & 0xF
    m = c & 0x7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)  # (1 + m/8) * 2^(e-7)
    return tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)


@_jit
def _e2m1_decode(code):
    """uint8 E2M1 code (bit 3 = sign) -> fp32: exponent 0 is subnormal (0, 0.5)."""
    c = code.to(tl.int32)
    e = (c >> 1) & 0x3
    m = (c & 0x1).to(tl.float32)
    mag = tl.where(e == 0, 0.5 * m, (1.0 + 0.5 * m) * (1 << tl.maximum(e - 1, 0)).to(tl.float32))
    return tl.where((c & 0x8) != 0, -mag, mag)


@_jit
def _e2m1_encode(v):
    """fp32 -> uint8 E2M1 code, RNE with ties to the even code, saturating at +-6; NaN -> 0."""
    a = tl.abs(v)
    c = ((a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32) +
         (a >= 1.75).to(tl.int32) + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32) + (a > 5.0).to(tl.int32))
    sign = ((v.to(tl.uint32, bitcast=True) >> 31) << 3).to(tl.int32)
    return tl.where(v == v, c | sign, 0).to(tl.uint8)


@_jit
def _swizzled_offset(m, k, ks_padded):
    return ((m // 128) * (ks_padded // 4) + k // 4) * 512 + (m % 32) * 16 + ((m % 128) // 32) * 4 + (k % 4)


# ---------------------------------------------------------------------------------------------
# Quantize / dequantize


@_jit
def _nvfp4_quantize_kernel(x_ptr, packed_ptr, scale_ptr, gs_ptr, M, K, stride_m, stride_k, ks_padded,
                           BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    m0 = pid_m * BLOCK_M
    r = tl.arange(0, BLOCK_M)
    rows = m0 + r
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    # row bases in 64 bits (M * K passes 2^31 at Wan's sizes), offsets inside the tile in 32
    x_ptr += m0.to(tl.int64) * stride_m
    packed_ptr += m0.to(tl.int64) * (K // 2)
    x = tl.load(x_ptr + r[:, None] * stride_m + cols[None, :] * stride_k, mask=mask, other=0.0).to(tl.float32)
    gs = tl.load(gs_ptr)
    gs_ok = (gs > 0.0) & (gs <= 3.4028234663852886e38)

    NB: tl.constexpr = BLOCK_K // 16
    xb = tl.reshape(x, (BLOCK_M, NB, 16))
    # [BM, NB] block amax, NaN dropped; tl.reduce with Triton's own max combiner (not the @jit tl.max)
    # runs in the interpreter whatever the import order of triton and TRITON_INTERPRET
    amax = tl.reduce(tl.where(xb == xb, tl.abs(xb), 0.0), 2, tl.standard._elementwise_max)
    s = tl.minimum(tl.math.div_rn(tl.math.div_rn(amax, 6.0), tl.where(gs_ok, gs, 1.0)), 448.0)
    scode = tl.where(gs_ok, e4m3_code(s), 0).to(tl.uint8)
    denom = _e4m3_decode(scode) * gs                                            # [BM, NB]
    q = tl.math.div_rn(xb, tl.where(denom > 0.0, denom, 1.0)[:, :, None])
    codes = tl.where((denom > 0.0)[:, :, None], _e2m1_encode(q), 0).to(tl.uint8)
    lo, hi = tl.split(tl.reshape(codes, (BLOCK_M, BLOCK_K // 2, 2)))
    pcols = pid_k * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
    tl.store(packed_ptr + r[:, None] * (K // 2) + pcols[None, :], lo | (hi << 4),
             mask=(rows[:, None] < M) & (pcols[None, :] < K // 2))
    kb = pid_k * NB + tl.arange(0, NB)
    tl.store(scale_ptr + _swizzled_offset(rows[:, None], kb[None, :], ks_padded), scode,
             mask=(rows[:, None] < M) & (kb[None, :] < K // 16))


@_jit
def _nvfp4_dequantize_kernel(packed_ptr, scale_ptr, gs_ptr, out_ptr, M, K, ks_padded,
                             BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    m0 = pid_m * BLOCK_M
    r = tl.arange(0, BLOCK_M)
    rows = m0 + r
    packed_ptr += m0.to(tl.int64) * (K // 2)                      # 64-bit row bases, 32-bit tile offsets
    out_ptr += m0.to(tl.int64) * K
    pcols = pid_k * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
    pmask = (rows[:, None] < M) & (pcols[None, :] < K // 2)
    p = tl.load(packed_ptr + r[:, None] * (K // 2) + pcols[None, :], mask=pmask, other=0)
    vals = tl.reshape(tl.join(_e2m1_decode(p & 0xF), _e2m1_decode(p >> 4)), (BLOCK_M, BLOCK_K // 16, 16))
    kb = pid_k * (BLOCK_K // 16) + tl.arange(0, BLOCK_K // 16)
    smask = (rows[:, None] < M) & (kb[None, :] < K // 16)
    sc = _e4m3_decode(tl.load(scale_ptr + _swizzled_offset(rows[:, None], kb[None, :], ks_padded), mask=smask, other=0))
    out = tl.reshape(vals * sc[:, :, None], (BLOCK_M, BLOCK_K)) * tl.load(gs_ptr)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + r[:, None] * K + cols[None, :], out.to(out_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < K))


_interpreted = interpreter_twin  # the kernels for the Triton interpreter (CPU tensors)


_QUANT_BLOCK_M, _QUANT_BLOCK_K = 16, 128


def _launch(kernel, grid, args, kwargs, device) -> Launch:
    return Launch(kernel, grid, args, kwargs, device, _interpreted)


def prepare_quantize(x: torch.Tensor, global_scale: torch.Tensor, capability=None):
    """(Launch or None when empty, packed, scale) of `nvfp4_quantize` (one config for every target)."""
    M, K = x.shape
    ks_padded = round_up(K // BLOCK, 4)
    packed = torch.empty((M, K // 2), dtype=torch.uint8, device=x.device)
    scale = torch.zeros((round_up(M, 128), ks_padded), dtype=torch.uint8, device=x.device)
    launch = None
    if M and K:
        launch = _launch(_nvfp4_quantize_kernel, (triton.cdiv(M, _QUANT_BLOCK_M), triton.cdiv(K, _QUANT_BLOCK_K)),
                         (x, packed, scale, global_scale.reshape(1).float(), M, K, x.stride(0), x.stride(1),
                          ks_padded), dict(BLOCK_M=_QUANT_BLOCK_M, BLOCK_K=_QUANT_BLOCK_K, **EXACT), x.device)
    return launch, packed, scale.view(torch.float8_e4m3fn)


def nvfp4_quantize(x: torch.Tensor, global_scale: torch.Tensor):
    """Triton launcher of wan::nvfp4_quantize (same contract; see wan_kernels/ops.py)."""
    launch, packed, scale = prepare_quantize(x, global_scale, target(x, "nvfp4"))
    if launch is not None:
        run(launch)
    return packed, scale


def _bytes(block_scale: torch.Tensor) -> torch.Tensor:
    """The swizzled block scales as the contiguous uint8 buffer the kernels index (any strides accepted)."""
    return block_scale.contiguous().view(torch.uint8)


def prepare_dequantize(packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor,
                       dtype: torch.dtype, capability=None):
    """(Launch or None when empty, out) of `nvfp4_dequantize` (one config for every target)."""
    M, K = packed.shape[0], packed.shape[1] * 2
    out = torch.empty((M, K), dtype=dtype, device=packed.device)
    launch = None
    if M and K:
        launch = _launch(_nvfp4_dequantize_kernel, (triton.cdiv(M, _QUANT_BLOCK_M), triton.cdiv(K, _QUANT_BLOCK_K)),
                         (packed.contiguous(), _bytes(block_scale), global_scale.reshape(1).float(), out, M, K,
                          block_scale.shape[1]), dict(BLOCK_M=_QUANT_BLOCK_M, BLOCK_K=_QUANT_BLOCK_K, **EXACT),
                         packed.device)
    return launch, out


def nvfp4_dequantize(packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor,
                     dtype: torch.dtype) -> torch.Tensor:
    """Triton launcher of wan::nvfp4_dequantize."""
    launch, out = prepare_dequantize(packed, block_scale, global_scale, dtype, target(packed, "nvfp4"))
    if launch is not None:
        run(launch)
    return out


# ---------------------------------------------------------------------------------------------
# GEMM with NVFP4 operands decoded in the main loop


@_jit
def _decode_tile(p_ptr, s_ptr, r0, kp, n_rows, K, ks_padded, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Packed rows [r0, r0 + BLOCK_R) x bytes [kp, kp + BLOCK_K/2) -> [BLOCK_R, BLOCK_K] fp32 = e2m1 * block
    scale (exact). The row base is 64-bit (rows * K/2 passes 2^31 at Wan's sizes), tile offsets 32-bit."""
    r = tl.arange(0, BLOCK_R)
    rows = r0 + r
    pcols = kp + tl.arange(0, BLOCK_K // 2)
    p = tl.load(p_ptr + r0.to(tl.int64) * (K // 2) + (r[:, None] * (K // 2) + pcols[None, :]),
                mask=(rows[:, None] < n_rows) & (pcols[None, :] < K // 2), other=0)
    vals = tl.reshape(tl.join(_e2m1_decode(p & 0xF), _e2m1_decode(p >> 4)), (BLOCK_R, BLOCK_K // 16, 16))
    kb = (kp * 2) // 16 + tl.arange(0, BLOCK_K // 16)
    sc = _e4m3_decode(tl.load(s_ptr + _swizzled_offset(rows[:, None], kb[None, :], ks_padded),
                              mask=(rows[:, None] < n_rows) & (kb[None, :] < K // 16), other=0))
    return tl.reshape(vals * sc[:, :, None], (BLOCK_R, BLOCK_K))


@_jit
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

    # M * N and M * K pass 2^31 at Wan's sizes (to_qkv at 720p with CFG: 151,200 x 15,360): row bases are 64-bit,
    # offsets inside a tile 32-bit
    m0 = pid_m * BLOCK_M
    n0 = pid_n * BLOCK_N
    r = tl.arange(0, BLOCK_M)
    rows_a = m0 + r
    rows_b = n0 + tl.arange(0, BLOCK_N)
    if not A_FP4:
        a_ptr += m0.to(tl.int64) * stride_am
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if A_FP4:
            a = _decode_tile(a_ptr, a_scale_ptr, m0, k0 // 2, M, K, ks_padded, BLOCK_M, BLOCK_K).to(DOT_DTYPE)
        else:
            ks = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(a_ptr + r[:, None] * stride_am + ks[None, :] * stride_ak,
                        mask=(rows_a[:, None] < M) & (ks[None, :] < K), other=0.0).to(DOT_DTYPE)
        b = _decode_tile(b_ptr, b_scale_ptr, n0, k0 // 2, N, K, ks_padded, BLOCK_N, BLOCK_K).to(DOT_DTYPE)
        acc += tl.dot(a, tl.trans(b))
    acc = acc * tl.load(alpha_ptr)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows_b, mask=rows_b < N, other=0.0).to(tl.float32)[None, :]
    out_ptr += m0.to(tl.int64) * N
    tl.store(out_ptr + r[:, None] * N + rows_b[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rows_a[:, None] < M) & (rows_b[None, :] < N))


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


# Tiles by tensor-core class, chosen by runtime-faithful AOT compiles (tools.readiness; stride_ak == 1 is a
# constexpr there, as at run time). Measured spills that ruled out the alternatives: 128x64x64 with 4 warps
# (W4A16) 128 B on sm_80, 232 B on sm_86/89, 200 B on sm_120; 128x128x64 w8 8 B on sm_100 (W4A16); the W4A4 mode
# decodes two tiles per step and keeps 64x64 on mma.sync.
_SMALL = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3)
_LARGE = {"mma.sync": dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
          "wgmma": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
          "tcgen05": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3)}
_INTERPRETER = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=1)


def gemm_config(m: int, capability: tuple[int, int] | None, a_fp4: bool) -> dict:
    """Tile config of the NVFP4 GEMM by M and the target's tensor-core class (`_launch.mma_class`: sm_86/89/120
    run the mma.sync configs of sm_80). Every config this can return compiles with zero spills on sm_80, sm_86,
    sm_89, sm_90, sm_100 and sm_120 as the runtime specialises it (tools.readiness,
    tests/test_nvfp4_triton_aot.py)."""
    if capability is None:                      # interpreter: small tiles keep numpy fast
        return dict(_INTERPRETER)
    cls = mma_class(capability)
    if m <= 64:                                 # skinny M: more column tiles in flight
        # W4A4 on tcgen05 (two decoded tiles per step) at 4 warps: Triton 3.6 spilled 8 B (3.8: 0 B); 8 warps not
        return dict(_SMALL, num_warps=8) if a_fp4 and cls == "tcgen05" else dict(_SMALL)
    return dict(_SMALL if a_fp4 and cls == "mma.sync" else _LARGE[cls])


def prepare_gemm(a, a_scale, b, b_scale, alpha, bias, out_dtype, a_fp4: bool, dot_dtype: torch.dtype, capability):
    """(Launch or None when empty, out [M, N]) of the GEMM kernel for `capability` (None = interpreter)."""
    M = a.shape[0]
    N, K = b.shape[0], b.shape[1] * 2
    out = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return None, out
    cfg = gemm_config(M, capability, a_fp4)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    # the kernel indexes packed operands, block scales and the bias as contiguous buffers (a x operand by strides)
    args = (a, _bytes(a_scale) if a_fp4 else a, b.contiguous(), _bytes(b_scale), alpha,
            bias.contiguous() if bias is not None else alpha, out, M, N, K,
            0 if a_fp4 else a.stride(0), 0 if a_fp4 else a.stride(1), b_scale.shape[1])
    kwargs = dict(A_FP4=a_fp4, HAS_BIAS=bias is not None, DOT_DTYPE=_TL_DTYPES[dot_dtype], **cfg)
    return _launch(_nvfp4_gemm_kernel, grid, args, kwargs, a.device), out


def _launch_gemm(a, a_scale, b, b_scale, alpha, bias, out_dtype, a_fp4: bool, dot_dtype: torch.dtype):
    launch, out = prepare_gemm(a, a_scale, b, b_scale, alpha, bias, out_dtype, a_fp4, dot_dtype, target(a, "nvfp4"))
    if launch is not None:
        run(launch)
    return out


def prepare_w4a4(a, a_scale, a_global_scale, b, b_scale, b_global_scale, bias, out_dtype, capability):
    """`prepare_gemm` of `nvfp4_gemm` (W4A4)."""
    alpha = (a_global_scale.reshape(1).float() * b_global_scale.reshape(1).float())
    return prepare_gemm(a.contiguous(), a_scale, b, b_scale, alpha, bias, out_dtype, True, torch.float16, capability)


def nvfp4_gemm(a, a_scale, a_global_scale, b, b_scale, b_global_scale, bias, out_dtype):
    """W4A4 emulation: Triton launcher of wan::nvfp4_gemm (decoded tiles are exact in fp16)."""
    launch, out = prepare_w4a4(a, a_scale, a_global_scale, b, b_scale, b_global_scale, bias, out_dtype,
                               target(a, "nvfp4"))
    if launch is not None:
        run(launch)
    return out


def dot_dtype(dtype: torch.dtype, capability) -> torch.dtype:
    """The operand dtype of a W4A16 / dgrad kernel's tl.dot and of the buffer it stores: the activations' dtype,
    but fp32 for bf16 under the interpreter (capability None), whose bf16 dot is garbage (REFERENCE §1, §10).
    Exact either way: a bf16 activation (8 significant bits) and a decoded weight (<= 5) are exact in fp32, their
    product too, and the GPU's bf16 MMA accumulates in fp32 as well; only the summation order can differ. The
    fp32 output is rounded to bf16 by torch (round to nearest even, as the GPU's cvt.rn; the interpreter's own
    fp32 -> bf16 cast truncates). Compiled launches keep bf16 (what readiness compiles and GPUs run)."""
    return torch.float32 if capability is None and dtype == torch.bfloat16 else dtype


def _check_w4a16(x: torch.Tensor) -> None:
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"nvfp4_linear (W4A16): x must be float16/bfloat16, got {x.dtype}")


def prepare_w4a16(x, w, w_scale, w_global_scale, bias, capability):
    """`prepare_gemm` of `nvfp4_linear_w4a16` on x viewed as [M, K]; out is [M, N] in `dot_dtype` (x's dtype, fp32
    for bf16 under the interpreter)."""
    _check_w4a16(x)
    dot = dot_dtype(x.dtype, capability)
    return prepare_gemm(x.reshape(-1, x.shape[-1]), None, w, w_scale, w_global_scale.reshape(1).float(), bias,
                        dot, False, dot, capability)


def nvfp4_linear_w4a16(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, w_global_scale: torch.Tensor,
                       bias: torch.Tensor | None) -> torch.Tensor:
    """W4A16, Triton launcher of wan::nvfp4_linear: x [..., K] (fp16/bf16) @ dequant(w [N, K/2])^T * w_global_scale
    + bias -> [..., N] in x's dtype."""
    _check_w4a16(x)
    launch, out = prepare_w4a16(x, w, w_scale, w_global_scale, bias, target(x, "nvfp4"))
    if launch is not None:
        run(launch)
    return out.to(x.dtype).reshape(*x.shape[:-1], w.shape[0])


# ---------------------------------------------------------------------------------------------
# dgrad of the W4A16 linear: dX = dY @ dequant(W), the weight decoded in the main loop


@_jit
def _nvfp4_dgrad_kernel(dy_ptr, w_ptr, w_scale_ptr, gs_ptr, dx_ptr, M, N, K, stride_dm, stride_dn, ks_padded,
                        DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr):
    """dX [M, K] = (dY [M, N] @ (e2m1 * block scale)(W) [N, K]) * global_scale, fp32 accumulate.

    Each program owns a [BLOCK_M, BLOCK_K] tile of dX and reduces over N in BLOCK_N steps: the [BLOCK_N, BLOCK_K]
    tile of W (rows n0.., packed bytes k0/2.., its swizzled block scales) is decoded exactly to the dot dtype by
    `_decode_tile`, the forward's decoder, and multiplies the dY tile untransposed (W is [N, K/2] K-major: the
    decoded tile is already [N, K]). Grouped launch order: GROUP_M row tiles share each weight column tile in L2."""
    pid = tl.program_id(0)
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    num_k = (K + BLOCK_K - 1) // BLOCK_K
    group = pid // (GROUP_M * num_k)
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_k)) % size_m
    pid_k = (pid % (GROUP_M * num_k)) // size_m

    # M * N and M * K pass 2^31 at Wan's sizes (151,200 x 15,360): row bases 64-bit, offsets in a tile 32-bit
    m0 = pid_m * BLOCK_M
    k0 = pid_k * BLOCK_K
    r = tl.arange(0, BLOCK_M)
    rows = m0 + r
    cols = k0 + tl.arange(0, BLOCK_K)
    dy_ptr += m0.to(tl.int64) * stride_dm
    acc = tl.full((BLOCK_M, BLOCK_K), 0.0, tl.float32)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        dy = tl.load(dy_ptr + r[:, None] * stride_dm + ns[None, :] * stride_dn,
                     mask=(rows[:, None] < M) & (ns[None, :] < N), other=0.0).to(DOT_DTYPE)
        n_base = pid * 0 + n0  # a tensor in the interpreter too (its loop variable is an int; _decode_tile casts it)
        w = _decode_tile(w_ptr, w_scale_ptr, n_base, k0 // 2, N, K, ks_padded, BLOCK_N, BLOCK_K).to(DOT_DTYPE)
        acc += tl.dot(dy, w)
    acc = acc * tl.load(gs_ptr)
    dx_ptr += m0.to(tl.int64) * K
    tl.store(dx_ptr + r[:, None] * K + cols[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < K))


# dgrad tiles: BLOCK_K is the output's column tile, BLOCK_N the reduction step (the decoded W tile is
# [BLOCK_N, BLOCK_K], the forward's [BLOCK_N, BLOCK_K] transposed in role). Chosen by the AOT compiles of
# tools.readiness at Wan's shapes (zero spills on sm_80/86/89/90/100/120).
_DGRAD_SMALL = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3)
_DGRAD_LARGE = {"mma.sync": dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
                "wgmma": dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3),
                "tcgen05": dict(BLOCK_M=128, BLOCK_N=32, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)}


def dgrad_config(m: int, capability: tuple[int, int] | None) -> dict:
    """Tile config of the dgrad kernel by M and the target's tensor-core class (None: the interpreter)."""
    if capability is None:
        return dict(_INTERPRETER)
    if m <= 64:
        return dict(_DGRAD_SMALL)
    return dict(_DGRAD_LARGE[mma_class(capability)])


def prepare_dgrad(grad_out, w, w_scale, w_global_scale, capability):
    """(Launch or None when there is nothing to launch, dx [M, K]) of `nvfp4_linear_backward` on grad_out viewed as
    [M, N] (fp16/bf16, any strides); dx is in `dot_dtype` (grad_out's dtype, fp32 for bf16 under the interpreter;
    zeros when N = 0)."""
    if grad_out.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"nvfp4_linear_backward (triton): grad_out must be float16/bfloat16, got {grad_out.dtype}")
    N, K = w.shape[0], w.shape[1] * 2
    dy = grad_out.reshape(-1, N)
    M = dy.shape[0]
    dot = dot_dtype(grad_out.dtype, capability)
    if M == 0 or K == 0 or N == 0:
        return None, torch.zeros((M, K), dtype=dot, device=grad_out.device)
    dx = torch.empty((M, K), dtype=dot, device=grad_out.device)
    cfg = dgrad_config(M, capability)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(K, cfg["BLOCK_K"]),)
    args = (dy, w.contiguous(), _bytes(w_scale), w_global_scale.reshape(1).float(), dx, M, N, K, dy.stride(0),
            dy.stride(1), w_scale.shape[1])
    return _launch(_nvfp4_dgrad_kernel, grid, args, dict(DOT_DTYPE=_TL_DTYPES[dot], **cfg), grad_out.device), dx


def nvfp4_linear_backward(grad_out: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                          w_global_scale: torch.Tensor) -> torch.Tensor:
    """Triton launcher of wan::nvfp4_linear_backward: grad_out [..., N] (fp16/bf16) @ dequant(w [N, K/2]) *
    w_global_scale -> dx [..., K] in grad_out's dtype."""
    launch, dx = prepare_dgrad(grad_out, w, w_scale, w_global_scale, target(grad_out, "nvfp4_linear_backward"))
    if launch is not None:
        run(launch)
    return dx.to(grad_out.dtype).reshape(*grad_out.shape[:-1], w.shape[1] * 2)
