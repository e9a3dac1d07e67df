/*
step_gemms.h - the 15 cuBLASLt GEMMs of the dense GPT-2 d12 step at B=32, T=1024 (B*T = 32,768,
C = 768, padded vocab 50,304), for the benchmarks that take them one by one (test_matmul.cu's
step table, bench_gemm_energy.cu).

Row-major to cuBLASLt as llmc/matmul.cuh does it: forward Y = X W^T is (m, n, k) = (OC, BT, IC),
"TN", A = weight, B = input; dinp = dY W is (IC, BT, OC), "NN", A = weight, B = dout; dweight +=
X^T dY is (IC, OC, BT), "NT", A = input, B = dout, accumulating. per_step: calls in one step.
The epilogues are the CUDA trainer's defaults (--gelu-fusion 2: GELU into fc's forward, the GELU
backward into fcproj's input gradient).
Include after llmc/test_harness.h and llmc/matmul.cuh: step_gemm_run() calls matmul_cublaslt_run()
with whatever candidate matmul_heuristic_rank names (the algorithm cache keeps it for the problem).
*/
#ifndef OMNIMOE_STEP_GEMMS_H
#define OMNIMOE_STEP_GEMMS_H

#include <cublasLt.h>

#define STEP_GEMM_BT (32 * 1024)
#define STEP_GEMM_C 768
#define STEP_GEMM_VP 50304

typedef struct {
    const char* name;
    int m, n, k, transa, transb, lda, ldb, ldd, accumulate, per_step;
    cublasLtEpilogue_t epilogue;
} StepGemm;

#define STEP_GEMM_COUNT 15
static const StepGemm step_gemms[STEP_GEMM_COUNT] = {
#define BT_ STEP_GEMM_BT
#define C_ STEP_GEMM_C
#define VP_ STEP_GEMM_VP
    {"fwd qkv 768->2304 +bias", 3 * C_, BT_, C_, 1, 0, C_, C_, 3 * C_, 0, 12, CUBLASLT_EPILOGUE_BIAS},
    {"fwd attproj 768->768 +bias", C_, BT_, C_, 1, 0, C_, C_, C_, 0, 12, CUBLASLT_EPILOGUE_BIAS},
    {"fwd fc 768->3072 +bias +GELU", 4 * C_, BT_, C_, 1, 0, C_, C_, 4 * C_, 0, 12, CUBLASLT_EPILOGUE_GELU_AUX_BIAS},
    {"fwd fcproj 3072->768 +bias", C_, BT_, 4 * C_, 1, 0, 4 * C_, 4 * C_, C_, 0, 12, CUBLASLT_EPILOGUE_BIAS},
    {"fwd lm head 768->50304", VP_, BT_, C_, 1, 0, C_, C_, VP_, 0, 1, CUBLASLT_EPILOGUE_DEFAULT},
    {"bwd qkv dinp", C_, BT_, 3 * C_, 0, 0, C_, 3 * C_, C_, 0, 12, CUBLASLT_EPILOGUE_DEFAULT},
    {"bwd qkv dweight", C_, 3 * C_, BT_, 0, 1, C_, 3 * C_, C_, 1, 12, CUBLASLT_EPILOGUE_DEFAULT},
    {"bwd attproj dinp", C_, BT_, C_, 0, 0, C_, C_, C_, 0, 12, CUBLASLT_EPILOGUE_DEFAULT},
    {"bwd attproj dweight", C_, C_, BT_, 0, 1, C_, C_, C_, 1, 12, CUBLASLT_EPILOGUE_DEFAULT},
    {"bwd fc dinp", C_, BT_, 4 * C_, 0, 0, C_, 4 * C_, C_, 0, 12, CUBLASLT_EPILOGUE_DEFAULT},
    {"bwd fc dweight", C_, 4 * C_, BT_, 0, 1, C_, 4 * C_, C_, 1, 12, CUBLASLT_EPILOGUE_DEFAULT},
    {"bwd fcproj dinp +DGELU", 4 * C_, BT_, C_, 0, 0, 4 * C_, C_, 4 * C_, 0, 12, CUBLASLT_EPILOGUE_DGELU},
    {"bwd fcproj dweight", 4 * C_, C_, BT_, 0, 1, 4 * C_, C_, 4 * C_, 1, 12, CUBLASLT_EPILOGUE_DEFAULT},
    {"bwd lm head dinp", C_, BT_, VP_, 0, 0, C_, VP_, C_, 0, 1, CUBLASLT_EPILOGUE_DEFAULT},
    {"bwd lm head dweight", C_, VP_, BT_, 0, 1, C_, VP_, C_, 1, 1, CUBLASLT_EPILOGUE_DEFAULT},
#undef BT_
#undef C_
#undef VP_
};

