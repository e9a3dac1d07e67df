/*
test_matmul.cu - llmc/matmul.cuh against CPU (double) loops, then a TFLOP/s benchmark.

Checks, per case (random data, outputs NaN-poisoned before every run):
- matmul_forward (with and without bias) and matmul_forward_gelu: pre-activation vs CPU, GELU
  output vs the CPU tanh GELU of the CPU pre-activation, and (tight) vs the tanh GELU of the
  GPU's own pre-activation, which tells whether cuBLASLt's epilogue is the tanh GELU
- matmul_backward: dinp overwrite and += paths, dweight += and dbias += (accumulators start
  at random values scaled like the update, so both the old value and the update matter)
- every output computed twice from identical state is bitwise identical
- more distinct problems than the algorithm cache holds: no exit, and a problem evicted and
  chosen again gives the same bits as its first run
- matmul_backward_gelu (the DGELU epilogue and its fallback) against dpre = (dout @ W) GELU'(pre)
Benchmark (bf16 builds only): GPT-2 124M shapes at B*T = 8192; the 15 GEMMs of the d12 B=32
step at B*T = 32768 with the heuristic's other candidates; fcproj's backward with and without
the DGELU epilogue.
*/
#include "../../llmc/test_harness.h"
#include "../../llmc/matmul.cuh"
#include "step_gemms.h"

// out (BT, OC) = inp (BT, C) W^T (+ bias)
static void cpu_matmul_forward(double* out, const float* inp, const float* w, const float* bias, int BT, int C, int OC) {
    for (int t = 0; t < BT; t++) {
        for (int o = 0; o < OC; o++) {
            double acc = bias ? bias[o] : 0.0;
            const float* x = inp + (size_t)t * C;
            const float* wr = w + (size_t)o * C;
            for (int c = 0; c < C; c++) { acc += (double)x[c] * wr[c]; }
            out[(size_t)t * OC + o] = acc;
        }
    }
}

static void cpu_matmul_backward(double* dinp, double* dweight, double* dbias, const float* dout, const float* inp,
                                const float* w, int BT, int C, int OC) {
    for (int t = 0; t < BT; t++) {
        double* dx = dinp + (size_t)t * C;
        for (int c = 0; c < C; c++) { dx[c] = 0.0; }
        for (int o = 0; o < OC; o++) {
            double d = dout[(size_t)t * OC + o];
            const float* wr = w + (size_t)o * C;
            for (int c = 0; c < C; c++) { dx[c] += d * wr[c]; }
        }
    }
    for (int o = 0; o < OC; o++) {
        double* dw = dweight + (size_t)o * C;
        for (int c = 0; c < C; c++) { dw[c] = 0.0; }
        double db = 0.0;
        for (int t = 0; t < BT; t++) {
            double d = dout[(size_t)t * OC + o];
            db += d;
            const float* x = inp + (size_t)t * C;
            for (int c = 0; c < C; c++) { dw[c] += d * x[c]; }
        }
        dbias[o] = db;
    }
}

// host values old[i] = random * scale, uploaded rounded; returns old (rounded) values
static float* random_accumulator(floatX* device, size_t n, double scale, Rng* rng) {
    float* old = host_alloc(n);
    fill_uniform(old, n, -(float)scale, (float)scale, rng);
    upload_rounded(device, old, n);
    return old;
}

