"""StreamingLLM: window-plus-sinks layers, their sink + ring cache, RoPE re-positioned by cache
slot, and generation past ``max_seq_len`` in constant memory (glocal/layers/streaming.py).

The re-positioned attention is checked against a literal float64 NumPy re-implementation of
the reference algorithm: a cache of *un-rotated* keys in arrival order, every key rotated at its
index in the cache and the query at the cache's length, the cache cut back to the sinks plus the
recent tokens after each step."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import glocal
import glocal.models as gm
from glocal.configs.base import ConfigError
from glocal.kernels.masks import Sinks, SlidingWindow
from glocal.layers import Attention, SinkRingKVCache
from tests.lm_checks import greedy_by_full_forwards


def _rope_np(x, pos, theta):
    E = x.shape[-1]
    angle = np.asarray(pos, np.float64)[..., None] * theta ** (-np.arange(0, E, 2) / E)
    c, s = np.cos(angle), np.sin(angle)
    x1, x2 = x[..., : E // 2], x[..., E // 2:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def _streaming_llm_np(q_THE, k_TKE, v_TKE, num_sinks, recent, theta):
    """The reference algorithm, token by token, in float64: ``[T, H, E]`` outputs."""
    T, H, E = q_THE.shape
    Y = H // k_TKE.shape[1]
    cache, out = [], []
    for t in range(T):
        q_pos = len(cache)  # the query's position: the number of tokens cached before it
        cache.append(t)
        idx = np.asarray(cache)
        k = _rope_np(k_TKE[idx], np.arange(len(idx))[:, None], theta)  # [S, K, E] at cache index
        q = _rope_np(q_THE[t], q_pos, theta)  # [H, E]
        o = np.zeros((H, E))
        for h in range(H):
            s = k[:, h // Y] @ q[h] / np.sqrt(E)
            p = np.exp(s - s.max())
            o[h] = (p / p.sum()) @ v_TKE[idx, h // Y]
        out.append(o)
        if len(cache) > num_sinks + recent:  # evict: keep the sinks and the most recent tokens
            cache = cache[:num_sinks] + cache[len(cache) - recent:]
    return np.stack(out)


@pytest.mark.parametrize("window", [8, 9])
def test_cache_positions_equal_the_literal_streaming_algorithm_and_decoding(window):
    S, T, theta = 4, 64, 10_000.0
    attn = Attention(16, 4, 2, 8, mask=SlidingWindow(window) | Sinks(S), rope_theta=theta, rope_positions="cache",
                     rngs=nnx.Rngs(0))
    x_BTD = jax.random.normal(jax.random.key(1), (1, T, 16))
    y_BTD, _ = attn(x_BTD)
    q, k, v = (np.asarray(a[0], np.float64) for a in attn.project_qkv(x_BTD, None))  # un-rotated
    # glocal's window counts the query: the reference's "recent" tokens are the window - 1 before it.
    o_THE = _streaming_llm_np(q, k, v, S, window - 1, theta)
    want = attn.project_out(jnp.asarray(o_THE[None], jnp.float32))
    np.testing.assert_allclose(y_BTD, want, atol=2e-5, rtol=2e-5)
    # Prefill longer than sinks + window (20 > 4 + 9), then token by token, through the sink ring.
    cache = SinkRingKVCache.create(1, S + window, 2, 8, num_sinks=S)
    pos = jnp.arange(T, dtype=jnp.int32)[None]
    outs = []
    y, cache = attn(x_BTD[:, :20], positions_BT=pos[:, :20], cache=cache)
    outs.append(y)
    for t in range(20, T):
        y, cache = attn(x_BTD[:, t:t + 1], positions_BT=pos[:, t:t + 1], cache=cache)
        outs.append(y)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), y_BTD, atol=2e-5, rtol=2e-5)
    assert cache.k_BKSE.shape[2] == S + window
    # Absolute positions give a different model once the sinks are farther than the window.
    absolute = Attention(16, 4, 2, 8, mask=SlidingWindow(window) | Sinks(S), rope_theta=theta, rngs=nnx.Rngs(0))
    y_abs, _ = absolute(x_BTD)
    np.testing.assert_allclose(y_abs[:, :S + window], y_BTD[:, :S + window], atol=1e-6)
    assert float(jnp.max(jnp.abs(y_abs[:, S + window:] - y_BTD[:, S + window:]))) > 1e-3


@pytest.mark.parametrize("chunks", [(1,) * 30, (5, 1, 13, 1, 1, 9), (30,)])
def test_sink_ring_cache_keeps_exactly_the_sinks_and_the_window(chunks):
    n, ring = 3, 5
    cache = SinkRingKVCache.create(1, n + ring, 1, 2, num_sinks=n)
    start = 0
    for c in chunks:
        pos_BT = jnp.arange(start, start + c, dtype=jnp.int32)[None]
        kv_BTKE = jnp.broadcast_to(pos_BT[:, :, None, None].astype(jnp.float32), (1, c, 1, 2))
        cache = cache.update(kv_BTKE, kv_BTKE, pos_BT)
        padding = jnp.full_like(pos_BT, 99)  # right padding of a ragged batch is never written
        cache = cache.update(kv_BTKE + 1, kv_BTKE + 1, padding, jnp.zeros(pos_BT.shape, bool))
        start += c
        newest = start - 1
        slots = np.asarray(cache.pos_BS[0])
        assert sorted(slots[slots >= 0]) == [p for p in range(start) if p < n or p > newest - ring]
        np.testing.assert_array_equal(np.asarray(cache.k_BKSE[0, 0, :, 0])[slots >= 0], slots[slots >= 0])


def _stream_model(pattern="ss", rope_positions="cache", max_seq_len=32, **kw):
    return gm.build("transformer", "tiny", num_layers=len(pattern), layer_pattern=pattern, sliding_window=8,
                    max_seq_len=max_seq_len, **{"window.sinks": 2, "window.rope_positions": rope_positions}, **kw)


@pytest.mark.parametrize("rope_positions", ["absolute", "cache"])
def test_window_with_sinks_generates_past_max_seq_len_like_a_longer_twin(rope_positions):
    model = _stream_model(rope_positions=rope_positions)
    assert model.growing_caches == [] and not model.packed_documents  # sinks: plain windows
    assert model.cache_nbytes(2, 32) == model.cache_nbytes(2, 10**6)  # constant memory
    prompts = [[5, 9, 3], [7, 1, 4, 4, 2, 8]]
    got = glocal.generate(model, prompts, 60)  # 66 tokens > max_seq_len=32
    twin = _stream_model(rope_positions=rope_positions, max_seq_len=128)
    nnx.update(twin, nnx.state(model))
    assert got == greedy_by_full_forwards(twin, prompts, 60, width=72)


def test_a_model_with_a_global_layer_refuses_to_generate_past_max_seq_len():
    model = _stream_model(pattern="sg")
    assert model.growing_caches == ["its 'global' layers"]
    assert len(glocal.generate(model, [[1, 2]], 30)[0]) == 30  # within max_seq_len: fine
    with pytest.raises(glocal.generation.GenerationError, match="'global' layers.*window.sinks"):
        glocal.generate(model, [[1, 2]], 31)


@pytest.mark.parametrize("options,match", [
    ({"window.sinks": -1}, "window.sinks=-1 must be >= 0"),
    ({"window.rope_positions": "slot"}, "window.rope_positions='slot' must be one of"),
    ({"window.rope_positions": "cache"}, "needs window.sinks > 0"),
])
def test_window_sink_options_are_checked(options, match):
    with pytest.raises((ConfigError, ValueError), match=match):
        gm.get_config("transformer", "tiny", layer_pattern="s", num_layers=1, sliding_window=8, **options)


def test_hugging_face_export_refuses_window_sinks():
    from glocal.hf.configs import HFConfigError, export_architecture

    cfg = gm.get_config("transformer", "tiny", layer_pattern="s", num_layers=1, sliding_window=8)
    assert export_architecture(cfg) == "MistralForCausalLM"
    with pytest.raises(HFConfigError, match="window.sinks=2"):
        export_architecture(cfg.replace(**{"window.sinks": 2}))


@pytest.mark.parametrize("n,w,T", [(4, 8, 64), (2, 5, 3), (1, 1, 10), (3, 7, 9)])
def test_visible_keys_of_a_window_with_sinks_count_each_key_once(n, w, T):
    from glocal.layers.mixers import mean_visible_keys

    mask = SlidingWindow(w) | Sinks(n)
    assert mean_visible_keys(mask, T) == pytest.approx(mask.dense(T).sum() / T)
