/*
moe_experts.cuh - the routed experts of the moe FFN kind on the GPU (docs/design.md §10.1-10.4,
§10.8): the FFN experts as grouped GEMMs over the pairs sorted by expert, the MoE++ constant,
copy and zero experts, and their backward.

A pair q = t*k + m is token t's m-th choice idx[q]. The pairs are sorted by expert with the
scheduler of scheduler.cuh (stable: token order inside each expert), over the E_t routed experts;
the FFN experts come first, so their pairs are the sorted rows [0, P_ffn). pos[q] is pair q's
sorted row. Gathered rows live in sorted order: xg (P_ffn, C), fch (P_ffn, 2 I_e), h (P_ffn, I_e),
and each FFN expert e with c_e > 0 pairs is one GEMM problem on its rows [off_e, off_e + c_e).

Defines:
- MoeGroupedGemm: the host arrays of one cuBLAS grouped GEMM call (capacity E problems), the
  device pointer arrays the problems' matrices are written into, and (CUTLASS builds) the
  CUTLASS grouped GEMM's own device arguments
- moe_grouped_gemm_create(g, E) / moe_grouped_gemm_free(g)
- moe_grouped_gemm(g, ta, tb, m, n, k, A, sA, byA, lda, B, sB, byB, ldb, beta, C, sC, byC, ldc,
  host_counts, sched, E, pairs_per_token, stream): one problem per non-empty FFN expert, in
  increasing id; each of m, n, k is a fixed size or MOE_DIM_ROWS (the expert's pair count); each
  of A, B, C is indexed by expert (base + e * stride) or by sorted row (base + off_e * stride),
  per by*; or (A or B, only where moe_gemm_reads_tokens says so) MOE_BY_TOKEN: its sorted row j
  of expert e is row sorted_pair[off_e + j] / pairs_per_token of the row-major token matrix at
  base (stride: that matrix's row count), read inside the GEMM with no gathered copy (CUTLASS,
  llmc/moe_gemm_gather_sm90.hpp); run by the backend moe_gemm_backend names (below)
- moe_gemm_reads_tokens(src, tokens, ld, others...): 1 when MOE_BY_TOKEN operands over src can
  run (the CUTLASS backend, moe_gemm_token_reads on, 16-byte bases, offsets within an int)
- moe_pair_positions(pos, sched, P, stream): pos[sorted_pair[j]] = j
- moe_gather_rows(dst, src, sched, rows, C, k, scale, stream): dst[j] = scale * src[token of
  sorted pair j] for j < rows (floatX rows of C)
- moe_const_mix(mix, x, A, idx, BT, C, k, E, Kc, scale, stream): w = softmax(A_j (s x)) of every
  constant-expert pair, (P, 2) fp32 (other pairs untouched)
- moe_combine(out, yg, x, cvec, idx, gate, pos, mix, BT, C, k, E, Kc, Kp, scale, accumulate,
  stream): out[t] = (accumulate ? out[t] : 0) + sum_m g_m y_m, m in order, in fp32, rounded once
- moe_ffn_dgate_dfch(dgate, dfch, dh, fch, gate, sched, rows, Ie, stream): per FFN row, dg =
  <W2^T dy, h> (dh holds W2^T dy on entry; h = SwiGLU(fch) recomputed, the forward's bits), dfch =
  the SwiGLU backward of g W2^T dy (overwritten, (rows, 2 I_e)), then dh = g h (overwritten: the
  dW2 GEMM's operand); one pass over the rows
- moe_token_backward(dx, dgate, dmix, dout, x, dxg, cvec, A, idx, gate, pos, mix, BT, C, k, E,
  Kc, Kp, scale, accumulate, stream): the gate gradients of the constant, copy and zero pairs,
  dmix, and dx[t] = (accumulate ? dx[t] : 0) + s * (sum_m of each pair's input gradient)
- moe_const_grads(dcvec, dA, dmix, dout, x, gate, mix, sched, offsets, P, C, k, E, Kc, scale,
  scratch, bytes, stream): dA_j += sum dmix (s x), dc_j += sum g w_1 dy over expert j's pairs:
  chunks of MOE_CONST_CHUNK pairs in token order, then the chunks in order
  (scratch: moe_const_grads_scratch_bytes)
- moe_expert_offsets(offsets, counts, Et, stream): offsets (Et + 1) from the per-expert counts

The grouped GEMM has three backends, chosen at run time with moe_gemm_backend:
- MOE_GEMM_CUBLAS (the initial value; the trainer's default without CUTLASS): cuBLAS's
  cublasGemmGroupedBatchedEx (CUDA toolkit, no extra dependency); its problem sizes are host
  arrays, so the caller needs the per-expert counts on the host (one device-to-host copy per
  layer forward; the backward reuses them);
- MOE_GEMM_LOOP: the same problems as one cublasGemmEx each (host pointers);
- MOE_GEMM_CUTLASS (`make USE_CUTLASS=1` bf16 builds, HAVE_CUTLASS_GROUPED_GEMM): a CUTLASS
  Hopper grouped GEMM (TMA, wgmma, persistent warp-specialized; llmc/moe_gemm_cutlass.h), its
  problem shapes and strides written on the device from the schedule.
The matrix pointers are written on the device from the schedule, so nothing else crosses to the
host. Bases off 16 bytes take the loop whatever the backend (the grouped calls cannot see them).

Determinism: the GEMMs run cuBLAS in its default non-atomic mode (same shapes, same bits), or
CUTLASS's persistent scheduler without split-K (one CTA per output tile); every other sum has
one order (m, then channels or rows, in order; warp butterflies); no atomics.
*/
#ifndef OMNIMOE_MOE_EXPERTS_CUH
#define OMNIMOE_MOE_EXPERTS_CUH

