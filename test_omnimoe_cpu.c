/*
 * test_omnimoe_cpu.c - tests of the CPU reference model (train_omnimoe.c), no GPU needed.
 *
 *   gradcheck_*    finite differences against backward for EVERY parameter tensor of every FFN
 *                  kind (gelu, swiglu, omni with BN on/off, both gates, k < n and k > n, BN in
 *                  eval mode; moe with and without the MoE++ experts, the balance loss included),
 *                  with random weights in every tensor and random tokens
 *   moe_*          the moe layer: its forward against float64, balance loss at uniform routing,
 *                  loss_scale, the bias update and its effect on selection, determinism
 *   topk_*         omni_topk against a brute-force sort of all N pairs (exact sums, ties, fp32)
 *   bn_*           router BatchNorm: running-statistics update and eval-mode forward
 *   padded_vocab   padded logit columns carry no probability mass and no gradient
 *   adamw          gpt_update against an independent double-precision AdamW with clipping
 *   overfit_*      a tiny model memorises one batch
 *   grad_accum_*   two micro-batches (loss_scale 0.5) give the bits of one batch of both
 *   determinism    two training runs, and runs with different thread counts, are bitwise equal
 *   bytes_bound    train_config_micro_batch_bytes_bound (llmc/args.h) above the CPU layout's and
 *                  the memory plan's bytes of a micro-batch, random configurations
 *
 * Prints one PASS/FAIL line per test with the measured error and the tolerance, and the closing
 * "test_omnimoe_cpu: N passed, N failed" (llmc/test_harness.h); exits non-zero when any test fails.
 * Build: gcc -O2 -Wall -Wextra -std=c11 -fopenmp test_omnimoe_cpu.c -lm
 */
#define TESTING
#include "train_omnimoe.c"
#include "llmc/memory_plan.h"
#include "llmc/test_harness.h"

static int verbose = 0;

// ----------------------------------------------------------------------------
// helpers

// random values in EVERY tensor (biases, LayerNorm weights too) and random BN running stats
static void randomize_model(GPT* model, uint64_t seed, float std) {
    Rng rng = rng_seeded(seed);
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) {
        size_t size = model->param_sizes[i];
        if (size == 0) continue;
        int is_ln_weight = i == PARAM_LN1W || i == PARAM_LN2W || i == PARAM_LNFW;
        rng_normal(&rng, model->param_tensors[i], size, is_ln_weight ? 1.0f : 0.0f, std);
    }
    int R = 2 * model->config.router_n;
    for (int l = 0; l < (model->num_bn_stats ? model->config.num_layers : 0); l++) {
        for (int c = 0; c < R; c++) {
            model->bn_stats[(size_t)l * 2 * R + c] = 0.5f * (rng_f32(&rng) - 0.5f);
            model->bn_stats[(size_t)l * 2 * R + R + c] = 0.5f + 1.5f * rng_f32(&rng);
        }
    }
}

static void random_tokens(int* out, size_t count, int V, uint64_t seed) {
    Rng rng = rng_seeded(seed);
    fill_tokens(out, count, V, &rng);
}

static const char* config_label(const ModelConfig* c, char* buf, size_t size) {
    if (c->ffn_kind == FFN_OMNI) {
        snprintf(buf, size, "omni n=%d k=%d %s %s", c->router_n, c->top_k, router_norm_name(c->router_norm),
                 gate_name(c->gate));
    } else if (c->ffn_kind == FFN_MOE) {
        snprintf(buf, size, "moe E=%d k=%d S=%d zero=%d copy=%d const=%d res=%d norm=%d router=%s xk=%d", c->moe_experts,
                 c->moe_topk, c->moe_shared, c->moe_zero, c->moe_copy, c->moe_const, c->moe_gate_res, c->moe_norm_topk,
                 c->moe_router == MOE_ROUTER_TANH ? "tanh" : "linear", c->moe_input_scale);
    } else {
        snprintf(buf, size, "%s", ffn_kind_name(c->ffn_kind));
    }
    return buf;
}

// ----------------------------------------------------------------------------
// finite-difference gradient checks
//
// Noise budget: the loss is a fp32 computation, so each evaluation carries a rounding error of
// about 1e-7 relative (~2e-7 absolute for a loss ~3; the loss used here is the mean of the
// per-token losses taken in double, so the final fp32 rounding of mean_loss adds nothing).
// A central difference with step h divides that by 2h. Each derivative is first estimated by
// Richardson extrapolation of central differences with steps 1e-2 and 5e-3 (truncation error
// O(h^4), noise ~3e-5 with weights ~0.3). Where that perturbation changes the experts some token
// selects (a top-k flip: the loss is not smooth there), it falls back to one central difference
// with step 1e-3 (noise ~1e-4, truncation h^2/6 |f'''| < 1e-5), and if that still flips, the
// entry is skipped; skips are counted and must stay below 10% of the estimates. Pass rule:
//     |analytic - fd| <= ATOL + RTOL * max(|analytic|, |fd|)
// with ATOL = 5e-4 (~5x the worst noise) and RTOL = 1e-2 for single entries; the derivative
// along a random direction of unit length (every entry of the tensor at once, so no entry goes
// unchecked) uses RTOL = 2e-3. The report line gives the worst err/tol (must be <= 1).

static const double FD_STEP = 1e-2;           // Richardson: steps FD_STEP and FD_STEP/2
static const double FD_FALLBACK_STEP = 1e-3;  // plain central difference after a top-k flip
static const double FD_ATOL = 5e-4;
static const double FD_RTOL = 1e-2;
static const double FD_DIR_RTOL = 2e-3;
static const int FD_ENTRIES_PER_TENSOR = 20;

typedef struct {
    GPT* model;
    const int* inputs;
    const int* targets;
    int B, T, training;
    int* base_sets;      // selected experts of the unperturbed model, sorted per (layer, token)
    size_t num_idx;      // L * BT * k
    int k;
    float* bn_backup;    // running stats to restore after every forward (training mode moves them)
    int flipped;         // the last evaluation selected different experts
    int fallbacks;       // derivatives that needed the small step
} FDContext;

static int cmp_int(const void* a, const void* b) {
    int x = *(const int*)a, y = *(const int*)b;
    return (x > y) - (x < y);
}

// the selected expert ids with each group of k sorted ascending
static int* expert_sets(const int* idx, size_t count, int k) {
    int* sets = alloc_ints(count);
    memcpy(sets, idx, count * sizeof(int));
    for (size_t g = 0; g < count; g += k) qsort(sets + g, k, sizeof(int), cmp_int);
    return sets;
}

static double fd_loss(FDContext* ctx) {
    GPT* model = ctx->model;
    gpt_forward(model, ctx->inputs, ctx->targets, ctx->B, ctx->T, ctx->training);
    memcpy(model->bn_stats, ctx->bn_backup, model->num_bn_stats * sizeof(float));
    ctx->flipped = 0;
    if (ctx->num_idx > 0) {
        // a different SET of experts makes the loss jump; a new order of the same set does not
        int* sets = expert_sets(model->config.ffn_kind == FFN_MOE ? model->acts.moe_idx : model->acts.topk_idx,
                                ctx->num_idx, ctx->k);
        ctx->flipped = memcmp(sets, ctx->base_sets, ctx->num_idx * sizeof(int)) != 0;
        free(sets);
    }
    size_t BT = (size_t)ctx->B * ctx->T;
    double sum = 0.0;
    for (size_t r = 0; r < BT; r++) sum += model->acts.losses[r];
    return sum / BT + model->moe_aux_loss;  // moe: the balance loss is part of the loss (0 otherwise)
}

// central difference of the loss along dir (or along params[index] when dir is NULL) with
// step h; *flipped is set when either side changed a top-k selection
static double central_difference(FDContext* ctx, float* tensor, const float* backup, size_t size, size_t index,
                                 const float* dir, double h, int* flipped) {
    double f[2];
    for (int side = 0; side < 2; side++) {
        double sgn = side == 0 ? 1.0 : -1.0;
        if (dir == NULL) tensor[index] = (float)(backup[index] + sgn * h);
        else for (size_t j = 0; j < size; j++) tensor[j] = (float)(backup[j] + sgn * h * dir[j]);
        f[side] = fd_loss(ctx);
        if (ctx->flipped) *flipped = 1;
    }
    memcpy(tensor, backup, size * sizeof(float));
    // divide by the step actually taken (a single weight moves by fp32-rounded amounts)
    double taken = dir == NULL ? (double)(float)(backup[index] + h) - (double)(float)(backup[index] - h) : 2.0 * h;
    return (f[0] - f[1]) / taken;
}

// derivative of the loss along dir (or d/d params[index]); returns 0 with *skipped on a flip
static double fd_derivative(FDContext* ctx, float* tensor, size_t size, size_t index, const float* dir,
                            int* skipped) {
    float* backup = (float*)malloc_check(size * sizeof(float));
    memcpy(backup, tensor, size * sizeof(float));
    int flipped = 0;
    double d1 = central_difference(ctx, tensor, backup, size, index, dir, FD_STEP, &flipped);
    double d2 = central_difference(ctx, tensor, backup, size, index, dir, FD_STEP / 2, &flipped);
    double result = (4.0 * d2 - d1) / 3.0;
    if (flipped) {
        ctx->fallbacks++;
        flipped = 0;
        result = central_difference(ctx, tensor, backup, size, index, dir, FD_FALLBACK_STEP, &flipped);
    }
    free(backup);
    *skipped = flipped;
    return flipped ? 0.0 : result;
}

