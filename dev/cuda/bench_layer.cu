/*
bench_layer.cu - the WHOLE OmniMoE layer (shared SwiGLU + router + scheduler + experts, docs/design.md §2-§3)
forward and forward+backward on the GPU, beside a dense SwiGLU of the same active size built from
the same matmul code, the router alone at 9 (n, k), a measured device copy bandwidth and a
measured bf16 GEMM rate: everything in one binary, so the ratios come from one run on one card.

  make dev/cuda/bench_layer_bin
  ./dev/cuda/bench_layer_bin [--json PATH] [--router-only]   (dev/bench_all.sh builds and runs it)
  --router-only: the ceilings and part 2 only

What runs (bf16, training mode: batch-norm router with batch statistics, softmax gate):
  0. device-to-device copy of 1 GiB (cudaMemcpyAsync): the bandwidth every "% of copy" below is
     taken against (bytes read + bytes written); a bf16 GEMM 8192^3 through llmc/matmul.cuh.
  1. layer, T=4096 d=1024 I=4096 N=4096 (n=64) k=16: llmc/omnimoe_layer.cuh, the layer the
     trainer runs (without the per-expert pair counts the trainer keeps for its usage
     statistics): fused gate|up GEMM, swiglu, down
     GEMM into Y; router; schedule; experts add onto Y. Backward: down GEMM backward, swiglu
     backward, gate|up GEMM backward into dX; experts add to dX, dU, dV; router adds to dX, dW.
     Token-centric (TC) and expert-centric (EC) executions. Beside it: the shared SwiGLU alone
     (I=4096), the dense SwiGLU with I=4160 (3dI' = 3dI + 2nd + 2kd rounded up to 64, the same
     active parameters; identical to dev/bench_torch.py's), and router + schedule + experts
     without the SwiGLU (the layer with I = 0: Y and dX written, not accumulated, like PyTorch's
     autograd).
  2. router alone (GEMM, BN, log-softmax, top-k, gates; backward to dX, dW) at T=4096 d=1024,
     n in {64, 256, 1024}, k in {16, 32, 64}: the 9 shapes of dev/bench_torch.py (c).
  Experts alone at N in {4096, 65536, 1048576} are in dev/cuda/bench_omni.cu (not repeated).

Timing: each measured sequence runs once eagerly (cuBLASLt picks and caches its algorithms),
then is captured in one CUDA graph; 3 warm-up replays; then 31 replays, each preceded (outside
the timed interval) by a 256 MiB memset that flushes the 50 MB L2, like triton's do_bench of
dev/bench_torch.py. The printed time is the median; min and max are kept in the JSON.
Gradients of weights accumulate (+=) across replays, as in gradient accumulation; values grow
but stay finite, and the time does not depend on them.

FLOPs (docs/design.md §4, forward; fwd+bwd = 3x): shared/dense SwiGLU 6 T d I, router GEMM 4 T n d,
experts 4 T k d. Bytes that must move (bf16 = 2 B): router, as dev/bench_torch.py counts them:
fwd X + W + ids and gates (2Td + 4nd + 8Tk), bwd dgate + X + W + dX + dW (4Tk + 4Td + 8nd).
Router + schedule + experts (no SwiGLU), every tensor once per pass and each of the A active
experts' rows once (the DRAM floor, like dev/cuda/bench_omni.cu's "min"; logits stay on chip):
fwd X, Y, W, the 2A rows of U and V, ids + gates + scores written (4Td + 4nd + 4Ad + 12Tk);
bwd dY, X, dX, W, dW, the 2A rows read, dU and dV rows read + written, ids + gates + scores
read (6Td + 8nd + 12Ad + 12Tk).

Checks before any timing (a failure prints "CHECK FAILED", the timings still run, exit 1):
  - after one eager forward+backward of the layer in each execution, with Y, dX and every
    intermediate poisoned with NaN before: every output and gradient is finite; expert ids are
    in [0, N) and distinct per token; gates sum to 1; Y of 4 tokens equals a CPU recomputation
    (double sums, the GPU's bf16 roundings of the GEMM and swiglu outputs, the GPU's ids and
    gates) within 2% of max|Y| (max error) and 1% (relative L2). To make the expert branch a
    large part of Y in this check, V is drawn with std 1 (U 0.05, other weights 0.02).
  - TC and EC give bitwise identical Y, dX, dWgu, dWd, dWr, dU, dV (experts.cuh promises it).
  - router alone: ids in range and distinct, gates sum to 1, dX and dW finite, at each (n, k);
    a hash of the ids is printed, so that two builds' routings can be compared bit for bit.
The results are in docs/performance.md (dev/bench_all.sh runs this).
*/
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <algorithm>
#include <vector>
#include "llmc/cuda_utils.cuh"
#include "llmc/matmul.cuh"
#include "llmc/activations.cuh"
#include "llmc/omnimoe_layer.cuh"

#define TIMED_REPS 31
#define WARMUP_REPS 3
#define FLUSH_BYTES ((size_t)256 << 20)

// ----------------------------------------------------------------------------
// buffers and random fills

template <class T>
static T* dev_alloc(size_t count, const char* what) { return (T*)cuda_malloc_or_die(count * sizeof(T) + 256, what); }

