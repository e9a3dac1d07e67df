/*
classifier.cuh - fused softmax + cross-entropy over the padded vocabulary, and a deterministic
mean of the per-token losses.

Defines:
- fused_classifier(logits, losses, targets, dloss, BT, V, Vp, write_dlogits, stream)
      logits (BT, Vp) floatX: only columns [0, V) are real; padded columns [V, Vp) get
      probability 0 whatever their value.
      losses[t] (fp32)  = logsumexp(logits[t, :V]) - logits[t, targets[t]]
      if write_dlogits: logits[t, c] is OVERWRITTEN with
            (softmax(logits[t, :V])[c] - (c == targets[t])) * dloss   for c < V
            0                                                           for V <= c < Vp
      dloss is the loss weight of one token, normally 1 / (B * T * grad_accum_steps).
      write_dlogits = 0 (evaluation) leaves the logits untouched.
      A target outside [0, V) gives a NaN loss (and prints one message from the device).
- mean_loss(out, losses, n, stream): out[0] = (sum of losses[0..n)) / n in a fixed order,
  on the device (no host sync; copy it when you want it)

One block per row; each thread keeps an online (max, sum of exp) over its fixed columns,
then a fixed-order block reduction combines them: the result is bitwise reproducible.
The row is read twice (statistics, then gradient) and written once.
*/
#ifndef OMNIMOE_CLASSIFIER_CUH
#define OMNIMOE_CLASSIFIER_CUH

#include "cuda_utils.cuh"

#define CLASSIFIER_BLOCK_SIZE 1024
#define CLASSIFIER_LOG2E 1.4426950408889634f

__global__ void __launch_bounds__(CLASSIFIER_BLOCK_SIZE)
fused_classifier_kernel(floatX* logits, float* losses, const int* targets, float dloss, int V, int Vp,
                        int write_dlogits) {
    const int row = blockIdx.x;
    floatX* row_logits = logits + (size_t)row * Vp;
    const int target = targets[row];

    // pass 1: per-thread online max / sum of exp over the real columns.
    // exp(x - m) is computed as exp2(x * log2(e) - m * log2(e)): one FMA and the hardware exp2.
    float thread_max = -INFINITY;
    float thread_sum = 0.0f;
#pragma unroll 4
    for (int c = threadIdx.x * x128::size; c < V; c += blockDim.x * x128::size) {
        x128 packed = load128(row_logits + c);
        float chunk_max = -INFINITY;
        for (int k = 0; k < x128::size; k++) {
            if (c + k < V) { chunk_max = fmaxf(chunk_max, (float)packed[k]); }
        }
        float new_max = fmaxf(thread_max, chunk_max);
        float scaled_max = new_max * CLASSIFIER_LOG2E;
        float sum = (thread_max == -INFINITY) ? 0.0f : thread_sum * exp2f(thread_max * CLASSIFIER_LOG2E - scaled_max);
        for (int k = 0; k < x128::size; k++) {
            if (c + k < V) { sum += exp2f(fmaf((float)packed[k], CLASSIFIER_LOG2E, -scaled_max)); }
        }
        thread_max = new_max;
        thread_sum = sum;
    }
    const float row_max = block_reduce_max(thread_max);
    const float row_scaled_max = row_max * CLASSIFIER_LOG2E;
    const float scaled =
        (thread_max == -INFINITY) ? 0.0f : thread_sum * exp2f(thread_max * CLASSIFIER_LOG2E - row_scaled_max);
    const float row_sum = block_reduce_sum(scaled);
    const float inv_sum = 1.0f / row_sum;

    const int target_ok = (target >= 0 && target < V);
    if (threadIdx.x == 0) {
        if (target_ok) {
            losses[row] = logf(row_sum) + row_max - (float)row_logits[target];
        } else {
            printf("fused_classifier: row %d has target %d outside [0, %d)\n", row, target, V);
            losses[row] = NAN;
        }
    }
    if (!write_dlogits) { return; }
    // every thread has read its target logit (thread 0) before anyone overwrites the row
    __syncthreads();

    // pass 2: gradient over all padded columns
#pragma unroll 4
    for (int c = threadIdx.x * x128::size; c < Vp; c += blockDim.x * x128::size) {
        x128 packed = load128cs(row_logits + c);
        x128 grad;
        for (int k = 0; k < x128::size; k++) {
            const int col = c + k;
            float g = 0.0f;
            if (col < V) {
                float prob = exp2f(fmaf((float)packed[k], CLASSIFIER_LOG2E, -row_scaled_max)) * inv_sum;
                float indicator = (col == target) ? 1.0f : 0.0f;
                g = (prob - indicator) * dloss;
            }
            grad[k] = (floatX)g;
        }
        store128(row_logits + c, grad);
    }
}

// single block, fixed assignment of elements to threads, fixed-order block reduction
__global__ void mean_loss_kernel(float* out, const float* losses, int n) {
    float sum = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) { sum += losses[i]; }
    sum = block_reduce_sum(sum);
    if (threadIdx.x == 0) { out[0] = sum / (float)n; }
}

// ----------------------------------------------------------------------------
// launchers

static inline void fused_classifier(floatX* logits, float* losses, const int* targets, float dloss, int BT, int V,
                                    int Vp, int write_dlogits, cudaStream_t stream) {
    if (Vp % x128::size != 0 || V > Vp || V <= 0) {
        fprintf(stderr, "fused_classifier: need 0 < V (%d) <= Vp (%d) and Vp a multiple of %d\n", V, Vp, x128::size);
        exit(EXIT_FAILURE);
    }
    if (!is_aligned16(logits)) {
        fprintf(stderr, "fused_classifier: logits must be 16-byte aligned\n");
        exit(EXIT_FAILURE);
    }
    if (BT == 0) { return; }
    fused_classifier_kernel<<<BT, CLASSIFIER_BLOCK_SIZE, 0, stream>>>(logits, losses, targets, dloss, V, Vp,
                                                                      write_dlogits);
    cudaCheckLast();
}

static inline void mean_loss(float* out, const float* losses, int n, cudaStream_t stream) {
    if (n <= 0) {
        fprintf(stderr, "mean_loss: n must be positive (got %d)\n", n);
        exit(EXIT_FAILURE);
    }
    mean_loss_kernel<<<1, 1024, 0, stream>>>(out, losses, n);
    cudaCheckLast();
}

#endif  // OMNIMOE_CLASSIFIER_CUH
