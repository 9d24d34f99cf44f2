// CUDA launchers of wan::nvfp4_quantize / wan::nvfp4_dequantize.
// One thread per 16-element block: it reads the block (any strides), computes the block amax and
// scale, and writes 8 packed bytes plus one scale byte at its swizzled offset. The numerics are the
// __host__ __device__ functions of nvfp4_numerics.h, so the result is bit-identical to the C++ CPU
// kernel that the tests run. The global scale is read on the device (no host sync).
// Trade-off: this is a memory-bound kernel whose reads are 16 strided elements per thread; it is the
// portable baseline. The Triton kernel of the same op is the vectorised fast path.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/types.h>

#include "common/dispatch.h"
#include "nvfp4/nvfp4_checks.h"
#include "nvfp4/nvfp4_numerics.h"

namespace wan {
namespace {

using namespace wan::nvfp4;

template <typename T>
__global__ void nvfp4_quantize_kernel(const T* __restrict__ x, int64_t M, int64_t K, int64_t stride_m,
                                      int64_t stride_k, const float* __restrict__ global_scale,
                                      uint8_t* __restrict__ packed, uint8_t* __restrict__ scale,
                                      int64_t ks_padded) {
  const int64_t ks = K / kBlock;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= M * ks) return;
  const int64_t m = idx / ks, kb = idx % ks;
  float buf[kBlock];
  const T* src = x + m * stride_m + kb * kBlock * stride_k;
#pragma unroll
  for (int i = 0; i < kBlock; ++i) buf[i] = static_cast<float>(src[i * stride_k]);
  // Packed bytes go straight to global memory: a local staging array would live on the stack.
  scale[swizzled_offset(m, kb, ks_padded)] =
      quantize_block(buf, *global_scale, packed + m * (K / 2) + kb * (kBlock / 2));
}

template <typename T>
__global__ void nvfp4_dequantize_kernel(const uint8_t* __restrict__ packed, const uint8_t* __restrict__ scale,
                                        const float* __restrict__ global_scale, T* __restrict__ out, int64_t M,
                                        int64_t K, int64_t ks_padded) {
  const int64_t ks = K / kBlock;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= M * ks) return;
  const int64_t m = idx / ks, kb = idx % ks;
  const float s = e4m3_decode(scale[swizzled_offset(m, kb, ks_padded)]);
  const float gs = *global_scale;
  const uint8_t* src = packed + m * (K / 2) + kb * (kBlock / 2);
  T* dst = out + m * K + kb * kBlock;
#pragma unroll
  for (int i = 0; i < kBlock / 2; ++i) {
    const uint8_t byte = src[i];
    dst[2 * i] = static_cast<T>((e2m1_decode(byte & 0xF) * s) * gs);
    dst[2 * i + 1] = static_cast<T>((e2m1_decode(byte >> 4) * s) * gs);
  }
}

constexpr int kThreads = 256;

std::tuple<torch::Tensor, torch::Tensor> nvfp4_quantize_cuda(const torch::Tensor& x,
                                                             const torch::Tensor& global_scale) {
  check_quantize_args(x, global_scale);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t ks_padded = round_up(K / kBlock, kSfColTile);
  auto packed = torch::empty({M, K / 2}, x.options().dtype(torch::kUInt8));
  auto scale = torch::zeros({round_up(M, kSfRowTile), ks_padded}, x.options().dtype(torch::kUInt8));
  const int64_t n = M * (K / kBlock);
  if (n > 0) {
    auto gs = global_scale.reshape({1});
    auto stream = at::cuda::getCurrentCUDAStream();
    const unsigned grid = static_cast<unsigned>((n + kThreads - 1) / kThreads);
    WAN_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "nvfp4_quantize_cuda", [&] {
      nvfp4_quantize_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), M, K, x.stride(0), x.stride(1), gs.data_ptr<float>(),
          packed.data_ptr<uint8_t>(), scale.data_ptr<uint8_t>(), ks_padded);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {packed, scale.view(torch::kFloat8_e4m3fn)};
}

torch::Tensor nvfp4_dequantize_cuda(const torch::Tensor& packed, const torch::Tensor& block_scale,
                                    const torch::Tensor& global_scale, at::ScalarType dtype) {
  check_dequantize_args(packed, block_scale, global_scale, dtype);
  const c10::cuda::CUDAGuard guard(packed.device());
  const int64_t M = packed.size(0), K = packed.size(1) * 2;
  auto out = torch::empty({M, K}, packed.options().dtype(dtype));
  const int64_t n = M * (K / kBlock);
  if (n > 0) {
    auto pk = packed.contiguous();
    auto sc = block_scale.contiguous().view(torch::kUInt8);
    auto gs = global_scale.reshape({1});
    auto stream = at::cuda::getCurrentCUDAStream();
    const unsigned grid = static_cast<unsigned>((n + kThreads - 1) / kThreads);
    WAN_DISPATCH_FLOAT_HALF_BF16(dtype, "nvfp4_dequantize_cuda", [&] {
      nvfp4_dequantize_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
          pk.data_ptr<uint8_t>(), sc.data_ptr<uint8_t>(), gs.data_ptr<float>(), out.data_ptr<scalar_t>(), M, K,
          block_scale.size(1));
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

}  // namespace

// On internal ops: wan::nvfp4_quantize/nvfp4_dequantize route here only where this build's code runs
// (wan_kernels/routing.py).
TORCH_LIBRARY_IMPL(wan, CUDA, m) {
  m.impl("nvfp4_quantize_cuda", &nvfp4_quantize_cuda);
  m.impl("nvfp4_dequantize_cuda", &nvfp4_dequantize_cuda);
}

}  // namespace wan
