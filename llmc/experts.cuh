/*
experts.cuh - the OmniMoE atomic experts on the GPU (docs/design.md §2, §3), forward and backward,
in two executions that compute the same function bit for bit.

Defines:
- ExpertsOptions {N, k, exec, accumulate}: the experts' shape and options; exec is
  EXPERT_EXEC_TOKEN or EXPERT_EXEC_EXPERT (config.h), the two executions
- experts_forward(Y, s, X, U, V, idx, gate, sched, BT, C, opt, stream)
- experts_backward(dX, dU, dV, dgate, dY, X, U, V, idx, gate, s, sched, BT, C, opt,
                   scratch, scratch_bytes, stream)
- experts_backward_scratch_bytes(BT, C, k)

Math (pair p = t*k + m, expert e = idx[p], g = gate[p]):
  s_p = <u_e, x_t>,  a_p = g SiLU(s_p),  Y_t (+)= sum_{m=0..k-1} a_p v_e
  h_p = <dY_t, v_e>,  dgate_p = h_p SiLU(s_p),  ds_p = h_p g SiLU'(s_p)
  dX_t (+)= sum_m ds_p u_e;  dU_e += sum_{pairs of e} ds_p x_t;  dV_e += sum_{pairs of e} a_p dY_t
Shapes: X, Y, dY, dX (BT, C) floatX; U, V, dU, dV (N, C) floatX; idx (BT, k) int32;
gate, s, dgate (BT, k) fp32. C must be a multiple of 8 (4 with ENABLE_FP32) and <= 4096 (2048).

Output conventions:
- Y: opt.accumulate = 1 -> Y = Y + expert_sum (Y holds the SwiGLU branch output on entry, so no
  extra pass); accumulate = 0 -> Y = expert_sum. The add is done in fp32, rounded once.
- s (BT, k) fp32: saved pre-activation scores (the backward needs them; a is recomputed).
- dX: opt.accumulate = 1 -> dX += expert part; 0 -> dX = expert part. router_backward then adds
  the router part with its GEMM.
- dU, dV: always += (gradient accumulation); rows of experts no token chose are not touched.
- dgate (BT, k) fp32: overwritten; it is the input of router_backward.

Executions (opt.exec):
- token-centric (PEER-style): one warp per token gathers its k rows of U and V.
- expert-centric (Expert-Centric Scheduling): the pairs sorted by expert (scheduler.cuh) are cut
  into groups of G consecutive active experts; a block stages the group's G expert rows in
  shared memory once and computes the per-pair dot products (s forward, h backward) of all the
  group's pairs against them, each written into the pair's own slot. The per-token sums
  (Y, dX) then run per token over m = 0..k-1 in fixed order.
Both executions compute every dot product with the same lane layout and the same fixed-order
butterfly, so their outputs are bitwise identical (the test checks it).
dU/dV (both executions): a segmented reduction over the expert-sorted pairs, cut into fixed
chunks of EXPERTS_SEG_CHUNK pairs (work independent of the busiest expert); a segment inside a
chunk is summed in sorted order and added to its row directly; a segment spanning chunks is
summed per chunk into scratch and combined in chunk order by a second kernel. No atomics.

Tensor cores are not used: each pair needs one C-long dot product (s or h) and one axpy, i.e.
about 1 FLOP per byte of expert row moved, far below the ~300 FLOP/byte where tensor cores
would pay; the kernels are bound by moving the rows (see dev/cuda/bench_omni.cu).
No host synchronisation anywhere (graph-capturable); grids are sized by upper bounds
(min(N, BT*k) active experts) with early-exit blocks.
*/
#ifndef OMNIMOE_EXPERTS_CUH
#define OMNIMOE_EXPERTS_CUH

#include "config.h"   // EXPERT_EXEC_*
#include "cuda_utils.cuh"
#include "scheduler.cuh"

#define EXPERTS_WARPS_PER_BLOCK 4        // token kernels: one warp per token
#define EXPERTS_M_BATCH 4                // experts per token processed together (loads in flight)
#define EXPERTS_GROUP_MAX 16             // G: active experts per expert-centric group (at most)
#define EXPERTS_GROUP_TARGET_PAIRS 64    // aim for about this many pairs per group
#define EXPERTS_GROUP_SMEM (48 * 1024)   // shared memory for a group's staged rows
#define EXPERTS_GROUP_THREADS 256
#define EXPERTS_GROUP_PAIRS 4            // pairs per warp step in the group kernel
#define EXPERTS_SEG_CHUNK 64             // sorted pairs per block of the dU/dV reduction
#define EXPERTS_SEG_THREADS 128

