/*
 * param_init.h - the initial weights of docs/design.md §1.3 drawn on all host cores, bit for bit
 * the values of the sequential model_init_params (llmc/config.h) for any thread count and any
 * cut of the work. Plain C with POSIX threads (host_threads.h): compiles with gcc -std=c11 and nvcc.
 *
 *   model_init_params_parallel(c, params, seed)          on every online core (host_num_cores)
 *   model_init_params_threads(c, params, seed, threads)  on a given number of threads (the tests)
 *   model_init_params_range(c, params, seed, lo, hi, threads)   only params[lo, hi) (flat offsets)
 *   model_init_params_range_into(c, out, seed, lo, hi, threads) the same values into out[0, hi - lo)
 *   model_init_params_shard(c, local, seed, lay, block, threads)
 *       rank lay->rank's local buffer of the column-sharded tables (llmc/expert_shard_layout.h):
 *       expert_shard_local_pack of the whole draw, drawn with the local buffer and `block` values
 *       of scratch only (U and V go block of rows by block of rows, each packed to the rank's columns)
 *   model_init_params_pipelined(c, params, seed, chunk, threads, consume, ctx)
 *       draws chunk after chunk of `chunk` values on `threads` threads while a second thread calls
 *       consume(ctx, lo, n) on each finished chunk, in order (the CUDA trainer copies them to
 *       the GPU there, so the copies hide under the drawing)
 *
 * Output: the params written (all of them, or [lo, hi)) are overwritten; nothing else is touched.
 * A _into/shard output holds only what it is given (a range, a rank's local layout), at the same bits.
 *
 * Why it is exact: model_init_params draws from one xorshift64* stream, tensor after tensor in
 * layout order. A tensor drawn from a normal spends 2 * ceil(size / 2) draws of rng_u32 (pairs of
 * Box-Muller values, llmc/rand.h), a constant tensor none. So the values at offsets j and j + 1
 * (j even) of a normal tensor whose first draw is draw d of the stream come from draws d + j and
 * d + j + 1, whatever came before. A run of values [s, e) of a tensor is drawn by a freshly seeded
 * generator jumped to draw d + (s rounded down to even) (rng_jump: a 64x64 bit-matrix power per
 * set bit); when s is odd, the pair (s - 1, s) is computed and only its second value kept. The
 * arithmetic is rng_normal's on the same draws, so any cut into runs gives the sequential bits.
 * Each thread writes its own run; nothing is summed across threads.
 */
#ifndef OMNIMOE_PARAM_INIT_H
#define OMNIMOE_PARAM_INIT_H

#include <stdint.h>
#include <stddef.h>
#include <pthread.h>
#include "config.h"
#include "rand.h"
#include "host_threads.h"
#include "expert_shard_layout.h"

typedef struct {
    const ModelConfig* config;
    float* params;
    uint64_t seed;
    const RngJump* jump;
    size_t lo, hi;    // the flat range to write
    size_t out_base;  // the flat offset that params[0] holds (0: params is the whole model)
} ParamInit;

// params[lo, hi) on this thread, tensor by tensor
static void param_init_run(const ParamInit* init, size_t lo, size_t hi) {
    const ModelConfig* c = init->config;
    size_t sizes[NUM_PARAMETER_TENSORS];
    model_config_param_sizes(c, sizes);
    size_t base = 0;          // the tensor's first flat offset
    uint64_t first_draw = 0;  // the stream position of its first draw
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) {
        const size_t size = sizes[i];
        const size_t a = lo > base ? lo : base, b = hi < base + size ? hi : base + size;
        float std = param_init_std(c, i);
        if (a < b && std > 0.0f) {
            size_t s = a - base, e = b - base;  // the run, in the tensor's offsets
            float* out = init->params + (a - init->out_base);  // where flat offset a goes
            Rng rng;
            rng_init(&rng, init->seed);
            rng_jump(&rng, init->jump, first_draw + (s & ~(size_t)1));
            if (s & 1) {  // the second value of a pair: draw the pair, keep that value
                float pair[2];
                rng_normal(&rng, pair, 2, 0.0f, std);
                *out++ = pair[1];
                s++;
            }
            if (e > s) rng_normal(&rng, out, e - s, 0.0f, std);
        } else if (a < b) {
            float fill = std == -1.0f ? 1.0f : 0.0f;
            for (size_t j = a; j < b; j++) init->params[j - init->out_base] = fill;
        }
        if (std > 0.0f) first_draw += 2 * (((uint64_t)size + 1) / 2);
        base += size;
    }
}

