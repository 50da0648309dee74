"""Tiny Based for unit tests: 5 layers (conv, linear, window 8, conv, conv), d=64, F=8."""

FAMILY = "based"

CONFIG = dict(
    vocab_size=384, d_model=64, num_layers=5, num_heads=4, num_kv_heads=2, d_ff=128, layer_pattern="clscc",
    sliding_window=8, feature_dim=8, max_seq_len=256,
)