// elements of floatX in one 16-byte vector, and the elements one warp covers per step
#define EXPERTS_VEC ((int)(16 / sizeof(floatX)))
#define EXPERTS_WARP_SPAN (32 * EXPERTS_VEC)
#define EXPERTS_MAX_C (16 * EXPERTS_WARP_SPAN)

__device__ inline float experts_sigmoid(float s) { return 1.0f / (1.0f + expf(-s)); }
__device__ inline float experts_silu(float s) { return s / (1.0f + expf(-s)); }
// SiLU'(s) = sigmoid(s) (1 + s (1 - sigmoid(s))); the sharded owner's kernel (experts_shard.cuh) uses it too
__device__ inline float experts_dsilu(float s) {
    const float sg = experts_sigmoid(s);
    return sg * (1.0f + s * (1.0f - sg));
}

// group size G: about EXPERTS_GROUP_TARGET_PAIRS pairs per group (from the mean number of pairs
// per expert, P / min(N, P)), so that busy experts still give many blocks; at most
// EXPERTS_GROUP_MAX and what fits the shared-memory budget. G changes only the grouping: every
// pair's dot product is computed the same way whatever G is.
static inline int experts_group_size(int C, int P, int N) {
    int b = (int)(EXPERTS_GROUP_SMEM / ((size_t)C * sizeof(floatX)));
    if (b > EXPERTS_GROUP_MAX) { b = EXPERTS_GROUP_MAX; }
    const int pairs_per_expert = ceil_div(P, P < N ? P : N);
    int target = EXPERTS_GROUP_TARGET_PAIRS / pairs_per_expert;
    if (target < 1) { target = 1; }
    return b < target ? b : target;
}

// ----------------------------------------------------------------------------
// the one dot-product layout: lane L covers the 16-byte vectors at L*VEC, L*VEC + 32*VEC, ...
// and accumulates them with fmaf in that order; then warp_reduce_sum (xor butterfly).

template <int NQ>
__device__ inline float experts_dot_regs(const x128 (&tok)[NQ], const floatX* row, int C, int lane) {
    float acc = 0.0f;
#pragma unroll
    for (int q = 0; q < NQ; q++) {
        int c = (q * 32 + lane) * EXPERTS_VEC;
        if (c < C) {
            x128 r = load128(row + c);
#pragma unroll
            for (int i = 0; i < EXPERTS_VEC; i++) { acc = fmaf((float)tok[q][i], (float)r[i], acc); }
        }
    }
    return acc;
}

__device__ inline float experts_dot_mem(const floatX* tok, const floatX* row, int C, int lane) {
    float acc = 0.0f;
    for (int c = lane * EXPERTS_VEC; c < C; c += EXPERTS_WARP_SPAN) {
        x128 a = load128(tok + c);
        x128 r = load128(row + c);
#pragma unroll
        for (int i = 0; i < EXPERTS_VEC; i++) { acc = fmaf((float)a[i], (float)r[i], acc); }
    }
    return acc;
}

// ----------------------------------------------------------------------------
// token kernels (one warp per token)

