/*
moe_layer.cuh - the moe feed-forward layer on the GPU (docs/design.md §10): DeepSeekMoE's
fine-grained top-k SwiGLU experts beside shared ones, with the MoE++ zero, copy and constant
experts, gating residuals and the balance loss. The one composition of moe_router.cuh,
scheduler.cuh, moe_experts.cuh and the shared SwiGLU (matmul.cuh, activations.cuh), in the
pattern of omnimoe_layer.cuh.

Defines:
- MoeDims {BT, C, H, Ie, E, Kc, Kp, Kz, k, recompute_xg}: BT = the most tokens of one forward, C
  channels, H = S*I_e the shared SwiGLU width (0: none), I_e one expert's width, E FFN experts,
  Kc constant, Kp copy, Kz zero experts (E_t = E + Kc + Kp + Kz routed ids in that order), k
  top-k; recompute_xg 1 (the trainer's -r >= 1, or GEMMs that read x's rows themselves): no layer
  keeps its experts' gathered inputs (P C floatX a layer less); where a GEMM cannot read them
  through the schedule they are gathered into the workspace's dyg buffer, in the forward and
  again in the backward
- MoeOptions {gate_res, norm_topk, router, input_scale}: the model fields of design §10.7
- MoeWeights: views of the layer's tensors in the flat parameter buffer (also the gradients)
- MoeSaved: what the forward keeps for the backward (per layer), and the host copy of the
  per-expert counts of the last forward (the grouped GEMMs' sizes)
- MoeWorkspace: what all moe layers of a model share (one runs at a time): the expert outputs,
  the backward's buffers, the gating-residual carry between layers, the grouped-GEMM arrays
- MoeLayer: dims, options, views, saved state, workspace, the expert-count and balance-loss
  views, the previous layer's logits (gating residual), the run settings alpha and tau
- moe_layer_scratch_bytes / moe_layer_saved_bytes / moe_workspace_bytes (dims, options)
- moe_workspace_create(ws, d, opt, scratch, scratch_bytes, dhidden, dwide) / moe_workspace_free
- moe_layer_create(layer, d, opt, w, dw, ws, fch, fch_act) / moe_layer_free
- moe_layer_set_activations(layer, fch, fch_act)
- moe_layer_forward(layer, out, x, BT, training, stream)
- moe_layer_backward(layer, dx, dout, x, BT, loss_scale, stream): loss_scale weights the balance
  loss as the cross-entropy's mean (1/micro-batches); the model clears ws->carry_valid before
  the backward of its top layer

Shapes: x, out, dout, dx (BT, C) floatX. Weights (floatX): fcw (2H, C), fcprojw (C, H), router
(E_t, C) or the tanh router's (8 E_t, C) and router2 (E_t, 8 E_t), gate_map (E_t, E_t), w1
(E, 2 I_e, C), w2 (E, C, I_e), cvec (Kc, C), cmix (Kc, 2, C), bias (E_t) (read only).
Saved: z, probs (BT, E_t) fp32; rh (BT, 8 E_t) floatX (tanh); idx, gate (BT, k); denom (BT);
mix (BT k, 2); the schedule and pos (BT k); counts (E_t) and offsets (E_t + 1); xg (BT k, C)
unless recompute_xg (dW1's operand where the GEMMs do not read x through the schedule) and fch_g
(BT k, 2 I_e) floatX in sorted order (the experts' h = SwiGLU(fch_g) lives in the workspace's dh
during the forward and is recomputed in the backward).

Outputs: forward overwrites out (the shared SwiGLU writes it and the experts add in fp32,
rounded once; H = 0: the experts write it); training = 1 adds the pairs of each expert to the
expert-count view and, with alpha > 0, writes the layer's balance loss to the aux view.
Backward overwrites dx and accumulates (+=) into every gradient view (bias: never).

Host synchronisation: one per forward, for the per-expert counts the grouped GEMMs' sizes need
(the shared SwiGLU is queued before the wait, so the GPU keeps working); the backward reuses
them. Not capturable in a CUDA graph for that reason.

Determinism: every kernel sums in a fixed order, the scheduler's sort is stable, cuBLAS runs
without atomics; same inputs give the same bits.
*/
#ifndef OMNIMOE_MOE_LAYER_CUH
#define OMNIMOE_MOE_LAYER_CUH

