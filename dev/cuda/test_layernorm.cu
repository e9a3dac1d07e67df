/*
test_layernorm.cu - llmc/layernorm.cuh against CPU (double) loops, then a bandwidth benchmark.

Checks, per case (random rows with their own offset and scale, outputs NaN-poisoned):
- layernorm_forward: out, mean, rstd
- fused_residual_layernorm_forward: residual (= floatX(inp1 + inp2)), normed out, mean, rstd
- layernorm_backward: dinp (+=), dweight (+=), dbias (+=), accumulators starting at random
  values scaled like the update
- all outputs bitwise identical when computed twice from the same state; the backward's second
  run takes the kernel that reads rows twice, so where the first kept rows in registers
  (C <= 1024 in bf16, 512 in fp32) the two kernels are checked bit for bit
Cases include C not a multiple of 256, B*T not a multiple of the row blocking, and C = 2048
(backward needs more than 48 KiB of shared memory: the opt-in path).
*/
#include "../../llmc/test_harness.h"
#include "../../llmc/layernorm.cuh"

static void cpu_layernorm_forward(double* out, double* mean, double* rstd, const float* inp, const float* w,
                                  const float* b, int BT, int C) {
    for (int t = 0; t < BT; t++) {
        const float* x = inp + (size_t)t * C;
        double m = 0.0;
        for (int c = 0; c < C; c++) { m += x[c]; }
        m /= C;
        double var = 0.0;
        for (int c = 0; c < C; c++) { var += (x[c] - m) * (x[c] - m); }
        var /= C;
        double s = 1.0 / sqrt(var + 1e-5);
        for (int c = 0; c < C; c++) { out[(size_t)t * C + c] = (x[c] - m) * s * w[c] + b[c]; }
        mean[t] = m;
        rstd[t] = s;
    }
}

// dinp = dx only (caller adds the old value); dweight/dbias = the update only
static void cpu_layernorm_backward(double* dinp, double* dweight, double* dbias, const float* dout, const float* inp,
                                   const float* w, const double* mean, const double* rstd, int BT, int C) {
    for (int c = 0; c < C; c++) { dweight[c] = 0.0; dbias[c] = 0.0; }
    for (int t = 0; t < BT; t++) {
        const float* x = inp + (size_t)t * C;
        const float* dy = dout + (size_t)t * C;
        double dnorm_mean = 0.0, dnorm_xhat_mean = 0.0;
        for (int c = 0; c < C; c++) {
            double xhat = (x[c] - mean[t]) * rstd[t];
            double dnorm = (double)w[c] * dy[c];
            dnorm_mean += dnorm;
            dnorm_xhat_mean += dnorm * xhat;
            dweight[c] += dy[c] * xhat;
            dbias[c] += dy[c];
        }
        dnorm_mean /= C;
        dnorm_xhat_mean /= C;
        for (int c = 0; c < C; c++) {
            double xhat = (x[c] - mean[t]) * rstd[t];
            double dnorm = (double)w[c] * dy[c];
            dinp[(size_t)t * C + c] = (dnorm - dnorm_mean - xhat * dnorm_xhat_mean) * rstd[t];
        }
    }
}

static void fill_rows(float* x, int BT, int C, Rng* rng) {
    for (int t = 0; t < BT; t++) {
        float offset = 2.0f * rng_uniform(rng, -1.0f, 1.0f);
        float scale = 0.2f + 2.0f * fabsf(rng_uniform(rng, -1.0f, 1.0f));
        for (int c = 0; c < C; c++) { x[(size_t)t * C + c] = offset + scale * rng_uniform(rng, -1.0f, 1.0f); }
    }
}

