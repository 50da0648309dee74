"""Mixture-of-Recursions (glocal.models.mor): what the conformance suite (threshold routing:
causality, decode == teacher forcing, generation, cache bytes, FLOPs, 8 devices) does not
cover. Top-k routing picks exactly k_r tokens per step, hierarchically, in position order;
the compacted computation equals a masked full-sequence reference with the same weights, with
RoPE at the original positions; one recursion at capacity 1 is the plain gated decoder; the
BCE loss against NumPy; the threshold budget; cache bytes by formula; config errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import glocal.models as gm
from glocal.configs import ConfigError
from glocal.models.mor import _admit

RNG = np.random.default_rng(21)


def stem(model, x_BT):
    """Embedding and the first (unique) layer: the input of the recursion."""
    h = model.embed(x_BT)
    pos = model._positions(*x_BT.shape)
    if model.first is not None:
        h, _, _ = model.first(h, positions_BT=pos)
    return h, pos


def test_topk_routing_is_exact_hierarchical_and_in_position_order():
    model = gm.build("mor", "tiny", num_layers=5, num_recursions=3, seed=1)  # capacities 1, 2/3, 1/3
    x = jnp.asarray(RNG.integers(0, 256, (3, 30)), jnp.int32)
    h, pos = stem(model, x)
    trace = []
    model._recurse_topk(h, pos, trace)
    assert [t.shape[1] for t in trace] == [30, 20, 10]  # floor(cap_r * T)
    for prev, cur in zip(trace, trace[1:]):
        for b in range(3):
            assert set(np.asarray(cur[b])) <= set(np.asarray(prev[b]))  # never re-selected later
    for t in trace:
        assert (np.diff(np.asarray(t), axis=1) > 0).all()  # sorted by position, no repeats


def test_compacted_step_equals_a_masked_full_sequence_reference_at_original_positions():
    """The routed tokens' outputs equal the shared layers run on the whole sequence with
    attention restricted to the routed tokens (original positions); re-indexing the routed
    tokens' positions 0..k-1 would change them."""
    model = gm.build("mor", "tiny", seed=2)
    x = jnp.asarray(RNG.integers(0, 256, (2, 24)), jnp.int32)
    h, pos = stem(model, x)
    trace = []
    model._recurse_topk(h, pos, trace)
    idx = trace[1]  # step 2: half of the tokens
    b = jnp.arange(2)[:, None]
    member = jnp.zeros((2, 24), jnp.int32).at[b, idx].set(1)
    compact, _, _ = model.shared(h[b, idx], positions_BT=pos[b, idx])
    full, _, _ = model.shared(h, positions_BT=pos, segment_ids_BT=member)
    np.testing.assert_allclose(compact, full[b, idx], rtol=1e-5, atol=1e-5)
    reindexed, _, _ = model.shared(h[b, idx], positions_BT=jnp.broadcast_to(jnp.arange(12), (2, 12)))
    assert np.abs(np.asarray(reindexed - compact)).max() > 1e-3
    # And the model's own combine: unselected tokens keep their state, selected get x + g y.
    logit = jnp.einsum("btd,d->bt", h, model.router_RD[...][0])
    step1, _, _ = model.shared(h, positions_BT=pos)
    after1 = h + (0.1 * jax.nn.sigmoid(logit))[..., None] * step1  # step 1 takes every token
    logit2 = jnp.einsum("btd,d->bt", after1, model.router_RD[...][1])
    want = after1.at[b, idx].add((0.1 * jax.nn.sigmoid(logit2))[b, idx][..., None] * model.shared(
        after1[b, idx], positions_BT=pos[b, idx])[0])
    got, _ = model._recurse_topk(h, pos)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_one_recursion_at_capacity_one_is_the_plain_gated_decoder():
    model = gm.build("mor", "tiny", sharing="cycle", num_layers=1, num_recursions=1, seed=3)
    x = jnp.asarray(RNG.integers(0, 256, (2, 16)), jnp.int32)
    h = model.embed(x)
    pos = model._positions(2, 16)
    y, _, _ = model.shared(h, positions_BT=pos)
    g = 0.1 * jax.nn.sigmoid(jnp.einsum("btd,d->bt", h, model.router_RD[...][0]))
    want = model._logits(h + g[..., None] * y)
    for mode in ("topk", "threshold"):
        m = gm.build("mor", "tiny", sharing="cycle", num_layers=1, num_recursions=1, seed=3, routing_mode=mode)
        out = m(x)
        np.testing.assert_allclose(out[0], want, rtol=1e-5, atol=1e-5)


def test_router_bce_against_numpy():
    model = gm.build("mor", "tiny", seed=4)
    x = jnp.asarray(RNG.integers(0, 256, (2, 20)), jnp.int32)
    h, pos = stem(model, x)
    trace = []
    _, aux = model._recurse_topk(h, pos, trace)
    # Recompute step by step in NumPy from the same hidden states.
    total, cand = 0.0, np.ones((2, 20), bool)
    hs = np.asarray(h, np.float64)
    for r, idx in enumerate(trace):
        logit = hs @ np.asarray(model.router_RD[...][r], np.float64)
        member = np.zeros((2, 20))
        np.put_along_axis(member, np.asarray(idx), 1.0, axis=1)
        bce = -(member * np.log(1 / (1 + np.exp(-logit))) + (1 - member) * np.log(1 - 1 / (1 + np.exp(-logit))))
        total += (bce * cand).sum() / cand.sum()
        cand = member > 0
        b = np.arange(2)[:, None]
        y, _, _ = model.shared(jnp.asarray(hs[b, idx], jnp.float32), positions_BT=pos[b, idx])
        g = 0.1 / (1 + np.exp(-logit))
        hs[b, idx] += g[b, idx][..., None] * np.asarray(y, np.float64)
    assert float(aux["mor_router_bce"][0]) == pytest.approx(total, rel=1e-4)
    assert aux["mor_router_bce"][1] == 1e-3


