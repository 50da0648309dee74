"""Tiny Mixture-of-Recursions for unit tests: d=64, GQA 4:2, middle_cycle with 4 unrolled
layers = first + 1 shared layer x 2 recursions + last; expert-choice router, capacities 1, 1/2."""

FAMILY = "mor"

CONFIG = dict(
    vocab_size=384, d_model=64, num_layers=4, num_heads=4, num_kv_heads=2, d_ff=192, num_recursions=2,
    max_seq_len=256,
)
