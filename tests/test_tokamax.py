"""``impl="tokamax"`` (the optional tokamax extra, Python >= 3.12 stack) against our float32
reference: attention for every mask kind we route to it (natively: causal, sliding window;
as a boolean mask: the rest, segment ids and cached-decoding positions), forward and
gradients; the grouped matmul against the tiled form, including rows past the groups. On CPU
tokamax runs its XLA implementations; tests/test_lowering.py lowers its kernels for TPU/GPU.
Without tokamax (the Python 3.11 stack) only the error message is checked."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glocal import kernels
from glocal.compat import has_tokamax
from glocal.kernels import masks
from glocal.kernels.gmm import grouped_matmul

needs_tokamax = pytest.mark.skipif(not has_tokamax(), reason="tokamax is not installed (Python >= 3.12 stack)")
RNG = np.random.default_rng(5)
r = lambda *s: jnp.asarray(RNG.normal(size=s), jnp.float32)


@pytest.mark.skipif(has_tokamax(), reason="tokamax is installed")
def test_without_tokamax_the_error_says_how_to_get_it():
    with pytest.raises(ImportError, match=r"glocal\[tokamax\]"):
        kernels.attention(r(1, 8, 2, 8), r(1, 8, 2, 8), r(1, 8, 2, 8), mask=masks.Causal(), impl="tokamax")


@needs_tokamax
@pytest.mark.parametrize("mask", [masks.Causal(), masks.SlidingWindow(9), masks.BlockCausal(16), masks.Full(),
                                  masks.GlobalTokens(4) | masks.SlidingWindow(8), masks.PrefixLM(20)], ids=repr)
@pytest.mark.parametrize("segments", [False, True])
def test_tokamax_attention_equals_the_reference(mask, segments):
    q, k, v = r(2, 64, 4, 16), r(2, 64, 2, 16), r(2, 64, 2, 16)
    seg = jnp.asarray(np.repeat([[0] * 20 + [1] * 44], 2, 0)) if segments else None

    def run(impl):
        loss = lambda q, k, v: jnp.sum(jnp.sin(kernels.attention(q, k, v, mask=mask, impl=impl, segment_ids=seg,
                                                                 softcap=5.0)))
        return kernels.attention(q, k, v, mask=mask, impl=impl, segment_ids=seg), jax.grad(loss, (0, 1, 2))(q, k, v)
    for a, b in zip(jax.tree.leaves(run("tokamax")), jax.tree.leaves(run("reference"))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)


@needs_tokamax
def test_tokamax_attention_with_cache_positions_and_empty_rows():
    """Decoding: positions, empty cache slots (negative positions) and a query that sees no
    key at all (our convention: 0)."""
    q, k, v = r(2, 3, 4, 16), r(2, 10, 2, 16), r(2, 10, 2, 16)
    q_pos = jnp.asarray([[5, 6, 7], [0, 1, 2]], jnp.int32)
    kv_pos = jnp.asarray([list(range(8)) + [-1, -1], [-1] * 10], jnp.int32)
    got, ref = (kernels.attention(q, k, v, mask=masks.Causal(), q_positions=q_pos, kv_positions=kv_pos, impl=i)
                for i in ("tokamax", "reference"))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    assert float(jnp.abs(got[1]).max()) == 0.0


@needs_tokamax
def test_tokamax_attention_refuses_lse():
    with pytest.raises(ValueError, match="log-sum-exp"):
        kernels.attention(r(1, 8, 2, 8), r(1, 8, 2, 8), r(1, 8, 2, 8), mask=masks.Causal(), impl="tokamax",
                          return_lse=True)


@needs_tokamax
@pytest.mark.parametrize("sizes", [[10, 20, 0, 34], [3, 0, 40, 5]], ids=["all rows", "rows past the groups"])
def test_tokamax_grouped_matmul_equals_the_tiled_form(sizes):
    x, w = r(64, 32), r(4, 32, 48)
    sizes = jnp.asarray(sizes, jnp.int32)

    def run(impl):
        loss = lambda x, w: jnp.sum(jnp.sin(grouped_matmul(x, w, sizes, impl=impl)))
        return grouped_matmul(x, w, sizes, impl=impl), jax.grad(loss, (0, 1))(x, w)
    for a, b in zip(jax.tree.leaves(run("tokamax")), jax.tree.leaves(run("tiled"))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    out = grouped_matmul(x, w, sizes, impl="tokamax")
    assert float(jnp.abs(out[int(sizes.sum()):]).max(initial=0.0)) == 0.0
