/*
 * config.h - the model configuration and the parameter layout, shared by the CPU reference
 * trainer (train_omnimoe.c), the CUDA trainer (train_omnimoe.cu), the tests and the checkpoint
 * format. Plain C: compiles with gcc and nvcc.
 *
 * Defines:
 *   ModelConfig              every number that fixes the shape of the model
 *   FFN_GELU/SWIGLU/OMNI/MOE the feed-forward kinds of docs/design.md §1 and §10 (moe: top-k
 *                            SwiGLU experts + shared experts, with the MoE++ expert kinds)
 *   ROUTER_NORM_*, GATE_*    the OmniMoE options of docs/design.md §2
 *   EXPERT_EXEC_*            the token- / expert-centric execution of the experts
 *   LAYERNORM_EPS, BATCHNORM_*    the normalisations' constants (CPU and GPU)
 *   ParamTensor ids          the fixed order of the parameter tensors in one flat buffer
 *   model_config_param_sizes()   element count of each tensor (0 where a kind has none)
 *   model_config_validate()      one clear message for an impossible configuration
 *   model_config_num_params(), model_config_active_params()   total / active parameter counts (docs/design.md §4)
 *   model_config_preset()        named model sizes (-e d12 and friends)
 *   param_is_decayed()           which tensors get AdamW weight decay (matrices only)
 *   param_init_std()             the initialisation of docs/design.md §1.3 (one rule for CPU and GPU)
 *   model_init_params()          draws all parameters on the host from a seed, in layout order
 */
#ifndef OMNIMOE_CONFIG_H
#define OMNIMOE_CONFIG_H

#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include "rand.h"

// ----------------------------------------------------------------------------
// the options

enum { FFN_GELU = 0, FFN_SWIGLU = 1, FFN_OMNI = 2, FFN_MOE = 3 };
enum { MOE_ROUTER_LINEAR = 0, MOE_ROUTER_TANH = 1 };  // the moe router (docs/design.md §10.2)
#define MOE_TANH_WIDTH 8  // the tanh router's hidden width, in multiples of E_t (MoE++ release)
enum { ROUTER_NORM_NONE = 0, ROUTER_NORM_BN = 1 };
enum { GATE_SOFTMAX = 0, GATE_PROB = 1 };
// the two executions of the expert branch (docs/design.md §3): a run-time choice, not saved in
// the model; both compute the same bits
enum { EXPERT_EXEC_TOKEN = 0, EXPERT_EXEC_EXPERT = 1 };

// the epsilons of the normalisations, for the CPU reference and the GPU kernels alike
#define LAYERNORM_EPS 1e-5f
#define BATCHNORM_EPS 1e-5f       // the router's batch norm
#define BATCHNORM_MOMENTUM 0.1f   // running = (1 - m) running + m batch (torch BatchNorm1d)

static inline const char* ffn_kind_name(int kind) {
    switch (kind) {
        case FFN_GELU: return "gelu";
        case FFN_SWIGLU: return "swiglu";
        case FFN_OMNI: return "omni";
        case FFN_MOE: return "moe";
        default: return "?";
    }
}
static inline const char* router_norm_name(int v) { return v == ROUTER_NORM_BN ? "bn" : "none"; }
static inline const char* gate_name(int v) { return v == GATE_PROB ? "prob" : "softmax"; }

// parse "gelu" / "swiglu" / "omni"; returns -1 when the word is none of them
static inline int ffn_kind_from_name(const char* s) {
    if (strcmp(s, "gelu") == 0) return FFN_GELU;
    if (strcmp(s, "swiglu") == 0) return FFN_SWIGLU;
    if (strcmp(s, "omni") == 0) return FFN_OMNI;
    if (strcmp(s, "moe") == 0) return FFN_MOE;
    return -1;
}
static inline int router_norm_from_name(const char* s) {
    if (strcmp(s, "bn") == 0) return ROUTER_NORM_BN;
    if (strcmp(s, "none") == 0) return ROUTER_NORM_NONE;
    return -1;
}
static inline int gate_from_name(const char* s) {
    if (strcmp(s, "softmax") == 0) return GATE_SOFTMAX;
    if (strcmp(s, "prob") == 0) return GATE_PROB;
    return -1;
}

// ----------------------------------------------------------------------------
// the configuration

