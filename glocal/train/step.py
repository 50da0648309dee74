"""The loss and the jitted train/eval steps (pure functions of params, opt state, batch).

A model's ``__call__(inputs, positions_BT=..., segment_ids_BT=...)`` returns ``(logits, aux)``
where ``aux`` maps a name to ``(loss, weight)``: routed models report balance/router losses
that way (others return ``{}``). The step adds ``weight * loss`` for each and logs every
raw value as ``aux/<name>``. Entries with weight None are per-layer statistics (expert
load, dropped fraction, router entropy): logged (``stat_metrics``), never optimised.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def model_outputs(model, batch) -> tuple[jax.Array, dict[str, Any]]:
    """Logits and aux losses. Packed documents' positions and segment ids go only to models
    that keep documents apart (``packed_documents``, see ``glocal.models.base``); the others
    see plain windows, and the loss mask still skips cross-document targets."""
    if getattr(model, "packed_documents", False):  # (a model without the attribute takes plain windows)
        return model(batch["inputs"], positions_BT=batch["positions"], segment_ids_BT=batch["segment_ids"])
    return model(batch["inputs"])


def token_losses(logits_BTV, targets_BT):
    """``(nll_BT, lse_BT)`` in float32: -log p(target) = logsumexp - logit[target]."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return lse_BT - target_BT, lse_BT


def loss_terms(model, batch, num_tokens, z_loss: float):
    """Sums over this microbatch divided by the whole step's ``num_tokens``, so that
    accumulated microbatches add up to the exact token mean of the global batch."""
    logits, aux = model_outputs(model, batch)
    nll_BT, lse_BT = token_losses(logits, batch["targets"])
    mask = batch["loss_mask"]
    ce = jnp.sum(nll_BT * mask) / num_tokens
    metrics = {"loss": ce}
    total = ce
    if z_loss:
        z = jnp.sum(jnp.square(lse_BT) * mask) / num_tokens
        metrics["z_loss"] = z
        total = total + z_loss * z
    part = jnp.sum(mask) / num_tokens  # aux values are per-microbatch means: weight them by tokens
    for name, (value, weight) in aux.items():
        if weight is None:
            metrics.update(stat_metrics(name, value * part))
            continue
        metrics[f"aux/{name}"] = value * part
        total = total + weight * value * part
    return total, metrics


def stat_metrics(name: str, value_L) -> dict:
    """A per-layer statistic ``[L]`` or ``[L, X]`` (weight None in ``aux``: logged, not
    optimised) as scalars: the mean over layers as ``name``, and ``name/l{j}`` per layer (or
    ``name/l{j}/{x}`` per entry, e.g. each expert's load)."""
    out = {name: jnp.mean(value_L)} if value_L.ndim == 1 else {}
    for j in range(value_L.shape[0]):
        if value_L.ndim == 1:
            out[f"{name}/l{j}"] = value_L[j]
        else:
            out.update({f"{name}/l{j}/{x}": value_L[j, x] for x in range(value_L.shape[1])})
    return out


def make_train_step(merge, tx: optax.GradientTransformation, z_loss: float = 0.0):
    """``step(params, opt_state, batch) -> (params, opt_state, metrics)``; ``merge(params)``
    rebuilds the model (graph + parameters + any non-trained state).

    ``batch`` arrays are ``[grad_accum, b, T]``: microbatches scanned with gradients summed (each
    term already divided by the global token count).
    """

    def grads_of(params, micro, num_tokens):
        def f(p):
            return loss_terms(merge(p), micro, num_tokens, z_loss)
        (_, metrics), grads = jax.value_and_grad(f, has_aux=True)(params)
        return grads, metrics

    def step(params, opt_state, batch):
        num_tokens = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
        first = jax.tree.map(lambda x: x[0], batch)
        if batch["inputs"].shape[0] == 1:
            grads, metrics = grads_of(params, first, num_tokens)
        else:
            def body(acc, micro):
                g, m = grads_of(params, micro, num_tokens)
                return jax.tree.map(jnp.add, acc, (g, m)), None
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                 jax.eval_shape(grads_of, params, first, num_tokens))
            (grads, metrics), _ = jax.lax.scan(body, zeros, batch)
        metrics["grad_norm"] = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    return step


def make_eval_step(merge):
    """``eval(params, batch[b, T]) -> (sum of nll, number of tokens)``."""

    def evaluate(params, batch):
        logits, _ = model_outputs(merge(params), batch)
        nll_BT, _ = token_losses(logits, batch["targets"])
        return jnp.sum(nll_BT * batch["loss_mask"]), jnp.sum(batch["loss_mask"])

    return evaluate
