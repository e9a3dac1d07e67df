/*
 * memory_plan.h - the device memory of one GPU of the CUDA trainer, buffer by buffer
 * (docs/design.md §4.5). The one list that model_build (train_omnimoe.cu) allocates from, so a
 * run's plan is its allocation by construction, and that --plan prints for any model, batch,
 * GPU count and sharding mode without a GPU. Plain C: compiles with gcc -std=c11 and nvcc.
 *
 * Defines:
 *   MemBufferId              every device buffer, in model_build's allocation order
 *   MemKind                  weights, gradients, fp32 master, AdamW m, v, other state,
 *                            activations, workspace: what the plan sums and prints
 *   PlanKernelSizes          the kernels' scratch and the OmniMoE (or moe) layer's saved state / workspace
 *   plan_kernel_sizes()      those sizes from the kernels' formulas, for a given CUB sort storage
 *   plan_table_sizes()       the column-sharded tables' saved state per layer and work buffer
 *   plan_cub_estimate()      CUB's radix-sort storage without a GPU: 8 bytes per pair + 1 MiB
 *   memory_plan_build()      the list for (model, B, T, floatX bytes, GPUs P, mode, recompute, kernel sizes)
 *   memory_plan_print()      the table per GPU, then one machine-readable "plan_bytes" line
 *   memory_plan_main()       --plan: build and print with the estimate, no GPU; the exit status
 *   train_config_plan_main() --plan of either trainer: the model of -e (preset or file header),
 *                            the flags' checks for P GPUs, then memory_plan_main
 *
 * Modes (docs/sharding.md §1.3; --zero, --shard-experts): replicated (16 bytes per parameter on
 * every GPU), zero1 (fp32 master, m, v of this rank's shard, counted by zero_shard_map of
 * llmc/zero_shard.h, docs/sharding.md §2), tables (U and V and everything of them cut by columns:
 * C/P channels of every expert on each GPU, docs/sharding.md §3.1; a GPU then schedules the pairs
 * of all P GPUs and keeps their x columns: plan_table_sizes), and both. With P = 1 every mode is
 * the replicated one. The replicated, ZeRO-1 and tables lists are model_build's (ZeRO-1 + tables
 * is a plan only: the trainer refuses the combination for now).
 *
 * Recomputation (-r, docs/design.md §4.5): with 1 the FFN activation (fch_act), with 2 also ln1 and
 * ln2, are one layer's buffer instead of L layers': the backward recomputes each layer's from what
 * stays saved (fch; the residual stream and mean/rstd) into that one buffer.
 *
 * The kernel formulas here mirror the scratch-size functions of the GPU headers (llmc/, .cuh: a
 * host program cannot include those); model_build compares them with the headers' own numbers at
 * every start and refuses to run when they differ, so a kernel change cannot leave the plan behind.
 * The one number a host cannot know is CUB's temporary storage for the expert sort: a run asks
 * CUB, --plan uses plan_cub_estimate (an upper bound at the shapes of docs/sharding.md).
 */
#ifndef OMNIMOE_MEMORY_PLAN_H
#define OMNIMOE_MEMORY_PLAN_H

#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include "config.h"
#include "args.h"
#include "checkpoint.h"
#include "zero_shard.h"

#define MEMORY_PLAN_MARGIN_BYTES ((size_t)1 << 30)  // CUDA context growth, cuBLAS workspaces, NCCL

enum { PLAN_MODE_REPLICATED = 0, PLAN_MODE_ZERO1 = 1, PLAN_MODE_TABLES = 2, PLAN_MODE_ZERO1_TABLES = 3 };

typedef enum {
    MEM_WEIGHTS, MEM_GRADS, MEM_MASTER, MEM_ADAM_M, MEM_ADAM_V, MEM_OTHER_STATE, MEM_ACTIVATIONS, MEM_WORKSPACE,
    MEM_NUM_KINDS
} MemKind;

