/*
 * sampler.h - text samples during training, shared by the CPU and the CUDA trainer. Plain C.
 *
 *   sample_softmax(logits, V, coin)  the token that coin in [0, 1) picks from softmax(logits[0..V))
 *                                    by the inverse CDF, in double; only the real vocabulary
 *                                    (columns past V, the padding, get no mass)
 *   sampler_eot(tokenizer, V)        the end-of-text token: the tokenizer's, else V - 1
 *   sample_and_print_with(...)       one sequence of T tokens: end-of-text, then T - 1 draws,
 *                                    printed after "sample: " as they come
 *   sample_quietly_with(...)         the same T - 1 forwards and draws, nothing printed
 *
 * The model is a callback, logits_at(ctx, tokens, T, t, out): out[0..V) = fp32 logits of position
 * t - 1 for the window tokens[0..T) (the CUDA trainer copies the row to the host). Every call
 * runs the whole window of T tokens, the positions from t on filled with end-of-text: attention
 * is causal and, in evaluation, the router treats tokens one by one, so they do not change
 * logits[t - 1], and every forward has one shape. Determinism: one rng_f32 draw per token, the
 * sums in a fixed order; the same logits and RNG state give the same tokens on any machine.
 */
#ifndef OMNIMOE_SAMPLER_H
#define OMNIMOE_SAMPLER_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include "utils.h"
#include "rand.h"
#include "tokenizer.h"

static inline int sample_softmax(const float* logits, int V, float coin) {
    float maxval = -INFINITY;
    for (int v = 0; v < V; v++) if (logits[v] > maxval) maxval = logits[v];
    double sum = 0.0;
    for (int v = 0; v < V; v++) sum += exp((double)logits[v] - maxval);
    double target = coin * sum, cdf = 0.0;
    for (int v = 0; v < V; v++) {
        cdf += exp((double)logits[v] - maxval);
        if (target < cdf) return v;
    }
    return V - 1;  // rounding left the coin unmatched
}

// a tokenizer that is not loaded (or names a token outside the model's vocabulary): V - 1
static inline int sampler_eot(const Tokenizer* tokenizer, int V) {
    if (tokenizer != NULL && tokenizer->init_ok && tokenizer->eot_token >= 0 && tokenizer->eot_token < V) {
        return tokenizer->eot_token;
    }
    return V - 1;
}

typedef void (*SamplerLogitsFn)(void* ctx, const int* tokens, int T, int t, float* out);

// T - 1 sampled tokens, printed when print is 1; out_tokens (T ints, may be NULL) gets the window
static inline void sampler_run_(SamplerLogitsFn logits_at, void* ctx, int V, int T, const Tokenizer* tokenizer,
                                Rng* rng, int* out_tokens, int print) {
    int eot = sampler_eot(tokenizer, V);
    int* tokens = (int*)malloc_check((size_t)(T > 0 ? T : 1) * sizeof(int));
    float* logits = (float*)malloc_check((size_t)V * sizeof(float));
    for (int t = 0; t < T; t++) tokens[t] = eot;
    if (print) printf("sample: ");
    for (int t = 1; t < T; t++) {
        logits_at(ctx, tokens, T, t, logits);
        tokens[t] = sample_softmax(logits, V, rng_f32(rng));
        if (!print) continue;
        tokenizer_print_token(tokenizer, (uint32_t)tokens[t]);
        fflush(stdout);
    }
    if (print) {
        printf("\n");
        fflush(stdout);
    }
    if (out_tokens != NULL) memcpy(out_tokens, tokens, (size_t)T * sizeof(int));
    free(tokens);
    free(logits);
}

// Prints T - 1 sampled tokens; out_tokens (T ints, may be NULL) gets the whole window.
static inline void sample_and_print_with(SamplerLogitsFn logits_at, void* ctx, int V, int T,
                                         const Tokenizer* tokenizer, Rng* rng, int* out_tokens) {
    sampler_run_(logits_at, ctx, V, T, tokenizer, rng, out_tokens, 1);
}

// The same forwards, one per token, without printing: the other ranks of a model whose forward
// is collective (column-sharded experts) follow rank 0's sample with their own draws
static inline void sample_quietly_with(SamplerLogitsFn logits_at, void* ctx, int V, int T, Rng* rng) {
    sampler_run_(logits_at, ctx, V, T, NULL, rng, NULL, 0);
}

#endif // OMNIMOE_SAMPLER_H
