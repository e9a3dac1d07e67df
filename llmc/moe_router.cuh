/*
moe_router.cuh - the router of the moe FFN kind on the GPU (docs/design.md §10.2-10.5): softmax
over all E_t routed experts, exact top-k with the CPU's tie rule, gates, the gating residual of
MoE++, the balance loss and its gradient, the loss-free balancing bias update.

Defines (BT tokens, E_t routed experts, k per token, ids [0, E) FFN, then constant, copy, zero;
zero experts are the ids >= zero_from):
- moe_gemm(ta, tb, m, n, k, A, lda, B, ldb, beta, C, ctype, ldc, stream): one cuBLAS GEMM on
  matmul.cuh's cuBLAS handle, floatX inputs, fp32 compute, floatX or fp32 output (any leading
  dimensions: E_t need not be a multiple of 8, which cuBLASLt's heuristics may refuse)
- moe_route(probs, idx, gate, denom, z, bias, BT, E_t, k, zero_from, norm_topk, stream):
  p = softmax(z) (BT, E_t) fp32; idx (BT, k) the k largest p + b, best first, equal scores to
  the smaller id (the CPU reference's select_best order); gate (BT, k); denom (BT): D of
  --moe-norm-topk 1, else 1. Overwrites all four.
- moe_gate_residual_forward(z, zprev, G, BT, E_t, stream): z += zprev G^T (fp32, j in order)
- moe_balance_loss(loss, probs, counts, BT, E_t, k, E, alpha, tau, sums, stream): loss[0] =
  alpha sum_i eta_i f_i P_i (design §10.3): one block per expert sums its column in a fixed tree
  (double), then one thread sums over i in order; sums: scratch of E_t doubles
- moe_router_dz(dz, dzx, dp, probs, idx, gate, dgate, denom, carry_or_NULL, counts, BT, E_t, k,
  E, zero_from, norm_topk, loss_scale, alpha, tau, stream): the router's backward from the gate
  gradients to the logits: dp = balance-loss gradient + gate terms, dz = p (dp - <p, dp>) (+
  carry); dz fp32 and rounded (dzx) for the GEMMs; dp is scratch (BT, E_t). Overwrites.
- moe_gate_residual_backward(carry, dG, dz, zprev, G, BT, E_t, scratch, scratch_bytes, stream): carry =
  dz G (the gradient of the previous layer's logits, overwritten), dG += dz^T zprev (fixed chunks of
  MOE_ROUTER_CHUNK tokens, then the chunks in order); scratch: moe_gate_residual_scratch_bytes
- moe_tanh_forward(x, n, stream) / moe_tanh_backward(d, y, n, stream): x = tanh x; d *= 1 - y^2
- moe_bias_update(master, params, counts, L, E_t, E, rate, stream): b_i += rate sign(sum_j c_j -
  E c_i) for the E FFN experts of each layer, on the fp32 master and its floatX rounding (the
  same rounding as AdamW); counts (L, E_t) int, the step's loads
- moe_add_aux_loss(loss_sum, aux, L, stream): loss_sum[0] += aux[0] + ... + aux[L-1], in order

Determinism: one warp per token with butterfly reductions, one thread per output with its sum
in a fixed order, fixed-chunk partials; no atomics, no host synchronisation.
*/
#ifndef OMNIMOE_MOE_ROUTER_CUH
#define OMNIMOE_MOE_ROUTER_CUH

#include "cuda_utils.cuh"
#include "matmul.cuh"   // the cuBLAS handle
#include "router.cuh"   // router_beats, router_warp_argbest: the tie rule of the top-k

#define MOE_ROUTER_WARPS 4     // tokens per block of the per-token kernels
#define MOE_ROUTER_CHUNK 128   // tokens per partial sum of dG
#define MOE_BALANCE_THREADS 256

// ----------------------------------------------------------------------------
// GEMMs

