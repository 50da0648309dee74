"""Mixture-of-Recursions with enough shared depth for recursion to pay at a small budget:
``transformer_small``'s width (d=256, GQA 4:2, SwiGLU 768) at 8 unrolled layers, middle_cycle
= first + 3 shared layers x 2 recursions + last, expert-choice router (capacities 1, 1/2).
5 layers of parameters against an 8-layer vanilla model's 8 (0.64x the non-embedding
parameters) and about 0.8x its FLOPs per token, so at equal training FLOPs it sees ~1.25x
the tokens. ``mor_small`` (4 unrolled layers) has a single shared layer and gains only 1.14x
tokens; the architecture comparison (benchmarks/pareto.py) uses this one."""

FAMILY = "mor"

CONFIG = dict(
    vocab_size=384, d_model=256, num_layers=8, num_heads=4, num_kv_heads=2, d_ff=768, num_recursions=2,
    max_seq_len=512,
)

# Training defaults for a new workdir. Learning rate: the best of the architecture sweep's grid
# (benchmarks/pareto.py) at 1e13 and 2e13 training FLOPs.
TRAIN = dict(learning_rate=1.5e-3)
