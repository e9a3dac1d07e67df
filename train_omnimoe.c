/*
 * train_omnimoe.c - the CPU reference model and trainer of omnimoe, in plain C and fp32.
 *
 * A GPT-2 style decoder (docs/design.md §1) whose feed-forward block is one of
 *   gelu    W2 GELU(W1 x + b1) + b2                      (GPT-2)
 *   swiglu  Wd (SiLU(Wg x) * (Wu x))                      (dense baseline, no biases)
 *   omni    SwiGLU_I(x) + AtomicExperts(x)                (OmniMoE, docs/design.md §2)
 *   moe     SwiGLU_{S I_e}(x) + sum_m g_m Expert_m(x)     (top-k MoE and MoE++, docs/design.md §10)
 * with its backward pass and AdamW. This file is the oracle the CUDA code is tested against, so
 * it favours clarity: one function per layer forward and backward, every sum in a fixed order.
 *
 * Determinism: OpenMP only splits work whose outputs are independent (rows, channels, experts,
 * (batch, head) pairs); every floating-point sum is done by one thread in a fixed order, so the
 * results are bitwise identical for any OMP_NUM_THREADS. Weight gradients are added into the
 * gradient buffer row by row in token order, so two micro-batches of one sequence each give the
 * same bits as one batch of both sequences (for the kinds without batch norm).
 *
 * Padded vocabulary: the LM head (tied to wte) produces logits for all Vp columns, but the
 * cross-entropy softmax runs over the first V (real) columns only. Padded columns therefore get
 * no probability mass and a zero gradient, and the padded rows of wte never receive gradient
 * (inputs and targets must be real tokens < V, checked at every forward).
 *
 * Compiled with -DTESTING the file has no main(), so tests can #include it.
 */
#include "llmc/utils.h"   // first: it asks for the POSIX feature macro before any system header
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "llmc/config.h"
#include "llmc/rand.h"
#include "llmc/param_init.h"
#include "llmc/tokenizer.h"
#include "llmc/sampler.h"

// ----------------------------------------------------------------------------
// small numeric helpers (the normalisations' constants are in llmc/config.h)

static inline float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }
static inline float siluf(float x) { return x * sigmoidf(x); }
// d/dx x*sig(x) = sig(x) * (1 + x * (1 - sig(x)))
static inline float silu_gradf(float x) {
    float s = sigmoidf(x);
    return s * (1.0f + x * (1.0f - s));
}

// ----------------------------------------------------------------------------
// the layers: forward and backward. Shapes: B batch, T time, C channels, BT = B*T token rows.
// Every backward ADDS into its parameter gradients (so micro-batches accumulate) and, unless
// said otherwise, adds into its input gradient too (callers zero scratch buffers first).

void encoder_forward(float* out, const int* inp, const float* wte, const float* wpe, int B, int T, int C) {
    #pragma omp parallel for collapse(2)
    for (int b = 0; b < B; b++) {
        for (int t = 0; t < T; t++) {
            float* out_bt = out + ((size_t)b * T + t) * C;
            const float* wte_row = wte + (size_t)inp[b * T + t] * C;
            const float* wpe_row = wpe + (size_t)t * C;
            for (int i = 0; i < C; i++) out_bt[i] = wte_row[i] + wpe_row[i];
        }
    }
}

void encoder_backward(float* dwte, float* dwpe, const float* dout, const int* inp, int B, int T, int C) {
    // serial in token order: a token id may repeat, and one fixed order keeps each row's sum deterministic
    for (int b = 0; b < B; b++) {
        for (int t = 0; t < T; t++) {
            const float* dout_bt = dout + ((size_t)b * T + t) * C;
            float* dwte_row = dwte + (size_t)inp[b * T + t] * C;
            float* dwpe_row = dwpe + (size_t)t * C;
            for (int i = 0; i < C; i++) {
                dwte_row[i] += dout_bt[i];
                dwpe_row[i] += dout_bt[i];
            }
        }
    }
}

void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* weight,
                       const float* bias, int BT, int C) {
    #pragma omp parallel for
    for (int r = 0; r < BT; r++) {
        const float* x = inp + (size_t)r * C;
        float m = 0.0f;
        for (int i = 0; i < C; i++) m += x[i];
        m = m / C;
        float v = 0.0f;  // two passes: variance from centred values, no cancellation
        for (int i = 0; i < C; i++) {
            float d = x[i] - m;
            v += d * d;
        }
        v = v / C;
        float s = 1.0f / sqrtf(v + LAYERNORM_EPS);
        float* o = out + (size_t)r * C;
        for (int i = 0; i < C; i++) o[i] = (x[i] - m) * s * weight[i] + bias[i];
        mean[r] = m;
        rstd[r] = s;
    }
}

void layernorm_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                        const float* weight, const float* mean, const float* rstd, int BT, int C) {
    #pragma omp parallel for
    for (int r = 0; r < BT; r++) {
        const float* x = inp + (size_t)r * C;
        const float* dy = dout + (size_t)r * C;
        float m = mean[r], s = rstd[r];
        // the two means the normalisation couples every channel through
        float dnorm_mean = 0.0f, dnorm_norm_mean = 0.0f;
        for (int i = 0; i < C; i++) {
            float norm = (x[i] - m) * s;
            float dnorm = weight[i] * dy[i];
            dnorm_mean += dnorm;
            dnorm_norm_mean += dnorm * norm;
        }
        dnorm_mean /= C;
        dnorm_norm_mean /= C;
        float* dx = dinp + (size_t)r * C;
        for (int i = 0; i < C; i++) {
            float norm = (x[i] - m) * s;
            float dnorm = weight[i] * dy[i];
            dx[i] += s * (dnorm - dnorm_mean - norm * dnorm_norm_mean);
        }
    }
    // weight and bias gradients: one channel per thread, rows in order
    #pragma omp parallel for
    for (int i = 0; i < C; i++) {
        for (int r = 0; r < BT; r++) {
            float norm = (inp[(size_t)r * C + i] - mean[r]) * rstd[r];
            float dy = dout[(size_t)r * C + i];
            dweight[i] += norm * dy;
            dbias[i] += dy;
        }
    }
}

// <a, b> in one fixed order: eight interleaved partial sums (lane l takes the i with i % 8 == l)
// combined by a fixed tree. Deterministic like a left-to-right sum, but the compiler can keep
// the eight lanes in SIMD registers. The GPU sums in yet another order: tests use tolerances.
static inline float dot_product(const float* __restrict a, const float* __restrict b, int n) {
    float lane[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        for (int l = 0; l < 8; l++) lane[l] += a[i + l] * b[i + l];
    }
    for (; i < n; i++) lane[i % 8] += a[i] * b[i];
    return ((lane[0] + lane[4]) + (lane[2] + lane[6])) + ((lane[1] + lane[5]) + (lane[3] + lane[7]));
}

// y[i] += alpha * x[i]: one add per element, so the chunking (for SIMD) changes no result
static inline void axpy(float* __restrict y, float alpha, const float* __restrict x, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        for (int l = 0; l < 8; l++) y[i + l] += alpha * x[i + l];
    }
    for (; i < n; i++) y[i] += alpha * x[i];
}

// tiles of the matmuls: a tile of weight rows (or of token rows) is reused from cache many
// times instead of streaming the whole weight once per token (the LM head is Vp x C)
#define MATMUL_ROW_TILE 64
#define MATMUL_COL_TILE 32

// out (BT, OC) = inp (BT, IC) @ weight (OC, IC)^T + bias (OC); bias may be NULL
void matmul_forward(float* out, const float* inp, const float* weight, const float* bias, int BT, int IC, int OC) {
    #pragma omp parallel for collapse(2) schedule(static)
    for (int r0 = 0; r0 < BT; r0 += MATMUL_ROW_TILE) {
        for (int j0 = 0; j0 < OC; j0 += MATMUL_COL_TILE) {
            int r1 = r0 + MATMUL_ROW_TILE < BT ? r0 + MATMUL_ROW_TILE : BT;
            int j1 = j0 + MATMUL_COL_TILE < OC ? j0 + MATMUL_COL_TILE : OC;
            for (int r = r0; r < r1; r++) {
                const float* x = inp + (size_t)r * IC;
                for (int j = j0; j < j1; j++) {
                    float acc = dot_product(x, weight + (size_t)j * IC, IC);
                    out[(size_t)r * OC + j] = bias != NULL ? acc + bias[j] : acc;
                }
            }
        }
    }
}

// dinp += dout @ weight; dweight += dout^T @ inp; dbias += column sums of dout (dbias may be NULL).
// Every element of dinp sums over the outputs j in order, and every element of dweight and dbias
// over the token rows r in order, whatever the tiling or the thread count.
void matmul_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                     const float* weight, int BT, int IC, int OC) {
    #pragma omp parallel for schedule(static)
    for (int r0 = 0; r0 < BT; r0 += MATMUL_ROW_TILE) {
        int r1 = r0 + MATMUL_ROW_TILE < BT ? r0 + MATMUL_ROW_TILE : BT;
        for (int j = 0; j < OC; j++) {
            const float* w = weight + (size_t)j * IC;
            for (int r = r0; r < r1; r++) axpy(dinp + (size_t)r * IC, dout[(size_t)r * OC + j], w, IC);
        }
    }
    // a tile of weight rows per thread; rows r added in token order (same bits when micro-batched)
    #pragma omp parallel for schedule(static)
    for (int j0 = 0; j0 < OC; j0 += MATMUL_COL_TILE) {
        int j1 = j0 + MATMUL_COL_TILE < OC ? j0 + MATMUL_COL_TILE : OC;
        for (int r = 0; r < BT; r++) {
            const float* x = inp + (size_t)r * IC;
            const float* dy = dout + (size_t)r * OC;
            for (int j = j0; j < j1; j++) {
                axpy(dweight + (size_t)j * IC, dy[j], x, IC);
                if (dbias != NULL) dbias[j] += dy[j];
            }
        }
    }
}

// causal multi-head self-attention. qkv (BT, 3C) rows [q | k | v]; att (B, NH, T, T) keeps the
// softmax probabilities for backward (entries above the diagonal are 0); out (BT, C)
void attention_forward(float* out, float* att, const float* qkv, int B, int T, int C, int NH) {
    int hs = C / NH;
    float scale = 1.0f / sqrtf((float)hs);
    #pragma omp parallel for collapse(3)
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < NH; h++) {
            for (int t = 0; t < T; t++) {
                const float* q = qkv + ((size_t)b * T + t) * 3 * C + h * hs;
                float* att_row = att + (((size_t)b * NH + h) * T + t) * T;
                float maxval = -INFINITY;
                for (int t2 = 0; t2 <= t; t2++) {
                    const float* k = qkv + ((size_t)b * T + t2) * 3 * C + C + h * hs;
                    float dot = 0.0f;
                    for (int i = 0; i < hs; i++) dot += q[i] * k[i];
                    dot *= scale;
                    att_row[t2] = dot;
                    if (dot > maxval) maxval = dot;
                }
                float sum = 0.0f;
                for (int t2 = 0; t2 <= t; t2++) {
                    float e = expf(att_row[t2] - maxval);
                    att_row[t2] = e;
                    sum += e;
                }
                float inv = 1.0f / sum;
                for (int t2 = 0; t2 < T; t2++) att_row[t2] = t2 <= t ? att_row[t2] * inv : 0.0f;
                float* o = out + ((size_t)b * T + t) * C + h * hs;
                for (int i = 0; i < hs; i++) o[i] = 0.0f;
                for (int t2 = 0; t2 <= t; t2++) {
                    const float* v = qkv + ((size_t)b * T + t2) * 3 * C + 2 * C + h * hs;
                    float a = att_row[t2];
                    for (int i = 0; i < hs; i++) o[i] += a * v[i];
                }
            }
        }
    }
}

// dqkv must be zeroed by the caller; datt_scratch holds B*NH*T floats (one row per (b, h))
void attention_backward(float* dqkv, float* datt_scratch, const float* dout, const float* qkv,
                        const float* att, int B, int T, int C, int NH) {
    int hs = C / NH;
    float scale = 1.0f / sqrtf((float)hs);
    // one (b, h) per thread: dk and dv of a key gather from every later query in a fixed order
    #pragma omp parallel for collapse(2)
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < NH; h++) {
            float* datt = datt_scratch + ((size_t)b * NH + h) * T;
            for (int t = 0; t < T; t++) {
                const float* att_row = att + (((size_t)b * NH + h) * T + t) * T;
                const float* dy = dout + ((size_t)b * T + t) * C + h * hs;
                const float* q = qkv + ((size_t)b * T + t) * 3 * C + h * hs;
                float* dq = dqkv + ((size_t)b * T + t) * 3 * C + h * hs;
                // through out = att @ v
                for (int t2 = 0; t2 <= t; t2++) {
                    const float* v = qkv + ((size_t)b * T + t2) * 3 * C + 2 * C + h * hs;
                    float* dv = dqkv + ((size_t)b * T + t2) * 3 * C + 2 * C + h * hs;
                    float d = 0.0f;
                    for (int i = 0; i < hs; i++) {
                        d += dy[i] * v[i];
                        dv[i] += att_row[t2] * dy[i];
                    }
                    datt[t2] = d;
                }
                // through the softmax: dpre = att * (datt - <att, datt>)
                float dot = 0.0f;
                for (int t2 = 0; t2 <= t; t2++) dot += att_row[t2] * datt[t2];
                // through pre = scale * q.k
                for (int t2 = 0; t2 <= t; t2++) {
                    float dpre = att_row[t2] * (datt[t2] - dot) * scale;
                    const float* k = qkv + ((size_t)b * T + t2) * 3 * C + C + h * hs;
                    float* dk = dqkv + ((size_t)b * T + t2) * 3 * C + C + h * hs;
                    for (int i = 0; i < hs; i++) {
                        dq[i] += dpre * k[i];
                        dk[i] += dpre * q[i];
                    }
                }
            }
        }
    }
}

// GELU, tanh approximation (GPT-2)
static const float GELU_SQRT_2_OVER_PI = 0.7978845608028654f;

