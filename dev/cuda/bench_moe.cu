/*
bench_moe.cu - the moe layer (llmc/moe_layer.cuh, docs/design.md §10.8) against a dense SwiGLU of
the same active size, its grouped GEMMs against one dense GEMM of the same FLOPs, and MoE++
against vanilla moe (expert forward), all in one binary so the ratios come from one run.

  make dev/cuda/bench_moe_bin
  ./dev/cuda/bench_moe_bin [--json PATH] [--bt TOKENS] [--shape small|deepseekmoe-16b]
                                                          (dev/bench_all.sh builds and runs it)
  ./dev/cuda/bench_moe_bin --profile moe|moe-tokens|dense [--bt TOKENS] [--shape ...]
                                                          (dev/profile_moe_layer.sh: under ncu)

Shapes (fine-grained experts, bf16, training mode), BT = 8192 tokens (--bt: e.g. 32768, a d12
step's B*T at B=32, T=1024, where each expert gets 4x the rows):
- small (the default): C = 1024, E = 64 routed SwiGLU experts of I_e = 512, S = 2 shared, k = 6;
  the dense SwiGLU of the same active size has I = (S + k) I_e = 4096;
- deepseekmoe-16b: the MoE layer of DeepSeekMoE 16B, the fine-grained baseline the OmniMoE paper
  compares with (its released config: hidden 2048, 64 routed experts of 1408, 2 shared, top-6):
  C = 2048, E = 64, I_e = 1408, S = 2, k = 6, dense I = 11264.
The router's E x C weights are left out of the dense layer's size. MoE++
adds 1 zero, 1 copy and 2 constant experts, gating residuals (the previous layer's logits: zeros
here, the same cost), the tanh router, renormalised gates and k x as the experts' input.
Weights are random (std 0.02): the router is near uniform, so each expert gets about
BT k / E_t = 768 rows and MoE++ sends about 4/68 of the pairs to its cheap experts. The MoE++
paper's 1.1-2.1x is measured on trained routers that send far more; this run shows the cost of
the mechanism at random initialisation (a trained checkpoint would be needed for the paper's
number).

Timings: the median of 21 eager runs after 3 warm-ups (bench_median_ms, llmc/test_harness.h);
the layer waits once per forward for the per-expert counts, so no CUDA graph. The target ratio
(the layer's default path against the dense SwiGLU) is taken over 5 alternating rounds, each
timing the moe layer and then the dense layer, and the median of the 5 ratios is reported with
its range: the dense layer's time moves by several percent between processes and over a run
(clocks, temperature), so two timings far apart in one run can give another ratio. Printed:
  moe layer fwd, fwd+bwd (with the shared experts) and the dense SwiGLU fwd, fwd+bwd;
  the routed experts' forward alone (S = 0) for vanilla and MoE++, and MoE++ again with a
  selection bias on its zero/copy/constant experts (shares a trained router would reach);
  the first grouped GEMM of the forward (fch = xg W1_e^T over all experts), the same problems as
  one cublasGemmEx per expert (moe_gemm_backend = MOE_GEMM_LOOP; also the whole layer that way),
  and one dense GEMM of the same M = P_ffn, N = 2 I_e, K = C, as TFLOP/s;
  in `make USE_CUTLASS=1` bf16 builds also the CUTLASS grouped GEMM (MOE_GEMM_CUTLASS): the first
  grouped GEMM, the whole layer, the relative L2 difference of its fch to cuBLAS's, and how many
  of its calls went to the loop instead (0 expected). JSON keys cutlass_* (absent otherwise).
*/
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <vector>
#include <algorithm>
#include "llmc/cuda_utils.cuh"
#include "llmc/moe_layer.cuh"
#include "llmc/test_harness.h"

// the device buffers a benchmark allocated, freed together
typedef struct {
    floatX* bufs[32];
    int num_bufs;
} Buffers;

static floatX* bench_buffer(Buffers* b, size_t n, float scale, uint64_t seed) {
    if (b->num_bufs == (int)(sizeof(b->bufs) / sizeof(b->bufs[0]))) {
        fprintf(stderr, "bench_moe: more buffers than Buffers holds\n");
        exit(EXIT_FAILURE);
    }
    floatX* p = device_alloc<floatX>(n > 0 ? n : 1, "bench buffer");
    if (scale > 0.0f) fill_random_device(p, n, seed, scale);
    else cudaCheck(cudaMemset(p, 0, (n > 0 ? n : 1) * sizeof(floatX)));
    b->bufs[b->num_bufs++] = p;
    return p;
}

