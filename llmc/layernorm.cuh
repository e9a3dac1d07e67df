/*
layernorm.cuh - LayerNorm forward/backward (eps 1e-5) with fp32 statistics, deterministic.

Defines:
- layernorm_forward(out, mean, rstd, inp, weight, bias, BT, C, stream)
      out = (inp - mean) * rstd * weight + bias per row; mean/rstd (fp32, BT each) saved for
      the backward (either may be NULL when not needed, e.g. evaluation)
- fused_residual_layernorm_forward(residual_out, normed_out, mean, rstd, inp1, inp2,
                                   weight, bias, BT, C, stream)
      residual_out = inp1 + inp2 (rounded to floatX), then normed_out = LN(residual_out)
- layernorm_recompute(out, inp, weight, bias, mean, rstd, BT, C, stream)
      out = LN(inp) again from the saved mean/rstd (--recompute 2): the forward's
      row loop (layernorm_row_apply), so the same bits as the forward's normed output
- layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd, BT, C, scratch, stream)
      dinp += dx, dweight += sum_rows dout * xhat, dbias += sum_rows dout
- layernorm_backward_scratch_bytes(BT, C)

Layout: one warp per row, 16-byte vectors: C must be a multiple of 8 (bf16) / 4 (fp32) and the
buffers 16-byte aligned (checked); the lanes of a warp stride over the row.
The backward keeps a row in registers between its two passes when C is at most
LAYERNORM_BWD_MAX_CACHED_CHUNKS chunks of 32 lanes x 16 bytes (1,024 columns in bf16), else it
reads the row twice (layernorm_backward_cached = 0 forces that kernel); both give the same bits.
Determinism of the weight/bias gradients: each block owns a fixed range of
LAYERNORM_BWD_ROWS_PER_BLOCK rows; its warps accumulate per-column sums in their own shared
memory rows (each lane owns fixed columns; C up to ~7000 fits the opt-in shared memory), the block sums its warps in fixed order into a
per-block partial in scratch, and column_sum_partials (cuda_utils.cuh) sums the partials in a
fixed order.
*/
#ifndef OMNIMOE_LAYERNORM_CUH
#define OMNIMOE_LAYERNORM_CUH

#include "config.h"   // LAYERNORM_EPS
#include "cuda_utils.cuh"

#define LAYERNORM_FWD_WARPS 8
#define LAYERNORM_BWD_WARPS 4
#define LAYERNORM_BWD_ROWS_PER_BLOCK 32

// writes row_out = LN(row_in) of one row from its statistics, one warp per row: the forward
// kernels and layernorm_recompute share it, so the recomputed output has the forward's bits
// (same loads, same expression, same contraction)
__device__ inline void layernorm_row_apply(floatX* row_out, const floatX* row_in, const floatX* weight,
                                           const floatX* bias, float row_mean, float row_rstd, int C, int lane) {
    for (int c = lane * x128::size; c < C; c += 32 * x128::size) {
        x128 x = load128cs(row_in + c);
        x128 w = load128(weight + c);
        x128 b = load128(bias + c);
        x128 result;
        for (int k = 0; k < x128::size; k++) {
            result[k] = (floatX)(((float)x[k] - row_mean) * row_rstd * (float)w[k] + (float)b[k]);
        }
        store128(row_out + c, result);
    }
}

// shared by both forward kernels: normalise a row that is already in `row_in` (floatX)
__device__ inline void layernorm_row_normalize(floatX* row_out, float* mean, float* rstd, const floatX* row_in,
                                               const floatX* weight, const floatX* bias, int row, int C, float sum,
                                               int lane) {
    const float row_mean = sum / (float)C;
    float sq_sum = 0.0f;
    for (int c = lane * x128::size; c < C; c += 32 * x128::size) {
        x128 x = load128(row_in + c);
        for (int k = 0; k < x128::size; k++) {
            float diff = (float)x[k] - row_mean;
            sq_sum += diff * diff;
        }
    }
    sq_sum = warp_reduce_sum(sq_sum);
    const float row_rstd = rsqrtf(sq_sum / (float)C + LAYERNORM_EPS);
    layernorm_row_apply(row_out, row_in, weight, bias, row_mean, row_rstd, C, lane);
    if (lane == 0) {
        if (mean != NULL) { mean[row] = row_mean; }
        if (rstd != NULL) { rstd[row] = row_rstd; }
    }
}

