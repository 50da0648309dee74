"""Learned per-head attention sinks (GPT-OSS): ``glocal.kernels.attention(..., sinks=[H])``.

The sink is one extra key per query head with logit ``sink_h`` (not scaled, capped or masked)
and value 0: ``o = sum_j e^{s_j} v_j / (e^{sink} + sum_j e^{s_j})``, ``lse' = logaddexp(lse,
sink)``, a row that sees no key gives ``o = 0`` and ``lse' = sink``.

* the f32 reference (autodiff of a literal concatenated-column softmax) against float64 NumPy:
  forward, lse', and every gradient (a hand-derived backward; dsinks also by central
  differences);
* every implementation against the reference: output, lse', dq, dk, dv, dsinks, for causal,
  sliding-window, GQA, soft-cap, segment ids with fully masked rows, T != S, the dense path's
  causal key spans, and bf16 inputs; ``dot_product`` / ``tokamax`` refuse;
* ``sinks=None`` keeps the old conventions (lse -inf on empty rows) and a sink of -1e30 is no sink;
* the ``Attention`` layer (cached decode == full forward, parameter drawn last) and a
  ``transformer`` with ``attn_sinks=True`` that trains a step, its sinks outside weight decay.

Tolerances as in test_blockwise.py (float32 1e-5 / grads 5e-5 abs; bf16 relative RMS 1e-2).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import glocal.models as gm
from glocal.kernels import attention, masks as M
from glocal.layers import Attention, KVCache, RingKVCache
from glocal.train import optim
from glocal.train.build import build_setup
from glocal.train.config import TrainConfig
from tests.test_blockwise import BF16_RMS, F32_GRAD_TOL, F32_TOL, inputs

F64_TOL = 2e-5  # the f32 reference against float64 NumPy


def sinks_of(H, seed=0, scale=1.5):
    return jnp.asarray(np.random.default_rng(100 + seed).normal(size=H) * scale, jnp.float32)


def segments(B, T, S, empty_rows: int):
    """``(q_ids, kv_ids)``: two documents, and the first ``empty_rows`` queries of every row in
    a segment no key has (fully masked rows)."""
    q_ids = np.where(np.arange(T) < T // 2, 0, 1)[None].repeat(B, 0)
    q_ids[:, :empty_rows] = 7
    kv_ids = np.where(np.arange(S) < S // 2, 0, 1)[None].repeat(B, 0)
    return jnp.asarray(q_ids, jnp.int32), jnp.asarray(kv_ids, jnp.int32)


# (mask, T, S, H, K, E, blocks, softcap, empty rows via segments)
CASES = {
    "causal_gqa": (M.Causal(), 32, 32, 4, 2, 16, (16, 16), None, 0),
    "window_softcap_segments": (M.SlidingWindow(9), 40, 40, 4, 2, 16, (16, 16), 5.0, 3),
    "cross_T!=S": (M.Causal(offset=12), 20, 32, 2, 1, 16, (16, 16), None, 0),
}


def case_inputs(name, dtype=jnp.float32, B=2):
    mask, T, S, H, K, E, blocks, softcap, empty = CASES[name]
    q, k, v = inputs(T, S, H, K, E, B=B, dtype=dtype, seed=len(name))
    kw = {"softcap": softcap} if softcap else {}
    if empty:
        kw["segment_ids"] = segments(B, T, S, empty)
    return (q, k, v, sinks_of(H, len(name))), mask, blocks, kw


def run(impl, q, k, v, sinks, mask, blocks, **kw):
    """``(out, lse, (dq, dk, dv, dsinks))`` as one jitted program; the gradients come from the
    call without the lse (the path training takes)."""
    def f(q, k, v, s):
        call = lambda q, k, v, s, **more: attention(q, k, v, mask=mask, impl=impl, block_sizes=blocks,
                                                    sinks=s, **kw, **more)
        out, lse = call(q, k, v, s, return_lse=True)
        loss = lambda *a: jnp.sum(jnp.sin(call(*a).astype(jnp.float32)))
        return out, lse, jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, s)
    return jax.jit(f)(q, k, v, sinks)


@functools.cache
def reference_run(name, dtype=jnp.float32):
    """The reference's ``run`` on a case's inputs, once per test session."""
    (q, k, v, s), mask, blocks, kw = case_inputs(name, dtype)
    return run("reference", q, k, v, s, mask, blocks, **kw)


# -- the reference against float64 NumPy -----------------------------------------------------
def numpy_sinks(q, k, v, sinks, allowed, scale, softcap, dout):
    """float64: the sink as an extra logit column; returns out, lse', and dq, dk, dv, dsinks
    from the softmax Jacobian of the concatenated row (the sink column has value 0)."""
    q, k, v, dout = (np.asarray(a, np.float64) for a in (q, k, v, dout))
    sinks = np.asarray(sinks, np.float64)
    B, T, H, E = q.shape
    Y = H // k.shape[2]
    kh, vh = np.repeat(k, Y, axis=2), np.repeat(v, Y, axis=2)  # [B, S, H, E]
    raw = np.einsum("bthe,bshe->bhts", q, kh) * scale
    th = np.tanh(raw / softcap) if softcap else None
    s = softcap * th if softcap else raw
    s = np.where(allowed[:, None], s, -np.inf)
    z = np.concatenate([s, np.broadcast_to(sinks[None, :, None, None], s.shape[:3] + (1,))], -1)
    m = z.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))[..., 0]
    P = np.exp(z - lse[..., None])
    out = np.einsum("bhts,bshe->bthe", P[..., :-1], vh)
    dP = np.einsum("bthe,bshe->bhts", dout, vh)
    dP = np.concatenate([dP, np.zeros(dP.shape[:3] + (1,))], -1)  # the sink's value is 0
    D = np.einsum("bthe,bthe->bht", dout, out)
    dz = P * (dP - D[..., None])
    ds = dz[..., :-1] * ((1 - th**2) if softcap else 1.0) * scale
    dq = np.einsum("bhts,bshe->bthe", ds, kh)
    dk = np.einsum("bhts,bthe->bshe", ds, q).reshape(B, -1, H // Y, Y, E).sum(3)
    dv = np.einsum("bhts,bthe->bshe", P[..., :-1], dout).reshape(B, -1, H // Y, Y, E).sum(3)
    return out, np.moveaxis(lse, 1, 2), (dq, dk, dv, dz[..., -1].sum((0, 2)))


@pytest.mark.parametrize("name", ["window_softcap_segments", "cross_T!=S"])
def test_reference_with_sinks_matches_float64_numpy(name):
    (q, k, v, s), mask, _, kw = case_inputs(name)
    T, S = q.shape[1], k.shape[1]
    allowed = np.asarray(mask(np.arange(T)[:, None], np.arange(S)[None]))[None]
    if "segment_ids" in kw:
        qs, ks = (np.asarray(a) for a in kw["segment_ids"])
        allowed = allowed & (qs[:, :, None] == ks[:, None, :])
    dout = np.random.default_rng(1).normal(size=q.shape)
    ref = lambda *a: attention(*a[:3], mask=mask, impl="reference", sinks=a[3], return_lse=True, **kw)
    (out, lse), vjp = jax.vjp(ref, q, k, v, s)
    grads = vjp((jnp.asarray(dout, jnp.float32), jnp.zeros_like(lse)))
    want_out, want_lse, want_grads = numpy_sinks(q, k, v, s, allowed, q.shape[-1] ** -0.5, kw.get("softcap"), dout)
    np.testing.assert_allclose(out, want_out, atol=F64_TOL)
    np.testing.assert_allclose(lse, want_lse, atol=F64_TOL)
    for got, want in zip(grads, want_grads):
        np.testing.assert_allclose(got, want, atol=F64_TOL)
    # dsinks once more by central differences of <dout, out> in float64
    fwd = lambda s_: np.sum(dout * numpy_sinks(q, k, v, s_, allowed, q.shape[-1] ** -0.5, kw.get("softcap"), dout)[0])
    eps, s64 = 1e-6, np.asarray(s, np.float64)
    fd = [(fwd(s64 + eps * e) - fwd(s64 - eps * e)) / (2 * eps) for e in np.eye(len(s64))]
    np.testing.assert_allclose(want_grads[3], fd, atol=1e-7)
    if "segment_ids" in kw:  # rows that see no key: output 0, lse' = sink
        assert not np.asarray(out[:, :3]).any()
        np.testing.assert_allclose(lse[:, :3], np.broadcast_to(s, lse[:, :3].shape), atol=0)


# -- every implementation against the reference ----------------------------------------------
IMPLS = ["xla", "blockwise", "pallas_tpu", "pallas_gpu"]


def assert_matches_reference(impl, name):
    (q, k, v, s), mask, blocks, kw = case_inputs(name)
    o1, l1, g1 = run(impl, q, k, v, s, mask, blocks, **kw)
    o2, l2, g2 = reference_run(name)
    assert np.isfinite(np.asarray(l1)).all()  # lse' is finite everywhere, empty rows included
    np.testing.assert_allclose(o1, o2, atol=F32_TOL)
    np.testing.assert_allclose(l1, l2, atol=F32_TOL)
    for a, b, what in zip(g1, g2, ("dq", "dk", "dv", "dsinks")):
        np.testing.assert_allclose(a, b, atol=F32_GRAD_TOL, err_msg=f"{impl} {name} {what}")
    return max(float(jnp.max(jnp.abs(a - b))) for a, b in zip((o1, l1, *g1), (o2, l2, *g2)))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ["causal_gqa", "window_softcap_segments"])
def test_every_impl_matches_the_reference(impl, name):
    assert_matches_reference(impl, name)


@pytest.mark.parametrize("impl", ["xla", "blockwise"])
def test_queries_that_are_the_last_of_the_keys(impl):
    assert_matches_reference(impl, "cross_T!=S")


@pytest.mark.parametrize("mask", [M.Causal(), M.SlidingWindow(40)], ids=repr)
def test_dense_causal_key_spans(mask):
    """T = S = 128: impl='xla' attends per chunk of 64 queries over only their key span."""
    q, k, v = inputs(128, 128, 4, 2, 16, B=1, seed=5)
    s = sinks_of(4, 5)
    o1, l1, g1 = run("xla", q, k, v, s, mask, None)
    o2, l2, g2 = run("reference", q, k, v, s, mask, None)
    for a, b in zip((o1, l1, *g1), (o2, l2, *g2)):
        np.testing.assert_allclose(a, b, atol=F32_GRAD_TOL)


def test_dense_causal_key_spans_bfloat16_gradients():
    """bf16 at T = 512 (8 chunks of 64 queries, their key/value gradients summed in float32):
    dq, dk and dv stay as close to float32 attention as a single dense bf16 pass's."""
    q, k, v = inputs(512, 512, 2, 1, 16, B=1, seed=6, dtype=jnp.bfloat16)

    def grads(impl, dtype):
        def loss(q, k, v):
            return jnp.sum(jnp.sin(attention(q, k, v, mask=M.Causal(), impl=impl).astype(jnp.float32)))
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*(a.astype(dtype) for a in (q, k, v)))

    exact = grads("reference", jnp.float32)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    rms = lambda a, b: float(jnp.sqrt(jnp.mean((f32(a) - f32(b)) ** 2)) / jnp.sqrt(jnp.mean(f32(b) ** 2)))
    chunked, single = grads("xla", jnp.bfloat16), grads("reference", jnp.bfloat16)
    assert all(g.dtype == jnp.bfloat16 for g in chunked)
    for name, c, o, e in zip("qkv", chunked, single, exact):
        assert rms(c, e) < max(1.5 * rms(o, e), 4e-3), (name, rms(c, e), rms(o, e))


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_inputs(impl):
    (q, k, v, s), mask, blocks, kw = case_inputs("window_softcap_segments", dtype=jnp.bfloat16)
    o1, l1, g1 = run(impl, q, k, v, s, mask, blocks, **kw)
    o2, l2, g2 = reference_run("window_softcap_segments", jnp.bfloat16)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    rms = lambda a, b: float(jnp.sqrt(jnp.mean((f32(a) - f32(b)) ** 2)) / jnp.sqrt(jnp.mean(f32(b) ** 2)))
    assert o1.dtype == jnp.bfloat16 and rms(o1, o2) < BF16_RMS
    np.testing.assert_allclose(l1, l2, atol=2e-2)
    assert g1[3].dtype == jnp.float32
    assert all(rms(a, b) < BF16_RMS for a, b in zip(g1, g2)), [rms(a, b) for a, b in zip(g1, g2)]


