/*
encoder.cuh - token + position embedding, forward and deterministic backward.

Defines:
- encoder_forward(out, tokens, wte, wpe, B, T, C, V, stream)
      out[b,t,:] = wte[tokens[b,t],:] + wpe[t,:]   (tokens int32 on the device; a token outside
      [0, V) makes its row NaN so the bug cannot pass silently)
- EncoderBackwardPlan and its host functions (see below), then
- encoder_backward(dwte, dwpe, dout, plan, B, T, C, stream)
      dwpe[t,:] += sum_b dout[b,t,:]                       (b in increasing order)
      dwte[v,:] += sum over positions p with tokens[p] == v of dout[p,:]  (p in increasing order)

Why a host plan: the token gradient is a scatter-add (many positions hit the same token row).
Float atomics would make it order-dependent, so instead the positions are bucketed by token
id on the host - the tokens are on the host anyway - into a CSR list, copied to the device,
and one warp per distinct token sums its positions in increasing position order.

Host plan usage, once per micro-batch (tokens = the model INPUTS of the micro-batch):
    encoder_backward_plan_init(&plan, max_BT, V);          // once: pinned host + device buffers
    encoder_backward_plan_build(&plan, host_tokens, B, T); // host work, O(B*T)
    encoder_backward_plan_upload(&plan, stream);           // async copy from pinned memory
    ... forward/backward work on `stream` ...
    encoder_backward(dwte, dwpe, dout, &plan, B, T, C, stream);
    encoder_backward_plan_free(&plan);                     // at exit
build() validates every token (clear error + exit on a token outside [0, V)) and, before it
overwrites the pinned buffer, waits for the previous upload's copy to finish (an event), so
build/upload may run ahead of the GPU by one micro-batch. encoder_backward() launches
ceil(num_distinct_tokens / 4) blocks, a number taken from the host plan at launch time.
*/
#ifndef OMNIMOE_ENCODER_CUH
#define OMNIMOE_ENCODER_CUH

#include "cuda_utils.cuh"

#define ENCODER_BWD_WARPS 4

typedef struct {
    int max_BT;        // capacity in positions
    int vocab_size;    // tokens must lie in [0, vocab_size)
    int num_unique;    // distinct tokens of the last build
    int BT;            // positions of the last build
    // pinned host buffer and its device copy, same layout (int32):
    //   unique_tokens[max_BT] | offsets[max_BT + 1] | positions[max_BT]
    // positions[offsets[u] .. offsets[u+1]) are the positions holding unique_tokens[u],
    // increasing.
    int* host_buffer;
    int* device_buffer;
    int* token_slot;   // host, vocab_size entries, -1 when unused (reset after every build)
    int* slot_cursor;  // host, max_BT entries (fill cursors)
    cudaEvent_t copy_done;
    int copy_pending;
} EncoderBackwardPlan;

static inline size_t encoder_plan_buffer_ints(int max_BT) { return (size_t)3 * max_BT + 1; }

static inline void encoder_backward_plan_init(EncoderBackwardPlan* plan, int max_BT, int vocab_size) {
    memset(plan, 0, sizeof(*plan));
    plan->max_BT = max_BT;
    plan->vocab_size = vocab_size;
    size_t bytes = encoder_plan_buffer_ints(max_BT) * sizeof(int);
    cudaCheck(cudaMallocHost((void**)&plan->host_buffer, bytes));
    plan->device_buffer = (int*)cuda_malloc_or_die(bytes, "encoder backward token plan");
    plan->token_slot = (int*)malloc((size_t)vocab_size * sizeof(int));
    plan->slot_cursor = (int*)malloc((size_t)max_BT * sizeof(int));
    if (plan->token_slot == NULL || plan->slot_cursor == NULL) {
        fprintf(stderr, "encoder_backward_plan_init: out of host memory\n");
        exit(EXIT_FAILURE);
    }
    for (int v = 0; v < vocab_size; v++) { plan->token_slot[v] = -1; }
    cudaCheck(cudaEventCreateWithFlags(&plan->copy_done, cudaEventDisableTiming));
}

static inline void encoder_backward_plan_free(EncoderBackwardPlan* plan) {
    if (plan->copy_pending) { cudaCheck(cudaEventSynchronize(plan->copy_done)); }
    cudaCheck(cudaEventDestroy(plan->copy_done));
    cudaCheck(cudaFreeHost(plan->host_buffer));
    cudaCheck(cudaFree(plan->device_buffer));
    free(plan->token_slot);
    free(plan->slot_cursor);
    memset(plan, 0, sizeof(*plan));
}