void gelu_forward(float* out, const float* inp, size_t count) {
    #pragma omp parallel for
    for (size_t i = 0; i < count; i++) {
        float x = inp[i];
        float cube = 0.044715f * x * x * x;
        out[i] = 0.5f * x * (1.0f + tanhf(GELU_SQRT_2_OVER_PI * (x + cube)));
    }
}

// dinp = dout * GELU'(inp) (overwrites)
void gelu_backward(float* dinp, const float* inp, const float* dout, size_t count) {
    #pragma omp parallel for
    for (size_t i = 0; i < count; i++) {
        float x = inp[i];
        float cube = 0.044715f * x * x * x;
        float arg = GELU_SQRT_2_OVER_PI * (x + cube);
        float th = tanhf(arg);
        float sech2 = 1.0f - th * th;
        float grad = 0.5f * (1.0f + th) + 0.5f * x * sech2 * GELU_SQRT_2_OVER_PI * (1.0f + 3.0f * 0.044715f * x * x);
        dinp[i] = grad * dout[i];
    }
}

// h (BT, I) = SiLU(g) * u where fch (BT, 2I) rows are [g | u]
void swiglu_forward(float* h, const float* fch, int BT, int I) {
    #pragma omp parallel for
    for (int r = 0; r < BT; r++) {
        const float* g = fch + (size_t)r * 2 * I;
        const float* u = g + I;
        float* hr = h + (size_t)r * I;
        for (int i = 0; i < I; i++) hr[i] = siluf(g[i]) * u[i];
    }
}

// dfch (BT, 2I) = [dh * u * SiLU'(g) | dh * SiLU(g)] (overwrites)
void swiglu_backward(float* dfch, const float* dh, const float* fch, int BT, int I) {
    #pragma omp parallel for
    for (int r = 0; r < BT; r++) {
        const float* g = fch + (size_t)r * 2 * I;
        const float* u = g + I;
        const float* dhr = dh + (size_t)r * I;
        float* dg = dfch + (size_t)r * 2 * I;
        float* du = dg + I;
        for (int i = 0; i < I; i++) {
            dg[i] = dhr[i] * u[i] * silu_gradf(g[i]);
            du[i] = dhr[i] * siluf(g[i]);
        }
    }
}

void residual_forward(float* out, const float* a, const float* b, size_t count) {
    #pragma omp parallel for
    for (size_t i = 0; i < count; i++) out[i] = a[i] + b[i];
}

// ----------------------------------------------------------------------------
// OmniMoE layer pieces (docs/design.md §2). Router logits (BT, R) with R = 2n: channels [0, n) are
// the row router, [n, 2n) the column router.

// Affine-free BatchNorm over the BT tokens, per channel. use_batch_stats=1: normalise with the
// batch mean and biased variance, and (update_running=1) move the running statistics towards
// the batch mean and the unbiased variance with momentum 0.1, as torch's BatchNorm1d does.
// use_batch_stats=0: normalise with the running statistics. Writes the mean and 1/sqrt(var+eps)
// that were used (R each) for backward.
void batchnorm_forward(float* out, float* used_mean, float* used_rstd, const float* inp,
                       float* running_mean, float* running_var, int BT, int R, int use_batch_stats,
                       int update_running) {
    #pragma omp parallel for
    for (int c = 0; c < R; c++) {
        float m, s;
        if (use_batch_stats) {
            float sum = 0.0f;
            for (int r = 0; r < BT; r++) sum += inp[(size_t)r * R + c];
            m = sum / BT;
            float sq = 0.0f;
            for (int r = 0; r < BT; r++) {
                float d = inp[(size_t)r * R + c] - m;
                sq += d * d;
            }
            s = 1.0f / sqrtf(sq / BT + BATCHNORM_EPS);
            if (update_running) {
                float unbiased_var = sq / (BT - 1);
                running_mean[c] = (1.0f - BATCHNORM_MOMENTUM) * running_mean[c] + BATCHNORM_MOMENTUM * m;
                running_var[c] = (1.0f - BATCHNORM_MOMENTUM) * running_var[c] + BATCHNORM_MOMENTUM * unbiased_var;
            }
        } else {
            m = running_mean[c];
            s = 1.0f / sqrtf(running_var[c] + BATCHNORM_EPS);
        }
        for (int r = 0; r < BT; r++) out[(size_t)r * R + c] = (inp[(size_t)r * R + c] - m) * s;
        used_mean[c] = m;
        used_rstd[c] = s;
    }
}

// dinp = BN backward of dout (overwrites). With batch statistics every token of the batch is
// coupled through the mean and variance; with running statistics BN is a fixed affine map.
void batchnorm_backward(float* dinp, const float* dout, const float* out, const float* used_rstd,
                        int BT, int R, int used_batch_stats) {
    #pragma omp parallel for
    for (int c = 0; c < R; c++) {
        float s = used_rstd[c];
        if (!used_batch_stats) {
            for (int r = 0; r < BT; r++) dinp[(size_t)r * R + c] = dout[(size_t)r * R + c] * s;
            continue;
        }
        float dmean = 0.0f, dnorm_mean = 0.0f;
        for (int r = 0; r < BT; r++) {
            float dy = dout[(size_t)r * R + c];
            dmean += dy;
            dnorm_mean += dy * out[(size_t)r * R + c];
        }
        dmean /= BT;
        dnorm_mean /= BT;
        for (int r = 0; r < BT; r++) {
            size_t at = (size_t)r * R + c;
            dinp[at] = s * (dout[at] - dmean - out[at] * dnorm_mean);
        }
    }
}

// log_softmax over each n-half of every row of x (BT, 2n)
void router_logsoftmax_forward(float* logp, const float* x, int BT, int n) {
    #pragma omp parallel for
    for (int r = 0; r < BT; r++) {
        for (int half = 0; half < 2; half++) {
            const float* xr = x + (size_t)r * 2 * n + half * n;
            float* lr = logp + (size_t)r * 2 * n + half * n;
            float maxval = -INFINITY;
            for (int i = 0; i < n; i++) if (xr[i] > maxval) maxval = xr[i];
            float sum = 0.0f;
            for (int i = 0; i < n; i++) sum += expf(xr[i] - maxval);
            float lse = maxval + logf(sum);
            for (int i = 0; i < n; i++) lr[i] = xr[i] - lse;
        }
    }
}

// dx = dlogp - softmax(x) * sum(dlogp), per half (overwrites); softmax(x) = exp(logp)
void router_logsoftmax_backward(float* dx, const float* dlogp, const float* logp, int BT, int n) {
    #pragma omp parallel for
    for (int r = 0; r < BT; r++) {
        for (int half = 0; half < 2; half++) {
            size_t off = (size_t)r * 2 * n + half * n;
            float sum = 0.0f;
            for (int i = 0; i < n; i++) sum += dlogp[off + i];
            for (int i = 0; i < n; i++) dx[off + i] = dlogp[off + i] - expf(logp[off + i]) * sum;
        }
    }
}

// --- exact top-k over the n x n grid of S(i,j) = pr[i] + pc[j] -------------------------------
// One total order everywhere: a higher score ranks first, equal scores rank the smaller id first.

typedef struct {
    float score;
    int id;
} ScoredId;

static inline int ranks_before(ScoredId a, ScoredId b) {
    return a.score > b.score || (a.score == b.score && a.id < b.id);
}

// Partial quickselect: afterwards items[0..k) are the k best of items[0..count) in any order.
// Expected O(count); the chosen SET is unique because the order is total (ids are distinct).
static void select_best(ScoredId* items, int count, int k) {
    int lo = 0, hi = count - 1;
    while (lo < hi) {
        // median of three as pivot keeps sorted inputs linear
        int mid = lo + (hi - lo) / 2;
        ScoredId a = items[lo], b = items[mid], c = items[hi], pivot;
        if (ranks_before(a, b)) pivot = ranks_before(b, c) ? b : (ranks_before(a, c) ? c : a);
        else pivot = ranks_before(a, c) ? a : (ranks_before(b, c) ? c : b);
        int i = lo, j = hi;
        while (i <= j) {  // Hoare partition: better-than-pivot to the left
            while (ranks_before(items[i], pivot)) i++;
            while (ranks_before(pivot, items[j])) j--;
            if (i <= j) {
                ScoredId tmp = items[i];
                items[i] = items[j];
                items[j] = tmp;
                i++;
                j--;
            }
        }
        // now [lo, j] rank before-or-at pivot, [i, hi] at-or-after it
        if (k - 1 <= j) hi = j;
        else if (k - 1 >= i) lo = i;
        else break;
    }
}

static void sort_best_first(ScoredId* items, int count) {
    for (int a = 1; a < count; a++) {  // insertion sort: count <= k
        ScoredId x = items[a];
        int b = a - 1;
        while (b >= 0 && ranks_before(x, items[b])) {
            items[b + 1] = items[b];
            b--;
        }
        items[b + 1] = x;
    }
}

static int compare_ints(const void* a, const void* b) { return (*(const int*)a > *(const int*)b) - (*(const int*)a < *(const int*)b); }

// best[0..k) is the top-k of the k' x k' grid, best first. Rounding is monotone, so no pair
// outside the grid scores above the k-th score v, but an fp32 sum can round to exactly v for a
// pair outside it with a smaller id (rows a few ulps apart, a column of larger magnitude). The
// tie rule wants the smallest ids scoring v (docs/design.md §2): gather every pair scoring v in
// the rows and columns that can reach it, and keep the smallest. O(n) when nothing outside ties.
static void topk_fix_rounding_ties(ScoredId* best, const float* pr, const float* pc, int n, int k) {
    float v = best[k - 1].score, pr_max = -INFINITY, pc_max = -INFINITY;
    for (int i = 0; i < n; i++) { pr_max = fmaxf(pr_max, pr[i]); pc_max = fmaxf(pc_max, pc[i]); }
    int above = 0;  // pairs scoring above v: all in best[], and they stay
    while (above < k && best[above].score > v) above++;
    int reach_rows = 0, reach_cols = 0;
    for (int i = 0; i < n; i++) reach_rows += pr[i] + pc_max >= v;
    for (int j = 0; j < n; j++) reach_cols += pr_max + pc[j] >= v;
    int in_grid_ties = k - above;
    int* tied = (int*)malloc_check((size_t)reach_rows * reach_cols * sizeof(int));
    int count = 0;
    for (int i = 0; i < n; i++) {
        if (!(pr[i] + pc_max >= v)) continue;
        for (int j = 0; j < n; j++) {
            if (pr[i] + pc[j] == v) tied[count++] = i * n + j;
        }
    }
    if (count > in_grid_ties) {  // an outside pair ties: the smallest ids scoring v win
        qsort(tied, count, sizeof(int), compare_ints);
        for (int m = above; m < k; m++) best[m].id = tied[m - above];
    }
    free(tied);
}

// Exact top-k of S(i,j) = pr[i] + pc[j] (fp32 sum) over all N = n*n pairs in O(n + k^2):
// with k' = min(n, k), the k best pairs lie in the grid of the k' best rows (by pr, ties to the
// smaller index) times the k' best columns, because each pair outside it is beaten by k' pairs
// in its own column (or row). Writes ids e = i*n + j and scores, best first, ties by smaller id.
void omni_topk(const float* pr, const float* pc, int n, int k, int* out_idx, float* out_score) {
    int kk = k < n ? k : n;
    ScoredId rows[n], cols[n];
    // the grid lives on the stack unless it is large (k close to N with a big n)
    ScoredId grid_on_stack[kk * kk <= 4096 ? kk * kk : 1];
    ScoredId* grid = kk * kk <= 4096 ? grid_on_stack : (ScoredId*)malloc_check((size_t)kk * kk * sizeof(ScoredId));
    for (int i = 0; i < n; i++) {
        rows[i].score = pr[i]; rows[i].id = i;
        cols[i].score = pc[i]; cols[i].id = i;
    }
    if (kk < n) {
        select_best(rows, n, kk);
        select_best(cols, n, kk);
    }
    for (int a = 0; a < kk; a++) {
        for (int b = 0; b < kk; b++) {
            ScoredId* g = &grid[a * kk + b];
            g->score = rows[a].score + cols[b].score;
            g->id = rows[a].id * n + cols[b].id;
        }
    }
    if (k < kk * kk) select_best(grid, kk * kk, k);
    sort_best_first(grid, k);
    if (kk < n) topk_fix_rounding_ties(grid, pr, pc, n, k);
    for (int m = 0; m < k; m++) {
        out_idx[m] = grid[m].id;
        out_score[m] = grid[m].score;
    }
    if (grid != grid_on_stack) free(grid);
}

// per token: top-k experts from the log-probabilities logp (BT, 2n), then the gates
//   softmax: g = softmax over the k selected scores (paper)     prob: g = exp(S) (released code)
void omni_route_forward(int* idx, float* score, float* gate, const float* logp, int BT, int n, int k,
                        int gate_kind) {
    #pragma omp parallel for
    for (int r = 0; r < BT; r++) {
        const float* lp = logp + (size_t)r * 2 * n;
        int* id = idx + (size_t)r * k;
        float* sc = score + (size_t)r * k;
        float* g = gate + (size_t)r * k;
        omni_topk(lp, lp + n, n, k, id, sc);
        if (gate_kind == GATE_SOFTMAX) {
            float sum = 0.0f;  // sc[0] is the largest score: exponents <= 0
            for (int m = 0; m < k; m++) {
                g[m] = expf(sc[m] - sc[0]);
                sum += g[m];
            }
            for (int m = 0; m < k; m++) g[m] /= sum;
        } else {
            for (int m = 0; m < k; m++) g[m] = expf(sc[m]);
        }
    }
}

