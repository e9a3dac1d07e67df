// moe_gemm_cutlass_kernels.hpp - the CUTLASS kernel types of llmc/moe_gemm_cutlass.cu (C++, CUTLASS
// 4.x, sm_90a): the tile, the cluster, the epilogue, the three layouts' grouped GEMMs and the same
// with token reads (llmc/moe_gemm_gather_sm90.hpp). Included by moe_gemm_cutlass.cu and by
// dev/cuda/check_gather_copies.cu (which replays the token reads' copies on the host).
#pragma once

#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"

#include "moe_gemm_cutlass.h"
#include "moe_gemm_gather_sm90.hpp"

#if !defined(CUTLASS_ARCH_MMA_MODIFIABLE_TMA_SM90_SUPPORTED)
#error "moe_gemm_cutlass.cu needs CUDA 12.3+ built for sm_90a (the grouped GEMM rewrites TMA descriptors on the device)"
#endif

// The tile: 128 x MOE_CUTLASS_TILE_N x 64, cooperative (two consumer warpgroups split the 128 rows,
// a producer warp issues the TMA loads), cluster 1x1x1. The experts' problems are small and
// ragged (a few hundred to a few thousand rows each); the 128x256 tile (the Makefile's default)
// halves the A reloads of a 128x128 tile and measured faster at the benchmark's shapes
// (docs/performance.md, target 8). A cluster of 2 along N would round each problem's row tiles up
// to the cluster (the group scheduler's rule); along M (MOE_CUTLASS_CLUSTER_M=2) it rounds nothing,
// as every problem's M is a multiple of 256, and the two CTAs share one TMA multicast of their B
// tile. `make USE_CUTLASS=1 MOE_CUTLASS_TILE_N=128` builds the narrower tile,
// MOE_CUTLASS_PINGPONG=1 the ping-pong schedule instead (each consumer warpgroup a whole tile, one
// tile's epilogue under the other's MMAs), for the benchmark to compare. Neither the tile nor the
// cluster changes the bits: each output is one CTA's sum over K in the same order.
#ifndef MOE_CUTLASS_TILE_N
#define MOE_CUTLASS_TILE_N 256
#endif
#ifndef MOE_CUTLASS_PINGPONG
#define MOE_CUTLASS_PINGPONG 0
#endif
#ifndef MOE_CUTLASS_CLUSTER_M
#define MOE_CUTLASS_CLUSTER_M 1
#endif

using namespace cute;

using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;  // (M, N, K) per problem
using MoeShape3 = ProblemShape::UnderlyingProblemShape;
using MoeElement = cutlass::bfloat16_t;
constexpr int kMoeAlign = 8;  // elements: 16-byte TMA alignment of the leading dimensions
using MoeTileShape = Shape<_128, Int<MOE_CUTLASS_TILE_N>, _64>;
using MoeClusterShape = Shape<Int<MOE_CUTLASS_CLUSTER_M>, _1, _1>;
using MoeLayoutC = cutlass::layout::ColumnMajor;  // as cuBLAS: C (m, n) with ldc between columns
#if MOE_CUTLASS_PINGPONG
using MoeKernelSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong;
using MoeEpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong;
#else
using MoeKernelSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
using MoeEpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;
#endif

// the epilogue, the same for every kernel: D = alpha acc + beta C in fp32, rounded to bf16
template <class Cluster>
using MoeEpilogueT = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, MoeTileShape, Cluster,
    cutlass::epilogue::collective::EpilogueTileAuto, float, float, MoeElement, MoeLayoutC*, kMoeAlign, MoeElement,
    MoeLayoutC*, kMoeAlign, MoeEpilogueSchedule,
    cutlass::epilogue::fusion::LinearCombination<MoeElement, float, MoeElement, float>>::CollectiveOp;

template <class LayoutA, class LayoutB, class Cluster = MoeClusterShape>
struct MoeCutlassKernel {
    using Epilogue = MoeEpilogueT<Cluster>;
    using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
        cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, MoeElement, LayoutA*, kMoeAlign, MoeElement, LayoutB*,
        kMoeAlign, float, MoeTileShape, Cluster,
        cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
        MoeKernelSchedule>::CollectiveOp;
    using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;  // default: persistent group scheduler
    using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
    static constexpr int kGather = MOE_GATHER_NONE;
    using StrideA = typename Kernel::InternalStrideA;
    using StrideB = typename Kernel::InternalStrideB;
    using StrideC = typename Kernel::InternalStrideC;
};

// cuBLAS's op(A) = A^T over a column-major A (k, m) is CUTLASS's row-major A (m, k); op(B) = B^T
// over a column-major B (n, k) is a row-major B (k, n); C stays column-major
using KernelTN = MoeCutlassKernel<cutlass::layout::RowMajor, cutlass::layout::ColumnMajor>;
using KernelNN = MoeCutlassKernel<cutlass::layout::ColumnMajor, cutlass::layout::ColumnMajor>;
using KernelNT = MoeCutlassKernel<cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;

// the same kernels with one operand read through the schedule (llmc/moe_gemm_gather_sm90.hpp):
// the builder's mainloop, its smem layouts and wgmma sequence, with the gathered loads; a cluster
// of one CTA whatever MOE_CUTLASS_CLUSTER_M (the gathered operand has no TMA multicast)
template <class LayoutA, class LayoutB, int Gather>
struct MoeCutlassGatherKernel {
    using K = MoeCutlassKernel<LayoutA, LayoutB, Shape<_1, _1, _1>>;
    using Mainloop = MoeGatherMainloop<typename K::Mainloop, Gather>;
    using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, typename K::Epilogue>;
    using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
    static constexpr int kGather = Gather;
    using StrideA = typename K::StrideA;
    using StrideB = typename K::StrideB;
    using StrideC = typename K::StrideC;
    static_assert(cute::is_same_v<typename Kernel::InternalStrideA, StrideA> &&
                  cute::is_same_v<typename Kernel::InternalStrideB, StrideB>, "the gathered kernel's strides");
};
using cutlass::layout::RowMajor;
using cutlass::layout::ColumnMajor;
using KernelTNGatherB = MoeCutlassGatherKernel<RowMajor, ColumnMajor, MOE_GATHER_B_ROWS>;     // fch = W1 x
using KernelNNGatherB = MoeCutlassGatherKernel<ColumnMajor, ColumnMajor, MOE_GATHER_B_ROWS>;  // dh = W2^T dy
using KernelNTGatherB = MoeCutlassGatherKernel<ColumnMajor, RowMajor, MOE_GATHER_B_K>;        // dW2 += (g h) dy^T
using KernelNTGatherA = MoeCutlassGatherKernel<ColumnMajor, RowMajor, MOE_GATHER_A_K>;        // dW1 += x dfch^T
