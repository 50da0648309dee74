"""What the linear-attention Pallas kernels share: TPU (Mosaic, ``glocal.kernels.linear_pallas_tpu``)
and GPU (Triton, ``glocal.kernels.linear_pallas_gpu``): the math of one chunk, the in-kernel state
layout, the custom_vjp wiring and the public wrapper.

Both kernels compute what ``impl="chunked"`` computes (see ``glocal.kernels.linear``), one
program per (batch row, kv head), the Y query heads that share the kv head handled inside
so the state is built once per kv head (how each walks the chunks: its own module).

In-kernel state (float32). Inputs arrive pre-featurised: for taylor ``q, k`` are scaled by
``F^(-1/4)`` so ``s = q.k`` and ``w = 1 + s + s^2/2``; for elu/relu they are ``phi(q), phi(k)``
and ``w = q.k``. Taylor keeps the three moment states of the expansion uncompressed:

    a0 = sum v [1, E]     a1 = K^T V [F, E]     a2[i] = (K * k_i)^T V [F, E] for i < F
    z0 = count [1, 1]     z1 = sum k [1, F]     z2 = K^T K [F, F]

(a2 as F separate ``[F, E]`` tiles: no 3-D values, which Triton cannot slice; the readout
``1/2 sum_ij q_i q_j a2[i, j]`` is F small matmuls). elu/relu keep only ``(a1, z1)``. The
public state ``(S_BKJE, z_BKJ)`` of the other forms uses the symmetric compression; the
wrappers convert (a linear map, so autodiff carries the initial state's gradient).

Backward: the forward saves each chunk's entering state (per chunk, never per token); one
kernel walks the chunks in reverse carrying the state gradient and writes dq, dk, dv per chunk
and the initial state's gradient at the end. a2 and z2 are symmetric, and their incoming
gradient is symmetrised, which the closed forms below rely on.

Letters as in the package legend: Y query heads per kv head (H / K); chunks are the legend's
blocks (``G`` chunks of ``N`` tokens).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from glocal.kernels.linear_features import features
from glocal.kernels.platforms import native_or_interpreted
from glocal.sharding import per_shard

# -- the math of one chunk (values in, values out; shared by both kernels) ----------------------


def _dot(a, b):
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _dot_t(a, b):
    """``a @ b^T``."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _t_dot(a, b):
    """``a^T @ b``."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _col(x, i):
    """Column ``i`` of ``x [N, F]`` as ``[N, 1]`` (a masked reduction: Triton cannot slice values)."""
    iota = jax.lax.broadcasted_iota(jnp.int32, (1, x.shape[1]), 1)
    return jnp.sum(jnp.where(iota == i, x, 0.0), axis=1, keepdims=True)


def _causal(N):
    return jax.lax.broadcasted_iota(jnp.int32, (N, N), 0) >= jax.lax.broadcasted_iota(jnp.int32, (N, N), 1)


def _intra(q, k, taylor):
    """The chunk's masked kernel matrix ``w [N, N]`` and the raw scores ``s``."""
    s = _dot_t(q, k)
    w = 1.0 + s + 0.5 * s * s if taylor else s
    return jnp.where(_causal(q.shape[0]), w, 0.0), s


def _readout(q, st, taylor):
    """What the state entering a chunk contributes: numerator ``[N, E]`` and denominator ``[N, 1]``."""
    if not taylor:
        a1, z1 = st
        return _dot(q, a1), jnp.sum(q * z1, axis=1, keepdims=True)
    a0, a1, a2, z0, z1, z2 = st
    num = a0 + _dot(q, a1)
    for i in range(q.shape[1]):
        num = num + 0.5 * _col(q, i) * _dot(q, a2[i])
    den = z0 + jnp.sum(q * z1, axis=1, keepdims=True) + 0.5 * jnp.sum(_dot(q, z2) * q, axis=1, keepdims=True)
    return num, den


def _absorb(k, v, st, n_valid, taylor):
    """The state leaving a chunk: add its keys and values (padded keys are zero; only the
    count ``z0`` needs the number of real ones)."""
    if not taylor:
        a1, z1 = st
        return a1 + _t_dot(k, v), z1 + jnp.sum(k, axis=0, keepdims=True)
    a0, a1, a2, z0, z1, z2 = st
    a2 = tuple(a2[i] + _t_dot(_col(k, i) * k, v) for i in range(k.shape[1]))
    return (a0 + jnp.sum(v, axis=0, keepdims=True), a1 + _t_dot(k, v), a2, z0 + n_valid,
            z1 + jnp.sum(k, axis=0, keepdims=True), z2 + _t_dot(k, k))


