"""Everything that depends on which JAX is installed, in one place.

Supported (and tested in CI): jax 0.10.2 on Python 3.11 and jax 0.12.1 on Python >= 3.12
(``pyproject.toml``: ``jax>=0.10.2,<0.13``). Code elsewhere asks this module, never
``jax.__version__``. Importing it does not start a JAX backend.

Differences we handle:
* jaxlib 0.10.x's XLA:CPU YNNPACK "reduce" fusions return wrong numbers (a jitted Based
  forward at batch 64 was off by O(1)); fixed in jaxlib 0.12.1, so the workaround flag is
  set only for 0.10.x (``glocal/__init__.py``).
* Lowering Pallas Triton kernels for ``cuda`` on a host without a GPU needs an abstract GPU
  device on jax 0.12 (``glocal.kernels.platforms.cross_lowering``, which works on both).
* Pallas Triton is deprecated from jax 0.11 (a DeprecationWarning when lowered; it still
  works in 0.12.1). Our GPU kernels stay on it while JAX ships it (README, "Accelerators").
* tokamax (``impl="tokamax"``) exists only for jax >= 0.11.1, i.e. Python >= 3.12.
"""

from __future__ import annotations


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def jaxlib_version() -> tuple[int, ...]:
    import jaxlib

    return _version(jaxlib.__version__)


def needs_ynn_reduce_workaround() -> bool:
    """Whether this jaxlib has XLA:CPU's miscompiling YNN reduce fusions (0.10.x)."""
    try:
        return jaxlib_version()[:2] == (0, 10)
    except ImportError:
        return False


def has_tokamax() -> bool:
    import importlib.util

    return importlib.util.find_spec("tokamax") is not None
