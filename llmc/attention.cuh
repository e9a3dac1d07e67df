/*
attention.cuh - causal multi-head self-attention for the omnimoe CUDA trainer, forward and backward.

Defines (host launchers, all asynchronous on the given stream, no allocations, no host syncs):
  attention_forward(out, lse, qkv, B, T, C, NH, stream)
  attention_backward_scratch_bytes(B, T, C, NH)
  attention_backward(dqkv, dout, qkv, out, lse, B, T, C, NH, scratch, stream)

Layouts: qkv is (B, T, 3C) with q at channel offset 0, k at C, v at 2C; head h uses channels
[h*hs, (h+1)*hs) inside each (hs = C/NH). out is (B, T, C) with head h in [h*hs, (h+1)*hs).
lse is (B, NH, T) fp32: the natural-log logsumexp of each query row's scaled scores, saved by the
forward pass for the backward pass. Scale 1/sqrt(hs), causal (query t sees keys 0..t).
dqkv (B, T, 3C) is OVERWRITTEN (dq at offset 0, dk at C, dv at 2C), not accumulated.

Implementation (bf16 floatX): flash-attention-2 style fused kernels written for this project, no
cuDNN. Tensor cores through inline PTX mma.sync m16n8k16 (bf16 in, fp32 accumulate), ldmatrix
fragment loads from padded shared-memory tiles, cp.async double buffering of the streamed tiles.
  forward : one block per (query tile, b, h); online softmax over key tiles; S and P stay in
            registers (the TxT matrix is never materialised).
  backward: (1) preprocess: D = rowsum(dout * out) and lse*log2(e) into scratch, padded to a
            multiple of 64 rows; (2) dK/dV kernel: one block per key tile, iterating over the query
            tiles at or after it; works on S^T so P^T and dS^T feed the next MMAs from registers;
            (3) dQ kernel: one block per query tile, iterating over key tiles up to the diagonal,
            recomputing S, P, dP. No atomics anywhere: every output element is written by exactly
            one thread after a fixed-order sum, so results are bitwise reproducible.
Head sizes 32, 64, 128. Any T >= 1 (tails are zero-filled on load and masked on store).
With -DENABLE_FP32 (floatX = float) a simple fp32 path runs instead: one warp per query or key row,
same math, same scratch layout (slow; meant for tight-tolerance checking, not speed).

Tile choices (benchmarked in the test): fwd 4 warps x 32 query rows, 64-key tiles; dK/dV 4 warps
x 16 keys with 64-query tiles; dQ 4 warps x 16 queries (fragments kept in registers), 64-key tiles.
*/
#pragma once

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <math.h>

#include "cuda_utils.cuh"

#define ATTN_KEY_TILE 64   // keys per tile in the forward and dQ kernels
#define ATTN_T_PAD 64      // backward scratch rows are padded to a multiple of this
#define ATTN_LOG2E 1.4426950408889634f

typedef __nv_bfloat16 attn_bf16;

// ------------------------------------------------------------------------------------------------
// small device helpers: PTX wrappers

__device__ __forceinline__ uint32_t attn_smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte asynchronous global->shared copy; when !valid the 16 destination bytes are zero-filled
// and nothing is read from global memory.
__device__ __forceinline__ void attn_cp_async_16(void* smem_dst, const void* gmem_src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :: "r"(attn_smem_addr(smem_dst)), "l"(gmem_src), "r"(valid ? 16 : 0) : "memory");
}
__device__ __forceinline__ void attn_cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template<int N>
__device__ __forceinline__ void attn_cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" :: "n"(N) : "memory");
}

// Loads four 8x8 b16 matrices. With the lane addressing used everywhere below
// (row = (lane&7) + 8*((lane>>3)&1), col = 8*(lane>>4) inside a 16x16 block), r[0] = rows 0-7 x
// cols 0-7, r[1] = rows 8-15 x cols 0-7, r[2] = rows 0-7 x cols 8-15, r[3] = rows 8-15 x cols 8-15.
__device__ __forceinline__ void attn_ldsm_x4(uint32_t (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(attn_smem_addr(p)));
}
__device__ __forceinline__ void attn_ldsm_x4_trans(uint32_t (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(attn_smem_addr(p)));
}

// d += a * b for one 16x8x16 tile; a: 16x16 bf16 (row), b: 16x8 bf16 (col), d: 16x8 fp32.
// Accumulator layout: d[0],d[1] = row lane/4, cols 2*(lane%4)+{0,1}; d[2],d[3] = row lane/4+8.
__device__ __forceinline__ void attn_mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 2^x in one MUFU.EX2 (flushes results below 2^-126 to zero, which is harmless for softmax
// probabilities; exp2f() without fast-math adds range fix-ups around the same instruction)
__device__ __forceinline__ float attn_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ uint32_t attn_pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // lo goes to the low 16 bits
    return *reinterpret_cast<uint32_t*>(&v);
}

// Two adjacent 16x8 fp32 accumulator tiles (n-tiles 2j, 2j+1) become one 16x16 bf16 A fragment.
__device__ __forceinline__ void attn_acc_to_a(uint32_t (&a)[4], const float (&lo)[4], const float (&hi)[4]) {
    a[0] = attn_pack_bf16(lo[0], lo[1]);
    a[1] = attn_pack_bf16(lo[2], lo[3]);
    a[2] = attn_pack_bf16(hi[0], hi[1]);
    a[3] = attn_pack_bf16(hi[2], hi[3]);
}

// Copies rows [row0, row0+ROWS) x HS channels of a row-major bf16 matrix (row stride ld elements)
// into shared memory with row stride HS+8 (the 16-byte pad makes ldmatrix conflict-free).
// Rows >= nrows are zero-filled.
template<int ROWS, int HS, int NTHREADS>
__device__ __forceinline__ void attn_load_tile(attn_bf16* s, const attn_bf16* g, int row0, int nrows, int ld) {
    constexpr int CPR = HS / 8;  // 16-byte chunks per row
    #pragma unroll
    for (int c = threadIdx.x; c < ROWS * CPR; c += NTHREADS) {
        const int r = c / CPR, col = (c % CPR) * 8;
        const int row = row0 + r;
        const bool valid = row < nrows;
        attn_cp_async_16(s + r * (HS + 8) + col, g + (size_t)(valid ? row : 0) * ld + col, valid);
    }
}

// Copies ROWS x HS from padded shared memory (stride HS+8) to global rows row0.. (< nrows),
// 16 bytes per thread per step.
template<int ROWS, int HS, int NTHREADS>
__device__ __forceinline__ void attn_store_tile(attn_bf16* g, const attn_bf16* s, int row0, int nrows, int ld) {
    constexpr int CPR = HS / 8;
    #pragma unroll
    for (int c = threadIdx.x; c < ROWS * CPR; c += NTHREADS) {
        const int r = c / CPR, col = (c % CPR) * 8;
        if (row0 + r < nrows) {
            *reinterpret_cast<int4*>(g + (size_t)(row0 + r) * ld + col) =
                *reinterpret_cast<const int4*>(s + r * (HS + 8) + col);
        }
    }
}

