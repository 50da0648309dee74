"""~121M-parameter baseline for accelerators: 12 layers, d=768, 12 heads, SwiGLU 3328.

Pairs with the ~100M FIT / Block Transformer presets for matched comparisons.
Train in bfloat16 compute: ``glocal train --config transformer_base ... dtype=bfloat16``.
"""

FAMILY = "transformer"

CONFIG = dict(
    vocab_size=384, d_model=768, num_layers=12, num_heads=12, num_kv_heads=12, d_ff=3328,
    max_seq_len=2048,
)