__global__ void layernorm_forward_kernel(floatX* out, float* mean, float* rstd, const floatX* inp,
                                         const floatX* weight, const floatX* bias, int BT, int C) {
    const int lane = threadIdx.x % 32;
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= BT) { return; }  // whole warp leaves together
    const floatX* x = inp + (size_t)row * C;
    float sum = 0.0f;
    for (int c = lane * x128::size; c < C; c += 32 * x128::size) {
        x128 packed = load128(x + c);
        for (int k = 0; k < x128::size; k++) { sum += (float)packed[k]; }
    }
    sum = warp_reduce_sum(sum);
    layernorm_row_normalize(out + (size_t)row * C, mean, rstd, x, weight, bias, row, C, sum, lane);
}

__global__ void fused_residual_layernorm_forward_kernel(floatX* residual_out, floatX* normed_out, float* mean,
                                                        float* rstd, const floatX* inp1, const floatX* inp2,
                                                        const floatX* weight, const floatX* bias, int BT, int C) {
    const int lane = threadIdx.x % 32;
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= BT) { return; }
    const size_t offset = (size_t)row * C;
    float sum = 0.0f;
    for (int c = lane * x128::size; c < C; c += 32 * x128::size) {
        x128 a = load128cs(inp1 + offset + c);
        x128 b = load128cs(inp2 + offset + c);
        x128 r;
        for (int k = 0; k < x128::size; k++) {
            r[k] = (floatX)((float)a[k] + (float)b[k]);
            sum += (float)r[k];  // statistics of the rounded residual, which the backward sees
        }
        store128(residual_out + offset + c, r);
    }
    sum = warp_reduce_sum(sum);
    // each lane re-reads only the columns it wrote itself, so no barrier is needed
    layernorm_row_normalize(normed_out + offset, mean, rstd, residual_out + offset, weight, bias, row, C, sum, lane);
}

// out = LN(inp) from the saved per-row statistics: one warp per row, as the forward
__global__ void layernorm_recompute_kernel(floatX* out, const floatX* inp, const floatX* weight, const floatX* bias,
                                           const float* mean, const float* rstd, int BT, int C) {
    const int lane = threadIdx.x % 32;
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= BT) { return; }
    const size_t offset = (size_t)row * C;
    layernorm_row_apply(out + offset, inp + offset, weight, bias, mean[row], rstd[row], C, lane);
}

// Shared-memory column sums use a bank-conflict-free order: the columns of one 32-lane x
// 16-byte chunk (32 * x128::size columns) are stored element-major, index k * 32 + lane for
// column lane * x128::size + k, so for each k the 32 lanes touch 32 consecutive words.
// Each of the two arrays per warp is padded to a whole number of chunks.
__host__ __device__ inline int layernorm_padded_columns(int C) { return ceil_div(C, 32 * x128::size) * 32 * x128::size; }

// one 16-byte chunk of a row, pass 1: the row sums that the input gradient needs, and this warp's
// column sums of the parameter gradients (shared memory, index smem_base + k * 32)
__device__ inline void layernorm_bwd_accumulate(float& dnorm_sum, float& dnorm_xhat_sum, float* dweight_acc,
                                                float* dbias_acc, int smem_base, x128 dy, x128 x, x128 w,
                                                float row_mean, float row_rstd) {
    for (int k = 0; k < x128::size; k++) {
        float xhat = ((float)x[k] - row_mean) * row_rstd;
        float dnorm = (float)w[k] * (float)dy[k];
        dnorm_sum += dnorm;
        dnorm_xhat_sum += dnorm * xhat;
        dweight_acc[smem_base + k * 32] += (float)dy[k] * xhat;
        dbias_acc[smem_base + k * 32] += (float)dy[k];
    }
}