// uniform values of standard deviation `std` from a hash of the index (no host copy needed)
__global__ void bench_fill_kernel(floatX* out, size_t n, float std, uint32_t seed) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        uint32_t h = ((uint32_t)i ^ (uint32_t)(i >> 32) * 0x9E3779B9u) * 0x85EBCA6Bu ^ seed * 0xC2B2AE35u;
        h ^= h >> 15; h *= 0x2C1B3C6Du; h ^= h >> 12; h *= 0x297A2D39u; h ^= h >> 15;
        float u = (float)(h >> 8) * (1.0f / 16777216.0f);            // [0, 1)
        out[i] = (floatX)((2.0f * u - 1.0f) * 1.7320508f * std);      // variance std^2
    }
}
static void fill(floatX* p, size_t n, float std, uint32_t seed) {
    bench_fill_kernel<<<2048, 256>>>(p, n, std, seed);
    cudaCheckLast();
}
// all bits set: NaN for float and bf16, -1 for int32
static void poison(void* p, size_t bytes) { cudaCheck(cudaMemset(p, 0xFF, bytes)); }
// fills, memsets and uploads run on the legacy default stream, which does not order itself with
// the non-blocking stream the benchmarks use: wait for them before launching there
static void setup_done(void) { cudaCheck(cudaDeviceSynchronize()); }

