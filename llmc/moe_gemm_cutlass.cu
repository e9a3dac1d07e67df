// moe_gemm_cutlass.cu - the CUTLASS grouped GEMM of llmc/moe_gemm_cutlass.h (its header says what
// and why; docs/design.md §10.8). Compiled alone, with `make USE_CUTLASS=1`.
#include <stdio.h>
#include <stdlib.h>
#include <vector>

#include "moe_gemm_cutlass_kernels.hpp"  // the kernel types
#include "cutlass_strides.hpp"

constexpr size_t kStrideBytes = 16;  // room for one stride of any of the three kernels

// one thread per problem a: its shape (a -1 dimension is its row count) and its strides
template <class SA, class SB, class SC>
__global__ void moe_cutlass_args_kernel(MoeShape3* shapes, SA* sA, SB* sB, SC* sC, const int* active_offset, int groups,
                                        int m, int n, int k, int lda, int ldb, int ldc) {
    const int a = blockIdx.x * blockDim.x + threadIdx.x;
    if (a >= groups) return;
    const int rows = active_offset[a + 1] - active_offset[a];
    shapes[a] = MoeShape3{m < 0 ? rows : m, n < 0 ? rows : n, k < 0 ? rows : k};
    sA[a] = cutlass_ld_stride<SA>(lda);
    sB[a] = cutlass_ld_stride<SB>(ldb);
    sC[a] = cutlass_ld_stride<SC>(ldc);
}

struct MoeCutlassGemm {
    int capacity;
    cutlass::KernelHardwareInfo hw;
    std::vector<MoeShape3> host_shapes;
    char* block;  // one allocation: shapes, strides A, B, C, workspace
    MoeShape3* shapes;
    void *strideA, *strideB, *strideC;
    void* workspace;
    size_t workspace_bytes, bytes;
};

static void moe_cutlass_cuda_check(cudaError_t e, const char* what) {
    if (e != cudaSuccess) {
        fprintf(stderr, "moe_gemm_cutlass: %s: %s\n", what, cudaGetErrorString(e));
        exit(EXIT_FAILURE);
    }
}

// the arguments of kernel K for `groups` problems (the shapes on the device, and on the host
// when host_shapes is given)
template <class K>
static typename K::Gemm::Arguments moe_cutlass_arguments(MoeCutlassGemm* g, int groups, const MoeShape3* host_shapes,
                                                         const void* const* dA, const void* const* dB, float beta,
                                                         void* const* dC, const MoeCutlassGather* gather,
                                                         const int* active_offset) {
    typename K::Gemm::Arguments args;
    args.mode = cutlass::gemm::GemmUniversalMode::kGrouped;
    args.problem_shape = ProblemShape{groups, g->shapes, host_shapes};
    args.mainloop.ptr_A = (const MoeElement**)dA;
    args.mainloop.dA = (typename K::StrideA*)g->strideA;
    args.mainloop.ptr_B = (const MoeElement**)dB;
    args.mainloop.dB = (typename K::StrideB*)g->strideB;
    if constexpr (K::kGather != MOE_GATHER_NONE) {  // (null when only the workspace is sized)
        args.mainloop.gather_src = gather ? (const MoeElement*)gather->src : nullptr;
        args.mainloop.gather_ld = gather ? gather->ld : 0;
        args.mainloop.sorted_pair = gather ? gather->sorted_pair : nullptr;
        args.mainloop.active_offset = active_offset;
        args.mainloop.pairs_per_token = gather ? gather->k : 1;
    }
    // scalar alpha and beta; the fusion's pointer and stride members keep their defaults (none)
    args.epilogue.thread.alpha = 1.0f;
    args.epilogue.thread.beta = beta;
    // C and D are the same matrices (beta 1 accumulates in place: each tile reads its C before it
    // writes its D, and tiles do not overlap); with beta 0 the epilogue does not read C
    args.epilogue.ptr_C = (const MoeElement**)dC;
    args.epilogue.dC = (typename K::StrideC*)g->strideC;
    args.epilogue.ptr_D = (MoeElement**)dC;
    args.epilogue.dD = (typename K::StrideC*)g->strideC;
    args.hw_info = g->hw;
    return args;
}

