"""StreamingLLM's re-positioned attention sinks, for window-plus-sinks layers.

A layer with mask ``SlidingWindow(w) | Sinks(n)`` and ``rope_positions="absolute"`` needs
nothing special: RoPE at the tokens' own positions, the mask on those positions, and a
``SinkRingKVCache`` of ``n + w`` slots make decoding equal to the masked forward. That is the
right choice for a model *trained* with this mask.

StreamingLLM (Xiao et al., 2023) instead runs a model trained with full attention on endless
text. It keeps the sinks and the recent tokens and gives RoPE *positions inside the cache*, so
no position ever exceeds what the model saw in training (``rope_positions="cache"``). In the
reference code the cache holds un-rotated keys, rotated on every read by their slot index,
and the query sits at index ``min(t, n + w - 1)``. For a ring key at position ``p`` that keeps
the true distance ``t - p``; a sink ``j`` sits at index ``j``, so its distance to the query is
``min(t, n + w - 1) - j`` instead of ``t - j``.

The same scores come from keys rotated once at their absolute positions (what every glocal
cache stores): ring keys are scored against the query rotated at ``t``, sink keys (positions
``< n``, rotated at ``j``, their own slot index) against the query rotated at
``min(t, n + w - 1)``. One softmax over both. That is what ``attend_moved_sinks`` computes,
for a whole sequence (training, evaluation) or a cached chunk (prefill, decode), so chunked
prefill equals token-by-token decoding. Such a model has no plain-mask equivalent: the blocks
kernels do not run it (this dense path does; its memory is ``T x (n + w + T)`` per chunk).

Angles are float32 ``p * f``, as everywhere in glocal; at ``p`` around 1e6 they lose about
``6e-8 * p`` radians, which bounds how far "endless" decoding stays exact.
"""

from __future__ import annotations

import jax.numpy as jnp

ROPE_POSITIONS = ("absolute", "cache")


def query_cache_positions(positions_BT, num_sinks: int, window: int):
    """The position a query at absolute ``t`` takes among the cached tokens when scoring the
    sinks: ``min(t, num_sinks + window - 1)`` (StreamingLLM's cache index of the query)."""
    return jnp.minimum(positions_BT, num_sinks + window - 1)


def attend_moved_sinks(q_BTHE, qc_BTHE, k_BSKE, v_BSKE, allowed_BTS, kv_positions_BS, *, num_sinks: int,
                       softcap=None, sinks_H=None, kv_heads_major: bool = False):
    """Softmax attention where keys at positions ``< num_sinks`` are scored against ``qc``
    (queries rotated at their cache positions) and all other keys against ``q`` (rotated at
    their absolute positions); ``allowed_BTS`` is the mask on absolute positions (empty slots
    excluded). ``sinks_H``: optional learned per-head logits in the denominator (GPT-OSS).
    Returns ``[B, T, H, E]`` in q's dtype; a row that sees nothing gives 0."""
    B, T, H, E = q_BTHE.shape
    k_BKSE, v_BKSE = (k_BSKE, v_BSKE) if kv_heads_major else (jnp.swapaxes(k_BSKE, 1, 2),
                                                              jnp.swapaxes(v_BSKE, 1, 2))
    K = k_BKSE.shape[1]
    Y = H // K
    group = lambda x: x.reshape(B, T, K, Y, E)
    scores = lambda q: jnp.einsum("btkye,bkse->bkyts", group(q), k_BKSE.astype(q.dtype),
                                  preferred_element_type=jnp.float32) * E**-0.5
    is_sink_B111S = (kv_positions_BS < num_sinks)[:, None, None, None, :]
    s_BKYTS = jnp.where(is_sink_B111S, scores(qc_BTHE), scores(q_BTHE))
    if softcap is not None:
        s_BKYTS = softcap * jnp.tanh(s_BKYTS / softcap)
    allowed_B11TS = allowed_BTS[:, None, None]
    s_BKYTS = jnp.where(allowed_B11TS, s_BKYTS, -jnp.inf)
    m_BKYT1 = jnp.max(s_BKYTS, axis=-1, keepdims=True)
    if sinks_H is not None:
        sink_1KY11 = sinks_H.astype(jnp.float32).reshape(1, K, Y, 1, 1)
        m_BKYT1 = jnp.maximum(m_BKYT1, sink_1KY11)
    m_BKYT1 = jnp.where(jnp.isfinite(m_BKYT1), m_BKYT1, 0.0)  # a row seeing nothing
    p_BKYTS = jnp.exp(s_BKYTS - m_BKYT1)
    denom_BKYT1 = jnp.sum(p_BKYTS, axis=-1, keepdims=True)
    if sinks_H is not None:
        denom_BKYT1 = denom_BKYT1 + jnp.exp(sink_1KY11 - m_BKYT1)
    p_BKYTS = p_BKYTS / jnp.where(denom_BKYT1 > 0, denom_BKYT1, 1.0)
    o_BKYTE = jnp.einsum("bkyts,bkse->bkyte", p_BKYTS.astype(v_BKSE.dtype), v_BKSE,
                         preferred_element_type=jnp.float32)
    return o_BKYTE.transpose(0, 3, 1, 2, 4).reshape(B, T, H, E).astype(q_BTHE.dtype)


def check_rope_positions(value: str) -> None:
    if value not in ROPE_POSITIONS:
        raise ValueError(f"rope_positions={value!r}: choose 'absolute' (positions in the text, as trained) or "
                         f"'cache' (StreamingLLM: positions inside the sink + window cache).")
