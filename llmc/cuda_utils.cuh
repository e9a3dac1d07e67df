/*
cuda_utils.cuh - shared CUDA utilities for omnimoe.

Defines:
- cudaCheck / cudaCheckLast / cublasCheck: abort with file:line on any CUDA or cuBLAS error
- floatX: the activation/weight type on the GPU (bf16; float with -DENABLE_FP32), and its
  library tags CUDA_R_FLOATX (cuBLAS) and NCCL_FLOATX
- Packed128<T>: 16-byte vector of T for 128-bit loads/stores, with load128/store128 helpers
- deterministic warp and block reductions (sum, max): fixed order, bitwise reproducible
- column_sum_partials(): fixed-order second stage of per-block column sums (parameter grads)
- ceil_div, align256, cuda_num_sms(), cuda_peak_bf16_flops(device name) for MFU
- host-side bf16 <-> float conversion (round-to-nearest-even) and floatX upload/download
  helpers for tests and for the trainer's host code (upload_floatX converts on every core)
- cuda_malloc_or_die(): device allocation that names what it was for and how much is free
  when it fails, then exits
- the FFN layers' (omni, moe) shared pieces: layer_check_tokens; layer_scratch_take,
  layer_grads_take, layer_buffers_free (a workspace's scratch and dense-branch gradient buffers,
  the caller's or its own)

Conventions (shared by all omnimoe CUDA headers):
- names: B sequences of T tokens, BT = B*T tokens of a micro-batch, C channels, NH heads, I the
  shared SwiGLU width, n the router grid side, N = n*n experts, k experts per token, R = 2n
  router logits per token, P = BT*k (token, expert) pairs, L layers, V / Vp the vocabulary;
- arguments in the order: outputs, inputs, dimensions (then an options struct), scratch, stream;
- launchers never sync the host and never allocate; scratch buffers come from the caller (see
  *_scratch_bytes()), cut into pieces with align256;
- no floating-point atomics anywhere: every sum has a fixed order.
*/
#ifndef OMNIMOE_CUDA_UTILS_CUH
#define OMNIMOE_CUDA_UTILS_CUH

#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include <float.h>
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cublasLt.h>
#include "host_threads.h"

// cuDNN's SDPA (--attention cudnn, llmc/attention_cudnn.h) exists in `make USE_CUDNN=1` bf16 builds
#if defined(ENABLE_CUDNN) && !defined(ENABLE_FP32)
#define HAVE_CUDNN_ATTENTION 1
#endif
// the CUTLASS grouped GEMM of the moe experts (llmc/moe_gemm_cutlass.h) exists in `make USE_CUTLASS=1` bf16 builds
#if defined(ENABLE_CUTLASS) && !defined(ENABLE_FP32)
#define HAVE_CUTLASS_GROUPED_GEMM 1
// and the GELU GEMMs with CUTLASS epilogues (llmc/matmul_gelu_cutlass.h, --gelu-fusion 3)
#define HAVE_CUTLASS_GELU_GEMM 1
#endif

// ----------------------------------------------------------------------------
// error checking

static inline void cuda_check_impl(cudaError_t err, const char* file, int line) {
    if (err != cudaSuccess) {
        fprintf(stderr, "[CUDA ERROR] at %s:%d: %s (%s)\n", file, line,
                cudaGetErrorString(err), cudaGetErrorName(err));
        exit(EXIT_FAILURE);
    }
}
#define cudaCheck(err) (cuda_check_impl((err), __FILE__, __LINE__))
// call right after a kernel launch: catches bad launch configurations immediately
#define cudaCheckLast() (cuda_check_impl(cudaGetLastError(), __FILE__, __LINE__))

static inline void cublas_check_impl(cublasStatus_t status, const char* file, int line) {
    if (status != CUBLAS_STATUS_SUCCESS) {
        fprintf(stderr, "[cuBLAS ERROR] at %s:%d: status %d (%s)\n", file, line, (int)status,
                cublasLtGetStatusString(status));
        exit(EXIT_FAILURE);
    }
}
#define cublasCheck(status) (cublas_check_impl((status), __FILE__, __LINE__))

