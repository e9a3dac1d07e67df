/*
 * test_harness.h - the one harness of every test program (CPU tests, the GPU test, the kernel
 * tests of dev/cuda). Plain C; it compiles with gcc and, as host code, with nvcc.
 *
 * Output, one line per check and one closing line per program:
 *     PASS <name>[: <detail>]
 *     FAIL <name>[: <detail>]
 *     <program>: <N> passed, <N> failed
 * CI's log reader and dev/mutation_test.py count these lines: names are stable (a bug in
 * dev/mutations/ expects its FAIL line by name), details may carry measured numbers.
 *
 *     test_begin("test_x");                      // once, first
 *     test_check(ok, "name");                    // PASS name / FAIL name
 *     test_checkf(ok, "name", "err %.2e", e);    // with a detail
 *     test_check_le("name", value, tol);         // value <= tol (NaN fails)
 *     test_check_rel("name", rel_err(got, ref, n), tol);   // relative L2 error <= tol
 *     return test_end();                         // closing line; EXIT_FAILURE when any failed
 *                                                //   (or none ran: a test that checks nothing fails)
 *     test_run_child(fn, arg, out, size)         // fn in a fork, output captured: exit status
 *     test_watchdog(seconds, "name") ... test_watchdog(0, NULL)   // code that could hang: past the
 *                                                //   limit, "FAIL name: ..." and exit status 2
 *     test_remove_tree(dir)                      // rm -r a temporary directory
 *
 * Relative error: ||got - ref|| / ||ref|| over n floats, in double; an all-zero reference gives
 * the absolute L2 error; any non-finite value (in got or ref) makes it +inf, so unwritten
 * (NaN-poisoned) outputs always fail. Random data comes from the project generator (rand.h,
 * Rng rng = rng_seeded(seed)), never zeros. test_config builds the small models of the tests from
 * one of the TEST_DIMS_* sizes. CPU tests of code that must end the program (bad input) run it in
 * a forked child and check its exit status and message (test_expect_exit_failure), with files in
 * a scratch directory (test_tmp_*), damaged by the file helpers (test_write_file, test_copy_file,
 * test_xor_byte, test_truncate; a setup failure exits 2). Under nvcc, the last part adds device
 * helpers (floatX upload, NaN poisoning, bitwise comparison of device buffers, a kernel's two runs
 * against a reference and each other, median-of-N timing).
 */
#ifndef OMNIMOE_TEST_HARNESS_H
#define OMNIMOE_TEST_HARNESS_H

#include "utils.h"  // first: it asks for the POSIX feature macro before any system header
#include <stdio.h>
#include <stdlib.h>
#include <stdarg.h>
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <unistd.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <sys/stat.h>
#include <dirent.h>
#include <signal.h>
#include "config.h"
#include "rand.h"

// ----------------------------------------------------------------------------
// checks and the closing line

static const char* test_program = "test";
static int test_num_passed = 0, test_num_failed = 0;

static inline void test_begin(const char* program) {
    test_program = program;
    test_num_passed = 0;
    test_num_failed = 0;
}

static inline int test_report(int ok, const char* name, const char* detail) {
    if (detail != NULL && detail[0] != '\0') printf("%s %s: %s\n", ok ? "PASS" : "FAIL", name, detail);
    else printf("%s %s\n", ok ? "PASS" : "FAIL", name);
    fflush(stdout);  // a later crash keeps the lines before it
    if (ok) test_num_passed++;
    else test_num_failed++;
    return ok;
}

// records one check; returns ok, so a test can stop after a failure that makes the rest moot
static inline int test_check(int ok, const char* name) { return test_report(ok, name, NULL); }