#include "config.h"
#include "cuda_utils.cuh"
#include "matmul.cuh"
#include "activations.cuh"
#include "scheduler.cuh"
#include "expert_stats.cuh"  // expert_counts_add
#include "moe_router.cuh"
#include "moe_experts.cuh"

typedef struct {
    int BT;  // the most tokens of one forward
    int C;   // channels
    int H;   // shared SwiGLU width S*I_e (0: none)
    int Ie;  // one expert's width
    int E, Kc, Kp, Kz;  // FFN, constant, copy, zero experts
    int k;   // experts per token
    int recompute_xg;  // 1: no layer keeps its gathered xg (-r >= 1, or GEMMs that read x); 0: each layer does
} MoeDims;

typedef struct {
    int gate_res;     // gating residuals
    int norm_topk;    // renormalised gates, zero experts dropped
    int router;       // MOE_ROUTER_LINEAR | MOE_ROUTER_TANH
    int input_scale;  // the routed experts read k x
} MoeOptions;

typedef struct {
    floatX* fcw;       // (2H, C) shared SwiGLU
    floatX* fcprojw;   // (C, H)
    floatX* router;    // (E_t, C) linear; (8 E_t, C) tanh, its first layer
    floatX* router2;   // (E_t, 8 E_t) tanh only
    floatX* gate_map;  // (E_t, E_t) gating residuals only
    floatX* w1;        // (E, 2 I_e, C)
    floatX* w2;        // (E, C, I_e)
    floatX* cvec;      // (Kc, C)
    floatX* cmix;      // (Kc, 2, C)
    floatX* bias;      // (E_t) selection bias (no gradient)
} MoeWeights;

typedef struct {
    floatX* fch;       // (BT, 2H) shared SwiGLU pre-activation (view or owned)
    floatX* fch_act;   // (BT, H)
    float* z;          // (BT, E_t) router logits (with the gating residual)
    float* probs;      // (BT, E_t)
    floatX* rh;        // (BT, 8 E_t) tanh router hidden layer
    int* idx;          // (BT, k)
    float* gate;       // (BT, k)
    float* denom;      // (BT)
    float* mix;        // (BT k, 2) constant experts' w
    ExpertSchedule sched;
    int* pos;          // (BT k) sorted row of each pair
    int* counts;       // (E_t) pairs per expert of the last forward
    int* offsets;      // (E_t + 1)
    floatX* xg;        // (BT k, C) the FFN rows' inputs s x, gathered in sorted order (dW1's operand);
                       // recompute_xg: the workspace's dyg instead
    floatX* fch_g;     // (BT k, 2 I_e) FFN rows, sorted
    int* host_counts;  // (E_t) pinned host copy of counts
    int owns_fch;
    void* block;
} MoeSaved;

typedef struct {
    float* scratch;        // moe_layer_scratch_bytes or more (also the matmuls')
    size_t scratch_bytes;
    floatX* dhidden;       // (BT, H) shared SwiGLU
    floatX* dwide;         // (BT, 2H)
    floatX* dyg;           // (BT k, C) the forward's expert outputs; the backward's gathered dy, then
                           // the experts' input gradients; with recompute_xg also the gathered inputs
                           // before the GEMM that reads them (fch in the forward, dW1 in the backward)
    floatX* dh;            // (BT k, I_e) the forward's h = SwiGLU(fch_g); the backward's W2^T dy, then g h for dW2
    floatX* dfch;          // (BT k, 2 I_e)
    float* dp;             // (BT, E_t)
    float* dz;             // (BT, E_t)
    floatX* dzx;           // (BT, E_t)
    float* carry;          // (BT, E_t) d of the previous layer's logits via its gating residual
    floatX* drh;           // (BT, 8 E_t) tanh router
    float* dmix;           // (BT k, 2)
    float* dgate;          // (BT k)
    double* prob_sums;     // (E_t) the balance loss's sum_t p_{t,i}
    int carry_valid;       // carry holds the gradient for the layer whose backward runs next
    MoeGroupedGemm gemm;
    cudaEvent_t counts_ready;
    int owns_scratch, owns_grads;
    void* block;
} MoeWorkspace;

