"""Linear attention (glocal.kernels.linear) against a float64 NumPy loop of its definition:

    o_t = (phi(q_t) S0 + sum_{s<=t} w(q_t, k_s) v_s) / (phi(q_t) . z0 + sum_{s<=t} w(q_t, k_s) + eps)

forward and gradients (q, k, v and the initial state, by float64 finite differences), for the
quadratic, chunked and both Pallas forms (TPU and GPU kernels in interpret mode; the TPU one
also under the TPU-semantics interpreter, tests/test_lowering.py lowers both for hardware), with T a
multiple and not a multiple of the chunk, GQA, bf16 inputs, the recurrent step, the state
handed from one call to the next, and the symmetric Taylor features."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glocal.kernels import linear_attention, linear_attention_step
from glocal.kernels.linear import feature_dim, features, full_taylor_features

RNG = np.random.default_rng(11)
EPS = 1e-6


def phi_np(x, fmap):
    """float64 features (the full, uncompressed Taylor expansion: independent of the code's)."""
    if fmap == "elu":
        return np.where(x > 0, x + 1.0, np.exp(x))
    if fmap == "relu":
        return np.maximum(x, 0.0)
    F = x.shape[-1]
    outer = (x[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], F * F)
    return np.concatenate([np.ones_like(x[..., :1]), x / F**0.25, outer / np.sqrt(2 * F)], -1)


def loop_np(q, k, v, fmap, S0=None, z0=None):
    """The definition, token by token, in float64. q [B,T,H,F], k [B,T,K,F], v [B,T,K,E];
    S0 [B,K,D,E] / z0 [B,K,D] in the *full* feature basis (None = zeros)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    B, T, H, F = q.shape
    K, E = v.shape[2:]
    G = H // K
    out = np.zeros((B, T, H, E))
    for b in range(B):
        for h in range(H):
            kh = h // G
            pq = phi_np(q[b, :, h], fmap)
            pk = phi_np(k[b, :, kh], fmap)
            S = np.zeros((pq.shape[-1], E)) if S0 is None else S0[b, kh].copy()
            z = np.zeros(pq.shape[-1]) if z0 is None else z0[b, kh].copy()
            for t in range(T):
                S += np.outer(pk[t], v[b, t, kh])
                z += pk[t]
                out[b, t, h] = pq[t] @ S / (pq[t] @ z + EPS)
    return out


def rand(*shape, scale=1.0):
    return (scale * RNG.normal(size=shape)).astype(np.float32)


def to_full(S, z, F):
    """A state in the code's symmetric Taylor basis -> the full basis (for the loop)."""
    i, j = np.triu_indices(F)
    D_full = 1 + F + F * F
    idx_sym = np.arange(1 + F + len(i))
    Sf = np.zeros(S.shape[:2] + (D_full,) + S.shape[3:])
    zf = np.zeros(z.shape[:2] + (D_full,))
    Sf[:, :, : 1 + F], zf[:, :, : 1 + F] = S[:, :, : 1 + F], z[:, :, : 1 + F]
    for n, (a, c) in enumerate(zip(i, j)):
        # sym feature n = x_a x_c * s / sqrt(2F) with s = 1 (a == c) or sqrt 2; the full basis has
        # x_a x_c / sqrt(2F) at (a, c) and (c, a): spread the state so inner products agree.
        w = 1.0 if a == c else np.sqrt(2.0) / 2
        for (r, col) in {(a, c), (c, a)}:
            Sf[:, :, 1 + F + r * F + col] = S[:, :, 1 + F + n] * w
            zf[:, :, 1 + F + r * F + col] = z[:, :, 1 + F + n] * w
    del idx_sym
    return Sf, zf


@pytest.mark.parametrize("fmap", ["taylor", "elu", "relu"])
@pytest.mark.parametrize("impl,T,chunk", [("quadratic", 13, 4), ("chunked", 16, 4), ("chunked", 13, 4),
                                          ("chunked", 5, 8), ("pallas_tpu", 16, 4), ("pallas_tpu", 13, 4),
                                          ("pallas_gpu", 37, 16)])
def test_forward_matches_the_float64_loop(fmap, impl, T, chunk):
    q, k, v = rand(2, T, 4, 6, scale=0.7), rand(2, T, 2, 6, scale=0.7), rand(2, T, 2, 5)  # GQA 4:2
    got = linear_attention(q, k, v, feature_map=fmap, impl=impl, chunk_size=chunk)
    np.testing.assert_allclose(got, loop_np(q, k, v, fmap), rtol=2e-4, atol=2e-5)


def test_initial_state_and_final_state_chain_like_one_call():
    F = 6
    q, k, v = rand(1, 20, 2, F, scale=0.7), rand(1, 20, 1, F, scale=0.7), rand(1, 20, 1, 3)
    whole, final = linear_attention(q, k, v, impl="chunked", chunk_size=4, return_state=True)
    first, mid = linear_attention(q[:, :9], k[:, :9], v[:, :9], impl="chunked", chunk_size=4, return_state=True)
    second, end = linear_attention(q[:, 9:], k[:, 9:], v[:, 9:], impl="quadratic", initial_state=mid,
                                   return_state=True)
    np.testing.assert_allclose(np.concatenate([first, second], 1), whole, rtol=1e-5, atol=1e-6)
    for a, b in zip(end, final):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
    # The loop with the state of the first 9 tokens, in the full feature basis.
    Sf, zf = to_full(np.asarray(mid[0], np.float64), np.asarray(mid[1], np.float64), F)
    np.testing.assert_allclose(second, loop_np(q[:, 9:], k[:, 9:], v[:, 9:], "taylor", Sf, zf), rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("fmap", ["taylor", "elu"])
def test_recurrent_steps_equal_the_chunked_form_and_its_final_state(fmap):
    q, k, v = rand(2, 11, 4, 4, scale=0.7), rand(2, 11, 2, 4, scale=0.7), rand(2, 11, 2, 3)
    want, final = linear_attention(q, k, v, feature_map=fmap, impl="chunked", chunk_size=4, return_state=True)
    state = (jnp.zeros_like(final[0]), jnp.zeros_like(final[1]))
    step = jax.jit(lambda q, k, v, s: linear_attention_step(q, k, v, s, feature_map=fmap))
    outs = []
    for t in range(11):
        o, state = step(q[:, t], k[:, t], v[:, t], state)
        outs.append(o)
    np.testing.assert_allclose(np.stack(outs, 1), want, rtol=1e-5, atol=1e-6)
    for a, b in zip(state, final):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert state[0].shape[2] == feature_dim(fmap, 4)


def test_symmetric_taylor_features_equal_the_full_expansion():
    x, y = rand(7, 16), rand(7, 16)
    sym = np.einsum("nd,nd->n", features(x, "taylor"), features(y, "taylor"))
    full = np.einsum("nd,nd->n", full_taylor_features(x), full_taylor_features(y))
    s = np.einsum("nf,nf->n", x.astype(np.float64), y) / 4.0
    np.testing.assert_allclose(sym, full, rtol=1e-5)
    np.testing.assert_allclose(sym, 1 + s + s * s / 2, rtol=1e-5)
    assert features(x, "taylor").shape[-1] == feature_dim("taylor", 16) == 153


@pytest.mark.parametrize("impl,T,chunk", [("chunked", 12, 4), ("chunked", 10, 4), ("quadratic", 10, 4),
                                          ("pallas_tpu", 10, 4), ("pallas_gpu", 20, 16)])
def test_gradients_match_float64_finite_differences(impl, T, chunk):
    """Directional derivatives of sum(o * g) w.r.t. q, k, v and the initial state, by central
    differences of the float64 loop, against the implementation's gradients."""
    F, E = 4, 3
    q, k, v = rand(1, T, 2, F, scale=0.6), rand(1, T, 1, F, scale=0.6), rand(1, T, 1, E)
    g = rand(1, T, 2, E)
    S0 = np.abs(rand(1, 1, feature_dim("taylor", F), E))  # a state of earlier tokens (z > 0)
    z0 = np.abs(rand(1, 1, feature_dim("taylor", F))) + 1.0

    def loss(q, k, v, S0, z0):
        o = linear_attention(q, k, v, impl=impl, chunk_size=chunk, initial_state=(S0, z0))
        return jnp.sum(o * g)

    grads = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, S0, z0)

    def loss_np(q, k, v, S0, z0):
        Sf, zf = to_full(S0, z0, F)
        return float(np.sum(loop_np(q, k, v, "taylor", Sf, zf) * g))

    args = [np.asarray(a, np.float64) for a in (q, k, v, S0, z0)]
    for i, grad in enumerate(grads):
        d = RNG.normal(size=args[i].shape)
        h = 1e-5
        plus = [a + h * d if j == i else a for j, a in enumerate(args)]
        minus = [a - h * d if j == i else a for j, a in enumerate(args)]
        numeric = (loss_np(*plus) - loss_np(*minus)) / (2 * h)
        np.testing.assert_allclose(float(np.sum(np.asarray(grad, np.float64) * d)), numeric, rtol=2e-3, atol=2e-4,
                                   err_msg=f"argument {i}")


@pytest.mark.parametrize("fmap", ["taylor", "relu"])
@pytest.mark.parametrize("impl", ["chunked", "pallas_tpu", "pallas_gpu"])
def test_gradients_equal_quadratic_gradients_with_gqa(impl, fmap):
    # Own generator: the inputs must not depend on which tests ran before (relu features can
    # leave a query with a near-zero normaliser, where float32 gradients are ill-conditioned).
    rng = np.random.default_rng(37)
    q, k, v = (rng.normal(size=s).astype(np.float32) * c for s, c in
               (((2, 37, 4, 4), 0.6), ((2, 37, 2, 4), 0.6), ((2, 37, 2, 5), 1.0)))
    grad = lambda impl: jax.grad(lambda q, k, v: jnp.sum(jnp.sin(linear_attention(
        q, k, v, impl=impl, feature_map=fmap, chunk_size=16))), argnums=(0, 1, 2))(q, k, v)
    # atol 4e-5: one relu element (dq[0, 7, 3, 0]) sits on a near-zero normaliser, where the
    # float32 quadratic reference itself is off the float64 value by 2.3e-5 on jax 0.12.1
    # (8e-6 on 0.10.2); the chunked and Pallas forms are closer to float64 than it is there.
    for a, b in zip(grad(impl), grad("quadratic")):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=4e-5)


