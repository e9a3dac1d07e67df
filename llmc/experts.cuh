/*
experts.cuh - the OmniMoE atomic experts on the GPU (SPEC §2, §3), forward and backward,
in two executions that compute the same function bit for bit.

Defines:
- experts_forward(Y, s, X, U, V, idx, gate, sched, T, d, k, N, mode, accumulate, stream)
- experts_backward(dX, dU, dV, dgate, dY, X, U, V, idx, gate, s, sched, T, d, k, N, mode,
                   accumulate_dX, scratch, scratch_bytes, stream)
- experts_backward_scratch_bytes(T, d, k)
- EXPERTS_TOKEN_CENTRIC / EXPERTS_EXPERT_CENTRIC: the two executions (mode)

Math (pair p = t*k + m, expert e = idx[p], g = gate[p]):
  s_p = <u_e, x_t>,  a_p = g SiLU(s_p),  Y_t (+)= sum_{m=0..k-1} a_p v_e
  h_p = <dY_t, v_e>,  dgate_p = h_p SiLU(s_p),  ds_p = h_p g SiLU'(s_p)
  dX_t (+)= sum_m ds_p u_e;  dU_e += sum_{pairs of e} ds_p x_t;  dV_e += sum_{pairs of e} a_p dY_t
Shapes: X, Y, dY, dX (T, d) floatX; U, V, dU, dV (N, d) floatX; idx (T, k) int32;
gate, s, dgate (T, k) fp32. d must be a multiple of 8 (4 with ENABLE_FP32) and <= 4096 (2048).

Output conventions:
- Y: accumulate = 1 -> Y = Y + expert_sum (Y holds the SwiGLU branch output on entry, so no
  extra pass); accumulate = 0 -> Y = expert_sum. The add is done in fp32, rounded once.
- s (T, k) fp32: saved pre-activation scores (the backward needs them; a is recomputed).
- dX: accumulate_dX = 1 -> dX += expert part; 0 -> dX = expert part. router_backward then adds
  the router part with its GEMM.
- dU, dV: always += (gradient accumulation); rows of experts no token chose are not touched.
- dgate (T, k) fp32: overwritten; it is the input of router_backward.

Forward executions (mode):
- token-centric (PEER-style): one warp per token gathers its k rows of U and V.
- expert-centric (Expert-Centric Scheduling): the pairs sorted by expert (scheduler.cuh) are cut
  into groups of B consecutive active experts; a block stages the group's B expert rows of U in
  shared memory once and computes the scores s of all the group's pairs against them, each
  written into the pair's own slot. The per-token sums Y then run per token over m = 0..k-1 in
  fixed order.
Both compute every s with the same lane layout and the same fixed-order butterfly, so their
outputs are bitwise identical (the test checks it).
Backward (one execution for both modes, expert-centric): a fused kernel walks the expert-sorted
pairs in fixed chunks of EXPERTS_SEG_CHUNK pairs (work independent of the busiest expert) and
gathers each pair's x_t and dY_t once for h = <dY_t, v_e>, ds, dgate and the per-expert sums
dU_e, dV_e (a segment inside a chunk is summed in sorted order and added to its row directly; a
segment spanning chunks is summed per chunk into scratch and combined in chunk order by a
second kernel); then one warp per token sums dX_t over m = 0..k-1 in fixed order. 3 row gathers
per pair instead of the token-centric 4. No atomics.

Tensor cores are not used: each pair needs one d-long dot product (s or h) and one axpy, i.e.
about 1 FLOP per byte of expert row moved, far below the ~300 FLOP/byte where tensor cores
would pay; the kernels are bound by moving the rows (see dev/cuda/bench_omni.cu).
No host synchronisation anywhere (graph-capturable); grids are sized by upper bounds
(min(N, T*k) active experts) with early-exit blocks.
*/
#ifndef OMNIMOE_EXPERTS_CUH
#define OMNIMOE_EXPERTS_CUH

#include "cuda_utils.cuh"
#include "scheduler.cuh"

