"""Checks every language model in the zoo must pass, shared by tests/test_conformance.py and
the model test files: causality by perturbation, cached decoding replayed token by token,
greedy decoding by repeated full forwards, cache size by formula, FLOPs model vs XLA.

Compiling is most of a check's cost on 2 CPU cores, so a model's jitted entry points live in
one ``Harness`` per model object (``harness(model)``), and ``build`` returns one model object
per configuration: every check and test file that asks for the same model reuses the same
compiled programs (per input shape).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import glocal.models as gm
from glocal.layers.cache import tree_nbytes


def logits_of(out):
    """The logits of a model's ``(logits, aux)``."""
    logits, _ = out
    return logits


class Harness:
    """A model and its jitted forward / prefill / decode, compiled once per input shape."""

    def __init__(self, model):
        self.model = model
        graphdef, self.state = nnx.split(model)
        merge = lambda s: nnx.merge(graphdef, s)
        # ``kw`` is a pytree argument: {} and {positions_BT, segment_ids_BT} trace separately.
        self._forward = jax.jit(lambda s, t, kw: logits_of(merge(s)(t, **kw)))
        self._prefill = jax.jit(lambda s, t, n, c: merge(s).prefill(t, n, c))
        self._decode = jax.jit(lambda s, t, c: merge(s).decode(t, c))

    def forward(self, tokens_BT, **kw):
        return self._forward(self.state, tokens_BT, kw)

    def prefill(self, tokens_BT, lengths_B, cache):
        return self._prefill(self.state, tokens_BT, lengths_B, cache)

    def decode(self, tokens_B, cache):
        return self._decode(self.state, tokens_B, cache)


_HARNESSES: dict[int, Harness] = {}


def harness(model) -> Harness:
    """The one ``Harness`` of ``model`` (it keeps the model alive, so ids stay unique)."""
    if id(model) not in _HARNESSES:
        _HARNESSES[id(model)] = Harness(model)
    return _HARNESSES[id(model)]


@functools.cache
def build(name: str, preset: str = "tiny", **overrides):
    """``glocal.models.build`` memoised per configuration (treat the result as read-only).
    Projection biases (zero at init) and learned sinks (near zero) are randomised, so a misplaced
    one cannot pass."""
    model = gm.build(name, preset, **overrides)
    state = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(17), len(jax.tree.leaves(state))))
    nnx.update(model, jax.tree_util.tree_map_with_path(
        lambda p, v: v + 0.5 * jax.random.normal(next(keys), v.shape, v.dtype)
        if "_b_" in jax.tree_util.keystr(p) or "sinks_H" in jax.tree_util.keystr(p) else v, state))
    return model


def jit_forward(model, fn=None, **kw):
    """``tokens -> logits of model(tokens, **kw)`` (or of ``fn(model, tokens)``, which returns
    ``(logits, aux)`` like a model) as one jitted
    program (eager calls of the grouped models dispatch hundreds of small ops: ~1.5 s a call
    on 2 cores, vs one compile). Without ``fn``/``kw`` it is the model's shared ``Harness``
    forward."""
    if fn is None and not kw:
        return harness(model).forward
    graphdef, state = nnx.split(model)
    call = (lambda m, t: m(t, **kw)) if fn is None else fn
    f = jax.jit(lambda s, t: logits_of(call(nnx.merge(graphdef, s), t)))
    return functools.partial(f, state)


def pad_prompts(x, prompt_lengths):
    """The first ``prompt_lengths[b]`` tokens of each row of ``x``, right-padded with 0 to
    the longest: ``(tokens_BP, lengths_B)`` as ``prefill`` takes them."""
    lengths = jnp.asarray(prompt_lengths, jnp.int32)
    P = max(prompt_lengths)
    return jnp.where(jnp.arange(P)[None] < lengths[:, None], x[:, :P], 0), lengths


