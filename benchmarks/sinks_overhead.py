"""What learned attention sinks cost: a jitted forward + backward step with and without
``sinks=`` (GPT-OSS per-head sink logits), paired and interleaved.

    python benchmarks/sinks_overhead.py --T 1024 4096 --impls xla blockwise --masks causal window512

For each (impl, mask, T) the two programs (without / with sinks, the latter also
differentiating the sinks) are compiled first, then timed in rounds A B A B ... so that
drift of a shared machine hits both alike; each round times ``--iters`` calls of one
program. Printed: median ms per step of each and the median of the per-round ratios
with / without (the target is <= 1.05: the sink adds one term per query row to the softmax
and one [B, T, H] reduction to the backward).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from common import machine, time_fn  # noqa: E402

from glocal.kernels import attention, masks as M  # noqa: E402

MASKS = {"causal": M.Causal(), "window512": M.SlidingWindow(512), "window128": M.SlidingWindow(128)}


def step(impl, mask, with_sinks):
    """Jitted ``(q, k, v, sinks, w) -> grads`` of ``sum(w * out)``: of q, k, v, and of the sinks
    if used. (``w`` is an input: with ``sum(out)`` the output's cotangent would be a constant
    XLA folds into the backward, which flatters the step without sinks.)"""
    def loss(q, k, v, sinks, w):
        out = attention(q, k, v, mask=mask, impl=impl, sinks=sinks if with_sinks else None)
        return jnp.sum(w * out.astype(jnp.float32))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3) if with_sinks else (0, 1, 2)))


def paired(fns, args, rounds, iters):
    """Per program, the seconds per call of each round, rounds interleaved A B A B ..."""
    compiled = [f.lower(*args).compile() for f in fns]
    for c in compiled:  # warm up both before the first timed round
        jax.block_until_ready(c(*args))
    times = [[] for _ in fns]
    for _ in range(rounds):
        for i, c in enumerate(compiled):
            times[i].append(statistics.median(time_fn(lambda: jax.block_until_ready(c(*args)), warmup=0, iters=iters)))
    return times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--impls", nargs="+", default=["xla", "blockwise"])
    ap.add_argument("--masks", nargs="+", default=["causal", "window512"], choices=list(MASKS))
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--K", type=int, default=None, help="kv heads (default H)")
    ap.add_argument("--E", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=3)
    a = ap.parse_args()
    K = a.K or a.H
    print(f"# {machine()}; B={a.B} H={a.H} K={K} E={a.E} float32; jitted forward+backward of sum(w * out) "
          f"(grads of q, k, v and the sinks); {a.rounds} interleaved rounds of {a.iters} calls")
    print("impl mask T | without_ms with_ms | ratio (median of rounds) [min, max]")
    for impl in a.impls:
        for name in a.masks:
            for T in a.T:
                r = np.random.default_rng(0)
                q, w = (jnp.asarray(r.normal(size=(a.B, T, a.H, a.E)), jnp.float32) for _ in range(2))
                k, v = (jnp.asarray(r.normal(size=(a.B, T, K, a.E)), jnp.float32) for _ in range(2))
                sinks = jnp.asarray(r.normal(size=a.H), jnp.float32)
                mask = MASKS[name]
                without, with_ = paired([step(impl, mask, False), step(impl, mask, True)], (q, k, v, sinks, w),
                                        a.rounds, a.iters)
                ratios = [w / b for w, b in zip(with_, without)]
                print(f"{impl} {name} {T} | {1e3 * statistics.median(without):.1f} {1e3 * statistics.median(with_):.1f}"
                      f" | {statistics.median(ratios):.3f} [{min(ratios):.3f}, {max(ratios):.3f}]", flush=True)


if __name__ == "__main__":
    main()
