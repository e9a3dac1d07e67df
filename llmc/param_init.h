/*
 * param_init.h - the initial weights of docs/design.md §1.3 drawn on all host cores, bit for bit
 * the values of the sequential model_init_params (llmc/config.h) for any thread count.
 * Plain C with POSIX threads (host_threads.h): compiles with gcc -std=c11 and nvcc.
 *
 *   model_init_params_parallel(c, params, seed)          on every online core (host_num_cores)
 *   model_init_params_threads(c, params, seed, threads)  on a given number of threads (the tests)
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
#include "config.h"
#include "rand.h"
#include "host_threads.h"

typedef struct {
    const ModelConfig* config;
    float* params;
    uint64_t seed;
    const RngJump* jump;
} ParamInit;

// thread t's share of every tensor: pairs [t*np/T, (t+1)*np/T) of its np = ceil(size/2) pairs
static void param_init_part(void* ctx, int thread, int num_threads) {
    const ParamInit* init = (const ParamInit*)ctx;
    const ModelConfig* c = init->config;
    size_t sizes[NUM_PARAMETER_TENSORS];
    model_config_param_sizes(c, sizes);
    float* p = init->params;
    uint64_t first_draw = 0;  // the stream position of the tensor's first draw
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) {
        const uint64_t size = sizes[i], pairs = (size + 1) / 2;
        size_t lo_pair, hi_pair;
        host_range_part((size_t)pairs, thread, num_threads, &lo_pair, &hi_pair);
        const uint64_t lo = 2 * (uint64_t)lo_pair, hi = 2 * (uint64_t)hi_pair < size ? 2 * (uint64_t)hi_pair : size;
        float std = param_init_std(c, i);
        if (std > 0.0f) {
            if (hi > lo) {
                Rng rng;
                rng_init(&rng, init->seed);
                rng_jump(&rng, init->jump, first_draw + lo);
                rng_normal(&rng, p + lo, (size_t)(hi - lo), 0.0f, std);
            }
            first_draw += 2 * pairs;
        } else {
            float fill = std == -1.0f ? 1.0f : 0.0f;
            for (uint64_t j = lo; j < hi; j++) p[j] = fill;
        }
        p += size;
    }
}

static inline void model_init_params_threads(const ModelConfig* c, float* params, uint64_t seed, int num_threads) {
    RngJump* jump = (RngJump*)malloc(sizeof(RngJump));
    if (jump == NULL) {
        fprintf(stderr, "Error: model_init_params_threads: out of host memory (%zu bytes)\n", sizeof(RngJump));
        exit(EXIT_FAILURE);
    }
    rng_jump_init(jump);
    ParamInit init = {c, params, seed, jump};
    host_threads_run(param_init_part, &init, num_threads);
    free(jump);
}

static inline void model_init_params_parallel(const ModelConfig* c, float* params, uint64_t seed) {
    model_init_params_threads(c, params, seed, host_num_cores());
}

#endif // OMNIMOE_PARAM_INIT_H