// Bucket the B*T positions by token id (counting sort, O(B*T), stable: positions stay in
// increasing order inside each bucket). Distinct tokens are listed in order of first
// appearance; the order of distinct tokens does not affect any sum.
static inline void encoder_backward_plan_build(EncoderBackwardPlan* plan, const int* tokens, int B, int T) {
    const int BT = B * T;
    if (BT > plan->max_BT) {
        fprintf(stderr, "encoder_backward_plan_build: B*T = %d exceeds the plan's capacity %d\n", BT, plan->max_BT);
        exit(EXIT_FAILURE);
    }
    for (int p = 0; p < BT; p++) {
        if (tokens[p] < 0 || tokens[p] >= plan->vocab_size) {
            fprintf(stderr, "encoder_backward_plan_build: token %d at position %d is outside [0, %d)\n", tokens[p], p,
                    plan->vocab_size);
            exit(EXIT_FAILURE);
        }
    }
    // the previous upload may still be reading the pinned buffer
    if (plan->copy_pending) {
        cudaCheck(cudaEventSynchronize(plan->copy_done));
        plan->copy_pending = 0;
    }
    int* unique_tokens = plan->host_buffer;
    int* offsets = unique_tokens + plan->max_BT;
    int* positions = offsets + plan->max_BT + 1;
    int* counts = plan->slot_cursor;
    int num_unique = 0;
    for (int p = 0; p < BT; p++) {
        int slot = plan->token_slot[tokens[p]];
        if (slot < 0) {
            slot = num_unique++;
            plan->token_slot[tokens[p]] = slot;
            unique_tokens[slot] = tokens[p];
            counts[slot] = 0;
        }
        counts[slot]++;
    }
    offsets[0] = 0;
    for (int u = 0; u < num_unique; u++) {
        offsets[u + 1] = offsets[u] + counts[u];
        counts[u] = offsets[u];  // becomes the fill cursor
    }
    for (int p = 0; p < BT; p++) {
        int slot = plan->token_slot[tokens[p]];
        positions[counts[slot]++] = p;
    }
    for (int u = 0; u < num_unique; u++) { plan->token_slot[unique_tokens[u]] = -1; }
    plan->num_unique = num_unique;
    plan->BT = BT;
}

static inline void encoder_backward_plan_upload(EncoderBackwardPlan* plan, cudaStream_t stream) {
    size_t bytes = encoder_plan_buffer_ints(plan->max_BT) * sizeof(int);
    cudaCheck(cudaMemcpyAsync(plan->device_buffer, plan->host_buffer, bytes, cudaMemcpyHostToDevice, stream));
    cudaCheck(cudaEventRecord(plan->copy_done, stream));
    plan->copy_pending = 1;
}

// ----------------------------------------------------------------------------
// kernels

__global__ void encoder_forward_kernel(floatX* out, const int* tokens, const floatX* wte, const floatX* wpe, int B,
                                       int T, int C, int V) {
    const int vectors_per_row = C / x128::size;
    const size_t v = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (v >= (size_t)B * T * vectors_per_row) { return; }
    const int bt = (int)(v / vectors_per_row);
    const int c = (int)(v % vectors_per_row) * x128::size;
    const int t = bt % T;
    const int token = tokens[bt];
    x128 result;
    if (token < 0 || token >= V) {
        for (int k = 0; k < x128::size; k++) { result[k] = (floatX)NAN; }
    } else {
        x128 w = load128(wte + (size_t)token * C + c);
        x128 p = load128(wpe + (size_t)t * C + c);
        for (int k = 0; k < x128::size; k++) { result[k] = (floatX)((float)w[k] + (float)p[k]); }
    }
    store128(out + (size_t)bt * C + c, result);
}