typedef enum {
    // allocated by model_build's loop, in this order (train_omnimoe.cu)
    MEMBUF_PARAMS, MEMBUF_GRADS, MEMBUF_MASTER, MEMBUF_ADAM_M, MEMBUF_ADAM_V, MEMBUF_BN_STATS, MEMBUF_NORM,
    MEMBUF_ENCODED, MEMBUF_LN1, MEMBUF_LN1_MEAN, MEMBUF_LN1_RSTD, MEMBUF_QKV, MEMBUF_ATTY, MEMBUF_ATT_LSE,
    MEMBUF_RESIDUAL2, MEMBUF_LN2, MEMBUF_LN2_MEAN, MEMBUF_LN2_RSTD, MEMBUF_FCH, MEMBUF_FCH_ACT, MEMBUF_RESIDUAL3,
    MEMBUF_LNF, MEMBUF_LNF_MEAN, MEMBUF_LNF_RSTD, MEMBUF_LOGITS, MEMBUF_LOSSES, MEMBUF_LOSS_SUM,
    MEMBUF_SUBLAYER_OUT, MEMBUF_INPUTS, MEMBUF_TARGETS, MEMBUF_DRESIDUAL, MEMBUF_DSUB, MEMBUF_DWIDE,
    MEMBUF_DHIDDEN, MEMBUF_SCRATCH, MEMBUF_ATTENTION_WS,
    MEMBUF_NUM_MODEL,  // the buffers above are model_build's loop; the ones below are allocated elsewhere
    // omni: the layers' saved router/schedule blocks (omni_layer_create), their workspace
    // (omni_workspace_create), the expert counts and statistics (model_build)
    MEMBUF_OMNI_SAVED = MEMBUF_NUM_MODEL, MEMBUF_OMNI_WORKSPACE, MEMBUF_EXPERT_COUNTS, MEMBUF_EXPERT_STATS,
    // column-sharded tables (plan_table_sizes): the layers' saved exchange state, the one work buffer
    MEMBUF_TABLE_SAVED, MEMBUF_TABLE_WORK,
    MEMBUF_COUNT
} MemBufferId;

typedef struct {
    const char* what;
    size_t bytes;        // on one GPU
    size_t table_bytes;  // of which the expert tables U and V (state kinds only)
    MemKind kind;
} MemBuffer;

typedef struct {
    size_t scratch;         // the largest scratch of any kernel (one buffer, reused)
    size_t omni_saved;      // one OmniMoE layer's saved router and schedule state (omni_layer_saved_bytes; moe: moe_layer_saved_bytes)
    size_t omni_workspace;  // what omni_workspace_create allocates (omni_workspace_bytes; moe: moe_workspace_bytes)
    size_t attention_ws;    // cuDNN's SDPA workspace (--attention cudnn; 0 for our kernels)
    size_t table_saved;     // column-sharded tables: one layer's experts_shard_saved_bytes
    size_t table_work;      // ... and the layers' one experts_shard_work_bytes
} PlanKernelSizes;

typedef struct {
    ModelConfig config;
    int B, T, floatx_bytes, num_gpus, mode;
    int recompute;          // -r: 0 keep all, 1 one layer of fch_act, 2 also of ln1 and ln2
    size_t params_local;    // parameters whose weights and gradients this GPU holds
    size_t opt_local;       // parameters whose fp32 master, m and v this GPU holds
    size_t tables_local;    // of params_local: U and V elements
    size_t opt_tables_local;
    MemBuffer buf[MEMBUF_COUNT];
    size_t kind_bytes[MEM_NUM_KINDS], kind_table_bytes[MEM_NUM_KINDS];
    size_t margin, total;   // total: every buffer plus the margin
    int cub_estimated;      // 1: CUB's sort storage is plan_cub_estimate, 0: CUB's own number
} MemoryPlan;

static inline const char* memory_plan_mode_name(int mode) {
    switch (mode) {
        case PLAN_MODE_ZERO1: return "zero1";
        case PLAN_MODE_TABLES: return "tables";
        case PLAN_MODE_ZERO1_TABLES: return "zero1+tables";
        default: return "replicated";
    }
}

// ----------------------------------------------------------------------------
// the kernels' sizes (mirrors of the llmc/*.cuh functions named in each line)

