/*
train_omnimoe.cu - the CUDA trainer of omnimoe: a GPT-2 style decoder whose feed-forward layers
are OmniMoE layers (or the dense swiglu / gelu baselines, or the moe kind: DeepSeekMoE-style
experts with the MoE++ options), trained in bf16 with fp32 master
weights and AdamW state, on one GPU or data parallel on several (one process per GPU).

    make && ./train_omnimoe              # the default OmniMoE model on tinyshakespeare
    ./train_omnimoe --help               # every flag
    mpirun -np 4 ./train_omnimoe ...     # 4 GPUs (llmc/multi_gpu.cuh; scripts/run_multi_gpu.sh
                                         # launches without MPI)

The math is docs/design.md §1-2 (moe: §10), the same as the CPU reference train_omnimoe.c, which
test_omnimoe.cu checks this file against. The kernels live in the llmc/ headers, one concern each
(the OmniMoE feed-forward layer is llmc/omnimoe_layer.cuh, the moe one llmc/moe_layer.cuh: this
file gives them views of their weights, gradients, expert counts, activations and, omni only,
BN statistics); this file holds the model (parameters, activations, forward, backward, update)
and the training loop (data, evaluation, sampling, logging, checkpoints).

Memory: parameters, gradients (floatX) and master weights, AdamW m and v (fp32) are flat
buffers in the layout of llmc/config.h, so one pointer arithmetic serves every tensor. The
forward keeps every activation the backward needs, per layer (with -r 1 / -r 2 the FFN
activation and ln1/ln2 are one layer's buffer, recomputed in the backward: docs/design.md §4.5);
the backward walks the layers down with one set of gradient buffers.

Determinism: every kernel sums in a fixed order (no float atomics), the scheduler's sort is
stable, cuBLASLt (and the moe experts' cuBLAS or CUTLASS grouped GEMMs, llmc/moe_experts.cuh)
runs the same algorithm for the same shape. Same seed and data give the same bits.

Several GPUs: every rank holds the whole model and optimizer state (replicas stay bitwise equal:
same initialisation, same averaged gradients, same update), reads its own slice of the data and
keeps its own router BN running statistics (docs/design.md §2: per rank, no cross-GPU sync). The floatX
gradients of a step are averaged over the ranks in buckets, one per layer plus one for the
embeddings and the final LayerNorm (GradReducer, llmc/multi_gpu.cuh), on a stream of their own:
with --overlap-comm 1 each layer's bucket starts as soon as the backward of the last micro-step
has finished that layer, so the transfer runs under the backward of the layers below; with 0
the same buckets run after the backward (same bits, only later). The step's loss, the expert
counts, the stop request (SIGINT/SIGTERM) and rank 0's log status are summed too, so every rank
takes the same decisions. Rank 0 alone prints, logs and writes files; checkpoints hold
every rank's BN set. --zero 1 (ZeRO-1, llmc/zero.cuh): each rank keeps 1/P of the fp32 master
weights and AdamW state, the gradients are reduce-scattered in the same buckets, and checkpoints
are sharded (one part per rank, written in parallel, and a manifest: llmc/checkpoint_parts.h).
--shard-experts 1 (docs/sharding.md §3): each rank keeps a C/P column slice of the expert tables
U and V in every flat buffer (llmc/expert_shard_layout.h), the OmniMoE layers exchange token
columns and partial dot products with the other ranks (llmc/experts_shard.cuh), so every forward
(training, validation, --mc-eval, samples) runs on all ranks together; U and V leave the gradient
buckets, the norm adds the ranks' slice partials (llmc/expert_shard_state.cuh), and checkpoints
are parts as under ZeRO-1.
*/
#include "llmc/utils.h"   // first: it selects POSIX declarations
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <time.h>
#include "llmc/config.h"
#include "llmc/rand.h"
#include "llmc/param_init.h"
#include "llmc/memory_plan.h"
#include "llmc/args.h"
#include "llmc/lr_schedule.h"
#include "llmc/logger.h"
#include "llmc/checkpoint.h"
#include "llmc/dataloader.h"
#include "llmc/tokenizer.h"
#include "llmc/cuda_utils.cuh"
#include "llmc/matmul.cuh"
#include "llmc/layernorm.cuh"
#include "llmc/encoder.cuh"
#include "llmc/activations.cuh"
#include "llmc/attention.cuh"
#ifdef HAVE_CUDNN_ATTENTION
#include "llmc/attention_cudnn.h"
#endif
#include "llmc/classifier.cuh"
#include "llmc/adamw.cuh"
#include "llmc/global_norm.cuh"
#include "llmc/omnimoe_layer.cuh"
#include "llmc/moe_layer.cuh"
#include "llmc/expert_stats.cuh"
#include "llmc/multi_gpu.cuh"
#include "llmc/grad_slices.h"
#include "llmc/zero.cuh"
#include "llmc/expert_shard_layout.h"
#include "llmc/expert_shard_state.cuh"

// ----------------------------------------------------------------------------
// the model

typedef struct {
    floatX* encoded;     // (BT, C)
    floatX* ln1;         // (L, BT, C)
    float* ln1_mean;     // (L, BT)
    float* ln1_rstd;     // (L, BT)
    floatX* qkv;         // (L, BT, 3C)
    floatX* atty;        // (L, BT, C)
    float* att_lse;      // (L, B, NH, T)
    floatX* residual2;   // (L, BT, C) residual stream after attention
    floatX* ln2;         // (L, BT, C)
    float* ln2_mean;     // (L, BT)
    float* ln2_rstd;     // (L, BT)
    floatX* fch;         // (L, BT, FI) FFN pre-activation, FI = 4C (gelu) or 2I
    floatX* fch_act;     // (L, BT, H)  FFN activation, H = 4C or I
    floatX* residual3;   // (L, BT, C) residual stream after the FFN
    floatX* lnf;         // (BT, C)
    float* lnf_mean;     // (BT)
    float* lnf_rstd;     // (BT)
    floatX* logits;      // (BT, Vp); the backward overwrites it with dlogits
    float* losses;       // (BT)
    float* loss_sum;     // (1) mean loss of the last forward (device)
    floatX* sublayer_out;// (BT, C) output of attention projection / FFN before the residual add
    int* inputs;         // (BT) device copy of the inputs
    int* targets;        // (BT) device copy of the targets
    // backward
    floatX* dresidual;   // (BT, C)
    floatX* dsub;        // (BT, C)  d of a LayerNorm output / attention output
    floatX* dwide;       // (BT, max(3C, FI)) d of qkv or of the FFN pre-activation
    floatX* dhidden;     // (BT, H)
    float* scratch;      // the largest scratch any backward/forward kernel asks for
    size_t scratch_bytes;
    void* attention_ws;  // cuDNN's SDPA workspace (--attention cudnn; else none)
    size_t attention_ws_bytes;
} Activations;

// the weight-gradient GEMMs that --overlap-dweight 1 moves to a second stream (model_linear_backward)
enum { DWEIGHT_FCPROJ, DWEIGHT_FC, DWEIGHT_ATTPROJ, DWEIGHT_QKV, DWEIGHT_COUNT };

typedef struct {
    ModelConfig config;
    size_t param_sizes[NUM_PARAMETER_TENSORS];
    size_t param_offsets[NUM_PARAMETER_TENSORS];
    size_t num_params;
    floatX* params;       // the weights the kernels read
    floatX* grads;        // accumulated by backward
    float* master;        // fp32 master weights: all num_params, or the ZeRO-1 shard (opt_elems)
    float* adam_m;
    float* adam_v;
    size_t opt_elems;     // elements of master, adam_m, adam_v: num_params, or the shard's
    ZeroOptimizer* zero;  // ZeRO-1 (--zero 1, several GPUs): this rank's shard; NULL: replicated
    // --shard-experts 1 (several GPUs, docs/sharding.md §3): U and V are this rank's (L*N, C/P)
    // column slices in every flat buffer (llmc/expert_shard_layout.h; param_sizes/offsets and
    // num_params are the local layout's); NULL: the whole tables
    const ExpertShardComm* shard;
    ExpertShardLayout shard_layout;
    ExpertShardState shard_state;  // the norm's ranges, the gather of the slices (expert_shard_state.cuh)
    void* shard_saved;    // (L) the layers' experts_shard_saved_bytes blocks
    void* shard_work;     // the layers' one experts_shard_work_bytes buffer
    float* bn_stats;      // router BN running statistics (layout of the model file)
    int* expert_counts;   // (L, N) pairs routed to each expert since the last reset (omni; moe: (L, E_t))
    float* expert_stats;  // (2L) usage, then KL of each layer (expert_stats' output)
    OmniLayer* omni;      // (L) the OmniMoE layers (omni only): views of the buffers here
    OmniWorkspace omni_ws;// what they share: scratch, side stream, gate gradient (omni only)
    MoeLayer* moe;        // (L) the moe layers (moe only, llmc/moe_layer.cuh)
    MoeWorkspace moe_ws;  // what they share
    float* moe_aux;       // (L) device: each moe layer's balance loss of the last training forward
    int* moe_counts_host; // (L, E_t) host copy of expert_counts for the step line's statistics (moe)
    float moe_aux_coef;   // moe run settings (docs/design.md §10.3): alpha (0 = off), set by the caller
    float moe_zc_weight;  // tau
    Activations acts;
    EncoderBackwardPlan encoder_plan;
    int B, T;             // the shape activations were allocated for (the maximum)
    int cur_B, cur_T;     // the shape of the last forward
    int adam_t;           // AdamW steps taken
    int attention;        // ATTENTION_* (--attention): whose attention kernels run
    int recompute;        // -r: 0 keep all; 1 the FFN activation, 2 also ln1/ln2, one layer's buffer (docs/design.md §4.5)
    cudaStream_t stream;
    // --overlap-dweight 1 (model_set_overlap_dweight): the backward's weight-gradient GEMMs on
    // matmul_dweight_stream; dout_ready tells that stream a dout is written, dweight_done[slot]
    // tells the main stream that slot's GEMM has read its inputs
    int overlap_dweight;
    cudaEvent_t dout_ready, dweight_done[DWEIGHT_COUNT];
    // model_forward_for_backward: the logits already hold their gradient, for this loss_scale
    int dlogits_written;
    float dlogits_scale;
    float* norm_squared;  // (1) device
    MemoryPlan plan;      // every device buffer above and its bytes (llmc/memory_plan.h)
} Model;

static inline floatX* param_ptr(const Model* m, int tensor) { return m->params + m->param_offsets[tensor]; }
static inline floatX* grad_ptr(const Model* m, int tensor) { return m->grads + m->param_offsets[tensor]; }

// layer l's slice of a per-layer parameter tensor of `per_layer` elements per layer
static inline floatX* layer_param(const Model* m, int tensor, int l) {
    return param_ptr(m, tensor) + (size_t)l * (m->param_sizes[tensor] / m->config.num_layers);
}
static inline floatX* layer_grad(const Model* m, int tensor, int l) {
    return grad_ptr(m, tensor) + (size_t)l * (m->param_sizes[tensor] / m->config.num_layers);
}

static size_t max_sz(size_t a, size_t b) { return a > b ? a : b; }
static size_t min_sz(size_t a, size_t b) { return a < b ? a : b; }

// checks the shapes the kernels need (16-byte vectors: multiples of 8 elements)
static void model_check_shapes(const ModelConfig* c) {
    const char* why = NULL;
    int hs = c->channels / c->num_heads;
    if (c->channels % 8 != 0) why = "channels must be a multiple of 8";
    else if (c->ffn_hidden % 8 != 0) why = "the FFN width (--hidden) must be a multiple of 8";
    else if (c->padded_vocab_size % 8 != 0) why = "the padded vocabulary must be a multiple of 8";
    else if (hs != 32 && hs != 64 && hs != 128) why = "the head size C/NH must be 32, 64 or 128 on the GPU";
    else if (c->ffn_kind == FFN_OMNI && c->top_k > ROUTER_MAX_K) why = "top_k exceeds the router's ROUTER_MAX_K";
    if (why) {
        fprintf(stderr, "Error: this model cannot run on the GPU: %s (C=%d, NH=%d, hidden=%d, Vp=%d)\n", why,
                c->channels, c->num_heads, c->ffn_hidden, c->padded_vocab_size);
        exit(EXIT_FAILURE);
    }
}

// Allocates parameters, optimizer state and activations for micro-batches up to (B, T), buffer by
// buffer from the memory plan (llmc/memory_plan.h, docs/design.md §4.5), which is what --plan
// prints. Refuses, before any large allocation, a model whose plan (with its margin for cuBLAS
// workspaces, NCCL and the CUDA context's own growth) cannot fit in the GPU's free memory.
static_assert(MATMUL_DBIAS_ROWS_PER_BLOCK == PLAN_MATMUL_DBIAS_ROWS_PER_BLOCK, "memory_plan.h mirrors matmul.cuh");
static_assert(LAYERNORM_BWD_ROWS_PER_BLOCK == PLAN_LAYERNORM_BWD_ROWS_PER_BLOCK, "memory_plan.h mirrors layernorm.cuh");
static_assert(ATTN_T_PAD == PLAN_ATTN_T_PAD, "memory_plan.h mirrors attention.cuh");
static_assert(GLOBAL_NORM_MAX_BLOCKS == PLAN_GLOBAL_NORM_MAX_BLOCKS, "memory_plan.h mirrors global_norm.cuh");
static_assert(ROUTER_BN_CHUNK == PLAN_ROUTER_BN_CHUNK, "memory_plan.h mirrors router.cuh");
static_assert(EXPERTS_SEG_CHUNK == PLAN_EXPERTS_SEG_CHUNK, "memory_plan.h mirrors experts.cuh");
static_assert(MOE_ROUTER_CHUNK == PLAN_MOE_ROUTER_CHUNK, "memory_plan.h mirrors moe_router.cuh");
static_assert(MOE_CONST_CHUNK == PLAN_MOE_CONST_CHUNK, "memory_plan.h mirrors moe_experts.cuh");

