/*
test_activations.cu - llmc/activations.cuh against CPU (double) loops, then a bandwidth benchmark.

Checks (inputs uniform in [-5, 5] so both tails and the curved middle are covered; outputs
NaN-poisoned before every run):
- gelu_forward, gelu_backward (separate output and in place, dinp == dout)
- swiglu_forward, swiglu_backward (gate then up columns of the (BT, 2I) input)
- each output bitwise identical when computed twice
*/
#include "../../llmc/test_harness.h"
#include "../../llmc/activations.cuh"

static double cpu_gelu(double x) { return 0.5 * x * (1.0 + tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))); }
static double cpu_gelu_grad(double x) {
    double u = 0.7978845608028654 * (x + 0.044715 * x * x * x);
    double th = tanh(u);
    return 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x);
}
static double cpu_sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }

static void test_gelu(int BT, int C4, Rng* rng) {
    size_t n = (size_t)BT * C4;
    printf("gelu N=%zu\n", n);
    float* x = host_alloc(n);
    float* dy = host_alloc(n);
    fill_uniform(x, n, -5.0f, 5.0f, rng);
    fill_uniform(dy, n, -1.0f, 1.0f, rng);
    floatX* d_x = device_alloc<floatX>(n, "x");
    floatX* d_dy = device_alloc<floatX>(n, "dy");
    floatX* d_y[2] = {device_alloc<floatX>(n, "y"), device_alloc<floatX>(n, "y2")};
    floatX* d_dx[2] = {device_alloc<floatX>(n, "dx"), device_alloc<floatX>(n, "dx2")};
    upload_rounded(d_x, x, n);
    upload_rounded(d_dy, dy, n);
    for (int run = 0; run < 2; run++) {
        poison(d_y[run], n * sizeof(floatX));
        poison(d_dx[run], n * sizeof(floatX));
        gelu_forward(d_y[run], d_x, n, 0);
        gelu_backward(d_dx[run], d_x, d_dy, n, 0);
        cudaCheck(cudaDeviceSynchronize());
    }
    double* ref_y = ref_alloc(n);
    double* ref_dx = ref_alloc(n);
    for (size_t i = 0; i < n; i++) {
        ref_y[i] = cpu_gelu(x[i]);
        ref_dx[i] = dy[i] * cpu_gelu_grad(x[i]);
    }
    float* got = download_floatX_alloc(d_y[0], n);
    test_check_rel("gelu_forward", rel_err_f64(got, ref_y, n), TOL_FLOATX);
    download_floatX(got, d_dx[0], n);
    test_check_rel("gelu_backward", rel_err_f64(got, ref_dx, n), TOL_FLOATX);
    test_check_bitwise("gelu_forward", d_y[0], d_y[1], n * sizeof(floatX));
    test_check_bitwise("gelu_backward", d_dx[0], d_dx[1], n * sizeof(floatX));
    // in place: the gradient buffer is overwritten with dinp
    gelu_backward(d_dy, d_x, d_dy, n, 0);
    cudaCheck(cudaDeviceSynchronize());
    test_check(device_bitwise_equal(d_dy, d_dx[0], n * sizeof(floatX)), "gelu_backward in place == out of place (bitwise)");
    free(x); free(dy); free(ref_y); free(ref_dx); free(got);
    void* bufs[] = {d_x, d_dy, d_y[0], d_y[1], d_dx[0], d_dx[1]};
    for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++) { cudaCheck(cudaFree(bufs[i])); }
}