def chunk_forward(qs, k, v, st, n_valid, taylor, eps):
    """``qs``: the Y query tiles ``[N, F]``; returns their outputs ``[N, E]`` and the new state."""
    outs = []
    for q in qs:
        w, _ = _intra(q, k, taylor)
        num, den = _readout(q, st, taylor)
        num = num + _dot(w, v)
        den = den + jnp.sum(w, axis=1, keepdims=True) + eps
        outs.append(num / den)
    return outs, _absorb(k, v, st, n_valid, taylor)


def chunk_backward(qs, k, v, dos, st, dst, taylor, eps):
    """Gradients of one chunk. ``st``: the state entering it; ``dst``: the gradient w.r.t. the
    state leaving it. Returns ``(dqs, dk, dv, d(state entering))``."""
    F = k.shape[1]
    # Through the state update (the leaving state's gradient reaches this chunk's k and v).
    if taylor:
        da0, da1, da2, dz0, dz1, dz2 = dst
        dv = da0 + _dot(k, da1)
        dk = _dot_t(v, da1) + dz1 + 2.0 * _dot(k, dz2)
        for i in range(F):
            dv = dv + _col(k, i) * _dot(k, da2[i])
            dk = dk + 2.0 * _col(k, i) * _dot_t(v, da2[i])
    else:
        da1, dz1 = dst
        dv, dk = _dot(k, da1), _dot_t(v, da1) + dz1
    # Through each query head's outputs: the intra-chunk kernel and the entering state's readout.
    dqs, acc = [], list(dst)
    for q, do in zip(qs, dos):
        w, s = _intra(q, k, taylor)
        num, den = _readout(q, st, taylor)
        num = num + _dot(w, v)
        den = den + jnp.sum(w, axis=1, keepdims=True) + eps
        g = do / den                                                   # d num
        dden = -jnp.sum(do * num, axis=1, keepdims=True) / (den * den)  # d den
        dw = jnp.where(_causal(q.shape[0]), _dot_t(g, v) + dden, 0.0)
        dv = dv + _t_dot(w, g)
        ds = dw * (1.0 + s) if taylor else dw
        dq = _dot(ds, k)
        dk = dk + _t_dot(ds, q)
        if taylor:
            a0, a1, a2, z0, z1, z2 = st
            dq = dq + _dot_t(g, a1) + dden * (z1 + _dot(q, z2))
            for i in range(F):
                dq = dq + _col(q, i) * _dot_t(g, a2[i])
            acc[0] = acc[0] + jnp.sum(g, axis=0, keepdims=True)
            acc[1] = acc[1] + _t_dot(q, g)
            acc[2] = tuple(acc[2][i] + 0.5 * _t_dot(_col(q, i) * q, g) for i in range(F))
            acc[3] = acc[3] + jnp.sum(dden, axis=0, keepdims=True)
            acc[4] = acc[4] + jnp.sum(q * dden, axis=0, keepdims=True)
            acc[5] = acc[5] + 0.5 * _t_dot(q, dden * q)
        else:
            a1, z1 = st
            dq = dq + _dot_t(g, a1) + dden * z1
            acc[0] = acc[0] + _t_dot(q, g)
            acc[1] = acc[1] + jnp.sum(q * dden, axis=0, keepdims=True)
        dqs.append(dq)
    return dqs, dk, dv, tuple(acc)


# -- state layout: refs <-> values, and the public compressed state ------------------------------


def state_shapes(F, E, taylor):
    """Shapes of the in-kernel state arrays (a2 stored ``[F, F, E]``, read as F tiles)."""
    if taylor:
        return ((1, E), (F, E), (F, F, E), (1, 1), (1, F), (F, F))
    return ((F, E), (1, F))


def load_state(refs, idx, taylor):
    """State values from refs (``idx``: leading indices, e.g. ``()`` or ``(n,)``)."""
    vals = [r[idx] if idx else r[...] for r in refs]
    if taylor:
        a2 = refs[2]
        vals[2] = tuple(a2[idx + (i,)] for i in range(a2.shape[len(idx)]))
    return tuple(vals)


