"""The gated delta rule (glocal.kernels.delta) against a float64 NumPy loop of its definition:

    S <- exp(g_t) S;  S <- S + k_t (beta_t (v_t - S^T k_t))^T;  o_t = S^T q_t

(q, k L2-normalised, q scaled, value head h reading key head h // Y): the recurrent and chunked
forms with T a multiple and not a multiple of the chunk, GVA, an initial state and the final
state; strong decays; the state handed from one call to the next and to the one-token step;
gradients (chunked custom VJP vs autodiff of the recurrent form, and float64 finite
differences); bf16 inputs; no per-token state or [T, T] array in the chunked gradient."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from glocal.kernels import DELTA_IMPLEMENTATIONS, gated_delta_rule, gated_delta_step

RNG = np.random.default_rng(7)


def loop_np(q, k, v, g, beta, S0=None, l2=True, scale=None):
    """The definition, token by token, in float64. q, k [B,T,K,F]; v [B,T,H,E]; g, beta [B,T,H];
    S0 [B,H,F,E] (None = zeros). Returns (o [B,T,H,E], S [B,H,F,E])."""
    q, k, v, g, beta = (np.asarray(a, np.float64) for a in (q, k, v, g, beta))
    B, T, K, F = q.shape
    H, E = v.shape[2:]
    out, S_all = np.zeros((B, T, H, E)), np.zeros((B, H, F, E))
    for b in range(B):
        for h in range(H):
            qh, kh = q[b, :, h // (H // K)], k[b, :, h // (H // K)]
            if l2:
                qh = qh / np.sqrt((qh * qh).sum(-1, keepdims=True) + 1e-6)
                kh = kh / np.sqrt((kh * kh).sum(-1, keepdims=True) + 1e-6)
            qh = qh * (F ** -0.5 if scale is None else scale)
            S = np.zeros((F, E)) if S0 is None else np.array(S0[b, h], np.float64)
            for t in range(T):
                S = np.exp(g[b, t, h]) * S
                S = S + np.outer(kh[t], beta[b, t, h] * (v[b, t, h] - S.T @ kh[t]))
                out[b, t, h] = S.T @ qh[t]
            S_all[b, h] = S
    return out, S_all


def make(B=2, T=37, K=2, H=4, F=8, E=6, A_max=1.0, dtype=np.float32):
    """Random inputs; g = -A softplus(a) with A up to A_max per head (Qwen3-Next's gate)."""
    q, k = (RNG.normal(size=(B, T, K, F)).astype(dtype) for _ in range(2))
    v = RNG.normal(size=(B, T, H, E)).astype(dtype)
    A_H = np.linspace(0.01, A_max, H)
    g = (-A_H * np.log1p(np.exp(RNG.normal(size=(B, T, H))))).astype(np.float32)
    beta = (1 / (1 + np.exp(-RNG.normal(size=(B, T, H))))).astype(np.float32)
    S0 = (0.3 * RNG.normal(size=(B, H, F, E))).astype(np.float32)
    return q, k, v, g, beta, S0


def rel(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(x - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize("impl,T,N", [("recurrent", 37, 16), ("chunked", 37, 16), ("chunked", 32, 16),
                                      ("chunked", 5, 64), ("auto", 37, 8)])
def test_forward_matches_float64_loop(impl, T, N):
    q, k, v, g, beta, S0 = make(T=T)
    o, S = gated_delta_rule(q, k, v, g, beta, impl=impl, chunk_size=N, initial_state=S0, return_state=True)
    o_ref, S_ref = loop_np(q, k, v, g, beta, S0)
    assert o.shape == v.shape and o.dtype == jnp.float32 and S.dtype == jnp.float32
    assert rel(o, o_ref) < 1e-5 and rel(S, S_ref) < 1e-5


@pytest.mark.parametrize("impl", ["recurrent", "chunked"])
def test_no_l2_custom_scale_zero_state(impl):
    q, k, v, g, beta, _ = make(B=1, T=21, K=1, H=2)
    q, k = 0.3 * q, 0.3 * k  # keep beta |k|^2 < 2 so the un-normalised rule stays stable
    o, S = gated_delta_rule(q, k, v, g, beta, impl=impl, chunk_size=8, l2_qk=False, scale=0.7, return_state=True)
    o_ref, S_ref = loop_np(q, k, v, g, beta, None, l2=False, scale=0.7)
    assert rel(o, o_ref) < 1e-5 and rel(S, S_ref) < 1e-5


def test_chunked_matches_recurrent_under_strong_decay():
    # A up to 16: the cumulative log decay over a 64-token chunk reaches ~ -1e3 (exp(-gam) overflows).
    q, k, v, g, beta, S0 = make(B=1, T=100, K=1, H=2, A_max=16.0)
    g[..., 1] = np.minimum(g[..., 1], -12.0)
    assert g[0, :64, 1].sum() < -700
    kw = dict(initial_state=S0, return_state=True, chunk_size=64)
    o_c, S_c = gated_delta_rule(q, k, v, g, beta, impl="chunked", **kw)
    o_r, S_r = gated_delta_rule(q, k, v, g, beta, impl="recurrent", **kw)
    assert np.isfinite(np.asarray(o_c)).all() and np.isfinite(np.asarray(S_c)).all()
    assert rel(o_c, o_r) < 1e-5 and rel(S_c, S_r) < 1e-5
    grads = jax.grad(lambda g, S0: jnp.sum(gated_delta_rule(q, k, v, g, beta, impl="chunked", chunk_size=64,
                                                            initial_state=S0)), argnums=(0, 1))(g, S0)
    assert all(np.isfinite(np.asarray(x)).all() for x in grads)


def test_state_chaining_and_step_after_prefill():
    q, k, v, g, beta, S0 = make(T=29)
    full, S_full = gated_delta_rule(q, k, v, g, beta, chunk_size=8, initial_state=S0, return_state=True)
    part = lambda a, b: tuple(x[:, a:b] for x in (q, k, v, g, beta))
    o1, S1 = gated_delta_rule(*part(0, 19), chunk_size=8, initial_state=S0, return_state=True)
    o2, S2 = gated_delta_rule(*part(19, 29), chunk_size=8, initial_state=S1, return_state=True)
    assert rel(jnp.concatenate([o1, o2], 1), full) < 1e-5 and rel(S2, S_full) < 1e-5
    # Decode: a chunked prefill of 23 tokens, then the step function token by token.
    o_p, S = gated_delta_rule(*part(0, 23), chunk_size=8, initial_state=S0, return_state=True)
    steps = []
    for t in range(23, 29):
        o_t, S = gated_delta_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], S)
        steps.append(o_t)
    assert S.dtype == jnp.float32 and steps[0].shape == (2, 4, 6)
    assert rel(jnp.concatenate([o_p, jnp.stack(steps, 1)], 1), full) < 1e-5 and rel(S, S_full) < 1e-5


def _loss(impl, w_E, w_FE, N=8):
    def f(q, k, v, g, beta, S0):
        o, S = gated_delta_rule(q, k, v, g, beta, impl=impl, chunk_size=N, initial_state=S0, return_state=True)
        return jnp.sum(o * w_E) + jnp.sum(S * w_FE)
    return f


def test_chunked_gradients_match_recurrent_autodiff():
    args = make(T=27)
    w_E, w_FE = RNG.normal(size=6).astype(np.float32), RNG.normal(size=(8, 6)).astype(np.float32)
    g_c = jax.grad(_loss("chunked", w_E, w_FE), argnums=tuple(range(6)))(*args)
    g_r = jax.grad(_loss("recurrent", w_E, w_FE), argnums=tuple(range(6)))(*args)
    for name, a, b in zip(("q", "k", "v", "g", "beta", "S0"), g_c, g_r):
        assert a.shape == b.shape and rel(a, b) < 1e-4, name


def test_recurrent_gradient_matches_float64_finite_differences():
    args = make(B=1, T=9, K=1, H=2, F=4, E=3)
    w_E, w_FE = RNG.normal(size=3), RNG.normal(size=(4, 3))
    grads = jax.grad(_loss("recurrent", w_E.astype(np.float32), w_FE.astype(np.float32)),
                     argnums=tuple(range(6)))(*args)

    def L(xs):
        o, S = loop_np(*xs)
        return float(np.sum(o * w_E) + np.sum(S * w_FE))

    x64 = [np.asarray(a, np.float64) for a in args]
    for i in range(6):  # a random directional derivative per argument
        d = RNG.normal(size=x64[i].shape)
        hi, lo = list(x64), list(x64)
        hi[i], lo[i] = x64[i] + 1e-6 * d, x64[i] - 1e-6 * d
        fd = (L(hi) - L(lo)) / 2e-6
        assert abs(float(np.sum(np.asarray(grads[i], np.float64) * d)) - fd) < 1e-4 * (1 + abs(fd)), i


def test_bf16_inputs():
    q, k, v, g, beta, S0 = make(T=20)
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)
    o, S = gated_delta_rule(bf(q), bf(k), bf(v), g, beta, chunk_size=8, initial_state=S0, return_state=True)
    ref, S_ref = loop_np(*(np.asarray(bf(x), np.float64) for x in (q, k, v)), g, beta, S0)
    assert o.dtype == jnp.bfloat16 and S.dtype == jnp.float32
    assert rel(o, ref) < 2e-2 and rel(S, S_ref) < 1e-5  # inputs are exact bf16 values; only o is rounded