#define PLAN_MATMUL_DBIAS_ROWS_PER_BLOCK 64   // matmul.cuh MATMUL_DBIAS_ROWS_PER_BLOCK
#define PLAN_LAYERNORM_BWD_ROWS_PER_BLOCK 32  // layernorm.cuh LAYERNORM_BWD_ROWS_PER_BLOCK
#define PLAN_ATTN_T_PAD 64                    // attention.cuh ATTN_T_PAD
#define PLAN_GLOBAL_NORM_MAX_BLOCKS 1024      // global_norm.cuh GLOBAL_NORM_MAX_BLOCKS
#define PLAN_ROUTER_BN_CHUNK 128              // router.cuh ROUTER_BN_CHUNK
#define PLAN_EXPERTS_SEG_CHUNK 64             // experts.cuh EXPERTS_SEG_CHUNK
#define PLAN_MOE_ROUTER_CHUNK 128             // moe_router.cuh MOE_ROUTER_CHUNK
#define PLAN_MOE_CONST_CHUNK 256              // moe_experts.cuh MOE_CONST_CHUNK

static inline size_t plan_align256(size_t bytes) { return (bytes + 255) & ~(size_t)255; }
static inline size_t plan_ceil_div(size_t a, size_t b) { return (a + b - 1) / b; }
static inline size_t plan_max(size_t a, size_t b) { return a > b ? a : b; }

// CUB's DeviceRadixSort/DeviceScan storage for `pairs` keys and values, without a GPU to ask: the
// alternate key and value buffers (4 + 4 bytes per pair) and 1 MiB for histograms and look-back
static inline size_t plan_cub_estimate(size_t pairs) { return 8 * pairs + ((size_t)1 << 20); }