#define EXPERTS_TOKEN_CENTRIC 0
#define EXPERTS_EXPERT_CENTRIC 1
#define EXPERTS_WARPS_PER_BLOCK 4        // token kernels: one warp per token
#define EXPERTS_M_BATCH 4                // experts per token processed together (loads in flight)
#define EXPERTS_GROUP_MAX 16             // B: active experts per expert-centric group (at most)
#define EXPERTS_GROUP_TARGET_PAIRS 64    // aim for about this many pairs per group
#define EXPERTS_GROUP_SMEM (48 * 1024)   // shared memory for a group's staged rows
#define EXPERTS_GROUP_THREADS 256
#define EXPERTS_GROUP_PAIRS 4            // pairs per warp step in the group kernel
#ifndef EXPERTS_SEG_CHUNK
#define EXPERTS_SEG_CHUNK 64             // sorted pairs per block of the expert-sorted backward
#endif
#define EXPERTS_SEG_SUB 4                // pairs per step of that block (rows in flight, one barrier)
#define EXPERTS_SEG_MAX_THREADS 512      // one thread per 16-byte column vector: d <= 4096 (2048 fp32)
#define EXPERTS_FIXUP_WARPS 8            // chunks per block of the partials fix-up (one warp each)

// elements of floatX in one 16-byte vector, and the elements one warp covers per step
#define EXPERTS_VEC ((int)(16 / sizeof(floatX)))
#define EXPERTS_WARP_SPAN (32 * EXPERTS_VEC)
#define EXPERTS_MAX_D (16 * EXPERTS_WARP_SPAN)

__device__ inline float experts_sigmoid(float s) { return 1.0f / (1.0f + expf(-s)); }
__device__ inline float experts_silu(float s) { return s / (1.0f + expf(-s)); }

