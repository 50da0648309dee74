"""Routers of a mixture-of-experts layer, as pure functions of float32 router logits.

Letters as in the package legend: O token rows (B T flattened), Z experts chosen per token
(top-k), S slots of an expert (its capacity). Capacity and expert choice count per sequence
(batch row), so that routing stays causal and independent of the other rows.

* Token choice (Switch / GShard / Mixtral): each token takes its top-k experts. Combine
  weights are either the softmax over the k selected logits (``"renorm"``, Mixtral) or the full
  softmax's values at the selected experts (``"softmax"``, Switch / GShard). An optional
  selection bias (DeepSeek-V3's auxiliary-loss-free balancing) shifts which experts are
  selected but never the combine weights.
* Expert choice (Zhou et al. 2022): each expert takes the top-``capacity`` tokens of its column of the
  softmax within a sequence. The choice depends on later tokens, so it is for training only;
  a per-token predictor learns the membership for causal use (``expert_choice_predict``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def token_choice(logits_OX, k: int, weights: str = "renorm", bias_X=None):
    """``(idx_OZ, combine_OZ, probs_OX)``: the chosen experts (best first), their combine
    weights, and the full softmax (for the balance loss)."""
    probs_OX = jax.nn.softmax(logits_OX, axis=-1)
    select_OX = logits_OX if bias_X is None else logits_OX + jax.lax.stop_gradient(bias_X)
    _, idx_OZ = jax.lax.top_k(select_OX, k)
    if weights == "renorm":
        combine_OZ = jax.nn.softmax(jnp.take_along_axis(logits_OX, idx_OZ, axis=-1), axis=-1)
    elif weights == "softmax":
        combine_OZ = jnp.take_along_axis(probs_OX, idx_OZ, axis=-1)
    else:
        raise ValueError(f"unknown router_weights {weights!r}; choose 'renorm' or 'softmax'.")
    return idx_OZ, combine_OZ, probs_OX


def expert_load(idx_OZ, num_experts: int):
    """Fraction of the ``O k`` assignments that went to each expert (hard, before any
    dropping); sums to 1."""
    counts_X = jnp.zeros((num_experts,), jnp.float32).at[idx_OZ.reshape(-1)].add(1.0)
    return counts_X / idx_OZ.size


def balance_loss(probs_OX, idx_OZ):
    """Switch load-balance loss ``X sum_e f_e P_e`` (multiply by alpha outside): ``f_e`` the
    hard assignment fractions (``expert_load``), ``P_e`` the mean full-softmax probability.
    Exactly 1 at perfect balance, for any k (f is normalised over the O k assignments)."""
    X = probs_OX.shape[-1]
    return X * jnp.sum(expert_load(idx_OZ, X) * jnp.mean(probs_OX, axis=0))


def z_loss(logits_OX):
    """ST-MoE router z-loss: mean squared log-partition of the router logits."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits_OX, axis=-1)))


def entropy(probs_OX):
    """Mean entropy (nats) of the router distribution per token."""
    return -jnp.mean(jnp.sum(probs_OX * jnp.log(jnp.maximum(probs_OX, 1e-30)), axis=-1))


def bias_update_direction(load_X):
    """DeepSeek-V3's rule as a gradient: ``+1`` for overloaded experts, ``-1`` for underloaded,
    so a plain SGD step of size ``rate`` lowers the bias of the busy experts."""
    return jnp.sign(load_X - jnp.mean(load_X))


def capacity(tokens: int, k: int, num_experts: int, factor: float) -> int:
    """Slots per expert per sequence: ``ceil(k T / X * factor)``, at least 1."""
    return max(1, math.ceil(k * tokens / num_experts * factor))


def capacity_slots(idx_BTZ, num_experts: int, capacity: int):
    """``(slot_BTZ, keep_BTZ)``: each assignment's position in its expert's buffer, counted in
    token order within the group (token-major, then the token's k choices in rank order), and
    whether it fits (``slot < capacity``): later tokens overflow first."""
    B, T, Z = idx_BTZ.shape
    onehot = jax.nn.one_hot(idx_BTZ.reshape(B, T * Z), num_experts, dtype=jnp.int32)  # [B, T Z, X]
    before = jnp.cumsum(onehot, axis=1) - onehot  # assignments to the same expert earlier in the group
    slot = jnp.sum(before * onehot, axis=-1).reshape(B, T, Z)
    return slot, slot < capacity


def expert_choice(logits_BTX, capacity: int):
    """``(tok_BXS, gate_BXS, member_BTX)``: each expert's top-``capacity`` tokens of its softmax column
    (sorted by position), their gates (the softmax values), and the 0/1 membership."""
    probs_BTX = jax.nn.softmax(logits_BTX, axis=-1)
    gate_BXS, tok_BXS = jax.lax.top_k(jnp.swapaxes(probs_BTX, 1, 2), capacity)
    order = jnp.argsort(tok_BXS, axis=-1)
    tok_BXS = jnp.take_along_axis(tok_BXS, order, axis=-1)
    gate_BXS = jnp.take_along_axis(gate_BXS, order, axis=-1)
    B, T, X = logits_BTX.shape
    member_BXT = jnp.zeros((B, X, T), jnp.float32).at[
        jnp.arange(B)[:, None, None], jnp.arange(X)[None, :, None], tok_BXS].set(1.0)
    return tok_BXS, gate_BXS, jnp.swapaxes(member_BXT, 1, 2)


def predictor_loss(pred_logits_BTX, member_BTX):
    """Binary cross-entropy of the causal predictor against expert-choice membership."""
    return jnp.mean(jnp.maximum(pred_logits_BTX, 0) - pred_logits_BTX * member_BTX
                    + jnp.log1p(jnp.exp(-jnp.abs(pred_logits_BTX))))