// pairs: the (token, expert) pairs of one layer's own tokens (BT*k); expert_cols: the channels of
// U and V its unsharded experts compute with (C); cub_bytes: CUB's
// storage for that many pairs (scheduler_cub_bytes on a GPU, plan_cub_estimate without);
// moe_xg_recomputed: the moe layers keep no gathered expert inputs (MoeDims.recompute_xg: -r >= 1,
// or the CUDA build's grouped GEMMs read x's rows through the schedule; the estimate without a
// GPU passes -r alone, an upper bound for CUTLASS builds)
static inline PlanKernelSizes plan_kernel_sizes(const ModelConfig* c, int B, int T, int floatx_bytes, size_t pairs,
                                                size_t expert_cols, size_t cub_bytes, int moe_xg_recomputed) {
    const size_t BT = (size_t)B * T, C = c->channels, Vp = c->padded_vocab_size;
    const size_t FI = model_config_ffn_in_width(c), NH = c->num_heads, F = sizeof(float), X = floatx_bytes;
    size_t s = 0;
    s = plan_max(s, plan_ceil_div(BT, PLAN_MATMUL_DBIAS_ROWS_PER_BLOCK) * plan_max(plan_max(3 * C, FI), plan_max(C, Vp)) * F);  // matmul_backward_scratch_bytes
    s = plan_max(s, plan_ceil_div(BT, PLAN_LAYERNORM_BWD_ROWS_PER_BLOCK) * 2 * C * F);  // layernorm_backward_scratch_bytes
    s = plan_max(s, 2 * (size_t)B * NH * (plan_ceil_div(T, PLAN_ATTN_T_PAD) * PLAN_ATTN_T_PAD) * F);  // attention_backward_scratch_bytes
    s = plan_max(s, PLAN_GLOBAL_NORM_MAX_BLOCKS * F);  // global_norm_scratch_bytes
    PlanKernelSizes k = {0, 0, 0, 0, 0, 0};
    if (c->ffn_kind == FFN_OMNI) {  // omni_layer_scratch_bytes: router, scheduler, experts
        const size_t R = 2 * (size_t)c->router_n, chunks = plan_ceil_div(BT, PLAN_ROUTER_BN_CHUNK);
        s = plan_max(s, 2 * plan_align256(chunks * R * F));  // router_forward_scratch_bytes
        s = plan_max(s, plan_align256(BT * R * F) + plan_align256(BT * R * X) + 2 * plan_align256(chunks * R * F));  // router_backward_scratch_bytes
        s = plan_max(s, plan_align256(cub_bytes) + 2 * plan_align256(pairs * sizeof(int)));  // scheduler_scratch_bytes
        s = plan_max(s, 2 * plan_align256(pairs * F)
                            + 4 * plan_align256(plan_ceil_div(pairs, PLAN_EXPERTS_SEG_CHUNK) * expert_cols * F));  // experts_backward_scratch_bytes
        const size_t A = pairs < (size_t)c->num_experts ? pairs : (size_t)c->num_experts;  // scheduler_max_active
        k.omni_saved = 2 * plan_align256(BT * R * F) + 2 * plan_align256(R * F) + 3 * plan_align256(pairs * 4)
                     + 3 * plan_align256(pairs * sizeof(int)) + plan_align256(A * sizeof(int))
                     + plan_align256((A + 1) * sizeof(int)) + sizeof(int);  // omni_layer_saved_bytes
        k.omni_workspace = BT * c->top_k * F + (size_t)c->num_experts * sizeof(int);  // omni_workspace_bytes
    }
    if (c->ffn_kind == FFN_MOE) {  // moe_layer.cuh: the same two entries hold the moe layers' state
        const size_t Et = (size_t)model_config_moe_routed(c), P = pairs, Ie = c->ffn_hidden, I4 = sizeof(int);
        const size_t RH = c->moe_router == MOE_ROUTER_TANH ? (size_t)MOE_TANH_WIDTH * Et : 0, PE = c->moe_experts ? P : 0;
        const size_t A = P < Et ? P : Et;  // scheduler_max_active
        s = plan_max(s, plan_align256(cub_bytes) + 2 * plan_align256(P * I4));  // scheduler_scratch_bytes
        if (c->moe_gate_res) s = plan_max(s, plan_ceil_div(BT, PLAN_MOE_ROUTER_CHUNK) * Et * Et * F);  // moe_gate_residual_scratch_bytes
        s = plan_max(s, (size_t)c->moe_const * plan_ceil_div(P, PLAN_MOE_CONST_CHUNK) * 3 * C * F);  // moe_const_grads_scratch_bytes
        k.omni_saved = 2 * plan_align256(BT * Et * F) + plan_align256(BT * RH * X) + plan_align256(P * I4)
                     + plan_align256(P * F) + plan_align256(BT * F) + plan_align256(P * 2 * F) + 3 * plan_align256(P * I4)
                     + plan_align256(A * I4) + plan_align256((A + 1) * I4) + plan_align256(I4) + plan_align256(P * I4)
                     + plan_align256(Et * I4) + plan_align256((Et + 1) * I4) + plan_align256(moe_xg_recomputed ? 0 : PE * C * X)
                     + plan_align256(PE * 2 * Ie * X);  // moe_layer_saved_bytes
        k.omni_workspace = plan_align256(PE * C * X) + plan_align256(PE * Ie * X) + plan_align256(PE * 2 * Ie * X)
                         + 3 * plan_align256(BT * Et * F) + plan_align256(BT * Et * X) + plan_align256(BT * RH * X)
                         + plan_align256(P * 2 * F) + plan_align256(P * F) + plan_align256(Et * sizeof(double))
                         + 3 * plan_max(c->moe_experts, 1) * sizeof(void*);  // moe_workspace_bytes
    }
    k.scratch = s;
    return k;
}

// The column-sharded tables' buffers on one of P GPUs (docs/sharding.md §3.1; mirrors of
// llmc/experts_shard.cuh): per layer the idx, gate and s of all A = P*BT*k pairs and the x columns
// of all P*BT tokens (experts_shard_saved_bytes), and one work buffer (experts_shard_work_bytes)
// whose scratch serves the schedule of the A pairs (cub_bytes: CUB's storage for A pairs) and the
// dU/dV segment sums. The layer's own router and schedule state stays plan_kernel_sizes' (BT*k).
static inline void plan_table_sizes(PlanKernelSizes* k, const ModelConfig* c, int B, int T, int floatx_bytes, int P,
                                    size_t cub_bytes) {
    const size_t BT = (size_t)B * T, K = c->top_k, A = (size_t)P * BT * K, Tall = (size_t)P * BT;
    const size_t cols = (size_t)c->channels / P, X = floatx_bytes, F = sizeof(float), I4 = sizeof(int);
    const size_t f = A > Tall * cols ? A : Tall * cols;
    const size_t amax = A < (size_t)c->num_experts ? A : (size_t)c->num_experts;  // scheduler_max_active
    const size_t sched = plan_align256(cub_bytes) + 2 * plan_align256(A * I4);     // scheduler_scratch_bytes
    const size_t grads = 2 * plan_align256(A * F) + 4 * plan_align256(plan_ceil_div(A, PLAN_EXPERTS_SEG_CHUNK) * cols * F);
    k->table_saved = plan_align256(A * I4) + 2 * plan_align256(A * F) + plan_align256(Tall * cols * X);
    k->table_work = plan_align256(BT * c->channels * X) + plan_align256(Tall * cols * X) + 2 * plan_align256(f * F) +
                    2 * plan_align256(BT * K * F) + plan_align256(A * F) + 3 * plan_align256(A * I4) +
                    2 * plan_align256((amax + 1) * I4) + plan_align256(I4) + plan_align256(plan_max(sched, grads));
}