// ------------------------------------------------------------------------------------------------
// forward kernel
// Block = NWARPS warps; each warp owns MT*16 consecutive query rows (so BR = NWARPS*MT*16 rows per
// block); key tiles of 64 rows stream through a double buffer. Grid: (B*NH, query tiles), the
// heaviest (last) query tiles are launched first so the causal imbalance evens out.

template<int HS, int MT, int NWARPS>
__global__ void __launch_bounds__(NWARPS * 32)
attn_fwd_kernel(attn_bf16* __restrict__ out, float* __restrict__ lse, const attn_bf16* __restrict__ qkv,
                int T, int NH, float scale, float scale_log2) {
    constexpr int NTHREADS = NWARPS * 32;
    constexpr int BR = NWARPS * MT * 16;
    constexpr int BC = ATTN_KEY_TILE;
    constexpr int SS = HS + 8;     // shared-memory row stride (elements)
    constexpr int KS = HS / 16;    // k-steps of 16 along the head dimension
    constexpr int NS = BC / 8;     // n-tiles of 8 keys in S
    constexpr int NO = HS / 8;     // n-tiles of 8 channels in O
    extern __shared__ __align__(16) unsigned char attn_smem[];
    attn_bf16* sQ = reinterpret_cast<attn_bf16*>(attn_smem);  // [BR][SS], reused to stage O
    attn_bf16* sK = sQ + BR * SS;                               // [2][BC][SS]
    attn_bf16* sV = sK + 2 * BC * SS;                           // [2][BC][SS]

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int lrow = (lane & 7) + ((lane >> 3) & 1) * 8, lcol = (lane >> 4) * 8;
    const int bh = blockIdx.x, b = bh / NH, h = bh % NH;
    const int q0 = (gridDim.y - 1 - blockIdx.y) * BR;
    const int C = NH * HS, C3 = 3 * C;
    const attn_bf16* qg = qkv + (size_t)b * T * C3 + h * HS;
    const attn_bf16* kg = qg + C;
    const attn_bf16* vg = qg + 2 * C;

    attn_load_tile<BR, HS, NTHREADS>(sQ, qg, q0, T, C3);
    attn_cp_async_commit();
    const int n_ktiles = (min(q0 + BR, T) - 1) / BC + 1;  // causal: keys up to the block's last query
    attn_load_tile<BC, HS, NTHREADS>(sK, kg, 0, T, C3);
    attn_load_tile<BC, HS, NTHREADS>(sV, vg, 0, T, C3);
    attn_cp_async_commit();
    attn_cp_async_wait<1>();
    __syncthreads();

    const int wrow0 = warp * MT * 16;          // this warp's first row inside the tile
    const int wq0 = q0 + wrow0, wq_last = wq0 + MT * 16 - 1;
    uint32_t qf[MT][KS][4];
    #pragma unroll
    for (int mt = 0; mt < MT; mt++) {
        #pragma unroll
        for (int ks = 0; ks < KS; ks++) {
            attn_ldsm_x4(qf[mt][ks], sQ + (wrow0 + mt * 16 + lrow) * SS + ks * 16 + lcol);
        }
    }

    float o[MT][NO][4];
    float m_run[MT][2], l_run[MT][2];  // running max (raw score units) and partial row sums
    #pragma unroll
    for (int mt = 0; mt < MT; mt++) {
        #pragma unroll
        for (int n = 0; n < NO; n++) { o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.0f; }
        m_run[mt][0] = m_run[mt][1] = -INFINITY;
        l_run[mt][0] = l_run[mt][1] = 0.0f;
    }

    for (int kt = 0; kt < n_ktiles; kt++) {
        const int buf = kt & 1;
        if (kt + 1 < n_ktiles) {
            attn_load_tile<BC, HS, NTHREADS>(sK + (buf ^ 1) * BC * SS, kg, (kt + 1) * BC, T, C3);
            attn_load_tile<BC, HS, NTHREADS>(sV + (buf ^ 1) * BC * SS, vg, (kt + 1) * BC, T, C3);
            attn_cp_async_commit();
            attn_cp_async_wait<1>();
        } else {
            attn_cp_async_wait<0>();
        }
        __syncthreads();
        const int k0 = kt * BC;
        if (k0 <= wq_last) {  // else every key of this tile is in the future of all the warp's rows
            const attn_bf16* sKb = sK + buf * BC * SS;
            const attn_bf16* sVb = sV + buf * BC * SS;
            float s[MT][NS][4];
            #pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                #pragma unroll
                for (int n = 0; n < NS; n++) { s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.0f; }
            }
            // S = Q K^T (B operand: K rows are keys, so a plain ldmatrix gives K^T fragments)
            #pragma unroll
            for (int ks = 0; ks < KS; ks++) {
                #pragma unroll
                for (int np = 0; np < NS / 2; np++) {
                    uint32_t kb[4];
                    attn_ldsm_x4(kb, sKb + (np * 16 + lrow) * SS + ks * 16 + lcol);
                    #pragma unroll
                    for (int mt = 0; mt < MT; mt++) {
                        attn_mma(s[mt][2 * np], qf[mt][ks], kb[0], kb[2]);
                        attn_mma(s[mt][2 * np + 1], qf[mt][ks], kb[1], kb[3]);
                    }
                }
            }
            if (k0 + BC - 1 > wq0) {  // the tile crosses this warp's diagonal: hide future keys
                #pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    #pragma unroll
                    for (int n = 0; n < NS; n++) {
                        #pragma unroll
                        for (int e = 0; e < 4; e++) {
                            const int row = wq0 + mt * 16 + g + (e >> 1) * 8;
                            const int col = k0 + n * 8 + 2 * t4 + (e & 1);
                            if (col > row) { s[mt][n][e] = -INFINITY; }
                        }
                    }
                }
            }
            // online softmax. Key tile 0 always holds key 0, visible to every row, so m_run is
            // finite after the first tile and (m_old - m_new) is never (-inf) - (-inf).
            #pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                #pragma unroll
                for (int hf = 0; hf < 2; hf++) {
                    float mx = m_run[mt][hf];
                    #pragma unroll
                    for (int n = 0; n < NS; n++) { mx = fmaxf(mx, fmaxf(s[mt][n][2 * hf], s[mt][n][2 * hf + 1])); }
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                    const float corr = attn_exp2((m_run[mt][hf] - mx) * scale_log2);
                    m_run[mt][hf] = mx;
                    const float msc = mx * scale_log2;
                    float rs = 0.0f;
                    #pragma unroll
                    for (int n = 0; n < NS; n++) {
                        #pragma unroll
                        for (int e = 2 * hf; e < 2 * hf + 2; e++) {
                            const float p = attn_exp2(fmaf(s[mt][n][e], scale_log2, -msc));
                            s[mt][n][e] = p;
                            rs += p;
                        }
                    }
                    l_run[mt][hf] = l_run[mt][hf] * corr + rs;
                    #pragma unroll
                    for (int n = 0; n < NO; n++) { o[mt][n][2 * hf] *= corr; o[mt][n][2 * hf + 1] *= corr; }
                }
            }
            // O += P V (P from registers as the A operand; V rows are keys = k, so ldmatrix.trans)
            #pragma unroll
            for (int kk = 0; kk < BC / 16; kk++) {
                uint32_t pa[MT][4];
                #pragma unroll
                for (int mt = 0; mt < MT; mt++) { attn_acc_to_a(pa[mt], s[mt][2 * kk], s[mt][2 * kk + 1]); }
                #pragma unroll
                for (int np = 0; np < NO / 2; np++) {
                    uint32_t vb[4];
                    attn_ldsm_x4_trans(vb, sVb + (kk * 16 + lrow) * SS + np * 16 + lcol);
                    #pragma unroll
                    for (int mt = 0; mt < MT; mt++) {
                        attn_mma(o[mt][2 * np], pa[mt], vb[0], vb[1]);
                        attn_mma(o[mt][2 * np + 1], pa[mt], vb[2], vb[3]);
                    }
                }
            }
        }
        __syncthreads();  // everyone is done with buffer `buf` before it is refilled
    }

    // epilogue: normalise, write lse, stage O through shared memory for 16-byte stores
    #pragma unroll
    for (int mt = 0; mt < MT; mt++) {
        #pragma unroll
        for (int hf = 0; hf < 2; hf++) {
            float l = l_run[mt][hf];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            const float inv = 1.0f / l;
            const int r = wrow0 + mt * 16 + g + hf * 8;
            if (t4 == 0 && q0 + r < T) { lse[(size_t)bh * T + q0 + r] = m_run[mt][hf] * scale + logf(l); }
            #pragma unroll
            for (int n = 0; n < NO; n++) {
                *reinterpret_cast<uint32_t*>(sQ + r * SS + n * 8 + 2 * t4) =
                    attn_pack_bf16(o[mt][n][2 * hf] * inv, o[mt][n][2 * hf + 1] * inv);
            }
        }
    }
    __syncthreads();
    attn_store_tile<BR, HS, NTHREADS>(out + (size_t)b * T * C + h * HS, sQ, q0, T, C);
}

