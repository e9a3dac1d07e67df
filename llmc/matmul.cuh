/*
matmul.cuh - linear layers on cuBLASLt (floatX in/out, fp32 compute and accumulation).

Defines:
- matmul_init() / matmul_free(): the BLAS handles of the program and their one workspace
  allocation: the cuBLASLt handle of the matmuls below and the cuBLAS handle of the router's
  fp32-output GEMMs (router.cuh) and the moe layer's GEMMs (moe_router.cuh, moe_experts.cuh).
  Call once, outside any graph capture.
- matmul_forward(out, inp, weight, bias_or_NULL, BT, C_in, C_out, stream)
      out (BT, C_out) = inp (BT, C_in) @ weight^T + bias,  weight is (C_out, C_in) row-major
- matmul_forward_gelu(out_gelu, pre_gelu, inp, weight, bias_or_NULL, BT, C_in, C_out, stream)
      pre_gelu = inp @ weight^T + bias, out_gelu = GELU_tanh(pre_gelu)
      (cuBLASLt GELU_AUX_BIAS epilogue, or the matmul + gelu_forward when matmul_gelu_fused = 0)
- matmul_backward(dinp, dweight, dbias_or_NULL, dout, inp, weight, BT, C_in, C_out,
                  accumulate_dinp, stream, scratch)
      dinp  = dout @ weight           (overwrite, or += when accumulate_dinp; skipped if NULL)
      dweight += dout^T @ inp         (always accumulates: gradient accumulation; skipped if NULL)
      dbias   += column sums of dout  (deterministic two-kernel reduction, fp32)
      Run in that order: dbias, dinp, dweight. The same call with dweight NULL, and another with
      only dweight, give the same bits as one call (the trainer's --overlap-dweight 1 puts the
      second on matmul_dweight_stream)
- matmul_backward_gelu(dpre, dweight, dbias_or_NULL, dout, inp, weight, pre_gelu, BT, C_in, C_out,
                       stream, scratch)
      the same for a layer whose input was inp = GELU_tanh(pre_gelu) (GPT-2's fcproj), with the
      GELU backward folded in: dpre (BT, C_in) = (dout @ weight) * GELU_tanh'(pre_gelu) (overwrite)
      through cuBLASLt's DGELU epilogue when matmul_dgelu_fused = 1 (the trainer's
      --gelu-fusion 2), else the GEMM then gelu_backward in place
- matmul_gelu_cutlass = 1 (CUTLASS bf16 builds, HAVE_CUTLASS_GELU_GEMM; --gelu-fusion 3): both GELU
  GEMMs through CUTLASS epilogues instead (llmc/matmul_gelu_cutlass.h), where their sizes allow
- swiglu_mlp_forward(out, fch, h, x, fcw, fcprojw, BT, C, H, stream) / swiglu_mlp_backward(dx, dfcw,
  dfcprojw, dh, dfch, dout, x, fch, h, fcw, fcprojw, BT, C, H, stream, scratch): the bias-free
  SwiGLU MLP of swiglu models and of the omni and moe layers' shared branch: fch (BT, 2H) = x fcw^T,
  h = SwiGLU(fch) (BT, H), out (BT, C) = h fcprojw^T (overwrite); backward: dx overwritten, dfcw
  and dfcprojw accumulate, dh (BT, H) and dfch (BT, 2H) are its buffers
- matmul_backward_scratch_bytes(BT, C_out): scratch bytes for the dbias partial sums
- matmul_dweight_stream_init(): a second stream for weight-gradient GEMMs, with its own cuBLASLt
  workspace of the same size (so the heuristic picks the same algorithms, and GEMMs running at
  once on the two streams never share workspace bytes); freed by matmul_free()

Row-major to cuBLAS column-major: a row-major (R, C) matrix is a column-major (C, R) one, so
out^T (C_out x BT) = weight_cm^T (C_out x C_in) * inp_cm (C_in x BT): "TN" with A = weight.

Determinism: for each distinct problem (transposes, sizes, epilogue, beta, pointer alignment)
the algorithm is chosen once by the heuristic and cached, so every later call runs the same
kernel. With matmul_tune = 1 (the trainer's --matmul-tune 1) a new problem instead takes the
fastest of the heuristic's first MATMUL_TUNE_CANDIDATES candidates among those whose output on
that first call's operands hashes to the same 64-bit value as the first candidate's (D, and the
aux output of a GELU epilogue) and that split the k sum as the first does
(matmul_algo_same_k_split): another kernel, the same bits, whatever the timings say. Tuning
allocates and waits for the GPU once per problem, at its first call. cuBLASLt's split-K
reduction schemes are all fixed-order (no atomics), so the same algorithm on the same GPU gives
bitwise identical results (checked by dev/cuda/test_matmul.cu).
*/
#ifndef OMNIMOE_MATMUL_CUH
#define OMNIMOE_MATMUL_CUH