#include "utils.h"        // malloc_check
#include "cuda_utils.cuh"
#include "matmul.cuh"
#include "scheduler.cuh"
#include "moe_router.cuh"  // moe_warp_sum
#ifdef HAVE_CUTLASS_GROUPED_GEMM
#include "moe_gemm_cutlass.h"
#endif

#define MOE_DIM_ROWS (-1)        // a grouped-GEMM dimension that is the expert's pair count
#define MOE_BY_EXPERT 0          // a matrix at base + e * stride
#define MOE_BY_ROW 1             // a matrix at base + off_e * stride (its first sorted row)
#define MOE_BY_TOKEN 2           // rows read through the schedule from a token matrix at base
#define MOE_TOKEN_WARPS 4
#define MOE_CONST_CHUNK 256      // pairs per partial sum of the constant experts' gradients

#ifdef HAVE_CUTLASS_GROUPED_GEMM
// tests: the CUTLASS kernels of grouped GEMMs created from now on run on at most this many CTAs
// (0: every SM), so that each CTA walks many work tiles and problems
static int moe_cutlass_sm_limit = 0;
#endif

typedef struct {
    int capacity;
    cublasOperation_t* ta;
    cublasOperation_t* tb;
    int *m, *n, *k, *lda, *ldb, *ldc, *group_size;
    float *alpha, *beta;
    const void** d_A;   // (capacity) device pointer arrays
    const void** d_B;
    void** d_C;
#ifdef HAVE_CUTLASS_GROUPED_GEMM
    MoeCutlassGemm* cutlass;  // the CUTLASS kernels' shapes, strides and workspace (capacity problems)
#endif
} MoeGroupedGemm;

static void moe_grouped_gemm_create(MoeGroupedGemm* g, int E) {
    memset(g, 0, sizeof(*g));
    const size_t n = E > 0 ? (size_t)E : 1;
    g->capacity = (int)n;
    g->ta = (cublasOperation_t*)malloc_check(n * sizeof(cublasOperation_t));
    g->tb = (cublasOperation_t*)malloc_check(n * sizeof(cublasOperation_t));
    int** ints[7] = {&g->m, &g->n, &g->k, &g->lda, &g->ldb, &g->ldc, &g->group_size};
    for (int i = 0; i < 7; i++) *ints[i] = (int*)malloc_check(n * sizeof(int));
    g->alpha = (float*)malloc_check(n * sizeof(float));
    g->beta = (float*)malloc_check(n * sizeof(float));
    void* d = cuda_malloc_or_die(3 * n * sizeof(void*), "moe grouped GEMM pointer arrays");
    g->d_A = (const void**)d;
    g->d_B = (const void**)d + n;
    g->d_C = (void**)d + 2 * n;
#ifdef HAVE_CUTLASS_GROUPED_GEMM
    g->cutlass = moe_cutlass_create((int)n);
    if (moe_cutlass_sm_limit > 0) moe_cutlass_limit_sms(g->cutlass, moe_cutlass_sm_limit);
#endif
}

static void moe_grouped_gemm_free(MoeGroupedGemm* g) {
    free(g->ta); free(g->tb); free(g->m); free(g->n); free(g->k); free(g->lda); free(g->ldb); free(g->ldc);
    free(g->group_size); free(g->alpha); free(g->beta);
    cudaCheck(cudaFree((void*)g->d_A));
#ifdef HAVE_CUTLASS_GROUPED_GEMM
    moe_cutlass_free(g->cutlass);
#endif
    memset(g, 0, sizeof(*g));
}

// device bytes moe_grouped_gemm_create allocates (the memory plan's count, llmc/memory_plan.h;
// a CUTLASS build allocates moe_cutlass_device_bytes more: E * 60 bytes and 640 bytes of TMA
// descriptors per SM, under 0.1 MiB for E <= 256 on 132 SMs)
static inline size_t moe_grouped_gemm_bytes(int E) { return 3 * (size_t)(E > 0 ? E : 1) * sizeof(void*); }

// ----------------------------------------------------------------------------
// kernels

// problem a = the a-th active expert of the schedule (the FFN experts are the first active ones)
__global__ void moe_group_pointers_kernel(const void** dA, const void** dB, void** dC, ExpertSchedule sched,
                                          int groups, const char* A, size_t sA, int byA, const char* B, size_t sB,
                                          int byB, char* Cb, size_t sC, int byC) {
    const int a = blockIdx.x * blockDim.x + threadIdx.x;
    if (a >= groups) return;
    const size_t e = (size_t)sched.active_expert[a], off = (size_t)sched.active_offset[a];
    dA[a] = A + (byA == MOE_BY_EXPERT ? e : off) * sA;
    dB[a] = B + (byB == MOE_BY_EXPERT ? e : off) * sB;
    dC[a] = Cb + (byC == MOE_BY_EXPERT ? e : off) * sC;
}

__global__ void moe_pair_positions_kernel(int* pos, const int* sorted_pair, int P) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j < P) pos[sorted_pair[j]] = j;
}

// The row kernels below (gather, combine, the token backward's input gradient) move whole rows of
// C channels: one warp per row, each lane V consecutive channels at a time - one 16-byte vector
// (x128::size) where every row they touch starts 16-byte aligned, else V = 1 (moe_row_vec picks).
// Each element's arithmetic is the same for either V (same bits).
template <int V>
__device__ inline void moe_load_row(float* v, const floatX* p) {
    if constexpr (V == x128::size) {
        const x128 a = load128(p);
        for (int i = 0; i < V; i++) v[i] = (float)a[i];
    } else {
        for (int i = 0; i < V; i++) v[i] = (float)p[i];
    }
}

template <int V>
__device__ inline void moe_store_row(floatX* p, const float* v) {
    if constexpr (V == x128::size) {
        x128 a;
        for (int i = 0; i < V; i++) a[i] = (floatX)v[i];
        store128(p, a);
    } else {
        for (int i = 0; i < V; i++) p[i] = (floatX)v[i];
    }
}

