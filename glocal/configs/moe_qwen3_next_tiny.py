"""Qwen3-Next's layout at test size: 4 layers of 3 Gated DeltaNet mixers then one gated full
attention (``"dddg"``), every FFN a routed MoE (top-2 of 4 experts of width 48, combine weights
renormalised over the chosen two) plus one always-on shared expert of width 64 scaled by a
sigmoid gate; zero-centred RMSNorms (gain 1 + w) including the per-head q/k norms, RoPE on a
quarter of each 16-wide head, a sigmoid output gate per attention head. The delta layers use
the attention shape (2 key heads, 4 value heads, width 16) and chunks of 16 tokens, so the
conformance prompts cross chunk boundaries. The shape Hugging Face ``Qwen3NextForCausalLM``
checkpoints map onto (``glocal.hf``)."""

FAMILY = "moe"

CONFIG = {
    "vocab_size": 384, "d_model": 64, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "d_ff": 128,
    "layer_pattern": "dddg", "norm": "rms_centered", "qk_norm": True, "attn_output_gate": True, "rope_fraction": 0.25,
    "num_experts": 4, "top_k": 2, "d_expert": 48, "router_weights": "renorm", "shared_experts": 1,
    "moe.d_shared": 64, "moe.shared_gate": True, "first_dense_layers": 0, "moe_every": 1,
    "gated_delta.chunk_size": 16, "max_seq_len": 256,
}