// ------------------------------------------------------------------------------------------------
// backward

// scratch layout: lse2[B*NH][Tpad] (= lse * log2(e), +inf on padded rows) then D[B*NH][Tpad]
// (= rowsum(dout * out), 0 on padded rows).
static inline int attn_tpad(int T) { return ((T + ATTN_T_PAD - 1) / ATTN_T_PAD) * ATTN_T_PAD; }

__device__ __forceinline__ void attn_load8(float (&v)[8], const __nv_bfloat16* p) {
    const int4 raw = *reinterpret_cast<const int4*>(p);
    const __nv_bfloat16* e = reinterpret_cast<const __nv_bfloat16*>(&raw);
    #pragma unroll
    for (int i = 0; i < 8; i++) { v[i] = __bfloat162float(e[i]); }
}
__device__ __forceinline__ void attn_load8(float (&v)[8], const float* p) {
    const float4 a = reinterpret_cast<const float4*>(p)[0], c = reinterpret_cast<const float4*>(p)[1];
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = c.x; v[5] = c.y; v[6] = c.z; v[7] = c.w;
}

// One warp per (b, padded t) token row: lane c takes 16-byte chunks c, c+32, ... of the row (8
// elements each), so a head's HS/8 chunks sit in consecutive lanes and are summed by a fixed
// xor-butterfly (deterministic); reads are fully coalesced.
template<int HS, typename Tp>
__global__ void attn_bwd_preprocess_kernel(float* __restrict__ lse2, float* __restrict__ Dsum,
                                           const Tp* __restrict__ dout, const Tp* __restrict__ out,
                                           const float* __restrict__ lse, int B, int T, int Tpad, int NH) {
    constexpr int CPH = HS / 8;  // chunks per head: 4, 8 or 16, divides 32
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5);
    if (row >= B * Tpad) { return; }  // uniform per warp
    const int b = row / Tpad, t = row % Tpad;
    const int nchunks = NH * CPH;
    for (int c0 = 0; c0 < nchunks; c0 += 32) {
        const int c = c0 + lane, h = c / CPH;
        float acc = 0.0f;
        if (t < T && c < nchunks) {
            float x[8], y[8];
            const size_t off = ((size_t)b * T + t) * (NH * HS) + (size_t)c * 8;
            attn_load8(x, dout + off);
            attn_load8(y, out + off);
            #pragma unroll
            for (int i = 0; i < 8; i++) { acc = fmaf(x[i], y[i], acc); }
        }
        #pragma unroll
        for (int o = CPH / 2; o > 0; o >>= 1) { acc += __shfl_xor_sync(0xffffffffu, acc, o); }
        if (c < nchunks && (lane % CPH) == 0) {
            const size_t bh = (size_t)b * NH + h;
            lse2[bh * Tpad + t] = t < T ? lse[bh * T + t] * ATTN_LOG2E : INFINITY;  // +inf -> P = 0
            Dsum[bh * Tpad + t] = t < T ? acc : 0.0f;
        }
    }
}