// the same chunk, pass 2: old dinp + (dnorm - mean(dnorm) - xhat * mean(dnorm * xhat)) * rstd
__device__ inline x128 layernorm_bwd_dinp(x128 dy, x128 x, x128 w, x128 old, float row_mean, float row_rstd,
                                          float dnorm_mean, float dnorm_xhat_mean) {
    x128 result;
    for (int k = 0; k < x128::size; k++) {
        float xhat = ((float)x[k] - row_mean) * row_rstd;
        float dnorm = (float)w[k] * (float)dy[k];
        float dx = (dnorm - dnorm_mean - xhat * dnorm_xhat_mean) * row_rstd;
        result[k] = (floatX)((float)old[k] + dx);
    }
    return result;
}

// scratch layout: [gridDim.x][2][C] floats (dweight partials then dbias partials per block).
// CACHED_CHUNKS > 0 (rows of at most that many 32-lane chunks): a lane loads its chunks of dout,
// inp and the old dinp at once at the start of a row and keeps them, and the weight, in registers
// for both passes; 0: any C, pass 2 reads the row again. The same arithmetic in the same order:
// the same bits (dev/cuda/test_layernorm.cu compares the two).
template <int CACHED_CHUNKS>
__global__ void layernorm_backward_kernel(floatX* dinp, float* partials, const floatX* dout, const floatX* inp,
                                          const floatX* weight, const float* mean, const float* rstd, int BT, int C) {
    extern __shared__ float warp_column_sums[];  // [num_warps][2][C_padded]
    const int lane = threadIdx.x % 32;
    const int warp = threadIdx.x / 32;
    const int num_warps = blockDim.x / 32;
    const int C_padded = layernorm_padded_columns(C);
    const int chunk = 32 * x128::size;
    float* dweight_acc = warp_column_sums + (size_t)warp * 2 * C_padded;
    float* dbias_acc = dweight_acc + C_padded;
    for (int i = lane; i < 2 * C_padded; i += 32) { dweight_acc[i] = 0.0f; }
    __syncwarp();

    constexpr int SLOTS = CACHED_CHUNKS > 0 ? CACHED_CHUNKS : 1;
    x128 w_reg[SLOTS];
    if constexpr (CACHED_CHUNKS > 0) {
#pragma unroll
        for (int i = 0; i < CACHED_CHUNKS; i++) {
            const int c = i * chunk + lane * x128::size;
            if (c < C) { w_reg[i] = load128(weight + c); }
        }
    }
    const int row_start = blockIdx.x * LAYERNORM_BWD_ROWS_PER_BLOCK;
    const int row_end = min(row_start + LAYERNORM_BWD_ROWS_PER_BLOCK, BT);
    for (int row = row_start + warp; row < row_end; row += num_warps) {
        const size_t offset = (size_t)row * C;
        const float row_mean = mean[row];
        const float row_rstd = rstd[row];
        float dnorm_sum = 0.0f, dnorm_xhat_sum = 0.0f;
        x128 dy_reg[SLOTS], x_reg[SLOTS], old_reg[SLOTS];
        if constexpr (CACHED_CHUNKS > 0) {
#pragma unroll
            for (int i = 0; i < CACHED_CHUNKS; i++) {
                const int c = i * chunk + lane * x128::size;
                if (c < C) {
                    dy_reg[i] = load128cs(dout + offset + c);
                    x_reg[i] = load128cs(inp + offset + c);
                    old_reg[i] = load128cs(dinp + offset + c);
                }
            }
#pragma unroll
            for (int i = 0; i < CACHED_CHUNKS; i++) {
                const int c = i * chunk + lane * x128::size;
                if (c < C) {
                    layernorm_bwd_accumulate(dnorm_sum, dnorm_xhat_sum, dweight_acc, dbias_acc, i * chunk + lane,
                                             dy_reg[i], x_reg[i], w_reg[i], row_mean, row_rstd);
                }
            }
        } else {
            for (int c = lane * x128::size; c < C; c += chunk) {
                layernorm_bwd_accumulate(dnorm_sum, dnorm_xhat_sum, dweight_acc, dbias_acc, (c / chunk) * chunk + lane,
                                         load128(dout + offset + c), load128(inp + offset + c), load128(weight + c),
                                         row_mean, row_rstd);
            }
        }
        const float dnorm_mean = warp_reduce_sum(dnorm_sum) / (float)C;
        const float dnorm_xhat_mean = warp_reduce_sum(dnorm_xhat_sum) / (float)C;
        if constexpr (CACHED_CHUNKS > 0) {
#pragma unroll
            for (int i = 0; i < CACHED_CHUNKS; i++) {
                const int c = i * chunk + lane * x128::size;
                if (c < C) {
                    store128(dinp + offset + c, layernorm_bwd_dinp(dy_reg[i], x_reg[i], w_reg[i], old_reg[i], row_mean,
                                                                   row_rstd, dnorm_mean, dnorm_xhat_mean));
                }
            }
        } else {
            for (int c = lane * x128::size; c < C; c += chunk) {
                store128(dinp + offset + c,
                         layernorm_bwd_dinp(load128cs(dout + offset + c), load128cs(inp + offset + c),
                                            load128(weight + c), load128cs(dinp + offset + c), row_mean, row_rstd,
                                            dnorm_mean, dnorm_xhat_mean));
            }
        }
    }
    __syncthreads();
    // fixed-order sum over the warps of this block, written in natural column order
    float* block_partial = partials + (size_t)blockIdx.x * 2 * C;
    for (int i = threadIdx.x; i < 2 * C_padded; i += blockDim.x) {
        const int which = i / C_padded;  // 0: dweight, 1: dbias
        const int index = i % C_padded;
        const int within = index % chunk;
        const int column = (index / chunk) * chunk + (within % 32) * x128::size + within / 32;
        if (column >= C) { continue; }
        float sum = 0.0f;
        for (int w = 0; w < num_warps; w++) { sum += warp_column_sums[(size_t)w * 2 * C_padded + i]; }
        block_partial[(size_t)which * C + column] = sum;
    }
}

