"""Small baseline that trains on a 2-core CPU: 4 layers, d=256, 4 heads (GQA 4:2), SwiGLU 768,
~3.3M parameters.

The README's train command uses it on the default corpus (byte-level, vocab 384 >= 256 bytes
+ specials, padded for matmul alignment): 450 steps of 16 x 256 tokens reach validation
< 2.0 bits-per-byte in about 8 minutes on 2 cores (benchmarks/RESULTS.md). A wider 10.6M
model (d=384, 6 layers) processes ~2.6x fewer tokens per second there and ended at 2.49
bits-per-byte in the same time: at this budget, tokens seen matter more than width.
"""

FAMILY = "transformer"

CONFIG = dict(
    vocab_size=384, d_model=256, num_layers=4, num_heads=4, num_kv_heads=2, d_ff=768,
    max_seq_len=512,
)

# Training defaults for a new workdir (the command line overrides them). Learning rate: the
# best of the architecture sweep's grid (benchmarks/pareto.py: 0.75e-3 / 1.5e-3 / 3e-3 / 6e-3)
# at both budgets, 1e13 and 2e13 training FLOPs, two seeds; at the README's 450 steps it ends at
# 1.960 bits-per-byte against 1.981 with the old 3e-3.
TRAIN = dict(learning_rate=1.5e-3)
