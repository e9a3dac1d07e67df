/*
test_omni.cu - tests of the OmniMoE layer (llmc/omnimoe_layer.cuh: router.cuh, scheduler.cuh,
experts.cuh and the shared SwiGLU; forward and backward, both executions) against a plain CPU
reference.

Build and run from the repository root (or use dev/cuda/run_omni.sh):
  make dev/cuda/test_omni_bin && ./dev/cuda/test_omni_bin
  (./dev/cuda/test_omni_bin --cpu-only: check 0 alone, no GPU)

What is checked (llmc/test_harness.h's output: one PASS/FAIL line per check, named "<case> - <what>",
and a closing "test_omni: N passed, N failed"; any failure makes the exit status 1):
 0. the CPU reference itself: its analytic gradients (X, Wrc, U, V) against central finite
    differences in double, selection held fixed (indices carry no gradient), both norms, both
    gates, k < n and k > n, BN in training and in eval mode.
 1. top-k unit test on crafted log-probabilities: random, exact ties, and adversarial 1-ulp
    near-ties where the plain k' x k' grid is provably wrong (the test asserts it finds such
    tokens); the staircase fast path and the tie fix-up (forced on every token) must equal a brute-force scan
    of all N fp32 sums (sets and order).
 2. per layer case (T=256, d=128, I=64, n=8, k=4 and 16, bn/none, softmax/prob, quantised-logit
    ties, eval-mode BN, odd shapes, k = N), the layer run with its shared SwiGLU (the experts add
    onto the shared branch's Y and dX) and without it (I = 0: Y and dX written):
    - logits vs a double GEMM; BN mean/rstd, running stats, log-probs, gates vs double math on
      the GPU's own logits (so fp32 rounding cannot flip a selection);
    - top-k vs brute force over the GPU's own log-probs: equal sets, equal order;
    - the schedule vs a CPU stable counting sort (exact);
    - every output and gradient vs the double reference of the routed part, fed the GPU's
      selection (s, gate, dgate at 1e-4..1e-5; bf16 outputs Y, dX, dU, dV, dWrc at 1e-2
      relative L2: one or two bf16 roundings (2^-9 relative each) of sums whose inputs are
      exact; measured errors are printed), plus the shared branch's double reference;
    - the shared SwiGLU step by step from the GPU's saved intermediates (fch, fch_act,
      dhidden, dwide, dWd, dWfc), and Y, dX minus the shared branch recomputed on the GPU
      with the same matmul calls (the same bits) against the experts' (and router's) part;
    - dU/dV rows of experts nobody chose are bitwise untouched;
    - token-centric and expert-centric are bitwise identical (all outputs);
    - outputs, saved activations, workspace and scratch are NaN-poisoned before every run;
    - the whole forward+backward run twice gives bitwise identical results;
    - n > 64 and more than 64 staircase candidates take the serial-round selection paths, n <= 64
      the rank-counting ones: the shapes cover both;
    - the whole forward+backward captured in a CUDA graph (global capture mode: any host sync or
      allocation inside would fail the capture; the side stream forks and joins inside it) and
      replayed twice equals the eager run bitwise.
*/
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <algorithm>
#include <vector>
#include "llmc/cuda_utils.cuh"
#include "llmc/omnimoe_layer.cuh"
#include "llmc/test_harness.h"

// ----------------------------------------------------------------------------
// small host helpers

// random data: the project generator (rand.h), drawn in double
static Rng g_rng;
static uint32_t draw_u32(void) { return rng_u32(&g_rng); }
static double draw_uniform(void) { return (draw_u32() + 0.5) / 4294967296.0; }
static double draw_normal(void) { return sqrt(-2.0 * log(draw_uniform())) * cos(6.283185307179586 * draw_uniform()); }

// the check names carry the case they belong to: "<case> - <what>" (no ':' in names: it starts
// the detail)
static char g_case[96] = "";
static void case_name(char* out, size_t size, const char* what) {
    if (g_case[0]) snprintf(out, size, "%s - %s", g_case, what);
    else snprintf(out, size, "%s", what);
}

// one check (test_harness.h): PASS/FAIL "<case>: name[: detail]"
#if defined(__GNUC__)
__attribute__((format(printf, 3, 4)))
#endif
static int record(int ok, const char* name, const char* fmt, ...) {
    char full[256], detail[512];
    case_name(full, sizeof(full), name);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(detail, sizeof(detail), fmt, ap);
    va_end(ap);
    return test_report(ok, full, detail);
}

// relative L2 error of got against a double reference (non-finite values fail)
static int check_rel(const char* what, const float* got, const double* ref, size_t n, double tol) {
    char full[256];
    case_name(full, sizeof(full), what);
    return test_check_rel(full, rel_err_f64(got, ref, n), tol);
}

// accumulated outputs: (got - init) vs grad, relative to ||grad||
static int check_rel_delta(const char* what, const float* got, const float* init, const double* grad, size_t n, double tol) {
    std::vector<float> delta(n);
    for (size_t i = 0; i < n; i++) delta[i] = got[i] - init[i];
    return check_rel(what, delta.data(), grad, n, tol);
}