static void moe_gemm(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, const floatX* A, int lda,
                     const floatX* B, int ldb, float beta, void* Cp, cudaDataType_t ctype, int ldc,
                     cudaStream_t stream) {
    if (m == 0 || n == 0) return;
    const float one = 1.0f;
    cublasCheck(cublasSetStream(matmul_cublas_handle, stream));
    cublasCheck(cublasGemmEx(matmul_cublas_handle, ta, tb, m, n, k, &one, A, CUDA_R_FLOATX, lda, B, CUDA_R_FLOATX, ldb,
                             &beta, Cp, ctype, ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// ----------------------------------------------------------------------------
// warp helpers (butterfly: every lane ends with the same value, in a fixed order)

__device__ inline float moe_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ inline float moe_warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// ----------------------------------------------------------------------------
// kernels

// one warp per token: softmax, k rounds of "best after the previous one", gates
__global__ void moe_route_kernel(float* probs, int* idx, float* gate, float* denom, const float* z,
                                 const floatX* bias, int BT, int Et, int k, int zero_from, int norm_topk) {
    const int t = blockIdx.x * MOE_ROUTER_WARPS + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (t >= BT) return;
    const float* zr = z + (size_t)t * Et;
    float* pr = probs + (size_t)t * Et;
    float mx = -INFINITY;
    for (int i = lane; i < Et; i += 32) mx = fmaxf(mx, zr[i]);
    mx = moe_warp_max(mx);
    float sum = 0.0f;
    for (int i = lane; i < Et; i += 32) sum += expf(zr[i] - mx);
    sum = moe_warp_sum(sum);
    for (int i = lane; i < Et; i += 32) pr[i] = expf(zr[i] - mx) / sum;
    __syncwarp();
    int* id = idx + (size_t)t * k;
    float prev_v = INFINITY;
    int prev_i = -1;  // everything comes after (+inf, -1)
    for (int m = 0; m < k; m++) {
        float best_v = -INFINITY;
        int best_i = INT_MAX;
        for (int i = lane; i < Et; i += 32) {
            float v = pr[i] + (float)bias[i];
            if (router_beats(prev_v, prev_i, v, i) && router_beats(v, i, best_v, best_i)) { best_v = v; best_i = i; }
        }
        router_warp_argbest(best_v, best_i);
        if (lane == 0) id[m] = best_i;
        prev_v = best_v;
        prev_i = best_i;
    }
    __syncwarp();
    if (lane != 0) return;
    float D = 0.0f;
    for (int m = 0; m < k; m++) {
        if (id[m] < zero_from) D += pr[id[m]];
    }
    float* g = gate + (size_t)t * k;
    for (int m = 0; m < k; m++) {
        if (!norm_topk) g[m] = pr[id[m]];
        else g[m] = id[m] >= zero_from || D <= 0.0f ? 0.0f : pr[id[m]] / D;
    }
    denom[t] = norm_topk ? D : 1.0f;
}

// one thread per (t, i): z[t, i] += sum_j G[i, j] zprev[t, j]
__global__ void moe_gate_residual_forward_kernel(float* z, const float* zprev, const floatX* G, int BT, int Et) {
    const size_t o = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (o >= (size_t)BT * Et) return;
    const size_t t = o / Et, i = o % Et;
    const float* zp = zprev + t * Et;
    const floatX* g = G + i * Et;
    float s = 0.0f;
    for (int j = 0; j < Et; j++) s += (float)g[j] * zp[j];
    z[o] += s;
}

// one block per expert i: sum_t p_{t,i} (double: strided per thread, then a fixed tree)
__global__ void moe_prob_sums_kernel(double* sums, const float* probs, int BT, int Et) {
    __shared__ double red[MOE_BALANCE_THREADS];
    const int tid = threadIdx.x, i = blockIdx.x;
    double s = 0.0;
    for (int t = tid; t < BT; t += MOE_BALANCE_THREADS) s += probs[(size_t)t * Et + i];
    red[tid] = s;
    __syncthreads();
    for (int stride = MOE_BALANCE_THREADS / 2; stride > 0; stride /= 2) {
        if (tid < stride) red[tid] += red[tid + stride];
        __syncthreads();
    }
    if (tid == 0) sums[i] = red[0];
}

// one thread: the layer's balance loss alpha sum_i eta_i f_i P_i (double, i in order)
__global__ void moe_balance_loss_kernel(float* loss, const double* sums, const int* counts, int BT, int Et, int k,
                                        int E, float alpha, float tau) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    double total = 0.0;
    for (int i = 0; i < Et; i++) {
        double fi = (double)Et * counts[i] / ((double)k * BT);
        total += (i < E ? 1.0 : (double)tau) * fi * (sums[i] / BT);
    }
    loss[0] = (float)((double)alpha * total);
}

// one warp per token: gates -> dp (plus the balance-loss gradient) -> softmax backward -> dz
__global__ void moe_router_dz_kernel(float* dz, floatX* dzx, float* dp, const float* probs, const int* idx,
                                     const float* gate, const float* dgate, const float* denom, const float* carry,
                                     const int* counts, int BT, int Et, int k, int E, int zero_from, int norm_topk,
                                     float loss_scale, float alpha, float tau) {
    const int t = blockIdx.x * MOE_ROUTER_WARPS + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (t >= BT) return;
    const size_t row = (size_t)t * Et;
    const float* pr = probs + row;
    float* dpr = dp + row;
    for (int i = lane; i < Et; i += 32) {
        float a = 0.0f;
        if (alpha > 0.0f) {  // d L_aux / d p_{t,i}, the same for every token (design §10.3)
            double fi = (double)Et * counts[i] / ((double)k * BT);
            a = (float)((double)loss_scale * alpha * (i < E ? 1.0f : tau) * fi / BT);
        }
        dpr[i] = a;
    }
    __syncwarp();
    if (lane == 0) {
        const int* id = idx + (size_t)t * k;
        const float* g = gate + (size_t)t * k;
        const float* dg = dgate + (size_t)t * k;
        if (!norm_topk) {
            for (int m = 0; m < k; m++) dpr[id[m]] += dg[m];
        } else if (denom[t] > 0.0f) {
            float gdg = 0.0f;
            for (int m = 0; m < k; m++) gdg += g[m] * dg[m];
            for (int m = 0; m < k; m++) {
                if (id[m] < zero_from) dpr[id[m]] += (dg[m] - gdg) / denom[t];
            }
        }
    }
    __syncwarp();
    float pdp = 0.0f;
    for (int i = lane; i < Et; i += 32) pdp += pr[i] * dpr[i];
    pdp = moe_warp_sum(pdp);
    for (int i = lane; i < Et; i += 32) {
        float d = pr[i] * (dpr[i] - pdp);
        if (carry != NULL) d += carry[row + i];
        dz[row + i] = d;
        dzx[row + i] = (floatX)d;
    }
}

// one thread per (t, j): carry[t, j] = sum_i dz[t, i] G[i, j]
__global__ void moe_gate_residual_carry_kernel(float* carry, const float* dz, const floatX* G, int BT, int Et) {
    const size_t o = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (o >= (size_t)BT * Et) return;
    const size_t t = o / Et, j = o % Et;
    const float* d = dz + t * Et;
    float s = 0.0f;
    for (int i = 0; i < Et; i++) s += d[i] * (float)G[(size_t)i * Et + j];
    carry[o] = s;
}

// partial[c, i*Et + j] = sum over the tokens of chunk c (in order) of dz[t, i] zprev[t, j]
__global__ void moe_gate_map_partial_kernel(float* partial, const float* dz, const float* zprev, int BT, int Et) {
    const size_t ij = (size_t)blockIdx.x * blockDim.x + threadIdx.x, EE = (size_t)Et * Et;
    if (ij >= EE) return;
    const size_t i = ij / Et, j = ij % Et;
    const int t0 = blockIdx.y * MOE_ROUTER_CHUNK, t1 = min(BT, t0 + MOE_ROUTER_CHUNK);
    float s = 0.0f;
    for (int t = t0; t < t1; t++) s += dz[(size_t)t * Et + i] * zprev[(size_t)t * Et + j];
    partial[(size_t)blockIdx.y * EE + ij] = s;
}

// dG[ij] += the chunks' partials, in chunk order
__global__ void moe_gate_map_finish_kernel(floatX* dG, const float* partial, int chunks, int Et) {
    const size_t ij = (size_t)blockIdx.x * blockDim.x + threadIdx.x, EE = (size_t)Et * Et;
    if (ij >= EE) return;
    float s = 0.0f;
    for (int c = 0; c < chunks; c++) s += partial[(size_t)c * EE + ij];
    dG[ij] = (floatX)((float)dG[ij] + s);
}

__global__ void moe_tanh_forward_kernel(floatX* x, size_t n) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = (floatX)tanhf((float)x[i]);
}

__global__ void moe_tanh_backward_kernel(floatX* d, const floatX* y, size_t n) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float yi = (float)y[i];
        d[i] = (floatX)((float)d[i] * (1.0f - yi * yi));
    }
}

