/*
experts_shard.cuh - the rank side of the column-sharded OmniMoE experts (docs/sharding.md §3.1):
the kernels a rank runs between the exchanges, on its packed (N, C/P) slices of U and V. The
exchanges themselves (NCCL all-gather and all-to-all) are the caller's; the column map, the pair
order and the combination tree are llmc/expert_shard.h's.

Shapes, per rank q of P, cols = C/P, BT own tokens, A = P*BT*k pairs of all ranks in the global
pair order (rank-major: expert_shard_pair_global), T = P*BT tokens of all ranks:
  X, Y, dY, dX          (BT, C) floatX     own tokens
  U_q, V_q, dU_q, dV_q  (N, cols) floatX   own column slices, packed
  idx_all, gate_all, s_all, ds_all (A)     after the all-gathers
  xcols, dycols         (T, cols) floatX   every token's columns of rank q (after the all-to-all)

One layer, forward:                                                            then exchange
  experts_shard_pack_columns(send, X, BT, C, P)        P blocks (BT, cols)     all-to-all -> xcols
  experts_shard_partial_dots(part, U_q, xcols, idx_all, A, k, cols, P)  (A)    all-to-all of blocks
                                                       of BT*k (the owner's pairs)
  experts_shard_combine(s, recv, BT*k, P)              owner: s = the fixed tree of the P partials
                                                                               all-gather -> s_all
  experts_shard_token_sums(acc, V_q, idx_all, gate_all, s_all, NULL, T, k, cols)  (T, cols) fp32
                                                                               all-to-all back
  experts_shard_add_columns(Y, recv, BT, C, P, accumulate)   owner: Y (+)= y, one rounding
Backward:
  pack dY columns (-> dycols); partial_dots with V_q and dycols; combine -> h (owner)
  experts_shard_pair_grads(dgate, ds, h, s, gate, BT*k)      owner            all-gather -> ds_all
  experts_shard_token_sums(acc, U_q, idx_all, NULL, NULL, ds_all, T, k, cols); back; add_columns(dX)
  experts_shard_table_grads(dU_q, dV_q, ds_all, gate_all, s_all, xcols, dycols, sched_all, A, k,
                            cols, scale, scratch, scratch_bytes, stream)   local, no exchange
sched_all is scheduler_build over idx_all (all A pairs).

Exactness (bf16 builds, P | 32): the partial dot of a rank runs on 32/P lanes that cover exactly
the vectors the unsharded warp's lanes r, r+P, ... cover, in the same order, with the same fmaf;
experts_shard_combine finishes the warp's xor butterfly. So s and h, and with them Y, dX, dgate,
dU and dV, are bitwise those of experts_forward / experts_backward (llmc/experts.cuh) on the
concatenated batch of all ranks (dU, dV of a dY scaled by `scale`; exact for scale = 1/P, P a
power of two). The per-column arithmetic (token sums from 0 in m order, one rounding onto Y and
dX, the segment sums of dU/dV) is the unsharded kernels' own. fp32 builds (16-byte vectors of
4 channels) and P not dividing 32: deterministic, not the unsharded bits.

Accumulate or overwrite: partial_dots, combine, token_sums, pair_grads, pack_columns overwrite;
add_columns: Y = Y + y (accumulate = 1) or Y = y; table_grads: dU_q, dV_q +=. No atomics.

The whole sequence of one rank, exchanges included, is experts_shard_forward / _backward at the
end, over an ExpertShardComm: two collectives (all-gather, all-to-all) that NCCL implements
(expert_shard_comm_nccl, grouped ncclSend/ncclRecv for the all-to-all) and the one-GPU test
implements with threads and device copies. Every rank must call them in the same order.
dev/cuda/test_experts_shard.cu checks all of it on one GPU, the exchanges through its thread comm
(138 passed on one H200, 2026-12-05); expert_shard_comm_nccl, the NCCL exchanges, has not run yet.
*/
#ifndef OMNIMOE_EXPERTS_SHARD_CUH
#define OMNIMOE_EXPERTS_SHARD_CUH