def test_chunked_gradient_memory_is_linear_in_T():
    # Per-token states [T, B, H, F, E] (what autodiff of a token scan keeps) or [T, T] arrays would
    # show up as f32 values of >= T * F * E elements in the gradient's program; none may.
    B, T, K, H, F, E, N = 1, 512, 1, 1, 8, 8, 16
    q, k, v, g, beta, S0 = make(B=B, T=T, K=K, H=H, F=F, E=E)
    grad = jax.grad(lambda *a: jnp.sum(gated_delta_rule(*a, impl="chunked", chunk_size=N)), argnums=(0, 1, 2, 3, 4))
    text = str(jax.make_jaxpr(grad)(q, k, v, g, beta))
    sizes = [int(np.prod([int(s) for s in m.split(",") if s])) for m in re.findall(r"f32\[([\d,]*)\]", text)]
    assert max(sizes) < T * F * E // 2, max(sizes)  # the largest are [G, N, N] / [T, F] (T * 16)


@settings(max_examples=4, deadline=None)
@given(T=st.integers(1, 20), N=st.sampled_from([1, 4, 16]), K=st.sampled_from([1, 2]), Y=st.sampled_from([1, 3]))
def test_chunked_equals_recurrent_random_shapes(T, N, K, Y):
    q, k, v, g, beta, S0 = make(B=1, T=T, K=K, H=K * Y, F=4, E=3, A_max=4.0)
    a = gated_delta_rule(q, k, v, g, beta, impl="chunked", chunk_size=N, initial_state=S0, return_state=True)
    b = gated_delta_rule(q, k, v, g, beta, impl="recurrent", initial_state=S0, return_state=True)
    assert rel(a[0], b[0]) < 1e-5 and rel(a[1], b[1]) < 1e-5


def _bad_calls():
    q, k, v, g, beta, S0 = make(B=1, T=4, K=2, H=4)
    yield lambda: gated_delta_rule(q, k, v, g, beta, impl="flash")
    yield lambda: gated_delta_rule(q, k, v[:, :, :3], g[:, :, :3], beta[:, :, :3])  # H not a multiple of K
    yield lambda: gated_delta_rule(q, k, v[:, :3], g, beta)  # mismatched T
    yield lambda: gated_delta_rule(q, k[:, :, :, :4], v, g, beta)
    yield lambda: gated_delta_rule(q, k, v, g[:, :3], beta)
    yield lambda: gated_delta_rule(q, k, v, g, beta, initial_state=S0[:, :2])
    yield lambda: gated_delta_rule(q, k, v, g, beta, chunk_size=0)
    yield lambda: gated_delta_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], S0[..., :2])


@pytest.mark.parametrize("i", range(8))
def test_bad_input_is_a_one_line_value_error(i):
    call = list(_bad_calls())[i]
    with pytest.raises(ValueError) as err:
        call()
    assert "\n" not in str(err.value)
    assert DELTA_IMPLEMENTATIONS == ("auto", "recurrent", "chunked")