typedef struct {
    MoeDims dims;
    MoeOptions opt;
    MoeWeights w;
    MoeWeights dw;
    MoeSaved saved;
    MoeWorkspace* ws;
    int* expert_counts;       // (E_t) view: += pairs per expert in training forwards; NULL: not counted
    float* aux;               // (1) view: the layer's balance loss of the last training forward (alpha > 0)
    const float* prev_logits; // (BT, E_t) the previous layer's saved z (gating residuals, l > 0), else NULL
    float aux_coef;           // alpha (0 = off)
    float zc_weight;          // tau
    int training;
    int last_BT;
    int x_token_reads;  // the last forward read x's rows inside the GEMMs (no xg): so does dW1
} MoeLayer;

static inline int moe_routed(MoeDims d) { return d.E + d.Kc + d.Kp + d.Kz; }
static inline int moe_router_hidden(MoeDims d, MoeOptions o) {
    return o.router == MOE_ROUTER_TANH ? MOE_TANH_WIDTH * moe_routed(d) : 0;
}

// ----------------------------------------------------------------------------
// sizes

static inline size_t moe_layer_scratch_bytes(MoeDims d, MoeOptions o) {
    size_t s = scheduler_scratch_bytes(d.BT * d.k, moe_routed(d));
    if (o.gate_res) {
        size_t b = moe_gate_residual_scratch_bytes(d.BT, moe_routed(d));
        if (b > s) s = b;
    }
    size_t b = moe_const_grads_scratch_bytes(d.BT * d.k, d.C, d.Kc);
    if (b > s) s = b;
    return s;
}

static inline size_t moe_layer_saved_bytes(MoeDims d, MoeOptions o) {
    const size_t BT = d.BT, Et = moe_routed(d), k = d.k, P = BT * k, X = sizeof(floatX), F = sizeof(float);
    const size_t RH = moe_router_hidden(d, o), A = scheduler_max_active((int)P, (int)Et), Ie = d.Ie, E = d.E;
    return 2 * align256(BT * Et * F) + align256(BT * RH * X) + align256(P * 4) + align256(P * F) + align256(BT * F)
         + align256(P * 2 * F) + 3 * align256(P * 4) + align256(A * 4) + align256((A + 1) * 4) + align256(4)
         + align256(P * 4) + align256(Et * 4) + align256((Et + 1) * 4)
         + align256((E && !d.recompute_xg ? P : 0) * d.C * X) + align256((E ? P : 0) * 2 * Ie * X);
}

static inline size_t moe_workspace_bytes(MoeDims d, MoeOptions o) {
    const size_t BT = d.BT, Et = moe_routed(d), P = BT * d.k, X = sizeof(floatX), F = sizeof(float);
    const size_t RH = moe_router_hidden(d, o), Ie = d.Ie, PE = d.E ? P : 0;
    return align256(PE * d.C * X) + align256(PE * Ie * X) + align256(PE * 2 * Ie * X) + 3 * align256(BT * Et * F)
         + align256(BT * Et * X) + align256(BT * RH * X) + align256(P * 2 * F) + align256(P * F) + align256(Et * 8)
         + moe_grouped_gemm_bytes(d.E);
}

static void moe_check_dims(MoeDims d) {
    const char* why = NULL;
    const long long Et = (long long)d.E + d.Kc + d.Kp + d.Kz;
    if (d.BT < 1 || d.C < 1 || d.H < 0 || d.Ie < 0) why = "BT >= 1, C >= 1, H >= 0, I_e >= 0";
    else if (d.E < 0 || d.Kc < 0 || d.Kp < 0 || d.Kz < 0 || Et < 1 || Et > 65536) why = "1 to 65536 routed experts";
    else if (d.k < 1 || d.k > Et) why = "1 <= k <= E_t";
    else if (d.Kc > 65535) why = "at most 65535 constant experts (a grid dimension)";
    else if ((long long)d.BT * d.k > INT_MAX / 2) why = "BT*k < 2^30 pairs (int32 pair ids)";
    else if (d.E > 0 && (d.Ie < 8 || d.Ie % 8 != 0)) why = "I_e a multiple of 8 (16-byte vectors)";
    else if (d.C % 8 != 0 || d.H % 8 != 0) why = "C and H multiples of 8";
    if (why != NULL) {
        fprintf(stderr, "moe_layer: bad dimensions BT=%d C=%d H=%d I_e=%d E=%d const=%d copy=%d zero=%d k=%d: "
                "expected %s\n", d.BT, d.C, d.H, d.Ie, d.E, d.Kc, d.Kp, d.Kz, d.k, why);
        exit(EXIT_FAILURE);
    }
}