#include "expert_shard.h"
#include "experts.cuh"
#include "multi_gpu.cuh"

#define EXPERTS_SHARD_THREADS 256

// ----------------------------------------------------------------------------
// kernels

// send (P blocks of (BT, cols)): block q = the columns of rank q of every own token
__global__ void experts_shard_pack_columns_kernel(floatX* send, const floatX* X, int BT, int C, int P) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)BT * C) { return; }
    const int t = (int)(i / C), c = (int)(i % C), cols = C / P;
    const int r = expert_shard_rank_of(c, P), j = expert_shard_packed_of(c, P);
    send[((size_t)r * BT + t) * cols + j] = X[i];
}

// partial[g] = <rows[idx_all[g]], tok[g / k]> over this rank's cols channels, for all A pairs.
// A group of L = expert_shard_lanes(P) lanes per pair (32/L pairs per warp): lane j of the group
// takes the vectors j, j+L, ... with fmaf, then the group's xor butterfly (offsets L/2 .. 1).
__global__ void experts_shard_partial_dot_kernel(float* partial, const floatX* rows, const floatX* tok,
                                                 const int* idx_all, int A, int k, int cols, int L) {
    const int lane = threadIdx.x % 32;
    const int j = lane % L;
    const long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    const long long g = warp * (32 / L) + lane / L;
    float acc = 0.0f;
    if (g < A) {
        const floatX* row = rows + (size_t)idx_all[g] * cols;
        const floatX* t = tok + (size_t)(g / k) * cols;
        for (int c = j * EXPERTS_VEC; c < cols; c += L * EXPERTS_VEC) {
            x128 a = load128(t + c);
            x128 r = load128(row + c);
#pragma unroll
            for (int i = 0; i < EXPERTS_VEC; i++) { acc = fmaf((float)a[i], (float)r[i], acc); }
        }
    }
    for (int offset = L / 2; offset > 0; offset >>= 1) { acc += __shfl_xor_sync(0xffffffff, acc, offset); }
    if (g < A && j == 0) { partial[g] = acc; }
}

// owner: out[p] = expert_shard_tree_sum of recv[q * pairs + p], q = 0..P-1
__global__ void experts_shard_combine_kernel(float* out, const float* recv, int pairs, int P) {
    const int p = blockIdx.x * blockDim.x + threadIdx.x;
    if (p < pairs) { out[p] = expert_shard_tree_sum(recv + p, (size_t)pairs, P); }
}

// acc (T, cols) fp32 = per token sum over m = 0..k-1 of coef * rows[idx_all[t*k+m]], from 0, in m
// order, with fmaf per column (the unsharded token kernels' per-column arithmetic). coef =
// gate_all * SiLU(s_all) (forward, ds_all == NULL) or ds_all (backward). One warp per token.
template <int NQ>
__global__ void __launch_bounds__(EXPERTS_WARPS_PER_BLOCK * 32)
experts_shard_token_sum_kernel(float* acc_out, const floatX* rows, const int* idx_all, const float* gate_all,
                               const float* s_all, const float* ds_all, int T, int k, int cols) {
    const int lane = threadIdx.x % 32;
    const int t = blockIdx.x * EXPERTS_WARPS_PER_BLOCK + threadIdx.x / 32;
    if (t >= T) { return; }
    float acc[NQ][EXPERTS_VEC];
#pragma unroll
    for (int q = 0; q < NQ; q++) {
#pragma unroll
        for (int i = 0; i < EXPERTS_VEC; i++) { acc[q][i] = 0.0f; }
    }
    for (int m = 0; m < k; m++) {
        const size_t g = (size_t)t * k + m;
        const float coef = ds_all != NULL ? ds_all[g] : gate_all[g] * experts_silu(s_all[g]);
        const floatX* row = rows + (size_t)idx_all[g] * cols;
#pragma unroll
        for (int q = 0; q < NQ; q++) {
            const int c = (q * 32 + lane) * EXPERTS_VEC;
            if (c < cols) {
                x128 v = load128(row + c);
#pragma unroll
                for (int i = 0; i < EXPERTS_VEC; i++) { acc[q][i] = fmaf(coef, (float)v[i], acc[q][i]); }
            }
        }
    }
#pragma unroll
    for (int q = 0; q < NQ; q++) {
        const int c = (q * 32 + lane) * EXPERTS_VEC;
        if (c < cols) {
#pragma unroll
            for (int i = 0; i < EXPERTS_VEC; i++) { acc_out[(size_t)t * cols + c + i] = acc[q][i]; }
        }
    }
}

