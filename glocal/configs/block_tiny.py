"""Tiny Block Transformer for unit tests: blocks of 4 tokens, prefix 2, 2 + 2 layers at d=32."""

FAMILY = "block"

CONFIG = dict(
    vocab_size=384, block_size=4, prefix_len=2, d_block=32, block_layers=2, block_heads=2, block_d_ff=64,
    d_token=32, token_layers=2, token_heads=2, token_d_ff=64, max_seq_len=64,
)
