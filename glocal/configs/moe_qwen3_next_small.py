"""Small Qwen3-Next-style hybrid that trains on a 2-core CPU, shaped like ``moe_small``
(d=256, 4 layers, 4 heads of 64 with GQA 4:2, 512-token context): three Gated DeltaNet
layers then one gated full attention (``"dddg"``); every FFN routes each token to 2 of 8
experts of width 256 and adds a sigmoid-gated shared expert of width 256, so a token uses
SwiGLU width 768 like the dense baseline. Zero-centred RMSNorms, qk-norm, RoPE on a quarter of
each head, an output gate per attention head (Qwen3-Next's choices). Decoding state: three
fixed-size delta layers and one growing KV cache."""

FAMILY = "moe"

CONFIG = {
    "vocab_size": 384, "d_model": 256, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "d_ff": 768,
    "layer_pattern": "dddg", "norm": "rms_centered", "qk_norm": True, "attn_output_gate": True, "rope_fraction": 0.25,
    "num_experts": 8, "top_k": 2, "d_expert": 256, "router_weights": "renorm", "shared_experts": 1,
    "moe.d_shared": 256, "moe.shared_gate": True, "first_dense_layers": 0, "moe_every": 1, "max_seq_len": 512,
}