#include <cublas_v2.h>
#include "cuda_utils.cuh"
#include "activations.cuh"
#ifdef HAVE_CUTLASS_GELU_GEMM
#include "matmul_gelu_cutlass.h"
#endif

#define MATMUL_WORKSPACE_BYTES (32u * 1024u * 1024u)
// the cuBLAS handle's part of the workspace: the router's GEMMs run on the OmniMoE side stream
// while matmuls run on the main stream, so the two handles must not share workspace bytes
#define MATMUL_CUBLAS_WORKSPACE_BYTES (8u * 1024u * 1024u)
#define MATMUL_ALGO_CACHE_CAPACITY 256
#define MATMUL_DBIAS_ROWS_PER_BLOCK 64
#define MATMUL_HEURISTIC_MAX_RANK 16

static cublasLtHandle_t matmul_cublaslt_handle = NULL;
static cublasHandle_t matmul_cublas_handle = NULL;
static void* matmul_workspace = NULL;  // cuBLASLt's MATMUL_WORKSPACE_BYTES, then the cuBLAS handle's
// matmul_dweight_stream_init(): the weight-gradient stream (NULL: none) and its cuBLASLt workspace
static cudaStream_t matmul_dweight_stream = NULL;
static void* matmul_dweight_workspace = NULL;
// 1: GELU through the cuBLASLt epilogue (one pass); 0: plain GEMM then gelu_forward.
// dev/cuda/test_matmul.cu checks that the epilogue matches the tanh GELU of activations.cuh.
static int matmul_gelu_fused = 1;
// set by every matmul_forward_gelu(): 1 if the cuBLASLt epilogue did the GELU, 0 if the fallback ran
static int matmul_gelu_last_was_fused = 0;
// 1: matmul_backward_gelu's GELU backward in the cuBLASLt DGELU epilogue; 0: GEMM + gelu_backward
static int matmul_dgelu_fused = 0;
// set by every matmul_backward_gelu(): 1 if the DGELU epilogue ran, 0 if the fallback did
static int matmul_dgelu_last_was_fused = 0;
// 1: both GELU GEMMs through CUTLASS's epilogues (HAVE_CUTLASS_GELU_GEMM builds only; --gelu-fusion 3),
// the cuBLASLt paths above where CUTLASS cannot take the sizes
static int matmul_gelu_cutlass = 0;
// set with the *_last_was_fused flags: 1 if CUTLASS's epilogue did the fused GELU or GELU backward
static int matmul_gelu_last_was_cutlass = 0;

typedef struct {
    int transa, transb;
    int m, n, k;
    int lda, ldb, ldd;
    int epilogue;
    int accumulate;  // beta 1 or 0: --matmul-tune compares a candidate's bits under the beta it timed
    int alignment;  // smallest alignment (bytes, power of two <= 256) among all pointers
    int found;      // 1: algo holds a usable algorithm; 0: the heuristic found none
    float waves;    // the heuristic's estimate of the algorithm's waves over the SMs (benchmark output)
    cublasLtMatmulAlgo_t algo;
} MatmulAlgoCacheEntry;

static MatmulAlgoCacheEntry matmul_algo_cache[MATMUL_ALGO_CACHE_CAPACITY];
static int matmul_algo_cache_count = 0;
static int matmul_algo_cache_evict_next = 0;  // the slot a new problem takes once the cache is full
// which of the heuristic's candidates a new problem takes: 0, its first, everywhere but in the
// GEMM benchmark of dev/cuda/test_matmul.cu, which times the others (it clears the cache between
// ranks: a cached problem keeps its algorithm)
static int matmul_heuristic_rank = 0;
// 1: a new problem takes the fastest candidate with the first candidate's bits (matmul_tune_choose)
static int matmul_tune = 0;
static int matmul_tune_count = 0;  // problems timed so far (tests read these)
static int matmul_tune_moved = 0;  // of them, those that took another candidate than the first
#define MATMUL_TUNE_CANDIDATES 8
#define MATMUL_TUNE_REPEATS 3

static inline void matmul_algo_cache_clear(void) {
    matmul_algo_cache_count = 0;
    matmul_algo_cache_evict_next = 0;
}

static inline void matmul_init(void) {
    if (matmul_cublaslt_handle != NULL) { return; }
    cublasCheck(cublasLtCreate(&matmul_cublaslt_handle));
    matmul_workspace = cuda_malloc_or_die(MATMUL_WORKSPACE_BYTES + MATMUL_CUBLAS_WORKSPACE_BYTES, "cuBLAS workspace");
    cublasCheck(cublasCreate(&matmul_cublas_handle));
    // a user workspace for the handle's first stream; cublasSetStream (router.cuh, moe_*.cuh) puts the
    // handle back on cuBLAS's default workspace pool (cuBLAS docs), so later calls use that pool
    cublasCheck(cublasSetWorkspace(matmul_cublas_handle, (char*)matmul_workspace + MATMUL_WORKSPACE_BYTES,
                                   MATMUL_CUBLAS_WORKSPACE_BYTES));
    cublasCheck(cublasSetAtomicsMode(matmul_cublas_handle, CUBLAS_ATOMICS_NOT_ALLOWED));
    matmul_algo_cache_clear();
}