// dQ kernel: block = NWARPS warps x 16 query rows; key tiles of 64 stream through a double buffer.
// Per key tile: S = Q K^T, dP = dO V^T, P = exp(S*scale - lse), dS = P (dP - D), dQ += dS K.
// QREG: keep the warp's Q and dO fragments in registers for the whole key loop (else reload them
// from shared memory for every key tile: fewer registers, more ldmatrix).
template<int HS, int NWARPS, bool QREG>
__global__ void __launch_bounds__(NWARPS * 32)
attn_bwd_dq_kernel(attn_bf16* __restrict__ dqkv, const attn_bf16* __restrict__ dout,
                   const attn_bf16* __restrict__ qkv, const float* __restrict__ lse2,
                   const float* __restrict__ Dsum, int T, int Tpad, int NH, float scale, float scale_log2) {
    constexpr int NTHREADS = NWARPS * 32;
    constexpr int BR = NWARPS * 16;
    constexpr int BC = ATTN_KEY_TILE;
    constexpr int SS = HS + 8, KS = HS / 16, NS = BC / 8, NO = HS / 8;
    extern __shared__ __align__(16) unsigned char attn_smem[];
    attn_bf16* sQ = reinterpret_cast<attn_bf16*>(attn_smem);  // [BR][SS], reused to stage dQ
    attn_bf16* sdO = sQ + BR * SS;                              // [BR][SS]
    attn_bf16* sK = sdO + BR * SS;                              // [2][BC][SS]
    attn_bf16* sV = sK + 2 * BC * SS;                           // [2][BC][SS]

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int lrow = (lane & 7) + ((lane >> 3) & 1) * 8, lcol = (lane >> 4) * 8;
    const int bh = blockIdx.x, b = bh / NH, h = bh % NH;
    const int q0 = (gridDim.y - 1 - blockIdx.y) * BR;
    const int C = NH * HS, C3 = 3 * C;
    const attn_bf16* qg = qkv + (size_t)b * T * C3 + h * HS;
    const attn_bf16* kg = qg + C;
    const attn_bf16* vg = qg + 2 * C;
    const attn_bf16* dog = dout + (size_t)b * T * C + h * HS;

    attn_load_tile<BR, HS, NTHREADS>(sQ, qg, q0, T, C3);
    attn_load_tile<BR, HS, NTHREADS>(sdO, dog, q0, T, C);
    attn_cp_async_commit();
    const int n_ktiles = (min(q0 + BR, T) - 1) / BC + 1;
    attn_load_tile<BC, HS, NTHREADS>(sK, kg, 0, T, C3);
    attn_load_tile<BC, HS, NTHREADS>(sV, vg, 0, T, C3);
    attn_cp_async_commit();

    const int wrow0 = warp * 16;
    const int wq0 = q0 + wrow0, wq_last = wq0 + 15;
    uint32_t qreg[QREG ? KS : 1][4], dreg[QREG ? KS : 1][4];
    if constexpr (QREG) {
        attn_cp_async_wait<1>();  // the Q/dO group has landed
        __syncthreads();
        #pragma unroll
        for (int ks = 0; ks < KS; ks++) {
            attn_ldsm_x4(qreg[ks], sQ + (wrow0 + lrow) * SS + ks * 16 + lcol);
            attn_ldsm_x4(dreg[ks], sdO + (wrow0 + lrow) * SS + ks * 16 + lcol);
        }
    }
    float lse_r[2], d_r[2];  // this thread's rows g and g+8
    #pragma unroll
    for (int hf = 0; hf < 2; hf++) {
        const int row = wq0 + g + hf * 8;
        lse_r[hf] = row < T ? lse2[(size_t)bh * Tpad + row] : INFINITY;  // +inf -> P = 0
        d_r[hf] = row < T ? Dsum[(size_t)bh * Tpad + row] : 0.0f;
    }
    float dq[NO][4];
    #pragma unroll
    for (int n = 0; n < NO; n++) { dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.0f; }

    for (int kt = 0; kt < n_ktiles; kt++) {
        const int buf = kt & 1;
        if (kt + 1 < n_ktiles) {
            attn_load_tile<BC, HS, NTHREADS>(sK + (buf ^ 1) * BC * SS, kg, (kt + 1) * BC, T, C3);
            attn_load_tile<BC, HS, NTHREADS>(sV + (buf ^ 1) * BC * SS, vg, (kt + 1) * BC, T, C3);
            attn_cp_async_commit();
            attn_cp_async_wait<1>();
        } else {
            attn_cp_async_wait<0>();
        }
        __syncthreads();
        const int k0 = kt * BC;
        if (k0 <= wq_last) {
            const attn_bf16* sKb = sK + buf * BC * SS;
            const attn_bf16* sVb = sV + buf * BC * SS;
            float s[NS][4], dp[NS][4];
            #pragma unroll
            for (int n = 0; n < NS; n++) {
                s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
                dp[n][0] = dp[n][1] = dp[n][2] = dp[n][3] = 0.0f;
            }
            #pragma unroll
            for (int ks = 0; ks < KS; ks++) {
                uint32_t qa[4], da[4];
                if constexpr (QREG) {
                    #pragma unroll
                    for (int i = 0; i < 4; i++) { qa[i] = qreg[ks][i]; da[i] = dreg[ks][i]; }
                } else {
                    attn_ldsm_x4(qa, sQ + (wrow0 + lrow) * SS + ks * 16 + lcol);
                    attn_ldsm_x4(da, sdO + (wrow0 + lrow) * SS + ks * 16 + lcol);
                }
                #pragma unroll
                for (int np = 0; np < NS / 2; np++) {
                    uint32_t kb[4], vb[4];
                    attn_ldsm_x4(kb, sKb + (np * 16 + lrow) * SS + ks * 16 + lcol);
                    attn_ldsm_x4(vb, sVb + (np * 16 + lrow) * SS + ks * 16 + lcol);
                    attn_mma(s[2 * np], qa, kb[0], kb[2]);
                    attn_mma(s[2 * np + 1], qa, kb[1], kb[3]);
                    attn_mma(dp[2 * np], da, vb[0], vb[2]);
                    attn_mma(dp[2 * np + 1], da, vb[1], vb[3]);
                }
            }
            const bool diag = k0 + BC - 1 > wq0;
            #pragma unroll
            for (int n = 0; n < NS; n++) {
                #pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int hf = e >> 1;
                    const int row = wq0 + g + hf * 8;
                    const int col = k0 + n * 8 + 2 * t4 + (e & 1);
                    float p = attn_exp2(fmaf(s[n][e], scale_log2, -lse_r[hf]));
                    if (diag && col > row) { p = 0.0f; }
                    s[n][e] = p * (dp[n][e] - d_r[hf]);  // dS without the softmax scale
                }
            }
            // dQ += dS K (K rows are keys = k, so ldmatrix.trans)
            #pragma unroll
            for (int kk = 0; kk < BC / 16; kk++) {
                uint32_t a[4];
                attn_acc_to_a(a, s[2 * kk], s[2 * kk + 1]);
                #pragma unroll
                for (int np = 0; np < NO / 2; np++) {
                    uint32_t kb[4];
                    attn_ldsm_x4_trans(kb, sKb + (kk * 16 + lrow) * SS + np * 16 + lcol);
                    attn_mma(dq[2 * np], a, kb[0], kb[1]);
                    attn_mma(dq[2 * np + 1], a, kb[2], kb[3]);
                }
            }
        }
        __syncthreads();
    }

    // each warp stages its own 16 rows of dQ in sQ (rows only this warp ever read)
    #pragma unroll
    for (int hf = 0; hf < 2; hf++) {
        const int r = wrow0 + g + hf * 8;
        #pragma unroll
        for (int n = 0; n < NO; n++) {
            *reinterpret_cast<uint32_t*>(sQ + r * SS + n * 8 + 2 * t4) =
                attn_pack_bf16(dq[n][2 * hf] * scale, dq[n][2 * hf + 1] * scale);
        }
    }
    __syncthreads();
    attn_store_tile<BR, HS, NTHREADS>(dqkv + (size_t)b * T * C3 + h * HS, sQ, q0, T, C3);
}