// one warp per sorted row j: dst[j, :] = scale * src[sorted_pair[j] / k, :]
template <int V>
__global__ void moe_gather_rows_kernel(floatX* dst, const floatX* src, const int* sorted_pair, int rows, int C, int k,
                                       float scale) {
    const int j = blockIdx.x * MOE_TOKEN_WARPS + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (j >= rows) return;
    const floatX* s = src + (size_t)(sorted_pair[j] / k) * C;
    floatX* d = dst + (size_t)j * C;
    for (int c = lane * V; c < C; c += 32 * V) {
        float v[V];
        moe_load_row<V>(v, s + c);
        for (int i = 0; i < V; i++) v[i] = scale * v[i];
        moe_store_row<V>(d + c, v);
    }
}

// one warp per pair: the constant experts' mixing weights w = softmax(A_j (s x))
__global__ void moe_const_mix_kernel(float* mix, const floatX* x, const floatX* A, const int* idx, int P, int C,
                                     int k, int E, int Kc, float scale) {
    const int q = blockIdx.x * MOE_TOKEN_WARPS + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (q >= P) return;
    const int e = idx[q];
    if (e < E || e >= E + Kc) return;
    const floatX* a = A + (size_t)(e - E) * 2 * C;
    const floatX* xr = x + (size_t)(q / k) * C;
    float a0 = 0.0f, a1 = 0.0f;
    for (int c = lane; c < C; c += 32) {
        float xv = scale * (float)xr[c];
        a0 += (float)a[c] * xv;
        a1 += (float)a[C + c] * xv;
    }
    a0 = moe_warp_sum(a0);
    a1 = moe_warp_sum(a1);
    if (lane == 0) {
        float mx = fmaxf(a0, a1), e0 = expf(a0 - mx), e1 = expf(a1 - mx);
        mix[2 * (size_t)q] = e0 / (e0 + e1);
        mix[2 * (size_t)q + 1] = e1 / (e0 + e1);
    }
}

// one warp per token t: each channel's sum over t's pairs in order
template <int V>
__global__ void moe_combine_kernel(floatX* out, const floatX* yg, const floatX* x, const floatX* cvec, const int* idx,
                                   const float* gate, const int* pos, const float* mix, int BT, int C, int k, int E,
                                   int Kc, int Kp, float scale, int accumulate) {
    const int t = blockIdx.x * MOE_TOKEN_WARPS + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (t >= BT) return;
    const size_t row = (size_t)t * C;
    const int reads_x = Kc + Kp > 0;  // only the constant and copy experts read x
    for (int c = lane * V; c < C; c += 32 * V) {
        float xe[V] = {}, acc[V];
        if (reads_x) moe_load_row<V>(xe, x + row + c);
        for (int i = 0; i < V; i++) xe[i] = scale * xe[i];
        if (accumulate) moe_load_row<V>(acc, out + row + c);
        else for (int i = 0; i < V; i++) acc[i] = 0.0f;
        for (int m = 0; m < k; m++) {
            const size_t q = (size_t)t * k + m;
            const int e = idx[q];
            const float g = gate[q];
            if (e < E) {
                float y[V];
                moe_load_row<V>(y, yg + (size_t)pos[q] * C + c);
                for (int i = 0; i < V; i++) acc[i] += g * y[i];
            } else if (e < E + Kc) {
                const floatX* cv = cvec + (size_t)(e - E) * C + c;  // a parameter: any alignment, read per element
                for (int i = 0; i < V; i++) acc[i] += g * (mix[2 * q] * xe[i] + mix[2 * q + 1] * (float)cv[i]);
            } else if (e < E + Kc + Kp) {
                for (int i = 0; i < V; i++) acc[i] += g * xe[i];
            }
        }
        moe_store_row<V>(out + row + c, acc);
    }
}

// one warp per FFN row j, V channels a lane at a time: the SwiGLU backward of g W2^T dy (dh holds
// W2^T dy on entry; g dh rounded to floatX first, as a separate pass would store it) into dfch, g h
// over dh (the dW2 GEMM's operand), and dgate of its pair = <W2^T dy, h>. h is recomputed from fch
// with the forward's element function (the forward's bits), so the forward need not keep it. The
// dgate sum keeps the order it had as a separate pass (one element a lane in turn, i = lane,
// lane + 32, ..., then the warp's butterfly): each segment of MOE_DGATE_SEGMENT channels stages its
// W2^T dy and h in shared memory, and each lane then adds its elements of the segment in order.
// Each lane reads its dh vector before it writes g h there.
#define MOE_DGATE_SEGMENT 1024
template <int V>
__global__ void moe_ffn_dgate_dfch_kernel(float* dgate, floatX* dfch, floatX* dh, const floatX* fch, const float* gate,
                                          const int* sorted_pair, int rows, int Ie) {
    __shared__ alignas(16) floatX staged[MOE_TOKEN_WARPS][2][MOE_DGATE_SEGMENT];  // a warp's W2^T dy and h
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int j = blockIdx.x * MOE_TOKEN_WARPS + w;
    if (j >= rows) return;  // (warp-uniform; only __syncwarp below)
    const size_t r = (size_t)j * Ie;
    const int q = sorted_pair[j];
    const float g = gate[q];
    const floatX* gate_row = fch + 2 * r;
    floatX* dgate_row = dfch + 2 * r;
    floatX* sd = staged[w][0];
    floatX* sh = staged[w][1];
    float s = 0.0f;
    for (int seg = 0; seg < Ie; seg += MOE_DGATE_SEGMENT) {
        const int end = min(Ie, seg + MOE_DGATE_SEGMENT);
        for (int c = seg + lane * V; c < end; c += 32 * V) {
            float d[V], gv[V], uv[V], hg[V];
            moe_load_row<V>(d, dh + r + c);
            moe_load_row<V>(gv, gate_row + c);
            moe_load_row<V>(uv, gate_row + Ie + c);
            floatX dg[V], du[V], dx[V], hx[V];
            for (int i = 0; i < V; i++) {
                hx[i] = swiglu_forward_element(gv[i], uv[i]);
                dx[i] = (floatX)d[i];  // (exact: d was read from floatX)
                swiglu_backward_element(&dg[i], &du[i], (float)(floatX)(g * d[i]), gv[i], uv[i]);
                hg[i] = g * (float)hx[i];
            }
            moe_store_row<V>(dh + r + c, hg);
            if constexpr (V == x128::size) {
                x128 a, b, sa, sb;
                for (int i = 0; i < V; i++) { a[i] = dg[i]; b[i] = du[i]; sa[i] = dx[i]; sb[i] = hx[i]; }
                store128(dgate_row + c, a);
                store128(dgate_row + Ie + c, b);
                *(x128*)(sd + c - seg) = sa;
                *(x128*)(sh + c - seg) = sb;
            } else {
                for (int i = 0; i < V; i++) {
                    dgate_row[c + i] = dg[i];
                    dgate_row[Ie + c + i] = du[i];
                    sd[c - seg + i] = dx[i];
                    sh[c - seg + i] = hx[i];
                }
            }
        }
        __syncwarp();
        for (int i = lane; i < end - seg; i += 32) s += (float)sd[i] * (float)sh[i];
        __syncwarp();  // the segment is read before the next one is staged
    }
    s = moe_warp_sum(s);
    if (lane == 0) dgate[q] = s;
}