@pytest.mark.parametrize("impl", ["dot_product", "tokamax"])
def test_kernels_without_sinks_refuse_with_a_pointer(impl):
    q, k, v = inputs(16, 16, 2, 1, 16)
    with pytest.raises(ValueError, match="impl='xla' or 'blockwise'"):
        attention(q, k, v, mask=M.Causal(), impl=impl, sinks=sinks_of(2))


def test_sinks_must_be_one_per_query_head():
    q, k, v = inputs(16, 16, 4, 2, 16)
    with pytest.raises(ValueError, match="one logit per query head"):
        attention(q, k, v, mask=M.Causal(), impl="xla", sinks=sinks_of(2))


@pytest.mark.parametrize("impl", ["xla", "blockwise"])
def test_no_sinks_keeps_the_old_conventions_and_a_very_negative_sink_is_none(impl):
    (q, k, v, _), mask, blocks, kw = case_inputs("window_softcap_segments")
    o, lse, (dq, dk, dv, none) = run(impl, q, k, v, None, mask, blocks, **kw)
    o0, l0, g0 = run(impl, q, k, v, jnp.full((4,), -1e30), mask, blocks, **kw)
    assert none is None and np.isneginf(np.asarray(lse[:, :3])).all()  # empty rows: lse -inf without sinks
    np.testing.assert_allclose(o0, o, atol=1e-6)
    np.testing.assert_allclose(np.asarray(l0)[:, 3:], np.asarray(lse)[:, 3:], atol=1e-6)
    for a, b in zip(g0[:3], (dq, dk, dv)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert not np.asarray(g0[3]).any()


# -- the layer and a model -------------------------------------------------------------------
def _layer(sinks, mask=M.Causal(), seed=0):
    return Attention(16, 4, 2, mask=mask, sinks=sinks, rngs=nnx.Rngs(seed))


def test_layer_sinks_parameter_is_drawn_last_and_typed():
    flat = lambda m: {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}
    plain, with_sinks = flat(_layer(False)), flat(_layer(True))
    assert set(with_sinks) - set(plain) == {"sinks_H"}
    for key, var in plain.items():  # the other parameters do not move
        np.testing.assert_array_equal(var[...], with_sinks[key][...], err_msg=key)
    sinks = with_sinks["sinks_H"]
    assert sinks.shape == (4,) and sinks[...].dtype == jnp.float32 and 0 < float(jnp.std(sinks[...])) < 0.1
    assert tuple(sinks.get_metadata()["out_sharding"]) == ("heads",)
    assert optim.param_kind(sinks) == "bias"  # no weight decay under the default no_decay


@pytest.mark.parametrize("mask,ring", [(M.Causal(), False), (M.SlidingWindow(3), True)], ids=["causal", "window"])
def test_layer_cached_decode_equals_the_full_forward(mask, ring):
    layer = _layer(True, mask)
    layer.sinks_H[...] = sinks_of(4, 3)  # large enough to matter
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 11, 16)), jnp.float32)
    call = nnx.jit(lambda layer, x, **kw: layer(x, **kw))
    want, _ = call(layer, x)
    without, _ = call(_layer(False, mask), x)
    assert float(jnp.max(jnp.abs(want - without))) > 1e-2  # the sinks change the output
    cache = RingKVCache.create(2, 3, 2, 4) if ring else KVCache.create(2, 16, 2, 4)
    outs, start = [], 0
    for size in (4, 1, 5, 1):  # prefill, a step, a chunk, a step
        pos = jnp.broadcast_to(jnp.arange(start, start + size), (2, size))
        y, cache = call(layer, x[:, start:start + size], positions_BT=pos, cache=cache)
        outs.append(y)
        start += size
    np.testing.assert_allclose(jnp.concatenate(outs, 1), want, rtol=1e-5, atol=1e-5)


