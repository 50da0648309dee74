"""Small Mixture-of-Recursions that trains on a 2-core CPU: ``transformer_small``'s width
(d=256, GQA 4:2, SwiGLU 768), middle_cycle with 4 unrolled layers = first + 1 shared layer x
2 recursions + last, expert-choice router (capacities 1, 1/2): 3 layers of parameters
(0.75x the baseline's 4) and 3.5 layers of compute per token. ``mor_small_r3`` is the
3-recursion variant."""

FAMILY = "mor"

CONFIG = dict(
    vocab_size=384, d_model=256, num_layers=4, num_heads=4, num_kv_heads=2, d_ff=768, num_recursions=2,
    max_seq_len=512,
)