// owner: Y[t][c] = (floatX)((accumulate ? Y : 0) + recv[rank_of(c)][t][packed_of(c)]): the
// unsharded kernels' one rounding of base + expert sum
__global__ void experts_shard_add_columns_kernel(floatX* Y, const float* recv, int BT, int C, int P, int accumulate) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)BT * C) { return; }
    const int t = (int)(i / C), c = (int)(i % C), cols = C / P;
    const float y = recv[((size_t)expert_shard_rank_of(c, P) * BT + t) * cols + expert_shard_packed_of(c, P)];
    const float base = accumulate ? (float)Y[i] : 0.0f;
    Y[i] = (floatX)(base + y);
}

// owner: dgate and ds of its pairs from h, as experts_token_backward_kernel writes them
__global__ void experts_shard_pair_grads_kernel(float* dgate, float* ds, const float* h_buf, const float* s_buf,
                                                const float* gate, int pairs) {
    const int p = blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= pairs) { return; }
    const float h = h_buf[p], s = s_buf[p], g = gate[p];
    const float dsilu = experts_dsilu(s);
    ds[p] = h * g * dsilu;
    dgate[p] = h * experts_silu(s);
}

__global__ void experts_shard_scale_kernel(float* out, const float* in, float scale, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) { out[i] = in[i] * scale; }
}

// ----------------------------------------------------------------------------
// launchers

static inline void experts_shard_check(const char* who, int C, int P) {
    const char* why = expert_shard_unfit(C, P);
    if (why == NULL && C / P > EXPERTS_MAX_C) why = "C/P <= 4096";
    if (why != NULL) {
        fprintf(stderr, "%s: cannot shard C=%d over P=%d ranks: expected %s\n", who, C, P, why);
        exit(EXIT_FAILURE);
    }
}

static void experts_shard_pack_columns(floatX* send, const floatX* X, int BT, int C, int P, cudaStream_t stream) {
    experts_shard_check("experts_shard_pack_columns", C, P);
    const size_t n = (size_t)BT * C;
    experts_shard_pack_columns_kernel<<<(unsigned)ceil_div_sz(n, EXPERTS_SHARD_THREADS), EXPERTS_SHARD_THREADS, 0,
                                        stream>>>(send, X, BT, C, P);
    cudaCheckLast();
}

static void experts_shard_partial_dots(float* partial, const floatX* rows, const floatX* tok, const int* idx_all, int A,
                                       int k, int cols, int P, cudaStream_t stream) {
    const int L = expert_shard_lanes(P);
    const size_t warps = ceil_div_sz((size_t)A, (size_t)(32 / L));
    const size_t warps_per_block = EXPERTS_SHARD_THREADS / 32;
    experts_shard_partial_dot_kernel<<<(unsigned)ceil_div_sz(warps, warps_per_block), EXPERTS_SHARD_THREADS, 0,
                                       stream>>>(partial, rows, tok, idx_all, A, k, cols, L);
    cudaCheckLast();
}

static void experts_shard_combine(float* out, const float* recv, int pairs, int P, cudaStream_t stream) {
    experts_shard_combine_kernel<<<ceil_div(pairs, EXPERTS_SHARD_THREADS), EXPERTS_SHARD_THREADS, 0, stream>>>(
        out, recv, pairs, P);
    cudaCheckLast();
}