// group size B: about EXPERTS_GROUP_TARGET_PAIRS pairs per group (from the mean number of pairs
// per expert, P / min(N, P)), so that busy experts still give many blocks; at most
// EXPERTS_GROUP_MAX and what fits the shared-memory budget. B changes only the grouping: every
// pair's dot product is computed the same way whatever B is.
static inline int experts_group_size(int d, int P, int N) {
    int b = (int)(EXPERTS_GROUP_SMEM / ((size_t)d * sizeof(floatX)));
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
__device__ inline float experts_dot_regs(const x128 (&tok)[NQ], const floatX* row, int d, int lane) {
    float acc = 0.0f;
#pragma unroll
    for (int q = 0; q < NQ; q++) {
        int c = (q * 32 + lane) * EXPERTS_VEC;
        if (c < d) {
            x128 r = load128(row + c);
#pragma unroll
            for (int i = 0; i < EXPERTS_VEC; i++) { acc = fmaf((float)tok[q][i], (float)r[i], acc); }
        }
    }
    return acc;
}

__device__ inline float experts_dot_mem(const floatX* tok, const floatX* row, int d, int lane) {
    float acc = 0.0f;
    for (int c = lane * EXPERTS_VEC; c < d; c += EXPERTS_WARP_SPAN) {
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
                             const int* idx, const float* gate, int T, int d, int k, int accumulate) {
    const int lane = threadIdx.x % 32;
    const int t = blockIdx.x * EXPERTS_WARPS_PER_BLOCK + threadIdx.x / 32;
    if (t >= T) { return; }
    x128 xr[NQ];
    if (COMPUTE_S) {
#pragma unroll
        for (int q = 0; q < NQ; q++) {
            int c = (q * 32 + lane) * EXPERTS_VEC;
            if (c < d) { xr[q] = load128(X + (size_t)t * d + c); }
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
                part[j] = e[j] >= 0 ? experts_dot_regs<NQ>(xr, U + (size_t)e[j] * d, d, lane) : 0.0f;
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
            const floatX* vrow = V + (size_t)e[j] * d;
#pragma unroll
            for (int q = 0; q < NQ; q++) {
                int c = (q * 32 + lane) * EXPERTS_VEC;
                if (c < d) {
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
        if (c < d) {
            floatX* yp = Y + (size_t)t * d + c;
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

// dX_t (+)= sum_{m=0..k-1} ds_p u_e, in m order; ds was computed per pair by
// experts_segment_backward_kernel.
template <int NQ>
__global__ void __launch_bounds__(EXPERTS_WARPS_PER_BLOCK * 32)
experts_token_dx_kernel(floatX* dX, const float* ds_buf, const floatX* U, const int* idx, int T, int d, int k,
                        int accumulate) {
    const int lane = threadIdx.x % 32;
    const int t = blockIdx.x * EXPERTS_WARPS_PER_BLOCK + threadIdx.x / 32;
    if (t >= T) { return; }
    float acc[NQ][EXPERTS_VEC];
#pragma unroll
    for (int q = 0; q < NQ; q++) {
#pragma unroll
        for (int i = 0; i < EXPERTS_VEC; i++) { acc[q][i] = 0.0f; }
    }
    const size_t pair0 = (size_t)t * k;
    for (int m0 = 0; m0 < k; m0 += EXPERTS_M_BATCH) {
        int e[EXPERTS_M_BATCH];
        float ds[EXPERTS_M_BATCH];
#pragma unroll
        for (int j = 0; j < EXPERTS_M_BATCH; j++) {
            const bool in = m0 + j < k;
            e[j] = in ? idx[pair0 + m0 + j] : -1;
            ds[j] = in ? ds_buf[pair0 + m0 + j] : 0.0f;
        }
#pragma unroll
        for (int j = 0; j < EXPERTS_M_BATCH; j++) {
            if (e[j] < 0) { continue; }
            const floatX* urow = U + (size_t)e[j] * d;
#pragma unroll
            for (int q = 0; q < NQ; q++) {
                int c = (q * 32 + lane) * EXPERTS_VEC;
                if (c < d) {
                    x128 u = load128(urow + c);
#pragma unroll
                    for (int i = 0; i < EXPERTS_VEC; i++) { acc[q][i] = fmaf(ds[j], (float)u[i], acc[q][i]); }
                }
            }
        }
    }
#pragma unroll
    for (int q = 0; q < NQ; q++) {
        int c = (q * 32 + lane) * EXPERTS_VEC;
        if (c < d) {
            floatX* xp = dX + (size_t)t * d + c;
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
// pair of a group of B consecutive active experts, whose rows are staged in shared memory once
// (the expert-centric forward: (U, X) -> s). Grid: ceil(min(N, P) / B) blocks, the ones past
// the active experts exit at once.
__global__ void __launch_bounds__(EXPERTS_GROUP_THREADS)
experts_group_dot_kernel(float* out_pair, const floatX* expert_rows, const floatX* token_rows,
                         ExpertSchedule sched, int k, int d, int B) {
    extern __shared__ int4 experts_group_smem[];  // int4: 16-byte aligned
    floatX* rows = (floatX*)experts_group_smem;
    const int num_active = sched.num_active[0];
    const int a0 = blockIdx.x * B;
    if (a0 >= num_active) { return; }
    const int a1 = min(a0 + B, num_active);
    const int vecs_per_row = d / EXPERTS_VEC;
    for (int v = threadIdx.x; v < (a1 - a0) * vecs_per_row; v += blockDim.x) {
        int r = v / vecs_per_row;
        int c = (v - r * vecs_per_row) * EXPERTS_VEC;
        store128(rows + (size_t)r * d + c, load128(expert_rows + (size_t)sched.active_expert[a0 + r] * d + c));
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
                part[j] = experts_dot_mem(token_rows + (size_t)(pair[j] / k) * d, rows + (size_t)r * d, d, lane);
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
// The backward over the expert-sorted pairs: h, dgate, ds, dU, dV

// Adds a finished segment sum to its expert row, or parks it as this chunk's head or tail
// partial (see experts_segment_backward_kernel). Thread owns columns c .. c + VEC.
__device__ inline void experts_segment_flush(floatX* dU, floatX* dV, float* head_u, float* head_v, float* tail_u,
                                             float* tail_v, const float (&acc_u)[EXPERTS_VEC],
                                             const float (&acc_v)[EXPERTS_VEC], int seg_begin, int seg_end,
                                             int expert, int chunk, int p0, int p1, int c, int d) {
    if (seg_begin >= p0 && seg_end <= p1) {
        const size_t o = (size_t)expert * d + c;
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
        float* pu = (seg_begin >= p0 ? tail_u : head_u) + (size_t)chunk * d + c;
        float* pv = (seg_begin >= p0 ? tail_v : head_v) + (size_t)chunk * d + c;
#pragma unroll
        for (int i = 0; i < EXPERTS_VEC; i += 4) {  // 4 fp32 per 16-byte store
            f128 wu, wv;
#pragma unroll
            for (int j = 0; j < 4; j++) { wu[j] = acc_u[i + j]; wv[j] = acc_v[i + j]; }
            store128(pu + i, wu);
            store128(pv + i, wv);
        }
    }
}

// One block per chunk of EXPERTS_SEG_CHUNK sorted pairs, one thread per 16-byte column vector
// (blockDim = d / VEC rounded up to a warp). Each pair's x_t and dY_t rows are gathered once
// and serve all three products:
//   h = <dY_t, v_e>   per-thread fmaf over its VEC columns, xor butterfly per warp, then the
//                     warp partials added in warp order (fixed: deterministic)
//   dgate = h SiLU(s), ds = h g SiLU'(s)   written to the pair's slot (experts_token_dx_kernel
//                     and the router backward read them)
//   dU_e += ds x_t, dV_e += a dY_t          summed per expert segment in sorted order
// v_e is the same row for all pairs of a segment (L1 hits). The token-centric backward would
// gather v_e and u_e per pair and x_t, dY_t per pair again for dU/dV: 4 row gathers per pair;
// this kernel plus experts_token_dx_kernel (u_e) make it 3.
// Segments wholly inside the chunk are added to dU_e, dV_e here. A segment that starts here and
// continues leaves a tail partial of this chunk, one that started in an earlier chunk a head
// partial (fp32 scratch); experts_segment_fixup_kernel combines them in chunk order. No atomics.
__global__ void __launch_bounds__(EXPERTS_SEG_MAX_THREADS)
experts_segment_backward_kernel(floatX* dU, floatX* dV, float* dgate, float* ds_buf,
                                float* head_u, float* head_v, float* tail_u, float* tail_v,
                                const float* gate, const float* s_buf, const floatX* X, const floatX* dY,
                                const floatX* V, ExpertSchedule sched, int P, int k, int d) {
    __shared__ int pair_id[EXPERTS_SEG_CHUNK];
    __shared__ int pair_token[EXPERTS_SEG_CHUNK];
    __shared__ int pair_expert[EXPERTS_SEG_CHUNK];
    __shared__ int pair_active[EXPERTS_SEG_CHUNK];
    __shared__ float pair_s[EXPERTS_SEG_CHUNK];
    __shared__ float pair_g[EXPERTS_SEG_CHUNK];
    __shared__ float warp_dot[2][EXPERTS_SEG_MAX_THREADS / 32][EXPERTS_SEG_SUB];  // double-buffered
    const int chunk = blockIdx.x;
    const int p0 = chunk * EXPERTS_SEG_CHUNK;
    const int p1 = min(P, p0 + EXPERTS_SEG_CHUNK);
    const int count = p1 - p0;
    for (int q = threadIdx.x; q < count; q += blockDim.x) {
        const int pair = sched.sorted_pair[p0 + q];
        pair_id[q] = pair;
        pair_token[q] = pair / k;
        pair_expert[q] = sched.sorted_expert[p0 + q];
        pair_active[q] = sched.sorted_active[p0 + q];
        pair_s[q] = s_buf[pair];
        pair_g[q] = gate[pair];
    }
    __syncthreads();
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, num_warps = blockDim.x / 32;
    const int c = threadIdx.x * EXPERTS_VEC;
    const bool has_col = c < d;
    float acc_u[EXPERTS_VEC], acc_v[EXPERTS_VEC];
#pragma unroll
    for (int i = 0; i < EXPERTS_VEC; i++) { acc_u[i] = 0.0f; acc_v[i] = 0.0f; }
    int buf = 0;
    for (int q0 = 0; q0 < count; q0 += EXPERTS_SEG_SUB) {
        // EXPERTS_SEG_SUB pairs' rows in flight
        x128 xv[EXPERTS_SEG_SUB], dyv[EXPERTS_SEG_SUB];
        float part[EXPERTS_SEG_SUB];
#pragma unroll
        for (int j = 0; j < EXPERTS_SEG_SUB; j++) {
            const int q = q0 + j;
            part[j] = 0.0f;
            if (q < count && has_col) {
                const size_t row = (size_t)pair_token[q] * d + c;
                xv[j] = load128(X + row);
                dyv[j] = load128(dY + row);
                const x128 vv = load128(V + (size_t)pair_expert[q] * d + c);
#pragma unroll
                for (int i = 0; i < EXPERTS_VEC; i++) { part[j] = fmaf((float)dyv[j][i], (float)vv[i], part[j]); }
            }
        }
#pragma unroll
        for (int j = 0; j < EXPERTS_SEG_SUB; j++) {
            const float w_sum = warp_reduce_sum(part[j]);
            if (lane == 0) { warp_dot[buf][warp][j] = w_sum; }
        }
        __syncthreads();  // one barrier per sub-chunk; the double buffer makes a second unnecessary
#pragma unroll
        for (int j = 0; j < EXPERTS_SEG_SUB; j++) {
            const int q = q0 + j;
            if (q >= count) { continue; }
            float h = 0.0f;
            for (int w = 0; w < num_warps; w++) { h += warp_dot[buf][w][j]; }
            const float s = pair_s[q], g = pair_g[q];
            const float sg = experts_sigmoid(s);
            const float silu = experts_silu(s);
            const float ds = h * g * (sg * (1.0f + s * (1.0f - sg)));
            const float a = g * silu;
            if (threadIdx.x == 0) {
                dgate[pair_id[q]] = h * silu;
                ds_buf[pair_id[q]] = ds;
            }
            if (has_col) {
#pragma unroll
                for (int i = 0; i < EXPERTS_VEC; i++) {
                    acc_u[i] = fmaf(ds, (float)xv[j][i], acc_u[i]);
                    acc_v[i] = fmaf(a, (float)dyv[j][i], acc_v[i]);
                }
            }
            if (q + 1 == count || pair_active[q + 1] != pair_active[q]) {  // segment ends in this chunk
                const int act = pair_active[q];
                if (has_col) {
                    experts_segment_flush(dU, dV, head_u, head_v, tail_u, tail_v, acc_u, acc_v,
                                          sched.active_offset[act], sched.active_offset[act + 1],
                                          pair_expert[q], chunk, p0, p1, c, d);
                }
#pragma unroll
                for (int i = 0; i < EXPERTS_VEC; i++) { acc_u[i] = 0.0f; acc_v[i] = 0.0f; }
            }
        }
        buf ^= 1;
    }
}

// For each expert segment that starts in chunk c and continues past it: dU_e += tail[c] +
// head[c+1] + ... + head[c_last] in that order (likewise dV). One warp per chunk (most chunks
// have such a segment when experts average about a chunk of pairs each, so the work is real,
// but small: a few rows of fp32 partials); EXPERTS_FIXUP_WARPS chunks per block.
__global__ void __launch_bounds__(EXPERTS_FIXUP_WARPS * 32)
experts_segment_fixup_kernel(floatX* dU, floatX* dV, const float* head_u, const float* head_v,
                             const float* tail_u, const float* tail_v, ExpertSchedule sched, int P, int d) {
    const int chunk = blockIdx.x * EXPERTS_FIXUP_WARPS + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int p0 = chunk * EXPERTS_SEG_CHUNK;
    if (p0 >= P) { return; }
    const int p1 = min(P, p0 + EXPERTS_SEG_CHUNK);
    const int a = sched.sorted_active[p1 - 1];
    const int seg_begin = sched.active_offset[a];
    const int seg_end = sched.active_offset[a + 1];
    if (!(seg_begin >= p0 && seg_end > p1)) { return; }
    const int chunk_last = (seg_end - 1) / EXPERTS_SEG_CHUNK;
    const size_t o_row = (size_t)sched.active_expert[a] * d;
    for (int c = lane * EXPERTS_VEC; c < d; c += EXPERTS_WARP_SPAN) {
        float acc_u[EXPERTS_VEC], acc_v[EXPERTS_VEC];
#pragma unroll
        for (int i = 0; i < EXPERTS_VEC; i += 4) {  // fp32 partials: 4 per 16-byte load
            const f128 tu = load128(tail_u + (size_t)chunk * d + c + i), tv = load128(tail_v + (size_t)chunk * d + c + i);
#pragma unroll
            for (int j = 0; j < 4; j++) { acc_u[i + j] = tu[j]; acc_v[i + j] = tv[j]; }
        }
        for (int ch = chunk + 1; ch <= chunk_last; ch++) {
#pragma unroll
            for (int i = 0; i < EXPERTS_VEC; i += 4) {
                const f128 hu = load128(head_u + (size_t)ch * d + c + i), hv = load128(head_v + (size_t)ch * d + c + i);
#pragma unroll
                for (int j = 0; j < 4; j++) { acc_u[i + j] += hu[j]; acc_v[i + j] += hv[j]; }
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
static inline size_t experts_align256(size_t x) { return (x + 255) & ~(size_t)255; }

// scratch: ds (P) and the head/tail partials of dU and dV (4 x chunks x d), fp32
static inline size_t experts_backward_scratch_bytes(int T, int d, int k) {
    const size_t P = (size_t)T * k;
    return experts_align256(P * sizeof(float))
         + 4 * experts_align256((size_t)experts_num_seg_chunks((int)P) * d * sizeof(float));
}

static inline void experts_check_args(const char* who, int T, int d, int k, int N, int mode) {
    const char* why = NULL;
    if (T < 1) why = "T >= 1";
    else if (k < 1 || k > N) why = "1 <= k <= N";
    else if (d < EXPERTS_VEC || d % EXPERTS_VEC != 0) why = "d a positive multiple of 8 (4 for fp32)";
    else if (d > EXPERTS_MAX_D) why = "d <= 4096 (2048 for fp32)";
    else if ((long long)T * k > 0x7fffffffLL) why = "T*k < 2^31";
    else if (mode != EXPERTS_TOKEN_CENTRIC && mode != EXPERTS_EXPERT_CENTRIC) why = "mode EXPERTS_TOKEN_CENTRIC or EXPERTS_EXPERT_CENTRIC";
    if (why != NULL) {
        fprintf(stderr, "%s: bad arguments T=%d d=%d k=%d N=%d mode=%d: expected %s\n", who, T, d, k, N, mode, why);
        exit(EXIT_FAILURE);
    }
}

// token-warp layout: NQ 16-byte vectors per lane covers d <= NQ * 32 * VEC
static inline int experts_nq(int d) {
    int needed = ceil_div(d, EXPERTS_WARP_SPAN);
    int nq = 1;
    while (nq < needed) { nq *= 2; }
    return nq;
}

template <bool COMPUTE_S>
static void experts_launch_token_forward(floatX* Y, float* s, const floatX* X, const floatX* U, const floatX* V,
                                         const int* idx, const float* gate, int T, int d, int k, int accumulate,
                                         cudaStream_t stream) {
    dim3 grid(ceil_div(T, EXPERTS_WARPS_PER_BLOCK)), block(EXPERTS_WARPS_PER_BLOCK * 32);
    switch (experts_nq(d)) {
        case 1: experts_token_forward_kernel<1, COMPUTE_S><<<grid, block, 0, stream>>>(Y, s, X, U, V, idx, gate, T, d, k, accumulate); break;
        case 2: experts_token_forward_kernel<2, COMPUTE_S><<<grid, block, 0, stream>>>(Y, s, X, U, V, idx, gate, T, d, k, accumulate); break;
        case 4: experts_token_forward_kernel<4, COMPUTE_S><<<grid, block, 0, stream>>>(Y, s, X, U, V, idx, gate, T, d, k, accumulate); break;
        case 8: experts_token_forward_kernel<8, COMPUTE_S><<<grid, block, 0, stream>>>(Y, s, X, U, V, idx, gate, T, d, k, accumulate); break;
        default: experts_token_forward_kernel<16, COMPUTE_S><<<grid, block, 0, stream>>>(Y, s, X, U, V, idx, gate, T, d, k, accumulate); break;
    }
    cudaCheckLast();
}

static void experts_launch_token_dx(floatX* dX, const float* ds, const floatX* U, const int* idx,
                                   int T, int d, int k, int accumulate, cudaStream_t stream) {
    dim3 grid(ceil_div(T, EXPERTS_WARPS_PER_BLOCK)), block(EXPERTS_WARPS_PER_BLOCK * 32);
    switch (experts_nq(d)) {
        case 1: experts_token_dx_kernel<1><<<grid, block, 0, stream>>>(dX, ds, U, idx, T, d, k, accumulate); break;
        case 2: experts_token_dx_kernel<2><<<grid, block, 0, stream>>>(dX, ds, U, idx, T, d, k, accumulate); break;
        case 4: experts_token_dx_kernel<4><<<grid, block, 0, stream>>>(dX, ds, U, idx, T, d, k, accumulate); break;
        case 8: experts_token_dx_kernel<8><<<grid, block, 0, stream>>>(dX, ds, U, idx, T, d, k, accumulate); break;
        default: experts_token_dx_kernel<16><<<grid, block, 0, stream>>>(dX, ds, U, idx, T, d, k, accumulate); break;
    }
    cudaCheckLast();
}

static void experts_launch_group_dot(float* out_pair, const floatX* expert_rows, const floatX* token_rows,
                                     ExpertSchedule sched, int T, int d, int k, int N, cudaStream_t stream) {
    const int B = experts_group_size(d, T * k, N);
    const int groups = ceil_div(scheduler_max_active(T * k, N), B);
    const size_t smem = (size_t)B * d * sizeof(floatX);
    experts_group_dot_kernel<<<groups, EXPERTS_GROUP_THREADS, smem, stream>>>(out_pair, expert_rows, token_rows, sched, k, d, B);
    cudaCheckLast();
}

// Forward. Y, s: outputs (see the conventions above). sched: the schedule of idx
// (scheduler_build), used only by the expert-centric mode (the token-centric mode ignores it).
static void experts_forward(floatX* Y, float* s, const floatX* X, const floatX* U, const floatX* V,
                            const int* idx, const float* gate, ExpertSchedule sched,
                            int T, int d, int k, int N, int mode, int accumulate, cudaStream_t stream) {
    experts_check_args("experts_forward", T, d, k, N, mode);
    if (mode == EXPERTS_TOKEN_CENTRIC) {
        experts_launch_token_forward<true>(Y, s, X, U, V, idx, gate, T, d, k, accumulate, stream);
    } else {
        experts_launch_group_dot(s, U, X, sched, T, d, k, N, stream);
        experts_launch_token_forward<false>(Y, s, X, U, V, idx, gate, T, d, k, accumulate, stream);
    }
}

// Backward. Outputs: dX (+)=, dU +=, dV +=, dgate =. Saved from the forward: idx, gate, s and
// the schedule. scratch: experts_backward_scratch_bytes(T, d, k). Both modes run the same
// backward (the expert-sorted fused kernel, then the per-token dX sums), so their gradients are
// the same bits by construction; mode is only checked.
static void experts_backward(floatX* dX, floatX* dU, floatX* dV, float* dgate,
                             const floatX* dY, const floatX* X, const floatX* U, const floatX* V,
                             const int* idx, const float* gate, const float* s, ExpertSchedule sched,
                             int T, int d, int k, int N, int mode, int accumulate_dX,
                             void* scratch, size_t scratch_bytes, cudaStream_t stream) {
    experts_check_args("experts_backward", T, d, k, N, mode);
    const size_t need = experts_backward_scratch_bytes(T, d, k);
    if (scratch == NULL || scratch_bytes < need) {
        fprintf(stderr, "experts_backward: scratch of %zu bytes given, %zu needed\n", scratch_bytes, need);
        exit(EXIT_FAILURE);
    }
    const int P = T * k;
    const int num_chunks = experts_num_seg_chunks(P);
    const size_t part_bytes = experts_align256((size_t)num_chunks * d * sizeof(float));
    char* base = (char*)scratch;
    float* ds = (float*)base;
    base += experts_align256((size_t)P * sizeof(float));
    float* head_u = (float*)base;
    float* head_v = (float*)(base + part_bytes);
    float* tail_u = (float*)(base + 2 * part_bytes);
    float* tail_v = (float*)(base + 3 * part_bytes);

    // one thread per 16-byte column vector (d = 768: 96 threads)
    const int seg_threads = ceil_div(d / EXPERTS_VEC, 32) * 32;
    experts_segment_backward_kernel<<<num_chunks, seg_threads, 0, stream>>>(dU, dV, dgate, ds, head_u, head_v, tail_u, tail_v,
                                                                            gate, s, X, dY, V, sched, P, k, d);
    cudaCheckLast();
    experts_segment_fixup_kernel<<<ceil_div(num_chunks, EXPERTS_FIXUP_WARPS), EXPERTS_FIXUP_WARPS * 32, 0, stream>>>(
        dU, dV, head_u, head_v, tail_u, tail_v, sched, P, d);
    cudaCheckLast();
    experts_launch_token_dx(dX, ds, U, idx, T, d, k, accumulate_dX, stream);
}

#endif  // OMNIMOE_EXPERTS_CUH