// one thread per (layer, FFN expert); integer comparison, the same on every rank (design §10.5)
__global__ void moe_bias_update_kernel(float* master, floatX* params, const int* counts, int L, int Et, int E,
                                       float rate) {
    const int o = blockIdx.x * blockDim.x + threadIdx.x;
    if (o >= L * E) return;
    const int l = o / E, i = o % E;
    const int* cl = counts + (size_t)l * Et;
    long long total = 0;
    for (int j = 0; j < E; j++) total += cl[j];
    long long diff = total - (long long)E * cl[i];
    float* b = master + (size_t)l * Et + i;
    *b += diff > 0 ? rate : (diff < 0 ? -rate : 0.0f);
    params[(size_t)l * Et + i] = (floatX)*b;
}

__global__ void moe_add_aux_loss_kernel(float* loss_sum, const float* aux, int L) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    float s = 0.0f;
    for (int l = 0; l < L; l++) s += aux[l];
    loss_sum[0] += s;
}

// ----------------------------------------------------------------------------
// launchers

static inline int moe_elementwise_blocks(size_t n) { return (int)ceil_div_sz(n, 256); }

static void moe_route(float* probs, int* idx, float* gate, float* denom, const float* z, const floatX* bias, int BT,
                      int Et, int k, int zero_from, int norm_topk, cudaStream_t stream) {
    moe_route_kernel<<<ceil_div(BT, MOE_ROUTER_WARPS), MOE_ROUTER_WARPS * 32, 0, stream>>>(
        probs, idx, gate, denom, z, bias, BT, Et, k, zero_from, norm_topk);
    cudaCheckLast();
}

