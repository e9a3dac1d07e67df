/*
activations.cuh - pointwise activations of the FFN, forward and backward, vectorised (16 bytes).

Defines:
- gelu_forward(out, inp, N, stream)              out = GELU_tanh(inp)
- gelu_backward(dinp, inp, dout, N, stream)      dinp = dout * GELU_tanh'(inp)   (dinp may alias dout)
- swiglu_forward(h, gu, BT, I, stream)           h[t,i] = SiLU(gu[t,i]) * gu[t,I+i]
- swiglu_backward(dgu, dh, gu, BT, I, stream)    dgu[t,i] = dh*u*SiLU'(g), dgu[t,I+i] = dh*SiLU(g)
  (dgu is overwritten; it is the gradient fed to the fused gate/up GEMM backward)

GELU is the tanh approximation of GPT-2:
  GELU(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
SwiGLU input layout (conventions): one fused (BT, 2I) GEMM output with the gate g in columns
[0, I) and the up projection u in columns [I, 2I). SiLU(g) = g * sigmoid(g),
SiLU'(g) = sig(g) (1 + g (1 - sig(g))).
All math in fp32; results rounded once to floatX. N (and I) must be multiples of 8 (bf16) /
4 (fp32) and the pointers 16-byte aligned: the launchers check and exit with a message.
Shapes: gelu inp, out, dout, dinp (N); swiglu gu, dgu (BT, 2I), h, dh (BT, I), all floatX.
Every output is overwritten, never accumulated. Elementwise, no sums across elements: the same
inputs give the same bits.
*/
#ifndef OMNIMOE_ACTIVATIONS_CUH
#define OMNIMOE_ACTIVATIONS_CUH

#include "cuda_utils.cuh"

#define GELU_SCALING_FACTOR 0.7978845608028654f  // sqrt(2/pi)

__device__ inline float gelu_tanh_value(float x) {
    float cube = 0.044715f * x * x * x;
    return 0.5f * x * (1.0f + tanhf(GELU_SCALING_FACTOR * (x + cube)));
}

__device__ inline float gelu_tanh_derivative(float x) {
    float cube = 0.044715f * x * x * x;
    float tanh_arg = GELU_SCALING_FACTOR * (x + cube);
    float tanh_out = tanhf(tanh_arg);
    float sech2 = 1.0f - tanh_out * tanh_out;
    return 0.5f * (1.0f + tanh_out) + 0.5f * x * sech2 * GELU_SCALING_FACTOR * (1.0f + 3.0f * 0.044715f * x * x);
}

__device__ inline float sigmoid_value(float x) { return 1.0f / (1.0f + expf(-x)); }

__global__ void gelu_forward_kernel(floatX* out, const floatX* inp, size_t num_vectors) {
    size_t v = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (v >= num_vectors) { return; }
    x128 in = load128cs(inp + v * x128::size);
    x128 result;
    for (int k = 0; k < x128::size; k++) {
        result[k] = (floatX)gelu_tanh_value((float)in[k]);
    }
    store128(out + v * x128::size, result);
}

__global__ void gelu_backward_kernel(floatX* dinp, const floatX* inp, const floatX* dout, size_t num_vectors) {
    size_t v = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (v >= num_vectors) { return; }
    x128 in = load128cs(inp + v * x128::size);
    x128 grad_out = load128cs(dout + v * x128::size);
    x128 result;
    for (int k = 0; k < x128::size; k++) {
        result[k] = (floatX)((float)grad_out[k] * gelu_tanh_derivative((float)in[k]));
    }
    store128(dinp + v * x128::size, result);
}

// one element of the SwiGLU backward: d(gate) and d(up) from dh, gate and up (every SwiGLU backward
// calls this, so the moe experts' fused row kernel, llmc/moe_experts.cuh, has the same bits)
__device__ inline void swiglu_backward_element(floatX* dgate, floatX* dup, float dh, float gate, float up) {
    float sig = sigmoid_value(gate);
    float silu = gate * sig;
    float silu_grad = sig * (1.0f + gate * (1.0f - sig));
    *dgate = (floatX)(dh * up * silu_grad);
    *dup = (floatX)(dh * silu);
}

// one element of the SwiGLU forward, h = SiLU(gate) * up rounded to floatX (every SwiGLU forward
// calls this, and so does the moe experts' backward, which recomputes h from fch: the same bits)
__device__ inline floatX swiglu_forward_element(float gate, float up) { return (floatX)(gate * sigmoid_value(gate) * up); }

