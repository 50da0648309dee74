"""``mor_small`` with 3 recursions: 5 unrolled layers = first + 1 shared layer x 3 + last,
capacities 1, 2/3, 1/3: 3 layers of parameters, 4 layers of compute per token (the
baseline's)."""

FAMILY = "mor"

CONFIG = dict(
    vocab_size=384, d_model=256, num_layers=5, num_heads=4, num_kv_heads=2, d_ff=768, num_recursions=3,
    max_seq_len=512,
)