def decode_all(model, x, prompt_lengths):
    """Prefill ragged prompts, then decode the rest of ``x`` one token at a time.

    Returns ``({row: {position: next-token logits}}, final cache)``."""
    h = harness(model)
    B, T_ = x.shape
    padded, lengths = pad_prompts(x, prompt_lengths)
    logits, cache = h.prefill(padded, lengths, model.init_cache(B, T_))
    per_row = {b: {L - 1: logits[b]} for b, L in enumerate(prompt_lengths)}
    for step in range(T_ - min(prompt_lengths)):
        pos = np.minimum(np.asarray(prompt_lengths) + step, T_ - 1)
        tok = x[jnp.arange(B), pos]
        logits, cache = h.decode(tok, cache)
        for b in range(B):
            if prompt_lengths[b] + step < T_:
                per_row[b][prompt_lengths[b] + step] = logits[b]
    return per_row, cache


def assert_decode_matches(model, x, prompt_lengths, tol=2e-5):
    """Logits from prefill + decode equal teacher-forced logits at every position."""
    want = harness(model).forward(x)
    per_row, cache = decode_all(model, x, prompt_lengths)
    T_ = x.shape[1]
    for b, got in per_row.items():
        for t, logits in got.items():
            np.testing.assert_allclose(logits, want[b, t], rtol=tol, atol=tol, err_msg=f"row {b} pos {t}")
        assert sorted(got) == list(range(min(got), T_))
    steps = T_ - min(prompt_lengths)  # every row decodes as often as the shortest prompt needs
    np.testing.assert_array_equal(cache.length_B, np.asarray(prompt_lengths) + steps)
    return cache


def greedy_by_full_forwards(model, prompts, n, width=32):
    """Arg-max continuation of each prompt by ``n`` full forwards of the whole batch.

    Rows are right-padded to ``width`` (one compile for every step); causality makes the
    logits at each row's last real token exact."""
    seqs = [list(p) for p in prompts]
    if max(map(len, seqs)) + n - 1 > width:
        raise ValueError(f"width={width} is too short for {n} new tokens after the longest prompt")
    fwd = harness(model).forward
    for _ in range(n):
        padded = np.zeros((len(seqs), width), np.int32)
        for b, s in enumerate(seqs):
            padded[b, : len(s)] = s
        logits = fwd(jnp.asarray(padded))
        last = jnp.asarray([len(s) - 1 for s in seqs])
        nxt = np.asarray(jnp.argmax(logits[jnp.arange(len(seqs)), last], axis=-1))
        for s, t in zip(seqs, nxt):
            s.append(int(t))
    return [s[len(p):] for s, p in zip(seqs, prompts)]


def argmax_by_full_forwards(model, prompt, n, width=32):
    return greedy_by_full_forwards(model, [prompt], n, width)[0]


def assert_causal(model, x, positions, vocab=256, fn=None):
    """Changing token i changes no output before i and some output at or after i.
    ``fn(model, tokens) -> (logits, aux)`` replaces the plain forward (e.g. to switch an option off)."""
    if fn is None:
        f = harness(model).forward
    else:
        graphdef, state = nnx.split(model)
        f = functools.partial(jax.jit(lambda s, t: logits_of(fn(nnx.merge(graphdef, s), t))), state)
    base = f(x)
    for i in positions:
        y = f(x.at[:, i].set((x[:, i] + 1) % vocab))
        np.testing.assert_array_equal(y[:, :i], base[:, :i], err_msg=f"perturbing token {i}")
        assert np.abs(np.asarray(y[:, i:]) - np.asarray(base[:, i:])).max() > 1e-4, f"token {i} changed nothing"


def assert_cache_nbytes(model, batch_size, lengths):
    """``cache_nbytes`` equals the bytes of the cache pytree; returns ``{length: bytes}``."""
    sizes = {}
    for L in lengths:
        sizes[L] = tree_nbytes(jax.eval_shape(lambda: model.init_cache(batch_size, L)))
        assert model.cache_nbytes(batch_size, L) == sizes[L], f"length {L}"
    return sizes


def flops_ratio(model, seq_len, batch_size=2):
    """``flops_per_token / 3`` over XLA's forward FLOPs per token. ``model`` must run its
    layers unrolled (``scan_layers=False``): XLA counts a scanned body once."""
    x = jnp.zeros((batch_size, seq_len), jnp.int32)
    graphdef, state = nnx.split(model)
    cost = jax.jit(lambda s, t: logits_of(nnx.merge(graphdef, s)(t))).lower(state, x).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return model.flops_per_token(seq_len) / 3 / (cost["flops"] / x.size)
