// Deterministic reduction of fp32 partial-sum buffers, shared by the C++ CPU backward kernels.
#pragma once

#include <ATen/Parallel.h>
#include <torch/types.h>

namespace wan {

// buf: fp32 [B, R, C] contiguous -> [B or 1, 1 or R, C]: summed over R (over_rows) and / or over B (over_batch), in
// index order for every output element whatever the thread count (threads split the C axis only); buf itself when
// neither.
inline torch::Tensor ordered_sum(const torch::Tensor& buf, bool over_rows, bool over_batch) {
  if (!over_rows && !over_batch) return buf;
  const int64_t B = buf.size(0), R = buf.size(1), C = buf.size(2);
  const int64_t Ro = over_rows ? 1 : R;
  auto out = torch::zeros({over_batch ? 1 : B, Ro, C}, buf.options());
  const float* in = buf.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, C, 256, [&](int64_t c0, int64_t c1) {
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t r = 0; r < R; ++r) {
        const float* src = in + (b * R + r) * C;
        float* dst = o + ((over_batch ? 0 : b) * Ro + (over_rows ? 0 : r)) * C;
        for (int64_t c = c0; c < c1; ++c) dst[c] += src[c];
      }
    }
  });
  return out;
}

}  // namespace wan
