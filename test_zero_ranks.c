/*
 * test_zero_ranks.c - ZeRO-1 with P simulated ranks in one process (docs/sharding.md §2, §5.1),
 * on the CPU reference model (train_omnimoe.c), against the replicated data-parallel path.
 *
 * Each simulated rank is a GPT of its own (same initial weights, its own router BN statistics)
 * and trains on its own random micro-batch every step. The two paths share the forward, the
 * backward and one gradient mean (reduce_mean: the P gradients summed in rank order, then
 * divided by P: the same expression in both paths, as NCCL's sum order would be for a fixed P):
 *   replicated  every rank gets the whole mean, then gpt_update (the norm in double over the
 *               flat buffer, full AdamW) on every rank
 *   ZeRO-1      reduce-scatter on the slices of llmc/zero_shard.h: rank r receives the mean only
 *               on its chunks and the tails, every other gradient of rank r is set to NaN (so any
 *               read outside the shard poisons the result); the norm from per-rank double partials
 *               (chunks, tails on rank 0) summed in rank order; AdamW (adamw_range) on each range
 *               with the rank's packed master, m and v (1/P of the state); each rank writes its
 *               ranges into its weights, then an all-gather copies every rank's chunks to all
 * Checks, for P = 1, 2, 3, 4 (P = 3 has non-empty tails) and two models (omni and gelu), 4 steps:
 *   - clipping off: losses, weights of every rank, m and v (unpacked) bitwise equal to the
 *     replicated path: the per-element arithmetic and its inputs are the same.
 *   - clipping on (active every step): the norm is summed in another order (shard order, per
 *     rank, then over ranks), so only the double sum of squares is compared, within 1e-12
 *     relative. When the float norms agree bitwise (the usual case) everything must still be
 *     bitwise; when they differ by rounding, grad_scale differs by about one ulp, and weights and
 *     losses are compared within 1e-5 relative (a few ulp per step over 4 steps, far below what a
 *     wrong shard or a missing tail does).
 *   - every rank of the ZeRO run ends with bitwise identical weights; every rank computed the
 *     same norm.
 */
#define TESTING
#include "train_omnimoe.c"
#include "llmc/test_harness.h"
#include "llmc/zero_shard.h"
#include "test_dp_ranks.h"

#define MAX_RANKS 8
#define STEPS 4

typedef struct {
    int P;
    GPT ranks[MAX_RANKS];
    // ZeRO-1 only: each rank's map and packed fp32 master, m, v (shard_elems each)
    ZeroShardMap maps[MAX_RANKS];
    float* master[MAX_RANKS];
    float* m[MAX_RANKS];
    float* v[MAX_RANKS];
    float losses[STEPS];
    float norms[STEPS];
    double norm_sq[STEPS];  // the double sum of squares the norm came from
    int norms_agree;        // ZeRO: every rank computed the same norm at every step
} Run;

static void run_init(Run* run, const ModelConfig* c, int P, int zero) {
    memset(run, 0, sizeof(*run));
    run->P = P;
    run->norms_agree = 1;
    for (int r = 0; r < P; r++) {
        gpt_build(&run->ranks[r], c);
        gpt_init_random(&run->ranks[r], 1234);  // the same seed on every rank: identical replicas
        if (!zero) continue;
        zero_shard_map(&run->maps[r], c, P, r);
        size_t n = run->maps[r].shard_elems;
        run->master[r] = alloc_floats(n);
        run->m[r] = alloc_floats(n);
        run->v[r] = alloc_floats(n);
        zero_shard_pack(&run->maps[r], run->ranks[r].params, run->master[r]);
    }
}

static void run_free(Run* run) {
    for (int r = 0; r < run->P; r++) {
        gpt_free(&run->ranks[r]);
        if (run->master[r] == NULL) continue;
        zero_shard_map_free(&run->maps[r]);
        free(run->master[r]);
        free(run->m[r]);
        free(run->v[r]);
    }
}

static void replicated_step(Run* run, const ModelConfig* c, int step, float grad_clip) {
    run->losses[step] = dp_forward_backward(run->ranks, run->P, c, step, NULL, NULL);
    dp_replicated_update(run->ranks, run->P, step, grad_clip, &run->norms[step], &run->norm_sq[step],
                         &run->norms_agree);
}

