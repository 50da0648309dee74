"""Tiny FIT for unit tests: groups of 8 tokens, 2 latents each, spec (1)1(1)1(1), d=32."""

FAMILY = "fit"

CONFIG = dict(
    vocab_size=384, d_model=32, num_heads=2, d_ff=64, group_size=8, num_latents=2,
    layer_spec="(1)1(1)1(1)", max_seq_len=64,
)
