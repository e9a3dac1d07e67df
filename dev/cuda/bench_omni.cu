/*
bench_omni.cu - microbenchmarks of llmc/router.cuh, scheduler.cuh, experts.cuh (OmniMoE layer
minus the shared SwiGLU branch), token-centric (TC) vs expert-centric (EC) execution.

  make bench_omni && ./dev/cuda/bench_omni_bin
  ./dev/cuda/bench_omni_bin

A. the reference layer of the released OmniMoE code: T=4096, d=1024, N=4096 (n=64), k=16, BN + softmax gate, training:
   router fwd, schedule, experts fwd, experts bwd (incl. dU/dV), router bwd, and the whole
   forward+backward of the layer without its shared SwiGLU (llmc/omnimoe_layer.cuh with I = 0)
   as one CUDA graph, for both executions.
B. experts alone: T=4096, d=1024, k=32, N in {4096, 65536, 1048576}, uniform random routing
   (k distinct experts per token), schedule + forward + backward for both executions.

Timing: each stage is captured alone in a CUDA graph and replayed (GPU time, no host launch
gaps): cudaEvent around each replay, median of 25 after 5 warm-ups. Inputs are random, never
zeros. --profile-once runs the reference layer once per stage (for ncu) without timing.
Bytes (docs/design.md §4): "min" = every input read once, every output written once, expert rows only of
the active experts (A of them) -- the DRAM floor; "gather" = the same with 2 expert rows per
pair in the forward and 4 rows per pair in the backward (u, v for h and dX; x, dY for dU/dV),
i.e. what moves if nothing is shared through the caches. Fractions are of the device-to-device
copy rate measured first (read + write). The results are in docs/performance.md.

*/
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <algorithm>
#include <vector>
#include "llmc/cuda_utils.cuh"
#include "llmc/omnimoe_layer.cuh"

static double g_copy_bw = 0.0;  // bytes/s of a device-to-device copy (read + write), measured

__global__ void fill_random_kernel(floatX* out, size_t n, float scale, uint32_t seed) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    for (; i < n; i += (size_t)gridDim.x * blockDim.x) {
        uint32_t h = (uint32_t)i * 2654435761u ^ seed;
        h ^= h >> 16; h *= 0x7feb352du; h ^= h >> 15; h *= 0x846ca68bu; h ^= h >> 16;
        float u = (h >> 8) * (1.0f / 16777216.0f);  // [0, 1)
        out[i] = (floatX)((2.0f * u - 1.0f) * scale * 1.7320508f);  // variance scale^2
    }
}
static void fill_random(floatX* p, size_t n, float scale, uint32_t seed) {
    fill_random_kernel<<<1024, 256>>>(p, n, scale, seed);
    cudaCheckLast();
}

template <class T>
static T* dev_alloc(size_t count) { return (T*)cuda_malloc_or_die(count * sizeof(T) + 256, "bench buffer"); }

static int g_profile_once = 0;  // --profile-once: run each stage once (for ncu), no timing loops

template <class F>
static float time_median_ms(F fn, cudaStream_t stream, int warmup = 5, int reps = 25) {
    if (g_profile_once) { fn(); cudaCheck(cudaStreamSynchronize(stream)); return 1.0f; }
    cudaEvent_t a, b;
    cudaCheck(cudaEventCreate(&a));
    cudaCheck(cudaEventCreate(&b));
    for (int i = 0; i < warmup; i++) fn();
    std::vector<float> ms(reps);
    for (int i = 0; i < reps; i++) {
        cudaCheck(cudaEventRecord(a, stream));
        fn();
        cudaCheck(cudaEventRecord(b, stream));
        cudaCheck(cudaEventSynchronize(b));
        cudaCheck(cudaEventElapsedTime(&ms[i], a, b));
    }
    cudaCheck(cudaEventDestroy(a));
    cudaCheck(cudaEventDestroy(b));
    std::sort(ms.begin(), ms.end());
    return ms[reps / 2];
}