// ----------------------------------------------------------------------------
// launchers

static inline void layernorm_check_args(const char* who, int C, const void* p1, const void* p2, const void* p3,
                                        const void* p4) {
    if (C % x128::size != 0) {
        fprintf(stderr, "%s: C (%d) must be a multiple of %d\n", who, C, x128::size);
        exit(EXIT_FAILURE);
    }
    if (!is_aligned16(p1) || !is_aligned16(p2) || !is_aligned16(p3) || !is_aligned16(p4)) {
        fprintf(stderr, "%s: floatX buffers must be 16-byte aligned\n", who);
        exit(EXIT_FAILURE);
    }
}

static inline void layernorm_forward(floatX* out, float* mean, float* rstd, const floatX* inp, const floatX* weight,
                                     const floatX* bias, int BT, int C, cudaStream_t stream) {
    layernorm_check_args("layernorm_forward", C, out, inp, weight, bias);
    if (BT == 0) { return; }
    const int block_size = 32 * LAYERNORM_FWD_WARPS;
    layernorm_forward_kernel<<<ceil_div(BT, LAYERNORM_FWD_WARPS), block_size, 0, stream>>>(out, mean, rstd, inp, weight,
                                                                                           bias, BT, C);
    cudaCheckLast();
}

static inline void layernorm_recompute(floatX* out, const floatX* inp, const floatX* weight, const floatX* bias,
                                       const float* mean, const float* rstd, int BT, int C, cudaStream_t stream) {
    layernorm_check_args("layernorm_recompute", C, out, inp, weight, bias);
    if (BT == 0) { return; }
    const int block_size = 32 * LAYERNORM_FWD_WARPS;
    layernorm_recompute_kernel<<<ceil_div(BT, LAYERNORM_FWD_WARPS), block_size, 0, stream>>>(out, inp, weight, bias,
                                                                                             mean, rstd, BT, C);
    cudaCheckLast();
}

static inline void fused_residual_layernorm_forward(floatX* residual_out, floatX* normed_out, float* mean, float* rstd,
                                                    const floatX* inp1, const floatX* inp2, const floatX* weight,
                                                    const floatX* bias, int BT, int C, cudaStream_t stream) {
    layernorm_check_args("fused_residual_layernorm_forward", C, residual_out, normed_out, inp1, inp2);
    layernorm_check_args("fused_residual_layernorm_forward", C, weight, bias, weight, bias);
    if (BT == 0) { return; }
    const int block_size = 32 * LAYERNORM_FWD_WARPS;
    fused_residual_layernorm_forward_kernel<<<ceil_div(BT, LAYERNORM_FWD_WARPS), block_size, 0, stream>>>(
        residual_out, normed_out, mean, rstd, inp1, inp2, weight, bias, BT, C);
    cudaCheckLast();
}