static void device_memory_check(const MemoryPlan* plan) {
    size_t free_bytes, total_bytes;
    cudaCheck(cudaMemGetInfo(&free_bytes, &total_bytes));
    if (plan->total <= free_bytes) return;
    const double GiB = 1073741824.0;
    const size_t* k = plan->kind_bytes;
    size_t state_bytes = k[MEM_WEIGHTS] + k[MEM_GRADS] + k[MEM_MASTER] + k[MEM_ADAM_M] + k[MEM_ADAM_V] + k[MEM_OTHER_STATE];
    memory_plan_print(plan, stderr);
    fprintf(stderr, "Error: the model needs %.2f GiB of GPU memory: %.2f GiB for the %zu parameters' weights, "
            "gradients, fp32 master weights and AdamW state, %.2f GiB for the activations and scratch of a "
            "micro-batch of -b %d -t %d, and a %.1f GiB margin; the GPU has %.2f GiB free of %.2f GiB. Lower -b "
            "or -t, or choose a smaller model (-e, --experts)\n", plan->total / GiB, state_bytes / GiB,
            model_config_num_params(&plan->config), (k[MEM_ACTIVATIONS] + k[MEM_WORKSPACE]) / GiB, plan->B, plan->T,
            plan->margin / GiB, free_bytes / GiB, total_bytes / GiB);
    exit(EXIT_FAILURE);
}

// the moe layer's dimensions and options from the model config (docs/design.md §10). No layer
// keeps its experts' gathered inputs (recompute_xg) with -r >= 1, nor where the grouped GEMMs read
// x's rows through the schedule themselves (the CUTLASS backend, inputs not scaled by k); where a
// GEMM cannot after all (a base off 16 bytes), the layer gathers them again in the backward
static MoeDims model_moe_dims(const ModelConfig* c, int BT, int recompute) {
    const int gemms_read_x = moe_gemm_backend == MOE_GEMM_CUTLASS && moe_gemm_token_reads && !c->moe_input_scale;
    MoeDims d = {BT, c->channels, (int)model_config_dense_width(c), c->ffn_hidden, c->moe_experts, c->moe_const,
                 c->moe_copy, c->moe_zero, c->moe_topk, recompute >= 1 || gemms_read_x};
    return d;
}
static MoeOptions model_moe_options(const ModelConfig* c) {
    MoeOptions o = {c->moe_gate_res, c->moe_norm_topk, c->moe_router, c->moe_input_scale};
    return o;
}

// the kernels' sizes as the GPU headers compute them (CUB asked for its sort storage), checked
// against memory_plan.h's mirror of their formulas: the plan cannot drift from the kernels
static PlanKernelSizes model_kernel_sizes(const ModelConfig* c, int B, int T, int shard_P, int recompute) {
    size_t C = c->channels, BT = (size_t)B * T, Vp = c->padded_vocab_size, FI = model_config_ffn_in_width(c), H = c->ffn_hidden;
    OmniDims omni_dims = {(int)BT, (int)C, (int)H, c->router_n, c->num_experts, c->top_k};
    int omni = c->ffn_kind == FFN_OMNI, moe = c->ffn_kind == FFN_MOE;
    PlanKernelSizes k = {0, 0, 0, 0, 0, 0};
    size_t s = 0;
    s = max_sz(s, matmul_backward_scratch_bytes((int)BT, (int)max_sz(max_sz(3 * C, FI), max_sz(C, Vp))));
    s = max_sz(s, layernorm_backward_scratch_bytes((int)BT, (int)C));
    s = max_sz(s, attention_backward_scratch_bytes(B, T, (int)C, c->num_heads));
    s = max_sz(s, global_norm_scratch_bytes());
    if (omni) s = max_sz(s, omni_layer_scratch_bytes(omni_dims));
    const MoeDims moe_dims = model_moe_dims(c, (int)BT, recompute);
    if (moe) s = max_sz(s, moe_layer_scratch_bytes(moe_dims, model_moe_options(c)));
    k.scratch = s;
    if (omni) {
        k.omni_saved = omni_layer_saved_bytes(omni_dims);
        k.omni_workspace = omni_workspace_bytes(omni_dims);
    }
    if (moe) {  // the moe layers' saved state and workspace take the same two plan entries
        k.omni_saved = moe_layer_saved_bytes(moe_dims, model_moe_options(c));
        k.omni_workspace = moe_workspace_bytes(moe_dims, model_moe_options(c));
    }
    size_t pairs = omni ? BT * c->top_k : (moe ? BT * c->moe_topk : 0);
    size_t cub = omni ? scheduler_cub_bytes((int)pairs, c->num_experts)
                      : (moe ? scheduler_cub_bytes((int)pairs, model_config_moe_routed(c)) : 0);
    PlanKernelSizes mirror = plan_kernel_sizes(c, B, T, (int)sizeof(floatX), pairs, C, cub, moe_dims.recompute_xg);
    if (mirror.scratch != k.scratch || mirror.omni_saved != k.omni_saved || mirror.omni_workspace != k.omni_workspace) {
        fprintf(stderr, "Error: llmc/memory_plan.h's kernel sizes differ from the kernels' (scratch %zu vs %zu, saved "
                "%zu vs %zu, workspace %zu vs %zu bytes): update plan_kernel_sizes with the kernel change\n",
                mirror.scratch, k.scratch, mirror.omni_saved, k.omni_saved, mirror.omni_workspace, k.omni_workspace);
        exit(EXIT_FAILURE);
    }
    if (omni && shard_P > 1) {  // column-sharded tables: the exchanges' buffers (llmc/experts_shard.cuh)
        const int K = c->top_k, N = c->num_experts;
        k.table_saved = experts_shard_saved_bytes((int)BT, (int)C, K, shard_P);
        k.table_work = experts_shard_work_bytes((int)BT, (int)C, K, N, shard_P);
        plan_table_sizes(&mirror, c, B, T, (int)sizeof(floatX), shard_P,
                         scheduler_cub_bytes(shard_P * (int)BT * K, N));
        if (mirror.table_saved != k.table_saved || mirror.table_work != k.table_work) {
            fprintf(stderr, "Error: llmc/memory_plan.h's sharded-table sizes differ from llmc/experts_shard.cuh's (saved "
                    "%zu vs %zu, work %zu vs %zu bytes): update plan_table_sizes\n", mirror.table_saved, k.table_saved,
                    mirror.table_work, k.table_work);
            exit(EXIT_FAILURE);
        }
    }
    return k;
}

// cuDNN's SDPA workspace at (B, T), or an error in a build without it (the flag is parsed everywhere)
static size_t attention_cudnn_scratch_or_die(int B, int T, int C, int NH) {
#ifdef HAVE_CUDNN_ATTENTION
    return attention_cudnn_scratch_bytes(B, T, C, NH);
#else
    (void)B; (void)T; (void)C; (void)NH;
    fprintf(stderr, "Error: --attention cudnn: this train_omnimoe was built without cuDNN (build it with "
                    "`make -B USE_CUDNN=1`; bf16 only)\n");
    exit(EXIT_FAILURE);
#endif
}

// layer l's ln1, ln2 and FFN activation (BT packed): its slice of L layers, or the one layer's
// buffer that -r 2 / -r 1 keeps instead (activation recomputation, docs/design.md §4.5)
static floatX* model_ln1(const Model* m, int l, int BT) {
    return m->acts.ln1 + (m->recompute >= 2 ? 0 : (size_t)l * BT * m->config.channels);
}
static floatX* model_ln2(const Model* m, int l, int BT) {
    return m->acts.ln2 + (m->recompute >= 2 ? 0 : (size_t)l * BT * m->config.channels);
}
static floatX* model_fch_act(const Model* m, int l, int BT) {
    return m->acts.fch_act + (m->recompute >= 1 ? 0 : (size_t)l * BT * model_config_dense_width(&m->config));
}

// the moe layers (docs/design.md §10): views of the parameters, gradients, expert counts and
// activations here; each layer with gating residuals reads the previous layer's saved logits
static void model_build_moe(Model* m, int BT) {
    const ModelConfig* c = &m->config;
    const int L = c->num_layers, Et = model_config_moe_routed(c);
    const size_t FI = model_config_ffn_in_width(c);
    Activations* a = &m->acts;
    const MoeDims d = model_moe_dims(c, BT, m->recompute);
    const MoeOptions o = model_moe_options(c);
    moe_workspace_create(&m->moe_ws, d, o, a->scratch, a->scratch_bytes, a->dhidden, a->dwide);
    const MemBuffer* counts = &m->plan.buf[MEMBUF_EXPERT_COUNTS];  // (L, E_t) int
    m->expert_counts = (int*)cuda_malloc_or_die(counts->bytes, counts->what);
    cudaCheck(cudaMemset(m->expert_counts, 0, counts->bytes));
    m->moe_counts_host = (int*)malloc_check(counts->bytes);
    m->moe_aux = (float*)cuda_malloc_or_die((size_t)L * sizeof(float), "moe balance losses");
    cudaCheck(cudaMemset(m->moe_aux, 0, (size_t)L * sizeof(float)));
    m->moe = (MoeLayer*)malloc_check((size_t)L * sizeof(MoeLayer));
    const int tensors[10] = {PARAM_FCW, PARAM_FCPROJW, PARAM_MOE_ROUTERW, PARAM_MOE_ROUTER2, PARAM_MOE_GATEMAP,
                             PARAM_MOE_W1, PARAM_MOE_W2, PARAM_MOE_CONST, PARAM_MOE_CONSTMIX, PARAM_MOE_BIAS};
    for (int l = 0; l < L; l++) {
        floatX* wv[10];
        floatX* gv[10];
        for (int i = 0; i < 10; i++) {
            wv[i] = layer_param(m, tensors[i], l);
            gv[i] = layer_grad(m, tensors[i], l);
        }
        MoeWeights w = {wv[0], wv[1], wv[2], wv[3], wv[4], wv[5], wv[6], wv[7], wv[8], wv[9]};
        MoeWeights dw = {gv[0], gv[1], gv[2], gv[3], gv[4], gv[5], gv[6], gv[7], gv[8], gv[9]};
        MoeLayer* layer = &m->moe[l];
        moe_layer_create(layer, d, o, w, dw, &m->moe_ws, a->fch + (size_t)l * BT * FI, model_fch_act(m, l, BT));
        layer->expert_counts = m->expert_counts + (size_t)l * Et;
        layer->aux = m->moe_aux + l;
        layer->prev_logits = c->moe_gate_res && l > 0 ? m->moe[l - 1].saved.z : NULL;
    }
}

// column-sharded tables: the layers' saved exchange state and their work buffer (what the plan
// counts as MEMBUF_TABLE_SAVED and MEMBUF_TABLE_WORK: model_kernel_sizes checked them equal for
// P > 1; one rank, test_omnimoe's, is no plan mode), and the norm's ranges
static void model_build_shard_buffers(Model* m) {
    const ModelConfig* c = &m->config;
    const int L = c->num_layers, BT = m->B * m->T, P = m->shard->P;
    const size_t saved = experts_shard_saved_bytes(BT, c->channels, c->top_k, P);
    const size_t work = experts_shard_work_bytes(BT, c->channels, c->top_k, c->num_experts, P);
    m->shard_saved = cuda_malloc_or_die((size_t)L * saved, "sharded tables: all GPUs' pairs and x columns");
    m->shard_work = cuda_malloc_or_die(work, "sharded tables: exchanges and schedule");
    for (int l = 0; l < L; l++) {
        omni_layer_set_shard(&m->omni[l], m->shard, (char*)m->shard_saved + (size_t)l * saved, m->shard_work, work);
    }
    expert_shard_state_init(&m->shard_state, &m->shard_layout, m->shard);
}