static void run_case(int BT, int C, int OC, int use_bias, int use_gelu, Rng* rng) {
    printf("case BT=%d C_in=%d C_out=%d bias=%d gelu=%d\n", BT, C, OC, use_bias, use_gelu);
    size_t n_inp = (size_t)BT * C, n_w = (size_t)OC * C, n_out = (size_t)BT * OC;
    float* inp = host_alloc(n_inp);
    float* w = host_alloc(n_w);
    float* bias = host_alloc(OC);
    float* dout = host_alloc(n_out);
    fill_uniform(inp, n_inp, -1.0f, 1.0f, rng);
    // GELU cases: weights 3x larger so pre-activations reach |x| ~ 3 (GELU's curved region)
    float w_scale = (use_gelu ? 3.0f : 1.0f) / sqrtf((float)C);
    fill_uniform(w, n_w, -w_scale, w_scale, rng);
    fill_uniform(bias, OC, -0.5f, 0.5f, rng);
    fill_uniform(dout, n_out, -1.0f, 1.0f, rng);

    floatX* d_inp = device_alloc<floatX>(n_inp, "inp");
    floatX* d_w = device_alloc<floatX>(n_w, "weight");
    floatX* d_bias = device_alloc<floatX>(OC, "bias");
    floatX* d_out = device_alloc<floatX>(n_out, "out");
    floatX* d_pre = device_alloc<floatX>(n_out, "pre_gelu");
    floatX* d_out2 = device_alloc<floatX>(n_out, "out (second run)");
    floatX* d_pre2 = device_alloc<floatX>(n_out, "pre_gelu (second run)");
    floatX* d_dout = device_alloc<floatX>(n_out, "dout");
    floatX* d_dinp = device_alloc<floatX>(n_inp, "dinp");
    floatX* d_dinp2 = device_alloc<floatX>(n_inp, "dinp (second run)");
    floatX* d_dw = device_alloc<floatX>(n_w, "dweight");
    floatX* d_dw2 = device_alloc<floatX>(n_w, "dweight (second run)");
    floatX* d_db = device_alloc<floatX>(OC, "dbias");
    floatX* d_db2 = device_alloc<floatX>(OC, "dbias (second run)");
    float* d_scratch = (float*)cuda_malloc_or_die(matmul_backward_scratch_bytes(BT, OC), "dbias scratch");
    upload_rounded(d_inp, inp, n_inp);
    upload_rounded(d_w, w, n_w);
    upload_rounded(d_bias, bias, OC);
    upload_rounded(d_dout, dout, n_out);
    const floatX* bias_arg = use_bias ? d_bias : NULL;

    // ---- forward
    double* ref_pre = ref_alloc(n_out);
    cpu_matmul_forward(ref_pre, inp, w, use_bias ? bias : NULL, BT, C, OC);
    for (int run = 0; run < 2; run++) {
        floatX* out = run == 0 ? d_out : d_out2;
        floatX* pre = run == 0 ? d_pre : d_pre2;
        poison(out, n_out * sizeof(floatX));
        poison(pre, n_out * sizeof(floatX));
        if (use_gelu) {
            matmul_forward_gelu(out, pre, d_inp, d_w, bias_arg, BT, C, OC, 0);
        } else {
            matmul_forward(out, d_inp, d_w, bias_arg, BT, C, OC, 0);
        }
        cudaCheck(cudaDeviceSynchronize());
    }
    float* got_out = download_floatX_alloc(d_out, n_out);
    if (use_gelu) {
        float* got_pre = download_floatX_alloc(d_pre, n_out);
        double* ref_gelu = ref_alloc(n_out);
        double* ref_gelu_of_gpu_pre = ref_alloc(n_out);
        double* ref_erf_gelu_of_gpu_pre = ref_alloc(n_out);
        for (size_t i = 0; i < n_out; i++) {
            ref_gelu[i] = cpu_gelu(ref_pre[i]);
            ref_gelu_of_gpu_pre[i] = cpu_gelu((double)got_pre[i]);
            ref_erf_gelu_of_gpu_pre[i] = 0.5 * got_pre[i] * (1.0 + erf(got_pre[i] / sqrt(2.0)));
        }
        int fused = matmul_gelu_last_was_fused;
        printf("  GELU path: %s\n", matmul_gelu_last_was_cutlass ? "CUTLASS epilogue (--gelu-fusion 3)"
                                     : fused ? "cuBLASLt GELU_AUX epilogue" : "GEMM + gelu_forward");
        // the epilogue may use a hardware tanh approximation (~1e-4 relative): in fp32 builds
        // its output gets 1e-3 instead of 1e-5; bf16 builds keep the bf16 tolerance
        double gelu_tol = (fused && TOL_FLOATX < 1e-3) ? 1e-3 : TOL_FLOATX;
        test_check_rel("forward pre-activation vs CPU", rel_err_f64(got_pre, ref_pre, n_out), TOL_FLOATX);
        test_check_rel("forward GELU output vs CPU tanh GELU", rel_err_f64(got_out, ref_gelu, n_out), gelu_tol);
        // the epilogue applies GELU to the fp32 accumulator while pre is rounded to floatX, so
        // in bf16 this differs by the rounding of pre (and of out)
        test_check_rel("GELU output vs tanh GELU of GPU pre-act", rel_err_f64(got_out, ref_gelu_of_gpu_pre, n_out), gelu_tol);
        double err_tanh = rel_err_f64(got_out, ref_gelu_of_gpu_pre, n_out).rel;
        double err_erf = rel_err_f64(got_out, ref_erf_gelu_of_gpu_pre, n_out).rel;
        printf("  GELU output rel. distance to tanh GELU %.3e, to erf GELU %.3e\n", err_tanh, err_erf);
#if defined(ENABLE_FP32)
        // tanh and erf GELU differ by up to ~2e-4: only visible without bf16 rounding
        test_check(err_tanh < err_erf, "GELU output is closer to the tanh GELU than to the erf GELU");
#endif
        test_check_bitwise("pre_gelu", d_pre, d_pre2, n_out * sizeof(floatX));
        free(got_pre);
        free(ref_gelu);
        free(ref_gelu_of_gpu_pre);
        free(ref_erf_gelu_of_gpu_pre);
    } else {
        test_check_rel("forward output vs CPU", rel_err_f64(got_out, ref_pre, n_out), TOL_FLOATX);
    }
    test_check_bitwise("forward output", d_out, d_out2, n_out * sizeof(floatX));
    free(got_out);
    free(ref_pre);

    // ---- backward
    double* ref_dinp = ref_alloc(n_inp);
    double* ref_dw = ref_alloc(n_w);
    double* ref_db = ref_alloc(OC);
    cpu_matmul_backward(ref_dinp, ref_dw, ref_db, dout, inp, w, BT, C, OC);
    float* old_dw = NULL;
    float* old_db = NULL;
    for (int run = 0; run < 2; run++) {
        Rng acc_rng = rng_seeded(1234);  // identical accumulator start values in both runs
        floatX* dinp = run == 0 ? d_dinp : d_dinp2;
        floatX* dw = run == 0 ? d_dw : d_dw2;
        floatX* db = run == 0 ? d_db : d_db2;
        free(old_dw);
        free(old_db);
        old_dw = random_accumulator(dw, n_w, rms(ref_dw, n_w), &acc_rng);
        old_db = random_accumulator(db, OC, rms(ref_db, OC), &acc_rng);
        poison(dinp, n_inp * sizeof(floatX));
        matmul_backward(dinp, dw, use_bias ? db : NULL, d_dout, d_inp, d_w, BT, C, OC, 0, 0, d_scratch);
        cudaCheck(cudaDeviceSynchronize());
    }
    float* got_dinp = download_floatX_alloc(d_dinp, n_inp);
    float* got_dw = download_floatX_alloc(d_dw, n_w);
    float* got_db = download_floatX_alloc(d_db, OC);
    test_check_rel("backward dinp (overwrite) vs CPU", rel_err_f64(got_dinp, ref_dinp, n_inp), TOL_FLOATX);
    double* ref_dw_total = ref_alloc(n_w);
    for (size_t i = 0; i < n_w; i++) { ref_dw_total[i] = old_dw[i] + ref_dw[i]; }
    test_check_rel("backward dweight (+=) vs CPU", rel_err_f64(got_dw, ref_dw_total, n_w), TOL_FLOATX);
    if (use_bias) {
        double* ref_db_total = ref_alloc(OC);
        for (int i = 0; i < OC; i++) { ref_db_total[i] = old_db[i] + ref_db[i]; }
        test_check_rel("backward dbias (+=) vs CPU", rel_err_f64(got_db, ref_db_total, OC), TOL_FLOATX);
        test_check_bitwise("dbias", d_db, d_db2, OC * sizeof(floatX));
        free(ref_db_total);
    }
    test_check_bitwise("dinp", d_dinp, d_dinp2, n_inp * sizeof(floatX));
    test_check_bitwise("dweight", d_dw, d_dw2, n_w * sizeof(floatX));

    if (use_gelu && use_bias) {
        // the launchers must be capturable in a CUDA graph (no host syncs or allocations
        // inside): capture forward + backward on a stream, replay, compare with the eager run
        cudaStream_t stream;
        cudaGraph_t graph;
        cudaGraphExec_t graph_exec;
        cudaCheck(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
        upload_floatX(d_dw2, old_dw, n_w);
        upload_floatX(d_db2, old_db, OC);
        cudaCheck(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
        cudaCheck(cudaMemsetAsync(d_out2, 0xFF, n_out * sizeof(floatX), stream));
        cudaCheck(cudaMemsetAsync(d_pre2, 0xFF, n_out * sizeof(floatX), stream));
        cudaCheck(cudaMemsetAsync(d_dinp2, 0xFF, n_inp * sizeof(floatX), stream));
        matmul_forward_gelu(d_out2, d_pre2, d_inp, d_w, bias_arg, BT, C, OC, stream);
        matmul_backward(d_dinp2, d_dw2, d_db2, d_dout, d_inp, d_w, BT, C, OC, 0, stream, d_scratch);
        cudaCheck(cudaStreamEndCapture(stream, &graph));
        cudaCheck(cudaGraphInstantiate(&graph_exec, graph, 0));
        cudaCheck(cudaGraphLaunch(graph_exec, stream));
        cudaCheck(cudaStreamSynchronize(stream));
        int same = device_bitwise_equal(d_out, d_out2, n_out * sizeof(floatX)) &&
                   device_bitwise_equal(d_pre, d_pre2, n_out * sizeof(floatX)) &&
                   device_bitwise_equal(d_dinp, d_dinp2, n_inp * sizeof(floatX)) &&
                   device_bitwise_equal(d_dw, d_dw2, n_w * sizeof(floatX)) &&
                   device_bitwise_equal(d_db, d_db2, OC * sizeof(floatX));
        test_check(same, "CUDA graph capture + replay == eager run (bitwise, fwd + bwd)");
        cudaCheck(cudaGraphExecDestroy(graph_exec));
        cudaCheck(cudaGraphDestroy(graph));
        cudaCheck(cudaStreamDestroy(stream));
    }

    // dinp += path (dweight keeps accumulating; not checked again)
    Rng acc_rng = rng_seeded(777);
    float* old_dinp = random_accumulator(d_dinp, n_inp, rms(ref_dinp, n_inp), &acc_rng);
    matmul_backward(d_dinp, d_dw, NULL, d_dout, d_inp, d_w, BT, C, OC, 1, 0, NULL);
    cudaCheck(cudaDeviceSynchronize());
    download_floatX(got_dinp, d_dinp, n_inp);
    for (size_t i = 0; i < n_inp; i++) { ref_dinp[i] += old_dinp[i]; }
    test_check_rel("backward dinp (+=) vs CPU", rel_err_f64(got_dinp, ref_dinp, n_inp), TOL_FLOATX);

    free(old_dinp); free(old_dw); free(old_db);
    free(got_dinp); free(got_dw); free(got_db);
    free(ref_dinp); free(ref_dw); free(ref_db); free(ref_dw_total);
    free(inp); free(w); free(bias); free(dout);
    floatX* to_free[] = {d_inp, d_w, d_bias, d_out, d_pre, d_out2, d_pre2, d_dout, d_dinp, d_dinp2, d_dw, d_dw2, d_db, d_db2};
    for (size_t i = 0; i < sizeof(to_free) / sizeof(to_free[0]); i++) { cudaCheck(cudaFree(to_free[i])); }
    cudaCheck(cudaFree(d_scratch));
}

// matmul_backward_gelu: the input gradient of a layer whose input was GELU(pre) (GPT-2's fcproj),
// with the GELU backward in cuBLASLt's DGELU epilogue and in the fallback (GEMM + gelu_backward),
// each against dpre = (dout @ W) * GELU'(pre) in double; bitwise across two runs
static void run_dgelu_case(int BT, int C, int OC, Rng* rng) {
    printf("dgelu case BT=%d C_in=%d C_out=%d\n", BT, C, OC);
    size_t n_in = (size_t)BT * C, n_w = (size_t)OC * C, n_out = (size_t)BT * OC;
    float* pre = host_alloc(n_in);
    float* inp = host_alloc(n_in);
    float* w = host_alloc(n_w);
    float* dout = host_alloc(n_out);
    double *ref = ref_alloc(n_in), *ref_dinp = ref_alloc(n_in);  // dpre, and d(inp) before GELU'
    double *ref_dw = ref_alloc(n_w), *ref_db = ref_alloc(OC);       // unused
    fill_uniform(pre, n_in, -3.0f, 3.0f, rng);  // GELU's curved region
    fill_uniform(w, n_w, -1.0f / sqrtf((float)C), 1.0f / sqrtf((float)C), rng);
    fill_uniform(dout, n_out, -1.0f, 1.0f, rng);
    // one allocation: pre, inp, dpre of two runs, weight, dweight, dout
    floatX* d_pre = device_alloc<floatX>(4 * n_in + 2 * n_w + n_out, "dgelu case");
    floatX *d_inp = d_pre + n_in, *d_dpre = d_inp + n_in, *d_dpre2 = d_dpre + n_in;
    floatX *d_w = d_dpre2 + n_in, *d_dw = d_w + n_w, *d_dout = d_dw + n_w;
    upload_rounded(d_pre, pre, n_in);  // pre now holds the rounded values
    for (size_t i = 0; i < n_in; i++) { inp[i] = (float)cpu_gelu(pre[i]); }
    upload_rounded(d_inp, inp, n_in);
    upload_rounded(d_w, w, n_w);
    upload_rounded(d_dout, dout, n_out);
    cpu_matmul_backward(ref_dinp, ref_dw, ref_db, dout, inp, w, BT, C, OC);
    for (size_t i = 0; i < n_in; i++) { ref[i] = ref_dinp[i] * cpu_gelu_grad(pre[i]); }
    const int saved = matmul_dgelu_fused;
    // (with matmul_gelu_cutlass both settings take CUTLASS's epilogue: one pass)
    const int last = matmul_gelu_cutlass ? 1 : 0;
    for (int fused = 1; fused >= last; fused--) {
        matmul_dgelu_fused = fused;
        matmul_algo_cache_clear();
        for (int run = 0; run < 2; run++) {
            floatX* dpre = run == 0 ? d_dpre : d_dpre2;
            poison(dpre, n_in * sizeof(floatX));
            matmul_backward_gelu(dpre, d_dw, NULL, d_dout, d_inp, d_w, d_pre, BT, C, OC, 0, NULL);
            cudaCheck(cudaDeviceSynchronize());
        }
        const char* path = matmul_gelu_last_was_cutlass ? "CUTLASS dGELU epilogue"
                           : matmul_dgelu_last_was_fused ? "DGELU epilogue" : "GEMM + gelu_backward";
        printf("  path: %s%s\n", path, fused && !matmul_dgelu_last_was_fused ? " (cuBLASLt has no DGELU algorithm here)" : "");
        float* got = download_floatX_alloc(d_dpre, n_in);
        char name[128];
        // like the forward epilogue, DGELU may use an approximate tanh: 1e-3 in fp32 builds
        double tol = (matmul_dgelu_last_was_fused && TOL_FLOATX < 1e-3) ? 1e-3 : TOL_FLOATX;
        snprintf(name, sizeof(name), "dpre vs CPU (%s)", path);
        test_check_rel(name, rel_err_f64(got, ref, n_in), tol);
#if defined(ENABLE_FP32)
        // the tanh GELU's derivative, not the erf GELU's (6e-4 apart in relative L2 here, under the fused
        // path's 1e-3 tolerance: this check tells them apart; only visible in fp32)
        double* ref_erf = ref_alloc(n_in);
        for (size_t i = 0; i < n_in; i++) {
            double x = pre[i], erf_grad = 0.5 * (1.0 + erf(x / sqrt(2.0))) + x * exp(-0.5 * x * x) / sqrt(2.0 * M_PI);
            ref_erf[i] = ref_dinp[i] * erf_grad;
        }
        snprintf(name, sizeof(name), "dpre closer to the tanh GELU' than to the erf GELU' (%s)", path);
        test_check(rel_err_f64(got, ref, n_in).rel < rel_err_f64(got, ref_erf, n_in).rel, name);
        free(ref_erf);
#endif
        snprintf(name, sizeof(name), "dpre (%s)", path);
        test_check_bitwise(name, d_dpre, d_dpre2, n_in * sizeof(floatX));
        free(got);
    }
    matmul_dgelu_fused = saved;
    matmul_algo_cache_clear();
    free(pre); free(inp); free(w); free(dout); free(ref); free(ref_dinp); free(ref_dw); free(ref_db);
    cudaCheck(cudaFree(d_pre));
}

// the launchers run_tune_case compares: outs = out, pre, dinp, dw, db, dinp (+=), dpre (DGELU)
static void run_tune_launchers(floatX* const* outs, const floatX* in, const floatX* w, const floatX* bias,
                               const floatX* dout, int BT, int C, int OC, float* scratch) {
    matmul_forward_gelu(outs[0], outs[1], in, w, bias, BT, C, OC, 0);
    matmul_backward(outs[2], outs[3], outs[4], dout, in, w, BT, C, OC, 0, 0, scratch);
    matmul_backward(outs[5], NULL, NULL, dout, in, w, BT, C, OC, 1, 0, NULL);
    matmul_dgelu_fused = 1;
    matmul_backward_gelu(outs[6], NULL, NULL, dout, in, w, in, BT, C, OC, 0, NULL);
    matmul_dgelu_fused = 0;
    cudaCheck(cudaDeviceSynchronize());
}

// --matmul-tune 1 (matmul_tune): every launcher's results bitwise those of the heuristic's first
// candidate - forward with the GELU epilogue (D and aux), backward with dweight/dbias +=, dinp +=,
// the DGELU backward - from the same accumulator start values; one accumulation, not one per
// timed candidate. Then the tuned choices (cached) on other operands, as the trainer's later steps
// run them: a candidate that only matched on the operands it was timed on shows there. A product
// of zeros is not tuned (all orders give zeros).
static void run_tune_case(int BT, int C, int OC) {
    const size_t n_inp = (size_t)BT * C, n_w = (size_t)OC * C, n_out = (size_t)BT * OC;
    floatX* in = device_alloc<floatX>(n_inp, "tune inp");
    floatX* w = device_alloc<floatX>(n_w, "tune w");
    floatX* bias = device_alloc<floatX>(OC, "tune bias");
    floatX* dout = device_alloc<floatX>(n_out, "tune dout");
    float* scratch = device_alloc<float>(matmul_backward_scratch_bytes(BT, OC) / sizeof(float) + 1, "tune scratch");
    floatX* outs[2][7];  // per run: out, pre, dinp, dw, db, dinp (+=), dpre (DGELU)
    const size_t sizes[7] = {n_out, n_out, n_inp, n_w, (size_t)OC, n_inp, n_inp};
    const char* names[7] = {"forward output", "forward pre-activation (aux)", "dinp", "dweight (+=)", "dbias (+=)",
                            "dinp (+=)", "dpre (DGELU epilogue)"};
    for (int run = 0; run < 2; run++) for (int i = 0; i < 7; i++) outs[run][i] = device_alloc<floatX>(sizes[i], "tune out");
    char name[160];
    const int count_before = matmul_tune_count;
    // phase 0: the operands the problems are timed on (untuned run, then tuned); phase 1: new
    // operands, tuned from the cache (nothing timed), then untuned from a cleared cache
    for (int phase = 0; phase < 2; phase++) {
        fill_random_device(in, n_inp, 31 + 10 * phase, 1.0f);
        fill_random_device(w, n_w, 32 + 10 * phase, 0.05f);
        fill_random_device(bias, OC, 33 + 10 * phase, 0.1f);
        fill_random_device(dout, n_out, 34 + 10 * phase, 0.01f);
        const int order[2][2] = {{0, 1}, {1, 0}};  // the matmul_tune of each run, in turn
        for (int j = 0; j < 2; j++) {
            const int run = order[phase][j];
            if (phase == 0 || run == 0) matmul_algo_cache_clear();
            matmul_tune = run;
            for (int i = 0; i < 7; i++) fill_random_device(outs[run][i], sizes[i], 40 + i + 10 * phase, 0.5f);
            const int count_at = matmul_tune_count;
            run_tune_launchers(outs[run], in, w, bias, dout, BT, C, OC, scratch);
            if (phase == 1 && run == 1) {
                snprintf(name, sizeof(name), "--matmul-tune 1, BT=%d: cached choices, nothing timed again", BT);
                test_check(matmul_tune_count == count_at, name);
            }
        }
        for (int i = 0; i < 7; i++) {
            snprintf(name, sizeof(name), "--matmul-tune 1 == 0 (bitwise), BT=%d C=%d OC=%d, %s operands: %s", BT, C, OC,
                     phase == 0 ? "timing" : "later", names[i]);
            test_check(device_bitwise_equal(outs[0][i], outs[1][i], sizes[i] * sizeof(floatX)), name);
        }
    }
    // 5 problems (the forward, dinp under beta 0 and 1, dweight, DGELU); one whose heuristic offers
    // a single candidate is not timed, but the 3 plain ones offer several at these sizes
    printf("  tuned problems in this case: %d, %d so far on another candidate than the first\n",
           matmul_tune_count - count_before, matmul_tune_moved);
    snprintf(name, sizeof(name), "--matmul-tune 1 timed this case's problems (BT=%d)", BT);
    test_check(matmul_tune_count - count_before >= 3 && matmul_tune_count - count_before <= 5, name);
    // zeros in, zeros out: every candidate agrees, so the first is kept (not counted as moved)
    int moved_before = matmul_tune_moved, count_zero = matmul_tune_count;
    cudaCheck(cudaMemset(in, 0, n_inp * sizeof(floatX)));
    matmul_algo_cache_clear();
    matmul_tune = 1;
    matmul_forward(outs[1][0], in, w, NULL, BT, C, OC, 0);
    cudaCheck(cudaDeviceSynchronize());
    test_check(matmul_tune_count == count_zero + 1 && matmul_tune_moved == moved_before,
               "--matmul-tune 1: a product of zeros keeps the first candidate");
    matmul_tune = 0;
    matmul_algo_cache_clear();
    for (int run = 0; run < 2; run++) for (int i = 0; i < 7; i++) cudaCheck(cudaFree(outs[run][i]));
    floatX* bufs[] = {in, w, bias, dout};
    for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++) { cudaCheck(cudaFree(bufs[i])); }
    cudaCheck(cudaFree(scratch));
}

#ifdef HAVE_CUTLASS_GELU_GEMM
// --gelu-fusion 3: the GELU GEMMs with CUTLASS's epilogues, each kernel, through the same checks
// as the cuBLASLt paths (CPU reference, tanh GELU, reruns bitwise), and that CUTLASS ran them
static void run_cutlass_gelu_cases(Rng* rng) {
    matmul_gelu_cutlass = 1;
    for (int kernel = 0; kernel < 2; kernel++) {
        matmul_cutlass_gelu_kernel = kernel;
        printf("CUTLASS GELU GEMMs: %s\n", matmul_cutlass_gelu_config(kernel));
        const int shapes[3][3] = {{256, 768, 3072}, {200, 264, 136}, {1000, 64, 520}};  // (BT, C_in, C_out)
        for (int i = 0; i < 3; i++) {
            run_case(shapes[i][0], shapes[i][1], shapes[i][2], 1, 1, rng);
            test_check(matmul_gelu_last_was_cutlass, "forward GELU GEMM ran with CUTLASS's epilogue");
            run_dgelu_case(shapes[i][0], shapes[i][2], shapes[i][1], rng);
            test_check(matmul_gelu_last_was_cutlass, "DGELU GEMM ran with CUTLASS's epilogue");
        }
        run_case(128, 512, 1024, 0, 1, rng);  // no bias
        test_check(matmul_gelu_last_was_cutlass, "forward GELU GEMM without bias ran with CUTLASS's epilogue");
    }
    matmul_cutlass_gelu_kernel = 1;
    matmul_gelu_cutlass = 0;
}
#endif

int main(void) {
    cudaCheck(cudaSetDevice(0));
    test_begin("test_matmul" TEST_FLOATX_SUFFIX);
    matmul_init();
    Rng rng = rng_seeded(42);
    printf("test_matmul (%s)\n", FLOATX_NAME);
    run_case(256, 768, 3072, 1, 1, &rng);   // fc with GELU epilogue
    run_case(256, 3072, 768, 1, 0, &rng);   // fc projection
    run_case(256, 768, 2304, 0, 0, &rng);   // qkv-like, no bias
    run_case(200, 264, 136, 1, 1, &rng);    // odd sizes (row count not a multiple of the dbias block)
    matmul_gelu_fused = 0;                  // the GEMM + gelu_forward fallback path
    run_case(128, 512, 1024, 1, 1, &rng);
    matmul_gelu_fused = 1;
    run_dgelu_case(256, 3072, 768, &rng);   // fcproj: its input was GELU(fc's output)
    run_dgelu_case(200, 264, 136, &rng);    // odd sizes
    run_tune_case(4096, 768, 3072);          // --matmul-tune 1 at step-like shapes
    run_tune_case(200, 264, 136);
#ifdef HAVE_CUTLASS_GELU_GEMM
    run_cutlass_gelu_cases(&rng);
#endif

    // more problems than MATMUL_ALGO_CACHE_CAPACITY: slots are reused, the results must not change
    {
        const int C = 64, OC = 64, max_rows = MATMUL_ALGO_CACHE_CAPACITY + 40;
        floatX* inp = device_alloc<floatX>((size_t)max_rows * C, "cache inp");
        floatX* w = device_alloc<floatX>((size_t)OC * C, "cache weight");
        floatX* out = device_alloc<floatX>((size_t)max_rows * OC, "cache out");
        floatX* first = device_alloc<floatX>((size_t)8 * OC, "cache first");
        fill_random_device(inp, (size_t)max_rows * C, 11, 1.0f);
        fill_random_device(w, (size_t)OC * C, 12, 0.1f);
        matmul_forward(out, inp, w, NULL, 8, C, OC, 0);
        cudaCheck(cudaMemcpy(first, out, (size_t)8 * OC * sizeof(floatX), cudaMemcpyDeviceToDevice));
        for (int rows = 9; rows <= max_rows; rows++) { matmul_forward(out, inp, w, NULL, rows, C, OC, 0); }
        matmul_forward(out, inp, w, NULL, 8, C, OC, 0);  // its slot was reused by now: chosen again
        cudaCheck(cudaDeviceSynchronize());
        test_check(device_bitwise_equal(out, first, (size_t)8 * OC * sizeof(floatX)), "cache overflow: evicted problem chosen again, bitwise same");
        floatX* bufs[] = {inp, w, out, first};
        for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++) { cudaCheck(cudaFree(bufs[i])); }
    }

    char perf[512] = "benchmarks only in bf16 builds";
#if !defined(ENABLE_FP32)
    {
        const int BT = 8192;
        const int C = 768, Vp = 50304;
        floatX* inp = device_alloc<floatX>((size_t)BT * 3072, "bench inp");
        floatX* w = device_alloc<floatX>((size_t)Vp * C, "bench weight");
        floatX* bias = device_alloc<floatX>(3072, "bench bias");
        floatX* out = device_alloc<floatX>((size_t)BT * Vp, "bench out");
        floatX* pre = device_alloc<floatX>((size_t)BT * 3072, "bench pre");
        floatX* dout = device_alloc<floatX>((size_t)BT * Vp, "bench dout");
        floatX* dinp = device_alloc<floatX>((size_t)BT * 3072, "bench dinp");
        floatX* dw = device_alloc<floatX>((size_t)Vp * C, "bench dweight");
        floatX* db = device_alloc<floatX>(3072, "bench dbias");
        float* scratch = (float*)cuda_malloc_or_die(matmul_backward_scratch_bytes(BT, 3072), "bench scratch");
        fill_random_device(inp, (size_t)BT * 3072, 1, 1.0f);
        fill_random_device(w, (size_t)Vp * C, 2, 0.03f);
        fill_random_device(bias, 3072, 3, 0.1f);
        fill_random_device(dout, (size_t)BT * Vp, 4, 1e-3f);
        fill_random_device(dw, (size_t)Vp * C, 5, 1e-3f);
        fill_random_device(db, 3072, 6, 1e-3f);
        printf("benchmark B*T=%d (median of 50 after 10 warm-up)\n", BT);
        float ms;
        ms = bench_median_ms([&] { matmul_forward(out, inp, w, bias, BT, C, 3 * C, 0); }, 10, 50);
        report_flops("fwd qkv 768->2304 +bias", ms, 2.0 * BT * C * 3 * C);
        ms = bench_median_ms([&] { matmul_forward_gelu(out, pre, inp, w, bias, BT, C, 4 * C, 0); }, 10, 50);
        double frac_fc = report_flops(matmul_gelu_last_was_fused ? "fwd fc 768->3072 +bias +GELU(fused)"
                                                                 : "fwd fc 768->3072 +bias +GELU(separate)",
                                      ms, 2.0 * BT * C * 4 * C);
        ms = bench_median_ms([&] { matmul_forward(out, inp, w, bias, BT, 4 * C, C, 0); }, 10, 50);
        report_flops("fwd fcproj 3072->768 +bias", ms, 2.0 * BT * C * 4 * C);
        ms = bench_median_ms([&] { matmul_forward(out, inp, w, NULL, BT, C, Vp, 0); }, 10, 50);
        double frac_lm = report_flops("fwd lm head 768->50304", ms, 2.0 * BT * C * Vp);
        ms = bench_median_ms([&] { matmul_backward(dinp, dw, db, dout, inp, w, BT, C, 4 * C, 0, 0, scratch); }, 10, 50);
        double frac_bwd = report_flops("bwd fc 768->3072 (dinp,dW,db)", ms, 4.0 * BT * C * 4 * C);
        ms = bench_median_ms([&] { matmul_backward(dinp, dw, NULL, dout, inp, w, BT, C, Vp, 0, 0, NULL); }, 10, 50);
        report_flops("bwd lm head 768->50304 (dinp,dW)", ms, 4.0 * BT * C * Vp);
        snprintf(perf, sizeof(perf), "fc+gelu fwd %.0f%%, lm head fwd %.0f%%, fc bwd %.0f%% of %g TFLOP/s",
                 100 * frac_fc, 100 * frac_lm, 100 * frac_bwd, test_peak_bf16_flops() / 1e12);
        floatX* bufs[] = {inp, w, bias, out, pre, dout, dinp, dw, db};
        for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++) { cudaCheck(cudaFree(bufs[i])); }
        cudaCheck(cudaFree(scratch));
    }