// Y_t (+)= sum_m g SiLU(s) v_e. COMPUTE_S: s = <u_e, x_t> here (token-centric) and saved;
// otherwise s is read from s_buf (expert-centric, computed by experts_group_dot_kernel).
template <int NQ, bool COMPUTE_S>
__global__ void __launch_bounds__(EXPERTS_WARPS_PER_BLOCK * 32)
experts_token_forward_kernel(floatX* Y, float* s_buf, const floatX* X, const floatX* U, const floatX* V,
                             const int* idx, const float* gate, int BT, int C, int k, int accumulate) {
    const int lane = threadIdx.x % 32;
    const int t = blockIdx.x * EXPERTS_WARPS_PER_BLOCK + threadIdx.x / 32;
    if (t >= BT) { return; }
    x128 xr[NQ];
    if (COMPUTE_S) {
#pragma unroll
        for (int q = 0; q < NQ; q++) {
            int c = (q * 32 + lane) * EXPERTS_VEC;
            if (c < C) { xr[q] = load128(X + (size_t)t * C + c); }
        }
    }
    float acc[NQ][EXPERTS_VEC];
#pragma unroll
    for (int q = 0; q < NQ; q++) {
#pragma unroll
        for (int i = 0; i < EXPERTS_VEC; i++) { acc[q][i] = 0.0f; }
    }
    const int* idx_t = idx + (size_t)t * k;
    const float* gate_t = gate + (size_t)t * k;
    float* s_t = s_buf + (size_t)t * k;
    for (int m0 = 0; m0 < k; m0 += EXPERTS_M_BATCH) {
        int e[EXPERTS_M_BATCH];
        float s[EXPERTS_M_BATCH];
#pragma unroll
        for (int j = 0; j < EXPERTS_M_BATCH; j++) { e[j] = (m0 + j < k) ? idx_t[m0 + j] : -1; }
        if (COMPUTE_S) {
            float part[EXPERTS_M_BATCH];
#pragma unroll
            for (int j = 0; j < EXPERTS_M_BATCH; j++) {
                part[j] = e[j] >= 0 ? experts_dot_regs<NQ>(xr, U + (size_t)e[j] * C, C, lane) : 0.0f;
            }
#pragma unroll
            for (int j = 0; j < EXPERTS_M_BATCH; j++) {
                s[j] = warp_reduce_sum(part[j]);
                if (e[j] >= 0 && lane == j) { s_t[m0 + j] = s[j]; }
            }
        } else {
#pragma unroll
            for (int j = 0; j < EXPERTS_M_BATCH; j++) { s[j] = e[j] >= 0 ? s_t[m0 + j] : 0.0f; }
        }
#pragma unroll
        for (int j = 0; j < EXPERTS_M_BATCH; j++) {
            if (e[j] < 0) { continue; }
            const float a = gate_t[m0 + j] * experts_silu(s[j]);
            const floatX* vrow = V + (size_t)e[j] * C;
#pragma unroll
            for (int q = 0; q < NQ; q++) {
                int c = (q * 32 + lane) * EXPERTS_VEC;
                if (c < C) {
                    x128 v = load128(vrow + c);
#pragma unroll
                    for (int i = 0; i < EXPERTS_VEC; i++) { acc[q][i] = fmaf(a, (float)v[i], acc[q][i]); }
                }
            }
        }
    }
#pragma unroll
    for (int q = 0; q < NQ; q++) {
        int c = (q * 32 + lane) * EXPERTS_VEC;
        if (c < C) {
            floatX* yp = Y + (size_t)t * C + c;
            x128 old = accumulate ? load128(yp) : x128::constant((floatX)0.0f);
            x128 out;
#pragma unroll
            for (int i = 0; i < EXPERTS_VEC; i++) {
                float base = accumulate ? (float)old[i] : 0.0f;
                out[i] = (floatX)(base + acc[q][i]);
            }
            store128(yp, out);
        }
    }
}

