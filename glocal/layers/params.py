"""Creating parameters that carry logical axis names.

Every parameter records its logical axes (``("embed", "mlp")``...) as NNX sharding
metadata. Under an active mesh (``jax.set_mesh``) and rule table
(``glocal.sharding.use_rules``) the value is sharded at creation; without them it stays a
plain array, so layers work unchanged on a laptop CPU and on a pod. (The trainer instead
creates parameters inside ``jit`` with explicit output shardings from the same rules.)
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from glocal.sharding import constrain

Initializer = Callable[..., jax.Array]


# Parameter types: what the optimizer treats differently (weight decay groups, an update rule
# of its own) is said by the variable's type, not by its name (glocal.train.optim). All are
# nnx.Param, so nnx.state(model, nnx.Param) still holds every trained value.
class Scale(nnx.Param):
    """A norm's gain."""


class Bias(nnx.Param):
    """An additive bias."""


class Embedding(nnx.Param):
    """An input token embedding table."""


class SelectionBias(nnx.Param):
    """A bias that shifts a router's selection only and is moved by its balancing rule, never
    by Adam (glocal.layers.moe, glocal.train.optim)."""


def param(
    rngs: nnx.Rngs,
    init: Initializer,
    shape: Sequence[int],
    axes: Sequence[str | None],
    dtype=jnp.float32,
    kind: type[nnx.Param] = nnx.Param,
) -> nnx.Param:
    """A parameter of ``shape`` initialised by ``init`` with logical ``axes`` (one per dim);
    ``kind`` is its type (``Scale``, ``Bias``, ``Embedding``, ... or plain ``nnx.Param``)."""
    if len(axes) != len(shape):
        raise ValueError(f"param of shape {tuple(shape)} needs {len(shape)} axis names, got {axes}.")
    return named_param(init(rngs.params(), tuple(shape), dtype), axes, kind)


def named_param(value: jax.Array, axes: Sequence[str | None], kind: type[nnx.Param] = nnx.Param) -> nnx.Param:
    """Wrap an initialised array as a parameter with logical ``axes`` (for kernels built
    from several draws, e.g. a fused projection)."""
    if len(axes) != value.ndim:
        raise ValueError(f"param of shape {value.shape} needs {value.ndim} axis names, got {axes}.")
    return kind(constrain(value, axes), out_sharding=tuple(axes), eager_sharding=False)


def fan_in_init(fan_in: int, scale: float = 1.0) -> Initializer:
    """Normal init with std ``scale / sqrt(fan_in)``, whatever the kernel's rank."""
    std = scale / fan_in**0.5
    return lambda key, shape, dtype: std * jax.random.normal(key, shape, dtype)


def as_dtype(name_or_dtype) -> jnp.dtype:
    """``"bfloat16"`` / ``jnp.bfloat16`` / ``None`` -> a numpy dtype (None means float32)."""
    if name_or_dtype is None:
        return jnp.dtype(jnp.float32)
    return jnp.dtype(name_or_dtype)


def param_count(module: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def active_param_count(module: nnx.Module) -> float:
    """Parameters one token uses: all of them, except that routed FFNs (modules with
    ``active_params()``, e.g. mixture-of-experts) count only the experts a token visits
    (for a stacked module, every size covers all its repeats)."""
    n = float(param_count(module))
    for _, node in nnx.iter_graph(module):
        if hasattr(node, "active_params") and isinstance(node, nnx.Module):
            n += node.active_params() - param_count(node)
    return n
