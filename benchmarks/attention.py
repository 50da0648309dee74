"""Block-sparse attention vs dense masked attention, per mask family and length.

    python benchmarks/attention.py --T 1024 2048 4096 8192 --masks window512 causal

For each case: schedule density (visited tiles / all tiles at the block size), ideal
speed-up 1/density, and the achieved speed-up of ``impl="blockwise"`` over dense masked
``jax.nn.dot_product_attention`` (XLA, the mask passed as a dense boolean array) for the
forward and forward+backward (grad of sum), plus compiled temporary memory of each.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from common import machine, median, time_fn  # noqa: E402

from glocal.kernels import attention, masks as M  # noqa: E402
from glocal.kernels.schedule import build_schedule  # noqa: E402

MASKS = {
    "window512": M.SlidingWindow(512), "window128": M.SlidingWindow(128), "causal": M.Causal(),
    "blockcausal256": M.BlockCausal(256), "chunk256+global64": M.ChunkCausal(256) | M.GlobalTokens(64),
}


def dense_fn(mask, T):
    allowed = jnp.asarray(mask.dense(T, T))[None, None]
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=allowed, implementation="xla")


def block_fn(mask, blocks):
    return lambda q, k, v: attention(q, k, v, mask=mask, impl="blockwise", block_sizes=blocks)


def measure(fn, q, k, v, iters):
    fwd = jax.jit(fn)
    both = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v)), argnums=(0, 1, 2)))
    out = {}
    for name, f in (("fwd", fwd), ("fwd+bwd", both)):
        compiled = f.lower(q, k, v).compile()
        out[name] = median(time_fn(lambda: jax.block_until_ready(compiled(q, k, v)), warmup=1, iters=iters))
        out[name + "_mem"] = compiled.memory_analysis().temp_size_in_bytes
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--masks", nargs="+", default=["window512"], choices=list(MASKS))
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--E", type=int, default=64)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--no-dense", action="store_true", help="skip the dense baseline (large T)")
    a = ap.parse_args()
    print(f"# {machine()}; B={a.B} H={a.H} E={a.E} float32, blocks {a.block}x{a.block}")
    print("mask T density ideal | fwd: dense_s block_s speedup eff | fwd+bwd: dense_s block_s speedup eff "
          "| temp MiB dense/block (fwd+bwd)")
    for name in a.masks:
        mask = MASKS[name]
        for T in a.T:
            r = np.random.default_rng(0)
            q, k, v = (jnp.asarray(r.normal(size=(a.B, T, a.H, a.E)), jnp.float32) for _ in range(3))
            dens = build_schedule(mask, T, T, a.block, a.block).stats["density"]
            b = measure(block_fn(mask, (a.block, a.block)), q, k, v, a.iters)
            d = None if a.no_dense else measure(dense_fn(mask, T), q, k, v, a.iters)
            row = f"{name} {T} {dens:.3f} {1 / dens:.1f}x |"
            for key in ("fwd", "fwd+bwd"):
                if d is None:
                    row += f" - {b[key]:.3f} - - |"
                else:
                    sp = d[key] / b[key]
                    row += f" {d[key]:.3f} {b[key]:.3f} {sp:.2f}x {sp * dens:.0%} |"
            dm = "-" if d is None else f"{d['fwd+bwd_mem'] / 2**20:,.0f}"
            print(row + f" {dm}/{b['fwd+bwd_mem'] / 2**20:,.0f}", flush=True)


if __name__ == "__main__":
    main()
