// NVFP4 numerics shared by the C++ CPU kernel, the CUDA kernel and the host unit tests.
//
// Format (REFERENCE.md §5; NVIDIA's NVFP4 as used by CUTLASS sm100 block-scaled GEMMs):
//   value = e2m1(code) * e4m3(block_scale) * global_scale        ("decode" convention)
//   global_scale = amax(x) / (6 * 448)                            (computed by the caller)
//   block_scale  = e4m3_rne(min(block_amax / 6 / global_scale, 448))
//   code         = e2m1_rne(x / (e4m3(block_scale) * global_scale)), saturating at +-6
// One block = 16 consecutive elements along K. Two codes per byte, low nibble first.
//
// Policies (documented in README, tested in tests/test_nvfp4.py):
//   * NaN inputs quantize to code 0 and are ignored by the block amax (fmaxf drops NaN).
//   * +-Inf saturate to +-6; their block scale saturates at 448.
//   * global_scale <= 0 or non-finite, or a block scale that rounds to 0: codes 0 (never NaN).
//   * Negative values that round to zero keep their sign bit (code 0x8), like the hardware cvt.
//
// Everything here is plain float/integer code so CPU and GPU results are bit-identical by
// construction: no fast-math, no hardware cvt instructions, IEEE division.
#pragma once

#include <cstdint>
#include <cmath>

#if defined(__CUDACC__)
#define WAN_HD __host__ __device__ __forceinline__
#define WAN_UNROLL _Pragma("unroll")
#else
#define WAN_HD inline
#define WAN_UNROLL
#endif

namespace wan {
namespace nvfp4 {

constexpr int kBlock = 16;            // elements per block scale
constexpr float kE2M1Max = 6.0f;
constexpr float kE4M3Max = 448.0f;
constexpr int kSfRowTile = 128;       // swizzle atom: 128 rows x 4 scale columns
constexpr int kSfColTile = 4;

WAN_HD uint32_t float_bits(float x) {
  union { float f; uint32_t u; } c;
  c.f = x;
  return c.u;
}

WAN_HD int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// E2M1 code (sign in bit 3) of an fp32 value, round-to-nearest-even, saturating at +-6.
// Grid 0, .5, 1, 1.5, 2, 3, 4, 6 = codes 0..7; ties go to the even code.
WAN_HD uint8_t e2m1_encode(float v) {
  if (v != v) return 0;  // NaN
  const float a = fabsf(v);
  uint8_t c = (a > 0.25f) + (a >= 0.75f) + (a > 1.25f) + (a >= 1.75f) + (a > 2.5f) +
              (a >= 3.5f) + (a > 5.0f);
  const uint8_t sign = (float_bits(v) >> 31) ? 0x8 : 0x0;
  return c | sign;
}

// E2M1 = 1 sign, 2 exponent (bias 1), 1 mantissa bit; exponent 0 is subnormal (0 or 0.5).
// Computed rather than looked up: a table indexed at run time would live in local memory on GPU.
WAN_HD float e2m1_decode(uint8_t code) {
  const int e = (code >> 1) & 0x3, m = code & 0x1;
  const float mag = e == 0 ? 0.5f * m : (1.0f + 0.5f * m) * static_cast<float>(1 << (e - 1));
  return (code & 0x8) ? -mag : mag;
}

// FP8 E4M3 ("fn": no Inf, 0x7F = NaN, max 448) of a non-negative finite fp32, RNE, saturating
// at 448. Matches torch's `.to(torch.float8_e4m3fn)` for inputs in [0, 448].
WAN_HD uint8_t e4m3_encode_nonneg(float x) {
  if (!(x > 0.0f)) return 0;  // zero, negative, NaN
  if (x >= kE4M3Max) return 0x7E;
  const uint32_t bits = float_bits(x);
  const int e = static_cast<int>((bits >> 23) & 0xFF) - 127;
  if (e < -6) {
    // E4M3 subnormal range: multiples of 2^-9. x * 512 is exact, rintf rounds half to even.
    return static_cast<uint8_t>(rintf(x * 512.0f));  // 8 -> 0x08 == 2^-6, the first normal
  }
  const uint32_t mant = bits & 0x7FFFFF;
  uint32_t m = mant >> 20;
  const uint32_t rem = mant & 0xFFFFF;
  if (rem > 0x80000u || (rem == 0x80000u && (m & 1u))) m += 1;  // carry into the exponent is fine
  uint32_t code = (static_cast<uint32_t>(e + 7) << 3) + m;
  return static_cast<uint8_t>(code > 0x7Eu ? 0x7Eu : code);
}

WAN_HD float e4m3_decode(uint8_t code) {
  const int e = (code >> 3) & 0xF;
  const int m = code & 0x7;
  float mag;
  if (e == 0xF && m == 0x7) {
    mag = NAN;
  } else if (e == 0) {
    mag = ldexpf(static_cast<float>(m), -9);
  } else {
    mag = ldexpf(1.0f + static_cast<float>(m) * 0.125f, e - 7);
  }
  return (code & 0x80) ? -mag : mag;
}

WAN_HD bool global_scale_valid(float gs) { return gs > 0.0f && gs <= 3.4028234663852886e38f; }

// Scale byte of one block from its amax (NaN-free, >= 0) and the decode-convention global scale.
WAN_HD uint8_t block_scale_code(float block_amax, float gs) {
  if (!global_scale_valid(gs)) return 0;
  float s = (block_amax / 6.0f) / gs;
  s = fminf(s, kE4M3Max);
  return e4m3_encode_nonneg(s);
}

// Quantize one element given its block's decoded scale (already multiplied by the global scale).
WAN_HD uint8_t quantize_value(float x, float denom) {
  if (!(denom > 0.0f)) return 0;
  return e2m1_encode(x / denom);
}

// Byte offset of scale (m, k) in the 128x4 swizzled layout of a scale matrix whose padded
// column count is ks_padded (multiple of 4). Same layout as CUTLASS SfKMajorAtom / vLLM
// swizzle_blockscale / torchao to_blocked.
WAN_HD int64_t swizzled_offset(int64_t m, int64_t k, int64_t ks_padded) {
  return ((m / 128) * (ks_padded / 4) + k / 4) * 512 + (m % 32) * 16 + ((m % 128) / 32) * 4 + (k % 4);
}

// Quantize one block of 16 fp32 values: writes 8 packed bytes and returns the scale byte.
WAN_HD uint8_t quantize_block(const float* x, float gs, uint8_t* packed) {
  float amax = 0.0f;
WAN_UNROLL
  for (int i = 0; i < kBlock; ++i) amax = fmaxf(amax, fabsf(x[i]));  // fmaxf drops NaN
  const uint8_t sc = block_scale_code(amax, gs);
  const float denom = e4m3_decode(sc) * gs;
WAN_UNROLL
  for (int i = 0; i < kBlock / 2; ++i) {
    const uint8_t lo = quantize_value(x[2 * i], denom);
    const uint8_t hi = quantize_value(x[2 * i + 1], denom);
    packed[i] = static_cast<uint8_t>(lo | (hi << 4));
  }
  return sc;
}

}  // namespace nvfp4
}  // namespace wan