// the stage captured alone in a CUDA graph and replayed: GPU time without host launch gaps
template <class F>
static float time_graph_ms(F fn, cudaStream_t stream) {
    if (g_profile_once) { fn(); cudaCheck(cudaStreamSynchronize(stream)); return 1.0f; }
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    cudaCheck(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
    fn();
    cudaCheck(cudaStreamEndCapture(stream, &graph));
    cudaCheck(cudaGraphInstantiate(&exec, graph, 0));
    float ms = time_median_ms([&] { cudaCheck(cudaGraphLaunch(exec, stream)); }, stream);
    cudaCheck(cudaGraphExecDestroy(exec));
    cudaCheck(cudaGraphDestroy(graph));
    return ms;
}

struct Row { char what[96]; float ms; double min_bytes, gather_bytes; };
static std::vector<Row> g_rows;
static void add_row(const char* what, float ms, double min_bytes, double gather_bytes) {
    Row r;
    snprintf(r.what, sizeof(r.what), "%s", what);
    r.ms = ms; r.min_bytes = min_bytes; r.gather_bytes = gather_bytes;
    g_rows.push_back(r);
    printf("  %-52s %8.4f ms", what, ms);
    if (g_copy_bw > 0 && min_bytes > 0) printf("  min %7.1f MB (%5.1f%%)", min_bytes / 1e6, 100.0 * min_bytes / (ms * 1e-3) / g_copy_bw);
    if (g_copy_bw > 0 && gather_bytes > 0) printf("  gather %7.1f MB (%5.1f%%)", gather_bytes / 1e6, 100.0 * gather_bytes / (ms * 1e-3) / g_copy_bw);
    printf("\n");
}

// bytes of the experts forward / backward (see the header comment)
static double experts_fwd_min(double T, double d, double k, double A) { return T * d * 2 + 2 * T * d * 2 + 2 * A * d * 2 + T * k * 12; }
static double experts_fwd_gather(double T, double d, double k) { return T * d * 2 + 2 * T * d * 2 + 2 * T * k * d * 2 + T * k * 12; }
static double experts_bwd_min(double T, double d, double k, double A) {
    return 2 * T * d * 2 + 2 * T * d * 2 + 2 * A * d * 2 + 4 * A * d * 2 + T * k * 24;
}
static double experts_bwd_gather(double T, double d, double k, double A) {
    return T * d * 2 + 2 * T * d * 2 + 4 * T * k * d * 2 + 4 * A * d * 2 + T * k * 24;
}

static void measure_copy_bandwidth(void) {
    const size_t bytes = (size_t)1 << 30;
    char *a = dev_alloc<char>(bytes), *b = dev_alloc<char>(bytes);
    cudaCheck(cudaMemset(a, 1, bytes));
    float ms = time_median_ms([&] { cudaCheck(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, 0)); }, 0, 2, 10);
    g_copy_bw = 2.0 * bytes / (ms * 1e-3);
    printf("device-to-device copy of 1 GiB: %.3f ms = %.2f TB/s (read + write)\n", ms, g_copy_bw / 1e12);
    cudaCheck(cudaFree(a));
    cudaCheck(cudaFree(b));
}

// ----------------------------------------------------------------------------
// A. the reference layer

