"""Mixture-of-Recursions card: parameters, FLOPs, cache bytes, decode speed, and the iso-FLOP
comparison on the default corpus.

    python benchmarks/mor.py --sections card decode
    python benchmarks/mor.py --sections isoflop --runs-dir runs/isoflop      # ~40 min on 2 cores

Models: ``vanilla`` = ``transformer_small``; ``full`` = ``mor_small``'s shape with every token
taking every step (``recursion_router=none``: the recursive baseline with the same weights);
``mor2`` / ``mor3`` = expert-choice MoR with 2 / 3 recursions (``mor_small``, ``mor_small_r3``);
``mor3_tc`` = ``mor_small_r3`` with the token-choice router.

Sections:
  card     parameters (total / non-embedding), training FLOPs per token at 256 and 2,048 tokens
           (routing-aware), decode cache bytes at L = 2,048 (formula = allocated pytree) and
           the ratios to full recursion (recursion-wise KV: (N_r + 1) / (2 N_r) of the shared
           layers' bytes) and to vanilla
  decode   prefill and decode tokens/s at batch 1 and 32 after a 2,048-token prompt (greedy
           on-device loop, threshold routing; method of benchmarks/efficiency.py)
  isoflop  trains each model for the same training FLOPs as vanilla's README run (450 steps x
           16 x 256 tokens; --budget-steps), so cheaper models see more tokens; reports validation
           bits-per-byte under causal (threshold) routing and top-k, parameters, tokens seen;
           writes a PNG of bits-per-byte vs training FLOPs (--png)

Lines starting with RESULT are machine-readable.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from common import machine  # noqa: E402
from efficiency import decode_speeds, params  # noqa: E402

import glocal.models as gm  # noqa: E402
from glocal.layers.cache import tree_nbytes  # noqa: E402

MODELS = {
    "vanilla": ("transformer_small", {}),
    "full": ("mor_small", {"recursion_router": "none"}),
    "mor2": ("mor_small", {}),
    "mor3": ("mor_small_r3", {}),
    "mor3_tc": ("mor_small_r3", {"recursion_router": "token_choice"}),
}
BUDGET = dict(steps=450, batch_size=16, seq_len=256)  # vanilla's README run (--budget-steps to change)


def build(name, max_len=None, **extra):
    config, kw = MODELS[name]
    family, preset = gm.split_config_name(config)
    kw = {**kw, **extra}
    if max_len:
        kw["max_seq_len"] = max_len
    cfg = gm.get_config(family, preset, **kw)
    if hasattr(cfg, "routing_modes") and cfg.routing_modes():
        kw.setdefault("routing_mode", "threshold")  # decoding and caches use causal routing
    return gm.build(family, preset, **kw)


def section_card(args):
    L = 2048
    print(f"\n## card: parameters, FLOPs/token, cache bytes per sequence at L = {L}")
    caches = {}
    for name in args.models:
        m = nnx.eval_shape(lambda: build(name, L))
        total, non_emb = params(m)
        cache = m.cache_nbytes(1, L)
        assert cache == tree_nbytes(jax.eval_shape(lambda: m.init_cache(1, L)))
        caches[name] = cache
        print(f"{name:8s} params {total / 1e6:6.2f}M ({non_emb / 1e6:5.2f}M non-emb)  FLOPs/token "
              f"{m.flops_per_token(256) / 1e6:6.1f}M @256 {m.flops_per_token(L) / 1e6:6.1f}M @{L}  "
              f"cache {cache / 2**20:6.2f} MiB", flush=True)
        print(f"RESULT mor_card model={name} params={total} non_embedding={non_emb} "
              f"flops_256={m.flops_per_token(256):.0f} flops_2048={m.flops_per_token(L):.0f} cache_bytes={cache}")
    if "full" in caches:
        for name in ("mor2", "mor3"):
            if name not in caches:
                continue
            cfg = gm.get_config(*gm.split_config_name(MODELS[name][0]))
            R = cfg.num_recursions
            full_r = nnx.eval_shape(lambda: build("full", L, num_layers=cfg.num_layers, num_recursions=R))
            per_slot = 2 * (cfg.num_kv_heads or cfg.num_heads) * (cfg.d_model // cfg.num_heads) * 4 + 4  # K, V, pos
            unique = 2 * L * per_slot  # the first and last layers
            shared = lambda n: n - unique - 4 - 4 * cfg.base_depth * R - 4 * R  # the shared layers' slots
            ratio = shared(caches[name]) / shared(full_r.cache_nbytes(1, L))
            print(f"{name}: shared-layer KV vs full recursion {ratio:.4f} (formula (N_r + 1) / (2 N_r) = "
                  f"{(R + 1) / (2 * R):.4f}); whole cache vs full recursion "
                  f"{caches[name] / full_r.cache_nbytes(1, L):.3f}, vs vanilla "
                  f"{caches[name] / caches.get('vanilla', np.nan):.3f}")


def section_decode(args):
    print(f"\n## prefill and decode after a {args.prompt_len}-token prompt (greedy, on-device loop)")
    for name in args.models:
        for B, prefill_tps, decode_tps in decode_speeds(build(name, args.prompt_len + args.new), args):
            print(f"{name:8s} batch {B:3d}: prefill {prefill_tps:10,.0f} tok/s  decode {decode_tps:9,.0f} tok/s",
                  flush=True)
            print(f"RESULT mor_decode model={name} batch={B} prefill_tokens_per_s={prefill_tps:.1f} "
                  f"decode_tokens_per_s={decode_tps:.1f}")


def section_isoflop(args):
    from glocal.train.evaluate import evaluate_workdir
    from glocal.train.trainer import train

    runs = pathlib.Path(args.runs_dir)
    BUDGET["steps"] = args.budget_steps
    tokens_per_step = BUDGET["batch_size"] * BUDGET["seq_len"]
    fpt = lambda name: nnx.eval_shape(lambda: build(name, 512)).flops_per_token(BUDGET["seq_len"])
    budget = fpt("vanilla") * BUDGET["steps"] * tokens_per_step
    print(f"\n## iso-FLOP: {budget:.3e} training FLOPs each (vanilla: {BUDGET['steps']} steps x {tokens_per_step} tokens)")
    rows = []
    for name in args.models:
        config, kw = MODELS[name]
        steps = max(1, round(budget / (fpt(name) * tokens_per_step)))
        wd = runs / name
        over = {**{k: str(v) for k, v in kw.items()}, "steps": str(steps), "batch_size": str(BUDGET["batch_size"]),
                "seq_len": str(BUDGET["seq_len"]), "eval_every": str(max(1, steps // 3)), "sample_tokens": "0"}
        train(config if not (wd / "model.json").exists() else None, wd, over)
        r = evaluate_workdir(wd, log=lambda s: None)
        causal = r.get("eval_bpb_threshold", r.get("eval_bpb"))
        total, _ = params(nnx.eval_shape(lambda: build(name, 512)))
        curve = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
        evals = [(c["tokens"] * fpt(name), c["eval_bpb"]) for c in curve if "eval_bpb" in c]
        rows.append((name, total, steps * tokens_per_step, causal, r.get("eval_bpb_topk"), r.get("routing_agreement"),
                     evals))
        print(f"{name:8s} {total / 1e6:5.2f}M params  {steps} steps = {steps * tokens_per_step:,} tokens  "
              f"bpb {causal:.3f} (causal)" + (f", {r['eval_bpb_topk']:.3f} (top-k), agreement "
                                              f"{r['routing_agreement']:.3f}" if 'eval_bpb_topk' in r else ""),
              flush=True)
        print(f"RESULT mor_isoflop model={name} params={total} tokens={steps * tokens_per_step} bpb_causal={causal:.4f}"
              + (f" bpb_topk={r['eval_bpb_topk']:.4f} agreement={r['routing_agreement']:.4f}"
                 if "eval_bpb_topk" in r else ""))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, total, _, causal, *_, evals in rows:
        ax.plot([f for f, _ in evals], [b for _, b in evals], "o-", label=f"{name} ({total / 1e6:.1f}M)")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("validation bits/byte (training routing)")
    ax.set_title("iso-FLOP runs (the table reports causal routing)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.png, dpi=120)
    print(f"wrote {args.png}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sections", nargs="+", default=["card", "decode"], choices=["card", "decode", "isoflop"])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--prompt-len", type=int, default=2048)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--runs-dir", default="runs/isoflop")
    p.add_argument("--budget-steps", type=int, default=450, help="vanilla's steps (x 16 x 256 tokens) that set the FLOPs")
    p.add_argument("--png", default="mor_isoflop.png")
    args = p.parse_args()
    print(machine())
    for s in args.sections:
        globals()[f"section_{s}"](args)


if __name__ == "__main__":
    main()
