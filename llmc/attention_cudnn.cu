// attention_cudnn.cu - cuDNN fused SDPA for --attention cudnn; the contract is in
// llmc/attention_cudnn.h. Its own translation unit because the cudnn-frontend headers take about
// a minute to compile; built by `make USE_CUDNN=1`.
#include "attention_cudnn.h"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <map>
#include <memory>
#include <tuple>
#include <unordered_map>
#include <cudnn_frontend.h>

#ifdef ENABLE_FP32
#error "attention_cudnn.cu: cuDNN's SDPA has no fp32 path; build with PRECISION=BF16"
#endif

namespace fe = cudnn_frontend;

// tensor ids inside the graphs
enum { UID_Q = 1, UID_K, UID_V, UID_O, UID_LSE, UID_DO, UID_DQ, UID_DK, UID_DV };

typedef std::tuple<int, int, int, int> AttnShape;  // B, T, NH, hs
struct AttnGraphs {
    std::shared_ptr<fe::graph::Graph> forward, backward;
};
static cudnnHandle_t attn_handle = NULL;
static std::map<AttnShape, AttnGraphs> attn_cache;

static void attn_fail(const char* what, fe::error_object e, int B, int T, int C, int NH) {
    fprintf(stderr, "Error: --attention cudnn: %s failed for B=%d T=%d C=%d NH=%d: %s\n"
                    "(use --attention ours, the default)\n", what, B, T, C, NH, e.err_msg.c_str());
    exit(EXIT_FAILURE);
}

static void attn_build(fe::graph::Graph& g, const char* what, int B, int T, int C, int NH) {
    fe::error_object e = g.validate();
    if (e.is_good()) e = g.build_operation_graph(attn_handle);
    if (e.is_good()) e = g.create_execution_plans({fe::HeurMode_t::A});
    if (e.is_good()) e = g.check_support(attn_handle);
    if (e.is_good()) e = g.build_plans(attn_handle);
    if (!e.is_good()) attn_fail(what, e, B, T, C, NH);
}

// a (B, NH, T, hs) view of tensors laid out (B, T, width) with head h at channel offset h*hs
static std::vector<int64_t> attn_strides(int T, int hs, int width) {
    return {(int64_t)T * width, hs, width, 1};
}

static std::shared_ptr<fe::graph::Graph> attn_new_graph(void) {
    auto g = std::make_shared<fe::graph::Graph>();
    g->set_io_data_type(fe::DataType_t::BFLOAT16)
        .set_intermediate_data_type(fe::DataType_t::FLOAT)
        .set_compute_data_type(fe::DataType_t::FLOAT);
    return g;
}

static std::shared_ptr<fe::graph::Tensor_attributes> attn_input(fe::graph::Graph& g, const char* name, int uid,
                                                                 int B, int T, int NH, int hs, int width) {
    return g.tensor(fe::graph::Tensor_attributes().set_name(name).set_uid(uid)
                        .set_dim({B, NH, T, hs}).set_stride(attn_strides(T, hs, width)));
}