// one thread per (t, 16-byte column chunk): sum over the batch in order b = 0..B-1
__global__ void encoder_backward_wpe_kernel(floatX* dwpe, const floatX* dout, int B, int T, int C) {
    const int vectors_per_row = C / x128::size;
    const int v = blockIdx.x * blockDim.x + threadIdx.x;
    if (v >= T * vectors_per_row) { return; }
    const int t = v / vectors_per_row;
    const int c = (v % vectors_per_row) * x128::size;
    float acc[x128::size];
    for (int k = 0; k < x128::size; k++) { acc[k] = 0.0f; }
    for (int b = 0; b < B; b++) {
        x128 d = load128cs(dout + ((size_t)b * T + t) * C + c);
        for (int k = 0; k < x128::size; k++) { acc[k] += (float)d[k]; }
    }
    x128 old = load128(dwpe + (size_t)t * C + c);
    x128 result;
    for (int k = 0; k < x128::size; k++) { result[k] = (floatX)((float)old[k] + acc[k]); }
    store128(dwpe + (size_t)t * C + c, result);
}

// one warp per distinct token: sum its positions (increasing) into the token's row
__global__ void encoder_backward_wte_kernel(floatX* dwte, const floatX* dout, const int* plan_buffer, int max_BT,
                                            int num_unique, int C) {
    const int lane = threadIdx.x % 32;
    const int u = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (u >= num_unique) { return; }
    const int* unique_tokens = plan_buffer;
    const int* offsets = unique_tokens + max_BT;
    const int* positions = offsets + max_BT + 1;
    const int token = unique_tokens[u];
    const int start = offsets[u];
    const int end = offsets[u + 1];
    for (int c = lane * x128::size; c < C; c += 32 * x128::size) {
        float acc[x128::size];
        for (int k = 0; k < x128::size; k++) { acc[k] = 0.0f; }
        for (int i = start; i < end; i++) {
            x128 d = load128cs(dout + (size_t)positions[i] * C + c);
            for (int k = 0; k < x128::size; k++) { acc[k] += (float)d[k]; }
        }
        x128 old = load128(dwte + (size_t)token * C + c);
        x128 result;
        for (int k = 0; k < x128::size; k++) { result[k] = (floatX)((float)old[k] + acc[k]); }
        store128(dwte + (size_t)token * C + c, result);
    }
}

// ----------------------------------------------------------------------------
// launchers

static inline void encoder_check_args(const char* who, int C, const void* p1, const void* p2, const void* p3) {
    if (C % x128::size != 0) {
        fprintf(stderr, "%s: C (%d) must be a multiple of %d\n", who, C, x128::size);
        exit(EXIT_FAILURE);
    }
    if (!is_aligned16(p1) || !is_aligned16(p2) || !is_aligned16(p3)) {
        fprintf(stderr, "%s: floatX buffers must be 16-byte aligned\n", who);
        exit(EXIT_FAILURE);
    }
}

static inline void encoder_forward(floatX* out, const int* tokens, const floatX* wte, const floatX* wpe, int B, int T,
                                   int C, int V, cudaStream_t stream) {
    encoder_check_args("encoder_forward", C, out, wte, wpe);
    const int block_size = 256;
    const size_t num_vectors = (size_t)B * T * (C / x128::size);
    if (num_vectors == 0) { return; }
    encoder_forward_kernel<<<(int)ceil_div_sz(num_vectors, block_size), block_size, 0, stream>>>(out, tokens, wte, wpe,
                                                                                                B, T, C, V);
    cudaCheckLast();
}

// dwte += token gradient, dwpe += position gradient. The plan must have been built for this
// micro-batch's input tokens and uploaded on `stream` (or a stream this one waits for).
static inline void encoder_backward(floatX* dwte, floatX* dwpe, const floatX* dout, const EncoderBackwardPlan* plan,
                                    int B, int T, int C, cudaStream_t stream) {
    encoder_check_args("encoder_backward", C, dwte, dwpe, dout);
    if (plan->BT != B * T) {
        fprintf(stderr, "encoder_backward: the plan was built for %d positions, this call has B*T = %d\n", plan->BT,
                B * T);
        exit(EXIT_FAILURE);
    }
    if (B * T == 0) { return; }
    const int block_size = 256;
    encoder_backward_wpe_kernel<<<ceil_div(T * (C / x128::size), block_size), block_size, 0, stream>>>(dwpe, dout, B, T,
                                                                                                       C);
    cudaCheckLast();
    encoder_backward_wte_kernel<<<ceil_div(plan->num_unique, ENCODER_BWD_WARPS), 32 * ENCODER_BWD_WARPS, 0, stream>>>(
        dwte, dout, plan->device_buffer, plan->max_BT, plan->num_unique, C);
    cudaCheckLast();
}

#endif  // OMNIMOE_ENCODER_CUH