static void test_swiglu(int BT, int I, Rng* rng) {
    printf("swiglu BT=%d I=%d\n", BT, I);
    size_t n_h = (size_t)BT * I, n_gu = 2 * n_h;
    float* gu = host_alloc(n_gu);
    float* dh = host_alloc(n_h);
    fill_uniform(gu, n_gu, -5.0f, 5.0f, rng);
    fill_uniform(dh, n_h, -1.0f, 1.0f, rng);
    floatX* d_gu = device_alloc<floatX>(n_gu, "gu");
    floatX* d_dh = device_alloc<floatX>(n_h, "dh");
    floatX* d_h[2] = {device_alloc<floatX>(n_h, "h"), device_alloc<floatX>(n_h, "h2")};
    floatX* d_dgu[2] = {device_alloc<floatX>(n_gu, "dgu"), device_alloc<floatX>(n_gu, "dgu2")};
    upload_rounded(d_gu, gu, n_gu);
    upload_rounded(d_dh, dh, n_h);
    for (int run = 0; run < 2; run++) {
        poison(d_h[run], n_h * sizeof(floatX));
        poison(d_dgu[run], n_gu * sizeof(floatX));
        swiglu_forward(d_h[run], d_gu, BT, I, 0);
        swiglu_backward(d_dgu[run], d_dh, d_gu, BT, I, 0);
        cudaCheck(cudaDeviceSynchronize());
    }
    double* ref_h = ref_alloc(n_h);
    double* ref_dgu = ref_alloc(n_gu);
    for (int t = 0; t < BT; t++) {
        for (int i = 0; i < I; i++) {
            double g = gu[(size_t)t * 2 * I + i];
            double u = gu[(size_t)t * 2 * I + I + i];
            double d = dh[(size_t)t * I + i];
            double s = cpu_sigmoid(g);
            ref_h[(size_t)t * I + i] = g * s * u;
            ref_dgu[(size_t)t * 2 * I + i] = d * u * s * (1.0 + g * (1.0 - s));
            ref_dgu[(size_t)t * 2 * I + I + i] = d * g * s;
        }
    }
    float* got_h = download_floatX_alloc(d_h[0], n_h);
    float* got_dgu = download_floatX_alloc(d_dgu[0], n_gu);
    test_check_rel("swiglu_forward", rel_err_f64(got_h, ref_h, n_h), TOL_FLOATX);
    test_check_rel("swiglu_backward (dgate and dup)", rel_err_f64(got_dgu, ref_dgu, n_gu), TOL_FLOATX);
    // the gate half alone, so an error confined to it cannot hide behind the up half
    std::vector<float> got_gate;
    std::vector<double> ref_gate;
    for (int t = 0; t < BT; t++) {
        for (int i = 0; i < I; i++) {
            got_gate.push_back(got_dgu[(size_t)t * 2 * I + i]);
            ref_gate.push_back(ref_dgu[(size_t)t * 2 * I + i]);
        }
    }
    test_check_rel("swiglu_backward (dgate half)", rel_err_f64(got_gate.data(), ref_gate.data(), got_gate.size()), TOL_FLOATX);
    test_check_bitwise("swiglu_forward", d_h[0], d_h[1], n_h * sizeof(floatX));
    test_check_bitwise("swiglu_backward", d_dgu[0], d_dgu[1], n_gu * sizeof(floatX));
    free(gu); free(dh); free(ref_h); free(ref_dgu); free(got_h); free(got_dgu);
    void* bufs[] = {d_gu, d_dh, d_h[0], d_h[1], d_dgu[0], d_dgu[1]};
    for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++) { cudaCheck(cudaFree(bufs[i])); }
}

int main(void) {
    cudaCheck(cudaSetDevice(0));
    test_begin("test_activations" TEST_FLOATX_SUFFIX);
    printf("test_activations (%s)\n", FLOATX_NAME);
    Rng rng = rng_seeded(21);
    test_gelu(256, 3072, &rng);
    test_gelu(3, 40, &rng);  // tiny: a partial last block
    test_swiglu(256, 2048, &rng);
    test_swiglu(5, 24, &rng);

    char perf[512] = "benchmarks only in bf16 builds";
#if !defined(ENABLE_FP32)
    {
        const int BT = 8192, C4 = 3072, I = 2048;
        size_t n = (size_t)BT * C4;
        size_t n_h = (size_t)BT * I;
        floatX *x = device_alloc<floatX>(n, "b x"), *y = device_alloc<floatX>(n, "b y");
        floatX* dy = device_alloc<floatX>(n, "b dy");
        floatX *gu = device_alloc<floatX>(2 * n_h, "b gu"), *dgu = device_alloc<floatX>(2 * n_h, "b dgu");
        floatX *h = device_alloc<floatX>(n_h, "b h"), *dh = device_alloc<floatX>(n_h, "b dh");
        fill_random_device(x, n, 1, 3.0f);
        fill_random_device(dy, n, 2, 1.0f);
        fill_random_device(gu, 2 * n_h, 3, 3.0f);
        fill_random_device(dh, n_h, 4, 1.0f);
        printf("benchmark GELU N=%d*%d, SwiGLU BT=%d I=%d (median of 50 after 10 warm-up)\n", BT, C4, BT, I);
        float ms = bench_median_ms([&] { gelu_forward(y, x, n, 0); }, 10, 50);
        double f1 = report_bandwidth("gelu_forward", ms, 2.0 * n * sizeof(floatX));
        ms = bench_median_ms([&] { gelu_backward(y, x, dy, n, 0); }, 10, 50);
        double f2 = report_bandwidth("gelu_backward", ms, 3.0 * n * sizeof(floatX));
        ms = bench_median_ms([&] { swiglu_forward(h, gu, BT, I, 0); }, 10, 50);
        double f3 = report_bandwidth("swiglu_forward", ms, 3.0 * n_h * sizeof(floatX));
        ms = bench_median_ms([&] { swiglu_backward(dgu, dh, gu, BT, I, 0); }, 10, 50);
        double f4 = report_bandwidth("swiglu_backward", ms, 5.0 * n_h * sizeof(floatX));
        snprintf(perf, sizeof(perf), "gelu f/b %.0f%%/%.0f%%, swiglu f/b %.0f%%/%.0f%% of 3.0 TB/s", 100 * f1,
                 100 * f2, 100 * f3, 100 * f4);
        void* bufs[] = {x, y, dy, gu, dgu, h, dh};
        for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++) { cudaCheck(cudaFree(bufs[i])); }
    }
#endif
    printf("performance: %s\n", perf);
    return test_end();
}