static void run_case(int BT, int C, Rng* rng) {
    printf("case BT=%d C=%d\n", BT, C);
    size_t n = (size_t)BT * C;
    float* inp1 = host_alloc(n);
    float* inp2 = host_alloc(n);
    float* w = host_alloc(C);
    float* b = host_alloc(C);
    float* dout = host_alloc(n);
    fill_rows(inp1, BT, C, rng);
    fill_rows(inp2, BT, C, rng);
    fill_uniform(w, C, 0.5f, 1.5f, rng);
    fill_uniform(b, C, -0.5f, 0.5f, rng);
    fill_uniform(dout, n, -1.0f, 1.0f, rng);

    floatX *d_inp1 = device_alloc<floatX>(n, "inp1"), *d_inp2 = device_alloc<floatX>(n, "inp2");
    floatX *d_w = device_alloc<floatX>(C, "weight"), *d_b = device_alloc<floatX>(C, "bias");
    floatX* d_dout = device_alloc<floatX>(n, "dout");
    floatX* d_out[2] = {device_alloc<floatX>(n, "out"), device_alloc<floatX>(n, "out2")};
    floatX* d_res[2] = {device_alloc<floatX>(n, "residual"), device_alloc<floatX>(n, "residual2")};
    float* d_mean[2] = {device_alloc<float>(BT, "mean"), device_alloc<float>(BT, "mean2")};
    float* d_rstd[2] = {device_alloc<float>(BT, "rstd"), device_alloc<float>(BT, "rstd2")};
    floatX* d_dinp[2] = {device_alloc<floatX>(n, "dinp"), device_alloc<floatX>(n, "dinp2")};
    floatX* d_dw[2] = {device_alloc<floatX>(C, "dweight"), device_alloc<floatX>(C, "dweight2")};
    floatX* d_db[2] = {device_alloc<floatX>(C, "dbias"), device_alloc<floatX>(C, "dbias2")};
    float* d_scratch = (float*)cuda_malloc_or_die(layernorm_backward_scratch_bytes(BT, C), "layernorm scratch");
    upload_rounded(d_inp1, inp1, n);
    upload_rounded(d_inp2, inp2, n);
    upload_rounded(d_w, w, C);
    upload_rounded(d_b, b, C);
    upload_rounded(d_dout, dout, n);

    double* ref_out = ref_alloc(n);
    double* ref_mean = ref_alloc(BT);
    double* ref_rstd = ref_alloc(BT);

    // ---- plain forward
    for (int run = 0; run < 2; run++) {
        poison(d_out[run], n * sizeof(floatX));
        poison(d_mean[run], BT * sizeof(float));
        poison(d_rstd[run], BT * sizeof(float));
        layernorm_forward(d_out[run], d_mean[run], d_rstd[run], d_inp1, d_w, d_b, BT, C, 0);
        cudaCheck(cudaDeviceSynchronize());
    }
    cpu_layernorm_forward(ref_out, ref_mean, ref_rstd, inp1, w, b, BT, C);
    test_check_runs("layernorm_forward out", d_out, ref_out, n, TOL_FLOATX);
    test_check_runs("layernorm_forward mean (fp32)", d_mean, ref_mean, BT, 1e-5);
    test_check_runs("layernorm_forward rstd (fp32)", d_rstd, ref_rstd, BT, 1e-5);

    // ---- fused residual forward
    float* residual = host_alloc(n);
    for (size_t i = 0; i < n; i++) { residual[i] = host_round_to_floatX(inp1[i] + inp2[i]); }
    for (int run = 0; run < 2; run++) {
        poison(d_out[run], n * sizeof(floatX));
        poison(d_res[run], n * sizeof(floatX));
        poison(d_mean[run], BT * sizeof(float));
        poison(d_rstd[run], BT * sizeof(float));
        fused_residual_layernorm_forward(d_res[run], d_out[run], d_mean[run], d_rstd[run], d_inp1, d_inp2, d_w, d_b,
                                         BT, C, 0);
        cudaCheck(cudaDeviceSynchronize());
    }
    cpu_layernorm_forward(ref_out, ref_mean, ref_rstd, residual, w, b, BT, C);
    {
        double* ref_res = ref_alloc(n);
        for (size_t i = 0; i < n; i++) { ref_res[i] = (double)inp1[i] + inp2[i]; }
        float* got_res = download_floatX_alloc(d_res[0], n);
        test_check(memcmp(got_res, residual, n * sizeof(float)) == 0, "fused residual: residual == floatX(inp1 + inp2) exactly");
        test_check_runs("fused residual: residual", d_res, ref_res, n, TOL_FLOATX);
        test_check_runs("fused residual: normed out", d_out, ref_out, n, TOL_FLOATX);
        test_check_runs("fused residual: mean (fp32)", d_mean, ref_mean, BT, 1e-5);
        test_check_runs("fused residual: rstd (fp32)", d_rstd, ref_rstd, BT, 1e-5);
        free(ref_res); free(got_res);
    }

    // ---- backward (input = the residual stream, statistics from the GPU forward above)
    double* ref_dx = ref_alloc(n);
    double* ref_dw = ref_alloc(C);
    double* ref_db = ref_alloc(C);
    cpu_layernorm_backward(ref_dx, ref_dw, ref_db, dout, residual, w, ref_mean, ref_rstd, BT, C);
    float *old_dinp = host_alloc(n), *old_dw = host_alloc(C), *old_db = host_alloc(C);
    for (int run = 0; run < 2; run++) {
        Rng acc_rng = rng_seeded(99);
        fill_uniform(old_dinp, n, -(float)rms(ref_dx, n), (float)rms(ref_dx, n), &acc_rng);
        fill_uniform(old_dw, C, -(float)rms(ref_dw, C), (float)rms(ref_dw, C), &acc_rng);
        fill_uniform(old_db, C, -(float)rms(ref_db, C), (float)rms(ref_db, C), &acc_rng);
        upload_rounded(d_dinp[run], old_dinp, n);
        upload_rounded(d_dw[run], old_dw, C);
        upload_rounded(d_db[run], old_db, C);
        poison(d_scratch, layernorm_backward_scratch_bytes(BT, C));
        // run 1 takes the kernel that reads each row twice: where run 0 kept rows in registers
        // (C of at most LAYERNORM_BWD_MAX_CACHED_CHUNKS chunks), the two must agree bit for bit
        layernorm_backward_cached = run == 0;
        layernorm_backward(d_dinp[run], d_dw[run], d_db[run], d_dout, d_res[0], d_w, d_mean[0], d_rstd[0], BT, C,
                           d_scratch, 0);
        cudaCheck(cudaDeviceSynchronize());
    }
    layernorm_backward_cached = 1;
    for (size_t i = 0; i < n; i++) { ref_dx[i] += old_dinp[i]; }
    for (int c = 0; c < C; c++) { ref_dw[c] += old_dw[c]; ref_db[c] += old_db[c]; }
    test_check_runs("layernorm_backward dinp (+=)", d_dinp, ref_dx, n, TOL_FLOATX);
    test_check_runs("layernorm_backward dweight (+=)", d_dw, ref_dw, C, TOL_FLOATX);
    test_check_runs("layernorm_backward dbias (+=)", d_db, ref_db, C, TOL_FLOATX);

    free(inp1); free(inp2); free(w); free(b); free(dout); free(residual);
    free(old_dinp); free(old_dw); free(old_db);
    free(ref_out); free(ref_mean); free(ref_rstd); free(ref_dx); free(ref_dw); free(ref_db);
    void* bufs[] = {d_inp1, d_inp2, d_w, d_b, d_dout, d_out[0], d_out[1], d_res[0], d_res[1], d_mean[0], d_mean[1],
                    d_rstd[0], d_rstd[1], d_dinp[0], d_dinp[1], d_dw[0], d_dw[1], d_db[0], d_db[1], d_scratch};
    for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++) { cudaCheck(cudaFree(bufs[i])); }
}

