// Launcher of wan::nvfp4_gemm_sm100, the CUTLASS backend of wan::nvfp4_gemm on compute capability
// 10.0 (B200/GB200): checks, device guard, stream, alpha = a_gs * b_gs on the device, workspace,
// optional bias. The routing sends wan::nvfp4_gemm here on sm_100 only (wan_kernels/routing.py).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/types.h>

#include "nvfp4/nvfp4_checks.h"
#include "wan_build_info.h"

#if WAN_BUILD_SM100_GEMM
#include "nvfp4_gemm/nvfp4_gemm_sm100.h"

namespace wan {
namespace {

torch::Tensor nvfp4_gemm_sm100(const torch::Tensor& a, const torch::Tensor& a_scale, const torch::Tensor& a_global_scale,
                               const torch::Tensor& b, const torch::Tensor& b_scale, const torch::Tensor& b_global_scale,
                               const std::optional<torch::Tensor>& bias, at::ScalarType out_dtype) {
  check_gemm_args(a, a_scale, a_global_scale, b, b_scale, b_global_scale, bias, out_dtype);
  TORCH_CHECK(out_dtype == torch::kBFloat16 || out_dtype == torch::kFloat16,
              "nvfp4_gemm (CUTLASS sm100): out_dtype must be bfloat16 or float16, got ", out_dtype);
  const c10::cuda::CUDAGuard guard(a.device());
  const auto cap = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(cap->major == 10 && cap->minor == 0, "nvfp4_gemm (CUTLASS sm100a) needs compute capability 10.0, got ",
              cap->major, ".", cap->minor);
  const int64_t M = a.size(0), N = b.size(0), K = a.size(1) * 2;
  TORCH_CHECK(K % 32 == 0 && N % 8 == 0, "nvfp4_gemm (CUTLASS sm100): needs K % 32 == 0 and N % 8 == 0 "
              "(32-element operand / 16-byte output alignment), got M=", M, " N=", N, " K=", K);
  auto out = torch::empty({M, N}, a.options().dtype(out_dtype));
  if (M == 0 || N == 0) return out;
  auto alpha = (a_global_scale.reshape({}) * b_global_scale.reshape({})).to(torch::kFloat32);
  // The kernel reads every operand as a dense buffer: contiguous copies (of strided inputs only), held until
  // the GEMM is enqueued (a temporary's memory could be handed to the workspace below).
  const auto a_c = a.contiguous(), b_c = b.contiguous(), sfa = a_scale.contiguous(), sfb = b_scale.contiguous();
  nvfp4_gemm::Params p{};
  p.a = a_c.data_ptr<uint8_t>();
  p.b = b_c.data_ptr<uint8_t>();
  p.sfa = reinterpret_cast<const uint8_t*>(sfa.data_ptr());
  p.sfb = reinterpret_cast<const uint8_t*>(sfb.data_ptr());
  p.alpha = alpha.data_ptr<float>();
  p.d = out.data_ptr();
  p.m = static_cast<int>(M);
  p.n = static_cast<int>(N);
  p.k = static_cast<int>(K);
  p.out_dtype = out_dtype == torch::kBFloat16 ? nvfp4_gemm::OutDtype::kBFloat16 : nvfp4_gemm::OutDtype::kFloat16;
  p.tile = nvfp4_gemm::pick_tile(p.m);
  const size_t ws = nvfp4_gemm::workspace_size(p);
  TORCH_CHECK(ws != SIZE_MAX, "nvfp4_gemm (CUTLASS sm100): problem M=", M, " N=", N, " K=", K, " not supported");
  auto workspace = torch::empty({static_cast<int64_t>(ws)}, a.options().dtype(torch::kUInt8));
  const char* err = nvfp4_gemm::run(p, workspace.data_ptr(), at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == nullptr, "nvfp4_gemm (CUTLASS sm100): ", err);
  if (bias.has_value()) out.add_(bias->to(out_dtype));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(wan, CUDA, m) { m.impl("nvfp4_gemm_sm100", &nvfp4_gemm_sm100); }

}  // namespace wan
#endif  // WAN_BUILD_SM100_GEMM