// carves the next `bytes` (256-aligned) off *base
static inline void* moe_carve(char** base, size_t bytes) {
    void* p = *base;
    *base += align256(bytes);
    return p;
}

static void moe_workspace_create(MoeWorkspace* ws, MoeDims d, MoeOptions o, float* scratch, size_t scratch_bytes,
                                 floatX* dhidden, floatX* dwide) {
    moe_check_dims(d);
    memset(ws, 0, sizeof(*ws));
    const size_t BT = d.BT, Et = moe_routed(d), P = BT * d.k, X = sizeof(floatX), F = sizeof(float);
    const size_t RH = moe_router_hidden(d, o), Ie = d.Ie, PE = d.E ? P : 0;
    ws->scratch = layer_scratch_take("moe_workspace_create", scratch, scratch_bytes, moe_layer_scratch_bytes(d, o),
                                     &ws->scratch_bytes, &ws->owns_scratch);
    ws->owns_grads = layer_grads_take(BT, d.H, &dhidden, &dwide);
    ws->dhidden = dhidden;
    ws->dwide = dwide;
    moe_grouped_gemm_create(&ws->gemm, d.E);
    const size_t bytes = moe_workspace_bytes(d, o) - moe_grouped_gemm_bytes(d.E);
    char* base = (char*)cuda_malloc_or_die(bytes, "moe workspace");
    ws->block = base;
    ws->dyg = (floatX*)moe_carve(&base, PE * d.C * X);
    ws->dh = (floatX*)moe_carve(&base, PE * Ie * X);
    ws->dfch = (floatX*)moe_carve(&base, PE * 2 * Ie * X);
    ws->dp = (float*)moe_carve(&base, BT * Et * F);
    ws->dz = (float*)moe_carve(&base, BT * Et * F);
    ws->carry = (float*)moe_carve(&base, BT * Et * F);
    ws->dzx = (floatX*)moe_carve(&base, BT * Et * X);
    ws->drh = (floatX*)moe_carve(&base, BT * RH * X);
    ws->dmix = (float*)moe_carve(&base, P * 2 * F);
    ws->dgate = (float*)moe_carve(&base, P * F);
    ws->prob_sums = (double*)moe_carve(&base, Et * sizeof(double));
    cudaCheck(cudaEventCreateWithFlags(&ws->counts_ready, cudaEventDisableTiming));
}

static void moe_workspace_free(MoeWorkspace* ws) {
    layer_buffers_free(ws->scratch, ws->owns_scratch, ws->dhidden, ws->dwide, ws->owns_grads);
    cudaCheck(cudaFree(ws->block));
    moe_grouped_gemm_free(&ws->gemm);
    cudaCheck(cudaEventDestroy(ws->counts_ready));
    memset(ws, 0, sizeof(*ws));
}