static const AttnGraphs& attn_graphs(int B, int T, int C, int NH) {
    int hs = C / NH;
    AttnShape key = std::make_tuple(B, T, NH, hs);
    auto it = attn_cache.find(key);
    if (it != attn_cache.end()) return it->second;
    if (attn_handle == NULL && cudnnCreate(&attn_handle) != CUDNN_STATUS_SUCCESS) {
        fprintf(stderr, "Error: --attention cudnn: cudnnCreate failed (is libcudnn for this CUDA installed?)\n");
        exit(EXIT_FAILURE);
    }
    float scale = 1.0f / sqrtf((float)hs);
    AttnGraphs graphs;

    auto f = attn_new_graph();
    auto q = attn_input(*f, "q", UID_Q, B, T, NH, hs, 3 * C);
    auto k = attn_input(*f, "k", UID_K, B, T, NH, hs, 3 * C);
    auto v = attn_input(*f, "v", UID_V, B, T, NH, hs, 3 * C);
    auto fwd_options = fe::graph::SDPA_attributes().set_name("sdpa").set_generate_stats(true)
                           .set_causal_mask(true).set_attn_scale(scale);
    auto [o, lse] = f->sdpa(q, k, v, fwd_options);
    o->set_output(true).set_uid(UID_O).set_dim({B, NH, T, hs}).set_stride(attn_strides(T, hs, C));
    lse->set_output(true).set_uid(UID_LSE).set_data_type(fe::DataType_t::FLOAT)
        .set_dim({B, NH, T, 1}).set_stride({(int64_t)NH * T, T, 1, 1});
    attn_build(*f, "building the forward graph", B, T, C, NH);
    graphs.forward = f;

    auto b = attn_new_graph();
    auto bq = attn_input(*b, "q", UID_Q, B, T, NH, hs, 3 * C);
    auto bk = attn_input(*b, "k", UID_K, B, T, NH, hs, 3 * C);
    auto bv = attn_input(*b, "v", UID_V, B, T, NH, hs, 3 * C);
    auto bo = attn_input(*b, "o", UID_O, B, T, NH, hs, C);
    auto bdo = attn_input(*b, "do", UID_DO, B, T, NH, hs, C);
    auto blse = b->tensor(fe::graph::Tensor_attributes().set_name("lse").set_uid(UID_LSE)
                              .set_data_type(fe::DataType_t::FLOAT)
                              .set_dim({B, NH, T, 1}).set_stride({(int64_t)NH * T, T, 1, 1}));
    auto bwd_options = fe::graph::SDPA_backward_attributes().set_name("sdpa_backward").set_causal_mask(true)
                           .set_attn_scale(scale).set_deterministic_algorithm(true);
    auto [dq, dk, dv] = b->sdpa_backward(bq, bk, bv, bo, bdo, blse, bwd_options);
    dq->set_output(true).set_uid(UID_DQ).set_dim({B, NH, T, hs}).set_stride(attn_strides(T, hs, 3 * C));
    dk->set_output(true).set_uid(UID_DK).set_dim({B, NH, T, hs}).set_stride(attn_strides(T, hs, 3 * C));
    dv->set_output(true).set_uid(UID_DV).set_dim({B, NH, T, hs}).set_stride(attn_strides(T, hs, 3 * C));
    attn_build(*b, "building the deterministic backward graph", B, T, C, NH);
    graphs.backward = b;
    return attn_cache.emplace(key, graphs).first->second;
}

size_t attention_cudnn_scratch_bytes(int B, int T, int C, int NH) {
    const AttnGraphs& g = attn_graphs(B, T, C, NH);
    int64_t f = g.forward->get_workspace_size(), b = g.backward->get_workspace_size();
    return (size_t)(f > b ? f : b);
}

static void attn_execute(const fe::graph::Graph& g, std::unordered_map<int64_t, void*>& pack, void* scratch,
                         cudaStream_t stream, const char* what, int B, int T, int C, int NH) {
    if (cudnnSetStream(attn_handle, stream) != CUDNN_STATUS_SUCCESS) {
        fprintf(stderr, "Error: --attention cudnn: cudnnSetStream failed\n");
        exit(EXIT_FAILURE);
    }
    fe::error_object e = g.execute(attn_handle, pack, scratch);
    if (!e.is_good()) attn_fail(what, e, B, T, C, NH);
}

void attention_cudnn_forward(__nv_bfloat16* out, float* lse, const __nv_bfloat16* qkv, int B, int T, int C, int NH,
                             void* scratch, cudaStream_t stream) {
    const AttnGraphs& g = attn_graphs(B, T, C, NH);
    __nv_bfloat16* in = const_cast<__nv_bfloat16*>(qkv);   // cuDNN's variant pack takes void*; nothing is written there
    std::unordered_map<int64_t, void*> pack = {
        {UID_Q, in}, {UID_K, in + C}, {UID_V, in + 2 * C}, {UID_O, out}, {UID_LSE, lse}};
    attn_execute(*g.forward, pack, scratch, stream, "the forward", B, T, C, NH);
}

void attention_cudnn_backward(__nv_bfloat16* dqkv, const __nv_bfloat16* dout, const __nv_bfloat16* qkv, const __nv_bfloat16* out, const float* lse,
                              int B, int T, int C, int NH, void* scratch, cudaStream_t stream) {
    const AttnGraphs& g = attn_graphs(B, T, C, NH);
    __nv_bfloat16* in = const_cast<__nv_bfloat16*>(qkv);
    std::unordered_map<int64_t, void*> pack = {
        {UID_Q, in}, {UID_K, in + C}, {UID_V, in + 2 * C}, {UID_O, const_cast<__nv_bfloat16*>(out)},
        {UID_DO, const_cast<__nv_bfloat16*>(dout)}, {UID_LSE, const_cast<float*>(lse)},
        {UID_DQ, dqkv}, {UID_DK, dqkv + C}, {UID_DV, dqkv + 2 * C}};
    attn_execute(*g.backward, pack, scratch, stream, "the backward", B, T, C, NH);
}

void attention_cudnn_free(void) {
    attn_cache.clear();
    if (attn_handle != NULL) cudnnDestroy(attn_handle);
    attn_handle = NULL;
}
