"""Small FIT that trains on a 2-core CPU, matched to ``transformer_small`` (d=256, GQA 4:2,
SwiGLU 768): groups of 32 tokens with 8 latents each, spec (1)1(1) = 2 local layers, 1 global
layer, l2x + x2l cross-attention; 2.95M non-embedding parameters (baseline 3.15M)."""

CONFIG = dict(
    vocab_size=384, d_model=256, num_heads=4, num_kv_heads=2, d_ff=768, group_size=32, num_latents=8,
    layer_spec="(1)1(1)", max_seq_len=512,
)
