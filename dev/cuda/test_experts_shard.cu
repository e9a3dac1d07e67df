/*
test_experts_shard.cu - the column-sharded experts on one GPU (llmc/experts_shard.cuh,
docs/sharding.md §3.1 and §5.2): P ranks are P host threads on the same device, each running
experts_shard_forward and experts_shard_backward (the trainer's calls) on its own BT tokens and
only its packed (N, C/P) slices of U, V, dU and dV. The exchanges are device copies between the
threads' buffers at barriers (llmc/expert_shard_threads.cuh): byte for byte what the NCCL
collectives deliver (all-gather, all-to-all). Against the unsharded experts_forward /
experts_backward (llmc/experts.cuh) on the concatenated batch:

  - P | 32 (bf16 build): s, Y, dX, dgate, dU and dV BITWISE equal (dU, dV against the unsharded
    backward of dY scaled by 1/P, exact for P a power of two), token- and expert-centric, at
    d12's C = 768 and at C = 128, k = 16 and 32;
  - P = 3: within tolerance (s 1e-5, floatX outputs TOL_FLOATX): deterministic, another tree;
  - the host model of the lane order (llmc/expert_shard.h, expert_shard_dot_partial + tree, as
    test_expert_shard.c uses it on the CPU) gives the GPU's s bitwise, so the CPU proof is about
    the kernel the GPU runs;
  - every buffer a rank receives or computes is NaN-poisoned first.

Build and run from the repository root: make dev/cuda/test_experts_shard_bin &&
./dev/cuda/test_experts_shard_bin (bf16 only: in fp32 builds a 16-byte vector holds 4 channels,
not the 8 of the column map, so the bitwise claim does not hold there).
Ran on one H200 on 2026-12-05 (dev/gpu_check.sh, trees 2dfe8d1 and 732073b): 138 passed, 0 failed.
*/
#include <pthread.h>
#include <vector>
#include "../../llmc/test_harness.h"
#include "../../llmc/experts_shard.cuh"
#include "../../llmc/expert_shard_threads.cuh"  // the exchanges of P rank threads

#define MAX_P 8

template <class T>
static T* dalloc(size_t n) { return device_alloc<T>(n > 0 ? n : 1, "test_experts_shard"); }

static void d2d(void* dst, const void* src, size_t bytes) {
    cudaCheck(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToDevice));
}

static std::vector<unsigned char> download_bytes(const void* device, size_t bytes) {
    std::vector<unsigned char> h(bytes);
    cudaCheck(cudaMemcpy(h.data(), device, bytes, cudaMemcpyDeviceToHost));
    return h;
}

static floatX* upload_floatX_copy(const floatX* device_src, size_t n) {
    floatX* d = dalloc<floatX>(n);
    d2d(d, device_src, n * sizeof(floatX));
    return d;
}

static ExpertSchedule schedule_alloc(int A, int N) {
    ExpertSchedule s;
    const int amax = scheduler_max_active(A, N);
    s.sorted_pair = dalloc<int>(A); s.sorted_expert = dalloc<int>(A); s.sorted_active = dalloc<int>(A);
    s.active_expert = dalloc<int>(amax); s.active_offset = dalloc<int>(amax + 1); s.num_active = dalloc<int>(1);
    return s;
}

static void schedule_free(ExpertSchedule s) {
    cudaCheck(cudaFree(s.sorted_pair)); cudaCheck(cudaFree(s.sorted_expert)); cudaCheck(cudaFree(s.sorted_active));
    cudaCheck(cudaFree(s.active_expert)); cudaCheck(cudaFree(s.active_offset)); cudaCheck(cudaFree(s.num_active));
}

// one rank: its own rows of Y and dX, its packed slices, its saved state and work buffer
struct Rank {
    int r, P, BT, C, k, N;
    float scale;
    const floatX *X, *dY;
    const int* idx;
    const float* gate;
    floatX *Y, *dX, *U, *V, *dU, *dV;
    float *s, *dgate;
    void *saved_buf, *work;
    size_t work_bytes;
    ExpertShardComm comm;
};