// moe run settings of the next gradcheck (docs/design.md §10.3)
static float gradcheck_moe_aux = 0.0f, gradcheck_moe_tau = 1.0f;

// checks every parameter tensor of one configuration; one report line
static void gradcheck(const char* name, ModelConfig config, int B, int T, int training, uint64_t seed) {
    GPT model;
    gpt_build(&model, &config);
    randomize_model(&model, seed, 0.3f);
    int moe = config.ffn_kind == FFN_MOE;
    if (moe) {
        model.moe_aux_coef = gradcheck_moe_aux;
        model.moe_zc_weight = gradcheck_moe_tau;
        // a bias of the size of the probabilities: selection depends on both
        for (size_t i = 0; i < model.param_sizes[PARAM_MOE_BIAS]; i++) model.param_tensors[PARAM_MOE_BIAS][i] *= 0.1f;
    }
    int BT = B * T;
    int* inputs = (int*)malloc_check(BT * sizeof(int));
    int* targets = (int*)malloc_check(BT * sizeof(int));
    random_tokens(inputs, BT, config.vocab_size, seed + 1);
    random_tokens(targets, BT, config.vocab_size, seed + 2);

    int k = moe ? config.moe_topk : config.top_k;
    FDContext ctx = {&model, inputs, targets, B, T, training, NULL, 0, k, NULL, 0, 0};
    ctx.bn_backup = alloc_floats(model.num_bn_stats);
    memcpy(ctx.bn_backup, model.bn_stats, model.num_bn_stats * sizeof(float));

    // analytic gradient
    gpt_forward(&model, inputs, targets, B, T, training);
    memcpy(model.bn_stats, ctx.bn_backup, model.num_bn_stats * sizeof(float));
    gpt_zero_grad(&model);
    gpt_backward(&model, 1.0f);
    float* analytic = alloc_floats(model.num_params);
    memcpy(analytic, model.grads, model.num_params * sizeof(float));
    if (config.ffn_kind == FFN_OMNI || moe) {
        ctx.num_idx = (size_t)config.num_layers * BT * k;
        ctx.base_sets = expert_sets(moe ? model.acts.moe_idx : model.acts.topk_idx, ctx.num_idx, k);
    }
    int bias_grad_zero = 1;  // the balancing bias only selects: its gradient must be exactly 0
    for (size_t i = 0; moe && i < model.param_sizes[PARAM_MOE_BIAS]; i++)
        bias_grad_zero &= analytic[(size_t)(model.param_tensors[PARAM_MOE_BIAS] - model.params) + i] == 0.0f;

    Rng rng = rng_seeded(seed + 3);
    double worst_entry = 0.0, worst_dir = 0.0;  // error / tolerance, and directional rel error
    const char* worst_entry_tensor = "-";
    const char* worst_dir_tensor = "-";
    int checked = 0, skipped_total = 0, tensors = 0;
    size_t offset = 0;
    for (int t = 0; t < NUM_PARAMETER_TENSORS; t++) {
        size_t size = model.param_sizes[t];
        if (size == 0) continue;
        const float* g = analytic + offset;
        offset += size;
        if (t == PARAM_MOE_BIAS) continue;  // no gradient by design (checked above to be 0)
        tensors++;
        float* tensor = model.param_tensors[t];
        // entries: random ones (and all of them for small tensors)
        int count = size <= (size_t)FD_ENTRIES_PER_TENSOR ? (int)size : FD_ENTRIES_PER_TENSOR;
        for (int e = 0; e < count; e++) {
            size_t index = size <= (size_t)FD_ENTRIES_PER_TENSOR ? (size_t)e : rng_u32(&rng) % size;
            int skipped;
            double fd = fd_derivative(&ctx, tensor, size, index, NULL, &skipped);
            checked++;
            if (skipped) { skipped_total++; continue; }
            double err = fabs(g[index] - fd);
            double tol = FD_ATOL + FD_RTOL * fmax(fabs(g[index]), fabs(fd));
            if (verbose || err > tol) {
                printf("    %s[%zu]: analytic %.6e  fd %.6e  err %.2e  tol %.2e%s\n", param_tensor_name(t), index,
                       g[index], fd, err, tol, err > tol ? "  <-- FAIL" : "");
            }
            if (err / tol > worst_entry) { worst_entry = err / tol; worst_entry_tensor = param_tensor_name(t); }
        }
        // directional derivative along a random direction (retry on a flip)
        float* dir = alloc_floats(size);
        double rel = -1.0;
        for (int attempt = 0; attempt < 4 && rel < 0; attempt++) {
            // N(0, 1/size) entries: a direction of about unit length, so the whole tensor moves
            // about as far as one entry does in the entry checks (same top-k flip risk)
            rng_normal(&rng, dir, size, 0.0f, 1.0f / sqrtf((float)size));
            double analytic_dir = 0.0;
            for (size_t j = 0; j < size; j++) analytic_dir += (double)g[j] * dir[j];
            int skipped;
            double fd = fd_derivative(&ctx, tensor, size, 0, dir, &skipped);
            checked++;
            if (skipped) { skipped_total++; continue; }
            double tol = FD_ATOL + FD_DIR_RTOL * fmax(fabs(analytic_dir), fabs(fd));
            rel = fabs(analytic_dir - fd) / tol;
            if (verbose || rel > 1.0) {
                printf("    %s along a random direction: analytic %.6e  fd %.6e  err %.2e  tol %.2e%s\n",
                       param_tensor_name(t), analytic_dir, fd, fabs(analytic_dir - fd), tol, rel > 1.0 ? "  <-- FAIL" : "");
            }
        }
        if (rel < 0) rel = 1e9;  // every attempt flipped: counts as a failure
        if (rel > worst_dir) { worst_dir = rel; worst_dir_tensor = param_tensor_name(t); }
        free(dir);
    }
    int pass = worst_entry <= 1.0 && worst_dir <= 1.0 && skipped_total * 10 <= checked && bias_grad_zero;
    if (!bias_grad_zero) printf("    moe_bias has a non-zero gradient  <-- FAIL\n");
    char label[128];
    test_checkf(pass, name, "[%s, %d tensors] entries: worst err/tol %.3f (%s; tol %.0e + %.0e*|g|); "
           "random direction: worst err/tol %.3f (%s; tol %.0e + %.0e*|g.d|); small-step fallbacks %d, "
           "skips %d of %d (max 10%%)", config_label(&config, label, sizeof(label)), tensors, worst_entry,
           worst_entry_tensor, FD_ATOL, FD_RTOL, worst_dir, worst_dir_tensor, FD_ATOL, FD_DIR_RTOL, ctx.fallbacks,
           skipped_total, checked);
    free(analytic);
    free(ctx.base_sets);
    free(ctx.bn_backup);
    free(inputs);
    free(targets);
    gpt_free(&model);
}

// ----------------------------------------------------------------------------
// top-k against brute force

// the reference order, written independently of the model's ranks_before: score descending,
// then expert id ascending
static int cmp_scored(const void* a, const void* b) {
    const ScoredId* x = (const ScoredId*)a;
    const ScoredId* y = (const ScoredId*)b;
    if (x->score != y->score) return x->score > y->score ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id);
}

// mode 0: multiples of 2^-12 in [-16, 0] (every sum exact, few ties); mode 1: coarse levels
// (many equal sums); mode 2: log_softmax of normal logits (full fp32); mode 3: all values equal;
// mode 4: near-ties, two calls differ: pr a few ulps around -1 (odd call) and pc of a far larger
// magnitude (even call), so fp32 rounding makes rows of different pr score the same sum
static void fill_router_values(float* out, int n, int mode, Rng* rng) {
    static int near_tie_call = 0;
    if (mode == 4) {
        int rows = (near_tie_call++ % 2) == 0;
        for (int i = 0; i < n; i++) {
            if (rows) {
                float x = -1.0f;
                for (int u = (int)(rng_u32(rng) % 4); u > 0; u--) x = nextafterf(x, 0.0f);
                out[i] = x;
            } else {
                out[i] = -(float)(16 + rng_u32(rng) % 4);
            }
        }
        return;
    }
    if (mode == 0) {
        for (int i = 0; i < n; i++) out[i] = -(float)(rng_u32(rng) % 65536) / 4096.0f;
    } else if (mode == 1) {
        for (int i = 0; i < n; i++) out[i] = -0.5f * (float)(rng_u32(rng) % 4);
    } else if (mode == 2) {
        // log_softmax of N(0, 2^2) logits, as the router produces them
        rng_normal(rng, out, n, 0.0f, 2.0f);
        float maxval = -INFINITY, sum = 0.0f;
        for (int i = 0; i < n; i++) maxval = fmaxf(maxval, out[i]);
        for (int i = 0; i < n; i++) sum += expf(out[i] - maxval);
        float lse = maxval + logf(sum);
        for (int i = 0; i < n; i++) out[i] -= lse;
    } else {
        for (int i = 0; i < n; i++) out[i] = -1.25f;
    }
}

