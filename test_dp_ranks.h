/*
 * test_dp_ranks.h - P simulated data-parallel ranks of the CPU reference model (train_omnimoe.c,
 * included first), the part that test_zero_ranks.c (ZeRO-1) and test_shard_tables.c (the
 * column-sharded expert tables) compare their sharded paths with: every rank is a GPT of its own
 * that trains on its own random micro-batch, the gradient mean is one expression (the P gradients
 * summed in rank order, then divided by P, as NCCL's sum for a fixed P), and the replicated
 * update is gpt_update on every rank with that mean.
 *
 *   dp_reduce_mean(ranks, P, i)                      the mean over ranks of gradient element i
 *   dp_forward_backward(ranks, P, c, step, before, ctx)  forward + backward of every rank on its
 *                                                    micro-batch of `step`; before(ctx, r) first
 *                                                    (may be NULL); returns the mean loss (rank order)
 *   dp_replicated_update(ranks, P, step, clip, ...)  the mean to every rank, gpt_update; the norm of
 *                                                    rank 0, the double sum of squares of the mean,
 *                                                    and whether every rank computed the same norm
 */
#ifndef OMNIMOE_TEST_DP_RANKS_H
#define OMNIMOE_TEST_DP_RANKS_H

enum { DP_B = 2, DP_T = 16 };  // a micro-batch of every rank (constants: they size the token array)
static const float DP_LR = 1e-2f, DP_BETA1 = 0.9f, DP_BETA2 = 0.95f, DP_EPS = 1e-8f, DP_WD = 0.1f;

static inline float dp_reduce_mean(const GPT* ranks, int P, size_t i) {
    float sum = ranks[0].grads[i];
    for (int r = 1; r < P; r++) sum += ranks[r].grads[i];
    return sum / (float)P;
}

static float dp_forward_backward(GPT* ranks, int P, const ModelConfig* c, int step, void (*before)(void*, int),
                                 void* ctx) {
    int tokens[DP_B * DP_T + 1];
    double loss = 0.0;
    for (int r = 0; r < P; r++) {
        if (before != NULL) before(ctx, r);
        Rng rng = rng_seeded(1000 + 100 * (uint64_t)step + r);  // rank r's data at this step
        fill_tokens(tokens, (size_t)DP_B * DP_T + 1, c->vocab_size, &rng);
        GPT* g = &ranks[r];
        gpt_zero_grad(g);
        gpt_forward(g, tokens, tokens + 1, DP_B, DP_T, 1);
        gpt_backward(g, 1.0f);
        loss += g->mean_loss;  // summed in rank order, as the trainer's loss reduction
    }
    return (float)(loss / P);
}

static void dp_replicated_update(GPT* ranks, int P, int step, float grad_clip, float* norm0, double* norm_sq,
                                 int* norms_agree) {
    size_t n = ranks[0].num_params;
    float* mean = alloc_floats(n);
    for (size_t i = 0; i < n; i++) mean[i] = dp_reduce_mean(ranks, P, i);
    double sq = 0.0;
    for (size_t i = 0; i < n; i++) sq += (double)mean[i] * mean[i];
    *norm_sq = sq;
    for (int r = 0; r < P; r++) {
        memcpy(ranks[r].grads, mean, n * sizeof(float));
        float norm = gpt_update(&ranks[r], DP_LR, DP_BETA1, DP_BETA2, DP_EPS, DP_WD, grad_clip, step + 1);
        if (r == 0) *norm0 = norm;
        else *norms_agree &= memcmp(&norm, norm0, sizeof(float)) == 0;
    }
    free(mean);
}

// a sharded step's rank r: its norm from the combined sum of squares sq, recorded for rank 0 and
// compared bitwise with rank 0's for the others; returns the clipping scale AdamW applies
static float dp_rank_norm_scale(int r, double sq, float grad_clip, float* norm0, double* norm_sq, int* norms_agree) {
    float norm = (float)sqrt(sq);
    if (r == 0) {
        *norm0 = norm;
        *norm_sq = sq;
    } else {
        *norms_agree &= memcmp(&norm, norm0, sizeof(float)) == 0;
    }
    return (grad_clip > 0.0f && norm > grad_clip) ? grad_clip / norm : 1.0f;
}

#endif  // OMNIMOE_TEST_DP_RANKS_H
