/*
expert_shard_state.cuh - the GPU side of a rank's state when the expert tables are column-sharded
(--shard-experts 1, docs/sharding.md §3): the global gradient norm and the gather of the U and V
slices into one host copy. The layout of the rank's flat buffers is llmc/expert_shard_layout.h's
(every tensor whole, U and V of (L*N, C/P)); the exchanges of the layer are llmc/experts_shard.cuh's.

Defines:
- ExpertShardState                  the rank's norm ranges on the device, the partials
- expert_shard_state_init() / _free()
- expert_shard_grad_norm_squared()  the global sum of squares of the gradients (waits for the GPU):
                                    the replicated tensors' on this rank (the same bits on every
                                    rank: their gradients are the data-parallel mean) plus the P
                                    ranks' U/V slice partials, all-gathered and added in rank order
                                    (expert_shard_norm_squared). The replicated sums travel in the
                                    same all-gather and must be bitwise equal: ranks whose
                                    replicated gradients differ would drift apart, so every rank
                                    exits with one message (rank 0's) instead, all alike
- expert_shard_gather_to_host()     every rank's local fp32 buffer -> the whole flat model in one
                                    host copy (collective; host_full may be NULL where not needed)

Determinism: both partial sums are zero.cuh's fixed-shape double reduction (zero_norm_partial_kernel
over a range table, then one thread in order); the all-gather moves bits, and the sum in rank
order runs on every rank on the host, so every rank gets the same norm. Against the unsharded
fp32 norm (global_norm.cuh) it differs in rounding only; test_shard_tables.c checks the host
combination, which is this one.
*/
#ifndef OMNIMOE_EXPERT_SHARD_STATE_CUH
#define OMNIMOE_EXPERT_SHARD_STATE_CUH

#include "zero.cuh"
#include "experts_shard.cuh"
#include "expert_shard_layout.h"

#define EXPERT_SHARD_GATHER_ELEMS ((size_t)1 << 24)  // per rank and piece in the gather (64 MiB fp32)

typedef struct {
    const ExpertShardComm* comm;
    const ExpertShardLayout* lay;
    size_t* offsets;    // (num_replicated + num_table) device: the replicated tensors, then U and V
    size_t* counts;
    int num_replicated, num_table;
    double* partials;   // (ZERO_NORM_BLOCKS + 2 + 2P) device: block partials, replicated, own slices,
                        // gathered (replicated, slices) of every rank
    double* host;       // (2 + 2P) host copy, then (P) the slice partials in rank order
} ExpertShardState;

static inline void expert_shard_state_init(ExpertShardState* s, const ExpertShardLayout* lay,
                                           const ExpertShardComm* comm) {
    memset(s, 0, sizeof(*s));
    s->comm = comm;
    s->lay = lay;
    size_t offsets[NUM_PARAMETER_TENSORS], counts[NUM_PARAMETER_TENSORS];
    int n = 0;
    for (int pass = 0; pass < 2; pass++) {  // the replicated tensors first, then U and V
        for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) {
            if (lay->sizes[i] == 0 || expert_shard_is_table(i) != pass) continue;
            if (lay->offsets[i] % 8 != 0 || lay->sizes[i] % 8 != 0) {  // the norm kernel reads 16-byte vectors
                fprintf(stderr, "Error: --shard-experts 1: tensor %s (%zu elements at %zu) is not a multiple of 8 "
                        "elements\n", param_tensor_name(i), lay->sizes[i], lay->offsets[i]);
                exit(EXIT_FAILURE);
            }
            offsets[n] = lay->offsets[i];
            counts[n] = lay->sizes[i];
            n++;
            if (pass == 0) s->num_replicated++;
            else s->num_table++;
        }
    }
    s->offsets = (size_t*)cuda_malloc_or_die(n * sizeof(size_t), "sharded tables: norm ranges");
    s->counts = (size_t*)cuda_malloc_or_die(n * sizeof(size_t), "sharded tables: norm ranges");
    cudaCheck(cudaMemcpy(s->offsets, offsets, n * sizeof(size_t), cudaMemcpyHostToDevice));
    cudaCheck(cudaMemcpy(s->counts, counts, n * sizeof(size_t), cudaMemcpyHostToDevice));
    s->partials = (double*)cuda_malloc_or_die((ZERO_NORM_BLOCKS + 2 + 2 * comm->P) * sizeof(double),
                                              "sharded tables: norm partials");
    s->host = (double*)malloc_check((2 + 3 * comm->P) * sizeof(double));
}

static inline void expert_shard_state_free(ExpertShardState* s) {
    cudaCheck(cudaFree(s->offsets));
    cudaCheck(cudaFree(s->counts));
    cudaCheck(cudaFree(s->partials));
    free(s->host);
    memset(s, 0, sizeof(*s));
}

