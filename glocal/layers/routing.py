"""Routers of a mixture-of-experts layer, as pure functions of float32 router logits.

Letters (beyond the package legend): N tokens (flattened B T), X experts, k experts per token
(top-k), G groups (batch rows: capacity is counted per sequence so that routing stays causal
and independent of the other rows), S tokens per group, C capacity slots per expert.

* Token choice (Switch / GShard / Mixtral): each token takes its top-k experts. Combine
  weights are either the softmax over the k selected logits (``"renorm"``, Mixtral) or the full
  softmax's values at the selected experts (``"softmax"``, Switch / GShard). An optional
  selection bias (DeepSeek-V3's auxiliary-loss-free balancing) shifts which experts are
  selected but never the combine weights.
* Expert choice (Zhou et al. 2022): each expert takes the top-C tokens of its column of the
  softmax within a sequence. The choice depends on later tokens, so it is for training only;
  a per-token predictor learns the membership for causal use (``expert_choice_predict``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def token_choice(logits_NX, k: int, weights: str = "renorm", bias_X=None):
    """``(idx_NK, combine_NK, probs_NX)``: the chosen experts (best first), their combine
    weights, and the full softmax (for the balance loss)."""
    probs_NX = jax.nn.softmax(logits_NX, axis=-1)
    select_NX = logits_NX if bias_X is None else logits_NX + jax.lax.stop_gradient(bias_X)
    _, idx_NK = jax.lax.top_k(select_NX, k)
    if weights == "renorm":
        combine_NK = jax.nn.softmax(jnp.take_along_axis(logits_NX, idx_NK, axis=-1), axis=-1)
    elif weights == "softmax":
        combine_NK = jnp.take_along_axis(probs_NX, idx_NK, axis=-1)
    else:
        raise ValueError(f"unknown router_weights {weights!r}; choose 'renorm' or 'softmax'.")
    return idx_NK, combine_NK, probs_NX


def expert_load(idx_NK, num_experts: int):
    """Fraction of the ``N k`` assignments that went to each expert (hard, before any
    dropping); sums to 1."""
    counts_X = jnp.zeros((num_experts,), jnp.float32).at[idx_NK.reshape(-1)].add(1.0)
    return counts_X / idx_NK.size


def balance_loss(probs_NX, idx_NK):
    """Switch load-balance loss ``X sum_e f_e P_e`` (multiply by alpha outside): ``f_e`` the
    hard assignment fractions (``expert_load``), ``P_e`` the mean full-softmax probability.
    Exactly 1 at perfect balance, for any k (f is normalised over the N k assignments)."""
    X = probs_NX.shape[-1]
    return X * jnp.sum(expert_load(idx_NK, X) * jnp.mean(probs_NX, axis=0))


def z_loss(logits_NX):
    """ST-MoE router z-loss: mean squared log-partition of the router logits."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits_NX, axis=-1)))


def entropy(probs_NX):
    """Mean entropy (nats) of the router distribution per token."""
    return -jnp.mean(jnp.sum(probs_NX * jnp.log(jnp.maximum(probs_NX, 1e-30)), axis=-1))


def bias_update_direction(load_X):
    """DeepSeek-V3's rule as a gradient: ``+1`` for overloaded experts, ``-1`` for underloaded,
    so a plain SGD step of size ``rate`` lowers the bias of the busy experts."""
    return jnp.sign(load_X - jnp.mean(load_X))


def capacity(tokens: int, k: int, num_experts: int, factor: float) -> int:
    """Slots per expert per group: ``ceil(k S / X * factor)``, at least 1."""
    return max(1, math.ceil(k * tokens / num_experts * factor))


def capacity_slots(idx_GSK, num_experts: int, C: int):
    """``(slot_GSK, keep_GSK)``: each assignment's position in its expert's buffer, counted in
    token order within the group (token-major, then the token's k choices in rank order), and
    whether it fits (``slot < C``): later tokens overflow first."""
    G, S, K = idx_GSK.shape
    onehot = jax.nn.one_hot(idx_GSK.reshape(G, S * K), num_experts, dtype=jnp.int32)  # [G, S K, X]
    before = jnp.cumsum(onehot, axis=1) - onehot  # assignments to the same expert earlier in the group
    slot = jnp.sum(before * onehot, axis=-1).reshape(G, S, K)
    return slot, slot < C


def expert_choice(logits_GSX, C: int):
    """``(tok_GXC, gate_GXC, member_GSX)``: each expert's top-C tokens of its softmax column
    (sorted by position), their gates (the softmax values), and the 0/1 membership."""
    probs_GSX = jax.nn.softmax(logits_GSX, axis=-1)
    gate_GXC, tok_GXC = jax.lax.top_k(jnp.swapaxes(probs_GSX, 1, 2), C)
    order = jnp.argsort(tok_GXC, axis=-1)
    tok_GXC = jnp.take_along_axis(tok_GXC, order, axis=-1)
    gate_GXC = jnp.take_along_axis(gate_GXC, order, axis=-1)
    G, S, X = logits_GSX.shape
    member_GXS = jnp.zeros((G, X, S), jnp.float32).at[
        jnp.arange(G)[:, None, None], jnp.arange(X)[None, :, None], tok_GXC].set(1.0)
    return tok_GXC, gate_GXC, jnp.swapaxes(member_GXS, 1, 2)


def predictor_loss(pred_logits_GSX, member_GSX):
    """Binary cross-entropy of the causal predictor against expert-choice membership."""
    return jnp.mean(jnp.maximum(pred_logits_GSX, 0) - pred_logits_GSX * member_GSX
                    + jnp.log1p(jnp.exp(-jnp.abs(pred_logits_GSX))))