#if defined(__GNUC__)
__attribute__((format(printf, 3, 4)))
#endif
static inline int test_checkf(int ok, const char* name, const char* fmt, ...) {
    char detail[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(detail, sizeof(detail), fmt, ap);
    va_end(ap);
    return test_report(ok, name, detail);
}

// prints "<program>: N passed, N failed"; the program's exit status
static inline int test_end(void) {
    printf("%s: %d passed, %d failed\n", test_program, test_num_passed, test_num_failed);
    fflush(stdout);
    return test_num_failed == 0 && test_num_passed > 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

// ----------------------------------------------------------------------------
// relative error

typedef struct {
    double rel;        // ||got - ref|| / ||ref|| (absolute when ref is all zero); +inf on non-finite
    double max_abs;    // max |got - ref| over the finite pairs
    size_t nonfinite;  // pairs where got or ref is NaN or inf
} RelErr;

// one implementation for both reference types: exactly one of ref32 / ref64 is given
static inline RelErr rel_err_impl(const float* got, const float* ref32, const double* ref64, size_t n) {
    RelErr e = {0.0, 0.0, 0};
    double diff2 = 0.0, ref2 = 0.0;
    for (size_t i = 0; i < n; i++) {
        double r = ref32 != NULL ? (double)ref32[i] : ref64[i];
        double d = (double)got[i] - r;
        if (!isfinite(d)) { e.nonfinite++; continue; }
        diff2 += d * d;
        ref2 += r * r;
        if (fabs(d) > e.max_abs) e.max_abs = fabs(d);
    }
    e.rel = e.nonfinite > 0 ? INFINITY : ref2 > 0.0 ? sqrt(diff2 / ref2) : sqrt(diff2);
    return e;
}

static inline RelErr rel_err(const float* got, const float* ref, size_t n) {
    return rel_err_impl(got, ref, NULL, n);
}
static inline RelErr rel_err_f64(const float* got, const double* ref, size_t n) {
    return rel_err_impl(got, NULL, ref, n);
}

// root mean square of a reference (the scale of random accumulator start values)
static inline double rms(const double* x, size_t n) {
    double s = 0.0;
    for (size_t i = 0; i < n; i++) s += x[i] * x[i];
    return sqrt(s / (n > 0 ? (double)n : 1.0));
}

// PASS when e.rel <= tol; the detail gives the error, the tolerance and the largest difference
// the tanh GELU of GPT-2 and its derivative in double: the references of the GELU kernels
static inline double cpu_gelu(double x) { return 0.5 * x * (1.0 + tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))); }
static inline double cpu_gelu_grad(double x) {
    double u = 0.7978845608028654 * (x + 0.044715 * x * x * x);
    double th = tanh(u);
    return 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x);
}

static inline int test_check_rel(const char* name, RelErr e, double tol) {
    if (e.nonfinite > 0) return test_checkf(0, name, "%zu non-finite values (unwritten or NaN)", e.nonfinite);
    return test_checkf(e.rel <= tol, name, "rel L2 %.2e (tol %.1e), max abs %.2e", e.rel, tol, e.max_abs);
}

// PASS when value <= tol (NaN fails): "PASS name: value (tol tol)"
static inline int test_check_le(const char* name, double value, double tol) {
    return test_checkf(value <= tol, name, "%.3e (tol %.1e)", value, tol);
}

// ----------------------------------------------------------------------------
// random data (the project generator of rand.h; seed it with rng_init)

// a generator seeded with rng_init: Rng rng = rng_seeded(42);
static inline Rng rng_seeded(uint64_t seed) {
    Rng rng;
    rng_init(&rng, seed);
    return rng;
}

// uniform integer in [0, n), n > 0
static inline int rng_int(Rng* rng, int n) { return (int)(rng_u32(rng) % (uint32_t)n); }

// uniform float in [lo, hi)
static inline float rng_uniform(Rng* rng, float lo, float hi) { return lo + (hi - lo) * rng_f32(rng); }

static inline void fill_uniform(float* out, size_t count, float lo, float hi, Rng* rng) {
    for (size_t i = 0; i < count; i++) out[i] = rng_uniform(rng, lo, hi);
}

static inline void fill_normal(float* out, size_t count, float mean, float std, Rng* rng) {
    rng_normal(rng, out, count, mean, std);
}

// token ids uniform in [0, V)
static inline void fill_tokens(int* out, size_t count, int V, Rng* rng) {
    for (size_t i = 0; i < count; i++) out[i] = rng_int(rng, V);
}

// ----------------------------------------------------------------------------
// test models

