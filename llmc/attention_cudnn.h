/*
attention_cudnn.h - causal self-attention through cuDNN's fused SDPA (flash attention), the
alternative to llmc/attention.cuh selected with --attention cudnn. Built only with
`make USE_CUDNN=1` (ENABLE_CUDNN), which compiles llmc/attention_cudnn.cu against the
cudnn-frontend headers; bf16 only (cuDNN's SDPA has no fp32 path).

Same layouts and meaning as llmc/attention.cuh:
  qkv (B, T, 3C): q at channel offset 0, k at C, v at 2C, head h in [h*hs, (h+1)*hs), hs = C/NH
  out (B, T, C) OVERWRITTEN; lse (B, NH, T) fp32 OVERWRITTEN, natural-log logsumexp of each
  query row's scaled scores (cuDNN's "stats"); scale 1/sqrt(hs), causal
  dqkv (B, T, 3C) OVERWRITTEN (dq, dk, dv at offsets 0, C, 2C)

attention_cudnn_scratch_bytes(B, T, C, NH) builds (once per shape, cached) the forward and the
backward graph and returns the larger cuDNN workspace; the caller owns a scratch buffer of at
least that size and passes it to both launchers, which never allocate. It needs the GPU (it
creates the cuDNN handle on first use) and exits with a message naming the shape when cuDNN
cannot run it.

Determinism: the backward graph is built with cuDNN's deterministic algorithm (no atomics whose
order can vary in dQ), so the same inputs give the same bits; the forward is deterministic by
construction. The bits differ from llmc/attention.cuh's kernels (another summation order).
*/
#ifndef OMNIMOE_ATTENTION_CUDNN_H
#define OMNIMOE_ATTENTION_CUDNN_H

#include <stddef.h>
#include <cuda_runtime.h>
#include <cuda_bf16.h>   // bf16 only; not cuda_utils.cuh, whose kernels must live in one object

size_t attention_cudnn_scratch_bytes(int B, int T, int C, int NH);
void attention_cudnn_forward(__nv_bfloat16* out, float* lse, const __nv_bfloat16* qkv, int B, int T, int C, int NH,
                             void* scratch, cudaStream_t stream);
void attention_cudnn_backward(__nv_bfloat16* dqkv, const __nv_bfloat16* dout, const __nv_bfloat16* qkv, const __nv_bfloat16* out, const float* lse,
                              int B, int T, int C, int NH, void* scratch, cudaStream_t stream);
void attention_cudnn_free(void);   // the handle and the cached graphs

#endif // OMNIMOE_ATTENTION_CUDNN_H
