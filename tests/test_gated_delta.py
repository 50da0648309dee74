"""The ``gated_delta`` mixer (Gated DeltaNet) and the Qwen3-Next-shaped presets, beyond the
conformance suite (which runs causality, cached decoding and cache sizes on them) and the
Hugging Face parity tests (tests/test_hf_qwen3_next.py): the decoding state does not grow with
the context, options are checked with one clear line, the preset trains through the trainer
on 8 devices like on one, and the mixer's parallel forms agree inside a model."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import glocal.models as gm
from glocal.configs.base import ConfigError
from glocal.layers.gated_delta import GatedDeltaNet, GatedDeltaState


def test_delta_layers_state_does_not_grow_with_the_context():
    cfg = dict(num_layers=4, layer_pattern="dddg", max_seq_len=32768)
    model = gm.build("transformer", "tiny", **cfg)
    layers = [layer.mixer for layer in model.decoder.units.layers]
    assert [type(m).__name__ for m in layers[:3]] == ["GatedDeltaNet"] * 3
    sizes = {L: [m.init_cache(2, L).nbytes for m in layers] for L in (2048, 8192, 32768)}
    assert sizes[2048][:3] == sizes[8192][:3] == sizes[32768][:3]  # delta layers: constant
    assert sizes[2048][3] * 16 == sizes[32768][3]  # the global layer's KV cache grows
    m = layers[0]  # (W - 1) conv inputs + the float32 state [H, F, E], per row
    assert sizes[2048][0] == 2 * ((m.W - 1) * m.conv_channels * 4 + m.H * m.F * m.E * 4)
    state = m.init_cache(2, 8)
    assert isinstance(state, GatedDeltaState) and state.S_BHFE.dtype == jnp.float32


@pytest.mark.parametrize("option,value,match", [
    ("gated_delta.value_heads", 3, r"gated_delta.value_heads=3 must be a multiple of gated_delta.key_heads=2"),
    ("gated_delta.impl", "pallas", r"gated_delta.impl='pallas' is not one of"),
    ("gated_delta.conv_width", 0, r"gated_delta.conv_width=0 must be a positive integer"),
])
def test_bad_options_are_one_clear_line(option, value, match):
    with pytest.raises(ConfigError, match=match):
        gm.get_config("transformer", "tiny", layer_pattern="dg", **{"gated_delta.key_heads": 2, option: value})


def test_chunked_and_recurrent_models_agree():
    x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 37)), jnp.int32)
    kw = dict(num_layers=2, layer_pattern="dg", seed=3, **{"gated_delta.chunk_size": 8})
    a = gm.build("transformer", "tiny", **kw)
    b = gm.build("transformer", "tiny", **kw, **{"gated_delta.impl": "recurrent"})
    np.testing.assert_allclose(np.asarray(a(x)[0]), np.asarray(b(x)[0]), rtol=1e-4, atol=1e-4)
    assert isinstance(a.decoder.units.layers[0].mixer, GatedDeltaNet)


def test_qwen3_next_preset_on_eight_devices_trains_like_one(sharded):
    """(tests/sharded_check.py trains the preset through the trainer on 1 and on 8 devices.)"""
    r = sharded["models"]["moe_qwen3_next_tiny"]
    np.testing.assert_allclose(r["fsdp_tp"], r["one"], rtol=1e-5)
    # Adam's first steps move every element by about the learning rate whatever its gradient's
    # size; where a gradient is float noise (router columns of experts few tokens chose) the two
    # runs may step opposite ways: the largest difference, measured, is 2.0e-5 in a router.
    assert r["param_rel_diff"] < 5e-5
