/*
matmul_gelu_cutlass.h - GPT-2's two GELU GEMMs with the GELU in a CUTLASS 3.x Hopper epilogue
(sm90a: TMA, wgmma, a persistent warp-specialized kernel), the alternative to cuBLASLt's
GELU_AUX_BIAS and DGELU epilogues in llmc/matmul.cuh (the trainer's --gelu-fusion 3). Built
only with `make USE_CUTLASS=1` (ENABLE_CUTLASS; llmc/matmul_gelu_cutlass.cu against the CUTLASS
headers), bf16 only. No CUTLASS type appears here.

Row-major (as llmc/matmul.cuh), bf16 in and out, fp32 accumulation and epilogue math:
- matmul_cutlass_gelu_forward(out_gelu, pre_gelu, inp, weight, bias_or_NULL, BT, C_in, C_out, stream)
      pre_gelu (BT, C_out) = inp (BT, C_in) @ weight^T + bias   (weight (C_out, C_in))
      out_gelu (BT, C_out) = GELU_tanh of the fp32 pre-activation (not of its bf16 rounding)
- matmul_cutlass_dgelu_backward(dpre, dout, weight, pre_gelu, BT, C_in, C_out, stream)
      dpre (BT, C_in) = (dout (BT, C_out) @ weight (C_out, C_in)) * GELU_tanh'(pre_gelu)
Both overwrite their outputs and return 0 when they ran, 1 when the sizes or alignments do not
suit the kernel (C_in, C_out multiples of 8, 16-byte aligned pointers); the caller then takes
another path. They exit on a CUDA or CUTLASS error.

The GELU is CUTLASS's tanh form (epilogue::thread::GELU_taylor, dGELU) with the hardware's
tanh.approx, as a GEMM epilogue must keep its math short: it agrees with llmc/activations.cuh's
tanhf form to about 1e-3 (relative), below bf16's rounding, but not bit for bit, so
--gelu-fusion 3 is a run of its own bits, as 1 and 2 are (dev/cuda/test_matmul.cu checks it
against the separate GEMM and GELU passes).

matmul_cutlass_gelu_kernel selects the kernel (tests and benchmarks; 1 by default):
  0  cooperative, tile 128x256x64   1  ping-pong, tile 128x128x64 (one warpgroup's epilogue, which
                                       stores two outputs or loads one, under the other's MMAs)
matmul_cutlass_gelu_config(kernel) names it. The workspace (the persistent scheduler's) is
allocated at the first call of each kernel and never freed (a few KB).

Determinism: no split-K or stream-K; each output tile is one CTA's fixed-order sum over K, so
the same inputs give the same bits.
*/
#ifndef OMNIMOE_MATMUL_GELU_CUTLASS_H
#define OMNIMOE_MATMUL_GELU_CUTLASS_H

#include <cuda_runtime.h>

extern int matmul_cutlass_gelu_kernel;
const char* matmul_cutlass_gelu_config(int kernel);
int matmul_cutlass_gelu_forward(void* out_gelu, void* pre_gelu, const void* inp, const void* weight, const void* bias,
                                int BT, int C_in, int C_out, cudaStream_t stream);
int matmul_cutlass_dgelu_backward(void* dpre, const void* dout, const void* weight, const void* pre_gelu, int BT,
                                  int C_in, int C_out, cudaStream_t stream);

#endif  // OMNIMOE_MATMUL_GELU_CUTLASS_H