def store_state(refs, idx, vals, taylor):
    for j, (r, x) in enumerate(zip(refs, vals)):
        if taylor and j == 2:
            for i, tile in enumerate(x):
                r[idx + (i,)] = tile
        elif idx:
            r[idx] = x
        else:
            r[...] = x


def _pairs(F):
    i, j = np.triu_indices(F)
    index = np.zeros((F, F), np.int32)
    index[i, j] = index[j, i] = np.arange(len(i))
    return i, j, index


def to_kernel_state(state, F, Fp, Ep, taylor):
    """Public ``(S_BKJE, z_BKJ)`` -> in-kernel arrays, zero-padded to ``Fp`` features and ``Ep`` values."""
    S, z = (x.astype(jnp.float32) for x in state)
    E = S.shape[-1]
    pe = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, Ep - E)])

    def pf(x, axes):
        pad = [(0, 0)] * x.ndim
        for a in axes:
            pad[a] = (0, Fp - F)
        return jnp.pad(x, pad)

    if not taylor:
        return pf(pe(S), (2,)), pf(z[:, :, None, :], (3,))
    _, _, index = _pairs(F)
    # Diagonal pairs carry x_i^2 / sqrt 2 in the compressed features: undo the 1/sqrt 2.
    diag = np.where(np.eye(F, dtype=bool), np.sqrt(2.0), 1.0).astype(np.float32)
    pS, pz = S[:, :, 1 + F:], z[:, :, 1 + F:]
    a2 = pS[:, :, index] * diag[:, :, None]
    z2 = pz[:, :, index] * diag
    return (pe(S[:, :, :1]), pf(pe(S[:, :, 1:1 + F]), (2,)), pf(pe(a2), (2, 3)), z[:, :, None, :1],
            pf(z[:, :, None, 1:1 + F], (3,)), pf(z2, (2, 3)))


def from_kernel_state(kst, F, E, taylor):
    """In-kernel arrays -> the public compressed ``(S_BKJE, z_BKJ)`` (padding dropped)."""
    if not taylor:
        a1, z1 = kst
        return a1[:, :, :F, :E], z1[:, :, 0, :F]
    a0, a1, a2, z0, z1, z2 = kst
    i, j, _ = _pairs(F)
    undiag = np.where(i == j, 1.0 / np.sqrt(2.0), 1.0).astype(np.float32)
    S = jnp.concatenate([a0[:, :, :, :E], a1[:, :, :F, :E], a2[:, :, i, j, :E] * undiag[:, None]], axis=2)
    z = jnp.concatenate([z0[:, :, 0], z1[:, :, 0, :F], z2[:, :, i, j] * undiag], axis=2)
    return S, z


def _symmetrise(dkst, taylor):
    """Only the symmetric parts of a2 and z2 exist; the chunk backward assumes their gradient is symmetric."""
    if not taylor:
        return dkst
    d = list(dkst)
    d[2] = 0.5 * (d[2] + jnp.swapaxes(d[2], 2, 3))
    d[5] = 0.5 * (d[5] + jnp.swapaxes(d[5], 2, 3))
    return tuple(d)


# -- what both backends' calls share ----------------------------------------------------------