typedef struct {
    int T, V, Vp, L, NH, C;  // max_seq_len, vocab_size, padded_vocab_size, layers, heads, channels
    int hidden_gelu;         // ffn_hidden of the GELU FFN (4C)
    int hidden_swiglu;       // ffn_hidden (I) of the SwiGLU and OmniMoE FFNs
} TestDims;

// gradchecks: V < Vp so the padding is exercised, C = 8
static const TestDims TEST_DIMS_TINY = {8, 23, 32, 2, 2, 8, 32, 12};
// checkpoints and files: bigger padding (Vp = 128)
static const TestDims TEST_DIMS_MICRO = {8, 50, 128, 2, 2, 8, 32, 16};
// short trainings that must converge (overfit, determinism)
static const TestDims TEST_DIMS_SMALL = {32, 64, 128, 2, 4, 32, 128, 64};
// shapes every GPU kernel accepts (head size 64, widths multiples of 8)
static const TestDims TEST_DIMS_GPU = {64, 500, 512, 2, 2, 128, 512, 192};

// n, k: the expert grid side and top-k (used by FFN_OMNI only, else 0 in the config);
// router_norm and gate are stored for every kind
static inline ModelConfig test_config(TestDims d, int ffn_kind, int n, int k, int router_norm, int gate) {
    ModelConfig c;
    memset(&c, 0, sizeof(c));
    c.max_seq_len = d.T;
    c.vocab_size = d.V;
    c.padded_vocab_size = d.Vp;
    c.num_layers = d.L;
    c.num_heads = d.NH;
    c.channels = d.C;
    c.ffn_kind = ffn_kind;
    c.ffn_hidden = ffn_kind == FFN_GELU ? d.hidden_gelu : d.hidden_swiglu;
    c.router_norm = router_norm;
    c.gate = gate;
    if (ffn_kind == FFN_OMNI) {
        c.router_n = n;
        c.num_experts = n * n;
        c.top_k = k;
    }
    return c;
}

// a moe model (docs/design.md §10): E FFN experts of width Ie, k per token, S shared, the MoE++
// expert counts, gating residuals and renormalised gates; linear router, x as the experts' input
static inline ModelConfig test_moe_config(TestDims d, int Ie, int E, int k, int S, int zero, int copy, int cnst,
                                          int gate_res, int norm_topk) {
    ModelConfig c = test_config(d, FFN_MOE, 0, 0, ROUTER_NORM_BN, GATE_SOFTMAX);
    c.ffn_hidden = Ie;
    c.moe_experts = E;
    c.moe_topk = k;
    c.moe_shared = S;
    c.moe_zero = zero;
    c.moe_copy = copy;
    c.moe_const = cnst;
    c.moe_gate_res = gate_res;
    c.moe_norm_topk = norm_topk;
    return c;
}

// ----------------------------------------------------------------------------
// children: a case that must end the program (exit with a message) runs in a fork

typedef void (*TestChildFn)(void* arg);

// Runs fn(arg) in a forked child with stdout and stderr captured into out (NUL-terminated,
// truncated to out_size). Returns the child's exit status; 999 when fn returned, 1000 + signal
// when it was killed. A child still running after 10 s gets SIGALRM (a hang is a failure).
static inline int test_run_child(TestChildFn fn, void* arg, char* out, size_t out_size) {
    FILE* capture = tmpfile();
    if (capture == NULL) {
        perror("tmpfile");
        exit(2);
    }
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0) {
        perror("fork");
        exit(2);
    }
    if (pid == 0) {
        dup2(fileno(capture), 1);
        dup2(fileno(capture), 2);
        alarm(10);
        fn(arg);
        fflush(NULL);
        _exit(99);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    rewind(capture);
    size_t n = fread(out, 1, out_size - 1, capture);
    out[n] = '\0';
    fclose(capture);
    if (WIFSIGNALED(status)) return 1000 + WTERMSIG(status);
    return WEXITSTATUS(status) == 99 ? 999 : WEXITSTATUS(status);
}

