/*
std_test_utils.cuh - helpers shared by the standard-kernel tests in dev/cuda/ (test_*.cu).

Random data (deterministic seeds), floatX upload that hands back the rounded values the GPU
sees (so CPU references start from identical inputs), relative-error checks that fail on
NaN, NaN poisoning, bitwise comparison of device buffers, median-of-N event timing, and the
"SUMMARY|" lines that dev/cuda/run_std.sh collects into its final table.
*/
#ifndef OMNIMOE_STD_TEST_UTILS_CUH
#define OMNIMOE_STD_TEST_UTILS_CUH

#include <math.h>
#include <vector>
#include <algorithm>
#include "../../llmc/cuda_utils.cuh"

// H100 ceilings used for the "fraction of ceiling" columns (see the briefs: measured copy
// bandwidth counting read + write, and the dense bf16 tensor-core rate)
#define H100_COPY_BANDWIDTH_BYTES_PER_S 3.0e12
#define H100_BF16_FLOPS_PER_S 755e12

// tolerances: bf16 outputs carry a relative rounding error of up to 2^-8 (0.4%) per element,
// about 0.2% in norm; 1e-2 leaves room for fp32 accumulation-order differences and fails on
// any real indexing/math bug (those give errors of order 1). fp32 builds get 1e-5.
#if defined(ENABLE_FP32)
#define TOL_FLOATX 1e-5
#else
#define TOL_FLOATX 1e-2
#endif

static int g_failures = 0;

// ---------------------------------------------------------------------------- random numbers
typedef struct { uint64_t state; } Rng;

static inline uint64_t rng_next(Rng* rng) {  // splitmix64
    uint64_t z = (rng->state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
// uniform in [-1, 1)
static inline float rng_uniform(Rng* rng) { return (float)((rng_next(rng) >> 40) * (1.0 / 8388608.0) - 1.0); }
static inline int rng_int(Rng* rng, int n) { return (int)(rng_next(rng) % (uint64_t)n); }

static inline void fill_uniform(float* x, size_t n, float lo, float hi, Rng* rng) {
    for (size_t i = 0; i < n; i++) { x[i] = lo + (hi - lo) * 0.5f * (rng_uniform(rng) + 1.0f); }
}

// round host values to floatX in place (what the GPU will hold) and upload them
static inline void upload_rounded(floatX* device, float* host, size_t n) {
    for (size_t i = 0; i < n; i++) { host[i] = host_round_to_floatX(host[i]); }
    upload_floatX(device, host, n);
}

static inline float* host_alloc(size_t n) {
    float* p = (float*)malloc(n * sizeof(float));
    if (p == NULL) { fprintf(stderr, "out of host memory (%zu floats)\n", n); exit(EXIT_FAILURE); }
    return p;
}

template <class T>
static inline T* device_alloc(size_t n, const char* what) {
    return (T*)cuda_malloc_or_die(n * sizeof(T), what);
}

// fill with all-ones bytes: NaN for both bf16 and fp32 (and -1 for ints)
static inline void poison(void* device, size_t bytes) { cudaCheck(cudaMemset(device, 0xFF, bytes)); }

// random floatX data generated on the device (for large benchmark buffers): a hash of the
// index, uniform in [-scale, scale)
__global__ void fill_random_device_kernel(floatX* x, size_t n, uint64_t seed, float scale) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) { return; }
    uint64_t z = seed + 0x9E3779B97F4A7C15ull * (i + 1);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    x[i] = (floatX)(scale * (float)((z >> 40) * (1.0 / 8388608.0) - 1.0));
}

static inline void fill_random_device(floatX* x, size_t n, uint64_t seed, float scale) {
    if (n == 0) { return; }
    fill_random_device_kernel<<<(unsigned)ceil_div_sz(n, 256), 256>>>(x, n, seed, scale);
    cudaCheckLast();
}

// ---------------------------------------------------------------------------- checks
static inline double rel_error(const float* got, const double* ref, size_t n, size_t* nonfinite_out) {
    double diff2 = 0.0, ref2 = 0.0;
    size_t nonfinite = 0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(got[i])) { nonfinite++; continue; }
        double d = (double)got[i] - ref[i];
        diff2 += d * d;
        ref2 += ref[i] * ref[i];
    }
    if (nonfinite_out) { *nonfinite_out = nonfinite; }
    if (nonfinite > 0) { return INFINITY; }
    return sqrt(diff2 / (ref2 > 0 ? ref2 : 1e-300));
}

static inline void check_rel(const char* what, const float* got, const double* ref, size_t n, double tol) {
    size_t nonfinite = 0;
    double err = rel_error(got, ref, n, &nonfinite);
    int ok = err <= tol;
    if (!ok) { g_failures++; }
    if (nonfinite > 0) {
        printf("  [%s] %-44s %zu non-finite values (unwritten or NaN)\n", ok ? "PASS" : "FAIL", what, nonfinite);
    } else {
        printf("  [%s] %-44s rel_err %.3e (tol %.1e)\n", ok ? "PASS" : "FAIL", what, err, tol);
    }
}