static void zero_step(Run* run, const ModelConfig* c, int step, float grad_clip) {
    run->losses[step] = dp_forward_backward(run->ranks, run->P, c, step, NULL, NULL);
    const int P = run->P;
    size_t n = run->ranks[0].num_params;
    // reduce-scatter (and the tails' all-reduce) on the slices: rank r receives the mean on its
    // ranges; everything else in its gradient buffer becomes NaN
    float* mean = alloc_floats(n);
    for (int r = 0; r < P; r++) {
        const ZeroShardMap* map = &run->maps[r];
        for (int i = 0; i < map->num_ranges; i++) {
            const ZeroRange* rg = &map->ranges[i];
            for (size_t j = rg->offset; j < rg->offset + rg->count; j++) mean[j] = dp_reduce_mean(run->ranks, P, j);
        }
    }
    for (int r = 0; r < P; r++) {
        float* g = run->ranks[r].grads;
        for (size_t i = 0; i < n; i++) g[i] = NAN;
        const ZeroShardMap* map = &run->maps[r];
        for (int i = 0; i < map->num_ranges; i++) {
            const ZeroRange* rg = &map->ranges[i];
            memcpy(g + rg->offset, mean + rg->offset, rg->count * sizeof(float));
        }
    }
    free(mean);
    // the norm: rank partials in double over their norm ranges in shard order; each rank
    // "all-gathers" the P partials and adds them in rank order
    double partial[MAX_RANKS];
    for (int r = 0; r < P; r++) {
        const ZeroShardMap* map = &run->maps[r];
        const float* g = run->ranks[r].grads;
        double sum = 0.0;
        for (int i = 0; i < zero_shard_norm_ranges(map); i++) {
            const ZeroRange* rg = &map->ranges[i];
            for (size_t j = rg->offset; j < rg->offset + rg->count; j++) sum += (double)g[j] * g[j];
        }
        partial[r] = sum;
    }
    for (int r = 0; r < P; r++) {
        double sq = 0.0;
        for (int q = 0; q < P; q++) sq += partial[q];
        // AdamW on the shard: packed master, m, v; gradient read at the flat offset
        float grad_scale = dp_rank_norm_scale(r, sq, grad_clip, &run->norms[step], &run->norm_sq[step],
                                              &run->norms_agree);
        const ZeroShardMap* map = &run->maps[r];
        for (int i = 0; i < map->num_ranges; i++) {
            const ZeroRange* rg = &map->ranges[i];
            float wd = param_is_decayed(rg->tensor) ? DP_WD : 0.0f;
            size_t so = rg->shard_offset;
            adamw_range(run->master[r] + so, run->ranks[r].grads + rg->offset, run->m[r] + so, run->v[r] + so,
                        rg->count, DP_LR, DP_BETA1, DP_BETA2, DP_EPS, wd, grad_scale, step + 1);
        }
        // the update writes the rank's weights on its own ranges (chunks and tails)
        zero_shard_unpack(map, run->master[r], run->ranks[r].params);
    }
    // all-gather of the weights: every rank's chunks to every other rank (tails are equal already)
    for (int src = 0; src < P; src++) {
        const ZeroShardMap* map = &run->maps[src];
        for (int i = 0; i < map->num_chunk_ranges; i++) {
            const ZeroRange* rg = &map->ranges[i];
            for (int dst = 0; dst < P; dst++) {
                if (dst == src) continue;
                memcpy(run->ranks[dst].params + rg->offset, run->master[src] + rg->shard_offset,
                       rg->count * sizeof(float));
            }
        }
    }
}

// the ZeRO run's m (which = 0) or v (1), assembled in the flat layout from the ranks' shards
static float* zero_gather_state(const Run* run, int which) {
    size_t n = run->ranks[0].num_params;
    float* full = alloc_floats(n);
    for (size_t i = 0; i < n; i++) full[i] = NAN;
    for (int r = 0; r < run->P; r++) zero_shard_unpack(&run->maps[r], which ? run->v[r] : run->m[r], full);
    return full;
}

