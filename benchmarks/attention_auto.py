"""Which attention ``impl="auto"`` should run on CPU: a whole baseline training step
(``transformer_small``, batch 2, forward + backward) with ``attention_impl="xla"`` (dense, skips
causal key spans) vs ``"blockwise"``, for causal and sliding-window layers at several lengths.

    python benchmarks/attention_auto.py [--T 512 1024 2048 4096] [--iters 3]

The threshold in ``glocal.kernels.api.auto_impl`` comes from this table.
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
from efficiency import train_step_fn  # noqa: E402

import glocal.models as gm  # noqa: E402
from glocal.kernels import auto_impl  # noqa: E402
from glocal.kernels.masks import Causal, SlidingWindow  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--T", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--iters", type=int, default=3)
    args = p.parse_args()
    print(machine())
    for pattern, window in (("g", None), ("s", 256), ("s", 512)):
        for T in args.T:
            if window and window >= T:
                continue
            res = {}
            for impl in ("xla", "blockwise"):
                m = gm.build("transformer", "small", max_seq_len=T + 1, layer_pattern=pattern,
                             sliding_window=window, attention_impl=impl)
                step, state = train_step_fn(m)
                x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, T + 1)), jnp.int32)
                c = step.lower(state, x).compile()
                t = median(time_fn(lambda: jax.block_until_ready(c(state, x)), warmup=1, iters=args.iters))
                res[impl] = (t, c.memory_analysis().temp_size_in_bytes / 2**20)
            mask = Causal() if window is None else SlidingWindow(window)
            picked = auto_impl(mask, T, T, platform="cpu")
            name = "causal" if window is None else f"window {window}"
            print(f"{name:11s} T={T:5d}: xla {res['xla'][0] * 1e3:6.0f} ms {res['xla'][1]:6.0f} MiB | blockwise "
                  f"{res['blockwise'][0] * 1e3:6.0f} ms {res['blockwise'][1]:6.0f} MiB | blockwise speed-up "
                  f"{res['xla'][0] / res['blockwise'][0]:.2f}x | auto picks {picked}", flush=True)


if __name__ == "__main__":
    main()
