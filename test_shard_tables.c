/*
 * test_shard_tables.c - the trainer-side bookkeeping of the column-sharded expert tables
 * (--shard-experts 1, docs/sharding.md §3.4) with P simulated ranks in one process, on the CPU
 * reference model (train_omnimoe.c), against the replicated data-parallel path. It checks the
 * host code the CUDA trainer uses (llmc/expert_shard_layout.h, llmc/checkpoint_parts.h's tables
 * mode): the local flat layout, the init packing, AdamW on the smaller buffer, the norm
 * combination and the checkpoint parts with re-sharding.
 *
 * Each simulated rank is a GPT of its own (its own router BN statistics) that trains on its own
 * random micro-batch. The tables run keeps, per rank, only its local buffers of the layout:
 * weights (the CPU model's fp32 weights are its master), m and v, with U and V of (L*N, C/P).
 * Before each forward the rank's GPT gets the whole U and V put together from every rank's slice
 * (what the exchanges of llmc/experts_shard.cuh give the expert math; that math itself is
 * test_expert_shard.c's), the rest from its own local buffer. The gradient mean is the same
 * expression in both paths (the P gradients summed in rank order, divided by P), so the replicated
 * tensors get the data-parallel mean and rank r keeps its columns of the mean of U and V; the
 * global norm is expert_shard_norm_squared: the replicated part on each rank plus the P slice
 * partials in rank order. AdamW (adamw_range) runs per tensor on the local layout.
 *
 * Checks, for P = 1, 2, 3, 4 (C = 96: 12 column vectors), 4 steps:
 *   - init: every rank's local weights are its pack of the full draw; put together they are the
 *     replicated model bitwise
 *   - clipping off: losses, the weights put together, m and v bitwise equal to the replicated
 *     run; every rank's replicated tensors identical
 *   - clipping on: the double sum of squares within 1e-12 relative; bitwise when the float norms
 *     agree, else 1e-5 (grad_scale one ulp apart)
 *   - checkpoint parts written after 2 steps at P (SHARD_MODE_TABLES): loaded at P' = 1..4 each
 *     new rank's local master, m and v are bitwise the pack of the saved state; checkpoint_read
 *     (a replicated or CPU resume) gives the whole state bitwise; resumed at P (the loaded
 *     locals, the manifest's BN sets) the last 2 steps are bitwise the uninterrupted run; resumed
 *     at P' != P they are bitwise a replicated run of P' ranks resumed from the same checkpoint
 *   - a flipped byte in a part is refused naming the part
 *   - the gradient buckets of every rank (expert_shard_grad_slices, what the CUDA trainer's
 *     reducer averages): without U and V, at local offsets, they tile the other tensors once
 */
#define TESTING
#include "train_omnimoe.c"
#include "llmc/test_harness.h"
#include "llmc/checkpoint.h"
#include "llmc/expert_shard_layout.h"
#include "test_dp_ranks.h"

#define MAX_RANKS 4
#define STEPS 4
#define SAVE_AT 2

typedef struct {
    int P, tables;  // tables: the sharded run (local buffers); 0: replicated (whole GPTs)
    GPT ranks[MAX_RANKS];
    ExpertShardLayout lay[MAX_RANKS];
    float* w[MAX_RANKS];  // tables: local weights, m, v (lay.num_local each)
    float* m[MAX_RANKS];
    float* v[MAX_RANKS];
    float losses[STEPS];
    float norms[STEPS];
    double norm_sq[STEPS];
    int norms_agree;
} Run;

static void run_init(Run* run, const ModelConfig* c, int P, int tables) {
    memset(run, 0, sizeof(*run));
    run->P = P;
    run->tables = tables;
    run->norms_agree = 1;
    for (int r = 0; r < P; r++) {
        gpt_build(&run->ranks[r], c);
        gpt_init_random(&run->ranks[r], 1234);  // the full host draw, the same on every rank
        if (!tables) continue;
        expert_shard_layout(&run->lay[r], c, P, r);
        size_t n = run->lay[r].num_local;
        run->w[r] = alloc_floats(n);
        run->m[r] = (float*)calloc(n, sizeof(float));
        run->v[r] = (float*)calloc(n, sizeof(float));
        expert_shard_local_pack(run->w[r], run->ranks[r].params, sizeof(float), &run->lay[r]);  // the rank keeps its slice
        for (size_t i = 0; i < run->ranks[r].num_params; i++) run->ranks[r].params[i] = NAN;  // only the local buffers live
    }
}