@pytest.mark.parametrize("fmap", ["taylor", "elu"])
@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_pallas_kernels_carry_the_state_like_the_chunked_form(impl, fmap):
    """Both directions of the state: an initial state in, the final state out (and the
    gradient of a loss on the final state reaching q, k, v and the initial state)."""
    F, E = 6, 5  # F and E not powers of two: the GPU path pads them
    q, k, v = rand(2, 40, 4, F, scale=0.6), rand(2, 40, 2, F, scale=0.6), rand(2, 40, 2, E)
    _, start = linear_attention(q[:, :7], k[:, :7], v[:, :7], feature_map=fmap, impl="quadratic", return_state=True)
    cS, cz = rand(*start[0].shape), rand(*start[1].shape)

    def run(impl, q, k, v, S0, z0):
        o, (S, z) = linear_attention(q, k, v, feature_map=fmap, impl=impl, chunk_size=16, initial_state=(S0, z0),
                                     return_state=True)
        return jnp.sum(jnp.sin(o)) + jnp.sum(S * cS) + jnp.sum(z * cz), (o, S, z)

    args = (q[:, 7:], k[:, 7:], v[:, 7:], *start)
    (_, want), gwant = jax.value_and_grad(functools.partial(run, "chunked"), argnums=(0, 1, 2, 3, 4),
                                          has_aux=True)(*args)
    (_, got), ggot = jax.value_and_grad(functools.partial(run, impl), argnums=(0, 1, 2, 3, 4), has_aux=True)(*args)
    for a, b in zip(got + ggot, want + gwant):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_pallas_tpu_under_the_tpu_semantics_interpreter(capfd):
    """The TPU interpreter simulates VMEM scratch and DMAs, raises on out-of-bounds reads and on
    output blocks revisited out of order (the running state and the final-state block), and
    here also looks for races (it prints RACE DETECTED)."""
    from jax.experimental.pallas import tpu as pltpu

    q, k, v = rand(1, 40, 2, 4, scale=0.6), rand(1, 40, 1, 4, scale=0.6), rand(1, 40, 1, 8)
    loss = lambda impl: lambda q, k, v: jnp.sum(jnp.sin(linear_attention(q, k, v, impl=impl, chunk_size=16)))
    try:
        with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams(detect_races=True)):
            got = jax.value_and_grad(loss("pallas_tpu"), argnums=(0, 1, 2))(q, k, v)
    finally:
        pltpu.reset_tpu_interpret_mode_state()
    assert "RACE DETECTED" not in capfd.readouterr().out
    want = jax.value_and_grad(loss("quadratic"), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", ["chunked", "pallas_tpu", "pallas_gpu"])
def test_bfloat16_inputs_keep_a_float32_state(impl):
    q, k, v = rand(1, 40, 2, 8, scale=0.5), rand(1, 40, 2, 8, scale=0.5), rand(1, 40, 2, 8)
    bf = lambda a: jnp.asarray(a, jnp.bfloat16)
    o, (S, z) = linear_attention(bf(q), bf(k), bf(v), impl=impl, chunk_size=16, return_state=True)
    assert o.dtype == jnp.bfloat16 and S.dtype == jnp.float32 and z.dtype == jnp.float32
    ref = loop_np(np.asarray(bf(q), np.float64), np.asarray(bf(k), np.float64), np.asarray(bf(v), np.float64), "taylor")
    assert np.abs(np.asarray(o, np.float64) - ref).max() < 0.02 * np.abs(ref).max()


def test_bad_arguments_are_explained():
    q, k, v = rand(1, 4, 3, 2), rand(1, 4, 2, 2), rand(1, 4, 2, 2)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        linear_attention(q, k, v)
    with pytest.raises(ValueError, match="unknown feature_map"):
        linear_attention(q[:, :, :2], k, v, feature_map="softmax")
    with pytest.raises(ValueError, match="unknown linear attention impl"):
        linear_attention(q[:, :, :2], k, v, impl="fast")
    with pytest.raises(ValueError, match="power of two >= 16"):
        linear_attention(q[:, :, :2], k, v, impl="pallas_gpu", chunk_size=24)
