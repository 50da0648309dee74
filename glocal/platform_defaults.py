"""Settings whose best value depends on the platform, each chosen by a measurement.

A model config's ``remat="auto"`` (the default) resolves here when the step is traced, from the
platform of JAX's default backend; an explicit value (``remat=none``, ``remat=full``, ...)
always wins. ``attention_impl="auto"`` resolves per call in ``glocal.kernels.api.auto_impl``
(its own table of thresholds). Where each value comes from:

``remat``: ``dots`` on CPU, ``none`` on GPU and TPU.
    CPU: ``benchmarks/train_options.py`` on the ``bench`` shape (d 512, 8 layers, 8 x 512
    tokens, float32), 2-core Zen 4: keeping the projections' outputs and recomputing the
    elementwise work ran 1.07-1.10x the tokens/s of ``none`` (two interleaved runs, jax 0.12.1),
    1.04x on jax 0.10.2 and 1.10x at ``transformer_small``'s 16 x 256; ``full`` 0.98-1.02x,
    ``save_qkv_attn`` 1.02x. GPU/TPU: not measured yet, so no recomputation; set ``remat=``
    to trade speed for memory.
``scan_layers``: ``True`` everywhere (not an ``auto`` field). Unrolled layers measured
    0.975-1.002x on CPU and compile in time growing with depth.
Attention below 2k tokens on CPU: the dense path in causal chunks of 64 query rows (``xla``).
    ``dot_product`` (one full masked score matrix) ran 0.91x, no chunking 0.98x, chunks of
    128 rows 1.005-1.02x (within the noise).
XLA flags: none added. The scheduler types (concurrency / memory optimised), 512-bit vectors,
    oneDNN matmuls and XNNPACK off each measured within the rounds' noise (0.98-1.03x).

benchmarks/RESULTS.md ("Training speed on CPU vs PyTorch") has the tables and commands.
"""

from __future__ import annotations

import jax

_REMAT = {"cpu": "dots"}  # every other platform: "none"


def platform() -> str:
    """The platform of JAX's default backend: ``cpu``, ``gpu`` or ``tpu``."""
    return jax.default_backend()


def resolve_remat(remat: str, platform_name: str | None = None) -> str:
    """The remat policy ``remat`` names; ``"auto"`` becomes this platform's measured choice."""
    if remat != "auto":
        return remat
    return _REMAT.get(platform_name or platform(), "none")
