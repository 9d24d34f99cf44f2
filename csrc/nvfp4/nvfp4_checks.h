// Argument checks shared by the CPU and CUDA launchers of the NVFP4 ops.
// Messages quote the argument name, its shape and dtype.
#pragma once

#include <torch/types.h>

#include "nvfp4/nvfp4_numerics.h"

namespace wan {

inline void check_global_scale(const torch::Tensor& gs, const torch::Tensor& like) {
  TORCH_CHECK(gs.numel() == 1 && gs.scalar_type() == torch::kFloat32,
              "global_scale must be a 1-element float32 tensor, got shape ", gs.sizes(), " dtype ",
              gs.scalar_type());
  TORCH_CHECK(gs.device() == like.device(), "global_scale is on ", gs.device(), " but the data is on ",
              like.device());
}

inline void check_quantize_args(const torch::Tensor& x, const torch::Tensor& global_scale) {
  TORCH_CHECK(x.dim() == 2, "nvfp4_quantize: x must be 2-D [M, K], got shape ", x.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == torch::kFloat32 || dt == torch::kFloat16 || dt == torch::kBFloat16,
              "nvfp4_quantize: x must be float32/float16/bfloat16, got ", dt);
  TORCH_CHECK(x.size(1) % nvfp4::kBlock == 0, "nvfp4_quantize: K (x.shape[1]) must be a multiple of 16, got shape ",
              x.sizes());
  check_global_scale(global_scale, x);
}

inline void check_dequantize_args(const torch::Tensor& packed, const torch::Tensor& block_scale,
                                  const torch::Tensor& global_scale, at::ScalarType dtype) {
  TORCH_CHECK(dtype == torch::kFloat32 || dtype == torch::kFloat16 || dtype == torch::kBFloat16,
              "nvfp4_dequantize: dtype must be float32/float16/bfloat16, got ", dtype);
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == torch::kUInt8,
              "nvfp4_dequantize: packed must be 2-D uint8 [M, K/2], got shape ", packed.sizes(), " dtype ",
              packed.scalar_type());
  TORCH_CHECK((packed.size(1) * 2) % nvfp4::kBlock == 0,
              "nvfp4_dequantize: K = 2 * packed.shape[1] must be a multiple of 16, got packed shape ", packed.sizes());
  const int64_t M = packed.size(0), ks = packed.size(1) * 2 / nvfp4::kBlock;
  TORCH_CHECK(block_scale.scalar_type() == torch::kFloat8_e4m3fn,
              "nvfp4_dequantize: block_scale must be float8_e4m3fn, got ", block_scale.scalar_type());
  TORCH_CHECK(block_scale.dim() == 2 && block_scale.size(0) == nvfp4::round_up(M, nvfp4::kSfRowTile) &&
                  block_scale.size(1) == nvfp4::round_up(ks, nvfp4::kSfColTile),
              "nvfp4_dequantize: block_scale must have shape [", nvfp4::round_up(M, nvfp4::kSfRowTile), ", ",
              nvfp4::round_up(ks, nvfp4::kSfColTile), "] (swizzled, padded) for packed shape ", packed.sizes(),
              ", got ", block_scale.sizes());
  TORCH_CHECK(block_scale.device() == packed.device(), "nvfp4_dequantize: block_scale is on ",
              block_scale.device(), " but packed is on ", packed.device());
  check_global_scale(global_scale, packed);
}

inline void check_gemm_args(const torch::Tensor& a, const torch::Tensor& a_scale, const torch::Tensor& a_global_scale,
                            const torch::Tensor& b, const torch::Tensor& b_scale, const torch::Tensor& b_global_scale,
                            const std::optional<torch::Tensor>& bias, at::ScalarType out_dtype) {
  check_dequantize_args(a, a_scale, a_global_scale, out_dtype);
  check_dequantize_args(b, b_scale, b_global_scale, out_dtype);
  TORCH_CHECK(a.size(1) == b.size(1), "nvfp4_gemm: a ", a.sizes(), " and b ", b.sizes(),
              " disagree on K; b is [N, K/2]");
  TORCH_CHECK(b.device() == a.device(), "nvfp4_gemm: b is on ", b.device(), " but a is on ", a.device());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == b.size(0), "nvfp4_gemm: bias must be [", b.size(0),
                "], got shape ", bias->sizes());
    TORCH_CHECK(bias->device() == a.device(), "nvfp4_gemm: bias is on ", bias->device(), " but a is on ", a.device());
  }
}

}  // namespace wan