typedef struct {
    int max_seq_len;        // maxT: rows of the position embedding
    int vocab_size;         // V: real tokens (GPT-2: 50257)
    int padded_vocab_size;  // Vp: V rounded up to a multiple of 128 (GPT-2: 50304)
    int num_layers;         // L
    int num_heads;          // NH
    int channels;           // C = d
    int ffn_kind;           // FFN_GELU | FFN_SWIGLU | FFN_OMNI | FFN_MOE
    int ffn_hidden;         // H: 4C for gelu; I (shared SwiGLU width) for swiglu and omni; I_e (one expert) for moe
    int router_n;           // n: experts form an n x n grid (omni only, else 0)
    int num_experts;        // N = n*n (omni only, else 0)
    int top_k;              // k experts per token (omni only, else 0)
    int router_norm;        // ROUTER_NORM_BN | ROUTER_NORM_NONE
    int gate;               // GATE_SOFTMAX | GATE_PROB
    // moe only (docs/design.md §10), else 0
    int moe_experts;        // E routed SwiGLU experts of width I_e = ffn_hidden
    int moe_topk;           // k experts per token, chosen among all E_t routed experts
    int moe_shared;         // S shared experts (one SwiGLU of width S*I_e)
    int moe_zero;           // MoE++ zero experts (output 0)
    int moe_copy;           // MoE++ copy experts (output x)
    int moe_const;          // MoE++ constant experts (x and a learned vector, mixed)
    int moe_gate_res;       // 1: gating residuals (router logits += G z of the previous layer)
    int moe_norm_topk;      // 1: gates renormalised over the chosen non-zero experts (MoE++ release)
    int moe_router;         // MOE_ROUTER_LINEAR (DeepSeekMoE) | MOE_ROUTER_TANH (MoE++ release: C -> 8E_t -> E_t)
    int moe_input_scale;    // 1: the routed experts see k x (MoE++ release), 0: x
} ModelConfig;

static inline int round_up_to_multiple(int x, int m) { return ((x + m - 1) / m) * m; }

// ----------------------------------------------------------------------------
// the parameter layout: every tensor lives in one flat buffer, in this order.
// For a kind that lacks a tensor its size is 0 (e.g. biases of the SwiGLU FFN).

enum {
    PARAM_WTE = 0,      // (Vp, C)  token embedding, tied to the LM head
    PARAM_WPE,          // (maxT, C) position embedding
    PARAM_LN1W,         // (L, C)
    PARAM_LN1B,         // (L, C)
    PARAM_QKVW,         // (L, 3C, C)  rows: q, k, v
    PARAM_QKVB,         // (L, 3C)
    PARAM_ATTPROJW,     // (L, C, C)
    PARAM_ATTPROJB,     // (L, C)
    PARAM_LN2W,         // (L, C)
    PARAM_LN2B,         // (L, C)
    PARAM_FCW,          // gelu: (L, 4C, C); swiglu/omni: (L, 2I, C) rows [0,I) = Wg, [I,2I) = Wu
    PARAM_FCB,          // gelu: (L, 4C); else none
    PARAM_FCPROJW,      // (L, C, H)  H = 4C (gelu) or I; Wd of SwiGLU
    PARAM_FCPROJB,      // gelu: (L, C); else none
    PARAM_ROUTERW,      // omni: (L, 2n, C) rows [0,n) = Wr (row router), [n,2n) = Wc (column router)
    PARAM_EXPERTU,      // omni: (L, N, C) atomic expert input vectors u_e
    PARAM_EXPERTV,      // omni: (L, N, C) atomic expert output vectors v_e
    PARAM_LNFW,         // (C)
    PARAM_LNFB,         // (C)
    // moe only (docs/design.md §10.1); E_t = E + K_const + K_copy + K_zero routed experts
    PARAM_MOE_ROUTERW,  // (L, E_t, C); tanh router: (L, 8 E_t, C), its first layer
    PARAM_MOE_ROUTER2,  // tanh router only: (L, E_t, 8 E_t), its second layer
    PARAM_MOE_GATEMAP,  // (L, E_t, E_t) gating residual map G (layer 0's unused); moe_gate_res only
    PARAM_MOE_W1,       // (L, E, 2 I_e, C) rows [0, I_e) = Wg_e, [I_e, 2 I_e) = Wu_e
    PARAM_MOE_W2,       // (L, E, C, I_e)
    PARAM_MOE_CONST,    // (L, K_const, C) constant vectors c_j
    PARAM_MOE_CONSTMIX, // (L, K_const, 2, C) mixing maps A_j: w = softmax(A_j x)
    PARAM_MOE_BIAS,     // (L, E_t) balancing bias (selection only); never has a gradient
    NUM_PARAMETER_TENSORS
};