static inline void matmul_dweight_stream_init(void) {
    if (matmul_dweight_stream != NULL) { return; }
    cudaCheck(cudaStreamCreateWithFlags(&matmul_dweight_stream, cudaStreamNonBlocking));
    matmul_dweight_workspace = cuda_malloc_or_die(MATMUL_WORKSPACE_BYTES, "cuBLASLt workspace of the dweight stream");
}

static inline void matmul_free(void) {
    if (matmul_dweight_stream != NULL) {
        cudaCheck(cudaStreamDestroy(matmul_dweight_stream));
        cudaCheck(cudaFree(matmul_dweight_workspace));
        matmul_dweight_stream = NULL;
        matmul_dweight_workspace = NULL;
    }
    if (matmul_cublaslt_handle == NULL) { return; }
    cublasCheck(cublasDestroy(matmul_cublas_handle));
    cudaCheck(cudaFree(matmul_workspace));
    cublasCheck(cublasLtDestroy(matmul_cublaslt_handle));
    matmul_workspace = NULL;
    matmul_cublas_handle = NULL;
    matmul_cublaslt_handle = NULL;
    matmul_algo_cache_clear();
}

// largest power of two (<= 256) dividing the address; NULL pointers don't constrain it
static inline int matmul_pointer_alignment(const void* p) {
    if (p == NULL) { return 256; }
    uintptr_t address = (uintptr_t)p;
    int alignment = 1;
    while (alignment < 256 && (address & (uintptr_t)(alignment * 2 - 1)) == 0) { alignment *= 2; }
    return alignment;
}

static inline void matmul_set_layout(cublasLtMatrixLayout_t* layout, int rows, int cols, int ld) {
    cublasCheck(cublasLtMatrixLayoutCreate(layout, CUDA_R_FLOATX, (uint64_t)rows, (uint64_t)cols, (int64_t)ld));
}

// the cuBLASLt workspace of a stream: the weight-gradient stream has its own
static inline void* matmul_workspace_for(cudaStream_t stream) {
    return stream == matmul_dweight_stream && stream != NULL ? matmul_dweight_workspace : matmul_workspace;
}

// order-free 64-bit fingerprint of a column-major (m x n, ld) floatX matrix: the sum mod 2^64 of a
// mix of each element's bits with its index. Integer additions commute, so the atomic sum is the
// same in any order; any changed element changes it except with probability ~2^-64. out[1] gets
// the OR of all elements' bits (0: the matrix is all zeros, which every summation order gives).
__global__ void matmul_fingerprint_kernel(unsigned long long* out, const floatX* x, int m, int n, int ld) {
    const size_t total = (size_t)m * n;
    unsigned long long acc = 0, any = 0;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        size_t col = i / (size_t)m, row = i - col * (size_t)m;
        floatX v = x[col * (size_t)ld + row];
        unsigned long long z = 0;
        memcpy(&z, &v, sizeof(v));
        any |= z;
        z ^= (unsigned long long)i * 0x9E3779B97F4A7C15ull;  // splitmix64's finaliser of (bits, index)
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        acc += z ^ (z >> 31);
    }
    atomicAdd(out, acc);  // integer: the same total in any order
    if (any) atomicOr(out + 1, any);
}

static inline void matmul_fingerprint(unsigned long long* out, const floatX* x, int m, int n, int ld,
                                      cudaStream_t stream) {  // out: 2 words
    cudaCheck(cudaMemsetAsync(out, 0, 2 * sizeof(*out), stream));
    matmul_fingerprint_kernel<<<264, 256, 0, stream>>>(out, x, m, n, ld);
    cudaCheckLast();
}

// a candidate's split of the k sum (split-K parts and how they are added): one that differs from
// the first candidate's adds in another order, whatever its bits on one input (a small bf16 output
// often rounds the same by chance), so --matmul-tune never takes it
static inline int matmul_algo_same_k_split(const cublasLtMatmulAlgo_t* x, const cublasLtMatmulAlgo_t* y) {
    int32_t split_x = 0, split_y = 0;
    uint32_t scheme_x = 0, scheme_y = 0;
    size_t written = 0;
    if (cublasLtMatmulAlgoConfigGetAttribute(x, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &split_x, sizeof(split_x), &written) != CUBLAS_STATUS_SUCCESS ||
        cublasLtMatmulAlgoConfigGetAttribute(y, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &split_y, sizeof(split_y), &written) != CUBLAS_STATUS_SUCCESS ||
        cublasLtMatmulAlgoConfigGetAttribute(x, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &scheme_x, sizeof(scheme_x), &written) != CUBLAS_STATUS_SUCCESS ||
        cublasLtMatmulAlgoConfigGetAttribute(y, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &scheme_y, sizeof(scheme_y), &written) != CUBLAS_STATUS_SUCCESS) {
        return 0;  // unknown: not the same
    }
    return split_x == split_y && (split_x <= 1 || scheme_x == scheme_y);
}