static void run_free(Run* run) {
    for (int r = 0; r < run->P; r++) {
        gpt_free(&run->ranks[r]);
        free(run->w[r]);
        free(run->m[r]);
        free(run->v[r]);
    }
}

// tables: a full buffer from the ranks' locals of one kind (0 weights, 1 m, 2 v); the replicated
// part from rank `own` (put last, so its copy is the one that stays)
static void tables_assemble(const Run* run, int kind, int own, float* full) {
    for (int q = 0; q < run->P; q++) {
        if (q == own) continue;
        const float* src = kind == 0 ? run->w[q] : kind == 1 ? run->m[q] : run->v[q];
        expert_shard_local_unpack(full, src, sizeof(float), &run->lay[q]);
    }
    const float* src = kind == 0 ? run->w[own] : kind == 1 ? run->m[own] : run->v[own];
    expert_shard_local_unpack(full, src, sizeof(float), &run->lay[own]);
}

// the tables run's GPT of rank r trains with U and V put together from every rank's slice (the
// exchanges' view of the tables), the rest from its own local buffer
static void tables_before(void* ctx, int r) {
    Run* run = (Run*)ctx;
    if (run->tables) tables_assemble(run, 0, r, run->ranks[r].params);
}

static void replicated_step(Run* run, const ModelConfig* c, int step, float grad_clip) {
    run->losses[step] = dp_forward_backward(run->ranks, run->P, c, step, tables_before, run);
    dp_replicated_update(run->ranks, run->P, step, grad_clip, &run->norms[step], &run->norm_sq[step],
                         &run->norms_agree);
}

static void tables_step(Run* run, const ModelConfig* c, int step, float grad_clip) {
    run->losses[step] = dp_forward_backward(run->ranks, run->P, c, step, tables_before, run);
    const int P = run->P;
    size_t n = run->ranks[0].num_params;
    float* mean = alloc_floats(n);
    for (size_t i = 0; i < n; i++) mean[i] = dp_reduce_mean(run->ranks, run->P, i);
    // each rank's local gradient: the replicated mean, its columns of the tables' mean
    float* grad[MAX_RANKS];
    double partial[MAX_RANKS], replicated[MAX_RANKS];
    for (int r = 0; r < P; r++) {
        const ExpertShardLayout* lay = &run->lay[r];
        grad[r] = alloc_floats(lay->num_local);
        expert_shard_local_pack(grad[r], mean, sizeof(float), lay);
        replicated[r] = partial[r] = 0.0;
        for (int t = 0; t < NUM_PARAMETER_TENSORS; t++) {
            const float* g = grad[r] + lay->offsets[t];
            double sum = 0.0;
            for (size_t j = 0; j < lay->sizes[t]; j++) sum += (double)g[j] * g[j];
            if (expert_shard_is_table(t)) partial[r] += sum;
            else replicated[r] += sum;
        }
    }
    free(mean);
    for (int r = 0; r < P; r++) {
        double sq = expert_shard_norm_squared(replicated[r], partial, P);
        float grad_scale = dp_rank_norm_scale(r, sq, grad_clip, &run->norms[step], &run->norm_sq[step],
                                              &run->norms_agree);
        const ExpertShardLayout* lay = &run->lay[r];
        for (int t = 0; t < NUM_PARAMETER_TENSORS; t++) {  // the trainer's per-tensor loop on the local layout
            size_t o = lay->offsets[t];
            float wd = param_is_decayed(t) ? DP_WD : 0.0f;
            adamw_range(run->w[r] + o, grad[r] + o, run->m[r] + o, run->v[r] + o, lay->sizes[t], DP_LR, DP_BETA1, DP_BETA2,
                        DP_EPS, wd, grad_scale, step + 1);
        }
        free(grad[r]);
    }
}