static inline const char* param_tensor_name(int i) {
    static const char* names[NUM_PARAMETER_TENSORS] = {
        "wte", "wpe", "ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb", "ln2w", "ln2b",
        "fcw", "fcb", "fcprojw", "fcprojb", "routerw", "expert_u", "expert_v", "lnfw", "lnfb",
        "moe_router", "moe_router2", "moe_gate_map", "moe_w1", "moe_w2", "moe_const", "moe_const_mix", "moe_bias"};
    return (i >= 0 && i < NUM_PARAMETER_TENSORS) ? names[i] : "?";
}

// moe: the routed experts E_t = E + constant + copy + zero (ids in that order); 0 for other kinds
static inline int model_config_moe_routed(const ModelConfig* c) {
    return c->ffn_kind == FFN_MOE ? c->moe_experts + c->moe_const + c->moe_copy + c->moe_zero : 0;
}
// the width of the dense SwiGLU (or GELU) branch: ffn_hidden, or S*I_e of the moe shared experts
static inline size_t model_config_dense_width(const ModelConfig* c) {
    return c->ffn_kind == FFN_MOE ? (size_t)c->moe_shared * c->ffn_hidden : (size_t)c->ffn_hidden;
}
// the output width of the first FFN matmul (fch): the dense width, twice it for SwiGLU's gate and up
static inline size_t model_config_ffn_in_width(const ModelConfig* c) {
    return c->ffn_kind == FFN_GELU ? model_config_dense_width(c) : 2 * model_config_dense_width(c);
}

// element count of each parameter tensor
static inline void model_config_param_sizes(const ModelConfig* c, size_t sizes[NUM_PARAMETER_TENSORS]) {
    size_t Vp = c->padded_vocab_size, C = c->channels, L = c->num_layers, maxT = c->max_seq_len;
    size_t H = model_config_dense_width(c);
    int gelu = c->ffn_kind == FFN_GELU, omni = c->ffn_kind == FFN_OMNI, moe = c->ffn_kind == FFN_MOE;
    size_t n = omni ? (size_t)c->router_n : 0, N = omni ? (size_t)c->num_experts : 0;
    sizes[PARAM_WTE] = Vp * C;
    sizes[PARAM_WPE] = maxT * C;
    sizes[PARAM_LN1W] = L * C;
    sizes[PARAM_LN1B] = L * C;
    sizes[PARAM_QKVW] = L * 3 * C * C;
    sizes[PARAM_QKVB] = L * 3 * C;
    sizes[PARAM_ATTPROJW] = L * C * C;
    sizes[PARAM_ATTPROJB] = L * C;
    sizes[PARAM_LN2W] = L * C;
    sizes[PARAM_LN2B] = L * C;
    sizes[PARAM_FCW] = L * (gelu ? H : 2 * H) * C;
    sizes[PARAM_FCB] = gelu ? L * H : 0;
    sizes[PARAM_FCPROJW] = L * C * H;
    sizes[PARAM_FCPROJB] = gelu ? L * C : 0;
    sizes[PARAM_ROUTERW] = L * 2 * n * C;
    sizes[PARAM_EXPERTU] = L * N * C;
    sizes[PARAM_EXPERTV] = L * N * C;
    sizes[PARAM_LNFW] = C;
    sizes[PARAM_LNFB] = C;
    size_t Et = (size_t)model_config_moe_routed(c), E = moe ? (size_t)c->moe_experts : 0;
    size_t Ie = moe ? (size_t)c->ffn_hidden : 0, Kc = moe ? (size_t)c->moe_const : 0;
    size_t tanh_width = moe && c->moe_router == MOE_ROUTER_TANH ? (size_t)MOE_TANH_WIDTH * Et : 0;
    sizes[PARAM_MOE_ROUTERW] = L * (tanh_width ? tanh_width : Et) * C;
    sizes[PARAM_MOE_ROUTER2] = L * Et * tanh_width;
    sizes[PARAM_MOE_GATEMAP] = moe && c->moe_gate_res ? L * Et * Et : 0;
    sizes[PARAM_MOE_W1] = L * E * 2 * Ie * C;
    sizes[PARAM_MOE_W2] = L * E * C * Ie;
    sizes[PARAM_MOE_CONST] = L * Kc * C;
    sizes[PARAM_MOE_CONSTMIX] = L * Kc * 2 * C;
    sizes[PARAM_MOE_BIAS] = L * Et;
}