def test_threshold_budget_is_causal_and_bounds_each_step():
    want = jnp.asarray(RNG.random((4, 50)) < 0.8)
    pos = jnp.broadcast_to(jnp.arange(50), (4, 50))
    ok = np.asarray(_admit(want, pos, jnp.zeros(4, jnp.int32), 1 / 3))
    for b in range(4):
        count = 0
        for t in range(50):  # the rule, token by token
            admit = bool(want[b, t]) and count < math.ceil((t + 1) / 3 - 1e-6)
            assert ok[b, t] == admit
            count += admit
        assert count <= math.ceil(50 / 3)
    # Continuing from a cache that holds 5 admitted tokens is the same as one call.
    first = _admit(want[:, :20], pos[:, :20], jnp.zeros(4, jnp.int32), 1 / 3)
    rest = _admit(want[:, 20:], pos[:, 20:], jnp.sum(first, axis=1, dtype=jnp.int32), 1 / 3)
    np.testing.assert_array_equal(np.concatenate([first, rest], 1), ok)


def test_cache_bytes_follow_the_recursion_wise_formula():
    """Shared layers: ``b sum_r ceil(cap_r L)`` slots against ``b N_r L`` for full recursion:
    the ratio is (N_r + 1) / (2 N_r) when cap_r L is whole."""
    L = 2048
    for R in (2, 3, 4):
        kw = dict(sharing="cycle", num_layers=R, num_recursions=R, max_seq_len=L)
        mor = jax.eval_shape(lambda: gm.build("mor", "tiny", **kw))
        full = jax.eval_shape(lambda: gm.build("mor", "tiny", recursion_router="none", **kw))
        per_row = lambda m: m.cache_nbytes(1, L) - 4 - 8 * R  # minus the int32 length and counts
        assert per_row(mor) / per_row(full) == pytest.approx((R + 1) / (2 * R), rel=1e-3)


@pytest.mark.parametrize("overrides,message", [
    (dict(num_layers=5, num_recursions=2), "does not split into b x num_recursions"),
    (dict(capacities=(1.0, 0.5, 0.25)), "one per recursion step"),
    (dict(capacities=(0.5, 1.0)), "never increase"),
    (dict(sharing="sequence"), "sharing='sequence' is not one of"),
])
def test_config_errors_explain_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        gm.get_config("mor", "tiny", **overrides)


def test_token_choice_depths_and_losses():
    """Each token leaves at its chosen depth as h0 + p * out; losses against NumPy."""
    model = gm.build("mor", "tiny", recursion_router="token_choice", num_layers=5, num_recursions=3, seed=8)
    x = jnp.asarray(RNG.integers(0, 256, (2, 18)), jnp.int32)
    h0, pos = stem(model, x)
    got, aux = model._recurse_depths(h0, pos)
    logits = np.asarray(jnp.einsum("btd,dr->btr", h0, model.router_DR[...]), np.float64)
    depth = logits.argmax(-1)
    assert len(set(depth.ravel().tolist())) > 1  # the check below covers several depths
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    h, want = h0, np.zeros(h0.shape)
    for r in range(3):
        active = depth >= r
        y, _, _ = model.shared(h, positions_BT=pos, segment_ids_BT=jnp.asarray(active, jnp.int32))
        for b in range(2):
            for t in range(18):
                if depth[b, t] == r:
                    want[b, t] = np.asarray(h0[b, t]) + p[b, t, r] * np.asarray(y[b, t])
        h = jnp.where(jnp.asarray(active)[..., None], y, h)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    f = np.bincount(depth.ravel(), minlength=3) / depth.size
    assert float(aux["mor_depth_balance"][0]) == pytest.approx(3 * np.sum(f * p.mean((0, 1))), rel=1e-5)
    lse = np.log(np.exp(logits).sum(-1))
    assert float(aux["mor_depth_z"][0]) == pytest.approx(np.mean(lse**2), rel=1e-5)


def test_kv_sharing_keeps_only_the_first_steps_cache():
    """Bytes: the shared layers' KV is 1 / N_r of full recursion's; values: the one cache a
    KV-sharing model fills in prefill is the first step's cache of the same weights without
    sharing (the first step is the same computation)."""
    L, R = 1024, 3
    kw = dict(sharing="cycle", num_layers=R, num_recursions=R, max_seq_len=L)
    share = jax.eval_shape(lambda: gm.build("mor", "tiny", kv_sharing=True, **kw))
    full = jax.eval_shape(lambda: gm.build("mor", "tiny", recursion_router="none", **kw))
    per_row = lambda m: m.cache_nbytes(1, L) - 4 - 8 * R
    assert per_row(share) + 4 * (R - 1) == pytest.approx(per_row(full) / R, rel=1e-6)
    a = gm.build("mor", "tiny", kv_sharing=True, num_layers=5, num_recursions=3, seed=11, routing_mode="threshold")
    b = gm.build("mor", "tiny", num_layers=5, num_recursions=3, seed=11, routing_mode="threshold")
    x = jnp.asarray(RNG.integers(0, 256, (2, 12)), jnp.int32)
    lengths = jnp.asarray([12, 7])
    _, ca = a.prefill(x, lengths, a.init_cache(2, 32))
    _, cb = b.prefill(x, lengths, b.init_cache(2, 32))
    assert len(ca.steps) == 1 and len(cb.steps) == 3
    for u, v in zip(jax.tree.leaves(ca.steps[0]), jax.tree.leaves(cb.steps[0])):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="kv_sharing=true needs"):
        gm.get_config("mor", "tiny", kv_sharing=True, recursion_router="token_choice")
