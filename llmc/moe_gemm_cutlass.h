/*
moe_gemm_cutlass.h - the moe layer's grouped GEMMs through a CUTLASS 3.x Hopper grouped GEMM
(sm90a: TMA loads, wgmma, warp-specialized persistent kernel), the alternative to cuBLAS's
grouped GEMM in llmc/moe_experts.cuh (moe_gemm_backend = MOE_GEMM_CUTLASS). Built only with
`make USE_CUTLASS=1` (ENABLE_CUTLASS), which compiles llmc/moe_gemm_cutlass.cu against the
CUTLASS headers (CUTLASS_INCLUDE, dev/prepare_carry.sh fetches them); bf16 only. No CUTLASS type
appears here.

The problems are those of moe_grouped_gemm, column-major as cuBLAS: one per non-empty FFN expert
(problem a = the a-th active expert of the schedule), C_a = op(A_a) op(B_a) (+ beta C_a), bf16
in and out, fp32 accumulation, in one of three layouts (the ones the layer uses):
  MOE_CUTLASS_TN  op(A) = A^T, op(B) = B    (the forward: W^T x)
  MOE_CUTLASS_NN  op(A) = A,   op(B) = B    (the input gradients)
  MOE_CUTLASS_NT  op(A) = A,   op(B) = B^T  (the weight gradients, beta 1: they accumulate)
The matrix pointers are device arrays (moe_group_pointers_kernel writes them); a dimension given
as -1 (MOE_DIM_ROWS) is the problem's row count, active_offset[a + 1] - active_offset[a] on the
device and host_rows[a] on the host (the same numbers: the host copy sizes the grid).

One operand may be read through the expert schedule instead (gather != NULL, operand one of
the MOE_GATHER_* kinds of llmc/moe_gemm_gather_sm90.hpp, which says the contract): the problem's
row j of it is row sorted_pair[active_offset[a] + j] / k of the row-major src (src_rows rows of
ld elements); the pointer array of that operand must still hold valid, 16-byte aligned pointers
(src, say: CUTLASS builds a TMA descriptor for each operand). Same bits as the GEMM over the rows
gathered first. The kinds the layer uses: TN and NN with B_ROWS (the rows are N), NT with B_K
and A_K (the rows are K); others return 1, as do a src whose offsets do not fit an int.

moe_cutlass_create(capacity) allocates, once, the device arrays of the problem shapes and strides
(capacity problems) and the kernels' workspace (their TMA descriptors, one set per SM of the
current device: A, B, C and a D per epilogue warpgroup, 5 of 128 bytes), about capacity * 60 +
640 * SMs bytes; moe_cutlass_grouped_gemm never allocates. It returns 0 when it launched, 1 when
CUTLASS cannot run these problems (the caller then takes another path); it exits on a CUDA error.

Determinism: a persistent tile scheduler without split-K or stream-K: each output tile is one
CTA's full-K sum in a fixed order, so the same inputs give the same bits whatever the grid. The
bits differ from cuBLAS's (another summation order).
*/
#ifndef OMNIMOE_MOE_GEMM_CUTLASS_H
#define OMNIMOE_MOE_GEMM_CUTLASS_H

#include <stddef.h>
#include <cuda_runtime.h>

#define MOE_CUTLASS_TN 0
#define MOE_CUTLASS_NN 1
#define MOE_CUTLASS_NT 2

#define MOE_GATHER_NONE 0
#define MOE_GATHER_B_ROWS 1
#define MOE_GATHER_B_K 2
#define MOE_GATHER_A_K 3

typedef struct MoeCutlassGemm MoeCutlassGemm;
typedef struct {
    int operand;             // MOE_GATHER_*
    const void* src;         // row-major bf16, src_rows x ld
    int src_rows, ld;
    const int* sorted_pair;  // the schedule's pairs in expert order (device)
    int k;                   // pairs per token: the token of pair p is p / k
} MoeCutlassGather;

MoeCutlassGemm* moe_cutlass_create(int capacity);
void moe_cutlass_free(MoeCutlassGemm* g);
size_t moe_cutlass_device_bytes(const MoeCutlassGemm* g);
// tests: run the persistent kernels on at most `sms` CTAs (0: every SM), so that each CTA walks
// many work tiles and problems
void moe_cutlass_limit_sms(MoeCutlassGemm* g, int sms);
// a short description of the kernels (tile, cluster, schedule) for logs and benchmarks
const char* moe_cutlass_config(void);
int moe_cutlass_grouped_gemm(MoeCutlassGemm* g, int layout, int groups, int m, int n, int k, const int* host_rows,
                             const int* active_offset, const void* const* dA, int lda, const void* const* dB, int ldb,
                             float beta, void* const* dC, int ldc, const MoeCutlassGather* gather, cudaStream_t stream);

#endif // OMNIMOE_MOE_GEMM_CUTLASS_H
