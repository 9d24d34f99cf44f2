// Torch-free per-token kernel of wan::qk_norm_rope (host code; the CPU launcher runs it over tokens).
//
// For one token with channels qkv = [q | k | v], each of C = H * D channels:
//   q' = q * rsqrt(mean(q^2) + eps) * w_q        (RMSNorm over all C channels: across heads, as Wan)
//   k' = k * rsqrt(mean(k^2) + eps) * w_k
//   RoPE on interleaved pairs of every head, angle index i in [0, D/2):
//     out[2i]   = x[2i] * cos_i - x[2i+1] * sin_i
//     out[2i+1] = x[2i] * sin_i + x[2i+1] * cos_i
//   v is copied. All math in fp32, one rounding to T at the store (diffusers rounds twice in bf16:
//   after the norm and after the rotation; in fp32 the two agree).
#pragma once

#include <cmath>
#include <cstdint>

namespace wan {
namespace qk_norm_rope {

// Sum of squares with 8 independent accumulators (vectorises; fp32 like F.rms_norm's internals).
template <typename T>
inline float sum_squares(const T* x, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) {
      const float v = static_cast<float>(x[i + j]);
      acc[j] += v * v;
    }
  }
  for (; i < n; ++i) {
    const float v = static_cast<float>(x[i]);
    acc[0] += v * v;
  }
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

// Normalise one C-channel row with weight w and rotate every head's pairs; writes C values to out.
template <typename T>
inline void norm_rope_row(const T* x, const float* w, const float* cos, const float* sin, int64_t C, int64_t D,
                          float eps, T* out) {
  const float r = 1.0f / std::sqrt(sum_squares(x, C) / static_cast<float>(C) + eps);
  const int64_t half = D / 2;
  for (int64_t h0 = 0; h0 < C; h0 += D) {
    for (int64_t i = 0; i < half; ++i) {
      const int64_t c = h0 + 2 * i;
      const float a = static_cast<float>(x[c]) * r * w[c];
      const float b = static_cast<float>(x[c + 1]) * r * w[c + 1];
      out[c] = static_cast<T>(a * cos[i] - b * sin[i]);
      out[c + 1] = static_cast<T>(a * sin[i] + b * cos[i]);
    }
  }
}

}  // namespace qk_norm_rope
}  // namespace wan