// dK/dV kernel: block = NWARPS warps x 16 key rows (BC = 16*NWARPS keys); query tiles of BRQ rows
// from the diagonal to the end stream through a double buffer. Working on transposed scores
// (keys x queries) lets P^T and dS^T go straight from accumulators into the A operand of
// dV += P^T dO and dK += dS^T Q.
// KVREG: keep the warp's K and V fragments in registers (else reload them per query tile).
template<int HS, int NWARPS, int BRQ, bool KVREG>
__global__ void __launch_bounds__(NWARPS * 32)
attn_bwd_dkdv_kernel(attn_bf16* __restrict__ dqkv, const attn_bf16* __restrict__ dout,
                     const attn_bf16* __restrict__ qkv, const float* __restrict__ lse2,
                     const float* __restrict__ Dsum, int T, int Tpad, int NH, float scale, float scale_log2) {
    static_assert(ATTN_T_PAD % BRQ == 0, "query tile must divide the scratch padding");
    constexpr int NTHREADS = NWARPS * 32;
    constexpr int BC = NWARPS * 16;
    constexpr int SS = HS + 8, KS = HS / 16, NQ = BRQ / 8, NO = HS / 8;
    extern __shared__ __align__(16) unsigned char attn_smem[];
    attn_bf16* sK = reinterpret_cast<attn_bf16*>(attn_smem);  // [BC][SS], reused to stage dK
    attn_bf16* sV = sK + BC * SS;                               // [BC][SS], reused to stage dV
    attn_bf16* sQ = sV + BC * SS;                               // [2][BRQ][SS]
    attn_bf16* sdO = sQ + 2 * BRQ * SS;                         // [2][BRQ][SS]
    float* sL = reinterpret_cast<float*>(sdO + 2 * BRQ * SS);   // [2][BRQ] lse * log2(e)
    float* sD = sL + 2 * BRQ;                                   // [2][BRQ]

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int lrow = (lane & 7) + ((lane >> 3) & 1) * 8, lcol = (lane >> 4) * 8;
    const int bh = blockIdx.x, b = bh / NH, h = bh % NH;
    const int k0 = blockIdx.y * BC;  // low key tiles have the most work and are launched first
    const int C = NH * HS, C3 = 3 * C;
    const attn_bf16* qg = qkv + (size_t)b * T * C3 + h * HS;
    const attn_bf16* kg = qg + C;
    const attn_bf16* vg = qg + 2 * C;
    const attn_bf16* dog = dout + (size_t)b * T * C + h * HS;
    const float* lg = lse2 + (size_t)bh * Tpad;
    const float* dg = Dsum + (size_t)bh * Tpad;

    attn_load_tile<BC, HS, NTHREADS>(sK, kg, k0, T, C3);
    attn_load_tile<BC, HS, NTHREADS>(sV, vg, k0, T, C3);
    attn_cp_async_commit();

    const int qt_first = k0 / BRQ;
    const int n_qtiles = (T + BRQ - 1) / BRQ;  // padded scratch covers every row of the last tile
    auto load_q_tile = [&](int qt, int buf) {
        const int qs = qt * BRQ;
        attn_load_tile<BRQ, HS, NTHREADS>(sQ + buf * BRQ * SS, qg, qs, T, C3);
        attn_load_tile<BRQ, HS, NTHREADS>(sdO + buf * BRQ * SS, dog, qs, T, C);
        for (int c = tid; c < 2 * (BRQ / 4); c += NTHREADS) {
            const int which = c / (BRQ / 4), j = (c % (BRQ / 4)) * 4;
            float* dst = (which == 0 ? sL : sD) + buf * BRQ + j;
            const float* src = (which == 0 ? lg : dg) + qs + j;
            attn_cp_async_16(dst, src, true);
        }
    };
    load_q_tile(qt_first, 0);
    attn_cp_async_commit();

    const int wrow0 = warp * 16;
    const int wk0 = k0 + wrow0;  // this warp's first key
    uint32_t kreg[KVREG ? KS : 1][4], vreg[KVREG ? KS : 1][4];
    if constexpr (KVREG) {
        attn_cp_async_wait<1>();  // the K/V group has landed
        __syncthreads();
        #pragma unroll
        for (int ks = 0; ks < KS; ks++) {
            attn_ldsm_x4(kreg[ks], sK + (wrow0 + lrow) * SS + ks * 16 + lcol);
            attn_ldsm_x4(vreg[ks], sV + (wrow0 + lrow) * SS + ks * 16 + lcol);
        }
    }
    float dk[NO][4], dv[NO][4];
    #pragma unroll
    for (int n = 0; n < NO; n++) {
        dk[n][0] = dk[n][1] = dk[n][2] = dk[n][3] = 0.0f;
        dv[n][0] = dv[n][1] = dv[n][2] = dv[n][3] = 0.0f;
    }

    for (int qt = qt_first; qt < n_qtiles; qt++) {
        const int buf = (qt - qt_first) & 1;
        if (qt + 1 < n_qtiles) {
            load_q_tile(qt + 1, buf ^ 1);
            attn_cp_async_commit();
            attn_cp_async_wait<1>();
        } else {
            attn_cp_async_wait<0>();
        }
        __syncthreads();
        const int q0 = qt * BRQ;
        if (q0 + BRQ - 1 >= wk0) {  // else every query of the tile is before all the warp's keys
            const attn_bf16* sQb = sQ + buf * BRQ * SS;
            const attn_bf16* sdOb = sdO + buf * BRQ * SS;
            const float* sLb = sL + buf * BRQ;
            const float* sDb = sD + buf * BRQ;
            float st[NQ][4], dpt[NQ][4];  // S^T and dP^T: 16 keys x BRQ queries
            #pragma unroll
            for (int n = 0; n < NQ; n++) {
                st[n][0] = st[n][1] = st[n][2] = st[n][3] = 0.0f;
                dpt[n][0] = dpt[n][1] = dpt[n][2] = dpt[n][3] = 0.0f;
            }
            #pragma unroll
            for (int ks = 0; ks < KS; ks++) {
                uint32_t ka[4], va[4];
                if constexpr (KVREG) {
                    #pragma unroll
                    for (int i = 0; i < 4; i++) { ka[i] = kreg[ks][i]; va[i] = vreg[ks][i]; }
                } else {
                    attn_ldsm_x4(ka, sK + (wrow0 + lrow) * SS + ks * 16 + lcol);
                    attn_ldsm_x4(va, sV + (wrow0 + lrow) * SS + ks * 16 + lcol);
                }
                #pragma unroll
                for (int np = 0; np < NQ / 2; np++) {
                    uint32_t qb[4], db[4];
                    attn_ldsm_x4(qb, sQb + (np * 16 + lrow) * SS + ks * 16 + lcol);
                    attn_ldsm_x4(db, sdOb + (np * 16 + lrow) * SS + ks * 16 + lcol);
                    attn_mma(st[2 * np], ka, qb[0], qb[2]);
                    attn_mma(st[2 * np + 1], ka, qb[1], qb[3]);
                    attn_mma(dpt[2 * np], va, db[0], db[2]);
                    attn_mma(dpt[2 * np + 1], va, db[1], db[3]);
                }
            }
            const bool diag = q0 < wk0 + 15;
            #pragma unroll
            for (int n = 0; n < NQ; n++) {
                const int qi = n * 8 + 2 * t4;  // local query index of elements e = 0 and 2
                const float2 l2 = *reinterpret_cast<const float2*>(sLb + qi);
                const float2 d2 = *reinterpret_cast<const float2*>(sDb + qi);
                #pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int key = wk0 + g + (e >> 1) * 8;
                    const int q = q0 + qi + (e & 1);
                    const float lv = (e & 1) ? l2.y : l2.x;
                    const float dd = (e & 1) ? d2.y : d2.x;
                    float p = attn_exp2(fmaf(st[n][e], scale_log2, -lv));
                    if (diag && q < key) { p = 0.0f; }
                    st[n][e] = p;
                    dpt[n][e] = p * (dpt[n][e] - dd);  // dS^T without the softmax scale
                }
            }
            // dV += P^T dO, dK += dS^T Q (dO, Q rows are queries = k, so ldmatrix.trans)
            #pragma unroll
            for (int kk = 0; kk < BRQ / 16; kk++) {
                uint32_t pa[4], sa[4];
                attn_acc_to_a(pa, st[2 * kk], st[2 * kk + 1]);
                attn_acc_to_a(sa, dpt[2 * kk], dpt[2 * kk + 1]);
                #pragma unroll
                for (int np = 0; np < NO / 2; np++) {
                    uint32_t db[4], qb[4];
                    attn_ldsm_x4_trans(db, sdOb + (kk * 16 + lrow) * SS + np * 16 + lcol);
                    attn_ldsm_x4_trans(qb, sQb + (kk * 16 + lrow) * SS + np * 16 + lcol);
                    attn_mma(dv[2 * np], pa, db[0], db[1]);
                    attn_mma(dv[2 * np + 1], pa, db[2], db[3]);
                    attn_mma(dk[2 * np], sa, qb[0], qb[1]);
                    attn_mma(dk[2 * np + 1], sa, qb[2], qb[3]);
                }
            }
        }
        __syncthreads();
    }

    // each warp stages its own 16 key rows of dK (in sK) and dV (in sV)
    #pragma unroll
    for (int hf = 0; hf < 2; hf++) {
        const int r = wrow0 + g + hf * 8;
        #pragma unroll
        for (int n = 0; n < NO; n++) {
            *reinterpret_cast<uint32_t*>(sK + r * SS + n * 8 + 2 * t4) =
                attn_pack_bf16(dk[n][2 * hf] * scale, dk[n][2 * hf + 1] * scale);
            *reinterpret_cast<uint32_t*>(sV + r * SS + n * 8 + 2 * t4) =
                attn_pack_bf16(dv[n][2 * hf], dv[n][2 * hf + 1]);
        }
    }
    __syncthreads();
    attn_bf16* dkg = dqkv + (size_t)b * T * C3 + C + h * HS;
    attn_store_tile<BC, HS, NTHREADS>(dkg, sK, k0, T, C3);
    attn_store_tile<BC, HS, NTHREADS>(dkg + C, sV, k0, T, C3);
}