#ifdef HAVE_CUTLASS_GELU_GEMM
    // --gelu-fusion 3 against 2 at the d12 B=32 T=1024 step's GELU GEMMs: fc's forward with the
    // GELU (768 -> 3072, bias) and fcproj's input gradient with the GELU backward (3072 <- 768)
    {
        const int BT = 32768, C = 768, H = 3072;
        floatX* inp = device_alloc<floatX>((size_t)BT * H, "gelu bench inp");
        floatX* w = device_alloc<floatX>((size_t)H * C, "gelu bench weight");
        floatX* bias = device_alloc<floatX>(H, "gelu bench bias");
        floatX* out = device_alloc<floatX>((size_t)BT * H, "gelu bench out");
        floatX* pre = device_alloc<floatX>((size_t)BT * H, "gelu bench pre");
        floatX* dout = device_alloc<floatX>((size_t)BT * C, "gelu bench dout");
        fill_random_device(inp, (size_t)BT * H, 21, 1.0f);
        fill_random_device(w, (size_t)H * C, 22, 0.03f);
        fill_random_device(bias, H, 23, 0.1f);
        fill_random_device(pre, (size_t)BT * H, 24, 1.0f);
        fill_random_device(dout, (size_t)BT * C, 25, 1.0f);
        const double flops = 2.0 * BT * C * H;
        printf("GELU GEMMs at B*T=%d: cuBLASLt's epilogues (--gelu-fusion 2) against CUTLASS's (3), median of 50\n", BT);
        for (int variant = -1; variant < 2; variant++) {  // -1: cuBLASLt
            matmul_gelu_cutlass = variant >= 0;
            matmul_cutlass_gelu_kernel = variant >= 0 ? variant : 1;
            matmul_dgelu_fused = 1;
            char name[160];
            const char* who = variant < 0 ? "cuBLASLt" : matmul_cutlass_gelu_config(variant);
            float ms = bench_median_ms([&] { matmul_forward_gelu(out, pre, inp, w, bias, BT, C, H, 0); }, 10, 50);
            snprintf(name, sizeof(name), "fwd fc 768->3072 +bias +GELU, %s%s", who,
                     variant >= 0 && !matmul_gelu_last_was_cutlass ? " (NOT RUN: fell back)" : "");
            report_flops(name, ms, flops);
            ms = bench_median_ms([&] { matmul_backward_gelu(out, NULL, NULL, dout, inp, w, pre, BT, H, C, 0, NULL); },
                                 10, 50);
            snprintf(name, sizeof(name), "bwd fcproj dinp 3072<-768 +DGELU, %s%s", who,
                     variant >= 0 && !matmul_gelu_last_was_cutlass ? " (NOT RUN: fell back)" : "");
            report_flops(name, ms, flops);
        }
        matmul_gelu_cutlass = 0;
        matmul_cutlass_gelu_kernel = 1;
        matmul_dgelu_fused = 0;
        floatX* bufs[] = {inp, w, bias, out, pre, dout};
        for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++) { cudaCheck(cudaFree(bufs[i])); }
    }