static void moe_gate_residual_forward(float* z, const float* zprev, const floatX* G, int BT, int Et,
                                      cudaStream_t stream) {
    moe_gate_residual_forward_kernel<<<moe_elementwise_blocks((size_t)BT * Et), 256, 0, stream>>>(z, zprev, G, BT, Et);
    cudaCheckLast();
}

// sums: scratch of E_t doubles
static void moe_balance_loss(float* loss, const float* probs, const int* counts, int BT, int Et, int k, int E,
                             float alpha, float tau, double* sums, cudaStream_t stream) {
    moe_prob_sums_kernel<<<Et, MOE_BALANCE_THREADS, 0, stream>>>(sums, probs, BT, Et);
    cudaCheckLast();
    moe_balance_loss_kernel<<<1, 32, 0, stream>>>(loss, sums, counts, BT, Et, k, E, alpha, tau);
    cudaCheckLast();
}

static void moe_router_dz(float* dz, floatX* dzx, float* dp, const float* probs, const int* idx, const float* gate,
                          const float* dgate, const float* denom, const float* carry, const int* counts, int BT,
                          int Et, int k, int E, int zero_from, int norm_topk, float loss_scale, float alpha, float tau,
                          cudaStream_t stream) {
    moe_router_dz_kernel<<<ceil_div(BT, MOE_ROUTER_WARPS), MOE_ROUTER_WARPS * 32, 0, stream>>>(
        dz, dzx, dp, probs, idx, gate, dgate, denom, carry, counts, BT, Et, k, E, zero_from, norm_topk, loss_scale,
        alpha, tau);
    cudaCheckLast();
}

static inline size_t moe_gate_residual_scratch_bytes(int BT, int Et) {
    return (size_t)ceil_div(BT, MOE_ROUTER_CHUNK) * Et * Et * sizeof(float);
}

static void moe_gate_residual_backward(float* carry, floatX* dG, const float* dz, const float* zprev, const floatX* G,
                                       int BT, int Et, void* scratch, size_t scratch_bytes, cudaStream_t stream) {
    if (scratch_bytes < moe_gate_residual_scratch_bytes(BT, Et)) {
        fprintf(stderr, "moe_gate_residual_backward: scratch of %zu bytes given, %zu needed\n", scratch_bytes,
                moe_gate_residual_scratch_bytes(BT, Et));
        exit(EXIT_FAILURE);
    }
    moe_gate_residual_carry_kernel<<<moe_elementwise_blocks((size_t)BT * Et), 256, 0, stream>>>(carry, dz, G, BT, Et);
    cudaCheckLast();
    const int chunks = ceil_div(BT, MOE_ROUTER_CHUNK);
    float* partial = (float*)scratch;
    dim3 grid(moe_elementwise_blocks((size_t)Et * Et), chunks);
    moe_gate_map_partial_kernel<<<grid, 256, 0, stream>>>(partial, dz, zprev, BT, Et);
    cudaCheckLast();
    moe_gate_map_finish_kernel<<<moe_elementwise_blocks((size_t)Et * Et), 256, 0, stream>>>(dG, partial, chunks, Et);
    cudaCheckLast();
}

static void moe_tanh_forward(floatX* x, size_t n, cudaStream_t stream) {
    if (n == 0) return;
    moe_tanh_forward_kernel<<<moe_elementwise_blocks(n), 256, 0, stream>>>(x, n);
    cudaCheckLast();
}

static void moe_tanh_backward(floatX* d, const floatX* y, size_t n, cudaStream_t stream) {
    if (n == 0) return;
    moe_tanh_backward_kernel<<<moe_elementwise_blocks(n), 256, 0, stream>>>(d, y, n);
    cudaCheckLast();
}

static void moe_bias_update(float* master, floatX* params, const int* counts, int L, int Et, int E, float rate,
                            cudaStream_t stream) {
    if (rate <= 0.0f || E == 0) return;
    moe_bias_update_kernel<<<ceil_div(L * E, 256), 256, 0, stream>>>(master, params, counts, L, Et, E, rate);
    cudaCheckLast();
}

static void moe_add_aux_loss(float* loss_sum, const float* aux, int L, cudaStream_t stream) {
    moe_add_aux_loss_kernel<<<1, 32, 0, stream>>>(loss_sum, aux, L);
    cudaCheckLast();
}

#endif  // OMNIMOE_MOE_ROUTER_CUH