static void run_steps(Run* run, const ModelConfig* c, int from, int to, float clip) {
    for (int s = from; s < to; s++) {
        if (run->tables) tables_step(run, c, s, clip);
        else replicated_step(run, c, s, clip);
    }
}

// the state of a run as whole flat buffers: rank 0's
static void run_state(const Run* run, float* w, float* m, float* v) {
    size_t n = run->ranks[0].num_params;
    if (run->tables) {
        tables_assemble(run, 0, 0, w);
        tables_assemble(run, 1, 0, m);
        tables_assemble(run, 2, 0, v);
    } else {
        memcpy(w, run->ranks[0].params, n * sizeof(float));
        memcpy(m, run->ranks[0].m, n * sizeof(float));
        memcpy(v, run->ranks[0].v, n * sizeof(float));
    }
}

static int equal_state(const Run* a, const Run* b) {
    size_t n = a->ranks[0].num_params;
    float* s[6];
    for (int k = 0; k < 6; k++) s[k] = alloc_floats(n);
    run_state(a, s[0], s[1], s[2]);
    run_state(b, s[3], s[4], s[5]);
    int eq = 1;
    for (int k = 0; k < 3; k++) eq &= memcmp(s[k], s[k + 3], n * sizeof(float)) == 0;
    for (int k = 0; k < 6; k++) free(s[k]);
    return eq;
}

// every tables rank holds the same replicated tensors
static int tables_replicated_agree(const Run* run) {
    int ok = 1;
    for (int r = 1; r < run->P; r++) {
        for (int t = 0; t < NUM_PARAMETER_TENSORS; t++) {
            if (expert_shard_is_table(t)) continue;
            const ExpertShardLayout* lay = &run->lay[r];
            ok &= memcmp(run->w[r] + lay->offsets[t], run->w[0] + lay->offsets[t], lay->sizes[t] * sizeof(float)) == 0;
        }
    }
    return ok;
}

// ----------------------------------------------------------------------------
// checkpoints

static void save_tables(const Run* run, const ModelConfig* c, const char* dir, int step, char* manifest) {
    CheckpointPartEntry table[MAX_RANKS];
    for (int r = 0; r < run->P; r++) {
        if (checkpoint_part_write(dir, step, c, r, run->P, SHARD_MODE_TABLES, run->w[r], run->m[r], run->v[r],
                                  run->lay[r].num_local, &table[r]) != 0) {
            exit(EXIT_FAILURE);
        }
    }
    size_t NB = model_config_num_bn_stats(c);
    float* bn = alloc_floats(NB * run->P + 1);
    for (int r = 0; r < run->P; r++) memcpy(bn + (size_t)r * NB, run->ranks[r].bn_stats, NB * sizeof(float));
    CheckpointInfo info;
    memset(&info, 0, sizeof(info));
    info.step = step;
    info.adam_t = step;
    info.run.num_processes = run->P;
    unsigned char loader[16] = {1, 2, 3}, rng[8] = {9, 8, 7};
    if (checkpoint_manifest_write(dir, c, &info, bn, run->P, loader, sizeof(loader), rng, sizeof(rng), run->P,
                                  SHARD_MODE_TABLES, table, manifest) != 0) {
        exit(EXIT_FAILURE);
    }
    free(bn);
}

