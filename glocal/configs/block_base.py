"""~121M non-embedding Block Transformer for accelerators, the zoo's analogue of the paper's
block_main_b4_85 (blocks of 4, block:token layers 1:1): the 12 layers of ``transformer_base`` split 1:1 into
6 block-decoder and 6 token-decoder layers at d=768 (12 heads, SwiGLU 3328), blocks of 4,
prefix 2, context 2048."""

FAMILY = "block"

CONFIG = dict(
    vocab_size=384, block_size=4, prefix_len=2,
    d_block=768, block_layers=6, block_heads=12, block_d_ff=3328,
    d_token=768, token_layers=6, token_heads=12, token_d_ff=3328,
    max_seq_len=2048,
)