// --matmul-tune 1: of the heuristic's candidates (their count returned), the index of the fastest
// whose D (and written aux) has the first candidate's bits on these operands. Runs each candidate
// 1 + MATMUL_TUNE_REPEATS times on the caller's buffers; when beta = 1, D's contents are saved
// first and put back before every run and at the end, so the caller's one accumulation follows.
// Operands whose product is all zeros (or, under beta = 1, leaves D's bits as they were) cannot
// tell summation orders apart: then 0, the first.
// Without the memory for the saved D, also 0. Waits for the GPU: not inside a graph capture.
static int matmul_tune_choose(const cublasLtMatmulHeuristicResult_t* candidates, int count,
                              cublasLtMatmulDesc_t op_desc, cublasLtMatrixLayout_t layout_a,
                              cublasLtMatrixLayout_t layout_b, cublasLtMatrixLayout_t layout_d, floatX* d,
                              const floatX* a, const floatX* b, floatX* aux_written, int m, int n, int ldd,
                              float beta, void* workspace, cudaStream_t stream) {
    const float alpha = 1.0f;
    const size_t d_bytes = ((size_t)ldd * (n - 1) + m) * sizeof(floatX);
    floatX* saved = NULL;
    unsigned long long* prints = NULL;  // [candidate][D sum, D or, aux sum, aux or], then D's start [sum, or]
    const size_t prints_bytes = (4 * MATMUL_TUNE_CANDIDATES + 2) * sizeof(unsigned long long);
    if (cudaMalloc(&prints, prints_bytes) != cudaSuccess ||
        (beta != 0.0f && cudaMalloc(&saved, d_bytes) != cudaSuccess)) {
        (void)cudaGetLastError();  // out of memory: the heuristic's first, untuned
        if (prints) cudaCheck(cudaFree(prints));
        return 0;
    }
    if (saved) {
        cudaCheck(cudaMemcpyAsync(saved, d, d_bytes, cudaMemcpyDeviceToDevice, stream));
        matmul_fingerprint(prints + 4 * MATMUL_TUNE_CANDIDATES, d, m, n, ldd, stream);
    }
    cudaEvent_t start, stop;
    cudaCheck(cudaEventCreate(&start));
    cudaCheck(cudaEventCreate(&stop));
    float best_ms[MATMUL_TUNE_CANDIDATES];
    int ran[MATMUL_TUNE_CANDIDATES];
    for (int c = 0; c < count; c++) {
        best_ms[c] = 0.0f;
        ran[c] = 0;
        for (int r = 0; r <= MATMUL_TUNE_REPEATS; r++) {
            if (saved) cudaCheck(cudaMemcpyAsync(d, saved, d_bytes, cudaMemcpyDeviceToDevice, stream));
            cudaCheck(cudaEventRecord(start, stream));
            cublasStatus_t status = cublasLtMatmul(matmul_cublaslt_handle, op_desc, &alpha, a, layout_a, b, layout_b,
                                                   &beta, d, layout_d, d, layout_d, &candidates[c].algo, workspace,
                                                   MATMUL_WORKSPACE_BYTES, stream);
            cudaCheck(cudaEventRecord(stop, stream));
            if (status != CUBLAS_STATUS_SUCCESS) { break; }  // a candidate that cannot run is skipped
            if (r == 0) {  // the first run's result, before the timed ones overwrite it
                matmul_fingerprint(prints + 4 * c, d, m, n, ldd, stream);
                if (aux_written) matmul_fingerprint(prints + 4 * c + 2, aux_written, m, n, ldd, stream);
                continue;
            }
            cudaCheck(cudaEventSynchronize(stop));
            float ms = 0.0f;
            cudaCheck(cudaEventElapsedTime(&ms, start, stop));
            if (r == 1 || ms < best_ms[c]) best_ms[c] = ms;
            ran[c] = (r == MATMUL_TUNE_REPEATS);
        }
    }
    unsigned long long host_prints[4 * MATMUL_TUNE_CANDIDATES + 2];
    cudaCheck(cudaMemcpyAsync(host_prints, prints, sizeof(host_prints), cudaMemcpyDeviceToHost, stream));
    if (saved) cudaCheck(cudaMemcpyAsync(d, saved, d_bytes, cudaMemcpyDeviceToDevice, stream));
    cudaCheck(cudaStreamSynchronize(stream));
    const unsigned long long* start_print = host_prints + 4 * MATMUL_TUNE_CANDIDATES;
    const int informative = host_prints[1] != 0 && !(saved && host_prints[0] == start_print[0] &&
                                                     host_prints[1] == start_print[1]);
    int chosen = 0;
    for (int c = 1; c < count && ran[0] && informative; c++) {
        int same = ran[c] && host_prints[4 * c] == host_prints[0] && host_prints[4 * c + 1] == host_prints[1] &&
                   (aux_written == NULL || host_prints[4 * c + 2] == host_prints[2]) &&
                   matmul_algo_same_k_split(&candidates[c].algo, &candidates[0].algo);
        if (same && best_ms[c] < best_ms[chosen]) chosen = c;
    }
    matmul_tune_count++;
    matmul_tune_moved += chosen != 0;
    cudaCheck(cudaEventDestroy(start));
    cudaCheck(cudaEventDestroy(stop));
    cudaCheck(cudaFree(prints));
    if (saved) cudaCheck(cudaFree(saved));
    return chosen;
}