static std::vector<float> download(const floatX* p, size_t n) {
    std::vector<float> h(n);
    download_floatX(h.data(), p, n);
    return h;
}
template <class T>
static std::vector<T> download_raw(const T* p, size_t n) {
    std::vector<T> h(n);
    cudaCheck(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
}

// ----------------------------------------------------------------------------
// checks: each failure is printed and remembered; the benchmark still runs and exits 1

static int g_check_failures = 0;
static char g_first_failure[256] = "";

static void check(int ok, const char* fmt, const char* what, double value) {
    if (ok) return;
    g_check_failures++;
    char line[256];
    snprintf(line, sizeof(line), fmt, what, value);
    printf("CHECK FAILED: %s\n", line);
    if (g_first_failure[0] == '\0') snprintf(g_first_failure, sizeof(g_first_failure), "%s", line);
}

static size_t count_non_finite(const std::vector<float>& v) {
    size_t bad = 0;
    for (float x : v) bad += !isfinite(x);
    return bad;
}

// ids in [0, N) and distinct within each token; gates finite and summing to 1
static void check_routing(const char* what, const int* idx, const float* gate, int T, int k, int N) {
    int bad_id = 0, repeated = 0, bad_gate = 0;
    std::vector<int> ids(k);
    for (int t = 0; t < T; t++) {
        double sum = 0.0;
        for (int m = 0; m < k; m++) {
            int e = idx[(size_t)t * k + m];
            bad_id += e < 0 || e >= N;
            ids[m] = e;
            sum += gate[(size_t)t * k + m];
        }
        std::sort(ids.begin(), ids.end());
        for (int m = 1; m < k; m++) repeated += ids[m] == ids[m - 1];
        bad_gate += !(fabs(sum - 1.0) < 1e-4);
    }
    check(bad_id == 0, "%s: %.0f expert ids outside [0, N)", what, bad_id);
    check(repeated == 0, "%s: %.0f repeated expert ids within a token", what, repeated);
    check(bad_gate == 0, "%s: %.0f tokens whose gates do not sum to 1", what, bad_gate);
}

// ----------------------------------------------------------------------------
// timing: eager run, capture, replay with an L2 flush before each timed replay

struct Timing { double median, min, max; };

static void* g_flush = NULL;
static cudaEvent_t g_ev_start, g_ev_stop;

template <class F>
static Timing time_graph(F fn, cudaStream_t st) {
    fn();  // eager: cuBLASLt heuristics run outside the capture
    cudaCheck(cudaStreamSynchronize(st));
    cudaCheckLast();
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    cudaCheck(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
    fn();
    cudaCheck(cudaStreamEndCapture(st, &graph));
    cudaCheck(cudaGraphInstantiate(&exec, graph, 0));
    for (int i = 0; i < WARMUP_REPS; i++) cudaCheck(cudaGraphLaunch(exec, st));
    std::vector<float> ms(TIMED_REPS);
    for (int i = 0; i < TIMED_REPS; i++) {
        cudaCheck(cudaMemsetAsync(g_flush, i & 0xFF, FLUSH_BYTES, st));
        cudaCheck(cudaEventRecord(g_ev_start, st));
        cudaCheck(cudaGraphLaunch(exec, st));
        cudaCheck(cudaEventRecord(g_ev_stop, st));
        cudaCheck(cudaEventSynchronize(g_ev_stop));
        cudaCheck(cudaEventElapsedTime(&ms[i], g_ev_start, g_ev_stop));
    }
    cudaCheck(cudaGraphExecDestroy(exec));
    cudaCheck(cudaGraphDestroy(graph));
    std::sort(ms.begin(), ms.end());
    Timing t = {ms[TIMED_REPS / 2], ms[0], ms[TIMED_REPS - 1]};
    return t;
}

// ----------------------------------------------------------------------------
// result rows (printed as they come, in a table at the end, and as JSON)

struct Row {
    char key[48];
    char name[64];
    char shape[48];
    Timing t;
    double bytes;  // bytes that must move (0: not a memory-bound row)
    double flops;  // FLOPs (0: not counted)
};
static std::vector<Row> g_rows;
static double g_copy_bytes_per_s = 0.0;  // measured, read + write
static double g_gemm_flops_per_s = 0.0;  // measured bf16 GEMM 8192^3

static void row_rate(const Row& r, char* out, size_t size) {
    out[0] = '\0';
    if (r.bytes > 0 && g_copy_bytes_per_s > 0) {
        double bps = r.bytes / (r.t.median * 1e-3);
        snprintf(out, size, "%7.1f MB  %5.1f%% of copy", r.bytes / 1e6, 100.0 * bps / g_copy_bytes_per_s);
    } else if (r.flops > 0) {
        snprintf(out, size, "%7.1f TFLOP/s", r.flops / (r.t.median * 1e-3) / 1e12);
    }
}

static void add_row(const char* key, const char* name, const char* shape, Timing t, double bytes, double flops) {
    Row r;
    snprintf(r.key, sizeof(r.key), "%s", key);
    snprintf(r.name, sizeof(r.name), "%s", name);
    snprintf(r.shape, sizeof(r.shape), "%s", shape);
    r.t = t;
    r.bytes = bytes;
    r.flops = flops;
    g_rows.push_back(r);
    char rate[64];
    row_rate(r, rate, sizeof(rate));
    printf("  %-40s %-30s %9.4f ms (%.4f-%.4f)  %s\n", name, shape, t.median, t.min, t.max, rate);
    fflush(stdout);
}

// ----------------------------------------------------------------------------
// 0. ceilings measured on this card

static void measure_ceilings(cudaStream_t st) {
    const size_t bytes = (size_t)1 << 30;
    char* a = dev_alloc<char>(bytes, "copy source");
    char* b = dev_alloc<char>(bytes, "copy target");
    cudaCheck(cudaMemset(a, 1, bytes));
    cudaCheck(cudaMemset(b, 2, bytes));
    setup_done();
    Timing t = time_graph([&] { cudaCheck(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, st)); }, st);
    g_copy_bytes_per_s = 2.0 * bytes / (t.median * 1e-3);
    printf("device-to-device copy of 1 GiB: %.3f ms = %.3f TB/s (read + write)\n", t.median, g_copy_bytes_per_s / 1e12);
    add_row("copy_1gib", "copy 1 GiB (cudaMemcpyAsync)", "1073741824 B", t, 2.0 * bytes, 0);
    cudaCheck(cudaFree(a));
    cudaCheck(cudaFree(b));

    const int S = 8192;
    const size_t SS = (size_t)S * S;
    floatX *A = dev_alloc<floatX>(SS, "gemm A"), *B = dev_alloc<floatX>(SS, "gemm B"), *C = dev_alloc<floatX>(SS, "gemm C");
    fill(A, SS, 1.0f, 101);
    fill(B, SS, 0.02f, 102);
    setup_done();
    t = time_graph([&] { matmul_forward(C, A, B, NULL, S, S, S, st); }, st);
    double flops = 2.0 * S * (double)S * S;
    g_gemm_flops_per_s = flops / (t.median * 1e-3);
    printf("bf16 GEMM 8192^3 (matmul_forward): %.3f ms = %.0f TFLOP/s\n", t.median, g_gemm_flops_per_s / 1e12);
    add_row("gemm_8192", "GEMM 8192^3 (matmul_forward)", "M=N=K=8192", t, 0, flops);
    cudaCheck(cudaFree(A));
    cudaCheck(cudaFree(B));
    cudaCheck(cudaFree(C));
}

// ----------------------------------------------------------------------------
// byte counts (see the header comment)

static double router_fwd_bytes(double T, double d, double n, double k) { return 2 * T * d + 4 * n * d + 8 * T * k; }
static double router_bwd_bytes(double T, double d, double n, double k) { return 4 * T * k + 4 * T * d + 8 * n * d; }
// router + experts without the SwiGLU (Y and dX written, not accumulated), A active experts
static double router_experts_fwd_bytes(double T, double d, double n, double k, double A) {
    return 2 * T * d + 2 * T * d + 4 * n * d + 4 * A * d + 12 * T * k;  // X, Y, W, U|V rows, ids|gates|scores
}
static double router_experts_bwd_bytes(double T, double d, double n, double k, double A) {
    return 3 * 2 * T * d + 8 * n * d + 12 * A * d + 12 * T * k;  // dY, X, dX; W, dW; U|V rows, dU|dV r+w; ids|gates|scores
}

// ----------------------------------------------------------------------------
// 1. the layer

// one token of Y recomputed on the CPU from the GPU's inputs, ids and gates (see the header)
static void cpu_layer_token(float* y, int t, const std::vector<float>& X, const std::vector<float>& Wgu,
                            const std::vector<float>& Wd, const std::vector<float>& U, const std::vector<float>& V,
                            const int* idx, const float* gate, int d, int I, int k) {
    const float* x = &X[(size_t)t * d];
    std::vector<float> gu(2 * (size_t)I), h(I);
    for (int j = 0; j < 2 * I; j++) {
        double acc = 0.0;
        const float* w = &Wgu[(size_t)j * d];
        for (int c = 0; c < d; c++) acc += (double)x[c] * w[c];
        gu[j] = host_round_to_floatX((float)acc);  // the GEMM writes bf16
    }
    for (int i = 0; i < I; i++) {
        float g = gu[i];
        h[i] = host_round_to_floatX(g * (1.0f / (1.0f + expf(-g))) * gu[I + i]);  // as swiglu_forward_kernel
    }
    std::vector<double> experts(d, 0.0);
    for (int m = 0; m < k; m++) {
        int e = idx[(size_t)t * k + m];
        double s = 0.0;
        for (int c = 0; c < d; c++) s += (double)x[c] * U[(size_t)e * d + c];
        double a = gate[(size_t)t * k + m] * (s / (1.0 + exp(-s)));
        for (int c = 0; c < d; c++) experts[c] += a * V[(size_t)e * d + c];
    }
    for (int c = 0; c < d; c++) {
        double acc = 0.0;
        const float* w = &Wd[(size_t)c * I];
        for (int i = 0; i < I; i++) acc += (double)h[i] * w[i];
        float shared = host_round_to_floatX((float)acc);  // the down GEMM writes bf16 into Y
        y[c] = host_round_to_floatX((float)(shared + experts[c]));
    }
}

static void bench_layer(cudaStream_t st) {
    const int T = 4096, d = 1024, I = 4096, I_dense = 4160, n = 64, N = n * n, k = 16, P = T * k, C2 = 2 * n;
    const size_t Td = (size_t)T * d, Nd = (size_t)N * d;
    printf("\n== 1. OmniMoE layer T=%d d=%d I=%d N=%d (n=%d) k=%d, bn, softmax gate, training; dense SwiGLU I=%d ==\n",
           T, d, I, N, n, k, I_dense);
    // inputs and weights
    floatX *X = dev_alloc<floatX>(Td, "X"), *dY = dev_alloc<floatX>(Td, "dY");
    floatX *Wgu = dev_alloc<floatX>((size_t)2 * I * d, "Wgu"), *Wd = dev_alloc<floatX>((size_t)d * I, "Wd");
    floatX *Wgu2 = dev_alloc<floatX>((size_t)2 * I_dense * d, "dense Wgu"), *Wd2 = dev_alloc<floatX>((size_t)d * I_dense, "dense Wd");
    floatX *Wr = dev_alloc<floatX>((size_t)C2 * d, "Wr"), *U = dev_alloc<floatX>(Nd, "U"), *V = dev_alloc<floatX>(Nd, "V");
    // gradients of weights (accumulated)
    floatX *dWgu = dev_alloc<floatX>((size_t)2 * I_dense * d, "dWgu"), *dWd = dev_alloc<floatX>((size_t)d * I_dense, "dWd");
    floatX *dWr = dev_alloc<floatX>((size_t)C2 * d, "dWr"), *dU = dev_alloc<floatX>(Nd, "dU"), *dV = dev_alloc<floatX>(Nd, "dV");
    // the dense SwiGLU's activations (the layer keeps its own)
    floatX *fch = dev_alloc<floatX>((size_t)T * 2 * I_dense, "fch"), *h = dev_alloc<floatX>((size_t)T * I_dense, "h");
    floatX *dfch = dev_alloc<floatX>((size_t)T * 2 * I_dense, "dfch"), *dh = dev_alloc<floatX>((size_t)T * I_dense, "dh");
    floatX *Y = dev_alloc<floatX>(Td, "Y"), *dX = dev_alloc<floatX>(Td, "dX");
    float* bn = dev_alloc<float>(2 * C2, "BN running mean, var");

    // the layer (llmc/omnimoe_layer.cuh), one per execution, and the same without its shared
    // SwiGLU (I = 0: router + schedule + experts, Y and dX written), all on one workspace
    const OmniDims dims = {T, d, I, n, N, k}, dims_re = {T, d, 0, n, N, k};
    const OmniWeights w = {Wgu, Wd, Wr, U, V}, dw = {dWgu, dWd, dWr, dU, dV};
    OmniWorkspace ws;
    omni_workspace_create(&ws, dims, NULL, 0, NULL, NULL);
    OmniLayer layers[2], layers_re[2];
    for (int mode = 0; mode < 2; mode++) {
        const OmniOptions opt = {ROUTER_NORM_BN, GATE_SOFTMAX, mode == 0 ? EXPERT_EXEC_TOKEN : EXPERT_EXEC_EXPERT};
        omni_layer_create(&layers[mode], dims, opt, w, dw, &ws, NULL, NULL);
        omni_layer_create(&layers_re[mode], dims_re, opt, w, dw, &ws, NULL, NULL);
        omni_layer_set_bn_stats(&layers[mode], bn);
        omni_layer_set_bn_stats(&layers_re[mode], bn);
    }

    fill(X, Td, 1.0f, 1);
    fill(dY, Td, 1.0f, 2);
    fill(Wgu, (size_t)2 * I * d, 0.02f, 3);
    fill(Wd, (size_t)d * I, 0.02f, 4);
    fill(Wgu2, (size_t)2 * I_dense * d, 0.02f, 5);
    fill(Wd2, (size_t)d * I_dense, 0.02f, 6);
    fill(Wr, (size_t)C2 * d, 0.02f, 7);
    fill(U, Nd, 0.05f, 8);
    fill(V, Nd, 1.0f, 9);  // std 1: the expert branch is a large part of Y (the check sees it)
    std::vector<float> ones(C2, 1.0f);
    setup_done();

    // the dense SwiGLU of the same active size (and the layer's shared branch alone)
    auto swiglu_fwd = [&](const floatX* wgu, const floatX* wd, int width) {
        swiglu_mlp_forward(Y, fch, h, X, wgu, wd, T, d, width, st);
    };
    auto swiglu_bwd = [&](const floatX* wgu, const floatX* wd, int width) {
        swiglu_mlp_backward(dX, dWgu, dWd, dh, dfch, dY, X, fch, h, wgu, wd, T, d, width, st, NULL);
    };
    auto layer_fwd = [&](OmniLayer* layer) { omni_layer_forward(layer, Y, X, T, 1, st); };
    auto layer_bwd = [&](OmniLayer* layer) { omni_layer_backward(layer, dX, dY, X, T, st); };

    // ---- checks: one eager forward+backward per execution on poisoned buffers
    const int check_tokens[4] = {0, 1, T / 2, T - 1};
    std::vector<float> ref_outputs[7];
    const char* out_names[7] = {"Y", "dX", "dWgu", "dWd", "dWr", "dU", "dV"};
    const floatX* out_ptrs[7] = {Y, dX, dWgu, dWd, dWr, dU, dV};
    const size_t out_sizes[7] = {Td, Td, (size_t)2 * I * d, (size_t)d * I, (size_t)C2 * d, Nd, Nd};
    std::vector<float> hX = download(X, Td), hWgu = download(Wgu, (size_t)2 * I * d), hWd = download(Wd, (size_t)d * I);
    std::vector<float> hU = download(U, Nd), hV = download(V, Nd);
    int num_active = 0;
    for (int mode = 0; mode < 2; mode++) {
        const char* tag = mode == 0 ? "TC" : "EC";
        OmniLayer* layer = &layers[mode];
        const OmniSaved* o = &layer->saved;
        for (int i = 2; i < 7; i++) cudaCheck(cudaMemset((void*)out_ptrs[i], 0, out_sizes[i] * sizeof(floatX)));
        cudaCheck(cudaMemset(bn, 0, C2 * sizeof(float)));
        cudaCheck(cudaMemcpy(bn + C2, ones.data(), C2 * sizeof(float), cudaMemcpyHostToDevice));
        poison(Y, Td * sizeof(floatX));
        poison(dX, Td * sizeof(floatX));
        poison(o->fch, (size_t)T * 2 * I * sizeof(floatX));
        poison(o->fch_act, (size_t)T * I * sizeof(floatX));
        poison(ws.dwide, (size_t)T * 2 * I * sizeof(floatX));
        poison(ws.dhidden, (size_t)T * I * sizeof(floatX));
        poison(o->router.logits, (size_t)T * C2 * sizeof(float));
        poison(o->router.logp, (size_t)T * C2 * sizeof(float));
        poison(o->router.gate, (size_t)P * sizeof(float));
        poison(o->s, (size_t)P * sizeof(float));
        poison(ws.dgate, (size_t)P * sizeof(float));
        setup_done();
        layer_fwd(layer);
        layer_bwd(layer);
        cudaCheck(cudaStreamSynchronize(st));
        cudaCheckLast();
        cudaCheck(cudaMemcpy(&num_active, o->sched.num_active, sizeof(int), cudaMemcpyDeviceToHost));
        std::vector<int> hidx = download_raw(o->router.idx, P);
        std::vector<float> hgate = download_raw(o->router.gate, P);
        char what[64];
        snprintf(what, sizeof(what), "layer %s", tag);
        check_routing(what, hidx.data(), hgate.data(), T, k, N);
        for (int i = 0; i < 7; i++) {
            std::vector<float> out = download(out_ptrs[i], out_sizes[i]);
            snprintf(what, sizeof(what), "layer %s %s", tag, out_names[i]);
            check(count_non_finite(out) == 0, "%s: %.0f non-finite values", what, (double)count_non_finite(out));
            if (mode == 0) {
                ref_outputs[i] = out;
            } else {
                size_t differ = 0;
                for (size_t j = 0; j < out.size(); j++) differ += memcmp(&out[j], &ref_outputs[i][j], sizeof(float)) != 0;
                check(differ == 0, "%s: %.0f values differ from the token-centric run (expected bitwise equal)", what,
                      (double)differ);
            }
            if (i == 0) {  // Y of a few tokens against the CPU
                std::vector<float> y(d);
                double max_err = 0.0, max_ref = 0.0, err2 = 0.0, ref2 = 0.0;
                for (int q = 0; q < 4; q++) {
                    int t = check_tokens[q];
                    cpu_layer_token(y.data(), t, hX, hWgu, hWd, hU, hV, hidx.data(), hgate.data(), d, I, k);
                    for (int c = 0; c < d; c++) {
                        double diff = fabs((double)out[(size_t)t * d + c] - y[c]);
                        max_err = std::max(max_err, diff != diff ? INFINITY : diff);
                        max_ref = std::max(max_ref, fabs((double)y[c]));
                        err2 += diff * diff;
                        ref2 += (double)y[c] * y[c];
                    }
                }
                double rel_l2 = sqrt(err2 / ref2), rel_max = max_err / max_ref;
                printf("  check %s: Y of 4 tokens vs CPU: max err %.3e (%.2e of max|Y| %.3f), rel L2 %.2e\n", tag,
                       max_err, rel_max, max_ref, rel_l2);
                check(rel_max <= 0.02, "%s: Y vs CPU max error %.3e of max|Y| (limit 0.02)", what, rel_max);
                check(rel_l2 <= 0.01, "%s: Y vs CPU relative L2 error %.3e (limit 0.01)", what, rel_l2);
            }
        }
    }
    printf("  active experts: %d of %d; checks so far: %s\n", num_active, N, g_check_failures ? "FAILED" : "passed");

    // ---- timings
    char shape[48], shape_dense[48], shape_re[48];
    snprintf(shape, sizeof(shape), "T=%d d=%d I=%d N=%d k=%d", T, d, I, N, k);
    snprintf(shape_dense, sizeof(shape_dense), "T=%d d=%d I=%d", T, d, I_dense);
    snprintf(shape_re, sizeof(shape_re), "T=%d d=%d N=%d k=%d", T, d, N, k);
    const double fl_shared = 6.0 * T * d * I, fl_dense = 6.0 * T * d * I_dense;
    const double fl_router = 4.0 * T * n * d, fl_experts = 4.0 * T * k * d;
    const double fl_layer = fl_shared + fl_router + fl_experts;
    const double A = num_active;
    const double b_re_fwd = router_experts_fwd_bytes(T, d, n, k, A);
    const double b_re_fb = b_re_fwd + router_experts_bwd_bytes(T, d, n, k, A);
    // rows "<key>_fwd_tc", "<key>_fwdbwd_tc", then _ec: one layer's forward and forward+backward
    auto time_layer_rows = [&](OmniLayer* pair, const char* key, const char* what, const char* shape_of,
                               double bytes_f, double bytes_fb, double flops_f, double flops_fb) {
        for (int mode = 0; mode < 2; mode++) {
            const char* tag = mode == 0 ? "tc" : "ec";
            const char* TAG = mode == 0 ? "TC" : "EC";
            OmniLayer* layer = &pair[mode];
            char row_key[48], name[64];
            snprintf(row_key, sizeof(row_key), "%s_fwd_%s", key, tag);
            snprintf(name, sizeof(name), "%s fwd %s", what, TAG);
            add_row(row_key, name, shape_of, time_graph([&] { layer_fwd(layer); }, st), bytes_f, flops_f);
            snprintf(row_key, sizeof(row_key), "%s_fwdbwd_%s", key, tag);
            snprintf(name, sizeof(name), "%s fwd+bwd %s", what, TAG);
            add_row(row_key, name, shape_of, time_graph([&] { layer_fwd(layer); layer_bwd(layer); }, st), bytes_fb, flops_fb);
        }
    };
    time_layer_rows(layers, "layer", "OmniMoE layer", shape, 0, 0, fl_layer, 3 * fl_layer);
    add_row("shared_swiglu_fwd", "shared SwiGLU fwd", "T=4096 d=1024 I=4096",
            time_graph([&] { swiglu_fwd(Wgu, Wd, I); }, st), 0, fl_shared);
    add_row("shared_swiglu_fwdbwd", "shared SwiGLU fwd+bwd", "T=4096 d=1024 I=4096",
            time_graph([&] { swiglu_fwd(Wgu, Wd, I); swiglu_bwd(Wgu, Wd, I); }, st), 0, 3 * fl_shared);
    add_row("dense_swiglu_fwd", "dense SwiGLU fwd (same active)", shape_dense,
            time_graph([&] { swiglu_fwd(Wgu2, Wd2, I_dense); }, st), 0, fl_dense);
    add_row("dense_swiglu_fwdbwd", "dense SwiGLU fwd+bwd (same active)", shape_dense,
            time_graph([&] { swiglu_fwd(Wgu2, Wd2, I_dense); swiglu_bwd(Wgu2, Wd2, I_dense); }, st), 0, 3 * fl_dense);
    time_layer_rows(layers_re, "router_experts", "router+sched+experts", shape_re, b_re_fwd, b_re_fb, 0, 0);
    cudaCheck(cudaStreamSynchronize(st));
    for (int mode = 0; mode < 2; mode++) {
        omni_layer_free(&layers[mode]);
        omni_layer_free(&layers_re[mode]);
    }
    omni_workspace_free(&ws);
    void* bufs[] = {X, dY, Wgu, Wd, Wgu2, Wd2, Wr, U, V, dWgu, dWd, dWr, dU, dV, fch, h, dfch, dh, Y, dX, bn};
    for (void* b : bufs) cudaCheck(cudaFree(b));
}

// ----------------------------------------------------------------------------
// 2. the router alone

static void bench_router(cudaStream_t st) {
    const int T = 4096, d = 1024, n_max = 1024, k_max = 64;
    const int ns[3] = {64, 256, 1024}, ks[3] = {16, 32, 64};
    const size_t Td = (size_t)T * d;
    printf("\n== 2. router alone, T=%d d=%d, bn, softmax gate, training ==\n", T, d);
    floatX *X = dev_alloc<floatX>(Td, "router X"), *dX = dev_alloc<floatX>(Td, "router dX");
    floatX *W = dev_alloc<floatX>((size_t)2 * n_max * d, "router W"), *dW = dev_alloc<floatX>((size_t)2 * n_max * d, "router dW");
    float *logits = dev_alloc<float>((size_t)T * 2 * n_max, "router logits"), *logp = dev_alloc<float>((size_t)T * 2 * n_max, "router logp");
    float *bn_mean = dev_alloc<float>(2 * n_max, "bn mean"), *bn_rstd = dev_alloc<float>(2 * n_max, "bn rstd");
    float *run_mean = dev_alloc<float>(2 * n_max, "running mean"), *run_var = dev_alloc<float>(2 * n_max, "running var");
    int* idx = dev_alloc<int>((size_t)T * k_max, "router idx");
    float *gate = dev_alloc<float>((size_t)T * k_max, "router gate"), *dgate = dev_alloc<float>((size_t)T * k_max, "router dgate");
    const size_t brf = router_forward_scratch_bytes(T, n_max), brb = router_backward_scratch_bytes(T, n_max);
    void *srf = dev_alloc<char>(brf, "router fwd scratch"), *srb = dev_alloc<char>(brb, "router bwd scratch");
    fill(X, Td, 1.0f, 21);
    fill(W, (size_t)2 * n_max * d, 0.02f, 22);
    std::vector<float> hdg((size_t)T * k_max), ones(2 * n_max, 1.0f);
    uint64_t state = 0x2545F4914F6CDD1Dull;
    for (float& v : hdg) {  // uniform in [-1, 1)
        state ^= state >> 12; state ^= state << 25; state ^= state >> 27;
        v = (float)(((state * 0x2545F4914F6CDD1Dull) >> 40) * (1.0 / 16777216.0)) * 2.0f - 1.0f;
    }
    cudaCheck(cudaMemcpy(dgate, hdg.data(), hdg.size() * sizeof(float), cudaMemcpyHostToDevice));
    cudaCheck(cudaMemset(run_mean, 0, 2 * n_max * sizeof(float)));
    cudaCheck(cudaMemcpy(run_var, ones.data(), 2 * n_max * sizeof(float), cudaMemcpyHostToDevice));
    setup_done();
    for (int a = 0; a < 3; a++) {
        for (int b = 0; b < 3; b++) {
            const int n = ns[a], k = ks[b], N = n * n;
            const RouterOptions ropt = {n, k, ROUTER_NORM_BN, GATE_SOFTMAX, 1};
            const RouterSaved saved = {logits, logp, bn_mean, bn_rstd, idx, gate};
            auto fwd = [&] {
                router_forward(saved, run_mean, run_var, X, W, T, d, ropt, srf, brf, st);
            };
            auto bwd = [&] {
                router_backward(dX, dW, dgate, saved, X, W, T, d, ropt, srb, brb, st);
            };
            // check: one eager pass on poisoned outputs
            poison(idx, (size_t)T * k * sizeof(int));
            poison(gate, (size_t)T * k * sizeof(float));
            cudaCheck(cudaMemset(dX, 0, Td * sizeof(floatX)));
            cudaCheck(cudaMemset(dW, 0, (size_t)2 * n * d * sizeof(floatX)));
            setup_done();
            fwd();
            bwd();
            cudaCheck(cudaStreamSynchronize(st));
            cudaCheckLast();
            char what[64];
            snprintf(what, sizeof(what), "router n=%d k=%d", n, k);
            std::vector<int> hidx = download_raw(idx, (size_t)T * k);
            std::vector<float> hgate = download_raw(gate, (size_t)T * k);
            check_routing(what, hidx.data(), hgate.data(), T, k, N);
            unsigned long long ids_hash = 1469598103934665603ull;  // FNV-1a over the ids, in order
            for (int id : hidx) { ids_hash = (ids_hash ^ (unsigned)id) * 1099511628211ull; }
            printf("%s: ids hash %016llx\n", what, ids_hash);
            std::vector<float> hdX = download(dX, Td), hdW = download(dW, (size_t)2 * n * d);
            check(count_non_finite(hdX) == 0 && count_non_finite(hdW) == 0, "%s: %.0f non-finite values in dX, dW",
                  what, (double)(count_non_finite(hdX) + count_non_finite(hdW)));

            char key[48], name[64], shape[48];
            snprintf(shape, sizeof(shape), "T=%d d=%d n=%d N=%d k=%d", T, d, n, N, k);
            const double bf = router_fwd_bytes(T, d, n, k), bb = router_bwd_bytes(T, d, n, k);
            snprintf(key, sizeof(key), "router_n%d_k%d_fwd", n, k);
            snprintf(name, sizeof(name), "router fwd n=%d k=%d", n, k);
            add_row(key, name, shape, time_graph(fwd, st), bf, 0);
            snprintf(key, sizeof(key), "router_n%d_k%d_fwdbwd", n, k);
            snprintf(name, sizeof(name), "router fwd+bwd n=%d k=%d", n, k);
            add_row(key, name, shape, time_graph([&] { fwd(); bwd(); }, st), bf + bb, 0);
        }
    }
    cudaCheck(cudaStreamSynchronize(st));
    void* bufs[] = {X, dX, W, dW, logits, logp, bn_mean, bn_rstd, run_mean, run_var, idx, gate, dgate, srf, srb};
    for (void* p : bufs) cudaCheck(cudaFree(p));
}

// ----------------------------------------------------------------------------

static void write_json(const char* path, const char* card) {
    FILE* f = fopen(path, "w");
    if (f == NULL) {
        fprintf(stderr, "bench_layer: cannot write --json %s\n", path);
        exit(EXIT_FAILURE);
    }
    fprintf(f, "{\"card\": \"%s\", \"floatX\": \"%s\", \"copy_bytes_per_s\": %.6e, \"gemm_flops_per_s\": %.6e,\n",
            card, FLOATX_NAME, g_copy_bytes_per_s, g_gemm_flops_per_s);
    fprintf(f, " \"timer\": \"CUDA graph replays, L2 flushed before each, median of %d after %d warm-up\",\n",
            TIMED_REPS, WARMUP_REPS);
    fprintf(f, " \"check_failures\": %d, \"first_failure\": \"%s\",\n \"rows\": [\n", g_check_failures, g_first_failure);
    for (size_t i = 0; i < g_rows.size(); i++) {
        const Row& r = g_rows[i];
        fprintf(f, "  {\"key\": \"%s\", \"name\": \"%s\", \"shape\": \"%s\", \"ms\": %.6f, \"ms_min\": %.6f, "
                "\"ms_max\": %.6f, \"bytes\": %.6e, \"flops\": %.6e}%s\n", r.key, r.name, r.shape, r.t.median, r.t.min,
                r.t.max, r.bytes, r.flops, i + 1 < g_rows.size() ? "," : "");
    }
    fprintf(f, " ]}\n");
    fclose(f);
    printf("wrote %s\n", path);
}

int main(int argc, char** argv) {
    const char* json_path = NULL;
    int router_only = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--json") == 0 && i + 1 < argc) {
            json_path = argv[++i];
        } else if (strcmp(argv[i], "--router-only") == 0) {
            router_only = 1;
        } else {
            fprintf(stderr, "usage: %s [--json PATH] [--router-only]   (unknown argument: %s)\n", argv[0], argv[i]);
            return EXIT_FAILURE;
        }
    }
    cudaDeviceProp prop;
    cudaCheck(cudaGetDeviceProperties(&prop, 0));
    printf("bench_layer on %s, %d SMs, L2 %d MB, floatX = %s\n", prop.name, prop.multiProcessorCount,
           prop.l2CacheSize >> 20, FLOATX_NAME);
    matmul_init();
    cudaStream_t st;
    cudaCheck(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    cudaCheck(cudaEventCreate(&g_ev_start));
    cudaCheck(cudaEventCreate(&g_ev_stop));
    g_flush = cuda_malloc_or_die(FLUSH_BYTES, "L2 flush buffer");

    printf("\n== 0. ceilings of this card ==\n");
    measure_ceilings(st);
    if (!router_only) bench_layer(st);
    bench_router(st);

    printf("\n== summary: median ms of %d graph replays (L2 flushed), %% of the measured copy rate %.3f TB/s "
           "for memory-bound rows, TFLOP/s (FLOPs per docs/design.md §4) for GEMM rows ==\n", TIMED_REPS, g_copy_bytes_per_s / 1e12);
    printf("%-40s | %-30s | %9s | %s\n", "what", "shape", "ms", "rate");
    for (const Row& r : g_rows) {
        char rate[64];
        row_rate(r, rate, sizeof(rate));
        printf("%-40s | %-30s | %9.4f | %s\n", r.name, r.shape, r.t.median, rate);
    }
    double layer = 1e30, dense = 0;
    for (const Row& r : g_rows) {
        if (strncmp(r.key, "layer_fwdbwd_", 13) == 0) layer = std::min(layer, r.t.median);
        if (strcmp(r.key, "dense_swiglu_fwdbwd") == 0) dense = r.t.median;
    }
    if (dense > 0 && layer < 1e30) printf("layer fwd+bwd (best execution) / dense SwiGLU fwd+bwd = %.3f (target <= 1.5)\n", layer / dense);
    if (json_path) write_json(json_path, prop.name);

    cudaCheck(cudaFree(g_flush));
    cudaCheck(cudaEventDestroy(g_ev_start));
    cudaCheck(cudaEventDestroy(g_ev_stop));
    cudaCheck(cudaStreamDestroy(st));
    matmul_free();
    if (g_check_failures) {
        printf("bench_layer: %d CHECK(S) FAILED (first: %s); timings above are of possibly wrong code\n",
               g_check_failures, g_first_failure);
        return EXIT_FAILURE;
    }
    printf("bench_layer: all checks passed\n");
    return 0;
}