#endif
    // The GEMMs of the d12 B=32 T=1024 step one by one (issue 17: where the dense step's time
    // goes), each with the heuristic's first candidate (the trainer's choice) and its next ones:
    // time, rate, and whether a faster candidate gives the same bits (a choice that changes bits
    // would change every committed loss curve).
    {
        const int BT = STEP_GEMM_BT, C = STEP_GEMM_C, ranks = 8;
        StepGemmBuffers bufs = step_gemm_buffers_alloc();
        floatX *x = bufs.x, *w = bufs.w, *bias = bufs.bias, *y = bufs.y, *dout = bufs.dout, *dw = bufs.dw,
               *aux = bufs.aux;
        const size_t max_out = (size_t)BT * STEP_GEMM_VP;
        floatX* init = device_alloc<floatX>(max_out, "step init");
        floatX* first = device_alloc<floatX>(max_out, "step first");
        fill_random_device(init, max_out, 24, 1e-3f);
        printf("step GEMMs, B*T=%d (median of 20 after 5 warm-up; heuristic candidates 0..%d)\n", BT, ranks - 1);
        double step_ms = 0.0, best_ms = 0.0, best_same_bits_ms = 0.0, step_flops = 0.0;
        for (int g = 0; g < STEP_GEMM_COUNT; g++) {
            const StepGemm* p = &step_gemms[g];
            floatX* d = step_gemm_output(p, &bufs);
            const size_t d_count = step_gemm_output_count(p);
            const double flops = step_gemm_flops(p);
            float ms0 = 0.0f, ms_best = 1e30f, ms_best_same = 1e30f;
            int rank_best = 0, rank_best_same = 0, tried = 0;
            char candidates[512] = "";  // per candidate: ms, the heuristic's waves, same bits or not
            for (int rank = 0; rank < ranks; rank++) {
                matmul_algo_cache_clear();
                matmul_heuristic_rank = rank;
                // one call from the same starting D (the dweight GEMMs accumulate) for the bits
                cudaCheck(cudaMemcpy(d, init, d_count * sizeof(floatX), cudaMemcpyDeviceToDevice));
                if (!step_gemm_run(p, &bufs)) break;  // fewer candidates than ranks
                tried++;
                cudaCheck(cudaDeviceSynchronize());
                int same = 1;
                if (rank == 0) {
                    cudaCheck(cudaMemcpy(first, d, d_count * sizeof(floatX), cudaMemcpyDeviceToDevice));
                } else {
                    same = device_bitwise_equal(d, first, d_count * sizeof(floatX));
                }
                float ms = bench_median_ms([&] { step_gemm_run(p, &bufs); }, 5, 20);
                if (rank == 0) ms0 = ms;
                size_t used = strlen(candidates);
                snprintf(candidates + used, sizeof(candidates) - used, " #%d %.3f/%.2fw%s", rank, ms,
                         matmul_algo_cache[0].waves, same ? "" : "/diff");
                if (ms < ms_best) { ms_best = ms; rank_best = rank; }
                if (same && ms < ms_best_same) { ms_best_same = ms; rank_best_same = rank; }
            }
            matmul_heuristic_rank = 0;
            matmul_algo_cache_clear();
            report_flops(p->name, ms0, flops);
            printf("      x%-2d  best of %d candidates: #%d %.3f ms (%.3fx); best with the same bits: #%d %.3f ms\n",
                   p->per_step, tried, rank_best, ms_best, ms0 / ms_best, rank_best_same, ms_best_same);
            printf("      candidates (ms/waves, /diff = other bits):%s\n", candidates);
            step_ms += p->per_step * ms0;
            best_ms += p->per_step * ms_best;
            best_same_bits_ms += p->per_step * ms_best_same;
            step_flops += p->per_step * flops;
        }
        printf("step GEMMs: %.2f ms per step at %.1f TFLOP/s (heuristic's first); best candidates %.2f ms, "
               "best with the same bits %.2f ms\n", step_ms, step_flops / (step_ms * 1e-3) / 1e12, best_ms,
               best_same_bits_ms);
        // fcproj's backward with the GELU backward of fc's output, as the trainer runs it (dbias,
        // dinp GEMM, dweight GEMM, then gelu_backward) and with the DGELU epilogue instead
        {
            float* scratch = (float*)cuda_malloc_or_die(matmul_backward_scratch_bytes(BT, C), "step scratch");
            floatX* dbias = bias;  // C values of the 4C buffer, overwritten
            float ms_fused_path[2];
            int ran_fused = 0;
            for (int fused = 0; fused <= 1; fused++) {
                matmul_dgelu_fused = fused;
                matmul_algo_cache_clear();
                ms_fused_path[fused] = bench_median_ms([&] {
                    matmul_backward_gelu(y, dw, dbias, dout, x, w, aux, BT, 4 * C, C, 0, scratch);
                }, 5, 20);
                if (fused) ran_fused = matmul_dgelu_last_was_fused;
            }
            matmul_dgelu_fused = 0;
            matmul_algo_cache_clear();
            printf("fcproj backward + GELU backward: GEMMs then gelu_backward %.3f ms, %s %.3f ms (%.3fx); "
                   "x12 per step: %.2f ms less\n", ms_fused_path[0], ran_fused ? "DGELU epilogue" : "(no DGELU algorithm)",
                   ms_fused_path[1], ms_fused_path[0] / ms_fused_path[1], 12 * (ms_fused_path[0] - ms_fused_path[1]));
            cudaCheck(cudaFree(scratch));
        }
        step_gemm_buffers_free(&bufs);
        cudaCheck(cudaFree(init));
        cudaCheck(cudaFree(first));
    }
#endif
    matmul_free();
    printf("performance: %s\n", perf);
    return test_end();
}