// zero: ZeRO-1 (llmc/zero.cuh, built by the caller): master, m and v hold its shard only; NULL: all.
// shard: column-sharded expert tables (docs/sharding.md §3; the caller's exchanges): every flat
// buffer holds this rank's (L*N, C/P) slices of U and V; NULL: whole. Not both (main refuses it).
static void model_build_sharded(Model* m, const ModelConfig* config, int B, int T, int expert_exec, int attention,
                                int recompute, ZeroOptimizer* zero, const ExpertShardComm* shard) {
    memset(m, 0, sizeof(*m));
    if (!model_config_validate(config)) exit(EXIT_FAILURE);
    model_check_shapes(config);
    m->config = *config;
    m->B = B;
    m->T = T;
    cudaCheck(cudaStreamCreate(&m->stream));
    model_config_param_sizes(config, m->param_sizes);
    if (shard) {  // U and V cut to this rank's columns; the offsets below follow
        expert_shard_layout(&m->shard_layout, config, shard->P, shard->rank);
        memcpy(m->param_sizes, m->shard_layout.sizes, sizeof(m->param_sizes));
    }
    m->shard = shard;
    size_t offset = 0;
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) {
        m->param_offsets[i] = offset;
        offset += m->param_sizes[i];
    }
    m->num_params = offset;
    size_t P = m->num_params;
    m->zero = zero;
    m->opt_elems = zero ? zero->map.shard_elems : P;
    size_t S = m->opt_elems;
    const ModelConfig* c = config;
    size_t L = c->num_layers, C = c->channels, BT = (size_t)B * T;
    size_t FI = model_config_ffn_in_width(c), H = c->ffn_hidden;
    Activations* a = &m->acts;
    OmniDims omni_dims = {(int)BT, (int)C, (int)H, c->router_n, c->num_experts, c->top_k};
    m->attention = attention;
    m->recompute = recompute;
    // every buffer of the model from the plan (this GPU's), summed against the free memory, then allocated
    PlanKernelSizes kernel_sizes = model_kernel_sizes(c, B, T, shard ? shard->P : 1, recompute);
    // cuDNN's SDPA gets its own workspace: the forward's scratch may still be the OmniMoE layer's
    kernel_sizes.attention_ws = attention == ATTENTION_CUDNN ? attention_cudnn_scratch_or_die(B, T, (int)C, c->num_heads) : 0;
    int num_gpus = zero ? zero->map.num_ranks : shard ? shard->P : 1;
    int mode = zero ? PLAN_MODE_ZERO1 : shard ? PLAN_MODE_TABLES : PLAN_MODE_REPLICATED;
    if (!memory_plan_build(&m->plan, c, B, T, (int)sizeof(floatX), num_gpus, mode, recompute, &kernel_sizes)) {
        exit(EXIT_FAILURE);
    }
    if (m->plan.opt_local != S || m->plan.params_local != P) {
        fprintf(stderr, "Error: the memory plan counts %zu fp32 state elements and %zu weights per process, the "
                "model's layout %zu and %zu\n", m->plan.opt_local, m->plan.params_local, S, P);
        exit(EXIT_FAILURE);
    }
    a->scratch_bytes = m->plan.buf[MEMBUF_SCRATCH].bytes;
    a->attention_ws_bytes = m->plan.buf[MEMBUF_ATTENTION_WS].bytes;
    void** ptrs[MEMBUF_NUM_MODEL];
    ptrs[MEMBUF_PARAMS] = (void**)&m->params;
    ptrs[MEMBUF_GRADS] = (void**)&m->grads;
    ptrs[MEMBUF_MASTER] = (void**)&m->master;
    ptrs[MEMBUF_ADAM_M] = (void**)&m->adam_m;
    ptrs[MEMBUF_ADAM_V] = (void**)&m->adam_v;
    ptrs[MEMBUF_BN_STATS] = (void**)&m->bn_stats;
    ptrs[MEMBUF_NORM] = (void**)&m->norm_squared;
    ptrs[MEMBUF_ENCODED] = (void**)&a->encoded;
    ptrs[MEMBUF_LN1] = (void**)&a->ln1;
    ptrs[MEMBUF_LN1_MEAN] = (void**)&a->ln1_mean;
    ptrs[MEMBUF_LN1_RSTD] = (void**)&a->ln1_rstd;
    ptrs[MEMBUF_QKV] = (void**)&a->qkv;
    ptrs[MEMBUF_ATTY] = (void**)&a->atty;
    ptrs[MEMBUF_ATT_LSE] = (void**)&a->att_lse;
    ptrs[MEMBUF_RESIDUAL2] = (void**)&a->residual2;
    ptrs[MEMBUF_LN2] = (void**)&a->ln2;
    ptrs[MEMBUF_LN2_MEAN] = (void**)&a->ln2_mean;
    ptrs[MEMBUF_LN2_RSTD] = (void**)&a->ln2_rstd;
    ptrs[MEMBUF_FCH] = (void**)&a->fch;
    ptrs[MEMBUF_FCH_ACT] = (void**)&a->fch_act;
    ptrs[MEMBUF_RESIDUAL3] = (void**)&a->residual3;
    ptrs[MEMBUF_LNF] = (void**)&a->lnf;
    ptrs[MEMBUF_LNF_MEAN] = (void**)&a->lnf_mean;
    ptrs[MEMBUF_LNF_RSTD] = (void**)&a->lnf_rstd;
    ptrs[MEMBUF_LOGITS] = (void**)&a->logits;
    ptrs[MEMBUF_LOSSES] = (void**)&a->losses;
    ptrs[MEMBUF_LOSS_SUM] = (void**)&a->loss_sum;
    ptrs[MEMBUF_SUBLAYER_OUT] = (void**)&a->sublayer_out;
    ptrs[MEMBUF_INPUTS] = (void**)&a->inputs;
    ptrs[MEMBUF_TARGETS] = (void**)&a->targets;
    ptrs[MEMBUF_DRESIDUAL] = (void**)&a->dresidual;
    ptrs[MEMBUF_DSUB] = (void**)&a->dsub;
    ptrs[MEMBUF_DWIDE] = (void**)&a->dwide;
    ptrs[MEMBUF_DHIDDEN] = (void**)&a->dhidden;
    ptrs[MEMBUF_SCRATCH] = (void**)&a->scratch;
    ptrs[MEMBUF_ATTENTION_WS] = (void**)&a->attention_ws;
    device_memory_check(&m->plan);
    for (int i = 0; i < MEMBUF_NUM_MODEL; i++) *ptrs[i] = cuda_malloc_or_die(m->plan.buf[i].bytes, m->plan.buf[i].what);
    cudaCheck(cudaMemset(m->grads, 0, P * sizeof(floatX)));
    cudaCheck(cudaMemset(m->adam_m, 0, S * sizeof(float)));
    cudaCheck(cudaMemset(m->adam_v, 0, S * sizeof(float)));
    if (c->ffn_kind == FFN_OMNI) {
        // the layers: views of the parameters, gradients, BN statistics, counts and activations here
        OmniOptions opt = {c->router_norm, c->gate, expert_exec};
        omni_workspace_create(&m->omni_ws, omni_dims, a->scratch, a->scratch_bytes, a->dhidden, a->dwide);
        const MemBuffer* counts = &m->plan.buf[MEMBUF_EXPERT_COUNTS];  // (L, N) int
        const MemBuffer* stats = &m->plan.buf[MEMBUF_EXPERT_STATS];    // (2L) float
        m->expert_counts = (int*)cuda_malloc_or_die(counts->bytes, counts->what);
        cudaCheck(cudaMemset(m->expert_counts, 0, counts->bytes));
        m->expert_stats = (float*)cuda_malloc_or_die(stats->bytes, stats->what);
        m->omni = (OmniLayer*)malloc_check(L * sizeof(OmniLayer));
        for (int l = 0; l < (int)L; l++) {
            OmniWeights w = {layer_param(m, PARAM_FCW, l), layer_param(m, PARAM_FCPROJW, l),
                             layer_param(m, PARAM_ROUTERW, l), layer_param(m, PARAM_EXPERTU, l),
                             layer_param(m, PARAM_EXPERTV, l)};
            OmniWeights dw = {layer_grad(m, PARAM_FCW, l), layer_grad(m, PARAM_FCPROJW, l),
                              layer_grad(m, PARAM_ROUTERW, l), layer_grad(m, PARAM_EXPERTU, l),
                              layer_grad(m, PARAM_EXPERTV, l)};
            OmniLayer* layer = &m->omni[l];
            omni_layer_create(layer, omni_dims, opt, w, dw, &m->omni_ws, a->fch + (size_t)l * BT * FI,
                              model_fch_act(m, l, (int)BT));
            omni_layer_set_bn_stats(layer, m->bn_stats + (size_t)l * omni_layer_bn_count(omni_dims));
            layer->expert_counts = m->expert_counts + (size_t)l * c->num_experts;
        }
        if (shard) model_build_shard_buffers(m);
    }
    if (c->ffn_kind == FFN_MOE) model_build_moe(m, (int)BT);
    encoder_backward_plan_init(&m->encoder_plan, (int)BT, c->vocab_size, (int)C);
    matmul_init();
}

static void model_build(Model* m, const ModelConfig* config, int B, int T, int expert_exec, int attention,
                        int recompute) {
    model_build_sharded(m, config, B, T, expert_exec, attention, recompute, NULL, NULL);
}

static void model_free(Model* m) {
    Activations* a = &m->acts;
    void* ptrs[] = {m->params, m->grads, m->master, m->adam_m, m->adam_v, m->bn_stats, m->norm_squared,
                    a->encoded, a->ln1, a->ln1_mean, a->ln1_rstd, a->qkv, a->atty, a->att_lse, a->residual2, a->ln2,
                    a->ln2_mean, a->ln2_rstd, a->fch, a->fch_act, a->residual3, a->lnf, a->lnf_mean, a->lnf_rstd,
                    a->logits, a->losses, a->loss_sum, a->sublayer_out, a->inputs, a->targets, a->dresidual, a->dsub,
                    a->dwide, a->dhidden, a->scratch, a->attention_ws};
    for (size_t i = 0; i < sizeof(ptrs) / sizeof(ptrs[0]); i++) cudaCheck(cudaFree(ptrs[i]));
#ifdef HAVE_CUDNN_ATTENTION
    if (m->attention == ATTENTION_CUDNN) attention_cudnn_free();
#endif
    if (m->omni) {
        for (int l = 0; l < m->config.num_layers; l++) omni_layer_free(&m->omni[l]);
        free(m->omni);
        omni_workspace_free(&m->omni_ws);
        cudaCheck(cudaFree(m->expert_stats));
    }
    if (m->moe) {
        for (int l = 0; l < m->config.num_layers; l++) moe_layer_free(&m->moe[l]);
        free(m->moe);
        moe_workspace_free(&m->moe_ws);
        cudaCheck(cudaFree(m->moe_aux));
        free(m->moe_counts_host);
    }
    cudaCheck(cudaFree(m->expert_counts));  // omni and moe (NULL for the dense kinds)
    if (m->overlap_dweight) {
        cudaCheck(cudaEventDestroy(m->dout_ready));
        for (int i = 0; i < DWEIGHT_COUNT; i++) cudaCheck(cudaEventDestroy(m->dweight_done[i]));
    }
    if (m->shard) {
        cudaCheck(cudaFree(m->shard_saved));
        cudaCheck(cudaFree(m->shard_work));
        expert_shard_state_free(&m->shard_state);
    }
    encoder_backward_plan_free(&m->encoder_plan);
    cudaCheck(cudaStreamDestroy(m->stream));
}

// Master weights from host fp32 in this rank's layout (m->num_params values; sharded tables: its
// local layout); floatX weights rounded from them (the same round-to-nearest-even as the AdamW
// update, so masters alone restore the weights bitwise). ZeRO-1: the master keeps this rank's
// shard of them, the floatX weights all of them. The one upload path of model_set_params and of
// the sharded model_init_random.
static void model_upload_params(Model* m, const float* local_params, const float* host_bn_stats) {
    size_t P = m->num_params;
    if (m->zero) zero_upload_packed(m->zero, local_params, m->master);
    else cudaCheck(cudaMemcpy(m->master, local_params, P * sizeof(float), cudaMemcpyHostToDevice));
    upload_floatX(m->params, local_params, P);
    size_t num_bn = model_config_num_bn_stats(&m->config);
    if (num_bn > 0) {
        cudaCheck(cudaMemcpy(m->bn_stats, host_bn_stats, num_bn * sizeof(float), cudaMemcpyHostToDevice));
    }
}

// host_params: the whole model (layout order). Sharded tables: this rank keeps its columns of U and
// V (its expert_shard_local_pack), in the weights and the master.
static void model_set_params(Model* m, const float* host_params, const float* host_bn_stats) {
    float* local = NULL;
    if (m->shard) {
        local = (float*)malloc_check(m->num_params * sizeof(float));
        expert_shard_local_pack(local, host_params, sizeof(float), &m->shard_layout);
        host_params = local;
    }
    model_upload_params(m, host_params, host_bn_stats);
    free(local);
}

// ZeRO-1 and sharded tables: collective (every rank calls it, the shards are gathered); host_params
// (the whole model) may be NULL on the ranks that do not need the weights
static void model_get_params(const Model* m, float* host_params, float* host_bn_stats) {
    if (m->zero) zero_gather_to_host(m->zero, m->master, host_params, m->stream);
    else if (m->shard) expert_shard_gather_to_host(&m->shard_state, m->master, host_params, m->stream);
    else cudaCheck(cudaMemcpy(host_params, m->master, m->num_params * sizeof(float), cudaMemcpyDeviceToHost));
    size_t num_bn = model_config_num_bn_stats(&m->config);
    if (num_bn > 0 && host_bn_stats) {
        cudaCheck(cudaMemcpy(host_bn_stats, m->bn_stats, num_bn * sizeof(float), cudaMemcpyDeviceToHost));
    }
}

// One chunk of the drawn weights to the GPU, as model_set_params does it (fp32 masters, then their
// floatX rounding), on the consumer thread of model_init_params_pipelined: the copies of chunk i
// run while chunk i + 1 is drawn on every core.
#define INIT_UPLOAD_CHUNK ((size_t)1 << 26)  // values per chunk: 256 MiB of fp32
typedef struct { Model* m; const float* params; floatX* staging; int device; } InitUpload;

static void init_upload_chunk(void* ctx, size_t lo, size_t n) {
    InitUpload* u = (InitUpload*)ctx;
    cudaCheck(cudaSetDevice(u->device));  // the current device belongs to the host thread
    cudaCheck(cudaMemcpy(u->m->master + lo, u->params + lo, n * sizeof(float), cudaMemcpyHostToDevice));
    host_float_to_floatX(u->staging, u->params + lo, n);
    cudaCheck(cudaMemcpy(u->m->params + lo, u->staging, n * sizeof(floatX), cudaMemcpyHostToDevice));
}

// every host core draws, with the bits of model_init_params (llmc/param_init.h). Sharded tables:
// the rank draws only its local layout, the table rows block by block (model_init_params_shard:
// the bits of packing the whole draw, so the same model as the unsharded run, in the local buffer
// and one block of host memory, docs/sharding.md §3.4). ZeRO-1 packs its shard of the whole draw
// (model_set_params); the replicated masters take it chunk by chunk.
static void model_init_random(Model* m, uint64_t seed) {
    float* bn = (float*)malloc_check(max_sz(model_config_num_bn_stats(&m->config), 1) * sizeof(float));
    model_init_bn_stats(&m->config, bn);
    if (m->shard) {
        float* local = (float*)malloc_check(m->num_params * sizeof(float));
        model_init_params_shard(&m->config, local, seed, &m->shard_layout, PARAM_INIT_SHARD_BLOCK, host_num_cores());
        model_upload_params(m, local, bn);
        free(local);
        free(bn);
        return;
    }
    float* params = (float*)malloc_check(model_config_num_params(&m->config) * sizeof(float));  // the whole draw
    if (m->zero) {
        model_init_params_parallel(&m->config, params, seed);
        model_set_params(m, params, bn);
    } else {
        InitUpload u = {m, params, (floatX*)malloc_check(min_sz(m->num_params, INIT_UPLOAD_CHUNK) * sizeof(floatX)), 0};
        cudaCheck(cudaGetDevice(&u.device));
        model_init_params_pipelined(&m->config, params, seed, INIT_UPLOAD_CHUNK, host_num_cores(), init_upload_chunk, &u);
        size_t num_bn = model_config_num_bn_stats(&m->config);
        if (num_bn > 0) cudaCheck(cudaMemcpy(m->bn_stats, bn, num_bn * sizeof(float), cudaMemcpyHostToDevice));
        free(u.staging);
    }
    free(params);
    free(bn);
}

// ----------------------------------------------------------------------------
// forward

// Runs the model on (B, T) tokens (host arrays). With targets, the per-token losses and their
// mean (acts.loss_sum, device) are computed; the logits stay in acts.logits either way.
// training = 1: router BN uses batch statistics and updates its running statistics.
// attention by the kernels --attention chose; cuDNN's run in their own workspace, sized at build
// for (B, T) and checked for any other shape (a sample or an eval batch builds its own graphs)
#ifdef HAVE_CUDNN_ATTENTION
static void* model_attention_workspace(Model* m, int B, int T) {
    const ModelConfig* c = &m->config;
    size_t need = attention_cudnn_scratch_or_die(B, T, c->channels, c->num_heads);
    if (need > m->acts.attention_ws_bytes) {
        fprintf(stderr, "Error: --attention cudnn: B=%d T=%d needs a %zu-byte workspace, more than the %zu bytes "
                        "sized for -b %d -t %d\n", B, T, need, m->acts.attention_ws_bytes, m->B, m->T);
        exit(EXIT_FAILURE);
    }
    return m->acts.attention_ws;
}
#endif

static void model_attention_forward(Model* m, floatX* out, float* lse, const floatX* qkv, int B, int T, cudaStream_t st) {
    const int C = m->config.channels, NH = m->config.num_heads;
#ifdef HAVE_CUDNN_ATTENTION
    if (m->attention == ATTENTION_CUDNN) {
        attention_cudnn_forward(out, lse, qkv, B, T, C, NH, model_attention_workspace(m, B, T), st);
        return;
    }
#endif
    attention_forward(out, lse, qkv, B, T, C, NH, st);
}