// ----------------------------------------------------------------------------
// the shards

// ZeRO-1 (docs/sharding.md §2): the fp32 elements one rank holds, from the trainer's own partition
// (zero_shard_map: every slice's chunk of floor(c / 8P) * 8 elements plus its replicated tail, the
// same count on every rank); skip_tables leaves out the slices of U and V (sharded by columns)
static inline size_t plan_zero1_elements(const ModelConfig* c, int P, int skip_tables) {
    ZeroShardMap map;
    zero_shard_map(&map, c, P, 0);
    size_t total = 0;
    for (int i = 0; i < map.num_slices; i++) {
        int t = map.slices[i].tensor;
        if (skip_tables && (t == PARAM_EXPERTU || t == PARAM_EXPERTV)) continue;
        total += map.chunk[i] + (map.slices[i].count - (size_t)P * map.chunk[i]);
    }
    zero_shard_map_free(&map);
    return total;
}

// ----------------------------------------------------------------------------
// the list

static inline void memory_plan_set(MemoryPlan* p, int id, const char* what, size_t bytes, size_t table_bytes,
                                   MemKind kind) {
    MemBuffer b = {what, bytes, table_bytes, kind};
    p->buf[id] = b;
}

// Returns 0 with a message on stderr when the mode cannot cut this model (tables: C a multiple of
// 8P, docs/sharding.md §3.1).
static inline int memory_plan_build(MemoryPlan* p, const ModelConfig* c, int B, int T, int floatx_bytes,
                                    int num_gpus, int mode, int recompute, const PlanKernelSizes* ks) {
    memset(p, 0, sizeof(*p));
    p->config = *c;
    p->B = B;
    p->T = T;
    p->floatx_bytes = floatx_bytes;
    p->num_gpus = num_gpus;
    p->mode = mode;
    p->recompute = recompute;
    const int P = num_gpus, omni = c->ffn_kind == FFN_OMNI, moe = c->ffn_kind == FFN_MOE;
    const int zero1 = (mode & PLAN_MODE_ZERO1) && P > 1;
    const int tables = (mode & PLAN_MODE_TABLES) && P > 1 && omni;
    if (tables && c->channels % (8 * P) != 0) {
        fprintf(stderr, "Error: --shard-experts 1 (%s): the expert tables are cut into 16-byte column groups, so C = %d "
                "must be a multiple of 8 x %d GPUs\n", memory_plan_mode_name(mode), c->channels, P);
        return 0;
    }
    size_t sizes[NUM_PARAMETER_TENSORS];
    model_config_param_sizes(c, sizes);
    const size_t all = model_config_num_params(c), table = sizes[PARAM_EXPERTU] + sizes[PARAM_EXPERTV];
    const size_t table_local = tables ? table / P : table;
    p->tables_local = table_local;
    p->params_local = all - table + table_local;
    p->opt_tables_local = zero1 && !tables ? plan_zero1_elements(c, P, 0) - plan_zero1_elements(c, P, 1) : table_local;
    p->opt_local = (zero1 ? plan_zero1_elements(c, P, 1) : all - table) + p->opt_tables_local;
    const size_t L = c->num_layers, C = c->channels, BT = (size_t)B * T, Vp = c->padded_vocab_size;
    const size_t H = model_config_dense_width(c), FI = model_config_ffn_in_width(c), X = floatx_bytes, F = sizeof(float);
    const size_t W = p->params_local, O = p->opt_local;
    const size_t L_act = recompute >= 1 ? 1 : L, L_ln = recompute >= 2 ? 1 : L;  // layers kept (-r)
    memory_plan_set(p, MEMBUF_PARAMS, "parameters", W * X, table_local * X, MEM_WEIGHTS);
    memory_plan_set(p, MEMBUF_GRADS, "gradients", W * X, table_local * X, MEM_GRADS);
    const size_t O1 = O > 0 ? O : 1;  // cudaMalloc gets at least one element
    memory_plan_set(p, MEMBUF_MASTER, "fp32 master weights", O1 * F, p->opt_tables_local * F, MEM_MASTER);
    memory_plan_set(p, MEMBUF_ADAM_M, "AdamW m", O1 * F, p->opt_tables_local * F, MEM_ADAM_M);
    memory_plan_set(p, MEMBUF_ADAM_V, "AdamW v", O1 * F, p->opt_tables_local * F, MEM_ADAM_V);
    size_t num_bn = model_config_num_bn_stats(c);
    memory_plan_set(p, MEMBUF_BN_STATS, "router BN running statistics", (num_bn > 0 ? num_bn : 1) * F, 0, MEM_OTHER_STATE);
    memory_plan_set(p, MEMBUF_NORM, "gradient norm", F, 0, MEM_OTHER_STATE);
    const MemKind A = MEM_ACTIVATIONS, K = MEM_WORKSPACE;
    memory_plan_set(p, MEMBUF_ENCODED, "activations: encoded", BT * C * X, 0, A);
    memory_plan_set(p, MEMBUF_LN1, "activations: ln1", L_ln * BT * C * X, 0, A);
    memory_plan_set(p, MEMBUF_LN1_MEAN, "activations: ln1 mean", L * BT * F, 0, A);
    memory_plan_set(p, MEMBUF_LN1_RSTD, "activations: ln1 rstd", L * BT * F, 0, A);
    memory_plan_set(p, MEMBUF_QKV, "activations: qkv", L * BT * 3 * C * X, 0, A);
    memory_plan_set(p, MEMBUF_ATTY, "activations: attention output", L * BT * C * X, 0, A);
    memory_plan_set(p, MEMBUF_ATT_LSE, "activations: attention lse", L * BT * c->num_heads * F, 0, A);
    memory_plan_set(p, MEMBUF_RESIDUAL2, "activations: residual2", L * BT * C * X, 0, A);
    memory_plan_set(p, MEMBUF_LN2, "activations: ln2", L_ln * BT * C * X, 0, A);
    memory_plan_set(p, MEMBUF_LN2_MEAN, "activations: ln2 mean", L * BT * F, 0, A);
    memory_plan_set(p, MEMBUF_LN2_RSTD, "activations: ln2 rstd", L * BT * F, 0, A);
    memory_plan_set(p, MEMBUF_FCH, "activations: FFN pre-activation", L * BT * FI * X, 0, A);
    memory_plan_set(p, MEMBUF_FCH_ACT, "activations: FFN activation", L_act * BT * H * X, 0, A);
    memory_plan_set(p, MEMBUF_RESIDUAL3, "activations: residual3", L * BT * C * X, 0, A);
    memory_plan_set(p, MEMBUF_LNF, "activations: lnf", BT * C * X, 0, A);
    memory_plan_set(p, MEMBUF_LNF_MEAN, "activations: lnf mean", BT * F, 0, A);
    memory_plan_set(p, MEMBUF_LNF_RSTD, "activations: lnf rstd", BT * F, 0, A);
    memory_plan_set(p, MEMBUF_LOGITS, "activations: logits", BT * Vp * X, 0, A);
    memory_plan_set(p, MEMBUF_LOSSES, "activations: losses", BT * F, 0, A);
    memory_plan_set(p, MEMBUF_LOSS_SUM, "mean loss", F, 0, A);
    memory_plan_set(p, MEMBUF_SUBLAYER_OUT, "activations: sublayer output", BT * C * X, 0, A);
    memory_plan_set(p, MEMBUF_INPUTS, "inputs", BT * sizeof(int), 0, A);
    memory_plan_set(p, MEMBUF_TARGETS, "targets", BT * sizeof(int), 0, A);
    memory_plan_set(p, MEMBUF_DRESIDUAL, "gradients: residual", BT * C * X, 0, K);
    memory_plan_set(p, MEMBUF_DSUB, "gradients: sublayer", BT * C * X, 0, K);
    memory_plan_set(p, MEMBUF_DWIDE, "gradients: wide", BT * plan_max(3 * C, FI) * X, 0, K);
    memory_plan_set(p, MEMBUF_DHIDDEN, "gradients: hidden", BT * plan_max(H, C) * X, 0, K);
    memory_plan_set(p, MEMBUF_SCRATCH, "kernel scratch", ks->scratch, 0, K);
    memory_plan_set(p, MEMBUF_ATTENTION_WS, "cuDNN attention workspace", ks->attention_ws, 0, K);
    memory_plan_set(p, MEMBUF_OMNI_SAVED, moe ? "moe layers: saved router, schedule and expert rows"
                                              : "OmniMoE layers: saved router and schedule",
                    omni || moe ? L * ks->omni_saved : 0, 0, A);
    memory_plan_set(p, MEMBUF_OMNI_WORKSPACE, moe ? "moe workspace" : "OmniMoE workspace",
                    omni || moe ? ks->omni_workspace : 0, 0, K);
    const size_t counted = omni ? (size_t)c->num_experts : (size_t)model_config_moe_routed(c);
    memory_plan_set(p, MEMBUF_EXPERT_COUNTS, "expert counts", counted * L * sizeof(int), 0, K);
    memory_plan_set(p, MEMBUF_EXPERT_STATS, "expert statistics", omni ? 2 * L * F : 0, 0, K);
    memory_plan_set(p, MEMBUF_TABLE_SAVED, "sharded tables: all GPUs' pairs and x columns",
                    tables ? L * ks->table_saved : 0, 0, A);
    memory_plan_set(p, MEMBUF_TABLE_WORK, "sharded tables: exchanges and schedule", tables ? ks->table_work : 0, 0, K);
    for (int i = 0; i < MEMBUF_COUNT; i++) {
        p->kind_bytes[p->buf[i].kind] += p->buf[i].bytes;
        p->kind_table_bytes[p->buf[i].kind] += p->buf[i].table_bytes;
        p->total += p->buf[i].bytes;
    }
    p->margin = MEMORY_PLAN_MARGIN_BYTES;
    p->total += p->margin;
    return 1;
}

