/*
global_norm.cuh - squared L2 norm of a gradient buffer, deterministic, result on the device.

Defines:
- global_norm_squared(out, grads, n, scratch, stream)
      out[0] (fp32, device) = sum_i grads[i]^2 over i in [0, n)
- global_norm_scratch_bytes(): bytes of scratch the call needs

Two stages with a fixed shape: stage 1 launches min(GLOBAL_NORM_MAX_BLOCKS, needed) blocks,
a number that depends only on n; each thread sums a fixed strided set of 16-byte vectors and
each block writes one partial. Stage 2 is one block that sums the partials in a fixed order.
No host sync: the caller copies out[0] when it wants it (e.g. for clipping it can instead
compute the scale on the device).
*/
#ifndef OMNIMOE_GLOBAL_NORM_CUH
#define OMNIMOE_GLOBAL_NORM_CUH

#include "cuda_utils.cuh"

#define GLOBAL_NORM_MAX_BLOCKS 1024
#define GLOBAL_NORM_BLOCK_SIZE 512

__global__ void global_norm_partial_kernel(float* partials, const floatX* grads, size_t n) {
    const size_t num_vectors = n / x128::size;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    float sum = 0.0f;
    for (size_t v = (size_t)blockIdx.x * blockDim.x + threadIdx.x; v < num_vectors; v += stride) {
        x128 packed = load128cs(grads + v * x128::size);
        for (int k = 0; k < x128::size; k++) {
            float g = (float)packed[k];
            sum += g * g;
        }
    }
    // the tail that does not fill a vector goes to the first threads of block 0
    const size_t tail_start = num_vectors * x128::size;
    if (blockIdx.x == 0 && tail_start + threadIdx.x < n) {
        float g = (float)grads[tail_start + threadIdx.x];
        sum += g * g;
    }
    sum = block_reduce_sum(sum);
    if (threadIdx.x == 0) { partials[blockIdx.x] = sum; }
}

__global__ void global_norm_final_kernel(float* out, const float* partials, int num_partials) {
    float sum = 0.0f;
    for (int i = threadIdx.x; i < num_partials; i += blockDim.x) { sum += partials[i]; }
    sum = block_reduce_sum(sum);
    if (threadIdx.x == 0) { out[0] = sum; }
}

static inline size_t global_norm_scratch_bytes(void) { return GLOBAL_NORM_MAX_BLOCKS * sizeof(float); }

static inline void global_norm_squared(float* out, const floatX* grads, size_t n, float* scratch, cudaStream_t stream) {
    if (!is_aligned16(grads)) {
        fprintf(stderr, "global_norm_squared: grads must be 16-byte aligned\n");
        exit(EXIT_FAILURE);
    }
    size_t num_vectors = n / x128::size;
    size_t needed = ceil_div_sz(num_vectors, GLOBAL_NORM_BLOCK_SIZE);
    int num_blocks = (int)(needed < GLOBAL_NORM_MAX_BLOCKS ? needed : GLOBAL_NORM_MAX_BLOCKS);
    if (num_blocks < 1) { num_blocks = 1; }
    global_norm_partial_kernel<<<num_blocks, GLOBAL_NORM_BLOCK_SIZE, 0, stream>>>(scratch, grads, n);
    cudaCheckLast();
    global_norm_final_kernel<<<1, 1024, 0, stream>>>(out, scratch, num_blocks);
    cudaCheckLast();
}

#endif  // OMNIMOE_GLOBAL_NORM_CUH