static void buffers_free(Buffers* b) {
    for (int i = 0; i < b->num_bufs; i++) cudaCheck(cudaFree(b->bufs[i]));
    b->num_bufs = 0;
}

typedef struct {
    MoeDims d;
    MoeOptions o;
    MoeWeights w, dw;
    MoeWorkspace ws;
    MoeLayer layer;
    floatX *x, *out, *dout, *dx;
    float* prev;
    Buffers mem;
} Bench;

static void bench_setup(Bench* b, int BT, int C, int Ie, int E, int S, int k, int moepp) {
    memset(b, 0, sizeof(*b));
    MoeDims d = {BT, C, S * Ie, Ie, E, moepp ? 2 : 0, moepp ? 1 : 0, moepp ? 1 : 0, k};
    MoeOptions o = {moepp, moepp, moepp ? MOE_ROUTER_TANH : MOE_ROUTER_LINEAR, moepp};
    b->d = d;
    b->o = o;
    const size_t Et = moe_routed(d), RH = moe_router_hidden(d, o), H = d.H;
    const size_t sizes[10] = {2 * H * C, (size_t)C * H, (RH ? RH : Et) * C, Et * RH, moepp ? Et * Et : 0,
                              (size_t)E * 2 * Ie * C, (size_t)E * C * Ie, (size_t)d.Kc * C, (size_t)d.Kc * 2 * C, Et};
    const float scales[10] = {0.02f, 0.02f, 0.02f, 0.02f, 0.02f, 0.02f, 0.02f, 1.0f, 0.02f, 0.0f};
    floatX** wv[10] = {&b->w.fcw, &b->w.fcprojw, &b->w.router, &b->w.router2, &b->w.gate_map, &b->w.w1, &b->w.w2,
                       &b->w.cvec, &b->w.cmix, &b->w.bias};
    floatX** gv[10] = {&b->dw.fcw, &b->dw.fcprojw, &b->dw.router, &b->dw.router2, &b->dw.gate_map, &b->dw.w1,
                       &b->dw.w2, &b->dw.cvec, &b->dw.cmix, &b->dw.bias};
    for (int i = 0; i < 10; i++) {
        *wv[i] = bench_buffer(&b->mem, sizes[i], scales[i], 100 + i);
        *gv[i] = bench_buffer(&b->mem, sizes[i], 0.0f, 0);
    }
    b->x = bench_buffer(&b->mem, (size_t)BT * C, 1.0f, 7);
    b->dout = bench_buffer(&b->mem, (size_t)BT * C, 1.0f, 8);
    b->out = bench_buffer(&b->mem, (size_t)BT * C, 0.0f, 0);
    b->dx = bench_buffer(&b->mem, (size_t)BT * C, 0.0f, 0);
    b->prev = device_alloc<float>(Et * BT, "previous logits");
    cudaCheck(cudaMemset(b->prev, 0, Et * BT * sizeof(float)));
    moe_workspace_create(&b->ws, d, o, NULL, 0, NULL, NULL);
    moe_layer_create(&b->layer, d, o, b->w, b->dw, &b->ws, NULL, NULL);
    b->layer.prev_logits = moepp ? b->prev : NULL;
    b->layer.aux_coef = 0.01f;
    b->layer.zc_weight = 0.75f;
    b->layer.aux = device_alloc<float>(1, "aux");
}

static void bench_free(Bench* b) {
    cudaCheck(cudaFree(b->layer.aux));
    moe_layer_free(&b->layer);
    moe_workspace_free(&b->ws);
    buffers_free(&b->mem);
    cudaCheck(cudaFree(b->prev));
}

// the pairs the last forward sent to the zero, copy and constant experts
static long long moepp_zc_pairs(const Bench* b) {
    long long pairs = 0;
    for (int e = b->d.E; e < moe_routed(b->d); e++) pairs += b->layer.saved.host_counts[e];
    return pairs;
}