// A watchdog over code that could hang (host threads meeting at barriers, a collective): still
// running `seconds` after test_watchdog(seconds, name), the program prints "FAIL name: ..." and
// ends with status 2, so a hang costs those seconds and not the whole run (a device call's time);
// test_watchdog(0, NULL) disarms it. name must stay valid until then. One at a time (alarm()).
static const char* test_watchdog_name = "";
static void test_watchdog_fire_(int sig) {
    (void)sig;  // only async-signal-safe calls below: write, strlen, _exit
    static const char head[] = "FAIL ", tail[] = ": still running at the watchdog's limit (hung?)\n";
    ssize_t n = write(1, head, sizeof(head) - 1);
    n = write(1, test_watchdog_name, strlen(test_watchdog_name));
    n = write(1, tail, sizeof(tail) - 1);
    (void)n;
    _exit(2);
}
static inline void test_watchdog(unsigned seconds, const char* name) {
    fflush(stdout);  // the handler writes to the descriptor: nothing of stdout may wait in its buffer
    test_watchdog_name = name != NULL ? name : "";
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = seconds > 0 ? test_watchdog_fire_ : SIG_DFL;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGALRM, &sa, NULL);
    alarm(seconds);
}

// rm -r path (a test's temporary directory); symbolic links are removed, not followed
static inline void test_remove_tree(const char* path) {
    struct stat st;
    if (lstat(path, &st) != 0) return;
    if (!S_ISDIR(st.st_mode)) {
        unlink(path);
        return;
    }
    DIR* d = opendir(path);
    struct dirent* e;
    while (d != NULL && (e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
        char child[4096];
        int len = snprintf(child, sizeof(child), "%s/%s", path, e->d_name);
        if (len > 0 && (size_t)len < sizeof(child)) test_remove_tree(child);
    }
    if (d != NULL) closedir(d);
    rmdir(path);
}

// a check whose detail only explains a failure (a path, a message, a child's output): printed
// on FAIL only, on the one line (newlines shown as " | ", at most 600 characters)
static inline int test_check_why(int ok, const char* name, const char* why) {
    if (ok || why == NULL) return test_report(ok, name, NULL);
    char line[612];
    size_t n = 0;
    for (const char* p = why; *p != '\0' && n < 600; p++) {
        if (*p != '\n') line[n++] = *p;
        else if (p[1] != '\0') { memcpy(line + n, " | ", 3); n += 3; }
    }
    line[n] = '\0';
    return test_report(ok, name, line);
}

// fn(arg) must exit with EXIT_FAILURE and print needle1 and needle2 (each NULL = any); the PASS
// line shows the first line of the message, so the log documents what a user would read
static inline int test_expect_exit_failure(const char* name, TestChildFn fn, void* arg, const char* needle1,
                                           const char* needle2) {
    char out[8192], detail[8400];
    int code = test_run_child(fn, arg, out, sizeof(out));
    int ok = code == EXIT_FAILURE;
    if (ok && needle1 && !strstr(out, needle1)) ok = 0;
    if (ok && needle2 && !strstr(out, needle2)) ok = 0;
    if (!ok) {
        snprintf(detail, sizeof(detail), "exit code %d, output: %s", code, out);
        return test_check_why(0, name, detail);
    }
    snprintf(detail, sizeof(detail), "%s", out[0] ? out : "(no message)");
    char* newline = strchr(detail, '\n');
    if (newline) *newline = '\0';
    return test_report(1, name, detail);
}

// ----------------------------------------------------------------------------
// files: a scratch directory /tmp/<program>_XXXXXX per test program (test_tmp_begin makes it,
// test_tmp_end removes it with everything in it)

static char test_tmp_root[256];

static inline void test_tmp_begin(const char* program) {
    snprintf(test_tmp_root, sizeof(test_tmp_root), "/tmp/%s_XXXXXX", program);
    if (mkdtemp(test_tmp_root) == NULL) {
        perror("mkdtemp");
        exit(2);
    }
}

static inline void test_tmp_end(void) { test_remove_tree(test_tmp_root); }

// out = <scratch>/<name>, a new directory
static inline void test_tmp_subdir(char* out, size_t size, const char* name) {
    snprintf(out, size, "%s/%s", test_tmp_root, name);
    if (mkdir(out, 0755) != 0) {
        fprintf(stderr, "test setup: mkdir %s: %s\n", out, strerror(errno));
        exit(2);
    }
}

// the whole file, NUL-terminated (text reads as a string); NULL when unreadable
static inline unsigned char* test_read_file(const char* path, size_t* size) {
    FILE* fp = fopen(path, "rb");
    if (!fp) return NULL;
    struct stat st;
    if (fstat(fileno(fp), &st) != 0) {
        fclose(fp);
        return NULL;
    }
    size_t n = (size_t)st.st_size;
    unsigned char* buf = (unsigned char*)malloc_check(n + 1);
    size_t got = fread(buf, 1, n, fp);
    fclose(fp);
    if (got != n) {
        free(buf);
        return NULL;
    }
    buf[n] = '\0';
    *size = n;
    return buf;
}

static inline int test_file_exists(const char* path) {
    struct stat st;
    return stat(path, &st) == 0;
}

// the whole file at path := data[0, size)
static inline void test_write_file(const char* path, const void* data, size_t size) {
    FILE* fp = fopen_check(path, "wb");
    fwrite_check(data, 1, size, fp, path);
    fclose_check(fp, path);
}

static inline void test_copy_file(const char* from, const char* to) {
    size_t n;
    unsigned char* buf = test_read_file(from, &n);
    if (!buf) {
        fprintf(stderr, "test setup: cannot read %s\n", from);
        exit(2);
    }
    test_write_file(to, buf, n);
    free(buf);
}

// the byte at offset ^= mask (the file's size unchanged)
static inline void test_xor_byte(const char* path, long offset, unsigned char mask) {
    FILE* fp = fopen_check(path, "r+b");
    fseek_check(fp, offset, SEEK_SET, path);
    int c = fgetc(fp);
    fseek_check(fp, offset, SEEK_SET, path);
    fputc(c ^ mask, fp);
    fclose_check(fp, path);
}

static inline void test_truncate(const char* path, long size) {
    if (truncate(path, (off_t)size) != 0) {
        fprintf(stderr, "test setup: truncate %s failed\n", path);
        exit(2);
    }
}

// ----------------------------------------------------------------------------
// device helpers (nvcc only)
#if defined(__CUDACC__)

#include <vector>
#include <algorithm>
#include "cuda_utils.cuh"

// 1 when a CUDA device is present; else prints "SKIPPED: <program> needs a CUDA device" and
// returns 0 (the GPU programs then exit 0: CI machines have no GPU)
static inline int test_cuda_device_or_skip(const char* program) {
    int device_count = 0;
    if (cudaGetDeviceCount(&device_count) == cudaSuccess && device_count > 0) return 1;
    printf("SKIPPED: %s needs a CUDA device\n", program);
    return 0;
}

// tolerance of floatX outputs against a double reference: bf16 outputs carry a relative
// rounding error of up to 2^-8 per element, about 0.2% in norm; 1e-2 leaves room for fp32
// accumulation-order differences and fails on any real indexing or math bug (errors of order 1)
#if defined(ENABLE_FP32)
#define TOL_FLOATX 1e-5
#define TEST_FLOATX_SUFFIX "_fp32"  // program names: test_x (bf16) and test_x_fp32, as the binaries
#else
#define TOL_FLOATX 1e-2
#define TEST_FLOATX_SUFFIX ""
#endif

static inline float* host_alloc(size_t n) { return (float*)malloc_check((n > 0 ? n : 1) * sizeof(float)); }
static inline double* ref_alloc(size_t n) { return (double*)calloc_check(n > 0 ? n : 1, sizeof(double)); }

template <class T>
static inline T* device_alloc(size_t n, const char* what) {
    return (T*)cuda_malloc_or_die(n * sizeof(T), what);
}

// round host values to floatX in place (what the GPU will hold) and upload them
static inline void upload_rounded(floatX* device, float* host, size_t n) {
    for (size_t i = 0; i < n; i++) host[i] = host_round_to_floatX(host[i]);
    upload_floatX(device, host, n);
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

// all-ones bytes: NaN in bf16 and fp32, -1 in ints
static inline void poison(void* device, size_t bytes) { cudaCheck(cudaMemset(device, 0xFF, bytes)); }

static inline int device_bitwise_equal(const void* a, const void* b, size_t bytes) {
    unsigned char* ha = (unsigned char*)malloc_check(bytes + 1);
    unsigned char* hb = (unsigned char*)malloc_check(bytes + 1);
    cudaCheck(cudaMemcpy(ha, a, bytes, cudaMemcpyDeviceToHost));
    cudaCheck(cudaMemcpy(hb, b, bytes, cudaMemcpyDeviceToHost));
    int equal = memcmp(ha, hb, bytes) == 0;
    free(ha);
    free(hb);
    return equal;
}

// "run twice bitwise identical: <what>"
static inline int test_check_bitwise(const char* what, const void* a, const void* b, size_t bytes) {
    char name[256];
    snprintf(name, sizeof(name), "run twice bitwise identical: %s", what);
    return test_check(device_bitwise_equal(a, b, bytes), name);
}

// The two runs of a kernel test: run 0's output against a float64 reference (relative L2 error
// <= tol, check `name`) and run 1 bitwise equal to run 0; floatX or fp32 outputs of n elements
static inline void test_check_runs(const char* name, floatX* const runs[2], const double* ref, size_t n, double tol) {
    float* got = download_floatX_alloc(runs[0], n);
    test_check_rel(name, rel_err_f64(got, ref, n), tol);
    test_check_bitwise(name, runs[0], runs[1], n * sizeof(floatX));
    free(got);
}
#if !defined(ENABLE_FP32)  // with floatX = float the overload above is this one
static inline void test_check_runs(const char* name, float* const runs[2], const double* ref, size_t n, double tol) {
    float* got = download_floats(runs[0], n);
    test_check_rel(name, rel_err_f64(got, ref, n), tol);
    test_check_bitwise(name, runs[0], runs[1], n * sizeof(float));
    free(got);
}
#endif

// random floatX data generated on the device (large benchmark buffers): a hash of the index,
// uniform in [-scale, scale)
__global__ void fill_random_device_kernel(floatX* x, size_t n, uint64_t seed, float scale) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    uint64_t z = seed + 0x9E3779B97F4A7C15ull * (i + 1);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    x[i] = (floatX)(scale * (float)((z >> 40) * (1.0 / 8388608.0) - 1.0));
}

static inline void fill_random_device(floatX* x, size_t n, uint64_t seed, float scale) {
    if (n == 0) return;
    fill_random_device_kernel<<<(unsigned)ceil_div_sz(n, 256), 256>>>(x, n, seed, scale);
    cudaCheckLast();
}

// median over `iters` timed launches of f() after `warmup` untimed ones (milliseconds)
template <class F>
static float bench_median_ms(F f, int warmup, int iters) {
    for (int i = 0; i < warmup; i++) f();
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

// benchmark lines of the kernel tests (bf16 builds), as a fraction of the ceilings: an H100's
// measured copy bandwidth (read + write) and this card's dense bf16 tensor-core peak
// (cuda_peak_bf16_flops: the one table, also the trainer's MFU)
#define H100_COPY_BANDWIDTH_BYTES_PER_S 3.0e12
static inline double test_peak_bf16_flops(void) {
    int dev = 0;
    cudaDeviceProp prop;
    cudaCheck(cudaGetDevice(&dev));
    cudaCheck(cudaGetDeviceProperties(&prop, dev));
    return cuda_peak_bf16_flops(prop.name);
}

static inline double report_bandwidth(const char* what, float ms, double bytes) {
    double bw = bytes / (ms * 1e-3);
    double frac = bw / H100_COPY_BANDWIDTH_BYTES_PER_S;
    printf("  [BENCH] %-40s %8.3f ms  %7.1f GB/s  %5.1f%% of 3.0 TB/s\n", what, ms, bw / 1e9, 100.0 * frac);
    return frac;
}

static inline double report_flops(const char* what, float ms, double flops) {
    double rate = flops / (ms * 1e-3);
    double peak = test_peak_bf16_flops();
    double frac = peak > 0 ? rate / peak : 0.0;
    printf("  [BENCH] %-40s %8.3f ms  %7.1f TFLOP/s  %5.1f%% of %g\n", what, ms, rate / 1e12, 100.0 * frac, peak / 1e12);
    return frac;
}

#endif  // __CUDACC__

#endif  // OMNIMOE_TEST_HARNESS_H