// ----------------------------------------------------------------------------
// the GPU storage type of weights and activations

// and its type tag for the libraries (the one mapping: cuBLAS/cuBLASLt, NCCL)
#if defined(ENABLE_FP32)
typedef float floatX;
#define FLOATX_NAME "fp32"
#define CUDA_R_FLOATX CUDA_R_32F
#define NCCL_FLOATX ncclFloat
#else
typedef __nv_bfloat16 floatX;
#define FLOATX_NAME "bf16"
#define CUDA_R_FLOATX CUDA_R_16BF
#define NCCL_FLOATX ncclBfloat16
#endif

// ----------------------------------------------------------------------------
// small helpers

static inline __host__ __device__ int ceil_div(int a, int b) { return (a + b - 1) / b; }
static inline __host__ __device__ size_t ceil_div_sz(size_t a, size_t b) { return (a + b - 1) / b; }

// number of SMs of the current device, queried once (the first call must happen outside
// graph capture; querying device attributes is allowed during capture anyway)
static inline int cuda_num_sms(void) {
    static int num_sms = 0;
    if (num_sms == 0) {
        int dev = 0;
        cudaCheck(cudaGetDevice(&dev));
        cudaCheck(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, dev));
    }
    return num_sms;
}

static inline int is_aligned16(const void* p) { return ((uintptr_t)p & 15) == 0; }

// bytes rounded up to a multiple of 256: how scratch buffers are cut into aligned pieces
static inline size_t align256(size_t bytes) { return (bytes + 255) & ~(size_t)255; }

// an FFN layer's (omni, moe) guard on its token count: 1..capacity, the BT it was created for
static inline void layer_check_tokens(const char* who, int BT, int capacity) {
    if (BT < 1 || BT > capacity) {
        fprintf(stderr, "%s: %d tokens, expected 1 to the %d the layer was created for\n", who, BT, capacity);
        exit(EXIT_FAILURE);
    }
}

// Dense bf16 tensor-core peak (FLOP/s, no sparsity) of a card, from its device name, for MFU;
// 0 when the card is not in the table (MFU is then reported as unknown). The one table: the
// trainer and the benchmarks all use it.
static inline double cuda_peak_bf16_flops(const char* device_name) {
    static const struct { const char* name_part; double flops; } table[] = {
        {"H200", 989.4e12},      // H200 SXM: the same tensor cores as the H100 SXM
        {"H100 PCIe", 756.0e12},
        {"H100", 989.4e12},      // H100 SXM (the number llm.c uses)
        {"A100", 312.0e12},
    };
    for (size_t i = 0; i < sizeof(table) / sizeof(table[0]); i++) {
        if (strstr(device_name, table[i].name_part) != NULL) { return table[i].flops; }
    }
    return 0.0;
}

// ----------------------------------------------------------------------------
// Packed128: 16 bytes of T that the compiler turns into one 128-bit load/store.
// The pointer given to load128/store128 must be 16-byte aligned.

template <class T>
struct alignas(16) Packed128 {
    static constexpr int size = (int)(sizeof(int4) / sizeof(T));
    T payload[size];

    __device__ Packed128() {}
    __device__ explicit Packed128(int4 bits) { memcpy(payload, &bits, sizeof(bits)); }
    __device__ static Packed128 constant(T value) {
        Packed128 result;
        for (int k = 0; k < size; k++) { result.payload[k] = value; }
        return result;
    }
    __device__ T& operator[](int index) { return payload[index]; }
    __device__ const T& operator[](int index) const { return payload[index]; }
    __device__ int4 get_bits() const {
        int4 bits;
        memcpy(&bits, payload, sizeof(bits));
        return bits;
    }
};

typedef Packed128<float> f128;
typedef Packed128<floatX> x128;

