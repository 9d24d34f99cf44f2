// CPU launchers of wan::nvfp4_quantize / wan::nvfp4_dequantize (parallel over rows).
// The numerics live in nvfp4_numerics.h and are shared with the CUDA kernel.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include "common/dispatch.h"
#include "nvfp4/nvfp4_checks.h"
#include "nvfp4/nvfp4_numerics.h"

namespace wan {
namespace {

using namespace wan::nvfp4;

template <typename T>
void quantize_rows(const torch::Tensor& x, float gs, uint8_t* packed, uint8_t* scale,
                   int64_t ks_padded) {
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t row_stride = x.stride(0), col_stride = x.stride(1);
  const T* xp = x.data_ptr<T>();
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    float buf[kBlock];
    for (int64_t m = m0; m < m1; ++m) {
      const T* row = xp + m * row_stride;
      for (int64_t kb = 0; kb < K / kBlock; ++kb) {
        for (int i = 0; i < kBlock; ++i) buf[i] = static_cast<float>(row[(kb * kBlock + i) * col_stride]);
        scale[swizzled_offset(m, kb, ks_padded)] =
            quantize_block(buf, gs, packed + m * (K / 2) + kb * (kBlock / 2));
      }
    }
  });
}

std::tuple<torch::Tensor, torch::Tensor> nvfp4_quantize_cpu(const torch::Tensor& x,
                                                            const torch::Tensor& global_scale) {
  check_quantize_args(x, global_scale);
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t ks_padded = round_up(K / kBlock, kSfColTile);
  auto packed = torch::empty({M, K / 2}, x.options().dtype(torch::kUInt8));
  auto scale = torch::zeros({round_up(M, kSfRowTile), ks_padded}, x.options().dtype(torch::kUInt8));
  const float gs = global_scale.to(torch::kFloat32).item<float>();
  WAN_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "nvfp4_quantize_cpu", [&] {
    quantize_rows<scalar_t>(x, gs, packed.data_ptr<uint8_t>(), scale.data_ptr<uint8_t>(), ks_padded);
  });
  return {packed, scale.view(torch::kFloat8_e4m3fn)};
}

torch::Tensor nvfp4_dequantize_cpu(const torch::Tensor& packed, const torch::Tensor& block_scale,
                                   const torch::Tensor& global_scale, at::ScalarType dtype) {
  check_dequantize_args(packed, block_scale, global_scale, dtype);
  const int64_t M = packed.size(0), K = packed.size(1) * 2;
  const int64_t ks_padded = block_scale.size(1);
  auto out32 = torch::empty({M, K}, packed.options().dtype(torch::kFloat32));
  const float gs = global_scale.to(torch::kFloat32).item<float>();
  auto pk = packed.contiguous();
  auto sc = block_scale.contiguous().view(torch::kUInt8);
  const uint8_t* pp = pk.data_ptr<uint8_t>();
  const uint8_t* sp = sc.data_ptr<uint8_t>();
  float* op = out32.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      for (int64_t kb = 0; kb < K / kBlock; ++kb) {
        const float s = e4m3_decode(sp[swizzled_offset(m, kb, ks_padded)]);
        for (int i = 0; i < kBlock / 2; ++i) {
          const uint8_t byte = pp[m * (K / 2) + kb * (kBlock / 2) + i];
          op[m * K + kb * kBlock + 2 * i] = (e2m1_decode(byte & 0xF) * s) * gs;
          op[m * K + kb * kBlock + 2 * i + 1] = (e2m1_decode(byte >> 4) * s) * gs;
        }
      }
    }
  });
  return dtype == torch::kFloat32 ? out32 : out32.to(dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(wan, CPU, m) {
  m.impl("nvfp4_quantize", &nvfp4_quantize_cpu);
  m.impl("nvfp4_dequantize", &nvfp4_dequantize_cpu);
}

}  // namespace wan