static void model_attention_backward(Model* m, floatX* dqkv, const floatX* dout, const floatX* qkv, const floatX* out,
                                     const float* lse, int B, int T, float* scratch, cudaStream_t st) {
    const int C = m->config.channels, NH = m->config.num_heads;
#ifdef HAVE_CUDNN_ATTENTION
    if (m->attention == ATTENTION_CUDNN) {
        attention_cudnn_backward(dqkv, dout, qkv, out, lse, B, T, C, NH, model_attention_workspace(m, B, T), st);
        return;
    }
#endif
    attention_backward(dqkv, dout, qkv, out, lse, B, T, C, NH, scratch, st);
}

// ----------------------------------------------------------------------------
// activation recomputation (-r, docs/design.md §4.5); model_ln1, model_ln2, model_fch_act above
// the FFN activation of layer l again, from its saved pre-activation fch, with the kernel its
// forward ran (gelu under -r >= 1 runs the unfused GELU, as the cuBLASLt epilogue's cannot be
// reproduced from the rounded fch): the same bits
static void model_recompute_ffn_act(Model* m, int l, int BT, cudaStream_t st) {
    const ModelConfig* c = &m->config;
    const floatX* fch = m->acts.fch + (size_t)l * BT * model_config_ffn_in_width(c);
    const int H = (int)model_config_dense_width(c);
    if (H == 0) return;  // omni (or moe) without a shared SwiGLU
    if (c->ffn_kind == FFN_GELU) gelu_forward(model_fch_act(m, l, BT), fch, (size_t)BT * H, st);
    else swiglu_forward(model_fch_act(m, l, BT), fch, BT, H, st);
}

// ln1 and ln2 of layer l again from their inputs on the residual stream and the saved mean/rstd
static void model_recompute_layernorms(Model* m, int l, int BT, cudaStream_t st) {
    const int C = m->config.channels;
    const Activations* a = &m->acts;
    const floatX* residual = l == 0 ? a->encoded : a->residual3 + (size_t)(l - 1) * BT * C;
    layernorm_recompute(model_ln1(m, l, BT), residual, layer_param(m, PARAM_LN1W, l), layer_param(m, PARAM_LN1B, l),
                        a->ln1_mean + (size_t)l * BT, a->ln1_rstd + (size_t)l * BT, BT, C, st);
    layernorm_recompute(model_ln2(m, l, BT), a->residual2 + (size_t)l * BT * C, layer_param(m, PARAM_LN2W, l),
                        layer_param(m, PARAM_LN2B, l), a->ln2_mean + (size_t)l * BT, a->ln2_rstd + (size_t)l * BT,
                        BT, C, st);
}

// dlogits_scale >= 0 (model_forward_for_backward, with targets and training): the classifier's one
// pass also writes the logits' gradient for that loss_scale, in place; < 0: the logits stay
static void model_forward_impl(Model* m, const int* inputs, const int* targets, int B, int T, int training,
                               float dlogits_scale) {
    const ModelConfig* c = &m->config;
    if (B > m->B || T > m->T || B < 1 || T < 1) {
        fprintf(stderr, "model_forward: micro-batch %dx%d exceeds the allocated %dx%d\n", B, T, m->B, m->T);
        exit(EXIT_FAILURE);
    }
    m->cur_B = B;
    m->cur_T = T;
    const int L = c->num_layers, C = c->channels, NH = c->num_heads, BT = B * T;
    const int Vp = c->padded_vocab_size, V = c->vocab_size, FI = model_config_ffn_in_width(c), H = c->ffn_hidden;
    cudaStream_t st = m->stream;
    Activations* a = &m->acts;
    cudaCheck(cudaMemcpyAsync(a->inputs, inputs, BT * sizeof(int), cudaMemcpyHostToDevice, st));
    if (targets) cudaCheck(cudaMemcpyAsync(a->targets, targets, BT * sizeof(int), cudaMemcpyHostToDevice, st));
    encoder_forward(a->encoded, a->inputs, param_ptr(m, PARAM_WTE), param_ptr(m, PARAM_WPE), B, T, C, V, st);

    // the first LayerNorm; later ones are fused with the residual add that precedes them
    layernorm_forward(a->ln1, a->ln1_mean, a->ln1_rstd, a->encoded, layer_param(m, PARAM_LN1W, 0),
                      layer_param(m, PARAM_LN1B, 0), BT, C, st);
    for (int l = 0; l < L; l++) {
        size_t btc = (size_t)l * BT * C;
        const floatX* residual = l == 0 ? a->encoded : a->residual3 + (size_t)(l - 1) * BT * C;
        floatX* ln1 = model_ln1(m, l, BT);
        floatX* qkv = a->qkv + (size_t)l * BT * 3 * C;
        floatX* atty = a->atty + btc;
        floatX* residual2 = a->residual2 + btc;
        floatX* ln2 = model_ln2(m, l, BT);
        floatX* fch = a->fch + (size_t)l * BT * FI;
        floatX* fch_act = model_fch_act(m, l, BT);
        floatX* residual3 = a->residual3 + btc;

        matmul_forward(qkv, ln1, layer_param(m, PARAM_QKVW, l), layer_param(m, PARAM_QKVB, l), BT, C, 3 * C, st);
        model_attention_forward(m, atty, a->att_lse + (size_t)l * BT * NH, qkv, B, T, st);
        matmul_forward(a->sublayer_out, atty, layer_param(m, PARAM_ATTPROJW, l), layer_param(m, PARAM_ATTPROJB, l),
                       BT, C, C, st);
        fused_residual_layernorm_forward(residual2, ln2, a->ln2_mean + (size_t)l * BT, a->ln2_rstd + (size_t)l * BT,
                                         residual, a->sublayer_out, layer_param(m, PARAM_LN2W, l),
                                         layer_param(m, PARAM_LN2B, l), BT, C, st);
        if (c->ffn_kind == FFN_GELU) {
            if (m->recompute >= 1) {  // the unfused GELU, which the backward recomputes bitwise
                matmul_forward(fch, ln2, layer_param(m, PARAM_FCW, l), layer_param(m, PARAM_FCB, l), BT, C, FI, st);
                gelu_forward(fch_act, fch, (size_t)BT * FI, st);
            } else {
                matmul_forward_gelu(fch_act, fch, ln2, layer_param(m, PARAM_FCW, l), layer_param(m, PARAM_FCB, l),
                                    BT, C, FI, st);
            }
            matmul_forward(a->sublayer_out, fch_act, layer_param(m, PARAM_FCPROJW, l),
                           layer_param(m, PARAM_FCPROJB, l), BT, H, C, st);
        } else if (c->ffn_kind == FFN_SWIGLU) {
            swiglu_mlp_forward(a->sublayer_out, fch, fch_act, ln2, layer_param(m, PARAM_FCW, l),
                               layer_param(m, PARAM_FCPROJW, l), BT, C, H, st);
        } else if (c->ffn_kind == FFN_OMNI) {
            // out = SwiGLU + experts; its activations packed by this BT, like the other kinds'
            omni_layer_set_activations(&m->omni[l], fch, fch_act);
            omni_layer_forward(&m->omni[l], a->sublayer_out, ln2, BT, training, st);
        } else {
            MoeLayer* layer = &m->moe[l];  // shared SwiGLU + routed experts (docs/design.md §10)
            layer->aux_coef = m->moe_aux_coef;
            layer->zc_weight = m->moe_zc_weight;
            moe_layer_set_activations(layer, fch, fch_act);
            moe_layer_forward(layer, a->sublayer_out, ln2, BT, training, st);
        }
        // residual3 = residual2 + FFN; then the next block's LN1 (or the final LN)
        if (l + 1 < L) {
            fused_residual_layernorm_forward(residual3, model_ln1(m, l + 1, BT),
                                             a->ln1_mean + (size_t)(l + 1) * BT, a->ln1_rstd + (size_t)(l + 1) * BT,
                                             residual2, a->sublayer_out, layer_param(m, PARAM_LN1W, l + 1),
                                             layer_param(m, PARAM_LN1B, l + 1), BT, C, st);
        } else {
            fused_residual_layernorm_forward(residual3, a->lnf, a->lnf_mean, a->lnf_rstd, residual2, a->sublayer_out,
                                             param_ptr(m, PARAM_LNFW), param_ptr(m, PARAM_LNFB), BT, C, st);
        }
    }
    matmul_forward(a->logits, a->lnf, param_ptr(m, PARAM_WTE), NULL, BT, C, Vp, st);
    m->dlogits_written = targets != NULL && training && dlogits_scale >= 0.0f;
    m->dlogits_scale = dlogits_scale;
    if (targets) {
        // the same kernel and arguments as model_backward's call: the same losses and gradient bits
        fused_classifier(a->logits, a->losses, a->targets, m->dlogits_written ? dlogits_scale / (float)BT : 0.0f, BT,
                         V, Vp, m->dlogits_written, st);
        mean_loss(a->loss_sum, a->losses, BT, st);
        // moe training: the loss includes the layers' balance losses (docs/design.md §10.3)
        if (c->ffn_kind == FFN_MOE && training && m->moe_aux_coef > 0.0f) moe_add_aux_loss(a->loss_sum, m->moe_aux, L, st);
    }
}

// B x T tokens through the model; with targets, the per-token losses and their mean (loss_sum);
// training: BN batch statistics (and their running update), moe's balance losses
static void model_forward(Model* m, const int* inputs, const int* targets, int B, int T, int training) {
    model_forward_impl(m, inputs, targets, B, T, training, -1.0f);
}

// the training forward of a step whose model_backward(loss_scale) follows at once: the classifier
// writes the logits' gradient in the same pass that computes the losses (one read of the logits
// fewer per step; llm.c does the same); the logits themselves are then gone
static void model_forward_for_backward(Model* m, const int* inputs, const int* targets, int B, int T,
                                       float loss_scale) {
    model_forward_impl(m, inputs, targets, B, T, 1, loss_scale);
}

// the mean loss of the last forward with targets (waits for the GPU)
static float model_mean_loss(const Model* m) {
    float loss;
    cudaCheck(cudaMemcpyAsync(&loss, m->acts.loss_sum, sizeof(float), cudaMemcpyDeviceToHost, m->stream));
    cudaCheck(cudaStreamSynchronize(m->stream));
    return loss;
}

// ----------------------------------------------------------------------------
// backward

// the gradient bucket of layer l: the backward finishes layer L-1 first (llmc/grad_slices.h)
static int model_layer_bucket(const Model* m, int l) { return m->config.num_layers - 1 - l; }

// --overlap-dweight 1: each layer's four weight-gradient GEMMs (qkv, attproj, and gelu's fc and
// fcproj) run on a second stream beside the rest of the backward, whose small kernels leave SMs
// idle and whose weight-gradient GEMMs have few output tiles. The same kernels on the same inputs,
// so the same bits (test_omnimoe checks). Not with -r: the recomputed activations share one
// layer's buffers, which the next layer would overwrite while the GEMMs still read them.
static void model_set_overlap_dweight(Model* m, int on) {
    if (!on || m->overlap_dweight) return;
    if (m->recompute) {
        fprintf(stderr, "Error: --overlap-dweight 1 with -r %d: the recomputed activations share one layer's buffers; "
                "use -r 0\n", m->recompute);
        exit(EXIT_FAILURE);
    }
    matmul_dweight_stream_init();
    cudaCheck(cudaEventCreateWithFlags(&m->dout_ready, cudaEventDisableTiming));
    for (int i = 0; i < DWEIGHT_COUNT; i++) cudaCheck(cudaEventCreateWithFlags(&m->dweight_done[i], cudaEventDisableTiming));
    m->overlap_dweight = 1;
}

#ifdef TESTING
// test_omnimoe checks the waits below with one stream late by OVERLAP_LAG_CYCLES (a few ms) per
// GEMM: 1 the second stream before each weight-gradient GEMM (a missing wait of st lets it
// overwrite what the GEMM still has to read, or read a gradient not yet written), 2 st before
// each dout_ready (a missing wait on that lets the GEMM read dout before st writes it); 0 none
#define OVERLAP_LAG_CYCLES 10000000LL
static int g_overlap_lag = 0;
__global__ void overlap_lag_kernel(long long cycles) {
    for (long long start = clock64(); clock64() - start < cycles;) {}
}
#endif

// a linear layer's backward (llmc/matmul.cuh: dbias, dinp, dweight). With --overlap-dweight 1 the
// dweight GEMM goes to matmul_dweight_stream once dout is written and dweight_done[slot] marks
// its end; dbias and dinp stay on st, which first waits for the GEMM of wait_slot (-1: none)
// when dinp overwrites what that GEMM reads.
static void model_linear_backward(Model* m, int slot, int wait_slot, floatX* dinp, floatX* dweight, floatX* dbias,
                                  const floatX* dout, const floatX* inp, const floatX* weight, const floatX* pre_gelu,
                                  int BT, int C_in, int C_out, cudaStream_t st, float* scratch) {
    if (!m->overlap_dweight) {
        matmul_backward_impl(dinp, dweight, dbias, dout, inp, weight, pre_gelu, BT, C_in, C_out, 0, st, scratch);
        return;
    }
#ifdef TESTING
    if (g_overlap_lag == 2) {
        overlap_lag_kernel<<<1, 1, 0, st>>>(OVERLAP_LAG_CYCLES);
        cudaCheckLast();
    }
#endif
    cudaCheck(cudaEventRecord(m->dout_ready, st));
    cudaCheck(cudaStreamWaitEvent(matmul_dweight_stream, m->dout_ready, 0));
#ifdef TESTING
    if (g_overlap_lag == 1) {
        overlap_lag_kernel<<<1, 1, 0, matmul_dweight_stream>>>(OVERLAP_LAG_CYCLES);
        cudaCheckLast();
    }
#endif
    matmul_backward_impl(NULL, dweight, NULL, dout, inp, weight, NULL, BT, C_in, C_out, 0, matmul_dweight_stream, NULL);
    cudaCheck(cudaEventRecord(m->dweight_done[slot], matmul_dweight_stream));
    if (wait_slot >= 0) cudaCheck(cudaStreamWaitEvent(st, m->dweight_done[wait_slot], 0));
    matmul_backward_impl(dinp, NULL, dbias, dout, inp, weight, pre_gelu, BT, C_in, C_out, 0, st, scratch);
}

