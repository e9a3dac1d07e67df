/*
expert_shard_threads.cuh - an ExpertShardComm (llmc/experts_shard.cuh) for tests on one GPU: P ranks
that are P host threads of one process, their exchanges device copies between the threads'
buffers at barriers. Byte for byte what the NCCL collectives deliver (expert_shard_comm_nccl):
the all-gather gives recv block q = rank q's send buffer, the all-to-all recv block q = block
`rank` of rank q's send buffer. Used by dev/cuda/test_experts_shard.cu (the rank kernels) and
test_omnimoe.cu (the trainer's sharded path with several ranks).

Defines:
- ShardThreads, shard_threads_init(sh, P, gpu) / shard_threads_destroy(sh)
- shard_threads_comm(sh, rank): rank `rank`'s ExpertShardComm over sh

Taking turns (gpu != NULL): the ranks of a whole model share process-wide state (the cuBLASLt
workspace and algorithm cache of llmc/matmul.cuh), so they must not run at the same time. A rank
thread then holds *gpu whenever it issues or runs GPU work and lets go of it only inside an
exchange, after draining its stream (the side streams it uses join that stream first): the GPU
runs one rank's work at a time, and the exchanges still meet. gpu = NULL: the ranks run
concurrently (kernels that touch no shared state).
*/
#ifndef OMNIMOE_EXPERT_SHARD_THREADS_CUH
#define OMNIMOE_EXPERT_SHARD_THREADS_CUH

#include <pthread.h>
#include "experts_shard.cuh"

#define SHARD_THREADS_MAX_P 8

typedef struct {
    int P;
    pthread_barrier_t barrier;
    const void* slots[SHARD_THREADS_MAX_P];  // every rank's send buffer of the exchange in progress
    pthread_mutex_t* gpu;                    // NULL, or the turn the ranks take (above)
} ShardThreads;

static void shard_threads_init(ShardThreads* sh, int P, pthread_mutex_t* gpu) {
    if (P < 1 || P > SHARD_THREADS_MAX_P) {
        fprintf(stderr, "shard_threads_init: %d ranks (1 .. %d)\n", P, SHARD_THREADS_MAX_P);
        exit(EXIT_FAILURE);
    }
    memset(sh, 0, sizeof(*sh));
    sh->P = P;
    sh->gpu = gpu;
    pthread_barrier_init(&sh->barrier, NULL, (unsigned)P);
}

static void shard_threads_destroy(ShardThreads* sh) { pthread_barrier_destroy(&sh->barrier); }

// recv block q = rank q's send buffer from byte src_offset on (bytes long). The rank's stream is
// drained first; a second barrier keeps every send buffer intact until all ranks have read it.
static void shard_threads_exchange_(const ExpertShardComm* c, void* recv, const void* send, size_t bytes,
                                    size_t src_offset, cudaStream_t stream) {
    ShardThreads* sh = (ShardThreads*)c->ctx;
    cudaCheck(cudaStreamSynchronize(stream));
    sh->slots[c->rank] = send;
    if (sh->gpu) pthread_mutex_unlock(sh->gpu);
    pthread_barrier_wait(&sh->barrier);
    if (sh->gpu) pthread_mutex_lock(sh->gpu);
    for (int q = 0; q < c->P; q++) {
        cudaCheck(cudaMemcpyAsync((char*)recv + (size_t)q * bytes, (const char*)sh->slots[q] + src_offset, bytes,
                                  cudaMemcpyDeviceToDevice, stream));
    }
    cudaCheck(cudaStreamSynchronize(stream));
    if (sh->gpu) pthread_mutex_unlock(sh->gpu);
    pthread_barrier_wait(&sh->barrier);
    if (sh->gpu) pthread_mutex_lock(sh->gpu);
}

static void shard_threads_all_gather_(const ExpertShardComm* c, void* recv, const void* send, size_t bytes,
                                      cudaStream_t stream) {
    shard_threads_exchange_(c, recv, send, bytes, 0, stream);
}

static void shard_threads_all_to_all_(const ExpertShardComm* c, void* recv, const void* send, size_t block_bytes,
                                      cudaStream_t stream) {
    shard_threads_exchange_(c, recv, send, block_bytes, (size_t)c->rank * block_bytes, stream);
}

static ExpertShardComm shard_threads_comm(ShardThreads* sh, int rank) {
    ExpertShardComm c;
    c.P = sh->P;
    c.rank = rank;
    c.all_gather = shard_threads_all_gather_;
    c.all_to_all = shard_threads_all_to_all_;
    c.ctx = sh;
    return c;
}

#endif  // OMNIMOE_EXPERT_SHARD_THREADS_CUH
