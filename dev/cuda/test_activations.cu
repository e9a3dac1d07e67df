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

static double cpu_sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }

// One activation's device buffers: its input x (n_x) and output gradient dy (n_y), and the outputs
// y (n_y) and dx (n_x) of two runs (run 1 for the bitwise check)
struct ActRuns {
    floatX *x, *dy, *y[2], *dx[2];
};

// x (host, n_x) uniform in [-5, 5] and dy (n_y) in [-1, 1], rounded to floatX and uploaded; then
// run(y, dx, x, dy) (forward and backward) twice into NaN-poisoned outputs
template <class Run>
static ActRuns act_run_twice(float* x, size_t n_x, float* dy, size_t n_y, Rng* rng, Run run) {
    fill_uniform(x, n_x, -5.0f, 5.0f, rng);
    fill_uniform(dy, n_y, -1.0f, 1.0f, rng);
    ActRuns r;
    r.x = device_alloc<floatX>(n_x, "x");
    r.dy = device_alloc<floatX>(n_y, "dy");
    for (int k = 0; k < 2; k++) {
        r.y[k] = device_alloc<floatX>(n_y, "y");
        r.dx[k] = device_alloc<floatX>(n_x, "dx");
    }
    upload_rounded(r.x, x, n_x);
    upload_rounded(r.dy, dy, n_y);
    for (int k = 0; k < 2; k++) {
        poison(r.y[k], n_y * sizeof(floatX));
        poison(r.dx[k], n_x * sizeof(floatX));
        run(r.y[k], r.dx[k], r.x, r.dy);
        cudaCheck(cudaDeviceSynchronize());
    }
    return r;
}

static void act_runs_free(ActRuns* r) {
    void* bufs[] = {r->x, r->dy, r->y[0], r->y[1], r->dx[0], r->dx[1]};
    for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++) { cudaCheck(cudaFree(bufs[i])); }
}

static void test_gelu(int BT, int C4, Rng* rng) {
    size_t n = (size_t)BT * C4;
    printf("gelu N=%zu\n", n);
    float* x = host_alloc(n);
    float* dy = host_alloc(n);
    ActRuns r = act_run_twice(x, n, dy, n, rng, [&](floatX* y, floatX* dx, const floatX* xd, const floatX* dyd) {
        gelu_forward(y, xd, n, 0);
        gelu_backward(dx, xd, dyd, n, 0);
    });
    double* ref_y = ref_alloc(n);
    double* ref_dx = ref_alloc(n);
    for (size_t i = 0; i < n; i++) {
        ref_y[i] = cpu_gelu(x[i]);
        ref_dx[i] = dy[i] * cpu_gelu_grad(x[i]);
    }
    test_check_runs("gelu_forward", r.y, ref_y, n, TOL_FLOATX);
    test_check_runs("gelu_backward", r.dx, ref_dx, n, TOL_FLOATX);
    // in place: the gradient buffer is overwritten with dinp
    gelu_backward(r.dy, r.x, r.dy, n, 0);
    cudaCheck(cudaDeviceSynchronize());
    test_check(device_bitwise_equal(r.dy, r.dx[0], n * sizeof(floatX)), "gelu_backward in place == out of place (bitwise)");
    free(x); free(dy); free(ref_y); free(ref_dx);
    act_runs_free(&r);
}

static void test_swiglu(int BT, int I, Rng* rng) {
    printf("swiglu BT=%d I=%d\n", BT, I);
    size_t n_h = (size_t)BT * I, n_gu = 2 * n_h;
    float* gu = host_alloc(n_gu);
    float* dh = host_alloc(n_h);
    // x = gu (BT, 2I), dy = dh (BT, I), y = h, dx = dgu
    ActRuns r = act_run_twice(gu, n_gu, dh, n_h, rng, [&](floatX* h, floatX* dgu, const floatX* gud, const floatX* dhd) {
        swiglu_forward(h, gud, BT, I, 0);
        swiglu_backward(dgu, dhd, gud, BT, I, 0);
    });
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
    test_check_runs("swiglu_forward", r.y, ref_h, n_h, TOL_FLOATX);
    test_check_runs("swiglu_backward (dgate and dup)", r.dx, ref_dgu, n_gu, TOL_FLOATX);
    float* got_dgu = download_floatX_alloc(r.dx[0], n_gu);
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
    free(gu); free(dh); free(ref_h); free(ref_dgu); free(got_dgu);
    act_runs_free(&r);
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