// fch (BT, 2H), fch_act (BT, H): views of the caller's activations, or NULL (allocated here)
static void moe_layer_create(MoeLayer* layer, MoeDims d, MoeOptions o, MoeWeights w, MoeWeights dw, MoeWorkspace* ws,
                             floatX* fch, floatX* fch_act) {
    moe_check_dims(d);
    memset(layer, 0, sizeof(*layer));
    layer->dims = d;
    layer->opt = o;
    layer->w = w;
    layer->dw = dw;
    layer->ws = ws;
    MoeSaved* s = &layer->saved;
    const size_t BT = d.BT, Et = moe_routed(d), k = d.k, P = BT * k, X = sizeof(floatX), F = sizeof(float);
    const size_t RH = moe_router_hidden(d, o), A = scheduler_max_active((int)P, (int)Et), Ie = d.Ie;
    const size_t PE = d.E ? P : 0;
    if (fch == NULL && d.H > 0) {
        fch = (floatX*)cuda_malloc_or_die(BT * 2 * d.H * X, "moe layer: SwiGLU pre-activation");
        fch_act = (floatX*)cuda_malloc_or_die(BT * d.H * X, "moe layer: SwiGLU output");
        s->owns_fch = 1;
    }
    s->fch = fch;
    s->fch_act = fch_act;
    char* base = (char*)cuda_malloc_or_die(moe_layer_saved_bytes(d, o), "moe layer: router, schedule, experts");
    s->block = base;
    s->z = (float*)moe_carve(&base, BT * Et * F);
    s->probs = (float*)moe_carve(&base, BT * Et * F);
    s->rh = (floatX*)moe_carve(&base, BT * RH * X);
    s->idx = (int*)moe_carve(&base, P * 4);
    s->gate = (float*)moe_carve(&base, P * F);
    s->denom = (float*)moe_carve(&base, BT * F);
    s->mix = (float*)moe_carve(&base, P * 2 * F);
    s->sched.sorted_pair = (int*)moe_carve(&base, P * 4);
    s->sched.sorted_expert = (int*)moe_carve(&base, P * 4);
    s->sched.sorted_active = (int*)moe_carve(&base, P * 4);
    s->sched.active_expert = (int*)moe_carve(&base, A * 4);
    s->sched.active_offset = (int*)moe_carve(&base, (A + 1) * 4);
    s->sched.num_active = (int*)moe_carve(&base, 4);
    s->pos = (int*)moe_carve(&base, P * 4);
    s->counts = (int*)moe_carve(&base, Et * 4);
    s->offsets = (int*)moe_carve(&base, (Et + 1) * 4);
    s->xg = d.recompute_xg ? ws->dyg : (floatX*)moe_carve(&base, PE * d.C * X);
    s->fch_g = (floatX*)moe_carve(&base, PE * 2 * Ie * X);
    cudaCheck(cudaMallocHost((void**)&s->host_counts, Et * sizeof(int)));
    layer->zc_weight = 1.0f;
}

static void moe_layer_free(MoeLayer* layer) {
    MoeSaved* s = &layer->saved;
    cudaCheck(cudaFree(s->block));
    cudaCheck(cudaFreeHost(s->host_counts));
    if (s->owns_fch) {
        cudaCheck(cudaFree(s->fch));
        cudaCheck(cudaFree(s->fch_act));
    }
    memset(layer, 0, sizeof(*layer));
}

static inline void moe_layer_set_activations(MoeLayer* layer, floatX* fch, floatX* fch_act) {
    if (layer->saved.owns_fch) {
        fprintf(stderr, "moe_layer_set_activations: the layer owns its activations (created with NULL)\n");
        exit(EXIT_FAILURE);
    }
    layer->saved.fch = fch;
    layer->saved.fch_act = fch_act;
}

// ----------------------------------------------------------------------------
// forward and backward