static void experts_shard_token_sums(float* acc, const floatX* rows, const int* idx_all, const float* gate_all,
                                     const float* s_all, const float* ds_all, int T, int k, int cols,
                                     cudaStream_t stream) {
    dim3 grid(ceil_div(T, EXPERTS_WARPS_PER_BLOCK)), block(EXPERTS_WARPS_PER_BLOCK * 32);
    switch (experts_nq(cols)) {
        case 1: experts_shard_token_sum_kernel<1><<<grid, block, 0, stream>>>(acc, rows, idx_all, gate_all, s_all, ds_all, T, k, cols); break;
        case 2: experts_shard_token_sum_kernel<2><<<grid, block, 0, stream>>>(acc, rows, idx_all, gate_all, s_all, ds_all, T, k, cols); break;
        case 4: experts_shard_token_sum_kernel<4><<<grid, block, 0, stream>>>(acc, rows, idx_all, gate_all, s_all, ds_all, T, k, cols); break;
        case 8: experts_shard_token_sum_kernel<8><<<grid, block, 0, stream>>>(acc, rows, idx_all, gate_all, s_all, ds_all, T, k, cols); break;
        default: experts_shard_token_sum_kernel<16><<<grid, block, 0, stream>>>(acc, rows, idx_all, gate_all, s_all, ds_all, T, k, cols); break;
    }
    cudaCheckLast();
}

static void experts_shard_add_columns(floatX* Y, const float* recv, int BT, int C, int P, int accumulate,
                                      cudaStream_t stream) {
    const size_t n = (size_t)BT * C;
    experts_shard_add_columns_kernel<<<(unsigned)ceil_div_sz(n, EXPERTS_SHARD_THREADS), EXPERTS_SHARD_THREADS, 0,
                                       stream>>>(Y, recv, BT, C, P, accumulate);
    cudaCheckLast();
}

static void experts_shard_pair_grads(float* dgate, float* ds, const float* h, const float* s, const float* gate,
                                     int pairs, cudaStream_t stream) {
    experts_shard_pair_grads_kernel<<<ceil_div(pairs, EXPERTS_SHARD_THREADS), EXPERTS_SHARD_THREADS, 0, stream>>>(
        dgate, ds, h, s, gate, pairs);
    cudaCheckLast();
}

// scratch of experts_shard_table_grads: scaled ds and gate (A each), head/tail partials of the segments
static inline size_t experts_shard_table_grads_scratch_bytes(int A, int cols) {
    return 2 * align256((size_t)A * sizeof(float)) +
           4 * align256((size_t)experts_num_seg_chunks(A) * cols * sizeof(float));
}

// dU_q, dV_q += the segment sums over all A pairs (sorted by expert in sched_all) of
// (scale ds) xcols and (scale gate) SiLU(s) dycols: the unsharded segment kernels on the slice
static void experts_shard_table_grads(floatX* dU, floatX* dV, const float* ds_all, const float* gate_all,
                                      const float* s_all, const floatX* xcols, const floatX* dycols,
                                      ExpertSchedule sched_all, int A, int k, int cols, float scale, void* scratch,
                                      size_t scratch_bytes, cudaStream_t stream) {
    const size_t need = experts_shard_table_grads_scratch_bytes(A, cols);
    if (scratch == NULL || scratch_bytes < need) {
        fprintf(stderr, "experts_shard_table_grads: scratch of %zu bytes given, %zu needed\n", scratch_bytes, need);
        exit(EXIT_FAILURE);
    }
    char* base = (char*)scratch;
    float* ds_scaled = (float*)base;
    base += align256((size_t)A * sizeof(float));
    float* gate_scaled = (float*)base;
    base += align256((size_t)A * sizeof(float));
    experts_shard_scale_kernel<<<ceil_div(A, EXPERTS_SHARD_THREADS), EXPERTS_SHARD_THREADS, 0, stream>>>(ds_scaled, ds_all, scale, A);
    cudaCheckLast();
    experts_shard_scale_kernel<<<ceil_div(A, EXPERTS_SHARD_THREADS), EXPERTS_SHARD_THREADS, 0, stream>>>(gate_scaled, gate_all, scale, A);
    cudaCheckLast();
    experts_launch_segment_grads(dU, dV, ds_scaled, gate_scaled, s_all, xcols, dycols, sched_all, A, k, cols, base, stream);
}