// per pair: h, dgate, ds; dX_t (+)= sum_m ds u_e. COMPUTE_H: h = <dY_t, v_e> here
// (token-centric); otherwise h is read from h_buf (expert-centric).
template <int NQ, bool COMPUTE_H>
__global__ void __launch_bounds__(EXPERTS_WARPS_PER_BLOCK * 32)
experts_token_backward_kernel(floatX* dX, float* dgate, float* ds_buf, const float* h_buf, const floatX* dY,
                              const floatX* U, const floatX* V, const int* idx, const float* gate,
                              const float* s_buf, int BT, int C, int k, int accumulate) {
    const int lane = threadIdx.x % 32;
    const int t = blockIdx.x * EXPERTS_WARPS_PER_BLOCK + threadIdx.x / 32;
    if (t >= BT) { return; }
    x128 dyr[NQ];
    if (COMPUTE_H) {
#pragma unroll
        for (int q = 0; q < NQ; q++) {
            int c = (q * 32 + lane) * EXPERTS_VEC;
            if (c < C) { dyr[q] = load128(dY + (size_t)t * C + c); }
        }
    }
    float acc[NQ][EXPERTS_VEC];
#pragma unroll
    for (int q = 0; q < NQ; q++) {
#pragma unroll
        for (int i = 0; i < EXPERTS_VEC; i++) { acc[q][i] = 0.0f; }
    }
    const size_t pair0 = (size_t)t * k;
    for (int m0 = 0; m0 < k; m0 += EXPERTS_M_BATCH) {
        int e[EXPERTS_M_BATCH];
        float h[EXPERTS_M_BATCH];
#pragma unroll
        for (int j = 0; j < EXPERTS_M_BATCH; j++) { e[j] = (m0 + j < k) ? idx[pair0 + m0 + j] : -1; }
        if (COMPUTE_H) {
            float part[EXPERTS_M_BATCH];
#pragma unroll
            for (int j = 0; j < EXPERTS_M_BATCH; j++) {
                part[j] = e[j] >= 0 ? experts_dot_regs<NQ>(dyr, V + (size_t)e[j] * C, C, lane) : 0.0f;
            }
#pragma unroll
            for (int j = 0; j < EXPERTS_M_BATCH; j++) { h[j] = warp_reduce_sum(part[j]); }
        } else {
#pragma unroll
            for (int j = 0; j < EXPERTS_M_BATCH; j++) { h[j] = e[j] >= 0 ? h_buf[pair0 + m0 + j] : 0.0f; }
        }
#pragma unroll
        for (int j = 0; j < EXPERTS_M_BATCH; j++) {
            if (e[j] < 0) { continue; }
            const size_t p = pair0 + m0 + j;
            const float s = s_buf[p], g = gate[p];
            const float dsilu = experts_dsilu(s);
            const float ds = h[j] * g * dsilu;
            if (lane == j) {
                dgate[p] = h[j] * experts_silu(s);
                ds_buf[p] = ds;
            }
            const floatX* urow = U + (size_t)e[j] * C;
#pragma unroll
            for (int q = 0; q < NQ; q++) {
                int c = (q * 32 + lane) * EXPERTS_VEC;
                if (c < C) {
                    x128 u = load128(urow + c);
#pragma unroll
                    for (int i = 0; i < EXPERTS_VEC; i++) { acc[q][i] = fmaf(ds, (float)u[i], acc[q][i]); }
                }
            }
        }
    }
#pragma unroll
    for (int q = 0; q < NQ; q++) {
        int c = (q * 32 + lane) * EXPERTS_VEC;
        if (c < C) {
            floatX* xp = dX + (size_t)t * C + c;
            x128 old = accumulate ? load128(xp) : x128::constant((floatX)0.0f);
            x128 out;
#pragma unroll
            for (int i = 0; i < EXPERTS_VEC; i++) {
                float base = accumulate ? (float)old[i] : 0.0f;
                out[i] = (floatX)(base + acc[q][i]);
            }
            store128(xp, out);
        }
    }
}

// ----------------------------------------------------------------------------
// expert-centric group kernel: out_pair[p] = <token_rows[t_p], expert_rows[e_p]> for every
// pair of a group of G consecutive active experts, whose rows are staged in shared memory once.
// Forward: (U, X) -> s. Backward: (V, dY) -> h. Grid: ceil(min(N, P) / G) blocks, the ones past
// the active experts exit at once.
__global__ void __launch_bounds__(EXPERTS_GROUP_THREADS)
experts_group_dot_kernel(float* out_pair, const floatX* expert_rows, const floatX* token_rows,
                         ExpertSchedule sched, int k, int C, int G) {
    extern __shared__ int4 experts_group_smem[];  // int4: 16-byte aligned
    floatX* rows = (floatX*)experts_group_smem;
    const int num_active = sched.num_active[0];
    const int a0 = blockIdx.x * G;
    if (a0 >= num_active) { return; }
    const int a1 = min(a0 + G, num_active);
    const int vecs_per_row = C / EXPERTS_VEC;
    for (int v = threadIdx.x; v < (a1 - a0) * vecs_per_row; v += blockDim.x) {
        int r = v / vecs_per_row;
        int c = (v - r * vecs_per_row) * EXPERTS_VEC;
        store128(rows + (size_t)r * C + c, load128(expert_rows + (size_t)sched.active_expert[a0 + r] * C + c));
    }
    __syncthreads();
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, num_warps = blockDim.x / 32;
    const int p_begin = sched.active_offset[a0], p_end = sched.active_offset[a1];
    // EXPERTS_GROUP_PAIRS pairs per warp step: that many token rows in flight
    for (int p = p_begin + warp; p < p_end; p += EXPERTS_GROUP_PAIRS * num_warps) {
        int pair[EXPERTS_GROUP_PAIRS];
        float part[EXPERTS_GROUP_PAIRS];
#pragma unroll
        for (int j = 0; j < EXPERTS_GROUP_PAIRS; j++) {
            const int pj = p + j * num_warps;
            pair[j] = -1;
            part[j] = 0.0f;
            if (pj < p_end) {
                pair[j] = sched.sorted_pair[pj];
                const int r = sched.sorted_active[pj] - a0;
                part[j] = experts_dot_mem(token_rows + (size_t)(pair[j] / k) * C, rows + (size_t)r * C, C, lane);
            }
        }
#pragma unroll
        for (int j = 0; j < EXPERTS_GROUP_PAIRS; j++) {
            const float sum = warp_reduce_sum(part[j]);
            if (lane == j && pair[j] >= 0) { out_pair[pair[j]] = sum; }
        }
    }
}