// one warp per token: the gate gradients of its constant/copy/zero pairs and dmix first, then
// every channel's input gradient over the pairs in order
template <int V>
__global__ void moe_token_backward_kernel(floatX* dx, float* dgate, float* dmix, const floatX* dout, const floatX* x,
                                          const floatX* dxg, const floatX* cvec, const floatX* A, const int* idx,
                                          const float* gate, const int* pos, const float* mix, int BT, int C, int k,
                                          int E, int Kc, int Kp, float scale, int accumulate) {
    const int t = blockIdx.x * MOE_TOKEN_WARPS + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (t >= BT) return;
    const size_t row = (size_t)t * C;
    const floatX* dy = dout + row;
    const floatX* xr = x + row;
    for (int m = 0; m < k; m++) {
        const size_t q = (size_t)t * k + m;
        const int e = idx[q];
        if (e < E) continue;  // moe_ffn_dgate_dfch wrote it
        const float g = gate[q];
        if (e < E + Kc) {
            const floatX* cv = cvec + (size_t)(e - E) * C;
            float dx0 = 0.0f, dc = 0.0f;
            for (int c = lane; c < C; c += 32) {
                float d = (float)dy[c];
                dx0 += d * scale * (float)xr[c];
                dc += d * (float)cv[c];
            }
            dx0 = moe_warp_sum(dx0);
            dc = moe_warp_sum(dc);
            const float w0 = mix[2 * q], w1 = mix[2 * q + 1];
            const float dw0 = g * dx0, dw1 = g * dc, wdw = w0 * dw0 + w1 * dw1;
            if (lane == 0) {
                dgate[q] = w0 * dx0 + w1 * dc;
                dmix[2 * q] = w0 * (dw0 - wdw);
                dmix[2 * q + 1] = w1 * (dw1 - wdw);
            }
        } else if (e < E + Kc + Kp) {
            float s = 0.0f;
            for (int c = lane; c < C; c += 32) s += (float)dy[c] * scale * (float)xr[c];
            s = moe_warp_sum(s);
            if (lane == 0) dgate[q] = s;
        } else if (lane == 0) {
            dgate[q] = 0.0f;
        }
    }
    __syncwarp();  // dmix of lane 0 is read by every lane below
    const int reads_dy = Kc + Kp > 0;  // only the constant and copy experts' input gradients read dy
    for (int c = lane * V; c < C; c += 32 * V) {
        float acc[V], d[V] = {};  // acc: d loss / d (the experts' input s x)
        for (int i = 0; i < V; i++) acc[i] = 0.0f;
        if (reads_dy) moe_load_row<V>(d, dy + c);
        for (int m = 0; m < k; m++) {
            const size_t q = (size_t)t * k + m;
            const int e = idx[q];
            const float g = gate[q];
            if (e < E) {
                float v[V];
                moe_load_row<V>(v, dxg + (size_t)pos[q] * C + c);
                for (int i = 0; i < V; i++) acc[i] += v[i];
            } else if (e < E + Kc) {
                const floatX* a = A + (size_t)(e - E) * 2 * C + c;  // a parameter: any alignment, read per element
                for (int i = 0; i < V; i++) {
                    acc[i] += g * mix[2 * q] * d[i] + dmix[2 * q] * (float)a[i] + dmix[2 * q + 1] * (float)a[C + i];
                }
            } else if (e < E + Kc + Kp) {
                for (int i = 0; i < V; i++) acc[i] += g * d[i];
            }
        }
        float old[V];
        if (accumulate) moe_load_row<V>(old, dx + row + c);
        else for (int i = 0; i < V; i++) old[i] = 0.0f;
        for (int i = 0; i < V; i++) acc[i] = old[i] + scale * acc[i];
        moe_store_row<V>(dx + row + c, acc);
    }
}