static inline size_t model_config_num_params(const ModelConfig* c) {
    size_t sizes[NUM_PARAMETER_TENSORS], total = 0;
    model_config_param_sizes(c, sizes);
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) total += sizes[i];
    return total;
}

// parameters one token touches (docs/design.md §4: 3dI + 2nd + 2kd per OmniMoE layer), embeddings counted
// as in llm.c's 6N FLOP estimate: the token row is not counted, the tied LM head is (Vp*C).
static inline size_t model_config_active_params(const ModelConfig* c) {
    size_t sizes[NUM_PARAMETER_TENSORS], total = 0;
    model_config_param_sizes(c, sizes);
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) {
        if (i == PARAM_WPE || i == PARAM_EXPERTU || i == PARAM_EXPERTV) continue;
        if (i == PARAM_MOE_W1 || i == PARAM_MOE_W2 || i == PARAM_MOE_GATEMAP || i == PARAM_MOE_BIAS) continue;
        total += sizes[i];
    }
    if (c->ffn_kind == FFN_OMNI) total += (size_t)c->num_layers * 2 * c->top_k * c->channels;
    if (c->ffn_kind == FFN_MOE) {
        // docs/design.md §10.6: an upper bound, as if every slot went to an FFN expert
        size_t Et = (size_t)model_config_moe_routed(c), L = c->num_layers;
        total += L * c->moe_topk * 3 * (size_t)c->channels * c->ffn_hidden;
        if (c->moe_gate_res) total += (L - 1) * Et * Et;
    }
    return total;
}

// the floats of router batch-norm running statistics: per layer mean(2n) then var(2n)
static inline size_t model_config_num_bn_stats(const ModelConfig* c) {
    return c->ffn_kind == FFN_OMNI ? (size_t)c->num_layers * 4 * c->router_n : 0;
}

// forward FLOPs per token of the matmuls (for MFU): 2 per active weight + attention
static inline double model_config_flops_per_token_fwd(const ModelConfig* c, int T) {
    return 2.0 * (double)model_config_active_params(c)
         + 2.0 * 2.0 * c->num_layers * (double)c->channels * T / 2.0;  // causal QK^T and AV
}

