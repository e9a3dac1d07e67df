/*
omnimoe_layer.cuh - the OmniMoE feed-forward layer on the GPU (docs/design.md §2-§3), forward
and backward: out = SwiGLU(x) + sum_m gate_m SiLU(<u_e, x>) v_e over the k experts e = idx_m
the router picks for each token. The one composition of router.cuh, scheduler.cuh,
experts.cuh and the shared SwiGLU (matmul.cuh, activations.cuh): the trainer, the layer
benchmark and the kernel test all run it.

Defines:
- OmniDims {BT, C, I, n, N, k}: BT = the most tokens one forward may get (buffers are sized for
  it), C channels, I the shared SwiGLU width (0: no shared branch, out = the experts alone),
  n the router grid side, N = n*n experts, k experts per token (R = 2n router logits)
- OmniOptions {norm, gate, exec}: ROUTER_NORM_*, GATE_*, EXPERT_EXEC_* (config.h)
- OmniWeights: views of the layer's five tensors in the caller's flat parameter buffer (the
  same struct for the gradients)
- OmniSaved: what the forward keeps for the backward (per layer)
- OmniWorkspace: what all OmniMoE layers of a model share, one running at a time: the kernel
  scratch, the SwiGLU's backward buffers, the gate gradient, the expert counts of one
  micro-batch, the side stream and its fork/join events
- OmniLayer: one layer: dims, options, weight/gradient views, BN running-statistics views, an
  expert-count view, its saved activations, the workspace it uses, the last forward's mode
- omni_layer_scratch_bytes(dims): the scratch the layer's kernels need (one buffer, reused)
- omni_workspace_create(ws, dims, scratch, scratch_bytes, dhidden, dwide) / omni_workspace_free
- omni_layer_create(layer, dims, opt, w, dw, ws, fch, fch_act) / omni_layer_free
- omni_layer_bn_count(dims) / omni_layer_set_bn_stats(layer, bn): the 4n running statistics
  (mean (R), then var (R)) of one layer, in the model file's layout
- omni_layer_set_activations(layer, fch, fch_act): re-points the saved SwiGLU activations
- omni_layer_set_shard(layer, comm, saved_block, work, work_bytes): column-sharded expert tables
  (docs/sharding.md §3.1, llmc/experts_shard.cuh): U, V views are this rank's (N, C/P) slices
- omni_layer_forward(layer, out, x, BT, training, stream)
- omni_layer_backward(layer, dx, dout, x, BT, stream)
The expert counts and their statistics are in expert_stats.cuh.

Shapes: x, out, dout, dx (BT, C) floatX. Weights (floatX): fcw (2I, C) gate|up, fcprojw (C, I),
routerw (R, C) Wr|Wc, expert_u and expert_v (N, C). Saved: fch (BT, 2I), fch_act (BT, I)
(views: the trainer keeps them with its other per-layer activations; NULL at create: owned),
the router's RouterSaved, s (BT, k), the ExpertSchedule.

Outputs: forward overwrites out (the shared SwiGLU writes it, the experts add onto it in fp32,
rounded once; with I = 0 the experts write it); with training = 1 and norm = bn the running statistics are updated, and with
training = 1 and an expert-count view the pairs of each expert are added to it. Backward
overwrites dx (SwiGLU input gradient, then the experts and the router add onto it; with I = 0
the experts write it) and adds
(+=) to every gradient view: gradient accumulation over micro-batches.

Ownership: the layer does not own its parameters, gradients, BN statistics or expert counts
(views into the caller's buffers); it owns its saved router/expert state (and fch/fch_act when
created without them). The workspace owns dgate, the micro-batch counts, the stream and events,
and the scratch/dhidden/dwide only when created without them.

Streams: the router and the scheduler need only x: they run on the workspace's side stream
while the shared SwiGLU's GEMMs run on the caller's stream (their small, latency-bound kernels
fill the GEMMs' gaps); the experts wait for them. Nothing the SwiGLU touches is used by them
(scratch, logits, ids, gates, schedule), so the results do not depend on the overlap. No host
synchronisation, no allocation: forward and backward can be captured in a CUDA graph.

Determinism: every kernel sums in a fixed order; the two executions give the same bits.

Other layer kinds (a fine-grained top-k MoE, PEER) follow the same pattern in a header of
their own: a Dims and an Options struct, a Weights struct of views into the flat parameter
buffer (used for params and grads), a Saved struct of what the backward needs, a Workspace
shared by the layers of a model (or this one, when scratch + side stream + dgate fit), and
x_layer_scratch_bytes / x_workspace_create / x_layer_create / x_layer_forward(layer, out, x,
BT, training, stream) / x_layer_backward(layer, dx, dout, x, BT, stream) / free, with the same
output rules (forward overwrites out, backward overwrites dx and accumulates the weights).
*/
#ifndef OMNIMOE_OMNIMOE_LAYER_CUH
#define OMNIMOE_OMNIMOE_LAYER_CUH

