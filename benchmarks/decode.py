"""Decode throughput of the baseline (`bench` shape) with a 1,024-token prompt.

    python benchmarks/decode.py [--new 128] [--batches 1 16]

For each batch size: prefill time (generate with 1 new token), then generate with N new
tokens; per-token decode latency = (t(N) - t(1)) / (N - 1), so prefill and compile are
excluded. It is compared with one teacher-forced forward of a single token (batch 1, jitted):
the target is decode latency within 2x of that forward. The decode loop is one jitted
program (no per-token host sync or recompilation).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from common import machine, median, time_fn  # noqa: E402

import glocal  # noqa: E402
import glocal.models as gm  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--iters", type=int, default=3)
    args = p.parse_args()
    print(machine())
    model = gm.build("transformer", "bench", dtype=args.dtype)
    rng = np.random.default_rng(0)

    graphdef, state = nnx.split(model)
    one = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
    tok = jnp.zeros((1, 1), jnp.int32)
    t_fwd1 = median(time_fn(lambda: one(state, tok).block_until_ready(), warmup=3, iters=20))
    print(f"single-token forward (batch 1): {1e3 * t_fwd1:.2f} ms")

    for B in args.batches:
        prompts = rng.integers(0, 256, (B, args.prompt_len)).tolist()
        run = lambda n: glocal.generate(model, prompts, n, temperature=0.0)
        t1 = median(time_fn(lambda: run(1), warmup=1, iters=args.iters))
        tn = median(time_fn(lambda: run(args.new), warmup=1, iters=args.iters))
        per_tok = (tn - t1) / (args.new - 1)
        print(f"batch {B}: prefill {t1:.3f} s ({B * args.prompt_len / t1:,.0f} tok/s); "
              f"decode {1e3 * per_tok:.2f} ms/step = {B / per_tok:,.0f} tok/s; "
              f"latency / single-token forward = {per_tok / t_fwd1:.2f}x")
        print(f"RESULT glocal_decode batch={B} decode_tokens_per_s={B / per_tok:.1f} "
              f"ms_per_step={1e3 * per_tok:.2f} ratio_vs_forward={per_tok / t_fwd1:.2f}")


if __name__ == "__main__":
    main()