// one thread per (chunk ch of constant expert j's pairs, channel c): the chunk's pairs in token
// order; partial[(j * max_chunks + ch) * 3C + {0, C, 2C} + c] = its dA_j0, dA_j1, dc_j sums
__global__ void moe_const_grads_partial_kernel(float* partial, const float* dmix, const floatX* dout,
                                               const floatX* x, const float* gate, const float* mix,
                                               const int* sorted_pair, const int* offsets, int C, int k, int E,
                                               int max_chunks, float scale) {
    const int ch = blockIdx.x, c = blockIdx.y * blockDim.x + threadIdx.x, j = blockIdx.z;
    const int end = offsets[E + j + 1], s0 = offsets[E + j] + ch * MOE_CONST_CHUNK;
    if (c >= C || s0 >= end) return;  // past the expert's segment: the finish kernel stops before it
    const int s1 = min(end, s0 + MOE_CONST_CHUNK);
    float da0 = 0.0f, da1 = 0.0f, dc = 0.0f;
    for (int s = s0; s < s1; s++) {
        const size_t q = (size_t)sorted_pair[s], t = q / k;
        const float xe = scale * (float)x[t * C + c];
        da0 += dmix[2 * q] * xe;
        da1 += dmix[2 * q + 1] * xe;
        dc += gate[q] * mix[2 * q + 1] * (float)dout[t * C + c];
    }
    float* p = partial + ((size_t)j * max_chunks + ch) * 3 * C;
    p[c] = da0;
    p[C + c] = da1;
    p[2 * (size_t)C + c] = dc;
}

// one thread per (constant expert j, channel c): dA_j, dc_j += its chunks' partials, in chunk order
__global__ void moe_const_grads_finish_kernel(floatX* dcvec, floatX* dA, const float* partial, const int* offsets,
                                              int C, int E, int Kc, int max_chunks) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x, j = blockIdx.y;
    if (c >= C || j >= Kc) return;
    const int chunks = ceil_div(offsets[E + j + 1] - offsets[E + j], MOE_CONST_CHUNK);
    float da0 = 0.0f, da1 = 0.0f, dc = 0.0f;
    for (int ch = 0; ch < chunks; ch++) {
        const float* p = partial + ((size_t)j * max_chunks + ch) * 3 * C;
        da0 += p[c];
        da1 += p[C + c];
        dc += p[2 * (size_t)C + c];
    }
    floatX* a = dA + (size_t)j * 2 * C;
    a[c] = (floatX)((float)a[c] + da0);
    a[C + c] = (floatX)((float)a[C + c] + da1);
    dcvec[(size_t)j * C + c] = (floatX)((float)dcvec[(size_t)j * C + c] + dc);
}

// one thread: offsets[0] = 0, offsets[e + 1] = offsets[e] + counts[e]
__global__ void moe_expert_offsets_kernel(int* offsets, const int* counts, int Et) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    int s = 0;
    offsets[0] = 0;
    for (int e = 0; e < Et; e++) {
        s += counts[e];
        offsets[e + 1] = s;
    }
}

// ----------------------------------------------------------------------------
// launchers

// the number of non-empty FFN experts and their pairs, from the host counts
static inline int moe_ffn_groups(const int* host_counts, int E, int* rows) {
    int groups = 0, r = 0;
    for (int e = 0; e < E; e++) {
        if (host_counts[e] > 0) {
            groups++;
            r += host_counts[e];
        }
    }
    if (rows) *rows = r;
    return groups;
}

// the grouped GEMM's backend (bench_moe.cu times each; test_moe.cu checks each):
// MOE_GEMM_CUBLAS: one cublasGemmGroupedBatchedEx call (the initial value here; the trainer sets
//   the backend from --moe-gemm, whose default is MOE_GEMM_CUTLASS in builds that have it);
// MOE_GEMM_LOOP: one cublasGemmEx per expert, the same problems from host pointers (also taken
//   from then on when cuBLAS reports the grouped call unsupported for these types);
// MOE_GEMM_CUTLASS: one CUTLASS grouped GEMM (HAVE_CUTLASS_GROUPED_GEMM builds only; falls back
//   to the loop where CUTLASS cannot run the problems; the trainer's default where it exists)
#define MOE_GEMM_LOOP 0
#define MOE_GEMM_CUBLAS 1
#define MOE_GEMM_CUTLASS 2
static int moe_gemm_backend = MOE_GEMM_CUBLAS;
static int moe_gemm_fallbacks = 0;  // grouped calls the CUTLASS backend handed to the loop (test_moe.cu counts them)

// the per-expert loop: problem e's matrices from the host counts (the FFN experts' rows come first)
static void moe_gemm_loop(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, const floatX* A, size_t sA,
                          int byA, int lda, const floatX* B, size_t sB, int byB, int ldb, float beta, floatX* Cm,
                          size_t sC, int byC, int ldc, const int* host_counts, int E, cudaStream_t stream) {
    size_t off = 0;
    for (int e = 0; e < E; off += (size_t)host_counts[e], e++) {
        const int c = host_counts[e];
        if (c == 0) continue;
        const floatX* a = A + (byA == MOE_BY_EXPERT ? (size_t)e : off) * sA;
        const floatX* b = B + (byB == MOE_BY_EXPERT ? (size_t)e : off) * sB;
        floatX* d = Cm + (byC == MOE_BY_EXPERT ? (size_t)e : off) * sC;
        moe_gemm(ta, tb, m == MOE_DIM_ROWS ? c : m, n == MOE_DIM_ROWS ? c : n, k == MOE_DIM_ROWS ? c : k, a, lda, b, ldb,
                 beta, d, CUDA_R_FLOATX, ldc, stream);
    }
}

// 1 (default): the CUTLASS backend reads the experts' token operands (x, dy) through the schedule
// inside its grouped GEMMs (MOE_BY_TOKEN) where it can; 0: the layer gathers them into sorted
// copies first. The same bits either way (test_moe); token reads save the two gathers and the
// kept copy of x (the layer 1.385x against 1.450x dense at BT = 32,768 on an H100;
// docs/performance.md target 8). The trainer sets it from --moe-token-reads.
static int moe_gemm_token_reads = 1;
static int moe_gemm_token_read_calls = 0;  // grouped GEMMs run with token reads (for tests)

