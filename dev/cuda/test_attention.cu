/*
test_attention.cu - tests and microbenchmark for llmc/attention.cuh (causal multi-head attention).

Checks, on random data (never zeros), against a CPU float64 reference of naive attention (forward
and backward written out loop by loop in this file):
  - out, lse, dq, dk, dv: relative L2 error ||gpu - ref|| / ||ref|| and the worst element
    max|gpu - ref| / rms(ref), for head sizes 32, 64, 128, several T (multiples of the tiles and
    tails), peaky softmax inputs, every tile configuration that is benchmarked, and a sample of heads
    at the GPT-2 124M shape (B=32, T=1024, C=768, NH=12);
  - every output element written: outputs are filled with NaN before each run, any non-finite value
    left over fails;
  - determinism: a second run (outputs re-poisoned) must be bitwise identical;
then times forward and backward at the GPT-2 shape (median of cudaEvent-timed runs after warm-up).

Tolerances. bf16 (default): out, dq, dk, dv relative L2 < 1e-2, and worst element
max |gpu - ref| / (|ref| + rms(ref)) < 0.15. The kernels round P and dS to bf16 before the second
matrix product and round every output to bf16 (2^-9 relative each): a CPU emulation of exactly that
rounding gives relative L2 2-3e-3 (5e-3 for peaky softmax) and worst-element ratios up to 0.065;
a wrong mask, scale, tile or index gives > 1e-1 on either. lse is computed in fp32 from exact bf16
products: relative L2 < 1e-4. -DENABLE_FP32 (simple fp32 kernels): 1e-5 / 1e-4 / 1e-6 (measured
errors there are ~1e-6 / - / 5e-8). For T=1, dq = dk = 0 exactly and the absolute error is used.

Usage: test_attention            all checks + benchmark
       test_attention --quick    small checks only (no GPT-2 shape, no benchmark)
       test_attention --tiny     three tiny checks (for the slow compute-sanitizer tools)
       test_attention --bad-shape  must print an error about the head size and exit non-zero
Build: make kernel_tests (dev/cuda/build/test_attention and test_attention_fp32).
One PASS/FAIL line per check and the closing "test_attention: N passed, N failed" (llmc/test_harness.h);
benchmark lines start with SUMMARY.
*/
#include "../../llmc/test_harness.h"
#include "../../llmc/attention.cuh"
#ifdef HAVE_CUDNN_ATTENTION
#include "../../llmc/attention_cudnn.h"
#endif

// ------------------------------------------------------------------------------------------------
// host helpers

// floatX <-> float on the host (bf16: round to nearest even)
static floatX to_x(float v) { return (floatX)v; }
static float from_x(floatX v) { return (float)v; }

#ifdef ENABLE_FP32
static const double TOL_REL = 1e-5, TOL_WORST = 1e-4, TOL_LSE = 1e-6;
#else
static const double TOL_REL = 1e-2, TOL_WORST = 0.15, TOL_LSE = 1e-4;
#endif

// ------------------------------------------------------------------------------------------------
// CPU reference: naive causal attention for one (b, h), float64, materialising P (T x T).

struct RefHead {
    std::vector<double> out, lse, dq, dk, dv;  // (T, hs) except lse (T)
};