// a fresh run of P2 ranks (tables or replicated) holding the checkpoint: rank r takes BN set r mod P_saved
static void run_resume(Run* run, const ModelConfig* c, int P2, int tables, const char* manifest) {
    run_init(run, c, P2, tables);
    ModelConfig fc;
    CheckpointInfo info;
    checkpoint_read_info(manifest, &fc, &info);
    size_t n = model_config_num_params(c), NB = model_config_num_bn_stats(c);
    float *w = alloc_floats(n), *m = alloc_floats(n), *v = alloc_floats(n), *bn = alloc_floats(NB * info.num_bn_sets + 1);
    unsigned char loader[16], rng[8];
    checkpoint_read(manifest, c, &info, w, m, v, bn, info.num_bn_sets, loader, sizeof(loader), rng, sizeof(rng));
    CheckpointPartEntry* table = checkpoint_manifest_read_table(manifest, c, &fc, &info);
    for (int r = 0; r < P2; r++) {
        GPT* g = &run->ranks[r];
        memcpy(g->bn_stats, bn + (size_t)(r % info.num_bn_sets) * NB, NB * sizeof(float));
        if (tables) {  // every rank reads its own columns from the parts
            if (checkpoint_parts_read_tables_local(manifest, c, &info, table, &run->lay[r], run->w[r], run->m[r],
                                                   run->v[r]) != 0) {
                fprintf(stderr, "test_shard_tables: reading %s as rank %d of %d failed\n", manifest, r, P2);
                exit(1);
            }
        } else {
            memcpy(g->params, w, n * sizeof(float));
            g->m = alloc_floats(n);
            g->v = alloc_floats(n);
            memcpy(g->m, m, n * sizeof(float));
            memcpy(g->v, v, n * sizeof(float));
        }
    }
    free(table);
    free(w);
    free(m);
    free(v);
    free(bn);
}

typedef struct { const char* manifest; const ModelConfig* c; } LoadArg;
static void load_child(void* p) {
    const LoadArg* a = (const LoadArg*)p;
    Run run;
    run_resume(&run, a->c, 2, 1, a->manifest);
    run_free(&run);
}

static void flip_byte(const char* path, long at) {
    FILE* fp = fopen(path, "r+b");
    if (fp == NULL || fseek(fp, at, SEEK_SET) != 0) exit(2);
    int ch = fgetc(fp);
    fseek(fp, at, SEEK_SET);
    fputc(ch ^ 0x20, fp);
    fclose(fp);
}

// ----------------------------------------------------------------------------

static void compare(const ModelConfig* c, int P, float clip) {
    Run rep, tab;
    run_init(&rep, c, P, 0);
    run_init(&tab, c, P, 1);
    char name[200];
    size_t n = rep.ranks[0].num_params;
    if (clip == 0.0f) {
        snprintf(name, sizeof(name), "P=%d: init, the ranks' packed slices put together = the full draw", P);
        float* full = alloc_floats(n);
        int ok = 1;
        for (int r = 0; r < P; r++) {
            tables_assemble(&tab, 0, r, full);
            ok &= memcmp(full, rep.ranks[0].params, n * sizeof(float)) == 0;
        }
        test_checkf(ok && tab.lay[0].num_local == n - tab.lay[0].table_local * (P - 1), name,
                    "local %zu of %zu elements", tab.lay[0].num_local, n);
        free(full);
    }
    run_steps(&rep, c, 0, STEPS, clip);
    run_steps(&tab, c, 0, STEPS, clip);
    double worst = 0.0;
    int norms_bitwise = 1;
    for (int s = 0; s < STEPS; s++) {
        double d = fabs(tab.norm_sq[s] - rep.norm_sq[s]) / rep.norm_sq[s];
        if (!(d <= worst)) worst = d;
        norms_bitwise &= memcmp(&tab.norms[s], &rep.norms[s], sizeof(float)) == 0;
    }
    snprintf(name, sizeof(name), "P=%d clip=%g: norm^2 (replicated + slice partials in rank order)", P, clip);
    test_checkf(worst <= 1e-12 && tab.norms_agree, name, "worst relative difference %.2e (tol 1e-12), float norms %s",
                worst, norms_bitwise ? "bitwise equal" : "differ in rounding");
    snprintf(name, sizeof(name), "P=%d clip=%g: every rank's replicated tensors identical", P, clip);
    test_check(tables_replicated_agree(&tab), name);
    int bitwise = memcmp(tab.losses, rep.losses, sizeof(tab.losses)) == 0 && equal_state(&tab, &rep);
    if (clip == 0.0f || norms_bitwise) {
        snprintf(name, sizeof(name), "P=%d clip=%g: losses, weights, m, v bitwise the replicated run", P, clip);
        test_checkf(bitwise, name, "%d steps", STEPS);
    } else {
        float* w = alloc_floats(n);
        float *m = alloc_floats(n), *v = alloc_floats(n);
        run_state(&tab, w, m, v);
        RelErr we = rel_err(w, rep.ranks[0].params, n), le = rel_err(tab.losses, rep.losses, STEPS);
        snprintf(name, sizeof(name), "P=%d clip=%g: losses, weights within 1e-5", P, clip);
        test_checkf(we.rel <= 1e-5 && le.rel <= 1e-5, name, "weights %.2e, losses %.2e (norm rounding)", we.rel, le.rel);
        free(w);
        free(m);
        free(v);
    }
    run_free(&rep);
    run_free(&tab);
}