// plain 128-bit load
template <class T>
__device__ inline Packed128<T> load128(const T* address) {
    return Packed128<T>{*reinterpret_cast<const int4*>(address)};
}
// 128-bit load that bypasses L1 ("cache streaming"): for data read exactly once
template <class T>
__device__ inline Packed128<T> load128cs(const T* address) {
    return Packed128<T>{__ldcs(reinterpret_cast<const int4*>(address))};
}
template <class T>
__device__ inline void store128(T* target, Packed128<T> value) {
    *reinterpret_cast<int4*>(target) = value.get_bits();
}
// ----------------------------------------------------------------------------
// deterministic reductions.
// The xor-butterfly gives every lane the same bits: at each step lane i and lane i^offset
// add the same two numbers (a+b == b+a exactly in IEEE arithmetic), so by induction all
// lanes hold identical partial sums. The order is fixed by the lane layout, never by timing.

__device__ inline float warp_reduce_sum(float val) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        val += __shfl_xor_sync(0xffffffff, val, offset);
    }
    return val;
}

__device__ inline float warp_reduce_max(float val) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        val = fmaxf(val, __shfl_xor_sync(0xffffffff, val, offset));
    }
    return val;
}

// Block-wide sum; every thread of the block gets the result. blockDim.x must be a multiple
// of 32 and at most 1024. Contains __syncthreads(): all threads of the block must call it.
// Safe to call several times in a row (it synchronises before reusing its shared memory).
__device__ inline float block_reduce_sum(float val) {
    __shared__ float warp_partials[32];
    const int lane = threadIdx.x % 32;
    const int warp = threadIdx.x / 32;
    const int num_warps = blockDim.x / 32;
    val = warp_reduce_sum(val);
    __syncthreads();  // previous use of warp_partials is finished
    if (lane == 0) { warp_partials[warp] = val; }
    __syncthreads();
    float total = (lane < num_warps) ? warp_partials[lane] : 0.0f;
    total = warp_reduce_sum(total);
    return total;
}

__device__ inline float block_reduce_max(float val) {
    __shared__ float warp_partials[32];
    const int lane = threadIdx.x % 32;
    const int warp = threadIdx.x / 32;
    const int num_warps = blockDim.x / 32;
    val = warp_reduce_max(val);
    __syncthreads();
    if (lane == 0) { warp_partials[warp] = val; }
    __syncthreads();
    float total = (lane < num_warps) ? warp_partials[lane] : -FLT_MAX;
    total = warp_reduce_max(total);
    return total;
}

// Deterministic second stage of a column reduction: kernels that reduce over rows write
// per-block fp32 partial sums partials[r * row_stride + col] (r < num_rows, col < num_cols);
// this adds the column totals to floatX outputs: out_a[col] += total for col < split,
// out_b[col - split] += total for the rest (two parameter gradients in one launch).
// Block (32, COLUMN_SUM_ROW_PHASES): thread (x, y) sums rows y, y + 16, ... in order, then
// thread (x, 0) adds the 16 phase sums in order. One rounding to floatX per output element.
#define COLUMN_SUM_ROW_PHASES 16