#include "config.h"
#include "cuda_utils.cuh"
#include "matmul.cuh"
#include "activations.cuh"
#include "router.cuh"
#include "scheduler.cuh"
#include "experts.cuh"
#include "expert_stats.cuh"
#include "experts_shard.cuh"

typedef struct {
    int BT;  // the most tokens of one forward
    int C;   // channels
    int I;   // shared SwiGLU width (0: none)
    int n;   // router grid side
    int N;   // experts, n*n
    int k;   // experts per token
} OmniDims;

typedef struct {
    int norm;  // ROUTER_NORM_BN or ROUTER_NORM_NONE
    int gate;  // GATE_SOFTMAX or GATE_PROB
    int exec;  // EXPERT_EXEC_TOKEN or EXPERT_EXEC_EXPERT
} OmniOptions;

typedef struct {
    floatX* fcw;       // (2I, C) shared SwiGLU gate | up
    floatX* fcprojw;   // (C, I)  shared SwiGLU down
    floatX* routerw;   // (R, C)  Wr | Wc
    floatX* expert_u;  // (N, C)
    floatX* expert_v;  // (N, C)
} OmniWeights;

typedef struct {
    floatX* fch;          // (BT, 2I) SwiGLU pre-activation
    floatX* fch_act;      // (BT, I)  SwiGLU output
    RouterSaved router;   // logits, logp, BN statistics used, ids, gates
    float* s;             // (BT, k) <u_e, x>
    ExpertSchedule sched; // the pairs sorted by expert
    int owns_fch;         // fch, fch_act were allocated by omni_layer_create
    void* block;          // the one allocation the rest of these point into
} OmniSaved;

typedef struct {
    float* scratch;       // omni_layer_scratch_bytes or more; also the matmuls' (no bias: unused)
    size_t scratch_bytes;
    floatX* dhidden;      // (BT, I)  d of the SwiGLU output
    floatX* dwide;        // (BT, 2I) d of the SwiGLU pre-activation
    float* dgate;         // (BT, k)  d of the gates: experts_backward -> router_backward
    int* step_counts;     // (N) pairs per expert of one micro-batch
    cudaStream_t side;    // router + scheduler beside the shared SwiGLU
    cudaEvent_t fork, join;
    int owns_scratch, owns_grads;  // scratch / dhidden+dwide allocated by omni_workspace_create
    void* shard_work;     // column-sharded tables: experts_shard_work_bytes (the caller's; omni_layer_set_shard)
    size_t shard_work_bytes;
} OmniWorkspace;

typedef struct {
    OmniDims dims;
    OmniOptions opt;
    OmniWeights w;         // parameter views
    OmniWeights dw;        // gradient views (+=)
    float* running_mean;   // (R) BN running statistics (views; omni_layer_set_bn_stats)
    float* running_var;    // (R)
    int* expert_counts;    // (N) view: += pairs per expert in training forwards; NULL: not counted
    OmniSaved saved;
    OmniWorkspace* ws;
    int training;          // the last forward's mode (the backward's BN needs it)
    // column-sharded tables (docs/sharding.md §3.1; NULL: the whole tables): w/dw.expert_u, expert_v
    // are then this rank's (N, C/P) slices, and every rank of comm runs every forward and backward
    const ExpertShardComm* shard;
    ExpertShardSaved shard_saved;  // idx, gate, s of all ranks' pairs and the x columns (caller's block)
} OmniLayer;

static inline RouterOptions omni_router_options(const OmniLayer* layer, int training) {
    RouterOptions r = {layer->dims.n, layer->dims.k, layer->opt.norm, layer->opt.gate, training};
    return r;
}

// the experts add onto the shared branch's output / input gradient; alone (I = 0) they write
static inline ExpertsOptions omni_experts_options(const OmniLayer* layer) {
    ExpertsOptions e = {layer->dims.N, layer->dims.k, layer->opt.exec, layer->dims.I > 0};
    return e;
}

// ----------------------------------------------------------------------------
// sizes and buffers

