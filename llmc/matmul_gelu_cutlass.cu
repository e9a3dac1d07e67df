// matmul_gelu_cutlass.cu - the GELU GEMMs of llmc/matmul_gelu_cutlass.h (its header says what and
// why). Compiled alone, with `make USE_CUTLASS=1`.
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>

#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/thread/activation.h"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"

#include "cutlass_strides.hpp"
#include "matmul_gelu_cutlass.h"

using namespace cute;
using GeluElement = cutlass::bfloat16_t;
using ColumnMajor = cutlass::layout::ColumnMajor;
using RowMajor = cutlass::layout::RowMajor;
constexpr int kGeluAlign = 8;  // elements: 16-byte TMA alignment

int matmul_cutlass_gelu_kernel = 1;  // ping-pong: measured faster at the d12 step's shapes (test_matmul)

// the two schedules the header lists: cooperative 128x256 (kernel 0), ping-pong 128x128 (kernel 1)
template <bool PingPong>
struct GeluSchedule {
    using Tile = Shape<_128, _256, _64>;
    using Kernel = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
    using Epilogue = cutlass::epilogue::TmaWarpSpecializedCooperative;
};
template <>
struct GeluSchedule<true> {
    using Tile = Shape<_128, _128, _64>;
    using Kernel = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
    using Epilogue = cutlass::epilogue::TmaWarpSpecialized;
};

// column-major as cuBLAS (llmc/matmul.cuh): D (M, N) = A (M, K) B (K, N), B and D column-major,
// the epilogue given by Fusion; a persistent kernel on one CTA per cluster
template <class LayoutA, class Fusion, bool PingPong>
struct GeluGemm {
    using S = GeluSchedule<PingPong>;
    using Cluster = Shape<_1, _1, _1>;
    using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
        cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, typename S::Tile, Cluster,
        cutlass::epilogue::collective::EpilogueTileAuto, float, float, GeluElement, ColumnMajor, kGeluAlign,
        GeluElement, ColumnMajor, kGeluAlign, typename S::Epilogue, Fusion>::CollectiveOp;
    using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
        cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, GeluElement, LayoutA, kGeluAlign, GeluElement, ColumnMajor,
        kGeluAlign, float, typename S::Tile, Cluster,
        cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
        typename S::Kernel>::CollectiveOp;
    using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
    using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

// forward: D = GELU(acc + per-row bias), aux = acc + bias (the pre-activation); backward:
// D = acc * GELU'(aux)
using GeluForwardFusion = cutlass::epilogue::fusion::LinCombPerRowBiasEltActAux<
    ColumnMajor, cutlass::epilogue::thread::GELU_taylor, GeluElement, float, GeluElement, GeluElement>;
using GeluBackwardFusion = cutlass::epilogue::fusion::LinCombDeEltAct<
    ColumnMajor, cutlass::epilogue::thread::dGELU, GeluElement, float, GeluElement>;

// forward: out^T (C_out, BT) = weight (C_out, C_in row-major: A row-major) x inp^T
template <bool P> using GeluForward = GeluGemm<RowMajor, GeluForwardFusion, P>;
// backward: dpre^T (C_in, BT) = weight^T (weight (C_out, C_in) row-major: A column-major) x dout^T
template <bool P> using GeluBackward = GeluGemm<ColumnMajor, GeluBackwardFusion, P>;

static void gelu_cutlass_check(cudaError_t e, const char* what) {
    if (e != cudaSuccess) {
        fprintf(stderr, "matmul_gelu_cutlass: %s: %s\n", what, cudaGetErrorString(e));
        exit(EXIT_FAILURE);
    }
}

static cutlass::KernelHardwareInfo gelu_hw_info(void) {
    static cutlass::KernelHardwareInfo hw;
    static int ready = 0;
    if (!ready) {
        gelu_cutlass_check(cudaGetDevice(&hw.device_id), "cudaGetDevice");
        hw.sm_count = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(hw.device_id);
        ready = 1;
    }
    return hw;
}

// runs G on args (0), or returns 1 if CUTLASS cannot; one workspace per kernel type, grown once
template <class G>
static int gelu_cutlass_run(typename G::Gemm::Arguments& args, cudaStream_t stream) {
    static void* workspace = nullptr;
    static size_t workspace_bytes = 0;
    typename G::Gemm gemm;
    if (gemm.can_implement(args) != cutlass::Status::kSuccess) return 1;
    const size_t need = G::Gemm::get_workspace_size(args);
    if (need > workspace_bytes) {
        if (workspace) gelu_cutlass_check(cudaFree(workspace), "cudaFree");
        gelu_cutlass_check(cudaMalloc(&workspace, need), "cudaMalloc of the GEMM workspace");
        workspace_bytes = need;
    }
    cutlass::Status st = gemm.initialize(args, workspace, stream);
    if (st == cutlass::Status::kSuccess) st = gemm.run(stream);
    if (st != cutlass::Status::kSuccess) {
        fprintf(stderr, "matmul_gelu_cutlass: %s\n", cutlassGetStatusString(st));
        exit(EXIT_FAILURE);
    }
    gelu_cutlass_check(cudaGetLastError(), "the GEMM launch");
    return 0;
}

static int gelu_aligned(const void* p) { return p == nullptr || ((uintptr_t)p % 16) == 0; }

// the arguments of G for D (M, N) = A (M, K) B (K, N), packed with leading dimensions lda, ldb and
// ldd; C is given as D and not read (beta 0); the caller sets the epilogue's bias and aux
template <class G>
static typename G::Gemm::Arguments gelu_arguments(const void* A, int lda, const void* B, int ldb, void* D, int ldd,
                                                  int M, int N, int K) {
    using Kn = typename G::Kernel;
    typename G::Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {M, N, K, 1},
        {(const GeluElement*)A, cutlass_ld_stride<typename Kn::StrideA>(lda), (const GeluElement*)B,
         cutlass_ld_stride<typename Kn::StrideB>(ldb)},
        {{}, (const GeluElement*)D, cutlass_ld_stride<typename Kn::StrideC>(ldd), (GeluElement*)D,
         cutlass_ld_stride<typename Kn::StrideD>(ldd)},
        gelu_hw_info()};
    args.epilogue.thread.alpha = 1.0f;
    args.epilogue.thread.beta = 0.0f;
    return args;
}