__global__ void column_sum_partials_kernel(floatX* out_a, floatX* out_b, int split, const float* partials,
                                           int num_rows, int num_cols, size_t row_stride) {
    __shared__ float phase_sums[COLUMN_SUM_ROW_PHASES][33];
    const int col = blockIdx.x * 32 + threadIdx.x;
    float sum = 0.0f;
    if (col < num_cols) {
        // the loads of 8 rows issued before their adds (in order): a launch reads only a few MB,
        // so its time is load latency, not bandwidth
        int r = threadIdx.y;
        for (; r + 7 * COLUMN_SUM_ROW_PHASES < num_rows; r += 8 * COLUMN_SUM_ROW_PHASES) {
            float v[8];
#pragma unroll
            for (int j = 0; j < 8; j++) { v[j] = partials[(size_t)(r + j * COLUMN_SUM_ROW_PHASES) * row_stride + col]; }
#pragma unroll
            for (int j = 0; j < 8; j++) { sum += v[j]; }
        }
        for (; r < num_rows; r += COLUMN_SUM_ROW_PHASES) { sum += partials[(size_t)r * row_stride + col]; }
    }
    phase_sums[threadIdx.y][threadIdx.x] = sum;
    __syncthreads();
    if (threadIdx.y == 0 && col < num_cols) {
        float total = 0.0f;
        for (int y = 0; y < COLUMN_SUM_ROW_PHASES; y++) { total += phase_sums[y][threadIdx.x]; }
        floatX* target = col < split ? out_a + col : out_b + (col - split);
        *target = (floatX)((float)*target + total);
    }
}

static inline void column_sum_partials(floatX* out_a, floatX* out_b, int split, const float* partials, int num_rows,
                                       int num_cols, size_t row_stride, cudaStream_t stream) {
    if (num_cols == 0) { return; }
    dim3 block(32, COLUMN_SUM_ROW_PHASES);
    column_sum_partials_kernel<<<ceil_div(num_cols, 32), block, 0, stream>>>(out_a, out_b, split, partials, num_rows,
                                                                             num_cols, row_stride);
    cudaCheckLast();
}

// ----------------------------------------------------------------------------
// host-side bf16 conversion (bit-exact, independent of the CUDA headers' host paths)

static inline uint16_t host_float_to_bf16_bits(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof(bits));
    if ((bits & 0x7fffffffu) > 0x7f800000u) { return (uint16_t)((bits >> 16) | 0x0040u); }  // quiet NaN
    uint32_t rounding_bias = 0x7fffu + ((bits >> 16) & 1u);  // round to nearest, ties to even
    return (uint16_t)((bits + rounding_bias) >> 16);
}

static inline float host_bf16_bits_to_float(uint16_t h) {
    uint32_t bits = ((uint32_t)h) << 16;
    float f;
    memcpy(&f, &bits, sizeof(f));
    return f;
}

// round a float to the nearest floatX value, returned as float (what the GPU will see)
static inline float host_round_to_floatX(float f) {
#if defined(ENABLE_FP32)
    return f;
#else
    return host_bf16_bits_to_float(host_float_to_bf16_bits(f));
#endif
}

static inline void host_float_to_floatX(floatX* dst, const float* src, size_t n) {
#if defined(ENABLE_FP32)
    memcpy(dst, src, n * sizeof(float));
#else
    for (size_t i = 0; i < n; i++) {
        __nv_bfloat16_raw raw;
        raw.x = host_float_to_bf16_bits(src[i]);
        dst[i] = __nv_bfloat16(raw);
    }
#endif
}

static inline void host_floatX_to_float(float* dst, const floatX* src, size_t n) {
#if defined(ENABLE_FP32)
    memcpy(dst, src, n * sizeof(float));
#else
    for (size_t i = 0; i < n; i++) {
        __nv_bfloat16_raw raw = __nv_bfloat16_raw(src[i]);
        dst[i] = host_bf16_bits_to_float(raw.x);
    }
#endif
}

typedef struct { floatX* dst; const float* src; size_t n; } HostToFloatX;

static void host_float_to_floatX_part(void* ctx, int thread, int num_threads) {
    const HostToFloatX* job = (const HostToFloatX*)ctx;
    size_t lo, hi;
    host_range_part(job->n, thread, num_threads, &lo, &hi);
    host_float_to_floatX(job->dst + lo, job->src + lo, hi - lo);
}