static void moe_layer_forward(MoeLayer* layer, floatX* out, const floatX* x, int BT, int training,
                              cudaStream_t stream) {
    layer_check_tokens("moe_layer_forward", BT, layer->dims.BT);
    const MoeDims d = layer->dims;
    const MoeOptions o = layer->opt;
    const int C = d.C, H = d.H, Ie = d.Ie, E = d.E, k = d.k, Et = moe_routed(d), P = BT * k;
    const int RH = moe_router_hidden(d, o), zero_from = E + d.Kc + d.Kp;
    const float scale = o.input_scale ? (float)k : 1.0f;
    MoeWorkspace* ws = layer->ws;
    MoeSaved* s = &layer->saved;
    const MoeWeights* w = &layer->w;
    layer->training = training;
    layer->last_BT = BT;
    // router logits z (fp32), the gating residual, softmax / top-k / gates (design §10.2)
    if (o.router == MOE_ROUTER_TANH) {
        moe_gemm(CUBLAS_OP_T, CUBLAS_OP_N, RH, BT, C, w->router, C, x, C, 0.0f, s->rh, CUDA_R_FLOATX, RH, stream);
        moe_tanh_forward(s->rh, (size_t)BT * RH, stream);
        moe_gemm(CUBLAS_OP_T, CUBLAS_OP_N, Et, BT, RH, w->router2, RH, s->rh, RH, 0.0f, s->z, CUDA_R_32F, Et, stream);
    } else {
        moe_gemm(CUBLAS_OP_T, CUBLAS_OP_N, Et, BT, C, w->router, C, x, C, 0.0f, s->z, CUDA_R_32F, Et, stream);
    }
    if (layer->prev_logits != NULL) moe_gate_residual_forward(s->z, layer->prev_logits, w->gate_map, BT, Et, stream);
    moe_route(s->probs, s->idx, s->gate, s->denom, s->z, w->bias, BT, Et, k, zero_from, o.norm_topk, stream);
    // the schedule: pairs sorted by expert; the counts to the host for the grouped GEMMs
    scheduler_build(s->sched, s->counts, s->idx, P, Et, ws->scratch, ws->scratch_bytes, stream);
    cudaCheck(cudaMemcpyAsync(s->host_counts, s->counts, (size_t)Et * sizeof(int), cudaMemcpyDeviceToHost, stream));
    cudaCheck(cudaEventRecord(ws->counts_ready, stream));
    moe_pair_positions(s->pos, s->sched, P, stream);
    moe_expert_offsets(s->offsets, s->counts, Et, stream);
    if (training && layer->expert_counts != NULL) expert_counts_add(layer->expert_counts, s->counts, Et, stream);
    if (training && layer->aux_coef > 0.0f && layer->aux != NULL) {
        moe_balance_loss(layer->aux, s->probs, s->counts, BT, Et, k, E, layer->aux_coef, layer->zc_weight,
                         ws->prob_sums, stream);
    }
    // the shared SwiGLU writes out (queued before the host waits for the counts)
    if (H > 0) {
        swiglu_mlp_forward(out, s->fch, s->fch_act, x, w->fcw, w->fcprojw, BT, C, H, stream);
    }
    moe_const_mix(s->mix, x, w->cmix, s->idx, BT, C, k, E, d.Kc, scale, stream);
    cudaCheck(cudaEventSynchronize(ws->counts_ready));
    int rows = 0;
    moe_ffn_groups(s->host_counts, E, &rows);
    // FFN experts on their sorted rows: fch = xg W1_e^T, h = SwiGLU, y = h W2_e^T (into dyg, free
    // until the backward). xg, the rows' inputs s x: read from x through the schedule inside the
    // GEMM where the backend can (s = 1, moe_gemm_reads_tokens), else gathered into a copy (kept
    // for dW1; with recompute_xg in dyg, before y overwrites it); the backward takes the same
    // choice for dW1
    if (rows > 0) {
        layer->x_token_reads = scale == 1.0f && moe_gemm_reads_tokens(x, BT, C, w->w1, s->fch_g, layer->dw.w1,
                                                                        ws->dfch);
        if (!layer->x_token_reads) moe_gather_rows(s->xg, x, s->sched, rows, C, k, scale, stream);
        moe_grouped_gemm(&ws->gemm, CUBLAS_OP_T, CUBLAS_OP_N, 2 * Ie, MOE_DIM_ROWS, C, w->w1, (size_t)2 * Ie * C,
                         MOE_BY_EXPERT, C, layer->x_token_reads ? x : s->xg, layer->x_token_reads ? (size_t)BT : C,
                         layer->x_token_reads ? MOE_BY_TOKEN : MOE_BY_ROW, C, 0.0f, s->fch_g, (size_t)2 * Ie,
                         MOE_BY_ROW, 2 * Ie, s->host_counts, s->sched, E, k, stream);
        swiglu_forward(ws->dh, s->fch_g, rows, Ie, stream);  // h: the backward recomputes it
        moe_grouped_gemm(&ws->gemm, CUBLAS_OP_T, CUBLAS_OP_N, C, MOE_DIM_ROWS, Ie, w->w2, (size_t)C * Ie, MOE_BY_EXPERT,
                         Ie, ws->dh, Ie, MOE_BY_ROW, Ie, 0.0f, ws->dyg, C, MOE_BY_ROW, C, s->host_counts, s->sched, E,
                         k, stream);
    }
    moe_combine(out, ws->dyg, x, w->cvec, s->idx, s->gate, s->pos, s->mix, BT, C, k, E, d.Kc, d.Kp, scale, H > 0,
                stream);
}