static void ref_head(const std::vector<float>& qkv, const std::vector<float>& dout,
                     int T, int C, int NH, int b, int h, RefHead& r) {
    const int hs = C / NH, C3 = 3 * C;
    const double scale = 1.0 / sqrt((double)hs);
    auto q = [&](int t, int d) { return (double)qkv[((size_t)b * T + t) * C3 + h * hs + d]; };
    auto k = [&](int t, int d) { return (double)qkv[((size_t)b * T + t) * C3 + C + h * hs + d]; };
    auto v = [&](int t, int d) { return (double)qkv[((size_t)b * T + t) * C3 + 2 * C + h * hs + d]; };
    auto dO = [&](int t, int d) { return (double)dout[((size_t)b * T + t) * C + h * hs + d]; };
    r.out.assign((size_t)T * hs, 0.0); r.lse.assign(T, 0.0);
    r.dq.assign((size_t)T * hs, 0.0); r.dk.assign((size_t)T * hs, 0.0); r.dv.assign((size_t)T * hs, 0.0);
    std::vector<double> P((size_t)T * T, 0.0);
    for (int i = 0; i < T; i++) {
        double mx = -INFINITY;
        for (int j = 0; j <= i; j++) {
            double s = 0.0;
            for (int d = 0; d < hs; d++) { s += q(i, d) * k(j, d); }
            s *= scale;
            P[(size_t)i * T + j] = s;
            mx = std::max(mx, s);
        }
        double sum = 0.0;
        for (int j = 0; j <= i; j++) { sum += exp(P[(size_t)i * T + j] - mx); }
        r.lse[i] = mx + log(sum);
        for (int j = 0; j <= i; j++) { P[(size_t)i * T + j] = exp(P[(size_t)i * T + j] - r.lse[i]); }
        for (int j = 0; j <= i; j++) {
            const double p = P[(size_t)i * T + j];
            for (int d = 0; d < hs; d++) { r.out[(size_t)i * hs + d] += p * v(j, d); }
        }
    }
    for (int i = 0; i < T; i++) {
        double Di = 0.0;
        for (int d = 0; d < hs; d++) { Di += dO(i, d) * r.out[(size_t)i * hs + d]; }
        for (int j = 0; j <= i; j++) {
            const double p = P[(size_t)i * T + j];
            double dp = 0.0;
            for (int d = 0; d < hs; d++) { dp += dO(i, d) * v(j, d); }
            const double ds = p * (dp - Di) * scale;
            for (int d = 0; d < hs; d++) {
                r.dq[(size_t)i * hs + d] += ds * k(j, d);
                r.dk[(size_t)j * hs + d] += ds * q(i, d);
                r.dv[(size_t)j * hs + d] += p * dO(i, d);
            }
        }
    }
}

struct ErrStat {
    double diff2 = 0, ref2 = 0, maxdiff = 0;
    size_t n = 0;
    void add(double gpu, double ref) {
        const double d = gpu - ref;
        diff2 += d * d; ref2 += ref * ref; n++;
        if (!(fabs(d) <= maxdiff)) { maxdiff = fabs(d); }  // NaN sticks
    }
    double rms() const { return sqrt(ref2 / std::max<size_t>(n, 1)); }
    // relative L2 error; for an exactly-zero reference (T=1: dq = dk = 0) the absolute rms error
    // (inputs are of unit scale)
    double rel() const { return rms() > 1e-12 ? sqrt(diff2 / ref2) : sqrt(diff2 / std::max<size_t>(n, 1)); }
};

// worst element: max |gpu - ref| / (|ref| + rms(ref)); large elements may carry proportionally
// larger rounding errors, tiny ones are measured against the typical size (floored at 1 for an
// all-zero reference).
struct WorstStat {
    double worst = 0;
    void add(double gpu, double ref, double rms) {
        const double r = fabs(gpu - ref) / (fabs(ref) + (rms > 1e-12 ? rms : 1.0));
        if (!(r <= worst)) { worst = r; }  // NaN sticks
    }
};

// ------------------------------------------------------------------------------------------------
// functions under test

typedef void (*FwdFn)(floatX*, float*, const floatX*, int, int, int, int, cudaStream_t);
typedef void (*BwdFn)(floatX*, const floatX*, const floatX*, const floatX*, const float*, int, int, int, int, float*, cudaStream_t);