// st waits until the weight-gradient GEMM of slot has read its inputs (before st overwrites them)
static void model_dweight_wait(const Model* m, int slot, cudaStream_t st) {
    if (m->overlap_dweight) cudaCheck(cudaStreamWaitEvent(st, m->dweight_done[slot], 0));
}

static void model_zero_grad(Model* m) {
    cudaCheck(cudaMemsetAsync(m->grads, 0, m->num_params * sizeof(floatX), m->stream));
}

// grads += loss_scale * d(mean loss of the last forward)/d(params). The last forward must have
// had targets. Overwrites the logits with their gradient.
// reducer (several GPUs, --overlap-comm 1, the last micro-step of a step; else NULL): each
// bucket of model_grad_reducer_init starts its all-reduce as soon as the backward has queued
// the last write to its gradients: layer l's after its LN1 backward, the embeddings' after the
// encoder backward (wte also got the LM head's gradient at the start).
static void model_backward(Model* m, const int* inputs, float loss_scale, GradReducer* reducer) {
    const ModelConfig* c = &m->config;
    const int B = m->cur_B, T = m->cur_T;
    const int L = c->num_layers, C = c->channels, NH = c->num_heads, BT = B * T;
    const int Vp = c->padded_vocab_size, V = c->vocab_size, FI = model_config_ffn_in_width(c), H = c->ffn_hidden;
    cudaStream_t st = m->stream;
    Activations* a = &m->acts;
    float* scratch = a->scratch;

    // host work first, so it overlaps the GPU: the encoder's token buckets
    encoder_backward_plan_build(&m->encoder_plan, inputs, B, T);
    encoder_backward_plan_upload(&m->encoder_plan, st);

    // dlogits (in place; model_forward_for_backward wrote them already) -> LM head -> final LayerNorm
    if (!m->dlogits_written) {
        fused_classifier(a->logits, a->losses, a->targets, loss_scale / (float)BT, BT, V, Vp, 1, st);
    } else if (m->dlogits_scale != loss_scale) {
        fprintf(stderr, "model_backward: loss_scale %g, but the forward wrote the logits' gradient for %g\n",
                loss_scale, m->dlogits_scale);
        exit(EXIT_FAILURE);
    }
    m->dlogits_written = 0;  // used up: the LM head backward below reads them
    matmul_backward(a->dsub, grad_ptr(m, PARAM_WTE), NULL, a->logits, a->lnf, param_ptr(m, PARAM_WTE), BT, C, Vp, 0,
                    st, scratch);
    cudaCheck(cudaMemsetAsync(a->dresidual, 0, (size_t)BT * C * sizeof(floatX), st));
    const floatX* last_residual = a->residual3 + (size_t)(L - 1) * BT * C;
    layernorm_backward(a->dresidual, grad_ptr(m, PARAM_LNFW), grad_ptr(m, PARAM_LNFB), a->dsub, last_residual,
                       param_ptr(m, PARAM_LNFW), a->lnf_mean, a->lnf_rstd, BT, C, scratch, st);

    m->moe_ws.carry_valid = 0;  // moe gating residuals: no carry into the top layer
    for (int l = L - 1; l >= 0; l--) {
        size_t btc = (size_t)l * BT * C;
        const floatX* residual = l == 0 ? a->encoded : a->residual3 + (size_t)(l - 1) * BT * C;
        const floatX* ln1 = model_ln1(m, l, BT);
        const floatX* qkv = a->qkv + (size_t)l * BT * 3 * C;
        const floatX* atty = a->atty + btc;
        const floatX* residual2 = a->residual2 + btc;
        const floatX* ln2 = model_ln2(m, l, BT);
        const floatX* fch = a->fch + (size_t)l * BT * FI;
        const floatX* fch_act = model_fch_act(m, l, BT);
        // -r: this layer's recomputed activations into the one layer's buffers, before their readers
        if (m->recompute >= 1) model_recompute_ffn_act(m, l, BT, st);
        if (m->recompute >= 2) model_recompute_layernorms(m, l, BT, st);

        // FFN: dresidual is d(residual3) = d(FFN output); dsub receives d(ln2). Each branch first
        // lets the layer above's qkv weight-gradient GEMM finish reading dwide (--overlap-dweight)
        if (c->ffn_kind == FFN_GELU && matmul_dgelu_fused) {  // --gelu-fusion 2: d(fch) from the DGELU epilogue
            model_linear_backward(m, DWEIGHT_FCPROJ, DWEIGHT_QKV, a->dwide, layer_grad(m, PARAM_FCPROJW, l),
                                  layer_grad(m, PARAM_FCPROJB, l), a->dresidual, fch_act,
                                  layer_param(m, PARAM_FCPROJW, l), fch, BT, H, C, st, scratch);
            model_linear_backward(m, DWEIGHT_FC, -1, a->dsub, layer_grad(m, PARAM_FCW, l), layer_grad(m, PARAM_FCB, l),
                                  a->dwide, ln2, layer_param(m, PARAM_FCW, l), NULL, BT, C, FI, st, scratch);
        } else if (c->ffn_kind == FFN_GELU) {
            model_linear_backward(m, DWEIGHT_FCPROJ, -1, a->dhidden, layer_grad(m, PARAM_FCPROJW, l),
                                  layer_grad(m, PARAM_FCPROJB, l), a->dresidual, fch_act,
                                  layer_param(m, PARAM_FCPROJW, l), NULL, BT, H, C, st, scratch);
            model_dweight_wait(m, DWEIGHT_QKV, st);
            gelu_backward(a->dwide, fch, a->dhidden, (size_t)BT * FI, st);
            model_linear_backward(m, DWEIGHT_FC, -1, a->dsub, layer_grad(m, PARAM_FCW, l), layer_grad(m, PARAM_FCB, l),
                                  a->dwide, ln2, layer_param(m, PARAM_FCW, l), NULL, BT, C, FI, st, scratch);
        } else if (c->ffn_kind == FFN_SWIGLU) {
            model_dweight_wait(m, DWEIGHT_QKV, st);
            swiglu_mlp_backward(a->dsub, layer_grad(m, PARAM_FCW, l), layer_grad(m, PARAM_FCPROJW, l), a->dhidden,
                                a->dwide, a->dresidual, ln2, fch, fch_act, layer_param(m, PARAM_FCW, l),
                                layer_param(m, PARAM_FCPROJW, l), BT, C, H, st, scratch);
        } else if (c->ffn_kind == FFN_OMNI) {  // (its workspace borrows dwide)
            model_dweight_wait(m, DWEIGHT_QKV, st);
            omni_layer_backward(&m->omni[l], a->dsub, a->dresidual, ln2, BT, st);
        } else {
            model_dweight_wait(m, DWEIGHT_QKV, st);
            moe_layer_backward(&m->moe[l], a->dsub, a->dresidual, ln2, BT, loss_scale, st);
        }
        // LN2: dresidual (= d residual3 = d residual2 through the skip) += LN2 backward
        if (c->ffn_kind == FFN_GELU) model_dweight_wait(m, DWEIGHT_FCPROJ, st);  // it reads dresidual
        layernorm_backward(a->dresidual, layer_grad(m, PARAM_LN2W, l), layer_grad(m, PARAM_LN2B, l), a->dsub, residual2,
                           layer_param(m, PARAM_LN2W, l), a->ln2_mean + (size_t)l * BT, a->ln2_rstd + (size_t)l * BT,
                           BT, C, scratch, st);
        // attention: dresidual is d(attention projection output)
        model_linear_backward(m, DWEIGHT_ATTPROJ, -1, a->dsub, layer_grad(m, PARAM_ATTPROJW, l),
                              layer_grad(m, PARAM_ATTPROJB, l), a->dresidual, atty, layer_param(m, PARAM_ATTPROJW, l),
                              NULL, BT, C, C, st, scratch);
        if (c->ffn_kind == FFN_GELU) model_dweight_wait(m, DWEIGHT_FC, st);  // fc's reads dwide
        model_attention_backward(m, a->dwide, a->dsub, qkv, atty, a->att_lse + (size_t)l * BT * NH, B, T, scratch, st);
        model_linear_backward(m, DWEIGHT_QKV, -1, a->dsub, layer_grad(m, PARAM_QKVW, l), layer_grad(m, PARAM_QKVB, l),
                              a->dwide, ln1, layer_param(m, PARAM_QKVW, l), NULL, BT, C, 3 * C, st, scratch);
        model_dweight_wait(m, DWEIGHT_ATTPROJ, st);  // its GEMM reads dresidual
        layernorm_backward(a->dresidual, layer_grad(m, PARAM_LN1W, l), layer_grad(m, PARAM_LN1B, l), a->dsub, residual,
                           layer_param(m, PARAM_LN1W, l), a->ln1_mean + (size_t)l * BT, a->ln1_rstd + (size_t)l * BT,
                           BT, C, scratch, st);
        // layer l's weight gradients are complete (the layers below write only their own)
        if (reducer) {
            model_dweight_wait(m, DWEIGHT_QKV, st);  // its last weight-gradient GEMM
            grad_reducer_launch(reducer, model_layer_bucket(m, l), st);
        }
    }
    model_dweight_wait(m, DWEIGHT_QKV, st);  // every weight gradient written before st goes on
    encoder_backward(grad_ptr(m, PARAM_WTE), grad_ptr(m, PARAM_WPE), a->dresidual, &m->encoder_plan, B, T, C, st);
    if (reducer) grad_reducer_launch(reducer, m->config.num_layers, st);  // wte, wpe, lnfw, lnfb
}

// ----------------------------------------------------------------------------
// the gradient buckets of several GPUs (GradReducer, llmc/multi_gpu.cuh): one bucket per layer
// plus one, from the host slice list of llmc/grad_slices.h (which says what goes where); the
// slices are checked to tile the gradient buffer exactly once
static void model_grad_reducer_init(Model* m, GradReducer* r, const MultiGpu* mg) {
    GradSlice* slices = (GradSlice*)malloc_check(grad_slices_max(&m->config) * sizeof(GradSlice));
    int num_slices = grad_slices_build(&m->config, slices);
    if (!grad_slices_check_tiling(slices, num_slices, model_config_num_params(&m->config))) {
        fprintf(stderr, "model_grad_reducer_init: the gradient buckets do not tile the %zu gradients exactly once\n",
                model_config_num_params(&m->config));
        exit(EXIT_FAILURE);
    }
    grad_reducer_init(r, mg, grad_slices_num_buckets(&m->config));
    // sharded tables: U and V are complete on their owner (the mean over ranks came with the
    // exchanges); the other slices move to the local layout (not with ZeRO-1: main refuses both)
    if (m->shard) num_slices = expert_shard_grad_slices(&m->shard_layout, slices, num_slices);
    for (int i = 0; i < num_slices; i++) {
        size_t chunk = m->zero ? m->zero->map.chunk[i] : 0;  // ZeRO-1: reduce-scatter (same slice list)
        grad_reducer_add(r, slices[i].bucket, m->grads + slices[i].offset, slices[i].count, chunk);
    }
    free(slices);
}

// ----------------------------------------------------------------------------
// optimizer

// The global gradient norm (after dividing by grad_divisor), clipping and one AdamW step on
// every tensor. Returns the norm (before clipping).
static float model_update(Model* m, float lr, float beta1, float beta2, float eps, float weight_decay, float grad_clip) {
    cudaStream_t st = m->stream;
    if (m->zero) {  // ZeRO-1 (docs/sharding.md §2): norm from the shards, AdamW on the shard, gather
        float norm = (float)sqrt(zero_grad_norm_squared(m->zero, m->grads, st));
        float grad_scale = (grad_clip > 0.0f && norm > grad_clip) ? grad_clip / norm : 1.0f;
        m->adam_t += 1;
        zero_adamw(m->zero, m->params, m->master, m->grads, m->adam_m, m->adam_v, lr, beta1, beta2, eps, weight_decay,
                   grad_scale, m->adam_t, st);
        zero_allgather_params(m->zero, m->params, st);
        return norm;
    }
    float norm;
    if (m->shard) {  // sharded tables: the replicated part here plus every rank's slice partial, in double
        norm = (float)sqrt(expert_shard_grad_norm_squared(&m->shard_state, m->grads, st));
    } else {
        global_norm_squared(m->norm_squared, m->grads, m->num_params, m->acts.scratch, st);
        float norm_squared;
        cudaCheck(cudaMemcpyAsync(&norm_squared, m->norm_squared, sizeof(float), cudaMemcpyDeviceToHost, st));
        cudaCheck(cudaStreamSynchronize(st));
        norm = sqrtf(norm_squared);
    }
    float grad_scale = (grad_clip > 0.0f && norm > grad_clip) ? grad_clip / norm : 1.0f;
    m->adam_t += 1;
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) {
        size_t n = m->param_sizes[i], off = m->param_offsets[i];
        if (n == 0) continue;
        float wd = param_is_decayed(i) ? weight_decay : 0.0f;
        adamw_update(m->params + off, m->master + off, m->grads + off, m->adam_m + off, m->adam_v + off, n, lr, beta1,
                     beta2, eps, wd, grad_scale, m->adam_t, st);
    }
    return norm;
}

// ----------------------------------------------------------------------------
// expert usage: per OmniMoE layer, the share of the N experts hit since the last reset and the
// KL divergence of their load from uniform (from the integer counts the layers keep)

// the experts counted per layer: N (omni), the E_t routed ones (moe), none for the dense kinds
static int model_counted_experts(const Model* m) {
    const ModelConfig* c = &m->config;
    return c->ffn_kind == FFN_OMNI ? c->num_experts : model_config_moe_routed(c);
}

static void model_reset_expert_counts(Model* m) {
    if (m->config.ffn_kind != FFN_OMNI && m->config.ffn_kind != FFN_MOE) return;
    expert_counts_reset(m->expert_counts, m->config.num_layers, model_counted_experts(m), m->stream);
}

// moe: the (L, E_t) counts since the last reset, into m->moe_counts_host (waits for the GPU)
static const int* model_moe_counts(const Model* m) {
    size_t n = (size_t)m->config.num_layers * model_config_moe_routed(&m->config);
    cudaCheck(cudaMemcpyAsync(m->moe_counts_host, m->expert_counts, n * sizeof(int), cudaMemcpyDeviceToHost,
                              m->stream));
    cudaCheck(cudaStreamSynchronize(m->stream));
    return m->moe_counts_host;
}

