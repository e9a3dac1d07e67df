/*
 * host_threads.h - run one function on every host core (POSIX threads), for the start-up work
 * that scales with the parameter count: drawing the initial weights (param_init.h) and rounding
 * them to floatX for the GPU (cuda_utils.cuh upload_floatX). Plain C: gcc -std=c11 and nvcc.
 *
 *   host_num_cores()                       online cores (sysconf), 1..HOST_THREADS_MAX
 *   host_threads_run(fn, ctx, threads)     fn(ctx, t, threads) for t = 0..threads-1, t = 0 in the
 *                                          caller; returns when all have returned
 *   host_range_part(n, t, threads, &lo, &hi)  thread t's contiguous share of [0, n)
 *
 * Determinism is the caller's: each t must write its own outputs and no t may read what another
 * writes, so the result does not depend on the schedule or the thread count. A thread that cannot
 * be started runs in the caller after the others (same results, only slower).
 */
#ifndef OMNIMOE_HOST_THREADS_H
#define OMNIMOE_HOST_THREADS_H

#include <stddef.h>
#include <pthread.h>
#include <unistd.h>

#define HOST_THREADS_MAX 256

typedef void (*HostThreadFn)(void* ctx, int thread, int num_threads);

typedef struct {
    HostThreadFn fn;
    void* ctx;
    int thread, num_threads;
} HostThreadTask;

static inline int host_num_cores(void) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    if (n < 1) return 1;
    return n > HOST_THREADS_MAX ? HOST_THREADS_MAX : (int)n;
}

static void* host_thread_entry(void* arg) {
    HostThreadTask* task = (HostThreadTask*)arg;
    task->fn(task->ctx, task->thread, task->num_threads);
    return NULL;
}

static inline void host_threads_run(HostThreadFn fn, void* ctx, int num_threads) {
    if (num_threads < 1) num_threads = 1;
    if (num_threads > HOST_THREADS_MAX) num_threads = HOST_THREADS_MAX;
    HostThreadTask tasks[HOST_THREADS_MAX];
    pthread_t ids[HOST_THREADS_MAX];
    int started[HOST_THREADS_MAX];
    for (int t = 0; t < num_threads; t++) {
        HostThreadTask task = {fn, ctx, t, num_threads};
        tasks[t] = task;
    }
    for (int t = 1; t < num_threads; t++) started[t] = pthread_create(&ids[t], NULL, host_thread_entry, &tasks[t]) == 0;
    fn(ctx, 0, num_threads);
    for (int t = 1; t < num_threads; t++) {
        if (started[t]) pthread_join(ids[t], NULL);
        else fn(ctx, t, num_threads);
    }
}

// [lo, hi) = [t*n/T, (t+1)*n/T): the shares tile [0, n) in thread order
static inline void host_range_part(size_t n, int thread, int num_threads, size_t* lo, size_t* hi) {
    *lo = (size_t)((unsigned long long)n * thread / num_threads);
    *hi = (size_t)((unsigned long long)n * (thread + 1) / num_threads);
}

#endif // OMNIMOE_HOST_THREADS_H