static void test_topk(void) {
    static const int ns[] = {1, 2, 3, 4, 5, 7, 8, 13, 16, 32, 64};
    static const char* mode_names[] = {"exact", "ties", "fp32", "all-equal", "near-ties"};
    Rng rng = rng_seeded(1234);
    for (int mode = 0; mode < 5; mode++) {
        int cases = 0, mismatches = 0;
        for (size_t ni = 0; ni < sizeof(ns) / sizeof(ns[0]); ni++) {
            int n = ns[ni], N = n * n;
            int ks[] = {1, 2, 3, n - 1, n, n + 1, 2 * n, 4 * n + 3, N - 1, N};
            for (size_t ki = 0; ki < sizeof(ks) / sizeof(ks[0]); ki++) {
                int k = ks[ki];
                if (k < 1 || k > N) continue;
                for (int rep = 0; rep < 20; rep++) {
                    float pr[n], pc[n];
                    fill_router_values(pr, n, mode, &rng);
                    fill_router_values(pc, n, mode, &rng);
                    int idx[k];
                    float score[k];
                    for (int m = 0; m < k; m++) { idx[m] = -1; score[m] = NAN; }  // poison
                    omni_topk(pr, pc, n, k, idx, score);
                    ScoredId* all = (ScoredId*)malloc_check((size_t)N * sizeof(ScoredId));
                    for (int i = 0; i < n; i++) {
                        for (int j = 0; j < n; j++) {
                            all[i * n + j].score = pr[i] + pc[j];
                            all[i * n + j].id = i * n + j;
                        }
                    }
                    qsort(all, N, sizeof(ScoredId), cmp_scored);
                    int bad = 0;
                    for (int m = 0; m < k; m++) {
                        if (idx[m] != all[m].id || memcmp(&score[m], &all[m].score, sizeof(float)) != 0) bad = 1;
                    }
                    if (bad && mismatches < 3) {
                        printf("    mismatch: mode %s n=%d k=%d, first ids got/want:", mode_names[mode], n, k);
                        for (int m = 0; m < k && m < 8; m++) printf(" %d/%d", idx[m], all[m].id);
                        printf("\n");
                    }
                    mismatches += bad;
                    cases++;
                    free(all);
                }
            }
        }
        char name[64];
        snprintf(name, sizeof(name), "topk_vs_bruteforce_%s", mode_names[mode]);
        test_checkf(mismatches == 0, name, "%d cases (n 1..64, k 1..N incl. k > n and k = N): %d with ids/scores "
               "not identical to the sorted scan of all N pairs (tol 0)", cases, mismatches);
    }
}

// ----------------------------------------------------------------------------
// router BatchNorm: running statistics and eval mode

static void test_batchnorm(void) {
    ModelConfig config = test_config(TEST_DIMS_TINY, FFN_OMNI, 4, 3, ROUTER_NORM_BN, GATE_SOFTMAX);
    GPT model;
    gpt_build(&model, &config);
    randomize_model(&model, 77, 0.3f);
    int B = 2, T = 5, BT = B * T, R = 2 * config.router_n, L = config.num_layers, C = config.channels;
    int inputs[10], targets[10];
    random_tokens(inputs, BT, config.vocab_size, 78);
    random_tokens(targets, BT, config.vocab_size, 79);

    // training mode, twice: running stats move with momentum 0.1 towards batch mean / unbiased var
    double worst_stat = 0.0, worst_norm = 0.0;
    for (int step = 0; step < 2; step++) {
        float* before = alloc_floats(model.num_bn_stats);
        memcpy(before, model.bn_stats, model.num_bn_stats * sizeof(float));
        gpt_forward(&model, inputs, targets, B, T, 1);
        for (int l = 0; l < L; l++) {
            const float* x = model.acts.ln2 + (size_t)l * BT * C;
            const float* w = model.param_tensors[PARAM_ROUTERW] + (size_t)l * R * C;
            for (int c = 0; c < R; c++) {
                double logit[10], mean = 0.0, sq = 0.0;
                for (int r = 0; r < BT; r++) {
                    logit[r] = 0.0;
                    for (int i = 0; i < C; i++) logit[r] += (double)x[r * C + i] * w[c * C + i];
                    mean += logit[r];
                }
                mean /= BT;
                for (int r = 0; r < BT; r++) sq += (logit[r] - mean) * (logit[r] - mean);
                double want_mean = 0.9 * before[l * 2 * R + c] + 0.1 * mean;
                double want_var = 0.9 * before[l * 2 * R + R + c] + 0.1 * sq / (BT - 1);
                double e1 = fabs(model.bn_stats[l * 2 * R + c] - want_mean) / fmax(fabs(want_mean), 1e-2);
                double e2 = fabs(model.bn_stats[l * 2 * R + R + c] - want_var) / want_var;
                worst_stat = fmax(worst_stat, fmax(e1, e2));
                for (int r = 0; r < BT; r++) {
                    double want = (logit[r] - mean) / sqrt(sq / BT + 1e-5);  // biased variance normalises
                    double got = model.acts.router_normed[(size_t)l * BT * R + r * R + c];
                    worst_norm = fmax(worst_norm, fabs(got - want));
                }
            }
        }
        free(before);
    }
    test_checkf(worst_stat < 1e-5 && worst_norm < 1e-4, "bn_running_stats_update",
           "2 training steps: running mean/var vs 0.9*old + 0.1*(batch mean, unbiased var): max rel err %.1e "
           "(tol 1e-5); batch-normalised router logits max abs err %.1e (tol 1e-4)", worst_stat, worst_norm);

    // eval mode: running stats used and unchanged; each sequence independent of the rest
    float* frozen = alloc_floats(model.num_bn_stats);
    memcpy(frozen, model.bn_stats, model.num_bn_stats * sizeof(float));
    gpt_forward(&model, inputs, targets, B, T, 0);
    int unchanged = memcmp(frozen, model.bn_stats, model.num_bn_stats * sizeof(float)) == 0;
    double worst_eval = 0.0;
    for (int l = 0; l < L; l++) {
        const float* x = model.acts.ln2 + (size_t)l * BT * C;
        const float* w = model.param_tensors[PARAM_ROUTERW] + (size_t)l * R * C;
        for (int r = 0; r < BT; r++) {
            for (int c = 0; c < R; c++) {
                double logit = 0.0;
                for (int i = 0; i < C; i++) logit += (double)x[r * C + i] * w[c * C + i];
                double want = (logit - frozen[l * 2 * R + c]) / sqrt(frozen[l * 2 * R + R + c] + 1e-5);
                worst_eval = fmax(worst_eval, fabs(model.acts.router_normed[(size_t)l * BT * R + r * R + c] - want));
            }
        }
    }
    size_t Vp = config.padded_vocab_size;
    float* logits_b2 = alloc_floats(BT * Vp);
    memcpy(logits_b2, model.logits, BT * Vp * sizeof(float));
    gpt_forward(&model, inputs, targets, 1, T, 0);  // the first sequence alone
    int independent = memcmp(logits_b2, model.logits, (size_t)T * Vp * sizeof(float)) == 0;
    // in training mode the same comparison must differ: batch statistics couple the sequences
    gpt_forward(&model, inputs, targets, B, T, 1);
    memcpy(logits_b2, model.logits, BT * Vp * sizeof(float));
    gpt_forward(&model, inputs, targets, 1, T, 1);
    double coupled = 0.0;
    for (size_t i = 0; i < (size_t)T * Vp; i++) coupled = fmax(coupled, fabs(logits_b2[i] - model.logits[i]));
    test_checkf(unchanged && worst_eval < 1e-4 && independent && coupled > 1e-4, "bn_eval_mode",
           "running stats unchanged: %s; (x-running_mean)/sqrt(running_var+eps) max abs err %.1e (tol 1e-4); "
           "sequence 0 logits with/without sequence 1: eval bitwise equal: %s, training max diff %.1e (must be > 1e-4)",
           unchanged ? "yes" : "NO", worst_eval, independent ? "yes" : "NO", coupled);
    free(frozen);
    free(logits_b2);
    gpt_free(&model);
}

// ----------------------------------------------------------------------------
// padded vocabulary columns: no probability mass, no gradient