template <class K>
static size_t moe_cutlass_workspace(MoeCutlassGemm* g) {
    static_assert(sizeof(typename K::StrideA) <= kStrideBytes && sizeof(typename K::StrideB) <= kStrideBytes &&
                  sizeof(typename K::StrideC) <= kStrideBytes, "moe_gemm_cutlass: a stride larger than its slot");
    auto args = moe_cutlass_arguments<K>(g, g->capacity, nullptr, nullptr, nullptr, 0.0f, nullptr, nullptr, nullptr);
    return K::Gemm::get_workspace_size(args);
}

static size_t moe_cutlass_round(size_t b) { return (b + 255) / 256 * 256; }

MoeCutlassGemm* moe_cutlass_create(int capacity) {
    MoeCutlassGemm* g = new MoeCutlassGemm();
    g->capacity = capacity > 0 ? capacity : 1;
    moe_cutlass_cuda_check(cudaGetDevice(&g->hw.device_id), "cudaGetDevice");
    g->hw.sm_count = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(g->hw.device_id);
    g->host_shapes.resize(g->capacity);
    const size_t cap = (size_t)g->capacity;
    g->workspace_bytes = moe_cutlass_workspace<KernelTN>(g);
    g->workspace_bytes = std::max(g->workspace_bytes, moe_cutlass_workspace<KernelNN>(g));
    g->workspace_bytes = std::max(g->workspace_bytes, moe_cutlass_workspace<KernelNT>(g));
    g->workspace_bytes = std::max(g->workspace_bytes, moe_cutlass_workspace<KernelTNGatherB>(g));
    g->workspace_bytes = std::max(g->workspace_bytes, moe_cutlass_workspace<KernelNNGatherB>(g));
    g->workspace_bytes = std::max(g->workspace_bytes, moe_cutlass_workspace<KernelNTGatherB>(g));
    g->workspace_bytes = std::max(g->workspace_bytes, moe_cutlass_workspace<KernelNTGatherA>(g));
    const size_t shapes = moe_cutlass_round(cap * sizeof(MoeShape3)), strides = moe_cutlass_round(cap * kStrideBytes);
    g->bytes = shapes + 3 * strides + moe_cutlass_round(g->workspace_bytes);
    moe_cutlass_cuda_check(cudaMalloc((void**)&g->block, g->bytes), "cudaMalloc of the grouped GEMM's arguments");
    g->shapes = (MoeShape3*)g->block;
    g->strideA = g->block + shapes;
    g->strideB = g->block + shapes + strides;
    g->strideC = g->block + shapes + 2 * strides;
    g->workspace = g->block + shapes + 3 * strides;
    return g;
}

void moe_cutlass_free(MoeCutlassGemm* g) {
    if (g == nullptr) return;
    moe_cutlass_cuda_check(cudaFree(g->block), "cudaFree");
    delete g;
}

size_t moe_cutlass_device_bytes(const MoeCutlassGemm* g) { return g->bytes; }

void moe_cutlass_limit_sms(MoeCutlassGemm* g, int sms) {
    const int all = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(g->hw.device_id);
    g->hw.sm_count = sms > 0 && sms < all ? sms : all;
}

#define MOE_CUTLASS_STR2(x) #x
#define MOE_CUTLASS_STR(x) MOE_CUTLASS_STR2(x)
#define MOE_CUTLASS_CONFIG_TAIL                                                                        \
    ", tile 128x" MOE_CUTLASS_STR(MOE_CUTLASS_TILE_N) "x64, cluster " MOE_CUTLASS_STR(MOE_CUTLASS_CLUSTER_M) \
    "x1x1, token reads by " MOE_CUTLASS_STR(MOE_GATHER_WARPS) " warps"
const char* moe_cutlass_config(void) {
    return MOE_CUTLASS_PINGPONG ? "CUTLASS sm90 ptr-array pingpong" MOE_CUTLASS_CONFIG_TAIL
                                : "CUTLASS sm90 ptr-array cooperative" MOE_CUTLASS_CONFIG_TAIL;
}

