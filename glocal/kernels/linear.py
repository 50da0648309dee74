"""Causal, normalised linear attention (Based's Taylor kernel, elu+1, relu) in pure JAX.

    o_t = (phi(q_t) S0 + sum_{s<=t} w(q_t, k_s) v_s) / (phi(q_t) . z0 + sum_{s<=t} w(q_t, k_s) + eps)

with ``w(q, k) = phi(q) . phi(k)`` and ``(S0, z0)`` an optional initial state. Feature maps:

* ``"taylor"``: ``w = 1 + s + s^2 / 2`` with ``s = q.k / sqrt(F)`` (F = the q/k feature width
  per head, not the value head width): the second-order Taylor expansion of ``exp(s)``.
  ``phi(x) = [1, x / F^(1/4), sym2(x) / sqrt(2 F)]`` where ``sym2`` keeps each unordered pair
  ``x_i x_j`` once (off-diagonal pairs scaled by sqrt 2), so the state has
  ``J = 1 + F + F (F + 1) / 2`` features (153 for F = 16) instead of ``1 + F + F^2``.
* ``"elu"``: ``phi(x) = elu(x) + 1``; ``"relu"``: ``phi(x) = relu(x)`` (J = F).

Implementations (``impl``):

* ``"quadratic"``: the masked ``[T, T]`` kernel matrix; the reference (autodiff).
* ``"chunked"``: ``lax.scan`` over chunks of ``chunk_size`` tokens. Inside a chunk the kernel
  is computed from raw ``q k^T`` (features never expanded); across chunks a float32 state
  ``(S [J, E], z [J])`` carries the earlier chunks. Its custom VJP keeps only each chunk's
  entering state (no per-token features) and walks the chunks in reverse.
* ``"pallas_tpu"`` / ``"pallas_gpu"``: the chunked form as Pallas kernels (Mosaic TPU, Triton
  GPU; forward and backward), in interpret mode off their platform
  (``glocal.kernels.linear_pallas_tpu``, ``glocal.kernels.linear_pallas_gpu``).
* ``"auto"``: ``"chunked"`` on every platform (the Pallas kernels are verified in interpret mode
  and by lowering only; pick them explicitly on hardware).

``linear_attention_step`` is the recurrent form for decoding (one token per row). The state
``(S_BKJE, z_BKJ)`` (float32, per kv head) is the same in every form, so a prefill by the
chunked form hands its final state to the step function.

Letters as in the package legend: Y query heads per kv head (H / K), J the state's features;
chunks are the legend's blocks (G chunks of N tokens).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from glocal.kernels.linear_features import FEATURE_MAPS, check_map, feature_dim, features, full_taylor_features

__all__ = ["FEATURE_MAPS", "LINEAR_IMPLEMENTATIONS", "empty_state", "feature_dim", "features", "full_taylor_features",
           "linear_attention", "linear_attention_step"]

LINEAR_IMPLEMENTATIONS = ("auto", "quadratic", "chunked", "pallas_tpu", "pallas_gpu")


def _kernel(q_F, k_F, feature_map: str):
    """``w(q, k)`` for every pair of the leading axes: ``q [..., T, F]``, ``k [..., S, F]`` ->
    ``[..., T, S]`` (float32), from raw ``q k^T`` for taylor."""
    if feature_map == "taylor":
        s = jnp.einsum("...tf,...sf->...ts", q_F.astype(jnp.float32), k_F.astype(jnp.float32)) / np.sqrt(q_F.shape[-1])
        return 1.0 + s + 0.5 * s * s
    return jnp.einsum("...tf,...sf->...ts", features(q_F, feature_map), features(k_F, feature_map))


def empty_state(batch_size: int, num_kv_heads: int, F: int, E: int, feature_map: str = "taylor"):
    """``(S_BKJE, z_BKJ)`` of zeros (float32)."""
    J = feature_dim(feature_map, F)
    return jnp.zeros((batch_size, num_kv_heads, J, E), jnp.float32), jnp.zeros((batch_size, num_kv_heads, J), jnp.float32)


def linear_attention(q_BTHF, k_BTKF, v_BTKE, *, feature_map: str = "taylor", eps: float = 1e-6, impl: str = "auto",
                     chunk_size: int = 64, initial_state=None, return_state: bool = False):
    """Causal normalised linear attention; see the module docstring.

    Args:
      q_BTHF: queries ``[B, T, H, F]``; k_BTKF: keys ``[B, T, K, F]`` with ``H % K == 0``
        (query head h reads kv head h // (H / K)); v_BTKE: values ``[B, T, K, E]``.
      initial_state: ``(S_BKJE, z_BKJ)`` from an earlier call or ``empty_state``; None = zeros.
      return_state: also return the final state (the input to ``linear_attention_step``).

    Returns ``o_BTHE`` in q's dtype (and the float32 state when asked).
    """
    check_map(feature_map)
    if impl not in LINEAR_IMPLEMENTATIONS:
        raise ValueError(f"unknown linear attention impl {impl!r}; choose one of {LINEAR_IMPLEMENTATIONS}.")
    if q_BTHF.ndim != 4 or k_BTKF.ndim != 4 or v_BTKE.ndim != 4:
        raise ValueError(f"linear_attention expects q [B,T,H,F], k [B,T,K,F], v [B,T,K,E]; got {q_BTHF.shape}, "
                         f"{k_BTKF.shape}, {v_BTKE.shape}.")
    B, T, H, F = q_BTHF.shape
    K, E = v_BTKE.shape[2], v_BTKE.shape[3]
    if k_BTKF.shape != (B, T, K, F) or v_BTKE.shape[:2] != (B, T):
        raise ValueError(f"k must be [B, T, K, F] = {(B, T, K, F)} and v [B, T, K, E]; got {k_BTKF.shape}, "
                         f"{v_BTKE.shape}.")
    if H % K:
        raise ValueError(f"query heads ({H}) must be a multiple of kv heads ({K}).")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}.")
    state = empty_state(B, K, F, E, feature_map) if initial_state is None else tuple(
        s.astype(jnp.float32) for s in initial_state)
    # Fold the query heads that share a kv head: q [B, K, Y, T, F]; k/v [B, K, T, .].
    q_BKYTF = q_BTHF.reshape(B, T, K, H // K, F).transpose(0, 2, 3, 1, 4)
    k_BKTF, v_BKTE = k_BTKF.transpose(0, 2, 1, 3), v_BTKE.transpose(0, 2, 1, 3)
    if impl == "quadratic":
        o_BKYTE, final = _quadratic(q_BKYTF, k_BKTF, v_BKTE, state, feature_map, eps)
    elif impl.startswith("pallas"):
        if impl == "pallas_tpu":
            from glocal.kernels.linear_pallas_tpu import linear_attention_pallas_tpu as kernel
        else:
            from glocal.kernels.linear_pallas_gpu import linear_attention_pallas_gpu as kernel
        o_BKYTE, final = kernel(q_BKYTF, k_BKTF, v_BKTE, state, feature_map=feature_map, eps=float(eps),
                                chunk_size=int(chunk_size))
    else:
        o_BKYTE, final = _chunked(q_BKYTF, k_BKTF, v_BKTE, state, feature_map, float(eps), int(chunk_size))
    o_BTHE = o_BKYTE.transpose(0, 3, 1, 2, 4).reshape(B, T, H, E).astype(q_BTHF.dtype)
    return (o_BTHE, final) if return_state else o_BTHE


def linear_attention_step(q_BHF, k_BKF, v_BKE, state, *, feature_map: str = "taylor", eps: float = 1e-6):
    """One token per row (decoding): add ``(k, v)`` to the state, then read it with ``q``.
    Returns ``(o_BHE, state)``; the state stays float32 and its size never grows."""
    S_BKJE, z_BKJ = state
    B, H, F = q_BHF.shape
    K = k_BKF.shape[1]
    phik_BKJ = features(k_BKF, feature_map)
    S_BKJE = S_BKJE + phik_BKJ[..., None] * v_BKE.astype(jnp.float32)[:, :, None, :]
    z_BKJ = z_BKJ + phik_BKJ
    phiq_BKYJ = features(q_BHF.reshape(B, K, H // K, F), feature_map)
    num_BKYE = jnp.einsum("bkyd,bkde->bkye", phiq_BKYJ, S_BKJE)
    den_BKY = jnp.einsum("bkyd,bkd->bky", phiq_BKYJ, z_BKJ)
    o_BHE = (num_BKYE / (den_BKY[..., None] + eps)).reshape(B, H, -1)
    return o_BHE.astype(q_BHF.dtype), (S_BKJE, z_BKJ)


# -- quadratic (reference) -----------------------------------------------------------------------
def _quadratic(q_BKYTF, k_BKTF, v_BKTE, state, feature_map, eps):
    S_BKJE, z_BKJ = state
    T = q_BKYTF.shape[3]
    w_BKYTS = _kernel(q_BKYTF, k_BKTF[:, :, None], feature_map) * jnp.tril(jnp.ones((T, T), jnp.float32))
    phiq = features(q_BKYTF, feature_map)
    v = v_BKTE.astype(jnp.float32)
    num = jnp.einsum("bkyts,bkse->bkyte", w_BKYTS, v) + jnp.einsum("bkytd,bkde->bkyte", phiq, S_BKJE)
    den = w_BKYTS.sum(-1) + jnp.einsum("bkytd,bkd->bkyt", phiq, z_BKJ)
    phik = features(k_BKTF, feature_map)
    final = (S_BKJE + jnp.einsum("bktd,bkte->bkde", phik, v), z_BKJ + phik.sum(2))
    return num / (den[..., None] + eps), final


# -- chunked (training) ----------------------------------------------------------------------------
def _to_chunks(x, N: int, axis: int):
    """Pad ``axis`` (length T) to G*N and split it into ``[G, ..., N, ...]`` (chunks leading)."""
    T = x.shape[axis]
    G = -(-T // N)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, G * N - T)
    x = jnp.pad(x, pad).reshape(*x.shape[:axis], G, N, *x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def _chunk_valid(T: int, N: int):
    """``[G, N]`` float mask of real (unpadded) positions."""
    G = -(-T // N)
    return (np.arange(G * N).reshape(G, N) < T).astype(np.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _chunked(q_BKYTF, k_BKTF, v_BKTE, state, feature_map, eps, N):
    return _chunked_fwd(q_BKYTF, k_BKTF, v_BKTE, state, feature_map, eps, N)[0]


def _chunk_out(q_BKYNF, k_BKNF, v_BKNE, S_BKJE, z_BKJ, feature_map, eps):
    """One chunk's outputs from the state entering it; also what the backward needs."""
    N = q_BKYNF.shape[3]
    w = _kernel(q_BKYNF, k_BKNF[:, :, None], feature_map) * jnp.tril(jnp.ones((N, N), jnp.float32))
    phiq = features(q_BKYNF, feature_map)
    v = v_BKNE.astype(jnp.float32)
    num = jnp.einsum("bkyts,bkse->bkyte", w, v) + jnp.einsum("bkytd,bkde->bkyte", phiq, S_BKJE)
    den = w.sum(-1) + jnp.einsum("bkytd,bkd->bkyt", phiq, z_BKJ) + eps
    return num / den[..., None], (w, phiq, num, den)


def _chunked_fwd(q_BKYTF, k_BKTF, v_BKTE, state, feature_map, eps, N):
    T = q_BKYTF.shape[3]
    qc, kc, vc = _to_chunks(q_BKYTF, N, 3), _to_chunks(k_BKTF, N, 2), _to_chunks(v_BKTE, N, 2)
    valid_GN = jnp.asarray(_chunk_valid(T, N))

    def body(carry, xs):
        S_BKJE, z_BKJ = carry
        q, k, v, valid_N = xs
        o, _ = _chunk_out(q, k, v, S_BKJE, z_BKJ, feature_map, eps)
        phik = features(k, feature_map) * valid_N[:, None]  # padded keys never enter the state
        new = (S_BKJE + jnp.einsum("bkcd,bkce->bkde", phik, v.astype(jnp.float32)), z_BKJ + phik.sum(2))
        return new, (o, (S_BKJE, z_BKJ))

    final, (o_G, entering_G) = jax.lax.scan(body, tuple(state), (qc, kc, vc, valid_GN))
    o = jnp.moveaxis(o_G, 0, 3).reshape(*q_BKYTF.shape[:3], -1, v_BKTE.shape[-1])[:, :, :, :T]
    # Residuals: the inputs and each chunk's entering state (per chunk, never per token).
    return (o, final), (q_BKYTF, k_BKTF, v_BKTE, entering_G)


def _chunked_bwd(feature_map, eps, N, residuals, cotangents):
    q_BKYTF, k_BKTF, v_BKTE, entering_G = residuals
    do_BKYTE, (dS_final, dz_final) = cotangents
    T = q_BKYTF.shape[3]
    qc, kc, vc = _to_chunks(q_BKYTF, N, 3), _to_chunks(k_BKTF, N, 2), _to_chunks(v_BKTE, N, 2)
    doc = _to_chunks(do_BKYTE.astype(jnp.float32), N, 3)
    valid_GN = jnp.asarray(_chunk_valid(T, N))

    def body(carry, xs):
        dS, dz = carry  # gradient w.r.t. the state leaving this chunk
        q, k, v, do, valid_N, (S, z) = xs

        def chunk(q, k, v, S, z):
            o, _ = _chunk_out(q, k, v, S, z, feature_map, eps)
            phik = features(k, feature_map) * valid_N[:, None]
            new = (S + jnp.einsum("bkcd,bkce->bkde", phik, v.astype(jnp.float32)), z + phik.sum(2))
            return o, new

        # Recompute this chunk from its entering state and pull back both outputs at once.
        _, pull = jax.vjp(chunk, q, k, v, S, z)
        dq, dk, dv, dS_in, dz_in = pull((do, (dS, dz)))
        return (dS_in, dz_in), (dq, dk, dv)

    (dS0, dz0), (dq_G, dk_G, dv_G) = jax.lax.scan(body, (dS_final.astype(jnp.float32), dz_final.astype(jnp.float32)),
                                                  (qc, kc, vc, doc, valid_GN, entering_G), reverse=True)
    unchunk = lambda x_G, axis, like: jnp.moveaxis(x_G, 0, axis).reshape(
        *like.shape[:axis], -1, *like.shape[axis + 1:])[(slice(None),) * axis + (slice(0, T),)].astype(like.dtype)
    return (unchunk(dq_G, 3, q_BKYTF), unchunk(dk_G, 2, k_BKTF), unchunk(dv_G, 2, v_BKTE), (dS0, dz0))


_chunked.defvjp(_chunked_fwd, _chunked_bwd)
