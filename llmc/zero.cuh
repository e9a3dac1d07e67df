/*
zero.cuh - ZeRO-1 on several GPUs (docs/sharding.md §2): each rank keeps the fp32 master weights
and AdamW m and v of its shard only (llmc/zero_shard.h: its chunks of every bucket slice, then the
replicated tails, packed), updates them from the reduce-scattered gradients and all-gathers the
floatX weights. The reduce-scatter itself is GradReducer's (llmc/multi_gpu.cuh, a slice added
with its chunk).

Defines:
- ZeroOptimizer                 the rank's map, its norm-range and update tables on the device, scratch
- zero_init() / zero_free()     needs P >= 2 ranks; refuses slices that are not 8-aligned
- zero_norm_partial()           this rank's partial (device double), no communication
- zero_grad_norm_squared()      the global sum of squares of the mean gradients, in double:
                                rank partials over their norm ranges (chunks; tails on rank 0
                                only), all-gathered, added in rank order 0..P-1 on every rank
- zero_adamw()                  AdamW on every range of the shard (weight decay per tensor): one
                                launch over the update table (llmc/zero_shard.h)
- zero_allgather_params()       every rank's updated chunks of the floatX weights to every rank,
                                one NCCL group per bucket, buckets in forward order
- zero_upload_packed()          host full fp32 (flat layout) -> the rank's packed device buffer
- zero_gather_to_host()         every rank's packed device buffer -> a full host copy (collective;
                                host_full may be NULL on ranks that do not need it)
- zero_scatter_from_host()      rank 0's full host buffer -> every rank's packed device buffer

Determinism: the norm partial is a fixed-shape reduction (ZERO_NORM_BLOCKS blocks, each thread a
fixed strided set of 16-byte vectors of each range, in range order, in double; a fixed tree per
block; the block partials added in order by one thread); the P partials are exchanged by
all-gather (no reduction inside NCCL) and summed in rank order on the host, so every rank gets the
same bits whatever NCCL's algorithm. It is not bitwise equal to the replicated path's fp32 norm
(global_norm.cuh); test_zero_ranks.c shows the double sums agree within 1e-12 on the CPU.
AdamW per element is adamw_update's (adamw_quad, the same bias corrections), so a shard gets the
bits the replicated update would give the same element from the same reduced gradient and norm.
The gathers copy bytes.

Tests: test_zero_ranks.c simulates the whole step with P ranks on the CPU model; test_omnimoe.cu
(test_zero_update) runs this file's norm partials and shard AdamW for P simulated ranks on one
GPU against the replicated update. The NCCL calls (reduce-scatter, all-gathers) need several GPUs.
*/
#ifndef OMNIMOE_ZERO_CUH
#define OMNIMOE_ZERO_CUH

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "cuda_utils.cuh"
#include "adamw.cuh"
#include "multi_gpu.cuh"
#include "zero_shard.h"

#define ZERO_NORM_BLOCKS 256
#define ZERO_NORM_THREADS 512
#define ZERO_ADAMW_THREADS 512                            // one quad (4 elements) per thread
#define ZERO_ADAMW_BLOCK_ELEMS (4 * ZERO_ADAMW_THREADS)   // elements per block of the update
#define ZERO_STAGING_ELEMS ((size_t)1 << 24)   // per rank and piece in the gathers (64 MiB fp32)

typedef struct {
    const MultiGpu* mg;
    ZeroShardMap map;          // host: this rank's ranges
    size_t* norm_offsets;      // (num_norm) device: flat offsets of the norm ranges
    size_t* norm_counts;       // (num_norm) device
    int num_norm;
    double* partials;          // (ZERO_NORM_BLOCKS + 1 + P) device: block partials, rank partial, gathered
    double* host_partials;     // (P) host: the gathered rank partials, read back each step
    int* slice_chunk_range;    // (num_slices) host: the index in map.ranges of the slice's chunk, -1: none
    int* slice_tail_range;     // (num_slices) host: ... of its tail, -1: none
    ZeroUpdateRange* update_table;  // (map.num_ranges) device: the AdamW launch's ranges
    int update_blocks;              // blocks of that launch
} ZeroOptimizer;

