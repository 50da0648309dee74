"""~113M non-embedding FIT for accelerators (the paper's language-model shape): L=2048 in 32 groups of
64 tokens, 8 latents per group (256 global latents), c = d = 768, 12 heads, spec
(2)2(2)2(2)2(2) = 8 local + 6 global layers + 6 cross-attentions, SwiGLU 2048 (pairs with
``transformer_base``, 120M non-embedding)."""

FAMILY = "fit"

CONFIG = dict(
    vocab_size=384, d_model=768, num_heads=12, d_ff=2048, group_size=64, num_latents=8,
    layer_spec="(2)2(2)2(2)2(2)", max_seq_len=2048,
)
