/*
encoder.cuh - token + position embedding, forward and deterministic backward.

Defines:
- encoder_forward(out, tokens, wte, wpe, B, T, C, V, stream)
      out[b,t,:] = wte[tokens[b,t],:] + wpe[t,:]   (tokens int32 on the device; a token outside
      [0, V) makes its row NaN so the bug cannot pass silently)
- EncoderBackwardPlan and its host functions init/build/upload/free (see below), then
- encoder_backward(dwte, dwpe, dout, plan, B, T, C, stream)
      dwpe[t,:] += sum_b dout[b,t,:]                       (b in increasing order)
      dwte[v,:] += sum over positions p with tokens[p] == v of dout[p,:]  (p in increasing order)

Why a host plan: the token gradient is a scatter-add (many positions hit the same token row).
Float atomics would make it order-dependent, so instead the positions are bucketed by token
id on the host - the tokens are on the host anyway - into a CSR list that is copied to the
device. Frequent tokens (real text: "," or "the" can fill hundreds of the 8192 positions of a
micro-batch) would serialise one warp, so each bucket is cut into segments of at most
ENCODER_SEGMENT_POSITIONS positions:
  kernel 1: one warp per segment sums its positions in increasing order; a token with a single
            segment adds the sum straight into its dwte row; otherwise the segment writes an
            fp32 partial row to the plan's scratch;
  kernel 2: one warp per multi-segment token adds its partial rows in segment order to dwte.
The segmentation depends only on the tokens, so the result is bitwise reproducible.

Host plan usage, once per micro-batch (tokens = the model INPUTS of the micro-batch):
    encoder_backward_plan_init(&plan, max_BT, V, C);       // once: pinned host + device buffers
    encoder_backward_plan_build(&plan, host_tokens, B, T); // host work, O(B*T), no GPU calls
                                                           // except waiting for the previous upload
    encoder_backward_plan_upload(&plan, stream);           // async copy from pinned memory
    ... forward/backward work on `stream` ...
    encoder_backward(dwte, dwpe, dout, &plan, B, T, C, stream);
    encoder_backward_plan_free(&plan);                     // at exit
build() validates every token (clear error + exit on a token outside [0, V)) and, before it
overwrites the pinned buffer, waits for the previous upload's copy to finish (an event), so
build/upload may run ahead of the GPU by one micro-batch. encoder_backward() sizes its grids
from the host plan (numbers of segments and of multi-segment tokens) at launch time.
*/
#ifndef OMNIMOE_ENCODER_CUH
#define OMNIMOE_ENCODER_CUH

#include "cuda_utils.cuh"

#define ENCODER_BWD_WARPS 4
#define ENCODER_SEGMENT_POSITIONS 16  // most positions one warp sums before splitting the token

// int32 sections of the plan buffer (host pinned copy and device copy have the same layout),
// each max_BT entries long
enum {
    ENC_SEG_TOKEN = 0,   // per segment: token id
    ENC_SEG_START,       // per segment: first index into ENC_POSITIONS
    ENC_SEG_END,         // per segment: one past the last index
    ENC_SEG_SLOT,        // per segment: partial row in scratch, or -1 (single-segment token)
    ENC_POSITIONS,       // positions bucketed by token, increasing inside each bucket
    ENC_MULTI_TOKEN,     // per multi-segment token: token id
    ENC_MULTI_FIRST,     // per multi-segment token: its first partial row
    ENC_MULTI_COUNT,     // per multi-segment token: number of partial rows (= segments)
    ENC_NUM_SECTIONS
};

typedef struct {
    int max_BT;        // capacity in positions
    int vocab_size;    // tokens must lie in [0, vocab_size)
    int C;             // channels (sizes the partial rows)
    int BT;            // positions of the last build
    int num_unique;    // distinct tokens of the last build
    int num_segments;  // segments of the last build
    int num_multi;     // tokens with more than one segment
    int num_slots;     // partial rows used
    int max_slots;     // partial rows allocated: 2 * max_BT / ENCODER_SEGMENT_POSITIONS + 1
    int* host_buffer;  // pinned, ENC_NUM_SECTIONS * max_BT ints
    int* device_buffer;
    float* device_partials;  // max_slots rows of C floats
    int* token_slot;   // host, vocab_size entries, -1 when unused (reset after every build)
    int* unique_tokens;  // host, max_BT
    int* bucket_offsets; // host, max_BT + 1
    int* counts;         // host, max_BT (fill cursors)
    cudaEvent_t copy_done;
    int copy_pending;
} EncoderBackwardPlan;

static inline int* encoder_plan_section(int* buffer, int max_BT, int section) { return buffer + (size_t)section * max_BT; }

