/*
test_adamw.cu - llmc/adamw.cuh against a CPU fp32 loop with the same formula, then a
bandwidth benchmark.

Checks, for the vectorised path (n multiple of 4, aligned) and the scalar fallback (odd n,
pointers offset by one element), three consecutive steps t = 1, 2, 3 with grad_scale != 1
and weight decay:
- master weights, m, v vs CPU fp32 (tolerance 1e-5: only contraction/rounding-order differences)
- params are exactly the round-to-nearest-even floatX of the GPU master weights (bitwise)
- params vs CPU (floatX tolerance)
- bitwise identical when run twice from the same state
*/
#include "../../llmc/test_harness.h"
#include "../../llmc/adamw.cuh"

static void cpu_adamw(float* master, float* m, float* v, const float* grads, size_t n, float lr, float beta1,
                      float beta2, float eps, float wd, float grad_scale, int t) {
    float bc1 = (float)(1.0 - pow((double)beta1, (double)t));
    float bc2 = (float)(1.0 - pow((double)beta2, (double)t));
    for (size_t i = 0; i < n; i++) {
        float g = grads[i] * grad_scale;
        m[i] = beta1 * m[i] + (1.0f - beta1) * g;
        v[i] = beta2 * v[i] + (1.0f - beta2) * g * g;
        float m_hat = m[i] / bc1;
        float v_hat = v[i] / bc2;
        master[i] -= lr * (m_hat / (sqrtf(v_hat) + eps) + wd * master[i]);
    }
}

static void to_double(double* dst, const float* src, size_t n) {
    for (size_t i = 0; i < n; i++) { dst[i] = src[i]; }
}

// offset: elements by which every device pointer is shifted (1 forces the scalar kernel)
static void run_case(size_t n, int offset, Rng* rng) {
    printf("case n=%zu pointer offset=%d (%s kernel)\n", n, offset,
           (n % 4 == 0 && offset == 0) ? "vectorised" : "scalar");
    const float lr = 1e-3f, beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f, wd = 0.1f, grad_scale = 0.7f;
    float* master0 = host_alloc(n);
    float* m0 = host_alloc(n);
    float* v0 = host_alloc(n);
    float* grads[3] = {host_alloc(n), host_alloc(n), host_alloc(n)};
    fill_uniform(master0, n, -0.1f, 0.1f, rng);
    float* master_initial = host_alloc(n);
    memcpy(master_initial, master0, n * sizeof(float));
    fill_uniform(m0, n, -1e-2f, 1e-2f, rng);
    fill_uniform(v0, n, 0.0f, 1e-4f, rng);
    for (int s = 0; s < 3; s++) { fill_uniform(grads[s], n, -0.05f, 0.05f, rng); }
    for (int s = 0; s < 3; s++) {
        for (size_t i = 0; i < n; i++) { grads[s][i] = host_round_to_floatX(grads[s][i]); }
    }

    floatX* d_params[2];
    float *d_master[2], *d_m[2], *d_v[2];
    floatX* d_grads[3];
    for (int r = 0; r < 2; r++) {
        d_params[r] = device_alloc<floatX>(n + offset, "params") + offset;
        d_master[r] = device_alloc<float>(n + offset, "master") + offset;
        d_m[r] = device_alloc<float>(n + offset, "m") + offset;
        d_v[r] = device_alloc<float>(n + offset, "v") + offset;
    }
    for (int s = 0; s < 3; s++) {
        d_grads[s] = device_alloc<floatX>(n + offset, "grads") + offset;
        upload_floatX(d_grads[s], grads[s], n);
    }
    for (int r = 0; r < 2; r++) {
        cudaCheck(cudaMemcpy(d_master[r], master0, n * sizeof(float), cudaMemcpyHostToDevice));
        cudaCheck(cudaMemcpy(d_m[r], m0, n * sizeof(float), cudaMemcpyHostToDevice));
        cudaCheck(cudaMemcpy(d_v[r], v0, n * sizeof(float), cudaMemcpyHostToDevice));
        poison(d_params[r], n * sizeof(floatX));
        for (int s = 0; s < 3; s++) {
            adamw_update(d_params[r], d_master[r], d_grads[s], d_m[r], d_v[r], n, lr, beta1, beta2, eps, wd,
                         grad_scale, s + 1, 0);
        }
        cudaCheck(cudaDeviceSynchronize());
    }
    for (int s = 0; s < 3; s++) { cpu_adamw(master0, m0, v0, grads[s], n, lr, beta1, beta2, eps, wd, grad_scale, s + 1); }

    float* got_master = download_floats(d_master[0], n);
    float* got_m = download_floats(d_m[0], n);
    float* got_v = download_floats(d_v[0], n);
    float* got_params = download_floatX_alloc(d_params[0], n);
    double* ref = ref_alloc(n);
    to_double(ref, master0, n);
    test_check_rel("master weights (fp32) after 3 steps", rel_err_f64(got_master, ref, n), 1e-5);
    {
        // the change itself, not only the (larger) weights: (master - initial) vs CPU's
        float* got_delta = host_alloc(n);
        for (size_t i = 0; i < n; i++) {
            got_delta[i] = got_master[i] - master_initial[i];
            ref[i] = (double)master0[i] - master_initial[i];
        }
        test_check_rel("master change over 3 steps", rel_err_f64(got_delta, ref, n), 1e-3);
        free(got_delta);
    }
    to_double(ref, m0, n);
    test_check_rel("first moment m (fp32)", rel_err_f64(got_m, ref, n), 1e-5);
    to_double(ref, v0, n);
    test_check_rel("second moment v (fp32)", rel_err_f64(got_v, ref, n), 1e-5);
    to_double(ref, master0, n);
    test_check_rel("params (floatX) vs CPU master", rel_err_f64(got_params, ref, n), TOL_FLOATX);
    int exact = 1;
    for (size_t i = 0; i < n; i++) {
        if (host_round_to_floatX(got_master[i]) != got_params[i]) { exact = 0; break; }
    }
    test_check(exact, "params == round-to-nearest-even(master) bitwise");
    test_check_bitwise("master", d_master[0], d_master[1], n * sizeof(float));
    test_check_bitwise("params", d_params[0], d_params[1], n * sizeof(floatX));
    test_check_bitwise("m, v", d_m[0], d_m[1], n * sizeof(float));

    free(master0); free(master_initial); free(m0); free(v0);
    for (int s = 0; s < 3; s++) { free(grads[s]); cudaCheck(cudaFree(d_grads[s] - offset)); }
    free(got_master); free(got_m); free(got_v); free(got_params); free(ref);
    for (int r = 0; r < 2; r++) {
        cudaCheck(cudaFree(d_params[r] - offset));
        cudaCheck(cudaFree(d_master[r] - offset));
        cudaCheck(cudaFree(d_m[r] - offset));
        cudaCheck(cudaFree(d_v[r] - offset));
    }
}