static void bench_layer(void) {
    const int T = 4096, d = 1024, n = 64, N = n * n, k = 16, P = T * k, C2 = 2 * n;
    const RouterOptions ropt = {n, k, ROUTER_NORM_BN, GATE_SOFTMAX, 1};
    printf("\n== A. router + experts, T=%d d=%d N=%d (n=%d) k=%d, bn, softmax gate, training ==\n", T, d, N, n, k);
    const size_t Td = (size_t)T * d, Nd = (size_t)N * d;
    floatX *X = dev_alloc<floatX>(Td), *W = dev_alloc<floatX>((size_t)C2 * d), *U = dev_alloc<floatX>(Nd), *V = dev_alloc<floatX>(Nd);
    floatX *dY = dev_alloc<floatX>(Td), *Y = dev_alloc<floatX>(Td), *dX = dev_alloc<floatX>(Td);
    floatX *dU = dev_alloc<floatX>(Nd), *dV = dev_alloc<floatX>(Nd), *dW = dev_alloc<floatX>((size_t)C2 * d);
    fill_random(X, Td, 1.0f, 1); fill_random(W, (size_t)C2 * d, 0.02f, 2); fill_random(U, Nd, 0.04f, 3);
    fill_random(V, Nd, 0.02f, 4); fill_random(dY, Td, 1.0f, 5); fill_random(Y, Td, 1.0f, 6); fill_random(dX, Td, 1.0f, 7);
    fill_random(dU, Nd, 0.01f, 8); fill_random(dV, Nd, 0.01f, 9); fill_random(dW, (size_t)C2 * d, 0.01f, 10);
    float *logits = dev_alloc<float>((size_t)T * C2), *logp = dev_alloc<float>((size_t)T * C2);
    float *mean = dev_alloc<float>(C2), *rstd = dev_alloc<float>(C2);
    float *rmv = dev_alloc<float>(2 * C2), *rm = rmv, *rv = rmv + C2;  // running mean, then var (the layer's layout)
    std::vector<float> ones(C2, 1.0f);
    cudaCheck(cudaMemset(rm, 0, C2 * 4));
    cudaCheck(cudaMemcpy(rv, ones.data(), C2 * 4, cudaMemcpyHostToDevice));
    float *gate = dev_alloc<float>(P), *s = dev_alloc<float>(P), *dgate = dev_alloc<float>(P);
    int* idx = dev_alloc<int>(P);
    const int amax = scheduler_max_active(P, N);
    ExpertSchedule sched;
    sched.sorted_pair = dev_alloc<int>(P); sched.sorted_expert = dev_alloc<int>(P); sched.sorted_active = dev_alloc<int>(P);
    sched.active_expert = dev_alloc<int>(amax); sched.active_offset = dev_alloc<int>(amax + 1); sched.num_active = dev_alloc<int>(1);
    size_t brf = router_forward_scratch_bytes(T, n), brb = router_backward_scratch_bytes(T, n);
    size_t bs = scheduler_scratch_bytes(P, N), be = experts_backward_scratch_bytes(T, d, k);
    void *srf = dev_alloc<char>(brf), *srb = dev_alloc<char>(brb), *ss = dev_alloc<char>(bs), *se = dev_alloc<char>(be);
    cudaStream_t st;
    cudaCheck(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));

    const RouterSaved saved = {logits, logp, mean, rstd, idx, gate};
    auto router_fwd = [&] { router_forward(saved, rm, rv, X, W, T, d, ropt, srf, brf, st); };
    auto sched_build = [&] { scheduler_build(sched, NULL, idx, P, N, ss, bs, st); };
    router_fwd();
    sched_build();
    cudaCheck(cudaStreamSynchronize(st));
    int A = 0;
    cudaCheck(cudaMemcpy(&A, sched.num_active, 4, cudaMemcpyDeviceToHost));
    printf("  active experts: %d of %d\n", A, N);
    const double router_fwd_bytes = Td * 2.0 + C2 * d * 2.0 + (double)T * C2 * 8 + (double)P * 8;
    const double router_bwd_bytes = Td * 2.0 + 2 * Td * 2.0 + C2 * d * 2.0 * 3 + (double)T * C2 * 8 + (double)P * 12;
    printf("  eager (host launch included): router fwd %.4f ms, schedule %.4f ms\n", time_median_ms(router_fwd, st),
           time_median_ms(sched_build, st));
    add_row("A router fwd (GEMM, BN, log-softmax, top-k, gates)", time_graph_ms(router_fwd, st), router_fwd_bytes, 0);
    add_row("A schedule (radix sort, CSR)", time_graph_ms(sched_build, st), (double)P * 4 * 4, 0);
    for (int mode = 0; mode < 2; mode++) {
        const char* tag = mode == 0 ? "TC" : "EC";
        char what[96];
        const ExpertsOptions eopt = {N, k, mode == 0 ? EXPERT_EXEC_TOKEN : EXPERT_EXEC_EXPERT, 1};
        auto efwd = [&] { experts_forward(Y, s, X, U, V, idx, gate, sched, T, d, eopt, st); };
        auto ebwd = [&] { experts_backward(dX, dU, dV, dgate, dY, X, U, V, idx, gate, s, sched, T, d, eopt, se, be, st); };
        auto rbwd = [&] { router_backward(dX, dW, dgate, saved, X, W, T, d, ropt, srb, brb, st); };
        snprintf(what, sizeof(what), "A experts fwd %s", tag);
        add_row(what, time_graph_ms(efwd, st), experts_fwd_min(T, d, k, A), experts_fwd_gather(T, d, k));
        snprintf(what, sizeof(what), "A experts bwd %s (h, dX, dU, dV)", tag);
        add_row(what, time_graph_ms(ebwd, st), experts_bwd_min(T, d, k, A), experts_bwd_gather(T, d, k, A));
        if (mode == 0) add_row("A router bwd (BN bwd, 2 GEMMs)", time_graph_ms(rbwd, st), router_bwd_bytes, 0);
        // the whole layer without the shared SwiGLU (I = 0: Y and dX written) as one graph
        if (g_profile_once) continue;
        const OmniDims dims = {T, d, 0, n, N, k};
        const OmniOptions opt = {ROUTER_NORM_BN, GATE_SOFTMAX, eopt.exec};
        const OmniWeights w = {NULL, NULL, W, U, V}, dw = {NULL, NULL, dW, dU, dV};
        OmniWorkspace ws;
        OmniLayer layer;
        omni_workspace_create(&ws, dims, NULL, 0, NULL, NULL);
        omni_layer_create(&layer, dims, opt, w, dw, &ws, NULL, NULL);
        omni_layer_set_bn_stats(&layer, rmv);
        float ms = time_graph_ms([&] {
            omni_layer_forward(&layer, Y, X, T, 1, st);
            omni_layer_backward(&layer, dX, dY, X, T, st);
        }, st);
        omni_layer_free(&layer);
        omni_workspace_free(&ws);
        snprintf(what, sizeof(what), "A whole fwd+bwd %s (one CUDA graph)", tag);
        add_row(what, ms, router_fwd_bytes + router_bwd_bytes + experts_fwd_min(T, d, k, A) + experts_bwd_min(T, d, k, A),
                router_fwd_bytes + router_bwd_bytes + experts_fwd_gather(T, d, k) + experts_bwd_gather(T, d, k, A));
    }
    cudaCheck(cudaStreamSynchronize(st));
    void* bufs[] = {X, W, U, V, dY, Y, dX, dU, dV, dW, logits, logp, mean, rstd, rmv, gate, s, dgate, idx,
                    sched.sorted_pair, sched.sorted_expert, sched.sorted_active, sched.active_expert, sched.active_offset,
                    sched.num_active, srf, srb, ss, se};
    for (void* b : bufs) cudaCheck(cudaFree(b));
    cudaCheck(cudaStreamDestroy(st));
}

