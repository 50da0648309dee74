"""Based for accelerators, the zoo's proposal at GPT-2-small scale (96.5M non-embedding
parameters; ~135M with a 50k-token vocabulary): d=768, 15 layers as
three repeats of (conv, linear, window, conv, conv), 12 heads, Taylor feature dim 16, a window
of 65 tokens (a look-back of 64: the paper's ``window_size: 128`` convention halves its
number), SwiGLU 1536 (= 2d, as in the paper), tied embeddings, context 2048."""

FAMILY = "based"

CONFIG = dict(
    vocab_size=384, d_model=768, num_layers=15, num_heads=12, d_ff=1536, layer_pattern="clscc",
    sliding_window=65, feature_dim=16, tie_embeddings=True, max_seq_len=2048,
)