// D (m x n, col-major, ld ldd) = op(A) (m x k) * op(B) (k x n) [+ D if accumulate] with epilogue.
// Returns 0 when no algorithm exists for this epilogue (caller may fall back), 1 on success.
static int matmul_cublaslt_run(floatX* d, const floatX* a, const floatX* b, const floatX* bias, floatX* aux,
                               int m, int n, int k, int transa, int transb, int lda, int ldb, int ldd,
                               int accumulate, cublasLtEpilogue_t epilogue, cudaStream_t stream) {
    if (matmul_cublaslt_handle == NULL) {
        fprintf(stderr, "matmul: call matmul_init() before any matmul\n");
        exit(EXIT_FAILURE);
    }
    if (m == 0 || n == 0) { return 1; }

    cublasLtMatmulDesc_t op_desc;
    cublasCheck(cublasLtMatmulDescCreate(&op_desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    cublasOperation_t op_a = transa ? CUBLAS_OP_T : CUBLAS_OP_N;
    cublasOperation_t op_b = transb ? CUBLAS_OP_T : CUBLAS_OP_N;
    cublasCheck(cublasLtMatmulDescSetAttribute(op_desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof(op_a)));
    cublasCheck(cublasLtMatmulDescSetAttribute(op_desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof(op_b)));
    cublasCheck(cublasLtMatmulDescSetAttribute(op_desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue)));
    if (bias != NULL) {
        cublasCheck(cublasLtMatmulDescSetAttribute(op_desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
    }
    if (aux != NULL) {
        int64_t aux_ld = ldd;
        cublasCheck(cublasLtMatmulDescSetAttribute(op_desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &aux, sizeof(aux)));
        cublasCheck(cublasLtMatmulDescSetAttribute(op_desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &aux_ld, sizeof(aux_ld)));
    }

    // stored shapes: op(A) is m x k, so A is stored k x m when transposed
    cublasLtMatrixLayout_t layout_a, layout_b, layout_d;
    matmul_set_layout(&layout_a, transa ? k : m, transa ? m : k, lda);
    matmul_set_layout(&layout_b, transb ? n : k, transb ? k : n, ldb);
    matmul_set_layout(&layout_d, m, n, ldd);

    int alignment = matmul_pointer_alignment(a);
    int align_b = matmul_pointer_alignment(b), align_d = matmul_pointer_alignment(d);
    int align_bias = matmul_pointer_alignment(bias), align_aux = matmul_pointer_alignment(aux);
    if (align_b < alignment) { alignment = align_b; }
    if (align_d < alignment) { alignment = align_d; }
    if (align_bias < alignment) { alignment = align_bias; }
    if (align_aux < alignment) { alignment = align_aux; }

    // look up (or choose once) the algorithm for this problem
    MatmulAlgoCacheEntry* entry = NULL;
    for (int i = 0; i < matmul_algo_cache_count; i++) {
        MatmulAlgoCacheEntry* e = &matmul_algo_cache[i];
        if (e->transa == transa && e->transb == transb && e->m == m && e->n == n && e->k == k &&
            e->lda == lda && e->ldb == ldb && e->ldd == ldd && e->epilogue == (int)epilogue &&
            e->accumulate == accumulate && e->alignment == alignment) {
            entry = e;
            break;
        }
    }
    if (entry == NULL) {
        if (matmul_algo_cache_count < MATMUL_ALGO_CACHE_CAPACITY) {
            entry = &matmul_algo_cache[matmul_algo_cache_count++];
        } else {
            // full (many shapes, e.g. a caller that varies T): reuse the slots in turn. The
            // heuristic is a pure function of the problem on a given GPU and library, so a problem
            // that comes back later gets the same algorithm again: results stay bitwise the same.
            entry = &matmul_algo_cache[matmul_algo_cache_evict_next];
            matmul_algo_cache_evict_next = (matmul_algo_cache_evict_next + 1) % MATMUL_ALGO_CACHE_CAPACITY;
        }
        entry->transa = transa; entry->transb = transb;
        entry->m = m; entry->n = n; entry->k = k;
        entry->lda = lda; entry->ldb = ldb; entry->ldd = ldd;
        entry->epilogue = (int)epilogue;
        entry->accumulate = accumulate;
        entry->alignment = alignment;

        cublasLtMatmulPreference_t preference;
        cublasCheck(cublasLtMatmulPreferenceCreate(&preference));
        size_t workspace_bytes = MATMUL_WORKSPACE_BYTES;
        uint32_t align_u32 = (uint32_t)alignment;
        cublasCheck(cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                         &workspace_bytes, sizeof(workspace_bytes)));
        cublasCheck(cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_u32, sizeof(align_u32)));
        cublasCheck(cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align_u32, sizeof(align_u32)));
        cublasCheck(cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align_u32, sizeof(align_u32)));
        cublasCheck(cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align_u32, sizeof(align_u32)));
        cublasLtMatmulHeuristicResult_t heuristics[MATMUL_HEURISTIC_MAX_RANK];
        memset(heuristics, 0, sizeof(heuristics));
        int rank = matmul_heuristic_rank < 0 ? 0 : matmul_heuristic_rank;
        if (rank >= MATMUL_HEURISTIC_MAX_RANK) { rank = MATMUL_HEURISTIC_MAX_RANK - 1; }
        cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
        if (matmul_tune && rank == 0) cudaCheck(cudaStreamIsCapturing(stream, &capturing));
        const int tune = matmul_tune && rank == 0 && capturing == cudaStreamCaptureStatusNone;
        int returned = 0;
        cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(matmul_cublaslt_handle, op_desc, layout_a, layout_b,
                                                               layout_d, layout_d, preference,
                                                               tune ? MATMUL_TUNE_CANDIDATES : rank + 1, heuristics,
                                                               &returned);
        // the untuned path asks for one candidate: tune only where that one is this list's first
        int first_agrees = 0;
        if (tune && status == CUBLAS_STATUS_SUCCESS && returned > 1 && heuristics[0].state == CUBLAS_STATUS_SUCCESS) {
            cublasLtMatmulHeuristicResult_t first;
            int returned_first = 0;
            memset(&first, 0, sizeof(first));
            first_agrees = cublasLtMatmulAlgoGetHeuristic(matmul_cublaslt_handle, op_desc, layout_a, layout_b, layout_d,
                                                          layout_d, preference, 1, &first, &returned_first) ==
                               CUBLAS_STATUS_SUCCESS &&
                           returned_first == 1 && memcmp(&first.algo, &heuristics[0].algo, sizeof(first.algo)) == 0;
        }
        cublasCheck(cublasLtMatmulPreferenceDestroy(preference));
        if (first_agrees) {
            // the GELU forward epilogues write aux (pre_gelu) beside D: its bits are compared too
            int aux_is_output = epilogue == CUBLASLT_EPILOGUE_GELU_AUX || epilogue == CUBLASLT_EPILOGUE_GELU_AUX_BIAS;
            rank = matmul_tune_choose(heuristics, returned, op_desc, layout_a, layout_b, layout_d, d, a, b,
                                      aux_is_output ? aux : NULL, m, n, ldd, accumulate ? 1.0f : 0.0f,
                                      matmul_workspace_for(stream), stream);
        }
        if (status == CUBLAS_STATUS_SUCCESS && returned > rank && heuristics[rank].state == CUBLAS_STATUS_SUCCESS) {
            entry->found = 1;
            entry->algo = heuristics[rank].algo;
            entry->waves = heuristics[rank].wavesCount;
        } else {
            entry->found = 0;
        }
    }

    int ran = 0;
    if (entry->found) {
        const float alpha = 1.0f;
        const float beta = accumulate ? 1.0f : 0.0f;
        void* workspace = matmul_workspace_for(stream);
        cublasCheck(cublasLtMatmul(matmul_cublaslt_handle, op_desc, &alpha, a, layout_a, b, layout_b, &beta,
                                   d, layout_d, d, layout_d, &entry->algo, workspace, MATMUL_WORKSPACE_BYTES, stream));
        ran = 1;
    }
    cublasCheck(cublasLtMatrixLayoutDestroy(layout_a));
    cublasCheck(cublasLtMatrixLayoutDestroy(layout_b));
    cublasCheck(cublasLtMatrixLayoutDestroy(layout_d));
    cublasCheck(cublasLtMatmulDescDestroy(op_desc));
    return ran;
}