def test_model_with_attn_sinks_trains_a_step():
    mcfg = gm.get_config("transformer", "tiny", d_model="32", num_heads="2", num_kv_heads="1", num_layers="1",
                         d_ff="32", vocab_size="64", attn_sinks="true")
    assert mcfg.attn_sinks is True
    setup = build_setup(mcfg, TrainConfig().replace(batch_size=2, seq_len=16, learning_rate=1e-2, warmup_steps=0),
                        devices=jax.devices()[:1])
    params = setup.init_params()
    opt = setup.init_opt(params)
    sinks_of_tree = lambda p: [v for path, v in jax.tree_util.tree_leaves_with_path(p) if "sinks_H" in str(path)]
    (before,) = map(np.asarray, sinks_of_tree(params))  # (the step donates its inputs)
    assert before.shape == (1, 2)  # [layers, heads], scanned
    tokens = np.random.default_rng(0).integers(0, 64, (1, 2, 17))
    batch = {"inputs": jnp.asarray(tokens[..., :-1], jnp.int32), "targets": jnp.asarray(tokens[..., 1:], jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (1, 2, 16)),
             "segment_ids": jnp.zeros((1, 2, 16), jnp.int32), "loss_mask": jnp.ones((1, 2, 16), jnp.float32)}
    with jax.set_mesh(setup.mesh):
        params, opt, metrics = setup.train_step(params, opt, batch)
    assert np.isfinite(float(metrics["loss"]))
    (after,) = sinks_of_tree(params)
    assert float(jnp.max(jnp.abs(after - before))) > 1e-4  # the sinks were trained