// The kernel sizes of a mode without a GPU (CUB estimated), then the list.
static inline int memory_plan_build_estimated(MemoryPlan* p, const ModelConfig* c, int B, int T, int floatx_bytes,
                                              int num_gpus, int mode, int recompute) {
    const int tables = (mode & PLAN_MODE_TABLES) && num_gpus > 1 && c->ffn_kind == FFN_OMNI;
    const int topk = c->ffn_kind == FFN_MOE ? c->moe_topk : c->top_k;
    const size_t pairs = (size_t)B * T * topk;
    PlanKernelSizes ks = plan_kernel_sizes(c, B, T, floatx_bytes, pairs, c->channels, plan_cub_estimate(pairs), recompute);
    if (tables && c->channels % (8 * num_gpus) == 0) {  // (memory_plan_build refuses the other C)
        plan_table_sizes(&ks, c, B, T, floatx_bytes, num_gpus, plan_cub_estimate(pairs * num_gpus));
    }
    if (!memory_plan_build(p, c, B, T, floatx_bytes, num_gpus, mode, recompute, &ks)) return 0;
    p->cub_estimated = 1;
    return 1;
}

// ----------------------------------------------------------------------------
// printing

static inline void memory_plan_print(const MemoryPlan* p, FILE* out) {
    const double GiB = 1073741824.0;
    const ModelConfig* c = &p->config;
    static const char* kind_names[MEM_NUM_KINDS] = {
        "weights", "gradients", "fp32 master weights", "AdamW m", "AdamW v",
        "BN statistics, norm", "activations", "workspace (scratch, dgrads)"};
    fprintf(out, "memory plan per GPU: %zu parameters (L=%d C=%d", model_config_num_params(c), c->num_layers,
            c->channels);
    if (c->ffn_kind == FFN_OMNI) fprintf(out, " omni N=%d k=%d I=%d", c->num_experts, c->top_k, c->ffn_hidden);
    else fprintf(out, " %s hidden=%d", ffn_kind_name(c->ffn_kind), c->ffn_hidden);
    fprintf(out, "), B=%d T=%d, %d GPU%s, %s, floatX %d bytes", p->B, p->T, p->num_gpus, p->num_gpus > 1 ? "s" : "",
            memory_plan_mode_name(p->mode), p->floatx_bytes);
    if (p->recompute > 0) {
        fprintf(out, ", -r %d (recomputed: FFN activation%s)", p->recompute, p->recompute >= 2 ? ", ln1, ln2" : "");
    }
    fprintf(out, "\n");
    fprintf(out, "  %-30s %12s %16s\n", "", "GiB", "of it U and V");
    for (int k = 0; k < MEM_NUM_KINDS; k++) {
        fprintf(out, "  %-30s %12.3f", kind_names[k], p->kind_bytes[k] / GiB);
        if (k <= MEM_ADAM_V) fprintf(out, " %16.3f", p->kind_table_bytes[k] / GiB);
        fprintf(out, "\n");
    }
    fprintf(out, "  %-30s %12.3f\n", "margin (context, cuBLAS, NCCL)", p->margin / GiB);
    fprintf(out, "  %-30s %12.3f   (weights of %zu parameters here, fp32 state of %zu)\n", "total",
            p->total / GiB, p->params_local, p->opt_local);
    if (p->cub_estimated) fprintf(out, "  (CUB's sort storage estimated: 8 bytes per pair + 1 MiB)\n");
    fprintf(out, "plan_bytes weights=%zu grads=%zu master=%zu adam_m=%zu adam_v=%zu other=%zu activations=%zu "
            "workspace=%zu margin=%zu total=%zu\n", p->kind_bytes[MEM_WEIGHTS], p->kind_bytes[MEM_GRADS],
            p->kind_bytes[MEM_MASTER], p->kind_bytes[MEM_ADAM_M], p->kind_bytes[MEM_ADAM_V],
            p->kind_bytes[MEM_OTHER_STATE], p->kind_bytes[MEM_ACTIVATIONS], p->kind_bytes[MEM_WORKSPACE], p->margin,
            p->total);
}

