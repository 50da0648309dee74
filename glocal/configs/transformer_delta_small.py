"""``transformer_small`` as a dense delta-rule hybrid: the same width, heads and SwiGLU 768, with
three Gated DeltaNet layers then one global attention layer (``"dddg"``; the delta layers use
the attention shape: 2 key heads, 4 value heads of 64). Decoding keeps a fixed state for three
of the four layers, so at long contexts its cache is about a quarter of the baseline's; the
mixer is compared with attention here without the MoE of ``moe_qwen3_next_small``."""

FAMILY = "transformer"

CONFIG = dict(
    vocab_size=384, d_model=256, num_layers=4, num_heads=4, num_kv_heads=2, d_ff=768, layer_pattern="dddg",
    max_seq_len=512,
)
