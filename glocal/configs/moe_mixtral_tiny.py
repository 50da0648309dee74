"""Mixtral's layout at test size: every layer routed, top-2 of 8 experts, combine weights =
softmax over the two chosen logits ("renorm"), no shared experts, no router bias, RMSNorm,
RoPE, GQA, untied head: the shape Hugging Face ``MixtralForCausalLM`` checkpoints map onto."""

FAMILY = "moe"

CONFIG = dict(
    vocab_size=384, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=128, num_experts=8, top_k=2,
    router_weights="renorm", shared_experts=0, max_seq_len=256,
)
