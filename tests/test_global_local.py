"""FIT and Block Transformer: the FIT latent shift that makes causality hold, caches that grow
per group / block (not per token), the encoder form's permutation symmetry, FIT '(2)' == the
baseline per group, configs, presets, bfloat16. The checks every family shares (causality,
cached decoding == teacher forcing across group/block boundaries, greedy generation, cache
size, FLOPs vs XLA, input errors, training, 8 devices; also on the fit_wide and block_odd
variants) are in tests/test_conformance.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import glocal.models as gm
from glocal.configs import ConfigError
from tests.lm_checks import assert_cache_nbytes, assert_causal, build, jit_forward

RNG = np.random.default_rng(1)
T = 40  # tiny presets: FIT groups of 8 (5 groups), blocks of 4 (10 blocks)


def tokens(B, T_, vocab=256):
    return jnp.asarray(RNG.integers(0, vocab, size=(B, T_)), jnp.int32)


@pytest.fixture(scope="module")
def fit():
    return build("fit", "tiny")


@pytest.fixture(scope="module")
def fit_wide():
    # Latents wider than tokens, GQA in the local layers, 3 latents per group, tied head,
    # LayerNorm (its bias makes the zero latents of group 0 project to non-zero keys). The
    # "wide" variant of tests/test_conformance.py (the same object, built once).
    return build("fit", "tiny", d_latent=48, latent_heads=2, num_heads=4, num_kv_heads=2,
                    num_latents=3, group_size=6, max_seq_len=48, layer_spec="(2)1(1)2(1)",
                    tie_embeddings=True, norm="layer", seed=2)


@pytest.fixture(scope="module")
def block():
    return build("block", "tiny")


@pytest.fixture(scope="module")
def block_odd():
    # Blocks of 3 with a 3-vector prefix and GQA in both decoders (the "odd" variant of
    # tests/test_conformance.py).
    return build("block", "tiny", block_size=3, prefix_len=3, d_block=48, block_heads=4, block_kv_heads=2,
                    token_heads=2, token_kv_heads=1, max_seq_len=48, seed=4)


MODELS = ["fit", "fit_wide", "block", "block_odd"]


def test_fit_without_the_latent_shift_leaks_the_future(fit):
    """l2x lets a group's latents read the whole group; without the shift x2l hands those
    latents back to the same group's earlier tokens: the causality check must fail."""
    x = tokens(2, T)
    no_shift = lambda m, t: (m._logits(m._encode(t, shift=False)[0]), {})
    f = jit_forward(fit, fn=no_shift)
    i = 13  # inside group 1 (tokens 8..15)
    y, base = f(x.at[:, i].set((x[:, i] + 1) % 256)), f(x)
    leak = np.abs(np.asarray(y[:, :i]) - np.asarray(base[:, :i])).max(axis=(0, 2))
    assert leak[8:i].max() > 1e-3  # earlier tokens of the same group see token i
    assert leak[:8].max() == 0  # earlier groups still do not
    with pytest.raises(AssertionError, match="perturbing token 13"):
        assert_causal(fit, x, (i,), fn=no_shift)


