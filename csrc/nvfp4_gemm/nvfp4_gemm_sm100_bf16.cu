// CUTLASS sm100a NVFP4 GEMM instantiations with cutlass::bfloat16_t output (see nvfp4_gemm_sm100.cuh).
#include "nvfp4_gemm/nvfp4_gemm_sm100.cuh"

namespace wan {
namespace nvfp4_gemm {

size_t workspace_size_bf16(const Params& p) { return detail::workspace_size<cutlass::bfloat16_t>(p); }

const char* run_bf16(const Params& p, void* workspace, cudaStream_t stream) {
  return detail::run<cutlass::bfloat16_t>(p, workspace, stream);
}

}  // namespace nvfp4_gemm
}  // namespace wan
