// CUTLASS sm100a block-scaled NVFP4 GEMM (tcgen05.mma.blockscaled), torch-free.
//
// Structure follows CUTLASS example 72a (Blackwell NVFP4 -> BF16 GEMM): nv_float4_t<float_e2m1_t>
// operands with 32-element alignment, A row-major / B column-major (both K-major), fp32 accumulate,
// KernelScheduleAuto, epilogue D = alpha * acc with alpha read from device memory (no host sync).
// Included by one .cu per output dtype; those are compiled for sm_100a ONLY (setup.py
// ARCH_SPECIFIC_SOURCES: the most expensive files of the build, whose kernels run nowhere else).
// Bias is added by the launcher.
#pragma once

#include "nvfp4_gemm/nvfp4_gemm_sm100.h"

#include <climits>
#include <cstdint>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/detail/sm100_blockscaled_layout.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

namespace wan {
namespace nvfp4_gemm {
namespace detail {

using namespace cute;

template <typename ElementD, typename MmaTileShape, typename ClusterShape>
struct Sm100Nvfp4Gemm {
  using ElementA = cutlass::nv_float4_t<cutlass::float_e2m1_t>;
  using ElementB = cutlass::nv_float4_t<cutlass::float_e2m1_t>;
  using LayoutATag = cutlass::layout::RowMajor;
  using LayoutBTag = cutlass::layout::ColumnMajor;
  using LayoutDTag = cutlass::layout::RowMajor;
  static constexpr int kAlignAB = 32;
  static constexpr int kAlignD = 128 / cutlass::sizeof_bits<ElementD>::value;
  using ElementAccumulator = float;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm100, cutlass::arch::OpClassBlockScaledTensorOp, MmaTileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAccumulator, ElementAccumulator,
      void, LayoutDTag, kAlignD,  // no C operand: D = alpha * acc
      ElementD, LayoutDTag, kAlignD, cutlass::epilogue::collective::EpilogueScheduleAuto>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm100, cutlass::arch::OpClassBlockScaledTensorOp, ElementA, LayoutATag, kAlignAB, ElementB,
      LayoutBTag, kAlignAB, ElementAccumulator, MmaTileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::gemm::collective::KernelScheduleAuto>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue, void>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using Config = typename Kernel::CollectiveMainloop::Sm1xxBlkScaledConfig;

  static typename Gemm::Arguments arguments(const Params& p) {
    using StrideA = typename Kernel::StrideA;
    using StrideB = typename Kernel::StrideB;
    using StrideD = typename Kernel::StrideD;
    auto shape = make_shape(p.m, p.n, p.k, 1);
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {p.m, p.n, p.k, 1},
        {reinterpret_cast<const typename ElementA::DataType*>(p.a),
         cutlass::make_cute_packed_stride(StrideA{}, {p.m, p.k, 1}),
         reinterpret_cast<const typename ElementB::DataType*>(p.b),
         cutlass::make_cute_packed_stride(StrideB{}, {p.n, p.k, 1}),
         reinterpret_cast<const typename ElementA::ScaleFactorType*>(p.sfa), Config::tile_atom_to_shape_SFA(shape),
         reinterpret_cast<const typename ElementB::ScaleFactorType*>(p.sfb), Config::tile_atom_to_shape_SFB(shape)},
        {{},
         nullptr,
         cutlass::make_cute_packed_stride(StrideD{}, {p.m, p.n, 1}),
         reinterpret_cast<ElementD*>(p.d),
         cutlass::make_cute_packed_stride(StrideD{}, {p.m, p.n, 1})}};
    args.epilogue.thread.alpha_ptr = p.alpha;
    args.epilogue.thread.beta = 0.0f;
    return args;
  }

  static size_t workspace(const Params& p) {
    auto args = arguments(p);
    if (Gemm::can_implement(args) != cutlass::Status::kSuccess) return SIZE_MAX;
    return Gemm::get_workspace_size(args);
  }

  static const char* run(const Params& p, void* workspace, cudaStream_t stream) {
    Gemm gemm;
    auto args = arguments(p);
    if (gemm.can_implement(args) != cutlass::Status::kSuccess) return "CUTLASS cannot implement this problem";
    if (gemm.initialize(args, workspace, stream) != cutlass::Status::kSuccess) return "CUTLASS initialize failed";
    if (gemm.run(stream) != cutlass::Status::kSuccess) return "CUTLASS run failed";
    return nullptr;
  }
};

using Tile1Sm = Shape<_128, _128, _256>;
using Cluster1Sm = Shape<_1, _1, _1>;
using Tile2Sm = Shape<_256, _256, _256>;
using Cluster2Sm = Shape<_2, _4, _1>;

template <typename ElementD>
size_t workspace_size(const Params& p) {
  if (p.tile == Tile::k256x256x256_2sm) return Sm100Nvfp4Gemm<ElementD, Tile2Sm, Cluster2Sm>::workspace(p);
  return Sm100Nvfp4Gemm<ElementD, Tile1Sm, Cluster1Sm>::workspace(p);
}

template <typename ElementD>
const char* run(const Params& p, void* workspace, cudaStream_t stream) {
  if (p.tile == Tile::k256x256x256_2sm) return Sm100Nvfp4Gemm<ElementD, Tile2Sm, Cluster2Sm>::run(p, workspace, stream);
  return Sm100Nvfp4Gemm<ElementD, Tile1Sm, Cluster1Sm>::run(p, workspace, stream);
}

}  // namespace detail
}  // namespace nvfp4_gemm
}  // namespace wan