static inline void matmul_no_algorithm(const char* who, int m, int n, int k) {
    fprintf(stderr, "%s: cuBLASLt has no algorithm for m=%d n=%d k=%d (%s); check sizes and pointer alignment\n",
            who, m, n, k, FLOATX_NAME);
    exit(EXIT_FAILURE);
}

// out (BT, C_out) = inp (BT, C_in) @ weight^T (+ bias). bias may be NULL.
static inline void matmul_forward(floatX* out, const floatX* inp, const floatX* weight, const floatX* bias,
                                  int BT, int C_in, int C_out, cudaStream_t stream) {
    cublasLtEpilogue_t epilogue = bias != NULL ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
    if (!matmul_cublaslt_run(out, weight, inp, bias, NULL, C_out, BT, C_in, 1, 0, C_in, C_in, C_out, 0, epilogue, stream)) {
        matmul_no_algorithm("matmul_forward", C_out, BT, C_in);
    }
}

// pre_gelu = inp @ weight^T (+ bias); out_gelu = GELU_tanh(pre_gelu). bias may be NULL.
static inline void matmul_forward_gelu(floatX* out_gelu, floatX* pre_gelu, const floatX* inp, const floatX* weight,
                                       const floatX* bias, int BT, int C_in, int C_out, cudaStream_t stream) {
    matmul_gelu_last_was_cutlass = 0;
#ifdef HAVE_CUTLASS_GELU_GEMM
    if (matmul_gelu_cutlass &&
        matmul_cutlass_gelu_forward(out_gelu, pre_gelu, inp, weight, bias, BT, C_in, C_out, stream) == 0) {
        matmul_gelu_last_was_fused = 1;
        matmul_gelu_last_was_cutlass = 1;
        return;
    }
#endif
    if (matmul_gelu_fused && C_out % 8 == 0) {  // the epilogue's aux leading dimension must be a multiple of 8
        cublasLtEpilogue_t epilogue = bias != NULL ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX;
        if (matmul_cublaslt_run(out_gelu, weight, inp, bias, pre_gelu, C_out, BT, C_in, 1, 0, C_in, C_in, C_out, 0,
                                epilogue, stream)) {
            matmul_gelu_last_was_fused = 1;
            return;
        }
    }
    matmul_gelu_last_was_fused = 0;
    matmul_forward(pre_gelu, inp, weight, bias, BT, C_in, C_out, stream);
    gelu_forward(out_gelu, pre_gelu, (size_t)BT * C_out, stream);
}

