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

// Backward of norm_rope_row for one row x (C channels) and the gradient g of its output: writes dx (C values,
// rounded once to T) and adds gy * n into the fp32 accumulator dw (C values); gy: scratch of C floats.
//   gy = RoPE^T(g) (rotation by -angle): gy[2i] = g[2i] cos_i + g[2i+1] sin_i, gy[2i+1] = g[2i+1] cos_i - g[2i] sin_i
//   r = rsqrt(mean(x^2) + eps) (recomputed, not saved), n = x * r, gn = gy * w
//   dx = r * (gn - n * mean(gn * n)),   mean(gn * n) = r * sum(gy * w * x) / C,   dw += gy * n
template <typename T>
inline void norm_rope_row_backward(const T* x, const T* g, const float* w, const float* cos, const float* sin,
                                   int64_t C, int64_t D, float eps, T* dx, float* dw, float* gy) {
  const int64_t half = D / 2;
  for (int64_t h0 = 0; h0 < C; h0 += D) {
    for (int64_t i = 0; i < half; ++i) {
      const int64_t c = h0 + 2 * i;
      const float a = static_cast<float>(g[c]), b = static_cast<float>(g[c + 1]);
      gy[c] = a * cos[i] + b * sin[i];
      gy[c + 1] = b * cos[i] - a * sin[i];
    }
  }
  const float r = 1.0f / std::sqrt(sum_squares(x, C) / static_cast<float>(C) + eps);
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t c = 0;
  for (; c + 8 <= C; c += 8) {
    for (int j = 0; j < 8; ++j) acc[j] += gy[c + j] * w[c + j] * static_cast<float>(x[c + j]);
  }
  for (; c < C; ++c) acc[0] += gy[c] * w[c] * static_cast<float>(x[c]);
  const float dot = (((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))) * r /
                    static_cast<float>(C);
  for (c = 0; c < C; ++c) {
    const float n = static_cast<float>(x[c]) * r;
    const float gn = gy[c] * w[c];
    dx[c] = static_cast<T>(r * (gn - n * dot));
    dw[c] += gy[c] * n;
  }
}

}  // namespace qk_norm_rope
}  // namespace wan
