"""Tiny baseline for unit tests: 2 layers, d=64, GQA 4:2 heads, ~0.1M params; compiles in ~2 s."""

FAMILY = "transformer"

CONFIG = dict(
    vocab_size=384, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=192,
    max_seq_len=256,
)
