"""SmolLM-135M-shaped Mixture-of-Recursions for accelerators (30 unrolled layers, d=576,
9 heads / 3 kv heads, SwiGLU 1536, tied embeddings), middle_cycle with 2 recursions of 14
shared layers, expert-choice router (capacities 1, 1/2). Train with ``dtype=bfloat16``."""

FAMILY = "mor"

CONFIG = dict(
    vocab_size=384, d_model=576, num_layers=30, num_heads=9, num_kv_heads=3, d_ff=1536, num_recursions=2,
    tie_embeddings=True, max_seq_len=2048,
)