// whether moe_grouped_gemm can take MOE_BY_TOKEN operands over the (tokens, ld) row-major src for
// problems whose other matrices start at a, b, c, d (every base must be 16-byte aligned: one off
// would send a problem to the per-expert loop, which has no token reads)
static int moe_gemm_reads_tokens(const void* src, int tokens, int ld, const void* a, const void* b, const void* c,
                                 const void* d) {
#if defined(HAVE_CUTLASS_GROUPED_GEMM)
    return moe_gemm_backend == MOE_GEMM_CUTLASS && moe_gemm_token_reads && is_aligned16(src) && ld % 8 == 0 &&
           (long long)tokens * ld < (1ll << 31) && is_aligned16(a) && is_aligned16(b) && is_aligned16(c) &&
           is_aligned16(d);
#else
    (void)src; (void)tokens; (void)ld; (void)a; (void)b; (void)c; (void)d;
    return 0;
#endif
}

// the CUTLASS grouped GEMM of the `groups` problems whose pointers g->d_* hold and whose sizes
// g->m, g->n, g->k hold (their rows on the host: the MOE_DIM_ROWS dimension), gather (a
// MoeCutlassGather, or NULL) its token reads; 0 when it ran, 1
// when the caller must run the problems another way (a leading dimension off 8 elements, a
// layout the layer does not use, CUTLASS refuses the problems); exits in a build without it
static int moe_cutlass_gemm(MoeGroupedGemm* g, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                            int lda, int ldb, float beta, int ldc, ExpertSchedule sched, int groups,
                            const void* gather, cudaStream_t stream) {
#if defined(HAVE_CUTLASS_GROUPED_GEMM)
    const int layout = ta == CUBLAS_OP_T && tb == CUBLAS_OP_N ? MOE_CUTLASS_TN
                     : ta == CUBLAS_OP_N && tb == CUBLAS_OP_N ? MOE_CUTLASS_NN
                     : ta == CUBLAS_OP_N && tb == CUBLAS_OP_T ? MOE_CUTLASS_NT : -1;
    const int* rows = m == MOE_DIM_ROWS ? g->m : n == MOE_DIM_ROWS ? g->n : g->k;
    static int warned = 0;
    if (layout >= 0 && lda % 8 == 0 && ldb % 8 == 0 && ldc % 8 == 0 &&
        moe_cutlass_grouped_gemm(g->cutlass, layout, groups, m, n, k, rows, sched.active_offset,
                                 (const void* const*)g->d_A, lda, (const void* const*)g->d_B, ldb, beta,
                                 (void* const*)g->d_C, ldc, (const MoeCutlassGather*)gather, stream) == 0) {
        return 0;
    }
    if (gather != NULL) {  // moe_gemm_reads_tokens promised this call: a bug, not a fallback
        fprintf(stderr, "moe_grouped_gemm: CUTLASS refused a grouped GEMM with token reads (ta %d tb %d m %d n %d k %d "
                "lda %d ldb %d ldc %d)\n", (int)ta, (int)tb, m, n, k, lda, ldb, ldc);
        exit(EXIT_FAILURE);
    }
    moe_gemm_fallbacks++;
    if (!warned) {
        fprintf(stderr, "moe_grouped_gemm: CUTLASS cannot run a grouped GEMM (ta %d tb %d m %d n %d k %d lda %d ldb %d "
                "ldc %d); one GEMM per expert for it\n", (int)ta, (int)tb, m, n, k, lda, ldb, ldc);
        warned = 1;
    }
    return 1;
#else
    (void)g; (void)ta; (void)tb; (void)m; (void)n; (void)k; (void)lda; (void)ldb; (void)beta; (void)ldc;
    (void)sched; (void)groups; (void)gather; (void)stream;
    fprintf(stderr, "moe_grouped_gemm: the CUTLASS backend is not in this build (make USE_CUTLASS=1, bf16)\n");
    exit(EXIT_FAILURE);
#endif
}