@pytest.mark.parametrize("which", MODELS)
def test_cache_grows_per_group_or_block_not_per_token(which, request):
    """Per-sequence growth: only the global part grows, L/n groups of m latents (FIT) or
    L/L_B block entries (Block Transformer), never one entry per token."""
    model = request.getfixturevalue(which)
    sizes = assert_cache_nbytes(model, 3, (8, 24))
    for L, size in sizes.items():
        assert jax.eval_shape(lambda: model.init_cache(3, L)).nbytes == size
    cfg = model.config
    if which.startswith("fit"):
        K = cfg.latent_kv_heads or cfg.global_heads
        E = cfg.latent_head_dim or cfg.latent_width // cfg.global_heads
        per_group = 3 * sum(b * cfg.num_latents * (2 * K * E * 4 + 4) for _, b in cfg.units)
        groups = lambda L: -(-L // cfg.group_size)
        assert sizes[24] - sizes[8] == per_group * (groups(24) - groups(8))
    else:
        K, E = cfg.block_kv_heads or cfg.block_heads, cfg.d_block // cfg.block_heads
        per_block = 3 * cfg.block_layers * (2 * K * E * 4 + 4)
        assert sizes[24] - sizes[8] == per_block * (-(-24 // cfg.block_size) - -(-8 // cfg.block_size))


def test_fit_encoder_is_permutation_consistent_within_and_across_groups():
    """Without positions the encoder form is symmetric: permuting tokens inside a group
    permutes that group's outputs the same way (local attention is full, l2x pools the
    group), and permuting whole groups permutes the output groups (global attention is full
    and every group's latents start from the same slot embeddings)."""
    enc = gm.build("fit", "tiny", causal=False, rope_theta=None, layer_spec="(1)1(1)1", seed=5)
    n = enc.config.group_size
    x = tokens(2, 4 * n)
    f = jit_forward(enc)
    base = f(x)
    perm = np.concatenate([RNG.permutation(n) + g * n for g in range(4)])  # within each group
    np.testing.assert_allclose(f(x[:, perm]), base[:, perm], rtol=1e-5, atol=1e-5)
    groups = np.concatenate([np.arange(n) + g * n for g in (2, 0, 3, 1)])
    np.testing.assert_allclose(f(x[:, groups]), base[:, groups], rtol=1e-5, atol=1e-5)
    # With RoPE inside groups the within-group symmetry is (rightly) broken.
    rope = jit_forward(gm.build("fit", "tiny", causal=False, layer_spec="(1)1(1)1", seed=5))
    assert np.abs(np.asarray(rope(x[:, perm]) - rope(x)[:, perm])).max() > 1e-3
    with pytest.raises(ValueError, match="cannot decode"):
        enc.init_cache(1, 16)


def test_fit_with_only_local_layers_is_the_baseline_run_per_group():
    """Spec '(2)': two local layers and nothing else is exactly the baseline decoder run on
    each group separately (same weights), positions restarting per group."""
    fit = gm.build("fit", "tiny", layer_spec="(2)", seed=6)
    base = gm.build("transformer", "tiny", d_model=32, num_heads=2, num_kv_heads=None, d_ff=64, num_layers=2,
                    max_seq_len=8, seed=7)
    # Copy FIT's weights into the baseline (the layer stacks have the same leaves).
    fs = nnx.state(fit, nnx.Param)
    bs = nnx.state(base, nnx.Param)
    for key in ("embed", "head", "final_norm"):
        bs[key] = fs[key]
    bs["decoder"] = fs["units"][0]["local"]
    nnx.update(base, bs)
    x = tokens(3, 24)
    want = jit_forward(base)(x.reshape(9, 8)).reshape(3, 24, -1)
    np.testing.assert_allclose(jit_forward(fit)(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,overrides,message", [
    ("fit", dict(max_seq_len=100), "max_seq_len=100 is not a multiple of group_size=8; use max_seq_len=96 or 104"),
    ("fit", dict(layer_spec="(2)2(2)2"), "ends with global layers"),
    ("fit", dict(layer_spec="2(2)"), "is not of the form"),
    ("fit", dict(layer_spec="(1)(1)"), "only the last unit may have no global layers"),
    ("fit", dict(d_latent=30, latent_heads=4), "latent_heads=4 does not divide d_latent=30"),
    ("block", dict(max_seq_len=30), "max_seq_len=30 is not a multiple of block_size=4; use max_seq_len=28 or 32"),
    ("block", dict(d_block=30), "d_block=30 is not divisible by block_size=4"),
    ("block", dict(token_heads=3), "token_heads=3 does not divide d_token=32"),
    ("block", dict(block_heads=2, block_kv_heads=3), "block_kv_heads=3 does not divide block_heads=2"),
    ("fit", dict(latent_head_dim=7, latent_heads=2), "latent_head_dim must be even for RoPE"),
    ("block", dict(block_sise=4), "Did you mean block_size"),
])
def test_config_errors_explain_the_fix(name, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        gm.get_config(name, "tiny", **overrides)


@pytest.mark.parametrize("name", ["fit", "block"])
def test_presets_and_logical_axis_names(name):
    for preset in ("tiny", "small", "base"):
        cfg = gm.get_config(name, preset)
        assert type(cfg).from_dict(cfg.to_dict()) == cfg
    abstract = jax.eval_shape(lambda: gm.build(name, "base"))
    params = nnx.to_flat_state(nnx.state(abstract, nnx.Param))
    assert 100e6 <= sum(x.size for _, x in params) <= 130e6
    for path, v in params:
        names = v.get_metadata()["out_sharding"]
        assert len(names) == v.ndim, path
        assert any(n is not None for n in names), path


@pytest.mark.parametrize("name", ["fit", "block"])
def test_bfloat16_compute_tracks_float32(name):
    x = tokens(2, 32)
    f32 = gm.build(name, "tiny")
    bf16 = gm.build(name, "tiny", dtype="bfloat16")
    a, b = np.asarray(jit_forward(f32)(x)), np.asarray(jit_forward(bf16)(x))
    assert b.dtype == np.float32
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()