static void test_padded_vocab(void) {
    ModelConfig config = test_config(TEST_DIMS_TINY, FFN_OMNI, 3, 4, ROUTER_NORM_BN, GATE_SOFTMAX);
    GPT model;
    gpt_build(&model, &config);
    randomize_model(&model, 91, 0.3f);
    int B = 2, T = 6, BT = B * T, V = config.vocab_size, Vp = config.padded_vocab_size, C = config.channels;
    int inputs[12], targets[12];
    random_tokens(inputs, BT, V, 92);
    random_tokens(targets, BT, V, 93);
    gpt_forward(&model, inputs, targets, B, T, 1);
    float loss1 = model.mean_loss;
    gpt_zero_grad(&model);
    gpt_backward(&model, 1.0f);
    double padded_grad = 0.0;
    for (size_t i = (size_t)V * C; i < (size_t)Vp * C; i++) padded_grad = fmax(padded_grad, fabs(model.grad_tensors[PARAM_WTE][i]));
    // scale the padded wte rows (so the padded logits change a lot); the loss must not move
    for (size_t i = (size_t)V * C; i < (size_t)Vp * C; i++) model.param_tensors[PARAM_WTE][i] *= 50.0f;
    gpt_forward(&model, inputs, targets, B, T, 1);
    float loss2 = model.mean_loss;
    // the logits exist for every padded column and are the wte dot products
    double col_err = 0.0;
    for (int r = 0; r < BT; r++) {
        for (int v = V; v < Vp; v++) {
            double dot = 0.0;
            for (int i = 0; i < C; i++) dot += (double)model.acts.lnf[r * C + i] * model.param_tensors[PARAM_WTE][v * C + i];
            col_err = fmax(col_err, fabs(model.logits[(size_t)r * Vp + v] - dot) / fmax(1.0, fabs(dot)));
        }
    }
    test_checkf(padded_grad == 0.0 && loss1 == loss2 && col_err < 1e-5, "padded_vocab",
           "padded wte rows: max |grad| %.1e (tol 0); loss with padded rows x50: %.7f vs %.7f (must be bitwise equal); "
           "padded logit columns vs lnf.wte max rel err %.1e (tol 1e-5)", padded_grad, loss1, loss2, col_err);
    gpt_free(&model);
}

// ----------------------------------------------------------------------------
// sampling: the draw follows softmax over the real vocabulary, never a padded column

static void test_sampler(void) {
    // sample_softmax against the inverse CDF computed here, on a fixed grid of coins; the padded
    // columns after V (three here) hold the largest logits, so any mass given to them would show
    const int V = 5;
    const float logits[8] = {0.5f, -1.0f, 2.0f, 1.0f, -0.25f, 9.0f, 9.0f, 9.0f};
    double p[5], sum = 0.0;
    for (int v = 0; v < V; v++) { p[v] = exp((double)logits[v]); sum += p[v]; }
    int coin_errors = 0;
    for (int i = 0; i < 1000; i++) {
        float coin = (i + 0.5f) / 1000.0f;
        double cdf = 0.0;
        int want = V - 1;
        for (int v = 0; v < V; v++) {
            cdf += p[v] / sum;
            if (coin < cdf) { want = v; break; }
        }
        coin_errors += sample_softmax(logits, V, coin) != want;
    }
    // the trainer's sampler on a model whose padded wte rows are x50 (padded logits dominate)
    ModelConfig config = test_config(TEST_DIMS_TINY, FFN_OMNI, 3, 4, ROUTER_NORM_BN, GATE_SOFTMAX);
    GPT model;
    gpt_build(&model, &config);
    randomize_model(&model, 95, 0.3f);
    const int C = config.channels, Vm = config.vocab_size, Vpm = config.padded_vocab_size;
    for (size_t i = (size_t)Vm * C; i < (size_t)Vpm * C; i++) model.param_tensors[PARAM_WTE][i] *= 50.0f;
    Tokenizer tokenizer;
    memset(&tokenizer, 0, sizeof(tokenizer));  // not loaded: tokens print as <id>
    Rng rng = rng_seeded(96);
    const int gen = config.max_seq_len;
    int tokens[64];
    int padded_drawn = 0;
    for (int round = 0; round < 8; round++) {
        sample_and_print(&model, &tokenizer, &rng, gen, tokens);
        for (int t = 0; t < gen; t++) padded_drawn += tokens[t] < 0 || tokens[t] >= Vm;
    }
    test_checkf(coin_errors == 0 && padded_drawn == 0 && Vpm > Vm, "sampler",
           "1000 coins vs the inverse CDF of softmax(logits[0..V)): %d differ (tol 0); %d of %d sampled tokens "
           "outside the real vocabulary of %d (padded to %d, padded rows x50) (tol 0)",
           coin_errors, padded_drawn, 8 * gen, Vm, Vpm);
    gpt_free(&model);
}

// ----------------------------------------------------------------------------
// AdamW against an independent double-precision implementation

static void test_adamw(void) {
    ModelConfig config = test_config(TEST_DIMS_TINY, FFN_OMNI, 3, 2, ROUTER_NORM_BN, GATE_SOFTMAX);
    GPT model;
    gpt_build(&model, &config);
    randomize_model(&model, 101, 0.3f);
    size_t P = model.num_params;
    double* p = (double*)malloc_check(P * sizeof(double));
    double* m = (double*)calloc_check(P, sizeof(double));
    double* v = (double*)calloc_check(P, sizeof(double));
    for (size_t i = 0; i < P; i++) p[i] = model.params[i];
    Rng rng = rng_seeded(102);
    const double lr = 1e-2, b1 = 0.9, b2 = 0.95, eps = 1e-8, wd = 0.1, clip = 1.0;
    double worst = 0.0, worst_norm = 0.0;
    for (int t = 1; t <= 3; t++) {
        // step 1 and 3 have a norm above the clip (clipped), step 2 below it
        float scale = t == 2 ? 0.001f : 0.05f;
        rng_normal(&rng, model.grads, P, 0.0f, scale);
        double norm = 0.0;
        for (size_t i = 0; i < P; i++) norm += (double)model.grads[i] * model.grads[i];
        norm = sqrt(norm);
        double gscale = norm > clip ? clip / norm : 1.0;
        float got_norm = gpt_update(&model, (float)lr, (float)b1, (float)b2, (float)eps, (float)wd, (float)clip, t);
        worst_norm = fmax(worst_norm, fabs(got_norm - norm) / norm);
        size_t offset = 0;
        for (int tensor = 0; tensor < NUM_PARAMETER_TENSORS; tensor++) {
            double decay = param_is_decayed(tensor) ? wd : 0.0;
            for (size_t j = offset; j < offset + model.param_sizes[tensor]; j++) {
                double g = model.grads[j] * gscale;
                m[j] = b1 * m[j] + (1 - b1) * g;
                v[j] = b2 * v[j] + (1 - b2) * g * g;
                double mh = m[j] / (1 - pow(b1, t)), vh = v[j] / (1 - pow(b2, t));
                p[j] -= lr * (mh / (sqrt(vh) + eps) + decay * p[j]);
                worst = fmax(worst, fabs(model.params[j] - p[j]) / fmax(fabs(p[j]), 1e-2));
            }
            offset += model.param_sizes[tensor];
        }
    }
    test_checkf(worst < 1e-5 && worst_norm < 1e-6, "adamw_update",
           "3 AdamW steps (clipped, unclipped, clipped; wd on matrices only) vs double reference: params max rel err "
           "%.1e (tol 1e-5), grad norm rel err %.1e (tol 1e-6)", worst, worst_norm);
    free(p);
    free(m);
    free(v);
    gpt_free(&model);
}

// ----------------------------------------------------------------------------
// a small model (TEST_DIMS_SMALL, omni n=4 k=4) memorises one batch

static const float OVERFIT_MAX_LOSS = 0.05f;
static const int OVERFIT_STEPS = 100;

static void test_overfit(int ffn_kind) {
    ModelConfig config = test_config(TEST_DIMS_SMALL, ffn_kind, 4, 4, ROUTER_NORM_BN, GATE_SOFTMAX);
    GPT model;
    gpt_build(&model, &config);
    gpt_init_random(&model, 42);
    int B = 4, T = 16, BT = B * T;
    int inputs[64], targets[64];
    random_tokens(inputs, BT, config.vocab_size, 43);
    random_tokens(targets, BT, config.vocab_size, 44);
    float first = 0.0f, last = 0.0f;
    for (int step = 1; step <= OVERFIT_STEPS; step++) {
        gpt_forward(&model, inputs, targets, B, T, 1);
        if (step == 1) first = model.mean_loss;
        gpt_zero_grad(&model);
        gpt_backward(&model, 1.0f);
        gpt_update(&model, 1e-2f, 0.9f, 0.95f, 1e-8f, 0.0f, 1.0f, step);
    }
    gpt_forward(&model, inputs, targets, B, T, 0);  // eval mode: running statistics
    last = model.mean_loss;
    gpt_forward(&model, inputs, targets, B, T, 1);
    float last_train = model.mean_loss;
    char name[64];
    snprintf(name, sizeof(name), "overfit_one_batch_%s", ffn_kind_name(ffn_kind));
    test_checkf(last_train < OVERFIT_MAX_LOSS && first > 3.5f, name,
           "%d AdamW steps (lr 1e-2) on B=4 T=16 random tokens, V=64: loss %.3f -> %.4f (batch stats), %.4f (eval "
           "mode); must end below %.2f", OVERFIT_STEPS, first, last_train, last, OVERFIT_MAX_LOSS);
    gpt_free(&model);
}