// prints a message naming the problem and returns 0 when the configuration is impossible
static inline int model_config_validate(const ModelConfig* c) {
    const char* why = NULL;
    if (c->num_layers < 1) why = "num_layers must be >= 1";
    else if (c->channels < 1 || c->num_heads < 1) why = "channels and num_heads must be >= 1";
    else if (c->channels % c->num_heads != 0) why = "channels must be divisible by num_heads";
    else if (c->max_seq_len < 1) why = "max_seq_len must be >= 1";
    else if (c->vocab_size < 1 || c->padded_vocab_size < c->vocab_size) why = "padded_vocab_size must be >= vocab_size >= 1";
    else if (c->ffn_kind < FFN_GELU || c->ffn_kind > FFN_MOE) why = "ffn_kind must be gelu, swiglu, omni or moe";
    else if (c->ffn_hidden < 1) why = "ffn_hidden must be >= 1";
    else if (c->ffn_kind == FFN_OMNI) {
        if (c->router_n < 1) why = "router_n (n, experts = n*n) must be >= 1";
        else if ((long long)c->num_experts != (long long)c->router_n * c->router_n) why = "num_experts must equal router_n^2";
        else if (c->top_k < 1 || c->top_k > c->num_experts) why = "top_k must be in [1, num_experts]";
        else if (c->router_norm != ROUTER_NORM_BN && c->router_norm != ROUTER_NORM_NONE) why = "router_norm must be bn or none";
        else if (c->gate != GATE_SOFTMAX && c->gate != GATE_PROB) why = "gate must be softmax or prob";
    } else if (c->ffn_kind == FFN_MOE) {
        long long Et = (long long)c->moe_experts + c->moe_const + c->moe_copy + c->moe_zero;
        if (c->moe_experts < 0 || c->moe_const < 0 || c->moe_copy < 0 || c->moe_zero < 0 || c->moe_shared < 0)
            why = "moe expert counts must be >= 0";
        else if (Et < 1 || Et > 65536) why = "moe needs 1 to 65536 routed experts (FFN + constant + copy + zero)";
        else if (c->moe_topk < 1 || c->moe_topk > Et) why = "moe top_k must be in [1, routed experts]";
        else if (c->moe_shared > 65536) why = "moe shared experts must be <= 65536";
        else if (c->moe_gate_res != 0 && c->moe_gate_res != 1) why = "moe_gate_res must be 0 or 1";
        else if (c->moe_norm_topk != 0 && c->moe_norm_topk != 1) why = "moe_norm_topk must be 0 or 1";
        else if (c->moe_router != MOE_ROUTER_LINEAR && c->moe_router != MOE_ROUTER_TANH) why = "moe_router must be linear or tanh";
        else if (c->moe_input_scale != 0 && c->moe_input_scale != 1) why = "moe_input_scale must be 0 or 1";
    }
    if (!why && c->ffn_kind != FFN_MOE && (c->moe_experts || c->moe_topk || c->moe_shared || c->moe_zero ||
                                           c->moe_copy || c->moe_const || c->moe_gate_res || c->moe_norm_topk ||
                                           c->moe_router || c->moe_input_scale))
        why = "the moe fields must be 0 unless ffn_kind is moe";
    // an upper bound of the parameter count in double (no overflow), so that the size_t sums of
    // model_config_param_sizes cannot wrap for any header a file may hold
    double C = c->channels, L = c->num_layers, H = c->ffn_hidden;
    double N = c->ffn_kind == FFN_OMNI ? c->num_experts : 0, n = c->ffn_kind == FFN_OMNI ? c->router_n : 0;
    if (c->ffn_kind == FFN_MOE) {  // the shared width S*I_e plus E experts of I_e, router, map, constants
        double Et = (double)c->moe_experts + c->moe_const + c->moe_copy + c->moe_zero;
        H = H * ((double)c->moe_shared + c->moe_experts) +
            (9 * Et * C + 9 * Et * Et + 3.0 * c->moe_const * C + Et) / (3 * C);  // tanh router: 8 E_t (C + E_t)
    }
    double bound = ((double)c->padded_vocab_size + c->max_seq_len + 2) * C +
                   L * (4 * C * C + 3 * H * C + 2 * n * C + 2 * N * C + 9 * C + H);
    if (!why && bound > 1099511627776.0) why = "more than 2^40 parameters (4 TiB of fp32 weights)";
    if (why) {
        fprintf(stderr, "Error: impossible model configuration: %s\n", why);
        return 0;
    }
    return 1;
}

// fills the OmniMoE fields from N (must be a perfect square) and k
static inline int model_config_set_experts(ModelConfig* c, int num_experts, int top_k) {
    int n = (int)floor(sqrt((double)num_experts) + 0.5);
    if (n * n != num_experts) {
        fprintf(stderr, "Error: the number of experts N=%d must be a perfect square (N = n*n)\n", num_experts);
        return 0;
    }
    c->router_n = n;
    c->num_experts = num_experts;
    c->top_k = top_k;
    return 1;
}

// moe (docs/design.md §10.6): the expert width I_e that gives (S + k) experts, the router, the
// gating-residual map and the constant experts together about the active parameters of a SwiGLU
// of width swiglu_I: nearest multiple of 32 (of 8 when C < 384), at least that multiple
static inline int model_config_moe_fit_width(const ModelConfig* c, int swiglu_I) {
    double C = c->channels, Et = model_config_moe_routed(c);
    double router = c->moe_router == MOE_ROUTER_TANH ? MOE_TANH_WIDTH * Et * (C + Et) : Et * C;
    double budget = 3.0 * C * swiglu_I - router - (c->moe_gate_res ? Et * Et : 0.0) - 3.0 * C * c->moe_const;
    double Ie = budget / (3.0 * C * (c->moe_shared + c->moe_topk));
    int m = c->channels >= 384 ? 32 : 8;
    int rounded = (int)floor(Ie / m + 0.5) * m;
    return rounded < m ? m : rounded;
}
static inline int model_config_swiglu_width(int C) { return round_up_to_multiple((8 * C) / 3, 64); }

