"""Small Based that trains on a 2-core CPU, matched to ``transformer_small`` (3.15M
non-embedding parameters; this: 3.17M): d=256, 5 layers in the paper's pattern (conv, linear,
window, conv, conv), 4 heads (GQA 4:2), Taylor feature dim 16, a 64-token window (the query
and 63 earlier tokens), SwiGLU 432, untied head like the baseline. Trained with the README's
defaults (450 x 16 x 256 tokens) it is compared with the baseline in benchmarks/RESULTS.md."""

FAMILY = "based"

CONFIG = dict(
    vocab_size=384, d_model=256, num_layers=5, num_heads=4, num_kv_heads=2, d_ff=432, layer_pattern="clscc",
    sliding_window=64, feature_dim=16, max_seq_len=512,
)
