"""Baseline LM: ring-buffer memory, scan/remat/dtype variants, tied head and soft-caps, logical
axis names, configs. The checks every family shares (causality, cached decoding == teacher
forcing, packed documents, input errors, ... for the tiny preset and the sliding-window
variant) are in tests/test_conformance.py."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from flax import nnx

import glocal.models as gm
from glocal.configs import ConfigError
from tests.lm_checks import build

RNG = np.random.default_rng(0)


@pytest.fixture(scope="module")
def tiny():
    return build("transformer", "tiny")


@pytest.fixture(scope="module")
def windowed():
    # Sliding window 6 < sequence length so the ring buffers wrap many times (the "window"
    # variant of tests/test_conformance.py: the same object, built once).
    return build("transformer", "tiny", num_layers=3, layer_pattern="ssg", sliding_window=6, max_seq_len=64)


def tokens(B, T_, vocab=256):
    return jnp.asarray(RNG.integers(0, vocab, size=(B, T_)), jnp.int32)


def test_ring_buffer_memory_does_not_grow(windowed):
    short, long = windowed.init_cache(2, 16), windowed.init_cache(2, 64)
    ring_bytes = lambda c: sum(x.nbytes for i, x in enumerate(c.layers_P) if windowed.config.layer_pattern[i] == "s")
    assert ring_bytes(short) == ring_bytes(long)
    assert short.nbytes == windowed.cache_nbytes(2, 16) and long.nbytes == windowed.cache_nbytes(2, 64)
    assert short.layers_P[0].size == 6 and long.layers_P[2].size == 64


class VariantTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_forward_jit_and_nojit_agree_with_reference_loop(self):
        model = gm.build("transformer", "tiny", scan_layers=False)
        scanned = gm.build("transformer", "tiny")  # same seed -> same parameters
        x = tokens(2, 12)
        fn = self.variant(lambda s, t: nnx.merge(nnx.graphdef(model), s)(t)[0])
        got = fn(nnx.state(model), x)
        chex.assert_trees_all_close(got, scanned(x)[0], rtol=1e-5, atol=1e-5)
        chex.assert_shape(got, (2, 12, 384))
        chex.assert_tree_all_finite(got)


def test_remat_policies_give_identical_loss_and_grads():
    x = tokens(2, 16)

    def loss_and_grad(remat):
        model = gm.build("transformer", "tiny", remat=remat)
        graphdef, params = nnx.split(model)

        def loss(p):
            logits, _ = nnx.merge(graphdef, p)(x[:, :-1])
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), x[:, 1:, None], -1))

        return jax.jit(jax.value_and_grad(loss))(params)

    ref = loss_and_grad("none")
    for policy in ("full", "dots", "all_dots", "save_qkv_attn"):
        # Recomputation may reassociate float32 sums: allow ~1e-5 absolute on the gradients.
        chex.assert_trees_all_close(loss_and_grad(policy), ref, rtol=1e-4, atol=1e-5)


def test_bfloat16_compute_tracks_float32():
    x = tokens(2, 16)
    f32, _ = gm.build("transformer", "tiny")(x)
    bf16_model = gm.build("transformer", "tiny", dtype="bfloat16")
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bf16_model, nnx.Param)))
    bf16, _ = bf16_model(x)
    assert bf16.dtype == jnp.float32  # logits accumulate in float32
    rel = jnp.linalg.norm(bf16 - f32) / jnp.linalg.norm(f32)
    assert rel < 0.03, rel


def test_tied_embeddings_and_softcaps():
    m = gm.build("transformer", "tiny", tie_embeddings=True, logit_softcap=5.0, attn_softcap=20.0)
    assert m.head is None
    logits, _ = m(tokens(1, 8))
    assert float(jnp.max(jnp.abs(logits))) < 5.0


def test_parameters_carry_logical_axis_names(tiny):
    specs = {"/".join(map(str, k)): v.get_metadata()["out_sharding"]
             for k, v in nnx.to_flat_state(nnx.state(tiny, nnx.Param))}
    assert specs["embed/table_VD"] == ("vocab", "embed")
    assert specs["decoder/units/layers/0/mixer/attn/qkv_DKAE"] == ("layers", "embed", "kv_heads", None, "head_dim")
    assert specs["decoder/units/layers/0/ffn/wo_ID"] == ("layers", "mlp", "embed")


@pytest.mark.parametrize("overrides,message", [
    (dict(d_model=100, num_heads=8), "num_heads=8 does not divide d_model=100"),
    (dict(num_heads=4, num_kv_heads=3), "num_kv_heads=3 does not divide num_heads=4"),
    (dict(layer_pattern="sg", sliding_window=512, max_seq_len=256), "larger than the context"),
    (dict(layer_pattern="sg"), r"set window.size \(or sliding_window\)"),
    (dict(num_layers=3, layer_pattern="sg", sliding_window=8), "not a multiple of len"),
    (dict(layer_pattern="gx"), "may only contain"),
    (dict(dtype="float8"), "dtype='float8' is not one of"),
    (dict(d_modle=64), "Did you mean d_model"),
    (dict(num_layers="two"), "must be an integer"),
])
def test_config_errors_explain_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        gm.get_config("transformer", "tiny", **overrides)


def test_registry_and_presets():
    with pytest.raises(ConfigError, match="unknown preset 'huge'.*tiny"):
        gm.build("transformer", "huge")
    with pytest.raises(ConfigError, match="Did you mean 'transformer'"):
        gm.build("transformr")
    cfg = gm.get_config("transformer", "small", d_model="256", num_heads="4", dtype="bfloat16")
    assert (cfg.d_model, cfg.num_heads, cfg.dtype) == (256, 4, "bfloat16")
    assert gm.split_config_name("transformer_small") == ("transformer", "small")
    assert type(cfg).from_dict(cfg.to_dict()) == cfg
    count = lambda name: sum(x.size for x in jax.tree.leaves(
        nnx.state(jax.eval_shape(lambda: gm.build("transformer", name)), nnx.Param)))
    D, E, F, L, V = 256, 64, 768, 4, 384  # small: heads 4, kv heads 2, untied head
    per_layer = D * 4 * E + 2 * D * 2 * E + 4 * E * D + 2 * D + D * 2 * F + F * D
    assert count("small") == 2 * V * D + D + L * per_layer
    assert 100e6 <= count("base") <= 150e6
