// Torch-free host API of the CUTLASS sm100a block-scaled NVFP4 GEMM (W4A4).
//   D[M, N] = alpha * (A_q @ B_q^T), A_q = e2m1(A) * sfa, B_q = e2m1(B) * sfb, fp32 accumulate.
// A: packed E2M1 [M, K/2] row-major (K-major); B: packed E2M1 [N, K/2] row-major (K-major, i.e. a
// column-major K x N operand); sfa/sfb: E4M3 scales in the 128x4 swizzled layout of
// csrc/nvfp4/nvfp4_numerics.h (== CUTLASS Sm1xxBlockScaledConfig<16>::tile_atom_to_shape_SF{A,B});
// alpha read on the device (a_global_scale * b_global_scale, decode convention); D row-major.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace wan {
namespace nvfp4_gemm {

enum class OutDtype { kBFloat16 = 0, kFloat16 = 1 };

// Tile configurations, chosen by M like the peers (vLLM, FlashInfer): a 1-SM 128x128x256 tile for
// small M (decode-like shapes), a 2-SM 256x256x256 tile with a 2x4 cluster for large M.
enum class Tile { k128x128x256_1sm = 0, k256x256x256_2sm = 1 };

struct Params {
  const uint8_t* a;      // [M, K/2]
  const uint8_t* b;      // [N, K/2]
  const uint8_t* sfa;    // swizzled, [roundup(M,128) * roundup(K/16,4)]
  const uint8_t* sfb;    // swizzled, [roundup(N,128) * roundup(K/16,4)]
  const float* alpha;    // device scalar
  void* d;               // [M, N]
  int m, n, k;
  OutDtype out_dtype;
  Tile tile;
};

inline Tile pick_tile(int m) { return m <= 256 ? Tile::k128x128x256_1sm : Tile::k256x256x256_2sm; }

// One translation unit per output dtype (compiled in parallel, sm_100a only).
size_t workspace_size_bf16(const Params& p);
const char* run_bf16(const Params& p, void* workspace, cudaStream_t stream);
size_t workspace_size_f16(const Params& p);
const char* run_f16(const Params& p, void* workspace, cudaStream_t stream);

// Bytes of workspace the kernel needs, or SIZE_MAX when CUTLASS cannot run the problem (alignment).
inline size_t workspace_size(const Params& p) {
  return p.out_dtype == OutDtype::kBFloat16 ? workspace_size_bf16(p) : workspace_size_f16(p);
}

// Runs the GEMM on `stream`. Returns nullptr on success, else a static error string.
inline const char* run(const Params& p, void* workspace, cudaStream_t stream) {
  return p.out_dtype == OutDtype::kBFloat16 ? run_bf16(p, workspace, stream) : run_f16(p, workspace, stream);
}

}  // namespace nvfp4_gemm
}  // namespace wan