// ----------------------------------------------------------------------------
// gradient accumulation: 2 micro-batches x loss_scale 0.5 == one batch of both sequences

static void test_grad_accum(ModelConfig config, int expect_equal) {
    int T = 8, B = 2, BT = B * T;
    int inputs[16], targets[16];
    random_tokens(inputs, BT, config.vocab_size, 201);
    random_tokens(targets, BT, config.vocab_size, 202);
    GPT one, two;
    gpt_build(&one, &config);
    gpt_build(&two, &config);
    randomize_model(&one, 200, 0.3f);
    randomize_model(&two, 200, 0.3f);
    gpt_zero_grad(&one);
    gpt_forward(&one, inputs, targets, B, T, 1);
    gpt_backward(&one, 1.0f);
    gpt_zero_grad(&two);
    for (int micro = 0; micro < 2; micro++) {
        gpt_forward(&two, inputs + micro * T, targets + micro * T, 1, T, 1);
        gpt_backward(&two, 0.5f);
    }
    // Every weight gradient is added row by row in token order, so micro-batching gives the same
    // bits - except the tied wte, which gets the LM-head sum and the embedding sum: one batch
    // adds (head s0, head s1, emb s0, emb s1), two micro-batches (head s0, emb s0, head s1, emb s1)
    double max_diff = 0.0, max_grad = 0.0, wte_diff = 0.0, wte_max = 0.0;
    size_t wte_size = one.param_sizes[PARAM_WTE];  // wte is the first tensor of the layout
    for (size_t i = 0; i < one.num_params; i++) {
        double d = fabs(one.grads[i] - two.grads[i]);
        if (i < wte_size) { wte_diff = fmax(wte_diff, d); wte_max = fmax(wte_max, fabs(one.grads[i])); }
        max_diff = fmax(max_diff, d);
        max_grad = fmax(max_grad, fabs(one.grads[i]));
    }
    int bitwise = memcmp(one.grads + wte_size, two.grads + wte_size, (one.num_params - wte_size) * sizeof(float)) == 0;
    double wte_rel = wte_diff / wte_max;
    // and the update that follows: bitwise equal outside wte; wte moves by lr ~ 1e-3 per entry and
    // its ulp-level gradient differences may move the result by an ulp of the parameter (~3e-8).
    // No clipping here: the global norm includes wte, so its ulp differences would reach every
    // tensor through the clip factor (clipping itself is checked by adamw_update)
    gpt_update(&one, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 0.0f, 1);
    gpt_update(&two, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 0.0f, 1);
    int params_bitwise = memcmp(one.params + wte_size, two.params + wte_size,
                                (one.num_params - wte_size) * sizeof(float)) == 0;
    double wte_param_diff = 0.0;
    for (size_t i = 0; i < wte_size; i++) wte_param_diff = fmax(wte_param_diff, fabs(one.params[i] - two.params[i]));
    char name[64], label[96];
    config_label(&config, label, sizeof(label));
    snprintf(name, sizeof(name), "grad_accum_%s", expect_equal ? ffn_kind_name(config.ffn_kind) : "omni_bn");
    if (expect_equal) {
        test_checkf(bitwise && wte_rel <= 1e-6 && params_bitwise && wte_param_diff <= 1e-7, name, "[%s] 2 micro-batches "
               "(B=1, loss_scale 0.5) vs 1 batch (B=2): grads of all tensors but wte bitwise equal: %s; tied wte max "
               "diff %.1e of max |grad| (tol 1e-6, summation order); after one AdamW step: params but wte bitwise "
               "equal: %s, wte max diff %.1e (tol 1e-7)", label, bitwise ? "yes" : "NO", wte_rel,
               params_bitwise ? "yes" : "NO", wte_param_diff);
    } else {
        // with BN each micro-batch normalises with its own statistics: different by design
        test_checkf(max_diff > 1e-5 * max_grad, name, "[%s] differs by design (per-micro-batch BN statistics): max abs "
               "diff %.1e vs max |grad| %.1e (must be > 1e-5 relative)", label, max_diff, max_grad);
    }
    gpt_free(&one);
    gpt_free(&two);
}

// ----------------------------------------------------------------------------
// determinism: bitwise identical runs, also with different thread counts

static void train_a_few_steps(GPT* model, int steps) {
    ModelConfig config = test_config(TEST_DIMS_SMALL, FFN_OMNI, 4, 4, ROUTER_NORM_BN, GATE_SOFTMAX);
    gpt_build(model, &config);
    gpt_init_random(model, 7);
    int B = 4, T = 32, BT = B * T;
    int tokens[2 * 128 + 1];
    for (int step = 1; step <= steps; step++) {
        random_tokens(tokens, 2 * BT + 1, config.vocab_size, 300 + step);
        for (int micro = 0; micro < 2; micro++) {
            gpt_forward(model, tokens + micro * BT, tokens + micro * BT + 1, B, T, 1);
            if (micro == 0) gpt_zero_grad(model);
            gpt_backward(model, 0.5f);
        }
        gpt_update(model, 3e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 1.0f, step);
    }
    gpt_forward(model, tokens, tokens + 1, B, T, 0);
}

static int same_model_bits(const GPT* a, const GPT* b) {
    return memcmp(a->params, b->params, a->num_params * sizeof(float)) == 0 &&
           memcmp(a->grads, b->grads, a->num_params * sizeof(float)) == 0 &&
           memcmp(a->m, b->m, a->num_params * sizeof(float)) == 0 &&
           memcmp(a->v, b->v, a->num_params * sizeof(float)) == 0 &&
           memcmp(a->bn_stats, b->bn_stats, a->num_bn_stats * sizeof(float)) == 0 &&
           memcmp(a->logits, b->logits, (size_t)a->B * a->T * a->config.padded_vocab_size * sizeof(float)) == 0;
}

static void test_determinism(void) {
    GPT a, b;
    int threads_a = 1, threads_b = 1;
#ifdef _OPENMP
    int default_threads = omp_get_max_threads();
    threads_a = default_threads;
#endif
    train_a_few_steps(&a, 3);
    train_a_few_steps(&b, 3);
    int same_run = same_model_bits(&a, &b);
    gpt_free(&b);
#ifdef _OPENMP
    // an odd thread count splits every loop differently from the default
    threads_b = default_threads == 3 ? 5 : 3;
    omp_set_num_threads(threads_b);
    train_a_few_steps(&b, 3);
    omp_set_num_threads(1);
    GPT c;
    train_a_few_steps(&c, 3);
    omp_set_num_threads(default_threads);
    int same_threads = same_model_bits(&a, &b) && same_model_bits(&a, &c);
    gpt_free(&c);
    test_checkf(same_run && same_threads, "determinism", "3 omni training steps (2 micro-batches each): two runs bitwise "
           "equal: %s; with %d, %d and 1 OpenMP threads bitwise equal (params, grads, m, v, BN stats, logits): %s",
           same_run ? "yes" : "NO", threads_a, threads_b, same_threads ? "yes" : "NO");
#else
    (void)threads_b;
    test_checkf(same_run, "determinism", "3 omni training steps: two runs bitwise equal: %s (built without OpenMP)",
           same_run ? "yes" : "NO");
#endif
    gpt_free(&a);
    gpt_free(&b);
}

// ----------------------------------------------------------------------------
// initialisation follows param_init_std

static void test_init(void) {
    ModelConfig config = test_config(TEST_DIMS_SMALL, FFN_OMNI, 4, 4, ROUTER_NORM_BN, GATE_SOFTMAX);
    GPT model;
    gpt_build(&model, &config);
    gpt_init_random(&model, 5);
    double worst = 0.0;
    int exact_ok = 1;
    for (int t = 0; t < NUM_PARAMETER_TENSORS; t++) {
        size_t size = model.param_sizes[t];
        if (size == 0) continue;
        float want = param_init_std(&config, t);
        const float* p = model.param_tensors[t];
        if (want > 0.0f) {
            double sq = 0.0, mean = 0.0;
            for (size_t j = 0; j < size; j++) { sq += (double)p[j] * p[j]; mean += p[j]; }
            double std = sqrt(sq / size);
            // a sample std of `size` normals is off by about 1/sqrt(2 size) relative
            double tol = 5.0 / sqrt(2.0 * size);
            worst = fmax(worst, fabs(std - want) / want / tol);
        } else {
            for (size_t j = 0; j < size; j++) if (p[j] != (want == -1.0f ? 1.0f : 0.0f)) exact_ok = 0;
        }
    }
    test_checkf(worst <= 1.0 && exact_ok, "init_param_std", "sample std vs param_init_std: worst |err| / (5/sqrt(2 size)) = "
           "%.2f (tol 1); LayerNorm weights 1 and biases 0 exactly: %s", worst, exact_ok ? "yes" : "NO");
    gpt_free(&model);
}

// ----------------------------------------------------------------------------
// moe layer (docs/design.md §10)

// a TEST_DIMS_TINY model with moe FFN layers: E FFN experts of width 6, k per token, S shared,
// and the MoE++ expert counts
static ModelConfig moe_test_config(TestDims d, int E, int k, int S, int zero, int copy, int cnst, int gate_res,
                                   int norm_topk) {
    return test_moe_config(d, 6, E, k, S, zero, copy, cnst, gate_res, norm_topk);
}