static inline void zero_init(ZeroOptimizer* z, const ModelConfig* c, const MultiGpu* mg) {
    memset(z, 0, sizeof(*z));
    if (mg->num_processes < 2) {
        fprintf(stderr, "zero_init: ZeRO-1 needs >= 2 processes (got %d)\n", mg->num_processes);
        exit(EXIT_FAILURE);
    }
    z->mg = mg;
    zero_shard_map(&z->map, c, mg->num_processes, mg->process_rank);
    const ZeroShardMap* m = &z->map;
    for (int i = 0; i < m->num_ranges; i++) {
        const ZeroRange* rg = &m->ranges[i];
        if (rg->offset % 8 != 0 || rg->count % 8 != 0 || rg->shard_offset % 8 != 0) {
            fprintf(stderr, "Error: --zero 1: the shard range of %s at element %zu (+%zu) is not a multiple of 8 "
                    "elements; ZeRO-1 needs C, the FFN width and Vp to be multiples of 8\n",
                    param_tensor_name(rg->tensor), rg->offset, rg->count);
            exit(EXIT_FAILURE);
        }
    }
    z->num_norm = zero_shard_norm_ranges(m);
    size_t* offsets = (size_t*)malloc_check((z->num_norm + 1) * sizeof(size_t));
    size_t* counts = (size_t*)malloc_check((z->num_norm + 1) * sizeof(size_t));
    for (int i = 0; i < z->num_norm; i++) {
        offsets[i] = m->ranges[i].offset;
        counts[i] = m->ranges[i].count;
    }
    z->norm_offsets = (size_t*)cuda_malloc_or_die((z->num_norm + 1) * sizeof(size_t), "ZeRO norm ranges");
    z->norm_counts = (size_t*)cuda_malloc_or_die((z->num_norm + 1) * sizeof(size_t), "ZeRO norm ranges");
    cudaCheck(cudaMemcpy(z->norm_offsets, offsets, z->num_norm * sizeof(size_t), cudaMemcpyHostToDevice));
    cudaCheck(cudaMemcpy(z->norm_counts, counts, z->num_norm * sizeof(size_t), cudaMemcpyHostToDevice));
    free(offsets);
    free(counts);
    z->partials = (double*)cuda_malloc_or_die((ZERO_NORM_BLOCKS + 1 + mg->num_processes) * sizeof(double),
                                              "ZeRO norm partials");
    z->host_partials = (double*)malloc_check(mg->num_processes * sizeof(double));
    z->slice_chunk_range = (int*)malloc_check(m->num_slices * sizeof(int));
    z->slice_tail_range = (int*)malloc_check(m->num_slices * sizeof(int));
    for (int s = 0; s < m->num_slices; s++) z->slice_chunk_range[s] = z->slice_tail_range[s] = -1;
    for (int i = 0; i < m->num_ranges; i++) {
        if (m->ranges[i].is_tail) z->slice_tail_range[m->ranges[i].slice] = i;
        else z->slice_chunk_range[m->ranges[i].slice] = i;
    }
    ZeroUpdateRange* table = (ZeroUpdateRange*)malloc_check((m->num_ranges + 1) * sizeof(ZeroUpdateRange));
    z->update_blocks = zero_shard_update_table(m, ZERO_ADAMW_BLOCK_ELEMS, table);
    z->update_table = (ZeroUpdateRange*)cuda_malloc_or_die((m->num_ranges + 1) * sizeof(ZeroUpdateRange),
                                                           "ZeRO update table");
    cudaCheck(cudaMemcpy(z->update_table, table, m->num_ranges * sizeof(ZeroUpdateRange), cudaMemcpyHostToDevice));
    free(table);
}

