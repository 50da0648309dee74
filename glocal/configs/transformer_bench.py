"""The benchmark shape of benchmarks/RESULTS.md: d=512, 8 layers, 8 heads, ffn 1408, vocab 256,
sequence 512 (batch 8, float32, AdamW in the benchmark script). ~26.0M params."""

FAMILY = "transformer"

CONFIG = dict(
    vocab_size=256, d_model=512, num_layers=8, num_heads=8, num_kv_heads=8, d_ff=1408,
    max_seq_len=1536,
)