// ----------------------------------------------------------------------------
// B. experts alone

static uint64_t rng_state = 0x243F6A8885A308D3ull;
static uint32_t rng_u32(void) {
    rng_state ^= rng_state >> 12; rng_state ^= rng_state << 25; rng_state ^= rng_state >> 27;
    return (uint32_t)((rng_state * 0x2545F4914F6CDD1Dull) >> 32);
}

static void bench_experts(int N) {
    const int T = 4096, d = 1024, k = 32, P = T * k;
    printf("\n== B. experts alone, T=%d d=%d k=%d N=%d, uniform random routing ==\n", T, d, k, N);
    const size_t Td = (size_t)T * d, Nd = (size_t)N * d;
    std::vector<int> h_idx(P);
    std::vector<float> h_gate(P);
    std::vector<char> used(N, 0);
    for (int t = 0; t < T; t++) {
        for (int m = 0; m < k; m++) {
            int e;
            bool dup;
            do {
                e = (int)(rng_u32() % (uint32_t)N);
                dup = false;
                for (int q = 0; q < m; q++) dup |= h_idx[(size_t)t * k + q] == e;
            } while (dup);
            h_idx[(size_t)t * k + m] = e;
            h_gate[(size_t)t * k + m] = (float)((rng_u32() % 1000 + 1) / 1000.0 / k);
            used[e] = 1;
        }
    }
    int A = 0;
    for (int e = 0; e < N; e++) A += used[e];
    printf("  active experts: %d of %d\n", A, N);
    floatX *X = dev_alloc<floatX>(Td), *U = dev_alloc<floatX>(Nd), *V = dev_alloc<floatX>(Nd), *dY = dev_alloc<floatX>(Td);
    floatX *Y = dev_alloc<floatX>(Td), *dX = dev_alloc<floatX>(Td), *dU = dev_alloc<floatX>(Nd), *dV = dev_alloc<floatX>(Nd);
    fill_random(X, Td, 1.0f, 11); fill_random(U, Nd, 0.04f, 12); fill_random(V, Nd, 0.02f, 13); fill_random(dY, Td, 1.0f, 14);
    fill_random(Y, Td, 1.0f, 15); fill_random(dX, Td, 1.0f, 16); fill_random(dU, Nd, 0.01f, 17); fill_random(dV, Nd, 0.01f, 18);
    int* idx = dev_alloc<int>(P);
    float *gate = dev_alloc<float>(P), *s = dev_alloc<float>(P), *dgate = dev_alloc<float>(P);
    cudaCheck(cudaMemcpy(idx, h_idx.data(), (size_t)P * 4, cudaMemcpyHostToDevice));
    cudaCheck(cudaMemcpy(gate, h_gate.data(), (size_t)P * 4, cudaMemcpyHostToDevice));
    const int amax = scheduler_max_active(P, N);
    ExpertSchedule sched;
    sched.sorted_pair = dev_alloc<int>(P); sched.sorted_expert = dev_alloc<int>(P); sched.sorted_active = dev_alloc<int>(P);
    sched.active_expert = dev_alloc<int>(amax); sched.active_offset = dev_alloc<int>(amax + 1); sched.num_active = dev_alloc<int>(1);
    size_t bs = scheduler_scratch_bytes(P, N), be = experts_backward_scratch_bytes(T, d, k);
    void *ss = dev_alloc<char>(bs), *se = dev_alloc<char>(be);
    cudaStream_t st;
    cudaCheck(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    char what[96];
    auto sched_build = [&] { scheduler_build(sched, NULL, idx, P, N, ss, bs, st); };
    snprintf(what, sizeof(what), "B N=%-7d schedule", N);
    add_row(what, time_graph_ms(sched_build, st), (double)P * 4 * 4, 0);
    for (int mode = 0; mode < 2; mode++) {
        const char* tag = mode == 0 ? "TC" : "EC";
        const ExpertsOptions eopt = {N, k, mode == 0 ? EXPERT_EXEC_TOKEN : EXPERT_EXEC_EXPERT, 1};
        auto efwd = [&] { experts_forward(Y, s, X, U, V, idx, gate, sched, T, d, eopt, st); };
        auto ebwd = [&] { experts_backward(dX, dU, dV, dgate, dY, X, U, V, idx, gate, s, sched, T, d, eopt, se, be, st); };
        snprintf(what, sizeof(what), "B N=%-7d experts fwd %s", N, tag);
        add_row(what, time_graph_ms(efwd, st), experts_fwd_min(T, d, k, A), experts_fwd_gather(T, d, k));
        snprintf(what, sizeof(what), "B N=%-7d experts bwd %s", N, tag);
        add_row(what, time_graph_ms(ebwd, st), experts_bwd_min(T, d, k, A), experts_bwd_gather(T, d, k, A));
    }
    cudaCheck(cudaStreamSynchronize(st));
    void* bufs[] = {X, U, V, dY, Y, dX, dU, dV, idx, gate, s, dgate, sched.sorted_pair, sched.sorted_expert,
                    sched.sorted_active, sched.active_expert, sched.active_offset, sched.num_active, ss, se};
    for (void* b : bufs) cudaCheck(cudaFree(b));
    cudaCheck(cudaStreamDestroy(st));
}

int main(int argc, char** argv) {
    g_profile_once = argc > 1 && strcmp(argv[1], "--profile-once") == 0;
    cudaDeviceProp prop;
    cudaCheck(cudaGetDeviceProperties(&prop, 0));
    printf("bench_omni on %s, %d SMs, L2 %d MB (floatX = %s)\n", prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20, FLOATX_NAME);
    matmul_init();
    if (g_profile_once) {  // one pass of the reference layer, for a profiler
        bench_layer();
        matmul_free();
        return 0;
    }
    measure_copy_bandwidth();
    bench_layer();
    bench_experts(4096);
    bench_experts(65536);
    bench_experts(1048576);
    matmul_free();
    printf("\n== summary (median ms; %% of the measured copy rate %.2f TB/s for the min / gather byte counts) ==\n",
           g_copy_bw / 1e12);
    printf("%-54s %9s %10s %7s %10s %7s\n", "what", "ms", "min MB", "min%", "gather MB", "gath%");
    for (const Row& r : g_rows) {
        printf("%-54s %9.4f", r.what, r.ms);
        if (r.min_bytes > 0) printf(" %10.1f %6.1f%%", r.min_bytes / 1e6, 100.0 * r.min_bytes / (r.ms * 1e-3) / g_copy_bw);
        else printf(" %10s %7s", "-", "-");
        if (r.gather_bytes > 0) printf(" %10.1f %6.1f%%", r.gather_bytes / 1e6, 100.0 * r.gather_bytes / (r.ms * 1e-3) / g_copy_bw);
        printf("\n");
    }
    return 0;
}
