// swiglu_value.h - one SwiGLU output, SiLU(gate) * up, in fp32 from the (already rounded) gate and
// up values. Every SwiGLU forward of the CUDA trainer computes it here (llmc/activations.cuh's
// swiglu_forward and the fused epilogue of the moe experts' fch GEMM, llmc/moe_gemm_swiglu_sm90.hpp),
// so the two give the same bits: the same operations in the same order, expf and the division
// IEEE (no fast math in either translation unit, see the Makefile's flags).
#ifndef OMNIMOE_SWIGLU_VALUE_H
#define OMNIMOE_SWIGLU_VALUE_H

__host__ __device__ inline float sigmoid_value(float x) { return 1.0f / (1.0f + expf(-x)); }
__host__ __device__ inline float swiglu_value(float gate, float up) { return gate * sigmoid_value(gate) * up; }

#endif  // OMNIMOE_SWIGLU_VALUE_H
