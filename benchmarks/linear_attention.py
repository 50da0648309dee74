"""Linear attention: the chunked form vs the quadratic reference, forward + backward.

    python benchmarks/linear_attention.py [--T 8192] [--heads 4] [--F 16] [--E 64] [--chunk 64]
    python benchmarks/linear_attention.py --T 8192 16384 32768 65536 --impls chunked pallas_gpu   # on a GPU

(``pallas_*`` off their platform run in interpret mode: correct but not a timing.)

Times a jitted ``grad(sum(o * g))`` with respect to q, k, v (compilation excluded, median of
--iters) and reports the compiled temp memory of each (XLA memory analysis). Lines starting with
RESULT are machine-readable.
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

from glocal.kernels import linear_attention  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--T", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--F", type=int, default=16)
    p.add_argument("--E", type=int, default=64)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--impls", nargs="+", default=["chunked", "quadratic"])
    args = p.parse_args()
    print(machine())
    rng = np.random.default_rng(0)
    for T in args.T:
        B, H, F, E = args.batch, args.heads, args.F, args.E
        q, k = (jnp.asarray(0.5 * rng.normal(size=(B, T, H, F)), jnp.float32) for _ in range(2))
        v, g = (jnp.asarray(rng.normal(size=(B, T, H, E)), jnp.float32) for _ in range(2))
        times = {}
        for impl in args.impls:
            f = jax.jit(jax.grad(lambda q, k, v: jnp.sum(linear_attention(q, k, v, impl=impl, chunk_size=args.chunk)
                                                          * g), argnums=(0, 1, 2)))
            compiled = f.lower(q, k, v).compile()
            temp = compiled.memory_analysis().temp_size_in_bytes
            run = lambda: jax.block_until_ready(compiled(q, k, v))
            t = median(time_fn(run, warmup=1, iters=args.iters))
            times[impl] = t
            print(f"T={T:6d} {impl:9s} fwd+bwd {t * 1e3:9.1f} ms   temp {temp / 2**20:8.1f} MiB")
            print(f"RESULT linear T={T} impl={impl} fwd_bwd_s={t:.4f} temp_bytes={temp}")
        if "chunked" in times and "quadratic" in times:
            print(f"T={T:6d} chunked speed-up over quadratic: {times['quadratic'] / times['chunked']:.2f}x")


if __name__ == "__main__":
    main()