static inline size_t omni_layer_scratch_bytes(OmniDims d) {
    size_t s = router_forward_scratch_bytes(d.BT, d.n);
    size_t b = router_backward_scratch_bytes(d.BT, d.n);
    if (b > s) s = b;
    b = scheduler_scratch_bytes(d.BT * d.k, d.N);
    if (b > s) s = b;
    b = experts_backward_scratch_bytes(d.BT, d.C, d.k);
    if (b > s) s = b;
    return s;
}

// device bytes of one layer's saved router and schedule buffers (one allocation, cut with align256)
static inline size_t omni_layer_saved_bytes(OmniDims d) {
    const size_t BT = d.BT, R = 2 * (size_t)d.n, k = d.k, P = BT * k;
    const size_t A = scheduler_max_active((int)P, d.N);
    return 2 * align256(BT * R * sizeof(float)) + 2 * align256(R * sizeof(float)) + 3 * align256(BT * k * 4)
         + 3 * align256(P * sizeof(int)) + align256(A * sizeof(int)) + align256((A + 1) * sizeof(int)) + sizeof(int);
}

// device bytes omni_workspace_create allocates besides the caller's scratch and SwiGLU gradients
static inline size_t omni_workspace_bytes(OmniDims d) { return (size_t)d.BT * d.k * sizeof(float) + (size_t)d.N * sizeof(int); }

static inline size_t omni_layer_bn_count(OmniDims d) { return 4 * (size_t)d.n; }

// (the options are checked by the router's and the experts' launchers)
static void omni_check_dims(OmniDims d) {
    const char* why = NULL;
    if (d.BT < 1 || d.C < 1 || d.I < 0) why = "BT >= 1, C >= 1, I >= 0";
    else if (d.n < 1 || d.N != d.n * d.n) why = "N = n*n >= 1";
    else if (d.k < 1 || d.k > d.N || d.k > ROUTER_MAX_K) why = "1 <= k <= min(N, ROUTER_MAX_K)";
    if (why != NULL) {
        fprintf(stderr, "omnimoe_layer: bad dimensions BT=%d C=%d I=%d n=%d N=%d k=%d: expected %s\n", d.BT, d.C, d.I,
                d.n, d.N, d.k, why);
        exit(EXIT_FAILURE);
    }
}

// scratch (>= omni_layer_scratch_bytes(d)), dhidden (BT, I), dwide (BT, 2I): the caller's
// buffers, or NULL to allocate them here
static void omni_workspace_create(OmniWorkspace* ws, OmniDims d, float* scratch, size_t scratch_bytes,
                                  floatX* dhidden, floatX* dwide) {
    memset(ws, 0, sizeof(*ws));
    const size_t BT = d.BT;
    ws->scratch = layer_scratch_take("omni_workspace_create", scratch, scratch_bytes, omni_layer_scratch_bytes(d),
                                     &ws->scratch_bytes, &ws->owns_scratch);
    ws->owns_grads = layer_grads_take(BT, d.I, &dhidden, &dwide);
    ws->dhidden = dhidden;
    ws->dwide = dwide;
    ws->dgate = (float*)cuda_malloc_or_die(BT * d.k * sizeof(float), "gradients: gates");
    ws->step_counts = (int*)cuda_malloc_or_die((size_t)d.N * sizeof(int), "expert counts of a micro-batch");
    cudaCheck(cudaStreamCreateWithFlags(&ws->side, cudaStreamNonBlocking));
    cudaCheck(cudaEventCreateWithFlags(&ws->fork, cudaEventDisableTiming));
    cudaCheck(cudaEventCreateWithFlags(&ws->join, cudaEventDisableTiming));
}

static void omni_workspace_free(OmniWorkspace* ws) {
    layer_buffers_free(ws->scratch, ws->owns_scratch, ws->dhidden, ws->dwide, ws->owns_grads);
    cudaCheck(cudaFree(ws->dgate));
    cudaCheck(cudaFree(ws->step_counts));
    cudaCheck(cudaEventDestroy(ws->fork));
    cudaCheck(cudaEventDestroy(ws->join));
    cudaCheck(cudaStreamDestroy(ws->side));
    memset(ws, 0, sizeof(*ws));
}

