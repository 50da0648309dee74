"""The chunked linear-attention form as a Pallas TPU (Mosaic) kernel, forward and backward.

Grid ``(B, K, G)`` with the chunk axis last and sequential ("arbitrary"); the running
state lives in VMEM scratch across grid steps; each chunk's q/k/v tile is DMA'd by the
block specs.

The chunk math, the in-kernel state and the custom_vjp wiring are shared with the GPU kernel
(``glocal.kernels.linear_pallas_common``, whose docstring describes the state); interpret mode
off-TPU.

Letters as in the package legend: Y query heads per kv head (H / K); chunks are the legend's
blocks (``G`` chunks of ``N`` tokens).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from glocal.kernels.linear_pallas_common import (block_spec, call_dims, call_linear, chunk_backward, chunk_forward,
                                                 custom_kernel, forward_outputs, load_state, split_forward,
                                                 store_state)


def _tpu_params():
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _tpu_forward(q, k, v, kst, statics):
    from jax.experimental.pallas import tpu as pltpu

    (taylor, eps, N, T, interpret), (B, K, Y, Tp, F, E, G, shapes) = call_dims(q, v, statics)
    ns = len(shapes)
    zeros = lambda s: (0,) * len(s)

    def kernel(q_ref, k_ref, v_ref, *refs):
        init, (o_ref, *rest) = refs[:ns], refs[ns:]
        saved, final, scratch = rest[:ns], rest[ns:2 * ns], rest[2 * ns:]
        g = pl.program_id(2)

        @pl.when(g == 0)
        def _():
            store_state(scratch, (), load_state(init, (), taylor), taylor)

        st = load_state(scratch, (), taylor)
        store_state(saved, (), st, taylor)  # the state entering chunk g, for the backward
        n_valid = jnp.clip(T - g * N, 0, N).astype(jnp.float32)
        outs, st = chunk_forward([q_ref[y] for y in range(Y)], k_ref[...], v_ref[...], st, n_valid, taylor, eps)
        for y, o in enumerate(outs):
            o_ref[y] = o
        store_state(scratch, (), st, taylor)

        @pl.when(g == G - 1)
        def _():
            store_state(final, (), st, taylor)

    whole = [block_spec(s, lambda b, h, g, s=s: (b, h) + zeros(s)) for s in shapes]
    per_chunk = [pl.BlockSpec((None, None, None) + s, lambda b, h, g, s=s: (b, h, g) + zeros(s)) for s in shapes]
    out = pl.pallas_call(
        kernel, grid=(B, K, G),
        in_specs=[block_spec((Y, N, F), lambda b, h, g: (b, h, 0, g, 0)),
                  block_spec((N, F), lambda b, h, g: (b, h, g, 0)),
                  block_spec((N, E), lambda b, h, g: (b, h, g, 0))] + whole,
        out_specs=[block_spec((Y, N, E), lambda b, h, g: (b, h, 0, g, 0))] + per_chunk + whole,
        out_shape=forward_outputs(B, K, Y, Tp, E, G, shapes),
        scratch_shapes=[pltpu.VMEM(s, jnp.float32) for s in shapes],
        interpret=interpret, compiler_params=None if interpret else _tpu_params(),
    )(q, k, v, *kst)
    return split_forward(out, ns)


def _tpu_backward(q, k, v, do, saved, dfinal, statics):
    from jax.experimental.pallas import tpu as pltpu

    (taylor, eps, N, T, interpret), (B, K, Y, Tp, F, E, G, shapes) = call_dims(q, v, statics)
    ns = len(shapes)
    zeros = lambda s: (0,) * len(s)
    rev = lambda g: G - 1 - g  # walk the chunks last to first

    def kernel(q_ref, k_ref, v_ref, do_ref, *refs):
        saved_refs, dfin = refs[:ns], refs[ns:2 * ns]
        dq_ref, dk_ref, dv_ref = refs[2 * ns:2 * ns + 3]
        dinit, scratch = refs[2 * ns + 3:3 * ns + 3], refs[3 * ns + 3:]
        g = pl.program_id(2)

        @pl.when(g == 0)
        def _():
            store_state(scratch, (), load_state(dfin, (), taylor), taylor)

        dqs, dk, dv, dst = chunk_backward([q_ref[y] for y in range(Y)], k_ref[...], v_ref[...],
                                          [do_ref[y] for y in range(Y)], load_state(saved_refs, (), taylor),
                                          load_state(scratch, (), taylor), taylor, eps)
        for y, dq in enumerate(dqs):
            dq_ref[y] = dq
        dk_ref[...], dv_ref[...] = dk, dv
        store_state(scratch, (), dst, taylor)

        @pl.when(g == G - 1)
        def _():
            store_state(dinit, (), dst, taylor)

    whole = [block_spec(s, lambda b, h, g, s=s: (b, h) + zeros(s)) for s in shapes]
    per_chunk = [pl.BlockSpec((None, None, None) + s, lambda b, h, g, s=s: (b, h, rev(g)) + zeros(s))
                 for s in shapes]
    qspec = block_spec((Y, N, F), lambda b, h, g: (b, h, 0, rev(g), 0))
    kspec = block_spec((N, F), lambda b, h, g: (b, h, rev(g), 0))
    vspec = block_spec((N, E), lambda b, h, g: (b, h, rev(g), 0))
    ospec = block_spec((Y, N, E), lambda b, h, g: (b, h, 0, rev(g), 0))
    out = pl.pallas_call(
        kernel, grid=(B, K, G),
        in_specs=[qspec, kspec, vspec, ospec] + per_chunk + whole,
        out_specs=[qspec, kspec, vspec] + whole,
        out_shape=[jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v)]
        + [jax.ShapeDtypeStruct((B, K) + s, jnp.float32) for s in shapes],
        scratch_shapes=[pltpu.VMEM(s, jnp.float32) for s in shapes],
        interpret=interpret, compiler_params=None if interpret else _tpu_params(),
    )(q, k, v, do, *saved, *dfinal)
    return out[0], out[1], out[2], tuple(out[3:])


# The chunked form through this kernel; arguments as ``linear_pallas_common.call_linear`` after its
# first two.
linear_attention_pallas_tpu = functools.partial(call_linear, custom_kernel(_tpu_forward, _tpu_backward), "tpu")