static void param_init_part(void* ctx, int thread, int num_threads) {
    const ParamInit* init = (const ParamInit*)ctx;
    size_t lo, hi;
    host_range_part(init->hi - init->lo, thread, num_threads, &lo, &hi);
    param_init_run(init, init->lo + lo, init->lo + hi);
}

static inline RngJump* param_init_jump_table(void) {
    RngJump* jump = (RngJump*)malloc(sizeof(RngJump));
    if (jump == NULL) {
        fprintf(stderr, "Error: param_init: out of host memory (%zu bytes)\n", sizeof(RngJump));
        exit(EXIT_FAILURE);
    }
    rng_jump_init(jump);
    return jump;
}

// out[0, hi - lo) = the values of flat offsets [lo, hi), with a jump table made by the caller
static inline void param_init_draw(const ModelConfig* c, float* out, uint64_t seed, const RngJump* jump, size_t lo,
                                   size_t hi, int num_threads) {
    ParamInit init = {c, out, seed, jump, lo, hi, lo};
    host_threads_run(param_init_part, &init, num_threads);
}

static inline void model_init_params_range_into(const ModelConfig* c, float* out, uint64_t seed, size_t lo, size_t hi,
                                                int num_threads) {
    RngJump* jump = param_init_jump_table();
    param_init_draw(c, out, seed, jump, lo, hi, num_threads);
    free(jump);
}

static inline void model_init_params_range(const ModelConfig* c, float* params, uint64_t seed, size_t lo, size_t hi,
                                           int num_threads) {
    model_init_params_range_into(c, params + lo, seed, lo, hi, num_threads);
}

static inline void model_init_params_threads(const ModelConfig* c, float* params, uint64_t seed, int num_threads) {
    model_init_params_range(c, params, seed, 0, model_config_num_params(c), num_threads);
}

static inline void model_init_params_parallel(const ModelConfig* c, float* params, uint64_t seed) {
    model_init_params_threads(c, params, seed, host_num_cores());
}

// ----------------------------------------------------------------------------
// drawing and consuming at the same time

typedef void (*ParamChunkFn)(void* ctx, size_t lo, size_t n);

typedef struct {
    ParamChunkFn consume;
    void* ctx;
    size_t total, chunk;
    size_t ready;  // chunks drawn so far (under mu)
    pthread_mutex_t mu;
    pthread_cond_t cv;
} ParamPipeline;

static void* param_pipeline_consumer(void* arg) {
    ParamPipeline* pl = (ParamPipeline*)arg;
    size_t num_chunks = (pl->total + pl->chunk - 1) / pl->chunk;
    for (size_t i = 0; i < num_chunks; i++) {
        pthread_mutex_lock(&pl->mu);
        while (pl->ready <= i) pthread_cond_wait(&pl->cv, &pl->mu);
        pthread_mutex_unlock(&pl->mu);
        size_t lo = i * pl->chunk, n = pl->total - lo < pl->chunk ? pl->total - lo : pl->chunk;
        pl->consume(pl->ctx, lo, n);
    }
    return NULL;
}