// ----------------------------------------------------------------------------
// dU / dV: segmented reduction over the expert-sorted pairs

// One block per chunk of EXPERTS_SEG_CHUNK sorted pairs; each thread owns 16-byte column
// vectors. The chunk's per-pair data (token row, ds, a = g SiLU(s), active index) is staged in
// shared memory first. For each expert segment (run of equal experts) in the chunk: sum ds x_t
// and a dY_t in sorted order. Segment wholly inside the chunk -> added to dU_e, dV_e here.
// Segment that starts here and continues -> tail partial of this chunk; segment that started in
// an earlier chunk -> head partial of this chunk (fp32 scratch, combined by
// experts_segment_fixup_kernel).
__global__ void __launch_bounds__(EXPERTS_SEG_THREADS)
experts_segment_grad_kernel(floatX* dU, floatX* dV, float* head_u, float* head_v, float* tail_u, float* tail_v,
                            const float* ds_buf, const float* gate, const float* s_buf,
                            const floatX* X, const floatX* dY, ExpertSchedule sched, int P, int k, int C) {
    __shared__ int pair_token[EXPERTS_SEG_CHUNK];
    __shared__ int pair_active[EXPERTS_SEG_CHUNK];
    __shared__ float pair_ds[EXPERTS_SEG_CHUNK];
    __shared__ float pair_a[EXPERTS_SEG_CHUNK];
    const int chunk = blockIdx.x;
    const int p0 = chunk * EXPERTS_SEG_CHUNK;
    const int p1 = min(P, p0 + EXPERTS_SEG_CHUNK);
    const int count = p1 - p0;
    for (int q = threadIdx.x; q < count; q += blockDim.x) {
        const int pair = sched.sorted_pair[p0 + q];
        pair_token[q] = pair / k;
        pair_active[q] = sched.sorted_active[p0 + q];
        pair_ds[q] = ds_buf[pair];
        pair_a[q] = gate[pair] * experts_silu(s_buf[pair]);
    }
    __syncthreads();
    for (int c = threadIdx.x * EXPERTS_VEC; c < C; c += blockDim.x * EXPERTS_VEC) {
        int q = 0;
        while (q < count) {
            const int a = pair_active[q];
            const int seg_begin = sched.active_offset[a];
            const int seg_end = sched.active_offset[a + 1];
            const int q_end = max(min(seg_end, p1) - p0, q + 1);  // max: never loop forever on a corrupt schedule
            float acc_u[EXPERTS_VEC], acc_v[EXPERTS_VEC];
#pragma unroll
            for (int i = 0; i < EXPERTS_VEC; i++) { acc_u[i] = 0.0f; acc_v[i] = 0.0f; }
            int qq = q;
            for (; qq + 4 <= q_end; qq += 4) {  // four pairs' rows in flight, summed in order
                x128 xv[4], dyv[4];
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    const size_t row = (size_t)pair_token[qq + j] * C + c;
                    xv[j] = load128(X + row);
                    dyv[j] = load128(dY + row);
                }
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    const float ds = pair_ds[qq + j], av = pair_a[qq + j];
#pragma unroll
                    for (int i = 0; i < EXPERTS_VEC; i++) {
                        acc_u[i] = fmaf(ds, (float)xv[j][i], acc_u[i]);
                        acc_v[i] = fmaf(av, (float)dyv[j][i], acc_v[i]);
                    }
                }
            }
            for (; qq < q_end; qq++) {
                const size_t row = (size_t)pair_token[qq] * C + c;
                const x128 xv = load128(X + row), dyv = load128(dY + row);
                const float ds = pair_ds[qq], av = pair_a[qq];
#pragma unroll
                for (int i = 0; i < EXPERTS_VEC; i++) {
                    acc_u[i] = fmaf(ds, (float)xv[i], acc_u[i]);
                    acc_v[i] = fmaf(av, (float)dyv[i], acc_v[i]);
                }
            }
            if (seg_begin >= p0 && seg_end <= p1) {
                const size_t o = (size_t)sched.active_expert[a] * C + c;
                x128 u_old = load128(dU + o), v_old = load128(dV + o);
                x128 u_new, v_new;
#pragma unroll
                for (int i = 0; i < EXPERTS_VEC; i++) {
                    u_new[i] = (floatX)((float)u_old[i] + acc_u[i]);
                    v_new[i] = (floatX)((float)v_old[i] + acc_v[i]);
                }
                store128(dU + o, u_new);
                store128(dV + o, v_new);
            } else {
                float* pu = (seg_begin >= p0 ? tail_u : head_u) + (size_t)chunk * C + c;
                float* pv = (seg_begin >= p0 ? tail_v : head_v) + (size_t)chunk * C + c;
#pragma unroll
                for (int i = 0; i < EXPERTS_VEC; i++) { pu[i] = acc_u[i]; pv[i] = acc_v[i]; }
            }
            q = q_end;
        }
    }
}

