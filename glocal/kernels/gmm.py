"""Grouped matmul: rows sorted by group, each group times its own matrix (MoE experts).

    out[o] = x[o] @ w[g(o)]   with rows of group 0 first, then group 1, ... (``group_sizes_X``)

Implementations (``impl``):

* ``"ragged_dot"``: ``jax.lax.ragged_dot``. XLA:GPU and XLA:TPU lower it to grouped GEMMs; XLA:CPU
  lowers it to a dense product over every group (X times the work: 8x slower than the plain
  matmul at 8 groups, benchmarks/RESULTS.md).
* ``"tiled"``: pure JAX for CPU: each group's rows are padded to whole tiles of ``tile`` rows,
  so every tile belongs to one group, and a ``lax.scan`` over the (static number of) tiles
  multiplies each by its group's matrix. Work = rows + at most ``tile - 1`` padding rows per
  group. Custom VJP: dx is the same grouped matmul with the transposed matrices; dw
  accumulates ``x_tile^T dout_tile`` into the tile's group.
* ``"tokamax"``: ``tokamax.ragged_dot`` (the ``tokamax`` extra, Python >= 3.12): its Mosaic
  kernels on TPU and GPU, its XLA form on CPU (``glocal.kernels.tokamax_ops``).
* ``"auto"``: ``"tiled"`` on CPU, ``"ragged_dot"`` elsewhere, decided when the program is
  lowered (``jax.lax.platform_dependent``), so a program traced on a CPU host and lowered
  for TPU gets ``ragged_dot``. Never ``"tokamax"`` until it has been timed on hardware.

Letters as in the package legend: O rows, X groups (an MoE layer's experts), G tiles of
``tile`` rows (N); shapes are written for an MoE layer's first matmul ``[O, D] x [X, D, I]``
(its second passes ``[O, I] x [X, I, D]``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

GMM_IMPLS = ("auto", "ragged_dot", "tiled", "tokamax")


def grouped_matmul(x_OD, w_XDI, group_sizes_X, *, impl: str = "auto", tile: int | None = None):
    """``[O, D] x [X, D, I] -> [O, I]`` for rows sorted by group; ``group_sizes_X`` may sum to
    less than O (trailing rows belong to no group and give zeros, as with ragged_dot)."""
    if impl not in GMM_IMPLS:
        raise ValueError(f"unknown grouped matmul impl {impl!r}; choose one of {GMM_IMPLS}.")
    x_OD, w_XDI, group_sizes_X = jnp.asarray(x_OD), jnp.asarray(w_XDI), jnp.asarray(group_sizes_X)
    sizes_X = group_sizes_X.astype(jnp.int32)
    if impl == "auto":  # chosen when lowered: a program lowered for TPU/GPU gets ragged_dot
        return jax.lax.platform_dependent(x_OD, w_XDI, sizes_X, cpu=functools.partial(_tiled_call, tile=tile),
                                          default=_ragged_dot)
    if impl == "ragged_dot":
        return _ragged_dot(x_OD, w_XDI, sizes_X)
    if impl == "tokamax":
        from glocal.kernels.tokamax_ops import ragged_dot

        return ragged_dot(x_OD, w_XDI, sizes_X)
    return _tiled_call(x_OD, w_XDI, sizes_X, tile=tile)


def _ragged_dot(x_OD, w_XDI, sizes_X):
    return jax.lax.ragged_dot(x_OD, w_XDI, sizes_X, preferred_element_type=jnp.float32).astype(x_OD.dtype)


def _tiled_call(x_OD, w_XDI, sizes_X, *, tile=None):
    O, X = x_OD.shape[0], w_XDI.shape[0]
    if tile is None:  # about one tile per group on average, 8..128 rows
        tile = min(128, max(8, 1 << max(0, -(-O // X) - 1).bit_length()))
    return _tiled(x_OD, w_XDI, sizes_X, int(tile))


def _layout(group_sizes_X, O: int, tile: int):
    """Where each sorted row goes in the tile-padded buffer, and each tile's group (X for
    tiles past the last group: rows beyond ``sum(group_sizes)`` belong to no group, their
    output is zero and their tiles are skipped)."""
    X = group_sizes_X.shape[0]
    G = -(-O // tile) + X  # enough tiles whatever the sizes: sum(ceil(s / tile)) <= O / tile + X
    ends = jnp.cumsum(group_sizes_X)
    padded = -(-group_sizes_X // tile) * tile
    padded_ends = jnp.cumsum(padded)
    row_group = jnp.searchsorted(ends, jnp.arange(O), side="right")
    safe = jnp.minimum(row_group, X - 1)
    dest_O = jnp.where(row_group < X, jnp.arange(O) - (ends - group_sizes_X)[safe] + (padded_ends - padded)[safe],
                       G * tile)  # rows of no group: dropped by the scatter, read back as zeros
    tile_group_G = jnp.searchsorted(padded_ends, jnp.arange(G) * tile, side="right")
    return dest_O, tile_group_G, G


def _to_tiles(a_OD, dest_O, G, tile):
    return jnp.zeros((G * tile, a_OD.shape[1]), a_OD.dtype).at[dest_O].set(a_OD, mode="drop").reshape(G, tile, -1)


def _from_tiles(out_GNI, dest_O):
    return out_GNI.reshape(-1, out_GNI.shape[-1]).at[dest_O].get(mode="fill", fill_value=0)


def _tile_products(xt_GND, w_XDI, tile_group_G):
    X, I = w_XDI.shape[0], w_XDI.shape[2]  # noqa: E741

    def body(_, xs):
        xt, g = xs
        # (The empty branch derives its zeros from the operands so that inside shard_map both
        # branches vary over the same mesh axes.)
        out = jax.lax.cond(g < X, lambda: jnp.dot(xt, w_XDI[jnp.minimum(g, X - 1)], preferred_element_type=jnp.float32),
                           lambda: jnp.zeros((xt.shape[0], I), jnp.float32) + 0 * (xt[:, :1] * w_XDI[0, :1, :]))
        return None, out
    _, out = jax.lax.scan(body, None, (xt_GND, tile_group_G))
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _tiled(x_OD, w_XDI, group_sizes_X, tile):
    return _tiled_fwd(x_OD, w_XDI, group_sizes_X, tile)[0]


def _tiled_fwd(x_OD, w_XDI, group_sizes_X, tile):
    O = x_OD.shape[0]
    dest_O, tile_group_G, G = _layout(group_sizes_X, O, tile)
    out = _tile_products(_to_tiles(x_OD, dest_O, G, tile), w_XDI, tile_group_G)
    out_OI = _from_tiles(out, dest_O).astype(x_OD.dtype)
    return out_OI, (x_OD, w_XDI, group_sizes_X)


def _tiled_bwd(tile, res, dout_OI):
    x_OD, w_XDI, group_sizes_X = res
    O = x_OD.shape[0]
    dest_O, tile_group_G, G = _layout(group_sizes_X, O, tile)
    dt_GNI = _to_tiles(dout_OI, dest_O, G, tile)
    dx = _tile_products(dt_GNI, jnp.swapaxes(w_XDI, 1, 2), tile_group_G)
    dx_OD = _from_tiles(dx, dest_O).astype(x_OD.dtype)
    xt_GND = _to_tiles(x_OD, dest_O, G, tile)

    X = w_XDI.shape[0]

    def body(dw, xs):
        xt, dt, g = xs
        add = lambda dw: dw.at[jnp.minimum(g, X - 1)].add(
            jax.lax.dot_general(xt, dt, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32))
        return jax.lax.cond(g < X, add, lambda dw: dw, dw), None

    # Zeros that vary like the operands (see _tile_products).
    zeros = jnp.zeros(w_XDI.shape, jnp.float32) + 0 * (xt_GND[0, :1, :, None] * dt_GNI[0, :1, None, :]
                                                       * w_XDI[:1, :1, :1])
    dw, _ = jax.lax.scan(body, zeros, (xt_GND, dt_GNI, tile_group_G))
    return _like(dx_OD, x_OD), _like(dw.astype(w_XDI.dtype), w_XDI), None


def _like(ct, primal):
    """Inside ``shard_map``: sum a cotangent over the mesh axes along which it varies but its
    primal does not (a weight replicated over the data axes gathers every shard's gradient),
    which autodiff does by itself outside a custom VJP."""
    varying = lambda a: set(getattr(getattr(jax.typeof(a), "manual_axis_type", None), "varying", ()))
    extra = tuple(sorted(varying(ct) - varying(primal)))
    return jax.lax.psum(ct, extra) if extra else ct


_tiled.defvjp(_tiled_fwd, _tiled_bwd)
