"""Small MoE that trains on a 2-core CPU: ``transformer_small``'s shape (d=256, 4 layers,
GQA 4:2) with every FFN routed: 8 experts of width 384, top-2, so each token uses the same
FFN parameters as the baseline's SwiGLU 768 (active parameters match; total FFN parameters
are 4x: 10.4M parameters in all, 3.35M active). Dropless dispatch, Switch balance loss 0.01, router z-loss 0.001."""

FAMILY = "moe"

CONFIG = dict(
    vocab_size=384, d_model=256, num_layers=4, num_heads=4, num_kv_heads=2, d_ff=768, num_experts=8, top_k=2,
    d_expert=384, max_seq_len=512,
)

# Training defaults for a new workdir. Learning rate: the best of the architecture sweep's grid
# (benchmarks/pareto.py) at 1e13 and 2e13 training FLOPs, as for the dense baseline; 3e-3, the
# old default, was 0.06-0.19 bits-per-byte worse there (each expert's Adam step is full-sized
# but estimated from about a quarter of the batch).
TRAIN = dict(learning_rate=1.5e-3)