// ------------------------------------------------------------------------------------------------
// simple fp32 path (floatX = float): one warp per row, same math and scratch layout.

__device__ __forceinline__ float attn_tof(float x) { return x; }
__device__ __forceinline__ float attn_tof(__nv_bfloat16 x) { return __bfloat162float(x); }
template<typename Tp> __device__ __forceinline__ Tp attn_fromf(float x);
template<> __device__ __forceinline__ float attn_fromf<float>(float x) { return x; }
template<> __device__ __forceinline__ __nv_bfloat16 attn_fromf<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

__device__ __forceinline__ float attn_warp_sum(float v) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) { v += __shfl_xor_sync(0xffffffffu, v, o); }
    return v;
}

template<int HS, typename Tp>
__global__ void attn_fwd_simple_kernel(Tp* out, float* lse, const Tp* qkv, int T, int NH, float scale) {
    constexpr int R = HS / 32;
    const int lane = threadIdx.x & 31;
    const int i = blockIdx.y * (blockDim.x / 32) + (threadIdx.x >> 5);
    const int bh = blockIdx.x, b = bh / NH, h = bh % NH;
    if (i >= T) { return; }
    const int C = NH * HS, C3 = 3 * C;
    const Tp* base = qkv + (size_t)b * T * C3 + h * HS;
    float q[R], o[R];
    for (int r = 0; r < R; r++) { q[r] = attn_tof(base[(size_t)i * C3 + lane + 32 * r]); o[r] = 0.0f; }
    float m = -INFINITY, l = 0.0f;
    for (int j = 0; j <= i; j++) {
        const Tp* kr = base + (size_t)j * C3 + C;
        const Tp* vr = kr + C;
        float s = 0.0f;
        for (int r = 0; r < R; r++) { s += q[r] * attn_tof(kr[lane + 32 * r]); }
        s = attn_warp_sum(s) * scale;
        const float mn = fmaxf(m, s), corr = expf(m - mn), p = expf(s - mn);
        l = l * corr + p;
        for (int r = 0; r < R; r++) { o[r] = o[r] * corr + p * attn_tof(vr[lane + 32 * r]); }
        m = mn;
    }
    for (int r = 0; r < R; r++) { out[((size_t)b * T + i) * C + h * HS + lane + 32 * r] = attn_fromf<Tp>(o[r] / l); }
    if (lane == 0) { lse[(size_t)bh * T + i] = m + logf(l); }
}

template<int HS, typename Tp>
__global__ void attn_bwd_dq_simple_kernel(Tp* dqkv, const Tp* dout, const Tp* qkv, const float* lse2,
                                          const float* Dsum, int T, int Tpad, int NH, float scale, float scale_log2) {
    constexpr int R = HS / 32;
    const int lane = threadIdx.x & 31;
    const int i = blockIdx.y * (blockDim.x / 32) + (threadIdx.x >> 5);
    const int bh = blockIdx.x, b = bh / NH, h = bh % NH;
    if (i >= T) { return; }
    const int C = NH * HS, C3 = 3 * C;
    const Tp* base = qkv + (size_t)b * T * C3 + h * HS;
    const Tp* dor = dout + ((size_t)b * T + i) * C + h * HS;
    float q[R], dO[R], dq[R];
    for (int r = 0; r < R; r++) {
        q[r] = attn_tof(base[(size_t)i * C3 + lane + 32 * r]);
        dO[r] = attn_tof(dor[lane + 32 * r]);
        dq[r] = 0.0f;
    }
    const float l2 = lse2[(size_t)bh * Tpad + i], dd = Dsum[(size_t)bh * Tpad + i];
    for (int j = 0; j <= i; j++) {
        const Tp* kr = base + (size_t)j * C3 + C;
        const Tp* vr = kr + C;
        float s = 0.0f, dp = 0.0f;
        for (int r = 0; r < R; r++) {
            s += q[r] * attn_tof(kr[lane + 32 * r]);
            dp += dO[r] * attn_tof(vr[lane + 32 * r]);
        }
        s = attn_warp_sum(s);
        dp = attn_warp_sum(dp);
        const float ds = exp2f(s * scale_log2 - l2) * (dp - dd);
        for (int r = 0; r < R; r++) { dq[r] += ds * attn_tof(kr[lane + 32 * r]); }
    }
    for (int r = 0; r < R; r++) { dqkv[((size_t)b * T + i) * C3 + h * HS + lane + 32 * r] = attn_fromf<Tp>(dq[r] * scale); }
}

