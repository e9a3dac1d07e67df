"""
modeling_omnimoe.py - an omnimoe model (swiglu or omni FFN) for Hugging Face transformers,
loaded with trust_remote_code=True from a folder written by dev/export_hf.py. It computes the
model of docs/design.md §1-§2 in evaluation mode, as the trainers do with training=0:
  - GPT-2 decoder: LayerNorm (eps 1e-5), causal attention, learned positions, LM head tied to
    wte; logits over the V real tokens (the padded rows were not exported).
  - swiglu: y = (SiLU(x Wg^T) * (x Wu^T)) Wd^T, c_fc rows [0, I) = Wg, [I, 2I) = Wu, no biases.
  - omni: the same shared SwiGLU plus the atomic experts: router logits l = x Wrc^T (2n),
    BN with the RUNNING statistics (l - mean) / sqrt(var + eps) (router_norm "bn"), row and
    column log-softmax, S[i n + j] = pr[i] + pc[j] in fp32, the exact top-k of S (higher score
    first, equal scores: the smaller expert id first; NaN counts as -inf), the gate (softmax of
    the k scores, or exp of each for "prob"), then sum_m g_m SiLU(<u_e, x>) v_e.
The top-k sorts every token's N scores with a stable sort: exact, O(N log N) per token, done in
chunks of tokens to bound memory. Padding: tokens only see earlier positions, so right padding
(as lm-evaluation-harness uses for log-likelihoods) does not change the real tokens' logits;
attention_mask is accepted and not used, so left padding is NOT supported. No KV cache:
generation recomputes the whole sequence each step.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

try:
    from transformers import GenerationMixin
except ImportError:  # older transformers: PreTrainedModel generates by itself
    GenerationMixin = object

from .configuration_omnimoe import OmnimoeConfig

TOPK_CHUNK_SCORES = 1 << 24  # scores sorted at once (tokens per chunk = this / N)


def exact_topk(S, k):
    """Ids (M, k) of the k best scores of each row of S (M, N): higher first, ties to the smaller id."""
    S = torch.nan_to_num(S, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    rows = max(1, TOPK_CHUNK_SCORES // S.shape[1])
    out = [torch.sort(S[i:i + rows], dim=-1, descending=True, stable=True).indices[:, :k]
           for i in range(0, S.shape[0], rows)]
    return torch.cat(out, 0)


class OmnimoeAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        C = config.n_embd
        self.n_head = config.n_head
        self.c_attn = nn.Linear(C, 3 * C)   # rows q, k, v
        self.c_proj = nn.Linear(C, C)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = [t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v)]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # scale 1/sqrt(hs)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class OmnimoeMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        C, I = config.n_embd, config.ffn_hidden
        self.I = I
        self.c_fc = nn.Linear(C, 2 * I, bias=False)    # rows [0, I) Wg, [I, 2I) Wu
        self.c_proj = nn.Linear(I, C, bias=False)      # Wd
        self.omni = config.ffn_kind == "omni"
        if self.omni:
            n, N = config.router_n, config.num_experts
            self.n, self.k = n, config.num_experts_per_tok
            self.use_bn = config.router_norm == "bn"
            self.prob_gate = config.gate == "prob"
            self.bn_eps = config.bn_eps
            self.router = nn.Linear(C, 2 * n, bias=False)  # rows [0, n) Wr, [n, 2n) Wc
            self.expert_u = nn.Parameter(torch.empty(N, C))
            self.expert_v = nn.Parameter(torch.empty(N, C))
            self.register_buffer("bn_running_mean", torch.zeros(2 * n))
            self.register_buffer("bn_running_var", torch.ones(2 * n))

    def forward(self, x):
        B, T, C = x.shape
        x = x.reshape(B * T, C)
        gu = self.c_fc(x)
        y = self.c_proj(F.silu(gu[:, :self.I]) * gu[:, self.I:])
        if self.omni:
            n, M = self.n, x.shape[0]
            l = self.router(x)
            if self.use_bn:
                l = (l - self.bn_running_mean) / torch.sqrt(self.bn_running_var + self.bn_eps)
            pr = torch.log_softmax(l[:, :n], dim=-1)
            pc = torch.log_softmax(l[:, n:], dim=-1)
            S = (pr[:, :, None] + pc[:, None, :]).reshape(M, n * n)   # S[:, i n + j]
            E = exact_topk(S, self.k)                                  # (M, k)
            s_sel = torch.gather(S, 1, E)
            g = torch.exp(s_sel) if self.prob_gate else torch.softmax(s_sel, dim=-1)
            s = (self.expert_u[E] * x[:, None, :]).sum(-1)              # (M, k)
            y = y + ((g * F.silu(s))[:, :, None] * self.expert_v[E]).sum(1)
        return y.reshape(B, T, C)


class OmnimoeBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        C, eps = config.n_embd, config.layer_norm_epsilon
        self.ln_1 = nn.LayerNorm(C, eps=eps)
        self.attn = OmnimoeAttention(config)
        self.ln_2 = nn.LayerNorm(C, eps=eps)
        self.mlp = OmnimoeMLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class OmnimoeModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList([OmnimoeBlock(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)

    def forward(self, input_ids):
        T = input_ids.shape[1]
        if T > self.wpe.num_embeddings:
            raise ValueError(f"sequence of {T} tokens, the model has {self.wpe.num_embeddings} positions")
        x = self.wte(input_ids) + self.wpe(torch.arange(T, device=input_ids.device))
        for block in self.h:
            x = block(x)
        return self.ln_f(x)


class OmnimoePreTrainedModel(PreTrainedModel):
    config_class = OmnimoeConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["OmnimoeBlock"]

    def _init_weights(self, module):
        pass  # every weight comes from the exported file


class OmnimoeForCausalLM(OmnimoePreTrainedModel, GenerationMixin):
    """The LM head is wte itself (tied, docs/design.md §1.1): logits = ln_f(h) wte^T, no lm_head."""

    def __init__(self, config):
        super().__init__(config)
        self.transformer = OmnimoeModel(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.wte

    def forward(self, input_ids=None, attention_mask=None, labels=None, return_dict=None, **kwargs):
        logits = F.linear(self.transformer(input_ids), self.transformer.wte.weight)
        loss = None
        if labels is not None:  # the next-token loss, labels = input_ids as transformers does
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        return {"input_ids": input_ids}