// For each expert segment that starts in chunk c and continues past it: dU_e += tail[c] +
// head[c+1] + ... + head[c_last] in that order (likewise dV). Block c does it.
__global__ void __launch_bounds__(EXPERTS_SEG_THREADS)
experts_segment_fixup_kernel(floatX* dU, floatX* dV, const float* head_u, const float* head_v,
                             const float* tail_u, const float* tail_v, ExpertSchedule sched, int P, int C) {
    const int chunk = blockIdx.x;
    const int p0 = chunk * EXPERTS_SEG_CHUNK;
    const int p1 = min(P, p0 + EXPERTS_SEG_CHUNK);
    const int a = sched.sorted_active[p1 - 1];
    const int seg_begin = sched.active_offset[a];
    const int seg_end = sched.active_offset[a + 1];
    if (!(seg_begin >= p0 && seg_end > p1)) { return; }
    const int chunk_last = (seg_end - 1) / EXPERTS_SEG_CHUNK;
    const size_t o_row = (size_t)sched.active_expert[a] * C;
    for (int c = threadIdx.x * EXPERTS_VEC; c < C; c += blockDim.x * EXPERTS_VEC) {
        float acc_u[EXPERTS_VEC], acc_v[EXPERTS_VEC];
#pragma unroll
        for (int i = 0; i < EXPERTS_VEC; i++) {
            acc_u[i] = tail_u[(size_t)chunk * C + c + i];
            acc_v[i] = tail_v[(size_t)chunk * C + c + i];
        }
        for (int ch = chunk + 1; ch <= chunk_last; ch++) {
#pragma unroll
            for (int i = 0; i < EXPERTS_VEC; i++) {
                acc_u[i] += head_u[(size_t)ch * C + c + i];
                acc_v[i] += head_v[(size_t)ch * C + c + i];
            }
        }
        x128 u_old = load128(dU + o_row + c), v_old = load128(dV + o_row + c);
        x128 u_new, v_new;
#pragma unroll
        for (int i = 0; i < EXPERTS_VEC; i++) {
            u_new[i] = (floatX)((float)u_old[i] + acc_u[i]);
            v_new[i] = (floatX)((float)v_old[i] + acc_v[i]);
        }
        store128(dU + o_row + c, u_new);
        store128(dV + o_row + c, v_new);
    }
}

// ----------------------------------------------------------------------------
// launchers

static inline int experts_num_seg_chunks(int P) { return ceil_div(P, EXPERTS_SEG_CHUNK); }

// scratch: ds (P), h (P), and the head/tail partials of dU and dV (4 x chunks x C), fp32
static inline size_t experts_backward_scratch_bytes(int BT, int C, int k) {
    const size_t P = (size_t)BT * k;
    return 2 * align256(P * sizeof(float))
         + 4 * align256((size_t)experts_num_seg_chunks((int)P) * C * sizeof(float));
}

typedef struct {
    int N;           // experts
    int k;           // experts per token
    int exec;        // EXPERT_EXEC_TOKEN or EXPERT_EXEC_EXPERT: the same bits either way
    int accumulate;  // 1: Y += experts (forward), dX += expert part (backward); 0: = instead
} ExpertsOptions;

static inline void experts_check_args(const char* who, int BT, int C, ExpertsOptions opt) {
    const char* why = NULL;
    const int k = opt.k, N = opt.N;
    if (BT < 1) why = "BT >= 1";
    else if (k < 1 || k > N) why = "1 <= k <= N";
    else if (C < EXPERTS_VEC || C % EXPERTS_VEC != 0) why = "C a positive multiple of 8 (4 for fp32)";
    else if (C > EXPERTS_MAX_C) why = "C <= 4096 (2048 for fp32)";
    else if ((long long)BT * k > 0x7fffffffLL) why = "BT*k < 2^31";
    else if (opt.exec != EXPERT_EXEC_TOKEN && opt.exec != EXPERT_EXEC_EXPERT) why = "exec token or expert";
    if (why != NULL) {
        fprintf(stderr, "%s: bad arguments BT=%d C=%d k=%d N=%d exec=%d: expected %s\n", who, BT, C, k, N, opt.exec,
                why);
        exit(EXIT_FAILURE);
    }
}