// moe (docs/design.md §10.5): after the optimizer step, each layer's FFN-expert bias moves by
// rate towards the mean load of the step's counts (all micro-batches and ranks), on the fp32
// master and its floatX copy. Replicated optimizer state only (main refuses it with ZeRO-1).
static void model_moe_bias_update(Model* m, float rate) {
    const ModelConfig* c = &m->config;
    if (c->ffn_kind != FFN_MOE || rate <= 0.0f) return;
    if (m->zero) {
        fprintf(stderr, "model_moe_bias_update: the bias update needs the whole fp32 master (no ZeRO-1)\n");
        exit(EXIT_FAILURE);
    }
    size_t off = m->param_offsets[PARAM_MOE_BIAS];
    moe_bias_update(m->master + off, m->params + off, m->expert_counts, c->num_layers, model_config_moe_routed(c),
                    c->moe_experts, rate, m->stream);
}

// usage[l], kl[l] of every OmniMoE layer from the counts since the last reset (a 2L-float copy)
static void model_expert_stats(const Model* m, float* usage, float* kl) {
    if (m->config.ffn_kind == FFN_MOE) {  // over the E FFN experts of each layer, on the host as the CPU trainer
        const int L = m->config.num_layers, Et = model_config_moe_routed(&m->config), E = m->config.moe_experts;
        const int* counts = model_moe_counts(m);
        for (int l = 0; l < L; l++) expert_load_stats(counts + (size_t)l * Et, E, &usage[l], &kl[l]);
        return;
    }
    if (m->config.ffn_kind != FFN_OMNI) return;
    int L = m->config.num_layers;
    expert_stats(m->expert_stats, m->expert_counts, L, m->config.num_experts, m->stream);
    cudaCheck(cudaMemcpyAsync(usage, m->expert_stats, L * sizeof(float), cudaMemcpyDeviceToHost, m->stream));
    cudaCheck(cudaMemcpyAsync(kl, m->expert_stats + L, L * sizeof(float), cudaMemcpyDeviceToHost, m->stream));
    cudaCheck(cudaStreamSynchronize(m->stream));
}

// ----------------------------------------------------------------------------
// the trainer's backend of the shared loop (llmc/train_loop.h): evaluation, sampling, checkpoints
// and the training step, on one GPU or on several (one process each)

#ifndef TESTING
#include "llmc/sampler.h"
#include "llmc/train_loop.h"

typedef struct {
    const TrainConfig* cfg;
    Model model;
    const MultiGpu* mg;
    GradReducer* reducer;        // several GPUs: the gradient buckets; one GPU: NULL
    DataLoader train_loader, val_loader;
    int val_batches;             // per rank (-1 = all)
    int grad_accum;
    float* init_params;          // -e <file>: its weights and BN statistics (NULL for a preset)
    float* init_bn;
    floatX* logits_row;          // (Vp) host, sampling
} GpuTrainer;

static void gpu_init_weights(void* ctx) {
    GpuTrainer* tr = (GpuTrainer*)ctx;
    if (tr->init_params) model_set_params(&tr->model, tr->init_params, tr->init_bn);
    else model_init_random(&tr->model, tr->cfg->seed);  // the same seed on every rank: identical replicas
}

static void gpu_train_step(void* ctx, int step, float lr, int t, const volatile sig_atomic_t* stop_local,
                           int log_failed_local, TrainStepResult* out) {
    (void)step;
    GpuTrainer* tr = (GpuTrainer*)ctx;
    const TrainConfig* cfg = tr->cfg;
    Model* m = &tr->model;
    GradReducer* reducer = tr->reducer;
    const int grad_accum = tr->grad_accum;
    model_zero_grad(m);
    model_reset_expert_counts(m);
    double loss_sum = 0.0;
    for (int micro = 0; micro < grad_accum; micro++) {
        dataloader_next_batch(&tr->train_loader);
        model_forward_for_backward(m, tr->train_loader.inputs, tr->train_loader.targets, cfg->B, cfg->T,
                                   1.0f / grad_accum);
        // --overlap-comm 1: the last micro-step starts each bucket's all-reduce during its backward
        // (the earlier ones only accumulate)
        GradReducer* overlap = cfg->overlap_comm && micro == grad_accum - 1 ? reducer : NULL;
        model_backward(m, tr->train_loader.inputs, 1.0f / grad_accum, overlap);
        loss_sum += model_mean_loss(m);
    }
    // the mean gradient over all ranks (--overlap-comm 0: all buckets now, after the backward),
    // then the step's loss, stop requests and log status of all ranks, in one reduction
    if (reducer) {
        if (!cfg->overlap_comm) grad_reducer_launch_all(reducer, m->stream);
        grad_reducer_wait(reducer, m->stream);  // the norm and AdamW below read the means
    }
    double reduced[3] = {loss_sum / grad_accum, *stop_local ? 1.0 : 0.0, log_failed_local ? 1.0 : 0.0};
    multi_gpu_sum_doubles(tr->mg, reduced, 3, m->stream);
    out->loss = (float)(reduced[0] / tr->mg->num_processes);
    out->stop = reduced[1] > 0.0;
    out->log_failed = reduced[2] > 0.0;
    m->adam_t = t - 1;  // the loop owns the count (a checkpoint restores it); model_update adds one
    out->norm = model_update(m, lr, cfg->beta1, cfg->beta2, cfg->eps, cfg->weight_decay, cfg->grad_clip);
    if (m->config.ffn_kind == FFN_OMNI || m->config.ffn_kind == FFN_MOE) {
        multi_gpu_allreduce_sum_int(tr->mg, m->expert_counts, (size_t)m->config.num_layers * model_counted_experts(m),
                                    m->stream);
    }
    model_moe_bias_update(m, cfg->moe_bias_rate);  // moe with --moe-bias-rate only: the step's loads of all ranks
    cudaCheck(cudaStreamSynchronize(m->stream));
}

// evaluation mode (BN running statistics): the mean loss of one batch (waits for the GPU)
static float gpu_forward_loss(void* ctx, const int* inputs, const int* targets, int B, int T) {
    Model* m = &((GpuTrainer*)ctx)->model;
    model_forward(m, inputs, targets, B, T, 0);
    return model_mean_loss(m);
}

// evaluation mode: the per-token losses of one batch, copied to the host (waits for the GPU)
static void gpu_forward_losses(void* ctx, float* losses, const int* inputs, const int* targets, int B, int T) {
    Model* m = &((GpuTrainer*)ctx)->model;
    model_forward(m, inputs, targets, B, T, 0);
    cudaCheck(cudaMemcpyAsync(losses, m->acts.losses, (size_t)B * T * sizeof(float), cudaMemcpyDeviceToHost,
                              m->stream));
    cudaCheck(cudaStreamSynchronize(m->stream));
}

// sampler.h's logits callback (rank 0): running statistics for BN, the row copied to the host.
// Samples run on the (1, T) window with T <= -t, within the activations of training.
static void gpu_sample_logits(void* ctx, const int* tokens, int T, int t, float* out) {
    GpuTrainer* tr = (GpuTrainer*)ctx;
    Model* m = &tr->model;
    const ModelConfig* c = &m->config;
    model_forward(m, tokens, NULL, 1, T, 0);
    cudaCheck(cudaMemcpy(tr->logits_row, m->acts.logits + (size_t)(t - 1) * c->padded_vocab_size,
                         c->padded_vocab_size * sizeof(floatX), cudaMemcpyDeviceToHost));
    for (int v = 0; v < c->vocab_size; v++) out[v] = (float)tr->logits_row[v];
}

// Checkpoints: master weights, AdamW state, BN statistics of every rank, data position and RNG.
// Sections as llmc/checkpoint.h lays them out: the weights and optimizer state once (every rank
// holds the same), num_bn_sets = num_processes BN sets (set r = rank r's running statistics),
// one DataLoaderState (all ranks stand at the same position) and rank 0's sampling RNG.
// Resume on a different process count G: rank r takes BN set r mod G_saved, and the loader
// rounds its position up to a whole round of G (dataloader.h).
// Every rank calls it (the BN statistics are gathered from all ranks); rank 0 writes the file.
// ZeRO-1: a sharded checkpoint instead (gpu_save_checkpoint_parts). Returns this rank's status
// (non-zero: its write failed, after its message); llmc/train_loop.h agrees on it.
static int gpu_save_checkpoint_parts(GpuTrainer* tr, const CheckpointInfo* info, const DataLoaderState* loader,
                                     const uint64_t* sample_rng, const float* bn_all, char* out_path);
static int gpu_save_checkpoint(void* ctx, const CheckpointInfo* info, const DataLoaderState* loader,
                               const uint64_t* sample_rng, char* out_path) {
    GpuTrainer* tr = (GpuTrainer*)ctx;
    const Model* m = &tr->model;
    const MultiGpu* mg = tr->mg;
    size_t P = m->num_params, NB = model_config_num_bn_stats(&m->config);
    int G = mg->num_processes, master_process = mg->process_rank == 0;
    float* bn_all = NULL;  // (G, NB) host, rank 0 only
    cudaCheck(cudaStreamSynchronize(m->stream));
    if (NB > 0) {
        float* gathered = (float*)cuda_malloc_or_die((size_t)G * NB * sizeof(float), "gathered BN statistics");
        multi_gpu_allgather_floats(mg, m->bn_stats, gathered, NB, m->stream);
        if (master_process) {
            bn_all = (float*)malloc_check((size_t)G * NB * sizeof(float));
            cudaCheck(cudaMemcpyAsync(bn_all, gathered, (size_t)G * NB * sizeof(float), cudaMemcpyDeviceToHost,
                                      m->stream));
        }
        cudaCheck(cudaStreamSynchronize(m->stream));
        cudaCheck(cudaFree(gathered));
    }
    if (m->zero || m->shard) {
        int failed = gpu_save_checkpoint_parts(tr, info, loader, sample_rng, bn_all, out_path);
        free(bn_all);
        return failed;
    }
    if (!master_process) return 0;
    float* params = (float*)malloc_check(P * sizeof(float));
    float* adam_m = (float*)malloc_check(P * sizeof(float));
    float* adam_v = (float*)malloc_check(P * sizeof(float));
    model_get_params(m, params, NULL);
    cudaCheck(cudaMemcpy(adam_m, m->adam_m, P * sizeof(float), cudaMemcpyDeviceToHost));
    cudaCheck(cudaMemcpy(adam_v, m->adam_v, P * sizeof(float), cudaMemcpyDeviceToHost));
    int failed = checkpoint_try_make_dir(tr->cfg->output_dir) != 0 ||
                 checkpoint_write(tr->cfg->output_dir, &m->config, info, params, adam_m, adam_v, bn_all, G, loader,
                                  sizeof(*loader), sample_rng, sizeof(*sample_rng), out_path) != 0;
    free(params);
    free(adam_m);
    free(adam_v);
    free(bn_all);
    return failed;
}

// ZeRO-1 and sharded tables (docs/sharding.md §4): every rank writes its shard as a part file at
// the same time, then rank 0 writes the manifest with the parts' sizes and hashes. Either all
// ranks write or none (the shards' finiteness and the directory are agreed first). A part or the manifest that
// cannot be written: rank 0 removes the parts of the step that were written (every rank's status
// reaches it with the table), so nothing of the step is left; the failing rank returns non-zero.
// The output directory must be one all ranks see.
static int gpu_save_checkpoint_parts(GpuTrainer* tr, const CheckpointInfo* info, const DataLoaderState* loader,
                                     const uint64_t* sample_rng, const float* bn_all, char* out_path) {
    const Model* m = &tr->model;
    const MultiGpu* mg = tr->mg;
    const int G = mg->num_processes, rank = mg->process_rank;
    const size_t E = m->opt_elems;  // ZeRO-1: the packed shard; sharded tables: the local layout
    const int mode = m->zero ? SHARD_MODE_ZERO : SHARD_MODE_TABLES;
    const char* dir = tr->cfg->output_dir;
    const float* device[3] = {m->master, m->adam_m, m->adam_v};
    float* host[3];
    char why[256] = "";
    int finite = 1;
    for (int k = 0; k < 3; k++) {
        host[k] = (float*)malloc_check(max_sz(E, 1) * sizeof(float));
        cudaCheck(cudaMemcpy(host[k], device[k], E * sizeof(float), cudaMemcpyDeviceToHost));
        finite &= ckpt_floats_finite_(host[k], E, k == 0 ? "the master weights" : "the AdamW state", why, sizeof(why));
    }
    int dir_failed = rank == 0 && checkpoint_try_make_dir(dir) != 0;
    double bad[2] = {finite ? 0.0 : 1.0, dir_failed ? 1.0 : 0.0};
    multi_gpu_sum_doubles(mg, bad, 2, m->stream);  // also: the directory exists before any part is written
    if (bad[0] > 0.0 || bad[1] > 0.0) {
        if (!finite) fprintf(stderr, "Error: rank %d: %s\n", rank, why);
        if (rank == 0 && bad[0] > 0.0) {
            fprintf(stderr, "Error: refusing to write checkpoint step %d: %d rank(s) hold non-finite optimizer state; "
                    "nothing is saved (the checkpoints already in %s are untouched)\n", info->step, (int)bad[0], dir);
        }
        for (int k = 0; k < 3; k++) free(host[k]);
        return !finite || dir_failed;
    }
    double start = train_loop_now_ms();
    CheckpointPartEntry entry = {0, 0};
    int part_failed = checkpoint_part_write(dir, info->step, &m->config, rank, G, mode, host[0], host[1],
                                            host[2], E, &entry) != 0;
    float seconds = (float)((train_loop_now_ms() - start) / 1e3);
    for (int k = 0; k < 3; k++) free(host[k]);
    // every rank's table entry and write time to rank 0 (an all-gather copies bits, no arithmetic)
    const int W = 6;  // floats per rank: the 16-byte entry, the seconds, the part's status
    float send[6] = {0};
    memcpy(send, &entry, sizeof(entry));
    send[4] = seconds;
    send[5] = part_failed ? 1.0f : 0.0f;
    float* d_buf = (float*)cuda_malloc_or_die((size_t)(G + 1) * W * sizeof(float), "checkpoint part table");
    float* all = (float*)malloc_check((size_t)G * W * sizeof(float));
    cudaCheck(cudaMemcpy(d_buf, send, W * sizeof(float), cudaMemcpyHostToDevice));
    multi_gpu_allgather_floats(mg, d_buf, d_buf + W, W, m->stream);
    cudaCheck(cudaMemcpyAsync(all, d_buf + W, (size_t)G * W * sizeof(float), cudaMemcpyDeviceToHost, m->stream));
    cudaCheck(cudaStreamSynchronize(m->stream));
    cudaCheck(cudaFree(d_buf));
    int failed = part_failed;
    if (rank == 0) {
        CheckpointPartEntry* table = (CheckpointPartEntry*)malloc_check((size_t)G * sizeof(CheckpointPartEntry));
        double slowest = 0.0, bytes = 0.0;
        int parts_failed = 0;
        for (int r = 0; r < G; r++) {
            memcpy(&table[r], all + (size_t)r * W, sizeof(CheckpointPartEntry));
            slowest = fmax(slowest, (double)all[(size_t)r * W + 4]);
            bytes += (double)table[r].bytes;
            parts_failed += all[(size_t)r * W + 5] != 0.0f;
        }
        int manifest_failed = parts_failed == 0 &&
                              checkpoint_manifest_write(dir, &m->config, info, bn_all, G, loader, sizeof(*loader),
                                                        sample_rng, sizeof(*sample_rng), G, mode, table,
                                                        out_path) != 0;
        if (parts_failed > 0 || manifest_failed) {
            checkpoint_parts_remove(dir, info->step, G);  // parts without a manifest are no checkpoint
            failed |= manifest_failed;
        } else {
            printf("checkpoint parts: %d x %.2f GB written in %.2f s (%.2f GB/s per rank, %.2f GB/s in all)\n", G,
                   bytes / G / 1e9, slowest, bytes / G / 1e9 / fmax(slowest, 1e-9), bytes / 1e9 / fmax(slowest, 1e-9));
        }
        free(table);
    }
    free(all);
    return failed;
}

