"""Helpers shared by the benchmark scripts: timing and the machine's matmul peak."""

from __future__ import annotations

import platform
import statistics
import time

import jax
import jax.numpy as jnp


def time_fn(fn, *, warmup: int = 2, iters: int = 10) -> list[float]:
    """Seconds per call of ``fn()`` (which must block until its result is ready)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def median(xs):
    return statistics.median(xs)


def matmul_peak_flops(dtype=jnp.float32, sizes=((2048, 2048, 2048), (4096, 512, 1408), (4096, 1408, 512))) -> dict:
    """Best measured dense matmul FLOP/s over a few shapes (square and the bench MLP's)."""
    results = {}
    for m, k, n in sizes:
        a = jax.random.normal(jax.random.key(0), (m, k), dtype)
        b = jax.random.normal(jax.random.key(1), (k, n), dtype)
        f = jax.jit(lambda a, b: a @ b)
        t = median(time_fn(lambda: f(a, b).block_until_ready(), warmup=2, iters=10))
        results[f"{m}x{k}x{n}"] = 2 * m * k * n / t
    return results


def machine() -> str:
    dev = jax.devices()[0]
    return (f"{dev.platform}:{dev.device_kind} x{jax.device_count()}, {platform.processor() or platform.machine()}, "
            f"jax {jax.__version__}")
