// Host test (nvcc, no GPU): the scale-factor layouts our CUTLASS sm100 GEMM passes to CUTLASS — built
// by Sm100Nvfp4Gemm::arguments() from CuTe's Sm1xxBlockScaledConfig::tile_atom_to_shape_SF{A,B} —
// address exactly the bytes where our quantizers write each block scale (swizzled_offset), for every
// element of several M, N, K; and the operand strides are K-major as the launcher lays them out.
#include <cstdio>
#include <vector>

#include "nvfp4/nvfp4_numerics.h"
#include "nvfp4_gemm/nvfp4_gemm_sm100.cuh"
#include "tests/check.h"

using namespace wan::nvfp4_gemm;
using wan::nvfp4::round_up;
using wan::nvfp4::swizzled_offset;

template <typename G>
void check_config(const char* name) {
  const int shapes[][3] = {{1, 8, 64}, {130, 64, 64}, {257, 136, 256}, {128, 512, 512}, {300, 200, 1056}};
  for (auto& s : shapes) {
    Params p{};
    p.m = s[0];
    p.n = s[1];
    p.k = s[2];
    const auto args = G::arguments(p);
    const auto lsfa = args.mainloop.layout_SFA;
    const auto lsfb = args.mainloop.layout_SFB;
    const int64_t ksp = round_up(p.k / 16, 4);
    long bad = 0;
    for (int m = 0; m < p.m; ++m)
      for (int k = 0; k < p.k; ++k) bad += lsfa(m, k, 0) != swizzled_offset(m, k / 16, ksp);
    for (int n = 0; n < p.n; ++n)
      for (int k = 0; k < p.k; ++k) bad += lsfb(n, k, 0) != swizzled_offset(n, k / 16, ksp);
    WAN_CHECK(bad == 0, "%s M=%d N=%d K=%d: %ld scale positions differ from swizzled_offset", name, p.m, p.n, p.k, bad);
    WAN_CHECK(cute::cosize(lsfa) == round_up(p.m, 128) * ksp, "%s SFA cosize %d vs padded %ld", name,
              int(cute::cosize(lsfa)), long(round_up(p.m, 128) * ksp));
    WAN_CHECK(cute::cosize(lsfb) == round_up(p.n, 128) * ksp, "%s SFB cosize", name);
    // K-major operands: consecutive k are adjacent, rows are K elements apart (A [M, K], B [N, K]).
    WAN_CHECK(cute::get<0>(args.mainloop.dA) == p.k && cute::get<0>(args.mainloop.dB) == p.k, "%s strides", name);
    WAN_CHECK(cute::get<0>(args.epilogue.dD) == p.n, "%s D row-major stride", name);
  }
}

int main() {
  using namespace wan::nvfp4_gemm::detail;
  check_config<Sm100Nvfp4Gemm<cutlass::bfloat16_t, Tile1Sm, Cluster1Sm>>("bf16 128x128x256 1sm");
  check_config<Sm100Nvfp4Gemm<cutlass::bfloat16_t, Tile2Sm, Cluster2Sm>>("bf16 256x256x256 2sm");
  check_config<Sm100Nvfp4Gemm<cutlass::half_t, Tile1Sm, Cluster1Sm>>("f16 128x128x256 1sm");
  return report("test_nvfp4_gemm_args");
}