template<int HS, typename Tp>
__global__ void attn_bwd_dkdv_simple_kernel(Tp* dqkv, const Tp* dout, const Tp* qkv, const float* lse2,
                                            const float* Dsum, int T, int Tpad, int NH, float scale, float scale_log2) {
    constexpr int R = HS / 32;
    const int lane = threadIdx.x & 31;
    const int j = blockIdx.y * (blockDim.x / 32) + (threadIdx.x >> 5);
    const int bh = blockIdx.x, b = bh / NH, h = bh % NH;
    if (j >= T) { return; }
    const int C = NH * HS, C3 = 3 * C;
    const Tp* base = qkv + (size_t)b * T * C3 + h * HS;
    float k[R], v[R], dk[R], dv[R];
    for (int r = 0; r < R; r++) {
        k[r] = attn_tof(base[(size_t)j * C3 + C + lane + 32 * r]);
        v[r] = attn_tof(base[(size_t)j * C3 + 2 * C + lane + 32 * r]);
        dk[r] = 0.0f;
        dv[r] = 0.0f;
    }
    for (int i = j; i < T; i++) {
        const Tp* qr = base + (size_t)i * C3;
        const Tp* dor = dout + ((size_t)b * T + i) * C + h * HS;
        float s = 0.0f, dp = 0.0f;
        for (int r = 0; r < R; r++) {
            s += attn_tof(qr[lane + 32 * r]) * k[r];
            dp += attn_tof(dor[lane + 32 * r]) * v[r];
        }
        s = attn_warp_sum(s);
        dp = attn_warp_sum(dp);
        const float p = exp2f(s * scale_log2 - lse2[(size_t)bh * Tpad + i]);
        const float ds = p * (dp - Dsum[(size_t)bh * Tpad + i]);
        for (int r = 0; r < R; r++) {
            dv[r] += p * attn_tof(dor[lane + 32 * r]);
            dk[r] += ds * attn_tof(qr[lane + 32 * r]);
        }
    }
    Tp* dst = dqkv + ((size_t)b * T + j) * C3 + h * HS;
    for (int r = 0; r < R; r++) {
        dst[C + lane + 32 * r] = attn_fromf<Tp>(dk[r] * scale);
        dst[2 * C + lane + 32 * r] = attn_fromf<Tp>(dv[r]);
    }
}

// ------------------------------------------------------------------------------------------------
// host side

// Validates the shape and pointers; on bad input prints one clear message and exits.
static inline int attn_check_args(const char* fn, int B, int T, int C, int NH,
                                  const void* const* ptrs, const char* const* names, const int* aligns, int nptrs) {
    if (B < 1 || T < 1 || C < 1 || NH < 1 || C % NH != 0) {
        fprintf(stderr, "llmc/attention.cuh: %s: bad shape B=%d T=%d C=%d NH=%d (expected positive sizes "
                        "with C divisible by NH)\n", fn, B, T, C, NH);
        exit(EXIT_FAILURE);
    }
    const int hs = C / NH;
    if (hs != 32 && hs != 64 && hs != 128) {
        fprintf(stderr, "llmc/attention.cuh: %s: head size C/NH = %d/%d = %d is not supported "
                        "(expected 32, 64 or 128)\n", fn, C, NH, hs);
        exit(EXIT_FAILURE);
    }
    if ((T + 15) / 16 > 65535) {
        fprintf(stderr, "llmc/attention.cuh: %s: T=%d too long (at most %d)\n", fn, T, 65535 * 16);
        exit(EXIT_FAILURE);
    }
    for (int i = 0; i < nptrs; i++) {
        if (ptrs[i] == nullptr || (reinterpret_cast<uintptr_t>(ptrs[i]) & (aligns[i] - 1)) != 0) {
            fprintf(stderr, "llmc/attention.cuh: %s: pointer argument %s is null or not %d-byte aligned\n",
                    fn, names[i], aligns[i]);
            exit(EXIT_FAILURE);
        }
    }
    return hs;
}

inline size_t attention_backward_scratch_bytes(int B, int T, int C, int NH) {
    (void)C;
    return 2 * (size_t)B * NH * attn_tpad(T) * sizeof(float);
}

