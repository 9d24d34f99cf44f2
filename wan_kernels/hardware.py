"""Peak throughput of the GPUs this package targets: the one table the benchmarks, the cost model and the
GPU check read (REFERENCE.md section 6); and what their MMAs impose on 8-bit attention (`default_pv`, `pv_acc16`,
`empty_v8`, the ranges of V's codes)."""

from __future__ import annotations

import torch

# Dense peaks from vendor spec sheets (no sparsity): TFLOP/s bf16 (tensor cores, fp32 accumulate),
# TFLOP/s fp4 (0 = no FP4 tensor cores), HBM/GDDR bandwidth GB/s.
PEAKS = {
    "H100": {"bf16": 989.0, "fp4": 0.0, "gbps": 3350.0},
    "H200": {"bf16": 989.0, "fp4": 0.0, "gbps": 4800.0},
    "B200": {"bf16": 2250.0, "fp4": 9000.0, "gbps": 7670.0},
    "A100": {"bf16": 312.0, "fp4": 0.0, "gbps": 2039.0},
    "RTX 5090": {"bf16": 209.5, "fp4": 1676.0, "gbps": 1792.0},
    "RTX 4090": {"bf16": 165.2, "fp4": 0.0, "gbps": 1008.0},   # Ada whitepaper: FP16 tensor, FP32 accumulate
}


def gpu_peak(name: str | None = None) -> tuple[str, dict] | None:
    """The peak-table entry of the current (or named) GPU, matched by substring of its name."""
    if name is None:
        if not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name()
    for key, peak in PEAKS.items():
        if key.replace(" ", "").lower() in name.replace(" ", "").lower():
            return key, peak
    return None


# The first compute capability with FP8 (e4m3) tensor-core MMAs (Ada, sm_89; Hopper, Blackwell after it).
FP8_MMA_CAPABILITY = (8, 9)


def default_pv(capability: tuple[int, int] | None) -> str:
    """The P.V precision `pv="auto"` of wan::attention_int8 means on a device class: "fp8" (e4m3 P and V) where
    the GPU has FP8 MMAs (sm_89 and later), "fp16" below (sm_80/86). None (CPU: the reference, the Triton
    interpreter) is "fp8": the CPU emulates what the fp8 GPUs run, the accuracy most users get."""
    return "fp8" if capability is None or tuple(capability) >= FP8_MMA_CAPABILITY else "fp16"


# The largest finite float8_e4m3fn (P's row max in 8-bit attention, NVFP4's block-scale range) and float16 (the
# range of an fp16 MMA accumulator, `pv_acc16`).
E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)
FP16_MAX = float(torch.finfo(torch.float16).max)
# bytes: an e4m3 V's (batch, head, channel) rows of tokens start at multiples of 16 (`empty_v8`)
V8_ROW = 16
# An e4m3 V's per-channel range: |v8| <= 1.75 = 448 / 2^8, the grid of amax/448 shifted by a power of two (the same
# rounding except below 2^-6, 0.9 % of the channel's amax), so that a 64-key tile's P.V (P up to 448) fits an fp16
# accumulator (`pv_acc16`): 64 x 448 x 1.75 = 50,176 < 65,504.
# (SageAttention2++ scales to 2.25, 64,512: another grid, measured no more accurate, and less headroom.)
V_E4M3_MAX = 1.75
# An fp16 V's per-channel range: V is divided by a power of two (exact) when its amax passes 512, so that a 64-key
# tile's P.V (P <= 1) fits an fp16 accumulator: 64 x 512 = 32,768 < 65,504.
FP16_V_MAX = 512.0


def empty_v8(B: int, S: int, H: int, Dv: int, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised quantized V [B, S, H, Dv] in the layout every backend returns and the kernel reads fastest.
    float8_e4m3fn: token-contiguous, strides (H Dv S', 1, Dv S', S') with S' = S rounded up to V8_ROW: the P.V
    MMA's B operand is K-major (K = tokens), the only layout mma.sync m16n8k32 / wgmma / tcgen05 take for 8-bit
    types; channel-contiguous, each key tile's B fragments were gathered byte by byte from shared memory (sm_89 /
    sm_120: 256 LDS.U8 + 208 PRMT per warp and tile of 64 keys at head_dim 128) or transposed into it with byte
    stores (sm_90: 32 STS.U8). float16: contiguous (ldmatrix.trans / wgmma take 16-bit operands either way)."""
    if dtype != torch.float8_e4m3fn:
        return torch.empty((B, S, H, Dv), dtype=dtype, device=device)
    Sp = -(-S // V8_ROW) * V8_ROW
    return torch.empty_strided((B, S, H, Dv), (H * Dv * Sp, 1, Dv * Sp, Sp), dtype=dtype, device=device)


def pv_acc16(capability: tuple[int, int] | None) -> bool:
    """Whether 8-bit attention's P.V (fp8 or fp16) accumulates each key tile in fp16 on this device class: the
    mma.sync GPUs of the GeForce line (sm_86 Ampere, sm_89 Ada, sm_12x Blackwell; their workstation siblings lose
    nothing by it), which run fp8 / fp16 MMAs into fp32 at half rate (RTX 4090: fp8 330 vs 660 TFLOP/s, the int8
    Q.K^T's rate; RTX 3090: fp16 71 vs 142, int8 284): with fp32 accumulation P.V would bound the kernel at
    2 / (1 / 660 + 1 / 330) = 440 TOPS on an RTX 4090, below SageAttention2++'s ~490 (which accumulates in fp16
    too). Each tile's product is then added into the fp32 total (two-level), so an fp16 sum spans at most 64 keys
    of codes bounded for it (V_E4M3_MAX, FP16_V_MAX). sm_80 (A100), sm_90 / sm_100 (full-rate fp32 accumulation)
    and the CPU (None): fp32."""
    if capability is None:
        return False
    cap = tuple(capability)
    return (8, 6) <= cap < (9, 0) or cap[0] == 12
