"""Small Block Transformer that trains on a 2-core CPU, matched to ``transformer_small``:
the baseline's 4 layers split 1:1 into a 2-layer block decoder and a 2-layer token decoder
(d=256, GQA 4:2, SwiGLU 768), blocks of 4 tokens, prefix 2; 3.28M non-embedding parameters
(baseline 3.15M)."""

FAMILY = "block"

CONFIG = dict(
    vocab_size=384, block_size=4, prefix_len=2,
    d_block=256, block_layers=2, block_heads=4, block_kv_heads=2, block_d_ff=768,
    d_token=256, token_layers=2, token_heads=4, token_kv_heads=2, token_d_ff=768,
    max_seq_len=512,
)

# Training defaults for a new workdir. Learning rate from the architecture sweep
# (benchmarks/pareto.py): best at 2e13 training FLOPs (2.400 vs 2.490 at 7.5e-4 and 2.614 at
# 3e-3), level with 7.5e-4 at 1e13 (3.010 vs 3.009).
TRAIN = dict(learning_rate=1.5e-3)