template <class T>
static T* dev_alloc(size_t count) { return device_alloc<T>(count + 256 / sizeof(T), "test buffer"); }
template <class T>
static std::vector<T> download(const T* dev, size_t count) {
    std::vector<T> h(count);
    cudaCheck(cudaMemcpy(h.data(), dev, count * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
}

// values as the GPU will see them (rounded to floatX), kept in double for the reference
static std::vector<double> to_double(const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); }
static void round_to_floatX(std::vector<float>& v) { for (float& x : v) { x = host_round_to_floatX(x); } }

// ----------------------------------------------------------------------------
// CPU reference of the router + atomic experts (double, written out plainly)

struct CpuLayer {
    int T, d, n, k, use_bn, gate_prob, training;
    std::vector<double> logits, mean, rstd, xhat, logp, S, g, s, a, Y;
    std::vector<int> idx;
};

static double sigmoid_d(double x) { return 1.0 / (1.0 + exp(-x)); }
static double silu_d(double x) { return x * sigmoid_d(x); }

// forward; idx_given != NULL fixes the selection (else exact top-k in double by brute force)
static void cpu_forward(CpuLayer& L, const double* X, const double* W, const double* U, const double* V,
                        const double* run_mean, const double* run_var, const int* idx_given) {
    const int T = L.T, d = L.d, n = L.n, k = L.k, C2 = 2 * n, N = n * n;
    L.logits.assign((size_t)T * C2, 0.0);
    for (int t = 0; t < T; t++)
        for (int c = 0; c < C2; c++) {
            double acc = 0.0;
            for (int i = 0; i < d; i++) acc += X[(size_t)t * d + i] * W[(size_t)c * d + i];
            L.logits[(size_t)t * C2 + c] = acc;
        }
    L.mean.assign(C2, 0.0);
    L.rstd.assign(C2, 1.0);
    L.xhat = L.logits;
    if (L.use_bn) {
        for (int c = 0; c < C2; c++) {
            double mean, var;
            if (L.training) {
                mean = 0.0;
                for (int t = 0; t < T; t++) mean += L.logits[(size_t)t * C2 + c];
                mean /= T;
                var = 0.0;
                for (int t = 0; t < T; t++) { double dv = L.logits[(size_t)t * C2 + c] - mean; var += dv * dv; }
                var /= T;
            } else {
                mean = run_mean[c];
                var = run_var[c];
            }
            L.mean[c] = mean;
            L.rstd[c] = 1.0 / sqrt(var + 1e-5);
            for (int t = 0; t < T; t++) L.xhat[(size_t)t * C2 + c] = (L.logits[(size_t)t * C2 + c] - mean) * L.rstd[c];
        }
    }
    L.logp.assign((size_t)T * C2, 0.0);
    for (int t = 0; t < T; t++)
        for (int half = 0; half < 2; half++) {
            const double* x = &L.xhat[(size_t)t * C2 + half * n];
            double mx = -INFINITY;
            for (int i = 0; i < n; i++) mx = std::max(mx, x[i]);
            double sum = 0.0;
            for (int i = 0; i < n; i++) sum += exp(x[i] - mx);
            double lse = mx + log(sum);
            for (int i = 0; i < n; i++) L.logp[(size_t)t * C2 + half * n + i] = x[i] - lse;
        }
    L.idx.assign((size_t)T * k, 0);
    L.S.assign((size_t)T * k, 0.0);
    L.g.assign((size_t)T * k, 0.0);
    for (int t = 0; t < T; t++) {
        const double* pr = &L.logp[(size_t)t * C2];
        const double* pc = pr + n;
        if (idx_given) {
            for (int m = 0; m < k; m++) L.idx[(size_t)t * k + m] = idx_given[(size_t)t * k + m];
        } else {
            std::vector<std::pair<double, int>> all(N);
            for (int e = 0; e < N; e++) all[e] = {pr[e / n] + pc[e % n], e};
            std::partial_sort(all.begin(), all.begin() + k, all.end(), [](const std::pair<double, int>& a, const std::pair<double, int>& b) {
                return a.first > b.first || (a.first == b.first && a.second < b.second);
            });
            for (int m = 0; m < k; m++) L.idx[(size_t)t * k + m] = all[m].second;
        }
        double smax = -INFINITY;
        for (int m = 0; m < k; m++) {
            int e = L.idx[(size_t)t * k + m];
            L.S[(size_t)t * k + m] = pr[e / n] + pc[e % n];
            smax = std::max(smax, L.S[(size_t)t * k + m]);
        }
        double sum = 0.0;
        for (int m = 0; m < k; m++) sum += exp(L.S[(size_t)t * k + m] - smax);
        for (int m = 0; m < k; m++) {
            double S = L.S[(size_t)t * k + m];
            L.g[(size_t)t * k + m] = L.gate_prob ? exp(S) : exp(S - smax) / sum;
        }
    }
    L.s.assign((size_t)T * k, 0.0);
    L.a.assign((size_t)T * k, 0.0);
    L.Y.assign((size_t)T * d, 0.0);
    for (int t = 0; t < T; t++)
        for (int m = 0; m < k; m++) {
            size_t p = (size_t)t * k + m;
            int e = L.idx[p];
            double s = 0.0;
            for (int i = 0; i < d; i++) s += U[(size_t)e * d + i] * X[(size_t)t * d + i];
            L.s[p] = s;
            L.a[p] = L.g[p] * silu_d(s);
            for (int i = 0; i < d; i++) L.Y[(size_t)t * d + i] += L.a[p] * V[(size_t)e * d + i];
        }
}

// backward of loss = sum(Y * dY); writes (overwrites) the gradients. dX_exp/dX_router split too.
static void cpu_backward(const CpuLayer& L, const double* X, const double* W, const double* U, const double* V,
                         const double* dY, std::vector<double>& dX_exp, std::vector<double>& dX_router,
                         std::vector<double>& dW, std::vector<double>& dU, std::vector<double>& dV,
                         std::vector<double>& dgate) {
    const int T = L.T, d = L.d, n = L.n, k = L.k, C2 = 2 * n, N = n * n;
    dX_exp.assign((size_t)T * d, 0.0);
    dX_router.assign((size_t)T * d, 0.0);
    dW.assign((size_t)C2 * d, 0.0);
    dU.assign((size_t)N * d, 0.0);
    dV.assign((size_t)N * d, 0.0);
    dgate.assign((size_t)T * k, 0.0);
    std::vector<double> dlhat((size_t)T * C2, 0.0);
    for (int t = 0; t < T; t++) {
        std::vector<double> dS(k), dpr(n, 0.0), dpc(n, 0.0);
        double dot = 0.0;
        for (int m = 0; m < k; m++) {
            size_t p = (size_t)t * k + m;
            int e = L.idx[p];
            double h = 0.0;
            for (int i = 0; i < d; i++) h += dY[(size_t)t * d + i] * V[(size_t)e * d + i];
            double s = L.s[p], sg = sigmoid_d(s);
            double dg = h * silu_d(s);
            double ds = h * L.g[p] * sg * (1.0 + s * (1.0 - sg));
            dgate[p] = dg;
            for (int i = 0; i < d; i++) {
                dX_exp[(size_t)t * d + i] += ds * U[(size_t)e * d + i];
                dU[(size_t)e * d + i] += ds * X[(size_t)t * d + i];
                dV[(size_t)e * d + i] += L.a[p] * dY[(size_t)t * d + i];
            }
            dot += L.g[p] * dg;
        }
        for (int m = 0; m < k; m++) {
            size_t p = (size_t)t * k + m;
            dS[m] = L.gate_prob ? L.g[p] * dgate[p] : L.g[p] * (dgate[p] - dot);
            dpr[L.idx[p] / n] += dS[m];
            dpc[L.idx[p] % n] += dS[m];
        }
        double sr = 0.0, sc = 0.0;
        for (int i = 0; i < n; i++) { sr += dpr[i]; sc += dpc[i]; }
        for (int i = 0; i < n; i++) {
            dlhat[(size_t)t * C2 + i] = dpr[i] - exp(L.logp[(size_t)t * C2 + i]) * sr;
            dlhat[(size_t)t * C2 + n + i] = dpc[i] - exp(L.logp[(size_t)t * C2 + n + i]) * sc;
        }
    }
    std::vector<double> dlogits = dlhat;
    if (L.use_bn) {
        for (int c = 0; c < C2; c++) {
            if (L.training) {
                double mdy = 0.0, mdyx = 0.0;
                for (int t = 0; t < T; t++) {
                    mdy += dlhat[(size_t)t * C2 + c];
                    mdyx += dlhat[(size_t)t * C2 + c] * L.xhat[(size_t)t * C2 + c];
                }
                mdy /= T;
                mdyx /= T;
                for (int t = 0; t < T; t++)
                    dlogits[(size_t)t * C2 + c] = L.rstd[c] * (dlhat[(size_t)t * C2 + c] - mdy - L.xhat[(size_t)t * C2 + c] * mdyx);
            } else {
                for (int t = 0; t < T; t++) dlogits[(size_t)t * C2 + c] = L.rstd[c] * dlhat[(size_t)t * C2 + c];
            }
        }
    }
    for (int t = 0; t < T; t++)
        for (int c = 0; c < C2; c++) {
            double g = dlogits[(size_t)t * C2 + c];
            for (int i = 0; i < d; i++) {
                dX_router[(size_t)t * d + i] += g * W[(size_t)c * d + i];
                dW[(size_t)c * d + i] += g * X[(size_t)t * d + i];
            }
        }
}

static double cpu_loss(CpuLayer L, const double* X, const double* W, const double* U, const double* V,
                       const double* rm, const double* rv, const int* idx, const double* dY) {
    cpu_forward(L, X, W, U, V, rm, rv, idx);
    double loss = 0.0;
    for (size_t i = 0; i < L.Y.size(); i++) loss += L.Y[i] * dY[i];
    return loss;
}

// 0. finite-difference check of the CPU reference
static void test_cpu_reference_fd(void) {
    printf("\n== 0. CPU reference vs finite differences (double) ==\n");
    struct { int k, use_bn, gate_prob, training; } cases[] = {
        {3, 1, 0, 1}, {3, 1, 1, 1}, {3, 0, 0, 1}, {3, 0, 1, 1}, {6, 1, 0, 1}, {6, 0, 1, 1}, {6, 1, 1, 0}};
    for (auto& cs : cases) {
        const int T = 12, d = 16, n = 4, N = n * n, C2 = 2 * n;
        CpuLayer L;
        L.T = T; L.d = d; L.n = n; L.k = cs.k; L.use_bn = cs.use_bn; L.gate_prob = cs.gate_prob; L.training = cs.training;
        std::vector<double> X((size_t)T * d), W((size_t)C2 * d), U((size_t)N * d), V((size_t)N * d), dY((size_t)T * d);
        std::vector<double> rm(C2), rv(C2);
        for (auto& x : X) x = draw_normal();
        for (auto& x : W) x = 0.3 * draw_normal();
        for (auto& x : U) x = 0.3 * draw_normal();
        for (auto& x : V) x = draw_normal();
        for (auto& x : dY) x = draw_normal();
        for (int c = 0; c < C2; c++) { rm[c] = 0.3 * draw_normal(); rv[c] = 0.5 + draw_uniform(); }
        cpu_forward(L, X.data(), W.data(), U.data(), V.data(), rm.data(), rv.data(), NULL);
        std::vector<int> idx = L.idx;
        std::vector<double> dXe, dXr, dW, dU, dV, dg;
        cpu_backward(L, X.data(), W.data(), U.data(), V.data(), dY.data(), dXe, dXr, dW, dU, dV, dg);
        double worst = 0.0;
        std::vector<double>* params[4] = {&X, &W, &U, &V};
        const char* names[4] = {"X", "Wrc", "U", "V"};
        for (int which = 0; which < 4; which++) {
            std::vector<double>& P = *params[which];
            for (int trial = 0; trial < 12; trial++) {
                size_t i;
                if (which >= 2) {  // an entry of a selected expert (the others have zero gradient)
                    int e = idx[draw_u32() % idx.size()];
                    i = (size_t)e * d + draw_u32() % d;
                } else {
                    i = draw_u32() % P.size();
                }
                double analytic = which == 0 ? dXe[i] + dXr[i] : which == 1 ? dW[i] : which == 2 ? dU[i] : dV[i];
                const double eps = 1e-5;
                double keep = P[i];
                P[i] = keep + eps;
                double lp = cpu_loss(L, X.data(), W.data(), U.data(), V.data(), rm.data(), rv.data(), idx.data(), dY.data());
                P[i] = keep - eps;
                double lm = cpu_loss(L, X.data(), W.data(), U.data(), V.data(), rm.data(), rv.data(), idx.data(), dY.data());
                P[i] = keep;
                double fd = (lp - lm) / (2 * eps);
                double err = fabs(fd - analytic) / (1e-4 + fabs(analytic));
                if (err > worst) worst = err;
                if (err > 1e-5) printf("    %s[%zu]: analytic %.8e fd %.8e\n", names[which], i, analytic, fd);
            }
        }
        char name[96];
        snprintf(name, sizeof(name), "CPU reference vs finite differences k=%d %s %s %s", cs.k, cs.use_bn ? "bn" : "none",
                 cs.gate_prob ? "prob" : "softmax", cs.training ? "train" : "eval");
        record(worst < 1e-5, name, "worst rel err %.1e (tol 1e-5)", worst);
    }
}

// ----------------------------------------------------------------------------
// 1. top-k unit test

template <int KEYS>
__global__ void test_topk_kernel(int* idx_out, const float* pr_all, const float* pc_all, int T, int n, int k, int allow_fast) {
    extern __shared__ float smem[];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int t = blockIdx.x * (blockDim.x / 32) + warp;
    if (t >= T) return;
    RouterTokenSmem sm = router_token_smem(smem + (size_t)warp * router_token_smem_words(n, k), n, k, router_staircase_count(n, k));
    for (int i = lane; i < n; i += 32) {
        sm.pr[i] = router_nan_to_neg_inf(pr_all[(size_t)t * n + i]);
        sm.pc[i] = router_nan_to_neg_inf(pc_all[(size_t)t * n + i]);
    }
    __syncwarp();
    router_topk_warp<KEYS>(sm.pr, sm.pc, n, k, sm.rows, sm.cols, sm.cand_s, sm.cand_id, sm.sel_s, sm.sel_id, idx_out + (size_t)t * k, allow_fast, lane);
}

static bool beats_f(float va, int ia, float vb, int ib) { return va > vb || (va == vb && ia < ib); }
static float nan_to_neg_inf(float x) { return x != x ? -INFINITY : x; }

// brute force over all N fp32 sums (the definition)
static void brute_topk(const float* pr, const float* pc, int n, int k, int* out) {
    std::vector<std::pair<float, int>> all(n * n);
    for (int e = 0; e < n * n; e++) {
        float s = nan_to_neg_inf(pr[e / n]) + nan_to_neg_inf(pc[e % n]);
        all[e] = {nan_to_neg_inf(s), e};
    }
    std::partial_sort(all.begin(), all.begin() + k, all.end(), [](const std::pair<float, int>& a, const std::pair<float, int>& b) {
        return beats_f(a.first, a.second, b.first, b.second);
    });
    for (int m = 0; m < k; m++) out[m] = all[m].second;
}

// the plain k' x k' grid without the near-tie guard (to show the adversarial cases need it)
static void naive_grid_topk(const float* pr, const float* pc, int n, int k, int* out) {
    int kp = std::min(n, k);
    std::vector<int> r(n), c(n);
    for (int i = 0; i < n; i++) { r[i] = i; c[i] = i; }
    std::sort(r.begin(), r.end(), [&](int a, int b) { return beats_f(pr[a], a, pr[b], b); });
    std::sort(c.begin(), c.end(), [&](int a, int b) { return beats_f(pc[a], a, pc[b], b); });
    std::vector<std::pair<float, int>> all;
    for (int a = 0; a < kp; a++)
        for (int b = 0; b < kp; b++) all.push_back({pr[r[a]] + pc[c[b]], r[a] * n + c[b]});
    std::partial_sort(all.begin(), all.begin() + k, all.end(), [](const std::pair<float, int>& a, const std::pair<float, int>& b) {
        return beats_f(a.first, a.second, b.first, b.second);
    });
    for (int m = 0; m < k; m++) out[m] = all[m].second;
}

static float ulps_below(float x, int u) { for (int i = 0; i < u; i++) x = nextafterf(x, -INFINITY); return x; }

static void test_topk_unit(void) {
    printf("\n== 1. exact top-k: crafted ties and near-ties vs brute force over all N ==\n");
    struct { int n, k; } shapes[] = {{8, 1}, {8, 2}, {8, 4}, {8, 16}, {8, 64}, {16, 16}, {64, 16}, {64, 64}, {5, 7}, {100, 16}, {128, 32}, {128, 64}, {256, 32}, {384, 64}, {512, 16}, {1024, 16}, {1024, 32}, {1024, 64},
                  {10, 100}, {16, 256}};  // the last two: exactly k staircase candidates (the search's count == k exit)
    int total_naive_wrong = 0;
    for (auto& sh : shapes) {
        const int n = sh.n, k = sh.k, T = n >= 512 ? 64 : 512;  // brute force is O(n^2) per token
        std::vector<float> pr((size_t)T * n), pc((size_t)T * n);
        for (int t = 0; t < T; t++) {
            float* r = &pr[(size_t)t * n];
            float* c = &pc[(size_t)t * n];
            int kind = t % 5;
            if (kind == 4) {  // continuous random of both signs (keys differ from their first bit)
                for (int i = 0; i < n; i++) { r[i] = (float)(2.0 * draw_normal()); c[i] = (float)(2.0 * draw_normal()); }
            } else if (kind == 0) {  // continuous random
                for (int i = 0; i < n; i++) { r[i] = (float)(-4.0 + draw_normal()); c[i] = (float)(-4.0 + draw_normal()); }
            } else if (kind == 1) {  // exact ties: a few distinct values
                for (int i = 0; i < n; i++) { r[i] = -1.0f - 0.5f * (draw_u32() % 3); c[i] = -2.0f - 0.25f * (draw_u32() % 3); }
            } else if (kind == 2) {  // near-ties: a few base values, each a few ulps off
                for (int i = 0; i < n; i++) {
                    r[i] = ulps_below(-1.0f - 0.5f * (draw_u32() % 2), draw_u32() % 3);
                    c[i] = ulps_below(-3.0f - 0.5f * (draw_u32() % 2), draw_u32() % 3);
                }
            } else {  // adversarial: an inside row and an outside row of smaller index 1 ulp apart
                for (int i = 0; i < n; i++) { r[i] = -8.0f - (float)draw_uniform(); c[i] = -9.0f - (float)draw_uniform(); }
                int kp = std::min(n, k);
                if (kp < n) {
                    // rows 0..kp-2 best (distinct), row n-1 = -1.0 (the kp-th), row lower index 1 ulp below
                    for (int a = 0; a < kp - 1; a++) r[n - 2 - a] = -0.5f + 0.01f * a;
                    r[n - 1] = -1.0f;
                    r[(int)(draw_u32() % (unsigned)(n - kp))] = nextafterf(-1.0f, -INFINITY);
                    c[draw_u32() % n] = -3.0f;  // one good column: -1 + -3 = -4 exactly, the 1-ulp row ties it
                }
            }
        }
        float *d_pr = dev_alloc<float>(pr.size()), *d_pc = dev_alloc<float>(pc.size());
        int* d_idx = dev_alloc<int>((size_t)T * k);
        cudaCheck(cudaMemcpy(d_pr, pr.data(), pr.size() * 4, cudaMemcpyHostToDevice));
        cudaCheck(cudaMemcpy(d_pc, pc.data(), pc.size() * 4, cudaMemcpyHostToDevice));
        const int warps = router_token_warps_per_block(n, k);
        const size_t smem = (size_t)warps * router_token_smem_words(n, k) * 4;
        // both register budgets (router_topk_keys_per_lane picks one by n; either must be exact)
        int bad[2][2] = {{0, 0}, {0, 0}}, naive_wrong = 0;
        std::vector<int> want(k), naive(k);
        for (int wide = 0; wide <= 1; wide++) {
            for (int allow_fast = 1; allow_fast >= 0; allow_fast--) {
                poison(d_idx, (size_t)T * k * sizeof(int));
                auto* kernel = wide ? test_topk_kernel<32> : test_topk_kernel<8>;
                kernel<<<ceil_div(T, warps), warps * 32, smem>>>(d_idx, d_pr, d_pc, T, n, k, allow_fast);
                cudaCheckLast();
                std::vector<int> got = download(d_idx, (size_t)T * k);
                for (int t = 0; t < T; t++) {
                    brute_topk(&pr[(size_t)t * n], &pc[(size_t)t * n], n, k, want.data());
                    if (memcmp(want.data(), &got[(size_t)t * k], k * sizeof(int)) != 0) bad[wide][allow_fast]++;
                    if (allow_fast && !wide) {
                        naive_grid_topk(&pr[(size_t)t * n], &pc[(size_t)t * n], n, k, naive.data());
                        if (memcmp(want.data(), naive.data(), k * sizeof(int)) != 0) naive_wrong++;
                    }
                }
            }
        }
        total_naive_wrong += naive_wrong;
        char name[64];
        snprintf(name, sizeof(name), "top-k n=%d k=%d == brute force", n, k);
        record(bad[0][0] == 0 && bad[0][1] == 0 && bad[1][0] == 0 && bad[1][1] == 0, name,
               "%d tokens: mismatches fast %d/%d, tie fix-up on all %d/%d (8/32 keys a lane; naive grid: %d wrong)", T,
               bad[0][1], bad[1][1], bad[0][0], bad[1][0], naive_wrong);
        cudaCheck(cudaFree(d_pr));
        cudaCheck(cudaFree(d_pc));
        cudaCheck(cudaFree(d_idx));
    }
    record(total_naive_wrong > 0, "the adversarial tokens defeat the plain grid, so the guard is exercised", "%d tokens",
           total_naive_wrong);
}

// ----------------------------------------------------------------------------
// 2. the layer

struct LayerCase {
    const char* name;
    int T, d, I, n, k, use_bn, gate_prob, training, ties;
};

// The layer under test (llmc/omnimoe_layer.cuh) in four instances on one workspace: with the
// shared SwiGLU (I > 0: the experts add onto its output and input gradient) and without it
// (I = 0: the experts and the router write Y and dX), each in both executions.
struct DeviceLayer {
    int T, d, I, n, k, N, P, C2, use_bn, gate_prob, training;
    // parameters and inputs
    floatX *X, *dY, *Wfc, *Wd, *W, *U, *V;
    float *bn, *bn_init;  // (2 C2): running mean, then running var
    // initial values of the accumulated gradients
    floatX *dWfc_init, *dWd_init, *dU_init, *dV_init, *dW_init;
    // outputs
    floatX *Y, *dX, *dWfc, *dWd, *dU, *dV, *dW;
    OmniWorkspace ws;
    OmniLayer layer[2][2];  // [0: I = 0, 1: with the shared SwiGLU][EXPERT_EXEC_*]
};

static void reset_and_poison(DeviceLayer& D, cudaStream_t stream) {
    const size_t Td = (size_t)D.T * D.d, Nd = (size_t)D.N * D.d, TI = (size_t)D.T * D.I;
    cudaCheck(cudaMemcpyAsync(D.bn, D.bn_init, 2 * D.C2 * 4, cudaMemcpyDeviceToDevice, stream));
    cudaCheck(cudaMemsetAsync(D.Y, 0xFF, Td * sizeof(floatX), stream));
    cudaCheck(cudaMemsetAsync(D.dX, 0xFF, Td * sizeof(floatX), stream));
    const size_t Id = (size_t)D.I * D.d;
    cudaCheck(cudaMemcpyAsync(D.dWfc, D.dWfc_init, 2 * Id * sizeof(floatX), cudaMemcpyDeviceToDevice, stream));
    cudaCheck(cudaMemcpyAsync(D.dWd, D.dWd_init, Id * sizeof(floatX), cudaMemcpyDeviceToDevice, stream));
    cudaCheck(cudaMemcpyAsync(D.dU, D.dU_init, Nd * sizeof(floatX), cudaMemcpyDeviceToDevice, stream));
    cudaCheck(cudaMemcpyAsync(D.dV, D.dV_init, Nd * sizeof(floatX), cudaMemcpyDeviceToDevice, stream));
    cudaCheck(cudaMemcpyAsync(D.dW, D.dW_init, (size_t)D.C2 * D.d * sizeof(floatX), cudaMemcpyDeviceToDevice, stream));
    const size_t TC2 = (size_t)D.T * D.C2, Tk = (size_t)D.T * D.k;
    const int amax = scheduler_max_active(D.P, D.N);
    for (int sh = 0; sh < 2; sh++) {
        for (int ex = 0; ex < 2; ex++) {
            OmniSaved& o = D.layer[sh][ex].saved;
            if (sh == 1) {
                cudaCheck(cudaMemsetAsync(o.fch, 0xFF, 2 * TI * sizeof(floatX), stream));
                cudaCheck(cudaMemsetAsync(o.fch_act, 0xFF, TI * sizeof(floatX), stream));
            }
            cudaCheck(cudaMemsetAsync(o.router.logits, 0xFF, TC2 * 4, stream));
            cudaCheck(cudaMemsetAsync(o.router.logp, 0xFF, TC2 * 4, stream));
            cudaCheck(cudaMemsetAsync(o.router.bn_mean, 0xFF, D.C2 * 4, stream));
            cudaCheck(cudaMemsetAsync(o.router.bn_rstd, 0xFF, D.C2 * 4, stream));
            cudaCheck(cudaMemsetAsync(o.router.gate, 0xFF, Tk * 4, stream));
            cudaCheck(cudaMemsetAsync(o.router.idx, 0xFF, Tk * 4, stream));
            cudaCheck(cudaMemsetAsync(o.s, 0xFF, Tk * 4, stream));
            cudaCheck(cudaMemsetAsync(o.sched.sorted_pair, 0xFF, (size_t)D.P * 4, stream));
            cudaCheck(cudaMemsetAsync(o.sched.sorted_expert, 0xFF, (size_t)D.P * 4, stream));
            cudaCheck(cudaMemsetAsync(o.sched.sorted_active, 0xFF, (size_t)D.P * 4, stream));
            cudaCheck(cudaMemsetAsync(o.sched.active_expert, 0xFF, (size_t)amax * 4, stream));
            cudaCheck(cudaMemsetAsync(o.sched.active_offset, 0xFF, (size_t)(amax + 1) * 4, stream));
            cudaCheck(cudaMemsetAsync(o.sched.num_active, 0xFF, 4, stream));
        }
    }
    cudaCheck(cudaMemsetAsync(D.ws.dgate, 0xFF, Tk * 4, stream));
    cudaCheck(cudaMemsetAsync(D.ws.dhidden, 0xFF, TI * sizeof(floatX), stream));
    cudaCheck(cudaMemsetAsync(D.ws.dwide, 0xFF, 2 * TI * sizeof(floatX), stream));
    cudaCheck(cudaMemsetAsync(D.ws.scratch, 0xFF, D.ws.scratch_bytes, stream));
}

// the whole layer forward and backward
static void run_layer(DeviceLayer& D, int shared, int exec, cudaStream_t stream) {
    OmniLayer* layer = &D.layer[shared][exec];
    omni_layer_forward(layer, D.Y, D.X, D.T, D.training, stream);
    omni_layer_backward(layer, D.dX, D.dY, D.X, D.T, stream);
}

// everything a run produces, downloaded raw for bitwise comparisons
struct LayerOutputs {
    std::vector<float> logits, logp, mean, rstd, gate, s, dgate, bn;
    std::vector<int> idx, sorted_pair, sorted_expert, sorted_active, active_expert, active_offset, num_active;
    std::vector<floatX> Y, dX, dU, dV, dW, dWfc, dWd, fch, fch_act, dhidden, dwide;
};

static LayerOutputs download_all(const DeviceLayer& D, int shared, int exec) {
    cudaCheck(cudaDeviceSynchronize());
    const OmniSaved& o = D.layer[shared][exec].saved;
    LayerOutputs q;
    const size_t TC2 = (size_t)D.T * D.C2, Tk = (size_t)D.T * D.k, Td = (size_t)D.T * D.d, Nd = (size_t)D.N * D.d;
    const size_t TI = (size_t)D.T * D.I, Id = (size_t)D.I * D.d;
    q.logits = download(o.router.logits, TC2);
    q.logp = download(o.router.logp, TC2);
    if (D.use_bn) { q.mean = download(o.router.bn_mean, D.C2); q.rstd = download(o.router.bn_rstd, D.C2); }
    q.gate = download(o.router.gate, Tk);
    q.s = download(o.s, Tk);
    q.dgate = download(D.ws.dgate, Tk);
    q.bn = download(D.bn, 2 * D.C2);
    q.idx = download(o.router.idx, Tk);
    q.num_active = download(o.sched.num_active, 1);
    int na = q.num_active[0];
    if (na < 1 || na > scheduler_max_active(D.P, D.N)) { na = 0; }
    q.sorted_pair = download(o.sched.sorted_pair, D.P);
    q.sorted_expert = download(o.sched.sorted_expert, D.P);
    q.sorted_active = download(o.sched.sorted_active, D.P);
    q.active_expert = download(o.sched.active_expert, na);
    q.active_offset = download(o.sched.active_offset, na + 1);
    q.Y = download(D.Y, Td);
    q.dX = download(D.dX, Td);
    q.dU = download(D.dU, Nd);
    q.dV = download(D.dV, Nd);
    q.dW = download(D.dW, (size_t)D.C2 * D.d);
    if (shared) {
        q.dWfc = download(D.dWfc, 2 * Id);
        q.dWd = download(D.dWd, Id);
        q.fch = download(o.fch, 2 * TI);
        q.fch_act = download(o.fch_act, TI);
        q.dhidden = download(D.ws.dhidden, TI);
        q.dwide = download(D.ws.dwide, 2 * TI);
    }
    return q;
}

template <class T>
static bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
    return a.size() == b.size() && (a.empty() || memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

static bool outputs_identical(const LayerOutputs& a, const LayerOutputs& b, const char** first_diff) {
#define SAME(f) if (!same_bits(a.f, b.f)) { *first_diff = #f; return false; }
    SAME(logits) SAME(logp) SAME(mean) SAME(rstd) SAME(gate) SAME(s) SAME(dgate) SAME(bn) SAME(idx)
    SAME(sorted_pair) SAME(sorted_expert) SAME(sorted_active) SAME(active_expert) SAME(active_offset) SAME(num_active)
    SAME(Y) SAME(dX) SAME(dU) SAME(dV) SAME(dW) SAME(dWfc) SAME(dWd) SAME(fch) SAME(fch_act) SAME(dhidden) SAME(dwide)
#undef SAME
    *first_diff = "";
    return true;
}

static std::vector<float> floatX_to_float(const std::vector<floatX>& v) {
    std::vector<float> out(v.size());
    host_floatX_to_float(out.data(), v.data(), v.size());
    return out;
}

// out (rows, cols) = a (rows, inner) b^T with b (cols, inner), double
static std::vector<double> gemm_abt(const double* a, const double* b, int rows, int cols, int inner) {
    std::vector<double> out((size_t)rows * cols);
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++) {
            double acc = 0.0;
            for (int i = 0; i < inner; i++) acc += a[(size_t)r * inner + i] * b[(size_t)c * inner + i];
            out[(size_t)r * cols + c] = acc;
        }
    return out;
}
// out (rows, cols) = a (inner, rows)^T b (inner, cols), double
static std::vector<double> gemm_atb(const double* a, const double* b, int rows, int cols, int inner) {
    std::vector<double> out((size_t)rows * cols, 0.0);
    for (int i = 0; i < inner; i++)
        for (int r = 0; r < rows; r++) {
            const double ar = a[(size_t)i * rows + r];
            for (int c = 0; c < cols; c++) out[(size_t)r * cols + c] += ar * b[(size_t)i * cols + c];
        }
    return out;
}
static std::vector<double> floatX_to_double(const std::vector<floatX>& v) { return to_double(floatX_to_float(v)); }

static void test_layer_case(const LayerCase& lc) {
    printf("\n== 2. layer: %s (T=%d d=%d I=%d n=%d N=%d k=%d, %s, %s, %s) ==\n", lc.name, lc.T, lc.d, lc.I, lc.n,
           lc.n * lc.n, lc.k, lc.use_bn ? "bn" : "none", lc.gate_prob ? "prob" : "softmax", lc.training ? "train" : "eval");
    snprintf(g_case, sizeof(g_case), "%s", lc.name);
    DeviceLayer D;
    memset(&D, 0, sizeof(D));
    D.T = lc.T; D.d = lc.d; D.I = lc.I; D.n = lc.n; D.k = lc.k; D.N = lc.n * lc.n; D.P = lc.T * lc.k; D.C2 = 2 * lc.n;
    D.use_bn = lc.use_bn; D.gate_prob = lc.gate_prob; D.training = lc.training;
    const int T = D.T, d = D.d, I = D.I, n = D.n, k = D.k, N = D.N, P = D.P, C2 = D.C2;
    const size_t Td = (size_t)T * d, Nd = (size_t)N * d, Wd = (size_t)C2 * d, Tk = (size_t)T * k, TC2 = (size_t)T * C2;
    const size_t Id = (size_t)I * d, TI = (size_t)T * I;

    // ---- inputs (rounded to floatX; the reference uses exactly these values)
    std::vector<float> hX(Td), hW(Wd), hU(Nd), hV(Nd), hdY(Td), hbn(2 * C2), hWfc(2 * Id), hWd(Id);
    if (lc.ties) {
        // quantised logits: X rows with 4 entries of +-1, router rows drawn from 3 sparse +-1
        // patterns per half -> integer logits in [-4, 4]; equal patterns give equal channels, which
        // stay tied after BN too
        for (auto& x : hX) x = 0.0f;
        for (int t = 0; t < T; t++)
            for (int j = 0; j < 4; j++) hX[(size_t)t * d + draw_u32() % d] = (draw_u32() & 1) ? 1.0f : -1.0f;
        std::vector<float> patterns((size_t)6 * d);
        for (auto& x : patterns) { uint32_t r = draw_u32() % 4; x = r == 0 ? 1.0f : r == 1 ? -1.0f : 0.0f; }
        for (int c = 0; c < C2; c++) {
            int pat = (c >= n ? 3 : 0) + (int)(draw_u32() % 3);
            for (int i = 0; i < d; i++) hW[(size_t)c * d + i] = patterns[(size_t)pat * d + i];
        }
    } else {
        for (auto& x : hX) x = (float)draw_normal();
        // logits ~ N(0, 1.5^2): spread enough that the softmaxes are not flat
        for (auto& x : hW) x = (float)(1.5 * draw_normal() / sqrt((double)d));
    }
    for (auto& x : hU) x = (float)(1.2 * draw_normal() / sqrt((double)d));
    for (auto& x : hV) x = (float)draw_normal();
    for (auto& x : hdY) x = (float)draw_normal();
    // the shared branch (Wd is scaled below, once the routed part's size is known)
    for (auto& x : hWfc) x = (float)(1.5 * draw_normal() / sqrt((double)d));
    for (auto& x : hWd) x = (float)(draw_normal() / sqrt((double)I));
    for (int c = 0; c < C2; c++) { hbn[c] = (float)(0.3 * draw_normal()); hbn[C2 + c] = (float)(0.5 + draw_uniform()); }
    round_to_floatX(hX); round_to_floatX(hW); round_to_floatX(hU); round_to_floatX(hV); round_to_floatX(hdY);
    round_to_floatX(hWfc); round_to_floatX(hWd);

    // ---- device buffers and the layers
    D.X = dev_alloc<floatX>(Td); D.W = dev_alloc<floatX>(Wd); D.U = dev_alloc<floatX>(Nd); D.V = dev_alloc<floatX>(Nd);
    D.dY = dev_alloc<floatX>(Td); D.Wfc = dev_alloc<floatX>(2 * Id); D.Wd = dev_alloc<floatX>(Id);
    D.bn = dev_alloc<float>(2 * C2); D.bn_init = dev_alloc<float>(2 * C2);
    D.dWfc_init = dev_alloc<floatX>(2 * Id); D.dWd_init = dev_alloc<floatX>(Id); D.dU_init = dev_alloc<floatX>(Nd);
    D.dV_init = dev_alloc<floatX>(Nd); D.dW_init = dev_alloc<floatX>(Wd);
    D.Y = dev_alloc<floatX>(Td); D.dX = dev_alloc<floatX>(Td); D.dU = dev_alloc<floatX>(Nd); D.dV = dev_alloc<floatX>(Nd);
    D.dW = dev_alloc<floatX>(Wd); D.dWfc = dev_alloc<floatX>(2 * Id); D.dWd = dev_alloc<floatX>(Id);
    upload_floatX(D.X, hX.data(), Td); upload_floatX(D.W, hW.data(), Wd); upload_floatX(D.U, hU.data(), Nd);
    upload_floatX(D.V, hV.data(), Nd); upload_floatX(D.dY, hdY.data(), Td);
    upload_floatX(D.Wfc, hWfc.data(), 2 * Id);
    cudaCheck(cudaMemcpy(D.bn_init, hbn.data(), 2 * C2 * 4, cudaMemcpyHostToDevice));
    const OmniDims dims_shared = {T, d, I, n, N, k}, dims_alone = {T, d, 0, n, N, k};
    const OmniWeights w = {D.Wfc, D.Wd, D.W, D.U, D.V}, dw = {D.dWfc, D.dWd, D.dW, D.dU, D.dV};
    omni_workspace_create(&D.ws, dims_shared, NULL, 0, NULL, NULL);
    for (int sh = 0; sh < 2; sh++) {
        for (int ex = 0; ex < 2; ex++) {
            const OmniOptions opt = {D.use_bn ? ROUTER_NORM_BN : ROUTER_NORM_NONE, D.gate_prob ? GATE_PROB : GATE_SOFTMAX, ex};
            omni_layer_create(&D.layer[sh][ex], sh ? dims_shared : dims_alone, opt, w, dw, &D.ws, NULL, NULL);
            omni_layer_set_bn_stats(&D.layer[sh][ex], D.bn);
        }
    }

    // ---- the reference needs the GPU's selection: run the layer's forward once first
    cudaCheck(cudaMemcpy(D.bn, D.bn_init, 2 * C2 * 4, cudaMemcpyDeviceToDevice));
    omni_layer_forward(&D.layer[0][EXPERT_EXEC_TOKEN], D.Y, D.X, T, D.training, 0);
    std::vector<int> gpu_idx = download(D.layer[0][EXPERT_EXEC_TOKEN].saved.router.idx, Tk);
    for (int v : gpu_idx) {
        if (v < 0 || v >= N) { record(0, "router expert ids in [0, N)", "id %d", v); return; }
    }
    std::vector<double> X = to_double(hX), W = to_double(hW), U = to_double(hU), V = to_double(hV), dY = to_double(hdY);
    std::vector<double> rm(hbn.begin(), hbn.begin() + C2), rv(hbn.begin() + C2, hbn.end());
    CpuLayer R;
    R.T = T; R.d = d; R.n = n; R.k = k; R.use_bn = D.use_bn; R.gate_prob = D.gate_prob; R.training = D.training;
    cpu_forward(R, X.data(), W.data(), U.data(), V.data(), rm.data(), rv.data(), gpu_idx.data());
    std::vector<double> dXe, dXr, dWr, dUr, dVr, dgr;
    cpu_backward(R, X.data(), W.data(), U.data(), V.data(), dY.data(), dXe, dXr, dWr, dUr, dVr, dgr);
    {   // how often would the double-precision reference pick differently on its own?
        CpuLayer own = R;
        cpu_forward(own, X.data(), W.data(), U.data(), V.data(), rm.data(), rv.data(), NULL);
        int differ = 0;
        for (int t = 0; t < T; t++)
            if (memcmp(&own.idx[(size_t)t * k], &gpu_idx[(size_t)t * k], k * sizeof(int)) != 0) differ++;
        printf("  (info) tokens where a double-precision top-k would select differently: %d of %d\n", differ, T);
    }
    // initial values of accumulated gradients: random, of the size of what gets added
    auto rms = [](const std::vector<double>& v) { double s = 0; for (double x : v) s += x * x; return sqrt(s / std::max<size_t>(1, v.size())) + 1e-3; };
    std::vector<double> dX_total(Td);
    for (size_t i = 0; i < Td; i++) dX_total[i] = dXe[i] + dXr[i];
    // the shared branch in double, to scale Wd: its Y and dX parts no larger than the routed
    // part's (bf16 rounding of the sum must stay small next to what the checks below isolate)
    double sdWfc = 1.0, sdWd = 1.0;
    {
        std::vector<double> Wfc = to_double(hWfc), Wdn = to_double(hWd);
        std::vector<double> fch = gemm_abt(X.data(), Wfc.data(), T, 2 * I, d), act(TI), dwide(2 * TI);
        std::vector<double> WdT(Id), WfcT(2 * Id);
        for (int c = 0; c < d; c++)
            for (int i = 0; i < I; i++) WdT[(size_t)i * d + c] = Wdn[(size_t)c * I + i];
        for (int j = 0; j < 2 * I; j++)
            for (int c = 0; c < d; c++) WfcT[(size_t)c * 2 * I + j] = Wfc[(size_t)j * d + c];
        std::vector<double> dh = gemm_abt(dY.data(), WdT.data(), T, I, d);
        for (size_t q = 0; q < TI; q++) {
            size_t t = q / I, i = q % I;
            double gg = fch[t * 2 * I + i], u = fch[t * 2 * I + I + i], sg = sigmoid_d(gg);
            act[q] = gg * sg * u;
            dwide[t * 2 * I + i] = dh[q] * u * sg * (1.0 + gg * (1.0 - sg));
            dwide[t * 2 * I + I + i] = dh[q] * gg * sg;
        }
        std::vector<double> Y0 = gemm_abt(act.data(), Wdn.data(), T, d, I);
        std::vector<double> dX0 = gemm_abt(dwide.data(), WfcT.data(), T, d, 2 * I);
        const double scale = std::min(rms(R.Y) / rms(Y0), rms(dX_total) / rms(dX0));
        for (auto& x : hWd) x = (float)(x * scale);
        round_to_floatX(hWd);
        sdWd = rms(gemm_atb(dY.data(), act.data(), d, I, T));                  // independent of Wd
        sdWfc = scale * rms(gemm_atb(dwide.data(), X.data(), 2 * I, d, T));    // linear in Wd
    }
    upload_floatX(D.Wd, hWd.data(), Id);
    std::vector<float> hdU0(Nd), hdV0(Nd), hdW0(Wd), hdWfc0(2 * Id), hdWd0(Id);
    const double sdU = rms(dUr), sdV = rms(dVr), sdW = rms(dWr);
    for (auto& x : hdU0) x = (float)(sdU * draw_normal());
    for (auto& x : hdV0) x = (float)(sdV * draw_normal());
    for (auto& x : hdW0) x = (float)(sdW * draw_normal());
    for (auto& x : hdWfc0) x = (float)(sdWfc * draw_normal());
    for (auto& x : hdWd0) x = (float)(sdWd * draw_normal());
    round_to_floatX(hdU0); round_to_floatX(hdV0); round_to_floatX(hdW0); round_to_floatX(hdWfc0); round_to_floatX(hdWd0);
    upload_floatX(D.dU_init, hdU0.data(), Nd); upload_floatX(D.dV_init, hdV0.data(), Nd);
    upload_floatX(D.dW_init, hdW0.data(), Wd); upload_floatX(D.dWfc_init, hdWfc0.data(), 2 * Id);
    upload_floatX(D.dWd_init, hdWd0.data(), Id);

    // ---- the layer without its shared branch (Y, dX written into NaN) and with it, both executions
    LayerOutputs alone[2], out[2];
    for (int ex = 0; ex < 2; ex++) {
        reset_and_poison(D, 0);
        run_layer(D, 0, ex, 0);
        alone[ex] = download_all(D, 0, ex);
        reset_and_poison(D, 0);
        run_layer(D, 1, ex, 0);
        out[ex] = download_all(D, 1, ex);
    }
    const LayerOutputs& o = out[0];

    // router values, against double math on the GPU's own logits
    {
        std::vector<double> ref_logits(R.logits);
        check_rel("logits (fp32) vs double GEMM", o.logits.data(), ref_logits.data(), TC2, 1e-5);
        std::vector<double> mean(C2, 0.0), rstd(C2, 1.0), xhat(TC2), bn_new(2 * C2);
        for (int c = 0; c < C2; c++) {
            double mu = 0, var = 0;
            if (D.training) {
                for (int t = 0; t < T; t++) mu += o.logits[(size_t)t * C2 + c];
                mu /= T;
                for (int t = 0; t < T; t++) { double dv = o.logits[(size_t)t * C2 + c] - mu; var += dv * dv; }
                bn_new[c] = 0.9 * rm[c] + 0.1 * mu;
                bn_new[C2 + c] = 0.9 * rv[c] + 0.1 * var / (T - 1);
                var /= T;
            } else {
                mu = rm[c]; var = rv[c]; bn_new[c] = rm[c]; bn_new[C2 + c] = rv[c];
            }
            mean[c] = mu;
            rstd[c] = 1.0 / sqrt(var + 1e-5);
            for (int t = 0; t < T; t++) {
                double x = o.logits[(size_t)t * C2 + c];
                xhat[(size_t)t * C2 + c] = D.use_bn ? (x - mu) * rstd[c] : x;
            }
        }
        if (D.use_bn) {
            check_rel("BN mean", o.mean.data(), mean.data(), C2, 1e-5);
            check_rel("BN rstd", o.rstd.data(), rstd.data(), C2, 1e-5);
            check_rel("BN running mean, running var (unbiased)", o.bn.data(), bn_new.data(), 2 * C2, 1e-5);
        } else {
            record(same_bits(o.bn, hbn), "running stats untouched without BN", "%s", "");
        }
        std::vector<double> logp(TC2);
        for (int t = 0; t < T; t++)
            for (int half = 0; half < 2; half++) {
                const double* x = &xhat[(size_t)t * C2 + half * n];
                double mx = -INFINITY, sum = 0;
                for (int i = 0; i < n; i++) mx = std::max(mx, x[i]);
                for (int i = 0; i < n; i++) sum += exp(x[i] - mx);
                for (int i = 0; i < n; i++) logp[(size_t)t * C2 + half * n + i] = x[i] - mx - log(sum);
            }
        check_rel("log-probs", o.logp.data(), logp.data(), TC2, 1e-5);
        // top-k: brute force over the GPU's own fp32 log-probs
        int bad = 0;
        std::vector<int> want(k);
        for (int t = 0; t < T; t++) {
            brute_topk(&o.logp[(size_t)t * C2], &o.logp[(size_t)t * C2 + n], n, k, want.data());
            if (memcmp(want.data(), &o.idx[(size_t)t * k], k * sizeof(int)) != 0) bad++;
        }
        int ties = 0;
        for (int t = 0; t < T; t++)
            for (int m = 1; m < k; m++) {
                int e0 = o.idx[(size_t)t * k + m - 1], e1 = o.idx[(size_t)t * k + m];
                float s0 = o.logp[(size_t)t * C2 + e0 / n] + o.logp[(size_t)t * C2 + n + e0 % n];
                float s1 = o.logp[(size_t)t * C2 + e1 / n] + o.logp[(size_t)t * C2 + n + e1 % n];
                if (s0 == s1) ties++;
            }
        record(bad == 0, "top-k == brute force over all N (order too)", "%d of %d tokens differ (%d tied neighbours)", bad,
               T, ties);
        record(same_bits(o.idx, gpu_idx), "the same selection as the first forward", "%s", "");
        // gates from the GPU's log-probs and selection
        std::vector<double> g(Tk);
        for (int t = 0; t < T; t++) {
            double smax = -INFINITY, sum = 0;
            std::vector<double> S(k);
            for (int m = 0; m < k; m++) {
                int e = o.idx[(size_t)t * k + m];
                S[m] = (double)o.logp[(size_t)t * C2 + e / n] + (double)o.logp[(size_t)t * C2 + n + e % n];
                smax = std::max(smax, S[m]);
            }
            for (int m = 0; m < k; m++) sum += exp(S[m] - smax);
            for (int m = 0; m < k; m++) g[(size_t)t * k + m] = D.gate_prob ? exp(S[m]) : exp(S[m] - smax) / sum;
        }
        check_rel("gates", o.gate.data(), g.data(), Tk, 1e-5);
    }

    // schedule vs a CPU stable counting sort
    {
        std::vector<int> count(N, 0), start(N + 1, 0), sp(P), se(P), sa(P), ae, ao;
        for (int p = 0; p < P; p++) count[o.idx[p]]++;
        for (int e = 0; e < N; e++) start[e + 1] = start[e] + count[e];
        std::vector<int> fill(start.begin(), start.end() - 1);
        for (int p = 0; p < P; p++) { int e = o.idx[p]; sp[fill[e]] = p; se[fill[e]] = e; fill[e]++; }
        for (int e = 0; e < N; e++)
            if (count[e] > 0) { ae.push_back(e); ao.push_back(start[e]); }
        ao.push_back(P);
        for (int a = 0; a < (int)ae.size(); a++)
            for (int q = ao[a]; q < ao[a + 1]; q++) sa[q] = a;
        bool ok = o.num_active[0] == (int)ae.size() && same_bits(o.sorted_pair, sp) && same_bits(o.sorted_expert, se) &&
                  same_bits(o.sorted_active, sa) && same_bits(o.active_expert, ae) && same_bits(o.active_offset, ao);
        int max_count = *std::max_element(count.begin(), count.end());
        record(ok, "schedule == CPU stable counting sort", "%d active experts, busiest has %d pairs", (int)ae.size(),
               max_count);
    }

    // the shared SwiGLU branch, from the GPU's own saved intermediates (each step alone: the
    // roundings of the step before do not count): fch = X Wfc^T, fch_act = SiLU(g) u,
    // dhidden = dY Wd, dwide = SwiGLU backward, dWd += dY^T fch_act, dWfc += dwide^T X
    std::vector<double> Y0_ref(Td), dX0_ref(Td);
    {
        std::vector<double> fch = floatX_to_double(o.fch), act = floatX_to_double(o.fch_act);
        std::vector<double> dh = floatX_to_double(o.dhidden), dwide = floatX_to_double(o.dwide);
        std::vector<double> Wfc = to_double(hWfc), Wdn = to_double(hWd);
        std::vector<double> ref = gemm_abt(X.data(), Wfc.data(), T, 2 * I, d);
        check_rel("shared fch = X Wfc^T", floatX_to_float(o.fch).data(), ref.data(), 2 * TI, 1e-2);
        std::vector<double> act_ref(TI), dwide_ref(2 * TI);
        for (int t = 0; t < T; t++)
            for (int i = 0; i < I; i++) {
                double gg = fch[(size_t)t * 2 * I + i], u = fch[(size_t)t * 2 * I + I + i], sg = sigmoid_d(gg);
                double dhv = dh[(size_t)t * I + i];
                act_ref[(size_t)t * I + i] = gg * sg * u;
                dwide_ref[(size_t)t * 2 * I + i] = dhv * u * sg * (1.0 + gg * (1.0 - sg));
                dwide_ref[(size_t)t * 2 * I + I + i] = dhv * gg * sg;
            }
        check_rel("shared fch_act = SiLU(g) u", floatX_to_float(o.fch_act).data(), act_ref.data(), TI, 1e-2);
        // Wd (d, I): dY (T, d) Wd = (Wd^T dY^T)^T: gemm_abt with Wd^T (I, d)
        std::vector<double> WdT(Id);
        for (int c = 0; c < d; c++)
            for (int i = 0; i < I; i++) WdT[(size_t)i * d + c] = Wdn[(size_t)c * I + i];
        ref = gemm_abt(dY.data(), WdT.data(), T, I, d);
        check_rel("shared dhidden = dY Wd", floatX_to_float(o.dhidden).data(), ref.data(), TI, 1e-2);
        check_rel("shared dwide = SwiGLU backward", floatX_to_float(o.dwide).data(), dwide_ref.data(), 2 * TI, 1e-2);
        ref = gemm_atb(dY.data(), act.data(), d, I, T);
        check_rel_delta("shared dWd += dY^T fch_act", floatX_to_float(o.dWd).data(), hdWd0.data(), ref.data(), Id, 1e-2);
        ref = gemm_atb(dwide.data(), X.data(), 2 * I, d, T);
        check_rel_delta("shared dWfc += dwide^T X", floatX_to_float(o.dWfc).data(), hdWfc0.data(), ref.data(), 2 * Id, 1e-2);
        Y0_ref = gemm_abt(act.data(), Wdn.data(), T, d, I);
        // dX0 = dwide Wfc: gemm_abt with Wfc^T (d, 2I)
        std::vector<double> WfcT(2 * Id);
        for (int j = 0; j < 2 * I; j++)
            for (int c = 0; c < d; c++) WfcT[(size_t)c * 2 * I + j] = Wfc[(size_t)j * d + c];
        dX0_ref = gemm_abt(dwide.data(), WfcT.data(), T, d, 2 * I);
    }

    // outputs and gradients vs the reference: the routed part alone (written into NaN) and on
    // top of the shared branch (Y = shared + experts; dX = shared + experts + router)
    std::vector<double> Y_total(Td), dX_all(Td);
    for (size_t i = 0; i < Td; i++) { Y_total[i] = Y0_ref[i] + R.Y[i]; dX_all[i] = dX0_ref[i] + dX_total[i]; }
    for (int sh = 0; sh < 2; sh++) {
        for (int ex = 0; ex < 2; ex++) {
            const LayerOutputs& q = sh ? out[ex] : alone[ex];
            char tag[16], what[80];
            snprintf(tag, sizeof(tag), "%s%s", ex == EXPERT_EXEC_TOKEN ? "TC" : "EC", sh ? "" : " alone");
            snprintf(what, sizeof(what), "%s s (fp32)", tag);
            check_rel(what, q.s.data(), R.s.data(), Tk, 1e-5);
            snprintf(what, sizeof(what), "%s dgate (fp32)", tag);
            check_rel(what, q.dgate.data(), dgr.data(), Tk, 1e-4);
            snprintf(what, sizeof(what), sh ? "%s Y = shared + experts" : "%s Y = experts (into NaN)", tag);
            check_rel(what, floatX_to_float(q.Y).data(), sh ? Y_total.data() : R.Y.data(), Td, 1e-2);
            snprintf(what, sizeof(what), sh ? "%s dX = shared + experts + router" : "%s dX = experts + router (into NaN)", tag);
            check_rel(what, floatX_to_float(q.dX).data(), sh ? dX_all.data() : dX_total.data(), Td, 1e-2);
            snprintf(what, sizeof(what), "%s dU +=", tag);
            std::vector<float> dU = floatX_to_float(q.dU), dV = floatX_to_float(q.dV);
            check_rel_delta(what, dU.data(), hdU0.data(), dUr.data(), Nd, 1e-2);
            snprintf(what, sizeof(what), "%s dV +=", tag);
            check_rel_delta(what, dV.data(), hdV0.data(), dVr.data(), Nd, 1e-2);
            snprintf(what, sizeof(what), "%s dWrc +=", tag);
            check_rel_delta(what, floatX_to_float(q.dW).data(), hdW0.data(), dWr.data(), Wd, 1e-2);
            // rows of experts nobody chose: bitwise untouched
            std::vector<char> used(N, 0);
            for (int p = 0; p < P; p++) used[q.idx[p]] = 1;
            int unused = 0, touched = 0;
            std::vector<floatX> dU0(Nd), dV0(Nd);
            host_float_to_floatX(dU0.data(), hdU0.data(), Nd);
            host_float_to_floatX(dV0.data(), hdV0.data(), Nd);
            for (int e = 0; e < N; e++) {
                if (used[e]) continue;
                unused++;
                if (memcmp(&q.dU[(size_t)e * d], &dU0[(size_t)e * d], d * sizeof(floatX)) != 0 ||
                    memcmp(&q.dV[(size_t)e * d], &dV0[(size_t)e * d], d * sizeof(floatX)) != 0) touched++;
            }
            snprintf(what, sizeof(what), "%s dU/dV rows of unused experts untouched", tag);
            record(touched == 0, what, "%d of %d touched", touched, unused);
        }
    }
    // the experts' add onto the shared branch, precisely: the same layer's Y and dX minus the
    // shared branch the GPU computed (recomputed here with the same matmul calls: the same bits)
    {
        floatX *Y0 = dev_alloc<floatX>(Td), *dX0 = dev_alloc<floatX>(Td), *junk = dev_alloc<floatX>(2 * Id);
        std::vector<float> hwide = floatX_to_float(out[0].dwide), hact = floatX_to_float(out[0].fch_act);
        floatX *wide = dev_alloc<floatX>(2 * TI), *act = dev_alloc<floatX>(TI);
        upload_floatX(wide, hwide.data(), 2 * TI);
        upload_floatX(act, hact.data(), TI);
        matmul_forward(Y0, act, D.Wd, NULL, T, I, d, 0);
        matmul_backward(dX0, junk, NULL, wide, D.X, D.Wfc, T, d, 2 * I, 0, 0, D.ws.scratch);
        std::vector<float> hY0 = floatX_to_float(download(Y0, Td)), hdX0 = floatX_to_float(download(dX0, Td));
        check_rel_delta("TC Y - shared (GPU) vs experts", floatX_to_float(out[0].Y).data(), hY0.data(), R.Y.data(), Td, 1e-2);
        check_rel_delta("TC dX - shared (GPU) vs experts + router", floatX_to_float(out[0].dX).data(), hdX0.data(),
                        dX_total.data(), Td, 1e-2);
        void* bufs[] = {Y0, dX0, junk, wide, act};
        for (void* b : bufs) cudaCheck(cudaFree(b));
    }
    const char* diff = "";
    record(outputs_identical(out[0], out[1], &diff), "token-centric == expert-centric bitwise (all outputs)", "%s", diff);
    record(outputs_identical(alone[0], alone[1], &diff), "alone, token-centric == expert-centric bitwise", "%s", diff);

    // run twice: bitwise identical
    {
        reset_and_poison(D, 0);
        run_layer(D, 1, EXPERT_EXEC_TOKEN, 0);
        LayerOutputs again = download_all(D, 1, EXPERT_EXEC_TOKEN);
        record(outputs_identical(out[0], again, &diff), "second run bitwise identical", "%s", diff);
    }

    // CUDA graph: capture the whole forward + backward (expert-centric, with the side stream's
    // fork and join) and replay it
    {
        cudaStream_t stream;
        cudaCheck(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
        cudaGraph_t graph;
        cudaGraphExec_t exec;
        cudaCheck(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
        run_layer(D, 1, EXPERT_EXEC_EXPERT, stream);
        cudaCheck(cudaStreamEndCapture(stream, &graph));
        cudaCheck(cudaGraphInstantiate(&exec, graph, 0));
        bool all_same = true;
        for (int rep = 0; rep < 2; rep++) {
            reset_and_poison(D, stream);
            cudaCheck(cudaGraphLaunch(exec, stream));
            cudaCheck(cudaStreamSynchronize(stream));
            LayerOutputs g = download_all(D, 1, EXPERT_EXEC_EXPERT);
            if (!outputs_identical(out[1], g, &diff)) all_same = false;
        }
        record(all_same, "CUDA graph (captured, replayed twice) == eager run bitwise", "%s", diff);
        cudaCheck(cudaGraphExecDestroy(exec));
        cudaCheck(cudaGraphDestroy(graph));
        cudaCheck(cudaStreamDestroy(stream));
    }

    for (int sh = 0; sh < 2; sh++)
        for (int ex = 0; ex < 2; ex++) omni_layer_free(&D.layer[sh][ex]);
    omni_workspace_free(&D.ws);
    void* bufs[] = {D.X, D.W, D.U, D.V, D.dY, D.Wfc, D.Wd, D.bn, D.bn_init, D.dWfc_init, D.dWd_init, D.dU_init,
                    D.dV_init, D.dW_init, D.Y, D.dX, D.dU, D.dV, D.dW, D.dWfc, D.dWd};
    for (void* b : bufs) cudaCheck(cudaFree(b));
}

int main(int argc, char** argv) {
    test_begin("test_omni");
    rng_init(&g_rng, 0x9E3779B97F4A7C15ull);
    if (argc > 1 && strcmp(argv[1], "--cpu-only") == 0) {  // the reference's own check, no GPU needed
        test_cpu_reference_fd();
        return test_end();
    }
    int device_count = 0;
    if (cudaGetDeviceCount(&device_count) != cudaSuccess || device_count == 0) {
        fprintf(stderr, "test_omni: no CUDA device\n");
        return 1;
    }
    cudaDeviceProp prop;
    cudaCheck(cudaGetDeviceProperties(&prop, 0));
    printf("test_omni on %s (floatX = %s)\n", prop.name, FLOATX_NAME);
    matmul_init();

    test_cpu_reference_fd();
    test_topk_unit();
    const LayerCase cases[] = {
        // name, T, d, I, n, k, bn, prob, training, ties
        {"k=4 bn softmax", 256, 128, 64, 8, 4, 1, 0, 1, 0},
        {"k=4 bn prob", 256, 128, 64, 8, 4, 1, 1, 1, 0},
        {"k=4 none softmax", 256, 128, 64, 8, 4, 0, 0, 1, 0},
        {"k=4 none prob", 256, 128, 64, 8, 4, 0, 1, 1, 0},
        {"k=16 bn softmax", 256, 128, 64, 8, 16, 1, 0, 1, 0},
        {"k=16 bn prob", 256, 128, 64, 8, 16, 1, 1, 1, 0},
        {"k=16 none softmax", 256, 128, 64, 8, 16, 0, 0, 1, 0},
        {"k=16 none prob", 256, 128, 64, 8, 16, 0, 1, 1, 0},
        {"ties k=4 none softmax", 256, 128, 64, 8, 4, 0, 0, 1, 1},
        {"ties k=16 none prob", 256, 128, 64, 8, 16, 0, 1, 1, 1},
        {"ties k=16 bn softmax", 256, 128, 64, 8, 16, 1, 0, 1, 1},
        {"eval BN k=4 softmax", 256, 128, 64, 8, 4, 1, 0, 0, 0},
        {"odd shapes", 100, 200, 24, 5, 7, 1, 0, 1, 0},
        {"k = N", 64, 64, 32, 4, 16, 1, 1, 1, 0},
        {"n=64 k=16 d=256", 512, 256, 128, 64, 16, 1, 0, 1, 0},
        {"n=96 k=24 (n > 64, serial-round selection)", 256, 128, 64, 96, 24, 1, 0, 1, 0},
        // n + k > 1536: four warps' backward shared memory would pass 48 KiB, the launcher takes fewer
        {"n=1530 k=16 (router backward with fewer warps a block)", 64, 32, 32, 1530, 16, 1, 0, 1, 0},
    };
    for (const LayerCase& lc : cases) test_layer_case(lc);
    matmul_free();

    g_case[0] = '\0';
    return test_end();
}