// ----------------------------------------------------------------------------
// one rank's sharded expert branch: the kernels above between the exchanges of §3.1

typedef struct ExpertShardComm ExpertShardComm;
struct ExpertShardComm {
    int P, rank;
    // recv (P * bytes) = the send (bytes) of every rank, in rank order
    void (*all_gather)(const ExpertShardComm* comm, void* recv, const void* send, size_t bytes, cudaStream_t stream);
    // send: P blocks of block_bytes, block q for rank q; recv (P blocks) = block `rank` of every rank
    void (*all_to_all)(const ExpertShardComm* comm, void* recv, const void* send, size_t block_bytes,
                       cudaStream_t stream);
    const void* ctx;  // the implementation's state (the MultiGpu for NCCL)
};

#ifdef MULTI_GPU
static void expert_shard_nccl_all_gather(const ExpertShardComm* c, void* recv, const void* send, size_t bytes,
                                         cudaStream_t stream) {
    ncclCheck(ncclAllGather(send, recv, bytes, ncclChar, ((const MultiGpu*)c->ctx)->comm, stream));
}

// the own block by a device copy, the others by one group of sends and receives
static void expert_shard_nccl_all_to_all(const ExpertShardComm* c, void* recv, const void* send, size_t block_bytes,
                                         cudaStream_t stream) {
    const MultiGpu* mg = (const MultiGpu*)c->ctx;
    cudaCheck(cudaMemcpyAsync((char*)recv + (size_t)c->rank * block_bytes, (const char*)send + (size_t)c->rank * block_bytes,
                              block_bytes, cudaMemcpyDeviceToDevice, stream));
    ncclCheck(ncclGroupStart());
    for (int q = 0; q < c->P; q++) {
        if (q == c->rank) { continue; }
        ncclCheck(ncclSend((const char*)send + (size_t)q * block_bytes, block_bytes, ncclChar, q, mg->comm, stream));
        ncclCheck(ncclRecv((char*)recv + (size_t)q * block_bytes, block_bytes, ncclChar, q, mg->comm, stream));
    }
    ncclCheck(ncclGroupEnd());
}
#endif

// the exchanges over the job's NCCL communicator (one process per GPU, llmc/multi_gpu.cuh)
static ExpertShardComm expert_shard_comm_nccl(const MultiGpu* mg) {
    ExpertShardComm c;
    c.P = mg->num_processes;
    c.rank = mg->process_rank;
    c.ctx = mg;
#ifdef MULTI_GPU
    c.all_gather = expert_shard_nccl_all_gather;
    c.all_to_all = expert_shard_nccl_all_to_all;
#else
    c.all_gather = NULL;
    c.all_to_all = NULL;
    if (c.P > 1) {
        fprintf(stderr, "expert_shard_comm_nccl: %d processes, but this build has no NCCL\n", c.P);
        exit(EXIT_FAILURE);
    }
#endif
    return c;
}

// what the forward keeps for the backward, per layer and rank (A = P*BT*k pairs, T = P*BT)
typedef struct {
    int* idx_all;     // (A)
    float* gate_all;  // (A)
    float* s_all;     // (A)
    floatX* xcols;    // (T, C/P)
} ExpertShardSaved;

static inline size_t experts_shard_saved_bytes(int BT, int C, int k, int P) {
    const size_t A = (size_t)P * BT * k, T = (size_t)P * BT;
    return align256(A * sizeof(int)) + 2 * align256(A * sizeof(float)) + align256(T * (C / P) * sizeof(floatX));
}

static inline ExpertShardSaved experts_shard_saved_carve(void* base_ptr, int BT, int C, int k, int P) {
    const size_t A = (size_t)P * BT * k;
    char* base = (char*)base_ptr;
    ExpertShardSaved s;
    s.idx_all = (int*)base;     base += align256(A * sizeof(int));
    s.gate_all = (float*)base;  base += align256(A * sizeof(float));
    s.s_all = (float*)base;     base += align256(A * sizeof(float));
    s.xcols = (floatX*)base;
    return s;
}