// random operands, sized for the largest GEMM of the table
typedef struct {
    floatX *x, *w, *bias, *y, *dout, *dw, *aux;
} StepGemmBuffers;

static inline StepGemmBuffers step_gemm_buffers_alloc(void) {
    const size_t max_in = (size_t)STEP_GEMM_BT * 4 * STEP_GEMM_C, max_w = (size_t)STEP_GEMM_VP * STEP_GEMM_C;
    const size_t max_out = (size_t)STEP_GEMM_BT * STEP_GEMM_VP;
    StepGemmBuffers b;
    b.x = device_alloc<floatX>(max_in, "step x");
    b.w = device_alloc<floatX>(max_w, "step w");
    b.bias = device_alloc<floatX>(4 * STEP_GEMM_C, "step bias");
    b.y = device_alloc<floatX>(max_out, "step y");
    b.dout = device_alloc<floatX>(max_out, "step dout");
    b.dw = device_alloc<floatX>(max_w, "step dweight");
    b.aux = device_alloc<floatX>(max_in, "step aux");
    fill_random_device(b.x, max_in, 21, 1.0f);
    fill_random_device(b.w, max_w, 22, 0.03f);
    fill_random_device(b.bias, 4 * STEP_GEMM_C, 23, 0.1f);
    fill_random_device(b.dout, max_out, 25, 1e-3f);
    fill_random_device(b.aux, max_in, 26, 1.0f);  // pre-GELU values for the DGELU timings
    return b;
}

static inline void step_gemm_buffers_free(StepGemmBuffers* b) {
    floatX* bufs[] = {b->x, b->w, b->bias, b->y, b->dout, b->dw, b->aux};
    for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++) { cudaCheck(cudaFree(bufs[i])); }
}

// the GEMM's output buffer, and its element count
static inline floatX* step_gemm_output(const StepGemm* p, const StepGemmBuffers* b) { return p->transb ? b->dw : b->y; }
static inline size_t step_gemm_output_count(const StepGemm* p) { return (size_t)p->m * p->n; }
static inline double step_gemm_flops(const StepGemm* p) { return 2.0 * p->m * p->n * p->k; }

// one call on stream 0; 0 when the candidate matmul_heuristic_rank names does not exist
static inline int step_gemm_run(const StepGemm* p, const StepGemmBuffers* b) {
    const int forward = p->transa, dweight = p->transb;
    const floatX* a = dweight ? b->x : b->w;
    const floatX* bb = forward ? b->x : b->dout;
    const int biased = p->epilogue == CUBLASLT_EPILOGUE_BIAS || p->epilogue == CUBLASLT_EPILOGUE_GELU_AUX_BIAS;
    // GELU_AUX_BIAS writes the pre-activation to aux; DGELU reads it from there
    floatX* aux = p->epilogue == CUBLASLT_EPILOGUE_GELU_AUX_BIAS || p->epilogue == CUBLASLT_EPILOGUE_DGELU ? b->aux : NULL;
    return matmul_cublaslt_run(step_gemm_output(p, b), a, bb, biased ? b->bias : NULL, aux, p->m, p->n, p->k,
                               p->transa, p->transb, p->lda, p->ldb, p->ldd, p->accumulate, p->epilogue, 0);
}

#endif
