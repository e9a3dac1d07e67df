/*
test_moe.cu - tests of the moe layer on the GPU (llmc/moe_layer.cuh: moe_router.cuh, scheduler.cuh,
moe_experts.cuh) against a plain double-precision CPU reference written here (docs/design.md §10).

  make dev/cuda/test_moe_bin && ./dev/cuda/test_moe_bin          (bf16)
  make dev/cuda/test_moe_fp32_bin && ./dev/cuda/test_moe_fp32_bin (floatX = float, tight tolerances)

What is checked (one PASS/FAIL line per check, closing "test_moe: N passed, N failed"):
 1. moe_route on crafted logits and biases: random, exactly tied probabilities (quantised
    logits), biases that reorder them, k = E_t: the ids equal a brute-force sort of the GPU's own
    fp32 scores p + b (higher first, equal scores to the smaller id: the CPU reference's order),
    sets and order; probabilities, gates and D against double math.
 2. the layer without a shared branch (H = 0, so out and dx are the routed part alone), linear
    router, E = 6 FFN experts, 2 constant, 1 copy, 1 zero, k = 4, in three routings:
    forced (a bias of +10..13 on experts 1, 4, 7 (constant) and 9 (zero): four FFN experts and a
    constant expert never chosen, every token in the same segments), random (router weights of
    std 1, no bias: segments of every size) and tied (router weights 0: all probabilities
    equal, the ids decided by the tie rule and quantised biases); with and without
    --moe-norm-topk, --moe-input-scale and the balance loss:
    - ids against a brute-force sort of the GPU's probabilities and bias; probabilities, gates
      against double math;
    - out, dx, dW_r, dW1, dW2, dc, dA and the gate gradients against the double reference fed
      the GPU's selection (relative L2: TOL_FLOATX for bf16 outputs, dgate 3e-2 in bf16);
    - the layer's balance loss and per-expert counts against the reference; one case with a
      strong balance loss (alpha 2000), so that its gradient weighs in dx and dW_r as much as
      the gates' (at alpha 0.05 or 0.1 a sign error in it moves them by about 1e-5 relative at
      most: fp32's tolerance, a thousandth of bf16's);
    - the gradients start random and accumulate: the rows of experts nobody chose stay bitwise
      as they were; the bias has no gradient;
    - the whole forward+backward run twice gives bitwise identical results;
    - once more with E = 40 FFN experts and a bias of -10 on experts 3, 11, 19, 27, 35 (never
      chosen): 35 grouped-GEMM problems (more than the 32 that one warp of CUTLASS's group
      scheduler looks ahead at; the moe kind's default is 64 experts) with empty experts between
      them; with E = 40, plain gates and a bias of +10 on both constant experts and the copy
      expert (every token takes them and one FFN or zero expert: about 7 rows a problem, from 1
      to about 20, the weight gradients' K and the other GEMMs' N under a tile and the 16-byte
      granule); and not one grouped call handed to the loop by a cuBLAS that reports
      cublasGemmGroupedBatchedEx unsupported (moe_gemm_backend stays MOE_GEMM_CUBLAS);
    - the same with the per-expert GEMM loop instead of the grouped GEMM (moe_gemm_backend =
      MOE_GEMM_LOOP), and with W1, W2 and their gradients one element past 16-byte alignment (the
      loop again), and with x, dy, out and dx one element past it (the gather, combine and token
      backward kernels' one-element path instead of their 16-byte vectors); with the experts' inputs
      gathered again in the backward (recompute_xg, the trainer's -r >= 1); once more with C = 392,
      I_e = 200 (problems of several tiles in M, N and K, each with a partial edge tile);
    - in `make USE_CUTLASS=1` bf16 builds (HAVE_CUTLASS_GROUPED_GEMM): the same cases with the
      CUTLASS grouped GEMM (moe_gemm_backend = MOE_GEMM_CUTLASS; the E = 40 cases too), same
      tolerances, twice bitwise, and not one of its calls handed to the loop (moe_gemm_fallbacks
      stays 0); its GEMMs read x's and dy's rows through the schedule (token reads,
      llmc/moe_gemm_gather_sm90.hpp: four GEMMs a layer, two with the k x input), and each case
      runs once more over gathered copies (moe_gemm_token_reads = 0): bitwise the same out, dx and
      gradients; with W1/W2 or x/dy off 16 bytes no GEMM reads tokens (the loop, or copies); two
      cases again on two CTAs (moe_cutlass_sm_limit), each CTA then running many tiles and problems.
 3. (near the end) the row kernels (moe_gather_rows, moe_combine, moe_token_backward) with 16-byte vectors
    against their one-element path on the same numbers one element off 16 bytes: bitwise equal
    outputs (gathered rows, out, dx, dgate, dmix), with accumulate off and on (the layer cases
    above have no shared branch, so only here is accumulate on), and the zeroed margins after
    each written buffer still zero (a vector write one past the end).
 4. (after 3) the backward's fused row pass (moe_ffn_dgate_dfch): dfch and g h bitwise equal to the
    separate passes (g dh rounded, then swiglu_backward; g times swiglu_forward's h, rounded once),
    dfch also against the SwiGLU derivative in double, dgate against a double sum, the one-element
    path (any one buffer off 16 bytes, or all) bitwise equal to the vectors, nothing written past
    the ends.
The gating residual, the tanh router and the shared SwiGLU are checked end to end against the
CPU trainer by test_omnimoe.cu.
*/
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <algorithm>
#include <vector>
#include "llmc/cuda_utils.cuh"
#include "llmc/moe_layer.cuh"
#include "llmc/test_harness.h"

#if defined(ENABLE_FP32)
static const double TOL_DGATE = 1e-5;
#else
static const double TOL_DGATE = 3e-2;
#endif

static Rng g_rng;

static std::vector<float> host_random(size_t n, float std) {
    std::vector<float> v(n > 0 ? n : 1);
    fill_normal(v.data(), n, 0.0f, std, &g_rng);
    for (size_t i = 0; i < n; i++) v[i] = host_round_to_floatX(v[i]);
    return v;
}

static floatX* upload(const std::vector<float>& v, size_t n) {
    floatX* d = device_alloc<floatX>(n > 0 ? n : 1, "test buffer");
    if (n > 0) upload_floatX(d, v.data(), n);
    return d;
}

// elements that W1, W2 and their gradients sit past a 256-byte aligned allocation: 1 puts them off 16
// bytes, where the trainer's flat parameter layout can put them (moe_grouped_gemm then loops)
static size_t g_expert_shift = 0;
// the same for the layer's input, output and their gradients: 1 puts them off 16 bytes, where the
// row kernels (gather, combine, token backward) take one element a lane instead of 16-byte vectors
static size_t g_act_shift = 0;
// 1: the layer gathers its experts' inputs again in the backward (the trainer's -r >= 1)
static int g_recompute_xg = 0;

static floatX* upload_shifted(const std::vector<float>& v, size_t n, size_t shift) {
    floatX* base = device_alloc<floatX>(n + 8, "test buffer");
    cudaCheck(cudaMemset(base, 0, (n + 8) * sizeof(floatX)));  // the margins too (compute-sanitizer initcheck)
    floatX* d = base + shift;
    if (n > 0) upload_floatX(d, v.data(), n);
    return d;
}

static std::vector<float> fetch(const floatX* d, size_t n) {
    std::vector<float> v(n > 0 ? n : 1);
    if (n > 0) download_floatX(v.data(), d, n);
    return v;
}