static void checkpoints(const ModelConfig* c, int P) {
    char dir[512], manifest[CHECKPOINT_PATH_MAX], name[200];
    snprintf(name, sizeof(name), "save%d", P);
    test_tmp_subdir(dir, sizeof(dir), name);
    Run straight, first;
    run_init(&straight, c, P, 1);
    run_steps(&straight, c, 0, STEPS, 0.0f);
    run_init(&first, c, P, 1);
    run_steps(&first, c, 0, SAVE_AT, 0.0f);
    save_tables(&first, c, dir, SAVE_AT, manifest);
    size_t n = first.ranks[0].num_params;
    float *w = alloc_floats(n), *m = alloc_floats(n), *v = alloc_floats(n);
    run_state(&first, w, m, v);
    // checkpoint_read: a replicated GPU run or the CPU trainer gets the whole state
    {
        ModelConfig fc;
        CheckpointInfo info;
        checkpoint_read_info(manifest, &fc, &info);
        float *w2 = alloc_floats(n), *m2 = alloc_floats(n), *v2 = alloc_floats(n);
        float* bn = alloc_floats(model_config_num_bn_stats(c) * info.num_bn_sets + 1);
        unsigned char loader[16], rng[8];
        checkpoint_read(manifest, c, &info, w2, m2, v2, bn, info.num_bn_sets, loader, sizeof(loader), rng, sizeof(rng));
        free(bn);
        snprintf(name, sizeof(name), "saved at P=%d: checkpoint_read gives the whole state bitwise", P);
        test_check(memcmp(w, w2, n * sizeof(float)) == 0 && memcmp(m, m2, n * sizeof(float)) == 0 &&
                   memcmp(v, v2, n * sizeof(float)) == 0 && info.shard_mode == SHARD_MODE_TABLES, name);
        free(w2);
        free(m2);
        free(v2);
    }
    for (int P2 = 1; P2 <= MAX_RANKS; P2++) {
        // each new rank's local state is the pack of the saved state
        Run tab2;
        run_resume(&tab2, c, P2, 1, manifest);
        int ok = 1;
        float* packed = alloc_floats(n);
        for (int r = 0; r < P2; r++) {
            const ExpertShardLayout* lay = &tab2.lay[r];
            const float* full[3] = {w, m, v};
            const float* got[3] = {tab2.w[r], tab2.m[r], tab2.v[r]};
            for (int k = 0; k < 3; k++) {
                expert_shard_local_pack(packed, full[k], sizeof(float), lay);
                ok &= memcmp(packed, got[k], lay->num_local * sizeof(float)) == 0;
            }
        }
        free(packed);
        snprintf(name, sizeof(name), "saved at P=%d, loaded at P'=%d: every rank's master, m, v bitwise", P, P2);
        test_check(ok, name);
        // resumed: the last steps
        run_steps(&tab2, c, SAVE_AT, STEPS, 0.0f);
        if (P2 == P) {
            snprintf(name, sizeof(name), "saved at P=%d, resumed at P: steps %d-%d bitwise the run without a stop", P,
                     SAVE_AT, STEPS - 1);
            test_check(equal_state(&tab2, &straight) &&
                       memcmp(tab2.losses + SAVE_AT, straight.losses + SAVE_AT, (STEPS - SAVE_AT) * sizeof(float)) == 0,
                       name);
        } else {
            Run rep2;
            run_resume(&rep2, c, P2, 0, manifest);
            run_steps(&rep2, c, SAVE_AT, STEPS, 0.0f);
            snprintf(name, sizeof(name), "saved at P=%d, resumed at P'=%d: bitwise a replicated run resumed there", P, P2);
            test_check(equal_state(&tab2, &rep2) &&
                       memcmp(tab2.losses + SAVE_AT, rep2.losses + SAVE_AT, (STEPS - SAVE_AT) * sizeof(float)) == 0,
                       name);
            run_free(&rep2);
        }
        run_free(&tab2);
    }
    if (P == 2) {  // a corrupt part is refused, naming it
        char part[CHECKPOINT_PATH_MAX + 64];
        checkpoint_part_path(part, sizeof(part), dir, SAVE_AT, 1, P);
        flip_byte(part, OMNI_HEADER_BYTES + 100);
        LoadArg arg = {manifest, c};
        test_expect_exit_failure("a flipped byte in part 1 of 2 is refused", load_child, &arg, "part1of2", "checksum");
    }
    free(w);
    free(m);
    free(v);
    run_free(&straight);
    run_free(&first);
}