// w, dw: views of the parameters and gradients; fch (BT, 2I), fch_act (BT, I): views of the
// caller's activations or NULL (allocated here). BN statistics and expert counts start unset
// (omni_layer_set_bn_stats; layer->expert_counts).
static void omni_layer_create(OmniLayer* layer, OmniDims d, OmniOptions opt, OmniWeights w, OmniWeights dw,
                              OmniWorkspace* ws, floatX* fch, floatX* fch_act) {
    omni_check_dims(d);
    memset(layer, 0, sizeof(*layer));
    layer->dims = d;
    layer->opt = opt;
    layer->w = w;
    layer->dw = dw;
    layer->ws = ws;
    OmniSaved* o = &layer->saved;
    const size_t BT = d.BT, R = 2 * (size_t)d.n, k = d.k;
    const int P = d.BT * d.k, A = scheduler_max_active(P, d.N);
    if (fch == NULL && d.I > 0) {
        fch = (floatX*)cuda_malloc_or_die(BT * 2 * d.I * sizeof(floatX), "OmniMoE layer: SwiGLU pre-activation");
        fch_act = (floatX*)cuda_malloc_or_die(BT * d.I * sizeof(floatX), "OmniMoE layer: SwiGLU output");
        o->owns_fch = 1;
    }
    o->fch = fch;
    o->fch_act = fch_act;
    // the saved buffers, cut from one allocation of omni_layer_saved_bytes(d)
    char* base = (char*)cuda_malloc_or_die(omni_layer_saved_bytes(d), "OmniMoE layer: router and schedule");
    o->block = base;
    o->router.logits = (float*)base;     base += align256(BT * R * sizeof(float));
    o->router.logp = (float*)base;       base += align256(BT * R * sizeof(float));
    o->router.bn_mean = (float*)base;    base += align256(R * sizeof(float));
    o->router.bn_rstd = (float*)base;    base += align256(R * sizeof(float));
    o->router.idx = (int*)base;          base += align256(BT * k * sizeof(int));
    o->router.gate = (float*)base;       base += align256(BT * k * sizeof(float));
    o->s = (float*)base;                 base += align256(BT * k * sizeof(float));
    o->sched.sorted_pair = (int*)base;   base += align256((size_t)P * sizeof(int));
    o->sched.sorted_expert = (int*)base; base += align256((size_t)P * sizeof(int));
    o->sched.sorted_active = (int*)base; base += align256((size_t)P * sizeof(int));
    o->sched.active_expert = (int*)base; base += align256((size_t)A * sizeof(int));
    o->sched.active_offset = (int*)base; base += align256((size_t)(A + 1) * sizeof(int));
    o->sched.num_active = (int*)base;
}

static void omni_layer_free(OmniLayer* layer) {
    OmniSaved* o = &layer->saved;
    cudaCheck(cudaFree(o->block));
    if (o->owns_fch) {
        cudaCheck(cudaFree(o->fch));
        cudaCheck(cudaFree(o->fch_act));
    }
    memset(layer, 0, sizeof(*layer));
}

// Column-sharded tables: from here on the layer's experts run experts_shard_forward/_backward
// over comm (every rank in step), with saved_block (experts_shard_saved_bytes(dims.BT, C, k, P))
// as its saved exchange state and ws->shard_work (experts_shard_work_bytes, shared by the layers:
// one runs at a time) as their temporaries. The caller owns both buffers and comm.
static void omni_layer_set_shard(OmniLayer* layer, const ExpertShardComm* comm, void* saved_block, void* work,
                                 size_t work_bytes) {
    const OmniDims d = layer->dims;
    experts_shard_check("omni_layer_set_shard", d.C, comm->P);
    layer->shard = comm;
    layer->shard_saved = experts_shard_saved_carve(saved_block, d.BT, d.C, d.k, comm->P);
    layer->ws->shard_work = work;
    layer->ws->shard_work_bytes = work_bytes;
}

// re-points the saved SwiGLU activations (caller's views, (BT, 2I) and (BT, I)), e.g. to where
// the caller packs layer l's activations for the forward's BT
static inline void omni_layer_set_activations(OmniLayer* layer, floatX* fch, floatX* fch_act) {
    if (layer->saved.owns_fch) {
        fprintf(stderr, "omni_layer_set_activations: the layer owns its activations (created with NULL)\n");
        exit(EXIT_FAILURE);
    }
    layer->saved.fch = fch;
    layer->saved.fch_act = fch_act;
}

// bn: this layer's omni_layer_bn_count floats, running mean (R) then running variance (R)
static inline void omni_layer_set_bn_stats(OmniLayer* layer, float* bn) {
    layer->running_mean = bn;
    layer->running_var = bn + 2 * (size_t)layer->dims.n;
}

// ----------------------------------------------------------------------------
// forward and backward