// out (BT, C) += sum_m a_m v_{e_m}, a_m = g_m SiLU(s_m), s_m = <u_{e_m}, x>; keeps s and a (BT, k)
void omni_experts_forward(float* out, float* s, float* a, const float* x, const int* idx, const float* gate,
                          const float* U, const float* V, int BT, int C, int k) {
    #pragma omp parallel for
    for (int r = 0; r < BT; r++) {
        const float* xr = x + (size_t)r * C;
        float* o = out + (size_t)r * C;
        for (int m = 0; m < k; m++) {  // m in order: the token's sum has one fixed order
            size_t p = (size_t)r * k + m;
            const float* u = U + (size_t)idx[p] * C;
            const float* v = V + (size_t)idx[p] * C;
            float dot = 0.0f;
            for (int i = 0; i < C; i++) dot += u[i] * xr[i];
            float am = gate[p] * siluf(dot);
            s[p] = dot;
            a[p] = am;
            for (int i = 0; i < C; i++) o[i] += am * v[i];
        }
    }
}

// Expert branch backward. dout (BT, C) is d loss / d (layer output). Adds into dx (BT, C), dU and
// dV (N, C); writes dgate (BT, k) = h_m SiLU(s_m) with h_m = <dout, v_{e_m}>.
// dU and dV are summed per expert over its (token, m) pairs in token order: the pairs are
// grouped by expert with a stable counting sort (pair_offsets (N+1), pair_list (BT*k)), so each
// expert row has one thread and one fixed order, whatever the number of threads.
void omni_experts_backward(float* dx, float* dU, float* dV, float* dgate, float* ds,
                           int* pair_offsets, int* pair_list, const float* dout, const float* x,
                           const int* idx, const float* gate, const float* s, const float* a,
                           const float* U, const float* V, int BT, int C, int k, int N) {
    #pragma omp parallel for
    for (int r = 0; r < BT; r++) {
        const float* dy = dout + (size_t)r * C;
        float* dxr = dx + (size_t)r * C;
        for (int m = 0; m < k; m++) {
            size_t p = (size_t)r * k + m;
            const float* u = U + (size_t)idx[p] * C;
            const float* v = V + (size_t)idx[p] * C;
            float h = 0.0f;
            for (int i = 0; i < C; i++) h += dy[i] * v[i];
            dgate[p] = h * siluf(s[p]);
            ds[p] = h * gate[p] * silu_gradf(s[p]);
            for (int i = 0; i < C; i++) dxr[i] += ds[p] * u[i];
        }
    }
    // stable counting sort of the pairs by expert id
    int P = BT * k;
    for (int e = 0; e <= N; e++) pair_offsets[e] = 0;
    for (int p = 0; p < P; p++) pair_offsets[idx[p] + 1]++;
    for (int e = 0; e < N; e++) pair_offsets[e + 1] += pair_offsets[e];
    for (int p = 0; p < P; p++) pair_list[pair_offsets[idx[p]]++] = p;
    for (int e = N; e > 0; e--) pair_offsets[e] = pair_offsets[e - 1];  // undo the shift of the fill
    pair_offsets[0] = 0;
    #pragma omp parallel for schedule(dynamic, 16)
    for (int e = 0; e < N; e++) {
        float* du = dU + (size_t)e * C;
        float* dv = dV + (size_t)e * C;
        for (int q = pair_offsets[e]; q < pair_offsets[e + 1]; q++) {
            int p = pair_list[q];
            int r = p / k;
            const float* xr = x + (size_t)r * C;
            const float* dy = dout + (size_t)r * C;
            for (int i = 0; i < C; i++) {
                du[i] += ds[p] * xr[i];
                dv[i] += a[p] * dy[i];
            }
        }
    }
}

// gates -> scores: softmax: dS_m = g_m (dg_m - sum_l g_l dg_l); prob: dS_m = g_m dg_m
void omni_gate_backward(float* dscore, const float* dgate, const float* gate, int BT, int k, int gate_kind) {
    #pragma omp parallel for
    for (int r = 0; r < BT; r++) {
        const float* g = gate + (size_t)r * k;
        const float* dg = dgate + (size_t)r * k;
        float* dS = dscore + (size_t)r * k;
        if (gate_kind == GATE_SOFTMAX) {
            float dot = 0.0f;
            for (int m = 0; m < k; m++) dot += g[m] * dg[m];
            for (int m = 0; m < k; m++) dS[m] = g[m] * (dg[m] - dot);
        } else {
            for (int m = 0; m < k; m++) dS[m] = g[m] * dg[m];
        }
    }
}

// S_m = pr[i] + pc[j] with e = i*n + j: scatter dS into dlogp (BT, 2n) (overwrites; the
// indices carry no gradient, so unselected rows and columns get 0)
void omni_route_backward(float* dlogp, const float* dscore, const int* idx, int BT, int n, int k) {
    #pragma omp parallel for
    for (int r = 0; r < BT; r++) {
        float* dpr = dlogp + (size_t)r * 2 * n;
        float* dpc = dpr + n;
        for (int i = 0; i < 2 * n; i++) dpr[i] = 0.0f;
        for (int m = 0; m < k; m++) {
            size_t p = (size_t)r * k + m;
            dpr[idx[p] / n] += dscore[p];
            dpc[idx[p] % n] += dscore[p];
        }
    }
}

// --- loss ----------------------------------------------------------------------------------

// per token: lse = log sum_{v < V} exp(logits[v]) over the REAL vocabulary, loss = lse - logit[target]
void crossentropy_forward(float* losses, float* lse, const float* logits, const int* targets, int BT, int V, int Vp) {
    #pragma omp parallel for
    for (int r = 0; r < BT; r++) {
        const float* lr = logits + (size_t)r * Vp;
        float maxval = -INFINITY;
        for (int v = 0; v < V; v++) if (lr[v] > maxval) maxval = lr[v];
        float sum = 0.0f;
        for (int v = 0; v < V; v++) sum += expf(lr[v] - maxval);
        lse[r] = maxval + logf(sum);
        losses[r] = lse[r] - lr[targets[r]];
    }
}

// dlogits = dloss * (softmax - onehot) on the first V columns, 0 on the padded ones (overwrites)
void crossentropy_backward(float* dlogits, const float* logits, const float* lse, const int* targets,
                           float dloss, int BT, int V, int Vp) {
    #pragma omp parallel for
    for (int r = 0; r < BT; r++) {
        const float* lr = logits + (size_t)r * Vp;
        float* dl = dlogits + (size_t)r * Vp;
        for (int v = 0; v < V; v++) {
            float p = expf(lr[v] - lse[r]);
            dl[v] = (p - (v == targets[r] ? 1.0f : 0.0f)) * dloss;
        }
        for (int v = V; v < Vp; v++) dl[v] = 0.0f;
    }
}

// ----------------------------------------------------------------------------
// the model

// forward activations, per layer where marked (L, ...); allocated for one (B, T)
typedef struct {
    float* encoded;      // (BT, C)
    float* ln1;          // (L, BT, C)
    float* ln1_mean;     // (L, BT)
    float* ln1_rstd;     // (L, BT)
    float* qkv;          // (L, BT, 3C)
    float* atty;         // (L, BT, C)
    float* att;          // (L, B, NH, T, T)
    float* attproj;      // (L, BT, C)
    float* residual2;    // (L, BT, C)
    float* ln2;          // (L, BT, C)
    float* ln2_mean;     // (L, BT)
    float* ln2_rstd;     // (L, BT)
    float* fch;          // (L, BT, FR)  FR = 4C (gelu pre-activation) or 2I ([g | u])
    float* fch_act;      // (L, BT, H)   GELU(fch) or SiLU(g) * u
    float* ffn_out;      // (L, BT, C)   the FFN output (omni: SwiGLU + experts)
    float* residual3;    // (L, BT, C)
    // omni only
    float* router_logits;  // (L, BT, 2n) Wrc x
    float* router_normed;  // (L, BT, 2n) after BN (a copy when router_norm is none)
    float* bn_mean;        // (L, 2n) statistics BN used (batch or running)
    float* bn_rstd;        // (L, 2n)
    float* router_logp;    // (L, BT, 2n) log_softmax per half: [pr | pc]
    int* topk_idx;         // (L, BT, k) expert ids e = i*n + j, best first
    float* topk_score;     // (L, BT, k) S = pr[i] + pc[j]
    float* gate;           // (L, BT, k)
    float* expert_s;       // (L, BT, k) <u_e, x>
    float* expert_a;       // (L, BT, k) g SiLU(s)
    // moe only (docs/design.md §10); E_t routed experts, k = moe_topk, a "pair" q = r*k + m
    float* moe_logits;     // (L, BT, E_t) router logits z (with the gating residual)
    float* moe_rh;         // (L, BT, 8 E_t) tanh router: tanh(W_r x), the input of its second layer
    float* moe_xs;         // (L, BT, C) --moe-input-scale 1: k x, the routed experts' input
    float* moe_probs;      // (L, BT, E_t) p = softmax(z)
    int* moe_idx;          // (L, BT, k) chosen experts, best first
    float* moe_gate;       // (L, BT, k) gates g
    float* moe_denom;      // (L, BT) D of --moe-norm-topk 1 (else 1)
    int* moe_counts;       // (L, E_t) pairs routed to each expert in this forward
    float* moe_fch;        // (L, BT*k, 2 I_e) FFN experts' [g | u] per pair
    float* moe_h;          // (L, BT*k, I_e) SiLU(g) * u per pair
    float* moe_y;          // (L, BT*k, C) each pair's expert output
    float* moe_mix;        // (L, BT*k, 2) constant experts' mixing weights w
    // head
    float* lnf;          // (BT, C)
    float* lnf_mean;     // (BT)
    float* lnf_rstd;     // (BT)
    float* losses;       // (BT)
    float* lse;          // (BT) log-sum-exp over the real vocabulary
} GPTActivations;

// backward scratch: one layer at a time, reused down the stack
typedef struct {
    float* dresidual;    // (BT, C) d loss / d residual stream at the current depth
    float* dln;          // (BT, C) d loss / d layernorm output
    float* dqkv;         // (BT, 3C)
    float* datt_row;     // (B, NH, T)
    float* datty;        // (BT, C)
    float* dfch;         // (BT, FR)
    float* dfch_act;     // (BT, H)
    float* dlogits;      // (BT, Vp)
    // omni only
    float* drouter_a;    // (BT, 2n) ping-pong buffers through log_softmax and BN
    float* drouter_b;    // (BT, 2n)
    float* dgate;        // (BT, k)
    float* dscore;       // (BT, k)
    float* ds;           // (BT, k)
    int* pair_offsets;   // (N + 1)
    int* pair_list;      // (BT, k)
    // moe only
    float* moe_dgate;    // (BT*k)
    float* moe_dfch;     // (BT*k, 2 I_e)
    float* moe_dmix;     // (BT*k, 2) d loss / d (A_j x) of constant-expert pairs
    float* moe_dp;       // (BT, E_t) d loss / d p (the forward borrows it for G z_prev)
    float* moe_dz;       // (BT, E_t) d loss / d z
    float* moe_carry;    // (BT, E_t) d loss / d z of the layer below, through its gating residual
    float* moe_aux_grad; // (E_t) d L_aux / d p_{t,i}, the same for every token (0 without the balance loss)
    float* moe_drh;      // (BT, 8 E_t) tanh router: d loss / d its hidden layer
    float* moe_dxs;      // (BT, C) --moe-input-scale 1: d loss / d (k x)
    int moe_carry_valid; // moe_carry holds a value for the layer being processed
    int* moe_pair_offsets;  // (E_t + 1)
    int* moe_pair_list;     // (BT*k)
} GPTBackwardScratch;

typedef struct {
    ModelConfig config;
    size_t param_sizes[NUM_PARAMETER_TENSORS];
    size_t num_params;
    float* params;                                  // flat, layout order of config.h
    float* param_tensors[NUM_PARAMETER_TENSORS];    // point into params (NULL where size 0)
    float* grads;                                   // same layout, accumulated by backward
    float* grad_tensors[NUM_PARAMETER_TENSORS];
    float* m;                                       // AdamW first moment (allocated at first update)
    float* v;                                       // AdamW second moment
    float* bn_stats;       // router BN running stats, per layer: mean[2n] then var[2n]
    size_t num_bn_stats;
    // activations, for the (B, T) of the last forward
    GPTActivations acts;
    GPTBackwardScratch scratch;
    float* logits;         // (B, T, Vp)
    int* inputs;           // (B, T) copy of the last forward's inputs
    int* targets;          // (B, T) copy of the last forward's targets
    int B, T;              // of the last forward
    int alloc_B, alloc_T;  // activations are allocated for up to this shape (0: none yet)
    int have_targets;      // the last forward computed a loss (backward needs it)
    int bn_used_batch_stats;  // the last forward normalised the router with batch statistics
    float mean_loss;       // of the last forward with targets; -1 without (moe training: + moe_aux_loss)
    // moe (docs/design.md §10.3): run settings of the load-balance loss, set by the trainer
    float moe_aux_coef;    // alpha (0 = off)
    float moe_zc_weight;   // tau: the weight of zero, copy and constant experts
    double moe_aux_loss;   // sum over layers of the last training forward's balance loss
    int moe_aux_active;    // the last forward added it (training, alpha > 0): backward follows it
    // tests only (test_omnimoe.cu): (L, BT, k) expert ids the moe forward uses instead of its own
    // top-k, so that the GPU's choices can be replayed here; NULL (the default): its own top-k
    const int* moe_route_ids;
} GPT;

static float* alloc_floats(size_t count) { return (float*)calloc_check(count > 0 ? count : 1, sizeof(float)); }
static int* alloc_ints(size_t count) { return (int*)calloc_check(count > 0 ? count : 1, sizeof(int)); }

// Exits with the numbers when `bytes` more host memory are needed than the kernel says is
// available (MemAvailable): refusing up front beats being OOM-killed mid-run. Unknown: no check.
static void check_host_memory(double bytes, const char* what, const char* advice) {
    long long available = host_memory_available();
    if (available < 0 || bytes <= (double)available) return;
    const double GiB = 1024.0 * 1024.0 * 1024.0;
    fprintf(stderr, "Error: the CPU trainer needs %.2f GiB of host memory for %s, but only %.2f GiB is available "
            "(MemAvailable in /proc/meminfo): %s\n", bytes / GiB, what, (double)available / GiB, advice);
    exit(EXIT_FAILURE);
}