// the temporaries of one forward or backward (reused by every layer)
typedef struct {
    floatX* send_cols;   // (BT, C) as P blocks (BT, C/P)
    floatX* dycols;      // (T, C/P)
    float* send;         // (max(A, T*C/P))
    float* recv;         // (max(A, T*C/P))
    float* h;            // (BT*k) own pairs
    float* ds;           // (BT*k)
    float* ds_all;       // (A)
    ExpertSchedule sched;  // over all A pairs
    void* scratch;       // scheduler_build, then experts_shard_table_grads
    size_t scratch_bytes;
} ExpertShardWork;

static inline size_t experts_shard_scratch_bytes_(int BT, int C, int k, int N, int P) {
    const int A = P * BT * k;
    const size_t a = scheduler_scratch_bytes(A, N), b = experts_shard_table_grads_scratch_bytes(A, C / P);
    return a > b ? a : b;
}

static inline size_t experts_shard_work_bytes(int BT, int C, int k, int N, int P) {
    const size_t A = (size_t)P * BT * k, T = (size_t)P * BT, cols = (size_t)(C / P);
    const size_t f = A > T * cols ? A : T * cols;
    const size_t amax = (size_t)scheduler_max_active((int)A, N);
    return align256((size_t)BT * C * sizeof(floatX)) + align256(T * cols * sizeof(floatX)) +
           2 * align256(f * sizeof(float)) + 2 * align256((size_t)BT * k * sizeof(float)) +
           align256(A * sizeof(float)) + 3 * align256(A * sizeof(int)) + 2 * align256((amax + 1) * sizeof(int)) +
           align256(sizeof(int)) + align256(experts_shard_scratch_bytes_(BT, C, k, N, P));
}

static inline ExpertShardWork experts_shard_work_carve(void* base_ptr, size_t bytes, int BT, int C, int k, int N, int P) {
    if (base_ptr == NULL || bytes < experts_shard_work_bytes(BT, C, k, N, P)) {
        fprintf(stderr, "experts_shard: work buffer of %zu bytes given, %zu needed\n", bytes,
                experts_shard_work_bytes(BT, C, k, N, P));
        exit(EXIT_FAILURE);
    }
    const size_t A = (size_t)P * BT * k, T = (size_t)P * BT, cols = (size_t)(C / P);
    const size_t f = A > T * cols ? A : T * cols;
    const size_t amax = (size_t)scheduler_max_active((int)A, N);
    char* base = (char*)base_ptr;
    ExpertShardWork w;
    w.send_cols = (floatX*)base;  base += align256((size_t)BT * C * sizeof(floatX));
    w.dycols = (floatX*)base;     base += align256(T * cols * sizeof(floatX));
    w.send = (float*)base;        base += align256(f * sizeof(float));
    w.recv = (float*)base;        base += align256(f * sizeof(float));
    w.h = (float*)base;           base += align256((size_t)BT * k * sizeof(float));
    w.ds = (float*)base;          base += align256((size_t)BT * k * sizeof(float));
    w.ds_all = (float*)base;      base += align256(A * sizeof(float));
    w.sched.sorted_pair = (int*)base;    base += align256(A * sizeof(int));
    w.sched.sorted_expert = (int*)base;  base += align256(A * sizeof(int));
    w.sched.sorted_active = (int*)base;  base += align256(A * sizeof(int));
    w.sched.active_expert = (int*)base;  base += align256((amax + 1) * sizeof(int));
    w.sched.active_offset = (int*)base;  base += align256((amax + 1) * sizeof(int));
    w.sched.num_active = (int*)base;     base += align256(sizeof(int));
    w.scratch = base;
    w.scratch_bytes = experts_shard_scratch_bytes_(BT, C, k, N, P);
    return w;
}