// ----------------------------------------------------------------------------
// deterministic bias gradient: per-block partial column sums over 64 rows, then a fixed-order
// sum of the partials (column_sum_partials, cuda_utils.cuh). Block (32, 8): x picks a 16-byte column chunk, y the row phase.

__global__ void matmul_dbias_partial_kernel(float* partials, const floatX* dout, int BT, int OC) {
    __shared__ float row_phase_sums[8][32 * x128::size];
    const int col_base = blockIdx.x * 32 * x128::size;
    const int col = col_base + threadIdx.x * x128::size;
    const int row_start = blockIdx.y * MATMUL_DBIAS_ROWS_PER_BLOCK;
    const int row_end = min(row_start + MATMUL_DBIAS_ROWS_PER_BLOCK, BT);
    float acc[x128::size];
    for (int k = 0; k < x128::size; k++) { acc[k] = 0.0f; }
    if (col < OC) {
        for (int row = row_start + threadIdx.y; row < row_end; row += 8) {
            x128 packed = load128cs(dout + (size_t)row * OC + col);
            for (int k = 0; k < x128::size; k++) { acc[k] += (float)packed[k]; }
        }
    }
    // stored as [k][lane] so the 32 lanes write consecutive words (no bank conflicts)
    for (int k = 0; k < x128::size; k++) { row_phase_sums[threadIdx.y][k * 32 + threadIdx.x] = acc[k]; }
    __syncthreads();
    const int t = threadIdx.y * 32 + threadIdx.x;  // column col_base + t = lane t / size, element t % size
    if (t < 32 * x128::size && col_base + t < OC) {
        const int index = (t % x128::size) * 32 + t / x128::size;
        float sum = 0.0f;
        for (int y = 0; y < 8; y++) { sum += row_phase_sums[y][index]; }
        partials[(size_t)blockIdx.y * OC + col_base + t] = sum;
    }
}

static inline size_t matmul_backward_scratch_bytes(int BT, int C_out) {
    return (size_t)ceil_div(BT, MATMUL_DBIAS_ROWS_PER_BLOCK) * C_out * sizeof(float);
}