void gpt_build(GPT* model, const ModelConfig* config) {
    if (!model_config_validate(config)) exit(EXIT_FAILURE);
    memset(model, 0, sizeof(*model));
    model->config = *config;
    model_config_param_sizes(config, model->param_sizes);
    model->num_params = model_config_num_params(config);
    // the model's state: weights, gradients, AdamW m and v (activations: ensure_activations)
    double P4 = 4.0 * (double)model->num_params, GiB = 1024.0 * 1024.0 * 1024.0;
    char what[256];
    snprintf(what, sizeof(what), "the model's %zu parameters (weights %.2f GiB, gradients %.2f GiB, AdamW state %.2f "
             "GiB)", model->num_params, P4 / GiB, P4 / GiB, 2 * P4 / GiB);
    check_host_memory(4 * P4 + 4.0 * (double)model_config_num_bn_stats(config), what,
                      "choose a smaller model (-e) or train on a GPU (./train_omnimoe)");
    model->params = alloc_floats(model->num_params);
    model->grads = alloc_floats(model->num_params);
    size_t offset = 0;
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) {
        model->param_tensors[i] = model->param_sizes[i] ? model->params + offset : NULL;
        model->grad_tensors[i] = model->param_sizes[i] ? model->grads + offset : NULL;
        offset += model->param_sizes[i];
    }
    model->num_bn_stats = model_config_num_bn_stats(config);
    model->bn_stats = alloc_floats(model->num_bn_stats);
    model_init_bn_stats(config, model->bn_stats);  // running mean 0, var 1
    model->mean_loss = -1.0f;
}

// docs/design.md §1.3 initialisation from a seed, the same draws as the CUDA trainer (config.h:
// model_init_params: one Rng, tensors in layout order, LayerNorm weights 1 and biases 0), drawn
// on every core with the same bits (param_init.h); the BN running statistics are reset to mean 0, var 1
void gpt_init_random(GPT* model, uint64_t seed) {
    model_init_params_parallel(&model->config, model->params, seed);
    model_init_bn_stats(&model->config, model->bn_stats);
}

static void free_activations(GPT* model) {
    GPTActivations* a = &model->acts;
    float* fl[] = {a->encoded, a->ln1, a->ln1_mean, a->ln1_rstd, a->qkv, a->atty, a->att, a->attproj,
                   a->residual2, a->ln2, a->ln2_mean, a->ln2_rstd, a->fch, a->fch_act, a->ffn_out,
                   a->residual3, a->router_logits, a->router_normed, a->bn_mean, a->bn_rstd,
                   a->router_logp, a->topk_score, a->gate, a->expert_s, a->expert_a, a->lnf,
                   a->lnf_mean, a->lnf_rstd, a->losses, a->lse, a->moe_logits, a->moe_probs, a->moe_gate,
                   a->moe_denom, a->moe_fch, a->moe_h, a->moe_y, a->moe_mix, a->moe_rh, a->moe_xs};
    for (size_t i = 0; i < sizeof(fl) / sizeof(fl[0]); i++) free(fl[i]);
    free(a->topk_idx);
    free(a->moe_idx);
    free(a->moe_counts);
    GPTBackwardScratch* s = &model->scratch;
    float* fs[] = {s->dresidual, s->dln, s->dqkv, s->datt_row, s->datty, s->dfch, s->dfch_act,
                   s->dlogits, s->drouter_a, s->drouter_b, s->dgate, s->dscore, s->ds, s->moe_dgate, s->moe_dfch,
                   s->moe_dmix, s->moe_dp, s->moe_dz, s->moe_carry, s->moe_drh, s->moe_dxs, s->moe_aux_grad};
    for (size_t i = 0; i < sizeof(fs) / sizeof(fs[0]); i++) free(fs[i]);
    free(s->pair_offsets);
    free(s->pair_list);
    free(s->moe_pair_offsets);
    free(s->moe_pair_list);
    free(model->logits);
    free(model->inputs);
    free(model->targets);
    memset(a, 0, sizeof(*a));
    memset(s, 0, sizeof(*s));
    model->logits = NULL;
    model->inputs = model->targets = NULL;
    model->alloc_B = model->alloc_T = 0;
}

// one buffer of the activation layout: allocated, or with bytes != NULL only counted
static float* layout_floats(size_t count, double* bytes) {
    if (bytes == NULL) return alloc_floats(count);
    *bytes += 4.0 * (double)count;
    return NULL;
}
static int* layout_ints(size_t count, double* bytes) {
    if (bytes == NULL) return alloc_ints(count);
    *bytes += 4.0 * (double)count;
    return NULL;
}

// The activations and backward scratch for (B, T): allocated into model, or with bytes != NULL
// only their size added up (model's pointers then become NULL: pass a copy).
static void layout_activations(GPT* model, int B, int T, double* bytes) {
    const ModelConfig* c = &model->config;
    size_t L = c->num_layers, C = c->channels, NH = c->num_heads, Vp = c->padded_vocab_size;
    size_t BT = (size_t)B * T, H = model_config_dense_width(c);
    size_t FR = c->ffn_kind == FFN_GELU ? H : 2 * H;
    int omni = c->ffn_kind == FFN_OMNI;
    size_t R = omni ? 2 * (size_t)c->router_n : 0, K = omni ? (size_t)c->top_k : 0;
    size_t N = omni ? (size_t)c->num_experts : 0;
    int moe = c->ffn_kind == FFN_MOE;
    size_t Et = (size_t)model_config_moe_routed(c), MK = moe ? (size_t)c->moe_topk : 0;
    size_t Ie = moe ? (size_t)c->ffn_hidden : 0, MC = moe ? C : 0;
    size_t RH = moe && c->moe_router == MOE_ROUTER_TANH ? (size_t)MOE_TANH_WIDTH * Et : 0;
    size_t XS = moe && c->moe_input_scale ? C : 0;
    GPTActivations* a = &model->acts;
    a->encoded = layout_floats(BT * C, bytes);
    a->ln1 = layout_floats(L * BT * C, bytes);
    a->ln1_mean = layout_floats(L * BT, bytes);
    a->ln1_rstd = layout_floats(L * BT, bytes);
    a->qkv = layout_floats(L * BT * 3 * C, bytes);
    a->atty = layout_floats(L * BT * C, bytes);
    a->att = layout_floats(L * B * NH * T * T, bytes);
    a->attproj = layout_floats(L * BT * C, bytes);
    a->residual2 = layout_floats(L * BT * C, bytes);
    a->ln2 = layout_floats(L * BT * C, bytes);
    a->ln2_mean = layout_floats(L * BT, bytes);
    a->ln2_rstd = layout_floats(L * BT, bytes);
    a->fch = layout_floats(L * BT * FR, bytes);
    a->fch_act = layout_floats(L * BT * H, bytes);
    a->ffn_out = layout_floats(L * BT * C, bytes);
    a->residual3 = layout_floats(L * BT * C, bytes);
    a->router_logits = layout_floats(L * BT * R, bytes);
    a->router_normed = layout_floats(L * BT * R, bytes);
    a->bn_mean = layout_floats(L * R, bytes);
    a->bn_rstd = layout_floats(L * R, bytes);
    a->router_logp = layout_floats(L * BT * R, bytes);
    a->topk_idx = layout_ints(L * BT * K, bytes);
    a->topk_score = layout_floats(L * BT * K, bytes);
    a->gate = layout_floats(L * BT * K, bytes);
    a->expert_s = layout_floats(L * BT * K, bytes);
    a->expert_a = layout_floats(L * BT * K, bytes);
    a->moe_logits = layout_floats(L * BT * Et, bytes);
    a->moe_probs = layout_floats(L * BT * Et, bytes);
    a->moe_idx = layout_ints(L * BT * MK, bytes);
    a->moe_gate = layout_floats(L * BT * MK, bytes);
    a->moe_denom = layout_floats(moe ? L * BT : 0, bytes);
    a->moe_counts = layout_ints(L * Et, bytes);
    a->moe_fch = layout_floats(L * BT * MK * 2 * Ie, bytes);
    a->moe_h = layout_floats(L * BT * MK * Ie, bytes);
    a->moe_y = layout_floats(L * BT * MK * MC, bytes);
    a->moe_mix = layout_floats(L * BT * MK * 2, bytes);
    a->moe_rh = layout_floats(L * BT * RH, bytes);
    a->moe_xs = layout_floats(L * BT * XS, bytes);
    a->lnf = layout_floats(BT * C, bytes);
    a->lnf_mean = layout_floats(BT, bytes);
    a->lnf_rstd = layout_floats(BT, bytes);
    a->losses = layout_floats(BT, bytes);
    a->lse = layout_floats(BT, bytes);
    GPTBackwardScratch* s = &model->scratch;
    s->dresidual = layout_floats(BT * C, bytes);
    s->dln = layout_floats(BT * C, bytes);
    s->dqkv = layout_floats(BT * 3 * C, bytes);
    s->datt_row = layout_floats((size_t)B * NH * T, bytes);
    s->datty = layout_floats(BT * C, bytes);
    s->dfch = layout_floats(BT * FR, bytes);
    s->dfch_act = layout_floats(BT * H, bytes);
    s->dlogits = layout_floats(BT * Vp, bytes);
    s->drouter_a = layout_floats(BT * R, bytes);
    s->drouter_b = layout_floats(BT * R, bytes);
    s->dgate = layout_floats(BT * K, bytes);
    s->dscore = layout_floats(BT * K, bytes);
    s->ds = layout_floats(BT * K, bytes);
    s->pair_offsets = layout_ints(N + 1, bytes);
    s->pair_list = layout_ints(BT * K, bytes);
    s->moe_dgate = layout_floats(BT * MK, bytes);
    s->moe_dfch = layout_floats(BT * MK * 2 * Ie, bytes);
    s->moe_dmix = layout_floats(BT * MK * 2, bytes);
    s->moe_dp = layout_floats(BT * Et, bytes);
    s->moe_dz = layout_floats(BT * Et, bytes);
    s->moe_carry = layout_floats(BT * Et, bytes);
    s->moe_aux_grad = layout_floats(Et, bytes);
    s->moe_drh = layout_floats(BT * RH, bytes);
    s->moe_dxs = layout_floats(BT * XS, bytes);
    s->moe_pair_offsets = layout_ints(Et + 1, bytes);
    s->moe_pair_list = layout_ints(BT * MK, bytes);
    model->logits = layout_floats(BT * Vp, bytes);
    model->inputs = layout_ints(BT, bytes);
    model->targets = layout_ints(BT, bytes);
}

// activations and backward scratch for at least (B, T): a smaller batch or shorter sequence
// reuses the buffers (every index is computed from the B, T of the call), a larger one grows them
static void ensure_activations(GPT* model, int B, int T) {
    if (B <= model->alloc_B && T <= model->alloc_T) return;
    if (B < model->alloc_B) B = model->alloc_B;
    if (T < model->alloc_T) T = model->alloc_T;
    free_activations(model);
    GPT counted = *model;
    double bytes = 0.0, adamw = model->m == NULL ? 8.0 * (double)model->num_params : 0.0;
    layout_activations(&counted, B, T, &bytes);
    char what[256];
    snprintf(what, sizeof(what), "the activations of a micro-batch of B=%d, T=%d (%.2f GiB) and the AdamW state "
             "still to allocate (%.2f GiB)", B, T, bytes / (1024.0 * 1024.0 * 1024.0), adamw / (1024.0 * 1024.0 * 1024.0));
    check_host_memory(bytes + adamw, what, "lower -b or -t, or train on a GPU (./train_omnimoe)");
    layout_activations(model, B, T, NULL);
    model->alloc_B = B;
    model->alloc_T = T;
}

static void check_tokens(const int* tokens, size_t count, int V, const char* what) {
    for (size_t i = 0; i < count; i++) {
        if (tokens[i] < 0 || tokens[i] >= V) {
            fprintf(stderr, "Error: gpt_forward: %s[%zu] = %d is not a token id in [0, %d)\n", what, i, tokens[i], V);
            exit(EXIT_FAILURE);
        }
    }
}

// ----------------------------------------------------------------------------
// MoE layer (docs/design.md §10): top-k SwiGLU experts beside the shared SwiGLU (which
// gpt_forward runs as for swiglu, width S*I_e), the MoE++ zero, copy and constant experts,
// gating residuals and the load-balance loss. Expert ids: [0, E) FFN, then constant, copy, zero.
// A pair q = r*k + m is token r's m-th choice. Every sum has one fixed order (design §10.4).

enum { MOE_KIND_FFN = 0, MOE_KIND_CONST = 1, MOE_KIND_COPY = 2, MOE_KIND_ZERO = 3 };

static inline int moe_expert_kind(const ModelConfig* c, int e) {
    if (e < c->moe_experts) return MOE_KIND_FFN;
    if (e < c->moe_experts + c->moe_const) return MOE_KIND_CONST;
    if (e < c->moe_experts + c->moe_const + c->moe_copy) return MOE_KIND_COPY;
    return MOE_KIND_ZERO;
}

// the balance loss's weight eta_i: 1 for FFN experts, tau for the zero-computation ones
static inline float moe_balance_weight(const GPT* model, int e) {
    return moe_expert_kind(&model->config, e) == MOE_KIND_FFN ? 1.0f : model->moe_zc_weight;
}