// With a zero router every p_{t,i} = 1/E_t, so sum_i eta_i f_i P_i = sum_i eta_i c_i / (k BT):
// alpha exactly when every eta is 1 (any selection), and the eta-weighted share of the pairs
// otherwise. An independent check of the balance loss's normalisation; mean_loss = CE + L_aux.
static void test_moe_aux_uniform(void) {
    ModelConfig config = moe_test_config(TEST_DIMS_TINY, 3, 2, 1, 1, 1, 1, 1, 1);
    GPT model;
    gpt_build(&model, &config);
    randomize_model(&model, 61, 0.3f);
    memset(model.param_tensors[PARAM_MOE_ROUTERW], 0, model.param_sizes[PARAM_MOE_ROUTERW] * sizeof(float));
    memset(model.param_tensors[PARAM_MOE_GATEMAP], 0, model.param_sizes[PARAM_MOE_GATEMAP] * sizeof(float));
    int B = 2, T = 8, BT = B * T;
    int inputs[16], targets[16];
    random_tokens(inputs, BT, config.vocab_size, 62);
    random_tokens(targets, BT, config.vocab_size, 63);
    double worst = 0.0, loss_err = 0.0;
    float taus[2] = {1.0f, 0.25f};
    for (int v = 0; v < 2; v++) {
        model.moe_aux_coef = 0.3f;
        model.moe_zc_weight = taus[v];
        gpt_forward(&model, inputs, targets, B, T, 1);
        double want = 0.0, ce = 0.0;
        for (int l = 0; l < config.num_layers; l++) {
            long long weighted_pairs = 0;
            const int* idx = model.acts.moe_idx + (size_t)l * BT * config.moe_topk;
            for (int q = 0; q < BT * config.moe_topk; q++) weighted_pairs += idx[q] < config.moe_experts ? 4 : (int)(4 * taus[v]);
            want += 0.3 * (double)weighted_pairs / 4.0 / ((double)config.moe_topk * BT);
        }
        for (int r = 0; r < BT; r++) ce += model.acts.losses[r];
        worst = fmax(worst, fabs(model.moe_aux_loss - want) / want);
        loss_err = fmax(loss_err, fabs(model.mean_loss - (ce / BT + want)));
    }
    test_checkf(worst <= 1e-6 && loss_err <= 1e-5, "moe_aux_uniform_router", "zero router, alpha 0.3, tau 1 and 0.25: "
                "L_aux vs alpha * (eta-weighted pairs) / (k BT): worst rel err %.1e (tol 1e-6); mean_loss - (CE + L_aux) "
                "%.1e (tol 1e-5)", worst, loss_err);
    gpt_free(&model);
}

// The moe layer's forward against a direct float64 computation written from docs/design.md §10.2
// (router with the gating residual, softmax, top-k of p + b, gates, every expert kind, the shared
// SwiGLU, k x): the FFN output of every token of both layers, for DeepSeekMoE's and MoE++'s choices.
static double silu_d(double v) { return v / (1.0 + exp(-v)); }

static double moe_forward_max_error(const ModelConfig* config, uint64_t seed) {
    GPT model;
    gpt_build(&model, config);
    randomize_model(&model, seed, 0.3f);
    for (size_t i = 0; i < model.param_sizes[PARAM_MOE_BIAS]; i++) model.param_tensors[PARAM_MOE_BIAS][i] *= 0.1f;
    int B = 2, T = 8, BT = B * T, inputs[16];
    random_tokens(inputs, BT, config->vocab_size, seed + 1);
    gpt_forward(&model, inputs, NULL, B, T, 0);
    const ModelConfig* c = config;
    int C = c->channels, Et = model_config_moe_routed(c), k = c->moe_topk, Ie = c->ffn_hidden, E = c->moe_experts;
    int H = c->moe_shared * Ie, RH = 8 * Et;
    double* z = (double*)calloc_check((size_t)BT * Et, sizeof(double));       // this layer's logits
    double* z_prev = (double*)calloc_check((size_t)BT * Et, sizeof(double));  // the layer below's
    double worst = 0.0;
    for (int l = 0; l < c->num_layers; l++) {
        float** p = model.param_tensors;
        const float* Wr = p[PARAM_MOE_ROUTERW] + (size_t)l * (c->moe_router ? RH : Et) * C;
        const float* bias = p[PARAM_MOE_BIAS] + (size_t)l * Et;
        for (int r = 0; r < BT; r++) {
            const float* x = model.acts.ln2 + ((size_t)l * BT + r) * C;
            double* zr = z + (size_t)r * Et;
            for (int i = 0; i < Et; i++) {
                double acc = 0.0;
                if (c->moe_router == MOE_ROUTER_TANH) {
                    const float* W2r = p[PARAM_MOE_ROUTER2] + ((size_t)l * Et + i) * RH;
                    for (int j = 0; j < RH; j++) {
                        double u = 0.0;
                        for (int q = 0; q < C; q++) u += (double)Wr[(size_t)j * C + q] * x[q];
                        acc += W2r[j] * tanh(u);
                    }
                } else {
                    for (int q = 0; q < C; q++) acc += (double)Wr[(size_t)i * C + q] * x[q];
                }
                if (c->moe_gate_res && l > 0) {
                    const float* G = p[PARAM_MOE_GATEMAP] + ((size_t)l * Et + i) * Et;
                    for (int j = 0; j < Et; j++) acc += G[j] * z_prev[(size_t)r * Et + j];
                }
                zr[i] = acc;
            }
            double mx = zr[0], sum = 0.0, prob[64], score[64];
            for (int i = 1; i < Et; i++) mx = fmax(mx, zr[i]);
            for (int i = 0; i < Et; i++) sum += exp(zr[i] - mx);
            for (int i = 0; i < Et; i++) { prob[i] = exp(zr[i] - mx) / sum; score[i] = prob[i] + bias[i]; }
            int chosen[64], used[64] = {0};
            for (int m = 0; m < k; m++) {  // the best unused score, ties to the smaller id
                int best = -1;
                for (int i = 0; i < Et; i++) if (!used[i] && (best < 0 || score[i] > score[best])) best = i;
                used[best] = 1;
                chosen[m] = best;
            }
            double D = 0.0, out[64] = {0};
            for (int m = 0; m < k; m++) if (chosen[m] < E + c->moe_const + c->moe_copy) D += prob[chosen[m]];
            double s = c->moe_input_scale ? k : 1.0;
            for (int m = 0; m < k; m++) {
                int e = chosen[m];
                int zero = e >= E + c->moe_const + c->moe_copy;
                double g = !c->moe_norm_topk ? prob[e] : (zero ? 0.0 : prob[e] / D);
                double y[64];
                if (e < E) {  // SwiGLU expert
                    const float* W1 = p[PARAM_MOE_W1] + ((size_t)l * E + e) * 2 * Ie * C;
                    const float* W2 = p[PARAM_MOE_W2] + ((size_t)l * E + e) * C * Ie;
                    double h[64];
                    for (int j = 0; j < Ie; j++) {
                        double a = 0.0, b = 0.0;
                        for (int q = 0; q < C; q++) { a += W1[(size_t)j * C + q] * s * x[q]; b += W1[(size_t)(Ie + j) * C + q] * s * x[q]; }
                        h[j] = silu_d(a) * b;
                    }
                    for (int q = 0; q < C; q++) { y[q] = 0.0; for (int j = 0; j < Ie; j++) y[q] += W2[(size_t)q * Ie + j] * h[j]; }
                } else if (e < E + c->moe_const) {  // constant expert
                    const float* A = p[PARAM_MOE_CONSTMIX] + ((size_t)l * c->moe_const + (e - E)) * 2 * C;
                    const float* cv = p[PARAM_MOE_CONST] + ((size_t)l * c->moe_const + (e - E)) * C;
                    double a0 = 0.0, a1 = 0.0;
                    for (int q = 0; q < C; q++) { a0 += A[q] * s * x[q]; a1 += A[C + q] * s * x[q]; }
                    double w0 = 1.0 / (1.0 + exp(a1 - a0)), w1 = 1.0 - w0;
                    for (int q = 0; q < C; q++) y[q] = w0 * s * x[q] + w1 * cv[q];
                } else {  // copy or zero
                    for (int q = 0; q < C; q++) y[q] = zero ? 0.0 : s * x[q];
                }
                for (int q = 0; q < C; q++) out[q] += g * y[q];
            }
            const float* fcw = p[PARAM_FCW] + (size_t)l * 2 * H * C;
            const float* fcp = p[PARAM_FCPROJW] + (size_t)l * C * H;
            for (int j = 0; j < H; j++) {
                double a = 0.0, b = 0.0;
                for (int q = 0; q < C; q++) { a += fcw[(size_t)j * C + q] * x[q]; b += fcw[(size_t)(H + j) * C + q] * x[q]; }
                for (int q = 0; q < C; q++) out[q] += fcp[(size_t)q * H + j] * silu_d(a) * b;
            }
            const float* got = model.acts.ffn_out + ((size_t)l * BT + r) * C;
            for (int q = 0; q < C; q++) worst = fmax(worst, fabs(got[q] - out[q]) / (1e-3 + fabs(out[q])));
        }
        double* t = z_prev; z_prev = z; z = t;
    }
    free(z);
    free(z_prev);
    gpt_free(&model);
    return worst;
}