// out (BT, C) = SwiGLU(x) + experts(x), overwritten. training = 1: BN batch statistics (and
// running-statistics update), expert counts; 0: BN running statistics.
static void omni_layer_forward(OmniLayer* layer, floatX* out, const floatX* x, int BT, int training,
                               cudaStream_t stream) {
    layer_check_tokens("omni_layer_forward", BT, layer->dims.BT);
    const OmniDims d = layer->dims;
    const int C = d.C, I = d.I, k = d.k, N = d.N;
    OmniWorkspace* ws = layer->ws;
    OmniSaved* o = &layer->saved;
    layer->training = training;
    // the side stream starts after everything queued on stream so far (x is ready)
    cudaStream_t side = ws->side;
    cudaCheck(cudaEventRecord(ws->fork, stream));
    cudaCheck(cudaStreamWaitEvent(side, ws->fork, 0));
    router_forward(o->router, layer->running_mean, layer->running_var, x, layer->w.routerw, BT, C,
                   omni_router_options(layer, training), ws->scratch, ws->scratch_bytes, side);
    // the schedule (pairs sorted by expert) serves the expert-centric forward and both backwards
    const int count = training && layer->expert_counts != NULL;
    scheduler_build(o->sched, count ? ws->step_counts : NULL, o->router.idx, BT * k, N, ws->scratch,
                    ws->scratch_bytes, side);
    if (count) expert_counts_add(layer->expert_counts, ws->step_counts, N, side);
    cudaCheck(cudaEventRecord(ws->join, side));
    // the shared SwiGLU branch writes out; the experts add onto it
    if (I > 0) {
        swiglu_mlp_forward(out, o->fch, o->fch_act, x, layer->w.fcw, layer->w.fcprojw, BT, C, I, stream);
    }
    cudaCheck(cudaStreamWaitEvent(stream, ws->join, 0));
    if (layer->shard) {  // the exchanges run on stream, in the same order on every rank
        experts_shard_forward(out, o->s, x, layer->w.expert_u, layer->w.expert_v, o->router.idx, o->router.gate,
                              layer->shard_saved, BT, C, k, N, I > 0, layer->shard, ws->shard_work,
                              ws->shard_work_bytes, stream);
        return;
    }
    experts_forward(out, o->s, x, layer->w.expert_u, layer->w.expert_v, o->router.idx, o->router.gate, o->sched,
                    BT, C, omni_experts_options(layer), stream);
}

// dx (BT, C) = d(layer input), overwritten, from dout = d(layer output); the gradient views
// accumulate. x and BT: those of the last forward, whose saved state is used.
static void omni_layer_backward(OmniLayer* layer, floatX* dx, const floatX* dout, const floatX* x, int BT,
                                cudaStream_t stream) {
    layer_check_tokens("omni_layer_backward", BT, layer->dims.BT);
    const OmniDims d = layer->dims;
    const int C = d.C, I = d.I;
    OmniWorkspace* ws = layer->ws;
    OmniSaved* o = &layer->saved;
    const OmniWeights* w = &layer->w;
    const OmniWeights* dw = &layer->dw;
    // shared SwiGLU: dx = its input gradient
    if (I > 0) {
        swiglu_mlp_backward(dx, dw->fcw, dw->fcprojw, ws->dhidden, ws->dwide, dout, x, o->fch, o->fch_act, w->fcw,
                            w->fcprojw, BT, C, I, stream, ws->scratch);
    }
    // experts: dx (+)= sum_m ds u; dU, dV += ...; the gate gradient feeds the router. Sharded:
    // this rank's columns of dU, dV over the pairs of all ranks, times 1/P (the mean over ranks
    // that the data-parallel reduction gives the other gradients)
    if (layer->shard) {
        experts_shard_backward(dx, dw->expert_u, dw->expert_v, ws->dgate, dout, w->expert_u, w->expert_v,
                               o->router.gate, o->s, layer->shard_saved, BT, C, d.k, d.N,
                               1.0f / (float)layer->shard->P, I > 0, layer->shard, ws->shard_work,
                               ws->shard_work_bytes, stream);
    } else {
        experts_backward(dx, dw->expert_u, dw->expert_v, ws->dgate, dout, x, w->expert_u, w->expert_v,
                         o->router.idx, o->router.gate, o->s, o->sched, BT, C, omni_experts_options(layer),
                         ws->scratch, ws->scratch_bytes, stream);
    }
    router_backward(dx, dw->routerw, ws->dgate, o->router, x, w->routerw, BT, C,
                    omni_router_options(layer, layer->training), ws->scratch, ws->scratch_bytes, stream);
}

#endif  // OMNIMOE_OMNIMOE_LAYER_CUH