static void compare(const ModelConfig* c, const char* label, int P, float grad_clip) {
    Run rep, zero;
    run_init(&rep, c, P, 0);
    run_init(&zero, c, P, 1);
    for (int step = 0; step < STEPS; step++) {
        replicated_step(&rep, c, step, grad_clip);
        zero_step(&zero, c, step, grad_clip);
    }
    size_t n = rep.ranks[0].num_params;
    char name[160];
    // the shard holds 1/P of the state (plus the tails)
    snprintf(name, sizeof(name), "%s P=%d: shard size", label, P);
    size_t tails = zero_shard_tail_elems(&zero.maps[0]);
    test_checkf(zero.maps[0].shard_elems * P == n + (size_t)(P - 1) * tails, name, "%zu of %zu elements, tails %zu",
                zero.maps[0].shard_elems, n, tails);
    // every ZeRO rank ends with the same weights, and took the same norm
    int ranks_equal = zero.norms_agree;
    for (int r = 1; r < P; r++) ranks_equal &= memcmp(zero.ranks[r].params, zero.ranks[0].params, n * sizeof(float)) == 0;
    snprintf(name, sizeof(name), "%s P=%d clip=%g: ZeRO ranks identical", label, P, grad_clip);
    test_check(ranks_equal, name);
    // the norm: the double sums of squares agree to rounding
    double worst = 0.0;
    int norms_bitwise = 1;
    for (int s = 0; s < STEPS; s++) {
        double d = fabs(zero.norm_sq[s] - rep.norm_sq[s]) / rep.norm_sq[s];
        if (!(d <= worst)) worst = d;
        norms_bitwise &= memcmp(&zero.norms[s], &rep.norms[s], sizeof(float)) == 0;
    }
    snprintf(name, sizeof(name), "%s P=%d clip=%g: norm^2 (double)", label, P, grad_clip);
    float min_norm = rep.norms[0];
    for (int s = 1; s < STEPS; s++) min_norm = fminf(min_norm, rep.norms[s]);
    test_checkf(worst <= 1e-12 && (grad_clip == 0.0f || min_norm > grad_clip), name,
                "worst relative difference %.2e (tol 1e-12), float norms %s, smallest norm %.3f (clips above it)",
                worst, norms_bitwise ? "bitwise equal" : "differ in rounding", min_norm);
    float* m_full = zero_gather_state(&zero, 0);
    float* v_full = zero_gather_state(&zero, 1);
    int bitwise = memcmp(zero.losses, rep.losses, sizeof(zero.losses)) == 0 &&
                  memcmp(m_full, rep.ranks[0].m, n * sizeof(float)) == 0 &&
                  memcmp(v_full, rep.ranks[0].v, n * sizeof(float)) == 0;
    for (int r = 0; r < P; r++) bitwise &= memcmp(zero.ranks[r].params, rep.ranks[r].params, n * sizeof(float)) == 0;
    if (grad_clip == 0.0f || norms_bitwise) {
        // the same inputs to the same per-element arithmetic: bitwise, whatever P
        snprintf(name, sizeof(name), "%s P=%d clip=%g: losses, weights, m, v bitwise", label, P, grad_clip);
        test_checkf(bitwise, name, "%d steps", STEPS);
    } else {
        double werr = 0.0, lerr = 0.0;
        for (int r = 0; r < P; r++) {
            RelErr e = rel_err(zero.ranks[r].params, rep.ranks[r].params, n);
            if (!(e.rel <= werr)) werr = e.rel;
        }
        RelErr le = rel_err(zero.losses, rep.losses, STEPS);
        lerr = le.rel;
        snprintf(name, sizeof(name), "%s P=%d clip=%g: losses, weights within 1e-5", label, P, grad_clip);
        test_checkf(werr <= 1e-5 && lerr <= 1e-5, name, "weights %.2e, losses %.2e (norm rounding)", werr, lerr);
    }
    free(m_full);
    free(v_full);
    run_free(&rep);
    run_free(&zero);
}

int main(void) {
    test_begin("test_zero_ranks");
    // C = 32: P = 3 leaves tails (32 mod 24 = 8) in every per-channel slice; V < Vp
    TestDims dims = {16, 61, 64, 2, 2, 32, 128, 48};
    ModelConfig omni = test_config(dims, FFN_OMNI, 4, 3, ROUTER_NORM_BN, GATE_SOFTMAX);
    ModelConfig gelu = test_config(dims, FFN_GELU, 0, 0, ROUTER_NORM_BN, GATE_SOFTMAX);
    for (int P = 1; P <= 4; P++) {
        compare(&omni, "omni", P, 0.0f);
        compare(&omni, "omni", P, 0.05f);  // below the norm: clipping acts on every step
        compare(&gelu, "gelu", P, 0.05f);
    }
    return test_end();
}