static inline size_t layernorm_backward_scratch_bytes(int BT, int C) {
    return (size_t)ceil_div(BT, LAYERNORM_BWD_ROWS_PER_BLOCK) * 2 * C * sizeof(float);
}

// 1: layernorm_backward keeps rows of up to LAYERNORM_BWD_MAX_CACHED_CHUNKS chunks in registers;
// 0: always the kernel that reads a row twice (the same bits; for the kernel test)
static int layernorm_backward_cached = 1;
#define LAYERNORM_BWD_MAX_CACHED_CHUNKS 4

template <int CACHED_CHUNKS>
static void layernorm_backward_launch(floatX* dinp, float* scratch, const floatX* dout, const floatX* inp,
                                      const floatX* weight, const float* mean, const float* rstd, int BT, int C,
                                      size_t shared_bytes, cudaStream_t stream) {
    if (shared_bytes > 48 * 1024) {
        cudaCheck(cudaFuncSetAttribute(layernorm_backward_kernel<CACHED_CHUNKS>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, (int)shared_bytes));
    }
    const int num_blocks = ceil_div(BT, LAYERNORM_BWD_ROWS_PER_BLOCK);
    layernorm_backward_kernel<CACHED_CHUNKS><<<num_blocks, 32 * LAYERNORM_BWD_WARPS, shared_bytes, stream>>>(
        dinp, scratch, dout, inp, weight, mean, rstd, BT, C);
    cudaCheckLast();
}

// dinp += dx; dweight += sum dout*xhat; dbias += sum dout.
// scratch: layernorm_backward_scratch_bytes(BT, C) bytes of device memory.
static inline void layernorm_backward(floatX* dinp, floatX* dweight, floatX* dbias, const floatX* dout,
                                      const floatX* inp, const floatX* weight, const float* mean, const float* rstd,
                                      int BT, int C, float* scratch, cudaStream_t stream) {
    layernorm_check_args("layernorm_backward", C, dinp, dout, inp, weight);
    if (BT == 0) { return; }
    const size_t shared_bytes = (size_t)LAYERNORM_BWD_WARPS * 2 * layernorm_padded_columns(C) * sizeof(float);
    if (shared_bytes > 48 * 1024) {
        int dev = 0, max_optin = 0;
        cudaCheck(cudaGetDevice(&dev));
        cudaCheck(cudaDeviceGetAttribute(&max_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
        if (shared_bytes > (size_t)max_optin) {
            fprintf(stderr, "layernorm_backward: C = %d needs %zu bytes of shared memory, the device allows %d\n", C,
                    shared_bytes, max_optin);
            exit(EXIT_FAILURE);
        }
    }
    const int chunks = layernorm_backward_cached ? ceil_div(C, 32 * x128::size) : 0;
    switch (chunks <= LAYERNORM_BWD_MAX_CACHED_CHUNKS ? chunks : 0) {
        case 1: layernorm_backward_launch<1>(dinp, scratch, dout, inp, weight, mean, rstd, BT, C, shared_bytes, stream); break;
        case 2: layernorm_backward_launch<2>(dinp, scratch, dout, inp, weight, mean, rstd, BT, C, shared_bytes, stream); break;
        case 3: layernorm_backward_launch<3>(dinp, scratch, dout, inp, weight, mean, rstd, BT, C, shared_bytes, stream); break;
        case 4: layernorm_backward_launch<4>(dinp, scratch, dout, inp, weight, mean, rstd, BT, C, shared_bytes, stream); break;
        default: layernorm_backward_launch<0>(dinp, scratch, dout, inp, weight, mean, rstd, BT, C, shared_bytes, stream);
    }
    // partials are [num_blocks][2C]: columns [0, C) -> dweight, [C, 2C) -> dbias
    const int num_blocks = ceil_div(BT, LAYERNORM_BWD_ROWS_PER_BLOCK);
    column_sum_partials(dweight, dbias, C, scratch, num_blocks, 2 * C, (size_t)2 * C, stream);
}

#endif  // OMNIMOE_LAYERNORM_CUH