#ifndef ENABLE_FP32
// head-size-64 tile configurations of the tensor-core kernels, wrapped to the public signature
template<int MT, int NW>
static void fwd_hs64(floatX* out, float* lse, const floatX* qkv, int B, int T, int C, int NH, cudaStream_t s) {
    if (C / NH != 64) { fprintf(stderr, "fwd_hs64: needs head size 64\n"); exit(EXIT_FAILURE); }
    attention_forward_tc<64, MT, NW>(out, lse, qkv, B, T, NH, s);
}
template<int DQW, int KVW, int BRQ, bool QREG, bool KVREG>
static void bwd_hs64(floatX* dqkv, const floatX* dout, const floatX* qkv, const floatX* out, const float* lse,
                     int B, int T, int C, int NH, float* scratch, cudaStream_t s) {
    if (C / NH != 64) { fprintf(stderr, "bwd_hs64: needs head size 64\n"); exit(EXIT_FAILURE); }
    attention_backward_tc<64, DQW, KVW, BRQ, QREG, KVREG>(dqkv, dout, qkv, out, lse, B, T, NH, scratch, s);
}
struct FwdVariant { const char* name; FwdFn fn; };
struct BwdVariant { const char* name; BwdFn fn; };
static const FwdVariant FWD_VARIANTS[] = {
    {"fwd MT=2 warps=4 (BR=128) [default]", fwd_hs64<2, 4>},
    {"fwd MT=1 warps=4 (BR=64)", fwd_hs64<1, 4>},
    {"fwd MT=1 warps=8 (BR=128)", fwd_hs64<1, 8>},
    {"fwd MT=2 warps=8 (BR=256)", fwd_hs64<2, 8>},
};
static const BwdVariant BWD_VARIANTS[] = {
    {"bwd dq4+qreg kv4 brq64 [default]", bwd_hs64<4, 4, 64, true, false>},
    {"bwd dq4 kv4 brq64", bwd_hs64<4, 4, 64, false, false>},
    {"bwd dq4+qreg kv4 brq32", bwd_hs64<4, 4, 32, true, false>},
    {"bwd dq4+qreg kv4+kvreg brq64", bwd_hs64<4, 4, 64, true, true>},
    {"bwd dq8+qreg kv8 brq64", bwd_hs64<8, 8, 64, true, false>},
};
#endif

#ifdef HAVE_CUDNN_ATTENTION
// cuDNN's SDPA (llmc/attention_cudnn.h) wrapped to the signatures above; its forward also needs
// the scratch, which the forward signature lacks: Problem::run points this at its scratch
static void* g_cudnn_scratch = nullptr;
static void fwd_cudnn(floatX* out, float* lse, const floatX* qkv, int B, int T, int C, int NH, cudaStream_t s) {
    attention_cudnn_forward(out, lse, qkv, B, T, C, NH, g_cudnn_scratch, s);
}
static void bwd_cudnn(floatX* dqkv, const floatX* dout, const floatX* qkv, const floatX* out, const float* lse,
                      int B, int T, int C, int NH, float* scratch, cudaStream_t s) {
    attention_cudnn_backward(dqkv, dout, qkv, out, lse, B, T, C, NH, scratch, s);
}
#endif

// ------------------------------------------------------------------------------------------------
// one problem: inputs on host and device, outputs, run + check

struct Problem {
    int B, T, C, NH;
    std::vector<floatX> h_qkv, h_dout;
    std::vector<float> f_qkv, f_dout;  // exact float values of the floatX inputs
    floatX *d_qkv = nullptr, *d_dout = nullptr, *d_out = nullptr, *d_dqkv = nullptr;
    float *d_lse = nullptr, *d_scratch = nullptr;
    size_t n_qkv, n_out, n_lse, scratch_bytes;

