/*
 * bench_param_init.c - time of the host initialisation of the weights (docs/design.md §1.3):
 * the sequential model_init_params (llmc/config.h) against the threaded
 * model_init_params_threads (llmc/param_init.h), and a bitwise comparison of the two.
 *
 *   gcc -O2 -std=c11 -I. dev/bench_param_init.c -o dev/bench_param_init_bin -lm -lpthread
 *   ./dev/bench_param_init_bin [preset [experts [threads [sequential]]]]
 *       preset d12, experts 0 (the preset's N), threads 0 (every core), sequential 1
 *       (0 skips the sequential run and the comparison: N = 262,144 takes minutes on one core)
 */
#include "llmc/utils.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "llmc/config.h"
#include "llmc/param_init.h"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

int main(int argc, char** argv) {
    const char* preset = argc > 1 ? argv[1] : "d12";
    int experts = argc > 2 ? atoi(argv[2]) : 0;
    int threads = argc > 3 ? atoi(argv[3]) : 0;
    int sequential = argc > 4 ? atoi(argv[4]) : 1;
    if (threads <= 0) threads = host_num_cores();
    ModelConfig c;
    if (!model_config_preset(&c, preset, FFN_OMNI)) { fprintf(stderr, "unknown preset %s\n", preset); return 1; }
    if (experts > 0) {
        int n = 1;
        while ((n + 1) * (n + 1) <= experts) n++;
        if (n * n != experts) { fprintf(stderr, "experts must be a square, got %d\n", experts); return 1; }
        c.router_n = n;
        c.num_experts = experts;
    }
    size_t P = model_config_num_params(&c);
    float* par = (float*)malloc_check(P * sizeof(float));
    double t0 = now_s();
    model_init_params_threads(&c, par, 42, threads);
    double t_par = now_s() - t0;
    printf("%s N=%d: %zu parameters, %d threads: %.2f s (%.2f ms per million)\n", preset, c.num_experts, P, threads,
           t_par, 1e3 * t_par / (P / 1e6));
    if (sequential) {
        float* seq = (float*)malloc_check(P * sizeof(float));
        t0 = now_s();
        model_init_params(&c, seq, 42);
        double t_seq = now_s() - t0;
        int equal = memcmp(seq, par, P * sizeof(float)) == 0;
        printf("sequential: %.2f s (%.2f ms per million); speed-up %.2fx; bitwise %s\n", t_seq,
               1e3 * t_seq / (P / 1e6), t_seq / t_par, equal ? "equal" : "DIFFERENT");
        free(seq);
        if (!equal) return 1;
    }
    free(par);
    return 0;
}
