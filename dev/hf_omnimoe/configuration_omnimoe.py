"""
configuration_omnimoe.py - the Hugging Face configuration of an omnimoe model exported by
dev/export_hf.py (swiglu and omni; gelu exports as a standard GPT-2). The fields mirror the
model file's header (docs/design.md §5.1) in GPT-2's names.
"""
try:
    from transformers import PretrainedConfig
except ImportError:  # newer transformers spell it PreTrainedConfig
    from transformers import PreTrainedConfig as PretrainedConfig


class OmnimoeConfig(PretrainedConfig):
    model_type = "omnimoe"
    attribute_map = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer",
                     "num_attention_heads": "n_head", "max_position_embeddings": "n_positions"}

    def __init__(self, vocab_size=50257, padded_vocab_size=50304, n_positions=1024, n_embd=768, n_layer=12,
                 n_head=12, ffn_kind="omni", ffn_hidden=1920, router_n=128, num_experts=16384, num_experts_per_tok=32,
                 router_norm="bn", gate="softmax", layer_norm_epsilon=1e-5, bn_eps=1e-5, bos_token_id=50256,
                 eos_token_id=50256, tie_word_embeddings=True, **kwargs):
        self.vocab_size = vocab_size            # V: the padded rows of wte are not exported
        self.padded_vocab_size = padded_vocab_size
        self.n_positions = n_positions          # maxT
        self.n_embd = n_embd                    # C
        self.n_layer = n_layer                  # L
        self.n_head = n_head                    # NH
        self.ffn_kind = ffn_kind                # "swiglu" | "omni"
        self.ffn_hidden = ffn_hidden            # I, the (shared) SwiGLU width
        self.router_n = router_n                # n: experts on an n x n grid (omni)
        self.num_experts = num_experts          # N = n * n
        self.num_experts_per_tok = num_experts_per_tok  # k experts per token (not "top_k": a generation flag)
        self.router_norm = router_norm          # "bn" (running statistics) | "none"
        self.gate = gate                        # "softmax" | "prob"
        self.layer_norm_epsilon = layer_norm_epsilon
        self.bn_eps = bn_eps
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