// C_e = op(A_e) op(B_e) (+ beta C_e) for every non-empty FFN expert e, column-major as cuBLAS;
// a dimension given as MOE_DIM_ROWS is the expert's pair count
static void moe_grouped_gemm(MoeGroupedGemm* g, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                             const floatX* A, size_t sA, int byA, int lda, const floatX* B, size_t sB, int byB, int ldb,
                             float beta, floatX* Cm, size_t sC, int byC, int ldc, const int* host_counts,
                             ExpertSchedule sched, int E, int pairs_per_token, cudaStream_t stream) {
    // token reads (MOE_BY_TOKEN): the operand's rows are the expert's pairs, so it is B with the
    // rows as N (K-major, ld between rows) or either operand with the rows as K
#if defined(HAVE_CUTLASS_GROUPED_GEMM)
    MoeCutlassGather gather = {MOE_GATHER_NONE, NULL, 0, 0, sched.sorted_pair, pairs_per_token};
    if (byA == MOE_BY_TOKEN || byB == MOE_BY_TOKEN) {
        const int on_a = byA == MOE_BY_TOKEN;
        const int ok = (on_a != (byB == MOE_BY_TOKEN)) && byC != MOE_BY_TOKEN &&
                       (on_a ? (ta == CUBLAS_OP_N && k == MOE_DIM_ROWS)
                             : ((tb == CUBLAS_OP_N && n == MOE_DIM_ROWS) || (tb == CUBLAS_OP_T && k == MOE_DIM_ROWS)));
        const void* src = on_a ? (const void*)A : (const void*)B;
        const size_t tokens = on_a ? sA : sB;
        if (!ok || tokens > INT_MAX ||
            !moe_gemm_reads_tokens(src, (int)tokens, on_a ? lda : ldb, on_a ? B : A, Cm, Cm, Cm)) {
            fprintf(stderr, "moe_grouped_gemm: token reads not possible here (check moe_gemm_reads_tokens first)\n");
            exit(EXIT_FAILURE);
        }
        gather.operand = on_a ? MOE_GATHER_A_K : (k == MOE_DIM_ROWS ? MOE_GATHER_B_K : MOE_GATHER_B_ROWS);
        gather.src = src;
        gather.src_rows = (int)tokens;
        gather.ld = on_a ? lda : ldb;
        if (on_a) { sA = 0; byA = MOE_BY_EXPERT; } else { sB = 0; byB = MOE_BY_EXPERT; }  // every pointer = src
    }
    const void* gather_arg = gather.operand != MOE_GATHER_NONE ? &gather : NULL;
    moe_gemm_token_read_calls += gather_arg != NULL;
#else
    (void)pairs_per_token;
    if (byA == MOE_BY_TOKEN || byB == MOE_BY_TOKEN) {
        fprintf(stderr, "moe_grouped_gemm: token reads need the CUTLASS backend (make USE_CUTLASS=1)\n");
        exit(EXIT_FAILURE);
    }
    const void* gather_arg = NULL;
#endif
    int groups = 0;
    for (int e = 0; e < E; e++) {
        const int c = host_counts[e];
        if (c == 0) continue;
        if (groups >= g->capacity) {
            fprintf(stderr, "moe_grouped_gemm: more than the %d problems it was created for\n", g->capacity);
            exit(EXIT_FAILURE);
        }
        g->ta[groups] = ta;
        g->tb[groups] = tb;
        g->m[groups] = m == MOE_DIM_ROWS ? c : m;
        g->n[groups] = n == MOE_DIM_ROWS ? c : n;
        g->k[groups] = k == MOE_DIM_ROWS ? c : k;
        g->lda[groups] = lda;
        g->ldb[groups] = ldb;
        g->ldc[groups] = ldc;
        g->alpha[groups] = 1.0f;
        g->beta[groups] = beta;
        g->group_size[groups] = 1;
        groups++;
    }
    if (groups == 0) return;
    // the grouped call reads the matrix pointers from device memory, so cuBLAS cannot pick a kernel
    // for their alignment as cublasGemmEx does: a base off 16 bytes takes the loop (the flat
    // parameter layout puts W1 and W2 there when the gate map's L E_t^2 is not a multiple of 8;
    // every stride here is a multiple of 8 elements, moe_check_dims)
    const int aligned = is_aligned16(A) && is_aligned16(B) && is_aligned16(Cm);
    if (moe_gemm_backend == MOE_GEMM_LOOP || !aligned) {
        moe_gemm_loop(ta, tb, m, n, k, A, sA, byA, lda, B, sB, byB, ldb, beta, Cm, sC, byC, ldc, host_counts, E, stream);
        return;
    }
    moe_group_pointers_kernel<<<ceil_div(groups, 128), 128, 0, stream>>>(
        g->d_A, g->d_B, g->d_C, sched, groups, (const char*)A, sA * sizeof(floatX), byA, (const char*)B,
        sB * sizeof(floatX), byB, (char*)Cm, sC * sizeof(floatX), byC);
    cudaCheckLast();
    if (moe_gemm_backend == MOE_GEMM_CUTLASS) {
        if (moe_cutlass_gemm(g, ta, tb, m, n, k, lda, ldb, beta, ldc, sched, groups, gather_arg, stream) != 0) {
            moe_gemm_loop(ta, tb, m, n, k, A, sA, byA, lda, B, sB, byB, ldb, beta, Cm, sC, byC, ldc, host_counts, E,
                          stream);
        }
        return;
    }
    cublasCheck(cublasSetStream(matmul_cublas_handle, stream));
    cublasStatus_t status = cublasGemmGroupedBatchedEx(matmul_cublas_handle, g->ta, g->tb, g->m, g->n, g->k, g->alpha,
                                                       g->d_A, CUDA_R_FLOATX, g->lda, g->d_B, CUDA_R_FLOATX, g->ldb,
                                                       g->beta, g->d_C, CUDA_R_FLOATX, g->ldc, groups, g->group_size,
                                                       CUBLAS_COMPUTE_32F);
    if (status == CUBLAS_STATUS_NOT_SUPPORTED) {  // this cuBLAS cannot group these types: one GEMM per expert
        fprintf(stderr, "moe_grouped_gemm: cuBLAS's grouped GEMM is not supported for %s here; one GEMM per expert "
                "from now on\n", FLOATX_NAME);
        moe_gemm_backend = MOE_GEMM_LOOP;
        moe_gemm_loop(ta, tb, m, n, k, A, sA, byA, lda, B, sB, byB, ldb, beta, Cm, sC, byC, ldc, host_counts, E, stream);
        return;
    }
    cublasCheck(status);
}

static void moe_pair_positions(int* pos, ExpertSchedule sched, int P, cudaStream_t stream) {
    moe_pair_positions_kernel<<<ceil_div(P, 256), 256, 0, stream>>>(pos, sched.sorted_pair, P);
    cudaCheckLast();
}

// the row kernels' vectors: 16 bytes when every row base is 16-byte aligned (rows of C % 8 == 0
// channels, moe_check_dims, keep the bases' alignment), else one element
static inline int moe_row_vec(const void* a, const void* b, const void* c) {
    return is_aligned16(a) && is_aligned16(b) && is_aligned16(c);
}

static void moe_gather_rows(floatX* dst, const floatX* src, ExpertSchedule sched, int rows, int C, int k, float scale,
                            cudaStream_t stream) {
    if (rows == 0) return;
    const int blocks = ceil_div(rows, MOE_TOKEN_WARPS), threads = MOE_TOKEN_WARPS * 32;
    if (moe_row_vec(dst, src, src)) {
        moe_gather_rows_kernel<x128::size><<<blocks, threads, 0, stream>>>(dst, src, sched.sorted_pair, rows, C, k, scale);
    } else {
        moe_gather_rows_kernel<1><<<blocks, threads, 0, stream>>>(dst, src, sched.sorted_pair, rows, C, k, scale);
    }
    cudaCheckLast();
}