// per token: p = softmax(z) over all E_t experts, the k experts with the largest p + b (ties to
// the smaller id), and the gates (--moe-norm-topk 0: g = p; 1: p / D over the non-zero experts);
// route_ids (BT, k) non-NULL: those ids instead of the top-k (GPT.moe_route_ids)
static void moe_route_forward(float* probs, int* idx, float* gate, float* denom, const float* z, const float* bias,
                              const int* route_ids, const ModelConfig* c, int BT) {
    int Et = model_config_moe_routed(c), k = c->moe_topk;
    #pragma omp parallel
    {
        ScoredId* cand = (ScoredId*)malloc_check((size_t)Et * sizeof(ScoredId));
        #pragma omp for
        for (int r = 0; r < BT; r++) {
            const float* zr = z + (size_t)r * Et;
            float* pr = probs + (size_t)r * Et;
            float maxval = -INFINITY, sum = 0.0f;
            for (int i = 0; i < Et; i++) maxval = fmaxf(maxval, zr[i]);
            for (int i = 0; i < Et; i++) {
                pr[i] = expf(zr[i] - maxval);
                sum += pr[i];
            }
            for (int i = 0; i < Et; i++) pr[i] /= sum;
            for (int i = 0; i < Et; i++) { cand[i].score = pr[i] + bias[i]; cand[i].id = i; }
            if (route_ids != NULL) {
                for (int m = 0; m < k; m++) cand[m].id = route_ids[(size_t)r * k + m];
            } else {
                if (k < Et) select_best(cand, Et, k);
                sort_best_first(cand, k);
            }
            int* id = idx + (size_t)r * k;
            float* g = gate + (size_t)r * k;
            float D = 0.0f;
            for (int m = 0; m < k; m++) {
                id[m] = cand[m].id;
                if (moe_expert_kind(c, id[m]) != MOE_KIND_ZERO) D += pr[id[m]];
            }
            for (int m = 0; m < k; m++) {
                if (!c->moe_norm_topk) g[m] = pr[id[m]];
                else g[m] = moe_expert_kind(c, id[m]) == MOE_KIND_ZERO || D <= 0.0f ? 0.0f : pr[id[m]] / D;
            }
            denom[r] = c->moe_norm_topk ? D : 1.0f;
        }
        free(cand);
    }
}

// each pair's expert output y_q (C) from x; keeps the FFN [g | u], h and the constant mix w
static void moe_experts_forward(float* y, float* fch, float* h, float* mix, const float* x, const int* idx,
                                const float* W1, const float* W2, const float* cvec, const float* cmix,
                                const ModelConfig* c, int BT) {
    int C = c->channels, Ie = c->ffn_hidden, k = c->moe_topk, E = c->moe_experts;
    long long P = (long long)BT * k;
    #pragma omp parallel for schedule(dynamic, 4)
    for (long long q = 0; q < P; q++) {
        int e = idx[q];
        const float* xr = x + (size_t)(q / k) * C;
        float* yq = y + (size_t)q * C;
        int kind = moe_expert_kind(c, e);
        if (kind == MOE_KIND_FFN) {
            const float* w1 = W1 + (size_t)e * 2 * Ie * C;
            const float* w2 = W2 + (size_t)e * C * Ie;
            float* f = fch + (size_t)q * 2 * Ie;
            float* hq = h + (size_t)q * Ie;
            for (int j = 0; j < 2 * Ie; j++) f[j] = dot_product(xr, w1 + (size_t)j * C, C);
            for (int i = 0; i < Ie; i++) hq[i] = siluf(f[i]) * f[Ie + i];
            for (int i = 0; i < C; i++) yq[i] = dot_product(hq, w2 + (size_t)i * Ie, Ie);
        } else if (kind == MOE_KIND_CONST) {
            const float* A = cmix + (size_t)(e - E) * 2 * C;
            const float* cv = cvec + (size_t)(e - E) * C;
            float a0 = dot_product(A, xr, C), a1 = dot_product(A + C, xr, C), mx = fmaxf(a0, a1);
            float e0 = expf(a0 - mx), e1 = expf(a1 - mx);
            float w0 = e0 / (e0 + e1), w1 = e1 / (e0 + e1);
            mix[2 * q] = w0;
            mix[2 * q + 1] = w1;
            for (int i = 0; i < C; i++) yq[i] = w0 * xr[i] + w1 * cv[i];
        } else if (kind == MOE_KIND_COPY) {
            memcpy(yq, xr, (size_t)C * sizeof(float));
        } else {
            memset(yq, 0, (size_t)C * sizeof(float));
        }
    }
}

// The layer's routed part: out (BT, C) += sum_m g_m y_m (the shared SwiGLU is already in out).
// Returns the layer's load-balance loss alpha sum_i eta_i f_i P_i when with_aux, else 0.
static double moe_layer_forward(GPT* model, int l, float* out, const float* x, int BT, int with_aux) {
    const ModelConfig* c = &model->config;
    int C = c->channels, Et = model_config_moe_routed(c), k = c->moe_topk, Ie = c->ffn_hidden;
    int E = c->moe_experts, Kc = c->moe_const;
    size_t P = (size_t)BT * k;
    GPTActivations* a = &model->acts;
    float** p = model->param_tensors;
    float* z = a->moe_logits + (size_t)l * BT * Et;
    float* probs = a->moe_probs + (size_t)l * BT * Et;
    int* idx = a->moe_idx + (size_t)l * P;
    float* gate = a->moe_gate + (size_t)l * P;
    int* counts = a->moe_counts + (size_t)l * Et;
    // router (linear, or C -> 8E_t -> E_t with tanh), with the gating residual G z_{l-1} (design §10.2)
    if (c->moe_router == MOE_ROUTER_TANH) {
        int RH = MOE_TANH_WIDTH * Et;
        float* rh = a->moe_rh + (size_t)l * BT * RH;
        matmul_forward(rh, x, p[PARAM_MOE_ROUTERW] + (size_t)l * RH * C, NULL, BT, C, RH);
        for (size_t i = 0; i < (size_t)BT * RH; i++) rh[i] = tanhf(rh[i]);
        matmul_forward(z, rh, p[PARAM_MOE_ROUTER2] + (size_t)l * Et * RH, NULL, BT, RH, Et);
    } else {
        matmul_forward(z, x, p[PARAM_MOE_ROUTERW] + (size_t)l * Et * C, NULL, BT, C, Et);
    }
    if (c->moe_gate_res && l > 0) {
        float* gz = model->scratch.moe_dp;  // backward scratch, free during the forward
        matmul_forward(gz, z - (size_t)BT * Et, p[PARAM_MOE_GATEMAP] + (size_t)l * Et * Et, NULL, BT, Et, Et);
        for (size_t i = 0; i < (size_t)BT * Et; i++) z[i] += gz[i];
    }
    moe_route_forward(probs, idx, gate, a->moe_denom + (size_t)l * BT, z, p[PARAM_MOE_BIAS] + (size_t)l * Et,
                      model->moe_route_ids ? model->moe_route_ids + (size_t)l * P : NULL, c, BT);
    memset(counts, 0, (size_t)Et * sizeof(int));
    for (size_t q = 0; q < P; q++) counts[idx[q]]++;
    const float* xe = x;  // the routed experts' input: x, or k x as the MoE++ release
    if (c->moe_input_scale) {
        float* xs = a->moe_xs + (size_t)l * BT * C;
        for (size_t i = 0; i < (size_t)BT * C; i++) xs[i] = (float)k * x[i];
        xe = xs;
    }
    moe_experts_forward(a->moe_y + (size_t)l * P * C, a->moe_fch + (size_t)l * P * 2 * Ie, a->moe_h + (size_t)l * P * Ie,
                        a->moe_mix + (size_t)l * P * 2, xe, idx, p[PARAM_MOE_W1] + (size_t)l * E * 2 * Ie * C,
                        p[PARAM_MOE_W2] + (size_t)l * E * C * Ie, p[PARAM_MOE_CONST] + (size_t)l * Kc * C,
                        p[PARAM_MOE_CONSTMIX] + (size_t)l * Kc * 2 * C, c, BT);
    const float* y = a->moe_y + (size_t)l * P * C;
    #pragma omp parallel for
    for (int r = 0; r < BT; r++) {
        for (int m = 0; m < k; m++) axpy(out + (size_t)r * C, gate[(size_t)r * k + m], y + ((size_t)r * k + m) * C, C);
    }
    if (!with_aux) return 0.0;
    // f_i = E_t c_i / (k BT), P_i = mean_t p_{t,i}; in double, i and t in order
    double loss = 0.0;
    for (int i = 0; i < Et; i++) {
        double Pi = 0.0;
        for (int r = 0; r < BT; r++) Pi += probs[(size_t)r * Et + i];
        double fi = (double)Et * counts[i] / ((double)k * BT);
        loss += moe_balance_weight(model, i) * fi * (Pi / BT);
    }
    return model->moe_aux_coef * loss;
}

// Backward of moe_layer_forward: adds into dx (BT, C) and the moe weight gradients; dout is
// d loss / d (layer output); loss_scale weights the balance loss as gpt_backward's mean loss.
static void moe_layer_backward(GPT* model, int l, float* dx, const float* dout, const float* x, int BT,
                               float loss_scale) {
    const ModelConfig* c = &model->config;
    int C = c->channels, Et = model_config_moe_routed(c), k = c->moe_topk, Ie = c->ffn_hidden;
    int E = c->moe_experts, Kc = c->moe_const;
    size_t P = (size_t)BT * k;
    GPTActivations* a = &model->acts;
    GPTBackwardScratch* s = &model->scratch;
    float** p = model->param_tensors;
    float** g = model->grad_tensors;
    const float* probs = a->moe_probs + (size_t)l * BT * Et;
    const int* idx = a->moe_idx + (size_t)l * P;
    const float* gate = a->moe_gate + (size_t)l * P;
    const float* denom = a->moe_denom + (size_t)l * BT;
    const int* counts = a->moe_counts + (size_t)l * Et;
    const float* y = a->moe_y + (size_t)l * P * C;
    const float* fch = a->moe_fch + (size_t)l * P * 2 * Ie;
    const float* h = a->moe_h + (size_t)l * P * Ie;
    const float* mix = a->moe_mix + (size_t)l * P * 2;
    const float* W1 = p[PARAM_MOE_W1] + (size_t)l * E * 2 * Ie * C;
    const float* W2 = p[PARAM_MOE_W2] + (size_t)l * E * C * Ie;
    const float* cvec = p[PARAM_MOE_CONST] + (size_t)l * Kc * C;
    const float* cmix = p[PARAM_MOE_CONSTMIX] + (size_t)l * Kc * 2 * C;
    float* dgate = s->moe_dgate;
    float* dfch = s->moe_dfch;
    float* dmix = s->moe_dmix;
    // the experts' input xe: x, or k x (--moe-input-scale 1, whose gradient goes to dxe first)
    const float* xe = x;
    float* dxe = dx;
    if (c->moe_input_scale) {
        xe = a->moe_xs + (size_t)l * BT * C;
        dxe = s->moe_dxs;
        memset(dxe, 0, (size_t)BT * C * sizeof(float));
    }

    // 1. per token, m in order: dg_m = <dy, y_m>, dx through each expert, and the per-pair
    //    [dg | du] and dA x of the weight gradients
    #pragma omp parallel for
    for (int r = 0; r < BT; r++) {
        const float* dy = dout + (size_t)r * C;
        const float* xr = xe + (size_t)r * C;
        float* dxr = dxe + (size_t)r * C;
        for (int m = 0; m < k; m++) {
            size_t q = (size_t)r * k + m;
            int e = idx[q], kind = moe_expert_kind(c, e);
            float gq = gate[q];
            dgate[q] = dot_product(dy, y + q * C, C);
            if (kind == MOE_KIND_FFN) {
                const float* w1 = W1 + (size_t)e * 2 * Ie * C;
                const float* w2 = W2 + (size_t)e * C * Ie;
                const float* f = fch + q * 2 * Ie;
                float* df = dfch + q * 2 * Ie;
                float* dh = df + Ie;  // dh accumulates in the [du] half, which each i reads before writing
                for (int i = 0; i < Ie; i++) dh[i] = 0.0f;
                for (int i = 0; i < C; i++) axpy(dh, gq * dy[i], w2 + (size_t)i * Ie, Ie);
                for (int i = 0; i < Ie; i++) {
                    float dhi = dh[i];
                    df[i] = dhi * f[Ie + i] * silu_gradf(f[i]);
                    df[Ie + i] = dhi * siluf(f[i]);
                }
                for (int j = 0; j < 2 * Ie; j++) axpy(dxr, df[j], w1 + (size_t)j * C, C);
            } else if (kind == MOE_KIND_CONST) {
                const float* A = cmix + (size_t)(e - E) * 2 * C;
                const float* cv = cvec + (size_t)(e - E) * C;
                float w0 = mix[2 * q], w1 = mix[2 * q + 1];
                float dw0 = gq * dot_product(dy, xr, C), dw1 = gq * dot_product(dy, cv, C);
                float wdw = w0 * dw0 + w1 * dw1;
                dmix[2 * q] = w0 * (dw0 - wdw);
                dmix[2 * q + 1] = w1 * (dw1 - wdw);
                axpy(dxr, gq * w0, dy, C);
                axpy(dxr, dmix[2 * q], A, C);
                axpy(dxr, dmix[2 * q + 1], A + C, C);
            } else if (kind == MOE_KIND_COPY) {
                axpy(dxr, gq, dy, C);
            }
        }
    }

    // 2. weight gradients: pairs grouped by expert (stable counting sort), token order in each
    int* offsets = s->moe_pair_offsets;
    int* list = s->moe_pair_list;
    for (int e = 0; e <= Et; e++) offsets[e] = 0;
    for (size_t q = 0; q < P; q++) offsets[idx[q] + 1]++;
    for (int e = 0; e < Et; e++) offsets[e + 1] += offsets[e];
    for (size_t q = 0; q < P; q++) list[offsets[idx[q]]++] = (int)q;
    for (int e = Et; e > 0; e--) offsets[e] = offsets[e - 1];
    offsets[0] = 0;
    float* dW1 = g[PARAM_MOE_W1] + (size_t)l * E * 2 * Ie * C;
    float* dW2 = g[PARAM_MOE_W2] + (size_t)l * E * C * Ie;
    float* dcvec = g[PARAM_MOE_CONST] + (size_t)l * Kc * C;
    float* dcmix = g[PARAM_MOE_CONSTMIX] + (size_t)l * Kc * 2 * C;
    #pragma omp parallel for schedule(dynamic, 1)
    for (int e = 0; e < E + Kc; e++) {
        int kind = moe_expert_kind(c, e);
        for (int t = offsets[e]; t < offsets[e + 1]; t++) {
            size_t q = (size_t)list[t];
            const float* dy = dout + (q / k) * C;
            const float* xr = xe + (q / k) * C;
            float gq = gate[q];
            if (kind == MOE_KIND_FFN) {
                float* dw1 = dW1 + (size_t)e * 2 * Ie * C;
                float* dw2 = dW2 + (size_t)e * C * Ie;
                for (int i = 0; i < C; i++) axpy(dw2 + (size_t)i * Ie, gq * dy[i], h + q * Ie, Ie);
                for (int j = 0; j < 2 * Ie; j++) axpy(dw1 + (size_t)j * C, dfch[q * 2 * Ie + j], xr, C);
            } else {
                float* dA = dcmix + (size_t)(e - E) * 2 * C;
                axpy(dA, dmix[2 * q], xr, C);
                axpy(dA + C, dmix[2 * q + 1], xr, C);
                axpy(dcvec + (size_t)(e - E) * C, gq * mix[2 * q + 1], dy, C);
            }
        }
    }

    // 3. gates and balance loss -> dp -> dz (softmax), plus the carry of the layer above
    float* aux_grad = s->moe_aux_grad;  // d L_aux / d p_{t,i}, the same for every token
    for (int i = 0; i < Et; i++) {
        double fi = (double)Et * counts[i] / ((double)k * BT);
        if (!model->moe_aux_active) aux_grad[i] = 0.0f;
        else aux_grad[i] = (float)((double)loss_scale * model->moe_aux_coef * moe_balance_weight(model, i) * fi / BT);
    }
    float* dz = s->moe_dz;
    int carry = s->moe_carry_valid;
    #pragma omp parallel for
    for (int r = 0; r < BT; r++) {
        float* dp = s->moe_dp + (size_t)r * Et;
        const float* pr = probs + (size_t)r * Et;
        const float* gr = gate + (size_t)r * k;
        const float* dgr = dgate + (size_t)r * k;
        const int* id = idx + (size_t)r * k;
        for (int i = 0; i < Et; i++) dp[i] = aux_grad[i];
        if (!c->moe_norm_topk) {
            for (int m = 0; m < k; m++) dp[id[m]] += dgr[m];
        } else if (denom[r] > 0.0f) {
            float gdg = 0.0f;
            for (int m = 0; m < k; m++) gdg += gr[m] * dgr[m];
            for (int m = 0; m < k; m++) {
                if (moe_expert_kind(c, id[m]) != MOE_KIND_ZERO) dp[id[m]] += (dgr[m] - gdg) / denom[r];
            }
        }
        float pdp = 0.0f;
        for (int i = 0; i < Et; i++) pdp += pr[i] * dp[i];
        float* dzr = dz + (size_t)r * Et;
        for (int i = 0; i < Et; i++) {
            dzr[i] = pr[i] * (dp[i] - pdp);
            if (carry) dzr[i] += s->moe_carry[(size_t)r * Et + i];
        }
    }

    // 4. router: dW_r, dx; gating residual: dG_l and the carry into layer l-1's logits
    if (c->moe_input_scale) {  // d(k x) = k dxe, added once per element after the experts' sums
        for (size_t i = 0; i < (size_t)BT * C; i++) dx[i] += (float)k * dxe[i];
    }
    if (c->moe_router == MOE_ROUTER_TANH) {
        int RH = MOE_TANH_WIDTH * Et;
        const float* rh = a->moe_rh + (size_t)l * BT * RH;
        float* drh = s->moe_drh;
        memset(drh, 0, (size_t)BT * RH * sizeof(float));
        matmul_backward(drh, g[PARAM_MOE_ROUTER2] + (size_t)l * Et * RH, NULL, dz, rh,
                        p[PARAM_MOE_ROUTER2] + (size_t)l * Et * RH, BT, RH, Et);
        for (size_t i = 0; i < (size_t)BT * RH; i++) drh[i] *= 1.0f - rh[i] * rh[i];
        matmul_backward(dx, g[PARAM_MOE_ROUTERW] + (size_t)l * RH * C, NULL, drh, x,
                        p[PARAM_MOE_ROUTERW] + (size_t)l * RH * C, BT, C, RH);
    } else {
        matmul_backward(dx, g[PARAM_MOE_ROUTERW] + (size_t)l * Et * C, NULL, dz, x,
                        p[PARAM_MOE_ROUTERW] + (size_t)l * Et * C, BT, C, Et);
    }
    s->moe_carry_valid = c->moe_gate_res && l > 0;
    if (s->moe_carry_valid) {
        memset(s->moe_carry, 0, (size_t)BT * Et * sizeof(float));
        matmul_backward(s->moe_carry, g[PARAM_MOE_GATEMAP] + (size_t)l * Et * Et, NULL, dz,
                        a->moe_logits + (size_t)(l - 1) * BT * Et, p[PARAM_MOE_GATEMAP] + (size_t)l * Et * Et, BT, Et,
                        Et);
    }
}

