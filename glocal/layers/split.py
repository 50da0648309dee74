"""Cutting a fused projection's output into its parts, with the gradient as one concatenation.

Fused projections (queries, keys and values from one matmul; an MLP's gate and up from one)
are cut apart by slicing. Autodiff of a slice pads its gradient to the whole buffer, and the
parts' padded gradients are then added: one pass over the full buffer per part, which on
XLA:CPU cost as much as the matmul it feeds in bf16. ``split_parts`` has its own backward that
concatenates the parts' gradients once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def split_parts(x, axis: int, sizes: tuple[int, ...]):
    """``x`` cut along ``axis`` into consecutive parts of ``sizes`` (which must add up to the
    axis' length): a tuple of arrays, each keeping the axis. Differentiable; the gradient
    is the concatenation of the parts' gradients."""
    axis = axis % x.ndim
    if sum(sizes) != x.shape[axis]:
        raise ValueError(f"split_parts: sizes {tuple(sizes)} add up to {sum(sizes)}, but axis {axis} "
                         f"of the input has length {x.shape[axis]}.")
    starts = [0]
    for size in sizes[:-1]:
        starts.append(starts[-1] + size)
    return tuple(jax.lax.slice_in_dim(x, s, s + n, axis=axis) for s, n in zip(starts, sizes))


def _split_parts_fwd(x, axis, sizes):
    return split_parts(x, axis, sizes), None


def _split_parts_bwd(axis, sizes, _, cotangents):
    return (jnp.concatenate(cotangents, axis=axis),)


split_parts.defvjp(_split_parts_fwd, _split_parts_bwd)