static void test_moe_forward(void) {
    ModelConfig plain = moe_test_config(TEST_DIMS_TINY, 4, 2, 1, 0, 0, 0, 0, 0);
    ModelConfig release = moe_test_config(TEST_DIMS_TINY, 3, 3, 1, 1, 1, 2, 1, 1);
    release.moe_router = MOE_ROUTER_TANH;
    release.moe_input_scale = 1;
    ModelConfig mixed = moe_test_config(TEST_DIMS_TINY, 2, 4, 0, 2, 1, 1, 1, 0);
    double e1 = moe_forward_max_error(&plain, 91), e2 = moe_forward_max_error(&release, 92);
    double e3 = moe_forward_max_error(&mixed, 93);
    double worst = fmax(e1, fmax(e2, e3));
    test_checkf(worst <= 1e-4, "moe_forward_float64", "FFN output of both layers vs a float64 computation of design "
                "§10.2: worst |err| / (1e-3 + |y|) %.1e (DeepSeekMoE), %.1e (MoE++ release: tanh router, k x, "
                "renormalised, gating residual), %.1e (2 zero experts, no shared, norm 0) (tol 1e-4)", e1, e2, e3);
}

// gpt_backward(loss_scale) scales every gradient, the balance loss's too: loss_scale 0.5 gives
// exactly half the gradients of 1 (a power of two: bitwise)
static void test_moe_loss_scale(void) {
    ModelConfig config = moe_test_config(TEST_DIMS_TINY, 3, 2, 1, 1, 1, 1, 1, 1);
    GPT model;
    gpt_build(&model, &config);
    randomize_model(&model, 81, 0.3f);
    model.moe_aux_coef = 0.5f;
    model.moe_zc_weight = 0.5f;
    int B = 2, T = 8, BT = B * T, inputs[16], targets[16];
    random_tokens(inputs, BT, config.vocab_size, 82);
    random_tokens(targets, BT, config.vocab_size, 83);
    gpt_forward(&model, inputs, targets, B, T, 1);
    gpt_zero_grad(&model);
    gpt_backward(&model, 1.0f);
    float* full = alloc_floats(model.num_params);
    memcpy(full, model.grads, model.num_params * sizeof(float));
    gpt_zero_grad(&model);
    gpt_backward(&model, 0.5f);
    size_t bad = 0;
    for (size_t i = 0; i < model.num_params; i++) bad += model.grads[i] != 0.5f * full[i];
    test_checkf(bad == 0 && model.moe_aux_active, "moe_loss_scale", "MoE++ with the balance loss: backward(0.5) = "
                "backward(1) / 2 bitwise in %zu of %zu gradients", model.num_params - bad, model.num_params);
    free(full);
    gpt_free(&model);
}

// the bias update moves each FFN expert's bias by rate towards the mean load (sign only, exact),
// leaves the zero-computation experts' entries alone, and a large bias decides the selection
// without changing any gate (p stays the softmax of the router)
static void test_moe_bias(void) {
    ModelConfig config = moe_test_config(TEST_DIMS_TINY, 4, 2, 1, 1, 1, 0, 0, 0);
    GPT model;
    gpt_build(&model, &config);
    randomize_model(&model, 71, 0.3f);
    int Et = model_config_moe_routed(&config), L = config.num_layers;
    float* b = model.param_tensors[PARAM_MOE_BIAS];
    float* before = alloc_floats((size_t)L * Et);
    memcpy(before, b, (size_t)L * Et * sizeof(float));
    long long counts[2 * 6] = {5, 1, 3, 3, 7, 9,   0, 4, 4, 4, 1, 1};  // means over FFN experts: 3 and 3
    moe_bias_update(&model, counts, 0.125f);
    const float want_step[2 * 6] = {-1, 1, 0, 0, 0, 0,   1, -1, -1, -1, 0, 0};
    int update_ok = 1;
    for (int i = 0; i < L * Et; i++) update_ok &= b[i] == before[i] + 0.125f * want_step[i];
    // selection: expert 2 of layer 0 gets +10, so every token picks it, with gate p (norm 0)
    for (int i = 0; i < L * Et; i++) b[i] = 0.0f;
    b[2] = 10.0f;
    int B = 2, T = 8, BT = B * T, inputs[16];
    random_tokens(inputs, BT, config.vocab_size, 72);
    gpt_forward(&model, inputs, NULL, B, T, 0);
    int select_ok = 1;
    for (int r = 0; r < BT; r++) {
        const int* id = model.acts.moe_idx + (size_t)r * config.moe_topk;
        select_ok &= id[0] == 2 && model.acts.moe_gate[(size_t)r * config.moe_topk] ==
                                       model.acts.moe_probs[(size_t)r * Et + 2];
    }
    test_checkf(update_ok && select_ok, "moe_bias", "bias update = rate * sign(mean load - load) on FFN experts only, "
                "exactly: %s; a +10 bias puts expert 2 first for every token with gate = its softmax probability: %s",
                update_ok ? "yes" : "NO", select_ok ? "yes" : "NO");
    free(before);
    gpt_free(&model);
}

// three training steps of MoE++ with the balance loss and the bias update: bitwise equal across
// runs and thread counts, and the bias moved
static void moe_train_steps(GPT* model) {
    ModelConfig config = moe_test_config(TEST_DIMS_SMALL, 6, 3, 1, 1, 1, 2, 1, 1);
    gpt_build(model, &config);
    gpt_init_random(model, 9);
    model->moe_aux_coef = 0.01f;
    model->moe_zc_weight = 0.75f;
    int Et = model_config_moe_routed(&config), B = 4, T = 32, BT = B * T;
    long long* counts = (long long*)calloc_check((size_t)config.num_layers * Et, sizeof(long long));
    int tokens[2 * 128 + 1];
    for (int step = 1; step <= 3; step++) {
        random_tokens(tokens, 2 * BT + 1, config.vocab_size, 400 + step);
        memset(counts, 0, (size_t)config.num_layers * Et * sizeof(long long));
        gpt_zero_grad(model);
        for (int micro = 0; micro < 2; micro++) {
            gpt_forward(model, tokens + micro * BT, tokens + micro * BT + 1, B, T, 1);
            gpt_backward(model, 0.5f);
            for (int i = 0; i < config.num_layers * Et; i++) counts[i] += model->acts.moe_counts[i];
        }
        gpt_update(model, 3e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 1.0f, step);
        moe_bias_update(model, counts, 1e-3f);
    }
    free(counts);
    gpt_forward(model, tokens, tokens + 1, B, T, 0);
}

static void test_moe_determinism(void) {
    GPT a, b, c;
    moe_train_steps(&a);
    moe_train_steps(&b);
    int same_run = same_model_bits(&a, &b);
    int threads_b = 1;
#ifdef _OPENMP
    int default_threads = omp_get_max_threads();
    threads_b = default_threads == 3 ? 5 : 3;
    omp_set_num_threads(threads_b);
    moe_train_steps(&c);
    omp_set_num_threads(default_threads);
#else
    moe_train_steps(&c);
#endif
    int same_threads = same_model_bits(&a, &c);
    int bias_moved = 0;
    for (size_t i = 0; i < a.param_sizes[PARAM_MOE_BIAS]; i++) bias_moved |= a.param_tensors[PARAM_MOE_BIAS][i] != 0.0f;
    test_checkf(same_run && same_threads && bias_moved, "moe_determinism", "3 MoE++ training steps (balance loss, bias "
                "update): two runs bitwise equal: %s; default vs %d threads bitwise equal: %s; bias moved: %s",
                same_run ? "yes" : "NO", threads_b, same_threads ? "yes" : "NO", bias_moved ? "yes" : "NO");
    gpt_free(&a);
    gpt_free(&b);
    gpt_free(&c);
}

// ----------------------------------------------------------------------------

