"""Baseline: training throughput of Hugging Face ``LlamaForCausalLM`` (PyTorch, CPU).

Same "bench" shape as glocal/configs/transformer_bench.py (d=512, 8 layers, 8 heads, ffn 1408,
vocab 256, seq 512, batch 8, float32, AdamW), so glocal's JAX numbers have a well-known
reference point. It needs torch and transformers, which glocal does not depend on, so run it
from a separate environment, e.g.:

    python3 -m venv /work/hfvenv
    /work/hfvenv/bin/pip install torch==2.13.0 transformers==5.23.0
    /work/hfvenv/bin/python benchmarks/hf_llama_baseline.py --steps 10 --warmup 2

A step is forward with labels (causal LM loss) + backward + AdamW step + zero_grad, on random
token ids (throughput does not depend on the data).
"""

import argparse
import os
import statistics
import time

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

D_MODEL, N_LAYERS, N_HEADS, D_FF, VOCAB = 512, 8, 8, 1408, 256
SEQ, BATCH = 512, 8


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocator, kernel choice)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    p.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa", help="attention implementation")
    args = p.parse_args()

    # Pin the thread count so runs are comparable to JAX/XLA on the same cores.
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=D_FF,
        num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS, num_key_value_heads=N_HEADS,
        max_position_embeddings=SEQ, rms_norm_eps=1e-6,
        # transformers 5 takes rope_theta inside rope_parameters.
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False, attention_dropout=0.0,
        use_cache=False,  # training: building a KV cache would be wasted work
        attn_implementation=args.attn,
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    model.train()
    assert model.config._attn_implementation == args.attn, model.config._attn_implementation
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)

    n_params = sum(p.numel() for p in model.parameters())
    # The input embedding is a table lookup, not a matmul, so it costs no FLOPs; the untied
    # lm_head is a real D x V matmul per token and so stays in N.
    n_flop_params = n_params - model.model.embed_tokens.weight.numel()
    # 6N for forward+backward of the matmuls, plus attention scores and values:
    # 12*L*T*d for full attention, halved because the mask is causal.
    flops_per_token = 6 * n_flop_params + 6 * N_LAYERS * SEQ * D_MODEL

    tokens = torch.randint(0, VOCAB, (BATCH, SEQ))

    def step():
        loss = model(input_ids=tokens, labels=tokens).loss  # labels are shifted inside the model
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()  # .item() also makes sure the step has finished before timing stops

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)

    med, mean = statistics.median(times), statistics.mean(times)
    tok_s = BATCH * SEQ / med  # median: robust to a stray slow step on a shared machine
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"threads {torch.get_num_threads()}, attn {args.attn}")
    print(f"shape: d={D_MODEL} layers={N_LAYERS} heads={N_HEADS} ffn={D_FF} vocab={VOCAB} "
          f"seq={SEQ} batch={BATCH} float32")
    print(f"params {n_params:,} (non-embedding {n_flop_params:,})")
    print(f"steps {args.steps} (warmup {args.warmup}), last loss {loss:.4f}")
    print(f"s/step median {med:.4f} mean {mean:.4f}")
    print(f"tokens/s {tok_s:.1f}")
    print(f"model FLOPs/token {flops_per_token:,} -> {flops_per_token * tok_s / 1e9:.2f} GFLOP/s")
    print(f"RESULT hf_llama tokens_per_s={tok_s:.1f}")


if __name__ == "__main__":
    main()