// ----------------------------------------------------------------------------
// the gradient buckets of a rank (the CUDA trainer's model_grad_reducer_init): the slices of
// llmc/grad_slices.h without U and V, at their local offsets, must tile the rank's local buffer
// minus its table slices exactly once, in bucket order, each inside its own tensor

static void grad_buckets(const ModelConfig* c, int P) {
    for (int r = 0; r < P; r++) {
        ExpertShardLayout lay;
        expert_shard_layout(&lay, c, P, r);
        GradSlice* slices = (GradSlice*)malloc(grad_slices_max(c) * sizeof(GradSlice));
        unsigned char* hits = (unsigned char*)calloc(lay.num_local, 1);
        if (slices == NULL || hits == NULL) exit(2);
        const int n = grad_slices_build(c, slices);
        int tables = 0;
        for (int i = 0; i < n; i++) tables += expert_shard_is_table(slices[i].tensor);
        const int kept = expert_shard_grad_slices(&lay, slices, n);
        int bad = kept != n - tables || tables != 2 * c->num_layers;
        for (int i = 0; i < kept && !bad; i++) {
            const GradSlice* s = &slices[i];
            const size_t lo = lay.offsets[s->tensor], hi = lo + lay.sizes[s->tensor];
            bad |= expert_shard_is_table(s->tensor) || s->offset < lo || s->offset + s->count > hi ||
                   (i > 0 && s->bucket < slices[i - 1].bucket);
            for (size_t j = 0; j < s->count && !bad; j++) hits[s->offset + j]++;
        }
        for (int t = 0; t < NUM_PARAMETER_TENSORS && !bad; t++) {
            const unsigned char want = expert_shard_is_table(t) ? 0 : 1;
            for (size_t j = 0; j < lay.sizes[t]; j++) bad |= hits[lay.offsets[t] + j] != want;
        }
        char name[160];
        snprintf(name, sizeof(name), "P=%d rank %d: the gradient buckets without U, V tile the local buffer's "
                 "other tensors once", P, r);
        test_checkf(!bad, name, "%d slices of %d kept, %d of U and V", kept, n, tables);
        free(slices);
        free(hits);
    }
}

int main(void) {
    test_begin("test_shard_tables");
    test_tmp_begin("test_shard_tables");
    // C = 96: 12 column vectors, so P = 1, 2, 3, 4 all cut them; P = 3 is not a power of two
    TestDims dims = {16, 61, 64, 2, 2, 96, 128, 48};
    ModelConfig omni = test_config(dims, FFN_OMNI, 4, 3, ROUTER_NORM_BN, GATE_SOFTMAX);
    for (int P = 1; P <= MAX_RANKS; P++) grad_buckets(&omni, P);
    for (int P = 1; P <= MAX_RANKS; P++) {
        compare(&omni, P, 0.0f);
        compare(&omni, P, 0.05f);  // below the norm: clipping acts on every step
    }
    checkpoints(&omni, 2);
    checkpoints(&omni, 3);
    test_tmp_end();
    return test_end();
}