// one thread per 16-byte vector of h (and the matching vectors of g and u)
__global__ void swiglu_forward_kernel(floatX* h, const floatX* gu, int BT, int I) {
    size_t v = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    size_t vectors_per_row = (size_t)I / x128::size;
    if (v >= (size_t)BT * vectors_per_row) { return; }
    size_t row = v / vectors_per_row;
    size_t col = (v % vectors_per_row) * x128::size;
    const floatX* gate_row = gu + row * 2 * (size_t)I;
    x128 g = load128cs(gate_row + col);
    x128 u = load128cs(gate_row + I + col);
    x128 result;
    for (int k = 0; k < x128::size; k++) result[k] = swiglu_forward_element((float)g[k], (float)u[k]);
    store128(h + row * (size_t)I + col, result);
}

__global__ void swiglu_backward_kernel(floatX* dgu, const floatX* dh, const floatX* gu, int BT, int I) {
    size_t v = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    size_t vectors_per_row = (size_t)I / x128::size;
    if (v >= (size_t)BT * vectors_per_row) { return; }
    size_t row = v / vectors_per_row;
    size_t col = (v % vectors_per_row) * x128::size;
    const floatX* gate_row = gu + row * 2 * (size_t)I;
    x128 g = load128cs(gate_row + col);
    x128 u = load128cs(gate_row + I + col);
    x128 grad_h = load128cs(dh + row * (size_t)I + col);
    x128 grad_g, grad_u;
    for (int k = 0; k < x128::size; k++) {
        swiglu_backward_element(&grad_g[k], &grad_u[k], (float)grad_h[k], (float)g[k], (float)u[k]);
    }
    floatX* dgate_row = dgu + row * 2 * (size_t)I;
    store128(dgate_row + col, grad_g);
    store128(dgate_row + I + col, grad_u);
}

// ----------------------------------------------------------------------------
// launchers

static inline void activations_check_args(const char* who, size_t n, const void* a, const void* b, const void* c) {
    if (n % x128::size != 0) {
        fprintf(stderr, "%s: size %zu must be a multiple of %d (16-byte vectors of %s)\n", who, n, x128::size, FLOATX_NAME);
        exit(EXIT_FAILURE);
    }
    if (!is_aligned16(a) || !is_aligned16(b) || (c != NULL && !is_aligned16(c))) {
        fprintf(stderr, "%s: all buffers must be 16-byte aligned\n", who);
        exit(EXIT_FAILURE);
    }
}

static inline void gelu_forward(floatX* out, const floatX* inp, size_t N, cudaStream_t stream) {
    activations_check_args("gelu_forward", N, out, inp, NULL);
    const int block_size = 256;
    size_t num_vectors = N / x128::size;
    int grid_size = (int)ceil_div_sz(num_vectors, block_size);
    if (grid_size == 0) { return; }
    gelu_forward_kernel<<<grid_size, block_size, 0, stream>>>(out, inp, num_vectors);
    cudaCheckLast();
}

// dinp may be the same buffer as dout (in-place backward)
static inline void gelu_backward(floatX* dinp, const floatX* inp, const floatX* dout, size_t N, cudaStream_t stream) {
    activations_check_args("gelu_backward", N, dinp, inp, dout);
    const int block_size = 256;
    size_t num_vectors = N / x128::size;
    int grid_size = (int)ceil_div_sz(num_vectors, block_size);
    if (grid_size == 0) { return; }
    gelu_backward_kernel<<<grid_size, block_size, 0, stream>>>(dinp, inp, dout, num_vectors);
    cudaCheckLast();
}

static inline void swiglu_forward(floatX* h, const floatX* gu, int BT, int I, cudaStream_t stream) {
    activations_check_args("swiglu_forward (I)", (size_t)I, h, gu, NULL);
    const int block_size = 256;
    size_t num_vectors = (size_t)BT * I / x128::size;
    int grid_size = (int)ceil_div_sz(num_vectors, block_size);
    if (grid_size == 0) { return; }
    swiglu_forward_kernel<<<grid_size, block_size, 0, stream>>>(h, gu, BT, I);
    cudaCheckLast();
}

// dgu must not alias gu or dh
static inline void swiglu_backward(floatX* dgu, const floatX* dh, const floatX* gu, int BT, int I, cudaStream_t stream) {
    activations_check_args("swiglu_backward (I)", (size_t)I, dgu, dh, gu);
    const int block_size = 256;
    size_t num_vectors = (size_t)BT * I / x128::size;
    int grid_size = (int)ceil_div_sz(num_vectors, block_size);
    if (grid_size == 0) { return; }
    swiglu_backward_kernel<<<grid_size, block_size, 0, stream>>>(dgu, dh, gu, BT, I);
    cudaCheckLast();
}

#endif  // OMNIMOE_ACTIVATIONS_CUH