template <class K>
static int moe_cutlass_run(MoeCutlassGemm* g, int groups, int m, int n, int k, const int* host_rows,
                           const int* active_offset, const void* const* dA, int lda, const void* const* dB, int ldb,
                           float beta, void* const* dC, int ldc, const MoeCutlassGather* gather, cudaStream_t stream) {
    for (int a = 0; a < groups; a++) {
        const int r = host_rows[a];
        g->host_shapes[a] = MoeShape3{m < 0 ? r : m, n < 0 ? r : n, k < 0 ? r : k};
    }
    auto args = moe_cutlass_arguments<K>(g, groups, g->host_shapes.data(), dA, dB, beta, dC, gather, active_offset);
    typename K::Gemm gemm;
    if (gemm.can_implement(args) != cutlass::Status::kSuccess) return 1;
    if (K::Gemm::get_workspace_size(args) > g->workspace_bytes) {
        fprintf(stderr, "moe_gemm_cutlass: the workspace of %zu bytes is too small (%zu)\n", g->workspace_bytes,
                K::Gemm::get_workspace_size(args));
        exit(EXIT_FAILURE);
    }
    moe_cutlass_args_kernel<<<(groups + 127) / 128, 128, 0, stream>>>(
        g->shapes, (typename K::StrideA*)g->strideA, (typename K::StrideB*)g->strideB, (typename K::StrideC*)g->strideC,
        active_offset, groups, m, n, k, lda, ldb, ldc);
    moe_cutlass_cuda_check(cudaGetLastError(), "the arguments kernel");
    cutlass::Status st = gemm.initialize(args, g->workspace, stream);
    if (st == cutlass::Status::kSuccess) st = gemm.run(stream);
    if (st != cutlass::Status::kSuccess) {
        fprintf(stderr, "moe_gemm_cutlass: %s (%d problems, layout m=%d n=%d k=%d)\n", cutlassGetStatusString(st),
                groups, m, n, k);
        exit(EXIT_FAILURE);
    }
    moe_cutlass_cuda_check(cudaGetLastError(), "the grouped GEMM launch");
    return 0;
}

int moe_cutlass_grouped_gemm(MoeCutlassGemm* g, int layout, int groups, int m, int n, int k, const int* host_rows,
                             const int* active_offset, const void* const* dA, int lda, const void* const* dB, int ldb,
                             float beta, void* const* dC, int ldc, const MoeCutlassGather* gather, cudaStream_t stream) {
    if (groups <= 0) return 0;
    if (groups > g->capacity) {
        fprintf(stderr, "moe_gemm_cutlass: %d problems, created for %d\n", groups, g->capacity);
        exit(EXIT_FAILURE);
    }
    const int gk = gather ? gather->operand : MOE_GATHER_NONE;
    // the gathered loads' offsets (row * ld) are ints, src's rows are 16-byte aligned, and the
    // operand's columns (K for B_ROWS, N for B_K, M for A_K) fit in a row of src
    const int extent = gk == MOE_GATHER_B_ROWS ? k : gk == MOE_GATHER_B_K ? n : m;
    if (gk != MOE_GATHER_NONE &&
        (gather->src_rows <= 0 || (long long)gather->src_rows * gather->ld >= (1ll << 31) || gather->ld % 8 != 0 ||
         ((size_t)gather->src % 16) != 0 || gather->k <= 0 || extent <= 0 || extent > gather->ld)) {
        return 1;
    }
#define MOE_CUTLASS_RUN(K) moe_cutlass_run<K>(g, groups, m, n, k, host_rows, active_offset, dA, lda, dB, ldb, beta, dC, ldc, gather, stream)
    if (layout == MOE_CUTLASS_TN && gk == MOE_GATHER_NONE) return MOE_CUTLASS_RUN(KernelTN);
    if (layout == MOE_CUTLASS_NN && gk == MOE_GATHER_NONE) return MOE_CUTLASS_RUN(KernelNN);
    if (layout == MOE_CUTLASS_NT && gk == MOE_GATHER_NONE) return MOE_CUTLASS_RUN(KernelNT);
    // the gathered operand's rows are the problem's MOE_DIM_ROWS dimension: N for B_ROWS, K otherwise
    if (layout == MOE_CUTLASS_TN && gk == MOE_GATHER_B_ROWS && n < 0) return MOE_CUTLASS_RUN(KernelTNGatherB);
    if (layout == MOE_CUTLASS_NN && gk == MOE_GATHER_B_ROWS && n < 0) return MOE_CUTLASS_RUN(KernelNNGatherB);
    if (layout == MOE_CUTLASS_NT && gk == MOE_GATHER_B_K && k < 0) return MOE_CUTLASS_RUN(KernelNTGatherB);
    if (layout == MOE_CUTLASS_NT && gk == MOE_GATHER_A_K && k < 0) return MOE_CUTLASS_RUN(KernelNTGatherA);
#undef MOE_CUTLASS_RUN
    return 1;  // a layout and gather these kernels do not have
}