// dinp (BT, C_in) = dout @ weight (or += when accumulate_dinp; skipped when dinp is NULL)
// dweight (C_out, C_in) += dout^T @ inp (skipped when dweight is NULL)
// dbias (C_out) += sum over rows of dout (skipped when dbias is NULL; needs scratch of
//   matmul_backward_scratch_bytes(BT, C_out) bytes, C_out a multiple of 8 (bf16) / 4 (fp32))
// pre_gelu != NULL (matmul_backward_gelu): dinp becomes d(pre_gelu), accumulate_dinp must be 0
static inline void matmul_backward_impl(floatX* dinp, floatX* dweight, floatX* dbias, const floatX* dout,
                                        const floatX* inp, const floatX* weight, const floatX* pre_gelu, int BT,
                                        int C_in, int C_out, int accumulate_dinp, cudaStream_t stream,
                                        float* scratch) {
    if (dbias != NULL) {
        if (C_out % x128::size != 0 || !is_aligned16(dout)) {
            fprintf(stderr, "matmul_backward: bias gradient needs C_out (%d) a multiple of %d and dout 16-byte aligned\n",
                    C_out, x128::size);
            exit(EXIT_FAILURE);
        }
        if (scratch == NULL) {
            fprintf(stderr, "matmul_backward: dbias needs scratch of matmul_backward_scratch_bytes() bytes\n");
            exit(EXIT_FAILURE);
        }
        int num_row_blocks = ceil_div(BT, MATMUL_DBIAS_ROWS_PER_BLOCK);
        dim3 grid(ceil_div(C_out, 32 * x128::size), num_row_blocks);
        dim3 block(32, 8);
        matmul_dbias_partial_kernel<<<grid, block, 0, stream>>>(scratch, dout, BT, C_out);
        cudaCheckLast();
        column_sum_partials(dbias, NULL, C_out, scratch, num_row_blocks, C_out, (size_t)C_out, stream);
    }
    if (dinp != NULL) {
        // dinp^T (C_in x BT) = weight_cm (C_in x C_out) * dout_cm (C_out x BT): "NN"
        int fused = 0;
        if (pre_gelu != NULL) matmul_gelu_last_was_cutlass = 0;
#ifdef HAVE_CUTLASS_GELU_GEMM
        if (pre_gelu != NULL && matmul_gelu_cutlass &&
            matmul_cutlass_dgelu_backward(dinp, dout, weight, pre_gelu, BT, C_in, C_out, stream) == 0) {
            fused = 1;
            matmul_gelu_last_was_cutlass = 1;
        }
#endif
        if (!fused && pre_gelu != NULL && matmul_dgelu_fused && C_in % 8 == 0) {  // aux leading dimension: a multiple of 8
            fused = matmul_cublaslt_run(dinp, weight, dout, NULL, (floatX*)pre_gelu, C_in, BT, C_out, 0, 0, C_in, C_out,
                                        C_in, 0, CUBLASLT_EPILOGUE_DGELU, stream);
        }
        if (!fused && !matmul_cublaslt_run(dinp, weight, dout, NULL, NULL, C_in, BT, C_out, 0, 0, C_in, C_out, C_in,
                                           accumulate_dinp, CUBLASLT_EPILOGUE_DEFAULT, stream)) {
            matmul_no_algorithm("matmul_backward (dinp)", C_in, BT, C_out);
        }
        if (pre_gelu != NULL && !fused) { gelu_backward(dinp, pre_gelu, dinp, (size_t)BT * C_in, stream); }
        if (pre_gelu != NULL) { matmul_dgelu_last_was_fused = fused; }
    }
    // dweight_cm (C_in x C_out) += inp_cm (C_in x BT) * dout_cm^T (BT x C_out): "NT"
    if (dweight != NULL && !matmul_cublaslt_run(dweight, inp, dout, NULL, NULL, C_in, C_out, BT, 0, 1, C_in, C_out,
                                                C_in, 1, CUBLASLT_EPILOGUE_DEFAULT, stream)) {
        matmul_no_algorithm("matmul_backward (dweight)", C_in, C_out, BT);
    }
}

static inline void matmul_backward(floatX* dinp, floatX* dweight, floatX* dbias, const floatX* dout,
                                   const floatX* inp, const floatX* weight, int BT, int C_in, int C_out,
                                   int accumulate_dinp, cudaStream_t stream, float* scratch) {
    matmul_backward_impl(dinp, dweight, dbias, dout, inp, weight, NULL, BT, C_in, C_out, accumulate_dinp, stream,
                         scratch);
}

// dpre (BT, C_in) = (dout @ weight) * GELU_tanh'(pre_gelu); dweight += dout^T @ inp; dbias += sums
// of dout (inp = GELU_tanh(pre_gelu), both (BT, C_in))
static inline void matmul_backward_gelu(floatX* dpre, floatX* dweight, floatX* dbias, const floatX* dout,
                                        const floatX* inp, const floatX* weight, const floatX* pre_gelu, int BT,
                                        int C_in, int C_out, cudaStream_t stream, float* scratch) {
    matmul_backward_impl(dpre, dweight, dbias, dout, inp, weight, pre_gelu, BT, C_in, C_out, 0, stream, scratch);
}

static inline void swiglu_mlp_forward(floatX* out, floatX* fch, floatX* h, const floatX* x, const floatX* fcw,
                                      const floatX* fcprojw, int BT, int C, int H, cudaStream_t stream) {
    matmul_forward(fch, x, fcw, NULL, BT, C, 2 * H, stream);
    swiglu_forward(h, fch, BT, H, stream);
    matmul_forward(out, h, fcprojw, NULL, BT, H, C, stream);
}

static inline void swiglu_mlp_backward(floatX* dx, floatX* dfcw, floatX* dfcprojw, floatX* dh, floatX* dfch,
                                       const floatX* dout, const floatX* x, const floatX* fch, const floatX* h,
                                       const floatX* fcw, const floatX* fcprojw, int BT, int C, int H,
                                       cudaStream_t stream, float* scratch) {
    matmul_backward(dh, dfcprojw, NULL, dout, h, fcprojw, BT, H, C, 0, stream, scratch);
    swiglu_backward(dfch, dh, fch, BT, H, stream);
    matmul_backward(dx, dfcw, NULL, dfch, x, fcw, BT, C, 2 * H, 0, stream, scratch);
}

#endif  // OMNIMOE_MATMUL_CUH
