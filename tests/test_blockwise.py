"""The pure-JAX block-sparse implementation against the dense float32 reference: outputs,
log-sum-exp and gradients for every mask family, GQA, T != S, segment ids, soft-cap, bf16,
and a skip test proving unscheduled tiles are never read.

Tolerances (one place): float32 out/lse 1e-5 abs, grads 5e-5 abs (inputs ~N(0,1), E<=64);
bfloat16 inputs: relative RMS error < 1e-2 against the reference on the same bf16 inputs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glocal.kernels import attention, masks as M
from glocal.kernels.schedule import build_schedule

F32_TOL, F32_GRAD_TOL, BF16_RMS = 1e-5, 5e-5, 1e-2

rng0 = np.random.default_rng(0)
CASES = [  # (mask, T, S, H, K, E, blocks)
    (M.Causal(), 96, 96, 4, 2, 64, (32, 16)),
    (M.SlidingWindow(20), 100, 100, 2, 1, 32, (16, 16)),
    (M.SlidingWindow(7, causal=False), 64, 64, 2, 2, 16, (16, 8)),
    (M.BlockDiagonal(16), 80, 80, 4, 4, 16, (16, 32)),
    (M.BlockCausal(24), 72, 72, 4, 1, 64, (24, 24)),
    (M.ChunkCausal(16) | M.GlobalTokens(4), 64, 64, 2, 1, 16, (16, 16)),
    (M.PrefixLM(30), 70, 70, 2, 2, 16, (32, 32)),
    (M.Causal(offset=40), 48, 88, 4, 2, 16, (16, 16)),  # T != S: queries are the last 48
    (M.Full(), 40, 72, 2, 1, 16, (16, 32)),  # cross-attention shape
    (M.Explicit(rng0.random((50, 60)) < 0.15), 50, 60, 2, 1, 16, (16, 16)),  # empty rows
    (M.SlidingWindow(33), 64, 64, 2, 1, 128, (32, 32)),  # E = 128
]


def inputs(T, S, H, K, E, B=2, dtype=jnp.float32, seed=0):
    r = np.random.default_rng(seed)
    mk = lambda *s: jnp.asarray(r.normal(size=s), dtype)
    return mk(B, T, H, E), mk(B, S, K, E), mk(B, S, K, E)


def run(impl, q, k, v, mask, blocks, **kw):
    out, lse = attention(q, k, v, mask=mask, impl=impl, return_lse=True, block_sizes=blocks, **kw)
    loss = lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v, mask=mask, impl=impl, block_sizes=blocks,
                                                      **kw).astype(jnp.float32)))
    return out, lse, jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("extra", ["plain", "softcap", "segments"])
def test_blockwise_matches_reference_float32(case, extra):
    mask, T, S, H, K, E, blocks = CASES[case]
    q, k, v = inputs(T, S, H, K, E, seed=case)
    kw = {}
    if extra == "softcap":
        kw["softcap"] = 4.0
    if extra == "segments":
        r = np.random.default_rng(case)
        kw["segment_ids"] = (jnp.asarray(np.sort(r.integers(0, 3, (2, T)), 1)),
                             jnp.asarray(np.sort(r.integers(0, 3, (2, S)), 1)))
    o1, l1, g1 = run("blockwise", q, k, v, mask, blocks, **kw)
    o2, l2, g2 = run("reference", q, k, v, mask, blocks, **kw)
    np.testing.assert_allclose(o1, o2, atol=F32_TOL)
    fin = np.isfinite(np.asarray(l2))
    np.testing.assert_array_equal(np.isfinite(np.asarray(l1)), fin)  # fully masked rows: -inf
    np.testing.assert_allclose(np.where(fin, l1, 0), np.where(fin, l2, 0), atol=F32_TOL)
    assert not np.asarray(o1)[~np.broadcast_to(fin[..., None], o1.shape)].any()  # ... and output 0
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, atol=F32_GRAD_TOL)


@pytest.mark.parametrize("case", [0, 4, 7])
def test_blockwise_bfloat16(case):
    mask, T, S, H, K, E, blocks = CASES[case]
    q, k, v = inputs(T, S, H, K, E, dtype=jnp.bfloat16, seed=case)
    o1, _, g1 = run("blockwise", q, k, v, mask, blocks)
    o2, _, g2 = run("reference", q, k, v, mask, blocks)
    rms = lambda a, b: float(jnp.sqrt(jnp.mean((a.astype(jnp.float32) - b.astype(jnp.float32)) ** 2))
                             / (jnp.sqrt(jnp.mean(b.astype(jnp.float32) ** 2)) + 1e-12))
    assert o1.dtype == jnp.bfloat16 and rms(o1, o2) < BF16_RMS
    for a, b in zip(g1, g2):
        assert rms(a, b) < BF16_RMS


@pytest.mark.parametrize("impl", ["blockwise", "pallas_tpu", "pallas_gpu"])
def test_unscheduled_tiles_are_never_read(impl):
    """Poison every K/V row outside query tile 2's schedule with NaN: its outputs and
    gradients stay finite and equal the reference on clean inputs."""
    mask, T, blocks = M.SlidingWindow(12), 96, (16, 16)
    q, k, v = inputs(T, T, 2, 1, 16)
    sch = build_schedule(mask, T, T, *blocks)
    i = 2
    keep = np.zeros(T, bool)
    for j in sch.kv_index[i, :sch.kv_count[i]]:
        keep[j * 16:(j + 1) * 16] = True
    assert keep.sum() < T
    poison = lambda x: jnp.where(jnp.asarray(keep)[None, :, None, None], x, jnp.nan)
    rows = slice(i * 16, (i + 1) * 16)

    def f(q, k, v):
        return attention(q, poison(k), poison(v), mask=mask, impl=impl, block_sizes=blocks)[:, rows]

    out = f(q, k, v)
    ref = attention(q, k, v, mask=mask, impl="reference")[:, rows]
    np.testing.assert_allclose(out, ref, atol=F32_TOL)
    dq = jax.grad(lambda q: jnp.sum(f(q, k, v)))(q)
    assert np.isfinite(np.asarray(dq[:, rows])).all()
    dq_ref = jax.grad(lambda q: jnp.sum(attention(q, k, v, mask=mask, impl="reference")[:, rows]))(q)
    np.testing.assert_allclose(dq[:, rows], dq_ref[:, rows], atol=F32_GRAD_TOL)


def test_positions_are_rejected_with_a_clear_error():
    q, k, v = inputs(8, 8, 2, 1, 16)
    with pytest.raises(ValueError, match="static block schedule"):
        attention(q, k, v, mask=M.Causal(), impl="blockwise", q_positions=jnp.zeros((1, 8), jnp.int32))


def test_models_select_the_implementation_by_config():
    """A transformer with attention_impl='blockwise' gives the same logits (and gradients)
    as the default path, with and without packed segments."""
    import glocal.models as gm
    from flax import nnx

    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 300, (2, 48)))
    seg = jnp.asarray(np.repeat([[1, 2, 3]], 2, 0).repeat(16, 1))
    for kw in ({}, {"segment_ids_BT": seg}):
        outs = []
        for impl in ("xla", "blockwise"):
            model = gm.build("transformer", "tiny", attention_impl=impl, layer_pattern="gs", sliding_window=12)
            logits, _ = model(tokens, **kw)
            grads = nnx.grad(lambda m: jnp.mean(m(tokens, **kw)[0] ** 2))(model)
            outs.append((logits, jax.tree.leaves(nnx.state(grads, nnx.Param))))
        np.testing.assert_allclose(outs[0][0], outs[1][0], atol=2e-5)
        for a, b in zip(outs[0][1], outs[1][1]):
            np.testing.assert_allclose(a, b, atol=2e-5)


def test_auto_picks_blockwise_on_cpu_only_where_it_measured_faster():
    from glocal.kernels import auto_impl

    cpu = dict(platform="cpu")
    assert auto_impl(M.Causal(), 1024, 1024, **cpu) == "xla"  # short: the dense path is faster
    assert auto_impl(M.SlidingWindow(256), 1024, 1024, **cpu) == "xla"
    assert auto_impl(M.Causal(), 2048, 2048, **cpu) == "blockwise"
    assert auto_impl(M.SlidingWindow(256), 4096, 4096, **cpu) == "blockwise"
    assert auto_impl(M.Full(), 4096, 4096, **cpu) == "xla"  # nothing to skip
    assert auto_impl(M.SlidingWindow(256), 4096, 4096, positions=True, **cpu) == "xla"  # cached calls
    assert auto_impl(M.SlidingWindow(256), 4096, 4096, platform="gpu") == "xla"  # kernels untried on hardware
    # And what auto runs is right: a 2k window with GQA and a soft-cap against the oracle.
    key = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(key[0], (1, 2048, 2, 16))
    k, v = (jax.random.normal(kk, (1, 2048, 1, 16)) for kk in key[1:])
    mask = M.SlidingWindow(200)
    assert auto_impl(mask, 2048, 2048) == "blockwise"  # this machine is a CPU
    got = jax.jit(lambda q, k, v: attention(q, k, v, mask=mask, softcap=20.0))(q, k, v)
    want = attention(q, k, v, mask=mask, softcap=20.0, impl="reference")
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
