"""Gated delta rule (Gated DeltaNet): the chunked form vs the recurrent reference vs causal softmax
attention of the same shape, one training step (forward + backward) per length.

    python benchmarks/delta_rule.py [--lengths 1024 2048 4096 8192 16384] [--heads 4] [--F 64] [--E 64]
    python benchmarks/delta_rule.py --lengths 256 512 --repeats 1        # smoke test

Times a jitted ``value_and_grad`` of ``sum(o)`` with respect to every input (q, k, v, g, beta for
the delta rule; q, k, v for attention), compilation excluded. The implementations of one length
are timed in interleaved rounds (--repeats rounds of --iters calls each, the order rotating every
round) so that a machine-wide slowdown hits them alike; the median over all calls is reported,
with the compiled temp memory of each (XLA memory analysis). The recurrent form (a token-by-token
scan, autodiff keeps every token's state) is skipped beyond --max-recurrent-len. Lines starting
with RESULT are machine-readable.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from common import machine, median, time_fn  # noqa: E402

from glocal.kernels import attention, gated_delta_rule, masks  # noqa: E402


def inputs(T, a, dtype):
    r = np.random.default_rng(0)
    B, H, F, E = a.batch, a.heads, a.F, a.E
    q, k = (jnp.asarray(r.normal(size=(B, T, H, F)), dtype) for _ in range(2))
    v = jnp.asarray(r.normal(size=(B, T, H, E)), dtype)
    g = jnp.asarray(-np.log1p(np.exp(r.normal(size=(B, T, H)))), jnp.float32)  # log decay < 0 (A = 1)
    beta = jnp.asarray(1 / (1 + np.exp(-r.normal(size=(B, T, H)))), jnp.float32)
    return q, k, v, g, beta


def step_fns(a):
    """name -> (loss of the inputs, which inputs it takes)."""
    def delta(impl):
        return lambda q, k, v, g, beta: jnp.sum(
            gated_delta_rule(q, k, v, g, beta, impl=impl, chunk_size=a.chunk).astype(jnp.float32))

    def softmax(q, k, v):
        return jnp.sum(attention(q, k, v, mask=masks.Causal(), impl=a.attn_impl).astype(jnp.float32))

    return {"chunked": (delta("chunked"), 5), "recurrent": (delta("recurrent"), 5), "attention": (softmax, 3)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--F", type=int, default=64, help="key head dim (attention uses E for q/k/v)")
    p.add_argument("--E", type=int, default=64)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--attn-impl", default="auto", help="glocal.kernels.attention impl for the softmax baseline")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    p.add_argument("--iters", type=int, default=2, help="timed calls per implementation per round")
    p.add_argument("--max-recurrent-len", type=int, default=8192)
    a = p.parse_args()
    dtype = jnp.dtype(a.dtype)
    print(f"# {machine()}; B={a.batch} H={a.heads} F={a.F} E={a.E} chunk={a.chunk} {a.dtype}, "
          f"attention impl {a.attn_impl}; fwd+bwd of sum(o)")
    print(f"{'T':>6} | {'chunked ms':>10} {'recurrent ms':>12} {'attention ms':>12} | {'rec/chunk':>9} "
          f"{'attn/chunk':>10} | temp MiB chunked / recurrent / attention")
    for T in a.lengths:
        q, k, v, g, beta = inputs(T, a, dtype)
        # Attention: queries and keys of the value width E (the same as q, k when F == E).
        qa, ka = (q, k) if a.F == a.E else (jnp.asarray(np.random.default_rng(1).normal(size=v.shape), dtype),) * 2
        args = {5: (q, k, v, g, beta), 3: (qa, ka, v)}
        runs, temp = {}, {}
        for name, (loss, n) in step_fns(a).items():
            if name == "recurrent" and T > a.max_recurrent_len:
                continue
            f = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(n))))
            compiled = f.lower(*args[n]).compile()
            temp[name] = compiled.memory_analysis().temp_size_in_bytes
            runs[name] = (lambda c, xs: lambda: jax.block_until_ready(c(*xs)))(compiled, args[n])
            runs[name]()  # warm-up
        times = {name: [] for name in runs}
        order = list(runs)
        for r in range(a.repeats):  # interleaved rounds, rotating the order
            for name in order[r % len(order):] + order[:r % len(order)]:
                times[name] += time_fn(runs[name], warmup=0, iters=a.iters)
        ms = {name: median(ts) * 1e3 for name, ts in times.items()}
        fmt = lambda name, w: f"{ms[name]:{w}.1f}" if name in ms else f"{'skipped':>{w}}"
        ratio = lambda name: f"{ms[name] / ms['chunked']:.2f}x" if name in ms else "-"
        mem = " / ".join(f"{temp[n] / 2**20:,.1f}" if n in temp else "-" for n in ("chunked", "recurrent", "attention"))
        print(f"{T:6d} | {fmt('chunked', 10)} {fmt('recurrent', 12)} {fmt('attention', 12)} | "
              f"{ratio('recurrent'):>9} {ratio('attention'):>10} | {mem}", flush=True)
        for name in ms:
            print(f"RESULT delta_rule T={T} impl={name} fwd_bwd_s={ms[name] / 1e3:.4f} temp_bytes={temp[name]}")


if __name__ == "__main__":
    main()
