"""The decoder skeleton: a new mixer with a non-KV cache and a new FFN with auxiliary losses
plug into a model family with one class and one registration each (no model-file edits),
and the generic stack machinery (scan, LayerView writes, clear_rows, aux sums) is exact."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import glocal.models as gm
from glocal.configs import ConfigError
from glocal.layers import Cache, DecoderStack, LayerKind, LayerSpec, LayerView, register_ffn, register_mixer
from glocal.layers.cache import clear_rows, stack_cache, tree_nbytes
from glocal.layers.params import fan_in_init, param
from glocal.layers.spec import unregister
from tests.lm_checks import assert_causal, assert_decode_matches, jit_forward

RNG = np.random.default_rng(7)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MeanState(Cache):
    """A recurrent state: running sum of values and the count of tokens per row."""

    sum_BD: jax.Array
    count_B: jax.Array

    def add(self, sum_BD, count_B, layer=None):
        if layer is None:
            return MeanState(self.sum_BD + sum_BD, self.count_B + count_B)
        return MeanState(self.sum_BD.at[layer].add(sum_BD), self.count_B.at[layer].add(count_B))

    def clear_rows(self, rows_B, layer=None):
        keep = ~rows_B
        if layer is None:  # also right for a stack: [L, B, ...] broadcasts against [B, ...]
            return MeanState(self.sum_BD * keep[:, None], self.count_B * keep)
        return MeanState(self.sum_BD.at[layer].multiply(keep[:, None]), self.count_B.at[layer].multiply(keep))


class RunningMean(nnx.Module):
    """Toy linear-recurrence mixer: y_t = mean_{s <= t} (x_s W)."""

    def __init__(self, spec: LayerSpec, options=None, *, mask=None, rngs: nnx.Rngs):
        # Static width: init_cache runs on the stacked module, whose parameters have a
        # leading layers axis.
        self.d_model = spec.d_model
        self.w_DD = param(rngs, fan_in_init(spec.d_model), (spec.d_model, spec.d_model), ("embed", None))

    def __call__(self, x_BTD, *, positions_BT, segment_ids_BT=None, cache=None, valid_BT=None):
        if segment_ids_BT is not None:
            raise NotImplementedError("RunningMean does not isolate packed documents.")
        v_BTD = x_BTD.astype(jnp.float32) @ self.w_DD[...]
        ok_BT = jnp.ones(x_BTD.shape[:2], jnp.float32) if valid_BT is None else valid_BT.astype(jnp.float32)
        v_BTD = v_BTD * ok_BT[..., None]
        sum_BTD, count_BT = jnp.cumsum(v_BTD, axis=1), jnp.cumsum(ok_BT, axis=1)
        if cache is not None:
            sum_BTD = sum_BTD + cache.sum_BD[:, None]
            count_BT = count_BT + cache.count_B[:, None]
            cache = cache.add(v_BTD.sum(1), ok_BT.sum(1))
        y_BTD = sum_BTD / jnp.maximum(count_BT, 1.0)[..., None]
        return y_BTD.astype(x_BTD.dtype), cache

    def init_cache(self, batch_size, max_len):
        D = self.d_model
        return MeanState(jnp.zeros((batch_size, D), jnp.float32), jnp.zeros((batch_size,), jnp.float32))

    def score_flops(self, seq_len):
        return 0.0


class SquareAux(nnx.Module):
    """Toy FFN: y = x W, reporting mean(y^2) as an auxiliary loss of weight 0.25."""

    def __init__(self, spec: LayerSpec, options=None, *, rngs: nnx.Rngs):
        self.w_DD = param(rngs, fan_in_init(spec.d_model), (spec.d_model, spec.d_model), ("embed", None))

    def __call__(self, x_BTD):
        y_BTD = x_BTD @ self.w_DD[...]
        return y_BTD, {"square": (jnp.mean(y_BTD.astype(jnp.float32) ** 2), 0.25)}


@pytest.fixture(scope="module")
def toy_kinds():
    register_mixer("running_mean", letter="m")(RunningMean)
    register_ffn("square_aux")(SquareAux)
    yield
    unregister("running_mean")
    unregister("square_aux")


@pytest.fixture(scope="module")
def hybrid(toy_kinds):
    # Two units of (running mean, window-4 attention, global attention): the stacked
    # caches are a MeanState, a ring and a KV cache, all carried through one scan.
    return gm.build("transformer", "tiny", num_layers=6, layer_pattern="msg", sliding_window=4, max_seq_len=64)


def test_new_mixer_plugs_into_the_baseline_by_letter(hybrid):
    kinds = [type(layer.mixer).__name__ for layer in hybrid.decoder.units.layers]
    assert kinds == ["RunningMean", "WindowAttention", "GlobalAttention"]
    x = jnp.asarray(RNG.integers(0, 256, (2, 24)), jnp.int32)
    assert_causal(hybrid, x, (0, 9, 23))


def test_recurrent_cache_decodes_like_teacher_forcing(hybrid):
    x = jnp.asarray(RNG.integers(0, 256, (3, 24)), jnp.int32)
    cache = assert_decode_matches(hybrid, x, [1, 5, 11])
    assert isinstance(cache.layers_P[0], MeanState)
    # The state counted every token each row consumed, in both units ([units, B]).
    np.testing.assert_array_equal(cache.layers_P[0].count_B, np.broadcast_to(cache.length_B, (2, 3)))
    # cache bytes (from the shapes, one place for every kind) == the allocated pytree
    for L in (4, 20, 64):
        assert hybrid.cache_nbytes(3, L) == tree_nbytes(jax.eval_shape(lambda: hybrid.init_cache(3, L)))


def test_unknown_letter_lists_the_registered_mixers(toy_kinds):
    with pytest.raises(ConfigError, match=r"'m' \(running_mean\)"):
        gm.get_config("transformer", "tiny", layer_pattern="mx")
    with pytest.raises(ConfigError, match="ffn='nope' is not a registered FFN kind"):
        gm.get_config("fit", "tiny", ffn="nope")


def test_layer_view_writes_one_layer_of_any_cache_in_place():
    stack = stack_cache(MeanState(jnp.zeros((2, 3)), jnp.zeros((2,))), 4)
    view = LayerView(stack, jnp.int32(2))
    view = view.add(jnp.ones((2, 3)), jnp.ones((2,)))
    np.testing.assert_array_equal(view.sum_BD, np.ones((2, 3)))
    np.testing.assert_array_equal(view.stack.count_B, [[0, 0], [0, 0], [1, 1], [0, 0]])
    cleared = clear_rows((view.stack,), jnp.asarray([True, False]))[0]
    np.testing.assert_array_equal(cleared.count_B[2], [0, 1])


def test_ffn_aux_losses_sum_over_layers_scanned_or_not(toy_kinds):
    spec = LayerSpec(d_model=16, num_heads=2, d_ff=32)
    x = jnp.asarray(RNG.normal(size=(2, 8, 16)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(8), (2, 8))
    out = {}
    for scan in (True, False):
        stack = DecoderStack(spec, [LayerKind("global", "square_aux")], 3, scan=scan, rngs=nnx.Rngs(0))
        y, _, aux = stack(x, positions_BT=pos)
        out[scan] = (y, aux["square"])
    np.testing.assert_allclose(out[True][0], out[False][0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[True][1][0], out[False][1][0], rtol=1e-5)
    assert float(out[True][1][1]) == 0.25
    # Reference: run the three layers by hand and add their losses.
    stack = DecoderStack(spec, [LayerKind("global", "square_aux")], 3, scan=False, rngs=nnx.Rngs(0))
    h, total = x, 0.0
    for i in range(3):
        layer = nnx.merge(*nnx.split(stack.units))  # same parameters
        one = jax.tree.map(lambda a: a[i], nnx.state(layer))
        g = nnx.graphdef(layer)
        h, _, a = nnx.merge(g, one).layers[0](h, positions_BT=pos)
        total += a["square"][0]
    np.testing.assert_allclose(out[True][1][0], total, rtol=1e-5)


@pytest.mark.parametrize("name", ["transformer", "fit", "block"])
def test_every_family_reports_ffn_aux_losses(toy_kinds, name):
    model = gm.build(name, "tiny", ffn="square_aux")
    x = jnp.asarray(RNG.integers(0, 256, (2, 16)), jnp.int32)
    graphdef, state = nnx.split(model)
    out = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[1]["square"])(state, x)
    assert np.isfinite(float(out[0])) and float(out[0]) > 0 and float(out[1]) == 0.25


@pytest.mark.parametrize("name,fields", [
    ("fit", dict(qk_norm=True, attn_softcap=5.0, head_dim=8, latent_head_dim=8, tie_embeddings=True)),
    ("block", dict(qk_norm=True, attn_softcap=5.0, block_head_dim=8, token_head_dim=8, tie_embeddings=True)),
])
def test_attention_options_reach_every_stack(name, fields):
    model = gm.build(name, "tiny", **fields)
    attns = [m for _, m in nnx.iter_modules(model) if type(m).__name__ == "Attention" and not m.cross]
    assert attns and all(a.q_norm is not None and a.softcap == 5.0 and a.head_dim == 8 for a in attns)
    assert model.head is None  # tied to the token embedding
    x = jnp.asarray(RNG.integers(0, 256, (1, 16)), jnp.int32)
    plain = jit_forward(gm.build(name, "tiny"))(x)
    assert np.abs(np.asarray(jit_forward(model)(x)) - np.asarray(plain)).max() > 1e-3