static void* rank_main(void* arg) {
    Rank* q = (Rank*)arg;
    cudaCheck(cudaSetDevice(0));
    cudaStream_t stream;
    cudaCheck(cudaStreamCreate(&stream));
    ExpertShardSaved saved = experts_shard_saved_carve(q->saved_buf, q->BT, q->C, q->k, q->P);
    experts_shard_forward(q->Y, q->s, q->X, q->U, q->V, q->idx, q->gate, saved, q->BT, q->C, q->k, q->N, 1, &q->comm,
                          q->work, q->work_bytes, stream);
    experts_shard_backward(q->dX, q->dU, q->dV, q->dgate, q->dY, q->U, q->V, q->gate, q->s, saved, q->BT, q->C, q->k,
                           q->N, q->scale, 1, &q->comm, q->work, q->work_bytes, stream);
    cudaCheck(cudaStreamSynchronize(stream));
    cudaCheck(cudaStreamDestroy(stream));
    return NULL;
}

// bitwise or within tolerance, by name
static void compare(const char* label, const char* what, const void* got, const void* ref, size_t n, int is_floatX,
                    int bitwise, double tol) {
    char name[256];
    snprintf(name, sizeof(name), "%s - %s", label, what);
    const size_t bytes = n * (is_floatX ? sizeof(floatX) : sizeof(float));
    if (bitwise) {
        test_checkf(memcmp(got, ref, bytes) == 0, name, "bitwise (%zu values)", n);
        return;
    }
    std::vector<float> a(n), b(n);
    for (size_t i = 0; i < n; i++) {
        a[i] = is_floatX ? (float)((const floatX*)got)[i] : ((const float*)got)[i];
        b[i] = is_floatX ? (float)((const floatX*)ref)[i] : ((const float*)ref)[i];
    }
    test_check_rel(name, rel_err(a.data(), b.data(), n), tol);
}