// tensor-core launchers, one per tile configuration (the test benchmarks several)
template<int HS, int MT, int NWARPS>
void attention_forward_tc(attn_bf16* out, float* lse, const attn_bf16* qkv, int B, int T, int NH, cudaStream_t stream) {
    constexpr int BR = NWARPS * MT * 16;
    const size_t smem = (size_t)(BR + 4 * ATTN_KEY_TILE) * (HS + 8) * sizeof(attn_bf16);
    auto kernel = attn_fwd_kernel<HS, MT, NWARPS>;
    cudaCheck(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    const float scale = 1.0f / sqrtf((float)HS);
    dim3 grid(B * NH, (T + BR - 1) / BR);
    kernel<<<grid, NWARPS * 32, smem, stream>>>(out, lse, qkv, T, NH, scale, scale * ATTN_LOG2E);
    cudaCheck(cudaGetLastError());
}

template<int HS, typename Tp>
void attention_backward_preprocess(float* scratch, const Tp* dout, const Tp* out, const float* lse,
                                   int B, int T, int NH, cudaStream_t stream) {
    const int Tpad = attn_tpad(T);
    float* lse2 = scratch;
    float* Dsum = scratch + (size_t)B * NH * Tpad;
    const int rows = B * Tpad, warps_per_block = 8;
    attn_bwd_preprocess_kernel<HS, Tp><<<(rows + warps_per_block - 1) / warps_per_block, warps_per_block * 32, 0, stream>>>(
        lse2, Dsum, dout, out, lse, B, T, Tpad, NH);
    cudaCheck(cudaGetLastError());
}

// dK/dV kernel alone (needs the preprocess results in scratch)
template<int HS, int KV_WARPS, int BRQ, bool KVREG>
void attention_backward_dkdv_tc(attn_bf16* dqkv, const attn_bf16* dout, const attn_bf16* qkv,
                                int B, int T, int NH, const float* scratch, cudaStream_t stream) {
    constexpr int BC = KV_WARPS * 16;
    const int Tpad = attn_tpad(T);
    const float scale = 1.0f / sqrtf((float)HS);
    const size_t smem = (size_t)(2 * BC + 4 * BRQ) * (HS + 8) * sizeof(attn_bf16) + 4 * BRQ * sizeof(float);
    auto kernel = attn_bwd_dkdv_kernel<HS, KV_WARPS, BRQ, KVREG>;
    cudaCheck(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    dim3 grid(B * NH, (T + BC - 1) / BC);
    kernel<<<grid, KV_WARPS * 32, smem, stream>>>(dqkv, dout, qkv, scratch, scratch + (size_t)B * NH * Tpad,
                                                  T, Tpad, NH, scale, scale * ATTN_LOG2E);
    cudaCheck(cudaGetLastError());
}

// dQ kernel alone (needs the preprocess results in scratch)
template<int HS, int DQ_WARPS, bool QREG>
void attention_backward_dq_tc(attn_bf16* dqkv, const attn_bf16* dout, const attn_bf16* qkv,
                              int B, int T, int NH, const float* scratch, cudaStream_t stream) {
    constexpr int BR = DQ_WARPS * 16;
    const int Tpad = attn_tpad(T);
    const float scale = 1.0f / sqrtf((float)HS);
    const size_t smem = (size_t)(2 * BR + 4 * ATTN_KEY_TILE) * (HS + 8) * sizeof(attn_bf16);
    auto kernel = attn_bwd_dq_kernel<HS, DQ_WARPS, QREG>;
    cudaCheck(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    dim3 grid(B * NH, (T + BR - 1) / BR);
    kernel<<<grid, DQ_WARPS * 32, smem, stream>>>(dqkv, dout, qkv, scratch, scratch + (size_t)B * NH * Tpad,
                                                  T, Tpad, NH, scale, scale * ATTN_LOG2E);
    cudaCheck(cudaGetLastError());
}

template<int HS, int DQ_WARPS, int KV_WARPS, int BRQ, bool QREG, bool KVREG>
void attention_backward_tc(attn_bf16* dqkv, const attn_bf16* dout, const attn_bf16* qkv, const attn_bf16* out,
                           const float* lse, int B, int T, int NH, float* scratch, cudaStream_t stream) {
    attention_backward_preprocess<HS, attn_bf16>(scratch, dout, out, lse, B, T, NH, stream);
    attention_backward_dkdv_tc<HS, KV_WARPS, BRQ, KVREG>(dqkv, dout, qkv, B, T, NH, scratch, stream);
    attention_backward_dq_tc<HS, DQ_WARPS, QREG>(dqkv, dout, qkv, B, T, NH, scratch, stream);
}

// simple-path launchers (any element type; used for floatX = float)
template<int HS, typename Tp>
void attention_forward_simple(Tp* out, float* lse, const Tp* qkv, int B, int T, int NH, cudaStream_t stream) {
    dim3 grid(B * NH, (T + 3) / 4);
    attn_fwd_simple_kernel<HS, Tp><<<grid, 128, 0, stream>>>(out, lse, qkv, T, NH, 1.0f / sqrtf((float)HS));
    cudaCheck(cudaGetLastError());
}

template<int HS, typename Tp>
void attention_backward_simple(Tp* dqkv, const Tp* dout, const Tp* qkv, const Tp* out, const float* lse,
                               int B, int T, int NH, float* scratch, cudaStream_t stream) {
    const int Tpad = attn_tpad(T);
    const float scale = 1.0f / sqrtf((float)HS);
    attention_backward_preprocess<HS, Tp>(scratch, dout, out, lse, B, T, NH, stream);
    const float* lse2 = scratch;
    const float* Dsum = scratch + (size_t)B * NH * Tpad;
    dim3 grid(B * NH, (T + 3) / 4);
    attn_bwd_dq_simple_kernel<HS, Tp><<<grid, 128, 0, stream>>>(dqkv, dout, qkv, lse2, Dsum, T, Tpad, NH, scale, scale * ATTN_LOG2E);
    cudaCheck(cudaGetLastError());
    attn_bwd_dkdv_simple_kernel<HS, Tp><<<grid, 128, 0, stream>>>(dqkv, dout, qkv, lse2, Dsum, T, Tpad, NH, scale, scale * ATTN_LOG2E);
    cudaCheck(cudaGetLastError());
}

// ------------------------------------------------------------------------------------------------
// public API

inline void attention_forward(floatX* out, float* lse, const floatX* qkv, int B, int T, int C, int NH,
                              cudaStream_t stream) {
    const void* ptrs[3] = {out, lse, qkv};
    const char* names[3] = {"out", "lse", "qkv"};
    const int aligns[3] = {16, 4, 16};
    const int hs = attn_check_args("attention_forward", B, T, C, NH, ptrs, names, aligns, 3);
#ifdef ENABLE_FP32
    if (hs == 32) { attention_forward_simple<32, float>(out, lse, qkv, B, T, NH, stream); }
    else if (hs == 64) { attention_forward_simple<64, float>(out, lse, qkv, B, T, NH, stream); }
    else { attention_forward_simple<128, float>(out, lse, qkv, B, T, NH, stream); }
#else
    if (hs == 32) { attention_forward_tc<32, 2, 4>(out, lse, qkv, B, T, NH, stream); }
    else if (hs == 64) { attention_forward_tc<64, 2, 4>(out, lse, qkv, B, T, NH, stream); }
    else { attention_forward_tc<128, 1, 4>(out, lse, qkv, B, T, NH, stream); }
#endif
}

// scratch: at least attention_backward_scratch_bytes(B, T, C, NH) bytes, 16-byte aligned.
inline void attention_backward(floatX* dqkv, const floatX* dout, const floatX* qkv, const floatX* out,
                               const float* lse, int B, int T, int C, int NH, float* scratch, cudaStream_t stream) {
    const void* ptrs[6] = {dqkv, dout, qkv, out, lse, scratch};
    const char* names[6] = {"dqkv", "dout", "qkv", "out", "lse", "scratch"};
    const int aligns[6] = {16, 16, 16, 16, 4, 16};
    const int hs = attn_check_args("attention_backward", B, T, C, NH, ptrs, names, aligns, 6);
#ifdef ENABLE_FP32
    if (hs == 32) { attention_backward_simple<32, float>(dqkv, dout, qkv, out, lse, B, T, NH, scratch, stream); }
    else if (hs == 64) { attention_backward_simple<64, float>(dqkv, dout, qkv, out, lse, B, T, NH, scratch, stream); }
    else { attention_backward_simple<128, float>(dqkv, dout, qkv, out, lse, B, T, NH, scratch, stream); }
#else
    if (hs == 32) { attention_backward_tc<32, 4, 4, 64, true, false>(dqkv, dout, qkv, out, lse, B, T, NH, scratch, stream); }
    else if (hs == 64) { attention_backward_tc<64, 4, 4, 64, true, false>(dqkv, dout, qkv, out, lse, B, T, NH, scratch, stream); }
    else { attention_backward_tc<128, 4, 4, 32, false, false>(dqkv, dout, qkv, out, lse, B, T, NH, scratch, stream); }
#endif
}