// DeepSeek-V3's loss-free balancing (docs/design.md §10.5), after an optimiser step: each FFN
// expert's bias moves by rate towards the mean load; counts (L, E_t) are the step's pairs.
// Integer comparison, so the update is exact and the same on every rank.
void moe_bias_update(GPT* model, const long long* counts, float rate) {
    const ModelConfig* c = &model->config;
    int Et = model_config_moe_routed(c), E = c->moe_experts;
    if (c->ffn_kind != FFN_MOE || rate <= 0.0f || E == 0) return;
    for (int l = 0; l < c->num_layers; l++) {
        const long long* cl = counts + (size_t)l * Et;
        float* b = model->param_tensors[PARAM_MOE_BIAS] + (size_t)l * Et;
        long long total = 0;
        for (int i = 0; i < E; i++) total += cl[i];
        for (int i = 0; i < E; i++) {
            long long diff = total - (long long)E * cl[i];  // E (mean - c_i)
            b[i] += diff > 0 ? rate : (diff < 0 ? -rate : 0.0f);
        }
    }
}

// Forward pass. Logits (B, T, Vp) land in model->logits; with targets, model->mean_loss is the
// mean cross-entropy over the B*T tokens (else -1). training=1: router BN normalises with the
// batch statistics and updates the running statistics; training=0: it uses the running ones.
void gpt_forward(GPT* model, const int* inputs, const int* targets, int B, int T, int training) {
    const ModelConfig* c = &model->config;
    if (B < 1 || T < 1 || T > c->max_seq_len) {
        fprintf(stderr, "Error: gpt_forward: need B >= 1 and 1 <= T <= max_seq_len=%d, got B=%d T=%d\n",
                c->max_seq_len, B, T);
        exit(EXIT_FAILURE);
    }
    int omni = c->ffn_kind == FFN_OMNI;
    int use_bn = omni && c->router_norm == ROUTER_NORM_BN;
    if (use_bn && training && B * T < 2) {
        fprintf(stderr, "Error: gpt_forward: router batch norm in training mode needs B*T >= 2 tokens (got 1)\n");
        exit(EXIT_FAILURE);
    }
    size_t BT = (size_t)B * T;
    check_tokens(inputs, BT, c->vocab_size, "inputs");
    if (targets != NULL) check_tokens(targets, BT, c->vocab_size, "targets");
    ensure_activations(model, B, T);
    model->B = B;
    model->T = T;
    memcpy(model->inputs, inputs, BT * sizeof(int));
    if (targets != NULL) memcpy(model->targets, targets, BT * sizeof(int));

    int L = c->num_layers, C = c->channels, NH = c->num_heads, V = c->vocab_size, Vp = c->padded_vocab_size;
    int H = (int)model_config_dense_width(c), FR = c->ffn_kind == FFN_GELU ? H : 2 * H;
    int n = omni ? c->router_n : 0, R = 2 * n, k = omni ? c->top_k : 0;
    int moe = c->ffn_kind == FFN_MOE, moe_aux = moe && training && model->moe_aux_coef > 0.0f;
    double aux_loss = 0.0;
    GPTActivations* a = &model->acts;
    float** p = model->param_tensors;

    encoder_forward(a->encoded, inputs, p[PARAM_WTE], p[PARAM_WPE], B, T, C);
    for (int l = 0; l < L; l++) {
        const float* residual = l == 0 ? a->encoded : a->residual3 + (size_t)(l - 1) * BT * C;
        float* l_ln1 = a->ln1 + (size_t)l * BT * C;
        float* l_qkv = a->qkv + (size_t)l * BT * 3 * C;
        float* l_atty = a->atty + (size_t)l * BT * C;
        float* l_att = a->att + (size_t)l * B * NH * T * T;
        float* l_attproj = a->attproj + (size_t)l * BT * C;
        float* l_residual2 = a->residual2 + (size_t)l * BT * C;
        float* l_ln2 = a->ln2 + (size_t)l * BT * C;
        float* l_fch = a->fch + (size_t)l * BT * FR;
        float* l_fch_act = a->fch_act + (size_t)l * BT * H;
        float* l_ffn_out = a->ffn_out + (size_t)l * BT * C;
        float* l_residual3 = a->residual3 + (size_t)l * BT * C;

        // attention block
        layernorm_forward(l_ln1, a->ln1_mean + (size_t)l * BT, a->ln1_rstd + (size_t)l * BT, residual,
                          p[PARAM_LN1W] + (size_t)l * C, p[PARAM_LN1B] + (size_t)l * C, BT, C);
        matmul_forward(l_qkv, l_ln1, p[PARAM_QKVW] + (size_t)l * 3 * C * C, p[PARAM_QKVB] + (size_t)l * 3 * C, BT, C, 3 * C);
        attention_forward(l_atty, l_att, l_qkv, B, T, C, NH);
        matmul_forward(l_attproj, l_atty, p[PARAM_ATTPROJW] + (size_t)l * C * C, p[PARAM_ATTPROJB] + (size_t)l * C, BT, C, C);
        residual_forward(l_residual2, residual, l_attproj, BT * C);

        // feed-forward block
        layernorm_forward(l_ln2, a->ln2_mean + (size_t)l * BT, a->ln2_rstd + (size_t)l * BT, l_residual2,
                          p[PARAM_LN2W] + (size_t)l * C, p[PARAM_LN2B] + (size_t)l * C, BT, C);
        const float* fcw = p[PARAM_FCW] + (size_t)l * FR * C;
        const float* fcprojw = p[PARAM_FCPROJW] + (size_t)l * C * H;
        if (c->ffn_kind == FFN_GELU) {
            matmul_forward(l_fch, l_ln2, fcw, p[PARAM_FCB] + (size_t)l * H, BT, C, H);
            gelu_forward(l_fch_act, l_fch, BT * H);
            matmul_forward(l_ffn_out, l_fch_act, fcprojw, p[PARAM_FCPROJB] + (size_t)l * C, BT, H, C);
        } else {
            // shared SwiGLU (the whole FFN for swiglu)
            matmul_forward(l_fch, l_ln2, fcw, NULL, BT, C, 2 * H);
            swiglu_forward(l_fch_act, l_fch, BT, H);
            matmul_forward(l_ffn_out, l_fch_act, fcprojw, NULL, BT, H, C);
        }
        if (omni) {
            // router -> BN -> log_softmax per half -> top-k + gates -> atomic experts
            float* l_rlog = a->router_logits + (size_t)l * BT * R;
            float* l_rnorm = a->router_normed + (size_t)l * BT * R;
            float* l_logp = a->router_logp + (size_t)l * BT * R;
            size_t pk = (size_t)l * BT * k;
            matmul_forward(l_rlog, l_ln2, p[PARAM_ROUTERW] + (size_t)l * R * C, NULL, BT, C, R);
            if (use_bn) {
                float* running_mean = model->bn_stats + (size_t)l * 2 * R;
                batchnorm_forward(l_rnorm, a->bn_mean + (size_t)l * R, a->bn_rstd + (size_t)l * R, l_rlog,
                                  running_mean, running_mean + R, (int)BT, R, training, training);
            } else {
                memcpy(l_rnorm, l_rlog, BT * R * sizeof(float));
            }
            router_logsoftmax_forward(l_logp, l_rnorm, (int)BT, n);
            omni_route_forward(a->topk_idx + pk, a->topk_score + pk, a->gate + pk, l_logp, (int)BT, n, k, c->gate);
            omni_experts_forward(l_ffn_out, a->expert_s + pk, a->expert_a + pk, l_ln2, a->topk_idx + pk,
                                 a->gate + pk, p[PARAM_EXPERTU] + (size_t)l * c->num_experts * C,
                                 p[PARAM_EXPERTV] + (size_t)l * c->num_experts * C, (int)BT, C, k);
        }
        if (moe) aux_loss += moe_layer_forward(model, l, l_ffn_out, l_ln2, (int)BT, moe_aux);
        residual_forward(l_residual3, l_residual2, l_ffn_out, BT * C);
    }
    const float* residual = a->residual3 + (size_t)(L - 1) * BT * C;
    layernorm_forward(a->lnf, a->lnf_mean, a->lnf_rstd, residual, p[PARAM_LNFW], p[PARAM_LNFB], BT, C);
    matmul_forward(model->logits, a->lnf, p[PARAM_WTE], NULL, BT, C, Vp);  // tied LM head, all Vp columns
    model->bn_used_batch_stats = use_bn && training;
    model->moe_aux_loss = aux_loss;
    model->moe_aux_active = moe_aux;
    if (targets != NULL) {
        crossentropy_forward(a->losses, a->lse, model->logits, targets, BT, V, Vp);
        double sum = 0.0;  // the batch mean in double, in token order
        for (size_t r = 0; r < BT; r++) sum += a->losses[r];
        model->mean_loss = moe_aux ? (float)(sum / BT + aux_loss) : (float)(sum / BT);
        model->have_targets = 1;
    } else {
        model->mean_loss = -1.0f;
        model->have_targets = 0;
    }
}

// evaluation mode (training 0: router BN uses its running statistics, nothing is updated): the
// per-token losses of (B, T) inputs and targets into losses (B*T floats, overwritten)
void gpt_forward_losses(GPT* model, float* losses, const int* inputs, const int* targets, int B, int T) {
    gpt_forward(model, inputs, targets, B, T, 0);
    memcpy(losses, model->acts.losses, (size_t)B * T * sizeof(float));
}

