"""Small baseline that trains on a 2-core CPU: 6 layers, d=384, 6 heads (GQA 6:2), ~10.6M params.

The README's train command uses it on the default corpus (byte-level, vocab 384 >= 256 bytes
+ specials, padded for matmul alignment).
"""

CONFIG = dict(
    vocab_size=384, d_model=384, num_layers=6, num_heads=6, num_kv_heads=2, d_ff=1152,
    max_seq_len=512,
)