// --plan P: the plan of a run on P GPUs in `mode`, no GPU needed; 0 when it was printed
static inline int memory_plan_main(const ModelConfig* c, int B, int T, int floatx_bytes, int num_gpus, int mode,
                                   int recompute) {
    MemoryPlan p;
    if (!memory_plan_build_estimated(&p, c, B, T, floatx_bytes, num_gpus, mode, recompute)) return 1;
    memory_plan_print(&p, stdout);
    const double GiB = 1073741824.0;
    // what a fresh process finds free, about: H100 80GB 79.1 GiB, H200 139.8 GiB (less its context)
    printf("fits an H100 80GB (79 GiB free): %s; an H200 (139 GiB free): %s\n", p.total <= 79 * GiB ? "yes" : "no",
           p.total <= 139 * GiB ? "yes" : "no");
    return 0;
}

// --plan P of either trainer (floatx_bytes: the CUDA build's, 2 for the default bf16): reads only
// the header of a model file; the flags are checked as for a run on P processes
static inline int train_config_plan_main(TrainConfig* cfg, int floatx_bytes) {
    ModelConfig c;
    if (!train_config_model(cfg, &c)) {
        model_file_read_config(cfg->model, &c);
        train_config_check_file_model(cfg, &c);
    }
    cfg->num_processes = cfg->plan_gpus;
    train_config_validate(cfg, &c);
    int mode = (cfg->zero ? PLAN_MODE_ZERO1 : 0) | (cfg->shard_experts ? PLAN_MODE_TABLES : 0);
    if (cfg->attention != 0) printf("(--attention cudnn: cuDNN's workspace is not counted; only cuDNN knows it)\n");
    return memory_plan_main(&c, cfg->B, cfg->T, floatx_bytes, cfg->plan_gpus, mode, cfg->recompute);
}

#endif // OMNIMOE_MEMORY_PLAN_H