template <class T>
static std::vector<T> fetch_raw(const T* d, size_t n) {
    std::vector<T> v(n > 0 ? n : 1);
    if (n > 0) cudaCheck(cudaMemcpy(v.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
    return v;
}

// relative L2 error of got against ref; with init (accumulated gradients), of what was added
// to init on each side, so the starting values cannot hide a wrong increment
static double rel_l2(const std::vector<float>& got, const std::vector<double>& ref, size_t n,
                     const std::vector<float>* init) {
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < n; i++) {
        double base = init ? (*init)[i] : 0.0, a = got[i] - base, b = ref[i] - base;
        num += (a - b) * (a - b);
        den += b * b;
    }
    return sqrt(num / (den > 0 ? den : 1e-300));
}

// brute force: the k best of score[0..n) in the CPU reference's order (higher, then smaller id)
static std::vector<int> brute_topk(const float* score, int n, int k) {
    std::vector<int> ids(n);
    for (int i = 0; i < n; i++) ids[i] = i;
    std::stable_sort(ids.begin(), ids.end(), [&](int a, int b) { return score[a] > score[b]; });
    ids.resize(k);
    return ids;
}

// ----------------------------------------------------------------------------
// 1. moe_route alone

static void test_route(const char* name, int BT, int Et, int k, int zero_from, int norm, int quantised) {
    std::vector<float> z((size_t)BT * Et), bias(Et);
    for (size_t i = 0; i < z.size(); i++) {
        z[i] = quantised ? (float)rng_int(&g_rng, 3) : rng_uniform(&g_rng, -3.0f, 3.0f);
    }
    for (int i = 0; i < Et; i++) bias[i] = host_round_to_floatX(quantised ? 0.25f * rng_int(&g_rng, 2) : 0.0f);
    float* d_z = device_alloc<float>(z.size(), "z");
    cudaCheck(cudaMemcpy(d_z, z.data(), z.size() * sizeof(float), cudaMemcpyHostToDevice));
    floatX* d_bias = upload(bias, Et);
    float* d_probs = device_alloc<float>((size_t)BT * Et, "probs");
    int* d_idx = device_alloc<int>((size_t)BT * k, "idx");
    float* d_gate = device_alloc<float>((size_t)BT * k, "gate");
    float* d_denom = device_alloc<float>(BT, "denom");
    poison(d_idx, (size_t)BT * k * sizeof(int));
    moe_route(d_probs, d_idx, d_gate, d_denom, d_z, d_bias, BT, Et, k, zero_from, norm, 0);
    std::vector<float> probs = fetch_raw(d_probs, (size_t)BT * Et), gate = fetch_raw(d_gate, (size_t)BT * k);
    std::vector<float> denom = fetch_raw(d_denom, BT);
    std::vector<int> idx = fetch_raw(d_idx, (size_t)BT * k);
    size_t wrong_ids = 0;
    double worst_p = 0.0, worst_g = 0.0, worst_d = 0.0;
    std::vector<float> score(Et);
    for (int t = 0; t < BT; t++) {
        const float* zr = &z[(size_t)t * Et];
        double mx = -INFINITY, sum = 0.0;
        for (int i = 0; i < Et; i++) mx = fmax(mx, zr[i]);
        for (int i = 0; i < Et; i++) sum += exp(zr[i] - mx);
        for (int i = 0; i < Et; i++) {
            worst_p = fmax(worst_p, fabs(probs[(size_t)t * Et + i] - exp(zr[i] - mx) / sum));
            score[i] = probs[(size_t)t * Et + i] + bias[i];  // the GPU's own fp32 scores
        }
        std::vector<int> want = brute_topk(score.data(), Et, k);
        double D = 0.0;
        for (int m = 0; m < k; m++) {
            wrong_ids += idx[(size_t)t * k + m] != want[m];
            if (want[m] < zero_from) D += exp(zr[want[m]] - mx) / sum;
        }
        for (int m = 0; m < k; m++) {
            double p = exp(zr[want[m]] - mx) / sum;
            double g = !norm ? p : (want[m] >= zero_from || D <= 0.0 ? 0.0 : p / D);
            worst_g = fmax(worst_g, fabs(gate[(size_t)t * k + m] - g));
        }
        worst_d = fmax(worst_d, fabs(denom[t] - (norm ? D : 1.0)));
    }
    char what[200];
    snprintf(what, sizeof(what), "%s: ids == brute-force sort of the GPU's p + b (sets and order)", name);
    test_checkf(wrong_ids == 0, what, "%zu of %d slots differ", wrong_ids, BT * k);
    snprintf(what, sizeof(what), "%s: probabilities, gates, D vs double", name);
    test_check_le(what, fmax(worst_p, fmax(worst_g, worst_d)), 1e-5);
    cudaCheck(cudaFree(d_z)); cudaCheck(cudaFree(d_bias)); cudaCheck(cudaFree(d_probs)); cudaCheck(cudaFree(d_idx));
    cudaCheck(cudaFree(d_gate)); cudaCheck(cudaFree(d_denom));
}

// ----------------------------------------------------------------------------
// 2. the layer (H = 0, linear router) against the double reference

enum { ROUTE_FORCED = 0, ROUTE_RANDOM = 1, ROUTE_TIED = 2, ROUTE_GAPS = 3, ROUTE_FEW = 4 };

typedef struct {
    std::vector<float> x, wr, w1, w2, cvec, cmix, bias, dy;
    std::vector<float> g_wr, g_w1, g_w2, g_cvec, g_cmix;  // the gradients' starting values
} LayerData;

typedef struct {
    std::vector<float> out, dx, dwr, dw1, dw2, dcvec, dcmix, dbias, probs, gate, dgate;
    std::vector<int> idx, counts;
    float aux;
} LayerResult;

static double silu(double v) { return v / (1.0 + exp(-v)); }
static double silu_grad(double v) {
    double s = 1.0 / (1.0 + exp(-v));
    return s * (1.0 + v * (1.0 - s));
}

// the tested tensors on the device (the weights, or their gradient accumulators); W1, W2 shifted
static MoeWeights upload_tensors(MoeDims d, const std::vector<float>& router, const std::vector<float>& w1,
                                 const std::vector<float>& w2, const std::vector<float>& cvec,
                                 const std::vector<float>& cmix, const std::vector<float>& bias) {
    const size_t C = d.C, Et = moe_routed(d), E = d.E, Ie = d.Ie, Kc = d.Kc;
    MoeWeights w;
    memset(&w, 0, sizeof(w));
    w.router = upload(router, Et * C);
    w.w1 = upload_shifted(w1, E * 2 * Ie * C, g_expert_shift);
    w.w2 = upload_shifted(w2, E * C * Ie, g_expert_shift);
    w.cvec = upload(cvec, Kc * C);
    w.cmix = upload(cmix, Kc * 2 * C);
    w.bias = upload(bias, Et);
    return w;
}

static int g_token_reads_last = 0;  // grouped GEMMs with token reads in the last run_layer

static LayerResult run_layer(MoeDims d, MoeOptions o, const LayerData& D, float alpha, float tau) {
    const int BT = d.BT, C = d.C, Et = moe_routed(d), E = d.E, Ie = d.Ie, Kc = d.Kc, k = d.k;
    MoeWeights w = upload_tensors(d, D.wr, D.w1, D.w2, D.cvec, D.cmix, D.bias);
    std::vector<float> zeros(Et, 0.0f);  // the bias has no gradient
    MoeWeights dw = upload_tensors(d, D.g_wr, D.g_w1, D.g_w2, D.g_cvec, D.g_cmix, zeros);
    floatX* x = upload_shifted(D.x, (size_t)BT * C, g_act_shift);
    floatX* dy = upload_shifted(D.dy, (size_t)BT * C, g_act_shift);
    floatX* out = upload_shifted(D.x, (size_t)BT * C, g_act_shift);
    floatX* dx = upload_shifted(D.x, (size_t)BT * C, g_act_shift);
    poison(out, (size_t)BT * C * sizeof(floatX));
    poison(dx, (size_t)BT * C * sizeof(floatX));
    MoeWorkspace ws;
    moe_workspace_create(&ws, d, o, NULL, 0, NULL, NULL);
    MoeLayer layer;
    moe_layer_create(&layer, d, o, w, dw, &ws, NULL, NULL);
    int* counts = device_alloc<int>(Et, "counts");
    cudaCheck(cudaMemset(counts, 0, Et * sizeof(int)));
    float* aux = device_alloc<float>(1, "aux");
    poison(aux, sizeof(float));
    layer.expert_counts = counts;
    layer.aux = aux;
    layer.aux_coef = alpha;
    layer.zc_weight = tau;
    // workspace and saved state start as NaN: nothing may read what was not written
    poison(ws.block, moe_workspace_bytes(d, o) - moe_grouped_gemm_bytes(d.E));
    poison(layer.saved.block, moe_layer_saved_bytes(d, o));
    const int reads_before = moe_gemm_token_read_calls;
    moe_layer_forward(&layer, out, x, BT, 1, 0);
    ws.carry_valid = 0;
    moe_layer_backward(&layer, dx, dy, x, BT, 0.5f, 0);
    g_token_reads_last = moe_gemm_token_read_calls - reads_before;
    cudaCheck(cudaDeviceSynchronize());
    LayerResult r;
    r.out = fetch(out, (size_t)BT * C);
    r.dx = fetch(dx, (size_t)BT * C);
    r.dwr = fetch(dw.router, (size_t)Et * C);
    r.dw1 = fetch(dw.w1, (size_t)E * 2 * Ie * C);
    r.dw2 = fetch(dw.w2, (size_t)E * C * Ie);
    r.dcvec = fetch(dw.cvec, (size_t)Kc * C);
    r.dcmix = fetch(dw.cmix, (size_t)Kc * 2 * C);
    r.dbias = fetch(dw.bias, Et);
    r.probs = fetch_raw(layer.saved.probs, (size_t)BT * Et);
    r.gate = fetch_raw(layer.saved.gate, (size_t)BT * k);
    r.dgate = fetch_raw(ws.dgate, (size_t)BT * k);
    r.idx = fetch_raw(layer.saved.idx, (size_t)BT * k);
    r.counts = fetch_raw(counts, Et);
    r.aux = alpha > 0.0f ? fetch_raw(aux, 1)[0] : 0.0f;
    moe_layer_free(&layer);
    moe_workspace_free(&ws);
    floatX* bufs[] = {w.router, w.cvec, w.cmix, w.bias, dw.router, dw.cvec, dw.cmix, dw.bias};
    for (floatX* b : bufs) cudaCheck(cudaFree(b));
    floatX* shifted[] = {w.w1, w.w2, dw.w1, dw.w2};
    for (floatX* b : shifted) cudaCheck(cudaFree(b - g_expert_shift));
    floatX* acts[] = {x, dy, out, dx};
    for (floatX* b : acts) cudaCheck(cudaFree(b - g_act_shift));
    cudaCheck(cudaFree(counts));
    cudaCheck(cudaFree(aux));
    return r;
}

// the layer's width C and expert width I_e in test_layer: small by default (every GEMM problem one
// partial tile), larger for the cases whose problems span several tiles; its FFN expert count E: 6 by
// default (the forced routing's biases name experts 1, 4, 7 and 9), more than 32 for the cases of
// more grouped-GEMM problems than one warp of CUTLASS's group scheduler looks ahead at (the moe
// kind's default is 64 experts)
static int g_layer_C = 64, g_layer_Ie = 32, g_layer_E = 6;

static void test_layer(const char* name, int route, int norm, int scale_input, float alpha) {
    const int BT = 300, C = g_layer_C, Ie = g_layer_Ie, E = g_layer_E, Kc = 2, Kp = 1, Kz = 1, k = 4;
    const int Et = E + Kc + Kp + Kz;
    if (route == ROUTE_FORCED && E != 6) {
        fprintf(stderr, "test_layer: the forced routing needs E = 6 (got %d)\n", E);
        exit(EXIT_FAILURE);
    }
    const int zero_from = E + Kc + Kp;
    MoeDims d = {BT, C, 0, Ie, E, Kc, Kp, Kz, k, g_recompute_xg};
    MoeOptions o = {0, norm, MOE_ROUTER_LINEAR, scale_input};
    const float tau = 0.75f, loss_scale = 0.5f;
    const double s = scale_input ? k : 1.0;
    LayerData D;
    D.x = host_random((size_t)BT * C, 1.0f);
    const int random_router = route == ROUTE_RANDOM || route == ROUTE_GAPS || route == ROUTE_FEW;
    D.wr = host_random((size_t)Et * C, random_router ? 1.0f : 0.02f);
    if (route == ROUTE_TIED) std::fill(D.wr.begin(), D.wr.end(), 0.0f);
    D.w1 = host_random((size_t)E * 2 * Ie * C, 0.15f);
    D.w2 = host_random((size_t)E * C * Ie, 0.15f);
    D.cvec = host_random((size_t)Kc * C, 1.0f);
    D.cmix = host_random((size_t)Kc * 2 * C, 0.1f);
    D.bias.assign(Et, 0.0f);
    if (route == ROUTE_FORCED) {  // experts 1, 4 (FFN), 7 (constant), 9 (zero), in the order 9, 7, 4, 1
        D.bias[1] = 10.0f; D.bias[4] = 11.0f; D.bias[7] = 12.0f; D.bias[9] = 13.0f;
    } else if (route == ROUTE_GAPS) {  // FFN experts 3, 11, 19, ... never chosen: empty problems among the others
        for (int e = 3; e < E; e += 8) D.bias[e] = -10.0f;
    } else if (route == ROUTE_FEW) {  // both constant experts and the copy expert in every token's k = 4: one
        D.bias[E] = D.bias[E + 1] = D.bias[E + 2] = 10.0f;  // FFN (or zero) pair a token, BT / E rows a problem
    } else if (route == ROUTE_TIED) {
        for (int i = 0; i < Et; i++) D.bias[i] = 0.25f * rng_int(&g_rng, 2);
    }
    D.dy = host_random((size_t)BT * C, 1.0f);
    D.g_wr = host_random((size_t)Et * C, 0.1f);
    D.g_w1 = host_random((size_t)E * 2 * Ie * C, 0.1f);
    D.g_w2 = host_random((size_t)E * C * Ie, 0.1f);
    D.g_cvec = host_random((size_t)Kc * C, 0.1f);
    D.g_cmix = host_random((size_t)Kc * 2 * C, 0.1f);
    LayerResult r = run_layer(d, o, D, alpha, tau);
    char what[256];

    // selection against brute force on the GPU's own probabilities and bias
    size_t wrong_ids = 0;
    std::vector<float> score(Et);
    for (int t = 0; t < BT; t++) {
        for (int i = 0; i < Et; i++) score[i] = r.probs[(size_t)t * Et + i] + D.bias[i];
        std::vector<int> want = brute_topk(score.data(), Et, k);
        for (int m = 0; m < k; m++) wrong_ids += r.idx[(size_t)t * k + m] != want[m];
    }
    snprintf(what, sizeof(what), "%s: ids == brute-force sort of p + b", name);
    test_checkf(wrong_ids == 0, what, "%zu of %d slots differ", wrong_ids, BT * k);

    // the double reference, fed the GPU's ids
    std::vector<double> p((size_t)BT * Et), g((size_t)BT * k), out((size_t)BT * C, 0.0), dx((size_t)BT * C, 0.0);
    std::vector<double> dwr(D.g_wr.begin(), D.g_wr.end()), dw1(D.g_w1.begin(), D.g_w1.end());
    std::vector<double> dw2(D.g_w2.begin(), D.g_w2.end()), dcvec(D.g_cvec.begin(), D.g_cvec.end());
    std::vector<double> dcmix(D.g_cmix.begin(), D.g_cmix.end()), dgate((size_t)BT * k), denom(BT);
    std::vector<int> counts(Et, 0);
    for (size_t q = 0; q < (size_t)BT * k; q++) counts[r.idx[q]]++;
    for (int t = 0; t < BT; t++) {
        double mx = -INFINITY, sum = 0.0;
        std::vector<double> z(Et);
        for (int i = 0; i < Et; i++) {
            z[i] = 0.0;
            for (int c = 0; c < C; c++) z[i] += (double)D.wr[(size_t)i * C + c] * D.x[(size_t)t * C + c];
            mx = fmax(mx, z[i]);
        }
        for (int i = 0; i < Et; i++) sum += exp(z[i] - mx);
        for (int i = 0; i < Et; i++) p[(size_t)t * Et + i] = exp(z[i] - mx) / sum;
        const int* id = &r.idx[(size_t)t * k];
        double Dn = 0.0;
        for (int m = 0; m < k; m++) if (id[m] < zero_from) Dn += p[(size_t)t * Et + id[m]];
        denom[t] = Dn;
        for (int m = 0; m < k; m++) {
            double pm = p[(size_t)t * Et + id[m]];
            g[(size_t)t * k + m] = !norm ? pm : (id[m] >= zero_from || Dn <= 0.0 ? 0.0 : pm / Dn);
        }
    }
    double aux = 0.0;
    for (int i = 0; i < Et; i++) {
        double Pi = 0.0;
        for (int t = 0; t < BT; t++) Pi += p[(size_t)t * Et + i];
        aux += (i < E ? 1.0 : tau) * ((double)Et * counts[i] / ((double)k * BT)) * (Pi / BT);
    }
    aux *= alpha;
    std::vector<double> xe(C), y(C), dxe(C), f(2 * Ie), h(Ie), dh(Ie), df(2 * Ie), dp(Et);
    for (int t = 0; t < BT; t++) {
        const float* dyt = &D.dy[(size_t)t * C];
        for (int c = 0; c < C; c++) { xe[c] = s * D.x[(size_t)t * C + c]; dxe[c] = 0.0; }
        for (int m = 0; m < k; m++) {
            const size_t q = (size_t)t * k + m;
            const int e = r.idx[q];
            const double gq = g[q];
            double w0 = 0.0, w1 = 0.0;
            const float* A = NULL;
            const float* cv = NULL;
            if (e < E) {
                const float* W1 = &D.w1[(size_t)e * 2 * Ie * C];
                const float* W2 = &D.w2[(size_t)e * C * Ie];
                for (int j = 0; j < 2 * Ie; j++) {
                    f[j] = 0.0;
                    for (int c = 0; c < C; c++) f[j] += (double)W1[(size_t)j * C + c] * xe[c];
                }
                for (int i = 0; i < Ie; i++) h[i] = silu(f[i]) * f[Ie + i];
                for (int c = 0; c < C; c++) {
                    y[c] = 0.0;
                    for (int i = 0; i < Ie; i++) y[c] += (double)W2[(size_t)c * Ie + i] * h[i];
                }
            } else if (e < E + Kc) {
                A = &D.cmix[(size_t)(e - E) * 2 * C];
                cv = &D.cvec[(size_t)(e - E) * C];
                double a0 = 0.0, a1 = 0.0;
                for (int c = 0; c < C; c++) { a0 += A[c] * xe[c]; a1 += A[C + c] * xe[c]; }
                double mx = fmax(a0, a1);
                w0 = exp(a0 - mx) / (exp(a0 - mx) + exp(a1 - mx));
                w1 = 1.0 - w0;
                for (int c = 0; c < C; c++) y[c] = w0 * xe[c] + w1 * cv[c];
            } else if (e < E + Kc + Kp) {
                for (int c = 0; c < C; c++) y[c] = xe[c];
            } else {
                for (int c = 0; c < C; c++) y[c] = 0.0;
            }
            double dg = 0.0;
            for (int c = 0; c < C; c++) {
                out[(size_t)t * C + c] += gq * y[c];
                dg += dyt[c] * y[c];
            }
            dgate[q] = dg;
            if (e < E) {
                const float* W1 = &D.w1[(size_t)e * 2 * Ie * C];
                const float* W2 = &D.w2[(size_t)e * C * Ie];
                for (int i = 0; i < Ie; i++) {
                    dh[i] = 0.0;
                    for (int c = 0; c < C; c++) dh[i] += (double)W2[(size_t)c * Ie + i] * gq * dyt[c];
                    df[i] = dh[i] * f[Ie + i] * silu_grad(f[i]);
                    df[Ie + i] = dh[i] * silu(f[i]);
                }
                for (int c = 0; c < C; c++) {
                    for (int i = 0; i < Ie; i++) dw2[(size_t)e * C * Ie + (size_t)c * Ie + i] += gq * dyt[c] * h[i];
                }
                for (int j = 0; j < 2 * Ie; j++) {
                    for (int c = 0; c < C; c++) {
                        dw1[(size_t)e * 2 * Ie * C + (size_t)j * C + c] += df[j] * xe[c];
                        dxe[c] += (double)W1[(size_t)j * C + c] * df[j];
                    }
                }
            } else if (e < E + Kc) {
                double dw0 = 0.0, dw1s = 0.0;
                for (int c = 0; c < C; c++) { dw0 += gq * dyt[c] * xe[c]; dw1s += gq * dyt[c] * cv[c]; }
                double wdw = w0 * dw0 + w1 * dw1s, da0 = w0 * (dw0 - wdw), da1 = w1 * (dw1s - wdw);
                for (int c = 0; c < C; c++) {
                    dcmix[(size_t)(e - E) * 2 * C + c] += da0 * xe[c];
                    dcmix[(size_t)(e - E) * 2 * C + C + c] += da1 * xe[c];
                    dcvec[(size_t)(e - E) * C + c] += w1 * gq * dyt[c];
                    dxe[c] += w0 * gq * dyt[c] + da0 * A[c] + da1 * A[C + c];
                }
            } else if (e < E + Kc + Kp) {
                for (int c = 0; c < C; c++) dxe[c] += gq * dyt[c];
            }
        }
        // gates -> dp (+ balance loss) -> dz -> router
        for (int i = 0; i < Et; i++) {
            dp[i] = alpha > 0.0f ? (double)loss_scale * alpha * (i < E ? 1.0 : tau) *
                                       ((double)Et * counts[i] / ((double)k * BT)) / BT : 0.0;
        }
        const int* id = &r.idx[(size_t)t * k];
        if (!norm) {
            for (int m = 0; m < k; m++) dp[id[m]] += dgate[(size_t)t * k + m];
        } else if (denom[t] > 0.0) {
            double gdg = 0.0;
            for (int m = 0; m < k; m++) gdg += g[(size_t)t * k + m] * dgate[(size_t)t * k + m];
            for (int m = 0; m < k; m++) {
                if (id[m] < zero_from) dp[id[m]] += (dgate[(size_t)t * k + m] - gdg) / denom[t];
            }
        }
        double pdp = 0.0;
        for (int i = 0; i < Et; i++) pdp += p[(size_t)t * Et + i] * dp[i];
        for (int c = 0; c < C; c++) dx[(size_t)t * C + c] = s * dxe[c];
        for (int i = 0; i < Et; i++) {
            double dz = p[(size_t)t * Et + i] * (dp[i] - pdp);
            for (int c = 0; c < C; c++) {
                dx[(size_t)t * C + c] += dz * D.wr[(size_t)i * C + c];
                dwr[(size_t)i * C + c] += dz * D.x[(size_t)t * C + c];
            }
        }
    }

    double worst_pg = 0.0;
    for (size_t i = 0; i < p.size(); i++) worst_pg = fmax(worst_pg, fabs(r.probs[i] - p[i]));
    for (size_t i = 0; i < g.size(); i++) worst_pg = fmax(worst_pg, fabs(r.gate[i] - g[i]));
    // the logits come from a GEMM with fp32 accumulation (|z| up to ~30 with router weights of std 1)
    snprintf(what, sizeof(what), "%s: probabilities and gates vs double (max abs)", name);
    test_check_le(what, worst_pg, 1e-4);
    int same_counts = 1;
    std::vector<int> want_counts(Et, 0);
    for (size_t q = 0; q < (size_t)BT * k; q++) want_counts[r.idx[q]]++;
    for (int i = 0; i < Et; i++) same_counts &= r.counts[i] == want_counts[i];
    snprintf(what, sizeof(what), "%s: per-expert counts == the ids' histogram", name);
    test_check(same_counts, what);
    if (alpha > 0.0f) {
        snprintf(what, sizeof(what), "%s: balance loss vs double (relative)", name);
        test_check_le(what, fabs(r.aux - aux) / fmax(fabs(aux), 1e-30), 1e-5);
    }
    struct {
        const char* what;
        const std::vector<float>* got;
        const std::vector<double>* ref;
        const std::vector<float>* init;
        double tol;
    } cmp[] = {
        {"out", &r.out, &out, NULL, TOL_FLOATX},
        {"dx", &r.dx, &dx, NULL, TOL_FLOATX},
        {"dW_r (added)", &r.dwr, &dwr, &D.g_wr, TOL_FLOATX},
        {"dW1 (added)", &r.dw1, &dw1, &D.g_w1, TOL_FLOATX},
        {"dW2 (added)", &r.dw2, &dw2, &D.g_w2, TOL_FLOATX},
        {"dc, constant vectors (added)", &r.dcvec, &dcvec, &D.g_cvec, TOL_FLOATX},
        {"dA, constant mixing (added)", &r.dcmix, &dcmix, &D.g_cmix, TOL_FLOATX},
        {"dgate", &r.dgate, &dgate, NULL, TOL_DGATE},
    };
    for (auto& cm : cmp) {
        snprintf(what, sizeof(what), "%s: %s vs double (relative L2)", name, cm.what);
        test_check_le(what, rel_l2(*cm.got, *cm.ref, cm.ref->size(), cm.init), cm.tol);
    }
    // experts nobody chose: their gradient rows are bitwise what they were; the bias has none
    int untouched = 1;
    for (int e = 0; e < E; e++) {
        if (want_counts[e] > 0) continue;
        const size_t n1 = (size_t)2 * Ie * C, n2 = (size_t)C * Ie;
        untouched &= memcmp(&r.dw1[e * n1], &D.g_w1[e * n1], n1 * sizeof(float)) == 0;
        untouched &= memcmp(&r.dw2[e * n2], &D.g_w2[e * n2], n2 * sizeof(float)) == 0;
    }
    for (int j = 0; j < Kc; j++) {
        if (want_counts[E + j] > 0) continue;
        untouched &= memcmp(&r.dcvec[(size_t)j * C], &D.g_cvec[(size_t)j * C], C * sizeof(float)) == 0;
        untouched &= memcmp(&r.dcmix[(size_t)j * 2 * C], &D.g_cmix[(size_t)j * 2 * C], 2 * C * sizeof(float)) == 0;
    }
    for (int i = 0; i < Et; i++) untouched &= r.dbias[i] == 0.0f;
    snprintf(what, sizeof(what), "%s: gradients of unchosen experts and of the bias untouched (bitwise)", name);
    test_check(untouched, what);
    if (route == ROUTE_FORCED) {
        int empty = 0;
        for (int e = 0; e < E + Kc; e++) empty += want_counts[e] == 0;
        snprintf(what, sizeof(what), "%s: the forced routing leaves 5 experts empty", name);
        test_checkf(empty == 5, what, "%d empty", empty);
    } else if (route == ROUTE_GAPS) {  // the case is what it claims: its biased experts empty, over 32 problems
        int problems = 0, gaps_ok = 1;
        for (int e = 0; e < E; e++) {
            problems += want_counts[e] > 0;
            gaps_ok &= (want_counts[e] == 0) == (D.bias[e] < 0.0f);
        }
        snprintf(what, sizeof(what), "%s: exactly the biased FFN experts empty, over 32 problems", name);
        test_checkf(gaps_ok && problems > 32, what, "%d problems, biased experts %s", problems,
                    gaps_ok ? "exactly the empty ones" : "not exactly the empty ones");
    } else if (route == ROUTE_FEW) {  // the case is what it claims: the three biased experts in every token
        snprintf(what, sizeof(what), "%s: both constant experts and the copy expert in every token", name);
        test_checkf(want_counts[E] == BT && want_counts[E + 1] == BT && want_counts[E + 2] == BT, what,
                    "pairs %d %d %d of %d tokens", want_counts[E], want_counts[E + 1], want_counts[E + 2], BT);
    }
    // the whole forward + backward again: bitwise the same
    LayerResult r2 = run_layer(d, o, D, alpha, tau);
    int same = r2.out == r.out && r2.dx == r.dx && r2.dwr == r.dwr && r2.dw1 == r.dw1 && r2.dw2 == r.dw2 &&
               r2.dcvec == r.dcvec && r2.dcmix == r.dcmix && r2.idx == r.idx && r2.dgate == r.dgate &&
               memcmp(&r2.aux, &r.aux, sizeof(float)) == 0;
    snprintf(what, sizeof(what), "%s: forward + backward twice bitwise identical", name);
    test_check(same, what);
#ifdef HAVE_CUTLASS_GROUPED_GEMM
    // CUTLASS reads x's and dy's rows through the schedule inside its GEMMs (where it can): the
    // same bits as the GEMMs over gathered copies
    if (moe_gemm_backend == MOE_GEMM_CUTLASS) {
        // x through the schedule where s = 1 (fch, dW1), dy always (dh, dW2); none off 16 bytes
        const int reads_on = g_token_reads_last, reads_want = g_expert_shift || g_act_shift ? 0 : (scale_input ? 2 : 4);
        snprintf(what, sizeof(what), "%s: %d grouped GEMMs read tokens through the schedule", name, reads_want);
        test_checkf(reads_on == reads_want, what, "%d did", reads_on);
        const int reads_before = moe_gemm_token_read_calls;
        moe_gemm_token_reads = 0;
        LayerResult r3 = run_layer(d, o, D, alpha, tau);
        moe_gemm_token_reads = 1;  // (the CUTLASS cases run with token reads on: main sets it)
        const int reads_off = moe_gemm_token_read_calls - reads_before;
        same = r3.out == r.out && r3.dx == r.dx && r3.dwr == r.dwr && r3.dw1 == r.dw1 && r3.dw2 == r.dw2 &&
               r3.dcvec == r.dcvec && r3.dcmix == r.dcmix && r3.idx == r.idx && r3.dgate == r.dgate &&
               memcmp(&r3.aux, &r.aux, sizeof(float)) == 0;
        snprintf(what, sizeof(what), "%s: token reads inside the GEMMs bitwise equal to gathered copies", name);
        test_checkf(same && reads_off == 0, what, "%s; %d token reads with them off", same ? "same bits" : "other bits",
                    reads_off);
    }
#endif
}

// the row kernels (gather, combine, the token backward) with 16-byte vectors against their
// one-element path on the same numbers one element off 16 bytes: the outputs bitwise the same
// (each element's arithmetic does not depend on the vector width), with accumulate off and on,
// FFN, constant, copy and zero pairs mixed; and nothing written past a buffer's end (the zeroed
// margins upload_shifted leaves stay zero: a vector one element too far would land there)
static void test_row_kernels_vectors(void) {
    const int BT = 97, C = 72, k = 4, E = 5, Kc = 2, Kp = 1, Kz = 1, Et = E + Kc + Kp + Kz, P = BT * k;
    const float scale = (float)k;
    std::vector<int> idx(P), pos(P, -1), sorted_pair;
    std::vector<float> gate(P), mix(2 * (size_t)P);
    for (int q = 0; q < P; q++) {
        idx[q] = rng_int(&g_rng, Et);
        gate[q] = rng_uniform(&g_rng, 0.05f, 1.0f);
        const float w0 = rng_uniform(&g_rng, 0.0f, 1.0f);
        mix[2 * (size_t)q] = w0;
        mix[2 * (size_t)q + 1] = 1.0f - w0;
        if (idx[q] < E) sorted_pair.push_back(q);
    }
    const int R = (int)sorted_pair.size();  // FFN rows; shuffled, so that rows and tokens do not line up
    for (int j = R - 1; j > 0; j--) std::swap(sorted_pair[j], sorted_pair[rng_int(&g_rng, j + 1)]);
    for (int j = 0; j < R; j++) pos[sorted_pair[j]] = j;
    const std::vector<float> x = host_random((size_t)BT * C, 1.0f), dout = host_random((size_t)BT * C, 1.0f);
    const std::vector<float> yg = host_random((size_t)R * C, 1.0f), dxg = host_random((size_t)R * C, 1.0f);
    const std::vector<float> init = host_random((size_t)BT * C, 1.0f);
    const std::vector<float> cvec = host_random((size_t)Kc * C, 1.0f), A = host_random((size_t)Kc * 2 * C, 0.1f);
    int* d_idx = device_alloc<int>(P, "idx");
    int* d_pos = device_alloc<int>(P, "pos");
    int* d_sorted = device_alloc<int>(R, "sorted_pair");
    float* d_gate = device_alloc<float>(P, "gate");
    float* d_mix = device_alloc<float>(2 * (size_t)P, "mix");
    cudaCheck(cudaMemcpy(d_idx, idx.data(), P * sizeof(int), cudaMemcpyHostToDevice));
    cudaCheck(cudaMemcpy(d_pos, pos.data(), P * sizeof(int), cudaMemcpyHostToDevice));
    cudaCheck(cudaMemcpy(d_sorted, sorted_pair.data(), R * sizeof(int), cudaMemcpyHostToDevice));
    cudaCheck(cudaMemcpy(d_gate, gate.data(), P * sizeof(float), cudaMemcpyHostToDevice));
    cudaCheck(cudaMemcpy(d_mix, mix.data(), 2 * (size_t)P * sizeof(float), cudaMemcpyHostToDevice));
    floatX* d_cvec = upload(cvec, (size_t)Kc * C);
    floatX* d_A = upload(A, (size_t)Kc * 2 * C);
    ExpertSchedule sched;
    memset(&sched, 0, sizeof(sched));
    sched.sorted_pair = d_sorted;
    const size_t nT = (size_t)BT * C, nR = (size_t)R * C;
    for (int accumulate = 0; accumulate <= 1; accumulate++) {
        std::vector<floatX> gathered[2], out[2], dx[2];
        std::vector<float> dgate[2], dmix[2];
        int vectors[2] = {0, 0}, margins_zero = 1;
        for (int shift = 0; shift <= 1; shift++) {
            floatX* d_x = upload_shifted(x, nT, shift);
            floatX* d_dout = upload_shifted(dout, nT, shift);
            floatX* d_yg = upload_shifted(yg, nR, shift);
            floatX* d_dxg = upload_shifted(dxg, nR, shift);
            floatX* d_dst = upload_shifted(yg, nR, shift);  // overwritten
            floatX* d_out = upload_shifted(init, nT, shift);
            floatX* d_dx = upload_shifted(init, nT, shift);
            float* d_dgate = device_alloc<float>(P, "dgate");
            float* d_dmix = device_alloc<float>(2 * (size_t)P, "dmix");
            poison(d_dgate, P * sizeof(float));
            poison(d_dmix, 2 * (size_t)P * sizeof(float));
            vectors[shift] = moe_row_vec(d_dst, d_x, d_x) + moe_row_vec(d_out, d_yg, d_x) + moe_row_vec(d_dx, d_dout, d_dxg);
            moe_gather_rows(d_dst, d_x, sched, R, C, k, scale, 0);
            moe_combine(d_out, d_yg, d_x, d_cvec, d_idx, d_gate, d_pos, d_mix, BT, C, k, E, Kc, Kp, scale, accumulate, 0);
            moe_token_backward(d_dx, d_dgate, d_dmix, d_dout, d_x, d_dxg, d_cvec, d_A, d_idx, d_gate, d_pos, d_mix, BT, C,
                               k, E, Kc, Kp, scale, accumulate, 0);
            cudaCheck(cudaDeviceSynchronize());
            gathered[shift] = fetch_raw(d_dst, nR);
            out[shift] = fetch_raw(d_out, nT);
            dx[shift] = fetch_raw(d_dx, nT);
            dgate[shift] = fetch_raw(d_dgate, P);
            dmix[shift] = fetch_raw(d_dmix, 2 * (size_t)P);
            // the 8 - shift elements after each written buffer (upload_shifted zeroed them)
            const floatX* written[3] = {d_dst, d_out, d_dx};
            const size_t lens[3] = {nR, nT, nT};
            for (int b = 0; b < 3; b++) {
                const std::vector<floatX> margin = fetch_raw(written[b] + lens[b], 8 - shift);
                const std::vector<unsigned char> zeros((8 - shift) * sizeof(floatX), 0);
                margins_zero &= memcmp(margin.data(), zeros.data(), zeros.size()) == 0;
            }
            floatX* shifted[] = {d_x, d_dout, d_yg, d_dxg, d_dst, d_out, d_dx};
            for (floatX* b : shifted) cudaCheck(cudaFree(b - shift));
            cudaCheck(cudaFree(d_dgate));
            cudaCheck(cudaFree(d_dmix));
        }
        char what[256];
        snprintf(what, sizeof(what), "row kernels, accumulate %d: 16-byte vectors when aligned (3 launches), one "
                 "element when not (0)", accumulate);
        test_checkf(vectors[0] == 3 && vectors[1] == 0, what, "aligned %d, shifted %d", vectors[0], vectors[1]);
        const struct { const char* name; const void* a; const void* b; size_t bytes; } same[] = {
            {"gather", gathered[0].data(), gathered[1].data(), nR * sizeof(floatX)},
            {"combine", out[0].data(), out[1].data(), nT * sizeof(floatX)},
            {"token backward dx", dx[0].data(), dx[1].data(), nT * sizeof(floatX)},
            {"token backward dgate", dgate[0].data(), dgate[1].data(), P * sizeof(float)},
            {"token backward dmix", dmix[0].data(), dmix[1].data(), 2 * (size_t)P * sizeof(float)},
        };
        for (const auto& c : same) {
            snprintf(what, sizeof(what), "row kernels, accumulate %d: %s with vectors == one element a lane (bitwise)",
                     accumulate, c.name);
            test_check(memcmp(c.a, c.b, c.bytes) == 0, what);
        }
        snprintf(what, sizeof(what), "row kernels, accumulate %d: nothing written past the buffers' ends", accumulate);
        test_check(margins_zero, what);
    }
    int* ints[] = {d_idx, d_pos, d_sorted};
    for (int* b : ints) cudaCheck(cudaFree(b));
    cudaCheck(cudaFree(d_gate));
    cudaCheck(cudaFree(d_mix));
    cudaCheck(cudaFree(d_cvec));
    cudaCheck(cudaFree(d_A));
}

// dgate as the separate pass before the fusion summed it (the layer's bits since): one warp per row,
// one element a lane in turn from the global dh and h, then the warp's butterfly
__global__ void reference_dgate_kernel(float* dgate, const floatX* dh, const floatX* h, const int* sorted_pair,
                                       int rows, int Ie) {
    const int j = blockIdx.x * MOE_TOKEN_WARPS + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (j >= rows) return;
    const size_t r = (size_t)j * Ie;
    float s = 0.0f;
    for (int i = lane; i < Ie; i += 32) s += (float)dh[r + i] * (float)h[r + i];
    s = moe_warp_sum(s);
    if (lane == 0) dgate[sorted_pair[j]] = s;
}

// the backward's fused row pass (moe_ffn_dgate_dfch) against what the separate passes compute:
// dfch bitwise equal to swiglu_backward of g dh rounded to floatX, g h bitwise equal to the
// product rounded once, with h the forward's swiglu_forward of fch (the kernel recomputes it);
// dfch also against a double evaluation of the SwiGLU derivative (not through the shared element
// functions), dgate = <dh, h> against a double sum and bitwise against the separate pass's sum.
// Then the one-element path (any one buffer, or all, one element off 16 bytes) bitwise equal to
// the vectors, and nothing written past the ends. I_e = 296: each lane's vector loop runs twice;
// I_e = 2200: three segments of the dgate sum's staging (MOE_DGATE_SEGMENT), the last one partial.
static void test_ffn_dgate_dfch(int Ie) {
    const int R = 83, P = 3 * R;
    printf("ffn dgate+dfch at I_e = %d:\n", Ie);
    std::vector<int> sorted_pair(R);
    for (int j = 0; j < R; j++) sorted_pair[j] = (j * 7 + 5) % P;  // rows and pairs do not line up
    std::vector<float> gate(P);
    for (int q = 0; q < P; q++) gate[q] = rng_uniform(&g_rng, 0.05f, 1.0f);
    const size_t nI = (size_t)R * Ie, n2 = 2 * nI;
    const std::vector<float> dh_in = host_random(nI, 1.0f), fch_in = host_random(n2, 2.0f);
    int* d_sorted = device_alloc<int>(R, "sorted_pair");
    float* d_gate = device_alloc<float>(P, "gate");
    cudaCheck(cudaMemcpy(d_sorted, sorted_pair.data(), R * sizeof(int), cudaMemcpyHostToDevice));
    cudaCheck(cudaMemcpy(d_gate, gate.data(), P * sizeof(float), cudaMemcpyHostToDevice));
    ExpertSchedule sched;
    memset(&sched, 0, sizeof(sched));
    sched.sorted_pair = d_sorted;
    // layout l: 0 every buffer 16-byte aligned (vectors); 1..3 only dfch, dh or fch one element
    // off; 4 all of them off (the one-element path in each of 1..4)
    const int layouts = 5;
    std::vector<floatX> dfch[layouts], hg[layouts];
    std::vector<float> dgate[layouts], dh, h, fch, dgate_ref;
    int margins_zero = 1, vectors_ok = 1;
    for (int l = 0; l < layouts; l++) {
        const size_t sh[3] = {(size_t)(l == 1 || l == 4), (size_t)(l == 2 || l == 4),
                              (size_t)(l == 3 || l == 4)};  // dfch, dh, fch
        floatX* d_dfch = upload_shifted(fch_in, n2, sh[0]);  // overwritten
        floatX* d_dh = upload_shifted(dh_in, nI, sh[1]);
        floatX* d_fch = upload_shifted(fch_in, n2, sh[2]);
        float* d_dgate = device_alloc<float>(P, "dgate");
        poison(d_dgate, P * sizeof(float));
        if (l == 0) {  // the values floatX holds, and the forward's h = SwiGLU(fch)
            dh = fetch(d_dh, nI);
            fch = fetch(d_fch, n2);
            floatX* d_h = upload(dh_in, nI);  // overwritten
            swiglu_forward(d_h, d_fch, R, Ie, 0);
            float* d_ref_dgate = device_alloc<float>(P, "reference dgate");
            poison(d_ref_dgate, P * sizeof(float));
            reference_dgate_kernel<<<ceil_div(R, MOE_TOKEN_WARPS), MOE_TOKEN_WARPS * 32>>>(d_ref_dgate, d_dh, d_h,
                                                                                       d_sorted, R, Ie);
            cudaCheck(cudaDeviceSynchronize());
            h = fetch(d_h, nI);
            dgate_ref = fetch_raw(d_ref_dgate, P);
            cudaCheck(cudaFree(d_h));
            cudaCheck(cudaFree(d_ref_dgate));
        }
        vectors_ok &= moe_row_vec(d_dfch, d_dh, d_fch) == (l == 0);
        moe_ffn_dgate_dfch(d_dgate, d_dfch, d_dh, d_fch, d_gate, sched, R, Ie, 0);
        cudaCheck(cudaDeviceSynchronize());
        dfch[l] = fetch_raw(d_dfch, n2);
        hg[l] = fetch_raw(d_dh, nI);
        dgate[l] = fetch_raw(d_dgate, P);
        const floatX* written[2] = {d_dh, d_dfch};
        const size_t lens[2] = {nI, n2}, shifts[2] = {sh[1], sh[0]};
        for (int b = 0; b < 2; b++) {
            const std::vector<floatX> margin = fetch_raw(written[b] + lens[b], 8 - shifts[b]);
            const std::vector<unsigned char> zeros((8 - shifts[b]) * sizeof(floatX), 0);
            margins_zero &= memcmp(margin.data(), zeros.data(), zeros.size()) == 0;
        }
        if (l == 0) {  // the references
            std::vector<float> gdh(nI), ghv(nI);
            std::vector<double> dot(R, 0.0), dfch64(n2);
            for (int j = 0; j < R; j++) {
                const float g = gate[sorted_pair[j]];
                for (int i = 0; i < Ie; i++) {
                    const size_t e = (size_t)j * Ie + i;
                    gdh[e] = g * dh[e];
                    ghv[e] = g * h[e];
                    dot[j] += (double)dh[e] * h[e];
                }
            }
            floatX* d_gdh = upload(gdh, nI);  // g dh rounded to floatX, as the fused pass does
            const std::vector<float> gdh_x = fetch(d_gdh, nI);
            for (int j = 0; j < R; j++) {
                for (int i = 0; i < Ie; i++) {
                    const double gv = fch[(size_t)j * 2 * Ie + i], uv = fch[(size_t)j * 2 * Ie + Ie + i];
                    const double d = gdh_x[(size_t)j * Ie + i], sig = 1.0 / (1.0 + exp(-gv));
                    dfch64[(size_t)j * 2 * Ie + i] = d * uv * sig * (1.0 + gv * (1.0 - sig));
                    dfch64[(size_t)j * 2 * Ie + Ie + i] = d * gv * sig;
                }
            }
            floatX* d_ref = upload(fch_in, n2);
            swiglu_backward(d_ref, d_gdh, d_fch, R, Ie, 0);
            cudaCheck(cudaDeviceSynchronize());
            const std::vector<floatX> ref = fetch_raw(d_ref, n2);
            std::vector<floatX> ghx(nI);
            for (size_t e = 0; e < nI; e++) ghx[e] = (floatX)ghv[e];
            test_check(memcmp(dfch[0].data(), ref.data(), n2 * sizeof(floatX)) == 0,
                       "ffn dgate+dfch: dfch == swiglu_backward of g dh rounded to floatX (bitwise)");
            const std::vector<float> got_dfch = fetch(d_dfch, n2);
            test_check_rel("ffn dgate+dfch: dfch == the SwiGLU derivative in double", rel_err_f64(got_dfch.data(),
                           dfch64.data(), n2), TOL_FLOATX);
            test_check(memcmp(hg[0].data(), ghx.data(), nI * sizeof(floatX)) == 0,
                       "ffn dgate+dfch: g h over dh == g times the forward's h, rounded once (bitwise)");
            std::vector<float> got(R);
            for (int j = 0; j < R; j++) got[j] = dgate[0][sorted_pair[j]];
            test_check_rel("ffn dgate+dfch: dgate == <dh, h> (double reference)", rel_err_f64(got.data(), dot.data(), R),
                           1e-5);
            int dgate_same = 1;
            for (int jj = 0; jj < R; jj++) {
                const int qq = sorted_pair[jj];
                dgate_same &= memcmp(&dgate[0][qq], &dgate_ref[qq], sizeof(float)) == 0;
            }
            test_check(dgate_same, "ffn dgate+dfch: dgate == the separate pass's lane-strided sum (bitwise)");
            cudaCheck(cudaFree(d_gdh));
            cudaCheck(cudaFree(d_ref));
        }
        floatX* bufs[3] = {d_dfch, d_dh, d_fch};
        for (int b = 0; b < 3; b++) cudaCheck(cudaFree(bufs[b] - sh[b]));
        cudaCheck(cudaFree(d_dgate));
    }
    test_check(vectors_ok, "ffn dgate+dfch: 16-byte vectors only when all three buffers are aligned");
    int same = 1;
    for (int l = 1; l < layouts; l++) {
        same &= memcmp(dfch[0].data(), dfch[l].data(), n2 * sizeof(floatX)) == 0 &&
                memcmp(hg[0].data(), hg[l].data(), nI * sizeof(floatX)) == 0 &&
                memcmp(dgate[0].data(), dgate[l].data(), P * sizeof(float)) == 0;
    }
    test_check(same, "ffn dgate+dfch: one element a lane (any one buffer, or all, off 16 bytes) == the 16-byte vectors "
               "(dfch, g h, dgate bitwise)");
    test_check(margins_zero, "ffn dgate+dfch: nothing written past the buffers' ends");
    cudaCheck(cudaFree(d_sorted));
    cudaCheck(cudaFree(d_gate));
}

int main(void) {
    if (!test_cuda_device_or_skip("test_moe")) return 0;
    test_begin("test_moe" TEST_FLOATX_SUFFIX);
    g_rng = rng_seeded(2025);
    matmul_init();
    test_route("route random E_t=10 k=4 norm", 517, 10, 4, 9, 1, 0);
    test_route("route quantised ties E_t=10 k=4", 517, 10, 4, 9, 0, 1);
    test_route("route quantised ties E_t=70 k=6 norm (more than 32 experts a lane)", 300, 70, 6, 64, 1, 1);
    test_route("route k = E_t = 5", 64, 5, 5, 5, 1, 1);
    test_layer("layer forced routing, norm, k x input, balance loss", ROUTE_FORCED, 1, 1, 0.05f);
    test_layer("layer random routing, plain gates, no balance loss", ROUTE_RANDOM, 0, 0, 0.0f);
    test_layer("layer random routing, norm, balance loss", ROUTE_RANDOM, 1, 0, 0.1f);
    // at alpha 0.05 or 0.1 the balance-loss gradient is tiny beside the gates' (a sign error in it
    // moves dx and dW_r by about 1e-5 relative at most, not above the tolerances); at 2000 the same error
    // moves them by 0.15 and 0.2 (the double reference against itself with the sign flipped)
    test_layer("layer random routing, norm, strong balance loss", ROUTE_RANDOM, 1, 0, 2000.0f);
    test_layer("layer tied probabilities, plain gates, k x input", ROUTE_TIED, 0, 1, 0.05f);
    g_layer_E = 40;
    test_layer("layer random routing with empty experts, norm, E=40 (35 problems)", ROUTE_GAPS, 1, 0, 0.1f);
    // plain gates: renormalised over the chosen experts they could divide by a sum of tiny probabilities
    test_layer("layer random routing of one FFN pair a token, plain gates, E=40 (problems of a few rows)", ROUTE_FEW, 0,
               0, 0.1f);
    g_layer_E = 6;
    // moe_grouped_gemm hands every later call to the loop when cuBLAS reports its grouped GEMM
    // unsupported for these types: the cases above then checked the loop, not the grouped call
    test_checkf(moe_gemm_backend == MOE_GEMM_CUBLAS, "cublas: every grouped GEMM ran as cublasGemmGroupedBatchedEx",
                "cuBLAS reported it unsupported for %s (moe_gemm_backend %d)", FLOATX_NAME, moe_gemm_backend);
    moe_gemm_backend = MOE_GEMM_LOOP;  // the fallback: one cublasGemmEx per expert, the same checks
    test_layer("layer forced routing, per-expert GEMM loop", ROUTE_FORCED, 1, 1, 0.05f);
    test_layer("layer random routing, per-expert GEMM loop", ROUTE_RANDOM, 0, 0, 0.0f);
    moe_gemm_backend = MOE_GEMM_CUBLAS;
    g_expert_shift = 1;  // W1, W2 off 16 bytes: moe_grouped_gemm takes its per-expert loop
    test_layer("layer random routing, norm, W1 and W2 off 16 bytes", ROUTE_RANDOM, 1, 0, 0.1f);
    g_expert_shift = 0;
    g_act_shift = 1;  // the row kernels' one-element path
    test_layer("layer random routing, norm, k x input, input and gradients off 16 bytes", ROUTE_RANDOM, 1, 1, 0.1f);
    g_act_shift = 0;
    g_recompute_xg = 1;
    test_layer("layer random routing, norm, k x input, inputs gathered again in the backward", ROUTE_RANDOM, 1, 1, 0.1f);
    g_recompute_xg = 0;
    g_layer_C = 392, g_layer_Ie = 200;
    test_layer("layer random routing, norm, C=392 I_e=200", ROUTE_RANDOM, 1, 0, 0.1f);
    g_layer_C = 64, g_layer_Ie = 32;
#ifdef HAVE_CUTLASS_GROUPED_GEMM
    moe_gemm_backend = MOE_GEMM_CUTLASS;
    moe_gemm_fallbacks = 0;
    moe_gemm_token_reads = 1;  // (the default) these cases run with it, then without
    test_layer("cutlass: layer forced routing, norm, k x input, balance loss", ROUTE_FORCED, 1, 1, 0.05f);
    test_layer("cutlass: layer random routing, plain gates, no balance loss", ROUTE_RANDOM, 0, 0, 0.0f);
    test_layer("cutlass: layer random routing, norm, strong balance loss", ROUTE_RANDOM, 1, 0, 2000.0f);
    test_layer("cutlass: layer tied probabilities, plain gates, k x input", ROUTE_TIED, 0, 1, 0.05f);
    g_layer_C = 392, g_layer_Ie = 200;
    test_layer("cutlass: layer random routing, norm, C=392 I_e=200", ROUTE_RANDOM, 1, 0, 0.1f);
    g_layer_C = 64, g_layer_Ie = 32;
    g_layer_E = 40;
    test_layer("cutlass: layer random routing with empty experts, norm, E=40 (35 problems)", ROUTE_GAPS, 1, 0, 0.1f);
    test_layer("cutlass: layer random routing of one FFN pair a token, plain gates, E=40 (problems of a few rows)",
               ROUTE_FEW, 0, 0, 0.1f);
    g_layer_E = 6;
    // the persistent kernels on two CTAs: each walks many work tiles and problems, so the state
    // the producers carry from tile to tile and problem to problem (token reads included) runs
    moe_cutlass_sm_limit = 2;
    g_layer_E = 40;
    test_layer("cutlass, 2 CTAs: layer random routing with empty experts, norm, E=40 (35 problems)", ROUTE_GAPS, 1, 0,
               0.1f);
    g_layer_E = 6;
    g_layer_C = 392, g_layer_Ie = 200;
    test_layer("cutlass, 2 CTAs: layer random routing, norm, k x input, C=392 I_e=200", ROUTE_RANDOM, 1, 1, 0.1f);
    g_layer_C = 64, g_layer_Ie = 32;
    moe_cutlass_sm_limit = 0;
    test_checkf(moe_gemm_fallbacks == 0, "cutlass: every grouped GEMM ran on CUTLASS (none handed to the loop)",
                "%d handed to the loop", moe_gemm_fallbacks);
    // the token reads: the cases above with s = 1 read x and dy inside the GEMMs (four grouped GEMMs
    // a layer), those with the k x input dy only (two); the rest of their GEMMs read gathered copies
    test_checkf(moe_gemm_token_read_calls > 0, "cutlass: the grouped GEMMs read tokens through the schedule",
                "%d grouped GEMMs with token reads", moe_gemm_token_read_calls);
    g_expert_shift = 1;  // off 16 bytes: the loop, whatever the backend (and no token reads)
    test_layer("cutlass: layer random routing, norm, W1 and W2 off 16 bytes", ROUTE_RANDOM, 1, 0, 0.1f);
    g_expert_shift = 0;
    g_act_shift = 1;  // x and dy off 16 bytes: CUTLASS's GEMMs over gathered copies
    test_layer("cutlass: layer random routing, norm, input and gradients off 16 bytes", ROUTE_RANDOM, 1, 0, 0.1f);
    g_act_shift = 0;
    moe_gemm_backend = MOE_GEMM_CUBLAS;
    moe_gemm_token_reads = 0;
#endif
    // last: their draws from g_rng leave the cases above their data
    test_row_kernels_vectors();
    test_ffn_dgate_dfch(296);
    test_ffn_dgate_dfch(2200);
    matmul_free();
    return test_end();
}
