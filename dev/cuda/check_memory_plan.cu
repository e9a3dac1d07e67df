/*
check_memory_plan.cu - llmc/memory_plan.h's mirror of the kernels' sizes (plan_kernel_sizes)
against the GPU headers' own functions, for the presets tiny..d48, every FFN kind (moe plain and
with the MoE++ options), B, T, N, k, without a GPU: CUB's sort storage, the one number that needs a device, is left out
on both sides (model_build compares the full numbers, CUB included, at every start).

    nvcc -O1 -std=c++17 -arch=sm_90a -I. [-DENABLE_FP32] dev/cuda/check_memory_plan.cu -o dev/cuda/check_memory_plan_bin -lcublasLt -lcublas
    ./dev/cuda/check_memory_plan_bin      # "N configurations, 0 differ", exit 0
*/
#include "llmc/utils.h"
#include "llmc/config.h"
#include "llmc/memory_plan.h"
#include "llmc/cuda_utils.cuh"
#include "llmc/matmul.cuh"
#include "llmc/layernorm.cuh"
#include "llmc/attention.cuh"
#include "llmc/global_norm.cuh"
#include "llmc/omnimoe_layer.cuh"
#include "llmc/moe_layer.cuh"
static size_t mx(size_t a, size_t b) { return a > b ? a : b; }
int main() {
    const char* presets[] = {"tiny", "small", "d6", "d12", "d24", "d48"};
    int kinds[] = {FFN_GELU, FFN_SWIGLU, FFN_OMNI, FFN_MOE};
    int Bs[] = {1, 3, 8, 16, 32}; int Ts[] = {64, 100, 1024};
    int Ns[] = {0, 4096, 65536, 262144, 1048576}; int ks[] = {0, 8, 16, 32};
    long checked = 0, bad = 0;
    int rs[] = {0, 1, 2};  // -r: the moe layer keeps its gathered inputs only at 0
    for (auto pr : presets) for (int kind : kinds) for (int B : Bs) for (int T : Ts) for (int N : Ns) for (int k : ks)
    for (int r : rs) {
        if (kind != FFN_MOE && r) continue;
        if (kind != FFN_OMNI && kind != FFN_MOE && (N || k)) continue;
        if (kind == FFN_MOE && (N > 4096 || k > 16)) continue;  // moe: N = 0 plain, 4096 the MoE++ options; k = 0, 8, 16
        ModelConfig c; if (!model_config_preset(&c, pr, kind)) continue;
        if (T > c.max_seq_len) continue;
        if (kind == FFN_OMNI) { if (N) { int n = 1; while (n * n < N) n++; c.router_n = n; c.num_experts = N; } if (k) c.top_k = k; }
        if (kind == FFN_MOE && N) {  // the MoE++ options of --moepp 1
            c.moe_zero = 1; c.moe_copy = 1; c.moe_const = 2; c.moe_gate_res = 1; c.moe_norm_topk = 1;
            c.moe_router = MOE_ROUTER_TANH; c.moe_input_scale = 1;
        }
        if (kind == FFN_MOE && k) c.moe_topk = k;
        size_t C = c.channels, BT = (size_t)B * T, Vp = c.padded_vocab_size, H = model_config_dense_width(&c);
        size_t FI = kind == FFN_GELU ? H : 2 * H;
        size_t s = 0;
        s = mx(s, matmul_backward_scratch_bytes((int)BT, (int)mx(mx(3 * C, FI), mx(C, Vp))));
        s = mx(s, layernorm_backward_scratch_bytes((int)BT, (int)C));
        s = mx(s, attention_backward_scratch_bytes(B, T, (int)C, c.num_heads));
        s = mx(s, global_norm_scratch_bytes());
        size_t saved = 0, ws = 0, pairs = 0;
        if (kind == FFN_OMNI) {
            OmniDims d = {(int)BT, (int)C, (int)H, c.router_n, c.num_experts, c.top_k};
            pairs = BT * c.top_k;
            s = mx(s, router_forward_scratch_bytes(d.BT, d.n));
            s = mx(s, router_backward_scratch_bytes(d.BT, d.n));
            s = mx(s, align256(0) + 2 * align256(pairs * sizeof(int)));   // scheduler_scratch_bytes with CUB = 0
            s = mx(s, experts_backward_scratch_bytes(d.BT, d.C, d.k));
            saved = omni_layer_saved_bytes(d); ws = omni_workspace_bytes(d);
        }
        if (kind == FFN_MOE) {  // moe_layer_scratch_bytes with CUB = 0
            MoeDims d = {(int)BT, (int)C, (int)H, c.ffn_hidden, c.moe_experts, c.moe_const, c.moe_copy, c.moe_zero, c.moe_topk,
                         r >= 1};
            MoeOptions o = {c.moe_gate_res, c.moe_norm_topk, c.moe_router, c.moe_input_scale};
            pairs = BT * c.moe_topk;
            s = mx(s, align256(0) + 2 * align256(pairs * sizeof(int)));
            if (o.gate_res) s = mx(s, moe_gate_residual_scratch_bytes(d.BT, moe_routed(d)));
            s = mx(s, moe_const_grads_scratch_bytes(d.BT * d.k, d.C, d.Kc));
            saved = moe_layer_saved_bytes(d, o); ws = moe_workspace_bytes(d, o);
        }
        PlanKernelSizes p = plan_kernel_sizes(&c, B, T, (int)sizeof(floatX), pairs, C, 0, r);
        checked++;
        if (p.scratch != s || p.omni_saved != saved || p.omni_workspace != ws) {
            bad++; if (bad < 5) printf("DIFF %s kind %d B %d T %d N %d k %d r %d: %zu/%zu %zu/%zu %zu/%zu\n", pr, kind, B, T, c.num_experts, c.top_k, r, p.scratch, s, p.omni_saved, saved, p.omni_workspace, ws);
        }
    }
    printf("%ld configurations, %ld differ\n", checked, bad);
    return bad != 0;
}