static inline void encoder_backward_plan_init(EncoderBackwardPlan* plan, int max_BT, int vocab_size, int C) {
    memset(plan, 0, sizeof(*plan));
    plan->max_BT = max_BT;
    plan->vocab_size = vocab_size;
    plan->C = C;
    // a token with n > S positions has ceil(n/S) < 2n/S segments, so partial rows < 2 BT / S
    plan->max_slots = 2 * max_BT / ENCODER_SEGMENT_POSITIONS + 1;
    size_t bytes = (size_t)ENC_NUM_SECTIONS * max_BT * sizeof(int);
    cudaCheck(cudaMallocHost((void**)&plan->host_buffer, bytes));
    plan->device_buffer = (int*)cuda_malloc_or_die(bytes, "encoder backward token plan");
    plan->device_partials = (float*)cuda_malloc_or_die((size_t)plan->max_slots * C * sizeof(float),
                                                        "encoder backward partial rows");
    plan->token_slot = (int*)malloc((size_t)vocab_size * sizeof(int));
    plan->unique_tokens = (int*)malloc((size_t)max_BT * sizeof(int));
    plan->bucket_offsets = (int*)malloc(((size_t)max_BT + 1) * sizeof(int));
    plan->counts = (int*)malloc((size_t)max_BT * sizeof(int));
    if (plan->token_slot == NULL || plan->unique_tokens == NULL || plan->bucket_offsets == NULL || plan->counts == NULL) {
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
    cudaCheck(cudaFree(plan->device_partials));
    free(plan->token_slot);
    free(plan->unique_tokens);
    free(plan->bucket_offsets);
    free(plan->counts);
    memset(plan, 0, sizeof(*plan));
}

// Bucket the B*T positions by token id (counting sort, O(B*T), stable: positions stay in
// increasing order inside each bucket; distinct tokens in order of first appearance, which
// affects no sum), then cut each bucket into segments of at most ENCODER_SEGMENT_POSITIONS.
static inline void encoder_backward_plan_build(EncoderBackwardPlan* plan, const int* tokens, int B, int T) {
    const int BT = B * T;
    const int max_BT = plan->max_BT;
    if (BT > max_BT) {
        fprintf(stderr, "encoder_backward_plan_build: B*T = %d exceeds the plan's capacity %d\n", BT, max_BT);
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
    int* unique_tokens = plan->unique_tokens;
    int* offsets = plan->bucket_offsets;
    int* counts = plan->counts;
    int* positions = encoder_plan_section(plan->host_buffer, max_BT, ENC_POSITIONS);
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

    int* seg_token = encoder_plan_section(plan->host_buffer, max_BT, ENC_SEG_TOKEN);
    int* seg_start = encoder_plan_section(plan->host_buffer, max_BT, ENC_SEG_START);
    int* seg_end = encoder_plan_section(plan->host_buffer, max_BT, ENC_SEG_END);
    int* seg_slot = encoder_plan_section(plan->host_buffer, max_BT, ENC_SEG_SLOT);
    int* multi_token = encoder_plan_section(plan->host_buffer, max_BT, ENC_MULTI_TOKEN);
    int* multi_first = encoder_plan_section(plan->host_buffer, max_BT, ENC_MULTI_FIRST);
    int* multi_count = encoder_plan_section(plan->host_buffer, max_BT, ENC_MULTI_COUNT);
    int num_segments = 0, num_multi = 0, num_slots = 0;
    for (int u = 0; u < num_unique; u++) {
        const int n = offsets[u + 1] - offsets[u];
        const int pieces = (n + ENCODER_SEGMENT_POSITIONS - 1) / ENCODER_SEGMENT_POSITIONS;
        if (pieces > 1) {
            multi_token[num_multi] = unique_tokens[u];
            multi_first[num_multi] = num_slots;
            multi_count[num_multi] = pieces;
            num_multi++;
        }
        for (int q = 0; q < pieces; q++) {
            seg_token[num_segments] = unique_tokens[u];
            seg_start[num_segments] = offsets[u] + q * ENCODER_SEGMENT_POSITIONS;
            seg_end[num_segments] = offsets[u] + ((q + 1) * ENCODER_SEGMENT_POSITIONS < n ? (q + 1) * ENCODER_SEGMENT_POSITIONS : n);
            seg_slot[num_segments] = pieces > 1 ? num_slots++ : -1;
            num_segments++;
        }
    }
    if (num_slots > plan->max_slots) {  // cannot happen (see init); a broken invariant must not write out of bounds
        fprintf(stderr, "encoder_backward_plan_build: internal error, %d partial rows > %d\n", num_slots, plan->max_slots);
        exit(EXIT_FAILURE);
    }
    plan->num_unique = num_unique;
    plan->num_segments = num_segments;
    plan->num_multi = num_multi;
    plan->num_slots = num_slots;
    plan->BT = BT;
}

static inline void encoder_backward_plan_upload(EncoderBackwardPlan* plan, cudaStream_t stream) {
    size_t bytes = (size_t)ENC_NUM_SECTIONS * plan->max_BT * sizeof(int);
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

// kernel 1: one warp per segment (at most ENCODER_SEGMENT_POSITIONS positions, increasing)
__global__ void encoder_backward_wte_segments_kernel(floatX* dwte, float* partials, const floatX* dout,
                                                     const int* plan_buffer, int max_BT, int num_segments, int C) {
    const int lane = threadIdx.x % 32;
    const int segment = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (segment >= num_segments) { return; }
    const int token = plan_buffer[ENC_SEG_TOKEN * max_BT + segment];
    const int start = plan_buffer[ENC_SEG_START * max_BT + segment];
    const int end = plan_buffer[ENC_SEG_END * max_BT + segment];
    const int slot = plan_buffer[ENC_SEG_SLOT * max_BT + segment];
    const int* positions = plan_buffer + ENC_POSITIONS * max_BT;
    for (int c = lane * x128::size; c < C; c += 32 * x128::size) {
        float acc[x128::size];
        for (int k = 0; k < x128::size; k++) { acc[k] = 0.0f; }
#pragma unroll 4
        for (int i = start; i < end; i++) {
            x128 d = load128cs(dout + (size_t)positions[i] * C + c);
            for (int k = 0; k < x128::size; k++) { acc[k] += (float)d[k]; }
        }
        if (slot < 0) {
            x128 old = load128(dwte + (size_t)token * C + c);
            x128 result;
            for (int k = 0; k < x128::size; k++) { result[k] = (floatX)((float)old[k] + acc[k]); }
            store128(dwte + (size_t)token * C + c, result);
        } else {
            float* row = partials + (size_t)slot * C + c;
            for (int k = 0; k < x128::size; k += 4) {
                *reinterpret_cast<float4*>(row + k) = make_float4(acc[k], acc[k + 1], acc[k + 2], acc[k + 3]);
            }
        }
    }
}

// kernel 2: one warp per token with several segments: add its partial rows in segment order
__global__ void encoder_backward_wte_combine_kernel(floatX* dwte, const float* partials, const int* plan_buffer,
                                                    int max_BT, int num_multi, int C) {
    const int lane = threadIdx.x % 32;
    const int m = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (m >= num_multi) { return; }
    const int token = plan_buffer[ENC_MULTI_TOKEN * max_BT + m];
    const int first = plan_buffer[ENC_MULTI_FIRST * max_BT + m];
    const int count = plan_buffer[ENC_MULTI_COUNT * max_BT + m];
    for (int c = lane * x128::size; c < C; c += 32 * x128::size) {
        float acc[x128::size];
        for (int k = 0; k < x128::size; k++) { acc[k] = 0.0f; }
#pragma unroll 4
        for (int j = 0; j < count; j++) {
            const float* row = partials + (size_t)(first + j) * C + c;
            for (int k = 0; k < x128::size; k += 4) {
                float4 p = *reinterpret_cast<const float4*>(row + k);
                acc[k] += p.x; acc[k + 1] += p.y; acc[k + 2] += p.z; acc[k + 3] += p.w;
            }
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
    if (plan->C != C) {
        fprintf(stderr, "encoder_backward: the plan was made for C = %d, this call has C = %d\n", plan->C, C);
        exit(EXIT_FAILURE);
    }
    if (B * T == 0) { return; }
    const int block_size = 256;
    encoder_backward_wpe_kernel<<<ceil_div(T * (C / x128::size), block_size), block_size, 0, stream>>>(dwpe, dout, B, T,
                                                                                                       C);
    cudaCheckLast();
    const int warps_per_block = ENCODER_BWD_WARPS;
    encoder_backward_wte_segments_kernel<<<ceil_div(plan->num_segments, warps_per_block), 32 * warps_per_block, 0,
                                           stream>>>(dwte, plan->device_partials, dout, plan->device_buffer,
                                                     plan->max_BT, plan->num_segments, C);
    cudaCheckLast();
    if (plan->num_multi > 0) {
        encoder_backward_wte_combine_kernel<<<ceil_div(plan->num_multi, warps_per_block), 32 * warps_per_block, 0,
                                              stream>>>(dwte, plan->device_partials, plan->device_buffer, plan->max_BT,
                                                        plan->num_multi, C);
        cudaCheckLast();
    }
}

#endif  // OMNIMOE_ENCODER_CUH
