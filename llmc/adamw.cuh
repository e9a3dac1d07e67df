/*
adamw.cuh - AdamW update on fp32 master weights, writing floatX parameters.

Defines:
- adamw_update(params, master, grads, m, v, num_params, lr, beta1, beta2, eps, weight_decay,
               grad_scale, t, stream)
  for each i in [0, num_params):
      g       = grads[i] * grad_scale                 (grad_scale: clipping / averaging factor)
      m[i]    = beta1 * m[i] + (1 - beta1) * g
      v[i]    = beta2 * v[i] + (1 - beta2) * g * g
      m_hat   = m[i] / (1 - beta1^t),  v_hat = v[i] / (1 - beta2^t)      (t >= 1: step number)
      master[i] -= lr * (m_hat / (sqrt(v_hat) + eps) + weight_decay * master[i])
      params[i] = round_to_nearest_even_floatX(master[i])
  It works on one contiguous range, so callers call it once per tensor (or per group) with
  that tensor's weight decay, passing pointers offset to the tensor's first element.
  Elementwise, so trivially deterministic. A vectorised kernel (4 elements per thread) runs
  when num_params is a multiple of 4 and every pointer is 16-byte aligned (8-byte for the
  bf16 arrays); otherwise a scalar kernel with the identical per-element math runs.
- adamw_quad()             the vectorised kernel's body for one quad (llmc/zero.cuh reuses it)
- adamw_bias_correction()  1 - beta^t as adamw_update computes it
*/
#ifndef OMNIMOE_ADAMW_CUH
#define OMNIMOE_ADAMW_CUH

#include <math.h>
#include "cuda_utils.cuh"

struct alignas(4 * sizeof(floatX)) floatX4 {
    floatX value[4];
};

__device__ inline float adamw_one(float grad, float* m, float* v, float master, float lr, float beta1, float beta2,
                                  float eps, float weight_decay, float grad_scale, float bias_correction1,
                                  float bias_correction2) {
    float g = grad * grad_scale;
    float m_new = beta1 * (*m) + (1.0f - beta1) * g;
    float v_new = beta2 * (*v) + (1.0f - beta2) * g * g;
    *m = m_new;
    *v = v_new;
    float m_hat = m_new / bias_correction1;
    float v_hat = v_new / bias_correction2;
    return master - lr * (m_hat / (sqrtf(v_hat) + eps) + weight_decay * master);
}

__global__ void adamw_scalar_kernel(floatX* params, float* master, const floatX* grads, float* m, float* v, size_t n,
                                    float lr, float beta1, float beta2, float eps, float weight_decay,
                                    float grad_scale, float bias_correction1, float bias_correction2) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) { return; }
    float m_i = m[i], v_i = v[i];
    float new_master = adamw_one((float)grads[i], &m_i, &v_i, master[i], lr, beta1, beta2, eps, weight_decay,
                                 grad_scale, bias_correction1, bias_correction2);
    m[i] = m_i;
    v[i] = v_i;
    master[i] = new_master;
    params[i] = (floatX)new_master;  // float -> bf16 conversion rounds to nearest even
}

// quad q of one contiguous range (4 elements, 16-byte aligned fp32, 4*sizeof(floatX)-aligned
// floatX): the body of adamw_vec4_kernel, shared with zero.cuh's one-launch shard update
__device__ inline void adamw_quad(floatX* params, float* master, const floatX* grads, float* m, float* v, size_t q,
                                  float lr, float beta1, float beta2, float eps, float weight_decay, float grad_scale,
                                  float bias_correction1, float bias_correction2) {
    floatX4 g4 = reinterpret_cast<const floatX4*>(grads)[q];
    float4 m4 = __ldcs(reinterpret_cast<const float4*>(m) + q);
    float4 v4 = __ldcs(reinterpret_cast<const float4*>(v) + q);
    float4 w4 = __ldcs(reinterpret_cast<const float4*>(master) + q);
    float ms[4] = {m4.x, m4.y, m4.z, m4.w};
    float vs[4] = {v4.x, v4.y, v4.z, v4.w};
    float ws[4] = {w4.x, w4.y, w4.z, w4.w};
    floatX4 p4;
    for (int k = 0; k < 4; k++) {
        ws[k] = adamw_one((float)g4.value[k], &ms[k], &vs[k], ws[k], lr, beta1, beta2, eps, weight_decay, grad_scale,
                          bias_correction1, bias_correction2);
        p4.value[k] = (floatX)ws[k];
    }
    __stcs(reinterpret_cast<float4*>(m) + q, make_float4(ms[0], ms[1], ms[2], ms[3]));
    __stcs(reinterpret_cast<float4*>(v) + q, make_float4(vs[0], vs[1], vs[2], vs[3]));
    __stcs(reinterpret_cast<float4*>(master) + q, make_float4(ws[0], ws[1], ws[2], ws[3]));
    reinterpret_cast<floatX4*>(params)[q] = p4;
}

__global__ void adamw_vec4_kernel(floatX* params, float* master, const floatX* grads, float* m, float* v,
                                  size_t num_quads, float lr, float beta1, float beta2, float eps,
                                  float weight_decay, float grad_scale, float bias_correction1,
                                  float bias_correction2) {
    size_t q = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (q >= num_quads) { return; }
    adamw_quad(params, master, grads, m, v, q, lr, beta1, beta2, eps, weight_decay, grad_scale, bias_correction1,
               bias_correction2);
}

// 1 - beta^t in fp32 from a double power (t >= 1: the step number; exits otherwise)
static inline float adamw_bias_correction(float beta, int t) {
    if (t < 1) {
        fprintf(stderr, "adamw_update: step t must be >= 1 (got %d)\n", t);
        exit(EXIT_FAILURE);
    }
    return (float)(1.0 - pow((double)beta, (double)t));
}

static inline void adamw_update(floatX* params, float* master, const floatX* grads, float* m, float* v,
                                size_t num_params, float lr, float beta1, float beta2, float eps, float weight_decay,
                                float grad_scale, int t, cudaStream_t stream) {
    const float bias_correction1 = adamw_bias_correction(beta1, t);
    const float bias_correction2 = adamw_bias_correction(beta2, t);
    if (num_params == 0) { return; }
    const int block_size = 512;
    const size_t floatX4_align = 4 * sizeof(floatX);
    int vectorised = (num_params % 4 == 0) && is_aligned16(master) && is_aligned16(m) && is_aligned16(v) &&
                     ((uintptr_t)params % floatX4_align == 0) && ((uintptr_t)grads % floatX4_align == 0);
    if (vectorised) {
        size_t num_quads = num_params / 4;
        adamw_vec4_kernel<<<(unsigned)ceil_div_sz(num_quads, block_size), block_size, 0, stream>>>(
            params, master, grads, m, v, num_quads, lr, beta1, beta2, eps, weight_decay, grad_scale, bias_correction1,
            bias_correction2);
    } else {
        adamw_scalar_kernel<<<(unsigned)ceil_div_sz(num_params, block_size), block_size, 0, stream>>>(
            params, master, grads, m, v, num_params, lr, beta1, beta2, eps, weight_decay, grad_scale, bias_correction1,
            bias_correction2);
    }
    cudaCheckLast();
}

#endif  // OMNIMOE_ADAMW_CUH