// Forward of rank comm->rank: Y (BT, C) (+)= its tokens' expert sums; s (BT*k) = its pairs'
// scores; saved filled for the backward. U, V: the rank's (N, C/P) slices.
static void experts_shard_forward(floatX* Y, float* s, const floatX* X, const floatX* U, const floatX* V,
                                  const int* idx, const float* gate, ExpertShardSaved saved, int BT, int C, int k,
                                  int N, int accumulate, const ExpertShardComm* comm, void* work, size_t work_bytes,
                                  cudaStream_t stream) {
    const int P = comm->P, cols = C / P, pairs = BT * k, A = P * pairs, T = P * BT;
    experts_shard_check("experts_shard_forward", C, P);
    ExpertShardWork w = experts_shard_work_carve(work, work_bytes, BT, C, k, N, P);
    comm->all_gather(comm, saved.idx_all, idx, (size_t)pairs * sizeof(int), stream);
    comm->all_gather(comm, saved.gate_all, gate, (size_t)pairs * sizeof(float), stream);
    experts_shard_pack_columns(w.send_cols, X, BT, C, P, stream);
    comm->all_to_all(comm, saved.xcols, w.send_cols, (size_t)BT * cols * sizeof(floatX), stream);
    experts_shard_partial_dots(w.send, U, saved.xcols, saved.idx_all, A, k, cols, P, stream);
    comm->all_to_all(comm, w.recv, w.send, (size_t)pairs * sizeof(float), stream);
    experts_shard_combine(s, w.recv, pairs, P, stream);
    comm->all_gather(comm, saved.s_all, s, (size_t)pairs * sizeof(float), stream);
    experts_shard_token_sums(w.send, V, saved.idx_all, saved.gate_all, saved.s_all, NULL, T, k, cols, stream);
    comm->all_to_all(comm, w.recv, w.send, (size_t)BT * cols * sizeof(float), stream);
    experts_shard_add_columns(Y, w.recv, BT, C, P, accumulate, stream);
}

// Backward of rank comm->rank: dX (BT, C) (+)= its tokens' expert part; dgate (BT*k) = its pairs';
// dU, dV (N, C/P) += table_grad_scale times the gradient over the pairs of ALL ranks (1/P: the
// mean over ranks). gate, s: the rank's own pairs (the forward's inputs and output).
static void experts_shard_backward(floatX* dX, floatX* dU, floatX* dV, float* dgate, const floatX* dY,
                                   const floatX* U, const floatX* V, const float* gate, const float* s,
                                   ExpertShardSaved saved, int BT, int C, int k, int N, float table_grad_scale,
                                   int accumulate, const ExpertShardComm* comm, void* work, size_t work_bytes,
                                   cudaStream_t stream) {
    const int P = comm->P, cols = C / P, pairs = BT * k, A = P * pairs, T = P * BT;
    experts_shard_check("experts_shard_backward", C, P);
    ExpertShardWork w = experts_shard_work_carve(work, work_bytes, BT, C, k, N, P);
    experts_shard_pack_columns(w.send_cols, dY, BT, C, P, stream);
    comm->all_to_all(comm, w.dycols, w.send_cols, (size_t)BT * cols * sizeof(floatX), stream);
    experts_shard_partial_dots(w.send, V, w.dycols, saved.idx_all, A, k, cols, P, stream);
    comm->all_to_all(comm, w.recv, w.send, (size_t)pairs * sizeof(float), stream);
    experts_shard_combine(w.h, w.recv, pairs, P, stream);
    experts_shard_pair_grads(dgate, w.ds, w.h, s, gate, pairs, stream);
    comm->all_gather(comm, w.ds_all, w.ds, (size_t)pairs * sizeof(float), stream);
    experts_shard_token_sums(w.send, U, saved.idx_all, NULL, NULL, w.ds_all, T, k, cols, stream);
    comm->all_to_all(comm, w.recv, w.send, (size_t)BT * cols * sizeof(float), stream);
    experts_shard_add_columns(dX, w.recv, BT, C, P, accumulate, stream);
    scheduler_build(w.sched, NULL, saved.idx_all, A, N, w.scratch, w.scratch_bytes, stream);
    experts_shard_table_grads(dU, dV, w.ds_all, saved.gate_all, saved.s_all, saved.xcols, w.dycols, w.sched, A, k,
                              cols, table_grad_scale, w.scratch, w.scratch_bytes, stream);
}

#endif  // OMNIMOE_EXPERTS_SHARD_CUH
