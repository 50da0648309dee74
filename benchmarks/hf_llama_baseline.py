"""The PyTorch peer: training throughput of Hugging Face ``LlamaForCausalLM`` on CPU.

Default shape: the ``bench`` preset (glocal/configs/transformer_bench.py: d=512, 8 layers,
8 heads, ffn 1408, vocab 256, seq 512, batch 8), AdamW. Needs torch and transformers, which
glocal does not depend on (``pip install torch transformers``; any venv that has them):

    python benchmarks/hf_llama_baseline.py --steps 10 --warmup 2            # standalone
    python benchmarks/hf_llama_baseline.py --serve ...                      # worker (below)

A step is what glocal's trainer does: forward with labels (causal LM loss), backward, global-norm
clipping at 1.0, AdamW (weight decay 0.1), zero_grad; on random token ids (throughput does not
depend on the data). ``--dtype bfloat16`` casts the model (parameters and compute) to bf16;
with ``--bf16-mode autocast`` the model, gradients and AdamW state stay float32 and the forward
runs under ``torch.autocast`` in bf16 (mixed precision, what glocal's ``dtype=bfloat16`` does).

``--serve`` is the worker ``train_throughput.py --peer torch`` starts: it builds the model,
runs the warm-up steps, prints one ``ready`` JSON line, then for each line ``N`` on stdin
runs N steps and prints their times as JSON. Run in its own process, torch's thread pool
never competes with XLA's: whichever side is not being timed is blocked on a pipe.
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

# The bench preset (glocal/configs/transformer_bench.py) and the benchmark's batch.
BENCH = dict(d_model=512, layers=8, heads=8, kv_heads=8, d_ff=1408, vocab=256, seq=512, batch=8)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=10, help="timed steps (standalone)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocator, kernel choice)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    p.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa", help="attention implementation")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--bf16-mode", choices=["pure", "autocast"], default="pure",
                   help="with --dtype bfloat16: cast the whole model (pure) or keep float32 weights (autocast)")
    p.add_argument("--serve", action="store_true", help="worker mode for train_throughput.py --peer torch")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="instead of timing, profile N steps (torch.profiler) and print the top ops by self CPU time")
    for k, v in BENCH.items():
        p.add_argument(f"--{k.replace('_', '-')}", type=int, default=v)
    p.add_argument("--norm-eps", type=float, default=1e-6)
    p.add_argument("--rope-theta", type=float, default=10000.0)
    return p.parse_args(argv)


def build(args):
    """``(step, info)``: ``step()`` runs one training step and returns the loss."""
    torch.set_num_threads(args.threads)  # pinned, so runs compare with XLA on the same cores
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=args.d_ff,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.seq, rms_norm_eps=args.norm_eps,
        # transformers 5 takes rope_theta inside rope_parameters.
        rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta},
        tie_word_embeddings=False, attention_dropout=0.0,
        use_cache=False,  # training: building a KV cache would be wasted work
        attn_implementation=args.attn,
    )
    autocast = args.dtype == "bfloat16" and args.bf16_mode == "autocast"
    model = LlamaForCausalLM(config).to(torch.float32 if autocast else getattr(torch, args.dtype))
    model.train()
    assert model.config._attn_implementation == args.attn, model.config._attn_implementation
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=tokens, labels=tokens).loss  # labels are shifted inside the model
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()  # .item() also makes sure the step has finished before timing stops

    n_params = sum(p.numel() for p in model.parameters())
    info = {"torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads(), "attn": args.attn,
            "dtype": args.dtype + (" autocast" if autocast else ""), "params": n_params,
            "non_embedding_params": n_params - model.model.embed_tokens.weight.numel()}
    return step, info


def timed(step, n):
    times, loss = [], None
    for _ in range(n):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    return times, loss


def serve(args):
    step, info = build(args)
    timed(step, args.warmup)
    print(json.dumps({"ready": info}), flush=True)
    for line in sys.stdin:
        times, loss = timed(step, int(line))
        print(json.dumps({"times": times, "loss": loss}), flush=True)


def profile(step, n):
    from torch.profiler import ProfilerActivity, profile as torch_profile
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        wall = (time.perf_counter() - t0) / n
    print(f"PROFILE torch wall {wall * 1e3:.1f} ms/step over {n} steps (profiler on)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=48))


def main():
    args = parse()
    if args.serve:
        return serve(args)
    step, info = build(args)
    timed(step, args.warmup)
    if args.profile:
        return profile(step, args.profile)
    times, loss = timed(step, args.steps)
    med = statistics.median(times)  # median: robust to a stray slow step on a shared machine
    tok_s = args.batch * args.seq / med
    # The input embedding is a lookup, not a matmul (no FLOPs); the untied head is a matmul.
    # 6N for forward + backward, plus attention 12 L T d halved for the causal mask.
    flops_per_token = 6 * info["non_embedding_params"] + 6 * args.layers * args.seq * args.d_model
    print(f"torch {info['torch']}, transformers {info['transformers']}, threads {info['threads']}, "
          f"attn {args.attn}, {args.dtype}")
    print(f"shape: d={args.d_model} layers={args.layers} heads={args.heads} ffn={args.d_ff} vocab={args.vocab} "
          f"seq={args.seq} batch={args.batch}; params {info['params']:,}")
    print(f"steps {args.steps} (warmup {args.warmup}), last loss {loss:.4f}; s/step median {med:.4f}")
    print(f"tokens/s {tok_s:.1f}; model {flops_per_token * tok_s / 1e9:.2f} GFLOP/s")
    print(f"RESULT hf_llama tokens_per_s={tok_s:.1f}")


if __name__ == "__main__":
    main()