int main(void) {
    cudaCheck(cudaSetDevice(0));
    test_begin("test_layernorm" TEST_FLOATX_SUFFIX);
    Rng rng = rng_seeded(7);
    printf("test_layernorm (%s)\n", FLOATX_NAME);
    run_case(256, 768, &rng);
    run_case(70, 264, &rng);
    run_case(64, 2048, &rng);

    char perf[512] = "benchmarks only in bf16 builds";
#if !defined(ENABLE_FP32)
    {
        // 48 MiB per activation tensor: larger than the 50 MB L2 together, so DRAM is measured
        const int BT = 32768, C = 768;
        size_t n = (size_t)BT * C;
        floatX *inp = device_alloc<floatX>(n, "b inp"), *inp2 = device_alloc<floatX>(n, "b inp2");
        floatX *out = device_alloc<floatX>(n, "b out"), *res = device_alloc<floatX>(n, "b res");
        floatX *dout = device_alloc<floatX>(n, "b dout"), *dinp = device_alloc<floatX>(n, "b dinp");
        floatX *w = device_alloc<floatX>(C, "b w"), *b = device_alloc<floatX>(C, "b b");
        floatX *dw = device_alloc<floatX>(C, "b dw"), *db = device_alloc<floatX>(C, "b db");
        float *mean = device_alloc<float>(BT, "b mean"), *rstd = device_alloc<float>(BT, "b rstd");
        float* scratch = (float*)cuda_malloc_or_die(layernorm_backward_scratch_bytes(BT, C), "b scratch");
        fill_random_device(inp, n, 1, 1.0f);
        fill_random_device(inp2, n, 2, 1.0f);
        fill_random_device(dout, n, 3, 1.0f);
        fill_random_device(dinp, n, 4, 1.0f);
        fill_random_device(w, C, 5, 1.0f);
        fill_random_device(b, C, 6, 1.0f);
        fill_random_device(dw, C, 7, 1.0f);
        fill_random_device(db, C, 8, 1.0f);
        printf("benchmark B*T=%d C=%d (median of 50 after 10 warm-up)\n", BT, C);
        float ms = bench_median_ms([&] { layernorm_forward(out, mean, rstd, inp, w, b, BT, C, 0); }, 10, 50);
        double f_fwd = report_bandwidth("layernorm_forward", ms, 2.0 * n * sizeof(floatX) + 8.0 * BT);
        ms = bench_median_ms([&] { fused_residual_layernorm_forward(res, out, mean, rstd, inp, inp2, w, b, BT, C, 0); },
                             10, 50);
        double f_res = report_bandwidth("fused_residual_layernorm_forward", ms, 4.0 * n * sizeof(floatX) + 8.0 * BT);
        ms = bench_median_ms(
            [&] { layernorm_backward(dinp, dw, db, dout, res, w, mean, rstd, BT, C, scratch, 0); }, 10, 50);
        double f_bwd = report_bandwidth("layernorm_backward", ms, 4.0 * n * sizeof(floatX) + 8.0 * BT);
        layernorm_backward_cached = 0;
        const float ms_cached = ms;
        ms = bench_median_ms(
            [&] { layernorm_backward(dinp, dw, db, dout, res, w, mean, rstd, BT, C, scratch, 0); }, 10, 50);
        report_bandwidth("layernorm_backward (rows read twice)", ms, 4.0 * n * sizeof(floatX) + 8.0 * BT);
        layernorm_backward_cached = 1;
        printf("  [BENCH] layernorm_backward: rows in registers / rows read twice = %.3f\n", ms_cached / ms);
        snprintf(perf, sizeof(perf), "fwd %.0f%%, fused-res fwd %.0f%%, bwd %.0f%% of 3.0 TB/s", 100 * f_fwd,
                 100 * f_res, 100 * f_bwd);
        void* bufs[] = {inp, inp2, out, res, dout, dinp, w, b, dw, db, mean, rstd, scratch};
        for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++) { cudaCheck(cudaFree(bufs[i])); }
    }
#endif
    printf("performance: %s\n", perf);
    return test_end();
}