static inline void zero_free(ZeroOptimizer* z) {
    cudaCheck(cudaFree(z->norm_offsets));
    cudaCheck(cudaFree(z->norm_counts));
    cudaCheck(cudaFree(z->partials));
    cudaCheck(cudaFree(z->update_table));
    free(z->host_partials);
    free(z->slice_chunk_range);
    free(z->slice_tail_range);
    zero_shard_map_free(&z->map);
    memset(z, 0, sizeof(*z));
}

// ----------------------------------------------------------------------------
// the gradient norm

__global__ void zero_norm_partial_kernel(double* partials, const floatX* grads, const size_t* offsets,
                                         const size_t* counts, int num_ranges) {
    __shared__ double shared[ZERO_NORM_THREADS];
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    double sum = 0.0;
    for (int i = 0; i < num_ranges; i++) {
        const floatX* g = grads + offsets[i];
        const size_t num_vectors = counts[i] / x128::size;  // counts are multiples of 8 (zero_init)
        for (size_t v = (size_t)blockIdx.x * blockDim.x + threadIdx.x; v < num_vectors; v += stride) {
            x128 packed = load128cs(g + v * x128::size);
            for (int k = 0; k < x128::size; k++) {
                double x = (double)(float)packed[k];
                sum += x * x;
            }
        }
    }
    shared[threadIdx.x] = sum;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {  // a fixed tree
        if (threadIdx.x < s) shared[threadIdx.x] += shared[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) partials[blockIdx.x] = shared[0];
}

__global__ void zero_norm_final_kernel(double* out, const double* partials, int num_partials) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    double sum = 0.0;
    for (int i = 0; i < num_partials; i++) sum += partials[i];  // in order, one thread
    out[0] = sum;
}

// This rank's partial sum of squares over its norm ranges; returns the device pointer of the double.
static inline double* zero_norm_partial(ZeroOptimizer* z, const floatX* grads, cudaStream_t stream) {
    double* rank_partial = z->partials + ZERO_NORM_BLOCKS;
    zero_norm_partial_kernel<<<ZERO_NORM_BLOCKS, ZERO_NORM_THREADS, 0, stream>>>(z->partials, grads, z->norm_offsets,
                                                                               z->norm_counts, z->num_norm);
    cudaCheckLast();
    zero_norm_final_kernel<<<1, 32, 0, stream>>>(rank_partial, z->partials, ZERO_NORM_BLOCKS);
    cudaCheckLast();
    return rank_partial;
}

// Returns the sum of squares over all ranks (every rank gets the same bits). Waits for the GPU.
static inline double zero_grad_norm_squared(ZeroOptimizer* z, const floatX* grads, cudaStream_t stream) {
    const int P = z->mg->num_processes;
    double* rank_partial = zero_norm_partial(z, grads, stream);
    double* gathered = rank_partial + 1;
#ifdef MULTI_GPU
    ncclCheck(ncclAllGather(rank_partial, gathered, 1, ncclFloat64, z->mg->comm, stream));
#else
    multi_gpu_fail_("%s", "ZeRO-1: this build has no NCCL");
#endif
    double* values = z->host_partials;  // allocated once (zero_init): no host allocation in the step
    cudaCheck(cudaMemcpyAsync(values, gathered, P * sizeof(double), cudaMemcpyDeviceToHost, stream));
    cudaCheck(cudaStreamSynchronize(stream));
    double sum = 0.0;
    for (int r = 0; r < P; r++) sum += values[r];  // rank order, on every rank
    return sum;
}

// ----------------------------------------------------------------------------
// the update and the weight all-gather