// train_config_micro_batch_bytes_bound (llmc/args.h), which keeps the size_t byte counts from
// wrapping, is above what the CPU layout (layout_activations) and the memory plan of every mode
// (llmc/memory_plan.h) count for a micro-batch, on random configurations of every FFN kind: a
// buffer added to either without the bound growing fails here
static int below_(Rng* rng, int n) { return (int)(rng_u32(rng) % (uint32_t)n); }
static void test_bytes_bound(void) {
    Rng rng;
    rng_init(&rng, 2026);
    int checked = 0, over = 0;
    double worst = 0.0;
    for (int it = 0; it < 20000; it++) {
        ModelConfig c;
        memset(&c, 0, sizeof(c));
        c.num_heads = 1 + below_(&rng, 8);
        c.channels = c.num_heads * 8 * (1 + below_(&rng, 16));
        c.num_layers = 1 + below_(&rng, 6);
        c.max_seq_len = 1 + below_(&rng, 1024);
        c.vocab_size = 1 + below_(&rng, 3000);
        c.padded_vocab_size = c.vocab_size + below_(&rng, 128);
        c.ffn_kind = below_(&rng, 4);
        c.ffn_hidden = 1 + below_(&rng, 3000);
        if (c.ffn_kind == FFN_OMNI) {
            c.router_n = 1 + below_(&rng, 40);
            c.num_experts = c.router_n * c.router_n;
            c.top_k = 1 + below_(&rng, c.num_experts);
            c.router_norm = below_(&rng, 2);
            c.gate = below_(&rng, 2);
        }
        if (c.ffn_kind == FFN_MOE) {
            c.moe_experts = 1 + below_(&rng, 200);
            c.moe_const = below_(&rng, 40);
            c.moe_copy = below_(&rng, 4);
            c.moe_zero = below_(&rng, 4);
            c.moe_topk = 1 + below_(&rng, model_config_moe_routed(&c));
            c.moe_shared = below_(&rng, 3);
            c.moe_gate_res = below_(&rng, 2);
            c.moe_norm_topk = below_(&rng, 2);
            c.moe_router = below_(&rng, 2);
            c.moe_input_scale = below_(&rng, 2);
        }
        TrainConfig cfg;
        train_config_defaults(&cfg);
        cfg.B = 1 + below_(&rng, 32);
        cfg.T = 1 + below_(&rng, c.max_seq_len);
        cfg.num_processes = 1 + below_(&rng, 16);
        cfg.shard_experts = c.ffn_kind == FFN_OMNI && cfg.num_processes > 1 && c.channels % (8 * cfg.num_processes) == 0;
        double bound = train_config_micro_batch_bytes_bound(&cfg, &c), cpu = 0.0;
        GPT counted;
        memset(&counted, 0, sizeof(counted));
        counted.config = c;
        layout_activations(&counted, cfg.B, cfg.T, &cpu);
        double most = cpu;
        for (int mode = 0; mode < 4; mode++) {
            MemoryPlan plan;
            if ((mode & PLAN_MODE_TABLES) && !cfg.shard_experts) continue;
            memory_plan_build_estimated(&plan, &c, cfg.B, cfg.T, 4, cfg.num_processes, mode, below_(&rng, 3));
            double bytes = 0.0;
            for (int i = 0; i < MEMBUF_COUNT; i++) {
                if (plan.buf[i].kind == MEM_ACTIVATIONS || plan.buf[i].kind == MEM_WORKSPACE) bytes += (double)plan.buf[i].bytes;
            }
            if (bytes > most) most = bytes;
        }
        checked++;
        if (most > bound) over++;
        if (most / bound > worst) worst = most / bound;
    }
    test_checkf(over == 0, "bytes_bound_above_cpu_and_plan", "%d of %d configurations over the bound, largest "
                "counted/bound %.3f", over, checked, worst);
}

int main(int argc, char** argv) {
    for (int i = 1; i < argc; i++) if (strcmp(argv[i], "-v") == 0) verbose = 1;
    struct timespec start, end;
    clock_gettime(CLOCK_MONOTONIC, &start);
    setvbuf(stdout, NULL, _IOLBF, 0);
    test_begin("test_omnimoe_cpu");

#ifdef _OPENMP
    // The finite-difference and top-k tests run thousands of forwards of a model with 8 channels:
    // thread start-up would dominate them, so they run on one thread. The other tests run on
    // the default thread count, and test_determinism compares 1, 3 and the default.
    int default_threads = omp_get_max_threads();
    omp_set_num_threads(1);
#endif
    // finite differences: every tensor of every kind, both BN modes, both gates, k < n and k > n
    gradcheck("gradcheck_gelu", test_config(TEST_DIMS_TINY, FFN_GELU, 0, 0, 0, 0), 2, 4, 1, 11);
    gradcheck("gradcheck_swiglu", test_config(TEST_DIMS_TINY, FFN_SWIGLU, 0, 0, 0, 0), 2, 4, 1, 12);
    gradcheck("gradcheck_omni_bn_softmax_k>n", test_config(TEST_DIMS_TINY, FFN_OMNI, 3, 4, ROUTER_NORM_BN, GATE_SOFTMAX), 2, 4, 1, 13);
    gradcheck("gradcheck_omni_bn_softmax_k<n", test_config(TEST_DIMS_TINY, FFN_OMNI, 4, 3, ROUTER_NORM_BN, GATE_SOFTMAX), 2, 4, 1, 14);
    gradcheck("gradcheck_omni_bn_prob_k<n", test_config(TEST_DIMS_TINY, FFN_OMNI, 4, 2, ROUTER_NORM_BN, GATE_PROB), 2, 4, 1, 15);
    gradcheck("gradcheck_omni_bn_prob_k>n", test_config(TEST_DIMS_TINY, FFN_OMNI, 3, 5, ROUTER_NORM_BN, GATE_PROB), 2, 4, 1, 16);
    gradcheck("gradcheck_omni_none_softmax_k<n", test_config(TEST_DIMS_TINY, FFN_OMNI, 4, 3, ROUTER_NORM_NONE, GATE_SOFTMAX), 2, 4, 1, 17);
    gradcheck("gradcheck_omni_none_prob_k>n", test_config(TEST_DIMS_TINY, FFN_OMNI, 3, 5, ROUTER_NORM_NONE, GATE_PROB), 2, 4, 1, 18);
    gradcheck("gradcheck_omni_bn_k=N", test_config(TEST_DIMS_TINY, FFN_OMNI, 3, 9, ROUTER_NORM_BN, GATE_SOFTMAX), 2, 4, 1, 19);
    gradcheck("gradcheck_omni_bn_k=1", test_config(TEST_DIMS_TINY, FFN_OMNI, 3, 1, ROUTER_NORM_BN, GATE_PROB), 2, 4, 1, 20);
    gradcheck("gradcheck_omni_bn_evalmode", test_config(TEST_DIMS_TINY, FFN_OMNI, 4, 3, ROUTER_NORM_BN, GATE_SOFTMAX), 2, 4, 0, 21);
    // moe: the balance loss on (alpha 0.05), every expert kind, both gate normalisations
    gradcheck_moe_aux = 0.05f;
    gradcheck_moe_tau = 1.0f;
    gradcheck("gradcheck_moe", moe_test_config(TEST_DIMS_TINY, 4, 2, 1, 0, 0, 0, 0, 0), 2, 4, 1, 22);
    gradcheck_moe_tau = 0.5f;
    gradcheck("gradcheck_moe++_norm", moe_test_config(TEST_DIMS_TINY, 3, 3, 1, 1, 1, 2, 1, 1), 2, 4, 1, 23);
    gradcheck("gradcheck_moe++_k=E_t", moe_test_config(TEST_DIMS_TINY, 2, 5, 1, 1, 1, 1, 1, 1), 2, 4, 1, 24);
    ModelConfig release = moe_test_config(TEST_DIMS_TINY, 3, 2, 1, 1, 1, 2, 1, 1);  // --moepp 1's router and input
    release.moe_router = MOE_ROUTER_TANH;
    release.moe_input_scale = 1;
    gradcheck("gradcheck_moe++_tanh_router_input_k", release, 2, 4, 1, 26);
    gradcheck_moe_aux = 0.0f;
    gradcheck("gradcheck_moe++_no_aux_no_shared", moe_test_config(TEST_DIMS_TINY, 2, 2, 0, 1, 1, 2, 1, 0), 2, 4, 1, 25);

    test_topk();
#ifdef _OPENMP
    omp_set_num_threads(default_threads);
#endif
    test_batchnorm();
    test_padded_vocab();
    test_sampler();
    test_adamw();
    test_init();

    test_grad_accum(test_config(TEST_DIMS_TINY, FFN_GELU, 0, 0, 0, 0), 1);
    test_grad_accum(test_config(TEST_DIMS_TINY, FFN_SWIGLU, 0, 0, 0, 0), 1);
    test_grad_accum(test_config(TEST_DIMS_TINY, FFN_OMNI, 4, 3, ROUTER_NORM_NONE, GATE_SOFTMAX), 1);
    test_grad_accum(test_config(TEST_DIMS_TINY, FFN_OMNI, 4, 3, ROUTER_NORM_BN, GATE_SOFTMAX), 0);
    test_grad_accum(moe_test_config(TEST_DIMS_TINY, 3, 2, 1, 1, 1, 1, 1, 1), 1);  // balance loss off

    test_overfit(FFN_GELU);
    test_overfit(FFN_SWIGLU);
    test_overfit(FFN_OMNI);

    test_determinism();
    test_moe_forward();
    test_moe_aux_uniform();
    test_moe_loss_scale();
    test_moe_bias();
    test_moe_determinism();
    test_bytes_bound();

    clock_gettime(CLOCK_MONOTONIC, &end);
    double seconds = (end.tv_sec - start.tv_sec) + 1e-9 * (end.tv_nsec - start.tv_nsec);
    printf("test_omnimoe_cpu took %.1f s\n", seconds);
    return test_end();
}