void gpt_zero_grad(GPT* model) {
    memset(model->grads, 0, model->num_params * sizeof(float));
}

// Backward pass of the last forward (which must have had targets): grads += loss_scale *
// d(mean_loss)/d(params). Gradient accumulation: loss_scale = 1/accum_steps on each micro-batch.
void gpt_backward(GPT* model, float loss_scale) {
    if (!model->have_targets) {
        fprintf(stderr, "Error: gpt_backward needs a preceding gpt_forward with targets\n");
        exit(EXIT_FAILURE);
    }
    const ModelConfig* c = &model->config;
    int B = model->B, T = model->T;
    size_t BT = (size_t)B * T;
    int L = c->num_layers, C = c->channels, NH = c->num_heads, V = c->vocab_size, Vp = c->padded_vocab_size;
    int H = (int)model_config_dense_width(c), FR = c->ffn_kind == FFN_GELU ? H : 2 * H;
    int omni = c->ffn_kind == FFN_OMNI, moe = c->ffn_kind == FFN_MOE;
    int n = omni ? c->router_n : 0, R = 2 * n, k = omni ? c->top_k : 0, N = omni ? c->num_experts : 0;
    GPTActivations* a = &model->acts;
    GPTBackwardScratch* s = &model->scratch;
    float** p = model->param_tensors;
    float** g = model->grad_tensors;

    // head: the mean over BT tokens gives each token's loss the weight loss_scale / BT
    crossentropy_backward(s->dlogits, model->logits, a->lse, model->targets, loss_scale / (float)BT, (int)BT, V, Vp);
    memset(s->dln, 0, BT * C * sizeof(float));
    matmul_backward(s->dln, g[PARAM_WTE], NULL, s->dlogits, a->lnf, p[PARAM_WTE], (int)BT, C, Vp);
    memset(s->dresidual, 0, BT * C * sizeof(float));
    const float* last_residual = a->residual3 + (size_t)(L - 1) * BT * C;
    layernorm_backward(s->dresidual, g[PARAM_LNFW], g[PARAM_LNFB], s->dln, last_residual, p[PARAM_LNFW],
                       a->lnf_mean, a->lnf_rstd, (int)BT, C);
    s->moe_carry_valid = 0;

    for (int l = L - 1; l >= 0; l--) {
        // s->dresidual holds d loss / d residual3[l]
        const float* residual = l == 0 ? a->encoded : a->residual3 + (size_t)(l - 1) * BT * C;
        const float* l_ln1 = a->ln1 + (size_t)l * BT * C;
        const float* l_qkv = a->qkv + (size_t)l * BT * 3 * C;
        const float* l_atty = a->atty + (size_t)l * BT * C;
        const float* l_att = a->att + (size_t)l * B * NH * T * T;
        const float* l_residual2 = a->residual2 + (size_t)l * BT * C;
        const float* l_ln2 = a->ln2 + (size_t)l * BT * C;
        const float* l_fch = a->fch + (size_t)l * BT * FR;
        const float* l_fch_act = a->fch_act + (size_t)l * BT * H;
        const float* fcw = p[PARAM_FCW] + (size_t)l * FR * C;
        const float* fcprojw = p[PARAM_FCPROJW] + (size_t)l * C * H;
        float* dfcw = g[PARAM_FCW] + (size_t)l * FR * C;
        float* dfcprojw = g[PARAM_FCPROJW] + (size_t)l * C * H;

        // feed-forward block: dffn_out = dresidual; everything lands in dln = d loss / d ln2
        memset(s->dfch_act, 0, BT * H * sizeof(float));
        memset(s->dln, 0, BT * C * sizeof(float));
        if (c->ffn_kind == FFN_GELU) {
            matmul_backward(s->dfch_act, dfcprojw, g[PARAM_FCPROJB] + (size_t)l * C, s->dresidual, l_fch_act,
                            fcprojw, (int)BT, H, C);
            gelu_backward(s->dfch, l_fch, s->dfch_act, BT * H);
            matmul_backward(s->dln, dfcw, g[PARAM_FCB] + (size_t)l * H, s->dfch, l_ln2, fcw, (int)BT, C, H);
        } else {
            matmul_backward(s->dfch_act, dfcprojw, NULL, s->dresidual, l_fch_act, fcprojw, (int)BT, H, C);
            swiglu_backward(s->dfch, s->dfch_act, l_fch, (int)BT, H);
            matmul_backward(s->dln, dfcw, NULL, s->dfch, l_ln2, fcw, (int)BT, C, 2 * H);
        }
        if (moe) moe_layer_backward(model, l, s->dln, s->dresidual, l_ln2, (int)BT, loss_scale);
        if (omni) {
            size_t pk = (size_t)l * BT * k;
            const float* U = p[PARAM_EXPERTU] + (size_t)l * N * C;
            const float* Vx = p[PARAM_EXPERTV] + (size_t)l * N * C;
            // experts: dX, dU, dV and the gate gradients
            omni_experts_backward(s->dln, g[PARAM_EXPERTU] + (size_t)l * N * C, g[PARAM_EXPERTV] + (size_t)l * N * C,
                                  s->dgate, s->ds, s->pair_offsets, s->pair_list, s->dresidual, l_ln2,
                                  a->topk_idx + pk, a->gate + pk, a->expert_s + pk, a->expert_a + pk, U, Vx,
                                  (int)BT, C, k, N);
            // gates -> scores -> (pr, pc) -> BN output -> router logits
            omni_gate_backward(s->dscore, s->dgate, a->gate + pk, (int)BT, k, c->gate);
            omni_route_backward(s->drouter_a, s->dscore, a->topk_idx + pk, (int)BT, n, k);
            router_logsoftmax_backward(s->drouter_b, s->drouter_a, a->router_logp + (size_t)l * BT * R, (int)BT, n);
            const float* drouter_logits = s->drouter_b;
            if (c->router_norm == ROUTER_NORM_BN) {
                batchnorm_backward(s->drouter_a, s->drouter_b, a->router_normed + (size_t)l * BT * R,
                                   a->bn_rstd + (size_t)l * R, (int)BT, R, model->bn_used_batch_stats);
                drouter_logits = s->drouter_a;
            }
            matmul_backward(s->dln, g[PARAM_ROUTERW] + (size_t)l * R * C, NULL, drouter_logits, l_ln2,
                            p[PARAM_ROUTERW] + (size_t)l * R * C, (int)BT, C, R);
        }
        // dresidual becomes d loss / d residual2[l]
        layernorm_backward(s->dresidual, g[PARAM_LN2W] + (size_t)l * C, g[PARAM_LN2B] + (size_t)l * C, s->dln,
                           l_residual2, p[PARAM_LN2W] + (size_t)l * C, a->ln2_mean + (size_t)l * BT,
                           a->ln2_rstd + (size_t)l * BT, (int)BT, C);

        // attention block: dattproj = dresidual
        memset(s->datty, 0, BT * C * sizeof(float));
        matmul_backward(s->datty, g[PARAM_ATTPROJW] + (size_t)l * C * C, g[PARAM_ATTPROJB] + (size_t)l * C,
                        s->dresidual, l_atty, p[PARAM_ATTPROJW] + (size_t)l * C * C, (int)BT, C, C);
        memset(s->dqkv, 0, BT * 3 * C * sizeof(float));
        attention_backward(s->dqkv, s->datt_row, s->datty, l_qkv, l_att, B, T, C, NH);
        memset(s->dln, 0, BT * C * sizeof(float));
        matmul_backward(s->dln, g[PARAM_QKVW] + (size_t)l * 3 * C * C, g[PARAM_QKVB] + (size_t)l * 3 * C, s->dqkv,
                        l_ln1, p[PARAM_QKVW] + (size_t)l * 3 * C * C, (int)BT, C, 3 * C);
        // dresidual becomes d loss / d residual3[l-1] (or d encoded)
        layernorm_backward(s->dresidual, g[PARAM_LN1W] + (size_t)l * C, g[PARAM_LN1B] + (size_t)l * C, s->dln,
                           residual, p[PARAM_LN1W] + (size_t)l * C, a->ln1_mean + (size_t)l * BT,
                           a->ln1_rstd + (size_t)l * BT, (int)BT, C);
    }
    encoder_backward(g[PARAM_WTE], g[PARAM_WPE], s->dresidual, model->inputs, B, T, C);
}

// L2 norm of all gradients, in double, summed in a fixed order
static float gpt_grad_norm(const GPT* model) {
    double sum = 0.0;
    for (size_t i = 0; i < model->num_params; i++) sum += (double)model->grads[i] * model->grads[i];
    return (float)sqrt(sum);
}

// One AdamW step on one contiguous range of one tensor, in place: g = grad * grad_scale enters m
// and v, then param -= lr * (m_hat / (sqrt(v_hat) + eps) + weight_decay * param). gpt_update runs
// it per tensor; the ZeRO-1 test (test_zero_ranks.c) runs it per shard range of packed state.
void adamw_range(float* param, const float* grad, float* m, float* v, size_t n, float lr, float beta1, float beta2,
                 float eps, float weight_decay, float grad_scale, int t) {
    float beta1_correction = 1.0f - powf(beta1, (float)t);
    float beta2_correction = 1.0f - powf(beta2, (float)t);
    #pragma omp parallel for
    for (size_t j = 0; j < n; j++) {
        float gj = grad[j] * grad_scale;
        m[j] = beta1 * m[j] + (1.0f - beta1) * gj;
        v[j] = beta2 * v[j] + (1.0f - beta2) * gj * gj;
        float m_hat = m[j] / beta1_correction;
        float v_hat = v[j] / beta2_correction;
        param[j] -= lr * (m_hat / (sqrtf(v_hat) + eps) + weight_decay * param[j]);
    }
}

// AdamW with bias correction (t = 1, 2, ... counts updates), decoupled weight decay on the
// tensors param_is_decayed() names, and global gradient-norm clipping: when grad_clip > 0 and
// the norm exceeds it, the gradients enter the moments scaled by grad_clip / norm. The stored
// gradients are left as they were. Returns the gradient norm before clipping.
float gpt_update(GPT* model, float lr, float beta1, float beta2, float eps, float weight_decay,
                 float grad_clip, int t) {
    if (t < 1) {
        fprintf(stderr, "Error: gpt_update: the step count t must be >= 1 (bias correction), got %d\n", t);
        exit(EXIT_FAILURE);
    }
    if (model->m == NULL) {
        model->m = alloc_floats(model->num_params);
        model->v = alloc_floats(model->num_params);
    }
    float norm = gpt_grad_norm(model);
    float grad_scale = (grad_clip > 0.0f && norm > grad_clip) ? grad_clip / norm : 1.0f;
    size_t offset = 0;
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) {
        size_t size = model->param_sizes[i];
        float wd = param_is_decayed(i) ? weight_decay : 0.0f;
        adamw_range(model->params + offset, model->grads + offset, model->m + offset, model->v + offset, size, lr,
                    beta1, beta2, eps, wd, grad_scale, t);
        offset += size;
    }
    return norm;
}

void gpt_free(GPT* model) {
    free_activations(model);
    free(model->params);
    free(model->grads);
    free(model->m);
    free(model->v);
    free(model->bn_stats);
    memset(model, 0, sizeof(*model));
}

// ----------------------------------------------------------------------------
// sampling (outside TESTING: the tests run it), with the shared sampler (llmc/sampler.h)

// sampler.h's logits callback: the whole window in evaluation mode, row t - 1's real columns
static void gpt_sample_logits(void* ctx, const int* tokens, int T, int t, float* out) {
    GPT* model = (GPT*)ctx;
    gpt_forward(model, tokens, NULL, 1, T, 0);
    memcpy(out, model->logits + (size_t)(t - 1) * model->config.padded_vocab_size,
           (size_t)model->config.vocab_size * sizeof(float));
}

// prints gen_tokens - 1 tokens sampled after an end-of-text token and, when out_tokens is not
// NULL, stores the gen_tokens tokens there (end-of-text first)
void sample_and_print(GPT* model, const Tokenizer* tokenizer, Rng* rng, int gen_tokens, int* out_tokens) {
    sample_and_print_with(gpt_sample_logits, model, model->config.vocab_size, gen_tokens, tokenizer, rng, out_tokens);
}

#ifndef TESTING
// ----------------------------------------------------------------------------
// the CPU reference trainer
//
//   ./train_omnimoe_cpu                         'small' omni model on tinyshakespeare, CPU-sized run
//   ./train_omnimoe_cpu -e tiny -f swiglu -x 20
//   ./train_omnimoe_cpu --help                  every flag (llmc/args.h), with this trainer's defaults
//
// Same flags, schedule, data loader, log, checkpoint format and loop (llmc/train_loop.h) as the
// CUDA trainer. Where it differs, all in this backend: one process (sum_ranks does nothing, the
// stop request is the process's own); the expert branch runs token-centric
// (--expert-exec is accepted and has no effect); the expert statistics come from host counts;
// no MFU; the tokenizer is loaded only when -s asks for samples.

#include "llmc/args.h"
#include "llmc/checkpoint.h"
#include "llmc/dataloader.h"
#include "llmc/train_loop.h"
#include "llmc/memory_plan.h"

typedef struct {
    const TrainConfig* cfg;
    GPT model;
    float* file_params;          // -e <file>: its weights and BN statistics (NULL for a preset)
    float* file_bn;
    DataLoader train_loader, val_loader;
    int grad_accum_steps;
    int omni_layers;             // layers with experts (omni or moe)
    int count_experts;           // experts counted per layer: N (omni) or the E_t routed ones (moe)
    long long* expert_counts;    // (omni_layers, count_experts) expert loads of the last step
} CpuTrainer;

static void cpu_init_weights(void* ctx) {
    CpuTrainer* tr = (CpuTrainer*)ctx;
    GPT* model = &tr->model;
    if (tr->file_params != NULL) {
        memcpy(model->params, tr->file_params, model->num_params * sizeof(float));
        if (model->num_bn_stats > 0) memcpy(model->bn_stats, tr->file_bn, model->num_bn_stats * sizeof(float));
        printf("| weights from %s\n", tr->cfg->model);
    } else {
        gpt_init_random(model, tr->cfg->seed);
    }
}