static inline double expert_shard_grad_norm_squared(ExpertShardState* s, const floatX* grads, cudaStream_t stream) {
    const int P = s->comm->P;
    double* out = s->partials + ZERO_NORM_BLOCKS;  // [0] replicated, [1] own slices, [2..] gathered pairs
    const int first[2] = {0, s->num_replicated}, count[2] = {s->num_replicated, s->num_table};
    for (int part = 0; part < 2; part++) {
        zero_norm_partial_kernel<<<ZERO_NORM_BLOCKS, ZERO_NORM_THREADS, 0, stream>>>(
            s->partials, grads, s->offsets + first[part], s->counts + first[part], count[part]);
        cudaCheckLast();
        zero_norm_final_kernel<<<1, 32, 0, stream>>>(out + part, s->partials, ZERO_NORM_BLOCKS);
        cudaCheckLast();
    }
    s->comm->all_gather(s->comm, out + 2, out, 2 * sizeof(double), stream);
    cudaCheck(cudaMemcpyAsync(s->host, out, (2 + 2 * P) * sizeof(double), cudaMemcpyDeviceToHost, stream));
    cudaCheck(cudaStreamSynchronize(stream));
    const double* gathered = s->host + 2;  // rank q: [2q] replicated, [2q + 1] its slices
    double* slices = s->host + 2 + 2 * P;
    for (int q = 0; q < P; q++) {
        // every rank sees the same gathered bits, so all of them stop here alike (no rank alone)
        if (memcmp(&gathered[2 * q], &gathered[0], sizeof(double)) != 0) {
            if (s->comm->rank == 0) {
                fprintf(stderr, "Error: --shard-experts 1: the replicated gradients differ between ranks (their sum "
                        "of squares is %.17g on rank %d, %.17g on rank 0): the data-parallel mean did not give every "
                        "rank the same bits, so the replicas would drift apart; stopping\n", gathered[2 * q], q,
                        gathered[0]);
            }
            exit(EXIT_FAILURE);
        }
        slices[q] = gathered[2 * q + 1];
    }
    return expert_shard_norm_squared(s->host[0], slices, P);
}

// host_full (the whole flat model, fp32) = the replicated tensors of this rank's local buffer and
// the U and V columns of every rank, gathered in pieces of rows (one all-gather each)
static inline void expert_shard_gather_to_host(const ExpertShardState* s, const float* local_device, float* host_full,
                                               cudaStream_t stream) {
    const ExpertShardLayout* lay = s->lay;
    const int P = s->comm->P, C = lay->C, cols = C / P;
    if (host_full != NULL) {
        for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) {
            if (expert_shard_is_table(i) || lay->sizes[i] == 0) continue;
            cudaCheck(cudaMemcpy(host_full + lay->full_offsets[i], local_device + lay->offsets[i],
                                 lay->sizes[i] * sizeof(float), cudaMemcpyDeviceToHost));
        }
    }
    size_t piece = EXPERT_SHARD_GATHER_ELEMS / (size_t)cols;
    if (piece < 1) piece = 1;
    if (piece > lay->rows) piece = lay->rows;
    float* recv = (float*)cuda_malloc_or_die((size_t)P * piece * cols * sizeof(float), "sharded tables: gather");
    float* staging = host_full != NULL ? (float*)malloc_check((size_t)P * piece * cols * sizeof(float)) : NULL;
    const int tables[2] = {PARAM_EXPERTU, PARAM_EXPERTV};
    for (int ti = 0; ti < 2; ti++) {
        const int t = tables[ti];
        for (size_t r0 = 0; r0 < lay->rows; r0 += piece) {
            const size_t nb = lay->rows - r0 < piece ? lay->rows - r0 : piece;
            s->comm->all_gather(s->comm, recv, local_device + lay->offsets[t] + r0 * cols, nb * cols * sizeof(float),
                                stream);
            if (host_full == NULL) continue;
            cudaCheck(cudaMemcpyAsync(staging, recv, (size_t)P * nb * cols * sizeof(float), cudaMemcpyDeviceToHost,
                                      stream));
            cudaCheck(cudaStreamSynchronize(stream));
            for (int q = 0; q < P; q++) {
                expert_shard_unpack(host_full + lay->full_offsets[t] + r0 * (size_t)C, staging + (size_t)q * nb * cols,
                                    sizeof(float), nb, C, P, q);
            }
        }
    }
    cudaCheck(cudaStreamSynchronize(stream));
    cudaCheck(cudaFree(recv));
    free(staging);
}

#endif  // OMNIMOE_EXPERT_SHARD_STATE_CUH
