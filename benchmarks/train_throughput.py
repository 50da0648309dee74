"""Training throughput and MFU of the baseline on the `bench` shape.

    python benchmarks/train_throughput.py [--steps 10] [--dtype float32] [--remat none]

Shape: d_model 512, 8 layers, 8 heads, ffn 1408 (SwiGLU), vocab 256, seq 512, batch 8, AdamW.
FLOPs per token (training = 3x forward):
    6 * N_matmul                 (N_matmul = all matmul parameters incl. the output head;
                                  the embedding lookup is not a matmul and is excluded)
  + 6 * n_layers * T * d_model   (attention scores + values: 12 * L * T * d for full
                                  attention, counted at HALF because the mask is causal)
MFU = model FLOPs/s / the machine's dense matmul FLOP/s measured here (best of 3 shapes).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from common import machine, matmul_peak_flops, median, time_fn  # noqa: E402

import glocal.models as gm  # noqa: E402
from glocal.train.step import loss_terms  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--remat", default="all_dots",
                   help="all_dots measured fastest on 2-core CPU (saves every matmul, recomputes the rest)")
    p.add_argument("--attention-impl", default="auto")
    p.add_argument("--no-scan", action="store_true", help="unroll layers instead of lax.scan")
    args = p.parse_args()

    print(machine())
    peaks = matmul_peak_flops()
    for shape, f in peaks.items():
        print(f"matmul {shape} float32: {f / 1e9:.1f} GFLOP/s")
    peak = max(peaks.values())

    model = gm.build("transformer", "bench", dtype=args.dtype, remat=args.remat, scan_layers=not args.no_scan,
                     attention_impl=args.attention_impl)
    cfg = model.config
    graphdef, params = nnx.split(model, nnx.Param)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    # Matmul parameters: everything but norm scales and the embedding table (a lookup).
    n_matmul = sum(v.size for path, v in nnx.to_flat_state(params)
                   if not any("norm" in str(k) for k in path) and "table_VD" not in path)
    flops_per_token = 6 * n_matmul + 6 * cfg.num_layers * args.seq * cfg.d_model

    tx = optax.adamw(3e-4, weight_decay=0.1)
    opt_state = tx.init(params)

    def step(params, opt_state, batch):
        # The trainer's loss (glocal.train.step): token-mean cross-entropy, no z-loss.
        loss_of = lambda p: loss_terms(nnx.merge(graphdef, p), batch, args.batch * args.seq, 0.0)[0]
        loss, grads = jax.value_and_grad(loss_of)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    step = jax.jit(step, donate_argnums=(0, 1))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq + 1)), jnp.int32)
    ones = jnp.ones((args.batch, args.seq), jnp.int32)  # one document per row, every token counted
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "positions": jnp.cumsum(ones, 1) - 1,
             "segment_ids": ones, "loss_mask": ones.astype(jnp.float32)}
    state = {"p": params, "o": opt_state}

    def run():
        state["p"], state["o"], loss = step(state["p"], state["o"], batch)
        loss.block_until_ready()

    times = time_fn(run, warmup=2, iters=args.steps)
    t = median(times)
    tps = args.batch * args.seq / t
    mfu = tps * flops_per_token / peak
    print(f"params {n_params:,} (matmul {n_matmul:,}); FLOPs/token {flops_per_token:,}")
    print(f"step median {t:.3f} s (min {min(times):.3f}, max {max(times):.3f}) over {args.steps}")
    print(f"tokens/s {tps:,.0f}; model {tps * flops_per_token / 1e9:.1f} GFLOP/s; "
          f"peak matmul {peak / 1e9:.1f} GFLOP/s; MFU {100 * mfu:.1f}%")
    print(f"RESULT glocal_train dtype={args.dtype} remat={args.remat} tokens_per_s={tps:.1f} mfu={mfu:.3f}")


if __name__ == "__main__":
    main()
