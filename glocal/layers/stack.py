"""Stacked layers: build N identical modules as one with a leading ``layers`` axis, and run
them with ``lax.scan`` (compile time flat in depth) or a Python loop (same parameters).

Every model family runs its layers through these helpers (via
``glocal.layers.decoder.DecoderStack``), so remat policies and scan behave the same across
the zoo.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx

from glocal.platform_defaults import resolve_remat

# Named remat policies. "save_qkv_attn" keeps the tensors tagged with checkpoint_name in
# glocal.layers.attention (q/k/v projections and the attention output) and recomputes
# the rest, notably the MLP hidden activations, which dominate activation memory.
REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep projections
    "all_dots": jax.checkpoint_policies.dots_saveable,  # also attention scores/outputs
    "save_qkv_attn": jax.checkpoint_policies.save_only_these_names(
        "query_proj", "key_proj", "value_proj", "attn_out"
    ),
}
# What a config may name: a policy, or "auto" (glocal.platform_defaults: the platform's measured choice).
REMAT_CHOICES = ("auto", *REMAT_POLICIES)


def stack_modules(make: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs) -> nnx.Module:
    """Create ``n`` modules with independent init and stack their variables on axis 0.

    The stacked axis is named ``layers`` in the sharding metadata.
    """

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(r):
        return make(r)

    return create(rngs)


def run_stack(
    stacked: nnx.Module,
    carry: Any,
    xs: Any,
    apply: Callable[[nnx.Module, Any, Any], tuple[Any, Any]],
    *,
    scan: bool = True,
    remat: str = "auto",
):
    """Thread ``carry`` through every layer of ``stacked``.

    ``apply(layer, carry, x_i) -> (carry, y_i)`` runs one layer; ``xs`` are per-layer
    inputs with a leading axis (e.g. cache slices) or None. Returns ``(carry, ys)``.
    """
    remat = resolve_remat(remat)
    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {remat!r}; choose one of {list(REMAT_CHOICES)}.")
    graphdef, state = nnx.split(stacked)

    def body(c, layer_xs):
        layer_state, x_i = layer_xs
        return apply(nnx.merge(graphdef, layer_state), c, x_i)

    if remat != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=not scan)
    if scan:
        return jax.lax.scan(body, carry, (state, xs))
    n = jax.tree.leaves(state)[0].shape[0]
    ys = []
    for i in range(n):
        carry, y = body(carry, jax.tree.map(lambda a: a[i], (state, xs)))
        ys.append(y)
    return carry, (None if ys[0] is None else jax.tree.map(lambda *a: jax.numpy.stack(a), *ys))


def run_cached_stack(stacked: nnx.Module, x: Any, caches: Any, call: Callable, *, scan: bool = True,
                     remat: str = "auto"):
    """Run a stack whose layers each own one slice of stacked caches (decoding).

    ``caches`` is a pytree of caches stacked over the layers (``glocal.layers.Cache``
    leaves of any kind with a leading ``layers`` axis); ``call(layer, x, views) -> (x,
    views)`` gets per-layer ``LayerView``s. The stacks ride in the carry and each layer
    writes its slice in place (scan outputs would copy the whole cache every step).
    Returns ``(x, caches)``.
    """
    from glocal.layers.cache import Cache, LayerView

    is_cache = lambda c: isinstance(c, Cache)
    n = jax.tree.leaves(nnx.state(stacked))[0].shape[0]

    def apply(layer, carry, i):
        x, stacks = carry
        x, views = call(layer, x, jax.tree.map(lambda c: LayerView(c, i), stacks, is_leaf=is_cache))
        return (x, jax.tree.map(lambda v: v.stack, views, is_leaf=lambda v: isinstance(v, LayerView))), None

    (x, caches), _ = run_stack(stacked, (x, caches), jax.numpy.arange(n), apply, scan=scan, remat=remat)
    return x, caches