    Problem(int B_, int T_, int C_, int NH_, float qk_std, uint64_t seed) : B(B_), T(T_), C(C_), NH(NH_) {
        n_qkv = (size_t)B * T * 3 * C; n_out = (size_t)B * T * C; n_lse = (size_t)B * NH * T;
        Rng rng = rng_seeded(seed);
        h_qkv.resize(n_qkv); f_qkv.resize(n_qkv); h_dout.resize(n_out); f_dout.resize(n_out);
        fill_normal(f_qkv.data(), n_qkv, 0.0f, 1.0f, &rng);
        fill_normal(f_dout.data(), n_out, 0.0f, 1.0f, &rng);
        for (size_t i = 0; i < n_qkv; i++) {
            const int ch = (int)(i % (3 * C));
            const float sd = ch < 2 * C ? qk_std : 1.0f;  // q and k get qk_std, v gets 1
            h_qkv[i] = to_x(sd * f_qkv[i]); f_qkv[i] = from_x(h_qkv[i]);
        }
        for (size_t i = 0; i < n_out; i++) { h_dout[i] = to_x(f_dout[i]); f_dout[i] = from_x(h_dout[i]); }
        scratch_bytes = attention_backward_scratch_bytes(B, T, C, NH);
#ifdef HAVE_CUDNN_ATTENTION
        // cuDNN's SDPA does not support a sequence of one token (s_q = s_kv = 1), and the cuDNN
        // cases below never use T = 1; asking it for a T = 1 graph would stop the test
        if (T >= 2) scratch_bytes = std::max(scratch_bytes, attention_cudnn_scratch_bytes(B, T, C, NH));
#endif
        cudaCheck(cudaMalloc(&d_qkv, n_qkv * sizeof(floatX)));
        cudaCheck(cudaMalloc(&d_dout, n_out * sizeof(floatX)));
        cudaCheck(cudaMalloc(&d_out, n_out * sizeof(floatX)));
        cudaCheck(cudaMalloc(&d_dqkv, n_qkv * sizeof(floatX)));
        cudaCheck(cudaMalloc(&d_lse, n_lse * sizeof(float)));
        cudaCheck(cudaMalloc(&d_scratch, scratch_bytes));
        cudaCheck(cudaMemcpy(d_qkv, h_qkv.data(), n_qkv * sizeof(floatX), cudaMemcpyHostToDevice));
        cudaCheck(cudaMemcpy(d_dout, h_dout.data(), n_out * sizeof(floatX), cudaMemcpyHostToDevice));
    }
    ~Problem() {
        cudaCheck(cudaFree(d_qkv)); cudaCheck(cudaFree(d_dout)); cudaCheck(cudaFree(d_out));
        cudaCheck(cudaFree(d_dqkv)); cudaCheck(cudaFree(d_lse)); cudaCheck(cudaFree(d_scratch));
    }
    // poison every output and the scratch with NaN (all-ones bytes are NaN in bf16 and fp32)
    void poison() {
        cudaCheck(cudaMemset(d_out, 0xFF, n_out * sizeof(floatX)));
        cudaCheck(cudaMemset(d_dqkv, 0xFF, n_qkv * sizeof(floatX)));
        cudaCheck(cudaMemset(d_lse, 0xFF, n_lse * sizeof(float)));
        cudaCheck(cudaMemset(d_scratch, 0xFF, scratch_bytes));
    }
    void run(FwdFn fwd, BwdFn bwd) {
#ifdef HAVE_CUDNN_ATTENTION
        g_cudnn_scratch = d_scratch;
#endif
        fwd(d_out, d_lse, d_qkv, B, T, C, NH, 0);
        bwd(d_dqkv, d_dout, d_qkv, d_out, d_lse, B, T, C, NH, d_scratch, 0);
        cudaCheck(cudaDeviceSynchronize());
    }
    void fetch(std::vector<floatX>& out, std::vector<float>& lse, std::vector<floatX>& dqkv) {
        out.resize(n_out); lse.resize(n_lse); dqkv.resize(n_qkv);
        cudaCheck(cudaMemcpy(out.data(), d_out, n_out * sizeof(floatX), cudaMemcpyDeviceToHost));
        cudaCheck(cudaMemcpy(lse.data(), d_lse, n_lse * sizeof(float), cudaMemcpyDeviceToHost));
        cudaCheck(cudaMemcpy(dqkv.data(), d_dqkv, n_qkv * sizeof(floatX), cudaMemcpyDeviceToHost));
    }
};

