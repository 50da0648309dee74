"""Small FIT that trains on a 2-core CPU, matched to ``transformer_small`` (d=256, GQA 4:2,
SwiGLU 768): groups of 64 tokens with 8 latents each (the paper's n and m), spec
(1)1(1) = 2 local layers, 1 global layer, l2x + x2l cross-attention; 2.95M non-embedding
parameters (baseline 3.15M). At equal training tokens (450 x 16 x 256) groups of 64 reached
2.139 bits-per-byte, groups of 32 2.191 and groups of 32 with 16 latents 2.400 at step 300
(benchmarks/RESULTS.md)."""

FAMILY = "fit"

CONFIG = dict(
    vocab_size=384, d_model=256, num_heads=4, num_kv_heads=2, d_ff=768, group_size=64, num_latents=8,
    layer_spec="(1)1(1)", max_seq_len=512,
)

# Training defaults for a new workdir. Learning rate from the architecture sweep
# (benchmarks/pareto.py): best at 2e13 training FLOPs (2.170; 3e-3: 2.198) and within 1% of the
# best at 1e13 (2.586; 3e-3: 2.561), the smaller worst-case loss of the two.
TRAIN = dict(learning_rate=1.5e-3)
