"""GPT-OSS's layout at test size: 4 layers alternating a sliding window of 8 tokens and global
attention (``"sg"``), every attention with learned per-head sinks and biases on the q/k/v and
output projections, RoPE with YaRN scaling (x8 over a 32-token original context, no rounding
of the blend's bounds, so the attention factor 0.1 ln 8 + 1 scales q and k); every FFN a routed
MoE (top-2 of 4 experts of width 48) with a bias on the router logits, biases on both expert
projections and the clamped SwiGLU (alpha 1.702, limit 7). The shape Hugging Face
``GptOssForCausalLM`` checkpoints map onto (``glocal.hf``)."""

FAMILY = "moe"

CONFIG = {
    "vocab_size": 384, "d_model": 64, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16,
    "d_ff": 128, "layer_pattern": "sg", "sliding_window": 8, "attn_sinks": True, "qkv_bias": True,
    "attn_out_bias": True, "norm_eps": 1e-5, "rope_theta": 150_000.0, "rope_scaling": "yarn", "rope_factor": 8.0,
    "rope_original_context": 32, "rope_truncate": False, "mlp": "swiglu_clamped", "num_experts": 4, "top_k": 2,
    "d_expert": 48, "router_weights": "renorm", "moe.router_bias": True, "moe.expert_bias": True,
    "shared_experts": 0, "first_dense_layers": 0, "moe_every": 1, "max_seq_len": 256,
}
