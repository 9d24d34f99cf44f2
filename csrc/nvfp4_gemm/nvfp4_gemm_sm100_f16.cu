// CUTLASS sm100a NVFP4 GEMM instantiations with cutlass::half_t output (see nvfp4_gemm_sm100.cuh).
#include "nvfp4_gemm/nvfp4_gemm_sm100.cuh"

namespace wan {
namespace nvfp4_gemm {

size_t workspace_size_f16(const Params& p) { return detail::workspace_size<cutlass::half_t>(p); }

const char* run_f16(const Params& p, void* workspace, cudaStream_t stream) {
  return detail::run<cutlass::half_t>(p, workspace, stream);
}

}  // namespace nvfp4_gemm
}  // namespace wan