// Before a rank other than 0 reads a checkpoint file itself: every such rank says whether it can
// open the file, and the ranks agree. The readers of llmc/checkpoint.h exit on a file they cannot
// open, and one rank alone must not stop while the others wait in a collective (docs/design.md
// §9.6): a single file that rank 0 wrote on its own host (a replicated run's, -o not shared) is
// the usual case. Returns how many ranks cannot (0: all can), after each one's message.
static int gpu_ranks_can_open(const MultiGpu* mg, const char* path, cudaStream_t st) {
    char why[200] = "";
    int ok = ckpt_regular_file_(path, why, sizeof(why));
    FILE* fp = ok ? fopen(path, "rb") : NULL;
    if (ok && fp == NULL) snprintf(why, sizeof(why), "cannot open: %s", strerror(errno));
    if (fp != NULL) fclose(fp);
    if (fp == NULL) {
        fprintf(stderr, "Error: rank %d cannot read the checkpoint \"%s\" (%s): every rank reads it itself, so the "
                "output directory (-o) must be one all ranks see\n", mg->process_rank, path, why);
    }
    double missing = fp == NULL ? 1.0 : 0.0;
    multi_gpu_sum_doubles(mg, &missing, 1, st);
    return (int)missing;
}

// ZeRO-1 resume from a sharded checkpoint: every rank reads its own shard from the parts (any
// P at write time: the ranges are re-sharded by llmc/checkpoint_parts.h), rounds its ranges to the
// floatX weights and all-gathers them. A part that fails on some rank (after its message) is
// agreed on before the gather: every rank then returns the count of ranks that failed (> 0).
static int gpu_load_shard_from_parts(Model* m, const MultiGpu* mg, const char* path) {
    const int unreadable = gpu_ranks_can_open(mg, path, m->stream);  // the manifest's reader exits on a missing file
    if (unreadable > 0) return unreadable;
    ModelConfig config;
    CheckpointInfo info;
    CheckpointPartEntry* table = checkpoint_manifest_read_table(path, &m->config, &config, &info);
    const ZeroShardMap* map = &m->zero->map;
    float* host[3];
    for (int k = 0; k < 3; k++) host[k] = (float*)malloc_check(max_sz(map->shard_elems, 1) * sizeof(float));
    double failed = checkpoint_parts_read_shard(path, &config, &info, table, map, host[0], host[1], host[2]) != 0;
    multi_gpu_sum_doubles(mg, &failed, 1, m->stream);
    if (failed > 0.0) {
        for (int k = 0; k < 3; k++) free(host[k]);
        free(table);
        return (int)failed;
    }
    float* device[3] = {m->master, m->adam_m, m->adam_v};
    for (int k = 0; k < 3; k++) {
        cudaCheck(cudaMemcpy(device[k], host[k], map->shard_elems * sizeof(float), cudaMemcpyHostToDevice));
    }
    for (int i = 0; i < map->num_ranges; i++) {  // the same rounding as AdamW's, so the weights come back bitwise
        const ZeroRange* rg = &map->ranges[i];
        upload_floatX(m->params + rg->offset, host[0] + rg->shard_offset, rg->count);
    }
    zero_allgather_params(m->zero, m->params, m->stream);
    for (int k = 0; k < 3; k++) free(host[k]);
    free(table);
    return 0;
}

// A replicated run resuming a sharded checkpoint: rank 0 assembles the flat params, m and v from
// every part. Returns 0, or -1 after the message naming the part (no exit: the ranks agree).
static int gpu_read_parts_logical(const ModelConfig* expected, const char* path, float* params, float* adam_m,
                                  float* adam_v) {
    ModelConfig config;
    CheckpointInfo info;
    CheckpointPartEntry* table = checkpoint_manifest_read_table(path, expected, &config, &info);
    int rc = checkpoint_parts_read_logical(path, &config, &info, table, params, adam_m, adam_v);
    free(table);
    return rc;
}

// Sharded tables: every rank reads its local master, m and v itself (the files must be visible to
// every rank): from the parts of a sharded-tables checkpoint, re-sharded from any P
// (checkpoint_parts_read_tables_local, only the parts holding its columns); from any other
// checkpoint (a single file, ZeRO-1 parts) the whole state, of which it keeps its pack. The
// floatX weights are rounded from the master, as AdamW rounds them: bitwise on a resume. A read
// that fails on some rank (after its message) is agreed on before any upload: every rank returns
// the count of ranks that failed (> 0), as gpu_load_shard_from_parts does.
static int gpu_load_tables_state(Model* m, const MultiGpu* mg, const char* path, const CheckpointInfo* info) {
    const int unreadable = gpu_ranks_can_open(mg, path, m->stream);
    if (unreadable > 0) return unreadable;
    const ExpertShardLayout* lay = &m->shard_layout;
    const size_t n = m->num_params;
    float* local[3];
    for (int k = 0; k < 3; k++) local[k] = (float*)malloc_check(n * sizeof(float));
    ModelConfig config;
    CheckpointInfo full_info;
    CheckpointPartEntry* table = NULL;
    if (info->num_parts > 0) table = checkpoint_manifest_read_table(path, &m->config, &config, &full_info);
    double failed = 0.0;  // this rank's read; summed over the ranks below, before any upload
    if (info->num_parts > 0 && full_info.shard_mode == SHARD_MODE_TABLES) {
        failed = checkpoint_parts_read_tables_local(path, &config, &full_info, table, lay, local[0], local[1],
                                                    local[2]) != 0;
    } else {
        float* full = (float*)malloc_check(lay->num_full * sizeof(float));
        for (int k = 0; k < 3 && failed == 0.0; k++) {  // one section at a time: one whole copy on the host
            if (table != NULL) {
                failed = checkpoint_parts_read_logical(path, &config, &full_info, table, k == 0 ? full : NULL,
                                                       k == 1 ? full : NULL, k == 2 ? full : NULL) != 0;
                if (failed != 0.0) break;
            } else {
                CheckpointInfo v2;  // a single file: its one section k (NULL skips the others)
                checkpoint_read_info(path, &config, &v2);
                checkpoint_read(path, &m->config, NULL, k == 0 ? full : NULL, k == 1 ? full : NULL,
                                k == 2 ? full : NULL, NULL, v2.num_bn_sets, NULL, (size_t)v2.loader_bytes, NULL,
                                (size_t)v2.rng_bytes);
            }
            expert_shard_local_pack(local[k], full, sizeof(float), lay);
        }
        free(full);
    }
    free(table);
    multi_gpu_sum_doubles(mg, &failed, 1, m->stream);
    if (failed == 0.0) {
        float* device[3] = {m->master, m->adam_m, m->adam_v};
        for (int k = 0; k < 3; k++) cudaCheck(cudaMemcpy(device[k], local[k], n * sizeof(float), cudaMemcpyHostToDevice));
        upload_floatX(m->params, local[0], n);
    }
    for (int k = 0; k < 3; k++) free(local[k]);
    return (int)failed;
}

// what rank 0 read from a checkpoint besides the big sections, sent to every rank
typedef struct {
    CheckpointInfo info;
    DataLoaderState loader;
    uint64_t sample_rng_state;
    int failed;  // rank 0 could not read a part (it said why): every rank stops
} ResumePoint;

// Every rank calls it. Rank 0 reads and verifies the checkpoint at path (the file may exist on
// rank 0's host alone) and the weights, optimizer state, BN sets and run state reach the other
// ranks by broadcast (ZeRO-1: each rank keeps its shard of the master weights, m and v). A
// sharded checkpoint (version 3) read by a ZeRO-1 run: every rank reads its shard from the parts
// itself (gpu_load_shard_from_parts; the parts must be visible to every rank); read by a
// replicated run, rank 0 assembles the whole state from the parts (gpu_read_parts_logical). A
// part that turns out corrupt (checkpoint_find_latest checks only the parts' sizes) stops every
// rank: the status travels with the resume point (replicated) or is summed before the gather
// (ZeRO-1), so all ranks skip the remaining collectives alike; returns non-zero then.
static int gpu_load_checkpoint(void* ctx, const char* path, CheckpointInfo* info, DataLoaderState* loader,
                               uint64_t* sample_rng) {
    GpuTrainer* tr = (GpuTrainer*)ctx;
    Model* m = &tr->model;
    const MultiGpu* mg = tr->mg;
    size_t P = m->num_params, NB = model_config_num_bn_stats(&m->config);
    cudaStream_t st = m->stream;
    ResumePoint rp;
    memset(&rp, 0, sizeof(rp));
    float* bn_all = NULL;  // (num_bn_sets, NB) host
    float *params = NULL, *adam_m = NULL, *adam_v = NULL;  // rank 0, host
    if (mg->process_rank == 0) {
        ModelConfig file_config;
        checkpoint_read_info(path, &file_config, &rp.info);  // the header: how many BN sets to expect
        int parts = rp.info.num_parts > 0;
        // ZeRO-1 from parts and sharded tables: rank 0 reads the manifest's (or file's) small sections only
        int from_parts = (m->zero && parts) || m->shard;
        if (!from_parts) {
            params = (float*)malloc_check(P * sizeof(float));
            adam_m = (float*)malloc_check(P * sizeof(float));
            adam_v = (float*)malloc_check(P * sizeof(float));
        }
        int sets = rp.info.num_bn_sets > 0 ? rp.info.num_bn_sets : 1;
        bn_all = (float*)malloc_check(max_sz((size_t)sets * NB, 1) * sizeof(float));
        // a sharded checkpoint: the manifest's sections here, the parts below (their reader returns)
        checkpoint_read(path, &m->config, &rp.info, parts ? NULL : params, parts ? NULL : adam_m,
                        parts ? NULL : adam_v, NB > 0 ? bn_all : NULL, rp.info.num_bn_sets, &rp.loader,
                        sizeof(rp.loader), &rp.sample_rng_state, sizeof(rp.sample_rng_state));
        if (parts && !from_parts) rp.failed = gpu_read_parts_logical(&m->config, path, params, adam_m, adam_v) != 0;
        rp.info.num_bn_sets = sets;
        if (!from_parts && !rp.failed) model_set_params(m, params, bn_all);
        if (!m->zero && !m->shard && !rp.failed) {
            cudaCheck(cudaMemcpy(m->adam_m, adam_m, P * sizeof(float), cudaMemcpyHostToDevice));
            cudaCheck(cudaMemcpy(m->adam_v, adam_v, P * sizeof(float), cudaMemcpyHostToDevice));
        }
    }
    multi_gpu_broadcast_host(mg, &rp, sizeof(rp), st);
    // a failed read (the same on every rank from here): no more collectives, the loop stops all
    int failed = rp.failed;
    // rank 0's weights (floatX and master) and optimizer state, bit for bit
    // path is rank 0's alone (the loop found it there): every rank that reads names the step's file
    char own_path[CHECKPOINT_PATH_MAX];
    checkpoint_path(own_path, sizeof(own_path), tr->cfg->output_dir, rp.info.step);
    if (!failed && m->shard) {
        failed = gpu_load_tables_state(m, mg, own_path, &rp.info);
    } else if (!failed && m->zero && rp.info.num_parts > 0) {
        failed = gpu_load_shard_from_parts(m, mg, own_path);
    } else if (!failed && m->zero) {  // a single file: each rank keeps its shard of rank 0's host copies
        multi_gpu_broadcast(mg, m->params, P * sizeof(floatX), st);
        zero_scatter_from_host(m->zero, params, m->master, st);
        zero_scatter_from_host(m->zero, adam_m, m->adam_m, st);
        zero_scatter_from_host(m->zero, adam_v, m->adam_v, st);
    } else if (!failed) {
        multi_gpu_broadcast(mg, m->params, P * sizeof(floatX), st);
        multi_gpu_broadcast(mg, m->master, P * sizeof(float), st);
        multi_gpu_broadcast(mg, m->adam_m, P * sizeof(float), st);
        multi_gpu_broadcast(mg, m->adam_v, P * sizeof(float), st);
    }
    free(params);
    free(adam_m);
    free(adam_v);
    if (failed) {
        free(bn_all);
        return failed;
    }
    if (NB > 0) {
        size_t bn_bytes = (size_t)rp.info.num_bn_sets * NB * sizeof(float);
        if (bn_all == NULL) bn_all = (float*)malloc_check(bn_bytes);
        multi_gpu_broadcast_host(mg, bn_all, bn_bytes, st);
        int set = mg->process_rank % rp.info.num_bn_sets;
        cudaCheck(cudaMemcpy(m->bn_stats, bn_all + (size_t)set * NB, NB * sizeof(float), cudaMemcpyHostToDevice));
    }
    cudaCheck(cudaStreamSynchronize(st));
    free(bn_all);
    m->adam_t = rp.info.adam_t;
    *info = rp.info;
    *loader = rp.loader;
    *sample_rng = rp.sample_rng_state;
    return 0;
}

static void gpu_expert_stats(void* ctx, float* usage, float* kl) {
    model_expert_stats(&((GpuTrainer*)ctx)->model, usage, kl);
}

