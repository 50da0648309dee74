"""Our Pallas kernels, TPU (Mosaic) and GPU (Triton), forward, dQ and dK/dV, in interpret
mode against the f32 reference; plus the TPU-semantics interpreter (out-of-bounds block
indices, races, uninitialised scratch) on a tiny case. Tolerances as in test_blockwise.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glocal.kernels import attention, masks as M
from glocal.kernels.pallas_tpu import attention_pallas_tpu
from tests.test_blockwise import CASES, F32_GRAD_TOL, F32_TOL, inputs, run

KERNEL_CASES = [0, 1, 4, 5, 7, 8]  # causal, window, block-causal (GQA 4:1), chunk|global, T != S, cross


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
@pytest.mark.parametrize("case", KERNEL_CASES)
@pytest.mark.parametrize("extra", ["plain", "softcap+segments"])
def test_pallas_matches_reference(impl, case, extra):
    mask, T, S, H, K, E, blocks = CASES[case]
    q, k, v = inputs(T, S, H, K, E, seed=case)
    kw = {}
    if extra != "plain":
        r = np.random.default_rng(case)
        kw = {"softcap": 4.0, "segment_ids": (jnp.asarray(np.sort(r.integers(0, 3, (2, T)), 1)),
                                              jnp.asarray(np.sort(r.integers(0, 3, (2, S)), 1)))}
    o1, l1, g1 = run(impl, q, k, v, mask, blocks, **kw)
    o2, l2, g2 = run("reference", q, k, v, mask, blocks, **kw)
    np.testing.assert_allclose(o1, o2, atol=F32_TOL)
    fin = np.isfinite(np.asarray(l2))
    np.testing.assert_array_equal(np.isfinite(np.asarray(l1)), fin)
    np.testing.assert_allclose(np.where(fin, l1, 0), np.where(fin, l2, 0), atol=F32_TOL)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, atol=F32_GRAD_TOL)


def test_pallas_tpu_under_the_tpu_semantics_interpreter():
    from jax.experimental.pallas import tpu as pltpu

    mask = M.SlidingWindow(10) | (M.GlobalTokens(2) & M.Causal())
    q, k, v = inputs(32, 32, 2, 1, 16, B=1)
    params = pltpu.InterpretParams()
    try:
        f = lambda q, k, v: attention_pallas_tpu(q, k, v, mask=mask, block_sizes=(8, 8), interpret=params)
        out = f(q, k, v)
        grads = jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2))(q, k, v)
    finally:
        if hasattr(pltpu, "reset_tpu_interpret_mode_state"):
            pltpu.reset_tpu_interpret_mode_state()
    ref = attention(q, k, v, mask=mask, impl="reference")
    ref_grads = jax.grad(lambda *a: jnp.sum(jnp.sin(attention(*a, mask=mask, impl="reference"))),
                         argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(out, ref, atol=F32_TOL)
    for a, b in zip(grads, ref_grads):
        np.testing.assert_allclose(a, b, atol=F32_GRAD_TOL)


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_explicit_masks_are_refused_with_a_pointer(impl):
    q, k, v = inputs(16, 16, 2, 1, 16)
    with pytest.raises(ValueError, match="impl='blockwise'"):
        attention(q, k, v, mask=M.Explicit(np.eye(16, dtype=bool)), impl=impl)


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_pallas_bfloat16(impl):
    mask, T, S, H, K, E, blocks = CASES[1]
    q, k, v = inputs(T, S, H, K, E, dtype=jnp.bfloat16, seed=3)
    o1, _, g1 = run(impl, q, k, v, mask, blocks)
    o2, _, g2 = run("reference", q, k, v, mask, blocks)
    rms = lambda a, b: float(jnp.sqrt(jnp.mean((a.astype(jnp.float32) - b.astype(jnp.float32)) ** 2))
                             / jnp.sqrt(jnp.mean(b.astype(jnp.float32) ** 2)))
    assert o1.dtype == jnp.bfloat16 and rms(o1, o2) < 1e-2
    assert all(rms(a, b) < 1e-2 for a, b in zip(g1, g2))


@pytest.mark.parametrize("name", ["causal", "local"])
def test_agrees_with_jax_splash_attention(name):
    """JAX's splash attention (interpret mode) as a second oracle on the masks it has."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    T, H, E = 256, 2, 64
    q, k, v = inputs(T, T, H, H, E, B=1)
    ours_mask = M.Causal() if name == "causal" else M.SlidingWindow(64)
    head = sa.CausalMask((T, T)) if name == "causal" else sa.LocalMask((T, T), window_size=(63, 0), offset=0)
    kernel = sa.make_splash_mha_single_device(sa.MultiHeadMask([head] * H), interpret=True)
    to_hte = lambda x: jnp.swapaxes(x[0], 0, 1)  # [1, T, H, E] -> [H, T, E]
    theirs = kernel(to_hte(q) * E**-0.5, to_hte(k), to_hte(v))
    for impl in ("blockwise", "pallas_tpu"):
        ours = attention(q, k, v, mask=ours_mask, impl=impl)
        np.testing.assert_allclose(to_hte(ours), theirs, atol=2e-5)