static inline void check_true(const char* what, int ok) {
    if (!ok) { g_failures++; }
    printf("  [%s] %s\n", ok ? "PASS" : "FAIL", what);
}

static inline int device_bitwise_equal(const void* a, const void* b, size_t bytes) {
    unsigned char* ha = (unsigned char*)malloc(bytes);
    unsigned char* hb = (unsigned char*)malloc(bytes);
    if (ha == NULL || hb == NULL) { fprintf(stderr, "out of host memory\n"); exit(EXIT_FAILURE); }
    cudaCheck(cudaMemcpy(ha, a, bytes, cudaMemcpyDeviceToHost));
    cudaCheck(cudaMemcpy(hb, b, bytes, cudaMemcpyDeviceToHost));
    int equal = memcmp(ha, hb, bytes) == 0;
    free(ha);
    free(hb);
    return equal;
}

static inline void check_bitwise(const char* what, const void* a, const void* b, size_t bytes) {
    char label[256];
    snprintf(label, sizeof(label), "run twice bitwise identical: %s", what);
    check_true(label, device_bitwise_equal(a, b, bytes));
}

static inline float* download_floats(const float* device, size_t n) {
    float* h = host_alloc(n);
    cudaCheck(cudaMemcpy(h, device, n * sizeof(float), cudaMemcpyDeviceToHost));
    return h;
}

static inline float* download_floatX_alloc(const floatX* device, size_t n) {
    float* h = host_alloc(n);
    download_floatX(h, device, n);
    return h;
}

static inline double* ref_alloc(size_t n) {
    double* p = (double*)calloc(n, sizeof(double));
    if (p == NULL) { fprintf(stderr, "out of host memory (%zu doubles)\n", n); exit(EXIT_FAILURE); }
    return p;
}

static inline double rms(const double* x, size_t n) {
    double s = 0.0;
    for (size_t i = 0; i < n; i++) { s += x[i] * x[i]; }
    return sqrt(s / (n > 0 ? n : 1));
}

// ---------------------------------------------------------------------------- timing
// median over `iters` timed launches of f() after `warmup` untimed ones (milliseconds)
template <class F>
static float bench_median_ms(F f, int warmup, int iters) {
    for (int i = 0; i < warmup; i++) { f(); }
    cudaCheck(cudaDeviceSynchronize());
    std::vector<cudaEvent_t> starts(iters), stops(iters);
    for (int i = 0; i < iters; i++) {
        cudaCheck(cudaEventCreate(&starts[i]));
        cudaCheck(cudaEventCreate(&stops[i]));
    }
    for (int i = 0; i < iters; i++) {
        cudaCheck(cudaEventRecord(starts[i], 0));
        f();
        cudaCheck(cudaEventRecord(stops[i], 0));
    }
    cudaCheck(cudaDeviceSynchronize());
    std::vector<float> times(iters);
    for (int i = 0; i < iters; i++) {
        cudaCheck(cudaEventElapsedTime(&times[i], starts[i], stops[i]));
        cudaCheck(cudaEventDestroy(starts[i]));
        cudaCheck(cudaEventDestroy(stops[i]));
    }
    std::sort(times.begin(), times.end());
    return times[iters / 2];
}

// prints one benchmark line and returns the fraction of the copy ceiling
static inline double report_bandwidth(const char* what, float ms, double bytes) {
    double bw = bytes / (ms * 1e-3);
    double frac = bw / H100_COPY_BANDWIDTH_BYTES_PER_S;
    printf("  [BENCH] %-40s %8.3f ms  %7.1f GB/s  %5.1f%% of 3.0 TB/s\n", what, ms, bw / 1e9, 100.0 * frac);
    return frac;
}

static inline double report_flops(const char* what, float ms, double flops) {
    double rate = flops / (ms * 1e-3);
    double frac = rate / H100_BF16_FLOPS_PER_S;
    printf("  [BENCH] %-40s %8.3f ms  %7.1f TFLOP/s  %5.1f%% of 755\n", what, ms, rate / 1e12, 100.0 * frac);
    return frac;
}

// the line run_std.sh collects; returns the process exit code
static inline int finish_test(const char* name, const char* perf_summary) {
    printf("SUMMARY| %-16s | %-6s | %-4s | %3d failed | %s\n", name, FLOATX_NAME, g_failures == 0 ? "PASS" : "FAIL",
           g_failures, perf_summary);
    return g_failures == 0 ? 0 : 1;
}

#endif  // OMNIMOE_STD_TEST_UTILS_CUH