// token-warp layout: NQ 16-byte vectors per lane covers C <= NQ * 32 * VEC
static inline int experts_nq(int C) {
    int needed = ceil_div(C, EXPERTS_WARP_SPAN);
    int nq = 1;
    while (nq < needed) { nq *= 2; }
    return nq;
}

template <bool COMPUTE_S>
static void experts_launch_token_forward(floatX* Y, float* s, const floatX* X, const floatX* U, const floatX* V,
                                         const int* idx, const float* gate, int BT, int C, int k, int accumulate,
                                         cudaStream_t stream) {
    dim3 grid(ceil_div(BT, EXPERTS_WARPS_PER_BLOCK)), block(EXPERTS_WARPS_PER_BLOCK * 32);
    switch (experts_nq(C)) {
        case 1: experts_token_forward_kernel<1, COMPUTE_S><<<grid, block, 0, stream>>>(Y, s, X, U, V, idx, gate, BT, C, k, accumulate); break;
        case 2: experts_token_forward_kernel<2, COMPUTE_S><<<grid, block, 0, stream>>>(Y, s, X, U, V, idx, gate, BT, C, k, accumulate); break;
        case 4: experts_token_forward_kernel<4, COMPUTE_S><<<grid, block, 0, stream>>>(Y, s, X, U, V, idx, gate, BT, C, k, accumulate); break;
        case 8: experts_token_forward_kernel<8, COMPUTE_S><<<grid, block, 0, stream>>>(Y, s, X, U, V, idx, gate, BT, C, k, accumulate); break;
        default: experts_token_forward_kernel<16, COMPUTE_S><<<grid, block, 0, stream>>>(Y, s, X, U, V, idx, gate, BT, C, k, accumulate); break;
    }
    cudaCheckLast();
}

template <bool COMPUTE_H>
static void experts_launch_token_backward(floatX* dX, float* dgate, float* ds, const float* h, const floatX* dY,
                                          const floatX* U, const floatX* V, const int* idx, const float* gate,
                                          const float* s, int BT, int C, int k, int accumulate, cudaStream_t stream) {
    dim3 grid(ceil_div(BT, EXPERTS_WARPS_PER_BLOCK)), block(EXPERTS_WARPS_PER_BLOCK * 32);
    switch (experts_nq(C)) {
        case 1: experts_token_backward_kernel<1, COMPUTE_H><<<grid, block, 0, stream>>>(dX, dgate, ds, h, dY, U, V, idx, gate, s, BT, C, k, accumulate); break;
        case 2: experts_token_backward_kernel<2, COMPUTE_H><<<grid, block, 0, stream>>>(dX, dgate, ds, h, dY, U, V, idx, gate, s, BT, C, k, accumulate); break;
        case 4: experts_token_backward_kernel<4, COMPUTE_H><<<grid, block, 0, stream>>>(dX, dgate, ds, h, dY, U, V, idx, gate, s, BT, C, k, accumulate); break;
        case 8: experts_token_backward_kernel<8, COMPUTE_H><<<grid, block, 0, stream>>>(dX, dgate, ds, h, dY, U, V, idx, gate, s, BT, C, k, accumulate); break;
        default: experts_token_backward_kernel<16, COMPUTE_H><<<grid, block, 0, stream>>>(dX, dgate, ds, h, dY, U, V, idx, gate, s, BT, C, k, accumulate); break;
    }
    cudaCheckLast();
}

static void experts_launch_group_dot(float* out_pair, const floatX* expert_rows, const floatX* token_rows,
                                     ExpertSchedule sched, int BT, int C, int k, int N, cudaStream_t stream) {
    const int G = experts_group_size(C, BT * k, N);
    const int groups = ceil_div(scheduler_max_active(BT * k, N), G);
    const size_t smem = (size_t)G * C * sizeof(floatX);
    experts_group_dot_kernel<<<groups, EXPERTS_GROUP_THREADS, smem, stream>>>(out_pair, expert_rows, token_rows, sched, k, C, G);
    cudaCheckLast();
}