// consume(ctx, lo, n) sees every chunk once, in order, after all its values are written, on one
// thread of its own (or, when that thread cannot start, on the caller after the drawing)
static inline void model_init_params_pipelined(const ModelConfig* c, float* params, uint64_t seed, size_t chunk,
                                               int num_threads, ParamChunkFn consume, void* ctx) {
    const size_t total = model_config_num_params(c);
    if (chunk < 1) chunk = 1;
    ParamPipeline pl;
    pl.consume = consume;
    pl.ctx = ctx;
    pl.total = total;
    pl.chunk = chunk;
    pl.ready = 0;
    pthread_mutex_init(&pl.mu, NULL);
    pthread_cond_init(&pl.cv, NULL);
    pthread_t consumer;
    int started = pthread_create(&consumer, NULL, param_pipeline_consumer, &pl) == 0;
    RngJump* jump = param_init_jump_table();
    for (size_t lo = 0; lo < total; lo += chunk) {
        param_init_draw(c, params + lo, seed, jump, lo, total - lo < chunk ? total : lo + chunk, num_threads);
        pthread_mutex_lock(&pl.mu);
        pl.ready++;
        pthread_cond_signal(&pl.cv);
        pthread_mutex_unlock(&pl.mu);
    }
    free(jump);
    if (started) pthread_join(consumer, NULL);
    else param_pipeline_consumer(&pl);
    pthread_cond_destroy(&pl.cv);
    pthread_mutex_destroy(&pl.mu);
}

// ----------------------------------------------------------------------------
// a rank's local weights of the column-sharded expert tables, streamed (docs/sharding.md §3.4)

#define PARAM_INIT_SHARD_BLOCK ((size_t)1 << 26)  // values per block of U or V rows: 256 MiB of fp32

typedef struct {
    float* slice;       // the block's rows of the rank's (rows, C/P) slice
    const float* full;  // the block's rows of the whole (rows, C) table
    size_t rows;
    const ExpertShardLayout* lay;
} ParamShardPack;

static void param_shard_pack_part(void* ctx, int thread, int num_threads) {
    const ParamShardPack* pk = (const ParamShardPack*)ctx;
    const ExpertShardLayout* lay = pk->lay;
    size_t lo, hi;
    host_range_part(pk->rows, thread, num_threads, &lo, &hi);
    if (hi > lo) {
        expert_shard_pack(pk->slice + lo * (size_t)(lay->C / lay->P), pk->full + lo * (size_t)lay->C, sizeof(float),
                          hi - lo, lay->C, lay->P, lay->rank);
    }
}

// local (lay->num_local values, overwritten) = expert_shard_local_pack of the whole
// model_init_params draw, bit for bit, without the whole draw: the replicated tensors are drawn
// straight into their local place, U and V block by block of whole rows (block values, at least
// one row) into a scratch buffer of that size, each block packed to the rank's columns. Host
// memory: the local buffer and one block. Both steps run on num_threads threads.
static inline void model_init_params_shard(const ModelConfig* c, float* local, uint64_t seed,
                                           const ExpertShardLayout* lay, size_t block, int num_threads) {
    RngJump* jump = param_init_jump_table();
    const size_t C = (size_t)lay->C, cols = C / (size_t)lay->P;
    size_t block_rows = block / C;
    if (block_rows < 1) block_rows = 1;
    if (block_rows > lay->rows) block_rows = lay->rows;
    float* full = NULL;
    if (block_rows > 0) {
        full = (float*)malloc(block_rows * C * sizeof(float));
        if (full == NULL) {
            fprintf(stderr, "Error: param_init: out of host memory (%zu bytes for a block of table rows)\n",
                    block_rows * C * sizeof(float));
            exit(EXIT_FAILURE);
        }
    }
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) {
        const size_t base = lay->full_offsets[i];
        if (!expert_shard_is_table(i)) {
            param_init_draw(c, local + lay->offsets[i], seed, jump, base, base + lay->full_sizes[i], num_threads);
            continue;
        }
        for (size_t r0 = 0; r0 < lay->rows; r0 += block_rows) {
            size_t n = lay->rows - r0 < block_rows ? lay->rows - r0 : block_rows;
            param_init_draw(c, full, seed, jump, base + r0 * C, base + (r0 + n) * C, num_threads);
            ParamShardPack pk = {local + lay->offsets[i] + r0 * cols, full, n, lay};
            host_threads_run(param_shard_pack_part, &pk, num_threads);
        }
    }
    free(full);
    free(jump);
}

#endif // OMNIMOE_PARAM_INIT_H