static float time_forward(Bench* b) {
    return bench_median_ms([&] { moe_layer_forward(&b->layer, b->out, b->x, b->d.BT, 1, 0); }, 3, 21);
}

static void forward_backward(Bench* b) {
    moe_layer_forward(&b->layer, b->out, b->x, b->d.BT, 1, 0);
    b->ws.carry_valid = 0;
    moe_layer_backward(&b->layer, b->dx, b->dout, b->x, b->d.BT, 1.0f, 0);
}

static float time_forward_backward(Bench* b) {
    return bench_median_ms([&] { forward_backward(b); }, 3, 21);
}

// the dense SwiGLU of the same active size, with the same matmul code
typedef struct {
    Buffers mem;
    int BT, C, I;
    floatX *x, *dout, *wgu, *wd, *dwgu, *dwd, *fch, *h, *out, *dh, *dfch, *dx;
    float* scratch;
} Dense;

static void dense_setup(Dense* dn, int BT, int C, int I) {
    memset(dn, 0, sizeof(*dn));
    dn->BT = BT, dn->C = C, dn->I = I;
    Buffers* b = &dn->mem;
    dn->x = bench_buffer(b, (size_t)BT * C, 1.0f, 11);
    dn->dout = bench_buffer(b, (size_t)BT * C, 1.0f, 12);
    dn->wgu = bench_buffer(b, (size_t)2 * I * C, 0.02f, 13);
    dn->wd = bench_buffer(b, (size_t)C * I, 0.02f, 14);
    dn->dwgu = bench_buffer(b, (size_t)2 * I * C, 0.0f, 0);
    dn->dwd = bench_buffer(b, (size_t)C * I, 0.0f, 0);
    dn->fch = bench_buffer(b, (size_t)BT * 2 * I, 0.0f, 0);
    dn->h = bench_buffer(b, (size_t)BT * I, 0.0f, 0);
    dn->out = bench_buffer(b, (size_t)BT * C, 0.0f, 0);
    dn->dh = bench_buffer(b, (size_t)BT * I, 0.0f, 0);
    dn->dfch = bench_buffer(b, (size_t)BT * 2 * I, 0.0f, 0);
    dn->dx = bench_buffer(b, (size_t)BT * C, 0.0f, 0);
    dn->scratch = device_alloc<float>(matmul_backward_scratch_bytes(BT, 2 * I) / sizeof(float) + 64, "scratch");
}

static void dense_forward(Dense* d) { swiglu_mlp_forward(d->out, d->fch, d->h, d->x, d->wgu, d->wd, d->BT, d->C, d->I, 0); }

static void dense_forward_backward(Dense* d) {
    dense_forward(d);
    swiglu_mlp_backward(d->dx, d->dwgu, d->dwd, d->dh, d->dfch, d->dout, d->x, d->fch, d->h, d->wgu, d->wd, d->BT, d->C,
                        d->I, 0, d->scratch);
}

static void dense_free(Dense* dn) {
    buffers_free(&dn->mem);
    cudaCheck(cudaFree(dn->scratch));
}

// --profile moe|moe-tokens|dense: PROFILE_RUNS forward+backward passes of one of the layers and
// nothing else, for a kernel profiler to time kernel by kernel (dev/profile_moe_layer.sh); the moe
// layer with CUTLASS's grouped GEMM where the build has it, moe-tokens the same with its token
// reads (CUTLASS builds only)
enum { PROFILE_RUNS = 3 };

static void profile_layer(const char* which, int BT, int C, int Ie, int E, int S, int k) {
    printf("bench_moe --profile: %d runs\n", PROFILE_RUNS);  // dev/profile_moe_layer.sh divides by it
    if (strcmp(which, "dense") != 0) {
#ifdef HAVE_CUTLASS_GROUPED_GEMM
        moe_gemm_backend = MOE_GEMM_CUTLASS;
        moe_gemm_token_reads = strcmp(which, "moe-tokens") == 0;
#endif
        Bench b;
        bench_setup(&b, BT, C, Ie, E, S, k, 0);
        for (int r = 0; r < PROFILE_RUNS; r++) forward_backward(&b);
        cudaCheck(cudaDeviceSynchronize());
        bench_free(&b);
    } else {
        Dense dn;
        dense_setup(&dn, BT, C, (S + k) * Ie);
        for (int r = 0; r < PROFILE_RUNS; r++) dense_forward_backward(&dn);
        cudaCheck(cudaDeviceSynchronize());
        dense_free(&dn);
    }
}

