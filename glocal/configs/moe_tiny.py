"""Tiny MoE for unit tests: 3 layers (one dense, then dense + routed), d=64, 4 experts of
width 96, top-2, GQA 4:2 heads."""

FAMILY = "moe"

CONFIG = dict(
    vocab_size=384, d_model=64, num_layers=3, num_heads=4, num_kv_heads=2, d_ff=192, num_experts=4, top_k=2,
    d_expert=96, first_dense_layers=1, moe_every=2, max_seq_len=256,
)
