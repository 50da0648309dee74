"""``transformer_small`` with every layer a sliding window of 128 tokens plus 4 attention sinks
(the first 4 tokens of the sequence, StreamingLLM's ``SlidingWindow(128) | Sinks(4)``), RoPE at
absolute positions. Its decoding cache is 132 slots per layer however long the text, so
``glocal generate`` runs past ``max_seq_len`` in constant memory. Same parameters as ``small``."""

FAMILY = "transformer"

CONFIG = {
    "vocab_size": 384, "d_model": 256, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "d_ff": 768,
    "layer_pattern": "s", "window.size": 128, "window.sinks": 4, "max_seq_len": 512,
}