int main(int argc, char** argv) {
    const char* json = NULL;
    const char* profile = NULL;
    const char* shape = "small";
    int BT = 8192;
    for (int i = 1; i < argc; i += 2) {
        if (i + 1 >= argc || (strcmp(argv[i], "--json") != 0 && strcmp(argv[i], "--bt") != 0 &&
                              strcmp(argv[i], "--profile") != 0 && strcmp(argv[i], "--shape") != 0)) {
            fprintf(stderr, "bench_moe: unexpected argument '%s' (usage: bench_moe_bin [--json PATH] [--bt TOKENS] "
                    "[--shape small|deepseekmoe-16b] [--profile moe|moe-tokens|dense])\n", argv[i]);
            return 1;
        }
        if (strcmp(argv[i], "--shape") == 0) {
            shape = argv[i + 1];
            if (strcmp(shape, "small") != 0 && strcmp(shape, "deepseekmoe-16b") != 0) {
                fprintf(stderr, "bench_moe: --shape %s: expected small or deepseekmoe-16b\n", shape);
                return 1;
            }
        }
        if (strcmp(argv[i], "--json") == 0) json = argv[i + 1];
        if (strcmp(argv[i], "--profile") == 0) {
            profile = argv[i + 1];
            int known = strcmp(profile, "moe") == 0 || strcmp(profile, "dense") == 0;
#ifdef HAVE_CUTLASS_GROUPED_GEMM
            known = known || strcmp(profile, "moe-tokens") == 0;
#endif
            if (!known) {
                fprintf(stderr, "bench_moe: --profile %s: expected moe, dense or (in a USE_CUTLASS=1 build) moe-tokens\n",
                        profile);
                return 1;
            }
        }
        if (strcmp(argv[i], "--bt") == 0) {
            char* end = NULL;
            long v = strtol(argv[i + 1], &end, 10);
            if (end == argv[i + 1] || *end != '\0' || v < 64 || v > (1L << 20)) {
                fprintf(stderr, "bench_moe: --bt %s: expected a token count in [64, 1048576]\n", argv[i + 1]);
                return 1;
            }
            BT = (int)v;
        }
    }
    if (profile != NULL && json != NULL) {
        fprintf(stderr, "bench_moe: --profile writes no JSON (drop --json)\n");
        return 1;
    }
    if (!test_cuda_device_or_skip("bench_moe")) return 0;
    cudaDeviceProp prop;
    cudaCheck(cudaGetDeviceProperties(&prop, 0));
    matmul_init();
    const int deepseek = strcmp(shape, "deepseekmoe-16b") == 0;
    const int C = deepseek ? 2048 : 1024, Ie = deepseek ? 1408 : 512, E = 64, S = 2, k = 6, Idense = (S + k) * Ie;
    if (profile != NULL) {
        profile_layer(profile, BT, C, Ie, E, S, k);
        matmul_free();
        return 0;
    }
    printf("bench_moe on %s: shape %s, BT=%d C=%d E=%d I_e=%d S=%d k=%d; dense SwiGLU I=%d\n", prop.name, shape, BT, C,
           E, Ie, S, k, Idense);

    // moe (vanilla) with its shared experts: the layer the trainer runs
    Bench b;
    bench_setup(&b, BT, C, Ie, E, S, k, 0);
    float moe_fwd = time_forward(&b), moe_fwdbwd = time_forward_backward(&b);
    int rows = 0;
    int groups = moe_ffn_groups(b.layer.saved.host_counts, E, &rows);
    int max_rows = 0, min_rows = BT * k;
    for (int e = 0; e < E; e++) {
        max_rows = max_rows > b.layer.saved.host_counts[e] ? max_rows : b.layer.saved.host_counts[e];
        min_rows = min_rows < b.layer.saved.host_counts[e] ? min_rows : b.layer.saved.host_counts[e];
    }
    // the first grouped GEMM alone, and one dense GEMM of the same M, N, K
    MoeLayer* L = &b.layer;
    auto first_gemm = [&] {
        moe_grouped_gemm(&b.ws.gemm, CUBLAS_OP_T, CUBLAS_OP_N, 2 * Ie, MOE_DIM_ROWS, C, L->w.w1, (size_t)2 * Ie * C,
                         MOE_BY_EXPERT, C, L->saved.xg, C, MOE_BY_ROW, C, 0.0f, L->saved.fch_g, (size_t)2 * Ie, MOE_BY_ROW,
                         2 * Ie, L->saved.host_counts, L->saved.sched, E, k, 0);
    };
    float grouped_ms = bench_median_ms(first_gemm, 3, 21);
#ifdef HAVE_CUTLASS_GROUPED_GEMM
    // the CUTLASS backend: its fch against cuBLAS's (just written), then the same timings
    const size_t fch_n = (size_t)rows * 2 * Ie;
    float* fch_cublas = (float*)malloc_check(fch_n * sizeof(float));
    float* fch_cutlass = (float*)malloc_check(fch_n * sizeof(float));
    first_gemm();
    download_floatX(fch_cublas, L->saved.fch_g, fch_n);
    moe_gemm_backend = MOE_GEMM_CUTLASS;
    moe_gemm_fallbacks = 0;
    first_gemm();
    download_floatX(fch_cutlass, L->saved.fch_g, fch_n);
    double diff2 = 0.0, ref2 = 0.0;
    for (size_t i = 0; i < fch_n; i++) {
        const double dd = (double)fch_cutlass[i] - fch_cublas[i];
        diff2 += dd * dd;
        ref2 += (double)fch_cublas[i] * fch_cublas[i];
    }
    const double cutlass_rel_l2 = sqrt(diff2 / (ref2 > 0.0 ? ref2 : 1.0));
    free(fch_cublas);
    free(fch_cutlass);
    float cutlass_ms = bench_median_ms(first_gemm, 3, 21);
    // the layer with its GEMMs reading x's and dy's rows through the schedule (the default), then
    // over gathered copies; the fch GEMM with its token reads alone, and the gather it replaces
    moe_gemm_token_reads = 1;
    float cutlass_tokens_fwdbwd = time_forward_backward(&b);
    moe_gemm_token_reads = 0;  // over gathered copies
    float cutlass_fwdbwd = time_forward_backward(&b);
    moe_gemm_token_reads = 1;  // the GEMM alone with its token reads
    auto token_gemm = [&] {
        moe_grouped_gemm(&b.ws.gemm, CUBLAS_OP_T, CUBLAS_OP_N, 2 * Ie, MOE_DIM_ROWS, C, L->w.w1, (size_t)2 * Ie * C,
                         MOE_BY_EXPERT, C, b.x, (size_t)BT, MOE_BY_TOKEN, C, 0.0f, L->saved.fch_g, (size_t)2 * Ie,
                         MOE_BY_ROW, 2 * Ie, L->saved.host_counts, L->saved.sched, E, k, 0);
    };
    float cutlass_token_ms = bench_median_ms(token_gemm, 3, 21);
    // the gather the token reads replace (it leaves xg gathered for the check below)
    float gather_ms = bench_median_ms([&] { moe_gather_rows(L->saved.xg, b.x, L->saved.sched, rows, C, k, 1.0f, 0); },
                                      3, 21);
    // the token reads' fch against the copies' (the gathered xg): the same bits, at this size
    // (many tiles and problems a CTA, which test_moe's small cases do not reach)
    std::vector<float> fch_copies(fch_n), fch_tokens(fch_n);
    first_gemm();
    download_floatX(fch_copies.data(), L->saved.fch_g, fch_n);
    token_gemm();
    download_floatX(fch_tokens.data(), L->saved.fch_g, fch_n);
    const int token_reads_same = memcmp(fch_copies.data(), fch_tokens.data(), fch_n * sizeof(float)) == 0;
    moe_gemm_token_reads = 1;  // the default
    const int cutlass_fallbacks = moe_gemm_fallbacks;
    moe_gemm_backend = MOE_GEMM_CUBLAS;
#endif
    moe_gemm_backend = MOE_GEMM_LOOP;  // the same problems as one cublasGemmEx per expert
    float loop_ms = bench_median_ms(first_gemm, 3, 21);
    float loop_fwdbwd = time_forward_backward(&b);
    moe_gemm_backend = MOE_GEMM_CUBLAS;
    float dense_gemm_ms = bench_median_ms([&] {
        matmul_forward(L->saved.fch_g, L->saved.xg, L->w.w1, NULL, rows, C, 2 * Ie, 0);
    }, 3, 21);
    const double gemm_flops = 2.0 * rows * C * 2.0 * Ie;

    Dense dn;
    dense_setup(&dn, BT, C, Idense);
    float dense_fwd_ms = bench_median_ms([&] { dense_forward(&dn); }, 3, 21);
    float dense_fwdbwd_ms = bench_median_ms([&] { dense_forward_backward(&dn); }, 3, 21);
    // the target: the layer's default path (CUTLASS with token reads in a USE_CUTLASS=1 build, else
    // cuBLAS's grouped GEMM) against the dense layer, alternating
#ifdef HAVE_CUTLASS_GROUPED_GEMM
    moe_gemm_backend = MOE_GEMM_CUTLASS;
#endif
    enum { ROUNDS = 5 };
    float round_moe[ROUNDS], round_dense[ROUNDS], round_ratio[ROUNDS];
    for (int r = 0; r < ROUNDS; r++) {
        round_moe[r] = time_forward_backward(&b);
        round_dense[r] = bench_median_ms([&] { dense_forward_backward(&dn); }, 3, 21);
        round_ratio[r] = round_moe[r] / round_dense[r];
    }
    moe_gemm_backend = MOE_GEMM_CUBLAS;
    float sorted_ratio[ROUNDS];
    memcpy(sorted_ratio, round_ratio, sizeof(round_ratio));
    std::sort(sorted_ratio, sorted_ratio + ROUNDS);
    const float alt_ratio = sorted_ratio[ROUNDS / 2];
    dense_free(&dn);
    bench_free(&b);

    // the routed experts' forward alone (S = 0): vanilla against MoE++
    Bench v, pp;
    bench_setup(&v, BT, C, Ie, E, 0, k, 0);
    float vanilla_fwd = time_forward(&v);
    bench_free(&v);
    bench_setup(&pp, BT, C, Ie, E, 0, k, 1);
    float moepp_fwd = time_forward(&pp);
    long long zc = moepp_zc_pairs(&pp);
    // a trained MoE++ router sends more pairs to its cheap experts than a random one: a selection
    // bias on the zero/copy/constant experts (the loss-free balancing bias, selection only)
    // emulates that, so the expert forward can be read at the shares a trained model reaches
    // (the study's moepp log has them per layer)
    const float zc_bias[] = {0.004f, 0.008f, 0.016f, 1.0f};
    constexpr int num_zc_bias = (int)(sizeof(zc_bias) / sizeof(zc_bias[0]));
    float zc_fwd[num_zc_bias];
    double zc_share[num_zc_bias];
    const int Et = moe_routed(pp.d);
    float* host_bias = (float*)malloc_check(Et * sizeof(float));
    for (int i = 0; i < num_zc_bias; i++) {
        for (int e = 0; e < Et; e++) host_bias[e] = e < E ? 0.0f : zc_bias[i];
        upload_floatX(pp.w.bias, host_bias, Et);
        zc_fwd[i] = time_forward(&pp);
        zc_share[i] = moepp_zc_pairs(&pp) / ((double)BT * k);
    }
    free(host_bias);
    bench_free(&pp);

    const double layer_flops_fwd = 6.0 * BT * C * (double)Idense;  // active SwiGLU FLOPs (router left out)
    printf("  [BENCH] %-44s %8.3f ms (fwd %.3f ms)\n", "moe layer fwd+bwd (shared + routed)", moe_fwdbwd, moe_fwd);
    char dense_label[64];
    snprintf(dense_label, sizeof(dense_label), "dense SwiGLU I=%d fwd+bwd", Idense);
    printf("  [BENCH] %-44s %8.3f ms (fwd %.3f ms)\n", dense_label, dense_fwdbwd_ms, dense_fwd_ms);
    printf("  [BENCH] %-44s %8.3f ms  %.1f TFLOP/s\n", "grouped GEMM fch = xg W1_e^T", grouped_ms,
           gemm_flops / (grouped_ms * 1e-3) / 1e12);
    printf("  [BENCH] %-44s %8.3f ms  %.1f TFLOP/s\n", "the same as one cublasGemmEx per expert", loop_ms,
           gemm_flops / (loop_ms * 1e-3) / 1e12);
    printf("  [BENCH] %-44s %8.3f ms  %.1f TFLOP/s\n", "dense GEMM of the same M, N, K", dense_gemm_ms,
           gemm_flops / (dense_gemm_ms * 1e-3) / 1e12);
    printf("  [BENCH] %-44s %8.3f ms\n", "moe layer fwd+bwd, per-expert GEMM loop", loop_fwdbwd);
#ifdef HAVE_CUTLASS_GROUPED_GEMM
    printf("  [BENCH] %-44s %8.3f ms  %.1f TFLOP/s (%s)\n", "the same as a CUTLASS grouped GEMM", cutlass_ms,
           gemm_flops / (cutlass_ms * 1e-3) / 1e12, moe_cutlass_config());
    printf("  [BENCH] %-44s %8.3f ms\n", "moe layer fwd+bwd, CUTLASS over gathered copies", cutlass_fwdbwd);
    printf("  [BENCH] %-44s %8.3f ms\n", "the same with token reads (the default)", cutlass_tokens_fwdbwd);
    printf("  [BENCH] %-44s %8.3f ms  %.1f TFLOP/s\n", "CUTLASS fch reading x's rows (token reads)", cutlass_token_ms,
           gemm_flops / (cutlass_token_ms * 1e-3) / 1e12);
    printf("  [BENCH] %-44s %8.3f ms  %.2f TB/s\n", "moe_gather_rows of x (what they replace)", gather_ms,
           2.0 * rows * C * sizeof(floatX) / (gather_ms * 1e-3) / 1e12);
    printf("CUTLASS fch vs cuBLAS's: relative L2 %.3e; calls handed to the loop: %d\n", cutlass_rel_l2,
           cutlass_fallbacks);
    printf("CUTLASS fch with token reads vs over the gathered copy: %s\n", token_reads_same ? "same bits" : "OTHER BITS");
#endif
    printf("  [BENCH] %-44s %8.3f ms\n", "routed experts fwd, vanilla moe (S=0)", vanilla_fwd);
    printf("  [BENCH] %-44s %8.3f ms  (%.1f%% of pairs to zero/copy/const)\n", "routed experts fwd, MoE++ (S=0)",
           moepp_fwd, 100.0 * zc / ((double)BT * k));
    for (int i = 0; i < num_zc_bias; i++) {
        printf("  [BENCH] %-44s %8.3f ms  (%.1f%% of pairs to zero/copy/const; vanilla / this %.3f)\n",
               "routed experts fwd, MoE++, zc-biased router", zc_fwd[i], 100.0 * zc_share[i], vanilla_fwd / zc_fwd[i]);
    }
    printf("expert groups %d, FFN rows %d (per expert %d..%d)\n", groups, rows, min_rows, max_rows);
    for (int r = 0; r < ROUNDS; r++) {
        printf("alternating round %d: moe layer (the default path) %.3f ms, dense SwiGLU %.3f ms, ratio %.3f\n", r + 1,
               round_moe[r], round_dense[r], round_ratio[r]);
    }
#ifdef HAVE_CUTLASS_GROUPED_GEMM
    // (this build's targets are CUTLASS's lines below)
    printf("SUMMARY moe_fwdbwd/dense_fwdbwd %.3f (cuBLAS grouped GEMM)\n", moe_fwdbwd / dense_fwdbwd_ms);
    printf("SUMMARY grouped_gemm_rate/dense_gemm_rate %.3f (cuBLAS grouped GEMM)\n", dense_gemm_ms / grouped_ms);
#else
    printf("SUMMARY grouped_gemm_rate/dense_gemm_rate %.3f (target >= 0.6)\n", dense_gemm_ms / grouped_ms);
#endif
    printf("SUMMARY %s moe_fwdbwd/dense_fwdbwd %.3f (shape %s, BT=%d: the default path, median of %d alternating "
           "rounds, %.3f..%.3f; target <= 1.3)\n",
#ifdef HAVE_CUTLASS_GROUPED_GEMM
           "cutlass",
#else
           "cublas",
#endif
           alt_ratio, shape, BT, ROUNDS, sorted_ratio[0], sorted_ratio[ROUNDS - 1]);
#ifdef HAVE_CUTLASS_GROUPED_GEMM
    printf("SUMMARY cutlass grouped_gemm_rate/dense_gemm_rate %.3f (target >= 0.6)\n", dense_gemm_ms / cutlass_ms);
    printf("SUMMARY cutlass over-copies moe_fwdbwd/dense_fwdbwd %.3f; token reads save %.3f ms\n",
           cutlass_fwdbwd / dense_fwdbwd_ms, cutlass_fwdbwd - cutlass_tokens_fwdbwd);
#endif
    printf("SUMMARY moepp_expert_fwd_throughput/moe %.3f (paper 1.1-2.1, trained routers)\n", vanilla_fwd / moepp_fwd);
    printf("moe layer fwd+bwd at %.1f TFLOP/s of active SwiGLU FLOPs\n", 3 * layer_flops_fwd / (moe_fwdbwd * 1e-3) / 1e12);
    if (json) {
        FILE* f = fopen(json, "w");
        if (f == NULL) {
            fprintf(stderr, "bench_moe: cannot write %s\n", json);
            return 1;
        }
        fprintf(f, "{\"card\": \"%s\", \"shape\": \"%s\", \"BT\": %d, \"C\": %d, \"E\": %d, \"Ie\": %d, \"S\": %d, \"k\": %d, "
                "\"moe_fwd_ms\": %.5f, \"moe_fwdbwd_ms\": %.5f, \"dense_fwd_ms\": %.5f, \"dense_fwdbwd_ms\": %.5f, "
                "\"grouped_gemm_ms\": %.5f, \"loop_gemm_ms\": %.5f, \"loop_fwdbwd_ms\": %.5f, \"dense_gemm_ms\": %.5f, "
                "\"gemm_flops\": %.6g, "
                "\"vanilla_expert_fwd_ms\": %.5f, \"moepp_expert_fwd_ms\": %.5f, \"moepp_zc_share\": %.5f, "
                "\"moepp_zc_biased\": [",
                prop.name, shape, BT, C, E, Ie, S, k, moe_fwd, moe_fwdbwd, dense_fwd_ms, dense_fwdbwd_ms, grouped_ms, loop_ms,
                loop_fwdbwd, dense_gemm_ms, gemm_flops, vanilla_fwd, moepp_fwd, zc / ((double)BT * k));
        for (int i = 0; i < num_zc_bias; i++) {
            fprintf(f, "%s{\"zc_share\": %.5f, \"expert_fwd_ms\": %.5f}", i ? ", " : "", zc_share[i], zc_fwd[i]);
        }
        fprintf(f, "], \"alt_ratio_median\": %.5f, \"alt_rounds\": [", alt_ratio);
        for (int r = 0; r < ROUNDS; r++) {
            fprintf(f, "%s{\"moe_fwdbwd_ms\": %.5f, \"dense_fwdbwd_ms\": %.5f}", r ? ", " : "", round_moe[r],
                    round_dense[r]);
        }
        fprintf(f, "]");
#ifdef HAVE_CUTLASS_GROUPED_GEMM
        fprintf(f, ", \"cutlass_config\": \"%s\", \"cutlass_gemm_ms\": %.5f, \"cutlass_fwdbwd_ms\": %.5f, "
                "\"cutlass_vs_cublas_rel_l2\": %.4e, \"cutlass_fallbacks\": %d, \"cutlass_tokens_fwdbwd_ms\": %.5f, "
                "\"cutlass_token_gemm_ms\": %.5f, \"gather_ms\": %.5f",
                moe_cutlass_config(), cutlass_ms, cutlass_fwdbwd, cutlass_rel_l2, cutlass_fallbacks,
                cutlass_tokens_fwdbwd, cutlass_token_ms, gather_ms);
        fprintf(f, ", \"token_reads_same_bits\": %d", token_reads_same);
#endif
        fprintf(f, "}\n");
        fclose(f);
    }
    matmul_free();
#ifdef HAVE_CUTLASS_GROUPED_GEMM
    if (!token_reads_same) {
        fprintf(stderr, "bench_moe: the token reads' fch differs from the copies' (a bug: they must match bit for bit)\n");
        return 1;
    }
#endif
    return 0;
}