// One block per ZERO_ADAMW_BLOCK_ELEMS elements of one range (the update table, zero_init): the
// block finds its row by binary search on first_block (zero_update_row_of, the same row for every
// thread; test_zero_shard.c runs it for every block of the launch), then each thread updates one
// quad of the range with adamw_quad, the replicated vectorised kernel's body.
// Every range is 8-aligned (zero_init), so quads never straddle a range and the loads are aligned.
__global__ void zero_adamw_kernel(floatX* params, float* master, const floatX* grads, float* m, float* v,
                                  const ZeroUpdateRange* table, int num_ranges, float lr, float beta1, float beta2,
                                  float eps, float weight_decay, float grad_scale, float bias_correction1,
                                  float bias_correction2) {
    const ZeroUpdateRange row = table[zero_update_row_of(table, num_ranges, (int)blockIdx.x)];
    size_t q = (size_t)((int)blockIdx.x - row.first_block) * blockDim.x + threadIdx.x;
    if (q >= row.count / 4) { return; }
    float wd = row.decay ? weight_decay : 0.0f;
    adamw_quad(params + row.offset, master + row.shard_offset, grads + row.offset, m + row.shard_offset,
               v + row.shard_offset, q, lr, beta1, beta2, eps, wd, grad_scale, bias_correction1, bias_correction2);
}

// master, m, v: the rank's packed buffers; params, grads: full floatX buffers (flat layout).
// One launch for the whole shard.
static inline void zero_adamw(const ZeroOptimizer* z, floatX* params, float* master, const floatX* grads, float* m,
                              float* v, float lr, float beta1, float beta2, float eps, float weight_decay,
                              float grad_scale, int t, cudaStream_t stream) {
    const float bias_correction1 = adamw_bias_correction(beta1, t);
    const float bias_correction2 = adamw_bias_correction(beta2, t);
    if (z->update_blocks == 0) { return; }
    zero_adamw_kernel<<<z->update_blocks, ZERO_ADAMW_THREADS, 0, stream>>>(
        params, master, grads, m, v, z->update_table, z->map.num_ranges, lr, beta1, beta2, eps, weight_decay,
        grad_scale, bias_correction1, bias_correction2);
    cudaCheckLast();
}

// In place: slice [r*q, (r+1)*q) of rank r -> every rank. The tails are equal on every rank already.
static inline void zero_allgather_params(const ZeroOptimizer* z, floatX* params, cudaStream_t stream) {
    const ZeroShardMap* map = &z->map;
    const int num_buckets = map->slices[map->num_slices - 1].bucket + 1;
#ifdef MULTI_GPU
    for (int b = num_buckets - 1; b >= 0; b--) {  // forward order: embeddings, layer 0, layer 1, ...
        ncclCheck(ncclGroupStart());
        for (int s = 0; s < map->num_slices; s++) {
            const GradSlice* sl = &map->slices[s];
            size_t q = map->chunk[s];
            if (sl->bucket != b || q == 0) continue;
            floatX* slice = params + sl->offset;
            ncclCheck(ncclAllGather(slice + (size_t)map->rank * q, slice, q, NCCL_FLOATX, z->mg->comm, stream));
        }
        ncclCheck(ncclGroupEnd());
    }
#else
    (void)params; (void)stream; (void)num_buckets;
    multi_gpu_fail_("%s", "ZeRO-1: this build has no NCCL");
#endif
}

// ----------------------------------------------------------------------------
// moving the logical state (flat layout) in and out of the shards

static inline void zero_upload_packed(const ZeroOptimizer* z, const float* host_full, float* packed_device) {
    float* packed = (float*)malloc_check((z->map.shard_elems > 0 ? z->map.shard_elems : 1) * sizeof(float));
    zero_shard_pack(&z->map, host_full, packed);
    cudaCheck(cudaMemcpy(packed_device, packed, z->map.shard_elems * sizeof(float), cudaMemcpyHostToDevice));
    free(packed);
}