// Named model sizes: "dL" is GPT-2 shaped with L layers (d12 = GPT-2 124M: C=768, NH=12), and
// a few small ones for CPU runs and tests. ffn_kind chooses the FFN; OmniMoE and SwiGLU widths
// are picked so that the three kinds have (close to) the same active parameters per token:
//   gelu:   8C^2 (+ biases)               swiglu: 3CI with I = 8C/3 rounded to a multiple of 64
//   omni:   3CI' + 2nC + 2kC with I' = I - (2n + 2k)/3 rounded to a multiple of 64
//   moe:    3C(S + k)I_e + E C with I_e from model_config_moe_fit_width (E, S, k per size below)
// Returns 0 for an unknown name.
static inline int model_config_preset(ModelConfig* c, const char* name, int ffn_kind) {
    int L, C, NH, maxT = 1024, n, k, moe_E = 64, moe_S = 2, moe_k = 6;
    if (strcmp(name, "tiny") == 0) { L = 2; C = 64; NH = 4; maxT = 64; n = 8; k = 4; moe_E = 8; moe_S = 1; moe_k = 2; }
    else if (strcmp(name, "small") == 0) { L = 4; C = 128; NH = 4; maxT = 256; n = 16; k = 8; moe_E = 16; moe_S = 1; moe_k = 3; }
    else if (strcmp(name, "d6") == 0) { L = 6; C = 384; NH = 6; n = 64; k = 16; moe_E = 32; moe_S = 1; moe_k = 3; }
    else if (strcmp(name, "d12") == 0) { L = 12; C = 768; NH = 12; n = 128; k = 32; }
    else if (strcmp(name, "d24") == 0) { L = 24; C = 1024; NH = 16; n = 128; k = 32; }
    else if (strcmp(name, "d36") == 0) { L = 36; C = 1280; NH = 20; n = 128; k = 32; }
    else if (strcmp(name, "d48") == 0) { L = 48; C = 1600; NH = 25; n = 128; k = 32; }
    else return 0;
    memset(c, 0, sizeof(*c));
    c->max_seq_len = maxT;
    c->vocab_size = 50257;
    c->padded_vocab_size = round_up_to_multiple(50257, 128);
    c->num_layers = L;
    c->num_heads = NH;
    c->channels = C;
    c->ffn_kind = ffn_kind;
    c->router_norm = ROUTER_NORM_BN;
    c->gate = GATE_SOFTMAX;
    int swiglu_I = model_config_swiglu_width(C);
    if (ffn_kind == FFN_GELU) {
        c->ffn_hidden = 4 * C;
    } else if (ffn_kind == FFN_SWIGLU) {
        c->ffn_hidden = swiglu_I;
    } else if (ffn_kind == FFN_MOE) {
        c->moe_experts = moe_E;
        c->moe_shared = moe_S;
        c->moe_topk = moe_k;
        c->ffn_hidden = model_config_moe_fit_width(c, swiglu_I);
    } else {
        // give the router and the k experts' 2kC + 2nC weights back out of the SwiGLU width
        int I = swiglu_I - (2 * n + 2 * k) / 3;
        c->ffn_hidden = I < 64 ? 64 : ((I + 32) / 64) * 64;  // nearest multiple of 64
        c->router_n = n;
        c->num_experts = n * n;
        c->top_k = k;
    }
    return 1;
}

// ----------------------------------------------------------------------------
// optimizer and initialisation rules, one place for both trainers

// AdamW weight decay applies to matrices (and embeddings), not to biases or LayerNorm
static inline int param_is_decayed(int tensor) {
    switch (tensor) {
        case PARAM_WTE: case PARAM_WPE: case PARAM_QKVW: case PARAM_ATTPROJW: case PARAM_FCW:
        case PARAM_FCPROJW: case PARAM_ROUTERW: case PARAM_EXPERTU: case PARAM_EXPERTV:
        case PARAM_MOE_ROUTERW: case PARAM_MOE_ROUTER2: case PARAM_MOE_GATEMAP: case PARAM_MOE_W1: case PARAM_MOE_W2: case PARAM_MOE_CONSTMIX:
            return 1;
        default:
            return 0;
    }
}