// dU, dV += the segment sums over the P expert-sorted pairs of sched (the two kernels above):
// ds_p X_t and gate_p SiLU(s_p) dY_t. partials: 4 * align256(chunks * C floats) of scratch.
// (The column-sharded experts, llmc/experts_shard.cuh, call it on a rank's slices.)
static void experts_launch_segment_grads(floatX* dU, floatX* dV, const float* ds, const float* gate, const float* s,
                                         const floatX* X, const floatX* dY, ExpertSchedule sched, int P, int k, int C,
                                         char* partials, cudaStream_t stream) {
    const int num_chunks = experts_num_seg_chunks(P);
    const size_t part_bytes = align256((size_t)num_chunks * C * sizeof(float));
    float* head_u = (float*)partials;
    float* head_v = (float*)(partials + part_bytes);
    float* tail_u = (float*)(partials + 2 * part_bytes);
    float* tail_v = (float*)(partials + 3 * part_bytes);
    // a thread owns one 16-byte column vector per pass: no more threads than C has vectors
    // (C = 768: 96, not 128 with a quarter idle); the sums per column are the same either way
    const int seg_threads = min(EXPERTS_SEG_THREADS, ceil_div(C / EXPERTS_VEC, 32) * 32);
    experts_segment_grad_kernel<<<num_chunks, seg_threads, 0, stream>>>(dU, dV, head_u, head_v, tail_u, tail_v,
                                                                        ds, gate, s, X, dY, sched, P, k, C);
    cudaCheckLast();
    experts_segment_fixup_kernel<<<num_chunks, seg_threads, 0, stream>>>(dU, dV, head_u, head_v, tail_u, tail_v,
                                                                         sched, P, C);
    cudaCheckLast();
}

// Forward. Y, s: outputs (see the conventions above). sched: the schedule of idx
// (scheduler_build), used only by the expert-centric execution (the token-centric one ignores it).
static void experts_forward(floatX* Y, float* s, const floatX* X, const floatX* U, const floatX* V,
                            const int* idx, const float* gate, ExpertSchedule sched, int BT, int C,
                            ExpertsOptions opt, cudaStream_t stream) {
    experts_check_args("experts_forward", BT, C, opt);
    const int k = opt.k, N = opt.N;
    if (opt.exec == EXPERT_EXEC_TOKEN) {
        experts_launch_token_forward<true>(Y, s, X, U, V, idx, gate, BT, C, k, opt.accumulate, stream);
    } else {
        experts_launch_group_dot(s, U, X, sched, BT, C, k, N, stream);
        experts_launch_token_forward<false>(Y, s, X, U, V, idx, gate, BT, C, k, opt.accumulate, stream);
    }
}

// Backward. Outputs: dX (+)=, dU +=, dV +=, dgate =. Saved from the forward: idx, gate, s and
// the schedule (both executions use it for dU/dV). scratch: experts_backward_scratch_bytes(BT, C, k).
static void experts_backward(floatX* dX, floatX* dU, floatX* dV, float* dgate,
                             const floatX* dY, const floatX* X, const floatX* U, const floatX* V,
                             const int* idx, const float* gate, const float* s, ExpertSchedule sched,
                             int BT, int C, ExpertsOptions opt, void* scratch, size_t scratch_bytes,
                             cudaStream_t stream) {
    experts_check_args("experts_backward", BT, C, opt);
    const int k = opt.k, N = opt.N;
    const size_t need = experts_backward_scratch_bytes(BT, C, k);
    if (scratch == NULL || scratch_bytes < need) {
        fprintf(stderr, "experts_backward: scratch of %zu bytes given, %zu needed\n", scratch_bytes, need);
        exit(EXIT_FAILURE);
    }
    const int P = BT * k;
    char* base = (char*)scratch;
    float* ds = (float*)base;
    base += align256((size_t)P * sizeof(float));
    float* h = (float*)base;
    base += align256((size_t)P * sizeof(float));

    if (opt.exec == EXPERT_EXEC_TOKEN) {
        experts_launch_token_backward<true>(dX, dgate, ds, NULL, dY, U, V, idx, gate, s, BT, C, k, opt.accumulate, stream);
    } else {
        experts_launch_group_dot(h, V, dY, sched, BT, C, k, N, stream);
        experts_launch_token_backward<false>(dX, dgate, ds, h, dY, U, V, idx, gate, s, BT, C, k, opt.accumulate, stream);
    }
    experts_launch_segment_grads(dU, dV, ds, gate, s, X, dY, sched, P, k, C, base, stream);
}

#endif  // OMNIMOE_EXPERTS_CUH
