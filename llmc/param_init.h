/*
 * param_init.h - the initial weights of docs/design.md §1.3 drawn on all host cores, bit for bit
 * the values of the sequential model_init_params (llmc/config.h) for any thread count.
 * Plain C with POSIX threads: compiles with gcc -std=c11 and nvcc.
 *
 *   model_init_params_parallel(c, params, seed)          on every online core (host_num_cores)
 *   model_init_params_threads(c, params, seed, threads)  on a given number of threads (the tests)
 *   host_num_cores()
 *
 * Output: params (all model_config_num_params floats, layout order) is overwritten.
 *
 * Why it is exact: model_init_params draws from one xorshift64* stream, tensor after tensor in
 * layout order. A tensor drawn from a normal spends 2 * ceil(size / 2) draws of rng_u32 (pairs of
 * Box-Muller values, llmc/rand.h), a constant tensor none. So the value at an even offset j of a
 * normal tensor whose first draw is draw d of the stream comes from draws d + j and d + j + 1,
 * whatever came before. Each thread takes a contiguous run of whole pairs of every tensor, jumps a
 * freshly seeded generator to the run's first draw (rng_jump: a 64x64 bit-matrix power per set
 * bit) and calls rng_normal over the run: the same double-precision arithmetic on the same
 * draws as the sequential loop. Nothing is summed across threads; the bits cannot depend on
 * the thread count or the schedule.
 */
#ifndef OMNIMOE_PARAM_INIT_H
#define OMNIMOE_PARAM_INIT_H

#include <stdint.h>
#include <stddef.h>
#include <pthread.h>
#include <unistd.h>
#include "config.h"
#include "rand.h"

#define PARAM_INIT_MAX_THREADS 256

typedef struct {
    const ModelConfig* config;
    float* params;
    uint64_t seed;
    const RngJump* jump;
    int thread, num_threads;
} ParamInitTask;

static inline int host_num_cores(void) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    if (n < 1) return 1;
    return n > PARAM_INIT_MAX_THREADS ? PARAM_INIT_MAX_THREADS : (int)n;
}

// thread t's share of every tensor: pairs [t*np/T, (t+1)*np/T) of its np = ceil(size/2) pairs
static void* param_init_worker(void* arg) {
    const ParamInitTask* task = (const ParamInitTask*)arg;
    const ModelConfig* c = task->config;
    size_t sizes[NUM_PARAMETER_TENSORS];
    model_config_param_sizes(c, sizes);
    const uint64_t T = (uint64_t)task->num_threads, t = (uint64_t)task->thread;
    float* p = task->params;
    uint64_t first_draw = 0;  // the stream position of the tensor's first draw
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) {
        const uint64_t size = sizes[i], pairs = (size + 1) / 2;
        const uint64_t lo = 2 * (t * pairs / T), hi_pair = (t + 1) * pairs / T;
        const uint64_t hi = 2 * hi_pair < size ? 2 * hi_pair : size;
        float std = param_init_std(c, i);
        if (std > 0.0f) {
            if (hi > lo) {
                Rng rng;
                rng_init(&rng, task->seed);
                rng_jump(&rng, task->jump, first_draw + lo);
                rng_normal(&rng, p + lo, (size_t)(hi - lo), 0.0f, std);
            }
            first_draw += 2 * pairs;
        } else {
            float fill = std == -1.0f ? 1.0f : 0.0f;
            for (uint64_t j = lo; j < hi; j++) p[j] = fill;
        }
        p += size;
    }
    return NULL;
}

static inline void model_init_params_threads(const ModelConfig* c, float* params, uint64_t seed, int num_threads) {
    if (num_threads < 1) num_threads = 1;
    if (num_threads > PARAM_INIT_MAX_THREADS) num_threads = PARAM_INIT_MAX_THREADS;
    RngJump* jump = (RngJump*)malloc(sizeof(RngJump));
    if (jump == NULL) {
        fprintf(stderr, "Error: model_init_params_threads: out of host memory (%zu bytes)\n", sizeof(RngJump));
        exit(EXIT_FAILURE);
    }
    rng_jump_init(jump);
    ParamInitTask tasks[PARAM_INIT_MAX_THREADS];
    pthread_t ids[PARAM_INIT_MAX_THREADS];
    int started[PARAM_INIT_MAX_THREADS];
    for (int t = 0; t < num_threads; t++) {
        ParamInitTask task = {c, params, seed, jump, t, num_threads};
        tasks[t] = task;
    }
    // threads 1.. on their own; a thread that cannot start runs its share here (same bits)
    for (int t = 1; t < num_threads; t++) started[t] = pthread_create(&ids[t], NULL, param_init_worker, &tasks[t]) == 0;
    param_init_worker(&tasks[0]);
    for (int t = 1; t < num_threads; t++) {
        if (started[t]) pthread_join(ids[t], NULL);
        else param_init_worker(&tasks[t]);
    }
    free(jump);
}

static inline void model_init_params_parallel(const ModelConfig* c, float* params, uint64_t seed) {
    model_init_params_threads(c, params, seed, host_num_cores());
}

#endif // OMNIMOE_PARAM_INIT_H