// docs/design.md §1.3: linear weights N(0, 0.02); residual output projections (attention out, FFN down, V)
// N(0, 0.02/sqrt(2L)); U N(0, 0.02); LayerNorm weight 1 and bias 0; biases 0.
// Returns the std of the normal draw, or a negative number: -1 means "fill with 1", -2 "zeros".
static inline float param_init_std(const ModelConfig* c, int tensor) {
    float residual_std = 0.02f / sqrtf(2.0f * c->num_layers);
    switch (tensor) {
        case PARAM_ATTPROJW: case PARAM_FCPROJW: case PARAM_EXPERTV: case PARAM_MOE_W2: return residual_std;
        case PARAM_MOE_CONST: return 1.0f;  // the MoE++ release draws the constant vectors from N(0, 1)
        case PARAM_MOE_BIAS: return -2.0f;  // the balancing bias starts at 0 (docs/design.md §10.5)
        case PARAM_LN1W: case PARAM_LN2W: case PARAM_LNFW: return -1.0f;
        case PARAM_QKVB: case PARAM_ATTPROJB: case PARAM_FCB: case PARAM_FCPROJB:
        case PARAM_LN1B: case PARAM_LN2B: case PARAM_LNFB: return -2.0f;
        default: return 0.02f;
    }
}

// Fills the flat fp32 parameter buffer (layout order) from the seed. Both trainers call this,
// so the same seed gives the same initial weights on the CPU and on the GPU.
static inline void model_init_params(const ModelConfig* c, float* params, uint64_t seed) {
    size_t sizes[NUM_PARAMETER_TENSORS];
    model_config_param_sizes(c, sizes);
    Rng rng;
    rng_init(&rng, seed);
    float* p = params;
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) {
        float std = param_init_std(c, i);
        if (std > 0.0f) {
            rng_normal(&rng, p, sizes[i], 0.0f, std);
        } else {
            float fill = std == -1.0f ? 1.0f : 0.0f;
            for (size_t j = 0; j < sizes[i]; j++) p[j] = fill;
        }
        p += sizes[i];
    }
}

// Router batch-norm running statistics start at mean 0, variance 1 (layout: per layer
// running_mean[2n] then running_var[2n]).
static inline void model_init_bn_stats(const ModelConfig* c, float* bn_stats) {
    size_t two_n = 2 * (size_t)c->router_n;
    for (int l = 0; l < c->num_layers && c->ffn_kind == FFN_OMNI; l++) {
        float* mean = bn_stats + (size_t)l * 2 * two_n;
        for (size_t i = 0; i < two_n; i++) { mean[i] = 0.0f; mean[two_n + i] = 1.0f; }
    }
}

static inline void model_config_print(const ModelConfig* c) {
    printf("| model: L=%d C=%d NH=%d maxT=%d V=%d (padded %d)\n", c->num_layers, c->channels,
           c->num_heads, c->max_seq_len, c->vocab_size, c->padded_vocab_size);
    if (c->ffn_kind == FFN_OMNI) {
        printf("| ffn: omni  I=%d  N=%d (n=%d)  k=%d  router_norm=%s  gate=%s\n", c->ffn_hidden,
               c->num_experts, c->router_n, c->top_k, router_norm_name(c->router_norm), gate_name(c->gate));
    } else if (c->ffn_kind == FFN_MOE) {
        printf("| ffn: moe  I_e=%d  E=%d  k=%d  shared=%d  zero=%d copy=%d const=%d  gate_res=%d  norm_topk=%d  "
               "router=%s  input_scale=%d\n", c->ffn_hidden, c->moe_experts, c->moe_topk, c->moe_shared, c->moe_zero,
               c->moe_copy, c->moe_const, c->moe_gate_res, c->moe_norm_topk,
               c->moe_router == MOE_ROUTER_TANH ? "tanh" : "linear", c->moe_input_scale);
    } else {
        printf("| ffn: %s  hidden=%d\n", ffn_kind_name(c->ffn_kind), c->ffn_hidden);
    }
    printf("| parameters: total %zu, active per token %zu\n", model_config_num_params(c),
           model_config_active_params(c));
}

#endif // OMNIMOE_CONFIG_H