// moe: per layer the share of the step's pairs that went to FFN, zero, copy and constant experts
// (4 floats per layer, in that order), from the counts, as the CPU trainer computes them
static void gpu_expert_kind_shares(void* ctx, float* shares) {
    const Model* m = &((GpuTrainer*)ctx)->model;
    const ModelConfig* c = &m->config;
    const int L = c->num_layers, Et = model_config_moe_routed(c);
    const int E = c->moe_experts, Kc = c->moe_const, Kp = c->moe_copy;
    const int* counts = model_moe_counts(m);
    for (int l = 0; l < L; l++) {
        long long by_kind[4] = {0, 0, 0, 0}, total = 0;  // FFN, zero, copy, constant
        for (int e = 0; e < Et; e++) {
            long long n = counts[(size_t)l * Et + e];
            by_kind[e < E ? 0 : (e < E + Kc ? 3 : (e < E + Kc + Kp ? 2 : 1))] += n;
            total += n;
        }
        for (int j = 0; j < 4; j++) shares[4 * l + j] = total > 0 ? (float)((double)by_kind[j] / total) : 0.0f;
    }
}

// rank 0's weights and BN statistics. Every rank calls it (ZeRO-1 gathers the master weights).
// Returns rank 0's write status (0 on the others); llmc/train_loop.h agrees on it.
static int gpu_write_model(void* ctx, const char* path) {
    GpuTrainer* tr = (GpuTrainer*)ctx;
    const Model* m = &tr->model;
    int master_process = tr->mg->process_rank == 0;
    if (!master_process && !m->zero && !m->shard) return 0;
    size_t NB = model_config_num_bn_stats(&m->config);
    float* params = master_process ? (float*)malloc_check(model_config_num_params(&m->config) * sizeof(float)) : NULL;
    float* bn = (float*)malloc_check(max_sz(NB, 1) * sizeof(float));
    model_get_params(m, params, bn);
    int failed = master_process && model_file_write(path, &m->config, params, bn) != 0;
    free(params);
    free(bn);
    return failed;
}

static void gpu_sum_ranks(void* ctx, double* values, int n) {
    GpuTrainer* tr = (GpuTrainer*)ctx;
    multi_gpu_sum_doubles(tr->mg, values, n, tr->model.stream);
}

// ----------------------------------------------------------------------------
// main

int main(int argc, char** argv) {
    TrainConfig cfg;
    train_config_defaults(&cfg);
    // with no flags: a small OmniMoE model (d6: 6 layers, C=384, N=4096 experts, k=16) that
    // trains on the committed tinyshakespeare shards in well under a minute on one H100
    strcpy(cfg.model, "d6");
    cfg.B = 8;
    cfg.T = 1024;
    cfg.num_steps = 200;
    cfg.learning_rate = 1e-3f;
    cfg.warmup_steps = 20;
    cfg.val_every = 50;
    cfg.val_max_batches = -1;
    cfg.sample_every = 100;
    train_config_parse(&cfg, argc, argv);
    if (cfg.plan_gpus > 0) return train_config_plan_main(&cfg, (int)sizeof(floatX));  // no GPU, no MPI

    // one process per GPU: MPI, a shared id file (-pn/-pr/-pf) or a single process; sets the GPU
    MultiGpu mg;
    multi_gpu_init(&mg, cfg.launch_processes, cfg.launch_rank, cfg.launch_id_file);
    cfg.num_processes = mg.num_processes;
    cfg.process_rank = mg.process_rank;
    const int G = mg.num_processes;
    const int master_process = mg.process_rank == 0;  // prints, logs and writes files
    cudaDeviceProp props;
    cudaCheck(cudaGetDeviceProperties(&props, mg.local_rank));

    // the model: a preset (+ flags) or a model file (every rank reads it)
    GpuTrainer tr;
    memset(&tr, 0, sizeof(tr));
    tr.cfg = &cfg;
    tr.mg = &mg;
    ModelConfig config;
    if (!train_config_model(&cfg, &config)) {
        model_file_read(cfg.model, &config, &tr.init_params, &tr.init_bn);
        train_config_check_file_model(&cfg, &config);
    }
    train_config_validate(&cfg, &config);
    if (config.ffn_kind == FFN_MOE && cfg.moe_bias_rate > 0.0f && cfg.zero && G > 1) {
        // the bias update (docs/design.md §10.5) writes the fp32 master, which ZeRO-1 shards
        fprintf(stderr, "Error: flag --moe-bias-rate %g with --zero 1 on %d processes: the loss-free balancing bias "
                "update needs the whole fp32 master on every rank; use --zero 0 or --moe-bias-rate 0\n",
                cfg.moe_bias_rate, G);
        exit(EXIT_FAILURE);
    }
    if (cfg.shard_experts && cfg.zero) {  // docs/sharding.md §3.4: the ZeRO-1 map would have to skip U and V
        fprintf(stderr, "Error: flags --shard-experts 1 and --zero 1 together: not implemented yet (the ZeRO-1 shard "
                "map still covers U and V); use one of them (--shard-experts 1 alone already cuts U and V, most of "
                "the state, to 1/%d per GPU)\n", G);
        exit(EXIT_FAILURE);
    }
    if (cfg.sample_every > 0 && cfg.gen_tokens > cfg.T) {
        // samples run on the (B, T) activations of training
        fprintf(stderr, "Error: bad value \"%d\" for flag -g (--gen-tokens): the GPU trainer samples at most -t %d "
                "tokens\n", cfg.gen_tokens, cfg.T);
        exit(EXIT_FAILURE);
    }
    tr.grad_accum = train_config_grad_accum_steps(&cfg);
    long long tokens_per_step = train_config_total_batch_tokens(&cfg);

    if (master_process) {
        printf("+---------------------------------------------------------------\n");
        printf("| omnimoe CUDA trainer on %s (%s)\n", props.name, FLOATX_NAME);
        if (G > 1) printf("| %d processes, one GPU each (launch: %s)\n", G, multi_gpu_launch_name(mg.launch));
        model_config_print(&config);
        train_config_print(&cfg);
        printf("| micro-batch %dx%d per process, grad accumulation %d, tokens per step %lld\n", cfg.B, cfg.T,
               tr.grad_accum, tokens_per_step);
        printf("| step options: GELU fusion %d, GEMM tuning %s, weight-gradient GEMMs %s\n", cfg.gelu_fusion,
               cfg.matmul_tune ? "on" : "off", train_config_overlap_dweight(&cfg) ? "on a second stream" : "in line");
    }

    Model* model = &tr.model;
    // --zero 1 on several GPUs: this rank's shard of the optimizer state (llmc/zero.cuh); on one
    // process there is nothing to shard and the replicated path runs unchanged
    ZeroOptimizer zero_storage;
    ZeroOptimizer* zero = NULL;
    if (cfg.zero && G > 1) {
        zero_init(&zero_storage, &config, &mg);
        zero = &zero_storage;
    } else if (cfg.zero && master_process) {
        printf("| --zero 1 on one process: nothing to shard, the optimizer state stays whole\n");
    }
    // --shard-experts 1 (several GPUs; train_config_validate refused it elsewhere): the exchanges
    // of the column-sharded expert tables over the job's NCCL communicator
    ExpertShardComm shard_comm;
    const ExpertShardComm* shard = NULL;
    if (cfg.shard_experts) {
        shard_comm = expert_shard_comm_nccl(&mg);
        shard = &shard_comm;
    }
    matmul_gelu_fused = cfg.gelu_fusion >= 1;  // --gelu-fusion: the GELU in cuBLASLt epilogues (llmc/matmul.cuh)
    static_assert(MOE_GEMM_LOOP == 0 && MOE_GEMM_CUBLAS == 1 && MOE_GEMM_CUTLASS == 2, "--moe-gemm's word order");
    moe_gemm_backend = cfg.moe_gemm;            // --moe-gemm loop|cublas|cutlass (llmc/moe_experts.cuh)
    moe_gemm_token_reads = cfg.moe_token_reads;  // --moe-token-reads: CUTLASS's GEMMs read x and dy through the schedule
#if !defined(HAVE_CUTLASS_GROUPED_GEMM)
    if (cfg.moe_gemm == MOE_GEMM_CUTLASS) {
        fprintf(stderr, "Error: --moe-gemm cutlass: this train_omnimoe was built without CUTLASS (build it with "
                        "`make -B USE_CUTLASS=1` after `bash dev/prepare_carry.sh cutlass`; bf16 only)\n");
        exit(EXIT_FAILURE);
    }
#endif
    matmul_dgelu_fused = cfg.gelu_fusion >= 2;
#if defined(HAVE_CUTLASS_GELU_GEMM)
    matmul_gelu_cutlass = cfg.gelu_fusion == 3;  // both GELU GEMMs with CUTLASS's epilogues (llmc/matmul_gelu_cutlass.h)
#else
    if (cfg.gelu_fusion == 3) {
        fprintf(stderr, "Error: --gelu-fusion 3: this train_omnimoe was built without CUTLASS (build it with "
                        "`make -B USE_CUTLASS=1` after `bash dev/prepare_carry.sh cutlass`; bf16 only)\n");
        exit(EXIT_FAILURE);
    }
#endif
    matmul_tune = cfg.matmul_tune;  // --matmul-tune: the fastest cuBLASLt candidate with the same bits
    if (zero || shard) {
        model_build_sharded(model, &config, cfg.B, cfg.T, cfg.expert_exec, cfg.attention, cfg.recompute, zero, shard);
    } else {
        model_build(model, &config, cfg.B, cfg.T, cfg.expert_exec, cfg.attention, cfg.recompute);
    }
    model_set_overlap_dweight(model, train_config_overlap_dweight(&cfg));  // --overlap-dweight (validated against -r above)
    if (shard && master_process) {
        printf("| sharded expert tables: U and V of (L*N, C/%d) per process, %zu of %zu parameters here\n", G,
               model->num_params, model_config_num_params(&config));
    }
    if (zero && master_process) {
        printf("| ZeRO-1: fp32 master, m and v of %zu of %zu parameters per process (%zu in replicated tails)\n",
               zero->map.shard_elems, model->num_params, zero_shard_tail_elems(&zero->map));
    }
    model->plan.num_gpus = G;  // the buffers of every GPU of the run
    model->moe_aux_coef = cfg.moe_aux;  // moe run settings (docs/design.md §10.3)
    model->moe_zc_weight = cfg.moe_zc_weight;
    if (master_process) memory_plan_print(&model->plan, stdout);  // this GPU's buffers, CUB's own storage
    // several GPUs: the gradient buckets and their stream; one GPU: none, and no NCCL call at all
    GradReducer reducer_storage;
    if (G > 1) {
        model_grad_reducer_init(model, &reducer_storage, &mg);
        tr.reducer = &reducer_storage;
        if (master_process) {
            printf("| gradient mean: %d NCCL buckets per step (one per layer, then the embeddings), %s%s%s\n",
                   tr.reducer->num_buckets, zero ? "reduce-scattered (ZeRO-1), " : "",
                   shard ? "U and V excluded (sharded), " : "", cfg.overlap_comm ? "overlapped with the backward (--overlap-comm 1)"
                                                             : "after the backward (--overlap-comm 0)");
        }
    }
    size_t free_bytes, total_bytes;
    cudaCheck(cudaMemGetInfo(&free_bytes, &total_bytes));
    if (master_process) {
        printf("| GPU memory in use: %.1f GiB of %.1f GiB\n", (total_bytes - free_bytes) / 1073741824.0,
               total_bytes / 1073741824.0);
        printf("+---------------------------------------------------------------\n");
    }

    // each rank reads its own slice of the windows (dataloader.h)
    dataloader_init(&tr.train_loader, cfg.train_data_pattern, cfg.B, cfg.T, mg.process_rank, G, cfg.shuffle, cfg.seed,
                    config.vocab_size);
    int have_val = cfg.val_data_pattern[0] != '\0' && cfg.val_every > 0;  // -v 0: no validation at all
    if (have_val) {
        dataloader_init(&tr.val_loader, cfg.val_data_pattern, cfg.B, cfg.T, mg.process_rank, G, 0, 0,
                        config.vocab_size);
    }
    // -m batches in all: ceil(-m / G) on each rank (-m divisible by G: the same windows as on one GPU)
    tr.val_batches = cfg.val_max_batches < 0 ? -1 : (cfg.val_max_batches + G - 1) / G;
    if (master_process) {
        printf("train: %lld batches of %dx%d per epoch and rank", (long long)dataloader_num_batches(&tr.train_loader),
               cfg.B, cfg.T);
        if (have_val) printf(", val: %lld batches per rank", (long long)dataloader_num_batches(&tr.val_loader));
        printf("\n");
    }
    Tokenizer tokenizer;
    memset(&tokenizer, 0, sizeof(tokenizer));
    // rank 0 reads it (the others may not see the file); train_loop_run stops every rank when it is malformed
    int tokenizer_failed = master_process && tokenizer_init(&tokenizer, "data/gpt2_tokenizer.bin") != 0;
    tr.logits_row = (floatX*)malloc_check((size_t)config.padded_vocab_size * sizeof(floatX));

    TrainBackend be;
    memset(&be, 0, sizeof(be));
    be.ctx = &tr;
    be.rank = mg.process_rank;
    be.num_processes = G;
    be.num_omni_layers = config.ffn_kind == FFN_OMNI || config.ffn_kind == FFN_MOE ? config.num_layers : 0;
    be.flops_per_token_fwd = model_config_flops_per_token_fwd(&config, cfg.T);
    be.peak_flops = cuda_peak_bf16_flops(props.name) * G;
    be.vocab_size = config.vocab_size;
    be.model_config = &model->config;
    be.sample_T = cfg.gen_tokens < cfg.T ? cfg.gen_tokens : cfg.T;
    be.sample_all_ranks = shard != NULL;  // the experts' exchanges need every rank in every forward
    be.init_weights = gpu_init_weights;
    be.train_step = gpu_train_step;
    be.forward_loss = gpu_forward_loss;
    be.forward_losses = gpu_forward_losses;
    be.sample_logits = gpu_sample_logits;
    be.save_checkpoint = gpu_save_checkpoint;
    be.load_checkpoint = gpu_load_checkpoint;
    be.expert_stats = gpu_expert_stats;
    if (config.ffn_kind == FFN_MOE) be.expert_kind_shares = gpu_expert_kind_shares;
    be.write_model = gpu_write_model;
    be.sum_ranks = gpu_sum_ranks;
    TrainLoop loop = {&cfg, &be, &tr.train_loader, &tr.val_loader, tr.val_batches, &tokenizer, have_val,
                      tokenizer_failed};
    int rc = train_loop_run(&loop);

    free(tr.init_params);
    free(tr.init_bn);
    free(tr.logits_row);
    if (master_process) tokenizer_free(&tokenizer);
    dataloader_free(&tr.train_loader);
    if (have_val) dataloader_free(&tr.val_loader);
    if (tr.reducer) grad_reducer_free(tr.reducer);
    model_free(model);
    if (zero) zero_free(zero);
    matmul_free();
    multi_gpu_finalize(&mg);
    return rc;
}
#endif