int main(void) {
    cudaCheck(cudaSetDevice(0));
    test_begin("test_adamw" TEST_FLOATX_SUFFIX);
    printf("test_adamw (%s)\n", FLOATX_NAME);
    Rng rng = rng_seeded(41);
    run_case(1 << 20, 0, &rng);
    run_case((1 << 20) + 3, 1, &rng);

    char perf[512] = "benchmarks only in bf16 builds";
#if !defined(ENABLE_FP32)
    {
        const size_t n = 124475904;  // GPT-2 124M parameter count (padded vocab)
        floatX *params = device_alloc<floatX>(n, "b params"), *grads = device_alloc<floatX>(n, "b grads");
        float *master = device_alloc<float>(n, "b master"), *m = device_alloc<float>(n, "b m");
        float* v = device_alloc<float>(n, "b v");
        fill_random_device(grads, n, 1, 0.01f);
        fill_random_device(params, n, 2, 0.1f);
        cudaCheck(cudaMemset(m, 0, n * sizeof(float)));  // optimizer state starts at zero, as in training
        cudaCheck(cudaMemset(v, 0, n * sizeof(float)));
        // master from random params (fp32 values of the random bf16 params)
        float* h = host_alloc(n);
        download_floatX(h, params, n);
        cudaCheck(cudaMemcpy(master, h, n * sizeof(float), cudaMemcpyHostToDevice));
        free(h);
        int step = 1;
        printf("benchmark n=%zu (median of 30 after 5 warm-up)\n", n);
        float ms = bench_median_ms(
            [&] { adamw_update(params, master, grads, m, v, n, 6e-4f, 0.9f, 0.95f, 1e-8f, 0.1f, 1.0f, step++, 0); }, 5,
            30);
        // bytes per parameter: grad (floatX) + master, m, v read and written + params written
        double bytes = (double)n * (2 * sizeof(floatX) + 6 * sizeof(float));
        double f = report_bandwidth("adamw_update (vectorised)", ms, bytes);
        snprintf(perf, sizeof(perf), "%.0f%% of 3.0 TB/s (%.2f ms for 124M params)", 100 * f, ms);
        void* bufs[] = {params, grads, master, m, v};
        for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++) { cudaCheck(cudaFree(bufs[i])); }
    }
#endif
    printf("performance: %s\n", perf);
    return test_end();
}