// Runs fwd+bwd twice on the problem, checks NaN-poisoning, bitwise determinism and the heads in
// `heads` (pairs b, h; empty = all) against the CPU reference.
static void check(const char* name, Problem& pr, FwdFn fwd, BwdFn bwd, std::vector<std::pair<int, int>> heads) {
    const int B = pr.B, T = pr.T, C = pr.C, NH = pr.NH, hs = C / NH, C3 = 3 * C;
    std::vector<floatX> out1, dqkv1, out2, dqkv2;
    std::vector<float> lse1, lse2;
    pr.poison(); pr.run(fwd, bwd); pr.fetch(out1, lse1, dqkv1);
    pr.poison(); pr.run(fwd, bwd); pr.fetch(out2, lse2, dqkv2);

    size_t nonfinite = 0;
    for (floatX x : out1) { nonfinite += !isfinite(from_x(x)); }
    for (floatX x : dqkv1) { nonfinite += !isfinite(from_x(x)); }
    for (float x : lse1) { nonfinite += !isfinite(x); }
    const bool same = memcmp(out1.data(), out2.data(), out1.size() * sizeof(floatX)) == 0 &&
                      memcmp(dqkv1.data(), dqkv2.data(), dqkv1.size() * sizeof(floatX)) == 0 &&
                      memcmp(lse1.data(), lse2.data(), lse1.size() * sizeof(float)) == 0;

    if (heads.empty()) {
        for (int b = 0; b < B; b++) { for (int h = 0; h < NH; h++) { heads.push_back({b, h}); } }
    }
    // two passes over the reference: norms first, then the worst-element ratios that need them
    std::vector<RefHead> refs(heads.size());
    for (size_t i = 0; i < heads.size(); i++) { ref_head(pr.f_qkv, pr.f_dout, T, C, NH, heads[i].first, heads[i].second, refs[i]); }
    ErrStat e[5];  // out, dq, dk, dv, lse
    WorstStat w[4];
    for (int pass = 0; pass < 2; pass++) {
        for (size_t i = 0; i < heads.size(); i++) {
            const int b = heads[i].first, h = heads[i].second;
            const RefHead& r = refs[i];
            for (int t = 0; t < T; t++) {
                if (pass == 0) { e[4].add(lse1[((size_t)b * NH + h) * T + t], r.lse[t]); }
                for (int d = 0; d < hs; d++) {
                    const size_t row3 = ((size_t)b * T + t) * C3 + h * hs + d;
                    const double g[4] = {from_x(out1[((size_t)b * T + t) * C + h * hs + d]), from_x(dqkv1[row3]),
                                         from_x(dqkv1[row3 + C]), from_x(dqkv1[row3 + 2 * C])};
                    const double rv[4] = {r.out[(size_t)t * hs + d], r.dq[(size_t)t * hs + d],
                                          r.dk[(size_t)t * hs + d], r.dv[(size_t)t * hs + d]};
                    for (int k = 0; k < 4; k++) {
                        if (pass == 0) { e[k].add(g[k], rv[k]); } else { w[k].add(g[k], rv[k], e[k].rms()); }
                    }
                }
            }
        }
    }
    bool ok = nonfinite == 0 && same && e[4].rel() < TOL_LSE;
    for (int k = 0; k < 4; k++) { ok = ok && e[k].rel() < TOL_REL && w[k].worst < TOL_WORST; }
    char full[160];
    snprintf(full, sizeof(full), "%s B=%d T=%d C=%d NH=%d", name, B, T, C, NH);
    test_checkf(ok, full, "hs=%d heads=%zu | rel out %.2e lse %.2e dq %.2e dk %.2e dv %.2e | worst %.2g %.2g %.2g %.2g"
                " | nonfinite %zu | rerun %s", hs, heads.size(), e[0].rel(), e[4].rel(), e[1].rel(), e[2].rel(),
                e[3].rel(), w[0].worst, w[1].worst, w[2].worst, w[3].worst, nonfinite, same ? "bitwise-same" : "DIFFERENT");
}

