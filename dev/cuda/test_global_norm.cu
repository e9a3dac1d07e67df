/*
test_global_norm.cu - llmc/global_norm.cuh against a CPU double sum, then a bandwidth benchmark.

Checks: squared L2 norm of random floatX buffers of several sizes (one with a tail that does
not fill a 16-byte vector, one small enough for a single block, one that needs the full
1024-block grid) vs CPU double (tolerance 1e-5: fp32 partial sums of positive terms);
result NaN-poisoned first; bitwise identical when run twice.
*/
#include "../../llmc/test_harness.h"
#include "../../llmc/global_norm.cuh"

static void run_case(size_t n, Rng* rng) {
    printf("case n=%zu\n", n);
    float* g = host_alloc(n);
    fill_uniform(g, n, -1.0f, 1.0f, rng);
    for (size_t i = 0; i < n; i += 1000) { g[i] *= 50.0f; }  // some large entries
    floatX* d_g = device_alloc<floatX>(n, "grads");
    float* d_out[2] = {device_alloc<float>(1, "norm"), device_alloc<float>(1, "norm2")};
    float* d_scratch = (float*)cuda_malloc_or_die(global_norm_scratch_bytes(), "global norm scratch");
    upload_rounded(d_g, g, n);
    for (int r = 0; r < 2; r++) {
        poison(d_out[r], sizeof(float));
        poison(d_scratch, global_norm_scratch_bytes());
        global_norm_squared(d_out[r], d_g, n, d_scratch, 0);
        cudaCheck(cudaDeviceSynchronize());
    }
    double ref = 0.0;
    for (size_t i = 0; i < n; i++) { ref += (double)g[i] * g[i]; }
    float got;
    cudaCheck(cudaMemcpy(&got, d_out[0], sizeof(float), cudaMemcpyDeviceToHost));
    printf("  GPU %.8e CPU %.8e\n", got, ref);
    test_check_rel("squared norm vs CPU", rel_err_f64(&got, &ref, 1), 1e-5);
    test_check_bitwise("squared norm", d_out[0], d_out[1], sizeof(float));
    free(g);
    cudaCheck(cudaFree(d_g));
    cudaCheck(cudaFree(d_out[0]));
    cudaCheck(cudaFree(d_out[1]));
    cudaCheck(cudaFree(d_scratch));
}

int main(void) {
    cudaCheck(cudaSetDevice(0));
    test_begin("test_global_norm" TEST_FLOATX_SUFFIX);
    printf("test_global_norm (%s)\n", FLOATX_NAME);
    Rng rng = rng_seeded(51);
    run_case(1000, &rng);
    run_case(10000005, &rng);
    run_case(124475904, &rng);

    char perf[512] = "benchmarks only in bf16 builds";
#if !defined(ENABLE_FP32)
    {
        const size_t n = 124475904;  // GPT-2 124M
        floatX* g = device_alloc<floatX>(n, "b grads");
        float* out = device_alloc<float>(1, "b out");
        float* scratch = (float*)cuda_malloc_or_die(global_norm_scratch_bytes(), "b scratch");
        fill_random_device(g, n, 1, 1.0f);
        printf("benchmark n=%zu (median of 50 after 10 warm-up)\n", n);
        float ms = bench_median_ms([&] { global_norm_squared(out, g, n, scratch, 0); }, 10, 50);
        double f = report_bandwidth("global_norm_squared (read only)", ms, (double)n * sizeof(floatX));
        snprintf(perf, sizeof(perf), "%.0f%% of 3.0 TB/s (%.3f ms for 124M)", 100 * f, ms);
        cudaCheck(cudaFree(g));
        cudaCheck(cudaFree(out));
        cudaCheck(cudaFree(scratch));
    }
#endif
    printf("performance: %s\n", perf);
    return test_end();
}