def call_dims(q, v, statics):
    """A kernel call's statics ``(taylor, eps, N, T, interpret)`` (the backend name dropped) and
    ``(B, K, Y, Tp, F, E, G, state shapes)`` of its heads-major, chunk-padded operands."""
    _, taylor, eps, N, T, interpret = statics
    B, K, Y, Tp, F = q.shape
    E = v.shape[-1]
    return (taylor, eps, N, T, interpret), (B, K, Y, Tp, F, E, Tp // N, state_shapes(F, E, taylor))


def forward_outputs(B, K, Y, Tp, E, G, shapes):
    """The forward kernels' outputs: o, each chunk's entering state, the final state."""
    return ([jax.ShapeDtypeStruct((B, K, Y, Tp, E), jnp.float32)]
            + [jax.ShapeDtypeStruct((B, K, G) + s, jnp.float32) for s in shapes]
            + [jax.ShapeDtypeStruct((B, K) + s, jnp.float32) for s in shapes])


def split_forward(out, ns: int):
    """``(o, final state, saved entering states)`` from a forward kernel's outputs."""
    return out[0], tuple(out[1 + ns:]), tuple(out[1:1 + ns])


def block_spec(shape, index_map):
    """A block over one (batch row, kv head): both leading axes squeezed."""
    return pl.BlockSpec((None, None) + tuple(shape), index_map)


# -- custom VJP and the entry point ---------------------------------------------------------------


def custom_kernel(forward, backward):
    """``kernel_call(q, k, v, kst, statics) -> (o, final state)``, differentiable in q, k, v and
    the initial in-kernel state ``kst``.

    ``forward(q, k, v, kst, statics) -> (o, final, saved)`` (``split_forward``); ``backward(q,
    k, v, do, saved, dfinal, statics) -> (dq, dk, dv, dinit)``, given ``dfinal`` symmetrised."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
    def kernel_call(q, k, v, kst, statics):
        o, final, _ = forward(q, k, v, kst, statics)
        return o, final

    def kernel_call_fwd(q, k, v, kst, statics):
        o, final, saved = forward(q, k, v, kst, statics)
        return (o, final), (q, k, v, saved)

    def kernel_call_bwd(statics, res, cts):
        q, k, v, saved = res
        do, dfinal = cts
        taylor = statics[1]
        dq, dk, dv, dinit = backward(q, k, v, do, saved, _symmetrise(dfinal, taylor), statics)
        return dq, dk, dv, dinit

    kernel_call.defvjp(kernel_call_fwd, kernel_call_bwd)
    return kernel_call


def _pow2_at_least_16(n):
    return max(16, 1 << (int(n) - 1).bit_length())


def call_linear(kernel_call, backend, q_BKYTF, k_BKTF, v_BKTE, state, *, feature_map, eps, chunk_size,
                interpret=None):
    """The chunked form through ``kernel_call`` (``custom_kernel``), the ``backend`` ("tpu" or
    "gpu") kernel; heads-major inputs as in ``glocal.kernels.linear``. Returns ``(o_BKYTE
    float32, final public state)``.

    ``interpret=None``: native when lowered for the backend's platform, interpreted on CPU
    (``glocal.kernels.platforms``; how the CPU tests run both kernels). The GPU path pads F
    and E to powers of two (>= 16, what Triton's dot needs) and the chunk must be one; zero
    features and values change nothing in the sums."""
    B, K, Y, T, F = q_BKYTF.shape
    E = v_BKTE.shape[-1]
    N = int(chunk_size)
    taylor = feature_map == "taylor"
    if taylor:  # s = q.k / sqrt(F) == (q F^-1/4).(k F^-1/4)
        q = q_BKYTF.astype(jnp.float32) * F**-0.25
        k = k_BKTF.astype(jnp.float32) * F**-0.25
    else:
        q, k = features(q_BKYTF, feature_map), features(k_BKTF, feature_map)
    Fp, Ep = F, E
    if backend == "gpu":
        if N & (N - 1) or N < 16:
            raise ValueError(f"impl='pallas_gpu' needs chunk_size a power of two >= 16 (Triton tiles); got {N}.")
        Fp, Ep = _pow2_at_least_16(F), _pow2_at_least_16(E)
    G = -(-T // N)
    pad = lambda x, axis, n: jnp.pad(x, [(0, 0)] * axis + [(0, n)] + [(0, 0)] * (x.ndim - axis - 1))
    q = pad(pad(q, 3, G * N - T), 4, Fp - F)
    k = pad(pad(k, 2, G * N - T), 3, Fp - F)
    v = pad(pad(v_BKTE.astype(jnp.float32), 2, G * N - T), 3, Ep - E)
    kst = to_kernel_state(state, F, Fp, Ep, taylor)
    run = lambda interpret_mode, *ops: kernel_call(*ops, (backend, taylor, float(eps), N, T, interpret_mode))
    # Rows and kv heads are independent: per shard under a mesh (XLA cannot partition the
    # kernels' custom calls itself).
    names = ("batch", "kv_heads_act")
    o, final = per_shard(lambda *ops: native_or_interpreted(backend, run, *ops, interpret=interpret),
                         (q, k, v, kst), (names,) * 4, (names, names))
    return o[:, :, :, :T, :E], from_kernel_state(final, F, E, taylor)