// out^T (C_out, BT) = weight (C_out, C_in) inp^T, with the bias, the GELU and pre_gelu as aux
template <bool P>
static int gelu_forward_run(void* out_gelu, void* pre_gelu, const void* inp, const void* weight, const void* bias,
                            int BT, int C_in, int C_out, cudaStream_t stream) {
    using G = GeluForward<P>;
    auto args = gelu_arguments<G>(weight, C_in, inp, C_in, out_gelu, C_out, C_out, BT, C_in);
    args.epilogue.thread.bias_ptr = (const GeluElement*)bias;  // NULL: no bias
    args.epilogue.thread.aux_ptr = (GeluElement*)pre_gelu;
    args.epilogue.thread.dAux = cutlass_ld_stride<typename G::Kernel::StrideD>(C_out);
    return gelu_cutlass_run<G>(args, stream);
}

// dpre^T (C_in, BT) = weight^T dout^T, times GELU'(pre_gelu) read as aux
template <bool P>
static int gelu_backward_run(void* dpre, const void* dout, const void* weight, const void* pre_gelu, int BT, int C_in,
                             int C_out, cudaStream_t stream) {
    using G = GeluBackward<P>;
    auto args = gelu_arguments<G>(weight, C_in, dout, C_out, dpre, C_in, C_in, BT, C_out);
    args.epilogue.thread.aux_ptr = (const GeluElement*)pre_gelu;
    args.epilogue.thread.dAux = cutlass_ld_stride<typename G::Kernel::StrideD>(C_in);
    return gelu_cutlass_run<G>(args, stream);
}

const char* matmul_cutlass_gelu_config(int kernel) {
    return kernel == 1 ? "CUTLASS sm90 ping-pong, tile 128x128x64, cluster 1x1x1"
                       : "CUTLASS sm90 cooperative, tile 128x256x64, cluster 1x1x1";
}

int matmul_cutlass_gelu_forward(void* out_gelu, void* pre_gelu, const void* inp, const void* weight, const void* bias,
                                int BT, int C_in, int C_out, cudaStream_t stream) {
    if (BT <= 0 || C_in % kGeluAlign != 0 || C_out % kGeluAlign != 0) return 1;
    if (!gelu_aligned(out_gelu) || !gelu_aligned(pre_gelu) || !gelu_aligned(inp) || !gelu_aligned(weight) ||
        !gelu_aligned(bias)) {
        return 1;
    }
    return matmul_cutlass_gelu_kernel == 1
               ? gelu_forward_run<true>(out_gelu, pre_gelu, inp, weight, bias, BT, C_in, C_out, stream)
               : gelu_forward_run<false>(out_gelu, pre_gelu, inp, weight, bias, BT, C_in, C_out, stream);
}

int matmul_cutlass_dgelu_backward(void* dpre, const void* dout, const void* weight, const void* pre_gelu, int BT,
                                  int C_in, int C_out, cudaStream_t stream) {
    if (BT <= 0 || C_in % kGeluAlign != 0 || C_out % kGeluAlign != 0) return 1;
    if (!gelu_aligned(dpre) || !gelu_aligned(dout) || !gelu_aligned(weight) || !gelu_aligned(pre_gelu)) return 1;
    return matmul_cutlass_gelu_kernel == 1
               ? gelu_backward_run<true>(dpre, dout, weight, pre_gelu, BT, C_in, C_out, stream)
               : gelu_backward_run<false>(dpre, dout, weight, pre_gelu, BT, C_in, C_out, stream);
}