// CUDA-graph capture (global mode, the strictest) of forward + backward on a side stream: the
// launchers must be capturable (no syncs, no allocations); the replay must match a direct run bitwise.
static void graph_check(Problem& pr) {
    std::vector<floatX> out1, dqkv1, out2, dqkv2;
    std::vector<float> lse1, lse2;
    pr.poison(); pr.run(attention_forward, attention_backward); pr.fetch(out1, lse1, dqkv1);
    pr.poison();
    cudaStream_t st;
    cudaCheck(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    cudaCheck(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
    attention_forward(pr.d_out, pr.d_lse, pr.d_qkv, pr.B, pr.T, pr.C, pr.NH, st);
    attention_backward(pr.d_dqkv, pr.d_dout, pr.d_qkv, pr.d_out, pr.d_lse, pr.B, pr.T, pr.C, pr.NH, pr.d_scratch, st);
    cudaCheck(cudaStreamEndCapture(st, &graph));
    cudaCheck(cudaGraphInstantiate(&exec, graph, 0));
    cudaCheck(cudaGraphLaunch(exec, st));
    cudaCheck(cudaStreamSynchronize(st));
    pr.fetch(out2, lse2, dqkv2);
    const bool same = memcmp(out1.data(), out2.data(), out1.size() * sizeof(floatX)) == 0 &&
                      memcmp(dqkv1.data(), dqkv2.data(), dqkv1.size() * sizeof(floatX)) == 0 &&
                      memcmp(lse1.data(), lse2.data(), lse1.size() * sizeof(float)) == 0;
    char name[160];
    snprintf(name, sizeof(name), "CUDA graph capture fwd+bwd B=%d T=%d C=%d NH=%d", pr.B, pr.T, pr.C, pr.NH);
    test_checkf(same, name, "graph replay %s direct run", same ? "bitwise-same as" : "DIFFERS from");
    cudaCheck(cudaGraphExecDestroy(exec));
    cudaCheck(cudaGraphDestroy(graph));
    cudaCheck(cudaStreamDestroy(st));
}

// ------------------------------------------------------------------------------------------------
// timing

static double g_peak_tflops = 0.0;  // this card's dense bf16 peak (cuda_peak_bf16_flops), 0 if unknown

static double fwd_flops(int B, int T, int NH, int hs) { return 2.0 * 2.0 * B * NH * (double)T * T * hs / 2.0; }

static void bench_line(const char* what, double flops, float ms) {
    const double tf = flops / (ms * 1e-3) / 1e12;
    printf("SUMMARY %-44s %8.3f ms %7.1f TFLOP/s  %5.1f%% of %g\n", what, ms, tf,
           g_peak_tflops > 0 ? 100.0 * tf / g_peak_tflops : 0.0, g_peak_tflops);
}

// ------------------------------------------------------------------------------------------------

int main(int argc, char** argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);  // line-buffered even through a pipe
    test_begin("test_attention" TEST_FLOATX_SUFFIX);
    bool quick = false, tiny = false;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--quick") == 0) { quick = true; }
        else if (strcmp(argv[i], "--tiny") == 0) { quick = tiny = true; }
        else if (strcmp(argv[i], "--bad-shape") == 0) {
            // head size 50 is unsupported: attention_forward must refuse with a clear message
            floatX *qkv, *out; float* lse;
            cudaCheck(cudaMalloc(&qkv, 3 * 250 * 64 * sizeof(floatX)));
            cudaCheck(cudaMalloc(&out, 250 * 64 * sizeof(floatX)));
            cudaCheck(cudaMalloc(&lse, 5 * 64 * sizeof(float)));
            attention_forward(out, lse, qkv, 1, 64, 250, 5, 0);
            printf("--bad-shape: attention_forward accepted head size 50 (it should have exited)\n");
            return 0;
        } else {
            fprintf(stderr, "test_attention: unknown argument '%s' (expected --quick, --tiny or --bad-shape)\n", argv[i]);
            return EXIT_FAILURE;
        }
    }
    cudaDeviceProp prop;
    cudaCheck(cudaGetDeviceProperties(&prop, 0));
    g_peak_tflops = cuda_peak_bf16_flops(prop.name) / 1e12;
    printf("peak bf16 %g TFLOP/s\n", g_peak_tflops);
    printf("device: %s, %d SMs, floatX = %s\n", prop.name, prop.multiProcessorCount,
           sizeof(floatX) == 2 ? "bf16 (tensor-core kernels)" : "fp32 (simple kernels)");
    printf("tolerances: rel L2 < %.0e, worst element |gpu-ref|/(|ref|+rms(ref)) < %.3g, lse rel < %.0e\n", TOL_REL, TOL_WORST, TOL_LSE);

    const FwdFn F = attention_forward;
    const BwdFn Bw = attention_backward;
    if (tiny) {  // one small tail case per head size (for the slow sanitizer tools)
        { Problem p(1, 130, 128, 2, 1.0f, 21); check("hs64 tail T=130", p, F, Bw, {}); }
        { Problem p(1, 70, 128, 4, 1.0f, 22);  check("hs32 tail T=70", p, F, Bw, {}); }
        { Problem p(1, 70, 128, 1, 1.0f, 23);  check("hs128 tail T=70", p, F, Bw, {}); }
        return test_end();
    }
    // small shapes, every head checked
    {
        Problem p(2, 256, 256, 4, 1.0f, 1);    check("hs64 T=256", p, F, Bw, {});
    }
    {
        Problem p(2, 200, 256, 4, 1.0f, 2);    check("hs64 tail T=200", p, F, Bw, {});
    }
    {
        Problem p(3, 77, 256, 4, 1.0f, 3);     check("hs64 tail T=77", p, F, Bw, {});
    }
    {
        Problem p(2, 1, 256, 4, 1.0f, 4);      check("hs64 T=1", p, F, Bw, {});
    }
    {
        Problem p(2, 256, 256, 4, 3.0f, 5);    check("hs64 peaky (q,k std 3)", p, F, Bw, {});
    }
    {
        Problem p(2, 256, 256, 8, 1.0f, 6);    check("hs32 T=256", p, F, Bw, {});
    }
    {
        Problem p(2, 131, 256, 8, 1.0f, 7);    check("hs32 tail T=131", p, F, Bw, {});
    }
    {
        Problem p(2, 256, 256, 2, 1.0f, 8);    check("hs128 T=256", p, F, Bw, {});
    }
    {
        Problem p(2, 130, 256, 2, 1.0f, 9);    check("hs128 tail T=130", p, F, Bw, {});
    }
    {
        Problem p(1, 1024, 128, 2, 1.5f, 10);  check("hs64 T=1024", p, F, Bw, {});
    }
    {
        Problem p(2, 200, 256, 4, 1.0f, 15); graph_check(p);
    }
#ifndef ENABLE_FP32
    // every benchmarked tile configuration, on a multiple of the tiles and on a tail
    for (const FwdVariant& fv : FWD_VARIANTS) {
        Problem p(2, 256, 256, 4, 1.0f, 11); check(fv.name, p, fv.fn, Bw, {});
        Problem q(2, 333, 256, 4, 1.0f, 12); check(fv.name, q, fv.fn, Bw, {});
    }
    for (const BwdVariant& bv : BWD_VARIANTS) {
        Problem p(2, 256, 256, 4, 1.0f, 13); check(bv.name, p, F, bv.fn, {});
        Problem q(2, 333, 256, 4, 1.0f, 14); check(bv.name, q, F, bv.fn, {});
    }
#endif
#ifdef HAVE_CUDNN_ATTENTION
    // cuDNN's SDPA against the same reference and tolerances, alone and mixed with our kernels
    // (the mixed runs check that its lse means what ours means)
    {
        Problem p(2, 256, 256, 4, 1.0f, 31);   check("cudnn hs64 T=256", p, fwd_cudnn, bwd_cudnn, {});
        Problem q(3, 77, 256, 4, 1.0f, 32);    check("cudnn hs64 tail T=77", q, fwd_cudnn, bwd_cudnn, {});
        Problem r(2, 256, 256, 4, 3.0f, 33);   check("cudnn hs64 peaky (q,k std 3)", r, fwd_cudnn, bwd_cudnn, {});
        Problem s32(2, 131, 256, 8, 1.0f, 34); check("cudnn hs32 tail T=131", s32, fwd_cudnn, bwd_cudnn, {});
        Problem s128(2, 130, 256, 2, 1.0f, 35); check("cudnn hs128 tail T=130", s128, fwd_cudnn, bwd_cudnn, {});
        Problem m(2, 200, 256, 4, 1.0f, 36);
        check("cudnn fwd + our bwd", m, fwd_cudnn, Bw, {});
        check("our fwd + cudnn bwd", m, F, bwd_cudnn, {});
    }
#endif
    if (quick) {
        return test_end();
    }

    // GPT-2 124M shape: sample of heads vs the CPU reference, all elements NaN-checked and rerun
    const int B = 32, T = 1024, C = 768, NH = 12, hs = C / NH;
    Problem big(B, T, C, NH, 1.0f, 42);
    check("GPT-2 shape (3 sampled heads)", big, F, Bw, {{0, 0}, {17, 5}, {31, 11}});

    const double ff = fwd_flops(B, T, NH, hs), fb = 2.5 * ff;
    printf("benchmark at B=%d T=%d C=%d NH=%d: causal FLOPs fwd %.2f GFLOP, bwd (2.5x) %.2f GFLOP\n", B, T, C, NH, ff * 1e-9, fb * 1e-9);
    const int WARM = 5, ITERS = 30;
    float ms_fwd = bench_median_ms([&] { attention_forward(big.d_out, big.d_lse, big.d_qkv, B, T, C, NH, 0); }, WARM, ITERS);
    float ms_bwd = bench_median_ms([&] { attention_backward(big.d_dqkv, big.d_dout, big.d_qkv, big.d_out, big.d_lse, B, T, C, NH, big.d_scratch, 0); }, WARM, ITERS);
    cudaCheck(cudaDeviceSynchronize());
#ifndef ENABLE_FP32
    for (const FwdVariant& fv : FWD_VARIANTS) {
        float ms = bench_median_ms([&] { fv.fn(big.d_out, big.d_lse, big.d_qkv, B, T, C, NH, 0); }, WARM, ITERS);
        bench_line(fv.name, ff, ms);
    }
    for (const BwdVariant& bv : BWD_VARIANTS) {
        float ms = bench_median_ms([&] { bv.fn(big.d_dqkv, big.d_dout, big.d_qkv, big.d_out, big.d_lse, B, T, C, NH, big.d_scratch, 0); }, WARM, ITERS);
        bench_line(bv.name, fb, ms);
    }
    // backward parts of the default configuration (fractions of the bwd FLOPs are not meaningful
    // per part, so print time only)
    {
        float ms_pre = bench_median_ms([&] { attention_backward_preprocess<64, floatX>(big.d_scratch, big.d_dout, big.d_out, big.d_lse, B, T, NH, 0); }, WARM, ITERS);
        float ms_kv = bench_median_ms([&] { attention_backward_dkdv_tc<64, 4, 64, false>(big.d_dqkv, big.d_dout, big.d_qkv, B, T, NH, big.d_scratch, 0); }, WARM, ITERS);
        float ms_dq = bench_median_ms([&] { attention_backward_dq_tc<64, 4, true>(big.d_dqkv, big.d_dout, big.d_qkv, B, T, NH, big.d_scratch, 0); }, WARM, ITERS);
        const double bytes_pre = 2.0 * B * T * C * sizeof(floatX) + 3.0 * B * NH * T * sizeof(float);
        printf("SUMMARY bwd parts (default): preprocess %.3f ms (%.0f GB/s), dK/dV %.3f ms, dQ %.3f ms\n",
               ms_pre, bytes_pre / (ms_pre * 1e-3) / 1e9, ms_kv, ms_dq);
    }
    // other head sizes at the same B, T, C
    {
        Problem p32(B, T, C, 24, 1.0f, 43);
        float f = bench_median_ms([&] { attention_forward(p32.d_out, p32.d_lse, p32.d_qkv, B, T, C, 24, 0); }, WARM, ITERS);
        float bw = bench_median_ms([&] { attention_backward(p32.d_dqkv, p32.d_dout, p32.d_qkv, p32.d_out, p32.d_lse, B, T, C, 24, p32.d_scratch, 0); }, WARM, ITERS);
        bench_line("hs32 (NH=24) fwd", fwd_flops(B, T, 24, 32), f);
        bench_line("hs32 (NH=24) bwd", 2.5 * fwd_flops(B, T, 24, 32), bw);
    }
    {
        Problem p128(B, T, C, 6, 1.0f, 44);
        float f = bench_median_ms([&] { attention_forward(p128.d_out, p128.d_lse, p128.d_qkv, B, T, C, 6, 0); }, WARM, ITERS);
        float bw = bench_median_ms([&] { attention_backward(p128.d_dqkv, p128.d_dout, p128.d_qkv, p128.d_out, p128.d_lse, B, T, C, 6, p128.d_scratch, 0); }, WARM, ITERS);
        bench_line("hs128 (NH=6) fwd", fwd_flops(B, T, 6, 128), f);
        bench_line("hs128 (NH=6) bwd", 2.5 * fwd_flops(B, T, 6, 128), bw);
    }
#endif
#ifdef HAVE_CUDNN_ATTENTION
    {   // cuDNN's SDPA (deterministic backward) at the same shape, beside ours
        check("cudnn GPT-2 shape (3 sampled heads)", big, fwd_cudnn, bwd_cudnn, {{0, 0}, {17, 5}, {31, 11}});
        g_cudnn_scratch = big.d_scratch;
        float f = bench_median_ms([&] { fwd_cudnn(big.d_out, big.d_lse, big.d_qkv, B, T, C, NH, 0); }, WARM, ITERS);
        float bw = bench_median_ms([&] { bwd_cudnn(big.d_dqkv, big.d_dout, big.d_qkv, big.d_out, big.d_lse, B, T, C, NH, big.d_scratch, 0); }, WARM, ITERS);
        bench_line("cudnn sdpa forward (GPT-2 124M shape)", ff, f);
        bench_line("cudnn sdpa backward, deterministic (GPT-2 124M shape)", fb, bw);
        bench_line("cudnn sdpa fwd+bwd (GPT-2 124M shape)", ff + fb, f + bw);
    }
#endif
    bench_line("attention_forward (GPT-2 124M shape)", ff, ms_fwd);
    bench_line("attention_backward (GPT-2 124M shape)", fb, ms_bwd);
    bench_line("attention fwd+bwd (GPT-2 124M shape)", ff + fb, ms_fwd + ms_bwd);
    return test_end();
}