// grad_accum_steps micro-batches, each weighted 1/grad_accum_steps, then one AdamW update
static void cpu_train_step(void* ctx, int step, float lr, int t, const volatile sig_atomic_t* stop_local,
                           int log_failed_local, TrainStepResult* out) {
    (void)step;
    CpuTrainer* tr = (CpuTrainer*)ctx;
    const TrainConfig* cfg = tr->cfg;
    GPT* model = &tr->model;
    const ModelConfig* c = &model->config;
    gpt_zero_grad(model);
    if (tr->omni_layers > 0) memset(tr->expert_counts, 0, (size_t)tr->omni_layers * tr->count_experts * sizeof(long long));
    double loss_sum = 0.0;
    for (int micro = 0; micro < tr->grad_accum_steps; micro++) {
        dataloader_next_batch(&tr->train_loader);
        gpt_forward(model, tr->train_loader.inputs, tr->train_loader.targets, cfg->B, cfg->T, 1);
        gpt_backward(model, 1.0f / tr->grad_accum_steps);
        loss_sum += model->mean_loss;
        if (c->ffn_kind == FFN_MOE) {  // the forward already counted each layer's pairs (acts.moe_counts)
            size_t n = (size_t)tr->omni_layers * tr->count_experts;
            for (size_t i = 0; i < n; i++) tr->expert_counts[i] += model->acts.moe_counts[i];
        } else {
            size_t per_layer = (size_t)cfg->B * cfg->T * c->top_k;
            for (int l = 0; l < tr->omni_layers; l++) {
                const int* idx = model->acts.topk_idx + (size_t)l * per_layer;
                for (size_t p = 0; p < per_layer; p++) tr->expert_counts[(size_t)l * tr->count_experts + idx[p]]++;
            }
        }
    }
    out->norm = gpt_update(model, lr, cfg->beta1, cfg->beta2, cfg->eps, cfg->weight_decay, cfg->grad_clip, t);
    moe_bias_update(model, tr->expert_counts, cfg->moe_bias_rate);  // moe with --moe-bias-rate only
    out->loss = (float)(loss_sum / tr->grad_accum_steps);
    out->stop = *stop_local != 0;
    out->log_failed = log_failed_local != 0;
}

// evaluation mode: router BN uses the running statistics, so the model is a fixed function of
// each sequence
static float cpu_forward_loss(void* ctx, const int* inputs, const int* targets, int B, int T) {
    GPT* model = &((CpuTrainer*)ctx)->model;
    gpt_forward(model, inputs, targets, B, T, 0);
    return model->mean_loss;
}

static void cpu_forward_losses(void* ctx, float* losses, const int* inputs, const int* targets, int B, int T) {
    gpt_forward_losses(&((CpuTrainer*)ctx)->model, losses, inputs, targets, B, T);
}

static void cpu_sample_logits(void* ctx, const int* tokens, int T, int t, float* out) {
    gpt_sample_logits(&((CpuTrainer*)ctx)->model, tokens, T, t, out);
}

static int cpu_save_checkpoint(void* ctx, const CheckpointInfo* info, const DataLoaderState* loader,
                               const uint64_t* sample_rng, char* out_path) {
    CpuTrainer* tr = (CpuTrainer*)ctx;
    GPT* model = &tr->model;
    return checkpoint_write(tr->cfg->output_dir, &model->config, info, model->params, model->m, model->v,
                            model->bn_stats, 1, loader, sizeof(*loader), sample_rng, sizeof(*sample_rng), out_path);
}

// one process: checkpoint_read exits on a bad file (nobody waits), so this returns 0
static int cpu_load_checkpoint(void* ctx, const char* path, CheckpointInfo* info, DataLoaderState* loader,
                               uint64_t* sample_rng) {
    GPT* model = &((CpuTrainer*)ctx)->model;
    model->m = alloc_floats(model->num_params);
    model->v = alloc_floats(model->num_params);
    checkpoint_read(path, &model->config, info, model->params, model->m, model->v, model->bn_stats, 1, loader,
                    sizeof(*loader), sample_rng, sizeof(*sample_rng));
    return 0;
}

// per OmniMoE layer: share of the N experts chosen at least once and KL(load || uniform);
// per moe layer the same over its E FFN experts
static void cpu_expert_stats(void* ctx, float* usage, float* kl) {
    CpuTrainer* tr = (CpuTrainer*)ctx;
    const ModelConfig* c = &tr->model.config;
    int N = c->ffn_kind == FFN_MOE ? c->moe_experts : c->num_experts;
    int* counts = alloc_ints(N);
    for (int l = 0; l < tr->omni_layers; l++) {
        for (int e = 0; e < N; e++) counts[e] = (int)tr->expert_counts[(size_t)l * tr->count_experts + e];
        expert_load_stats(counts, N, &usage[l], &kl[l]);
    }
    free(counts);
}

// per moe layer: the share of the step's (token, slot) pairs that went to FFN, zero, copy and
// constant experts (4 floats per layer, in that order)
static void cpu_expert_kind_shares(void* ctx, float* shares) {
    CpuTrainer* tr = (CpuTrainer*)ctx;
    const ModelConfig* c = &tr->model.config;
    static const int slot_of_kind[4] = {0, 3, 2, 1};  // MOE_KIND_FFN/CONST/COPY/ZERO -> FFN/zero/copy/const
    for (int l = 0; l < tr->omni_layers; l++) {
        long long by_kind[4] = {0, 0, 0, 0}, total = 0;
        for (int e = 0; e < tr->count_experts; e++) {
            long long n = tr->expert_counts[(size_t)l * tr->count_experts + e];
            by_kind[slot_of_kind[moe_expert_kind(c, e)]] += n;
            total += n;
        }
        for (int j = 0; j < 4; j++) shares[4 * l + j] = total > 0 ? (float)((double)by_kind[j] / total) : 0.0f;
    }
}

static int cpu_write_model(void* ctx, const char* path) {
    GPT* model = &((CpuTrainer*)ctx)->model;
    return model_file_write(path, &model->config, model->params, model->bn_stats);
}

// one process: the sums over ranks are the values themselves
static void cpu_sum_ranks(void* ctx, double* values, int n) {
    (void)ctx;
    (void)values;
    (void)n;
}

int main(int argc, char** argv) {
    // defaults sized for a CPU: the 'small' preset, short sequences, a short run
    TrainConfig cfg;
    train_config_defaults(&cfg);
    strcpy(cfg.model, "small");
    cfg.B = 4;
    cfg.T = 64;
    cfg.num_steps = 100;
    cfg.learning_rate = 2e-3f;
    cfg.warmup_steps = 10;
    cfg.val_every = 25;
    cfg.val_max_batches = 4;
    cfg.sample_every = 0;
    cfg.gen_tokens = 32;
    train_config_parse(&cfg, argc, argv);
    if (cfg.plan_gpus > 0) return train_config_plan_main(&cfg, 2);  // the CUDA trainer's memory, bf16 build
    if (cfg.launch_processes != 1) {
        fprintf(stderr, "Error: flag -pn %d: the CPU reference trainer runs as one process; several processes "
                "(one per GPU) are the CUDA trainer's (./train_omnimoe)\n", cfg.launch_processes);
        exit(EXIT_FAILURE);
    }
    if (cfg.zero) {
        fprintf(stderr, "Error: flag --zero 1: the CPU reference trainer runs as one process and keeps the whole "
                "optimizer state; ZeRO-1 shards it over the CUDA trainer's processes (test_zero_ranks simulates it)\n");
        exit(EXIT_FAILURE);
    }
    if (cfg.attention != ATTENTION_OURS) {
        fprintf(stderr, "Error: flag --attention cudnn: cuDNN's attention is the CUDA trainer's (./train_omnimoe); "
                "the CPU reference has one attention\n");
        exit(EXIT_FAILURE);
    }
    if (cfg.recompute != 0) {
        fprintf(stderr, "Error: flag -r (--recompute) %d: activation recomputation is the CUDA trainer's "
                "(./train_omnimoe); the CPU reference keeps every activation (use -r 0)\n", cfg.recompute);
        exit(EXIT_FAILURE);
    }
    if (cfg.moe_gemm != 1) {
        fprintf(stderr, "Error: flag --moe-gemm: the grouped GEMM backends are the CUDA trainer's (./train_omnimoe); "
                "the CPU reference loops over the experts (leave --moe-gemm unset)\n");
        exit(EXIT_FAILURE);
    }
    if (cfg.moe_token_reads != 0) {
        fprintf(stderr, "Error: flag --moe-token-reads %d: the grouped GEMMs' token reads are the CUDA trainer's "
                "(./train_omnimoe, --moe-gemm cutlass); the CPU reference has no gathered copies to skip (leave it unset)\n",
                cfg.moe_token_reads);
        exit(EXIT_FAILURE);
    }
    if (cfg.matmul_tune != 0) {
        fprintf(stderr, "Error: flag --matmul-tune %d: choosing among cuBLASLt's GEMM kernels is the CUDA trainer's "
                "(./train_omnimoe); the CPU reference has none (use --matmul-tune 0)\n", cfg.matmul_tune);
        exit(EXIT_FAILURE);
    }
    if (cfg.overlap_dweight != 0) {
        fprintf(stderr, "Error: flag --overlap-dweight %d: a second GPU stream is the CUDA trainer's (./train_omnimoe); "
                "the CPU reference has none (use --overlap-dweight 0)\n", cfg.overlap_dweight);
        exit(EXIT_FAILURE);
    }
    if (cfg.gelu_fusion != 1) {
        fprintf(stderr, "Error: flag --gelu-fusion %d: where the GELU is computed (GEMM epilogues or not) is the "
                "CUDA trainer's (./train_omnimoe); the CPU reference computes it on its own (use --gelu-fusion 1)\n",
                cfg.gelu_fusion);
        exit(EXIT_FAILURE);
    }

    // the model: a preset (+ flags) or a model file
    CpuTrainer tr;
    memset(&tr, 0, sizeof(tr));
    tr.cfg = &cfg;
    ModelConfig model_config;
    if (!train_config_model(&cfg, &model_config)) {
        model_file_read_config(cfg.model, &model_config);
        train_config_check_file_model(&cfg, &model_config);
        model_file_read(cfg.model, &model_config, &tr.file_params, &tr.file_bn);
    }
    train_config_validate(&cfg, &model_config);
    tr.grad_accum_steps = train_config_grad_accum_steps(&cfg);
    train_config_print(&cfg);
    model_config_print(&model_config);
#ifdef _OPENMP
    printf("| OpenMP threads: %d\n", omp_get_max_threads());
#endif
    gpt_build(&tr.model, &model_config);

    int V = model_config.vocab_size;
    dataloader_init(&tr.train_loader, cfg.train_data_pattern, cfg.B, cfg.T, 0, 1, cfg.shuffle, cfg.seed, V);
    int have_val = cfg.val_data_pattern[0] != '\0' && cfg.val_every > 0;
    if (have_val) dataloader_init(&tr.val_loader, cfg.val_data_pattern, cfg.B, cfg.T, 0, 1, 0, cfg.seed, V);
    printf("| train: %lld tokens in %d shard(s), %lld batches per epoch; grad accumulation %d (%lld tokens/step)\n",
           (long long)tr.train_loader.total_tokens, tr.train_loader.num_shards,
           (long long)dataloader_num_batches(&tr.train_loader), tr.grad_accum_steps,
           train_config_total_batch_tokens(&cfg));
    if (have_val) printf("| val: %lld tokens, %lld batches (using up to %d)\n", (long long)tr.val_loader.total_tokens,
                         (long long)dataloader_num_batches(&tr.val_loader), cfg.val_max_batches);
    Tokenizer tokenizer;
    memset(&tokenizer, 0, sizeof(tokenizer));
    int tokenizer_failed = cfg.sample_every > 0 && tokenizer_init(&tokenizer, "data/gpt2_tokenizer.bin") != 0;
    int moe = model_config.ffn_kind == FFN_MOE;
    tr.omni_layers = model_config.ffn_kind == FFN_OMNI || moe ? model_config.num_layers : 0;
    tr.count_experts = moe ? model_config_moe_routed(&model_config) : model_config.num_experts;
    tr.expert_counts = (long long*)calloc_check((size_t)tr.omni_layers * (tr.count_experts > 0 ? tr.count_experts : 1)
                                                + 1, sizeof(long long));
    tr.model.moe_aux_coef = cfg.moe_aux;
    tr.model.moe_zc_weight = cfg.moe_zc_weight;

    TrainBackend be = {0};
    be.ctx = &tr;
    be.rank = 0;
    be.num_processes = 1;
    be.num_omni_layers = tr.omni_layers;
    be.vocab_size = V;
    be.model_config = &tr.model.config;
    be.sample_T = cfg.gen_tokens;
    be.init_weights = cpu_init_weights;
    be.train_step = cpu_train_step;
    be.forward_loss = cpu_forward_loss;
    be.forward_losses = cpu_forward_losses;
    be.sample_logits = cpu_sample_logits;
    be.save_checkpoint = cpu_save_checkpoint;
    be.load_checkpoint = cpu_load_checkpoint;
    be.expert_stats = cpu_expert_stats;
    if (moe) be.expert_kind_shares = cpu_expert_kind_shares;
    be.write_model = cpu_write_model;
    be.sum_ranks = cpu_sum_ranks;
    TrainLoop loop = {&cfg, &be, &tr.train_loader, &tr.val_loader, cfg.val_max_batches, &tokenizer, have_val,
                      tokenizer_failed};
    int rc = train_loop_run(&loop);

    free(tr.file_params);
    free(tr.file_bn);
    free(tr.expert_counts);
    tokenizer_free(&tokenizer);
    dataloader_free(&tr.train_loader);
    if (have_val) dataloader_free(&tr.val_loader);
    gpt_free(&tr.model);
    return rc;
}
#endif
