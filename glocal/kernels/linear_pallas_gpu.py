"""The chunked linear-attention form as a Pallas Triton (GPU) kernel, forward and backward.

Grid ``(B, K)``; a ``fori_loop`` walks the chunks inside the program (Triton programs
share nothing across the grid) carrying the state as loop values; tiles are sliced from the
whole per-head sequence in global memory.

The chunk math, the in-kernel state and the custom_vjp wiring are shared with the TPU kernel
(``glocal.kernels.linear_pallas_common``, whose docstring describes the state); interpret mode
off-GPU. Triton's dot needs F and E powers of two (>= 16): the shared wrapper pads them and
requires such a chunk size.

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


def _gpu_params(E):
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=4 if E <= 64 else 8, num_stages=1)


def _gpu_forward(q, k, v, kst, statics):
    (taylor, eps, N, T, interpret), (B, K, Y, Tp, F, E, G, shapes) = call_dims(q, v, statics)
    ns = len(shapes)

    def kernel(q_ref, k_ref, v_ref, *refs):
        init, (o_ref, *rest) = refs[:ns], refs[ns:]
        saved, final = rest[:ns], rest[ns:]

        def body(g, st):
            rows = pl.ds(pl.multiple_of(g * N, N), N)
            store_state(saved, (g,), st, taylor)
            n_valid = jnp.clip(T - g * N, 0, N).astype(jnp.float32)
            outs, st = chunk_forward([q_ref[y, rows, :] for y in range(Y)], k_ref[rows, :], v_ref[rows, :], st,
                                     n_valid, taylor, eps)
            for y, o in enumerate(outs):
                o_ref[y, rows, :] = o
            return st

        store_state(final, (), jax.lax.fori_loop(0, G, body, load_state(init, (), taylor)), taylor)

    whole = lambda lead, s: block_spec(lead + s, lambda b, h: (b, h) + (0,) * len(lead + s))
    out = pl.pallas_call(
        kernel, grid=(B, K),
        in_specs=[whole((), (Y, Tp, F)), whole((), (Tp, F)), whole((), (Tp, E))] + [whole((), s) for s in shapes],
        out_specs=[whole((), (Y, Tp, E))] + [whole((G,), s) for s in shapes] + [whole((), s) for s in shapes],
        out_shape=forward_outputs(B, K, Y, Tp, E, G, shapes),
        interpret=interpret, compiler_params=None if interpret else _gpu_params(E),
    )(q, k, v, *kst)
    return split_forward(out, ns)


def _gpu_backward(q, k, v, do, saved, dfinal, statics):
    (taylor, eps, N, T, interpret), (B, K, Y, Tp, F, E, G, shapes) = call_dims(q, v, statics)
    ns = len(shapes)

    def kernel(q_ref, k_ref, v_ref, do_ref, *refs):
        saved_refs, dfin = refs[:ns], refs[ns:2 * ns]
        dq_ref, dk_ref, dv_ref = refs[2 * ns:2 * ns + 3]
        dinit = refs[2 * ns + 3:]

        def body(m, dst):
            g = G - 1 - m
            rows = pl.ds(pl.multiple_of(g * N, N), N)
            dqs, dk, dv, dst = chunk_backward([q_ref[y, rows, :] for y in range(Y)], k_ref[rows, :],
                                              v_ref[rows, :], [do_ref[y, rows, :] for y in range(Y)],
                                              load_state(saved_refs, (g,), taylor), dst, taylor, eps)
            for y, dq in enumerate(dqs):
                dq_ref[y, rows, :] = dq
            dk_ref[rows, :], dv_ref[rows, :] = dk, dv
            return dst

        store_state(dinit, (), jax.lax.fori_loop(0, G, body, load_state(dfin, (), taylor)), taylor)

    whole = lambda lead, s: block_spec(lead + s, lambda b, h: (b, h) + (0,) * len(lead + s))
    qspec, kspec, vspec = whole((), (Y, Tp, F)), whole((), (Tp, F)), whole((), (Tp, E))
    out = pl.pallas_call(
        kernel, grid=(B, K),
        in_specs=[qspec, kspec, vspec, whole((), (Y, Tp, E))] + [whole((G,), s) for s in shapes]
        + [whole((), s) for s in shapes],
        out_specs=[qspec, kspec, vspec] + [whole((), s) for s in shapes],
        out_shape=[jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v)]
        + [jax.ShapeDtypeStruct((B, K) + s, jnp.float32) for s in shapes],
        interpret=interpret, compiler_params=None if interpret else _gpu_params(E),
    )(q, k, v, do, *saved, *dfinal)
    return out[0], out[1], out[2], tuple(out[3:])


# The chunked form through this kernel; arguments as ``linear_pallas_common.call_linear`` after its
# first two.
linear_attention_pallas_gpu = functools.partial(call_linear, custom_kernel(_gpu_forward, _gpu_backward), "gpu")
