"""Batched generation: one jitted program per (model, shapes) that prefills the prompts and
runs the whole decode loop on device (``lax.while_loop``); the host syncs once at the end.

Works for any model exposing ``init_cache(B, max_len)``, ``prefill(tokens_BT, lengths_B,
cache) -> (logits_BV, cache)`` and ``decode(tokens_B, cache) -> (logits_BV, cache)``.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glocal.errors import UserError


class GenerationError(UserError, ValueError):
    """An invalid argument of ``generate`` (prompts, max_new_tokens, temperature, top_k,
    top_p, or a prompt too long for the model); the message says how to fix it."""


def sample_logits(logits_BV, key, *, temperature: float, top_k: int | None, top_p: float | None):
    """Draw one token per row. ``temperature == 0`` is arg-max (greedy)."""
    if temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV.astype(jnp.float32) / temperature
    if top_k is not None:
        kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if top_p is not None:
        # Keep the smallest set of most likely tokens whose mass reaches top_p.
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
        keep_BV = mass_before_BV < top_p  # the top token always has mass_before 0
        cutoff_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


def _bucket(n: int, minimum: int = 8) -> int:
    """Round up to a power of two so nearby lengths share one compiled program."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len", "out_len", "temperature", "top_k"))
def _generate_program(graphdef, state, prompt_BT, lengths_B, max_new, stop_ids, key, top_p, *,
                      cache_len, out_len, temperature, top_k):
    model = nnx.merge(graphdef, state)
    B = prompt_BT.shape[0]
    sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)
    cache = model.init_cache(B, cache_len)
    logits_BV, cache = model.prefill(prompt_BT, lengths_B, cache)
    key, sub = jax.random.split(key)
    tok_B = sample(logits_BV, sub)
    out_BT = jnp.zeros((B, out_len), jnp.int32).at[:, 0].set(tok_B)
    done_B = jnp.isin(tok_B, stop_ids)

    def cond(s):
        step, _, _, _, done_B, _ = s
        return (step < max_new) & ~jnp.all(done_B)

    def body(s):
        step, tok_B, cache, out_BT, done_B, key = s
        logits_BV, cache = model.decode(tok_B, cache)
        key, sub = jax.random.split(key)
        tok_B = jnp.where(done_B, 0, sample(logits_BV, sub))
        out_BT = jax.lax.dynamic_update_slice(out_BT, tok_B[:, None], (0, step))
        return step + 1, tok_B, cache, out_BT, done_B | jnp.isin(tok_B, stop_ids), key

    state0 = (jnp.int32(1), tok_B, cache, out_BT, done_B, key)
    _, _, _, out_BT, _, _ = jax.lax.while_loop(cond, body, state0)
    return out_BT


def causal_variant(model: nnx.Module) -> nnx.Module:
    """The same weights with causal routing: a model whose router is non-causal in training
    (``config.routing_modes()``, e.g. expert choice) decodes with ``routing_mode="threshold"``."""
    import glocal.models as gm

    causal = model.config.with_routing_mode("threshold")
    if causal == model.config:
        return model
    # The causal model's structure, traced abstractly (jax.eval_shape, not nnx.eval_shape: under a
    # mesh the latter would turn the logical axis names into mesh axes and fail).
    graphdef = []
    jax.eval_shape(lambda: graphdef.append(nnx.graphdef(gm.build_from_config(causal))))
    return nnx.merge(graphdef[0], nnx.state(model))


def generate(
    model: nnx.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    stop_tokens: int | Sequence[int] | None = None,
) -> list[list[int]]:
    """Continue each prompt (a list of token ids) by up to ``max_new_tokens`` tokens.

    ``temperature=0`` is greedy (arg-max, identical to repeated full forwards); otherwise
    tokens are sampled at ``temperature``, optionally restricted to the ``top_k`` most
    likely and/or the nucleus of mass ``top_p``. A sequence stops after emitting any of
    ``stop_tokens`` (the stop token itself is not returned). Prompts may differ in length.
    Returns the new token ids per prompt. Models whose router is non-causal in training
    decode with their causal routing rule (``causal_variant``). A model whose every layer has
    a bounded cache (``model.growing_caches`` empty) may generate past ``max_seq_len``.
    """
    cfg = model.config
    if isinstance(prompts, (str, bytes)) or not len(prompts):
        raise GenerationError("prompts must be a non-empty list of token-id lists (encode text first).")
    prompts = [[int(t) for t in p] for p in prompts]
    for i, p in enumerate(prompts):
        if not p:
            raise GenerationError(f"prompt {i} is empty; give at least one token (e.g. the BOS id).")
        bad = [t for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise GenerationError(f"prompt {i} has token id {bad[0]} outside the vocabulary "
                             f"[0, {cfg.vocab_size}).")
    if max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be >= 0, got {max_new_tokens}.")
    if temperature < 0:
        raise GenerationError(f"temperature must be >= 0 (0 = greedy), got {temperature}.")
    if top_k is not None and not 1 <= top_k <= cfg.vocab_size:
        raise GenerationError(f"top_k must be in [1, vocab_size={cfg.vocab_size}], got {top_k}.")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise GenerationError(f"top_p must be in (0, 1], got {top_p}.")
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    longest = max(len(p) for p in prompts)
    if longest > cfg.max_seq_len:
        raise GenerationError(f"the longest prompt has {longest} tokens, more than the model's "
                              f"max_seq_len={cfg.max_seq_len}; shorten it.")
    growing = getattr(model, "growing_caches", ["its architecture"])
    if longest + max_new_tokens > cfg.max_seq_len and growing:
        raise GenerationError(
            f"the longest prompt ({longest} tokens) plus max_new_tokens ({max_new_tokens}) "
            f"exceeds the model's max_seq_len={cfg.max_seq_len}, and this model's cache grows with the "
            f"sequence ({', '.join(growing)}); shorten the prompt or ask for fewer tokens. Only models whose "
            f"every layer has a bounded cache (window layers, with window.sinks for StreamingLLM, or "
            f"recurrent layers) decode past max_seq_len."
        )
    T = min(_bucket(longest), cfg.max_seq_len)
    out_len = _bucket(max_new_tokens)
    # Bounded caches hold the same slots at any length; the others are sized to the request.
    cache_len = min(-(-(longest + max_new_tokens) // 128) * 128, cfg.max_seq_len)
    prompt_BT = np.zeros((len(prompts), T), np.int32)
    for i, p in enumerate(prompts):
        prompt_BT[i, : len(p)] = p
    stops = [] if stop_tokens is None else ([stop_tokens] if isinstance(stop_tokens, int) else list(stop_tokens))
    stop_ids = np.asarray(stops + [-1], np.int32)  # -1 never matches: keeps the array non-empty
    graphdef, state = nnx.split(causal_variant(model))
    out_BT = _generate_program(
        graphdef, state, jnp.asarray(prompt_BT), jnp.asarray([len(p) for p in prompts], jnp.int32),
        jnp.int32(max_new_tokens), jnp.asarray(stop_ids), jax.random.key(seed),
        None if top_p is None else jnp.float32(top_p),
        cache_len=cache_len, out_len=out_len, temperature=float(temperature),
        top_k=None if top_k is None else int(top_k),
    )
    out_BT = np.asarray(out_BT)[:, :max_new_tokens]
    results = []
    for row in out_BT.tolist():
        cut = next((j for j, t in enumerate(row) if t in stops), len(row))
        results.append(row[:cut])
    return results