// upload n floats to a device floatX buffer (rounded to nearest even, on every host core when n is
// large: each element alone, so the same bits). Synchronous.
static inline void upload_floatX(floatX* device_dst, const float* host_src, size_t n) {
    floatX* staging = (floatX*)malloc(n * sizeof(floatX));
    if (staging == NULL) { fprintf(stderr, "upload_floatX: out of host memory (%zu elements)\n", n); exit(EXIT_FAILURE); }
    HostToFloatX job = {staging, host_src, n};
    host_threads_run(host_float_to_floatX_part, &job, n >= ((size_t)1 << 24) ? host_num_cores() : 1);
    cudaCheck(cudaMemcpy(device_dst, staging, n * sizeof(floatX), cudaMemcpyHostToDevice));
    free(staging);
}

// download n floatX values from the device as floats. Synchronous.
static inline void download_floatX(float* host_dst, const floatX* device_src, size_t n) {
    floatX* staging = (floatX*)malloc(n * sizeof(floatX));
    if (staging == NULL) { fprintf(stderr, "download_floatX: out of host memory (%zu elements)\n", n); exit(EXIT_FAILURE); }
    cudaCheck(cudaMemcpy(staging, device_src, n * sizeof(floatX), cudaMemcpyDeviceToHost));
    host_floatX_to_float(host_dst, staging, n);
    free(staging);
}

// ----------------------------------------------------------------------------
// device allocation with a useful message on failure

static inline void* cuda_malloc_or_die_impl(size_t bytes, const char* what, const char* file, int line) {
    void* ptr = NULL;
    cudaError_t err = cudaMalloc(&ptr, bytes);
    if (err != cudaSuccess) {
        (void)cudaGetLastError();  // clear the (non-sticky) allocation error
        size_t free_bytes = 0, total_bytes = 0;
        cudaMemGetInfo(&free_bytes, &total_bytes);
        fprintf(stderr,
                "out of GPU memory: asked for %.1f MiB for %s, free %.1f MiB of %.1f MiB (%s:%d, %s)\n",
                bytes / 1048576.0, what, free_bytes / 1048576.0, total_bytes / 1048576.0, file, line,
                cudaGetErrorString(err));
        exit(EXIT_FAILURE);
    }
    return ptr;
}
#define cuda_malloc_or_die(bytes, what) cuda_malloc_or_die_impl((bytes), (what), __FILE__, __LINE__)

// an FFN layer workspace's (omni, moe) scratch: the caller's, checked against need, or, given NULL,
// its own of need bytes (*owned = 1: the workspace frees it, layer_buffers_free)
static inline float* layer_scratch_take(const char* who, float* given, size_t given_bytes, size_t need,
                                        size_t* bytes, int* owned) {
    *owned = 0;
    *bytes = given_bytes;
    if (given == NULL) {
        *owned = 1;
        *bytes = need;
        return (float*)cuda_malloc_or_die(need, "FFN layer scratch");
    }
    if (given_bytes < need) {
        fprintf(stderr, "%s: scratch of %zu bytes given, %zu needed\n", who, given_bytes, need);
        exit(EXIT_FAILURE);
    }
    return given;
}

// the dense branch's gradient buffers, dhidden (BT, H) and dwide (BT, 2H): the caller's or, given
// NULL and H > 0, allocated here; returns 1 when they were (the workspace frees them)
static inline int layer_grads_take(size_t BT, size_t H, floatX** dhidden, floatX** dwide) {
    if (*dhidden != NULL || H == 0) return 0;
    *dhidden = (floatX*)cuda_malloc_or_die(BT * H * sizeof(floatX), "FFN layer: d hidden");
    *dwide = (floatX*)cuda_malloc_or_die(BT * 2 * H * sizeof(floatX), "FFN layer: d pre-activation");
    return 1;
}

static inline void layer_buffers_free(float* scratch, int owns_scratch, floatX* dhidden, floatX* dwide,
                                      int owns_grads) {
    if (owns_scratch) cudaCheck(cudaFree(scratch));
    if (owns_grads) {
        cudaCheck(cudaFree(dhidden));
        cudaCheck(cudaFree(dwide));
    }
}

#endif  // OMNIMOE_CUDA_UTILS_CUH