// Collective: every rank calls it. host_full (num_params floats) receives every chunk and the tails
// where it is not NULL. Each chunk travels in pieces of at most ZERO_STAGING_ELEMS per rank.
static inline void zero_gather_to_host(const ZeroOptimizer* z, const float* packed_device, float* host_full,
                                       cudaStream_t stream) {
#ifndef MULTI_GPU
    (void)z; (void)packed_device; (void)host_full; (void)stream;
    multi_gpu_fail_("%s", "ZeRO-1: this build has no NCCL");  // unreachable: one process has no shards
#else
    const ZeroShardMap* map = &z->map;
    const int P = map->num_ranks;
    float* staging = (float*)cuda_malloc_or_die((size_t)P * ZERO_STAGING_ELEMS * sizeof(float), "ZeRO gather staging");
    for (int s = 0; s < map->num_slices; s++) {
        const GradSlice* sl = &map->slices[s];
        size_t q = map->chunk[s];
        if (z->slice_tail_range[s] >= 0 && host_full != NULL) {
            const ZeroRange* tail = &map->ranges[z->slice_tail_range[s]];
            cudaCheck(cudaMemcpyAsync(host_full + tail->offset, packed_device + tail->shard_offset,
                                      tail->count * sizeof(float), cudaMemcpyDeviceToHost, stream));
        }
        if (q == 0) continue;
        size_t own = map->ranges[z->slice_chunk_range[s]].shard_offset;  // this rank's chunk, packed
        for (size_t start = 0; start < q; start += ZERO_STAGING_ELEMS) {
            size_t len = q - start < ZERO_STAGING_ELEMS ? q - start : ZERO_STAGING_ELEMS;
            ncclCheck(ncclAllGather(packed_device + own + start, staging, len, ncclFloat, z->mg->comm, stream));
            if (host_full == NULL) continue;
            for (int r = 0; r < P; r++) {  // rank r's piece lies at r*len in the staging buffer
                cudaCheck(cudaMemcpyAsync(host_full + sl->offset + (size_t)r * q + start, staging + (size_t)r * len,
                                          len * sizeof(float), cudaMemcpyDeviceToHost, stream));
            }
        }
    }
    cudaCheck(cudaStreamSynchronize(stream));
    cudaCheck(cudaFree(staging));
#endif
}

// Collective: rank 0's host_full (num_params floats; ignored elsewhere) reaches every rank in
// pieces by broadcast, and each rank keeps the parts of its ranges in packed_device.
static inline void zero_scatter_from_host(const ZeroOptimizer* z, const float* host_full, float* packed_device,
                                          cudaStream_t stream) {
    const ZeroShardMap* map = &z->map;
    float* staging = (float*)cuda_malloc_or_die(ZERO_STAGING_ELEMS * sizeof(float), "ZeRO scatter staging");
    for (size_t start = 0; start < map->num_params; start += ZERO_STAGING_ELEMS) {
        size_t len = map->num_params - start < ZERO_STAGING_ELEMS ? map->num_params - start : ZERO_STAGING_ELEMS;
        if (map->rank == 0) {
            cudaCheck(cudaMemcpyAsync(staging, host_full + start, len * sizeof(float), cudaMemcpyHostToDevice, stream));
        }
        multi_gpu_broadcast(z->mg, staging, len * sizeof(float), stream);
        for (int i = 0; i < map->num_ranges; i++) {  // the intersection of each range with [start, start + len)
            const ZeroRange* rg = &map->ranges[i];
            size_t lo = rg->offset > start ? rg->offset : start;
            size_t hi = rg->offset + rg->count < start + len ? rg->offset + rg->count : start + len;
            if (lo >= hi) continue;
            cudaCheck(cudaMemcpyAsync(packed_device + rg->shard_offset + (lo - rg->offset), staging + (lo - start),
                                      (hi - lo) * sizeof(float), cudaMemcpyDeviceToDevice, stream));
        }
    }
    cudaCheck(cudaStreamSynchronize(stream));
    cudaCheck(cudaFree(staging));
}

#endif  // OMNIMOE_ZERO_CUH
