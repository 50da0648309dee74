"""Checks every language model in the zoo must pass, shared by the model test files:
cached decoding replayed token by token, and greedy decoding by repeated full forwards."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def jit_forward(model, fn=None, **kw):
    """``tokens -> model(tokens, **kw)`` (or ``fn(model, tokens)``) as one jitted program
    (eager calls of the grouped models dispatch hundreds of small ops: ~1.5 s a call on 2
    cores, vs one compile)."""
    graphdef, state = nnx.split(model)
    call = (lambda m, t: m(t, **kw)) if fn is None else fn
    f = jax.jit(lambda s, t: call(nnx.merge(graphdef, s), t))
    return functools.partial(f, state)


def decode_all(model, x, prompt_lengths):
    """Prefill ragged prompts, then decode the rest of ``x`` one token at a time.

    Returns ``({row: {position: next-token logits}}, final cache)``."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def prefill(state, toks, lengths, cache):
        return nnx.merge(graphdef, state).prefill(toks, lengths, cache)

    @jax.jit
    def decode(state, tok, cache):
        return nnx.merge(graphdef, state).decode(tok, cache)

    B, T_ = x.shape
    cache = model.init_cache(B, T_)
    P = max(prompt_lengths)
    lengths = jnp.asarray(prompt_lengths, jnp.int32)
    padded = jnp.where(jnp.arange(P)[None] < lengths[:, None], x[:, :P], 0)
    logits, cache = prefill(state, padded, lengths, cache)
    per_row = {b: {L - 1: logits[b]} for b, L in enumerate(prompt_lengths)}
    for step in range(T_ - min(prompt_lengths)):
        pos = np.minimum(np.asarray(prompt_lengths) + step, T_ - 1)
        tok = x[jnp.arange(B), pos]
        logits, cache = decode(state, tok, cache)
        for b in range(B):
            if prompt_lengths[b] + step < T_:
                per_row[b][prompt_lengths[b] + step] = logits[b]
    return per_row, cache


def assert_decode_matches(model, x, prompt_lengths, tol=2e-5):
    """Logits from prefill + decode equal teacher-forced logits at every position."""
    want = jit_forward(model)(x)
    per_row, cache = decode_all(model, x, prompt_lengths)
    T_ = x.shape[1]
    for b, got in per_row.items():
        for t, logits in got.items():
            np.testing.assert_allclose(logits, want[b, t], rtol=tol, atol=tol, err_msg=f"row {b} pos {t}")
        assert sorted(got) == list(range(min(got), T_))
    steps = T_ - min(prompt_lengths)  # every row decodes as often as the shortest prompt needs
    np.testing.assert_array_equal(cache.length_B, np.asarray(prompt_lengths) + steps)
    return cache


def argmax_by_full_forwards(model, prompt, n, width=32):
    seq, out = list(prompt), []
    fwd = jax.jit(lambda t: model(t))
    for _ in range(n):
        # Right-pad to one fixed length (one compile); causality makes position len-1 exact.
        padded = jnp.zeros((1, width), jnp.int32).at[0, : len(seq)].set(jnp.asarray(seq))
        nxt = int(jnp.argmax(fwd(padded)[0, len(seq) - 1]))
        out.append(nxt)
        seq.append(nxt)
    return out


def assert_causal(model, x, positions, vocab=256, fn=None):
    """Changing token i changes no output before i and some output at or after i.
    ``fn(model, tokens)`` replaces the plain forward (e.g. to switch an option off)."""
    fn = (lambda m, t: m(t)) if fn is None else fn
    graphdef, state = nnx.split(model)
    f = jax.jit(lambda s, t: fn(nnx.merge(graphdef, s), t))
    f = functools.partial(f, state)
    base = f(x)
    for i in positions:
        y = f(x.at[:, i].set((x[:, i] + 1) % vocab))
        np.testing.assert_array_equal(y[:, :i], base[:, :i], err_msg=f"perturbing token {i}")
        assert np.abs(np.asarray(y[:, i:]) - np.asarray(base[:, i:])).max() > 1e-4
