"""~125M-active MoE for accelerators (Switch / ST-MoE practice): ``transformer_base``'s shape
(d=768, 12 layers, 12 heads) with every other FFN routed (6 MoE layers), 8 experts of width
1664, top-2: active parameters per token match the dense 3328-wide FFN (~121M in all);
total 259M. Train in bfloat16 compute with ``dtype=bfloat16``; ``moe_impl=capacity
capacity_factor=1.25`` for static shapes on TPU."""

FAMILY = "moe"

CONFIG = dict(
    vocab_size=384, d_model=768, num_layers=12, num_heads=12, num_kv_heads=12, d_ff=3328, num_experts=8, top_k=2,
    d_expert=1664, moe_every=2, max_seq_len=2048,
)
