"""Each layer against an independent NumPy reference."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glocal import kernels
from glocal.kernels import masks
from glocal.layers import (MLP, Attention, Embed, KVCache, LayerNorm, RingKVCache, RMSNorm,
                           Unembed, apply_rope)
from tests.naive import attention_loops, rope_complex

RNG = np.random.default_rng(0)


def randn(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def test_rmsnorm_and_layernorm():
    x = randn(2, 5, 16) * 3 + 1
    n = RMSNorm(16, eps=1e-6, rngs=nnx.Rngs(0))
    n.scale[...] = jnp.asarray(randn(16))
    want = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6) * np.asarray(n.scale[...])
    np.testing.assert_allclose(n(jnp.asarray(x)), want, rtol=1e-5, atol=1e-5)
    ln = LayerNorm(16, eps=1e-5, rngs=nnx.Rngs(0))
    ln.scale[...], ln.bias[...] = jnp.asarray(randn(16)), jnp.asarray(randn(16))
    x64 = x.astype(np.float64)
    want = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
    want = want * np.asarray(ln.scale[...]) + np.asarray(ln.bias[...])
    np.testing.assert_allclose(ln(jnp.asarray(x)), want, rtol=1e-4, atol=1e-4)


def test_rope_matches_complex_rotation_and_is_relative():
    x = randn(2, 7, 3, 8)
    pos = RNG.integers(0, 1000, size=(2, 7))
    np.testing.assert_allclose(apply_rope(jnp.asarray(x), jnp.asarray(pos)), rope_complex(x, pos),
                               rtol=1e-4, atol=1e-4)
    # q.k after RoPE depends only on the position difference.
    q, k = randn(1, 1, 1, 8), randn(1, 1, 1, 8)
    dot = lambda pq, pk: float(jnp.sum(apply_rope(jnp.asarray(q), jnp.array([[pq]]))
                                       * apply_rope(jnp.asarray(k), jnp.array([[pk]]))))
    assert abs(dot(5, 2) - dot(105, 102)) < 1e-4
    assert abs(dot(5, 2) - dot(5, 3)) > 1e-3


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_mlp(activation):
    m = MLP(8, 12, activation=activation, rngs=nnx.Rngs(1))
    x = randn(2, 3, 8).astype(np.float64)
    wi, wo = np.asarray(m.wi_DAI[...], np.float64), np.asarray(m.wo_ID[...], np.float64)
    if activation == "swiglu":
        g, u = x @ wi[:, 0], x @ wi[:, 1]
        h = g / (1 + np.exp(-g)) * u
    else:
        a = x @ wi[:, 0]
        h = 0.5 * a * (1 + np.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a**3)))
    np.testing.assert_allclose(m(jnp.asarray(x, jnp.float32)), h @ wo, rtol=1e-4, atol=1e-5)


def test_embed_tied_and_untied_heads():
    e = Embed(11, 6, rngs=nnx.Rngs(0))
    tok = np.array([[3, 0, 10]])
    table = np.asarray(e.table_VD[...])
    np.testing.assert_array_equal(e(jnp.asarray(tok)), table[tok])
    x = randn(1, 3, 6)
    np.testing.assert_allclose(e.attend(jnp.asarray(x)), x @ table.T, rtol=1e-5, atol=1e-5)
    u = Unembed(6, 11, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(u(jnp.asarray(x)), x @ np.asarray(u.w_DV[...]), rtol=1e-5, atol=1e-5)


MASKS = {
    "full": masks.Full(),
    "causal": masks.Causal(),
    "window3": masks.SlidingWindow(3),
    "causal_offset": masks.Causal(2),
}


@pytest.mark.parametrize("impl", ["xla", "dot_product", "reference"])
@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("H,K", [(4, 4), (4, 2), (4, 1)])
def test_attention_kernel_matches_loops(impl, mask_name, H, K):
    B, T, S, E = 2, 6, 9 if mask_name in ("full", "causal_offset") else 6, 8
    q, k, v = randn(B, T, H, E), randn(B, S, K, E), randn(B, S, K, E)
    mask = MASKS[mask_name]
    allowed = np.broadcast_to(mask.dense(T, S), (B, T, S))
    got = kernels.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask=mask, impl=impl)
    np.testing.assert_allclose(got, attention_loops(q, k, v, allowed), rtol=1e-4, atol=1e-5)


def test_attention_segments_softcap_positions_and_empty_rows():
    B, T, H, E = 2, 7, 2, 4
    q, k, v = randn(B, T, H, E), randn(B, T, H, E), randn(B, T, H, E)
    seg = np.array([[0, 0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 1, 1, 1]])
    allowed = masks.Causal().dense(T)[None] & (seg[:, :, None] == seg[:, None, :])
    got = kernels.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask=masks.Causal(),
                            segment_ids=jnp.asarray(seg), softcap=2.0)
    np.testing.assert_allclose(got, attention_loops(q, k, v, allowed, softcap=2.0), rtol=1e-4, atol=1e-5)
    # Positions (a cache's view): slots hold tokens out of order; -1 slots are empty.
    kv_pos = np.array([[4, -1, 2, 3, 0, 1, 6], [6, 5, 4, 3, 2, 1, 0]])
    q_pos = np.array([[3, 4, 5, 6, 7, 8, 0], [0, 1, 2, 3, 4, 5, 6]]) - np.array([[3], [0]])
    allowed = (kv_pos[:, None, :] <= q_pos[:, :, None]) & (kv_pos[:, None, :] >= 0)
    for impl in ("xla", "dot_product", "reference"):
        got, = [kernels.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask=masks.Causal(),
                                  q_positions=jnp.asarray(q_pos), kv_positions=jnp.asarray(kv_pos),
                                  impl=impl)]
        want = attention_loops(q, k, v, allowed)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        assert np.all(np.asarray(got)[0, 6] == 0.0)  # query at position -3 sees nothing -> 0


def test_attention_lse_matches_logsumexp():
    q, k, v = randn(1, 5, 2, 4), randn(1, 5, 2, 4), randn(1, 5, 2, 4)
    out, lse = kernels.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask=masks.Causal(),
                                 impl="xla", return_lse=True)
    logits = np.einsum("bthe,bshe->bhts", q.astype(np.float64), k) / 2.0
    logits = np.where(masks.Causal().dense(5)[None, None], logits, -np.inf)
    want = np.log(np.exp(logits).sum(-1)).transpose(0, 2, 1)
    np.testing.assert_allclose(lse, want, rtol=1e-5, atol=1e-5)


def _attn(K, mask=masks.Causal(), **kw):
    return Attention(16, 4, K, mask=mask, rngs=nnx.Rngs(3), **kw)


def test_attention_layer_matches_manual_projections():
    layer = _attn(2)
    x = randn(2, 5, 16)
    pos = np.broadcast_to(np.arange(5), (2, 5))
    qw, kw, vw, ow = (np.asarray(p, np.float64) for p in (*layer.qkv_kernels(), layer.o_HED[...]))
    q = rope_complex(np.einsum("btd,dhe->bthe", x, qw), pos)
    k = rope_complex(np.einsum("btd,dke->btke", x, kw), pos)
    v = np.einsum("btd,dke->btke", x, vw)
    o = attention_loops(q, k, v, np.broadcast_to(masks.Causal().dense(5), (2, 5, 5)))
    y, cache = layer(jnp.asarray(x))
    assert cache is None
    np.testing.assert_allclose(y, np.einsum("bthe,hed->btd", o, ow), rtol=1e-4, atol=1e-5)


def test_gqa_with_all_kv_heads_equals_mha_and_grouping_equals_repeated_heads():
    x = randn(2, 6, 16)
    gqa = _attn(2)
    mha = _attn(4)
    # Give the MHA layer each kv head repeated for its 2 query heads: outputs must agree.
    q, k, v = gqa.qkv_kernels()
    mha.set_qkv_kernels(q, jnp.repeat(k, 2, axis=1), jnp.repeat(v, 2, axis=1))
    mha.o_HED[...] = gqa.o_HED[...]
    np.testing.assert_array_equal(mha.qkv_kernels()[1], jnp.repeat(k, 2, axis=1))  # round trip
    np.testing.assert_allclose(gqa(jnp.asarray(x))[0], mha(jnp.asarray(x))[0], rtol=1e-5, atol=1e-5)
    # num_kv_heads == num_heads is plain multi-head attention (no grouping).
    assert mha.num_kv_heads == mha.num_heads


def test_cross_attention_reads_other_stream():
    layer = Attention(16, 4, 2, mask=masks.Full(), kv_dim=12, rope_theta=None, rngs=nnx.Rngs(0))
    x, mem = randn(2, 3, 16), randn(2, 7, 12)
    qw, kw, vw, ow = (np.asarray(p, np.float64) for p in (*layer.qkv_kernels(), layer.o_HED[...]))
    q, k, v = np.einsum("btd,dhe->bthe", x, qw), np.einsum("bsd,dke->bske", mem, kw), np.einsum("bsd,dke->bske", mem, vw)
    o = attention_loops(q, k, v, np.ones((2, 3, 7), bool))
    got, _ = layer(jnp.asarray(x), kv_BSD=jnp.asarray(mem))
    np.testing.assert_allclose(got, np.einsum("bthe,hed->btd", o, ow), rtol=1e-4, atol=1e-5)


def test_attention_config_errors():
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        Attention(30, 4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="must divide num_heads"):
        Attention(32, 4, 3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="unknown attention impl"):
        Attention(32, 4, impl="flash9", rngs=nnx.Rngs(0))


def test_kv_cache_update_skips_padding_and_ring_keeps_newest():
    k = jnp.asarray(np.arange(2 * 6).reshape(2, 6, 1, 1).astype(np.float32))
    pos = jnp.asarray(np.broadcast_to(np.arange(6), (2, 6)))
    valid = jnp.asarray(np.array([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], bool))
    full = KVCache.create(2, 8, 1, 1).update(k, k, pos, valid)
    np.testing.assert_array_equal(full.pos_BS, [[0, 1, 2, 3, 4, 5, -1, -1], [0, 1, -1, -1, -1, -1, -1, -1]])
    np.testing.assert_array_equal(full.k_BKSE[0, 0, :6, 0], np.arange(6))
    ring = RingKVCache.create(2, 4, 1, 1).update(k, k, pos, valid)
    # Row 0 wrote positions 0..5 into 4 slots: 4,5 overwrote 0,1. Row 1 kept its 2 tokens.
    np.testing.assert_array_equal(ring.pos_BS, [[4, 5, 2, 3], [0, 1, -1, -1]])
    np.testing.assert_array_equal(ring.k_BKSE[0, 0, :, 0], [4, 5, 2, 3])
    ring = ring.update(k[:, :1] + 100, k[:, :1], jnp.array([[6], [2]]))
    np.testing.assert_array_equal(ring.pos_BS, [[4, 5, 6, 3], [0, 1, 2, -1]])
    assert ring.nbytes == 2 * 4 * (4 + 4 + 4)


@pytest.mark.parametrize("mask,ring", [(masks.Causal(), False), (masks.SlidingWindow(3), True)])
def test_attention_with_cache_chunks_equals_full_sequence(mask, ring):
    layer = _attn(2, mask=mask)
    x = randn(2, 11, 16)
    want, _ = layer(jnp.asarray(x))
    cache = (RingKVCache.create(2, 3, 2, 4) if ring else KVCache.create(2, 16, 2, 4))
    outs, start = [], 0
    for size in (4, 1, 5, 1):  # a prefill chunk longer than the ring, then steps and chunks
        pos = jnp.broadcast_to(jnp.arange(start, start + size), (2, size))
        y, cache = layer(jnp.asarray(x[:, start:start + size]), positions_BT=pos, cache=cache)
        outs.append(y)
        start += size
    chex.assert_trees_all_close(jnp.concatenate(outs, 1), want, rtol=1e-5, atol=1e-5)
    assert cache.size == (3 if ring else 16)


@pytest.mark.parametrize("mask,H,K,softcap,segments", [
    (masks.Causal(), 4, 2, None, False),
    (masks.SlidingWindow(3), 4, 4, 3.0, True),
    (masks.Causal(-3), 2, 1, None, False),  # the first rows see nothing: gradient 0 there
])
def test_attention_gradients_match_reference(mask, H, K, softcap, segments):
    """The FlashAttention-style backward of impl='xla' vs autodiff of the f32 reference."""
    B, T, E = 2, 9, 8
    q, k, v, w = randn(B, T, H, E), randn(B, T, K, E), randn(B, T, K, E), randn(B, T, H, E)
    seg = jnp.asarray(np.array([[0] * 4 + [1] * 5, [0] * 9])) if segments else None

    def loss(impl):
        return lambda q, k, v: jnp.sum(w * kernels.attention(
            q, k, v, mask=mask, segment_ids=seg, softcap=softcap, impl=impl))

    args = tuple(map(jnp.asarray, (q, k, v)))
    got = jax.jit(jax.grad(loss("xla"), argnums=(0, 1, 2)))(*args)
    want = jax.grad(loss("reference"), argnums=(0, 1, 2))(*args)
    chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-5)
    chex.assert_tree_all_finite(got)


def test_split_parts_gradient_is_the_slices_gradient():
    """split_parts (the fused q/k/v and gate/up projections' split, whose backward is one
    concatenation) equals slicing, forward and backward, in float32 and bf16, on any axis;
    unused parts get zero gradient; sizes that do not add up are refused."""
    from glocal.layers.split import split_parts

    for dtype in (jnp.float32, jnp.bfloat16):
        x = jax.random.normal(jax.random.key(3), (2, 5, 2, 4, 8)).astype(dtype)
        for axis, sizes in ((3, (2, 1, 1)), (-2, (1, 3)), (4, (3, 5)), (1, (5,))):
            cut = np.cumsum((0,) + sizes)
            ax = axis % x.ndim
            plain = lambda v: tuple(jax.lax.slice_in_dim(v, a, b, axis=ax) for a, b in zip(cut[:-1], cut[1:]))
            w = [jax.random.normal(jax.random.key(10 + i), p.shape).astype(dtype) for i, p in enumerate(plain(x))]
            loss = lambda parts: sum(jnp.sum(jnp.sin(p) * c) for p, c in zip(parts, w))
            ours = jax.grad(lambda v: loss(split_parts(v, axis, sizes)))(x)
            want = jax.grad(lambda v: loss(plain(v)))(x)
            assert ours.dtype == dtype
            np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(want, np.float32))
            assert all(np.array_equal(a, b) for a, b in zip(split_parts(x, axis, sizes), plain(x)))
        only_first = jax.grad(lambda v: jnp.sum(split_parts(v, 3, (2, 2))[0]))(x)
        np.testing.assert_array_equal(np.asarray(only_first[:, :, :, 2:], np.float32), 0)
        np.testing.assert_array_equal(np.asarray(only_first[:, :, :, :2], np.float32), 1)
    with pytest.raises(ValueError, match="add up to 3"):
        split_parts(x, 3, (2, 1))