static void moe_layer_backward(MoeLayer* layer, floatX* dx, const floatX* dout, const floatX* x, int BT,
                               float loss_scale, cudaStream_t stream) {
    layer_check_tokens("moe_layer_backward", BT, layer->dims.BT);
    if (BT != layer->last_BT) {
        fprintf(stderr, "moe_layer_backward: %d tokens, the last forward had %d\n", BT, layer->last_BT);
        exit(EXIT_FAILURE);
    }
    const MoeDims d = layer->dims;
    const MoeOptions o = layer->opt;
    const int C = d.C, H = d.H, Ie = d.Ie, E = d.E, k = d.k, Et = moe_routed(d);
    const int RH = moe_router_hidden(d, o), zero_from = E + d.Kc + d.Kp;
    const float scale = o.input_scale ? (float)k : 1.0f;
    MoeWorkspace* ws = layer->ws;
    MoeSaved* s = &layer->saved;
    const MoeWeights* w = &layer->w;
    const MoeWeights* dw = &layer->dw;
    // shared SwiGLU: dx = its input gradient
    if (H > 0) {
        swiglu_mlp_backward(dx, dw->fcw, dw->fcprojw, ws->dhidden, ws->dwide, dout, x, s->fch, s->fch_act, w->fcw,
                            w->fcprojw, BT, C, H, stream, ws->scratch);
    }
    // FFN experts (design §10.4), on the forward's sorted rows
    int rows = 0;
    moe_ffn_groups(s->host_counts, E, &rows);
    if (rows > 0) {
        const int* hc = s->host_counts;
        // dy's rows: read through the schedule inside the GEMMs, or gathered into dyg
        const int dy_reads = moe_gemm_reads_tokens(dout, BT, C, w->w2, ws->dh, dw->w2, ws->dh);
        if (!dy_reads) moe_gather_rows(ws->dyg, dout, s->sched, rows, C, k, 1.0f, stream);
        const floatX* dyr = dy_reads ? dout : ws->dyg;
        const size_t dys = dy_reads ? (size_t)BT : (size_t)C;
        const int dyby = dy_reads ? MOE_BY_TOKEN : MOE_BY_ROW;
        // dh = dy W2_e (ungated); then in one pass dgate = <dh, h>, dfch = SwiGLU backward of g dh, dh = g h
        moe_grouped_gemm(&ws->gemm, CUBLAS_OP_N, CUBLAS_OP_N, Ie, MOE_DIM_ROWS, C, w->w2, (size_t)C * Ie, MOE_BY_EXPERT,
                         Ie, dyr, dys, dyby, C, 0.0f, ws->dh, Ie, MOE_BY_ROW, Ie, hc, s->sched, E, k, stream);
        moe_ffn_dgate_dfch(ws->dgate, ws->dfch, ws->dh, s->fch_g, s->gate, s->sched, rows, Ie, stream);
        // dW2_e += dy^T (g h)
        moe_grouped_gemm(&ws->gemm, CUBLAS_OP_N, CUBLAS_OP_T, Ie, C, MOE_DIM_ROWS, ws->dh, Ie, MOE_BY_ROW, Ie, dyr, dys,
                         dyby, C, 1.0f, dw->w2, (size_t)C * Ie, MOE_BY_EXPERT, Ie, hc, s->sched, E, k, stream);
        // dW1_e += dfch^T (s x): x through the schedule (the forward's choice, checked again for this
        // x), the forward's gathered rows, or gathered again into dyg (whose dy rows dh and dW2 have
        // read); then the experts' input gradient dfch W1_e (into dyg)
        const int xr = layer->x_token_reads && moe_gemm_reads_tokens(x, BT, C, w->w1, ws->dfch, dw->w1, ws->dfch);
        if (!xr && (d.recompute_xg || layer->x_token_reads)) {
            moe_gather_rows(s->xg, x, s->sched, rows, C, k, scale, stream);
        }
        moe_grouped_gemm(&ws->gemm, CUBLAS_OP_N, CUBLAS_OP_T, C, 2 * Ie, MOE_DIM_ROWS, xr ? x : s->xg,
                         xr ? (size_t)BT : (size_t)C, xr ? MOE_BY_TOKEN : MOE_BY_ROW, C, ws->dfch, (size_t)2 * Ie,
                         MOE_BY_ROW, 2 * Ie, 1.0f, dw->w1, (size_t)2 * Ie * C, MOE_BY_EXPERT, C, hc, s->sched, E, k,
                         stream);
        moe_grouped_gemm(&ws->gemm, CUBLAS_OP_N, CUBLAS_OP_N, C, MOE_DIM_ROWS, 2 * Ie, w->w1, (size_t)2 * Ie * C,
                         MOE_BY_EXPERT, C, ws->dfch, (size_t)2 * Ie, MOE_BY_ROW, 2 * Ie, 0.0f, ws->dyg, C, MOE_BY_ROW,
                         C, hc, s->sched, E, k, stream);
    }
    // per token: the other experts' gate gradients, dmix, dx (+)= s * (sum of the pairs' input gradients)
    moe_token_backward(dx, ws->dgate, ws->dmix, dout, x, ws->dyg, w->cvec, w->cmix, s->idx, s->gate, s->pos, s->mix, BT,
                       C, k, E, d.Kc, d.Kp, scale, H > 0, stream);
    moe_const_grads(dw->cvec, dw->cmix, ws->dmix, dout, x, s->gate, s->mix, s->sched, s->offsets, BT * k, C, k, E, d.Kc,
                    scale, ws->scratch, ws->scratch_bytes, stream);
    // gates and balance loss -> dz, plus the carry of the layer above
    const int aux = layer->training && layer->aux_coef > 0.0f;
    moe_router_dz(ws->dz, ws->dzx, ws->dp, s->probs, s->idx, s->gate, ws->dgate, s->denom,
                  ws->carry_valid ? ws->carry : NULL, s->counts, BT, Et, k, E, zero_from, o.norm_topk, loss_scale,
                  aux ? layer->aux_coef : 0.0f, layer->zc_weight, stream);
    // router: dx += dz W, dW += dz^T (input)
    if (o.router == MOE_ROUTER_TANH) {
        moe_gemm(CUBLAS_OP_N, CUBLAS_OP_N, RH, BT, Et, w->router2, RH, ws->dzx, Et, 0.0f, ws->drh, CUDA_R_FLOATX, RH,
                 stream);
        moe_gemm(CUBLAS_OP_N, CUBLAS_OP_T, RH, Et, BT, s->rh, RH, ws->dzx, Et, 1.0f, dw->router2, CUDA_R_FLOATX, RH,
                 stream);
        moe_tanh_backward(ws->drh, s->rh, (size_t)BT * RH, stream);
        moe_gemm(CUBLAS_OP_N, CUBLAS_OP_N, C, BT, RH, w->router, C, ws->drh, RH, 1.0f, dx, CUDA_R_FLOATX, C, stream);
        moe_gemm(CUBLAS_OP_N, CUBLAS_OP_T, C, RH, BT, x, C, ws->drh, RH, 1.0f, dw->router, CUDA_R_FLOATX, C, stream);
    } else {
        moe_gemm(CUBLAS_OP_N, CUBLAS_OP_N, C, BT, Et, w->router, C, ws->dzx, Et, 1.0f, dx, CUDA_R_FLOATX, C, stream);
        moe_gemm(CUBLAS_OP_N, CUBLAS_OP_T, C, Et, BT, x, C, ws->dzx, Et, 1.0f, dw->router, CUDA_R_FLOATX, C, stream);
    }
    // gating residual: dG += dz^T z_{l-1} and the carry into layer l-1's logits
    ws->carry_valid = layer->prev_logits != NULL;
    if (ws->carry_valid) {
        moe_gate_residual_backward(ws->carry, dw->gate_map, ws->dz, layer->prev_logits, w->gate_map, BT, Et,
                                   ws->scratch, ws->scratch_bytes, stream);
    }
}

#endif  // OMNIMOE_MOE_LAYER_CUH