static void moe_const_mix(float* mix, const floatX* x, const floatX* A, const int* idx, int BT, int C, int k, int E,
                          int Kc, float scale, cudaStream_t stream) {
    if (Kc == 0) return;
    const int P = BT * k;
    moe_const_mix_kernel<<<ceil_div(P, MOE_TOKEN_WARPS), MOE_TOKEN_WARPS * 32, 0, stream>>>(mix, x, A, idx, P, C, k, E,
                                                                                           Kc, scale);
    cudaCheckLast();
}

static void moe_combine(floatX* out, const floatX* yg, const floatX* x, const floatX* cvec, const int* idx,
                        const float* gate, const int* pos, const float* mix, int BT, int C, int k, int E, int Kc,
                        int Kp, float scale, int accumulate, cudaStream_t stream) {
    const int blocks = ceil_div(BT, MOE_TOKEN_WARPS), threads = MOE_TOKEN_WARPS * 32;
    if (moe_row_vec(out, yg, x)) {
        moe_combine_kernel<x128::size><<<blocks, threads, 0, stream>>>(out, yg, x, cvec, idx, gate, pos, mix, BT, C, k,
                                                                      E, Kc, Kp, scale, accumulate);
    } else {
        moe_combine_kernel<1><<<blocks, threads, 0, stream>>>(out, yg, x, cvec, idx, gate, pos, mix, BT, C, k, E, Kc, Kp,
                                                             scale, accumulate);
    }
    cudaCheckLast();
}

static void moe_ffn_dgate_dfch(float* dgate, floatX* dfch, floatX* dh, const floatX* fch, const float* gate,
                               ExpertSchedule sched, int rows, int Ie, cudaStream_t stream) {
    if (rows == 0) return;
    const int blocks = ceil_div(rows, MOE_TOKEN_WARPS), threads = MOE_TOKEN_WARPS * 32;
    if (moe_row_vec(dfch, dh, fch)) {
        moe_ffn_dgate_dfch_kernel<x128::size><<<blocks, threads, 0, stream>>>(dgate, dfch, dh, fch, gate,
                                                                             sched.sorted_pair, rows, Ie);
    } else {
        moe_ffn_dgate_dfch_kernel<1><<<blocks, threads, 0, stream>>>(dgate, dfch, dh, fch, gate, sched.sorted_pair,
                                                                    rows, Ie);
    }
    cudaCheckLast();
}

static void moe_token_backward(floatX* dx, float* dgate, float* dmix, const floatX* dout, const floatX* x,
                               const floatX* dxg, const floatX* cvec, const floatX* A, const int* idx,
                               const float* gate, const int* pos, const float* mix, int BT, int C, int k, int E,
                               int Kc, int Kp, float scale, int accumulate, cudaStream_t stream) {
    const int blocks = ceil_div(BT, MOE_TOKEN_WARPS), threads = MOE_TOKEN_WARPS * 32;
    if (moe_row_vec(dx, dout, dxg)) {
        moe_token_backward_kernel<x128::size><<<blocks, threads, 0, stream>>>(
            dx, dgate, dmix, dout, x, dxg, cvec, A, idx, gate, pos, mix, BT, C, k, E, Kc, Kp, scale, accumulate);
    } else {
        moe_token_backward_kernel<1><<<blocks, threads, 0, stream>>>(
            dx, dgate, dmix, dout, x, dxg, cvec, A, idx, gate, pos, mix, BT, C, k, E, Kc, Kp, scale, accumulate);
    }
    cudaCheckLast();
}

// scratch bytes of moe_const_grads for P pairs (a chunk count that covers any one expert's segment)
static inline size_t moe_const_grads_scratch_bytes(int P, int C, int Kc) {
    return (size_t)Kc * ceil_div(P, MOE_CONST_CHUNK) * 3 * C * sizeof(float);
}

static void moe_const_grads(floatX* dcvec, floatX* dA, const float* dmix, const floatX* dout, const floatX* x,
                            const float* gate, const float* mix, ExpertSchedule sched, const int* offsets, int P, int C,
                            int k, int E, int Kc, float scale, void* scratch, size_t scratch_bytes,
                            cudaStream_t stream) {
    if (Kc == 0) return;
    if (scratch_bytes < moe_const_grads_scratch_bytes(P, C, Kc)) {
        fprintf(stderr, "moe_const_grads: scratch of %zu bytes given, %zu needed\n", scratch_bytes,
                moe_const_grads_scratch_bytes(P, C, Kc));
        exit(EXIT_FAILURE);
    }
    const int max_chunks = ceil_div(P, MOE_CONST_CHUNK);
    dim3 grid(max_chunks, ceil_div(C, 128), Kc);
    moe_const_grads_partial_kernel<<<grid, 128, 0, stream>>>((float*)scratch, dmix, dout, x, gate, mix,
                                                             sched.sorted_pair, offsets, C, k, E, max_chunks, scale);
    cudaCheckLast();
    moe_const_grads_finish_kernel<<<dim3(ceil_div(C, 128), Kc), 128, 0, stream>>>(dcvec, dA, (const float*)scratch,
                                                                                 offsets, C, E, Kc, max_chunks);
    cudaCheckLast();
}

static void moe_expert_offsets(int* offsets, const int* counts, int Et, cudaStream_t stream) {
    moe_expert_offsets_kernel<<<1, 32, 0, stream>>>(offsets, counts, Et);
    cudaCheckLast();
}

#endif  // OMNIMOE_MOE_EXPERTS_CUH
