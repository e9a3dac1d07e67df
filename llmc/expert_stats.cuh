/*
expert_stats.cuh - expert load counts and their statistics on the GPU, for any routed layer
(OmniMoE; moe layers add their counts here too, but the trainer takes their statistics on the
host, over each layer's FFN experts: model_expert_stats in train_omnimoe.cu).

Defines:
- expert_counts_reset(counts, L, N, stream): counts (L, N) int32 = 0
- expert_counts_add(total, counts, N, stream): total[e] += counts[e], e < N (one layer's counts
  of one micro-batch onto the counts since the last reset)
- expert_stats(out, counts, L, N, stream): out (2L) fp32: usage[0..L) then kl[0..L) of each
  layer's counts (L, N); add_expert_counts_kernel / expert_stats_kernel are the kernels
- EXPERT_STATS_THREADS: the block size of expert_stats_kernel (one block per layer)

usage[l] = share of the N experts with at least one pair, kl[l] = KL divergence of the load
distribution from uniform: sum_e p_e log(p_e N), p_e = counts[e] / total (0 when total = 0).
This is what expert_load_stats (logger.h) computes on the host, in double, each sum in a fixed
order (per-thread strides, then a tree): the step does not wait for a copy of the L x N counts
and a host loop over them. Integers are exact and the double sums have a fixed order, so the
results are deterministic.
*/
#ifndef OMNIMOE_EXPERT_STATS_CUH
#define OMNIMOE_EXPERT_STATS_CUH

#include "cuda_utils.cuh"

#define EXPERT_STATS_THREADS 512

// total[e] += counts[e]: per-step expert loads summed over micro-batches (integers: exact)
__global__ void add_expert_counts_kernel(int* total, const int* counts, int N) {
    int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e < N) total[e] += counts[e];
}

// One block per layer. out: usage[0..L), then kl[0..L).
__global__ void expert_stats_kernel(float* out, const int* counts, int N) {
    __shared__ long long red_total[EXPERT_STATS_THREADS];
    __shared__ int red_used[EXPERT_STATS_THREADS];
    __shared__ double red_sum[EXPERT_STATS_THREADS];
    const int tid = threadIdx.x, L = gridDim.x, l = blockIdx.x;
    const int* c = counts + (size_t)l * N;
    long long total = 0;
    int used = 0;
    for (int e = tid; e < N; e += EXPERT_STATS_THREADS) {
        total += c[e];
        used += c[e] > 0;
    }
    red_total[tid] = total;
    red_used[tid] = used;
    __syncthreads();
    for (int stride = EXPERT_STATS_THREADS / 2; stride > 0; stride /= 2) {
        if (tid < stride) {
            red_total[tid] += red_total[tid + stride];
            red_used[tid] += red_used[tid + stride];
        }
        __syncthreads();
    }
    total = red_total[0];
    double sum = 0.0;
    if (total > 0) {
        for (int e = tid; e < N; e += EXPERT_STATS_THREADS) {
            if (c[e] <= 0) continue;
            double p = (double)c[e] / (double)total;
            sum += p * log(p * (double)N);
        }
    }
    red_sum[tid] = sum;
    __syncthreads();
    for (int stride = EXPERT_STATS_THREADS / 2; stride > 0; stride /= 2) {
        if (tid < stride) red_sum[tid] += red_sum[tid + stride];
        __syncthreads();
    }
    if (tid == 0) {
        out[l] = (float)red_used[0] / (float)N;
        out[L + l] = (float)red_sum[0];
    }
}

static inline void expert_counts_reset(int* counts, int L, int N, cudaStream_t stream) {
    cudaCheck(cudaMemsetAsync(counts, 0, (size_t)L * N * sizeof(int), stream));
}

static inline void expert_counts_add(int* total, const int* counts, int N, cudaStream_t stream) {
    add_expert_counts_kernel<<<ceil_div(N, 256), 256, 0, stream>>>(total, counts, N);
    cudaCheckLast();
}

static inline void expert_stats(float* out, const int* counts, int L, int N, cudaStream_t stream) {
    expert_stats_kernel<<<L, EXPERT_STATS_THREADS, 0, stream>>>(out, counts, N);
    cudaCheckLast();
}

#endif  // OMNIMOE_EXPERT_STATS_CUH