static void run_case(int P, int BT, int C, int k, int N, int exec, Rng* rng) {
    const int T = P * BT, pairs = BT * k, A = T * k, cols = C / P;
    const int exact = expert_shard_lanes(P) * P == 32 && sizeof(floatX) == 2;
    char label[160];
    snprintf(label, sizeof(label), "P=%d C=%d k=%d N=%d BT=%d %s", P, C, k, N, BT, exec == EXPERT_EXEC_TOKEN ? "token" : "expert");
    printf("case %s\n", label);

    // the whole batch on the host (rounded to floatX as uploaded) and on the device
    const size_t TC = (size_t)T * C, NC = (size_t)N * C;
    float *x = host_alloc(TC), *y0 = host_alloc(TC), *dy = host_alloc(TC), *dys = host_alloc(TC), *dx0 = host_alloc(TC);
    float *u = host_alloc(NC), *v = host_alloc(NC), *du0 = host_alloc(NC), *dv0 = host_alloc(NC), *gate = host_alloc(A);
    std::vector<int> idx(A);
    fill_normal(x, TC, 0.0f, 1.0f, rng); fill_normal(y0, TC, 0.0f, 0.5f, rng); fill_normal(dy, TC, 0.0f, 1.0f, rng);
    fill_normal(dx0, TC, 0.0f, 0.5f, rng); fill_normal(u, NC, 0.0f, 1.0f / sqrtf((float)C), rng);
    fill_normal(v, NC, 0.0f, 0.3f, rng); fill_normal(du0, NC, 0.0f, 0.1f, rng); fill_normal(dv0, NC, 0.0f, 0.1f, rng);
    for (int t = 0; t < T; t++) {  // k distinct experts per token, a third from 4 hot ones (long segments)
        for (int m = 0; m < k; m++) {
            int e, dup;
            do {
                e = rng_int(rng, 3) == 0 ? rng_int(rng, 4) : rng_int(rng, N);
                dup = 0;
                for (int j = 0; j < m; j++) dup |= idx[(size_t)t * k + j] == e;
            } while (dup);
            idx[(size_t)t * k + m] = e;
            gate[(size_t)t * k + m] = rng_uniform(rng, 0.05f, 1.0f);
        }
    }
    floatX *X = dalloc<floatX>(TC), *Y0 = dalloc<floatX>(TC), *dY = dalloc<floatX>(TC), *dYs = dalloc<floatX>(TC);
    floatX *dX0 = dalloc<floatX>(TC), *U = dalloc<floatX>(NC), *V = dalloc<floatX>(NC), *dU0 = dalloc<floatX>(NC);
    floatX* dV0 = dalloc<floatX>(NC);
    upload_rounded(X, x, TC); upload_rounded(Y0, y0, TC); upload_rounded(dY, dy, TC); upload_rounded(dX0, dx0, TC);
    upload_rounded(U, u, NC); upload_rounded(V, v, NC); upload_rounded(dU0, du0, NC); upload_rounded(dV0, dv0, NC);
    for (size_t i = 0; i < TC; i++) dys[i] = dy[i] * (1.0f / (float)P);  // exact for P a power of two
    upload_rounded(dYs, dys, TC);
    int* d_idx = dalloc<int>(A);
    float* d_gate = dalloc<float>(A);
    cudaCheck(cudaMemcpy(d_idx, idx.data(), (size_t)A * sizeof(int), cudaMemcpyHostToDevice));
    cudaCheck(cudaMemcpy(d_gate, gate, (size_t)A * sizeof(float), cudaMemcpyHostToDevice));

    // the unsharded reference on the concatenated batch
    ExpertsOptions opt = {N, k, exec, 1};
    ExpertSchedule sched = schedule_alloc(A, N);
    const size_t sched_bytes = scheduler_scratch_bytes(A, N), bwd_bytes = experts_backward_scratch_bytes(T, C, k);
    void* sched_scratch = dalloc<char>(sched_bytes);
    void* bwd_scratch = dalloc<char>(bwd_bytes);
    scheduler_build(sched, NULL, d_idx, A, N, sched_scratch, sched_bytes, 0);
    floatX *Y_ref = upload_floatX_copy(Y0, TC), *dX_ref = upload_floatX_copy(dX0, TC), *dX_tmp = upload_floatX_copy(dX0, TC);
    floatX *dU_tmp = upload_floatX_copy(dU0, NC), *dV_tmp = upload_floatX_copy(dV0, NC);
    floatX *dU_ref = upload_floatX_copy(dU0, NC), *dV_ref = upload_floatX_copy(dV0, NC);
    float *s_ref = dalloc<float>(A), *dgate_ref = dalloc<float>(A), *dgate_tmp = dalloc<float>(A);
    experts_forward(Y_ref, s_ref, X, U, V, d_idx, d_gate, sched, T, C, opt, 0);
    experts_backward(dX_ref, dU_tmp, dV_tmp, dgate_ref, dY, X, U, V, d_idx, d_gate, s_ref, sched, T, C, opt,
                     bwd_scratch, bwd_bytes, 0);
    experts_backward(dX_tmp, dU_ref, dV_ref, dgate_tmp, dYs, X, U, V, d_idx, d_gate, s_ref, sched, T, C, opt,
                     bwd_scratch, bwd_bytes, 0);
    cudaCheck(cudaDeviceSynchronize());

    // the ranks: own rows of Y and dX, packed slices of the tables (packed on the host, as bytes),
    // every buffer the driver writes NaN-poisoned; then P threads run forward and backward
    std::vector<unsigned char> hU = download_bytes(U, NC * sizeof(floatX)), hV = download_bytes(V, NC * sizeof(floatX));
    std::vector<unsigned char> hdU = download_bytes(dU0, NC * sizeof(floatX)), hdV = download_bytes(dV0, NC * sizeof(floatX));
    std::vector<unsigned char> slice((size_t)N * cols * sizeof(floatX));
    const size_t saved_bytes = experts_shard_saved_bytes(BT, C, k, P), work_bytes = experts_shard_work_bytes(BT, C, k, N, P);
    ShardThreads shared;
    shard_threads_init(&shared, P, NULL);  // the ranks run concurrently: the shard kernels share no state
    Rank R[MAX_P];
    for (int r = 0; r < P; r++) {
        Rank* q = &R[r];
        q->r = r; q->P = P; q->BT = BT; q->C = C; q->k = k; q->N = N; q->scale = 1.0f / (float)P;
        q->X = X + (size_t)r * BT * C;
        q->dY = dY + (size_t)r * BT * C;
        q->idx = d_idx + (size_t)r * pairs;
        q->gate = d_gate + (size_t)r * pairs;
        q->Y = upload_floatX_copy(Y0 + (size_t)r * BT * C, (size_t)BT * C);
        q->dX = upload_floatX_copy(dX0 + (size_t)r * BT * C, (size_t)BT * C);
        floatX** tables[4] = {&q->U, &q->V, &q->dU, &q->dV};
        const std::vector<unsigned char>* full[4] = {&hU, &hV, &hdU, &hdV};
        for (int i = 0; i < 4; i++) {
            expert_shard_pack(slice.data(), full[i]->data(), sizeof(floatX), (size_t)N, C, P, r);
            *tables[i] = dalloc<floatX>((size_t)N * cols);
            cudaCheck(cudaMemcpy(*tables[i], slice.data(), slice.size(), cudaMemcpyHostToDevice));
        }
        q->s = dalloc<float>(pairs); q->dgate = dalloc<float>(pairs);
        q->saved_buf = dalloc<char>(saved_bytes);
        q->work = dalloc<char>(work_bytes);
        q->work_bytes = work_bytes;
        poison(q->s, (size_t)pairs * sizeof(float)); poison(q->dgate, (size_t)pairs * sizeof(float));
        poison(q->saved_buf, saved_bytes); poison(q->work, work_bytes);
        q->comm = shard_threads_comm(&shared, r);
    }
    cudaCheck(cudaDeviceSynchronize());
    pthread_t threads[MAX_P];
    for (int r = 0; r < P; r++) pthread_create(&threads[r], NULL, rank_main, &R[r]);
    for (int r = 0; r < P; r++) pthread_join(threads[r], NULL);
    shard_threads_destroy(&shared);
    cudaCheck(cudaDeviceSynchronize());

    // assemble the ranks' outputs and compare
    std::vector<float> s_got(A), dgate_got(A);
    std::vector<floatX> Y_got(TC), dX_got(TC), dU_got(NC), dV_got(NC);
    for (int r = 0; r < P; r++) {
        cudaCheck(cudaMemcpy(&s_got[(size_t)r * pairs], R[r].s, (size_t)pairs * sizeof(float), cudaMemcpyDeviceToHost));
        cudaCheck(cudaMemcpy(&dgate_got[(size_t)r * pairs], R[r].dgate, (size_t)pairs * sizeof(float), cudaMemcpyDeviceToHost));
        cudaCheck(cudaMemcpy(&Y_got[(size_t)r * BT * C], R[r].Y, (size_t)BT * C * sizeof(floatX), cudaMemcpyDeviceToHost));
        cudaCheck(cudaMemcpy(&dX_got[(size_t)r * BT * C], R[r].dX, (size_t)BT * C * sizeof(floatX), cudaMemcpyDeviceToHost));
        std::vector<unsigned char> du = download_bytes(R[r].dU, slice.size()), dv = download_bytes(R[r].dV, slice.size());
        expert_shard_unpack(dU_got.data(), du.data(), sizeof(floatX), (size_t)N, C, P, r);
        expert_shard_unpack(dV_got.data(), dv.data(), sizeof(floatX), (size_t)N, C, P, r);
    }
    std::vector<unsigned char> s_r = download_bytes(s_ref, (size_t)A * sizeof(float));
    std::vector<unsigned char> dgate_r = download_bytes(dgate_ref, (size_t)A * sizeof(float));
    std::vector<unsigned char> Y_r = download_bytes(Y_ref, TC * sizeof(floatX)), dX_r = download_bytes(dX_ref, TC * sizeof(floatX));
    std::vector<unsigned char> dU_r = download_bytes(dU_ref, NC * sizeof(floatX)), dV_r = download_bytes(dV_ref, NC * sizeof(floatX));
    compare(label, "s", s_got.data(), s_r.data(), A, 0, exact, 1e-5);
    compare(label, "Y", Y_got.data(), Y_r.data(), TC, 1, exact, TOL_FLOATX);
    compare(label, "dgate", dgate_got.data(), dgate_r.data(), A, 0, exact, 1e-5);
    compare(label, "dX", dX_got.data(), dX_r.data(), TC, 1, exact, TOL_FLOATX);
    compare(label, "dU", dU_got.data(), dU_r.data(), NC, 1, exact, TOL_FLOATX);
    compare(label, "dV", dV_got.data(), dV_r.data(), NC, 1, exact, TOL_FLOATX);

    // the host model of the lane order (what test_expert_shard.c runs on the CPU) against the GPU
    if (exact) {
        std::vector<float> partial(P);
        const float* s_gpu = (const float*)s_r.data();
        int bad = 0;
        std::vector<std::vector<float>> U_sl(P), X_sl(P);
        for (int r = 0; r < P; r++) {
            U_sl[r].resize((size_t)N * cols);
            X_sl[r].resize((size_t)T * cols);
            expert_shard_pack(U_sl[r].data(), u, sizeof(float), (size_t)N, C, P, r);
            expert_shard_pack(X_sl[r].data(), x, sizeof(float), (size_t)T, C, P, r);
        }
        for (int g = 0; g < A; g++) {
            for (int r = 0; r < P; r++) {
                partial[r] = expert_shard_dot_partial(&U_sl[r][(size_t)idx[g] * cols], &X_sl[r][(size_t)(g / k) * cols], cols, P);
            }
            const float model = expert_shard_tree_sum(partial.data(), 1, P);
            bad += memcmp(&model, &s_gpu[g], sizeof(float)) != 0;
        }
        char name[256];
        snprintf(name, sizeof(name), "%s - host model of the lane order = GPU s", label);
        test_checkf(bad == 0, name, "%d of %d pairs differ", bad, A);
    }

    for (int r = 0; r < P; r++) {
        Rank* q = &R[r];
        void* ptrs[] = {q->Y, q->dX, q->U, q->V, q->dU, q->dV, q->s, q->dgate, q->saved_buf, q->work};
        for (void* p : ptrs) cudaCheck(cudaFree(p));
    }
    void* ptrs[] = {X, Y0, dY, dYs, dX0, U, V, dU0, dV0, d_idx, d_gate, sched_scratch, bwd_scratch, Y_ref, dX_ref,
                    dX_tmp, dU_tmp, dV_tmp, dU_ref, dV_ref, s_ref, dgate_ref, dgate_tmp};
    for (void* p : ptrs) cudaCheck(cudaFree(p));
    schedule_free(sched);
    free(x); free(y0); free(dy); free(dys); free(dx0); free(u); free(v); free(du0); free(dv0); free(gate);
}

int main(void) {
    cudaCheck(cudaSetDevice(0));
    test_begin("test_experts_shard" TEST_FLOATX_SUFFIX);
    printf("test_experts_shard (%s)\n", FLOATX_NAME);
    Rng rng = rng_seeded(1820);
    const int execs[2] = {EXPERT_EXEC_TOKEN, EXPERT_EXEC_EXPERT};
    const int Ps[3] = {2, 4, 8};
    for (int e = 0; e < 2; e++) {
        for (int pi = 0; pi < 3; pi++) {
            run_case(Ps[pi], 64, 768, 16, 1024, execs[e], &rng);   // d12's C
            run_case(Ps[pi], 32, 768, 32, 4096, execs[e], &rng);
            run_case(Ps[pi], 48, 128, 16, 256, execs[e], &rng);    // 16 vectors: lanes partly empty
        }
        run_case(3, 64, 768, 16, 1024, execs[e], &rng);            // not a power of two: tolerance
    }
    return test_end();
}
