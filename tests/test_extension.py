"""Adding a mixer kind with options takes one file and one registration: this file is that
file. It defines a toy mixer with its own options and cache (an exponential moving average
of projected inputs, ``decay`` its option), registers it, and then trains and decodes it in
two families (the baseline and the mixture-of-experts family) through the ordinary config
and trainer machinery, with no edit anywhere else in the package."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import glocal.models as gm
from glocal.configs.base import ConfigError
from glocal.layers import Cache, KindOptions, LayerSpec, register_mixer
from glocal.layers.params import fan_in_init, param
from glocal.layers.spec import unregister
from glocal.train.step import make_train_step
from tests.lm_checks import assert_cache_nbytes, assert_causal, assert_decode_matches

RNG = np.random.default_rng(7)


# ---- the whole extension: options, cache, mixer ------------------------------------------
@dataclasses.dataclass(frozen=True)
class DecayOptions(KindOptions):
    decay: float = 0.5  # weight of the running state: h_t = decay h_{t-1} + (1 - decay) x_t W

    def validate(self, config=None) -> None:
        if not 0.0 < self.decay < 1.0:
            raise self.error("decay", "must lie in (0, 1).")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecayState(Cache):
    h_BD: jax.Array

    def set(self, h_BD, layer=None) -> "DecayState":
        return DecayState(h_BD if layer is None else self.h_BD.at[layer].set(h_BD))

    def clear_rows(self, rows_B, layer=None) -> "DecayState":
        keep = (~rows_B).astype(jnp.float32)[:, None]
        return DecayState(self.h_BD * keep if layer is None else self.h_BD.at[layer].multiply(keep))


class DecayMixer(nnx.Module):
    """``y_t = h_t W_o`` with ``h_t = a h_{t-1} + (1 - a) x_t W_i`` (a linear recurrence)."""

    packs_documents = False  # the state runs across document boundaries

    def __init__(self, spec: LayerSpec, options: DecayOptions, *, mask=None, rngs: nnx.Rngs):
        D = spec.d_model
        self.decay, self.d_model = options.decay, D
        self.w_in_DD = param(rngs, fan_in_init(D), (D, D), ("embed", None))
        self.w_out_DD = param(rngs, fan_in_init(D), (D, D), (None, "embed"))

    def __call__(self, x_BTD, *, positions_BT, segment_ids_BT=None, cache=None, valid_BT=None):
        B, T, D = x_BTD.shape
        u_BTD = (1 - self.decay) * (x_BTD.astype(jnp.float32) @ self.w_in_DD[...])
        if valid_BT is not None:
            u_BTD = u_BTD * valid_BT[..., None]
        h0_BD = jnp.zeros((B, D), jnp.float32) if cache is None else cache.h_BD
        a = self.decay
        pad = jnp.ones((B, T), jnp.float32) if valid_BT is None else valid_BT.astype(jnp.float32)

        def step(h_BD, inp):
            u_BD, ok_B = inp
            h_BD = jnp.where(ok_B[:, None] > 0, a * h_BD + u_BD, h_BD)  # padding leaves the state alone
            return h_BD, h_BD

        h_BD, h_TBD = jax.lax.scan(step, h0_BD, (jnp.swapaxes(u_BTD, 0, 1), pad.T))
        y_BTD = (jnp.swapaxes(h_TBD, 0, 1) @ self.w_out_DD[...]).astype(x_BTD.dtype)
        return y_BTD, (None if cache is None else cache.set(h_BD))

    def init_cache(self, batch_size: int, max_len: int) -> DecayState:
        return DecayState(jnp.zeros((batch_size, self.d_model), jnp.float32))

    def score_flops(self, seq_len: int) -> float:
        return 3.0 * self.d_model


@pytest.fixture(scope="module")
def decay_kind():
    register_mixer("decay", letter="e", options=DecayOptions)(DecayMixer)
    yield
    unregister("decay")


# ---- what the registration alone buys --------------------------------------------------
FAMILIES = [("transformer", dict(num_layers=2, layer_pattern="eg")),
            ("moe", dict(num_layers=2, layer_pattern="eg", first_dense_layers=0, moe_every=1))]


@pytest.mark.parametrize("family,shape", FAMILIES)
def test_new_mixer_with_options_trains_and_decodes_in_two_families(decay_kind, family, shape):
    model = gm.build(family, "tiny", max_seq_len=32, **shape, **{"decay.decay": 0.8})
    assert [type(layer.mixer).__name__ for layer in model.decoder.units.layers] == ["DecayMixer", "GlobalAttention"]
    assert model.decoder.units.layers[0].mixer.decay == 0.8
    assert not model.packed_documents  # derived from the mixer's packs_documents
    x = jnp.asarray(RNG.integers(0, 256, (2, 16)), jnp.int32)
    assert_causal(model, x, (0, 7, 15))
    assert_decode_matches(model, x, [3, 9])
    assert_cache_nbytes(model, 2, (8, 32))

    # A few steps of the trainer's own step function lower the loss on a fixed batch.
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adam(3e-3)
    step = jax.jit(make_train_step(lambda p: nnx.merge(graphdef, p, rest), tx))
    batch = {"inputs": x[None], "targets": jnp.roll(x, -1, axis=1)[None], "loss_mask": jnp.ones((1, 2, 16)),
             "positions": jnp.broadcast_to(jnp.arange(16), (1, 2, 16)), "segment_ids": jnp.ones((1, 2, 16), jnp.int32)}
    opt_state = tx.init(params)
    losses = []
    for _ in range(6):
        params, opt_state, metrics = step(params, opt_state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.05, losses


def test_options_are_validated_round_trip_and_change_the_model(decay_kind):
    cfg = gm.get_config("transformer", "tiny", layer_pattern="eg", **{"decay.decay": 0.25})
    assert cfg.options["decay"] == DecayOptions(0.25)
    # JSON carries the section, and reading it back gives the same config.
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["decay"] == {"decay": 0.25}
    assert type(cfg).from_dict(d) == cfg
    # Errors name the field as the user writes it.
    with pytest.raises(ConfigError, match=r"decay\.decay=1\.5 must lie in \(0, 1\)"):
        cfg.replace(**{"decay.decay": 1.5})
    with pytest.raises(ConfigError, match="has no option 'rate'"):
        cfg.replace(**{"decay.rate": 0.3})
    # Options of a kind no layer uses are refused, not ignored.
    with pytest.raises(ConfigError, match=r"options of \['decay'\] are set"):
        gm.get_config("transformer", "tiny", **{"decay.decay": 0.3})
    # The option reaches the layer: a different decay, different logits from the same weights.
    x = jnp.asarray(RNG.integers(0, 256, (1, 8)), jnp.int32)
    a = gm.build_from_config(cfg)
    b = gm.build_from_config(cfg.replace(**{"decay.decay": 0.75}))
    assert not np.allclose(a(x)[0], b(x)[0])
